//! The state behind every `Connection` handle: the current generation (one TCP connection
//! and its I/O thread), how a failing link is handled (single-flight recovery, started
//! through the procedure the handle installs), the registry of channels, the recorded
//! topology and the event log. Channels are reached through `ChannelSlot`, so this file
//! imports no handle.

use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, connection};

use crate::confirm_tracker::Entry;
use crate::error::{Error, Result, reply_code};
use crate::event_hub::EventHub;
use crate::events::{ConnectionEventKind, RecoveryEventKind};
use crate::io::engine::Engine;
use crate::io::reactor::{Reactor, WAKER};
use crate::io::{ChannelShared, Command, ConnShared, LinkEvents, handshake};
use crate::link::{LinkCell, LinkGen};
use crate::options::ConnectionOptions;
use crate::protocol::frame::put_method;
use crate::secrets::Secrets;
use crate::stats::Stats;
use crate::sync::{Arc, AtomicU64, Mutex, Ordering, Weak};
use crate::sync::{oneshot, queue};
use crate::topology::{ChannelRecord, PendingTopology, Topology};

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
        if let Some(t) = self.thread.lock().take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
        result
    }

    /// A recovery candidate that could not be restored: close it.
    pub(crate) fn abandon(&self) {
        let _ = self.close();
    }
}

/// Connect and handshake; the I/O thread is not started yet.
fn prepare(
    opts: &ConnectionOptions,
    number: u64,
    secrets: &Secrets,
    observers: (&Arc<Stats>, &Arc<EventHub>),
) -> Result<(Arc<ConnShared>, Reactor)> {
    let opts = &secrets.resolve(opts)?;
    let _span = crate::trace::span!(
        "lepus.connect",
        host = opts.host,
        port = opts.port,
        generation = number
    );
    let est = handshake::connect(opts)?;
    let io_err = |e: std::io::Error| Error::ConnectionLost(format!("I/O setup failed: {e}"));
    est.stream.sock().set_nonblocking(true).map_err(io_err)?;
    let local = est.stream.sock().local_addr().ok();
    let poll = mio::Poll::new().map_err(io_err)?;
    let waker = mio::Waker::new(poll.registry(), WAKER).map_err(io_err)?;
    let (cmd_tx, cmd_rx) = queue::bounded(COMMAND_QUEUE);
    let write_timeout = if est.tuned.heartbeat > 0 {
        Duration::from_secs(u64::from(est.tuned.heartbeat) * 2)
    } else {
        Duration::from_secs(30)
    };
    crate::trace::info!(
        "connected to {}:{} vhost {:?} (generation {number}, channel_max {}, frame_max {}, heartbeat {} s)",
        opts.host,
        opts.port,
        opts.vhost,
        est.tuned.channel_max,
        est.tuned.frame_max,
        est.tuned.heartbeat
    );
    let mut shared = ConnShared::new(
        cmd_tx,
        Arc::new(waker),
        est.tuned,
        opts.clone(),
        est.server_properties,
    )
    .with_generation(number, local)
    .with_observers(observers.0.clone(), observers.1.clone());
    // Callers write plain TCP themselves through a second handle on the socket (the
    // same non-blocking socket); over TLS only the I/O thread writes.
    if opts.caller_writes
        && let Some(sock) = est.stream.plain()
    {
        match sock.try_clone() {
            Ok(second) => shared = shared.with_caller_writes(second),
            // Out of file descriptors, say: every frame goes through the I/O thread.
            Err(e) => crate::trace::warn!("callers will not write the socket themselves: {e}"),
        }
    }
    let shared = Arc::new(shared);
    let reactor = Reactor {
        poll,
        transport: est.stream.map(mio::net::TcpStream::from_std),
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
    let (shared, reactor) = prepare(&opts, number, &inner.secrets, (&inner.stats, &inner.hub))?;
    let gen_ = Arc::new(Generation {
        shared,
        thread: Mutex::new(None),
    });
    let weak: Weak<ConnectionInner> = Arc::downgrade(inner);
    launch(&gen_, reactor, weak)?;
    Ok(gen_)
}

impl LinkGen for Arc<Generation> {
    type Error = Error;
    fn number(&self) -> u64 {
        self.shared.generation
    }
    fn is_failed(&self) -> bool {
        self.shared.is_failed()
    }
    fn will_recover(&self) -> bool {
        self.shared.will_recover()
    }
    fn error(&self) -> Error {
        self.shared.error()
    }
}

/// What the connection needs of a channel handle it keeps track of: ending its consumers
/// when the connection ends for good, and what recovery restores. Implemented by the
/// channel handle's state (channel.rs), which sits above this file.
pub(crate) trait ChannelSlot: Send + Sync {
    fn id(&self) -> u16;
    /// The channel state of the current connection generation.
    fn current_shared(&self) -> Arc<ChannelShared>;
    /// Recovery installs the reopened channel.
    fn set_current(&self, new: Arc<ChannelShared>);
    /// Worth reopening after a connection failure.
    fn wants_recovery(&self) -> bool;
    /// Closed by the application (`Channel::close`): never reopened.
    fn closed_by_app(&self) -> bool;
    /// What to restore on the reopened channel.
    fn record(&self) -> &Mutex<ChannelRecord>;
    /// Unconfirmed messages the application gets back (hand-back policy).
    fn hand_back(&self, entries: Vec<Entry>);
    /// The connection is gone for good: end every consumer of this channel.
    fn end_consumers(&self, err: &Error);
}

/// The procedures the handle layer installs (they sit above this file): the recovery,
/// run on its own thread after a link failure, and the reopening of one closed channel
/// on the current link (returns the consumer tags it subscribed again).
#[derive(Clone, Copy)]
pub(crate) struct Recover {
    pub(crate) run: fn(Arc<ConnectionInner>),
    pub(crate) reopen: Reopen,
}

/// Reopen one closed channel; returns the consumer tags subscribed again.
pub(crate) type Reopen =
    fn(&Arc<ConnectionInner>, &Arc<dyn ChannelSlot>, Instant) -> Result<Vec<String>>;

/// State shared by every handle of one `Connection`, across its generations.
pub(crate) struct ConnectionInner {
    pub(crate) opts: ConnectionOptions,
    /// The current generation, single-flight recovery, and the waits on them.
    pub(crate) link: LinkCell<Arc<Generation>>,
    pub(crate) topology: Mutex<Topology>,
    /// What the last recovery could not restore, retried in the background.
    pub(crate) pending: Mutex<PendingTopology>,
    channels: Mutex<HashMap<u16, Weak<dyn ChannelSlot>>>,
    /// The event log and listeners, and the counters, of every generation.
    pub(crate) hub: Arc<EventHub>,
    pub(crate) stats: Arc<Stats>,
    generations: AtomicU64,
    recover: Recover,
    /// Credentials from a provider, the secret last updated, the refresh schedule.
    pub(crate) secrets: Arc<Secrets>,
}

impl ConnectionInner {
    /// Connect to the first address that answers and start its I/O thread; `recover`
    /// runs after a link failure that recovery should handle.
    pub(crate) fn open(opts: ConnectionOptions, recover: Recover) -> Result<Arc<Self>> {
        let mut last = None;
        let mut first = None;
        let secrets = Secrets::new(&opts);
        let stats = Arc::new(Stats::for_connection(&opts));
        let hub = EventHub::new(&opts, stats.clone());
        for a in opts.address_order(None)? {
            match prepare(
                &opts.clone().host(a.host).port(a.port),
                1,
                &secrets,
                (&stats, &hub),
            ) {
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
            link: LinkCell::new(gen_.clone()),
            topology: Mutex::new(Topology::default()),
            pending: Mutex::new(PendingTopology::default()),
            channels: Mutex::new(HashMap::new()),
            hub,
            stats,
            generations: AtomicU64::new(1),
            recover,
            secrets,
        });
        let weak: Weak<ConnectionInner> = Arc::downgrade(&inner);
        launch(&gen_, reactor, weak)?;
        Ok(inner)
    }

    /// The number of the current generation.
    pub(crate) fn current_generation(&self) -> u64 {
        self.link.lock().current.number()
    }

    /// The address of the current generation's connection.
    pub(crate) fn current_address(&self) -> crate::addresses::Address {
        let link = self.link.lock();
        let o = &link.current.shared().opts;
        crate::addresses::Address::new(o.host.clone(), o.port)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.link.is_closed()
    }

    /// Closed, or lost for good: nothing on it will work again.
    pub(crate) fn is_dead(&self) -> bool {
        self.link.is_dead()
    }

    /// `connection.update-secret` on the current link, waiting for its ok until
    /// `deadline`.
    pub(crate) fn update_secret(
        &self,
        secret: &str,
        reason: &str,
        deadline: Instant,
    ) -> Result<()> {
        let shared = self.current(deadline)?;
        let mut bytes = Vec::with_capacity(secret.len() + reason.len() + 32);
        put_method(
            &mut bytes,
            0,
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(
                connection::UpdateSecret {
                    new_secret: secret.to_string().into(),
                    reason: reason.to_string().into(),
                },
            )),
        )
        .map_err(Error::InvalidArgument)?;
        let (tx, rx) = oneshot::channel();
        shared.send(
            Command::UpdateSecret { bytes, reply: tx },
            deadline,
            "room to send connection.update-secret",
        )?;
        match rx.recv_deadline(deadline) {
            Ok(Ok(_)) => {
                self.secrets.updated(secret);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(oneshot::RecvError::Disconnected) => Err(shared.error()),
            Err(oneshot::RecvError::Timeout) => Err(Error::Timeout("connection.update-secret-ok")),
        }
    }

    pub(crate) fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Record a recovery step (log and listeners, see event_hub.rs).
    pub(crate) fn event(&self, generation: u64, kind: RecoveryEventKind) {
        self.hub.emit(generation, ConnectionEventKind::Recovery(kind));
    }

    /// The usable connection state, waiting for a recovery in progress until `deadline`.
    pub(crate) fn current(&self, deadline: Instant) -> Result<Arc<ConnShared>> {
        self.link
            .current(deadline, Error::ConnectionClosed)
            .map(|g| g.shared().clone())
    }

    /// Wait until `done()` holds, or the connection is closed or dead, or `deadline`.
    /// `lost` is the error to report if the deadline passes.
    pub(crate) fn wait_for(
        &self,
        done: impl Fn() -> bool,
        deadline: Instant,
        lost: impl Fn() -> Error,
    ) -> Result<()> {
        self.link
            .wait_for(done, deadline, lost, Error::ConnectionClosed)
    }

    pub(crate) fn notify(&self) {
        self.link.notify();
    }

    /// Sleep for `d` unless the connection is closed meanwhile (then true).
    pub(crate) fn sleep_unless_closed(&self, d: Duration) -> bool {
        self.link.sleep_unless_closed(d)
    }

    /// Track channel `id` (replacing a closed channel that had the id before). No sweep
    /// for dead entries here: every channel forgets itself when dropped
    /// (`unregister_channel`), and a sweep per open made N opens O(N²) under this lock.
    pub(crate) fn register_channel(&self, id: u16, ch: Weak<dyn ChannelSlot>) {
        self.channels.lock().insert(id, ch);
    }

    /// Every live channel handle. Upgraded under the lock but dropped only after it: one
    /// of them may become the last handle of its channel (another thread dropping its
    /// own meanwhile), and that drop unregisters the channel, taking this lock.
    fn channel_handles(&self) -> Vec<Arc<dyn ChannelSlot>> {
        self.channels
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Forget channel `id` if it is still the one at `ch` (its state's address).
    pub(crate) fn unregister_channel(&self, id: u16, ch: *const ()) {
        let mut map = self.channels.lock();
        if map
            .get(&id)
            .is_some_and(|w| std::ptr::eq(w.as_ptr() as *const (), ch))
        {
            map.remove(&id);
        }
    }

    /// Forget `queue` if it is auto-delete and no recorded consumer uses it any more.
    pub(crate) fn forget_auto_delete_queue(&self, queue: &str) {
        let auto_delete = self
            .topology
            .lock()
            .queues
            .iter()
            .any(|(n, r)| n == queue && r.opts.auto_delete);
        if !auto_delete {
            return;
        }
        let used = self
            .channel_handles()
            .iter()
            .any(|c| c.record().lock().consumers.iter().any(|r| r.queue == queue));
        if !used {
            self.topology.lock().remove_queue(queue);
        }
    }

    /// Channels the application has not closed, open or not (a broker-closed one may be
    /// reopened for a consumer that comes back).
    pub(crate) fn app_channels(&self) -> Vec<Arc<dyn ChannelSlot>> {
        self.channel_handles()
            .into_iter()
            .filter(|c| !c.closed_by_app())
            .collect()
    }

    /// Reopen `slot`'s closed channel on the current link (see `Recover::reopen`), waiting
    /// for the link and the channel's opening until `deadline`.
    pub(crate) fn reopen_channel(
        self: &Arc<Self>,
        slot: &Arc<dyn ChannelSlot>,
        deadline: Instant,
    ) -> Result<Vec<String>> {
        (self.recover.reopen)(self, slot, deadline)
    }

    /// Channels to restore: alive, and not closed by themselves.
    pub(crate) fn live_channels(&self) -> Vec<Arc<dyn ChannelSlot>> {
        let mut v: Vec<_> = self
            .channel_handles()
            .into_iter()
            .filter(|c| c.wants_recovery())
            .collect();
        v.sort_by_key(|c| c.id());
        v
    }

    /// Make a recovered generation current. Refused (false) if it failed meanwhile: the
    /// recovery loop then goes on.
    pub(crate) fn install(&self, gen_: Arc<Generation>) -> bool {
        let number = gen_.number();
        if !self.link.install(gen_) {
            crate::trace::warn!("recovered generation {number} failed before it was installed");
            return false;
        }
        Stats::add(&self.stats.reconnects, 1);
        true
    }

    /// Recovery is over without a connection.
    pub(crate) fn give_up(&self, err: Error) {
        self.link.give_up(err.clone());
        for c in self.channel_handles() {
            c.end_consumers(&err);
        }
    }

    pub(crate) fn close(&self) -> Result<()> {
        let Some(gen_) = self.link.close() else {
            return Ok(());
        };
        self.secrets.stop();
        let r = gen_.close();
        for c in self.channel_handles() {
            c.end_consumers(&Error::ConnectionClosed);
        }
        r
    }
}

impl LinkEvents for ConnectionInner {
    fn failing(&self, generation: u64, err: &Error) -> bool {
        // A candidate of the running recovery ends by whatever error (a protocol violation
        // by a node that is restarting too): that recovery goes on to its next attempt
        // either way, so what the candidate was restoring (its consumers) hears of a lost
        // link, not of its end.
        let candidate = generation > self.current_generation();
        let recoverable = self.opts.recovery.enabled && (err.is_connection_lost() || candidate);
        let Some(candidate) = self.link.failing(generation, recoverable) else {
            return false;
        };
        if candidate {
            return true;
        }
        crate::trace::warn!("connection lost (generation {generation}): {err}; recovering");
        self.event(
            generation,
            RecoveryEventKind::FailureDetected(err.to_string()),
        );
        true
    }

    fn woken(&self, generation: u64) {
        if self.link.is_recovering() {
            self.event(generation, RecoveryEventKind::WaitersWoken);
        }
    }

    fn ended(self: Arc<Self>, generation: u64, err: Error) {
        if !self.link.ended(generation, err) {
            return;
        }
        let inner = self.clone();
        let recover = self.recover;
        if let Err(e) = std::thread::Builder::new()
            .name("lepus-recovery".into())
            .spawn(move || (recover.run)(inner))
        {
            crate::trace::error!("could not start the recovery thread: {e}");
            self.give_up(Error::ConnectionLost(format!(
                "recovery could not start: {e}"
            )));
        }
    }
}

impl Drop for ConnectionInner {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            crate::trace::warn!("closing the connection on drop: {e}");
        }
    }
}
