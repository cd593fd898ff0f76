//! A real OTLP/gRPC endpoint (the collector's `TraceService` and
//! `LogsService`, from the OpenTelemetry protos) that keeps what it receives,
//! for tests and the `trace_id_demo` example.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub service: String,
    pub attributes: HashMap<String, String>,
}

/// One received log record, flattened.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub body: String,
    pub trace_id: String,
    pub severity: String,
}

#[derive(Default)]
struct Store {
    spans: Vec<Span>,
    logs: Vec<LogRecord>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Store>>);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kv: &[KeyValue]) -> HashMap<String, String> {
    kv.iter().map(|a| (a.key.clone(), text(&a.value))).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut store = self.0.lock().expect("store");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .map(|r| attrs(&r.attributes))
                .and_then(|a| a.get("service.name").cloned())
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    store.spans.push(Span {
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                        service: service.clone(),
                        attributes: attrs(&s.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let mut store = self.0.lock().expect("store");
        for rl in request.into_inner().resource_logs {
            for sl in rl.scope_logs {
                for l in sl.log_records {
                    store.logs.push(LogRecord {
                        body: text(&l.body),
                        trace_id: hex(&l.trace_id),
                        severity: l.severity_text,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

/// A running receiver; stops when dropped.
pub struct Otlp {
    pub addr: SocketAddr,
    store: Receiver,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Otlp {
    /// Listens on a free loopback port (on the current tokio runtime).
    pub async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let store = Receiver::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let svc = store.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(svc.clone()))
                .add_service(LogsServiceServer::new(svc))
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(l), async {
                    let _ = rx.await;
                })
                .await;
        });
        Self {
            addr,
            store,
            stop: Some(tx),
        }
    }

    /// `--otlp` for NeuroVisor.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.store.0.lock().expect("store").spans.clone()
    }

    pub fn logs(&self) -> Vec<LogRecord> {
        self.store.0.lock().expect("store").logs.clone()
    }

    /// The spans of trace `trace_id` (32 hex digits) once `names` are all
    /// there, or what arrived when `timeout` passed.
    pub async fn wait_trace(&self, trace_id: &str, names: &[&str], timeout: Duration) -> Vec<Span> {
        let until = Instant::now() + timeout;
        loop {
            let spans: Vec<Span> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) || Instant::now() > until {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Otlp {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The first span named `name`.
pub fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name} among {:?}", names(spans)))
}

pub fn names(spans: &[Span]) -> Vec<String> {
    spans.iter().map(|s| s.name.clone()).collect()
}

/// Whether `child` descends from `ancestor` through parent links.
pub fn descends(spans: &[Span], child: &Span, ancestor: &Span) -> bool {
    let mut cur = child.parent_span_id.clone();
    for _ in 0..64 {
        if cur == ancestor.span_id {
            return true;
        }
        match spans.iter().find(|s| s.span_id == cur) {
            Some(p) => cur = p.parent_span_id.clone(),
            None => return false,
        }
    }
    false
}

/// Indented tree of a trace's spans with their durations.
pub fn tree(spans: &[Span]) -> String {
    fn walk(spans: &[Span], parent: &str, depth: usize, out: &mut String) {
        let mut kids: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id == parent).collect();
        kids.sort_by_key(|s| s.start_ns);
        for s in kids {
            let ms = s.end_ns.saturating_sub(s.start_ns) as f64 / 1e6;
            out.push_str(&format!("{}{} ({ms:.1} ms)\n", "  ".repeat(depth), s.name));
            walk(spans, &s.span_id, depth + 1, out);
        }
    }
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut out = String::new();
    let mut roots: Vec<&str> = spans
        .iter()
        .filter(|s| !ids.contains(s.parent_span_id.as_str()))
        .map(|s| s.parent_span_id.as_str())
        .collect();
    roots.sort();
    roots.dedup();
    for r in roots {
        walk(spans, r, 0, &mut out);
    }
    out
}
