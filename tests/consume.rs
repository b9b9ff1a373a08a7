//! Consuming against the real broker: get, qos, consumer tags, exclusive consumers, ack/nack/reject, recover, cancel notifications, back-pressure, several receivers.

mod support;

use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, ConsumeOptions, Error, PublishOptions, QueueDeclareOptions,
    QueueDeleteOptions, RecvError, reply_code,
};
use support::fixtures::*;
use support::{Cleanup, connect, publish_confirmed, unique, wait_until};

#[test]
fn basic_get_some_none_and_message_count() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = temp_queue(&ch);
    assert!(ch.basic_get(&q, false).unwrap().is_none());
    for i in 0..3 {
        publish_confirmed(&ch, "", &q, format!("g{i}").as_bytes());
    }
    for i in 0..3u32 {
        let d = ch.basic_get(&q, false).unwrap().expect("a message");
        assert_eq!(d.body(), format!("g{i}").as_bytes());
        assert_eq!(d.message_count(), Some(2 - i));
        assert_eq!(d.delivery_tag(), u64::from(i) + 1);
        d.ack().unwrap();
    }
    assert!(ch.basic_get(&q, false).unwrap().is_none());
    // The acks were taken: nothing comes back when the channel closes.
    ch.close().unwrap();
    thread::sleep(QUIET); // an unacked message would be back by now
    assert_eq!(ready_count(&conn, &q), 0);
    conn.close().unwrap();
}

#[test]
fn basic_qos_limits_unacked_deliveries() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    ch.basic_qos(2, false).unwrap();
    for i in 0..5 {
        publish(&ch, "", &q, format!("q{i}").as_bytes());
    }
    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let a = consumer
        .recv_timeout(WAIT)
        .unwrap()
        .expect("a delivery in time");
    let b = consumer
        .recv_timeout(WAIT)
        .unwrap()
        .expect("a delivery in time");
    assert!(
        matches!(consumer.recv_timeout(QUIET), Ok(None)),
        "a third delivery arrived with prefetch 2"
    );
    a.ack().unwrap();
    let c = consumer
        .recv_timeout(WAIT)
        .unwrap()
        .expect("a delivery in time");
    assert_eq!(c.body(), b"q2");
    assert!(matches!(consumer.recv_timeout(QUIET), Ok(None)));
    b.ack().unwrap();
    c.ack().unwrap();
    assert_eq!(recv_body(&consumer), b"q3");
    conn.close().unwrap();
}

#[test]
fn consume_with_custom_and_server_tags() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let tag = unique("ctag");
    let custom = ch
        .basic_consume(
            &q,
            &ConsumeOptions {
                consumer_tag: tag.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(custom.tag(), tag);
    assert_eq!(custom.channel().id(), ch.id());
    publish(&ch, "", &q, b"to custom");
    let d = custom
        .recv_timeout(WAIT)
        .unwrap()
        .expect("a delivery in time");
    assert_eq!(d.body(), b"to custom");
    d.ack().unwrap();
    custom.cancel().unwrap();

    let server = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    assert!(server.tag().starts_with("amq.ctag-"), "{}", server.tag());
    publish(&ch, "", &q, b"to server-tagged");
    let d = server
        .recv_timeout(WAIT)
        .unwrap()
        .expect("a delivery in time");
    assert_eq!(d.body(), b"to server-tagged");
    d.ack().unwrap();
    // The cancelled consumer got nothing more.
    assert!(matches!(
        custom.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::ConsumerCancelled { .. }))
    ));
    conn.close().unwrap();
}

#[test]
fn second_exclusive_consumer_closes_only_its_channel() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let ex = ConsumeOptions {
        exclusive: true,
        ..Default::default()
    };
    let first = ch.basic_consume(&q, &ex).unwrap();
    let ch2 = conn.open_channel().unwrap();
    assert_channel_closed(
        ch2.basic_consume(&q, &ex),
        ch2.id(),
        reply_code::ACCESS_REFUSED,
    );
    assert!(!ch2.is_open());
    assert!(matches!(
        ch2.close_reason(),
        Some(Error::ServerClosedChannel { code: 403, .. })
    ));
    // A plain consumer is refused too while the exclusive one is there.
    let ch3 = conn.open_channel().unwrap();
    assert_channel_closed(
        ch3.basic_consume(&q, &ConsumeOptions::default()),
        ch3.id(),
        reply_code::ACCESS_REFUSED,
    );
    // The first consumer, its channel and the connection carry on.
    assert!(conn.is_open() && ch.is_open());
    let pubch = conn.open_channel().unwrap();
    publish(&pubch, "", &q, b"still works");
    assert_eq!(recv_body(&first), b"still works");
    conn.close().unwrap();
}

#[test]
fn no_ack_consumer_and_cancel() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let no_ack = ConsumeOptions {
        no_ack: true,
        ..Default::default()
    };

    // Unacked deliveries of an ack-mode consumer go back when its channel closes ...
    let ach = conn.open_channel().unwrap();
    let c = ach.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    for i in 0..3 {
        publish(&ch, "", &q, format!("a{i}").as_bytes());
    }
    for _ in 0..3 {
        c.recv_timeout(WAIT).unwrap().expect("a delivery in time");
    }
    ach.close().unwrap();
    assert!(matches!(
        c.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::ChannelClosed(_)))
    ));
    assert!(matches!(
        ach.basic_publish(
            "",
            &q,
            b"x",
            &BasicProperties::new(),
            &PublishOptions::default()
        ),
        Err(Error::ChannelClosed(_))
    ));
    drop(c);
    assert!(wait_until(WAIT, || ready_count(&conn, &q) == 3));

    // ... those of a no_ack consumer are gone once delivered.
    let nch = conn.open_channel().unwrap();
    let c = nch.basic_consume(&q, &no_ack).unwrap();
    let mut got: Vec<Vec<u8>> = (0..3).map(|_| recv_body(&c)).collect();
    got.sort();
    assert_eq!(got, vec![b"a0".to_vec(), b"a1".to_vec(), b"a2".to_vec()]);

    // cancel: queued deliveries can still be read, then the consumer reports its end
    // and nothing more reaches it.
    c.cancel().unwrap();
    c.cancel().unwrap(); // twice is fine
    match c.recv_timeout(WAIT) {
        Err(RecvError::Failed(Error::ConsumerCancelled { tag, .. })) => assert_eq!(tag, c.tag()),
        other => panic!("expected ConsumerCancelled, got {other:?}"),
    }
    publish(&ch, "", &q, b"after cancel");
    assert!(matches!(
        c.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::ConsumerCancelled { .. }))
    ));
    nch.close().unwrap();
    assert!(wait_until(WAIT, || ready_count(&conn, &q) == 1));
    let info = ch.queue_declare(&q, &passive()).unwrap();
    assert_eq!(info.consumer_count, 0);
    conn.close().unwrap();
}

#[test]
fn ack_nack_reject_with_multiple_and_requeue() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let pubch = conn.open_channel().unwrap();
    pubch.confirm_select().unwrap();
    for i in 0..7 {
        publish_confirmed(&pubch, "", &q, format!("m{i}").as_bytes());
    }
    ch.basic_qos(20, false).unwrap();
    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let d: Vec<_> = (0..7)
        .map(|_| {
            consumer
                .recv_timeout(WAIT)
                .unwrap()
                .expect("a delivery in time")
        })
        .collect();
    for (i, x) in d.iter().enumerate() {
        assert_eq!(x.body(), format!("m{i}").as_bytes());
        assert!(!x.redelivered());
    }
    d[1].ack_multiple().unwrap(); // m0, m1 acked
    d[3].nack_multiple(true).unwrap(); // m2, m3 requeued
    d[4].reject(false).unwrap(); // m4 dropped
    d[5].nack(false).unwrap(); // m5 dropped
    d[6].reject(true).unwrap(); // m6 requeued

    let mut again: Vec<_> = (0..3)
        .map(|_| {
            consumer
                .recv_timeout(WAIT)
                .unwrap()
                .expect("a delivery in time")
        })
        .collect();
    again.sort_by(|a, b| a.body().cmp(b.body()));
    let bodies: Vec<&[u8]> = again.iter().map(|x| x.body()).collect();
    assert_eq!(bodies, vec![&b"m2"[..], b"m3", b"m6"]);
    assert!(again.iter().all(|x| x.redelivered()));
    assert!(
        matches!(consumer.recv_timeout(QUIET), Ok(None)),
        "a dropped or acked message came back"
    );
    // Channel-level helpers by delivery tag, with multiple.
    let max_tag = again.iter().map(|x| x.delivery_tag()).max().unwrap();
    ch.basic_ack(max_tag, true).unwrap();
    consumer.cancel().unwrap();
    ch.close().unwrap();
    thread::sleep(QUIET); // an unacked message would be back by now
    assert_eq!(ready_count(&conn, &q), 0);

    // basic_nack / basic_reject by tag on a fresh channel.
    publish_confirmed(&pubch, "", &q, b"n");
    publish_confirmed(&pubch, "", &q, b"r");
    let ch = conn.open_channel().unwrap();
    let n = ch.basic_get(&q, false).unwrap().unwrap();
    let r = ch.basic_get(&q, false).unwrap().unwrap();
    ch.basic_reject(r.delivery_tag(), false).unwrap();
    ch.basic_nack(n.delivery_tag(), false, true).unwrap();
    let back = ch
        .basic_get(&q, false)
        .unwrap()
        .expect("nacked message requeued");
    assert_eq!(back.body(), b"n");
    assert!(back.redelivered());
    assert_eq!(
        back.message_count(),
        Some(0),
        "the rejected one was not requeued"
    );
    back.ack().unwrap();
    conn.close().unwrap();
}

#[test]
fn basic_recover_redelivers_unacked() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    publish(&ch, "", &q, b"r1");
    publish(&ch, "", &q, b"r2");
    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let first: Vec<_> = (0..2)
        .map(|_| {
            consumer
                .recv_timeout(WAIT)
                .unwrap()
                .expect("a delivery in time")
        })
        .collect();
    assert!(first.iter().all(|d| !d.redelivered()));
    ch.basic_recover(true).unwrap();
    let mut again: Vec<_> = (0..2)
        .map(|_| {
            consumer
                .recv_timeout(WAIT)
                .unwrap()
                .expect("a delivery in time")
        })
        .collect();
    again.sort_by(|a, b| a.body().cmp(b.body()));
    assert_eq!(again[0].body(), b"r1");
    assert_eq!(again[1].body(), b"r2");
    assert!(again.iter().all(|d| d.redelivered()));
    again[1].ack_multiple().unwrap();
    assert!(matches!(consumer.recv_timeout(QUIET), Ok(None)));
    conn.close().unwrap();
}

#[test]
fn deleting_the_queue_cancels_its_consumers() {
    let clean = Cleanup::new();
    let q = clean.queue(&unique("cancel-notify"));
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.queue_declare(&q, &QueueDeclareOptions::default())
        .unwrap();
    let c1 = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let ch2 = conn.open_channel().unwrap();
    let c2 = Arc::new(ch2.basic_consume(&q, &ConsumeOptions::default()).unwrap());

    // A thread iterates over the second consumer until it ends.
    let (tx, rx) = mpsc::channel();
    let it = c2.clone();
    thread::spawn(move || {
        let items: Vec<_> = it.iter().collect();
        let _ = tx.send(items);
    });

    let deleter = conn.open_channel().unwrap();
    assert_eq!(
        deleter
            .queue_delete(&q, &QueueDeleteOptions::default())
            .unwrap(),
        0
    );

    match c1.recv_timeout(WAIT) {
        Err(RecvError::Failed(Error::ConsumerCancelled { tag, .. })) => assert_eq!(tag, c1.tag()),
        other => panic!("expected ConsumerCancelled, got {other:?}"),
    }
    // It stays ended.
    assert!(matches!(
        c1.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::ConsumerCancelled { .. }))
    ));
    let items = rx.recv_timeout(WAIT).expect("the iterator ended");
    assert_eq!(items.len(), 1, "{items:?}");
    match &items[0] {
        Err(RecvError::Failed(Error::ConsumerCancelled { tag, .. })) => assert_eq!(tag, c2.tag()),
        other => panic!("expected ConsumerCancelled, got {other:?}"),
    }
    // The channels stay open.
    assert!(ch.is_open() && ch2.is_open());
    ch.queue_declare("", &exclusive()).unwrap();
    ch2.queue_declare("", &exclusive()).unwrap();
    conn.close().unwrap();
}

#[test]
fn slow_consumer_holds_deliveries_back_without_losing_any() {
    const N: usize = 5000;
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let pubch = conn.open_channel().unwrap();
    pubch.confirm_select().unwrap();
    for i in 0..N {
        publish(&pubch, "", &q, i.to_string().as_bytes());
    }
    pubch.wait_for_confirms().unwrap();
    // No prefetch limit and no acks: the broker pushes everything at once, the local
    // queue fills up to its bound, and the I/O thread stops reading.
    let consumer = no_ack_consumer(&ch, &q);
    assert!(wait_until(WAIT, || consumer.queued() >= 1000));
    thread::sleep(Duration::from_millis(200));
    let queued = consumer.queued();
    assert!(queued <= 1024, "the local queue grew to {queued}");
    for i in 0..N {
        let d = consumer
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("message {i}: {e}"))
            .unwrap_or_else(|| panic!("message {i} within {WAIT:?}"));
        assert_eq!(d.body(), i.to_string().as_bytes());
    }
    assert!(matches!(consumer.recv_timeout(QUIET), Ok(None)));
    // Reading resumed: the connection serves RPCs again.
    pubch.queue_declare(&q, &passive()).unwrap();
    conn.close().unwrap();
}

#[test]
fn consumers_on_one_channel_get_only_their_own_deliveries() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let (q1, q2) = (temp_queue(&ch), temp_queue(&ch));
    let c1 = ch.basic_consume(&q1, &ConsumeOptions::default()).unwrap();
    let c2 = ch.basic_consume(&q2, &ConsumeOptions::default()).unwrap();
    assert_ne!(c1.tag(), c2.tag());
    for i in 0..20 {
        publish(&ch, "", if i % 2 == 0 { &q1 } else { &q2 }, &[i]);
    }
    for i in 0..10u8 {
        let d1 = c1.recv_timeout(WAIT).unwrap().expect("a delivery in time");
        let d2 = c2.recv_timeout(WAIT).unwrap().expect("a delivery in time");
        assert_eq!((d1.body(), d1.routing_key()), (&[2 * i][..], q1.as_str()));
        assert_eq!(
            (d2.body(), d2.routing_key()),
            (&[2 * i + 1][..], q2.as_str())
        );
        d1.ack().unwrap();
        d2.ack().unwrap();
    }
    conn.close().unwrap();
}

#[test]
fn cancelling_or_dropping_a_full_consumer_does_not_wedge_the_connection() {
    const N: usize = 3000;
    let conn = connect();
    let pubch = conn.open_channel().unwrap();
    pubch.confirm_select().unwrap();
    let q = temp_queue(&pubch);
    for i in 0..N {
        publish(&pubch, "", &q, i.to_string().as_bytes());
    }
    pubch.wait_for_confirms().unwrap();

    // cancel() while the I/O thread waits for room in this consumer's queue.
    let ch = conn.open_channel().unwrap();
    let c = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    assert!(wait_until(WAIT, || c.queued() >= 1024));
    let t = Instant::now();
    c.cancel().expect("cancel of a full consumer");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    c.recv_timeout(WAIT)
        .expect("queued deliveries can still be read after cancel");
    drop(c);
    ch.close().unwrap(); // its unacked deliveries go back

    // drop() while the I/O thread waits for room in this consumer's queue.
    let ch = conn.open_channel().unwrap();
    let c = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    assert!(wait_until(WAIT, || c.queued() >= 1024));
    drop(c);
    pubch
        .with_timeout(Duration::from_secs(3))
        .queue_declare(&q, &passive())
        .expect("the connection still reads after the full consumer was dropped");
    ch.close().unwrap();
    // Nothing was lost: every message is back in the queue.
    assert!(
        wait_until(WAIT, || ready_count(&conn, &q) as usize == N),
        "{} of {N} ready",
        ready_count(&conn, &q)
    );
    conn.close().unwrap();
}

#[test]
fn every_thread_receiving_from_a_consumer_sees_its_channel_closed() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let consumer = Arc::new(ch.basic_consume(&q, &ConsumeOptions::default()).unwrap());
    let (tx, rx) = mpsc::channel();
    for _ in 0..3 {
        let (c, tx) = (consumer.clone(), tx.clone());
        thread::spawn(move || {
            let _ = tx.send(c.recv().map(|d| d.delivery_tag()));
        });
    }
    thread::sleep(Duration::from_millis(100));
    ch.basic_ack(9_999, false).unwrap(); // unknown tag: the broker closes the channel
    for _ in 0..3 {
        match rx.recv_timeout(WAIT).expect("every receiver wakes") {
            Err(RecvError::Failed(Error::ServerClosedChannel { code: 406, .. })) => {}
            other => panic!("expected the channel closed with 406, got {other:?}"),
        }
    }
    assert!(matches!(
        consumer.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::ServerClosedChannel {
            code: 406,
            ..
        }))
    ));
    assert!(conn.is_open());
    conn.close().unwrap();
}

/// `Connection::open_consumer` writes channel.open, basic.qos and basic.consume together:
/// the prefetch holds (no fourth delivery while three are unacked), an ack lets the next
/// one through, and every message arrives.
#[test]
fn open_consumer_applies_its_prefetch_and_consumes() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = temp_queue(&ch);
    for i in 0..8 {
        publish_confirmed(&ch, "", &q, format!("p{i}").as_bytes());
    }
    let consumer = conn
        .open_consumer(&q, 3, &ConsumeOptions::default())
        .unwrap();
    assert_ne!(consumer.channel().id(), ch.id());
    let mut held = Vec::new();
    for i in 0..3 {
        let d = consumer.recv_timeout(WAIT).unwrap().expect("a delivery");
        assert_eq!(d.body(), format!("p{i}").as_bytes());
        held.push(d);
    }
    assert!(
        consumer.recv_timeout(QUIET).unwrap().is_none(),
        "a fourth delivery while three are unacked: the prefetch of 3 was not applied"
    );
    held.remove(0).ack().unwrap();
    let d = consumer.recv_timeout(WAIT).unwrap().expect("the fourth");
    assert_eq!(d.body(), b"p3");
    held.push(d);
    for d in held.drain(..) {
        d.ack().unwrap();
    }
    for i in 4..8 {
        let d = consumer.recv_timeout(WAIT).unwrap().expect("a delivery");
        assert_eq!(d.body(), format!("p{i}").as_bytes());
        d.ack().unwrap();
    }
    assert!(wait_until(WAIT, || ready_count(&conn, &q) == 0));
    conn.close().unwrap();
}

/// A failing `open_consumer` leaves no channel behind: a bad argument is refused before
/// anything is sent, a missing queue closes the channel it opened (404), and the
/// connection goes on.
#[test]
fn open_consumer_failures_leave_no_channel() {
    let conn = connect();
    let before = conn.stats().channels;
    let long_tag = ConsumeOptions {
        consumer_tag: "t".repeat(256),
        ..Default::default()
    };
    let err = conn.open_consumer("any", 1, &long_tag).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert_eq!(
        conn.stats().channels,
        before,
        "nothing opened for a bad tag"
    );
    let missing = unique("missing");
    let err = conn
        .open_consumer(&missing, 1, &ConsumeOptions::default())
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(reply_code::NOT_FOUND), "{err:?}");
    assert!(
        wait_until(WAIT, || conn.stats().channels == before),
        "the failed consumer's channel is still open: {} channels, {before} before",
        conn.stats().channels
    );
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let consumer = conn
        .open_consumer(&q, 0, &ConsumeOptions::default())
        .unwrap();
    ch.confirm_select().unwrap();
    publish_confirmed(&ch, "", &q, b"after");
    assert_eq!(recv_body(&consumer), b"after");
    conn.close().unwrap();
}

/// A burst larger than many socket reads, already in the kernel's buffers when the
/// consumer starts, with nothing else to wake the I/O thread (no heartbeats; no acks):
/// every message arrives. A reactor that stopped reading before `WouldBlock` at a read
/// that filled its buffer (whose rest no new edge would announce) stalls this test.
#[test]
fn a_burst_already_buffered_is_read_to_the_end() {
    const N: usize = 40;
    const SIZE: usize = 200 * 1024;
    let conn = lepus::Connection::open_with(support::test_options().heartbeat(0)).unwrap();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = temp_queue(&ch);
    for i in 0..N {
        let mut body = support::pattern(SIZE, i as u64);
        body[0] = i as u8;
        publish(&ch, "", &q, &body);
    }
    ch.wait_for_confirms().unwrap();
    let consumer = no_ack_consumer(&ch, &q);
    for i in 0..N {
        let d = consumer
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap_or_else(|| panic!("message {i} of {N} did not arrive: reading stopped"));
        assert_eq!((d.body().len(), d.body()[0]), (SIZE, i as u8));
    }
    conn.close().unwrap();
}
