//! LLM clients behind one small trait ([`LlmClient`]):
//!
//! - [`ollama`]: Ollama's native API: `/api/chat` (streamed NDJSON, native tool
//!   calls, model load time) for agent mode, `/api/generate` for the daemon's
//!   `inference.InferenceService/Infer` proxy.
//! - [`openai`]: any OpenAI-compatible `/v1/chat/completions` endpoint (streamed
//!   as server-sent events, tool calls assembled from their fragments).
//!
//! Errors ([`LlmError`]) say what to do: start the server, pull the model, or
//! what the server answered.

pub mod bridge;
pub mod ollama;
pub mod openai;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use ollama::OllamaClient;
pub use openai::OpenAiClient;

/// The model agent mode uses when none is given.
pub const DEFAULT_MODEL: &str = "qwen3";
/// The longest silence tolerated inside a streamed answer.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Which kind of server a client talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Ollama's native API (`/api/chat`).
    Ollama,
    /// Any OpenAI-compatible `/v1/chat/completions` endpoint.
    #[serde(rename = "openai")]
    #[value(name = "openai")]
    OpenAi,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ollama => "ollama",
            Self::OpenAi => "openai",
        }
    }

    /// How error messages name the server.
    pub fn server_name(self) -> &'static str {
        match self {
            Self::Ollama => "Ollama",
            Self::OpenAi => "the OpenAI-compatible server",
        }
    }

    fn start_hint(self) -> &'static str {
        match self {
            Self::Ollama => "start it with `ollama serve`, or point OLLAMA_HOST at a running server",
            Self::OpenAi => "check --base-url (or OPENAI_BASE_URL) and that the server is running",
        }
    }

    fn model_hint(self, model: &str) -> String {
        match self {
            Self::Ollama => format!("pull it with `ollama pull {model}`"),
            Self::OpenAi => "choose a model the server offers with --model".to_string(),
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("cannot reach {} at {url} ({reason}); {}", .provider.server_name(), .provider.start_hint())]
    Unreachable {
        provider: Provider,
        url: String,
        reason: String,
    },
    #[error("model '{model}' is not available in {} at {url} ({message}); {}", .provider.server_name(), .provider.model_hint(.model))]
    ModelMissing {
        provider: Provider,
        model: String,
        url: String,
        message: String,
    },
    #[error("{} at {url} answered {status}: {message}", .provider.server_name())]
    Server {
        provider: Provider,
        url: String,
        status: u16,
        message: String,
    },
    #[error("unexpected answer from {} at {url}: {reason}", .provider.server_name())]
    Protocol {
        provider: Provider,
        url: String,
        reason: String,
    },
}

impl LlmError {
    /// A short machine-readable name of the failure.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "llm_unreachable",
            Self::ModelMissing { .. } => "model_missing",
            Self::Server { .. } => "llm_server_error",
            Self::Protocol { .. } => "llm_protocol_error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// One tool call requested by the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolCall {
    /// The provider's id (OpenAI), or one made up for the session.
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, exactly as the model wrote them (they may be
    /// malformed; the agent reports that back to the model).
    pub arguments: String,
}

impl ToolCall {
    /// The arguments as a JSON object.
    pub fn arguments_object(&self) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        let text = self.arguments.trim();
        if text.is_empty() {
            return Ok(serde_json::Map::new());
        }
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            Ok(other) => Err(format!("the arguments must be a JSON object, got {other}")),
            Err(e) => Err(format!("the arguments are not valid JSON ({e})")),
        }
    }
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    /// The calls an assistant message made.
    pub tool_calls: Vec<ToolCall>,
    /// For a tool message: the call it answers.
    pub tool_call_id: Option<String>,
    /// For a tool message: the tool's name (Ollama's `tool_name`).
    pub tool_name: Option<String>,
}

impl ChatMessage {
    fn plain(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            tool_name: None,
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::plain(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::plain(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self {
            tool_calls,
            ..Self::plain(Role::Assistant, content)
        }
    }

    /// The result of `call`, sent back to the model.
    pub fn tool(call: &ToolCall, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(call.id.clone()),
            tool_name: Some(call.name.clone()),
            ..Self::plain(Role::Tool, content)
        }
    }
}

/// A tool the model may call (a function with a JSON-schema for its arguments).
#[derive(Debug, Clone, Serialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub parameters: serde_json::Value,
}

/// One request to the model.
#[derive(Debug, Clone, Copy)]
pub struct ChatRequest<'a> {
    pub messages: &'a [ChatMessage],
    pub tools: &'a [ToolSpec],
    /// Sent as `x-trace-id`.
    pub trace_id: Option<&'a str>,
}

/// What the model answered in one turn.
#[derive(Debug, Clone, Default)]
pub struct ChatTurn {
    /// The whole text (the deltas concatenated).
    pub content: String,
    /// Native tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// Time the server spent loading the model (Ollama's `load_duration`).
    pub model_load: Option<Duration>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Why generation stopped (`stop`, `tool_calls`, `length`...).
    pub finish_reason: Option<String>,
}

/// A chat model that streams its answer.
#[async_trait::async_trait]
pub trait LlmClient: Send + Sync {
    fn provider(&self) -> Provider;
    fn model(&self) -> &str;
    /// The server's base URL, for messages.
    fn base_url(&self) -> &str;
    /// One turn: `on_text` gets each piece of text as it arrives; the turn is
    /// returned once the server says it is done.
    async fn chat(
        &self,
        req: ChatRequest<'_>,
        on_text: &mut (dyn for<'s> FnMut(&'s str) + Send),
    ) -> Result<ChatTurn, LlmError>;
}

/// Which server and model to use.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    pub provider: Provider,
    /// Ollama: the host (`OLLAMA_HOST` forms); OpenAI: the base URL.
    pub base_url: String,
    pub model: String,
    /// Sent as a bearer token (OpenAI-compatible servers).
    pub api_key: Option<String>,
}

/// Builds the client for `cfg`.
pub fn client(cfg: &LlmConfig) -> Box<dyn LlmClient> {
    match cfg.provider {
        Provider::Ollama => Box::new(OllamaClient::new(&cfg.base_url).with_model(&cfg.model)),
        Provider::OpenAi => Box::new(OpenAiClient::new(&cfg.base_url, &cfg.model, cfg.api_key.clone())),
    }
}

/// Splits a byte stream into lines (`\n`, an optional `\r` dropped).
#[derive(Default)]
pub(crate) struct LineBuffer {
    buf: Vec<u8>,
}

impl LineBuffer {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line, if any.
    pub(crate) fn next_line(&mut self) -> Option<String> {
        let pos = self.buf.iter().position(|&b| b == b'\n')?;
        let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Some(String::from_utf8_lossy(&line).into_owned())
    }

    /// What is left once the stream ended (a last line without newline).
    pub(crate) fn rest(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        let s = String::from_utf8_lossy(&rest).trim().to_string();
        (!s.is_empty()).then_some(s)
    }
}

pub(crate) fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks() {
        let mut b = LineBuffer::default();
        b.push(b"{\"a\":1}\r\n{\"b\"");
        assert_eq!(b.next_line().as_deref(), Some("{\"a\":1}"));
        assert_eq!(b.next_line(), None);
        b.push(b":2}\n\n");
        assert_eq!(b.next_line().as_deref(), Some("{\"b\":2}"));
        assert_eq!(b.next_line().as_deref(), Some(""));
        b.push(b"tail");
        assert_eq!(b.rest().as_deref(), Some("tail"));
    }

    #[test]
    fn arguments_are_checked() {
        let call = |a: &str| ToolCall {
            id: "1".into(),
            name: "x".into(),
            arguments: a.into(),
        };
        assert!(call("{\"a\": 1}").arguments_object().is_ok());
        assert!(call("").arguments_object().expect("empty").is_empty());
        assert!(call("[1]")
            .arguments_object()
            .unwrap_err()
            .contains("JSON object"));
        assert!(call("{\"a\": ")
            .arguments_object()
            .unwrap_err()
            .contains("not valid JSON"));
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = LlmError::ModelMissing {
            provider: Provider::Ollama,
            model: "qwen3".into(),
            url: "http://h".into(),
            message: "model \"qwen3\" not found, try pulling it first".into(),
        };
        assert!(e.to_string().contains("ollama pull qwen3"), "{e}");
        let e = LlmError::Unreachable {
            provider: Provider::OpenAi,
            url: "http://h/v1".into(),
            reason: "connection refused".into(),
        };
        assert!(e.to_string().contains("--base-url"), "{e}");
    }
}
