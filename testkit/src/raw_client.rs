//! A raw-socket AMQP 0-9-1 client: a hand-made handshake, channels, confirms and publishes
//! whose content header is given as bytes, to send what a real client refuses to encode.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::time::Instant;

use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection};

use crate::fake_broker::STEP_TIMEOUT;
use crate::frame_io::FrameIo;
use crate::frames::{
    FRAME_HEARTBEAT, PROTOCOL_HEADER, content_frames, method_frame, publish_frame,
};

fn err(what: impl Into<String>) -> io::Error {
    io::Error::other(what.into())
}

/// An open AMQP connection driven by hand: no heartbeats, every wait bounded by
/// [`STEP_TIMEOUT`].
///
/// ```no_run
/// use lepus_testkit::{RawClient, frames};
///
/// // A header whose `headers` table nests 20,000 deep, through a real broker.
/// let props = frames::headers_props(&frames::deep_table(20_000));
/// let mut c = RawClient::connect("127.0.0.1:5672", "guest", "guest", "/")?;
/// c.open_channels(1..=1)?;
/// c.confirm_select(1)?;
/// c.publish(1, "", "some-queue", &props, b"body")?;
/// c.expect_ack(1, 1)?;
/// c.close()?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct RawClient {
    io: FrameIo,
    frame_max: u32,
}

impl RawClient {
    /// Connect and handshake (PLAIN with `user`/`pass`, then `vhost`), accepting the
    /// broker's channel_max and frame_max, with heartbeats off.
    pub fn connect(
        addr: impl ToSocketAddrs,
        user: &str,
        pass: &str,
        vhost: &str,
    ) -> io::Result<RawClient> {
        let addr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| err("the address resolves to nothing"))?;
        let mut io = FrameIo::new(TcpStream::connect_timeout(&addr, STEP_TIMEOUT)?);
        io.send(PROTOCOL_HEADER)?;
        let mut c = RawClient { io, frame_max: 0 };
        match c.next_method("connection.start")? {
            (0, AMQPClass::Connection(connection::AMQPMethod::Start(_))) => {}
            other => return Err(err(format!("expected connection.start, got {other:?}"))),
        }
        c.io.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: Default::default(),
                mechanism: "PLAIN".into(),
                response: format!("\0{user}\0{pass}").into(),
                locale: "en_US".into(),
            })),
        )?;
        let tune = match c.next_method("connection.tune")? {
            (0, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => t,
            other => return Err(err(format!("expected connection.tune, got {other:?}"))),
        };
        // 0 means "no limit" from the broker; a client still has to pick one.
        c.frame_max = if tune.frame_max == 0 {
            131_072
        } else {
            tune.frame_max
        };
        let mut out = method_frame(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: if tune.channel_max == 0 {
                    2047
                } else {
                    tune.channel_max
                },
                frame_max: c.frame_max,
                heartbeat: 0,
            })),
        );
        out.extend(method_frame(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: vhost.into(),
            })),
        ));
        c.io.send(&out)?;
        match c.next_method("connection.open-ok")? {
            (0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => Ok(c),
            other => Err(err(format!("expected connection.open-ok, got {other:?}"))),
        }
    }

    /// The frame_max agreed in the handshake.
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// The frame reader and writer, to send or read anything by hand.
    pub fn io(&mut self) -> &mut FrameIo {
        &mut self.io
    }

    /// The next method, skipping heartbeats. A `connection.close` or `channel.close` from
    /// the broker is an error that carries its reply code and text.
    pub fn next_method(&mut self, what: &str) -> io::Result<(u16, AMQPClass)> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let f = self.io.recv_frame(deadline)?;
            if f.kind == FRAME_HEARTBEAT {
                continue;
            }
            let m = f
                .method()
                .ok_or_else(|| err(format!("waiting for {what}: got frame {f:?}")))?;
            if let AMQPClass::Connection(connection::AMQPMethod::Close(c)) = &m {
                return Err(err(format!(
                    "waiting for {what}: broker closed the connection ({}): {}",
                    c.reply_code, c.reply_text
                )));
            }
            if let AMQPClass::Channel(channel::AMQPMethod::Close(c)) = &m {
                return Err(err(format!(
                    "waiting for {what}: broker closed channel {} ({}): {}",
                    f.channel, c.reply_code, c.reply_text
                )));
            }
            return Ok((f.channel, m));
        }
    }

    /// Open the channels `ids`: all `channel.open`s in one write, then every `open-ok`.
    pub fn open_channels(&mut self, ids: RangeInclusive<u16>) -> io::Result<()> {
        let mut out = Vec::new();
        for ch in ids.clone() {
            out.extend(method_frame(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ));
        }
        self.io.send(&out)?;
        for _ in ids {
            match self.next_method("channel.open-ok")? {
                (_, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))) => {}
                other => return Err(err(format!("expected channel.open-ok, got {other:?}"))),
            }
        }
        Ok(())
    }

    /// Put `channel` in confirm mode.
    pub fn confirm_select(&mut self, channel: u16) -> io::Result<()> {
        self.io.send_method(
            channel,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            })),
        )?;
        match self.next_method("confirm.select-ok")? {
            (ch, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))) if ch == channel => Ok(()),
            other => Err(err(format!("expected confirm.select-ok, got {other:?}"))),
        }
    }

    /// Publish one message (mandatory) whose content header carries `props` as raw bytes
    /// (property flags and list); the body is split to fit frame_max. Fails without
    /// sending anything if the header frame alone exceeds frame_max.
    pub fn publish(
        &mut self,
        channel: u16,
        exchange: &str,
        routing_key: &str,
        props: &[u8],
        body: &[u8],
    ) -> io::Result<()> {
        let header_len = 8 + 12 + props.len();
        if header_len > self.frame_max as usize {
            return Err(err(format!(
                "content header frame of {header_len} bytes exceeds frame_max {}",
                self.frame_max
            )));
        }
        let mut out = publish_frame(channel, exchange, routing_key);
        out.extend(content_frames(channel, props, body, self.frame_max));
        self.io.send(&out)
    }

    /// Wait for the broker's `basic.ack` of `delivery_tag` on `channel`; a `basic.return`
    /// (the message was unroutable) or anything else is an error.
    pub fn expect_ack(&mut self, channel: u16, delivery_tag: u64) -> io::Result<()> {
        match self.next_method("basic.ack")? {
            (ch, AMQPClass::Basic(basic::AMQPMethod::Ack(a)))
                if ch == channel && a.delivery_tag == delivery_tag =>
            {
                Ok(())
            }
            (_, AMQPClass::Basic(basic::AMQPMethod::Return(r))) => Err(err(format!(
                "the broker returned the message ({}): {}",
                r.reply_code, r.reply_text
            ))),
            other => Err(err(format!("expected basic.ack, got {other:?}"))),
        }
    }

    /// Send `connection.close` (200) and wait for `close-ok`, skipping anything before it.
    pub fn close(mut self) -> io::Result<()> {
        self.io.send(&close_frame())?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let f = self.io.recv_frame(deadline)?;
            if f.method_id() == Some((10, 51)) {
                return Ok(());
            }
        }
    }
}

/// A `connection.close` frame with reply 200, for a client that ends normally.
pub fn close_frame() -> Vec<u8> {
    method_frame(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    )
}

/// Publish one message to `exchange`/`routing_key` on the broker at `addr` (guest/guest,
/// vhost "/") on a connection of its own. `props` is the property flags and list of the
/// content header, as raw bytes. Waits for the publisher confirm and fails unless the
/// broker acks.
pub fn publish_raw(
    addr: impl ToSocketAddrs,
    exchange: &str,
    routing_key: &str,
    props: &[u8],
    body: &[u8],
) -> io::Result<()> {
    let mut c = RawClient::connect(addr, "guest", "guest", "/")?;
    c.open_channels(1..=1)?;
    c.confirm_select(1)?;
    c.publish(1, exchange, routing_key, props, body)?;
    c.expect_ack(1, 1)?;
    c.close()
}
