//! Consume, measured two ways, shared by every peer: `steady` (every consumer registered,
//! then the suite's raw producer writes the messages and the broker pushes them) and
//! `drain` (the suite pre-filled the queue; the clock starts before the consumers
//! register). The suite produces, so this process's CPU is the consumers' alone.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::cpu::{self, Usage};
use crate::now_ns;
use crate::stats::{IdLedger, read_stamp};

/// What a consume-ways run reports.
pub struct WaysOut {
    /// From the start (steady: "ready" printed; drain: before the first consumer
    /// registered) to the last delivery.
    pub secs: f64,
    /// This process's CPU over the same interval.
    pub cpu: Usage,
    pub received: usize,
    pub duplicates: usize,
    pub errors: usize,
}

/// Counters the consumers share with the main thread.
#[derive(Default)]
pub struct Progress {
    pub received: AtomicUsize,
    pub last_ns: AtomicU64,
    pub errors: AtomicUsize,
    /// Consumers whose registration finished (well or not).
    pub registered: AtomicUsize,
}

impl Progress {
    /// One delivery with `body` (an id stamped by the suite's producer).
    pub fn record(&self, ledger: &mut IdLedger, body: &[u8]) {
        match read_stamp(body) {
            Some((id, _)) if ledger.record(id) => {}
            _ => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.last_ns.fetch_max(now_ns(), Ordering::AcqRel);
        self.received.fetch_add(1, Ordering::AcqRel);
    }

    /// Wait until `messages` were received (polled every 0.5 ms) or the deadline; the
    /// process's CPU right then.
    pub fn wait(&self, messages: usize) -> Usage {
        let deadline = Instant::now() + Duration::from_secs(30 + messages as u64 / 500);
        while self.received.load(Ordering::Acquire) < messages && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(500));
        }
        cpu::process()
    }

    /// Before closing the connection: wait (up to 30 s) until every consumer's
    /// registration has finished, so that a drain (whose first consumers may empty the
    /// queue before the last ones register) does not count the close as their failure.
    pub fn wait_registered(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.registered.load(Ordering::Acquire) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// The run's result: `start_ns`/`cpu0` taken at the start, `cpu1` from `wait`.
    pub fn out(&self, start_ns: u64, cpu0: &Usage, cpu1: &Usage, ledger: &IdLedger) -> WaysOut {
        WaysOut {
            secs: self
                .last_ns
                .load(Ordering::Acquire)
                .saturating_sub(start_ns) as f64
                / 1e9,
            cpu: cpu1.since(cpu0),
            received: ledger.unique(),
            duplicates: ledger.duplicates(),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// Tell the suite (a line on stdout) that every consumer is registered.
pub fn signal_ready() {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
}
