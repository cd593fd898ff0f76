//! The inference bridge: a program in a VM reaches the host's LLM server at
//! `http://127.0.0.1:11434` inside the guest, with no network device.
//!
//! The guest agent listens on that loopback port ([`GuestSession::bridge_listen`])
//! and hands each connection to the host over its own connection
//! ([`GuestSession::bridge_pipe`]). Here each connection is served as HTTP/1.1
//! (hyper, over an in-memory pipe): every request is checked against the VM's
//! request bucket (429 when empty), its path is sent to the configured server
//! (never a host the guest names: absolute-form targets and `Host` are
//! ignored), with the VM's trace id (`x-trace-id`, and W3C `traceparent`
//! derived from it) and the host's API key when one is configured; bodies both
//! ways pass the VM's byte bucket (they wait, they are not cut). The buckets
//! are the ones the vsock limits use ([`RateLimiter`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use neurovisor_proto::guest::BridgeData;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::channel::session::BRIDGE_CHUNK;
use crate::channel::{GuestSession, SessionError};
use crate::metrics::{Label, ReasonLabel};
use crate::security::rate_limit::{RateLimitConfig, RateLimiter, TokenBucketConfig, TokenKind};

/// Where programs in the VM find the LLM server (Ollama's usual port).
pub const GUEST_PORT: u16 = 11434;
/// Requests per second a VM may send by default (burst: twice that).
pub const DEFAULT_REQUESTS_PER_SEC: u64 = 5;
/// Bytes per second both ways, by default.
pub const DEFAULT_BYTES_PER_SEC: u64 = 4 << 20;
/// The largest request body a program may send (prompts, not uploads).
const MAX_REQUEST_BODY: usize = 16 << 20;
/// Connections of one VM served at once.
const MAX_CONNECTIONS: usize = 32;

/// A bridge that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("--llm-bridge-url {url}: {why}; give the server's http:// or https:// address, e.g. http://127.0.0.1:11434")]
    Url { url: String, why: String },
    #[error("could not make the bridge's HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// What the bridge forwards to and how much a VM may send.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// The LLM server's base URL (Ollama's, or an OpenAI-compatible one);
    /// a program's request path is appended to its origin.
    pub upstream: String,
    /// Sent as `Authorization: Bearer` in place of whatever the program sent.
    pub api_key: Option<String>,
    /// 0 = no limit.
    pub requests_per_sec: u64,
    /// 0 = no limit.
    pub bytes_per_sec: u64,
}

/// One bridge configuration, shared by every VM of a daemon or run; each VM
/// gets its own buckets ([`LlmBridge::start`]).
pub struct LlmBridge {
    cfg: BridgeConfig,
    origin: reqwest::Url,
    client: reqwest::Client,
    /// `neurovisor_llm_bridge_requests_total{reason}`.
    requests: Family<ReasonLabel, Counter>,
}

impl std::fmt::Debug for LlmBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmBridge")
            .field("upstream", &self.origin.as_str())
            .finish_non_exhaustive()
    }
}

/// Serves one VM's bridge until dropped (then the guest stops listening and
/// its connections close).
pub struct BridgeTask(tokio::task::JoinHandle<()>);

impl Drop for BridgeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn full(status: StatusCode, msg: String) -> Response<Body> {
    let body = serde_json::json!({ "error": msg }).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Headers a program's request keeps on its way to the server.
const PASSED_HEADERS: &[&str] = &[
    "content-type",
    "accept",
    "accept-encoding",
    "user-agent",
    "openai-organization",
];

impl LlmBridge {
    /// `requests`: the counter family requests are counted in (the daemon's
    /// registry, or a detached one).
    pub fn new(cfg: BridgeConfig, requests: Family<ReasonLabel, Counter>) -> Result<Self, BridgeError> {
        let bad = |why: &str| BridgeError::Url {
            url: cfg.upstream.clone(),
            why: why.to_string(),
        };
        let url = reqwest::Url::parse(&cfg.upstream).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(bad("not an http(s) URL with a host"));
        }
        let mut origin = url.clone();
        origin.set_path("/");
        origin.set_query(None);
        origin.set_fragment(None);
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // The server's redirects are not followed into other hosts.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(BridgeError::Client)?;
        Ok(Self {
            cfg,
            origin,
            client,
            requests,
        })
    }

    pub fn config(&self) -> &BridgeConfig {
        &self.cfg
    }

    /// The server's URL for a program's request target: only its path and
    /// query are taken (never parsed as a URL of its own, which could name
    /// another host).
    fn target(&self, uri: &hyper::Uri) -> reqwest::Url {
        let mut u = self.origin.clone();
        u.set_path(uri.path());
        u.set_query(uri.query());
        u
    }

    fn count(&self, reason: &'static str) {
        self.requests
            .get_or_create(&ReasonLabel {
                reason: Label::fixed(reason),
            })
            .inc();
    }

    /// Has the guest of `session` listen on [`GUEST_PORT`] and serves its
    /// connections on the current runtime, with buckets of their own, until
    /// the returned task is dropped. Returns once the guest listens.
    pub async fn start(
        self: &Arc<Self>,
        session: GuestSession,
        trace_id: String,
    ) -> Result<BridgeTask, SessionError> {
        let mut accepted = session.bridge_listen(GUEST_PORT).await?;
        let limiter = Arc::new(RateLimiter::new(
            RateLimitConfig {
                bandwidth: TokenBucketConfig::per_second(self.cfg.bytes_per_sec, Duration::from_secs(1)),
                ops: TokenBucketConfig::per_second(self.cfg.requests_per_sec, Duration::from_secs(2)),
            },
            &Default::default(),
        ));
        let bridge = self.clone();
        let task = tokio::spawn(async move {
            // Aborted with this task: every connection goes with the bridge.
            let mut conns = tokio::task::JoinSet::new();
            while let Some(Ok(a)) = accepted.next().await {
                while conns.try_join_next().is_some() {}
                if conns.len() >= MAX_CONNECTIONS {
                    // Not picked up: the guest closes it with the others.
                    continue;
                }
                let (bridge, session, limiter, trace_id) =
                    (bridge.clone(), session.clone(), limiter.clone(), trace_id.clone());
                conns.spawn(async move {
                    if let Err(e) = bridge.connection(&session, a.conn_id, limiter, trace_id).await {
                        tracing::debug!("inference bridge connection: {e}");
                    }
                });
            }
        });
        Ok(BridgeTask(task))
    }

    /// Serves one program connection as HTTP/1.1 until either side closes.
    async fn connection(
        self: Arc<Self>,
        session: &GuestSession,
        conn_id: u64,
        limiter: Arc<RateLimiter>,
        trace_id: String,
    ) -> Result<(), SessionError> {
        let (to_guest, rx) = mpsc::channel::<BridgeData>(4);
        let _ = to_guest
            .send(BridgeData {
                conn_id,
                ..Default::default()
            })
            .await;
        let mut from_guest = session.bridge_pipe(rx).await?;
        let (ours, theirs) = tokio::io::duplex(2 * BRIDGE_CHUNK);
        let (mut their_rd, mut their_wr) = tokio::io::split(theirs);
        let inbound = async move {
            while let Some(Ok(d)) = from_guest.next().await {
                if their_wr.write_all(&d.data).await.is_err() {
                    break;
                }
            }
            let _ = their_wr.shutdown().await;
        };
        let outbound = async move {
            let mut buf = vec![0u8; BRIDGE_CHUNK];
            loop {
                match their_rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let d = BridgeData {
                            conn_id,
                            data: Bytes::copy_from_slice(&buf[..n]),
                            ..Default::default()
                        };
                        if to_guest.send(d).await.is_err() {
                            break;
                        }
                    }
                }
            }
        };
        let service = hyper::service::service_fn(move |req| {
            let (bridge, limiter, trace_id) = (self.clone(), limiter.clone(), trace_id.clone());
            async move { Ok::<_, Infallible>(bridge.forward(req, &limiter, &trace_id).await) }
        });
        let http = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(hyper_util::rt::TokioIo::new(ours), service);
        tokio::join!(inbound, outbound, async {
            let _ = http.await;
        });
        Ok(())
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        limiter: &Arc<RateLimiter>,
        trace_id: &str,
    ) -> Response<Body> {
        if !limiter.admit_connection() {
            self.count("rate_limited");
            let mut r = full(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "this VM may send {} requests per second through the inference bridge; wait and retry",
                    self.cfg.requests_per_sec
                ),
            );
            r.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from_static("1"),
            );
            return r;
        }
        let url = self.target(req.uri());
        let mut out = self.client.request(req.method().clone(), url);
        for (k, v) in req.headers() {
            if PASSED_HEADERS.contains(&k.as_str()) {
                out = out.header(k, v);
            }
        }
        if let Some(key) = &self.cfg.api_key {
            out = out.bearer_auth(key);
        } else if let Some(a) = req.headers().get(hyper::header::AUTHORIZATION) {
            out = out.header(hyper::header::AUTHORIZATION, a);
        }
        out = out.header(crate::server::trace::TRACE_HEADER, trace_id);
        if let Some(tp) = traceparent(trace_id) {
            out = out.header("traceparent", tp);
        }
        let body =
            throttled(req.into_body().into_data_stream(), limiter.clone()).scan(0usize, |seen, chunk| {
                let r = chunk.map_err(std::io::Error::other).and_then(|c| {
                    *seen += c.len();
                    if *seen > MAX_REQUEST_BODY {
                        Err(std::io::Error::other("request body over 16 MiB"))
                    } else {
                        Ok(c)
                    }
                });
                std::future::ready(Some(r))
            });
        let answer = match out.body(reqwest::Body::wrap_stream(body)).send().await {
            Ok(a) => a,
            Err(e) => {
                self.count("upstream_error");
                return full(
                    StatusCode::BAD_GATEWAY,
                    format!("the inference bridge could not reach the LLM server: {e}"),
                );
            }
        };
        self.count("forwarded");
        let status = answer.status();
        let mut r = Response::builder().status(status.as_u16());
        for (k, v) in answer.headers() {
            if matches!(k.as_str(), "content-type" | "content-encoding" | "retry-after") {
                r = r.header(k.as_str(), v.as_bytes());
            }
        }
        let stream = throttled(answer.bytes_stream(), limiter.clone())
            .map_ok(Frame::data)
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
        r.body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap_or_else(|e| full(StatusCode::BAD_GATEWAY, format!("the server's answer: {e}")))
    }
}

/// `chunks` paced by the VM's byte bucket (each waits for its tokens).
fn throttled<E>(
    chunks: impl futures_util::Stream<Item = Result<Bytes, E>>,
    limiter: Arc<RateLimiter>,
) -> impl futures_util::Stream<Item = Result<Bytes, E>> {
    chunks.then(move |chunk| {
        let limiter = limiter.clone();
        async move {
            if let Ok(c) = &chunk {
                limiter.acquire(TokenKind::Bytes, c.len() as u64).await;
            }
            chunk
        }
    })
}

/// A W3C `traceparent` for a UUID trace id (its 32 hex digits are the trace
/// id; the span id is fresh). `None` for ids that are not UUIDs.
fn traceparent(trace_id: &str) -> Option<String> {
    let u = uuid::Uuid::parse_str(trace_id).ok()?;
    let span = uuid::Uuid::new_v4().simple().to_string();
    Some(format!("00-{}-{}-01", u.simple(), &span[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_cut_to_their_origin() {
        let cfg = |u: &str| BridgeConfig {
            upstream: u.into(),
            api_key: None,
            requests_per_sec: 0,
            bytes_per_sec: 0,
        };
        let b = LlmBridge::new(cfg("http://127.0.0.1:11434/api?x=1"), Family::default()).unwrap();
        assert_eq!(b.origin.as_str(), "http://127.0.0.1:11434/");
        let t = |target: &str| b.target(&target.parse().unwrap()).to_string();
        assert_eq!(
            t("/v1/chat/completions?stream=true"),
            "http://127.0.0.1:11434/v1/chat/completions?stream=true"
        );
        // Targets that would name another host stay paths on the server.
        assert_eq!(t("http://evil.example/x"), "http://127.0.0.1:11434/x");
        assert_eq!(
            t("/http://evil.example/x"),
            "http://127.0.0.1:11434/http://evil.example/x"
        );
        assert_eq!(t("//evil.example/x"), "http://127.0.0.1:11434//evil.example/x");
        for bad in ["ftp://x", "localhost:11434", "http://"] {
            let e = LlmBridge::new(cfg(bad), Family::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("--llm-bridge-url") && e.contains("http://"), "{e}");
        }
    }

    #[test]
    fn traceparent_carries_the_uuid() {
        let id = "01939a6e-8f4c-7a1b-9c2d-3e4f5a6b7c8d";
        let tp = traceparent(id).unwrap();
        assert!(tp.starts_with("00-01939a6e8f4c7a1b9c2d3e4f5a6b7c8d-"), "{tp}");
        assert_eq!(tp.len(), 55);
        assert!(traceparent("my-trace").is_none());
    }
}
