//! The I/O thread: a mio poll over the socket and a waker. It moves bytes between the
//! socket and the engine, drains the command queue, and runs the engine's timers.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::Command;
use super::engine::Engine;
use crate::error::Error;
use crate::protocol::frame::FrameDecoder;
use crate::sync::queue::Receiver;

pub(crate) const SOCKET: Token = Token(0);
pub(crate) const WAKER: Token = Token(1);

/// Stop taking commands while this much output is unwritten: the bounded command queue
/// then fills and publishers wait (with their deadline).
const HIGH_WATER: usize = 4 * 1024 * 1024;
/// Reads per loop turn before writes and commands get their turn.
const READS_PER_TURN: usize = 16;
/// How long the last words (close-ok, close) get to leave when the engine is done.
const FINAL_FLUSH: Duration = Duration::from_millis(200);

pub(crate) struct Reactor {
    pub(crate) poll: Poll,
    pub(crate) sock: TcpStream,
    pub(crate) decoder: FrameDecoder,
    pub(crate) engine: Engine,
    pub(crate) commands: Receiver<Command>,
    pub(crate) write_timeout: Duration,
}

impl Reactor {
    pub(crate) fn run(mut self) {
        if let Err(e) = self.poll.registry().register(
            &mut self.sock,
            SOCKET,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.engine.fail(Error::ConnectionLost(format!(
                "could not register the socket: {e}"
            )));
        }
        let mut events = Events::with_capacity(16);
        let mut readable = true;
        let mut writable = true;
        let mut out_pos = 0usize;
        let mut last_progress = Instant::now();
        let mut next_timer = Instant::now();
        let mut more = false;
        while self.engine.outcome().is_none() {
            let timeout = if more {
                Duration::ZERO
            } else {
                next_timer.saturating_duration_since(Instant::now())
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != ErrorKind::Interrupted {
                    self.engine
                        .fail(Error::ConnectionLost(format!("poll failed: {e}")));
                    break;
                }
            }
            for ev in events.iter() {
                if ev.token() == SOCKET {
                    readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                    writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
                }
            }
            let now = Instant::now();

            // Commands: everything queued, up to the output high-water mark.
            self.engine.conn.clear_wake();
            while self.engine.out.len() - out_pos < HIGH_WATER {
                match self.commands.try_recv() {
                    Ok(cmd) => self.engine.on_command(cmd, now),
                    Err(_) => break,
                }
            }

            // Inbound: frames already buffered, then the socket.
            let mut reads = 0;
            if self.engine.retry_stalled() {
                self.process_frames(now);
                while readable
                    && reads < READS_PER_TURN
                    && !self.engine.is_stalled()
                    && self.engine.outcome().is_none()
                {
                    let buf = self.decoder.read_buf();
                    match self.sock.read(buf) {
                        Ok(0) => {
                            self.engine.fail(Error::ConnectionLost(
                                "the broker closed the TCP connection".into(),
                            ));
                        }
                        Ok(n) => {
                            reads += 1;
                            self.decoder.filled(n);
                            self.engine.last_recv = now;
                            self.process_frames(now);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => readable = false,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => {
                            self.engine
                                .fail(Error::ConnectionLost(format!("socket read failed: {e}")));
                        }
                    }
                }
            }

            // Outbound: everything pending, in as few writes as the socket allows.
            while writable && out_pos < self.engine.out.len() {
                match self.sock.write(&self.engine.out[out_pos..]) {
                    Ok(0) => {
                        self.engine
                            .fail(Error::ConnectionLost("socket write returned 0".into()));
                        break;
                    }
                    Ok(n) => {
                        out_pos += n;
                        last_progress = now;
                        self.engine.last_send = now;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => writable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.engine
                            .fail(Error::ConnectionLost(format!("socket write failed: {e}")));
                        break;
                    }
                }
            }
            if out_pos == self.engine.out.len() {
                self.engine.out.clear();
                out_pos = 0;
                last_progress = now;
            } else {
                if out_pos > HIGH_WATER {
                    self.engine.out.drain(..out_pos);
                    out_pos = 0;
                }
                if now.duration_since(last_progress) > self.write_timeout {
                    self.engine.fail(Error::ConnectionLost(format!(
                        "writes to the broker stalled for {:?}",
                        self.write_timeout
                    )));
                }
            }

            next_timer = self.engine.on_timer(now);
            if self.engine.out.len() > out_pos && writable {
                // Heartbeat or timer output to write at once.
                next_timer = now;
            }
            more = (readable && reads >= READS_PER_TURN && !self.engine.is_stalled())
                || (!self.commands.is_empty() && self.engine.out.len() - out_pos < HIGH_WATER);
        }
        // Last words (close, close-ok) matter on a working link; on a lost one they
        // would only delay the recovery.
        if !matches!(self.engine.outcome(), Some(Error::ConnectionLost(_))) {
            self.final_flush(out_pos);
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        // Queued commands hold reply senders: drop them now so their waiters wake. The
        // failure was recorded (with a fence) before this drain; a command queued after
        // it is seen as failed by its own waiter.
        crate::sync::fence(crate::sync::Ordering::SeqCst);
        while self.commands.try_recv().is_ok() {}
        let outcome = self
            .engine
            .outcome()
            .cloned()
            .unwrap_or_else(|| Error::ConnectionLost("the I/O thread ended".into()));
        log::info!("connection I/O thread ends: {outcome}");
        self.engine.conn.link_ended(outcome);
    }

    fn process_frames(&mut self, now: Instant) {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => {
                    self.engine.on_frame(f, now);
                    if self.engine.is_stalled() || self.engine.outcome().is_some() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    // The stream is out of sync: no later frame (not even close-ok) can be
                    // trusted, so send connection.close and end without waiting.
                    let err = Error::Protocol {
                        code: e.code,
                        text: e.text.clone(),
                    };
                    self.engine.violation(e, now);
                    self.engine.fail(err);
                    return;
                }
            }
        }
    }

    fn final_flush(&mut self, mut pos: usize) {
        let until = Instant::now() + FINAL_FLUSH;
        let mut events = Events::with_capacity(4);
        while pos < self.engine.out.len() && Instant::now() < until {
            match self.sock.write(&self.engine.out[pos..]) {
                Ok(0) => return,
                Ok(n) => pos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let _ = self.poll.poll(
                        &mut events,
                        Some(until.saturating_duration_since(Instant::now())),
                    );
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}
