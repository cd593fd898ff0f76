//! Agent mode end to end. No model can run on these machines, so each test
//! scripts the model's turns on a test LLM server that speaks the real wire
//! formats over real HTTP: Ollama's `/api/chat` (NDJSON stream, `tool_calls`
//! with object arguments, final `done: true` object with `load_duration`...) and
//! OpenAI's `/v1/chat/completions` (SSE `data:` chunks, tool-call fragments by
//! `index`, `data: [DONE]`). The server records every request, so tests check
//! what went back to the model. Executions run in real VMs, and each test
//! checks that none is left behind.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use common::assert_no_leftovers;
use common::daemon::Daemon;
use neurovisor::agent::{
    AgentConfig, AgentController, AgentError, AgentEvent, AgentOutcome, AgentReport, CallSource,
    SandboxExecutor, StopReason, ToolErrorKind,
};
use neurovisor::llm::{LlmClient, LlmError, OllamaClient, OpenAiClient};
use neurovisor::vmm::qemu::QemuOptions;
use neurovisor::vmm::QemuBackend;
use neurovisor::{Sandbox, VmSize};
use neurovisor_proto::v1::agent_client::AgentClient;
use neurovisor_proto::v1::agent_event::Event as PbEvent;
use neurovisor_proto::v1::RunTaskRequest;
use serde_json::{json, Value};

// ---------------------------------------------------------------- test LLM server

#[derive(Clone)]
enum Step {
    /// Bytes sent as one piece.
    Send(String),
    Sleep(Duration),
}

#[derive(Clone)]
enum Reply {
    Stream {
        content_type: &'static str,
        steps: Vec<Step>,
    },
    Status(u16, Value),
}

#[derive(Clone, Debug)]
struct Recorded {
    path: String,
    headers: HeaderMap,
    body: Value,
}

#[derive(Default)]
struct Script {
    replies: VecDeque<Reply>,
    /// Keep answering with the last reply (a model that never stops).
    repeat_last: bool,
    requests: Vec<Recorded>,
}

#[derive(Clone)]
struct TestLlm {
    url: String,
    script: Arc<Mutex<Script>>,
}

async fn serve_reply(
    State(script): State<Arc<Mutex<Script>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = {
        let mut s = script.lock().expect("script");
        s.requests.push(Recorded {
            path: uri.path().to_string(),
            headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        if s.repeat_last && s.replies.len() == 1 {
            s.replies.front().cloned()
        } else {
            s.replies.pop_front()
        }
    };
    let Some(reply) = reply else {
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from("{\"error\":\"the test script has no more turns\"}"))
            .expect("response");
    };
    match reply {
        Reply::Status(code, body) => Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("response"),
        Reply::Stream { content_type, steps } => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(16);
            tokio::spawn(async move {
                for step in steps {
                    match step {
                        Step::Send(s) => {
                            if tx.send(Ok(Bytes::from(s))).await.is_err() {
                                return;
                            }
                        }
                        Step::Sleep(d) => tokio::time::sleep(d).await,
                    }
                }
            });
            Response::builder()
                .status(200)
                .header("content-type", content_type)
                .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
                .expect("response")
        }
    }
}

impl TestLlm {
    async fn start(replies: Vec<Reply>) -> Self {
        let script = Arc::new(Mutex::new(Script {
            replies: replies.into(),
            ..Default::default()
        }));
        let app = axum::Router::new()
            .route("/api/chat", axum::routing::post(serve_reply))
            .route("/v1/chat/completions", axum::routing::post(serve_reply))
            .with_state(script.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(l, app).await });
        Self {
            url: format!("http://{addr}"),
            script,
        }
    }

    fn repeat_last(&self) {
        self.script.lock().expect("script").repeat_last = true;
    }

    fn push(&self, replies: Vec<Reply>) {
        self.script.lock().expect("script").replies.extend(replies);
    }

    fn requests(&self) -> Vec<Recorded> {
        self.script.lock().expect("script").requests.clone()
    }

    fn ollama(&self, model: &str) -> Arc<dyn LlmClient> {
        Arc::new(OllamaClient::new(&self.url).with_model(model))
    }
}

// Ollama's /api/chat stream, shaped as in its API documentation.

fn ollama_line(v: Value) -> Step {
    Step::Send(format!("{v}\n"))
}

fn ollama_text(text: &str) -> Step {
    ollama_line(json!({
        "model": "qwen3", "created_at": "2025-05-27T22:54:57.641643Z",
        "message": {"role": "assistant", "content": text}, "done": false
    }))
}

fn ollama_call(name: &str, arguments: Value) -> Step {
    ollama_line(json!({
        "model": "qwen3", "created_at": "2025-05-27T22:54:58.100509Z",
        "message": {"role": "assistant", "content": "",
                    "tool_calls": [{"function": {"name": name, "arguments": arguments}}]},
        "done": false
    }))
}

fn ollama_done(load_ns: u64) -> Step {
    ollama_line(json!({
        "model": "qwen3", "created_at": "2025-05-27T22:54:58.200000Z",
        "message": {"role": "assistant", "content": ""},
        "done_reason": "stop", "done": true, "total_duration": 4_883_583_458u64,
        "load_duration": load_ns, "prompt_eval_count": 26, "prompt_eval_duration": 342_546_000u64,
        "eval_count": 282, "eval_duration": 4_535_599_000u64
    }))
}

fn ollama_stream(steps: Vec<Step>) -> Reply {
    Reply::Stream {
        content_type: "application/x-ndjson",
        steps,
    }
}

/// A turn with (optionally) some text and native tool calls.
fn ollama_turn(text: &str, calls: &[(&str, Value)]) -> Reply {
    let mut steps = Vec::new();
    // The text arrives in pieces, as a model streams it.
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    for chunk in words.chunks(3) {
        steps.push(ollama_text(&chunk.concat()));
    }
    for (name, args) in calls {
        steps.push(ollama_call(name, args.clone()));
    }
    steps.push(ollama_done(1_250_000_000));
    ollama_stream(steps)
}

fn exec_args(language: &str, code: &str) -> Value {
    json!({"language": language, "code": code})
}

// OpenAI's chat completion chunks (SSE).

fn sse(v: Value) -> Step {
    Step::Send(format!("data: {v}\n\n"))
}

fn openai_chunk(delta: Value, finish: Option<&str>) -> Step {
    sse(json!({
        "id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
        "model": "gpt-test", "system_fingerprint": "fp_44709d6fcb",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
    }))
}

fn openai_stream(steps: Vec<Step>) -> Reply {
    let mut steps = steps;
    steps.push(Step::Send("data: [DONE]\n\n".into()));
    Reply::Stream {
        content_type: "text/event-stream",
        steps,
    }
}

// ---------------------------------------------------------------- agent harness

struct Agent {
    state: tempfile::TempDir,
    controller: AgentController,
}

fn agent(llm: Arc<dyn LlmClient>, cfg: AgentConfig) -> Agent {
    let state = tempfile::Builder::new()
        .prefix("nvagent-")
        .tempdir()
        .expect("state dir");
    let backend = QemuBackend::new(&QemuOptions::default()).expect("qemu backend");
    let sandbox = Sandbox::new(
        Arc::new(backend),
        common::images("default"),
        state.path().to_path_buf(),
    );
    let executor = Arc::new(SandboxExecutor::new(sandbox, VmSize::Small));
    Agent {
        state,
        controller: AgentController::new(llm, executor, cfg),
    }
}

impl Agent {
    async fn run(&self, task: &str) -> (AgentReport, Vec<(Instant, AgentEvent)>) {
        let mut events = Vec::new();
        let mut sink = |e: &AgentEvent| events.push((Instant::now(), e.clone()));
        let report = self.controller.run(task, None, &mut sink).await;
        assert_no_leftovers(self.state.path());
        (report, events)
    }
}

fn kinds(events: &[(Instant, AgentEvent)]) -> Vec<&'static str> {
    let mut k: Vec<&'static str> = events
        .iter()
        .map(|(_, e)| match e {
            AgentEvent::Started { .. } => "started",
            AgentEvent::Iteration { .. } => "iteration",
            AgentEvent::TextDelta { .. } => "text",
            AgentEvent::ToolCall { .. } => "tool_call",
            AgentEvent::ToolResult { .. } => "tool_result",
            AgentEvent::Answer { .. } => "answer",
            AgentEvent::Stopped { .. } => "stopped",
            AgentEvent::Stats { .. } => "stats",
        })
        .collect();
    k.dedup();
    k
}

/// The JSON a tool message carried back to the model.
fn tool_message(req: &Recorded, nth: usize) -> Value {
    let tools: Vec<&Value> = req.body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["role"] == "tool")
        .collect();
    let content = tools
        .get(nth)
        .unwrap_or_else(|| panic!("no tool message {nth} in {}", req.body))["content"]
        .as_str()
        .expect("content");
    serde_json::from_str(content).expect("tool result JSON")
}

fn config() -> AgentConfig {
    AgentConfig {
        exec_timeout: Duration::from_secs(20),
        ..AgentConfig::default()
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tool_call_then_an_answer() {
    let code = "import os\nprint(sum(range(100)))\nprint(os.environ['NEUROVISOR_TRACE_ID'])";
    let llm = TestLlm::start(vec![
        ollama_turn("I'll compute it.", &[("execute_code", exec_args("python", code))]),
        ollama_turn("The sum is 4950.", &[]),
    ])
    .await;
    let a = agent(llm.ollama("qwen3"), config());
    let (report, events) = a.run("Sum the numbers below 100").await;

    assert_eq!(report.answer(), Some("The sum is 4950."), "{:?}", report.outcome);
    assert_eq!(
        kinds(&events),
        [
            "started",
            "iteration",
            "text",
            "tool_call",
            "tool_result",
            "iteration",
            "text",
            "answer",
            "stats"
        ]
    );
    let trace = &report.trace_id;
    assert_eq!(uuid::Uuid::parse_str(trace).expect("uuid").get_version_num(), 7);
    assert_eq!((report.stats.iterations, report.stats.tool_calls), (2, 1));
    assert_eq!(report.stats.model_load_ms, Some(2500.0), "two calls of 1250 ms");
    let result = &report.turns[0].tool_calls[0].result;
    assert_eq!(result.exit_code, Some(0));
    assert_eq!(
        result.stdout,
        format!("4950\n{trace}\n"),
        "the trace id reaches the guest"
    );
    assert!(result.boot_ms.is_some_and(|b| b > 0.0));

    let reqs = llm.requests();
    assert_eq!(reqs.len(), 2);
    let first = &reqs[0];
    assert_eq!(first.path, "/api/chat");
    assert_eq!(first.body["model"], "qwen3");
    assert_eq!(first.body["stream"], true);
    assert_eq!(first.headers["x-trace-id"], trace.as_str());
    let tools: Vec<&str> = first.body["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| {
            assert_eq!(t["type"], "function");
            t["function"]["name"].as_str().expect("name")
        })
        .collect();
    assert_eq!(tools, ["execute_code", "list_languages"]);
    assert_eq!(
        first.body["tools"][0]["function"]["parameters"]["required"],
        json!(["language", "code"])
    );
    let msgs = first.body["messages"].as_array().expect("messages");
    assert_eq!(
        (msgs[0]["role"].as_str(), msgs[1]["role"].as_str()),
        (Some("system"), Some("user"))
    );
    assert_eq!(msgs[1]["content"], "Sum the numbers below 100");

    // The second request carries the call and its result.
    let msgs = reqs[1].body["messages"].as_array().expect("messages");
    let call = &msgs[2];
    assert_eq!(call["role"], "assistant");
    assert_eq!(call["tool_calls"][0]["function"]["name"], "execute_code");
    assert_eq!(call["tool_calls"][0]["function"]["arguments"]["code"], code);
    assert_eq!(msgs[3]["role"], "tool");
    assert_eq!(msgs[3]["tool_name"], "execute_code");
    let r = tool_message(&reqs[1], 0);
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["stdout"], format!("4950\n{trace}\n"));
    assert_eq!(r["stderr"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_program_is_fixed_over_several_iterations() {
    let llm = TestLlm::start(vec![
        ollama_turn("", &[("execute_code", exec_args("python", "print(10 / 0)"))]),
        ollama_turn(
            "Division by zero; fixing it.",
            &[("execute_code", exec_args("python", "print(10 / 2)"))],
        ),
        ollama_turn("<think>It printed 5.0.</think>10 / 2 = 5.0", &[]),
    ])
    .await;
    let a = agent(llm.ollama("qwen3"), config());
    let (report, _) = a.run("Divide 10 by something").await;
    assert_eq!(
        report.answer(),
        Some("10 / 2 = 5.0"),
        "think blocks are not part of the answer"
    );
    assert_eq!((report.stats.iterations, report.stats.tool_calls), (3, 2));

    let reqs = llm.requests();
    assert_eq!(reqs.len(), 3);
    // The model saw the first program's error...
    let failed = tool_message(&reqs[1], 0);
    assert_eq!(failed["exit_code"], 1);
    assert!(
        failed["stderr"]
            .as_str()
            .is_some_and(|s| s.contains("ZeroDivisionError")),
        "{failed}"
    );
    // ...and, one turn later, both results, in order.
    assert_eq!(tool_message(&reqs[2], 0)["exit_code"], 1);
    let fixed = tool_message(&reqs[2], 1);
    assert_eq!(
        (fixed["exit_code"].clone(), fixed["stdout"].clone()),
        (json!(0), json!("5.0\n"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_iteration_cap_stops_a_model_that_never_answers() {
    let llm = TestLlm::start(vec![ollama_turn(
        "Checking again.",
        &[("list_languages", json!({}))],
    )])
    .await;
    llm.repeat_last();
    let a = agent(
        llm.ollama("qwen3"),
        AgentConfig {
            max_iterations: 3,
            ..config()
        },
    );
    let (report, events) = a.run("Never finish").await;
    assert!(
        matches!(report.outcome, AgentOutcome::MaxIterations),
        "{:?}",
        report.outcome
    );
    assert_eq!(report.stop_reason(), StopReason::MaxIterations);
    assert_eq!((report.stats.iterations, report.stats.tool_calls), (3, 3));
    assert_eq!(llm.requests().len(), 3, "no call past the cap");
    let stopped = events.iter().find_map(|(_, e)| match e {
        AgentEvent::Stopped { reason, message } => Some((*reason, message.clone())),
        _ => None,
    });
    let (reason, message) = stopped.expect("a stopped event");
    assert_eq!(reason, StopReason::MaxIterations);
    assert!(
        message.contains("3 iterations") && message.contains("--max-iterations"),
        "{message}"
    );
    let langs = tool_message(&llm.requests()[1], 0);
    assert!(
        langs["languages"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["name"] == "python")),
        "{langs}"
    );
    assert_eq!(report.to_json()["error"]["kind"], "max_iterations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_written_as_json_or_xml_in_the_text_are_run() {
    let llm = TestLlm::start(vec![
        ollama_turn(
            "Let me compute it:\n```json\n{\"name\": \"execute_code\", \"arguments\": {\"language\": \"python\", \"code\": \"print(6 * 7)\"}}\n```",
            &[],
        ),
        ollama_turn(
            "Checking with bash.\n<tool_call>\n{\"name\": \"execute_code\", \"arguments\": {\"language\": \"bash\", \"code\": \"echo $((6 * 7))\"}}\n</tool_call>",
            &[],
        ),
        ollama_turn("Both agree: 42.", &[]),
    ])
    .await;
    let a = agent(llm.ollama("qwen3"), config());
    let (report, _) = a.run("What is 6 times 7?").await;
    assert_eq!(report.answer(), Some("Both agree: 42."));
    let calls: Vec<_> = report.turns.iter().flat_map(|t| t.tool_calls.iter()).collect();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[0].call.source, calls[1].call.source),
        (CallSource::Json, CallSource::Xml)
    );
    assert_eq!(calls[1].call.language.as_deref(), Some("bash"));
    for c in &calls {
        assert_eq!(c.result.stdout, "42\n", "{:?}", c.result);
    }
    // The history sent back is consistent: the assistant's call, then its result.
    let reqs = llm.requests();
    let msgs = reqs[1].body["messages"].as_array().expect("messages");
    assert_eq!(msgs[2]["role"], "assistant");
    assert!(msgs[2]["content"].as_str().is_some_and(|c| c.contains("```json")));
    assert_eq!(
        msgs[2]["tool_calls"][0]["function"]["arguments"]["code"],
        "print(6 * 7)"
    );
    assert_eq!(tool_message(&reqs[1], 0)["stdout"], "42\n");
    assert_eq!(tool_message(&reqs[2], 1)["stdout"], "42\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tool_calls_go_back_to_the_model() {
    let llm = TestLlm::start(vec![
        ollama_turn("", &[("execute_code", exec_args("cobol", "DISPLAY 'HI'."))]),
        ollama_turn("", &[("execute_code", json!({"language": "python"}))]),
        ollama_turn(
            "",
            &[
                ("execute_code", json!({"language": "python", "code": 42})),
                ("format_disk", json!({})),
            ],
        ),
        ollama_turn(
            "<tool_call>{\"name\": \"execute_code\", \"arguments\": {\"code\": </tool_call>",
            &[],
        ),
        ollama_turn("I could not run anything.", &[]),
    ])
    .await;
    let a = agent(llm.ollama("qwen3"), config());
    let (report, _) = a.run("Say hi in COBOL").await;
    assert_eq!(report.answer(), Some("I could not run anything."));
    let results: Vec<_> = report
        .turns
        .iter()
        .flat_map(|t| t.tool_calls.iter().map(|x| x.result.clone()))
        .collect();
    let kinds: Vec<_> = results.iter().map(|r| r.error_kind).collect();
    assert_eq!(
        kinds,
        [
            Some(ToolErrorKind::InvalidRequest),
            Some(ToolErrorKind::InvalidArguments),
            Some(ToolErrorKind::InvalidArguments),
            Some(ToolErrorKind::UnknownTool),
            Some(ToolErrorKind::InvalidArguments),
        ]
    );
    let reqs = llm.requests();
    let seen = |i: usize, n: usize| {
        tool_message(&reqs[i], n)["error"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(
        seen(1, 0).contains("unknown language 'cobol'; available: python"),
        "{}",
        seen(1, 0)
    );
    assert!(seen(2, 1).contains("\"code\" is missing"), "{}", seen(2, 1));
    assert!(seen(3, 2).contains("\"code\" must be a string"), "{}", seen(3, 2));
    assert!(
        seen(3, 3).contains("unknown tool 'format_disk'"),
        "{}",
        seen(3, 3)
    );
    assert!(seen(4, 4).contains("not valid JSON"), "{}", seen(4, 4));
    // Nothing was worth a VM.
    assert!(
        results.iter().all(|r| r.vm_id.is_none() && r.boot_ms.is_none()),
        "{results:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_failures_end_the_session_with_one_clear_error() {
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let llm = TestLlm::start(vec![
        Reply::Status(404, json!({"error": "model \"nope\" not found, try pulling it first"})),
        Reply::Status(500, json!({"error": "llama runner process has terminated: signal: killed"})),
        Reply::Status(
            404,
            json!({"error": {"message": "The model `gpt-nope` does not exist or you do not have access to it.",
                             "type": "invalid_request_error", "param": null, "code": "model_not_found"}}),
        ),
        ollama_stream(vec![ollama_text("Hal"), ollama_line(json!({"error": "model runner crashed"}))]),
    ])
    .await;
    let cases: Vec<(Arc<dyn LlmClient>, &str, &str)> = vec![
        (
            Arc::new(OllamaClient::new(&closed.to_string())),
            "llm_unreachable",
            "start it with `ollama serve`",
        ),
        (
            Arc::new(OpenAiClient::new(
                &format!("http://{closed}/v1"),
                "gpt-test",
                None,
            )),
            "llm_unreachable",
            "--base-url",
        ),
        (llm.ollama("nope"), "model_missing", "ollama pull nope"),
        (
            llm.ollama("qwen3"),
            "llm_server_error",
            "answered 500: llama runner process has terminated",
        ),
        (
            Arc::new(OpenAiClient::new(&llm.url, "gpt-nope", Some("sk-test".into()))),
            "model_missing",
            "`gpt-nope` does not exist",
        ),
        (llm.ollama("qwen3"), "llm_server_error", "model runner crashed"),
    ];
    for (client, kind, text) in cases {
        let a = agent(client, config());
        let (report, events) = a.run("anything").await;
        let AgentOutcome::Failed(AgentError::Llm(e)) = &report.outcome else {
            panic!("{kind}: {:?}", report.outcome);
        };
        assert_eq!(e.kind(), kind, "{e}");
        assert!(e.to_string().contains(text), "{kind}: {e}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
        if kind == "model_missing" {
            assert!(matches!(e, LlmError::ModelMissing { .. }));
        }
        assert_eq!(report.stop_reason(), StopReason::LlmError);
        assert!(matches!(
            events.iter().rev().nth(1),
            Some((
                _,
                AgentEvent::Stopped {
                    reason: StopReason::LlmError,
                    ..
                }
            ))
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_streams_to_the_sink_before_the_turn_ends() {
    let llm = TestLlm::start(vec![ollama_stream(vec![
        ollama_text("Thinking about primes"),
        Step::Sleep(Duration::from_secs(1)),
        ollama_text("... 2, 3, 5 and 7."),
        ollama_done(0),
    ])])
    .await;
    let a = agent(llm.ollama("qwen3"), config());
    let (report, events) = a.run("Primes under 10?").await;
    assert_eq!(report.answer(), Some("Thinking about primes... 2, 3, 5 and 7."));
    assert_eq!(
        report.stats.model_load_ms, None,
        "a zero load_duration is no load"
    );
    let first_delta = events
        .iter()
        .find_map(|(t, e)| {
            matches!(e, AgentEvent::TextDelta { text, .. } if text == "Thinking about primes").then_some(*t)
        })
        .expect("the first delta");
    let answer = events
        .iter()
        .find_map(|(t, e)| matches!(e, AgentEvent::Answer { .. }).then_some(*t))
        .expect("answer");
    assert!(
        answer.duration_since(first_delta) >= Duration::from_millis(700),
        "the first delta came only {:?} before the end of the turn",
        answer.duration_since(first_delta)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_compatible_tool_call_round_trip() {
    let args = "{\"language\": \"python\", \"code\": \"print(2 ** 10)\"}";
    let (a1, a2) = args.split_at(17);
    let llm = TestLlm::start(vec![
        openai_stream(vec![
            openai_chunk(json!({"role": "assistant", "content": null}), None),
            openai_chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_abc123", "type": "function",
                                       "function": {"name": "execute_code", "arguments": ""}}]}),
                None,
            ),
            openai_chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": a1}}]}),
                None,
            ),
            openai_chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": a2}}]}),
                None,
            ),
            openai_chunk(json!({}), Some("tool_calls")),
        ]),
        openai_stream(vec![
            openai_chunk(json!({"role": "assistant", "content": ""}), None),
            openai_chunk(json!({"content": "2 ** 10 "}), None),
            openai_chunk(json!({"content": "is 1024."}), None),
            openai_chunk(json!({}), Some("stop")),
        ]),
    ])
    .await;
    let client = Arc::new(OpenAiClient::new(&llm.url, "gpt-test", Some("sk-test".into())));
    let a = agent(client, config());
    let (report, _) = a.run("What is 2 to the 10th?").await;
    assert_eq!(report.answer(), Some("2 ** 10 is 1024."), "{:?}", report.outcome);
    assert_eq!(report.stats.model_load_ms, None);
    assert_eq!(report.turns[0].tool_calls[0].result.stdout, "1024\n");

    let reqs = llm.requests();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.headers["authorization"], "Bearer sk-test");
        assert_eq!(r.body["stream"], true);
        assert_eq!(r.body["model"], "gpt-test");
    }
    assert_eq!(reqs[0].body["tools"][0]["type"], "function");
    assert_eq!(reqs[0].body["tools"][0]["function"]["name"], "execute_code");
    let msgs = reqs[1].body["messages"].as_array().expect("messages");
    let call = &msgs[2]["tool_calls"][0];
    assert_eq!(call["id"], "call_abc123");
    assert_eq!(call["type"], "function");
    assert_eq!(
        call["function"]["arguments"], args,
        "arguments go back as the string they were"
    );
    assert_eq!(msgs[3]["role"], "tool");
    assert_eq!(msgs[3]["tool_call_id"], "call_abc123");
    let r = tool_message(&reqs[1], 0);
    assert_eq!(
        (r["exit_code"].clone(), r["stdout"].clone()),
        (json!(0), json!("1024\n"))
    );
}

// ---------------------------------------------------------------- the CLI

fn cli(state: &std::path::Path, llm_url: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_neurovisor"));
    c.args(args)
        .env("NEUROVISOR_STATE_DIR", state)
        .env("OLLAMA_HOST", llm_url)
        .env("NEUROVISOR_LOCAL", "true")
        .env_remove("NEUROVISOR_LOG")
        .env_remove("NEUROVISOR_ADDR")
        .env_remove("NEUROVISOR_MODEL")
        .stdin(Stdio::null());
    c
}

async fn output(mut c: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || c.output().expect("run neurovisor"))
        .await
        .expect("join")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_prints_the_session_as_it_happens_and_as_json() {
    let state = tempfile::Builder::new()
        .prefix("nvagentcli-")
        .tempdir()
        .expect("state");
    let code = "print(sum(range(101)))";
    let llm = TestLlm::start(vec![
        ollama_turn("", &[("execute_code", exec_args("python", code))]),
        ollama_turn("The sum is 5050.", &[]),
    ])
    .await;
    let o = output(cli(
        state.path(),
        &llm.url,
        &["agent", "Sum 1..100", "--size", "small"],
    ))
    .await;
    let out = text(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        text(&o.stderr)
    );
    assert_eq!(text(&o.stderr), "", "nothing on stderr");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "Task: \"Sum 1..100\"");
    let trace = lines[1].strip_prefix("trace_id: ").expect("trace_id line");
    assert_eq!(uuid::Uuid::parse_str(trace).expect("uuid").get_version_num(), 7);
    assert_eq!(lines[2], "[Iteration 1] Calling qwen3...");
    assert_eq!(
        lines[3],
        "[Tool Call] execute_code(python, \"print(sum(range(101)))\")"
    );
    assert!(
        lines[4].starts_with("[Execution] VM booted in ") && lines[4].contains("ms, exit_code=0, duration="),
        "{}",
        lines[4]
    );
    assert_eq!(lines[5], "[Iteration 2] Calling qwen3...");
    assert_eq!(lines[6], "The sum is 5050.", "the model's text, streamed");
    assert_eq!(lines[7], "Result: The sum is 5050.");
    assert_eq!(
        lines[8..12],
        [
            "Stats:",
            "  - Iterations: 2",
            "  - Tool calls: 1",
            "  - Model load time: 2500ms"
        ]
    );
    assert!(lines[12].starts_with("  - Total duration: "), "{}", lines[12]);
    assert_no_leftovers(state.path());

    // --json: one document with the transcript and the stats.
    llm.push(vec![
        ollama_turn("", &[("execute_code", exec_args("python", code))]),
        ollama_turn("The sum is 5050.", &[]),
    ]);
    let o = output(cli(
        state.path(),
        &llm.url,
        &[
            "agent",
            "Sum 1..100",
            "--size",
            "small",
            "--json",
            "--model",
            "qwen3:8b",
        ],
    ))
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let doc: Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["answer"], "The sum is 5050.");
    assert_eq!(doc["model"], "qwen3:8b");
    assert_eq!(doc["llm"], "ollama");
    assert_eq!(doc["stop_reason"], "answer");
    assert_eq!(doc["sandbox"], "direct");
    assert_eq!(doc["stats"]["iterations"], 2);
    assert_eq!(doc["stats"]["tool_calls"], 1);
    assert_eq!(doc["stats"]["model_load_ms"], 2500.0);
    let exchange = &doc["turns"][0]["tool_calls"][0];
    assert_eq!(exchange["call"]["code"], code);
    assert_eq!(exchange["result"]["stdout"], "5050\n");
    assert_eq!(exchange["result"]["exit_code"], 0);
    assert_eq!(doc["turns"][1]["text"], "The sum is 5050.");
    assert_eq!(llm.requests().last().expect("request").body["model"], "qwen3:8b");
    assert_no_leftovers(state.path());

    // The seed form: `neurovisor --agent TASK --model M`.
    llm.push(vec![ollama_turn("Nothing to run: 4.", &[])]);
    let o = output(cli(
        state.path(),
        &llm.url,
        &["--agent", "What is 2 + 2?", "--model", "llama3.1", "--json"],
    ))
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let doc: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(
        (doc["answer"].as_str(), doc["model"].as_str()),
        (Some("Nothing to run: 4."), Some("llama3.1"))
    );

    // LLM failures: one line on stderr, exit 3.
    llm.push(vec![Reply::Status(
        404,
        json!({"error": "model \"qwen3\" not found, try pulling it first"}),
    )]);
    let o = output(cli(state.path(), &llm.url, &["agent", "x", "--size", "small"])).await;
    assert_eq!(o.status.code(), Some(3));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("ollama pull qwen3"), "{err}");
    assert!(!text(&o.stdout).contains("Stats:"));

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let o = output(cli(state.path(), &closed.to_string(), &["agent", "x"])).await;
    assert_eq!(o.status.code(), Some(3));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("neurovisor: cannot reach Ollama at") && err.contains("ollama serve"),
        "{err}"
    );

    // The iteration cap: exit 1 with the reason.
    llm.push(vec![ollama_turn("", &[("list_languages", json!({}))])]);
    llm.repeat_last();
    let o = output(cli(
        state.path(),
        &llm.url,
        &["agent", "loop", "--max-iterations", "2"],
    ))
    .await;
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o.stdout);
    assert!(out.contains("[Languages] python"), "{out}");
    assert!(
        out.contains("Stopped: no final answer after 2 iterations"),
        "{out}"
    );
    assert_no_leftovers(state.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_streams_the_model_text_before_the_turn_ends() {
    let state = tempfile::Builder::new()
        .prefix("nvagentcli-")
        .tempdir()
        .expect("state");
    let llm = TestLlm::start(vec![ollama_stream(vec![
        ollama_text("Let me think"),
        Step::Sleep(Duration::from_millis(1500)),
        ollama_text(" ... the answer is 42."),
        ollama_done(0),
    ])])
    .await;
    let mut c = cli(state.path(), &llm.url, &["agent", "The answer?"]);
    c.stdout(Stdio::piped()).stderr(Stdio::null());
    let seen = tokio::task::spawn_blocking(move || {
        let mut child = c.spawn().expect("spawn");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut delta_at = None;
        loop {
            let n = stdout.read(&mut chunk).expect("read");
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if delta_at.is_none() && text(&buf).contains("Let me think") {
                delta_at = Some(Instant::now());
            }
        }
        let status = child.wait().expect("wait");
        (delta_at, Instant::now(), status, text(&buf))
    })
    .await
    .expect("join");
    let (delta_at, ended, status, out) = seen;
    assert!(status.success(), "{out}");
    assert!(
        out.contains("Result: Let me think ... the answer is 42."),
        "{out}"
    );
    let delta_at = delta_at.expect("the delta was printed");
    assert!(
        ended.duration_since(delta_at) >= Duration::from_millis(1000),
        "the text appeared only {:?} before the end",
        ended.duration_since(delta_at)
    );
}

// ---------------------------------------------------------------- the daemon's Agent/RunTask

fn start_daemon(ollama: &str) -> Daemon {
    common::daemon::start_daemon(&["--warm", "1", "--max", "2", "--ollama-host", ollama])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_run_task_streams_the_session_through_the_daemon() {
    let code = "import os; print(os.environ['NEUROVISOR_TRACE_ID'])";
    let llm = TestLlm::start(vec![
        ollama_turn("Running it.", &[("execute_code", exec_args("python", code))]),
        ollama_turn("The trace id is agent-trace-1.", &[]),
        Reply::Status(
            404,
            json!({"error": "model \"missing\" not found, try pulling it first"}),
        ),
    ])
    .await;
    let d = tokio::task::spawn_blocking({
        let url = llm.url.clone();
        move || start_daemon(&url)
    })
    .await
    .expect("join");
    let mut client = AgentClient::new(d.channel().await);

    let mut req = tonic::Request::new(RunTaskRequest {
        task: "Print your trace id".into(),
        max_iterations: 5,
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-trace-id", "agent-trace-1".parse().expect("ascii"));
    let resp = client.run_task(req).await.expect("RunTask");
    assert_eq!(
        resp.metadata().get("x-trace-id").and_then(|v| v.to_str().ok()),
        Some("agent-trace-1")
    );
    let mut stream = resp.into_inner();
    let mut events = Vec::new();
    while let Some(ev) = stream.message().await.expect("stream") {
        events.push(ev.event.expect("event"));
    }
    let names: Vec<&str> = events
        .iter()
        .map(|e| match e {
            PbEvent::Started(_) => "started",
            PbEvent::Iteration(_) => "iteration",
            PbEvent::Text(_) => "text",
            PbEvent::ToolCall(_) => "tool_call",
            PbEvent::ToolResult(_) => "tool_result",
            PbEvent::Answer(_) => "answer",
            PbEvent::Stopped(_) => "stopped",
            PbEvent::Stats(_) => "stats",
        })
        .collect();
    let mut dedup = names.clone();
    dedup.dedup();
    assert_eq!(
        dedup,
        [
            "started",
            "iteration",
            "text",
            "tool_call",
            "tool_result",
            "iteration",
            "text",
            "answer",
            "stats"
        ]
    );
    let PbEvent::Started(started) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(
        (
            started.trace_id.as_str(),
            started.model.as_str(),
            started.llm.as_str()
        ),
        ("agent-trace-1", "qwen3", "ollama")
    );
    let result = events
        .iter()
        .find_map(|e| match e {
            PbEvent::ToolResult(r) => Some(r.clone()),
            _ => None,
        })
        .expect("tool result");
    assert!(result.ok, "{result:?}");
    assert_eq!(result.exit_code, Some(0));
    assert_eq!(
        result.stdout, "agent-trace-1\n",
        "the session's trace id reaches the guest"
    );
    assert!(!result.vm_id.is_empty() && result.boot_us > 0, "{result:?}");
    let tool_call = events
        .iter()
        .find_map(|e| match e {
            PbEvent::ToolCall(c) => Some(c.clone()),
            _ => None,
        })
        .expect("tool call");
    assert_eq!(
        (
            tool_call.language.as_str(),
            tool_call.code.as_str(),
            tool_call.source.as_str()
        ),
        ("python", code, "native")
    );
    let PbEvent::Stats(stats) = events.last().expect("stats") else {
        panic!("{events:?}")
    };
    assert_eq!(
        (stats.iterations, stats.tool_calls, stats.model_load_ms),
        (2, 1, Some(2500))
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, PbEvent::Answer(a) if a.text == "The trace id is agent-trace-1.")));
    assert_eq!(llm.requests()[0].headers["x-trace-id"], "agent-trace-1");

    // A missing model: the events so far, then NOT_FOUND naming the fix.
    let resp = client
        .run_task(RunTaskRequest {
            task: "x".into(),
            model: "missing".into(),
            ..Default::default()
        })
        .await
        .expect("RunTask");
    let mut stream = resp.into_inner();
    let mut last = None;
    let err = loop {
        match stream.message().await {
            Ok(Some(ev)) => last = ev.event,
            Ok(None) => panic!("no error status"),
            Err(s) => break s,
        }
    };
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("ollama pull missing"), "{}", err.message());
    assert!(matches!(last, Some(PbEvent::Stats(_))), "{last:?}");

    // Bad requests are refused up front.
    let e = client
        .run_task(RunTaskRequest {
            task: " ".into(),
            ..Default::default()
        })
        .await
        .expect_err("empty task");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let metrics = tokio::task::spawn_blocking({
        let m = d.metrics.clone();
        move || common::daemon::http_get(&m, "/metrics").1
    })
    .await
    .expect("join");
    for name in [
        "neurovisor_agent_tasks_total{status=\"answer\"} 1",
        "neurovisor_agent_tasks_total{status=\"llm_error\"} 1",
        "neurovisor_agent_iterations_count 2",
        "neurovisor_llm_call_duration_seconds_count{model=\"qwen3\"} 2",
        "neurovisor_model_load_duration_seconds_count{model=\"qwen3\"} 2",
    ] {
        assert!(metrics.contains(name), "missing {name} in /metrics:\n{metrics}");
    }
    let code = tokio::task::spawn_blocking(move || d.stop()).await.expect("join");
    assert_eq!(code, Some(0));
}

/// A RunTask client that reads nothing cannot make the daemon queue its
/// session's events without bound: past `MAX_QUEUED_EVENT_BYTES` the session
/// is cancelled and the stream ends with RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_task_client_that_never_reads_loses_its_session() {
    // ~6 MiB of answer text, streamed in 3 KiB deltas.
    let word = format!("{} ", "w".repeat(1023));
    let text = word.repeat(6 * 1024);
    let llm = TestLlm::start(vec![ollama_turn(&text, &[])]).await;
    let d = tokio::task::spawn_blocking({
        let url = llm.url.clone();
        move || start_daemon(&url)
    })
    .await
    .expect("join");
    // HTTP/2 windows of 64 KiB: what the client's side would otherwise take
    // in (hyper's defaults are MiBs) stays queued in the daemon.
    let socket = d.socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let s = tokio::net::UnixStream::connect(&socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .expect("connect");
    let mut client = AgentClient::new(channel);
    let resp = client
        .run_task(RunTaskRequest {
            task: "Say a lot".into(),
            max_iterations: 2,
            ..Default::default()
        })
        .await
        .expect("RunTask");
    // Read nothing while the model streams: until the daemon gives up on
    // this client (a fixed wait was too short on a loaded host).
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while !d.log_text().contains("session cancelled") && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stream = resp.into_inner();
    let mut bytes = 0usize;
    let err = loop {
        match stream.message().await {
            Ok(Some(ev)) => bytes += prost::Message::encoded_len(&ev),
            Ok(None) => panic!("the stream ended without an error after {bytes} bytes"),
            Err(s) => break s,
        }
    };
    println!("never-reading client: {bytes} bytes of events, then {err:?}");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("read the stream"), "{}", err.message());
    assert!(
        bytes <= neurovisor::server::agent::MAX_QUEUED_EVENT_BYTES + (512 << 10),
        "{bytes} bytes queued for a client that read nothing"
    );
    let code = tokio::task::spawn_blocking(move || d.stop()).await.expect("join");
    assert_eq!(code, Some(0));
}
