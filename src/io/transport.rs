//! The byte stream under the engine: a plain TCP stream, or rustls over it. Either way
//! the engine and the frame decoder see plaintext, so every bound they keep holds the
//! same over TLS.

#[cfg(feature = "tls")]
use std::io::ErrorKind;
use std::io::{self, Read, Write};

use crate::error::Error;

/// A TCP stream (`S`: std's during the handshake, mio's in the I/O thread), maybe with
/// TLS on top.
pub(crate) enum Transport<S> {
    Plain(S),
    #[cfg(feature = "tls")]
    Tls(Box<TlsStream<S>>),
}

#[cfg(feature = "tls")]
pub(crate) struct TlsStream<S> {
    pub(crate) conn: rustls::ClientConnection,
    pub(crate) sock: S,
    /// The server asked for a client certificate we do not have.
    pub(crate) cert_requested: crate::sync::StdArc<std::sync::atomic::AtomicBool>,
    pub(crate) host: String,
}

impl<S> Transport<S> {
    pub(crate) fn sock(&self) -> &S {
        match self {
            Transport::Plain(s) => s,
            #[cfg(feature = "tls")]
            Transport::Tls(t) => &t.sock,
        }
    }

    /// The stream, when no TLS is on top of it.
    pub(crate) fn plain(&self) -> Option<&S> {
        match self {
            Transport::Plain(s) => Some(s),
            #[cfg(feature = "tls")]
            Transport::Tls(_) => None,
        }
    }

    pub(crate) fn sock_mut(&mut self) -> &mut S {
        match self {
            Transport::Plain(s) => s,
            #[cfg(feature = "tls")]
            Transport::Tls(t) => &mut t.sock,
        }
    }

    /// The same transport over another kind of stream (std's to mio's).
    pub(crate) fn map<T>(self, f: impl FnOnce(S) -> T) -> Transport<T> {
        match self {
            Transport::Plain(s) => Transport::Plain(f(s)),
            #[cfg(feature = "tls")]
            Transport::Tls(t) => {
                let TlsStream {
                    conn,
                    sock,
                    cert_requested,
                    host,
                } = *t;
                Transport::Tls(Box::new(TlsStream {
                    conn,
                    sock: f(sock),
                    cert_requested,
                    host,
                }))
            }
        }
    }

    /// TLS records waiting to be written (plaintext already accepted from the engine).
    pub(crate) fn has_pending_output(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.conn.wants_write(),
        }
    }

    /// The lepus error for a read or write error of this transport, where TLS knows
    /// better than "socket error".
    pub(crate) fn explain(&self, e: &io::Error) -> Option<Error> {
        let _ = e;
        match self {
            Transport::Plain(_) => None,
            #[cfg(feature = "tls")]
            Transport::Tls(t) => {
                let requested = t.cert_requested.load(std::sync::atomic::Ordering::Relaxed);
                let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
                Some(super::tls_config::classify(inner, requested, &t.host))
            }
        }
    }

    /// The lepus error for a peer that closed the stream right after the TLS handshake,
    /// where TLS tells why (a client certificate was asked for and we had none).
    pub(crate) fn explain_eof(&self) -> Option<Error> {
        match self {
            Transport::Plain(_) => None,
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t
                .cert_requested
                .load(std::sync::atomic::Ordering::Relaxed)
                .then(|| super::tls_config::classify_eof(true)),
        }
    }
}

impl<S: Read + Write> Transport<S> {
    /// Write pending TLS records; `WouldBlock` when the socket takes no more.
    pub(crate) fn flush_pending(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.flush_records(),
        }
    }

    /// Say goodbye in TLS (`close_notify`), best effort.
    pub(crate) fn close_notify(&mut self) {
        #[cfg(feature = "tls")]
        if let Transport::Tls(t) = self {
            t.conn.send_close_notify();
            let _ = t.flush_records();
        }
    }
}

#[cfg(feature = "tls")]
impl<S: Read + Write> TlsStream<S> {
    fn flush_records(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut self.sock)? == 0 {
                return Err(io::Error::new(
                    ErrorKind::WriteZero,
                    "socket write returned 0",
                ));
            }
        }
        Ok(())
    }

    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // The peer closed TCP without close_notify: an end of stream all the same.
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // No plaintext buffered (rustls holds at most a record's worth): read one
            // more batch of records from the socket.
            if self.conn.read_tls(&mut self.sock)? == 0 {
                return Ok(0);
            }
            if let Err(e) = self.conn.process_new_packets() {
                // Let the alert rustls queued reach the peer, then report.
                let _ = self.flush_records();
                return Err(io::Error::new(ErrorKind::InvalidData, e));
            }
            // A key update or session ticket may want an answer.
            match self.flush_records() {
                Err(e) if e.kind() != ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
    }

    fn write_plain(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Earlier records first: plaintext is taken only when they are out, so what
        // rustls holds stays within one write's worth and a stalled socket shows as a
        // stalled engine output.
        self.flush_records()?;
        let n = self.conn.writer().write(buf)?;
        match self.flush_records() {
            Err(e) if e.kind() != ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }
}

impl<S: Read + Write> Read for Transport<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.read_plain(buf),
        }
    }
}

impl<S: Read + Write> Write for Transport<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Transport::Tls(t) => t.write_plain(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_pending()
    }
}

/// The TLS handshake over a blocking stream, within `deadline`.
#[cfg(feature = "tls")]
pub(crate) fn tls_handshake(
    mut sock: std::net::TcpStream,
    opts: &crate::options::ConnectionOptions,
    start: std::time::Instant,
    deadline: std::time::Instant,
) -> crate::error::Result<Transport<std::net::TcpStream>> {
    use crate::error::{HandshakeStage, TlsFailure};
    use crate::sync::StdArc as Arc;

    let prepared = super::tls_config::prepare(&opts.tls, &opts.host)?;
    let host = prepared.server_name.to_str().into_owned();
    let mut conn =
        rustls::ClientConnection::new(prepared.config, prepared.server_name).map_err(|e| {
            Error::Tls {
                kind: TlsFailure::Configuration,
                detail: e.to_string(),
            }
        })?;
    let requested = prepared.cert_requested;
    let timeout = || Error::ConnectTimeout {
        stage: HandshakeStage::Tls,
        elapsed_ms: start.elapsed().as_millis() as u64,
    };
    let io_err = |e: io::Error| {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            return timeout();
        }
        Error::Io {
            stage: HandshakeStage::Tls,
            source: Arc::new(e),
        }
    };
    let mut first = true;
    let mut buf = vec![0u8; 16 * 1024];
    while conn.is_handshaking() {
        let left = deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(timeout)?;
        sock.set_read_timeout(Some(left)).map_err(io_err)?;
        sock.set_write_timeout(Some(left)).map_err(io_err)?;
        if conn.wants_write() {
            conn.write_tls(&mut sock).map_err(io_err)?;
            continue;
        }
        let n = match sock.read(&mut buf) {
            Ok(0) => {
                return Err(super::tls_config::classify_eof(
                    requested.load(Ordering::Relaxed),
                ));
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        if first && buf[..n].starts_with(b"AMQP") {
            return Err(Error::Tls {
                kind: TlsFailure::NotTlsServer,
                detail: format!(
                    "{}:{} answered in plaintext AMQP, not TLS: use amqp:// for this port, \
                     or the broker's TLS port (5671 by default)",
                    opts.host, opts.port
                ),
            });
        }
        first = false;
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            conn.read_tls(&mut chunk).map_err(io_err)?;
            if let Err(e) = conn.process_new_packets() {
                let _ = conn.write_tls(&mut sock);
                return Err(super::tls_config::classify(
                    &e,
                    requested.load(Ordering::Relaxed),
                    &host,
                ));
            }
        }
    }
    // The client's Finished may still be queued.
    while conn.wants_write() {
        conn.write_tls(&mut sock).map_err(io_err)?;
    }
    crate::trace::debug!(
        "TLS established with {host} ({:?}, {:?}) in {} ms",
        conn.protocol_version(),
        conn.negotiated_cipher_suite().map(|s| s.suite()),
        start.elapsed().as_millis()
    );
    Ok(Transport::Tls(Box::new(TlsStream {
        conn,
        sock,
        cert_requested: requested,
        host,
    })))
}

#[cfg(feature = "tls")]
use std::sync::atomic::Ordering;
