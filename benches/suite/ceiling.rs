//! Scenario 7, the ceiling probe: one socket, a hand-made AMQP handshake, T channels,
//! and pre-encoded `basic.publish` frames (64-byte bodies, channels interleaved as T
//! threads would) written as fast as the socket takes them. What the broker absorbs this
//! way is the most any client could get through one connection.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::{self, Addr, connect, declare, delete, wait_count};
use crate::throughput::BODY;

#[derive(Debug, Clone)]
pub struct CeilingRun {
    pub round: usize,
    pub threads: usize,
    pub per_thread: usize,
    pub write_secs: f64,
    pub absorbed_secs: f64,
}

impl CeilingRun {
    pub fn messages(&self) -> usize {
        self.threads * self.per_thread
    }
    pub fn absorbed_rate(&self) -> f64 {
        self.messages() as f64 / self.absorbed_secs
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(0xCE);
}

fn method(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + args.len());
    p.extend_from_slice(&class.to_be_bytes());
    p.extend_from_slice(&method.to_be_bytes());
    p.extend_from_slice(args);
    p
}

fn shortstr(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn longstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// Read one frame: (type, channel, payload).
fn read_frame(s: &mut TcpStream) -> io::Result<(u8, u16, Vec<u8>)> {
    let mut h = [0u8; 7];
    s.read_exact(&mut h)?;
    let size = u32::from_be_bytes([h[3], h[4], h[5], h[6]]) as usize;
    if size > 1 << 20 {
        return Err(io::Error::other("oversized frame"));
    }
    let mut p = vec![0u8; size + 1];
    s.read_exact(&mut p)?;
    p.pop();
    Ok((h[0], u16::from_be_bytes([h[1], h[2]]), p))
}

/// Wait for method `class.method`, skipping heartbeats.
fn expect(s: &mut TcpStream, class: u16, meth: u16) -> io::Result<Vec<u8>> {
    loop {
        let (kind, _ch, p) = read_frame(s)?;
        if kind == 8 {
            continue;
        }
        if kind != 1 || p.len() < 4 {
            return Err(io::Error::other(format!("unexpected frame type {kind}")));
        }
        let c = u16::from_be_bytes([p[0], p[1]]);
        let m = u16::from_be_bytes([p[2], p[3]]);
        if (c, m) == (class, meth) {
            return Ok(p[4..].to_vec());
        }
        return Err(io::Error::other(format!(
            "expected {class}.{meth}, got {c}.{m}"
        )));
    }
}

/// An open AMQP connection with `channels` channels (ids 1..=channels).
fn handshake(addr: &Addr, channels: usize) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect((addr.host.as_str(), addr.port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"AMQP\x00\x00\x09\x01")?;
    expect(&mut s, 10, 10)?;
    let mut a = Vec::new();
    a.extend_from_slice(&0u32.to_be_bytes()); // client properties: empty table
    shortstr(&mut a, "PLAIN");
    longstr(&mut a, format!("\0{}\0{}", addr.user, addr.pass).as_bytes());
    shortstr(&mut a, "en_US");
    let mut out = Vec::new();
    frame(&mut out, 1, 0, &method(10, 11, &a));
    s.write_all(&out)?;
    let tune = expect(&mut s, 10, 30)?;
    let channel_max = u16::from_be_bytes([tune[0], tune[1]]);
    let frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
    let mut a = Vec::new();
    a.extend_from_slice(&(if channel_max == 0 { 2047 } else { channel_max }).to_be_bytes());
    a.extend_from_slice(&(if frame_max == 0 { 131_072 } else { frame_max }).to_be_bytes());
    a.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    let mut out = Vec::new();
    frame(&mut out, 1, 0, &method(10, 31, &a));
    let mut a = Vec::new();
    shortstr(&mut a, &addr.vhost);
    shortstr(&mut a, "");
    a.push(0);
    frame(&mut out, 1, 0, &method(10, 40, &a));
    s.write_all(&out)?;
    expect(&mut s, 10, 41)?;
    let mut out = Vec::new();
    for ch in 1..=channels {
        frame(&mut out, 1, ch as u16, &method(20, 10, &[0]));
    }
    s.write_all(&out)?;
    for _ in 0..channels {
        expect(&mut s, 20, 11)?;
    }
    Ok(s)
}

/// Pre-encoded publishes: `per_thread` rounds over channels 1..=threads.
fn encode(queue: &str, threads: usize, per_thread: usize) -> Vec<u8> {
    let mut publish = Vec::new();
    publish.extend_from_slice(&0u16.to_be_bytes());
    shortstr(&mut publish, "");
    shortstr(&mut publish, queue);
    publish.push(0);
    let publish = method(60, 40, &publish);
    let mut header = Vec::new();
    header.extend_from_slice(&60u16.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(BODY as u64).to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    let body = [7u8; BODY];
    let mut out = Vec::with_capacity(threads * per_thread * (publish.len() + 110));
    for _ in 0..per_thread {
        for ch in 1..=threads {
            frame(&mut out, 1, ch as u16, &publish);
            frame(&mut out, 2, ch as u16, &header);
            frame(&mut out, 3, ch as u16, &body);
        }
    }
    out
}

pub fn probe(url: &str, threads: usize, per_thread: usize) -> io::Result<CeilingRun> {
    let addr = common::parse_addr(url);
    let admin_conn = connect(url);
    let admin = admin_conn.open_channel().expect("admin channel");
    let queue = common::unique("ceiling");
    declare(&admin, &queue);
    let bytes = encode(&queue, threads, per_thread);
    let mut s = handshake(&addr, threads)?;
    // Whatever the broker sends meanwhile (it should send nothing) is read and dropped.
    let mut r = s.try_clone()?;
    // Ends at connection.close-ok (or when the socket ends).
    let reader = std::thread::spawn(move || {
        while let Ok((kind, _, p)) = read_frame(&mut r) {
            if kind == 1 && p.get(..4) == Some(&[0, 10, 0, 51]) {
                break;
            }
        }
    });
    let start = Instant::now();
    s.write_all(&bytes)?;
    let write = start.elapsed();
    let total = threads * per_thread;
    let absorbed = wait_count(&admin, &queue, total, Duration::from_secs(120))
        .map(|t| (t - start).as_secs_f64())
        .unwrap_or(f64::NAN);
    let mut out = Vec::new();
    let mut a = Vec::new();
    a.extend_from_slice(&200u16.to_be_bytes());
    shortstr(&mut a, "");
    a.extend_from_slice(&[0, 0, 0, 0]);
    frame(&mut out, 1, 0, &method(10, 50, &a));
    let _ = s.write_all(&out);
    let _ = reader.join();
    drop(s);
    delete(&admin, &queue);
    let _ = admin_conn.close();
    Ok(CeilingRun {
        round: 0,
        threads,
        per_thread,
        write_secs: write.as_secs_f64(),
        absorbed_secs: absorbed,
    })
}

/// The broker's floor for consumer startup: one socket, `n` × (channel.open, basic.qos,
/// basic.consume) written at once, timed until the n-th consume-ok.
pub fn consumer_floor(url: &str, n: usize, prefetch: u16) -> io::Result<f64> {
    let addr = common::parse_addr(url);
    let admin_conn = connect(url);
    let admin = admin_conn.open_channel().expect("admin channel");
    let queue = common::unique("consumer-floor");
    declare(&admin, &queue);
    let mut s = handshake(&addr, 0)?;
    let mut out = Vec::new();
    for ch in 1..=n as u16 {
        frame(&mut out, 1, ch, &method(20, 10, &[0]));
        let mut q = Vec::new();
        q.extend_from_slice(&0u32.to_be_bytes());
        q.extend_from_slice(&prefetch.to_be_bytes());
        q.push(0);
        frame(&mut out, 1, ch, &method(60, 10, &q));
        let mut c = Vec::new();
        c.extend_from_slice(&0u16.to_be_bytes());
        shortstr(&mut c, &queue);
        shortstr(&mut c, "");
        c.push(0);
        c.extend_from_slice(&0u32.to_be_bytes());
        frame(&mut out, 1, ch, &method(60, 20, &c));
    }
    let start = Instant::now();
    s.write_all(&out)?;
    let mut ok = 0;
    while ok < n {
        let (kind, _, p) = read_frame(&mut s)?;
        if kind == 1 && p.get(..4) == Some(&[0, 60, 0, 21]) {
            ok += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mut out = Vec::new();
    let mut a = Vec::new();
    a.extend_from_slice(&200u16.to_be_bytes());
    shortstr(&mut a, "");
    a.extend_from_slice(&[0, 0, 0, 0]);
    frame(&mut out, 1, 0, &method(10, 50, &a));
    let _ = s.write_all(&out);
    while let Ok((kind, _, p)) = read_frame(&mut s) {
        if kind == 1 && p.get(..4) == Some(&[0, 10, 0, 51]) {
            break;
        }
    }
    drop(s);
    delete(&admin, &queue);
    let _ = admin_conn.close();
    Ok(secs)
}
