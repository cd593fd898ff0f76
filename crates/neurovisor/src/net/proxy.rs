//! The gateway's TCP filter. nftables redirects every TCP connection of the
//! VM here; the original destination comes from conntrack
//! (`SO_ORIGINAL_DST`). A connection is let through only when:
//! - its address is in a CIDR the policy names (any port), or
//! - it is on 80 or 443, the address was resolved for this VM by our
//!   resolver, and the name the client presents (TLS SNI, read with rustls'
//!   ClientHello parser, or the HTTP `Host` header, read with httparse) is
//!   allowlisted and is one of the names that address was resolved for, so a
//!   fronted request to another name on the same address is refused.
//!
//! Allowed connections are opened by the gateway itself, from the upstream
//! namespace, and spliced; what the VM sends is paced by the same token
//! buckets as its vsock traffic.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::dns::Bindings;
use super::{Decision, EgressPolicy, NAMED_PORTS};
use crate::security::rate_limit::{RateLimitedStream, RateLimiter};

/// The first bytes of a connection must name its host within this time and size.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_MAX: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the client's first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A complete TLS ClientHello, with its SNI if any.
    Tls(Option<String>),
    /// A complete HTTP request head, with its Host (without port) if any.
    Http(Option<String>),
    /// Not enough bytes yet.
    Partial,
    /// Neither.
    Other,
}

/// Reads what `buf` holds so far.
pub fn parse_hello(buf: &[u8]) -> Hello {
    if buf.is_empty() {
        return Hello::Partial;
    }
    if buf[0] == 0x16 {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = buf;
        while !rd.is_empty() {
            match acceptor.read_tls(&mut rd) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return Hello::Other,
            }
        }
        return match acceptor.accept() {
            Ok(Some(accepted)) => Hello::Tls(
                accepted
                    .client_hello()
                    .server_name()
                    .map(|s| s.to_ascii_lowercase()),
            ),
            Ok(None) => Hello::Partial,
            Err(_) => Hello::Other,
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let mut hosts = req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host"));
            let host = hosts.next().and_then(|h| std::str::from_utf8(h.value).ok());
            if hosts.next().is_some() {
                // Two Host headers: which one the server believes is its business.
                return Hello::Other;
            }
            Hello::Http(host.map(|h| {
                let h = h.trim();
                let h = match h.rsplit_once(':') {
                    Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
                    _ => h,
                };
                h.trim_end_matches('.').to_ascii_lowercase()
            }))
        }
        Ok(httparse::Status::Partial) => Hello::Partial,
        Err(_) => Hello::Other,
    }
}

/// The filter of one VM.
pub struct Filter {
    pub policy: Arc<EgressPolicy>,
    pub bindings: Bindings,
    /// The gateway's own upstream addresses: never a destination.
    pub local_addrs: Vec<IpAddr>,
    /// Paces the VM's bytes and connections.
    pub limiter: Arc<RateLimiter>,
}

impl Filter {
    /// Handles one redirected connection; the decision is for the host.
    pub async fn handle(&self, mut guest: TcpStream) -> Decision {
        let decision = |allowed: bool, reason: &str, name: &str, addr: String| Decision {
            kind: "tcp".into(),
            allowed,
            reason: reason.into(),
            name: crate::channel::text::sanitize_capped(name, 120),
            addr,
        };
        let dst = match original_dst(&guest) {
            Ok(d) => d,
            Err(e) => return decision(false, "no_destination", "", e.to_string()),
        };
        let addr = dst.to_string();
        let ip = IpAddr::V4(*dst.ip());
        if !self.limiter.admit_connection() {
            refuse(guest);
            return decision(false, "rate_limited", "", addr);
        }
        if self.local_addrs.contains(&ip) {
            refuse(guest);
            return decision(false, "host_address", "", addr);
        }
        if let Some(r) = self.policy.refusal(ip) {
            refuse(guest);
            return decision(false, r.label(), "", addr);
        }
        let by_cidr = self.policy.in_cidrs(ip);
        let mut name = String::new();
        let mut hello = Vec::new();
        if !by_cidr {
            if !NAMED_PORTS.contains(&dst.port()) {
                refuse(guest);
                return decision(false, "port", "", addr);
            }
            if !self.bindings.known(ip) {
                refuse(guest);
                return decision(false, "address_not_resolved", "", addr);
            }
            let read = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut guest, &mut hello)).await;
            let found = match read {
                Ok(Ok(h)) => h,
                Ok(Err(_)) | Err(_) => {
                    refuse(guest);
                    return decision(false, "no_hello", "", addr);
                }
            };
            let presented = match found {
                Hello::Tls(Some(n)) | Hello::Http(Some(n)) => n,
                Hello::Tls(None) | Hello::Http(None) => {
                    refuse(guest);
                    return decision(false, "no_name", "", addr);
                }
                Hello::Partial | Hello::Other => {
                    refuse(guest);
                    return decision(false, "not_tls_or_http", "", addr);
                }
            };
            if !self.policy.allows_name(&presented) {
                refuse(guest);
                return decision(false, "name_not_allowed", &presented, addr);
            }
            if !self.bindings.resolved(ip, &presented) {
                // Fronting: an allowed name presented to an address that was
                // resolved for another one.
                refuse(guest);
                return decision(false, "name_address_mismatch", &presented, addr);
            }
            name = presented;
        }
        let upstream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(SocketAddr::V4(dst))).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    refuse(guest);
                    tracing::debug!(%addr, "upstream connect failed: {e}");
                    return decision(false, "upstream_unreachable", &name, addr);
                }
                Err(_) => {
                    refuse(guest);
                    return decision(false, "upstream_unreachable", &name, addr);
                }
            };
        let limiter = self.limiter.clone();
        tokio::spawn(splice(guest, upstream, hello, limiter));
        decision(true, if by_cidr { "cidr" } else { "allowed" }, &name, addr)
    }
}

async fn read_hello(guest: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Hello> {
    let mut chunk = [0u8; 4096];
    loop {
        let n = guest.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Hello::Other);
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_hello(buf) {
            Hello::Partial if buf.len() < HELLO_MAX => continue,
            Hello::Partial => return Ok(Hello::Other),
            h => return Ok(h),
        }
    }
}

async fn splice(guest: TcpStream, mut upstream: TcpStream, hello: Vec<u8>, limiter: Arc<RateLimiter>) {
    if !hello.is_empty() {
        limiter.consumed_bytes(hello.len());
        if upstream.write_all(&hello).await.is_err() {
            return;
        }
    }
    let mut guest = RateLimitedStream::new(guest, limiter);
    let _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await;
}

/// Closes with a reset, so the client sees a refusal at once (a zero linger
/// never blocks the close).
pub fn refuse(guest: TcpStream) {
    let zero = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(&guest, nix::sys::socket::sockopt::Linger, &zero);
    drop(guest);
}

fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddrV4> {
    let sin = nix::sys::socket::getsockopt(&s.as_fd(), nix::sys::socket::sockopt::OriginalDst)
        .map_err(std::io::Error::from)?;
    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Ok(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_host_is_read_with_or_without_port() {
        let r = parse_hello(b"GET / HTTP/1.1\r\nHost: Api.Example.com:80\r\n\r\n");
        assert_eq!(r, Hello::Http(Some("api.example.com".into())));
        assert_eq!(parse_hello(b"GET / HTTP/1.1\r\nHost: a.test"), Hello::Partial);
        assert_eq!(parse_hello(b"GET / HTTP/1.1\r\n\r\n"), Hello::Http(None));
        assert_eq!(
            parse_hello(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
            Hello::Other
        );
        assert_eq!(parse_hello(b"SSH-2.0-OpenSSH\r\n"), Hello::Other);
    }

    #[test]
    fn tls_sni_is_read_from_a_real_client_hello() {
        // A ClientHello as rustls' own client writes it.
        let roots = rustls::RootCertStore::empty();
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("files.example.com").expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut bytes = Vec::new();
        conn.write_tls(&mut bytes).expect("hello");
        assert_eq!(parse_hello(&bytes), Hello::Tls(Some("files.example.com".into())));
        assert_eq!(parse_hello(&bytes[..bytes.len() / 2]), Hello::Partial);
    }
}
