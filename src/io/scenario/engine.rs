//! The engine, state by state and violation by violation.

use std::time::Duration;

use amq_protocol::protocol::connection::{self, AMQPMethod as C};
use amq_protocol::protocol::{AMQPClass, basic, channel, queue};

use super::{
    FRAME_MAX, Scenario, Sent, content, deliver, is_close_with, method, raw_frame, reply_now,
};
use crate::delivery::ConsumerMsg;
use crate::error::BadDeliveryKind;
use crate::error::{Error, reply_code};
use crate::io::{Command, Reply};
use crate::options::ConnectionOptions;
use crate::protocol::frame::{FRAME_BODY, FRAME_HEARTBEAT};
use crate::protocol::properties::BasicProperties;
use crate::sync::oneshot;

fn declare(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: Default::default(),
    }))
}

fn declare_ok(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
        queue: name.into(),
        message_count: 0,
        consumer_count: 0,
    }))
}

fn channel_close(code: u16, text: &str) -> AMQPClass {
    AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
        reply_code: code,
        reply_text: text.into(),
        class_id: 50,
        method_id: 10,
    }))
}

fn channel_close_ok() -> AMQPClass {
    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}))
}

fn conn_close_ok() -> Sent {
    Sent::Method(0, AMQPClass::Connection(C::CloseOk(connection::CloseOk {})))
}

/// The engine found a violation with `code`: it said so in a `connection.close`, every
/// waiter sees the error, and it waits for `close-ok` to end.
fn assert_violation(s: &mut Scenario, code: u16) {
    let sent = s.sent();
    assert!(
        sent.len() == 1 && is_close_with(&sent[0], code),
        "expected connection.close {code}, got {sent:?}"
    );
    assert!(!s.engine.is_open());
    assert!(s.conn.is_failed());
    assert!(
        matches!(s.conn.error(), Error::Protocol { code: c, .. } if c == code),
        "{:?}",
        s.conn.error()
    );
    s.feed_method(0, AMQPClass::Connection(C::CloseOk(connection::CloseOk {})));
    assert!(
        matches!(s.outcome(), Some(Error::Protocol { code: c, .. }) if c == code),
        "{:?}",
        s.outcome()
    );
}

/// A violation found by the frame decoder: close sent, and the engine ends at once.
fn assert_decoder_violation(s: &mut Scenario, code: u16) {
    let sent = s.sent();
    assert!(
        sent.len() == 1 && is_close_with(&sent[0], code),
        "expected connection.close {code}, got {sent:?}"
    );
    assert!(
        matches!(s.outcome(), Some(Error::Protocol { code: c, .. }) if c == code),
        "{:?}",
        s.outcome()
    );
}

// ---------------- channels and RPCs ----------------

#[test]
fn rpc_replies_reach_their_waiters_in_request_order() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let a = s.rpc(&ch, declare("a"), None);
    let b = s.rpc(&ch, declare("b"), None);
    assert_eq!(
        s.sent(),
        [Sent::Method(1, declare("a")), Sent::Method(1, declare("b"))]
    );
    assert!(a.try_recv().is_none());
    s.feed_method(1, declare_ok("a"));
    s.feed_method(1, declare_ok("b"));
    assert!(matches!(reply_now(&a), Ok(Reply::Method(m)) if m == declare_ok("a")));
    assert!(matches!(reply_now(&b), Ok(Reply::Method(m)) if m == declare_ok("b")));
    assert!(s.sent().is_empty());
    assert!(s.engine.is_open());
}

#[test]
fn a_reply_without_a_request_is_unexpected() {
    let mut s = Scenario::new();
    s.open(1);
    s.feed_method(1, declare_ok("a"));
    assert_violation(&mut s, reply_code::UNEXPECTED_FRAME);
}

#[test]
fn get_ok_with_content_and_get_empty_answer_basic_get() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let get = AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
        queue: "q".into(),
        no_ack: true,
    }));
    let first = s.rpc(&ch, get.clone(), None);
    let second = s.rpc(&ch, get, None);
    s.sent();
    let mut bytes = method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
            delivery_tag: 7,
            redelivered: true,
            exchange: "ex".into(),
            routing_key: "rk".into(),
            message_count: 3,
        })),
    );
    bytes.extend(content(1, &BasicProperties::new(), b"hello", FRAME_MAX));
    s.feed(&bytes);
    match reply_now(&first) {
        Ok(Reply::Get(Some(c))) => assert_eq!(c.body, b"hello"),
        other => panic!("{other:?}"),
    }
    s.feed_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
    );
    assert!(matches!(reply_now(&second), Ok(Reply::Get(None))));
    assert!(s.sent().is_empty());
}

#[test]
fn get_ok_without_a_get_is_unexpected() {
    let mut s = Scenario::new();
    s.open(1);
    let mut bytes = method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
            delivery_tag: 1,
            redelivered: false,
            exchange: "".into(),
            routing_key: "q".into(),
            message_count: 0,
        })),
    );
    bytes.extend(content(1, &BasicProperties::new(), b"x", FRAME_MAX));
    s.feed(&bytes);
    assert_violation(&mut s, reply_code::UNEXPECTED_FRAME);
}

#[test]
fn application_close_of_a_channel_frees_its_id_on_close_ok() {
    let mut s = Scenario::new();
    let ch = s.open(3);
    assert!(!s.conn.ids.lock().reserve(3), "id 3 is in use");
    let (tx, rx) = oneshot::channel();
    let mut bytes = Vec::new();
    crate::protocol::frame::put_method(&mut bytes, 3, channel_close(200, "bye")).unwrap();
    s.conn
        .send(
            Command::CloseChannel {
                channel: 3,
                bytes,
                reply: Some(tx),
            },
            s.deadline(),
            "close",
        )
        .unwrap();
    s.drain();
    assert_eq!(s.sent(), [Sent::Method(3, channel_close(200, "bye"))]);
    // Frames for a closing channel are dropped, not sent.
    ch.conn
        .send(
            Command::Send(method(3, declare("late"))),
            s.deadline(),
            "send",
        )
        .unwrap();
    s.drain();
    assert!(s.sent().is_empty());
    // Deliveries in flight before close-ok are discarded quietly.
    s.feed(&deliver(3, "gone", 1, b"x"));
    s.feed_method(3, channel_close_ok());
    assert!(matches!(reply_now(&rx), Ok(Reply::Method(m)) if m == channel_close_ok()));
    assert!(s.sent().is_empty());
    assert!(s.conn.ids.lock().reserve(3), "id 3 was freed");
    assert!(s.engine.is_open());
}

#[test]
fn channel_close_from_the_broker_is_answered_and_fails_the_channel() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let pending = s.rpc(&ch, declare("a"), None);
    s.sent();
    s.feed_method(
        1,
        channel_close(reply_code::NOT_FOUND, "NOT_FOUND - no queue"),
    );
    assert_eq!(s.sent(), [Sent::Method(1, channel_close_ok())]);
    let expect = |e: &Error| {
        matches!(
            e,
            Error::ServerClosedChannel {
                channel: 1,
                code: 404,
                class_id: 50,
                method_id: 10,
                ..
            }
        )
    };
    assert!(expect(&ch.error()), "{:?}", ch.error());
    assert!(ch.is_channel_closed());
    // The waiter's reply sender was dropped: it reads the channel's reason.
    assert!(pending.try_recv().is_none());
    assert!(s.conn.ids.lock().reserve(1), "id 1 was freed");
    assert!(s.engine.is_open(), "a channel error keeps the connection");
}

#[test]
fn channel_flow_is_acknowledged() {
    let mut s = Scenario::new();
    s.open(1);
    s.feed_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: false })),
    );
    assert_eq!(
        s.sent(),
        [Sent::Method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                active: false
            }))
        )]
    );
}

#[test]
fn channel_close_ok_without_a_close_is_unexpected() {
    let mut s = Scenario::new();
    s.open(1);
    s.feed_method(1, channel_close_ok());
    assert_violation(&mut s, reply_code::UNEXPECTED_FRAME);
}

// ---------------- violations ----------------

#[test]
fn a_method_on_a_channel_that_is_not_open_is_a_channel_error() {
    let mut s = Scenario::new();
    s.feed_method(5, declare_ok("a"));
    assert_violation(&mut s, reply_code::CHANNEL_ERROR);
}

#[test]
fn a_content_frame_on_a_channel_that_is_not_open_is_a_channel_error() {
    let mut s = Scenario::new();
    s.feed(&content(2, &BasicProperties::new(), b"x", FRAME_MAX));
    assert_violation(&mut s, reply_code::CHANNEL_ERROR);
}

#[test]
fn a_header_without_a_content_method_is_unexpected() {
    let mut s = Scenario::new();
    s.open(1);
    s.feed(&content(1, &BasicProperties::new(), b"x", FRAME_MAX));
    assert_violation(&mut s, reply_code::UNEXPECTED_FRAME);
}

#[test]
fn a_body_before_its_header_is_unexpected() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    s.consume(&ch, "t", 4);
    let mut bytes = deliver(1, "t", 1, b"x");
    // drop the header frame: method, then body
    let method_len = 8 + u32::from_be_bytes(bytes[3..7].try_into().unwrap()) as usize;
    let header_len =
        8 + u32::from_be_bytes(bytes[method_len + 3..method_len + 7].try_into().unwrap()) as usize;
    bytes.drain(method_len..method_len + header_len);
    s.feed(&bytes);
    assert_violation(&mut s, reply_code::UNEXPECTED_FRAME);
}

#[test]
fn a_body_without_any_content_method_is_unexpected() {
    let mut s = Scenario::new();
    s.open(1);
    s.feed(&raw_frame(FRAME_BODY, 1, b"stray"));
    assert_violation(&mut s, reply_code::UNEXPECTED_FRAME);
}

#[test]
fn a_method_in_the_middle_of_a_content_is_unexpected() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    s.consume(&ch, "t", 4);
    let bytes = deliver(1, "t", 1, b"x");
    let method_len = 8 + u32::from_be_bytes(bytes[3..7].try_into().unwrap()) as usize;
    s.feed(&bytes[..method_len]);
    s.feed(&deliver(1, "t", 2, b"y"));
    assert_violation(&mut s, reply_code::UNEXPECTED_FRAME);
}

#[test]
fn a_body_longer_than_announced_is_a_frame_error() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let c = s.consume(&ch, "t", 4);
    let mut bytes = deliver(1, "t", 1, b"abc");
    bytes.truncate(bytes.len() - 11); // the body frame: 8 bytes of framing, 3 of body
    bytes.extend(raw_frame(FRAME_BODY, 1, b"abcd"));
    s.feed(&bytes);
    // No delivery: the consumer only hears that the link ended.
    assert!(matches!(
        c.rx.try_recv(),
        Ok(ConsumerMsg::End(Error::Protocol {
            code: reply_code::FRAME_ERROR,
            ..
        }))
    ));
    assert_violation(&mut s, reply_code::FRAME_ERROR);
}

#[test]
fn a_frame_over_frame_max_is_a_frame_error_and_ends_at_once() {
    let mut s = Scenario::new();
    s.open(1);
    s.feed(&raw_frame(FRAME_BODY, 1, &vec![0; FRAME_MAX as usize]));
    assert_decoder_violation(&mut s, reply_code::FRAME_ERROR);
}

#[test]
fn an_unknown_frame_type_is_a_frame_error() {
    let mut s = Scenario::new();
    s.feed(&raw_frame(9, 0, b""));
    assert_decoder_violation(&mut s, reply_code::FRAME_ERROR);
}

#[test]
fn a_heartbeat_on_a_channel_other_than_zero_is_a_frame_error() {
    let mut s = Scenario::new();
    s.open(1);
    s.feed(&raw_frame(FRAME_HEARTBEAT, 1, b""));
    assert_decoder_violation(&mut s, reply_code::FRAME_ERROR);
}

#[test]
fn a_client_only_method_from_the_broker_is_command_invalid() {
    let mut s = Scenario::new();
    s.open(1);
    s.feed_method(1, declare("q"));
    assert_violation(&mut s, reply_code::COMMAND_INVALID);
}

#[test]
fn a_connection_method_on_a_channel_is_command_invalid() {
    let mut s = Scenario::new();
    s.open(1);
    s.feed_method(
        1,
        AMQPClass::Connection(C::Blocked(connection::Blocked { reason: "x".into() })),
    );
    assert_violation(&mut s, reply_code::COMMAND_INVALID);
}

#[test]
fn a_handshake_method_after_the_handshake_is_command_invalid() {
    let mut s = Scenario::new();
    s.feed_method(0, AMQPClass::Connection(C::OpenOk(connection::OpenOk {})));
    assert_violation(&mut s, reply_code::COMMAND_INVALID);
}

#[test]
fn close_ok_without_a_close_is_unexpected() {
    let mut s = Scenario::new();
    s.feed_method(0, AMQPClass::Connection(C::CloseOk(connection::CloseOk {})));
    assert_violation(&mut s, reply_code::UNEXPECTED_FRAME);
}

#[test]
fn a_violation_while_closing_ends_at_once() {
    let mut s = Scenario::new();
    s.feed_method(5, declare_ok("a"));
    s.sent();
    assert!(s.outcome().is_none());
    // Methods on channels are ignored now; one that breaks the protocol ends it all.
    s.feed_method(6, declare_ok("b"));
    assert!(s.outcome().is_none());
    s.feed_method(1, declare("q"));
    assert!(s.sent().is_empty(), "no second connection.close");
    assert!(
        matches!(
            s.outcome(),
            Some(Error::Protocol {
                code: reply_code::COMMAND_INVALID,
                ..
            })
        ),
        "{:?}",
        s.outcome()
    );
}

// ---------------- connection close ----------------

#[test]
fn connection_close_from_the_broker_is_answered_and_ends_with_its_code() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    s.feed_method(
        0,
        AMQPClass::Connection(C::Close(connection::Close {
            reply_code: reply_code::CONNECTION_FORCED,
            reply_text: "CONNECTION_FORCED - shutdown".into(),
            class_id: 0,
            method_id: 0,
        })),
    );
    assert_eq!(s.sent(), [conn_close_ok()]);
    let ok = |e: &Error| matches!(e, Error::ServerClosedConnection { code: 320, text, .. } if text.contains("shutdown"));
    assert!(s.outcome().as_ref().is_some_and(ok), "{:?}", s.outcome());
    assert!(ok(&ch.error()), "the channel sees the connection's reason");
}

#[test]
fn application_close_waits_for_close_ok() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let (tx, rx) = oneshot::channel();
    let close = AMQPClass::Connection(C::Close(connection::Close {
        reply_code: 200,
        reply_text: "bye".into(),
        class_id: 0,
        method_id: 0,
    }));
    s.conn
        .send(
            Command::Close {
                bytes: method(0, close.clone()),
                reply: tx,
            },
            s.deadline(),
            "close",
        )
        .unwrap();
    s.drain();
    assert_eq!(s.sent(), [Sent::Method(0, close)]);
    assert!(!s.engine.is_open());
    assert!(matches!(ch.error(), Error::ConnectionClosed));
    assert!(s.outcome().is_none());
    s.feed_method(0, AMQPClass::Connection(C::CloseOk(connection::CloseOk {})));
    assert!(matches!(reply_now(&rx), Ok(Reply::Method(_))));
    assert!(matches!(s.outcome(), Some(Error::ConnectionClosed)));
}

#[test]
fn application_close_without_close_ok_ends_at_the_close_timeout() {
    let opts = ConnectionOptions {
        close_timeout: Duration::from_secs(2),
        ..ConnectionOptions::default()
    };
    let mut s = Scenario::with(0, opts);
    let (tx, rx) = oneshot::channel();
    s.engine.on_command(
        Command::Close {
            bytes: Vec::new(),
            reply: tx,
        },
        s.now,
    );
    assert!(s.engine.on_timer(s.now + Duration::from_secs(1)) <= s.now + Duration::from_secs(2));
    assert!(s.outcome().is_none());
    s.engine.on_timer(s.now + Duration::from_secs(2));
    assert!(matches!(reply_now(&rx), Err(Error::Timeout(_))));
    assert!(matches!(s.outcome(), Some(Error::ConnectionClosed)));
}

// ---------------- timers ----------------

#[test]
fn heartbeats_are_sent_at_half_the_interval_and_silence_ends_the_link() {
    let mut s = Scenario::with(10, ConnectionOptions::default());
    let t0 = s.now;
    assert_eq!(s.engine.on_timer(t0), t0 + Duration::from_secs(1));
    assert!(s.sent().is_empty());
    // Half the interval without sending: a heartbeat.
    s.engine.on_timer(t0 + Duration::from_secs(5));
    assert_eq!(s.sent(), [Sent::Heartbeat]);
    // Data from the broker resets its silence.
    s.now = t0 + Duration::from_secs(15);
    s.heartbeat();
    s.engine.on_timer(t0 + Duration::from_secs(34));
    assert!(s.outcome().is_none());
    s.engine.on_timer(t0 + Duration::from_secs(35));
    assert!(
        matches!(s.outcome(), Some(Error::ConnectionLost(t)) if t.contains("two heartbeat")),
        "{:?}",
        s.outcome()
    );
    assert!(s.conn.is_failed());
}

#[test]
fn a_heartbeat_waits_behind_unwritten_output() {
    let mut s = Scenario::with(10, ConnectionOptions::default());
    let t0 = s.now;
    let ch = s.open(1);
    s.rpc(&ch, declare("a"), None);
    // Output is waiting: no heartbeat queued behind it, and no timer to spin on it.
    let next = s.engine.on_timer(t0 + Duration::from_secs(6));
    assert_eq!(s.sent(), [Sent::Method(1, declare("a"))]);
    assert!(next > t0 + Duration::from_secs(6));
}

#[test]
fn writes_that_stall_past_the_write_timeout_end_the_link() {
    // The stall limit above the heartbeat-based one: the latter applies.
    let mut s = Scenario::with(
        0,
        ConnectionOptions::default().write_stall_timeout(Duration::from_secs(60)),
    );
    let ch = s.open(1);
    s.rpc(&ch, declare("a"), None);
    let timeout = Duration::from_secs(30);
    let t0 = s.now;
    let n = s.engine.output().len();
    // Progress, then a stall.
    s.engine.wrote(3, t0 + Duration::from_secs(20));
    s.engine
        .settle_output(t0 + Duration::from_secs(20), timeout, false);
    assert_eq!(s.engine.output().len(), n - 3);
    s.engine
        .settle_output(t0 + Duration::from_secs(50), timeout, false);
    assert!(s.outcome().is_none());
    s.engine
        .settle_output(t0 + Duration::from_millis(50_001), timeout, false);
    assert!(
        matches!(s.outcome(), Some(Error::ConnectionLost(t)) if t.contains("stalled")),
        "{:?}",
        s.outcome()
    );
}

#[test]
fn a_peer_that_reads_nothing_for_the_stall_time_is_a_dead_link_unless_it_blocked_us() {
    let opts = ConnectionOptions::default().write_stall_timeout(Duration::from_secs(3));
    let heartbeat_limit = Duration::from_secs(120);
    let mut s = Scenario::with(0, opts.clone());
    let ch = s.open(1);
    s.rpc(&ch, declare("a"), None);
    let t0 = s.now;
    s.engine
        .settle_output(t0 + Duration::from_secs(3), heartbeat_limit, false);
    assert!(s.outcome().is_none());
    s.engine
        .settle_output(t0 + Duration::from_millis(3_001), heartbeat_limit, false);
    assert!(
        matches!(s.outcome(), Some(Error::ConnectionLost(t)) if t.contains("read none of our bytes for 3s")),
        "{:?}",
        s.outcome()
    );
    // connection.blocked: the broker stops reading on purpose; only the heartbeat-based
    // limit applies until it unblocks.
    let mut s = Scenario::with(0, opts);
    let ch = s.open(1);
    s.feed_method(
        0,
        AMQPClass::Connection(C::Blocked(connection::Blocked {
            reason: "low on memory".into(),
        })),
    );
    s.rpc(&ch, declare("a"), None);
    let t0 = s.now;
    s.engine
        .settle_output(t0 + Duration::from_secs(60), heartbeat_limit, false);
    assert!(s.outcome().is_none());
    s.feed_method(
        0,
        AMQPClass::Connection(C::Unblocked(connection::Unblocked {})),
    );
    s.engine
        .settle_output(t0 + Duration::from_secs(61), heartbeat_limit, false);
    assert!(
        matches!(s.outcome(), Some(Error::ConnectionLost(_))),
        "{:?}",
        s.outcome()
    );
}

#[test]
fn answers_to_a_peer_that_does_not_read_are_bounded_in_bytes() {
    // channel.flow after channel.flow: each needs a flow-ok, and nothing is written.
    let limit = 64 * 1024;
    let mut s = Scenario::with(0, ConnectionOptions::default().max_output_bytes(limit));
    s.open(1);
    let flow = method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: true })),
    );
    let mut fed = 0;
    while !s.engine.is_stalled() {
        s.feed(&flow);
        fed += 1;
        assert!(fed < 100_000, "reading never paused");
    }
    let out = s.engine.output().len();
    assert!(out >= limit && out < limit + 64, "{out} bytes of output");
    // Once the peer reads, reading resumes.
    let n = s.engine.output().len();
    s.engine.wrote(n, s.now);
    s.engine.settle_output(s.now, Duration::from_secs(30), false);
    assert!(!s.engine.is_stalled());
    assert!(s.outcome().is_none());
}

#[test]
fn all_output_written_clears_the_buffer_and_counts_as_sent() {
    let mut s = Scenario::with(10, ConnectionOptions::default());
    let t0 = s.now;
    let ch = s.open(1);
    s.rpc(&ch, declare("a"), None);
    let n = s.engine.output().len();
    s.engine.wrote(n, t0 + Duration::from_secs(4));
    s.engine
        .settle_output(t0 + Duration::from_secs(100), Duration::from_secs(30), false);
    assert!(s.engine.output().is_empty());
    assert!(s.outcome().is_none(), "nothing waits: no stall");
    // The write counts as sent: the next heartbeat is due 5 s after it.
    s.engine.on_timer(t0 + Duration::from_secs(8));
    assert!(s.sent().is_empty());
    s.engine.on_timer(t0 + Duration::from_secs(9));
    assert_eq!(s.sent(), [Sent::Heartbeat]);
}

#[test]
fn a_callers_unfinished_write_counts_as_waiting_output() {
    // The engine's own output is all written, but a caller's direct write left bytes the
    // socket has not taken: the stall clock runs for those too.
    let mut s = Scenario::with(
        0,
        ConnectionOptions::default().write_stall_timeout(Duration::from_secs(5)),
    );
    let ch = s.open(1);
    s.rpc(&ch, declare("a"), None);
    let t0 = s.now;
    let n = s.engine.output().len();
    s.engine.wrote(n, t0);
    s.engine.settle_output(t0, Duration::from_secs(30), true);
    assert!(s.engine.output().is_empty());
    s.engine
        .settle_output(t0 + Duration::from_secs(5), Duration::from_secs(30), true);
    assert!(s.outcome().is_none());
    s.engine
        .settle_output(t0 + Duration::from_millis(5_001), Duration::from_secs(30), true);
    assert!(
        matches!(s.outcome(), Some(Error::ConnectionLost(t)) if t.contains("stalled")),
        "{:?}",
        s.outcome()
    );
    // Bytes taken from it count as progress.
    let mut s = Scenario::with(
        0,
        ConnectionOptions::default().write_stall_timeout(Duration::from_secs(5)),
    );
    let t0 = s.now;
    s.engine.wrote_elsewhere(10, t0 + Duration::from_secs(4));
    s.engine
        .settle_output(t0 + Duration::from_secs(9), Duration::from_secs(30), true);
    assert!(s.outcome().is_none());
}

// ---------------- consumers and backpressure ----------------

#[test]
fn deliveries_reach_their_consumer() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let c = s.consume(&ch, "t", 4);
    s.feed(&deliver(1, "t", 9, b"payload"));
    match c.take() {
        Some((ConsumerMsg::Delivery(d), false)) => {
            assert_eq!(d.body, b"payload");
            assert_eq!((d.exchange.as_str(), d.routing_key.as_str()), ("ex", "rk"));
            assert_eq!(d.acker.delivery_tag, 9);
        }
        _ => panic!("expected a delivery"),
    }
    assert!(s.sent().is_empty());
}

#[test]
fn undecodable_properties_make_a_bad_delivery_with_its_tag() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let c = s.consume(&ch, "t", 4);
    let mut bytes = deliver(1, "t", 4, b"x");
    let method_len = 8 + u32::from_be_bytes(bytes[3..7].try_into().unwrap()) as usize;
    // property flags say "content-type present" but no bytes follow
    let flags = method_len + 7 + 12;
    bytes[flags] = 0x80;
    s.feed(&bytes);
    match c.take() {
        Some((ConsumerMsg::Bad(b), _)) => {
            assert!(matches!(b.kind, BadDeliveryKind::Undecodable(_)));
            assert_eq!(b.acker.delivery_tag, 4);
        }
        _ => panic!("expected a bad delivery"),
    }
    assert!(s.engine.is_open());
}

#[test]
fn a_full_consumer_queue_stalls_reading_until_the_consumer_takes_one() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let c = s.consume(&ch, "t", 1);
    let mut bytes = deliver(1, "t", 1, b"a");
    bytes.extend(deliver(1, "t", 2, b"b"));
    bytes.extend(deliver(1, "t", 3, b"c"));
    s.feed(&bytes);
    assert!(s.engine.is_stalled());
    assert!(!s.engine.retry_stalled(), "still full");
    // Silence while stalled is ours, not the broker's.
    let (msg, wake) = c.take().expect("first delivery");
    assert!(matches!(msg, ConsumerMsg::Delivery(d) if d.body == b"a"));
    assert!(wake, "the consumer wakes the I/O thread");
    assert!(s.engine.retry_stalled(), "reading resumes");
    assert!(matches!(c.rx.try_recv(), Ok(ConsumerMsg::Delivery(d)) if d.body == b"b"));
    c.shared.took_one();
    s.process_frames();
    assert!(matches!(c.rx.try_recv(), Ok(ConsumerMsg::Delivery(d)) if d.body == b"c"));
    assert!(s.sent().is_empty());
}

#[test]
fn a_stall_keeps_the_heartbeat_watchdog_quiet() {
    let mut s = Scenario::with(10, ConnectionOptions::default());
    let t0 = s.now;
    let ch = s.open(1);
    let _c = s.consume(&ch, "t", 1);
    let mut bytes = deliver(1, "t", 1, b"a");
    bytes.extend(deliver(1, "t", 2, b"b"));
    s.feed(&bytes);
    assert!(s.engine.is_stalled());
    let next = s.engine.on_timer(t0 + Duration::from_secs(60));
    assert!(
        s.outcome().is_none(),
        "stalled on purpose: silence tells nothing"
    );
    assert!(next <= t0 + Duration::from_secs(60) + Duration::from_millis(20));
}

fn reject(ch: u16, tag: u64) -> Sent {
    Sent::Method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
            delivery_tag: tag,
            requeue: true,
        })),
    )
}

#[test]
fn deliveries_for_no_consumer_of_ours_are_rejected_and_counted() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    // A channel without consumers.
    s.feed(&deliver(1, "nobody", 1, b"x"));
    assert_eq!(s.sent(), [reject(1, 1)]);
    // An unknown tag beside a known one.
    let c = s.consume(&ch, "known", 4);
    s.feed(&deliver(1, "other", 2, b"x"));
    s.feed(&deliver(1, "known", 3, b"y"));
    assert_eq!(s.sent(), [reject(1, 2)]);
    assert!(matches!(c.take(), Some((ConsumerMsg::Delivery(d), _)) if d.delivery_tag() == 3));
    // A consumer whose cancel-ok came already.
    let cancel = AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
        consumer_tag: "known".into(),
        nowait: false,
    }));
    let r = s.rpc(&ch, cancel, None);
    s.sent();
    s.feed_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
            consumer_tag: "known".into(),
        })),
    );
    assert!(reply_now(&r).is_ok());
    s.feed(&deliver(1, "known", 4, b"z"));
    assert_eq!(s.sent(), [reject(1, 4)]);
    assert_eq!(ch.orphan_deliveries.load(crate::sync::Ordering::Relaxed), 3);
    assert!(s.engine.is_open());
}

#[test]
fn deliveries_for_no_consumer_are_not_rejected_where_a_no_ack_consumer_was() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let (tx, _rx) = crate::sync::lightq::unbounded();
    let sink = crate::delivery::ConsumerSink {
        tx,
        shared: std::sync::Arc::new(crate::delivery::ConsumerShared::new(4)),
        no_ack: true,
        queue: "q".into(),
    };
    let consume = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
        queue: "q".into(),
        consumer_tag: "auto".into(),
        no_local: false,
        no_ack: true,
        exclusive: false,
        nowait: false,
        arguments: Default::default(),
    }));
    let r = s.rpc(&ch, consume, Some(sink));
    s.sent();
    s.feed_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
            consumer_tag: "auto".into(),
        })),
    );
    assert!(reply_now(&r).is_ok());
    // A no-ack delivery needs no settling: a reject would be a 406 closing the channel.
    s.feed(&deliver(1, "gone", 1, b"x"));
    assert!(s.sent().is_empty());
    assert_eq!(ch.orphan_deliveries.load(crate::sync::Ordering::Relaxed), 1);
}

#[test]
fn broker_cancel_ends_the_consumer_and_is_answered() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let c = s.consume(&ch, "t", 4);
    s.feed_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: "t".into(),
            nowait: false,
        })),
    );
    assert_eq!(
        s.sent(),
        [Sent::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                consumer_tag: "t".into()
            }))
        )]
    );
    assert!(matches!(
        c.rx.try_recv(),
        Ok(ConsumerMsg::End(Error::ConsumerCancelled { .. }))
    ));
}

#[test]
fn consume_ok_after_the_waiter_left_cancels_the_consumer() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let (tx, _rx) = crate::sync::lightq::unbounded();
    let shared = std::sync::Arc::new(crate::delivery::ConsumerShared::new(4));
    let sink = crate::delivery::ConsumerSink {
        tx,
        shared: shared.clone(),
        no_ack: false,
        queue: "q".into(),
    };
    let reply = s.rpc(
        &ch,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "q".into(),
            consumer_tag: "".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: Default::default(),
        })),
        Some(sink),
    );
    s.sent();
    drop(reply); // timed out
    s.feed_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
            consumer_tag: "amq.ctag-1".into(),
        })),
    );
    assert_eq!(
        s.sent(),
        [Sent::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: "amq.ctag-1".into(),
                nowait: true,
            }))
        )]
    );
    assert!(!shared.active.load(std::sync::atomic::Ordering::Acquire));
}

// ---------------- confirms, returns, blocked ----------------

#[test]
fn confirms_resolve_single_multiple_and_nacks() {
    use crate::confirm_tracker::{Confirm, outcome};
    let mut s = Scenario::new();
    let ch = s.open(1);
    ch.confirms.enable();
    let slots: Vec<_> = (0..4)
        .map(|_| ch.confirms.register(true, None).unwrap().1.unwrap())
        .collect();
    let ack = |tag, multiple| {
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: tag,
            multiple,
        }))
    };
    s.feed_method(1, ack(2, true));
    s.feed_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: 4,
            multiple: false,
            requeue: false,
        })),
    );
    let got: Vec<_> = slots.iter().map(|s| outcome(s).unwrap()).collect();
    assert_eq!(
        got,
        [
            Some(Confirm::Ack),
            Some(Confirm::Ack),
            None,
            Some(Confirm::Nack)
        ]
    );
    s.feed_method(1, ack(3, false));
    assert_eq!(outcome(&slots[2]).unwrap(), Some(Confirm::Ack));
    assert_eq!(ch.confirms.outstanding(), 0);
    assert!(s.sent().is_empty());
}

/// A confirm for a tag never published, a `multiple` past the last one, or any confirm
/// on a channel not in confirm mode: the connection closes (503), and no real message is
/// marked confirmed.
#[test]
fn confirms_for_tags_never_published_are_a_protocol_violation() {
    use crate::confirm_tracker::outcome;
    let ack = |tag, multiple| {
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: tag,
            multiple,
        }))
    };
    let nack = |tag, multiple| {
        AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: tag,
            multiple,
            requeue: false,
        }))
    };
    for (m, why) in [
        (ack(3, false), "tag 3"),
        (ack(5, true), "tag 5 (multiple)"),
        (nack(3, false), "basic.nack"),
        (ack(0, false), "tag 0"),
    ] {
        let mut s = Scenario::new();
        let ch = s.open(1);
        ch.confirms.enable();
        let slots: Vec<_> = (0..2)
            .map(|_| ch.confirms.register(true, None).unwrap().1.unwrap())
            .collect();
        s.feed_method(1, m);
        let sent = s.sent();
        assert!(
            sent.iter()
                .any(|f| is_close_with(f, reply_code::COMMAND_INVALID)),
            "{why}: {sent:?}"
        );
        match s.outcome().or_else(|| Some(ch.error())) {
            Some(Error::Protocol { code, text }) => {
                assert_eq!(code, reply_code::COMMAND_INVALID);
                assert!(
                    text.contains(why) && text.contains("last message"),
                    "{text}"
                );
            }
            other => panic!("{why}: {other:?}"),
        }
        for slot in &slots {
            assert!(
                !matches!(outcome(slot), Ok(Some(_))),
                "{why}: a message was marked confirmed"
            );
        }
    }
    // Not in confirm mode at all.
    let mut s = Scenario::new();
    let ch = s.open(1);
    s.feed_method(1, ack(1, false));
    assert!(
        matches!(ch.error(), Error::Protocol { code: 503, text } if text.contains("not in confirm mode"))
    );
    // Multiple with tag 0 ("all outstanding") and the last tag itself are no violation.
    let mut s = Scenario::new();
    let ch = s.open(1);
    ch.confirms.enable();
    for _ in 0..3 {
        ch.confirms.register(false, None).unwrap();
    }
    s.feed_method(1, ack(3, false));
    s.feed_method(1, ack(0, true));
    assert!(s.sent().is_empty());
    assert!(s.engine.is_open());
}

#[test]
fn returned_messages_reach_their_channel() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let mut bytes = method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
            reply_code: reply_code::NO_ROUTE,
            reply_text: "NO_ROUTE".into(),
            exchange: "ex".into(),
            routing_key: "nowhere".into(),
        })),
    );
    bytes.extend(content(
        1,
        &BasicProperties::new().content_type("t/p"),
        b"back",
        FRAME_MAX,
    ));
    s.feed(&bytes);
    let r = ch.returns.try_recv().expect("a return");
    assert_eq!(r.reply_code, reply_code::NO_ROUTE);
    assert_eq!(
        (r.exchange.as_str(), r.routing_key.as_str()),
        ("ex", "nowhere")
    );
    assert_eq!(r.body, b"back");
    assert!(r.properties.is_ok());
    assert!(s.sent().is_empty());
}

#[test]
fn returns_queued_unread_are_bounded_in_bytes() {
    let mut s = Scenario::with(0, ConnectionOptions::default().consumer_queue_bytes(10_000));
    let ch = s.open(1);
    let ret = |body: &[u8]| {
        let mut bytes = method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: reply_code::NO_ROUTE,
                reply_text: "NO_ROUTE".into(),
                exchange: "ex".into(),
                routing_key: "nowhere".into(),
            })),
        );
        bytes.extend(content(1, &BasicProperties::new(), body, FRAME_MAX));
        bytes
    };
    for _ in 0..3 {
        s.feed(&ret(&[1; 4000]));
    }
    assert_eq!(ch.returns.len(), 2, "the third is over 10,000 bytes");
    assert_eq!(ch.returns_dropped.load(crate::sync::Ordering::Relaxed), 1);
    // Taking one gives its bytes back (as Channel::recv_return does).
    let r = ch.returns.try_recv().unwrap();
    ch.returns_bytes
        .fetch_sub(r.cost(), crate::sync::Ordering::AcqRel);
    s.feed(&ret(&[2; 4000]));
    assert_eq!(ch.returns.len(), 2);
    // An empty queue takes one larger than the bound.
    while let Some(r) = ch.returns.try_recv() {
        ch.returns_bytes
            .fetch_sub(r.cost(), crate::sync::Ordering::AcqRel);
    }
    assert_eq!(ch.returns_bytes.load(crate::sync::Ordering::Acquire), 0);
    s.feed(&ret(&[3; 20_000]));
    assert_eq!(ch.returns.len(), 1);
    assert!(s.engine.is_open());
}

#[test]
fn blocked_and_unblocked_are_recorded() {
    let mut s = Scenario::new();
    s.feed_method(
        0,
        AMQPClass::Connection(C::Blocked(connection::Blocked {
            reason: "low on memory".into(),
        })),
    );
    assert_eq!(s.conn.blocked_reason().as_deref(), Some("low on memory"));
    s.feed_method(
        0,
        AMQPClass::Connection(C::Unblocked(connection::Unblocked {})),
    );
    assert_eq!(s.conn.blocked_reason(), None);
    assert!(s.sent().is_empty());
}

// ---------------- commands and wake-ups ----------------

#[test]
fn wake_ups_are_coalesced_per_batch_of_commands() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let before = s.wakes.count();
    ch.send(method(1, declare("a")), s.deadline(), "send")
        .unwrap();
    ch.send(method(1, declare("b")), s.deadline(), "send")
        .unwrap();
    assert_eq!(s.wakes.count(), before + 1, "one wake-up for two commands");
    s.drain();
    assert_eq!(
        s.sent(),
        [Sent::Method(1, declare("a")), Sent::Method(1, declare("b"))]
    );
    ch.send(method(1, declare("c")), s.deadline(), "send")
        .unwrap();
    assert_eq!(s.wakes.count(), before + 2, "a new batch wakes again");
}

#[test]
fn opening_a_channel_twice_is_refused() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let (tx, rx) = oneshot::channel();
    s.engine.on_command(
        Command::OpenChannel {
            shared: ch.clone(),
            bytes: method(
                1,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ),
            reply: tx,
            chained: Vec::new(),
        },
        s.now,
    );
    assert!(matches!(reply_now(&rx), Err(Error::InvalidArgument(_))));
    assert!(s.sent().is_empty());
}

/// `open_consumer`'s command: channel.open with basic.qos and basic.consume chained to
/// it is one hand-over, written in order in one piece; replies that come in one read go
/// each to its own waiter, and the consume-ok registers the consumer before its waiter
/// hears of it.
#[test]
fn requests_chained_to_an_open_go_with_it_and_are_answered_in_order() {
    let mut s = Scenario::new();
    let (tx, rx) = crate::sync::lightq::unbounded();
    let shared = crate::sync::Arc::new(crate::delivery::ConsumerShared::bounded(4, usize::MAX));
    let sink = crate::delivery::ConsumerSink {
        tx,
        shared: shared.clone(),
        no_ack: false,
        queue: "q".into(),
    };
    let qos = crate::protocol::methods::qos(5, false);
    let consume = crate::protocol::methods::consume("q", "t", false, false, false, &Default::default());
    let wakes = s.wakes.count();
    let (_ch, open_rx, [qos_rx, consume_rx]) = s
        .conn
        .open_channel_with(Some(1), [(qos.clone(), None), (consume.clone(), Some(sink))], s.deadline())
        .expect("queued");
    assert_eq!(s.wakes.count(), wakes + 1, "one hand-over for the three");
    s.drain();
    let open = AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}));
    assert_eq!(
        s.sent(),
        [Sent::Method(1, open), Sent::Method(1, qos), Sent::Method(1, consume)]
    );
    let mut replies = method(1, AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})));
    replies.extend(method(1, AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {}))));
    replies.extend(method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
            consumer_tag: "t".into(),
        })),
    ));
    s.feed(&replies);
    assert!(matches!(
        reply_now(&consume_rx),
        Ok(Reply::Method(AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))))
    ));
    assert!(matches!(
        reply_now(&open_rx),
        Ok(Reply::Method(AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))))
    ));
    assert!(matches!(
        reply_now(&qos_rx),
        Ok(Reply::Method(AMQPClass::Basic(basic::AMQPMethod::QosOk(_))))
    ));
    s.feed(&deliver(1, "t", 1, b"first"));
    let c = super::TestConsumer { rx, shared };
    assert!(matches!(c.take(), Some((ConsumerMsg::Delivery(d), _)) if d.body == b"first"));
    assert!(s.sent().is_empty());
}

/// An open the engine refuses (its id is taken) fails with its own error, and the
/// requests chained to it are neither sent nor left waiting: their replies are dropped.
#[test]
fn a_refused_open_drops_the_requests_chained_to_it() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let (tx, rx) = oneshot::channel();
    let (qos_tx, qos_rx) = oneshot::channel();
    let mut bytes = method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    );
    bytes.extend(method(1, crate::protocol::methods::qos(5, false)));
    s.engine.on_command(
        Command::OpenChannel {
            shared: ch.clone(),
            bytes,
            reply: tx,
            chained: vec![crate::io::Chained {
                reply: qos_tx,
                consumer: None,
                request: (60, 10),
            }],
        },
        s.now,
    );
    assert!(matches!(reply_now(&rx), Err(Error::InvalidArgument(_))));
    assert!(matches!(
        qos_rx.recv_deadline(s.deadline()),
        Err(oneshot::RecvError::Disconnected)
    ));
    assert!(s.sent().is_empty());
}

#[test]
fn update_secret_is_sent_and_its_ok_answers_the_waiter_in_order() {
    let mut s = Scenario::new();
    let update = |secret: &str| {
        AMQPClass::Connection(C::UpdateSecret(connection::UpdateSecret {
            new_secret: secret.to_string().into(),
            reason: "refresh".into(),
        }))
    };
    let (tx1, rx1) = oneshot::channel();
    let (tx2, rx2) = oneshot::channel();
    for (secret, tx) in [("one", tx1), ("two", tx2)] {
        s.conn
            .send(
                Command::UpdateSecret {
                    bytes: method(0, update(secret)),
                    reply: tx,
                },
                s.deadline(),
                "update-secret",
            )
            .unwrap();
    }
    s.drain();
    assert_eq!(
        s.sent(),
        [
            Sent::Method(0, update("one")),
            Sent::Method(0, update("two"))
        ]
    );
    let ok = AMQPClass::Connection(C::UpdateSecretOk(connection::UpdateSecretOk {}));
    s.feed_method(0, ok.clone());
    assert!(matches!(reply_now(&rx1), Ok(Reply::Method(m)) if m == ok));
    assert!(rx2.try_recv().is_none(), "the second waits for its own ok");
    s.feed_method(0, ok.clone());
    assert!(matches!(reply_now(&rx2), Ok(Reply::Method(m)) if m == ok));
    // An ok nobody waits for is harmless.
    s.feed_method(0, ok);
    assert!(s.engine.is_open());
    assert!(s.sent().is_empty());
}

#[test]
fn update_secret_waiter_wakes_when_the_link_fails() {
    let mut s = Scenario::new();
    let (tx, rx) = oneshot::channel();
    s.conn
        .send(
            Command::UpdateSecret {
                bytes: method(
                    0,
                    AMQPClass::Connection(C::UpdateSecret(connection::UpdateSecret {
                        new_secret: "x".to_string().into(),
                        reason: "r".into(),
                    })),
                ),
                reply: tx,
            },
            s.deadline(),
            "update-secret",
        )
        .unwrap();
    s.drain();
    s.engine.fail(Error::ConnectionLost(
        "the broker closed the TCP connection".into(),
    ));
    assert!(matches!(
        rx.recv_deadline(s.deadline()),
        Err(oneshot::RecvError::Disconnected)
    ));
}

// ---------------- byte bounds of consumer queues ----------------

#[test]
fn a_consumer_queue_full_in_bytes_stops_reading_until_the_consumer_takes_one() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let c = s.consume_bounded(&ch, "c", 1000, 10_000);
    let body = vec![7u8; 4000];
    for tag in 1..=2 {
        s.feed(&deliver(1, "c", tag, &body));
        assert!(!s.engine.is_stalled(), "delivery {tag} fits");
    }
    let held = c.shared.bytes.queued();
    assert!((8000..10_000).contains(&held), "{held} bytes charged");
    s.feed(&deliver(1, "c", 3, &body));
    assert!(s.engine.is_stalled(), "the third does not fit 10,000 bytes");
    assert_eq!(c.shared.queued.load(crate::sync::Ordering::Acquire), 2);
    let wakes = s.wakes.count();
    let (msg, _) = c.take().unwrap();
    assert!(matches!(msg, ConsumerMsg::Delivery(d) if d.delivery_tag() == 1));
    assert_eq!(s.wakes.count(), wakes + 1, "taking one woke the I/O thread");
    assert!(s.engine.retry_stalled());
    assert_eq!(c.shared.queued.load(crate::sync::Ordering::Acquire), 2);
    // Taken and dropped: everything given back.
    while c.take().is_some() {}
    assert_eq!(c.shared.bytes.queued(), 0);
}

#[test]
fn an_empty_consumer_queue_takes_one_message_larger_than_its_byte_bound() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let c = s.consume_bounded(&ch, "c", 1000, 100);
    s.feed(&deliver(1, "c", 1, &[1; 5000]));
    assert!(!s.engine.is_stalled());
    s.feed(&deliver(1, "c", 2, b"x"));
    assert!(s.engine.is_stalled());
    drop(c.take());
    assert!(s.engine.retry_stalled());
}

#[test]
fn the_connection_byte_bound_holds_across_consumers() {
    let mut s = Scenario::with(
        0,
        ConnectionOptions::default().connection_queue_bytes(10_000),
    );
    let ch = s.open(1);
    let a = s.consume(&ch, "a", 1000);
    let b = s.consume(&ch, "b", 1000);
    let body = vec![7u8; 4000];
    s.feed(&deliver(1, "a", 1, &body));
    s.feed(&deliver(1, "a", 2, &body));
    assert!(!s.engine.is_stalled());
    s.feed(&deliver(1, "b", 3, &body));
    assert!(
        s.engine.is_stalled(),
        "b's queue is empty, but the connection is full"
    );
    assert!(b.take().is_none());
    let wakes = s.wakes.count();
    drop(a.take().unwrap());
    assert!(s.wakes.count() > wakes, "a's take woke the I/O thread");
    assert!(s.engine.retry_stalled());
    assert!(matches!(b.take(), Some((ConsumerMsg::Delivery(d), _)) if d.delivery_tag() == 3));
}

/// RabbitMQ answers a `queue.delete` before the `basic.cancel-ok` of a consumer of that
/// queue cancelled just before: each reply still reaches its own waiter.
#[test]
fn replies_reach_the_waiter_of_the_request_they_answer() {
    let mut s = Scenario::new();
    let ch = s.open(1);
    let _c = s.consume(&ch, "t", 4);
    let cancel = s.rpc(
        &ch,
        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
            consumer_tag: "t".into(),
            nowait: false,
        })),
        None,
    );
    let delete = s.rpc(
        &ch,
        AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: "q".into(),
            if_unused: false,
            if_empty: false,
            nowait: false,
        })),
        None,
    );
    s.sent();
    s.feed_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
            message_count: 3,
        })),
    );
    s.feed_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
            consumer_tag: "t".into(),
        })),
    );
    assert!(matches!(
        reply_now(&delete),
        Ok(Reply::Method(AMQPClass::Queue(
            queue::AMQPMethod::DeleteOk(_)
        )))
    ));
    assert!(matches!(
        reply_now(&cancel),
        Ok(Reply::Method(AMQPClass::Basic(
            basic::AMQPMethod::CancelOk(_)
        )))
    ));
    assert!(s.engine.is_open());
}
