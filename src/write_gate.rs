//! The socket's write side, shared by the I/O thread and the threads that send frames:
//! a sender writes its frames itself when the I/O thread rests and nothing is queued
//! ahead of them, instead of handing them over and waking the I/O thread.
//!
//! Why it is safe, in short. Frames of one channel must reach the socket in the order
//! they were sent, and a frame must never be cut by another. Everything a sender hands
//! over goes through the command queue, then the I/O thread's output buffer, then the
//! socket. A direct write is allowed only, under this gate's lock, when
//! - the I/O thread said it rests (`rest`): its output buffer was empty, it had written
//!   all it took from the queue, and it will not touch the socket or take another command
//!   before it says `busy` (under the same lock) at the start of its next turn;
//! - nothing is carried (the rest of an earlier direct write waits for the I/O thread);
//! - the command queue is empty (checked under the lock; `queue_empty`).
//!
//! A sender whose earlier frames are still queued therefore sees the queue non-empty; if
//! the I/O thread has taken them, it took them in a turn that began with `busy` and
//! cannot have said `rest` before they were written. So a sender's frames never pass its
//! own earlier ones. Whatever the socket does not take at once (a partial write,
//! `WouldBlock`, an error) is kept here, which keeps other senders out, and the
//! I/O thread writes it first in its next turn (the caller wakes it): it stays the writer
//! of last resort, and the one that reports a broken socket.

use std::io::{ErrorKind, Write};

use crate::sync::Mutex;

/// What a direct write did.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direct {
    /// The socket took every byte.
    Written,
    /// The socket took the first `n` bytes (maybe none); the rest is kept for the I/O
    /// thread, which the caller must wake.
    Carried(usize),
    /// Not now (the I/O thread is busy, something is queued or carried, or direct writes
    /// are off): hand the frames over as usual.
    NotNow,
}

struct Gate<W> {
    /// The socket as senders write it; `None` when direct writes are off (TLS: records
    /// are written by the I/O thread alone) or the link has ended.
    sink: Option<W>,
    /// Bytes the socket must take before any others.
    carry: Carry,
    /// The I/O thread rests: see the module's comment.
    idle: bool,
}

/// The rest of a caller's frames that the socket did not take at once.
#[doc(hidden)]
#[derive(Default)]
pub struct Carry {
    buf: Vec<u8>,
    /// `buf[..taken]` has been written (an offset, not a drain: a large rest written
    /// in many small pieces is not moved down after each).
    taken: usize,
    /// Carried since the I/O thread last wrote through the gate: the stall clock of
    /// these bytes starts when it first sees them, not at its last idle turn.
    fresh: bool,
}

impl Carry {
    /// What is still to be written.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.taken..]
    }

    /// The socket took `n` more bytes of it.
    pub fn took(&mut self, n: usize) {
        self.taken = (self.taken + n).min(self.buf.len());
        if self.taken == self.buf.len() {
            // Give the room back: a carry is rare and may be a whole large message.
            *self = Carry::default();
        }
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.taken == self.buf.len()
    }

    /// True the first time the I/O thread sees a new carry (then false until the next).
    pub fn first_seen(&mut self) -> bool {
        std::mem::take(&mut self.fresh)
    }

    /// Take every byte still to be written (the I/O thread's last flush).
    pub fn take(&mut self) -> Vec<u8> {
        let Carry { mut buf, taken, .. } = std::mem::take(self);
        buf.drain(..taken);
        buf
    }
}

/// The write side of one connection's socket.
#[doc(hidden)]
pub struct WriteGate<W> {
    inner: Mutex<Gate<W>>,
}

impl<W: Write> WriteGate<W> {
    /// A gate over `sink` (`None`: senders always hand over). Closed until the I/O
    /// thread first rests.
    pub fn new(sink: Option<W>) -> Self {
        WriteGate {
            inner: Mutex::new(Gate {
                sink,
                carry: Carry::default(),
                idle: false,
            }),
        }
    }

    /// Sender side: write `bytes` to the socket now, if the I/O thread rests, nothing is
    /// carried and `queue_empty()` (asked under the lock) says the command queue is
    /// empty. Never waits for the lock: a sender that finds it taken hands over.
    pub fn try_write(&self, bytes: &[u8], queue_empty: impl FnOnce() -> bool) -> Direct {
        let Some(mut g) = self.inner.try_lock() else {
            return Direct::NotNow;
        };
        let g = &mut *g;
        // The model tests' broken variant `gate-carry` forgets the carried bytes, so
        // that a second sender's frames would cut the first one's.
        let carried = !g.carry.is_empty() && !crate::sync::broken("gate-carry");
        // The broken variant `gate-queue` writes past frames still queued.
        if !g.idle || carried || !(queue_empty() || crate::sync::broken("gate-queue")) {
            return Direct::NotNow;
        }
        let Some(sink) = g.sink.as_mut() else {
            return Direct::NotNow;
        };
        let mut done = 0;
        while done < bytes.len() {
            match sink.write(&bytes[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // WouldBlock, or a broken socket: the I/O thread writes the rest, or
                // finds the error itself and fails the link.
                Err(_) => break,
            }
        }
        if done == bytes.len() {
            return Direct::Written;
        }
        // Other senders now find the carry and hand over until the I/O thread wrote it.
        g.carry = Carry {
            buf: bytes[done..].to_vec(),
            taken: 0,
            fresh: true,
        };
        Direct::Carried(done)
    }

    /// I/O side, as a turn begins (before it takes commands or frames): no direct writes
    /// until it rests again.
    pub fn busy(&self) {
        self.inner.lock().idle = false;
    }

    /// I/O side: write, holding the gate, with `f(carry)`: `f` writes the carried bytes
    /// first (telling `carry` what the socket took), then its own output.
    pub fn write_with<R>(&self, f: impl FnOnce(&mut Carry) -> R) -> R {
        f(&mut self.inner.lock().carry)
    }

    /// True while carried bytes wait for the socket.
    #[cfg(test)]
    fn carrying(&self) -> bool {
        !self.inner.lock().carry.is_empty()
    }

    /// I/O side, at the end of a turn: it rests if `quiet` (its output is written, it is
    /// open, it will take nothing more before [`WriteGate::busy`]). Carried bytes keep
    /// senders out by themselves.
    pub fn rest(&self, quiet: bool) {
        let mut g = self.inner.lock();
        // The model tests' broken variant `gate-rest` rests with output still waiting.
        g.idle = quiet || crate::sync::broken("gate-rest");
    }

    /// I/O side, when the link ends: direct writes stop for good and the socket handle
    /// is dropped.
    pub fn close(&self) {
        let mut g = self.inner.lock();
        g.idle = false;
        g.sink = None;
        g.carry = Carry::default();
    }
}

#[cfg(all(test, not(lepus_loom)))]
mod tests {
    use super::*;
    use std::io;

    /// A socket that takes `room` more bytes, then answers `WouldBlock` (or `fail`s).
    #[derive(Default)]
    struct Sock {
        wire: Vec<u8>,
        room: usize,
        fail: bool,
    }

    impl Write for Sock {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.fail {
                return Err(io::Error::new(ErrorKind::ConnectionReset, "reset"));
            }
            if self.room == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.room);
            self.wire.extend_from_slice(&b[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn gate(room: usize) -> WriteGate<Sock> {
        WriteGate::new(Some(Sock {
            room,
            ..Sock::default()
        }))
    }

    fn wire(g: &WriteGate<Sock>) -> Vec<u8> {
        g.inner.lock().sink.as_ref().unwrap().wire.clone()
    }

    #[test]
    fn only_a_resting_io_thread_with_nothing_queued_lets_callers_write() {
        let g = gate(100);
        assert_eq!(
            g.try_write(b"a", || true),
            Direct::NotNow,
            "closed at first"
        );
        g.rest(true);
        assert_eq!(g.try_write(b"b", || false), Direct::NotNow, "queued ahead");
        assert_eq!(g.try_write(b"c", || true), Direct::Written);
        g.busy();
        assert_eq!(g.try_write(b"d", || true), Direct::NotNow, "mid-turn");
        g.rest(false);
        assert_eq!(g.try_write(b"e", || true), Direct::NotNow, "output waits");
        g.rest(true);
        assert_eq!(g.try_write(b"f", || true), Direct::Written);
        assert_eq!(wire(&g), b"cf");
        g.close();
        g.rest(true);
        assert_eq!(
            g.try_write(b"g", || true),
            Direct::NotNow,
            "closed for good"
        );
        let off = WriteGate::<Sock>::new(None);
        off.rest(true);
        assert_eq!(off.try_write(b"h", || true), Direct::NotNow, "no sink: TLS");
    }

    #[test]
    fn what_the_socket_does_not_take_is_carried_and_keeps_others_out() {
        let g = gate(3);
        g.rest(true);
        assert_eq!(g.try_write(b"12345", || true), Direct::Carried(3));
        assert!(g.carrying());
        assert_eq!(
            g.try_write(b"xy", || true),
            Direct::NotNow,
            "would cut 12345"
        );
        // The I/O thread writes the carry first.
        g.write_with(|carry| {
            assert!(carry.first_seen(), "a new carry");
            assert!(!carry.first_seen(), "seen once");
            assert_eq!(carry.pending(), b"45");
            carry.took(1);
            assert_eq!(carry.pending(), b"5");
            carry.took(1);
        });
        assert!(!g.carrying());
        g.inner.lock().sink.as_mut().unwrap().room = 10;
        assert_eq!(g.try_write(b"xy", || true), Direct::Written);
        assert_eq!(wire(&g), b"123xy");
    }

    #[test]
    fn a_broken_socket_leaves_every_byte_to_the_io_thread() {
        let g = gate(10);
        g.inner.lock().sink.as_mut().unwrap().fail = true;
        g.rest(true);
        assert_eq!(g.try_write(b"abc", || true), Direct::Carried(0));
        g.write_with(|carry| assert_eq!(carry.pending(), b"abc"));
        // The last flush takes what is left.
        g.write_with(|carry| {
            carry.took(1);
            assert_eq!(carry.take(), b"bc");
            assert!(carry.is_empty());
        });
        let full = gate(0);
        full.rest(true);
        assert_eq!(full.try_write(b"abc", || true), Direct::Carried(0));
    }
}
