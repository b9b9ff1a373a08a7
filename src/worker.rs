//! A worker pool over a consumer: a handler on N threads, acks on success, rejects or
//! requeues on failure, a panic fails only its message, and a graceful shutdown.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::batch::Batch;
use crate::consumer::Consumer;
use crate::delivery::{Delivery, RecvError};
use crate::error::{Error, Result};
use crate::sync::{Arc, AtomicBool, AtomicU64, Ordering};

/// What the handler decided about a message (or a batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Done: acknowledge it.
    Ack,
    /// Failed, try again: put it back in the queue (`basic.reject` / `nack` with
    /// requeue). On a quorum queue, `x-delivery-limit` bounds the retries.
    Requeue,
    /// Failed for good: reject it without requeue (dropped, or dead-lettered if the
    /// queue has a dead-letter exchange).
    Reject,
}

/// Settings of a [`WorkerPool`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// Handler threads (default 4).
    pub workers: usize,
    /// The outcome of a message whose handler panicked (default [`Outcome::Reject`]:
    /// a message that panics every time must not loop; use `Requeue` to retry it).
    pub on_panic: Outcome,
    /// How often an idle worker looks at the stop flag (default 50 ms).
    pub poll: Duration,
    /// Thread name prefix (default `"lepus-worker"`).
    pub name: String,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            workers: 4,
            on_panic: Outcome::Reject,
            poll: Duration::from_millis(50),
            name: "lepus-worker".into(),
        }
    }
}

impl WorkerOptions {
    /// Defaults with `workers` threads.
    pub fn new(workers: usize) -> Self {
        WorkerOptions {
            workers: workers.max(1),
            ..Default::default()
        }
    }
    /// The outcome of a message whose handler panicked.
    pub fn on_panic(mut self, o: Outcome) -> Self {
        self.on_panic = o;
        self
    }
    /// How often an idle worker looks at the stop flag.
    pub fn poll(mut self, every: Duration) -> Self {
        self.poll = every;
        self
    }
    /// Thread name prefix.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

/// What a [`WorkerPool`] did, counted in messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Acknowledged after the handler succeeded (the ack was handed to the connection;
    /// one still unwritten when the link drops is lost with it, and the broker delivers
    /// that message again: at-least-once).
    pub acked: u64,
    /// Put back in the queue after the handler asked for it (or panicked with
    /// `on_panic: Requeue`).
    pub requeued: u64,
    /// Rejected without requeue.
    pub rejected: u64,
    /// Handlers that panicked (each also counted under its `on_panic` outcome).
    pub panicked: u64,
    /// Deliveries that could not be decoded, rejected without requeue.
    pub bad: u64,
    /// Acks, rejects or requeues that failed (the link was lost: the broker delivers
    /// those messages again).
    pub settle_failed: u64,
    /// Taken from the local queue at shutdown without running the handler, and requeued.
    pub left_requeued: u64,
    /// Workers still running their handler when the shutdown deadline passed.
    pub unfinished: u64,
    /// Deliveries of a lost link taken from the local queue after the loss: skipped
    /// without running the handler (no ack could reach the broker, which delivers them
    /// again to the recovered consumer).
    pub stale: u64,
}

#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    requeued: AtomicU64,
    rejected: AtomicU64,
    panicked: AtomicU64,
    bad: AtomicU64,
    settle_failed: AtomicU64,
    left_requeued: AtomicU64,
    stale: AtomicU64,
}

struct Shared {
    consumer: Consumer,
    stop: AtomicBool,
    counts: Counters,
    opts: WorkerOptions,
}

/// Runs a handler on several threads over one consumer.
///
/// Each worker receives a delivery, runs the handler, and settles the delivery by what
/// it returned ([`Outcome`]); a panic in the handler is caught and fails that message only
/// (outcome [`WorkerOptions::on_panic`]), the worker goes on. Deliveries are acknowledged
/// one by one (never with `multiple`, which would cover other workers' deliveries). The
/// pool lives as long as the consumer: across a lost link that recovery restores, the
/// workers go on. Deliveries of the lost link still in the local queue are skipped
/// without running the handler ([`WorkerStats::stale`]): no ack of theirs could reach
/// the broker, which delivers them again. Those in a handler at the loss are processed
/// and their settling fails ([`WorkerStats::settle_failed`]): they come again too
/// (at-least-once).
///
/// Set a prefetch ([`Channel::basic_qos`](crate::Channel::basic_qos)) of at least the
/// number of workers before consuming, or some workers idle. The consumer must
/// acknowledge manually (`no_ack: false`): starting a pool on a `no_ack` consumer is an
/// [`Error::InvalidArgument`].
///
/// [`WorkerPool::shutdown`] stops gracefully: workers take no new delivery, the consumer
/// is cancelled, handlers in flight finish within the deadline, and deliveries still in
/// the local queue go back to the broker's queue. Dropping the pool stops it the same way
/// without waiting.
///
/// ```no_run
/// use lepus::{Connection, ConsumeOptions, Outcome, WorkerOptions, WorkerPool};
/// use std::time::Duration;
///
/// let conn = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f")?;
/// let ch = conn.open_channel()?;
/// ch.basic_qos(64, false)?;
/// let consumer = ch.basic_consume("jobs", &ConsumeOptions::default())?;
/// let pool = WorkerPool::start(consumer, &WorkerOptions::new(8), |d| {
///     match std::str::from_utf8(d.body()) {
///         Ok(job) if !job.is_empty() => Outcome::Ack,
///         Ok(_) => Outcome::Requeue,
///         Err(_) => Outcome::Reject,
///     }
/// })?;
/// // ... until it is time to stop:
/// let stats = pool.shutdown(Duration::from_secs(10))?;
/// println!("{} acked, {} requeued at shutdown", stats.acked, stats.left_requeued);
/// # Ok::<(), lepus::Error>(())
/// ```
pub struct WorkerPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("consumer", &self.shared.consumer.tag())
            .field("workers", &self.threads.len())
            .field("stats", &self.stats())
            .finish()
    }
}

impl WorkerPool {
    /// Start `opts.workers` threads running `handler` on each delivery of `consumer`.
    pub fn start<F>(consumer: Consumer, opts: &WorkerOptions, handler: F) -> Result<WorkerPool>
    where
        F: Fn(&Delivery) -> Outcome + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        Self::spawn(consumer, opts, move |shared| {
            let h = handler.clone();
            move || run_single(&shared, &*h)
        })
    }

    /// Like [`WorkerPool::start`], handing the handler batches of up to `max_batch`
    /// deliveries ([`Consumer::recv_batch`]: a batch does not wait to fill up). The
    /// outcome applies to the whole batch; with one worker it is settled with one
    /// `multiple` ack or nack, with several with one ack per delivery in one write
    /// (see [`Batch`]).
    pub fn start_batch<F>(
        consumer: Consumer,
        opts: &WorkerOptions,
        max_batch: usize,
        handler: F,
    ) -> Result<WorkerPool>
    where
        F: Fn(&Batch) -> Outcome + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        let max = max_batch.max(1);
        Self::spawn(consumer, opts, move |shared| {
            let h = handler.clone();
            move || run_batch(&shared, &*h, max)
        })
    }

    fn spawn<M, W>(consumer: Consumer, opts: &WorkerOptions, make: M) -> Result<WorkerPool>
    where
        M: Fn(Arc<Shared>) -> W,
        W: FnOnce() + Send + 'static,
    {
        if consumer.is_no_ack() {
            // Its deliveries are settled on arrival: an ack would close the channel (406).
            return Err(Error::InvalidArgument(
                "a worker pool settles each delivery: its consumer needs no_ack: false".into(),
            ));
        }
        let shared = Arc::new(Shared {
            consumer,
            stop: AtomicBool::new(false),
            counts: Counters::default(),
            opts: opts.clone(),
        });
        let mut pool = WorkerPool {
            shared: shared.clone(),
            threads: Vec::with_capacity(opts.workers),
        };
        for i in 0..opts.workers.max(1) {
            let t = thread::Builder::new()
                .name(format!("{}-{i}", opts.name))
                .spawn(make(shared.clone()))
                // No error kind fits a refused thread better; the threads spawned so
                // far stop when `pool` drops.
                .map_err(|e| {
                    Error::InvalidArgument(format!("{} workers: spawning one failed: {e}", opts.workers))
                })?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    /// The consumer the workers receive from.
    pub fn consumer(&self) -> &Consumer {
        &self.shared.consumer
    }

    /// Counts so far.
    pub fn stats(&self) -> WorkerStats {
        let c = &self.shared.counts;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkerStats {
            acked: n(&c.acked),
            requeued: n(&c.requeued),
            rejected: n(&c.rejected),
            panicked: n(&c.panicked),
            bad: n(&c.bad),
            settle_failed: n(&c.settle_failed),
            left_requeued: n(&c.left_requeued),
            unfinished: 0,
            stale: n(&c.stale),
        }
    }

    /// Stop gracefully: workers take no new delivery, the consumer is cancelled (the
    /// broker sends no more), handlers in flight get until `deadline` (counted from the
    /// call, the cancel included) to finish and be settled, and what is left in the
    /// local queue is requeued. A handler still running
    /// at the deadline is counted in [`WorkerStats::unfinished`]; its thread is left to
    /// finish (and settle its delivery) on its own.
    ///
    /// Returns the final counts, or the error of the cancel (the workers are stopped and
    /// the local queue requeued all the same).
    pub fn shutdown(mut self, deadline: Duration) -> Result<WorkerStats> {
        let until = Instant::now() + deadline;
        self.shared.stop.store(true, Ordering::Release);
        // Bounded by the deadline too (at least a moment, so that the cancel is sent).
        let cancelled = self
            .shared
            .consumer
            .cancel_within(deadline.max(Duration::from_millis(100)));
        let mut unfinished = 0;
        for t in std::mem::take(&mut self.threads) {
            while !t.is_finished() && Instant::now() < until {
                thread::sleep(Duration::from_millis(2));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                unfinished += 1;
            }
        }
        requeue_local(&self.shared);
        let mut stats = self.stats();
        stats.unfinished = unfinished;
        cancelled.map(|()| stats)
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        // Not shut down: stop the workers without waiting for them; the consumer is
        // cancelled (and its queue requeued) when the last worker lets go of it.
        self.shared.stop.store(true, Ordering::Release);
    }
}

/// Requeue every delivery left in the consumer's local queue.
fn requeue_local(shared: &Shared) {
    let c = &shared.counts;
    loop {
        match shared.consumer.try_recv() {
            Ok(Some(d)) => settle(c, d.reject(true), &c.left_requeued),
            Err(RecvError::Bad(b)) => settle(c, b.reject(true), &c.left_requeued),
            Ok(None) | Err(RecvError::Failed(_)) => break,
        }
    }
}

fn settle(c: &Counters, r: Result<()>, counter: &AtomicU64) {
    match r {
        Ok(()) => {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            crate::trace::debug!("worker pool: settling a delivery failed: {e}");
            c.settle_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The handler's outcome, a panic turned into `on_panic`.
fn outcome_of(shared: &Shared, run: impl FnOnce() -> Outcome) -> Outcome {
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(o) => o,
        Err(_) => {
            shared.counts.panicked.fetch_add(1, Ordering::Relaxed);
            shared.opts.on_panic
        }
    }
}

/// What a worker does after a receive error: go on (`true`) or stop.
fn carry_on(shared: &Shared, e: RecvError) -> bool {
    match e {
        RecvError::Bad(b) => {
            let c = &shared.counts;
            settle(c, b.reject(false), &c.bad);
            true
        }
        // A lost link that recovery restores, or a broker cancel that comes back.
        RecvError::Failed(e) if !shared.consumer.has_ended() => {
            crate::trace::debug!("worker pool: {e}; waiting for the consumer to come back");
            true
        }
        RecvError::Failed(e) => {
            crate::trace::debug!("worker pool: the consumer ended: {e}");
            false
        }
    }
}

fn run_single(shared: &Shared, handler: &(dyn Fn(&Delivery) -> Outcome + Send + Sync)) {
    let c = &shared.counts;
    while !shared.stop.load(Ordering::Acquire) {
        let d = match shared.consumer.recv_timeout(shared.opts.poll) {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => match carry_on(shared, e) {
                true => continue,
                false => break,
            },
        };
        if shared.stop.load(Ordering::Acquire) {
            settle(c, d.reject(true), &c.left_requeued);
            break;
        }
        if !d.can_settle() {
            c.stale.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match outcome_of(shared, || handler(&d)) {
            Outcome::Ack => settle(c, d.ack(), &c.acked),
            Outcome::Requeue => settle(c, d.reject(true), &c.requeued),
            Outcome::Reject => settle(c, d.reject(false), &c.rejected),
        }
    }
}

fn run_batch(shared: &Shared, handler: &(dyn Fn(&Batch) -> Outcome + Send + Sync), max: usize) {
    let c = &shared.counts;
    // One worker is the only receiver: a multiple ack covers nothing of anyone else's.
    let alone = shared.opts.workers <= 1;
    while !shared.stop.load(Ordering::Acquire) {
        let b = match shared.consumer.recv_batch(max, shared.opts.poll) {
            Ok(Some(b)) => b,
            Ok(None) => continue,
            Err(e) => match carry_on(shared, e) {
                true => continue,
                false => break,
            },
        };
        let n = b.len() as u64;
        let count = |r: Result<()>, counter: &AtomicU64| match r {
            Ok(()) => {
                counter.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                crate::trace::debug!("worker pool: settling a batch failed: {e}");
                c.settle_failed.fetch_add(n, Ordering::Relaxed);
            }
        };
        if shared.stop.load(Ordering::Acquire) {
            count(b.nack_each(true), &c.left_requeued);
            break;
        }
        // A batch never spans a lost link: its first delivery tells for all.
        if b.deliveries().first().is_some_and(|d| !d.can_settle()) {
            c.stale.fetch_add(n, Ordering::Relaxed);
            continue;
        }
        match outcome_of(shared, || handler(&b)) {
            Outcome::Ack if alone => count(b.ack_all(), &c.acked),
            Outcome::Ack => count(b.ack_each(), &c.acked),
            Outcome::Requeue => count(b.nack_each(true), &c.requeued),
            Outcome::Reject => count(b.nack_each(false), &c.rejected),
        }
    }
}
