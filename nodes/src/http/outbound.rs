//! Requests voxgate sends to URLs its tenants chose (usage-trigger callbacks, and every other
//! tenant-given URL): they must not be aimed inside — at loopback, private, link-local,
//! carrier-grade NAT or other non-public addresses of the node's network — unless the operator
//! allows it (`allow_private_callbacks = true`, for a test's loopback receivers or an all-private
//! deployment). A URL is checked when it is given (an address in it, or a name that resolves to
//! such an address, is refused with 400 naming the field) and again at delivery: the client's
//! resolver drops non-public addresses, so a name that changed its answer since (DNS rebinding)
//! finds nothing to connect to. Redirects are not followed.
//!
//! Operator-configured URLs (`twilio_api_url`) are not tenant input and are not checked here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Why a URL may not be called.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("must be an http:// or https:// URL with a host")]
    Scheme,
    #[error("{0} is not a public address (loopback, private, link-local and similar are refused)")]
    NotPublic(IpAddr),
    #[error("{host} resolves only to addresses that are not public ({addr})")]
    ResolvesInside { host: String, addr: IpAddr },
    #[error("{host} does not resolve: {reason}")]
    Unresolved { host: String, reason: String },
}

/// True for addresses on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        // 100.64.0.0/10 carrier-grade NAT, 192.0.0.0/24 protocol assignments, 198.18.0.0/15
        // benchmarking, 240.0.0.0/4 reserved.
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || o[0] >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        // fc00::/7 unique local, fe80::/10 link-local, 2001:db8::/32 documentation, 64:ff9b::/96
        // NAT64 (reaches IPv4 inside), ::/96 IPv4-compatible.
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] == 0x64 && s[1] == 0xff9b)
        || (s[0..6] == [0, 0, 0, 0, 0, 0]))
}

/// The host and port of an http(s) URL.
fn host_port(url: &str) -> Result<(String, u16), UrlError> {
    let (rest, default_port) = if let Some(r) = url.strip_prefix("https://") {
        (r, 443)
    } else if let Some(r) = url.strip_prefix("http://") {
        (r, 80)
    } else {
        return Err(UrlError::Scheme);
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or(UrlError::Scheme)?;
        (h.to_owned(), after.strip_prefix(':').and_then(|p| p.parse().ok()).unwrap_or(default_port))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| UrlError::Scheme)?),
            None => (authority.to_owned(), default_port),
        }
    };
    if host.is_empty() {
        return Err(UrlError::Scheme);
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// Checks a tenant-given URL when it is given: its scheme, and (unless `allow_private`) that it
/// neither names nor resolves to a non-public address.
pub async fn check_url(url: &str, allow_private: bool) -> Result<(), UrlError> {
    let (host, port) = host_port(url)?;
    if allow_private {
        return Ok(());
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return if is_public(ip) { Ok(()) } else { Err(UrlError::NotPublic(ip)) };
    }
    let lookup = tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host((host.clone(), port))).await;
    let addrs: Vec<SocketAddr> = match lookup {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => return Err(UrlError::Unresolved { host, reason: e.to_string() }),
        Err(_) => return Err(UrlError::Unresolved { host, reason: "timed out".into() }),
    };
    match addrs.iter().find(|a| !is_public(a.ip())) {
        Some(a) => Err(UrlError::ResolvesInside { host, addr: a.ip() }),
        None if addrs.is_empty() => Err(UrlError::Unresolved { host, reason: "no addresses".into() }),
        None => Ok(()),
    }
}

/// Checks a URL at delivery, before the request: the literal-address part of [`check_url`] (a
/// name is checked by the client's resolver, [`PublicOnly`]).
pub fn check_at_delivery(url: &str, allow_private: bool) -> Result<(), UrlError> {
    let (host, _) = host_port(url)?;
    if allow_private {
        return Ok(());
    }
    match host.parse::<IpAddr>() {
        Ok(ip) if !is_public(ip) => Err(UrlError::NotPublic(ip)),
        _ => Ok(()),
    }
}

/// A resolver that answers only public addresses (all of them, when private ones are allowed).
#[derive(Debug, Clone, Copy)]
pub struct PublicOnly {
    pub allow_private: bool,
}

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = addrs.iter().copied().filter(|a| allow_private || is_public(a.ip())).collect();
            if kept.is_empty() {
                metrics::counter!("voxgate_outbound_refused_total", "reason" => "resolves_inside").increment(1);
                let e = match addrs.first() {
                    Some(a) => UrlError::ResolvesInside { host, addr: a.ip() },
                    None => UrlError::Unresolved { host, reason: "no addresses".into() },
                };
                return Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An HTTP client for tenant-given URLs: public addresses only (unless allowed), no redirects,
/// the given timeout.
pub fn client(timeout: Duration, allow_private: bool) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(PublicOnly { allow_private }))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_addresses_are_not_public() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "54.172.60.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
    }

    #[tokio::test]
    async fn urls_aimed_inside_are_refused_unless_allowed() {
        for u in [
            "http://127.0.0.1:8080/hook",
            "http://[::1]/x",
            "https://169.254.169.254/latest/meta-data",
            "http://user:pw@10.0.0.1/",
            "http://localhost:9/x",
            "http://LOCALHOST/x",
        ] {
            assert!(check_url(u, false).await.is_err(), "{u}");
            assert!(check_url(u, true).await.is_ok(), "{u} allowed");
        }
        assert_eq!(check_url("ftp://example.com/", true).await, Err(UrlError::Scheme));
        assert_eq!(check_url("http:///x", true).await, Err(UrlError::Scheme));
        assert!(check_url("https://54.172.60.1/hook", false).await.is_ok());
        assert!(check_at_delivery("http://10.0.0.1/x", false).is_err());
        assert!(check_at_delivery("http://10.0.0.1/x", true).is_ok());
        assert!(check_at_delivery("https://example.com/x", false).is_ok());
    }

    #[tokio::test]
    async fn the_resolver_drops_inside_answers() {
        let client = client(Duration::from_secs(2), false).unwrap();
        let e = client.get("http://localhost:9/").send().await.unwrap_err();
        let mut chain = String::new();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cur {
            chain.push_str(&c.to_string());
            chain.push_str(" / ");
            cur = c.source();
        }
        assert!(chain.contains("not public"), "{chain}");
    }
}
