//! A worker service: a durable quorum queue with a delivery limit and a dead-letter
//! queue, 1,000 jobs, and a `WorkerPool` of 8 handler threads over one consumer. The
//! handler acks what it processed, requeues a job that failed for a passing reason
//! (every 50th, once), rejects a malformed one (dead-lettered), and a panic in it fails
//! only that job. Then a graceful shutdown: no new jobs, in-flight ones finish, the rest
//! go back to the queue.
//!
//! Run: `scripts/with-rabbitmq cargo run --example worker_pool` (AMQP_URL overrides).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, Connection, ConsumeOptions, Error, Outcome, PublishOptions, QueueArgs,
    QueueDeleteOptions, WorkerOptions, WorkerPool,
};

const JOBS: u32 = 1_000;

fn main() -> Result<(), Error> {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://127.0.0.1:5672".into());
    let conn = Connection::open(&url)?;
    let admin = conn.open_channel()?;
    let jobs = format!("lepus-example-jobs-{}", std::process::id());
    let dead = format!("{jobs}-dead");
    admin.queue_declare(&dead, &QueueArgs::quorum().declare_options())?;
    let opts = QueueArgs::quorum()
        .delivery_limit(5) // a job requeued 5 times is dead-lettered, not retried forever
        .dead_letter_exchange("")
        .dead_letter_routing_key(&dead)
        .declare_options();
    admin.queue_declare(&jobs, &opts)?;

    admin.confirm_select()?;
    for i in 0..JOBS {
        let body = if i == 500 {
            b"malformed".to_vec()
        } else {
            i.to_string().into_bytes()
        };
        admin.basic_publish(
            "",
            &jobs,
            &body,
            &BasicProperties::new(),
            &PublishOptions::default(),
        )?;
    }
    admin.wait_for_confirms()?;

    let ch = conn.open_channel()?;
    ch.basic_qos(64, false)?;
    let consumer = ch.basic_consume(&jobs, &ConsumeOptions::default())?;
    // The handler's panic is caught by the pool; one line instead of a backtrace.
    std::panic::set_hook(Box::new(|info| eprintln!("handler panicked: {info}")));
    let retried = Arc::new(Mutex::new(HashSet::new()));
    let started = Instant::now();
    let pool = WorkerPool::start(consumer, &WorkerOptions::new(8), move |d| {
        let Some(n) = std::str::from_utf8(d.body())
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            return Outcome::Reject; // malformed: dead-letter it
        };
        if n == 777 {
            panic!("a bug in the handler"); // fails this job only (on_panic: Reject)
        }
        if n.is_multiple_of(50) && retried.lock().unwrap().insert(n) {
            return Outcome::Requeue; // a passing failure: try again
        }
        std::thread::sleep(Duration::from_micros(200)); // the work
        Outcome::Ack
    })?;
    while pool.stats().acked < u64::from(JOBS) - 2 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = pool.shutdown(Duration::from_secs(5))?;
    println!(
        "{} jobs in {:?}: {} acked, {} requeued and retried, {} rejected (dead-lettered), \
         {} panicked, {} left requeued at shutdown",
        JOBS,
        started.elapsed(),
        stats.acked,
        stats.requeued,
        stats.rejected,
        stats.panicked,
        stats.left_requeued
    );
    let dead_count = admin.queue_declare(
        &dead,
        &lepus::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
    )?;
    println!("dead-letter queue holds {}", dead_count.message_count);
    admin.queue_delete(&jobs, &QueueDeleteOptions::default())?;
    admin.queue_delete(&dead, &QueueDeleteOptions::default())?;
    conn.close()
}
