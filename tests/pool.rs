//! ChannelPool against a real RabbitMQ: acquire, try_acquire, release, discard, the bound
//! under contention, timeouts, channels the broker closed, counters under load, and the
//! pool across a connection recovery (through lepus-testkit's fault proxy).

mod support;

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, Channel, ChannelPool, Confirm, Connection, Error, PoolStats, PublishOptions,
    QueueDeclareOptions, RecoveryEventKind, RecoveryOptions, reply_code,
};
use support::{Cleanup, ClientOptions, connect, start_proxy, unique, wait_until};

fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

/// `acquired == released + in_use`, nobody waiting, nothing handed out.
fn assert_balanced(s: &PoolStats) {
    assert_eq!(s.acquired, s.released + s.in_use as u64, "{s:?}");
    assert_eq!(s.in_use, 0, "{s:?}");
    assert_eq!(s.waiters, 0, "{s:?}");
    assert_eq!(s.idle as u64, s.opened - s.discarded, "{s:?}");
}

/// Run `n` threads of `f(i)` and join them under `timeout` (a thread still running then
/// is a deadlock: the test fails instead of hanging). Panics in threads propagate.
fn run_threads<T: Send + 'static>(
    n: usize,
    timeout: Duration,
    f: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for i in 0..n {
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(i)));
            let _ = tx.send((i, r));
        });
    }
    let deadline = Instant::now() + timeout;
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, Ok(v))) => out[i] = Some(v),
            Ok((i, Err(p))) => {
                eprintln!("thread {i} panicked");
                std::panic::resume_unwind(p)
            }
            Err(_) => {
                let running: Vec<usize> = (0..n).filter(|i| out[*i].is_none()).collect();
                panic!("threads {running:?} did not finish within {timeout:?} (deadlock?)");
            }
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

#[test]
fn acquire_try_acquire_release_and_discard() {
    let conn = connect();
    let pool = ChannelPool::with_max(&conn, 2);
    assert_eq!(pool.max(), 2);
    assert!(
        pool.try_acquire().is_none(),
        "try_acquire never opens a channel"
    );
    assert_eq!(pool.stats().opened, 0);

    let a = pool.acquire().unwrap();
    let a_id = a.id();
    assert!(a.is_open());
    a.queue_declare("", &exclusive()).unwrap();
    let s = pool.stats();
    assert_eq!(
        (s.opened, s.acquired, s.released, s.in_use, s.idle),
        (1, 1, 0, 1, 0)
    );
    a.release();
    let s = pool.stats();
    assert_eq!((s.released, s.in_use, s.idle), (1, 0, 1));

    // The idle channel comes back without a round trip.
    let b = pool.try_acquire().expect("the idle channel");
    assert_eq!(b.id(), a_id);
    // A second one at the same time is opened.
    let c = pool.acquire().unwrap();
    let c_id = c.id();
    assert_ne!(c_id, a_id);
    assert_eq!(pool.stats().opened, 2);
    assert!(pool.try_acquire().is_none(), "full, nothing idle");
    drop(c); // the guard gives it back

    // Discard: the channel is closed and never handed out again.
    let b_channel: Channel = (*b).clone();
    b.discard();
    assert!(!b_channel.is_open());
    assert!(
        matches!(b_channel.close_reason(), Some(Error::ChannelClosed(_))),
        "{:?}",
        b_channel.close_reason()
    );
    let s = pool.stats();
    assert_eq!(
        (
            s.opened,
            s.acquired,
            s.released,
            s.discarded,
            s.in_use,
            s.idle
        ),
        (2, 3, 3, 1, 0, 1)
    );
    let d = pool.acquire().unwrap();
    assert_eq!(d.id(), c_id, "the idle one first");
    let e = pool.acquire().unwrap();
    assert!(e.is_open() && d.is_open());
    e.queue_declare("", &exclusive()).unwrap();
    assert_eq!(
        pool.stats().opened,
        3,
        "a new channel for the discarded one"
    );
    drop((d, e));
    assert_balanced(&pool.stats());
    conn.close().unwrap();
}

#[test]
fn bounded_pool_never_hands_out_more_than_its_max() {
    const MAX: usize = 3;
    const THREADS: usize = 10;
    const ROUNDS: usize = 30;
    let conn = connect();
    // The borrowers' basic_qos below matches the set-up, so it changes nothing.
    let pool = ChannelPool::builder(&conn).max(MAX).qos(10, false).build();
    // Hold every channel, so that all the threads queue up as waiters.
    let held: Vec<_> = (0..MAX).map(|_| pool.acquire().unwrap()).collect();
    let in_use = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(Mutex::new(HashSet::new()));
    let (p, u, m, i) = (pool.clone(), in_use.clone(), max_seen.clone(), ids.clone());
    let runner = std::thread::spawn(move || {
        run_threads(THREADS, Duration::from_secs(60), move |_| {
            for _ in 0..ROUNDS {
                let ch = p.acquire_timeout(Duration::from_secs(20)).unwrap();
                let now = u.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                assert!(
                    i.lock().unwrap().insert(ch.id()),
                    "channel handed out twice"
                );
                // A round trip to the broker while holding it.
                ch.basic_qos(10, false).unwrap();
                i.lock().unwrap().remove(&ch.id());
                u.fetch_sub(1, Ordering::SeqCst);
                drop(ch);
            }
        })
    });
    assert!(
        wait_until(Duration::from_secs(10), || pool.stats().waiters == THREADS),
        "every thread waits: {:?}",
        pool.stats()
    );
    let s = pool.stats();
    assert_eq!((s.in_use, s.waiters, s.opened), (MAX, THREADS, MAX as u64));
    drop(held);
    runner.join().unwrap();
    let seen = max_seen.load(Ordering::SeqCst);
    assert!(seen <= MAX, "{seen} channels in use at once");
    let s = pool.stats();
    assert_balanced(&s);
    assert_eq!(s.acquired, (MAX + THREADS * ROUNDS) as u64);
    assert_eq!(s.opened, MAX as u64);
    assert_eq!(s.discarded, 0);
    eprintln!("[pool] max {MAX}, {THREADS} threads: at most {seen} in use at once; {s:?}");
    conn.close().unwrap();
}

#[test]
fn acquire_times_out_when_every_channel_is_taken() {
    let conn = connect();
    let pool = ChannelPool::with_max(&conn, 1);
    let held = pool.acquire().unwrap();
    let t = Instant::now();
    let r = pool.acquire_timeout(Duration::from_millis(200));
    let took = t.elapsed();
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // A deadline already passed fails at once.
    let t = Instant::now();
    assert!(matches!(
        pool.acquire_until(Instant::now()),
        Err(Error::Timeout(_))
    ));
    assert!(t.elapsed() < Duration::from_millis(100));
    assert!(pool.try_acquire().is_none());
    let s = pool.stats();
    assert_eq!((s.waiters, s.in_use, s.acquired), (0, 1, 1));
    drop(held);
    // Free again: acquired at once.
    let again = pool.acquire_timeout(Duration::from_millis(200)).unwrap();
    drop(again);
    assert_balanced(&pool.stats());
    conn.close().unwrap();
}

#[test]
fn channel_closed_by_the_broker_is_discarded_and_never_handed_out_again() {
    let conn = connect();
    let missing = unique("pool-missing");
    let pool = ChannelPool::builder(&conn).max(2).qos(5, false).build();
    let a = pool.acquire().unwrap();
    let err = a.queue_declare(&missing, &passive()).unwrap_err();
    assert_eq!(err.reply_code(), Some(reply_code::NOT_FOUND), "{err:?}");
    assert!(!a.is_open());
    let dead: Channel = (*a).clone();
    drop(a);
    let s = pool.stats();
    assert_eq!((s.discarded, s.idle, s.in_use), (1, 0, 0), "{s:?}");
    // Whatever is handed out from now on works (never the dead channel).
    for _ in 0..50 {
        let ch = pool.acquire().unwrap();
        assert!(ch.is_open());
        ch.basic_qos(5, false).unwrap();
    }
    assert!(!dead.is_open());
    let s = pool.stats();
    assert_eq!(s.discarded, 1);
    assert_eq!(s.opened, 2);
    assert_balanced(&s);

    // A full pool whose held channel dies: its place serves a waiter at once, and the
    // late release of the dead one is not counted twice.
    let pool = ChannelPool::builder(&conn).max(1).qos(1, false).build();
    let a = pool.acquire().unwrap();
    let _ = a.queue_declare(&missing, &passive()).unwrap_err();
    let b = pool
        .acquire_timeout(Duration::from_secs(2))
        .expect("the dead channel's place is reclaimed");
    assert!(b.is_open());
    b.basic_qos(1, false).unwrap();
    drop(a);
    drop(b);
    let s = pool.stats();
    assert_eq!((s.acquired, s.released, s.discarded), (2, 2, 1), "{s:?}");
    assert_balanced(&s);
    conn.close().unwrap();
}

#[test]
fn counters_balance_after_100_threads_of_200_acquire_release_pairs() {
    const THREADS: usize = 100;
    const PAIRS: usize = 200;
    let conn = connect();
    let pool = ChannelPool::with_max(&conn, 10);
    let in_use = Arc::new(Mutex::new(HashSet::new()));
    let tried = Arc::new(AtomicUsize::new(0));
    let (p, u, tr) = (pool.clone(), in_use.clone(), tried.clone());
    let t = Instant::now();
    let acquired: usize = run_threads(THREADS, Duration::from_secs(90), move |i| {
        let mut n = 0;
        for k in 0..PAIRS {
            // A mix of the ways in and out.
            let ch = if (i + k) % 3 == 0 {
                tr.fetch_add(1, Ordering::Relaxed);
                match p.try_acquire() {
                    Some(ch) => ch,
                    None => p.acquire_timeout(Duration::from_secs(30)).unwrap(),
                }
            } else {
                p.acquire_timeout(Duration::from_secs(30)).unwrap()
            };
            assert!(
                u.lock().unwrap().insert(ch.id()),
                "channel {} handed out twice",
                ch.id()
            );
            n += 1;
            u.lock().unwrap().remove(&ch.id());
            if k % 2 == 0 {
                ch.release();
            } else {
                drop(ch);
            }
        }
        n
    })
    .into_iter()
    .sum();
    let s = pool.stats();
    eprintln!(
        "[pool] {THREADS} threads x {PAIRS} pairs in {:.2} s: {acquired} acquisitions ({} \
         try_acquire calls), {s:?}",
        t.elapsed().as_secs_f64(),
        tried.load(Ordering::Relaxed)
    );
    assert_eq!(acquired, THREADS * PAIRS);
    assert_eq!(s.acquired, acquired as u64);
    assert_eq!(s.released, acquired as u64);
    assert!(s.opened <= 10, "{s:?}");
    assert_eq!(s.discarded, 0);
    assert_balanced(&s);
    assert!(in_use.lock().unwrap().is_empty());
    conn.close().unwrap();
}

#[test]
fn pool_keeps_working_across_a_recovery() {
    const THREADS: usize = 8;
    let cleanup = Cleanup::new();
    let proxy = start_proxy();
    let conn = Connection::open_with(proxy.options().recovery(
        RecoveryOptions::new().backoff(Duration::from_millis(50), Duration::from_secs(1)),
    ))
    .unwrap();
    let queue = cleanup.queue(&unique("pool-recovery-q"));
    conn.open_channel()
        .unwrap()
        .queue_declare(&queue, &QueueDeclareOptions::default())
        .unwrap();
    let pool = ChannelPool::builder(&conn).max(4).confirm_select().build();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let recovered = Arc::new(AtomicUsize::new(0));
    let in_use = Arc::new(Mutex::new(HashSet::new()));
    let (p, c, st, a, r, u, q) = (
        pool.clone(),
        conn.clone(),
        stop.clone(),
        acked.clone(),
        recovered.clone(),
        in_use.clone(),
        queue.clone(),
    );
    let runner = std::thread::spawn(move || {
        run_threads(THREADS, Duration::from_secs(60), move |_| {
            let mut after = false;
            let mut errors = Vec::new();
            while !st.load(Ordering::SeqCst) {
                let generation = c.generation();
                let ch = match p.acquire() {
                    Ok(ch) => ch,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                };
                assert!(u.lock().unwrap().insert(ch.id()), "handed out twice");
                let published = ch.confirm_select().and_then(|()| {
                    ch.basic_publish_confirmed(
                        "",
                        &q,
                        b"pooled",
                        &BasicProperties::new(),
                        &PublishOptions::default(),
                    )
                });
                u.lock().unwrap().remove(&ch.id());
                drop(ch);
                let ok = match published.and_then(|conf| match conf.wait_outcome() {
                    Err(e) if e.is_connection_lost() => conf.wait_outcome(),
                    other => other,
                }) {
                    Ok(Confirm::Ack) => true,
                    Ok(Confirm::Nack) => false,
                    Err(e) => {
                        errors.push(e);
                        false
                    }
                };
                if ok {
                    a.fetch_add(1, Ordering::SeqCst);
                    if generation > 1 && !after {
                        after = true;
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            for e in &errors {
                assert!(e.is_connection_lost(), "unexpected error {e:?}");
            }
            errors.len()
        })
    });
    assert!(wait_until(Duration::from_secs(10), || acked
        .load(Ordering::SeqCst)
        > 100));
    let before = pool.stats();
    let t0 = Instant::now();
    assert_eq!(proxy.reset(), 1);
    assert!(
        wait_until(Duration::from_secs(20), || recovered.load(Ordering::SeqCst)
            == THREADS),
        "{} of {THREADS} threads published after the recovery; events {:#?}",
        recovered.load(Ordering::SeqCst),
        conn.recovery_events()
    );
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let errors: usize = runner.join().unwrap().into_iter().sum();
    let s = pool.stats();
    eprintln!(
        "[pool] across a recovery: every thread published again within {:.1} ms; {} acked, \
         {errors} errors told to callers; before {before:?}, after {s:?}",
        took.as_secs_f64() * 1000.0,
        acked.load(Ordering::SeqCst)
    );
    assert_eq!(conn.generation(), 2);
    assert_eq!(proxy.connections(), 2);
    assert_eq!(
        conn.recovery_events()
            .iter()
            .filter(|e| matches!(e.kind, RecoveryEventKind::Recovered))
            .count(),
        1
    );
    // The same channels carried on: none discarded, none opened beyond the bound.
    assert_eq!(s.discarded, 0, "{s:?}");
    assert!(s.opened <= 4, "{s:?}");
    assert_balanced(&s);
    assert!(in_use.lock().unwrap().is_empty());
    // And the pool still works.
    let ch = pool.acquire().unwrap();
    ch.queue_declare(&queue, &passive()).unwrap();
    drop(ch);
    conn.close().unwrap();
}

/// One borrower's confirm mode, qos, transaction mode or running consumer never reaches
/// the next borrower: a channel that comes back changed is closed and discarded, and the
/// next borrower gets a fresh one (issue 14: a plain publish of the next borrower showed
/// up in `unconfirmed()`).
#[test]
fn a_borrowers_channel_changes_do_not_leak_into_the_next_borrower() {
    let conn = connect();
    let pool = ChannelPool::with_max(&conn, 1);
    let q = support::exclusive_queue(&conn.open_channel().unwrap());
    let plain = |ch: &Channel| {
        ch.basic_publish(
            "",
            &q,
            b"x",
            &BasicProperties::new(),
            &PublishOptions::default(),
        )
        .unwrap()
    };

    let first = pool.acquire().unwrap();
    let first_id = first.id();
    first.confirm_select().unwrap();
    first
        .basic_publish_confirmed(
            "",
            &q,
            b"x",
            &BasicProperties::new(),
            &PublishOptions::default(),
        )
        .unwrap()
        .wait()
        .unwrap();
    let first_channel: Channel = (*first).clone();
    drop(first);
    assert!(!first_channel.is_open(), "changed: closed on release");
    assert_eq!(pool.stats().discarded, 1);

    let second = pool.acquire().unwrap();
    assert_ne!(second.id(), first_id, "a fresh channel");
    plain(&second);
    assert_eq!(second.unconfirmed(), 0, "not in confirm mode");
    assert_eq!(second.next_publish_sequence(), 0);
    assert!(matches!(
        second.basic_publish_confirmed(
            "",
            &q,
            b"x",
            &BasicProperties::new(),
            &PublishOptions::default()
        ),
        Err(Error::NotInConfirmMode)
    ));
    // Unchanged: back to the pool and handed out again.
    let second_id = second.id();
    drop(second);
    let third = pool.acquire().unwrap();
    assert_eq!(third.id(), second_id, "an unchanged channel is reused");
    third.basic_qos(7, false).unwrap();
    drop(third);
    assert_eq!(pool.stats().discarded, 2, "a qos change is discarded too");

    // A consumer still running when the channel comes back: discarded (it ends);
    // one cancelled before: the channel is reused.
    let empty = support::exclusive_queue(&conn.open_channel().unwrap());
    let fourth = pool.acquire().unwrap();
    let consumer = fourth.basic_consume(&empty, &Default::default()).unwrap();
    drop(fourth);
    assert_eq!(pool.stats().discarded, 3);
    assert!(
        consumer.recv().is_err(),
        "the consumer ended with its channel"
    );
    drop(consumer);
    let fifth = pool.acquire().unwrap();
    let fifth_id = fifth.id();
    let consumer = fifth.basic_consume(&empty, &Default::default()).unwrap();
    consumer.cancel().unwrap();
    drop(consumer);
    fifth.tx_select().unwrap();
    drop(fifth);
    assert_eq!(pool.stats().discarded, 4, "transaction mode is discarded");
    let sixth = pool.acquire().unwrap();
    assert_ne!(sixth.id(), fifth_id);
    drop(sixth);
    assert_balanced(&pool.stats());
    conn.close().unwrap();
}

/// The pool's set-up (confirm mode, qos, a hook) is applied to every channel it opens,
/// once; a borrower that leaves it as it was gets its channel reused; a failing hook
/// fails the acquire and leaves no channel behind.
#[test]
fn the_pool_sets_up_every_channel_it_opens() {
    let conn = connect();
    let q = support::exclusive_queue(&conn.open_channel().unwrap());
    let hooked = Arc::new(AtomicUsize::new(0));
    let h = hooked.clone();
    let pool = ChannelPool::builder(&conn)
        .max(2)
        .confirm_select()
        .qos(5, false)
        .on_open(move |ch| {
            h.fetch_add(1, Ordering::SeqCst);
            assert_eq!(ch.next_publish_sequence(), 1, "confirm mode first");
            Ok(())
        })
        .build();
    assert_eq!(pool.max(), 2);
    let (a, b) = (pool.acquire().unwrap(), pool.acquire().unwrap());
    for ch in [&a, &b] {
        assert_eq!(ch.next_publish_sequence(), 1, "in confirm mode");
        // The borrower's own confirm_select and the same qos change nothing.
        ch.confirm_select().unwrap();
        ch.basic_qos(5, false).unwrap();
        ch.basic_publish_confirmed(
            "",
            &q,
            b"x",
            &BasicProperties::new(),
            &PublishOptions::default(),
        )
        .unwrap()
        .wait()
        .unwrap();
    }
    let ids = (a.id(), b.id());
    drop((a, b));
    let (c, d) = (pool.acquire().unwrap(), pool.acquire().unwrap());
    let mut again = [c.id(), d.id()];
    again.sort();
    let mut before = [ids.0, ids.1];
    before.sort();
    assert_eq!(again, before, "both reused");
    drop((c, d));
    assert_eq!(hooked.load(Ordering::SeqCst), 2, "once per channel opened");
    let s = pool.stats();
    assert_eq!((s.opened, s.discarded), (2, 0), "{s:?}");

    let failing = ChannelPool::builder(&conn)
        .on_open(|_| Err(Error::InvalidArgument("no".into())))
        .build();
    assert!(matches!(failing.acquire(), Err(Error::InvalidArgument(_))));
    let s = failing.stats();
    assert_eq!((s.opened, s.in_use, s.idle), (0, 0, 0), "{s:?}");
    conn.close().unwrap();
}

/// `ChannelPool::new` takes the default size.
#[test]
fn new_pool_has_the_default_size() {
    let conn = connect();
    assert_eq!(ChannelPool::new(&conn).max(), lepus::DEFAULT_POOL_SIZE);
    conn.close().unwrap();
}
