//! An E2B-compatible HTTP API (`neurovisor serve --e2b-listen 127.0.0.1:3000`),
//! so the official E2B SDKs drive the daemon's sandboxes unmodified.
//!
//! One listener serves both of E2B's planes; a request naming a sandbox in
//! the `E2b-Sandbox-Id` header goes to the sandbox plane, every other one to
//! the control plane. Clients set `E2B_API_URL` and `E2B_SANDBOX_URL` to this
//! address and `E2B_API_KEY` to the daemon's token (`<state>/token`).
//!
//! - control plane ([`control`]): `POST /v2/sandboxes` (201), `GET
//!   /sandboxes/{id}`, `GET /v2/sandboxes`, `DELETE /sandboxes/{id}`, `POST
//!   /sandboxes/{id}/timeout`, `POST /v2/sandboxes/{id}/connect`, `POST
//!   /sandboxes/{id}/pause` (refused: no pause yet); `X-API-KEY` must be the
//!   daemon's token.
//! - sandbox plane (envd, port 49983): the Connect protocol's JSON codec for
//!   `process.Process` and `filesystem.Filesystem` ([`envd`]), `/files`
//!   download and upload (octet-stream and multipart, streamed; [`files`]),
//!   `/health`; `X-Access-Token` must be the sandbox's own token, so no
//!   sandbox is reachable with another's.
//!
//! Every request becomes the same validated request the gRPC API takes
//! ([`crate::server::sessions::SandboxTable`]); nothing here talks to a VM
//! directly.

pub mod control;
pub mod envd;
pub mod files;
pub mod interpreter;
pub mod watchers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tonic::Code;

use crate::server::sessions::SandboxTable;
use crate::transport::Token;

/// The envd version this API claims: the SDK turns on what each version
/// adds (0.3.0 stdin, 0.4.0 the default user, 0.5.2 closing stdin, 0.5.7
/// octet-stream uploads) and nothing past it (0.6.2 file metadata headers).
pub const ENVD_VERSION: &str = "0.5.7";
/// envd's port in E2B's sandboxes (the SDK sends it in `E2b-Sandbox-Port`).
pub const ENVD_PORT: u16 = 49983;
/// The code interpreter's port.
pub const CODE_INTERPRETER_PORT: u16 = 49999;
const CODE_INTERPRETER_PORT_STR: &str = "49999";
/// Templates a create request may name: E2B's default and ours.
pub const TEMPLATES: &[&str] = &["base", "default", "code-interpreter-v1", "code-interpreter"];

/// What every handler shares.
#[derive(Clone)]
pub struct E2bState {
    pub table: SandboxTable,
    pub token: Token,
    pub token_file: PathBuf,
    /// (vCPUs, MiB, disk MiB) of every sandbox.
    pub size: (u32, u32, u32),
    pub image: String,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub watchers: watchers::Watchers,
    /// Host names a request may carry (DNS rebinding).
    hosts: Arc<Vec<String>>,
}

impl E2bState {
    pub fn new(
        table: SandboxTable,
        token: Token,
        token_file: PathBuf,
        size: crate::config::VmSize,
        image: String,
        metrics: Arc<crate::metrics::Metrics>,
        bound: SocketAddr,
    ) -> Self {
        let mut hosts = vec!["localhost".to_string(), "127.0.0.1".into(), "[::1]".into()];
        if !bound.ip().is_unspecified() {
            hosts.push(match bound {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            });
        }
        Self {
            table,
            token,
            token_file,
            size: (size.vcpus(), size.memory_mib(), size.scratch_mib()),
            image,
            metrics,
            watchers: Default::default(),
            hosts: Arc::new(hosts),
        }
    }
}

/// An error of the control plane or of `/files`: `{"code": n, "message"}`.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"code": self.0.as_u16(), "message": self.1});
        (self.0, axum::Json(body)).into_response()
    }
}

/// A JSON body (empty: the type's default); one that is not the JSON a
/// handler expects is a 400 naming the problem.
pub fn parse_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// The HTTP status of a gRPC code (as Connect maps them).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        Self(http_status(s.code()), s.message().to_string())
    }
}

/// The router: the Host check, then the plane the request belongs to.
pub fn router(state: E2bState) -> axum::Router {
    let control = control::router().with_state(state.clone());
    let envd = envd::router().merge(files::router()).with_state(state.clone());
    let interpreter = interpreter::router().with_state(state.clone());
    axum::Router::new()
        .fallback_service(tower::service_fn(move |req: Request| {
            let (control, envd, interpreter) = (control.clone(), envd.clone(), interpreter.clone());
            async move {
                use tower::ServiceExt;
                let port = req
                    .headers()
                    .get("e2b-sandbox-port")
                    .and_then(|v| v.to_str().ok());
                if !req.headers().contains_key("e2b-sandbox-id") {
                    control.oneshot(req).await
                } else if port == Some(CODE_INTERPRETER_PORT_STR) {
                    interpreter.oneshot(req).await
                } else {
                    envd.oneshot(req).await
                }
            }
        }))
        .layer(axum::middleware::from_fn_with_state(state, check_host))
        .layer(axum::extract::DefaultBodyLimit::disable())
}

async fn check_host(State(st): State<E2bState>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    // The name without the port ("[::1]:3000" keeps its brackets).
    let name = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    if !st.hosts.iter().any(|h| h == name) {
        return ApiError(
            StatusCode::FORBIDDEN,
            format!("Host '{host}' is not this server's; use a loopback address or the listening address"),
        )
        .into_response();
    }
    next.run(req).await
}

/// The control plane's check: `X-API-KEY` is the daemon's token.
pub fn check_api_key(st: &E2bState, headers: &HeaderMap) -> Result<(), ApiError> {
    let sent = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    match sent {
        Some(k) if st.token.matches(k) => Ok(()),
        Some(_) => {
            st.metrics.auth_failure("e2b", "wrong_token");
            Err(ApiError(
                StatusCode::UNAUTHORIZED,
                format!(
                    "invalid API key: set E2B_API_KEY to the daemon's token ({})",
                    st.token_file.display()
                ),
            ))
        }
        None => {
            st.metrics.auth_failure("e2b", "no_token");
            Err(ApiError(
                StatusCode::UNAUTHORIZED,
                format!(
                    "missing X-API-KEY: set E2B_API_KEY to the daemon's token ({})",
                    st.token_file.display()
                ),
            ))
        }
    }
}

/// The sandbox plane's check: the sandbox exists, the port is envd's, and
/// `X-Access-Token` is this sandbox's. Returns the sandbox id.
pub fn check_sandbox(st: &E2bState, headers: &HeaderMap) -> Result<String, (Code, String)> {
    let id = headers
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let port = headers
        .get("e2b-sandbox-port")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("49983");
    let Some(expected) = st.table.access_token(&id) else {
        // The SDK tells "gone" from "unreachable" by these words.
        return Err((
            Code::Unavailable,
            format!("sandbox {id} was not found (killed, timed out, or never created)"),
        ));
    };
    // envd calls carry the access token; the code interpreter SDK sends it
    // on /execute only and the traffic token (the same secret here) on all.
    let sent = ["x-access-token", "e2b-traffic-access-token"]
        .iter()
        .filter_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .collect::<Vec<_>>();
    let ok = sent
        .iter()
        .any(|s| bool::from(subtle::ConstantTimeEq::ct_eq(s.as_bytes(), expected.as_bytes())));
    if !ok {
        st.metrics.auth_failure(
            "e2b",
            if sent.is_empty() {
                "no_token"
            } else {
                "wrong_token"
            },
        );
        return Err((
            Code::Unauthenticated,
            format!("X-Access-Token is missing or not sandbox {id}'s (use the envdAccessToken its create returned)"),
        ));
    }
    if port != ENVD_PORT.to_string() && port != CODE_INTERPRETER_PORT.to_string() {
        return Err((
            Code::Unavailable,
            format!("the port is not open: {port} in sandbox {id} (only envd's {ENVD_PORT} and the code interpreter's {CODE_INTERPRETER_PORT} are served)"),
        ));
    }
    Ok(id)
}

/// The sandbox user a request acts as: envd takes it from HTTP basic auth
/// (`Authorization: Basic base64("user:")`); none means the default user.
pub fn user_of(headers: &HeaderMap) -> Result<String, (Code, String)> {
    use base64::Engine;
    let Some(v) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(String::new());
    };
    let decoded = v
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            (
                Code::InvalidArgument,
                "Authorization: expected Basic with the user name (\"user\" or \"root\")".to_string(),
            )
        })?;
    Ok(decoded.split(':').next().unwrap_or_default().to_string())
}

/// Unix milliseconds as RFC 3339.
pub fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_comes_from_basic_auth() {
        let mut h = HeaderMap::new();
        assert_eq!(user_of(&h).unwrap(), "");
        h.insert("authorization", "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(user_of(&h).unwrap(), "root");
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert_eq!(user_of(&h).unwrap_err().0, Code::InvalidArgument);
    }

    #[test]
    fn codes_map_to_http_statuses() {
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::AlreadyExists), StatusCode::CONFLICT);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }
}
