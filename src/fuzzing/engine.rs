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
use crate::io::{ChannelShared, Command, ConnShared, RETURNS_CAPACITY, ReplyRx, Tuned};
use crate::options::ConnectionOptions;
use crate::protocol::frame::{FRAME_MIN_SIZE, FrameDecoder, READ_CHUNK};
use crate::protocol::table::FieldTable;
use crate::sync::oneshot::RecvError;
use crate::sync::queue::{self, Receiver, TryRecvError};
use crate::sync::{Arc, Ordering};

/// The largest reply the engine may append for one inbound frame (a `connection.close`
/// with 200 bytes of text, a `cancel-ok` with a 255-byte tag, a `reject`, ...).
const MAX_REPLY_PER_FRAME: usize = 512;

struct FuzzConsumer {
    channel: u16,
    rx: Receiver<ConsumerMsg>,
    shared: Arc<ConsumerShared>,
}

struct FuzzChannel {
    id: u16,
    shared: Arc<ChannelShared>,
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
        let max_message_size = match inp.u8() % 4 {
            0 => 0,
            1 => 100,
            2 => 5000,
            _ => 1 << 20,
        };
        let opts = ConnectionOptions {
            max_message_size,
            max_table_depth: 1 + inp.below(70),
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
                Ok(msg) => {
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
        assert!(self.engine.output().len() <= before + len);
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
            assert!(ch.shared.returns_rx.len() <= RETURNS_CAPACITY);
        }
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
            self.engine.take_output();
            self.checked = 0;
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
                match inp.u8() % 8 {
                    0 => h.cancel_consumer(i, false),
                    1 => h.cancel_consumer(i, true),
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
            _ => {
                h.engine.take_output();
                h.checked = 0;
            }
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
    for i in 0..h.consumers.len() {
        h.take(i, usize::MAX);
        assert!(
            matches!(
                h.consumers[i].rx.try_recv(),
                Err(TryRecvError::Disconnected)
            ),
            "a consumer was not woken when the connection ended"
        );
    }
    for ch in &h.channels {
        assert!(ch.shared.is_closed());
    }
}
