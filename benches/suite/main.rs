//! lepus's benchmark suite: every scenario against the local RabbitMQ (`AMQP_URL`
//! overrides), progress on stderr, a report in benches/results/report.md with SVG charts.
//!
//! ```text
//! cargo bench -p lepus-bench-suite               # the full run (tens of minutes)
//! cargo bench -p lepus-bench-suite -- --quick    # a small version of everything (minutes),
//!                                                # written to benches/results/quick/
//! options: --only 1,4,8   scenarios to run (1 publish, 2 pool, 3 consumers, 4 recovery,
//!                         5 stability, 6 peers, 7 ceiling, 8 memory, 9 TLS against
//!                         plaintext on the node of scripts/tls-node, 10 observability
//!                         cost: publish with the metrics recorder on and off, 11 worker
//!                         pool against plain consumers, 12 failover on the cluster of
//!                         scripts/cluster, skipped in quick mode)
//!          --rounds N     rounds of the lepus/peer comparison (default 3, quick 1)
//!          --no-peers     skip building and running the peers (lapin, amqprs, amiquip)
//!          --peers        build and run the peers in quick mode too (quick mode skips
//!                         them by default, and its report says so)
//!          --out DIR      where the report goes
//!          --configs 900x10,4x25000   publish configurations (threads x messages) to
//!                         run instead of the five default ones (scenarios 1, 6, 7)
//!          --modes none,each,window:100   publish modes to run (default: all three)
//! ```
//! Scenario 7 runs four probes beside lepus: `ceiling` and `ceiling-4conn` (publish
//! without confirms, ceiling.rs) and `lockstep` and `lockstep-4conn` (confirm each,
//! lockstep.rs), and with confirm each the `wake-floor` (floor.rs: the CPU a blocking
//! wait per message costs a thread-per-publisher client, with no broker). Every client's
//! CPU time per message is measured with getrusage (cpu.rs).

mod ceiling;
mod charts;
mod common;
mod consume_ways;
mod cpu;
mod failover;
mod floor;
mod gate;
mod lockstep;
mod memory;
mod observability;
mod peers;
mod recovery;
mod report;
mod report_cpu;
mod stability;
mod stats;
mod throughput;
mod tls;
mod worker_pool;

use std::path::PathBuf;
use std::time::Duration;

use common::{Settings, done, ms, note, section, settle, step, thousands};
use throughput::Mode;

const TOTAL: u32 = 12;

/// Everything measured in one run.
#[derive(Default)]
pub struct Results {
    /// Per (config, mode), the runs of each client over the rounds (interleaved).
    pub publish: Vec<throughput::PublishRun>,
    /// The one-socket publish probe ("ceiling").
    pub ceiling: Vec<ceiling::CeilingRun>,
    /// The other probes: "ceiling-4conn", "lockstep", "lockstep-4conn", and the blocking
    /// floor's runs ("wake-floor").
    pub probes: Vec<ceiling::CeilingRun>,
    pub pool: Vec<throughput::PoolRun>,
    pub consume: Vec<throughput::ConsumeRun>,
    /// Consume measured two ways (steady, drain), with CPU per message.
    pub consume_ways: Vec<consume_ways::WaysRun>,
    /// (consumers, round, seconds): raw-socket pipelined startup, the broker's floor.
    pub consumer_floor: Vec<(usize, usize, f64)>,
    pub recovery: Vec<recovery::RecoveryRun>,
    pub repeated: Option<recovery::RepeatedRun>,
    pub chaos: Vec<stability::ChaosRun>,
    pub memory: Option<Result<memory::MemoryRun, String>>,
    pub tls: Option<Result<tls::TlsResults, String>>,
    pub observability: Vec<observability::ObsRun>,
    pub worker_pool: Vec<worker_pool::WorkerPoolRun>,
    pub failover: Option<Result<failover::FailoverResults, String>>,
    pub peer_clients: Vec<String>,
    pub peer_notes: Vec<String>,
    pub peer_versions: Vec<(String, String)>,
    pub errors: Vec<String>,
    /// Remarks about how this run went (shown under the environment).
    pub notes: Vec<String>,
    /// Scenarios that panicked.
    pub failed: Vec<String>,
    pub publish_configs: Vec<(usize, usize)>,
    pub modes: Vec<Mode>,
    pub consumer_counts: Vec<usize>,
}

/// The repository's root: this package is benches/suite, and the report goes to the
/// root's benches/results/, the peers crate is the root's benches/peers/.
fn repo_root() -> PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .expect("benches/suite has a grandparent")
        .to_path_buf()
}

fn parse_args() -> (Settings, Option<usize>) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let root = repo_root();
    let mut s = Settings {
        quick: false,
        url,
        rounds: 0,
        only: Vec::new(),
        peers: true,
        peers_build_timeout: None,
        out_dir: PathBuf::new(),
        configs: Vec::new(),
        modes: Vec::new(),
    };
    let mut out = None;
    let mut child = None;
    let mut i = 0;
    let mut peers_flag = None;
    while i < args.len() {
        match args[i].as_str() {
            "--quick" => s.quick = true,
            "--no-peers" => peers_flag = Some(false),
            "--peers" => peers_flag = Some(true),
            "--peers-build-timeout" => {
                i += 1;
                s.peers_build_timeout = args.get(i).and_then(|x| x.parse().ok());
            }
            "--rounds" => {
                i += 1;
                s.rounds = args.get(i).and_then(|x| x.parse().ok()).unwrap_or(0);
            }
            "--only" => {
                i += 1;
                s.only = args
                    .get(i)
                    .map(|x| x.split(',').filter_map(|n| n.trim().parse().ok()).collect())
                    .unwrap_or_default();
            }
            "--configs" => {
                i += 1;
                s.configs = args
                    .get(i)
                    .map(|x| {
                        x.split(',')
                            .filter_map(|c| {
                                let (t, m) = c.trim().split_once(['x', '×'])?;
                                Some((t.parse().ok()?, m.parse().ok()?))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
            }
            "--modes" => {
                i += 1;
                s.modes = args
                    .get(i)
                    .map(|x| x.split(',').map(|m| m.trim().to_owned()).collect())
                    .unwrap_or_default();
            }
            "--out" => {
                i += 1;
                out = args.get(i).map(PathBuf::from);
            }
            "--child-memory" => {
                i += 1;
                child = args.get(i).and_then(|x| x.parse().ok());
            }
            // `cargo bench` passes --bench; anything else unknown is ignored with a word.
            "--bench" => {}
            other => eprintln!("suite: ignoring argument {other:?}"),
        }
        i += 1;
    }
    // Quick mode (CI, a time budget of minutes) skips the peers unless asked: building
    // lapin, amqprs and amiquip from cold takes longer than the whole budget here.
    s.peers = peers_flag.unwrap_or(!s.quick);
    if s.rounds == 0 {
        s.rounds = if s.quick { 1 } else { 3 };
    }
    s.out_dir = out.unwrap_or_else(|| {
        if s.quick {
            root.join("benches/results/quick")
        } else {
            root.join("benches/results")
        }
    });
    (s, child)
}

fn main() {
    common::start_clock();
    let (s, child) = parse_args();
    if let Some(n) = child {
        memory::child(&s.url, n);
        return;
    }
    let env = report::Environment::gather(&s);
    eprintln!(
        "lepus benchmark suite ({} mode) against {} (RabbitMQ {}); report to {}",
        if s.quick { "quick" } else { "full" },
        common::parse_addr(&s.url).host,
        env.rabbitmq,
        s.out_dir.display()
    );
    let mut r = Results::default();
    let root = repo_root();
    if !s.peers && (s.wants(6) || s.wants(9)) {
        let why = if s.quick {
            "quick mode skips the peers (lapin, amqprs, amiquip): none was built or run, so this report has no lepus/peer ratio; `-- --quick --peers` builds and runs them"
        } else {
            "--no-peers: the peers (lapin, amqprs, amiquip) were not built or run, so this report has no lepus/peer ratio"
        };
        note(why);
        r.notes
            .push(format!("{}{}.", why[..1].to_uppercase(), &why[1..]));
    }

    // Peers: built first, or (quick mode, cold build) in the background while the
    // lepus-only scenarios run, so that a first run stays within its time budget.
    let want_peers = s.peers && (s.wants(6) || s.wants(9));
    let bin = root.join("benches/peers/target/release/lepus-bench-peers");
    let background = want_peers && s.quick && !bin.exists();
    let build = {
        let (root, url, quick) = (root.clone(), s.url.clone(), s.quick);
        let budget = Duration::from_secs(s.peers_build_timeout.unwrap_or(s.size(1800, 240)));
        move || peers::Peers::build(&root, &url, quick, budget)
    };
    let mut peers = None;
    let mut pending = None;
    if want_peers {
        if background {
            note(
                "the peers are not built yet: building them in the background while the lepus-only scenarios (2, 4, 5, 8) run",
            );
            r.notes.push("This was a cold run: the peers crate was compiled in the background while scenarios 2, 4, 5 and 8 ran, so those figures shared the CPU with the compiler.".into());
            pending = Some(std::thread::spawn(build));
        } else {
            peers = Some(build());
        }
    }
    // 1, 6, 7: publish throughput, peers and ceiling interleaved round by round.
    r.publish_configs = vec![
        (10, 100),
        (100, 100),
        (300, 50),
        (900, 10),
        (4, s.size(25_000, 5_000)),
    ];
    r.modes = vec![Mode::None, Mode::Each, Mode::Window(100)];
    if !s.configs.is_empty() {
        r.publish_configs = s.configs.clone();
    }
    if !s.modes.is_empty() {
        r.modes = s
            .modes
            .iter()
            .filter_map(|m| match m.as_str() {
                "none" => Some(Mode::None),
                "each" => Some(Mode::Each),
                w => w
                    .strip_prefix("window:")
                    .and_then(|n| n.parse().ok())
                    .map(Mode::Window),
            })
            .collect();
    }
    // 3 (+6): massive consumers.
    r.consumer_counts = vec![100, 500, 900];
    if background {
        guard(&mut r, "scenario_pool", |r| scenario_pool(&s, r));
        guard(&mut r, "scenario_recovery", |r| scenario_recovery(&s, r));
        guard(&mut r, "scenario_stability", |r| scenario_stability(&s, r));
        guard(&mut r, "scenario_memory", |r| scenario_memory(&s, r));
        note("waiting for the peers' build");
        peers = pending.and_then(|h| h.join().ok());
    }
    if want_peers && peers.as_ref().is_none_or(|p| p.clients.is_empty()) {
        // Asked for and not there: the run cannot say what it was asked to measure.
        r.errors
            .push("the peers were to run, but none was built (see the Peers notes)".into());
        r.failed.push("peers".into());
    }
    if let Some(p) = &peers {
        r.peer_clients = p.clients.clone();
        r.peer_notes = p.notes.clone();
        r.peer_versions = p.versions.clone();
    }
    guard(&mut r, "scenario_publish", |r| {
        scenario_publish(&s, r, peers.as_ref())
    });
    if !background {
        guard(&mut r, "scenario_pool", |r| scenario_pool(&s, r));
    }
    guard(&mut r, "scenario_consumers", |r| {
        scenario_consumers(&s, r, peers.as_ref())
    });
    if !background {
        guard(&mut r, "scenario_recovery", |r| scenario_recovery(&s, r));
        guard(&mut r, "scenario_stability", |r| scenario_stability(&s, r));
        guard(&mut r, "scenario_memory", |r| scenario_memory(&s, r));
    }
    guard(&mut r, "scenario_tls", |r| {
        scenario_tls(&s, r, peers.as_ref())
    });
    guard(&mut r, "scenario_worker_pool", |r| {
        worker_pool::scenario(&s, TOTAL, &mut r.worker_pool)
    });

    if s.wants(10) {
        guard(&mut r, "scenario_observability", |r| {
            section(
                10,
                TOTAL,
                "observability cost (metrics recorder on and off)",
            );
            r.observability = observability::run(&s);
        });
    }
    guard(&mut r, "scenario_failover", |r| scenario_failover(&s, r));

    note("writing the report");
    std::fs::create_dir_all(&s.out_dir).expect("create the results directory");
    let chart_errors = charts::draw_all(&r, &s.out_dir);
    r.errors.extend(chart_errors);
    let md = report::render(&r, &env, &s) + &observability::render(&r.observability);
    let path = s.out_dir.join("report.md");
    std::fs::write(&path, md).expect("write the report");
    eprintln!("\n[{:>6.1}s] report: {}", common::elapsed(), path.display());
    if !r.failed.is_empty() {
        eprintln!("suite: these scenarios failed: {}", r.failed.join(", "));
        std::process::exit(1);
    }
}

/// Run a scenario; a panic (a broker gone, a broken invariant) is recorded and the suite
/// goes on, so that the report is written; the exit status says that something failed.
fn guard(r: &mut Results, name: &str, f: impl FnOnce(&mut Results)) {
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(r))) {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        eprintln!("\nsuite: {name} failed: {msg}");
        r.errors.push(format!("{name} failed: {msg}"));
        r.failed.push(name.to_owned());
    }
}

fn scenario_publish(s: &Settings, r: &mut Results, peers: Option<&peers::Peers>) {
    let total = TOTAL;
    let peer_clients: Vec<String> = peers.map(|p| p.clients.clone()).unwrap_or_default();
    if s.wants(1) || s.wants(6) || s.wants(7) {
        section(
            1,
            total,
            "publish throughput (lepus, peers and the ceiling probe interleaved)",
        );
        let mut jobs: Vec<(usize, usize, usize, Mode, String)> = Vec::new();
        for round in 0..s.rounds {
            for &(t, m) in &r.publish_configs {
                for &mode in &r.modes {
                    let mut clients: Vec<String> = Vec::new();
                    if s.wants(1) || s.wants(6) {
                        clients.push("lepus".into());
                    }
                    if s.wants(6) {
                        clients.extend(peer_clients.iter().cloned());
                    }
                    if mode == Mode::None && s.wants(7) {
                        clients.extend(["ceiling".into(), "ceiling-4conn".into()]);
                    }
                    if mode == Mode::Each && s.wants(7) {
                        clients.extend([
                            "lockstep".into(),
                            "lockstep-4conn".into(),
                            "wake-floor".into(),
                        ]);
                    }
                    // Each round starts with another client (A B C, B C A, ...).
                    let k = round % clients.len().max(1);
                    clients.rotate_left(k);
                    for c in clients {
                        jobs.push((round, t, m, mode, c));
                    }
                }
            }
        }
        let n = jobs.len();
        for (i, (round, t, m, mode, client)) in jobs.into_iter().enumerate() {
            settle();
            step(
                i + 1,
                n,
                &format!(
                    "round {}/{}: {t}×{m} {} — {client}",
                    round + 1,
                    s.rounds,
                    mode.label()
                ),
            );
            match client.as_str() {
                "lepus" => {
                    let mut run = throughput::publish(&s.url, t, m, mode);
                    run.round = round;
                    done(&format!(
                        "absorbed {} msg/s (calls {} msg/s), P99 {}, CPU {:.2} µs/msg",
                        thousands(run.absorbed_rate()),
                        thousands(run.call_rate()),
                        ms(run.lat.p99_ms),
                        run.cpu_us_per_msg()
                    ));
                    r.publish.push(run);
                }
                "wake-floor" => {
                    let f = floor::run(t, m, true);
                    let c = ceiling::CeilingRun {
                        kind: "wake-floor".into(),
                        round,
                        threads: t,
                        per_thread: m,
                        write_secs: f.secs,
                        absorbed_secs: f.secs,
                        cpu: f.cpu,
                    };
                    done(&format!("CPU {:.2} µs/msg", c.cpu_us_per_msg()));
                    r.probes.push(c);
                }
                probe @ ("ceiling" | "ceiling-4conn" | "lockstep" | "lockstep-4conn") => {
                    let sockets = if probe.ends_with("4conn") {
                        ceiling::SOCKETS
                    } else {
                        1
                    };
                    let run = if probe.starts_with("ceiling") {
                        ceiling::probe(&s.url, sockets, t, m)
                    } else {
                        lockstep::lockstep(&s.url, sockets, t, m)
                    };
                    match run {
                        Ok(mut c) => {
                            c.round = round;
                            done(&format!(
                                "absorbed {} msg/s, CPU {:.2} µs/msg",
                                thousands(c.absorbed_rate()),
                                c.cpu_us_per_msg()
                            ));
                            if probe == "ceiling" {
                                r.ceiling.push(c);
                            } else {
                                r.probes.push(c);
                            }
                        }
                        Err(e) => {
                            done(&format!("failed: {e}"));
                            r.errors.push(format!("{probe} probe {t}×{m}: {e}"));
                        }
                    }
                }
                peer => match peers.expect("peers").publish(peer, t, m, mode) {
                    Ok(mut run) => {
                        run.round = round;
                        done(&format!(
                            "absorbed {} msg/s, P99 {}, CPU {:.2} µs/msg",
                            thousands(run.absorbed_rate()),
                            ms(run.lat.p99_ms),
                            run.cpu_us_per_msg()
                        ));
                        if let (true, Some(e)) = (run.errors > 0, &run.first_error) {
                            r.errors.push(format!(
                                "{peer} publish {t}×{m} {} (round {}): {} errors; first: {e}",
                                mode.label(),
                                round + 1,
                                run.errors
                            ));
                        }
                        r.publish.push(run);
                    }
                    Err(e) => {
                        done(&format!("failed: {e}"));
                        r.errors
                            .push(format!("{peer} publish {t}×{m} {}: {e}", mode.label()));
                    }
                },
            }
        }
    }
}

fn scenario_pool(s: &Settings, r: &mut Results) {
    let total = TOTAL;
    // 2: channel pool.
    if s.wants(2) {
        section(2, total, "channel pool");
        let cfgs = [(100, s.size(20_000, 2_000)), (500, s.size(4_000, 400))];
        for (i, &(t, n)) in cfgs.iter().enumerate() {
            step(
                i + 1,
                cfgs.len(),
                &format!("{t} threads × {n} acquire/release"),
            );
            settle();
            let run = throughput::pool(&s.url, t, n);
            done(&format!(
                "{} pairs/s, P99 {}",
                thousands(run.rate()),
                ms(run.lat.p99_ms)
            ));
            r.pool.push(run);
        }
    }
}

fn scenario_consumers(s: &Settings, r: &mut Results, peers: Option<&peers::Peers>) {
    let total = TOTAL;
    let peer_clients: Vec<String> = peers.map(|p| p.clients.clone()).unwrap_or_default();
    if s.wants(3) || s.wants(6) {
        section(3, total, "massive consumers (lepus and peers interleaved)");
        let mut jobs = Vec::new();
        for round in 0..s.rounds {
            for &c in &r.consumer_counts {
                let msgs = s.size(c * 20, c * 4);
                let mut clients = vec!["lepus".to_string(), consume_ways::DISPATCH.to_string()];
                if s.wants(6) {
                    clients.extend(peer_clients.iter().cloned());
                }
                if s.wants(7) {
                    clients.push("floor".to_string());
                }
                let k = round % clients.len();
                clients.rotate_left(k);
                for client in clients {
                    jobs.push((round, c, msgs, client));
                }
            }
        }
        let n = jobs.len();
        for (i, (round, c, msgs, client)) in jobs.into_iter().enumerate() {
            settle();
            step(
                i + 1,
                n,
                &format!(
                    "round {}/{}: {c} consumers, {msgs} messages — {client}",
                    round + 1,
                    s.rounds
                ),
            );
            if client == "floor" {
                match ceiling::consumer_floor(&s.url, c, throughput::PREFETCH) {
                    Ok(secs) => {
                        done(&format!(
                            "{c} consumers started in {secs:.3} s (raw socket, pipelined)"
                        ));
                        r.consumer_floor.push((c, round, secs));
                    }
                    Err(e) => {
                        done(&format!("failed: {e}"));
                        r.errors.push(format!("consumer floor {c}: {e}"));
                    }
                }
                continue;
            }
            let run = if client == "lepus" {
                Ok(throughput::consumers(&s.url, c, msgs, false))
            } else if client == consume_ways::DISPATCH {
                Ok(throughput::consumers(&s.url, c, msgs, true))
            } else {
                peers.expect("peers").consume(&client, c, msgs)
            };
            match run {
                Ok(mut run) => {
                    run.round = round;
                    done(&format!(
                        "startup {:.3} s, consumed {} msg/s, P99 {}, lost {}",
                        run.startup_secs,
                        thousands(run.consume_rate()),
                        ms(run.lat.p99_ms),
                        run.lost
                    ));
                    if let (true, Some(e)) = (run.errors > 0, &run.first_error) {
                        r.errors.push(format!(
                            "{client} consume {c} (round {}): {} errors; first: {e}",
                            round + 1,
                            run.errors
                        ));
                    }
                    r.consume.push(run);
                }
                Err(e) => {
                    done(&format!("failed: {e}"));
                    r.errors.push(format!("{client} consume {c}: {e}"));
                }
            }
        }
        if s.wants(3) {
            consume_ways::scenario(s, r, peers);
        }
    }
}

fn scenario_recovery(s: &Settings, r: &mut Results) {
    let total = TOTAL;
    // 4: recovery by failure type.
    if s.wants(4) {
        section(
            4,
            total,
            "recovery by failure type (faults injected through the proxy)",
        );
        let partition = Duration::from_millis(s.size(3000, 2500));
        let faults = [
            recovery::Fault::Rst,
            recovery::Fault::Partition(partition),
            recovery::Fault::LatencyThenRst(Duration::from_millis(20)),
            recovery::Fault::SlowThenRst(256 * 1024),
        ];
        let reps = s.size(3, 1);
        let mut jobs = Vec::new();
        for f in faults {
            for t in [10, 50] {
                for _ in 0..reps {
                    jobs.push((f, t));
                }
            }
        }
        let n = jobs.len();
        for (i, (f, t)) in jobs.into_iter().enumerate() {
            settle();
            step(i + 1, n, &format!("{} with {t} threads", f.label()));
            let run = recovery::run(&s.url, f, t);
            done(&format!(
                "detected {}, last told {} ({}/{t}), recovered {} (all {}), new connection {}",
                ms(run.detection_ms),
                ms(run.told_last_ms),
                run.told,
                ms(run.recovery_first_ms),
                ms(run.recovery_all_ms),
                if run.new_connection {
                    "verified"
                } else {
                    "NOT verified"
                }
            ));
            r.recovery.push(run);
        }
    }
}

fn scenario_stability(s: &Settings, r: &mut Results) {
    let total = TOTAL;
    // 5: stability.
    if s.wants(5) {
        section(5, total, "stability");
        let dur = Duration::from_millis(s.size(5000, 1500));
        let steps = 5;
        step(1, steps, "chaos, random operations, no faults, 50 threads");
        settle();
        let c = stability::chaos(&s.url, "chaos_no_faults", 50, dur, None);
        done(&chaos_line(&c));
        r.chaos.push(c);
        for (k, t) in [(2, 50), (3, 20)] {
            step(
                k,
                steps,
                &format!("chaos with links killed every ~0.3 s, {t} threads"),
            );
            let c = stability::chaos(
                &s.url,
                "chaos_with_kills",
                t,
                dur,
                Some(Duration::from_millis(300)),
            );
            done(&chaos_line(&c));
            r.chaos.push(c);
        }
        let per = s.size(10, 4);
        step(
            4,
            steps,
            &format!("high contention: 500 threads on a barrier × {per}"),
        );
        settle();
        let c = stability::contention(&s.url, 500, per);
        done(&chaos_line(&c));
        r.chaos.push(c);
        let n = s.size(1000, 30);
        step(5, steps, &format!("repeated recovery: {n} real reconnects"));
        eprintln!();
        settle();
        let rep = recovery::repeated(&s.url, n);
        note(&format!(
            "repeated recovery: {}/{} verified, P50 {}, P99 {}, stale errors {}",
            rep.verified,
            rep.iterations,
            ms(rep.lat.p50_ms),
            ms(rep.lat.p99_ms),
            rep.stale_errors
        ));
        r.repeated = Some(rep);
    }
}

fn scenario_memory(s: &Settings, r: &mut Results) {
    let total = TOTAL;
    // 8: memory.
    if s.wants(8) {
        section(
            8,
            total,
            "memory (900 idle channels, then 900 consumers, in a child process)",
        );
        step(1, 1, "measuring");
        let m = memory::measure(&s.url, 900);
        match &m {
            Ok(m) => done(&format!(
                "{:.0} B per channel, {:.0} B per consumer",
                m.per_channel(),
                m.per_consumer()
            )),
            Err(e) => done(&format!("failed: {e}")),
        }
        r.memory = Some(m);
    }
}

fn scenario_tls(s: &Settings, r: &mut Results, peers: Option<&peers::Peers>) {
    // 9: TLS against plaintext.
    if s.wants(9) {
        section(9, TOTAL, "TLS against plaintext (scripts/tls-node)");
        // scripts/tls-node is the repository's, not this package's.
        let root = repo_root();
        let t = if cfg!(feature = "tls") {
            tls::run(&root, s.quick, s.rounds, peers)
        } else {
            Err("lepus was built without its tls feature".into())
        };
        if let Err(e) = &t {
            done(&format!("not measured: {e}"));
            r.errors.push(format!("TLS scenario: {e}"));
            // With TLS built in, a scenario that could not run is a failure of the suite
            // (CI must not pass on a report that only says so).
            if cfg!(feature = "tls") {
                r.failed.push("scenario_tls".into());
            }
        }
        r.tls = Some(t);
    }
}

fn scenario_failover(s: &Settings, r: &mut Results) {
    // 12: failover on the three-node cluster.
    if !s.wants(12) {
        return;
    }
    section(
        12,
        TOTAL,
        "cluster failover (scripts/cluster, kill -9 of the connected node)",
    );
    if s.quick {
        let why = "skipped in quick mode: it starts a three-node cluster (about a minute cold) and restarts a node per repetition; run the full suite or --only 12";
        note(why);
        r.failover = Some(Err(why.into()));
        return;
    }
    let f = failover::run(&repo_root(), 5);
    if !f.errors.is_empty() || f.runs.iter().any(|x| x.lost > 0 || x.failed > 0) {
        r.errors.push(format!(
            "failover scenario: {} failed repetition(s), {} lost, {} unconfirmed: {}",
            f.errors.len(),
            f.runs.iter().map(|x| x.lost).sum::<u64>(),
            f.runs.iter().map(|x| x.failed).sum::<u64>(),
            f.errors.join("; ")
        ));
        r.failed.push("scenario_failover".into());
    }
    r.failover = Some(Ok(f));
}

fn chaos_line(c: &stability::ChaosRun) -> String {
    format!(
        "{} ops, deadlocks {}, errors {}, link errors {}, lost {}, double hand-outs {}, stale {}, recovered {}/{}",
        thousands(c.iterations as f64),
        c.deadlocks,
        c.errors,
        c.link_errors,
        c.lost,
        c.double_handouts,
        c.stale_errors,
        c.recovered_threads,
        c.threads
    )
}
