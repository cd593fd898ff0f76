//! MCP tools for desktop sandboxes (a computer-use agent's hands and eyes):
//! `desktop_create`, `desktop_screenshot` (an image result), `desktop_action`,
//! `desktop_kill`. They act on the daemon's sandboxes through
//! [`DesktopHost`]; every argument is checked where the native API checks it
//! ([`crate::desktop::Action::from_wire`]), so a model gets the same one-line
//! errors as any client.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use base64::Engine;
use neurovisor_proto::v1::desktop_action_request::Action;
use neurovisor_proto::v1::{
    Click, CreateSandboxRequest, DesktopActionRequest, DesktopScreenshot, DesktopViewInfo, Point,
    SandboxInfo, Scroll,
};
use rmcp::model::{CallToolResult, ContentBlock, Tool, ToolAnnotations};
use rmcp::schemars::{self, JsonSchema};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::agent::DaemonExecutor;
use crate::daemon_client::DaemonError;

use super::{error_result, schema, structured_result};

pub const TOOL_CREATE: &str = "desktop_create";
pub const TOOL_SCREENSHOT: &str = "desktop_screenshot";
pub const TOOL_ACTION: &str = "desktop_action";
pub const TOOL_KILL: &str = "desktop_kill";

/// A desktop's life when the call names none.
const DEFAULT_TIMEOUT_S: u32 = 600;

/// Where desktop sandboxes live: the daemon's sandbox table, in the daemon
/// or (for `neurovisor mcp` over stdio) through a client of its API.
#[tonic::async_trait]
pub trait DesktopHost: Send + Sync {
    async fn create(&self, r: CreateSandboxRequest) -> Result<SandboxInfo, Status>;
    async fn screenshot(&self, id: &str) -> Result<DesktopScreenshot, Status>;
    async fn act(&self, r: DesktopActionRequest) -> Result<(), Status>;
    /// The view-only viewer URL; `None` without a viewer listener.
    async fn view(&self, id: &str) -> Option<DesktopViewInfo>;
    /// NOT_FOUND if there was no such sandbox.
    async fn kill(&self, id: &str) -> Result<(), Status>;
}

#[tonic::async_trait]
impl DesktopHost for crate::server::sessions::SandboxTable {
    async fn create(&self, r: CreateSandboxRequest) -> Result<SandboxInfo, Status> {
        crate::server::sessions::SandboxTable::create(self, r).await
    }

    async fn screenshot(&self, id: &str) -> Result<DesktopScreenshot, Status> {
        crate::server::sessions::SandboxTable::screenshot(self, id).await
    }

    async fn act(&self, r: DesktopActionRequest) -> Result<(), Status> {
        self.desktop_action(r).await
    }

    async fn view(&self, id: &str) -> Option<DesktopViewInfo> {
        self.desktop_view(id, true).ok()
    }

    async fn kill(&self, id: &str) -> Result<(), Status> {
        if self.kill_for_client(id).await {
            return Ok(());
        }
        Err(crate::server::sessions::missing(id))
    }
}

/// The status a daemon's refusal came back as, so the tools word it the same
/// whichever side of the API they run on.
fn daemon_status(e: DaemonError) -> Status {
    match e {
        DaemonError::Invalid(m) => Status::invalid_argument(m),
        DaemonError::NotFound(m) => Status::not_found(m),
        DaemonError::BadAddress(m) | DaemonError::Other(m) => Status::unavailable(m),
    }
}

/// `neurovisor mcp` over stdio with a daemon: the daemon's sandboxes, through
/// its API.
#[tonic::async_trait]
impl DesktopHost for DaemonExecutor {
    async fn create(&self, r: CreateSandboxRequest) -> Result<SandboxInfo, Status> {
        let mut c = self.daemon().await.map_err(daemon_status)?;
        c.sandbox_create(r).await.map_err(daemon_status)
    }

    async fn screenshot(&self, id: &str) -> Result<DesktopScreenshot, Status> {
        let mut c = self.daemon().await.map_err(daemon_status)?;
        let (png, width, height) = c.sandbox_screenshot(id).await.map_err(daemon_status)?;
        Ok(DesktopScreenshot {
            png: png.into(),
            width,
            height,
        })
    }

    async fn act(&self, r: DesktopActionRequest) -> Result<(), Status> {
        let mut c = self.daemon().await.map_err(daemon_status)?;
        c.sandbox_desktop_action(r).await.map_err(daemon_status)
    }

    async fn view(&self, id: &str) -> Option<DesktopViewInfo> {
        let mut c = self.daemon().await.ok()?;
        c.sandbox_desktop_view(id, true).await.ok()
    }

    async fn kill(&self, id: &str) -> Result<(), Status> {
        let mut c = self.daemon().await.map_err(daemon_status)?;
        c.sandbox_kill(id).await.map_err(daemon_status)
    }
}

/// The desktops one MCP client made, destroyed when it goes away
/// ([`Self::kill_all`]) rather than left running until their timeout; a
/// client SIGKILLed with the server still leaves them to that timeout.
pub struct SessionDesktops {
    host: Arc<dyn DesktopHost>,
    created: Mutex<BTreeSet<String>>,
}

impl SessionDesktops {
    pub fn new(host: Arc<dyn DesktopHost>) -> Self {
        Self {
            host,
            created: Mutex::new(BTreeSet::new()),
        }
    }

    fn created(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        // A panic while holding it leaves a valid set.
        self.created.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Destroys the desktops still alive; returns how many there were.
    pub async fn kill_all(&self) -> usize {
        let ids = std::mem::take(&mut *self.created());
        let mut n = 0;
        for id in ids {
            match self.host.kill(&id).await {
                Ok(()) => n += 1,
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => {
                    tracing::warn!(sandbox = %id, "cannot destroy this client's desktop: {}", s.message())
                }
            }
        }
        n
    }
}

#[tonic::async_trait]
impl DesktopHost for SessionDesktops {
    async fn create(&self, r: CreateSandboxRequest) -> Result<SandboxInfo, Status> {
        let info = self.host.create(r).await?;
        self.created().insert(info.sandbox_id.clone());
        Ok(info)
    }

    async fn screenshot(&self, id: &str) -> Result<DesktopScreenshot, Status> {
        self.host.screenshot(id).await
    }

    async fn act(&self, r: DesktopActionRequest) -> Result<(), Status> {
        self.host.act(r).await
    }

    async fn view(&self, id: &str) -> Option<DesktopViewInfo> {
        self.host.view(id).await
    }

    async fn kill(&self, id: &str) -> Result<(), Status> {
        self.created().remove(id);
        self.host.kill(id).await
    }
}

/// `desktop_create`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateArgs {
    /// Seconds until the desktop is destroyed (default 600).
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: Option<u32>,
}

/// `desktop_create`'s structured result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CreateResult {
    /// Pass it to the other desktop tools.
    pub sandbox_id: String,
    pub width: u32,
    pub height: u32,
    /// Where a person can watch the desktop in a browser (view-only), when the daemon serves a viewer.
    pub view_url: Option<String>,
}

/// The sandbox a desktop tool acts on.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxArgs {
    /// From desktop_create.
    pub sandbox_id: String,
}

/// What `desktop_action` does.
#[derive(Debug, Deserialize, JsonSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Move the pointer to (x, y).
    Move,
    /// Click at (x, y) with `button` (left, middle, right), `count` times (2: double click).
    Click,
    /// Type `text` into the focused window.
    Type,
    /// Press `keys`: X key names joined by + and separated by spaces ("ctrl+l", "Return").
    Key,
    /// Scroll at (x, y) by `amount` wheel steps (positive: down).
    Scroll,
    /// Open `url` (http, https or file) in the browser.
    OpenUrl,
}

/// `desktop_action`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionArgs {
    pub sandbox_id: String,
    pub action: ActionKind,
    /// Screen pixels from the left (move, click, scroll).
    pub x: Option<u32>,
    /// Screen pixels from the top (move, click, scroll).
    pub y: Option<u32>,
    pub button: Option<String>,
    pub count: Option<u32>,
    pub text: Option<String>,
    pub keys: Option<String>,
    pub amount: Option<i32>,
    pub url: Option<String>,
}

impl ActionArgs {
    /// The wire request, or which argument is missing.
    fn request(self) -> Result<DesktopActionRequest, String> {
        let need = |v: Option<u32>, name: &str| {
            v.ok_or_else(|| format!("desktop_action {:?}: give {name}", self.action))
        };
        let action = match self.action {
            ActionKind::Move => Action::Move(Point {
                x: need(self.x, "x")?,
                y: need(self.y, "y")?,
            }),
            ActionKind::Click => Action::Click(Click {
                x: need(self.x, "x")?,
                y: need(self.y, "y")?,
                button: self.button.clone().unwrap_or_default(),
                count: self.count.unwrap_or(1),
            }),
            ActionKind::Scroll => Action::Scroll(Scroll {
                x: need(self.x, "x")?,
                y: need(self.y, "y")?,
                amount: self.amount.ok_or("desktop_action scroll: give amount")?,
            }),
            ActionKind::Type => Action::TypeText(self.text.clone().ok_or("desktop_action type: give text")?),
            ActionKind::Key => Action::Key(self.keys.clone().ok_or("desktop_action key: give keys")?),
            ActionKind::OpenUrl => {
                Action::OpenUrl(self.url.clone().ok_or("desktop_action open_url: give url")?)
            }
        };
        Ok(DesktopActionRequest {
            sandbox_id: self.sandbox_id,
            action: Some(action),
        })
    }
}

/// The desktop tools' definitions.
pub fn tools() -> Vec<Tool> {
    let annotations = |title: &str, read_only: bool| {
        ToolAnnotations::with_title(title)
            .read_only(read_only)
            .destructive(false)
            .idempotent(read_only)
            .open_world(false)
    };
    vec![
        Tool::new(
            TOOL_CREATE,
            "Create a desktop sandbox: a microVM with a desktop (1280x800), a terminal and Chromium, that lives \
             across calls until desktop_kill or its timeout. Returns its sandbox_id. Takes about 10 s.",
            schema::<CreateArgs>(),
        )
        .with_title("Create a desktop")
        .with_raw_output_schema(schema::<CreateResult>())
        .with_annotations(annotations("Create a desktop", false)),
        Tool::new(
            TOOL_SCREENSHOT,
            "The desktop's screen now, as a PNG image.",
            schema::<SandboxArgs>(),
        )
        .with_title("Screenshot the desktop")
        .with_annotations(annotations("Screenshot the desktop", true)),
        Tool::new(
            TOOL_ACTION,
            "Act on the desktop: move, click (x, y, button, count), type (text), key (keys, e.g. \"ctrl+l\", \
             \"Return\"), scroll (x, y, amount) or open_url (url). Coordinates are screen pixels, as in \
             desktop_screenshot. Returns once done; take a screenshot to see the effect.",
            schema::<ActionArgs>(),
        )
        .with_title("Use the desktop")
        .with_annotations(annotations("Use the desktop", false)),
        Tool::new(TOOL_KILL, "Destroy a desktop sandbox.", schema::<SandboxArgs>())
            .with_title("Destroy a desktop")
            .with_annotations(
                ToolAnnotations::with_title("Destroy a desktop")
                    .read_only(false)
                    .destructive(true)
                    .idempotent(true)
                    .open_world(false),
            ),
    ]
}

fn args<T: for<'de> Deserialize<'de>>(tool: &str, v: serde_json::Value) -> Result<T, CallToolResult> {
    serde_json::from_value(v).map_err(|e| error_result(format!("invalid arguments for {tool}: {e}")))
}

fn status(tool: &str, s: Status) -> CallToolResult {
    error_result(format!("{tool}: {}", s.message()))
}

/// Runs desktop tool `name`; `None` if it is not one.
pub async fn call(host: &dyn DesktopHost, name: &str, v: serde_json::Value) -> Option<CallToolResult> {
    let result = match name {
        TOOL_CREATE => match args::<CreateArgs>(name, v) {
            Err(r) => r,
            Ok(a) => match host
                .create(CreateSandboxRequest {
                    image: "desktop".into(),
                    size: "large".into(),
                    timeout_s: a.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_S),
                    ..Default::default()
                })
                .await
            {
                Err(s) => status(name, s),
                Ok(info) => {
                    let (width, height) = info
                        .desktop
                        .split_once('x')
                        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
                        .unwrap_or((0, 0));
                    let r = CreateResult {
                        view_url: host.view(&info.sandbox_id).await.map(|v| v.url),
                        sandbox_id: info.sandbox_id,
                        width,
                        height,
                    };
                    structured_result(format!("desktop {} ready ({width}x{height})", r.sandbox_id), &r)
                }
            },
        },
        TOOL_SCREENSHOT => match args::<SandboxArgs>(name, v) {
            Err(r) => r,
            Ok(a) => match host.screenshot(&a.sandbox_id).await {
                Err(s) => status(name, s),
                Ok(shot) => CallToolResult::success(vec![
                    ContentBlock::image(
                        base64::engine::general_purpose::STANDARD.encode(&shot.png),
                        "image/png",
                    ),
                    ContentBlock::text(format!("{}x{} screenshot", shot.width, shot.height)),
                ]),
            },
        },
        TOOL_ACTION => match args::<ActionArgs>(name, v).and_then(|a| a.request().map_err(error_result)) {
            Err(r) => r,
            Ok(req) => match host.act(req).await {
                Err(s) => status(name, s),
                Ok(()) => CallToolResult::success(vec![ContentBlock::text("done")]),
            },
        },
        TOOL_KILL => match args::<SandboxArgs>(name, v) {
            Err(r) => r,
            Ok(a) => match host.kill(&a.sandbox_id).await {
                Err(s) => status(name, s),
                Ok(()) => CallToolResult::success(vec![ContentBlock::text("destroyed")]),
            },
        },
        _ => return None,
    };
    Some(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(v: serde_json::Value) -> Result<DesktopActionRequest, String> {
        serde_json::from_value::<ActionArgs>(v)
            .map_err(|e| e.to_string())?
            .request()
    }

    #[test]
    fn actions_need_their_arguments() {
        let r = action(serde_json::json!({"sandbox_id": "s", "action": "click", "x": 1, "y": 2})).unwrap();
        assert_eq!(
            r.action,
            Some(Action::Click(Click {
                x: 1,
                y: 2,
                button: String::new(),
                count: 1
            }))
        );
        let e = action(serde_json::json!({"sandbox_id": "s", "action": "move", "x": 1})).unwrap_err();
        assert!(e.contains("give y"), "{e}");
        let e = action(serde_json::json!({"sandbox_id": "s", "action": "type"})).unwrap_err();
        assert!(e.contains("give text"), "{e}");
        let e = action(serde_json::json!({"sandbox_id": "s", "action": "drag"})).unwrap_err();
        assert!(e.contains("unknown variant"), "{e}");
    }

    #[test]
    fn every_tool_has_an_object_schema() {
        for t in tools() {
            assert_eq!(
                t.input_schema.get("type"),
                Some(&serde_json::json!("object")),
                "{}",
                t.name
            );
        }
    }
}
