//! Observability against the real broker: exact counters after a known workload, each
//! connection event the broker can be made to cause (channel closed, consumer cancelled,
//! returns dropped), the listener's thread and its isolation from the I/O thread, and
//! (with the `metrics` and `opentelemetry` features) the facade's values and the trace
//! context's round trip through RabbitMQ. Blocked/unblocked is in tests/blocked.rs (it
//! needs a memory alarm).

mod support;

use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lepus::{
    BasicProperties, Channel, ConnectionEvent, ConnectionEventKind, ConsumeOptions, Delivery,
    FieldTable, PublishOptions, QueueDeclareOptions, reply_code,
};
use support::{Cleanup, test_options, unique, wait_until};

const WAIT: Duration = Duration::from_secs(10);

/// The next delivery of `c`, within `WAIT`.
fn next(c: &lepus::Consumer) -> Delivery {
    c.recv_timeout(WAIT)
        .expect("the consumer works")
        .expect("a delivery within the deadline")
}

fn publish(ch: &Channel, routing_key: &str, body: &[u8], mandatory: bool) {
    let opts = PublishOptions { mandatory };
    ch.basic_publish("", routing_key, body, &BasicProperties::new(), &opts)
        .expect("publish");
}

/// A connection whose listener sends every event to the returned receiver.
fn with_listener(name: &str) -> (lepus::Connection, mpsc::Receiver<ConnectionEvent>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let conn =
        lepus::Connection::open_with(test_options().connection_name(unique(name)).event_listener(
            move |e| {
                let _ = tx.lock().unwrap().send(e.clone());
            },
        ))
        .expect("connect");
    (conn, rx)
}

/// The first event `pick` accepts that the listener hears within `WAIT`.
fn heard<T>(
    rx: &mpsc::Receiver<ConnectionEvent>,
    pick: impl Fn(&ConnectionEventKind) -> Option<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = rx
            .recv_timeout(left)
            .expect("the event within the deadline");
        if let Some(t) = pick(&e.kind) {
            return t;
        }
    }
}

#[test]
fn counters_are_exact_after_a_known_workload() {
    let cleanup = Cleanup::new();
    let conn = lepus::Connection::open_with(test_options().connection_name(unique("stats")))
        .expect("connect");
    let s0 = conn.stats();
    assert_eq!(
        (s0.published, s0.delivered, s0.channels, s0.consumers),
        (0, 0, 0, 0)
    );
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    // Ten fit; the broker nacks the next ten (reject-publish): real nacks.
    let q = cleanup.queue(&unique("stats-q"));
    let args = FieldTable::new()
        .with("x-max-length", 10i32)
        .with("x-overflow", "reject-publish");
    ch.queue_declare(
        &q,
        &QueueDeclareOptions {
            arguments: args,
            ..Default::default()
        },
    )
    .unwrap();
    let body = [7u8; 100];
    for _ in 0..20 {
        publish(&ch, &q, &body, false);
    }
    match ch.wait_for_confirms() {
        Err(lepus::Error::Nacked { sequences, .. }) => {
            assert_eq!(sequences, (11..=20).collect::<Vec<u64>>())
        }
        other => panic!("ten should be nacked: {other:?}"),
    }
    // Two unroutable mandatory messages: returned, then acked by the broker.
    for _ in 0..2 {
        publish(&ch, &unique("nowhere"), b"r", true);
    }
    ch.wait_for_confirms().unwrap();
    let r = ch.recv_return(WAIT).unwrap().expect("a return");
    assert_eq!(r.reply_code, reply_code::NO_ROUTE);

    let cch = conn.open_channel().unwrap();
    let consumer = cch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    let s = conn.stats();
    assert_eq!((s.channels, s.consumers), (2, 1), "{s:?}");
    for i in 0..10 {
        let d = next(&consumer);
        assert_eq!(d.body(), body);
        if i < 7 {
            d.ack().unwrap();
        } else {
            d.reject(false).unwrap();
        }
    }
    consumer.cancel().unwrap();
    let s = conn.stats();
    assert_eq!(s.published, 22, "{s:?}");
    assert_eq!(s.confirmed, 12, "{s:?}");
    assert_eq!(s.nacked, 10, "{s:?}");
    assert_eq!(s.returned, 2, "{s:?}");
    assert_eq!(s.returns_dropped, 0, "{s:?}");
    assert_eq!(s.delivered, 10, "{s:?}");
    assert_eq!(s.acked, 7, "{s:?}");
    assert_eq!(s.rejected, 3, "{s:?}");
    assert_eq!(s.reconnects, 0, "{s:?}");
    assert_eq!((s.channels, s.consumers), (2, 0), "{s:?}");
    // Every body crossed the socket, with its frames around it.
    assert!(s.bytes_out > 22 * 100, "{s:?}");
    assert!(s.bytes_in > 10 * 100, "{s:?}");
    cch.close().unwrap();
    assert_eq!(conn.stats().channels, 1);
    // Counters only grow: another read gives at least as much.
    let later = conn.stats();
    assert!(later.bytes_in >= s.bytes_in && later.bytes_out >= s.bytes_out);
    conn.close().unwrap();
}

/// Batch settles count each delivery they cover (a multiple ack of 4 counts 4), and a
/// batch settled twice counts (and sends) nothing the second time.
#[test]
fn batch_settles_count_each_delivery() {
    let cleanup = Cleanup::new();
    let conn = lepus::Connection::open_with(test_options().connection_name(unique("stats-b")))
        .expect("connect");
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = cleanup.queue(&unique("stats-b"));
    ch.queue_declare(&q, &QueueDeclareOptions::default())
        .unwrap();
    for _ in 0..10 {
        publish(&ch, &q, b"b", false);
    }
    ch.wait_for_confirms().unwrap();
    let cch = conn.open_channel().unwrap();
    cch.basic_qos(20, false).unwrap();
    let consumer = cch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    assert!(wait_until(WAIT, || consumer.queued() == 10));
    let s0 = conn.stats();
    let four = consumer.recv_batch(4, WAIT).unwrap().expect("four");
    assert_eq!(four.len(), 4);
    four.ack_all().unwrap(); // one multiple ack: the only consumer of its channel
    let three = consumer.recv_batch(3, WAIT).unwrap().expect("three");
    three.nack_each(false).unwrap();
    let last = consumer.recv_batch(3, WAIT).unwrap().expect("three more");
    last.ack_each().unwrap();
    assert!(matches!(
        four.ack_all(),
        Err(lepus::Error::AlreadySettled { .. })
    ));
    let s = conn.stats();
    assert_eq!(s.acked - s0.acked, 7, "{s:?}");
    assert_eq!(s.rejected - s0.rejected, 3, "{s:?}");
    assert!(cch.is_open());
    cch.close().unwrap();
    assert_eq!(
        ch.queue_declare(
            &q,
            &QueueDeclareOptions {
                passive: true,
                ..Default::default()
            }
        )
        .unwrap()
        .message_count,
        0
    );
    conn.close().unwrap();
}

#[test]
fn a_channel_the_broker_closes_is_an_event() {
    let (conn, rx) = with_listener("closed");
    let ch = conn.open_channel().unwrap();
    let missing = unique("missing");
    let err = ch
        .queue_declare(
            &missing,
            &QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_eq!(err.reply_code(), Some(reply_code::NOT_FOUND));
    let (channel, code, text) = heard(&rx, |k| match k {
        ConnectionEventKind::ChannelClosed {
            channel,
            reply_code,
            reply_text,
        } => Some((*channel, *reply_code, reply_text.clone())),
        _ => None,
    });
    assert_eq!((channel, code), (ch.id(), reply_code::NOT_FOUND));
    assert!(text.contains(&missing), "{text}");
    // The log has it too, with this connection's generation.
    let logged = conn
        .events()
        .into_iter()
        .find(|e| matches!(e.kind, ConnectionEventKind::ChannelClosed { .. }))
        .expect("logged");
    assert_eq!(logged.generation, 1);
    assert!(conn.recovery_events().is_empty());
    conn.close().unwrap();
}

#[test]
fn a_consumer_the_broker_cancels_is_an_event() {
    let cleanup = Cleanup::new();
    let (conn, rx) = with_listener("cancelled");
    let ch = conn.open_channel().unwrap();
    let q = cleanup.queue(&unique("cancel-q"));
    ch.queue_declare(&q, &QueueDeclareOptions::default())
        .unwrap();
    let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
    assert_eq!(conn.stats().consumers, 1);
    let other = conn.open_channel().unwrap();
    other.queue_delete(&q, &Default::default()).unwrap();
    let (channel, tag, queue) = heard(&rx, |k| match k {
        ConnectionEventKind::ConsumerCancelled {
            channel,
            tag,
            queue,
        } => Some((*channel, tag.clone(), queue.clone())),
        _ => None,
    });
    assert_eq!((channel, tag.as_str(), queue), (ch.id(), consumer.tag(), q));
    assert_eq!(conn.stats().consumers, 0);
    conn.close().unwrap();
}

#[test]
fn returns_beyond_the_bound_are_dropped_visibly() {
    let (conn, rx) = with_listener("returns");
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    // Nobody reads the returns: 1,024 are kept, the rest dropped. The broker sends each
    // return before its ack, so after the confirms every return has been counted.
    let nowhere = unique("nowhere");
    let n = 1_100;
    for _ in 0..n {
        publish(&ch, &nowhere, b"x", true);
    }
    ch.wait_for_confirms().unwrap();
    let s = conn.stats();
    assert_eq!(s.returned, n, "{s:?}");
    assert_eq!(s.returns_dropped, n - 1_024, "{s:?}");
    // One event at the 1st, 2nd, 4th, ... 64th drop.
    let mut counts = Vec::new();
    while counts.last() != Some(&64) {
        counts.push(heard(&rx, |k| match k {
            ConnectionEventKind::ReturnsDropped { channel, dropped } if *channel == ch.id() => {
                Some(*dropped)
            }
            _ => None,
        }));
    }
    assert_eq!(counts, [1, 2, 4, 8, 16, 32, 64]);
    assert!(ch.try_recv_return().unwrap().is_some());
    conn.close().unwrap();
}

#[test]
fn the_listener_runs_on_its_own_thread_and_cannot_stall_or_kill_the_io_thread() {
    let cleanup = Cleanup::new();
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    // The first call blocks until the test releases it; the second panics.
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let calls = Mutex::new(0u32);
    let conn = lepus::Connection::open_with(
        test_options()
            .connection_name(unique("slow-listener"))
            .event_listener(move |e| {
                let n = {
                    let mut n = calls.lock().unwrap();
                    *n += 1;
                    *n
                };
                let thread = std::thread::current().name().map(str::to_string);
                let _ = tx.lock().unwrap().send((e.kind.clone(), thread));
                match n {
                    1 => {
                        let _ = release_rx.lock().unwrap().recv_timeout(WAIT * 3);
                    }
                    2 => panic!("a listener bug"),
                    _ => {}
                }
            }),
    )
    .expect("connect");
    let close_one = |conn: &lepus::Connection| {
        let ch = conn.open_channel().unwrap();
        let err = ch
            .queue_declare(
                &unique("missing"),
                &QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(err.reply_code(), Some(reply_code::NOT_FOUND));
    };
    close_one(&conn);
    let (_, thread) = rx.recv_timeout(WAIT).expect("first event");
    assert_eq!(thread.as_deref(), Some("lepus-events"));
    // The listener is stuck in its first call, yet the connection works: a publish is
    // confirmed, and two more channels are closed by the broker (their events wait).
    let ch = conn.open_channel().unwrap();
    ch.confirm_select().unwrap();
    let q = cleanup.queue(&unique("listener-q"));
    ch.queue_declare(&q, &QueueDeclareOptions::default())
        .unwrap();
    publish(&ch, &q, b"while the listener is stuck", false);
    ch.wait_for_confirms().unwrap();
    close_one(&conn);
    close_one(&conn);
    assert_eq!(
        conn.events().len(),
        3,
        "the log does not wait for the listener"
    );
    assert!(
        rx.try_recv().is_err(),
        "the listener is still in its first call"
    );
    release_tx.send(()).unwrap();
    // The second call panics; the third is still heard.
    rx.recv_timeout(WAIT).expect("second event (panics)");
    rx.recv_timeout(WAIT).expect("third event, after the panic");
    assert!(wait_until(WAIT, || conn.stats().listener_panics == 1));
    assert_eq!(conn.stats().events_dropped, 0);
    assert!(conn.is_open());
    conn.close().unwrap();
}

#[cfg(feature = "metrics")]
mod facade {
    //! The `metrics` feature: names, labels and values a recorder sees.

    use super::*;
    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString};
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A recorder keeping one value per name and labels, as exporters do: connections
    /// with the same label share it.
    #[derive(Default)]
    struct Capture {
        counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
        gauges: Mutex<HashMap<String, Arc<AtomicU64>>>,
    }

    fn name(key: &Key) -> String {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        format!("{}{{{}}}", key.name(), labels.join(","))
    }

    impl Recorder for Capture {
        fn describe_counter(&self, _: KeyName, _: Option<metrics::Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<metrics::Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<metrics::Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            let mut m = self.counters.lock().unwrap();
            Counter::from_arc(m.entry(name(key)).or_default().clone())
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            // A gauge's value is an f64's bits; 0 is 0.0.
            let mut m = self.gauges.lock().unwrap();
            Gauge::from_arc(m.entry(name(key)).or_default().clone())
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn the_facade_hears_the_counters_under_their_documented_names() {
        let cleanup = Cleanup::new();
        let capture = Capture::default();
        let label = unique("facade");
        let conn = metrics::with_local_recorder(&capture, || {
            lepus::Connection::open_with(test_options().connection_name(label.clone()))
        })
        .expect("connect");
        let ch = conn.open_channel().unwrap();
        ch.confirm_select().unwrap();
        let q = cleanup.queue(&unique("facade-q"));
        ch.queue_declare(&q, &QueueDeclareOptions::default())
            .unwrap();
        for _ in 0..5 {
            publish(&ch, &q, b"m", false);
        }
        ch.wait_for_confirms().unwrap();
        let counter = |n: &str| {
            capture.counters.lock().unwrap()[&format!("{n}{{connection={label}}}")]
                .load(Ordering::Relaxed)
        };
        // Reported by the I/O thread within a second or two.
        assert!(
            wait_until(Duration::from_secs(5), || counter(
                "lepus_messages_published_total"
            ) == 5
                && counter("lepus_messages_confirmed_total") == 5),
            "published {} confirmed {}",
            counter("lepus_messages_published_total"),
            counter("lepus_messages_confirmed_total")
        );
        assert!(counter("lepus_bytes_sent_total") > 0);
        assert!(counter("lepus_bytes_received_total") > 0);
        assert_eq!(counter("lepus_messages_nacked_total"), 0);
        let channels = capture.gauges.lock().unwrap()
            [&format!("lepus_channels{{connection={label}}}")]
            .clone();
        assert_eq!(f64::from_bits(channels.load(Ordering::Relaxed)), 1.0);
        assert_eq!(capture.counters.lock().unwrap().len(), 14);
        conn.close().unwrap();
    }

    /// Two connections with the same label (as two unnamed ones to one broker have) share
    /// the gauges: `lepus_channels` is the sum of their channels, not whichever reported
    /// last, and a connection that goes takes its share back.
    #[test]
    fn connections_sharing_a_label_add_up_in_the_gauges() {
        let capture = Capture::default();
        let label = unique("facade-shared");
        let open = || {
            metrics::with_local_recorder(&capture, || {
                lepus::Connection::open_with(test_options().connection_name(label.clone()))
            })
            .expect("connect")
        };
        let (a, b) = (open(), open());
        let _a_channels = [a.open_channel().unwrap(), a.open_channel().unwrap()];
        let b_channel = b.open_channel().unwrap();
        let channels = capture.gauges.lock().unwrap()
            [&format!("lepus_channels{{connection={label}}}")]
            .clone();
        let value = || f64::from_bits(channels.load(Ordering::Relaxed));
        // Each I/O thread reports within a second or two; the gauge must settle on the sum
        // and stay there (with `set` it flipped between 2 and 1).
        assert!(
            wait_until(Duration::from_secs(5), || value() == 3.0),
            "lepus_channels {}",
            value()
        );
        std::thread::sleep(Duration::from_millis(1500)); // past a report of each
        assert_eq!(
            value(),
            3.0,
            "both connections reported again: still the sum"
        );
        b_channel.close().unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || value() == 2.0),
            "one channel closed: {}",
            value()
        );
        b.close().unwrap();
        drop(b);
        assert!(
            wait_until(Duration::from_secs(5), || value() == 2.0),
            "the other connection closed: {}",
            value()
        );
        a.close().unwrap();
        drop(a);
        assert!(
            wait_until(Duration::from_secs(5), || value() == 0.0),
            "both gone: {}",
            value()
        );
    }
}

#[cfg(feature = "opentelemetry")]
mod propagation {
    //! The `opentelemetry` feature: the W3C trace context through RabbitMQ and back.

    use super::*;
    use lepus::opentelemetry::Context;
    use lepus::opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };

    #[test]
    fn the_trace_context_crosses_the_broker() {
        let cleanup = Cleanup::new();
        let conn = support::connect();
        let ch = conn.open_channel().unwrap();
        let q = cleanup.queue(&unique("trace-q"));
        ch.queue_declare(&q, &QueueDeclareOptions::default())
            .unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let trace_id = TraceId::from_bytes((nanos | 1).to_be_bytes());
        let span_id = SpanId::from_bytes(((nanos as u64) | 1).to_be_bytes());
        let sc = SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            false,
            "lepus=test".parse::<TraceState>().unwrap(),
        );
        let props = {
            let _active = Context::new().with_remote_span_context(sc).attach();
            BasicProperties::new().with_trace_context()
        };
        ch.basic_publish("", &q, b"traced", &props, &PublishOptions::default())
            .unwrap();
        // Without a current span nothing is injected.
        ch.basic_publish(
            "",
            &q,
            b"plain",
            &BasicProperties::new().with_trace_context(),
            &PublishOptions::default(),
        )
        .unwrap();
        let consumer = ch.basic_consume(&q, &ConsumeOptions::default()).unwrap();
        let d = next(&consumer);
        let cx = d.trace_context();
        let got = cx.span().span_context().clone();
        assert_eq!(got.trace_id(), trace_id);
        assert_eq!(got.span_id(), span_id);
        assert!(got.is_remote() && got.is_sampled());
        assert_eq!(got.trace_state().header(), "lepus=test");
        d.ack().unwrap();
        let d = next(&consumer);
        assert!(d.properties().headers.is_none());
        assert!(!d.trace_context().span().span_context().is_valid());
        d.ack().unwrap();
        conn.close().unwrap();
    }
}

#[cfg(feature = "tracing")]
mod spans {
    //! The `tracing` feature: spans for connect and RPCs, diagnostics as events.

    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    /// Keeps the names of spans opened and the messages of events recorded.
    #[derive(Default)]
    struct Names {
        next: AtomicU64,
        spans: Mutex<Vec<String>>,
        events: Mutex<Vec<String>>,
    }

    struct Message(String);

    impl tracing::field::Visit for Message {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }

    impl Subscriber for &'static Names {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, span: &Attributes<'_>) -> Id {
            self.spans
                .lock()
                .unwrap()
                .push(span.metadata().name().to_string());
            Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) + 1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut m = Message(String::new());
            event.record(&mut m);
            self.events.lock().unwrap().push(m.0);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    #[test]
    fn connect_and_rpcs_are_spans_and_diagnostics_are_events() {
        let names: &'static Names = Box::leak(Box::default());
        tracing::subscriber::with_default(names, || {
            let conn = support::connect();
            let ch = conn.open_channel().unwrap();
            ch.queue_declare(
                "",
                &QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
            )
            .unwrap();
            conn.close().unwrap();
        });
        let spans = names.spans.lock().unwrap();
        assert!(spans.iter().any(|s| s == "lepus.connect"), "{spans:?}");
        assert!(spans.iter().any(|s| s == "lepus.rpc"), "{spans:?}");
        let events = names.events.lock().unwrap();
        assert!(
            events.iter().any(|e| e.contains("connected to")),
            "{events:?}"
        );
    }
}
