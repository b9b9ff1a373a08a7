//! Latency samples and percentiles, shared (through `#[path]`) by the suite and the peers
//! crate so that both compute every figure the same way.
#![allow(dead_code)]

use std::time::Duration;

/// Latency samples in nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    ns: Vec<u64>,
    sorted: bool,
}

impl Samples {
    pub fn with_capacity(n: usize) -> Self {
        Samples {
            ns: Vec::with_capacity(n),
            sorted: false,
        }
    }

    pub fn push(&mut self, d: Duration) {
        self.ns.push(d.as_nanos().min(u128::from(u64::MAX)) as u64);
        self.sorted = false;
    }

    pub fn push_ns(&mut self, ns: u64) {
        self.ns.push(ns);
        self.sorted = false;
    }

    pub fn extend(&mut self, other: Samples) {
        self.ns.extend(other.ns);
        self.sorted = false;
    }

    pub fn len(&self) -> usize {
        self.ns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ns.is_empty()
    }

    fn sort(&mut self) {
        if !self.sorted {
            self.ns.sort_unstable();
            self.sorted = true;
        }
    }

    /// The `p`-th percentile (0..=100), nearest-rank, in milliseconds; NaN without samples.
    pub fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.ns.is_empty() {
            return f64::NAN;
        }
        self.sort();
        let n = self.ns.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        let i = rank.clamp(1, n) - 1;
        self.ns[i] as f64 / 1e6
    }

    pub fn max_ms(&mut self) -> f64 {
        self.percentile_ms(100.0)
    }

    pub fn mean_ms(&self) -> f64 {
        if self.ns.is_empty() {
            return f64::NAN;
        }
        self.ns.iter().map(|&x| x as f64).sum::<f64>() / self.ns.len() as f64 / 1e6
    }
}

/// P50/P99/P99.9 with the number of samples they come from.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub samples: usize,
}

impl Percentiles {
    pub fn of(s: &mut Samples) -> Self {
        Percentiles {
            p50_ms: s.percentile_ms(50.0),
            p99_ms: s.percentile_ms(99.0),
            p999_ms: s.percentile_ms(99.9),
            max_ms: s.max_ms(),
            samples: s.len(),
        }
    }
}

/// The median of some values (NaN-free values only); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Message bodies used by the consumer scenarios: 8 bytes of id, 8 bytes of send time
/// (nanoseconds since a process-local origin), padded to `len` (at least 16).
pub fn stamp_body(id: u64, sent_ns: u64, len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(len.max(16));
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&sent_ns.to_le_bytes());
    b.resize(len.max(16), 0x5a);
    b
}

/// The id and send time of a [`stamp_body`].
pub fn read_stamp(body: &[u8]) -> Option<(u64, u64)> {
    let id = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let t = u64::from_le_bytes(body.get(8..16)?.try_into().ok()?);
    Some((id, t))
}

/// Exactly which message ids of `0..n` arrived: counts missing and duplicated ones.
#[derive(Debug)]
pub struct IdLedger {
    seen: Vec<u32>,
}

impl IdLedger {
    pub fn new(n: usize) -> Self {
        IdLedger { seen: vec![0; n] }
    }
    /// Record an id; false if it is out of range.
    pub fn record(&mut self, id: u64) -> bool {
        match self.seen.get_mut(id as usize) {
            Some(c) => {
                *c += 1;
                true
            }
            None => false,
        }
    }
    pub fn merge(&mut self, other: &IdLedger) {
        for (a, b) in self.seen.iter_mut().zip(&other.seen) {
            *a += *b;
        }
    }
    pub fn missing(&self) -> usize {
        self.seen.iter().filter(|&&c| c == 0).count()
    }
    pub fn duplicates(&self) -> usize {
        self.seen
            .iter()
            .map(|&c| c.saturating_sub(1) as usize)
            .sum()
    }
    pub fn unique(&self) -> usize {
        self.seen.iter().filter(|&&c| c > 0).count()
    }
}
