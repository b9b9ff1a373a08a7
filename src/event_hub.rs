//! Where a connection's events go: into its bounded log, and to the application's
//! listeners on a thread of their own, so that no listener ever runs on (or stalls) the
//! I/O thread.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use crate::events::{ConnectionEvent, ConnectionEventKind, EventLog, RecoveryEvent};
use crate::options::{ConnectionOptions, EventListener, RecoveryListener};
use crate::stats::Stats;
use crate::sync::queue::{self, Receiver, Sender};
use crate::sync::{Arc, Mutex};

/// Events waiting for a slow listener before newer ones are left out (counted in
/// `events_dropped`; the log still has them).
const LISTENER_QUEUE: usize = 1024;

/// The event log and listener queue of one connection, shared by its generations.
pub(crate) struct EventHub {
    log: Mutex<EventLog>,
    /// To the dispatcher thread, when a listener is set.
    tx: Option<Sender<ConnectionEvent>>,
    stats: Arc<Stats>,
}

struct Listeners {
    events: Option<EventListener>,
    recovery: Option<RecoveryListener>,
}

impl EventHub {
    /// The hub of a connection opened with `opts`: with a listener set, it starts the
    /// dispatcher thread (`lepus-events`), which ends when the hub is dropped.
    pub(crate) fn new(opts: &ConnectionOptions, stats: Arc<Stats>) -> Arc<Self> {
        let listeners = Listeners {
            events: opts.event_listener.clone(),
            recovery: opts.recovery.listener.clone(),
        };
        let mut tx = None;
        if listeners.events.is_some() || listeners.recovery.is_some() {
            let (s, r) = queue::bounded(LISTENER_QUEUE);
            let st = stats.clone();
            match std::thread::Builder::new()
                .name("lepus-events".into())
                .spawn(move || dispatch(&r, &listeners, &st))
            {
                Ok(_) => tx = Some(s),
                Err(e) => {
                    crate::trace::error!("could not start the event listener thread: {e}")
                }
            }
        }
        Arc::new(EventHub {
            log: Mutex::new(EventLog::new()),
            tx,
            stats,
        })
    }

    /// A hub without listeners (engine tests, fuzzing).
    pub(crate) fn detached(stats: Arc<Stats>) -> Arc<Self> {
        Arc::new(EventHub {
            log: Mutex::new(EventLog::new()),
            tx: None,
            stats,
        })
    }

    /// Record an event and hand it to the listeners. Never blocks on a listener: when
    /// its queue is full the listener misses the event (counted).
    pub(crate) fn emit(&self, generation: u64, kind: ConnectionEventKind) {
        let e = ConnectionEvent::new(generation, kind);
        // In the log first: a listener that reads the log finds the event it hears of.
        self.log.lock().push(e.clone());
        if let Some(tx) = &self.tx
            && tx.send_deadline(e, Instant::now()).is_err()
        {
            Stats::add(&self.stats.events_dropped, 1);
        }
    }

    /// The logged events, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<ConnectionEvent> {
        self.log.lock().snapshot()
    }
}

/// The listener thread: each event to each listener, in order; a panicking listener is
/// caught, counted and called again for the next event.
fn dispatch(rx: &Receiver<ConnectionEvent>, l: &Listeners, stats: &Stats) {
    while let Ok(e) = rx.recv() {
        let heard = catch_unwind(AssertUnwindSafe(|| {
            if let Some(f) = &l.events {
                f(&e);
            }
            if let (Some(f), Some(r)) = (&l.recovery, RecoveryEvent::from_connection_event(&e)) {
                f(&r);
            }
        }));
        if heard.is_err() {
            Stats::add(&stats.listener_panics, 1);
            crate::trace::error!("a connection event listener panicked on {:?}", e.kind);
        }
    }
}
