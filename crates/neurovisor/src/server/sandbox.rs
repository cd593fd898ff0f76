//! `neurovisor.v1.Sandbox`: executions from the pool over gRPC.

use std::sync::Arc;
use std::time::{Duration, Instant};

use neurovisor_proto::v1::sandbox_server::Sandbox as SandboxApi;
use neurovisor_proto::v1::{
    execute_response::Event, ExecuteRequest, ExecuteResponse, ExecuteResult, Language, LanguagesRequest,
    LanguagesResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use super::trace::{trace_id_of, with_trace_id};
use crate::exec::{ExecError, ExecOutcome, ExecRequest, Output, DEFAULT_MAX_OUTPUT, DEFAULT_TIMEOUT};
use crate::metrics::{LanguageLabel, Metrics, OutcomeLabel};
use crate::pool::{Pool, PoolError};

/// The largest output cap a client may ask for: output is buffered per
/// request up to this much while a slow client catches up.
pub const MAX_OUTPUT_CAP: u64 = 64 << 20;

pub struct SandboxService {
    pool: Pool,
    metrics: Arc<Metrics>,
}

impl SandboxService {
    pub fn new(pool: Pool, metrics: Arc<Metrics>) -> Self {
        Self { pool, metrics }
    }

    fn to_exec_request(&self, r: ExecuteRequest, trace_id: String) -> Result<ExecRequest, Status> {
        if r.max_output_bytes > MAX_OUTPUT_CAP {
            return Err(Status::invalid_argument(format!(
                "max_output_bytes: {} is over the limit of {MAX_OUTPUT_CAP}",
                r.max_output_bytes
            )));
        }
        let req = ExecRequest {
            language: r.language,
            code: r.code,
            args: r.args,
            stdin: r.stdin.to_vec(),
            env: r.env.into_iter().collect(),
            timeout: if r.timeout_ms == 0 {
                DEFAULT_TIMEOUT
            } else {
                Duration::from_millis(u64::from(r.timeout_ms))
            },
            max_output_bytes: if r.max_output_bytes == 0 {
                DEFAULT_MAX_OUTPUT
            } else {
                r.max_output_bytes
            },
            trace_id,
        };
        req.validate(self.pool.sandbox().images()).map_err(to_status)?;
        Ok(req)
    }

    fn record(&self, req: &ExecRequest, result: &Result<ExecOutcome, ExecError>) {
        let outcome = match result {
            Ok(o) if o.timed_out => "timeout",
            Ok(o) if o.oom_killed => "oom",
            Ok(o) if o.exit_code == Some(0) => "ok",
            Ok(_) => "nonzero_exit",
            Err(_) => "error",
        };
        if let Ok(o) = result {
            self.metrics
                .code_execution_duration_seconds
                .get_or_create(&LanguageLabel {
                    language: req.language.clone(),
                })
                .observe(o.duration_ms / 1000.0);
        }
        self.metrics
            .executions
            .get_or_create(&OutcomeLabel {
                language: req.language.clone(),
                outcome: outcome.into(),
            })
            .inc();
    }
}

/// Maps library errors to gRPC codes: the client's fault, capacity, or ours.
pub fn to_status(e: ExecError) -> Status {
    if e.is_invalid_request() {
        Status::invalid_argument(e.to_string())
    } else {
        Status::internal(e.to_string())
    }
}

fn pool_status(e: PoolError) -> Status {
    match e {
        PoolError::Exhausted { .. } => Status::resource_exhausted(e.to_string()),
        PoolError::Degraded { .. } | PoolError::ShuttingDown => Status::unavailable(e.to_string()),
        PoolError::Boot(inner) => Status::internal(format!("VM boot failed: {inner}")),
        PoolError::Runtime(_) => Status::internal(e.to_string()),
    }
}

fn result_of(o: &ExecOutcome, warm: bool, waited: Duration) -> ExecuteResult {
    ExecuteResult {
        exit_code: o.exit_code,
        signal: o.signal,
        timed_out: o.timed_out,
        oom_killed: o.oom_killed,
        duration_us: (o.duration_ms * 1000.0) as u64,
        stdout_truncated: o.stdout_truncated,
        stderr_truncated: o.stderr_truncated,
        stdout_bytes: o.stdout_bytes,
        stderr_bytes: o.stderr_bytes,
        vm_id: o.vm_id.clone(),
        trace_id: o.trace_id.clone(),
        wait_us: waited.as_micros() as u64,
        warm,
        stdout: Default::default(),
        stderr: Default::default(),
    }
}

/// Counts a request as in flight for as long as it lives.
struct InFlight(Arc<Metrics>);

impl InFlight {
    fn new(m: &Arc<Metrics>) -> Self {
        m.requests_in_flight.inc();
        Self(m.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.requests_in_flight.dec();
    }
}

#[tonic::async_trait]
impl SandboxApi for SandboxService {
    type ExecuteStream = UnboundedReceiverStream<Result<ExecuteResponse, Status>>;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let started = Instant::now();
        let trace_id = trace_id_of(&request);
        let req = self.to_exec_request(request.into_inner(), trace_id.clone())?;
        let in_flight = InFlight::new(&self.metrics);
        let mut lease = self.pool.acquire().await.map_err(pool_status)?;
        // Unbounded, but bounded in practice: the guest caps each stream at
        // max_output_bytes (<= MAX_OUTPUT_CAP).
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = self.metrics.clone();
        let this_metrics = self.metrics.clone();
        let pool = self.pool.clone();
        let service = SandboxService::new(pool, this_metrics);
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let out_tx = tx.clone();
            let mut sink = |o: Output<'_>| {
                let ev = match o {
                    Output::Stdout(b) => Event::Stdout(b.to_vec().into()),
                    Output::Stderr(b) => Event::Stderr(b.to_vec().into()),
                };
                let _ = out_tx.send(Ok(ExecuteResponse { event: Some(ev) }));
            };
            let result = tokio::select! {
                r = lease.execute(&req, &mut sink) => r,
                // The client went away: dropping the lease destroys the VM now.
                _ = tx.closed() => {
                    tracing::info!(vm = lease.vm_id(), "client disconnected; destroying its VM");
                    return;
                }
            };
            service.record(&req, &result);
            let msg = match result {
                Ok(o) => Ok(ExecuteResponse {
                    event: Some(Event::Result(result_of(&o, lease.warm, lease.waited))),
                }),
                Err(e) => Err(to_status(e)),
            };
            drop(lease);
            let _ = tx.send(msg);
            metrics.observe_grpc("Execute", started);
        });
        Ok(with_trace_id(
            Response::new(UnboundedReceiverStream::new(rx)),
            &trace_id,
        ))
    }

    async fn execute_once(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<ExecuteResult>, Status> {
        let started = Instant::now();
        let trace_id = trace_id_of(&request);
        let req = self.to_exec_request(request.into_inner(), trace_id.clone())?;
        let _in_flight = InFlight::new(&self.metrics);
        let mut lease = self.pool.acquire().await.map_err(pool_status)?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut sink = |o: Output<'_>| match o {
            Output::Stdout(b) => stdout.extend_from_slice(b),
            Output::Stderr(b) => stderr.extend_from_slice(b),
        };
        // If the client cancels, tonic drops this future and with it the lease.
        let result = lease.execute(&req, &mut sink).await;
        self.record(&req, &result);
        let (warm, waited) = (lease.warm, lease.waited);
        drop(lease);
        let o = result.map_err(to_status)?;
        let mut r = result_of(&o, warm, waited);
        r.stdout = stdout.into();
        r.stderr = stderr.into();
        self.metrics.observe_grpc("ExecuteOnce", started);
        Ok(with_trace_id(Response::new(r), &trace_id))
    }

    async fn languages(&self, _: Request<LanguagesRequest>) -> Result<Response<LanguagesResponse>, Status> {
        let images = self.pool.sandbox().images();
        Ok(Response::new(LanguagesResponse {
            languages: images
                .languages
                .iter()
                .map(|l| Language {
                    name: l.name.clone(),
                    version: l.version.clone(),
                })
                .collect(),
            image: images.name.clone(),
        }))
    }
}
