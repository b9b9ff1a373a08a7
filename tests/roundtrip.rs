//! Round-trip properties in the normal test run: what lepus encodes, lepus (and
//! amq-protocol) decode to the same value, for field tables, message properties and
//! whole publish frames. Inputs come from a fixed-seed xorshift generator, so every run
//! checks the same few thousand cases; fuzzing (`fuzz/`) explores further.

use amq_protocol::frame::{AMQPFrame, parse_frame};
use amq_protocol::protocol::{AMQPClass, basic};
use lepus::fuzzing::{
    DEFAULT_MAX_TABLE_DEPTH, Input, MAX_TABLE_DEPTH_CAP, XorShift, decode_table, nested_table_bytes,
};
use lepus::internal::{
    Assembler, ContentMethod, ContentProblem, FrameDecoder, decode_properties, encode_table,
    header_prefix, put_publish, scan_table,
};
use lepus::{BasicProperties, FieldTable, FieldValue};

/// Spawned threads get 2 MiB by default: deep inputs must be handled within that.
const SMALL_STACK: usize = 2 * 1024 * 1024;

fn on_small_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(SMALL_STACK)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

struct Gen(XorShift);

impl Gen {
    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
    fn bytes(&mut self, max: u64) -> Vec<u8> {
        (0..self.below(max + 1))
            .map(|_| self.0.next_u64() as u8)
            .collect()
    }
    /// Any UTF-8, including multi-byte characters, at most `max` bytes.
    fn string(&mut self, max: usize) -> String {
        let mut s = String::new();
        for _ in 0..self.below(max as u64 + 1) {
            let c = match self.below(4) {
                0 => char::from_u32(self.below(0x80) as u32),
                1 => char::from_u32(0x80 + self.below(0x780) as u32),
                2 => char::from_u32(0x4E00 + self.below(0x100) as u32),
                _ => char::from_u32(0x1F600 + self.below(0x40) as u32),
            }
            .unwrap();
            if s.len() + c.len_utf8() > max {
                break;
            }
            s.push(c);
        }
        s
    }
    fn value(&mut self, depth_left: u32) -> FieldValue {
        let r = self.0.next_u64();
        match self.below(if depth_left > 0 { 18 } else { 16 }) {
            0 => FieldValue::Bool(r & 1 == 1),
            1 => FieldValue::I8(r as i8),
            2 => FieldValue::U8(r as u8),
            3 => FieldValue::I16(r as i16),
            4 => FieldValue::U16(r as u16),
            5 => FieldValue::I32(r as i32),
            6 => FieldValue::U32(r as u32),
            7 => FieldValue::I64(r as i64),
            // Floats without NaN, so that values compare equal.
            8 => FieldValue::F32((r as i32) as f32 / 8.0),
            9 => FieldValue::F64((r as i64) as f64 / 1024.0),
            10 => FieldValue::Decimal {
                scale: r as u8,
                value: (r >> 8) as u32,
            },
            11 => FieldValue::LongString(self.string(40).into_bytes()),
            12 => FieldValue::Timestamp(r),
            13 => FieldValue::Bytes(self.bytes(40)),
            14 | 15 => FieldValue::Void,
            16 => FieldValue::Array(
                (0..self.below(5))
                    .map(|_| self.value(depth_left - 1))
                    .collect(),
            ),
            _ => FieldValue::Table(self.table(depth_left - 1)),
        }
    }
    /// A table nested at most `depth_left + 1` levels.
    fn table(&mut self, depth_left: u32) -> FieldTable {
        let mut t = FieldTable::new();
        for _ in 0..self.below(6) {
            let k = self.string(30);
            let v = self.value(depth_left);
            t.insert(k, v);
        }
        t
    }
    fn short(&mut self) -> String {
        let max = if self.below(8) == 0 { 255 } else { 20 };
        self.string(max)
    }
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> Option<T> {
        (self.below(2) == 1).then(|| f(self))
    }
    fn properties(&mut self) -> BasicProperties {
        let mut p = BasicProperties::new();
        p.content_type = self.opt(Self::short);
        p.content_encoding = self.opt(Self::short);
        p.headers = self.opt(|g| g.table(4));
        p.delivery_mode = self.opt(|g| g.below(256) as u8);
        p.priority = self.opt(|g| g.below(256) as u8);
        p.correlation_id = self.opt(Self::short);
        p.reply_to = self.opt(Self::short);
        p.expiration = self.opt(Self::short);
        p.message_id = self.opt(Self::short);
        p.timestamp = self.opt(|g| g.0.next_u64());
        p.kind = self.opt(Self::short);
        p.user_id = self.opt(Self::short);
        p.app_id = self.opt(Self::short);
        p.cluster_id = self.opt(Self::short);
        p
    }
}

#[test]
fn field_tables_round_trip() {
    let mut g = Gen(XorShift::new(0x7AB1E));
    for i in 0..3000 {
        let t = g.table(1 + (i % 5));
        let mut buf = Vec::new();
        encode_table(&t, &mut buf, DEFAULT_MAX_TABLE_DEPTH).unwrap();
        assert_eq!(scan_table(&buf, DEFAULT_MAX_TABLE_DEPTH), Ok(buf.len()));
        let back = decode_table(&buf, DEFAULT_MAX_TABLE_DEPTH).unwrap();
        assert_eq!(back, t, "case {i}");
        let mut again = Vec::new();
        encode_table(&back, &mut again, DEFAULT_MAX_TABLE_DEPTH).unwrap();
        assert_eq!(again, buf, "case {i}: encoding is not canonical");
        // The depth guard agrees with the table's own measure.
        let d = t.depth();
        assert_eq!(scan_table(&buf, d), Ok(buf.len()));
        assert!(scan_table(&buf, d - 1).is_err());
    }
}

/// Decode every frame of a publish and check it against what was published.
#[allow(clippy::too_many_arguments)]
fn check_publish(
    bytes: &[u8],
    channel: u16,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    props: &BasicProperties,
    body: &[u8],
    frame_max: u32,
) {
    // Decode as the reactor does: a read's worth at a time, every whole frame taken.
    let mut dec = FrameDecoder::new(frame_max);
    let mut frames: Vec<(u8, u16, Vec<u8>)> = Vec::new();
    for chunk in bytes.chunks(40_000) {
        dec.feed(chunk);
        while let Some(f) = dec.next_frame().unwrap() {
            frames.push((f.kind, f.channel, f.payload.to_vec()));
        }
    }
    assert_eq!(dec.buffered(), 0);
    let (rest, frame) = parse_frame(bytes).unwrap();
    match frame {
        AMQPFrame::Method(ch, AMQPClass::Basic(basic::AMQPMethod::Publish(p))) => {
            assert_eq!(ch, channel);
            assert_eq!(p.exchange.as_str(), exchange);
            assert_eq!(p.routing_key.as_str(), routing_key);
            assert_eq!(p.mandatory, mandatory);
            assert!(!p.immediate);
        }
        other => panic!("not a publish: {other:?}"),
    }
    assert_eq!((frames[0].0, frames[0].1), (1, channel));
    let (kind, ch, payload) = &frames[1];
    assert_eq!((*kind, *ch), (2, channel));
    let prefix = header_prefix(payload).unwrap();
    assert_eq!((prefix.class_id, prefix.body_size), (60, body.len() as u64));
    assert_eq!(
        &decode_properties(payload, DEFAULT_MAX_TABLE_DEPTH).unwrap(),
        props
    );
    // amq-protocol reads the same header.
    let (_, frame) = parse_frame(rest).unwrap();
    assert!(
        matches!(frame, AMQPFrame::Header(ch, ref h) if ch == channel && h.body_size == body.len() as u64)
    );
    let mut got = Vec::new();
    for (kind, ch, payload) in &frames[2..] {
        assert_eq!((*kind, *ch), (3, channel));
        assert!(!payload.is_empty() && payload.len() + 8 <= frame_max as usize);
        got.extend_from_slice(payload);
    }
    assert_eq!(got, body);
}

#[test]
fn properties_round_trip_through_publish_frames() {
    let mut g = Gen(XorShift::new(0x960F));
    for _ in 0..2000 {
        let props = g.properties();
        let body = g.bytes(64);
        let mut out = Vec::new();
        put_publish(&mut out, 1, "ex", "rk", false, &props, &body, 131_072, 64).unwrap();
        check_publish(&out, 1, "ex", "rk", false, &props, &body, 131_072);
    }
}

#[test]
fn publish_frames_round_trip() {
    let mut g = Gen(XorShift::new(0x9B1));
    for _ in 0..300 {
        let frame_max = match g.below(4) {
            0 => 4096,
            1 => 4096 + g.below(10_000) as u32,
            2 => 131_072,
            _ => 1 << 20,
        };
        let chunk = frame_max as u64 - 8;
        let len = match g.below(5) {
            0 => 0,
            1 => chunk,
            2 => chunk * (1 + g.below(3)),
            3 => chunk * (1 + g.below(3)) + 1,
            _ => g.below(300_000),
        } as usize;
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let channel = 1 + g.below(65_535) as u16;
        let (exchange, routing_key) = (g.short(), g.short());
        let mandatory = g.below(2) == 1;
        let props = if g.below(2) == 0 {
            BasicProperties::new()
        } else {
            g.properties()
        };
        let mut out = Vec::new();
        put_publish(
            &mut out,
            channel,
            &exchange,
            &routing_key,
            mandatory,
            &props,
            &body,
            frame_max,
            DEFAULT_MAX_TABLE_DEPTH,
        )
        .unwrap();
        let expected_body_frames = body.len().div_ceil(chunk as usize);
        let fixed = out.len() - body.len() - 8 * expected_body_frames;
        assert!(fixed > 0);
        check_publish(
            &out,
            channel,
            &exchange,
            &routing_key,
            mandatory,
            &props,
            &body,
            frame_max,
        );
    }
}

/// A content header whose headers table is the given wire form.
fn header_with_table(table: &[u8]) -> Vec<u8> {
    // class 60, weight 0, body size 1, flags: headers only
    let mut p = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x20, 0];
    p.extend_from_slice(table);
    p
}

#[test]
fn hundred_thousand_levels_of_headers_are_refused_cleanly() {
    on_small_stack(|| {
        let table = nested_table_bytes(99_999, &mut Input::new(&[2, 3, 7, 7, 7]));
        assert_eq!(
            lepus::fuzzing::reference_table(&table).depth,
            100_000,
            "the input really is 100,000 levels deep"
        );
        for limit in [1, DEFAULT_MAX_TABLE_DEPTH, MAX_TABLE_DEPTH_CAP] {
            assert!(scan_table(&table, limit).is_err());
            assert!(decode_table(&table, limit).is_err());
        }
        let payload = header_with_table(&table);
        let err = decode_properties(&payload, DEFAULT_MAX_TABLE_DEPTH).unwrap_err();
        assert!(err.contains("deeper than 64"), "{err}");
        // Through the assembler, as a delivery: a bad delivery, not a dead connection.
        let mut a = Assembler::default();
        a.start(ContentMethod::Deliver {
            consumer_tag: "c".into(),
            delivery_tag: 1,
            redelivered: false,
            exchange: String::new(),
            routing_key: "q".into(),
        })
        .unwrap();
        assert!(
            a.header(&payload, 1 << 20, DEFAULT_MAX_TABLE_DEPTH)
                .unwrap()
                .is_none()
        );
        let c = a.body(b"x").unwrap().expect("content complete");
        assert!(
            matches!(c.properties, Err(ContentProblem::Undecodable(ref e)) if e.contains("deeper than"))
        );
        assert_eq!(c.body, b"x");
        // A table built that deep in memory is measured, refused and dropped without
        // recursion too.
        let mut t = FieldTable::new().with("leaf", 1);
        for _ in 1..100_000 {
            t = FieldTable::new().with("n", t);
        }
        assert_eq!(t.depth(), 100_000);
        assert!(encode_table(&t, &mut Vec::new(), MAX_TABLE_DEPTH_CAP).is_err());
        let p = BasicProperties::new().headers(t);
        assert!(put_publish(&mut Vec::new(), 1, "", "q", false, &p, b"", 4096, 64).is_err());
    });
}

#[test]
fn tables_at_the_depth_cap_decode_on_a_small_stack() {
    // The cap is what `ConnectionOptions::max_table_depth` allows at most; the handshake
    // decodes the server's properties on the caller's thread, which may have 2 MiB.
    on_small_stack(|| {
        for pattern in [0u8, 1, 2] {
            let table = nested_table_bytes(MAX_TABLE_DEPTH_CAP - 1, &mut Input::new(&[pattern, 3]));
            let t = decode_table(&table, MAX_TABLE_DEPTH_CAP).unwrap();
            assert_eq!(t.depth(), MAX_TABLE_DEPTH_CAP);
            let p = decode_properties(&header_with_table(&table), MAX_TABLE_DEPTH_CAP).unwrap();
            assert_eq!(p.headers.unwrap().depth(), MAX_TABLE_DEPTH_CAP);
            let deeper = nested_table_bytes(MAX_TABLE_DEPTH_CAP, &mut Input::new(&[pattern, 3]));
            assert!(decode_table(&deeper, MAX_TABLE_DEPTH_CAP).is_err());
        }
    });
}
