//! Raw AMQP 0-9-1 frames: builders for what a test sends, and the parsed form of what it reads.
//!
//! Builders return whole wire frames (type, channel, size, payload, end octet) as bytes, so
//! a test can send them as they are, concatenate them, or break them on purpose (a wrong
//! end octet, a size that lies). Methods are encoded by amq-protocol; content headers,
//! property lists and field tables can be given as raw bytes, for what no encoder would
//! produce (a table nested 20,000 deep).

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, basic, parse_class};

/// Frame type of a method frame.
pub const FRAME_METHOD: u8 = 1;
/// Frame type of a content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Frame type of a content body frame.
pub const FRAME_BODY: u8 = 3;
/// Frame type of a heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;
/// Bytes a frame adds around its payload (7 of header, 1 end octet).
pub const FRAME_OVERHEAD: usize = 8;
/// The protocol header a client sends first.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// A whole frame: type, channel, size, payload, end octet.
pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + FRAME_OVERHEAD);
    push_frame(&mut out, kind, channel, payload);
    out
}

/// Append a whole frame to `out` (to build long runs of frames without copies).
pub fn push_frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
}

/// A method frame encoded by amq-protocol.
///
/// # Panics
///
/// If amq-protocol cannot encode `method` (a short string over 255 bytes).
pub fn method_frame(channel: u16, method: AMQPClass) -> Vec<u8> {
    let f = AMQPFrame::Method(channel, method);
    gen_frame(&f)(WriteContext::from(Vec::new()))
        .expect("method encodes")
        .write
}

/// A content header frame: class 60 (basic), weight 0, `body_size`, then `props` (property
/// flags and property list, as built by [`no_props`] / [`headers_props`] or by hand).
pub fn header_frame(channel: u16, body_size: u64, props: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + props.len());
    p.extend_from_slice(&[0, 60, 0, 0]);
    p.extend_from_slice(&body_size.to_be_bytes());
    p.extend_from_slice(props);
    frame(FRAME_HEADER, channel, &p)
}

/// A content body frame.
pub fn body_frame(channel: u16, body: &[u8]) -> Vec<u8> {
    frame(FRAME_BODY, channel, body)
}

/// A heartbeat frame (channel 0).
pub fn heartbeat_frame() -> Vec<u8> {
    frame(FRAME_HEARTBEAT, 0, &[])
}

/// The frames of one message after its method frame: the content header, then the body
/// split into body frames that fit `frame_max` (0: one body frame).
pub fn content_frames(channel: u16, props: &[u8], body: &[u8], frame_max: u32) -> Vec<u8> {
    let mut out = header_frame(channel, body.len() as u64, props);
    let max = if frame_max == 0 {
        body.len().max(1)
    } else {
        (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1)
    };
    for piece in body.chunks(max) {
        push_frame(&mut out, FRAME_BODY, channel, piece);
    }
    out
}

/// A `basic.deliver` method frame (exchange "", routing key "q", not redelivered).
pub fn deliver_frame(channel: u16, consumer_tag: &str, delivery_tag: u64) -> Vec<u8> {
    method_frame(
        channel,
        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: consumer_tag.into(),
            delivery_tag,
            redelivered: false,
            exchange: "".into(),
            routing_key: "q".into(),
        })),
    )
}

/// A `basic.publish` method frame (mandatory, not immediate).
pub fn publish_frame(channel: u16, exchange: &str, routing_key: &str) -> Vec<u8> {
    method_frame(
        channel,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            mandatory: true,
            immediate: false,
        })),
    )
}

/// What starting a consumer on a fresh `channel` takes: `channel.open`, `basic.qos`
/// (`prefetch`) and `basic.consume` of `queue` (server-named tag, manual acks), as three
/// method frames written together.
pub fn consumer_start_frames(channel: u16, queue: &str, prefetch: u16) -> Vec<u8> {
    let mut out = method_frame(
        channel,
        AMQPClass::Channel(amq_protocol::protocol::channel::AMQPMethod::Open(
            amq_protocol::protocol::channel::Open {},
        )),
    );
    out.extend(method_frame(
        channel,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: prefetch,
            global: false,
        })),
    ));
    out.extend(method_frame(
        channel,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: queue.into(),
            consumer_tag: "".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: Default::default(),
        })),
    ));
    out
}

/// Property flags and list with nothing set.
pub fn no_props() -> Vec<u8> {
    vec![0, 0]
}

/// Property flags and list with only `headers` set, to the wire table `table` (its
/// 4-byte length included).
pub fn headers_props(table: &[u8]) -> Vec<u8> {
    let mut p = vec![0x20, 0x00];
    p.extend_from_slice(table);
    p
}

/// The wire form of a field table nested `depth` levels deep (the outer table counts
/// as 1): each level is one entry with an empty key holding the next table. Built
/// front to back from the lengths, without recursion or a field-table value; 6 bytes a
/// level, so 20,000 levels fit in RabbitMQ's default 128 KiB frame.
///
/// # Panics
///
/// If `depth` is 0.
pub fn deep_table(depth: usize) -> Vec<u8> {
    assert!(depth >= 1, "a table has at least one level");
    let mut out = Vec::with_capacity(6 * depth);
    for level in 0..depth {
        let below = depth - 1 - level; // nested tables inside this one
        out.extend_from_slice(&((6 * below) as u32).to_be_bytes());
        if below > 0 {
            out.extend_from_slice(&[0, b'F']); // empty key, type 'F'
        }
    }
    out
}

/// A small, well-formed table `{"k": "v"}`.
pub fn small_table() -> Vec<u8> {
    let mut t = vec![0, 0, 0, 0, 1, b'k', b'S', 0, 0, 0, 1, b'v'];
    let len = (t.len() - 4) as u32;
    t[..4].copy_from_slice(&len.to_be_bytes());
    t
}

/// A frame as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame type ([`FRAME_METHOD`], [`FRAME_HEADER`], ...).
    pub kind: u8,
    /// Channel id.
    pub channel: u16,
    /// Payload, without the end octet.
    pub payload: Vec<u8>,
}

impl Frame {
    /// The decoded method, for a method frame that amq-protocol can parse.
    pub fn method(&self) -> Option<AMQPClass> {
        if self.kind != FRAME_METHOD {
            return None;
        }
        parse_class(&self.payload[..]).ok().map(|(_, m)| m)
    }

    /// `(class id, method id)` of a method frame, read from its first four bytes without
    /// decoding the arguments.
    pub fn method_id(&self) -> Option<(u16, u16)> {
        match (self.kind, self.payload.get(..4)) {
            (FRAME_METHOD, Some(p)) => Some((
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )),
            _ => None,
        }
    }
}

/// Split one whole frame off the front of `buf`: `Ok(None)` while more bytes are needed,
/// an error for a wrong end octet or a frame larger than `max_size` bytes in all.
pub fn split_frame(buf: &mut Vec<u8>, max_size: usize) -> Result<Option<Frame>, String> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if size.saturating_add(FRAME_OVERHEAD) > max_size {
        return Err(format!("frame of {size} bytes exceeds {max_size}"));
    }
    if buf.len() < size + FRAME_OVERHEAD {
        return Ok(None);
    }
    let f: Vec<u8> = buf.drain(..size + FRAME_OVERHEAD).collect();
    if f[size + 7] != FRAME_END {
        return Err(format!("bad frame end octet {:#04x}", f[size + 7]));
    }
    Ok(Some(Frame {
        kind: f[0],
        channel: u16::from_be_bytes([f[1], f[2]]),
        payload: f[7..size + 7].to_vec(),
    }))
}

// ---------------------------------------------------------------------------------------
// Methods with raw short strings: what amq-protocol's encoder cannot produce (strings that
// are not UTF-8) and what its parser refuses.
// ---------------------------------------------------------------------------------------

/// Append a short string (length octet, bytes) made of any bytes.
///
/// # Panics
///
/// If `s` is longer than 255 bytes.
pub fn push_short(out: &mut Vec<u8>, s: &[u8]) {
    out.push(u8::try_from(s.len()).expect("a short string has at most 255 bytes"));
    out.extend_from_slice(s);
}

fn method_payload(class: u16, method: u16) -> Vec<u8> {
    let mut p = class.to_be_bytes().to_vec();
    p.extend_from_slice(&method.to_be_bytes());
    p
}

/// A `basic.deliver` method frame with raw consumer tag, exchange and routing key.
pub fn deliver_frame_raw(
    channel: u16,
    consumer_tag: &[u8],
    delivery_tag: u64,
    exchange: &[u8],
    routing_key: &[u8],
) -> Vec<u8> {
    let mut p = method_payload(60, 60);
    push_short(&mut p, consumer_tag);
    p.extend_from_slice(&delivery_tag.to_be_bytes());
    p.push(0);
    push_short(&mut p, exchange);
    push_short(&mut p, routing_key);
    frame(FRAME_METHOD, channel, &p)
}

/// A `basic.return` method frame with raw reply text, exchange and routing key.
pub fn return_frame_raw(
    channel: u16,
    reply_code: u16,
    reply_text: &[u8],
    exchange: &[u8],
    routing_key: &[u8],
) -> Vec<u8> {
    let mut p = method_payload(60, 50);
    p.extend_from_slice(&reply_code.to_be_bytes());
    push_short(&mut p, reply_text);
    push_short(&mut p, exchange);
    push_short(&mut p, routing_key);
    frame(FRAME_METHOD, channel, &p)
}

/// A `basic.get-ok` method frame with raw exchange and routing key.
pub fn get_ok_frame_raw(
    channel: u16,
    delivery_tag: u64,
    exchange: &[u8],
    routing_key: &[u8],
    message_count: u32,
) -> Vec<u8> {
    let mut p = method_payload(60, 71);
    p.extend_from_slice(&delivery_tag.to_be_bytes());
    p.push(0);
    push_short(&mut p, exchange);
    push_short(&mut p, routing_key);
    p.extend_from_slice(&message_count.to_be_bytes());
    frame(FRAME_METHOD, channel, &p)
}

/// A `connection.close` (on channel 0) or `channel.close` (on any other) whose reply text
/// is `text` as raw bytes, announced as `text_len` bytes (which may lie), followed by class
/// and method ids 0 and then by `trailing`.
pub fn close_frame_raw(
    channel: u16,
    reply_code: u16,
    text_len: u8,
    text: &[u8],
    trailing: &[u8],
) -> Vec<u8> {
    let mut p = if channel == 0 {
        method_payload(10, 50)
    } else {
        method_payload(20, 40)
    };
    p.extend_from_slice(&reply_code.to_be_bytes());
    p.push(text_len);
    p.extend_from_slice(text);
    p.extend_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(trailing);
    frame(FRAME_METHOD, channel, &p)
}

/// A `basic.publish` method frame (not mandatory) with raw exchange and routing key.
pub fn publish_frame_raw(channel: u16, exchange: &[u8], routing_key: &[u8]) -> Vec<u8> {
    let mut p = method_payload(60, 40);
    p.extend_from_slice(&[0, 0]); // reserved ticket
    push_short(&mut p, exchange);
    push_short(&mut p, routing_key);
    p.push(0);
    frame(FRAME_METHOD, channel, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_back_into_what_was_built() {
        let mut buf = heartbeat_frame();
        buf.extend(content_frames(3, &no_props(), &[7u8; 25], 18));
        let mut got = Vec::new();
        while let Some(f) = split_frame(&mut buf, 1 << 20).unwrap() {
            got.push(f);
        }
        assert!(buf.is_empty());
        let kinds: Vec<u8> = got.iter().map(|f| f.kind).collect();
        // 25 bytes in bodies of at most 10: 10 + 10 + 5.
        assert_eq!(kinds, [FRAME_HEARTBEAT, FRAME_HEADER, 3, 3, 3]);
        assert_eq!(got[4].payload, [7u8; 5]);
        assert_eq!(got[1].payload[4..12], 25u64.to_be_bytes());
    }

    #[test]
    fn split_frame_waits_for_the_whole_frame_and_checks_the_end_octet() {
        let whole = body_frame(1, b"abc");
        let mut part = whole[..whole.len() - 1].to_vec();
        assert_eq!(split_frame(&mut part, 1 << 20), Ok(None));
        let mut bad = whole.clone();
        *bad.last_mut().unwrap() = 0;
        assert!(split_frame(&mut bad, 1 << 20).is_err());
        let mut big = whole;
        assert!(split_frame(&mut big, 10).is_err());
    }

    #[test]
    fn method_frames_decode_and_name_their_method() {
        let f = split_frame(&mut publish_frame(1, "x", "k"), 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(f.method_id(), Some((60, 40)));
        assert!(matches!(
            f.method(),
            Some(AMQPClass::Basic(basic::AMQPMethod::Publish(p))) if p.routing_key.as_str() == "k"
        ));
    }

    #[test]
    fn deep_table_lengths_nest() {
        assert_eq!(deep_table(1), [0, 0, 0, 0]);
        let t = deep_table(3);
        assert_eq!(t.len(), 6 * 2 + 4);
        assert_eq!(t[..4], 12u32.to_be_bytes());
        assert_eq!(t[6..10], 6u32.to_be_bytes());
    }
}
