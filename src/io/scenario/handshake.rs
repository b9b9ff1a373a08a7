//! The handshake, state by state: `ExpectStart → ExpectTune → ExpectOpenOk`.

use amq_protocol::protocol::connection::{self, AMQPMethod as C};
use amq_protocol::protocol::{AMQPClass, basic};

use super::super::handshake::{Expect, FRAME_MAX_CAP, Handshake, not_amqp};
use super::{Sent, decode_all, method, raw_frame};
use crate::error::{Error, Result, reply_code};
use crate::io::Tuned;
use crate::options::{AuthMechanism, ConnectionOptions};
use crate::protocol::frame::{FRAME_BODY, FrameDecoder, put_heartbeat};
use crate::protocol::table::{FieldTable, FieldValue, table_from_amqp, table_to_amqp};

type Done = Option<(Tuned, FieldTable)>;

/// A handshake and the bytes it wrote.
struct Hs<'a> {
    hs: Handshake<'a>,
    out: Vec<u8>,
}

impl<'a> Hs<'a> {
    fn new(opts: &'a ConnectionOptions) -> Self {
        Hs {
            hs: Handshake::new(opts),
            out: Vec::new(),
        }
    }

    fn feed(&mut self, bytes: &[u8]) -> Result<Done> {
        let mut dec = FrameDecoder::new(64 * 1024);
        dec.feed(bytes);
        let f = dec.next_frame().expect("a frame").expect("a whole frame");
        self.hs.on_frame(f, &mut self.out)
    }

    fn feed_method(&mut self, m: C) -> Result<Done> {
        self.feed(&method(0, AMQPClass::Connection(m)))
    }

    fn sent(&mut self) -> Vec<Sent> {
        decode_all(&std::mem::take(&mut self.out), 64 * 1024)
    }

    /// Through start: now expecting tune.
    fn started(opts: &'a ConnectionOptions) -> Self {
        let mut h = Hs::new(opts);
        assert!(matches!(
            h.feed_method(start(0, 9, "PLAIN AMQPLAIN")),
            Ok(None)
        ));
        h.sent();
        assert_eq!(h.hs.expect, Expect::Tune);
        h
    }

    /// Through tune: now expecting open-ok.
    fn tuned(opts: &'a ConnectionOptions) -> Self {
        let mut h = Hs::started(opts);
        assert!(matches!(h.feed_method(tune(100, 8192, 30)), Ok(None)));
        h.sent();
        assert_eq!(h.hs.expect, Expect::OpenOk);
        h
    }
}

fn start(major: u8, minor: u8, mechanisms: &str) -> C {
    let props = table_to_amqp(&FieldTable::new().with("product", "RabbitMQ"));
    C::Start(connection::Start {
        version_major: major,
        version_minor: minor,
        server_properties: props,
        mechanisms: mechanisms.into(),
        locales: "en_US".into(),
    })
}

fn tune(channel_max: u16, frame_max: u32, heartbeat: u16) -> C {
    C::Tune(connection::Tune {
        channel_max,
        frame_max,
        heartbeat,
    })
}

fn close(code: u16, text: &str) -> C {
    C::Close(connection::Close {
        reply_code: code,
        reply_text: text.into(),
        class_id: 0,
        method_id: 0,
    })
}

fn close_ok() -> Sent {
    Sent::Method(0, AMQPClass::Connection(C::CloseOk(connection::CloseOk {})))
}

// ---------------- ExpectStart ----------------

#[test]
fn start_is_answered_with_start_ok_plain_credentials() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::new(&opts);
    assert!(matches!(
        h.feed_method(start(0, 9, "AMQPLAIN PLAIN")),
        Ok(None)
    ));
    assert_eq!(h.hs.expect, Expect::Tune);
    let sent = h.sent();
    let [Sent::Method(0, AMQPClass::Connection(C::StartOk(ok)))] = &sent[..] else {
        panic!("expected start-ok, got {sent:?}");
    };
    assert_eq!(ok.mechanism.as_str(), "PLAIN");
    assert_eq!(ok.response.as_bytes(), b"\0guest\0guest");
    assert_eq!(ok.locale.as_str(), "en_US");
    let props = table_from_amqp(ok.client_properties.clone());
    assert_eq!(props.get("product"), Some(&FieldValue::from("lepus")));
    assert!(props.get("capabilities").is_some());
}

#[test]
fn start_with_amqplain_chosen_sends_an_amqplain_response() {
    let opts = ConnectionOptions {
        auth: AuthMechanism::AmqPlain,
        ..ConnectionOptions::default()
    };
    let mut h = Hs::new(&opts);
    assert!(matches!(
        h.feed_method(start(0, 9, "PLAIN AMQPLAIN")),
        Ok(None)
    ));
    let sent = h.sent();
    let [Sent::Method(0, AMQPClass::Connection(C::StartOk(ok)))] = &sent[..] else {
        panic!("expected start-ok, got {sent:?}");
    };
    assert_eq!(ok.mechanism.as_str(), "AMQPLAIN");
    assert!(String::from_utf8_lossy(ok.response.as_bytes()).contains("LOGIN"));
}

#[test]
fn start_keeps_the_server_properties_for_open_ok() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::tuned(&opts);
    let (_, props) = h
        .feed_method(C::OpenOk(connection::OpenOk {}))
        .expect("open")
        .expect("done");
    assert_eq!(props.get("product"), Some(&FieldValue::from("RabbitMQ")));
}

#[test]
fn start_of_another_protocol_version_is_not_amqp() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::new(&opts);
    let err = h.feed_method(start(0, 8, "PLAIN")).unwrap_err();
    assert!(
        matches!(&err, Error::NotAmqp(t) if t.contains("0-8")),
        "{err:?}"
    );
    assert!(h.sent().is_empty());
}

#[test]
fn start_without_our_mechanism_fails_authentication() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::new(&opts);
    let err = h.feed_method(start(0, 9, "EXTERNAL")).unwrap_err();
    assert!(
        matches!(&err, Error::AuthenticationFailed(t) if t.contains("PLAIN") && t.contains("EXTERNAL")),
        "{err:?}"
    );
    assert!(h.sent().is_empty());
}

#[test]
fn undecodable_start_is_not_amqp() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::new(&opts);
    // connection.start cut after its ids
    let err = h.feed(&raw_frame(1, 0, &[0, 10, 0, 10, 0])).unwrap_err();
    assert!(matches!(err, Error::NotAmqp(_)), "{err:?}");
}

#[test]
fn protocol_header_instead_of_start_names_the_servers_version() {
    // A server that refuses our version answers with its own protocol header.
    let mut dec = FrameDecoder::new(64 * 1024);
    dec.feed(b"AMQP\x00\x00\x08\x00");
    assert!(dec.next_frame().is_err());
    let err = not_amqp(dec.pending());
    assert!(
        matches!(&err, Error::NotAmqp(t) if t.contains("offers protocol 0-8-0")),
        "{err:?}"
    );
    let err = not_amqp(b"HTTP/1.1 400 Bad Request\r\n");
    assert!(
        matches!(&err, Error::NotAmqp(t) if t.contains("HTTP/1.1")),
        "{err:?}"
    );
}

#[test]
fn heartbeats_during_the_handshake_are_ignored() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::new(&opts);
    let mut b = Vec::new();
    put_heartbeat(&mut b);
    assert!(matches!(h.feed(&b), Ok(None)));
    assert_eq!(h.hs.expect, Expect::Start);
    assert!(h.sent().is_empty());
}

#[test]
fn a_content_frame_or_a_channel_frame_during_the_handshake_is_unexpected() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::new(&opts);
    let err = h.feed(&raw_frame(FRAME_BODY, 0, b"x")).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Protocol {
                code: reply_code::UNEXPECTED_FRAME,
                ..
            }
        ),
        "{err:?}"
    );
    let mut h = Hs::new(&opts);
    let err = h
        .feed(&method(1, AMQPClass::Connection(start(0, 9, "PLAIN"))))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Protocol {
                code: reply_code::UNEXPECTED_FRAME,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_method_out_of_turn_is_command_invalid() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::new(&opts);
    let err = h.feed_method(C::OpenOk(connection::OpenOk {})).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Protocol {
                code: reply_code::COMMAND_INVALID,
                ..
            }
        ),
        "{err:?}"
    );
    let mut h = Hs::started(&opts);
    let err = h
        .feed(&method(
            0,
            AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
        ))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Protocol {
                code: reply_code::COMMAND_INVALID,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn close_while_expecting_start_is_a_server_close() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::new(&opts);
    let err = h.feed_method(close(320, "shutting down")).unwrap_err();
    assert!(
        matches!(&err, Error::ServerClosedConnection { code: 320, text, .. } if text == "shutting down"),
        "{err:?}"
    );
    assert_eq!(h.sent(), [close_ok()]);
}

#[test]
fn eof_in_each_state_says_what_it_means() {
    let opts = ConnectionOptions::default();
    assert!(matches!(Hs::new(&opts).hs.on_eof(), Error::NotAmqp(_)));
    assert!(matches!(
        Hs::started(&opts).hs.on_eof(),
        Error::AuthenticationFailed(_)
    ));
    assert!(matches!(
        Hs::tuned(&opts).hs.on_eof(),
        Error::VhostRefused { code: 0, .. }
    ));
}

// ---------------- ExpectTune ----------------

#[test]
fn tune_is_answered_with_tune_ok_and_open() {
    let opts = ConnectionOptions {
        vhost: "v1".into(),
        ..ConnectionOptions::default()
    };
    let mut h = Hs::started(&opts);
    assert!(matches!(h.feed_method(tune(100, 8192, 30)), Ok(None)));
    assert_eq!(h.hs.expect, Expect::OpenOk);
    assert_eq!(
        h.sent(),
        [
            Sent::Method(
                0,
                AMQPClass::Connection(C::TuneOk(connection::TuneOk {
                    channel_max: 100,
                    frame_max: 8192,
                    heartbeat: 30,
                }))
            ),
            Sent::Method(
                0,
                AMQPClass::Connection(C::Open(connection::Open {
                    virtual_host: "v1".into(),
                }))
            ),
        ]
    );
    let (tuned, _) = h
        .feed_method(C::OpenOk(connection::OpenOk {}))
        .expect("open-ok")
        .expect("done");
    assert_eq!(
        tuned,
        Tuned {
            channel_max: 100,
            frame_max: 8192,
            heartbeat: 30
        }
    );
    assert!(h.sent().is_empty());
}

/// Tune with the given client and server values; what was agreed.
fn negotiated(client: (u16, u32, u16), server: (u16, u32, u16)) -> Tuned {
    let opts = ConnectionOptions {
        channel_max: client.0,
        frame_max: client.1,
        heartbeat: client.2,
        ..ConnectionOptions::default()
    };
    let mut h = Hs::started(&opts);
    h.feed_method(tune(server.0, server.1, server.2))
        .expect("tune");
    let sent = h.sent();
    let Sent::Method(0, AMQPClass::Connection(C::TuneOk(ok))) = &sent[0] else {
        panic!("expected tune-ok, got {sent:?}");
    };
    let tuned = h
        .feed_method(C::OpenOk(connection::OpenOk {}))
        .expect("open-ok")
        .expect("done")
        .0;
    assert_eq!(
        (ok.channel_max, ok.frame_max, ok.heartbeat),
        (tuned.channel_max, tuned.frame_max, tuned.heartbeat),
        "tune-ok says what was agreed"
    );
    tuned
}

#[test]
fn tune_negotiation_takes_the_lower_value_and_zero_means_no_limit() {
    let t = |channel_max, frame_max, heartbeat| Tuned {
        channel_max,
        frame_max,
        heartbeat,
    };
    // the lower of two limits
    assert_eq!(negotiated((10, 8192, 60), (20, 4096, 30)), t(10, 4096, 30));
    assert_eq!(negotiated((20, 4096, 30), (10, 8192, 60)), t(10, 4096, 30));
    // the broker's 0 is no limit: ours holds
    assert_eq!(negotiated((10, 8192, 60), (0, 0, 0)), t(10, 8192, 60));
    // our 0 is no limit: the broker's holds (except heartbeat: our 0 turns them off)
    assert_eq!(negotiated((0, 0, 0), (10, 8192, 60)), t(10, 8192, 0));
    // both 0: the protocol's maximum channel, a 128 KiB frame, no heartbeats
    assert_eq!(negotiated((0, 0, 0), (0, 0, 0)), t(u16::MAX, 131_072, 0));
    // frame_max is held between the spec's minimum and our cap
    assert_eq!(negotiated((0, 100, 0), (0, 0, 0)).frame_max, 4096);
    assert_eq!(
        negotiated((0, u32::MAX, 0), (0, 0, 0)).frame_max,
        FRAME_MAX_CAP
    );
}

#[test]
fn sasl_challenge_fails_authentication() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::started(&opts);
    let err = h
        .feed_method(C::Secure(connection::Secure {
            challenge: "more?".into(),
        }))
        .unwrap_err();
    assert!(matches!(err, Error::AuthenticationFailed(_)), "{err:?}");
    assert!(h.sent().is_empty());
}

#[test]
fn access_refused_close_after_start_ok_is_an_authentication_failure() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::started(&opts);
    let err = h
        .feed_method(close(
            reply_code::ACCESS_REFUSED,
            "ACCESS_REFUSED - Login was refused",
        ))
        .unwrap_err();
    assert!(
        matches!(&err, Error::AuthenticationFailed(t) if t.contains("Login was refused")),
        "{err:?}"
    );
    assert_eq!(h.sent(), [close_ok()]);
}

#[test]
fn other_close_after_start_ok_is_a_server_close() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::started(&opts);
    let err = h.feed_method(close(541, "internal")).unwrap_err();
    assert!(
        matches!(err, Error::ServerClosedConnection { code: 541, .. }),
        "{err:?}"
    );
    assert_eq!(h.sent(), [close_ok()]);
}

// ---------------- ExpectOpenOk ----------------

#[test]
fn vhost_refused_by_close_after_open() {
    let opts = ConnectionOptions {
        vhost: "nope".into(),
        ..ConnectionOptions::default()
    };
    for code in [
        reply_code::NOT_ALLOWED,
        reply_code::ACCESS_REFUSED,
        reply_code::INVALID_PATH,
    ] {
        let mut h = Hs::tuned(&opts);
        let err = h
            .feed_method(close(code, "vhost nope not found"))
            .unwrap_err();
        assert!(
            matches!(&err, Error::VhostRefused { vhost, code: c, .. } if vhost == "nope" && *c == code),
            "{err:?}"
        );
        assert_eq!(h.sent(), [close_ok()]);
    }
    let mut h = Hs::tuned(&opts);
    let err = h.feed_method(close(320, "forced")).unwrap_err();
    assert!(
        matches!(err, Error::ServerClosedConnection { code: 320, .. }),
        "{err:?}"
    );
}

#[test]
fn a_second_tune_while_expecting_open_ok_is_command_invalid() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::tuned(&opts);
    let err = h.feed_method(tune(1, 4096, 0)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Protocol {
                code: reply_code::COMMAND_INVALID,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(h.sent().is_empty());
}

// ---------------- hostile tune and start-ok points ----------------

#[test]
fn tune_with_frame_max_below_the_protocol_minimum_is_refused() {
    let opts = ConnectionOptions::default();
    for fm in [1, 512, 4095] {
        let mut h = Hs::started(&opts);
        let err = h.feed_method(tune(100, fm, 30)).unwrap_err();
        assert!(
            matches!(&err, Error::Protocol { code: reply_code::NOT_ALLOWED, text }
                if text.contains(&format!("frame_max {fm}")) && text.contains("4096")),
            "{err:?}"
        );
        assert!(h.sent().is_empty(), "no tune-ok for a frame_max below 4096");
    }
}

#[test]
fn tune_ok_never_asks_more_than_a_non_zero_server_value() {
    // (ours, the server's) -> agreed
    for (ours, theirs, want) in [
        (131_072, 4096, 4096),
        (0, 8192, 8192),
        (1000, 8192, 4096),
        (0, 0, 131_072),
        (64 * 1024 * 1024, 0, FRAME_MAX_CAP),
        (64 * 1024 * 1024, 100_000, 100_000),
    ] {
        let opts = ConnectionOptions::default().frame_max(ours);
        let mut h = Hs::started(&opts);
        assert!(matches!(h.feed_method(tune(0, theirs, 0)), Ok(None)));
        let sent = h.sent();
        let Some(Sent::Method(0, AMQPClass::Connection(C::TuneOk(ok)))) = sent.first() else {
            panic!("no tune-ok: {sent:?}")
        };
        assert_eq!(ok.frame_max, want, "ours {ours}, theirs {theirs}");
        if theirs != 0 {
            assert!(ok.frame_max <= theirs);
        }
    }
}

#[test]
fn eof_after_start_ok_is_an_io_error_when_the_broker_reports_auth_failures() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::new(&opts);
    let caps = FieldTable::new().with("authentication_failure_close", true);
    let props = table_to_amqp(
        &FieldTable::new()
            .with("product", "RabbitMQ")
            .with("capabilities", caps),
    );
    assert!(matches!(
        h.feed_method(C::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: props,
            mechanisms: "PLAIN".into(),
            locales: "en_US".into(),
        })),
        Ok(None)
    ));
    assert!(matches!(
        h.hs.on_eof(),
        Error::Io {
            stage: crate::error::HandshakeStage::Tune,
            ..
        }
    ));
    // ... and its connection.close 403 is the authentication failure.
    let err = h
        .feed_method(close(403, "ACCESS_REFUSED - Login was refused"))
        .unwrap_err();
    assert!(matches!(err, Error::AuthenticationFailed(_)), "{err:?}");
}

#[test]
fn close_with_malformed_text_during_the_handshake_keeps_its_code() {
    let opts = ConnectionOptions::default();
    let mut h = Hs::started(&opts);
    // connection.close 403, text announced as 40 bytes, 6 present and not UTF-8.
    let mut payload = vec![0, 10, 0, 50, 1, 147, 40];
    payload.extend_from_slice(b"no \xff\xfe!");
    let err = h.feed(&raw_frame(1, 0, &payload)).unwrap_err();
    assert!(
        matches!(&err, Error::AuthenticationFailed(t) if t == "no \u{fffd}\u{fffd}!"),
        "{err:?}"
    );
    assert_eq!(h.sent(), [close_ok()]);
    let mut h = Hs::tuned(&opts);
    let payload = vec![0, 10, 0, 50, 1, 64, 2, 0xC3, 0x28, 0, 0, 0, 0, 7, 7, 7];
    let err = h.feed(&raw_frame(1, 0, &payload)).unwrap_err();
    assert!(
        matches!(&err, Error::ServerClosedConnection { code: 320, .. }),
        "{err:?}"
    );
}
