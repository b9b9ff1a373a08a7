//! The `amqp://` and `amqps://` URI parser: a URI in, the plain values it names out. `options.rs`
//! applies them to a `ConnectionOptions`.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::protocol::frame::FRAME_MIN_SIZE;

/// What a URI said; `None` where it said nothing (the default stays).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ParsedUri {
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) host: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) vhost: Option<String>,
    pub(crate) heartbeat: Option<u16>,
    pub(crate) frame_max: Option<u32>,
    pub(crate) channel_max: Option<u16>,
    pub(crate) connection_timeout: Option<Duration>,
    pub(crate) connection_name: Option<String>,
    /// The `auth_mechanism` value as given; options.rs knows the mechanisms.
    pub(crate) auth_mechanism: Option<String>,
    /// The scheme was `amqps` (TLS).
    pub(crate) amqps: bool,
    /// Query pairs this parser does not know (the TLS parameters), percent-decoded, in
    /// order; options.rs applies them or refuses them as unknown.
    pub(crate) other: Vec<(String, String)>,
}

fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::InvalidUri(format!("bad percent-escape in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| Error::InvalidUri(format!("{s:?} is not UTF-8 once decoded")))
}

fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T> {
    v.parse()
        .map_err(|_| Error::InvalidUri(format!("{key}={v:?} is not a valid number")))
}

/// Parse `amqp://user:pass@host:port/vhost?key=value&..` (or `amqps://`).
/// `host`, `host:port`, `[v6]` or `[v6]:port`: the host and the port text, if any.
fn split_host_port(hostport: &str) -> std::result::Result<(&str, Option<&str>), &'static str> {
    if let Some(h) = hostport.strip_prefix('[') {
        let (h, after) = h.split_once(']').ok_or("unclosed [ in host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after ]")?),
        };
        return Ok((h, port));
    }
    Ok(match hostport.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (hostport, None),
    })
}

pub(crate) fn parse(uri: &str) -> Result<ParsedUri> {
    let bad = |why: &str| Error::InvalidUri(format!("{why}: {uri:?}"));
    let mut o = ParsedUri::default();
    let rest = match uri.split_once("://") {
        Some(("amqp", rest)) => rest,
        Some(("amqps", rest)) => {
            o.amqps = true;
            rest
        }
        _ => return Err(bad("expected a URI starting with amqp:// or amqps://")),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hp)) => {
            let (u, p) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            o.username = Some(percent_decode(u)?);
            o.password = Some(percent_decode(p)?);
            hp
        }
        None => authority,
    };
    let (host, port) = split_host_port(hostport).map_err(bad)?;
    if !host.is_empty() {
        o.host = Some(percent_decode(host)?);
    }
    if let Some(p) = port {
        o.port = Some(p.parse().map_err(|_| bad("invalid port"))?);
    }
    if let Some(path) = path {
        if path.contains('/') {
            return Err(bad("vhost must be one path segment (encode '/' as %2f)"));
        }
        if !path.is_empty() {
            o.vhost = Some(percent_decode(path)?);
        }
    }
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        match k {
            "heartbeat" => o.heartbeat = Some(num(k, &v)?),
            "frame_max" => o.frame_max = Some(num(k, &v)?),
            "channel_max" => o.channel_max = Some(num(k, &v)?),
            "connection_timeout" => o.connection_timeout = Some(Duration::from_millis(num(k, &v)?)),
            "connection_name" => o.connection_name = Some(v),
            "auth_mechanism" => o.auth_mechanism = Some(v),
            _ => o.other.push((k.to_string(), v)),
        }
    }
    if let Some(f) = o.frame_max.filter(|&f| f != 0 && f < FRAME_MIN_SIZE) {
        return Err(Error::InvalidUri(format!(
            "frame_max {f} is below the protocol minimum of 4096"
        )));
    }
    Ok(o)
}

/// A host after the first of a multi-host URI, with its port if given.
pub(crate) type MoreHost = (String, Option<u16>);

/// Parse a URI that may name several hosts, as other AMQP clients accept:
/// `amqp://user:pass@host1:5681,host2:5682,[::1]:5683/vhost?..`. The first host is the
/// primary (in the returned `ParsedUri`); the others follow, each with its port if given.
pub(crate) fn parse_multi(uri: &str) -> Result<(ParsedUri, Vec<MoreHost>)> {
    let bad = |why: &str| Error::InvalidUri(format!("{why}: {uri:?}"));
    let Some((scheme, rest)) = uri.split_once("://") else {
        return parse(uri).map(|p| (p, Vec::new()));
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if !hosts.contains(',') {
        return parse(uri).map(|p| (p, Vec::new()));
    }
    let mut list = hosts.split(',');
    let first = list.next().unwrap_or("");
    let mut single = format!("{scheme}://");
    if let Some(u) = userinfo {
        single.push_str(u);
        single.push('@');
    }
    single.push_str(first);
    single.push_str(&rest[end..]);
    let parsed = parse(&single)?;
    if parsed.host.is_none() {
        return Err(bad("empty host in the host list"));
    }
    let mut more = Vec::new();
    for h in list {
        let (host, port) = split_host_port(h).map_err(bad)?;
        if host.is_empty() {
            return Err(bad("empty host in the host list"));
        }
        let port = match port {
            Some(p) => Some(p.parse().map_err(|_| bad("invalid port"))?),
            None => None,
        };
        more.push((percent_decode(host)?, port));
    }
    Ok((parsed, more))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_only_what_the_uri_says() {
        assert_eq!(parse("amqp://").unwrap(), ParsedUri::default());
        let p = parse("amqp://u@h?auth_mechanism=Whatever").unwrap();
        assert_eq!(p.username.as_deref(), Some("u"));
        assert_eq!(p.password.as_deref(), Some(""));
        assert_eq!(p.host.as_deref(), Some("h"));
        assert_eq!(p.auth_mechanism.as_deref(), Some("Whatever"));
        assert_eq!((p.port, p.vhost), (None, None));
        assert!(!p.amqps);
    }

    #[test]
    fn amqps_and_unknown_pairs_are_recorded() {
        let p = parse("amqps://h?cacertfile=%2Fca.pem&heartbeat=5&bogus").unwrap();
        assert!(p.amqps);
        assert_eq!(p.port, None);
        assert_eq!(p.heartbeat, Some(5));
        assert_eq!(
            p.other,
            vec![
                ("cacertfile".to_string(), "/ca.pem".to_string()),
                ("bogus".to_string(), String::new())
            ]
        );
    }

    #[test]
    fn several_hosts() {
        let (p, more) =
            parse_multi("amqp://u:p@h1:5681,h2:5682,[::1]:5683,h4/vh?heartbeat=5").unwrap();
        assert_eq!(p.host.as_deref(), Some("h1"));
        assert_eq!(p.port, Some(5681));
        assert_eq!(p.vhost.as_deref(), Some("vh"));
        assert_eq!(p.heartbeat, Some(5));
        assert_eq!(p.username.as_deref(), Some("u"));
        assert_eq!(
            more,
            vec![
                ("h2".to_string(), Some(5682)),
                ("::1".to_string(), Some(5683)),
                ("h4".to_string(), None)
            ]
        );
        let (p, more) = parse_multi("amqp://h").unwrap();
        assert_eq!((p.host.as_deref(), more.len()), (Some("h"), 0));
        for u in [
            "amqp://h1,,h2",
            "amqp://,h2",
            "amqp://h1,h2:x",
            "amqp://h1,[::1",
        ] {
            assert!(matches!(parse_multi(u), Err(Error::InvalidUri(_))), "{u}");
        }
    }
}
