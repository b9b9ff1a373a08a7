//! Per-connection counters: one relaxed atomic add where a message passes (publish,
//! deliver, ack, confirm, return) and per socket read or write; read as a
//! [`ConnectionStats`] snapshot, and reported through the `metrics` facade with the
//! `metrics` feature (the `facade` module below).

use crate::sync::{AtomicU64, Ordering};

/// A counter on a cache line (pair) of its own: the publishing threads, the I/O thread
/// and the acking threads each write their own counters, and would otherwise bounce one
/// shared line between cores on every message.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct Padded(AtomicU64);

impl std::ops::Deref for Padded {
    type Target = AtomicU64;
    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

/// The live counters of one connection, across its generations. Written by handles and
/// the I/O thread with `Relaxed` adds: each counter is exact on its own, a snapshot is
/// not one instant across counters.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) published: Padded,
    pub(crate) confirmed: Padded,
    pub(crate) nacked: Padded,
    pub(crate) returned: Padded,
    pub(crate) returns_dropped: Padded,
    pub(crate) delivered: Padded,
    pub(crate) acked: Padded,
    pub(crate) rejected: Padded,
    pub(crate) bytes_in: Padded,
    pub(crate) bytes_out: Padded,
    pub(crate) caller_writes: Padded,
    pub(crate) reconnects: Padded,
    /// Gauges: added to and taken from (never below zero when balanced).
    pub(crate) channels: Padded,
    pub(crate) consumers: Padded,
    pub(crate) events_dropped: Padded,
    pub(crate) listener_panics: Padded,
    /// The `metrics` facade's handles, registered once per connection.
    #[cfg(feature = "metrics")]
    pub(crate) report: Option<facade::Report>,
}

impl Stats {
    /// The counters of a connection opened with `opts` (with the `metrics` feature, its
    /// facade handles are registered here, once, labelled with the connection's name).
    pub(crate) fn for_connection(opts: &crate::options::ConnectionOptions) -> Self {
        #[cfg(feature = "metrics")]
        return Stats {
            report: Some(facade::Report::register(opts)),
            ..Stats::default()
        };
        #[cfg(not(feature = "metrics"))]
        {
            let _ = opts;
            Stats::default()
        }
    }

    /// Add `n` to a counter. (Under `--cfg lepus_bench_no_counters`, a build made only to
    /// measure what the counters cost, nothing.)
    #[inline]
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        #[cfg(not(lepus_bench_no_counters))]
        c.fetch_add(n, Ordering::Relaxed);
        #[cfg(lepus_bench_no_counters)]
        let _ = (c, n);
    }

    /// Take `n` from a gauge.
    #[inline]
    pub(crate) fn dec(c: &AtomicU64, n: u64) {
        #[cfg(not(lepus_bench_no_counters))]
        c.fetch_sub(n, Ordering::Relaxed);
        #[cfg(lepus_bench_no_counters)]
        let _ = (c, n);
    }

    pub(crate) fn snapshot(&self) -> ConnectionStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConnectionStats {
            published: r(&self.published),
            confirmed: r(&self.confirmed),
            nacked: r(&self.nacked),
            returned: r(&self.returned),
            returns_dropped: r(&self.returns_dropped),
            delivered: r(&self.delivered),
            acked: r(&self.acked),
            rejected: r(&self.rejected),
            bytes_in: r(&self.bytes_in),
            bytes_out: r(&self.bytes_out),
            caller_writes: r(&self.caller_writes),
            reconnects: r(&self.reconnects),
            channels: r(&self.channels),
            consumers: r(&self.consumers),
            events_dropped: r(&self.events_dropped),
            listener_panics: r(&self.listener_panics),
        }
    }
}

/// A snapshot of a connection's counters ([`crate::Connection::stats`]), summed over all
/// its TCP connections (generations). Counters only grow; `channels` and `consumers` are
/// the current numbers. Each value is exact; they are read one after the other, not at
/// one instant.
///
/// ```no_run
/// let conn = lepus::Connection::open("amqp://127.0.0.1")?;
/// let s = conn.stats();
/// println!("published {} confirmed {} nacked {}", s.published, s.confirmed, s.nacked);
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Messages published (`basic.publish` written or handed to the I/O thread),
    /// republished copies of recovery included.
    pub published: u64,
    /// Publishes the broker confirmed (`basic.ack` in confirm mode, a `multiple` ack
    /// counted per message).
    pub confirmed: u64,
    /// Publishes the broker refused (`basic.nack` in confirm mode, per message).
    pub nacked: u64,
    /// Messages the broker returned (`basic.return`), dropped ones included.
    pub returned: u64,
    /// Returned messages dropped because the channel's returns queue was full, or had
    /// ended: the application closed the channel as the return was being queued.
    pub returns_dropped: u64,
    /// Messages received: deliveries to consumers and `basic.get` answers (undecodable
    /// ones included).
    pub delivered: u64,
    /// Acknowledgements the application sent (`basic.ack`; one `multiple` ack counts once).
    pub acked: u64,
    /// Negative acknowledgements the application sent (`basic.reject` and `basic.nack`;
    /// one `multiple` nack counts once).
    pub rejected: u64,
    /// Bytes read from the broker after the handshake (AMQP frames; TLS records are
    /// counted as their plaintext).
    pub bytes_in: u64,
    /// Bytes written to the broker after the handshake (the same way).
    pub bytes_out: u64,
    /// Sends (a publish, an ack, ...) the calling thread wrote to the socket itself
    /// rather than handing them to the I/O thread
    /// ([`crate::ConnectionOptions::caller_writes`]).
    pub caller_writes: u64,
    /// Recoveries that installed a new TCP connection.
    pub reconnects: u64,
    /// Channels open now.
    pub channels: u64,
    /// Consumers subscribed now.
    pub consumers: u64,
    /// Events the listener did not hear because its queue was full (they are still in
    /// [`crate::Connection::events`]).
    pub events_dropped: u64,
    /// Calls of the event listener that panicked (caught; the listener keeps being
    /// called).
    pub listener_panics: u64,
}

/// The `metrics` feature: a connection's counters reported through the `metrics` facade.
/// Handles are registered once per connection; the I/O thread pushes what changed at
/// most once a second (and when it ends), so publish and deliver cost no more than
/// without the feature.
#[cfg(feature = "metrics")]
pub(crate) mod facade {
    use std::time::{Duration, Instant};

    use metrics::{Counter, Gauge};

    use crate::options::ConnectionOptions;
    use super::{ConnectionStats, Stats};
    use crate::sync::Mutex;

    /// How often the I/O thread reports to the facade while it runs.
    pub(crate) const REPORT_EVERY: Duration = Duration::from_secs(1);

    type Field = fn(&ConnectionStats) -> u64;

    /// Counter names, descriptions and the snapshot field each reports.
    const COUNTERS: [(&str, &str, Field); 14] = [
        ("lepus_messages_published_total", "Messages published", |s| s.published),
        ("lepus_messages_confirmed_total", "Publishes the broker confirmed", |s| s.confirmed),
        ("lepus_messages_nacked_total", "Publishes the broker nacked", |s| s.nacked),
        ("lepus_messages_returned_total", "Messages returned by the broker", |s| s.returned),
        ("lepus_returns_dropped_total", "Returned messages dropped (queue full or channel closed)", |s| s.returns_dropped),
        ("lepus_messages_delivered_total", "Messages delivered (consume and get)", |s| s.delivered),
        ("lepus_messages_acked_total", "Acknowledgements sent", |s| s.acked),
        ("lepus_messages_rejected_total", "Rejects and nacks sent", |s| s.rejected),
        ("lepus_bytes_received_total", "Bytes read from the broker", |s| s.bytes_in),
        ("lepus_bytes_sent_total", "Bytes written to the broker", |s| s.bytes_out),
        ("lepus_caller_writes_total", "Sends written by the calling thread", |s| s.caller_writes),
        ("lepus_reconnects_total", "Recoveries that reconnected", |s| s.reconnects),
        ("lepus_events_dropped_total", "Events the listener missed", |s| s.events_dropped),
        ("lepus_listener_panics_total", "Event listener calls that panicked", |s| s.listener_panics),
    ];

    /// Gauge names, descriptions and fields.
    const GAUGES: [(&str, &str, Field); 2] = [
        ("lepus_channels", "Channels open", |s| s.channels),
        ("lepus_consumers", "Consumers subscribed", |s| s.consumers),
    ];

    /// The facade handles of one connection and what was last reported.
    pub(crate) struct Report {
        counters: Vec<(Counter, Field)>,
        gauges: Vec<(Gauge, Field)>,
        last: Mutex<(Option<Instant>, ConnectionStats)>,
    }

    /// The `connection` label: the connection name, or `host:port` without one.
    fn label(opts: &ConnectionOptions) -> String {
        match &opts.connection_name {
            Some(n) => n.clone(),
            None => format!("{}:{}", opts.host, opts.port),
        }
    }

    impl Report {
        /// Register the handles with the recorder installed now (install it before opening
        /// connections, as with any `metrics` library).
        pub(crate) fn register(opts: &ConnectionOptions) -> Self {
            let name = label(opts);
            let counters = COUNTERS
                .iter()
                .map(|(n, d, f)| {
                    metrics::describe_counter!(*n, *d);
                    (metrics::counter!(*n, "connection" => name.clone()), *f)
                })
                .collect();
            let gauges = GAUGES
                .iter()
                .map(|(n, d, f)| {
                    metrics::describe_gauge!(*n, *d);
                    (metrics::gauge!(*n, "connection" => name.clone()), *f)
                })
                .collect();
            Report {
                counters,
                gauges,
                last: Mutex::new((None, ConnectionStats::default())),
            }
        }

        /// Push what changed since the last report, if `REPORT_EVERY` has passed (or
        /// `force`).
        pub(crate) fn report(&self, stats: &Stats, now: Instant, force: bool) {
            let mut last = self.last.lock();
            if !force && last.0.is_some_and(|t| now.duration_since(t) < REPORT_EVERY) {
                return;
            }
            let s = stats.snapshot();
            for (c, f) in &self.counters {
                c.increment(f(&s).saturating_sub(f(&last.1)));
            }
            // Gauges move by what changed, not `set`: connections with the same label
            // (two unnamed ones to one host:port) share the recorder's gauge, and each
            // adds its own channels and consumers to it, as counters add up.
            for (g, f) in &self.gauges {
                let (new, old) = (f(&s), f(&last.1));
                if new > old {
                    g.increment((new - old) as f64);
                } else if old > new {
                    g.decrement((old - new) as f64);
                }
            }
            *last = (Some(now), s);
        }
    }

    impl Drop for Report {
        /// The connection is gone: take back what it still adds to the shared gauges.
        fn drop(&mut self) {
            let last = self.last.lock();
            for (g, f) in &self.gauges {
                let v = f(&last.1);
                if v > 0 {
                    g.decrement(v as f64);
                }
            }
        }
    }

    impl Stats {
        /// Report to the `metrics` facade (the I/O thread's timer; `force` at its end).
        pub(crate) fn report_metrics(&self, now: Instant, force: bool) {
            if let Some(r) = &self.report {
                r.report(self, now, force);
            }
        }
    }
}
