//! Scenario 7, the ceiling probe: one socket, a hand-made AMQP handshake, T channels,
//! and pre-encoded `basic.publish` frames (64-byte bodies, channels interleaved as T
//! threads would) written as fast as the socket takes them. What the broker absorbs this
//! way is the most any client could get through one connection.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, channel};
use lepus_testkit::{FrameIo, RawClient, close_frame, frames};

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

/// An open AMQP connection with `channels` channels (ids 1..=channels).
fn handshake(addr: &Addr, channels: usize) -> io::Result<RawClient> {
    let mut c = RawClient::connect(
        (addr.host.as_str(), addr.port),
        &addr.user,
        &addr.pass,
        &addr.vhost,
    )?;
    if channels > 0 {
        c.open_channels(1..=channels as u16)?;
    }
    Ok(c)
}

/// Pre-encoded publishes: `per_thread` rounds over channels 1..=threads.
fn encode(queue: &str, threads: usize, per_thread: usize) -> Vec<u8> {
    let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: queue.into(),
        mandatory: false,
        immediate: false,
    }));
    let body = [7u8; BODY];
    let mut out = Vec::with_capacity(threads * per_thread * (queue.len() + 110));
    for _ in 0..per_thread {
        for ch in 1..=threads as u16 {
            out.extend(frames::method_frame(ch, publish.clone()));
            out.extend(frames::content_frames(ch, &frames::no_props(), &body, 0));
        }
    }
    out
}

/// Read frames until `connection.close-ok` (or the socket ends or stays silent 10 s).
fn drain_until_close_ok(io: &mut FrameIo) {
    while let Ok(f) = io.recv_frame(Instant::now() + Duration::from_secs(10)) {
        if f.method_id() == Some((10, 51)) {
            break;
        }
    }
}

pub fn probe(url: &str, threads: usize, per_thread: usize) -> io::Result<CeilingRun> {
    let addr = common::parse_addr(url);
    let admin_conn = connect(url);
    let admin = admin_conn.open_channel().expect("admin channel");
    let queue = common::unique("ceiling");
    declare(&admin, &queue);
    let bytes = encode(&queue, threads, per_thread);
    let mut c = handshake(&addr, threads)?;
    let mut s = c.io().stream().try_clone()?;
    // Whatever the broker sends meanwhile (it should send nothing) is read and dropped.
    let mut r = FrameIo::new(s.try_clone()?);
    // Ends at connection.close-ok (or when the socket ends).
    let reader = std::thread::spawn(move || drain_until_close_ok(&mut r));
    let start = Instant::now();
    s.write_all(&bytes)?;
    let write = start.elapsed();
    let total = threads * per_thread;
    let absorbed = wait_count(&admin, &queue, total, Duration::from_secs(120))
        .map(|t| (t - start).as_secs_f64())
        .unwrap_or(f64::NAN);
    let _ = s.write_all(&close_frame());
    let _ = reader.join();
    drop((s, c));
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
    let mut c = handshake(&addr, 0)?;
    let mut out = Vec::new();
    for ch in 1..=n as u16 {
        out.extend(frames::method_frame(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ));
        out.extend(frames::method_frame(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: prefetch,
                global: false,
            })),
        ));
        out.extend(frames::method_frame(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: queue.as_str().into(),
                consumer_tag: "".into(),
                no_local: false,
                no_ack: false,
                exclusive: false,
                nowait: false,
                arguments: Default::default(),
            })),
        ));
    }
    let io = c.io();
    let start = Instant::now();
    io.send(&out)?;
    let mut ok = 0;
    while ok < n {
        let f = io.recv_frame(Instant::now() + Duration::from_secs(10))?;
        if f.method_id() == Some((60, 21)) {
            ok += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = io.send(&close_frame());
    drain_until_close_ok(io);
    drop(c);
    delete(&admin, &queue);
    let _ = admin_conn.close();
    Ok(secs)
}
