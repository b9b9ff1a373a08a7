//! Peer clients for lepus's benchmark suite: lapin (async, driven from std threads with
//! `async_global_executor::block_on`), amqprs (async, tasks on a multi-threaded tokio
//! runtime) and amiquip (sync; channels opened on the connection's thread and moved into
//! the worker threads; TCP_NODELAY set the way its users set it, see amiquip_peer.rs).
//! Each run does exactly what the suite does with lepus and prints one JSON line on
//! stdout, with this process's CPU time over the measured interval (`cpu`).
//!
//! ```text
//! lepus-bench-peers <client> publish <threads> <per_thread> <none|each|window:N>
//! lepus-bench-peers <client> consume <consumers> <messages>
//! lepus-bench-peers <client> consume-steady <queue> <consumers> <messages>
//! lepus-bench-peers <client> consume-drain <queue> <consumers> <messages>
//! lepus-bench-peers clients
//! ```
//! `consume-steady` prints `ready` once every consumer is registered; the suite then
//! writes the messages. `consume-drain` consumes a queue the suite filled.
//! The broker is `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).

#[path = "../../suite/stats.rs"]
mod stats;

#[path = "../../suite/gate.rs"]
mod gate;
pub use gate::Gate;
#[path = "../../suite/cpu.rs"]
mod cpu;

mod amqprs_peer;
mod lapin_peer;
mod ways;

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
    /// This process's CPU from the start barrier until every call returned and one RPC
    /// on the same connection came back (not the polling for the absorbed time).
    pub cpu: cpu::Usage,
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

fn cpu_json(u: &cpu::Usage) -> serde_json::Value {
    json!({"user_us": u.user_us, "sys_us": u.sys_us, "vcsw": u.vcsw, "ivcsw": u.ivcsw})
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["clients"] => {
            let mut v = vec!["lapin", "amqprs"];
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
                "amqprs" => amqprs_peer::publish(threads, per, mode),
                #[cfg(feature = "amiquip")]
                "amiquip" => amiquip_peer::publish(threads, per, mode),
                other => Err(format!("unknown client {other}")),
            };
            match r {
                Ok(o) => println!(
                    "{}",
                    json!({"client": client, "kind": "publish", "threads": threads, "per_thread": per,
                           "call_secs": o.call_secs, "absorbed_secs": o.absorbed_secs,
                           "lat": lat_json(&o.lat), "errors": o.errors, "cpu": cpu_json(&o.cpu)})
                ),
                Err(e) => println!("{}", json!({"client": client, "error": e})),
            }
        }
        [client, "consume", n, messages] => {
            let n: usize = n.parse().expect("consumers");
            let messages: usize = messages.parse().expect("messages");
            let r = match *client {
                "lapin" => lapin_peer::consume(n, messages),
                "amqprs" => amqprs_peer::consume(n, messages),
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
        [
            client,
            way @ ("consume-steady" | "consume-drain"),
            queue,
            n,
            messages,
        ] => {
            let n: usize = n.parse().expect("consumers");
            let messages: usize = messages.parse().expect("messages");
            let drain = *way == "consume-drain";
            let r = match *client {
                "lapin" => lapin_peer::consume_ways(queue, n, messages, drain),
                "amqprs" => amqprs_peer::consume_ways(queue, n, messages, drain),
                #[cfg(feature = "amiquip")]
                "amiquip" => amiquip_peer::consume_ways(queue, n, messages, drain),
                other => Err(format!("unknown client {other}")),
            };
            match r {
                Ok(o) => println!(
                    "{}",
                    json!({"client": client, "kind": way, "consumers": n, "messages": messages,
                           "secs": o.secs, "cpu": cpu_json(&o.cpu), "received": o.received,
                           "duplicates": o.duplicates, "errors": o.errors})
                ),
                Err(e) => println!("{}", json!({"client": client, "error": e})),
            }
        }
        _ => {
            eprintln!(
                "usage: lepus-bench-peers <client> publish <threads> <per_thread> <none|each|window:N>\n       lepus-bench-peers <client> consume <consumers> <messages>\n       lepus-bench-peers <client> consume-steady|consume-drain <queue> <consumers> <messages>\n       lepus-bench-peers clients"
            );
            std::process::exit(2);
        }
    }
}
