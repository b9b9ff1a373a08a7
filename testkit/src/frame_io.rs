//! Frames over a blocking TCP socket, every read bounded by a deadline.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use amq_protocol::protocol::AMQPClass;

use crate::frames::{Frame, method_frame, split_frame};

/// Largest frame [`FrameIo`] accepts, so a peer that announces 4 GiB cannot make the kit
/// allocate it.
const MAX_FRAME: usize = 64 << 20;

/// Buffered frame reader and writer over a blocking socket; every read has a deadline.
pub struct FrameIo {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl FrameIo {
    /// Wrap a connected socket (TCP_NODELAY is set, so each send is on the wire at once).
    pub fn new(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        FrameIo {
            stream,
            buf: Vec::new(),
        }
    }

    /// The socket (to shut it down, or to read its addresses).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Write raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Write one method frame.
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

    /// The next frame; `TimedOut` at the deadline, `UnexpectedEof` when the peer closed,
    /// `InvalidData` for a bad end octet or a frame over 64 MiB.
    pub fn recv_frame(&mut self, deadline: Instant) -> io::Result<Frame> {
        loop {
            match split_frame(&mut self.buf, MAX_FRAME) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(ErrorKind::InvalidData, e)),
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
