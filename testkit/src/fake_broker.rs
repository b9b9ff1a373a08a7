//! A scripted fake AMQP 0-9-1 broker: it serves one connection and follows a test's script.
//!
//! It speaks just enough of the protocol to get a client connected (protocol header,
//! `connection.start`/`start-ok`, `tune`/`tune-ok`, `open`/`open-ok`, `channel.open`,
//! `basic.qos`, `basic.consume`), then follows a per-test script of raw bytes and frames:
//! the things a real RabbitMQ never sends, or sends only when something went wrong. Every
//! wait has a deadline, so a script cannot hang a test.

use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable as AmqpTable};

use crate::frame_io::FrameIo;
use crate::frames::{
    FRAME_HEARTBEAT, Frame, PROTOCOL_HEADER, body_frame, deliver_frame, header_frame, method_frame,
};

/// How long one step of a script (or of the raw client) may wait for the peer.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a test waits for the fake broker's script to end.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------

/// What the fake broker proposes in `connection.tune`.
#[derive(Debug, Clone, Copy)]
pub struct Tune {
    /// Highest channel id (0: no limit).
    pub channel_max: u16,
    /// Largest frame in bytes (0: no limit).
    pub frame_max: u32,
    /// Heartbeat interval in seconds (0: none).
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
    /// The socket to the client, to send or read anything by hand.
    pub io: FrameIo,
    /// frame_max agreed in tune-ok (content is split to fit it).
    pub frame_max: u32,
    next_ctag: u32,
    reset: bool,
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

    /// Send one method frame (panics if the client is gone).
    pub fn send_method(&mut self, channel: u16, m: AMQPClass) {
        self.send(&method_frame(channel, m));
    }

    /// The next frame from the client (panics after [`STEP_TIMEOUT`] or on EOF).
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
        self.wait_for_until(what, Self::deadline(), f)
    }

    /// Like [`Peer::wait_for`], with a deadline of the caller's (for a step that waits on
    /// the client's own pace, such as draining many queued messages).
    pub fn wait_for_until<T>(
        &mut self,
        what: &str,
        deadline: Instant,
        f: impl Fn(u16, &AMQPClass) -> Option<T>,
    ) -> T {
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

    /// Read the client's protocol header and check it is AMQP 0-9-1.
    pub fn expect_protocol_header(&mut self) {
        let h = self
            .io
            .read_bytes(8, Self::deadline())
            .expect("fake broker: protocol header");
        assert_eq!(h, PROTOCOL_HEADER, "protocol header");
    }

    /// Send `connection.start` for 0-9, offering PLAIN and AMQPLAIN.
    pub fn send_start(&mut self) {
        self.send_start_version(0, 9);
    }

    /// Send `connection.start` announcing protocol `major`-`minor` (to test a client
    /// that must refuse it).
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

    /// Read `connection.start-ok` and check the mechanism is PLAIN.
    pub fn expect_start_ok(&mut self) {
        self.expect("connection.start-ok", |ch, m| match m {
            AMQPClass::Connection(connection::AMQPMethod::StartOk(ok)) if ch == 0 => {
                assert_eq!(ok.mechanism.as_str(), "PLAIN");
                Some(())
            }
            _ => None,
        })
    }

    /// Send `connection.tune` proposing `t`.
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

    /// Send `connection.open-ok`.
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

    /// Answer the next `channel.close` from the client; returns its channel.
    pub fn serve_channel_close(&mut self) -> u16 {
        let ch = self.expect("channel.close", |ch, m| {
            matches!(m, AMQPClass::Channel(channel::AMQPMethod::Close(_))).then_some(ch)
        });
        self.send_method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        );
        ch
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
        self.expect_connection_close_until(Self::deadline())
    }

    /// Like [`Peer::expect_connection_close`], waiting until `deadline`.
    pub fn expect_connection_close_until(&mut self, deadline: Instant) -> connection::Close {
        let c = self.wait_for_until("connection.close", deadline, |ch, m| match m {
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) if ch == 0 => Some(c.clone()),
            _ => None,
        });
        self.send_lenient(&method_frame(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        ));
        c
    }

    /// End the connection with a TCP reset (RST) when the script returns, instead of a
    /// clean close (`SO_LINGER` 0).
    pub fn reset_on_end(&mut self) {
        let _ = socket2::SockRef::from(self.io.stream()).set_linger(Some(Duration::ZERO));
        self.reset = true;
    }

    /// True if the client closed the socket within `timeout`.
    pub fn wait_eof(&mut self, timeout: Duration) -> bool {
        self.io.wait_eof(Instant::now() + timeout)
    }
}

/// A fake broker listening on 127.0.0.1 for one connection, running a script on it in
/// its own thread. A panic in the script (an `expect` that failed) is raised again by
/// [`FakeBroker::finish`], so the test fails with the script's message.
///
/// ```
/// use lepus_testkit::{FakeBroker, RawClient, Tune};
///
/// // The broker closes channel 1 with 406 as soon as it is open.
/// let broker = FakeBroker::start(|p| {
///     p.handshake(Tune::default());
///     let ch = p.serve_channel_open();
///     p.send(&lepus_testkit::frames::method_frame(ch, channel_close(406)));
/// });
/// # use amq_protocol::protocol::{AMQPClass, channel};
/// # fn channel_close(code: u16) -> AMQPClass {
/// #     AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
/// #         reply_code: code, reply_text: "no".into(), class_id: 0, method_id: 0 }))
/// # }
/// let mut c = RawClient::connect(broker.addr(), "guest", "guest", "/").unwrap();
/// c.open_channels(1..=1).unwrap();
/// let e = c.next_method("anything").unwrap_err();
/// assert!(e.to_string().contains("406"), "{e}");
/// broker.finish();
/// ```
pub struct FakeBroker<R> {
    port: u16,
    done: mpsc::Receiver<thread::Result<R>>,
    finished: bool,
}

impl<R: Send + 'static> FakeBroker<R> {
    /// Listen on an ephemeral port of 127.0.0.1 and run `script` on the first client
    /// that connects (which must come within [`SCRIPT_TIMEOUT`]).
    ///
    /// # Panics
    ///
    /// If it cannot listen or spawn its thread.
    pub fn start(script: impl FnOnce(&mut Peer) -> R + Send + 'static) -> Self {
        let mut script = Some(script);
        Self::start_inner(1, move |_, peer| {
            let script = script.take().expect("one connection");
            script(peer)
        })
        .map_result(|mut v| v.pop().expect("one result"))
    }

    fn start_inner<T: Send + 'static>(
        connections: usize,
        mut script: impl FnMut(usize, &mut Peer) -> T + Send + 'static,
    ) -> FakeBroker<Vec<T>> {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (tx, done) = mpsc::channel();
        thread::Builder::new()
            .name("fake-broker".into())
            .spawn(move || {
                let r = panic::catch_unwind(AssertUnwindSafe(|| {
                    let mut results = Vec::with_capacity(connections);
                    for i in 0..connections {
                        let deadline = Instant::now() + SCRIPT_TIMEOUT;
                        let stream = loop {
                            match listener.accept() {
                                Ok((s, _)) => break s,
                                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                    assert!(
                                        Instant::now() < deadline,
                                        "fake broker: no client came"
                                    );
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
                            reset: false,
                        };
                        results.push(script(i, &mut peer));
                        if !peer.reset {
                            let _ = peer.io.stream().shutdown(Shutdown::Both);
                        }
                    }
                    results
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

    /// The port the fake broker listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where the client connects (`127.0.0.1:port`).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
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

impl<T: Send + 'static> FakeBroker<Vec<T>> {
    /// Like [`FakeBroker::start`], for `connections` clients one after the other (a
    /// client that reconnects): `script` gets the connection's index (from 0) and runs
    /// until that connection is done; the results come back in order.
    pub fn start_many(
        connections: usize,
        script: impl FnMut(usize, &mut Peer) -> T + Send + 'static,
    ) -> Self {
        FakeBroker::<T>::start_inner(connections, script)
    }
}

impl<R: Send + 'static> FakeBroker<R> {
    fn map_result<S: Send + 'static>(
        mut self,
        f: impl FnOnce(R) -> S + Send + 'static,
    ) -> FakeBroker<S> {
        let (tx, done) = mpsc::channel();
        let inner = std::mem::replace(&mut self.done, mpsc::channel().1);
        self.finished = true;
        thread::spawn(move || {
            if let Ok(r) = inner.recv() {
                let _ = tx.send(r.map(f));
            }
        });
        FakeBroker {
            port: self.port,
            done,
            finished: false,
        }
    }
}

impl<R> Drop for FakeBroker<R> {
    fn drop(&mut self) {
        // A test that failed before finish(): show why the script failed, if it did.
        if !self.finished
            && let Ok(Err(p)) = self.done.try_recv()
        {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            eprintln!("fake broker script panicked: {msg}");
        }
    }
}

/// A [`Peer::wait_for`] matcher: the client's `basic.reject` of `tag` with `requeue`.
pub fn is_reject(tag: u64, requeue: bool) -> impl Fn(u16, &AMQPClass) -> Option<()> {
    move |_, m| match m {
        AMQPClass::Basic(basic::AMQPMethod::Reject(r))
            if r.delivery_tag == tag && r.requeue == requeue =>
        {
            Some(())
        }
        _ => None,
    }
}
