//! `inference.InferenceService/Infer`: one prompt, proxied to Ollama.

use std::sync::Arc;
use std::time::Instant;

use neurovisor_proto::inference::inference_service_server::InferenceService;
use neurovisor_proto::inference::{InferRequest, InferResponse};
use tonic::{Request, Response, Status};

use super::trace::{trace_id_of, with_trace_id};
use crate::llm::{LlmError, OllamaClient};
use crate::metrics::{Metrics, ModelLabel};

pub struct InferenceProxy {
    ollama: OllamaClient,
    default_model: String,
    metrics: Arc<Metrics>,
}

impl InferenceProxy {
    pub fn new(ollama: OllamaClient, default_model: String, metrics: Arc<Metrics>) -> Self {
        Self {
            ollama,
            default_model,
            metrics,
        }
    }
}

fn llm_status(e: LlmError) -> Status {
    match e {
        LlmError::Unreachable { .. } => Status::unavailable(e.to_string()),
        LlmError::ModelMissing { .. } => Status::not_found(e.to_string()),
        LlmError::Server { .. } | LlmError::Protocol { .. } => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl InferenceService for InferenceProxy {
    async fn infer(&self, request: Request<InferRequest>) -> Result<Response<InferResponse>, Status> {
        let started = Instant::now();
        let trace_id = trace_id_of(&request);
        let r = request.into_inner();
        if r.prompt.trim().is_empty() {
            return Err(Status::invalid_argument(
                "prompt: empty; send the text to complete",
            ));
        }
        let model = if r.model.is_empty() {
            self.default_model.clone()
        } else {
            r.model
        };
        let answer = self.ollama.generate(&model, &r.prompt).await;
        if answer.is_ok() {
            // The server knows this model: it may have a series of its own.
            self.metrics.allow_model(&model);
        }
        self.metrics
            .inference_requests
            .get_or_create(&ModelLabel {
                model: self.metrics.model(&model),
            })
            .inc();
        let g = answer.map_err(llm_status)?;
        self.metrics
            .inference_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.observe_grpc("Infer", started);
        Ok(with_trace_id(
            Response::new(InferResponse {
                text: g.response,
                model: if g.model.is_empty() { model } else { g.model },
                tokens: g.eval_count,
                duration_ms: g.total_duration / 1_000_000,
                trace_id: trace_id.clone(),
            }),
            &trace_id,
        ))
    }
}
