//! Test AMQP 0-9-1 client code against broker failures.
//!
//! A toolkit for the tests of lepus, and for applications that want to know what their
//! own code does when the network or the broker misbehaves. It does not depend on any
//! AMQP client: everything speaks TCP and raw frames, so it tests any client.
//!
//! - [`Proxy`]: a fault-injection TCP proxy to put between a client and a real broker.
//!   RST, FIN, partitions, one-way stalls, latency with jitter, bandwidth caps, writes cut
//!   into small pieces, refused connections; on every connection or on one
//!   ([`Link`]); with counters and timestamps to assert "exactly one reconnect" or to date
//!   a fault.
//! - [`FakeBroker`]: a scripted broker for one connection. The script does the handshake
//!   with helpers ([`Peer::handshake`], [`Peer::serve_channel_open`], ...), then sends
//!   whatever the test needs, including what a real broker never sends (a frame larger
//!   than agreed, a content header announcing 2^63 bytes, a close in the middle of a
//!   content).
//! - [`frames`]: builders of raw frames, property lists and field tables, and the
//!   [`Frame`] a test reads back; [`FrameIo`] reads and writes frames on a socket with
//!   deadlines.
//! - [`RawClient`] and [`publish_raw`]: a hand-made client, to push through a real broker
//!   what a well-behaved client library refuses to encode.
//! - [`within`], [`Waiter`], [`wait_until`]: deadlines for the test's own side, so a hung
//!   client fails the test instead of hanging it.
//!
//! # Example: a client must notice a silent broker
//!
//! ```no_run
//! use std::time::Duration;
//! use lepus_testkit::{Proxy, wait_until};
//!
//! let proxy = Proxy::start("127.0.0.1:5672")?;
//! // Connect your client to 127.0.0.1:{proxy.port()} with a 1 s heartbeat, then:
//! proxy.partition();
//! // Two heartbeat intervals later it should have given up on that connection.
//! std::thread::sleep(Duration::from_secs(3));
//! proxy.heal();
//! // A recovering client has opened a new connection, exactly one.
//! assert!(wait_until(Duration::from_secs(10), || proxy.connections() == 2));
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Example: a client must survive a frame cut into pieces
//!
//! ```no_run
//! use std::time::Duration;
//! use lepus_testkit::{FakeBroker, Tune, frames};
//!
//! let broker = FakeBroker::start(|p| {
//!     p.handshake(Tune::default());
//!     let ch = p.serve_channel_open();
//!     let (ch, tag) = p.serve_consume();
//!     // One delivery, sent a byte at a time.
//!     let mut bytes = frames::deliver_frame(ch, &tag, 1);
//!     bytes.extend(frames::content_frames(ch, &frames::no_props(), b"hi", p.frame_max));
//!     for b in bytes {
//!         p.send(&[b]);
//!     }
//!     p.expect_connection_close()
//! });
//! // Connect your client to 127.0.0.1:{broker.port()}, consume, receive "hi", close.
//! let close = broker.finish();
//! assert_eq!(close.reply_code, 200);
//! ```
//!
//! # Threads and deadlines
//!
//! The proxy runs an accept thread and four threads per forwarded connection; the fake
//! broker runs its script on a thread of its own. Every wait of the kit has a deadline
//! (5 s a step for scripts and the raw client, 15 s for a whole script), so a client that
//! hangs fails the test instead of hanging it. Dropping a [`Proxy`] resets its
//! connections and joins its accept thread.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod fake_broker;
mod frame_io;
pub mod frames;
mod proxy;
mod raw_client;
mod timing;

// The public interface is:
pub use fake_broker::{FakeBroker, Peer, SCRIPT_TIMEOUT, STEP_TIMEOUT, Tune, is_reject};
pub use frame_io::FrameIo;
pub use frames::Frame;
pub use proxy::{Direction, Link, Proxy};
pub use raw_client::{RawClient, close_frame, publish_raw};
pub use timing::{Waiter, wait_until, within};
