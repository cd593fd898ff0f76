//! The code interpreter's API (port 49999 in E2B's sandboxes): `POST
//! /execute` streams NDJSON (one JSON object per line: `stdout`, `stderr`,
//! `result`, `error`, then `number_of_executions` and `end_of_execution`),
//! and `/contexts` creates, lists, restarts and removes stateful contexts.
//! Runs go to the sandbox's code contexts ([`crate::server::session_io`]).

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Json;
use neurovisor_proto::v1::{
    code_event::Event, CodeEvent, ContextInfo, ContextSelector, CreateContextRequest, ListContextsRequest,
    RunCodeRequest,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use super::files::refused;
use super::{check_sandbox, parse_body as parse, ApiError, E2bState};

pub fn router() -> axum::Router<E2bState> {
    axum::Router::new()
        .route("/execute", post(execute))
        .route("/contexts", get(list).post(create))
        .route("/contexts/{id}", delete(remove))
        .route("/contexts/{id}/restart", post(restart))
        .route("/health", get(health))
}

async fn health(State(st): State<E2bState>, headers: HeaderMap) -> Response {
    match check_sandbox(&st, &headers) {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => refused(e).into_response(),
    }
}

/// E2B's language names for ours.
fn language(l: Option<&str>) -> Result<String, ApiError> {
    match l.unwrap_or("python") {
        "" | "python" | "python3" => Ok("python".into()),
        "js" | "javascript" | "node" => Ok("javascript".into()),
        other => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("language '{other}' has no code contexts here; use \"python\" or \"javascript\""),
        )),
    }
}

fn context_json(c: &ContextInfo) -> Value {
    json!({"id": c.id, "language": c.language, "cwd": c.cwd})
}

#[derive(Deserialize, Default)]
struct ExecuteBody {
    #[serde(default)]
    code: String,
    context_id: Option<String>,
    language: Option<String>,
    env_vars: Option<std::collections::HashMap<String, String>>,
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// One event as the code interpreter's NDJSON (`None`: nothing to send).
fn event_json(ev: &CodeEvent) -> Vec<Value> {
    match &ev.event {
        Some(Event::Stdout(t)) => vec![json!({"type": "stdout", "text": t, "timestamp": now_ns()})],
        Some(Event::Stderr(t)) => vec![json!({"type": "stderr", "text": t, "timestamp": now_ns()})],
        Some(Event::Result(r)) => {
            let mut v = json!({"type": "result", "is_main_result": r.is_main_result, "text": r.text});
            for (k, val) in [
                ("html", &r.html),
                ("markdown", &r.markdown),
                ("svg", &r.svg),
                ("png", &r.png),
                ("jpeg", &r.jpeg),
                ("latex", &r.latex),
                ("javascript", &r.javascript),
            ] {
                if !val.is_empty() {
                    v[k] = Value::String(val.clone());
                }
            }
            if let Ok(j) = serde_json::from_str::<Value>(&r.json) {
                v["json"] = j;
            }
            vec![v]
        }
        Some(Event::Error(e)) => {
            vec![json!({"type": "error", "name": e.name, "value": e.value, "traceback": e.traceback})]
        }
        Some(Event::ExecutionCount(n)) => vec![
            json!({"type": "number_of_executions", "execution_count": n}),
            json!({"type": "end_of_execution"}),
        ],
        None => Vec::new(),
    }
}

async fn execute(State(st): State<E2bState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let id = check_sandbox(&st, &headers).map_err(refused)?;
    let b: ExecuteBody = parse(&body)?;
    let context_id = b.context_id.unwrap_or_default();
    if !context_id.is_empty() && b.language.is_some() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "give a context_id or a language, not both".into(),
        ));
    }
    let language = if context_id.is_empty() {
        language(b.language.as_deref())?
    } else {
        String::new()
    };
    let events = st
        .table
        .run_code(RunCodeRequest {
            sandbox_id: id,
            context_id,
            language,
            code: b.code,
            env: b.env_vars.unwrap_or_default(),
            timeout_ms: 0,
        })
        .await?;
    // Lines go out as they come; an error after the start ends the stream
    // with an error line (the status is already sent).
    let lines = events.map(|ev| {
        let text = match ev {
            Ok(ev) => event_json(&ev)
                .into_iter()
                .map(|v| v.to_string() + "\n")
                .collect::<String>(),
            Err(s) => {
                json!({"type": "error", "name": "SandboxError", "value": s.message(), "traceback": ""})
                    .to_string()
                    + "\n"
            }
        };
        Ok::<_, std::convert::Infallible>(Bytes::from(text))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

#[derive(Deserialize, Default)]
struct CreateBody {
    language: Option<String>,
    cwd: Option<String>,
}

async fn create(State(st): State<E2bState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let id = check_sandbox(&st, &headers).map_err(refused)?;
    let b: CreateBody = parse(&body)?;
    let c = st
        .table
        .create_context(CreateContextRequest {
            sandbox_id: id,
            language: language(b.language.as_deref())?,
            cwd: b.cwd.unwrap_or_default(),
            user: String::new(),
        })
        .await?;
    Ok(Json(context_json(&c)).into_response())
}

async fn list(State(st): State<E2bState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let id = check_sandbox(&st, &headers).map_err(refused)?;
    let all = st
        .table
        .list_contexts(ListContextsRequest { sandbox_id: id })
        .await?;
    Ok(Json(all.contexts.iter().map(context_json).collect::<Vec<_>>()).into_response())
}

async fn remove(
    State(st): State<E2bState>,
    headers: HeaderMap,
    Path(ctx): Path<String>,
) -> Result<Response, ApiError> {
    let id = check_sandbox(&st, &headers).map_err(refused)?;
    st.table
        .remove_context(ContextSelector {
            sandbox_id: id,
            context_id: ctx,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn restart(
    State(st): State<E2bState>,
    headers: HeaderMap,
    Path(ctx): Path<String>,
) -> Result<Response, ApiError> {
    let id = check_sandbox(&st, &headers).map_err(refused)?;
    st.table
        .restart_context(ContextSelector {
            sandbox_id: id,
            context_id: ctx,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use neurovisor_proto::v1::CodeResult;

    #[test]
    fn events_become_the_interpreters_ndjson() {
        let r = CodeEvent {
            event: Some(Event::Result(CodeResult {
                text: "2".into(),
                html: "<b>2</b>".into(),
                json: "[1,2]".into(),
                is_main_result: true,
                ..Default::default()
            })),
        };
        let v = &event_json(&r)[0];
        assert_eq!(
            (v["type"].as_str(), v["text"].as_str(), v["html"].as_str()),
            (Some("result"), Some("2"), Some("<b>2</b>"))
        );
        assert_eq!(v["json"], json!([1, 2]));
        assert!(v.get("png").is_none());
        let end = event_json(&CodeEvent {
            event: Some(Event::ExecutionCount(3)),
        });
        assert_eq!(end[1], json!({"type": "end_of_execution"}));
        assert_eq!(language(Some("js")).ok().as_deref(), Some("javascript"));
        assert!(language(Some("r")).is_err());
    }
}
