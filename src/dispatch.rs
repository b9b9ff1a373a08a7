//! Many consumers served by a few threads: a handler per consumer, each consumer's
//! deliveries handled in order, one at a time, by whichever thread is free.

use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::channel::Channel;
use crate::consumer::Consumer;
use crate::delivery::Delivery;
use crate::sync::ready_list::{ReadyList, Ticket};
use crate::error::{Error, Result};
use crate::sync::{Arc, AtomicBool, Mutex, Ordering};
use crate::worker::{Counters, Outcome, Serve, WorkerOptions, WorkerStats, join_until};

/// Deliveries a thread handles from one consumer before it goes to the next consumer
/// with work (the one it leaves goes to the back of the line): a busy consumer does not
/// starve the others.
const TURN: usize = 32;

type Handler = Box<dyn FnMut(&Delivery) -> Outcome + Send>;

struct Entry {
    consumer: Consumer,
    /// Taken by the one thread that serves the consumer (its ticket says which): never
    /// contended.
    handler: Mutex<Handler>,
}

#[derive(Default)]
struct Entries {
    slots: Vec<Option<Arc<Entry>>>,
    free: Vec<usize>,
}

struct Shared {
    list: Arc<ReadyList>,
    entries: Mutex<Entries>,
    stop: AtomicBool,
    counts: Counters,
    opts: WorkerOptions,
}

impl Shared {
    fn entry(&self, id: usize) -> Option<Arc<Entry>> {
        self.entries.lock().slots.get(id).cloned().flatten()
    }

    /// Forget the consumer `id` (it ended): its handle goes when the thread that holds
    /// it lets go.
    fn remove(&self, id: usize) {
        let mut e = self.entries.lock();
        let gone = e.slots.get_mut(id).and_then(Option::take);
        if gone.is_some() {
            e.free.push(id);
        }
        drop(e);
        if let Some(g) = gone {
            g.consumer.watch(None);
        }
    }

    fn all(&self) -> Vec<Arc<Entry>> {
        self.entries.lock().slots.iter().flatten().cloned().collect()
    }

    fn serve<'a>(&'a self, e: &'a Entry) -> Serve<'a> {
        Serve {
            counts: &self.counts,
            consumer: &e.consumer,
            on_panic: self.opts.on_panic,
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The queues' tickets hold the list: let go of them with the consumers.
        for e in self.entries.get_mut().slots.iter().flatten() {
            e.consumer.watch(None);
        }
    }
}

/// Serves many consumers on a few threads, as a thread per consumer would but without
/// a thread per consumer: a handler per consumer, run on whichever of the dispatcher's
/// threads is free when a delivery comes.
///
/// Each consumer's deliveries are handled **in order, one at a time** (never two of
/// the same consumer at once), and settled by the handler's [`Outcome`] as a
/// [`WorkerPool`](crate::WorkerPool) settles them: acked, requeued or rejected one by
/// one; a panic fails that message only ([`WorkerOptions::on_panic`]); a delivery that
/// cannot be decoded is rejected without requeue ([`WorkerStats::bad`]). A thread
/// handles up to 32 deliveries of one consumer, then moves on to the next consumer with
/// work: a busy consumer does not starve the others. Different consumers' deliveries
/// run in parallel, as many at once as there are threads.
///
/// The threads sleep only when no consumer has work, where a thread blocked on each of
/// hundreds of consumers' [`Consumer::recv`] is woken for nearly every delivery: less
/// CPU per message, and a few threads instead of hundreds (measured in
/// `benches/results/dispatcher.md`; a delivery still crosses from the I/O thread to a
/// dispatcher thread, which sleeps when messages trickle in slower than it handles them).
///
/// A handler that blocks holds its thread: give the dispatcher as many threads as
/// handlers may block at once. In particular, handlers that wait on the **same
/// connection** (a publish with confirms, an RPC) while every thread is taken can wait
/// until their deadline: the consumers' local queues are bounded, and when one is full
/// the I/O thread stops reading the socket, so the reply they wait for is not read
/// until a thread is free to empty that queue. Publish from handlers on another
/// connection, or without waiting, or give the dispatcher more threads than handlers
/// that wait.
///
/// A handler that panicked is called again for the consumer's next delivery, with
/// whatever state the panic left in it.
///
/// Recovery, streams and broker cancels are handled as the worker pool handles them
/// (see [`WorkerPool`](crate::WorkerPool)): a lost link that recovery restores passes
/// by (its deliveries still queued locally are skipped, [`WorkerStats::stale`], and
/// delivered again by the broker), a consumer that ends for good (cancelled, its
/// channel or connection closed) leaves the dispatcher, the others go on.
///
/// [`Dispatcher::shutdown`] stops gracefully: no new delivery is handled, every
/// consumer is cancelled (all cancels in one round trip), handlers in flight get until
/// the deadline, deliveries left in the local queues go back to the broker. Dropping the dispatcher stops it the same
/// way without waiting.
///
/// ```no_run
/// use lepus::{Connection, ConsumeOptions, Dispatcher, Outcome, WorkerOptions};
/// use std::time::Duration;
///
/// let conn = Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f")?;
/// let dispatcher = Dispatcher::new(&WorkerOptions::new(2))?;
/// for i in 0..500 {
///     let consumer = conn.open_consumer(&format!("jobs-{i}"), 50, &ConsumeOptions::default())?;
///     dispatcher.add(consumer, move |d| {
///         println!("queue {i}: {} bytes", d.body().len());
///         Outcome::Ack
///     })?;
/// }
/// // ... until it is time to stop:
/// let stats = dispatcher.shutdown(Duration::from_secs(10));
/// println!("{} acked, {} requeued at shutdown", stats.acked, stats.left_requeued);
/// # Ok::<(), lepus::Error>(())
/// ```
pub struct Dispatcher {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("consumers", &self.len())
            .field("threads", &self.threads.len())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Dispatcher {
    /// Start `opts.workers` threads (named `opts.name`-N) serving no consumer yet.
    /// `opts.poll` is how often an idle thread looks at the stop flag.
    pub fn new(opts: &WorkerOptions) -> Result<Dispatcher> {
        let shared = Arc::new(Shared {
            list: Arc::new(ReadyList::new()),
            entries: Mutex::new(Entries::default()),
            stop: AtomicBool::new(false),
            counts: Counters::default(),
            opts: opts.clone(),
        });
        let mut d = Dispatcher {
            shared: shared.clone(),
            threads: Vec::with_capacity(opts.workers),
        };
        for i in 0..opts.workers.max(1) {
            let s = shared.clone();
            let t = thread::Builder::new()
                .name(format!("{}-{i}", opts.name))
                .spawn(move || run(&s))
                // The threads spawned so far stop when `d` drops.
                .map_err(|e| {
                    Error::InvalidArgument(format!(
                        "{} dispatcher threads: spawning one failed: {e}",
                        opts.workers
                    ))
                })?;
            d.threads.push(t);
        }
        Ok(d)
    }

    /// Serve `consumer` with `handler` from now on (deliveries already queued locally
    /// included). The handler may keep state of its own (`FnMut`): it runs on one
    /// thread at a time. The consumer must acknowledge manually (`no_ack: false`): a
    /// `no_ack` consumer is an [`Error::InvalidArgument`] (and is dropped, which cancels
    /// it).
    pub fn add<F>(&self, consumer: Consumer, handler: F) -> Result<()>
    where
        F: FnMut(&Delivery) -> Outcome + Send + 'static,
    {
        if consumer.is_no_ack() {
            // Its deliveries are settled on arrival: an ack would close the channel (406).
            return Err(Error::InvalidArgument(
                "a dispatcher settles each delivery: its consumer needs no_ack: false".into(),
            ));
        }
        let entry = Arc::new(Entry {
            consumer,
            handler: Mutex::new(Box::new(handler)),
        });
        let mut e = self.shared.entries.lock();
        let id = match e.free.pop() {
            Some(id) => id,
            None => {
                e.slots.push(None);
                e.slots.len() - 1
            }
        };
        e.slots[id] = Some(entry.clone());
        drop(e);
        // From here every message queued for it schedules its ticket (at once if some
        // are queued already).
        entry.consumer.watch(Some(ReadyList::ticket(&self.shared.list, id)));
        Ok(())
    }

    /// Consumers served now (those that ended have left).
    pub fn len(&self) -> usize {
        let e = self.shared.entries.lock();
        e.slots.len() - e.free.len()
    }

    /// True when no consumer is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts so far, over every consumer served ([`WorkerStats::cancel_error`] is
    /// `None`).
    pub fn stats(&self) -> WorkerStats {
        self.shared.counts.stats()
    }

    /// Stop gracefully: no new delivery is handled, every consumer is cancelled (the
    /// broker sends no more), handlers in flight get until `deadline` (counted from the
    /// call, the cancels included) to finish and be settled, and what is left in the
    /// local queues is requeued. A thread still in a handler at the deadline is counted
    /// in [`WorkerStats::unfinished`] and left to finish on its own.
    ///
    /// Returns the final counts, with the first cancel's error in
    /// [`WorkerStats::cancel_error`] if one failed (the threads are stopped and the
    /// local queues requeued all the same).
    pub fn shutdown(mut self, deadline: Duration) -> WorkerStats {
        let until = Instant::now() + deadline;
        self.shared.stop.store(true, Ordering::Release);
        self.shared.list.stop();
        let entries = self.shared.all();
        let mut cancel_error = None;
        // Every cancel is sent first, then the cancel-oks are awaited together: one round
        // trip for all, however many consumers. Bounded by the deadline (at least a
        // moment, so that the cancels are sent).
        let cancel_by = until.max(Instant::now() + Duration::from_millis(100));
        let mut pending = Vec::with_capacity(entries.len());
        for e in &entries {
            match e.consumer.cancel_start(cancel_by) {
                Ok(Some(p)) => pending.push(p),
                Ok(None) => {}
                Err(err) => {
                    cancel_error.get_or_insert(err);
                }
            }
        }
        for (shared, rx) in &pending {
            if let Err(err) = Channel::cancel_finish(shared, rx, cancel_by) {
                cancel_error.get_or_insert(err);
            }
        }
        let unfinished = join_until(std::mem::take(&mut self.threads), until);
        for e in &entries {
            self.shared.serve(e).requeue_local();
        }
        let mut stats = self.stats();
        stats.unfinished = unfinished;
        stats.cancel_error = cancel_error;
        stats
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        // Not shut down: stop the threads without waiting; the consumers are cancelled
        // (and their queues requeued) when the last thread lets go of them.
        self.shared.stop.store(true, Ordering::Release);
        self.shared.list.stop();
    }
}

/// A dispatcher thread: take a consumer with work, handle up to a turn of its
/// deliveries, give it back.
fn run(shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        let Some(ticket) = shared.list.take(Some(Instant::now() + shared.opts.poll)) else {
            continue;
        };
        let Some(entry) = shared.entry(ticket.id()) else {
            continue;
        };
        if serve_turn(shared, &entry) {
            shared.remove(ticket.id());
        } else {
            release(&ticket, &entry);
        }
    }
}

/// Give the consumer back: listed again if anything came meanwhile.
fn release(ticket: &Arc<Ticket>, entry: &Entry) {
    Ticket::release(ticket, || entry.consumer.has_news());
}

/// Handle up to a turn of `entry`'s deliveries; true once the consumer ended for good.
fn serve_turn(shared: &Shared, entry: &Entry) -> bool {
    let s = shared.serve(entry);
    // One thread serves a consumer at a time (its ticket is listed once: the loom model
    // checks it), so the handler's lock is free; debug builds (the tests) check that too.
    let mut handler = match entry.handler.try_lock() {
        Some(h) => h,
        None => {
            debug_assert!(false, "two dispatcher threads serve one consumer");
            entry.handler.lock()
        }
    };
    let mut handled = 0;
    while handled < TURN {
        let d = match entry.consumer.try_recv() {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) => match s.carry_on(e) {
                true => continue,
                false => return true,
            },
        };
        if shared.stop.load(Ordering::Acquire) {
            s.requeue_one(d);
            break;
        }
        s.handle(d, |d| handler(d));
        handled += 1;
    }
    false
}
