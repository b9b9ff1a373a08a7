//! Broker addresses: the list a connection tries (from the options, the URI or a resolver),
//! shuffled so that the clients of a cluster spread over its nodes, and rotated so that a
//! recovery starts with the address after the one that failed.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

use crate::error::{Error, Result};

/// One broker address: a host name or IP address and a port.
///
/// ```no_run
/// use lepus::{Address, ConnectionOptions};
/// let opts = ConnectionOptions::from_uri("amqp://guest:guest@rabbit-1/%2f")?
///     .addresses_list([Address::new("rabbit-1", 5672), Address::new("rabbit-2", 5672)]);
/// let conn = lepus::Connection::open_with(opts)?;
/// println!("connected to {}", conn.address());
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Address {
    /// Host name or IP address (an IPv6 address without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Address {
    /// `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Address {
            host: host.into(),
            port,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Self {
        Address::new(a.ip().to_string(), a.port())
    }
}

/// Where the addresses of a connection come from; asked again at every connection and
/// every recovery, so a resolver can follow a cluster whose membership changes.
///
/// ```
/// use lepus::{Address, AddressResolver, DnsResolver};
/// // Every A and AAAA record of a name, each with the AMQP port.
/// let dns = DnsResolver::new("localhost", 5672);
/// assert!(dns.resolve().unwrap().iter().all(|a| a.port == 5672));
/// // A fixed list.
/// let fixed = vec![Address::new("rabbit-1", 5672), Address::new("rabbit-2", 5672)];
/// assert_eq!(fixed.resolve().unwrap().len(), 2);
/// ```
pub trait AddressResolver: Send + Sync {
    /// The addresses to try (before shuffling). An empty list is an error.
    fn resolve(&self) -> Result<Vec<Address>>;
}

impl AddressResolver for Vec<Address> {
    fn resolve(&self) -> Result<Vec<Address>> {
        Ok(self.clone())
    }
}

/// Resolves one host name to every address its DNS records (A and AAAA) name, so that a
/// cluster published under one name is spread over and failed over like a list.
///
/// ```no_run
/// use lepus::{ConnectionOptions, DnsResolver};
/// // Every node behind one DNS name, resolved again at each recovery.
/// let opts = ConnectionOptions::from_uri("amqp://guest:guest@rabbit.internal/%2f")?
///     .address_resolver(DnsResolver::new("rabbit.internal", 5672));
/// let conn = lepus::Connection::open_with(opts)?;
/// # Ok::<(), lepus::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct DnsResolver {
    host: String,
    port: u16,
}

impl DnsResolver {
    /// Resolve `host`; every address gets `port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        DnsResolver {
            host: host.into(),
            port,
        }
    }
}

impl AddressResolver for DnsResolver {
    fn resolve(&self) -> Result<Vec<Address>> {
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| {
                Error::ConnectionLost(format!("could not resolve {:?}: {e}", self.host))
            })?;
        let mut out: Vec<Address> = Vec::new();
        for a in addrs.map(Address::from) {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        Ok(out)
    }
}

/// A cheap random number: no dependency for a shuffle that needs only to differ between
/// processes and calls (xorshift seeded from std's per-process random hasher keys, which
/// also change with every `RandomState`).
fn random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        | 1
}

/// Fisher-Yates shuffle in place.
pub(crate) fn shuffle<T>(v: &mut [T]) {
    let mut s = seed();
    for i in (1..v.len()).rev() {
        let j = (random(&mut s) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// The order to try `list` in: shuffled if asked, then rotated so that it starts with the
/// address after `failed` (which comes last), so a recovery does not knock first on the
/// node that just went away.
pub(crate) fn order(
    mut list: Vec<Address>,
    shuffled: bool,
    failed: Option<&Address>,
) -> Vec<Address> {
    if shuffled {
        shuffle(&mut list);
    }
    if let Some(i) = failed.and_then(|f| list.iter().position(|a| a == f)) {
        list.rotate_left(i + 1);
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(n: u16) -> Vec<Address> {
        (0..n).map(|i| Address::new("h", 5000 + i)).collect()
    }

    #[test]
    fn ordered_starts_after_the_failed_one() {
        let l = list(3);
        assert_eq!(order(l.clone(), false, None), l);
        let o = order(l.clone(), false, Some(&l[0]));
        assert_eq!(o, vec![l[1].clone(), l[2].clone(), l[0].clone()]);
        let o = order(l.clone(), false, Some(&l[2]));
        assert_eq!(o, l);
        // An address no longer in the list changes nothing.
        assert_eq!(order(l.clone(), false, Some(&Address::new("x", 1))), l);
    }

    #[test]
    fn shuffled_puts_the_failed_one_last_and_spreads_first_choices() {
        let l = list(3);
        let mut first = std::collections::HashMap::new();
        for _ in 0..300 {
            let o = order(l.clone(), true, Some(&l[1]));
            assert_eq!(o.last(), Some(&l[1]));
            assert_eq!(o.len(), 3);
            let o = order(l.clone(), true, None);
            let mut sorted = o.clone();
            sorted.sort_by_key(|a| a.port);
            assert_eq!(sorted, l, "a permutation");
            *first.entry(o[0].port).or_insert(0) += 1;
        }
        // Each address comes first about a third of the time.
        assert_eq!(first.len(), 3, "{first:?}");
        assert!(first.values().all(|&n| n > 50), "{first:?}");
    }

    #[test]
    fn dns_gives_every_record_and_display_brackets_ipv6() {
        let a = DnsResolver::new("127.0.0.1", 5681).resolve().unwrap();
        assert_eq!(a, vec![Address::new("127.0.0.1", 5681)]);
        assert!(
            DnsResolver::new("no-such-host.invalid", 1)
                .resolve()
                .is_err()
        );
        assert_eq!(Address::new("::1", 5672).to_string(), "[::1]:5672");
        assert_eq!(Address::new("h", 1).to_string(), "h:1");
    }
}
