//! The gRPC `ExecutionService` served on vsock port 6000.

use std::sync::Arc;

use neurovisor_proto::guest::execution_service_server::{ExecutionService, ExecutionServiceServer};
use neurovisor_proto::guest::{self as pb, ExecuteEvent, ExecuteRequest, HealthRequest, HealthResponse};
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
}

#[tonic::async_trait]
impl ExecutionService for Agent {
    type ExecuteStream = ReceiverStream<Result<ExecuteEvent, Status>>;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        #[cfg(feature = "misbehave")]
        if let Some(mode) = crate::misbehave::requested(request.get_ref()) {
            return crate::misbehave::execute(&mode, request.into_inner()).map(Response::new);
        }
        let plan = exec::plan(request.into_inner(), &self.languages).map_err(Status::invalid_argument)?;
        let (tx, rx) = mpsc::channel(64);
        let warm = self.warm.clone();
        tokio::spawn(async move {
            if let Err(status) = exec::run(plan, tx.clone(), &warm).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let uptime_ms = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
            .map(|secs| (secs * 1000.0) as u64)
            .unwrap_or(0);
        Ok(Response::new(HealthResponse {
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
        }))
    }
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
    };
    let (warm, installed) = (agent.warm.clone(), agent.languages.clone());
    tracing::info!(languages = ?agent.languages, "serving on vsock port {GUEST_AGENT_PORT}");
    let server = tonic::transport::Server::builder()
        // Every request the host's validation lets through must decode here.
        .add_service(
            ExecutionServiceServer::new(agent)
                .max_decoding_message_size(neurovisor_proto::limits::MAX_REQUEST_BYTES),
        )
        .serve_with_incoming(listener.incoming());
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
