//! Desktop sandboxes: a desktop session with a browser in the sandbox's VM,
//! watched and driven from the host.
//!
//! An image with a desktop (`neurovisor images build --image desktop`) carries
//! `desktop.json` beside its language list: the session program and the
//! guest loopback port of its VNC server. When a sandbox of such an image is
//! created, [`Desktop::start`] runs the session as the sandbox user through
//! the agent's process service and waits for its "desktop ready" line. From
//! then on everything goes through the agent's connection, never a guest
//! network: screenshots and input are programs in the guest (`scrot`,
//! `xdotool`, `chromium`) started with argument vectors (no shell), whose
//! output the host checks (a PNG of the screen's size); an operator's browser
//! watches through the daemon's noVNC page ([`web`]), whose WebSocket is
//! piped to the VNC port by `Bridge/Dial`, with the viewer's input dropped
//! in view-only mode ([`rfb`]).

pub mod rfb;
pub mod web;

use std::path::Path;
use std::time::{Duration, Instant};

use neurovisor_proto::v1::{
    desktop_action_request::Action as WireAction, process_event::Event, DesktopActionRequest,
    StartProcessRequest,
};
use serde::Deserialize;
use tokio_stream::StreamExt;

use crate::channel::{sanitize_guest_text, GuestSession, SessionError};

/// What an image says about its desktop (`desktop.json`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesktopSpec {
    /// The VNC server's port on the guest's loopback.
    pub vnc_port: u16,
    /// The session program (takes `WIDTHxHEIGHT`).
    pub session: String,
}

impl DesktopSpec {
    /// The image's desktop, if it has one (`path`: its `desktop.json`).
    pub fn read(path: &Path) -> Result<Option<Self>, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

/// The screen size of every desktop.
pub const WIDTH: u32 = 1280;
pub const HEIGHT: u32 = 800;
/// The longest a desktop may take to be ready (TCG, loaded host).
const START_DEADLINE: Duration = Duration::from_secs(180);
/// The longest one input or screenshot program may run.
const ACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest screenshot the host takes from the guest.
const MAX_PNG: usize = 32 << 20;
/// Limits on what an action may carry.
const MAX_TEXT: usize = 4096;
const MAX_KEYS: usize = 256;
const MAX_URL: usize = 4096;

/// A failed desktop call.
#[derive(Debug, thiserror::Error)]
pub enum DesktopError {
    /// The caller's input (names the field and the fix).
    #[error("{0}")]
    Invalid(String),
    #[error("the desktop did not become ready: {0}")]
    Start(String),
    #[error("{what} failed in the guest ({status}){detail}")]
    Program {
        what: &'static str,
        status: String,
        detail: String,
    },
    #[error("the guest's screenshot is not usable: {0}")]
    Screenshot(String),
    #[error(transparent)]
    Session(#[from] SessionError),
}

impl DesktopError {
    /// The gRPC code a client should see.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Invalid(_) => tonic::Code::InvalidArgument,
            Self::Session(e) => e.code(),
            _ => tonic::Code::Internal,
        }
    }
}

/// One checked action (from any transport).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Move { x: u32, y: u32 },
    Click { x: u32, y: u32, button: u8, count: u32 },
    Type(String),
    Keys(Vec<String>),
    OpenUrl(String),
    Scroll { x: u32, y: u32, amount: i32 },
}

impl Action {
    /// Checks a request against a screen of `width` × `height`.
    pub fn from_wire(r: DesktopActionRequest, width: u32, height: u32) -> Result<Self, DesktopError> {
        let point = |x: u32, y: u32| {
            if x >= width || y >= height {
                Err(DesktopError::Invalid(format!(
                    "({x}, {y}) is off the screen; give 0 <= x < {width} and 0 <= y < {height}"
                )))
            } else {
                Ok((x, y))
            }
        };
        match r.action {
            None => Err(DesktopError::Invalid(
                "no action: give move, click, type_text, key, open_url or scroll".into(),
            )),
            Some(WireAction::Move(p)) => {
                let (x, y) = point(p.x, p.y)?;
                Ok(Self::Move { x, y })
            }
            Some(WireAction::Click(c)) => {
                let (x, y) = point(c.x, c.y)?;
                let button = match c.button.as_str() {
                    "" | "left" => 1,
                    "middle" => 2,
                    "right" => 3,
                    other => {
                        return Err(DesktopError::Invalid(format!(
                            "click button '{}': use left, middle or right",
                            other.chars().take(20).collect::<String>()
                        )))
                    }
                };
                let count = match c.count {
                    0 | 1 => 1,
                    n @ 2..=3 => n,
                    n => {
                        return Err(DesktopError::Invalid(format!(
                            "click count {n}: give 1, 2 (double click) or 3"
                        )))
                    }
                };
                Ok(Self::Click { x, y, button, count })
            }
            Some(WireAction::TypeText(t)) => {
                if t.is_empty() || t.chars().count() > MAX_TEXT {
                    return Err(DesktopError::Invalid(format!(
                        "type_text: give 1 to {MAX_TEXT} characters"
                    )));
                }
                if t.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
                    return Err(DesktopError::Invalid(
                        "type_text: control characters other than newline and tab cannot be typed; use key (e.g. \"ctrl+c\")".into(),
                    ));
                }
                Ok(Self::Type(t))
            }
            Some(WireAction::Key(k)) => {
                let keys: Vec<String> = k.split_whitespace().map(str::to_string).collect();
                let ok = !keys.is_empty()
                    && k.len() <= MAX_KEYS
                    && keys.iter().all(|key| {
                        key.split('+').all(|part| {
                            !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                        })
                    });
                if !ok {
                    return Err(DesktopError::Invalid(format!(
                        "key '{}': give X key names joined by + and separated by spaces, e.g. \"ctrl+l\", \"Return\", \"alt+F4 Escape\"",
                        k.chars().take(40).collect::<String>()
                    )));
                }
                Ok(Self::Keys(keys))
            }
            Some(WireAction::OpenUrl(u)) => {
                let parsed = url::Url::parse(&u).map_err(|e| {
                    DesktopError::Invalid(format!(
                        "open_url: '{}' is not a URL ({e}); give e.g. https://example.com",
                        u.chars().take(60).collect::<String>()
                    ))
                })?;
                if !matches!(parsed.scheme(), "http" | "https" | "file") || u.len() > MAX_URL {
                    return Err(DesktopError::Invalid(format!(
                        "open_url: give an http, https or file URL of at most {MAX_URL} bytes"
                    )));
                }
                Ok(Self::OpenUrl(parsed.to_string()))
            }
            Some(WireAction::Scroll(s)) => {
                let (x, y) = point(s.x, s.y)?;
                if s.amount == 0 || s.amount.unsigned_abs() > 50 {
                    return Err(DesktopError::Invalid(
                        "scroll amount: give 1 to 50 steps down, or -1 to -50 up".into(),
                    ));
                }
                Ok(Self::Scroll {
                    x,
                    y,
                    amount: s.amount,
                })
            }
        }
    }

    /// The guest program that does it: (what, program, arguments).
    fn argv(&self) -> (&'static str, &'static str, Vec<String>) {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        match self {
            Self::Move { x, y } => (
                "move",
                "xdotool",
                s(&["mousemove", &x.to_string(), &y.to_string()]),
            ),
            Self::Click { x, y, button, count } => (
                "click",
                "xdotool",
                s(&[
                    "mousemove",
                    &x.to_string(),
                    &y.to_string(),
                    "click",
                    "--repeat",
                    &count.to_string(),
                    &button.to_string(),
                ]),
            ),
            Self::Type(text) => {
                let mut v = s(&["type", "--delay", "12", "--"]);
                v.push(text.clone());
                ("type", "xdotool", v)
            }
            Self::Keys(keys) => {
                let mut v = s(&["key", "--delay", "20", "--"]);
                v.extend(keys.iter().cloned());
                ("key", "xdotool", v)
            }
            Self::OpenUrl(url) => {
                let mut v = s(BROWSER_FLAGS);
                v.push(url.clone());
                ("open_url", "chromium", v)
            }
            Self::Scroll { x, y, amount } => (
                "scroll",
                "xdotool",
                s(&[
                    "mousemove",
                    &x.to_string(),
                    &y.to_string(),
                    "click",
                    "--repeat",
                    &amount.unsigned_abs().to_string(),
                    if *amount > 0 { "5" } else { "4" },
                ]),
            ),
        }
    }
}

/// Chromium in the VM: its own sandbox needs user namespaces the guest
/// kernel leaves out (the VM is the sandbox), no GPU, /tmp instead of the
/// small /dev/shm, no first-run dialogs in the agent's way.
const BROWSER_FLAGS: &[&str] = &[
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--password-store=basic",
    "--disable-features=Translate",
];

/// A started desktop of one sandbox.
#[derive(Debug)]
pub struct Desktop {
    pub width: u32,
    pub height: u32,
    pub vnc_port: u16,
    /// Shown by viewers that may drive it, and by those that only watch.
    control_token: String,
    view_token: String,
    /// From the session's start to its "desktop ready".
    pub ready_after: Duration,
}

/// Which token a viewer showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewMode {
    Interactive,
    ViewOnly,
}

fn env() -> std::collections::HashMap<String, String> {
    [("DISPLAY".to_string(), ":0".to_string())].into()
}

impl Desktop {
    /// Starts the session of `spec` in the sandbox's guest and waits until
    /// it says it is ready. The session outlives this call (it ends with the
    /// VM).
    pub async fn start(
        guest: &GuestSession,
        spec: &DesktopSpec,
        control_token: String,
        view_token: String,
    ) -> Result<Self, DesktopError> {
        let started = Instant::now();
        let mut events = guest
            .start_process(StartProcessRequest {
                cmd: spec.session.clone(),
                args: vec![format!("{WIDTH}x{HEIGHT}")],
                tag: "desktop".into(),
                ..Default::default()
            })
            .await?;
        let mut out = Vec::new();
        let mut err = Vec::new();
        let deadline = tokio::time::sleep(START_DEADLINE);
        tokio::pin!(deadline);
        loop {
            let ev = tokio::select! {
                ev = events.next() => ev,
                _ = &mut deadline => return Err(DesktopError::Start(format!(
                    "no \"desktop ready\" within {}s{}", START_DEADLINE.as_secs(), tail(&err)
                ))),
            };
            match ev {
                Some(Ok(e)) => match e.event {
                    Some(Event::Stdout(b)) => {
                        keep_tail(&mut out, &b);
                        if out.windows(13).any(|w| w == b"desktop ready") {
                            break;
                        }
                    }
                    Some(Event::Stderr(b)) => keep_tail(&mut err, &b),
                    Some(Event::End(end)) => {
                        return Err(DesktopError::Start(format!(
                            "the session ended ({}){}",
                            sanitize_guest_text(&end.status),
                            tail(&err)
                        )))
                    }
                    _ => {}
                },
                Some(Err(e)) => return Err(e.into()),
                None => return Err(DesktopError::Start("the session's output ended".into())),
            }
        }
        Ok(Self {
            width: WIDTH,
            height: HEIGHT,
            vnc_port: spec.vnc_port,
            control_token,
            view_token,
            ready_after: started.elapsed(),
        })
    }

    /// The token for a viewer in `mode`.
    pub fn token(&self, mode: ViewMode) -> &str {
        match mode {
            ViewMode::Interactive => &self.control_token,
            ViewMode::ViewOnly => &self.view_token,
        }
    }

    /// Which mode `token` opens, if any (constant-time compares).
    pub fn mode_of(&self, token: &str) -> Option<ViewMode> {
        use subtle::ConstantTimeEq;
        let t = token.as_bytes();
        if bool::from(t.ct_eq(self.control_token.as_bytes())) {
            Some(ViewMode::Interactive)
        } else if bool::from(t.ct_eq(self.view_token.as_bytes())) {
            Some(ViewMode::ViewOnly)
        } else {
            None
        }
    }

    /// The screen as PNG, checked: (png, width, height).
    pub async fn screenshot(&self, guest: &GuestSession) -> Result<(Vec<u8>, u32, u32), DesktopError> {
        // A private directory per shot (concurrent shots do not meet); not
        // scrot's "-": it reopens its stdout, a pipe of the agent's it may
        // not open.
        let script =
            "d=$(mktemp -d) && scrot -z \"$d/s.png\" && cat \"$d/s.png\"; r=$?; rm -rf \"$d\"; exit $r";
        let png = run(
            guest,
            "screenshot",
            "sh",
            vec!["-c".into(), script.into()],
            MAX_PNG,
        )
        .await?;
        let (w, h) = png_size(&png).map_err(DesktopError::Screenshot)?;
        if (w, h) != (self.width, self.height) {
            return Err(DesktopError::Screenshot(format!(
                "{w}x{h}, but the screen is {}x{}",
                self.width, self.height
            )));
        }
        Ok((png, w, h))
    }

    /// Does `action`; returns once the program that does it ended (a URL:
    /// once the browser was started, or the running one took it).
    pub async fn act(&self, guest: &GuestSession, action: &Action) -> Result<(), DesktopError> {
        let (what, cmd, args) = action.argv();
        if let Action::OpenUrl(_) = action {
            // The browser stays: started as a process of its own, not waited for.
            let mut events = guest
                .start_process(StartProcessRequest {
                    cmd: cmd.into(),
                    args,
                    env: env(),
                    tag: String::new(),
                    ..Default::default()
                })
                .await?;
            // `started` arrives once it runs; the stream can go.
            let _ = events.next().await;
            return Ok(());
        }
        run(guest, what, cmd, args, 64 << 10).await.map(|_| ())
    }
}

/// Runs `cmd args` in the guest with the desktop's display, to its end;
/// its stdout (at most `cap` bytes), or an error with its status and stderr.
async fn run(
    guest: &GuestSession,
    what: &'static str,
    cmd: &str,
    args: Vec<String>,
    cap: usize,
) -> Result<Vec<u8>, DesktopError> {
    let mut events = guest
        .start_process(StartProcessRequest {
            cmd: cmd.into(),
            args,
            env: env(),
            timeout_ms: ACTION_TIMEOUT.as_millis() as u32,
            ..Default::default()
        })
        .await?;
    let mut out = Vec::new();
    let mut err = Vec::new();
    while let Some(ev) = events.next().await {
        match ev?.event {
            Some(Event::Stdout(b)) => {
                if out.len() + b.len() > cap {
                    return Err(DesktopError::Program {
                        what,
                        status: format!("more than {cap} bytes of output"),
                        detail: String::new(),
                    });
                }
                out.extend_from_slice(&b);
            }
            Some(Event::Stderr(b)) => keep_tail(&mut err, &b),
            Some(Event::End(end)) => {
                return if end.exit_code == Some(0) {
                    Ok(out)
                } else {
                    Err(DesktopError::Program {
                        what,
                        status: sanitize_guest_text(&end.status),
                        detail: tail(&err),
                    })
                };
            }
            _ => {}
        }
    }
    Err(DesktopError::Program {
        what,
        status: "its output ended without an exit status".into(),
        detail: tail(&err),
    })
}

/// Keeps the last 4 KiB of a program's stream.
fn keep_tail(buf: &mut Vec<u8>, more: &[u8]) {
    buf.extend_from_slice(more);
    if buf.len() > 4096 {
        buf.drain(..buf.len() - 4096);
    }
}

/// The last lines of a program's stderr, made safe for host text.
fn tail(err: &[u8]) -> String {
    let text = String::from_utf8_lossy(err);
    let last: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .rev()
        .take(3)
        .map(sanitize_guest_text)
        .collect();
    if last.is_empty() {
        String::new()
    } else {
        format!(": {}", last.into_iter().rev().collect::<Vec<_>>().join(" | "))
    }
}

/// The size a PNG says it has (its header, checked by the decoder).
pub fn png_size(png: &[u8]) -> Result<(u32, u32), String> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let reader = decoder.read_info().map_err(|e| format!("not a PNG: {e}"))?;
    let info = reader.info();
    Ok((info.width, info.height))
}

#[cfg(test)]
mod tests {
    use super::*;
    use neurovisor_proto::v1::{Click, Point, Scroll};

    fn act(a: WireAction) -> Result<Action, DesktopError> {
        Action::from_wire(
            DesktopActionRequest {
                sandbox_id: String::new(),
                action: Some(a),
            },
            1280,
            800,
        )
    }

    fn err(a: WireAction) -> String {
        act(a).unwrap_err().to_string()
    }

    #[test]
    fn actions_are_checked_and_become_argument_vectors() {
        let click = act(WireAction::Click(Click {
            x: 10,
            y: 20,
            button: "right".into(),
            count: 2,
        }))
        .unwrap();
        assert_eq!(
            click.argv().2,
            ["mousemove", "10", "20", "click", "--repeat", "2", "3"]
        );
        // Text is one argument after "--": no option or shell reading of it.
        let typed = act(WireAction::TypeText("-rf $(x); `y`\n".into())).unwrap();
        assert_eq!(typed.argv().2.last().unwrap(), "-rf $(x); `y`\n");
        assert_eq!(
            act(WireAction::Key("ctrl+l Return".into())).unwrap().argv().2,
            ["key", "--delay", "20", "--", "ctrl+l", "Return"]
        );
        let up = act(WireAction::Scroll(Scroll {
            x: 1,
            y: 1,
            amount: -3,
        }))
        .unwrap();
        assert_eq!(up.argv().2.last().unwrap(), "4");
        let url = act(WireAction::OpenUrl("https://example.com/a b".into())).unwrap();
        assert_eq!(url.argv().2.last().unwrap(), "https://example.com/a%20b");
    }

    #[test]
    fn bad_actions_name_the_problem() {
        assert!(err(WireAction::Move(Point { x: 1280, y: 0 })).contains("off the screen"));
        assert!(err(WireAction::Click(Click {
            x: 1,
            y: 1,
            button: "thumb".into(),
            count: 1
        }))
        .contains("left, middle or right"));
        assert!(err(WireAction::TypeText(String::new())).contains("1 to 4096"));
        assert!(err(WireAction::TypeText("a\u{7}".into())).contains("control characters"));
        assert!(err(WireAction::Key("ctrl+".into())).contains("X key names"));
        assert!(err(WireAction::Key("a;b".into())).contains("X key names"));
        assert!(err(WireAction::OpenUrl("--remote-debugging-port=1".into())).contains("not a URL"));
        assert!(err(WireAction::OpenUrl("javascript:alert(1)".into())).contains("http, https or file"));
        assert!(err(WireAction::Scroll(Scroll {
            x: 1,
            y: 1,
            amount: 0
        }))
        .contains("1 to 50"));
        let none = Action::from_wire(DesktopActionRequest::default(), 10, 10).unwrap_err();
        assert!(none.to_string().contains("no action"));
    }

    #[test]
    fn tokens_open_their_mode_only() {
        let d = Desktop {
            width: 1,
            height: 1,
            vnc_port: 5900,
            control_token: "c".repeat(64),
            view_token: "v".repeat(64),
            ready_after: Duration::ZERO,
        };
        assert_eq!(d.mode_of(&"c".repeat(64)), Some(ViewMode::Interactive));
        assert_eq!(d.mode_of(&"v".repeat(64)), Some(ViewMode::ViewOnly));
        assert_eq!(d.mode_of(&"c".repeat(63)), None);
        assert_eq!(d.mode_of(""), None);
    }

    #[test]
    fn screenshots_must_be_png() {
        let mut png = Vec::new();
        {
            let mut e = png::Encoder::new(&mut png, 3, 2);
            e.set_color(png::ColorType::Rgb);
            e.set_depth(png::BitDepth::Eight);
            let mut w = e.write_header().unwrap();
            w.write_image_data(&[0u8; 18]).unwrap();
        }
        assert_eq!(png_size(&png), Ok((3, 2)));
        assert!(png_size(b"GIF89a").unwrap_err().contains("not a PNG"));
    }
}
