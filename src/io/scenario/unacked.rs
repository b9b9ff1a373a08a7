//! The early warning before consumer_timeout, driven frame by frame: deliveries noted with
//! the frame's time, settled ones forgotten, overdue ones reported once by the timer.

use std::time::Duration;

use super::{Scenario, deliver};
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
