//! Scenario 9: TLS against plaintext on the same RabbitMQ node (scripts/tls-node: amqps
//! on 5671, amqp on 5670): connection setup time, and publish throughput without
//! confirms and confirming each message at 10 and 100 threads, interleaved round by
//! round so that each ratio compares runs made side by side.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::common::{done, ms, settle, step, thousands};
use crate::stats::median;
use crate::throughput::{self, Mode, PublishRun};

/// What scenario 9 measured.
#[derive(Debug, Default)]
pub struct TlsResults {
    /// Connection setup (TCP + TLS + AMQP handshake) in ms, each sample.
    pub connect_tls_ms: Vec<f64>,
    pub connect_plain_ms: Vec<f64>,
    /// Publish runs; `client` is "tls" or "plaintext".
    pub runs: Vec<PublishRun>,
    pub configs: Vec<(usize, usize)>,
    pub modes: Vec<Mode>,
}

/// Start (or reuse) the TLS node and return its TLS and plaintext URLs.
pub fn node_urls(root: &Path) -> Result<(String, String), String> {
    let script = root.join("scripts/tls-node");
    let st = Command::new(&script)
        .arg("start")
        .status()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !st.success() {
        return Err(format!("scripts/tls-node start failed: {st}"));
    }
    let out = Command::new(&script)
        .arg("env")
        .output()
        .map_err(|e| e.to_string())?;
    let vars: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let var = |k: &str| {
        vars.get(k)
            .cloned()
            .ok_or_else(|| format!("scripts/tls-node env does not set {k}"))
    };
    let tls = format!(
        "amqps://guest:guest@localhost:{}/%2f?cacertfile={}&certfile={}&keyfile={}",
        var("LEPUS_TLS_PORT")?,
        var("LEPUS_TLS_CA")?,
        var("LEPUS_TLS_CLIENT_CERT")?,
        var("LEPUS_TLS_CLIENT_KEY")?
    );
    let plain = format!(
        "amqp://guest:guest@localhost:{}/%2f",
        var("LEPUS_TLS_PLAIN_PORT")?
    );
    Ok((tls, plain))
}

fn connect_ms(url: &str) -> f64 {
    let t = Instant::now();
    let c = lepus::Connection::open_with(crate::common::options(url)).expect("connect");
    let took = t.elapsed().as_secs_f64() * 1000.0;
    let _ = c.close();
    took
}

/// Run scenario 9: `rounds` rounds, each config and mode once per transport.
pub fn run(root: &Path, quick: bool, rounds: usize) -> Result<TlsResults, String> {
    let (tls_url, plain_url) = node_urls(root)?;
    let mut r = TlsResults {
        configs: vec![
            (10, if quick { 200 } else { 2_000 }),
            (100, if quick { 20 } else { 200 }),
        ],
        modes: vec![Mode::None, Mode::Each],
        ..Default::default()
    };
    for i in 0..if quick { 10 } else { 50 } {
        // Alternate, so that neither transport always goes first.
        let (a, b) = if i % 2 == 0 {
            (true, false)
        } else {
            (false, true)
        };
        for tls in [a, b] {
            let url = if tls { &tls_url } else { &plain_url };
            let ms = connect_ms(url);
            if tls {
                r.connect_tls_ms.push(ms);
            } else {
                r.connect_plain_ms.push(ms);
            }
        }
    }
    let mut jobs = Vec::new();
    for round in 0..rounds {
        for &(t, m) in &r.configs {
            for &mode in &r.modes {
                let mut order = ["tls", "plaintext"];
                order.rotate_left(round % 2);
                for client in order {
                    jobs.push((round, t, m, mode, client));
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
            &format!("round {}: {t}×{m} {} — {client}", round + 1, mode.label()),
        );
        let url = if client == "tls" {
            &tls_url
        } else {
            &plain_url
        };
        let mut run = throughput::publish(url, t, m, mode);
        run.client = client.into();
        run.round = round;
        done(&format!(
            "absorbed {} msg/s, P99 {}",
            thousands(run.absorbed_rate()),
            ms(run.lat.p99_ms)
        ));
        r.runs.push(run);
    }
    Ok(r)
}

fn rate(r: &TlsResults, client: &str, t: usize, m: usize, mode: Mode) -> (f64, f64) {
    let rs: Vec<&PublishRun> = r
        .runs
        .iter()
        .filter(|p| p.client == client && p.threads == t && p.per_thread == m && p.mode == mode)
        .collect();
    (
        median(&rs.iter().map(|p| p.absorbed_rate()).collect::<Vec<_>>()),
        median(&rs.iter().map(|p| p.lat.p99_ms).collect::<Vec<_>>()),
    )
}

/// The report's TLS section.
pub fn section(w: &mut String, r: &Option<Result<TlsResults, String>>) {
    let Some(r) = r else {
        return;
    };
    let _ = writeln!(w, "## TLS against plaintext\n");
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(w, "Not measured: {e}\n");
            return;
        }
    };
    let _ = writeln!(
        w,
        "Both on the same RabbitMQ node (`scripts/tls-node`: amqps on 5671 with a client certificate, amqp on 5670), interleaved run by run; rustls 0.23 with ring on lepus's side, Erlang's ssl on the broker's. Rates are absorbed rates, medians over rounds.\n"
    );
    let _ = writeln!(
        w,
        "Connection setup (TCP + TLS + AMQP handshake, {} samples each): TLS median {}, plaintext median {}.\n",
        r.connect_tls_ms.len(),
        ms(median(&r.connect_tls_ms)),
        ms(median(&r.connect_plain_ms))
    );
    let _ = writeln!(
        w,
        "| Configuration | Mode | TLS | plaintext | TLS / plaintext | TLS P99 | plaintext P99 |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|");
    for &(t, m) in &r.configs {
        for &mode in &r.modes {
            let (tls, tls_p99) = rate(r, "tls", t, m, mode);
            let (plain, plain_p99) = rate(r, "plaintext", t, m, mode);
            let _ = writeln!(
                w,
                "| {t} threads × {m} msg | {} | {} msg/s | {} msg/s | **{:.2}** | {} | {} |",
                mode.label(),
                thousands(tls),
                thousands(plain),
                tls / plain,
                ms(tls_p99),
                ms(plain_p99)
            );
        }
    }
    let _ = writeln!(w);
}
