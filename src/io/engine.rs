//! The connection engine: what to do on a frame, on a command and on a timer. A plain
//! state machine over an output buffer, driven by the reactor (or a test) without a socket.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, channel, connection};

use super::{Chained, ChannelShared, Command, ConnShared, RETURNS_CAPACITY, Reply, ReplyTx};
use crate::confirm_tracker::Wakes;
use crate::delivery::{
    Acker, BadDelivery, ByteBudget, Charge, ConsumerMsg, ConsumerSink, Delivery, Returned,
};
use crate::error::{BadDeliveryKind, Error};
use crate::events::ConnectionEventKind;
use crate::protocol::content::{Assembler, Content, ContentMethod, ContentProblem};
use crate::protocol::decode_server_method;
use crate::protocol::frame::{
    FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FrameError, RawFrame, put_heartbeat,
    put_method,
};
use crate::protocol::lenient::decode_content_method;
use crate::protocol::properties::BasicProperties;
use crate::protocol::reply_code;
use crate::protocol::size::properties_heap;
use crate::stats::Stats;
use crate::sync::lightq::Notifier;
use crate::sync::{Arc, Ordering};

/// Heartbeats are never sent more often than this.
const MIN_HEARTBEAT_SEND: Duration = Duration::from_millis(500);
/// At most one log line per channel for deliveries to unknown consumers in this time.
const ORPHAN_LOG_EVERY: Duration = Duration::from_secs(10);
/// Stop taking commands while this much output is unwritten.
const HIGH_WATER: usize = 4 * 1024 * 1024;

struct Pending {
    reply: ReplyTx,
    consumer: Option<ConsumerSink>,
    /// Class and method id of the request.
    request: (u16, u16),
}

/// Class and method id of the method frame at the start of `bytes` ((0, 0) if none).
fn request_ids(bytes: &[u8]) -> (u16, u16) {
    bytes
        .get(7..11)
        .filter(|_| bytes[0] == FRAME_METHOD)
        .map(|b| {
            (
                u16::from_be_bytes([b[0], b[1]]),
                u16::from_be_bytes([b[2], b[3]]),
            )
        })
        .unwrap_or((0, 0))
}

/// True if `reply` answers `request`: each `-ok` is its request's method id plus one, and
/// `basic.get` is answered by `get-ok` (71) or `get-empty` (72), and `exchange.unbind` (40)
/// by `unbind-ok` 51 (RabbitMQ's extension numbers it so).
fn answers(request: (u16, u16), reply: (u16, u16)) -> bool {
    request.0 == reply.0
        && (reply.1 == request.1 + 1
            || (request == (60, 70) && reply.1 == 72)
            || (request == (40, 40) && reply.1 == 51))
}

/// The waiter a reply belongs to: the oldest request it answers. Replies come in order,
/// except that RabbitMQ may answer a `queue.delete` before the `basic.cancel-ok` of a
/// consumer on that queue sent just before it (the cancel goes through the queue
/// process): matching by method keeps each reply with its own waiter. A reply that
/// answers nothing pending is the broker's violation (`None`): handed to another waiter,
/// it would leave that waiter's own reply without a request a moment later.
fn take_pending(pending: &mut VecDeque<Pending>, reply: (u16, u16)) -> Option<Pending> {
    let i = pending.iter().position(|p| answers(p.request, reply))?;
    let p = pending.remove(i);
    if pending.is_empty() {
        // An idle channel keeps no room for RPCs (4 x 72 bytes): one allocation per RPC
        // that empties the queue, next to a round trip to the broker.
        *pending = VecDeque::new();
    }
    p
}

/// The consumers of one channel by tag. Usually one or two: a vector is smaller than a
/// map and as fast to search.
#[derive(Default)]
struct Consumers(Vec<(String, ConsumerSink)>);

impl Consumers {
    fn get(&self, tag: &str) -> Option<&ConsumerSink> {
        self.0.iter().find(|(t, _)| t == tag).map(|(_, s)| s)
    }
    fn remove(&mut self, tag: &str) -> Option<ConsumerSink> {
        let i = self.0.iter().position(|(t, _)| t == tag)?;
        Some(self.0.swap_remove(i).1)
    }
    /// Returns true if a consumer with this tag was replaced.
    fn insert(&mut self, tag: String, sink: ConsumerSink) -> bool {
        let replaced = self.remove(&tag).is_some();
        if self.0.capacity() == 0 {
            self.0.reserve_exact(1);
        }
        self.0.push((tag, sink));
        replaced
    }
}

/// A slot's share of the connection's `channels` and `consumers` gauges, given back when
/// the slot goes, whichever way it goes.
struct Gauges {
    stats: Arc<Stats>,
    consumers: u64,
    released: bool,
}

impl Gauges {
    fn new(stats: Arc<Stats>) -> Self {
        Stats::add(&stats.channels, 1);
        Gauges {
            stats,
            consumers: 0,
            released: false,
        }
    }
    /// Give the shares back now (before the channel's waiters wake, so that they see
    /// the gauges without it).
    fn release(&mut self) {
        if !std::mem::replace(&mut self.released, true) {
            Stats::dec(&self.stats.channels, 1);
            Stats::dec(&self.stats.consumers, self.consumers);
        }
    }
    fn consumer_added(&mut self) {
        self.consumers += 1;
        Stats::add(&self.stats.consumers, 1);
    }
    fn consumer_removed(&mut self) {
        self.consumers -= 1;
        Stats::dec(&self.stats.consumers, 1);
    }
}

impl Drop for Gauges {
    fn drop(&mut self) {
        self.release();
    }
}

struct Slot {
    shared: Arc<ChannelShared>,
    pending: VecDeque<Pending>,
    consumers: Consumers,
    /// A no-ack consumer was ever registered here: a delivery for an unknown tag may then
    /// need no settling, and a reject of it would close the channel (406).
    had_no_ack: bool,
    /// When an orphan delivery was last logged (one line per burst).
    orphan_logged: Option<Instant>,
    assembler: Assembler,
    closing: bool,
    close_reply: Option<ReplyTx>,
    gauges: Gauges,
}

enum State {
    Open,
    /// We sent `connection.close`; waiting for `close-ok` until the deadline.
    Closing {
        deadline: Instant,
        outcome: Error,
        reply: Option<ReplyTx>,
    },
    Done(Error),
}

/// A delivery that did not fit its consumer's queue: reading stops until it does.
struct Stalled {
    channel: u16,
    tag: String,
    msg: ConsumerMsg,
    /// When its frame arrived: the unacked warning counts from then, as the broker's
    /// consumer_timeout does, not from when the consumer made room.
    received: Instant,
}

pub(crate) struct Engine {
    pub(crate) conn: Arc<ConnShared>,
    slots: Vec<Option<Box<Slot>>>,
    /// Bytes to write; the socket has taken `out[..written]`.
    out: Vec<u8>,
    written: usize,
    state: State,
    stalled: Option<Stalled>,
    heartbeat: Option<Duration>,
    last_recv: Instant,
    last_send: Instant,
    /// When output last moved (or none was waiting): a write stall counts from here.
    last_progress: Instant,
    max_depth: usize,
    max_message_size: u64,
    /// Waiters for `connection.update-secret-ok`, in request order.
    update_secret: VecDeque<ReplyTx>,
    /// Bytes of deliveries queued for all consumers of this connection.
    queued_bytes: Arc<ByteBudget>,
    /// The broker said `connection.blocked` (and not yet `unblocked`).
    blocked: bool,
    /// The time of the latest frame or timer (for what has no `now` of its own).
    clock: Instant,
    /// When to look for deliveries unacknowledged too long (`unacked_warning`).
    next_unacked_check: Instant,
    /// Publishers whose confirms arrived, woken with the consumers by
    /// [`Engine::wake_deferred`] (see [`Engine::on_frame_batched`]).
    wakes: Wakes,
    /// Consumer queues given deliveries quietly while their threads sleep: woken once
    /// each when the batch of frames is handled ([`Engine::wake_consumers`]).
    consumer_wakes: Vec<Notifier<ConsumerMsg>>,
}

fn method_bytes(out: &mut Vec<u8>, channel: u16, m: AMQPClass) {
    if let Err(e) = put_method(out, channel, m) {
        // Only server-chosen strings over 255 bytes could fail here; nothing to send then.
        crate::trace::error!("could not encode a reply method: {e}");
    }
}

impl Engine {
    pub(crate) fn new(conn: Arc<ConnShared>, now: Instant) -> Self {
        let tuned = conn.tuned;
        Engine {
            slots: (0..=tuned.channel_max as usize).map(|_| None).collect(),
            out: Vec::with_capacity(64 * 1024),
            state: State::Open,
            stalled: None,
            heartbeat: (tuned.heartbeat > 0).then(|| Duration::from_secs(tuned.heartbeat.into())),
            written: 0,
            last_recv: now,
            last_send: now,
            last_progress: now,
            max_depth: conn.opts.max_table_depth,
            max_message_size: conn.opts.max_message_size,
            update_secret: VecDeque::new(),
            queued_bytes: Arc::new(ByteBudget::new(
                conn.opts.connection_queue_bytes,
                Some(Box::new({
                    let conn = Arc::downgrade(&conn);
                    move || {
                        if let Some(c) = conn.upgrade() {
                            c.wake();
                        }
                    }
                })),
            )),
            blocked: false,
            clock: now,
            next_unacked_check: now,
            wakes: Wakes::default(),
            consumer_wakes: Vec::new(),
            conn,
        }
    }

    /// Wake the confirm waiters and the consumer threads deferred so far.
    pub(crate) fn wake_deferred(&mut self) {
        self.wakes.wake();
        self.wake_consumers();
    }

    /// The engine has finished; the reactor flushes and exits with this error.
    pub(crate) fn outcome(&self) -> Option<&Error> {
        match &self.state {
            State::Done(e) => Some(e),
            _ => None,
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    /// True while reading must pause: a delivery waits for room in its consumer's queue
    /// (or the connection's byte bound), or more output waits than `max_output_bytes` (a
    /// peer that stops reading but keeps sending what we answer cannot grow it further).
    pub(crate) fn is_stalled(&self) -> bool {
        self.stalled.is_some() || self.output_full()
    }

    fn output_full(&self) -> bool {
        self.out.len() - self.written >= self.conn.opts.max_output_bytes
    }

    // ---------------- bytes in and out ----------------

    /// The bytes waiting to be written, oldest first.
    pub(crate) fn output(&self) -> &[u8] {
        &self.out[self.written..]
    }

    /// The socket took the first `n` bytes of [`Engine::output`] at `now`.
    pub(crate) fn wrote(&mut self, n: usize, now: Instant) {
        self.wrote_elsewhere(n, now);
        self.written = (self.written + n).min(self.out.len());
    }

    /// The socket took `n` bytes at `now` that were not in [`Engine::output`] (the rest
    /// of a caller's direct write).
    pub(crate) fn wrote_elsewhere(&mut self, n: usize, now: Instant) {
        Stats::add(&self.conn.stats.bytes_out, n as u64);
        self.last_progress = now;
        self.last_send = now;
    }

    /// After a round of writes: forget what was written, and fail the link if output
    /// (ours, or bytes `held` outside it: a caller's unfinished write) has waited longer
    /// than `write_timeout` without the socket taking any of it.
    pub(crate) fn settle_output(&mut self, now: Instant, write_timeout: Duration, held: bool) {
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
            if !held {
                self.last_progress = now;
                return;
            }
        }
        // Written bytes stay in front of the rest until they are many: moving the rest
        // down after every partial write would copy it over and over.
        if self.written > HIGH_WATER {
            self.out.drain(..self.written);
            self.written = 0;
        }
        // A broker that blocked the connection stops reading on purpose: then only the
        // heartbeat-based limit applies. Otherwise a peer that reads none of our bytes
        // for `write_stall_timeout` is a dead link.
        let limit = if self.blocked {
            write_timeout
        } else {
            write_timeout.min(self.conn.opts.write_stall_timeout)
        };
        if now.duration_since(self.last_progress) > limit {
            self.fail(Error::ConnectionLost(format!(
                "writes to the broker stalled: it read none of our bytes for {limit:?}"
            )));
        }
    }

    /// Everything waiting to be written, taken out as if written (without counting as
    /// sent for the heartbeat): for tests and fuzzing, which have no socket.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn take_output(&mut self) -> Vec<u8> {
        let rest = self.out.split_off(self.written);
        self.out.clear();
        self.written = 0;
        rest
    }

    /// Bytes of deliveries queued for all consumers (the connection's byte budget).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes.queued()
    }

    /// Bytes arrived from the broker at `now`.
    pub(crate) fn received(&mut self, now: Instant) {
        self.last_recv = now;
    }

    /// False while so much output waits that commands must wait too: the bounded
    /// command queue then fills and publishers wait (with their deadline).
    pub(crate) fn wants_commands(&self) -> bool {
        self.output().len() < HIGH_WATER
    }

    // ---------------- failure and close ----------------

    /// End everything now with `err`: every waiter wakes with it.
    pub(crate) fn fail(&mut self, err: Error) {
        if matches!(self.state, State::Done(_)) {
            return;
        }
        crate::trace::debug!("connection ending: {err}");
        self.end_link(&err);
        if let State::Closing {
            reply: Some(reply), ..
        } = std::mem::replace(&mut self.state, State::Open)
        {
            let _ = reply.send(Err(err.clone()));
        }
        self.state = State::Done(err);
    }

    /// The link ends with `err`: tell the owner first (so that a recovery is known to
    /// follow before anyone wakes), record the reason, then wake every waiter.
    fn end_link(&mut self, err: &Error) {
        if self.conn.is_failed() {
            return;
        }
        let recover = self.conn.fail_link(err);
        let mut err = self.conn.error();
        if recover && !err.is_connection_lost() {
            // A recovery follows although the error is not a lost link (a candidate
            // connection of a running recovery ended by a protocol violation): say so, so
            // that consumers and confirmation waiters go on waiting for it.
            err = Error::ConnectionLost(format!("a recovery attempt failed: {err}"));
        }
        self.stalled = None;
        self.wake_deferred();
        for mut slot in self.slots.iter_mut().filter_map(Option::take) {
            slot.gauges.release();
            slot.shared.confirms.fail(err.clone(), recover);
            slot.shared.returns.end();
            // Consumers hear it through their queue: a lost link they will survive
            // (recovery re-registers them), or their end.
            for (_, sink) in slot.consumers.0 {
                if recover {
                    let _ = sink.push(ConsumerMsg::Lost(err.clone()));
                } else {
                    sink.end(err.clone());
                }
            }
            // Dropping pending replies wakes their waiters, which then read the reason.
        }
        self.update_secret.clear();
        self.conn.link_woken();
    }

    /// The peer broke the protocol: tell waiters, send `connection.close` with the code,
    /// and wait (bounded) for `close-ok`.
    pub(crate) fn violation(&mut self, e: FrameError, now: Instant) {
        if !self.is_open() {
            // Already closing: don't negotiate further with a broken peer.
            let err = Error::Protocol {
                code: e.code,
                text: e.text,
            };
            self.fail(err);
            return;
        }
        crate::trace::error!("protocol violation by the broker ({}): {}", e.code, e.text);
        let err = Error::Protocol {
            code: e.code,
            text: e.text.clone(),
        };
        self.end_link(&err);
        let mut text = e.text;
        // reply-text is a short string; the text may quote the peer's (UTF-8) strings.
        let mut cut = text.len().min(200);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        method_bytes(
            &mut self.out,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: e.code,
                reply_text: text.into(),
                class_id: 0,
                method_id: 0,
            })),
        );
        self.state = State::Closing {
            deadline: now + self.conn.opts.close_timeout,
            outcome: err,
            reply: None,
        };
    }

    // ---------------- commands ----------------

    pub(crate) fn on_command(&mut self, cmd: Command, now: Instant) {
        if !self.is_open() {
            // Replies are dropped: their waiters read the connection's reason.
            if let Command::Close { reply, .. } = cmd {
                let _ = reply.send(Ok(Reply::Method(AMQPClass::Connection(
                    connection::AMQPMethod::CloseOk(connection::CloseOk {}),
                ))));
            }
            return;
        }
        match cmd {
            Command::Send(bytes) => self.send_frames(&bytes),
            Command::SendShared(bytes) => self.send_frames(&bytes),
            Command::Rpc {
                channel,
                bytes,
                reply,
                consumer,
            } => {
                if let Some(slot) = self.open_slot(channel) {
                    slot.pending.push_back(Pending {
                        reply,
                        consumer,
                        request: request_ids(&bytes),
                    });
                    self.out.extend_from_slice(&bytes);
                }
            }
            Command::OpenChannel {
                shared,
                bytes,
                reply,
                chained,
            } => self.open_channel(shared, &bytes, reply, chained),
            Command::CloseChannel {
                channel,
                bytes,
                reply,
            } => self.close_channel(channel, &bytes, reply),
            Command::UpdateSecret { bytes, reply } => {
                self.update_secret.push_back(reply);
                self.out.extend_from_slice(&bytes);
            }
            Command::Close { bytes, reply } => {
                self.end_link(&Error::ConnectionClosed);
                self.out.extend_from_slice(&bytes);
                self.state = State::Closing {
                    deadline: now + self.conn.opts.close_timeout,
                    outcome: Error::ConnectionClosed,
                    reply: Some(reply),
                };
            }
        }
    }

    /// Register a channel (its id was allocated by the handle) and send its open and the
    /// requests chained to it. A refused open drops the chained requests' replies: their
    /// waiters read the open's error first.
    fn open_channel(
        &mut self,
        shared: Arc<ChannelShared>,
        bytes: &[u8],
        reply: ReplyTx,
        chained: Vec<Chained>,
    ) {
        let id = shared.id as usize;
        if id == 0 || id >= self.slots.len() || self.slots[id].is_some() {
            let _ = reply.send(Err(Error::InvalidArgument(format!(
                "channel id {id} is not free"
            ))));
            return;
        }
        let gauges = Gauges::new(shared.conn.stats.clone());
        let mut slot = Box::new(Slot {
            gauges,
            shared,
            pending: VecDeque::new(),
            consumers: Consumers::default(),
            had_no_ack: false,
            orphan_logged: None,
            assembler: Assembler::default(),
            closing: false,
            close_reply: None,
        });
        slot.pending.push_back(Pending {
            reply,
            consumer: None,
            request: (20, 10),
        });
        slot.pending.extend(chained.into_iter().map(|c| Pending {
            reply: c.reply,
            consumer: c.consumer,
            request: c.request,
        }));
        self.slots[id] = Some(slot);
        self.out.extend_from_slice(bytes);
    }

    /// Send the application's `channel.close`; the id is freed on `close-ok`.
    fn close_channel(&mut self, ch: u16, bytes: &[u8], reply: Option<ReplyTx>) {
        match self.open_slot(ch) {
            Some(slot) => {
                slot.closing = true;
                slot.close_reply = reply;
                self.out.extend_from_slice(bytes);
            }
            None => {
                if let Some(r) = reply {
                    let _ = r.send(Ok(Reply::Method(AMQPClass::Channel(
                        channel::AMQPMethod::CloseOk(channel::CloseOk {}),
                    ))));
                }
            }
        }
    }

    fn send_frames(&mut self, bytes: &[u8]) {
        let ch = bytes
            .get(1..3)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .unwrap_or(0);
        // Frames for a channel that is closing or closed would make the broker close
        // the whole connection (504); they are dropped and their sender has been told
        // the channel is closed.
        if self.open_slot(ch).is_some() {
            self.out.extend_from_slice(bytes);
        }
    }

    fn open_slot(&mut self, ch: u16) -> Option<&mut Slot> {
        self.slots
            .get_mut(ch as usize)
            .and_then(|s| s.as_deref_mut())
            .filter(|s| !s.closing)
    }

    // ---------------- timers ----------------

    /// Send heartbeats, detect a silent peer, end a close that got no answer. Returns
    /// when to call again.
    pub(crate) fn on_timer(&mut self, now: Instant) -> Instant {
        let mut next = now + Duration::from_secs(1);
        if let State::Closing { deadline, .. } = &self.state {
            if now >= *deadline {
                let outcome = match std::mem::replace(&mut self.state, State::Open) {
                    State::Closing { outcome, reply, .. } => {
                        if let Some(r) = reply {
                            let _ = r.send(Err(Error::Timeout("connection.close-ok")));
                        }
                        outcome
                    }
                    _ => unreachable!("matched above"),
                };
                self.state = State::Done(outcome);
                return now;
            }
            next = next.min(*deadline);
        }
        if let Some(hb) = self.heartbeat {
            let send_every = (hb / 2).max(MIN_HEARTBEAT_SEND);
            if now >= self.last_send + send_every && self.output().is_empty() {
                put_heartbeat(&mut self.out);
                // Counted as sent when written; avoid queueing a second one meanwhile.
                self.last_send = now;
            }
            // While output waits for the socket, the heartbeat waits too: scheduling it
            // now would only spin the loop (a stalled write has its own deadline).
            if self.output().is_empty() {
                next = next.min(self.last_send + send_every);
            }
            if self.is_stalled() {
                // We stopped reading on purpose; silence tells nothing now.
                self.last_recv = now;
            } else if now >= self.last_recv + hb * 2 {
                self.fail(Error::ConnectionLost(format!(
                    "no data from the broker for {:?} (two heartbeat intervals)",
                    now - self.last_recv
                )));
                return now;
            }
            next = next.min(self.last_recv + hb * 2);
        }
        if let Some(at) = self.check_unacked(now) {
            next = next.min(at);
        }
        if self.is_stalled() && crate::delivery_queue::stall_repoll() {
            // Safety net for a wake-up lost between the consumer and us.
            next = next.min(now + Duration::from_millis(20));
        }
        next
    }

    /// With `unacked_warning` on: report deliveries unsettled past the threshold (each
    /// once), at most every quarter threshold (every second at most) however often the
    /// loop turns. Returns when to check next.
    fn check_unacked(&mut self, now: Instant) -> Option<Instant> {
        let threshold = self.conn.opts.unacked_warning?;
        let every = (threshold / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
        if now < self.next_unacked_check {
            return Some(self.next_unacked_check);
        }
        self.next_unacked_check = now + every;
        for slot in self.slots.iter().flatten() {
            let Some(t) = &slot.shared.unacked else { continue };
            let due = t.overdue(now);
            let Some(&(first, oldest)) = due.first() else { continue };
            let ch = slot.shared.id;
            crate::trace::warn!(
                "channel {ch}: {} deliveries unacknowledged past {:?} (oldest: tag {first}, \
                 {oldest:?}); the broker closes the channel at its consumer_timeout",
                due.len(),
                t.threshold()
            );
            self.conn.event(crate::events::ConnectionEventKind::DeliveriesUnacked {
                channel: ch,
                delivery_tags: due.iter().map(|d| d.0).collect(),
                oldest,
            });
        }
        Some(self.next_unacked_check)
    }

    // ---------------- inbound frames ----------------

    /// Handle one decoded frame, and wake the consumers it gave a delivery to (tests and
    /// the fuzz harness drive the engine frame by frame; the reactor batches).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn on_frame(&mut self, f: RawFrame<'_>, now: Instant) {
        self.on_frame_batched(f, now);
        self.wake_deferred();
    }

    /// Handle one frame of a batch (the reactor's turn): the consumer threads it gives
    /// deliveries to are woken by [`Engine::wake_consumers`] (or
    /// [`Engine::wake_deferred`]), which the caller owes at the end of the batch. A
    /// consumer that gets several of the batch's deliveries is woken once for all of
    /// them; no wake-up system call stands between the batch's frames; and a consumer
    /// woken after the turn rested finds the socket free to write its ack itself (see
    /// `write_gate`) instead of queueing it and waking the I/O thread.
    pub(crate) fn on_frame_batched(&mut self, f: RawFrame<'_>, now: Instant) {
        self.clock = now;
        let r = match f.kind {
            FRAME_HEARTBEAT => Ok(()),
            // A content method is decoded leniently: its routing key and exchange are
            // the publisher's bytes, and a bad one must cost only that message.
            FRAME_METHOD => match decode_content_method(f.payload) {
                Some(Ok((m, problem))) => self.on_content_method(f.channel, m, problem),
                Some(Err(e)) => Err(e),
                None => match decode_server_method(f.payload, self.max_depth) {
                    Ok(m) => self.on_method(f.channel, m, now),
                    Err(e) => Err(e),
                },
            },
            FRAME_HEADER | FRAME_BODY => self.on_content_frame(f),
            _ => Err(FrameError::new(
                reply_code::FRAME_ERROR,
                "unknown frame type",
            )),
        };
        if let Err(e) = r {
            self.violation(e, now);
        }
    }

    fn on_content_frame(&mut self, f: RawFrame<'_>) -> Result<(), FrameError> {
        if !self.is_open() {
            return Ok(());
        }
        let (max_size, max_depth) = (self.max_message_size, self.max_depth);
        let slot = match self
            .slots
            .get_mut(f.channel as usize)
            .and_then(|s| s.as_deref_mut())
        {
            Some(s) if s.closing => return Ok(()),
            Some(s) => s,
            None => {
                return Err(FrameError::new(
                    reply_code::CHANNEL_ERROR,
                    format!("content frame on channel {} which is not open", f.channel),
                ));
            }
        };
        let done = if f.kind == FRAME_HEADER {
            slot.assembler.header(f.payload, max_size, max_depth)?
        } else {
            slot.assembler.body(f.payload)?
        };
        if let Some(content) = done {
            self.on_content(f.channel, content);
        }
        Ok(())
    }

    /// `basic.deliver`, `basic.return` or `basic.get-ok`, decoded leniently: `problem`
    /// says why its message will reach the application as a bad delivery.
    fn on_content_method(
        &mut self,
        ch: u16,
        m: ContentMethod,
        problem: Option<String>,
    ) -> Result<(), FrameError> {
        if ch == 0 {
            return Err(FrameError::new(
                reply_code::COMMAND_INVALID,
                format!("content method on channel 0: {m:?}"),
            ));
        }
        match self.channel_for_method(ch)? {
            Some(slot) => slot.assembler.start_flagged(m, problem),
            None => Ok(()), // closing: ignored like its content frames
        }
    }

    /// The open, idle channel a method on `ch` (not 0) is for; `None` when it must be
    /// ignored (connection or channel closing).
    fn channel_for_method(&mut self, ch: u16) -> Result<Option<&mut Slot>, FrameError> {
        if !self.is_open() {
            return Ok(None);
        }
        let Some(slot) = slot_in(&mut self.slots, ch) else {
            return Err(FrameError::new(
                reply_code::CHANNEL_ERROR,
                format!("method on channel {ch} which is not open"),
            ));
        };
        if slot.closing {
            return Ok(None);
        }
        if !slot.assembler.is_idle() {
            return Err(FrameError::new(
                reply_code::UNEXPECTED_FRAME,
                format!("method frame on channel {ch} in the middle of a content"),
            ));
        }
        Ok(Some(slot))
    }

    fn on_method(&mut self, ch: u16, m: AMQPClass, now: Instant) -> Result<(), FrameError> {
        if ch == 0 {
            return self.on_connection_method(m, now);
        }
        if !self.is_open() {
            return Ok(());
        }
        // A closing channel ignores content frames (see `on_content_frame`), so a content
        // cut off by our channel.close must not make its close-ok look out of order.
        if slot_in(&mut self.slots, ch).is_some_and(|s| s.closing) {
            self.on_closing_channel_method(ch, m);
            return Ok(());
        }
        if self.channel_for_method(ch)?.is_none() {
            return Ok(());
        }
        match m {
            AMQPClass::Basic(b) => self.on_basic_method(ch, b),
            AMQPClass::Channel(c) => self.on_channel_method(ch, c),
            AMQPClass::Connection(_) => Err(FrameError::new(
                reply_code::COMMAND_INVALID,
                format!("connection method on channel {ch}"),
            )),
            reply => self.on_reply(ch, reply),
        }
    }

    /// A method on a channel we are closing: only its close-ok or a crossing close count.
    fn on_closing_channel_method(&mut self, ch: u16, m: AMQPClass) {
        match m {
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                self.finish_channel(ch, Error::ChannelClosed(ch));
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                self.conn.event(ConnectionEventKind::ChannelClosed {
                    channel: ch,
                    reply_code: c.reply_code,
                    reply_text: c.reply_text.to_string(),
                });
                method_bytes(
                    &mut self.out,
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                self.finish_channel(ch, server_channel_error(ch, &c));
            }
            _ => {} // the channel is going away; the broker discards too
        }
    }

    /// `basic.*` on an open channel, idle between contents.
    fn on_basic_method(&mut self, ch: u16, m: basic::AMQPMethod) -> Result<(), FrameError> {
        use basic::AMQPMethod as B;
        let Some(slot) = slot_in(&mut self.slots, ch) else {
            return Ok(()); // checked by `on_method`
        };
        match m {
            B::Deliver(d) => slot.assembler.start(ContentMethod::Deliver {
                consumer_tag: d.consumer_tag.to_string(),
                delivery_tag: d.delivery_tag,
                redelivered: d.redelivered,
                exchange: d.exchange.to_string(),
                routing_key: d.routing_key.to_string(),
            }),
            B::GetOk(g) => slot.assembler.start(ContentMethod::GetOk {
                delivery_tag: g.delivery_tag,
                redelivered: g.redelivered,
                exchange: g.exchange.to_string(),
                routing_key: g.routing_key.to_string(),
                message_count: g.message_count,
            }),
            B::Return(r) => slot.assembler.start(ContentMethod::Return {
                reply_code: r.reply_code,
                reply_text: r.reply_text.to_string(),
                exchange: r.exchange.to_string(),
                routing_key: r.routing_key.to_string(),
            }),
            B::Ack(a) => {
                settle_confirms(slot, &mut self.wakes, "basic.ack", a.delivery_tag, a.multiple, true)
            }
            B::Nack(n) => settle_confirms(
                slot,
                &mut self.wakes,
                "basic.nack",
                n.delivery_tag,
                n.multiple,
                false,
            ),
            B::Cancel(c) => {
                let tag = c.consumer_tag.to_string();
                if let Some(sink) = slot.consumers.remove(&tag) {
                    slot.gauges.consumer_removed();
                    crate::trace::info!("broker cancelled consumer {tag:?} on channel {ch}");
                    self.conn.event(ConnectionEventKind::ConsumerCancelled {
                        channel: ch,
                        tag: tag.clone(),
                        queue: sink.queue.to_string(),
                    });
                    sink.end(Error::ConsumerCancelled {
                        tag: tag.clone(),
                        reason: "the broker cancelled the consumer (queue deleted or unavailable)"
                            .into(),
                    });
                }
                if !c.nowait {
                    method_bytes(
                        &mut self.out,
                        ch,
                        AMQPClass::Basic(B::CancelOk(basic::CancelOk {
                            consumer_tag: tag.into(),
                        })),
                    );
                }
                Ok(())
            }
            reply => self.on_reply(ch, AMQPClass::Basic(reply)),
        }
    }

    /// `channel.*` on an open channel, idle between contents.
    fn on_channel_method(&mut self, ch: u16, m: channel::AMQPMethod) -> Result<(), FrameError> {
        use channel::AMQPMethod as Ch;
        match m {
            Ch::Close(c) => {
                let err = server_channel_error(ch, &c);
                crate::trace::warn!("{err}");
                self.conn.event(ConnectionEventKind::ChannelClosed {
                    channel: ch,
                    reply_code: c.reply_code,
                    reply_text: c.reply_text.to_string(),
                });
                method_bytes(
                    &mut self.out,
                    ch,
                    AMQPClass::Channel(Ch::CloseOk(channel::CloseOk {})),
                );
                self.finish_channel(ch, err);
                Ok(())
            }
            Ch::Flow(f) => {
                crate::trace::info!("broker set flow active={} on channel {ch}", f.active);
                method_bytes(
                    &mut self.out,
                    ch,
                    AMQPClass::Channel(Ch::FlowOk(channel::FlowOk { active: f.active })),
                );
                Ok(())
            }
            Ch::CloseOk(_) => Err(FrameError::new(
                reply_code::UNEXPECTED_FRAME,
                format!("channel.close-ok on channel {ch} which was not closing"),
            )),
            reply => self.on_reply(ch, AMQPClass::Channel(reply)),
        }
    }

    /// The reply to the oldest RPC waiting on channel `ch`.
    fn on_reply(&mut self, ch: u16, reply: AMQPClass) -> Result<(), FrameError> {
        use basic::AMQPMethod as B;
        let Some(slot) = slot_in(&mut self.slots, ch) else {
            return Ok(()); // checked by `on_method`
        };
        let ids = (reply.get_amqp_class_id(), reply.get_amqp_method_id());
        let Some(p) = take_pending(&mut slot.pending, ids) else {
            return Err(FrameError::new(
                reply_code::UNEXPECTED_FRAME,
                format!("reply {reply:?} on channel {ch} without a request"),
            ));
        };
        let mut consumed = None;
        if let AMQPClass::Basic(B::ConsumeOk(ok)) = &reply
            && let Some(sink) = p.consumer
        {
            slot.had_no_ack |= sink.no_ack;
            if !slot.consumers.insert(ok.consumer_tag.to_string(), sink) {
                slot.gauges.consumer_added();
            }
            consumed = Some(ok.consumer_tag.clone());
        }
        if let AMQPClass::Basic(B::CancelOk(ok)) = &reply {
            let tag = ok.consumer_tag.to_string();
            if let Some(sink) = slot.consumers.remove(&tag) {
                slot.gauges.consumer_removed();
                sink.end(Error::ConsumerCancelled {
                    tag,
                    reason: "cancelled by the application".into(),
                });
            }
        }
        let reply = if let AMQPClass::Basic(B::GetEmpty(_)) = reply {
            Reply::Get(None)
        } else {
            Reply::Method(reply)
        };
        // The waiter may have timed out and left: nothing to do then, unless it was a
        // basic.consume. Nobody will ever take that consumer's deliveries: cancel it at
        // the broker, or they would bounce (requeued) forever.
        if p.reply.send(Ok(reply)).is_err()
            && let Some(tag) = consumed
        {
            if let Some(sink) = slot.consumers.get(tag.as_str()) {
                sink.shared.active.store(false, Ordering::Release);
            }
            method_bytes(
                &mut self.out,
                ch,
                AMQPClass::Basic(B::Cancel(basic::Cancel {
                    consumer_tag: tag,
                    nowait: true,
                })),
            );
        }
        Ok(())
    }

    /// Remove a channel for good: wake its waiters with `reason`, free its id.
    fn finish_channel(&mut self, ch: u16, reason: Error) {
        if let Some(mut slot) = self.slots.get_mut(ch as usize).and_then(Option::take) {
            slot.gauges.release();
            // Free the id before waking anyone: a thread whose `close()` returns may open a
            // channel at once, and at `channel_max` it needs this id.
            self.conn.ids.lock().free(ch);
            slot.shared.set_closed(reason);
            // The channel handle keeps clones of its consumers' senders (for recovery), so
            // dropping the slot wakes nobody: end each consumer with the channel's reason.
            for (_, sink) in &slot.consumers.0 {
                sink.end(slot.shared.error());
            }
            if let Some(r) = slot.close_reply {
                let _ = r.send(Ok(Reply::Method(AMQPClass::Channel(
                    channel::AMQPMethod::CloseOk(channel::CloseOk {}),
                ))));
            }
            if self.stalled.as_ref().is_some_and(|s| s.channel == ch) {
                self.stalled = None;
            }
        }
    }

    fn on_connection_method(&mut self, m: AMQPClass, _now: Instant) -> Result<(), FrameError> {
        use connection::AMQPMethod as C;
        match m {
            AMQPClass::Connection(C::Close(c)) => {
                self.on_server_close(&c);
                Ok(())
            }
            AMQPClass::Connection(C::CloseOk(_)) => match self.end_closing() {
                Some(outcome) => {
                    crate::trace::debug!("connection closed");
                    self.state = State::Done(outcome);
                    Ok(())
                }
                None => Err(FrameError::new(
                    reply_code::UNEXPECTED_FRAME,
                    "connection.close-ok without a close",
                )),
            },
            AMQPClass::Connection(C::Blocked(b)) => {
                crate::trace::warn!("broker blocked the connection: {}", b.reason);
                self.blocked = true;
                self.conn.set_blocked(Some(b.reason.to_string()));
                self.conn.event(ConnectionEventKind::Blocked {
                    reason: b.reason.to_string(),
                });
                Ok(())
            }
            AMQPClass::Connection(C::Unblocked(_)) => {
                crate::trace::info!("broker unblocked the connection");
                self.blocked = false;
                self.conn.set_blocked(None);
                self.conn.event(ConnectionEventKind::Unblocked);
                Ok(())
            }
            AMQPClass::Connection(C::UpdateSecretOk(ok)) => {
                if let Some(reply) = self.update_secret.pop_front() {
                    let _ = reply.send(Ok(Reply::Method(AMQPClass::Connection(
                        C::UpdateSecretOk(ok),
                    ))));
                }
                Ok(())
            }
            _ if !self.is_open() => Ok(()),
            other => Err(FrameError::new(
                reply_code::COMMAND_INVALID,
                format!("unexpected method on channel 0 after the handshake: {other:?}"),
            )),
        }
    }

    /// The broker closes the connection: answer, and end with its reason (or with ours
    /// when the closes crossed).
    fn on_server_close(&mut self, c: &connection::Close) {
        let err = Error::ServerClosedConnection {
            code: c.reply_code,
            text: c.reply_text.to_string(),
            class_id: c.class_id,
            method_id: c.method_id,
        };
        crate::trace::warn!("{err}");
        method_bytes(
            &mut self.out,
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        );
        let err = self.end_closing().unwrap_or(err);
        self.fail(err);
    }

    /// If we are closing: answer the waiter of our close and return the outcome; the
    /// state is left to the caller to set. Otherwise `None`, state unchanged.
    fn end_closing(&mut self) -> Option<Error> {
        match std::mem::replace(&mut self.state, State::Open) {
            State::Closing { outcome, reply, .. } => {
                if let Some(r) = reply {
                    let _ = r.send(Ok(Reply::Method(AMQPClass::Connection(
                        connection::AMQPMethod::CloseOk(connection::CloseOk {}),
                    ))));
                }
                Some(outcome)
            }
            other => {
                self.state = other;
                None
            }
        }
    }

    // ---------------- content dispatch ----------------

    fn on_content(&mut self, ch: u16, c: Content) {
        let Some(slot) = slot_in(&mut self.slots, ch) else {
            return;
        };
        match c.method {
            ContentMethod::Deliver {
                consumer_tag,
                delivery_tag,
                redelivered,
                exchange,
                routing_key,
            } => {
                Stats::add(&slot.shared.conn.stats.delivered, 1);
                let acker = Acker::new(slot.shared.clone(), delivery_tag);
                let msg = consumer_msg(
                    acker,
                    c.properties,
                    c.body,
                    exchange,
                    routing_key,
                    redelivered,
                );
                self.deliver(ch, consumer_tag, msg, self.clock);
            }
            ContentMethod::GetOk { .. } => self.on_get_ok(ch, c),
            ContentMethod::Return {
                reply_code,
                reply_text,
                exchange,
                routing_key,
            } => queue_return(
                &slot.shared,
                ch,
                Returned {
                    reply_code,
                    reply_text,
                    exchange,
                    routing_key,
                    properties: c.properties.map_err(bad_kind),
                    body: c.body,
                },
            ),
        }
    }

    /// A whole `basic.get-ok`: the reply to the oldest RPC of the channel.
    fn on_get_ok(&mut self, ch: u16, c: Content) {
        let Some(p) =
            slot_in(&mut self.slots, ch).and_then(|s| take_pending(&mut s.pending, (60, 71)))
        else {
            self.violation(
                FrameError::new(reply_code::UNEXPECTED_FRAME, "basic.get-ok without a get"),
                Instant::now(),
            );
            return;
        };
        Stats::add(&self.conn.stats.delivered, 1);
        let _ = p.reply.send(Ok(Reply::Get(Some(Box::new(c)))));
    }

    /// Hand a delivery that arrived at `received` to its consumer (or stall on a full
    /// queue, or requeue it when the consumer is gone).
    fn deliver(&mut self, ch: u16, tag: String, mut msg: ConsumerMsg, received: Instant) {
        let Some(slot) = self
            .slots
            .get_mut(ch as usize)
            .and_then(|s| s.as_deref_mut())
        else {
            return;
        };
        let Some(sink) = slot.consumers.get(&tag) else {
            self.orphan(ch, &tag, &msg);
            return;
        };
        if !sink.is_active() && sink.shared.queued.load(Ordering::Acquire) >= sink.shared.capacity {
            // A cancelled consumer no longer holds reading back, so its queue must not grow
            // past its bound either (a peer may go on delivering before its cancel-ok).
            crate::trace::warn!("delivery for cancelled consumer {tag:?} on channel {ch} over its bound");
            if !sink.no_ack {
                self.requeue(ch, &msg);
            }
            return;
        }
        let cost = msg_cost(&msg);
        if !has_room(sink, cost, &self.queued_bytes) {
            self.stalled = Some(Stalled {
                channel: ch,
                tag,
                msg,
                received,
            });
            return;
        }
        msg.charge(cost, sink.shared.clone(), self.queued_bytes.clone());
        let tracked = match (&slot.shared.unacked, &msg) {
            (Some(_), ConsumerMsg::Delivery(d)) if !sink.no_ack => Some(d.acker.delivery_tag),
            (Some(_), ConsumerMsg::Bad(b)) if !sink.no_ack => Some(b.acker.delivery_tag),
            _ => None,
        };
        if let (Some(tag), Some(t)) = (tracked, &slot.shared.unacked) {
            // Noted before the push: once queued, its ack may come at any moment.
            t.arrived(tag, received);
        }
        let pushed = sink.push_quiet(msg);
        if let Ok(Some(owed)) = pushed {
            self.consumer_wakes.push(owed);
        } else if let Err(mut msg) = pushed {
            msg.release();
            if let (Some(tag), Some(t)) = (tracked, &slot.shared.unacked) {
                // The consumer is gone and the delivery is requeued below: the
                // application never saw it, so there is nothing to warn about.
                t.settled(tag, false);
            }
            if !sink.no_ack {
                crate::trace::debug!("consumer {tag:?} on channel {ch} is gone; delivery requeued");
                self.requeue(ch, &msg);
            }
        }
    }

    /// Wake the consumer threads that slept through deliveries queued for them since
    /// the last call (see [`Engine::on_frame_batched`]).
    pub(crate) fn wake_consumers(&mut self) {
        for n in self.consumer_wakes.drain(..) {
            n.wake();
        }
    }

    /// Try again to hand over a stalled delivery. True when reading may resume.
    pub(crate) fn retry_stalled(&mut self) -> bool {
        let r = self.retry_stalled_quiet();
        self.wake_consumers();
        r
    }

    fn retry_stalled_quiet(&mut self) -> bool {
        let Some(s) = self.stalled.take() else {
            return true;
        };
        let cost = msg_cost(&s.msg);
        let full = self
            .slots
            .get(s.channel as usize)
            .and_then(|s| s.as_deref())
            .and_then(|slot| slot.consumers.get(&s.tag))
            .map(|sink| !has_room(sink, cost, &self.queued_bytes));
        match full {
            Some(true) => {
                self.stalled = Some(s);
                false
            }
            _ => {
                self.deliver(s.channel, s.tag, s.msg, s.received);
                self.stalled.is_none()
            }
        }
    }

    /// A delivery for no consumer of ours: an unknown tag, a channel without consumers, a
    /// consumer whose cancel-ok came already. Left alone it would stay unacknowledged
    /// until the channel closes: reject it (requeue) so another consumer gets it, count
    /// it, and log once per burst. Only on a channel that never had a no-ack consumer:
    /// there every delivery needs settling, while a reject of a no-ack delivery would
    /// close the channel (406 unknown delivery tag).
    fn orphan(&mut self, ch: u16, tag: &str, msg: &ConsumerMsg) {
        let now = self.clock;
        let Some(slot) = slot_in(&mut self.slots, ch) else {
            return;
        };
        let n = slot
            .shared
            .orphan_deliveries
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let reject = !slot.had_no_ack;
        if slot
            .orphan_logged
            .is_none_or(|at| now.duration_since(at) >= ORPHAN_LOG_EVERY)
        {
            slot.orphan_logged = Some(now);
            crate::trace::warn!(
                "channel {ch}: delivery for unknown consumer {tag:?} {} ({n} so far on this \
                 channel; further ones within {ORPHAN_LOG_EVERY:?} are not logged)",
                if reject {
                    "rejected with requeue"
                } else {
                    "dropped (a no-ack consumer was here: a reject could close the channel)"
                }
            );
        }
        if reject {
            self.requeue(ch, msg);
        }
    }

    fn requeue(&mut self, ch: u16, msg: &ConsumerMsg) {
        let tag = match msg {
            ConsumerMsg::Delivery(d) => d.acker.delivery_tag,
            ConsumerMsg::Bad(b) => b.acker.delivery_tag,
            ConsumerMsg::End(_) | ConsumerMsg::Lost(_) => return,
        };
        method_bytes(
            &mut self.out,
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Reject(basic::Reject {
                delivery_tag: tag,
                requeue: true,
            })),
        );
    }
}

fn bad_kind(p: ContentProblem) -> BadDeliveryKind {
    match p {
        ContentProblem::Undecodable(s) => BadDeliveryKind::Undecodable(s),
        ContentProblem::TooLarge { size, max } => BadDeliveryKind::TooLarge { size, max },
    }
}

/// True if a delivery of `cost` bytes fits its consumer's queue (count and bytes) and the
/// connection's byte bound; if not, the I/O thread is registered to be woken when it may.
/// A cancelled or dropped consumer never holds reading back (see `QueueShared::is_full`).
fn has_room(sink: &ConsumerSink, cost: usize, conn: &ByteBudget) -> bool {
    if !sink.is_active() {
        return true;
    }
    sink.shared.reserve_or_wait()
        && sink.shared.bytes.reserve_or_wait(cost)
        && conn.reserve_or_wait(cost)
}

/// What a queued message costs in memory, decoded: the body, the properties (headers
/// may decode to many times their wire size), the names and the boxed struct.
fn msg_cost(msg: &ConsumerMsg) -> usize {
    match msg {
        ConsumerMsg::Delivery(d) => {
            std::mem::size_of::<Delivery>()
                + d.body.capacity()
                + properties_heap(&d.properties)
                + d.exchange.capacity()
                + d.routing_key.capacity()
        }
        ConsumerMsg::Bad(b) => {
            std::mem::size_of::<BadDelivery>()
                + b.body.capacity()
                + b.exchange.capacity()
                + b.routing_key.capacity()
                + match &b.kind {
                    BadDeliveryKind::Undecodable(s) => s.capacity(),
                    BadDeliveryKind::TooLarge { .. } => 0,
                }
        }
        ConsumerMsg::Lost(_) | ConsumerMsg::End(_) => 0,
    }
}

/// What a consumer gets for a delivered content: the delivery, or a bad delivery it can
/// still ack or reject when the properties could not be decoded.
fn consumer_msg(
    acker: Acker,
    properties: Result<BasicProperties, ContentProblem>,
    body: Vec<u8>,
    exchange: String,
    routing_key: String,
    redelivered: bool,
) -> ConsumerMsg {
    match properties {
        Ok(properties) => ConsumerMsg::Delivery(Box::new(Delivery {
            body,
            properties,
            exchange,
            routing_key,
            redelivered,
            message_count: None,
            acker,
            charge: Charge::default(),
        })),
        Err(p) => {
            let bad = BadDelivery {
                kind: bad_kind(p),
                body,
                exchange,
                routing_key,
                redelivered,
                acker: Arc::new(acker),
                charge: Charge::default(),
            };
            crate::trace::warn!("{bad}");
            ConsumerMsg::Bad(Box::new(bad))
        }
    }
}

/// Queue a returned message for the channel's handle, unless too many wait unread or
/// the channel's handle is done with returns (it closed the channel: the queue ended).
fn queue_return(shared: &ChannelShared, ch: u16, r: Returned) {
    let stats = &shared.conn.stats;
    Stats::add(&stats.returned, 1);
    let cost = r.cost();
    let bytes = shared.returns_bytes.load(Ordering::Acquire);
    let byte_limit = shared.conn.opts.consumer_queue_bytes;
    // Returns are not worth stopping the connection for: over either bound they are
    // dropped (an empty queue always takes one).
    let full = shared.returns.len() >= RETURNS_CAPACITY || (bytes > 0 && bytes + cost > byte_limit);
    let r = if full {
        r
    } else {
        shared.returns_bytes.fetch_add(cost, Ordering::AcqRel);
        match shared.returns.send(r) {
            None => return,
            Some(r) => {
                shared.returns_bytes.fetch_sub(cost, Ordering::AcqRel);
                r
            }
        }
    };
    let n = shared.returns_dropped.fetch_add(1, Ordering::Relaxed) + 1;
    Stats::add(&stats.returns_dropped, 1);
    // One event at the 1st, 2nd, 4th, ... drop: the loss is seen, the log not flooded.
    if n.is_power_of_two() {
        shared.conn.event(ConnectionEventKind::ReturnsDropped {
            channel: ch,
            dropped: n as u64,
        });
    }
    if full {
        crate::trace::error!(
            "channel {ch}: returned message to {:?}/{:?} dropped: {} returns ({bytes} bytes) \
             are queued unread, the bound is {RETURNS_CAPACITY} and {byte_limit} bytes \
             ({n} dropped so far)",
            r.exchange,
            r.routing_key,
            shared.returns.len(),
        );
    } else {
        crate::trace::error!(
            "channel {ch}: returned message to {:?}/{:?} dropped: the application closed \
             the channel before it came ({n} dropped so far)",
            r.exchange,
            r.routing_key,
        );
    }
}

/// `basic.ack` / `basic.nack` in confirm mode: settle the messages it names (counted
/// before any waiter wakes), their waiters to be woken with `wakes`.
fn settle_confirms(
    slot: &Slot,
    wakes: &mut Wakes,
    what: &str,
    tag: u64,
    multiple: bool,
    ack: bool,
) -> Result<(), FrameError> {
    check_confirm(slot.shared.id, &slot.shared, what, tag, multiple)?;
    let stats = &slot.shared.conn.stats;
    let counter = if ack { &stats.confirmed } else { &stats.nacked };
    slot.shared
        .confirms
        .resolve_into(tag, multiple, ack, |n| Stats::add(counter, n), wakes);
    Ok(())
}

/// A confirm from the broker must be for a message we published: acking a tag never
/// used (or `multiple` past the last one) would mark real messages confirmed that the
/// broker never saw. That is a protocol violation, not something to guess around.
fn check_confirm(
    ch: u16,
    shared: &ChannelShared,
    what: &str,
    tag: u64,
    multiple: bool,
) -> Result<(), FrameError> {
    if !shared.confirms.is_enabled() {
        return Err(FrameError::new(
            reply_code::COMMAND_INVALID,
            format!("{what} (delivery tag {tag}) on channel {ch}, which is not in confirm mode"),
        ));
    }
    let last = shared.confirms.last_seq();
    // Tag 0 with `multiple` is "all outstanding" in AMQP 0-9-1, not a tag of its own.
    if tag > last || (tag == 0 && !multiple) {
        return Err(FrameError::new(
            reply_code::COMMAND_INVALID,
            format!(
                "{what} for delivery tag {tag}{} on channel {ch}, but the last message \
                 published there has tag {last}",
                if multiple { " (multiple)" } else { "" }
            ),
        ));
    }
    Ok(())
}

/// Channel `ch` if it is registered (open or closing).
fn slot_in(slots: &mut [Option<Box<Slot>>], ch: u16) -> Option<&mut Slot> {
    slots.get_mut(ch as usize).and_then(|s| s.as_deref_mut())
}

fn server_channel_error(ch: u16, c: &channel::Close) -> Error {
    Error::ServerClosedChannel {
        channel: ch,
        code: c.reply_code,
        text: c.reply_text.to_string(),
        class_id: c.class_id,
        method_id: c.method_id,
    }
}
