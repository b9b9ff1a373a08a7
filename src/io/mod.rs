//! The I/O side: commands from handles, the state shared between handles and the I/O
//! thread, the handshake, the engine (a socket-free state machine) and the reactor.

pub(crate) mod engine;
pub(crate) mod handshake;
pub(crate) mod reactor;
#[cfg(test)]
mod scenario;
#[cfg(feature = "tls")]
pub(crate) mod tls_config;
pub(crate) mod transport;
mod wake;

pub(crate) use wake::Wake;

use std::net::SocketAddr;
use std::time::Instant;

use amq_protocol::protocol::AMQPClass;

use crate::confirm_tracker::ConfirmTracker;
use crate::delivery::{AckTarget, ConsumerSink, Returned};
use crate::error::{Error, Result};
use crate::event_hub::EventHub;
use crate::events::ConnectionEventKind;
use crate::options::ConnectionOptions;
use crate::protocol::content::Content;
use crate::protocol::frame::put_method;
use crate::protocol::table::FieldTable;
use crate::send_core::{FailFlag, WakeFlag};
use crate::stats::Stats;
use crate::sync::oneshot;
use crate::sync::queue::{self, Receiver, SendTimeoutError, Sender};
use crate::sync::{Arc, AtomicBool, AtomicUsize, Condvar, CondvarExt, Mutex, Ordering, Weak};
use crate::write_gate::{Direct, WriteGate};

/// What an RPC gets back.
#[derive(Debug)]
pub(crate) enum Reply {
    Method(AMQPClass),
    /// `basic.get-ok` with its content, or `None` for `get-empty`.
    Get(Option<Box<Content>>),
}

pub(crate) type ReplyTx = oneshot::Sender<Result<Reply>>;
pub(crate) type ReplyRx = oneshot::Receiver<Result<Reply>>;

/// A unit of work for the I/O thread. Frames arrive pre-encoded.
pub(crate) enum Command {
    /// Frames of an open channel that need no reply (publish, ack, ...).
    Send(Vec<u8>),
    /// The same, for frames also kept elsewhere (a confirm-mode publish kept until
    /// confirmed).
    SendShared(Arc<Vec<u8>>),
    /// A synchronous method; the reply goes to `reply`. For `basic.consume`, `consumer`
    /// is registered under the tag of the `consume-ok` before the reply is sent.
    Rpc {
        channel: u16,
        bytes: Vec<u8>,
        reply: ReplyTx,
        consumer: Option<ConsumerSink>,
    },
    /// Register a channel and send its `channel.open`, then the requests `chained`
    /// (their frames follow the open's in `bytes`).
    OpenChannel {
        shared: Arc<ChannelShared>,
        bytes: Vec<u8>,
        reply: ReplyTx,
        chained: Vec<Chained>,
    },
    /// Send `channel.close`; the id is freed on `close-ok`.
    CloseChannel {
        channel: u16,
        bytes: Vec<u8>,
        reply: Option<ReplyTx>,
    },
    /// Close the connection.
    Close { bytes: Vec<u8>, reply: ReplyTx },
    /// `connection.update-secret`; the reply is its `update-secret-ok`.
    UpdateSecret { bytes: Vec<u8>, reply: ReplyTx },
}

/// A synchronous method sent in the command that opens its channel
/// (`Connection::open_consumer`): one hand-over and one write for the lot. Its reply comes
/// on `reply` as an RPC's does; for `basic.consume`, `consumer` is registered under the
/// tag of the `consume-ok` first.
pub(crate) struct Chained {
    pub(crate) reply: ReplyTx,
    pub(crate) consumer: Option<ConsumerSink>,
    /// Class and method id of the request.
    pub(crate) request: (u16, u16),
}

/// Values agreed in `connection.tune`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tuned {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
}

/// Channel ids in use on one connection.
#[derive(Debug)]
pub(crate) struct IdAllocator {
    used: Vec<bool>,
    next: usize,
}

impl IdAllocator {
    pub(crate) fn new(channel_max: u16) -> Self {
        IdAllocator {
            used: vec![false; channel_max as usize + 1],
            next: 1,
        }
    }
    pub(crate) fn allocate(&mut self) -> Option<u16> {
        let n = self.used.len();
        for i in 0..n.saturating_sub(1) {
            let id = (self.next - 1 + i) % (n - 1) + 1;
            if !self.used[id] {
                self.used[id] = true;
                self.next = id % (n - 1) + 1;
                return Some(id as u16);
            }
        }
        None
    }
    /// Take a specific id (recovery reopens channels under their old ids).
    pub(crate) fn reserve(&mut self, id: u16) -> bool {
        match self.used.get_mut(id as usize) {
            Some(u) if !*u && id != 0 => {
                *u = true;
                true
            }
            _ => false,
        }
    }
    pub(crate) fn free(&mut self, id: u16) {
        if let Some(u) = self.used.get_mut(id as usize) {
            *u = false;
        }
    }
}

/// State shared by every handle of a connection and its I/O thread.
pub(crate) struct ConnShared {
    cmd_tx: Sender<Command>,
    waker: Arc<dyn Wake>,
    /// The socket's write side, for frames a caller writes itself (`caller_writes`).
    pub(crate) gate: WriteGate<std::net::TcpStream>,
    wake_pending: WakeFlag,
    failed: FailFlag,
    failure: Mutex<Option<Error>>,
    blocked: Mutex<Option<String>>,
    blocked_cv: Condvar,
    is_blocked: AtomicBool,
    pub(crate) ids: Mutex<IdAllocator>,
    pub(crate) tuned: Tuned,
    pub(crate) opts: ConnectionOptions,
    pub(crate) server_properties: FieldTable,
    /// Which connection of a recovering `Connection` this is (1, 2, ...).
    pub(crate) generation: u64,
    /// Our end of the TCP connection.
    pub(crate) local_addr: Option<SocketAddr>,
    link: Mutex<Option<Weak<dyn LinkEvents>>>,
    /// The counters of the `Connection` (shared by its generations).
    pub(crate) stats: Arc<Stats>,
    /// Its event log and listeners.
    pub(crate) events: Arc<EventHub>,
}

/// What the owner of a connection generation hears from its I/O thread.
pub(crate) trait LinkEvents: Send + Sync {
    /// The link of `generation` is failing with `err` (called before any waiter wakes);
    /// returns true if a recovery will follow.
    fn failing(&self, generation: u64, err: &Error) -> bool;
    /// The I/O thread of `generation` has ended with `err`.
    fn woken(&self, generation: u64);
    fn ended(self: Arc<Self>, generation: u64, err: Error);
}

impl ConnShared {
    pub(crate) fn new(
        cmd_tx: Sender<Command>,
        waker: Arc<dyn Wake>,
        tuned: Tuned,
        opts: ConnectionOptions,
        server_properties: FieldTable,
    ) -> Self {
        ConnShared {
            cmd_tx,
            waker,
            gate: WriteGate::new(None),
            wake_pending: WakeFlag::new(),
            failed: FailFlag::new(),
            failure: Mutex::new(None),
            blocked: Mutex::new(None),
            blocked_cv: Condvar::new(),
            is_blocked: AtomicBool::new(false),
            ids: Mutex::new(IdAllocator::new(tuned.channel_max)),
            tuned,
            opts,
            server_properties,
            generation: 1,
            local_addr: None,
            link: Mutex::new(None),
            stats: Arc::new(Stats::default()),
            events: EventHub::detached(Arc::new(Stats::default())),
        }
    }

    /// Report to the counters and events of the `Connection` (before the state is
    /// shared).
    pub(crate) fn with_observers(mut self, stats: Arc<Stats>, events: Arc<EventHub>) -> Self {
        self.stats = stats;
        self.events = events;
        self
    }

    /// Record a connection event of this generation.
    pub(crate) fn event(&self, kind: ConnectionEventKind) {
        self.events.emit(self.generation, kind);
    }

    /// Set the generation number (before the state is shared).
    pub(crate) fn with_generation(mut self, generation: u64, local: Option<SocketAddr>) -> Self {
        self.generation = generation;
        self.local_addr = local;
        self
    }

    /// Let callers write to `sock` (a handle on the connection's socket) when the I/O
    /// thread rests (before the state is shared).
    pub(crate) fn with_caller_writes(mut self, sock: std::net::TcpStream) -> Self {
        self.gate = WriteGate::new(Some(sock));
        self
    }

    /// Write frames that need no reply on the caller's thread, if the I/O thread rests,
    /// nothing is queued and `open()` (asked under the gate, when the I/O thread is
    /// between turns) says their channel is open: see `write_gate`. False: hand them
    /// over as usual.
    pub(crate) fn write_direct(&self, bytes: &[u8], open: impl FnOnce() -> bool) -> bool {
        match self
            .gate
            .try_write(bytes, || self.cmd_tx.is_empty() && open())
        {
            Direct::Written => {
                Stats::add(&self.stats.bytes_out, bytes.len() as u64);
                Stats::add(&self.stats.caller_writes, 1);
                true
            }
            Direct::Carried(n) => {
                Stats::add(&self.stats.bytes_out, n as u64);
                Stats::add(&self.stats.caller_writes, 1);
                // The rest is the I/O thread's to write.
                self.wake();
                true
            }
            Direct::NotNow => false,
        }
    }

    /// Set who hears about this generation's end (before its I/O thread starts).
    pub(crate) fn set_link(&self, link: Weak<dyn LinkEvents>) {
        *self.link.lock() = Some(link);
    }

    /// The link fails with `err`: tell the owner first (remembering whether recovery
    /// follows), record the reason, then set the flag waiters read (`FailFlag::fail`),
    /// and wake blocked publishers. Returns true if a recovery follows.
    pub(crate) fn fail_link(&self, err: &Error) -> bool {
        let recover = self.failed.fail(
            || {
                let link = self.link.lock().as_ref().and_then(Weak::upgrade);
                link.is_some_and(|l| l.failing(self.generation, err))
            },
            || {
                let mut f = self.failure.lock();
                if f.is_none() {
                    *f = Some(err.clone());
                }
            },
        );
        let _b = self.blocked.lock();
        self.blocked_cv.notify_all();
        recover
    }

    /// True when the failure of this generation will be followed by a recovery.
    pub(crate) fn will_recover(&self) -> bool {
        self.failed.will_recover()
    }

    /// Tell the owner every waiter has been woken.
    pub(crate) fn link_woken(&self) {
        let link = self.link.lock().as_ref().and_then(Weak::upgrade);
        if let Some(l) = link {
            l.woken(self.generation);
        }
    }

    /// Tell the owner the I/O thread ended.
    pub(crate) fn link_ended(&self, err: Error) {
        let link = self.link.lock().take().and_then(|w| w.upgrade());
        if let Some(l) = link {
            l.ended(self.generation, err);
        }
    }

    /// Open a channel on this connection (with the given id, for recovery), waiting
    /// until `deadline`.
    pub(crate) fn open_channel(
        self: &Arc<Self>,
        want: Option<u16>,
        deadline: Instant,
    ) -> Result<Arc<ChannelShared>> {
        let _span = crate::trace::span!("lepus.rpc", method = "channel.open");
        let (ch, rx) = self.open_channel_start(want, deadline)?;
        ch.open_finish(&rx, deadline)?;
        Ok(ch)
    }

    /// Send `channel.open` (with the given id, for recovery) without waiting; finish
    /// with [`ChannelShared::open_finish`].
    pub(crate) fn open_channel_start(
        self: &Arc<Self>,
        want: Option<u16>,
        deadline: Instant,
    ) -> Result<(Arc<ChannelShared>, ReplyRx)> {
        let (ch, rx, []) = self.open_channel_with(want, [], deadline)?;
        Ok((ch, rx))
    }

    /// Send `channel.open` and the synchronous methods `then` of the new channel (each
    /// with the consumer its reply registers) in one command, without waiting: nothing
    /// is sent if any of them cannot be encoded. Finish with
    /// [`ChannelShared::open_finish`] and the replies to `then`, which come in order.
    pub(crate) fn open_channel_with<const N: usize>(
        self: &Arc<Self>,
        want: Option<u16>,
        then: [(AMQPClass, Option<ConsumerSink>); N],
        deadline: Instant,
    ) -> Result<(Arc<ChannelShared>, ReplyRx, [ReplyRx; N])> {
        if self.is_failed() {
            return Err(self.error());
        }
        let id = {
            let mut ids = self.ids.lock();
            match want {
                Some(id) if ids.reserve(id) => Some(id),
                Some(_) => None,
                None => ids.allocate(),
            }
        }
        .ok_or(Error::NoFreeChannel(self.tuned.channel_max))?;
        let mut bytes = Vec::with_capacity(16 + 64 * N);
        let open = AMQPClass::Channel(amq_protocol::protocol::channel::AMQPMethod::Open(
            amq_protocol::protocol::channel::Open {},
        ));
        let mut senders = Vec::with_capacity(N);
        let replies = std::array::from_fn(|_| {
            let (tx, rx) = oneshot::channel();
            senders.push(tx);
            rx
        });
        let mut chained = Vec::with_capacity(N);
        let encoded = put_method(&mut bytes, id, open).and_then(|()| {
            then.into_iter()
                .zip(senders)
                .try_for_each(|((m, consumer), reply)| {
                    let request = (m.get_amqp_class_id(), m.get_amqp_method_id());
                    put_method(&mut bytes, id, m)?;
                    chained.push(Chained {
                        reply,
                        consumer,
                        request,
                    });
                    Ok(())
                })
        });
        if let Err(e) = encoded {
            self.ids.lock().free(id);
            return Err(Error::InvalidArgument(e));
        }
        let ch = Arc::new(ChannelShared::new(id, self.clone()));
        let (tx, rx) = oneshot::channel();
        let sent = self.send(
            Command::OpenChannel {
                shared: ch.clone(),
                bytes,
                reply: tx,
                chained,
            },
            deadline,
            "room to send channel.open",
        );
        if let Err(e) = sent {
            self.ids.lock().free(id);
            return Err(e);
        }
        Ok((ch, rx, replies))
    }

    /// Ask the I/O thread to look at its queue; one wake-up per batch of commands.
    pub(crate) fn wake(&self) {
        self.wake_pending.wake(|| self.waker.wake());
    }

    /// Called by the I/O thread before it drains the command queue.
    pub(crate) fn clear_wake(&self) {
        self.wake_pending.clear();
    }

    /// Queue a command for the I/O thread, waiting for room until `deadline`.
    pub(crate) fn send(&self, cmd: Command, deadline: Instant, what: &'static str) -> Result<()> {
        // Either the I/O thread drains this command, or a waiter checking `is_failed`
        // afterwards sees the failure (see `send_core` and `ChannelShared::wait_reply`).
        match self
            .failed
            .send(|| self.cmd_tx.send_deadline(cmd, deadline))
        {
            None => Err(self.error()),
            Some(Ok(())) => {
                self.wake();
                Ok(())
            }
            Some(Err(SendTimeoutError::Timeout(_))) => Err(Error::Timeout(what)),
            Some(Err(SendTimeoutError::Disconnected(_))) => Err(self.error()),
        }
    }

    pub(crate) fn is_failed(&self) -> bool {
        self.failed.is_set()
    }

    /// The I/O thread's last step: drop every queued command (`pop` takes one) so that
    /// their waiters wake; ordered after the failure (see `send_core`).
    pub(crate) fn drain_failed(&self, pop: impl FnMut() -> bool) {
        self.failed.drain_failed(pop);
    }

    /// Why the connection ended (or a generic loss if the reason is not recorded yet).
    pub(crate) fn error(&self) -> Error {
        match &*self.failure.lock() {
            Some(e) => e.clone(),
            None => Error::ConnectionLost("the connection's I/O thread has ended".into()),
        }
    }

    pub(crate) fn set_blocked(&self, reason: Option<String>) {
        let mut b = self.blocked.lock();
        self.is_blocked.store(reason.is_some(), Ordering::Release);
        *b = reason;
        self.blocked_cv.notify_all();
    }

    pub(crate) fn blocked_reason(&self) -> Option<String> {
        self.blocked.lock().clone()
    }

    /// Wait while the broker says the connection is blocked.
    pub(crate) fn wait_unblocked(&self, deadline: Instant) -> Result<()> {
        if !self.is_blocked.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut b = self.blocked.lock();
        while b.is_some() {
            if self.is_failed() {
                return Err(self.error());
            }
            if self.blocked_cv.wait_until_deadline(&mut b, deadline) && b.is_some() {
                return Err(Error::Timeout("the broker to unblock the connection"));
            }
        }
        Ok(())
    }
}

/// Returned messages are kept up to this many per channel; more are logged and dropped.
pub(crate) const RETURNS_CAPACITY: usize = 1024;

/// A channel's returned messages. The queue is made at the first return or the first
/// wait for one: most channels see neither, and an empty queue is ~500 bytes. It belongs
/// to one connection generation and ends with its channel ([`Returns::end`]): a thread
/// waiting in `recv_return` then wakes at once, instead of finding out at a poll.
#[derive(Default)]
pub(crate) struct Returns(Mutex<ReturnsQueue>);

#[derive(Default)]
struct ReturnsQueue {
    /// The only sender; `None` once the queue ended, so that receivers see it
    /// disconnected (after the returns still queued).
    tx: Option<Sender<Returned>>,
    rx: Option<Receiver<Returned>>,
    ended: bool,
}

impl ReturnsQueue {
    fn rx(&mut self) -> &Receiver<Returned> {
        if self.rx.is_none() {
            let (tx, rx) = queue::unbounded();
            self.tx = (!self.ended).then_some(tx);
            self.rx = Some(rx);
        }
        self.rx.as_ref().expect("made above")
    }
}

impl Returns {
    /// The receiving end, made if it is not yet (to block on it outside the lock).
    pub(crate) fn receiver(&self) -> Receiver<Returned> {
        self.0.lock().rx().clone()
    }

    /// Queue a return; `Some(r)` gives it back when the queue ended.
    pub(crate) fn send(&self, r: Returned) -> Option<Returned> {
        let mut q = self.0.lock();
        q.rx();
        match q.tx.as_ref() {
            Some(tx) => tx.send(r).err().map(|e| e.0),
            None => Some(r),
        }
    }

    pub(crate) fn try_recv(&self) -> Option<Returned> {
        self.0.lock().rx.as_ref()?.try_recv().ok()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.lock().rx.as_ref().map_or(0, Receiver::len)
    }

    /// No more returns come (the channel closed or its link failed; called after either
    /// is visible to `is_closed`): waiters wake, read what is queued, then see the end.
    pub(crate) fn end(&self) {
        let mut q = self.0.lock();
        q.ended = true;
        q.tx = None;
    }
}

/// State of one channel shared by its handles and the I/O thread.
pub(crate) struct ChannelShared {
    pub(crate) id: u16,
    pub(crate) conn: Arc<ConnShared>,
    closed: AtomicBool,
    close_reason: Mutex<Option<Error>>,
    pub(crate) confirms: ConfirmTracker,
    pub(crate) returns: Returns,
    pub(crate) returns_dropped: AtomicUsize,
    /// Bytes (decoded size) of the returns queued unread.
    pub(crate) returns_bytes: AtomicUsize,
    /// Deliveries for no consumer of ours (unknown or cancelled tag), rejected.
    pub(crate) orphan_deliveries: AtomicUsize,
    pub(crate) prefetch: AtomicUsize,
    /// Unsettled deliveries with their arrival, when `unacked_warning` is on.
    pub(crate) unacked: Option<crate::unacked::UnackedTracker>,
    /// RPCs on one channel are serialised.
    rpc_lock: Mutex<()>,
    /// Held while a confirm-mode publish takes its sequence number and is queued.
    pub(crate) publish_lock: Mutex<()>,
}

impl ChannelShared {
    pub(crate) fn new(id: u16, conn: Arc<ConnShared>) -> Self {
        let unacked = conn
            .opts
            .unacked_warning
            .map(crate::unacked::UnackedTracker::new);
        ChannelShared {
            id,
            conn,
            closed: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            confirms: ConfirmTracker::new(),
            returns: Returns::default(),
            returns_dropped: AtomicUsize::new(0),
            returns_bytes: AtomicUsize::new(0),
            orphan_deliveries: AtomicUsize::new(0),
            prefetch: AtomicUsize::new(0),
            unacked,
            rpc_lock: Mutex::new(()),
            publish_lock: Mutex::new(()),
        }
    }

    /// Mark the channel closed for `reason` (first reason wins) and fail confirm waiters.
    pub(crate) fn set_closed(&self, reason: Error) {
        {
            let mut r = self.close_reason.lock();
            if r.is_none() {
                *r = Some(reason);
            }
            self.closed.store(true, Ordering::Release);
        }
        self.confirms.fail(self.error(), false);
        self.returns.end();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.conn.is_failed()
    }

    /// Closed by itself (by the broker or the application), not by its connection.
    pub(crate) fn is_channel_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Why this channel cannot be used: its own close reason, else the connection's.
    pub(crate) fn error(&self) -> Error {
        if let Some(e) = &*self.close_reason.lock() {
            return e.clone();
        }
        self.conn.error()
    }

    /// Wait for an RPC reply until `deadline`; wakes at once if the channel or the
    /// connection ends.
    pub(crate) fn wait_reply(
        &self,
        rx: &ReplyRx,
        deadline: Instant,
        what: &'static str,
    ) -> Result<Reply> {
        // The command was queued before this (`ConnShared::send` fences): if the link has
        // failed since, no reply is coming unless it is here (`FailFlag::wait_reply`).
        match self.conn.failed.wait_reply(rx, deadline) {
            Ok(r) => r,
            Err(oneshot::RecvError::Timeout) => Err(Error::Timeout(what)),
            Err(oneshot::RecvError::Disconnected) => Err(self.error()),
        }
    }

    /// A synchronous method on this channel: send, then wait for the reply.
    pub(crate) fn rpc(
        &self,
        m: AMQPClass,
        deadline: Instant,
        what: &'static str,
        consumer: Option<ConsumerSink>,
    ) -> Result<Reply> {
        // `what` names the reply awaited ("queue.declare-ok"): the span names the method.
        let _span = crate::trace::span!(
            "lepus.rpc",
            method = what.trim_end_matches("-ok"),
            channel = self.id
        );
        let _serial = self
            .rpc_lock
            .try_lock_until(deadline)
            .ok_or(Error::Timeout(what))?;
        let rx = self.rpc_start(m, deadline, what, consumer)?;
        self.wait_reply(&rx, deadline, what)
    }

    /// Send a synchronous method without waiting: its reply comes on the receiver.
    /// Replies on one channel come in request order, so several may be in flight (the
    /// recovery's pipelined replay); callers of [`ChannelShared::rpc`] are serialised.
    pub(crate) fn rpc_start(
        &self,
        m: AMQPClass,
        deadline: Instant,
        what: &'static str,
        consumer: Option<ConsumerSink>,
    ) -> Result<ReplyRx> {
        if self.is_closed() {
            return Err(self.error());
        }
        let mut bytes = Vec::with_capacity(64);
        put_method(&mut bytes, self.id, m).map_err(Error::InvalidArgument)?;
        let (tx, rx) = oneshot::channel();
        self.conn.send(
            Command::Rpc {
                channel: self.id,
                bytes,
                reply: tx,
                consumer,
            },
            deadline,
            what,
        )?;
        Ok(rx)
    }

    /// Wait for this channel's `channel.open-ok`; on failure the half-open channel is
    /// closed (the I/O thread owns its id by now).
    pub(crate) fn open_finish(&self, rx: &ReplyRx, deadline: Instant) -> Result<()> {
        match self.wait_reply(rx, deadline, "channel.open-ok") {
            Ok(Reply::Method(AMQPClass::Channel(
                amq_protocol::protocol::channel::AMQPMethod::OpenOk(_),
            ))) => Ok(()),
            other => {
                // A channel already ended (refused, closed by the broker, or its link
                // lost) is not closed again: its id may be another channel's by now.
                if !self.is_closed() {
                    self.close_nowait();
                }
                Err(match other {
                    Err(e) => e,
                    Ok(r) => Error::UnexpectedReply {
                        operation: "channel.open",
                        got: format!("{r:?}"),
                    },
                })
            }
        }
    }

    /// Send `channel.close` without waiting for `close-ok`.
    pub(crate) fn close_nowait(&self) {
        let mut bytes = Vec::with_capacity(48);
        let m = AMQPClass::Channel(amq_protocol::protocol::channel::AMQPMethod::Close(
            amq_protocol::protocol::channel::Close {
                reply_code: crate::protocol::reply_code::REPLY_SUCCESS,
                reply_text: "closed by the application".into(),
                class_id: 0,
                method_id: 0,
            },
        ));
        if put_method(&mut bytes, self.id, m).is_ok() {
            self.set_closed(Error::ChannelClosed(self.id));
            let _ = self.conn.send(
                Command::CloseChannel {
                    channel: self.id,
                    bytes,
                    reply: None,
                },
                Instant::now() + std::time::Duration::from_millis(100),
                "room to send channel.close",
            );
        }
    }

    /// Queue frames of this channel that need no reply.
    pub(crate) fn send(&self, bytes: Vec<u8>, deadline: Instant, what: &'static str) -> Result<()> {
        self.send_command(Command::Send(bytes), deadline, what)
    }

    /// Queue a command for this channel, unless the channel is closed. Frames that
    /// need no reply are written on this thread instead when the I/O thread rests.
    pub(crate) fn send_command(
        &self,
        cmd: Command,
        deadline: Instant,
        what: &'static str,
    ) -> Result<()> {
        // After a confirm-mode publish registered its number: a link that failed before
        // that registration is seen here (the tracker's lock orders them).
        if self.is_closed() {
            return Err(self.error());
        }
        let frames: Option<&[u8]> = match &cmd {
            Command::Send(b) => Some(b),
            Command::SendShared(b) => Some(b),
            _ => None,
        };
        // Under the gate the I/O thread is between turns: a channel the broker closed in
        // an earlier turn is seen closed there, before its id can be written to again.
        if frames.is_some_and(|b| self.conn.write_direct(b, || !self.is_channel_closed())) {
            return Ok(());
        }
        self.conn.send(cmd, deadline, what)
    }
}

impl AckTarget for ChannelShared {
    fn channel_id(&self) -> u16 {
        self.id
    }

    fn send_frames(&self, bytes: Vec<u8>, what: &'static str) -> Result<()> {
        self.send(
            bytes,
            Instant::now() + self.conn.opts.operation_timeout,
            what,
        )
    }

    fn stats(&self) -> Option<&Stats> {
        Some(&self.conn.stats)
    }

    fn is_open(&self) -> bool {
        !self.is_closed()
    }

    fn settled(&self, tag: u64, multiple: bool) {
        if let Some(t) = &self.unacked {
            t.settled(tag, multiple);
        }
    }

    fn lowest_unsettled(&self) -> Option<u64> {
        self.unacked.as_ref()?.lowest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_reused_only_after_free_and_bounded_by_channel_max() {
        let mut ids = IdAllocator::new(3);
        assert_eq!(
            (
                ids.allocate(),
                ids.allocate(),
                ids.allocate(),
                ids.allocate()
            ),
            (Some(1), Some(2), Some(3), None)
        );
        ids.free(2);
        assert_eq!(ids.allocate(), Some(2));
        assert_eq!(ids.allocate(), None);
    }
}
