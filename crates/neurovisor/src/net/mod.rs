//! Per-VM egress, default deny (`--network`).
//!
//! A VM started with an [`EgressPolicy`] gets one virtio-net NIC whose host
//! end is a TAP device inside a network namespace of its own, created by the
//! VM's **gateway** (`neurovisor net-gateway`, [`gateway`]), a process per VM
//! under a keeper like the VMM. That namespace has no route anywhere: nothing
//! the VM sends is ever forwarded. The gateway answers inside it, on
//! `10.200.0.1`: its resolver ([`dns`]) answers only allowlisted names (a
//! name resolving to a refused address is refused too), and nftables sends
//! every TCP connection to its filter ([`proxy`]), which allows a connection
//! only to an address one of those names resolved to *for this VM*, only on
//! 80/443, only when the TLS SNI or HTTP Host names it, and then opens its own
//! connection from the upstream namespace (the host's, or one a test made).
//! UDP other than DNS, ICMP and IPv6 are dropped. The namespace, the TAP and
//! the rules live exactly as long as the gateway process: its death (SIGKILL
//! of the owner included, through its keeper) removes all of them.
//!
//! The host side ([`host`]) spawns the gateway, takes the TAP descriptor it
//! sends back for the VMM, and counts the gateway's decisions on `/metrics`.

pub mod dns;
pub mod gateway;
pub mod host;
pub mod proxy;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The gateway's address on the VM's link (its resolver, its filter).
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The VM's own address: the same in every VM (each link is its own namespace).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// Where nftables redirects the VM's TCP connections, on the gateway.
pub const PROXY_PORT: u16 = 15001;
/// Where nftables redirects the VM's DNS (port 53): an unprivileged port, so
/// the gateway needs no `CAP_NET_BIND_SERVICE`.
pub const DNS_PORT: u16 = 5353;
/// Ports a connection to an allowlisted name may use.
pub const NAMED_PORTS: [u16; 2] = [80, 443];
/// The guest NIC's MAC address (every VM's link is its own).
pub const GUEST_MAC: &str = "52:54:00:00:00:02";
/// The cloud metadata service: refused even when a CIDR would cover it.
pub const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Guest kernel parameters that configure the VM's NIC (`CONFIG_IP_PNP`): its
/// address, the gateway as its route and as its only resolver.
pub fn guest_cmdline() -> String {
    format!("ip={GUEST_IP}::{GATEWAY_IP}:255.255.255.252:sandbox:eth0:off:{GATEWAY_IP}")
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("--allow-host {0}")]
    Host(String),
    #[error("--allow-cidr {0}")]
    Cidr(String),
    #[error("--allow-host/--allow-cidr need --network (the VM has no network device without it)")]
    NoNetwork,
}

/// What one VM may reach. Checked once on the host ([`EgressPolicy::new`]);
/// the gateway receives it as JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressPolicy {
    /// Names, lower case: `example.com` (that name) or `*.example.com` (its
    /// subdomains, not itself).
    pub hosts: Vec<String>,
    /// Address ranges reachable on any TCP port without a name (private ranges
    /// are refused unless named here).
    pub cidrs: Vec<IpNet>,
    /// Bytes per second the VM may send (the vsock token bucket's shape);
    /// `None`: unlimited.
    pub bandwidth: Option<u64>,
}

impl EgressPolicy {
    /// Checks `--allow-host` entries (as sandbox profiles' `domains`) and CIDRs.
    pub fn new(hosts: &[String], cidrs: &[String], bandwidth: Option<u64>) -> Result<Self, PolicyError> {
        let mut out = Self {
            bandwidth,
            ..Self::default()
        };
        for h in hosts {
            out.hosts
                .extend(crate::profile::check_domain(h).map_err(PolicyError::Host)?);
        }
        for c in cidrs {
            let net: IpNet = c.parse().map_err(|_| {
                PolicyError::Cidr(format!(
                    "'{}' is not an address range; write e.g. 10.1.2.0/24",
                    crate::channel::text::sanitize_capped(c, 80)
                ))
            })?;
            out.cidrs.push(net.trunc());
        }
        out.hosts.sort();
        out.hosts.dedup();
        out.cidrs.sort();
        out.cidrs.dedup();
        Ok(out)
    }

    /// Whether `name` (any case, with or without the final dot) is allowlisted.
    pub fn allows_name(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.iter().any(|p| match p.strip_prefix("*.") {
            Some(parent) => name
                .strip_suffix(parent)
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => *p == name,
        })
    }

    /// Whether `ip` lies in a range the policy names.
    pub fn in_cidrs(&self, ip: IpAddr) -> bool {
        self.cidrs.iter().any(|n| n.contains(&ip))
    }

    /// Why the VM may never reach `ip`, whatever name it came from; `None` if
    /// it may (when a name or CIDR allows it).
    pub fn refusal(&self, ip: IpAddr) -> Option<Refusal> {
        let IpAddr::V4(v4) = ip else {
            // The VM has no IPv6; an IPv6 answer would bypass the IPv4 ranges.
            return Some(Refusal::Ipv6);
        };
        if v4 == METADATA_V4 {
            return Some(Refusal::Metadata);
        }
        if v4.is_loopback()
            || v4.is_unspecified()
            || v4.is_broadcast()
            || v4.is_multicast()
            || v4.octets()[0] == 0
            || v4.octets()[0] >= 240
        {
            return Some(Refusal::Reserved);
        }
        if self.in_cidrs(ip) {
            return None;
        }
        let o = v4.octets();
        let cgnat = o[0] == 100 && (64..128).contains(&o[1]);
        let benchmark = o[0] == 198 && (o[1] == 18 || o[1] == 19);
        if v4.is_link_local() {
            return Some(Refusal::LinkLocal);
        }
        if v4.is_private() || cgnat || benchmark {
            return Some(Refusal::Private);
        }
        None
    }
}

/// Why an address is refused (a bounded label on `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Metadata,
    Reserved,
    LinkLocal,
    Private,
    Ipv6,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Metadata => "metadata",
            Refusal::Reserved => "reserved_address",
            Refusal::LinkLocal => "link_local",
            Refusal::Private => "private_address",
            Refusal::Ipv6 => "ipv6",
        }
    }
}

/// Where the gateway's own connections and lookups go: the host's network
/// (production) or a namespace (tests: one with no route off the machine).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    /// A network namespace file (`/run/netns/NAME`); `None`: the host's.
    pub netns: Option<PathBuf>,
    /// Resolvers (`IP` or `IP:PORT`); empty: the host's `/etc/resolv.conf`.
    pub dns: Vec<std::net::SocketAddr>,
}

/// Everything the gateway of one VM needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSettings {
    pub policy: EgressPolicy,
    pub upstream: Upstream,
    /// The `neurovisor` executable that runs the gateway (`net-gateway`);
    /// `None`: this process's own. A library user whose process is not
    /// `neurovisor` (a test harness) names it.
    #[serde(skip)]
    pub program: Option<PathBuf>,
}

/// One decision of a gateway, sent to the host as a JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decision {
    /// `dns` or `tcp`.
    pub kind: String,
    pub allowed: bool,
    /// Why (a bounded set: see [`Refusal::label`] and the gateway's reasons).
    pub reason: String,
    /// The name asked for or presented (sanitized, capped), if any.
    #[serde(default)]
    pub name: String,
    /// The address and port, if any.
    #[serde(default)]
    pub addr: String,
}

/// Parses `IP` or `IP:PORT` (port 53 by default).
pub fn parse_dns_server(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .map_err(|_| {
            format!(
                "'{}' is not a resolver address; write e.g. 192.0.2.53 or 192.0.2.53:5353",
                crate::channel::text::sanitize_capped(s, 60)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: &[&str], cidrs: &[&str]) -> EgressPolicy {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        EgressPolicy::new(&s(hosts), &s(cidrs), None).expect("valid policy")
    }

    #[test]
    fn names_match_exactly_or_as_subdomains() {
        let p = policy(&["api.example.com", "*.pypi.org", ".github.com"], &[]);
        assert!(p.allows_name("api.example.com"));
        assert!(p.allows_name("API.Example.com."));
        assert!(!p.allows_name("example.com"));
        assert!(!p.allows_name("xapi.example.com"));
        assert!(!p.allows_name("api.example.com.evil.test"));
        assert!(p.allows_name("files.pypi.org"));
        assert!(p.allows_name("a.b.pypi.org"));
        assert!(!p.allows_name("pypi.org"));
        assert!(!p.allows_name("evilpypi.org"));
        assert!(p.allows_name("github.com") && p.allows_name("api.github.com"));
    }

    #[test]
    fn bad_entries_are_named_with_the_fix() {
        let e = EgressPolicy::new(&["10.0.0.1".into()], &[], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("address") && e.contains("cidr"), "{e}");
        let e = EgressPolicy::new(&[], &["10.0.0/8".into()], None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--allow-cidr '10.0.0/8' is not an address range"),
            "{e}"
        );
    }

    #[test]
    fn refused_ranges_unless_named_and_metadata_always() {
        let p = policy(&[], &[]);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(p.refusal(ip("169.254.169.254")), Some(Refusal::Metadata));
        assert_eq!(p.refusal(ip("127.0.0.1")), Some(Refusal::Reserved));
        assert_eq!(p.refusal(ip("0.1.2.3")), Some(Refusal::Reserved));
        assert_eq!(p.refusal(ip("224.0.0.1")), Some(Refusal::Reserved));
        assert_eq!(p.refusal(ip("169.254.1.1")), Some(Refusal::LinkLocal));
        for a in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "10.200.0.1",
        ] {
            assert_eq!(p.refusal(ip(a)), Some(Refusal::Private), "{a}");
        }
        assert_eq!(p.refusal(ip("fd00:ec2::254")), Some(Refusal::Ipv6));
        assert_eq!(p.refusal(ip("203.0.113.10")), None);
        let named = policy(&[], &["10.1.0.0/16", "169.254.0.0/16"]);
        assert_eq!(named.refusal(ip("10.1.2.3")), None);
        assert_eq!(named.refusal(ip("10.2.0.1")), Some(Refusal::Private));
        assert_eq!(named.refusal(ip("169.254.169.254")), Some(Refusal::Metadata));
    }

    #[test]
    fn the_guest_is_told_its_address_route_and_resolver() {
        assert_eq!(
            guest_cmdline(),
            "ip=10.200.0.2::10.200.0.1:255.255.255.252:sandbox:eth0:off:10.200.0.1"
        );
    }
}
