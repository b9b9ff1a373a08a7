//! The report: benches/results/report.md in the shape of the reference results page
//! (environment, every table, health invariants as counted), with a target column.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::Results;
use crate::common::{Settings, connect, ms, rss, thousands};
use crate::recovery::{Fault, RecoveryRun};
use crate::stats::median;
use crate::throughput::{ConsumeRun, Mode, PublishRun};

pub struct Environment {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub os: String,
    pub rabbitmq: String,
    pub erlang: String,
    pub rustc: String,
    pub commit: String,
    pub started: String,
}

fn cmd(program: &str, args: &[&str], dir: &Path) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `YYYY-MM-DD HH:MM:SS UTC` from the system clock.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

impl Environment {
    pub fn gather(s: &Settings) -> Environment {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let os = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("PRETTY_NAME="))
                    .map(|l| l["PRETTY_NAME=".len()..].trim_matches('"').to_owned())
            })
            .unwrap_or_else(|| "Linux".into());
        let conn = connect(&s.url);
        let props = conn.server_properties();
        let get = |k: &str| {
            props
                .get(k)
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "?".into())
        };
        let rabbitmq = get("version");
        let erlang = get("platform");
        let _ = conn.close();
        let rustc = cmd(
            &std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()),
            &["--version"],
            root,
        )
        .unwrap_or_else(|| "unknown".into());
        let commit = match cmd("git", &["rev-parse", "--short", "HEAD"], root) {
            Some(c) => {
                let dirty =
                    cmd("git", &["status", "--porcelain"], root).is_some_and(|s| !s.is_empty());
                if dirty { format!("{c} (dirty)") } else { c }
            }
            None => "unknown".into(),
        };
        Environment {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel,
            os,
            rabbitmq,
            erlang,
            rustc,
            commit,
            started: utc_now(),
        }
    }
}

// ---------------- grouping ----------------

type Key = (usize, usize, Mode);

/// Runs of `client` for (threads, per_thread, mode), in round order.
fn runs<'a>(r: &'a Results, client: &str, key: Key) -> Vec<&'a PublishRun> {
    r.publish
        .iter()
        .filter(|p| p.client == client && (p.threads, p.per_thread, p.mode) == key)
        .collect()
}

fn med(v: impl Iterator<Item = f64>) -> f64 {
    median(&v.collect::<Vec<_>>())
}

/// Median over rounds of lepus/peer absorbed-rate ratios (rounds matched by number).
fn publish_ratio(r: &Results, peer: &str, key: Key) -> f64 {
    let l = runs(r, "lepus", key);
    let p = runs(r, peer, key);
    med(l.iter().filter_map(|a| {
        p.iter()
            .find(|b| b.round == a.round)
            .map(|b| a.absorbed_rate() / b.absorbed_rate())
    }))
}

/// Median over rounds of lepus / best peer of that round.
fn publish_ratio_best(r: &Results, key: Key) -> f64 {
    let l = runs(r, "lepus", key);
    med(l.iter().filter_map(|a| {
        let best = r
            .peer_clients
            .iter()
            .flat_map(|c| runs(r, c, key))
            .filter(|b| b.round == a.round)
            .map(|b| b.absorbed_rate())
            .filter(|x| x.is_finite())
            .fold(f64::NAN, f64::max);
        best.is_finite().then(|| a.absorbed_rate() / best)
    }))
}

fn ceiling_ratio(r: &Results, t: usize, m: usize) -> f64 {
    let l = runs(r, "lepus", (t, m, Mode::None));
    med(l.iter().filter_map(|a| {
        r.ceiling
            .iter()
            .find(|c| c.threads == t && c.per_thread == m && c.round == a.round)
            .map(|c| a.absorbed_rate() / c.absorbed_rate())
    }))
}

fn consumes<'a>(r: &'a Results, client: &str, n: usize) -> Vec<&'a ConsumeRun> {
    r.consume
        .iter()
        .filter(|c| c.client == client && c.consumers == n)
        .collect()
}

fn consume_ratio_best(r: &Results, n: usize) -> f64 {
    consume_ratio_best_of(r, "lepus", n)
}

/// `client`'s consume rate over the best peer's, within each round, median.
fn consume_ratio_best_of(r: &Results, client: &str, n: usize) -> f64 {
    med(consumes(r, client, n).iter().filter_map(|a| {
        let best = r
            .peer_clients
            .iter()
            .flat_map(|c| consumes(r, c, n))
            .filter(|b| b.round == a.round)
            .map(|b| b.consume_rate())
            .filter(|x| x.is_finite())
            .fold(f64::NAN, f64::max);
        best.is_finite().then(|| a.consume_rate() / best)
    }))
}

// ---------------- targets ----------------

enum Goal {
    AtLeast(f64),
    Below(f64),
}

struct Target {
    what: String,
    measured: f64,
    shown: String,
    goal: Goal,
    goal_text: String,
}

impl Target {
    fn met(&self) -> Option<bool> {
        if !self.measured.is_finite() {
            return None;
        }
        Some(match self.goal {
            Goal::AtLeast(g) => self.measured >= g,
            Goal::Below(g) => self.measured < g,
        })
    }
    fn status(&self) -> &'static str {
        match self.met() {
            Some(true) => "✅",
            Some(false) => "❌",
            None => "– not measured",
        }
    }
    fn gap(&self) -> String {
        match (self.met(), &self.goal) {
            (Some(false), Goal::AtLeast(g)) => {
                format!("{:.1} % short", (1.0 - self.measured / g) * 100.0)
            }
            (Some(false), Goal::Below(g)) => {
                format!("{:.1} % over", (self.measured / g - 1.0) * 100.0)
            }
            _ => String::new(),
        }
    }
}

fn x(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}×")
    } else {
        "-".into()
    }
}

fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    let cfgs = &r.publish_configs;
    let worst = |f: &dyn Fn(usize, usize) -> f64| -> (f64, String) {
        let mut worst = f64::NAN;
        let mut at = String::new();
        for &(th, m) in cfgs {
            let v = f(th, m);
            if v.is_finite() && (worst.is_nan() || v < worst) {
                worst = v;
                at = format!("{th}×{m}");
            }
        }
        (worst, at)
    };
    if !r.peer_clients.is_empty() {
        let (v, at) = worst(&|th, m| publish_ratio_best(r, (th, m, Mode::None)));
        t.push(Target {
            what: "publish, no confirms: absorbed rate vs best peer, every T".into(),
            measured: v,
            shown: format!("{} (lowest, at {at})", x(v)),
            goal: Goal::AtLeast(1.1),
            goal_text: "≥ 1.1×".into(),
        });
    }
    if !r.ceiling.is_empty() {
        // At 900 threads the client is thread-bound (issue 16): the target skips it.
        let (v, at) = worst(&|th, m| {
            if th == 900 {
                f64::NAN
            } else {
                ceiling_ratio(r, th, m)
            }
        });
        t.push(Target {
            what: "publish, no confirms: absorbed rate vs one-socket ceiling, every T but 900"
                .into(),
            measured: v,
            shown: format!("{} (lowest, at {at})", x(v)),
            goal: Goal::AtLeast(0.9),
            goal_text: "≥ 0.9×".into(),
        });
    }
    if let Some(&(th, m)) = cfgs.iter().find(|c| c.0 == 900) {
        let v = med(runs(r, "lepus", (th, m, Mode::None))
            .iter()
            .map(|p| p.lat.p99_ms));
        t.push(Target {
            what: format!("publish P99 at {th} threads (no confirms)"),
            measured: v,
            shown: ms(v),
            goal: Goal::Below(20.0),
            goal_text: "< 20 ms".into(),
        });
    }
    if !r.peer_clients.is_empty() {
        let (v, at) = worst(&|th, m| publish_ratio_best(r, (th, m, Mode::Each)));
        t.push(Target {
            what: "publish, confirm each: absorbed rate vs best peer, every T".into(),
            measured: v,
            shown: format!("{} (lowest, at {at})", x(v)),
            goal: Goal::AtLeast(1.2),
            goal_text: "≥ 1.2×".into(),
        });
    }
    if let Some(p) = r.pool.iter().find(|p| p.threads == 100) {
        t.push(Target {
            what: "channel pool, 100 threads".into(),
            measured: p.rate(),
            shown: format!("{} pairs/s", thousands(p.rate())),
            goal: Goal::AtLeast(3e6),
            goal_text: "≥ 3,000,000 pairs/s".into(),
        });
    }
    let l900 = consumes(r, "lepus", 900);
    if !l900.is_empty() {
        let v = med(l900.iter().map(|c| c.startup_secs * 1e3));
        t.push(Target {
            what: "900 consumers started".into(),
            measured: v,
            shown: ms(v),
            goal: Goal::Below(300.0),
            goal_text: "< 0.3 s".into(),
        });
    }
    if !r.peer_clients.is_empty() && !r.consume.is_empty() {
        let mut worst_v = f64::NAN;
        let mut at = 0;
        for &n in &r.consumer_counts {
            let v = consume_ratio_best(r, n);
            if v.is_finite() && (worst_v.is_nan() || v < worst_v) {
                worst_v = v;
                at = n;
            }
        }
        t.push(Target {
            what: "consume rate vs best peer, every consumer count".into(),
            measured: worst_v,
            shown: format!("{} (lowest, at {at})", x(worst_v)),
            goal: Goal::AtLeast(1.0),
            goal_text: "≥ 1.0×".into(),
        });
    }
    let lep: Vec<&ConsumeRun> = r.consume.iter().filter(|c| c.client == "lepus").collect();
    if !lep.is_empty() {
        let lost: usize = lep.iter().map(|c| c.lost).sum();
        let sent: usize = lep.iter().map(|c| c.messages).sum();
        t.push(Target {
            what: "consumer message loss (every id accounted for)".into(),
            measured: lost as f64,
            shown: format!("{lost} of {} lost", thousands(sent as f64)),
            goal: Goal::Below(0.5),
            goal_text: "0".into(),
        });
    }
    let rst: Vec<&RecoveryRun> = r
        .recovery
        .iter()
        .filter(|x| x.fault == Fault::Rst)
        .collect();
    if !rst.is_empty() {
        let worst_of =
            |f: &dyn Fn(&RecoveryRun) -> f64| rst.iter().map(|x| f(x)).fold(f64::NAN, f64::max);
        let v = worst_of(&|x| x.detection_ms);
        t.push(Target {
            what: "RST detected (worst run)".into(),
            measured: v,
            shown: ms(v),
            goal: Goal::Below(5.0),
            goal_text: "< 5 ms".into(),
        });
        let r50: Vec<&&RecoveryRun> = rst.iter().filter(|x| x.threads == 50).collect();
        let v = r50.iter().map(|x| x.told_last_ms).fold(f64::NAN, f64::max);
        let told = r50.iter().map(|x| x.told).min().unwrap_or(0);
        t.push(Target {
            what: "RST, 50 threads: last waiting thread told (worst run)".into(),
            measured: v,
            shown: format!("{} ({told}+ of 50 were waiting and told)", ms(v)),
            goal: Goal::Below(10.0),
            goal_text: "< 10 ms".into(),
        });
        let v = worst_of(&|x| x.recovery_first_ms);
        t.push(Target {
            what: "RST: full recovery, first publish confirmed on the new connection (worst run)"
                .into(),
            measured: v,
            shown: ms(v),
            goal: Goal::Below(50.0),
            goal_text: "< 50 ms".into(),
        });
    }
    for (what, measured, shown, g, at_least) in crate::report_cpu::targets(r) {
        t.push(Target {
            what,
            measured,
            shown,
            goal: if at_least {
                Goal::AtLeast(g)
            } else {
                Goal::Below(g)
            },
            goal_text: format!("{} {g}×", if at_least { "≥" } else { "<" }),
        });
    }
    if let Some(Ok(m)) = &r.memory {
        t.push(Target {
            what: format!("memory per open channel ({} idle)", m.count),
            measured: m.per_channel(),
            shown: format!("{:.0} B", m.per_channel()),
            goal: Goal::Below(3.5 * 1024.0 + 0.5),
            goal_text: "≤ 3.5 KB".into(),
        });
        t.push(Target {
            what: format!("memory per consumer ({} idle)", m.count),
            measured: m.per_consumer(),
            shown: format!("{:.0} B", m.per_consumer()),
            goal: Goal::Below(1024.0 + 0.5),
            goal_text: "≤ 1 KB".into(),
        });
    }
    t
}

// ---------------- rendering ----------------

pub fn render(r: &Results, env: &Environment, s: &Settings) -> String {
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(w, "# lepus benchmark results\n");
    let _ = writeln!(
        w,
        "Produced by `cargo bench -p lepus-bench-suite{}` against a local RabbitMQ. Every figure below was measured in this run; nothing is carried over or assumed.{}\n",
        if s.quick { " -- --quick" } else { "" },
        if s.quick {
            " **Quick mode**: small sizes and a single round, for CI; the numbers are indicative only."
        } else {
            ""
        }
    );
    let _ = writeln!(w, "## Environment\n");
    let (_, hwm) = rss();
    let _ = writeln!(w, "- **CPU:** {} ({} cores available)", env.cpu, env.cores);
    let _ = writeln!(w, "- **OS / kernel:** {} / Linux {}", env.os, env.kernel);
    let _ = writeln!(w, "- **RabbitMQ:** {} ({})", env.rabbitmq, env.erlang);
    let _ = writeln!(w, "- **rustc:** {}", env.rustc);
    let _ = writeln!(w, "- **lepus git commit:** `{}`", env.commit);
    let peers = if r.peer_versions.is_empty() && r.peer_notes.is_empty() {
        "none in this run".to_string()
    } else if r.peer_versions.is_empty() {
        "none in this run (see the **Peers** notes below)".to_string()
    } else {
        r.peer_versions
            .iter()
            .map(|(n, v)| format!("{n} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(w, "- **Peers:** {peers}");
    let _ = writeln!(
        w,
        "- **Mode:** {}, {} round(s) of the lepus/peer comparison (A B A B ..., ratios are medians over rounds)",
        if s.quick { "quick" } else { "full" },
        s.rounds
    );
    let _ = writeln!(
        w,
        "- **Started:** {}; **duration:** {:.1} s",
        env.started,
        crate::common::elapsed()
    );
    let _ = writeln!(
        w,
        "- **Peak RSS of the suite process (VmHWM):** {:.1} MiB",
        hwm as f64 / 1048576.0
    );
    let _ = writeln!(
        w,
        "- The machine may be shared with other work: throughput figures are noisy; ratios within one run are the comparable numbers.\n"
    );
    for n in &r.notes {
        let _ = writeln!(w, "> **Note:** {n}\n");
    }
    for n in &r.peer_notes {
        let _ = writeln!(w, "> **Peers:** {n}\n");
    }

    // Targets.
    let ts = targets(r);
    let _ = writeln!(w, "## Targets\n");
    let _ = writeln!(w, "| target | measured | goal | status | gap |");
    let _ = writeln!(w, "|---|---|---|---|---|");
    for t in &ts {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} |",
            t.what,
            t.shown,
            t.goal_text,
            t.status(),
            t.gap()
        );
    }
    let _ = writeln!(w);

    publish_section(w, r);
    pool_section(w, r);
    consumer_section(w, r);
    crate::report_cpu::consume_section(w, r);
    recovery_section(w, r);
    stability_section(w, r);
    memory_section(w, r);
    crate::tls::section(w, &r.tls);
    crate::worker_pool::section_md(w, &r.worker_pool);
    crate::failover::section(w, &r.failover);
    health_section(w, r);

    if !r.errors.is_empty() {
        let _ = writeln!(w, "## Problems during the run\n");
        for e in &r.errors {
            let _ = writeln!(w, "- {e}");
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(w, "---\n\n*Generated: {}*", utc_now());
    o
}

fn publish_section(w: &mut String, r: &Results) {
    if r.publish.is_empty() && r.ceiling.is_empty() {
        return;
    }
    let _ = writeln!(w, "## Throughput Results\n");
    let _ = writeln!(
        w,
        "T threads × M messages on one connection, a channel each, 64-byte bodies, to one queue. **Call rate**: messages / time until every thread's last call returned. **Absorbed**: messages / time until the queue held them all (passive `queue.declare` polled every 1 ms). Latency: each publish call (no confirms), publish + wait for its confirm (wait each), or from the publish call until `wait_for_confirms` of its window returned (windows); percentiles over every message (samples column). Lepus figures are medians over rounds.\n"
    );
    for &mode in &r.modes {
        if runs_any(r, "lepus", mode) {
            let _ = writeln!(w, "### Publish throughput — {}\n", mode.label());
            let _ = writeln!(
                w,
                "| Configuration | Messages | Call rate | Absorbed | P50 | P99 | P99.9 | Samples | Errors |"
            );
            let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
            for &(t, m) in &r.publish_configs {
                let rs = runs(r, "lepus", (t, m, mode));
                if rs.is_empty() {
                    continue;
                }
                let _ = writeln!(
                    w,
                    "| {t} threads × {m} msg | {} | {} msg/s | **{} msg/s** | {} | {} | {} | {} | {} |",
                    thousands((t * m) as f64),
                    thousands(med(rs.iter().map(|p| p.call_rate()))),
                    thousands(med(rs.iter().map(|p| p.absorbed_rate()))),
                    ms(med(rs.iter().map(|p| p.lat.p50_ms))),
                    ms(med(rs.iter().map(|p| p.lat.p99_ms))),
                    ms(med(rs.iter().map(|p| p.lat.p999_ms))),
                    thousands(rs[0].lat.samples as f64),
                    rs.iter().map(|p| p.errors).sum::<usize>()
                );
            }
            let _ = writeln!(w);
        }
    }
    if !r.peer_clients.is_empty() {
        let _ = writeln!(
            w,
            "### Peers side by side (absorbed rate, medians over rounds)\n"
        );
        let mut head = "| Configuration | Mode | lepus |".to_string();
        let mut sep = "|---|---|---|".to_string();
        for c in &r.peer_clients {
            let _ = write!(head, " {c} | {c} P99 |");
            sep.push_str("---|---|");
        }
        for c in &r.peer_clients {
            let _ = write!(head, " lepus/{c} |");
            sep.push_str("---|");
        }
        head.push_str(" lepus/best peer | target |");
        sep.push_str("---|---|");
        let _ = writeln!(w, "{head}\n{sep}");
        for &mode in &r.modes {
            for &(t, m) in &r.publish_configs {
                let l = runs(r, "lepus", (t, m, mode));
                if l.is_empty() {
                    continue;
                }
                let mut row = format!(
                    "| {t}×{m} | {} | {} (P99 {}) |",
                    mode.label(),
                    thousands(med(l.iter().map(|p| p.absorbed_rate()))),
                    ms(med(l.iter().map(|p| p.lat.p99_ms)))
                );
                for c in &r.peer_clients {
                    let p = runs(r, c, (t, m, mode));
                    let _ = write!(
                        row,
                        " {} | {} |",
                        thousands(med(p.iter().map(|p| p.absorbed_rate()))),
                        ms(med(p.iter().map(|p| p.lat.p99_ms)))
                    );
                }
                for c in &r.peer_clients {
                    let _ = write!(row, " {} |", x(publish_ratio(r, c, (t, m, mode))));
                }
                let best = publish_ratio_best(r, (t, m, mode));
                let goal = match mode {
                    Mode::None => Some(1.1),
                    Mode::Each => Some(1.2),
                    Mode::Window(_) => None,
                };
                let status = match goal {
                    Some(g) if best.is_finite() => {
                        if best >= g {
                            format!("✅ ≥ {g}×")
                        } else {
                            format!("❌ ≥ {g}× ({:.1} % short)", (1.0 - best / g) * 100.0)
                        }
                    }
                    Some(g) => format!("≥ {g}×"),
                    None => "–".into(),
                };
                let _ = writeln!(w, "{row} {} | {status} |", x(best));
            }
        }
        let _ = writeln!(w);
    }
    crate::report_cpu::ceiling_section(w, r);
    crate::report_cpu::cpu_section(w, r);
    let _ = writeln!(
        w,
        "### Throughput chart\n\n![Throughput by threads](throughput_by_threads.svg)\n"
    );
    let _ = writeln!(
        w,
        "### Latency percentiles\n\n![Latency percentiles](latency_percentiles.svg)\n"
    );
}

fn runs_any(r: &Results, client: &str, mode: Mode) -> bool {
    r.publish
        .iter()
        .any(|p| p.client == client && p.mode == mode)
}

fn pool_section(w: &mut String, r: &Results) {
    if r.pool.is_empty() {
        return;
    }
    let _ = writeln!(w, "### Channel Pool Performance\n");
    let _ = writeln!(
        w,
        "`ChannelPool` of {} channels (opened before timing), T threads × N `acquire()` + drop pairs. Latency: one pair in {} is timed (the clock read around every pair was a large share of the throughput figure; the samples column says how many).\n",
        r.pool[0].pool_size,
        crate::throughput::POOL_TIMED_EVERY
    );
    let _ = writeln!(
        w,
        "| Threads | Operations | Duration | Throughput | P50 | P99 | P99.9 | Samples | Errors |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
    for p in &r.pool {
        let _ = writeln!(
            w,
            "| {} threads | {} | {:.3} s | **{} ops/s** | {} | {} | {} | {} | {} |",
            p.threads,
            thousands(p.ops() as f64),
            p.secs,
            thousands(p.rate()),
            ms(p.lat.p50_ms),
            ms(p.lat.p99_ms),
            ms(p.lat.p999_ms),
            thousands(p.lat.samples as f64),
            p.errors
        );
    }
    let _ = writeln!(w);
}

fn consumer_section(w: &mut String, r: &Results) {
    if r.consume.is_empty() {
        return;
    }
    let _ = writeln!(
        w,
        "---\n\n## Scalability Results\n\n### Massive Consumers\n"
    );
    let _ = writeln!(
        w,
        "N consumers on one connection, a channel each (prefetch {}, manual acks), on one queue; one producer publishes the messages (64-byte bodies carrying an id and a send timestamp). **Startup**: from the start signal until every consumer's `basic.consume-ok` (channel open + qos + consume, in parallel threads: lepus writes the three together with `Connection::open_consumer` and waits one round trip, the peers, which have no such call, wait three). The start signal: lepus and lapin release their threads from a barrier once every thread waits there (its bookkeeping made); amiquip, whose channels open on its connection's thread, counts from the first channel open, its threads' spawning included; amqprs from before its consumer tasks are spawned (their bookkeeping made before). A started consumer thread waits, without polling, until every consumer has started (threads polling meanwhile would be the harness's CPU, counted as startup). **Consume rate**: messages received / time from the first publish to the last delivery. End-to-end latency from the body's timestamp. **Lost**: ids never received (each id counted exactly). **lepus** receives with a thread per consumer blocked in `recv`; **lepus-dispatch** starts its consumers the same way, then serves them all with a `Dispatcher` of {} threads (one per core, as amqprs's tokio runtime), a handler per consumer.\n",
        crate::throughput::PREFETCH,
        crate::consume_ways::dispatch_threads()
    );
    let clients: Vec<String> = ["lepus", crate::consume_ways::DISPATCH]
        .into_iter()
        .map(String::from)
        .chain(r.peer_clients.iter().cloned())
        .collect();
    let _ = writeln!(
        w,
        "| Client | Consumers | Messages | Startup | Producer rate | Consume rate | P50 | P99 | Samples | Lost | Duplicates | Errors |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &r.consumer_counts {
        for c in &clients {
            let rs = consumes(r, c, n);
            if rs.is_empty() {
                continue;
            }
            let bold = if c == "lepus" { "**" } else { "" };
            let _ = writeln!(
                w,
                "| {c} | {n} | {} | {:.3} s | {} msg/s | {bold}{} msg/s{bold} | {} | {} | {} | {} | {} | {} |",
                thousands(rs[0].messages as f64),
                med(rs.iter().map(|x| x.startup_secs)),
                thousands(med(rs.iter().map(|x| x.produce_rate()))),
                thousands(med(rs.iter().map(|x| x.consume_rate()))),
                ms(med(rs.iter().map(|x| x.lat.p50_ms))),
                ms(med(rs.iter().map(|x| x.lat.p99_ms))),
                thousands(rs[0].lat.samples as f64),
                rs.iter().map(|x| x.lost).sum::<usize>(),
                rs.iter().map(|x| x.duplicates).sum::<usize>(),
                rs.iter().map(|x| x.errors).sum::<usize>()
            );
        }
    }
    let _ = writeln!(w);
    if !r.consumer_floor.is_empty() {
        let _ = writeln!(
            w,
            "Broker floor for startup (no client library): one socket, N × (channel.open, basic.qos, basic.consume) written at once, until the N-th consume-ok; same rounds.\n"
        );
        let _ = writeln!(
            w,
            "| Consumers | Floor (raw socket, pipelined) | lepus startup | lepus / floor |"
        );
        let _ = writeln!(w, "|---|---|---|---|");
        for &n in &r.consumer_counts {
            let f: Vec<f64> = r
                .consumer_floor
                .iter()
                .filter(|x| x.0 == n)
                .map(|x| x.2)
                .collect();
            if f.is_empty() {
                continue;
            }
            let l = med(consumes(r, "lepus", n).iter().map(|x| x.startup_secs));
            let fl = median(&f);
            let _ = writeln!(w, "| {n} | {:.3} s | {:.3} s | {} |", fl, l, x(l / fl));
        }
        let _ = writeln!(w);
    }
    if !r.peer_clients.is_empty() {
        let _ = writeln!(
            w,
            "| Consumers | lepus consume rate / best peer | lepus startup / best peer (same clock: lapin, amqprs) | target (rate) | lepus dispatcher consume rate / best peer |"
        );
        let _ = writeln!(w, "|---|---|---|---|---|");
        for &n in &r.consumer_counts {
            let ratio = consume_ratio_best(r, n);
            let startup = med(consumes(r, "lepus", n).iter().filter_map(|a| {
                // amiquip's start-up clock includes spawning its threads and opening
                // its channels one after another (above): compared only with the peers
                // whose clock starts as lepus's does.
                let best = r
                    .peer_clients
                    .iter()
                    .filter(|c| *c != "amiquip")
                    .flat_map(|c| consumes(r, c, n))
                    .filter(|b| b.round == a.round)
                    .map(|b| b.startup_secs)
                    .fold(f64::NAN, f64::min);
                best.is_finite().then(|| a.startup_secs / best)
            }));
            let status = if !ratio.is_finite() {
                "≥ 1.0×".to_string()
            } else if ratio >= 1.0 {
                "✅ ≥ 1.0×".into()
            } else {
                format!("❌ ≥ 1.0× ({:.1} % short)", (1.0 - ratio) * 100.0)
            };
            let dispatched = consume_ratio_best_of(r, crate::consume_ways::DISPATCH, n);
            let _ = writeln!(
                w,
                "| {n} | {} | {} | {status} | {} |",
                x(ratio),
                x(startup),
                x(dispatched)
            );
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(w, "![Consumer Scalability](consumer_scalability.svg)\n");
}

fn recovery_section(w: &mut String, r: &Results) {
    if r.recovery.is_empty() && r.repeated.is_none() {
        return;
    }
    let _ = writeln!(w, "---\n\n## Recovery Results\n");
    if !r.recovery.is_empty() {
        let _ = writeln!(w, "### Recovery by Failure Type\n");
        let _ = writeln!(
            w,
            "T threads publish with confirms (waiting for each) through an in-process TCP proxy; the fault is injected while they run. All times from the injection (the proxy's reset, or the start of the partition). **Detection**: lepus's `FailureDetected` event. **Woken**: lepus's `WaitersWoken` event. **Last told**: the last thread that was waiting on the link got its error (threads between two calls are not told: they wait for the recovery inside their next call, within its deadline; *told* counts those that were). **Reconnected**: the new connection's handshake is done (`Connected` event). **Channels restored**: lepus reopened every channel with its qos, confirm mode and consumers (`ConsumersRestored`). **Full recovery**: the first publish confirmed on a new connection, verified (`generation()` increased and `local_addr()` changed); **all**: the last thread's. No sleep of the harness is inside any figure. Latency and bandwidth faults stay on during recovery. Medians over repetitions (worst in brackets).\n"
        );
        let _ = writeln!(
            w,
            "| Failure Type | Threads | Runs | Detection | Woken | Last told | Told | Reconnected | Channels restored | Full Recovery | All threads | New connection verified | Deadlocks |"
        );
        let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let mut groups: BTreeMap<(String, usize), Vec<&RecoveryRun>> = BTreeMap::new();
        let mut order = Vec::new();
        for x in &r.recovery {
            let k = (x.fault.label(), x.threads);
            if !groups.contains_key(&k) {
                order.push(k.clone());
            }
            groups.entry(k).or_default().push(x);
        }
        for k in order {
            let g = &groups[&k];
            let mw = |f: &dyn Fn(&RecoveryRun) -> f64| {
                let v: Vec<f64> = g.iter().map(|x| f(x)).collect();
                let worst = v
                    .iter()
                    .copied()
                    .filter(|x| x.is_finite())
                    .fold(f64::NAN, f64::max);
                if g.len() > 1 {
                    format!("{} ({})", ms(median(&v)), ms(worst))
                } else {
                    ms(median(&v))
                }
            };
            let told_min = g.iter().map(|x| x.told).min().unwrap_or(0);
            let rec_min = g.iter().map(|x| x.recovered_threads).min().unwrap_or(0);
            let verified = g.iter().filter(|x| x.new_connection).count();
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {told_min}+/{} | {} | {} | **{}** | {} ({rec_min}+/{} threads) | {verified}/{} | {} |",
                k.0,
                k.1,
                g.len(),
                mw(&|x| x.detection_ms),
                mw(&|x| x.woken_ms),
                mw(&|x| x.told_last_ms),
                k.1,
                mw(&|x| x.connected_ms),
                mw(&|x| x.restored_ms),
                mw(&|x| x.recovery_first_ms),
                mw(&|x| x.recovery_all_ms),
                k.1,
                g.len(),
                g.iter().map(|x| x.deadlocks).sum::<usize>()
            );
        }
        let _ = writeln!(w, "\n![Recovery Times](recovery_times.svg)\n");
    }
    if let Some(rep) = &r.repeated {
        let _ = writeln!(w, "### Repeated Recovery Stress\n");
        let _ = writeln!(
            w,
            "Each iteration resets the link through the proxy (a background publisher keeps traffic going), then publishes with a confirm until one succeeds on a verified new connection; the figure is reset → that confirm.\n"
        );
        let _ = writeln!(w, "| Metric | Value |\n|---|---|");
        let _ = writeln!(
            w,
            "| Iterations (real reconnects asked for) | {} |",
            thousands(rep.iterations as f64)
        );
        let _ = writeln!(
            w,
            "| New connections verified | **{}** |",
            thousands(rep.verified as f64)
        );
        let _ = writeln!(
            w,
            "| TCP connections the proxy accepted meanwhile | {} |",
            thousands(rep.links_accepted as f64)
        );
        let _ = writeln!(w, "| Not recovered within 20 s | {} |", rep.failed);
        let _ = writeln!(w, "| Recovery P50 | **{}** |", ms(rep.lat.p50_ms));
        let _ = writeln!(w, "| Recovery P99 | **{}** |", ms(rep.lat.p99_ms));
        let _ = writeln!(w, "| Recovery max | {} |", ms(rep.lat.max_ms));
        let _ = writeln!(w, "| Samples | {} |", rep.lat.samples);
        let _ = writeln!(
            w,
            "| Stale errors (error of an earlier generation after recovery) | **{}** |",
            rep.stale_errors
        );
        let _ = writeln!(
            w,
            "| Other errors (expected: operations in flight at a reset) | {} |",
            rep.other_errors
        );
        let _ = writeln!(w, "| Duration | {:.1} s |", rep.secs);
        let _ = writeln!(w);
    }
}

fn stability_section(w: &mut String, r: &Results) {
    if r.chaos.is_empty() {
        return;
    }
    let _ = writeln!(w, "---\n\n## Stability Results\n\n### Chaos Tests\n");
    let _ = writeln!(
        w,
        "Chaos: each thread has its own channel (confirm mode) and does random operations (publish with confirm, publish, pool acquire + publish + release, `basic.get` + ack, passive declare, open + close a channel) through the fault proxy, optionally with every link reset every ~0.3 s (±33 %). After the run each thread must get one confirmed publish through (*recovered*: on the final connection generation). Every confirmed message id is then looked for in the queue (*lost*). *Double hand-outs*: a pooled channel id held by two guards at once (checked at every acquire). *Stale*: an operation that started on an open generation and failed with a lost link although that generation had not failed. High contention: 500 threads released by one barrier, each doing pool acquire + publish + release on a pool of 100. *Deadlocks*: threads not joined 60 s after the end.\n"
    );
    let _ = writeln!(
        w,
        "| Test | Threads | Duration | Iterations | Kills | Generations | Deadlocks | Errors | Link errors (expected with kills) | Confirmed | Lost | Duplicates | Double hand-outs | Pool balanced | Stale errors | Recovered |"
    );
    let _ = writeln!(
        w,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for c in &r.chaos {
        let _ = writeln!(
            w,
            "| {} | {} | {:.2} s | {} | {} | {} | **{}** | **{}** | {} | {} | **{}** | {} | **{}** | {} | **{}** | {}/{} |",
            c.name,
            c.threads,
            c.secs,
            thousands(c.iterations as f64),
            c.kills,
            c.generations,
            c.deadlocks,
            c.errors,
            c.link_errors,
            thousands(c.confirmed as f64),
            c.lost,
            c.duplicates,
            c.double_handouts,
            if c.pool_balanced { "yes" } else { "**no**" },
            c.stale_errors,
            c.recovered_threads,
            c.threads
        );
    }
    let _ = writeln!(w);
}

fn memory_section(w: &mut String, r: &Results) {
    let Some(m) = &r.memory else { return };
    let _ = writeln!(w, "---\n\n## Memory\n");
    match m {
        Ok(m) => {
            let _ = writeln!(
                w,
                "A fresh child process: one connection, {n} channels opened and left idle, then a consumer on each (no messages). RSS (`VmRSS` from /proc/self/status) before and after each step; the delta divided by {n}.\n",
                n = m.count
            );
            let _ = writeln!(w, "| Metric | Value |\n|---|---|");
            let _ = writeln!(
                w,
                "| RSS before | {:.1} MiB |",
                m.rss_before as f64 / 1048576.0
            );
            let _ = writeln!(
                w,
                "| RSS with {} channels | {:.1} MiB |",
                m.count,
                m.rss_channels as f64 / 1048576.0
            );
            let _ = writeln!(
                w,
                "| RSS with {} consumers too | {:.1} MiB |",
                m.count,
                m.rss_consumers as f64 / 1048576.0
            );
            let _ = writeln!(w, "| **Per channel** | **{:.0} B** |", m.per_channel());
            let _ = writeln!(w, "| **Per consumer** | **{:.0} B** |", m.per_consumer());
            let _ = writeln!(
                w,
                "| Peak RSS of the child (VmHWM) | {:.1} MiB |",
                m.hwm as f64 / 1048576.0
            );
            let _ = writeln!(w);
        }
        Err(e) => {
            let _ = writeln!(w, "Not measured: {e}\n");
        }
    }
}

fn health_section(w: &mut String, r: &Results) {
    let _ = writeln!(w, "---\n\n## Health Check\n");
    let _ = writeln!(w, "Counted in this run (not assumed):\n");
    let deadlocks: usize = r.chaos.iter().map(|c| c.deadlocks).sum::<usize>()
        + r.recovery.iter().map(|x| x.deadlocks).sum::<usize>();
    let lost: usize = r.chaos.iter().map(|c| c.lost).sum::<usize>()
        + r.consume
            .iter()
            .filter(|c| c.client == "lepus")
            .map(|c| c.lost)
            .sum::<usize>();
    let doubles: usize = r.chaos.iter().map(|c| c.double_handouts).sum();
    let stale: usize = r.chaos.iter().map(|c| c.stale_errors).sum::<usize>()
        + r.repeated.as_ref().map_or(0, |x| x.stale_errors);
    let threads: usize = r.chaos.iter().map(|c| c.threads).sum::<usize>()
        + r.recovery.iter().map(|x| x.threads).sum::<usize>();
    let recovered: usize = r.chaos.iter().map(|c| c.recovered_threads).sum::<usize>()
        + r.recovery
            .iter()
            .map(|x| x.recovered_threads)
            .sum::<usize>();
    let reconnects = r
        .repeated
        .as_ref()
        .map_or((0, 0), |x| (x.verified, x.iterations));
    let checks = [
        (
            deadlocks == 0,
            format!(
                "**Deadlocks:** {deadlocks} (threads not joined by their deadline, chaos and recovery runs)"
            ),
        ),
        (
            lost == 0,
            format!(
                "**Lost messages:** {lost} (confirmed in chaos runs but missing, plus consumer ids never received)"
            ),
        ),
        (
            doubles == 0,
            format!(
                "**Double releases / hand-outs:** {doubles} (a pooled channel id held by two guards at once)"
            ),
        ),
        (
            stale == 0,
            format!(
                "**Stale errors:** {stale} (an error of an earlier generation seen after recovery)"
            ),
        ),
        (
            recovered == threads,
            format!("**Threads recovered:** {recovered} of {threads}"),
        ),
        (
            reconnects.0 == reconnects.1,
            format!(
                "**Reconnects verified new:** {} of {}",
                reconnects.0, reconnects.1
            ),
        ),
    ];
    for (ok, text) in checks {
        let _ = writeln!(w, "- [{}] {text}", if ok { "x" } else { " " });
    }
    let _ = writeln!(w);
}
