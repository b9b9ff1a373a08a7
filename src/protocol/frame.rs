//! Frames: an incremental decoder that checks each 7-byte header before buffering the
//! payload, and encoders for method, content and heartbeat frames.

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::AMQPClass;

use super::properties::BasicProperties;
use super::reply_code;

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
/// Header (7) plus end octet (1).
pub const FRAME_OVERHEAD: usize = 8;
/// The smallest frame_max a peer may use (AMQP 0-9-1 frame-min-size).
pub const FRAME_MIN_SIZE: u32 = 4096;

/// A frame as it came off the wire; the payload borrows the decoder's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// 1 method, 2 header, 3 body, 8 heartbeat.
    pub kind: u8,
    /// Channel id.
    pub channel: u16,
    /// Payload bytes.
    pub payload: &'a [u8],
}

/// A violation found while decoding: the reply code to close the connection with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// AMQP reply code (501 frame error, 505 unexpected frame, ...).
    pub code: u16,
    /// What was wrong.
    pub text: String,
}

impl FrameError {
    pub(crate) fn new(code: u16, text: impl Into<String>) -> Self {
        FrameError {
            code,
            text: text.into(),
        }
    }
}

/// Incremental frame decoder. Bytes go in through [`FrameDecoder::read_buf`] (a slice to
/// read into) and [`FrameDecoder::filled`]; frames come out of [`FrameDecoder::next_frame`].
/// Memory is bounded by `frame_max` plus one read chunk.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    frame_max: u32,
}

/// How much the decoder offers to read at once.
pub const READ_CHUNK: usize = 64 * 1024;

impl FrameDecoder {
    /// A decoder that accepts frames up to `frame_max` bytes in total (0 = no limit is
    /// not accepted here: pass the negotiated or a default value).
    pub fn new(frame_max: u32) -> Self {
        FrameDecoder {
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            frame_max: frame_max.max(FRAME_MIN_SIZE),
        }
    }

    /// Change the size limit (after tune).
    pub fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max.max(FRAME_MIN_SIZE);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// A free region to read socket bytes into; call [`FrameDecoder::filled`] after.
    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < READ_CHUNK / 4 && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // Grow only as far as one whole frame plus a read chunk needs.
        let want = (self.end + READ_CHUNK / 4).min(self.frame_max as usize + READ_CHUNK);
        if self.buf.len() < want {
            self.buf.resize(
                want.max(self.buf.len() * 2)
                    .min(self.frame_max as usize + READ_CHUNK),
                0,
            );
        }
        &mut self.buf[self.end..]
    }

    /// Bytes allocated for the buffer: at most `frame_max` plus [`READ_CHUNK`].
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Bytes received but not yet returned as frames.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Record that `n` bytes were written into the slice from [`FrameDecoder::read_buf`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Copy bytes in (for tests and fuzzing; the reactor reads in place). Panics rather
    /// than spin when more than frame_max plus a read chunk is fed without taking frames.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let dst = self.read_buf();
            assert!(
                !dst.is_empty(),
                "FrameDecoder::feed: buffer full, take frames first"
            );
            let n = dst.len().min(bytes.len());
            dst[..n].copy_from_slice(&bytes[..n]);
            self.filled(n);
            bytes = &bytes[n..];
        }
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed, or the violation.
    /// After an error the decoder must not be used again.
    pub fn next_frame(&mut self) -> Result<Option<RawFrame<'_>>, FrameError> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 7 {
            return Ok(None);
        }
        let kind = avail[0];
        let channel = u16::from_be_bytes([avail[1], avail[2]]);
        let size = u32::from_be_bytes([avail[3], avail[4], avail[5], avail[6]]);
        match kind {
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY => {}
            FRAME_HEARTBEAT => {
                if channel != 0 || size != 0 {
                    return Err(FrameError::new(
                        reply_code::FRAME_ERROR,
                        format!("heartbeat frame on channel {channel} with {size} payload bytes"),
                    ));
                }
            }
            b'A' => {
                return Err(FrameError::new(
                    reply_code::FRAME_ERROR,
                    "protocol header received where a frame was expected",
                ));
            }
            other => {
                return Err(FrameError::new(
                    reply_code::FRAME_ERROR,
                    format!("unknown frame type {other}"),
                ));
            }
        }
        // Checked against frame_max before a single payload byte is buffered.
        if size as u64 + FRAME_OVERHEAD as u64 > self.frame_max as u64 {
            return Err(FrameError::new(
                reply_code::FRAME_ERROR,
                format!(
                    "frame of {} bytes exceeds frame_max {}",
                    size as u64 + FRAME_OVERHEAD as u64,
                    self.frame_max
                ),
            ));
        }
        let total = size as usize + FRAME_OVERHEAD;
        if avail.len() < total {
            return Ok(None);
        }
        if avail[total - 1] != FRAME_END {
            return Err(FrameError::new(
                reply_code::FRAME_ERROR,
                format!("frame end octet is {:#04x}, not 0xCE", avail[total - 1]),
            ));
        }
        let start = self.start;
        self.start += total;
        Ok(Some(RawFrame {
            kind,
            channel,
            payload: &self.buf[start + 7..start + total - 1],
        }))
    }
}

/// Append a method frame. Only fails for arguments that cannot be encoded.
pub fn put_method(out: &mut Vec<u8>, channel: u16, method: AMQPClass) -> Result<(), String> {
    let frame = AMQPFrame::Method(channel, method);
    let buf = std::mem::take(out);
    match gen_frame(&frame)(WriteContext::from(buf)) {
        Ok(ctx) => {
            *out = ctx.write;
            Ok(())
        }
        Err(e) => Err(format!("method could not be encoded: {e:?}")),
    }
}

/// Append a heartbeat frame.
pub fn put_heartbeat(out: &mut Vec<u8>) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// Append a `basic.publish` method, its content header and the body split into frames of
/// at most `frame_max` bytes: one unit that the I/O thread writes without interleaving.
#[allow(clippy::too_many_arguments)]
pub fn put_publish(
    out: &mut Vec<u8>,
    channel: u16,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    props: &BasicProperties,
    body: &[u8],
    frame_max: u32,
    max_depth: usize,
) -> Result<(), String> {
    use super::table::put_short_str;
    let ch = channel.to_be_bytes();
    // method frame, encoded by hand: this is the hot path
    let at = out.len();
    out.extend_from_slice(&[FRAME_METHOD, ch[0], ch[1], 0, 0, 0, 0, 0, 60, 0, 40, 0, 0]);
    put_short_str(out, exchange)?;
    put_short_str(out, routing_key)?;
    out.push(mandatory as u8);
    close_frame(out, at)?;
    // content header
    let at = out.len();
    out.extend_from_slice(&[FRAME_HEADER, ch[0], ch[1], 0, 0, 0, 0, 0, 60, 0, 0]);
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    props.encode(out, max_depth)?;
    close_frame(out, at)?;
    if out.len() - at > frame_max as usize {
        return Err(format!(
            "content header of {} bytes exceeds frame_max {frame_max}",
            out.len() - at
        ));
    }
    // body frames
    let chunk = (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1);
    out.reserve(body.len() + body.len().div_ceil(chunk) * FRAME_OVERHEAD);
    for piece in body.chunks(chunk) {
        out.extend_from_slice(&[FRAME_BODY, ch[0], ch[1]]);
        out.extend_from_slice(&(piece.len() as u32).to_be_bytes());
        out.extend_from_slice(piece);
        out.push(FRAME_END);
    }
    Ok(())
}

/// Append a `basic.ack`, encoded by hand: acks are as frequent as deliveries.
pub fn put_ack(out: &mut Vec<u8>, channel: u16, delivery_tag: u64, multiple: bool) {
    put_tag_method(out, channel, 80, delivery_tag, multiple as u8);
}

/// Append a `basic.nack`.
pub fn put_nack(out: &mut Vec<u8>, channel: u16, delivery_tag: u64, multiple: bool, requeue: bool) {
    put_tag_method(
        out,
        channel,
        120,
        delivery_tag,
        multiple as u8 | (requeue as u8) << 1,
    );
}

/// Append a `basic.reject`.
pub fn put_reject(out: &mut Vec<u8>, channel: u16, delivery_tag: u64, requeue: bool) {
    put_tag_method(out, channel, 90, delivery_tag, requeue as u8);
}

/// A basic-class method whose arguments are a delivery tag and one octet of bit flags
/// (ack, nack, reject): 13 bytes of payload.
fn put_tag_method(out: &mut Vec<u8>, channel: u16, method_id: u16, tag: u64, bits: u8) {
    let ch = channel.to_be_bytes();
    let m = method_id.to_be_bytes();
    out.extend_from_slice(&[FRAME_METHOD, ch[0], ch[1], 0, 0, 0, 13, 0, 60, m[0], m[1]]);
    out.extend_from_slice(&tag.to_be_bytes());
    out.push(bits);
    out.push(FRAME_END);
}

/// A `basic.publish` unit as [`put_publish`] encoded it, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedPublish {
    /// Exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Mandatory flag.
    pub mandatory: bool,
    /// Properties.
    pub properties: BasicProperties,
    /// Body, its frames joined.
    pub body: Vec<u8>,
}

/// Read back a publish unit that [`put_publish`] wrote (recovery hands unconfirmed
/// messages back to the application this way). `None` if the bytes are not one.
pub fn decode_publish(bytes: &[u8]) -> Option<DecodedPublish> {
    let mut dec = FrameDecoder::new(u32::MAX);
    dec.feed(bytes);
    let m = dec.next_frame().ok()??;
    let p = m.payload;
    // class 60, method 40, reserved short, then exchange and routing key as short
    // strings and the flags octet.
    if m.kind != FRAME_METHOD || p.get(..4)? != [0, 60, 0, 40] {
        return None;
    }
    let ex_len = *p.get(6)? as usize;
    let exchange = String::from_utf8(p.get(7..7 + ex_len)?.to_vec()).ok()?;
    let rk_at = 7 + ex_len;
    let rk_len = *p.get(rk_at)? as usize;
    let routing_key = String::from_utf8(p.get(rk_at + 1..rk_at + 1 + rk_len)?.to_vec()).ok()?;
    let mandatory = p.get(rk_at + 1 + rk_len)? & 1 != 0;
    let h = dec.next_frame().ok()??;
    let properties = super::properties::decode_properties(h.payload, usize::MAX).ok()?;
    let mut body = Vec::new();
    while let Ok(Some(f)) = dec.next_frame() {
        body.extend_from_slice(f.payload);
    }
    Some(DecodedPublish {
        exchange,
        routing_key,
        mandatory,
        properties,
        body,
    })
}

fn close_frame(out: &mut Vec<u8>, at: usize) -> Result<(), String> {
    let size = u32::try_from(out.len() - at - 7).map_err(|_| "frame over 4 GiB".to_owned())?;
    out[at + 3..at + 7].copy_from_slice(&size.to_be_bytes());
    out.push(FRAME_END);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_nack_reject_bytes_equal_amq_protocols_encoding() {
        use amq_protocol::protocol::basic;
        for (tag, a, b) in [
            (0u64, false, false),
            (1, true, false),
            (u64::MAX, false, true),
            (0x0102_0304_0506_0708, true, true),
        ] {
            let channel = 0x1234;
            let expect = |m: basic::AMQPMethod| {
                let mut v = Vec::new();
                put_method(&mut v, channel, AMQPClass::Basic(m)).unwrap();
                v
            };
            let mut got = Vec::new();
            put_ack(&mut got, channel, tag, a);
            let want = expect(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: tag,
                multiple: a,
            }));
            assert_eq!(got, want, "ack {tag} {a}");
            got.clear();
            put_nack(&mut got, channel, tag, a, b);
            let want = expect(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: tag,
                multiple: a,
                requeue: b,
            }));
            assert_eq!(got, want, "nack {tag} {a} {b}");
            got.clear();
            put_reject(&mut got, channel, tag, b);
            let want = expect(basic::AMQPMethod::Reject(basic::Reject {
                delivery_tag: tag,
                requeue: b,
            }));
            assert_eq!(got, want, "reject {tag} {b}");
        }
    }

    #[test]
    fn a_publish_decodes_back_to_what_was_encoded() {
        let props = BasicProperties::new()
            .content_type("text/plain")
            .delivery_mode(2);
        for (exchange, routing_key, mandatory, body, frame_max) in [
            ("", "", false, Vec::new(), 4096u32),
            ("ex", "rk.é", true, vec![1u8, 2, 3], 4096),
            (
                "x",
                "long",
                false,
                (0..20_000u32).map(|i| i as u8).collect(),
                4096,
            ),
            (
                &*"e".repeat(255),
                &*"k".repeat(255),
                true,
                vec![9; 5],
                131_072,
            ),
        ] {
            let mut bytes = Vec::new();
            put_publish(
                &mut bytes,
                7,
                exchange,
                routing_key,
                mandatory,
                &props,
                &body,
                frame_max,
                8,
            )
            .unwrap();
            let d = decode_publish(&bytes).expect("decodes");
            assert_eq!(
                d,
                DecodedPublish {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                    mandatory,
                    properties: props.clone(),
                    body,
                }
            );
        }
        let mut ack = Vec::new();
        put_ack(&mut ack, 1, 1, false);
        assert_eq!(decode_publish(&ack), None, "not a publish");
        assert_eq!(decode_publish(&[FRAME_METHOD, 0]), None, "truncated");
    }

    #[test]
    fn decodes_frames_split_at_every_byte() {
        let mut bytes = Vec::new();
        put_heartbeat(&mut bytes);
        put_publish(
            &mut bytes,
            3,
            "ex",
            "rk",
            true,
            &BasicProperties::new().content_type("a/b"),
            &[7u8; 10_000],
            4096,
            8,
        )
        .unwrap();
        let mut dec = FrameDecoder::new(4096);
        let mut kinds = Vec::new();
        let mut body = 0;
        for b in &bytes {
            dec.feed(std::slice::from_ref(b));
            while let Some(f) = dec.next_frame().unwrap() {
                kinds.push(f.kind);
                if f.kind == FRAME_BODY {
                    body += f.payload.len();
                    assert!(f.payload.len() <= 4096 - FRAME_OVERHEAD);
                }
            }
        }
        assert_eq!(&kinds[..3], &[FRAME_HEARTBEAT, FRAME_METHOD, FRAME_HEADER]);
        assert_eq!(body, 10_000);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn huge_frame_header_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new(131_072);
        dec.feed(&[FRAME_BODY, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF]);
        let err = dec.next_frame().unwrap_err();
        assert_eq!(err.code, reply_code::FRAME_ERROR);
        assert!(dec.buf.len() <= 131_072 + READ_CHUNK);
    }

    #[test]
    fn bad_end_octet_and_unknown_type_are_frame_errors() {
        let mut dec = FrameDecoder::new(4096);
        dec.feed(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, 0xAB]);
        assert_eq!(dec.next_frame().unwrap_err().code, reply_code::FRAME_ERROR);
        let mut dec = FrameDecoder::new(4096);
        dec.feed(&[9, 0, 0, 0, 0, 0, 0, FRAME_END]);
        assert_eq!(dec.next_frame().unwrap_err().code, reply_code::FRAME_ERROR);
    }

    #[test]
    fn publish_encoding_parses_with_amq_protocol() {
        let mut bytes = Vec::new();
        put_publish(
            &mut bytes,
            1,
            "",
            "q",
            false,
            &BasicProperties::new(),
            b"hi",
            4096,
            8,
        )
        .unwrap();
        let (rest, f) = amq_protocol::frame::parse_frame(&bytes[..]).unwrap();
        match f {
            AMQPFrame::Method(
                1,
                AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Publish(p)),
            ) => {
                assert_eq!(p.routing_key.as_str(), "q");
                assert!(!p.mandatory);
            }
            other => panic!("unexpected {other:?}"),
        }
        let (rest, f) = amq_protocol::frame::parse_frame(rest).unwrap();
        assert!(matches!(f, AMQPFrame::Header(1, ref h) if h.body_size == 2));
        let (rest, f) = amq_protocol::frame::parse_frame(rest).unwrap();
        assert_eq!(f, AMQPFrame::Body(1, b"hi".to_vec()));
        assert!(rest.is_empty());
    }
}
