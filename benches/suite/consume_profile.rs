//! A small lepus consume program for profiling (benches/results/consume-cpu.md): C
//! consumers on one connection, a thread and a channel each (`open_consumer`, prefetch
//! 50), each receiving and acking until M messages in all came; the producer is a raw
//! socket of its own (pre-encoded 64-byte messages, large writes), as in the suite's
//! scenario 3. `steady` (default): the consumers are registered, then the producer
//! writes and the clock starts; `drain`: the queue is filled first and the clock starts
//! before the first consumer registers. Prints the rate, the process's CPU time per
//! message less the producer thread's own, context switches per message (getrusage), and
//! the I/O thread's own CPU per message (its schedstat, Linux).
//!
//! ```text
//! cargo build --profile bench -p lepus-bench-suite --example consume-profile
//! P=target/release/examples/consume-profile
//! scripts/with-rabbitmq $P [consumers] [messages] [steady|drain]
//! strace -c -f $P 100 20000
//! perf record -e cpu-clock -F 1999 --call-graph dwarf,16384 $P 100 20000
//! valgrind --tool=dhat $P 100 20000
//! LEPUS_PEER=amqprs $P 100 20000          # a peer instead (benches/peers, built), its JSON line
//! LEPUS_DISPATCH=2 $P 100 20000           # the consumers on a `Dispatcher` of 2 threads
//! ```
//! With `LEPUS_PEER=<client>` the same queue and producer serve the peers' binary
//! (`benches/peers/target/release/lepus-bench-peers`, or `LEPUS_PEER_BIN`), run as the
//! suite runs it; `LEPUS_PEER_WRAP="perf stat -e ..."` puts a command in front of it.

#[path = "cpu.rs"]
mod cpu;
#[path = "stats.rs"]
mod stats;

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use lepus::{Connection, ConsumeOptions, Dispatcher, Outcome, QueueDeclareOptions, WorkerOptions};
use lepus_testkit::{RawClient, frames};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let drain = std::env::args().skip(1).any(|a| a == "drain");
    let consumers = args.first().copied().unwrap_or(100);
    let messages = args.get(1).copied().unwrap_or(20_000);
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let admin_conn = Connection::open(&url).expect("connect");
    let admin = admin_conn.open_channel().expect("admin channel");
    let queue = format!("lepus-consume-profile.{}", std::process::id());
    admin
        .queue_declare(&queue, &QueueDeclareOptions::default())
        .expect("queue.declare");

    let mut producer = RawClient::connect("127.0.0.1:5672", "guest", "guest", "/").expect("raw");
    producer.io().stream().set_nodelay(true).expect("nodelay");
    producer.open_channels(1..=1).expect("raw channel");
    let mut bytes = Vec::with_capacity(messages * (queue.len() + 120));
    for id in 0..messages {
        bytes.extend(frames::publish_frame(1, "", &queue));
        let body = stats::stamp_body(id as u64, 0, 64);
        bytes.extend(frames::content_frames(1, &frames::no_props(), &body, 0));
    }
    let mut sock = producer.io().stream().try_clone().expect("clone");
    let mut produce = move || {
        let before = cpu::thread();
        for c in bytes.chunks(64 * 1024) {
            sock.write_all(c).expect("produce");
        }
        cpu::thread().since(&before)
    };
    let mut producer_cpu = cpu::Usage::default();
    if drain {
        produce();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let n = admin
                .queue_declare(
                    &queue,
                    &QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                )
                .map(|q| q.message_count as usize)
                .unwrap_or(0);
            if n >= messages {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    if let Ok(client) = std::env::var("LEPUS_PEER") {
        peer(&client, &queue, consumers, messages, drain, &mut produce);
        let _ = producer.io().send(&lepus_testkit::close_frame());
        let _ = admin.queue_delete(&queue, &Default::default());
        let _ = admin_conn.close();
        return;
    }

    let conn = Connection::open(&url).expect("connect");
    // With `LEPUS_DISPATCH=<threads>` the consumers are served by a dispatcher of that
    // many threads; otherwise each by a thread of its own, blocked in `recv`.
    let dispatcher = std::env::var("LEPUS_DISPATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(|threads| {
            Arc::new(Dispatcher::new(&WorkerOptions::new(threads)).expect("dispatcher"))
        });
    let received = Arc::new(AtomicUsize::new(0));
    let registered = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(Barrier::new(if drain { 1 } else { consumers + 1 }));
    let (mut cpu0, mut io0, mut start) = (cpu::process(), io_thread_ns(), Instant::now());
    let handles: Vec<_> = (0..consumers)
        .map(|_| {
            let (conn, queue, ready, received) =
                (conn.clone(), queue.clone(), ready.clone(), received.clone());
            let (registered, dispatcher) = (registered.clone(), dispatcher.clone());
            std::thread::Builder::new()
                .name("consumer".into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    let c = conn.open_consumer(&queue, 50, &ConsumeOptions::default());
                    registered.fetch_add(1, Ordering::AcqRel);
                    ready.wait();
                    let Ok(c) = c else { return 1 };
                    if let Some(dispatcher) = dispatcher {
                        // The same work per delivery, in the dispatcher's handler; a
                        // failed ack shows in its stats.
                        let mut ledger = stats::IdLedger::new(messages);
                        let added = dispatcher.add(c, move |d| {
                            let ok = matches!(stats::read_stamp(d.body()),
                                Some((id, _)) if ledger.record(id));
                            received.fetch_add(1, Ordering::AcqRel);
                            if ok { Outcome::Ack } else { Outcome::Reject }
                        });
                        return usize::from(added.is_err());
                    }
                    // What the suite's consumers do with each delivery.
                    let mut ledger = stats::IdLedger::new(messages);
                    let mut failed = 0usize;
                    while let Ok(d) = c.recv() {
                        match stats::read_stamp(d.body()) {
                            Some((id, _)) if ledger.record(id) => {}
                            _ => failed += 1,
                        }
                        failed += usize::from(d.ack().is_err());
                        received.fetch_add(1, Ordering::AcqRel);
                    }
                    failed
                })
                .expect("spawn")
        })
        .collect();
    ready.wait();
    if !drain {
        (cpu0, io0, start) = (cpu::process(), io_thread_ns(), Instant::now());
        producer_cpu = produce();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while received.load(Ordering::Acquire) < messages && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
    }
    let secs = start.elapsed().as_secs_f64();
    let u = cpu::process().since(&cpu0).minus(&producer_cpu);
    let io = io_thread_ns()
        .zip(io0)
        .map(|(b, a)| b.0.saturating_sub(a.0) as f64 / 1e3);
    let got = received.load(Ordering::Acquire);
    // A drain's first consumers may empty the queue before the last ones register.
    while registered.load(Ordering::Acquire) < consumers && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let dispatched = dispatcher.map(|d| d.stats());
    let _ = conn.close();
    let mut failed: usize = handles
        .into_iter()
        .map(|h| h.join().expect("consumer"))
        .sum();
    if let Some(s) = &dispatched {
        failed += (s.rejected + s.settle_failed) as usize;
    }
    let n = got.max(1) as f64;
    println!(
        "{}{} {consumers} consumers, {got}/{messages} msgs, {failed} failed: {:.0} msg/s; CPU {:.2} us/msg (user {:.2}, sys {:.2}); voluntary switches {:.2}/msg, involuntary {:.2}/msg; I/O thread {:.2} us/msg",
        if drain { "drain" } else { "steady" },
        if dispatched.is_some() {
            " (dispatcher)"
        } else {
            ""
        },
        n / secs,
        u.cpu_us() / n,
        u.user_us / n,
        u.sys_us / n,
        u.vcsw as f64 / n,
        u.ivcsw as f64 / n,
        io.map_or(f64::NAN, |x| x / n),
    );
    let _ = producer.io().send(&lepus_testkit::close_frame());
    let _ = admin.queue_delete(&queue, &Default::default());
    let _ = admin_conn.close();
}

/// Run the peers' binary on `queue` (as the suite does) and print its JSON line.
fn peer(
    client: &str,
    queue: &str,
    consumers: usize,
    messages: usize,
    drain: bool,
    produce: &mut dyn FnMut() -> cpu::Usage,
) {
    let bin = std::env::var("LEPUS_PEER_BIN").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../peers/target/release/lepus-bench-peers"
        )
        .into()
    });
    let way = if drain {
        "consume-drain"
    } else {
        "consume-steady"
    };
    let wrap = std::env::var("LEPUS_PEER_WRAP").unwrap_or_default();
    let mut argv: Vec<String> = wrap.split_whitespace().map(str::to_owned).collect();
    argv.push(bin);
    argv.extend([client, way, queue].map(str::to_owned));
    argv.extend([consumers.to_string(), messages.to_string()]);
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the peer");
    let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    for line in out.lines().map_while(Result::ok) {
        if line == "ready" {
            produce();
        } else if line.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(&line).expect("json");
            if std::env::var_os("LEPUS_PEER_RAW").is_some() {
                println!("{line}");
            }
            let n = v["received"].as_f64().unwrap_or(0.0).max(1.0);
            let c = &v["cpu"];
            let f = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "{client} {} {consumers} consumers, {n}/{messages} msgs: {:.0} msg/s; CPU {:.2} us/msg (user {:.2}, sys {:.2}); voluntary switches {:.2}/msg, involuntary {:.2}/msg",
                if drain { "drain" } else { "steady" },
                n / v["secs"].as_f64().unwrap_or(f64::NAN),
                (f("user_us") + f("sys_us")) / n,
                f("user_us") / n,
                f("sys_us") / n,
                f("vcsw") / n,
                f("ivcsw") / n,
            );
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Time the consuming connection's I/O thread has spent on a CPU, ns (the first field of
/// /proc/self/task/<tid>/schedstat of the last thread named `lepus-io…`: the admin
/// connection's comes first); None elsewhere.
fn io_thread_ns() -> Option<(u64, u64)> {
    let mut found = None;
    let mut tasks: Vec<_> = std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .collect();
    tasks.sort_by_key(|t| t.file_name().to_string_lossy().parse::<u64>().unwrap_or(0));
    for task in tasks {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("lepus-io") {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let mut f = stat.split_whitespace().map(|x| x.parse::<u64>().ok());
            found = Some((f.next()??, f.next()??));
        }
    }
    found
}
