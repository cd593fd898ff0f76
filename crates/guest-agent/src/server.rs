//! The agent's gRPC services on vsock port 6000 (and the virtio-serial port):
//! `ExecutionService`, and for sandboxes that live across calls `Files`,
//! `Processes` and `Contexts`.

use std::sync::Arc;

use neurovisor_proto::guest::bridge_server::BridgeServer;
use neurovisor_proto::guest::contexts_server::ContextsServer;
use neurovisor_proto::guest::execution_service_server::{ExecutionService, ExecutionServiceServer};
use neurovisor_proto::guest::files_server::FilesServer;
use neurovisor_proto::guest::processes_server::ProcessesServer;
use neurovisor_proto::guest::{
    self as pb, ExecuteEvent, ExecuteRequest, HealthRequest, HealthResponse, ReseedRequest, ReseedResponse,
    SettleRequest, SettleResponse,
};
use neurovisor_proto::{GUEST_AGENT_PORT, GUEST_READY_PORT};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_HOST};
use tonic::{Request, Response, Status};

use crate::exec;
use crate::languages::{self, Language};
use crate::warm::WarmSet;

pub struct Agent {
    languages: Arc<Vec<Language>>,
    warm: Arc<WarmSet>,
    /// The host's id for this VM; a restored VM learns its own in `Reseed`.
    vm_id: std::sync::Mutex<String>,
}

/// The longest a host may ask `Settle` to wait.
const MAX_SETTLE: std::time::Duration = std::time::Duration::from_secs(60);

#[tonic::async_trait]
impl ExecutionService for Agent {
    type ExecuteStream = ReceiverStream<Result<ExecuteEvent, Status>>;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let received = std::time::Instant::now();
        #[cfg(feature = "misbehave")]
        if let Some(mode) = crate::misbehave::requested(request.get_ref()) {
            return crate::misbehave::execute(&mode, request.into_inner()).map(Response::new);
        }
        let plan = exec::plan(request.into_inner(), &self.languages).map_err(Status::invalid_argument)?;
        let (tx, rx) = mpsc::channel(64);
        let warm = self.warm.clone();
        tokio::spawn(async move {
            if let Err(status) = exec::run(plan, tx.clone(), &warm, received).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn settle(&self, request: Request<SettleRequest>) -> Result<Response<SettleResponse>, Status> {
        let timeout = std::time::Duration::from_millis(request.get_ref().timeout_ms.into()).min(MAX_SETTLE);
        let warm_languages = self.warm.settle(timeout).await;
        Ok(Response::new(SettleResponse { warm_languages }))
    }

    async fn reseed(&self, request: Request<ReseedRequest>) -> Result<Response<ReseedResponse>, Status> {
        let req = request.into_inner();
        crate::reseed::add_entropy(&req.entropy).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let unix_time_ns = if req.unix_time_ns > 0 {
            crate::reseed::set_clock(req.unix_time_ns).map_err(|e| Status::internal(e.to_string()))?
        } else {
            crate::reseed::now_ns()
        };
        self.warm.restart_unreseedable();
        if let Ok(mut id) = self.vm_id.lock() {
            tracing::info!(from = %id, to = %req.vm_id, "reseeded after a restore");
            *id = req.vm_id;
        }
        Ok(Response::new(ReseedResponse {
            unix_time_ns,
            health: Some(self.health_now()),
        }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(self.health_now()))
    }
}

impl Agent {
    fn health_now(&self) -> HealthResponse {
        let uptime_ms = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
            .map(|secs| (secs * 1000.0) as u64)
            .unwrap_or(0);
        HealthResponse {
            ready: true,
            languages: self
                .languages
                .iter()
                .map(|l| pb::Language {
                    name: l.name.clone(),
                    version: l.version.clone(),
                })
                .collect(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            uptime_ms,
        }
    }
}

/// A host connection over vsock or, in a VM made to be snapshotted, over
/// the agent's virtio-serial port.
enum Conn {
    Vsock(VsockStream),
    Serial(crate::serial::SerialConn),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Vsock(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Conn::Serial(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Vsock(s) => std::pin::Pin::new(s).poll_write(cx, data),
            Conn::Serial(s) => std::pin::Pin::new(s).poll_write(cx, data),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Vsock(s) => std::pin::Pin::new(s).poll_flush(cx),
            Conn::Serial(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Vsock(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Conn::Serial(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

fn incoming(
    listener: VsockListener,
) -> std::io::Result<impl tokio_stream::Stream<Item = std::io::Result<Conn>>> {
    use tokio_stream::StreamExt;
    let vsock = listener.incoming().map(|c| c.map(Conn::Vsock));
    type Incoming = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = std::io::Result<Conn>> + Send>>;
    let serial: Incoming = match crate::serial::find_port(std::path::Path::new("/sys/class/virtio-ports")) {
        Some(port) => {
            tracing::info!(port = %port.display(), "serving on the virtio-serial port too");
            Box::pin(crate::serial::incoming(&port)?.map(|c| c.map(Conn::Serial)))
        }
        None => Box::pin(tokio_stream::pending()),
    };
    Ok(vsock.merge(serial))
}

/// Tells the host the agent is listening (the host waits on `<uds_path>_6001`),
/// so it never has to poll.
async fn announce_ready() -> std::io::Result<()> {
    let mut s = VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, GUEST_READY_PORT)).await?;
    s.write_all(b"READY\n").await?;
    AsyncWriteExt::shutdown(&mut s).await
}

pub async fn serve(warm_languages: Vec<String>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, GUEST_AGENT_PORT))?;
    let agent = Agent {
        languages: Arc::new(languages::load()),
        warm: Arc::new(WarmSet::default()),
        vm_id: Default::default(),
    };
    let (warm, installed) = (agent.warm.clone(), agent.languages.clone());
    tracing::info!(languages = ?agent.languages, "serving on vsock port {GUEST_AGENT_PORT}");
    let server = tonic::transport::Server::builder()
        // Every request the host's validation lets through must decode here.
        .add_service(
            ExecutionServiceServer::new(agent)
                .max_decoding_message_size(neurovisor_proto::limits::MAX_REQUEST_BYTES),
        )
        .add_service(
            FilesServer::new(crate::files::FilesService)
                .max_decoding_message_size(crate::files::CHUNK + (64 << 10)),
        )
        .add_service(
            ContextsServer::new(crate::contexts::ContextsService::default())
                .max_decoding_message_size(neurovisor_proto::limits::MAX_REQUEST_BYTES),
        )
        .add_service(
            ProcessesServer::new(crate::procs::ProcessesService::default())
                .max_decoding_message_size(neurovisor_proto::limits::MAX_REQUEST_BYTES),
        )
        .add_service(
            BridgeServer::new(crate::bridge::BridgeService::default())
                .max_decoding_message_size(crate::bridge::MAX_MESSAGE),
        )
        .serve_with_incoming(incoming(listener)?);
    tokio::spawn(async move {
        if let Err(e) = announce_ready().await {
            tracing::warn!("could not announce readiness to the host: {e}");
        }
        // After readiness, so that starting them never delays a boot.
        warm.start(&warm_languages, &installed);
    });
    server.await?;
    Ok(())
}
