//! envd's `/files`: download (`GET /files?path=`) and upload (`POST
//! /files`, an `application/octet-stream` body with `?path=`, or
//! `multipart/form-data` with one `file` part per file, named by `?path=` or
//! by the part's file name). Both stream: a file is never held whole here.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use futures_util::{Stream, StreamExt};
use neurovisor_proto::v1::{ReadFileRequest, WriteFileRequest};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{check_sandbox, http_status, user_of, ApiError, E2bState};
use crate::channel::session::FILE_CHUNK;

pub fn router() -> axum::Router<E2bState> {
    axum::Router::new().route("/files", get(download).post(upload))
}

#[derive(Deserialize, Default)]
struct FileQuery {
    path: Option<String>,
    username: Option<String>,
}

/// A refusal of the sandbox plane; a sandbox that is gone is a 502, as
/// E2B's proxy answers it.
pub fn refused((code, msg): (tonic::Code, String)) -> ApiError {
    match code {
        tonic::Code::Unavailable => ApiError(StatusCode::BAD_GATEWAY, msg),
        c => ApiError(http_status(c), msg),
    }
}

/// The user: `?username=`, else basic auth, else the default.
fn user(q: &FileQuery, headers: &HeaderMap) -> Result<String, ApiError> {
    match &q.username {
        Some(u) => Ok(u.clone()),
        None => user_of(headers).map_err(refused),
    }
}

async fn download(
    State(st): State<E2bState>,
    headers: HeaderMap,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let id = check_sandbox(&st, &headers).map_err(refused)?;
    let user = user(&q, &headers)?;
    let path = q.path.ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "path: missing; name the file to download".into(),
        )
    })?;
    let chunks = st
        .table
        .read_file(ReadFileRequest {
            sandbox_id: id,
            path,
            user,
        })
        .await?;
    let body = Body::from_stream(chunks.map(|c| c.map(|c| c.data).map_err(std::io::Error::other)));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// Re-cut a byte stream into the guest's chunks (1 MiB at most, and not
/// the many small pieces HTTP delivers), after a first message naming the file.
fn write_stream<'a, S, E>(
    first: WriteFileRequest,
    body: S,
) -> impl Stream<Item = Result<WriteFileRequest, tonic::Status>> + Unpin + Send + 'a
where
    S: Stream<Item = Result<Bytes, E>> + Unpin + Send + 'a,
    E: std::fmt::Display + Send + 'a,
{
    const GATHER: usize = 256 << 10;
    struct Cut<S> {
        first: Option<WriteFileRequest>,
        body: S,
        buf: Vec<u8>,
        done: bool,
    }
    let data = |buf: Vec<u8>| WriteFileRequest {
        data: buf.into(),
        ..Default::default()
    };
    let state = Cut {
        first: Some(first),
        body,
        buf: Vec::new(),
        done: false,
    };
    Box::pin(futures_util::stream::unfold(state, move |mut st| async move {
        if let Some(f) = st.first.take() {
            return Some((Ok(f), st));
        }
        while !st.done {
            match st.body.next().await {
                Some(Ok(b)) => {
                    st.buf.extend_from_slice(&b);
                    if st.buf.len() >= GATHER {
                        let take = st.buf.len().min(FILE_CHUNK);
                        let rest = st.buf.split_off(take);
                        let chunk = std::mem::replace(&mut st.buf, rest);
                        return Some((Ok(data(chunk)), st));
                    }
                }
                Some(Err(e)) => {
                    st.done = true;
                    st.buf.clear();
                    return Some((
                        Err(tonic::Status::aborted(format!("the upload broke off: {e}"))),
                        st,
                    ));
                }
                None => st.done = true,
            }
        }
        if st.buf.is_empty() {
            return None;
        }
        let take = st.buf.len().min(FILE_CHUNK);
        let rest = st.buf.split_off(take);
        let chunk = std::mem::replace(&mut st.buf, rest);
        Some((Ok(data(chunk)), st))
    }))
}

fn written(e: &neurovisor_proto::v1::EntryInfo) -> Value {
    json!({"name": e.name, "type": "file", "path": e.path})
}

async fn upload(
    State(st): State<E2bState>,
    Query(q): Query<FileQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let id = check_sandbox(&st, &headers).map_err(refused)?;
    let user = user(&q, &headers)?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let first = |path: String| WriteFileRequest {
        sandbox_id: id.clone(),
        path,
        user: user.clone(),
        data: Default::default(),
        complete: false,
    };
    if ct.starts_with("multipart/form-data") {
        let mut form = axum::extract::Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("multipart body: {e}")))?;
        let mut out = Vec::new();
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("multipart body: {e}")))?
        {
            let path = match (&q.path, field.file_name()) {
                (Some(p), _) if out.is_empty() => p.clone(),
                (_, Some(name)) if !name.is_empty() => name.to_string(),
                _ => {
                    return Err(ApiError(
                        StatusCode::BAD_REQUEST,
                        "a file part has no path: give ?path= (one file) or the part's file name".into(),
                    ))
                }
            };
            let entry = st.table.write_file(write_stream(first(path), field)).await?;
            out.push(written(&entry));
        }
        return Ok(Json(Value::Array(out)).into_response());
    }
    if !(ct.is_empty() || ct.starts_with("application/octet-stream")) {
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type '{ct}': send application/octet-stream with ?path=, or multipart/form-data"),
        ));
    }
    if headers.get(header::CONTENT_ENCODING).is_some() {
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed uploads are not accepted; send the file uncompressed".into(),
        ));
    }
    let path = q.path.clone().ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "path: missing; an octet-stream upload names its file with ?path=".into(),
        )
    })?;
    let body = req.into_body().into_data_stream();
    let entry = st.table.write_file(write_stream(first(path), body)).await?;
    Ok(Json(json!([written(&entry)])).into_response())
}
