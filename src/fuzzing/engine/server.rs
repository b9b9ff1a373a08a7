//! What the engine harness's broker sends: frames synthesized from the input, well-formed or not.

use amq_protocol::protocol::{AMQPClass, basic, channel, connection, queue as amqp_queue};

use super::EngineHarness;
use crate::fuzzing::{Input, gen_properties, header_payload};
use crate::protocol::frame::{FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_METHOD, put_method};

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
            if inp.u8().is_multiple_of(4) {
                inp.string(255)
            } else {
                inp.string(8)
            }
        };
        let choice = inp.u8();
        if choice >= 242 {
            // Appended after the first 22 choices (values 242.. were aliases of 0..=13).
            return self.hostile_frame(ch, choice - 242, inp);
        }
        let method = match choice % 22 {
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
                if inp.u8().is_multiple_of(8) {
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

/// How a hand-built method ends: as it should, with trailing bytes, or cut off.
#[derive(Clone, Copy, PartialEq)]
enum Tail {
    Whole,
    Trailing,
    /// Cut somewhere after the fields that identify the message.
    CutAfterId,
    /// Cut before them (a connection error: there is nothing to reject).
    CutBeforeId,
}

impl EngineHarness {
    /// Shapes a broker (or a publisher, through it) can make and amq-protocol would not
    /// encode: short strings of any bytes, lengths that lie, trailing bytes, tails cut
    /// off; and confirms for tags at the edges of what was published.
    fn hostile_frame(&mut self, ch: u16, choice: u8, inp: &mut Input<'_>) -> Vec<u8> {
        let tail = match inp.u8() % 8 {
            0..=3 => Tail::Whole,
            4 | 5 => Tail::Trailing,
            6 => Tail::CutAfterId,
            _ => Tail::CutBeforeId,
        };
        let mut p = Vec::new();
        // Where the identifying fields end (the payload may be cut after this).
        let id_end;
        match choice {
            0..=3 => {
                p.extend_from_slice(&[0, 60, 0, 60]);
                consumer_tag(&mut p, inp);
                p.extend_from_slice(&u64::from(inp.u8()).to_be_bytes());
                id_end = p.len();
                p.push(inp.u8());
                hostile_short(&mut p, inp);
                hostile_short(&mut p, inp);
            }
            4 | 5 => {
                p.extend_from_slice(&[0, 60, 0, 71]);
                p.extend_from_slice(&u64::from(inp.u8()).to_be_bytes());
                id_end = p.len();
                p.push(inp.u8());
                hostile_short(&mut p, inp);
                hostile_short(&mut p, inp);
                p.extend_from_slice(&inp.u32().to_be_bytes());
            }
            6 | 7 => {
                p.extend_from_slice(&[0, 60, 0, 50]);
                p.extend_from_slice(&[1, 56]);
                id_end = p.len();
                hostile_short(&mut p, inp);
                hostile_short(&mut p, inp);
                hostile_short(&mut p, inp);
            }
            8 | 9 => {
                // connection.close on channel 0 / channel.close on the chosen channel.
                let ch = if choice == 8 { 0 } else { ch };
                p.extend_from_slice(if choice == 8 {
                    &[0, 10, 0, 50]
                } else {
                    &[0, 20, 0, 40]
                });
                let code: u16 = [200, 320, 403, 404, 406, 501, 541][inp.below(7)];
                p.extend_from_slice(&code.to_be_bytes());
                id_end = p.len();
                hostile_short(&mut p, inp);
                p.extend_from_slice(&inp.u16().to_be_bytes());
                p.extend_from_slice(&inp.u16().to_be_bytes());
                finish(&mut p, id_end, tail, inp);
                return frame_bytes(FRAME_METHOD, ch, &p);
            }
            10 | 11 => {
                // basic.ack / basic.nack for tag 0, the last published, or one past it.
                let last = self
                    .channels
                    .iter()
                    .find(|c| c.id == ch)
                    .map_or(0, |c| c.shared.confirms.last_seq());
                let tag = match inp.u8() % 4 {
                    0 => 0,
                    1 => last,
                    2 => last + 1,
                    _ => last.saturating_sub(1),
                };
                let bits = inp.u8() & 3;
                p.extend_from_slice(if choice == 10 {
                    &[0, 60, 0, 80]
                } else {
                    &[0, 60, 0, 120]
                });
                p.extend_from_slice(&tag.to_be_bytes());
                p.push(bits);
                return frame_bytes(FRAME_METHOD, ch, &p);
            }
            12 => {
                // confirm.select-ok: what turns a `confirm.select` into confirm mode.
                return frame_bytes(FRAME_METHOD, ch, &[0, 85, 0, 11]);
            }
            _ => {
                // basic.consume-ok with a tag of any bytes.
                p.extend_from_slice(&[0, 60, 0, 21]);
                id_end = p.len();
                consumer_tag(&mut p, inp);
            }
        }
        finish(&mut p, id_end, tail, inp);
        frame_bytes(FRAME_METHOD, ch, &p)
    }
}

/// A consumer tag: mostly one the engine knows, else any bytes.
fn consumer_tag(p: &mut Vec<u8>, inp: &mut Input<'_>) {
    match inp.u8() % 4 {
        0 => p.push(0),
        1 => p.extend_from_slice(b"\x02c1"),
        2 => p.extend_from_slice(b"\x02c2"),
        _ => hostile_short(p, inp),
    }
}

/// A short string of any bytes (not UTF-8, up to 255 of them), or a length that lies.
fn hostile_short(p: &mut Vec<u8>, inp: &mut Input<'_>) {
    match inp.u8() % 4 {
        0 => {
            let s = inp.some_bytes(12);
            p.push(s.len() as u8);
            p.extend_from_slice(s);
        }
        1 => {
            // Invalid UTF-8 for sure: a lone continuation byte among the chosen ones.
            let s = inp.some_bytes(20);
            p.push(s.len() as u8 + 1);
            p.push(0x80);
            p.extend_from_slice(s);
        }
        2 => {
            let n = 200 + inp.below(56);
            p.push(n as u8);
            let b = inp.u8() | 0x80;
            p.extend(std::iter::repeat_n(b, n));
        }
        _ => {
            // The length says more (or less) than follows.
            p.push(inp.u8());
            p.extend_from_slice(inp.some_bytes(8));
        }
    }
}

/// End a hand-built method payload as `tail` says.
fn finish(p: &mut Vec<u8>, id_end: usize, tail: Tail, inp: &mut Input<'_>) {
    match tail {
        Tail::Whole => {}
        Tail::Trailing => p.extend_from_slice(inp.some_bytes(16)),
        Tail::CutAfterId => {
            let keep = id_end + inp.below(p.len() - id_end + 1);
            p.truncate(keep);
        }
        Tail::CutBeforeId => {
            let keep = 4 + inp.below(id_end.saturating_sub(4));
            p.truncate(keep.min(p.len()));
        }
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
