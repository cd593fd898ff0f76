//! Logs and traces of one NeuroVisor process.
//!
//! Logs go to stderr as text or JSON lines (`--log-format json`: one object
//! per line with the span fields, so the `trace_id` of the request is on every
//! line logged inside it). With `--otlp URL` the tracing spans also become
//! OpenTelemetry spans exported over OTLP/gRPC, and the logs OTLP log records
//! carrying their span's trace context. Without it no OpenTelemetry layer is
//! installed at all, so nothing is exported and nothing slows down.
//!
//! Trace ids: a request's trace is the UUIDv7 users see (`x-trace-id`,
//! `NEUROVISOR_TRACE_ID`, the agent's `trace_id:` line). A UUID is 16 bytes,
//! as an OpenTelemetry trace id is, so [`start_trace`] makes a root span's
//! trace id exactly those bytes (a caller-chosen id that is no UUID is mapped
//! through a name-based UUID and kept as the `neurovisor.trace_id`
//! attribute). Across processes (`run`/`agent` → daemon) the W3C
//! `traceparent` header carries the context ([`inject`], [`continue_trace`]).

use std::cell::Cell;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceId, Tracer, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The OpenTelemetry service name of every span and log record.
pub const SERVICE: &str = "neurovisor";
/// The attribute holding the user-visible trace id on a trace's root span.
pub const TRACE_ID_ATTR: &str = "neurovisor.trace_id";
/// How long [`Telemetry::shutdown`] waits for the last spans to leave.
const FLUSH_DEADLINE: Duration = Duration::from_secs(5);

/// How log lines on stderr look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, message, fields, spans).
    Json,
}

/// What [`Telemetry::init`] sets up.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// 0 warn, 1 info, 2+ debug (`NEUROVISOR_LOG` overrides).
    pub verbose: u8,
    pub format: LogFormat,
    /// OTLP/gRPC endpoint (`http://host:4317`, `https://...`), or none.
    pub otlp: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--otlp {url}: {why} (give an OTLP/gRPC endpoint such as http://localhost:4317)")]
    Endpoint { url: String, why: String },
    #[error("--otlp {url}: cannot set up the exporter")]
    Exporter {
        url: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("cannot install the log subscriber")]
    Subscriber(#[source] tracing_subscriber::util::TryInitError),
}

/// The installed exporters; flush them with [`Telemetry::shutdown`] before
/// the process ends (one-shot commands would otherwise lose their spans).
#[derive(Default)]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
    logs: Option<opentelemetry_sdk::logs::SdkLoggerProvider>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("exporting", &self.exporting())
            .finish()
    }
}

/// Checks an OTLP endpoint before anything is set up, so a typo is one clear
/// line instead of silently lost traces.
pub fn check_endpoint(url: &str) -> Result<(), TelemetryError> {
    let bad = |why: &str| TelemetryError::Endpoint {
        url: url.to_string(),
        why: why.to_string(),
    };
    let uri = reqwest::Url::parse(url).map_err(|_| bad("not a URL"))?;
    if !matches!(uri.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if uri.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    Ok(())
}

impl Telemetry {
    /// Installs the process's log subscriber, and with an OTLP endpoint the
    /// exporters. Exporting needs a tokio runtime: call it inside one (the
    /// batch processors are tasks on it, not threads of their own).
    pub fn init(cfg: &TelemetryConfig) -> Result<Self, TelemetryError> {
        let default = match cfg.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        };
        let filter = || {
            std::env::var("NEUROVISOR_LOG")
                .ok()
                .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
                .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default))
        };
        use std::io::IsTerminal;
        let fmt = match cfg.format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colours only for a person; log files and journald get plain text.
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(filter())
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .with_writer(std::io::stderr)
                .with_filter(filter())
                .boxed(),
        };
        let mut me = Telemetry::default();
        let mut layers = vec![fmt];
        if let Some(url) = &cfg.otlp {
            check_endpoint(url)?;
            let exporter_err = |source| TelemetryError::Exporter {
                url: url.clone(),
                source,
            };
            use opentelemetry_otlp::WithExportConfig;
            let resource = Resource::builder()
                .with_service_name(SERVICE)
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build();
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(url.clone())
                .with_timeout(Duration::from_secs(5))
                .build()
                .map_err(exporter_err)?;
            let processor =
                opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                    spans,
                    opentelemetry_sdk::runtime::Tokio,
                )
                .build();
            let traces = SdkTracerProvider::builder()
                .with_span_processor(processor)
                .with_id_generator(RequestIds)
                .with_resource(resource.clone())
                .build();
            let tracer = traces.tracer(SERVICE);
            // Spans at info and above (the request, pool, boot, execution
            // and LLM spans); debug spans stay out of the traces.
            layers.push(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(tracing_subscriber::EnvFilter::new("info"))
                    .boxed(),
            );
            opentelemetry::global::set_tracer_provider(traces.clone());
            let logs_exporter = opentelemetry_otlp::LogExporter::builder()
                .with_tonic()
                .with_endpoint(url.clone())
                .with_timeout(Duration::from_secs(5))
                .build()
                .map_err(exporter_err)?;
            let log_processor =
                opentelemetry_sdk::logs::log_processor_with_async_runtime::BatchLogProcessor::builder(
                    logs_exporter,
                    opentelemetry_sdk::runtime::Tokio,
                )
                .build();
            let logs = opentelemetry_sdk::logs::SdkLoggerProvider::builder()
                .with_log_processor(log_processor)
                .with_resource(resource)
                .build();
            layers.push(
                opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(&logs)
                    // The exporter's own crates log through tracing too; their
                    // records must not feed the exporter (a loop).
                    .with_filter(tracing_subscriber::EnvFilter::new(
                        "info,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off,tonic=off,h2=off,hyper=off,tower=off",
                    ))
                    .boxed(),
            );
            me.traces = Some(traces);
            me.logs = Some(logs);
        }
        tracing_subscriber::registry()
            .with(layers)
            .try_init()
            .map_err(TelemetryError::Subscriber)?;
        Ok(me)
    }

    /// Whether spans are exported (`--otlp`).
    pub fn exporting(&self) -> bool {
        self.traces.is_some()
    }

    /// Exports what is still buffered and stops the exporters (waits at most
    /// a few seconds for an endpoint that does not answer).
    pub async fn shutdown(self) {
        let Telemetry { traces, logs } = self;
        if traces.is_none() && logs.is_none() {
            return;
        }
        let flush = tokio::task::spawn_blocking(move || {
            if let Some(t) = traces {
                if let Err(e) = t.shutdown_with_timeout(FLUSH_DEADLINE) {
                    tracing::warn!("OTLP traces: {e}");
                }
            }
            if let Some(l) = logs {
                if let Err(e) = l.shutdown_with_timeout(FLUSH_DEADLINE) {
                    tracing::warn!("OTLP logs: {e}");
                }
            }
        });
        let _ = tokio::time::timeout(FLUSH_DEADLINE * 2, flush).await;
    }
}

thread_local! {
    /// The trace id the next root span built on this thread gets ([`start_trace`]).
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Span ids at random; trace ids of root spans from [`start_trace`] when set.
#[derive(Debug)]
struct RequestIds;

impl IdGenerator for RequestIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID
            .with(Cell::take)
            .unwrap_or_else(|| RandomIdGenerator::default().new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        RandomIdGenerator::default().new_span_id()
    }
}

/// The OpenTelemetry trace id of a NeuroVisor trace id: a UUID's own 16
/// bytes, else a name-based UUID of the text (a client may choose any id).
pub fn otel_trace_id(trace_id: &str) -> TraceId {
    let uuid = uuid::Uuid::parse_str(trace_id)
        .unwrap_or_else(|_| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, trace_id.as_bytes()));
    TraceId::from_bytes(*uuid.as_bytes())
}

/// Makes `span` (not yet entered, without a parent) the root span of trace
/// `trace_id`. Does nothing when no spans are exported.
pub fn start_trace(span: &tracing::Span, trace_id: &str) {
    if span.is_disabled() {
        return;
    }
    NEXT_TRACE_ID.with(|c| c.set(Some(otel_trace_id(trace_id))));
    // Builds the OpenTelemetry span now, on this thread, so it takes the id.
    let built = span.context();
    NEXT_TRACE_ID.with(|c| c.set(None));
    if built.span().span_context().is_valid() {
        span.set_attribute(TRACE_ID_ATTR, trace_id.to_string());
    }
}

/// Makes `span` a child of the remote span in a W3C `traceparent` value (a
/// client process's span), if it is well formed and of trace `trace_id`;
/// otherwise the root of `trace_id` ([`start_trace`]).
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>, trace_id: &str) {
    if span.is_disabled() {
        return;
    }
    if let Some(tp) = traceparent {
        struct One<'a>(&'a str);
        impl Extractor for One<'_> {
            fn get(&self, key: &str) -> Option<&str> {
                (key == "traceparent").then_some(self.0)
            }
            fn keys(&self) -> Vec<&str> {
                vec!["traceparent"]
            }
        }
        let cx = TraceContextPropagator::new().extract(&One(tp));
        let remote = cx.span().span_context().clone();
        if remote.is_valid() && remote.trace_id() == otel_trace_id(trace_id) && span.set_parent(cx).is_ok() {
            span.set_attribute(TRACE_ID_ATTR, trace_id.to_string());
            return;
        }
    }
    start_trace(span, trace_id);
}

/// The W3C `traceparent` of `span`, to send to another process; `None` when
/// no spans are exported.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    struct One(Option<String>);
    impl Injector for One {
        fn set(&mut self, key: &str, value: String) {
            if key == "traceparent" {
                self.0 = Some(value);
            }
        }
    }
    let mut out = One(None);
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.0
}

/// The trace id `span` is exported under, as 32 hex digits (exemplars, tests).
pub fn exported_trace_id(span: &tracing::Span) -> Option<String> {
    let sc: SpanContext = span.context().span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// What the guest agent reported about one execution's timing, measured in
/// the guest: from the request's arrival to the program's start, and the
/// program's run time.
#[derive(Debug, Clone, Copy)]
pub struct GuestTimings {
    pub start_delay: Duration,
    pub run: Duration,
}

/// Records the guest's side of an execution as child spans of `parent`
/// (`guest.execute`: the agent's handling; `guest.process`: the program),
/// placed in the host's window `[sent, received]` of the call. The guest's
/// numbers are untrusted: they are clamped to that window, so a lying guest
/// can only misplace its spans inside the call it answered.
pub fn record_guest_spans(
    parent: &tracing::Span,
    sent: SystemTime,
    received: SystemTime,
    guest: GuestTimings,
    attrs: Vec<KeyValue>,
) {
    let cx = parent.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    let window = received.duration_since(sent).unwrap_or_default();
    let start_delay = guest.start_delay.min(window);
    let run = guest.run.min(window - start_delay);
    let process_start = sent + start_delay;
    let tracer = opentelemetry::global::tracer(SERVICE);
    let outer = tracer
        .span_builder("guest.execute")
        .with_start_time(sent)
        .with_end_time(received)
        .with_attributes(attrs.clone())
        .start_with_context(&tracer, &cx);
    let outer_cx = cx.with_span(outer);
    let mut process_attrs = attrs;
    process_attrs.push(KeyValue::new(
        "guest.start_delay_us",
        start_delay.as_micros() as i64,
    ));
    let mut process = tracer
        .span_builder("guest.process")
        .with_start_time(process_start)
        .with_attributes(process_attrs)
        .start_with_context(&tracer, &outer_cx);
    use opentelemetry::trace::Span as _;
    process.end_with_timestamp(process_start + run);
    drop(outer_cx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_trace_ids_keep_their_bytes_and_others_map_stably() {
        let id = "01941ab3-6d8c-7a2b-b4e1-9c1234567890";
        assert_eq!(otel_trace_id(id).to_string(), "01941ab36d8c7a2bb4e19c1234567890");
        assert_eq!(otel_trace_id("my-trace-123"), otel_trace_id("my-trace-123"));
        assert_ne!(otel_trace_id("my-trace-123"), otel_trace_id("my-trace-124"));
        assert_ne!(otel_trace_id("x"), TraceId::INVALID);
    }

    #[test]
    fn endpoints_are_checked() {
        check_endpoint("http://localhost:4317").expect("ok");
        check_endpoint("https://otel.example:4317").expect("ok");
        for bad in ["localhost:4317", "ftp://x", "http://", "not a url"] {
            let e = check_endpoint(bad).unwrap_err().to_string();
            assert!(e.contains("--otlp") && e.contains("http://localhost:4317"), "{e}");
        }
    }

    #[test]
    fn without_an_exporter_spans_are_untouched() {
        let span = tracing::info_span!("x");
        start_trace(&span, "01941ab3-6d8c-7a2b-b4e1-9c1234567890");
        assert!(traceparent(&span).is_none());
    }
}
