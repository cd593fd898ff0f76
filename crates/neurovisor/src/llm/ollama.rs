//! Ollama's HTTP API (<https://github.com/ollama/ollama/blob/main/docs/api.md>).

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const DEFAULT_OLLAMA_HOST: &str = "http://localhost:11434";

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("cannot reach Ollama at {url} ({reason}); start it with `ollama serve`, or point OLLAMA_HOST at a running server")]
    Unreachable { url: String, reason: String },
    #[error("model '{model}' is not available in Ollama at {url}; pull it with `ollama pull {model}`")]
    ModelMissing { model: String, url: String },
    #[error("Ollama at {url} answered {status}: {message}")]
    Server {
        url: String,
        status: u16,
        message: String,
    },
    #[error("unexpected answer from Ollama at {url}: {reason}")]
    Protocol { url: String, reason: String },
}

/// `OLLAMA_HOST` as Ollama itself accepts it: a URL, or `host:port`.
pub fn normalize_host(raw: &str) -> String {
    let raw = raw.trim().trim_end_matches('/');
    if raw.is_empty() {
        return DEFAULT_OLLAMA_HOST.to_string();
    }
    if raw.starts_with("http://") || raw.starts_with("https://") {
        raw.to_string()
    } else {
        format!("http://{raw}")
    }
}

#[derive(Clone)]
pub struct OllamaClient {
    base: String,
    http: reqwest::Client,
}

#[derive(Serialize)]
struct GenerateRequest<'a> {
    model: &'a str,
    prompt: &'a str,
    stream: bool,
}

#[derive(Debug, Deserialize)]
pub struct Generation {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub response: String,
    /// Tokens generated.
    #[serde(default)]
    pub eval_count: u64,
    /// Nanoseconds.
    #[serde(default)]
    pub total_duration: u64,
    /// Nanoseconds spent loading the model (cold start).
    #[serde(default)]
    pub load_duration: u64,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

impl OllamaClient {
    pub fn new(host: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self {
            base: normalize_host(host),
            http,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// One non-streaming completion (`POST /api/generate`).
    pub async fn generate(&self, model: &str, prompt: &str) -> Result<Generation, LlmError> {
        let url = format!("{}/api/generate", self.base);
        let resp = self
            .http
            .post(&url)
            .json(&GenerateRequest {
                model,
                prompt,
                stream: false,
            })
            .send()
            .await
            .map_err(|e| LlmError::Unreachable {
                url: self.base.clone(),
                reason: root_cause(&e),
            })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| LlmError::Protocol {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            if status.as_u16() == 404 && message.contains("not found") {
                return Err(LlmError::ModelMissing {
                    model: model.to_string(),
                    url: self.base.clone(),
                });
            }
            return Err(LlmError::Server {
                url: self.base.clone(),
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| LlmError::Protocol {
            url: self.base.clone(),
            reason: e.to_string(),
        })
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_forms() {
        assert_eq!(normalize_host(""), DEFAULT_OLLAMA_HOST);
        assert_eq!(normalize_host("127.0.0.1:11434"), "http://127.0.0.1:11434");
        assert_eq!(normalize_host("https://x/"), "https://x");
    }

    #[tokio::test]
    async fn unreachable_server_is_a_clear_error() {
        // Port 9 (discard) on loopback: nothing listens there.
        let e = OllamaClient::new("http://127.0.0.1:9")
            .generate("qwen3", "hi")
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, LlmError::Unreachable { .. }), "{msg}");
        assert!(
            msg.contains("ollama serve") && msg.contains("OLLAMA_HOST"),
            "{msg}"
        );
    }
}
