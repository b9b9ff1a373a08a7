//! Scenario 3, consume measured two ways, for lepus and each peer: **steady** (every
//! consumer registered, then the messages arrive and the broker pushes them to all) and
//! **drain** (the queue is filled first; the clock starts before the first consumer
//! registers). The producer is a raw socket in the suite (pre-encoded messages, large
//! writes), the same for every client, so a client's CPU time is its consumers' alone:
//! a peer runs in its own process; for lepus, in this process, the producer thread's
//! own CPU (RUSAGE_THREAD) is taken out.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use lepus::{ConsumeOptions, Dispatcher, Outcome, WorkerOptions};
use lepus_testkit::{RawClient, close_frame, frames};

use crate::ceiling::{drain_until_close_ok, handshake, write_chunked};
use crate::common::{self, connect, declare, delete, done, settle, spawn, step, thousands};
use crate::cpu::{self, Usage};
use crate::peers::Peers;
use crate::stats::{IdLedger, read_stamp, stamp_body};
use crate::throughput::{PREFETCH, now_ns};
use crate::{Results, Settings};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    Steady,
    Drain,
}

impl Way {
    pub fn arg(self) -> &'static str {
        match self {
            Way::Steady => "consume-steady",
            Way::Drain => "consume-drain",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Way::Steady => "steady (consumers registered, broker pushing)",
            Way::Drain => "drain (pre-filled queue, from registration)",
        }
    }
}

/// One consume-ways run of one client.
#[derive(Debug, Clone)]
pub struct WaysRun {
    pub client: String,
    pub round: usize,
    pub way: Way,
    pub consumers: usize,
    pub messages: usize,
    /// Steady: from the first write of the producer (lepus) or the peer's "ready" to
    /// the last delivery; drain: from before the first registration to the last delivery.
    pub secs: f64,
    /// The consuming client's CPU over `secs`.
    pub cpu: Usage,
    pub received: usize,
    pub duplicates: usize,
    pub errors: usize,
}

impl WaysRun {
    pub fn rate(&self) -> f64 {
        self.received as f64 / self.secs
    }
    pub fn cpu_us_per_msg(&self) -> f64 {
        self.cpu.cpu_us() / self.received.max(1) as f64
    }
}

/// A raw producer: `messages` stamped with ids 0.. (no send time: latency is measured by
/// scenario 3's first part), pre-encoded on channel 1 of its own connection.
pub struct RawProducer {
    client: RawClient,
    bytes: Vec<u8>,
}

impl RawProducer {
    pub fn new(url: &str, queue: &str, messages: usize) -> io::Result<RawProducer> {
        let client = handshake(&common::parse_addr(url), 1)?;
        let mut bytes = Vec::with_capacity(messages * (queue.len() + 120));
        for id in 0..messages {
            bytes.extend(frames::publish_frame(1, "", queue));
            let body = stamp_body(id as u64, 0, 64);
            bytes.extend(frames::content_frames(1, &frames::no_props(), &body, 0));
        }
        Ok(RawProducer { client, bytes })
    }

    /// Write every message (large writes); this thread's CPU for it.
    pub fn send(&mut self) -> io::Result<Usage> {
        let before = cpu::thread();
        let mut s = self.client.io().stream().try_clone()?;
        write_chunked(&mut s, &self.bytes)?;
        Ok(cpu::thread().since(&before))
    }

    pub fn close(mut self) {
        let _ = self.client.io().send(&close_frame());
        drain_until_close_ok(self.client.io());
    }
}

/// The client name of lepus with its consumers on a [`Dispatcher`].
pub const DISPATCH: &str = "lepus-dispatch";

/// Threads of that dispatcher: as many as the amqprs peer's tokio runtime has workers
/// (its default, one per core: 2 on the suite's machine).
pub fn dispatch_threads() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// lepus: `n` consumers (a channel each) on one connection, each served by a thread
/// of its own blocked in `recv`, or (`dispatch`) all by a [`Dispatcher`]'s threads.
pub fn lepus(
    url: &str,
    way: Way,
    n: usize,
    messages: usize,
    dispatch: bool,
) -> Result<WaysRun, String> {
    let admin_conn = connect(url);
    let admin = admin_conn.open_channel().expect("admin channel");
    let queue = common::unique("consume-ways");
    declare(&admin, &queue);
    let mut producer = RawProducer::new(url, &queue, messages).map_err(|e| e.to_string())?;
    if way == Way::Drain {
        producer.send().map_err(|e| e.to_string())?;
        common::wait_count(&admin, &queue, messages, Duration::from_secs(60))
            .ok_or("the queue was not filled")?;
    }
    let conn = connect(url);
    let dispatcher = dispatch
        .then(|| Dispatcher::new(&WorkerOptions::new(dispatch_threads())).map(Arc::new))
        .transpose()
        .map_err(|e| e.to_string())?;
    let received = Arc::new(AtomicUsize::new(0));
    let last_ns = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let registered = Arc::new(AtomicUsize::new(0));
    // Steady: consumers wait here until every one is registered; drain: they start at once.
    let ready = Arc::new(Barrier::new(if way == Way::Drain { 1 } else { n + 1 }));
    let (mut cpu0, mut start_ns) = (cpu::process(), now_ns());
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (conn, queue, ready) = (conn.clone(), queue.clone(), ready.clone());
            let (received, last_ns, errors) = (received.clone(), last_ns.clone(), errors.clone());
            let (registered, dispatcher) = (registered.clone(), dispatcher.clone());
            spawn("consumer", move || {
                let mut ledger = IdLedger::new(messages);
                // Channel open, qos and consume in one round trip (what a lepus user
                // starting many consumers writes).
                let started = conn
                    .open_consumer(&queue, PREFETCH, &ConsumeOptions::default())
                    .map(|c| ((), c));
                registered.fetch_add(1, Ordering::AcqRel);
                ready.wait();
                let Ok((_ch, consumer)) = started else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return Arc::new(Mutex::new(ledger));
                };
                if let Some(dispatcher) = dispatcher {
                    // The same work per delivery in the dispatcher's handler (which acks
                    // by the outcome; a failed ack shows in its stats).
                    let ledger = Arc::new(Mutex::new(ledger));
                    let (kept, failed) = (ledger.clone(), errors.clone());
                    let added = dispatcher.add(consumer, move |d| {
                        let ok = matches!(read_stamp(d.body()),
                            Some((id, _)) if ledger.lock().unwrap().record(id));
                        if !ok {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        last_ns.fetch_max(now_ns(), Ordering::AcqRel);
                        received.fetch_add(1, Ordering::AcqRel);
                        Outcome::Ack
                    });
                    if added.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    return kept;
                }
                // Until the connection closes.
                while let Ok(d) = consumer.recv() {
                    match read_stamp(d.body()) {
                        Some((id, _)) if ledger.record(id) => {}
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if d.ack().is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    last_ns.fetch_max(now_ns(), Ordering::AcqRel);
                    received.fetch_add(1, Ordering::AcqRel);
                }
                Arc::new(Mutex::new(ledger))
            })
        })
        .collect();
    ready.wait();
    let mut producer_cpu = Usage::default();
    if way == Way::Steady {
        (cpu0, start_ns) = (cpu::process(), now_ns());
        producer_cpu = producer.send().map_err(|e| e.to_string())?;
    }
    let deadline = Instant::now() + Duration::from_secs(30 + messages as u64 / 500);
    while received.load(Ordering::Acquire) < messages && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
    }
    let cpu = cpu::process().since(&cpu0).minus(&producer_cpu);
    // A drain's first consumers may empty the queue before the last ones register: let
    // every registration finish before the close, so that none fails because of it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while registered.load(Ordering::Acquire) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
    }
    let handled = dispatcher.map(|d| d.stats());
    let _ = conn.close();
    let mut ledger = IdLedger::new(messages);
    for h in handles {
        let one = h.join().map_err(|_| "consumer thread panicked")?;
        ledger.merge(&one.lock().unwrap());
    }
    let settle_failed = handled.map_or(0, |s| s.settle_failed as usize);
    producer.close();
    delete(&admin, &queue);
    let _ = admin_conn.close();
    Ok(WaysRun {
        client: if dispatch { DISPATCH } else { "lepus" }.into(),
        round: 0,
        way,
        consumers: n,
        messages,
        secs: last_ns.load(Ordering::Acquire).saturating_sub(start_ns) as f64 / 1e9,
        cpu,
        received: ledger.unique(),
        duplicates: ledger.duplicates(),
        errors: errors.load(Ordering::Relaxed) + settle_failed,
    })
}

/// A peer (its own process): the suite declares the queue and produces.
pub fn peer(
    url: &str,
    peers: &Peers,
    client: &str,
    way: Way,
    n: usize,
    messages: usize,
) -> Result<WaysRun, String> {
    let admin_conn = connect(url);
    let admin = admin_conn.open_channel().expect("admin channel");
    let queue = common::unique("consume-ways");
    declare(&admin, &queue);
    let mut producer = RawProducer::new(url, &queue, messages).map_err(|e| e.to_string())?;
    if way == Way::Drain {
        producer.send().map_err(|e| e.to_string())?;
        common::wait_count(&admin, &queue, messages, Duration::from_secs(60))
            .ok_or("the queue was not filled")?;
    }
    let mut produce = || producer.send().map(|_| ()).map_err(|e| e.to_string());
    let v = peers.consume_way(client, way.arg(), &queue, n, messages, &mut produce);
    producer.close();
    delete(&admin, &queue);
    let _ = admin_conn.close();
    let v = v?;
    Ok(WaysRun {
        client: client.to_owned(),
        round: 0,
        way,
        consumers: n,
        messages,
        secs: v["secs"].as_f64().unwrap_or(f64::NAN),
        cpu: crate::peers::usage(&v["cpu"]),
        received: v["received"].as_u64().unwrap_or(0) as usize,
        duplicates: v["duplicates"].as_u64().unwrap_or(0) as usize,
        errors: v["errors"].as_u64().unwrap_or(0) as usize,
    })
}

/// Every consume-ways run: each way, each consumer count, lepus and the peers
/// interleaved over the rounds.
pub fn scenario(s: &Settings, r: &mut Results, peers: Option<&Peers>) {
    let messages = s.size(20_000, 3_000);
    let mut jobs = Vec::new();
    for round in 0..s.rounds {
        for way in [Way::Steady, Way::Drain] {
            for &c in &r.consumer_counts {
                let mut clients = vec!["lepus".to_string(), DISPATCH.to_string()];
                if s.wants(6) {
                    clients.extend(peers.map(|p| p.clients.clone()).unwrap_or_default());
                }
                let k = round % clients.len();
                clients.rotate_left(k);
                for client in clients {
                    jobs.push((round, way, c, client));
                }
            }
        }
    }
    let n = jobs.len();
    for (i, (round, way, c, client)) in jobs.into_iter().enumerate() {
        settle();
        step(
            i + 1,
            n,
            &format!(
                "round {}/{}: consume {}, {c} consumers, {messages} messages — {client}",
                round + 1,
                s.rounds,
                way.arg()
            ),
        );
        let run = match (client.as_str(), peers) {
            ("lepus", _) => lepus(&s.url, way, c, messages, false),
            (DISPATCH, _) => lepus(&s.url, way, c, messages, true),
            (_, Some(p)) => peer(&s.url, p, &client, way, c, messages),
            (_, None) => Err("the peers are not built".into()),
        };
        match run {
            Ok(mut run) => {
                run.round = round;
                done(&format!(
                    "{} msg/s, CPU {:.2} µs/msg, received {}/{}",
                    thousands(run.rate()),
                    run.cpu_us_per_msg(),
                    run.received,
                    messages
                ));
                if run.received < messages || run.errors > 0 {
                    r.errors.push(format!(
                        "{client} {} {c} (round {}): received {} of {messages}, {} errors",
                        way.arg(),
                        round + 1,
                        run.received,
                        run.errors
                    ));
                }
                r.consume_ways.push(run);
            }
            Err(e) => {
                done(&format!("failed: {e}"));
                r.errors.push(format!("{client} {} {c}: {e}", way.arg()));
            }
        }
    }
}
