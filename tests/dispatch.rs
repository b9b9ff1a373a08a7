//! The dispatcher against the real broker: many consumers on two threads, each
//! consumer's deliveries handled in order and never two at once, every message acked
//! once; a consumer that ends leaves while the others go on; a graceful shutdown; a
//! reset link that recovery heals.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, Connection, ConsumeOptions, Dispatcher, Outcome, PublishOptions,
    RecoveryOptions, WorkerOptions,
};
use support::fixtures::*;
use support::{Cleanup, ClientOptions, connect, start_proxy, unique, wait_until};

/// `n` threads whose idle poll (a safety net that also ends a wait after a lost
/// wake-up) is a minute: in these tests a lost wake-up shows as a stall.
fn opts(n: usize) -> WorkerOptions {
    WorkerOptions::new(n).poll(Duration::from_secs(60))
}

/// `n` queues named after `name`, declared over `direct` and deleted at the end.
fn queues(direct: &Connection, cleanup: &Cleanup, name: &str, n: usize) -> Vec<String> {
    let ch = direct.open_channel().unwrap();
    let qs: Vec<String> = (0..n)
        .map(|i| cleanup.queue(&unique(&format!("{name}-{i}"))))
        .collect();
    for q in &qs {
        ch.queue_declare(q, &Default::default()).unwrap();
    }
    ch.close().unwrap();
    qs
}

/// A dispatcher of two threads serving a consumer of each of `qs` (prefetch 10) whose
/// handlers count what they handled and ack it.
fn counting(conn: &Connection, qs: &[String]) -> (Dispatcher, Arc<AtomicU32>) {
    let dispatcher = Dispatcher::new(&opts(2)).unwrap();
    let handled = Arc::new(AtomicU32::new(0));
    for q in qs {
        let c = conn
            .open_consumer(q, 10, &ConsumeOptions::default())
            .unwrap();
        let h = handled.clone();
        dispatcher
            .add(c, move |_| {
                h.fetch_add(1, Ordering::SeqCst);
                Outcome::Ack
            })
            .unwrap();
    }
    (dispatcher, handled)
}

/// What the handlers of one consumer saw: the ids in the order handled, and whether two
/// ran at once.
#[derive(Default)]
struct Seen {
    ids: Mutex<Vec<u32>>,
    inside: AtomicBool,
    overlapped: AtomicU32,
    out_of_order: AtomicU32,
}

impl Seen {
    fn handle(&self, id: u32) {
        if self.inside.swap(true, Ordering::SeqCst) {
            self.overlapped.fetch_add(1, Ordering::SeqCst);
        }
        self.ids.lock().unwrap().push(id);
        // A little work, so that the threads' turns overlap.
        if id.is_multiple_of(50) {
            thread::sleep(Duration::from_millis(1));
        }
        self.inside.store(false, Ordering::SeqCst);
    }
}

#[test]
fn many_consumers_on_two_threads_each_in_order_and_one_at_a_time_every_message_acked_once() {
    const CONSUMERS: usize = 40;
    const N: u32 = 150;
    let direct = connect();
    let cleanup = Cleanup::new();
    let qs = queues(&direct, &cleanup, "dispatch-order", CONSUMERS);
    let conn = connect();
    let dispatcher = Dispatcher::new(&opts(2)).unwrap();
    let seen: Vec<Arc<Seen>> = (0..CONSUMERS).map(|_| Arc::default()).collect();
    for (q, s) in qs.iter().zip(&seen) {
        let c = conn
            .open_consumer(q, 20, &ConsumeOptions::default())
            .unwrap();
        let s = s.clone();
        // The handler's own state (it runs on one thread at a time): the id it expects.
        let mut next = 0;
        dispatcher
            .add(c, move |d| {
                let id = id_of(d.body());
                if id != next {
                    s.out_of_order.fetch_add(1, Ordering::SeqCst);
                }
                next = id + 1;
                s.handle(id);
                Outcome::Ack
            })
            .unwrap();
    }
    assert_eq!(dispatcher.len(), CONSUMERS);
    // Published while the consumers run: the deliveries of the forty queues interleave.
    let pch = direct.open_channel().unwrap();
    pch.confirm_select().unwrap();
    for id in 0..N {
        for q in &qs {
            pch.basic_publish(
                "",
                q,
                &id.to_be_bytes(),
                &BasicProperties::new(),
                &PublishOptions::default(),
            )
            .unwrap();
        }
    }
    pch.wait_for_confirms().unwrap();
    let total = CONSUMERS as u64 * u64::from(N);
    assert!(
        wait_until(Duration::from_secs(60), || dispatcher.stats().acked
            == total),
        "{:?}",
        dispatcher.stats()
    );
    for (i, s) in seen.iter().enumerate() {
        let ids = s.ids.lock().unwrap();
        assert!(
            ids.iter().copied().eq(0..N),
            "consumer {i}: not each id once in order: {} ids, first {:?}",
            ids.len(),
            &ids[..ids.len().min(10)]
        );
        assert_eq!(
            s.overlapped.load(Ordering::SeqCst),
            0,
            "consumer {i}: two at once"
        );
        assert_eq!(
            s.out_of_order.load(Ordering::SeqCst),
            0,
            "consumer {i}: out of order in the handler's own count"
        );
    }
    let stats = dispatcher.shutdown(WAIT);
    assert_eq!(stats.acked, total, "{stats:?}");
    assert_eq!(
        (
            stats.requeued,
            stats.rejected,
            stats.bad,
            stats.settle_failed,
            stats.left_requeued
        ),
        (0, 0, 0, 0, 0),
        "{stats:?}"
    );
    assert!(stats.cancel_error.is_none(), "{stats:?}");
    // Every ack reached the broker: with the consumers' connection closed, whatever
    // was left unacknowledged would be ready again.
    conn.close().unwrap();
    for q in &qs {
        assert_eq!(ready_count(&direct, q), 0, "{q} not empty");
    }
    direct.close().unwrap();
}

#[test]
fn handler_outcomes_and_panics_settle_as_in_a_worker_pool() {
    let direct = connect();
    let cleanup = Cleanup::new();
    let qs = queues(&direct, &cleanup, "dispatch-outcomes", 2);
    let conn = connect();
    let dispatcher = Dispatcher::new(&opts(2)).unwrap();
    for q in &qs {
        let c = conn
            .open_consumer(q, 10, &ConsumeOptions::default())
            .unwrap();
        dispatcher
            .add(c, |d| match id_of(d.body()) % 4 {
                0 => Outcome::Ack,
                1 => Outcome::Reject,
                2 => panic!("deliberate: a handler's panic fails its message only"),
                _ => Outcome::Ack,
            })
            .unwrap();
    }
    let pch = direct.open_channel().unwrap();
    pch.confirm_select().unwrap();
    for q in &qs {
        publish_ids(&pch, q, 0..40);
    }
    assert!(
        wait_until(Duration::from_secs(20), || {
            let s = dispatcher.stats();
            s.acked + s.rejected == 80
        }),
        "{:?}",
        dispatcher.stats()
    );
    let stats = dispatcher.shutdown(WAIT);
    // Ids 0 and 3 of every four acked, 1 rejected, 2 panicked (rejected by default).
    assert_eq!(
        (stats.acked, stats.rejected, stats.panicked),
        (40, 40, 20),
        "{stats:?}"
    );
    for q in &qs {
        assert!(wait_until(WAIT, || ready_count(&direct, q) == 0));
    }
    conn.close().unwrap();
    direct.close().unwrap();
}

#[test]
fn a_consumer_that_ends_leaves_and_the_others_go_on() {
    let direct = connect();
    let cleanup = Cleanup::new();
    let qs = queues(&direct, &cleanup, "dispatch-end", 3);
    let conn = connect();
    let (dispatcher, handled) = counting(&conn, &qs);
    // The broker cancels the consumer of a deleted queue: it ends for good.
    let ch = direct.open_channel().unwrap();
    ch.queue_delete(&qs[0], &Default::default()).unwrap();
    assert!(
        wait_until(WAIT, || dispatcher.len() == 2),
        "still {}",
        dispatcher.len()
    );
    ch.confirm_select().unwrap();
    for q in &qs[1..] {
        publish_ids(&ch, q, 0..25);
    }
    assert!(wait_until(WAIT, || handled.load(Ordering::SeqCst) == 50));
    assert!(conn.is_open());
    // Closing the connection ends the others: they leave too.
    conn.close().unwrap();
    assert!(
        wait_until(WAIT, || dispatcher.is_empty()),
        "still {}",
        dispatcher.len()
    );
    let stats = dispatcher.shutdown(WAIT);
    assert_eq!(stats.acked, 50, "{stats:?}");
    direct.close().unwrap();
}

#[test]
fn shutdown_cancels_every_consumer_and_requeues_what_is_left() {
    const PER_QUEUE: u32 = 100;
    let direct = connect();
    let cleanup = Cleanup::new();
    let qs = queues(&direct, &cleanup, "dispatch-shutdown", 4);
    let pch = direct.open_channel().unwrap();
    pch.confirm_select().unwrap();
    for q in &qs {
        publish_ids(&pch, q, 0..PER_QUEUE);
    }
    let conn = connect();
    let dispatcher = Dispatcher::new(&opts(2)).unwrap();
    let handled = Arc::new(AtomicU32::new(0));
    let consumers: Vec<_> = qs
        .iter()
        .map(|q| {
            conn.open_consumer(q, 50, &ConsumeOptions::default())
                .unwrap()
        })
        .collect();
    // Every local queue holds its prefetch before the handlers start.
    assert!(wait_until(WAIT, || consumers
        .iter()
        .all(|c| c.queued() == 50)));
    for c in consumers {
        let h = handled.clone();
        dispatcher
            .add(c, move |_| {
                h.fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(5));
                Outcome::Ack
            })
            .unwrap();
    }
    assert!(wait_until(WAIT, || handled.load(Ordering::SeqCst) >= 10));
    let t0 = Instant::now();
    let stats = dispatcher.shutdown(WAIT);
    assert!(t0.elapsed() < WAIT, "no handler is stuck");
    assert_eq!(stats.unfinished, 0, "{stats:?}");
    assert!(stats.cancel_error.is_none(), "{stats:?}");
    assert!(stats.left_requeued > 0, "{stats:?}");
    assert_eq!(
        stats.acked,
        u64::from(handled.load(Ordering::SeqCst)),
        "{stats:?}"
    );
    // What was not acked is back in the queues: nothing lost, nothing acked twice.
    let total = u64::from(PER_QUEUE) * qs.len() as u64;
    assert!(
        wait_until(WAIT, || {
            let ready: u64 = qs.iter().map(|q| u64::from(ready_count(&direct, q))).sum();
            ready + stats.acked == total
        }),
        "{stats:?}"
    );
    conn.close().unwrap();
    direct.close().unwrap();
}

#[test]
fn a_dispatcher_refuses_a_no_ack_consumer() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let no_ack = ConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let consumer = ch.basic_consume(&q, &no_ack).unwrap();
    let dispatcher = Dispatcher::new(&opts(1)).unwrap();
    let r = dispatcher.add(consumer, |_| Outcome::Ack);
    assert!(matches!(r, Err(lepus::Error::InvalidArgument(_))), "{r:?}");
    assert!(dispatcher.is_empty());
    assert!(ch.is_open());
    conn.close().unwrap();
}

#[test]
fn a_dispatcher_goes_on_across_a_reset_link() {
    const CONSUMERS: usize = 10;
    const N: u32 = 200;
    let proxy = start_proxy();
    let conn = Connection::open_with(proxy.options().recovery(
        RecoveryOptions::new().backoff(Duration::from_millis(50), Duration::from_secs(1)),
    ))
    .unwrap();
    let direct = connect();
    let cleanup = Cleanup::new();
    let qs = queues(&direct, &cleanup, "dispatch-rst", CONSUMERS);
    let pch = direct.open_channel().unwrap();
    pch.confirm_select().unwrap();
    for q in &qs {
        publish_ids(&pch, q, 0..N);
    }
    let dispatcher = Dispatcher::new(&opts(2)).unwrap();
    let handled: Arc<Vec<Vec<AtomicU32>>> = Arc::new(
        (0..CONSUMERS)
            .map(|_| (0..N).map(|_| AtomicU32::new(0)).collect())
            .collect(),
    );
    let total = Arc::new(AtomicU32::new(0));
    let hold = Arc::new(AtomicBool::new(true));
    let half = CONSUMERS as u32 * N / 2;
    for (i, q) in qs.iter().enumerate() {
        let c = conn
            .open_consumer(q, 30, &ConsumeOptions::default())
            .unwrap();
        let (h, t, g) = (handled.clone(), total.clone(), hold.clone());
        dispatcher
            .add(c, move |d| {
                h[i][id_of(d.body()) as usize].fetch_add(1, Ordering::SeqCst);
                // Past half-way the handlers wait for the reset: it comes mid-way,
                // whatever the machine's pace.
                if t.fetch_add(1, Ordering::SeqCst) >= half {
                    let until = Instant::now() + WAIT;
                    while g.load(Ordering::SeqCst) && Instant::now() < until {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                Outcome::Ack
            })
            .unwrap();
    }
    assert!(wait_until(Duration::from_secs(20), || total
        .load(Ordering::SeqCst)
        > half));
    assert_eq!(proxy.reset(), 1, "one link to reset");
    hold.store(false, Ordering::SeqCst);
    // Every id of every queue is handled at least once (those whose ack was lost with
    // the link come again), and the queues end empty.
    assert!(
        wait_until(Duration::from_secs(30), || handled
            .iter()
            .flatten()
            .all(|c| c.load(Ordering::SeqCst) > 0)
            && qs.iter().all(|q| ready_count(&direct, q) == 0)),
        "stuck: {:?}",
        dispatcher.stats()
    );
    let stats = dispatcher.shutdown(WAIT);
    assert_eq!(proxy.connections(), 2, "exactly one reconnect");
    assert_eq!(stats.unfinished, 0, "{stats:?}");
    // The lost link's deliveries waiting in the local queues were skipped, not handled.
    assert!(stats.stale > 0, "{stats:?}");
    let again: u32 = handled
        .iter()
        .flatten()
        .map(|c| c.load(Ordering::SeqCst) - 1)
        .sum();
    // Handled twice: at most what was in a handler (2) or acked but not yet written
    // at the reset.
    assert!(
        u64::from(again) <= stats.settle_failed + 32,
        "handled twice: {again}, {stats:?}"
    );
    conn.close().unwrap();
    direct.close().unwrap();
}

/// Messages that come one at a time, each after the previous was handled: every one
/// wakes a sleeping thread. With the idle poll at a minute, a wake-up lost on the way
/// (the I/O thread's owed wake-up, paid at the end of its turn) shows as a stall.
#[test]
fn a_trickle_of_messages_wakes_the_sleeping_threads_every_time() {
    let direct = connect();
    let cleanup = Cleanup::new();
    let qs = queues(&direct, &cleanup, "dispatch-trickle", 3);
    let conn = connect();
    let (dispatcher, handled) = counting(&conn, &qs);
    let pch = direct.open_channel().unwrap();
    pch.confirm_select().unwrap();
    for i in 0..30u32 {
        publish_ids(&pch, &qs[i as usize % qs.len()], 0..1);
        assert!(
            wait_until(WAIT, || handled.load(Ordering::SeqCst) == i + 1),
            "message {i} not handled: {:?}",
            dispatcher.stats()
        );
    }
    // A consumer that leaves between a delivery's quiet queueing and the I/O thread's
    // payment must not leave the wake-up unpaid for the others.
    let ch = direct.open_channel().unwrap();
    ch.queue_delete(&qs[0], &Default::default()).unwrap();
    assert!(wait_until(WAIT, || dispatcher.len() == 2));
    for i in 30..40u32 {
        publish_ids(&pch, &qs[1 + i as usize % 2], 0..1);
        assert!(
            wait_until(WAIT, || handled.load(Ordering::SeqCst) == i + 1),
            "message {i} not handled after a consumer left: {:?}",
            dispatcher.stats()
        );
    }
    let stats = dispatcher.shutdown(WAIT);
    assert_eq!(stats.acked, 40, "{stats:?}");
    conn.close().unwrap();
    direct.close().unwrap();
}

/// Dropped without a shutdown: the threads stop after the handlers in flight, the
/// consumers are cancelled and what was queued locally goes back to the broker.
#[test]
fn a_dropped_dispatcher_stops_and_gives_back_what_it_did_not_handle() {
    const N: u32 = 100;
    let direct = connect();
    let cleanup = Cleanup::new();
    let qs = queues(&direct, &cleanup, "dispatch-drop", 2);
    let pch = direct.open_channel().unwrap();
    pch.confirm_select().unwrap();
    for q in &qs {
        publish_ids(&pch, q, 0..N);
    }
    let conn = connect();
    let dispatcher = Dispatcher::new(&opts(2)).unwrap();
    let entered = Arc::new(AtomicU32::new(0));
    let returned = Arc::new(AtomicU32::new(0));
    let hold = Arc::new(AtomicBool::new(true));
    for q in &qs {
        let c = conn
            .open_consumer(q, 20, &ConsumeOptions::default())
            .unwrap();
        let (e, r, h) = (entered.clone(), returned.clone(), hold.clone());
        dispatcher
            .add(c, move |_| {
                e.fetch_add(1, Ordering::SeqCst);
                let until = Instant::now() + WAIT;
                while h.load(Ordering::SeqCst) && Instant::now() < until {
                    thread::sleep(Duration::from_millis(1));
                }
                r.fetch_add(1, Ordering::SeqCst);
                Outcome::Ack
            })
            .unwrap();
    }
    // Both threads are in a handler.
    assert!(wait_until(WAIT, || entered.load(Ordering::SeqCst) == 2));
    drop(dispatcher);
    hold.store(false, Ordering::SeqCst);
    assert!(wait_until(WAIT, || returned.load(Ordering::SeqCst) == 2));
    // The two in flight were acked; nothing else was handled, and the rest is back.
    let total = 2 * N;
    assert!(
        wait_until(WAIT, || {
            let ready: u32 = qs.iter().map(|q| ready_count(&direct, q)).sum();
            ready == total - 2
        }),
        "handled {}",
        returned.load(Ordering::SeqCst)
    );
    assert_eq!(
        entered.load(Ordering::SeqCst),
        2,
        "no handler ran after the drop"
    );
    conn.close().unwrap();
    direct.close().unwrap();
}
