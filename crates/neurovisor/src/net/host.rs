//! The host's side of a VM's gateway: spawn it under a keeper (so the owner's
//! death, SIGKILL included, ends it and with it the VM's namespace), receive
//! the TAP descriptor it made, and count what it decides.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::process::Command;

use super::gateway::READY;
use super::{Decision, NetSettings};
use crate::metrics::{EgressLabel, Label, VmCounters};
use crate::supervisor::Confinement;
use crate::vmm::capped_log::CappedLog;
use crate::vmm::process::Helper;
use crate::vmm::{log_tail, VmmError};

/// How long the gateway gets to build the VM's link.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The uid a gateway of an unjailed VM runs as (`nobody`).
const NOBODY: u32 = 65534;

/// The reasons a gateway may give; anything else is counted as `other` (the
/// gateway handles the VM's traffic and is not trusted to bound our labels).
const REASONS: &[&str] = &[
    "allowed",
    "cidr",
    "no_ipv6",
    "no_such_name",
    "name_not_allowed",
    "query_type",
    "malformed",
    "upstream_failed",
    "resolves_to_metadata",
    "resolves_to_reserved_address",
    "resolves_to_link_local",
    "resolves_to_private_address",
    "resolves_to_ipv6",
    "no_destination",
    "rate_limited",
    "host_address",
    "metadata",
    "reserved_address",
    "link_local",
    "private_address",
    "ipv6",
    "port",
    "address_not_resolved",
    "no_hello",
    "no_name",
    "not_tls_or_http",
    "name_address_mismatch",
    "upstream_unreachable",
];

/// One VM's gateway. Dropping it ends the gateway (its keeper kills and reaps
/// it), which removes the VM's namespace, TAP and rules.
#[derive(Debug)]
pub struct Gateway {
    helper: Option<Helper>,
    events: tokio::task::JoinHandle<()>,
    vm_id: String,
    counters: VmCounters,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.events.abort();
        self.counters.live_egress.remove(&self.vm_id);
    }
}

impl Gateway {
    /// Starts the gateway of VM `vm_id` and waits until the VM's link is up.
    /// `vm_netns`: the namespace the host made for the VM (jailed
    /// Firecracker), where the gateway leaves a persistent TAP for the VMM
    /// to open by name (returns `None`); otherwise the gateway makes the
    /// namespace and sends the TAP's descriptor (returned).
    #[allow(clippy::too_many_arguments)]
    pub async fn spawn(
        vm_id: &str,
        settings: &NetSettings,
        conf: &Confinement,
        vm_netns: Option<&Path>,
        vm_dir: &Path,
        log: &CappedLog,
        log_path: &Path,
        counters: &VmCounters,
    ) -> Result<(Self, Option<OwnedFd>), VmmError> {
        let err = |source| VmmError::Spawn {
            what: "net-gateway".into(),
            source,
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(err)?;
        let exe = match &settings.program {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(err)?,
        };
        let settings_json =
            serde_json::to_string(settings).map_err(|e| err(std::io::Error::other(e.to_string())))?;
        let (uid, gid) = conf.ids().map_or((NOBODY, NOBODY), |ids| (ids.uid, ids.gid));
        let mut cmd = Command::new(exe);
        cmd.arg0(format!("nv-gateway:{}", vm_dir.display()))
            .arg("net-gateway")
            .arg("--control-fd")
            .arg(theirs.as_raw_fd().to_string())
            .arg("--uid")
            .arg(uid.to_string())
            .arg("--gid")
            .arg(gid.to_string())
            .arg("--settings")
            .arg(settings_json);
        if let Some(ns) = vm_netns {
            cmd.arg("--vm-netns").arg(ns);
        }
        cmd.env_clear().env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        let mut spec = conf.keeper_spec(None);
        spec.inherit_fds.push(theirs.as_raw_fd());
        let mut helper = Helper::spawn("net-gateway", cmd, log, log, spec)?;
        drop(theirs);

        ours.set_nonblocking(true).map_err(err)?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(err)?;
        let got = tokio::select! {
            r = tokio::time::timeout(START_TIMEOUT, recv_tap(&stream, vm_netns.is_none())) => r,
            status = helper.exited() => Ok(Err(std::io::Error::other(format!("exited ({status})")))),
        };
        let tap = match got {
            Ok(Ok(fd)) => fd,
            Ok(Err(e)) => {
                // Give its last words a moment to reach the log.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(VmmError::HelperExited {
                    what: "net-gateway".into(),
                    status: e.to_string(),
                    log_tail: log_tail(log_path, 20),
                });
            }
            Err(_) => {
                return Err(VmmError::HelperExited {
                    what: "net-gateway".into(),
                    status: format!("no network after {START_TIMEOUT:?}"),
                    log_tail: log_tail(log_path, 20),
                })
            }
        };
        counters.live_egress.open(vm_id);
        let events = tokio::spawn(count_decisions(stream, vm_id.to_string(), counters.clone()));
        Ok((
            Self {
                helper: Some(helper),
                events,
                vm_id: vm_id.to_string(),
                counters: counters.clone(),
            },
            tap,
        ))
    }

    /// The gateway's pid (its keeper's child), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.helper.as_ref().and_then(Helper::vm_pid)
    }

    /// Whether the gateway has ended, and how.
    pub fn check_exited(&mut self) -> Option<String> {
        self.helper.as_mut().and_then(Helper::try_exited)
    }

    /// Ends the gateway and waits until it and its keeper are reaped.
    pub async fn stop(mut self) {
        if let Some(h) = self.helper.take() {
            h.stop(Duration::ZERO).await;
        }
    }
}

/// Waits for the gateway's READY, which carries the TAP's descriptor exactly
/// when `want_fd`.
async fn recv_tap(stream: &tokio::net::UnixStream, want_fd: bool) -> std::io::Result<Option<OwnedFd>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    loop {
        stream.readable().await?;
        let got = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut buf = [0u8; READY.len()];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fd = None;
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for raw in fds {
                        // SAFETY: the kernel just gave us this descriptor.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        if fd.is_none() {
                            fd = Some(owned);
                        }
                    }
                }
            }
            Ok((msg.bytes, fd, buf))
        });
        match got {
            Ok((0, _, _)) => {
                return Err(std::io::Error::other(
                    "closed its socket before the network was up",
                ))
            }
            Ok((n, fd, buf)) if buf[..n] == *READY && fd.is_some() == want_fd => return Ok(fd),
            Ok(_) => return Err(std::io::Error::other("sent something other than its TAP")),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn count_decisions(stream: tokio::net::UnixStream, vm: String, counters: VmCounters) {
    let mut lines = tokio::io::BufReader::new(stream).lines();
    // A line longer than this is not a decision of ours.
    while let Ok(Some(line)) = lines.next_line().await {
        if line.len() > 4096 {
            continue;
        }
        let Ok(d) = serde_json::from_str::<Decision>(&line) else {
            continue;
        };
        let reason = if REASONS.contains(&d.reason.as_str()) {
            d.reason.clone()
        } else {
            crate::metrics::OTHER.to_string()
        };
        let kind = if d.kind == "dns" { "dns" } else { "tcp" };
        let decision = if d.allowed { "allowed" } else { "refused" };
        counters
            .egress_decisions
            .get_or_create(&EgressLabel {
                kind: Label::fixed(kind),
                decision: Label::fixed(decision),
                reason: Label::fixed(reason.clone()),
            })
            .inc();
        counters.live_egress.record(&vm, d.allowed);
        let name = crate::channel::text::sanitize_capped(&d.name, 120);
        let addr = crate::channel::text::sanitize_capped(&d.addr, 120);
        if d.allowed {
            tracing::debug!(%vm, kind, %reason, %name, %addr, "egress allowed");
        } else {
            tracing::info!(%vm, kind, %reason, %name, %addr, "egress refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::REASONS;
    use crate::net::Refusal;

    #[test]
    fn every_reason_the_gateway_gives_has_its_own_series() {
        for r in [
            Refusal::Metadata,
            Refusal::Reserved,
            Refusal::LinkLocal,
            Refusal::Private,
            Refusal::Ipv6,
        ] {
            assert!(REASONS.contains(&r.label()), "{}", r.label());
            let dns = format!("resolves_to_{}", r.label());
            assert!(REASONS.contains(&dns.as_str()), "{dns}");
        }
        // The literals of dns.rs and proxy.rs.
        let sources = [include_str!("dns.rs"), include_str!("proxy.rs")];
        for src in sources {
            for part in src.split("decision(").skip(1) {
                let Some(reason) = part.split('"').nth(1) else {
                    continue;
                };
                if part.starts_with("true, \"") || part.starts_with("false, \"") {
                    assert!(REASONS.contains(&reason), "{reason} is not in REASONS");
                }
            }
        }
    }
}
