//! lapin, driven from std threads with `async_global_executor::block_on`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use async_global_executor::block_on;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::stats::{IdLedger, Percentiles, Samples, read_stamp, stamp_body};
use crate::ways::{Progress, WaysOut};
use crate::{BODY, ConsumeOut, Gate, Mode, PREFETCH, PublishOut, now_ns, unique, url};

fn e2s(e: lapin::Error) -> String {
    e.to_string()
}

fn connect() -> Result<Arc<Connection>, String> {
    let url = url();
    if url.starts_with("amqps://") {
        return connect_tls(&url);
    }
    block_on(Connection::connect(&url, ConnectionProperties::default()))
        .map(Arc::new)
        .map_err(e2s)
}

/// `amqps://` with the CA and client certificate named by `LEPUS_PEER_TLS_CA`,
/// `LEPUS_PEER_TLS_CERT` and `LEPUS_PEER_TLS_KEY` (PEM files), through rustls.
fn connect_tls(url: &str) -> Result<Arc<Connection>, String> {
    let read = |var: &str| -> Result<Vec<u8>, String> {
        let path = std::env::var(var).map_err(|_| format!("{var} is not set"))?;
        std::fs::read(&path).map_err(|e| format!("{path}: {e}"))
    };
    let config = lapin::tcp::OwnedTLSConfig {
        identity: Some(lapin::tcp::OwnedIdentity::PKCS8 {
            pem: read("LEPUS_PEER_TLS_CERT")?,
            key: read("LEPUS_PEER_TLS_KEY")?,
        }),
        cert_chain: Some(String::from_utf8_lossy(&read("LEPUS_PEER_TLS_CA")?).into_owned()),
    };
    let runtime = lapin::runtime::default_runtime().map_err(e2s)?;
    block_on(Connection::connect_with_config(
        url,
        ConnectionProperties::default(),
        config,
        runtime,
    ))
    .map(Arc::new)
    .map_err(e2s)
}

fn count(admin: &Channel, queue: &str) -> Result<u32, String> {
    block_on(admin.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .map(|q| q.message_count())
    .map_err(e2s)
}

fn wait_count(admin: &Channel, queue: &str, n: usize, start: Instant) -> Result<f64, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if count(admin, queue)? as usize >= n {
            return Ok(start.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            return Ok(f64::NAN);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn publish(threads: usize, per: usize, mode: Mode) -> Result<PublishOut, String> {
    let conn = connect()?;
    let admin = block_on(conn.create_channel()).map_err(e2s)?;
    let queue = unique("publish");
    block_on(admin.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .map_err(e2s)?;
    // Every thread's set-up (channel, confirm.select) before `ready`: the clock and the
    // CPU figure start after it (the suite does the same with lepus).
    let ready = Arc::new(Barrier::new(threads + 1));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let errors = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (conn, queue, ready, barrier, errors) = (
                conn.clone(),
                queue.clone(),
                ready.clone(),
                barrier.clone(),
                errors.clone(),
            );
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let ch = block_on(conn.create_channel()).expect("create_channel");
                    if mode != Mode::None {
                        block_on(ch.confirm_select(ConfirmSelectOptions::default()))
                            .expect("confirm_select");
                    }
                    let body = [7u8; BODY];
                    let mut lat = Samples::with_capacity(per);
                    let mut window = Vec::new();
                    ready.wait();
                    barrier.wait();
                    for i in 0..per {
                        let t0 = Instant::now();
                        let publish = || {
                            ch.basic_publish(
                                "".into(),
                                queue.as_str().into(),
                                BasicPublishOptions::default(),
                                &body,
                                BasicProperties::default(),
                            )
                        };
                        let ok = match mode {
                            Mode::None => block_on(publish()).is_ok(),
                            Mode::Each => {
                                block_on(async { publish().await?.await }).is_ok_and(|c| c.is_ack())
                            }
                            Mode::Window(w) => {
                                let ok = block_on(publish()).is_ok();
                                window.push(t0);
                                if window.len() == w || i + 1 == per {
                                    let all = block_on(ch.wait_for_confirms()).is_ok();
                                    let now = Instant::now();
                                    for t in window.drain(..) {
                                        lat.push(now - t);
                                    }
                                    if !all {
                                        errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                ok
                            }
                        };
                        if !matches!(mode, Mode::Window(_)) {
                            lat.push(t0.elapsed());
                        }
                        if !ok {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    (lat, ch)
                })
                .expect("spawn")
        })
        .collect();
    ready.wait();
    let cpu0 = crate::cpu::process();
    // The clock starts before the release: a worker may finish before this thread
    // runs again after the barrier (on a loaded machine), and must not be missed.
    let start = Instant::now();
    barrier.wait();
    let mut lat = Samples::with_capacity(threads * per);
    let mut chans = Vec::new();
    for h in handles {
        let (l, ch) = h
            .join()
            .map_err(|_| "publisher thread panicked".to_string())?;
        lat.extend(l);
        chans.push(ch);
    }
    let call = start.elapsed().as_secs_f64();
    // One RPC on the same connection (after every publish was written): the CPU figure
    // ends here, before the polling for the absorbed time.
    count(&admin, &queue)?;
    let cpu = crate::cpu::process().since(&cpu0);
    let absorbed = wait_count(&admin, &queue, threads * per, start)?;
    let _ = block_on(admin.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()));
    drop(chans);
    let _ = block_on(conn.close(200, "bye".into()));
    Ok(PublishOut {
        call_secs: call,
        absorbed_secs: absorbed,
        lat: Percentiles::of(&mut lat),
        errors: errors.load(Ordering::Relaxed),
        cpu,
    })
}

pub fn consume(n: usize, messages: usize) -> Result<ConsumeOut, String> {
    let conn = connect()?;
    let admin = block_on(conn.create_channel()).map_err(e2s)?;
    let queue = unique("consume");
    block_on(admin.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .map_err(e2s)?;
    let barrier = Arc::new(Barrier::new(n + 1));
    let arrived = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Gate::default());
    let ready = Arc::new(AtomicUsize::new(0));
    let last_ready = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let last_recv = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (conn, queue, barrier) = (conn.clone(), queue.clone(), barrier.clone());
            let (arrived, gate) = (arrived.clone(), gate.clone());
            let (ready, last_ready, received, last_recv, stop, errors) = (
                ready.clone(),
                last_ready.clone(),
                received.clone(),
                last_recv.clone(),
                stop.clone(),
                errors.clone(),
            );
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut ledger = IdLedger::new(messages);
                    let mut lat = Samples::with_capacity(messages / n + 16);
                    arrived.fetch_add(1, Ordering::AcqRel);
                    barrier.wait();
                    let started = block_on(async {
                        let ch = conn.create_channel().await?;
                        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
                        let c = ch
                            .basic_consume(
                                queue.as_str().into(),
                                format!("c{i}").as_str().into(),
                                BasicConsumeOptions::default(),
                                FieldTable::default(),
                            )
                            .await?;
                        Ok::<_, lapin::Error>((ch, c))
                    });
                    let (_ch, mut consumer) = match started {
                        Ok(x) => x,
                        Err(e) => {
                            eprintln!("lapin consumer failed to start: {e}");
                            errors.fetch_add(1, Ordering::Relaxed);
                            ready.fetch_add(1, Ordering::AcqRel);
                            return (ledger, lat);
                        }
                    };
                    last_ready.fetch_max(now_ns(), Ordering::AcqRel);
                    ready.fetch_add(1, Ordering::AcqRel);
                    gate.wait();
                    while !stop.load(Ordering::Acquire) {
                        let next = block_on(futures_lite::future::or(
                            async { Some(consumer.next().await) },
                            async {
                                async_io::Timer::after(Duration::from_millis(20)).await;
                                None
                            },
                        ));
                        match next {
                            None => {}
                            Some(Some(Ok(d))) => {
                                let now = now_ns();
                                match read_stamp(&d.data) {
                                    Some((id, sent)) if ledger.record(id) => {
                                        lat.push_ns(now.saturating_sub(sent))
                                    }
                                    _ => {
                                        errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                if block_on(d.ack(BasicAckOptions::default())).is_err() {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                                last_recv.fetch_max(now, Ordering::AcqRel);
                                received.fetch_add(1, Ordering::AcqRel);
                            }
                            Some(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                    (ledger, lat)
                })
                .expect("spawn")
        })
        .collect();
    // From the release of the threads, every one waiting at the barrier, as the suite.
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrived.load(Ordering::Acquire) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    let start_ns = now_ns();
    barrier.wait();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.load(Ordering::Acquire) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    let startup = last_ready.load(Ordering::Acquire).saturating_sub(start_ns) as f64 / 1e9;
    gate.open();
    let producer = block_on(conn.create_channel()).map_err(e2s)?;
    let first_ns = now_ns();
    for id in 0..messages {
        let body = stamp_body(id as u64, now_ns(), 64);
        if block_on(producer.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        ))
        .is_err()
        {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    let produce = (now_ns() - first_ns) as f64 / 1e9;
    let deadline = Instant::now() + Duration::from_secs(30 + messages as u64 / 500);
    while received.load(Ordering::Acquire) < messages && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(500));
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Release);
    let mut ledger = IdLedger::new(messages);
    let mut lat = Samples::with_capacity(messages);
    for h in handles {
        let (l, s) = h
            .join()
            .map_err(|_| "consumer thread panicked".to_string())?;
        ledger.merge(&l);
        lat.extend(s);
    }
    let consume = last_recv.load(Ordering::Acquire).saturating_sub(first_ns) as f64 / 1e9;
    let _ = block_on(admin.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()));
    let _ = block_on(conn.close(200, "bye".into()));
    Ok(ConsumeOut {
        startup_secs: startup,
        produce_secs: produce,
        consume_secs: consume,
        lat: Percentiles::of(&mut lat),
        received: ledger.unique(),
        lost: ledger.missing(),
        duplicates: ledger.duplicates(),
        errors: errors.load(Ordering::Relaxed),
    })
}

/// Consume, two ways (see ways.rs): `n` consumers, a thread each running its whole
/// receive-and-ack loop in one `block_on`, until the connection closes.
pub fn consume_ways(
    queue: &str,
    n: usize,
    messages: usize,
    drain: bool,
) -> Result<WaysOut, String> {
    let conn = connect()?;
    let progress = Arc::new(Progress::default());
    // Steady: the consumers wait here until all are registered; drain: they start at once.
    let ready = Arc::new(Barrier::new(if drain { 1 } else { n + 1 }));
    let (mut cpu0, mut start_ns) = (crate::cpu::process(), now_ns());
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (conn, queue, progress, ready) = (
                conn.clone(),
                queue.to_owned(),
                progress.clone(),
                ready.clone(),
            );
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut ledger = IdLedger::new(messages);
                    let started = block_on(async {
                        let ch = conn.create_channel().await?;
                        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
                        let c = ch
                            .basic_consume(
                                queue.as_str().into(),
                                format!("c{i}").as_str().into(),
                                BasicConsumeOptions::default(),
                                FieldTable::default(),
                            )
                            .await?;
                        Ok::<_, lapin::Error>((ch, c))
                    });
                    progress.registered.fetch_add(1, Ordering::AcqRel);
                    ready.wait();
                    let (_ch, mut consumer) = match started {
                        Ok(x) => x,
                        Err(e) => {
                            eprintln!("lapin consumer failed to start: {e}");
                            progress.errors.fetch_add(1, Ordering::Relaxed);
                            return ledger;
                        }
                    };
                    block_on(async {
                        while let Some(Ok(d)) = consumer.next().await {
                            progress.record(&mut ledger, &d.data);
                            if d.ack(BasicAckOptions::default()).await.is_err() {
                                progress.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                    ledger
                })
                .expect("spawn")
        })
        .collect();
    ready.wait();
    if !drain {
        (cpu0, start_ns) = (crate::cpu::process(), now_ns());
        crate::ways::signal_ready();
    }
    let cpu1 = progress.wait(messages);
    progress.wait_registered(n);
    let _ = block_on(conn.close(200, "bye".into()));
    let mut ledger = IdLedger::new(messages);
    for h in handles {
        ledger.merge(
            &h.join()
                .map_err(|_| "consumer thread panicked".to_string())?,
        );
    }
    Ok(progress.out(start_ns, &cpu0, &cpu1, &ledger))
}
