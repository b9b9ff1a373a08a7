//! Scenarios 1-3 for lepus: publish throughput (no confirms, confirm each, confirm
//! windows), the channel pool, massive consumers. The peers run the same procedures in
//! benches/peers.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lepus::{BasicProperties, ChannelPool, ConsumeOptions, PublishOptions};

use crate::common::{self, connect, declare, delete, spawn, wait_count};
use crate::gate::Gate;
use crate::stats::{IdLedger, Percentiles, Samples, read_stamp, stamp_body};

/// How publishers wait for confirms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No confirms.
    None,
    /// Wait for each message's confirm.
    Each,
    /// `wait_for_confirms` every this many messages (and at the end).
    Window(usize),
}

impl Mode {
    pub fn arg(self) -> String {
        match self {
            Mode::None => "none".into(),
            Mode::Each => "each".into(),
            Mode::Window(n) => format!("window:{n}"),
        }
    }
    pub fn label(self) -> String {
        match self {
            Mode::None => "no confirms".into(),
            Mode::Each => "confirm, wait each".into(),
            Mode::Window(n) => format!("confirm, window {n}"),
        }
    }
}

/// One publish run of one client.
#[derive(Debug, Clone)]
pub struct PublishRun {
    pub client: String,
    /// Round of the interleaved comparison this run belongs to.
    pub round: usize,
    pub mode: Mode,
    pub threads: usize,
    pub per_thread: usize,
    pub call_secs: f64,
    /// Until the queue held every message; NaN if it never did (within the timeout).
    pub absorbed_secs: f64,
    pub lat: Percentiles,
    pub errors: usize,
    /// The first error the client reported, if it said (peers: a line of stderr).
    pub first_error: Option<String>,
    /// The client process's CPU from the start barrier until every call returned and one
    /// RPC on the same connection came back (everything written; the polling for the
    /// absorbed time is not in it). lepus: the suite process; a peer: its own process.
    pub cpu: crate::cpu::Usage,
}

impl PublishRun {
    pub fn messages(&self) -> usize {
        self.threads * self.per_thread
    }
    pub fn call_rate(&self) -> f64 {
        self.messages() as f64 / self.call_secs
    }
    pub fn absorbed_rate(&self) -> f64 {
        self.messages() as f64 / self.absorbed_secs
    }
    /// User + system CPU time of the client per message, µs.
    pub fn cpu_us_per_msg(&self) -> f64 {
        self.cpu.cpu_us() / self.messages() as f64
    }
}

pub const BODY: usize = 64;

/// T threads x M messages on one connection, a channel each, 64-byte bodies.
pub fn publish(url: &str, threads: usize, per_thread: usize, mode: Mode) -> PublishRun {
    let conn = connect(url);
    let admin = conn.open_channel().expect("admin channel");
    let queue = common::unique("publish");
    declare(&admin, &queue);
    // Two barriers: every thread opens its channel (and selects confirms) before `ready`,
    // and the clock and the CPU figure start only after that, as the peers' do (amiquip
    // and amqprs open every channel before they spawn). With one barrier the channel opens
    // of the threads not yet ready were inside the measured interval: at 900 threads, 900
    // channel.open round trips, most of lepus's measured time and CPU there.
    let ready = Arc::new(Barrier::new(threads + 1));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let errors = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (conn, queue, ready, barrier, errors) = (
                conn.clone(),
                queue.clone(),
                ready.clone(),
                barrier.clone(),
                errors.clone(),
            );
            spawn("publisher", move || {
                let ch = conn.open_channel().expect("open a publisher channel");
                if mode != Mode::None {
                    ch.confirm_select().expect("confirm.select");
                }
                let body = [7u8; BODY];
                let props = BasicProperties::new();
                let mut lat = Samples::with_capacity(per_thread);
                let mut window: Vec<Instant> = Vec::new();
                ready.wait();
                barrier.wait();
                for i in 0..per_thread {
                    let t0 = Instant::now();
                    let ok = match mode {
                        Mode::None => ch
                            .basic_publish("", &queue, &body, &props, &PublishOptions::default())
                            .is_ok(),
                        Mode::Each => ch
                            .basic_publish_confirmed(
                                "",
                                &queue,
                                &body,
                                &props,
                                &PublishOptions::default(),
                            )
                            .and_then(|c| c.wait())
                            .is_ok(),
                        Mode::Window(w) => {
                            let ok = ch
                                .basic_publish(
                                    "",
                                    &queue,
                                    &body,
                                    &props,
                                    &PublishOptions::default(),
                                )
                                .is_ok();
                            window.push(t0);
                            if window.len() == w || i + 1 == per_thread {
                                let all = ch.wait_for_confirms().is_ok();
                                let now = Instant::now();
                                for t in window.drain(..) {
                                    lat.push(now - t);
                                }
                                if !all {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            ok
                        }
                    };
                    if !matches!(mode, Mode::Window(_)) {
                        lat.push(t0.elapsed());
                    }
                    if !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                (lat, ch)
            })
        })
        .collect();
    ready.wait();
    let cpu0 = crate::cpu::process();
    // The clock starts before the release: a worker may finish before this thread
    // runs again after the barrier (on a loaded machine), and must not be missed.
    let start = Instant::now();
    barrier.wait();
    let mut lat = Samples::with_capacity(threads * per_thread);
    let mut channels = Vec::with_capacity(threads);
    for h in handles {
        let (l, ch) = h.join().expect("publisher thread");
        lat.extend(l);
        channels.push(ch);
    }
    let call = start.elapsed();
    // One RPC on the same connection: its reply comes after every queued publish was
    // written. The CPU figure ends here, before the polling below (harness work).
    let _ = common::message_count(&admin, &queue);
    let cpu = crate::cpu::process().since(&cpu0);
    let total = threads * per_thread;
    let absorbed = wait_count(&admin, &queue, total, Duration::from_secs(120))
        .map(|t| (t - start).as_secs_f64())
        .unwrap_or(f64::NAN);
    delete(&admin, &queue);
    drop(channels);
    let _ = conn.close();
    PublishRun {
        client: "lepus".into(),
        round: 0,
        mode,
        threads,
        per_thread,
        call_secs: call.as_secs_f64(),
        absorbed_secs: absorbed,
        lat: Percentiles::of(&mut lat),
        errors: errors.load(Ordering::Relaxed),
        first_error: None,
        cpu,
    }
}

/// One channel-pool run.
#[derive(Debug, Clone)]
pub struct PoolRun {
    pub threads: usize,
    pub per_thread: usize,
    pub pool_size: usize,
    pub secs: f64,
    pub lat: Percentiles,
    pub errors: usize,
    pub opened: u64,
}

impl PoolRun {
    pub fn ops(&self) -> usize {
        self.threads * self.per_thread
    }
    pub fn rate(&self) -> f64 {
        self.ops() as f64 / self.secs
    }
}

/// One pool pair in this many is timed for the latency percentiles (the last of each
/// run of them: not a thread's first pair after the barrier, every time). A pair costs a few
/// hundred nanoseconds, so reading the clock twice and storing a sample for every pair
/// was a large share of what the throughput figure measured (5.0 M pairs/s with every
/// pair timed against 8.0 M from `benches/pool_pairs`, same build, 100 threads).
pub const POOL_TIMED_EVERY: usize = 8;

/// T threads x N acquire/release pairs on a pool of the default size, opened beforehand.
pub fn pool(url: &str, threads: usize, per_thread: usize) -> PoolRun {
    let conn = connect(url);
    let pool = ChannelPool::new(&conn);
    // Open every channel of the pool first: the figure is the steady state, not the
    // round trips of the first channel.open of each.
    let warm: Vec<_> = (0..pool.max())
        .map(|_| pool.acquire().expect("warm the pool"))
        .collect();
    drop(warm);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let errors = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (pool, barrier, errors) = (pool.clone(), barrier.clone(), errors.clone());
            spawn("pool-user", move || {
                let mut lat = Samples::with_capacity(per_thread / POOL_TIMED_EVERY + 1);
                barrier.wait();
                for i in 0..per_thread {
                    let t0 = (i % POOL_TIMED_EVERY == POOL_TIMED_EVERY - 1).then(Instant::now);
                    match pool.acquire() {
                        Ok(g) => drop(g),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if let Some(t0) = t0 {
                        lat.push(t0.elapsed());
                    }
                }
                lat
            })
        })
        .collect();
    // The clock starts before the release: a worker may finish before this thread
    // runs again after the barrier (on a loaded machine), and must not be missed.
    let start = Instant::now();
    barrier.wait();
    let per_thread_lat: Vec<Samples> = handles
        .into_iter()
        .map(|h| h.join().expect("pool thread"))
        .collect();
    let secs = start.elapsed().as_secs_f64();
    // Merged after the clock stopped: copying the samples is the harness's work.
    let mut lat = Samples::with_capacity(threads * (per_thread / POOL_TIMED_EVERY + 1));
    for l in per_thread_lat {
        lat.extend(l);
    }
    let stats = pool.stats();
    drop(pool);
    let _ = conn.close();
    PoolRun {
        threads,
        per_thread,
        pool_size: lepus::DEFAULT_POOL_SIZE,
        secs,
        lat: Percentiles::of(&mut lat),
        errors: errors.load(Ordering::Relaxed),
        opened: stats.opened,
    }
}

/// One massive-consumers run of one client.
#[derive(Debug, Clone)]
pub struct ConsumeRun {
    pub client: String,
    pub round: usize,
    pub consumers: usize,
    pub messages: usize,
    pub startup_secs: f64,
    pub produce_secs: f64,
    /// From the first publish to the last delivery received.
    pub consume_secs: f64,
    pub lat: Percentiles,
    pub received: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub errors: usize,
    pub first_error: Option<String>,
}

impl ConsumeRun {
    pub fn produce_rate(&self) -> f64 {
        self.messages as f64 / self.produce_secs
    }
    pub fn consume_rate(&self) -> f64 {
        self.received as f64 / self.consume_secs
    }
}

/// Nanoseconds since a process-wide origin (the clock of body timestamps).
pub fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub const PREFETCH: u16 = 50;

/// N consumers on one connection (a channel each) on one queue, one producer publishing
/// `messages` stamped with an id and the send time.
///
/// `dispatch`: the started consumers are served by a [`lepus::Dispatcher`] of one thread
/// per core (client `lepus-dispatch`) instead of a thread each blocked in `recv`.
pub fn consumers(url: &str, n: usize, messages: usize, dispatch: bool) -> ConsumeRun {
    let conn = connect(url);
    let dispatcher = dispatch.then(|| {
        Arc::new(
            lepus::Dispatcher::new(&lepus::WorkerOptions::new(
                crate::consume_ways::dispatch_threads(),
            ))
            .expect("dispatcher"),
        )
    });
    let admin = conn.open_channel().expect("admin channel");
    let queue = common::unique("consume");
    declare(&admin, &queue);
    let barrier = Arc::new(Barrier::new(n + 1));
    // Threads at the barrier, and the gate the started consumers wait at until every
    // consumer has started (see below).
    let arrived = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Gate::default());
    let ready = Arc::new(AtomicUsize::new(0));
    let last_ready = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let last_recv = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let errors = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let conn = conn.clone();
            let queue = queue.clone();
            let (barrier, ready, last_ready) = (barrier.clone(), ready.clone(), last_ready.clone());
            let (arrived, gate) = (arrived.clone(), gate.clone());
            let (received, last_recv, stop, errors) = (
                received.clone(),
                last_recv.clone(),
                stop.clone(),
                errors.clone(),
            );
            let dispatcher = dispatcher.clone();
            spawn("consumer", move || {
                let mut ledger = IdLedger::new(messages);
                let mut lat = Samples::with_capacity(messages / n + 16);
                arrived.fetch_add(1, Ordering::AcqRel);
                barrier.wait();
                // Channel open, qos and consume in one round trip (what a lepus user
                // starting many consumers writes).
                let started = conn
                    .open_consumer(&queue, PREFETCH, &ConsumeOptions::default())
                    .map(|c| ((), c));
                let (_ch, consumer) = match started {
                    Ok(x) => x,
                    Err(e) => {
                        common::note(&format!("consumer failed to start: {e}"));
                        errors.fetch_add(1, Ordering::Relaxed);
                        ready.fetch_add(1, Ordering::AcqRel);
                        return Arc::new(Mutex::new((ledger, lat)));
                    }
                };
                last_ready.fetch_max(now_ns(), Ordering::AcqRel);
                ready.fetch_add(1, Ordering::AcqRel);
                gate.wait();
                if let Some(dispatcher) = dispatcher {
                    // The same work per delivery in the dispatcher's handler (which acks
                    // by its outcome); this thread's part is over.
                    let state = Arc::new(Mutex::new((ledger, lat)));
                    let (kept, failed) = (state.clone(), errors.clone());
                    let added = dispatcher.add(consumer, move |d| {
                        let now = now_ns();
                        let mut st = state.lock().unwrap();
                        match read_stamp(d.body()) {
                            Some((id, sent)) if st.0.record(id) => {
                                st.1.push_ns(now.saturating_sub(sent));
                            }
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        last_recv.fetch_max(now, Ordering::AcqRel);
                        received.fetch_add(1, Ordering::AcqRel);
                        lepus::Outcome::Ack
                    });
                    if added.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    return kept;
                }
                while !stop.load(Ordering::Acquire) {
                    match consumer.recv_timeout(Duration::from_millis(20)) {
                        Ok(Some(d)) => {
                            let now = now_ns();
                            match read_stamp(d.body()) {
                                Some((id, sent)) if ledger.record(id) => {
                                    lat.push_ns(now.saturating_sub(sent));
                                }
                                _ => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            if d.ack().is_err() {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                            last_recv.fetch_max(now, Ordering::AcqRel);
                            received.fetch_add(1, Ordering::AcqRel);
                        }
                        Ok(None) => {}
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                Arc::new(Mutex::new((ledger, lat)))
            })
        })
        .collect();
    // Startup counts from the release of the threads, every one of them waiting at the
    // barrier (making a thread and its ledger is the harness's, not the start's), to the
    // last consume-ok. Started consumers wait at the gate until then: 900 threads each
    // polling every 20 ms while the others start would be the harness's CPU, taken from
    // the broker on this machine, and counted as startup.
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrived.load(Ordering::Acquire) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    let start_ns = now_ns();
    barrier.wait();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.load(Ordering::Acquire) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    let startup = (last_ready.load(Ordering::Acquire).saturating_sub(start_ns)) as f64 / 1e9;
    gate.open();

    // One producer.
    let producer = conn.open_channel().expect("producer channel");
    let props = BasicProperties::new();
    let first_ns = now_ns();
    for id in 0..messages {
        let body = stamp_body(id as u64, now_ns(), 64);
        if producer
            .basic_publish("", &queue, &body, &props, &PublishOptions::default())
            .is_err()
        {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    let produce = (now_ns() - first_ns) as f64 / 1e9;
    let deadline = Instant::now() + Duration::from_secs(30 + messages as u64 / 500);
    while received.load(Ordering::Acquire) < messages && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
    }
    // Give duplicates, if any, a moment to show up.
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Release);
    let settle_failed = dispatcher.map_or(0, |d| d.stats().settle_failed as usize);
    let mut ledger = IdLedger::new(messages);
    let mut lat = Samples::with_capacity(messages);
    for h in handles {
        let state = h.join().expect("consumer thread");
        let mut st = state.lock().unwrap();
        ledger.merge(&st.0);
        lat.extend(std::mem::take(&mut st.1));
    }
    let consume = (last_recv.load(Ordering::Acquire).saturating_sub(first_ns)) as f64 / 1e9;
    delete(&admin, &queue);
    let _ = conn.close();
    ConsumeRun {
        client: if dispatch {
            crate::consume_ways::DISPATCH
        } else {
            "lepus"
        }
        .into(),
        round: 0,
        consumers: n,
        messages,
        startup_secs: startup,
        produce_secs: produce,
        consume_secs: consume,
        lat: Percentiles::of(&mut lat),
        received: ledger.unique(),
        lost: ledger.missing(),
        duplicates: ledger.duplicates(),
        errors: errors.load(Ordering::Relaxed) + settle_failed,
        first_error: None,
    }
}
