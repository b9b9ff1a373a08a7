//! The `field_table` target: raw and deeply nested tables, against an iterative reference.

use amq_protocol::types::parsing::parse_field_table;

use super::{Input, header_prefix_bytes};
use crate::protocol::properties::decode_properties;
use crate::protocol::table::{
    FieldTable, FieldValue, MAX_TABLE_DEPTH_CAP, TableError, encode_table, scan_table,
    table_from_amqp,
};

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
///
/// Bytes by hand, not `encode_table`: the encoder recurses and refuses what is deeper
/// than the cap, and the point here is input up to 6,000 levels deep.
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
        if siblings & 2 != 0 && (open.len().is_multiple_of(5) || inp.bool()) {
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
        let mut payload = header_prefix_bytes(1);
        payload.extend_from_slice(&[0x20, 0]); // property flags: headers only
        payload.extend_from_slice(&buf);
        let err = decode_properties(&payload, max_depth).expect_err("too deep headers");
        assert!(err.contains("deeper than"), "{err}");
    }
}
