//! Consumer start-up against the broker's floor, interleaved in one run
//! (benches/results/consumer-start.md).
//!
//! - **floor**: one raw socket writes N × (channel.open, basic.qos, basic.consume) at
//!   once and reads until the N-th consume-ok (the suite's scenario 3 floor).
//! - **open_consumer**: N threads each call `Connection::open_consumer` (channel.open,
//!   qos and consume written together, one round trip) at once, timed from the barrier's
//!   release to the last consume-ok, as the suite's scenario 3 times startup. Also
//!   printed: when the last thread left the barrier (the release of N threads, which
//!   the floor does not pay), and the client's CPU time and context switches over the
//!   run (getrusage of the process, from the barrier to the last start: spawning and
//!   ending the threads left out).
//! - **three RPCs** (`three` among the arguments): `open_channel` + `basic_qos` +
//!   `basic_consume`, three round trips, as a third column.
//! - **suite** (`suite` among the arguments): open_consumer timed as the suite's
//!   scenario 3 (throughput.rs `consumers`) times it: each thread first makes its id
//!   ledger (20 × N u32) and sample buffer, the clock starts right after the threads
//!   are spawned (not when they all wait at the barrier), and each started consumer
//!   calls `recv_timeout(20 ms)` in a loop while the others still start. With
//!   `suite-parts` too, each of the two apart: `suite-settled` (the clock starts when
//!   every thread waits at the barrier) and `suite-nopoll` (no polling).
//!
//! With `floor-pieces` among the arguments, a second floor writing each channel's three
//! frames in a write of its own (whether the broker minds many small segments).
//!
//! With `release` among the arguments, a column of runs whose threads only pass the
//! barrier (the release of N threads by itself, its "open_consumer" time that of the
//! last thread to run).
//!
//! With `alone` among the arguments only open_consumer runs (twice per round), to be
//! profiled (`perf stat`, `strace -f -c`, `perf record`).
//!
//! Each run has its own fresh queue (a queue with many consumers, even cancelled
//! ones, is not the same work for the broker). Prints medians over ROUNDS rounds, the
//! kinds alternating within each round (their order rotating per round).
//!
//! ```text
//! cargo build --profile bench -p lepus-bench-suite --example consumer-start
//! scripts/with-rabbitmq $CARGO_TARGET_DIR/release/examples/consumer-start [rounds] [threads...] [three] [suite]
//! ```

#[path = "cpu.rs"]
mod cpu;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use lepus::{Connection, ConsumeOptions, QueueDeclareOptions, QueueDeleteOptions};
use lepus_testkit::{RawClient, close_frame, frames};

const PREFETCH: u16 = 50;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Floor,
    Pipelined,
    Three,
    /// open_consumer timed as the suite's scenario 3 times it (see the file's doc).
    Suite,
    /// The same, but the clock starts when every thread waits at the barrier.
    SuiteSettled,
    /// The same as `Suite`, but the started consumers do not poll.
    SuiteNoPoll,
    /// The threads only pass the barrier: what releasing N threads costs by itself.
    Release,
    /// The floor with each channel's three frames in a write of their own (N small
    /// writes, TCP_NODELAY): whether the broker minds many small segments.
    FloorPieces,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Floor => "floor",
            Kind::FloorPieces => "floor-pieces",
            Kind::Pipelined => "open_consumer",
            Kind::Three => "three",
            Kind::Release => "release",
            Kind::Suite => "suite",
            Kind::SuiteSettled => "suite-settled",
            Kind::SuiteNoPoll => "suite-nopoll",
        }
    }
    fn suite(self) -> bool {
        matches!(self, Kind::Suite | Kind::SuiteSettled | Kind::SuiteNoPoll)
    }
}

/// One run: seconds to the last consume-ok, when the last thread left the barrier, and
/// the client's CPU (µs) and context switches over the run.
#[derive(Default, Clone, Copy)]
struct Run {
    secs: f64,
    released: f64,
    /// CLOCK_MONOTONIC (ns) at the start and the end of the run: to pick the run out of
    /// a `perf record -k CLOCK_MONOTONIC` of the whole program.
    window: (u64, u64),
    cpu_us: f64,
    csw: u64,
    /// The starting threads' own share, inside `start` (their CPU, and how often they
    /// blocked or were preempted).
    caller_cpu_us: f64,
    caller_vcsw: u64,
    caller_ivcsw: u64,
    /// The broker's CPU time over the run.
    broker_ms: f64,
    /// The connections' I/O threads: CPU time and times run on a CPU (schedstat).
    io_cpu_us: f64,
    io_slices: u64,
}

/// The local broker's process: the `beam.smp` that listens on port 5672 (other nodes
/// may run beside it), found through /proc/net/tcp{,6} and the processes' sockets
/// (Linux; None where it cannot be seen).
fn broker_pid() -> Option<std::path::PathBuf> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local address "ADDR:PORT" (hex), state 0A = LISTEN, inode is the 10th field.
            if f.len() > 9 && f[1].ends_with(":1628") && f[3] == "0A" {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        if comm.trim() != "beam.smp" {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let link = std::fs::read_link(fd.path()).unwrap_or_default();
            if inodes.iter().any(|i| link.as_os_str() == i.as_str()) {
                return Some(p.path());
            }
        }
    }
    None
}

/// CPU time (ms) of the broker `proc` (/proc/<pid>), the sum of its threads' schedstat.
fn broker_ms(proc: Option<&std::path::Path>) -> f64 {
    let Some(tasks) = proc.and_then(|p| std::fs::read_dir(p.join("task")).ok()) else {
        return 0.0;
    };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e6
}

/// Wait until the broker `proc` uses under 20 ms of CPU per 100 ms, at most 3 s.
fn settle(proc: Option<&std::path::Path>) {
    if proc.is_none() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = broker_ms(proc);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = broker_ms(proc);
        if now - last < 20.0 {
            return;
        }
        last = now;
    }
}

/// CPU time (ns) and timeslices of the threads named `lepus-io…` together (the admin
/// connection's idles), from /proc/self/task/*/schedstat (Linux; zeros elsewhere).
fn io_threads() -> (u64, u64) {
    let mut sum = (0, 0);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return sum;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("lepus-io") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let f: Vec<u64> = stat
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [cpu, _, slices] = f[..] {
            sum.0 += cpu;
            sum.1 += slices;
        }
    }
    sum
}

struct Addr {
    host: String,
    port: u16,
    user: String,
    pass: String,
    vhost: String,
}

/// CLOCK_MONOTONIC in ns (0 if it cannot be read).
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// amqp://user:pass@host:port/vhost (the parts this program needs).
fn parse_addr(url: &str) -> Addr {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let (auth, rest) = rest.split_once('@').unwrap_or(("guest:guest", rest));
    let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
    let (hostport, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5672"));
    let vhost = match vhost {
        "" | "%2f" | "%2F" => "/".to_string(),
        v => v.to_string(),
    };
    Addr {
        host: host.into(),
        port: port.parse().unwrap_or(5672),
        user: user.into(),
        pass: pass.into(),
        vhost,
    }
}

fn start(conn: &Connection, queue: &str, kind: Kind) -> Option<lepus::Consumer> {
    if kind == Kind::Release {
        return None;
    }
    Some(start_one(conn, queue, kind))
}

fn start_one(conn: &Connection, queue: &str, kind: Kind) -> lepus::Consumer {
    if kind == Kind::Pipelined || kind.suite() {
        conn.open_consumer(queue, PREFETCH, &ConsumeOptions::default())
            .expect("open_consumer")
    } else {
        let ch = conn.open_channel().expect("open_channel");
        ch.basic_qos(PREFETCH, false).expect("basic_qos");
        ch.basic_consume(queue, &ConsumeOptions::default())
            .expect("basic_consume")
    }
}

/// `n` threads start one consumer each at once.
fn parallel(url: &str, queue: &str, n: usize, kind: Kind, broker: Option<&std::path::Path>) -> Run {
    let conn = Connection::open(url).expect("connect");
    let barrier = Arc::new(Barrier::new(n + 1));
    // Threads hold on after their start, so that their exits stay out of the CPU figure.
    let done = Arc::new(Barrier::new(n + 1));
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let arrived = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (conn, queue) = (conn.clone(), queue.to_string());
            let (barrier, done, tx) = (barrier.clone(), done.clone(), tx.clone());
            let (stop, arrived) = (stop.clone(), arrived.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    // The suite's consumer makes its id ledger (20 messages per consumer,
                    // a u32 each) and latency samples before the barrier.
                    let ledger = kind.suite().then(|| vec![0u32; 20 * n]);
                    let samples: Vec<u64> = Vec::with_capacity(if kind.suite() { 36 } else { 0 });
                    arrived.fetch_add(1, Ordering::AcqRel);
                    barrier.wait();
                    let entered = Instant::now();
                    let u0 = cpu::thread();
                    let c = start(&conn, &queue, kind);
                    let u = cpu::thread().since(&u0);
                    let _ = tx.send((entered, Instant::now(), u));
                    if let Some(c) = &c
                        && matches!(kind, Kind::Suite | Kind::SuiteSettled)
                    {
                        while !stop.load(Ordering::Acquire) {
                            let _ = c.recv_timeout(Duration::from_millis(20));
                        }
                    }
                    drop((ledger, samples));
                    done.wait();
                    c
                })
                .expect("spawn")
        })
        .collect();
    // Let the threads reach the barrier before the clock starts (the suite's old timing,
    // `Suite`, did not). With LEPUS_ARRIVED=1, only until the last has arrived there, as
    // the suite waits now (no pause for the new connection to settle).
    if !matches!(kind, Kind::Suite | Kind::SuiteNoPoll) {
        if std::env::var("LEPUS_ARRIVED").is_ok_and(|v| v == "1") {
            while arrived.load(Ordering::Acquire) < n {
                std::thread::sleep(Duration::from_micros(200));
            }
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let io0 = io_threads();
    let b0 = broker_ms(broker);
    let u0 = cpu::process();
    let mono0 = monotonic_ns();
    let t0 = Instant::now();
    barrier.wait();
    let mut last = t0;
    let mut released = t0;
    let mut callers = cpu::Usage::default();
    for _ in 0..n {
        let (entered, at, u) = rx.recv().expect("consumer thread");
        last = last.max(at);
        released = released.max(entered);
        callers = callers.plus(&u);
    }
    let mono1 = monotonic_ns();
    let u = cpu::process().since(&u0);
    let broker_cpu = broker_ms(broker) - b0;
    let io = io_threads();
    stop.store(true, Ordering::Release);
    done.wait();
    let consumers: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("consumer thread"))
        .collect();
    drop(consumers);
    let _ = conn.close();
    Run {
        secs: (last - t0).as_secs_f64(),
        released: (released - t0).as_secs_f64(),
        window: (mono0, mono1),
        cpu_us: u.cpu_us(),
        csw: u.vcsw + u.ivcsw,
        broker_ms: broker_cpu,
        io_cpu_us: (io.0 - io0.0) as f64 / 1e3,
        io_slices: io.1 - io0.1,
        caller_cpu_us: callers.cpu_us(),
        caller_vcsw: callers.vcsw,
        caller_ivcsw: callers.ivcsw,
    }
}

/// One raw socket: n × (open, qos, consume) in one write, until the n-th consume-ok.
fn floor(url: &str, queue: &str, n: usize, pieces: bool, broker: Option<&std::path::Path>) -> Run {
    let a = parse_addr(url);
    let mut c = RawClient::connect((a.host.as_str(), a.port), &a.user, &a.pass, &a.vhost)
        .expect("raw connect");
    let mut out = Vec::new();
    let mut ends = Vec::with_capacity(n);
    for ch in 1..=n as u16 {
        out.extend(frames::consumer_start_frames(ch, queue, PREFETCH));
        ends.push(out.len());
    }
    let io = c.io();
    let b0 = broker_ms(broker);
    let u0 = cpu::process();
    let t0 = Instant::now();
    if pieces {
        let mut at = 0;
        for end in ends {
            io.send(&out[at..end]).expect("send");
            at = end;
        }
    } else {
        io.send(&out).expect("send");
    }
    let mut ok = 0;
    while ok < n {
        let f = io
            .recv_frame(Instant::now() + Duration::from_secs(30))
            .expect("frame");
        if f.method_id() == Some((60, 21)) {
            ok += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let u = cpu::process().since(&u0);
    let broker_cpu = broker_ms(broker) - b0;
    let _ = io.send(&close_frame());
    while let Ok(f) = io.recv_frame(Instant::now() + Duration::from_secs(10)) {
        if f.method_id() == Some((10, 51)) {
            break;
        }
    }
    Run {
        secs,
        cpu_us: u.cpu_us(),
        csw: u.vcsw + u.ivcsw,
        broker_ms: broker_cpu,
        ..Run::default()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let three = args.iter().any(|a| a == "three");
    let suite = args.iter().any(|a| a == "suite");
    let mut nums = args.iter().filter_map(|a| a.parse::<usize>().ok());
    let rounds = nums.next().unwrap_or(5);
    let mut sizes: Vec<usize> = nums.collect();
    if sizes.is_empty() {
        sizes = vec![100, 500, 900];
    }
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let admin = Connection::open(&url).expect("connect");
    let ch = admin.open_channel().expect("admin channel");
    let broker = broker_pid();
    if broker.is_none() {
        eprintln!("no local broker process to read (its CPU shows as 0)");
    }
    // `alone`: open_consumer only (the floor's column repeats it), to profile lepus.
    let mut kinds = if args.iter().any(|a| a == "alone") {
        vec![Kind::Pipelined, Kind::Pipelined]
    } else {
        vec![Kind::Floor, Kind::Pipelined]
    };
    if three {
        kinds.push(Kind::Three);
    }
    if args.iter().any(|a| a == "floor-pieces") {
        kinds.push(Kind::FloorPieces);
    }
    if args.iter().any(|a| a == "release") {
        kinds.push(Kind::Release);
    }
    if suite {
        kinds.push(Kind::Suite);
        if args.iter().any(|a| a == "suite-parts") {
            kinds.push(Kind::SuiteSettled);
            kinds.push(Kind::SuiteNoPoll);
        }
    }
    let mut head = format!(
        "| N, medians of {rounds} | floor | open_consumer | / floor | barrier released | client CPU | switches |"
    );
    let mut rule = "|---|---|---|---|---|---|---|".to_string();
    for k in &kinds[2..] {
        head.push_str(&format!(" {} | / floor |", k.name()));
        rule.push_str("---|---|");
    }
    println!("{head}");
    println!("{rule}");
    let mut seq = 0;
    for &n in &sizes {
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); kinds.len()];
        for round in 0..rounds {
            for i in 0..kinds.len() {
                let k = (i + round) % kinds.len();
                seq += 1;
                let queue = format!("lepus-consumer-start.{}.{seq}", std::process::id());
                ch.queue_declare(&queue, &QueueDeclareOptions::default())
                    .expect("queue.declare");
                let run = match kinds[k] {
                    Kind::Floor => floor(&url, &queue, n, false, broker.as_deref()),
                    Kind::FloorPieces => floor(&url, &queue, n, true, broker.as_deref()),
                    kind => parallel(&url, &queue, n, kind, broker.as_deref()),
                };
                let _ = ch.queue_delete(&queue, &QueueDeleteOptions::default());
                eprintln!(
                    "n={n} round={round} kind={} secs={:.4} released={:.4} cpu_ms={:.1} csw={} \
                     callers: cpu_ms={:.1} vcsw={} ivcsw={} io: io_ms={:.1} slices={} broker: broker_ms={:.1} window_ns={}-{}",
                    kinds[k].name(),
                    run.secs,
                    run.released,
                    run.cpu_us / 1e3,
                    run.csw,
                    run.caller_cpu_us / 1e3,
                    run.caller_vcsw,
                    run.caller_ivcsw,
                    run.io_cpu_us / 1e3,
                    run.io_slices,
                    run.broker_ms,
                    run.window.0,
                    run.window.1,
                );
                runs[k].push(run);
                // Let the broker close the run's channels (hundreds of channel processes
                // to end) before the next run starts, so that no run pays for the one
                // before it: 300 ms, then until the broker uses under a fifth of a core
                // over 100 ms (at most 3 s more), as the suite's `settle` does.
                std::thread::sleep(Duration::from_millis(300));
                settle(broker.as_deref());
            }
        }
        let m = |k: usize, f: &dyn Fn(&Run) -> f64| median(runs[k].iter().map(f).collect());
        let fl = m(0, &|r| r.secs);
        let p = m(1, &|r| r.secs);
        let mut line = format!(
            "| {n} | {:.1} ms | {:.1} ms | {:.2}× | {:.1} ms | {:.1} ms | {:.0} |",
            fl * 1e3,
            p * 1e3,
            p / fl,
            m(1, &|r| r.released) * 1e3,
            m(1, &|r| r.cpu_us) / 1e3,
            m(1, &|r| r.csw as f64),
        );
        for k in 2..kinds.len() {
            let t = m(k, &|r| r.secs);
            line.push_str(&format!(" {:.1} ms | {:.2}× |", t * 1e3, t / fl));
        }
        println!("{line}");
    }
    let _ = admin.close();
}
