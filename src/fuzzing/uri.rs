//! The `uri` target: `ConnectionOptions::from_uri` on any string and on URIs built from parts.

use std::time::Duration;

use super::Input;
use crate::error::Error;
use crate::options::{AuthMechanism, ConnectionOptions};
use crate::protocol::frame::FRAME_MIN_SIZE;

fn percent_encode(s: &str, inp: &mut Input<'_>) -> String {
    let upper = inp.bool();
    let mut out = String::new();
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else if upper {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
    out
}

fn check_options(r: &crate::Result<ConnectionOptions>) {
    match r {
        Ok(o) => {
            assert!(o.frame_max == 0 || o.frame_max >= FRAME_MIN_SIZE);
            assert!(!o.host.is_empty());
            assert!(!o.vhost.is_empty());
        }
        Err(e) => {
            // Refused as a URI, or (`amqps://` in a build without the `tls` feature, as
            // the fuzz crate builds lepus) refused for the missing feature.
            let no_tls = !cfg!(feature = "tls")
                && matches!(
                    e,
                    Error::Tls {
                        kind: crate::error::TlsFailure::NotCompiledIn,
                        ..
                    }
                );
            assert!(matches!(e, Error::InvalidUri(_)) || no_tls, "{e:?}");
            assert!(!e.to_string().is_empty());
        }
    }
}

/// Harness: `ConnectionOptions::from_uri`. Odd first byte: the rest as a string (lossy
/// UTF-8), which must parse or be refused with `InvalidUri`. Even: a URI built from
/// chosen parts, percent-encoded, which must parse back to exactly those parts.
pub fn uri(data: &[u8]) {
    let mut inp = Input::new(data);
    if inp.u8() & 1 == 1 {
        let s = String::from_utf8_lossy(inp.rest());
        check_options(&ConnectionOptions::from_uri(&s));
        return;
    }
    let d = ConnectionOptions::default();
    let mut uri = String::from("amqp://");
    let creds = inp.bool().then(|| (inp.string(20), inp.string(20)));
    if let Some((u, p)) = &creds {
        uri += &percent_encode(u, &mut inp);
        if !p.is_empty() || inp.bool() {
            uri.push(':');
            uri += &percent_encode(p, &mut inp);
        }
        uri.push('@');
    }
    let host = inp.string(20);
    uri += &percent_encode(&host, &mut inp);
    let port = inp.bool().then(|| inp.u16());
    if let Some(p) = port {
        uri += &format!(":{p}");
    }
    let vhost = match inp.u8() % 3 {
        0 => None,
        1 => Some(String::new()),
        _ => Some(inp.string(20)),
    };
    if let Some(v) = &vhost {
        uri.push('/');
        uri += &percent_encode(v, &mut inp);
    }
    let heartbeat = inp.bool().then(|| inp.u16());
    let frame_max = inp.bool().then(|| inp.u32() >> (inp.u8() % 32));
    let channel_max = inp.bool().then(|| inp.u16());
    let timeout = inp.bool().then(|| u64::from(inp.u32()));
    let name = inp.bool().then(|| inp.string(20));
    let auth = inp.bool().then(|| inp.bool());
    let mut q = Vec::new();
    if let Some(v) = heartbeat {
        q.push(format!("heartbeat={v}"));
    }
    if let Some(v) = frame_max {
        q.push(format!("frame_max={v}"));
    }
    if let Some(v) = channel_max {
        q.push(format!("channel_max={v}"));
    }
    if let Some(v) = timeout {
        q.push(format!("connection_timeout={v}"));
    }
    if let Some(v) = &name {
        q.push(format!("connection_name={}", percent_encode(v, &mut inp)));
    }
    if let Some(v) = auth {
        q.push(format!(
            "auth_mechanism={}",
            if v { "AMQPLAIN" } else { "plain" }
        ));
    }
    if !q.is_empty() {
        uri.push('?');
        uri += &q.join("&");
    }
    let r = ConnectionOptions::from_uri(&uri);
    check_options(&r);
    if frame_max.is_some_and(|f| f != 0 && f < FRAME_MIN_SIZE) {
        assert!(r.is_err(), "frame_max below 4096 accepted: {uri}");
        return;
    }
    let o = r.unwrap_or_else(|e| panic!("{uri:?} refused: {e}"));
    let (user, pass) = creds.unwrap_or((d.username.clone(), d.password.clone()));
    assert_eq!(o.username, user, "{uri}");
    assert_eq!(o.password, pass, "{uri}");
    assert_eq!(o.host, if host.is_empty() { d.host } else { host }, "{uri}");
    assert_eq!(o.port, port.unwrap_or(d.port));
    let want_vhost = match vhost {
        Some(v) if !v.is_empty() => v,
        _ => d.vhost,
    };
    assert_eq!(o.vhost, want_vhost, "{uri}");
    assert_eq!(o.heartbeat, heartbeat.unwrap_or(d.heartbeat));
    assert_eq!(o.frame_max, frame_max.unwrap_or(d.frame_max));
    assert_eq!(o.channel_max, channel_max.unwrap_or(d.channel_max));
    assert_eq!(
        o.connection_timeout,
        timeout.map_or(d.connection_timeout, Duration::from_millis)
    );
    assert_eq!(o.connection_name, name);
    let want_auth = match auth {
        Some(true) => AuthMechanism::AmqPlain,
        Some(false) => AuthMechanism::Plain,
        None => d.auth,
    };
    assert_eq!(o.auth, want_auth);
}
