//! Scenario 11: the worker pool's consume rate at 100/500/900 handlers next to the plain
//! consumers' (scenario 3's measurement: N consumers, a channel and a thread each), as a
//! ratio within one run.
//!
//! Both sides get the same work: one producer publishes `N × 20` (quick: `N × 4`) stamped
//! 64-byte messages to a fresh queue, and the rate is unique messages received over the
//! time from the first publish to the last delivery. The pool side is one consumer on one
//! channel (prefetch `N × 50`, the plain side's total) with `lepus::WorkerPool` running N
//! handler threads that record the id and return `Outcome::Ack`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lepus::{BasicProperties, ConsumeOptions, Outcome, PublishOptions, WorkerOptions, WorkerPool};

use crate::common::{
    self, Settings, connect, declare, delete, done, section, settle, step, thousands,
};
use crate::stats::{read_stamp, stamp_body};
use crate::throughput::{self, PREFETCH, now_ns};

/// One handler count: the plain consumers' and the pool's consume rates.
#[derive(Debug, Clone)]
pub struct WorkerPoolRun {
    pub handlers: usize,
    pub messages: usize,
    pub plain_rate: f64,
    pub plain_lost: usize,
    pub pool_rate: f64,
    pub pool_lost: usize,
    pub pool_duplicates: usize,
    pub pool_errors: usize,
}

pub fn scenario(s: &Settings, total: u32, runs: &mut Vec<WorkerPoolRun>) {
    if !s.wants(11) {
        return;
    }
    section(
        11,
        total,
        "worker pool against plain consumers (consume rate)",
    );
    let counts = [100, 500, 900];
    for (i, &n) in counts.iter().enumerate() {
        let msgs = s.size(n * 20, n * 4);
        step(
            i + 1,
            counts.len(),
            &format!("{n} handlers, {msgs} messages"),
        );
        settle();
        let plain = throughput::consumers(&s.url, n, msgs, false);
        settle();
        let pool = pool_run(&s.url, n, msgs);
        let run = WorkerPoolRun {
            handlers: n,
            messages: msgs,
            plain_rate: plain.consume_rate(),
            plain_lost: plain.lost,
            ..pool
        };
        done(&format!(
            "plain {} msg/s, pool {} msg/s (ratio {:.2})",
            thousands(run.plain_rate),
            thousands(run.pool_rate),
            run.pool_rate / run.plain_rate
        ));
        runs.push(run);
    }
}

fn pool_run(url: &str, n: usize, messages: usize) -> WorkerPoolRun {
    let conn = connect(url);
    let admin = conn.open_channel().expect("admin channel");
    let queue = common::unique("worker-pool");
    declare(&admin, &queue);
    let ch = conn.open_channel().expect("consumer channel");
    let prefetch = (n * usize::from(PREFETCH)).min(usize::from(u16::MAX)) as u16;
    ch.basic_qos(prefetch, false).expect("qos");
    let consumer = ch
        .basic_consume(&queue, &ConsumeOptions::default())
        .expect("consume");
    let seen: Arc<Vec<AtomicU32>> = Arc::new((0..messages).map(|_| AtomicU32::new(0)).collect());
    let last_recv = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let (sn, lr, rc) = (seen.clone(), last_recv.clone(), received.clone());
    let opts = WorkerOptions::new(n).poll(Duration::from_millis(20));
    let pool = WorkerPool::start(consumer, &opts, move |d| {
        if let Some((id, _)) = read_stamp(d.body())
            && let Some(c) = sn.get(id as usize)
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        lr.fetch_max(now_ns(), Ordering::AcqRel);
        rc.fetch_add(1, Ordering::AcqRel);
        Outcome::Ack
    })
    .expect("start the pool");

    let producer = conn.open_channel().expect("producer channel");
    let props = BasicProperties::new();
    let first_ns = now_ns();
    let mut errors = 0;
    for id in 0..messages {
        let body = stamp_body(id as u64, now_ns(), 64);
        if producer
            .basic_publish("", &queue, &body, &props, &PublishOptions::default())
            .is_err()
        {
            errors += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30 + messages as u64 / 500);
    while received.load(Ordering::Acquire) < messages && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
    }
    std::thread::sleep(Duration::from_millis(50));
    let stats = pool.shutdown(Duration::from_secs(10));
    if let Some(e) = &stats.cancel_error {
        errors += 1;
        common::note(&format!("pool shutdown: {e}"));
    }
    let consume = (last_recv.load(Ordering::Acquire).saturating_sub(first_ns)) as f64 / 1e9;
    let counts: Vec<u32> = seen.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let unique = counts.iter().filter(|&&c| c > 0).count();
    delete(&admin, &queue);
    let _ = conn.close();
    WorkerPoolRun {
        handlers: n,
        messages,
        plain_rate: f64::NAN,
        plain_lost: 0,
        pool_rate: unique as f64 / consume,
        pool_lost: messages - unique,
        pool_duplicates: counts.iter().map(|&c| c.saturating_sub(1) as usize).sum(),
        pool_errors: errors + stats.settle_failed as usize,
    }
}

/// The report's section (nothing when the scenario did not run).
pub fn section_md(w: &mut String, runs: &[WorkerPoolRun]) {
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(w, "## Worker pool against plain consumers\n");
    let _ = writeln!(
        w,
        "Consume rate (unique messages from the first publish to the last delivery) of N plain consumers (a channel and a thread each, prefetch {PREFETCH}: scenario 3's measurement) and of one consumer with a `WorkerPool` of N handler threads (prefetch N × {PREFETCH}), same messages, one after the other in this run.\n"
    );
    let _ = writeln!(
        w,
        "| handlers | messages | plain msg/s | pool msg/s | pool / plain | pool lost | pool duplicates | pool errors |"
    );
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {:.2} | {} | {} | {} |",
            r.handlers,
            r.messages,
            thousands(r.plain_rate),
            thousands(r.pool_rate),
            r.pool_rate / r.plain_rate,
            r.pool_lost,
            r.pool_duplicates,
            r.pool_errors
        );
    }
    let _ = writeln!(w);
}
