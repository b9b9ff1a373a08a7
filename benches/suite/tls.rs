//! Scenario 9: TLS against plaintext on the same RabbitMQ node (scripts/tls-node: amqps
//! on 5671, amqp on 5670): connection setup time, and publish throughput without
//! confirms and confirming each message at 10 and 100 threads, interleaved round by
//! round so that each ratio compares runs made side by side; lapin (rustls) the same way
//! when the peers are built.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::common::{done, ms, settle, step, thousands};
use crate::peers::Peers;
use crate::stats::median;
use crate::throughput::{self, Mode, PublishRun};

/// What scenario 9 measured.
#[derive(Debug, Default)]
pub struct TlsResults {
    /// Connection setup (TCP + TLS + AMQP handshake) in ms, each sample.
    pub connect_tls_ms: Vec<f64>,
    pub connect_plain_ms: Vec<f64>,
    /// Publish runs; `client` is "tls" or "plaintext" (lepus), "lapin-tls" or
    /// "lapin-plaintext".
    pub runs: Vec<PublishRun>,
    pub configs: Vec<(usize, usize)>,
    pub modes: Vec<Mode>,
}

/// The TLS node's addresses: lepus's TLS URL (with its certificate parameters), the
/// plaintext URL, and a bare TLS URL with the environment the lapin peer reads its
/// certificates from.
pub struct Node {
    pub tls: String,
    pub plain: String,
    pub peer_tls: String,
    pub peer_env: Vec<(String, String)>,
}

/// Start (or reuse) the TLS node and return its addresses.
pub fn node_urls(root: &Path) -> Result<Node, String> {
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
    let peer_tls = format!(
        "amqps://guest:guest@localhost:{}/%2f",
        var("LEPUS_TLS_PORT")?
    );
    let peer_env = vec![
        ("LEPUS_PEER_TLS_CA".into(), var("LEPUS_TLS_CA")?),
        ("LEPUS_PEER_TLS_CERT".into(), var("LEPUS_TLS_CLIENT_CERT")?),
        ("LEPUS_PEER_TLS_KEY".into(), var("LEPUS_TLS_CLIENT_KEY")?),
    ];
    Ok(Node {
        tls,
        plain,
        peer_tls,
        peer_env,
    })
}

fn connect_ms(url: &str) -> f64 {
    let t = Instant::now();
    let c = lepus::Connection::open_with(crate::common::options(url)).expect("connect");
    let took = t.elapsed().as_secs_f64() * 1000.0;
    let _ = c.close();
    took
}

/// Run scenario 9: `rounds` rounds, each config and mode once per transport.
pub fn run(
    root: &Path,
    quick: bool,
    rounds: usize,
    peers: Option<&Peers>,
) -> Result<TlsResults, String> {
    let node = node_urls(root)?;
    let (tls_url, plain_url) = (&node.tls, &node.plain);
    let lapin = peers
        .filter(|p| p.clients.iter().any(|c| c == "lapin"))
        .map(|p| {
            (
                p.at(&node.peer_tls, node.peer_env.clone()),
                p.at(&node.plain, Vec::new()),
            )
        });
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
            let url = if tls { tls_url } else { plain_url };
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
                let mut order = vec!["tls", "plaintext"];
                if lapin.is_some() {
                    order.extend(["lapin-tls", "lapin-plaintext"]);
                }
                let k = round % order.len();
                order.rotate_left(k);
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
        let mut run = match (client, &lapin) {
            ("tls", _) => throughput::publish(tls_url, t, m, mode),
            ("plaintext", _) => throughput::publish(plain_url, t, m, mode),
            (_, Some((over_tls, plain))) => {
                let p = if client == "lapin-tls" {
                    over_tls
                } else {
                    plain
                };
                match p.publish("lapin", t, m, mode) {
                    Ok(run) => run,
                    Err(e) => {
                        done(&format!("failed: {e}"));
                        continue;
                    }
                }
            }
            (other, None) => unreachable!("no peers for {other}"),
        };
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
    let with_lapin = r.runs.iter().any(|p| p.client.starts_with("lapin"));
    let _ = writeln!(
        w,
        "Both on the same RabbitMQ node (`scripts/tls-node`: amqps on 5671 with a client certificate, amqp on 5670), interleaved run by run; rustls 0.23 with ring on lepus's side{}, Erlang's ssl on the broker's. Rates are absorbed rates, medians over rounds.\n",
        if with_lapin {
            " and lapin's (rustls, ring)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        w,
        "Connection setup (TCP + TLS + AMQP handshake, {} samples each): TLS median {}, plaintext median {}.\n",
        r.connect_tls_ms.len(),
        ms(median(&r.connect_tls_ms)),
        ms(median(&r.connect_plain_ms))
    );
    let _ = write!(
        w,
        "| Configuration | Mode | lepus TLS | lepus plaintext | lepus TLS / plaintext | lepus TLS P99 |"
    );
    if with_lapin {
        let _ = write!(
            w,
            " lapin TLS | lapin plaintext | lapin TLS / plaintext | lepus / lapin over TLS |"
        );
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "|---|---|---|---|---|---|{}",
        if with_lapin { "---|---|---|---|" } else { "" }
    );
    for &(t, m) in &r.configs {
        for &mode in &r.modes {
            let (tls, tls_p99) = rate(r, "tls", t, m, mode);
            let (plain, _) = rate(r, "plaintext", t, m, mode);
            let _ = write!(
                w,
                "| {t} threads × {m} msg | {} | {} msg/s | {} msg/s | **{:.2}** | {} |",
                mode.label(),
                thousands(tls),
                thousands(plain),
                tls / plain,
                ms(tls_p99)
            );
            if with_lapin {
                let (ltls, _) = rate(r, "lapin-tls", t, m, mode);
                let (lplain, _) = rate(r, "lapin-plaintext", t, m, mode);
                let _ = write!(
                    w,
                    " {} msg/s | {} msg/s | {:.2} | **{:.2}** |",
                    thousands(ltls),
                    thousands(lplain),
                    ltls / lplain,
                    tls / ltls
                );
            }
            let _ = writeln!(w);
        }
    }
    let _ = writeln!(w);
}
