//! Who sent each gRPC request, and whether they may: a tower layer in front of
//! every service of the daemon (Sandbox, Agent, Inference, health, reflection).
//!
//! - Over the Unix socket the file permissions are the access control; the
//!   peer's credentials (uid, gid, pid from `SO_PEERCRED`) go into the
//!   request's span and its log line.
//! - Over TCP (plain or TLS) every request must carry
//!   `authorization: Bearer <token>`; the token is compared in constant time
//!   and a missing or wrong one gets UNAUTHENTICATED naming the fix.

use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::transport::{Token, TOKEN_ENV};

#[derive(Debug)]
struct Policy {
    /// The TCP listener's token; `None` when there is no TCP listener (then
    /// any request that did not come over the Unix socket is refused).
    token: Option<Token>,
    token_file: PathBuf,
}

/// The layer; one value serves both listeners.
#[derive(Clone)]
pub struct AccessLayer {
    policy: Arc<Policy>,
    metrics: Arc<Metrics>,
}

impl AccessLayer {
    /// Refusals are counted in `metrics` (`neurovisor_auth_failures_total`).
    pub fn new(token: Option<Token>, token_file: PathBuf, metrics: Arc<Metrics>) -> Self {
        Self {
            policy: Arc::new(Policy { token, token_file }),
            metrics,
        }
    }
}

/// The label of a refusal from [`check_bearer`] or the policy.
pub fn refusal_reason(message: &str) -> &'static str {
    if message.starts_with(NO_TOKEN) {
        "no_token"
    } else if message.starts_with(WRONG_TOKEN) {
        "wrong_token"
    } else {
        "not_admitted"
    }
}

const NO_TOKEN: &str = "no token";
const WRONG_TOKEN: &str = "wrong token";

/// Makes the request's span the root of its trace: continues the client's
/// trace (`traceparent`) or starts the one named by `x-trace-id`, minting a
/// UUIDv7 into that header when the client sent none, so the handler (which
/// reads the header) and the span agree on the id.
fn trace_request<B>(req: &mut http::Request<B>, span: &tracing::Span) {
    let mut meta = tonic::metadata::MetadataMap::from_headers(std::mem::take(req.headers_mut()));
    let probe = tonic::Request::from_parts(meta.clone(), tonic::Extensions::default(), ());
    let trace_id = super::trace::trace_id_of(&probe);
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(trace_id.as_str()) {
        meta.insert(super::trace::TRACE_HEADER, v);
    }
    *req.headers_mut() = meta.into_headers();
    let parent = req.headers().get("traceparent").and_then(|v| v.to_str().ok());
    crate::telemetry::continue_trace(span, parent, &trace_id);
    span.record("trace_id", trace_id.as_str());
}

impl<S> Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Access<S> {
        Access {
            inner,
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Access<S> {
    inner: S,
    policy: Arc<Policy>,
    metrics: Arc<Metrics>,
}

/// The bearer token a request sent, if any.
fn bearer<B>(req: &http::Request<B>) -> Option<&str> {
    let v = req.headers().get(http::header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

impl Policy {
    /// `Err(message)` when a request that came over TCP may not pass.
    fn check_remote<B>(&self, req: &http::Request<B>) -> Result<(), String> {
        let Some(token) = &self.token else {
            return Err("this daemon takes requests over its Unix socket only".into());
        };
        check_bearer(token, &self.token_file, req)
    }
}

/// `Err(message naming the fix)` unless `req` carries `authorization: Bearer
/// <token>` with this token (compared in constant time). Every TCP listener
/// of the daemon (gRPC, MCP) checks its requests with it.
pub fn check_bearer<B>(
    token: &Token,
    token_file: &std::path::Path,
    req: &http::Request<B>,
) -> Result<(), String> {
    let file = token_file.display();
    match bearer(req) {
        None => Err(format!(
            "{NO_TOKEN}: requests over TCP need `authorization: Bearer <token>`; the token is in {file} on the daemon's host (neurovisor run/agent send {TOKEN_ENV}, or read that file)"
        )),
        Some(sent) if token.matches(sent) => Ok(()),
        Some(_) => Err(format!(
            "{WRONG_TOKEN}: use the one in {file} on the daemon's host (set {TOKEN_ENV} to it)"
        )),
    }
}

impl<S, B> Service<http::Request<B>> for Access<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let ext = req.extensions();
        let span = if let Some(uds) = ext.get::<UdsConnectInfo>() {
            let span = tracing::info_span!(
                "grpc",
                %method,
                trace_id = tracing::field::Empty,
                peer_uid = tracing::field::Empty,
                peer_gid = tracing::field::Empty,
                peer_pid = tracing::field::Empty,
            );
            if let Some(c) = &uds.peer_cred {
                span.record("peer_uid", c.uid());
                span.record("peer_gid", c.gid());
                if let Some(pid) = c.pid() {
                    span.record("peer_pid", pid);
                }
            }
            trace_request(&mut req, &span);
            tracing::info!(parent: &span, "request over the Unix socket");
            span
        } else {
            let (peer, tls) = match (
                ext.get::<TcpConnectInfo>(),
                ext.get::<TlsConnectInfo<TcpConnectInfo>>(),
            ) {
                (Some(t), _) => (t.remote_addr(), false),
                (None, Some(t)) => (t.get_ref().remote_addr(), true),
                (None, None) => (None, false),
            };
            let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
            let span = tracing::info_span!("grpc", %method, trace_id = tracing::field::Empty, %peer, tls);
            if let Err(msg) = self.policy.check_remote(&req) {
                tracing::warn!(parent: &span, "refused: {msg}");
                self.metrics
                    .auth_failure(if tls { "tls" } else { "tcp" }, refusal_reason(&msg));
                let status = tonic::Status::unauthenticated(msg);
                return Box::pin(async move { Ok(status.into_http()) });
            }
            trace_request(&mut req, &span);
            tracing::info!(parent: &span, "request over TCP");
            span
        };
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(req).instrument(span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(auth: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder().uri("/neurovisor.v1.Sandbox/Execute");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn tcp_requests_need_the_right_bearer_token() {
        let dir = tempfile::tempdir().expect("tmp");
        let token = Token::load_or_create(dir.path()).expect("token");
        let p = Policy {
            token: Some(token.clone()),
            token_file: dir.path().join("token"),
        };
        let e = p.check_remote(&req(None)).unwrap_err();
        assert!(e.contains(TOKEN_ENV) && e.contains("token"), "{e}");
        let e = p.check_remote(&req(Some("Bearer nope"))).unwrap_err();
        assert!(e.starts_with("wrong token") && e.contains(TOKEN_ENV), "{e}");
        p.check_remote(&req(Some(&format!("Bearer {}", token.as_str()))))
            .expect("right token");
        let none = Policy {
            token: None,
            token_file: PathBuf::new(),
        };
        assert!(none.check_remote(&req(Some("Bearer x"))).is_err());
    }
}
