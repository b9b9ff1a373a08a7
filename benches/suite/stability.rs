//! Scenario 5, stability: chaos (random operations, with and without links killed through
//! the proxy) and high contention. Every health invariant is counted: threads not joined
//! by a deadline, confirmed messages missing at the end, a pooled channel id held by two
//! guards at once, stale errors, threads that got an operation through after the last
//! fault.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, ChannelPool, Connection, ConsumeOptions, PooledChannel, PublishOptions,
    QueueDeclareOptions,
};

use crate::common::{self, declare, delete, join_all, spawn};
use crate::recovery::{EventSink, StaleChecker, proxied, start_proxy};

#[derive(Debug, Clone, Default)]
pub struct ChaosRun {
    pub name: String,
    pub threads: usize,
    pub secs: f64,
    pub iterations: usize,
    pub deadlocks: usize,
    /// Errors other than a lost link (and other than the expected ones during kills).
    pub errors: usize,
    /// Operations that failed because the link was lost (expected only with kills).
    pub link_errors: usize,
    pub kills: usize,
    pub confirmed: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub double_handouts: usize,
    pub pool_balanced: bool,
    pub stale_errors: usize,
    pub recovered_threads: usize,
    pub generations: u64,
}

/// Hands out pool guards and checks that no channel id is held twice at once.
#[derive(Clone)]
struct HoldCheck {
    held: Arc<Mutex<HashSet<u16>>>,
    doubles: Arc<AtomicUsize>,
}

impl HoldCheck {
    fn new() -> Self {
        HoldCheck {
            held: Arc::new(Mutex::new(HashSet::new())),
            doubles: Arc::new(AtomicUsize::new(0)),
        }
    }
    fn take(&self, g: &PooledChannel) {
        if !self.held.lock().unwrap().insert(g.id()) {
            self.doubles.fetch_add(1, Ordering::Relaxed);
        }
    }
    /// Must be called before the guard goes back.
    fn give(&self, g: PooledChannel) {
        self.held.lock().unwrap().remove(&g.id());
        drop(g);
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Shared {
    conn: Connection,
    pool: ChannelPool,
    holds: HoldCheck,
    queue: String,
    scratch: String,
    checker: StaleChecker,
    errors: AtomicUsize,
    link_errors: AtomicUsize,
    iterations: AtomicUsize,
}

struct ThreadResult {
    confirmed: Vec<u64>,
    /// Generation of the last successful operation after the run's end (recovered).
    final_ok: Option<u64>,
}

fn classify(sh: &Shared, e: &lepus::Error) {
    if e.is_connection_lost() {
        sh.link_errors.fetch_add(1, Ordering::Relaxed);
    } else {
        sh.errors.fetch_add(1, Ordering::Relaxed);
        if sh.errors.load(Ordering::Relaxed) <= 3 {
            common::note(&format!("chaos error: {e}"));
        }
    }
}

/// One random operation; returns the id of a confirmed message, if it published one.
fn random_op(sh: &Shared, ch: &lepus::Channel, rng: &mut Rng, id: u64) -> Option<u64> {
    let props = BasicProperties::new();
    let body = id.to_le_bytes();
    let op = sh.checker.begin();
    let mut confirmed = None;
    let r: lepus::Result<()> = match rng.next() % 7 {
        0 | 1 => ch
            .basic_publish_confirmed("", &sh.queue, &body, &props, &PublishOptions::default())
            .and_then(|c| c.wait_outcome())
            .map(|c| {
                if c == lepus::Confirm::Ack {
                    confirmed = Some(id);
                }
            }),
        2 => ch
            .basic_publish("", &sh.queue, &body, &props, &PublishOptions::default())
            .map(|_| ()),
        3 => match sh.pool.acquire_timeout(Duration::from_secs(10)) {
            Ok(g) => {
                sh.holds.take(&g);
                let r = g.basic_publish("", &sh.queue, &body, &props, &PublishOptions::default());
                sh.holds.give(g);
                r
            }
            Err(e) => Err(e),
        },
        4 => match ch.basic_get(&sh.scratch, false) {
            Ok(Some(d)) => d.ack(),
            Ok(None) => Ok(()),
            Err(e) => Err(e.into()),
        },
        5 => ch
            .queue_declare(
                &sh.queue,
                &QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
            )
            .map(|_| ()),
        _ => sh.conn.open_channel().and_then(|c| c.close()),
    };
    let err = r.err();
    if let Some(e) = &err {
        classify(sh, e);
    }
    sh.checker.end(op, err);
    sh.iterations.fetch_add(1, Ordering::Relaxed);
    confirmed
}

/// `threads` threads doing random operations for `dur`; with `kill_every`, the links are
/// reset through the proxy about that often.
pub fn chaos(
    url: &str,
    name: &str,
    threads: usize,
    dur: Duration,
    kill_every: Option<Duration>,
) -> ChaosRun {
    let proxy = start_proxy(url);
    let sink = EventSink::default();
    let conn = proxied(url, &proxy, 10, &sink);
    let admin = conn.open_channel().expect("admin channel");
    let queue = common::unique("chaos");
    let scratch = common::unique("chaos-scratch");
    declare(&admin, &queue);
    declare(&admin, &scratch);
    for i in 0..200u32 {
        let _ = admin.basic_publish(
            "",
            &scratch,
            &i.to_le_bytes(),
            &BasicProperties::new(),
            &PublishOptions::default(),
        );
    }
    let sh = Arc::new(Shared {
        conn: conn.clone(),
        pool: ChannelPool::with_max(&conn, 20),
        holds: HoldCheck::new(),
        queue: queue.clone(),
        scratch: scratch.clone(),
        checker: StaleChecker::new(conn.clone(), sink.clone()),
        errors: AtomicUsize::new(0),
        link_errors: AtomicUsize::new(0),
        iterations: AtomicUsize::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (sh, stop, barrier) = (sh.clone(), stop.clone(), barrier.clone());
            spawn("chaos", move || {
                let ch = sh.conn.open_channel().expect("chaos channel");
                ch.confirm_select().expect("confirm.select");
                let mut rng =
                    Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
                let mut res = ThreadResult {
                    confirmed: Vec::new(),
                    final_ok: None,
                };
                let mut seq = 0u64;
                barrier.wait();
                while !stop.load(Ordering::Acquire) {
                    seq += 1;
                    if let Some(id) = random_op(&sh, &ch, &mut rng, ((t as u64) << 32) | seq) {
                        res.confirmed.push(id);
                    }
                }
                // After the last fault: get one confirmed publish through.
                let limit = Instant::now() + Duration::from_secs(30);
                while Instant::now() < limit {
                    seq += 1;
                    let id = ((t as u64) << 32) | seq;
                    let r = ch
                        .basic_publish_confirmed(
                            "",
                            &sh.queue,
                            &id.to_le_bytes(),
                            &BasicProperties::new(),
                            &PublishOptions::default(),
                        )
                        .and_then(|c| c.wait_outcome());
                    if let Ok(c) = r {
                        if c == lepus::Confirm::Ack {
                            res.confirmed.push(id);
                        }
                        res.final_ok = Some(sh.conn.generation());
                        break;
                    }
                }
                res
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut kills = 0;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    while start.elapsed() < dur {
        match kill_every {
            Some(every) => {
                // ~every, +-33 %
                let jitter = every.mul_f64(0.67 + (rng.next() % 1000) as f64 / 1500.0);
                std::thread::sleep(jitter.min(dur.saturating_sub(start.elapsed())));
                if start.elapsed() < dur {
                    proxy.reset();
                    kills += 1;
                }
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    stop.store(true, Ordering::Release);
    let secs = start.elapsed().as_secs_f64();
    let (results, deadlocks) = join_all(handles, Instant::now() + Duration::from_secs(60));
    let final_gen = conn.generation();
    let recovered = results
        .iter()
        .filter(|r| r.final_ok.is_some_and(|g| g == final_gen))
        .count();
    let confirmed: Vec<u64> = results
        .iter()
        .flat_map(|r| r.confirmed.iter().copied())
        .collect();
    let stats = sh.pool.stats();
    let pool_balanced = stats.acquired == stats.released && stats.in_use == 0;
    // Drain the queue and account for every confirmed id.
    let (found, duplicates) = drain(&conn, &queue);
    let lost = confirmed
        .iter()
        .filter(|id| !found.contains_key(id))
        .count();
    let (stale, _) = sh.checker.counts();
    delete(&admin, &queue);
    delete(&admin, &scratch);
    let run = ChaosRun {
        name: name.to_owned(),
        threads,
        secs,
        iterations: sh.iterations.load(Ordering::Relaxed),
        deadlocks,
        errors: sh.errors.load(Ordering::Relaxed),
        link_errors: sh.link_errors.load(Ordering::Relaxed),
        kills,
        confirmed: confirmed.len(),
        lost,
        duplicates,
        double_handouts: sh.holds.doubles.load(Ordering::Relaxed),
        pool_balanced,
        stale_errors: stale,
        recovered_threads: recovered,
        generations: final_gen,
    };
    drop(sh);
    let _ = conn.close();
    drop(proxy);
    run
}

/// Every message left in `queue`: id -> count, and the number of extra copies.
fn drain(conn: &Connection, queue: &str) -> (HashMap<u64, u32>, usize) {
    let ch = conn.open_channel().expect("drain channel");
    let c = ch
        .basic_consume(
            queue,
            &ConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .expect("drain consumer");
    let mut found: HashMap<u64, u32> = HashMap::new();
    let mut dups = 0;
    while let Ok(Some(d)) = c.recv_timeout(Duration::from_millis(500)) {
        if let Ok(b) = <[u8; 8]>::try_from(d.body()) {
            let n = found.entry(u64::from_le_bytes(b)).or_insert(0);
            *n += 1;
            if *n > 1 {
                dups += 1;
            }
        }
    }
    let _ = ch.close();
    (found, dups)
}

/// `threads` threads released together by a barrier, each doing `per_thread` rounds of
/// pool acquire / publish / release on a pool smaller than the thread count.
pub fn contention(url: &str, threads: usize, per_thread: usize) -> ChaosRun {
    let conn = common::connect(url);
    let admin = conn.open_channel().expect("admin channel");
    let queue = common::unique("contention");
    declare(&admin, &queue);
    let pool = ChannelPool::new(&conn);
    let holds = HoldCheck::new();
    let errors = Arc::new(AtomicUsize::new(0));
    let iterations = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (pool, holds, errors, iterations, barrier, queue) = (
                pool.clone(),
                holds.clone(),
                errors.clone(),
                iterations.clone(),
                barrier.clone(),
                queue.clone(),
            );
            spawn("contention", move || {
                barrier.wait();
                for _ in 0..per_thread {
                    match pool.acquire_timeout(Duration::from_secs(30)) {
                        Ok(g) => {
                            holds.take(&g);
                            if g.basic_publish(
                                "",
                                &queue,
                                b"c",
                                &BasicProperties::new(),
                                &PublishOptions::default(),
                            )
                            .is_err()
                            {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                            holds.give(g);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    iterations.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let (_, deadlocks) = join_all(handles, Instant::now() + Duration::from_secs(60));
    let secs = start.elapsed().as_secs_f64();
    let stats = pool.stats();
    let total = threads * per_thread;
    let arrived = common::wait_count(&admin, &queue, total, Duration::from_secs(30)).is_some();
    let count = common::message_count(&admin, &queue) as usize;
    delete(&admin, &queue);
    let run = ChaosRun {
        name: "high_contention".into(),
        threads,
        secs,
        iterations: iterations.load(Ordering::Relaxed),
        deadlocks,
        errors: errors.load(Ordering::Relaxed),
        lost: if arrived {
            0
        } else {
            total.saturating_sub(count)
        },
        confirmed: total,
        double_handouts: holds.doubles.load(Ordering::Relaxed),
        pool_balanced: stats.acquired == stats.released && stats.in_use == 0,
        recovered_threads: threads - deadlocks,
        generations: conn.generation(),
        ..Default::default()
    };
    drop(pool);
    let _ = conn.close();
    run
}
