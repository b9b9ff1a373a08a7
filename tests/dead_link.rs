//! Dead links and close(): every blocked call wakes with the right error, promptly, whether the link dies, the broker goes silent, or the application closes.

mod support;

use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, Connection, ConsumeOptions, Error, PublishOptions, RecoveryOptions, RecvError,
};
use lepus_testkit::Proxy;
use support::fixtures::*;
use support::{ClientOptions, connect, start_proxy, wait_until};

/// Cut every link through the proxy (FIN both ways) and refuse new ones, as if the
/// broker's host went away.
fn kill(fwd: &Proxy) {
    fwd.refuse(true);
    fwd.close();
}

/// What a blocked call returned, and when.
type Outcome = (&'static str, Result<String, Error>, Instant);

/// Start a consumer recv(), an RPC, wait_for_confirms and a confirmation wait, all blocked
/// (the proxy holds traffic back). Returns the receiver of their outcomes.
fn block_calls(conn: &Connection, fwd: &Proxy) -> (mpsc::Receiver<Outcome>, Vec<&'static str>) {
    block_calls_with(conn, fwd, true)
}

/// [`block_calls`], optionally with a second thread receiving from the same consumer.
fn block_calls_with(
    conn: &Connection,
    fwd: &Proxy,
    two_receivers: bool,
) -> (mpsc::Receiver<Outcome>, Vec<&'static str>) {
    let ch = conn.open_channel().unwrap();
    let q = temp_queue(&ch);
    let consumer = Arc::new(ch.basic_consume(&q, &ConsumeOptions::default()).unwrap());
    let confirm_ch = conn.open_channel().unwrap();
    confirm_ch.confirm_select().unwrap();
    let rpc_ch = conn.open_channel().unwrap();

    fwd.partition();
    let confirmation = confirm_ch
        .basic_publish_confirmed(
            "",
            &q,
            b"held",
            &BasicProperties::new(),
            &PublishOptions::default(),
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
        Box::new(move || cc.wait_for_confirms().map(|()| "all acked".to_string())),
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
    let fwd = start_proxy();
    let conn = Connection::open_with(
        fwd.options()
            .recovery(RecoveryOptions::disabled())
            .heartbeat(0)
            .operation_timeout(Duration::from_secs(60)),
    )
    .expect("connect through the proxy");
    let spare = conn.open_channel().unwrap();
    let (rx, names) = block_calls(&conn, &fwd);
    assert!(conn.is_open());

    kill(&fwd);
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
                &PublishOptions::default()
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
    let fwd = start_proxy();
    let close_timeout = Duration::from_millis(800);
    let conn = Connection::open_with(
        fwd.options()
            .recovery(RecoveryOptions::disabled())
            .heartbeat(0)
            .operation_timeout(Duration::from_secs(60))
            .close_timeout(close_timeout),
    )
    .expect("connect through the proxy");
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
    fwd.heal();
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
            &PublishOptions::default()
        ),
        Err(Error::ConnectionClosed)
    ));
}

#[test]
fn silent_broker_is_detected_by_missed_heartbeats() {
    let fwd = start_proxy();
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
    fwd.partition();
    let t = Instant::now();
    let r = consumer.recv_timeout(Duration::from_secs(10));
    let took = t.elapsed();
    match r {
        Err(e) => assert!(e.is_connection_lost(), "{e:?}"),
        Ok(d) => panic!("expected a lost link, got {d:?}"),
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
fn dead_link_with_recovery_on_wakes_calls_in_flight() {
    let fwd = start_proxy();
    let conn = Connection::open_with(
        fwd.options()
            .heartbeat(0)
            .operation_timeout(Duration::from_secs(60))
            .recovery(
                RecoveryOptions::new()
                    .backoff(Duration::from_millis(100), Duration::from_millis(200)),
            ),
    )
    .expect("connect through the proxy");
    // One receiving thread only: with recovery on, the consumer outlives the link and a
    // single "lost" notice goes through its queue, which wakes one receiver of several.
    let (rx, names) = block_calls_with(&conn, &fwd, false);
    kill(&fwd);
    let killed = Instant::now();
    // Waiters on confirmations keep waiting: the recovery republishes their messages and
    // they get the new copies' outcomes (or an error when it gives up or is closed).
    let (confirm_waiters, prompt): (Vec<&str>, Vec<&str>) = names
        .iter()
        .partition(|n| matches!(**n, "wait_for_confirms" | "confirmation"));
    assert_eq!(confirm_waiters.len(), 2, "{names:?}");
    // Other calls in flight fail with a connection-lost error, although a recovery follows.
    for (what, r, at) in collect(&rx, &prompt, Duration::from_secs(3)) {
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
    // The proxy refuses connections, so recovery keeps failing; close() ends it promptly.
    thread::sleep(Duration::from_millis(300));
    if let Ok((what, r, _)) = rx.try_recv() {
        panic!("{what} returned while recovery was still trying: {r:?}");
    }
    let t = Instant::now();
    let r = conn.close();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "close took {:?}",
        t.elapsed()
    );
    assert!(r.is_ok(), "{r:?}");
    assert!(matches!(conn.close_reason(), Some(Error::ConnectionClosed)));
    for (what, r, at) in collect(&rx, &confirm_waiters, Duration::from_secs(3)) {
        assert!(matches!(r, Err(Error::ConnectionClosed)), "{what}: {r:?}");
        assert!(at - t < Duration::from_secs(2), "{what} took {:?}", at - t);
    }
}

/// The broker sends a frame and closes TCP right after it (heartbeats off, recovery off:
/// only the end of the stream can tell): the client sees the loss at once, whether the
/// close comes in the frame's own read or after the client has read the frame and gone
/// back to waiting. (A reactor that stopped reading after a short read, to save the read
/// that says `WouldBlock`, would have to keep this: benches/results/threads-900.md.)
#[test]
fn a_close_right_after_data_is_seen_at_once() {
    use lepus_testkit::frames::heartbeat_frame;
    use lepus_testkit::{FakeBroker, Tune};
    for pause_ms in [0u64, 50] {
        let broker = FakeBroker::start(move |p| {
            p.handshake(Tune::default());
            p.send(&heartbeat_frame());
            thread::sleep(Duration::from_millis(pause_ms));
            p.send(&heartbeat_frame());
        });
        let conn = Connection::open_with(broker.options().recovery(RecoveryOptions::disabled()))
            .expect("connect to the fake broker");
        broker.finish();
        let t0 = Instant::now();
        assert!(
            wait_until(Duration::from_secs(3), || !conn.is_open()),
            "pause {pause_ms} ms: the connection still looks open {:?} after the broker closed TCP",
            t0.elapsed()
        );
        assert!(
            matches!(conn.close_reason(), Some(Error::ConnectionLost(_))),
            "pause {pause_ms} ms: {:?}",
            conn.close_reason()
        );
    }
}

/// A caller's direct write that the socket could not take whole starts the write-stall
/// clock when the I/O thread first sees the rest, not at the I/O thread's last idle turn
/// (up to a second earlier): a short, legitimate pause of the broker's reading is not a
/// dead link.
#[test]
fn a_callers_unfinished_write_is_not_taken_for_an_old_stall() {
    let fwd = Arc::new(start_proxy());
    let conn = Connection::open_with(
        fwd.options()
            .write_stall_timeout(Duration::from_millis(300))
            .recovery(RecoveryOptions::disabled()),
    )
    .unwrap();
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = temp_queue(&ch);
    // The I/O thread idles: its loop turns about once a second.
    thread::sleep(Duration::from_millis(1500));
    fwd.hold(lepus_testkit::Direction::ToServer);
    let release = {
        let fwd = fwd.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            fwd.release(lepus_testkit::Direction::ToServer);
        })
    };
    // More than the socket takes at once: the rest is carried for the I/O thread.
    let body = vec![7u8; 16 * 1024 * 1024];
    let c = ch
        .basic_publish_confirmed(
            "",
            &q,
            &body,
            &BasicProperties::new(),
            &PublishOptions::default(),
        )
        .unwrap();
    release.join().unwrap();
    c.wait().expect("confirmed, the link alive");
    assert!(conn.is_open(), "closed: {:?}", conn.close_reason());
    conn.close().unwrap();
}
