//! How clients reach the daemon, and who may (issue 10): the Unix socket in
//! the state directory (file permissions and the `neurovisor` group), the
//! token on the optional TCP listener, TLS, discovery that never probes TCP,
//! and the ownership checks on the state directory. Real daemons, real VMs
//! where something executes.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{req, start_daemon_at, start_daemon_in, Daemon};
use neurovisor_proto::v1::sandbox_client::SandboxClient;
use neurovisor_proto::v1::LanguagesRequest;

const BIN: &str = env!("CARGO_BIN_EXE_neurovisor");
const NOBODY: u32 = 65534;

fn tempdir(prefix: &str) -> Arc<tempfile::TempDir> {
    Arc::new(
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("tempdir"),
    )
}

/// `neurovisor` with none of the developer's client settings.
fn nv() -> Command {
    let mut c = Command::new(BIN);
    for v in [
        "NEUROVISOR_ADDR",
        "NEUROVISOR_LOCAL",
        "NEUROVISOR_TOKEN",
        "NEUROVISOR_TLS_CA",
        "NEUROVISOR_STATE_DIR",
        "NEUROVISOR_LOG",
        "NEUROVISOR_LISTEN",
        "NEUROVISOR_GRPC_ADDR",
    ] {
        c.env_remove(v);
    }
    c.stdin(Stdio::null());
    c
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).expect("stat").mode() & 0o7777
}

fn neurovisor_gid() -> u32 {
    match nix::unistd::Group::from_name("neurovisor") {
        Ok(Some(g)) => g.gid.as_raw(),
        _ => panic!(
            "group neurovisor missing: run `bash scripts/setup.sh` (or `groupadd --system neurovisor`)"
        ),
    }
}

/// `neurovisor run --addr ADDR --lang python -c CODE` as uid/gid `nobody`
/// with exactly `groups` as supplementary groups.
fn run_as_nobody(addr: &str, code: &str, groups: Vec<libc::gid_t>) -> Output {
    let mut c = nv();
    c.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir("/")
        .args(["run", "--addr", addr, "--lang", "python", "-c", code]);
    // SAFETY: only async-signal-safe calls (setgroups, setgid, setuid) on
    // memory allocated before the fork.
    unsafe {
        c.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().expect("run as nobody")
}

fn log_of(d: &Daemon) -> String {
    d.log_text()
}

#[test]
fn the_unix_socket_is_the_default_and_only_its_owner_and_group_may_use_it() {
    let gid = neurovisor_gid();
    let state = tempdir("nvtr-");
    // Others may enter the directory: the socket's own mode is what decides.
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // The socket a SIGKILLed daemon left behind is replaced.
    let sock = state.path().join("neurovisor.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("stale socket"));
    let d = start_daemon_in(state.clone(), &["--warm", "1", "--max", "2"]);
    assert_eq!(d.socket, sock);
    assert!(d.tcp.is_none(), "no TCP listener unless asked");
    let meta = std::fs::symlink_metadata(&sock).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(
        (meta.mode() & 0o7777, meta.gid()),
        (0o660, gid),
        "socket mode and group"
    );
    d.wait_warm(1);

    // `run` with the same --state-dir finds the daemon: its log shows the
    // request with our credentials, and the VM came from the pool.
    let child = nv()
        .arg("run")
        .arg("--state-dir")
        .arg(state.path())
        .args(["--json", "--lang", "python", "-c", "print(6*7)"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let pid = child.id();
    let out = child.wait_with_output().expect("run");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}\n{}", log_of(&d));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(v["stdout"], "42\n");
    assert_eq!(v["sandbox"]["daemon"], d.addr(), "{v}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let logged = loop {
        let log = log_of(&d);
        let line = log
            .lines()
            .find(|l| l.contains(&format!("peer_pid={pid}")) && l.contains("Sandbox/Execute"))
            .map(str::to_string);
        if line.is_some() || Instant::now() > deadline {
            break line;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let line = logged.unwrap_or_else(|| panic!("no request of pid {pid} in the daemon log:\n{}", log_of(&d)));
    assert!(
        line.contains("peer_uid=0") && line.contains("peer_gid=0"),
        "{line}"
    );

    // Another local user, not in the group: connect() is refused (EACCES).
    let o = run_as_nobody(&d.addr(), "print(1)", vec![]);
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(125), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("os error 13") && stderr.contains("join the group neurovisor"),
        "{stderr}"
    );
    // The same user in the group may.
    let o = run_as_nobody(&d.addr(), "print(7)", vec![gid]);
    let (stdout, stderr) = text(&o);
    assert!(
        o.status.success() && stdout == "7\n",
        "{stdout}\n{stderr}\n{}",
        log_of(&d)
    );
    assert!(
        log_of(&d).contains(&format!("peer_uid={NOBODY}")),
        "{}",
        log_of(&d)
    );

    // Discovery ignores a socket in a directory others may write.
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let o = nv()
        .arg("run")
        .arg("--state-dir")
        .arg(state.path())
        .args(["--lang", "nosuchlang", "-c", "x"])
        .output()
        .expect("run");
    let (_, stderr) = text(&o);
    assert!(
        stderr.contains("not using the daemon socket") && stderr.contains("writable by others"),
        "{stderr}"
    );
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");

    assert_eq!(d.stop(), Some(0));
    assert!(!sock.exists(), "socket removed at shutdown");
}

#[test]
fn without_its_group_the_socket_is_private_and_the_state_dir_is_made_0750() {
    let state = tempdir("nvtr-");
    let dir = state.path().join("state");
    let d = start_daemon_at(
        state.clone(),
        dir.clone(),
        &["--warm", "0", "--socket-group", "nvtest-no-such-group"],
    );
    assert_eq!(mode(&dir), 0o750, "state dir created 0750");
    assert_eq!(mode(&d.socket), 0o600, "socket for the owner only");
    let log = log_of(&d);
    assert!(
        log.contains("group nvtest-no-such-group does not exist") && log.contains("groupadd --system"),
        "{log}"
    );
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let langs = rt.block_on(async { d.client().await.languages(LanguagesRequest {}).await });
    assert!(langs.is_ok(), "owner connects: {langs:?}");
    drop(rt);
    assert_eq!(d.stop(), Some(0));
}

async fn tcp_client(url: String) -> SandboxClient<tonic::transport::Channel> {
    SandboxClient::connect(url).await.expect("connect")
}

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    r
}

#[test]
fn tcp_needs_the_token_from_the_token_file() {
    let state = tempdir("nvtr-");
    let d = start_daemon_in(
        state.clone(),
        &["--listen", "127.0.0.1:0", "--warm", "1", "--max", "2"],
    );
    let tcp = d.tcp.clone().expect("tcp listener");
    let token_file = state.path().join("token");
    assert_eq!(mode(&token_file), 0o600);
    let token = std::fs::read_to_string(&token_file)
        .expect("token")
        .trim()
        .to_string();
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "{token}"
    );
    d.wait_warm(1);

    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let url = format!("http://{tcp}");
        let mut c = tcp_client(url.clone()).await;
        let e = c.languages(LanguagesRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(
            e.message().contains("NEUROVISOR_TOKEN")
                && e.message().contains(&token_file.display().to_string()),
            "{}",
            e.message()
        );
        let e = c
            .languages(with_token(LanguagesRequest {}, &"0".repeat(64)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().starts_with("wrong token"), "{}", e.message());
        // Health (and reflection) over TCP need it too.
        let mut h = tonic_health::pb::health_client::HealthClient::new(
            tonic::transport::Endpoint::from_shared(url.clone())
                .expect("url")
                .connect()
                .await
                .expect("connect"),
        );
        let e = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let ok = h
            .check(with_token(
                tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                },
                &token,
            ))
            .await;
        assert!(ok.is_ok(), "{ok:?}");
        // Each refusal is counted by transport and reason.
        let metrics = common::daemon::http_get(&d.metrics, "/metrics").1;
        for line in [
            r#"neurovisor_auth_failures_total{transport="tcp",reason="no_token"} 2"#,
            r#"neurovisor_auth_failures_total{transport="tcp",reason="wrong_token"} 1"#,
        ] {
            assert!(metrics.lines().any(|l| l == line), "missing {line}:\n{metrics}");
        }
        let r = c
            .execute_once(with_token(req("python", "print(6*7)"), &token))
            .await
            .expect("with the token")
            .into_inner();
        assert_eq!((r.exit_code, &r.stdout[..]), (Some(0), &b"42\n"[..]));
        // Over the Unix socket no token is needed.
        d.client()
            .await
            .languages(LanguagesRequest {})
            .await
            .expect("unix");
    });
    drop(rt);

    // The CLI sends NEUROVISOR_TOKEN (another state dir: no token file there)...
    let elsewhere = tempdir("nvtr-");
    let run = |env_token: Option<&str>, state_dir: &Path| {
        let mut c = nv();
        c.args(["run", "--addr", &tcp, "--lang", "python", "-c", "print(6*7)"])
            .arg("--state-dir")
            .arg(state_dir);
        if let Some(t) = env_token {
            c.env("NEUROVISOR_TOKEN", t);
        }
        c.output().expect("run")
    };
    let o = run(Some(&token), elsewhere.path());
    let (stdout, stderr) = text(&o);
    assert!(o.status.success() && stdout == "42\n", "{stdout}\n{stderr}");
    // ... or the token file of its state dir.
    let o = run(None, state.path());
    let (stdout, stderr) = text(&o);
    assert!(o.status.success() && stdout == "42\n", "{stdout}\n{stderr}");
    let o = run(Some("nope"), elsewhere.path());
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("wrong token") && stderr.contains("NEUROVISOR_TOKEN"),
        "{stderr}"
    );
    let o = run(None, elsewhere.path());
    let (_, stderr) = text(&o);
    assert!(
        stderr.contains("no token") && o.status.code() == Some(125),
        "{stderr}"
    );
    assert!(log_of(&d).contains("refused"), "refusals are logged");
    assert_eq!(d.stop(), Some(0));

    // The token is kept across restarts.
    let d = start_daemon_in(state.clone(), &["--listen", "127.0.0.1:0", "--warm", "0"]);
    let again = std::fs::read_to_string(&token_file).expect("token");
    assert_eq!(again.trim(), token);
    assert_eq!(d.stop(), Some(0));
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the TLS test needs the openssl command (apt-get install openssl)");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A throwaway CA and a certificate for localhost/127.0.0.1 signed by it.
fn make_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=nvtest CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &a);
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &a);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}

#[test]
fn tls_listener_takes_tls_clients_with_the_ca_and_the_token() {
    let certs = tempdir("nvtr-certs-");
    let (ca, cert, key) = make_certs(certs.path());
    let state = tempdir("nvtr-");
    let (cert_s, key_s) = (cert.to_str().expect("utf8"), key.to_str().expect("utf8"));
    let d = start_daemon_in(
        state.clone(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert_s,
            "--tls-key",
            key_s,
            "--warm",
            "0",
            "--max",
            "1",
        ],
    );
    let tcp = d.tcp.clone().expect("tcp");
    assert!(log_of(&d).contains(&format!("https://{tcp}")), "{}", log_of(&d));
    let token = std::fs::read_to_string(state.path().join("token")).expect("token");
    let port = tcp.rsplit(':').next().expect("port");

    // A plaintext client gets nowhere.
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{tcp}"))
            .expect("url")
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await;
        if let Ok(ch) = plain {
            let r = SandboxClient::new(ch)
                .languages(with_token(LanguagesRequest {}, token.trim()))
                .await;
            assert!(r.is_err(), "plaintext over TLS answered: {r:?}");
        }
    });
    drop(rt);

    let elsewhere = tempdir("nvtr-");
    let run = |addr: &str, ca: Option<&Path>, token: Option<&str>| {
        let mut c = nv();
        c.args(["run", "--addr", addr, "--lang", "python", "-c", "print(6*7)"])
            .arg("--state-dir")
            .arg(elsewhere.path());
        if let Some(ca) = ca {
            c.arg("--tls-ca").arg(ca);
        }
        if let Some(t) = token {
            c.env("NEUROVISOR_TOKEN", t.trim());
        }
        c.output().expect("run")
    };
    for host in ["127.0.0.1", "localhost"] {
        let o = run(&format!("https://{host}:{port}"), Some(&ca), Some(&token));
        let (stdout, stderr) = text(&o);
        assert!(
            o.status.success() && stdout == "42\n",
            "{host}: {stdout}\n{stderr}\n{}",
            log_of(&d)
        );
    }
    // Without our CA the certificate is not trusted, and the error says what to pass.
    let o = run(&format!("https://127.0.0.1:{port}"), None, Some(&token));
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("--tls-ca"), "{stderr}");
    // TLS is no substitute for the token.
    let o = run(&format!("https://127.0.0.1:{port}"), Some(&ca), None);
    let (_, stderr) = text(&o);
    assert!(
        o.status.code() == Some(125) && stderr.contains("no token"),
        "{stderr}"
    );
    assert_eq!(d.stop(), Some(0));

    // A key that is not a key: one line, before anything starts.
    let bad = certs.path().join("bad.pem");
    std::fs::write(&bad, "not a key\n").expect("write");
    let o = serve(
        state.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert_s,
            "--tls-key",
            bad.to_str().expect("utf8"),
        ],
    );
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.starts_with("neurovisor: TLS:") && stderr.contains("--tls-key"),
        "{stderr}"
    );
    assert!(!state.path().join("neurovisor.sock").exists());
    // Half a TLS configuration is bad input.
    let o = serve(state.path(), &["--listen", "127.0.0.1:0", "--tls-cert", cert_s]);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--tls-cert needs --tls-key"), "{stderr}");
}

#[test]
fn run_never_talks_to_a_tcp_listener_on_the_old_port() {
    let listener = match std::net::TcpListener::bind("127.0.0.1:50051") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("skipped: 127.0.0.1:50051 is taken ({e})");
            return;
        }
    };
    listener.set_nonblocking(true).expect("nonblocking");
    let state = tempdir("nvtr-");
    let o = nv()
        .args([
            "run",
            "--local=false",
            "--size",
            "small",
            "--lang",
            "python",
            "-c",
            "print(6*7)",
        ])
        .arg("--state-dir")
        .arg(state.path())
        .output()
        .expect("run");
    let (stdout, stderr) = text(&o);
    assert!(o.status.success() && stdout == "42\n", "{stdout}\n{stderr}");
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        match listener.accept() {
            Ok((_, peer)) => panic!("`run` connected to 127.0.0.1:50051 (from {peer})"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    common::assert_no_leftovers(state.path());
}

fn serve(state_dir: &Path, extra: &[&str]) -> Output {
    nv().args(["serve", "--warm", "0", "--metrics-addr", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(state_dir)
        .args(extra)
        .output()
        .expect("serve")
}

/// serve fails with exit 125 and exactly one line that contains `what`.
fn refused(state_dir: &Path, extra: &[&str], what: &str) {
    let o = serve(state_dir, extra);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(125), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("neurovisor: ") && stderr.contains(what),
        "{stderr}"
    );
    assert!(!state_dir.join("neurovisor.sock").exists());
}

#[test]
fn unsafe_state_directories_lock_and_token_files_are_refused() {
    let t = tempdir("nvtr-");
    let chmod =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");

    let open = t.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    chmod(&open, 0o777);
    refused(
        &open,
        &[],
        &format!(
            "state directory {d} is writable by others (mode 0777); chmod 0750 {d} or pass --state-dir",
            d = open.display()
        ),
    );

    let real = t.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    // As the daemon makes it (else it warns that the group cannot reach the socket).
    std::os::unix::fs::chown(&real, None, Some(neurovisor_gid())).expect("chgrp");
    chmod(&real, 0o750);
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    refused(&link, &[], "is a symbolic link");

    let theirs = t.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).expect("chown");
    refused(&theirs, &[], &format!("belongs to uid {NOBODY}"));

    // <state>/daemon is checked the same way.
    let daemon = real.join("daemon");
    std::fs::create_dir(&daemon).expect("mkdir");
    chmod(&daemon, 0o777);
    refused(
        &real,
        &[],
        &format!("daemon directory {} is writable by others", daemon.display()),
    );
    chmod(&daemon, 0o700);

    // A symlinked lock file is not followed: its target is neither created nor written.
    let victim = t.path().join("victim");
    std::os::unix::fs::symlink(&victim, daemon.join("lock")).expect("symlink");
    refused(&real, &[], "lock file");
    assert!(!victim.exists(), "the lock's symlink was followed");
    std::fs::write(&victim, "precious").expect("write");
    refused(&real, &[], "is a symbolic link");
    assert_eq!(std::fs::read_to_string(&victim).expect("read"), "precious");
    std::fs::remove_file(daemon.join("lock")).expect("rm");

    // The token file: not readable by others, not a symlink.
    let token = real.join("token");
    std::fs::write(&token, format!("{}\n", "a".repeat(64))).expect("write");
    chmod(&token, 0o644);
    refused(
        &real,
        &["--listen", "127.0.0.1:0"],
        &format!(
            "token file {} can be read by others (mode 0644); chmod 0600",
            token.display()
        ),
    );
    std::fs::remove_file(&token).expect("rm");
    std::os::unix::fs::symlink(&victim, &token).expect("symlink");
    refused(&real, &["--listen", "127.0.0.1:0"], "is a symbolic link");
    assert_eq!(std::fs::read_to_string(&victim).expect("read"), "precious");
}
