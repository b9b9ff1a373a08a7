//! First publish-throughput measurement: T threads on one connection, a channel each,
//! 64-byte bodies, without confirms and with a confirm awaited after every publish.
//! Reports the call rate and the rate the broker absorbed (until the queue held every
//! message).
//!
//! Run: `scripts/with-rabbitmq cargo bench --bench publish` (AMQP_URL overrides).

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use lepus::{BasicProperties, Connection, PublishOptions, QueueDeclareOptions, QueueDeleteOptions};

fn run(conn: &Connection, threads: usize, per_thread: usize, confirms: bool) -> (f64, f64) {
    let queue = format!(
        "lepus-bench-publish-{}-{threads}-{confirms}",
        std::process::id()
    );
    let admin = conn.open_channel().expect("channel");
    admin
        .queue_declare(&queue, &QueueDeclareOptions::default())
        .expect("declare");
    admin.queue_purge(&queue).expect("purge");
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (conn, queue, barrier) = (conn.clone(), queue.clone(), barrier.clone());
            thread::spawn(move || {
                let ch = conn.open_channel().expect("channel");
                if confirms {
                    ch.confirm_select().expect("confirm.select");
                }
                let body = [7u8; 64];
                let props = BasicProperties::new();
                barrier.wait();
                for _ in 0..per_thread {
                    if confirms {
                        ch.basic_publish_confirmed(
                            "",
                            &queue,
                            &body,
                            &props,
                            &PublishOptions::default(),
                        )
                        .expect("publish")
                        .wait()
                        .expect("confirm");
                    } else {
                        ch.basic_publish("", &queue, &body, &props, &PublishOptions::default())
                            .expect("publish");
                    }
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().expect("publisher");
    }
    let calls = start.elapsed();
    let total = threads * per_thread;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = admin
            .queue_declare(&queue, &passive)
            .expect("passive declare")
            .message_count;
        if n as usize >= total || Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(1));
    }
    let absorbed = start.elapsed();
    admin
        .queue_delete(&queue, &QueueDeleteOptions::default())
        .expect("delete");
    (
        total as f64 / calls.as_secs_f64(),
        total as f64 / absorbed.as_secs_f64(),
    )
}

fn main() {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://127.0.0.1:5672".into());
    let conn = Connection::open(&url).expect("connect");
    println!("| threads | confirms | messages | call rate msg/s | absorbed msg/s |");
    println!("|---|---|---|---|---|");
    for (threads, per, confirms) in [
        (1, 100_000, false),
        (100, 1_000, false),
        (1, 5_000, true),
        (100, 200, true),
    ] {
        let (calls, absorbed) = run(&conn, threads, per, confirms);
        println!(
            "| {threads} | {} | {} | {calls:.0} | {absorbed:.0} |",
            if confirms { "wait each" } else { "no" },
            threads * per
        );
    }
    conn.close().expect("close");
}
