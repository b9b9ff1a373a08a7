//! The `engine` target: the inbound side after the handshake, with handle commands between.

mod client;
mod server;

use std::time::{Duration, Instant};

use amq_protocol::frame::{AMQPFrame, parse_frame};
use amq_protocol::protocol::{AMQPClass, connection};

use super::Input;
use crate::delivery::{ConsumerMsg, ConsumerShared};
use crate::error::{Error, reply_code};
use crate::io::engine::Engine;
use crate::io::{ChannelShared, Command, ConnShared, RETURNS_CAPACITY, Reply, ReplyRx, Tuned};
use crate::options::{
    ConnectionOptions, DEFAULT_CONNECTION_QUEUE_BYTES, DEFAULT_CONSUMER_QUEUE_BYTES,
    DEFAULT_MAX_OUTPUT_BYTES,
};
use crate::protocol::frame::{FRAME_MIN_SIZE, FrameDecoder, READ_CHUNK};
use crate::protocol::table::FieldTable;
use crate::sync::lightq::{self, TryRecvError};
use crate::sync::oneshot::RecvError;
use crate::sync::queue::{self, Receiver};
use crate::sync::{Arc, Ordering};

/// The largest reply the engine may append for one inbound frame (a `connection.close`
/// with 200 bytes of text, a `cancel-ok` with a 255-byte tag, a `reject`, ...).
const MAX_REPLY_PER_FRAME: usize = 512;

struct FuzzConsumer {
    channel: u16,
    rx: lightq::Receiver<ConsumerMsg>,
    shared: Arc<ConsumerShared>,
}

struct FuzzChannel {
    id: u16,
    shared: Arc<ChannelShared>,
}

/// The byte bounds of a run: lepus's defaults, or small ones chosen by the input.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    /// Chosen by the input (not lepus's defaults).
    small: bool,
    consumer_queue_bytes: usize,
    connection_queue_bytes: usize,
    max_output_bytes: usize,
    /// The broker reads what we send while it sends (else only the step that drains
    /// the output takes it, and reading stalls on a full output until then).
    reader: bool,
}

impl Bounds {
    /// `class` 0 keeps the defaults (what every input saved before the bounds existed
    /// gets: its depth byte was below 70); 1 to 3 choose small bounds from `seed`.
    fn choose(class: u8, seed: u8) -> Self {
        if class == 0 {
            return Bounds {
                small: false,
                consumer_queue_bytes: DEFAULT_CONSUMER_QUEUE_BYTES,
                connection_queue_bytes: DEFAULT_CONNECTION_QUEUE_BYTES,
                max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
                reader: false,
            };
        }
        let unit = [64, 512, 4096][usize::from(class - 1) % 3];
        let pick = |bits: u8| 1 + usize::from(bits & 3) * 2 * unit;
        Bounds {
            small: true,
            consumer_queue_bytes: pick(seed),
            connection_queue_bytes: pick(seed >> 2) * 2,
            // Far below the 64 KiB the builder allows: the engine must hold it anyway.
            max_output_bytes: unit * (1 + 3 * usize::from(seed >> 4 & 1)),
            reader: seed & 0x20 != 0,
        }
    }
}

struct EngineHarness {
    engine: Engine,
    conn: Arc<ConnShared>,
    decoder: FrameDecoder,
    commands: Receiver<Command>,
    now: Instant,
    frame_max: u32,
    max_message_size: u64,
    channels: Vec<FuzzChannel>,
    consumers: Vec<FuzzConsumer>,
    replies: Vec<ReplyRx>,
    /// `confirm.select` RPCs whose reply has not been seen: the channel's handle turns
    /// confirm mode on when `select-ok` arrives, as `Channel::confirm_select` does.
    selects: Vec<(Arc<ChannelShared>, ReplyRx)>,
    bounds: Bounds,
    /// A generous bound on what one queued message may cost (decoded), for the "one
    /// message over the bound" allowance where the exact count cannot be seen.
    one_msg: usize,
    /// Bytes the handles' commands queued since the socket last took the output (the
    /// output bound is about answers to the broker, not what the application sends).
    cmd_added: usize,
    /// We sent `connection.close` ourselves (reply code 200 is then ours).
    closed_by_us: bool,
    /// A `connection.close` is queued.
    close_sent: bool,
    /// `out` bytes checked so far.
    checked: usize,
    was_open: bool,
    _poll: mio::Poll,
}

impl EngineHarness {
    fn new(inp: &mut Input<'_>) -> Self {
        let cfg = inp.u8();
        let frame_max = [FRAME_MIN_SIZE, 8192, 131_072, 1 << 20][cfg as usize % 4];
        let channel_max = 1 + u16::from(cfg >> 2 & 3);
        let heartbeat = if cfg & 0x10 != 0 {
            0
        } else {
            1 + u16::from(cfg >> 5)
        };
        let size_choice = inp.u8();
        let max_message_size = match size_choice % 4 {
            0 => 0,
            1 => 100,
            2 => 5000,
            _ => 1 << 20,
        };
        // The bound class rides on choice bytes whose values were aliases before (the
        // depth byte was read `% 70`, the size byte `% 4`), so inputs saved before the
        // bounds existed replay unchanged when their depth byte is below 70.
        let depth = inp.u8();
        let bounds = Bounds::choose(depth / 70, size_choice >> 2);
        let opts = ConnectionOptions {
            max_message_size,
            max_table_depth: 1 + usize::from(depth % 70),
            consumer_queue_bytes: bounds.consumer_queue_bytes,
            connection_queue_bytes: bounds.connection_queue_bytes,
            max_output_bytes: bounds.max_output_bytes,
            ..ConnectionOptions::default()
        };
        let poll = mio::Poll::new().expect("a poll instance");
        let waker = mio::Waker::new(poll.registry(), mio::Token(1)).expect("a waker");
        let (cmd_tx, commands) = queue::bounded(256);
        let tuned = Tuned {
            channel_max,
            frame_max,
            heartbeat,
        };
        let conn = Arc::new(ConnShared::new(
            cmd_tx,
            Arc::new(waker),
            tuned,
            opts,
            FieldTable::new(),
        ));
        let now = Instant::now();
        EngineHarness {
            engine: Engine::new(conn.clone(), now),
            conn,
            decoder: FrameDecoder::new(frame_max),
            commands,
            now,
            frame_max,
            max_message_size,
            channels: Vec::new(),
            consumers: Vec::new(),
            replies: Vec::new(),
            selects: Vec::new(),
            bounds,
            // Body, names, boxed struct, and properties decoded from at most one frame
            // (a void in an array is one byte on the wire, a `FieldValue` decoded).
            one_msg: 4096 + 2 * max_message_size as usize + 64 * frame_max as usize,
            cmd_added: 0,
            closed_by_us: false,
            close_sent: false,
            checked: 0,
            was_open: true,
            _poll: poll,
        }
    }

    /// What the reactor does with buffered frames.
    fn process_frames(&mut self) {
        loop {
            let before = self.engine.output().len();
            match self.decoder.next_frame() {
                Ok(Some(f)) => {
                    self.engine.on_frame(f, self.now);
                    assert!(
                        self.engine.output().len() <= before + MAX_REPLY_PER_FRAME,
                        "one frame made the engine queue {} bytes",
                        self.engine.output().len() - before
                    );
                    if self.engine.is_stalled() || self.engine.outcome().is_some() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    assert_eq!(e.code, reply_code::FRAME_ERROR);
                    let err = Error::Protocol {
                        code: e.code,
                        text: e.text.clone(),
                    };
                    self.engine.violation(e, self.now);
                    self.engine.fail(err);
                    return;
                }
            }
        }
    }

    /// The application takes up to `n` messages from a consumer, as `Consumer` does.
    fn take(&mut self, i: usize, n: usize) {
        let Some(c) = self.consumers.get(i) else {
            return;
        };
        for _ in 0..n {
            match c.rx.try_recv() {
                Ok(mut msg) => {
                    // As `Consumer::recv`: the bytes first, then the count.
                    msg.release();
                    c.shared.took_one();
                    match msg {
                        ConsumerMsg::Delivery(d) => {
                            assert!(d.body.len() as u64 <= self.max_message_size);
                            assert_eq!(d.acker.channel_id(), c.channel);
                            if let Some(h) = &d.properties.headers {
                                assert!(h.depth() <= self.conn.opts.max_table_depth);
                            }
                        }
                        ConsumerMsg::Bad(b) => {
                            assert!(b.body.len() as u64 <= self.max_message_size);
                            assert_eq!(b.acker.channel_id(), c.channel);
                        }
                        _ => {}
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// The socket has bytes: read them like the reactor, in chunks the decoder offers.
    fn feed(&mut self, mut bytes: &[u8]) {
        while self.engine.outcome().is_none() {
            if !self.engine.retry_stalled() {
                // Reading stops while a consumer's queue is full; the application takes
                // what is queued, which wakes the I/O thread.
                for i in 0..self.consumers.len() {
                    self.take(i, usize::MAX);
                }
                if !self.engine.retry_stalled() {
                    return;
                }
            }
            // Unlike `Reactor::read`, which goes on to buffered frames whenever no
            // delivery is stalled: with the output over its bound the reactor answers one
            // more frame per turn of its loop.
            if self.engine.is_stalled() && self.bounds.reader {
                self.drain_output();
            }
            if self.engine.is_stalled() {
                return;
            }
            self.process_frames();
            if bytes.is_empty() || self.engine.is_stalled() || self.engine.outcome().is_some() {
                return;
            }
            let buf = self.decoder.read_buf();
            assert!(!buf.is_empty(), "read_buf offers no room");
            let n = buf.len().min(bytes.len());
            buf[..n].copy_from_slice(&bytes[..n]);
            self.decoder.filled(n);
            bytes = &bytes[n..];
            self.engine.received(self.now);
            self.process_frames();
        }
    }

    fn command(&mut self, cmd: Command) {
        let len = match &cmd {
            Command::Send(b) => b.len(),
            Command::SendShared(b) => b.len(),
            Command::Rpc { bytes, .. }
            | Command::OpenChannel { bytes, .. }
            | Command::CloseChannel { bytes, .. }
            | Command::UpdateSecret { bytes, .. }
            | Command::Close { bytes, .. } => bytes.len(),
        };
        let before = self.engine.output().len();
        self.engine.on_command(cmd, self.now);
        let after = self.engine.output().len();
        assert!(after <= before + len);
        self.cmd_added += after.saturating_sub(before);
    }

    /// The socket took everything queued for it.
    fn drain_output(&mut self) {
        self.engine.take_output();
        self.checked = 0;
        self.cmd_added = 0;
    }

    /// A `select-ok` came for a `confirm.select`: that channel is now in confirm mode.
    fn poll_selects(&mut self) {
        self.selects.retain(|(shared, rx)| match rx.try_recv() {
            Some(Ok(Reply::Method(AMQPClass::Confirm(_)))) => {
                shared.confirms.enable();
                false
            }
            Some(_) => false,
            None => true,
        });
    }

    /// The application takes up to `n` returned messages from channel `i`, as
    /// `Channel::try_recv_return` does.
    fn take_returns(&mut self, i: usize, n: usize) {
        let Some(ch) = self.channels.get(i) else {
            return;
        };
        for _ in 0..n {
            let Some(r) = ch.shared.returns.try_recv() else {
                return;
            };
            ch.shared
                .returns_bytes
                .fetch_sub(r.cost(), Ordering::AcqRel);
        }
    }

    /// The byte bounds: each consumer's queue, the connection's total, the returns, the
    /// output (answers to the broker; the handles' own commands aside).
    fn check_bytes(&self) {
        let b = self.bounds;
        let mut sum = 0;
        let mut unchecked = 0;
        for c in &self.consumers {
            let q = c.shared.bytes.queued();
            sum += q;
            if c.shared.active.load(Ordering::Acquire) && b.small {
                // Over the bound only with one message alone (an empty queue takes one
                // message whatever its size).
                assert!(
                    q <= b.consumer_queue_bytes || c.rx.len() <= 1,
                    "consumer queue holds {q} bytes in {} messages, over its bound {}",
                    c.rx.len(),
                    b.consumer_queue_bytes
                );
            } else {
                // A cancelled consumer no longer holds reading back: its queue is bounded
                // by its count only (see `Engine::deliver`).
                unchecked += q;
            }
        }
        let total = self.engine.queued_bytes();
        assert_eq!(
            total, sum,
            "connection byte total out of step with its consumers'"
        );
        assert!(
            total <= b.connection_queue_bytes + unchecked + self.one_msg,
            "connection queues hold {total} bytes, over the bound {}",
            b.connection_queue_bytes
        );
        for ch in &self.channels {
            let r = ch.shared.returns_bytes.load(Ordering::Acquire);
            assert!(
                r <= b.consumer_queue_bytes || ch.shared.returns.len() <= 1,
                "returns hold {r} bytes in {} messages, over the bound {}",
                ch.shared.returns.len(),
                b.consumer_queue_bytes
            );
        }
        let out = self.engine.output().len();
        assert!(
            out <= b.max_output_bytes + MAX_REPLY_PER_FRAME + self.cmd_added,
            "{out} bytes of output ({} from commands), over the bound {}",
            self.cmd_added,
            b.max_output_bytes
        );
        if out >= b.max_output_bytes {
            assert!(
                self.engine.is_stalled(),
                "output over its bound, reading goes on"
            );
        }
    }

    /// Invariants after every step.
    fn check(&mut self) {
        assert!(self.decoder.capacity() <= self.frame_max as usize + READ_CHUNK);
        for c in &self.consumers {
            let queued = c.shared.queued.load(Ordering::Acquire);
            assert_eq!(
                queued,
                c.rx.len(),
                "consumer count out of step with its queue"
            );
            // Deliveries stop at the capacity; at most one end-of-consumer message more.
            assert!(
                queued <= c.shared.capacity + 1,
                "consumer queue {queued} over its capacity {}",
                c.shared.capacity
            );
        }
        for ch in &self.channels {
            assert!(ch.shared.returns.len() <= RETURNS_CAPACITY);
        }
        self.check_bytes();
        if self.engine.outcome().is_some() || !self.engine.is_open() {
            assert!(self.conn.is_failed(), "engine ended without recording why");
        }
        if !self.was_open {
            assert!(!self.engine.is_open(), "a closing connection reopened");
        }
        // Everything queued for the broker is well-formed, and once a `connection.close`
        // is queued only close traffic and heartbeats follow.
        let mut rest = &self.engine.output()[self.checked..];
        while !rest.is_empty() {
            let (next, frame) = match parse_frame(rest) {
                Ok(ok) => ok,
                Err(e) => panic!("engine queued a malformed frame: {e}"),
            };
            match &frame {
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                    if c.reply_code == reply_code::REPLY_SUCCESS {
                        assert!(self.closed_by_us, "close 200 that we did not ask for");
                    } else {
                        assert!(
                            (500..600).contains(&c.reply_code),
                            "violation closed with code {}",
                            c.reply_code
                        );
                    }
                    assert!(!self.close_sent, "connection.close sent twice");
                    self.close_sent = true;
                }
                AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))
                | AMQPFrame::Heartbeat => {}
                other => assert!(!self.close_sent, "frame after connection.close: {other:?}"),
            }
            rest = next;
        }
        self.checked = self.engine.output().len();
        self.was_open = self.engine.is_open();
        // The socket takes everything now and then; the buffer must not grow unseen.
        if self.engine.output().len() > 1 << 20 {
            self.drain_output();
        }
    }
}

/// Harness: the whole inbound side after the handshake. Server frames (synthesized from
/// the input, or raw input bytes) go through a [`FrameDecoder`] into the engine exactly
/// as the reactor passes them, interleaved with commands a handle would send (open a
/// channel, consume, get, declare, publish, close), an application taking deliveries,
/// timers and the socket taking the output.
///
/// Checks: the engine keeps going or ends in a clean error state (recorded failure, a
/// `connection.close` with a 5xx code for a violation, nothing but close traffic after
/// it, every waiter woken at the end); all output is well-formed frames; memory stays
/// bounded (decoder buffer, output per frame, consumer queues within their capacity,
/// returned messages within theirs).
pub fn engine(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut h = EngineHarness::new(&mut inp);
    let mut steps = 0;
    while !inp.is_empty() && steps < 2000 && h.engine.outcome().is_none() {
        steps += 1;
        while let Ok(cmd) = h.commands.try_recv() {
            h.command(cmd);
        }
        h.poll_selects();
        match inp.u8() % 16 {
            0..=5 => {
                let mut bytes = Vec::new();
                for _ in 0..1 + inp.below(4) {
                    bytes.extend_from_slice(&h.server_frame(&mut inp));
                }
                h.feed(&bytes);
            }
            6 | 7 => {
                let n = inp.below(600);
                let raw = inp.bytes(n);
                h.feed(raw);
            }
            8 => h.open_channel(),
            9 | 10 => h.rpc(&mut inp),
            11 => h.publish(&mut inp),
            12 => {
                let i = inp.below(h.consumers.len());
                let k = inp.u8();
                match k % 8 {
                    0 => h.cancel_consumer(i, false),
                    1 => h.cancel_consumer(i, true),
                    // Values 8 apart were the same choice before returns could be taken.
                    _ if k >= 240 => {
                        let i = inp.below(h.channels.len());
                        let n = inp.below(4);
                        h.take_returns(i, n);
                    }
                    _ => {
                        let n = inp.below(4);
                        h.take(i, n);
                    }
                }
            }
            13 => {
                h.now += Duration::from_millis(u64::from(inp.u16()) * 20);
                let next = h.engine.on_timer(h.now);
                assert!(next <= h.now + Duration::from_secs(3600));
            }
            14 => h.close(&mut inp),
            _ => h.drain_output(),
        }
        h.check();
    }

    // The end: either still open, or closing/done for a recorded reason. Then the socket
    // goes away, and every waiter must wake.
    if h.engine.is_open() {
        assert!(!h.conn.is_failed());
    } else {
        let e = h.conn.error();
        assert!(!e.to_string().is_empty());
        if let Error::Protocol { code, .. } = e {
            assert!((500..600).contains(&code));
        }
    }
    h.now += h.conn.opts.close_timeout + Duration::from_secs(1);
    h.engine.on_timer(h.now);
    assert!(
        h.engine.is_open() || h.engine.outcome().is_some(),
        "close did not end at its deadline"
    );
    h.engine.fail(Error::ConnectionLost(
        "the broker closed the TCP connection".into(),
    ));
    assert!(h.engine.outcome().is_some() && h.conn.is_failed());
    h.check();
    for rx in &h.replies {
        assert!(
            !matches!(rx.recv_deadline(Instant::now()), Err(RecvError::Timeout)),
            "an RPC waiter was not woken when the connection ended"
        );
    }
    for i in 0..h.channels.len() {
        h.take_returns(i, usize::MAX);
        let ch = &h.channels[i].shared;
        assert_eq!(
            ch.returns_bytes.load(Ordering::Acquire),
            0,
            "returns' bytes kept"
        );
    }
    for (_, rx) in &h.selects {
        assert!(
            !matches!(rx.recv_deadline(Instant::now()), Err(RecvError::Timeout)),
            "a confirm.select waiter was not woken when the connection ended"
        );
    }
    for i in 0..h.consumers.len() {
        h.take(i, usize::MAX);
        assert_eq!(
            h.consumers[i].shared.bytes.queued(),
            0,
            "a consumer's bytes kept with its queue empty"
        );
        assert!(
            matches!(
                h.consumers[i].rx.try_recv(),
                Err(TryRecvError::Disconnected)
            ),
            "a consumer was not woken when the connection ended"
        );
    }
    assert_eq!(
        h.engine.queued_bytes(),
        0,
        "connection's bytes kept, all taken"
    );
    for ch in &h.channels {
        assert!(ch.shared.is_closed());
    }
}
