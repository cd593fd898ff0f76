//! E2B's control plane: create, get, list, kill, timeout, connect, pause.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Json;
use neurovisor_proto::v1::{CreateSandboxRequest, SandboxInfo};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{check_api_key, parse_body as parse, rfc3339, ApiError, E2bState, ENVD_VERSION, TEMPLATES};

pub fn router() -> axum::Router<E2bState> {
    axum::Router::new()
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/v2/sandboxes/{id}", delete(kill))
        .route("/sandboxes/{id}/timeout", post(timeout))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/health", get(|| async { StatusCode::OK }))
        .fallback(|req: axum::extract::Request| async move {
            ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "{} {} is not part of the E2B API this daemon serves",
                    req.method(),
                    req.uri().path()
                ),
            )
        })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<i64>,
    #[serde(default)]
    metadata: Option<HashMap<String, String>>,
    #[serde(default)]
    env_vars: Option<HashMap<String, String>>,
    allow_internet_access: Option<bool>,
    /// `lifecycle.on_timeout` "pause".
    auto_pause: Option<bool>,
    /// `false`: E2B's `mode: "filesystem"`.
    auto_pause_memory: Option<bool>,
    auto_resume: Option<AutoResume>,
}

#[derive(Deserialize, Default)]
struct AutoResume {
    #[serde(default)]
    enabled: bool,
}

/// Seconds as the table takes them (0 = its default).
fn timeout_s(t: Option<i64>) -> Result<u32, ApiError> {
    match t {
        None => Ok(0),
        Some(t) if t <= 0 => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("timeout: {t} s; give a positive number of seconds"),
        )),
        Some(t) => u32::try_from(t)
            .map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("timeout: {t} s is too long"))),
    }
}

/// What E2B's API answers for a sandbox (create, connect, get and list use
/// subsets of it).
fn sandbox_json(st: &E2bState, s: &SandboxInfo, token: Option<String>) -> Value {
    let (cpus, mem, disk) = st.size;
    let mut v = json!({
        "templateID": if s.image == st.image { "base" } else { s.image.as_str() },
        "sandboxID": s.sandbox_id,
        "clientID": "neurovisor",
        "envdVersion": ENVD_VERSION,
        "startedAt": rfc3339(s.started_at_ms),
        "endAt": rfc3339(s.end_at_ms),
        "cpuCount": cpus.max(s.vcpus),
        "memoryMB": mem.max(s.memory_mib),
        "diskSizeMB": disk,
        "state": if s.paused { "paused" } else { "running" },
        "metadata": s.metadata,
        "alias": s.image,
        "lifecycle": {"onTimeout": s.on_timeout, "autoResume": s.auto_resume},
    });
    if let Some(t) = token {
        // One secret per sandbox: envd calls send it as the access token,
        // the code interpreter SDK as the traffic token.
        v["envdAccessToken"] = Value::String(t.clone());
        v["trafficAccessToken"] = Value::String(t);
    }
    v
}

async fn create(
    State(st): State<E2bState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&st, &headers)?;
    let r: NewSandbox = parse(&body)?;
    // E2B's own template names are the daemon's image; any other names a
    // built image. A tag is a size: `base:large`, `full:small`.
    let (template, size) = match r.template_id.as_deref().map(|t| t.split_once(':')) {
        None => (None, ""),
        Some(None) => (r.template_id.as_deref(), ""),
        Some(Some((t, size))) => {
            if !["small", "medium", "large"].contains(&size) {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("template '{t}:{size}': the tag is a size here; use small, medium or large"),
                ));
            }
            (Some(t), size)
        }
    };
    // Then a daemon profile (image, size, env, egress), then a built image.
    let (image, profile) = match template {
        None => (String::new(), String::new()),
        Some(t) if TEMPLATES.contains(&t) || t == st.image => (String::new(), String::new()),
        Some(t) if st.table.has_profile(t) => (String::new(), t.to_string()),
        Some(t) => {
            let built = !t.contains(['/', '.']) && crate::images::image_dir(t).join("rootfs.ext4").is_file();
            if !built {
                return Err(ApiError(
                    StatusCode::NOT_FOUND,
                    format!(
                        "template '{t}' not found; this daemon serves the image '{}' as 'base' (omit the template), a profile by its name (`neurovisor profile list`), or a built image by its name (`neurovisor images build --image NAME`)",
                        st.image
                    ),
                ));
            }
            (t.to_string(), String::new())
        }
    };
    if r.allow_internet_access == Some(true) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "allowInternetAccess: unrestricted internet access is not offered; leave it unset or false (egress by allowlist: `neurovisor sandbox create --network --allow-host NAME`, or a template naming a profile, with a daemon started with --network)".into(),
        ));
    }
    if r.auto_pause == Some(true) && r.auto_pause_memory == Some(false) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "lifecycle on_timeout mode \"filesystem\" is not supported: a sandbox's files live in its memory here; omit mode (a full snapshot)".into(),
        ));
    }
    let info = st
        .table
        .create(CreateSandboxRequest {
            timeout_s: timeout_s(r.timeout)?,
            metadata: r.metadata.unwrap_or_default(),
            env: r.env_vars.unwrap_or_default(),
            image,
            size: size.to_string(),
            on_timeout: if r.auto_pause == Some(true) {
                "pause"
            } else {
                "kill"
            }
            .into(),
            auto_resume: r.auto_resume.is_some_and(|a| a.enabled),
            llm_bridge: false,
            profile,
            ..Default::default()
        })
        .await?;
    let token = st.table.access_token(&info.sandbox_id);
    Ok((StatusCode::CREATED, Json(sandbox_json(&st, &info, token))).into_response())
}

async fn detail(
    State(st): State<E2bState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_api_key(&st, &headers)?;
    let info = st.table.info_of(&id).map_err(not_found(&id))?;
    let token = st.table.access_token(&id);
    Ok(Json(sandbox_json(&st, &info, token)).into_response())
}

fn not_found(id: &str) -> impl FnOnce(tonic::Status) -> ApiError + '_ {
    move |s| match s.code() {
        tonic::Code::NotFound => ApiError(StatusCode::NOT_FOUND, format!("sandbox {id} not found")),
        _ => s.into(),
    }
}

#[derive(Deserialize, Default)]
struct ListQuery {
    /// `state=running&state=paused` or `state=running,paused`.
    state: Option<String>,
    /// URL-encoded `k=v&k2=v2`.
    metadata: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "nextToken")]
    next_token: Option<String>,
}

async fn list(
    State(st): State<E2bState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    check_api_key(&st, &headers)?;
    let wants = |state: &str| {
        q.state
            .as_deref()
            .is_none_or(|s| s.split(',').any(|s| s.trim() == state))
    };
    let (wants_running, wants_paused) = (wants("running"), wants("paused"));
    let filter: Vec<(String, String)> = q
        .metadata
        .as_deref()
        .map(|m| {
            form_urlencoded::parse(m.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let all: Vec<SandboxInfo> = st
        .table
        .infos()
        .into_iter()
        .filter(|s| if s.paused { wants_paused } else { wants_running })
        .filter(|s| filter.iter().all(|(k, v)| s.metadata.get(k) == Some(v)))
        .collect();
    // Pages are runs of the list in start order; the token is the last id.
    let start = match q.next_token.as_deref() {
        Some(t) => all
            .iter()
            .position(|s| s.sandbox_id == t)
            .map_or(all.len(), |i| i + 1),
        None => 0,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let page: Vec<&SandboxInfo> = all.iter().skip(start).take(limit).collect();
    let body: Vec<Value> = page.iter().map(|s| sandbox_json(&st, s, None)).collect();
    let mut resp = Json(body).into_response();
    if start + page.len() < all.len() {
        if let Some(last) = page.last() {
            if let Ok(v) = last.sandbox_id.parse() {
                resp.headers_mut().insert("x-next-token", v);
            }
        }
    }
    Ok(resp)
}

async fn kill(
    State(st): State<E2bState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_api_key(&st, &headers)?;
    if st.table.kill_for_client(&id).await {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError(StatusCode::NOT_FOUND, format!("sandbox {id} not found")))
    }
}

#[derive(Deserialize, Default)]
struct TimeoutBody {
    timeout: Option<i64>,
}

async fn timeout(
    State(st): State<E2bState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&st, &headers)?;
    let t: TimeoutBody = parse(&body)?;
    let Some(secs) = t.timeout else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "timeout: missing; give the seconds from now".into(),
        ));
    };
    st.table
        .set_timeout(&id, timeout_s(Some(secs))?)
        .map_err(not_found(&id))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Connecting to a running sandbox sets its timeout (when given) and
/// answers like get (200); a paused one is resumed first (201).
async fn connect(
    State(st): State<E2bState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&st, &headers)?;
    let t: TimeoutBody = parse(&body)?;
    let secs = t.timeout.map(|s| timeout_s(Some(s))).transpose()?;
    let (code, info) = if st.table.is_paused(&id).map_err(not_found(&id))? {
        let info = st
            .table
            .resume(&id, secs.unwrap_or(0))
            .await
            .map_err(not_found(&id))?;
        (StatusCode::CREATED, info)
    } else {
        let info = match secs {
            Some(secs) => st.table.set_timeout(&id, secs),
            None => st.table.info_of(&id),
        }
        .map_err(not_found(&id))?;
        (StatusCode::OK, info)
    };
    let token = st.table.access_token(&id);
    Ok((code, Json(sandbox_json(&st, &info, token))).into_response())
}

/// A full memory snapshot (E2B's default and `memory: true`); 409 if it is
/// already paused. A filesystem-only pause (`memory: false`) is refused: the
/// guest's files live in its memory here.
async fn pause(
    State(st): State<E2bState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&st, &headers)?;
    #[derive(Deserialize, Default)]
    struct PauseBody {
        memory: Option<bool>,
    }
    let b: PauseBody = parse(&body)?;
    if b.memory == Some(false) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "memory: false (a filesystem-only pause) is not supported: a sandbox's files live in its memory here; pause with the default full snapshot".into(),
        ));
    }
    if st.table.is_paused(&id).map_err(not_found(&id))? {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already paused"),
        ));
    }
    st.table.pause(&id).await.map_err(not_found(&id))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The older resume call: 201 with the sandbox; 409 if it is not paused.
async fn resume(
    State(st): State<E2bState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_api_key(&st, &headers)?;
    let t: TimeoutBody = parse(&body)?;
    let secs = t.timeout.map(|s| timeout_s(Some(s))).transpose()?;
    if !st.table.is_paused(&id).map_err(not_found(&id))? {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("sandbox {id} is running, not paused"),
        ));
    }
    let info = st
        .table
        .resume(&id, secs.unwrap_or(0))
        .await
        .map_err(not_found(&id))?;
    let token = st.table.access_token(&id);
    Ok((StatusCode::CREATED, Json(sandbox_json(&st, &info, token))).into_response())
}
