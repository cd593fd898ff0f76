//! The daemon's desktop viewer (`serve --desktop-listen`): the noVNC web
//! client (Debian's `novnc` files, read into memory at start-up: the
//! confined API threads open no files) and one WebSocket per viewer, piped
//! to its sandbox's VNC port through the agent (`Bridge/Dial`).
//!
//! A viewer shows its sandbox's token in the WebSocket's URL
//! (`/desktop/<id>/ws?token=`): the interactive token drives the desktop, the
//! view-only one watches (its input is dropped here, see [`super::rfb`]);
//! any other token, another sandbox's included, is refused with 403 before
//! the upgrade.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use neurovisor_proto::guest::BridgeData;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::rfb::ViewOnly;
use super::ViewMode;
use crate::channel::session::BRIDGE_CHUNK;
use crate::server::sessions::SandboxTable;

/// Where Debian's `novnc` package puts the web client.
pub const DEFAULT_NOVNC_DIR: &str = "/usr/share/novnc";
/// A viewer that takes no frame for this long is disconnected.
const SEND_STALL: Duration = Duration::from_secs(30);
/// The largest message a viewer may send (RFB client messages are small).
const MAX_VIEWER_MESSAGE: usize = 1 << 20;

/// The noVNC page for sandbox `id` with `token` (in the fragment: the page
/// reads it there, and it is not sent with the page's request).
pub fn viewer_url(base: &str, id: &str, token: &str, view_only: bool) -> String {
    format!(
        "{}/novnc/vnc_lite.html#?path=desktop%2F{id}%2Fws%3Ftoken%3D{token}&scale=true{}",
        base.trim_end_matches('/'),
        if view_only { "&view_only=1" } else { "" }
    )
}

/// The noVNC files, by path under the site's `/novnc/`.
#[derive(Debug)]
pub struct NoVnc {
    files: HashMap<String, (&'static str, Bytes)>,
}

#[derive(Debug, thiserror::Error)]
pub enum NoVncError {
    #[error("{dir}: no noVNC web client there ({source}); install Debian's novnc package (apt-get install novnc) or pass --novnc-dir")]
    Missing {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: cannot read it: {1}")]
    Read(PathBuf, #[source] std::io::Error),
}

impl NoVnc {
    /// Reads the web client under `dir` (it must have `vnc_lite.html`).
    pub fn load(dir: &Path) -> Result<Self, NoVncError> {
        std::fs::metadata(dir.join("vnc_lite.html")).map_err(|source| NoVncError::Missing {
            dir: dir.to_path_buf(),
            source,
        })?;
        let mut files = HashMap::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            let entries = std::fs::read_dir(&d).map_err(|e| NoVncError::Read(d.clone(), e))?;
            for entry in entries {
                let entry = entry.map_err(|e| NoVncError::Read(d.clone(), e))?;
                let path = entry.path();
                // Symlinks are followed (Debian links shared JavaScript in).
                let meta = std::fs::metadata(&path).map_err(|e| NoVncError::Read(path.clone(), e))?;
                if meta.is_dir() {
                    todo.push(path);
                    continue;
                }
                let Some(mime) = mime_of(&path) else { continue };
                if meta.len() > 8 << 20 {
                    continue;
                }
                let bytes = std::fs::read(&path).map_err(|e| NoVncError::Read(path.clone(), e))?;
                if let Ok(rel) = path.strip_prefix(dir) {
                    files.insert(rel.to_string_lossy().into_owned(), (mime, Bytes::from(bytes)));
                }
            }
        }
        Ok(Self { files })
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Module scripts need a JavaScript type; files of other kinds are not served.
fn mime_of(path: &Path) -> Option<&'static str> {
    Some(match path.extension()?.to_str()? {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "ttf" => "font/ttf",
        "mp3" => "audio/mpeg",
        "oga" => "audio/ogg",
        _ => return None,
    })
}

#[derive(Clone)]
struct Web {
    table: SandboxTable,
    novnc: Arc<NoVnc>,
}

/// The viewer's routes: `/novnc/*` and `/desktop/{id}/ws`.
pub fn router(table: SandboxTable, novnc: Arc<NoVnc>) -> Router {
    Router::new()
        .route("/novnc/{*path}", get(file))
        .route("/desktop/{id}/ws", get(viewer))
        .with_state(Web { table, novnc })
}

async fn file(State(w): State<Web>, UrlPath(path): UrlPath<String>) -> Response {
    match w.novnc.files.get(&path) {
        Some((mime, bytes)) => (
            [
                (header::CONTENT_TYPE, *mime),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            bytes.clone(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    #[serde(default)]
    token: String,
}

async fn viewer(
    State(w): State<Web>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<TokenQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let Ok((desktop, guest, ended)) = w.table.desktop_of(&id) else {
        return (StatusCode::NOT_FOUND, "no desktop sandbox of that id\n").into_response();
    };
    let Some(mode) = desktop.mode_of(&q.token) else {
        tracing::warn!(sandbox = %id, "a desktop viewer with a wrong token was refused");
        return (StatusCode::FORBIDDEN, "wrong token for this sandbox's desktop\n").into_response();
    };
    tracing::info!(sandbox = %id, ?mode, "a desktop viewer connected");
    let port = desktop.vnc_port;
    ws.protocols(["binary"])
        .max_message_size(MAX_VIEWER_MESSAGE)
        .on_upgrade(move |socket| async move {
            if let Err(e) = pipe(socket, guest, port, mode, ended).await {
                tracing::info!(sandbox = %id, "desktop viewer ended: {e}");
            }
        })
}

/// One viewer's WebSocket to the guest's VNC port and back, until either
/// side closes, the viewer stalls, or the sandbox ends.
async fn pipe(
    socket: WebSocket,
    guest: crate::channel::GuestSession,
    port: u16,
    mode: ViewMode,
    ended: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let (to_guest, rx) = mpsc::channel::<BridgeData>(8);
    let _ = to_guest
        .send(BridgeData {
            dial_port: u32::from(port),
            ..Default::default()
        })
        .await;
    let (mut ws_tx, mut ws_rx) = socket.split();
    let mut from_guest = match guest.dial(rx).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ws_tx.send(Message::Close(None)).await;
            return Err(format!("the guest's VNC server: {e}"));
        }
    };
    let mut filter = (mode == ViewMode::ViewOnly).then(ViewOnly::new);
    loop {
        tokio::select! {
            _ = ended.cancelled() => return Err("the sandbox ended".into()),
            m = ws_rx.next() => {
                let data = match m {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Close(_))) | None => return Ok(()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(format!("viewer: {e}")),
                };
                let data = match filter.as_mut() {
                    Some(f) => Bytes::from(f.feed(&data).map_err(|e| e.to_string())?),
                    None => data,
                };
                for chunk in data.chunks(BRIDGE_CHUNK) {
                    let d = BridgeData { data: Bytes::copy_from_slice(chunk), ..Default::default() };
                    if to_guest.send(d).await.is_err() {
                        return Err("the guest's connection closed".into());
                    }
                }
            }
            d = from_guest.next() => {
                let Some(Ok(d)) = d else { return Ok(()) };
                match tokio::time::timeout(SEND_STALL, ws_tx.send(Message::Binary(d.data))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(format!("viewer: {e}")),
                    Err(_) => return Err(format!("the viewer took nothing for {}s", SEND_STALL.as_secs())),
                }
            }
        }
    }
}
