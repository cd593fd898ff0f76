//! Test-only misbehaviour (cargo feature `misbehave`, binary
//! `neurovisor-agent-misbehave`; never in a real image): with
//! `NV_MISBEHAVE=<mode>` in the request's env the agent breaks the protocol
//! the way a compromised guest could, so the host's defences can be tested
//! against a real VM (`crates/neurovisor/tests/hostile_guest.rs`).
//!
//! | mode | what the agent does |
//! |---|---|
//! | `flood` | ignores the output cap: streams 50 × the cap on stdout, then exits 0 |
//! | `signal` | reports signal 4096 |
//! | `exit-code` | reports exit code -7 |
//! | `both` | reports exit code 0 and signal 9 |
//! | `control` | rejects the request with ANSI escapes and a forged log line |
//! | `after-exit` | sends stdout chunks after the exit status |
//! | `huge-frame` | sends one 20 MiB stdout chunk |
//! | `console` | writes up to 50 MiB to `/dev/console` (at most 15 s), then reports how much on stdout |

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use neurovisor_proto::guest::{execute_event::Event, ExecuteEvent, ExecuteRequest, ExitStatus};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::exec::{EventTx, DEFAULT_MAX_OUTPUT};

pub const ENV: &str = "NV_MISBEHAVE";

/// The forged text of `control` mode.
pub const FORGED: &str =
    "\x1b[2J\x1b[31mrejected\x1b[0m\x07\r\n2026-01-01T00:00:00Z ERROR forged log line\x1b]0;title\x07\u{9b}";

pub fn requested(req: &ExecuteRequest) -> Option<String> {
    req.env.get(ENV).cloned()
}

fn stdout(b: impl Into<Bytes>) -> Result<ExecuteEvent, Status> {
    Ok(ExecuteEvent {
        event: Some(Event::Stdout(b.into())),
    })
}

fn exit(status: ExitStatus) -> Result<ExecuteEvent, Status> {
    Ok(ExecuteEvent {
        event: Some(Event::Exit(status)),
    })
}

fn exited(code: i32) -> ExitStatus {
    ExitStatus {
        exit_code: Some(code),
        ..Default::default()
    }
}

pub fn execute(
    mode: &str,
    req: ExecuteRequest,
) -> Result<ReceiverStream<Result<ExecuteEvent, Status>>, Status> {
    tracing::warn!(mode, "misbehaving on request ({ENV})");
    let cap = req
        .limits
        .map(|l| l.max_output_bytes)
        .filter(|&c| c > 0)
        .unwrap_or(DEFAULT_MAX_OUTPUT);
    if mode == "control" {
        return Err(Status::invalid_argument(FORGED));
    }
    let (tx, rx) = mpsc::channel(64);
    let mode = mode.to_string();
    tokio::spawn(async move {
        let _ = misbehave(&mode, cap, &tx).await;
    });
    Ok(ReceiverStream::new(rx))
}

async fn misbehave(
    mode: &str,
    cap: u64,
    tx: &EventTx,
) -> Result<(), mpsc::error::SendError<Result<ExecuteEvent, Status>>> {
    match mode {
        "flood" => {
            let chunk = Bytes::from(vec![b'F'; 32 << 10]);
            let total = cap.saturating_mul(50);
            let mut sent = 0u64;
            while sent < total {
                tx.send(stdout(chunk.clone())).await?;
                sent += chunk.len() as u64;
            }
            tx.send(exit(ExitStatus {
                stdout_bytes: sent,
                ..exited(0)
            }))
            .await?;
        }
        "signal" => {
            tx.send(exit(ExitStatus {
                signal: Some(4096),
                ..Default::default()
            }))
            .await?;
        }
        "exit-code" => tx.send(exit(exited(-7))).await?,
        "both" => {
            tx.send(exit(ExitStatus {
                signal: Some(9),
                ..exited(0)
            }))
            .await?;
        }
        "after-exit" => {
            tx.send(stdout(&b"before exit\n"[..])).await?;
            tx.send(exit(ExitStatus {
                stdout_bytes: 12,
                ..exited(0)
            }))
            .await?;
            for _ in 0..100 {
                tx.send(stdout(&b"AFTER-EXIT\n"[..])).await?;
            }
        }
        "huge-frame" => {
            tx.send(stdout(vec![b'H'; 20 << 20])).await?;
            tx.send(exit(exited(0))).await?;
        }
        "console" => {
            let written = tokio::task::spawn_blocking(flood_console).await.unwrap_or(0);
            let text = format!("console bytes written: {written}\n");
            tx.send(stdout(text.clone().into_bytes())).await?;
            tx.send(exit(ExitStatus {
                stdout_bytes: text.len() as u64,
                ..exited(0)
            }))
            .await?;
        }
        other => {
            tx.send(Err(Status::invalid_argument(format!(
                "unknown {ENV} mode '{other}'"
            ))))
            .await?;
        }
    }
    Ok(())
}

/// Writes to the console until 50 MiB or 15 s; returns the bytes written.
fn flood_console() -> u64 {
    let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/console") else {
        return 0;
    };
    let line = [b'C'; 1023];
    let mut block = Vec::with_capacity(64 << 10);
    while block.len() + 1024 <= 64 << 10 {
        block.extend_from_slice(&line);
        block.push(b'\n');
    }
    let started = Instant::now();
    let mut written = 0u64;
    while written < 50 << 20 && started.elapsed() < Duration::from_secs(15) {
        match f.write(&block) {
            Ok(n) => written += n as u64,
            Err(_) => break,
        }
    }
    written
}
