//! Hostile strings: routing keys and exchange names that are not UTF-8 in deliveries,
//! returns and get-oks (any publisher chooses them, and RabbitMQ forwards them), and
//! close methods whose reply text is malformed. One bad message costs that message only;
//! a close keeps its reply code.

mod support;

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, channel};
use lepus::{
    BadDeliveryKind, Connection, ConsumeOptions, Error, QueueDeclareOptions, RecoveryOptions,
    RecvError, reply_code,
};
use lepus_testkit::frames::*;
use lepus_testkit::{FakeBroker, Peer, Tune, within};
use support::ClientOptions;

const TEST_LIMIT: Duration = Duration::from_secs(30);

use lepus_testkit::is_reject;

fn is_ack(tag: u64) -> impl Fn(u16, &AMQPClass) -> Option<()> {
    move |_, m| match m {
        AMQPClass::Basic(basic::AMQPMethod::Ack(a)) if a.delivery_tag == tag => Some(()),
        _ => None,
    }
}

fn undecodable(kind: &BadDeliveryKind) -> &str {
    match kind {
        BadDeliveryKind::Undecodable(why) => why,
        other => panic!("expected Undecodable, got {other:?}"),
    }
}

/// A whole content after `method`: header and body.
fn send_content(p: &mut Peer, ch: u16, method: Vec<u8>, body: &[u8]) {
    let mut out = method;
    out.extend(header_frame(ch, body.len() as u64, &no_props()));
    out.extend(body_frame(ch, body));
    p.send(&out);
}

// ---------------------------------------------------------------------------------------
// 1. Content methods with strings that are not UTF-8
// ---------------------------------------------------------------------------------------

#[test]
fn deliver_with_non_utf8_routing_key_and_exchange_is_a_rejectable_bad_delivery() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.handshake(Tune::default());
            let ch = p.serve_channel_open();
            let (_, tag) = p.serve_consume();
            let t = tag.as_bytes();
            send_content(
                p,
                ch,
                deliver_frame_raw(ch, t, 1, b"ex", b"rk\xff\xfe"),
                b"a",
            );
            send_content(p, ch, deliver_frame_raw(ch, t, 2, b"\xc3(", b"rk"), b"b");
            p.deliver(ch, &tag, 3, &no_props(), b"good");
            p.wait_for("basic.reject", is_reject(1, false));
            p.wait_for("basic.reject", is_reject(2, true));
            p.wait_for("basic.ack", is_ack(3));
            p.expect_connection_close().reply_code
        });
        let conn = Connection::open_with(broker.options()).unwrap();
        let ch = conn.open_channel().unwrap();
        let consumer = ch.basic_consume("q", &ConsumeOptions::default()).unwrap();
        let r = consumer.recv_timeout(Duration::from_secs(5));
        let Err(RecvError::Bad(bad)) = r else {
            panic!("expected a bad delivery, got {r:?}")
        };
        assert_eq!(bad.delivery_tag(), 1);
        let why = undecodable(bad.kind());
        assert!(
            why.contains("routing key is not UTF-8: b\"rk\\xff\\xfe\""),
            "{why}"
        );
        assert_eq!(bad.routing_key(), "rk\u{fffd}\u{fffd}");
        assert_eq!(bad.body(), b"a");
        bad.reject(false).unwrap();
        let r = consumer.recv_timeout(Duration::from_secs(5));
        let Err(RecvError::Bad(bad)) = r else {
            panic!("expected a bad delivery, got {r:?}")
        };
        assert_eq!(bad.delivery_tag(), 2);
        assert!(undecodable(bad.kind()).contains("exchange is not UTF-8"));
        bad.reject(true).unwrap();
        let d = consumer
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .expect("a delivery in time");
        assert_eq!((d.delivery_tag(), d.body()), (3, &b"good"[..]));
        d.ack().unwrap();
        assert!(conn.is_open() && ch.is_open());
        conn.close().unwrap();
        assert_eq!(broker.finish(), reply_code::REPLY_SUCCESS);
    });
}

#[test]
fn return_with_non_utf8_routing_key_reaches_recv_return_as_undecodable() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.handshake(Tune::default());
            let ch = p.serve_channel_open();
            send_content(
                p,
                ch,
                return_frame_raw(ch, 312, b"NO_ROUTE", b"ex\xff", b"\x80rk"),
                b"returned",
            );
            // Still answering on that channel afterwards.
            p.serve_qos();
            p.expect_connection_close().reply_code
        });
        let conn = Connection::open_with(broker.options()).unwrap();
        let ch = conn.open_channel().unwrap();
        let r = ch
            .recv_return(Duration::from_secs(5))
            .expect("the channel lives")
            .expect("the return arrives");
        assert_eq!(r.reply_code, reply_code::NO_ROUTE);
        assert_eq!(r.reply_text, "NO_ROUTE");
        assert_eq!(r.routing_key, "\u{fffd}rk");
        assert_eq!(r.body, b"returned");
        let why = match &r.properties {
            Err(k) => undecodable(k).to_string(),
            Ok(p) => panic!("expected undecodable properties, got {p:?}"),
        };
        assert!(why.contains("routing key is not UTF-8"), "{why}");
        assert!(why.contains("exchange is not UTF-8"), "{why}");
        ch.basic_qos(5, false).unwrap();
        assert!(conn.is_open() && ch.is_open());
        conn.close().unwrap();
        assert_eq!(broker.finish(), reply_code::REPLY_SUCCESS);
    });
}

#[test]
fn get_ok_with_non_utf8_exchange_is_a_rejectable_bad_delivery() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.handshake(Tune::default());
            let ch = p.serve_channel_open();
            p.expect("basic.get", |_, m| {
                matches!(m, AMQPClass::Basic(basic::AMQPMethod::Get(_))).then_some(())
            });
            send_content(
                p,
                ch,
                get_ok_frame_raw(ch, 7, b"\xff\xff", b"rk", 4),
                b"got",
            );
            p.wait_for("basic.reject", is_reject(7, false));
            p.expect_connection_close().reply_code
        });
        let conn = Connection::open_with(broker.options()).unwrap();
        let ch = conn.open_channel().unwrap();
        let r = ch.basic_get("q", false);
        let Err(RecvError::Bad(bad)) = r else {
            panic!("expected a bad delivery, got {r:?}")
        };
        assert_eq!(bad.delivery_tag(), 7);
        assert_eq!(bad.routing_key(), "rk");
        assert_eq!(bad.body(), b"got");
        assert!(undecodable(bad.kind()).contains("exchange is not UTF-8: b\"\\xff\\xff\""));
        bad.reject(false).unwrap();
        assert!(conn.is_open() && ch.is_open());
        conn.close().unwrap();
        assert_eq!(broker.finish(), reply_code::REPLY_SUCCESS);
    });
}

/// Through RabbitMQ: a raw-socket publisher sends a routing key that is not UTF-8 to a
/// fanout exchange; the broker forwards it. The consumer and a `basic.get` caller get a
/// bad delivery each, reject it, and the next message arrives on the same connection.
#[test]
fn non_utf8_routing_key_through_rabbitmq_costs_only_that_message() {
    within(Duration::from_secs(60), || {
        let cleanup = support::Cleanup::new();
        let conn = support::connect();
        let ch = conn.open_channel().unwrap();
        let q = cleanup.queue(&support::unique("hostile-utf8-rk"));
        let ex = cleanup.exchange(&support::unique("hostile-utf8-fanout"));
        ch.queue_declare(
            &q,
            &QueueDeclareOptions {
                arguments: lepus::FieldTable::new().with("x-expires", 120_000),
                ..Default::default()
            },
        )
        .unwrap();
        ch.exchange_declare(&ex, "fanout", &lepus::ExchangeDeclareOptions::default())
            .unwrap();
        ch.queue_bind(&q, &ex, "", &lepus::FieldTable::new())
            .unwrap();

        let publish_bad = |n: u64| {
            let mut c =
                lepus_testkit::RawClient::connect(support::broker_addr(), "guest", "guest", "/")
                    .unwrap();
            c.open_channels(1..=1).unwrap();
            c.confirm_select(1).unwrap();
            for i in 1..=n {
                let mut out = publish_frame_raw(1, ex.as_bytes(), b"key-\xff\xfe-not-utf8");
                out.extend(content_frames(
                    1,
                    &no_props(),
                    format!("bad {i}").as_bytes(),
                    c.frame_max(),
                ));
                c.io().send(&out).unwrap();
                c.expect_ack(1, i)
                    .expect("RabbitMQ accepts the routing key");
            }
            c.close().unwrap();
        };
        publish_bad(2);
        ch.confirm_select().unwrap();
        support::publish_confirmed(&ch, &ex, "fine", b"normal");

        // basic.get first: the oldest bad message.
        let r = ch.basic_get(&q, false);
        let Err(RecvError::Bad(bad)) = r else {
            panic!("expected a bad delivery from basic.get, got {r:?}")
        };
        assert!(undecodable(bad.kind()).contains("routing key is not UTF-8"));
        assert_eq!(bad.body(), b"bad 1");
        assert_eq!(bad.exchange(), ex);
        bad.reject(false).unwrap();

        let cch = conn.open_channel().unwrap();
        let consumer = cch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
        let r = consumer.recv_timeout(Duration::from_secs(10));
        let Err(RecvError::Bad(bad)) = r else {
            panic!("expected a bad delivery, got {r:?}")
        };
        assert_eq!(bad.body(), b"bad 2");
        assert_eq!(bad.routing_key(), "key-\u{fffd}\u{fffd}-not-utf8");
        bad.reject(false).unwrap();
        let d = consumer
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("a delivery in time");
        assert_eq!(d.body(), b"normal");
        d.ack().unwrap();
        assert!(conn.is_open() && ch.is_open() && cch.is_open());

        drop(consumer);
        cch.close().unwrap();
        let info = ch
            .queue_declare(
                &q,
                &QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!((info.message_count, info.consumer_count), (0, 0));
        ch.queue_delete(&q, &Default::default()).unwrap();
        conn.close().unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// 2. Close methods with malformed reply text keep their reply code
// ---------------------------------------------------------------------------------------

/// connection.close `code` whose text is `text` (announced as `len` bytes) followed by
/// `trailing`: the user sees `code`.
fn connection_close_case(code: u16, len: u8, text: &'static [u8], trailing: &'static [u8]) {
    within(TEST_LIMIT, move || {
        let broker = FakeBroker::start(move |p| {
            p.handshake(Tune::default());
            p.serve_channel_open();
            p.send(&close_frame_raw(0, code, len, text, trailing));
            p.expect("connection.close-ok", |ch, m| {
                (ch == 0
                    && matches!(
                        m,
                        AMQPClass::Connection(
                            amq_protocol::protocol::connection::AMQPMethod::CloseOk(_)
                        )
                    ))
                .then_some(())
            });
        });
        let conn =
            Connection::open_with(broker.options().recovery(RecoveryOptions::disabled())).unwrap();
        let ch = conn.open_channel().unwrap();
        broker.finish();
        support::wait_until(Duration::from_secs(5), || !conn.is_open());
        match conn.close_reason() {
            Some(Error::ServerClosedConnection { code: c, .. }) if c == code => {}
            other => panic!("expected ServerClosedConnection {code}, got {other:?}"),
        }
        assert_eq!(
            ch.queue_declare("x", &Default::default())
                .unwrap_err()
                .reply_code(),
            Some(code)
        );
    });
}

#[test]
fn connection_close_with_non_utf8_text_keeps_its_code() {
    connection_close_case(reply_code::ACCESS_REFUSED, 6, b"no \xff\xfe!", b"");
}

#[test]
fn connection_close_with_trailing_bytes_keeps_its_code() {
    connection_close_case(reply_code::INTERNAL_ERROR, 4, b"oops", b"\x01\x02\x03");
}

#[test]
fn connection_close_with_text_longer_than_the_frame_keeps_its_code() {
    // The text announces 255 bytes; 4 follow (then the 4 id bytes the builder adds).
    connection_close_case(reply_code::INTERNAL_ERROR, 255, b"cut!", b"");
}

#[test]
fn channel_close_with_malformed_text_keeps_its_code_and_the_connection() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.handshake(Tune::default());
            let ch = p.serve_channel_open();
            p.send(&close_frame_raw(
                ch,
                reply_code::PRECONDITION_FAILED,
                200,
                b"\xffbad",
                b"",
            ));
            p.expect("channel.close-ok", |c, m| {
                (c == ch && matches!(m, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))))
                    .then_some(())
            });
            let ch2 = p.serve_channel_open();
            p.send(&close_frame_raw(
                ch2,
                reply_code::NOT_FOUND,
                3,
                b"n\xc3f",
                b"xx",
            ));
            p.expect("channel.close-ok", |c, m| {
                (c == ch2 && matches!(m, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))))
                    .then_some(())
            });
            p.expect_connection_close().reply_code
        });
        let conn = Connection::open_with(broker.options()).unwrap();
        let ch = conn.open_channel().unwrap();
        support::wait_until(Duration::from_secs(5), || !ch.is_open());
        match ch.queue_declare("x", &Default::default()) {
            Err(Error::ServerClosedChannel { code: 406, .. }) => {}
            other => panic!("expected ServerClosedChannel 406, got {other:?}"),
        }
        let _ = ch;
        let ch2 = conn.open_channel().unwrap();
        support::wait_until(Duration::from_secs(5), || !ch2.is_open());
        match ch2.queue_declare("x", &Default::default()) {
            Err(Error::ServerClosedChannel {
                code: 404, text, ..
            }) => {
                assert_eq!(text, "n\u{fffd}f")
            }
            other => panic!("expected ServerClosedChannel 404, got {other:?}"),
        }
        assert!(conn.is_open());
        conn.close().unwrap();
        assert_eq!(broker.finish(), reply_code::REPLY_SUCCESS);
    });
}

/// A 320 (broker shutting down) with a reply text that is not UTF-8 is still a lost link:
/// the connection recovers onto the next connection of the broker.
#[test]
fn connection_forced_with_non_utf8_text_still_recovers() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start_many(2, |i, p| {
            p.handshake(Tune::default());
            p.serve_channel_open();
            if i == 0 {
                p.send(&close_frame_raw(
                    0,
                    reply_code::CONNECTION_FORCED,
                    30,
                    b"CONNECTION_FORCED \xff\xfe shutdown",
                    b"\x00",
                ));
                p.wait_for("connection.close-ok", |ch, m| {
                    (ch == 0
                        && matches!(
                            m,
                            AMQPClass::Connection(
                                amq_protocol::protocol::connection::AMQPMethod::CloseOk(_)
                            )
                        ))
                    .then_some(())
                });
                0
            } else {
                // Recovery: whatever channels the replay opens and closes (channel 1
                // again, maybe a scratch channel for the topology), then the test's qos.
                loop {
                    use amq_protocol::protocol::{basic, channel, connection};
                    let m = p.wait_for("recovery traffic", |ch, m| Some((ch, m.clone())));
                    match m {
                        (ch, AMQPClass::Channel(channel::AMQPMethod::Open(_))) => p.send_method(
                            ch,
                            AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                        ),
                        (ch, AMQPClass::Channel(channel::AMQPMethod::Close(_))) => p.send_method(
                            ch,
                            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                        ),
                        (ch, AMQPClass::Basic(basic::AMQPMethod::Qos(_))) => p.send_method(
                            ch,
                            AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                        ),
                        (0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                            p.send_method(
                                0,
                                AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                    connection::CloseOk {},
                                )),
                            );
                            break c.reply_code;
                        }
                        (ch, other) => panic!("fake broker: unexpected {other:?} on {ch}"),
                    }
                }
            }
        });
        let conn = Connection::open_with(broker.options()).unwrap();
        let ch = conn.open_channel().unwrap();
        assert_eq!(conn.generation(), 1);
        support::wait_until(Duration::from_secs(10), || {
            conn.generation() == 2 && conn.is_open() && ch.is_open()
        });
        let detected = conn
            .recovery_events()
            .into_iter()
            .find_map(|e| match e.kind {
                lepus::RecoveryEventKind::FailureDetected(why) => Some(why),
                _ => None,
            })
            .expect("a failure was detected");
        assert!(detected.contains("320"), "{detected}");
        ch.basic_qos(3, false).unwrap();
        conn.close().unwrap();
        assert_eq!(broker.finish(), vec![0, reply_code::REPLY_SUCCESS]);
    });
}
