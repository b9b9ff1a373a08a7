//! Fuzz harnesses for everything lepus reads from the network (and from a URI).
//!
//! Each harness is a plain `fn(&[u8])`: the targets in `fuzz/fuzz_targets/` call them,
//! and `tests/fuzz_regressions.rs` replays saved inputs through the very same functions
//! in the normal `cargo test` run. A harness does more than call the code: it checks
//! properties (frames decoded incrementally equal frames decoded at once, memory stays
//! within its bounds, what the depth guard accepts amq-protocol parses, encode then
//! decode is the identity, a violation ends in a clean error state) and panics when one
//! does not hold, which libFuzzer reports as a crash.
//!
//! The structure-aware harnesses read their choices from the bytes with [`Input`], the
//! same idea as `arbitrary::Unstructured`, so no extra dependency or feature is needed to
//! build or replay them.

#![doc(hidden)]
// Built on the socket and handle layers, which the loom models leave out.
#![cfg(not(loom))]

use std::time::{Duration, Instant};

use amq_protocol::frame::{AMQPFrame, parse_frame};
use amq_protocol::protocol::{AMQPClass, basic, channel, connection, queue as amqp_queue};
use amq_protocol::types::parsing::parse_field_table;

use crate::delivery::{ConsumerMsg, ConsumerShared, ConsumerSink};
use crate::error::{Error, reply_code};
use crate::io::engine::Engine;
use crate::io::{ChannelShared, Command, ConnShared, RETURNS_CAPACITY, ReplyRx, Tuned};
use crate::options::{AuthMechanism, ConnectionOptions};
use crate::protocol::content::{Assembler, Content, ContentMethod, ContentProblem};
use crate::protocol::frame::{
    FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_MIN_SIZE,
    FRAME_OVERHEAD, FrameDecoder, FrameError, READ_CHUNK, put_method, put_publish,
};
use crate::protocol::properties::{BasicProperties, decode_properties};
use crate::protocol::table::{
    FieldTable, FieldValue, TableError, encode_table, scan_table, table_from_amqp,
};
use crate::sync::oneshot::{self, RecvError};
use crate::sync::queue::{self, Receiver, TryRecvError};
use crate::sync::{Arc, Ordering};

pub use crate::protocol::table::{DEFAULT_MAX_TABLE_DEPTH, MAX_TABLE_DEPTH_CAP};

// ====================================================================================
// Reading choices from bytes
// ====================================================================================

/// Turns fuzzer bytes into choices. Reading past the end yields zeros, so every input is
/// a valid (if short) sequence of choices.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Read choices from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }
    /// True when every byte has been used.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// One byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    /// Big-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    /// Big-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// Big-endian u64.
    pub fn u64(&mut self) -> u64 {
        (u64::from(self.u32()) << 32) | u64::from(self.u32())
    }
    /// A coin.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        match n {
            0 | 1 => 0,
            2..=256 => self.u8() as usize % n,
            257..=65536 => self.u16() as usize % n,
            _ => self.u32() as usize % n,
        }
    }
    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }
    /// Fewer than `n` bytes, how many chosen by the input.
    pub fn some_bytes(&mut self, n: usize) -> &'a [u8] {
        let n = self.below(n);
        self.bytes(n)
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
    /// A UTF-8 string of at most `max` bytes (invalid sequences become U+FFFD).
    pub fn string(&mut self, max: usize) -> String {
        let n = self.below(max + 1);
        let mut s = String::from_utf8_lossy(self.bytes(n)).into_owned();
        truncate_at_char(&mut s, max);
        s
    }
}

fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut n = max;
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        s.truncate(n);
    }
}

/// xorshift64: the deterministic generator of the round-trip tests and of chunk sizes.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator; any seed works (0 is replaced).
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1) ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

// ====================================================================================
// 1. frame_decoder
// ====================================================================================

/// The frames of `stream` decoded in one go by a straightforward reading of the spec,
/// the error (if any) that stops decoding, and how many bytes are left undecoded.
/// A frame: type, channel, payload.
type RefFrame<'a> = (u8, u16, &'a [u8]);

fn reference_frames(stream: &[u8], frame_max: u32) -> (Vec<RefFrame<'_>>, Option<u16>, usize) {
    let mut frames = Vec::new();
    let mut rest = stream;
    loop {
        if rest.len() < 7 {
            return (frames, None, rest.len());
        }
        let kind = rest[0];
        let channel = u16::from_be_bytes([rest[1], rest[2]]);
        let size = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]) as u64;
        let known = matches!(kind, FRAME_METHOD | FRAME_HEADER | FRAME_BODY)
            || (kind == FRAME_HEARTBEAT && channel == 0 && size == 0);
        if !known || size + FRAME_OVERHEAD as u64 > u64::from(frame_max) {
            return (frames, Some(reply_code::FRAME_ERROR), rest.len());
        }
        let total = size as usize + FRAME_OVERHEAD;
        if rest.len() < total {
            return (frames, None, rest.len());
        }
        if rest[total - 1] != FRAME_END {
            return (frames, Some(reply_code::FRAME_ERROR), rest.len());
        }
        frames.push((kind, channel, &rest[7..total - 1]));
        rest = &rest[total..];
    }
}

/// Harness: a byte stream cut into arbitrary chunks and fed to [`FrameDecoder`] the way
/// the reactor does (`read_buf`, `filled`, then every whole frame).
///
/// Input: a frame_max selector, an 8-byte seed for the chunk sizes, then the stream.
/// Checks: the frames and the error equal those of decoding the whole stream at once;
/// every frame respects frame_max; the decoder's buffer never exceeds frame_max plus one
/// read chunk; `read_buf` always offers room.
pub fn frame_decoder(data: &[u8]) {
    let mut inp = Input::new(data);
    let frame_max = match inp.u8() % 4 {
        0 => FRAME_MIN_SIZE,
        1 => FRAME_MIN_SIZE + u32::from(inp.u16()),
        2 => 131_072,
        _ => 1 << 20,
    };
    let mut rng = XorShift::new(inp.u64());
    let stream = inp.rest();
    let (want_frames, want_err, want_left) = reference_frames(stream, frame_max);

    let bound = frame_max as usize + READ_CHUNK;
    let mut dec = FrameDecoder::new(frame_max);
    let mut got = 0usize;
    let mut pos = 0usize;
    let mut err: Option<FrameError> = None;
    'feed: while pos < stream.len() {
        let chunk = match rng.below(4) {
            0 => 1 + rng.below(8),
            1 => 1 + rng.below(300),
            2 => 1 + rng.below(70_000),
            _ => stream.len() as u64,
        } as usize;
        let buf = dec.read_buf();
        assert!(!buf.is_empty(), "read_buf offers no room");
        let n = buf.len().min(chunk).min(stream.len() - pos);
        buf[..n].copy_from_slice(&stream[pos..pos + n]);
        dec.filled(n);
        pos += n;
        assert!(
            dec.capacity() <= bound,
            "decoder buffer {} > frame_max {frame_max} + read chunk",
            dec.capacity()
        );
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.payload.len() + FRAME_OVERHEAD <= frame_max as usize);
                    let (kind, channel, payload) = want_frames
                        .get(got)
                        .copied()
                        .expect("incremental decoder returned an extra frame");
                    assert_eq!((f.kind, f.channel), (kind, channel));
                    assert_eq!(f.payload, payload);
                    got += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(got, want_frames.len(), "frames missed");
    assert_eq!(err.as_ref().map(|e| e.code), want_err, "{err:?}");
    if let Some(e) = &err {
        assert!(!e.text.is_empty());
    } else {
        assert_eq!(dec.buffered(), want_left);
        assert_eq!(dec.pending().len(), want_left);
    }
    assert!(dec.capacity() <= bound);
}

// ====================================================================================
// 2. field_table
// ====================================================================================

/// What an independent, iterative decoder makes of a field table's wire form.
#[derive(Debug)]
pub struct RefTable {
    /// The table, or why its structure is invalid.
    pub table: Result<FieldTable, &'static str>,
    /// Deepest nesting met before the end or the first structural error (outer table = 1).
    pub depth: usize,
    /// A key is not UTF-8 (amq-protocol refuses those; lepus's own scan does not look).
    pub bad_key: bool,
}

enum Open {
    Table(FieldTable),
    Array(Vec<FieldValue>),
}

/// Decode the field table at the start of `buf` (4-byte length first) without recursion
/// and without any depth limit: the reference the real decoding path is checked against.
pub fn reference_table(buf: &[u8]) -> RefTable {
    let mut depth = 0;
    let mut bad_key = false;
    let table = reference_table_inner(buf, &mut depth, &mut bad_key);
    RefTable {
        table,
        depth,
        bad_key,
    }
}

fn reference_table_inner(
    buf: &[u8],
    depth: &mut usize,
    bad_key: &mut bool,
) -> Result<FieldTable, &'static str> {
    fn take<'b>(buf: &'b [u8], pos: &mut usize, n: usize, end: usize) -> Option<&'b [u8]> {
        let e = pos.checked_add(n).filter(|&e| e <= end)?;
        let s = &buf[*pos..e];
        *pos = e;
        Some(s)
    }
    fn be<const N: usize>(s: &[u8]) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        a
    }
    let len = buf.get(..4).ok_or("truncated length")?;
    let len = u32::from_be_bytes(be(len)) as usize;
    let end = 4usize
        .checked_add(len)
        .filter(|&e| e <= buf.len())
        .ok_or("table past the end")?;
    // (container, its end, key under which it goes into its parent)
    let mut stack: Vec<(Open, usize, String)> =
        vec![(Open::Table(FieldTable::new()), end, String::new())];
    *depth = 1;
    let mut pos = 4;
    loop {
        let (_, cend, _) = stack.last().expect("never empty here");
        let cend = *cend;
        if pos == cend {
            let (done, _, key) = stack.pop().expect("checked");
            let value = match done {
                Open::Table(t) => FieldValue::Table(t),
                Open::Array(a) => FieldValue::Array(a),
            };
            match stack.last_mut() {
                None => match value {
                    FieldValue::Table(t) => return Ok(t),
                    _ => unreachable!("the outer container is a table"),
                },
                Some((Open::Table(t), _, _)) => {
                    t.insert(key, value);
                }
                Some((Open::Array(a), _, _)) => a.push(value),
            }
            continue;
        }
        let key = if matches!(stack.last(), Some((Open::Table(_), _, _))) {
            let klen = *take(buf, &mut pos, 1, cend)
                .ok_or("truncated key")?
                .first()
                .unwrap();
            let k = take(buf, &mut pos, klen as usize, cend).ok_or("key past the end")?;
            match std::str::from_utf8(k) {
                Ok(k) => k.to_owned(),
                Err(_) => {
                    *bad_key = true;
                    String::from_utf8_lossy(k).into_owned()
                }
            }
        } else {
            String::new()
        };
        let tag = take(buf, &mut pos, 1, cend).ok_or("missing type")?[0];
        macro_rules! fixed {
            ($n:expr) => {
                take(buf, &mut pos, $n, cend).ok_or("value past the end")?
            };
        }
        let value = match tag {
            b't' => FieldValue::Bool(fixed!(1)[0] != 0),
            b'b' => FieldValue::I8(fixed!(1)[0] as i8),
            b'B' => FieldValue::U8(fixed!(1)[0]),
            b's' | b'U' => FieldValue::I16(i16::from_be_bytes(be(fixed!(2)))),
            b'u' => FieldValue::U16(u16::from_be_bytes(be(fixed!(2)))),
            b'I' => FieldValue::I32(i32::from_be_bytes(be(fixed!(4)))),
            b'i' => FieldValue::U32(u32::from_be_bytes(be(fixed!(4)))),
            b'l' | b'L' => FieldValue::I64(i64::from_be_bytes(be(fixed!(8)))),
            b'f' => FieldValue::F32(f32::from_be_bytes(be(fixed!(4)))),
            b'd' => FieldValue::F64(f64::from_be_bytes(be(fixed!(8)))),
            b'D' => {
                let d = fixed!(5);
                FieldValue::Decimal {
                    scale: d[0],
                    value: u32::from_be_bytes(be(&d[1..])),
                }
            }
            b'T' => FieldValue::Timestamp(u64::from_be_bytes(be(fixed!(8)))),
            b'V' => FieldValue::Void,
            b'S' | b'x' | b'A' | b'F' => {
                let l = u32::from_be_bytes(be(fixed!(4))) as usize;
                let vend = pos
                    .checked_add(l)
                    .filter(|&e| e <= cend)
                    .ok_or("value length past the end")?;
                if tag == b'A' || tag == b'F' {
                    let open = if tag == b'F' {
                        Open::Table(FieldTable::new())
                    } else {
                        Open::Array(Vec::new())
                    };
                    stack.push((open, vend, key));
                    *depth = (*depth).max(stack.len());
                    continue;
                }
                let bytes = buf[pos..vend].to_vec();
                pos = vend;
                if tag == b'S' {
                    FieldValue::LongString(bytes)
                } else {
                    FieldValue::Bytes(bytes)
                }
            }
            _ => return Err("unknown type"),
        };
        match stack.last_mut().expect("never empty here") {
            (Open::Table(t), _, _) => {
                t.insert(key, value);
            }
            (Open::Array(a), _, _) => a.push(value),
        }
    }
}

/// The wire form of a table, for comparisons (floats compare by their bits).
pub fn table_bytes(t: &FieldTable) -> Vec<u8> {
    let mut out = Vec::new();
    encode_table(t, &mut out, usize::MAX).expect("a decoded table can be encoded");
    out
}

/// lepus's decoding path for a field table: the depth and bounds scan, then (only if it
/// passed) amq-protocol's parser, then the conversion to lepus's types.
pub fn decode_table(buf: &[u8], max_depth: usize) -> Result<FieldTable, String> {
    let len = scan_table(buf, max_depth).map_err(|e| e.to_string())?;
    let (rest, t) =
        parse_field_table(&buf[..len]).map_err(|e| format!("amq-protocol refused: {e}"))?;
    assert!(
        rest.is_empty(),
        "parse_field_table left bytes of a scanned table"
    );
    Ok(table_from_amqp(t))
}

/// Check lepus's table decoding of `buf` against the reference decoder.
fn check_table_bytes(buf: &[u8], max_depth: usize) {
    let reference = reference_table(buf);
    match scan_table(buf, max_depth) {
        Ok(len) => {
            assert_eq!(
                len as u64,
                4 + u64::from(u32::from_be_bytes(buf[..4].try_into().unwrap()))
            );
            let want = reference
                .table
                .as_ref()
                .expect("scan_table accepted a table the reference finds malformed");
            assert!(
                reference.depth <= max_depth,
                "scan_table accepted depth {} > {max_depth}",
                reference.depth
            );
            match parse_field_table(&buf[..len]) {
                Ok((rest, t)) => {
                    assert!(rest.is_empty());
                    assert!(!reference.bad_key, "amq-protocol accepted a non-UTF-8 key");
                    let t = table_from_amqp(t);
                    assert!(t.depth() <= max_depth);
                    let enc = table_bytes(&t);
                    assert_eq!(enc, table_bytes(want), "amq-protocol and reference differ");
                    // The canonical form is a fixed point of decode(encode(..)).
                    let again = decode_table(&enc, max_depth).expect("re-encoded table refused");
                    assert_eq!(table_bytes(&again), enc);
                }
                Err(_) => assert!(
                    reference.bad_key,
                    "amq-protocol refused a table the scan and the reference accept"
                ),
            }
        }
        Err(TableError::TooDeep(d)) => {
            assert_eq!(d, max_depth);
            assert!(
                reference.depth > max_depth,
                "TooDeep for nesting {} <= {max_depth}",
                reference.depth
            );
        }
        Err(TableError::Malformed(why)) => {
            assert!(!why.is_empty());
            assert!(
                reference.table.is_err(),
                "scan_table refused ({why}) a table the reference decodes"
            );
            // The walk stopped within the depth limit, so the recursive parser is safe
            // here too, and must refuse as well.
            assert!(reference.depth <= max_depth);
            assert!(
                parse_field_table(buf).is_err(),
                "amq-protocol accepted a table scan_table finds malformed ({why})"
            );
        }
    }
}

/// Build the wire form of a table nested `levels` containers deep (so `levels + 1`
/// including the outer table), iteratively, with scalars around each level chosen by
/// `inp`. The result is canonical: decoding and re-encoding it gives the same bytes.
pub fn nested_table_bytes(levels: usize, inp: &mut Input<'_>) -> Vec<u8> {
    fn scalar(inp: &mut Input<'_>, out: &mut Vec<u8>) {
        match inp.u8() % 8 {
            0 => out.extend_from_slice(&[b't', inp.u8() & 1]),
            1 => out.extend_from_slice(&[b'b', inp.u8()]),
            2 => {
                out.push(b's');
                out.extend_from_slice(&inp.u16().to_be_bytes());
            }
            3 => {
                out.push(b'I');
                out.extend_from_slice(&inp.u32().to_be_bytes());
            }
            4 => {
                out.push(b'd');
                out.extend_from_slice(&inp.u64().to_be_bytes());
            }
            5 => {
                let s = inp.some_bytes(8);
                out.push(if inp.bool() { b'S' } else { b'x' });
                out.extend_from_slice(&(s.len() as u32).to_be_bytes());
                out.extend_from_slice(s);
            }
            6 => {
                out.push(b'T');
                out.extend_from_slice(&inp.u64().to_be_bytes());
            }
            _ => out.push(b'V'),
        }
    }
    fn patch(out: &mut [u8], at: usize) {
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
    let pattern = inp.u8();
    let siblings = inp.u8();
    let mut out = vec![0, 0, 0, 0];
    // (where its length goes, is a table)
    let mut open: Vec<(usize, bool)> = vec![(0, true)];
    for level in 0..levels {
        let in_table = open.last().expect("outer table").1;
        if siblings & 1 != 0 && (level % 7 == 0 || inp.bool()) {
            if in_table {
                out.extend_from_slice(&[1, b'a']);
            }
            scalar(inp, &mut out);
        }
        if in_table {
            out.extend_from_slice(&[1, b'm']);
        }
        let table = match pattern % 4 {
            0 => true,
            1 => false,
            2 => level % 2 == 0,
            _ => inp.bool(),
        };
        out.push(if table { b'F' } else { b'A' });
        open.push((out.len(), table));
        out.extend_from_slice(&[0, 0, 0, 0]);
    }
    while let Some((at, table)) = open.pop() {
        if siblings & 2 != 0 && (open.len() % 5 == 0 || inp.bool()) {
            if table {
                out.extend_from_slice(&[1, b'z']);
            }
            scalar(inp, &mut out);
        }
        patch(&mut out, at);
    }
    out
}

/// Harness: field tables and arrays. The first byte picks the mode.
///
/// Raw mode: random bytes go to `scan_table` and, when it accepts, to amq-protocol's
/// recursive parser; both are checked against an iterative reference decoder.
///
/// Nesting mode: a generator builds tables and arrays nested up to 6,000 levels (as
/// bytes, iteratively), optionally corrupts one byte, and checks that the depth guard
/// accepts exactly the inputs within the limit (up to the cap of 1,000 levels), that
/// amq-protocol then parses them without a crash, that decoding then encoding gives back
/// the same bytes, and that deeper input is refused before any recursive code sees it.
pub fn field_table(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    if mode & 1 == 0 {
        let max_depth = 1 + inp.below(64);
        check_table_bytes(inp.rest(), max_depth);
        return;
    }
    let max_depth = 1 + inp.below(MAX_TABLE_DEPTH_CAP);
    let levels = match mode >> 1 & 3 {
        0 => inp.below(70),
        1 => max_depth.saturating_sub(3) + inp.below(6),
        2 => inp.below(MAX_TABLE_DEPTH_CAP + 10),
        _ => inp.below(6_000),
    };
    let corrupt = mode & 8 != 0;
    let mut buf = nested_table_bytes(levels, &mut inp);
    if corrupt && !buf.is_empty() {
        let at = inp.below(buf.len());
        buf[at] = buf[at].wrapping_add(inp.u8() | 1);
        check_table_bytes(&buf, max_depth);
        return;
    }
    let depth = levels + 1;
    let reference = reference_table(&buf);
    assert_eq!(reference.depth, depth);
    let want = reference.table.expect("generated table is well-formed");
    assert_eq!(want.depth(), depth);
    if depth <= MAX_TABLE_DEPTH_CAP {
        // (The encoder recurses: lepus calls it only after its iterative depth check.)
        assert_eq!(
            table_bytes(&want),
            buf,
            "reference decoding is not the identity"
        );
    }
    if depth <= max_depth {
        assert_eq!(scan_table(&buf, max_depth), Ok(buf.len()));
        let got = decode_table(&buf, max_depth).expect("a table within the limit is parsed");
        assert_eq!(got.depth(), depth);
        assert_eq!(
            table_bytes(&got),
            buf,
            "decode then encode is not the identity"
        );
        let mut again = Vec::new();
        encode_table(&got, &mut again, max_depth).expect("encodes within the limit");
        assert_eq!(again, buf);
    } else {
        assert_eq!(
            scan_table(&buf, max_depth),
            Err(TableError::TooDeep(max_depth))
        );
        assert!(encode_table(&want, &mut Vec::new(), max_depth).is_err());
        // As headers of a content header: refused cleanly, not parsed.
        let mut payload = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x20, 0];
        payload.extend_from_slice(&buf);
        let err = decode_properties(&payload, max_depth).expect_err("too deep headers");
        assert!(err.contains("deeper than"), "{err}");
    }
}

// ====================================================================================
// 3. content
// ====================================================================================

fn gen_value(inp: &mut Input<'_>, depth_left: usize) -> FieldValue {
    match inp.u8() % 18 {
        0 => FieldValue::Bool(inp.bool()),
        1 => FieldValue::I8(inp.u8() as i8),
        2 => FieldValue::U8(inp.u8()),
        3 => FieldValue::I16(inp.u16() as i16),
        4 => FieldValue::U16(inp.u16()),
        5 => FieldValue::I32(inp.u32() as i32),
        6 => FieldValue::U32(inp.u32()),
        7 => FieldValue::I64(inp.u64() as i64),
        8 => FieldValue::F32(f32::from_bits(inp.u32())),
        9 => FieldValue::F64(f64::from_bits(inp.u64())),
        10 => FieldValue::Decimal {
            scale: inp.u8(),
            value: inp.u32(),
        },
        11 => FieldValue::LongString(inp.some_bytes(40).to_vec()),
        12 => FieldValue::Timestamp(inp.u64()),
        13 => FieldValue::Bytes(inp.some_bytes(40).to_vec()),
        14 if depth_left > 0 => {
            let n = inp.below(4);
            FieldValue::Array((0..n).map(|_| gen_value(inp, depth_left - 1)).collect())
        }
        15 if depth_left > 0 => FieldValue::Table(gen_table(inp, depth_left - 1)),
        _ => FieldValue::Void,
    }
}

/// A field table nested at most `depth_left + 1` levels, chosen by `inp`.
pub fn gen_table(inp: &mut Input<'_>, depth_left: usize) -> FieldTable {
    let mut t = FieldTable::new();
    for _ in 0..inp.below(5) {
        let k = inp.string(12);
        t.insert(k, gen_value(inp, depth_left));
    }
    t
}

/// A table nested exactly `depth` levels (a chain of single-entry tables and arrays).
fn deep_table(inp: &mut Input<'_>, depth: usize) -> FieldTable {
    let mut v = FieldValue::Table(gen_table(inp, 0));
    for i in 1..depth.max(1) {
        v = if i % 3 == 0 {
            FieldValue::Array(vec![v])
        } else {
            FieldValue::Table(FieldTable::new().with("n", v))
        };
    }
    match v {
        FieldValue::Table(t) => t,
        other => FieldTable::new().with("n", other),
    }
}

/// Properties chosen by `inp`; headers up to `max_headers_depth` levels.
pub fn gen_properties(inp: &mut Input<'_>, max_headers_depth: usize) -> BasicProperties {
    let flags = inp.u16();
    let mut p = BasicProperties::new();
    let s = |bit: u16, inp: &mut Input<'_>| (flags & (1 << bit) != 0).then(|| inp.string(64));
    p.content_type = s(15, inp);
    p.content_encoding = s(14, inp);
    if flags & (1 << 13) != 0 {
        p.headers = Some(if inp.u8() % 8 == 0 {
            let d = 1 + inp.below(max_headers_depth + 2);
            deep_table(inp, d)
        } else {
            gen_table(inp, 2)
        });
    }
    p.delivery_mode = (flags & (1 << 12) != 0).then(|| inp.u8());
    p.priority = (flags & (1 << 11) != 0).then(|| inp.u8());
    let s = |bit: u16, inp: &mut Input<'_>| (flags & (1 << bit) != 0).then(|| inp.string(64));
    p.correlation_id = s(10, inp);
    p.reply_to = s(9, inp);
    p.expiration = s(8, inp);
    p.message_id = s(7, inp);
    p.timestamp = (flags & (1 << 6) != 0).then(|| inp.u64());
    p.kind = s(5, inp);
    p.user_id = s(4, inp);
    p.app_id = s(3, inp);
    p.cluster_id = s(2, inp);
    p
}

/// The properties' wire form, for comparisons.
pub fn properties_bytes(p: &BasicProperties) -> Vec<u8> {
    let mut out = Vec::new();
    p.encode(&mut out, usize::MAX)
        .expect("generated properties encode");
    out
}

/// A content header payload: class 60, weight 0, body size, then the properties.
pub fn header_payload(p: &BasicProperties, body_size: u64) -> Vec<u8> {
    let mut out = vec![0, 60, 0, 0];
    out.extend_from_slice(&body_size.to_be_bytes());
    out.extend_from_slice(&properties_bytes(p));
    out
}

fn gen_content_method(inp: &mut Input<'_>) -> ContentMethod {
    match inp.u8() % 3 {
        0 => ContentMethod::Deliver {
            consumer_tag: inp.string(8),
            delivery_tag: inp.u64(),
            redelivered: inp.bool(),
            exchange: inp.string(8),
            routing_key: inp.string(8),
        },
        1 => ContentMethod::GetOk {
            delivery_tag: inp.u64(),
            redelivered: inp.bool(),
            exchange: inp.string(8),
            routing_key: inp.string(8),
            message_count: inp.u32(),
        },
        _ => ContentMethod::Return {
            reply_code: inp.u16(),
            reply_text: inp.string(8),
            exchange: inp.string(8),
            routing_key: inp.string(8),
        },
    }
}

/// Check properties decoded from any payload: within the depth limit, and canonical.
fn check_decoded_properties(p: &BasicProperties, max_depth: usize) {
    if let Some(h) = &p.headers {
        assert!(
            h.depth() <= max_depth,
            "headers deeper than the limit decoded"
        );
    }
    let enc = header_payload(p, 0);
    let again = decode_properties(&enc, max_depth).expect("re-encoded properties refused");
    assert_eq!(properties_bytes(&again), properties_bytes(p));
}

enum Model {
    Idle,
    Header(ContentMethod),
    Body {
        method: ContentMethod,
        properties: Result<Vec<u8>, ContentProblem>,
        expected: u64,
        received: u64,
        body: Vec<u8>,
    },
    /// The body of a too-large content, already handed over: counted, not buffered.
    Skip {
        expected: u64,
        received: u64,
    },
}

fn check_content(
    c: &Content,
    method: &ContentMethod,
    properties: &Result<Vec<u8>, ContentProblem>,
    body: &[u8],
    max_message_size: u64,
) {
    assert_eq!(&c.method, method);
    match (&c.properties, properties) {
        (Ok(p), Ok(want)) => assert_eq!(&properties_bytes(p), want),
        (Err(p), Err(want)) => assert_eq!(p, want),
        (got, want) => panic!("properties {got:?}, expected {want:?}"),
    }
    assert!(c.body.len() as u64 <= max_message_size);
    if matches!(c.properties, Err(ContentProblem::TooLarge { .. })) {
        assert!(
            c.body.is_empty() && c.body.capacity() == 0,
            "too large body buffered"
        );
    } else {
        assert_eq!(c.body, body);
    }
}

/// Harness: arbitrary sequences of content methods, content headers and body frames on
/// a few channels, fed to one [`Assembler`] per channel and to a model of the protocol.
///
/// Checks: each call succeeds or fails exactly as the model says (505 for a frame out of
/// order, 501 for a short header, a wrong class or an overlong body); completed contents
/// carry the announced method, the properties that were encoded (or `TooLarge` /
/// `Undecodable` as due) and the concatenated body; a too-large body is never buffered.
pub fn content(data: &[u8]) {
    const CHANNELS: usize = 3;
    let mut inp = Input::new(data);
    let max_message_size = match inp.u8() % 4 {
        0 => 0,
        1 => u64::from(inp.u8()),
        2 => u64::from(inp.u16()),
        _ => 1 << 20,
    };
    let max_depth = 1 + inp.below(64);
    let mut asm: Vec<Assembler> = (0..CHANNELS).map(|_| Assembler::default()).collect();
    let mut model: Vec<Model> = (0..CHANNELS).map(|_| Model::Idle).collect();
    let mut steps = 0;
    while !inp.is_empty() && steps < 4096 {
        steps += 1;
        let op = inp.u8();
        let ch = (op >> 4) as usize % CHANNELS;
        let a = &mut asm[ch];
        let m = &mut model[ch];
        let failed = match op % 8 {
            0 | 1 => {
                let method = gen_content_method(&mut inp);
                let r = a.start(method.clone());
                match m {
                    Model::Idle => {
                        r.expect("start on an idle channel");
                        *m = Model::Header(method);
                        false
                    }
                    _ => {
                        assert_eq!(r.unwrap_err().code, reply_code::UNEXPECTED_FRAME);
                        true
                    }
                }
            }
            2..=4 => {
                let (payload, want_props) = match inp.u8() % 4 {
                    0 => (inp.some_bytes(600).to_vec(), None),
                    1 => {
                        let mut p = vec![0, 60, 0, 0];
                        p.extend_from_slice(&inp.u64().to_be_bytes());
                        p.extend_from_slice(inp.some_bytes(600));
                        (p, None)
                    }
                    _ => {
                        let size = match inp.u8() % 4 {
                            0 => 0,
                            1 => u64::from(inp.u8()),
                            2 => max_message_size + u64::from(inp.u8() % 3),
                            _ => inp.u64(),
                        };
                        let p = gen_properties(&mut inp, max_depth);
                        (header_payload(&p, size), Some(p))
                    }
                };
                let r = a.header(&payload, max_message_size, max_depth);
                match std::mem::replace(m, Model::Idle) {
                    Model::Header(method) => {
                        if payload.len() < 12 || payload[..2] != [0, 60] {
                            assert_eq!(r.unwrap_err().code, reply_code::FRAME_ERROR);
                            true
                        } else {
                            let size = u64::from_be_bytes(payload[4..12].try_into().unwrap());
                            if size > max_message_size {
                                // Reported at once, without waiting for a body that may
                                // never come; the body frames are then counted.
                                let c = r
                                    .expect("a well-formed header in order")
                                    .expect("a too-large content is reported at its header");
                                let too_large = Err(ContentProblem::TooLarge {
                                    size,
                                    max: max_message_size,
                                });
                                check_content(&c, &method, &too_large, &[], max_message_size);
                                *m = Model::Skip {
                                    expected: size,
                                    received: 0,
                                };
                                false
                            } else {
                                let d = decode_properties(&payload, max_depth);
                                if let Ok(p) = &d {
                                    check_decoded_properties(p, max_depth);
                                }
                                match (&d, &want_props) {
                                    (Ok(got), Some(want)) => {
                                        assert_eq!(properties_bytes(got), properties_bytes(want))
                                    }
                                    (Err(e), Some(want)) => {
                                        let deep = want.headers.as_ref().unwrap().depth();
                                        assert!(deep > max_depth, "valid properties refused: {e}");
                                        assert!(e.contains("deeper than"), "{e}");
                                    }
                                    _ => {}
                                }
                                let properties = d
                                    .map(|p| properties_bytes(&p))
                                    .map_err(ContentProblem::Undecodable);
                                let r = r.expect("a well-formed header in order");
                                if size == 0 {
                                    let c = r.expect("empty body completes at the header");
                                    check_content(&c, &method, &properties, &[], max_message_size);
                                } else {
                                    assert!(r.is_none());
                                    *m = Model::Body {
                                        method,
                                        properties,
                                        expected: size,
                                        received: 0,
                                        body: Vec::new(),
                                    };
                                }
                                false
                            }
                        }
                    }
                    other => {
                        *m = other;
                        assert_eq!(r.unwrap_err().code, reply_code::UNEXPECTED_FRAME);
                        true
                    }
                }
            }
            _ => {
                let fill;
                let chunk: &[u8] = if inp.bool() {
                    inp.some_bytes(300)
                } else {
                    fill = vec![inp.u8(); inp.u16() as usize];
                    &fill
                };
                let r = a.body(chunk);
                match m {
                    Model::Body {
                        method,
                        properties,
                        expected,
                        received,
                        body,
                    } => {
                        if *received + chunk.len() as u64 > *expected {
                            assert_eq!(r.unwrap_err().code, reply_code::FRAME_ERROR);
                            true
                        } else {
                            *received += chunk.len() as u64;
                            body.extend_from_slice(chunk);
                            let r = r.expect("a body frame in order");
                            if received == expected {
                                let c = r.expect("the last body frame completes the content");
                                check_content(&c, method, properties, body, max_message_size);
                                *m = Model::Idle;
                            } else {
                                assert!(r.is_none());
                            }
                            false
                        }
                    }
                    Model::Skip { expected, received } => {
                        if *received + chunk.len() as u64 > *expected {
                            assert_eq!(r.unwrap_err().code, reply_code::FRAME_ERROR);
                            true
                        } else {
                            *received += chunk.len() as u64;
                            assert!(r.expect("a skipped body frame in order").is_none());
                            if received == expected {
                                *m = Model::Idle;
                            }
                            false
                        }
                    }
                    _ => {
                        assert_eq!(r.unwrap_err().code, reply_code::UNEXPECTED_FRAME);
                        true
                    }
                }
            }
        };
        // After a violation the connection closes: that channel's assembler is not used
        // again. Model a new connection.
        if failed {
            asm[ch] = Assembler::default();
            model[ch] = Model::Idle;
        }
        for (a, m) in asm.iter().zip(&model) {
            assert_eq!(a.is_idle(), matches!(m, Model::Idle));
        }
    }
}

// ====================================================================================
// 4. engine
// ====================================================================================

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
            | Command::Close { bytes, .. } => bytes.len(),
        };
        let before = self.engine.output().len();
        self.engine.on_command(cmd, self.now);
        assert!(self.engine.output().len() <= before + len);
    }

    fn channel_id(&self, inp: &mut Input<'_>) -> u16 {
        match inp.u8() % 8 {
            0 => 0,
            1..=5 if !self.channels.is_empty() => self.channels[inp.below(self.channels.len())].id,
            _ => inp.u16() % (self.conn.tuned.channel_max + 2),
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

    /// Synthesize a frame a server might send (or not), encoded for real.
    fn server_frame(&mut self, inp: &mut Input<'_>) -> Vec<u8> {
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

    fn open_channel(&mut self) {
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
        });
    }

    /// `Consumer::cancel` (or, with `drop`, dropping the `Consumer`): the consumer stops
    /// holding reading back, and `basic.cancel` goes out.
    fn cancel_consumer(&mut self, i: usize, drop: bool) {
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

    fn rpc(&mut self, inp: &mut Input<'_>) {
        let Some(ch) = self.channels.get(inp.below(self.channels.len())) else {
            return;
        };
        let id = ch.id;
        let (reply, rx) = oneshot::channel();
        self.replies.push(rx);
        let mut bytes = Vec::new();
        let (m, consumer) = match inp.u8() % 4 {
            0 | 1 => {
                let capacity = 1 + inp.below(4);
                let (tx, crx) = queue::unbounded();
                let shared = Arc::new(ConsumerShared::new(capacity));
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
                    Some(ConsumerSink { tx, shared, no_ack }),
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
        put_method(&mut bytes, id, m).expect("client method encodes");
        self.command(Command::Rpc {
            channel: id,
            bytes,
            reply,
            consumer,
        });
    }
}

fn frame_bytes(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
    out
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
            11 => {
                if let Some(ch) = h.channels.get(inp.below(h.channels.len())) {
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
                        h.frame_max,
                        8,
                    )
                    .expect("publish encodes");
                    h.command(Command::Send(bytes));
                }
            }
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
            14 => {
                if inp.u8() % 8 == 0 {
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
                    h.replies.push(rx);
                    if h.engine.is_open() {
                        h.closed_by_us = true;
                    }
                    h.command(Command::Close { bytes, reply });
                } else if let Some(ch) = h.channels.get(inp.below(h.channels.len())) {
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
                    h.replies.push(rx);
                    h.command(Command::CloseChannel {
                        channel: id,
                        bytes,
                        reply: Some(reply),
                    });
                }
            }
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

// ====================================================================================
// 5. uri
// ====================================================================================

fn percent_encode(s: &str, inp: &mut Input<'_>) -> String {
    let upper = inp.bool();
    let mut out = String::new();
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else if upper {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

fn check_options(r: &crate::Result<ConnectionOptions>) {
    match r {
        Ok(o) => {
            assert!(o.frame_max == 0 || o.frame_max >= FRAME_MIN_SIZE);
            assert!(!o.host.is_empty());
            assert!(!o.vhost.is_empty());
        }
        Err(e) => {
            assert!(matches!(e, Error::InvalidUri(_)), "{e:?}");
            assert!(!e.to_string().is_empty());
        }
    }
}

/// Harness: `ConnectionOptions::from_uri`. Odd first byte: the rest as a string (lossy
/// UTF-8), which must parse or be refused with `InvalidUri`. Even: a URI built from
/// chosen parts, percent-encoded, which must parse back to exactly those parts.
pub fn uri(data: &[u8]) {
    let mut inp = Input::new(data);
    if inp.u8() & 1 == 1 {
        let s = String::from_utf8_lossy(inp.rest());
        check_options(&ConnectionOptions::from_uri(&s));
        return;
    }
    let d = ConnectionOptions::default();
    let mut uri = String::from("amqp://");
    let creds = inp.bool().then(|| (inp.string(20), inp.string(20)));
    if let Some((u, p)) = &creds {
        uri += &percent_encode(u, &mut inp);
        if !p.is_empty() || inp.bool() {
            uri.push(':');
            uri += &percent_encode(p, &mut inp);
        }
        uri.push('@');
    }
    let host = inp.string(20);
    uri += &percent_encode(&host, &mut inp);
    let port = inp.bool().then(|| inp.u16());
    if let Some(p) = port {
        uri += &format!(":{p}");
    }
    let vhost = match inp.u8() % 3 {
        0 => None,
        1 => Some(String::new()),
        _ => Some(inp.string(20)),
    };
    if let Some(v) = &vhost {
        uri.push('/');
        uri += &percent_encode(v, &mut inp);
    }
    let heartbeat = inp.bool().then(|| inp.u16());
    let frame_max = inp.bool().then(|| inp.u32() >> (inp.u8() % 32));
    let channel_max = inp.bool().then(|| inp.u16());
    let timeout = inp.bool().then(|| u64::from(inp.u32()));
    let name = inp.bool().then(|| inp.string(20));
    let auth = inp.bool().then(|| inp.bool());
    let mut q = Vec::new();
    if let Some(v) = heartbeat {
        q.push(format!("heartbeat={v}"));
    }
    if let Some(v) = frame_max {
        q.push(format!("frame_max={v}"));
    }
    if let Some(v) = channel_max {
        q.push(format!("channel_max={v}"));
    }
    if let Some(v) = timeout {
        q.push(format!("connection_timeout={v}"));
    }
    if let Some(v) = &name {
        q.push(format!("connection_name={}", percent_encode(v, &mut inp)));
    }
    if let Some(v) = auth {
        q.push(format!(
            "auth_mechanism={}",
            if v { "AMQPLAIN" } else { "plain" }
        ));
    }
    if !q.is_empty() {
        uri.push('?');
        uri += &q.join("&");
    }
    let r = ConnectionOptions::from_uri(&uri);
    check_options(&r);
    if frame_max.is_some_and(|f| f != 0 && f < FRAME_MIN_SIZE) {
        assert!(r.is_err(), "frame_max below 4096 accepted: {uri}");
        return;
    }
    let o = r.unwrap_or_else(|e| panic!("{uri:?} refused: {e}"));
    let (user, pass) = creds.unwrap_or((d.username.clone(), d.password.clone()));
    assert_eq!(o.username, user, "{uri}");
    assert_eq!(o.password, pass, "{uri}");
    assert_eq!(o.host, if host.is_empty() { d.host } else { host }, "{uri}");
    assert_eq!(o.port, port.unwrap_or(d.port));
    let want_vhost = match vhost {
        Some(v) if !v.is_empty() => v,
        _ => d.vhost,
    };
    assert_eq!(o.vhost, want_vhost, "{uri}");
    assert_eq!(o.heartbeat, heartbeat.unwrap_or(d.heartbeat));
    assert_eq!(o.frame_max, frame_max.unwrap_or(d.frame_max));
    assert_eq!(o.channel_max, channel_max.unwrap_or(d.channel_max));
    assert_eq!(
        o.connection_timeout,
        timeout.map_or(d.connection_timeout, Duration::from_millis)
    );
    assert_eq!(o.connection_name, name);
    let want_auth = match auth {
        Some(true) => AuthMechanism::AmqPlain,
        Some(false) => AuthMechanism::Plain,
        None => d.auth,
    };
    assert_eq!(o.auth, want_auth);
}

/// A harness: takes the fuzzer's bytes, panics when a property does not hold.
pub type Harness = fn(&[u8]);

/// The harnesses by target name, for tools that replay saved inputs.
pub const TARGETS: &[(&str, Harness)] = &[
    ("frame_decoder", frame_decoder),
    ("field_table", field_table),
    ("content", content),
    ("engine", engine),
    ("uri", uri),
];
