//! Stream queues against the real broker: typed offset specifications, each delivery's
//! offset, and a stream consumer that recovery resumes after the last offset it received.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use lepus::{
    Channel, Connection, ConsumeOptions, Consumer, RecoveryOptions, StreamArgs, StreamOffset,
};
use support::fixtures::*;
use support::{Cleanup, ClientOptions, connect, start_proxy, unique};

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
    let q = stream_with(&clean, &conn, 99);
    // Written after the first 99 were confirmed: a chunk of its own, the last one.
    let pch = conn.open_channel().unwrap();
    publish_ids(&pch, &q, 99..100);
    pch.close().unwrap();

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
    assert_eq!(
        next(&last),
        (99, 99),
        "the last chunk holds only the last message"
    );

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

/// A worker pool on a stream consumer across a reset link: the deliveries of the lost
/// link still queued locally are handled (the recovered consumer resumes after them,
/// so the broker does not send them again): every offset is handled exactly once.
#[test]
fn a_worker_pool_on_a_stream_handles_every_offset_exactly_once_across_a_reset() {
    use lepus::{Outcome, WorkerOptions, WorkerPool};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
    const N: u32 = 4_000;
    let clean = Cleanup::new();
    let direct = connect();
    let q = stream_with(&clean, &direct, N);
    let proxy = start_proxy();
    let conn = Connection::open_with(proxy.options().recovery(
        RecoveryOptions::new().backoff(Duration::from_millis(50), Duration::from_secs(1)),
    ))
    .unwrap();
    let (_ch, c) = consume(&conn, &q, StreamOffset::First);
    let handled: Arc<Vec<AtomicU32>> = Arc::new((0..N).map(|_| AtomicU32::new(0)).collect());
    let (total, hold) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(true)),
    );
    let (h, t, g) = (handled.clone(), total.clone(), hold.clone());
    let pool = WorkerPool::start(c, &WorkerOptions::new(4), move |d| {
        let id = id_of(d.body());
        assert_eq!(d.stream_offset(), Some(u64::from(id)), "offset = id");
        h[id as usize].fetch_add(1, Ordering::SeqCst);
        // Past half-way the handlers wait for the reset: it comes with deliveries in
        // handlers and in the local queue.
        if t.fetch_add(1, Ordering::SeqCst) >= N as usize / 2 {
            let until = Instant::now() + WAIT;
            while g.load(Ordering::SeqCst) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Outcome::Ack
    })
    .unwrap();
    assert!(support::wait_until(Duration::from_secs(20), || {
        total.load(Ordering::SeqCst) > N as usize / 2 && pool.consumer().queued() > 0
    }));
    assert_eq!(proxy.reset(), 1, "one link to reset");
    hold.store(false, Ordering::SeqCst);
    assert!(
        support::wait_until(Duration::from_secs(30), || handled
            .iter()
            .all(|c| c.load(Ordering::SeqCst) > 0)),
        "stuck: {:?}",
        pool.stats()
    );
    // Anything more would be a repeat.
    std::thread::sleep(QUIET);
    let stats = pool.shutdown(Duration::from_secs(5));
    let twice = handled
        .iter()
        .filter(|c| c.load(Ordering::SeqCst) > 1)
        .count();
    eprintln!("stream pool across RST: {stats:?}, {twice} handled twice");
    assert_eq!(proxy.connections(), 2, "exactly one reconnect");
    assert_eq!(stats.stale, 0, "nothing skipped on a stream: {stats:?}");
    assert_eq!(
        stats.settle_failed, 0,
        "a lost stream ack is harmless: {stats:?}"
    );
    assert_eq!(twice, 0, "exactly once");
    conn.close().unwrap();
    direct.close().unwrap();
}
