//! Channels against the real broker: one closed by the broker leaves the others working; a call past its deadline leaves its channel usable.

mod support;

use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, Connection, ConsumeOptions, Error, PublishOptions, RecoveryOptions, reply_code,
};
use support::fixtures::*;
use support::{ClientOptions, connect, publish_confirmed, start_proxy, unique, wait_until};

#[test]
fn broker_closing_a_channel_leaves_the_others_working() {
    let conn = connect();
    let good = conn.open_channel().unwrap();
    let q = temp_queue(&good);
    let consumer = good.basic_consume(&q, &ConsumeOptions::default()).unwrap();

    // 404 on a passive declare of a missing queue.
    let bad = conn.open_channel().unwrap();
    let missing = unique("missing");
    match bad.queue_declare(&missing, &passive()) {
        Err(Error::ServerClosedChannel {
            channel,
            code,
            text,
            class_id,
            method_id,
        }) => {
            assert_eq!(channel, bad.id());
            assert_eq!(code, reply_code::NOT_FOUND);
            assert!(text.contains(&missing), "{text}");
            assert_eq!((class_id, method_id), (50, 10), "queue.declare");
        }
        other => panic!("expected 404, got {other:?}"),
    }
    assert!(!bad.is_open());
    assert!(matches!(
        bad.close_reason(),
        Some(Error::ServerClosedChannel { code: 404, .. })
    ));
    // Later calls on it fail with the same reason, without reaching the broker.
    assert_channel_closed(bad.queue_declare("", &exclusive()), bad.id(), 404);
    assert_channel_closed(
        bad.basic_publish(
            "",
            &q,
            b"x",
            &BasicProperties::new(),
            &PublishOptions::default(),
        ),
        bad.id(),
        404,
    );
    bad.close().expect("closing a closed channel is fine");

    assert!(conn.is_open() && good.is_open());
    publish(&good, "", &q, b"after 404");
    let d = consumer
        .recv_timeout(WAIT)
        .unwrap()
        .expect("a delivery in time");
    assert_eq!(d.body(), b"after 404");

    // 406 on a double ack.
    let acker = conn.open_channel().unwrap();
    publish(&good, "", &q, b"unused"); // goes to the consumer
    let q2 = temp_queue(&good);
    publish(&good, "", &q2, b"ack me twice");
    let m = get_eventually(&acker, &q2, false);
    m.ack().unwrap();
    // The delivery's handle settles once: a second ack is refused without a frame.
    assert!(
        matches!(m.ack(), Err(Error::AlreadySettled { delivery_tag }) if delivery_tag == m.delivery_tag())
    );
    assert!(acker.is_open());
    // By tag on the channel it is sent; the broker answers with channel.close.
    acker.basic_ack(m.delivery_tag(), false).unwrap();
    assert_channel_closed(
        acker.queue_declare(&q2, &passive()),
        acker.id(),
        reply_code::PRECONDITION_FAILED,
    );
    assert!(!acker.is_open());

    // Everything else carries on.
    assert!(conn.is_open() && good.is_open());
    d.ack().unwrap();
    let d = consumer
        .recv_timeout(WAIT)
        .unwrap()
        .expect("a delivery in time");
    assert_eq!(d.body(), b"unused");
    d.ack().unwrap();
    let fresh = conn.open_channel().unwrap();
    fresh.queue_declare(&q, &passive()).unwrap();
    conn.close().unwrap();
}

#[test]
fn rpc_deadline_leaves_the_channel_usable() {
    let fwd = start_proxy();
    let conn = Connection::open_with(fwd.options().recovery(RecoveryOptions::disabled())).unwrap();
    let ch = conn.open_channel().unwrap();
    let late = unique("late");
    fwd.partition();
    let t = Instant::now();
    let r = ch
        .with_timeout(Duration::from_millis(300))
        .queue_declare(&late, &exclusive());
    let took = t.elapsed();
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    fwd.heal();
    // The late reply to the first declare must not be taken for the reply to the next.
    let next = unique("next");
    let info = ch.queue_declare(&next, &exclusive()).unwrap();
    assert_eq!(info.name, next);
    assert_eq!(ch.queue_declare(&late, &passive()).unwrap().name, late);
    assert!(ch.is_open() && conn.is_open());
    conn.close().unwrap();
}

#[test]
fn timed_out_consume_leaves_no_consumer_behind() {
    let fwd = start_proxy();
    let conn = Connection::open_with(fwd.options().recovery(RecoveryOptions::disabled())).unwrap();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    fwd.partition();
    let r = ch
        .with_timeout(Duration::from_millis(300))
        .basic_consume(&q, &ConsumeOptions::default());
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    fwd.heal();
    let probe = conn.open_channel().unwrap();
    probe.confirm_select().unwrap();
    publish_confirmed(&probe, "", &q, b"for a real consumer");
    // The broker registered the consumer after we gave up on it: lepus must cancel it
    // rather than keep bouncing its deliveries back to the queue.
    assert!(
        wait_until(WAIT, || probe
            .queue_declare(&q, &passive())
            .unwrap()
            .consumer_count
            == 0),
        "the abandoned consumer is still registered"
    );
    let d = get_eventually(&probe, &q, false);
    assert_eq!(d.body(), b"for a real consumer");
    d.ack().unwrap();
    conn.close().unwrap();
}
