//! A raw-socket AMQP 0-9-1 publisher: a hand-made handshake, `channel.open`,
//! `confirm.select` and one `basic.publish` whose content header is given as bytes. It
//! sends what lepus refuses to encode (e.g. a headers table nested 20,000 deep) through a
//! real broker.
#![allow(dead_code)]

use std::io;
use std::net::TcpStream;
use std::time::Instant;

use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection};

use super::fake_broker::{
    FRAME_HEARTBEAT, Frame, FrameIo, STEP_TIMEOUT, body_frame, header_frame, method_frame,
};

fn err(what: impl Into<String>) -> io::Error {
    io::Error::other(what.into())
}

fn next_method(io: &mut FrameIo, what: &str) -> io::Result<(u16, AMQPClass)> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let f: Frame = io.recv_frame(deadline)?;
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

/// Publish one message to `exchange`/`routing_key` on the broker at `addr` (guest/guest,
/// vhost "/"). `props` is the property flags and list of the content header, as raw
/// bytes. Waits for the publisher confirm and fails unless the broker acks.
pub fn publish_raw(
    addr: &str,
    exchange: &str,
    routing_key: &str,
    props: &[u8],
    body: &[u8],
) -> io::Result<()> {
    let mut io = FrameIo::new(TcpStream::connect(addr)?);
    io.send(b"AMQP\x00\x00\x09\x01")?;
    match next_method(&mut io, "connection.start")? {
        (0, AMQPClass::Connection(connection::AMQPMethod::Start(_))) => {}
        other => return Err(err(format!("expected connection.start, got {other:?}"))),
    }
    io.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: Default::default(),
            mechanism: "PLAIN".into(),
            response: "\0guest\0guest".into(),
            locale: "en_US".into(),
        })),
    )?;
    let tune = match next_method(&mut io, "connection.tune")? {
        (0, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => t,
        other => return Err(err(format!("expected connection.tune, got {other:?}"))),
    };
    let frame_max = if tune.frame_max == 0 {
        131_072
    } else {
        tune.frame_max
    };
    io.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max,
            heartbeat: 0,
        })),
    )?;
    io.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    )?;
    match next_method(&mut io, "connection.open-ok")? {
        (0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
        other => return Err(err(format!("expected connection.open-ok, got {other:?}"))),
    }
    io.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )?;
    match next_method(&mut io, "channel.open-ok")? {
        (1, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))) => {}
        other => return Err(err(format!("expected channel.open-ok, got {other:?}"))),
    }
    io.send_method(
        1,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    )?;
    match next_method(&mut io, "confirm.select-ok")? {
        (1, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))) => {}
        other => return Err(err(format!("expected confirm.select-ok, got {other:?}"))),
    }

    let mut out = method_frame(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            mandatory: true,
            immediate: false,
        })),
    );
    let header = header_frame(1, body.len() as u64, props);
    if header.len() > frame_max as usize {
        return Err(err(format!(
            "content header frame of {} bytes exceeds frame_max {frame_max}",
            header.len()
        )));
    }
    out.extend(header);
    for piece in body.chunks(frame_max as usize - 8) {
        out.extend(body_frame(1, piece));
    }
    io.send(&out)?;
    match next_method(&mut io, "basic.ack")? {
        (1, AMQPClass::Basic(basic::AMQPMethod::Ack(a))) if a.delivery_tag == 1 => {}
        (1, AMQPClass::Basic(basic::AMQPMethod::Return(r))) => {
            return Err(err(format!(
                "the broker returned the message ({}): {}",
                r.reply_code, r.reply_text
            )));
        }
        other => return Err(err(format!("expected basic.ack, got {other:?}"))),
    }

    io.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    )?;
    match next_method(&mut io, "connection.close-ok")? {
        (0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => Ok(()),
        other => Err(err(format!("expected connection.close-ok, got {other:?}"))),
    }
}
