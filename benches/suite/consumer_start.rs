//! Consumer start-up two ways, interleaved in one run: `Connection::open_consumer`
//! (channel.open, basic.qos and basic.consume written together, one round trip) against
//! `open_channel` + `basic_qos` + `basic_consume` (three round trips).
//!
//! Sequential: one thread starts `SEQ` consumers one after another (the latency of one
//! start). Parallel: N threads each start one consumer at once, timed until the last
//! consume-ok (what the suite's scenario 3 calls startup). Prints the median of each,
//! and their ratio, over ROUNDS rounds (A B A B ...).
//!
//! ```text
//! cargo build --profile bench -p lepus-bench-suite --example consumer-start
//! scripts/with-rabbitmq target/release/examples/consumer-start [rounds] [threads...]
//! ```

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use lepus::{Connection, ConsumeOptions, QueueDeclareOptions, QueueDeleteOptions};

const SEQ: usize = 200;
const PREFETCH: u16 = 50;

fn start(conn: &Connection, queue: &str, pipelined: bool) -> lepus::Consumer {
    if pipelined {
        conn.open_consumer(queue, PREFETCH, &ConsumeOptions::default())
            .expect("open_consumer")
    } else {
        let ch = conn.open_channel().expect("open_channel");
        ch.basic_qos(PREFETCH, false).expect("basic_qos");
        ch.basic_consume(queue, &ConsumeOptions::default())
            .expect("basic_consume")
    }
}

/// One thread, `SEQ` starts in a row: seconds per start.
fn sequential(url: &str, queue: &str, pipelined: bool) -> f64 {
    let conn = Connection::open(url).expect("connect");
    let t0 = Instant::now();
    let consumers: Vec<_> = (0..SEQ).map(|_| start(&conn, queue, pipelined)).collect();
    let secs = t0.elapsed().as_secs_f64() / SEQ as f64;
    drop(consumers);
    let _ = conn.close();
    secs
}

/// `n` threads start one consumer each at once: seconds until the last is started.
fn parallel(url: &str, queue: &str, n: usize, pipelined: bool) -> f64 {
    let conn = Connection::open(url).expect("connect");
    let barrier = Arc::new(Barrier::new(n + 1));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (conn, queue, barrier) = (conn.clone(), queue.to_string(), barrier.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    barrier.wait();
                    let c = start(&conn, &queue, pipelined);
                    (Instant::now(), c)
                })
                .expect("spawn")
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    let mut last = t0;
    let mut consumers = Vec::with_capacity(n);
    for h in handles {
        let (at, c) = h.join().expect("consumer thread");
        last = last.max(at);
        consumers.push(c);
    }
    drop(consumers);
    let _ = conn.close();
    (last - t0).as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse::<usize>().ok());
    let rounds = args.next().unwrap_or(5);
    let mut sizes: Vec<usize> = args.collect();
    if sizes.is_empty() {
        sizes = vec![100, 500, 900];
    }
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let admin = Connection::open(&url).expect("connect");
    let ch = admin.open_channel().expect("admin channel");
    let queue = format!("lepus-consumer-start.{}", std::process::id());
    ch.queue_declare(&queue, &QueueDeclareOptions::default())
        .expect("queue.declare");
    let mut rows = Vec::new();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        a.push(sequential(&url, &queue, false));
        b.push(sequential(&url, &queue, true));
    }
    rows.push((
        format!("one thread, {SEQ} starts (per start)"),
        median(&mut a),
        median(&mut b),
    ));
    for &n in &sizes {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            a.push(parallel(&url, &queue, n, false));
            // Let the broker close the previous round's channels.
            std::thread::sleep(Duration::from_millis(200));
            b.push(parallel(&url, &queue, n, true));
            std::thread::sleep(Duration::from_millis(200));
        }
        rows.push((
            format!("{n} threads at once (until the last)"),
            median(&mut a),
            median(&mut b),
        ));
    }
    let _ = ch.queue_delete(&queue, &QueueDeleteOptions::default());
    let _ = admin.close();
    println!(
        "| start-up, medians of {rounds} rounds | open + qos + consume | open_consumer | ratio |"
    );
    println!("|---|---|---|---|");
    for (what, three, one) in rows {
        println!(
            "| {what} | {:.3} ms | {:.3} ms | {:.2}× |",
            three * 1e3,
            one * 1e3,
            three / one
        );
    }
}
