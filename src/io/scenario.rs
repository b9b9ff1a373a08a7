//! Scenario tests: the engine and the handshake driven frame by frame, no socket. A
//! [`Scenario`] takes the engine to a state (channels open, consumers registered, a close
//! under way); each test then feeds one situation and checks the exact frames written
//! and the outcome.

mod engine;
mod events;
mod handshake;
mod unacked;

use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, channel, parse_class};

use super::engine::Engine;
use super::{ChannelShared, Command, ConnShared, Reply, ReplyRx, Tuned, Wake};
use crate::delivery::{ConsumerMsg, ConsumerShared, ConsumerSink};
use crate::error::{Error, Result};
use crate::options::ConnectionOptions;
use crate::protocol::frame::{
    FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FrameDecoder, put_heartbeat,
    put_method, put_publish,
};
use crate::protocol::properties::BasicProperties;
use crate::protocol::table::FieldTable;
use crate::sync::queue::{self, Receiver};
use crate::sync::{Arc, AtomicUsize, Ordering};

/// A waker that counts: the I/O thread of a test.
#[derive(Default)]
pub(super) struct CountingWake(AtomicUsize);

impl CountingWake {
    pub(super) fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Wake for CountingWake {
    fn wake(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A frame the engine wrote, decoded.
#[derive(Debug, PartialEq)]
pub(super) enum Sent {
    Method(u16, AMQPClass),
    /// A content header: channel and announced body size.
    Header(u16, u64),
    Body(u16, Vec<u8>),
    Heartbeat,
}

/// Split bytes into frames with the crate's decoder and decode each (any method a client
/// or server may send).
pub(super) fn decode_all(bytes: &[u8], frame_max: u32) -> Vec<Sent> {
    let mut dec = FrameDecoder::new(frame_max);
    dec.feed(bytes);
    let mut sent = Vec::new();
    while let Some(f) = dec
        .next_frame()
        .expect("the engine wrote a malformed frame")
    {
        sent.push(match f.kind {
            FRAME_METHOD => match parse_class(f.payload) {
                Ok((&[], m)) => Sent::Method(f.channel, m),
                other => panic!("undecodable method written: {other:?}"),
            },
            FRAME_HEADER => Sent::Header(
                f.channel,
                u64::from_be_bytes(f.payload[4..12].try_into().expect("8 bytes")),
            ),
            FRAME_BODY => Sent::Body(f.channel, f.payload.to_vec()),
            FRAME_HEARTBEAT => Sent::Heartbeat,
            k => panic!("frame type {k} written"),
        });
    }
    assert!(dec.pending().is_empty(), "a partial frame was written");
    sent
}

/// A method frame as the broker would send it.
pub(super) fn method(ch: u16, m: AMQPClass) -> Vec<u8> {
    let mut b = Vec::new();
    put_method(&mut b, ch, m).expect("encodable");
    b
}

/// Any frame, for the malformed ones.
pub(super) fn raw_frame(kind: u8, ch: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(&ch.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.push(crate::protocol::frame::FRAME_END);
    b
}

/// The content header and body frames of a message (as the broker sends after a deliver,
/// get-ok or return): a publish's frames without its method frame.
pub(super) fn content(ch: u16, props: &BasicProperties, body: &[u8], frame_max: u32) -> Vec<u8> {
    let mut b = Vec::new();
    put_publish(&mut b, ch, "", "", false, props, body, frame_max, 8).expect("encodable");
    let first = 8 + u32::from_be_bytes(b[3..7].try_into().expect("4 bytes")) as usize;
    b.split_off(first)
}

pub(super) fn deliver(ch: u16, tag: &str, delivery_tag: u64, body: &[u8]) -> Vec<u8> {
    let mut b = method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: tag.into(),
            delivery_tag,
            redelivered: false,
            exchange: "ex".into(),
            routing_key: "rk".into(),
        })),
    );
    b.extend(content(ch, &BasicProperties::new(), body, FRAME_MAX));
    b
}

pub(super) const FRAME_MAX: u32 = 4096;

/// The test's end of a consumer.
pub(super) struct TestConsumer {
    pub(super) rx: crate::sync::lightq::Receiver<ConsumerMsg>,
    pub(super) shared: Arc<ConsumerShared>,
}

impl TestConsumer {
    /// Take one message as `Consumer` does; true if the I/O side must be woken.
    pub(super) fn take(&self) -> Option<(ConsumerMsg, bool)> {
        let mut msg = self.rx.try_recv().ok()?;
        msg.release();
        Some((msg, self.shared.took_one()))
    }
}

/// An engine on a tuned connection, a clock, and the handles' side of it.
pub(super) struct Scenario {
    pub(super) engine: Engine,
    pub(super) conn: Arc<ConnShared>,
    pub(super) wakes: Arc<CountingWake>,
    commands: Receiver<Command>,
    decoder: FrameDecoder,
    pub(super) now: Instant,
}

impl Scenario {
    /// Open, no heartbeats, channel_max 8, frame_max 4096.
    pub(super) fn new() -> Self {
        Self::with(0, ConnectionOptions::default())
    }

    pub(super) fn with(heartbeat: u16, opts: ConnectionOptions) -> Self {
        let (cmd_tx, commands) = queue::bounded(16);
        let wakes = Arc::new(CountingWake::default());
        let tuned = Tuned {
            channel_max: 8,
            frame_max: FRAME_MAX,
            heartbeat,
        };
        let conn = Arc::new(ConnShared::new(
            cmd_tx,
            wakes.clone(),
            tuned,
            opts,
            FieldTable::new(),
        ));
        let now = Instant::now();
        Scenario {
            engine: Engine::new(conn.clone(), now),
            conn,
            wakes,
            commands,
            decoder: FrameDecoder::new(FRAME_MAX),
            now,
        }
    }

    pub(super) fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// What the reactor does on a wake-up: take every queued command.
    pub(super) fn drain(&mut self) {
        self.conn.clear_wake();
        while self.engine.wants_commands() {
            match self.commands.try_recv() {
                Ok(cmd) => self.engine.on_command(cmd, self.now),
                Err(_) => break,
            }
        }
    }

    /// What the reactor does with bytes from the socket.
    pub(super) fn feed(&mut self, bytes: &[u8]) {
        self.decoder.feed(bytes);
        self.engine.received(self.now);
        self.process_frames();
    }

    /// The reactor's frame loop: stops at a stall or at the end.
    pub(super) fn process_frames(&mut self) {
        while !self.engine.is_stalled() && self.engine.outcome().is_none() {
            match self.decoder.next_frame() {
                Ok(Some(f)) => self.engine.on_frame(f, self.now),
                Ok(None) => return,
                Err(e) => {
                    let err = Error::Protocol {
                        code: e.code,
                        text: e.text.clone(),
                    };
                    self.engine.violation(e, self.now);
                    self.engine.fail(err);
                }
            }
        }
    }

    pub(super) fn feed_method(&mut self, ch: u16, m: AMQPClass) {
        self.feed(&method(ch, m));
    }

    /// Everything written since the last call, decoded.
    pub(super) fn sent(&mut self) -> Vec<Sent> {
        decode_all(&self.engine.take_output(), FRAME_MAX)
    }

    /// Open channel `id` through the handle's path, answered by the broker.
    pub(super) fn open(&mut self, id: u16) -> Arc<ChannelShared> {
        let (ch, rx) = self
            .conn
            .open_channel_start(Some(id), self.deadline())
            .expect("open queued");
        self.drain();
        assert_eq!(
            self.sent(),
            [Sent::Method(
                id,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))
            )]
        );
        self.feed_method(
            id,
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        );
        ch.open_finish(&rx, self.deadline()).expect("open-ok");
        assert!(self.sent().is_empty());
        ch
    }

    /// Queue an RPC on `ch` as a handle does, and let the engine send it.
    pub(super) fn rpc(
        &mut self,
        ch: &ChannelShared,
        m: AMQPClass,
        consumer: Option<ConsumerSink>,
    ) -> ReplyRx {
        let rx = ch
            .rpc_start(m, self.deadline(), "test rpc", consumer)
            .expect("rpc queued");
        self.drain();
        rx
    }

    /// A consumer with tag `tag` on `ch` (consume, consume-ok) with a queue of `capacity`.
    pub(super) fn consume(
        &mut self,
        ch: &ChannelShared,
        tag: &str,
        capacity: usize,
    ) -> TestConsumer {
        self.consume_bounded(ch, tag, capacity, usize::MAX)
    }

    /// Like [`Scenario::consume`], with a byte bound too.
    pub(super) fn consume_bounded(
        &mut self,
        ch: &ChannelShared,
        tag: &str,
        capacity: usize,
        bytes: usize,
    ) -> TestConsumer {
        let (tx, rx) = crate::sync::lightq::unbounded();
        let shared = Arc::new(ConsumerShared::bounded(capacity, bytes));
        let sink = ConsumerSink {
            tx,
            shared: shared.clone(),
            no_ack: false,
            queue: "q".into(),
        };
        let consume = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "q".into(),
            consumer_tag: tag.into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: Default::default(),
        }));
        let reply = self.rpc(ch, consume.clone(), Some(sink));
        assert_eq!(self.sent(), [Sent::Method(ch.id, consume)]);
        self.feed_method(
            ch.id,
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                consumer_tag: tag.into(),
            })),
        );
        assert!(matches!(reply_now(&reply), Ok(Reply::Method(_))));
        TestConsumer { rx, shared }
    }

    /// A heartbeat from the broker.
    pub(super) fn heartbeat(&mut self) {
        let mut b = Vec::new();
        put_heartbeat(&mut b);
        self.feed(&b);
    }

    /// The error the engine ended with.
    pub(super) fn outcome(&self) -> Option<Error> {
        self.engine.outcome().cloned()
    }
}

/// The reply already sent to a waiter, or a panic.
pub(super) fn reply_now(rx: &ReplyRx) -> Result<Reply> {
    rx.try_recv().expect("a reply was sent")
}

/// The connection.close the engine sends for a violation with `code`.
pub(super) fn is_close_with(s: &Sent, code: u16) -> bool {
    matches!(
        s,
        Sent::Method(0, AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::Close(c)))
            if c.reply_code == code
    )
}
