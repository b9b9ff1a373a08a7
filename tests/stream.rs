//! Stream queues against the real broker: typed offset specifications, each delivery's
//! offset, and a stream consumer that recovery resumes after the last offset it received.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use lepus::{
    BasicProperties, Channel, Connection, ConsumeOptions, Consumer, PublishOptions,
    RecoveryOptions, StreamArgs, StreamOffset,
};
use support::fixtures::*;
use support::{Cleanup, ClientOptions, connect, start_proxy, unique};

fn publish_ids(ch: &Channel, queue: &str, range: std::ops::Range<u32>) {
    ch.confirm_select().unwrap();
    for id in range {
        ch.basic_publish(
            "",
            queue,
            &id.to_be_bytes(),
            &BasicProperties::new(),
            &PublishOptions::default(),
        )
        .unwrap();
    }
    ch.wait_for_confirms().expect("every publish confirmed");
}

fn id_of(body: &[u8]) -> u32 {
    u32::from_be_bytes(body.try_into().expect("a 4-byte id"))
}

/// A fresh stream holding ids `0..n` (offsets `0..n`).
fn stream_with(clean: &Cleanup, conn: &Connection, n: u32) -> String {
    let q = clean.queue(&unique("stream"));
    let ch = conn.open_channel().unwrap();
    ch.stream_declare(&q, &StreamArgs::new().max_length_bytes(50_000_000))
        .unwrap();
    publish_ids(&ch, &q, 0..n);
    ch.close().unwrap();
    q
}

/// The (offset, id) of the next delivery, acked.
fn next(c: &Consumer) -> (u64, u32) {
    let d = c.recv_timeout(WAIT).unwrap().expect("a delivery");
    d.ack().unwrap();
    (d.stream_offset().expect("a stream offset"), id_of(d.body()))
}

fn consume(conn: &Connection, q: &str, from: StreamOffset) -> (Channel, Consumer) {
    let ch = conn.open_channel().unwrap();
    ch.basic_qos(100, false).unwrap();
    let c = ch
        .stream_consume(q, from, &ConsumeOptions::default())
        .unwrap();
    (ch, c)
}

#[test]
fn offset_specifications_start_where_they_say() {
    let clean = Cleanup::new();
    let conn = connect();
    let q = stream_with(&clean, &conn, 100);

    let (_a, first) = consume(&conn, &q, StreamOffset::First);
    assert_eq!(next(&first), (0, 0));
    assert_eq!(next(&first), (1, 1));

    let (_b, at) = consume(&conn, &q, StreamOffset::Offset(42));
    assert_eq!(next(&at), (42, 42));

    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let (_c, since) = consume(&conn, &q, StreamOffset::Timestamp(hour_ago));
    assert_eq!(next(&since), (0, 0));

    let (_d, interval) = consume(&conn, &q, StreamOffset::interval("1h").unwrap());
    assert_eq!(next(&interval), (0, 0));

    let (_e, last) = consume(&conn, &q, StreamOffset::Last);
    let (offset, _) = next(&last);
    assert!(offset <= 99, "last chunk: {offset}");

    let (_f, new_only) = consume(&conn, &q, StreamOffset::Next);
    assert!(
        new_only.recv_timeout(QUIET).unwrap().is_none(),
        "nothing new yet"
    );
    let ch = conn.open_channel().unwrap();
    publish_ids(&ch, &q, 100..101);
    assert_eq!(next(&new_only), (100, 100));
    conn.close().unwrap();
}

#[test]
fn stream_consume_refuses_what_the_broker_would() {
    let clean = Cleanup::new();
    let conn = connect();
    let q = stream_with(&clean, &conn, 1);
    let ch = conn.open_channel().unwrap();
    let no_qos = ch.stream_consume(&q, StreamOffset::First, &ConsumeOptions::default());
    assert!(
        matches!(no_qos, Err(lepus::Error::InvalidArgument(_))),
        "{no_qos:?}"
    );
    ch.basic_qos(10, false).unwrap();
    let no_ack = ConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    assert!(matches!(
        ch.stream_consume(&q, StreamOffset::First, &no_ack),
        Err(lepus::Error::InvalidArgument(_))
    ));
    assert!(ch.is_open(), "refused before asking the broker");
    conn.close().unwrap();
}

#[test]
fn recovery_resumes_a_stream_consumer_after_its_last_offset() {
    const N: u32 = 10_000;
    let clean = Cleanup::new();
    let direct = connect();
    let q = stream_with(&clean, &direct, N);
    let proxy = start_proxy();
    let conn = Connection::open_with(proxy.options().recovery(
        RecoveryOptions::new().backoff(Duration::from_millis(50), Duration::from_secs(1)),
    ))
    .unwrap();
    let (_ch, c) = consume(&conn, &q, StreamOffset::First);
    let mut seen: HashMap<u32, u32> = HashMap::new();
    let (mut lost_errors, mut reset_at) = (0, None);
    let start = Instant::now();
    while seen.len() < N as usize {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "stuck at {} of {N}",
            seen.len()
        );
        let d = match c.recv_timeout(Duration::from_millis(500)) {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) if e.is_connection_lost() => {
                lost_errors += 1;
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let id = id_of(d.body());
        assert_eq!(d.stream_offset(), Some(u64::from(id)), "offset = id");
        *seen.entry(id).or_default() += 1;
        // The ack of a delivery of the lost link fails: on a stream it is credit only.
        let _ = d.ack();
        if reset_at.is_none() && seen.len() == N as usize / 2 {
            assert_eq!(proxy.reset(), 1, "one link to reset");
            reset_at = Some(seen.len());
        }
    }
    // Anything more would be a redelivery.
    let mut late = 0;
    while let Ok(Some(d)) = c.recv_timeout(QUIET) {
        *seen.entry(id_of(d.body())).or_default() += 1;
        late += 1;
    }
    let redelivered: u32 = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "stream across RST: {N} offsets, reset after {:?}, {redelivered} redelivered \
         ({late} after the last new one), {lost_errors} lost-link notices",
        reset_at
    );
    assert_eq!(proxy.connections(), 2, "exactly one reconnect");
    assert_eq!(lost_errors, 1);
    assert_eq!(redelivered, 0, "resumed after the last offset received");
    conn.close().unwrap();
    direct.close().unwrap();
}
