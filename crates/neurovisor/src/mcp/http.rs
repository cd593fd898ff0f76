//! MCP over Streamable HTTP, served by the daemon (`neurovisor serve
//! --mcp-listen 127.0.0.1:8080`, endpoint `/mcp`) with its pool as executor.
//!
//! Like the daemon's gRPC TCP listener, every request needs
//! `Authorization: Bearer <token>` (`<state>/token`): any local user can
//! connect to a TCP port, and code run here costs the host. Host headers are
//! checked against loopback names and the bound address (DNS rebinding),
//! connections count against the daemon's connection limit, and request
//! bodies are capped at the gRPC request size. 2026-07-28 clients are served
//! statelessly; 2025-11-25 clients get a session (closed after 5 minutes
//! idle) so that their `notifications/cancelled` reaches the running call.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use super::NeuroVisorMcp;
use crate::server::access::check_bearer;
use crate::transport::Token;

/// The path of the MCP endpoint.
pub const MCP_PATH: &str = "/mcp";

/// The router: `/mcp` behind the token check. `stop` ends open streams at
/// shutdown.
/// Refusals are counted in `metrics` (`neurovisor_auth_failures_total{transport="mcp"}`).
pub fn router(
    server: NeuroVisorMcp,
    token: Token,
    token_file: PathBuf,
    bound: SocketAddr,
    stop: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
) -> axum::Router {
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if !bound.ip().is_unspecified() {
        hosts.push(bound.ip().to_string());
    }
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_max_request_body_bytes(crate::exec::MAX_REQUEST_BYTES)
        .with_cancellation_token(stop);
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let auth = Arc::new((token, token_file));
    axum::Router::new()
        .nest_service(MCP_PATH, service)
        .layer(axum::middleware::from_fn(move |req: Request, next: Next| {
            let auth = auth.clone();
            let metrics = metrics.clone();
            async move {
                match check_bearer(&auth.0, &auth.1, &req) {
                    Ok(()) => next.run(req).await,
                    Err(msg) => {
                        metrics.auth_failure("mcp", crate::server::access::refusal_reason(&msg));
                        unauthorized(msg)
                    }
                }
            }
        }))
}

fn unauthorized(msg: String) -> Response {
    tracing::info!("MCP request refused: {msg}");
    (
        StatusCode::UNAUTHORIZED,
        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
        msg,
    )
        .into_response()
}
