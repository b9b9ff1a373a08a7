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
        let d = consumer
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .expect("a delivery in time");
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
                &PublishOptions::default(),
            )
            .unwrap();
        let c2 = ch
            .basic_publish_confirmed(
                "",
                "q",
                b"2",
                &BasicProperties::default(),
                &PublishOptions::default(),
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

// ---------------------------------------------------------------------------------------
// A candidate connection of a recovery that fails on a protocol error
// ---------------------------------------------------------------------------------------

/// What a recovering fake broker answers: channel open/close, passive declares, qos and
/// consumes (under the tag asked for), until the client closes; `after_consume` runs once
/// a consume is answered. Returns the reply code of the client's close.
fn serve_recovery(
    p: &mut lepus_testkit::Peer,
    mut after_consume: impl FnMut(&mut lepus_testkit::Peer, u16, &str),
) -> u16 {
    use amq_protocol::protocol::{channel, queue};
    loop {
        let (ch, m) = p.wait_for("recovery traffic", |ch, m| Some((ch, m.clone())));
        match m {
            AMQPClass::Channel(channel::AMQPMethod::Open(_)) => p.send_method(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            ),
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => p.send_method(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
            ),
            AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => p.send_method(
                ch,
                AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                    queue: d.queue.clone(),
                    message_count: 0,
                    consumer_count: 0,
                })),
            ),
            AMQPClass::Basic(basic::AMQPMethod::Qos(_)) => p.send_method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
            ),
            AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => {
                let tag = c.consumer_tag.to_string();
                p.send_method(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: tag.clone().into(),
                    })),
                );
                after_consume(p, ch, &tag);
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) => p.send_method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                    consumer_tag: c.consumer_tag.clone(),
                })),
            ),
            AMQPClass::Basic(basic::AMQPMethod::Ack(_)) => {}
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                p.send_method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                return c.reply_code;
            }
            other => panic!("fake broker: unexpected {other:?} on channel {ch}"),
        }
    }
}

/// A candidate connection of a running recovery that fails on a protocol error (here a
/// reply nobody asked for, as a restarting cluster node once sent during a replay)
/// must not end the consumers it was restoring: the recovery goes on to its next attempt,
/// and the same `Consumer`s receive on the connection after it. Two consumers, so that
/// the replay still waits for the second consume-ok when the stray one arrives: the
/// candidate fails before it could be installed.
#[test]
fn a_candidate_failing_on_a_protocol_error_keeps_its_consumers() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start_many(3, |i, p| {
            p.handshake(Tune::default());
            match i {
                0 => {
                    p.serve_channel_open();
                    p.serve_consume();
                    p.serve_consume();
                    // The node shuts down: recovery follows.
                    p.send_method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                            reply_code: reply_code::CONNECTION_FORCED,
                            reply_text: "CONNECTION_FORCED - shutdown".into(),
                            class_id: 0,
                            method_id: 0,
                        })),
                    );
                    p.wait_for("connection.close-ok", |ch, m| {
                        (ch == 0
                            && matches!(
                                m,
                                AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))
                            ))
                        .then_some(())
                    });
                    0
                }
                // The candidate: the first consumer is subscribed again, then a reply to
                // nothing ends this connection (505).
                1 => {
                    let mut sent = false;
                    serve_recovery(p, move |p, ch, _| {
                        if !std::mem::replace(&mut sent, true) {
                            p.send_method(
                                ch,
                                AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                            )
                        }
                    })
                }
                _ => serve_recovery(p, |p, ch, tag| {
                    p.deliver(ch, tag, 1, &no_props(), tag.as_bytes())
                }),
            }
        });
        let conn = Connection::open_with(broker.options().recovery(
            RecoveryOptions::new().backoff(Duration::from_millis(10), Duration::from_millis(50)),
        ))
        .unwrap();
        let ch = conn.open_channel().unwrap();
        let consumers = [
            ch.basic_consume("q1", &ConsumeOptions::default()).unwrap(),
            ch.basic_consume("q2", &ConsumeOptions::default()).unwrap(),
        ];
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for consumer in &consumers {
            let delivery = loop {
                match consumer.recv_deadline(deadline) {
                    Ok(Some(d)) => break d,
                    Ok(None) => panic!(
                        "consumer {}: no delivery within 20 s; events {:#?}",
                        consumer.tag(),
                        conn.recovery_events()
                    ),
                    // The lost links pass by (a recovery follows each).
                    Err(e) if e.is_connection_lost() => continue,
                    Err(e) => panic!(
                        "consumer {} ended: {e}; events {:#?}",
                        consumer.tag(),
                        conn.recovery_events()
                    ),
                }
            };
            assert_eq!(delivery.body(), consumer.tag().as_bytes());
        }
        // The deliveries may come before the replay installs the third connection.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while conn.generation() != 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(conn.generation(), 3, "{:#?}", conn.recovery_events());
        conn.close().unwrap();
        assert_eq!(
            broker.finish(),
            vec![0, reply_code::UNEXPECTED_FRAME, reply_code::REPLY_SUCCESS]
        );
    });
}
