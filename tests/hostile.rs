//! Hostile input: what a broken or malicious peer can send, and what lepus must do about
//! it. Most tests talk to a scripted fake broker (lepus-testkit's `FakeBroker`) because
//! RabbitMQ never sends these things; the last one goes through the real broker.
//!
//! Every case must end in a specific error (variant and reply code asserted), with every
//! blocked caller woken, no panic, no hang (each test runs under a deadline) and no large
//! allocation (a counting allocator watches the largest single request).

mod support;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, channel, connection, queue};
use lepus::{
    BadDeliveryKind, Connection, ConsumeOptions, Consumer, Error, FieldTable, HandshakeStage,
    QueueDeclareOptions, RecoveryOptions, RecvError, reply_code,
};
use lepus_testkit::frames::*;
use lepus_testkit::{FakeBroker, Peer, Tune, Waiter, within};
use support::ClientOptions;

// ---------------------------------------------------------------------------------------
// The largest single allocation made by this test process.
// ---------------------------------------------------------------------------------------

#[global_allocator]
static ALLOC: support::largest_alloc::LargestAlloc = support::largest_alloc::LargestAlloc;

/// Nothing in this test binary legitimately allocates more than this in one piece (the
/// biggest frames are about 1 MiB).
const ALLOC_LIMIT: usize = 8 * 1024 * 1024;

fn assert_no_large_allocation() {
    let largest = support::largest_alloc::largest();
    assert!(
        largest < ALLOC_LIMIT,
        "an allocation of {largest} bytes was made (limit {ALLOC_LIMIT})"
    );
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Deadline of one test.
const TEST_LIMIT: Duration = Duration::from_secs(20);
/// How soon a blocked caller must wake after the event that ends its wait.
const PROMPT: Duration = Duration::from_secs(1);

fn consume(conn: &Connection) -> (lepus::Channel, Consumer) {
    let ch = conn.open_channel().expect("channel.open");
    let c = ch
        .basic_consume("q", &ConsumeOptions::default())
        .expect("basic.consume");
    (ch, c)
}

fn expect_protocol(e: &Error, code: u16) {
    match e {
        Error::Protocol { code: c, .. } if *c == code => {}
        other => panic!("expected Error::Protocol with code {code}, got {other:?}"),
    }
}

fn bad_delivery(r: Result<Option<lepus::Delivery>, RecvError>) -> Box<lepus::BadDelivery> {
    match r {
        Err(RecvError::Bad(b)) => {
            // `?` in a function returning lepus::Result keeps the facts, not the handle.
            match Error::from(RecvError::Bad(b.clone())) {
                Error::BadDelivery {
                    delivery_tag, kind, ..
                } => {
                    assert_eq!(delivery_tag, b.delivery_tag());
                    assert_eq!(&kind, b.kind());
                }
                other => panic!("RecvError::Bad became {other:?}"),
            }
            b
        }
        other => panic!("expected RecvError::Bad, got {other:?}"),
    }
}

use lepus_testkit::is_reject;

fn is_ack(tag: u64) -> impl Fn(u16, &AMQPClass) -> Option<()> {
    move |_, m| match m {
        AMQPClass::Basic(basic::AMQPMethod::Ack(a)) if a.delivery_tag == tag && !a.multiple => {
            Some(())
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// 1. Oversized frames
// ---------------------------------------------------------------------------------------

/// A frame header announcing `size` payload bytes, after which every blocked caller (a
/// consumer and an RPC in flight) must wake with Protocol(501) and the broker must get
/// connection.close(501).
fn oversized_frame_case(tune: Tune, opts_frame_max: u32, kind: u8, size: u32) {
    let broker = FakeBroker::start(move |p| {
        p.handshake(tune);
        let ch1 = p.serve_channel_open();
        let (_, tag) = p.serve_consume();
        // Just at the limit is fine: a body split in frames of exactly frame_max.
        let body = vec![7u8; 3 * p.frame_max as usize];
        p.deliver(ch1, &tag, 1, &no_props(), &body);
        let ch2 = p.serve_channel_open();
        // An RPC in flight: never answered.
        p.expect("queue.declare", |ch, m| {
            (ch == ch2 && matches!(m, AMQPClass::Queue(queue::AMQPMethod::Declare(_))))
                .then_some(())
        });
        thread::sleep(Duration::from_millis(100));
        let mut hostile = vec![kind, 0, 1];
        hostile.extend_from_slice(&size.to_be_bytes());
        p.send(&hostile);
        let sent = Instant::now();
        let close = p.expect_connection_close();
        (close.reply_code, close.reply_text.to_string(), sent)
    });
    let conn = Connection::open_with(broker.options().frame_max(opts_frame_max)).unwrap();
    let (_ch1, consumer) = consume(&conn);
    let d = consumer
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("a delivery in time");
    assert_eq!(d.body().len(), 3 * conn.frame_max() as usize);
    let recv = Waiter::spawn(move || consumer.recv_timeout(Duration::from_secs(10)));
    let ch2 = conn.open_channel().unwrap();
    let rpc = Waiter::spawn(move || {
        ch2.with_timeout(Duration::from_secs(10))
            .queue_declare("never-answered", &QueueDeclareOptions::default())
    });
    let (code, text, sent) = broker.finish();
    assert_eq!(
        code,
        reply_code::FRAME_ERROR,
        "connection.close text: {text}"
    );
    assert!(text.contains("exceeds frame_max"), "{text}");

    let (r, at) = recv.wait(PROMPT * 5);
    expect_protocol(&r.unwrap_err().into(), reply_code::FRAME_ERROR);
    assert!(at.duration_since(sent) < PROMPT, "consumer woke late");
    let (r, at) = rpc.wait(PROMPT * 5);
    expect_protocol(&r.unwrap_err(), reply_code::FRAME_ERROR);
    assert!(at.duration_since(sent) < PROMPT, "RPC woke late");
    expect_protocol(&conn.close_reason().unwrap(), reply_code::FRAME_ERROR);
    assert!(!conn.is_open());
    expect_protocol(&conn.open_channel().unwrap_err(), reply_code::FRAME_ERROR);
    conn.close().unwrap();
    assert_no_large_allocation();
}

#[test]
fn frame_announcing_4_gib_closes_with_501_and_wakes_waiters() {
    within(TEST_LIMIT, || {
        oversized_frame_case(Tune::default(), 131_072, FRAME_BODY, u32::MAX)
    });
}

#[test]
fn method_frame_announcing_4_gib_closes_with_501() {
    within(TEST_LIMIT, || {
        oversized_frame_case(Tune::default(), 131_072, FRAME_METHOD, u32::MAX)
    });
}

#[test]
fn frame_one_byte_over_negotiated_frame_max_closes_with_501() {
    within(TEST_LIMIT, || {
        // The broker proposes 4096, the client asks for more: 4096 is agreed; a frame of
        // 4097 bytes in all (payload 4089) is one too many.
        let tune = Tune {
            frame_max: 4096,
            ..Tune::default()
        };
        oversized_frame_case(tune, 131_072, FRAME_BODY, 4096 - 8 + 1)
    });
}

// ---------------------------------------------------------------------------------------
// 2. Oversized content
// ---------------------------------------------------------------------------------------

#[test]
fn content_of_2_pow_63_bytes_is_a_too_large_bad_delivery() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.handshake(Tune::default());
            let ch = p.serve_channel_open();
            let (_, tag) = p.serve_consume();
            let mut out = deliver_frame(ch, &tag, 1);
            out.extend(header_frame(ch, 1 << 63, &no_props()));
            // Some of the body: skipped, not buffered.
            for _ in 0..16 {
                out.extend(body_frame(ch, &vec![0xAB; p.frame_max as usize - 8]));
            }
            p.send(&out);
            p.wait_for("basic.reject", is_reject(1, false));
            p.expect_connection_close().reply_code
        });
        let max = 1024 * 1024;
        let conn = Connection::open_with(broker.options().max_message_size(max)).unwrap();
        let (ch, consumer) = consume(&conn);
        let bad = bad_delivery(consumer.recv_timeout(Duration::from_secs(5)));
        assert_eq!(
            bad.kind(),
            &BadDeliveryKind::TooLarge { size: 1 << 63, max }
        );
        assert_eq!(bad.delivery_tag(), 1);
        assert!(bad.body().is_empty());
        bad.reject(false).unwrap();
        assert!(conn.is_open() && ch.is_open());
        conn.close().unwrap();
        assert_eq!(broker.finish(), reply_code::REPLY_SUCCESS);
        assert_no_large_allocation();
    });
}

#[test]
fn content_over_max_message_size_is_skipped_and_the_next_delivery_arrives() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.handshake(Tune {
                frame_max: 4096,
                ..Tune::default()
            });
            let ch = p.serve_channel_open();
            let (_, tag) = p.serve_consume();
            p.deliver(ch, &tag, 1, &no_props(), &[1u8; 10_000]);
            p.deliver(ch, &tag, 2, &no_props(), b"next");
            p.wait_for("basic.reject", is_reject(1, false));
            p.wait_for("basic.ack", is_ack(2));
            p.expect_connection_close().reply_code
        });
        let conn = Connection::open_with(broker.options().max_message_size(5000)).unwrap();
        let (ch, consumer) = consume(&conn);
        let bad = bad_delivery(consumer.recv_timeout(Duration::from_secs(5)));
        assert_eq!(
            bad.kind(),
            &BadDeliveryKind::TooLarge {
                size: 10_000,
                max: 5000
            }
        );
        assert_eq!(bad.delivery_tag(), 1);
        bad.reject(false).unwrap();
        let d = consumer
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .expect("a delivery in time");
        assert_eq!((d.delivery_tag(), d.body()), (2, &b"next"[..]));
        d.ack().unwrap();
        assert!(conn.is_open() && ch.is_open());
        conn.close().unwrap();
        assert_eq!(broker.finish(), reply_code::REPLY_SUCCESS);
    });
}

// ---------------------------------------------------------------------------------------
// Cases that could overflow a stack run in a child process
// ---------------------------------------------------------------------------------------

/// Set in the child: the name of the one test it runs.
const CHILD_ENV: &str = "LEPUS_HOSTILE_CHILD";

/// Run `body` (the test `name`) in a child process: this test binary re-run with the test
/// filtered to `name` alone. A stack overflow aborts the whole process, so in-process it
/// would take every other test of this binary down with it; here it takes only the child,
/// whose death by a signal (or any failure) fails this test. In the child itself, `body`
/// just runs.
fn in_child_process(name: &str, body: impl FnOnce()) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        body();
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = std::process::Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("re-run the test binary");
    let mut out = child.stdout.take().expect("the child's stdout");
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    // The child's body has its own `within` limit; this one only catches a child that
    // cannot even reach it.
    let deadline = Instant::now() + TEST_LIMIT + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("the child's status") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: the child process did not end within its deadline");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = reader.join().expect("the child's output");
    print!("{stdout}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            panic!("{name}: the child process died of signal {sig} (a stack overflow aborts)");
        }
    }
    assert!(
        status.success(),
        "{name}: the child process failed: {status}"
    );
    // A filter that matched nothing would pass without running anything.
    assert!(
        stdout.contains("1 passed"),
        "{name}: the child did not run exactly this test"
    );
}

// ---------------------------------------------------------------------------------------
// 3 and 4. Undecodable properties
// ---------------------------------------------------------------------------------------

/// Deliver each of `bad_props` (tags 1..), then a good delivery; each bad one must reach
/// the consumer as BadDelivery(Undecodable) with its tag, the good one as a delivery, and
/// the channel must still answer an RPC.
fn undecodable_case(frame_max: u32, bad_props: Vec<Vec<u8>>, why: &'static [&'static str]) {
    let n = bad_props.len() as u64;
    let broker = FakeBroker::start(move |p| {
        p.handshake(Tune {
            frame_max,
            ..Tune::default()
        });
        let ch = p.serve_channel_open();
        let (_, tag) = p.serve_consume();
        for (i, props) in bad_props.iter().enumerate() {
            p.deliver(ch, &tag, i as u64 + 1, props, b"bad body");
        }
        p.deliver(ch, &tag, n + 1, &headers_props(&small_table()), b"good");
        for t in 1..=n {
            p.wait_for("basic.ack", is_ack(t));
        }
        p.wait_for("basic.ack", is_ack(n + 1));
        p.serve_qos();
        p.expect_connection_close().reply_code
    });
    let conn = Connection::open_with(broker.options().frame_max(frame_max)).unwrap();
    let (ch, consumer) = consume(&conn);
    for t in 1..=n {
        let bad = bad_delivery(consumer.recv_timeout(Duration::from_secs(5)));
        assert_eq!(bad.delivery_tag(), t);
        match bad.kind() {
            BadDeliveryKind::Undecodable(msg) => assert!(
                why.iter().any(|w| msg.contains(w)),
                "delivery {t}: unexpected reason {msg:?}"
            ),
            other => panic!("delivery {t}: expected Undecodable, got {other:?}"),
        }
        assert_eq!(bad.body(), b"bad body");
        bad.ack().unwrap();
    }
    let d = consumer
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("a delivery in time");
    assert_eq!((d.delivery_tag(), d.body()), (n + 1, &b"good"[..]));
    assert_eq!(
        d.properties().headers,
        Some(FieldTable::new().with("k", "v"))
    );
    d.ack().unwrap();
    assert!(conn.is_open() && ch.is_open());
    ch.basic_qos(10, false).unwrap();
    conn.close().unwrap();
    assert_eq!(broker.finish(), reply_code::REPLY_SUCCESS);
    assert_no_large_allocation();
}

#[test]
fn headers_nested_20_000_deep_are_an_undecodable_bad_delivery() {
    in_child_process(
        "headers_nested_20_000_deep_are_an_undecodable_bad_delivery",
        || {
            within(TEST_LIMIT, || {
                undecodable_case(
                    1 << 20,
                    vec![headers_props(&deep_table(20_000))],
                    &["nested deeper than 64"],
                )
            });
        },
    );
}

#[test]
fn headers_nested_100_000_deep_are_an_undecodable_bad_delivery() {
    in_child_process(
        "headers_nested_100_000_deep_are_an_undecodable_bad_delivery",
        || {
            within(TEST_LIMIT, || {
                undecodable_case(
                    1 << 20,
                    vec![headers_props(&deep_table(100_000))],
                    &["nested deeper than 64"],
                )
            });
        },
    );
}

#[test]
fn malformed_properties_are_undecodable_bad_deliveries() {
    within(TEST_LIMIT, || {
        // headers table whose length runs past the end of the frame
        let mut overrun = headers_props(&small_table());
        overrun[2..6].copy_from_slice(&0xFFFF_FFF0u32.to_be_bytes());
        // nested table whose length runs past its container
        let inner_overrun = vec![0, 0, 0, 7, 1, b'n', b'F', 0, 0, 0, 100];
        // unknown field type 'Z'
        let unknown_tag = vec![0, 0, 0, 3, 1, b'a', b'Z'];
        // content_type short string of 200 bytes where 3 follow
        let short_overrun = vec![0x80, 0x00, 200, b'a', b'b', b'c'];
        // property flags continuation bit
        let continuation = vec![0x00, 0x01, 0x00, 0x00];
        // delivery_mode flag set but no byte follows
        let truncated = vec![0x10, 0x00];
        undecodable_case(
            131_072,
            vec![
                overrun,
                headers_props(&inner_overrun),
                headers_props(&unknown_tag),
                short_overrun,
                continuation,
                truncated,
            ],
            &[
                "malformed field table",
                "could not be parsed",
                "continuation",
                "truncated",
            ],
        )
    });
}

// ---------------------------------------------------------------------------------------
// 5. Silent peers during the handshake
// ---------------------------------------------------------------------------------------

fn silent_case(stage: HandshakeStage, script: impl FnOnce(&mut Peer) + Send + 'static) {
    let broker = FakeBroker::start(move |p| {
        script(p);
        // Quiet now; the client must give up and close the socket.
        p.wait_eof(Duration::from_secs(5))
    });
    let timeout = Duration::from_secs(1);
    let t0 = Instant::now();
    let e = Connection::open_with(broker.options().connection_timeout(timeout)).unwrap_err();
    let took = t0.elapsed();
    match e {
        Error::ConnectTimeout {
            stage: s,
            elapsed_ms,
        } => {
            assert_eq!(s, stage, "{e}");
            assert!(
                (1000..1500).contains(&elapsed_ms),
                "elapsed_ms {elapsed_ms}"
            );
        }
        other => panic!("expected ConnectTimeout at {stage:?}, got {other:?}"),
    }
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(500),
        "open took {took:?}"
    );
    assert!(broker.finish(), "the client did not close the socket");
}

#[test]
fn silent_before_start_is_a_connect_timeout_at_start() {
    within(TEST_LIMIT, || {
        silent_case(HandshakeStage::Start, |p| p.expect_protocol_header())
    });
}

#[test]
fn silent_after_start_ok_is_a_connect_timeout_at_tune() {
    within(TEST_LIMIT, || {
        silent_case(HandshakeStage::Tune, |p| {
            p.expect_protocol_header();
            p.send_start();
            p.expect_start_ok();
        })
    });
}

#[test]
fn silent_after_tune_is_a_connect_timeout_at_open() {
    within(TEST_LIMIT, || {
        silent_case(HandshakeStage::Open, |p| {
            p.expect_protocol_header();
            p.send_start();
            p.expect_start_ok();
            p.send_tune(Tune::default());
            p.expect_tune_ok_and_open();
        })
    });
}

// ---------------------------------------------------------------------------------------
// 6. Peers that are not AMQP 0-9-1 servers
// ---------------------------------------------------------------------------------------

/// The peer reads the protocol header, answers `reply`, then closes or stays silent.
fn not_amqp_case(reply: &'static [u8], close: bool, expect_in_text: &str) {
    let broker = FakeBroker::start(move |p| {
        p.expect_protocol_header();
        p.send(reply);
        if !close {
            p.wait_eof(Duration::from_secs(5));
        }
    });
    let t0 = Instant::now();
    let e = Connection::open_with(broker.options().connection_timeout(Duration::from_secs(5)))
        .unwrap_err();
    match &e {
        Error::NotAmqp(text) => assert!(text.contains(expect_in_text), "{text}"),
        other => panic!("expected NotAmqp, got {other:?}"),
    }
    // Known at once, not at the connection timeout.
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t0.elapsed()
    );
    broker.finish();
}

#[test]
fn http_server_is_not_amqp() {
    within(TEST_LIMIT, || {
        not_amqp_case(b"HTTP/1.1 400 Bad Request\r\n\r\n", true, "HTTP/1.1 400");
        not_amqp_case(b"HTTP/1.1 400 Bad Request\r\n\r\n", false, "HTTP/1.1 400");
    });
}

#[test]
fn protocol_header_reply_is_not_amqp() {
    within(TEST_LIMIT, || {
        // What a server that wants another version answers before it closes.
        not_amqp_case(b"AMQP\x00\x00\x09\x00", true, "0-9-0");
        not_amqp_case(b"AMQP\x00\x00\x09\x00", false, "0-9-0");
        not_amqp_case(b"AMQP\x00\x01\x00\x00", true, "1-0-0");
        not_amqp_case(b"AMQP\x03\x01\x00\x00", false, "1-0-0");
        // Fewer than 7 bytes, then EOF.
        not_amqp_case(b"AMQP", true, "AMQP");
    });
}

#[test]
fn connection_start_of_another_version_is_not_amqp() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.expect_protocol_header();
            p.send_start_version(8, 0);
            p.wait_eof(Duration::from_secs(5))
        });
        let e = Connection::open_with(broker.options()).unwrap_err();
        match &e {
            Error::NotAmqp(text) => assert!(text.contains("8-0"), "{text}"),
            other => panic!("expected NotAmqp, got {other:?}"),
        }
        assert!(broker.finish());
    });
}

// ---------------------------------------------------------------------------------------
// 7. Heartbeats
// ---------------------------------------------------------------------------------------

#[test]
fn silent_broker_is_lost_after_two_heartbeat_intervals() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            let agreed = p.handshake(Tune {
                heartbeat: 1,
                ..Tune::default()
            });
            assert_eq!(agreed.heartbeat, 1);
            p.serve_channel_open();
            p.serve_consume();
            let silent_from = Instant::now();
            // Say nothing more; read what comes until the client hangs up.
            let eof = p.wait_eof(Duration::from_secs(8));
            (silent_from, eof)
        });
        // Without recovery, so that the loss is final and shows in close_reason().
        let opts = broker
            .options()
            .heartbeat(1)
            .recovery(RecoveryOptions::disabled());
        let conn = Connection::open_with(opts).unwrap();
        assert_eq!(conn.heartbeat(), 1);
        let (ch, consumer) = consume(&conn);
        let recv = Waiter::spawn(move || consumer.recv_timeout(Duration::from_secs(10)));
        let (r, at) = recv.wait(Duration::from_secs(10));
        let (silent_from, eof) = broker.finish();
        let e = r.unwrap_err();
        assert!(
            matches!(e, RecvError::Failed(Error::ConnectionLost(_))) && e.is_connection_lost(),
            "expected ConnectionLost, got {e:?}"
        );
        let after = at.duration_since(silent_from);
        assert!(
            after >= Duration::from_secs(1) && after <= Duration::from_secs(4),
            "declared lost after {after:?}"
        );
        assert!(eof, "the client did not close the socket");
        assert!(conn.close_reason().unwrap().is_connection_lost());
        assert!(!ch.is_open());
        conn.close().unwrap();
    });
}

#[test]
fn heartbeats_are_sent_no_more_often_than_every_500_ms() {
    within(TEST_LIMIT, || {
        let (tx, rx) = mpsc::channel();
        let broker = FakeBroker::start(move |p| {
            p.handshake(Tune {
                heartbeat: 1,
                ..Tune::default()
            });
            // Keep the client alive with our own heartbeats; record the client's.
            let start = Instant::now();
            let end = start + Duration::from_secs(3);
            let mut next_hb = start;
            let mut seen = Vec::new();
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if now >= next_hb {
                    p.send(&heartbeat_frame());
                    next_hb = now + Duration::from_millis(400);
                }
                match p.io.recv_frame(next_hb.min(end)) {
                    Ok(f) if f.kind == FRAME_HEARTBEAT => seen.push(Instant::now()),
                    Ok(f) => panic!("unexpected frame from an idle client: {f:?}"),
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => panic!("client went away: {e}"),
                }
            }
            tx.send(seen).unwrap();
            p.expect_connection_close().reply_code
        });
        let conn = Connection::open_with(broker.options().heartbeat(1)).unwrap();
        let seen = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(conn.is_open());
        conn.close().unwrap();
        assert_eq!(broker.finish(), reply_code::REPLY_SUCCESS);
        // Over 3 s: at least one a second (the interval), at most one per 500 ms.
        assert!(
            (3..=7).contains(&seen.len()),
            "{} heartbeats in 3 s",
            seen.len()
        );
        let min_gap = seen
            .windows(2)
            .map(|w| w[1].duration_since(w[0]))
            .min()
            .unwrap();
        assert!(
            min_gap >= Duration::from_millis(400),
            "heartbeats {min_gap:?} apart"
        );
    });
}

// ---------------------------------------------------------------------------------------
// 8. Protocol violations
// ---------------------------------------------------------------------------------------

/// After the handshake, an open channel and a consumer, `hostile` sends something that
/// breaks the protocol: the consumer must wake with Protocol(`code`) and the broker must
/// get connection.close(`code`).
fn violation_case(code: u16, hostile: impl FnOnce(&mut Peer, u16, &str) + Send + 'static) {
    let broker = FakeBroker::start(move |p| {
        p.handshake(Tune::default());
        let ch = p.serve_channel_open();
        let (_, tag) = p.serve_consume();
        thread::sleep(Duration::from_millis(50));
        hostile(p, ch, &tag);
        let sent = Instant::now();
        let close = p.expect_connection_close();
        (close, sent)
    });
    let t0 = Instant::now();
    let conn = Connection::open_with(broker.options()).unwrap();
    let (ch, consumer) = consume(&conn);
    let recv = Waiter::spawn(move || consumer.recv_timeout(Duration::from_secs(10)));
    let (close, sent) = broker.finish();
    assert_eq!(
        close.reply_code, code,
        "connection.close text: {}",
        close.reply_text
    );
    let (r, at) = recv.wait(PROMPT * 5);
    expect_protocol(&r.unwrap_err().into(), code);
    assert!(at.duration_since(sent) < PROMPT, "consumer woke late");
    expect_protocol(&conn.close_reason().unwrap(), code);
    assert!(!conn.is_open() && !ch.is_open());
    expect_protocol(
        &ch.queue_declare("x", &QueueDeclareOptions::default())
            .unwrap_err(),
        code,
    );
    conn.close().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn unknown_frame_type_is_a_frame_error() {
    within(TEST_LIMIT, || {
        violation_case(reply_code::FRAME_ERROR, |p, ch, _| {
            p.send(&frame(9, ch, b"what"))
        })
    });
}

#[test]
fn bad_frame_end_octet_is_a_frame_error() {
    within(TEST_LIMIT, || {
        violation_case(reply_code::FRAME_ERROR, |p, _, _| {
            let mut f = heartbeat_frame();
            *f.last_mut().unwrap() = 0xAB;
            p.send(&f)
        });
        violation_case(reply_code::FRAME_ERROR, |p, ch, tag| {
            let mut f = deliver_frame(ch, tag, 1);
            *f.last_mut().unwrap() = 0x00;
            p.send(&f)
        });
    });
}

#[test]
fn heartbeat_on_a_channel_is_a_frame_error() {
    within(TEST_LIMIT, || {
        violation_case(reply_code::FRAME_ERROR, |p, ch, _| {
            p.send(&frame(FRAME_HEARTBEAT, ch, &[]))
        })
    });
}

#[test]
fn body_without_header_is_an_unexpected_frame() {
    within(TEST_LIMIT, || {
        violation_case(reply_code::UNEXPECTED_FRAME, |p, ch, _| {
            p.send(&body_frame(ch, b"orphan"))
        })
    });
}

#[test]
fn header_without_method_is_an_unexpected_frame() {
    within(TEST_LIMIT, || {
        violation_case(reply_code::UNEXPECTED_FRAME, |p, ch, _| {
            p.send(&header_frame(ch, 5, &no_props()))
        })
    });
}

#[test]
fn method_in_the_middle_of_a_content_is_an_unexpected_frame() {
    within(TEST_LIMIT, || {
        // between method and header
        violation_case(reply_code::UNEXPECTED_FRAME, |p, ch, tag| {
            let mut out = deliver_frame(ch, tag, 1);
            out.extend(deliver_frame(ch, tag, 2));
            p.send(&out)
        });
        // between header and body
        violation_case(reply_code::UNEXPECTED_FRAME, |p, ch, tag| {
            let mut out = deliver_frame(ch, tag, 1);
            out.extend(header_frame(ch, 10, &no_props()));
            out.extend(body_frame(ch, b"12345"));
            out.extend(deliver_frame(ch, tag, 2));
            p.send(&out)
        });
    });
}

#[test]
fn frame_on_a_channel_that_is_not_open_is_a_channel_error() {
    within(TEST_LIMIT, || {
        violation_case(reply_code::CHANNEL_ERROR, |p, _, tag| {
            p.send(&deliver_frame(9, tag, 1))
        });
        violation_case(reply_code::CHANNEL_ERROR, |p, _, _| {
            p.send(&header_frame(9, 5, &no_props()))
        });
        violation_case(reply_code::CHANNEL_ERROR, |p, _, _| {
            p.send(&body_frame(65535, b"x"))
        });
    });
}

#[test]
fn client_only_method_from_the_server_is_command_invalid() {
    within(TEST_LIMIT, || {
        violation_case(reply_code::COMMAND_INVALID, |p, ch, _| {
            p.send_method(
                ch,
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: "q".into(),
                    passive: false,
                    durable: false,
                    exclusive: false,
                    auto_delete: false,
                    nowait: false,
                    arguments: Default::default(),
                })),
            )
        });
        // basic.publish, also on channel 0
        violation_case(reply_code::COMMAND_INVALID, |p, _, _| {
            p.send_method(
                0,
                AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                    exchange: "".into(),
                    routing_key: "q".into(),
                    mandatory: false,
                    immediate: false,
                })),
            )
        });
        // connection.start again, after the handshake
        violation_case(reply_code::COMMAND_INVALID, |p, _, _| p.send_start());
        // a connection method on a channel
        violation_case(reply_code::COMMAND_INVALID, |p, ch, _| {
            p.send_method(
                ch,
                AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
                    reason: "x".into(),
                })),
            )
        });
    });
}

#[test]
fn violation_is_reported_at_once_even_if_the_peer_never_answers_close() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.handshake(Tune::default());
            let ch = p.serve_channel_open();
            p.serve_consume();
            p.send_method(
                ch,
                AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
                    queue: "q".into(),
                    nowait: false,
                })),
            );
            let close = p.wait_for("connection.close", |ch, m| match m {
                AMQPClass::Connection(connection::AMQPMethod::Close(c)) if ch == 0 => {
                    Some(c.reply_code)
                }
                _ => None,
            });
            // No close-ok: the client must give up on its own.
            (close, p.wait_eof(Duration::from_secs(8)))
        });
        let close_timeout = Duration::from_secs(2);
        let conn = Connection::open_with(broker.options().close_timeout(close_timeout)).unwrap();
        let (ch, consumer) = consume(&conn);
        let e = consumer.recv_timeout(Duration::from_secs(5)).unwrap_err();
        expect_protocol(&e.into(), reply_code::COMMAND_INVALID);
        // Ended for good at once, not only when the I/O thread is done waiting.
        assert!(!conn.is_open() && !ch.is_open());
        expect_protocol(&conn.close_reason().unwrap(), reply_code::COMMAND_INVALID);
        let t0 = Instant::now();
        conn.close().unwrap();
        assert!(
            t0.elapsed() < close_timeout + PROMPT,
            "close took {:?}",
            t0.elapsed()
        );
        let (code, eof) = broker.finish();
        assert_eq!(code, reply_code::COMMAND_INVALID);
        assert!(eof, "the client did not close the socket");
    });
}

#[test]
fn reply_without_a_request_is_an_unexpected_frame() {
    within(TEST_LIMIT, || {
        violation_case(reply_code::UNEXPECTED_FRAME, |p, ch, _| {
            p.send_method(
                ch,
                AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                    queue: "q".into(),
                    message_count: 0,
                    consumer_count: 0,
                })),
            )
        });
        violation_case(reply_code::UNEXPECTED_FRAME, |p, ch, _| {
            p.send_method(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
            )
        });
    });
}

// ---------------------------------------------------------------------------------------
// 9. A channel closed by the server
// ---------------------------------------------------------------------------------------

#[test]
fn server_channel_close_ends_only_that_channel() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.handshake(Tune::default());
            let ch1 = p.serve_channel_open();
            let (_, tag) = p.serve_consume();
            let ch2 = p.serve_channel_open();
            let (_, tag2) = p.serve_consume();
            assert_ne!(ch1, ch2);
            p.send_method(
                ch1,
                AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                    reply_code: 404,
                    reply_text: "NOT_FOUND - no queue 'q'".into(),
                    class_id: 50,
                    method_id: 10,
                })),
            );
            let sent = Instant::now();
            p.expect("channel.close-ok", |ch, m| {
                (ch == ch1 && matches!(m, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))))
                    .then_some(())
            });
            // Channel 2 still works: an RPC and a delivery.
            let ch = p.expect("queue.declare", |ch, m| match m {
                AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => {
                    assert_eq!(d.queue.as_str(), "still-here");
                    Some(ch)
                }
                _ => None,
            });
            assert_eq!(ch, ch2);
            p.send_method(
                ch2,
                AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                    queue: "still-here".into(),
                    message_count: 3,
                    consumer_count: 1,
                })),
            );
            p.deliver(ch2, &tag2, 1, &no_props(), b"on channel 2");
            p.wait_for("basic.ack", is_ack(1));
            let _ = tag;
            (p.expect_connection_close().reply_code, sent)
        });
        let conn = Connection::open_with(broker.options()).unwrap();
        let (ch1, consumer1) = consume(&conn);
        let (ch2, consumer2) = consume(&conn);
        let (r, at) = Waiter::spawn(move || {
            let r = consumer1.recv_timeout(Duration::from_secs(10));
            (r, consumer1)
        })
        .wait(Duration::from_secs(10));
        let (r, _consumer1) = r;
        match r.unwrap_err() {
            RecvError::Failed(Error::ServerClosedChannel {
                channel,
                code: 404,
                class_id: 50,
                method_id: 10,
                text,
            }) => {
                assert_eq!(channel, ch1.id());
                assert!(text.contains("NOT_FOUND"), "{text}");
            }
            other => panic!("expected ServerClosedChannel 404, got {other:?}"),
        }
        assert!(!ch1.is_open());
        match ch1.queue_declare("x", &QueueDeclareOptions::default()) {
            Err(Error::ServerClosedChannel { code: 404, .. }) => {}
            other => panic!("expected ServerClosedChannel on the closed channel, got {other:?}"),
        }
        let info = ch2
            .queue_declare("still-here", &QueueDeclareOptions::default())
            .unwrap();
        assert_eq!((info.message_count, info.consumer_count), (3, 1));
        let d = consumer2
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .expect("a delivery in time");
        assert_eq!(d.body(), b"on channel 2");
        d.ack().unwrap();
        assert!(conn.is_open() && ch2.is_open());
        assert!(conn.close_reason().is_none());
        conn.close().unwrap();
        let (code, sent) = broker.finish();
        assert_eq!(code, reply_code::REPLY_SUCCESS);
        assert!(at.duration_since(sent) < PROMPT, "consumer woke late");
    });
}

// ---------------------------------------------------------------------------------------
// 10. End to end through RabbitMQ
// ---------------------------------------------------------------------------------------

#[test]
fn deep_headers_through_rabbitmq_are_a_bad_delivery_and_the_next_message_arrives() {
    in_child_process(
        "deep_headers_through_rabbitmq_are_a_bad_delivery_and_the_next_message_arrives",
        || {
            within(Duration::from_secs(60), || {
                let cleanup = support::Cleanup::new();
                let conn = support::connect();
                let ch = conn.open_channel().unwrap();
                let q = cleanup.queue(&support::unique("hostile-deep-headers"));
                ch.queue_declare(
                    &q,
                    &QueueDeclareOptions {
                        arguments: FieldTable::new().with("x-expires", 120_000),
                        ..Default::default()
                    },
                )
                .unwrap();
                // Through the broker, with a raw socket: lepus refuses to encode such a table.
                lepus_testkit::publish_raw(
                    support::broker_addr(),
                    "",
                    &q,
                    &headers_props(&deep_table(20_000)),
                    b"deep",
                )
                .expect("RabbitMQ accepts the deep headers");
                ch.confirm_select().unwrap();
                support::publish_confirmed(&ch, "", &q, b"normal");

                let cch = conn.open_channel().unwrap();
                let consumer = cch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
                let bad = bad_delivery(consumer.recv_timeout(Duration::from_secs(10)));
                match bad.kind() {
                    BadDeliveryKind::Undecodable(msg) => {
                        assert!(msg.contains("nested deeper than 64"), "{msg}")
                    }
                    other => panic!("expected Undecodable, got {other:?}"),
                }
                assert_eq!(bad.delivery_tag(), 1);
                assert_eq!(bad.routing_key(), q);
                assert_eq!(bad.body(), b"deep");
                bad.reject(false).unwrap();

                let d = consumer
                    .recv_timeout(Duration::from_secs(10))
                    .unwrap()
                    .expect("a delivery in time");
                assert_eq!((d.delivery_tag(), d.body()), (2, &b"normal"[..]));
                d.ack().unwrap();
                assert!(conn.is_open() && cch.is_open());

                // Closing the channel would requeue anything not settled: the queue stays empty
                // only if the reject and the ack both went through.
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
                assert_no_large_allocation();
            });
        },
    );
}

#[test]
fn channel_closed_by_us_in_the_middle_of_a_content_closes_cleanly() {
    within(TEST_LIMIT, || {
        let broker = FakeBroker::start(|p| {
            p.handshake(Tune::default());
            let ch1 = p.serve_channel_open();
            let (_, tag) = p.serve_consume();
            let ch2 = p.serve_channel_open();
            // A delivery whose body is cut off: method and header, half of the body.
            p.send(&deliver_frame(ch1, &tag, 1));
            p.send(&header_frame(ch1, 10, &no_props()));
            p.send(&body_frame(ch1, b"12345"));
            p.expect("channel.close", |ch, m| {
                (ch == ch1 && matches!(m, AMQPClass::Channel(channel::AMQPMethod::Close(_))))
                    .then_some(())
            });
            // The rest of the content, then close-ok: neither is a protocol violation.
            p.send(&body_frame(ch1, b"67890"));
            p.send_method(
                ch1,
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
            );
            // The connection still works on channel 2.
            let ch = p.expect("queue.declare", |ch, m| {
                matches!(m, AMQPClass::Queue(queue::AMQPMethod::Declare(_))).then_some(ch)
            });
            assert_eq!(ch, ch2);
            p.send_method(
                ch2,
                AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                    queue: "after".into(),
                    message_count: 0,
                    consumer_count: 0,
                })),
            );
            p.expect_connection_close().reply_code
        });
        let conn = Connection::open_with(broker.options()).unwrap();
        let (ch1, _consumer) = consume(&conn);
        let ch2 = conn.open_channel().unwrap();
        // Let the cut-off content arrive before the close.
        thread::sleep(Duration::from_millis(100));
        ch1.close().unwrap();
        let info = ch2
            .queue_declare("after", &QueueDeclareOptions::default())
            .unwrap();
        assert_eq!(info.name, "after");
        assert!(conn.is_open());
        conn.close().unwrap();
        assert_eq!(broker.finish(), reply_code::REPLY_SUCCESS);
    });
}
