//! A scripted fake AMQP 0-9-1 broker for hostile-input tests.
//!
//! It speaks just enough of the protocol to get a client connected (protocol header,
//! `connection.start`/`start-ok`, `tune`/`tune-ok`, `open`/`open-ok`, `channel.open`,
//! `basic.consume`), then follows a per-test script of raw bytes and frames: the things a
//! real RabbitMQ never sends. Every wait has a deadline, so a script cannot hang a test.
#![allow(dead_code)]

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, basic, channel, connection, parse_class};
use amq_protocol::types::{AMQPValue, FieldTable as AmqpTable};
use lepus::ConnectionOptions;

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;

/// How long one step of a script (or of the raw client) may wait for the peer.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a test waits for the fake broker's script to end.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// A whole frame: type, channel, size, payload, end octet.
pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
    out
}

/// A method frame encoded by amq-protocol.
pub fn method_frame(channel: u16, method: AMQPClass) -> Vec<u8> {
    let f = AMQPFrame::Method(channel, method);
    gen_frame(&f)(WriteContext::from(Vec::new()))
        .expect("method encodes")
        .write
}

/// A content header frame: class 60, weight 0, `body_size`, then `props` (property
/// flags and property list, as built by [`no_props`] / [`headers_props`] or by hand).
pub fn header_frame(channel: u16, body_size: u64, props: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 60, 0, 0];
    p.extend_from_slice(&body_size.to_be_bytes());
    p.extend_from_slice(props);
    frame(FRAME_HEADER, channel, &p)
}

pub fn body_frame(channel: u16, body: &[u8]) -> Vec<u8> {
    frame(FRAME_BODY, channel, body)
}

pub fn heartbeat_frame() -> Vec<u8> {
    frame(FRAME_HEARTBEAT, 0, &[])
}

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
/// front to back from the lengths, without recursion or a `FieldTable`; 6 bytes a
/// level, so 20,000 levels fit in RabbitMQ's default 128 KiB frame.
pub fn deep_table(depth: usize) -> Vec<u8> {
    assert!(depth >= 1);
    let mut out = Vec::with_capacity(6 * depth);
    for level in 0..depth {
        let below = depth - 1 - level; // nested tables inside this one
        out.extend_from_slice(&((6 * below) as u32).to_be_bytes());
        if below > 0 {
            out.extend_from_slice(&[0, b'F']); // empty key, type 'F'
        }
    }
    assert_eq!(out.len(), 6 * (depth - 1) + 4);
    out
}

/// A small, well-formed table `{"k": "v"}`.
pub fn small_table() -> Vec<u8> {
    let mut t = vec![0, 0, 0, 0, 1, b'k', b'S', 0, 0, 0, 1, b'v'];
    let len = (t.len() - 4) as u32;
    t[..4].copy_from_slice(&len.to_be_bytes());
    t
}

// ---------------------------------------------------------------------------------------
// Frames in
// ---------------------------------------------------------------------------------------

/// A frame as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub channel: u16,
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
}

/// Buffered frame reader/writer over a blocking socket; every read has a deadline.
pub struct FrameIo {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl FrameIo {
    pub fn new(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        FrameIo {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn send_method(&mut self, channel: u16, method: AMQPClass) -> io::Result<()> {
        self.send(&method_frame(channel, method))
    }

    /// Read more bytes; `Ok(0)` on EOF, `TimedOut` at the deadline.
    fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(ErrorKind::TimedOut, "deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(io::Error::new(ErrorKind::TimedOut, "deadline passed"));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Exactly `n` raw bytes (for the protocol header).
    pub fn read_bytes(&mut self, n: usize, deadline: Instant) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill(deadline)? == 0 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("EOF after {} of {n} bytes", self.buf.len()),
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// The next frame; `TimedOut` at the deadline, `UnexpectedEof` when the peer closed.
    pub fn recv_frame(&mut self, deadline: Instant) -> io::Result<Frame> {
        loop {
            if self.buf.len() >= 7 {
                let size = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]])
                    as usize;
                if self.buf.len() >= size + 8 {
                    let f: Vec<u8> = self.buf.drain(..size + 8).collect();
                    if f[size + 7] != FRAME_END {
                        return Err(io::Error::new(
                            ErrorKind::InvalidData,
                            format!("bad frame end octet {:#04x}", f[size + 7]),
                        ));
                    }
                    return Ok(Frame {
                        kind: f[0],
                        channel: u16::from_be_bytes([f[1], f[2]]),
                        payload: f[7..size + 7].to_vec(),
                    });
                }
            }
            if self.fill(deadline)? == 0 {
                return Err(io::Error::new(ErrorKind::UnexpectedEof, "peer closed"));
            }
        }
    }

    /// Discard everything until the peer closes; false if it did not by the deadline.
    pub fn wait_eof(&mut self, deadline: Instant) -> bool {
        loop {
            self.buf.clear();
            match self.fill(deadline) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return e.kind() != ErrorKind::TimedOut,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The broker's side of one connection
// ---------------------------------------------------------------------------------------

/// What the fake broker proposes in `connection.tune`.
#[derive(Debug, Clone, Copy)]
pub struct Tune {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
}

impl Default for Tune {
    fn default() -> Self {
        Tune {
            channel_max: 2047,
            frame_max: 131_072,
            heartbeat: 0,
        }
    }
}

/// The fake broker's end of the connection, handed to a script.
pub struct Peer {
    pub io: FrameIo,
    /// frame_max agreed in tune-ok (content is split to fit it).
    pub frame_max: u32,
    next_ctag: u32,
}

impl Peer {
    fn deadline() -> Instant {
        Instant::now() + STEP_TIMEOUT
    }

    /// Send raw bytes (panics if the client is gone).
    pub fn send(&mut self, bytes: &[u8]) {
        self.io.send(bytes).expect("fake broker: write failed");
    }

    /// Send raw bytes, ignoring a client that has gone already.
    pub fn send_lenient(&mut self, bytes: &[u8]) {
        let _ = self.io.send(bytes);
    }

    pub fn send_method(&mut self, channel: u16, m: AMQPClass) {
        self.send(&method_frame(channel, m));
    }

    pub fn recv_frame(&mut self) -> Frame {
        self.io
            .recv_frame(Self::deadline())
            .unwrap_or_else(|e| panic!("fake broker: no frame from the client: {e}"))
    }

    /// Frames until `f` accepts one (heartbeats are skipped; anything else panics).
    pub fn expect<T>(&mut self, what: &str, f: impl Fn(u16, &AMQPClass) -> Option<T>) -> T {
        let deadline = Self::deadline();
        loop {
            let fr = self
                .io
                .recv_frame(deadline)
                .unwrap_or_else(|e| panic!("fake broker: waiting for {what}: {e}"));
            if fr.kind == FRAME_HEARTBEAT {
                continue;
            }
            let m = fr
                .method()
                .unwrap_or_else(|| panic!("fake broker: waiting for {what}, got {fr:?}"));
            match f(fr.channel, &m) {
                Some(v) => return v,
                None => panic!(
                    "fake broker: waiting for {what}, got {m:?} on {}",
                    fr.channel
                ),
            }
        }
    }

    /// Like [`Peer::expect`], but frames `f` refuses are skipped.
    pub fn wait_for<T>(&mut self, what: &str, f: impl Fn(u16, &AMQPClass) -> Option<T>) -> T {
        let deadline = Self::deadline();
        loop {
            let fr = self
                .io
                .recv_frame(deadline)
                .unwrap_or_else(|e| panic!("fake broker: waiting for {what}: {e}"));
            if let Some(v) = fr.method().and_then(|m| f(fr.channel, &m)) {
                return v;
            }
        }
    }

    pub fn expect_protocol_header(&mut self) {
        let h = self
            .io
            .read_bytes(8, Self::deadline())
            .expect("fake broker: protocol header");
        assert_eq!(h, b"AMQP\x00\x00\x09\x01", "protocol header");
    }

    pub fn send_start(&mut self) {
        self.send_start_version(0, 9);
    }

    pub fn send_start_version(&mut self, major: u8, minor: u8) {
        let mut props = AmqpTable::default();
        props.insert("product".into(), AMQPValue::LongString("fake".into()));
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: major,
                version_minor: minor,
                server_properties: props,
                mechanisms: "PLAIN AMQPLAIN".into(),
                locales: "en_US".into(),
            })),
        );
    }

    pub fn expect_start_ok(&mut self) {
        self.expect("connection.start-ok", |ch, m| match m {
            AMQPClass::Connection(connection::AMQPMethod::StartOk(ok)) if ch == 0 => {
                assert_eq!(ok.mechanism.as_str(), "PLAIN");
                Some(())
            }
            _ => None,
        })
    }

    pub fn send_tune(&mut self, t: Tune) {
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: t.channel_max,
                frame_max: t.frame_max,
                heartbeat: t.heartbeat,
            })),
        );
    }

    /// Reads tune-ok and open; returns what the client agreed in tune-ok.
    pub fn expect_tune_ok_and_open(&mut self) -> Tune {
        let agreed = self.expect("connection.tune-ok", |_, m| match m {
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(t)) => Some(Tune {
                channel_max: t.channel_max,
                frame_max: t.frame_max,
                heartbeat: t.heartbeat,
            }),
            _ => None,
        });
        self.frame_max = agreed.frame_max;
        self.expect("connection.open", |_, m| {
            matches!(m, AMQPClass::Connection(connection::AMQPMethod::Open(_))).then_some(())
        });
        agreed
    }

    pub fn send_open_ok(&mut self) {
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        );
    }

    /// The whole handshake, up to and including `open-ok`.
    pub fn handshake(&mut self, t: Tune) -> Tune {
        self.expect_protocol_header();
        self.send_start();
        self.expect_start_ok();
        self.send_tune(t);
        let agreed = self.expect_tune_ok_and_open();
        self.send_open_ok();
        agreed
    }

    /// Answer the next `channel.open`; returns its channel id.
    pub fn serve_channel_open(&mut self) -> u16 {
        let ch = self.expect("channel.open", |ch, m| {
            matches!(m, AMQPClass::Channel(channel::AMQPMethod::Open(_))).then_some(ch)
        });
        self.send_method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        );
        ch
    }

    /// Answer the next `basic.consume`; returns (channel, consumer tag).
    pub fn serve_consume(&mut self) -> (u16, String) {
        let (ch, asked) = self.expect("basic.consume", |ch, m| match m {
            AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => {
                Some((ch, c.consumer_tag.to_string()))
            }
            _ => None,
        });
        let tag = if asked.is_empty() {
            self.next_ctag += 1;
            format!("ctag-{}", self.next_ctag)
        } else {
            asked
        };
        self.send_method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                consumer_tag: tag.as_str().into(),
            })),
        );
        (ch, tag)
    }

    /// Answer the next `basic.qos`.
    pub fn serve_qos(&mut self) -> u16 {
        let ch = self.expect("basic.qos", |ch, m| {
            matches!(m, AMQPClass::Basic(basic::AMQPMethod::Qos(_))).then_some(ch)
        });
        self.send_method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
        );
        ch
    }

    /// A whole delivery: deliver method, content header, body split to fit frame_max.
    pub fn deliver(&mut self, ch: u16, ctag: &str, tag: u64, props: &[u8], body: &[u8]) {
        let mut out = deliver_frame(ch, ctag, tag);
        out.extend(header_frame(ch, body.len() as u64, props));
        for piece in body.chunks(self.frame_max as usize - 8) {
            out.extend(body_frame(ch, piece));
        }
        self.send(&out);
    }

    /// Skip frames until `connection.close`, answer `close-ok` (if the client still
    /// listens) and return the close.
    pub fn expect_connection_close(&mut self) -> connection::Close {
        let c = self.wait_for("connection.close", |ch, m| match m {
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) if ch == 0 => Some(c.clone()),
            _ => None,
        });
        self.send_lenient(&method_frame(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        ));
        c
    }

    /// True if the client closed the socket within `timeout`.
    pub fn wait_eof(&mut self, timeout: Duration) -> bool {
        self.io.wait_eof(Instant::now() + timeout)
    }
}

/// A fake broker listening on 127.0.0.1 for one connection, running `script` on it in
/// its own thread.
pub struct FakeBroker<R> {
    port: u16,
    done: mpsc::Receiver<thread::Result<R>>,
    finished: bool,
}

impl<R: Send + 'static> FakeBroker<R> {
    pub fn start(script: impl FnOnce(&mut Peer) -> R + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (tx, done) = mpsc::channel();
        thread::Builder::new()
            .name("fake-broker".into())
            .spawn(move || {
                let r = panic::catch_unwind(AssertUnwindSafe(|| {
                    let deadline = Instant::now() + SCRIPT_TIMEOUT;
                    let stream = loop {
                        match listener.accept() {
                            Ok((s, _)) => break s,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                assert!(Instant::now() < deadline, "fake broker: no client came");
                                thread::sleep(Duration::from_millis(5));
                            }
                            Err(e) => panic!("fake broker: accept failed: {e}"),
                        }
                    };
                    stream.set_nonblocking(false).unwrap();
                    let mut peer = Peer {
                        io: FrameIo::new(stream),
                        frame_max: 131_072,
                        next_ctag: 0,
                    };
                    let r = script(&mut peer);
                    let _ = peer.io.stream().shutdown(Shutdown::Both);
                    r
                }));
                let _ = tx.send(r);
            })
            .expect("spawn fake broker");
        FakeBroker {
            port,
            done,
            finished: false,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Client options for this broker: no heartbeats, short timeouts. Automatic recovery
    /// stays on (the default); a test of a lost link must turn it off, since the fake
    /// broker serves one connection only.
    pub fn options(&self) -> ConnectionOptions {
        ConnectionOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .heartbeat(0)
            .connection_timeout(Duration::from_secs(3))
            .operation_timeout(Duration::from_secs(5))
            .close_timeout(Duration::from_secs(2))
    }

    /// Wait for the script to end and return its result; a panic in the script is
    /// raised here.
    pub fn finish(mut self) -> R {
        self.finished = true;
        match self.done.recv_timeout(SCRIPT_TIMEOUT) {
            Ok(Ok(r)) => r,
            Ok(Err(p)) => panic::resume_unwind(p),
            Err(_) => panic!("fake broker script did not end within {SCRIPT_TIMEOUT:?}"),
        }
    }
}

impl<R> Drop for FakeBroker<R> {
    fn drop(&mut self) {
        // A test that failed before finish(): show why the script failed, if it did.
        if !self.finished {
            if let Ok(Err(p)) = self.done.try_recv() {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("fake broker script panicked: {msg}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Deadlines for the client side
// ---------------------------------------------------------------------------------------

/// Run `f` on its own thread and fail the test if it takes longer than `limit`.
pub fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("test-body".into())
        .spawn(move || {
            let _ = tx.send(panic::catch_unwind(AssertUnwindSafe(f)));
        })
        .expect("spawn test body");
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => panic::resume_unwind(p),
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// A blocking call running on another thread, with the instant it returned.
pub struct Waiter<T> {
    rx: mpsc::Receiver<(T, Instant)>,
}

impl<T: Send + 'static> Waiter<T> {
    pub fn spawn(f: impl FnOnce() -> T + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let v = f();
            let _ = tx.send((v, Instant::now()));
        });
        Waiter { rx }
    }

    /// The result and when it came; panics if it did not come within `timeout`.
    pub fn wait(self, timeout: Duration) -> (T, Instant) {
        self.rx
            .recv_timeout(timeout)
            .unwrap_or_else(|_| panic!("blocked call did not return within {timeout:?}"))
    }
}
