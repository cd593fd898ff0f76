"""Pause and resume through the official E2B Python SDK, unmodified, against
`neurovisor serve --snapshot --e2b-listen` (tests/e2b.rs runs it in the
daemon's loopback-only network namespace).

A file, a background process's memory and stdin survive `pause()` and
`Sandbox.connect()`; while paused the sandbox is listed as paused, a second
pause answers "already paused" and its files cannot be reached. Prints
`PAUSE-CHECK OK` at the end; any failure raises. Also: a template naming a
built image and a size (`full:medium`), an unknown template and size, and
the lifecycle options (a timeout that pauses, traffic that resumes; a
filesystem-only pause refused).
"""

import time

import e2b
from e2b import Sandbox, SandboxQuery, SandboxState


def step(name):
    print(f"step: {name}", flush=True)


def wait_for(what, f, timeout=30):
    until = time.monotonic() + timeout
    while not f():
        if time.monotonic() > until:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


sbx = Sandbox.create(timeout=120)
sbx.files.write("/home/user/note.txt", "before the pause")
# A running sum of its input, printed and kept in /tmp/sum (the sync SDK
# reads a background command's output only in `wait()`).
summer = (
    "import sys\nt = 0\nfor l in sys.stdin:\n    t += int(l)\n"
    "    print('sum', t, flush=True)\n    open('/tmp/sum', 'w').write(str(t))"
)
h = sbx.commands.run(f"python3 -u -c \"{summer}\"", background=True, stdin=True)
sbx.commands.send_stdin(h.pid, "5\n")
wait_for("sum 5", lambda: sbx.files.exists("/tmp/sum") and sbx.files.read("/tmp/sum") == "5")
step("a file and a process with state")

assert sbx.pause() is True
info = Sandbox.get_info(sbx.sandbox_id)
assert info.state == SandboxState.PAUSED, info.state
assert Sandbox.pause(sbx.sandbox_id) is False  # already paused (409)
paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
assert [s.sandbox_id for s in paused] == [sbx.sandbox_id], paused
running = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING])).next_items()
assert running == [], running
try:
    sbx.files.read("/home/user/note.txt")
    raise AssertionError("a paused sandbox's files were reachable")
except e2b.SandboxException as e:
    step(f"refused while paused: {type(e).__name__}: {e}")
step("paused")

same = Sandbox.connect(sbx.sandbox_id, timeout=120)
assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
assert same.files.read("/home/user/note.txt") == "before the pause"
again = same.commands.connect(h.pid)
same.commands.send_stdin(h.pid, "7\n")
same.commands.close_stdin(h.pid)
r = again.wait()
assert (r.exit_code, r.stdout) == (0, "sum 12\n"), r
assert same.commands.run("echo after").stdout == "after\n"
step("resumed with its file and process")

# A template that names a built image gets a VM of that image; an unknown
# one is not found.
# A tag is a size.
full = Sandbox.create(template="full:medium", timeout=60)
assert full.commands.run("command -v go").stdout.strip().endswith("/go")
assert full.commands.run("nproc").stdout.strip() == "2"
info = Sandbox.get_info(full.sandbox_id)
assert (info.template_id, info.memory_mb, info.cpu_count) == ("full", 512, 2), info
full.kill()
try:
    Sandbox.create(template="full:huge")
    raise AssertionError("an unknown size was accepted")
except e2b.SandboxException as e:
    assert "small, medium or large" in str(e), e
try:
    Sandbox.create(template="no-such-template")
    raise AssertionError("an unknown template was accepted")
except e2b.SandboxException as e:
    assert "no-such-template" in str(e), e
step("templates: a built image, an unknown one")

# A timeout that pauses (lifecycle on_timeout "pause"), and traffic that
# resumes (auto_resume): a file read wakes it with its memory.
auto = Sandbox.create(timeout=3, lifecycle={"on_timeout": "pause", "auto_resume": True})
auto.files.write("/home/user/a.txt", "auto")
lc = Sandbox.get_info(auto.sandbox_id).lifecycle
assert (lc["on_timeout"], lc["auto_resume"]) == ("pause", True), lc
wait_for(
    "the timeout to pause it",
    lambda: Sandbox.get_info(auto.sandbox_id).state == SandboxState.PAUSED,
    timeout=60,
)
assert auto.files.read("/home/user/a.txt") == "auto"
assert Sandbox.get_info(auto.sandbox_id).state == SandboxState.RUNNING
auto.kill()
try:
    Sandbox.create(lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}})
    raise AssertionError("a filesystem-only auto-pause was accepted")
except e2b.SandboxException as e:
    assert "filesystem" in str(e), e
step("auto-pause at the timeout, auto-resume by traffic")

# Paused, then killed while paused.
assert same.pause() is True
assert Sandbox.kill(sbx.sandbox_id) is True
assert Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED, SandboxState.RUNNING])).next_items() == []
step("killed while paused")
print("PAUSE-CHECK OK", flush=True)
