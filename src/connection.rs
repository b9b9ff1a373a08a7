//! The `Connection` handle: open (handshake on the caller's thread, then the I/O
//! thread), open channels, observe blocked state, survive link failures through
//! generations (one TCP connection each), close.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, connection};

use crate::channel::{Channel, ChannelInner};
use crate::error::{Error, Result, reply_code};
use crate::events::{EventLog, RecoveryEvent, RecoveryEventKind};
use crate::io::engine::Engine;
use crate::io::reactor::{Reactor, WAKER};
use crate::io::{Command, ConnShared, LinkEvents, handshake};
use crate::link::{Ended, LinkState};
use crate::options::ConnectionOptions;
use crate::protocol::frame::put_method;
use crate::protocol::table::FieldTable;
use crate::recovery;
use crate::sync::{Arc, AtomicBool, AtomicU64, Condvar, CondvarExt, Mutex, Ordering, Weak};
use crate::sync::{oneshot, queue};
use crate::topology::Topology;

/// Commands queued for the I/O thread before callers wait for room.
const COMMAND_QUEUE: usize = 4096;
/// Stack of the I/O thread: field tables are parsed there, up to the depth cap.
const IO_THREAD_STACK: usize = 8 * 1024 * 1024;

/// One TCP connection of a `Connection`'s life, with its I/O thread.
pub(crate) struct Generation {
    shared: Arc<ConnShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Generation {
    pub(crate) fn shared(&self) -> &Arc<ConnShared> {
        &self.shared
    }
    pub(crate) fn number(&self) -> u64 {
        self.shared.generation
    }

    /// Close this generation's connection and wait (bounded) for its I/O thread.
    fn close(&self) -> Result<()> {
        let shared = &self.shared;
        let mut result = Ok(());
        if !shared.is_failed() {
            let mut bytes = Vec::with_capacity(64);
            put_method(
                &mut bytes,
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: reply_code::REPLY_SUCCESS,
                    reply_text: "closed by the application".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
            .map_err(Error::InvalidArgument)?;
            let (tx, rx) = oneshot::channel();
            let deadline = Instant::now() + shared.opts.close_timeout + Duration::from_millis(500);
            if shared
                .send(
                    Command::Close { bytes, reply: tx },
                    deadline,
                    "room to send connection.close",
                )
                .is_ok()
            {
                result = match rx.recv_deadline(deadline) {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e),
                    // The I/O thread ended first: the link was gone anyway.
                    Err(oneshot::RecvError::Disconnected) => Ok(()),
                    Err(oneshot::RecvError::Timeout) => Err(Error::Timeout("connection.close-ok")),
                };
            }
        }
        // The I/O thread ends on its own once closing is over (bounded by the close
        // timeout), so this join is bounded too.
        if let Some(t) = self.thread.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        result
    }

    /// A recovery candidate that could not be restored: close it.
    pub(crate) fn abandon(&self) {
        let _ = self.close();
    }
}

/// Connect and handshake; the I/O thread is not started yet.
fn prepare(opts: &ConnectionOptions, number: u64) -> Result<(Arc<ConnShared>, Reactor)> {
    let est = handshake::connect(opts)?;
    let io_err = |e: std::io::Error| Error::ConnectionLost(format!("I/O setup failed: {e}"));
    est.stream.set_nonblocking(true).map_err(io_err)?;
    let local = est.stream.local_addr().ok();
    let poll = mio::Poll::new().map_err(io_err)?;
    let waker = mio::Waker::new(poll.registry(), WAKER).map_err(io_err)?;
    let (cmd_tx, cmd_rx) = queue::bounded(COMMAND_QUEUE);
    let write_timeout = if est.tuned.heartbeat > 0 {
        Duration::from_secs(u64::from(est.tuned.heartbeat) * 2)
    } else {
        Duration::from_secs(30)
    };
    log::info!(
        "connected to {}:{} vhost {:?} (generation {number}, channel_max {}, frame_max {}, heartbeat {} s)",
        opts.host,
        opts.port,
        opts.vhost,
        est.tuned.channel_max,
        est.tuned.frame_max,
        est.tuned.heartbeat
    );
    let shared = Arc::new(
        ConnShared::new(
            cmd_tx,
            waker,
            est.tuned,
            opts.clone(),
            est.server_properties,
        )
        .with_generation(number, local),
    );
    let reactor = Reactor {
        poll,
        sock: mio::net::TcpStream::from_std(est.stream),
        decoder: est.decoder,
        engine: Engine::new(shared.clone(), Instant::now()),
        commands: cmd_rx,
        write_timeout,
    };
    Ok((shared, reactor))
}

fn launch(gen_: &Generation, reactor: Reactor, link: Weak<dyn LinkEvents>) -> Result<()> {
    gen_.shared.set_link(link);
    let o = &gen_.shared.opts;
    let name = format!("lepus-io {}:{} #{}", o.host, o.port, gen_.shared.generation);
    let thread = std::thread::Builder::new()
        .name(name)
        .stack_size(IO_THREAD_STACK)
        .spawn(move || reactor.run())
        .map_err(|e| Error::ConnectionLost(format!("could not start the I/O thread: {e}")))?;
    *gen_.thread.lock() = Some(thread);
    Ok(())
}

/// Open a new generation of `inner` to `host:port` (recovery).
pub(crate) fn start_generation(
    inner: &Arc<ConnectionInner>,
    host: &str,
    port: u16,
    number: u64,
) -> Result<Arc<Generation>> {
    let opts = inner.opts.clone().host(host).port(port);
    let (shared, reactor) = prepare(&opts, number)?;
    let gen_ = Arc::new(Generation {
        shared,
        thread: Mutex::new(None),
    });
    let weak: Weak<ConnectionInner> = Arc::downgrade(inner);
    launch(&gen_, reactor, weak)?;
    Ok(gen_)
}

struct Link {
    current: Arc<Generation>,
    /// Single-flight recovery bookkeeping (numbers and flags only).
    flight: LinkState,
    /// Why the connection is dead for good, once it is.
    terminal: Option<Error>,
}

/// A connection to the broker. Cheap to clone, `Send + Sync`: share one between threads
/// and give each thread its own [`Channel`]. The last handle dropped (connections and
/// channels alike) closes it.
///
/// With automatic recovery (the default, see [`crate::RecoveryOptions`]) a lost link is
/// replaced by a new TCP connection: the same `Connection`, [`Channel`] and
/// [`crate::Consumer`] handles keep working on it.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<ConnectionInner>,
}

pub(crate) struct ConnectionInner {
    pub(crate) opts: ConnectionOptions,
    link: Mutex<Link>,
    link_cv: Condvar,
    pub(crate) topology: Mutex<Topology>,
    channels: Mutex<HashMap<u16, Weak<ChannelInner>>>,
    events: Mutex<EventLog>,
    closed: AtomicBool,
    /// Mirrors `link.terminal.is_some()`, so that hot paths (a pool checking its
    /// channels under its own lock) need not take the link lock.
    dead: AtomicBool,
    generations: AtomicU64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.inner.opts;
        f.debug_struct("Connection")
            .field("host", &o.host)
            .field("port", &o.port)
            .field("vhost", &o.vhost)
            .field("generation", &self.generation())
            .field("open", &self.is_open())
            .finish()
    }
}

impl Connection {
    /// Open a connection from an `amqp://` URI (see [`ConnectionOptions::from_uri`]).
    ///
    /// ```no_run
    /// let conn = lepus::Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10")?;
    /// # Ok::<(), lepus::Error>(())
    /// ```
    pub fn open(uri: &str) -> Result<Connection> {
        Self::open_with(ConnectionOptions::from_uri(uri)?)
    }

    /// Open a connection with explicit options. Connecting and the handshake happen on
    /// this thread and end within `connection_timeout` per address, with an error that
    /// says which step failed. The addresses are tried in order.
    pub fn open_with(opts: ConnectionOptions) -> Result<Connection> {
        let mut last = None;
        let mut first = None;
        for (host, port) in opts.addresses() {
            match prepare(&opts.clone().host(host).port(port), 1) {
                Ok(p) => {
                    first = Some(p);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let (shared, reactor) = match first {
            Some(p) => p,
            None => {
                return Err(last.unwrap_or(Error::InvalidUri("no address to connect to".into())));
            }
        };
        let gen_ = Arc::new(Generation {
            shared,
            thread: Mutex::new(None),
        });
        let inner = Arc::new(ConnectionInner {
            opts,
            link: Mutex::new(Link {
                current: gen_.clone(),
                flight: LinkState::new(),
                terminal: None,
            }),
            link_cv: Condvar::new(),
            topology: Mutex::new(Topology::default()),
            channels: Mutex::new(HashMap::new()),
            events: Mutex::new(EventLog::new()),
            closed: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            generations: AtomicU64::new(1),
        });
        let weak: Weak<ConnectionInner> = Arc::downgrade(&inner);
        launch(&gen_, reactor, weak)?;
        Ok(Connection { inner })
    }

    pub(crate) fn inner(&self) -> &Arc<ConnectionInner> {
        &self.inner
    }

    /// Open a new channel, waiting up to the operation timeout (and for a recovery in
    /// progress to finish, within that time).
    pub fn open_channel(&self) -> Result<Channel> {
        self.open_channel_until(Instant::now() + self.inner.opts.operation_timeout)
    }

    /// Open a new channel, waiting until `deadline`.
    pub fn open_channel_until(&self, deadline: Instant) -> Result<Channel> {
        let shared = self.inner.current(deadline)?;
        let ch = shared.open_channel(None, deadline)?;
        Ok(Channel::new(ch, self.clone()))
    }

    /// True while the connection is usable (not closed, not lost, not recovering).
    pub fn is_open(&self) -> bool {
        let link = self.inner.link.lock();
        !link.current.shared().is_failed() && link.terminal.is_none()
    }

    /// Why the connection ended, once it has for good (closed, or lost without recovery).
    pub fn close_reason(&self) -> Option<Error> {
        if self.inner.is_closed() {
            return Some(Error::ConnectionClosed);
        }
        let link = self.inner.link.lock();
        if let Some(t) = &link.terminal {
            return Some(t.clone());
        }
        // Failed with no recovery to follow (e.g. a protocol violation): ended for good
        // already, though the I/O thread may still be waiting for the peer's close-ok.
        let shared = link.current.shared();
        (shared.is_failed() && !shared.will_recover() && !link.flight.is_recovering())
            .then(|| shared.error())
    }

    /// The current connection generation: 1 for the first TCP connection, +1 for each
    /// one recovery opened.
    pub fn generation(&self) -> u64 {
        self.inner.link.lock().current.number()
    }

    /// Our end of the current TCP connection.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.link.lock().current.shared().local_addr
    }

    /// The most recent recovery events (up to 4096), oldest first.
    pub fn recovery_events(&self) -> Vec<RecoveryEvent> {
        self.inner.events.lock().snapshot()
    }

    /// Wait until the connection is usable (e.g. after a recovery), up to `timeout`.
    pub fn wait_open(&self, timeout: Duration) -> Result<()> {
        self.inner.current(Instant::now() + timeout).map(|_| ())
    }

    /// The broker's reason if it has blocked publishing on this connection
    /// (`connection.blocked`, e.g. a memory or disk alarm). Publishers wait, within their
    /// deadline, while it is blocked.
    pub fn blocked(&self) -> Option<String> {
        self.inner.link.lock().current.shared().blocked_reason()
    }

    /// The broker's `server_properties` from `connection.start`.
    pub fn server_properties(&self) -> FieldTable {
        self.inner
            .link
            .lock()
            .current
            .shared()
            .server_properties
            .clone()
    }

    /// Negotiated frame_max in bytes.
    pub fn frame_max(&self) -> u32 {
        self.inner.link.lock().current.shared().tuned.frame_max
    }

    /// Negotiated channel_max.
    pub fn channel_max(&self) -> u16 {
        self.inner.link.lock().current.shared().tuned.channel_max
    }

    /// Negotiated heartbeat in seconds (0: none).
    pub fn heartbeat(&self) -> u16 {
        self.inner.link.lock().current.shared().tuned.heartbeat
    }

    /// Close the connection: send `connection.close`, wait for `close-ok` up to the
    /// close timeout, and join the I/O thread. Every waiter on the connection gets
    /// [`Error::ConnectionClosed`] and nothing recovers afterwards. Closing twice, or
    /// closing a lost connection, is fine.
    pub fn close(&self) -> Result<()> {
        self.inner.close()
    }
}

impl ConnectionInner {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closed, or lost for good: nothing on it will work again.
    pub(crate) fn is_dead(&self) -> bool {
        self.is_closed() || self.dead.load(Ordering::Acquire)
    }

    pub(crate) fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub(crate) fn event(&self, generation: u64, kind: RecoveryEventKind) {
        let e = RecoveryEvent {
            at: Instant::now(),
            generation,
            kind,
        };
        if let Some(l) = &self.opts.recovery.listener {
            l(&e);
        }
        self.events.lock().push(e);
    }

    /// The usable connection state, waiting for a recovery in progress until `deadline`.
    pub(crate) fn current(&self, deadline: Instant) -> Result<Arc<ConnShared>> {
        let mut link = self.link.lock();
        loop {
            if self.is_closed() {
                return Err(Error::ConnectionClosed);
            }
            if let Some(t) = &link.terminal {
                return Err(t.clone());
            }
            let shared = link.current.shared().clone();
            if !shared.is_failed() {
                return Ok(shared);
            }
            if !shared.will_recover() {
                return Err(shared.error());
            }
            if self.link_cv.wait_until_deadline(&mut link, deadline) {
                return Err(shared.error());
            }
        }
    }

    /// Wait until `done()` holds, or the connection is closed or dead, or `deadline`.
    /// `lost` is the error to report if the deadline passes.
    pub(crate) fn wait_for(
        &self,
        done: impl Fn() -> bool,
        deadline: Instant,
        lost: impl Fn() -> Error,
    ) -> Result<()> {
        let mut link = self.link.lock();
        loop {
            if done() {
                return Ok(());
            }
            if self.is_closed() {
                return Err(Error::ConnectionClosed);
            }
            if let Some(t) = &link.terminal {
                return Err(t.clone());
            }
            if self.link_cv.wait_until_deadline(&mut link, deadline) {
                return if done() { Ok(()) } else { Err(lost()) };
            }
        }
    }

    pub(crate) fn notify(&self) {
        let _l = self.link.lock();
        self.link_cv.notify_all();
    }

    /// Sleep for `d` unless the connection is closed meanwhile (then true).
    pub(crate) fn sleep_unless_closed(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut link = self.link.lock();
        while !self.is_closed() {
            if self.link_cv.wait_until_deadline(&mut link, deadline) {
                break;
            }
        }
        self.is_closed()
    }

    pub(crate) fn register_channel(&self, ch: &Arc<ChannelInner>) {
        let mut map = self.channels.lock();
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(ch.id(), Arc::downgrade(ch));
    }

    pub(crate) fn unregister_channel(&self, id: u16, ch: *const ChannelInner) {
        let mut map = self.channels.lock();
        if map.get(&id).is_some_and(|w| std::ptr::eq(w.as_ptr(), ch)) {
            map.remove(&id);
        }
    }

    /// Channels to restore: alive, and not closed by themselves.
    pub(crate) fn live_channels(&self) -> Vec<Arc<ChannelInner>> {
        let mut v: Vec<_> = self
            .channels
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .filter(|c| c.wants_recovery())
            .collect();
        v.sort_by_key(|c| c.id());
        v
    }

    /// Make a recovered generation current. Refused (false) if it failed meanwhile: the
    /// recovery loop then goes on.
    pub(crate) fn install(&self, gen_: Arc<Generation>) -> bool {
        let mut link = self.link.lock();
        if !link
            .flight
            .install(gen_.number(), gen_.shared().is_failed())
        {
            log::warn!(
                "recovered generation {} failed before it was installed",
                gen_.number()
            );
            return false;
        }
        link.current = gen_;
        self.link_cv.notify_all();
        true
    }

    /// Recovery is over without a connection.
    pub(crate) fn give_up(&self, err: Error) {
        let mut link = self.link.lock();
        link.flight.give_up();
        if link.terminal.is_none() {
            link.terminal = Some(err.clone());
            self.dead.store(true, Ordering::Release);
        }
        self.link_cv.notify_all();
        drop(link);
        for c in self.channels.lock().values().filter_map(Weak::upgrade) {
            c.end_consumers(&err);
        }
    }

    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.notify();
        let gen_ = self.link.lock().current.clone();
        let r = gen_.close();
        for c in self.channels.lock().values().filter_map(Weak::upgrade) {
            c.end_consumers(&Error::ConnectionClosed);
        }
        r
    }
}

impl LinkEvents for ConnectionInner {
    fn failing(&self, generation: u64, err: &Error) -> bool {
        let recoverable =
            !self.is_closed() && self.opts.recovery.enabled && err.is_connection_lost();
        let mut link = self.link.lock();
        let candidate = generation > link.flight.current();
        if !link.flight.failing(generation, recoverable) {
            return false;
        }
        drop(link);
        if candidate {
            return true;
        }
        log::warn!("connection lost (generation {generation}): {err}; recovering");
        self.event(
            generation,
            RecoveryEventKind::FailureDetected(err.to_string()),
        );
        true
    }

    fn woken(&self, generation: u64) {
        if self.link.lock().flight.is_recovering() {
            self.event(generation, RecoveryEventKind::WaitersWoken);
        }
    }

    fn ended(self: Arc<Self>, generation: u64, err: Error) {
        let mut link = self.link.lock();
        match link.flight.ended(generation, self.is_closed()) {
            Ended::Nothing => return,
            Ended::Terminal => {
                if link.terminal.is_none() && !self.is_closed() {
                    link.terminal = Some(err);
                    self.dead.store(true, Ordering::Release);
                }
                self.link_cv.notify_all();
                return;
            }
            Ended::StartRecovery => {}
        }
        drop(link);
        let inner = self.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("lepus-recovery".into())
            .spawn(move || recovery::run(inner))
        {
            log::error!("could not start the recovery thread: {e}");
            self.give_up(Error::ConnectionLost(format!(
                "recovery could not start: {e}"
            )));
        }
    }
}

impl Drop for ConnectionInner {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::warn!("closing the connection on drop: {e}");
        }
    }
}
