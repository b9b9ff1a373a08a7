//! A small lepus confirm-each program for profiling (benches/results/confirm-profile.md):
//! T threads on one connection, a channel each in confirm mode, each publishing M
//! 64-byte messages and waiting for each one's confirm. Prints the rate, the process's
//! CPU time per message and its context switches per message (getrusage), counted from
//! the moment every thread has its channel (the set-up, thread start + channel.open +
//! confirm.select, is printed on its own line), and the I/O thread's own CPU time per
//! message (its schedstat, Linux). A third argument `none` publishes without
//! confirms (no confirm.select; the figures end when every call returned and one RPC on
//! the connection came back, so every publish was written, as in the suite).
//!
//! ```text
//! cargo build --profile bench -p lepus-bench-suite --example confirm-profile
//! scripts/with-rabbitmq target/release/examples/confirm-profile [threads] [per_thread] [each|none]
//! perf record -g target/release/examples/confirm-profile 100 200
//! strace -c -f target/release/examples/confirm-profile 100 200
//! LEPUS_SHARED_CHANNEL=1 target/release/examples/confirm-profile 20 500   # one channel
//! LEPUS_PROFILE_HOLD=1 target/release/examples/confirm-profile 900 10 none # exits not timed
//! LEPUS_CALLER_WRITES=0 target/release/examples/confirm-profile 4 2500  # every frame via the I/O thread
//! ```

#[path = "cpu.rs"]
mod cpu;

use std::sync::{Arc, Barrier};
use std::time::Instant;

use lepus::{BasicProperties, Connection, PublishOptions, QueueDeclareOptions};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let confirms = !std::env::args().skip(1).any(|a| a == "none");
    let threads = args.first().copied().unwrap_or(100);
    let per = args.get(1).copied().unwrap_or(200);
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    // LEPUS_CALLER_WRITES=0: callers never write the socket themselves (A/B runs).
    let caller_writes = std::env::var("LEPUS_CALLER_WRITES").map_or(true, |v| v != "0");
    let opts = lepus::ConnectionOptions::from_uri(&url)
        .expect("AMQP_URL")
        .caller_writes(caller_writes);
    let conn = Connection::open_with(opts).expect("connect");
    let admin = conn.open_channel().expect("admin channel");
    let queue = format!("lepus-confirm-profile.{}", std::process::id());
    admin
        .queue_declare(&queue, &QueueDeclareOptions::default())
        .expect("queue.declare");
    // LEPUS_SHARED_CHANNEL=1: every thread publishes on one channel (its waiters share
    // the channel's confirm tracker).
    let shared = std::env::var_os("LEPUS_SHARED_CHANNEL").is_some().then(|| {
        let ch = conn.open_channel().expect("channel");
        ch.confirm_select().expect("confirm.select");
        ch
    });
    // `ready`: every thread has its channel; the measured interval starts after it.
    let ready = Arc::new(Barrier::new(threads + 1));
    let barrier = Arc::new(Barrier::new(threads + 1));
    // LEPUS_PROFILE_HOLD=1: the threads wait after their last call and exit only after
    // the measured interval (leaves their exit and join out of it: the harness's share).
    let hold = std::env::var_os("LEPUS_PROFILE_HOLD").is_some();
    let done = Arc::new(Barrier::new(threads + 1));
    let release = Arc::new(Barrier::new(threads + 1));
    let setup_cpu0 = cpu::process();
    let setup_start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (conn, queue, ready, barrier) =
                (conn.clone(), queue.clone(), ready.clone(), barrier.clone());
            let (done, release) = (done.clone(), release.clone());
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("publisher".into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    let ch = shared.unwrap_or_else(|| {
                        let ch = conn.open_channel().expect("channel");
                        if confirms {
                            ch.confirm_select().expect("confirm.select");
                        }
                        ch
                    });
                    let props = BasicProperties::new();
                    let body = [7u8; 64];
                    ready.wait();
                    barrier.wait();
                    let mut failed = 0usize;
                    for _ in 0..per {
                        let ok = if confirms {
                            ch.basic_publish_confirmed(
                                "",
                                &queue,
                                &body,
                                &props,
                                &PublishOptions::default(),
                            )
                            .and_then(|c| c.wait())
                            .is_ok()
                        } else {
                            ch.basic_publish("", &queue, &body, &props, &PublishOptions::default())
                                .is_ok()
                        };
                        failed += usize::from(!ok);
                    }
                    if hold {
                        done.wait();
                        release.wait();
                    }
                    (failed, ch)
                })
                .expect("spawn")
        })
        .collect();
    ready.wait();
    let setup_secs = setup_start.elapsed().as_secs_f64();
    let cpu0 = cpu::process();
    let io0 = io_thread_ns();
    let setup = cpu0.since(&setup_cpu0);
    let start = Instant::now();
    barrier.wait();
    let mut failed = 0usize;
    let mut channels = Vec::with_capacity(threads);
    let mut join = |handles: Vec<std::thread::JoinHandle<(usize, lepus::Channel)>>| {
        for h in handles {
            let (f, ch) = h.join().expect("publisher");
            failed += f;
            channels.push(ch);
        }
    };
    let handles = if hold {
        done.wait();
        handles
    } else {
        join(handles);
        Vec::new()
    };
    // Without confirms the calls return before the frames are written: one RPC on the
    // connection comes back after every queued publish went out.
    if !confirms {
        let _ = admin.queue_declare(
            &queue,
            &QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
        );
    }
    let secs = start.elapsed().as_secs_f64();
    let u = cpu::process().since(&cpu0);
    let io_us = io_thread_ns().zip(io0).map(|(b, a)| {
        (
            b.0.saturating_sub(a.0) as f64 / 1e3,
            b.1.saturating_sub(a.1) as f64 / 1e3,
        )
    });
    if hold {
        release.wait();
    }
    join(handles);
    drop(channels);
    // Per message, and per thread (the fixed part: the release from the barrier, the
    // thread's exit and join; with 0 messages, that alone).
    let n = (threads * per).max(1) as f64;
    println!(
        "set-up ({threads} threads, channel.open{}): {:.1} ms, CPU {:.1} us/thread, voluntary switches {:.1}/thread",
        if confirms { " + confirm.select" } else { "" },
        setup_secs * 1e3,
        setup.cpu_us() / threads as f64,
        setup.vcsw as f64 / threads as f64,
    );
    println!(
        "{threads} threads x {per} ({}): {:.0} msg/s, {failed} failed; CPU {:.2} us/msg (user {:.2}, sys {:.2}); voluntary switches {:.2}/msg, involuntary {:.2}/msg; CPU {:.1} us/thread",
        if confirms {
            "confirm each"
        } else {
            "no confirms"
        },
        n / secs,
        u.cpu_us() / n,
        u.user_us / n,
        u.sys_us / n,
        u.vcsw as f64 / n,
        u.ivcsw as f64 / n,
        u.cpu_us() / threads as f64,
    );
    if let Some((run, wait)) = io_us {
        println!(
            "I/O thread CPU {:.2} us/msg (schedstat); runnable but waiting for a CPU {:.1} ms of {:.1} ms",
            run / n,
            wait / 1e3,
            secs * 1e3
        );
    }
    println!(
        "caller writes: {} of {} sends (caller_writes {caller_writes})",
        conn.stats().caller_writes,
        threads * per
    );
    let _ = admin.queue_delete(&queue, &Default::default());
    let _ = conn.close();
}

/// Time the connection's I/O thread has spent on a CPU and runnable waiting for one, ns
/// (Linux: the first two fields of /proc/self/task/<tid>/schedstat of the thread named
/// `lepus-io…`); None elsewhere.
fn io_thread_ns() -> Option<(u64, u64)> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("lepus-io") {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let mut f = stat.split_whitespace().map(|x| x.parse::<u64>().ok());
            return Some((f.next()??, f.next()??));
        }
    }
    None
}
