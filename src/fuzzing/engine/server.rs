//! What the engine harness's broker sends: frames synthesized from the input, well-formed or not.

use amq_protocol::protocol::{AMQPClass, basic, channel, connection, queue as amqp_queue};

use super::EngineHarness;
use crate::fuzzing::{Input, gen_properties, header_payload};
use crate::protocol::frame::{FRAME_BODY, FRAME_END, FRAME_HEADER, put_method};

impl EngineHarness {
    pub(super) fn channel_id(&self, inp: &mut Input<'_>) -> u16 {
        match inp.u8() % 8 {
            0 => 0,
            1..=5 if !self.channels.is_empty() => self.channels[inp.below(self.channels.len())].id,
            _ => inp.u16() % (self.conn.tuned.channel_max + 2),
        }
    }

    /// Synthesize a frame a server might send (or not), encoded for real.
    pub(super) fn server_frame(&mut self, inp: &mut Input<'_>) -> Vec<u8> {
        use basic::AMQPMethod as B;
        let ch = self.channel_id(inp);
        let tags = ["", "c1", "c2"];
        let tag = |inp: &mut Input<'_>| -> String {
            match inp.u8() % 4 {
                3 => inp.string(10),
                i => tags[i as usize % 3].to_owned(),
            }
        };
        let short = |inp: &mut Input<'_>| -> String {
            if inp.u8() % 4 == 0 {
                inp.string(255)
            } else {
                inp.string(8)
            }
        };
        let method = match inp.u8() % 22 {
            0 => AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            1 => AMQPClass::Basic(B::ConsumeOk(basic::ConsumeOk {
                consumer_tag: tag(inp).into(),
            })),
            2..=4 => AMQPClass::Basic(B::Deliver(basic::Deliver {
                consumer_tag: tag(inp).into(),
                delivery_tag: u64::from(inp.u8()),
                redelivered: inp.bool(),
                exchange: short(inp).into(),
                routing_key: short(inp).into(),
            })),
            5..=7 => {
                let size = match inp.u8() % 4 {
                    0 => 0,
                    1 | 2 => u64::from(inp.u16() % 512),
                    _ => inp.u64(),
                };
                let p = gen_properties(inp, self.conn.opts.max_table_depth);
                let mut payload = header_payload(&p, size);
                if inp.u8() % 8 == 0 {
                    payload[1] = inp.u8();
                }
                return frame_bytes(FRAME_HEADER, ch, &payload);
            }
            8..=10 => {
                let n = inp.u16() as usize % 600;
                let b = inp.u8();
                return frame_bytes(FRAME_BODY, ch, &vec![b; n]);
            }
            11 => {
                if inp.bool() {
                    AMQPClass::Basic(B::GetOk(basic::GetOk {
                        delivery_tag: inp.u64(),
                        redelivered: inp.bool(),
                        exchange: short(inp).into(),
                        routing_key: short(inp).into(),
                        message_count: inp.u32(),
                    }))
                } else {
                    AMQPClass::Basic(B::GetEmpty(basic::GetEmpty {}))
                }
            }
            12 => AMQPClass::Basic(B::Return(basic::Return {
                reply_code: inp.u16(),
                reply_text: short(inp).into(),
                exchange: short(inp).into(),
                routing_key: short(inp).into(),
            })),
            13 => {
                if inp.bool() {
                    AMQPClass::Basic(B::Ack(basic::Ack {
                        delivery_tag: u64::from(inp.u8()),
                        multiple: inp.bool(),
                    }))
                } else {
                    AMQPClass::Basic(B::Nack(basic::Nack {
                        delivery_tag: u64::from(inp.u8()),
                        multiple: inp.bool(),
                        requeue: inp.bool(),
                    }))
                }
            }
            14 => AMQPClass::Basic(B::Cancel(basic::Cancel {
                consumer_tag: tag(inp).into(),
                nowait: inp.bool(),
            })),
            15 => AMQPClass::Basic(B::CancelOk(basic::CancelOk {
                consumer_tag: tag(inp).into(),
            })),
            16 => AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: inp.u16(),
                reply_text: short(inp).into(),
                class_id: inp.u16(),
                method_id: inp.u16(),
            })),
            17 => AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
            18 => AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow {
                active: inp.bool(),
            })),
            19 => AMQPClass::Queue(amqp_queue::AMQPMethod::DeclareOk(amqp_queue::DeclareOk {
                queue: short(inp).into(),
                message_count: inp.u32(),
                consumer_count: inp.u32(),
            })),
            20 => match inp.u8() % 6 {
                0 => AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: inp.u16(),
                    reply_text: short(inp).into(),
                    class_id: inp.u16(),
                    method_id: inp.u16(),
                })),
                1 => AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                2 => AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
                    reason: short(inp).into(),
                })),
                3 => AMQPClass::Connection(connection::AMQPMethod::Unblocked(
                    connection::Unblocked {},
                )),
                4 => AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                    channel_max: inp.u16(),
                    frame_max: inp.u32(),
                    heartbeat: inp.u16(),
                })),
                _ => AMQPClass::Basic(B::QosOk(basic::QosOk {})),
            },
            _ => {
                // Any frame type, any payload, correctly framed.
                let kind = inp.u8() % 10;
                let payload = inp.some_bytes(300).to_vec();
                return frame_bytes(kind, ch, &payload);
            }
        };
        let mut out = Vec::new();
        if put_method(&mut out, ch, method).is_err() {
            out.clear();
        }
        out
    }
}

/// Any frame type around any payload. By hand: lepus's encoders write only the frames it
/// sends, and this one must also make what a broker should never send (unknown types,
/// a content header with a wrong class).
fn frame_bytes(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
    out
}
