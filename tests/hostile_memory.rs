//! Memory bounded in bytes: what a peer can make lepus hold. A counting allocator
//! measures the live heap of this test process; each case offers far more than the bound
//! (the fake broker's own buffers count too, so each bound has a stated slack) and asserts
//! the peak stays near the bound, then that everything offered still arrives.
//!
//! Tests run one at a time (a lock), since the allocator counts the whole process.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, channel};
use lepus::{Connection, ConsumeOptions, Error, RecoveryOptions};
use lepus_testkit::frames::*;
use lepus_testkit::{FakeBroker, Tune, within};
use support::ClientOptions;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn add(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            add(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

static SERIAL: Mutex<()> = Mutex::new(());

const MIB: usize = 1024 * 1024;

/// Start measuring: the peak from now on, above the live heap now.
fn reset_peak() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

fn peak_since(base: usize) -> usize {
    PEAK.load(Ordering::Relaxed).saturating_sub(base)
}

/// The fake broker offers `count` deliveries (to the consumer tags in turn) of `body`
/// with `props`; the client does not consume for a while, then takes everything. Returns
/// the peak live heap (above the start) while the client held back.
fn offered_case(
    opts: impl FnOnce(lepus::ConnectionOptions) -> lepus::ConnectionOptions + Send + 'static,
    consumers: usize,
    count: u64,
    props: Vec<u8>,
    body_len: usize,
) -> usize {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    within(Duration::from_secs(60), move || {
        let broker = FakeBroker::start(move |p| {
            p.handshake(Tune::default());
            let ch = p.serve_channel_open();
            let tags: Vec<String> = (0..consumers).map(|_| p.serve_consume().1).collect();
            let body = vec![0xAB; body_len];
            p.io.stream()
                .set_write_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            for t in 1..=count {
                let tag = &tags[(t as usize - 1) % tags.len()];
                p.deliver(ch, tag, t, &props, &body);
            }
            // The client drains everything before it closes: at its own pace, which on a
            // loaded machine (10,000 header values per message in a debug build) can take
            // longer than one scripted step.
            p.expect_connection_close_until(Instant::now() + Duration::from_secs(45))
                .reply_code
        });
        let conn = Connection::open_with(opts(broker.options())).unwrap();
        let ch = conn.open_channel().unwrap();
        let cs: Vec<_> = (0..consumers)
            .map(|_| {
                ch.basic_consume(
                    "q",
                    &ConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                )
                .unwrap()
            })
            .collect();
        let base = reset_peak();
        // Hold back while the broker pushes: reading must stop at the bound.
        std::thread::sleep(Duration::from_millis(1500));
        let peak = peak_since(base);
        let queued: usize = cs.iter().map(|c| c.queued()).sum();
        assert!((queued as u64) < count, "everything was queued: {queued}");
        let mut got = 0u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < count {
            for c in &cs {
                if let Ok(Some(d)) = c.recv_timeout(Duration::from_millis(10)) {
                    assert_eq!(d.body().len(), body_len);
                    got += 1;
                }
            }
            assert!(
                Instant::now() < deadline,
                "only {got} of {count} arrived ({:?})",
                conn.close_reason()
            );
        }
        assert!(conn.is_open(), "{:?}", conn.close_reason());
        drop(cs);
        conn.close().unwrap();
        broker.finish();
        eprintln!("peak live heap while holding back: {} KiB", peak / 1024);
        peak
    })
}

/// One consumer without prefetch: before, up to 1,024 deliveries were queued whatever
/// their size (here 96 MiB offered); now its queue holds about its byte bound.
#[test]
fn consumer_queue_is_bounded_in_bytes() {
    let bound = 4 * MIB;
    let peak = offered_case(
        move |o| o.consumer_queue_bytes(bound),
        1,
        96,
        no_props(),
        MIB,
    );
    // Bound, plus one delivery waiting for room, one being assembled, the read buffer,
    // and the fake broker's own copy of one delivery.
    assert!(peak < bound + 5 * MIB, "peak {} KiB", peak / 1024);
}

/// The same, with headers that decode to many times their wire size: 10,000 void
/// values (10 KB on the wire) per message.
#[test]
fn headers_are_counted_at_their_decoded_size() {
    let bound = 4 * MIB;
    let peak = offered_case(
        move |o| o.consumer_queue_bytes(bound),
        1,
        200,
        void_array_headers(10_000),
        16,
    );
    // Offered: 200 × ~320 KB decoded (about 60 MiB, all of it queued under the count
    // bound alone).
    assert!(peak < bound + 4 * MIB, "peak {} KiB", peak / 1024);
}

fn void_array_headers(n: u32) -> Vec<u8> {
    let mut table = Vec::new();
    let mut entry = vec![1, b'a', b'A'];
    entry.extend_from_slice(&n.to_be_bytes());
    entry.extend(std::iter::repeat_n(b'V', n as usize));
    table.extend_from_slice(&(entry.len() as u32).to_be_bytes());
    table.extend(entry);
    headers_props(&table)
}

/// Through RabbitMQ: a raw-socket publisher sends 200 messages whose headers are 10 KB on
/// the wire and ~320 KB decoded; a consumer without prefetch that holds back keeps about
/// its byte bound, then receives all of them.
#[test]
fn decoded_header_size_is_bounded_through_rabbitmq() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    within(Duration::from_secs(90), || {
        let cleanup = support::Cleanup::new();
        let conn =
            Connection::open_with(support::test_options().consumer_queue_bytes(4 * MIB)).unwrap();
        let ch = conn.open_channel().unwrap();
        let q = cleanup.queue(&support::unique("hostile-void-headers"));
        ch.queue_declare(
            &q,
            &lepus::QueueDeclareOptions {
                arguments: lepus::FieldTable::new().with("x-expires", 120_000),
                ..Default::default()
            },
        )
        .unwrap();
        let count = 200u64;
        let props = void_array_headers(10_000);
        let mut c =
            lepus_testkit::RawClient::connect(support::broker_addr(), "guest", "guest", "/")
                .unwrap();
        c.open_channels(1..=1).unwrap();
        c.confirm_select(1).unwrap();
        for i in 1..=count {
            c.publish(1, "", &q, &props, b"v").unwrap();
            c.expect_ack(1, i)
                .expect("RabbitMQ accepts void values in headers");
        }
        c.close().unwrap();

        let base = reset_peak();
        let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let peak = peak_since(base);
        let queued = consumer.queued();
        assert!((queued as u64) < count, "all {queued} were queued");
        for _ in 0..count {
            let d = consumer
                .recv_timeout(Duration::from_secs(10))
                .unwrap()
                .expect("a delivery in time");
            d.ack().unwrap();
        }
        eprintln!(
            "{count} messages of ~320 KB decoded offered; {queued} queued; peak live heap {} KiB",
            peak / 1024
        );
        assert!(peak < 4 * MIB + 4 * MIB, "peak {} KiB", peak / 1024);
        drop(consumer);
        ch.queue_delete(&q, &Default::default()).unwrap();
        conn.close().unwrap();
    });
}

/// Four consumers, each allowed 64 MiB, on a connection allowed 6 MiB in all.
#[test]
fn connection_total_is_bounded_in_bytes() {
    let bound = 6 * MIB;
    let peak = offered_case(
        move |o| {
            o.consumer_queue_bytes(64 * MIB)
                .connection_queue_bytes(bound)
        },
        4,
        96,
        no_props(),
        MIB,
    );
    assert!(peak < bound + 5 * MIB, "peak {} KiB", peak / 1024);
}

/// A broker that never reads but keeps sending `channel.flow` (each needs a flow-ok):
/// the output stops growing at its bound (reading pauses), and the link is declared dead
/// after the write-stall time.
#[test]
fn output_to_a_peer_that_never_reads_is_bounded_and_the_link_declared_dead() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    within(Duration::from_secs(60), || {
        let broker = FakeBroker::start(|p| {
            p.handshake(Tune::default());
            let ch = p.serve_channel_open();
            let flow = method_frame(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: true })),
            );
            let batch: Vec<u8> = flow
                .iter()
                .copied()
                .cycle()
                .take(flow.len() * 4096)
                .collect();
            p.io.stream()
                .set_write_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut sent = 0usize;
            // Until the client gives up on us (or our writes block for 10 s).
            while p.io.send(&batch).is_ok() {
                sent += batch.len();
                if sent > 512 * MIB {
                    break;
                }
            }
            sent
        });
        let limit = 256 * 1024;
        let base = reset_peak();
        let start = Instant::now();
        let conn = Connection::open_with(
            broker
                .options()
                .max_output_bytes(limit)
                .write_stall_timeout(Duration::from_secs(2))
                .recovery(RecoveryOptions::disabled()),
        )
        .unwrap();
        let _ch = conn.open_channel().unwrap();
        assert!(support::wait_until(Duration::from_secs(20), || !conn.is_open()));
        let took = start.elapsed();
        let peak = peak_since(base);
        match conn.close_reason() {
            Some(Error::ConnectionLost(why)) => assert!(why.contains("stalled"), "{why}"),
            other => panic!("expected ConnectionLost, got {other:?}"),
        }
        let sent = broker.finish();
        eprintln!(
            "broker sent {} KiB of channel.flow; peak live heap {} KiB; dead after {took:?}",
            sent / 1024,
            peak / 1024
        );
        assert!(sent > 4 * limit, "the broker sent only {sent} bytes");
        // The output bound, the read buffer, the broker's batch (80 KiB) and slack.
        assert!(peak < limit + 2 * MIB, "peak {} KiB", peak / 1024);
        assert!(took < Duration::from_secs(12), "{took:?}");
    });
}
