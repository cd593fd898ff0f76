//! One UUIDv7 from the request to the guest process: `cargo run --release --example trace_id_demo`.
//!
//! Starts a real OTLP/gRPC endpoint in this process (the collector's trace
//! service from the OpenTelemetry protos), sets up NeuroVisor's telemetry as
//! `--otlp` does, and runs a program in a real microVM under a fresh UUIDv7.
//! Shows the id three ways: what the request carried, what the program read
//! from `NEUROVISOR_TRACE_ID` inside the guest, and the trace id its spans
//! were exported under (the UUID's 16 bytes) — with the span tree, down to
//! the guest's process span. Exits 1 if they disagree.

mod common;
#[path = "../tests/common/otlp.rs"]
mod otlp;

use std::time::Duration;

use neurovisor::telemetry::{start_trace, Telemetry, TelemetryConfig};
use neurovisor::{ExecRequest, Output, VmSize};
use tracing::Instrument;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::exit_status("trace_id_demo", demo().await)
}

async fn demo() -> Result<bool, String> {
    let receiver = otlp::Otlp::start().await;
    let telemetry = Telemetry::init(&TelemetryConfig {
        otlp: Some(receiver.url()),
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    let (sandbox, _state) = common::qemu_sandbox("nv-trace-demo-")?;

    let req = ExecRequest::new("python", "import os; print(os.environ['NEUROVISOR_TRACE_ID'])");
    let trace_id = req.trace_id.clone();
    let span = tracing::info_span!("demo.request", trace_id = %trace_id);
    start_trace(&span, &trace_id);
    let mut seen = Vec::new();
    let outcome = {
        let mut sink = |o: Output<'_>| {
            if let Output::Stdout(b) = o {
                seen.extend_from_slice(b);
            }
        };
        sandbox
            .run(&req, VmSize::Small, &mut sink)
            .instrument(span.clone())
            .await
            .map_err(|e| e.to_string())?
    };
    drop(span);
    telemetry.shutdown().await;
    let guest_saw = String::from_utf8_lossy(&seen).trim().to_string();
    let exported = neurovisor::telemetry::otel_trace_id(&trace_id).to_string();
    let spans = receiver
        .wait_trace(
            &exported,
            &["demo.request", "guest.process"],
            Duration::from_secs(10),
        )
        .await;
    println!("request trace id (UUIDv7):        {trace_id}");
    println!("NEUROVISOR_TRACE_ID in the guest: {guest_saw}");
    println!("OpenTelemetry trace id:           {exported}");
    println!("result trace id:                  {}", outcome.trace_id);
    println!(
        "\nspans received over OTLP for that trace:\n{}",
        otlp::tree(&spans)
    );
    let mut ok = true;
    let mut check = |held: bool, what: &str| {
        println!("  [{}] {what}", if held { "ok" } else { "FAIL" });
        ok &= held;
    };
    check(guest_saw == trace_id, "the guest process saw the request's id");
    check(outcome.trace_id == trace_id, "the result names the same id");
    check(
        exported == trace_id.replace('-', ""),
        "the exported trace id is the UUID's bytes",
    );
    let root = spans.iter().find(|s| s.name == "demo.request");
    let process = spans.iter().find(|s| s.name == "guest.process");
    check(
        matches!((root, process), (Some(r), Some(p)) if otlp::descends(&spans, p, r)),
        "the guest's process span descends from the request's span",
    );
    Ok(ok)
}
