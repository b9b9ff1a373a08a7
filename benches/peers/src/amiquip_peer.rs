//! amiquip: synchronous; channels are opened on the connection's thread (its
//! `open_channel` takes `&mut Connection`) and moved into the worker threads.
//!
//! TCP_NODELAY: amiquip does not set it (`Connection::insecure_open` connects a plain
//! mio socket), and with Nagle on, a lone publish or ack waits for the previous segment's
//! ACK (delayed up to 40 ms by the broker's side). Its users set it themselves: connect a
//! `std::net::TcpStream`, `set_nodelay(true)`, hand it to mio (`TcpStream::from_stream`)
//! and open the connection on that stream with `Connection::insecure_open_stream` — what
//! [`open`] does here, for every amiquip run.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use amiquip::{
    Auth, Channel, Confirm, ConfirmSmoother, Connection, ConnectionOptions, ConnectionTuning,
    ConsumerMessage, ConsumerOptions, Publish, QueueDeclareOptions, QueueDeleteOptions,
};

use crate::stats::{IdLedger, Percentiles, Samples, read_stamp, stamp_body};
use crate::ways::{Progress, WaysOut};
use crate::{BODY, ConsumeOut, Gate, Mode, PREFETCH, PublishOut, now_ns, unique, url};

fn e2s(e: amiquip::Error) -> String {
    e.to_string()
}

/// An amiquip connection to `AMQP_URL` over a socket with TCP_NODELAY set, the way an
/// amiquip user sets it (see the top of this file).
fn open() -> Result<Connection, String> {
    let url = url();
    let rest = url
        .strip_prefix("amqp://")
        .ok_or("amiquip peer: amqp:// URLs only")?;
    let (auth, rest) = rest.split_once('@').unwrap_or(("guest:guest", rest));
    let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
    let (hostport, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let vhost = match vhost {
        "" | "%2f" | "%2F" => "/".to_string(),
        v => v.replace("%2f", "/").replace("%2F", "/"),
    };
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:5672")
    };
    let stream = std::net::TcpStream::connect(&hostport).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let stream = mio::net::TcpStream::from_stream(stream).map_err(|e| e.to_string())?;
    let options = ConnectionOptions::default()
        .auth(Auth::Plain {
            username: user.to_string(),
            password: pass.to_string(),
        })
        .virtual_host(vhost);
    Connection::insecure_open_stream(stream, options, ConnectionTuning::default()).map_err(e2s)
}

fn wait_count(admin: &Channel, queue: &str, n: usize, start: Instant) -> Result<f64, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let q = admin.queue_declare_passive(queue).map_err(e2s)?;
        if q.declared_message_count().unwrap_or(0) as usize >= n {
            return Ok(start.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            return Ok(f64::NAN);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn publish(threads: usize, per: usize, mode: Mode) -> Result<PublishOut, String> {
    let mut conn = open()?;
    let admin = conn.open_channel(None).map_err(e2s)?;
    let queue = unique("publish");
    admin
        .queue_declare(queue.as_str(), QueueDeclareOptions::default())
        .map_err(e2s)?;
    let mut channels = Vec::with_capacity(threads);
    for _ in 0..threads {
        channels.push(conn.open_channel(None).map_err(e2s)?);
    }
    // Every thread's set-up (channel, confirm.select) before `ready`: the clock and the
    // CPU figure start after it (the suite does the same with lepus).
    let ready = Arc::new(Barrier::new(threads + 1));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let errors = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = channels
        .into_iter()
        .map(|ch| {
            let (queue, ready, barrier, errors) = (
                queue.clone(),
                ready.clone(),
                barrier.clone(),
                errors.clone(),
            );
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let confirms = if mode != Mode::None {
                        let rx = ch
                            .listen_for_publisher_confirms()
                            .expect("listen for confirms");
                        ch.enable_publisher_confirms().expect("confirm.select");
                        Some(rx)
                    } else {
                        None
                    };
                    let mut smoother = ConfirmSmoother::new();
                    let mut confirmed = 0usize;
                    let mut published = 0usize;
                    let mut wait_all = |published: usize, confirmed: &mut usize| -> bool {
                        let rx = confirms.as_ref().expect("confirm mode");
                        let mut all_acked = true;
                        while *confirmed < published {
                            match rx.recv_timeout(Duration::from_secs(60)) {
                                Ok(c) => {
                                    for c in smoother.process(c) {
                                        *confirmed += 1;
                                        if matches!(c, Confirm::Nack(_)) {
                                            all_acked = false;
                                        }
                                    }
                                }
                                Err(_) => return false,
                            }
                        }
                        all_acked
                    };
                    let body = [7u8; BODY];
                    let mut lat = Samples::with_capacity(per);
                    let mut window = Vec::new();
                    ready.wait();
                    barrier.wait();
                    for i in 0..per {
                        let t0 = Instant::now();
                        let mut ok = ch
                            .basic_publish("", Publish::new(&body, queue.as_str()))
                            .is_ok();
                        published += 1;
                        match mode {
                            Mode::None => {}
                            Mode::Each => ok &= wait_all(published, &mut confirmed),
                            Mode::Window(w) => {
                                window.push(t0);
                                if window.len() == w || i + 1 == per {
                                    let all = wait_all(published, &mut confirmed);
                                    let now = Instant::now();
                                    for t in window.drain(..) {
                                        lat.push(now - t);
                                    }
                                    if !all {
                                        errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                        }
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
    admin.queue_declare_passive(queue.as_str()).map_err(e2s)?;
    let cpu = crate::cpu::process().since(&cpu0);
    let absorbed = wait_count(&admin, &queue, threads * per, start)?;
    let _ = admin.queue_delete(queue.as_str(), QueueDeleteOptions::default());
    drop(chans);
    drop(admin);
    let _ = conn.close();
    Ok(PublishOut {
        call_secs: call,
        absorbed_secs: absorbed,
        lat: Percentiles::of(&mut lat),
        errors: errors.load(Ordering::Relaxed),
        cpu,
    })
}

pub fn consume(n: usize, messages: usize) -> Result<ConsumeOut, String> {
    let mut conn = open()?;
    let admin = conn.open_channel(None).map_err(e2s)?;
    let queue = unique("consume");
    admin
        .queue_declare(queue.as_str(), QueueDeclareOptions::default())
        .map_err(e2s)?;
    let gate = Arc::new(Gate::default());
    let ready = Arc::new(AtomicUsize::new(0));
    let last_ready = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let last_recv = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicUsize::new(0));
    // Startup counts from here: amiquip opens channels on the connection's thread only.
    let start_ns = now_ns();
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(conn.open_channel(None).map_err(e2s)?);
    }
    let handles: Vec<_> = channels
        .into_iter()
        .map(|ch| {
            let (queue, gate) = (queue.clone(), gate.clone());
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
                    let run = || {
                        let mut ledger = IdLedger::new(messages);
                        let mut lat = Samples::with_capacity(messages / n + 16);
                        let consumer = ch.qos(0, PREFETCH, false).and_then(|_| {
                            ch.basic_consume(queue.as_str(), ConsumerOptions::default())
                        });
                        let consumer = match consumer {
                            Ok(c) => c,
                            Err(e) => {
                                eprintln!("amiquip consumer failed to start: {e}");
                                errors.fetch_add(1, Ordering::Relaxed);
                                ready.fetch_add(1, Ordering::AcqRel);
                                return (ledger, lat);
                            }
                        };
                        last_ready.fetch_max(now_ns(), Ordering::AcqRel);
                        ready.fetch_add(1, Ordering::AcqRel);
                        gate.wait();
                        while !stop.load(Ordering::Acquire) {
                            match consumer.receiver().recv_timeout(Duration::from_millis(20)) {
                                Ok(ConsumerMessage::Delivery(d)) => {
                                    let now = now_ns();
                                    match read_stamp(&d.body) {
                                        Some((id, sent)) if ledger.record(id) => {
                                            lat.push_ns(now.saturating_sub(sent))
                                        }
                                        _ => {
                                            errors.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                    if let Err(e) = consumer.ack(d)
                                        && errors.fetch_add(1, Ordering::Relaxed) < 3
                                    {
                                        eprintln!("amiquip: ack failed: {e}");
                                    }
                                    last_recv.fetch_max(now, Ordering::AcqRel);
                                    received.fetch_add(1, Ordering::AcqRel);
                                }
                                Ok(other) => {
                                    if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                                        eprintln!("amiquip: consumer ended: {other:?}");
                                    }
                                    break;
                                }
                                Err(crossbeam_timeout) if crossbeam_timeout.is_timeout() => {}
                                Err(e) => {
                                    if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                                        eprintln!("amiquip: consumer receive failed: {e}");
                                    }
                                    break;
                                }
                            }
                        }
                        drop(consumer);
                        (ledger, lat)
                    };
                    let (ledger, lat) = run();
                    (ledger, lat, ch)
                })
                .expect("spawn")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.load(Ordering::Acquire) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    let startup = last_ready.load(Ordering::Acquire).saturating_sub(start_ns) as f64 / 1e9;
    gate.open();
    let producer = conn.open_channel(None).map_err(e2s)?;
    let first_ns = now_ns();
    for id in 0..messages {
        let body = stamp_body(id as u64, now_ns(), 64);
        if producer
            .basic_publish("", Publish::new(&body, queue.as_str()))
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
    let mut chans = Vec::new();
    for h in handles {
        let (l, s, ch) = h
            .join()
            .map_err(|_| "consumer thread panicked".to_string())?;
        ledger.merge(&l);
        lat.extend(s);
        chans.push(ch);
    }
    let consume = last_recv.load(Ordering::Acquire).saturating_sub(first_ns) as f64 / 1e9;
    let _ = admin.queue_delete(queue.as_str(), QueueDeleteOptions::default());
    drop(chans);
    drop(producer);
    drop(admin);
    let _ = conn.close();
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

/// Consume, two ways (see ways.rs): `n` consumers, a thread each (channels opened on
/// the connection's thread, as amiquip requires), until the connection closes.
pub fn consume_ways(
    queue: &str,
    n: usize,
    messages: usize,
    drain: bool,
) -> Result<WaysOut, String> {
    let mut conn = open()?;
    let progress = Arc::new(Progress::default());
    // Steady: the consumers wait here until all are registered; drain: they start at once.
    let ready = Arc::new(Barrier::new(if drain { 1 } else { n + 1 }));
    let (mut cpu0, mut start_ns) = (crate::cpu::process(), now_ns());
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(conn.open_channel(None).map_err(e2s)?);
    }
    let handles: Vec<_> = channels
        .into_iter()
        .map(|ch| {
            let (queue, progress, ready) = (queue.to_owned(), progress.clone(), ready.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut ledger = IdLedger::new(messages);
                    {
                        let consumer = ch.qos(0, PREFETCH, false).and_then(|_| {
                            ch.basic_consume(queue.as_str(), ConsumerOptions::default())
                        });
                        progress.registered.fetch_add(1, Ordering::AcqRel);
                        ready.wait();
                        match consumer {
                            Ok(consumer) => {
                                for m in consumer.receiver().iter() {
                                    let ConsumerMessage::Delivery(d) = m else {
                                        break;
                                    };
                                    progress.record(&mut ledger, &d.body);
                                    if consumer.ack(d).is_err() {
                                        progress.errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                            Err(e) => {
                                eprintln!("amiquip consumer failed to start: {e}");
                                progress.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    (ledger, ch)
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
    // Closing the connection ends every consumer's receiver.
    let _ = conn.close();
    let mut ledger = IdLedger::new(messages);
    for h in handles {
        let (l, _ch) = h
            .join()
            .map_err(|_| "consumer thread panicked".to_string())?;
        ledger.merge(&l);
    }
    Ok(progress.out(start_ns, &cpu0, &cpu1, &ledger))
}
