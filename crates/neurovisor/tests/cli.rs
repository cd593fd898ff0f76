//! Tests of the `neurovisor` binary as a user runs it: real VMs, real exit
//! codes, one-line errors, Ctrl-C/SIGTERM, and nothing left behind.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::{processes_mentioning, text, Cli};

#[test]
fn run_prints_the_result_and_mirrors_the_exit_code() {
    let cli = Cli::new();
    let o = cli.run(&[
        "run",
        "--size",
        "small",
        "--lang",
        "python",
        "-c",
        "print(sum(range(10)))",
    ]);
    assert_eq!(text(&o.stdout), "45\n", "stderr: {}", text(&o.stderr));
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(text(&o.stderr), "", "a successful run prints nothing else");

    let o = cli.run(&[
        "run",
        "--size",
        "small",
        "--lang",
        "bash",
        "-c",
        "echo oops >&2; exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(text(&o.stderr), "oops\n");
}

#[test]
fn code_from_a_file_stdin_and_json_output() {
    let cli = Cli::new();
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("prog.js");
    std::fs::write(
        &file,
        "process.stdin.on('data', d => console.log('got ' + d.toString().trim()))",
    )
    .expect("write");
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "hello\n").expect("write");
    let o = cli.run(&[
        "run",
        "--size",
        "small",
        "--json",
        "--stdin",
        input.to_str().expect("utf8"),
        "-e",
        "A=1",
        file.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["ok"], true);
    assert_eq!(v["language"], "javascript");
    assert_eq!(v["stdout"], "got hello\n");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["timed_out"], false);
    assert!(v["boot_ms"].as_f64().expect("boot_ms") > 0.0);
    assert!(!v["vm_id"].as_str().expect("vm_id").is_empty());
    assert!(uuid_v7(v["trace_id"].as_str().expect("trace id")));

    // Code from stdin with `-`.
    let mut child = cli
        .cmd(&["run", "--size", "small", "--lang", "python", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"print('from stdin')")
        .expect("write");
    let o = child.wait_with_output().expect("wait");
    assert_eq!(text(&o.stdout), "from stdin\n");
}

fn uuid_v7(s: &str) -> bool {
    s.len() == 36 && s.as_bytes()[14] == b'7'
}

#[test]
fn bad_input_is_one_clear_line_and_boots_nothing() {
    let cli = Cli::new();
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--lang", "cobol", "-c", "x"],
            "unknown language 'cobol'; available: python, bash, javascript",
        ),
        (&["run", "--lang", "python", "-c", "   "], "code: empty"),
        (&["run", "--lang", "python"], "no code given"),
        (
            &["run", "--lang", "python", "--timeout", "2h", "-c", "1"],
            "timeout",
        ),
        (
            &["run", "/nonexistent/x.py"],
            "cannot read the code from /nonexistent/x.py",
        ),
    ];
    for (args, want) in cases {
        let o = cli.run(args);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line, got {err}");
        assert!(
            !cli.state.path().join("vms").exists()
                || std::fs::read_dir(cli.state.path().join("vms"))
                    .map(|d| d.count())
                    .unwrap_or(0)
                    == 0
        );
    }
    let o = cli.run(&["run", "--lang", "cobol", "--json", "-c", "x"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json error");
    assert_eq!(
        (v["ok"].as_bool(), v["kind"].as_str()),
        (Some(false), Some("invalid_request"))
    );
}

#[test]
fn missing_images_name_the_command_that_builds_them() {
    let cli = Cli::new();
    let o = cli.run(&[
        "run",
        "--kernel",
        "/nonexistent/vmlinux",
        "--lang",
        "python",
        "-c",
        "print(1)",
    ]);
    assert_eq!(o.status.code(), Some(125));
    let err = text(&o.stderr);
    assert!(
        err.contains("/nonexistent/vmlinux") && err.contains("neurovisor images build"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn timeout_exits_124_and_says_so() {
    let cli = Cli::new();
    let o = cli.run(&[
        "run",
        "--size",
        "small",
        "--timeout",
        "2s",
        "--lang",
        "bash",
        "-c",
        "echo start; sleep 100",
    ]);
    assert_eq!(o.status.code(), Some(124));
    assert_eq!(text(&o.stdout), "start\n");
    assert!(text(&o.stderr).contains("time limit"), "{}", text(&o.stderr));
}

fn interrupt_with(signal: nix::sys::signal::Signal, want_code: i32) {
    let cli = Cli::new();
    let mut child = cli
        .cmd(&[
            "run",
            "--size",
            "small",
            "--lang",
            "python",
            "-c",
            "import time\nprint('running', flush=True)\ntime.sleep(300)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line, "running\n");
    let state = cli.state.path().display().to_string();
    assert!(!processes_mentioning(&state).is_empty(), "the VM is running");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).expect("signal");
    let o = child.wait_with_output().expect("wait");
    assert_eq!(o.status.code(), Some(want_code), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("the VM was destroyed"));
    // The VMM processes were SIGKILLed by the CLI; let init reap them.
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn ctrl_c_destroys_the_vm() {
    interrupt_with(nix::sys::signal::Signal::SIGINT, 130);
}

#[test]
fn sigterm_destroys_the_vm() {
    interrupt_with(nix::sys::signal::Signal::SIGTERM, 143);
}

#[test]
fn doctor_reports_the_host() {
    let cli = Cli::new();
    let o = cli.run(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let names: Vec<&str> = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for want in ["kvm", "qemu", "vhost-device-vsock", "kernel", "rootfs", "cgroups"] {
        assert!(names.contains(&want), "{names:?}");
    }
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(o.status.code(), Some(0));
    let o = cli.run(&["doctor", "--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stdout).contains("fix: neurovisor images build"),
        "{}",
        text(&o.stdout)
    );
}

/// A profile file in its own directory (also the user configuration
/// directory of the command, so only built-in profiles and presets count).
fn profile_file(dir: &tempfile::TempDir, name: &str, yaml: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, yaml).expect("write profile");
    p.display().to_string()
}

#[test]
fn profiles_are_listed_shown_and_validated_with_file_and_line() {
    let cli = Cli::new();
    let cfg = tempfile::tempdir().expect("config dir");
    let run = |args: &[&str]| {
        cli.cmd(args)
            .env("NEUROVISOR_CONFIG_DIR", cfg.path())
            .output()
            .expect("run neurovisor")
    };
    let o = run(&["profile", "list-presets", "--kind", "egress"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.starts_with("KIND "), "{out}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().take(3).eq(["egress", "pypi", "built-in"])),
        "{out}"
    );
    assert!(!out.contains("capabilities"), "{out}");

    let o = run(&["profile", "show", "python-dev"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    for want in [
        "name: python-dev\n",
        "- files.pythonhosted.org\n",
        "- github.com\n",
        "- python3-pytest\n",
        "image: default+",
    ] {
        assert!(out.contains(want), "{want:?} in {out}");
    }

    let good = profile_file(&cfg, "good.yaml", "size: small\nenv:\n  A: b\n");
    let bad = profile_file(
        &cfg,
        "bad.yaml",
        "image: default\negress:\n  presets: [github, pipy]\n",
    );
    let o = run(&["profile", "validate", &good, &bad]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        text(&o.stdout),
        format!("{good}: valid (profile good, image default)\n")
    );
    assert_eq!(
        text(&o.stderr),
        format!(
            "{bad}:3:21: egress.presets: unknown egress preset 'pipy' (did you mean 'pypi'?); available: \
             crates, debian, github, huggingface, npm, pypi, python-dev (`neurovisor profile list-presets`)\n"
        )
    );

    // The user's profiles are found by name.
    std::fs::create_dir_all(cfg.path().join("profiles")).expect("mkdir");
    std::fs::write(
        cfg.path().join("profiles/mine.yaml"),
        "description: my own\nsize: large\n",
    )
    .expect("write");
    let o = run(&["profile", "list"]);
    let out = text(&o.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("mine ") && l.ends_with("my own")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("data-analyst ") && l.contains("built-in")),
        "{out}"
    );
    let o = run(&["profile", "show", "mine", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (v["size"].as_str(), v["image"].as_str()),
        (Some("large"), Some("default"))
    );
}

#[test]
fn a_profile_sets_size_env_and_limits_and_flags_win() {
    let cli = Cli::new();
    let cfg = tempfile::tempdir().expect("config dir");
    let file = profile_file(
        &cfg,
        "small.yaml",
        "size: small\nenv:\n  GREETING: from-profile\nlimits:\n  timeout: 3s\n",
    );
    let run = |args: &[&str]| {
        let mut all = vec!["run", "--profile", file.as_str()];
        all.extend_from_slice(args);
        cli.cmd(&all)
            .env("NEUROVISOR_CONFIG_DIR", cfg.path())
            .output()
            .expect("run neurovisor")
    };
    let o = run(&["--lang", "bash", "-c", "echo $GREETING $(nproc)"]);
    assert_eq!(text(&o.stdout), "from-profile 1\n", "{}", text(&o.stderr));
    let o = run(&[
        "--size",
        "medium",
        "-e",
        "GREETING=flag",
        "--lang",
        "bash",
        "-c",
        "echo $GREETING $(nproc)",
    ]);
    assert_eq!(text(&o.stdout), "flag 2\n", "{}", text(&o.stderr));
    let o = run(&["--lang", "bash", "-c", "sleep 60"]);
    assert_eq!(o.status.code(), Some(124));
    assert!(
        text(&o.stderr).contains("time limit of 3s"),
        "{}",
        text(&o.stderr)
    );

    let o = cli.run(&["run", "--profile", "nope", "--lang", "bash", "-c", "true"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        text(&o.stderr),
        "neurovisor: no profile named 'nope'; available: data-analyst, python-dev (or give a file: --profile ./NAME.yaml)\n"
    );
    let o = run(&["--addr", "unix:/nonexistent.sock", "--lang", "bash", "-c", "true"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("drop one of them"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn a_profile_s_capabilities_are_installed_into_a_derived_image() {
    let cli = Cli::new();
    let cfg = tempfile::tempdir().expect("config dir");
    // A package list no image was ever built with.
    let unbuilt = profile_file(
        &cfg,
        "unbuilt.yaml",
        &format!(
            "capabilities:\n  packages: [jq, nv-never-{}]\n",
            std::process::id()
        ),
    );
    let o = cli.run(&["run", "--profile", &unbuilt, "--lang", "bash", "-c", "true"]);
    assert_eq!(o.status.code(), Some(125));
    let err = text(&o.stderr);
    assert!(
        err.starts_with("neurovisor: profile 'unbuilt' installs jq, nv-never-")
            && err.ends_with(&format!(
                ", which is not built; build it with `neurovisor images build --profile {unbuilt}`\n"
            )),
        "{err}"
    );
    // Built once (cached by the package list, like every image), then booted.
    let caps = profile_file(&cfg, "caps.yaml", "capabilities:\n  packages: [jq]\n");
    let o = cli.run(&["images", "build", "--profile", &caps]);
    assert_eq!(o.status.code(), Some(0), "{}{}", text(&o.stdout), text(&o.stderr));
    let o = cli.run(&[
        "run",
        "--profile",
        &caps,
        "--size",
        "small",
        "--lang",
        "bash",
        "-c",
        "jq -n '1 + 1'",
    ]);
    assert_eq!(text(&o.stdout), "2\n", "{}", text(&o.stderr));
    // The base image has no jq.
    let o = cli.run(&[
        "run",
        "--size",
        "small",
        "--lang",
        "bash",
        "-c",
        "command -v jq || echo none",
    ]);
    assert_eq!(text(&o.stdout), "none\n", "{}", text(&o.stderr));
}
