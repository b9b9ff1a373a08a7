//! Scenario 8, memory: RSS per open channel and per consumer (N of each on one idle
//! connection), measured in a fresh child process of this binary so that nothing the
//! other scenarios allocated blurs the deltas.

use std::process::Command;
use std::time::Duration;

use lepus::ConsumeOptions;

use crate::common::{self, connect, declare, delete, rss};

#[derive(Debug, Clone, Default)]
pub struct MemoryRun {
    pub count: usize,
    pub rss_before: u64,
    pub rss_channels: u64,
    pub rss_consumers: u64,
    pub hwm: u64,
}

impl MemoryRun {
    pub fn per_channel(&self) -> f64 {
        self.rss_channels.saturating_sub(self.rss_before) as f64 / self.count as f64
    }
    pub fn per_consumer(&self) -> f64 {
        self.rss_consumers.saturating_sub(self.rss_channels) as f64 / self.count as f64
    }
}

/// In the child: open `n` channels, then a consumer on each, printing RSS at each step.
pub fn child(url: &str, n: usize) {
    let conn = connect(url);
    let admin = conn.open_channel().expect("admin channel");
    let queue = common::unique("memory");
    declare(&admin, &queue);
    // Warm up what is allocated once (first channel, first consumer, queues, buffers).
    {
        let ch = conn.open_channel().expect("warm-up channel");
        let c = ch
            .basic_consume(&queue, &ConsumeOptions::default())
            .expect("warm-up consumer");
        c.cancel().expect("cancel");
        ch.close().expect("close");
    }
    std::thread::sleep(Duration::from_millis(100));
    let (before, _) = rss();
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(conn.open_channel().expect("open channel"));
    }
    std::thread::sleep(Duration::from_millis(100));
    let (with_channels, _) = rss();
    let mut consumers = Vec::with_capacity(n);
    for ch in &channels {
        consumers.push(
            ch.basic_consume(&queue, &ConsumeOptions::default())
                .expect("consume"),
        );
    }
    std::thread::sleep(Duration::from_millis(100));
    let (with_consumers, hwm) = rss();
    println!("MEMORY {n} {before} {with_channels} {with_consumers} {hwm}");
    drop(consumers);
    delete(&admin, &queue);
    drop(channels);
    let _ = conn.close();
}

/// Run the child and read its figures.
pub fn measure(url: &str, n: usize) -> Result<MemoryRun, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(exe)
        .args(["--child-memory", &n.to_string()])
        .env("AMQP_URL", url)
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("MEMORY "))
        .ok_or_else(|| {
            format!(
                "the memory child printed no figures ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() != 5 {
        return Err(format!("unexpected memory line {line:?}"));
    }
    Ok(MemoryRun {
        count: v[0] as usize,
        rss_before: v[1],
        rss_channels: v[2],
        rss_consumers: v[3],
        hwm: v[4],
    })
}
