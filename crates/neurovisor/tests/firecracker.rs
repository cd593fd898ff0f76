//! The Firecracker backend against a stand-in for Firecracker's API.
//!
//! No Firecracker binary is needed: the backend spawns a fake `firecracker`
//! (a shell script that records its arguments and sleeps, or fails at once),
//! and a test server binds the `--api-sock` path the script was given. The
//! server validates every request (method, path, JSON body) against the
//! official OpenAPI description, `shared/firecracker/firecracker-api.yaml`,
//! loaded at run time; answers with the status codes the spec documents;
//! records the sequence; and plays the parts of Firecracker the backend
//! relies on (it needs the log files to exist, announces READY on
//! `<uds_path>_6001` at `InstanceStart`, answers hybrid-vsock `CONNECT`s).
//!
//! The stand-in covers the error paths the real binary cannot be made to
//! produce. The `real_*` tests run the real `firecracker` and `jailer`
//! (`FIRECRACKER_BIN`/`JAILER_BIN`, else built and cached by
//! `shared/firecracker/build-firecracker.sh`; they skip, saying why, only when
//! neither is there or the host lacks /dev/kvm or root for the jailer) with the
//! project's kernel and rootfs at the CLI's default paths: the boot sequence
//! through `InstanceStart`, the jail (chroot, uid, cgroup, netns) and its
//! teardown, and pause + snapshot + restore into a new process. They check the
//! VMM and the host side, not the guest agent, which cannot come up where KVM
//! is PVM. `real_firecracker_runs_code` runs code in a real VM when
//! `FIRECRACKER_BIN` is set and hardware KVM is usable, and says why it skipped
//! otherwise.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use neurovisor::vmm::firecracker::{FirecrackerBackend, FirecrackerOptions};
use neurovisor::vmm::{Vm, VmConfig, VmmBackend, VmmError};
use neurovisor::VmSize;

// ---------------------------------------------------------------------------
// The OpenAPI (swagger 2.0) description and a validator for the subset it uses
// ---------------------------------------------------------------------------

const SPEC_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/firecracker/firecracker-api.yaml"
);

struct Spec {
    doc: Value,
}

fn yaml_to_json(v: serde_yaml_ng::Value) -> Value {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => serde_json::to_value(&n).unwrap_or(Value::Null),
        Y::String(s) => Value::String(s),
        Y::Sequence(s) => Value::Array(s.into_iter().map(yaml_to_json).collect()),
        Y::Mapping(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Y::String(s) => s,
                        Y::Number(n) => n.to_string(),
                        Y::Bool(b) => b.to_string(),
                        other => format!("{other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Y::Tagged(t) => yaml_to_json(t.value),
    }
}

impl Spec {
    fn load() -> Arc<Spec> {
        let text = std::fs::read_to_string(SPEC_PATH).unwrap_or_else(|e| {
            panic!(
                "these tests need Firecracker's API description at {SPEC_PATH} \
                 (shared/firecracker/firecracker-api.yaml beside the repository): {e}"
            )
        });
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("firecracker-api.yaml parses");
        let doc = yaml_to_json(yaml);
        assert_eq!(doc["swagger"], "2.0", "unexpected spec format");
        assert!(doc["paths"].is_object() && doc["definitions"].is_object());
        Arc::new(Spec { doc })
    }

    /// The operation for `method path`: its path template and the operation object.
    fn operation(&self, method: &str, path: &str) -> Result<(String, &Value), String> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let paths = self.doc["paths"].as_object().expect("paths");
        for (template, item) in paths {
            let tsegs: Vec<&str> = template.trim_start_matches('/').split('/').collect();
            if tsegs.len() != segs.len() {
                continue;
            }
            let matches = tsegs.iter().zip(&segs).all(|(t, s)| {
                if t.starts_with('{') && t.ends_with('}') {
                    !s.is_empty()
                } else {
                    t == s
                }
            });
            if !matches {
                continue;
            }
            return match item.get(method.to_ascii_lowercase()) {
                Some(op) => Ok((template.clone(), op)),
                None => Err(format!("{method} is not an operation of {template}")),
            };
        }
        Err(format!("{path} matches no path of the API"))
    }

    /// Validates one request; returns the operation (for its responses) and the violations.
    fn check(&self, method: &str, path: &str, body: Option<&Value>) -> (Option<&Value>, Vec<String>) {
        let mut errors = Vec::new();
        let (template, op) = match self.operation(method, path) {
            Ok(x) => x,
            Err(e) => return (None, vec![e]),
        };
        let empty = Vec::new();
        let params = op["parameters"].as_array().unwrap_or(&empty);
        let body_param = params.iter().find(|p| p["in"] == "body");
        for p in params.iter().filter(|p| p["in"] == "path") {
            let name = p["name"].as_str().unwrap_or_default();
            if !template.contains(&format!("{{{name}}}")) {
                errors.push(format!("{template}: path parameter {name} not in template"));
            }
        }
        match (body_param, body) {
            (None, Some(_)) => errors.push(format!("{method} {template} takes no body")),
            (Some(p), None) if p["required"] == true => {
                errors.push(format!("{method} {template}: the body is required"))
            }
            (Some(p), Some(b)) => self.validate(&p["schema"], b, "body", &mut errors),
            _ => {}
        }
        (Some(op), errors)
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        let mut s = schema;
        while let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let name = r.strip_prefix("#/definitions/").expect("local $ref");
            s = self.doc["definitions"]
                .get(name)
                .unwrap_or_else(|| panic!("dangling $ref {r}"));
        }
        s
    }

    /// Swagger's subset: $ref, type, enum, required, properties,
    /// additionalProperties (unknown properties are errors unless allowed),
    /// readOnly (not to be sent), items, minimum, maximum.
    fn validate(&self, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
        self.validate_as(schema, v, at, true, errors)
    }

    /// `request`: read-only properties must not be sent.
    fn validate_as(&self, schema: &Value, v: &Value, at: &str, request: bool, errors: &mut Vec<String>) {
        let s = self.resolve(schema);
        if let Some(t) = s.get("type").and_then(Value::as_str) {
            let ok = match t {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "boolean" => v.is_boolean(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                other => panic!("type {other} not handled by the test validator"),
            };
            if !ok {
                errors.push(format!("{at}: expected {t}, got {v}"));
                return;
            }
        }
        if let Some(allowed) = s.get("enum").and_then(Value::as_array) {
            if !allowed.contains(v) {
                errors.push(format!(
                    "{at}: {v} is not one of {}",
                    Value::Array(allowed.clone())
                ));
            }
        }
        if let Some(n) = v.as_f64() {
            if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
                if n < min {
                    errors.push(format!("{at}: {n} is below the minimum {min}"));
                }
            }
            if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
                if n > max {
                    errors.push(format!("{at}: {n} is above the maximum {max}"));
                }
            }
        }
        if let (Some(obj), true) = (
            v.as_object(),
            s.get("properties").is_some() || s.get("type") == Some(&json!("object")),
        ) {
            let props = s.get("properties").and_then(Value::as_object);
            for req in s.get("required").and_then(Value::as_array).into_iter().flatten() {
                let name = req.as_str().unwrap_or_default();
                if !obj.contains_key(name) {
                    errors.push(format!("{at}: missing required property {name}"));
                }
            }
            for (k, val) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => {
                        if request && ps.get("readOnly") == Some(&json!(true)) {
                            errors.push(format!("{at}.{k} is read-only"));
                        }
                        self.validate_as(ps, val, &format!("{at}.{k}"), request, errors);
                    }
                    None => match s.get("additionalProperties") {
                        Some(Value::Bool(true)) => {}
                        Some(extra @ Value::Object(_)) => {
                            self.validate_as(extra, val, &format!("{at}.{k}"), request, errors)
                        }
                        _ => errors.push(format!("{at}: unknown property {k}")),
                    },
                }
            }
        }
        if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
            for (i, item) in arr.iter().enumerate() {
                self.validate_as(items, item, &format!("{at}[{i}]"), request, errors);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A fake `firecracker` executable
// ---------------------------------------------------------------------------

enum Script {
    /// Records its arguments, prints a console line, sleeps.
    Sleep,
    /// Prints an error and exits at once (before any socket exists).
    Fail,
}

const CONSOLE_LINE: &str = "fake serial console: Linux version 6.1.0 (neurovisor)";
const FAIL_LINE: &str = "Error: cannot open /dev/kvm: No such file or directory";

struct FakeBin {
    dir: tempfile::TempDir,
    seen: Mutex<HashSet<String>>,
}

#[derive(Debug, Clone)]
struct Invocation {
    pid: u32,
    args: Vec<String>,
}

impl Invocation {
    fn arg(&self, name: &str) -> Option<&str> {
        let i = self.args.iter().position(|a| a == name)?;
        self.args.get(i + 1).map(String::as_str)
    }
}

impl FakeBin {
    /// Writes `<dir>/<name>` (the file name matters: the jailer wants "firecracker").
    fn new(name: &str, script: Script) -> Arc<Self> {
        let dir = tempfile::Builder::new()
            .prefix("fakefc-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().display();
        let body = match script {
            Script::Sleep => format!("echo '{CONSOLE_LINE}'\nexec sleep 600\n"),
            Script::Fail => format!("echo '{FAIL_LINE}' >&2\nexit 1\n"),
        };
        let text = format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{d}/args.'$$.tmp && mv '{d}/args.'$$.tmp '{d}/args.'$$\n{body}"
        );
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Arc::new(Self {
            dir,
            seen: Mutex::new(HashSet::new()),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The next start of the script (each one writes `args.<pid>`).
    async fn next_invocation(&self, timeout: Duration) -> Invocation {
        let deadline = Instant::now() + timeout;
        loop {
            for e in std::fs::read_dir(self.dir.path()).expect("read dir").flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name.strip_prefix("args.").and_then(|p| p.parse::<u32>().ok()) else {
                    continue;
                };
                if self.seen.lock().expect("lock").insert(name) {
                    let text = std::fs::read_to_string(e.path()).expect("args");
                    return Invocation {
                        pid,
                        args: text.lines().map(str::to_string).collect(),
                    };
                }
            }
            assert!(Instant::now() < deadline, "the fake firecracker was not started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Is the process still running (not gone, not a zombie)?
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

async fn assert_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------
// The stand-in API server
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    body: Option<Value>,
    status: u16,
}

impl Call {
    fn name(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

#[derive(Default)]
struct Behaviour {
    /// `"PUT /drives/rootfs"` -> fault_message to answer with.
    faults: BTreeMap<String, String>,
    /// Connect to `<uds_path>_6001` and say READY at InstanceStart.
    announce_ready: bool,
    /// Emulate the guest rebooting on SendCtrlAltDel: kill the process.
    exit_on_ctrl_alt_del: bool,
}

struct FakeApi {
    spec: Arc<Spec>,
    behaviour: Behaviour,
    /// `/` as the fake Firecracker sees it (a chroot when jailed).
    root: Mutex<PathBuf>,
    pid: Mutex<u32>,
    calls: Mutex<Vec<Call>>,
    violations: Mutex<Vec<String>>,
    logger: Mutex<Option<PathBuf>>,
}

impl FakeApi {
    fn new(spec: Arc<Spec>, behaviour: Behaviour) -> Arc<Self> {
        Arc::new(Self {
            spec,
            behaviour,
            root: Mutex::new(PathBuf::from("/")),
            pid: Mutex::new(0),
            calls: Mutex::default(),
            violations: Mutex::default(),
            logger: Mutex::default(),
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }

    fn call_names(&self) -> Vec<String> {
        self.calls().iter().map(Call::name).collect()
    }

    fn body_of(&self, name: &str) -> Value {
        self.calls()
            .into_iter()
            .find(|c| c.name() == name)
            .and_then(|c| c.body)
            .unwrap_or_else(|| panic!("no {name} call"))
    }

    fn assert_spec_valid(&self) {
        let v = self.violations.lock().expect("lock").clone();
        assert!(v.is_empty(), "requests that violate firecracker-api.yaml: {v:#?}");
    }

    fn host_path(&self, vmm_path: &str) -> PathBuf {
        self.root
            .lock()
            .expect("lock")
            .join(vmm_path.trim_start_matches('/'))
    }

    /// Waits for the next start of `bin`, then serves the API socket it was given.
    async fn serve_next(self: Arc<Self>, bin: Arc<FakeBin>) -> Invocation {
        let inv = bin.next_invocation(Duration::from_secs(10)).await;
        let api_sock = inv.arg("--api-sock").expect("--api-sock");
        // Under the jailer, paths are inside <chroot-base>/<exec name>/<id>/root.
        let root = match inv.arg("--chroot-base-dir") {
            None => PathBuf::from("/"),
            Some(base) => {
                let exec = Path::new(inv.arg("--exec-file").expect("--exec-file"));
                Path::new(base)
                    .join(exec.file_name().expect("exec name"))
                    .join(inv.arg("--id").expect("--id"))
                    .join("root")
            }
        };
        *self.root.lock().expect("lock") = root;
        *self.pid.lock().expect("lock") = inv.pid;
        let listener = UnixListener::bind(self.host_path(api_sock)).expect("bind the API socket");
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let me = me.clone();
                        async move { Ok::<_, Infallible>(me.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        inv
    }

    fn violation(&self, v: String) {
        self.violations.lock().expect("lock").push(v);
    }

    /// Firecracker's logger appends to a file that must already exist.
    fn log(&self, line: &str) {
        if let Some(p) = self.logger.lock().expect("lock").clone() {
            if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(p) {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
            }
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let name = format!("{method} {path}");
        let content_type = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let raw = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut errors = Vec::new();
        let body = if raw.is_empty() {
            None
        } else {
            if content_type.as_deref() != Some("application/json") {
                errors.push(format!(
                    "{name}: content type {content_type:?}, expected application/json"
                ));
            }
            match serde_json::from_slice::<Value>(&raw) {
                Ok(v) => Some(v),
                Err(e) => {
                    errors.push(format!("{name}: body is not JSON: {e}"));
                    None
                }
            }
        };
        let (op, spec_errors) = self.spec.check(&method, &path, body.as_ref());
        errors.extend(spec_errors.into_iter().map(|e| format!("{name}: {e}")));
        if errors.is_empty() {
            errors.extend(self.semantics(&name, body.as_ref().unwrap_or(&Value::Null)));
        }
        let documented = |code: &str| op.is_some_and(|o| o["responses"].get(code).is_some());
        let (status, answer) = if !errors.is_empty() {
            for e in &errors {
                self.violation(e.clone());
            }
            (400, Some(errors.join("; ")))
        } else if let Some(fault) = self.behaviour.faults.get(&name) {
            self.log(&format!("[anonymous-instance:fc_api] [Error] {fault}"));
            // The status the spec documents for bad input, else its `default`.
            (if documented("400") { 400 } else { 500 }, Some(fault.clone()))
        } else {
            if !documented("204") {
                self.violation(format!("{name}: the spec documents no 204 for it"));
            }
            (204, None)
        };
        self.calls.lock().expect("lock").push(Call {
            method,
            path,
            body,
            status,
        });
        let mut resp = Response::builder().status(StatusCode::from_u16(status).expect("status"));
        let body = match answer {
            Some(fault) => {
                resp = resp.header(hyper::header::CONTENT_TYPE, "application/json");
                let b = json!({ "fault_message": fault });
                let mut errs = Vec::new();
                self.spec.validate_as(
                    &json!({"$ref": "#/definitions/Error"}),
                    &b,
                    "answer",
                    false,
                    &mut errs,
                );
                assert!(errs.is_empty(), "{errs:?}");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        resp.body(Full::new(body)).expect("response")
    }

    /// What real Firecracker would check or do beyond the schema.
    fn semantics(&self, name: &str, body: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        let exists = |field: &str| -> Option<String> {
            let p = body[field].as_str()?;
            (!self.host_path(p).exists()).then(|| format!("{name}: {field} {p} does not exist"))
        };
        match name {
            "PUT /logger" => {
                errors.extend(exists("log_path"));
                *self.logger.lock().expect("lock") = body["log_path"].as_str().map(|p| self.host_path(p));
                self.log("[anonymous-instance:main] Running Firecracker v1.17.0-dev (fake)");
            }
            "PUT /metrics" => errors.extend(exists("metrics_path")),
            "PUT /boot-source" => errors.extend(exists("kernel_image_path")),
            "PUT /drives/rootfs" => errors.extend(exists("path_on_host")),
            "PUT /snapshot/load" => {
                errors.extend(exists("snapshot_path"));
                if let Some(p) = body["mem_backend"]["backend_path"].as_str() {
                    if !self.host_path(p).exists() {
                        errors.push(format!("{name}: memory file {p} does not exist"));
                    }
                }
                // The restored VM's vsock device listens on the overridden path.
                if let Some(uds) = body["vsock_override"]["uds_path"].as_str() {
                    self.start_vsock(self.host_path(uds), false);
                }
            }
            "PUT /snapshot/create" => {
                for f in ["snapshot_path", "mem_file_path"] {
                    if let Some(p) = body[f].as_str() {
                        let _ = std::fs::write(self.host_path(p), format!("fake {f}"));
                    }
                }
            }
            "PUT /actions" if body["action_type"] == "InstanceStart" => {
                let vsock = self.body_of("PUT /vsock");
                let uds = self.host_path(vsock["uds_path"].as_str().unwrap_or_default());
                self.start_vsock(uds, self.behaviour.announce_ready);
            }
            "PUT /actions"
                if body["action_type"] == "SendCtrlAltDel" && self.behaviour.exit_on_ctrl_alt_del =>
            {
                let pid = *self.pid.lock().expect("lock");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            _ => {}
        }
        errors
    }

    /// The vsock device: hybrid-vsock `CONNECT` on `uds` (echoing afterwards),
    /// and optionally the guest agent's READY on `<uds>_6001`.
    fn start_vsock(&self, uds: PathBuf, announce_ready: bool) {
        let listener = UnixListener::bind(&uds).expect("bind the vsock socket");
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut r = BufReader::new(s);
                    let mut line = String::new();
                    if r.read_line(&mut line).await.is_err() || !line.starts_with("CONNECT ") {
                        return;
                    }
                    let mut s = r.into_inner();
                    let _ = s.write_all(b"OK 1073741824\n").await;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        if announce_ready {
            let mut ready = uds.into_os_string();
            ready.push("_6001");
            tokio::spawn(async move {
                if let Ok(mut s) = UnixStream::connect(ready).await {
                    let _ = s.write_all(b"READY\n").await;
                }
            });
        }
    }
}

// ---------------------------------------------------------------------------
// Test setup
// ---------------------------------------------------------------------------

struct Env {
    state: tempfile::TempDir,
    images: tempfile::TempDir,
    bin: Arc<FakeBin>,
    backend: FirecrackerBackend,
}

fn env(script: Script) -> Env {
    let bin = FakeBin::new("firecracker", script);
    let backend = FirecrackerBackend::new(&FirecrackerOptions {
        firecracker_bin: Some(bin.path("firecracker")),
        jailer: Some(false),
        socket_timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .expect("backend");
    Env {
        state: tempfile::Builder::new().prefix("nvfc-").tempdir().expect("state"),
        images: fake_images(),
        bin,
        backend,
    }
}

fn fake_images() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("images");
    std::fs::write(d.path().join("vmlinux"), b"not a kernel").expect("write");
    std::fs::write(d.path().join("rootfs.ext4"), b"not a filesystem").expect("write");
    for f in ["vmlinux", "rootfs.ext4"] {
        std::fs::set_permissions(d.path().join(f), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    d
}

impl Env {
    fn cfg(&self, size: VmSize) -> VmConfig {
        VmConfig {
            id: uuid::Uuid::now_v7().to_string(),
            size,
            kernel: self.images.path().join("vmlinux"),
            rootfs: self.images.path().join("rootfs.ext4"),
            state_dir: self.state.path().to_path_buf(),
            extra_cmdline: vec![],
            rate_limit: Default::default(),
            guest_io: Default::default(),
            hooks: Default::default(),
            guest_memory: None,
            network: None,
        }
    }

    /// Spawns a VM while `api` plays its Firecracker.
    async fn spawn(&self, api: &Arc<FakeApi>, cfg: &VmConfig) -> (Result<Box<dyn Vm>, VmmError>, Invocation) {
        let server = tokio::spawn(api.clone().serve_next(self.bin.clone()));
        let vm = self.backend.spawn(cfg).await;
        (vm, server.await.expect("server"))
    }

    /// Nothing of any VM is left in the state directory.
    fn assert_clean(&self) {
        let mut left = Vec::new();
        for sub in ["vms", "j"] {
            if let Ok(d) = std::fs::read_dir(self.state.path().join(sub)) {
                left.extend(d.flatten().map(|e| e.path()));
            }
        }
        assert!(left.is_empty(), "left behind in the state dir: {left:?}");
    }
}

const BOOT_SEQUENCE: [&str; 8] = [
    "PUT /logger",
    "PUT /metrics",
    "PUT /machine-config",
    "PUT /boot-source",
    "PUT /drives/rootfs",
    "PUT /vsock",
    "PUT /entropy",
    "PUT /actions",
];

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn the_validator_rejects_what_firecracker_would() {
    let spec = Spec::load();
    let errs = |m: &str, p: &str, b: Value| spec.check(m, p, Some(&b)).1;
    assert!(errs(
        "PUT",
        "/drives/x",
        json!({"drive_id": "x", "is_root_device": true})
    )
    .is_empty());
    assert!(errs(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 512, "smt": false})
    )
    .is_empty());
    let e = errs(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 0, "mem_size_mib": 512, "vcpus": 1}),
    )
    .join("\n");
    assert!(
        e.contains("below the minimum") && e.contains("unknown property vcpus"),
        "{e}"
    );
    let e = errs("PUT", "/drives/rootfs", json!({"drive_id": "rootfs"})).join("\n");
    assert!(e.contains("missing required property is_root_device"), "{e}");
    let e = errs("PUT", "/actions", json!({"action_type": "Reboot"})).join("\n");
    assert!(e.contains("is not one of"), "{e}");
    let e = errs("PUT", "/vsock", json!({"guest_cid": "3", "uds_path": "/v"})).join("\n");
    assert!(e.contains("expected integer"), "{e}");
    let e = errs(
        "PUT",
        "/drives/r",
        json!({"drive_id": "r", "is_root_device": true, "rate_limiter": {"bandwidth": {"size": 1}}}),
    )
    .join("\n");
    assert!(
        e.contains("body.rate_limiter.bandwidth: missing required property refill_time"),
        "{e}"
    );
    assert!(!errs("GET", "/nope", json!({})).is_empty());
    assert!(!errs("DELETE", "/vsock", json!({})).is_empty());
    assert!(
        !spec.check("PUT", "/actions", None).1.is_empty(),
        "the body is required"
    );
}

#[tokio::test]
async fn boot_sequence_is_complete_ordered_and_spec_valid() {
    let env = env(Script::Sleep);
    let api = FakeApi::new(
        Spec::load(),
        Behaviour {
            announce_ready: true,
            ..Default::default()
        },
    );
    let cfg = env.cfg(VmSize::Medium);
    let (vm, inv) = env.spawn(&api, &cfg).await;
    let mut vm = vm.expect("spawn");
    vm.wait_ready(Duration::from_secs(5)).await.expect("ready");
    api.assert_spec_valid();
    assert_eq!(api.call_names(), BOOT_SEQUENCE);
    assert!(api.calls().iter().all(|c| c.status == 204));

    let dir = cfg.vm_dir();
    assert_eq!(vm.dir(), dir);
    assert_eq!(
        inv.arg("--api-sock"),
        Some(dir.join("firecracker.sock").to_str().expect("utf-8"))
    );
    assert_eq!(inv.arg("--id"), Some(cfg.id.as_str()));
    assert_eq!(vm.pids(), vec![inv.pid]);

    let d = |f: &str| dir.join(f).display().to_string();
    assert_eq!(api.body_of("PUT /logger")["log_path"], d("firecracker.log"));
    assert_eq!(api.body_of("PUT /metrics")["metrics_path"], d("metrics.json"));
    assert_eq!(
        api.body_of("PUT /machine-config"),
        json!({"vcpu_count": 2, "mem_size_mib": 512, "smt": false})
    );
    let boot = api.body_of("PUT /boot-source");
    assert_eq!(boot["kernel_image_path"], cfg.kernel.display().to_string());
    let args = boot["boot_args"].as_str().expect("boot_args");
    for want in [
        "console=ttyS0",
        "reboot=k",
        "panic=1",
        "pci=off",
        "init=/sbin/neurovisor-agent",
    ] {
        assert!(
            args.split(' ').any(|a| a == want),
            "boot args lack {want}: {args}"
        );
    }
    assert_eq!(
        api.body_of("PUT /drives/rootfs"),
        json!({"drive_id": "rootfs", "path_on_host": cfg.rootfs.display().to_string(),
               "is_root_device": true, "is_read_only": true})
    );
    assert_eq!(
        api.body_of("PUT /vsock"),
        json!({"guest_cid": 3, "uds_path": d("vsock.sock")})
    );
    assert_eq!(
        api.body_of("PUT /actions"),
        json!({"action_type": "InstanceStart"})
    );

    // Host -> guest over the same hybrid vsock as QEMU.
    let mut s = vm.connect(6000).await.expect("connect");
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"ping");

    vm.kill().await;
    assert!(!alive(inv.pid), "firecracker still running after kill");
    env.assert_clean();
}

#[tokio::test]
async fn drive_rate_limiter_is_sent_when_configured() {
    let mut env = env(Script::Sleep);
    env.backend = FirecrackerBackend::new(&FirecrackerOptions {
        firecracker_bin: Some(env.bin.path("firecracker")),
        jailer: Some(false),
        drive_rate_limiter: neurovisor::vmm::fc_api::RateLimiter::from_rates(Some(50 << 20), Some(2000)),
        ..Default::default()
    })
    .expect("backend");
    let api = FakeApi::new(Spec::load(), Behaviour::default());
    let (vm, _) = env.spawn(&api, &env.cfg(VmSize::Small)).await;
    vm.expect("spawn").kill().await;
    api.assert_spec_valid();
    assert_eq!(
        api.body_of("PUT /drives/rootfs")["rate_limiter"],
        json!({"bandwidth": {"size": 52428800, "refill_time": 1000}, "ops": {"size": 2000, "refill_time": 1000}})
    );
    env.assert_clean();
}

#[tokio::test]
async fn api_fault_names_the_call_and_carries_the_fault_message() {
    let env = env(Script::Sleep);
    let fault = "Unable to create the block device: No such file or directory (os error 2)";
    let api = FakeApi::new(
        Spec::load(),
        Behaviour {
            faults: [("PUT /drives/rootfs".to_string(), fault.to_string())].into(),
            ..Default::default()
        },
    );
    let (vm, inv) = env.spawn(&api, &env.cfg(VmSize::Small)).await;
    let err = vm.err().expect("the drive call fails").to_string();
    assert!(err.contains("PUT /drives/rootfs"), "{err}");
    assert!(err.contains("HTTP 400"), "{err}");
    assert!(err.contains(fault), "{err}");
    // Firecracker's own log (the logger file) is part of the message.
    assert!(err.contains("Running Firecracker v1.17.0-dev (fake)"), "{err}");
    api.assert_spec_valid();
    assert_eq!(
        api.call_names(),
        BOOT_SEQUENCE[..5],
        "nothing is sent after the failed call"
    );
    assert_gone(inv.pid).await;
    env.assert_clean();

    // /entropy documents no 400: errors come with its `default` (500).
    let api = FakeApi::new(
        Spec::load(),
        Behaviour {
            faults: [("PUT /entropy".to_string(), "entropy device failed".to_string())].into(),
            ..Default::default()
        },
    );
    let (vm, inv) = env.spawn(&api, &env.cfg(VmSize::Small)).await;
    let err = vm.err().expect("the entropy call fails").to_string();
    assert!(
        err.contains("PUT /entropy") && err.contains("HTTP 500") && err.contains("entropy device failed"),
        "{err}"
    );
    assert_gone(inv.pid).await;
    env.assert_clean();
}

#[tokio::test]
async fn firecracker_dying_before_its_socket_is_an_error_with_its_output() {
    let env = env(Script::Fail);
    let cfg = env.cfg(VmSize::Small);
    let started = Instant::now();
    let err = env.backend.spawn(&cfg).await.err().expect("spawn fails");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited for the socket timeout"
    );
    match &err {
        VmmError::HelperExited { what, log_tail, .. } => {
            assert_eq!(what, "firecracker");
            assert!(log_tail.contains(FAIL_LINE), "{log_tail}");
        }
        e => panic!("unexpected error: {e}"),
    }
    assert!(err.to_string().contains(FAIL_LINE), "{err}");
    let inv = env.bin.next_invocation(Duration::from_secs(1)).await;
    assert_gone(inv.pid).await;
    env.assert_clean();
}

#[tokio::test]
async fn a_guest_that_never_reports_ready_is_a_boot_timeout_with_the_log_tail() {
    let env = env(Script::Sleep);
    let api = FakeApi::new(Spec::load(), Behaviour::default());
    let (vm, inv) = env.spawn(&api, &env.cfg(VmSize::Small)).await;
    let mut vm = vm.expect("spawn");
    let err = vm
        .wait_ready(Duration::from_millis(300))
        .await
        .expect_err("timeout");
    match &err {
        VmmError::BootTimeout {
            timeout,
            console_tail,
        } => {
            assert_eq!(*timeout, Duration::from_millis(300));
            assert!(console_tail.contains(CONSOLE_LINE), "{console_tail}");
            assert!(console_tail.contains("Running Firecracker"), "{console_tail}");
        }
        e => panic!("unexpected error: {e}"),
    }
    api.assert_spec_valid();
    vm.kill().await;
    assert!(!alive(inv.pid));
    env.assert_clean();
}

#[tokio::test]
async fn shutdown_sends_ctrl_alt_del_then_kills() {
    let env = env(Script::Sleep);
    // The fake ignores Ctrl+Alt+Del: killed after the grace period.
    let api = FakeApi::new(Spec::load(), Behaviour::default());
    let (vm, inv) = env.spawn(&api, &env.cfg(VmSize::Small)).await;
    let vm = vm.expect("spawn");
    let started = Instant::now();
    vm.shutdown(Duration::from_millis(400)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "killed before the grace period"
    );
    let calls = api.calls();
    let last = calls.last().expect("calls");
    assert_eq!(
        (last.name(), last.body.clone()),
        (
            "PUT /actions".into(),
            Some(json!({"action_type": "SendCtrlAltDel"}))
        )
    );
    api.assert_spec_valid();
    assert!(!alive(inv.pid));
    env.assert_clean();

    // A guest that reboots on Ctrl+Alt+Del ends Firecracker well before the deadline.
    let api = FakeApi::new(
        Spec::load(),
        Behaviour {
            exit_on_ctrl_alt_del: true,
            ..Default::default()
        },
    );
    let (vm, inv) = env.spawn(&api, &env.cfg(VmSize::Small)).await;
    let started = Instant::now();
    vm.expect("spawn").shutdown(Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!alive(inv.pid));
    env.assert_clean();
}

#[tokio::test]
async fn snapshot_pause_create_and_restore_are_spec_valid() {
    let env = env(Script::Sleep);
    let api = FakeApi::new(
        Spec::load(),
        Behaviour {
            announce_ready: true,
            ..Default::default()
        },
    );
    let (vm, first) = env.spawn(&api, &env.cfg(VmSize::Small)).await;
    let mut vm = vm.expect("spawn");
    vm.wait_ready(Duration::from_secs(5)).await.expect("ready");
    let snaps = tempfile::tempdir().expect("snapshots");
    let (state, mem) = (snaps.path().join("vm.state"), snaps.path().join("vm.mem"));
    vm.pause().await.expect("pause");
    vm.create_snapshot(&state, &mem).await.expect("snapshot");
    vm.resume().await.expect("resume");
    assert!(state.is_file() && mem.is_file());
    let names = api.call_names();
    assert_eq!(
        names[BOOT_SEQUENCE.len()..],
        ["PATCH /vm", "PUT /snapshot/create", "PATCH /vm"]
    );
    let calls = api.calls();
    let tail = &calls[BOOT_SEQUENCE.len()..];
    assert_eq!(tail[0].body, Some(json!({"state": "Paused"})));
    assert_eq!(
        tail[1].body,
        Some(json!({"snapshot_path": state.display().to_string(),
                    "mem_file_path": mem.display().to_string(), "snapshot_type": "Full"}))
    );
    assert_eq!(tail[2].body, Some(json!({"state": "Resumed"})));
    api.assert_spec_valid();
    vm.kill().await;
    assert!(!alive(first.pid));

    // Restore into a new VM: a fresh Firecracker, logger + metrics, then LoadSnapshot.
    let api = FakeApi::new(Spec::load(), Behaviour::default());
    let cfg = env.cfg(VmSize::Small);
    let server = tokio::spawn(api.clone().serve_next(env.bin.clone()));
    let restored = env.backend.restore(&cfg, &state, &mem).await;
    let inv = server.await.expect("server");
    let mut restored = restored.expect("restore");
    api.assert_spec_valid();
    assert_eq!(
        api.call_names(),
        ["PUT /logger", "PUT /metrics", "PUT /snapshot/load"]
    );
    assert_eq!(
        api.body_of("PUT /snapshot/load"),
        json!({
            "snapshot_path": state.display().to_string(),
            "mem_backend": {"backend_type": "File", "backend_path": mem.display().to_string()},
            "resume_vm": true,
            "vsock_override": {"uds_path": cfg.vm_dir().join("vsock.sock").display().to_string()}
        })
    );
    // The restored agent is already serving: ready as soon as its port answers.
    restored
        .wait_ready(Duration::from_secs(5))
        .await
        .expect("restored VM answers");
    restored.kill().await;
    assert!(!alive(inv.pid));
    assert!(
        state.is_file() && mem.is_file(),
        "the snapshot files are the caller's"
    );
    env.assert_clean();
}

/// The jailed flow with a fake `jailer` (as root, where `ip netns` works):
/// arguments, chroot contents, ownership, chroot-relative API paths, cleanup.
#[tokio::test]
async fn jailed_vm_gets_a_chroot_netns_and_ids_and_leaves_nothing() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIP jailed_vm_gets_a_chroot_netns_and_ids_and_leaves_nothing: needs root (chown, ip netns)"
        );
        return;
    }
    let probe = format!("nvtest-probe-{}", std::process::id());
    let ok = std::process::Command::new("ip")
        .args(["netns", "add", &probe])
        .status();
    if !ok.is_ok_and(|s| s.success()) {
        eprintln!("SKIP jailed_vm_gets_a_chroot_netns_and_ids_and_leaves_nothing: `ip netns add` does not work here");
        return;
    }
    let _ = std::process::Command::new("ip")
        .args(["netns", "delete", &probe])
        .status();

    let fc = FakeBin::new("firecracker", Script::Sleep);
    let jailer = FakeBin::new("jailer", Script::Sleep);
    let backend = FirecrackerBackend::new(&FirecrackerOptions {
        firecracker_bin: Some(fc.path("firecracker")),
        jailer_bin: Some(jailer.path("jailer")),
        jailer: Some(true),
        jail_ids: "3000000000-3000000009".parse().expect("range"),
        ..Default::default()
    })
    .expect("backend");
    assert!(backend.jailed());
    let env = Env {
        state: tempfile::Builder::new().prefix("nvfc-").tempdir().expect("state"),
        images: fake_images(),
        bin: jailer.clone(),
        backend,
    };
    let api = FakeApi::new(
        Spec::load(),
        Behaviour {
            announce_ready: true,
            ..Default::default()
        },
    );
    let cfg = env.cfg(VmSize::Small);
    let (vm, inv) = env.spawn(&api, &cfg).await;
    let mut vm = vm.expect("spawn");
    api.assert_spec_valid();
    assert_eq!(api.call_names(), BOOT_SEQUENCE);

    let base = env.state.path().join("j");
    let netns = format!("/run/netns/nv-{}", cfg.id);
    let expect: Vec<String> = [
        "--id",
        &cfg.id,
        "--exec-file",
        &fc.path("firecracker").display().to_string(),
        "--uid",
        "3000000000",
        "--gid",
        "3000000000",
        "--chroot-base-dir",
        &base.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(inv.args[..expect.len()], expect[..]);
    let v = inv.arg("--cgroup-version").expect("--cgroup-version");
    assert!(v == "1" || v == "2");
    // The VM's cgroup is the supervisor's (the keeper put the jailer in it):
    // the jailer makes none of its own.
    assert!(inv.arg("--cgroup").is_none(), "{:?}", inv.args);
    assert_eq!(inv.arg("--netns"), Some(netns.as_str()));
    assert!(Path::new(&netns).exists(), "network namespace not created");
    assert_eq!(
        inv.args[inv.args.len() - 3..],
        ["--", "--api-sock", "/firecracker.sock"]
    );

    // Firecracker sees chroot-relative paths; kernel and rootfs are hard links.
    let root = base.join("firecracker").join(&cfg.id).join("root");
    assert_eq!(api.body_of("PUT /boot-source")["kernel_image_path"], "/vmlinux");
    assert_eq!(api.body_of("PUT /drives/rootfs")["path_on_host"], "/rootfs.ext4");
    assert_eq!(api.body_of("PUT /vsock")["uds_path"], "/vsock.sock");
    assert_eq!(api.body_of("PUT /logger")["log_path"], "/firecracker.log");
    let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
    assert_eq!(ino(&root.join("vmlinux")), ino(&cfg.kernel));
    assert_eq!(ino(&root.join("rootfs.ext4")), ino(&cfg.rootfs));
    let owner = |p: &Path| {
        let m = std::fs::metadata(p).expect("stat");
        (m.uid(), m.gid())
    };
    assert_eq!(owner(&root), (3_000_000_000, 3_000_000_000));
    assert_eq!(
        owner(&root.join("firecracker.log")),
        (3_000_000_000, 3_000_000_000)
    );
    assert_eq!(
        owner(&root.join("vsock.sock_6001")).0,
        3_000_000_000,
        "readiness socket"
    );
    vm.wait_ready(Duration::from_secs(5)).await.expect("ready");

    // A second VM at the same time gets the next ids.
    let api2 = FakeApi::new(Spec::load(), Behaviour::default());
    let (vm2, inv2) = env.spawn(&api2, &env.cfg(VmSize::Small)).await;
    assert_eq!(inv2.arg("--uid"), Some("3000000001"));
    vm2.expect("second").kill().await;

    vm.kill().await;
    assert!(!alive(inv.pid));
    assert!(!Path::new(&netns).exists(), "network namespace left behind");
    assert!(!base.join("firecracker").exists(), "chroot left behind");
    assert!(
        cfg.kernel.is_file() && cfg.rootfs.is_file(),
        "the images must stay"
    );
    env.assert_clean();
}

/// Boots a real Firecracker VM with the project's kernel and rootfs.
#[tokio::test]
async fn real_firecracker_runs_code() {
    let Some(bin) = std::env::var_os("FIRECRACKER_BIN").filter(|v| !v.is_empty()) else {
        eprintln!("SKIP real_firecracker_runs_code: FIRECRACKER_BIN is not set");
        return;
    };
    if let Err(why) = neurovisor::vmm::accel::KvmProbe::host().verdict() {
        eprintln!("SKIP real_firecracker_runs_code: Firecracker needs hardware KVM: {why}");
        return;
    }
    let images = match neurovisor::images::ImageSet::resolve(&Default::default()) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("SKIP real_firecracker_runs_code: no guest images: {e}");
            return;
        }
    };
    let backend = FirecrackerBackend::new(&FirecrackerOptions {
        firecracker_bin: Some(PathBuf::from(bin)),
        jailer_bin: std::env::var_os("JAILER_BIN").map(PathBuf::from),
        jailer: Some(std::env::var_os("JAILER_BIN").is_some()),
        ..Default::default()
    })
    .expect("backend");
    let state = tempfile::Builder::new().prefix("nvfc-").tempdir().expect("state");
    let sandbox = neurovisor::Sandbox::new(Arc::new(backend), images, state.path().to_path_buf());
    let mut out = Vec::new();
    let mut sink = |o: neurovisor::Output<'_>| {
        if let neurovisor::Output::Stdout(b) = o {
            out.extend_from_slice(b)
        }
    };
    let req = neurovisor::ExecRequest::new("python", "print(6 * 7)");
    let outcome = sandbox
        .run(&req, VmSize::Small, &mut sink)
        .await
        .expect("run on Firecracker");
    assert_eq!(
        (outcome.exit_code, String::from_utf8_lossy(&out).as_ref()),
        (Some(0), "42\n")
    );
    eprintln!("Firecracker boot: {:.1} ms", outcome.boot_ms);
    let left: Vec<_> = std::fs::read_dir(state.path().join("vms"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

// ---------------------------------------------------------------------------
// The real `firecracker` and `jailer`
// ---------------------------------------------------------------------------
//
// These run the real binaries (FIRECRACKER_BIN / JAILER_BIN, else the ones
// `shared/firecracker/build-firecracker.sh` builds and caches) with the
// project's real kernel and rootfs, by the default paths the CLI uses (the
// kernel's is a symlink). Where KVM is PVM (these machines) the guest kernel
// cannot get far (its vCPU stops with KVM_EXIT_INTERNAL_ERROR after some
// seconds), so they check the VMM, its API and the host side, never the guest
// agent.

const BUILD_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/firecracker/build-firecracker.sh"
);

#[derive(Debug, Clone)]
struct RealBins {
    firecracker: PathBuf,
    jailer: PathBuf,
}

/// The real binaries, or why the tests that need them skip.
fn real_bins() -> Result<RealBins, String> {
    static BINS: std::sync::OnceLock<Result<RealBins, String>> = std::sync::OnceLock::new();
    BINS.get_or_init(|| {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let (fc, jailer) = match (var("FIRECRACKER_BIN"), var("JAILER_BIN")) {
            (Some(f), Some(j)) => (f, j),
            (f, j) => {
                if !Path::new(BUILD_SCRIPT).is_file() {
                    return Err(format!(
                        "FIRECRACKER_BIN/JAILER_BIN are not set and {BUILD_SCRIPT} is absent"
                    ));
                }
                // Cached after the first build; a cold build takes minutes.
                let out = std::process::Command::new("bash")
                    .arg(BUILD_SCRIPT)
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .expect("run build-firecracker.sh");
                assert!(out.status.success(), "{BUILD_SCRIPT} failed: {}", out.status);
                let stdout = String::from_utf8_lossy(&out.stdout);
                let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
                (
                    f.unwrap_or_else(|| dir.join("firecracker")),
                    j.unwrap_or_else(|| dir.join("jailer")),
                )
            }
        };
        for p in [&fc, &jailer] {
            assert!(p.is_file(), "Firecracker binary {} does not exist", p.display());
        }
        if !Path::new("/dev/kvm").exists() {
            return Err("Firecracker needs /dev/kvm, which this host lacks".into());
        }
        Ok(RealBins {
            firecracker: fc,
            jailer,
        })
    })
    .clone()
}

/// Root and working `ip netns`, which the jailed tests need; else why not.
fn can_jail() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (chroot, cgroups, uid switch, ip netns)".into());
    }
    let probe = format!(
        "nvtest-probe-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    )
    .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "");
    let ok = std::process::Command::new("ip")
        .args(["netns", "add", &probe])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("`ip netns add` does not work here".into());
    }
    let _ = std::process::Command::new("ip")
        .args(["netns", "delete", &probe])
        .status();
    Ok(())
}

macro_rules! skip_unless {
    ($name:expr, $check:expr) => {
        match $check {
            Ok(v) => v,
            Err(why) => {
                eprintln!("SKIP {}: {why}", $name);
                return;
            }
        }
    };
}

struct Real {
    state: tempfile::TempDir,
    images: neurovisor::images::ImageSet,
    bins: RealBins,
    backend: FirecrackerBackend,
}

impl Real {
    /// `ids`: the jail's uid/gid range (each test its own, as tests run at once).
    fn new(bins: RealBins, jailed: bool, ids: &str) -> Self {
        // The CLI's defaults: `~/.cache/neurovisor/vmlinux` (a symlink to the
        // keyed build) and `images/default/rootfs.ext4` (a symlinked directory).
        let images = neurovisor::images::ImageSet::resolve(&Default::default()).unwrap_or_else(|e| {
            panic!("the real-Firecracker tests need the guest images (scripts/setup.sh builds them): {e}")
        });
        assert_eq!(images.kernel, neurovisor::images::default_kernel());
        let backend = FirecrackerBackend::new(&FirecrackerOptions {
            firecracker_bin: Some(bins.firecracker.clone()),
            jailer_bin: Some(bins.jailer.clone()),
            jailer: Some(jailed),
            jail_ids: ids.parse().expect("range"),
            ..Default::default()
        })
        .expect("backend");
        assert_eq!(backend.jailed(), jailed);
        Self {
            state: tempfile::Builder::new().prefix("nvfc-").tempdir().expect("state"),
            images,
            bins,
            backend,
        }
    }

    fn cfg(&self) -> VmConfig {
        VmConfig {
            id: uuid::Uuid::now_v7().to_string(),
            size: VmSize::Small,
            kernel: self.images.kernel.clone(),
            rootfs: self.images.rootfs.clone(),
            state_dir: self.state.path().to_path_buf(),
            extra_cmdline: vec![],
            rate_limit: Default::default(),
            guest_io: Default::default(),
            hooks: Default::default(),
            guest_memory: None,
            network: None,
        }
    }

    /// `/` of a jailed VM's Firecracker, as the jailer lays it out.
    fn jail_root(&self, id: &str) -> PathBuf {
        let exec = std::fs::canonicalize(&self.bins.firecracker).expect("resolve firecracker");
        self.state
            .path()
            .join("j")
            .join(exec.file_name().expect("file name"))
            .join(id)
            .join("root")
    }

    /// The API of the VM `id`.
    fn api(&self, id: &str) -> neurovisor::vmm::fc_api::ApiClient {
        let sock = if self.backend.jailed() {
            self.jail_root(id).join("firecracker.sock")
        } else {
            self.state.path().join("vms").join(id).join("firecracker.sock")
        };
        neurovisor::vmm::fc_api::ApiClient::new(sock)
    }

    /// Spawns (configure + `InstanceStart`, no wait for the agent) and checks
    /// that the instance runs.
    async fn spawn_running(&self, cfg: &VmConfig) -> (Box<dyn Vm>, u32) {
        let started = Instant::now();
        let vm = match self.backend.spawn(cfg).await {
            Ok(vm) => vm,
            Err(e) => panic!("the real Firecracker refused the boot sequence: {e}"),
        };
        let spawn = started.elapsed();
        let pids = vm.pids();
        assert_eq!(pids.len(), 1, "one process per VM: {pids:?}");
        let info = self.api(&cfg.id).instance_info().await.expect("GET /");
        assert_eq!(
            (info.app_name.as_str(), info.id.as_str(), info.state.as_str()),
            ("Firecracker", cfg.id.as_str(), "Running"),
            "{info:?}"
        );
        eprintln!(
            "real Firecracker {} (jailed: {}): start + configuration + InstanceStart in {:.1} ms",
            info.vmm_version,
            self.backend.jailed(),
            spawn.as_secs_f64() * 1e3
        );
        (vm, pids[0])
    }

    /// Nothing of any VM is left: processes, state, chroots, cgroups, netns.
    fn assert_clean(&self, ids: &[&str]) {
        let mut left = Vec::new();
        for sub in ["vms", "j"] {
            if let Ok(d) = std::fs::read_dir(self.state.path().join(sub)) {
                left.extend(d.flatten().map(|e| e.path()));
            }
        }
        assert!(left.is_empty(), "left behind in the state dir: {left:?}");
        for id in ids {
            let procs = processes_mentioning(id);
            assert!(procs.is_empty(), "processes of VM {id} left: {procs:?}");
            assert!(
                !Path::new("/run/netns").join(format!("nv-{id}")).exists(),
                "network namespace of VM {id} left behind"
            );
            if let Some(cg) = jail_cgroup(id) {
                assert!(!cg.exists(), "cgroup {} left behind", cg.display());
            }
        }
    }
}

/// Host processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok()) {
            if let Ok(raw) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
                if cmd.contains(needle) {
                    found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
                }
            }
        }
    }
    found
}

/// The memory cgroup the supervisor creates for VM `id` (`None` without a memory controller).
fn jail_cgroup(id: &str) -> Option<PathBuf> {
    let base = if neurovisor::vmm::jailer::cgroup_version() == 2 {
        PathBuf::from("/sys/fs/cgroup")
    } else {
        PathBuf::from("/sys/fs/cgroup/memory")
    };
    base.is_dir().then(|| {
        base.join(neurovisor::vmm::jailer::PARENT_CGROUP)
            .join(format!("vm-{id}"))
    })
}

/// A process that was reaped is gone from /proc (a zombie would still be there).
fn assert_reaped(pid: u32) {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let state = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
    assert!(
        !proc_dir.exists(),
        "process {pid} not reaped after teardown: {state}"
    );
}

fn status_field(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace()
        .map(|v| v.parse().expect("number"))
        .collect()
}

#[tokio::test]
async fn real_firecracker_accepts_the_boot_sequence() {
    let bins = skip_unless!("real_firecracker_accepts_the_boot_sequence", real_bins());
    let real = Real::new(bins, false, "3100000000+10");
    let cfg = real.cfg();
    let (vm, pid) = real.spawn_running(&cfg).await;
    assert!(alive(pid));
    assert_eq!(vm.dir(), cfg.vm_dir());
    for f in [
        "firecracker.sock",
        "firecracker.log",
        "metrics.json",
        "vmm.log",
        "vsock.sock",
    ] {
        assert!(cfg.vm_dir().join(f).exists(), "{f} missing in the VM directory");
    }
    // Firecracker's own log (from the answer to PUT /logger on): every call accepted.
    let log = std::fs::read_to_string(cfg.vm_dir().join("firecracker.log")).expect("log");
    assert_eq!(
        log.matches("Status code: 204 No Content").count(),
        BOOT_SEQUENCE.len(),
        "{log}"
    );
    assert!(log.contains(r#"{\"action_type\":\"InstanceStart\"}"#), "{log}");
    assert!(
        !log.contains("Status code: 4") && !log.contains("Status code: 5"),
        "{log}"
    );
    vm.kill().await;
    assert_reaped(pid);
    real.assert_clean(&[&cfg.id]);
}

#[tokio::test]
async fn real_jailer_confines_firecracker_and_teardown_leaves_nothing() {
    let name = "real_jailer_confines_firecracker_and_teardown_leaves_nothing";
    let bins = skip_unless!(name, real_bins());
    skip_unless!(name, can_jail());
    let real = Real::new(bins, true, "3100000010+10");
    let cfg = real.cfg();
    let (vm, pid) = real.spawn_running(&cfg).await;

    // The chroot, with regular files (not symlinks) for the images.
    let root = real.jail_root(&cfg.id);
    assert!(root.is_dir(), "no chroot at {}", root.display());
    for f in ["vmlinux", "rootfs.ext4"] {
        let m = std::fs::symlink_metadata(root.join(f)).expect("image in the chroot");
        assert!(m.file_type().is_file(), "{f} in the chroot is not a regular file");
    }
    assert!(
        root.join("dev/kvm").exists(),
        "the jailer creates /dev/kvm in the chroot"
    );

    // The process we spawned *is* Firecracker: the jailer execs it in place.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm");
    assert_eq!(comm.trim(), "firecracker", "pid {pid} is not the VMM");
    let pid_file = std::fs::read_to_string(root.join("firecracker.pid")).expect("the jailer's pid file");
    assert_eq!(
        pid_file.trim(),
        pid.to_string(),
        "the jailer exec'd Firecracker in place"
    );
    let uid = status_field(pid, "Uid");
    let gid = status_field(pid, "Gid");
    assert_eq!(uid, vec![3_100_000_010; 4], "real, effective, saved, fs uid");
    assert_eq!(gid, vec![3_100_000_010; 4], "real, effective, saved, fs gid");

    // Its cgroup, with the memory limit.
    let cg = jail_cgroup(&cfg.id).expect("memory cgroup controller");
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).expect("cgroup.procs");
    assert!(
        procs.lines().any(|l| l.trim() == pid.to_string()),
        "pid {pid} not in {}: {procs:?}",
        cg.display()
    );
    let limit_file = if neurovisor::vmm::jailer::cgroup_version() == 2 {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    let limit = std::fs::read_to_string(cg.join(limit_file)).expect("memory limit");
    assert_eq!(
        limit.trim(),
        neurovisor::security::cgroups::CgroupLimits::for_vm(u64::from(VmSize::Small.memory_mib()), 1)
            .memory_bytes
            .to_string()
    );
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/<pid>/cgroup");
    assert!(
        own.lines()
            .any(|l| l.ends_with(&format!("/neurovisor/vm-{}", cfg.id))),
        "{own}"
    );

    // Its own network namespace: the one we created, not ours.
    let ns = |p: &str| std::fs::read_link(p).expect("ns link").display().to_string();
    let theirs = ns(&format!("/proc/{pid}/ns/net"));
    assert_ne!(theirs, ns("/proc/self/ns/net"), "Firecracker shares our netns");
    let named = PathBuf::from(format!("/run/netns/nv-{}", cfg.id));
    let ino = std::fs::metadata(&named).expect("named netns").ino();
    assert_eq!(theirs, format!("net:[{ino}]"));

    vm.kill().await;
    assert_reaped(pid);
    assert!(!root.exists(), "chroot left behind");
    assert!(!cg.exists(), "cgroup left behind");
    assert!(!named.exists(), "netns left behind");
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&cfg.id),
        "netns still listed"
    );
    assert!(
        real.images.kernel.exists() && real.images.rootfs.exists(),
        "the images must stay"
    );
    real.assert_clean(&[&cfg.id]);
}

/// Pause, full snapshot, and a restore into a new Firecracker process, through
/// the backend's trait methods.
async fn snapshot_round_trip(real: &Real) {
    let cfg = real.cfg();
    let (vm, pid) = real.spawn_running(&cfg).await;
    vm.pause().await.expect("pause");
    let api = real.api(&cfg.id);
    assert_eq!(api.instance_info().await.expect("GET /").state, "Paused");

    let snaps = tempfile::Builder::new()
        .prefix("nvsnap-")
        .tempdir()
        .expect("snapshots");
    let (state, mem) = (snaps.path().join("vm.state"), snaps.path().join("vm.mem"));
    let started = Instant::now();
    vm.create_snapshot(&state, &mem).await.expect("create snapshot");
    let create = started.elapsed();
    assert!(state.metadata().expect("state file").len() > 0);
    assert_eq!(
        mem.metadata().expect("memory file").len(),
        u64::from(VmSize::Small.memory_mib()) << 20,
        "a full snapshot holds all guest memory"
    );
    vm.kill().await;
    assert_reaped(pid);

    let cfg2 = real.cfg();
    let started = Instant::now();
    let restored = match real.backend.restore(&cfg2, &state, &mem).await {
        Ok(vm) => vm,
        Err(e) => panic!("restore into a new Firecracker failed: {e}"),
    };
    let load = started.elapsed();
    let pid2 = restored.pids()[0];
    assert_ne!(pid, pid2, "a new process");
    assert!(alive(pid2));
    let info = real.api(&cfg2.id).instance_info().await.expect("GET /");
    assert_eq!(
        (info.id.as_str(), info.state.as_str()),
        (cfg2.id.as_str(), "Running"),
        "resume_vm"
    );
    eprintln!(
        "real Firecracker snapshot (jailed: {}): PUT /snapshot/create of {} MiB in {:.1} ms; \
         restore into a new process (start + logger + metrics + PUT /snapshot/load, resume_vm) in {:.1} ms",
        real.backend.jailed(),
        VmSize::Small.memory_mib(),
        create.as_secs_f64() * 1e3,
        load.as_secs_f64() * 1e3
    );
    restored.kill().await;
    assert_reaped(pid2);
    assert!(
        state.is_file() && mem.is_file(),
        "the snapshot files are the caller's"
    );
    real.assert_clean(&[&cfg.id, &cfg2.id]);
}

#[tokio::test]
async fn real_firecracker_snapshots_and_restores_into_a_new_process() {
    let bins = skip_unless!(
        "real_firecracker_snapshots_and_restores_into_a_new_process",
        real_bins()
    );
    snapshot_round_trip(&Real::new(bins, false, "3100000020+10")).await;
}

#[tokio::test]
async fn real_jailed_firecracker_snapshots_and_restores_into_a_new_jail() {
    let name = "real_jailed_firecracker_snapshots_and_restores_into_a_new_jail";
    let bins = skip_unless!(name, real_bins());
    skip_unless!(name, can_jail());
    snapshot_round_trip(&Real::new(bins, true, "3100000030+10")).await;
}

/// The command of issue 9 through the CLI, jailed, with the default images:
/// the configuration must be accepted (it failed at `PUT /boot-source` when the
/// symlinked kernel was hard-linked into the chroot as a symlink). With
/// hardware KVM the code runs; on PVM the guest dies in emulation
/// (KVM_EXIT_INTERNAL_ERROR) and the CLI reports that, after the whole
/// configuration was accepted. Either way nothing of the VM is left.
#[tokio::test]
async fn real_cli_run_on_jailed_firecracker_gets_past_the_configuration() {
    let name = "real_cli_run_on_jailed_firecracker_gets_past_the_configuration";
    let bins = skip_unless!(name, real_bins());
    skip_unless!(name, can_jail());
    skip_unless!(
        name,
        neurovisor::images::ImageSet::resolve(&Default::default())
            .map(|_| ())
            .map_err(|e| e.to_string())
    );
    let state = tempfile::Builder::new().prefix("nvfc-").tempdir().expect("state");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_neurovisor"))
        .args(["run", "--backend", "firecracker", "--firecracker-bin"])
        .arg(&bins.firecracker)
        .arg("--jailer-bin")
        .arg(&bins.jailer)
        .args(["--jail-ids", "3100000040-3100000049", "--size", "small"])
        .args(["--lang", "python", "-c", "print(1)"])
        .env("NEUROVISOR_STATE_DIR", state.path())
        .env_remove("NEUROVISOR_LOG")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(150), out)
        .await
        .expect("neurovisor run did not finish within 150 s")
        .expect("run neurovisor");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let pvm = neurovisor::vmm::accel::KvmProbe::host().verdict().is_err();
    if pvm {
        assert_eq!(out.status.code(), Some(125), "stdout: {stdout}\nstderr: {stderr}");
        // The guest dies in emulation, or (on a very slow host) is not ready in time.
        let died = stderr.contains("VM exited before its agent was ready")
            && stderr.contains("KVM_EXIT_INTERNAL_ERROR");
        assert!(
            died || stderr.contains("VM agent not ready after"),
            "not the PVM failure after a complete configuration:\n{stderr}"
        );
        assert!(
            !stderr.contains("Firecracker API call") && !stderr.contains("Status code: 400"),
            "{stderr}"
        );
    } else {
        assert_eq!(
            (out.status.code(), stdout.as_ref()),
            (Some(0), "1\n"),
            "stderr: {stderr}"
        );
    }
    eprintln!("neurovisor run (PVM: {pvm}) ended with {}", out.status);
    // The VM's id is Firecracker's instance id in its log lines: `[<id>:main]`.
    let ids: Vec<&str> = stderr
        .split('[')
        .filter_map(|s| s.split_once(':').map(|(id, _)| id))
        .filter(|id| id.len() == 36 && neurovisor::vmm::jailer::valid_jail_id(id))
        .collect();
    assert!(
        !pvm || !ids.is_empty(),
        "no instance id in the log tail:\n{stderr}"
    );
    let mut left = Vec::new();
    for sub in ["vms", "j"] {
        if let Ok(d) = std::fs::read_dir(state.path().join(sub)) {
            left.extend(d.flatten().map(|e| e.path()));
        }
    }
    assert!(left.is_empty(), "left behind in the state dir: {left:?}");
    let procs = processes_mentioning(&state.path().display().to_string());
    assert!(procs.is_empty(), "{procs:?}");
    for id in ids {
        assert!(processes_mentioning(id).is_empty(), "processes of VM {id} left");
        assert!(
            !Path::new("/run/netns").join(format!("nv-{id}")).exists(),
            "netns of {id} left"
        );
        if let Some(cg) = jail_cgroup(id) {
            assert!(!cg.exists(), "cgroup {} left behind", cg.display());
        }
    }
}

/// SIGTERM to `neurovisor run` while its jailed VM is up: the VM is destroyed
/// through `Drop` (the execution future is dropped), which must still remove
/// the chroot, the netns and the cgroup (removable only once Firecracker has
/// exited, which `Drop` waits for).
#[tokio::test]
async fn real_cli_terminated_while_jailed_firecracker_runs_leaves_no_jail() {
    let name = "real_cli_terminated_while_jailed_firecracker_runs_leaves_no_jail";
    let bins = skip_unless!(name, real_bins());
    skip_unless!(name, can_jail());
    skip_unless!(
        name,
        neurovisor::images::ImageSet::resolve(&Default::default())
            .map(|_| ())
            .map_err(|e| e.to_string())
    );
    let state = tempfile::Builder::new().prefix("nvfc-").tempdir().expect("state");
    let mut cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_neurovisor"))
        .args(["run", "--backend", "firecracker", "--firecracker-bin"])
        .arg(&bins.firecracker)
        .arg("--jailer-bin")
        .arg(&bins.jailer)
        .args(["--jail-ids", "3100000050-3100000059", "--size", "small"])
        .args(["--lang", "python", "-c", "print(1)"])
        .env("NEUROVISOR_STATE_DIR", state.path())
        .env_remove("NEUROVISOR_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start neurovisor run");
    // Wait until the VM is configured and started: its pid file and InstanceStart's 204.
    let jails = state.path().join("j").join(
        std::fs::canonicalize(&bins.firecracker)
            .expect("resolve")
            .file_name()
            .expect("name"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let (id, pid) = loop {
        let found = std::fs::read_dir(&jails)
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|e| {
                let root = e.path().join("root");
                let log = std::fs::read_to_string(root.join("firecracker.log")).ok()?;
                let started = log.matches("Status code: 204").count() >= BOOT_SEQUENCE.len();
                let pid: u32 = std::fs::read_to_string(root.join("firecracker.pid"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                started.then(|| (e.file_name().to_string_lossy().into_owned(), pid))
            });
        if let Some(f) = found {
            break f;
        }
        if let Ok(Some(status)) = cli.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = cli.stderr.take() {
                let _ = e.read_to_string(&mut err).await;
            }
            panic!("neurovisor run ended ({status}) before its VM started:\n{err}");
        }
        assert!(Instant::now() < deadline, "the VM did not start within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cg = jail_cgroup(&id);
    assert!(cg.as_ref().is_none_or(|c| c.is_dir()), "no cgroup for VM {id}");
    assert!(alive(pid));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cli.id().expect("pid") as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(20), cli.wait())
        .await
        .expect("neurovisor run did not stop within 20 s of SIGTERM")
        .expect("wait");
    assert_eq!(status.code(), Some(143));
    assert!(!alive(pid), "Firecracker {pid} outlived the CLI");
    assert!(!jails.join(&id).exists(), "chroot left behind");
    assert!(
        !Path::new("/run/netns").join(format!("nv-{id}")).exists(),
        "netns left behind"
    );
    if let Some(cg) = cg {
        assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    }
    let procs = processes_mentioning(&state.path().display().to_string());
    assert!(procs.is_empty(), "{procs:?}");
}

/// `--network` under the real jailer: the VM's gateway leaves a persistent
/// TAP owned by the jail's uid in the namespace the jailer puts Firecracker
/// in, Firecracker (unprivileged, seccomp-filtered) opens it by name at
/// `PUT /network-interfaces`, and teardown removes gateway, TAP and namespace.
/// The gateway's upstream is an empty namespace this test makes (no route
/// anywhere); the guest cannot run here, so no packet is sent.
#[tokio::test]
async fn real_jailed_firecracker_gets_its_network_from_the_gateway() {
    let name = "real_jailed_firecracker_gets_its_network_from_the_gateway";
    let bins = skip_unless!(name, real_bins());
    skip_unless!(name, can_jail());
    let real = Real::new(bins, true, "3100000060+10");
    let upstream = format!("nvtest-fcup-{}", std::process::id());
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ip(&["netns", "add", &upstream]);
    struct DeleteNs(String);
    impl Drop for DeleteNs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", &self.0])
                .status();
        }
    }
    let _up = DeleteNs(upstream.clone());

    let mut cfg = real.cfg();
    cfg.network = Some(Arc::new(neurovisor::net::NetSettings {
        policy: neurovisor::net::EgressPolicy::new(&["allowed.test".into()], &[], Some(1 << 20))
            .expect("policy"),
        upstream: neurovisor::net::Upstream {
            netns: Some(PathBuf::from("/run/netns").join(&upstream)),
            dns: vec!["192.0.2.2:53".parse().expect("addr")],
        },
        program: Some(PathBuf::from(env!("CARGO_BIN_EXE_neurovisor"))),
    }));
    let started = Instant::now();
    let vm = match real.backend.spawn(&cfg).await {
        Ok(vm) => vm,
        Err(e) => panic!("the real jailed Firecracker refused the network: {e}"),
    };
    let spawn = started.elapsed();
    let pids = vm.pids();
    assert_eq!(pids.len(), 2, "Firecracker and its gateway: {pids:?}");
    let (fc, gw) = (pids[0], pids[1]);
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{fc}/comm"))
            .expect("comm")
            .trim(),
        "firecracker"
    );
    let info = real.api(&cfg.id).instance_info().await.expect("GET /");
    assert_eq!(info.state, "Running", "{info:?}");
    eprintln!(
        "real jailed Firecracker with --network: gateway + jail + configuration + InstanceStart in {:.1} ms",
        spawn.as_secs_f64() * 1e3
    );

    // Firecracker accepted the interface, with the egress rate as its tx limiter.
    let root = real.jail_root(&cfg.id);
    let log = std::fs::read_to_string(root.join("firecracker.log")).expect("log");
    assert!(log.contains("/network-interfaces/eth0"), "{log}");
    assert!(log.contains(r#"\"host_dev_name\":\"tap0\""#), "{log}");
    assert!(log.contains(r#"\"tx_rate_limiter\""#), "{log}");
    assert!(
        !log.contains("Status code: 4") && !log.contains("Status code: 5"),
        "{log}"
    );
    // Firecracker holds the TAP: a tun descriptor attached to tap0.
    let holds_tap = std::fs::read_dir(format!("/proc/{fc}/fdinfo"))
        .expect("fdinfo")
        .flatten()
        .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|s| s.contains("iff:\ttap0")));
    assert!(holds_tap, "Firecracker has no descriptor of tap0");

    // In the VM's namespace (the jail's): the TAP, owned by the jail's uid,
    // and the gateway's rules; Firecracker is in it, the gateway is not.
    let ns = format!("nv-{}", cfg.id);
    let link = ip(&["-netns", &ns, "-d", "link", "show", "tap0"]);
    let uid = status_field(fc, "Uid")[0];
    assert!((3_100_000_060..3_100_000_070).contains(&uid), "uid {uid}");
    assert!(link.contains("tun type tap"), "{link}");
    assert!(link.contains(&format!("user {uid}")), "{link}");
    let addr = ip(&["-netns", &ns, "addr", "show", "tap0"]);
    assert!(addr.contains("10.200.0.1/30"), "{addr}");
    let rules = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "nft", "list", "ruleset"])
        .output()
        .expect("nft");
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(rules.contains("table inet neurovisor"), "{rules}");
    let netns_of = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/net")).expect("ns link");
    let ino = std::fs::metadata(PathBuf::from("/run/netns").join(&ns))
        .expect("named netns")
        .ino();
    assert_eq!(netns_of(fc).display().to_string(), format!("net:[{ino}]"));
    let up_ino = std::fs::metadata(PathBuf::from("/run/netns").join(&upstream))
        .expect("upstream netns")
        .ino();
    assert_eq!(
        netns_of(gw).display().to_string(),
        format!("net:[{up_ino}]"),
        "the gateway connects out from the upstream namespace"
    );
    // The gateway runs as the jail's uid with no capabilities.
    assert_eq!(status_field(gw, "Uid"), vec![uid; 4]);
    let caps = std::fs::read_to_string(format!("/proc/{gw}/status")).expect("status");
    assert!(caps.contains("CapEff:\t0000000000000000"), "{caps}");

    vm.kill().await;
    assert_reaped(fc);
    assert_reaped(gw);
    assert!(
        !PathBuf::from("/run/netns").join(&ns).exists(),
        "netns left behind"
    );
    real.assert_clean(&[&cfg.id]);
}

/// Unjailed Firecracker cannot be put in the VM's namespace: `--network` is
/// refused before anything starts, naming the way out.
#[tokio::test]
async fn unjailed_firecracker_refuses_network_naming_the_jailer() {
    let e = env(Script::Sleep);
    let mut cfg = e.cfg(VmSize::Small);
    cfg.network = Some(Arc::new(neurovisor::net::NetSettings {
        policy: Default::default(),
        upstream: Default::default(),
        program: None,
    }));
    let err = match e.backend.spawn(&cfg).await {
        Ok(_) => panic!("an unjailed Firecracker VM got a network"),
        Err(err) => err.to_string(),
    };
    assert!(
        err.contains("needs its jailer") && err.contains("--backend qemu"),
        "{err}"
    );
    e.assert_clean();
}
