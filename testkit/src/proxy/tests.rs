//! The proxy's own tests, against an upstream on loopback (no broker needed).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::{Direction, Proxy};
use crate::timing::wait_until;

const WAIT: Duration = Duration::from_secs(5);

/// An upstream that hands every accepted socket to the test.
fn upstream() -> (SocketAddr, mpsc::Receiver<TcpStream>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            if tx.send(s).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// An upstream that echoes every byte back.
fn echo() -> SocketAddr {
    let (addr, rx) = upstream();
    thread::spawn(move || {
        for mut s in rx {
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn client(p: &Proxy) -> TcpStream {
    let s = TcpStream::connect(p.addr()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Write `data` from another thread and read as much back.
fn round_trip(s: &TcpStream, data: &[u8]) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let out = data.to_vec();
    let t = thread::spawn(move || w.write_all(&out).unwrap());
    let mut back = vec![0u8; data.len()];
    (&*s).read_exact(&mut back).unwrap();
    t.join().unwrap();
    back
}

#[test]
fn forwards_bytes_both_ways_and_counts_connections() {
    let p = Proxy::start(echo()).unwrap();
    let s = client(&p);
    let data = pattern(300_000);
    assert_eq!(round_trip(&s, &data), data);
    assert_eq!(p.connections(), 1);
    assert_eq!(p.active(), 1);
    assert_eq!(p.accept_times().len(), 1);
}

#[test]
fn slicing_delivers_every_byte_in_order() {
    let p = Proxy::start(echo()).unwrap();
    p.set_slicing(Some((7, Duration::ZERO)));
    let s = client(&p);
    let data = pattern(20_000);
    assert_eq!(round_trip(&s, &data), data);
}

#[test]
fn reset_sends_rst_to_both_sides() {
    let (addr, accepted) = upstream();
    let p = Proxy::start(addr).unwrap();
    let mut c = client(&p);
    let mut server = accepted.recv_timeout(WAIT).unwrap();
    server.set_read_timeout(Some(WAIT)).unwrap();
    // The upstream accepts a moment before the proxy lists the link.
    assert!(wait_until(WAIT, || p.active() == 1));
    assert_eq!(p.reset(), 1);
    let mut buf = [0u8; 16];
    for (side, s) in [("client", &mut c), ("server", &mut server)] {
        let e = s.read(&mut buf).expect_err(side);
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{side}: {e}");
    }
    assert_eq!(p.active(), 0);
}

#[test]
fn close_sends_fin_to_both_sides() {
    let (addr, accepted) = upstream();
    let p = Proxy::start(addr).unwrap();
    let mut c = client(&p);
    let mut server = accepted.recv_timeout(WAIT).unwrap();
    server.set_read_timeout(Some(WAIT)).unwrap();
    assert!(wait_until(WAIT, || p.active() == 1));
    assert_eq!(p.close(), 1);
    let mut buf = [0u8; 16];
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    assert_eq!(server.read(&mut buf).unwrap(), 0);
}

#[test]
fn partition_holds_bytes_until_healed() {
    let p = Proxy::start(echo()).unwrap();
    let mut s = client(&p);
    assert_eq!(round_trip(&s, b"before"), b"before");
    p.partition();
    assert!(p.is_partitioned());
    s.write_all(b"held").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4];
    let e = s.read(&mut buf).expect_err("nothing passes a partition");
    assert!(matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut
    ));
    p.heal();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"held");
}

#[test]
fn hold_stops_one_direction_only() {
    let (addr, accepted) = upstream();
    let p = Proxy::start(addr).unwrap();
    let mut c = client(&p);
    let mut server = accepted.recv_timeout(WAIT).unwrap();
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    p.hold(Direction::ToServer);
    c.write_all(b"up").unwrap();
    server.write_all(b"down").unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"down");
    assert!(server.read(&mut buf[..2]).is_err(), "held upstream");
    p.release(Direction::ToServer);
    server.set_read_timeout(Some(WAIT)).unwrap();
    server.read_exact(&mut buf[..2]).unwrap();
    assert_eq!(&buf[..2], b"up");
}

#[test]
fn a_fault_on_one_link_leaves_the_others() {
    let p = Proxy::start(echo()).unwrap();
    let clients = [client(&p), client(&p)];
    assert!(wait_until(WAIT, || p.links().len() == 2));
    let links = p.links();
    assert_eq!((links[0].id(), links[1].id()), (0, 1));
    // Which client is link 0 depends on accept order: the survivor is found by a
    // round trip.
    links[0].reset();
    assert!(!links[0].is_open());
    assert!(links[1].is_open());
    let mut ok = 0;
    for mut s in &clients {
        if s.write_all(b"ping").is_ok() {
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).is_ok() && &buf == b"ping" {
                ok += 1;
            }
        }
    }
    assert_eq!(ok, 1, "exactly one client still echoes");
    assert_eq!(p.active(), 1);
}

#[test]
fn latency_delays_each_direction() {
    let p = Proxy::start(echo()).unwrap();
    let s = client(&p);
    assert_eq!(round_trip(&s, b"warm"), b"warm");
    p.set_latency(Duration::from_millis(100), Duration::ZERO);
    let start = Instant::now();
    assert_eq!(round_trip(&s, b"slow"), b"slow");
    let rtt = start.elapsed();
    assert!(rtt >= Duration::from_millis(200), "round trip {rtt:?}");
    p.pass_through();
    let start = Instant::now();
    round_trip(&s, b"fast");
    assert!(start.elapsed() < Duration::from_millis(150));
}

#[test]
fn bandwidth_limits_throughput() {
    let p = Proxy::start(echo()).unwrap();
    p.set_bandwidth(Some(100_000));
    let s = client(&p);
    let start = Instant::now();
    let data = pattern(20_000);
    assert_eq!(round_trip(&s, &data), data);
    // 20 KB at 100 KB/s is 0.2 s each way, in a pipeline: at least 0.2 s.
    assert!(
        start.elapsed() >= Duration::from_millis(180),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn refused_connections_are_reset_and_counted() {
    let p = Proxy::start(echo()).unwrap();
    p.refuse(true);
    let mut s = client(&p);
    let mut buf = [0u8; 1];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
        Ok(n) => panic!("read {n} bytes from a refused connection"),
    }
    assert!(wait_until(WAIT, || p.refused() == 1));
    assert_eq!(p.connections(), 0);
    p.refuse(false);
    let s = client(&p);
    assert_eq!(round_trip(&s, b"ok"), b"ok");
}

#[test]
fn watch_and_trigger_date_what_passes() {
    let p = Proxy::start(echo()).unwrap();
    p.watch_downstream(vec![Some(b'x'), None, Some(b'z')]);
    let s = client(&p);
    assert_eq!(round_trip(&s, b"abc"), b"abc");
    assert!(p.watch_hit().is_none());
    assert_eq!(round_trip(&s, b"_xyz_"), b"_xyz_");
    assert!(p.watch_hit().is_some());
    p.reset_when_client_sends(b"boom".iter().map(|b| Some(*b)).collect(), Duration::ZERO);
    let mut w = s.try_clone().unwrap();
    w.write_all(b"boom").unwrap();
    let mut buf = [0u8; 4];
    assert!((&s).read(&mut buf).map(|n| n == 0).unwrap_or(true));
    assert!(p.trigger_hit().is_some());
}
