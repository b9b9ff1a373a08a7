//! Many consumers, a few threads: 200 tenant queues on one connection, each consumed on
//! a channel of its own, all served by a `Dispatcher` of 2 threads. Each tenant's handler
//! keeps its own state (a running total, no lock: a consumer's deliveries are handled one
//! at a time, in order) and acks; then a graceful shutdown. Prints how many threads the
//! process used against what a thread per consumer would have taken.
//!
//! Run: `scripts/with-rabbitmq cargo run --example dispatcher` (AMQP_URL overrides).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, Connection, ConsumeOptions, Dispatcher, Error, Outcome, PublishOptions,
    QueueDeclareOptions, QueueDeleteOptions, WorkerOptions,
};

const TENANTS: usize = 200;
const PER_TENANT: u64 = 50;

fn main() -> Result<(), Error> {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://127.0.0.1:5672".into());
    let conn = Connection::open(&url)?;
    let admin = conn.open_channel()?;
    let queues: Vec<String> = (0..TENANTS)
        .map(|i| format!("lepus-example-tenant-{}-{i}", std::process::id()))
        .collect();
    for q in &queues {
        admin.queue_declare(q, &QueueDeclareOptions::default())?;
    }

    let dispatcher = Dispatcher::new(&WorkerOptions::new(2))?;
    let grand_total = Arc::new(AtomicU64::new(0));
    let handled = Arc::new(AtomicU64::new(0));
    for q in &queues {
        // Channel open, qos and consume in one round trip.
        let consumer = conn.open_consumer(q, 20, &ConsumeOptions::default())?;
        let (grand_total, handled) = (grand_total.clone(), handled.clone());
        let mut total = 0u64; // this tenant's own state
        let mut next = 0u64;
        dispatcher.add(consumer, move |d| {
            let Some(n) = std::str::from_utf8(d.body())
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
            else {
                return Outcome::Reject; // malformed: dropped (or dead-lettered)
            };
            if n != next {
                eprintln!("out of order: {n} where {next} was next");
            }
            next = n + 1;
            total += n;
            if n + 1 == PER_TENANT {
                grand_total.fetch_add(total, Ordering::Relaxed);
            }
            handled.fetch_add(1, Ordering::Relaxed);
            Outcome::Ack
        })?;
    }

    let t0 = Instant::now();
    admin.confirm_select()?;
    for n in 0..PER_TENANT {
        for q in &queues {
            let body = n.to_string();
            admin.basic_publish(
                "",
                q,
                body.as_bytes(),
                &BasicProperties::new(),
                &PublishOptions::default(),
            )?;
        }
    }
    admin.wait_for_confirms()?;
    let all = TENANTS as u64 * PER_TENANT;
    let deadline = Instant::now() + Duration::from_secs(60);
    while handled.load(Ordering::Relaxed) < all && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = t0.elapsed().as_secs_f64();
    let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count()).ok();

    let stats = dispatcher.shutdown(Duration::from_secs(10));
    let totals_right =
        grand_total.load(Ordering::Relaxed) == TENANTS as u64 * (PER_TENANT * (PER_TENANT - 1) / 2);
    println!(
        "{TENANTS} consumers, {} messages handled in {secs:.2} s on 2 dispatcher threads \
         ({} threads in the process, against {TENANTS} and more with a thread per \
         consumer); every tenant's total right: {totals_right}",
        handled.load(Ordering::Relaxed),
        threads.map_or("?".into(), |t| t.to_string()),
    );
    println!(
        "acked {}, rejected {}, requeued at shutdown {}",
        stats.acked, stats.rejected, stats.left_requeued
    );
    for q in &queues {
        admin.queue_delete(q, &QueueDeleteOptions::default())?;
    }
    conn.close()?;
    if stats.acked != all {
        return Err(Error::InvalidArgument(format!(
            "{} of {all} acked",
            stats.acked
        )));
    }
    Ok(())
}
