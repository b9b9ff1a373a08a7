//! Scenario 12: failover on the three-node cluster of `scripts/cluster` (AMQP on
//! 5681-5683). Publishers confirm every message (`publish_reliably`, a unique id each)
//! into a quorum queue on all three nodes while consumers count what arrives; the node
//! the connection is on is killed (kill -9), and the time from the signal to the first
//! confirmation received on the new connection is measured, with the recovery time and
//! the lost (confirmed, never consumed) and duplicate counts. Each repetition brings the
//! killed node back before the next. Skipped in quick mode (a cold cluster takes about a
//! minute to start, and each repetition restarts a node).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use lepus::{
    Address, BasicProperties, Connection, ConnectionOptions, ConsumeOptions, FieldTable,
    FieldValue, PublishOptions, QueueDeclareOptions, RecoveryEventKind, RecoveryOptions,
};

use crate::common::{done, ms, step};
use crate::stats::median;

const PORTS: [u16; 3] = [5681, 5682, 5683];
const PUBLISHERS: usize = 8;
const CONSUMERS: usize = 2;

/// One repetition.
#[derive(Debug, Clone)]
pub struct FailoverRun {
    pub killed_port: u16,
    pub new_port: u16,
    /// From the kill -9 to the Recovered event.
    pub recovery_ms: f64,
    /// From the kill -9 to the first confirmation received on the new connection.
    pub first_confirm_ms: f64,
    pub published: u64,
    pub confirmed: u64,
    /// Confirmed publishes that needed more than one attempt (nack or lost link).
    pub retried: u64,
    pub failed: u64,
    pub consumed: u64,
    pub lost: u64,
    pub duplicates: u64,
}

/// What scenario 12 measured, or why it did not run.
#[derive(Debug, Default)]
pub struct FailoverResults {
    pub runs: Vec<FailoverRun>,
    pub errors: Vec<String>,
}

fn cluster(root: &Path, args: &[&str]) -> Result<String, String> {
    let script = root.join("scripts/cluster");
    let o = Command::new(&script)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if o.status.success() {
        Ok(out)
    } else {
        Err(format!("scripts/cluster {}: {out}", args.join(" ")))
    }
}

/// kill -9 the node on `port`; returns the instant the signal was sent.
fn kill(root: &Path, port: u16) -> Result<Instant, String> {
    let status = cluster(root, &["status"])?;
    let name = format!("lepus-c{}@", port - 5680);
    let line = status
        .lines()
        .find(|l| l.starts_with(&name))
        .ok_or_else(|| format!("no {name} in the status: {status}"))?;
    let pids: Vec<&str> = line
        .split("pids=")
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    if pids.is_empty() {
        return Err(format!("{name} has no process: {line}"));
    }
    let at = Instant::now();
    let st = Command::new("kill")
        .arg("-9")
        .args(&pids)
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("kill -9 {pids:?}: {st}"));
    }
    Ok(at)
}

/// Run `reps` repetitions (starting the cluster if it is down; stopping it at the end if
/// this scenario started it).
pub fn run(root: &Path, reps: usize) -> FailoverResults {
    let mut r = FailoverResults::default();
    let was_up = PORTS.iter().all(|&p| {
        std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], p).into(),
            Duration::from_millis(300),
        )
        .is_ok()
    });
    for i in 0..reps {
        step(i + 1, reps, "kill -9 of the connected node under load");
        let outcome = cluster(root, &["start"]).and_then(|_| once(root, i));
        match outcome {
            Ok(run) => {
                done(&format!(
                    "{} -> {}: first confirm on the new node after {}, recovered after {}; confirmed {}, lost {}, duplicates {}",
                    run.killed_port,
                    run.new_port,
                    ms(run.first_confirm_ms),
                    ms(run.recovery_ms),
                    run.confirmed,
                    run.lost,
                    run.duplicates
                ));
                r.runs.push(run);
            }
            Err(e) => {
                done(&format!("failed: {e}"));
                r.errors.push(e);
            }
        }
    }
    if let Err(e) = cluster(root, &["start"]) {
        r.errors.push(e);
    }
    if !was_up {
        let _ = cluster(root, &["stop"]);
    }
    r
}

#[derive(Default)]
struct Tally {
    published: u64,
    confirmed: Vec<String>,
    retried: u64,
    failed: u64,
    consumed: HashMap<String, u64>,
    /// Confirmations received on a later connection generation, by when.
    first_on_new: Option<Instant>,
}

fn once(root: &Path, rep: usize) -> Result<FailoverRun, String> {
    let opts = ConnectionOptions::new()
        .addresses_list(PORTS.iter().map(|&p| Address::new("127.0.0.1", p)))
        .connection_timeout(Duration::from_secs(2))
        .operation_timeout(Duration::from_secs(10))
        .heartbeat(5)
        .recovery(
            RecoveryOptions::new().backoff(Duration::from_millis(100), Duration::from_secs(1)),
        );
    let conn = Connection::open_with(opts).map_err(|e| e.to_string())?;
    let killed_port = conn.address().port;
    let q = format!("lepus-bench-failover-{}-{rep}", std::process::id());
    let mut arguments = FieldTable::new();
    arguments.insert("x-queue-type", FieldValue::from("quorum"));
    let qopts = QueueDeclareOptions {
        durable: true,
        arguments,
        ..Default::default()
    };
    let setup = conn.open_channel().map_err(|e| e.to_string())?;
    setup.queue_declare(&q, &qopts).map_err(|e| e.to_string())?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop_pub = Arc::new(AtomicBool::new(false));
    let stop_cons = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        let ch = conn.open_channel().map_err(|e| e.to_string())?;
        ch.basic_qos(200, false).map_err(|e| e.to_string())?;
        let c = ch
            .basic_consume(&q, &ConsumeOptions::default())
            .map_err(|e| e.to_string())?;
        let (tally, stop) = (tally.clone(), stop_cons.clone());
        consumers.push(thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if let Ok(Some(d)) = c.recv_timeout(Duration::from_millis(100)) {
                    let id = String::from_utf8_lossy(d.body()).into_owned();
                    *tally.lock().unwrap().consumed.entry(id).or_insert(0) += 1;
                    let _ = d.ack();
                }
            }
        }));
    }
    let mut publishers = Vec::new();
    for t in 0..PUBLISHERS {
        let ch = conn.open_channel().map_err(|e| e.to_string())?;
        ch.confirm_select().map_err(|e| e.to_string())?;
        let (tally, stop, q, conn) = (tally.clone(), stop_pub.clone(), q.clone(), conn.clone());
        publishers.push(thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let id = format!("{t}-{i}");
                i += 1;
                tally.lock().unwrap().published += 1;
                let r = ch.publish_reliably(
                    "",
                    &q,
                    id.as_bytes(),
                    &BasicProperties::default(),
                    &PublishOptions::default(),
                    Instant::now() + Duration::from_secs(30),
                );
                let now = Instant::now();
                let generation = conn.generation();
                let mut t = tally.lock().unwrap();
                match r {
                    Ok(n) => {
                        t.retried += u64::from(n > 1);
                        t.confirmed.push(id);
                        if generation > 1 && t.first_on_new.is_none() {
                            t.first_on_new = Some(now);
                        }
                    }
                    Err(_) => t.failed += 1,
                }
            }
        }));
    }
    thread::sleep(Duration::from_secs(2));
    let killed = kill(root, killed_port)?;
    let deadline = killed + Duration::from_secs(30);
    let recovered = loop {
        let at = conn
            .recovery_events()
            .iter()
            .find(|e| e.kind == RecoveryEventKind::Recovered && e.at > killed)
            .map(|e| e.at);
        if let Some(at) = at {
            break at;
        }
        if Instant::now() > deadline {
            return Err("no recovery within 30 s of the kill".into());
        }
        thread::sleep(Duration::from_millis(10));
    };
    thread::sleep(Duration::from_secs(2));
    stop_pub.store(true, Ordering::Release);
    for p in publishers {
        let _ = p.join();
    }
    let drain = Instant::now() + Duration::from_secs(20);
    while Instant::now() < drain {
        let t = tally.lock().unwrap();
        if t.confirmed.iter().all(|id| t.consumed.contains_key(id)) {
            break;
        }
        drop(t);
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(300));
    stop_cons.store(true, Ordering::Release);
    for c in consumers {
        let _ = c.join();
    }
    let _ = setup.queue_delete(&q, &Default::default());
    let t = tally.lock().unwrap();
    let first = t
        .first_on_new
        .ok_or("no confirmation on the new connection")?;
    Ok(FailoverRun {
        killed_port,
        new_port: conn.address().port,
        recovery_ms: recovered.duration_since(killed).as_secs_f64() * 1000.0,
        first_confirm_ms: first.saturating_duration_since(killed).as_secs_f64() * 1000.0,
        published: t.published,
        confirmed: t.confirmed.len() as u64,
        retried: t.retried,
        failed: t.failed,
        consumed: t.consumed.len() as u64,
        lost: t
            .confirmed
            .iter()
            .filter(|id| !t.consumed.contains_key(*id))
            .count() as u64,
        duplicates: t.consumed.values().map(|n| n - 1).sum(),
    })
}

/// The report's section: `None` when the scenario was not asked for, `Err` when skipped.
pub fn section(w: &mut String, r: &Option<Result<FailoverResults, String>>) {
    let Some(r) = r else {
        return;
    };
    let _ = writeln!(w, "## Cluster failover\n");
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(w, "Not measured: {e}\n");
            return;
        }
    };
    let _ = writeln!(
        w,
        "Three RabbitMQ nodes on this machine (`scripts/cluster`), one quorum queue on all three; {PUBLISHERS} threads publishing with `publish_reliably` (each message confirmed, a unique id each) and {CONSUMERS} consuming, on one connection given the three addresses. The node the connection is on is killed with kill -9; times are from the signal. {} repetitions{}.\n",
        r.runs.len(),
        if r.errors.is_empty() {
            String::new()
        } else {
            format!(", {} failed: {}", r.errors.len(), r.errors.join("; "))
        }
    );
    if r.runs.is_empty() {
        return;
    }
    let first: Vec<f64> = r.runs.iter().map(|x| x.first_confirm_ms).collect();
    let rec: Vec<f64> = r.runs.iter().map(|x| x.recovery_ms).collect();
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let _ = writeln!(
        w,
        "| | median | max |\n|---|---|---|\n| kill -9 → first confirmed publish on another node | {} | {} |\n| kill -9 → connection recovered (topology, consumers, republished) | {} | {} |\n",
        ms(median(&first)),
        ms(max(&first)),
        ms(median(&rec)),
        ms(max(&rec))
    );
    let _ = writeln!(
        w,
        "| Repetition | killed → new | first confirm | recovered | published | confirmed | retried | failed | consumed | lost | duplicates |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for (i, x) in r.runs.iter().enumerate() {
        let _ = writeln!(
            w,
            "| {} | {} → {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            i + 1,
            x.killed_port,
            x.new_port,
            ms(x.first_confirm_ms),
            ms(x.recovery_ms),
            x.published,
            x.confirmed,
            x.retried,
            x.failed,
            x.consumed,
            x.lost,
            x.duplicates
        );
    }
    let _ = writeln!(
        w,
        "\nLost counts confirmed messages never consumed (must be 0); duplicates are messages consumed twice (at-least-once: a message whose confirmation was lost with the node is published again, and deliveries unacknowledged at the kill are redelivered).\n"
    );
}
