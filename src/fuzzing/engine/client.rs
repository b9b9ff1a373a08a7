//! What the engine harness's handles do: open, consume, get, declare, publish, cancel, close.

use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection, queue as amqp_queue};

use super::{EngineHarness, FuzzChannel, FuzzConsumer};
use crate::delivery::{ConsumerShared, ConsumerSink};
use crate::error::{Error, reply_code};
use crate::fuzzing::Input;
use crate::io::{ChannelShared, Command};
use crate::protocol::frame::{put_method, put_publish};
use crate::protocol::properties::BasicProperties;
use crate::sync::oneshot;
use crate::sync::{Arc, Ordering};

impl EngineHarness {
    pub(super) fn open_channel(&mut self) {
        let Some(id) = self.conn.ids.lock().allocate() else {
            return;
        };
        let shared = Arc::new(ChannelShared::new(id, self.conn.clone()));
        let mut bytes = Vec::new();
        put_method(
            &mut bytes,
            id,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .expect("channel.open encodes");
        let (reply, rx) = oneshot::channel();
        self.replies.push(rx);
        self.channels.push(FuzzChannel {
            id,
            shared: shared.clone(),
        });
        self.command(Command::OpenChannel {
            shared,
            bytes,
            reply,
            chained: Vec::new(),
        });
    }

    /// `Consumer::cancel` (or, with `drop`, dropping the `Consumer`): the consumer stops
    /// holding reading back, and `basic.cancel` goes out.
    pub(super) fn cancel_consumer(&mut self, i: usize, drop: bool) {
        let Some(c) = self.consumers.get(i) else {
            return;
        };
        c.shared.active.store(false, Ordering::Release);
        let channel = c.channel;
        if drop {
            self.take(i, usize::MAX);
            self.consumers.remove(i);
        }
        let mut bytes = Vec::new();
        put_method(
            &mut bytes,
            channel,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: "c1".into(),
                nowait: false,
            })),
        )
        .expect("basic.cancel encodes");
        let (reply, rx) = oneshot::channel();
        self.replies.push(rx);
        self.command(Command::Rpc {
            channel,
            bytes,
            reply,
            consumer: None,
        });
    }

    pub(super) fn rpc(&mut self, inp: &mut Input<'_>) {
        let Some(ch) = self.channels.get(inp.below(self.channels.len())) else {
            return;
        };
        let (id, shared) = (ch.id, ch.shared.clone());
        let (reply, rx) = oneshot::channel();
        let mut bytes = Vec::new();
        let k = inp.u8();
        let (m, consumer) = match k % 4 {
            // The upper half of what was `queue.declare` before confirms were fuzzed.
            3 if k >= 128 => {
                self.selects.push((shared, rx));
                put_method(
                    &mut bytes,
                    id,
                    AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                        nowait: false,
                    })),
                )
                .expect("confirm.select encodes");
                self.command(Command::Rpc {
                    channel: id,
                    bytes,
                    reply,
                    consumer: None,
                });
                return;
            }
            0 | 1 => {
                let capacity = 1 + inp.below(4);
                let (tx, crx) = crate::sync::lightq::unbounded();
                // Inputs saved before the byte bounds keep queues bounded by count only.
                let shared = Arc::new(if self.bounds.small {
                    ConsumerShared::bounded(capacity, self.conn.opts.consumer_queue_bytes)
                } else {
                    ConsumerShared::new(capacity)
                });
                let no_ack = inp.bool();
                self.consumers.push(FuzzConsumer {
                    channel: id,
                    rx: crx,
                    shared: shared.clone(),
                });
                (
                    AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                        queue: "q".into(),
                        consumer_tag: "".into(),
                        no_local: false,
                        no_ack,
                        exclusive: false,
                        nowait: false,
                        arguments: Default::default(),
                    })),
                    Some(ConsumerSink {
                        tx,
                        shared,
                        no_ack,
                        queue: String::new(),
                    }),
                )
            }
            2 => (
                AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                    queue: "q".into(),
                    no_ack: inp.bool(),
                })),
                None,
            ),
            _ => (
                AMQPClass::Queue(amqp_queue::AMQPMethod::Declare(amqp_queue::Declare {
                    queue: "".into(),
                    passive: false,
                    durable: false,
                    exclusive: true,
                    auto_delete: false,
                    nowait: false,
                    arguments: Default::default(),
                })),
                None,
            ),
        };
        self.replies.push(rx);
        put_method(&mut bytes, id, m).expect("client method encodes");
        self.command(Command::Rpc {
            channel: id,
            bytes,
            reply,
            consumer,
        });
    }

    /// `Channel::basic_publish`: one unit of method, header and body frames.
    pub(super) fn publish(&mut self, inp: &mut Input<'_>) {
        let Some(ch) = self.channels.get(inp.below(self.channels.len())) else {
            return;
        };
        let mut bytes = Vec::new();
        let body = vec![7u8; inp.below(10_000)];
        put_publish(
            &mut bytes,
            ch.id,
            "",
            "q",
            inp.bool(),
            &BasicProperties::new(),
            &body,
            self.frame_max,
            8,
        )
        .expect("publish encodes");
        // In confirm mode a publish takes the next sequence number, as
        // `Channel::publish` does: the broker's acks are checked against it.
        ch.shared.confirms.register(false, None);
        self.command(Command::Send(bytes));
    }

    /// `Connection::close` (one time in eight) or `Channel::close`.
    pub(super) fn close(&mut self, inp: &mut Input<'_>) {
        if inp.u8().is_multiple_of(8) {
            let mut bytes = Vec::new();
            put_method(
                &mut bytes,
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: reply_code::REPLY_SUCCESS,
                    reply_text: "bye".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
            .expect("close encodes");
            let (reply, rx) = oneshot::channel();
            self.replies.push(rx);
            if self.engine.is_open() {
                self.closed_by_us = true;
            }
            self.command(Command::Close { bytes, reply });
        } else if let Some(ch) = self.channels.get(inp.below(self.channels.len())) {
            let (id, shared) = (ch.id, ch.shared.clone());
            let mut bytes = Vec::new();
            put_method(
                &mut bytes,
                id,
                AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                    reply_code: reply_code::REPLY_SUCCESS,
                    reply_text: "bye".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
            .expect("close encodes");
            shared.set_closed(Error::ChannelClosed(id));
            let (reply, rx) = oneshot::channel();
            self.replies.push(rx);
            self.command(Command::CloseChannel {
                channel: id,
                bytes,
                reply: Some(reply),
            });
        }
    }
}
