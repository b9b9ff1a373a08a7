//! Scenario 7, the ceiling probes for publishing without confirms: a hand-made AMQP
//! client that does nothing but write pre-encoded `basic.publish` frames (64-byte
//! bodies), pipelined, in large writes (no per-frame syscall), from one thread per
//! socket with no hand-off, TCP_NODELAY set. On one socket it is the most any client
//! can push through one connection; on several sockets it shows whether the broker,
//! not the connection, is the limit. The confirm-each probe is in lockstep.rs; the
//! broker's floor for consumer startup is here too.

use std::io::{self, Write};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic};
use lepus_testkit::{FrameIo, RawClient, close_frame, frames};

use crate::common::{self, Addr, connect, declare, delete, wait_count};
use crate::cpu::{self, Usage};
use crate::throughput::BODY;

/// One run of a probe (publish without confirms, or the lock-step confirm probe), or of
/// the blocking floor (kind "wake-floor", floor.rs: no broker; its times are the run's
/// length and its CPU the whole process's, `RUSAGE_SELF`).
#[derive(Debug, Clone)]
pub struct CeilingRun {
    /// "ceiling" (one socket), "ceiling-4conn" (the same work over 4 sockets),
    /// "lockstep", "lockstep-4conn", "wake-floor".
    pub kind: String,
    pub round: usize,
    pub threads: usize,
    pub per_thread: usize,
    /// Until the last write returned (no confirms) or the last confirm arrived (lockstep).
    pub write_secs: f64,
    /// Until the queue held every message.
    pub absorbed_secs: f64,
    /// CPU time of the probe's writing threads (RUSAGE_THREAD, summed): the client's
    /// own work, without the harness's polling of the queue.
    pub cpu: Usage,
}

impl CeilingRun {
    pub fn messages(&self) -> usize {
        self.threads * self.per_thread
    }
    pub fn absorbed_rate(&self) -> f64 {
        self.messages() as f64 / self.absorbed_secs
    }
    pub fn cpu_us_per_msg(&self) -> f64 {
        self.cpu.cpu_us() / self.messages() as f64
    }
}

/// Sockets of the multi-connection probes (the channels are spread over them).
pub const SOCKETS: usize = 4;

/// Messages a channel publishes back to back before the next channel's turn, in the
/// pre-encoded stream (`LEPUS_PROBE_BURST` overrides, to compare shapes). 1 is a strict
/// round robin; a burst is what T threads that each publish in a loop look like to the
/// socket when a writer coalesces their output.
pub fn burst() -> usize {
    env_or("LEPUS_PROBE_BURST", 16)
}

/// Bytes per `write` call (`LEPUS_PROBE_CHUNK` overrides): large (no per-frame syscall),
/// but not the whole run at once, so that the broker starts on the first messages while
/// the rest is written.
pub fn chunk() -> usize {
    env_or("LEPUS_PROBE_CHUNK", 256 * 1024)
}

fn env_or(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// An open AMQP connection with `channels` channels (ids 1..=channels), TCP_NODELAY set.
pub fn handshake(addr: &Addr, channels: usize) -> io::Result<RawClient> {
    let mut c = RawClient::connect(
        (addr.host.as_str(), addr.port),
        &addr.user,
        &addr.pass,
        &addr.vhost,
    )?;
    c.io().stream().set_nodelay(true)?;
    if channels > 0 {
        c.open_channels(1..=channels as u16)?;
    }
    Ok(c)
}

/// One pre-encoded publish (method, header, body frames) of a 64-byte body on `ch`.
pub fn encode_one(queue: &str, ch: u16, body: &[u8]) -> Vec<u8> {
    let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: queue.into(),
        mandatory: false,
        immediate: false,
    }));
    let mut out = frames::method_frame(ch, publish);
    out.extend(frames::content_frames(ch, &frames::no_props(), body, 0));
    out
}

/// Pre-encoded publishes: `per_thread` on each of channels 1..=threads, in bursts of
/// `BURST` per channel, channels taking turns.
pub fn encode(queue: &str, threads: usize, per_thread: usize) -> Vec<u8> {
    let body = [7u8; BODY];
    let one: Vec<Vec<u8>> = (1..=threads as u16)
        .map(|ch| encode_one(queue, ch, &body))
        .collect();
    let mut out = Vec::with_capacity(threads * per_thread * one[0].len());
    let mut sent = 0;
    while sent < per_thread {
        let n = burst().min(per_thread - sent);
        for frames in &one {
            for _ in 0..n {
                out.extend_from_slice(frames);
            }
        }
        sent += n;
    }
    out
}

/// Read frames until `connection.close-ok` (or the socket ends or stays silent 10 s).
pub fn drain_until_close_ok(io: &mut FrameIo) {
    while let Ok(f) = io.recv_frame(Instant::now() + Duration::from_secs(10)) {
        if f.method_id() == Some((10, 51)) {
            break;
        }
    }
}

/// Write `bytes` in `CHUNK`-sized writes.
pub fn write_chunked(s: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    for c in bytes.chunks(chunk()) {
        s.write_all(c)?;
    }
    Ok(())
}

/// `threads` × `per_thread` publishes without confirms over `sockets` connections (the
/// channels spread evenly), one writer thread per socket, all released at once.
pub fn probe(
    url: &str,
    sockets: usize,
    threads: usize,
    per_thread: usize,
) -> io::Result<CeilingRun> {
    let addr = common::parse_addr(url);
    let admin_conn = connect(url);
    let admin = admin_conn.open_channel().expect("admin channel");
    let queue = common::unique("ceiling");
    declare(&admin, &queue);
    let sockets = sockets.clamp(1, threads);
    let barrier = Arc::new(Barrier::new(sockets + 1));
    let mut writers = Vec::new();
    for k in 0..sockets {
        // Channels of this socket: an even share of the T.
        let chans = threads / sockets + usize::from(k < threads % sockets);
        let bytes = encode(&queue, chans, per_thread);
        let mut c = handshake(&addr, chans)?;
        let mut s = c.io().stream().try_clone()?;
        let mut r = FrameIo::new(s.try_clone()?);
        let barrier = barrier.clone();
        writers.push(std::thread::spawn(
            move || -> io::Result<(Instant, Usage)> {
                // Whatever the broker sends meanwhile (it should send nothing) is read and
                // dropped; the reader ends at connection.close-ok.
                let reader = std::thread::spawn(move || drain_until_close_ok(&mut r));
                barrier.wait();
                let cpu0 = cpu::thread();
                write_chunked(&mut s, &bytes)?;
                let wrote = (Instant::now(), cpu::thread().since(&cpu0));
                // Keep the connection open until the suite has counted the queue (a spurious
                // wake-up only closes it early: the broker handles the publishes first).
                std::thread::park();
                let _ = s.write_all(&close_frame());
                let _ = reader.join();
                drop(c);
                Ok(wrote)
            },
        ));
    }
    // The clock starts before the release: a worker may finish before this thread
    // runs again after the barrier (on a loaded machine), and must not be missed.
    let start = Instant::now();
    barrier.wait();
    let total = threads * per_thread;
    let absorbed = wait_count(&admin, &queue, total, Duration::from_secs(120))
        .map(|t| (t - start).as_secs_f64())
        .unwrap_or(f64::NAN);
    let mut write_secs: f64 = 0.0;
    let mut cpu = Usage::default();
    for w in writers {
        w.thread().unpark();
        if let Ok(Ok((t, u))) = w.join() {
            write_secs = write_secs.max((t - start).as_secs_f64());
            cpu = cpu.plus(&u);
        }
    }
    delete(&admin, &queue);
    let _ = admin_conn.close();
    Ok(CeilingRun {
        kind: if sockets == 1 {
            "ceiling".into()
        } else {
            format!("ceiling-{sockets}conn")
        },
        round: 0,
        threads,
        per_thread,
        write_secs,
        absorbed_secs: absorbed,
        cpu,
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
        out.extend(frames::consumer_start_frames(ch, queue.as_str(), prefetch));
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
