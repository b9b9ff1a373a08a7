//! Integration tests against a real RabbitMQ broker (`AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). Every test uses its own uniquely named
//! queues and exchanges, cleans up after itself, and waits with deadlines only.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use lepus::{
    AuthMechanism, BasicProperties, Channel, Confirm, Connection, ConnectionOptions,
    ConsumeOptions, Error, ExchangeDeclareOptions, FieldTable, FieldValue, HandshakeStage,
    PublishOptions, QueueDeclareOptions, QueueDeleteOptions, RecoveryOptions, RecvError,
    reply_code,
};
use support::{
    Cleanup, Forwarder, amqp_url, broker_addr, connect, free_port, pattern, publish_confirmed,
    rabbitmqctl, test_options, unique, wait_until,
};

/// How long a message that should arrive may take.
const WAIT: Duration = Duration::from_secs(5);
/// How long we watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);

fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

fn args(pairs: &[(&str, FieldValue)]) -> FieldTable {
    pairs.iter().cloned().collect()
}

/// A server-named exclusive queue (deleted with its connection).
fn temp_queue(ch: &Channel) -> String {
    ch.queue_declare("", &exclusive())
        .expect("declare a server-named queue")
        .name
}

fn no_args() -> FieldTable {
    FieldTable::new()
}

fn publish(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange,
        routing_key,
        body,
        &BasicProperties::new(),
        PublishOptions::default(),
    )
    .expect("publish");
}

/// The URI of the test broker with extra query options.
fn uri_with(query: &str) -> String {
    let base = amqp_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{query}")
}

/// Messages ready in `queue`, asked on a fresh channel (a passive declare).
fn ready_count(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.open_channel().expect("open a channel");
    let n = ch
        .queue_declare(queue, &passive())
        .expect("passive declare")
        .message_count;
    ch.close().expect("close the channel");
    n
}

/// True if `queue` exists, asked on a fresh channel (a 404 closes that channel only).
fn queue_exists(conn: &Connection, queue: &str) -> bool {
    let ch = conn.open_channel().expect("open a channel");
    match ch.queue_declare(queue, &passive()) {
        Ok(_) => true,
        Err(Error::ServerClosedChannel { code: 404, .. }) => false,
        Err(e) => panic!("passive declare of {queue}: {e}"),
    }
}

/// Assert that `r` failed because the broker closed channel `channel` with `code`.
#[track_caller]
fn assert_channel_closed<T: std::fmt::Debug>(r: lepus::Result<T>, channel: u16, code: u16) {
    match r {
        Err(Error::ServerClosedChannel {
            channel: c,
            code: got,
            ..
        }) if c == channel && got == code => {}
        other => {
            panic!("expected channel {channel} closed by the broker with {code}, got {other:?}")
        }
    }
}

/// `basic.get` until a message is there (published on another channel, so it may take a
/// moment), for at most `WAIT`.
#[track_caller]
fn get_eventually(ch: &Channel, queue: &str, no_ack: bool) -> lepus::Delivery {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(d) = ch.basic_get(queue, no_ack).expect("basic.get") {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "no message in {queue} within {WAIT:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn recv_body(consumer: &lepus::Consumer) -> Vec<u8> {
    consumer.recv_timeout(WAIT).expect("a delivery").into_body()
}

// ------------------------------------------------------------------------------------
// 1. Connections
// ------------------------------------------------------------------------------------

#[test]
fn connection_by_uri_negotiates_limits_and_shows_its_name() {
    let name = unique("conn-name");
    let conn = Connection::open(&uri_with(&format!(
        "heartbeat=7&frame_max=8192&channel_max=10&connection_timeout=5000&connection_name={name}"
    )))
    .expect("open by URI");
    assert!(conn.is_open());
    assert!(conn.close_reason().is_none());
    assert_eq!(conn.frame_max(), 8192);
    assert_eq!(conn.channel_max(), 10);
    assert_eq!(conn.heartbeat(), 7);

    let props = conn.server_properties();
    assert_eq!(
        props.get("product").and_then(FieldValue::as_str),
        Some("RabbitMQ"),
        "server properties: {props:?}"
    );
    match props.get("capabilities") {
        Some(FieldValue::Table(caps)) => {
            assert_eq!(
                caps.get("publisher_confirms"),
                Some(&FieldValue::Bool(true))
            );
            assert_eq!(
                caps.get("connection.blocked"),
                Some(&FieldValue::Bool(true))
            );
        }
        other => panic!("capabilities: {other:?}"),
    }

    // channel_max is enforced on our side.
    let channels: Vec<Channel> = (0..10).map(|_| conn.open_channel().unwrap()).collect();
    let ids: HashSet<u16> = channels.iter().map(Channel::id).collect();
    assert_eq!(ids, (1..=10).collect::<HashSet<u16>>());
    match conn.open_channel() {
        Err(Error::NoFreeChannel(10)) => {}
        other => panic!("expected NoFreeChannel(10), got {other:?}"),
    }
    // A closed channel's id can be used again.
    let freed = channels[3].id();
    channels[3].close().unwrap();
    assert!(!channels[3].is_open());
    let again = conn.open_channel().expect("open after a close");
    assert_eq!(again.id(), freed);

    // A body larger than frame_max is split into several body frames and comes back whole.
    let ch = &channels[0];
    let q = temp_queue(ch);
    let body = pattern(50_000, 7);
    publish(ch, "", &q, &body);
    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let d = consumer.recv_timeout(WAIT).unwrap();
    assert_eq!(d.body(), &body[..]);
    d.ack().unwrap();

    // The broker sees the connection name.
    let listing = rabbitmqctl(&["list_connections", "client_properties"]);
    assert!(
        listing.contains(&name),
        "connection name {name} not in:\n{listing}"
    );

    conn.close().expect("close");
    assert!(!conn.is_open());
    assert!(matches!(conn.close_reason(), Some(Error::ConnectionClosed)));
    assert!(matches!(conn.open_channel(), Err(Error::ConnectionClosed)));
    assert!(matches!(
        ch.queue_declare("", &exclusive()),
        Err(Error::ConnectionClosed)
    ));
    // Closing twice is fine.
    conn.close().expect("second close");
}

#[test]
fn connection_by_options_uses_broker_values_when_we_ask_for_none() {
    let addr = broker_addr();
    let name = unique("conn-opts");
    let prop = unique("prop-value");
    let opts = ConnectionOptions::new()
        .host(addr.ip().to_string())
        .port(addr.port())
        .vhost("/")
        .credentials("guest", "guest")
        .heartbeat(0)
        .frame_max(0)
        .channel_max(0)
        .connection_name(&name)
        .client_property("lepus-test-property", prop.as_str())
        .connection_timeout(Duration::from_secs(5))
        .operation_timeout(Duration::from_secs(10));
    let conn = Connection::open_with(opts).expect("open with options");
    assert_eq!(conn.heartbeat(), 0, "we asked for no heartbeats");
    // RabbitMQ's defaults (rabbitmq.conf frame_max / channel_max).
    assert_eq!(conn.frame_max(), 131_072);
    assert_eq!(conn.channel_max(), 2047);
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    publish_confirmed_on_fresh(&conn, &q, b"x");
    assert_eq!(ch.basic_get(&q, true).unwrap().unwrap().body(), b"x");
    // The name and the extra client property reach the broker.
    let listing = rabbitmqctl(&["list_connections", "client_properties"]);
    assert!(listing.contains(&name), "{name} not in:\n{listing}");
    assert!(listing.contains(&prop), "{prop} not in:\n{listing}");
    conn.close().unwrap();

    // Where the broker's heartbeat is lower than ours, the broker's wins.
    let conn = Connection::open_with(test_options().heartbeat(600)).unwrap();
    assert_eq!(conn.heartbeat(), 60, "RabbitMQ's default heartbeat");
    conn.close().unwrap();
}

fn publish_confirmed_on_fresh(conn: &Connection, queue: &str, body: &[u8]) {
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    publish_confirmed(&ch, "", queue, body);
    ch.close().unwrap();
}

#[test]
fn amqplain_authentication_works() {
    let conn = Connection::open(&uri_with("auth_mechanism=amqplain")).expect("AMQPLAIN login");
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    publish(&ch, "", &q, b"amqplain");
    assert_eq!(ch.basic_get(&q, true).unwrap().unwrap().body(), b"amqplain");
    conn.close().unwrap();

    // And through ConnectionOptions, with a wrong password: still a clean auth failure.
    let r = Connection::open_with(
        test_options()
            .auth_mechanism(AuthMechanism::AmqPlain)
            .credentials("guest", "not-the-password"),
    );
    assert!(
        matches!(r, Err(Error::AuthenticationFailed(_))),
        "AMQPLAIN with a bad password: {r:?}"
    );
}

#[test]
fn bad_credentials_are_authentication_failed() {
    for (user, pass) in [("guest", "wrong-password"), ("no-such-user-lepus", "x")] {
        let t0 = Instant::now();
        let r = Connection::open_with(test_options().credentials(user, pass));
        assert!(
            matches!(r, Err(Error::AuthenticationFailed(_))),
            "{user}/{pass}: {r:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }
}

#[test]
fn unknown_vhost_is_vhost_refused() {
    let vhost = unique("no-such-vhost");
    let t0 = Instant::now();
    let r = Connection::open_with(test_options().vhost(&vhost));
    match r {
        Err(Error::VhostRefused {
            vhost: v,
            code,
            text,
        }) => {
            assert_eq!(v, vhost);
            assert_eq!(code, reply_code::NOT_ALLOWED, "{text}");
        }
        other => panic!("expected VhostRefused, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn refused_port_is_io_error_at_connect() {
    let port = free_port();
    let t0 = Instant::now();
    let r = Connection::open_with(
        test_options()
            .host("127.0.0.1")
            .port(port)
            .connection_timeout(Duration::from_secs(2)),
    );
    match r {
        Err(Error::Io {
            stage: HandshakeStage::Connect,
            source,
        }) => assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused),
        other => panic!("expected Io at Connect, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

// ------------------------------------------------------------------------------------
// 2. Exchanges
// ------------------------------------------------------------------------------------

#[test]
fn exchange_declare_passive_delete_and_exchange_to_exchange_bindings() {
    let clean = Cleanup::new();
    let src = clean.exchange(&unique("ex-src"));
    let dst = clean.exchange(&unique("ex-dst"));
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();

    ch.exchange_declare(&src, "direct", &ExchangeDeclareOptions::default())
        .unwrap();
    let internal = ExchangeDeclareOptions {
        internal: true,
        ..Default::default()
    };
    ch.exchange_declare(&dst, "fanout", &internal).unwrap();
    let passive_x = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.exchange_declare(&src, "direct", &passive_x)
        .expect("passive declare of an existing exchange");
    ch.exchange_declare(&dst, "fanout", &internal)
        .expect("an equivalent redeclare");

    // Redeclaring with another type is refused: 406 on that channel only.
    let other = conn.open_channel().unwrap();
    assert_channel_closed(
        other.exchange_declare(&src, "fanout", &ExchangeDeclareOptions::default()),
        other.id(),
        reply_code::PRECONDITION_FAILED,
    );

    let q = temp_queue(&ch);
    ch.queue_bind(&q, &dst, "", &no_args()).unwrap();
    ch.exchange_bind(&dst, &src, "rk", &no_args()).unwrap();

    publish_confirmed(&ch, &src, "rk", b"through e2e");
    publish_confirmed(&ch, &src, "other-key", b"no binding for this key");
    let d = ch
        .basic_get(&q, true)
        .unwrap()
        .expect("routed through the exchange-to-exchange binding");
    assert_eq!(d.body(), b"through e2e");
    assert_eq!(d.exchange(), src);
    assert_eq!(d.routing_key(), "rk");
    assert!(ch.basic_get(&q, true).unwrap().is_none());

    // The source has a binding: delete if_unused is refused.
    let other = conn.open_channel().unwrap();
    assert_channel_closed(
        other.exchange_delete(&src, true),
        other.id(),
        reply_code::PRECONDITION_FAILED,
    );

    ch.exchange_unbind(&dst, &src, "rk", &no_args()).unwrap();
    publish_confirmed(&ch, &src, "rk", b"after unbind");
    assert!(
        ch.basic_get(&q, true).unwrap().is_none(),
        "routed after unbind"
    );

    // An internal exchange takes no direct publishes: 403 closes the publishing channel,
    // which fails the publish's confirmation.
    let direct = conn.open_channel().unwrap();
    direct.confirm_select().unwrap();
    let c = direct
        .basic_publish_confirmed(
            &dst,
            "",
            b"direct",
            &BasicProperties::new(),
            PublishOptions::default(),
        )
        .unwrap();
    assert_channel_closed(c.wait(), direct.id(), reply_code::ACCESS_REFUSED);
    assert!(!direct.is_open());

    ch.exchange_delete(&dst, false).unwrap();
    ch.exchange_delete(&src, false).unwrap();
    for x in [&src, &dst] {
        let probe = conn.open_channel().unwrap();
        assert_channel_closed(
            probe.exchange_declare(x, "direct", &passive_x),
            probe.id(),
            reply_code::NOT_FOUND,
        );
    }
    assert!(ch.is_open());
    conn.close().unwrap();
}

// ------------------------------------------------------------------------------------
// 3. Queues
// ------------------------------------------------------------------------------------

#[test]
fn queue_declare_server_named_passive_and_exclusive() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let info = ch.queue_declare("", &exclusive()).unwrap();
    assert!(info.name.starts_with("amq.gen-"), "{}", info.name);
    assert_eq!((info.message_count, info.consumer_count), (0, 0));

    // An exclusive named queue: usable from its own connection only.
    let name = unique("exclusive");
    ch.queue_declare(&name, &exclusive()).unwrap();
    ch.confirm_select().unwrap();
    for _ in 0..3 {
        publish_confirmed(&ch, "", &name, b"m");
    }
    let consumer = ch.basic_consume(&name, &ConsumeOptions::default()).unwrap();
    let again = ch.queue_declare(&name, &passive()).unwrap();
    assert_eq!(again.name, name);
    assert_eq!(again.consumer_count, 1);

    let other = connect();
    let och = other.open_channel().unwrap();
    assert_channel_closed(
        och.queue_declare(&name, &passive()),
        och.id(),
        reply_code::RESOURCE_LOCKED,
    );
    drop(consumer);
    conn.close().unwrap();
    // Gone with its connection.
    assert!(
        wait_until(WAIT, || !queue_exists(&other, &name)),
        "exclusive queue outlived its connection"
    );
    other.close().unwrap();
}

#[test]
fn queue_auto_delete_goes_with_its_last_consumer() {
    let clean = Cleanup::new();
    let name = clean.queue(&unique("auto-delete"));
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let opts = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    ch.queue_declare(&name, &opts).unwrap();
    let consumer = ch.basic_consume(&name, &ConsumeOptions::default()).unwrap();
    assert!(queue_exists(&conn, &name));
    consumer.cancel().unwrap();
    assert!(
        wait_until(WAIT, || !queue_exists(&conn, &name)),
        "auto-delete queue survived its last consumer"
    );
    conn.close().unwrap();
}

#[test]
fn queue_arguments_ttl_and_max_length_take_effect() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();

    // x-max-length: the oldest messages are dropped.
    let capped = unique("max-length");
    let capped_args = args(&[("x-max-length", FieldValue::I32(2))]);
    ch.queue_declare(
        &capped,
        &QueueDeclareOptions {
            exclusive: true,
            arguments: capped_args.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..5 {
        publish_confirmed(&ch, "", &capped, format!("m{i}").as_bytes());
    }
    assert_eq!(
        ch.queue_declare(&capped, &passive()).unwrap().message_count,
        2
    );
    let first = ch.basic_get(&capped, true).unwrap().unwrap();
    assert_eq!(first.body(), b"m3");
    assert_eq!(first.message_count(), Some(1));
    assert_eq!(ch.basic_get(&capped, true).unwrap().unwrap().body(), b"m4");
    assert!(ch.basic_get(&capped, true).unwrap().is_none());

    // Redeclaring with different arguments is refused (406).
    let other = conn.open_channel().unwrap();
    assert_channel_closed(
        other.queue_declare(
            &capped,
            &QueueDeclareOptions {
                exclusive: true,
                arguments: args(&[("x-max-length", FieldValue::I32(3))]),
                ..Default::default()
            },
        ),
        other.id(),
        reply_code::PRECONDITION_FAILED,
    );

    // x-message-ttl: messages expire.
    let ttl = unique("ttl");
    ch.queue_declare(
        &ttl,
        &QueueDeclareOptions {
            exclusive: true,
            arguments: args(&[("x-message-ttl", FieldValue::I32(100))]),
            ..Default::default()
        },
    )
    .unwrap();
    publish_confirmed(&ch, "", &ttl, b"short-lived");
    assert!(
        wait_until(WAIT, || ch
            .queue_declare(&ttl, &passive())
            .unwrap()
            .message_count
            == 0),
        "message did not expire"
    );
    assert!(ch.basic_get(&ttl, true).unwrap().is_none());
    conn.close().unwrap();
}

#[test]
fn queue_bind_unbind_purge_and_delete_counts() {
    let clean = Cleanup::new();
    let q = clean.queue(&unique("bind"));
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    ch.queue_declare(&q, &QueueDeclareOptions::default())
        .unwrap();
    let key = unique("key");
    ch.queue_bind(&q, "amq.direct", &key, &no_args()).unwrap();
    ch.queue_bind(&q, "amq.topic", "lepus.*.x", &no_args())
        .unwrap();

    publish_confirmed(&ch, "amq.direct", &key, b"1");
    publish_confirmed(&ch, "amq.topic", "lepus.any.x", b"2");
    publish_confirmed(&ch, "amq.topic", "lepus.any.y", b"not matched");
    publish_confirmed(&ch, "", &q, b"3");
    assert_eq!(ready_count(&conn, &q), 3);
    assert_eq!(ch.queue_purge(&q).unwrap(), 3);
    assert_eq!(ready_count(&conn, &q), 0);
    assert_eq!(ch.queue_purge(&q).unwrap(), 0);

    ch.queue_unbind(&q, "amq.direct", &key, &no_args()).unwrap();
    ch.queue_unbind(&q, "amq.topic", "lepus.*.x", &no_args())
        .unwrap();
    publish_confirmed(&ch, "amq.direct", &key, b"after unbind");
    publish_confirmed(&ch, "amq.topic", "lepus.any.x", b"after unbind");
    assert_eq!(ready_count(&conn, &q), 0, "routed after unbind");

    publish_confirmed(&ch, "", &q, b"a");
    publish_confirmed(&ch, "", &q, b"b");

    // if_empty / if_unused are honoured (406 on that channel only).
    let other = conn.open_channel().unwrap();
    assert_channel_closed(
        other.queue_delete(
            &q,
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        ),
        other.id(),
        reply_code::PRECONDITION_FAILED,
    );
    let consumer_ch = conn.open_channel().unwrap();
    consumer_ch.basic_qos(1, false).unwrap();
    let consumer = consumer_ch
        .basic_consume(&q, &ConsumeOptions::default())
        .unwrap();
    let held = consumer.recv_timeout(WAIT).unwrap(); // one unacked, one ready
    let other = conn.open_channel().unwrap();
    assert_channel_closed(
        other.queue_delete(
            &q,
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
        other.id(),
        reply_code::PRECONDITION_FAILED,
    );
    drop(held);
    consumer_ch.close().unwrap(); // the unacked message goes back
    drop(consumer);
    assert!(wait_until(WAIT, || ready_count(&conn, &q) == 2));

    assert_eq!(
        ch.queue_delete(&q, QueueDeleteOptions::default()).unwrap(),
        2
    );
    assert!(!queue_exists(&conn, &q));
    conn.close().unwrap();
}

// ------------------------------------------------------------------------------------
// 4. basic.*
// ------------------------------------------------------------------------------------

fn all_properties() -> BasicProperties {
    let nested = FieldTable::new()
        .with("inner-str", "inner")
        .with("inner-int", 7i32)
        .with(
            "deeper",
            FieldTable::new()
                .with("leaf", true)
                .with("list", FieldValue::Array(vec![FieldValue::I64(-1)])),
        );
    let headers = FieldTable::new()
        .with("bool", true)
        .with("i8", FieldValue::I8(-8))
        .with("u8", FieldValue::U8(200))
        .with("i16", FieldValue::I16(-1600))
        .with("u16", FieldValue::U16(60_000))
        .with("i32", -320_000i32)
        .with("u32", 4_000_000_000u32)
        .with("i64", -64_000_000_000i64)
        .with("f32", FieldValue::F32(1.5))
        .with("f64", FieldValue::F64(-2.25))
        .with(
            "decimal",
            FieldValue::Decimal {
                scale: 2,
                value: 12_345,
            },
        )
        .with("string", "h\u{e9}llo w\u{f6}rld")
        .with("bytes", FieldValue::Bytes(vec![0, 1, 2, 254, 255]))
        .with("timestamp", FieldValue::Timestamp(1_700_000_000))
        .with("void", FieldValue::Void)
        .with(
            "array",
            FieldValue::Array(vec![
                1i32.into(),
                "two".into(),
                FieldValue::Table(FieldTable::new().with("three", 3i32)),
                FieldValue::Array(vec![FieldValue::Bool(false)]),
            ]),
        )
        .with("nested", nested);
    BasicProperties::new()
        .content_type("application/octet-stream")
        .content_encoding("identity")
        .headers(headers)
        .delivery_mode(2)
        .priority(5)
        .correlation_id("corr-1")
        .reply_to("reply-queue")
        .expiration("600000")
        .message_id("msg-1")
        .timestamp(1_700_000_001)
        .kind("lepus.test")
        .user_id("guest")
        .app_id("lepus-tests")
        .cluster_id("cluster-x")
}

#[test]
fn publish_round_trips_every_property_and_nested_headers() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = temp_queue(&ch);
    let props = all_properties();
    for body in [&b"via get"[..], b"via consume"] {
        let c = ch
            .basic_publish_confirmed("", &q, body, &props, PublishOptions::default())
            .unwrap();
        assert_eq!(c.wait().unwrap(), Confirm::Ack);
    }

    let d = ch.basic_get(&q, false).unwrap().expect("a message");
    assert_eq!(d.body(), b"via get");
    assert_eq!(d.properties(), &props);
    assert_eq!((d.exchange(), d.routing_key()), ("", q.as_str()));
    assert!(!d.redelivered());
    assert_eq!(d.message_count(), Some(1));
    d.ack().unwrap();

    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let d = consumer.recv_timeout(WAIT).unwrap();
    assert_eq!(d.body(), b"via consume");
    assert_eq!(d.properties(), &props);
    assert_eq!(d.message_count(), None);
    assert_eq!(d.channel_id(), ch.id());
    d.ack().unwrap();

    // An empty property set stays empty.
    publish(&ch, "", &q, b"");
    let d = consumer.recv_timeout(WAIT).unwrap();
    assert_eq!(d.properties(), &BasicProperties::new());
    assert!(d.body().is_empty());
    d.ack().unwrap();
    conn.close().unwrap();
}

#[test]
fn basic_get_some_none_and_message_count() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = temp_queue(&ch);
    assert!(ch.basic_get(&q, false).unwrap().is_none());
    for i in 0..3 {
        publish_confirmed(&ch, "", &q, format!("g{i}").as_bytes());
    }
    for i in 0..3u32 {
        let d = ch.basic_get(&q, false).unwrap().expect("a message");
        assert_eq!(d.body(), format!("g{i}").as_bytes());
        assert_eq!(d.message_count(), Some(2 - i));
        assert_eq!(d.delivery_tag(), u64::from(i) + 1);
        d.ack().unwrap();
    }
    assert!(ch.basic_get(&q, false).unwrap().is_none());
    // The acks were taken: nothing comes back when the channel closes.
    ch.close().unwrap();
    thread::sleep(QUIET); // an unacked message would be back by now
    assert_eq!(ready_count(&conn, &q), 0);
    conn.close().unwrap();
}

#[test]
fn basic_qos_limits_unacked_deliveries() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    ch.basic_qos(2, false).unwrap();
    for i in 0..5 {
        publish(&ch, "", &q, format!("q{i}").as_bytes());
    }
    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let a = consumer.recv_timeout(WAIT).unwrap();
    let b = consumer.recv_timeout(WAIT).unwrap();
    assert!(
        matches!(
            consumer.recv_timeout(QUIET),
            Err(RecvError::Failed(Error::Timeout(_)))
        ),
        "a third delivery arrived with prefetch 2"
    );
    a.ack().unwrap();
    let c = consumer.recv_timeout(WAIT).unwrap();
    assert_eq!(c.body(), b"q2");
    assert!(matches!(
        consumer.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::Timeout(_)))
    ));
    b.ack().unwrap();
    c.ack().unwrap();
    assert_eq!(recv_body(&consumer), b"q3");
    conn.close().unwrap();
}

#[test]
fn consume_with_custom_and_server_tags() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let tag = unique("ctag");
    let custom = ch
        .basic_consume(
            &q,
            &ConsumeOptions {
                consumer_tag: tag.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(custom.tag(), tag);
    assert_eq!(custom.channel().id(), ch.id());
    publish(&ch, "", &q, b"to custom");
    let d = custom.recv_timeout(WAIT).unwrap();
    assert_eq!(d.body(), b"to custom");
    d.ack().unwrap();
    custom.cancel().unwrap();

    let server = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    assert!(server.tag().starts_with("amq.ctag-"), "{}", server.tag());
    publish(&ch, "", &q, b"to server-tagged");
    let d = server.recv_timeout(WAIT).unwrap();
    assert_eq!(d.body(), b"to server-tagged");
    d.ack().unwrap();
    // The cancelled consumer got nothing more.
    assert!(matches!(
        custom.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::ConsumerCancelled { .. }))
    ));
    conn.close().unwrap();
}

#[test]
fn second_exclusive_consumer_closes_only_its_channel() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let ex = ConsumeOptions {
        exclusive: true,
        ..Default::default()
    };
    let first = ch.basic_consume(&q, &ex).unwrap();
    let ch2 = conn.open_channel().unwrap();
    assert_channel_closed(
        ch2.basic_consume(&q, &ex),
        ch2.id(),
        reply_code::ACCESS_REFUSED,
    );
    assert!(!ch2.is_open());
    assert!(matches!(
        ch2.close_reason(),
        Some(Error::ServerClosedChannel { code: 403, .. })
    ));
    // A plain consumer is refused too while the exclusive one is there.
    let ch3 = conn.open_channel().unwrap();
    assert_channel_closed(
        ch3.basic_consume(&q, &ConsumeOptions::default()),
        ch3.id(),
        reply_code::ACCESS_REFUSED,
    );
    // The first consumer, its channel and the connection carry on.
    assert!(conn.is_open() && ch.is_open());
    let pubch = conn.open_channel().unwrap();
    publish(&pubch, "", &q, b"still works");
    assert_eq!(recv_body(&first), b"still works");
    conn.close().unwrap();
}

#[test]
fn no_ack_consumer_and_cancel() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let no_ack = ConsumeOptions {
        no_ack: true,
        ..Default::default()
    };

    // Unacked deliveries of an ack-mode consumer go back when its channel closes ...
    let ach = conn.open_channel().unwrap();
    let c = ach.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    for i in 0..3 {
        publish(&ch, "", &q, format!("a{i}").as_bytes());
    }
    for _ in 0..3 {
        c.recv_timeout(WAIT).unwrap();
    }
    ach.close().unwrap();
    assert!(matches!(
        c.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::ChannelClosed(_)))
    ));
    assert!(matches!(
        ach.basic_publish(
            "",
            &q,
            b"x",
            &BasicProperties::new(),
            PublishOptions::default()
        ),
        Err(Error::ChannelClosed(_))
    ));
    drop(c);
    assert!(wait_until(WAIT, || ready_count(&conn, &q) == 3));

    // ... those of a no_ack consumer are gone once delivered.
    let nch = conn.open_channel().unwrap();
    let c = nch.basic_consume(&q, &no_ack).unwrap();
    let mut got: Vec<Vec<u8>> = (0..3).map(|_| recv_body(&c)).collect();
    got.sort();
    assert_eq!(got, vec![b"a0".to_vec(), b"a1".to_vec(), b"a2".to_vec()]);

    // cancel: queued deliveries can still be read, then the consumer reports its end
    // and nothing more reaches it.
    c.cancel().unwrap();
    c.cancel().unwrap(); // twice is fine
    match c.recv_timeout(WAIT) {
        Err(RecvError::Failed(Error::ConsumerCancelled { tag, .. })) => assert_eq!(tag, c.tag()),
        other => panic!("expected ConsumerCancelled, got {other:?}"),
    }
    publish(&ch, "", &q, b"after cancel");
    assert!(matches!(
        c.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::ConsumerCancelled { .. }))
    ));
    nch.close().unwrap();
    assert!(wait_until(WAIT, || ready_count(&conn, &q) == 1));
    let info = ch.queue_declare(&q, &passive()).unwrap();
    assert_eq!(info.consumer_count, 0);
    conn.close().unwrap();
}

#[test]
fn ack_nack_reject_with_multiple_and_requeue() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let pubch = conn.open_channel().unwrap();
    pubch.confirm_select().unwrap();
    for i in 0..7 {
        publish_confirmed(&pubch, "", &q, format!("m{i}").as_bytes());
    }
    ch.basic_qos(20, false).unwrap();
    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let d: Vec<_> = (0..7)
        .map(|_| consumer.recv_timeout(WAIT).unwrap())
        .collect();
    for (i, x) in d.iter().enumerate() {
        assert_eq!(x.body(), format!("m{i}").as_bytes());
        assert!(!x.redelivered());
    }
    d[1].ack_multiple().unwrap(); // m0, m1 acked
    d[3].nack_multiple(true).unwrap(); // m2, m3 requeued
    d[4].reject(false).unwrap(); // m4 dropped
    d[5].nack(false).unwrap(); // m5 dropped
    d[6].reject(true).unwrap(); // m6 requeued

    let mut again: Vec<_> = (0..3)
        .map(|_| consumer.recv_timeout(WAIT).unwrap())
        .collect();
    again.sort_by(|a, b| a.body().cmp(b.body()));
    let bodies: Vec<&[u8]> = again.iter().map(|x| x.body()).collect();
    assert_eq!(bodies, vec![&b"m2"[..], b"m3", b"m6"]);
    assert!(again.iter().all(|x| x.redelivered()));
    assert!(
        matches!(
            consumer.recv_timeout(QUIET),
            Err(RecvError::Failed(Error::Timeout(_)))
        ),
        "a dropped or acked message came back"
    );
    // Channel-level helpers by delivery tag, with multiple.
    let max_tag = again.iter().map(|x| x.delivery_tag()).max().unwrap();
    ch.basic_ack(max_tag, true).unwrap();
    consumer.cancel().unwrap();
    ch.close().unwrap();
    thread::sleep(QUIET); // an unacked message would be back by now
    assert_eq!(ready_count(&conn, &q), 0);

    // basic_nack / basic_reject by tag on a fresh channel.
    publish_confirmed(&pubch, "", &q, b"n");
    publish_confirmed(&pubch, "", &q, b"r");
    let ch = conn.open_channel().unwrap();
    let n = ch.basic_get(&q, false).unwrap().unwrap();
    let r = ch.basic_get(&q, false).unwrap().unwrap();
    ch.basic_reject(r.delivery_tag(), false).unwrap();
    ch.basic_nack(n.delivery_tag(), false, true).unwrap();
    let back = ch
        .basic_get(&q, false)
        .unwrap()
        .expect("nacked message requeued");
    assert_eq!(back.body(), b"n");
    assert!(back.redelivered());
    assert_eq!(
        back.message_count(),
        Some(0),
        "the rejected one was not requeued"
    );
    back.ack().unwrap();
    conn.close().unwrap();
}

#[test]
fn basic_recover_redelivers_unacked() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    publish(&ch, "", &q, b"r1");
    publish(&ch, "", &q, b"r2");
    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let first: Vec<_> = (0..2)
        .map(|_| consumer.recv_timeout(WAIT).unwrap())
        .collect();
    assert!(first.iter().all(|d| !d.redelivered()));
    ch.basic_recover(true).unwrap();
    let mut again: Vec<_> = (0..2)
        .map(|_| consumer.recv_timeout(WAIT).unwrap())
        .collect();
    again.sort_by(|a, b| a.body().cmp(b.body()));
    assert_eq!(again[0].body(), b"r1");
    assert_eq!(again[1].body(), b"r2");
    assert!(again.iter().all(|d| d.redelivered()));
    again[1].ack_multiple().unwrap();
    assert!(matches!(
        consumer.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::Timeout(_)))
    ));
    conn.close().unwrap();
}

// ------------------------------------------------------------------------------------
// 5. Publisher confirms
// ------------------------------------------------------------------------------------

#[test]
fn confirms_ack_and_wait_for_confirms() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    // Not in confirm mode yet.
    assert!(matches!(
        ch.basic_publish_confirmed(
            "",
            &q,
            b"x",
            &BasicProperties::new(),
            PublishOptions::default()
        ),
        Err(Error::NotInConfirmMode)
    ));
    assert!(matches!(
        ch.wait_for_confirms(),
        Err(Error::NotInConfirmMode)
    ));

    ch.confirm_select().unwrap();
    ch.confirm_select().unwrap(); // idempotent
    let handles: Vec<_> = (0..5)
        .map(|i| {
            ch.basic_publish_confirmed(
                "",
                &q,
                format!("c{i}").as_bytes(),
                &BasicProperties::new(),
                PublishOptions::default(),
            )
            .unwrap()
        })
        .collect();
    let seqs: Vec<u64> = handles.iter().map(|c| c.sequence()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    for c in &handles {
        assert_eq!(c.wait().unwrap(), Confirm::Ack);
        assert_eq!(c.try_get(), Some(Confirm::Ack));
    }
    for i in 0..100 {
        publish(&ch, "", &q, format!("u{i}").as_bytes());
    }
    assert!(ch.wait_for_confirms().unwrap());
    assert_eq!(ch.unconfirmed(), 0);
    assert!(ch.wait_for_confirms().unwrap(), "nothing outstanding");
    assert_eq!(ready_count(&conn, &q), 105);
    conn.close().unwrap();
}

#[test]
fn confirms_nack_on_reject_publish_overflow() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = ch
        .queue_declare(
            "",
            &QueueDeclareOptions {
                exclusive: true,
                arguments: args(&[
                    ("x-max-length", FieldValue::I32(1)),
                    ("x-overflow", "reject-publish".into()),
                ]),
                ..Default::default()
            },
        )
        .unwrap()
        .name;
    ch.confirm_select().unwrap();
    let p = |body: &[u8]| {
        ch.basic_publish_confirmed(
            "",
            &q,
            body,
            &BasicProperties::new(),
            PublishOptions::default(),
        )
        .unwrap()
    };
    let first = p(b"fits");
    let second = p(b"overflows");
    assert_eq!(first.wait().unwrap(), Confirm::Ack);
    assert_eq!(second.wait().unwrap(), Confirm::Nack);
    assert!(
        !ch.wait_for_confirms().unwrap(),
        "a nack since the last wait"
    );
    assert!(
        ch.wait_for_confirms().unwrap(),
        "the nack was reported once"
    );

    // Untracked publishes: wait_for_confirms sees the nack as well.
    publish(&ch, "", &q, b"overflows too");
    assert!(!ch.wait_for_confirms().unwrap());

    assert_eq!(ch.queue_purge(&q).unwrap(), 1);
    publish(&ch, "", &q, b"fits again");
    assert!(ch.wait_for_confirms().unwrap());
    let d = ch.basic_get(&q, true).unwrap().unwrap();
    assert_eq!(d.body(), b"fits again");
    conn.close().unwrap();
}

// ------------------------------------------------------------------------------------
// 6. Transactions
// ------------------------------------------------------------------------------------

#[test]
fn tx_commit_and_rollback_of_publishes_and_acks() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = temp_queue(&ch);

    let tx = conn.open_channel().unwrap();
    tx.tx_select().unwrap();
    publish(&tx, "", &q, b"rolled back");
    tx.tx_rollback().unwrap();
    publish(&tx, "", &q, b"committed");
    assert_eq!(ready_count(&conn, &q), 0, "visible before commit");
    tx.tx_commit().unwrap();
    let d = ch
        .basic_get(&q, true)
        .unwrap()
        .expect("the committed message");
    assert_eq!(d.body(), b"committed");
    assert_eq!(
        d.message_count(),
        Some(0),
        "the rolled-back publish arrived"
    );

    // An ack rolled back leaves the message unacked: it comes back when the channel closes.
    publish_confirmed(&ch, "", &q, b"to ack");
    let d = tx.basic_get(&q, false).unwrap().unwrap();
    d.ack().unwrap();
    tx.tx_rollback().unwrap();
    assert_eq!(ready_count(&conn, &q), 0, "still unacked, not ready");
    tx.close().unwrap();
    // (Requeued when the broker has processed the close: allow it a moment.)
    let back = get_eventually(&ch, &q, false);
    assert_eq!(back.body(), b"to ack");
    assert!(back.redelivered());
    back.reject(true).unwrap();

    // A committed ack sticks.
    let tx = conn.open_channel().unwrap();
    tx.tx_select().unwrap();
    let d = get_eventually(&tx, &q, false); // the reject above is asynchronous
    assert_eq!(d.body(), b"to ack");
    d.ack().unwrap();
    tx.tx_commit().unwrap();
    tx.close().unwrap();
    thread::sleep(QUIET); // an unacked message would be back by now
    assert_eq!(ready_count(&conn, &q), 0);
    assert!(ch.basic_get(&q, true).unwrap().is_none());
    conn.close().unwrap();
}

// ------------------------------------------------------------------------------------
// 7. Mandatory publishes
// ------------------------------------------------------------------------------------

#[test]
fn mandatory_unroutable_publish_is_returned() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let key = unique("nowhere");
    let props = BasicProperties::new().message_id("returned-1");
    // Unroutable but not mandatory: silently dropped, nothing returned.
    ch.basic_publish(
        "amq.direct",
        &key,
        b"dropped",
        &props,
        PublishOptions::default(),
    )
    .unwrap();
    ch.basic_publish(
        "amq.direct",
        &key,
        b"come back",
        &props,
        PublishOptions { mandatory: true },
    )
    .unwrap();
    // The return precedes the confirm.
    assert!(ch.wait_for_confirms().unwrap());
    let r = ch.recv_return(WAIT).expect("a basic.return");
    assert_eq!(r.reply_code, reply_code::NO_ROUTE);
    assert_eq!(r.reply_text, "NO_ROUTE");
    assert_eq!(r.exchange, "amq.direct");
    assert_eq!(r.routing_key, key);
    assert_eq!(r.body, b"come back");
    assert_eq!(r.properties.as_ref().ok(), Some(&props));
    assert!(ch.try_recv_return().is_none());
    assert!(ch.recv_return(QUIET).is_none());

    // A routable mandatory publish is not returned.
    let q = temp_queue(&ch);
    ch.basic_publish(
        "",
        &q,
        b"routed",
        &props,
        PublishOptions { mandatory: true },
    )
    .unwrap();
    assert!(ch.wait_for_confirms().unwrap());
    assert!(ch.try_recv_return().is_none());
    assert_eq!(ch.basic_get(&q, true).unwrap().unwrap().body(), b"routed");
    conn.close().unwrap();
}

// ------------------------------------------------------------------------------------
// 8. Channels closed by the broker
// ------------------------------------------------------------------------------------

#[test]
fn broker_closing_a_channel_leaves_the_others_working() {
    let conn = connect();
    let good = conn.open_channel().unwrap();
    let q = temp_queue(&good);
    let consumer = good.basic_consume(&q, &ConsumeOptions::default()).unwrap();

    // 404 on a passive declare of a missing queue.
    let bad = conn.open_channel().unwrap();
    let missing = unique("missing");
    match bad.queue_declare(&missing, &passive()) {
        Err(Error::ServerClosedChannel {
            channel,
            code,
            text,
            class_id,
            method_id,
        }) => {
            assert_eq!(channel, bad.id());
            assert_eq!(code, reply_code::NOT_FOUND);
            assert!(text.contains(&missing), "{text}");
            assert_eq!((class_id, method_id), (50, 10), "queue.declare");
        }
        other => panic!("expected 404, got {other:?}"),
    }
    assert!(!bad.is_open());
    assert!(matches!(
        bad.close_reason(),
        Some(Error::ServerClosedChannel { code: 404, .. })
    ));
    // Later calls on it fail with the same reason, without reaching the broker.
    assert_channel_closed(bad.queue_declare("", &exclusive()), bad.id(), 404);
    assert_channel_closed(
        bad.basic_publish(
            "",
            &q,
            b"x",
            &BasicProperties::new(),
            PublishOptions::default(),
        ),
        bad.id(),
        404,
    );
    bad.close().expect("closing a closed channel is fine");

    assert!(conn.is_open() && good.is_open());
    publish(&good, "", &q, b"after 404");
    let d = consumer.recv_timeout(WAIT).unwrap();
    assert_eq!(d.body(), b"after 404");

    // 406 on a double ack.
    let acker = conn.open_channel().unwrap();
    publish(&good, "", &q, b"unused"); // goes to the consumer
    let q2 = temp_queue(&good);
    publish(&good, "", &q2, b"ack me twice");
    let m = get_eventually(&acker, &q2, false);
    m.ack().unwrap();
    m.ack().unwrap(); // sent; the broker answers with channel.close
    assert_channel_closed(
        acker.queue_declare(&q2, &passive()),
        acker.id(),
        reply_code::PRECONDITION_FAILED,
    );
    assert!(!acker.is_open());

    // Everything else carries on.
    assert!(conn.is_open() && good.is_open());
    d.ack().unwrap();
    let d = consumer.recv_timeout(WAIT).unwrap();
    assert_eq!(d.body(), b"unused");
    d.ack().unwrap();
    let fresh = conn.open_channel().unwrap();
    fresh.queue_declare(&q, &passive()).unwrap();
    conn.close().unwrap();
}

// ------------------------------------------------------------------------------------
// 9. Consumer cancel notifications
// ------------------------------------------------------------------------------------

#[test]
fn deleting_the_queue_cancels_its_consumers() {
    let clean = Cleanup::new();
    let q = clean.queue(&unique("cancel-notify"));
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.queue_declare(&q, &QueueDeclareOptions::default())
        .unwrap();
    let c1 = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let ch2 = conn.open_channel().unwrap();
    let c2 = Arc::new(ch2.basic_consume(&q, &ConsumeOptions::default()).unwrap());

    // A thread iterates over the second consumer until it ends.
    let (tx, rx) = mpsc::channel();
    let it = c2.clone();
    thread::spawn(move || {
        let items: Vec<_> = it.iter().collect();
        let _ = tx.send(items);
    });

    let deleter = conn.open_channel().unwrap();
    assert_eq!(
        deleter
            .queue_delete(&q, QueueDeleteOptions::default())
            .unwrap(),
        0
    );

    match c1.recv_timeout(WAIT) {
        Err(RecvError::Failed(Error::ConsumerCancelled { tag, .. })) => assert_eq!(tag, c1.tag()),
        other => panic!("expected ConsumerCancelled, got {other:?}"),
    }
    // It stays ended.
    assert!(matches!(
        c1.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::ConsumerCancelled { .. }))
    ));
    let items = rx.recv_timeout(WAIT).expect("the iterator ended");
    assert_eq!(items.len(), 1, "{items:?}");
    match &items[0] {
        Err(RecvError::Failed(Error::ConsumerCancelled { tag, .. })) => assert_eq!(tag, c2.tag()),
        other => panic!("expected ConsumerCancelled, got {other:?}"),
    }
    // The channels stay open.
    assert!(ch.is_open() && ch2.is_open());
    ch.queue_declare("", &exclusive()).unwrap();
    ch2.queue_declare("", &exclusive()).unwrap();
    conn.close().unwrap();
}

// ------------------------------------------------------------------------------------
// 10. Many threads
// ------------------------------------------------------------------------------------

#[test]
fn sixty_four_publisher_threads_every_message_exactly_once() {
    const THREADS: usize = 64;
    const PER_THREAD: usize = 1000;
    const TOTAL: usize = THREADS * PER_THREAD;
    let deadline = Instant::now() + Duration::from_secs(90);

    let consume_conn = connect();
    let setup = consume_conn.open_channel().unwrap();
    let q = temp_queue(&setup);

    let seen: Arc<Vec<AtomicU8>> = Arc::new((0..TOTAL).map(|_| AtomicU8::new(0)).collect());
    let received = Arc::new(AtomicUsize::new(0));
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let ch = consume_conn.open_channel().unwrap();
        ch.basic_qos(300, false).unwrap();
        let c = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
        let (seen, received) = (seen.clone(), received.clone());
        consumers.push(thread::spawn(move || -> Result<usize, String> {
            let mut mine = 0;
            while received.load(Ordering::SeqCst) < TOTAL && Instant::now() < deadline {
                let d = match c.recv_timeout(Duration::from_millis(200)) {
                    Ok(d) => d,
                    Err(RecvError::Failed(Error::Timeout(_))) => continue,
                    Err(e) => return Err(format!("consumer failed: {e}")),
                };
                let body = std::str::from_utf8(d.body()).map_err(|e| e.to_string())?;
                let (t, i) = body.split_once(':').ok_or("bad body")?;
                let id = t.parse::<usize>().unwrap() * PER_THREAD + i.parse::<usize>().unwrap();
                seen[id].fetch_add(1, Ordering::SeqCst);
                received.fetch_add(1, Ordering::SeqCst);
                mine += 1;
                d.ack().map_err(|e| e.to_string())?;
            }
            // Nothing more may arrive.
            match c.recv_timeout(QUIET) {
                Err(RecvError::Failed(Error::Timeout(_))) => Ok(mine),
                Ok(d) => Err(format!(
                    "extra delivery {:?}",
                    String::from_utf8_lossy(d.body())
                )),
                Err(e) => Err(format!("consumer failed at the end: {e}")),
            }
        }));
    }

    let pub_conn = connect();
    let publishers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (conn, q) = (pub_conn.clone(), q.clone());
            thread::spawn(move || -> lepus::Result<()> {
                let ch = conn.open_channel()?;
                let confirm = t % 2 == 0;
                if confirm {
                    ch.confirm_select()?;
                }
                for i in 0..PER_THREAD {
                    ch.basic_publish(
                        "",
                        &q,
                        format!("{t}:{i}").as_bytes(),
                        &BasicProperties::new(),
                        PublishOptions::default(),
                    )?;
                }
                if confirm {
                    assert!(ch.wait_for_confirms()?, "publisher {t}: nacked");
                }
                ch.close()
            })
        })
        .collect();
    for (t, p) in publishers.into_iter().enumerate() {
        p.join()
            .expect("publisher panicked")
            .unwrap_or_else(|e| panic!("publisher {t}: {e}"));
    }
    let mut per_consumer = Vec::new();
    for c in consumers {
        per_consumer.push(c.join().expect("consumer panicked").expect("consumer"));
    }
    let total: usize = per_consumer.iter().sum();
    let missing: Vec<usize> = (0..TOTAL)
        .filter(|&i| seen[i].load(Ordering::SeqCst) == 0)
        .collect();
    let dups: Vec<usize> = (0..TOTAL)
        .filter(|&i| seen[i].load(Ordering::SeqCst) > 1)
        .collect();
    assert!(
        missing.is_empty(),
        "{} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        dups.is_empty(),
        "{} duplicated, e.g. {:?}",
        dups.len(),
        &dups[..dups.len().min(10)]
    );
    assert_eq!(total, TOTAL, "per consumer: {per_consumer:?}");
    assert!(pub_conn.is_open() && consume_conn.is_open());
    pub_conn.close().unwrap();
    consume_conn.close().unwrap();
}

// ------------------------------------------------------------------------------------
// 11. Large messages
// ------------------------------------------------------------------------------------

#[test]
fn ten_mebibyte_body_round_trips_byte_exact() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = temp_queue(&ch);
    let body = pattern(10 * 1024 * 1024 + 3, 0x1e905);
    assert!(body.len() > 64 * conn.frame_max() as usize);
    let c = ch
        .basic_publish_confirmed(
            "",
            &q,
            &body,
            &BasicProperties::new(),
            PublishOptions::default(),
        )
        .unwrap();
    assert_eq!(c.wait().unwrap(), Confirm::Ack);
    // A small message right after it, on the same channel, is not mixed into it.
    publish(&ch, "", &q, b"small");

    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let d = consumer
        .recv_timeout(Duration::from_secs(20))
        .expect("the large message");
    assert_eq!(d.body().len(), body.len());
    assert!(d.body() == &body[..], "body differs");
    d.ack().unwrap();
    assert_eq!(recv_body(&consumer), b"small");

    // And through basic.get.
    consumer.cancel().unwrap();
    publish(&ch, "", &q, &body);
    let got = get_eventually(&ch, &q, true);
    assert!(got.body() == &body[..], "body differs (basic.get)");
    conn.close().unwrap();
}

// ------------------------------------------------------------------------------------
// 13. Dead links and close()
// ------------------------------------------------------------------------------------

/// What a blocked call returned, and when.
type Outcome = (&'static str, Result<String, Error>, Instant);

/// Start a consumer recv(), an RPC, wait_for_confirms and a confirmation wait, all blocked
/// (the forwarder holds traffic back). Returns the receiver of their outcomes.
fn block_calls(conn: &Connection, fwd: &Forwarder) -> (mpsc::Receiver<Outcome>, Vec<&'static str>) {
    block_calls_with(conn, fwd, true)
}

/// [`block_calls`], optionally with a second thread receiving from the same consumer.
fn block_calls_with(
    conn: &Connection,
    fwd: &Forwarder,
    two_receivers: bool,
) -> (mpsc::Receiver<Outcome>, Vec<&'static str>) {
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let consumer = Arc::new(ch.basic_consume(&q, &ConsumeOptions::default()).unwrap());
    let confirm_ch = conn.open_channel().unwrap();
    confirm_ch.confirm_select().unwrap();
    let rpc_ch = conn.open_channel().unwrap();

    fwd.pause();
    let confirmation = confirm_ch
        .basic_publish_confirmed(
            "",
            &q,
            b"held",
            &BasicProperties::new(),
            PublishOptions::default(),
        )
        .unwrap();

    let (tx, rx) = mpsc::channel::<Outcome>();
    let mut names = Vec::new();
    let mut spawn = |what: &'static str, f: Box<dyn FnOnce() -> Result<String, Error> + Send>| {
        let tx = tx.clone();
        names.push(what);
        thread::spawn(move || {
            let r = f();
            let _ = tx.send((what, r, Instant::now()));
        });
    };
    let c = consumer.clone();
    spawn(
        "consumer recv",
        Box::new(move || c.recv().map(|d| format!("{d:?}")).map_err(Error::from)),
    );
    let c = consumer;
    if two_receivers {
        spawn(
            "consumer iter",
            Box::new(move || match c.iter().next() {
                Some(r) => r.map(|d| format!("{d:?}")).map_err(Error::from),
                None => Ok("iterator ended without an error".into()),
            }),
        );
    }
    spawn(
        "rpc",
        Box::new(move || rpc_ch.queue_declare("", &exclusive()).map(|i| i.name)),
    );
    let cc = confirm_ch.clone();
    spawn(
        "wait_for_confirms",
        Box::new(move || cc.wait_for_confirms().map(|b| b.to_string())),
    );
    spawn(
        "confirmation",
        Box::new(move || confirmation.wait().map(|c| format!("{c:?}"))),
    );
    // They are all blocked.
    thread::sleep(QUIET);
    if let Ok((what, r, _)) = rx.try_recv() {
        panic!("{what} returned while traffic was held back: {r:?}");
    }
    (rx, names)
}

/// The outcomes of all `expected` calls, in the order they came; panics naming the calls
/// still blocked after `within`.
fn collect(rx: &mpsc::Receiver<Outcome>, expected: &[&str], within: Duration) -> Vec<Outcome> {
    let deadline = Instant::now() + within;
    let mut got: Vec<Outcome> = Vec::new();
    while got.len() < expected.len() {
        if let Ok(o) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            got.push(o);
            continue;
        }
        let missing: Vec<_> = expected
            .iter()
            .filter(|w| !got.iter().any(|(g, ..)| g == *w))
            .collect();
        panic!("still blocked after {within:?}: {missing:?} (returned: {got:?})");
    }
    got
}

#[test]
fn dead_link_wakes_every_blocked_call_with_connection_lost() {
    let fwd = Forwarder::start();
    let conn = Connection::open_with(
        fwd.options()
            .recovery(RecoveryOptions::disabled())
            .heartbeat(0)
            .operation_timeout(Duration::from_secs(60)),
    )
    .expect("connect through the forwarder");
    let spare = conn.open_channel().unwrap();
    let (rx, names) = block_calls(&conn, &fwd);
    assert!(conn.is_open());

    fwd.kill();
    let killed = Instant::now();
    for (what, r, at) in collect(&rx, &names, Duration::from_secs(3)) {
        match r {
            Err(e) => assert!(e.is_connection_lost(), "{what}: {e:?}"),
            Ok(v) => panic!("{what} succeeded on a dead link: {v}"),
        }
        assert!(
            at - killed < Duration::from_secs(2),
            "{what} took {:?}",
            at - killed
        );
    }
    assert!(wait_until(Duration::from_secs(2), || !conn.is_open()));
    assert!(conn.close_reason().is_some_and(|e| e.is_connection_lost()));
    // New calls fail at once with the same kind of error.
    let t = Instant::now();
    assert!(conn.open_channel().unwrap_err().is_connection_lost());
    assert!(
        spare
            .basic_publish(
                "",
                "q",
                b"x",
                &BasicProperties::new(),
                PublishOptions::default()
            )
            .unwrap_err()
            .is_connection_lost()
    );
    assert!(
        spare
            .queue_declare("", &exclusive())
            .unwrap_err()
            .is_connection_lost()
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    // Closing a lost connection is fine and quick.
    let t = Instant::now();
    conn.close().expect("close after loss");
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn close_wakes_every_waiter_with_connection_closed() {
    let fwd = Forwarder::start();
    let close_timeout = Duration::from_millis(800);
    let conn = Connection::open_with(
        fwd.options()
            .recovery(RecoveryOptions::disabled())
            .heartbeat(0)
            .operation_timeout(Duration::from_secs(60))
            .close_timeout(close_timeout),
    )
    .expect("connect through the forwarder");
    let (rx, names) = block_calls(&conn, &fwd);

    // The broker cannot answer (traffic is held): close() still ends within its timeout.
    let closer = conn.clone();
    let t = Instant::now();
    let closed = thread::spawn(move || closer.close());
    for (what, r, at) in collect(&rx, &names, Duration::from_secs(3)) {
        match r {
            Err(Error::ConnectionClosed) => {}
            other => panic!("{what}: expected ConnectionClosed, got {other:?}"),
        }
        assert!(at - t < Duration::from_secs(1), "{what} took {:?}", at - t);
    }
    let r = closed.join().unwrap();
    assert!(
        matches!(r, Ok(()) | Err(Error::Timeout(_))),
        "close(): {r:?}"
    );
    assert!(
        t.elapsed() < close_timeout + Duration::from_secs(2),
        "close() took {:?}",
        t.elapsed()
    );
    assert!(!conn.is_open());
    match conn.close_reason() {
        Some(e @ Error::ConnectionClosed) => assert!(!e.is_connection_lost()),
        other => panic!("close reason: {other:?}"),
    }
    fwd.resume();
}

#[test]
fn close_on_a_live_connection_is_quick_and_ends_consumers() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let consumer = Arc::new(ch.basic_consume(&q, &ConsumeOptions::default()).unwrap());
    let (tx, rx) = mpsc::channel();
    let c = consumer.clone();
    thread::spawn(move || {
        let _ = tx.send(c.recv());
    });
    thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    conn.close().expect("clean close");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "close took {:?}",
        t.elapsed()
    );
    match rx.recv_timeout(WAIT).expect("the consumer woke") {
        Err(RecvError::Failed(Error::ConnectionClosed)) => {}
        other => panic!("expected ConnectionClosed, got {other:?}"),
    }
    assert!(matches!(
        ch.basic_publish(
            "",
            &q,
            b"x",
            &BasicProperties::new(),
            PublishOptions::default()
        ),
        Err(Error::ConnectionClosed)
    ));
}

// ------------------------------------------------------------------------------------
// More: frame boundaries, heartbeats, deadlines, ordering, back-pressure, drop.
// ------------------------------------------------------------------------------------

#[test]
fn bodies_at_frame_boundaries_round_trip() {
    let conn = Connection::open_with(test_options().frame_max(4096)).unwrap();
    assert_eq!(conn.frame_max(), 4096);
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = temp_queue(&ch);
    // A body frame carries frame_max - 8 bytes.
    let per_frame = 4096 - 8;
    let sizes = [
        0,
        1,
        per_frame - 1,
        per_frame,
        per_frame + 1,
        2 * per_frame,
        2 * per_frame + 1,
        100_000,
    ];
    for (i, &n) in sizes.iter().enumerate() {
        let props = BasicProperties::new().message_id(format!("{i}"));
        ch.basic_publish(
            "",
            &q,
            &pattern(n, i as u64 + 1),
            &props,
            PublishOptions::default(),
        )
        .unwrap();
    }
    assert!(ch.wait_for_confirms().unwrap());
    let consumer = ch
        .basic_consume(
            &q,
            &ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        let d = consumer.recv_timeout(WAIT).unwrap();
        assert_eq!(d.properties().message_id.as_deref(), Some(&*format!("{i}")));
        assert_eq!(d.body().len(), n, "message {i}");
        assert!(
            d.body() == &pattern(n, i as u64 + 1)[..],
            "message {i} differs"
        );
    }
    conn.close().unwrap();
}

#[test]
fn heartbeats_keep_an_idle_connection_alive() {
    let conn = Connection::open_with(test_options().heartbeat(1)).unwrap();
    assert_eq!(conn.heartbeat(), 1);
    let ch = conn.open_channel().unwrap();
    // The broker closes a connection that misses two heartbeats: we must send ours.
    thread::sleep(Duration::from_millis(3500));
    assert!(conn.is_open(), "{:?}", conn.close_reason());
    ch.queue_declare("", &exclusive())
        .expect("the connection is still usable");
    conn.close().unwrap();
}

#[test]
fn silent_broker_is_detected_by_missed_heartbeats() {
    let fwd = Forwarder::start();
    let conn = Connection::open_with(
        fwd.options()
            .recovery(RecoveryOptions::disabled())
            .heartbeat(1),
    )
    .unwrap();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    // Nothing arrives any more, but the socket stays open.
    fwd.pause();
    let t = Instant::now();
    let r = consumer.recv_timeout(Duration::from_secs(10));
    let took = t.elapsed();
    match r {
        Err(e) => assert!(e.is_connection_lost(), "{e:?}"),
        Ok(d) => panic!("unexpected delivery {d:?}"),
    }
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "detected after {took:?}"
    );
    assert!(!conn.is_open());
    assert!(matches!(
        conn.close_reason(),
        Some(Error::ConnectionLost(_))
    ));
}

#[test]
fn rpc_deadline_leaves_the_channel_usable() {
    let fwd = Forwarder::start();
    let conn = Connection::open_with(fwd.options().recovery(RecoveryOptions::disabled())).unwrap();
    let ch = conn.open_channel().unwrap();
    let late = unique("late");
    fwd.pause();
    let t = Instant::now();
    let r = ch
        .with_timeout(Duration::from_millis(300))
        .queue_declare(&late, &exclusive());
    let took = t.elapsed();
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    fwd.resume();
    // The late reply to the first declare must not be taken for the reply to the next.
    let next = unique("next");
    let info = ch.queue_declare(&next, &exclusive()).unwrap();
    assert_eq!(info.name, next);
    assert_eq!(ch.queue_declare(&late, &passive()).unwrap().name, late);
    assert!(ch.is_open() && conn.is_open());
    conn.close().unwrap();
}

#[test]
fn timed_out_consume_leaves_no_consumer_behind() {
    let fwd = Forwarder::start();
    let conn = Connection::open_with(fwd.options().recovery(RecoveryOptions::disabled())).unwrap();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    fwd.pause();
    let r = ch
        .with_timeout(Duration::from_millis(300))
        .basic_consume(&q, &ConsumeOptions::default());
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    fwd.resume();
    let probe = conn.open_channel().unwrap();
    probe.confirm_select().unwrap();
    publish_confirmed(&probe, "", &q, b"for a real consumer");
    // The broker registered the consumer after we gave up on it: lepus must cancel it
    // rather than keep bouncing its deliveries back to the queue.
    assert!(
        wait_until(WAIT, || probe
            .queue_declare(&q, &passive())
            .unwrap()
            .consumer_count
            == 0),
        "the abandoned consumer is still registered"
    );
    let d = get_eventually(&probe, &q, false);
    assert_eq!(d.body(), b"for a real consumer");
    d.ack().unwrap();
    conn.close().unwrap();
}

#[test]
fn concurrent_publishers_on_one_confirm_channel_get_their_own_confirms() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 100;
    const ROOM: u32 = 300;
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = ch
        .queue_declare(
            "",
            &QueueDeclareOptions {
                exclusive: true,
                arguments: args(&[
                    ("x-max-length", FieldValue::I32(ROOM as i32)),
                    ("x-overflow", "reject-publish".into()),
                ]),
                ..Default::default()
            },
        )
        .unwrap()
        .name;
    ch.confirm_select().unwrap();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (ch, q) = (ch.clone(), q.clone());
            thread::spawn(move || {
                let handles: Vec<_> = (0..PER_THREAD)
                    .map(|i| {
                        let id = format!("{t}:{i}");
                        let c = ch
                            .basic_publish_confirmed(
                                "",
                                &q,
                                id.as_bytes(),
                                &BasicProperties::new(),
                                PublishOptions::default(),
                            )
                            .unwrap();
                        (id, c)
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(id, c)| (id, c.wait().unwrap()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let outcomes: Vec<(String, Confirm)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(!ch.wait_for_confirms().unwrap(), "some were nacked");
    let acked: HashSet<String> = outcomes
        .iter()
        .filter(|(_, c)| *c == Confirm::Ack)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(acked.len(), ROOM as usize);
    let mut queued = HashSet::new();
    while let Some(d) = ch.basic_get(&q, true).unwrap() {
        queued.insert(String::from_utf8(d.into_body()).unwrap());
    }
    // Each handle resolved with its own message's outcome.
    assert_eq!(queued, acked);
    conn.close().unwrap();
}

#[test]
fn slow_consumer_holds_deliveries_back_without_losing_any() {
    const N: usize = 5000;
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let pubch = conn.open_channel().unwrap();
    pubch.confirm_select().unwrap();
    for i in 0..N {
        publish(&pubch, "", &q, i.to_string().as_bytes());
    }
    assert!(pubch.wait_for_confirms().unwrap());
    // No prefetch limit and no acks: the broker pushes everything at once, the local
    // queue fills up to its bound, and the I/O thread stops reading.
    let consumer = ch
        .basic_consume(
            &q,
            &ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(wait_until(WAIT, || consumer.queued() >= 1000));
    thread::sleep(Duration::from_millis(200));
    let queued = consumer.queued();
    assert!(queued <= 1024, "the local queue grew to {queued}");
    for i in 0..N {
        let d = consumer
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!(d.body(), i.to_string().as_bytes());
    }
    assert!(matches!(
        consumer.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::Timeout(_)))
    ));
    // Reading resumed: the connection serves RPCs again.
    pubch.queue_declare(&q, &passive()).unwrap();
    conn.close().unwrap();
}

#[test]
fn consumers_on_one_channel_get_only_their_own_deliveries() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let (q1, q2) = (temp_queue(&ch), temp_queue(&ch));
    let c1 = ch.basic_consume(&q1, &ConsumeOptions::default()).unwrap();
    let c2 = ch.basic_consume(&q2, &ConsumeOptions::default()).unwrap();
    assert_ne!(c1.tag(), c2.tag());
    for i in 0..20 {
        publish(&ch, "", if i % 2 == 0 { &q1 } else { &q2 }, &[i]);
    }
    for i in 0..10u8 {
        let d1 = c1.recv_timeout(WAIT).unwrap();
        let d2 = c2.recv_timeout(WAIT).unwrap();
        assert_eq!((d1.body(), d1.routing_key()), (&[2 * i][..], q1.as_str()));
        assert_eq!(
            (d2.body(), d2.routing_key()),
            (&[2 * i + 1][..], q2.as_str())
        );
        d1.ack().unwrap();
        d2.ack().unwrap();
    }
    conn.close().unwrap();
}

#[test]
fn dropping_the_last_handles_closes_channel_and_connection() {
    let observer = connect();
    let name = unique("dropped");
    {
        let conn = connect();
        let ch = conn.open_channel().unwrap();
        ch.queue_declare(&name, &exclusive()).unwrap();
        let consumer = ch
            .basic_consume(
                &name,
                &ConsumeOptions {
                    exclusive: true,
                    ..Default::default()
                },
            )
            .unwrap();
        // Dropping the connection handle alone closes nothing: the channel holds it.
        drop(conn);
        assert!(ch.is_open());
        ch.queue_declare(&name, &passive()).unwrap();
        drop(consumer);
        drop(ch);
    }
    assert!(
        wait_until(WAIT, || !queue_exists(&observer, &name)),
        "the exclusive queue outlived its dropped connection"
    );

    // A dropped channel is closed: its exclusive consumer goes away.
    let q = unique("dropped-ch");
    let clean = Cleanup::new();
    clean.queue(&q);
    let ch = observer.open_channel().unwrap();
    ch.queue_declare(&q, &QueueDeclareOptions::default())
        .unwrap();
    let ex = ConsumeOptions {
        exclusive: true,
        ..Default::default()
    };
    let holder = observer.open_channel().unwrap();
    let c = holder.basic_consume(&q, &ex).unwrap();
    drop(c);
    drop(holder);
    assert!(wait_until(WAIT, || ch
        .queue_declare(&q, &passive())
        .unwrap()
        .consumer_count
        == 0));
    let again = observer.open_channel().unwrap();
    let _c = again
        .basic_consume(&q, &ex)
        .expect("exclusive consume after the drop");
    observer.close().unwrap();
}

#[test]
fn cancelling_or_dropping_a_full_consumer_does_not_wedge_the_connection() {
    const N: usize = 3000;
    let conn = connect();
    let pubch = conn.open_channel().unwrap();
    pubch.confirm_select().unwrap();
    let q = temp_queue(&pubch);
    for i in 0..N {
        publish(&pubch, "", &q, i.to_string().as_bytes());
    }
    assert!(pubch.wait_for_confirms().unwrap());

    // cancel() while the I/O thread waits for room in this consumer's queue.
    let ch = conn.open_channel().unwrap();
    let c = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    assert!(wait_until(WAIT, || c.queued() >= 1024));
    let t = Instant::now();
    c.cancel().expect("cancel of a full consumer");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    c.recv_timeout(WAIT)
        .expect("queued deliveries can still be read after cancel");
    drop(c);
    ch.close().unwrap(); // its unacked deliveries go back

    // drop() while the I/O thread waits for room in this consumer's queue.
    let ch = conn.open_channel().unwrap();
    let c = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    assert!(wait_until(WAIT, || c.queued() >= 1024));
    drop(c);
    pubch
        .with_timeout(Duration::from_secs(3))
        .queue_declare(&q, &passive())
        .expect("the connection still reads after the full consumer was dropped");
    ch.close().unwrap();
    // Nothing was lost: every message is back in the queue.
    assert!(
        wait_until(WAIT, || ready_count(&conn, &q) as usize == N),
        "{} of {N} ready",
        ready_count(&conn, &q)
    );
    conn.close().unwrap();
}

#[test]
fn every_thread_receiving_from_a_consumer_sees_its_channel_closed() {
    let conn = connect();
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let consumer = Arc::new(ch.basic_consume(&q, &ConsumeOptions::default()).unwrap());
    let (tx, rx) = mpsc::channel();
    for _ in 0..3 {
        let (c, tx) = (consumer.clone(), tx.clone());
        thread::spawn(move || {
            let _ = tx.send(c.recv().map(|d| d.delivery_tag()));
        });
    }
    thread::sleep(Duration::from_millis(100));
    ch.basic_ack(9_999, false).unwrap(); // unknown tag: the broker closes the channel
    for _ in 0..3 {
        match rx.recv_timeout(WAIT).expect("every receiver wakes") {
            Err(RecvError::Failed(Error::ServerClosedChannel { code: 406, .. })) => {}
            other => panic!("expected the channel closed with 406, got {other:?}"),
        }
    }
    assert!(matches!(
        consumer.recv_timeout(QUIET),
        Err(RecvError::Failed(Error::ServerClosedChannel {
            code: 406,
            ..
        }))
    ));
    assert!(conn.is_open());
    conn.close().unwrap();
}

#[test]
fn dead_link_with_recovery_on_wakes_calls_in_flight() {
    let fwd = Forwarder::start();
    let conn = Connection::open_with(
        fwd.options()
            .heartbeat(0)
            .operation_timeout(Duration::from_secs(60))
            .recovery(
                RecoveryOptions::new()
                    .backoff(Duration::from_millis(100), Duration::from_millis(200)),
            ),
    )
    .expect("connect through the forwarder");
    // One receiving thread only: with recovery on, the consumer outlives the link and a
    // single "lost" notice goes through its queue, which wakes one receiver of several.
    let (rx, names) = block_calls_with(&conn, &fwd, false);
    fwd.kill();
    let killed = Instant::now();
    // Calls in flight fail with a connection-lost error, although a recovery follows.
    for (what, r, at) in collect(&rx, &names, Duration::from_secs(3)) {
        match r {
            Err(e) => assert!(e.is_connection_lost(), "{what}: {e:?}"),
            Ok(v) => panic!("{what} succeeded on a dead link: {v}"),
        }
        assert!(
            at - killed < Duration::from_secs(2),
            "{what} took {:?}",
            at - killed
        );
    }
    assert!(wait_until(Duration::from_secs(2), || !conn.is_open()));
    // The forwarder is gone, so recovery keeps failing; close() ends it promptly.
    thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let r = conn.close();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "close took {:?}",
        t.elapsed()
    );
    assert!(r.is_ok(), "{r:?}");
    assert!(matches!(conn.close_reason(), Some(Error::ConnectionClosed)));
}
