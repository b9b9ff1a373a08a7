//! A work queue: one connection shared by many threads, a channel per thread.
//! Eight producer threads publish 1,000 jobs each; four worker threads consume them with
//! a prefetch of 50 and acknowledge each job after "doing" it.
//!
//! Run: `cargo run --example work_queue` (AMQP_URL overrides the broker address).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, Connection, ConsumeOptions, Error, PublishOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};

const PRODUCERS: usize = 8;
const JOBS_EACH: usize = 1_000;
const WORKERS: usize = 4;

fn main() -> Result<(), Error> {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://127.0.0.1:5672".into());
    let conn = Connection::open(&url)?;
    let queue = format!("lepus-work-queue-{}", std::process::id());
    conn.open_channel()?
        .queue_declare(&queue, &QueueDeclareOptions::default())?;

    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (conn, queue, done) = (conn.clone(), queue.clone(), done.clone());
            thread::spawn(move || -> Result<usize, Error> {
                let ch = conn.open_channel()?;
                ch.basic_qos(50, false)?;
                let consumer = ch.basic_consume(&queue, &ConsumeOptions::default())?;
                let mut mine = 0;
                while done.load(Ordering::Acquire) < PRODUCERS * JOBS_EACH {
                    match consumer.recv_timeout(Duration::from_millis(200)) {
                        Ok(Some(job)) => {
                            mine += 1;
                            done.fetch_add(1, Ordering::AcqRel);
                            job.ack()?;
                        }
                        Ok(None) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                println!("worker {w} did {mine} jobs");
                Ok(mine)
            })
        })
        .collect();

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (conn, queue) = (conn.clone(), queue.clone());
            thread::spawn(move || -> Result<(), Error> {
                let ch = conn.open_channel()?;
                let props = BasicProperties::new().persistent();
                for j in 0..JOBS_EACH {
                    let body = format!("job {p}-{j}");
                    ch.basic_publish(
                        "",
                        &queue,
                        body.as_bytes(),
                        &props,
                        &PublishOptions::default(),
                    )?;
                }
                Ok(())
            })
        })
        .collect();

    for p in producers {
        p.join().expect("producer thread")?;
    }
    let total: usize = workers
        .into_iter()
        .map(|w| w.join().expect("worker thread"))
        .sum::<Result<usize, Error>>()?;
    println!("{total} jobs in {:?}", started.elapsed());
    conn.open_channel()?
        .queue_delete(&queue, &QueueDeleteOptions::default())?;
    conn.close()
}
