//! Warm interpreters (the guest agent's `warm.rs`): a program handed to a
//! Python or Node started before its request behaves exactly as under a
//! fresh `python3 -u main.py` or `node main.js`. Every case runs three times
//! side by side: in a VM whose Python was started ahead, in one restored from
//! a snapshot of such a VM (`--snapshot`), and in one that starts it for the
//! call; the results must be the same in everything but `warm_interpreter`.

mod common;

use std::time::Duration;

use neurovisor::snapshot::{SnapshotSource, Snapshots};
use neurovisor::ExecRequest;

struct Pair {
    warm: common::TestEnv,
    /// Like `warm`, its VMs restored from a template's snapshot.
    restored: common::TestEnv,
    fresh: common::TestEnv,
}

fn pair() -> Pair {
    let mut warm = common::env();
    assert_eq!(warm.sandbox.warm_languages, ["python"], "the default");
    warm.sandbox.warm_languages = vec!["python".into(), "javascript".into()];
    let mut restored = common::env();
    restored.sandbox.warm_languages = warm.sandbox.warm_languages.clone();
    restored.sandbox.snapshots = Some(std::sync::Arc::new(Snapshots::new(SnapshotSource::Managed {
        cache_dir: restored.state.path().join("snapshots"),
    })));
    let mut fresh = common::env();
    fresh.sandbox.warm_languages.clear();
    Pair {
        warm,
        restored,
        fresh,
    }
}

impl Pair {
    /// Runs `req` in both; asserts the same result; returns the warm one's.
    async fn same(&self, req: &ExecRequest, expect_warm: bool) -> common::Ran {
        let (w, r, f) = tokio::join!(
            self.warm.run_req(req),
            self.restored.run_req(req),
            self.fresh.run_req(req)
        );
        assert!(r.outcome.restored && !w.outcome.restored, "{:?}", r.outcome);
        alike(&req.code, &w, &r, expect_warm, "restored");
        alike(&req.code, &w, &f, expect_warm, "fresh");
        w
    }
}

/// `w` (a warm interpreter) and `f` gave the same result for `code`.
fn alike(code: &str, w: &common::Ran, f: &common::Ran, expect_warm: bool, what: &str) {
    let (wo, fo) = (&w.outcome, &f.outcome);
    assert_eq!(
        (w.out(), node_frames_dropped(&w.err())),
        (f.out(), node_frames_dropped(&f.err())),
        "warm and {what} interpreters printed differently for {code:?}"
    );
    assert_eq!(
        (wo.exit_code, wo.signal, wo.timed_out, wo.oom_killed),
        (fo.exit_code, fo.signal, fo.timed_out, fo.oom_killed),
        "warm and {what}: {wo:?} {fo:?} for {code:?}"
    );
    assert_eq!(
        (wo.stdout_truncated, wo.stderr_truncated, wo.stdout_bytes),
        (fo.stdout_truncated, fo.stderr_truncated, fo.stdout_bytes)
    );
    if w.err() == f.err() {
        assert_eq!(wo.stderr_bytes, fo.stderr_bytes);
    }
    assert_eq!(wo.warm_interpreter, expect_warm, "{wo:?}");
    if what == "fresh" {
        assert!(!fo.warm_interpreter, "{fo:?}");
    } else {
        assert_eq!(fo.warm_interpreter, expect_warm, "{what}: {fo:?}");
    }
}

/// A stack trace without the frames below the program's own: Node's entry
/// point (fresh) or the bootstrap's `-e` script that called it (warm).
fn node_frames_dropped(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !(l.starts_with("at ")
                && [
                    "[eval]",
                    "node:internal/main/",
                    "node:internal/vm",
                    "node:internal/process/execution",
                ]
                .iter()
                .any(|m| l.contains(m)))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Drop for Pair {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.warm.assert_clean();
            self.restored.assert_clean();
            self.fresh.assert_clean();
        }
    }
}

#[tokio::test]
async fn the_program_sees_what_a_fresh_interpreter_gives_it() {
    let p = pair();
    let mut req = ExecRequest::new(
        "python",
        "import os, sys\n\
         print(sys.argv, sys.orig_argv[1:], __name__, __file__, sys.path[0] == os.getcwd())\n\
         print(sorted(globals()), __spec__, __package__, __cached__, type(__loader__).__name__)\n\
         print(os.getuid(), os.getgid(), os.getsid(0) == os.getpid(), os.getcwd().startswith('/tmp/run-'))\n\
         print(repr(sys.stdin.read()), os.environ['GREETING'], sorted(k for k in os.environ if k != 'NEUROVISOR_TRACE_ID'))\n\
         import subprocess\n\
         print(subprocess.run(['sh', '-c', 'echo $GREETING'], capture_output=True, text=True).stdout.strip())\n\
         import resource\n\
         print([resource.getrlimit(r) for r in (resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE, resource.RLIMIT_FSIZE)])\n\
         class A: pass\n\
         import pickle, __main__\n\
         print(pickle.loads(pickle.dumps(A())).__class__ is A, __main__.A is A)\n\
         def f():\n    raise ValueError('boom')\n\
         f()\n",
    );
    req.args = vec!["a b".into(), "c".into()];
    req.stdin = b"from stdin\n".to_vec();
    req.env.insert("GREETING".into(), "hi there".into());
    let r = p.same(&req, true).await;
    assert!(
        r.out()
            .starts_with("['main.py', 'a b', 'c'] ['-u', 'main.py', 'a b', 'c'] __main__ /tmp/run-"),
        "{}",
        r.out()
    );
    assert!(r.out().contains("True True\n"), "{}", r.out());
    assert_eq!(r.outcome.exit_code, Some(1));
    // The traceback has the program's frames only.
    assert!(
        r.err()
            .starts_with("Traceback (most recent call last):\n  File \"/tmp/run-"),
        "{}",
        r.err()
    );
    assert!(!r.err().contains("<string>"), "{}", r.err());
    assert!(r.err().ends_with("ValueError: boom\n"), "{}", r.err());
}

/// Arguments and environment together larger than the control pipe holds
/// (64 KiB): the agent writes what fits at once and the rest as the
/// interpreter reads; nothing is lost or reordered.
#[tokio::test]
async fn arguments_and_environment_larger_than_the_pipe_arrive_whole() {
    let p = pair();
    let mut req = ExecRequest::new(
        "python",
        "import hashlib, os, sys\n\
         print(len(sys.argv), sum(map(len, sys.argv)), hashlib.sha256('\\0'.join(sys.argv).encode()).hexdigest())\n\
         big = {k: v for k, v in os.environ.items() if k.startswith('BIG')}\n\
         print(len(big), sum(map(len, big.values())), hashlib.sha256(repr(sorted(big.items())).encode()).hexdigest())\n",
    );
    req.args = (0..250).map(|i| format!("{i:04}-{}", "a".repeat(225))).collect();
    for i in 0..6 {
        req.env.insert(format!("BIG{i}"), format!("{i}").repeat(9_000));
    }
    let r = p.same(&req, true).await;
    let out = r.out();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.len() == 2 && lines[0].starts_with("251 57507 "),
        "{}",
        r.out()
    );
    assert!(lines[1].starts_with("6 54000 "), "{}", r.out());
}

#[tokio::test]
async fn exit_codes_signals_syntax_errors_and_atexit_are_the_same() {
    let p = pair();
    for code in [
        "import sys, atexit\natexit.register(lambda: print('atexit ran'))\nsys.exit(7)",
        "import sys\nsys.exit('a message')",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        "x = = 1",
        "raise KeyboardInterrupt",
        "import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.3), print('thread'))).start()\nprint('main')",
        "try:\n    1 / 0\nexcept Exception as e:\n    raise RuntimeError('wrapped') from e",
    ] {
        p.same(&ExecRequest::new("python", code), true).await;
    }
}

#[tokio::test]
async fn timeout_kills_the_tree_and_the_output_cap_holds() {
    let p = pair();
    let mut req = ExecRequest::new(
        "python",
        "import subprocess, time\nsubprocess.Popen(['sh', '-c', 'sleep 1000 & sleep 1000'])\ntime.sleep(1000)",
    );
    // Long enough for a fresh Python to start on a loaded host.
    req.timeout = Duration::from_secs(5);
    let r = p.same(&req, true).await;
    assert!(r.outcome.timed_out, "{:?}", r.outcome);
    let mut req = ExecRequest::new("python", "print('x' * 100000)");
    req.max_output_bytes = 1000;
    let r = p.same(&req, true).await;
    assert!(
        r.outcome.stdout_truncated && r.outcome.stdout_bytes == 100001,
        "{:?}",
        r.outcome
    );
}

#[tokio::test]
async fn a_memory_bomb_is_reported_as_oom() {
    let p = pair();
    let req = ExecRequest::new(
        "python",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))",
    );
    let r = p.same(&req, true).await;
    assert!(r.outcome.oom_killed, "{:?}", r.outcome);
}

#[tokio::test]
async fn variables_read_at_start_up_get_a_fresh_interpreter() {
    let p = pair();
    let mut req = ExecRequest::new(
        "python",
        "import sys\nprint(hash('neurovisor'), sys.flags.hash_randomization)",
    );
    req.env.insert("PYTHONHASHSEED".into(), "0".into());
    let r = p.same(&req, false).await;
    assert!(r.out().ends_with(" 0\n"), "{}", r.out());
    // Bash has no warm interpreter: the same path as before.
    let r = p.same(&ExecRequest::new("bash", "echo $0"), false).await;
    assert_eq!(r.out(), "main.sh\n");
}

#[tokio::test]
async fn node_programs_see_a_fresh_node() {
    let p = pair();
    let mut req = ExecRequest::new(
        "javascript",
        "console.log(process.argv.slice(1), __filename === require('path').join(process.cwd(), 'main.js'));\n\
         console.log(require.main === module, module.id, process.execArgv, typeof globalThis.require, typeof globalThis.module);\n\
         console.log(process.env.GREETING, require('child_process').execSync('echo $GREETING').toString().trim());\n\
         console.log(process.getuid(), require('fs').readFileSync(0, 'utf8'));\n\
         setTimeout(() => { console.log('later'); process.exitCode = 3; }, 100);\n",
    );
    req.args = vec!["x".into(), "y z".into()];
    req.stdin = b"from stdin".to_vec();
    req.env.insert("GREETING".into(), "hi".into());
    let r = p.same(&req, true).await;
    assert!(r.out().starts_with("[ '/tmp/run-"), "{}", r.out());
    assert!(
        r.out()
            .contains("true . [] undefined undefined\nhi hi\n1000 from stdin\nlater\n"),
        "{}",
        r.out()
    );
    assert_eq!(r.outcome.exit_code, Some(3));
    for code in [
        "throw new Error('boom')",
        "x = = 1",
        "Promise.reject(new Error('rejected'))",
        "process.kill(process.pid, 'SIGKILL')",
    ] {
        p.same(&ExecRequest::new("javascript", code), true).await;
    }
    let mut req = ExecRequest::new("javascript", "console.log(1)");
    req.env.insert("NODE_OPTIONS".into(), "--no-warnings".into());
    p.same(&req, false).await;
}
