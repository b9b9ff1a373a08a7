//! The early warning before consumer_timeout, driven frame by frame: deliveries noted with
//! the frame's time, settled ones forgotten, overdue ones reported once by the timer,
//! deliveries the application never saw (consumer gone) never reported.

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic};

use super::{Scenario, Sent, deliver};
use crate::delivery::ConsumerMsg;
use crate::events::ConnectionEventKind;
use crate::io::ConnShared;
use crate::options::ConnectionOptions;

/// Delivery tags the engine reported in the connection's events so far.
fn reported_tags(conn: &ConnShared) -> Vec<u64> {
    conn.events
        .snapshot()
        .into_iter()
        .flat_map(|e| match e.kind {
            ConnectionEventKind::DeliveriesUnacked { delivery_tags, .. } => delivery_tags,
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn overdue_deliveries_are_reported_once_and_settled_ones_never() {
    let threshold = Duration::from_millis(100);
    let mut s = Scenario::with(0, ConnectionOptions::default().unacked_warning(threshold));
    let ch = s.open(1);
    let c = s.consume(&ch, "c", 16);
    s.feed(&deliver(1, "c", 1, b"a"));
    s.feed(&deliver(1, "c", 2, b"b"));
    let mut taken = Vec::new();
    while let Some((ConsumerMsg::Delivery(d), _)) = c.take() {
        taken.push(d);
    }
    assert_eq!(taken.len(), 2);
    taken[0].ack().expect("ack queued");

    s.engine.on_timer(s.now + threshold / 2);
    assert!(reported_tags(&s.conn).is_empty(), "nothing overdue yet");
    s.engine.on_timer(s.now + threshold * 2);
    assert_eq!(reported_tags(&s.conn), [2], "the acked one is never reported");
    s.engine.on_timer(s.now + threshold * 4);
    assert_eq!(reported_tags(&s.conn), [2], "reported once");
}

#[test]
fn without_the_option_nothing_is_tracked() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    assert!(ch.unacked.is_none());
    let c = s.consume(&ch, "c", 16);
    s.feed(&deliver(1, "c", 1, b"a"));
    assert!(c.take().is_some());
}

/// A delivery to a consumer that is gone is requeued by the engine: the application never
/// saw it, so it is never reported as unacknowledged.
#[test]
fn a_delivery_to_a_dropped_consumer_is_never_reported() {
    let threshold = Duration::from_millis(100);
    let mut s = Scenario::with(0, ConnectionOptions::default().unacked_warning(threshold));
    let ch = s.open(1);
    let c = s.consume(&ch, "c", 16);
    drop(c);
    s.feed(&deliver(1, "c", 1, b"a"));
    assert_eq!(
        s.sent(),
        [Sent::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
                delivery_tag: 1,
                requeue: true,
            }))
        )],
        "requeued"
    );
    s.engine.on_timer(s.now + threshold * 2);
    assert!(reported_tags(&s.conn).is_empty(), "never reported");
    assert_eq!(ch.unacked.as_ref().map(|t| t.overdue(s.now + threshold * 9).len()), Some(0));
}

/// A delivery that waited for room in a full consumer queue counts from its arrival, as
/// the broker's consumer_timeout does, not from when the consumer made room.
#[test]
fn a_stalled_delivery_counts_from_its_arrival() {
    let threshold = Duration::from_millis(100);
    let mut s = Scenario::with(0, ConnectionOptions::default().unacked_warning(threshold));
    let ch = s.open(1);
    let c = s.consume(&ch, "c", 1);
    let mut bytes = deliver(1, "c", 1, b"a");
    bytes.extend(deliver(1, "c", 2, b"b"));
    s.feed(&bytes);
    assert!(s.engine.is_stalled());
    // The consumer makes room later. (No frame is read during a stall, so the engine's
    // clock stays at the arrival anyway; the stalled entry keeps its own receipt time so
    // that this does not depend on it.)
    let arrival = s.now;
    assert!(c.take().is_some());
    assert!(s.engine.retry_stalled(), "handed over");
    s.engine.on_timer(arrival + threshold);
    assert_eq!(reported_tags(&s.conn), [1, 2], "both due a threshold after arrival");
}
