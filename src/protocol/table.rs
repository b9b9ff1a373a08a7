//! Field tables and arrays: lepus's own value types, a depth-bounded wire scanner that
//! runs before amq-protocol's recursive parser sees a table, and the encoder.

use std::collections::BTreeMap;

use amq_protocol::types as amqp;

/// A value in a [`FieldTable`] or field array, with RabbitMQ's type tags.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum FieldValue {
    /// `t`
    Bool(bool),
    /// `b`
    I8(i8),
    /// `B`
    U8(u8),
    /// `s`
    I16(i16),
    /// `u`
    U16(u16),
    /// `I`
    I32(i32),
    /// `i`
    U32(u32),
    /// `l`
    I64(i64),
    /// `f`
    F32(f32),
    /// `d`
    F64(f64),
    /// `D`: a decimal with `scale` digits after the point.
    Decimal {
        /// Digits after the decimal point.
        scale: u8,
        /// The unscaled value.
        value: u32,
    },
    /// `S`: a long string (bytes; usually UTF-8).
    LongString(Vec<u8>),
    /// `A`
    Array(Vec<FieldValue>),
    /// `T`: seconds since the epoch.
    Timestamp(u64),
    /// `F`
    Table(FieldTable),
    /// `x`
    Bytes(Vec<u8>),
    /// `V`
    Void,
}

impl FieldValue {
    /// The value as a string, if it is a UTF-8 long string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::LongString(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value as an i64, if it is any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            FieldValue::I8(v) => v.into(),
            FieldValue::U8(v) => v.into(),
            FieldValue::I16(v) => v.into(),
            FieldValue::U16(v) => v.into(),
            FieldValue::I32(v) => v.into(),
            FieldValue::U32(v) => v.into(),
            FieldValue::I64(v) => v,
            _ => return None,
        })
    }
}

impl From<&str> for FieldValue {
    fn from(s: &str) -> Self {
        FieldValue::LongString(s.as_bytes().to_vec())
    }
}
impl From<String> for FieldValue {
    fn from(s: String) -> Self {
        FieldValue::LongString(s.into_bytes())
    }
}
impl From<bool> for FieldValue {
    fn from(v: bool) -> Self {
        FieldValue::Bool(v)
    }
}
impl From<i32> for FieldValue {
    fn from(v: i32) -> Self {
        FieldValue::I32(v)
    }
}
impl From<i64> for FieldValue {
    fn from(v: i64) -> Self {
        FieldValue::I64(v)
    }
}
impl From<u32> for FieldValue {
    fn from(v: u32) -> Self {
        FieldValue::U32(v)
    }
}
impl From<FieldTable> for FieldValue {
    fn from(v: FieldTable) -> Self {
        FieldValue::Table(v)
    }
}

/// An AMQP field table: message headers, queue and consumer arguments.
///
/// ```
/// use lepus::{FieldTable, FieldValue};
/// let mut args = FieldTable::new().with("x-max-length", 1000).with("x-overflow", "reject-publish");
/// args.insert("x-message-ttl", 60_000);
/// assert_eq!(args.get("x-overflow").and_then(FieldValue::as_str), Some("reject-publish"));
/// assert_eq!(args.get("x-max-length").and_then(FieldValue::as_i64), Some(1000));
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldTable(BTreeMap<String, FieldValue>);

impl FieldTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }
    /// Insert a value (keys longer than 255 bytes are refused when the table is sent).
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<FieldValue>) -> &mut Self {
        self.0.insert(key.into(), value.into());
        self
    }
    /// Builder form of [`FieldTable::insert`].
    pub fn with(mut self, key: impl Into<String>, value: impl Into<FieldValue>) -> Self {
        self.insert(key, value);
        self
    }
    /// Look a key up.
    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.0.get(key)
    }
    /// Remove a key.
    pub fn remove(&mut self, key: &str) -> Option<FieldValue> {
        self.0.remove(key)
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &FieldValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Nesting depth: 1 for a table without nested tables or arrays. Iterative, so a
    /// table of any depth can be measured without risk to the stack.
    pub fn depth(&self) -> usize {
        let mut max = 0;
        let mut stack: Vec<(&FieldValue, usize)> = Vec::new();
        max = max.max(1);
        for v in self.0.values() {
            stack.push((v, 1));
        }
        while let Some((v, d)) = stack.pop() {
            match v {
                FieldValue::Table(t) => {
                    max = max.max(d + 1);
                    stack.extend(t.0.values().map(|v| (v, d + 1)));
                }
                FieldValue::Array(a) => {
                    max = max.max(d + 1);
                    stack.extend(a.iter().map(|v| (v, d + 1)));
                }
                _ => {}
            }
        }
        max
    }
}

impl Drop for FieldTable {
    // Dropping a deeply nested table recursively would overflow the stack; flatten it
    // first so that any table that can be built can also be dropped.
    fn drop(&mut self) {
        let mut pending: Vec<FieldValue> = Vec::new();
        for (_, v) in std::mem::take(&mut self.0) {
            if matches!(v, FieldValue::Table(_) | FieldValue::Array(_)) {
                pending.push(v);
            }
        }
        while let Some(v) = pending.pop() {
            match v {
                FieldValue::Table(mut t) => {
                    for (_, v) in std::mem::take(&mut t.0) {
                        if matches!(v, FieldValue::Table(_) | FieldValue::Array(_)) {
                            pending.push(v);
                        }
                    }
                }
                FieldValue::Array(a) => {
                    pending.extend(
                        a.into_iter()
                            .filter(|v| matches!(v, FieldValue::Table(_) | FieldValue::Array(_))),
                    );
                }
                _ => {}
            }
        }
    }
}

impl<K: Into<String>, V: Into<FieldValue>> FromIterator<(K, V)> for FieldTable {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        FieldTable(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// Why a table's wire form was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableError {
    /// Nested deeper than the limit.
    TooDeep(usize),
    /// Truncated, an unknown type tag, or a length that overruns its container.
    Malformed(&'static str),
}

impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableError::TooDeep(max) => write!(f, "field table nested deeper than {max} levels"),
            TableError::Malformed(why) => write!(f, "malformed field table: {why}"),
        }
    }
}

fn value_fixed_len(tag: u8) -> Option<usize> {
    Some(match tag {
        b't' | b'b' | b'B' => 1,
        b's' | b'U' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'D' => 5,
        b'l' | b'L' | b'd' | b'T' => 8,
        b'V' => 0,
        _ => return None,
    })
}

fn read_u32(buf: &[u8], pos: usize) -> Result<u32, TableError> {
    buf.get(pos..pos + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(TableError::Malformed("truncated length"))
}

/// Check the field table whose 4-byte length starts at `buf[0]`: every length within
/// its container, every tag known, and nesting (tables and arrays) at most `max_depth`
/// levels, the outer table counting as 1. Returns the table's total wire length.
///
/// This walks the bytes with an explicit stack, so its own depth is not limited by the
/// thread's stack; only input it accepts is then given to amq-protocol's parser.
pub fn scan_table(buf: &[u8], max_depth: usize) -> Result<usize, TableError> {
    let len = read_u32(buf, 0)? as usize;
    let end = 4usize
        .checked_add(len)
        .filter(|&e| e <= buf.len())
        .ok_or(TableError::Malformed(
            "table length past the end of its frame",
        ))?;
    if max_depth == 0 {
        return Err(TableError::TooDeep(0));
    }
    // (end offset, is_table)
    let mut stack: Vec<(usize, bool)> = vec![(end, true)];
    let mut pos = 4;
    while let Some(&(cend, is_table)) = stack.last() {
        if pos == cend {
            stack.pop();
            continue;
        }
        if is_table {
            let klen = *buf.get(pos).ok_or(TableError::Malformed("truncated key"))? as usize;
            pos += 1 + klen;
            if pos > cend {
                return Err(TableError::Malformed("key past the end of its table"));
            }
        }
        let tag = *buf
            .get(pos)
            .filter(|_| pos < cend)
            .ok_or(TableError::Malformed("missing value type"))?;
        pos += 1;
        match tag {
            b'S' | b'x' | b'A' | b'F' => {
                let l = read_u32(buf, pos)? as usize;
                pos += 4;
                let vend =
                    pos.checked_add(l)
                        .filter(|&e| e <= cend)
                        .ok_or(TableError::Malformed(
                            "value length past the end of its container",
                        ))?;
                if tag == b'A' || tag == b'F' {
                    if stack.len() >= max_depth {
                        return Err(TableError::TooDeep(max_depth));
                    }
                    stack.push((vend, tag == b'F'));
                } else {
                    pos = vend;
                }
            }
            t => {
                let l = value_fixed_len(t).ok_or(TableError::Malformed("unknown value type"))?;
                pos += l;
                if pos > cend {
                    return Err(TableError::Malformed("value past the end of its container"));
                }
            }
        }
    }
    Ok(end)
}

// ---- conversions from amq-protocol's types (input already depth-checked) ----

pub(crate) fn table_from_amqp(t: amqp::FieldTable) -> FieldTable {
    FieldTable(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_from_amqp(v)))
            .collect(),
    )
}

fn value_from_amqp(v: &amqp::AMQPValue) -> FieldValue {
    use amqp::AMQPValue as A;
    match v {
        A::Boolean(b) => FieldValue::Bool(*b),
        A::ShortShortInt(v) => FieldValue::I8(*v),
        A::ShortShortUInt(v) => FieldValue::U8(*v),
        A::ShortInt(v) => FieldValue::I16(*v),
        A::ShortUInt(v) => FieldValue::U16(*v),
        A::LongInt(v) => FieldValue::I32(*v),
        A::LongUInt(v) => FieldValue::U32(*v),
        A::LongLongInt(v) => FieldValue::I64(*v),
        A::Float(v) => FieldValue::F32(*v),
        A::Double(v) => FieldValue::F64(*v),
        A::DecimalValue(d) => FieldValue::Decimal {
            scale: d.scale,
            value: d.value,
        },
        A::ShortString(s) => FieldValue::LongString(s.as_str().as_bytes().to_vec()),
        A::LongString(s) => FieldValue::LongString(s.as_bytes().to_vec()),
        A::FieldArray(a) => FieldValue::Array(a.as_slice().iter().map(value_from_amqp).collect()),
        A::Timestamp(t) => FieldValue::Timestamp(*t),
        A::FieldTable(t) => FieldValue::Table(FieldTable(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), value_from_amqp(v)))
                .collect(),
        )),
        A::ByteArray(b) => FieldValue::Bytes(b.as_slice().to_vec()),
        A::Void => FieldValue::Void,
    }
}

// ---- encoding ----

/// Largest nesting depth lepus will encode or decode by default.
pub const DEFAULT_MAX_TABLE_DEPTH: usize = 64;
/// Hard cap on the configurable depth: amq-protocol's parser recurses per level, and a
/// table this deep must decode on a 2 MiB thread stack (Rust's default for spawned
/// threads, where the handshake may run) even in a debug build.
pub const MAX_TABLE_DEPTH_CAP: usize = 128;

/// Append the wire form of `t` (with its 4-byte length) to `out`.
pub fn encode_table(t: &FieldTable, out: &mut Vec<u8>, max_depth: usize) -> Result<(), String> {
    let d = t.depth();
    if d > max_depth {
        return Err(format!(
            "field table nested {d} levels deep; the limit is {max_depth}"
        ));
    }
    encode_table_unchecked(t, out)
}

fn encode_table_unchecked(t: &FieldTable, out: &mut Vec<u8>) -> Result<(), String> {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    for (k, v) in &t.0 {
        put_short_str(out, k)?;
        encode_value(v, out)?;
    }
    patch_len(out, at)
}

fn patch_len(out: &mut [u8], at: usize) -> Result<(), String> {
    let len = u32::try_from(out.len() - at - 4).map_err(|_| "field table over 4 GiB".to_owned())?;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

pub(crate) fn put_short_str(out: &mut Vec<u8>, s: &str) -> Result<(), String> {
    let len = u8::try_from(s.len())
        .map_err(|_| format!("short string of {} bytes (max 255): {:.40}...", s.len(), s))?;
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_long_bytes(out: &mut Vec<u8>, b: &[u8]) -> Result<(), String> {
    let len = u32::try_from(b.len()).map_err(|_| "long string over 4 GiB".to_owned())?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}

fn encode_value(v: &FieldValue, out: &mut Vec<u8>) -> Result<(), String> {
    match v {
        FieldValue::Bool(b) => out.extend_from_slice(&[b't', *b as u8]),
        FieldValue::I8(v) => out.extend_from_slice(&[b'b', *v as u8]),
        FieldValue::U8(v) => out.extend_from_slice(&[b'B', *v]),
        FieldValue::I16(v) => {
            out.push(b's');
            out.extend_from_slice(&v.to_be_bytes());
        }
        FieldValue::U16(v) => {
            out.push(b'u');
            out.extend_from_slice(&v.to_be_bytes());
        }
        FieldValue::I32(v) => {
            out.push(b'I');
            out.extend_from_slice(&v.to_be_bytes());
        }
        FieldValue::U32(v) => {
            out.push(b'i');
            out.extend_from_slice(&v.to_be_bytes());
        }
        FieldValue::I64(v) => {
            out.push(b'l');
            out.extend_from_slice(&v.to_be_bytes());
        }
        FieldValue::F32(v) => {
            out.push(b'f');
            out.extend_from_slice(&v.to_be_bytes());
        }
        FieldValue::F64(v) => {
            out.push(b'd');
            out.extend_from_slice(&v.to_be_bytes());
        }
        FieldValue::Decimal { scale, value } => {
            out.push(b'D');
            out.push(*scale);
            out.extend_from_slice(&value.to_be_bytes());
        }
        FieldValue::LongString(s) => {
            out.push(b'S');
            put_long_bytes(out, s)?;
        }
        FieldValue::Array(a) => {
            out.push(b'A');
            let at = out.len();
            out.extend_from_slice(&[0; 4]);
            for v in a {
                encode_value(v, out)?;
            }
            patch_len(out, at)?;
        }
        FieldValue::Timestamp(t) => {
            out.push(b'T');
            out.extend_from_slice(&t.to_be_bytes());
        }
        FieldValue::Table(t) => {
            out.push(b'F');
            encode_table_unchecked(t, out)?;
        }
        FieldValue::Bytes(b) => {
            out.push(b'x');
            put_long_bytes(out, b)?;
        }
        FieldValue::Void => out.push(b'V'),
    }
    Ok(())
}

/// Convert for amq-protocol's method structs (arguments tables of RPCs).
pub(crate) fn table_to_amqp(t: &FieldTable) -> amqp::FieldTable {
    let mut out = amqp::FieldTable::default();
    for (k, v) in &t.0 {
        out.insert(k.as_str().into(), value_to_amqp(v));
    }
    out
}

fn value_to_amqp(v: &FieldValue) -> amqp::AMQPValue {
    use amqp::AMQPValue as A;
    match v {
        FieldValue::Bool(b) => A::Boolean(*b),
        FieldValue::I8(v) => A::ShortShortInt(*v),
        FieldValue::U8(v) => A::ShortShortUInt(*v),
        FieldValue::I16(v) => A::ShortInt(*v),
        FieldValue::U16(v) => A::ShortUInt(*v),
        FieldValue::I32(v) => A::LongInt(*v),
        FieldValue::U32(v) => A::LongUInt(*v),
        FieldValue::I64(v) => A::LongLongInt(*v),
        FieldValue::F32(v) => A::Float(*v),
        FieldValue::F64(v) => A::Double(*v),
        FieldValue::Decimal { scale, value } => A::DecimalValue(amqp::DecimalValue {
            scale: *scale,
            value: *value,
        }),
        FieldValue::LongString(s) => A::LongString(s.clone().into()),
        FieldValue::Array(a) => {
            let mut arr = amqp::FieldArray::default();
            for v in a {
                arr.push(value_to_amqp(v));
            }
            A::FieldArray(arr)
        }
        FieldValue::Timestamp(t) => A::Timestamp(*t),
        FieldValue::Table(t) => A::FieldTable(table_to_amqp(t)),
        FieldValue::Bytes(b) => A::ByteArray(b.clone().into()),
        FieldValue::Void => A::Void,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> FieldTable {
        let mut t = FieldTable::new().with("leaf", 1);
        for _ in 1..depth {
            t = FieldTable::new().with("n", t);
        }
        t
    }

    #[test]
    fn scan_accepts_within_limit_and_refuses_beyond() {
        let mut buf = Vec::new();
        encode_table(&nested(10), &mut buf, 64).unwrap();
        assert_eq!(scan_table(&buf, 10), Ok(buf.len()));
        assert_eq!(scan_table(&buf, 9), Err(TableError::TooDeep(9)));
    }

    #[test]
    fn deep_table_is_measured_encoded_refused_and_dropped_without_recursion() {
        let t = nested(100_000);
        assert_eq!(t.depth(), 100_000);
        let mut buf = Vec::new();
        assert!(encode_table(&t, &mut buf, 64).is_err());
        drop(t);
    }

    #[test]
    fn scan_rejects_overrunning_lengths_and_unknown_tags() {
        // table claims 10 bytes but only 2 follow
        assert!(matches!(
            scan_table(&[0, 0, 0, 10, 1, b'a'], 8),
            Err(TableError::Malformed(_))
        ));
        // unknown tag 'Z'
        assert!(matches!(
            scan_table(&[0, 0, 0, 3, 1, b'a', b'Z'], 8),
            Err(TableError::Malformed(_))
        ));
        // nested table whose length overruns the outer one
        assert!(matches!(
            scan_table(&[0, 0, 0, 7, 1, b'a', b'F', 0, 0, 0, 9], 8),
            Err(TableError::Malformed(_))
        ));
    }

    #[test]
    fn round_trip_through_amq_protocol_parser() {
        let t = FieldTable::new()
            .with("s", "text")
            .with("i", 7)
            .with("b", true)
            .with("n", FieldTable::new().with("x", 1i64))
            .with(
                "a",
                FieldValue::Array(vec![FieldValue::U8(3), FieldValue::Void, "z".into()]),
            );
        let mut buf = Vec::new();
        encode_table(&t, &mut buf, 8).unwrap();
        scan_table(&buf, 8).unwrap();
        let (_, parsed) = amqp::parsing::parse_field_table(&buf[..]).unwrap();
        assert_eq!(table_from_amqp(parsed), t);
    }
}
