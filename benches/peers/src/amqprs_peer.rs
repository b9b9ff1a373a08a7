//! amqprs: async, every publisher and consumer a task on a multi-threaded tokio runtime
//! (as its examples run it), one connection, a channel per task. amqprs sets TCP_NODELAY
//! itself. Confirms arrive through a `ChannelCallback` (`publish_ack`), forwarded to
//! the channel's task over a tokio channel.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use tokio::sync::mpsc;

use crate::stats::{IdLedger, Percentiles, Samples, read_stamp, stamp_body};
use crate::ways::{Progress, WaysOut};
use crate::{BODY, ConsumeOut, Mode, PREFETCH, PublishOut, now_ns, unique, url};

fn e2s(e: amqprs::error::Error) -> String {
    e.to_string()
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

async fn connect() -> Result<Connection, String> {
    let url = url();
    let rest = url
        .strip_prefix("amqp://")
        .ok_or("amqprs peer: amqp:// URLs only")?;
    let (auth, rest) = rest.split_once('@').unwrap_or(("guest:guest", rest));
    let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
    let (hostport, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5672"));
    let vhost = match vhost {
        "" | "%2f" | "%2F" => "/".to_string(),
        v => v.replace("%2f", "/").replace("%2F", "/"),
    };
    let port: u16 = port.parse().map_err(|_| format!("bad port {port}"))?;
    let mut args = OpenConnectionArguments::new(host, port, user, pass);
    args.virtual_host(&vhost);
    Connection::open(&args).await.map_err(e2s)
}

/// (delivery tag, multiple, ack) of each confirm of one channel.
type ConfirmEvent = (u64, bool, bool);

struct Confirms(mpsc::UnboundedSender<ConfirmEvent>);

#[async_trait::async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        // `mutiple`: sic, amqprs 2 spells it so.
        let _ = self.0.send((ack.delivery_tag(), ack.mutiple(), true));
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        let _ = self.0.send((nack.delivery_tag(), nack.multiple(), false));
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// Wait until no publish of this channel is outstanding; false on a nack or a closed channel.
async fn settle(
    outstanding: &mut BTreeSet<u64>,
    rx: &mut mpsc::UnboundedReceiver<ConfirmEvent>,
) -> bool {
    let mut all_acked = true;
    while !outstanding.is_empty() {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some((tag, multiple, ack))) => {
                if multiple {
                    *outstanding = outstanding.split_off(&(tag + 1));
                } else {
                    outstanding.remove(&tag);
                }
                all_acked &= ack;
            }
            _ => return false,
        }
    }
    all_acked
}

async fn message_count(admin: &Channel, queue: &str) -> Result<u32, String> {
    let r = admin
        .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
        .await
        .map_err(e2s)?;
    Ok(r.map(|(_, n, _)| n).unwrap_or(0))
}

async fn wait_count(admin: &Channel, queue: &str, n: usize, start: Instant) -> Result<f64, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if message_count(admin, queue).await? as usize >= n {
            return Ok(start.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            return Ok(f64::NAN);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One publisher task: `per` publishes on its own channel, waiting as `mode` says.
async fn publisher(
    ch: Channel,
    mut rx: mpsc::UnboundedReceiver<ConfirmEvent>,
    queue: String,
    per: usize,
    mode: Mode,
    barrier: Arc<tokio::sync::Barrier>,
    errors: Arc<AtomicUsize>,
) -> (Samples, Channel) {
    let mut lat = Samples::with_capacity(per);
    let mut window = Vec::new();
    let mut outstanding = BTreeSet::new();
    let mut tag = 0u64;
    barrier.wait().await;
    for i in 0..per {
        let t0 = Instant::now();
        let args = BasicPublishArguments::new("", &queue);
        let mut ok = ch
            .basic_publish(BasicProperties::default(), vec![7u8; BODY], args)
            .await
            .is_ok();
        tag += 1;
        if mode != Mode::None {
            outstanding.insert(tag);
        }
        match mode {
            Mode::None => lat.push(t0.elapsed()),
            Mode::Each => {
                ok &= settle(&mut outstanding, &mut rx).await;
                lat.push(t0.elapsed());
            }
            Mode::Window(w) => {
                window.push(t0);
                if window.len() == w || i + 1 == per {
                    let all = settle(&mut outstanding, &mut rx).await;
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
        if !ok {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    (lat, ch)
}

pub fn publish(threads: usize, per: usize, mode: Mode) -> Result<PublishOut, String> {
    runtime()?.block_on(async move {
        let conn = connect().await?;
        let admin = conn.open_channel(None).await.map_err(e2s)?;
        let queue = unique("publish");
        admin
            .queue_declare(QueueDeclareArguments::new(&queue))
            .await
            .map_err(e2s)?;
        let barrier = Arc::new(tokio::sync::Barrier::new(threads + 1));
        let errors = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::with_capacity(threads);
        for _ in 0..threads {
            let ch = conn.open_channel(None).await.map_err(e2s)?;
            let (tx, rx) = mpsc::unbounded_channel();
            ch.register_callback(Confirms(tx)).await.map_err(e2s)?;
            if mode != Mode::None {
                ch.confirm_select(ConfirmSelectArguments::default())
                    .await
                    .map_err(e2s)?;
            }
            let (queue, barrier, errors) = (queue.clone(), barrier.clone(), errors.clone());
            tasks.push(tokio::spawn(publisher(
                ch, rx, queue, per, mode, barrier, errors,
            )));
        }
        let cpu0 = crate::cpu::process();
        // The clock starts before the release: a worker may finish before this thread
        // runs again after the barrier (on a loaded machine), and must not be missed.
        let start = Instant::now();
        barrier.wait().await;
        let mut lat = Samples::with_capacity(threads * per);
        let mut chans = Vec::with_capacity(threads);
        for t in tasks {
            let (l, ch) = t.await.map_err(|e| format!("publisher task: {e}"))?;
            lat.extend(l);
            chans.push(ch);
        }
        let call = start.elapsed().as_secs_f64();
        // One RPC on the same connection (after every publish was written): the CPU
        // figure ends here, before the polling for the absorbed time.
        message_count(&admin, &queue).await?;
        let cpu = crate::cpu::process().since(&cpu0);
        let absorbed = wait_count(&admin, &queue, threads * per, start).await?;
        let _ = admin.queue_delete(QueueDeleteArguments::new(&queue)).await;
        drop(chans);
        let _ = conn.close().await;
        Ok(PublishOut {
            call_secs: call,
            absorbed_secs: absorbed,
            lat: Percentiles::of(&mut lat),
            errors: errors.load(Ordering::Relaxed),
            cpu,
        })
    })
}

/// Start a consumer task on its own channel (qos, consume), counted in `ready` once
/// registered. The task owns `state`, records each delivery with `each` and acks it,
/// until the connection closes; then it hands `state` back.
async fn consumer<S: Send + 'static>(
    conn: &Connection,
    queue: &str,
    tag: String,
    ready: Arc<AtomicUsize>,
    mut state: S,
    mut each: impl FnMut(&mut S, &[u8]) + Send + 'static,
    errors: Arc<AtomicUsize>,
) -> Result<tokio::task::JoinHandle<S>, String> {
    let ch = conn.open_channel(None).await.map_err(e2s)?;
    ch.basic_qos(BasicQosArguments::new(0, PREFETCH, false))
        .await
        .map_err(e2s)?;
    let args = BasicConsumeArguments::new(queue, &tag)
        .manual_ack(true)
        .finish();
    let (_tag, mut rx) = ch.basic_consume_rx(args).await.map_err(e2s)?;
    ready.fetch_add(1, Ordering::AcqRel);
    Ok(tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let (Some(d), Some(body)) = (m.deliver, m.content) else {
                continue;
            };
            each(&mut state, &body);
            let ack = BasicAckArguments::new(d.delivery_tag(), false);
            if ch.basic_ack(ack).await.is_err() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        state
    }))
}

/// Await the consumer tasks (they end when the connection closes), 10 s in all.
async fn collect<S>(tasks: Vec<tokio::task::JoinHandle<S>>) -> Result<Vec<S>, String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.map_err(|e| format!("consumer task: {e}"))?);
        }
        Ok(out)
    })
    .await
    .map_err(|_| "consumer tasks did not end after the connection closed".to_string())?
}

/// Register `n` consumers concurrently (as lepus's consumer threads do), each with its
/// own `state()`.
async fn start_consumers<S: Send + 'static>(
    conn: &Connection,
    queue: &str,
    ready: &Arc<AtomicUsize>,
    errors: &Arc<AtomicUsize>,
    states: Vec<S>,
    each: impl FnMut(&mut S, &[u8]) + Send + Clone + 'static,
) -> Vec<tokio::task::JoinHandle<S>> {
    let n = states.len();
    let mut starting = Vec::with_capacity(n);
    for (i, st) in states.into_iter().enumerate() {
        let (conn, queue, ready, errors) = (
            conn.clone(),
            queue.to_owned(),
            ready.clone(),
            errors.clone(),
        );
        let each = each.clone();
        starting.push(tokio::spawn(async move {
            consumer(&conn, &queue, format!("c{i}"), ready, st, each, errors).await
        }));
    }
    let mut tasks = Vec::with_capacity(n);
    for s in starting {
        match s.await {
            Ok(Ok(t)) => tasks.push(t),
            Ok(Err(e)) => {
                if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("amqprs consumer failed to start: {e}");
                }
            }
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    tasks
}

pub fn consume(n: usize, messages: usize) -> Result<ConsumeOut, String> {
    runtime()?.block_on(async move {
        let conn = connect().await?;
        let admin = conn.open_channel(None).await.map_err(e2s)?;
        let queue = unique("consume");
        admin
            .queue_declare(QueueDeclareArguments::new(&queue))
            .await
            .map_err(e2s)?;
        let ready = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(AtomicUsize::new(0));
        let last_recv = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicUsize::new(0));
        // Each consumer's bookkeeping is made before the clock starts, as lepus's and
        // lapin's threads make theirs before the barrier.
        let states: Vec<_> = (0..n)
            .map(|_| {
                (
                    IdLedger::new(messages),
                    Samples::with_capacity(messages / n + 16),
                )
            })
            .collect();
        let start_ns = now_ns();
        let each = {
            let (received, last_recv, errors) =
                (received.clone(), last_recv.clone(), errors.clone());
            move |st: &mut (IdLedger, Samples), body: &[u8]| {
                let now = now_ns();
                match read_stamp(body) {
                    Some((id, sent)) if st.0.record(id) => st.1.push_ns(now.saturating_sub(sent)),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                last_recv.fetch_max(now, Ordering::AcqRel);
                received.fetch_add(1, Ordering::AcqRel);
            }
        };
        let tasks = start_consumers(&conn, &queue, &ready, &errors, states, each).await;
        let startup = (now_ns() - start_ns) as f64 / 1e9;
        let producer = conn.open_channel(None).await.map_err(e2s)?;
        let first_ns = now_ns();
        for id in 0..messages {
            let body = stamp_body(id as u64, now_ns(), 64);
            let args = BasicPublishArguments::new("", &queue);
            if producer
                .basic_publish(BasicProperties::default(), body, args)
                .await
                .is_err()
            {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let produce = (now_ns() - first_ns) as f64 / 1e9;
        let deadline = Instant::now() + Duration::from_secs(30 + messages as u64 / 500);
        while received.load(Ordering::Acquire) < messages && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let consume = last_recv.load(Ordering::Acquire).saturating_sub(first_ns) as f64 / 1e9;
        let _ = admin.queue_delete(QueueDeleteArguments::new(&queue)).await;
        let _ = conn.close().await;
        let mut ledger = IdLedger::new(messages);
        let mut lat = Samples::with_capacity(messages);
        for (l, s) in collect(tasks).await? {
            ledger.merge(&l);
            lat.extend(s);
        }
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
    })
}

/// Consume, two ways (see ways.rs): `n` consumer tasks registered concurrently.
pub fn consume_ways(
    queue: &str,
    n: usize,
    messages: usize,
    drain: bool,
) -> Result<WaysOut, String> {
    let queue = queue.to_owned();
    runtime()?.block_on(async move {
        let conn = connect().await?;
        let progress = Arc::new(Progress::default());
        let ready = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicUsize::new(0));
        let (mut cpu0, mut start_ns) = (crate::cpu::process(), now_ns());
        let each = {
            let progress = progress.clone();
            move |ledger: &mut IdLedger, body: &[u8]| progress.record(ledger, body)
        };
        let states = (0..n).map(|_| IdLedger::new(messages)).collect();
        let tasks = start_consumers(&conn, &queue, &ready, &errors, states, each).await;
        if !drain {
            (cpu0, start_ns) = (crate::cpu::process(), now_ns());
            crate::ways::signal_ready();
        }
        // Polled off the runtime's threads, as the other peers poll from their main thread.
        let p = progress.clone();
        let cpu1 = tokio::task::spawn_blocking(move || p.wait(messages))
            .await
            .map_err(|e| e.to_string())?;
        let _ = conn.close().await;
        let mut ledger = IdLedger::new(messages);
        for l in collect(tasks).await? {
            ledger.merge(&l);
        }
        progress
            .errors
            .fetch_add(errors.load(Ordering::Relaxed), Ordering::Relaxed);
        Ok(progress.out(start_ns, &cpu0, &cpu1, &ledger))
    })
}
