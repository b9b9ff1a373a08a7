//! What every scenario uses: the run's settings, progress on stderr, broker address,
//! queue helpers, RSS from /proc.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lepus::{
    Channel, Connection, ConnectionOptions, QueueDeclareOptions, QueueDeleteOptions,
    RecoveryOptions,
};

/// Settings of one run of the suite.
#[derive(Debug, Clone)]
pub struct Settings {
    pub quick: bool,
    pub url: String,
    /// Rounds of the lepus-vs-peer comparison (A B A B ...).
    pub rounds: usize,
    /// Scenario numbers to run (1..=8); all when empty.
    pub only: Vec<u32>,
    pub peers: bool,
    pub peers_build_timeout: Option<u64>,
    pub out_dir: std::path::PathBuf,
    /// Publish configurations (threads, messages each) to run instead of the default five.
    pub configs: Vec<(usize, usize)>,
    /// Publish modes (`none`, `each`, `window:N`) to run instead of the default three.
    pub modes: Vec<String>,
}

impl Settings {
    pub fn wants(&self, scenario: u32) -> bool {
        self.only.is_empty() || self.only.contains(&scenario)
    }
    /// Pick the full or the quick size.
    pub fn size<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}

static START: OnceLock<Instant> = OnceLock::new();
static STEP: Mutex<String> = Mutex::new(String::new());

/// Seconds since the suite started.
pub fn elapsed() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Start the clock (call first thing in main).
pub fn start_clock() {
    let _ = START.get_or_init(Instant::now);
}

/// Announce a scenario ("[3/8] massive consumers").
pub fn section(n: u32, total: u32, title: &str) {
    eprintln!("\n[{:>6.1}s] == [{n}/{total}] {title} ==", elapsed());
    *STEP.lock().unwrap() = title.to_owned();
}

/// One step inside a scenario, with how far it is ("(2/6)").
pub fn step(i: usize, n: usize, what: &str) {
    eprint!("[{:>6.1}s]    ({i}/{n}) {what} ... ", elapsed());
    let _ = std::io::stderr().flush();
}

/// The result of a step, on the same line.
pub fn done(what: &str) {
    eprintln!("{what}");
}

/// A free-standing progress note.
pub fn note(what: &str) {
    eprintln!("[{:>6.1}s]    {what}", elapsed());
}

/// Options for the broker under test: `AMQP_URL`, generous deadlines.
pub fn options(url: &str) -> ConnectionOptions {
    ConnectionOptions::from_uri(url)
        .expect("AMQP_URL parses")
        .connection_timeout(Duration::from_secs(10))
        .operation_timeout(Duration::from_secs(60))
        .close_timeout(Duration::from_secs(5))
}

/// A connection without automatic recovery (benchmarks that are not about recovery).
pub fn connect(url: &str) -> Connection {
    Connection::open_with(
        options(url)
            .recovery(RecoveryOptions::disabled())
            .connection_name("lepus-bench"),
    )
    .expect("connect to the broker (is RabbitMQ running? AMQP_URL overrides the address)")
}

/// A queue name nobody else uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("lepus-bench.{prefix}.{}.{n}.{nanos:x}", std::process::id())
}

/// Declare a fresh, non-durable queue. Scenarios delete their queues; `x-expires` makes
/// the broker drop any that a crashed run left behind (10 minutes unused).
pub fn declare(admin: &Channel, name: &str) {
    admin
        .queue_declare(
            name,
            &QueueDeclareOptions {
                arguments: lepus::FieldTable::new().with("x-expires", 600_000i32),
                ..Default::default()
            },
        )
        .expect("declare the bench queue");
}

pub fn delete(admin: &Channel, name: &str) {
    let _ = admin.queue_delete(name, &QueueDeleteOptions::default());
}

/// Messages ready in `queue` (passive declare).
pub fn message_count(admin: &Channel, queue: &str) -> u32 {
    admin
        .queue_declare(
            queue,
            &QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
        )
        .expect("passive declare")
        .message_count
}

/// Poll (every 1 ms) until `queue` holds `n` messages; returns when it did, or `None`
/// after `timeout`.
pub fn wait_count(admin: &Channel, queue: &str, n: usize, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if message_count(admin, queue) as usize >= n {
            return Some(Instant::now());
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// `VmRSS` and `VmHWM` of this process in bytes.
pub fn rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Broker address parts of an `amqp://` URI (for the raw-socket ceiling probe and the
/// proxy).
#[derive(Debug, Clone)]
pub struct Addr {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub pass: String,
    pub vhost: String,
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_addr(url: &str) -> Addr {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let (auth_host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let path = path.split('?').next().unwrap_or("");
    let auth_host = auth_host.split('?').next().unwrap_or(auth_host);
    let (auth, hostport) = match auth_host.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, auth_host),
    };
    let (user, pass) = match auth {
        Some(a) => {
            let (u, p) = a.split_once(':').unwrap_or((a, ""));
            (pct_decode(u), pct_decode(p))
        }
        None => ("guest".into(), "guest".into()),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse().unwrap_or(5672)),
        None => (hostport.to_owned(), 5672),
    };
    let vhost = if path.is_empty() {
        "/".to_owned()
    } else {
        pct_decode(path)
    };
    Addr {
        host: if host.is_empty() {
            "127.0.0.1".into()
        } else {
            host
        },
        port,
        user,
        pass,
        vhost,
    }
}

/// Spawn a named thread with a small stack (the suite runs up to ~1000 at once).
pub fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    thread::Builder::new()
        .name(name.to_owned())
        .stack_size(256 * 1024)
        .spawn(f)
        .expect("spawn a bench thread")
}

/// Join every handle until `deadline`; returns the results of those joined and how many
/// were not joined in time (deadlocked or stuck). Unjoined threads are left detached.
pub fn join_all<T>(handles: Vec<thread::JoinHandle<T>>, deadline: Instant) -> (Vec<T>, usize) {
    let mut out = Vec::with_capacity(handles.len());
    let mut pending = handles;
    loop {
        let mut still = Vec::new();
        for h in pending {
            if h.is_finished() {
                if let Ok(v) = h.join() {
                    out.push(v);
                } else {
                    // A panicked thread counts as not recovered, not as a deadlock.
                    note("a bench thread panicked");
                }
            } else {
                still.push(h);
            }
        }
        if still.is_empty() {
            return (out, 0);
        }
        if Instant::now() > deadline {
            let n = still.len();
            return (out, n);
        }
        pending = still;
        thread::sleep(Duration::from_millis(2));
    }
}

/// Format a rate ("12,345").
pub fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Format milliseconds with sensible precision.
pub fn ms(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x >= 1000.0 {
        format!("{:.2} s", x / 1000.0)
    } else if x >= 100.0 {
        format!("{x:.0} ms")
    } else if x >= 10.0 {
        format!("{x:.1} ms")
    } else if x >= 0.1 {
        format!("{x:.2} ms")
    } else {
        format!("{:.1} µs", x * 1000.0)
    }
}

/// CPU seconds used so far by the local broker (beam.smp), if it runs on this machine.
fn broker_cpu() -> Option<f64> {
    static PID: OnceLock<Option<u32>> = OnceLock::new();
    let pid = (*PID.get_or_init(|| {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == "beam.smp")
                .then(|| e.file_name().to_str()?.parse().ok())
                .flatten()
        })
    }))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Let the broker finish the previous run's work (closing hundreds of channels,
/// deleting a queue) before the next run starts, so that a run does not pay for the one
/// before it: wait until the local broker uses under a fifth of a core over 100 ms,
/// at most 3 s; a fixed 300 ms when the broker is not local.
pub fn settle() {
    let deadline = Instant::now() + Duration::from_secs(3);
    let Some(mut last) = broker_cpu() else {
        thread::sleep(Duration::from_millis(300));
        return;
    };
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        let Some(now) = broker_cpu() else { return };
        if now - last < 0.02 {
            return;
        }
        last = now;
    }
}
