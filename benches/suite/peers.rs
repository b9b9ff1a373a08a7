//! Scenario 6: the peer clients (benches/peers, a crate of its own so that lepus's build
//! never pulls lapin or amiquip), built once and run as subprocesses that print one JSON
//! line per run.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common;
use crate::stats::Percentiles;
use crate::throughput::{ConsumeRun, Mode, PublishRun};

pub struct Peers {
    bin: Option<PathBuf>,
    pub clients: Vec<String>,
    /// What happened while building them (shown in the report).
    pub notes: Vec<String>,
    pub versions: Vec<(String, String)>,
    timeout: Duration,
    url: String,
    /// Extra environment of each run (the TLS files of scenario 9).
    env: Vec<(String, String)>,
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Versions of lapin and amiquip from the peers' lock file.
fn locked_versions(dir: &Path) -> Vec<(String, String)> {
    let lock = std::fs::read_to_string(dir.join("Cargo.lock")).unwrap_or_default();
    let mut out = Vec::new();
    let mut name = String::new();
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = n.trim_matches('"').to_owned();
        } else if let Some(v) = line.strip_prefix("version = ")
            && (name == "lapin" || name == "amiquip" || name == "amqprs")
        {
            out.push((name.clone(), v.trim_matches('"').to_owned()));
        }
    }
    out
}

impl Peers {
    /// Build the peers crate (release). If amiquip does not build, build without it and
    /// say why.
    pub fn build(root: &Path, url: &str, quick: bool, build_budget: Duration) -> Peers {
        let dir = root.join("benches/peers");
        let manifest = dir.join("Cargo.toml");
        let mut notes = Vec::new();
        let mut peers = Peers {
            bin: None,
            clients: Vec::new(),
            notes: Vec::new(),
            versions: Vec::new(),
            timeout: Duration::from_secs(if quick { 90 } else { 300 }),
            url: url.to_owned(),
            env: Vec::new(),
        };
        let started = Instant::now();
        let budget_end = started + build_budget;
        // `cargo build`, bounded by what is left of the budget; progress every 15 s.
        let attempt = |features: &[&str]| -> (std::io::Result<std::process::Output>, Duration) {
            let t0 = Instant::now();
            let child = Command::new(cargo())
                .args(["build", "--release", "--quiet", "--manifest-path"])
                .arg(&manifest)
                .args(features)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => return (Err(e), t0.elapsed()),
            };
            // Drain stderr on a thread so that a chatty build cannot block on a full pipe.
            let mut stderr = child.stderr.take().expect("piped stderr");
            let reader = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = stderr.read_to_string(&mut s);
                s
            });
            let mut next_note = Instant::now() + Duration::from_secs(15);
            let status = loop {
                match child.try_wait() {
                    Ok(Some(st)) => break Ok(st),
                    Ok(None) if Instant::now() > budget_end => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break Err(std::io::Error::other(format!(
                            "the peers did not build within the {} s budget (--peers-build-timeout)",
                            build_budget.as_secs()
                        )));
                    }
                    Ok(None) => {
                        if Instant::now() > next_note {
                            common::note(&format!(
                                "still building the peers ({:.0} s)",
                                started.elapsed().as_secs_f64()
                            ));
                            next_note += Duration::from_secs(15);
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => break Err(e),
                }
            };
            let err = reader.join().unwrap_or_default();
            (
                status.map(|status| std::process::Output {
                    status,
                    stdout: Vec::new(),
                    stderr: err.into_bytes(),
                }),
                t0.elapsed(),
            )
        };
        common::note("building the peer clients (benches/peers, release) ...");
        let (out, took) = attempt(&[]);
        let built = match out {
            Ok(o) if o.status.success() => true,
            Err(e) if e.kind() == std::io::ErrorKind::Other => {
                notes.push(format!("No peers in this run: {e}."));
                false
            }
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr).into_owned();
                notes.push(format!(
                    "The peers crate did not build with amiquip on this toolchain; amiquip is left out of this run. The build said:\n\n```\n{}\n```",
                    tail(&err, 12)
                ));
                common::note("amiquip did not build: building the peers without it");
                match attempt(&["--no-default-features"]).0 {
                    Ok(o) if o.status.success() => true,
                    Ok(o) => {
                        notes.push(format!(
                            "lapin did not build either; no peers in this run:\n\n```\n{}\n```",
                            tail(&String::from_utf8_lossy(&o.stderr), 12)
                        ));
                        false
                    }
                    Err(e) => {
                        notes.push(format!("could not run cargo for the peers: {e}"));
                        false
                    }
                }
            }
            Err(e) => {
                notes.push(format!("could not run cargo for the peers: {e}"));
                false
            }
        };
        common::note(&format!("peers build took {:.1} s", took.as_secs_f64()));
        if built {
            let bin = dir.join("target/release/lepus-bench-peers");
            if let Ok(o) = Command::new(&bin).arg("clients").output() {
                let s = String::from_utf8_lossy(&o.stdout);
                if let Ok(v) = serde_json::from_str::<Value>(s.trim()) {
                    peers.clients = v["clients"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                }
            }
            peers.bin = Some(bin);
            peers.versions = locked_versions(&dir)
                .into_iter()
                .filter(|(n, _)| peers.clients.contains(n))
                .collect();
        }
        peers.notes = notes;
        peers
    }

    /// The same peers against another broker address, with extra environment.
    pub fn at(&self, url: &str, env: Vec<(String, String)>) -> Peers {
        Peers {
            bin: self.bin.clone(),
            clients: self.clients.clone(),
            notes: Vec::new(),
            versions: self.versions.clone(),
            timeout: self.timeout,
            url: url.to_owned(),
            env,
        }
    }

    /// Run the peer binary with `args`; its JSON line.
    fn run(&self, args: &[String]) -> Result<Value, String> {
        let bin = self.bin.as_ref().ok_or("the peers are not built")?;
        let mut child = Command::new(bin)
            .args(args)
            .env("AMQP_URL", &self.url)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the peer: {e}"))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "the peer run {args:?} took over {:?}; killed",
                        self.timeout
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e.to_string()),
            }
        }
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut s) = child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(mut s) = child.stderr.take() {
            let _ = s.read_to_string(&mut err);
        }
        let line = out
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .ok_or_else(|| format!("the peer printed no result; stderr: {}", tail(&err, 5)))?;
        let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        if let Some(e) = v.get("error") {
            return Err(e.as_str().unwrap_or("?").to_string());
        }
        // What the peer said on stderr (its own errors), for the report.
        let mut v = v;
        if let Some(line) = err.lines().find(|l| !l.trim().is_empty()) {
            v["stderr"] = Value::String(line.to_owned());
        }
        Ok(v)
    }

    pub fn publish(
        &self,
        client: &str,
        threads: usize,
        per_thread: usize,
        mode: Mode,
    ) -> Result<PublishRun, String> {
        let v = self.run(&[
            client.into(),
            "publish".into(),
            threads.to_string(),
            per_thread.to_string(),
            mode.arg(),
        ])?;
        Ok(PublishRun {
            client: client.to_owned(),
            round: 0,
            mode,
            threads,
            per_thread,
            call_secs: f(&v["call_secs"]),
            absorbed_secs: f(&v["absorbed_secs"]),
            lat: lat(&v["lat"]),
            errors: v["errors"].as_u64().unwrap_or(0) as usize,
            first_error: v["stderr"].as_str().map(str::to_owned),
            cpu: usage(&v["cpu"]),
        })
    }

    pub fn consume(&self, client: &str, n: usize, messages: usize) -> Result<ConsumeRun, String> {
        let v = self.run(&[
            client.into(),
            "consume".into(),
            n.to_string(),
            messages.to_string(),
        ])?;
        Ok(ConsumeRun {
            client: client.to_owned(),
            round: 0,
            consumers: n,
            messages,
            startup_secs: f(&v["startup_secs"]),
            produce_secs: f(&v["produce_secs"]),
            consume_secs: f(&v["consume_secs"]),
            lat: lat(&v["lat"]),
            received: v["received"].as_u64().unwrap_or(0) as usize,
            lost: v["lost"].as_u64().unwrap_or(0) as usize,
            duplicates: v["duplicates"].as_u64().unwrap_or(0) as usize,
            errors: v["errors"].as_u64().unwrap_or(0) as usize,
            first_error: v["stderr"].as_str().map(str::to_owned),
        })
    }
}

impl Peers {
    /// A consume-ways run (`way` is "consume-steady" or "consume-drain") on the suite's
    /// `queue`. Steady: once the peer says `ready`, `produce` writes the messages.
    pub fn consume_way(
        &self,
        client: &str,
        way: &str,
        queue: &str,
        n: usize,
        messages: usize,
        produce: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<Value, String> {
        use std::io::BufRead;
        let bin = self.bin.as_ref().ok_or("the peers are not built")?;
        let mut child = Command::new(bin)
            .args([client, way, queue, &n.to_string(), &messages.to_string()])
            .env("AMQP_URL", &self.url)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the peer: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + self.timeout;
        let mut result = Err(format!(
            "the peer run {way} took over {:?}; killed",
            self.timeout
        ));
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if line == "ready" {
                if let Err(e) = produce() {
                    result = Err(format!("producing for the peer: {e}"));
                    break;
                }
            } else if line.starts_with('{') {
                result = serde_json::from_str::<Value>(&line).map_err(|e| e.to_string());
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let err = err_reader.join().unwrap_or_default();
        let v = result.map_err(|e| format!("{e}; stderr: {}", tail(&err, 3)))?;
        if let Some(e) = v.get("error") {
            return Err(e.as_str().unwrap_or("?").to_string());
        }
        Ok(v)
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The `cpu` object of a peer's line (see benches/peers: `cpu_json`).
pub fn usage(v: &Value) -> crate::cpu::Usage {
    crate::cpu::Usage {
        user_us: f(&v["user_us"]),
        sys_us: f(&v["sys_us"]),
        vcsw: v["vcsw"].as_u64().unwrap_or(0),
        ivcsw: v["ivcsw"].as_u64().unwrap_or(0),
    }
}

fn lat(v: &Value) -> Percentiles {
    Percentiles {
        p50_ms: f(&v["p50_ms"]),
        p99_ms: f(&v["p99_ms"]),
        p999_ms: f(&v["p999_ms"]),
        max_ms: f(&v["max_ms"]),
        samples: v["samples"].as_u64().unwrap_or(0) as usize,
    }
}
