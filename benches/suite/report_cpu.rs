//! The report's tables for the ceiling probes (scenario 7), the client CPU time per
//! message (publish and consume) and consume measured two ways, with their targets.
//! Figures are medians over rounds; ratios are ratios of those medians.

use std::fmt::Write;

use crate::Results;
use crate::ceiling::CeilingRun;
use crate::common::thousands;
use crate::consume_ways::{DISPATCH, Way, WaysRun, dispatch_threads};
use crate::stats::median;
use crate::throughput::{Mode, PublishRun};

fn med(v: impl Iterator<Item = f64>) -> f64 {
    median(&v.filter(|x| x.is_finite()).collect::<Vec<_>>())
}

fn x(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}×")
    } else {
        "–".into()
    }
}

fn us(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "–".into()
    }
}

fn rate(v: f64) -> String {
    if v.is_finite() {
        thousands(v)
    } else {
        "–".into()
    }
}

fn publish_runs<'a>(
    r: &'a Results,
    client: &str,
    t: usize,
    m: usize,
    mode: Mode,
) -> Vec<&'a PublishRun> {
    r.publish
        .iter()
        .filter(|p| p.client == client && (p.threads, p.per_thread, p.mode) == (t, m, mode))
        .collect()
}

fn probe_runs<'a>(r: &'a Results, kind: &str, t: usize, m: usize) -> Vec<&'a CeilingRun> {
    r.ceiling
        .iter()
        .chain(&r.probes)
        .filter(|c| c.kind == kind && c.threads == t && c.per_thread == m)
        .collect()
}

/// Median absorbed rate of a client (lepus, a peer) or a probe kind.
fn abs_rate(r: &Results, who: &str, t: usize, m: usize, mode: Mode) -> f64 {
    let p = probe_runs(r, who, t, m);
    if !p.is_empty() {
        return med(p.iter().map(|c| c.absorbed_rate()));
    }
    med(publish_runs(r, who, t, m, mode)
        .iter()
        .map(|p| p.absorbed_rate()))
}

fn cpu_per_msg(r: &Results, who: &str, t: usize, m: usize, mode: Mode) -> f64 {
    let p = probe_runs(r, who, t, m);
    if !p.is_empty() {
        return med(p.iter().map(|c| c.cpu_us_per_msg()));
    }
    med(publish_runs(r, who, t, m, mode)
        .iter()
        .map(|p| p.cpu_us_per_msg()))
}

/// The peer with the highest median rate (`higher` true) or lowest CPU per message.
fn best_peer(r: &Results, f: impl Fn(&str) -> f64, higher: bool) -> (f64, String) {
    let mut best = (f64::NAN, String::new());
    for c in &r.peer_clients {
        let v = f(c);
        if v.is_finite() && (best.0.is_nan() || (higher && v > best.0) || (!higher && v < best.0)) {
            best = (v, c.clone());
        }
    }
    best
}

/// The probes table: publish without confirms against the one-socket ceiling and the
/// 4-socket probe; confirm each against the lock-step probes.
pub fn ceiling_section(w: &mut String, r: &Results) {
    if r.ceiling.is_empty() && r.probes.is_empty() {
        return;
    }
    let _ = writeln!(w, "### Ceiling probes\n");
    let _ = writeln!(
        w,
        "Hand-made AMQP clients that do nothing but write pre-encoded frames (64-byte bodies), pipelined, in writes of up to {} KiB (no per-frame syscall), one thread per socket, no hand-off, TCP_NODELAY. **ceiling**: T channels × M publishes without confirms on one socket, channels taking turns in bursts of {}; **lockstep**: the confirm-each ceiling, T channels in confirm mode on one socket, one thread, each channel publishing its next message when its `basic.ack` arrives, the acks of one read answered with one write. **4conn**: the same work over {} sockets (a thread each): when it is not faster than one socket, the broker (one queue), not the connection, is the limit. The burst and write sizes are the fastest of the shapes compared on this machine (a strict round robin, or the whole run in one write as the earlier probe did, were slower; `LEPUS_PROBE_BURST` and `LEPUS_PROBE_CHUNK` override them to compare again). Same T × M and rounds as above; CPU: the probe threads' own user + system time per message (getrusage RUSAGE_THREAD).\n",
        crate::ceiling::chunk() / 1024,
        crate::ceiling::burst(),
        crate::ceiling::SOCKETS
    );
    let _ = writeln!(
        w,
        "| Configuration | mode | lepus | ceiling (1 socket) | 4 sockets | lepus / ceiling | lepus / 4 sockets | probe CPU µs/msg | lepus CPU µs/msg |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|");
    for &(t, m) in &r.publish_configs {
        for (mode, one, four) in [
            (Mode::None, "ceiling", "ceiling-4conn"),
            (Mode::Each, "lockstep", "lockstep-4conn"),
        ] {
            let c1 = abs_rate(r, one, t, m, mode);
            let c4 = abs_rate(r, four, t, m, mode);
            if !c1.is_finite() && !c4.is_finite() {
                continue;
            }
            let l = abs_rate(r, "lepus", t, m, mode);
            let _ = writeln!(
                w,
                "| {t} × {m} | {} | {} | {} | {} | {} | {} | {} | {} |",
                mode.label(),
                rate(l),
                rate(c1),
                rate(c4),
                x(l / c1),
                x(l / c4),
                us(cpu_per_msg(r, one, t, m, mode)),
                us(cpu_per_msg(r, "lepus", t, m, mode)),
            );
        }
    }
    let _ = writeln!(w);
}

/// Client CPU time per message, publish: lepus, each peer, the probe.
pub fn cpu_section(w: &mut String, r: &Results) {
    if r.publish.is_empty() {
        return;
    }
    let _ = writeln!(w, "### Client CPU time per message — publish\n");
    let _ = writeln!(
        w,
        "User + system CPU time of the client's process (`getrusage(RUSAGE_SELF)` before and after), from the start signal until every call returned and one RPC on the same connection came back (so every publish was written; the polling for the absorbed time is left out), divided by the messages: lepus in the suite's process, each peer in its own; the probe: its threads' own time. µs per message, medians over rounds; lower is better.\n"
    );
    let _ = writeln!(
        w,
        "**Blocking floor** (confirm each): what a client whose publisher threads block until each confirm pays before any AMQP work, measured in the same rounds with no broker (`floor.rs`; `benches/results/wake-floor.md`): T threads each write an id to a loopback TCP socket (TCP_NODELAY) and sleep on a condition variable; one reader thread, woken by the socket, wakes the thread of each id it read. The process's CPU per round trip. **floor / lowest peer** above 0.5× means the CPU target is out of reach, on this machine, for a client built as lepus is (each publisher writes its publish and blocks until its confirm; a dedicated thread reads the socket).\n"
    );
    let mut head = "| Configuration | mode | lepus |".to_string();
    let mut rule = "|---|---|---|".to_string();
    for c in &r.peer_clients {
        let _ = write!(head, " {c} |");
        rule.push_str("---|");
    }
    let _ = writeln!(
        w,
        "{head} probe | blocking floor | lepus / lowest peer | floor / lowest peer |"
    );
    let _ = writeln!(w, "{rule}---|---|---|---|");
    for &(t, m) in &r.publish_configs {
        for &mode in &r.modes {
            let l = cpu_per_msg(r, "lepus", t, m, mode);
            if !l.is_finite() {
                continue;
            }
            let mut row = format!("| {t} × {m} | {} | {} |", mode.label(), us(l));
            for c in &r.peer_clients {
                let _ = write!(row, " {} |", us(cpu_per_msg(r, c, t, m, mode)));
            }
            let probe = match mode {
                Mode::None => cpu_per_msg(r, "ceiling", t, m, mode),
                Mode::Each => cpu_per_msg(r, "lockstep", t, m, mode),
                Mode::Window(_) => f64::NAN,
            };
            let floor = match mode {
                Mode::Each => cpu_per_msg(r, "wake-floor", t, m, mode),
                _ => f64::NAN,
            };
            let (best, name) = best_peer(r, |c| cpu_per_msg(r, c, t, m, mode), false);
            let ratio = |v: f64| {
                if best.is_finite() && v.is_finite() {
                    format!("{} ({name})", x(v / best))
                } else {
                    "–".into()
                }
            };
            let _ = writeln!(
                w,
                "{row} {} | {} | {} | {} |",
                us(probe),
                us(floor),
                ratio(l),
                ratio(floor)
            );
        }
    }
    let _ = writeln!(w);
}

fn ways_runs<'a>(r: &'a Results, client: &str, way: Way, n: usize) -> Vec<&'a WaysRun> {
    r.consume_ways
        .iter()
        .filter(|c| c.client == client && c.way == way && c.consumers == n)
        .collect()
}

fn ways_rate(r: &Results, client: &str, way: Way, n: usize) -> f64 {
    med(ways_runs(r, client, way, n).iter().map(|c| c.rate()))
}

fn ways_cpu(r: &Results, client: &str, way: Way, n: usize) -> f64 {
    med(ways_runs(r, client, way, n)
        .iter()
        .map(|c| c.cpu_us_per_msg()))
}

/// Consume, two ways, with CPU per message.
pub fn consume_section(w: &mut String, r: &Results) {
    if r.consume_ways.is_empty() {
        return;
    }
    let msgs = r.consume_ways.first().map(|c| c.messages).unwrap_or(0);
    let _ = writeln!(w, "### Consume, measured two ways\n");
    let _ = writeln!(
        w,
        "N consumers on one connection (a channel each, prefetch {}, manual acks) on one queue, {} messages of 64 bytes from a raw-socket producer in the suite (pre-encoded, large writes; the same for every client, and its own CPU is not the client's). **Steady**: every consumer registered first, then the messages arrive and the broker pushes them; from the first write (lepus) or the peer's `ready` line to the last delivery. **Drain**: the queue is filled first; from before the first consumer registers (channel open, qos, consume: one round trip with lepus's `open_consumer`, three for the peers) to the last delivery. CPU: the consuming process's user + system time over that interval per message (for lepus the producer thread's own time, from `RUSAGE_THREAD`, is taken out). Medians over rounds. **lepus** serves each consumer with a thread of its own blocked in `recv` (as amiquip and lapin do); **lepus dispatcher** serves them all with a `Dispatcher` of {} threads, a handler per consumer (as amqprs runs its consumers as tasks on a tokio runtime of as many threads).\n",
        crate::throughput::PREFETCH,
        thousands(msgs as f64),
        dispatch_threads()
    );
    let dispatched = r.consume_ways.iter().any(|c| c.client == DISPATCH);
    let mut head = "| way | consumers | lepus msg/s | lepus µs/msg |".to_string();
    let mut rule = "|---|---|---|---|".to_string();
    if dispatched {
        head.push_str(" lepus dispatcher msg/s | lepus dispatcher µs/msg |");
        rule.push_str("---|---|");
    }
    for c in &r.peer_clients {
        let _ = write!(head, " {c} msg/s | {c} µs/msg |");
        rule.push_str("---|---|");
    }
    let _ = write!(
        w,
        "{head} lepus / best peer (rate) | lepus / lowest peer (CPU) |"
    );
    if dispatched {
        let _ = write!(
            w,
            " dispatcher / best peer (rate) | dispatcher / lowest peer (CPU) |"
        );
        rule.push_str("---|---|");
    }
    let _ = writeln!(w, "\n{rule}---|---|");
    for way in [Way::Steady, Way::Drain] {
        for &n in &r.consumer_counts {
            let lr = ways_rate(r, "lepus", way, n);
            let lc = ways_cpu(r, "lepus", way, n);
            if !lr.is_finite() {
                continue;
            }
            let mut row = format!("| {} | {n} | {} | {} |", way.arg(), rate(lr), us(lc));
            let (dr, dc) = (
                ways_rate(r, DISPATCH, way, n),
                ways_cpu(r, DISPATCH, way, n),
            );
            if dispatched {
                let _ = write!(row, " {} | {} |", rate(dr), us(dc));
            }
            for c in &r.peer_clients {
                let _ = write!(
                    row,
                    " {} | {} |",
                    rate(ways_rate(r, c, way, n)),
                    us(ways_cpu(r, c, way, n))
                );
            }
            let (br, _) = best_peer(r, |c| ways_rate(r, c, way, n), true);
            let (bc, _) = best_peer(r, |c| ways_cpu(r, c, way, n), false);
            let _ = write!(w, "{row} {} | {} |", x(lr / br), x(lc / bc));
            if dispatched {
                let _ = write!(w, " {} | {} |", x(dr / br), x(dc / bc));
            }
            let _ = writeln!(w);
        }
    }
    let _ = writeln!(w);
}

/// Targets from issue 16 measured here: (what, measured, shown, goal, at least?).
pub fn targets(r: &Results) -> Vec<(String, f64, String, f64, bool)> {
    let mut out = Vec::new();
    let worst = |f: &dyn Fn(usize, usize) -> f64, skip900: bool| -> (f64, String) {
        let mut worst = (f64::NAN, String::new());
        for &(t, m) in &r.publish_configs {
            if skip900 && t == 900 {
                continue;
            }
            let v = f(t, m);
            if v.is_finite() && (worst.0.is_nan() || v > worst.0) {
                worst = (v, format!("{t}×{m}"));
            }
        }
        worst
    };
    let lowest = |f: &dyn Fn(usize, usize) -> f64| worst(&|t, m| -f(t, m), false);
    if !r.probes.is_empty() {
        let (v, at) = lowest(&|t, m| {
            abs_rate(r, "lepus", t, m, Mode::Each) / abs_rate(r, "lockstep", t, m, Mode::Each)
        });
        out.push((
            "publish, confirm each: absorbed rate vs lock-step ceiling, every T".into(),
            -v,
            format!("{} (lowest, at {at})", x(-v)),
            0.7,
            true,
        ));
    }
    if !r.peer_clients.is_empty() {
        for mode in [Mode::None, Mode::Each] {
            let (v, at) = worst(
                &|t, m| {
                    let (b, _) = best_peer(r, |c| cpu_per_msg(r, c, t, m, mode), false);
                    cpu_per_msg(r, "lepus", t, m, mode) / b
                },
                false,
            );
            // With confirm each: what the blocking floor alone is against the lowest
            // peer, at its lowest (how far below it the target is at best).
            let floor = if mode == Mode::Each {
                let (f, fat) = lowest(&|t, m| {
                    let (b, _) = best_peer(r, |c| cpu_per_msg(r, c, t, m, mode), false);
                    cpu_per_msg(r, "wake-floor", t, m, mode) / b
                });
                if f.is_finite() {
                    format!("; the blocking floor alone: {} at best (at {fat})", x(-f))
                } else {
                    String::new()
                }
            } else {
                String::new()
            };
            out.push((
                format!(
                    "client CPU per message, publish {}: lepus / lowest peer, every T",
                    mode.label()
                ),
                v,
                format!("{} (highest, at {at}){floor}", x(v)),
                0.5,
                false,
            ));
        }
        for (client, what) in [("lepus", "lepus"), (DISPATCH, "lepus's dispatcher")] {
            let mut worst_c = (f64::NAN, String::new());
            for way in [Way::Steady, Way::Drain] {
                for &n in &r.consumer_counts {
                    let (b, _) = best_peer(r, |c| ways_cpu(r, c, way, n), false);
                    let v = ways_cpu(r, client, way, n) / b;
                    if v.is_finite() && (worst_c.0.is_nan() || v > worst_c.0) {
                        worst_c = (v, format!("{} {n}", way.arg()));
                    }
                }
            }
            if worst_c.0.is_finite() {
                out.push((
                    format!(
                        "client CPU per message, consume: {what} / lowest peer, both ways, every N"
                    ),
                    worst_c.0,
                    format!("{} (highest, at {})", x(worst_c.0), worst_c.1),
                    0.5,
                    false,
                ));
            }
        }
    }
    out
}
