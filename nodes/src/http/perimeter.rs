//! The perimeter of the Twilio-facing endpoints: an optional allowlist of networks (Twilio's
//! published ranges, or a proxy's address) checked before anything else is read, and the client
//! address every per-address rule uses (the peer, or what trusted proxies say in
//! `X-Forwarded-For`).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use crate::http::{twilio_error, AppState};

/// The client's address: the peer, unless the peer is one of `trusted_proxies`; then the
/// `X-Forwarded-For` chain is walked from the right (the entry the nearest proxy appended) and the
/// first address that is not a trusted proxy is the client. The left part of the chain is the
/// client's own say and is never believed past that point.
pub fn client_addr(headers: &HeaderMap, peer: Option<IpAddr>, trusted_proxies: &[ipnet::IpNet]) -> Option<IpAddr> {
    let peer = peer.map(canonical)?;
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|n| n.contains(ip));
    if !trusted(&peer) {
        return Some(peer);
    }
    // Several X-Forwarded-For lines read as one list, in order.
    let mut chain: Vec<&str> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        let Ok(v) = v.to_str() else { return Some(peer) };
        chain.extend(v.split(',').map(str::trim).filter(|s| !s.is_empty()));
    }
    let mut client = peer;
    for entry in chain.iter().rev() {
        // A trusted proxy appends the address it was reached from, so an entry that is no
        // address at all was not written by one: stop at the last hop we can vouch for.
        let Some(ip) = parse_forwarded(entry).map(canonical) else { break };
        client = ip;
        if !trusted(&ip) {
            break;
        }
    }
    Some(client)
}

/// An `X-Forwarded-For` entry: an address, optionally with a port (`[v6]:p`, `v4:p`).
fn parse_forwarded(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    s.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The client address of a request (see [`client_addr`]).
pub fn client_ip(req: &Request, trusted_proxies: &[ipnet::IpNet]) -> Option<IpAddr> {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    client_addr(req.headers(), peer, trusted_proxies)
}

/// Middleware: refuses requests from outside `twilio_allow_cidrs` (when set) with 403.
pub async fn twilio_allowlist(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let allow = &state.cfg.twilio_allow;
    if allow.is_empty() {
        return next.run(req).await;
    }
    let ip = client_ip(&req, &state.cfg.trusted_proxies);
    if ip.is_some_and(|ip| allow.iter().any(|n| n.contains(&ip))) {
        return next.run(req).await;
    }
    metrics::counter!("voxgate_perimeter_refused_total").increment(1);
    if let Some(suppressed) = PERIMETER_LINES.admit() {
        tracing::warn!(client = ?ip, path = req.uri().path(), suppressed, "request from outside twilio_allow_cidrs refused");
    }
    twilio_error(StatusCode::FORBIDDEN, 20403, "this address may not reach the Twilio-facing endpoints")
}

static PERIMETER_LINES: LineLimit = LineLimit::per_second();

/// At most one log line per second from one place, for what outsiders can trigger at will
/// (unauthenticated requests): the metrics count every one, the log says how many it skipped.
pub struct LineLimit {
    /// The second of the last line written, and lines skipped since (packed: secs << 24 | n).
    state: AtomicU64,
}

impl LineLimit {
    pub const fn per_second() -> Self {
        Self { state: AtomicU64::new(0) }
    }

    /// `Some(skipped)` when a line may be written now (with how many were skipped since the
    /// last one), `None` when this one is skipped.
    pub fn admit(&self) -> Option<u64> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
            & 0xff_ffff_ffff;
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (secs, skipped) = (cur >> 24, cur & 0xff_ffff);
            let (next, out) =
                if secs != now { (now << 24, Some(skipped)) } else { (cur + u64::from(skipped < 0xff_ffff), None) };
            match self.state.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return out,
                Err(c) => cur = c,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<ipnet::IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_says() {
        let h = xff(&["1.2.3.4"]);
        let peer = Some("203.0.113.9".parse().unwrap());
        assert_eq!(client_addr(&h, peer, &[]), peer);
        assert_eq!(client_addr(&h, peer, &nets(&["10.0.0.0/8"])), peer);
    }

    #[test]
    fn the_chain_is_walked_from_the_right_to_the_first_untrusted_hop() {
        let proxies = nets(&["10.0.0.0/8", "192.168.1.1/32"]);
        let peer = Some("10.0.0.2".parse().unwrap());
        // The client claims 1.2.3.4 and 10.9.9.9; the proxy appended what it saw: 198.51.100.7.
        let h = xff(&["1.2.3.4, 10.9.9.9, 198.51.100.7"]);
        assert_eq!(client_addr(&h, peer, &proxies), Some("198.51.100.7".parse().unwrap()));
        // Two proxies in a row, over two header lines.
        let h = xff(&["1.2.3.4, 198.51.100.7", "192.168.1.1"]);
        assert_eq!(client_addr(&h, peer, &proxies), Some("198.51.100.7".parse().unwrap()));
        // Garbage to the left of the trusted hops stops the walk at the last address vouched for.
        let h = xff(&["not-an-ip, 192.168.1.1"]);
        assert_eq!(client_addr(&h, peer, &proxies), Some("192.168.1.1".parse().unwrap()));
        // No header: the proxy itself.
        assert_eq!(client_addr(&HeaderMap::new(), peer, &proxies), peer);
        // Ports and IPv4-mapped IPv6 peers.
        let h = xff(&["198.51.100.7:5060"]);
        let mapped = Some("::ffff:10.0.0.2".parse().unwrap());
        assert_eq!(client_addr(&h, mapped, &proxies), Some("198.51.100.7".parse().unwrap()));
    }

    #[test]
    fn line_limit_admits_one_line_a_second() {
        let l = LineLimit::per_second();
        assert_eq!(l.admit(), Some(0));
        // Within the same second (almost always) the next ones are skipped and counted.
        let skipped = (0..5).filter(|_| l.admit().is_none()).count();
        assert!(skipped >= 4, "{skipped}");
    }
}
