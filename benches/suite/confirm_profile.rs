//! A small lepus confirm-each program for profiling (benches/results/confirm-profile.md):
//! T threads on one connection, a channel each in confirm mode, each publishing M
//! 64-byte messages and waiting for each one's confirm. Prints the rate, the process's
//! CPU time per message and its context switches per message (getrusage).
//!
//! ```text
//! cargo build --profile bench -p lepus-bench-suite --example confirm-profile
//! scripts/with-rabbitmq target/release/examples/confirm-profile [threads] [per_thread]
//! perf record -g target/release/examples/confirm-profile 100 200
//! strace -c -f target/release/examples/confirm-profile 100 200
//! LEPUS_SHARED_CHANNEL=1 target/release/examples/confirm-profile 20 500   # one channel
//! ```

#[path = "cpu.rs"]
mod cpu;

use std::sync::{Arc, Barrier};
use std::time::Instant;

use lepus::{BasicProperties, Connection, PublishOptions, QueueDeclareOptions};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let threads = args.first().copied().unwrap_or(100);
    let per = args.get(1).copied().unwrap_or(200);
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let conn = Connection::open(&url).expect("connect");
    let admin = conn.open_channel().expect("admin channel");
    let queue = format!("lepus-confirm-profile.{}", std::process::id());
    admin
        .queue_declare(&queue, &QueueDeclareOptions::default())
        .expect("queue.declare");
    // LEPUS_SHARED_CHANNEL=1: every thread publishes on one channel (its waiters share
    // the channel's confirm tracker).
    let shared = std::env::var_os("LEPUS_SHARED_CHANNEL").is_some().then(|| {
        let ch = conn.open_channel().expect("channel");
        ch.confirm_select().expect("confirm.select");
        ch
    });
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (conn, queue, barrier) = (conn.clone(), queue.clone(), barrier.clone());
            let shared = shared.clone();
            std::thread::spawn(move || {
                let ch = shared.unwrap_or_else(|| {
                    let ch = conn.open_channel().expect("channel");
                    ch.confirm_select().expect("confirm.select");
                    ch
                });
                let props = BasicProperties::new();
                let body = [7u8; 64];
                barrier.wait();
                let mut failed = 0usize;
                for _ in 0..per {
                    let ok = ch
                        .basic_publish_confirmed(
                            "",
                            &queue,
                            &body,
                            &props,
                            &PublishOptions::default(),
                        )
                        .and_then(|c| c.wait())
                        .is_ok();
                    failed += usize::from(!ok);
                }
                failed
            })
        })
        .collect();
    let cpu0 = cpu::process();
    barrier.wait();
    let start = Instant::now();
    let failed: usize = handles
        .into_iter()
        .map(|h| h.join().expect("publisher"))
        .sum();
    let secs = start.elapsed().as_secs_f64();
    let u = cpu::process().since(&cpu0);
    let n = (threads * per) as f64;
    println!(
        "{threads} threads x {per}: {:.0} msg/s, {failed} failed; CPU {:.2} us/msg (user {:.2}, sys {:.2}); voluntary switches {:.2}/msg, involuntary {:.2}/msg",
        n / secs,
        u.cpu_us() / n,
        u.user_us / n,
        u.sys_us / n,
        u.vcsw as f64 / n,
        u.ivcsw as f64 / n
    );
    let _ = admin.queue_delete(&queue, &Default::default());
    let _ = conn.close();
}
