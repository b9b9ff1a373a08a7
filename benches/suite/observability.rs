//! Scenario 10: what observability costs on the publish path, as a ratio in one run.
//!
//! lepus's counters are always on (one relaxed atomic add per message where it passes),
//! so a build "without observability" is not something a user can have; what the
//! `metrics` feature adds is a recorder that the I/O thread reports to once a second.
//! This scenario runs the same publish workload (scenario 1's, 4 threads on one
//! connection) with the `metrics` feature built in and a recorder (atomic counters, what
//! an exporter such as Prometheus's keeps) installed for the connection, and without a
//! recorder (the facade's handles are no-ops), interleaved round by round (A B, B A, ...),
//! and reports the medians and their ratio. The cost of the always-on counters themselves
//! (against a build without them) is measured with callgrind, by instruction counts per
//! message: see the README's "Observability" section.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

use crate::common::{Settings, done, settle, step, thousands};
use crate::throughput::{self, Mode, PublishRun};

/// A recorder that keeps every counter and gauge in an atomic, as exporters do.
#[derive(Default)]
struct Atomics {
    handles: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl Atomics {
    fn handle(&self, key: &Key) -> Arc<AtomicU64> {
        let mut h = self.handles.lock().unwrap();
        h.entry(key.name().to_string()).or_default().clone()
    }
    /// The sum of the `lepus_messages_published_total` counters (to show it counted).
    fn published(&self) -> u64 {
        self.handles
            .lock()
            .unwrap()
            .get("lepus_messages_published_total")
            .map_or(0, |a| a.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Recorder for Atomics {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.handle(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// One publish run, with or without a recorder.
pub struct ObsRun {
    pub recorder: bool,
    pub run: PublishRun,
}

/// Scenario 10's runs.
pub fn run(s: &Settings) -> Vec<ObsRun> {
    let (threads, per_thread) = (4, s.size(25_000, 5_000));
    let rounds = s.size(5, 3);
    let modes = [Mode::None, Mode::Window(100)];
    let recorder = Atomics::default();
    let mut runs = Vec::new();
    let n = rounds * modes.len() * 2;
    let mut i = 0;
    for round in 0..rounds {
        for mode in modes {
            // A B in even rounds, B A in odd ones.
            for k in 0..2 {
                let on = (k + round) % 2 == 0;
                i += 1;
                settle();
                step(
                    i,
                    n,
                    &format!(
                        "round {}/{rounds}: {threads}×{per_thread} {} — recorder {}",
                        round + 1,
                        mode.label(),
                        if on { "on" } else { "off" }
                    ),
                );
                let before = recorder.published();
                // The handles are registered when the connection opens, on this thread:
                // a local recorder reaches exactly this run's connection.
                let mut run = if on {
                    metrics::with_local_recorder(&recorder, || {
                        throughput::publish(&s.url, threads, per_thread, mode)
                    })
                } else {
                    throughput::publish(&s.url, threads, per_thread, mode)
                };
                run.round = round;
                let counted = recorder.published() - before;
                done(&format!(
                    "calls {} msg/s, absorbed {} msg/s{}",
                    thousands(run.call_rate()),
                    thousands(run.absorbed_rate()),
                    if on {
                        format!(", the recorder counted {counted} publishes")
                    } else {
                        String::new()
                    }
                ));
                runs.push(ObsRun { recorder: on, run });
            }
        }
    }
    runs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// The report's section for scenario 10 (empty when it did not run).
pub fn render(runs: &[ObsRun]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n## 10. Observability cost: publish with the `metrics` recorder on and off\n\n\
         The suite builds lepus with the `metrics` feature. Each row is the median over the \
         rounds (interleaved, alternating which goes first) of one publish configuration \
         with a recorder installed for the connection (on) and without (off); the ratio is \
         the median over the rounds of on / off within a round (1.00 = no cost; below 0.97 \
         would break the 3 % budget). On a machine shared with other load the rates drift \
         between rounds by more than 3 %: read the ratio with the rounds in the log. Counters are \
         always on in both; their own cost against a build without them is measured by \
         instruction counts (README, \"Observability\").\n\n\
         | publish | calls on | calls off | ratio | absorbed on | absorbed off | ratio | rounds |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut keys: Vec<(Mode, usize, usize)> = Vec::new();
    for r in runs {
        let k = (r.run.mode, r.run.threads, r.run.per_thread);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (mode, t, m) in keys {
        let pick = |on: bool, f: fn(&PublishRun) -> f64| {
            median(
                runs.iter()
                    .filter(|r| r.recorder == on && r.run.mode == mode && r.run.threads == t)
                    .map(|r| f(&r.run))
                    .collect(),
            )
        };
        // Each round's on/off pair ran back to back: the median of the pairs' ratios
        // follows the broker's drift (other load) less than the ratio of the medians.
        let ratio = |f: fn(&PublishRun) -> f64| {
            let of = |on: bool, round: usize| {
                runs.iter()
                    .find(|r| {
                        r.recorder == on
                            && r.run.mode == mode
                            && r.run.threads == t
                            && r.run.round == round
                    })
                    .map(|r| f(&r.run))
            };
            let rounds = runs.iter().map(|r| r.run.round).max().unwrap_or(0);
            median(
                (0..=rounds)
                    .filter_map(|k| Some(of(true, k)? / of(false, k)?))
                    .collect(),
            )
        };
        let (c_on, c_off) = (
            pick(true, PublishRun::call_rate),
            pick(false, PublishRun::call_rate),
        );
        let (a_on, a_off) = (
            pick(true, PublishRun::absorbed_rate),
            pick(false, PublishRun::absorbed_rate),
        );
        let rounds = runs
            .iter()
            .filter(|r| r.recorder && r.run.mode == mode && r.run.threads == t)
            .count();
        let _ = writeln!(
            md,
            "| {t}×{m} {} | {} | {} | {:.3} | {} | {} | {:.3} | {rounds} |",
            mode.label(),
            thousands(c_on),
            thousands(c_off),
            ratio(PublishRun::call_rate),
            thousands(a_on),
            thousands(a_off),
            ratio(PublishRun::absorbed_rate),
        );
    }
    md
}
