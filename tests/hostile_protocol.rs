//! Hostile protocol points: deliveries for no consumer of ours, confirms for messages
//! never published, and the handshake's tune and start-ok stages. Each test drives a
//! scripted fake broker and asserts what the application sees.

mod support;

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, confirm, connection};
use amq_protocol::types::{AMQPValue, FieldTable as AmqpTable};
use lepus::{
    BasicProperties, Connection, ConsumeOptions, Error, HandshakeStage, PublishOptions,
    RecoveryOptions, reply_code,
};
use lepus_testkit::frames::*;
use lepus_testkit::{FakeBroker, Tune, within};
use support::ClientOptions;

const TEST_LIMIT: Duration = Duration::from_secs(30);

fn is_reject(tag: u64) -> impl Fn(u16, &AMQPClass) -> Option<()> {
    move |_, m| match m {
        AMQPClass::Basic(basic::AMQPMethod::Reject(r)) if r.delivery_tag == tag && r.requeue => {
            Some(())
        }
        AMQPClass::Basic(basic::AMQPMethod::Ack(a)) if a.delivery_tag == tag => {
            panic!("delivery {tag} acked instead of rejected")
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// 4. Deliveries nobody will handle
// ---------------------------------------------------------------------------------------

/// A delivery for a tag we never had, on a channel without consumers, and for a consumer
/// whose cancel-ok came: each is rejected with requeue (so it goes to another consumer)
/// and counted; the channel and its real consumer carry on.
#[test]
fn deliveries_for_no_consumer_are_rejected_counted_and_the_channel_carries_on() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.handshake(Tune::default());
            let ch = p.serve_channel_open();
            // No consumer yet.
            p.deliver(ch, "nobody", 1, &no_props(), b"orphan 1");
            p.wait_for("basic.reject", is_reject(1));
            let (_, tag) = p.serve_consume();
            p.deliver(ch, "someone-else", 2, &no_props(), b"orphan 2");
            p.deliver(ch, &tag, 3, &no_props(), b"mine");
            p.wait_for("basic.reject", is_reject(2));
            // The application cancels; a delivery after cancel-ok is an orphan too.
            p.expect("basic.cancel", |_, m| {
                matches!(m, AMQPClass::Basic(basic::AMQPMethod::Cancel(_))).then_some(())
            });
            p.send_method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                    consumer_tag: tag.as_str().into(),
                })),
            );
            p.deliver(ch, &tag, 4, &no_props(), b"late");
            p.wait_for("basic.reject", is_reject(4));
            p.serve_qos();
            p.expect_connection_close().reply_code
        });
        let conn = Connection::open_with(broker.options()).unwrap();
        let ch = conn.open_channel().unwrap();
        assert!(support::wait_until(Duration::from_secs(5), || ch
            .orphan_deliveries()
            == 1));
        let consumer = ch.basic_consume("q", &ConsumeOptions::default()).unwrap();
        let d = consumer.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((d.delivery_tag(), d.body()), (3, &b"mine"[..]));
        assert_eq!(ch.orphan_deliveries(), 2);
        consumer.cancel().unwrap();
        assert!(support::wait_until(Duration::from_secs(5), || ch
            .orphan_deliveries()
            == 3));
        ch.basic_qos(1, false).unwrap();
        assert!(conn.is_open() && ch.is_open());
        conn.close().unwrap();
        assert_eq!(broker.finish(), reply_code::REPLY_SUCCESS);
    });
}

// ---------------------------------------------------------------------------------------
// 5. Confirms for messages never published
// ---------------------------------------------------------------------------------------

fn confirm_violation_case(ack: basic::AMQPMethod, expect_in_text: &'static str) {
    within(TEST_LIMIT, move || {
        let broker = FakeBroker::start(move |p| {
            p.handshake(Tune::default());
            let ch = p.serve_channel_open();
            p.expect("confirm.select", |_, m| {
                matches!(m, AMQPClass::Confirm(confirm::AMQPMethod::Select(_))).then_some(())
            });
            p.send_method(
                ch,
                AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
            );
            for _ in 0..2 {
                p.wait_for("basic.publish", |_, m| {
                    matches!(m, AMQPClass::Basic(basic::AMQPMethod::Publish(_))).then_some(())
                });
            }
            p.send_method(ch, AMQPClass::Basic(ack));
            p.expect_connection_close()
        });
        let conn =
            Connection::open_with(broker.options().recovery(RecoveryOptions::disabled())).unwrap();
        let ch = conn.open_channel().unwrap();
        ch.confirm_select().unwrap();
        let c1 = ch
            .basic_publish_confirmed(
                "",
                "q",
                b"1",
                &BasicProperties::default(),
                PublishOptions::default(),
            )
            .unwrap();
        let c2 = ch
            .basic_publish_confirmed(
                "",
                "q",
                b"2",
                &BasicProperties::default(),
                PublishOptions::default(),
            )
            .unwrap();
        for c in [c1, c2] {
            match c.wait() {
                Err(Error::Protocol { code, text }) => {
                    assert_eq!(code, reply_code::COMMAND_INVALID);
                    assert!(text.contains(expect_in_text), "{text}");
                }
                other => panic!("expected the protocol violation, got {other:?}"),
            }
        }
        let close = broker.finish();
        assert_eq!(close.reply_code, reply_code::COMMAND_INVALID);
        assert!(
            close
                .reply_text
                .as_str()
                .contains("last message published there has tag 2"),
            "{}",
            close.reply_text
        );
        assert!(!conn.is_open());
    });
}

#[test]
fn ack_for_a_tag_never_published_closes_the_connection() {
    confirm_violation_case(
        basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 7,
            multiple: false,
        }),
        "basic.ack for delivery tag 7 on channel",
    );
}

#[test]
fn multiple_nack_past_the_last_tag_closes_the_connection() {
    confirm_violation_case(
        basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: 3,
            multiple: true,
            requeue: false,
        }),
        "basic.nack for delivery tag 3 (multiple)",
    );
}

// ---------------------------------------------------------------------------------------
// 5. The handshake
// ---------------------------------------------------------------------------------------

#[test]
fn tune_with_frame_max_below_4096_is_refused() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.expect_protocol_header();
            p.send_start();
            p.expect_start_ok();
            p.send_tune(Tune {
                frame_max: 1024,
                ..Tune::default()
            });
            p.wait_eof(Duration::from_secs(5))
        });
        let err = Connection::open_with(broker.options()).unwrap_err();
        match &err {
            Error::Protocol { code, text } => {
                assert_eq!(*code, reply_code::NOT_ALLOWED);
                assert!(
                    text.contains("frame_max 1024") && text.contains("4096"),
                    "{text}"
                );
            }
            other => panic!("expected a protocol error, got {other:?}"),
        }
        assert!(broker.finish(), "the client hung up");
    });
}

#[test]
fn tune_ok_never_asks_more_than_the_server_proposed() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.expect_protocol_header();
            p.send_start();
            p.expect_start_ok();
            p.send_tune(Tune {
                channel_max: 7,
                frame_max: 4096,
                heartbeat: 0,
            });
            let agreed = p.expect_tune_ok_and_open();
            p.send_open_ok();
            p.expect_connection_close();
            agreed
        });
        let conn =
            Connection::open_with(broker.options().frame_max(1 << 20).channel_max(100)).unwrap();
        assert_eq!((conn.frame_max(), conn.channel_max()), (4096, 7));
        conn.close().unwrap();
        let agreed = broker.finish();
        assert_eq!((agreed.frame_max, agreed.channel_max), (4096, 7));
    });
}

#[test]
fn reset_after_start_ok_is_an_io_error_not_an_authentication_failure() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.expect_protocol_header();
            p.send_start();
            p.expect_start_ok();
            p.reset_on_end();
        });
        let err = Connection::open_with(broker.options()).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Io {
                    stage: HandshakeStage::Tune,
                    ..
                }
            ),
            "{err:?}"
        );
        broker.finish();
    });
}

#[test]
fn close_403_after_start_ok_is_an_authentication_failure() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.expect_protocol_header();
            p.send_start();
            p.expect_start_ok();
            p.send_method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: reply_code::ACCESS_REFUSED,
                    reply_text: "ACCESS_REFUSED - Login was refused".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            );
        });
        let err = Connection::open_with(broker.options()).unwrap_err();
        assert!(
            matches!(&err, Error::AuthenticationFailed(t) if t.contains("Login was refused")),
            "{err:?}"
        );
        broker.finish();
    });
}

#[test]
fn connection_start_larger_than_the_pre_tune_limit_says_so() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.expect_protocol_header();
            let mut props = AmqpTable::default();
            props.insert(
                "padding".into(),
                AMQPValue::LongString("x".repeat(100_000).into()),
            );
            let start = method_frame(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                    version_major: 0,
                    version_minor: 9,
                    server_properties: props,
                    mechanisms: "PLAIN".into(),
                    locales: "en_US".into(),
                })),
            );
            p.send_lenient(&start);
        });
        let err = Connection::open_with(broker.options()).unwrap_err();
        match &err {
            Error::Protocol { code, text } => {
                assert_eq!(*code, reply_code::FRAME_ERROR);
                assert!(
                    text.contains("before tuning") && text.contains("connection.start"),
                    "{text}"
                );
            }
            other => panic!("expected a frame error naming the too-large start, got {other:?}"),
        }
        broker.finish();
    });
}
