//! The I/O thread: a mio poll over the socket and a waker. It moves bytes between the
//! socket and the engine, drains the command queue, and runs the engine's timers.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::{Command, ConnShared};
use super::engine::Engine;
use super::transport::Transport;
use crate::error::Error;
use crate::protocol::frame::FrameDecoder;
use crate::stats::Stats;
use crate::sync::queue::Receiver;

pub(crate) const SOCKET: Token = Token(0);
pub(crate) const WAKER: Token = Token(1);

/// Reads per loop turn before writes and commands get their turn.
const READS_PER_TURN: usize = 16;
/// How long the last words (close-ok, close) get to leave when the engine is done.
const FINAL_FLUSH: Duration = Duration::from_millis(200);

pub(crate) struct Reactor {
    pub(crate) poll: Poll,
    /// The socket, through TLS or not: the engine sees plaintext either way.
    pub(crate) transport: Transport<TcpStream>,
    pub(crate) decoder: FrameDecoder,
    pub(crate) engine: Engine,
    pub(crate) commands: Receiver<Command>,
    pub(crate) write_timeout: Duration,
}

/// What one write did.
enum Wrote {
    Took(usize),
    /// Interrupted: try again.
    Again,
    /// The socket takes no more now (`writable` is cleared).
    Stop,
    Failed(Error),
}

/// One write of `bytes` (not empty) to the socket.
fn write_some(transport: &mut Transport<TcpStream>, bytes: &[u8], writable: &mut bool) -> Wrote {
    match transport.write(bytes) {
        Ok(0) => Wrote::Failed(Error::ConnectionLost("socket write returned 0".into())),
        Ok(n) => Wrote::Took(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock => {
            *writable = false;
            Wrote::Stop
        }
        Err(e) if e.kind() == ErrorKind::Interrupted => Wrote::Again,
        Err(e) => Wrote::Failed(Error::ConnectionLost(format!("socket write failed: {e}"))),
    }
}

impl Drop for Reactor {
    /// However the I/O thread ends (a panic included), callers stop writing and the
    /// socket's second handle closes with it: a handle must not keep the TCP
    /// connection open.
    fn drop(&mut self) {
        self.engine.conn.gate.close();
    }
}

/// What the socket may do without blocking, as far as we know: set by poll events,
/// cleared by `WouldBlock` (and, on Linux, by a short read: see `drained_by`).
struct Ready {
    readable: bool,
    writable: bool,
    /// The peer closed its side or the socket has an error: final, so a short read
    /// proves nothing and the socket is read until it says so itself.
    closed: bool,
}

/// Whether a plain TCP read that took `n` of `asked` bytes emptied the socket's receive
/// queue. On Linux a stream socket's read returns less than asked only when nothing more
/// is queued, and the edge-triggered poll reports any byte that arrives after it: the
/// read that would only answer `WouldBlock` is saved (it was one read in two with a
/// confirm per message). mio asks callers to read until `WouldBlock` because other
/// systems do not promise this. Through TLS a short read of plaintext says nothing of
/// the socket, and a peer that has closed (`closed`) is read until the end shows.
fn drained_by(n: usize, asked: usize, plain: bool, closed: bool) -> bool {
    cfg!(any(target_os = "linux", target_os = "android")) && plain && !closed && n < asked
}

impl Reactor {
    pub(crate) fn run(mut self) {
        self.register();
        let conn = self.engine.conn.clone();
        let mut events = Events::with_capacity(16);
        let mut ready = Ready {
            readable: true,
            writable: true,
            closed: false,
        };
        let mut next_timer = Instant::now();
        let mut more = false;
        while self.engine.outcome().is_none() {
            let timeout = if more {
                Duration::ZERO
            } else {
                next_timer.saturating_duration_since(Instant::now())
            };
            if !self.wait(&mut events, timeout, &mut ready) {
                conn.gate.busy();
                break;
            }
            // No caller writes to the socket from here until this turn rests.
            conn.gate.busy();
            let now = Instant::now();
            self.drain_commands(now);
            let reads = self.read(now, &mut ready);
            let carrying = self.flush(&conn, now, &mut ready.writable);
            next_timer = self.timers(now, ready.writable, carrying);
            more = (ready.readable && reads >= READS_PER_TURN && !self.engine.is_stalled())
                || (!self.commands.is_empty() && self.engine.wants_commands());
            // Callers may write while this thread sleeps, if nothing of ours waits.
            conn.gate.rest(
                self.engine.is_open()
                    && self.engine.output().is_empty()
                    && !self.transport.has_pending_output(),
            );
            // Publishers whose confirms came in this turn: woken now, when the socket is
            // theirs to write their next message to.
            self.engine.wake_deferred();
        }
        self.finish(&conn);
    }


    fn register(&mut self) {
        if let Err(e) = self.poll.registry().register(
            self.transport.sock_mut(),
            SOCKET,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.engine.fail(Error::ConnectionLost(format!(
                "could not register the socket: {e}"
            )));
        }
    }

    /// Wait for socket events, a wake-up or `timeout`. False when polling itself failed
    /// (the engine has failed then).
    fn wait(&mut self, events: &mut Events, timeout: Duration, ready: &mut Ready) -> bool {
        if let Err(e) = self.poll.poll(events, Some(timeout))
            && e.kind() != ErrorKind::Interrupted
        {
            self.engine
                .fail(Error::ConnectionLost(format!("poll failed: {e}")));
            return false;
        }
        for ev in events.iter() {
            if ev.token() == SOCKET {
                ready.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                ready.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
                ready.closed |= ev.is_read_closed() || ev.is_error();
            }
        }
        true
    }

    /// Commands: everything queued, up to the output high-water mark.
    fn drain_commands(&mut self, now: Instant) {
        self.engine.conn.clear_wake();
        while self.engine.wants_commands() {
            match self.commands.try_recv() {
                Ok(cmd) => self.engine.on_command(cmd, now),
                Err(_) => break,
            }
        }
    }

    /// Inbound: a stalled delivery first, then frames already buffered, then the socket
    /// (a bounded number of reads). Returns how many reads took bytes.
    fn read(&mut self, now: Instant, ready: &mut Ready) -> usize {
        let mut reads = 0;
        // Nothing more is taken from the decoder while a consumer queue is full or too much
        // output waits: otherwise each turn would answer one more buffered frame.
        if !self.engine.retry_stalled() || self.engine.is_stalled() {
            return reads;
        }
        self.process_frames(now);
        let plain = self.transport.plain().is_some();
        while ready.readable
            && reads < READS_PER_TURN
            && !self.engine.is_stalled()
            && self.engine.outcome().is_none()
        {
            let buf = self.decoder.read_buf();
            let asked = buf.len();
            match self.transport.read(buf) {
                Ok(0) => {
                    self.engine.fail(Error::ConnectionLost(
                        "the broker closed the TCP connection".into(),
                    ));
                }
                Ok(n) => {
                    reads += 1;
                    if drained_by(n, asked, plain, ready.closed) {
                        ready.readable = false;
                    }
                    Stats::add(&self.engine.conn.stats.bytes_in, n as u64);
                    self.decoder.filled(n);
                    self.engine.received(now);
                    self.process_frames(now);
                    // A busy turn (more than one read): the waiters of each read are
                    // woken at once, so that they publish again while this thread reads
                    // on; a quiet turn wakes them after it rested (`run`).
                    if reads > 1 {
                        self.engine.wake_deferred();
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => ready.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = match self.transport.explain(&e) {
                        Some(tls) => tls.to_string(),
                        None => format!("socket read failed: {e}"),
                    };
                    self.engine.fail(Error::ConnectionLost(why));
                }
            }
        }
        reads
    }

    /// Outbound: what a caller's direct write left (it must go first), then everything
    /// pending, in as few writes as the socket allows; then a check for writes that
    /// stall. Returns true while a caller's bytes still wait.
    fn flush(&mut self, conn: &ConnShared, now: Instant, writable: &mut bool) -> bool {
        // TLS records of plaintext taken earlier go first (none without TLS).
        if *writable && self.transport.has_pending_output() {
            match self.transport.flush_pending() {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => *writable = false,
                Err(e) => {
                    self.engine
                        .fail(Error::ConnectionLost(format!("socket write failed: {e}")));
                    return false;
                }
            }
        }
        // Holding the gate: no caller writes between our writes.
        let carrying = conn.gate.write_with(|carry| {
            if carry.first_seen() {
                // A caller's write just left these: their stall clock starts now, not
                // at our last idle turn (the caller's bytes were progress).
                self.engine.wrote_elsewhere(0, now);
            }
            while *writable && !carry.is_empty() {
                match write_some(&mut self.transport, carry.pending(), writable) {
                    Wrote::Took(n) => {
                        carry.took(n);
                        self.engine.wrote_elsewhere(n, now);
                    }
                    Wrote::Again => {}
                    Wrote::Stop => break,
                    Wrote::Failed(e) => {
                        self.engine.fail(e);
                        break;
                    }
                }
            }
            if !carry.is_empty() {
                // Our output waits behind it.
                return true;
            }
            while *writable && !self.engine.output().is_empty() {
                match write_some(&mut self.transport, self.engine.output(), writable) {
                    Wrote::Took(n) => self.engine.wrote(n, now),
                    Wrote::Again => {}
                    Wrote::Stop => break,
                    Wrote::Failed(e) => {
                        self.engine.fail(e);
                        break;
                    }
                }
            }
            false
        });
        self.engine
            .settle_output(now, self.write_timeout, carrying);
        carrying
    }

    /// The engine's timers; returns when the loop must turn next.
    fn timers(&mut self, now: Instant, writable: bool, carrying: bool) -> Instant {
        let next = self.engine.on_timer(now);
        // The `metrics` facade hears what changed at most once a second, and the loop
        // turns at least that often to tell it.
        #[cfg(feature = "metrics")]
        let next = {
            self.engine.conn.stats.report_metrics(now, false);
            next.min(now + crate::stats::facade::REPORT_EVERY)
        };
        if (!self.engine.output().is_empty() || self.transport.has_pending_output() || carrying)
            && writable
        {
            // Heartbeat or timer output to write at once.
            return now;
        }
        next
    }

    /// The engine is done: last words, close the socket, wake whoever still waits.
    fn finish(&mut self, conn: &ConnShared) {
        self.engine.wake_deferred();
        // Last words (close, close-ok) matter on a working link; on a lost one they
        // would only delay the recovery. A caller's unfinished frame goes before them.
        if !matches!(self.engine.outcome(), Some(Error::ConnectionLost(_))) {
            self.final_flush(conn);
            self.transport.close_notify();
        }
        conn.gate.close();
        let _ = self.transport.sock().shutdown(std::net::Shutdown::Both);
        // Queued commands hold reply senders: drop them now so their waiters wake. The
        // failure was recorded (with a fence) before this drain; a command queued after
        // it is seen as failed by its own waiter.
        self.engine
            .conn
            .drain_failed(|| self.commands.try_recv().is_ok());
        let outcome = self
            .engine
            .outcome()
            .cloned()
            .unwrap_or_else(|| Error::ConnectionLost("the I/O thread ended".into()));
        crate::trace::info!("connection I/O thread ends: {outcome}");
        #[cfg(feature = "metrics")]
        self.engine.conn.stats.report_metrics(Instant::now(), true);
        self.engine.conn.link_ended(outcome);
    }

    /// The frames buffered. Consumer threads given deliveries are woken at the end of
    /// the turn (`Engine::wake_deferred`), once each.
    fn process_frames(&mut self, now: Instant) {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => {
                    self.engine.on_frame_batched(f, now);
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

    fn final_flush(&mut self, conn: &ConnShared) {
        let until = Instant::now() + FINAL_FLUSH;
        let mut events = Events::with_capacity(4);
        let mut carry = conn.gate.write_with(|c| c.take());
        while (!carry.is_empty()
            || !self.engine.output().is_empty()
            || self.transport.has_pending_output())
            && Instant::now() < until
        {
            let wrote = if !carry.is_empty() {
                self.transport.write(&carry)
            } else if self.engine.output().is_empty() {
                self.transport.flush_pending().map(|()| 0)
            } else {
                self.transport.write(self.engine.output())
            };
            match wrote {
                Ok(0) if carry.is_empty() && self.engine.output().is_empty() => {}
                Ok(0) => return,
                Ok(n) if !carry.is_empty() => {
                    carry.drain(..n);
                    self.engine.wrote_elsewhere(n, Instant::now());
                }
                Ok(n) => self.engine.wrote(n, Instant::now()),
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
