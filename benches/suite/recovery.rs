//! Scenario 4 (recovery by failure type, faults injected through the proxy while
//! publishers with confirms are running) and the repeated-recovery part of scenario 5.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use lepus::{BasicProperties, Connection, PublishOptions, RecoveryEventKind, RecoveryOptions};
use lepus_testkit::Proxy;

use crate::common::{self, declare, delete, join_all, spawn};
use crate::stats::{Percentiles, Samples};

/// The broker's socket address (for the proxy).
pub fn broker_addr(url: &str) -> SocketAddr {
    let a = common::parse_addr(url);
    (a.host.as_str(), a.port)
        .to_socket_addrs()
        .expect("resolve the broker address")
        .next()
        .expect("the broker address resolves")
}

/// Recovery events as they happen (the connection's own log keeps only 4096).
#[derive(Clone, Default)]
pub struct EventSink {
    pub events: Arc<Mutex<Vec<(Instant, u64, RecoveryEventKind)>>>,
}

impl EventSink {
    pub fn options(&self) -> RecoveryOptions {
        let ev = self.events.clone();
        RecoveryOptions::new().listener(move |e| {
            ev.lock()
                .unwrap()
                .push((e.at, e.generation, e.kind.clone()));
        })
    }
    /// First event of `generation` matching `pred`.
    pub fn first(
        &self,
        generation: u64,
        pred: impl Fn(&RecoveryEventKind) -> bool,
    ) -> Option<Instant> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|(_, g, k)| *g == generation && pred(k))
            .map(|(at, _, _)| *at)
    }
    /// When generation `g` was detected as failed, if it was.
    pub fn failed_at(&self, g: u64) -> Option<Instant> {
        self.first(g, |k| matches!(k, RecoveryEventKind::FailureDetected(_)))
    }
}

/// A fault proxy in front of the broker.
pub fn start_proxy(url: &str) -> Proxy {
    Proxy::start(broker_addr(url)).expect("start the fault proxy")
}

/// RST every link through `proxy`; returns the instant just before the first reset.
pub fn reset_all(proxy: &Proxy) -> Instant {
    let at = Instant::now();
    proxy.reset();
    at
}

/// A connection to the broker through `proxy`, recovering, with heartbeat `hb`.
pub fn proxied(url: &str, proxy: &Proxy, hb: u16, sink: &EventSink) -> Connection {
    Connection::open_with(
        common::options(url)
            .host("127.0.0.1")
            .port(proxy.port())
            .heartbeat(hb)
            .operation_timeout(Duration::from_secs(20))
            .connection_name("lepus-bench-recovery")
            .recovery(sink.options()),
    )
    .expect("connect through the proxy")
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    Rst,
    /// Partition for this long, then heal (heartbeat 1 s).
    Partition(Duration),
    /// This much latency per relayed chunk for `lead`, then RST (latency stays on).
    LatencyThenRst(Duration),
    /// Bandwidth capped (bytes/s) with 5 ms latency for `lead`, then RST (stays on).
    SlowThenRst(u64),
}

impl Fault {
    pub fn label(&self) -> String {
        match self {
            Fault::Rst => "TCP RST".into(),
            Fault::Partition(d) => format!("Partition {:.1} s (heartbeat 1 s)", d.as_secs_f64()),
            Fault::LatencyThenRst(l) => format!("Latency {} ms, then RST", l.as_millis()),
            Fault::SlowThenRst(r) => format!("Slow network ({} KB/s, +5 ms), then RST", r / 1024),
        }
    }
    pub fn short(&self) -> &'static str {
        match self {
            Fault::Rst => "RST",
            Fault::Partition(_) => "partition",
            Fault::LatencyThenRst(_) => "latency+RST",
            Fault::SlowThenRst(_) => "slow+RST",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RecoveryRun {
    pub fault: Fault,
    pub threads: usize,
    /// FailureDetected - injection.
    pub detection_ms: f64,
    /// The library's WaitersWoken event - injection.
    pub woken_ms: f64,
    /// The new connection's handshake done (`Connected`) - injection.
    pub connected_ms: f64,
    /// Channels, qos, confirm mode and consumers restored (`ConsumersRestored`) - injection.
    pub restored_ms: f64,
    /// Threads that were waiting on the link and got an error.
    pub told: usize,
    /// The last of them: its error - injection.
    pub told_last_ms: f64,
    /// First successful confirmed publish on the verified new connection - injection.
    pub recovery_first_ms: f64,
    /// The last thread's first success on the new connection - injection.
    pub recovery_all_ms: f64,
    pub recovered_threads: usize,
    pub new_connection: bool,
    pub generations: (u64, u64),
    pub deadlocks: usize,
}

struct ThreadOutcome {
    /// When calls failed (the first few), judged against the injection time afterwards
    /// so that no error is missed while the harness records that time.
    errors_at: Vec<Instant>,
    /// The first success on a verified new connection.
    recovered_at: Option<Instant>,
}

/// T publishers (confirm each) through the proxy; inject `fault`; measure.
pub fn run(url: &str, fault: Fault, threads: usize) -> RecoveryRun {
    let proxy = start_proxy(url);
    let sink = EventSink::default();
    let hb = if matches!(fault, Fault::Partition(_)) {
        1
    } else {
        10
    };
    let conn = proxied(url, &proxy, hb, &sink);
    let admin = conn.open_channel().expect("admin channel");
    let queue = common::unique("recovery");
    declare(&admin, &queue);
    let g0 = conn.generation();
    let a0 = conn.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (conn, queue, stop, barrier) =
                (conn.clone(), queue.clone(), stop.clone(), barrier.clone());
            spawn("recovery-publisher", move || {
                let ch = conn.open_channel().expect("publisher channel");
                ch.confirm_select().expect("confirm.select");
                let props = BasicProperties::new();
                let mut out = ThreadOutcome {
                    errors_at: Vec::new(),
                    recovered_at: None,
                };
                barrier.wait();
                while !stop.load(Ordering::Acquire) {
                    let r = ch
                        .basic_publish_confirmed(
                            "",
                            &queue,
                            b"x",
                            &props,
                            &PublishOptions::default(),
                        )
                        .and_then(|c| c.wait());
                    let now = Instant::now();
                    match r {
                        Err(_) => {
                            if out.recovered_at.is_none() && out.errors_at.len() < 64 {
                                out.errors_at.push(now);
                            }
                        }
                        Ok(_) => {
                            if out.recovered_at.is_none()
                                && conn.generation() > g0
                                && conn.local_addr() != a0
                            {
                                out.recovered_at = Some(now);
                            }
                        }
                    }
                    if out.recovered_at.is_some() {
                        // Traffic goes on, gently, until the case ends.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                let _ = ch.close();
                out
            })
        })
        .collect();
    barrier.wait();
    std::thread::sleep(Duration::from_millis(200));
    let inject_at = match fault {
        Fault::Rst => reset_all(&proxy),
        Fault::Partition(d) => {
            let at = Instant::now();
            proxy.partition();
            std::thread::sleep(d);
            proxy.heal();
            at
        }
        Fault::LatencyThenRst(l) => {
            proxy.set_latency(l, Duration::ZERO);
            std::thread::sleep(Duration::from_millis(500));
            reset_all(&proxy)
        }
        Fault::SlowThenRst(rate) => {
            proxy.set_bandwidth(Some(rate));
            proxy.set_latency(Duration::from_millis(5), Duration::ZERO);
            std::thread::sleep(Duration::from_millis(500));
            reset_all(&proxy)
        }
    };
    // Wait (bounded) until the new connection is in use, then give every thread time
    // to get a publish through it.
    let limit = Instant::now() + Duration::from_secs(30);
    while Instant::now() < limit && !(conn.generation() > g0 && conn.is_open()) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(match fault {
        Fault::Rst | Fault::Partition(_) => 300,
        _ => 1500,
    }));
    stop.store(true, Ordering::Release);
    let (outs, deadlocks) = join_all(handles, Instant::now() + Duration::from_secs(30));
    let ms = |t: Option<Instant>| {
        t.map(|t| t.saturating_duration_since(inject_at).as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    };
    // Told: a thread's first error at or after the injection.
    let told: Vec<Instant> = outs
        .iter()
        .filter_map(|o| o.errors_at.iter().copied().find(|t| *t >= inject_at))
        .collect();
    let rec: Vec<Instant> = outs.iter().filter_map(|o| o.recovered_at).collect();
    let g1 = conn.generation();
    let run = RecoveryRun {
        fault,
        threads,
        detection_ms: ms(sink.failed_at(g0)),
        woken_ms: ms(sink.first(g0, |k| *k == RecoveryEventKind::WaitersWoken)),
        connected_ms: ms(sink.first(g1, |k| matches!(k, RecoveryEventKind::Connected { .. }))),
        restored_ms: ms(sink.first(g1, |k| {
            matches!(k, RecoveryEventKind::ConsumersRestored { .. })
        })),
        told: told.len(),
        told_last_ms: ms(told.iter().max().copied()),
        recovery_first_ms: ms(rec.iter().min().copied()),
        recovery_all_ms: ms(rec.iter().max().copied()),
        recovered_threads: rec.len(),
        new_connection: g1 > g0 && conn.local_addr() != a0,
        generations: (g0, g1),
        deadlocks,
    };
    proxy.pass_through();
    delete(&admin, &queue);
    let _ = conn.close();
    drop(proxy);
    run
}

#[derive(Debug, Clone)]
pub struct RepeatedRun {
    pub iterations: usize,
    /// Reconnects verified: generation increased and a new local address.
    pub verified: usize,
    pub failed: usize,
    pub lat: Percentiles,
    pub stale_errors: usize,
    pub other_errors: usize,
    pub secs: f64,
    /// Links the proxy accepted during the iterations (one per real reconnect).
    pub links_accepted: u64,
}

/// `n` times: reset the link while a publisher runs, then publish (confirmed) until it
/// succeeds on a verified new connection; the time from the reset to that success.
pub fn repeated(url: &str, n: usize) -> RepeatedRun {
    let proxy = start_proxy(url);
    let sink = EventSink::default();
    let conn = proxied(url, &proxy, 10, &sink);
    let admin = conn.open_channel().expect("admin channel");
    let queue = common::unique("repeated");
    declare(&admin, &queue);
    let ch = conn.open_channel().expect("channel");
    ch.confirm_select().expect("confirm.select");
    let checker = StaleChecker::new(conn.clone(), sink.clone());
    // Background traffic on a channel of its own.
    let stop = Arc::new(AtomicBool::new(false));
    let bg_ch = conn.open_channel().expect("traffic channel");
    bg_ch.confirm_select().expect("confirm.select");
    let bg = {
        let (queue, stop, checker) = (queue.clone(), stop.clone(), checker.clone());
        let ch = bg_ch;
        spawn("traffic", move || {
            while !stop.load(Ordering::Acquire) {
                let op = checker.begin();
                let r = ch
                    .basic_publish_confirmed(
                        "",
                        &queue,
                        b"bg",
                        &BasicProperties::new(),
                        &PublishOptions::default(),
                    )
                    .and_then(|c| c.wait());
                checker.end(op, r.err());
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let props = BasicProperties::new();
    let mut lat = Samples::with_capacity(n);
    let (mut verified, mut failed) = (0, 0);
    let started = Instant::now();
    let accepted_before = proxy.connections() as u64;
    for i in 0..n {
        if n >= 10 && i % (n / 10).max(1) == 0 {
            common::note(&format!("repeated recovery {i}/{n}"));
        }
        let g0 = conn.generation();
        let a0 = conn.local_addr();
        let at = reset_all(&proxy);
        let limit = at + Duration::from_secs(20);
        let mut ok = false;
        while Instant::now() < limit {
            let op = checker.begin();
            let r = ch
                .basic_publish_confirmed("", &queue, b"probe", &props, &PublishOptions::default())
                .and_then(|c| c.wait());
            let now = Instant::now();
            let was_ok = r.is_ok();
            checker.end(op, r.err());
            if was_ok && conn.generation() > g0 && conn.local_addr() != a0 {
                lat.push(now - at);
                ok = true;
                break;
            }
        }
        if ok {
            verified += 1;
        } else {
            failed += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let links_accepted = proxy.connections() as u64 - accepted_before;
    stop.store(true, Ordering::Release);
    let _ = join_all(vec![bg], Instant::now() + Duration::from_secs(30));
    let (stale, other) = checker.counts();
    let _ = admin.queue_purge(&queue);
    delete(&admin, &queue);
    let _ = conn.close();
    RepeatedRun {
        iterations: n,
        verified,
        failed,
        lat: Percentiles::of(&mut lat),
        stale_errors: stale,
        other_errors: other,
        secs,
        links_accepted,
    }
}

/// Counts stale errors: an operation that began while generation `g` was open, and
/// failed with a lost connection although `g` had not failed by then (so the error can
/// only have come from an earlier generation).
#[derive(Clone)]
pub struct StaleChecker {
    conn: Connection,
    sink: EventSink,
    counts: Arc<Mutex<(usize, usize)>>,
}

pub struct Op {
    generation: Option<u64>,
}

impl StaleChecker {
    pub fn new(conn: Connection, sink: EventSink) -> Self {
        StaleChecker {
            conn,
            sink,
            counts: Arc::new(Mutex::new((0, 0))),
        }
    }
    pub fn begin(&self) -> Op {
        let g = self.conn.generation();
        let open = self.conn.is_open();
        let same = self.conn.generation() == g;
        Op {
            generation: (open && same).then_some(g),
        }
    }
    pub fn end(&self, op: Op, err: Option<lepus::Error>) {
        let Some(e) = err else { return };
        let now = Instant::now();
        let stale = e.is_connection_lost()
            && op
                .generation
                .is_some_and(|g| self.sink.failed_at(g).is_none_or(|t| t > now));
        let mut c = self.counts.lock().unwrap();
        if stale {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }
    /// (stale errors, other errors)
    pub fn counts(&self) -> (usize, usize) {
        *self.counts.lock().unwrap()
    }
}
