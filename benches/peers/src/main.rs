//! Peer clients for lepus's benchmark suite: lapin (async, driven from std threads with
//! `async_global_executor::block_on`) and amiquip (sync; channels opened on the
//! connection's thread and moved into the worker threads). Each run does exactly what
//! the suite does with lepus and prints one JSON line on stdout.
//!
//! ```text
//! lepus-bench-peers <lapin|amiquip> publish <threads> <per_thread> <none|each|window:N>
//! lepus-bench-peers <lapin|amiquip> consume <consumers> <messages>
//! lepus-bench-peers clients
//! ```
//! The broker is `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).

#[path = "../../suite/stats.rs"]
mod stats;

mod lapin_peer;

#[cfg(feature = "amiquip")]
mod amiquip_peer;

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use stats::Percentiles;

pub const BODY: usize = 64;
pub const PREFETCH: u16 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    None,
    Each,
    Window(usize),
}

fn parse_mode(s: &str) -> Mode {
    match s {
        "none" => Mode::None,
        "each" => Mode::Each,
        w => Mode::Window(
            w.strip_prefix("window:")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unknown mode {w:?}")),
        ),
    }
}

/// Result of one publish run (same fields as the suite's).
pub struct PublishOut {
    pub call_secs: f64,
    pub absorbed_secs: f64,
    pub lat: Percentiles,
    pub errors: usize,
}

/// Result of one consumer run (same fields as the suite's).
pub struct ConsumeOut {
    pub startup_secs: f64,
    pub produce_secs: f64,
    pub consume_secs: f64,
    pub lat: Percentiles,
    pub received: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub errors: usize,
}

pub fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("lepus-bench-peer.{prefix}.{}.{nanos:x}", std::process::id())
}

/// Nanoseconds since a process-wide origin (the clock of body timestamps).
pub fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn lat_json(l: &Percentiles) -> serde_json::Value {
    json!({"p50_ms": l.p50_ms, "p99_ms": l.p99_ms, "p999_ms": l.p999_ms, "max_ms": l.max_ms, "samples": l.samples})
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["clients"] => {
            let mut v = vec!["lapin"];
            if cfg!(feature = "amiquip") {
                v.push("amiquip");
            }
            println!("{}", json!({"clients": v}));
        }
        [client, "publish", threads, per, mode] => {
            let threads: usize = threads.parse().expect("threads");
            let per: usize = per.parse().expect("per_thread");
            let mode = parse_mode(mode);
            let r = match *client {
                "lapin" => lapin_peer::publish(threads, per, mode),
                #[cfg(feature = "amiquip")]
                "amiquip" => amiquip_peer::publish(threads, per, mode),
                other => Err(format!("unknown client {other}")),
            };
            match r {
                Ok(o) => println!(
                    "{}",
                    json!({"client": client, "kind": "publish", "threads": threads, "per_thread": per,
                           "call_secs": o.call_secs, "absorbed_secs": o.absorbed_secs,
                           "lat": lat_json(&o.lat), "errors": o.errors})
                ),
                Err(e) => println!("{}", json!({"client": client, "error": e})),
            }
        }
        [client, "consume", n, messages] => {
            let n: usize = n.parse().expect("consumers");
            let messages: usize = messages.parse().expect("messages");
            let r = match *client {
                "lapin" => lapin_peer::consume(n, messages),
                #[cfg(feature = "amiquip")]
                "amiquip" => amiquip_peer::consume(n, messages),
                other => Err(format!("unknown client {other}")),
            };
            match r {
                Ok(o) => println!(
                    "{}",
                    json!({"client": client, "kind": "consume", "consumers": n, "messages": messages,
                           "startup_secs": o.startup_secs, "produce_secs": o.produce_secs,
                           "consume_secs": o.consume_secs, "lat": lat_json(&o.lat),
                           "received": o.received, "lost": o.lost, "duplicates": o.duplicates,
                           "errors": o.errors})
                ),
                Err(e) => println!("{}", json!({"client": client, "error": e})),
            }
        }
        _ => {
            eprintln!(
                "usage: lepus-bench-peers <lapin|amiquip> publish <threads> <per_thread> <none|each|window:N>\n       lepus-bench-peers <lapin|amiquip> consume <consumers> <messages>\n       lepus-bench-peers clients"
            );
            std::process::exit(2);
        }
    }
}
