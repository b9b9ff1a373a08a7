//! loom models of lepus's own synchronisation code (built with `--cfg loom`, where
//! lepus's `sync` module maps every primitive and queue to loom's).
//!
//! Each model counts the interleavings it explored, prints the count and asserts there
//! was more than one. Two deliberately broken variants of lepus's code, switched on with
//! `LEPUS_LOOM_BROKEN=pool` (a release without its once-guard) and
//! `LEPUS_LOOM_BROKEN=oneshot` (a reply sender whose drop forgets the wake-up), must be
//! caught: their tests are `#[ignore]`d and `run.sh` runs each with `--ignored` and
//! its variable set.
#![cfg(loom)]

use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use lepus::internal::model::{
    ConfirmTracker, Ended, LinkState, PoolCore, Poolable, QueueShared, oneshot, outcome, queue,
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

/// Two threads acquire and release one pooled item (max 1) — one releases explicitly
/// and then drops its guard — while a third kills the link and reclaims dead leases.
fn pool_model() {
    let core = Arc::new(PoolCore::new(1));
    let alive = Arc::new(AtomicBool::new(true));
    let user = |explicit: bool| {
        let core = core.clone();
        let alive = alive.clone();
        thread::spawn(move || {
            let lease = PoolCore::acquire(&core, far(), || Ok(Res::new(&alive))).expect("acquire");
            // Never handed to two holders at once.
            assert_eq!(
                lease.item().holders.fetch_add(1, SeqCst),
                0,
                "item handed out twice"
            );
            lease.item().holders.fetch_sub(1, SeqCst);
            if explicit {
                lease.release();
            }
            drop(lease);
        })
    };
    let a = user(true);
    let b = user(false);
    let killer = {
        let (core, alive) = (core.clone(), alive.clone());
        thread::spawn(move || {
            alive.store(false, SeqCst);
            core.reclaim_dead();
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
    assert_eq!(s.waiters, 0);
}

#[test]
fn pool_acquire_release_drop_and_link_failure() {
    assert!(explore("pool", pool_model) > 1);
}

#[test]
#[ignore = "run by run.sh with LEPUS_LOOM_BROKEN=pool"]
#[should_panic]
fn broken_pool_without_once_guard_is_caught() {
    assert_eq!(std::env::var("LEPUS_LOOM_BROKEN").as_deref(), Ok("pool"));
    explore("pool (broken: no once-guard)", pool_model);
}

// ---------------------------------------------------------------- 2. replies

/// Two RPC waiters; the I/O thread answers the first and then the link fails, which
/// drops the second reply's sender. Each waiter wakes exactly once, with its reply or
/// with "disconnected", never another's.
fn reply_model() {
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

#[test]
#[ignore = "run by run.sh with LEPUS_LOOM_BROKEN=oneshot"]
#[should_panic]
fn broken_oneshot_without_wakeup_is_caught() {
    assert_eq!(std::env::var("LEPUS_LOOM_BROKEN").as_deref(), Ok("oneshot"));
    explore("reply (broken: no wake-up on drop)", reply_model);
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
fn recovery_is_single_flight_and_generations_are_not_confused() {
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

/// The I/O thread's wake-up as mio's `Waker` behaves: sticky (a wake before the wait is
/// not lost) and the only way the stalled I/O thread learns it may read again. No
/// re-poll: a lost wake-up leaves the I/O thread asleep for good, which loom reports.
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
    assert!(!all, "one was nacked");
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

#[test]
fn confirms_race_waiters() {
    assert!(explore("confirms", confirm_model) > 1);
}

#[test]
fn confirms_race_a_failure() {
    assert!(explore("confirms + failure", confirm_failure_model) > 1);
}
