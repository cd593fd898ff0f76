//! Tool calls written in the model's text, for models without native tool
//! calling: `<tool_call>{...}</tool_call>` (Hermes/Qwen style), a fenced
//! ```` ```json ```` block, or a bare JSON object, each of the form
//! `{"name": "execute_code", "arguments": {...}}` (also `"parameters"`, or
//! wrapped as `{"function": {...}}`).

use serde::Serialize;
use serde_json::Value;

/// Where a tool call came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallSource {
    /// The provider's native tool calling.
    Native,
    /// `<tool_call>...</tool_call>` in the text.
    Xml,
    /// A JSON object in the text (fenced or bare).
    Json,
}

/// A call found in text. `error` is set when the text clearly tried to call a
/// tool but could not be read; the model is told so.
#[derive(Debug, Clone, PartialEq)]
pub struct TextCall {
    pub name: String,
    pub arguments: String,
    pub source: CallSource,
    pub error: Option<String>,
}

/// Removes `<think>...</think>` blocks (reasoning models put them in the text).
pub fn strip_think(text: &str) -> String {
    const OPEN: &str = "<think>";
    const CLOSE: &str = "</think>";
    // Only a closing tag: the opening one was left out (some templates do).
    let text = match (text.find(OPEN), text.find(CLOSE)) {
        (None, Some(end)) => &text[end + CLOSE.len()..],
        _ => text,
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        rest = match rest[start..].find(CLOSE) {
            Some(end) => &rest[start + end + CLOSE.len()..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// `{"name", "arguments"|"parameters"}` or `{"function": {...}}` -> (name, arguments JSON text).
fn call_of(v: &Value) -> Option<(String, String)> {
    let obj = v.as_object()?;
    if let Some(f) = obj.get("function").filter(|f| f.is_object()) {
        if !obj.contains_key("name") {
            return call_of(f);
        }
    }
    let name = obj.get("name")?.as_str()?.to_string();
    let args = match obj.get("arguments").or_else(|| obj.get("parameters")) {
        None | Some(Value::Null) => "{}".to_string(),
        // Some models write the arguments as a JSON string (OpenAI style).
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some((name, args))
}

fn strip_fence(s: &str) -> &str {
    let t = s.trim();
    let Some(inner) = t.strip_prefix("```") else {
        return t;
    };
    let inner = inner.strip_suffix("```").unwrap_or(inner);
    // Drop the info string (`json`) on the opening line.
    match inner.find('\n') {
        Some(i) if !inner[..i].contains('{') => inner[i + 1..].trim(),
        _ => inner.trim(),
    }
}

fn xml_calls(text: &str, known: &[&str]) -> Vec<TextCall> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let body_start = &rest[start + OPEN.len()..];
        let (body, next) = match body_start.find(CLOSE) {
            Some(end) => (&body_start[..end], &body_start[end + CLOSE.len()..]),
            None => (body_start, ""),
        };
        rest = next;
        let body = strip_fence(body);
        let parsed = serde_json::from_str::<Value>(body);
        match parsed.as_ref().ok().and_then(call_of) {
            Some((name, arguments)) => calls.push(TextCall {
                name,
                arguments,
                source: CallSource::Xml,
                error: None,
            }),
            None => {
                let why = match parsed {
                    Err(e) => format!("its content is not valid JSON ({e})"),
                    Ok(_) => "it has no \"name\"".to_string(),
                };
                calls.push(TextCall {
                    name: known
                        .iter()
                        .find(|k| body.contains(*k))
                        .map(|k| k.to_string())
                        .unwrap_or_default(),
                    arguments: body.to_string(),
                    source: CallSource::Xml,
                    error: Some(format!(
                        "could not read the <tool_call> block: {why}; write <tool_call>{{\"name\": \"execute_code\", \"arguments\": {{\"language\": \"python\", \"code\": \"...\"}}}}</tool_call>"
                    )),
                });
            }
        }
    }
    calls
}

/// JSON objects naming a known tool, fenced or bare, in order.
fn json_calls(text: &str, known: &[&str]) -> Vec<TextCall> {
    let mut calls = Vec::new();
    let mut i = 0;
    let bytes = text.as_bytes();
    while i < bytes.len() {
        if bytes[i] != b'{' {
            i += 1;
            continue;
        }
        let mut values = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
        match values.next() {
            Some(Ok(v)) => {
                let consumed = values.byte_offset();
                match call_of(&v) {
                    Some((name, arguments)) if known.contains(&name.as_str()) => {
                        calls.push(TextCall {
                            name,
                            arguments,
                            source: CallSource::Json,
                            error: None,
                        });
                        i += consumed.max(1);
                    }
                    // Some other JSON: look inside it too (a wrapper object).
                    _ => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    if calls.is_empty() {
        // A fenced block that names a tool but is not valid JSON: tell the model.
        for block in text.split("```").skip(1).step_by(2) {
            let body = strip_fence(&format!("```{block}```")).to_string();
            let names_tool = body.contains("\"name\"") && known.iter().any(|k| body.contains(k));
            if names_tool && serde_json::from_str::<Value>(&body).is_err() {
                let err = serde_json::from_str::<Value>(&body)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                calls.push(TextCall {
                    name: known
                        .iter()
                        .find(|k| body.contains(*k))
                        .map(|k| k.to_string())
                        .unwrap_or_default(),
                    arguments: body,
                    source: CallSource::Json,
                    error: Some(format!("the tool call is not valid JSON ({err})")),
                });
            }
        }
    }
    calls
}

/// The tool calls written in `text` (after `<think>` blocks are removed).
/// XML-tagged calls win; otherwise JSON objects naming one of `known`.
pub fn parse_text_calls(text: &str, known: &[&str]) -> Vec<TextCall> {
    let text = strip_think(text);
    let xml = xml_calls(&text, known);
    if !xml.is_empty() {
        return xml;
    }
    json_calls(&text, known)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["execute_code", "list_languages"];

    fn args(c: &TextCall) -> Value {
        serde_json::from_str(&c.arguments).expect("json arguments")
    }

    #[test]
    fn xml_calls_are_found() {
        let t = "I'll run it.\n<tool_call>\n{\"name\": \"execute_code\", \"arguments\": {\"language\": \"python\", \"code\": \"print(1)\"}}\n</tool_call>";
        let c = parse_text_calls(t, KNOWN);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].name.as_str(), c[0].source),
            ("execute_code", CallSource::Xml)
        );
        assert_eq!(args(&c[0])["code"], "print(1)");
        assert!(c[0].error.is_none());
    }

    #[test]
    fn fenced_and_bare_json_calls_are_found() {
        let t = "Let me check:\n```json\n{\"name\": \"execute_code\", \"arguments\": {\"language\": \"bash\", \"code\": \"echo {hi}\"}}\n```\nthen\n{\"function\": {\"name\": \"list_languages\", \"parameters\": {}}}";
        let c = parse_text_calls(t, KNOWN);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(args(&c[0])["code"], "echo {hi}");
        assert_eq!(c[1].name, "list_languages");
        assert!(c.iter().all(|c| c.source == CallSource::Json));
        // Arguments as a JSON string (OpenAI style) are unwrapped.
        let c = parse_text_calls(
            r#"{"name": "execute_code", "arguments": "{\"language\": \"python\", \"code\": \"1\"}"}"#,
            KNOWN,
        );
        assert_eq!(args(&c[0])["language"], "python");
    }

    #[test]
    fn plain_answers_and_foreign_json_are_not_calls() {
        assert!(parse_text_calls("The primes are 2, 3, 5.", KNOWN).is_empty());
        assert!(parse_text_calls("Result: {\"primes\": [2, 3]}", KNOWN).is_empty());
        assert!(parse_text_calls("{\"name\": \"rm_rf\", \"arguments\": {}}", KNOWN).is_empty());
        // A call the model only thought about is not a call.
        assert!(parse_text_calls(
            "<think>maybe {\"name\": \"execute_code\", \"arguments\": {}}</think>Done: 42",
            KNOWN
        )
        .is_empty());
    }

    #[test]
    fn unreadable_calls_become_errors_for_the_model() {
        let c = parse_text_calls(
            "<tool_call>{\"name\": \"execute_code\", \"arguments\": {</tool_call>",
            KNOWN,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].name, "execute_code");
        assert!(
            c[0].error.as_deref().unwrap_or("").contains("not valid JSON"),
            "{c:?}"
        );
        let c = parse_text_calls(
            "```json\n{\"name\": \"execute_code\", \"arguments\": {\"code\": }\n```",
            KNOWN,
        );
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].error.is_some());
    }

    #[test]
    fn think_blocks_are_removed() {
        assert_eq!(strip_think("<think>hm</think>Answer"), "Answer");
        assert_eq!(strip_think("a<think>x</think>b<think>y"), "ab");
        assert_eq!(strip_think("plain"), "plain");
        assert_eq!(strip_think("reasoning</think>\n\nAnswer"), "\n\nAnswer");
    }
}
