//! Publishing against the real broker: every property round trip, transactions, mandatory returns, many publisher threads, large bodies and frame boundaries.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, Connection, ConsumeOptions, FieldTable, FieldValue, PublishOptions, reply_code,
};
use support::fixtures::*;
use support::{connect, pattern, publish_confirmed, test_options, unique};

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
            .basic_publish_confirmed("", &q, body, &props, &PublishOptions::default())
            .unwrap();
        c.wait().unwrap();
    }

    let d = ch.basic_get(&q, false).unwrap().expect("a message");
    assert_eq!(d.body(), b"via get");
    assert_eq!(d.properties(), &props);
    assert_eq!((d.exchange(), d.routing_key()), ("", q.as_str()));
    assert!(!d.redelivered());
    assert_eq!(d.message_count(), Some(1));
    d.ack().unwrap();

    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let d = consumer
        .recv_timeout(WAIT)
        .unwrap()
        .expect("a delivery in time");
    assert_eq!(d.body(), b"via consume");
    assert_eq!(d.properties(), &props);
    assert_eq!(d.message_count(), None);
    assert_eq!(d.channel_id(), ch.id());
    d.ack().unwrap();

    // An empty property set stays empty.
    publish(&ch, "", &q, b"");
    let d = consumer
        .recv_timeout(WAIT)
        .unwrap()
        .expect("a delivery in time");
    assert_eq!(d.properties(), &BasicProperties::new());
    assert!(d.body().is_empty());
    d.ack().unwrap();
    conn.close().unwrap();
}

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
        &PublishOptions::default(),
    )
    .unwrap();
    ch.basic_publish(
        "amq.direct",
        &key,
        b"come back",
        &props,
        &PublishOptions { mandatory: true },
    )
    .unwrap();
    // The return precedes the confirm.
    ch.wait_for_confirms().unwrap();
    let r = ch
        .recv_return(WAIT)
        .expect("the channel lives")
        .expect("a basic.return");
    assert_eq!(r.reply_code, reply_code::NO_ROUTE);
    assert_eq!(r.reply_text, "NO_ROUTE");
    assert_eq!(r.exchange, "amq.direct");
    assert_eq!(r.routing_key, key);
    assert_eq!(r.body, b"come back");
    assert_eq!(r.properties.as_ref().ok(), Some(&props));
    assert!(ch.try_recv_return().unwrap().is_none());
    assert!(ch.recv_return(QUIET).unwrap().is_none());

    // A routable mandatory publish is not returned.
    let q = temp_queue(&ch);
    ch.basic_publish(
        "",
        &q,
        b"routed",
        &props,
        &PublishOptions { mandatory: true },
    )
    .unwrap();
    ch.wait_for_confirms().unwrap();
    assert!(ch.try_recv_return().unwrap().is_none());
    assert_eq!(ch.basic_get(&q, true).unwrap().unwrap().body(), b"routed");
    conn.close().unwrap();
}

/// This thread's id in `/proc/self/task`.
#[cfg(target_os = "linux")]
fn thread_id() -> String {
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    link.file_name().unwrap().to_string_lossy().into_owned()
}

/// How many times thread `tid` of this process gave up the CPU of its own accord.
#[cfg(target_os = "linux")]
fn voluntary_switches(tid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .expect("voluntary_ctxt_switches")
        .trim()
        .parse()
        .unwrap()
}

/// The broker closes `ch`: a passive declare of a queue that does not exist (404).
fn broker_closes(ch: &lepus::Channel) {
    let err = ch
        .queue_declare(&unique("no-such-queue"), &passive())
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(reply_code::NOT_FOUND), "{err:?}");
}

/// A thread waiting for returns sleeps (no polling), and hears at once when its channel
/// ends, not at its deadline: with the channel's error. Returns queued before the end are
/// still handed out after it, then the error. The same when the connection is closed
/// under a waiting thread.
#[test]
fn a_thread_waiting_for_returns_wakes_when_its_channel_or_connection_ends() {
    const LONG: Duration = Duration::from_secs(120);
    let conn = connect();

    // A waiter with nothing queued, then the broker closes the channel.
    let ch = conn.open_channel().unwrap();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let waiter = {
        let ch = ch.clone();
        thread::spawn(move || {
            #[cfg(target_os = "linux")]
            tid_tx.send(thread_id()).unwrap();
            #[cfg(not(target_os = "linux"))]
            tid_tx.send(String::new()).unwrap();
            let t0 = Instant::now();
            (ch.recv_return(LONG), t0.elapsed())
        })
    };
    let _tid = tid_rx.recv().unwrap();
    thread::sleep(QUIET); // the waiter waits by now
    // It sleeps: a wait that polled every few milliseconds would wake tens of times in a
    // second (the previous `recv_return` woke every 20 ms to look at the channel).
    #[cfg(target_os = "linux")]
    {
        let before = voluntary_switches(&_tid);
        thread::sleep(Duration::from_secs(1));
        let woke = voluntary_switches(&_tid) - before;
        assert!(
            woke <= 5,
            "the waiting thread woke {woke} times in a second"
        );
    }
    broker_closes(&ch);
    let (r, waited) = waiter.join().unwrap();
    let err = r.expect_err("the channel ended");
    assert_eq!(err.reply_code(), Some(reply_code::NOT_FOUND), "{err:?}");
    assert!(
        waited < LONG / 4,
        "woken by the end, not the deadline: {waited:?}"
    );

    // A return queued, then the end: the return first, then the channel's error.
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let mandatory = PublishOptions { mandatory: true };
    ch.basic_publish(
        "amq.direct",
        &unique("nowhere"),
        b"back",
        &BasicProperties::new(),
        &mandatory,
    )
    .unwrap();
    ch.wait_for_confirms().unwrap(); // the return precedes the confirm
    broker_closes(&ch);
    let r = ch.recv_return(LONG).expect("queued before the end");
    assert_eq!(r.expect("the return").body, b"back");
    let t0 = Instant::now();
    let err = ch.recv_return(LONG).expect_err("then the end");
    assert_eq!(err.reply_code(), Some(reply_code::NOT_FOUND), "{err:?}");
    assert!(t0.elapsed() < LONG / 4);

    // The connection closed by the application under a waiting thread.
    let ch = conn.open_channel().unwrap();
    let waiter = {
        let ch = ch.clone();
        thread::spawn(move || {
            let t0 = Instant::now();
            (ch.recv_return(LONG), t0.elapsed())
        })
    };
    thread::sleep(QUIET);
    conn.close().unwrap();
    let (r, waited) = waiter.join().unwrap();
    assert!(
        matches!(r, Err(lepus::Error::ConnectionClosed)),
        "the connection was closed: {r:?}"
    );
    assert!(
        waited < LONG / 4,
        "woken by the close, not the deadline: {waited:?}"
    );
}

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
                    Ok(Some(d)) => d,
                    Ok(None) => continue,
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
                Ok(None) => Ok(mine),
                Ok(Some(d)) => Err(format!(
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
                        &PublishOptions::default(),
                    )?;
                }
                if confirm {
                    ch.wait_for_confirms()?;
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
            &PublishOptions::default(),
        )
        .unwrap();
    c.wait().unwrap();
    // A small message right after it, on the same channel, is not mixed into it.
    publish(&ch, "", &q, b"small");

    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let d = consumer
        .recv_timeout(Duration::from_secs(20))
        .expect("the consumer lives")
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
            &PublishOptions::default(),
        )
        .unwrap();
    }
    ch.wait_for_confirms().unwrap();
    let consumer = no_ack_consumer(&ch, &q);
    for (i, &n) in sizes.iter().enumerate() {
        let d = consumer
            .recv_timeout(WAIT)
            .unwrap()
            .expect("a delivery in time");
        assert_eq!(d.properties().message_id.as_deref(), Some(&*format!("{i}")));
        assert_eq!(d.body().len(), n, "message {i}");
        assert!(
            d.body() == &pattern(n, i as u64 + 1)[..],
            "message {i} differs"
        );
    }
    conn.close().unwrap();
}

/// Body of message `i` of publisher `t`: its ids, then a pattern; every 5th is larger
/// than a socket's send buffer can grow (4 MiB here), so that a direct write of it is
/// cut and the rest carried while the other publishers go on.
fn mixed_body(t: usize, i: usize) -> Vec<u8> {
    let len = if i % 5 == 4 {
        5 * 1024 * 1024 + i
    } else {
        40 + i
    };
    let mut b = format!("{t}:{i}:").into_bytes();
    b.extend_from_slice(&pattern(len, (t * 1000 + i) as u64 + 1));
    b
}

#[test]
fn callers_writing_the_socket_keep_frames_whole_and_in_order_beside_large_bodies() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 40;
    let conn = Connection::open_with(test_options()).unwrap();
    let setup = conn.open_channel().unwrap();
    let q = temp_queue(&setup);
    // One queue, one consumer: each publisher's messages arrive in the order sent.
    let consumer = no_ack_consumer(&setup, &q);
    let publishers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (conn, q) = (conn.clone(), q.clone());
            thread::spawn(move || -> lepus::Result<()> {
                let ch = conn.open_channel()?;
                if t % 2 == 0 {
                    ch.confirm_select()?;
                }
                for i in 0..PER_THREAD {
                    ch.basic_publish(
                        "",
                        &q,
                        &mixed_body(t, i),
                        &BasicProperties::new(),
                        &PublishOptions::default(),
                    )?;
                    // A confirm per message now and then: the I/O thread rests between.
                    if t % 2 == 0 && i % 3 == 0 {
                        ch.wait_for_confirms()?;
                    }
                }
                if t % 2 == 0 {
                    ch.wait_for_confirms()?;
                }
                Ok(())
            })
        })
        .collect();
    let mut next = [0usize; THREADS];
    for _ in 0..THREADS * PER_THREAD {
        let d = consumer
            .recv_timeout(Duration::from_secs(30))
            .expect("the consumer lives")
            .unwrap_or_else(|| panic!("a message is missing; next expected {next:?}"));
        let body = d.body();
        let mut ids = body.splitn(3, |b| *b == b':').map(|s| {
            std::str::from_utf8(s)
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
        });
        let t = ids.next().flatten().expect("publisher id");
        let i = ids.next().flatten().expect("message id");
        assert_eq!(i, next[t], "publisher {t}'s messages out of order");
        assert!(body == &mixed_body(t, i)[..], "message {t}:{i} differs");
        next[t] += 1;
    }
    for p in publishers {
        p.join().expect("publisher panicked").expect("publisher");
    }
    assert!(
        consumer.recv_timeout(QUIET).unwrap().is_none(),
        "an extra message"
    );
    assert!(conn.is_open());
    conn.close().unwrap();
}

#[test]
fn a_lone_confirming_publisher_writes_the_socket_itself_unless_told_not_to() {
    for on in [true, false] {
        let conn = Connection::open_with(test_options().caller_writes(on)).unwrap();
        let ch = conn.open_channel().unwrap();
        ch.confirm_select().unwrap();
        let q = temp_queue(&ch);
        for i in 0..100u32 {
            publish_confirmed(&ch, "", &q, &i.to_be_bytes());
        }
        let writes = conn.stats().caller_writes;
        if on {
            // Between two confirms the I/O thread rests, so most of these are direct.
            assert!(writes > 0, "no publish was written by its caller");
        } else {
            assert_eq!(writes, 0, "caller_writes(false) still wrote {writes}");
        }
        // And each arrived, in order.
        let c = no_ack_consumer(&ch, &q);
        for i in 0..100u32 {
            assert_eq!(recv_body(&c), i.to_be_bytes(), "caller_writes({on})");
        }
        conn.close().unwrap();
    }
}
