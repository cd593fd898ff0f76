//! The VM's only resolver: answers A queries for allowlisted names from the
//! upstream resolver (hickory), refuses everything else, and remembers which
//! address each name resolved to for this VM ([`Bindings`]), the only
//! addresses the filter lets the VM connect to.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;

use super::{Decision, EgressPolicy};

/// TTL of our answers: short, so a program that caches still asks again.
const ANSWER_TTL: u32 = 30;
/// Names and addresses one VM may bind at most (a VM asking for ever more
/// names of a wildcard must not grow the gateway without bound).
const MAX_BINDINGS: usize = 4096;

/// Which names each address was resolved for, for this VM.
#[derive(Debug, Default, Clone)]
pub struct Bindings(Arc<Mutex<HashMap<IpAddr, HashSet<String>>>>);

impl Bindings {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, HashSet<String>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bind(&self, ip: IpAddr, name: &str) {
        let mut map = self.lock();
        let total: usize = map.values().map(HashSet::len).sum();
        if total < MAX_BINDINGS {
            map.entry(ip).or_default().insert(name.to_string());
        }
    }

    /// Whether `name` resolved to `ip` for this VM.
    pub fn resolved(&self, ip: IpAddr, name: &str) -> bool {
        self.lock().get(&ip).is_some_and(|names| names.contains(name))
    }

    /// Whether any name resolved to `ip`.
    pub fn known(&self, ip: IpAddr) -> bool {
        self.lock().contains_key(&ip)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot read the host's resolver configuration: {0}")]
    SystemConf(#[source] hickory_resolver::ResolveError),
}

/// The resolver of one VM.
pub struct Resolver {
    policy: Arc<EgressPolicy>,
    upstream: TokioResolver,
    pub bindings: Bindings,
}

impl Resolver {
    /// `servers` empty: the host's `/etc/resolv.conf`.
    pub fn new(policy: Arc<EgressPolicy>, servers: &[SocketAddr]) -> Result<Self, DnsError> {
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        opts.cache_size = 256;
        // /etc/hosts names the host's own services: never the VM's business.
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        let upstream = if servers.is_empty() {
            let mut b = TokioResolver::builder_tokio().map_err(DnsError::SystemConf)?;
            *b.options_mut() = opts;
            b.build()
        } else {
            let mut config = ResolverConfig::new();
            for s in servers {
                config.add_name_server(NameServerConfig::new(*s, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(*s, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                .with_options(opts)
                .build()
        };
        Ok(Self {
            policy,
            upstream,
            bindings: Bindings::default(),
        })
    }

    /// The answer to one query message, and the decision to report. `None`
    /// for bytes that are not a query at all (dropped, as a server would).
    pub async fn answer(&self, query: &[u8]) -> Option<(Vec<u8>, Decision)> {
        let msg = Message::from_vec(query).ok()?;
        if msg.message_type() != MessageType::Query {
            return None;
        }
        let mut resp = Message::new();
        resp.set_id(msg.id())
            .set_message_type(MessageType::Response)
            .set_op_code(msg.op_code())
            .set_recursion_desired(msg.recursion_desired())
            .set_recursion_available(true);
        let decision = |allowed: bool, reason: &str, name: &str, addr: String| Decision {
            kind: "dns".into(),
            allowed,
            reason: reason.into(),
            name: crate::channel::text::sanitize_capped(name, 120),
            addr,
        };
        let [q] = msg.queries() else {
            resp.set_response_code(ResponseCode::FormErr);
            return Some((
                resp.to_vec().ok()?,
                decision(false, "malformed", "", String::new()),
            ));
        };
        resp.add_query(q.clone());
        if msg.op_code() != OpCode::Query {
            resp.set_response_code(ResponseCode::NotImp);
            return Some((
                resp.to_vec().ok()?,
                decision(false, "malformed", "", String::new()),
            ));
        }
        let name = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let d = if !self.policy.allows_name(&name) {
            resp.set_response_code(ResponseCode::Refused);
            decision(false, "name_not_allowed", &name, String::new())
        } else {
            match q.query_type() {
                RecordType::A => self.lookup_a(&name, q.name(), &mut resp).await,
                // No IPv6 in the VM: an empty answer, so clients use A.
                RecordType::AAAA => decision(true, "no_ipv6", &name, String::new()),
                _ => {
                    resp.set_response_code(ResponseCode::Refused);
                    decision(false, "query_type", &name, String::new())
                }
            }
        };
        Some((resp.to_vec().ok()?, d))
    }

    async fn lookup_a(&self, name: &str, qname: &hickory_proto::rr::Name, resp: &mut Message) -> Decision {
        let decision = |allowed: bool, reason: &str, addr: String| Decision {
            kind: "dns".into(),
            allowed,
            reason: reason.into(),
            name: crate::channel::text::sanitize_capped(name, 120),
            addr,
        };
        let fqdn = format!("{name}.");
        let found = match self.upstream.ipv4_lookup(fqdn.as_str()).await {
            Ok(found) => found,
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
                resp.set_response_code(if e.is_nx_domain() {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                });
                return decision(true, "no_such_name", String::new());
            }
            Err(e) => {
                tracing::debug!(%name, "upstream lookup failed: {e}");
                resp.set_response_code(ResponseCode::ServFail);
                return decision(false, "upstream_failed", String::new());
            }
        };
        let all: Vec<IpAddr> = found.iter().map(|a| IpAddr::V4(a.0)).collect();
        let ok: Vec<IpAddr> = all
            .iter()
            .copied()
            .filter(|ip| self.policy.refusal(*ip).is_none())
            .collect();
        if ok.is_empty() {
            // Rebinding: an allowlisted name must not open a way to a refused
            // address, so the whole answer is refused.
            resp.set_response_code(ResponseCode::Refused);
            let why = all
                .first()
                .and_then(|ip| self.policy.refusal(*ip))
                .map_or("no_address", |r| r.label());
            let shown = all.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
            return decision(false, &format!("resolves_to_{why}"), shown);
        }
        for ip in &ok {
            self.bindings.bind(*ip, name);
            if let IpAddr::V4(v4) = ip {
                resp.add_answer(Record::from_rdata(qname.clone(), ANSWER_TTL, RData::A(A(*v4))));
            }
        }
        let shown = ok.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        decision(true, "allowed", shown)
    }
}
