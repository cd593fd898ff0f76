//! LLM clients. For now: Ollama's native API (`/api/generate`), used by the
//! daemon's `inference.InferenceService/Infer` proxy.

pub mod ollama;

pub use ollama::{LlmError, OllamaClient};
