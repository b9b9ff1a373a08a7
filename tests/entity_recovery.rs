//! Recovery entity by entity against the test broker (through the fault proxy, whose
//! reset forces a recovery): a failing declaration costs only itself and is retried in
//! the background; the topology filter; transaction mode restored; an auto-delete queue
//! whose last consumer was cancelled is not declared again.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, Connection, ConsumeOptions, FieldValue, PublishOptions, QueueDeclareOptions,
    RecoveryEvent, RecoveryEventKind, RecoveryOptions, TopologyEntity,
};
use support::fixtures::*;
use support::{
    Cleanup, ClientOptions, connect, publish_confirmed, start_proxy, test_options, unique,
    wait_until,
};

fn recovered_after(conn: &Connection, t: Instant) -> bool {
    conn.recovery_events()
        .iter()
        .any(|e| e.kind == RecoveryEventKind::Recovered && e.at > t)
}

fn with_ttl(ms: i64) -> QueueDeclareOptions {
    QueueDeclareOptions {
        arguments: args(&[("x-message-ttl", FieldValue::from(ms))]),
        ..Default::default()
    }
}

#[test]
fn a_failing_queue_does_not_block_the_rest_and_is_retried() {
    let clean = Cleanup::new();
    let bad = clean.queue(&unique("inequivalent"));
    let good = clean.queue(&unique("good"));
    let fwd = start_proxy();
    let events: Arc<Mutex<Vec<RecoveryEvent>>> = Arc::default();
    let ev = events.clone();
    let conn = Connection::open_with(
        fwd.options().recovery(
            RecoveryOptions::new()
                .backoff(Duration::from_millis(50), Duration::from_millis(300))
                .listener(move |e| ev.lock().unwrap().push(e.clone())),
        ),
    )
    .unwrap();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    ch.queue_declare(&bad, &with_ttl(60_000)).unwrap();
    ch.queue_declare(&good, &QueueDeclareOptions::default())
        .unwrap();
    ch.queue_bind(&good, "amq.direct", &good, &no_args())
        .unwrap();
    let consumer = conn
        .open_channel()
        .unwrap()
        .basic_consume(&good, &ConsumeOptions::default())
        .unwrap();
    // Someone else replaces `bad` with other arguments: declaring it again fails (406).
    let other = connect();
    let och = other.open_channel().unwrap();
    och.queue_delete(&bad, &Default::default()).unwrap();
    och.queue_declare(&bad, &with_ttl(1_000)).unwrap();

    let t = Instant::now();
    assert!(fwd.reset() >= 1);
    assert!(wait_until(Duration::from_secs(10), || recovered_after(
        &conn, t
    )));
    let failed: Vec<_> = events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match &e.kind {
            RecoveryEventKind::EntityFailed { entity, error } => {
                Some((entity.clone(), error.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, TopologyEntity::Queue(bad.clone()));
    assert!(failed[0].1.contains("406"), "{failed:?}");
    // The rest recovered: binding, consumer, confirm mode.
    let n = ch
        .publish_reliably(
            "amq.direct",
            &good,
            b"after",
            &BasicProperties::default(),
            &PublishOptions::default(),
            Instant::now() + WAIT,
        )
        .unwrap();
    assert_eq!(n, 1);
    // The consumer first hears of the lost link (a passing notice), then the message.
    let body = loop {
        match consumer.recv_timeout(WAIT) {
            Ok(Some(d)) => break d.into_body(),
            Ok(None) => panic!("no delivery within {WAIT:?}"),
            Err(lepus::RecvError::Failed(e)) if e.is_connection_lost() => {}
            Err(e) => panic!("consumer: {e:?}"),
        }
    };
    assert_eq!(body, b"after");

    // Once the other declaration is gone, the retry declares ours again.
    och.queue_delete(&bad, &Default::default()).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        events.lock().unwrap().iter().any(|e| {
            e.kind == RecoveryEventKind::EntityRecovered(TopologyEntity::Queue(bad.clone()))
        })
    }));
    // With our arguments: declaring it with them again is accepted.
    och.queue_declare(&bad, &with_ttl(60_000)).unwrap();
}

#[test]
fn filter_tx_mode_and_forgotten_auto_delete_queue() {
    let clean = Cleanup::new();
    let excluded = unique("excluded");
    let kept = unique("kept");
    let auto = clean.queue(&unique("auto-delete"));
    let fwd = start_proxy();
    let ex = excluded.clone();
    let conn = Connection::open_with(
        fwd.options().recovery(
            RecoveryOptions::new()
                .backoff(Duration::from_millis(50), Duration::from_millis(300))
                .topology_filter(move |e| *e != TopologyEntity::Queue(ex.clone())),
        ),
    )
    .unwrap();
    let ch = conn.open_channel().unwrap();
    ch.queue_declare(&excluded, &exclusive()).unwrap();
    ch.queue_declare(&kept, &exclusive()).unwrap();
    let auto_delete = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    ch.queue_declare(&auto, &auto_delete).unwrap();
    let c = ch.basic_consume(&auto, &ConsumeOptions::default()).unwrap();
    c.cancel().unwrap();
    let tx = conn.open_channel().unwrap();
    tx.tx_select().unwrap();

    let t = Instant::now();
    assert!(fwd.reset() >= 1);
    assert!(wait_until(Duration::from_secs(10), || recovered_after(
        &conn, t
    )));
    let probe = conn.open_channel().unwrap();
    probe.queue_declare(&kept, &passive()).unwrap();
    let err = conn
        .open_channel()
        .unwrap()
        .queue_declare(&excluded, &passive())
        .unwrap_err();
    assert_eq!(
        err.reply_code(),
        Some(404),
        "the filter left it out: {err:?}"
    );
    let other = connect();
    let err = other
        .open_channel()
        .unwrap()
        .queue_declare(&auto, &passive())
        .unwrap_err();
    assert_eq!(
        err.reply_code(),
        Some(404),
        "auto-delete queue came back: {err:?}"
    );
    // Still transactional: commit is refused (406) on a channel not in tx mode.
    publish(&tx, "", &kept, b"in a transaction");
    tx.tx_commit().unwrap();
    assert!(
        !conn
            .recovery_events()
            .iter()
            .any(|e| matches!(e.kind, RecoveryEventKind::EntityFailed { .. }))
    );
}

/// A thread waiting on a confirmation keeps waiting through the recovery and gets the
/// republished copy's outcome (not `ConnectionLost`); so does `wait_for_confirms`.
#[test]
fn a_confirmation_waiter_follows_the_republished_copy() {
    let clean = Cleanup::new();
    let q = clean.queue(&unique("republished"));
    let fwd = start_proxy();
    let conn = Connection::open_with(fwd.options().heartbeat(0).recovery(
        RecoveryOptions::new().backoff(Duration::from_millis(50), Duration::from_millis(300)),
    ))
    .unwrap();
    let ch = conn.open_channel().unwrap();
    ch.queue_declare(&q, &QueueDeclareOptions::default())
        .unwrap();
    ch.confirm_select().unwrap();
    // Held back: the broker never sees it on this connection.
    fwd.partition();
    let c = ch
        .basic_publish_confirmed(
            "",
            &q,
            b"held",
            &BasicProperties::default(),
            &PublishOptions::default(),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let waiter = std::thread::spawn(move || c.wait_until(deadline));
    let ch2 = ch.clone();
    let all = std::thread::spawn(move || ch2.wait_for_confirms());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished() && !all.is_finished());
    let t = Instant::now();
    fwd.reset();
    fwd.heal();
    waiter.join().unwrap().expect("acked");
    all.join().unwrap().expect("wait_for_confirms: all acked");
    assert!(recovered_after(&conn, t));
    assert!(conn.generation() > 1);
    assert!(conn.recovery_events().iter().any(|e| matches!(
        e.kind,
        RecoveryEventKind::ConsumersRestored { republished, .. } if republished >= 1
    )));
    // The broker has the message exactly once here (it never saw the first copy).
    assert_eq!(ready_count(&connect(), &q), 1);
}

/// A consumer the broker cancelled (its queue deleted), whose channel the broker then
/// closed (a passive declare of the missing queue on it: 404), comes back when the queue
/// does: the background retry reopens the channel under its id and subscribes the same
/// handle again.
#[test]
fn a_cancelled_consumer_on_a_channel_the_broker_closed_comes_back() {
    let Cancelled {
        _clean,
        q,
        events,
        _conn,
        ch,
        consumer,
        other: _other,
        och,
    } = cancelled_consumer("closed-under-consumer", 300);
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let closed_by = ch.queue_declare(&q, &passive).unwrap_err();
    assert!(closed_by.to_string().contains("404"), "{closed_by}");
    assert!(!ch.is_open(), "the broker closed the consumer's channel");
    // The retry probes the missing queue a few times meanwhile.
    std::thread::sleep(Duration::from_millis(500));
    let back = Instant::now();
    och.queue_declare(&q, &QueueDeclareOptions::default())
        .unwrap();
    wait_resubscribed(&events, &q);
    let back_ms = back.elapsed().as_millis();
    assert!(ch.is_open(), "the channel is open again");
    assert!(consumer.channel().is_open());
    receives_ten_in_order(&och, &q, &consumer);
    eprintln!(
        "COUNTS cancelled_consumer_on_a_closed_channel: published=10 confirmed=10 consumed=10 \
         lost=0 duplicates=0 back_after_redeclare_ms={back_ms}"
    );
}

/// A consumer the broker cancelled whose re-subscribe itself closes its channel (here the
/// queue is back but another connection consumes it exclusively: basic.consume gets 403
/// ACCESS_REFUSED, which closes the channel): each later retry reopens the channel under
/// its id and subscribes again, and once the exclusive consumer is gone the same handle
/// receives.
#[test]
fn a_resubscribe_that_closes_its_channel_is_retried_on_a_reopened_channel() {
    let Cancelled {
        _clean,
        q,
        events,
        _conn,
        ch,
        consumer,
        other,
        och,
    } = cancelled_consumer("resubscribe-403", 200);
    // The queue is back, but someone else holds it exclusively.
    och.queue_declare(&q, &QueueDeclareOptions::default())
        .unwrap();
    let exclusive = other
        .open_channel()
        .unwrap()
        .basic_consume(
            &q,
            &ConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !ch.is_open()),
        "the failed re-subscribe did not close the channel"
    );
    // A few retries, each on a reopened channel that the 403 closes again.
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !events.lock().unwrap().iter().any(|e| matches!(
            &e.kind,
            RecoveryEventKind::EntityRecovered(TopologyEntity::Consumer { .. })
        )),
        "subscribed while another consumer holds the queue exclusively?"
    );
    let released = Instant::now();
    exclusive.cancel().unwrap();
    wait_resubscribed(&events, &q);
    let back_ms = released.elapsed().as_millis();
    assert!(ch.is_open(), "the channel is open again");
    receives_ten_in_order(&och, &q, &consumer);
    eprintln!(
        "COUNTS resubscribe_closing_its_channel: published=10 confirmed=10 consumed=10 lost=0 \
         duplicates=0 back_after_the_exclusive_consumer_left_ms={back_ms}"
    );
}

/// A consumer subscribed on its own connection (recovery resubscribes cancelled
/// consumers; events collected by the listener), whose queue another connection
/// (`other`, channel `och`) deleted: the broker's cancel has been received.
struct Cancelled {
    _clean: Cleanup,
    q: String,
    events: Arc<Mutex<Vec<RecoveryEvent>>>,
    _conn: Connection,
    ch: lepus::Channel,
    consumer: lepus::Consumer,
    other: Connection,
    och: lepus::Channel,
}

fn cancelled_consumer(prefix: &str, max_backoff_ms: u64) -> Cancelled {
    let clean = Cleanup::new();
    let q = clean.queue(&unique(prefix));
    let events: Arc<Mutex<Vec<RecoveryEvent>>> = Arc::default();
    let ev = events.clone();
    let conn = Connection::open_with(
        test_options().recovery(
            RecoveryOptions::new()
                .backoff(
                    Duration::from_millis(50),
                    Duration::from_millis(max_backoff_ms),
                )
                .resubscribe_cancelled_consumers(true)
                .listener(move |e| ev.lock().unwrap().push(e.clone())),
        ),
    )
    .unwrap();
    let ch = conn.open_channel().unwrap();
    ch.queue_declare(&q, &QueueDeclareOptions::default())
        .unwrap();
    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let other = connect();
    let och = other.open_channel().unwrap();
    och.queue_delete(&q, &Default::default()).unwrap();
    match consumer.recv_timeout(Duration::from_secs(10)) {
        Err(lepus::RecvError::Failed(lepus::Error::ConsumerCancelled { .. })) => {}
        r => panic!("expected the broker's cancel, got {r:?}"),
    }
    Cancelled {
        _clean: clean,
        q,
        events,
        _conn: conn,
        ch,
        consumer,
        other,
        och,
    }
}

/// Within 20 s, an event says the consumer of `q` was subscribed again.
fn wait_resubscribed(events: &Mutex<Vec<RecoveryEvent>>, q: &str) {
    let resubscribed = wait_until(Duration::from_secs(20), || {
        events.lock().unwrap().iter().any(|e| {
            matches!(&e.kind, RecoveryEventKind::EntityRecovered(TopologyEntity::Consumer { queue, .. }) if queue == q)
        })
    });
    assert!(
        resubscribed,
        "the consumer was not subscribed again within 20 s"
    );
}

/// Ten confirmed publishes to `q` reach `consumer` (the same handle), once each, in order.
fn receives_ten_in_order(och: &lepus::Channel, q: &str, consumer: &lepus::Consumer) {
    och.confirm_select().unwrap();
    for i in 0..10 {
        publish_confirmed(och, "", q, format!("m{i}").as_bytes());
    }
    let mut got = Vec::new();
    for _ in 0..10 {
        let d = consumer
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("a delivery within 10 s");
        got.push(String::from_utf8_lossy(d.body()).into_owned());
        d.ack().unwrap();
    }
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(
        got, want,
        "the same handle receives every message once, in order"
    );
}
