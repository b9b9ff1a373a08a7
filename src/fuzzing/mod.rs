//! Fuzz harnesses for all lepus reads from the network; built only with the `fuzzing` feature.
//!
//! Not part of lepus's API, and not in its normal build: the non-default `fuzzing` feature
//! builds this module, for `fuzz/` (whose lepus dependency enables it) and for lepus's own
//! tests (through lepus's dev-dependency on itself), never for `cargo build`.
//!
//! Each harness is a plain `fn(&[u8])`: the targets in `fuzz/fuzz_targets/` call them,
//! and `tests/fuzz_regressions.rs` replays saved inputs through the very same functions
//! in the normal `cargo test` run. A harness does more than call the code: it checks
//! properties (frames decoded incrementally equal frames decoded at once, memory stays
//! within its bounds, what the depth guard accepts amq-protocol parses, encode then
//! decode is the identity, a violation ends in a clean error state) and panics when one
//! does not hold, which libFuzzer reports as a crash. One file per target; this one holds
//! what they share: [`Input`], [`XorShift`], the generators of tables and properties.
//!
//! The structure-aware harnesses read their choices from the bytes with [`Input`], the
//! same idea as `arbitrary::Unstructured`, so no extra dependency is needed to build or
//! replay them.
//!
//! What the harnesses encode goes through lepus's own encoders (`put_method`,
//! `put_publish`, `encode_table`, `BasicProperties::encode`) except where the point is
//! bytes lepus never writes: frames of any type around any payload and content headers
//! announcing any size or class (`engine/server.rs`), tables nested deeper than the
//! encoder accepts, built without recursion (`field_table.rs`). Those stay hand-made here
//! rather than coming from lepus-testkit, which is a dev-dependency only: the harnesses
//! live inside the library to reach its internals.

#![doc(hidden)]
// Built on the socket and handle layers, which the loom models leave out.
#![cfg(not(lepus_loom))]

mod content;
mod engine;
mod field_table;
mod frame_decoder;
mod lenient;
mod uri;

use crate::protocol::properties::BasicProperties;
use crate::protocol::table::{FieldTable, FieldValue};

pub use crate::protocol::table::{DEFAULT_MAX_TABLE_DEPTH, MAX_TABLE_DEPTH_CAP};
pub use content::content;
pub use engine::engine;
pub use field_table::{
    RefTable, decode_table, field_table, nested_table_bytes, reference_table, table_bytes,
};
pub use frame_decoder::frame_decoder;
pub use lenient::lenient;
pub use uri::uri;

/// A harness: takes the fuzzer's bytes, panics when a property does not hold.
pub type Harness = fn(&[u8]);

/// The harnesses by target name, for tools that replay saved inputs.
pub const TARGETS: &[(&str, Harness)] = &[
    ("frame_decoder", frame_decoder),
    ("field_table", field_table),
    ("content", content),
    ("engine", engine),
    ("uri", uri),
    ("lenient", lenient),
];

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
// Tables and properties chosen by the input (content and engine)
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
        p.headers = Some(if inp.u8().is_multiple_of(8) {
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
    let mut out = header_prefix_bytes(body_size);
    out.extend_from_slice(&properties_bytes(p));
    out
}

/// The first 12 bytes of a content header payload: class 60, weight 0, `body_size`. By
/// hand: the harnesses announce sizes no body follows, and headers whose properties
/// lepus's encoder would refuse (too deep) or never write (garbage).
fn header_prefix_bytes(body_size: u64) -> Vec<u8> {
    let mut out = vec![0, 60, 0, 0];
    out.extend_from_slice(&body_size.to_be_bytes());
    out
}
