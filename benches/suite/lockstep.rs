//! Scenario 7, the confirm-each ceiling: the raw lock-step writer. T channels in
//! confirm mode on one socket, one thread: every channel has one publish in flight and
//! publishes its next as soon as its `basic.ack` arrives; the acks of one read are
//! answered with one write (pipelined across channels, no per-frame syscall, no thread
//! hand-off). What the broker can confirm through one connection when each publisher
//! waits for its confirm; over several sockets, whether the connection is the limit.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, confirm};
use lepus_testkit::{RawClient, close_frame, frames};

use crate::ceiling::{CeilingRun, drain_until_close_ok, encode_one, handshake};
use crate::common::{self, connect, declare, delete, wait_count};
use crate::cpu::{self, Usage};
use crate::throughput::BODY;

/// Put channels 1..=n in confirm mode: every `confirm.select` in one write, then the
/// n select-oks.
fn confirm_all(c: &mut RawClient, n: usize) -> io::Result<()> {
    let mut out = Vec::new();
    for ch in 1..=n as u16 {
        out.extend(frames::method_frame(
            ch,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            })),
        ));
    }
    c.io().send(&out)?;
    for _ in 0..n {
        c.next_method("confirm.select-ok")?;
    }
    Ok(())
}

/// The lock-step loop on one socket: returns when every channel has `per` confirms.
fn run_socket(mut s: TcpStream, one: Vec<Vec<u8>>, per: usize) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let chans = one.len();
    let total = chans * per;
    let mut sent = vec![1usize; chans];
    let mut out: Vec<u8> = one.concat();
    s.write_all(&out)?;
    let mut acked = 0;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut chunk = vec![0u8; 256 * 1024];
    while acked < total {
        let n = match s.read(&mut chunk) {
            Ok(0) => return Err(io::Error::new(ErrorKind::UnexpectedEof, "broker closed")),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        buf.extend_from_slice(&chunk[..n]);
        out.clear();
        let mut off = 0;
        // Every whole frame of this read; a basic.ack (60, 80) lets its channel go on.
        while buf.len() - off >= 7 {
            let size = u32::from_be_bytes([buf[off + 3], buf[off + 4], buf[off + 5], buf[off + 6]])
                as usize;
            if buf.len() - off < size + 8 {
                break;
            }
            let ch = u16::from_be_bytes([buf[off + 1], buf[off + 2]]) as usize;
            let p = &buf[off + 7..off + 7 + size];
            if buf[off] == 1 && p.len() >= 4 && p[..4] == [0, 60, 0, 80] {
                acked += 1;
                if let Some(i) = ch.checked_sub(1).filter(|&i| i < chans)
                    && sent[i] < per
                {
                    out.extend_from_slice(&one[i]);
                    sent[i] += 1;
                }
            } else if buf[off] == 1 && p.len() >= 4 && p[..4] == [0, 60, 0, 120] {
                return Err(io::Error::other("the broker nacked a publish"));
            }
            off += size + 8;
        }
        buf.drain(..off);
        if !out.is_empty() {
            s.write_all(&out)?;
        }
    }
    Ok(())
}

/// `threads` channels × `per_thread` publishes, each waiting for its confirm, over
/// `sockets` connections (one thread each, channels spread evenly).
pub fn lockstep(
    url: &str,
    sockets: usize,
    threads: usize,
    per_thread: usize,
) -> io::Result<CeilingRun> {
    let addr = common::parse_addr(url);
    let admin_conn = connect(url);
    let admin = admin_conn.open_channel().expect("admin channel");
    let queue = common::unique("lockstep");
    declare(&admin, &queue);
    let sockets = sockets.clamp(1, threads);
    let barrier = Arc::new(Barrier::new(sockets + 1));
    let body = [7u8; BODY];
    let mut workers = Vec::new();
    let mut clients = Vec::new();
    for k in 0..sockets {
        let chans = threads / sockets + usize::from(k < threads % sockets);
        let mut c = handshake(&addr, chans)?;
        confirm_all(&mut c, chans)?;
        let one: Vec<Vec<u8>> = (1..=chans as u16)
            .map(|ch| encode_one(&queue, ch, &body))
            .collect();
        let s = c.io().stream().try_clone()?;
        let barrier = barrier.clone();
        workers.push(std::thread::spawn(
            move || -> io::Result<(Instant, Usage)> {
                barrier.wait();
                let cpu0 = cpu::thread();
                run_socket(s, one, per_thread)
                    .map(|()| (Instant::now(), cpu::thread().since(&cpu0)))
            },
        ));
        clients.push(c);
    }
    // The clock starts before the release: a worker may finish before this thread
    // runs again after the barrier (on a loaded machine), and must not be missed.
    let start = Instant::now();
    barrier.wait();
    let mut last = start;
    let mut failure = None;
    let mut cpu = Usage::default();
    for w in workers {
        match w.join() {
            Ok(Ok((t, u))) => {
                last = last.max(t);
                cpu = cpu.plus(&u);
            }
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some(io::Error::other("a lock-step thread panicked")),
        }
    }
    // Every message is confirmed, so enqueued: the count is one poll, as for lepus.
    let total = threads * per_thread;
    let absorbed = wait_count(&admin, &queue, total, Duration::from_secs(60))
        .map(|t| (t - start).as_secs_f64())
        .unwrap_or(f64::NAN);
    for mut c in clients {
        let _ = c.io().send(&close_frame());
        drain_until_close_ok(c.io());
    }
    delete(&admin, &queue);
    let _ = admin_conn.close();
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(CeilingRun {
        kind: if sockets == 1 {
            "lockstep".into()
        } else {
            format!("lockstep-{sockets}conn")
        },
        round: 0,
        threads,
        per_thread,
        write_secs: (last - start).as_secs_f64(),
        absorbed_secs: absorbed,
        cpu,
    })
}
