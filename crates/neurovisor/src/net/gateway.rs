//! The gateway process of one VM (`neurovisor net-gateway`, started by
//! [`super::host`] under a keeper).
//!
//! Start-up runs single-threaded, as root: enter the upstream namespace (if
//! one is named), note its addresses, then `unshare` a network namespace of
//! the VM's own (or enter the one the host made for a jailed Firecracker, see
//! [`GatewayArgs::vm_netns`]) and build the link in it with the real tools: `ip` (the
//! TAP `tap0`, `10.200.0.1/30`) and `nft` (redirect every TCP connection to
//! the filter, accept DNS to the resolver, drop everything else, forward
//! nothing). The listening sockets are bound there; then the process goes back
//! to the upstream namespace (so its own connections and lookups leave from
//! there), sends the TAP descriptor to the host, and drops to the VM's
//! unprivileged uid with no capabilities before it reads a single byte from
//! the VM. The namespace lives as long as the process's sockets: when the
//! gateway dies, the TAP, the address and the rules go with it.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::sched::CloneFlags;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dns::Resolver;
use super::proxy::Filter;
use super::{Decision, NetSettings, DNS_PORT, GATEWAY_IP, GUEST_IP, PROXY_PORT};
use crate::security::rate_limit::{RateLimitConfig, RateLimiter, TokenBucketConfig, BANDWIDTH_WINDOW};

/// The TAP's name inside the VM's namespace.
pub const TAP: &str = "tap0";
/// What the gateway sends (with the TAP descriptor) once the link is up.
pub const READY: &[u8] = b"ready\n";
/// Connections the filter serves at once.
const MAX_CONNECTIONS: usize = 256;
/// DNS queries answered at once.
const MAX_QUERIES: usize = 64;
/// Connections per second the VM may open (the vsock ops bucket's shape).
const CONNECTIONS_PER_SEC: u64 = 50;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Dns(#[from] super::dns::DnsError),
}

fn sys<E: Into<std::io::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> GatewayError {
    let what = what.into();
    move |e| GatewayError::Sys {
        what,
        source: e.into(),
    }
}

/// Arguments the host passes.
#[derive(Debug, Clone)]
pub struct GatewayArgs {
    /// Our end of the host's socket pair (inherited).
    pub control_fd: RawFd,
    pub settings: NetSettings,
    /// Who the gateway becomes after start-up (and, with `vm_netns`, who
    /// owns the TAP).
    pub uid: u32,
    pub gid: u32,
    /// The VM's namespace when the host made it (a jailed Firecracker is
    /// put there by its jailer and opens the TAP by name): the gateway enters
    /// it instead of making one, leaves the TAP persistent and owned by
    /// `uid`/`gid`, and sends no descriptor. `None`: a namespace of the
    /// gateway's own, and the TAP's descriptor goes to the host (QEMU).
    pub vm_netns: Option<std::path::PathBuf>,
}

/// Runs the gateway until the host closes its end. Must be called before any
/// other thread exists (namespace switches are per thread).
pub fn main(args: GatewayArgs) -> Result<(), GatewayError> {
    // SAFETY: the host passed this descriptor for us alone.
    let control = unsafe { OwnedFd::from_raw_fd(args.control_fd) };
    let control = std::os::unix::net::UnixStream::from(control);
    if let Some(ns) = &args.settings.upstream.netns {
        enter_netns(ns)?;
    }
    let local_addrs = local_addresses()?;
    let upstream_ns =
        std::fs::File::open("/proc/thread-self/ns/net").map_err(sys("open our network namespace"))?;
    match &args.vm_netns {
        None => nix::sched::unshare(CloneFlags::CLONE_NEWNET)
            .map_err(sys("unshare the VM's network namespace"))?,
        Some(ns) => enter_netns(ns)?,
    }
    let tap = open_tap(TAP)?;
    if args.vm_netns.is_some() {
        persist_tap(&tap, args.uid, args.gid)?;
    }
    ip(&["link", "set", "lo", "up"])?;
    ip(&["addr", "add", &format!("{GATEWAY_IP}/30"), "dev", TAP])?;
    ip(&["link", "set", TAP, "up"])?;
    nft(&ruleset())?;
    let udp = std::net::UdpSocket::bind(SocketAddr::from((GATEWAY_IP, DNS_PORT)))
        .map_err(sys("bind the resolver (udp)"))?;
    let dns_tcp = std::net::TcpListener::bind(SocketAddr::from((GATEWAY_IP, DNS_PORT)))
        .map_err(sys("bind the resolver (tcp)"))?;
    let proxy = std::net::TcpListener::bind(SocketAddr::from((GATEWAY_IP, PROXY_PORT)))
        .map_err(sys("bind the filter"))?;
    nix::sched::setns(&upstream_ns, CloneFlags::CLONE_NEWNET)
        .map_err(sys("return to the upstream namespace"))?;
    drop(upstream_ns);
    send_tap(&control, args.vm_netns.is_none().then_some(&tap))?;
    drop(tap);
    drop_privileges(args.uid, args.gid)?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(sys("start the runtime"))?;
    rt.block_on(serve(args.settings, control, udp, dns_tcp, proxy, local_addrs))
}

fn enter_netns(path: &Path) -> Result<(), GatewayError> {
    let f =
        std::fs::File::open(path).map_err(sys(format!("open the upstream namespace {}", path.display())))?;
    nix::sched::setns(&f, CloneFlags::CLONE_NEWNET)
        .map_err(sys(format!("enter the upstream namespace {}", path.display())))
}

fn local_addresses() -> Result<Vec<IpAddr>, GatewayError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(sys("list the upstream addresses"))?;
    Ok(addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .collect())
}

/// `TUNSETIFF` (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETPERSIST` (`_IOW('T', 203, int)`).
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
/// `TUNSETOWNER` (`_IOW('T', 204, int)`).
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
/// `TUNSETGROUP` (`_IOW('T', 206, int)`).
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;

/// Keeps the TAP after our descriptor closes, for the VMM to attach by name
/// as `uid` without any capability. It still lives no longer than the
/// namespace: the namespace's end deletes it.
fn persist_tap(tap: &OwnedFd, uid: u32, gid: u32) -> Result<(), GatewayError> {
    for (req, arg, what) in [
        (
            TUNSETOWNER,
            libc::c_ulong::from(uid),
            "give the TAP to the VM's uid",
        ),
        (
            TUNSETGROUP,
            libc::c_ulong::from(gid),
            "give the TAP to the VM's gid",
        ),
        (TUNSETPERSIST, 1, "make the TAP persistent"),
    ] {
        // SAFETY: these ioctls take an integer argument, not a pointer.
        if unsafe { libc::ioctl(tap.as_raw_fd(), req as _, arg) } < 0 {
            return Err(sys(what)(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn open_tap(name: &str) -> Result<OwnedFd, GatewayError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(sys("open /dev/net/tun"))?;
    // SAFETY: a zeroed ifreq with a NUL-terminated name and the flags, for an
    // ioctl that only reads and writes that struct.
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        if libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &ifr) < 0 {
            return Err(sys("create the TAP device")(std::io::Error::last_os_error()));
        }
    }
    Ok(OwnedFd::from(f))
}

use std::os::unix::fs::OpenOptionsExt;

fn tool(name: &str, hint: &str) -> Result<std::path::PathBuf, GatewayError> {
    crate::vmm::find_binary(None, name)
        .or_else(|| {
            ["/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| GatewayError::Setup(format!("{name} not found: {hint}")))
}

fn ip(args: &[&str]) -> Result<(), GatewayError> {
    let bin = tool("ip", "install iproute2 (apt-get install iproute2)")?;
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(sys("run ip"))?;
    if !out.status.success() {
        return Err(GatewayError::Setup(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn nft(rules: &str) -> Result<(), GatewayError> {
    let bin = tool("nft", "install nftables (apt-get install nftables)")?;
    let mut child = Command::new(bin)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(sys("run nft"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(sys("write the rules to nft"))?;
    }
    let out = child.wait_with_output().map_err(sys("wait for nft"))?;
    if !out.status.success() {
        return Err(GatewayError::Setup(format!(
            "nft refused the VM's rules: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The VM namespace's whole ruleset: only the resolver and the filter are
/// reachable, and only from the VM's own address; nothing is forwarded.
pub fn ruleset() -> String {
    format!(
        r#"table inet neurovisor {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{TAP}" ip daddr {GATEWAY_IP} udp dport 53 redirect to :{DNS_PORT}
    iifname "{TAP}" ip daddr {GATEWAY_IP} tcp dport 53 redirect to :{DNS_PORT}
    iifname "{TAP}" meta nfproto ipv4 meta l4proto tcp redirect to :{PROXY_PORT}
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    iifname "lo" accept
    iifname "{TAP}" ip saddr {GUEST_IP} ip daddr {GATEWAY_IP} udp dport {DNS_PORT} accept
    iifname "{TAP}" ip saddr {GUEST_IP} ip daddr {GATEWAY_IP} tcp dport {{ {DNS_PORT}, {PROXY_PORT} }} accept
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
  }}
  chain output {{
    type filter hook output priority filter; policy drop;
    oifname "lo" accept
    oifname "{TAP}" ip saddr {GATEWAY_IP} ip daddr {GUEST_IP} ct state established accept
  }}
}}
"#
    )
}

/// Says the link is up, with the TAP's descriptor when the host wants it.
fn send_tap(control: &std::os::unix::net::UnixStream, tap: Option<&OwnedFd>) -> Result<(), GatewayError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let fds: Vec<RawFd> = tap.iter().map(|t| t.as_raw_fd()).collect();
    let iov = [std::io::IoSlice::new(READY)];
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    sendmsg::<UnixAddr>(control.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)
        .map_err(sys("send the TAP to the host"))?;
    Ok(())
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), GatewayError> {
    use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
    setgroups(&[]).map_err(sys("drop supplementary groups"))?;
    setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid))
        .map_err(sys("set the gateway's gid"))?;
    // A uid change away from 0 clears every capability set.
    setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))
        .map_err(sys("set the gateway's uid"))?;
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(sys("set no_new_privs")(std::io::Error::last_os_error()));
    }
    Ok(())
}

async fn serve(
    settings: NetSettings,
    control: std::os::unix::net::UnixStream,
    udp: std::net::UdpSocket,
    dns_tcp: std::net::TcpListener,
    proxy: std::net::TcpListener,
    local_addrs: Vec<IpAddr>,
) -> Result<(), GatewayError> {
    let nb = sys("make a socket non-blocking");
    udp.set_nonblocking(true)
        .and_then(|()| dns_tcp.set_nonblocking(true))
        .and_then(|()| proxy.set_nonblocking(true))
        .and_then(|()| control.set_nonblocking(true))
        .map_err(nb)?;
    let udp = tokio::net::UdpSocket::from_std(udp).map_err(sys("register the resolver"))?;
    let dns_tcp = tokio::net::TcpListener::from_std(dns_tcp).map_err(sys("register the resolver"))?;
    let proxy = tokio::net::TcpListener::from_std(proxy).map_err(sys("register the filter"))?;
    let control = tokio::net::UnixStream::from_std(control).map_err(sys("register the control socket"))?;
    let (mut control_rd, mut control_wr) = control.into_split();

    let policy = Arc::new(settings.policy);
    let resolver = Arc::new(Resolver::new(policy.clone(), &settings.upstream.dns)?);
    let limits = RateLimitConfig {
        bandwidth: policy
            .bandwidth
            .and_then(|b| TokenBucketConfig::per_second(b, BANDWIDTH_WINDOW)),
        ops: TokenBucketConfig::per_second(CONNECTIONS_PER_SEC, std::time::Duration::from_secs(2)),
    };
    let filter = Arc::new(Filter {
        policy,
        bindings: resolver.bindings.clone(),
        local_addrs,
        limiter: Arc::new(RateLimiter::new(limits, &Default::default())),
    });

    // Decisions go to the host as JSON lines; a host that does not read
    // loses them, it never slows the VM's traffic.
    let (events, mut rx) = tokio::sync::mpsc::channel::<Decision>(1024);
    let writer = async move {
        while let Some(d) = rx.recv().await {
            let Ok(mut line) = serde_json::to_vec(&d) else {
                continue;
            };
            line.push(b'\n');
            if control_wr.write_all(&line).await.is_err() {
                break;
            }
        }
    };
    let report = move |d: Decision| {
        let _ = events.try_send(d);
    };

    let udp = Arc::new(udp);
    let queries = Arc::new(tokio::sync::Semaphore::new(MAX_QUERIES));
    let udp_loop = {
        let (resolver, report, queries) = (resolver.clone(), report.clone(), queries.clone());
        async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(permit) = queries.clone().try_acquire_owned() else {
                    continue;
                };
                let query = buf[..n].to_vec();
                let (resolver, report, udp) = (resolver.clone(), report.clone(), udp.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some((answer, d)) = resolver.answer(&query).await {
                        report(d);
                        let _ = udp.send_to(&answer, from).await;
                    }
                });
            }
        }
    };
    let tcp_dns_loop = {
        let (resolver, report, queries) = (resolver.clone(), report.clone(), queries.clone());
        async move {
            loop {
                let Ok((mut s, _)) = dns_tcp.accept().await else {
                    continue;
                };
                let Ok(permit) = queries.clone().try_acquire_owned() else {
                    continue;
                };
                let (resolver, report) = (resolver.clone(), report.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let work = async {
                        loop {
                            let len = s.read_u16().await? as usize;
                            let mut q = vec![0u8; len];
                            s.read_exact(&mut q).await?;
                            let Some((answer, d)) = resolver.answer(&q).await else {
                                break;
                            };
                            report(d);
                            let len = u16::try_from(answer.len()).unwrap_or(u16::MAX);
                            s.write_u16(len).await?;
                            s.write_all(&answer[..usize::from(len)]).await?;
                        }
                        Ok::<_, std::io::Error>(())
                    };
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), work).await;
                });
            }
        }
    };
    let conns = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let proxy_loop = {
        let report = report.clone();
        async move {
            loop {
                let Ok((s, _)) = proxy.accept().await else {
                    continue;
                };
                let Ok(permit) = conns.clone().try_acquire_owned() else {
                    super::proxy::refuse(s);
                    continue;
                };
                let (filter, report) = (filter.clone(), report.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    report(filter.handle(s).await);
                });
            }
        }
    };
    // The host closing its end (or dying) ends the gateway.
    let host_gone = async move {
        let mut b = [0u8; 64];
        while let Ok(n) = control_rd.read(&mut b).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = host_gone => {}
        _ = udp_loop => {}
        _ = tcp_dns_loop => {}
        _ = proxy_loop => {}
        _ = writer => {}
    }
    Ok(())
}
