//! Connections against the real broker: URI and options, authentication, vhosts, a refused port, heartbeats, and what dropping the last handles closes.

mod support;

use std::collections::HashSet;
use std::thread;
use std::time::{Duration, Instant};

use lepus::{
    AuthMechanism, Channel, Connection, ConnectionOptions, ConsumeOptions, Error, FieldValue,
    HandshakeStage, QueueDeclareOptions, reply_code,
};
use support::fixtures::*;
use support::{
    Cleanup, broker_addr, connect, free_port, pattern, publish_confirmed, rabbitmqctl,
    rabbitmqctl_or_skip, test_options, unique, wait_until,
};

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
    let d = consumer
        .recv_timeout(WAIT)
        .unwrap()
        .expect("a delivery in time");
    assert_eq!(d.body(), &body[..]);
    d.ack().unwrap();

    // The broker sees the connection name.
    if rabbitmqctl_or_skip("the connection name check of connection_by_uri_...") {
        let listing = rabbitmqctl(&["list_connections", "client_properties"]);
        assert!(
            listing.contains(&name),
            "connection name {name} not in:\n{listing}"
        );
    }

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
    if rabbitmqctl_or_skip("the client properties check of connection_by_options_...") {
        let listing = rabbitmqctl(&["list_connections", "client_properties"]);
        assert!(listing.contains(&name), "{name} not in:\n{listing}");
        assert!(listing.contains(&prop), "{prop} not in:\n{listing}");
    }
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
