//! Desktop sandboxes on a real daemon with real VMs (the `desktop` image:
//! `neurovisor images build --image desktop`): the desktop comes up with the
//! sandbox, screenshots are PNGs of the screen, typing reaches a terminal,
//! a browser on the host watches through the daemon's noVNC page, tokens
//! are per sandbox and per mode, and nothing is left after kill.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::daemon::{start_daemon, Daemon};
use futures_util::{SinkExt, StreamExt};
use neurovisor_proto::v1::desktop_action_request::Action;
use neurovisor_proto::v1::sandboxes_client::SandboxesClient;
use neurovisor_proto::v1::{
    execute_response::Event, Click, CreateSandboxRequest, DesktopActionRequest, DesktopViewRequest,
    ExecuteRequest, Point, SandboxExecRequest, SandboxRef,
};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::Channel;

/// The desktop's background (the session's `xsetroot -solid '#2b5f8a'`).
const BACKGROUND: [u8; 3] = [0x2b, 0x5f, 0x8a];

fn desktop_daemon() -> (Daemon, String) {
    let d = start_daemon(&["--warm", "0", "--max", "3", "--desktop-listen", "127.0.0.1:0"]);
    let addr = d
        .log_text()
        .lines()
        .find_map(|l| {
            l.strip_prefix("neurovisor: serving the desktop viewer on http://")
                .map(|r| r.split(' ').next().unwrap_or_default().to_string())
        })
        .unwrap_or_else(|| {
            // The line may come just after the gRPC one.
            std::thread::sleep(Duration::from_millis(500));
            let log = d.log_text();
            log.lines()
                .find_map(|l| l.strip_prefix("neurovisor: serving the desktop viewer on http://"))
                .map(|r| r.split(' ').next().unwrap_or_default().to_string())
                .unwrap_or_else(|| panic!("no desktop viewer address in the log:\n{log}"))
        });
    (d, addr)
}

async fn sandboxes(d: &Daemon) -> SandboxesClient<Channel> {
    SandboxesClient::new(d.channel().await).max_decoding_message_size(64 << 20)
}

async fn create(c: &mut SandboxesClient<Channel>, size: &str) -> (String, Duration) {
    let t = Instant::now();
    let s = c
        .create(CreateSandboxRequest {
            image: "desktop".into(),
            size: size.into(),
            timeout_s: 600,
            ..Default::default()
        })
        .await
        .expect("a desktop sandbox")
        .into_inner();
    assert_eq!(s.desktop, "1280x800", "{s:?}");
    (s.sandbox_id, t.elapsed())
}

/// Decoded RGB pixels of a PNG: (width, height, rgb).
fn pixels(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut dec = png::Decoder::new(std::io::Cursor::new(png_bytes));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut r = dec.read_info().expect("a PNG");
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).expect("its pixels");
    let step = info.color_type.samples();
    let rgb = buf[..info.buffer_size()]
        .chunks(step)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    (info.width, info.height, rgb)
}

/// The share of pixels within a small distance of `color`.
fn share_of(rgb: &[u8], color: [u8; 3]) -> f64 {
    let n = rgb.len() / 3;
    let close = rgb
        .chunks(3)
        .filter(|p| (0..3).all(|i| p[i].abs_diff(color[i]) <= 6))
        .count();
    close as f64 / n.max(1) as f64
}

async fn screenshot(c: &mut SandboxesClient<Channel>, id: &str) -> (u32, u32, Vec<u8>) {
    let s = c
        .screenshot(SandboxRef {
            sandbox_id: id.into(),
        })
        .await
        .expect("screenshot")
        .into_inner();
    let (w, h, rgb) = pixels(&s.png);
    assert_eq!((w, h), (s.width, s.height), "the PNG is the size the answer says");
    (w, h, rgb)
}

async fn act(c: &mut SandboxesClient<Channel>, id: &str, action: Action) {
    c.desktop_action(DesktopActionRequest {
        sandbox_id: id.into(),
        action: Some(action),
    })
    .await
    .unwrap_or_else(|e| panic!("desktop action: {e}"));
}

/// Runs a bash program in the sandbox; its stdout.
async fn sh(c: &mut SandboxesClient<Channel>, id: &str, code: &str) -> String {
    let mut env = std::collections::HashMap::new();
    env.insert("DISPLAY".to_string(), ":0".to_string());
    let mut s = c
        .exec(SandboxExecRequest {
            sandbox_id: id.into(),
            request: Some(ExecuteRequest {
                language: "bash".into(),
                code: code.into(),
                env,
                timeout_ms: 30_000,
                ..Default::default()
            }),
        })
        .await
        .expect("exec")
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        if let Some(Event::Stdout(b)) = m.expect("exec stream").event {
            out.extend_from_slice(&b);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sandbox `id`'s viewer URL (`DesktopView`).
async fn view_url(
    c: &mut SandboxesClient<Channel>,
    id: &str,
    view_only: bool,
) -> Result<String, tonic::Status> {
    let r = c
        .desktop_view(DesktopViewRequest {
            sandbox_id: id.into(),
            view_only,
        })
        .await?;
    Ok(r.into_inner().url)
}

/// The token in a viewer URL's fragment.
fn token_of(url: &str) -> String {
    url.split("token%3D")
        .nth(1)
        .and_then(|t| t.split('&').next())
        .expect("a token in the URL")
        .to_string()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the viewer WebSocket of sandbox `id` with `token`: the stream, or
/// the HTTP status it was refused with.
async fn viewer(addr: &str, id: &str, token: &str) -> Result<Ws, u16> {
    let mut req = format!("ws://{addr}/desktop/{id}/ws?token={token}")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "binary".parse().expect("header"));
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("viewer connection: {e}"),
    }
}

/// Reads at least `n` bytes of server data into `buf`.
async fn read_rfb(ws: &mut Ws, buf: &mut Vec<u8>, n: usize) {
    while buf.len() < n {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => buf.extend_from_slice(&b),
            Ok(Some(Ok(_))) => {}
            other => panic!("the VNC server stopped answering: {other:?}"),
        }
    }
}

/// An RFB 3.8 viewer's handshake, up to the server's init; returns the
/// screen size it announces.
async fn rfb_handshake(ws: &mut Ws) -> (u16, u16) {
    let mut buf = Vec::new();
    read_rfb(ws, &mut buf, 12).await;
    assert_eq!(
        &buf[..12],
        b"RFB 003.008\n",
        "the guest's VNC server speaks RFB 3.8"
    );
    buf.drain(..12);
    ws.send(Message::Binary(b"RFB 003.008\n".to_vec().into()))
        .await
        .expect("send");
    read_rfb(ws, &mut buf, 1).await;
    let n = usize::from(buf[0]);
    read_rfb(ws, &mut buf, 1 + n).await;
    assert!(
        buf[1..1 + n].contains(&1),
        "security None offered: {:?}",
        &buf[..1 + n]
    );
    buf.drain(..1 + n);
    ws.send(Message::Binary(vec![1u8].into())).await.expect("send");
    read_rfb(ws, &mut buf, 4).await;
    assert_eq!(&buf[..4], &[0, 0, 0, 0], "security result OK");
    buf.drain(..4);
    ws.send(Message::Binary(vec![1u8].into())).await.expect("send");
    read_rfb(ws, &mut buf, 24).await;
    let w = u16::from_be_bytes([buf[0], buf[1]]);
    let h = u16::from_be_bytes([buf[2], buf[3]]);
    (w, h)
}

async fn pointer_at(c: &mut SandboxesClient<Channel>, id: &str) -> String {
    sh(
        c,
        id,
        "xdotool getmouselocation --shell | head -n 2 | tr '\\n' ' '",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_desktop_sandbox_is_seen_typed_into_watched_and_torn_down() {
    let (d, addr) = desktop_daemon();
    let mut c = sandboxes(&d).await;

    // A sandbox of another image has no desktop: refused before a VM is touched.
    let plain = c
        .create(CreateSandboxRequest::default())
        .await
        .expect("a plain sandbox")
        .into_inner();
    let e = c
        .screenshot(SandboxRef {
            sandbox_id: plain.sandbox_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(
        e.message().contains("no desktop") && e.message().contains("desktop"),
        "{e}"
    );
    c.kill(SandboxRef {
        sandbox_id: plain.sandbox_id,
    })
    .await
    .expect("kill");

    let (id, boot) = create(&mut c, "large").await;
    eprintln!(
        "desktop sandbox usable after {:.1}s (boot + desktop session)",
        boot.as_secs_f64()
    );

    // The screen: a PNG of the right size, not blank (the background and a
    // terminal window with text).
    let (w, h, before) = screenshot(&mut c, &id).await;
    assert_eq!((w, h), (1280, 800));
    let bg = share_of(&before, BACKGROUND);
    assert!(bg > 0.3, "the desktop background covers {bg:.2} of the screen");
    let white = share_of(&before, [0xff, 0xff, 0xff]);
    assert!(white > 0.1, "a terminal window ({white:.2} white)");

    // Bad actions are refused with what to fix.
    let e = c
        .desktop_action(DesktopActionRequest {
            sandbox_id: id.clone(),
            action: Some(Action::Move(Point { x: 5000, y: 1 })),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("off the screen"), "{e}");

    // Typing into the terminal: the command runs, and the next screenshot shows it.
    act(
        &mut c,
        &id,
        Action::Click(Click {
            x: 400,
            y: 300,
            ..Default::default()
        }),
    )
    .await;
    act(
        &mut c,
        &id,
        Action::TypeText("echo typed-$((6*7)) > /tmp/typed\n".into()),
    )
    .await;
    let mut ran = String::new();
    for _ in 0..50 {
        ran = sh(&mut c, &id, "cat /tmp/typed 2>/dev/null").await;
        if !ran.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ran.trim(), "typed-42", "the typed command ran in the terminal");
    let (_, _, after) = screenshot(&mut c, &id).await;
    let changed = before
        .chunks(3)
        .zip(after.chunks(3))
        .filter(|(a, b)| a != b)
        .count();
    assert!(changed > 500, "{changed} pixels changed after typing");

    // The viewer: wrong tokens are refused before any upgrade.
    let view = view_url(&mut c, &id, true).await.expect("view-only URL");
    let drive = view_url(&mut c, &id, false).await.expect("interactive URL");
    assert!(view.contains("view_only=1") && !drive.contains("view_only"));
    let (view_token, drive_token) = (token_of(&view), token_of(&drive));
    assert_ne!(view_token, drive_token);
    assert_eq!(viewer(&addr, &id, "wrong").await.err(), Some(403));
    assert_eq!(viewer(&addr, &id, "").await.err(), Some(403));
    assert_eq!(viewer(&addr, "0123", &drive_token).await.err(), Some(404));

    // A second desktop sandbox: each one's tokens open only its own desktop.
    let (other, _) = create(&mut c, "medium").await;
    let other_token = token_of(&view_url(&mut c, &other, false).await.expect("other URL"));
    assert_eq!(viewer(&addr, &id, &other_token).await.err(), Some(403));
    assert_eq!(viewer(&addr, &other, &drive_token).await.err(), Some(403));
    assert_eq!(viewer(&addr, &other, &view_token).await.err(), Some(403));
    c.kill(SandboxRef { sandbox_id: other }).await.expect("kill");

    // View-only: the viewer sees the screen, but its pointer never moves it.
    act(&mut c, &id, Action::Move(Point { x: 100, y: 100 })).await;
    assert_eq!(pointer_at(&mut c, &id).await, "X=100 Y=100 ");
    let mut watcher = viewer(&addr, &id, &view_token).await.expect("view-only viewer");
    assert_eq!(rfb_handshake(&mut watcher).await, (1280, 800));
    let pointer = |x: u16, y: u16| {
        let (x, y) = (x.to_be_bytes(), y.to_be_bytes());
        Message::Binary(vec![5u8, 0, x[0], x[1], y[0], y[1]].into())
    };
    watcher.send(pointer(640, 400)).await.expect("send");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        pointer_at(&mut c, &id).await,
        "X=100 Y=100 ",
        "a watcher moved the pointer"
    );
    // The same message from an interactive viewer moves it.
    let mut driver = viewer(&addr, &id, &drive_token)
        .await
        .expect("interactive viewer");
    assert_eq!(rfb_handshake(&mut driver).await, (1280, 800));
    driver.send(pointer(640, 400)).await.expect("send");
    let mut at = String::new();
    for _ in 0..50 {
        at = pointer_at(&mut c, &id).await;
        if at == "X=640 Y=400 " {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(at, "X=640 Y=400 ", "the interactive viewer's pointer");
    drop(driver);

    // Chromium on the host opens the noVNC page and shows the desktop.
    let shot = browser_screenshot(&view).await;
    let seen = share_of(&shot, BACKGROUND);
    assert!(
        seen > 0.2,
        "the browser's page shows the desktop's background on {seen:.2} of it (noVNC's own page has none)"
    );

    // A URL opens in the guest's Chromium (a file URL: the guest has no network here).
    let t = Instant::now();
    act(&mut c, &id, Action::OpenUrl("file:///etc/os-release".into())).await;
    let mut window = String::new();
    while window.trim().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no browser window after 120s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        window = sh(
            &mut c,
            &id,
            "xdotool search --onlyvisible --class chromium 2>/dev/null | head -n 1",
        )
        .await;
    }
    eprintln!("browser window after {:.1}s", t.elapsed().as_secs_f64());
    // Its title becomes the page's once the page loaded.
    let mut title = String::new();
    while !title.contains("os-release") {
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "the browser does not show the URL: {title:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        title = sh(&mut c, &id, &format!("xdotool getwindowname {}", window.trim())).await;
    }
    eprintln!("page loaded after {:.1}s", t.elapsed().as_secs_f64());

    // The VM's memory, for the report.
    if let Some(pss) = vm_pss_mib(&d) {
        eprintln!("desktop VM (large, 1024 MiB guest): QEMU PSS {pss} MiB");
    }

    // Kill: the watcher's stream ends, its URL is refused, nothing is left.
    c.kill(SandboxRef {
        sandbox_id: id.clone(),
    })
    .await
    .expect("kill");
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(Message::Binary(_) | Message::Ping(_))) = watcher.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the viewer's stream ended with the sandbox");
    assert_eq!(viewer(&addr, &id, &view_token).await.err(), Some(404));
    let until = Instant::now() + Duration::from_secs(10);
    while !d.vm_processes().is_empty() {
        assert!(
            Instant::now() < until,
            "VM processes left: {:?}",
            d.vm_processes()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(d.stop(), Some(0));
}

/// A killed desktop sandbox's daemon shuts down clean; a daemon without
/// `--desktop-listen` says how to get a viewer URL.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_viewer_listener_the_url_call_names_the_flag() {
    let d = start_daemon(&["--warm", "0", "--max", "2"]);
    let mut c = sandboxes(&d).await;
    let (id, _) = create(&mut c, "medium").await;
    let e = view_url(&mut c, &id, true).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("--desktop-listen"), "{e}");
    // The CLI prints the same one line and exits non-zero.
    let out = common::Cli::new().run(&[
        "sandbox",
        "vnc",
        &id,
        "--state-dir",
        d.dir.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(common::text(&out.stderr).contains("--desktop-listen"));
    // The daemon stops with the sandbox live: nothing is left.
    assert_eq!(d.stop(), Some(0));
}

/// The PSS of the daemon's one QEMU process, MiB.
fn vm_pss_mib(d: &Daemon) -> Option<u64> {
    let line = d.vm_processes().into_iter().next()?;
    let pid = line.split(':').next()?.trim().to_string();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kib: u64 = rollup
        .lines()
        .find(|l| l.starts_with("Pss:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// Headless Chromium on the host opens `url` and, once the page has had
/// time to connect, screenshots it (DevTools protocol); its RGB pixels.
async fn browser_screenshot(url: &str) -> Vec<u8> {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut browser = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-breakpad",
            "--disable-crash-reporter",
            "--no-first-run",
            "--window-size=1280,860",
            "--remote-debugging-port=0",
            "about:blank",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium (apt-get install chromium)");
    let stderr = browser.stderr.take().expect("stderr");
    let devtools = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stderr).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("DevTools listening on ") {
                let port = rest
                    .trim_start_matches("ws://127.0.0.1:")
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                // The rest of its stderr is drained so it never blocks.
                std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
                return Some(port);
            }
        }
        None
    })
    .await
    .expect("join")
    .expect("Chromium's DevTools port");
    let result = async {
        // DevTools answers only requests whose Host is an address, and
        // keeps the connection: the body is read by its length.
        let list = {
            use std::io::{Read, Write};
            let host = format!("127.0.0.1:{devtools}");
            let mut s = std::net::TcpStream::connect(&host).expect("DevTools HTTP");
            write!(s, "GET /json/list HTTP/1.1\r\nHost: {host}\r\n\r\n").expect("write");
            let mut got = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                let n = s.read(&mut buf).expect("read");
                assert!(n > 0, "DevTools closed: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse().ok())
                        .expect("a Content-Length");
                    if body.len() >= len {
                        break body.to_string();
                    }
                }
            }
        };
        let targets: serde_json::Value = serde_json::from_str(&list).expect("targets");
        let page = targets
            .as_array()
            .and_then(|a| a.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let (mut cdp, _) = tokio_tungstenite::connect_async(page.as_str())
            .await
            .expect("DevTools");
        let mut next_id = 0;
        let mut call = async |cdp: &mut Ws, method: &str, params: serde_json::Value| {
            next_id += 1;
            let msg = serde_json::json!({"id": next_id, "method": method, "params": params});
            cdp.send(Message::Text(msg.to_string().into()))
                .await
                .expect("send");
            loop {
                let m = cdp.next().await.expect("answer").expect("answer");
                if let Message::Text(t) = m {
                    let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                    if v["id"] == next_id {
                        return v;
                    }
                }
            }
        };
        call(&mut cdp, "Page.navigate", serde_json::json!({ "url": url })).await;
        // Until the page shows the desktop (or 30 s: the last shot is judged).
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let shot = call(
                &mut cdp,
                "Page.captureScreenshot",
                serde_json::json!({"format": "png"}),
            )
            .await;
            let data = shot["result"]["data"].as_str().expect("screenshot data");
            let png = base64::engine::general_purpose::STANDARD
                .decode(data)
                .expect("base64");
            let (_, _, rgb) = pixels(&png);
            if share_of(&rgb, BACKGROUND) > 0.2 || Instant::now() > until {
                std::fs::write(std::env::temp_dir().join("nv-desktop-browser.png"), &png).ok();
                return rgb;
            }
        }
    }
    .await;
    let _ = browser.kill();
    let _ = browser.wait();
    // Its helpers (zygote, renderers) go with it; none may be left.
    let until = Instant::now() + Duration::from_secs(10);
    let dir = profile.path().display().to_string();
    while !common::processes_mentioning(&dir).is_empty() {
        assert!(
            Instant::now() < until,
            "Chromium processes left: {:?}",
            common::processes_mentioning(&dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    result
}

/// A viewer that asks for full screens and never reads them is cut off after
/// the daemon's 30 s send limit, without holding up the API or the next
/// viewer; a daemon SIGKILLed with the desktop and a viewer live leaves no
/// process or cgroup.
#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_that_never_reads_is_cut_off_and_a_sigkilled_daemon_leaves_nothing() {
    let (d, addr) = desktop_daemon();
    let mut c = sandboxes(&d).await;
    let (id, _) = create(&mut c, "medium").await;
    let token = token_of(&view_url(&mut c, &id, false).await.expect("viewer URL"));

    // A receive buffer of a few KiB: the daemon's sends stall soon.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = socket
        .connect(addr.parse().expect("viewer address"))
        .await
        .expect("connect to the viewer listener");
    let mut req = format!("ws://{addr}/desktop/{id}/ws?token={token}")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "binary".parse().expect("header"));
    let (mut stuck, _) = tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
        .await
        .expect("viewer upgrade");
    let (w, h) = rfb_handshake(&mut stuck).await;
    // Full-screen (non-incremental) update requests, each a few MiB of raw pixels.
    let mut ask = vec![3u8, 0, 0, 0, 0, 0];
    ask.extend_from_slice(&w.to_be_bytes());
    ask.extend_from_slice(&h.to_be_bytes());
    for _ in 0..20 {
        stuck
            .send(Message::Binary(ask.clone().into()))
            .await
            .expect("send an update request");
    }

    // Meanwhile the API and a second viewer are served.
    let t = Instant::now();
    let (sw, sh_, _) = screenshot(&mut c, &id).await;
    assert_eq!((sw, sh_), (1280, 800));
    let mut other = viewer(&addr, &id, &token).await.expect("a second viewer");
    assert_eq!(rfb_handshake(&mut other).await, (1280, 800));
    eprintln!(
        "screenshot and a second viewer's handshake beside a stuck viewer: {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let until = Instant::now() + Duration::from_secs(120);
    while !d
        .log_text()
        .contains("desktop viewer ended: the viewer took nothing for 30s")
    {
        assert!(
            Instant::now() < until,
            "the stuck viewer was not cut off:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("stuck viewer cut off after {:.1}s", t.elapsed().as_secs_f64());
    // What it had been sent drains, then its stream ends.
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(_)) = stuck.next().await {}
    })
    .await;
    assert!(drained.is_ok(), "the stuck viewer's stream did not end");

    // SIGKILL with the desktop and the second viewer live: the keepers take the VM.
    let needle = d.dir.display().to_string();
    d.signal(nix::sys::signal::Signal::SIGKILL);
    drop(d);
    let until = Instant::now() + Duration::from_secs(10);
    while !common::processes_mentioning(&needle).is_empty() || !common::unowned_vm_cgroups().is_empty() {
        assert!(
            Instant::now() < until,
            "left after the daemon's SIGKILL: {:?} {:?}",
            common::processes_mentioning(&needle),
            common::unowned_vm_cgroups()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = other.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the second viewer's stream outlived the daemon");
}
