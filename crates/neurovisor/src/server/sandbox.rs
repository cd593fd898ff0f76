//! `neurovisor.v1.Sandbox`: executions from the pool over gRPC.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use neurovisor_proto::v1::sandbox_server::Sandbox as SandboxApi;
use neurovisor_proto::v1::{
    execute_response::Event, ExecuteRequest, ExecuteResponse, ExecuteResult, Language, LanguagesRequest,
    LanguagesResponse,
};
use std::pin::Pin;

use std::task::Poll;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use futures_util::task::AtomicWaker;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::trace::{trace_id_of, with_trace_id};
use crate::exec::{ExecError, ExecOutcome, ExecRequest, Output, OutputSink, WireRequest};
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolError};

/// Messages buffered per stream while its client is slow: at most this many
/// chunks (the guest agent sends up to 32 KiB each), then the host stops
/// reading from the guest.
pub(super) const STREAM_QUEUE: usize = 32;
/// How long a client may read nothing while output waits for it.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of program output the daemon holds for its clients, across all
/// requests. A stream whose client does not read holds its share until the
/// execution ends; others wait for room (and, through HTTP/2 flow control,
/// so do their guests), so memory stays bounded whatever clients do.
#[derive(Clone)]
pub struct OutputBudget {
    bytes: Arc<Semaphore>,
    total: u32,
}

impl OutputBudget {
    pub fn new(total_bytes: usize) -> Self {
        let total = u32::try_from(total_bytes.clamp(1 << 20, u32::MAX as usize)).unwrap_or(u32::MAX);
        Self {
            bytes: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Room for `n` bytes (a chunk larger than the whole budget takes all of it).
    pub(super) async fn reserve(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n).unwrap_or(u32::MAX).clamp(1, self.total);
        self.bytes.clone().acquire_many_owned(n).await.ok()
    }

    /// Bytes in use right now.
    pub fn in_use(&self) -> usize {
        self.total as usize - self.bytes.available_permits()
    }
}

/// One message on its way to a client, with the budget it holds until tonic
/// takes it off the queue.
pub(super) struct Queued {
    pub(super) msg: Result<ExecuteResponse, Status>,
    pub(super) _room: Option<OwnedSemaphorePermit>,
}

/// The queue of one stream, shared by the execution's task and the response
/// stream. The task can abandon it: the queued messages (and the budget they
/// hold) are freed at once, and the client is told why when it reads again.
pub(super) struct Outbox {
    rx: std::sync::Mutex<Option<mpsc::Receiver<Queued>>>,
    ended: std::sync::Mutex<Option<Status>>,
    waker: AtomicWaker,
}

impl Outbox {
    pub(super) fn new(rx: mpsc::Receiver<Queued>) -> Arc<Self> {
        Arc::new(Self {
            rx: std::sync::Mutex::new(Some(rx)),
            ended: std::sync::Mutex::new(None),
            waker: AtomicWaker::new(),
        })
    }

    pub(super) fn abandon(&self, why: Status) {
        if let Ok(mut e) = self.ended.lock() {
            *e = Some(why);
        }
        let rx = self.rx.lock().ok().and_then(|mut r| r.take());
        drop(rx);
        self.waker.wake();
    }
}

/// The response stream over an [`Outbox`].
pub(super) struct OutboxStream {
    pub(super) outbox: Arc<Outbox>,
    pub(super) finished: bool,
}

impl Drop for OutboxStream {
    /// The client went away (tonic drops the stream): closing the queue is
    /// how the execution's task learns it, and destroys the VM at once.
    fn drop(&mut self) {
        let rx = self.outbox.rx.lock().ok().and_then(|mut r| r.take());
        drop(rx);
    }
}

impl Stream for OutboxStream {
    type Item = Result<ExecuteResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        self.outbox.waker.register(cx.waker());
        let polled = match self.outbox.rx.lock() {
            Ok(mut rx) => rx.as_mut().map(|rx| rx.poll_recv(cx)),
            Err(_) => None,
        };
        match polled {
            Some(Poll::Ready(Some(q))) => Poll::Ready(Some(q.msg)),
            Some(Poll::Ready(None)) => {
                self.finished = true;
                Poll::Ready(None)
            }
            Some(Poll::Pending) => Poll::Pending,
            None => {
                self.finished = true;
                let why = self.outbox.ended.lock().ok().and_then(|mut e| e.take());
                Poll::Ready(why.map(Err))
            }
        }
    }
}

/// The output sink of a streamed execution: waits for budget and for room in
/// the stream's queue, which is what pushes back on the guest. A client that
/// takes nothing for `stall_timeout` has stalled: the task is told, and
/// destroys the VM.
struct StreamSink {
    tx: mpsc::Sender<Queued>,
    budget: OutputBudget,
    stall_timeout: Duration,
    stalled: Arc<tokio::sync::Notify>,
}

#[tonic::async_trait]
impl OutputSink for StreamSink {
    async fn write(&mut self, o: Output<'_>) {
        let ev = match o {
            Output::Stdout(b) => Event::Stdout(b.to_vec().into()),
            Output::Stderr(b) => Event::Stderr(b.to_vec().into()),
        };
        let queue = async {
            let room = self.budget.reserve(o.len()).await;
            // A closed stream is noticed by the task (it destroys the VM).
            let _ = self
                .tx
                .send(Queued {
                    msg: Ok(ExecuteResponse { event: Some(ev) }),
                    _room: room,
                })
                .await;
        };
        if tokio::time::timeout(self.stall_timeout, queue).await.is_err() {
            self.stalled.notify_one();
        }
    }
}

/// Collects output for a unary reply, holding budget for every byte.
struct CollectSink {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    budget: OutputBudget,
    held: Vec<OwnedSemaphorePermit>,
}

#[tonic::async_trait]
impl OutputSink for CollectSink {
    async fn write(&mut self, o: Output<'_>) {
        if let Some(p) = self.budget.reserve(o.len()).await {
            self.held.push(p);
        }
        match o {
            Output::Stdout(b) => self.stdout.extend_from_slice(b),
            Output::Stderr(b) => self.stderr.extend_from_slice(b),
        }
    }
}

pub struct SandboxService {
    pool: Pool,
    /// The daemon's profiles and their pools (requests naming a profile).
    profiles: Option<super::sessions::SandboxTable>,
    metrics: Arc<Metrics>,
    budget: OutputBudget,
    stall_timeout: Duration,
}

impl SandboxService {
    pub fn new(pool: Pool, metrics: Arc<Metrics>, budget: OutputBudget) -> Self {
        Self {
            pool,
            profiles: None,
            metrics,
            budget,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
        }
    }

    /// Serves requests that name a profile from `table`'s pool of it.
    pub fn with_profiles(mut self, table: super::sessions::SandboxTable) -> Self {
        self.profiles = Some(table);
        self
    }

    /// How long a streaming client may read nothing before its execution is stopped.
    pub fn with_stall_timeout(mut self, d: Duration) -> Self {
        self.stall_timeout = d;
        self
    }

    /// The checked request and the pool its VM comes from: the daemon's, or
    /// its profile's (whose environment lies under the request's, whose
    /// limits fill what the request leaves 0).
    fn to_exec_request(&self, r: ExecuteRequest, trace_id: String) -> Result<(ExecRequest, Pool), Status> {
        let (pool, profile) = match (&self.profiles, r.profile.as_str()) {
            (_, "") => (self.pool.clone(), None),
            (Some(table), name) => table.pool_for(name, "", "")?,
            (None, _) => {
                return Err(Status::invalid_argument(
                    "profile: this endpoint serves no profiles; leave it empty",
                ))
            }
        };
        let mut wire = wire_of(r, trace_id);
        if let Some(p) = &profile {
            let own = std::mem::take(&mut wire.env);
            wire.env = p.env.clone().into_iter().collect();
            wire.env.retain(|(k, _)| !own.iter().any(|(o, _)| o == k));
            wire.env.extend(own);
            if wire.timeout_ms == 0 {
                if let Some(t) = p.timeout {
                    wire.timeout_ms = u32::try_from(t.as_millis()).unwrap_or(u32::MAX);
                }
            }
            if wire.max_output_bytes == 0 {
                wire.max_output_bytes = p.max_output_bytes.unwrap_or(0);
            }
        }
        let req = ExecRequest::from_wire(wire, pool.sandbox().images()).map_err(to_status)?;
        pool.sandbox().check_bridge(&req).map_err(to_status)?;
        Ok((req, pool))
    }

    fn record(&self, req: &ExecRequest, result: &Result<ExecOutcome, ExecError>) {
        self.metrics
            .record_execution(&req.language, &req.trace_id, result);
    }
}

/// The transport-neutral form of a daemon API request (validated by
/// [`ExecRequest::from_wire`]).
pub(super) fn wire_of(r: ExecuteRequest, trace_id: String) -> WireRequest {
    WireRequest {
        language: r.language,
        code: r.code,
        args: r.args,
        stdin: r.stdin.to_vec(),
        env: r.env.into_iter().collect(),
        timeout_ms: r.timeout_ms,
        max_output_bytes: r.max_output_bytes,
        trace_id,
        llm_bridge: r.llm_bridge,
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

pub(super) fn pool_status(e: PoolError) -> Status {
    match e {
        PoolError::Exhausted { .. } | PoolError::QueueFull { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        PoolError::Degraded { .. } | PoolError::ShuttingDown => Status::unavailable(e.to_string()),
        PoolError::Boot(inner) => Status::internal(format!("VM boot failed: {inner}")),
        PoolError::Runtime(_) => Status::internal(e.to_string()),
    }
}

pub(super) fn result_of(o: &ExecOutcome, warm: bool, waited: Duration) -> ExecuteResult {
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
        warm_interpreter: o.warm_interpreter,
        restored: o.restored,
    }
}

/// Counts a request as in flight for as long as it lives.
pub(super) struct InFlight(Arc<Metrics>);

impl InFlight {
    pub(super) fn new(m: &Arc<Metrics>) -> Self {
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
    type ExecuteStream = Pin<Box<dyn Stream<Item = Result<ExecuteResponse, Status>> + Send>>;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let started = Instant::now();
        let trace_id = trace_id_of(&request);
        let (req, pool) = self
            .to_exec_request(request.into_inner(), trace_id.clone())
            .inspect_err(|s| self.metrics.grpc_code("Execute", s.code()))?;
        let in_flight = InFlight::new(&self.metrics);
        let mut lease = pool
            .acquire()
            .await
            .map_err(pool_status)
            .inspect_err(|s| self.metrics.grpc_code("Execute", s.code()))?;
        let (tx, rx) = mpsc::channel::<Queued>(STREAM_QUEUE);
        let outbox = Outbox::new(rx);
        let stalled = Arc::new(tokio::sync::Notify::new());
        let service = SandboxService::new(self.pool.clone(), self.metrics.clone(), self.budget.clone())
            .with_stall_timeout(self.stall_timeout);
        let task_trace_id = trace_id.clone();
        let task_outbox = outbox.clone();
        tokio::spawn(async move {
            let trace_id = task_trace_id;
            let _in_flight = in_flight;
            let mut sink = StreamSink {
                tx: tx.clone(),
                budget: service.budget.clone(),
                stall_timeout: service.stall_timeout,
                stalled: stalled.clone(),
            };
            let result = tokio::select! {
                r = lease.execute(&req, &mut sink) => r,
                // The client stopped reading: its VM and its queue go now.
                _ = stalled.notified() => {
                    tracing::warn!(%trace_id, vm = lease.vm_id(), "client stopped reading its output; destroying its VM");
                    drop(lease);
                    service.metrics.observe_grpc("Execute", started);
                    service.metrics.grpc_code("Execute", tonic::Code::DeadlineExceeded);
                    task_outbox.abandon(Status::deadline_exceeded(format!(
                        "the client read none of its output for {:?}; the execution was stopped and its VM destroyed (read the stream as it arrives)",
                        service.stall_timeout
                    )));
                    return;
                }
                // The client went away: dropping the lease destroys the VM now.
                _ = tx.closed() => {
                    tracing::info!(vm = lease.vm_id(), "client disconnected; destroying its VM");
                    service.metrics.grpc_code("Execute", tonic::Code::Cancelled);
                    return;
                }
            };
            service.record(&req, &result);
            service.metrics.grpc_code(
                "Execute",
                match &result {
                    Ok(_) => tonic::Code::Ok,
                    Err(e) if e.is_invalid_request() => tonic::Code::InvalidArgument,
                    Err(_) => tonic::Code::Internal,
                },
            );
            let msg = match result {
                Ok(o) => Ok(ExecuteResponse {
                    event: Some(Event::Result(result_of(&o, lease.warm, lease.waited))),
                }),
                Err(e) => Err(to_status(e)),
            };
            drop(lease);
            // The VM is gone already; a client that stopped reading gets a
            // while to take the rest, then this task lets go of it.
            let queued = Queued { msg, _room: None };
            if tokio::time::timeout(service.stall_timeout, tx.send(queued))
                .await
                .is_err()
            {
                tracing::info!(%trace_id, "the client did not read its output; dropping the result");
                task_outbox.abandon(Status::deadline_exceeded("the client did not read its result"));
            }
            service.metrics.observe_grpc("Execute", started);
        }
        // The request's span lives on in the task that streams its output.
        .in_current_span());
        let stream = OutboxStream {
            outbox,
            finished: false,
        };
        Ok(with_trace_id(Response::new(Box::pin(stream)), &trace_id))
    }

    async fn execute_once(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<ExecuteResult>, Status> {
        let r = self.execute_once_in(request).await;
        self.metrics.grpc_code(
            "ExecuteOnce",
            r.as_ref().map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()),
        );
        r
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

impl SandboxService {
    async fn execute_once_in(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<ExecuteResult>, Status> {
        let started = Instant::now();
        let trace_id = trace_id_of(&request);
        let (req, pool) = self.to_exec_request(request.into_inner(), trace_id.clone())?;
        let _in_flight = InFlight::new(&self.metrics);
        let mut lease = pool.acquire().await.map_err(pool_status)?;
        let mut sink = CollectSink {
            stdout: Vec::new(),
            stderr: Vec::new(),
            budget: self.budget.clone(),
            held: Vec::new(),
        };
        // If the client cancels, tonic drops this future and with it the lease.
        let result = lease.execute(&req, &mut sink).await;
        let CollectSink { stdout, stderr, .. } = sink;
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
}
