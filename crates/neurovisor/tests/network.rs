//! `--network`: real VMs behind their gateways, against a hermetic
//! "internet": two network namespaces this test creates, joined by a veth
//! pair and nothing else (no route off the machine). The gateway connects
//! from the first (`up`, standing in for the host: 192.0.2.1); the second
//! (`net`) holds the test's servers on 203.0.113.10-12, 169.254.169.254,
//! 10.77.0.20 and its resolver on 192.0.2.2 (hickory's wire format).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{processes_mentioning, text, Cli};

const ESCAPE: &str = include_str!("net/escape.py");

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run a tool");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test's internet; removed on drop.
struct Internet {
    up: String,
    net: String,
    servers: Child,
    stop: Arc<AtomicBool>,
    dns: Option<std::thread::JoinHandle<()>>,
    ca: String,
    _certs: tempfile::TempDir,
}

const NAMES: &[(&str, [u8; 4])] = &[
    ("allowed.test", [203, 0, 113, 10]),
    ("other.test", [203, 0, 113, 11]),
    ("second.test", [203, 0, 113, 12]),
    ("rebind.test", [10, 77, 0, 20]),
    ("meta.test", [169, 254, 169, 254]),
    ("pypi.test", [203, 0, 113, 20]),
    ("git.test", [203, 0, 113, 21]),
];

impl Internet {
    fn start() -> Self {
        let tag = format!("{}-{}", std::process::id(), rand_tag());
        let (up, net) = (format!("nvt-up-{tag}"), format!("nvt-net-{tag}"));
        sh(&["ip", "netns", "add", &up]);
        sh(&["ip", "netns", "add", &net]);
        sh(&[
            "ip", "-n", &up, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &net,
        ]);
        for (ns, dev, addr) in [(&up, "va", "192.0.2.1/24"), (&net, "vb", "192.0.2.2/24")] {
            sh(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&["ip", "-n", &up, "route", "add", "default", "via", "192.0.2.2"]);
        for a in [
            "203.0.113.10",
            "203.0.113.11",
            "203.0.113.12",
            "203.0.113.20",
            "203.0.113.21",
            "169.254.169.254",
            "10.77.0.20",
        ] {
            sh(&["ip", "-n", &net, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        let certs = tempfile::tempdir().expect("cert dir");
        let ca = make_certs(certs.path());
        let files = certs.path().join("files");
        make_index(&files.join("pypi.test"));
        make_repo(&files.join("git.test"));
        let servers_py = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/net/servers.py");
        let mut servers = Command::new("ip")
            .args(["netns", "exec", &net, "python3"])
            .arg(&servers_py)
            .arg(certs.path().join("leaf.pem"))
            .arg(certs.path().join("leaf.key"))
            .arg(&files)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start the test servers");
        let mut line = String::new();
        BufReader::new(servers.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("servers ready");
        assert_eq!(line.trim(), "ready");
        let stop = Arc::new(AtomicBool::new(false));
        let dns = {
            let (stop, ns) = (stop.clone(), format!("/run/netns/{net}"));
            std::thread::spawn(move || dns_server(&ns, &stop))
        };
        // The resolver binds in its own thread: wait until it answers.
        std::thread::sleep(Duration::from_millis(200));
        Self {
            up,
            net,
            servers,
            stop,
            dns: Some(dns),
            ca,
            _certs: certs,
        }
    }

    fn upstream(&self) -> String {
        format!("/run/netns/{}", self.up)
    }

    /// `neurovisor ARGS` with this internet as its gateways' upstream.
    fn run(&self, cli: &Cli, args: &[&str]) -> std::process::Output {
        let up = self.upstream();
        let mut all = args.to_vec();
        all.extend(["--net-upstream-netns", &up, "--net-dns", "192.0.2.2"]);
        cli.run(&all)
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        drop(self.servers.stdin.take());
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.servers.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.servers.wait();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.dns.take() {
            let _ = t.join();
        }
        for ns in [&self.up, &self.net] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// No process mentions `state` (a test's state directory) within `wait`.
fn assert_no_process_of(state: &str, wait: Duration) {
    let deadline = Instant::now() + wait;
    while !processes_mentioning(state).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        processes_mentioning(state).is_empty(),
        "{:?}",
        processes_mentioning(state)
    );
}

fn rand_tag() -> String {
    let mut b = [0u8; 3];
    getrandom::getrandom(&mut b).expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A CA and a leaf for allowed.test and second.test; returns the CA's PEM.
fn make_certs(dir: &Path) -> String {
    let p = |f: &str| dir.join(f).display().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["openssl", "req", "-x509"];
    ca.extend(ec);
    let (ca_key, ca_pem) = (p("ca.key"), p("ca.pem"));
    ca.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_pem,
        "-days",
        "1",
        "-subj",
        "/CN=nv-test-ca",
    ]);
    sh(&ca);
    let mut leaf = vec!["openssl", "req"];
    leaf.extend(ec);
    let (leaf_key, leaf_csr, leaf_pem, ext) = (p("leaf.key"), p("leaf.csr"), p("leaf.pem"), p("ext"));
    leaf.extend([
        "-keyout",
        &leaf_key,
        "-out",
        &leaf_csr,
        "-subj",
        "/CN=allowed.test",
    ]);
    sh(&leaf);
    std::fs::write(&ext, "subjectAltName=DNS:allowed.test,DNS:second.test\n").expect("ext");
    sh(&[
        "openssl",
        "x509",
        "-req",
        "-in",
        &leaf_csr,
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &leaf_pem,
        "-days",
        "1",
        "-extfile",
        &ext,
    ]);
    std::fs::read_to_string(&ca_pem).expect("ca")
}

/// A package index with the wheel `nvtestpkg` (its `answer()` is 42).
fn make_index(root: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/net/make_index.py");
    sh(&[
        "python3",
        &script.display().to_string(),
        &root.display().to_string(),
    ]);
}

/// A git repository served over dumb HTTP (`repo.git`): a test that needs
/// `nvtestpkg` (its requirements.txt) and a file only its branch `v2` has.
fn make_repo(root: &Path) {
    let work = root.join("work");
    std::fs::create_dir_all(&work).expect("repo dir");
    std::fs::write(work.join("requirements.txt"), "nvtestpkg==1.0\n").expect("requirements");
    std::fs::write(
        work.join("test_answer.py"),
        "import nvtestpkg\nassert nvtestpkg.answer() == 42\nprint('repo test passed')\n",
    )
    .expect("test file");
    let w = work.display().to_string();
    let git = |args: &[&str]| {
        let mut all = vec![
            "git",
            "-C",
            &w,
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ];
        all.extend(args);
        sh(&all);
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-qm", "first"]);
    git(&["checkout", "-qb", "v2"]);
    std::fs::write(work.join("V2"), "v2\n").expect("v2");
    git(&["add", "."]);
    git(&["commit", "-qm", "second"]);
    git(&["checkout", "-q", "main"]);
    let bare = root.join("repo.git").display().to_string();
    sh(&["git", "clone", "-q", "--bare", &w, &bare]);
    sh(&["git", "-C", &bare, "update-server-info"]);
}

/// The internet's resolver: A records from [`NAMES`], NXDOMAIN otherwise.
fn dns_server(ns: &str, stop: &AtomicBool) {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
    let f = std::fs::File::open(ns).expect("netns");
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the internet");
    let sock = std::net::UdpSocket::bind("192.0.2.2:53").expect("bind the test resolver");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let mut r = Message::new();
        r.set_id(q.id())
            .set_message_type(MessageType::Response)
            .set_recursion_available(true);
        for query in q.queries() {
            r.add_query(query.clone());
            let name = query.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
            match NAMES.iter().find(|(n, _)| *n == name) {
                Some((_, ip)) if query.query_type() == RecordType::A => {
                    r.add_answer(Record::from_rdata(
                        query.name().clone(),
                        60,
                        RData::A(A(std::net::Ipv4Addr::from(*ip))),
                    ));
                }
                Some(_) => {}
                None => {
                    r.set_response_code(ResponseCode::NXDomain);
                }
            }
        }
        if let Ok(bytes) = r.to_vec() {
            let _ = sock.send_to(&bytes, from);
        }
    }
}

#[test]
fn every_way_out_is_refused_but_the_allowed_host() {
    let internet = Internet::start();
    let cli = Cli::logging("neurovisor=info");
    let code = ESCAPE.replace("@CA@", &internet.ca);
    let out = internet.run(
        &cli,
        &[
            "run",
            "--network",
            "--allow-host",
            "allowed.test",
            "--allow-host",
            "second.test",
            "--allow-host",
            "rebind.test",
            "--timeout",
            "120s",
            "--lang",
            "python",
            "-c",
            &code,
        ],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    let r: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    eprintln!("what the VM got: {r:#}");
    let get = |k: &str| r[k].as_str().unwrap_or_default().to_string();
    assert_eq!(get("interfaces"), "ok:eth0,lo", "{r:#}");
    assert_eq!(get("resolve_allowed"), "ok:203.0.113.10", "{r:#}");
    assert!(
        get("http_allowed").starts_with("ok:hello from 203.0.113.10:80 host=allowed.test"),
        "{r:#}"
    );
    assert!(
        get("https_allowed").starts_with("ok:hello from 203.0.113.10:443 host=allowed.test"),
        "{r:#}"
    );
    assert_eq!(get("resolve_second"), "ok:203.0.113.12", "{r:#}");
    for k in [
        "direct_ip",
        "other_port",
        "metadata_v4",
        "metadata_v6",
        "private",
        "upstream_host",
        "gateway_ssh",
        "gateway_filter_port",
        "resolve_other",
        "dns_txt",
        "dns_tunnel",
        "dns_upstream_direct",
        "host_mismatch",
        "sni_mismatch",
        "fronting_host",
        "fronting_sni",
        "rebinding",
        "ipv6",
        "icmp",
        "udp",
    ] {
        assert!(get(k).starts_with("refused:"), "{k} was not refused: {r:#}");
    }
    // The host heard the gateway's reasons (and counts them on /metrics).
    for reason in [
        "metadata",
        "private_address",
        "address_not_resolved",
        "port",
        "host_address",
        "name_not_allowed",
        "name_address_mismatch",
        "resolves_to_private_address",
        "query_type",
    ] {
        assert!(
            stderr.contains(&format!("reason={reason}")),
            "no refusal for {reason} was logged:\n{stderr}"
        );
    }
}

#[test]
fn no_network_means_no_interface_and_egress_flags_are_checked_first() {
    let cli = Cli::logging("neurovisor=info");
    let out = cli.run(&[
        "run",
        "--lang",
        "python",
        "-c",
        "import os; print(','.join(sorted(os.listdir('/sys/class/net'))))",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "lo");

    for (args, want) in [
        (vec!["--allow-host", "a.test"], "need --network"),
        (
            vec!["--network", "--allow-host", "10.0.0.1"],
            "list names here and address ranges under cidrs",
        ),
        (
            vec!["--network", "--allow-cidr", "10.0.0/8"],
            "is not an address range",
        ),
        (
            vec!["--network", "--net-upstream-netns", "/run/netns/nv-no-such"],
            "no such namespace file",
        ),
        (vec!["--network", "--snapshot"], "drop --snapshot"),
    ] {
        let mut all = vec!["run", "--lang", "python"];
        all.extend(args.iter().copied());
        all.extend(["-c", "print(1)"]);
        let out = cli.run(&all);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn a_profile_s_egress_is_what_the_vm_may_reach() {
    let internet = Internet::start();
    let cli = Cli::logging("neurovisor=info");
    let profile = cli.state.path().join("egress.yaml");
    std::fs::write(
        &profile,
        "description: reaches one test host\nimage: default\negress:\n  domains: [allowed.test]\n",
    )
    .expect("profile");
    let code = "import urllib.request, socket\n\
                print(urllib.request.urlopen('http://allowed.test/', timeout=5).read().decode().strip())\n\
                try:\n    socket.gethostbyname('other.test'); print('other: resolved')\n\
                except OSError: print('other: refused')\n";
    let out = internet.run(
        &cli,
        &[
            "run",
            "--profile",
            &profile.display().to_string(),
            "--timeout",
            "60s",
            "--lang",
            "python",
            "-c",
            code,
        ],
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", text(&out.stderr));
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["hello from 203.0.113.10:80 host=allowed.test", "other: refused"]
    );
}

#[test]
fn a_sigkilled_run_leaves_no_gateway_namespace_or_process() {
    let internet = Internet::start();
    let cli = Cli::logging("neurovisor=info");
    let mut child = cli
        .cmd(&[
            "run",
            "--network",
            "--allow-host",
            "allowed.test",
            "--net-upstream-netns",
            &internet.upstream(),
            "--net-dns",
            "192.0.2.2",
            "--lang",
            "python",
            "-c",
            "import socket, time; print(socket.gethostbyname('allowed.test'), flush=True); time.sleep(60)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    assert_eq!(line.trim(), "203.0.113.10");
    let state = cli.state.path().display().to_string();
    assert!(
        processes_mentioning(&format!("nv-gateway:{state}")).len() == 1,
        "the gateway runs: {:?}",
        processes_mentioning(&state)
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert_no_process_of(&state, Duration::from_secs(10));
    // The next run removes what the killed one left on disk.
    let out = cli.run(&["run", "--lang", "bash", "-c", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn a_confined_daemon_s_pool_vms_have_the_policy_and_count_its_decisions() {
    let internet = Internet::start();
    let daemon = common::daemon::start_daemon(&[
        "--warm",
        "1",
        "--max",
        "2",
        "--network",
        "--allow-host",
        "allowed.test",
        "--net-upstream-netns",
        &internet.upstream(),
        "--net-dns",
        "192.0.2.2",
    ]);
    daemon.wait_warm(1);
    let code = "import urllib.request\n\
                print(urllib.request.urlopen('http://allowed.test/', timeout=5).read().decode().strip())\n\
                try:\n    urllib.request.urlopen('http://169.254.169.254/', timeout=5); print('metadata: reached')\n\
                except OSError: print('metadata: refused')\n";
    let out = Command::new(env!("CARGO_BIN_EXE_neurovisor"))
        .args(["run", "--addr", &daemon.addr(), "--lang", "python", "-c", code])
        .env_remove("NEUROVISOR_LOG")
        .output()
        .expect("run through the daemon");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).lines().collect::<Vec<_>>(),
        [
            "hello from 203.0.113.10:80 host=allowed.test",
            "metadata: refused"
        ]
    );
    let (_, metrics) = common::daemon::http_get(&daemon.metrics, "/metrics");
    for series in [
        r#"neurovisor_egress_decisions_total{kind="dns",decision="allowed",reason="allowed"}"#,
        r#"neurovisor_egress_decisions_total{kind="tcp",decision="allowed",reason="allowed"}"#,
        r#"neurovisor_egress_decisions_total{kind="tcp",decision="refused",reason="metadata"}"#,
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    // Per live VM: a sandbox's VM has its own series, gone with it.
    let sandbox = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_neurovisor"))
            .arg("sandbox")
            .args(args)
            .args(["--addr", &daemon.addr()])
            .env_remove("NEUROVISOR_LOG")
            .output()
            .expect("neurovisor sandbox");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let id = sandbox(&["create"]);
    let got = sandbox(&[
        "exec",
        &id,
        "--lang",
        "python",
        "-c",
        "import urllib.request\nfor u in ['http://allowed.test/', 'http://10.77.0.20/']:\n    try: urllib.request.urlopen(u, timeout=5); print('reached')\n    except OSError: print('refused')",
    ]);
    assert_eq!(got, "reached\nrefused");
    let per_vm = || {
        let (_, m) = common::daemon::http_get(&daemon.metrics, "/metrics");
        m.lines()
            .filter(|l| l.starts_with("neurovisor_vm_egress_decisions_total{"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let series = per_vm();
    let value = |decision: &str| -> f64 {
        series
            .iter()
            .filter(|l| l.contains(&format!("decision=\"{decision}\"")))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    // allowed: the DNS answer and the connection; refused: 10.77.0.20.
    assert!(value("allowed") >= 2.0 && value("refused") >= 1.0, "{series:#?}");
    sandbox(&["kill", &id]);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Pool VMs that made no decision have series at 0; the sandbox's goes.
    while !per_vm().iter().all(|l| l.ends_with(" 0")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        per_vm().iter().all(|l| l.ends_with(" 0")),
        "the killed sandbox's series stayed: {:#?}",
        per_vm()
    );

    // The refill's gateway runs; SIGKILL of the daemon ends it too.
    daemon.wait_warm(1);
    let state = daemon.dir.display().to_string();
    let gateways = || processes_mentioning(&format!("nv-gateway:{state}")).len();
    // The used VM's gateway goes with it (its teardown runs after the answer).
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateways() != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gateways(), 1, "{:?}", processes_mentioning(&state));
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    assert_no_process_of(&state, Duration::from_secs(10));
}

#[test]
fn install_reaches_only_the_package_index_then_runs_the_command() {
    let internet = Internet::start();
    let cli = Cli::logging("neurovisor=info");
    let script = cli.state.path().join("analysis.py");
    std::fs::write(
        &script,
        "import nvtestpkg, urllib.request\n\
         print('answer', nvtestpkg.answer())\n\
         try:\n    urllib.request.urlopen('http://allowed.test/', timeout=5); print('allowed.test: reached')\n\
         except OSError: print('allowed.test: refused')\n",
    )
    .expect("script");
    let out = internet.run(
        &cli,
        &[
            "install",
            "--lang",
            "python",
            "--packages",
            "nvtestpkg==1.0",
            "--index-url",
            "http://pypi.test/simple/",
            "--file",
            &script.display().to_string(),
            "--command",
            "python3 analysis.py",
        ],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["answer 42", "allowed.test: refused"],
        "{stderr}"
    );
    assert!(
        stderr.contains("installing nvtestpkg==1.0 from http://pypi.test/simple/"),
        "{stderr}"
    );

    // A package the index lacks fails the job with pip's own words.
    let out = internet.run(
        &cli,
        &[
            "install",
            "--packages",
            "nosuchpkg",
            "--index-url",
            "http://pypi.test/simple/",
            "--command",
            "echo never",
        ],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(!text(&out.stdout).contains("never"));
    assert!(
        text(&out.stderr).contains("No matching distribution"),
        "{}",
        text(&out.stderr)
    );

    // Bad input is refused before a VM is taken.
    for (args, want) in [
        (
            vec!["--packages=--index-url=http://evil.test/"],
            "is not a package name",
        ),
        (
            vec!["--packages", "x", "--index-url", "http://10.0.0.1/simple"],
            "name the host",
        ),
        (vec!["--packages", "x", "--lang", "ruby"], "support python"),
    ] {
        let mut all = vec!["install", "--command", "true"];
        all.extend(args.iter().copied());
        let out = cli.run(&all);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn repo_clones_installs_its_requirements_and_runs_the_command() {
    let internet = Internet::start();
    let cli = Cli::logging("neurovisor=info");
    let out = internet.run(
        &cli,
        &[
            "repo",
            "http://git.test/repo.git",
            "--ref",
            "v2",
            "--index-url",
            "http://pypi.test/simple/",
            "--command",
            "python3 test_answer.py && cat V2",
        ],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["repo test passed", "v2"],
        "{stderr}"
    );
    assert!(stderr.contains("cloning http://git.test/repo.git"), "{stderr}");
}

#[test]
fn a_sandbox_of_a_profile_reaches_what_its_profile_allows() {
    let internet = Internet::start();
    let config = tempfile::tempdir().expect("config dir");
    std::fs::create_dir_all(config.path().join("profiles")).expect("profiles dir");
    std::fs::write(
        config.path().join("profiles/reach.yaml"),
        "description: reaches allowed.test\nimage: default\nsize: small\nenv: { WHO: reach }\negress:\n  domains: [allowed.test]\n",
    )
    .expect("profile");
    let config_dir = config.path().display().to_string();
    // The daemon's own VMs get a network that reaches nothing.
    let daemon = common::daemon::start_daemon_with_env(
        &[
            "--warm",
            "0",
            "--max",
            "3",
            "--network",
            "--net-upstream-netns",
            &internet.upstream(),
            "--net-dns",
            "192.0.2.2",
            "--e2b-listen",
            "127.0.0.1:0",
        ],
        &[("NEUROVISOR_CONFIG_DIR", &config_dir)],
    );
    let sandbox = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_neurovisor"))
            .arg("sandbox")
            .args(args)
            .args(["--addr", &daemon.addr()])
            .env_remove("NEUROVISOR_LOG")
            .output()
            .expect("neurovisor sandbox");
        (
            out.status.code(),
            text(&out.stdout).trim().to_string(),
            text(&out.stderr),
        )
    };
    let probe = "import os, urllib.request\n\
                 try: urllib.request.urlopen('http://allowed.test/', timeout=5); print(os.environ.get('WHO'), 'reached')\n\
                 except OSError: print(os.environ.get('WHO'), 'refused')";
    let (code, with, err) = sandbox(&["create", "--profile", "reach"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, plain, err) = sandbox(&["create"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, got, err) = sandbox(&["exec", &with, "--lang", "python", "-c", probe]);
    assert_eq!(got, "reach reached", "{err}");
    let (_, got, err) = sandbox(&["exec", &plain, "--lang", "python", "-c", probe]);
    assert_eq!(got, "None refused", "{err}");
    let (code, _, err) = sandbox(&["create", "--profile", "nope"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("profile") && err.contains("nope"), "{err}");
    let (code, _, err) = sandbox(&["create", "--profile", "../etc/x"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a profile name"), "{err}");

    // Egress of the sandbox's own: `--network --allow-host`, no profile.
    let (code, own, err) = sandbox(&["create", "--network", "--allow-host", "allowed.test"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, got, err) = sandbox(&["exec", &own, "--lang", "python", "-c", probe]);
    assert_eq!(got, "None reached", "{err}");
    let (code, _, err) = sandbox(&["kill", &own]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = sandbox(&["create", "--allow-host", "allowed.test"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("need network"), "{err}");
    let (code, _, err) = sandbox(&["create", "--network", "--allow-host", "not a name"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a name"), "{err}");

    // One-shot executions name the profile too: its pool, env and egress.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let once = |profile: &str| {
        rt.block_on(async {
            let mut client = daemon.client().await;
            let mut r = common::daemon::req("python", probe);
            r.profile = profile.into();
            client.execute_once(r).await.map(|r| r.into_inner())
        })
    };
    let got = once("reach").expect("execute with the profile");
    assert_eq!(text(&got.stdout).trim(), "reach reached", "{}", text(&got.stderr));
    let got = once("").expect("execute without a profile");
    assert_eq!(text(&got.stdout).trim(), "None refused", "{}", text(&got.stderr));
    let err = once("nope").expect_err("an unknown profile");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("nope"), "{err:?}");

    // E2B: a template naming a profile makes a sandbox of that profile.
    let e2b = daemon
        .log_text()
        .lines()
        .find_map(|l| l.split("serving the E2B API on ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .expect("the E2B address in the daemon's log")
        .to_string();
    let token = std::fs::read_to_string(daemon.dir.join("token")).expect("token");
    let created: serde_json::Value = rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{e2b}/sandboxes"))
            .header("X-API-Key", token.trim())
            .json(&serde_json::json!({"templateID": "reach", "timeout": 60}))
            .send()
            .await
            .expect("POST /sandboxes");
        let status = resp.status().as_u16();
        let body = resp.text().await.expect("body");
        assert_eq!(status, 201, "{body}");
        serde_json::from_str(&body).expect("json")
    });
    let from_e2b = created["sandboxID"].as_str().expect("sandboxID").to_string();
    let (_, got, err) = sandbox(&["exec", &from_e2b, "--lang", "python", "-c", probe]);
    assert_eq!(got, "reach reached", "{err}");

    for id in [&with, &plain, &from_e2b] {
        assert_eq!(sandbox(&["kill", id]).0, Some(0));
    }
    daemon.stop();
}

/// A guest that floods its gateway with connections while both host cores
/// are busy: the excess is refused (`rate_limited`, the ops bucket), the
/// connections it admitted are served, the gateway stays up and the allowed
/// host answers again once the flood is over; nothing of the VM is left.
#[test]
fn a_connection_flood_under_load_is_rate_limited_and_the_gateway_survives() {
    const FLOOD: &str = r#"
import json, socket, time
def get(s):
    s.sendall(b'GET / HTTP/1.0\r\nHost: allowed.test\r\n\r\n')
    data = b''
    while True:
        b = s.recv(4096)
        if not b:
            return data
        data += b
addr = socket.gethostbyname('allowed.test')
socks, ok, failed = [], 0, 0
for i in range(240):
    s = socket.socket()
    s.settimeout(20)
    try:
        s.connect((addr, 80))
        socks.append(s)
    except OSError:
        failed += 1
for s in socks:
    try:
        if b'hello from' in get(s):
            ok += 1
        else:
            failed += 1
    except OSError:
        failed += 1
    s.close()
time.sleep(3)
s = socket.create_connection((addr, 80), timeout=20)
after = 'ok' if b'hello from' in get(s) else 'no answer'
print(json.dumps({'ok': ok, 'failed': failed, 'after': after}))
"#;
    let internet = Internet::start();
    let cli = Cli::logging("neurovisor=info");
    let load = common::Load::start(2);
    let out = internet.run(
        &cli,
        &[
            "run",
            "--network",
            "--allow-host",
            "allowed.test",
            "--timeout",
            "180s",
            "--lang",
            "python",
            "-c",
            FLOOD,
        ],
    );
    drop(load);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}\nstderr: {stderr}");
    let r: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    eprintln!("the flood: {r}");
    let (ok, failed) = (r["ok"].as_u64().unwrap_or(0), r["failed"].as_u64().unwrap_or(0));
    assert_eq!(ok + failed, 240, "{r}");
    assert!(ok >= 50, "the bucket's burst was not served: {r}");
    assert!(failed > 0, "nothing of the flood was refused: {r}");
    assert_eq!(
        r["after"], "ok",
        "the allowed host did not answer after the flood: {r}"
    );
    let limited = stderr.matches("reason=rate_limited").count();
    assert!(limited > 0, "no rate_limited refusal was logged:\n{stderr}");
    assert_no_process_of(&cli.state.path().display().to_string(), Duration::ZERO);
}

/// The host side alone, without a guest kernel in the way: a gateway made for
/// a namespace this test owns (as for a jailed Firecracker), and the test
/// playing the guest on its TAP with hand-built frames. ICMP echo to the
/// gateway and to an outside address, and UDP to another port, get no answer
/// and make the kernel send nothing at all (not even an ARP request for the
/// guest); once the test flushes the ruleset, the same echo is answered,
/// which shows the silence was the rules'.
#[test]
fn the_gateway_s_rules_drop_icmp_and_udp_from_the_tap() {
    let internet = Internet::start();
    let vm_ns = format!("nvt-vm-{}-{}", std::process::id(), rand_tag());
    sh(&["ip", "netns", "add", &vm_ns]);
    struct DeleteNs(String);
    impl Drop for DeleteNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
        }
    }
    let _vm_ns_guard = DeleteNs(vm_ns.clone());
    let vm_ns_path = format!("/run/netns/{vm_ns}");

    // The gateway, as the host starts it (here without a keeper: the test
    // kills and reaps it).
    let settings = neurovisor::net::NetSettings {
        policy: neurovisor::net::EgressPolicy::new(&["allowed.test".into()], &[], None).expect("policy"),
        upstream: neurovisor::net::Upstream {
            netns: Some(internet.upstream().into()),
            dns: vec!["192.0.2.2:53".parse().expect("addr")],
        },
        program: None,
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_neurovisor"));
    cmd.args([
        "net-gateway",
        "--control-fd",
        &fd.to_string(),
        "--uid",
        "65534",
        "--gid",
        "65534",
    ])
    .arg("--settings")
    .arg(serde_json::to_string(&settings).expect("json"))
    .args(["--vm-netns", &vm_ns_path]);
    // SAFETY: fcntl on a descriptor we own, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut gateway = cmd.spawn().expect("net-gateway");
    drop(theirs);
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut ready = [0u8; 6];
    std::io::Read::read_exact(&mut &ours, &mut ready).expect("the gateway's READY");
    assert_eq!(&ready, b"ready\n");

    let link: serde_json::Value = serde_json::from_slice(
        &Command::new("ip")
            .args(["-netns", &vm_ns, "-j", "link", "show", "tap0"])
            .output()
            .expect("ip link")
            .stdout,
    )
    .expect("ip -j");
    let gw_mac = parse_mac(link[0]["address"].as_str().expect("tap0's address"));

    // The guest's end of the TAP, opened by a thread inside the VM's namespace.
    let probe = {
        let ns = vm_ns_path.clone();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).expect("open the VM's netns");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let tap = open_tap_by_name("tap0");
            let echo = |dst: [u8; 4]| frame(gw_mac, ipv4(dst, 1, &icmp_echo()));
            let udp = frame(gw_mac, ipv4([10, 200, 0, 1], 17, &udp_to(9999)));
            let mut silent = Vec::new();
            for (what, f) in [
                ("icmp to the gateway", echo([10, 200, 0, 1])),
                ("icmp outside", echo([192, 0, 2, 1])),
                ("udp to another port", udp),
            ] {
                write_frame(&tap, &f);
                silent.push((what, answers(&tap, Duration::from_millis(1500))));
            }
            let flushed = Command::new("ip")
                .args(["netns", "exec", &ns_name(&ns), "nft", "flush", "ruleset"])
                .status()
                .expect("nft flush");
            assert!(flushed.success());
            write_frame(&tap, &echo([10, 200, 0, 1]));
            (silent, answers(&tap, Duration::from_secs(3)))
        })
    };
    let (silent, control) = probe.join().expect("the probe thread");
    eprintln!("with the rules: {silent:?}; without them the echo got: {control:?}");
    for (what, got) in silent {
        assert!(got.is_empty(), "{what}: the kernel sent {got:?}");
    }
    assert!(
        !control.is_empty(),
        "without the rules the echo got no answer either: the test cannot see a reply"
    );
    drop(ours);
    let status = gateway.wait().expect("reap the gateway");
    assert!(status.success(), "the gateway ended with {status}");
}

fn ns_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or_default().to_string()
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (m, part) in mac.iter_mut().zip(s.split(':')) {
        *m = u8::from_str_radix(part, 16).expect("mac");
    }
    mac
}

fn open_tap_by_name(name: &str) -> std::fs::File {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    // SAFETY: a zeroed ifreq with a NUL-terminated name and flags, for TUNSETIFF.
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = *s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        assert!(
            libc::ioctl(f.as_raw_fd(), 0x4004_54ca as _, &ifr) >= 0,
            "attach to {name}: {}",
            std::io::Error::last_os_error()
        );
    }
    f
}

fn write_frame(tap: &std::fs::File, f: &[u8]) {
    std::io::Write::write_all(&mut &*tap, f).expect("write a frame");
}

/// What the kernel sends to the guest for `wait`: ARP requests for the guest
/// and IPv4 packets, as short descriptions.
fn answers(tap: &std::fs::File, wait: Duration) -> Vec<String> {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd for a descriptor we own.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if n <= 0 {
            continue;
        }
        let Ok(len) = std::io::Read::read(&mut &*tap, &mut buf) else {
            continue;
        };
        let f = &buf[..len];
        if len < 14 {
            continue;
        }
        match u16::from_be_bytes([f[12], f[13]]) {
            0x0806 => got.push("arp".to_string()),
            0x0800 if len >= 34 => got.push(format!("ipv4 proto {} from {:?}", f[23], &f[26..30])),
            // IPv6 (router solicitations etc.) would be the rules' failure too.
            0x86dd => got.push("ipv6".to_string()),
            _ => {}
        }
    }
    got
}

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

fn frame(dst: [u8; 6], payload: Vec<u8>) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend(payload);
    f
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet from the guest's address.
fn ipv4(dst: [u8; 4], proto: u8, body: &[u8]) -> Vec<u8> {
    let len = (20 + body.len()) as u16;
    let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0, 10, 200, 0, 2];
    h[2..4].copy_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&dst);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(body);
    h
}

fn icmp_echo() -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    m.extend_from_slice(b"neurovisor icmp probe");
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A UDP datagram from port 40000 (checksum 0: none, allowed over IPv4).
fn udp_to(port: u16) -> Vec<u8> {
    let payload = b"probe";
    let mut u = Vec::new();
    u.extend_from_slice(&40000u16.to_be_bytes());
    u.extend_from_slice(&port.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}
