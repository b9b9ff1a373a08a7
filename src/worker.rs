//! A worker pool over a consumer: a handler on N threads, acks on success, rejects or
//! requeues on failure, a panic fails only its message, and a graceful shutdown.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::batch::{Batch, Settle};
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

/// Settings of a [`WorkerPool`] or a [`Dispatcher`](crate::Dispatcher).
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

/// What a [`WorkerPool`] or a [`Dispatcher`](crate::Dispatcher) did, counted in
/// messages.
#[derive(Debug, Clone, Default)]
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
    /// again to the recovered consumer). Never counted for a stream consumer, whose
    /// recovery resumes after them: the handler runs on them (see [`WorkerPool`]).
    pub stale: u64,
    /// Deliveries the handler settled itself (against the pool's contract): the pool's
    /// own settle was skipped, and they are not counted under `acked`, `requeued` or
    /// `rejected`.
    pub settled_by_handler: u64,
    /// The error of the consumer's cancel in [`WorkerPool::shutdown`] (the first failed
    /// cancel in [`Dispatcher::shutdown`](crate::Dispatcher::shutdown)), if it failed
    /// (the workers were stopped and the local queues requeued all the same). Always
    /// `None` from `stats()`.
    pub cancel_error: Option<Error>,
}

#[derive(Default)]
pub(crate) struct Counters {
    acked: AtomicU64,
    requeued: AtomicU64,
    rejected: AtomicU64,
    panicked: AtomicU64,
    bad: AtomicU64,
    settle_failed: AtomicU64,
    left_requeued: AtomicU64,
    stale: AtomicU64,
    settled_by_handler: AtomicU64,
}

impl Counters {
    /// The counts so far ([`WorkerStats::cancel_error`] is `None`).
    pub(crate) fn stats(&self) -> WorkerStats {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkerStats {
            acked: n(&self.acked),
            requeued: n(&self.requeued),
            rejected: n(&self.rejected),
            panicked: n(&self.panicked),
            bad: n(&self.bad),
            settle_failed: n(&self.settle_failed),
            left_requeued: n(&self.left_requeued),
            unfinished: 0,
            stale: n(&self.stale),
            settled_by_handler: n(&self.settled_by_handler),
            cancel_error: None,
        }
    }
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
/// A **stream** consumer (`x-stream-offset`) is different: its recovery resumes after
/// the last offset queued locally, so the broker does not deliver the lost link's
/// deliveries again. The pool skips none of them: the handler runs on each (every
/// offset handled once, unless the handler was running at the loss: then still once,
/// as the stream does not redeliver), and a failed ack of such a delivery is not
/// counted in `settle_failed` (on a stream an ack only returns credit).
///
/// The handler must not settle the delivery itself: the pool does, by its outcome. If
/// it does anyway, the first settle wins (a delivery is settled at most once, a later
/// settle is [`Error::AlreadySettled`] and sends nothing): the pool skips its own
/// quietly and counts the delivery in [`WorkerStats::settled_by_handler`].
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
/// let stats = pool.shutdown(Duration::from_secs(10));
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
    /// outcome applies to the whole batch; with one worker an `Ack` is one `multiple`
    /// ack when that covers only the batch (see [`Batch::ack_all`]), otherwise (and for
    /// requeues and rejects) one frame per delivery in one write. Undecodable
    /// deliveries are rejected without requeue before the handler runs and counted in
    /// [`WorkerStats::bad`]; the handler never gets a batch without a delivery.
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

    /// Counts so far ([`WorkerStats::cancel_error`] is `None`).
    pub fn stats(&self) -> WorkerStats {
        self.shared.counts.stats()
    }

    /// Stop gracefully: workers take no new delivery, the consumer is cancelled (the
    /// broker sends no more), handlers in flight get until `deadline` (counted from the
    /// call, the cancel included) to finish and be settled, and what is left in the
    /// local queue is requeued. A handler still running
    /// at the deadline is counted in [`WorkerStats::unfinished`]; its thread is left to
    /// finish (and settle its delivery) on its own.
    ///
    /// Returns the final counts, with the error of the cancel in
    /// [`WorkerStats::cancel_error`] if it failed (the workers are stopped and the local
    /// queue requeued all the same).
    pub fn shutdown(mut self, deadline: Duration) -> WorkerStats {
        let until = Instant::now() + deadline;
        self.shared.stop.store(true, Ordering::Release);
        // Bounded by the deadline too (at least a moment, so that the cancel is sent).
        let cancelled = self
            .shared
            .consumer
            .cancel_within(deadline.max(Duration::from_millis(100)));
        let unfinished = join_until(std::mem::take(&mut self.threads), until);
        requeue_local(&self.shared);
        let mut stats = self.stats();
        stats.unfinished = unfinished;
        stats.cancel_error = cancelled.err();
        stats
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        // Not shut down: stop the workers without waiting for them; the consumer is
        // cancelled (and its queue requeued) when the last worker lets go of it.
        self.shared.stop.store(true, Ordering::Release);
    }
}

/// Join `threads` until `until`: how many were still running then (left to finish on
/// their own).
pub(crate) fn join_until(threads: Vec<JoinHandle<()>>, until: Instant) -> u64 {
    let mut unfinished = 0;
    for t in threads {
        while !t.is_finished() && Instant::now() < until {
            thread::sleep(Duration::from_millis(2));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            unfinished += 1;
        }
    }
    unfinished
}

/// Requeue every delivery left in the consumer's local queue.
fn requeue_local(shared: &Shared) {
    shared.serve().requeue_local();
}

/// What serving one consumer takes: its counters and what a panic means. Shared by the
/// [`WorkerPool`] (one consumer, several threads) and the
/// [`Dispatcher`](crate::Dispatcher) (many consumers, a few threads).
pub(crate) struct Serve<'a> {
    pub(crate) counts: &'a Counters,
    pub(crate) consumer: &'a Consumer,
    pub(crate) on_panic: Outcome,
}

impl Shared {
    fn serve(&self) -> Serve<'_> {
        Serve {
            counts: &self.counts,
            consumer: &self.consumer,
            on_panic: self.opts.on_panic,
        }
    }
}

fn settle(c: &Counters, r: Result<()>, counter: &AtomicU64) {
    match r {
        Ok(()) => {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Err(Error::AlreadySettled { .. }) => {
            c.settled_by_handler.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            crate::trace::debug!("worker pool: settling a delivery failed: {e}");
            c.settle_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Serve<'_> {
    /// Requeue every delivery left in the consumer's local queue.
    pub(crate) fn requeue_local(&self) {
        let c = self.counts;
        loop {
            match self.consumer.try_recv() {
                Ok(Some(d)) => settle(c, d.reject(true), &c.left_requeued),
                Err(RecvError::Bad(b)) => settle(c, b.reject(true), &c.left_requeued),
                Ok(None) | Err(RecvError::Failed(_)) => break,
            }
        }
    }

    /// Requeue a delivery taken while stopping.
    pub(crate) fn requeue_one(&self, d: Delivery) {
        let c = self.counts;
        settle(c, d.reject(true), &c.left_requeued);
    }

    /// The handler's outcome, a panic turned into `on_panic`.
    fn outcome_of(&self, run: impl FnOnce() -> Outcome) -> Outcome {
        match catch_unwind(AssertUnwindSafe(run)) {
            Ok(o) => o,
            Err(_) => {
                self.counts.panicked.fetch_add(1, Ordering::Relaxed);
                self.on_panic
            }
        }
    }

    /// What a worker does after a receive error: go on (`true`) or stop.
    pub(crate) fn carry_on(&self, e: RecvError) -> bool {
        match e {
            RecvError::Bad(b) => {
                let c = self.counts;
                settle(c, b.reject(false), &c.bad);
                true
            }
            // A lost link that recovery restores, or a broker cancel that comes back.
            RecvError::Failed(e) if !self.consumer.has_ended() => {
                crate::trace::debug!("worker pool: {e}; waiting for the consumer to come back");
                true
            }
            RecvError::Failed(e) => {
                crate::trace::debug!("worker pool: the consumer ended: {e}");
                false
            }
        }
    }

    /// What to do with a delivery of a lost link taken from the local queue: skip it
    /// (`true`, counted stale) on a queue that delivers it again; on a stream, whose
    /// recovery resumes after it, it must be handled.
    fn skip_stale(&self, d: &Delivery) -> bool {
        !d.can_settle() && !self.consumer.is_stream()
    }

    /// Count a settle of `n` deliveries (`Ok` says how many it settled; the others the
    /// handler had settled itself).
    fn count_settle(&self, r: Result<u64>, n: u64, counter: &AtomicU64) {
        let c = self.counts;
        match r {
            Ok(done) => {
                counter.fetch_add(done, Ordering::Relaxed);
                c.settled_by_handler
                    .fetch_add(n.saturating_sub(done), Ordering::Relaxed);
            }
            Err(Error::AlreadySettled { .. }) => {
                c.settled_by_handler.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                crate::trace::debug!("worker pool: settling failed: {e}");
                c.settle_failed.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// A failed settle of a stream delivery whose link was lost: the broker does not need
    /// it (an ack on a stream only returns credit) nor delivers the message again, so it is
    /// no `settle_failed`.
    fn lost_stream_ack(&self, d: &Delivery, r: std::result::Result<(), &Error>) -> bool {
        self.consumer.is_stream()
            && !d.can_settle()
            && r.is_err_and(|e| !matches!(e, Error::AlreadySettled { .. }))
    }

    /// Run the handler on `d` (unless it is a lost link's stale delivery) and settle it
    /// by the outcome.
    pub(crate) fn handle(&self, d: Delivery, handler: impl FnOnce(&Delivery) -> Outcome) {
        let c = self.counts;
        if self.skip_stale(&d) {
            c.stale.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (r, counter) = match self.outcome_of(|| handler(&d)) {
            Outcome::Ack => (d.ack(), &c.acked),
            Outcome::Requeue => (d.reject(true), &c.requeued),
            Outcome::Reject => (d.reject(false), &c.rejected),
        };
        // A stream delivery of a lost link: its ack cannot reach the broker, which
        // does not need it (an ack on a stream is credit only).
        if self.lost_stream_ack(&d, r.as_ref().map(drop)) {
            return;
        }
        self.count_settle(r.map(|()| 1), 1, counter);
    }
}

fn run_single(shared: &Shared, handler: &(dyn Fn(&Delivery) -> Outcome + Send + Sync)) {
    let s = shared.serve();
    while !shared.stop.load(Ordering::Acquire) {
        let d = match shared.consumer.recv_timeout(shared.opts.poll) {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => match s.carry_on(e) {
                true => continue,
                false => break,
            },
        };
        if shared.stop.load(Ordering::Acquire) {
            s.requeue_one(d);
            break;
        }
        s.handle(d, |d| handler(d));
    }
}

fn run_batch(shared: &Shared, handler: &(dyn Fn(&Batch) -> Outcome + Send + Sync), max: usize) {
    let c = &shared.counts;
    let s = shared.serve();
    // One worker is the only receiver of the consumer; the batch itself checks that no
    // other consumer acknowledges on the channel before it uses a multiple ack.
    let alone = shared.opts.workers <= 1;
    while !shared.stop.load(Ordering::Acquire) {
        let b = match shared.consumer.recv_batch(max, shared.opts.poll) {
            Ok(Some(b)) => b,
            Ok(None) => continue,
            Err(e) => match s.carry_on(e) {
                true => continue,
                false => break,
            },
        };
        if shared.stop.load(Ordering::Acquire) {
            let n = b.len() as u64;
            s.count_settle(b.settle(Settle::Nack(true), false), n, &c.left_requeued);
            break;
        }
        // Undecodable ones never reach the handler: rejected without requeue.
        let (bad, bad_failed) = b.reject_bad();
        c.bad.fetch_add(bad, Ordering::Relaxed);
        c.settle_failed.fetch_add(bad_failed, Ordering::Relaxed);
        let n = b.deliveries().len() as u64;
        let Some(first) = b.deliveries().first() else {
            continue;
        };
        // A batch never spans a lost link: its first delivery tells for all.
        if s.skip_stale(first) {
            c.stale.fetch_add(n, Ordering::Relaxed);
            continue;
        }
        let r = match s.outcome_of(|| handler(&b)) {
            Outcome::Ack => (b.settle(Settle::Ack, alone), &c.acked),
            Outcome::Requeue => (b.settle(Settle::Nack(true), false), &c.requeued),
            Outcome::Reject => (b.settle(Settle::Nack(false), false), &c.rejected),
        };
        if s.lost_stream_ack(first, r.0.as_ref().map(drop)) {
            continue;
        }
        s.count_settle(r.0, n, r.1);
    }
}
