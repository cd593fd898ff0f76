//! Ollama's HTTP API (<https://github.com/ollama/ollama/blob/main/docs/api.md>):
//! `/api/chat` streamed as NDJSON with native tool calls, and `/api/generate`.

use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use super::LlmError;
use super::{
    http_client, root_cause, ChatMessage, ChatRequest, ChatTurn, LineBuffer, LlmClient, Provider, Role,
    ToolCall, ToolSpec, DEFAULT_MODEL, STREAM_IDLE_TIMEOUT,
};

pub const DEFAULT_OLLAMA_HOST: &str = "http://localhost:11434";

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
    model: String,
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

// ---- /api/chat wire format ----

#[derive(Serialize)]
struct WireChatRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    stream: bool,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: Role,
    content: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_name: Option<&'a str>,
}

#[derive(Serialize)]
struct WireToolCall<'a> {
    function: WireFunctionCall<'a>,
}

#[derive(Serialize)]
struct WireFunctionCall<'a> {
    name: &'a str,
    /// Ollama takes the arguments as a JSON object.
    arguments: Value,
}

#[derive(Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: &'a ToolSpec,
}

#[derive(Deserialize)]
struct ChatChunk {
    #[serde(default)]
    message: Option<ChunkMessage>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    load_duration: Option<u64>,
    #[serde(default)]
    prompt_eval_count: Option<u64>,
    #[serde(default)]
    eval_count: Option<u64>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct ChunkMessage {
    #[serde(default)]
    content: String,
    #[serde(default)]
    tool_calls: Vec<ChunkToolCall>,
}

#[derive(Deserialize)]
struct ChunkToolCall {
    #[serde(default)]
    id: Option<String>,
    function: ChunkFunction,
}

#[derive(Deserialize)]
struct ChunkFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

fn wire_message(m: &ChatMessage) -> WireMessage<'_> {
    WireMessage {
        role: m.role,
        content: &m.content,
        tool_calls: m
            .tool_calls
            .iter()
            .map(|c| WireToolCall {
                function: WireFunctionCall {
                    name: &c.name,
                    // Malformed arguments cannot be sent back as an object.
                    arguments: match serde_json::from_str::<Value>(&c.arguments) {
                        Ok(v @ Value::Object(_)) => v,
                        _ => Value::Object(Default::default()),
                    },
                },
            })
            .collect(),
        tool_name: if m.role == Role::Tool {
            m.tool_name.as_deref()
        } else {
            None
        },
    }
}

impl OllamaClient {
    pub fn new(host: &str) -> Self {
        Self {
            base: normalize_host(host),
            model: DEFAULT_MODEL.to_string(),
            http: http_client(),
        }
    }

    /// The model [`LlmClient::chat`] uses.
    pub fn with_model(mut self, model: &str) -> Self {
        self.model = model.to_string();
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, e: &reqwest::Error) -> LlmError {
        LlmError::Unreachable {
            provider: Provider::Ollama,
            url: self.base.clone(),
            reason: root_cause(e),
        }
    }

    fn protocol(&self, reason: impl Into<String>) -> LlmError {
        LlmError::Protocol {
            provider: Provider::Ollama,
            url: self.base.clone(),
            reason: reason.into(),
        }
    }

    /// The error for a non-2xx answer.
    fn status_error(&self, model: &str, status: u16, body: &[u8]) -> LlmError {
        let parsed = serde_json::from_slice::<ErrorBody>(body).ok();
        // Ollama's words: `model "x" not found, try pulling it first` (404). A
        // plain-text 404 is a wrong URL, not a missing model.
        if let Some(b) = &parsed {
            if status == 404 && b.error.contains("not found") && b.error.contains("model") {
                return LlmError::ModelMissing {
                    provider: Provider::Ollama,
                    model: model.to_string(),
                    url: self.base.clone(),
                    message: b.error.clone(),
                };
            }
        }
        LlmError::Server {
            provider: Provider::Ollama,
            url: self.base.clone(),
            status,
            message: parsed
                .map(|b| b.error)
                .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string()),
        }
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
            .map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| self.protocol(e.to_string()))?;
        if !status.is_success() {
            return Err(self.status_error(model, status.as_u16(), &body));
        }
        serde_json::from_slice(&body).map_err(|e| self.protocol(e.to_string()))
    }

    /// Folds one NDJSON line into `turn`; true once the server said `done`.
    fn absorb(
        &self,
        line: &str,
        turn: &mut ChatTurn,
        on_text: &mut (dyn for<'s> FnMut(&'s str) + Send),
    ) -> Result<bool, LlmError> {
        if line.trim().is_empty() {
            return Ok(false);
        }
        let chunk: ChatChunk = serde_json::from_str(line)
            .map_err(|e| self.protocol(format!("bad stream line ({e}): {}", clip(line))))?;
        if let Some(error) = chunk.error {
            return Err(LlmError::Server {
                provider: Provider::Ollama,
                url: self.base.clone(),
                status: 200,
                message: error,
            });
        }
        if let Some(m) = chunk.message {
            if !m.content.is_empty() {
                on_text(&m.content);
                turn.content.push_str(&m.content);
            }
            for c in m.tool_calls {
                let n = turn.tool_calls.len() + 1;
                turn.tool_calls.push(ToolCall {
                    id: c
                        .id
                        .filter(|i| !i.is_empty())
                        .unwrap_or_else(|| format!("call_{n}")),
                    name: c.function.name,
                    arguments: match c.function.arguments {
                        Value::String(s) => s,
                        Value::Null => "{}".to_string(),
                        v => v.to_string(),
                    },
                });
            }
        }
        if chunk.done {
            turn.finish_reason = chunk.done_reason;
            turn.model_load = chunk.load_duration.map(Duration::from_nanos);
            turn.prompt_tokens = chunk.prompt_eval_count;
            turn.completion_tokens = chunk.eval_count;
        }
        Ok(chunk.done)
    }
}

fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    out
}

#[async_trait::async_trait]
impl LlmClient for OllamaClient {
    fn provider(&self) -> Provider {
        Provider::Ollama
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn base_url(&self) -> &str {
        &self.base
    }

    /// `POST /api/chat` with `stream: true`: one JSON object per line, text in
    /// `message.content`, tool calls in `message.tool_calls`, statistics in the
    /// last object (`done: true`).
    async fn chat(
        &self,
        req: ChatRequest<'_>,
        on_text: &mut (dyn for<'s> FnMut(&'s str) + Send),
    ) -> Result<ChatTurn, LlmError> {
        let body = WireChatRequest {
            model: &self.model,
            messages: req.messages.iter().map(wire_message).collect(),
            tools: req
                .tools
                .iter()
                .map(|t| WireTool {
                    kind: "function",
                    function: t,
                })
                .collect(),
            stream: true,
        };
        let mut http = self.http.post(format!("{}/api/chat", self.base)).json(&body);
        if let Some(t) = req.trace_id {
            http = http.header("x-trace-id", t);
        }
        let resp = http.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(self.status_error(&self.model, status.as_u16(), &body));
        }
        let mut stream = resp.bytes_stream();
        let mut lines = LineBuffer::default();
        let mut turn = ChatTurn::default();
        loop {
            let next = tokio::time::timeout(STREAM_IDLE_TIMEOUT, stream.next())
                .await
                .map_err(|_| {
                    self.protocol(format!(
                        "no data for {STREAM_IDLE_TIMEOUT:?} in the middle of an answer"
                    ))
                })?;
            match next {
                Some(Ok(bytes)) => {
                    lines.push(&bytes);
                    while let Some(line) = lines.next_line() {
                        if self.absorb(&line, &mut turn, on_text)? {
                            return Ok(turn);
                        }
                    }
                }
                Some(Err(e)) => {
                    return Err(self.protocol(format!("the stream broke off: {}", root_cause(&e))));
                }
                None => {
                    if let Some(line) = lines.rest() {
                        if self.absorb(&line, &mut turn, on_text)? {
                            return Ok(turn);
                        }
                    }
                    return Err(self.protocol("the stream ended before the final (done) message"));
                }
            }
        }
    }
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

    #[test]
    fn stream_lines_build_a_turn() {
        let c = OllamaClient::new("h");
        let mut turn = ChatTurn::default();
        let mut seen = Vec::new();
        let mut on = |t: &str| seen.push(t.to_string());
        let lines = [
            r#"{"model":"qwen3","created_at":"2025-05-27T22:54:57.641643Z","message":{"role":"assistant","content":"Let me"},"done":false}"#,
            r#"{"model":"qwen3","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"execute_code","arguments":{"language":"python","code":"print(1)"}}}]},"done":false}"#,
            r#"{"model":"qwen3","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"total_duration":885095291,"load_duration":3753500,"prompt_eval_count":122,"eval_count":33}"#,
        ];
        let done: Vec<bool> = lines
            .iter()
            .map(|l| c.absorb(l, &mut turn, &mut on).expect("valid"))
            .collect();
        assert_eq!(done, [false, false, true]);
        assert_eq!(turn.tool_calls[0].name, "execute_code");
        assert_eq!(
            turn.tool_calls[0].arguments_object().expect("object")["code"],
            "print(1)"
        );
        assert_eq!(turn.model_load, Some(Duration::from_nanos(3_753_500)));
        assert_eq!(turn.completion_tokens, Some(33));
        let e = c
            .absorb(r#"{"error":"out of memory"}"#, &mut turn, &mut on)
            .unwrap_err();
        assert!(e.to_string().contains("out of memory"), "{e}");
        assert_eq!(seen, ["Let me"]);
    }

    #[test]
    fn a_missing_model_is_told_apart_from_a_wrong_url() {
        let c = OllamaClient::new("h");
        let e = c.status_error(
            "qwen3",
            404,
            br#"{"error":"model \"qwen3\" not found, try pulling it first"}"#,
        );
        assert!(matches!(e, LlmError::ModelMissing { .. }), "{e}");
        let e = c.status_error("qwen3", 404, b"404 page not found");
        assert!(matches!(e, LlmError::Server { status: 404, .. }), "{e}");
    }
}
