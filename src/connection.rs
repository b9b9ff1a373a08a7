//! The `Connection` handle: open (handshake on the caller's thread, then the I/O
//! thread), open channels, observe blocked state, close.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, channel as chan, connection};

use crate::channel::Channel;
use crate::error::{Error, Result, reply_code};
use crate::io::engine::Engine;
use crate::io::reactor::{Reactor, WAKER};
use crate::io::{ChannelShared, Command, ConnShared, Reply, handshake};
use crate::protocol::frame::put_method;
use crate::protocol::table::FieldTable;
use crate::sync::queue::{self};
use crate::sync::{Arc, AtomicBool, Mutex, Ordering};
use crate::uri::ConnectionOptions;

/// Commands queued for the I/O thread before callers wait for room.
const COMMAND_QUEUE: usize = 4096;
/// Stack of the I/O thread: field tables are parsed there, up to the depth cap.
const IO_THREAD_STACK: usize = 8 * 1024 * 1024;

/// A connection to the broker. Cheap to clone, `Send + Sync`: share one between threads
/// and give each thread its own [`Channel`]. The last handle dropped (connections and
/// channels alike) closes it.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<ConnectionInner>,
}

struct ConnectionInner {
    shared: Arc<ConnShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.inner.shared.opts;
        f.debug_struct("Connection")
            .field("host", &o.host)
            .field("port", &o.port)
            .field("vhost", &o.vhost)
            .field("open", &self.is_open())
            .finish()
    }
}

impl Connection {
    /// Open a connection from an `amqp://` URI (see [`ConnectionOptions::from_uri`]).
    ///
    /// ```no_run
    /// let conn = lepus::Connection::open("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10")?;
    /// # Ok::<(), lepus::Error>(())
    /// ```
    pub fn open(uri: &str) -> Result<Connection> {
        Self::open_with(ConnectionOptions::from_uri(uri)?)
    }

    /// Open a connection with explicit options. Connecting and the handshake happen on
    /// this thread and end within `connection_timeout`, with an error that says which
    /// step failed.
    pub fn open_with(opts: ConnectionOptions) -> Result<Connection> {
        let est = handshake::connect(&opts)?;
        let io_err = |e: std::io::Error| Error::ConnectionLost(format!("I/O setup failed: {e}"));
        est.stream.set_nonblocking(true).map_err(io_err)?;
        let poll = mio::Poll::new().map_err(io_err)?;
        let waker = mio::Waker::new(poll.registry(), WAKER).map_err(io_err)?;
        let (cmd_tx, cmd_rx) = queue::bounded(COMMAND_QUEUE);
        let (alive, dead) = queue::bounded(0);
        let write_timeout = if est.tuned.heartbeat > 0 {
            Duration::from_secs(u64::from(est.tuned.heartbeat) * 2)
        } else {
            Duration::from_secs(30)
        };
        let name = format!("lepus-io {}:{}", opts.host, opts.port);
        log::info!(
            "connected to {}:{} vhost {:?} (channel_max {}, frame_max {}, heartbeat {} s)",
            opts.host,
            opts.port,
            opts.vhost,
            est.tuned.channel_max,
            est.tuned.frame_max,
            est.tuned.heartbeat
        );
        let shared = Arc::new(ConnShared::new(
            cmd_tx,
            waker,
            dead,
            est.tuned,
            opts,
            est.server_properties,
        ));
        let reactor = Reactor {
            poll,
            sock: mio::net::TcpStream::from_std(est.stream),
            decoder: est.decoder,
            engine: Engine::new(shared.clone(), Instant::now()),
            commands: cmd_rx,
            alive,
            write_timeout,
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .stack_size(IO_THREAD_STACK)
            .spawn(move || reactor.run())
            .map_err(io_err)?;
        Ok(Connection {
            inner: Arc::new(ConnectionInner {
                shared,
                thread: Mutex::new(Some(thread)),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Open a new channel, waiting up to the operation timeout.
    pub fn open_channel(&self) -> Result<Channel> {
        let shared = &self.inner.shared;
        if shared.is_failed() {
            return Err(shared.error());
        }
        let deadline = Instant::now() + shared.opts.operation_timeout;
        let id = shared
            .ids
            .lock()
            .allocate()
            .ok_or(Error::NoFreeChannel(shared.tuned.channel_max))?;
        let ch = Arc::new(ChannelShared::new(id, shared.clone()));
        let mut bytes = Vec::with_capacity(16);
        put_method(
            &mut bytes,
            id,
            AMQPClass::Channel(chan::AMQPMethod::Open(chan::Open {})),
        )
        .map_err(Error::InvalidArgument)?;
        let (tx, rx) = queue::bounded(1);
        let sent = shared.send(
            Command::OpenChannel {
                shared: ch.clone(),
                bytes,
                reply: tx,
            },
            deadline,
            "room to send channel.open",
        );
        if let Err(e) = sent {
            shared.ids.lock().free(id);
            return Err(e);
        }
        // From here the I/O thread owns the id; dropping the handle on error closes it.
        let channel = Channel::new(ch.clone(), self.clone());
        match ch.wait_reply(&rx, deadline, "channel.open-ok")? {
            Reply::Method(AMQPClass::Channel(chan::AMQPMethod::OpenOk(_))) => Ok(channel),
            other => Err(Error::UnexpectedReply {
                operation: "channel.open",
                got: format!("{other:?}"),
            }),
        }
    }

    /// True until the connection is closed or lost.
    pub fn is_open(&self) -> bool {
        !self.inner.shared.is_failed()
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<Error> {
        self.inner
            .shared
            .is_failed()
            .then(|| self.inner.shared.error())
    }

    /// The broker's reason if it has blocked publishing on this connection
    /// (`connection.blocked`, e.g. a memory or disk alarm). Publishers wait, within their
    /// deadline, while it is blocked.
    pub fn blocked(&self) -> Option<String> {
        self.inner.shared.blocked_reason()
    }

    /// The broker's `server_properties` from `connection.start`.
    pub fn server_properties(&self) -> &FieldTable {
        &self.inner.shared.server_properties
    }

    /// Negotiated frame_max in bytes.
    pub fn frame_max(&self) -> u32 {
        self.inner.shared.tuned.frame_max
    }

    /// Negotiated channel_max.
    pub fn channel_max(&self) -> u16 {
        self.inner.shared.tuned.channel_max
    }

    /// Negotiated heartbeat in seconds (0: none).
    pub fn heartbeat(&self) -> u16 {
        self.inner.shared.tuned.heartbeat
    }

    /// Close the connection: send `connection.close`, wait for `close-ok` up to the
    /// close timeout, and join the I/O thread. Every waiter on the connection gets
    /// [`Error::ConnectionClosed`]. Closing twice, or closing a lost connection, is fine.
    pub fn close(&self) -> Result<()> {
        self.inner.close()
    }
}

impl ConnectionInner {
    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let shared = &self.shared;
        let mut result = Ok(());
        if !shared.is_failed() {
            let mut bytes = Vec::with_capacity(64);
            put_method(
                &mut bytes,
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: reply_code::REPLY_SUCCESS,
                    reply_text: "closed by the application".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )
            .map_err(Error::InvalidArgument)?;
            let (tx, rx) = queue::bounded(1);
            let deadline = Instant::now() + shared.opts.close_timeout + Duration::from_millis(500);
            if shared
                .send(
                    Command::Close { bytes, reply: tx },
                    deadline,
                    "room to send connection.close",
                )
                .is_ok()
            {
                let timeout = deadline.saturating_duration_since(Instant::now());
                result = match rx.recv_timeout(timeout) {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e),
                    // The I/O thread ended first: the link was gone anyway.
                    Err(queue::RecvTimeoutError::Disconnected) => Ok(()),
                    Err(queue::RecvTimeoutError::Timeout) => {
                        Err(Error::Timeout("connection.close-ok"))
                    }
                };
            }
        }
        // The I/O thread ends on its own once closing is over (bounded by the close
        // timeout), so this join is bounded too.
        if let Some(t) = self.thread.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        result
    }
}

impl Drop for ConnectionInner {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::warn!("closing the connection on drop: {e}");
        }
    }
}
