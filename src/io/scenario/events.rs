//! The engine's connection events and gauges, frame by frame: what the broker says
//! (blocked, a channel close, a consumer cancel) becomes an event of the connection, and
//! the channel and consumer gauges follow every way a channel or consumer goes.

use amq_protocol::protocol::connection::{self, AMQPMethod as C};
use amq_protocol::protocol::{AMQPClass, basic, channel};

use super::Scenario;
use crate::error::Error;
use crate::events::ConnectionEventKind as K;

fn kinds(s: &Scenario) -> Vec<K> {
    s.conn.events.snapshot().into_iter().map(|e| e.kind).collect()
}

fn gauges(s: &Scenario) -> (u64, u64) {
    let st = s.conn.stats.snapshot();
    (st.channels, st.consumers)
}

#[test]
fn blocked_and_unblocked_are_events_with_the_reason() {
    let mut s = Scenario::new();
    s.feed_method(
        0,
        AMQPClass::Connection(C::Blocked(connection::Blocked {
            reason: "low on disk".into(),
        })),
    );
    s.feed_method(
        0,
        AMQPClass::Connection(C::Unblocked(connection::Unblocked {})),
    );
    assert_eq!(
        kinds(&s),
        [
            K::Blocked {
                reason: "low on disk".into()
            },
            K::Unblocked
        ]
    );
    assert!(s.conn.events.snapshot().iter().all(|e| e.generation == 1));
}

#[test]
fn a_broker_channel_close_is_an_event_and_frees_its_gauge() {
    let mut s = Scenario::new();
    s.open(1);
    s.open(2);
    assert_eq!(gauges(&s), (2, 0));
    s.feed_method(
        2,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 406,
            reply_text: "PRECONDITION_FAILED - x".into(),
            class_id: 50,
            method_id: 10,
        })),
    );
    assert_eq!(
        kinds(&s),
        [K::ChannelClosed {
            channel: 2,
            reply_code: 406,
            reply_text: "PRECONDITION_FAILED - x".into()
        }]
    );
    assert_eq!(gauges(&s), (1, 0));
}

#[test]
fn a_broker_cancel_is_an_event_with_the_queue_and_frees_its_gauge() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let _a = s.consume(&ch, "a", 10);
    let _b = s.consume(&ch, "b", 10);
    assert_eq!(gauges(&s), (1, 2));
    s.feed_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: "a".into(),
            nowait: true,
        })),
    );
    assert_eq!(
        kinds(&s),
        [K::ConsumerCancelled {
            channel: 1,
            tag: "a".into(),
            queue: "q".into()
        }]
    );
    assert_eq!(gauges(&s), (1, 1));
    // A cancel for a tag we do not have is no event.
    s.feed_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: "zz".into(),
            nowait: true,
        })),
    );
    assert_eq!(kinds(&s).len(), 1);
}

#[test]
fn a_lost_link_gives_back_every_channel_and_consumer() {
    let mut s = Scenario::new();
    let one = s.open(1);
    s.open(2);
    let _c = s.consume(&one, "c", 10);
    assert_eq!(gauges(&s), (2, 1));
    s.engine.fail(Error::ConnectionLost("test".into()));
    assert_eq!(gauges(&s), (0, 0));
    assert!(kinds(&s).is_empty(), "a lost link is the recovery's event");
}
