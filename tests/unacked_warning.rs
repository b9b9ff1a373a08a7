//! The early warning before the broker's consumer_timeout: deliveries left unacknowledged
//! past a (short) threshold are reported once each, settled ones never.

mod support;

use std::time::Duration;

use lepus::{Connection, ConnectionEventKind, ConsumeOptions};
use support::fixtures::*;
use support::{publish_confirmed, test_options, wait_until};

/// Delivery tags reported so far on `channel`, in order.
fn reported(conn: &Connection, channel: u16, threshold: Duration) -> Vec<u64> {
    conn.events()
        .into_iter()
        .filter_map(|e| match e.kind {
            ConnectionEventKind::DeliveriesUnacked {
                channel: c,
                delivery_tags,
                oldest,
            } if c == channel => {
                assert!(oldest >= threshold, "{oldest:?}");
                Some(delivery_tags)
            }
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn deliveries_unacked_past_the_threshold_are_reported_once() {
    let conn =
        Connection::open_with(test_options().unacked_warning(Duration::from_millis(200))).unwrap();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = temp_queue(&ch);
    let cch = conn.open_channel().unwrap();
    cch.basic_qos(10, false).unwrap();
    let consumer = cch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    for i in 0..3 {
        publish_confirmed(&ch, "", &q, format!("m{i}").as_bytes());
    }
    let held: Vec<_> = (0..3)
        .map(|_| consumer.recv_timeout(WAIT).unwrap().unwrap())
        .collect();
    held[1].ack().unwrap(); // settled at once: never reported
    assert!(
        wait_until(WAIT, || reported(
            &conn,
            cch.id(),
            Duration::from_millis(200)
        )
        .len()
            >= 2),
        "no warning: {:#?}",
        conn.events()
    );
    assert_eq!(
        reported(&conn, cch.id(), Duration::from_millis(200)),
        [1, 3]
    );
    held[0].ack().unwrap();
    held[2].ack().unwrap();
    // A delivery acked in time is not reported; nothing is reported twice.
    publish_confirmed(&ch, "", &q, b"quick");
    consumer.recv_timeout(WAIT).unwrap().unwrap().ack().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        reported(&conn, cch.id(), Duration::from_millis(200)),
        [1, 3]
    );
    conn.close().unwrap();
}

#[test]
fn no_ack_consumers_and_the_default_report_nothing() {
    let warned =
        Connection::open_with(test_options().unacked_warning(Duration::from_millis(50))).unwrap();
    let plain = support::connect();
    for conn in [&warned, &plain] {
        let ch = conn.open_channel().unwrap();
        ch.confirm_select().unwrap();
        let q = temp_queue(&ch);
        let no_ack = ConsumeOptions {
            no_ack: true,
            ..Default::default()
        };
        let auto = ch.basic_consume(&q, &no_ack).unwrap();
        publish_confirmed(&ch, "", &q, b"x");
        let _d = auto.recv_timeout(WAIT).unwrap().unwrap();
        let q2 = temp_queue(&ch);
        let manual = ch.basic_consume(&q2, &ConsumeOptions::default()).unwrap();
        publish_confirmed(&ch, "", &q2, b"y");
        let d = manual.recv_timeout(WAIT).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let n = reported(conn, ch.id(), Duration::from_millis(50)).len();
        if std::ptr::eq(conn, &warned) {
            assert_eq!(n, 1, "only the manual-ack delivery");
        } else {
            assert_eq!(n, 0, "off by default");
        }
        d.ack().unwrap();
    }
    warned.close().unwrap();
    plain.close().unwrap();
}
