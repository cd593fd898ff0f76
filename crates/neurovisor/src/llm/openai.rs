//! OpenAI-compatible chat completions (`POST {base}/chat/completions`, e.g.
//! `https://api.openai.com/v1`, vLLM, llama.cpp's server, Ollama's `/v1`),
//! streamed as server-sent events: `data: {chunk}` lines, text in
//! `choices[0].delta.content`, tool calls in `choices[0].delta.tool_calls[]`
//! (the `id` and name first, the arguments as string fragments, joined by
//! `index`), and `data: [DONE]` at the end.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    http_client, root_cause, ChatMessage, ChatRequest, ChatTurn, LineBuffer, LlmClient, LlmError, Provider,
    Role, ToolCall, ToolSpec, STREAM_IDLE_TIMEOUT,
};

pub const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// A base URL without a path gets `/v1` (`http://localhost:8000` ->
/// `http://localhost:8000/v1`); one with a path is taken as is.
pub fn normalize_base_url(raw: &str) -> String {
    let raw = raw.trim().trim_end_matches('/');
    if raw.is_empty() {
        return DEFAULT_OPENAI_BASE_URL.to_string();
    }
    let with_scheme = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("http://{raw}")
    };
    let after_scheme = with_scheme.split_once("://").map(|(_, r)| r).unwrap_or("");
    if after_scheme.contains('/') {
        with_scheme
    } else {
        format!("{with_scheme}/v1")
    }
}

#[derive(Clone)]
pub struct OpenAiClient {
    base: String,
    model: String,
    api_key: Option<String>,
    http: reqwest::Client,
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    stream: bool,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<Delta>,
    /// Non-streamed answers (a server that ignored `stream: true`).
    #[serde(default)]
    message: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<DeltaToolCall>,
}

#[derive(Deserialize)]
struct DeltaToolCall {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<DeltaFunction>,
}

#[derive(Deserialize)]
struct DeltaFunction {
    #[serde(default)]
    name: Option<String>,
    /// A fragment of the arguments' JSON text (the whole text when not streamed).
    #[serde(default)]
    arguments: Option<Value>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: Option<Value>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ApiErrorOrText,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ApiErrorOrText {
    Structured(ApiError),
    Text(String),
}

/// Tool calls under assembly, by `index`.
#[derive(Default)]
struct Partial {
    id: String,
    name: String,
    arguments: String,
}

fn wire_message(m: &ChatMessage) -> Value {
    match m.role {
        Role::Tool => json!({
            "role": "tool",
            "tool_call_id": m.tool_call_id.as_deref().unwrap_or_default(),
            "content": m.content,
        }),
        Role::Assistant if !m.tool_calls.is_empty() => json!({
            "role": "assistant",
            "content": if m.content.is_empty() { Value::Null } else { Value::String(m.content.clone()) },
            "tool_calls": m.tool_calls.iter().map(|c| json!({
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })).collect::<Vec<_>>(),
        }),
        role => json!({"role": role, "content": m.content}),
    }
}

fn wire_tool(t: &ToolSpec) -> Value {
    json!({"type": "function", "function": t})
}

impl OpenAiClient {
    pub fn new(base_url: &str, model: &str, api_key: Option<String>) -> Self {
        Self {
            base: normalize_base_url(base_url),
            model: model.to_string(),
            api_key: api_key.filter(|k| !k.trim().is_empty()),
            http: http_client(),
        }
    }

    fn protocol(&self, reason: impl Into<String>) -> LlmError {
        LlmError::Protocol {
            provider: Provider::OpenAi,
            url: self.base.clone(),
            reason: reason.into(),
        }
    }

    /// The error for a non-2xx answer (`{"error": {"message", "type", "code"}}`).
    fn status_error(&self, status: u16, body: &[u8]) -> LlmError {
        let (message, code) = match serde_json::from_slice::<ErrorBody>(body).map(|b| b.error) {
            Ok(ApiErrorOrText::Structured(e)) => (
                e.message,
                e.code.map(|c| match c {
                    Value::String(s) => s,
                    other => other.to_string(),
                }),
            ),
            Ok(ApiErrorOrText::Text(t)) => (t, None),
            Err(_) => (String::from_utf8_lossy(body).trim().to_string(), None),
        };
        let model_missing = code.as_deref() == Some("model_not_found")
            || (status == 404 && message.to_lowercase().contains("model"));
        if model_missing {
            return LlmError::ModelMissing {
                provider: Provider::OpenAi,
                model: self.model.clone(),
                url: self.base.clone(),
                message,
            };
        }
        let message = if status == 401 && self.api_key.is_none() {
            format!("{message} (no API key was sent: set OPENAI_API_KEY)")
        } else {
            message
        };
        LlmError::Server {
            provider: Provider::OpenAi,
            url: self.base.clone(),
            status,
            message,
        }
    }

    /// Folds one chunk into the turn.
    fn absorb(
        &self,
        chunk: Chunk,
        turn: &mut ChatTurn,
        partial: &mut BTreeMap<u64, Partial>,
        on_text: &mut (dyn for<'s> FnMut(&'s str) + Send),
    ) -> Result<(), LlmError> {
        if let Some(e) = chunk.error {
            return Err(LlmError::Server {
                provider: Provider::OpenAi,
                url: self.base.clone(),
                status: 200,
                message: e.message,
            });
        }
        if let Some(u) = chunk.usage {
            turn.prompt_tokens = u.prompt_tokens;
            turn.completion_tokens = u.completion_tokens;
        }
        let Some(choice) = chunk.choices.into_iter().next() else {
            return Ok(());
        };
        if let Some(r) = choice.finish_reason {
            turn.finish_reason = Some(r);
        }
        let Some(delta) = choice.delta.or(choice.message) else {
            return Ok(());
        };
        if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
            on_text(&text);
            turn.content.push_str(&text);
        }
        for (pos, tc) in delta.tool_calls.into_iter().enumerate() {
            let p = partial.entry(tc.index.unwrap_or(pos as u64)).or_default();
            if let Some(id) = tc.id.filter(|i| !i.is_empty()) {
                p.id = id;
            }
            if let Some(f) = tc.function {
                if let Some(n) = f.name {
                    p.name.push_str(&n);
                }
                match f.arguments {
                    Some(Value::String(s)) => p.arguments.push_str(&s),
                    Some(Value::Null) | None => {}
                    Some(v) => p.arguments.push_str(&v.to_string()),
                }
            }
        }
        Ok(())
    }

    fn finish(turn: &mut ChatTurn, partial: BTreeMap<u64, Partial>) {
        for (i, p) in partial.into_values().enumerate() {
            turn.tool_calls.push(ToolCall {
                id: if p.id.is_empty() {
                    format!("call_{}", i + 1)
                } else {
                    p.id
                },
                name: p.name,
                arguments: p.arguments,
            });
        }
    }
}

/// One server-sent event's data, or the end.
enum Sse {
    Data(String),
    Done,
}

/// Collects `data:` lines into events (an empty line ends an event).
#[derive(Default)]
struct SseParser {
    data: Vec<String>,
}

impl SseParser {
    fn line(&mut self, line: &str) -> Option<Sse> {
        if line.is_empty() {
            return self.flush();
        }
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            if rest.trim() == "[DONE]" {
                return Some(Sse::Done);
            }
            self.data.push(rest.to_string());
        }
        // `event:`, `id:`, `retry:` and `:` comments carry nothing we need.
        None
    }

    fn flush(&mut self) -> Option<Sse> {
        if self.data.is_empty() {
            return None;
        }
        let joined = self.data.join("\n");
        self.data.clear();
        Some(Sse::Data(joined))
    }
}

#[async_trait::async_trait]
impl LlmClient for OpenAiClient {
    fn provider(&self) -> Provider {
        Provider::OpenAi
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn base_url(&self) -> &str {
        &self.base
    }

    async fn chat(
        &self,
        req: ChatRequest<'_>,
        on_text: &mut (dyn for<'s> FnMut(&'s str) + Send),
    ) -> Result<ChatTurn, LlmError> {
        let body = WireRequest {
            model: &self.model,
            messages: req.messages.iter().map(wire_message).collect(),
            tools: req.tools.iter().map(wire_tool).collect(),
            stream: true,
        };
        let mut http = self
            .http
            .post(format!("{}/chat/completions", self.base))
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&body);
        if let Some(k) = &self.api_key {
            http = http.bearer_auth(k);
        }
        if let Some(t) = req.trace_id {
            http = http.header("x-trace-id", t);
        }
        let resp = http.send().await.map_err(|e| LlmError::Unreachable {
            provider: Provider::OpenAi,
            url: self.base.clone(),
            reason: root_cause(&e),
        })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(self.status_error(status.as_u16(), &body));
        }
        let mut turn = ChatTurn::default();
        let mut partial = BTreeMap::new();
        let is_json = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if is_json {
            // Not streamed after all: one whole completion.
            let body = resp.bytes().await.map_err(|e| self.protocol(root_cause(&e)))?;
            let chunk: Chunk = serde_json::from_slice(&body).map_err(|e| self.protocol(e.to_string()))?;
            self.absorb(chunk, &mut turn, &mut partial, on_text)?;
            Self::finish(&mut turn, partial);
            return Ok(turn);
        }
        let mut stream = resp.bytes_stream();
        let mut lines = LineBuffer::default();
        let mut sse = SseParser::default();
        let mut saw_data = false;
        let mut handle = |ev: Sse, turn: &mut ChatTurn, partial: &mut BTreeMap<u64, Partial>| match ev {
            Sse::Done => Ok(true),
            Sse::Data(d) => {
                let chunk: Chunk = serde_json::from_str(&d).map_err(|e| {
                    self.protocol(format!(
                        "bad event ({e}): {}",
                        d.chars().take(200).collect::<String>()
                    ))
                })?;
                self.absorb(chunk, turn, partial, on_text).map(|_| false)
            }
        };
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
                        if let Some(ev) = sse.line(&line) {
                            saw_data = true;
                            if handle(ev, &mut turn, &mut partial)? {
                                Self::finish(&mut turn, partial);
                                return Ok(turn);
                            }
                        }
                    }
                }
                Some(Err(e)) => {
                    return Err(self.protocol(format!("the stream broke off: {}", root_cause(&e))));
                }
                None => {
                    let mut done = false;
                    let last = lines.rest().and_then(|l| sse.line(&l));
                    for ev in [last, sse.flush()].into_iter().flatten() {
                        saw_data = true;
                        done |= handle(ev, &mut turn, &mut partial)?;
                    }
                    // Some servers close without `[DONE]`; a finished choice is enough.
                    if done || (saw_data && turn.finish_reason.is_some()) {
                        Self::finish(&mut turn, partial);
                        return Ok(turn);
                    }
                    return Err(self.protocol("the stream ended before `data: [DONE]`"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(normalize_base_url(""), DEFAULT_OPENAI_BASE_URL);
        assert_eq!(
            normalize_base_url("http://127.0.0.1:8000"),
            "http://127.0.0.1:8000/v1"
        );
        assert_eq!(normalize_base_url("localhost:8000/"), "http://localhost:8000/v1");
        assert_eq!(normalize_base_url("https://x.ai/api/v1/"), "https://x.ai/api/v1");
    }

    #[test]
    fn fragments_become_whole_tool_calls() {
        let c = OpenAiClient::new("http://h", "m", None);
        let mut turn = ChatTurn::default();
        let mut partial = BTreeMap::new();
        let mut text = String::new();
        let mut on = |t: &str| text.push_str(t);
        let mut sse = SseParser::default();
        let stream = concat!(
            "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Ok\"},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_a\",\"type\":\"function\",\"function\":{\"name\":\"execute_code\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
            ": keep-alive\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"language\\\": \\\"py\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"thon\\\"}\"}}]},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        let mut done = false;
        for line in stream.lines() {
            match sse.line(line) {
                Some(Sse::Data(d)) => {
                    let chunk: Chunk = serde_json::from_str(&d).expect("chunk");
                    c.absorb(chunk, &mut turn, &mut partial, &mut on).expect("absorb");
                }
                Some(Sse::Done) => done = true,
                None => {}
            }
        }
        assert!(done);
        OpenAiClient::finish(&mut turn, partial);
        assert_eq!(text, "Ok");
        assert_eq!(turn.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(turn.tool_calls.len(), 1);
        assert_eq!(turn.tool_calls[0].id, "call_a");
        assert_eq!(turn.tool_calls[0].arguments, "{\"language\": \"python\"}");
    }

    #[test]
    fn error_shapes() {
        let c = OpenAiClient::new("http://h", "gpt-x", None);
        let e = c.status_error(
            404,
            br#"{"error":{"message":"The model `gpt-x` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
        );
        assert!(matches!(e, LlmError::ModelMissing { .. }), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = c.status_error(401, br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#);
        assert!(e.to_string().contains("OPENAI_API_KEY"), "{e}");
        let e = c.status_error(500, b"upstream exploded");
        assert!(e.to_string().contains("500: upstream exploded"), "{e}");
    }

    #[test]
    fn history_in_the_wire_format() {
        let call = ToolCall {
            id: "call_a".into(),
            name: "execute_code".into(),
            arguments: "{\"language\":\"python\",\"code\":\"print(1)\"}".into(),
        };
        let a = wire_message(&ChatMessage::assistant("", vec![call.clone()]));
        assert_eq!(a["content"], Value::Null);
        assert_eq!(a["tool_calls"][0]["function"]["arguments"], call.arguments);
        let t = wire_message(&ChatMessage::tool(&call, "{\"exit_code\":0}"));
        assert_eq!(
            t,
            json!({"role":"tool","tool_call_id":"call_a","content":"{\"exit_code\":0}"})
        );
    }
}
