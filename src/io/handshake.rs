//! Opening a connection: TCP connect, then `ExpectStart → ExpectTune → ExpectOpenOk`,
//! the whole of it within the connection timeout.

use crate::sync::StdArc as Arc;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use amq_protocol::auth::{Credentials, SASLMechanism};
use amq_protocol::protocol::{AMQPClass, connection};
use socket2::{SockRef, TcpKeepalive};

use super::Tuned;
use super::transport::Transport;
use crate::error::{Error, HandshakeStage, Result, reply_code};
use crate::options::{AuthMechanism, ConnectionOptions};
use crate::protocol::decode_server_method;
use crate::protocol::frame::{
    FRAME_HEARTBEAT, FRAME_METHOD, FRAME_MIN_SIZE, FrameDecoder, RawFrame, put_method,
};
use crate::protocol::table::{FieldTable, FieldValue, table_from_amqp, table_to_amqp};

/// Largest frame_max lepus agrees to, whatever both sides propose: it bounds memory.
pub(crate) const FRAME_MAX_CAP: u32 = 16 * 1024 * 1024;
/// Frames accepted before tune (the spec's minimum is 4096; servers send less).
const PRE_TUNE_FRAME_MAX: u32 = 64 * 1024;

/// What the handshake waits for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    Start,
    Tune,
    OpenOk,
}

impl Expect {
    fn stage(self) -> HandshakeStage {
        match self {
            Expect::Start => HandshakeStage::Start,
            Expect::Tune => HandshakeStage::Tune,
            Expect::OpenOk => HandshakeStage::Open,
        }
    }
}

/// The handshake as a state machine over frames: feed it frames, send what it writes.
pub(crate) struct Handshake<'a> {
    opts: &'a ConnectionOptions,
    pub(crate) expect: Expect,
    tuned: Option<Tuned>,
    server_properties: FieldTable,
}

fn negotiate(client: u32, server: u32) -> u32 {
    match (client, server) {
        (0, s) => s,
        (c, 0) => c,
        (c, s) => c.min(s),
    }
}

pub(crate) fn client_properties(opts: &ConnectionOptions) -> FieldTable {
    let caps = FieldTable::new()
        .with("publisher_confirms", true)
        .with("consumer_cancel_notify", true)
        .with("exchange_exchange_bindings", true)
        .with("basic.nack", true)
        .with("connection.blocked", true)
        .with("authentication_failure_close", true);
    let mut t = FieldTable::new()
        .with("product", "lepus")
        .with("version", env!("CARGO_PKG_VERSION"))
        .with("platform", "Rust")
        .with("information", "https://crates.io/crates/lepus")
        .with("capabilities", caps);
    if let Some(name) = &opts.connection_name {
        t.insert("connection_name", name.as_str());
    }
    for (k, v) in opts.client_properties.iter() {
        t.insert(k, v.clone());
    }
    t
}

impl<'a> Handshake<'a> {
    pub(crate) fn new(opts: &'a ConnectionOptions) -> Self {
        Handshake {
            opts,
            expect: Expect::Start,
            tuned: None,
            server_properties: FieldTable::new(),
        }
    }

    /// The broker's `connection.start` announced the `authentication_failure_close`
    /// capability: it reports refused credentials with `connection.close` (403).
    fn server_reports_auth_failure(&self) -> bool {
        match self.server_properties.get("capabilities") {
            Some(FieldValue::Table(caps)) => matches!(
                caps.get("authentication_failure_close"),
                Some(FieldValue::Bool(true))
            ),
            _ => false,
        }
    }

    /// The error for a peer that closed the socket at this point.
    pub(crate) fn on_eof(&self) -> Error {
        match self.expect {
            Expect::Start => Error::NotAmqp(
                "the peer closed the connection before sending connection.start".into(),
            ),
            // A broker with `authentication_failure_close` (we ask for it) says so with
            // connection.close 403; only one without it refuses credentials by closing.
            Expect::Tune if self.server_reports_auth_failure() => Error::Io {
                stage: HandshakeStage::Tune,
                source: Arc::new(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the broker closed the connection after start-ok without a \
                     connection.close (it reports authentication failures with one)",
                )),
            },
            Expect::Tune => Error::AuthenticationFailed(
                "the broker closed the connection after start-ok (credentials refused)".into(),
            ),
            Expect::OpenOk => Error::VhostRefused {
                vhost: self.opts.vhost.clone(),
                code: 0,
                text: "the broker closed the connection after connection.open".into(),
            },
        }
    }

    /// Handle one frame; appends what to send to `out`. `Ok(Some(..))` when open.
    pub(crate) fn on_frame(
        &mut self,
        f: RawFrame<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Option<(Tuned, FieldTable)>> {
        if f.kind == FRAME_HEARTBEAT {
            return Ok(None);
        }
        if f.kind != FRAME_METHOD || f.channel != 0 {
            return Err(Error::Protocol {
                code: reply_code::UNEXPECTED_FRAME,
                text: format!(
                    "frame of type {} on channel {} during the handshake ({})",
                    f.kind,
                    f.channel,
                    self.expect.stage()
                ),
            });
        }
        let m = decode_server_method(f.payload, self.opts.max_table_depth).map_err(|e| {
            if self.expect == Expect::Start {
                Error::NotAmqp(format!("connection.start could not be decoded: {}", e.text))
            } else {
                Error::Protocol {
                    code: e.code,
                    text: e.text,
                }
            }
        })?;
        use connection::AMQPMethod as C;
        match (self.expect, m) {
            (stage, AMQPClass::Connection(C::Close(c))) => Err(self.on_close(stage, &c, out)),
            (Expect::Start, AMQPClass::Connection(C::Start(s))) => {
                self.on_start(s, out)?;
                self.expect = Expect::Tune;
                Ok(None)
            }
            (Expect::Tune, AMQPClass::Connection(C::Secure(_))) => {
                Err(Error::AuthenticationFailed(
                    "the broker sent a SASL challenge, which PLAIN and AMQPLAIN do not use".into(),
                ))
            }
            (Expect::Tune, AMQPClass::Connection(C::Tune(t))) => {
                self.tuned = Some(self.on_tune(&t, out)?);
                self.expect = Expect::OpenOk;
                Ok(None)
            }
            (Expect::OpenOk, AMQPClass::Connection(C::OpenOk(_))) => match self.tuned {
                Some(tuned) => Ok(Some((tuned, std::mem::take(&mut self.server_properties)))),
                None => Err(Error::Protocol {
                    code: reply_code::INTERNAL_ERROR,
                    text: "connection.open-ok before tune".into(),
                }),
            },
            (stage, other) => Err(Error::Protocol {
                code: reply_code::COMMAND_INVALID,
                text: format!("unexpected {other:?} while {}", stage.stage()),
            }),
        }
    }

    /// `connection.start`: check the version and the mechanism, answer `start-ok`.
    fn on_start(&mut self, s: connection::Start, out: &mut Vec<u8>) -> Result<()> {
        if (s.version_major, s.version_minor) != (0, 9) {
            return Err(Error::NotAmqp(format!(
                "server speaks AMQP {}-{}, not 0-9",
                s.version_major, s.version_minor
            )));
        }
        self.server_properties = table_from_amqp(s.server_properties);
        let offered = String::from_utf8_lossy(s.mechanisms.as_bytes()).to_string();
        let auth = choose_mechanism(self.opts, &offered)?;
        let mech = auth.name();
        let creds = Credentials::new(
            self.opts.username.clone().into(),
            self.opts.password.clone().into(),
        );
        let response = creds.sasl_auth_string(match auth {
            AuthMechanism::Plain => SASLMechanism::Plain,
            AuthMechanism::AmqPlain => SASLMechanism::AMQPlain,
            AuthMechanism::External => SASLMechanism::External,
        });
        put_method(
            out,
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: table_to_amqp(&client_properties(self.opts)),
                mechanism: mech.into(),
                response,
                locale: "en_US".into(),
            })),
        )
        .map_err(Error::InvalidArgument)
    }

    /// `connection.tune`: agree on the limits, answer `tune-ok` and `open`.
    fn on_tune(&self, t: &connection::Tune, out: &mut Vec<u8>) -> Result<Tuned> {
        let mut channel_max = negotiate(self.opts.channel_max.into(), t.channel_max.into()) as u16;
        if channel_max == 0 {
            channel_max = u16::MAX;
        }
        if t.frame_max != 0 && t.frame_max < FRAME_MIN_SIZE {
            return Err(Error::Protocol {
                code: reply_code::NOT_ALLOWED,
                text: format!(
                    "connection.tune proposes frame_max {}, below the protocol minimum of \
                     {FRAME_MIN_SIZE}",
                    t.frame_max
                ),
            });
        }
        let mut frame_max = negotiate(self.opts.frame_max, t.frame_max);
        if frame_max == 0 {
            frame_max = 131_072;
        }
        // Never above a non-zero value of the server's (which is at least 4096 here).
        let frame_max = frame_max.clamp(FRAME_MIN_SIZE, FRAME_MAX_CAP);
        // 0 from us means we want no heartbeats; 0 from the broker means it has no
        // preference.
        let heartbeat = match (self.opts.heartbeat, t.heartbeat) {
            (0, _) => 0,
            (c, 0) => c,
            (c, s) => c.min(s),
        };
        use connection::AMQPMethod as C;
        put_method(
            out,
            0,
            AMQPClass::Connection(C::TuneOk(connection::TuneOk {
                channel_max,
                frame_max,
                heartbeat,
            })),
        )
        .map_err(Error::InvalidArgument)?;
        put_method(
            out,
            0,
            AMQPClass::Connection(C::Open(connection::Open {
                virtual_host: self.opts.vhost.clone().into(),
            })),
        )
        .map_err(Error::InvalidArgument)?;
        Ok(Tuned {
            channel_max,
            frame_max,
            heartbeat,
        })
    }

    /// `connection.close` during the handshake: answer `close-ok`; what the close means
    /// depends on the stage (credentials refused after start-ok, vhost refused after open).
    fn on_close(&self, stage: Expect, c: &connection::Close, out: &mut Vec<u8>) -> Error {
        let text = c.reply_text.to_string();
        let _ = put_method(
            out,
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        );
        match stage {
            Expect::Tune if c.reply_code == reply_code::ACCESS_REFUSED => {
                Error::AuthenticationFailed(text)
            }
            Expect::OpenOk
                if matches!(
                    c.reply_code,
                    reply_code::NOT_ALLOWED | reply_code::ACCESS_REFUSED | reply_code::INVALID_PATH
                ) =>
            {
                Error::VhostRefused {
                    vhost: self.opts.vhost.clone(),
                    code: c.reply_code,
                    text,
                }
            }
            _ => Error::ServerClosedConnection {
                code: c.reply_code,
                text,
                class_id: c.class_id,
                method_id: c.method_id,
            },
        }
    }
}

/// The SASL mechanism to use: the first of the user's preference that the broker offers.
/// A clear error when they share none, naming both sides (and what EXTERNAL needs).
pub(crate) fn choose_mechanism(opts: &ConnectionOptions, offered: &str) -> Result<AuthMechanism> {
    let single = [opts.auth];
    let prefs: &[AuthMechanism] = if opts.auth_mechanisms.is_empty() {
        &single
    } else {
        &opts.auth_mechanisms
    };
    if let Some(&m) = prefs
        .iter()
        .find(|m| offered.split_whitespace().any(|o| o == m.name()))
    {
        return Ok(m);
    }
    let wanted: Vec<&str> = prefs.iter().map(|m| m.name()).collect();
    let hint = if !prefs.contains(&AuthMechanism::External) {
        ""
    } else if !opts.tls.has_client_cert() {
        " (EXTERNAL needs TLS with a client certificate, and none is configured)"
    } else {
        " (EXTERNAL needs the broker's rabbitmq_auth_mechanism_ssl plugin)"
    };
    Err(Error::AuthenticationFailed(format!(
        "no SASL mechanism in common: lepus is set to use {}{hint}; the broker offers {offered:?}",
        wanted.join(" or ")
    )))
}

/// A connection that finished its handshake.
pub(crate) struct Established {
    pub(crate) stream: Transport<TcpStream>,
    pub(crate) decoder: FrameDecoder,
    pub(crate) tuned: Tuned,
    pub(crate) server_properties: FieldTable,
}

fn remaining(deadline: Instant, stage: HandshakeStage, start: Instant) -> Result<Duration> {
    let now = Instant::now();
    if now >= deadline {
        return Err(Error::ConnectTimeout {
            stage,
            elapsed_ms: (now - start).as_millis() as u64,
        });
    }
    Ok(deadline - now)
}

fn tcp_connect(opts: &ConnectionOptions, start: Instant, deadline: Instant) -> Result<TcpStream> {
    let io_err = |source| Error::Io {
        stage: HandshakeStage::Connect,
        source: Arc::new(source),
    };
    let addrs: Vec<_> = (opts.host.as_str(), opts.port)
        .to_socket_addrs()
        .map_err(io_err)?
        .collect();
    let mut last = None;
    for addr in addrs {
        let left = remaining(deadline, HandshakeStage::Connect, start)?;
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                last = Some(Error::ConnectTimeout {
                    stage: HandshakeStage::Connect,
                    elapsed_ms: start.elapsed().as_millis() as u64,
                })
            }
            Err(e) => last = Some(io_err(e)),
        }
    }
    Err(last.unwrap_or_else(|| {
        io_err(std::io::Error::new(
            ErrorKind::NotFound,
            format!("{}:{} resolved to no address", opts.host, opts.port),
        ))
    }))
}

/// Socket options for the life of the connection.
pub(crate) fn tune_socket(stream: &TcpStream, heartbeat: u16) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let s = SockRef::from(stream);
    s.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10)),
    )?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // Unacknowledged data older than this kills the socket: a stalled write is a dead
        // link. Two heartbeat intervals, or 30 s without heartbeats.
        let t = if heartbeat > 0 {
            Duration::from_secs(u64::from(heartbeat) * 2)
        } else {
            Duration::from_secs(30)
        };
        s.set_tcp_user_timeout(Some(t))?;
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = heartbeat;
    Ok(())
}

/// What bytes that are not `connection.start` tell about the peer: a protocol header
/// (the server refuses our version and names its own) or something else entirely.
pub(crate) fn not_amqp(pending: &[u8]) -> Error {
    // A TLS record header: content type alert (21) or handshake (22), version 3.x.
    if pending.len() >= 2 && matches!(pending[0], 21 | 22) && pending[1] == 3 {
        return Error::Tls {
            kind: crate::error::TlsFailure::TlsServerOnPlainPort,
            detail: "the server answered with TLS: use amqps:// (and the TLS port) for it".into(),
        };
    }
    if pending.starts_with(b"AMQP") && pending.len() >= 8 {
        Error::NotAmqp(format!(
            "the server refused AMQP 0-9-1 and offers protocol {}-{}-{}",
            pending[5], pending[6], pending[7]
        ))
    } else {
        Error::NotAmqp(describe_garbage(pending))
    }
}

/// A method frame on channel 0 announcing more than we accept before tune: an AMQP
/// server whose `connection.start` is too large, not a peer speaking something else.
fn too_large_before_tune(pending: &[u8]) -> Option<Error> {
    let h = pending.get(..7)?;
    let size = u32::from_be_bytes([h[3], h[4], h[5], h[6]]) as u64 + 8;
    (h[0] == FRAME_METHOD && h[1..3] == [0, 0] && size > u64::from(PRE_TUNE_FRAME_MAX)).then(|| {
        Error::Protocol {
            code: reply_code::FRAME_ERROR,
            text: format!(
                "a method frame of {size} bytes (connection.start) before tuning: more than \
                 the {PRE_TUNE_FRAME_MAX} bytes accepted before connection.tune"
            ),
        }
    })
}

fn describe_garbage(bytes: &[u8]) -> String {
    let shown: String = bytes
        .iter()
        .take(24)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect();
    format!("the peer sent {shown:?}, which is not an AMQP frame")
}

/// The error for a failed write during the handshake. Over TLS the broker may have sent
/// an alert (a refused client certificate) and reset the connection before this write: the
/// reset fails the write while the alert still waits unread, so read it and say what TLS
/// says. The read is bounded by the socket timeouts set for this stage.
fn write_failure(
    stream: &mut Transport<TcpStream>,
    e: std::io::Error,
    stage: HandshakeStage,
) -> Error {
    #[cfg(feature = "tls")]
    if let Transport::Tls(_) = stream {
        let mut scratch = [0u8; 256];
        let explained = match stream.read(&mut scratch) {
            Err(read) => stream.explain(&read),
            Ok(0) => stream.explain_eof(),
            Ok(_) => None,
        };
        let explained = explained.or_else(|| stream.explain(&e)).or_else(|| {
            (e.kind() == ErrorKind::ConnectionReset)
                .then(|| stream.explain_eof())
                .flatten()
        });
        if let Some(tls) = explained {
            return tls;
        }
    }
    #[cfg(not(feature = "tls"))]
    let _ = &stream;
    Error::Io {
        stage,
        source: Arc::new(e),
    }
}

/// TLS on top of the TCP stream when the options ask for it.
fn open_transport(
    stream: TcpStream,
    opts: &ConnectionOptions,
    start: Instant,
    deadline: Instant,
) -> Result<Transport<TcpStream>> {
    if !opts.tls.enabled {
        return Ok(Transport::Plain(stream));
    }
    #[cfg(feature = "tls")]
    return super::transport::tls_handshake(stream, opts, start, deadline);
    #[cfg(not(feature = "tls"))]
    {
        let _ = (stream, start, deadline);
        Err(crate::tls::disabled())
    }
}

/// Connect and run the handshake, all within `opts.connection_timeout`.
pub(crate) fn connect(opts: &ConnectionOptions) -> Result<Established> {
    let start = Instant::now();
    let deadline = start + opts.connection_timeout;
    let stream = tcp_connect(opts, start, deadline)?;
    let mut stream = open_transport(stream, opts, start, deadline)?;
    let io = |stage| {
        move |source| Error::Io {
            stage,
            source: Arc::new(source),
        }
    };
    stream
        .sock()
        .set_nodelay(true)
        .map_err(io(HandshakeStage::Connect))?;
    if let Err(e) = stream.write_all(b"AMQP\x00\x00\x09\x01") {
        return Err(write_failure(&mut stream, e, HandshakeStage::Start));
    }
    let mut hs = Handshake::new(opts);
    let mut decoder = FrameDecoder::new(PRE_TUNE_FRAME_MAX);
    let mut out = Vec::new();
    loop {
        // Whole frames first.
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    return Err(if hs.expect == Expect::Start {
                        too_large_before_tune(decoder.pending())
                            .unwrap_or_else(|| not_amqp(decoder.pending()))
                    } else {
                        Error::Protocol {
                            code: e.code,
                            text: e.text,
                        }
                    });
                }
            };
            let done = hs.on_frame(frame, &mut out);
            if !out.is_empty() {
                let w = stream.write_all(&out);
                out.clear();
                if let (Ok(_), Err(e)) = (&done, w) {
                    return Err(write_failure(&mut stream, e, hs.expect.stage()));
                }
            }
            if let Some((tuned, server_properties)) = done? {
                decoder.set_frame_max(tuned.frame_max);
                let _ = tune_socket(stream.sock(), tuned.heartbeat)
                    .map_err(|e| crate::trace::warn!("could not set socket options: {e}"));
                return Ok(Established {
                    stream,
                    decoder,
                    tuned,
                    server_properties,
                });
            }
        }
        let left = remaining(deadline, hs.expect.stage(), start)?;
        stream
            .sock()
            .set_read_timeout(Some(left))
            .map_err(io(hs.expect.stage()))?;
        stream
            .sock()
            .set_write_timeout(Some(left))
            .map_err(io(hs.expect.stage()))?;
        let buf = decoder.read_buf();
        match stream.read(buf) {
            Ok(0) => {
                if hs.expect == Expect::Start && !decoder.pending().is_empty() {
                    return Err(not_amqp(decoder.pending()));
                }
                if hs.expect == Expect::Start
                    && let Some(e) = stream.explain_eof()
                {
                    return Err(e);
                }
                return Err(hs.on_eof());
            }
            Ok(n) => decoder.filled(n),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(Error::ConnectTimeout {
                    stage: hs.expect.stage(),
                    elapsed_ms: start.elapsed().as_millis() as u64,
                });
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                if let Some(tls) = stream.explain(&e) {
                    return Err(tls);
                }
                if hs.expect == Expect::Start
                    && e.kind() == ErrorKind::ConnectionReset
                    && let Some(tls) = stream.explain_eof()
                {
                    return Err(tls);
                }
                // A reset is an I/O error in any stage: refused credentials are a
                // connection.close (403) or, from an older broker, a clean close.
                return Err(Error::Io {
                    stage: hs.expect.stage(),
                    source: Arc::new(e),
                });
            }
        }
    }
}
