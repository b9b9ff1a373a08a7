//! loom models of lepus's own synchronisation code (built with `--cfg lepus_loom`, where
//! lepus's `sync` module maps every primitive and queue to loom's).
//!
//! Each model counts the interleavings it explored, prints the count and asserts there
//! was more than one. Deliberately broken variants of lepus's code, switched on with
//! `LEPUS_LOOM_BROKEN=<name>` (`pool`: a release without its once-guard; `oneshot`: a
//! reply sender whose drop forgets the wake-up; `queue-store`: the consumer queue's
//! waiting flag written with a plain store, the lost wake-up this suite found;
//! `send-fence`: a queued command without the fence that pairs with a link failure's;
//! `gate-carry`: a caller's direct write that ignores another's unfinished frame;
//! `gate-rest`: the I/O thread letting callers write while its own output waits;
//! `gate-queue`: a caller writing past frames still queued;
//! `quiet-wake-one`: a quiet batch's payment waking one receiver of a queue however many
//! wake-ups it owes; `dispatch-claim`: a dispatcher's ticket scheduled by a read and a
//! write instead of a swap; `dispatch-recheck`: a dispatcher thread giving a queue back
//! without a second look at it; `dispatch-unwatch`: a consumer queue that stops being
//! watched without paying the wake-up its list is owed),
//! must make the model that covers them fail: `run.sh` runs each model again with its
//! variable set and expects the failure. `mutants.sh` plants more slips (see `mutants/`).
#![cfg(lepus_loom)]

use std::collections::VecDeque;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use lepus::internal::model::{
    ConfirmTracker, Direct, EndRelay, Ended, FailFlag, LinkCell, LinkGen, LinkState, PoolCore,
    Poolable, QueueShared, ReadyList, Ticket, WakeFlag, WriteGate, oneshot, outcome, queue,
};
use lepus::{Confirm, Error};
use loom::sync::atomic::{AtomicBool, AtomicUsize};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

/// Runs `f` under loom with the preemption bound from LOOM_MAX_PREEMPTIONS (default 2),
/// and reports how many interleavings were explored.
fn explore(name: &str, f: impl Fn() + Sync + Send + 'static) -> usize {
    static RUNS: StdAtomicUsize = StdAtomicUsize::new(0);
    let start = Instant::now();
    let before = RUNS.load(SeqCst);
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    let bound = b.preemption_bound;
    b.check(move || {
        RUNS.fetch_add(1, SeqCst);
        f();
    });
    let n = RUNS.load(SeqCst) - before;
    eprintln!(
        "model {name}: {n} interleavings explored (preemption bound {bound:?}) in {:?}",
        start.elapsed()
    );
    n
}

fn far() -> Instant {
    // loom's timed waits never time out; deadlines only need to be in the future.
    Instant::now() + Duration::from_secs(3600)
}

/// The I/O thread's wake-up as mio's `Waker` and `Poll` behave: sticky (a wake before
/// the wait is kept until the next wait takes it) and the only way a sleeping I/O thread
/// learns it has work. No re-poll: a lost wake-up leaves the I/O thread asleep for good,
/// which loom reports.
#[derive(Default)]
struct Waker {
    woken: Mutex<bool>,
    cv: Condvar,
}

impl Waker {
    fn wake(&self) {
        *self.woken.lock().unwrap() = true;
        self.cv.notify_one();
    }
    fn wait(&self) {
        let mut w = self.woken.lock().unwrap();
        while !*w {
            w = self.cv.wait(w).unwrap();
        }
        *w = false;
    }
}

// ---------------------------------------------------------------- 1. pool

#[derive(Clone)]
struct Res {
    alive: Arc<AtomicBool>,
    holders: Arc<AtomicUsize>,
}

impl Poolable for Res {
    fn usable(&self) -> bool {
        self.alive.load(SeqCst)
    }
}

impl Res {
    fn new(alive: &Arc<AtomicBool>) -> Res {
        Res {
            alive: alive.clone(),
            holders: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// Items with an alive flag each: the `k`-th item opened gets flag `k`, so a model can
/// kill one item (a channel the broker closed) and leave the others working.
#[derive(Clone)]
struct Opener {
    alive: Arc<Vec<Arc<AtomicBool>>>,
    opened: Arc<AtomicUsize>,
}

impl Opener {
    fn new(n: usize) -> Opener {
        Opener {
            alive: Arc::new((0..n).map(|_| Arc::new(AtomicBool::new(true))).collect()),
            opened: Arc::new(AtomicUsize::new(0)),
        }
    }
    fn open(&self) -> Result<Res, Error> {
        let k = self.opened.fetch_add(1, SeqCst);
        Ok(Res::new(
            self.alive
                .get(k)
                .expect("more items opened than the model allows"),
        ))
    }
    fn kill(&self, k: usize) {
        self.alive[k].store(false, SeqCst);
    }
}

/// The bound, read under the pool's lock (lepus also checks it with a debug assertion
/// inside `PoolCore` at every change, which the model builds keep on).
fn assert_bound<R: Poolable>(core: &PoolCore<R>) {
    let n = core.occupied();
    assert!(n <= core.max(), "pool over its bound: {n} > {}", core.max());
}

/// Two threads acquire and release one pooled item (max 1) — one releases explicitly
/// and then drops its guard, a second release that must not end the other's later lease
/// of the same slot; the other releases as `PooledChannel`'s drop does (`release_as`),
/// discarding an item the borrower changed —
/// while a third closes the first item opened and reclaims dead leases. The bound holds
/// after every step.
fn pool_model() {
    let core = Arc::new(PoolCore::new(1));
    let opener = Opener::new(3);
    let user = |explicit: bool| {
        let (core, opener) = (core.clone(), opener.clone());
        thread::spawn(move || {
            let mut lease = PoolCore::acquire(&core, far(), || opener.open()).expect("acquire");
            assert_bound(&core);
            // Never handed to two holders at once.
            assert_eq!(
                lease.item().holders.fetch_add(1, SeqCst),
                0,
                "item handed out twice"
            );
            lease.item().holders.fetch_sub(1, SeqCst);
            // Counted in use while held, unless the item died and was reclaimed (read
            // in this order: a dead item never comes back): no other lease's release
            // ends this one.
            let in_use = core.stats().in_use;
            assert!(
                in_use >= 1 || !lease.item().usable(),
                "a held lease was released by another"
            );
            if explicit {
                lease.release();
                assert_bound(&core);
            } else {
                // `PooledChannel`'s drop when the borrower changed the channel: the guard
                // tells the pool to discard it, though it still works.
                lease.release_as(false);
                assert_bound(&core);
            }
            drop(lease);
            assert_bound(&core);
        })
    };
    let a = user(true);
    let b = user(false);
    let killer = {
        let (core, opener) = (core.clone(), opener.clone());
        thread::spawn(move || {
            opener.kill(0);
            core.reclaim_dead();
            assert_bound(&core);
        })
    };
    a.join().unwrap();
    b.join().unwrap();
    killer.join().unwrap();
    let s = core.stats();
    assert_eq!(s.acquired, 2);
    assert_eq!(s.in_use, 0, "{s:?}");
    assert_eq!(
        s.acquired,
        s.released + s.in_use as u64,
        "every acquisition released exactly once: {s:?}"
    );
    assert!(s.opened >= 1 && s.opened <= 2, "{s:?}");
    assert!(
        s.discarded >= 1,
        "the item the guard discarded went back idle: {s:?}"
    );
    assert_eq!(s.waiters, 0);
    assert_bound(&core);
}

#[test]
fn pool_acquire_release_drop_and_link_failure() {
    assert!(explore("pool", pool_model) > 1);
}

/// A full pool (max 2) whose two leased items both die: two waiters block in `acquire`
/// while the owner of the dead leases reclaims them, which must wake both (each opens
/// a fresh item). The waiters keep their leases until the end, so only the reclaim can
/// wake them.
fn pool_reclaim_model() {
    let core = Arc::new(PoolCore::new(2));
    let opener = Opener::new(4);
    let first = PoolCore::acquire(&core, far(), || opener.open()).unwrap();
    let second = PoolCore::acquire(&core, far(), || opener.open()).unwrap();
    let waiter = || {
        let (core, opener) = (core.clone(), opener.clone());
        thread::spawn(move || {
            let lease = PoolCore::acquire(&core, far(), || opener.open()).expect("acquire");
            assert_bound(&core);
            assert!(lease.item().usable(), "a dead item handed out");
            lease
        })
    };
    let w1 = waiter();
    let w2 = waiter();
    opener.kill(0);
    assert_bound(&core);
    opener.kill(1);
    assert_bound(&core);
    core.reclaim_dead();
    assert_bound(&core);
    let (l1, l2) = (w1.join().unwrap(), w2.join().unwrap());
    assert!(
        !Arc::ptr_eq(&l1.item().alive, &l2.item().alive),
        "one item leased twice"
    );
    drop((first, second)); // already released by the reclaim: nothing happens
    assert_bound(&core);
    drop((l1, l2));
    let s = core.stats();
    assert_eq!((s.acquired, s.released, s.in_use), (4, 4, 0), "{s:?}");
    assert_eq!((s.opened, s.discarded, s.idle), (4, 2, 2), "{s:?}");
    assert_eq!(s.waiters, 0);
    assert_bound(&core);
}

#[test]
fn pool_reclaim_wakes_two_waiters() {
    assert!(explore("pool reclaim, two waiters", pool_reclaim_model) > 1);
}

/// A pool of one: the first open fails (the broker refused the channel) while a second
/// thread waits for the place that open reserved; the failure must hand the place on
/// (the waiter then opens its own).
fn pool_failed_open_model() {
    let core = Arc::new(PoolCore::new(1));
    let opener = Opener::new(2);
    let failing = {
        let core = core.clone();
        thread::spawn(move || {
            // Every open of this thread fails; it may still get the other's item back.
            let r = PoolCore::<Res>::acquire(&core, far(), || {
                Err(Error::ConnectionLost("channel.open refused".into()))
            });
            assert_bound(&core);
            r.is_ok()
        })
    };
    let lease = PoolCore::acquire(&core, far(), || opener.open()).expect("acquire");
    assert_bound(&core);
    drop(lease);
    let reused = failing.join().unwrap();
    let s = core.stats();
    let acquired = if reused { 2 } else { 1 };
    assert_eq!(
        (s.opened, s.acquired, s.released),
        (1, acquired, acquired),
        "{s:?}"
    );
    assert_eq!((s.in_use, s.waiters), (0, 0), "{s:?}");
}

#[test]
fn pool_failed_open_hands_its_place_on() {
    assert!(explore("pool failed open", pool_failed_open_model) > 1);
}

// ---------------------------------------------------------------- 2. replies

/// Two RPC waiters; the I/O thread answers the first and then the link fails, which
/// drops the second reply's sender. Each waiter wakes exactly once, with its reply or
/// with "disconnected", never another's. (And, before them, a reply to a waiter that
/// left is handed back.)
fn reply_model() {
    // A waiter that left (timed out) before its reply came: the I/O thread gets the reply
    // back, and so learns nobody took it (a basic.consume's consumer is then cancelled).
    let (tx0, rx0) = oneshot::channel::<u32>();
    drop(rx0);
    assert_eq!(
        tx0.send(5),
        Err(5),
        "a reply nobody will take counted as taken"
    );
    let (tx1, rx1) = oneshot::channel::<Result<u32, u64>>();
    let (tx2, rx2) = oneshot::channel::<Result<u32, u64>>();
    let io = thread::spawn(move || {
        tx1.send(Ok(1)).ok();
        drop(tx2); // connection lost: pending replies are dropped
    });
    let w2 = thread::spawn(move || rx2.recv_deadline(far()));
    let r1 = rx1.recv_deadline(far());
    assert_eq!(r1, Ok(Ok(1)));
    assert_eq!(w2.join().unwrap(), Err(oneshot::RecvError::Disconnected));
    io.join().unwrap();
}

#[test]
fn rpc_waiter_races_reply_and_connection_loss() {
    assert!(explore("reply", reply_model) > 1);
}

// ---------------------------------------------------------------- 3. single flight

/// Three threads (two spawned and the main one) report the failure of generation 1 at
/// once: exactly one recovery starts. Then the recovery installs generation 3 while a
/// stale report of generation 1 and a failure of the new generation race it: the stale
/// one starts nothing, the new failure starts exactly one recovery if and only if it hit
/// the installed generation. (loom allows 4 spawned threads per model.)
fn link_model() {
    let link = Arc::new(Mutex::new(LinkState::new()));
    let starts = Arc::new(AtomicUsize::new(0));
    let report = |link: &Arc<Mutex<LinkState>>, starts: &Arc<AtomicUsize>, g: u64| {
        link.lock().unwrap().failing(g, true);
        let mut l = link.lock().unwrap();
        let started = l.ended(g, false) == Ended::StartRecovery;
        if started {
            starts.fetch_add(1, SeqCst);
        }
        started
    };
    let reporters: Vec<_> = (0..2)
        .map(|_| {
            let (link, starts) = (link.clone(), starts.clone());
            thread::spawn(move || report(&link, &starts, 1))
        })
        .collect();
    report(&link, &starts, 1);
    for r in reporters {
        r.join().unwrap();
    }
    assert_eq!(starts.load(SeqCst), 1, "one failure, one reconnect");

    let installer = {
        let link = link.clone();
        thread::spawn(move || link.lock().unwrap().install(3, false))
    };
    let new_failure = {
        let (link, starts) = (link.clone(), starts.clone());
        thread::spawn(move || report(&link, &starts, 3))
    };
    let stale_started = report(&link, &starts, 1);
    let installed = installer.join().unwrap();
    new_failure.join().unwrap();
    assert!(
        !stale_started,
        "a late report about generation 1 starts nothing"
    );
    // If the new generation failed before it was installed, the running recovery goes
    // on (install refused, nothing new starts); otherwise its failure starts one.
    let expected = if installed { 2 } else { 1 };
    assert_eq!(starts.load(SeqCst), expected);
}

#[test]
fn flight_recovery_is_single_flight_and_generations_are_not_confused() {
    assert!(explore("single-flight", link_model) > 1);
}

// ---------------------------------------------------------------- 4. consumer queue

/// The I/O thread delivers two messages into a queue bounded at one, stalling when it is
/// full until the consumer wakes it; the consumer takes and acks; meanwhile the consumer
/// is cancelled (the queue closes), which must never leave the I/O thread stalled.
fn queue_model() {
    let shared = Arc::new(QueueShared::new(1));
    let (tx, rx) = queue::unbounded::<u32>();
    let wake = Arc::new((Mutex::new(false), Condvar::new()));
    let acks = Arc::new(AtomicUsize::new(0));
    let io = {
        let (shared, wake) = (shared.clone(), wake.clone());
        thread::spawn(move || {
            for m in 0..2 {
                while !shared.reserve_or_wait() {
                    let (woken, cv) = &*wake;
                    let mut w = woken.lock().unwrap();
                    while !*w && !shared.reserve_or_wait() {
                        w = cv.wait(w).unwrap();
                    }
                    *w = false;
                }
                shared.pushed();
                tx.send(m).unwrap();
            }
        })
    };
    let consumer = {
        let (shared, wake, acks) = (shared.clone(), wake.clone(), acks.clone());
        thread::spawn(move || {
            for _ in 0..2 {
                let _m = rx.recv().unwrap();
                acks.fetch_add(1, SeqCst);
                if shared.took_one() {
                    let (woken, cv) = &*wake;
                    *woken.lock().unwrap() = true;
                    cv.notify_one();
                }
            }
        })
    };
    let canceller = {
        let (shared, wake) = (shared.clone(), wake.clone());
        thread::spawn(move || {
            shared.active.store(false, SeqCst);
            // A cancelled consumer never holds the I/O thread back: wake it.
            let (woken, cv) = &*wake;
            *woken.lock().unwrap() = true;
            cv.notify_one();
        })
    };
    io.join().unwrap();
    consumer.join().unwrap();
    canceller.join().unwrap();
    assert_eq!(acks.load(SeqCst), 2);
    assert_eq!(shared.queued.load(SeqCst), 0);
}

#[test]
fn consumer_queue_close_races_delivery_and_ack() {
    assert!(explore("consumer queue", queue_model) > 1);
}

/// The I/O side and one consumer alone, as the engine drives them: the I/O thread
/// delivers three messages into a queue bounded at one; when `reserve_or_wait` says
/// full it stalls until the consumer's `took_one` asks for a wake-up, then retries (the
/// engine's `retry_stalled`). Nobody else wakes it. After each push the bound holds.
fn queue_alone_model() {
    const N: usize = 3;
    let shared = Arc::new(QueueShared::new(1));
    let (tx, rx) = queue::unbounded::<usize>();
    let waker = Arc::new(Waker::default());
    let io = {
        let (shared, waker) = (shared.clone(), waker.clone());
        thread::spawn(move || {
            for m in 0..N {
                while !shared.reserve_or_wait() {
                    waker.wait();
                }
                shared.pushed();
                let queued = shared.queued.load(SeqCst);
                assert!(queued <= shared.capacity, "{queued} queued over the bound");
                tx.send(m).unwrap();
            }
        })
    };
    for m in 0..N {
        assert_eq!(rx.recv().unwrap(), m);
        if shared.took_one() {
            waker.wake();
        }
    }
    io.join().unwrap();
    assert_eq!(shared.queued.load(SeqCst), 0);
}

#[test]
fn consumer_queue_io_and_consumer_alone() {
    assert!(explore("consumer queue alone", queue_alone_model) > 1);
}

/// A consumer that never takes is cancelled (its handle dropped) while the I/O thread
/// stalls on its full queue: the cancel clears `active` and wakes the I/O thread (the
/// cancel command does that in lepus), which must then go on delivering instead of
/// waiting for room nobody will make. A delivery whose send fails (the queue's receiver
/// is gone) is uncounted (`unpushed`, as `delivery.rs` does): the count is what was
/// really queued.
fn queue_cancel_model() {
    let shared = Arc::new(QueueShared::new(1));
    let (tx, rx) = queue::unbounded::<usize>();
    let waker = Arc::new(Waker::default());
    let io = {
        let (shared, waker) = (shared.clone(), waker.clone());
        thread::spawn(move || {
            let mut sent = 0;
            for m in 0..2 {
                while !shared.reserve_or_wait() {
                    waker.wait();
                }
                shared.pushed();
                if tx.send(m).is_ok() {
                    sent += 1;
                } else {
                    shared.unpushed();
                }
            }
            sent
        })
    };
    shared.active.store(false, SeqCst);
    drop(rx);
    waker.wake();
    // The I/O thread got through both deliveries: nothing held it back.
    let sent = io.join().unwrap();
    assert_eq!(
        shared.queued.load(SeqCst),
        sent,
        "failed sends left counted"
    );
}

#[test]
fn consumer_queue_cancel_releases_the_io_side() {
    assert!(explore("consumer queue cancel", queue_cancel_model) > 1);
}

/// The I/O thread's batch of one socket read: two deliveries queued quietly
/// (`send_quiet`, no wake-up) into one consumer's queue that two threads receive from,
/// then the owed wake-ups paid once per queue (`Notifier::wake`, the engine's
/// `wake_consumers`). Each receiver may be asleep before, between or after the sends,
/// or wake and take before the payment: every one must get an item. The sender stays
/// alive until both received (its drop would wake everyone and hide a lost wake-up).
fn quiet_batch_model() {
    let (tx, rx) = queue::unbounded::<u32>();
    let receivers: Vec<_> = (0..2)
        .map(|_| {
            let rx = rx.clone();
            thread::spawn(move || rx.recv().unwrap())
        })
        .collect();
    drop(rx);
    let mut owed = Vec::new();
    for m in [1, 2] {
        if tx.send_quiet(m).unwrap() {
            owed.push(tx.notifier());
        }
    }
    for n in owed {
        n.wake();
    }
    let mut got: Vec<u32> = receivers.into_iter().map(|r| r.join().unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, [1, 2]);
    drop(tx);
}

#[test]
fn consumer_queue_quiet_batch_wakes_every_sleeper() {
    assert!(explore("consumer queue quiet batch", quiet_batch_model) > 1);
}

/// A dispatcher's two threads serve one consumer queue through its ticket: the I/O
/// side queues a delivery quietly and pays the owed wake-up (as at the end of a turn),
/// then queues a second one plainly. Whatever the interleaving, the queue is served by
/// one thread at a time (never two inside it at once: a ticket is listed once), both
/// items are handled, in order, and nothing is left with every thread asleep (the
/// release's second look: an item queued while the flag was still set).
fn dispatch_model() {
    let list = Arc::new(ReadyList::new());
    let (tx, rx) = queue::unbounded::<u32>();
    rx.watch(Some(ReadyList::ticket(&list, 0)));
    let inside = Arc::new(AtomicBool::new(false));
    let got = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (list, rx, inside, got) = (list.clone(), rx.clone(), inside.clone(), got.clone());
            thread::spawn(move || {
                while let Some(t) = list.take(None) {
                    assert!(!inside.swap(true, SeqCst), "two threads serve one queue");
                    let mut done = false;
                    while let Ok(v) = rx.try_recv() {
                        let mut g = got.lock().unwrap();
                        g.push(v);
                        done = g.len() == 2;
                    }
                    inside.store(false, SeqCst);
                    Ticket::release(&t, || rx.has_news());
                    if done {
                        list.stop();
                    }
                }
            })
        })
        .collect();
    if tx.send_quiet(1).unwrap() {
        tx.notifier().wake();
    }
    tx.send(2).unwrap();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(*got.lock().unwrap(), [1, 2]);
    rx.watch(None);
    list.stop();
    drop(tx);
}

/// A dispatcher thread serves two consumer queues. The I/O side queues into A quietly
/// (a wake-up may become owed to the list), then A's consumer leaves (unwatched) before
/// anything is paid, then B gets an item quietly and its owed wake-up, if any, is paid
/// through B's notifier. The thread must get B's item whatever the interleaving: the
/// unwatch pays what A's send left owed (else the list's debt blocks every later one).
fn dispatch_unwatch_model() {
    let list = Arc::new(ReadyList::new());
    let (ta, ra) = queue::unbounded::<u32>();
    let (tb, rb) = queue::unbounded::<u32>();
    ra.watch(Some(ReadyList::ticket(&list, 0)));
    rb.watch(Some(ReadyList::ticket(&list, 1)));
    let worker = {
        let (list, ra, rb) = (list.clone(), ra.clone(), rb.clone());
        thread::spawn(move || {
            while let Some(t) = list.take(None) {
                let rx = if t.id() == 0 { &ra } else { &rb };
                let mut got_b = false;
                while let Ok(v) = rx.try_recv() {
                    got_b |= v == 2;
                }
                Ticket::release(&t, || rx.has_news());
                if got_b {
                    list.stop();
                }
            }
        })
    };
    let _ = ta.send_quiet(1).unwrap();
    ra.watch(None);
    if tb.send_quiet(2).unwrap() {
        tb.notifier().wake();
    }
    worker.join().unwrap();
    rb.watch(None);
    drop((ta, tb));
}

#[test]
fn dispatch_pays_what_a_leaving_consumer_owed() {
    assert!(explore("dispatch unwatch", dispatch_unwatch_model) > 1);
}

#[test]
fn dispatch_serves_each_queue_by_one_thread_and_leaves_nothing() {
    assert!(explore("dispatch", dispatch_model) > 1);
}

// ---------------------------------------------------------------- 5. confirms

/// Three publishes are outstanding; the broker's multiple-ack of 1..=2 and nack of 3
/// race a waiter on the third's handle and a `wait_for_confirms` waiter.
fn confirm_model() {
    let t = Arc::new(ConfirmTracker::new());
    t.enable();
    let _ = t.register(false, None).unwrap();
    let (_, s2) = t.register(true, None).unwrap();
    let (_, s3) = t.register(true, None).unwrap();
    let (s2, s3) = (s2.unwrap(), s3.unwrap());
    let broker = {
        let t = t.clone();
        thread::spawn(move || {
            t.resolve(2, true, true);
            t.resolve(3, false, false);
        })
    };
    let one = {
        let (t, s3) = (t.clone(), s3.clone());
        thread::spawn(move || t.wait_slot(&s3, far()))
    };
    let all = t.wait_all(far()).expect("no failure in this model");
    assert_eq!(all.sequences, vec![3], "the third was nacked");
    assert_eq!(one.join().unwrap().unwrap(), Some(Confirm::Nack));
    broker.join().unwrap();
    assert_eq!(outcome(&s2).unwrap(), Some(Confirm::Ack));
    assert_eq!(t.outstanding(), 0);
}

/// A failure races the acks: every waiter wakes once, with an outcome or the failure;
/// kept messages are exactly the unconfirmed ones.
fn confirm_failure_model() {
    let t = Arc::new(ConfirmTracker::new());
    t.enable();
    let (_, s1) = t.register(true, None).unwrap();
    let (_, _s2) = t.register(true, None).unwrap();
    let s1 = s1.unwrap();
    let broker = {
        let t = t.clone();
        thread::spawn(move || t.resolve(1, false, true))
    };
    let failure = {
        let t = t.clone();
        thread::spawn(move || t.fail(Error::ConnectionLost("rst".into()), true))
    };
    let waiter = {
        let (t, s1) = (t.clone(), s1.clone());
        thread::spawn(move || t.wait_slot(&s1, far()))
    };
    let all = t.wait_all(far());
    broker.join().unwrap();
    failure.join().unwrap();
    let one = waiter.join().unwrap();
    assert!(matches!(all, Err(Error::ConnectionLost(_))) || all.is_ok());
    match one {
        Ok(Some(Confirm::Ack)) => {}
        Err(Error::ConnectionLost(_)) => {}
        other => panic!("waiter woke with {other:?}"),
    }
    // The ack landed before or after the failure: either way nothing is lost.
    let kept = t.take_in_doubt().len();
    let acked = outcome(&s1).unwrap() == Some(Confirm::Ack);
    assert_eq!(kept, if acked { 1 } else { 2 });
}

/// Two publishers wait on one channel, each on its own message; the broker acks only
/// the first. Its waiter must wake (and alone: the second keeps sleeping until the
/// channel fails, then wakes with the failure). A resolve that wakes the wrong waiter,
/// or nobody, leaves the first asleep: loom reports the deadlock.
fn confirm_targeted_wake_model() {
    let t = Arc::new(ConfirmTracker::new());
    t.enable();
    let (_, s1) = t.register(true, None).unwrap();
    let (_, s2) = t.register(true, None).unwrap();
    let (s1, s2) = (s1.unwrap(), s2.unwrap());
    let first = {
        let (t, s1) = (t.clone(), s1.clone());
        thread::spawn(move || t.wait_slot(&s1, far()))
    };
    let second = {
        let (t, s2) = (t.clone(), s2.clone());
        thread::spawn(move || t.wait_slot(&s2, far()))
    };
    let broker = {
        let t = t.clone();
        // A multiple ack of 1 (confirm_model covers the single path's wake).
        thread::spawn(move || t.resolve(1, true, true))
    };
    assert_eq!(first.join().unwrap().unwrap(), Some(Confirm::Ack));
    broker.join().unwrap();
    assert_eq!(outcome(&s2).unwrap(), None, "nobody settled the second");
    t.fail(Error::ConnectionLost("rst".into()), false);
    // The failed message's waiter hears why its channel ended; its handle reads failed.
    assert!(matches!(
        second.join().unwrap(),
        Err(Error::ConnectionLost(m)) if m == "rst"
    ));
    assert!(matches!(outcome(&s2), Err(Error::ConnectionLost(_))));
}

#[test]
fn confirms_wake_only_the_settled_waiter() {
    assert!(explore("confirms targeted wake", confirm_targeted_wake_model) > 1);
}

#[test]
fn confirms_race_waiters() {
    assert!(explore("confirms", confirm_model) > 1);
}

#[test]
fn confirms_race_a_failure() {
    assert!(explore("confirms + failure", confirm_failure_model) > 1);
}

/// Recovery (this thread) takes the unconfirmed messages of the failed generation and
/// adopts them into the new one (republish policy), while the new generation's I/O
/// thread acks whatever was republished and then fails too (keeping what is in doubt),
/// and a publisher waits on the first message's handle. A second recovery attempt
/// then hands back what is still in doubt. Every message ends exactly once — acked,
/// or handed back — and the waiter wakes with exactly one outcome.
fn confirm_recovery_model() {
    let old = ConfirmTracker::new();
    old.enable();
    let mut slots = Vec::new();
    for i in 0..2u8 {
        let (_, slot) = old.register(true, Some(Arc::new(vec![i]))).unwrap();
        slots.push(slot.unwrap());
    }
    old.fail(Error::ConnectionLost("rst".into()), true);
    let new = Arc::new(ConfirmTracker::new());
    new.enable();
    // How many frames recovery has republished (the broker can ack only those).
    let sent = Arc::new(AtomicUsize::new(0));
    let io = {
        let (new, sent) = (new.clone(), sent.clone());
        thread::spawn(move || {
            let mut acked = 0;
            let n = sent.load(SeqCst);
            if n > 0 {
                new.resolve(1, false, true); // the broker acks the first republished copy
                acked = 1;
            }
            new.fail(Error::ConnectionLost("rst again".into()), true);
            acked
        })
    };
    let waiter = {
        let (new, slot) = (new.clone(), slots[0].clone());
        thread::spawn(move || new.wait_slot(&slot, far()))
    };
    let entries = old.take_in_doubt();
    assert_eq!(entries.len(), 2);
    let frames = new.adopt(entries);
    sent.store(frames.len(), SeqCst);
    let acked = io.join().unwrap();
    match waiter.join().unwrap() {
        Ok(Some(Confirm::Ack)) => assert_eq!(acked, 1, "an ack nobody sent"),
        Err(Error::ConnectionLost(_)) => {}
        other => panic!("waiter woke with {other:?}"),
    }
    // The next attempt (hand-back policy) gets everything not acked, once.
    let again = new.take_in_doubt();
    assert!(new.take_in_doubt().is_empty(), "in doubt twice");
    assert_eq!(
        old.take_in_doubt().len(),
        0,
        "left behind on the old generation"
    );
    for e in &again {
        e.hand_back();
    }
    assert_eq!(
        again.len() + acked,
        2,
        "{} in doubt, {acked} acked",
        again.len()
    );
    assert_eq!(new.outstanding(), 0);
    let ends: Vec<_> = slots.iter().map(|s| outcome(s)).collect();
    let acks = ends
        .iter()
        .filter(|o| matches!(o, Ok(Some(Confirm::Ack))))
        .count();
    let handed = ends
        .iter()
        .filter(|o| matches!(o, Err(Error::ConnectionLost(m)) if m.contains("handed")))
        .count();
    assert_eq!((acks, handed), (acked, again.len()), "{ends:?}");
    // A wait on a handed-back message says so, not only that the link failed.
    for slot in &slots {
        if outcome(slot).is_err() {
            assert!(matches!(
                new.wait_slot(slot, far()),
                Err(Error::ConnectionLost(m)) if m.contains("handed")
            ));
        }
    }
}

#[test]
fn confirms_recovery_adopts_while_the_new_link_acks_and_fails() {
    assert!(explore("confirms recovery", confirm_recovery_model) > 1);
}

// ---------------------------------------------------------------- 6. sending a command

/// A one-command stand-in for the command queue (crossbeam's) that orders no more than
/// crossbeam does: a push publishes with a release store, a pop that finds nothing has
/// only done an acquire load. lepus's loom queue is a Mutex + Condvar queue, which orders
/// everything and would hide a missing fence; the hand-shakes in `send_core` must not
/// rely on more than this.
struct CommandSlot<T> {
    item: Mutex<Option<T>>,
    full: AtomicBool,
}

impl<T> CommandSlot<T> {
    fn new() -> Self {
        CommandSlot {
            item: Mutex::new(None),
            full: AtomicBool::new(false),
        }
    }
    fn push(&self, v: T) -> Result<(), ()> {
        *self.item.lock().unwrap() = Some(v);
        self.full.store(true, Release);
        Ok(())
    }
    fn pop(&self) -> Option<T> {
        if !self.full.load(Acquire) {
            return None;
        }
        self.full.store(false, Relaxed);
        self.item.lock().unwrap().take()
    }
}

/// An RPC waiter races a link failure: the handle queues its command (with its reply
/// sender) through `FailFlag::send` and waits through `FailFlag::wait_reply`; the I/O
/// thread answers the command if it finds it before the link fails, then sets the
/// failure and does its final drain, which drops whatever it finds. The waiter must
/// always wake (loom reports a deadlock if it sleeps on a sender nobody will drop), with
/// the answer if one was sent (a reply sent before the failure is never lost to it),
/// else with "disconnected".
fn fail_fence_model() {
    let flag = Arc::new(FailFlag::new());
    let slot = Arc::new(CommandSlot::<oneshot::Sender<u32>>::new());
    let io = {
        let (flag, slot) = (flag.clone(), slot.clone());
        thread::spawn(move || {
            let answered = slot.pop().map(|tx| tx.send(1).is_ok());
            flag.set();
            flag.drain_failed(|| slot.pop().is_some());
            answered == Some(true)
        })
    };
    let (tx, rx) = oneshot::channel::<u32>();
    let got = match flag.send(|| slot.push(tx)) {
        // Failed before queuing: the caller gets the error at once.
        None => {
            assert!(flag.is_set());
            None
        }
        Some(r) => {
            assert!(r.is_ok());
            Some(flag.wait_reply(&rx, far()))
        }
    };
    let answered = io.join().unwrap();
    if let Some(got) = got {
        let want = if answered {
            Ok(1)
        } else {
            Err(oneshot::RecvError::Disconnected)
        };
        assert_eq!(got, want, "answered: {answered}");
    }
}

#[test]
fn send_rpc_waiter_races_link_failure_and_final_drain() {
    assert!(explore("fail_fence", fail_fence_model) > 1);
}

/// The failing side's order (`FailFlag::fail`) as a reader sees it: a thread that sees
/// the flag set also sees what the owner decided (whether a recovery follows) and the
/// reason recorded (here a relaxed store, ordered only by the flag). `fail` returns the
/// owner's decision; tried with a recovery to follow and without.
fn fail_order_model(recover: bool) {
    let flag = Arc::new(FailFlag::new());
    let reason = Arc::new(AtomicUsize::new(0));
    let io = {
        let (flag, reason) = (flag.clone(), reason.clone());
        thread::spawn(move || {
            let said = flag.fail(|| recover, || reason.store(5, Relaxed));
            assert_eq!(said, recover, "fail() returns what the owner decided");
        })
    };
    if flag.is_set() {
        assert_eq!(
            flag.will_recover(),
            recover,
            "the flag seen before the decision"
        );
        assert_eq!(reason.load(Relaxed), 5, "the flag seen before the reason");
    }
    io.join().unwrap();
    assert!(flag.is_set());
    assert_eq!(flag.will_recover(), recover);
}

#[test]
fn send_failure_is_seen_with_its_decision_and_reason() {
    for recover in [false, true] {
        let name = format!("fail_order (recover: {recover})");
        assert!(explore(&name, move || fail_order_model(recover)) > 1);
    }
}

/// The wake flag's hand-shake: a wake-up from an earlier batch is pending and the I/O
/// thread is about to clear the flag and drain, while a handle queues a command (through
/// `FailFlag::send`, whose fence is the handle's half) and wakes through the flag. The
/// I/O thread polls, clears, drains, and polls again until it got the command: if the
/// handle skipped its wake-up because the flag still looked set while the drain missed
/// its command, the I/O thread sleeps with nobody to wake it (a loom deadlock).
fn wake_flag_model() {
    let wake = Arc::new(WakeFlag::new());
    let fail = Arc::new(FailFlag::new());
    let slot = Arc::new(CommandSlot::<u32>::new());
    let waker = Arc::new(Waker::default());
    // A wake-up from the quiet state reaches the I/O thread; later ones of the batch
    // are coalesced into it.
    let mut woke = false;
    wake.wake(|| {
        woke = true;
        waker.wake();
    });
    assert!(woke, "a command's wake-up dropped while none was pending");
    let handle = {
        let (wake, fail, slot, waker) = (wake.clone(), fail.clone(), slot.clone(), waker.clone());
        thread::spawn(move || {
            assert_eq!(fail.send(|| slot.push(7)), Some(Ok(())));
            wake.wake(|| waker.wake());
        })
    };
    loop {
        waker.wait();
        wake.clear();
        if let Some(v) = slot.pop() {
            assert_eq!(v, 7);
            break;
        }
    }
    handle.join().unwrap();
}

#[test]
fn send_wake_flag_never_loses_a_wake_up() {
    assert!(explore("wake_flag", wake_flag_model) > 1);
}

// ---------------------------------------------------------------- 7. a consumer's end

enum Msg {
    Delivery(u32),
    End(u64),
}

/// A consumer as `Consumer::recv` uses it: its queue, its bound and its end relay.
struct RelayConsumer {
    rx: queue::Receiver<Msg>,
    shared: QueueShared,
    end: EndRelay<Msg, u64>,
}

impl RelayConsumer {
    /// `Consumer::recv` and `on_msg`, step for step.
    fn recv(&self) -> Result<u32, u64> {
        if let Some(e) = self.end.ended() {
            return Err(e);
        }
        match self.rx.recv() {
            Ok(m) => {
                self.shared.took_one();
                match m {
                    Msg::Delivery(v) => Ok(v),
                    Msg::End(e) => Err(self.end.took_end(e, &self.shared, Msg::End)),
                }
            }
            Err(_) => Err(self.end.end_with(99)),
        }
    }
}

/// Two threads block in `recv()` on one consumer while the I/O thread queues a delivery
/// and then the consumer's end: each thread gets the delivery or the end, the delivery
/// reaches exactly one of them, both end with the end the I/O thread sent (a thread left
/// asleep is a loom deadlock), and the queue's count matches what is left in it.
fn relay_model() {
    let (tx, rx) = queue::unbounded::<Msg>();
    let c = Arc::new(RelayConsumer {
        rx,
        shared: QueueShared::new(4),
        end: EndRelay::new(tx.clone()),
    });
    let receivers: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            thread::spawn(move || {
                let mut got = 0;
                loop {
                    match c.recv() {
                        Ok(v) => got += v,
                        Err(e) => {
                            // `Consumer::iter` and `has_ended` stop on a recorded end: one
                            // not recorded would have the iterator call `recv` forever.
                            assert_eq!(c.end.ended(), Some(e), "an end not recorded");
                            return (got, e);
                        }
                    }
                }
            })
        })
        .collect();
    assert!(c.shared.reserve_or_wait());
    c.shared.pushed();
    tx.send(Msg::Delivery(1)).ok();
    c.shared.pushed();
    tx.send(Msg::End(7)).ok();
    let mut delivered = 0;
    for r in receivers {
        let (got, e) = r.join().unwrap();
        assert_eq!(e, 7, "a receiver ended with another end");
        delivered += got;
    }
    assert_eq!(delivered, 1, "the delivery reached exactly one receiver");
    assert_eq!(
        c.shared.queued.load(SeqCst),
        c.rx.len(),
        "the count left behind"
    );
}

#[test]
fn consumer_end_reaches_every_blocked_receiver() {
    assert!(explore("relay", relay_model) > 1);
}

// ---------------------------------------------------------------- 8. the connection's lock

/// A connection generation as `LinkCell` sees it: its number and its failure flag (the
/// real `FailFlag`, with the failing side's order in `FailFlag::fail`). Its error is its
/// number; `CLOSED` is "closed by the application".
#[derive(Clone)]
struct ModelGen {
    n: u64,
    fail: Arc<FailFlag>,
}

const CLOSED: u64 = 0;

impl ModelGen {
    fn new(n: u64) -> Self {
        ModelGen {
            n,
            fail: Arc::new(FailFlag::new()),
        }
    }
    /// The I/O thread's failure path: `ConnShared::fail_link` (tell the owner through
    /// `LinkCell::failing`, then set the flag), then, when the thread ends,
    /// `LinkCell::ended`. `recoverable`: the kind of failure recovery heals (a lost
    /// link) or not (say, access refused). Returns true if this thread must run the
    /// recovery, which it may only if the owner said one follows.
    fn link_lost(&self, cell: &LinkCell<ModelGen>, recoverable: bool) -> bool {
        let recover = self.fail.fail(
            || match cell.failing(self.n, recoverable) {
                // The models fail installed generations only, never a candidate.
                Some(candidate) => {
                    assert!(!candidate, "generation {} taken for a candidate", self.n);
                    true
                }
                None => false,
            },
            || {},
        );
        let start = cell.ended(self.n, self.n);
        assert!(
            !start || recover,
            "a recovery started where none was to follow"
        );
        start
    }
}

impl LinkGen for ModelGen {
    type Error = u64;
    fn number(&self) -> u64 {
        self.n
    }
    fn is_failed(&self) -> bool {
        self.fail.is_set()
    }
    fn will_recover(&self) -> bool {
        self.fail.will_recover()
    }
    fn error(&self) -> u64 {
        self.n
    }
}

/// Generation 1's link is lost and its recovery installs generation 2, then finishes a
/// step (the replay) that another waiter waits for through `wait_for`. A thread asking
/// for the connection (`current`) gets generation 1 (before the failure) or 2, never
/// generation 1's error: `current` reads the failure flag and then whether a recovery
/// follows, right only because the failing side records the latter first. The
/// `wait_for` waiter wakes (a lost wake-up is a loom deadlock).
fn link_recovery_model() {
    let g1 = ModelGen::new(1);
    let cell = Arc::new(LinkCell::new(g1.clone()));
    let replayed = Arc::new(AtomicBool::new(false));
    let io = {
        let (cell, replayed) = (cell.clone(), replayed.clone());
        thread::spawn(move || {
            if g1.link_lost(&cell, true) {
                assert!(cell.install(ModelGen::new(2)));
                replayed.store(true, Release);
                cell.notify();
            }
        })
    };
    let asker = {
        let cell = cell.clone();
        thread::spawn(move || cell.current(far(), CLOSED).map(|g| g.n))
    };
    assert_eq!(
        cell.wait_for(|| replayed.load(Acquire), far(), || 98, CLOSED),
        Ok(())
    );
    assert!(
        replayed.load(Acquire),
        "wait_for returned before the replay"
    );
    let got = asker.join().unwrap();
    assert!(got == Ok(1) || got == Ok(2), "current() gave {got:?}");
    io.join().unwrap();
    assert_eq!(cell.current(far(), CLOSED).map(|g| g.n), Ok(2));
    assert!(!cell.is_dead(), "a recovered connection taken for dead");
    assert!(
        !cell.ended(1, 1),
        "a late end of generation 1 starts something"
    );
}

#[test]
fn flight_current_waits_through_a_recovery() {
    assert!(explore("link_recovery", link_recovery_model) > 1);
}

/// Generation 1's link is lost and the recovery gives up: a thread waiting in `current`
/// for the recovery wakes with the recovery's error (or got generation 1 before the
/// failure), and the connection is dead.
fn link_give_up_model() {
    let g1 = ModelGen::new(1);
    let cell = Arc::new(LinkCell::new(g1.clone()));
    let io = {
        let cell = cell.clone();
        thread::spawn(move || {
            if g1.link_lost(&cell, true) {
                cell.give_up(77);
            }
        })
    };
    let got = cell.current(far(), CLOSED).map(|g| g.n);
    assert!(got == Ok(1) || got == Err(77), "current() gave {got:?}");
    io.join().unwrap();
    assert!(cell.is_dead());
    assert_eq!(cell.current(far(), CLOSED).map(|g| g.n), Err(77));
}

#[test]
fn flight_give_up_wakes_waiters() {
    assert!(explore("link_give_up", link_give_up_model) > 1);
}

/// The application closes the connection while generation 1's link is lost and its
/// recovery waits out a backoff (under loom, only a close ends that wait): the close
/// wakes the recovery, which gives up, and a thread waiting in `current`, which gets
/// "closed" (or generation 1 before the failure; or generation 1's error if the close
/// came first and so no recovery follows). Nothing sleeps on (a loom deadlock).
fn link_close_model() {
    let g1 = ModelGen::new(1);
    let cell = Arc::new(LinkCell::new(g1.clone()));
    let io = {
        let cell = cell.clone();
        thread::spawn(move || {
            if g1.link_lost(&cell, true) {
                assert!(cell.sleep_unless_closed(Duration::from_secs(1)));
                assert!(cell.is_closed(), "the backoff ended without a close");
                cell.give_up(CLOSED);
            }
        })
    };
    let closer = {
        let cell = cell.clone();
        thread::spawn(move || assert_eq!(cell.close().map(|g| g.n), Some(1)))
    };
    let got = cell.current(far(), CLOSED).map(|g| g.n);
    assert!(
        got == Ok(1) || got == Err(CLOSED) || got == Err(1),
        "current() gave {got:?}"
    );
    closer.join().unwrap();
    io.join().unwrap();
    assert_eq!(cell.current(far(), CLOSED).map(|g| g.n), Err(CLOSED));
}

/// Generation 1 fails in a way recovery does not heal (say, access refused): no
/// recovery starts, the connection is dead with that error, and a thread waiting in
/// `wait_for` for something only a recovery would bring wakes with it (a lost wake-up is
/// a loom deadlock).
fn link_unrecoverable_model() {
    let g1 = ModelGen::new(1);
    let cell = Arc::new(LinkCell::new(g1.clone()));
    let io = {
        let cell = cell.clone();
        thread::spawn(move || assert!(!g1.link_lost(&cell, false), "a recovery started"))
    };
    assert_eq!(cell.wait_for(|| false, far(), || 98, CLOSED), Err(1));
    io.join().unwrap();
    assert!(cell.is_dead());
    assert_eq!(cell.current(far(), CLOSED).map(|g| g.n), Err(1));
}

#[test]
fn flight_unrecoverable_failure_wakes_waiters() {
    assert!(explore("link_unrecoverable", link_unrecoverable_model) > 1);
}

#[test]
fn flight_close_wakes_recovery_and_waiters() {
    assert!(explore("link_close", link_close_model) > 1);
}

/// The application closes the connection while the recovery installs generation 2 (it
/// saw the connection open just before): either the install is refused (the recovery
/// then closes the candidate), or the close finds generation 2 current and closes it.
/// Never is generation 2 installed after the close took generation 1 to close: that
/// would leave a connection open that nobody closes.
fn link_close_install_model() {
    let g1 = ModelGen::new(1);
    let cell = Arc::new(LinkCell::new(g1.clone()));
    let io = {
        let cell = cell.clone();
        thread::spawn(move || {
            g1.link_lost(&cell, true) && !cell.is_closed() && cell.install(ModelGen::new(2))
        })
    };
    let closed = cell.close().map(|g| g.n);
    let installed = io.join().unwrap();
    assert!(
        !installed || closed == Some(2),
        "generation 2 installed after the close took generation {closed:?}"
    );
}

#[test]
fn flight_close_races_install() {
    assert!(explore("link_close_install", link_close_install_model) > 1);
}

// ---------------------------------------------------------------- 9. callers' writes

/// The socket as the write gate's model sees it: the bytes that reached the wire, and
/// room for so many more before `WouldBlock`; after a `WouldBlock` the broker has read
/// (the room is back for the next write, whoever makes it). Only touched under the gate
/// (and after every thread joined), so a plain mutex that is never contended.
#[derive(Clone, Default)]
struct Wire(std::sync::Arc<std::sync::Mutex<(Vec<u8>, usize, usize)>>);

impl Wire {
    fn with_room(room: usize) -> Wire {
        let w = Wire::default();
        let mut g = w.0.lock().unwrap();
        (g.1, g.2) = (room, room);
        drop(g);
        w
    }
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().0.clone()
    }
}

impl std::io::Write for Wire {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut w = self.0.lock().unwrap();
        if w.1 == 0 {
            w.1 = w.2;
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = b.len().min(w.1);
        w.0.extend_from_slice(&b[..n]);
        w.1 -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A sender as `ChannelShared::send_command` does it: write through the gate, else
/// queue and wake the I/O thread (also when the gate carries the rest of its frame).
fn gate_send(
    gate: &WriteGate<Wire>,
    queue: &Mutex<VecDeque<&'static [u8]>>,
    waker: &Waker,
    frame: &'static [u8],
) {
    match gate.try_write(frame, || queue.lock().unwrap().is_empty()) {
        Direct::Written => {}
        Direct::Carried(_) => waker.wake(),
        Direct::NotNow => {
            queue.lock().unwrap().push_back(frame);
            waker.wake();
        }
    }
}

/// One turn of the I/O thread as the reactor runs it: busy, take the queued frames,
/// write (the carry first, then its own output) until `WouldBlock`, rest if its output
/// is all written.
fn gate_turn(
    gate: &WriteGate<Wire>,
    queue: &Mutex<VecDeque<&'static [u8]>>,
    wire: &mut Wire,
    out: &mut Vec<u8>,
) {
    gate.busy();
    while let Some(f) = queue.lock().unwrap().pop_front() {
        out.extend_from_slice(f);
    }
    gate.write_with(|carry| {
        use std::io::Write;
        while !carry.is_empty() {
            match wire.write(carry.pending()) {
                Ok(n) => carry.took(n),
                Err(_) => return,
            }
        }
        while !out.is_empty() {
            match wire.write(out) {
                Ok(n) => drop(out.drain(..n)),
                Err(_) => return,
            }
        }
    });
    gate.rest(out.is_empty());
}

/// Two senders and the I/O thread share the socket through the write gate. Sender A
/// sends two frames (its second must not pass its first), sender B one; the socket takes
/// 4 bytes between two `WouldBlock`s, so a 5-byte frame is never written whole at once:
/// direct writes leave a carry, the I/O thread's writes stop part-way. At
/// the end every frame is on the wire whole (never cut by another), A's in order.
fn gate_model() {
    const ROOM: usize = 4;
    let mut wire = Wire::with_room(ROOM);
    let gate = Arc::new(WriteGate::new(Some(wire.clone())));
    let queue = Arc::new(Mutex::new(VecDeque::new()));
    let waker = Arc::new(Waker::default());
    gate.rest(true);
    let plan: [&'static [&'static [u8]]; 2] = [&[b"a1---", b"a2---"], &[b"b1---"]];
    let senders: Vec<_> = plan
        .into_iter()
        .map(|frames| {
            let (gate, queue, waker) = (gate.clone(), queue.clone(), waker.clone());
            thread::spawn(move || {
                for f in frames {
                    gate_send(&gate, &queue, &waker, f);
                }
            })
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let io = {
        let (gate, queue, waker, done) = (gate.clone(), queue.clone(), waker.clone(), done.clone());
        let mut wire = wire.clone();
        thread::spawn(move || {
            let mut out = Vec::new();
            loop {
                waker.wait();
                if done.load(SeqCst) {
                    return out;
                }
                gate_turn(&gate, &queue, &mut wire, &mut out);
            }
        })
    };
    for s in senders {
        s.join().unwrap();
    }
    done.store(true, SeqCst);
    waker.wake();
    let mut out = io.join().unwrap();
    // The socket keeps draining (writable events): turns until everything is out.
    for _ in 0..8 {
        gate_turn(&gate, &queue, &mut wire, &mut out);
    }
    let bytes = wire.bytes();
    let frames: Vec<&[u8]> = bytes.chunks(5).collect();
    let mut sorted = frames.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [&b"a1---"[..], b"a2---", b"b1---"],
        "frames cut or lost: {:?}",
        String::from_utf8_lossy(&bytes)
    );
    let pos = |f: &[u8]| frames.iter().position(|x| *x == f);
    assert!(
        pos(b"a1---") < pos(b"a2---"),
        "A's frames out of order: {:?}",
        String::from_utf8_lossy(&bytes)
    );
}

#[test]
fn gate_keeps_frames_whole_and_each_senders_in_order() {
    assert!(explore("gate", gate_model) > 1);
}
