"""Drives `neurovisor serve --e2b-listen` with the official E2B Python SDK,
unmodified (tests/e2b.rs runs it in the daemon's network namespace, where
only loopback exists: a fallback to E2B's cloud fails loudly).

Environment: E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY. Prints one line per
step and `E2B-CHECK OK` at the end; any failure raises.
"""

import io
import os
import time

import httpx
from e2b import (
    AuthenticationException,
    CommandExitException,
    NotFoundException,
    Sandbox,
)
import e2b


def step(name):
    print(f"step: {name}", flush=True)


def expect_raises(exc, fn, *a, **kw):
    try:
        fn(*a, **kw)
    except exc as e:
        return e
    raise AssertionError(f"{fn} did not raise {exc.__name__}")


from importlib.metadata import version
import socket

step(f"e2b {version('e2b')}")
# Nothing but loopback is reachable from here (TEST-NET-1 has no route).
try:
    socket.create_connection(("192.0.2.1", 443), timeout=2)
    raise AssertionError("a host off this namespace was reachable")
except OSError as e:
    step(f"no route off loopback: {e}")
sbx = Sandbox.create(timeout=300, metadata={"suite": "e2b"}, envs={"FROM_CREATE": "yes"})
other = Sandbox.create(timeout=300)
assert sbx.sandbox_id != other.sandbox_id
step(f"created {sbx.sandbox_id} and {other.sandbox_id}")

# Commands: output, exit codes, environment, users.
r = sbx.commands.run("echo hi")
assert (r.stdout, r.stderr, r.exit_code) == ("hi\n", "", 0), r
e = expect_raises(CommandExitException, sbx.commands.run, "echo out; echo err >&2; exit 3")
assert (e.exit_code, e.stdout, e.stderr) == (3, "out\n", "err\n"), e
r = sbx.commands.run("echo $FOO $FROM_CREATE; pwd", envs={"FOO": "bar"})
assert r.stdout == "bar yes\n/home/user\n", r.stdout
assert sbx.commands.run("whoami").stdout == "user\n"
assert sbx.commands.run("whoami", user="root").stdout == "root\n"
r = sbx.commands.run("pwd", cwd="/tmp")
assert r.stdout == "/tmp\n", r.stdout
step("commands")

# State persists in one sandbox and never reaches the other.
sbx.commands.run("echo kept > /home/user/state.txt")
assert sbx.commands.run("cat /home/user/state.txt").stdout == "kept\n"
assert not other.files.exists("/home/user/state.txt")
step("isolation")

# Files: write/read/list/exists/remove/make_dir/rename/get_info.
info = sbx.files.write("/home/user/dir/a.txt", "hello")
assert info.path == "/home/user/dir/a.txt", info
assert sbx.files.read("/home/user/dir/a.txt") == "hello"
assert sbx.files.exists("/home/user/dir/a.txt")
names = [x.name for x in sbx.files.list("/home/user/dir")]
assert names == ["a.txt"], names
assert sbx.files.make_dir("/home/user/dir/sub") is True
assert sbx.files.make_dir("/home/user/dir/sub") is False
moved = sbx.files.rename("/home/user/dir/a.txt", "/home/user/dir/sub/b.txt")
assert moved.path == "/home/user/dir/sub/b.txt", moved
assert not sbx.files.exists("/home/user/dir/a.txt")
fi = sbx.files.get_info("/home/user/dir/sub/b.txt")
assert (fi.size, fi.owner) == (5, "user"), fi
deep = [x.path for x in sbx.files.list("/home/user/dir", depth=2)]
assert deep == ["/home/user/dir/sub", "/home/user/dir/sub/b.txt"], deep
sbx.files.remove("/home/user/dir")
assert not sbx.files.exists("/home/user/dir/sub/b.txt")
expect_raises(NotFoundException, sbx.files.read, "/home/user/nope.txt")
step("files")

# Watching a directory (polled, as the synchronous SDK does), recursively.
sbx.files.make_dir("/home/user/w")
w = sbx.files.watch_dir("/home/user/w", recursive=True)
sbx.files.write("/home/user/w/new.txt", "x")
sbx.commands.run("mkdir /home/user/w/sub && sleep 0.5 && echo y > /home/user/w/sub/deep.txt")
seen = set()
deadline = time.time() + 10
while ("sub/deep.txt", "CREATE") not in seen and time.time() < deadline:
    seen |= {(e.name, e.type.name) for e in w.get_new_events()}
    time.sleep(0.2)
assert {("new.txt", "CREATE"), ("new.txt", "WRITE"), ("sub", "CREATE"), ("sub/deep.txt", "CREATE")} <= seen, seen
w.stop()
step("watch")

# Binary upload and download: multipart (bytes) and streamed octet-stream.
blob = os.urandom(3 << 20)
sbx.files.write("/tmp/blob.bin", blob)
assert bytes(sbx.files.read("/tmp/blob.bin", format="bytes")) == blob
big = os.urandom(24 << 20)
sbx.files.write("/tmp/big.bin", io.BytesIO(big))
assert bytes(sbx.files.read("/tmp/big.bin", format="bytes")) == big
r = sbx.commands.run("sha256sum /tmp/big.bin | cut -c1-64")
import hashlib

assert r.stdout.strip() == hashlib.sha256(big).hexdigest()
chunks = b"".join(sbx.files.read("/tmp/big.bin", format="stream"))
assert chunks == big
step("upload and download")

# Background processes, list, connect, stdin, kill.
h = sbx.commands.run("sleep 2; echo done", background=True)
pids = [p.pid for p in sbx.commands.list()]
assert h.pid in pids, (h.pid, pids)
again = sbx.commands.connect(h.pid)
assert again.wait().stdout == "done\n"
h = sbx.commands.run("cat", background=True, stdin=True)
sbx.commands.send_stdin(h.pid, "abc")
sbx.commands.close_stdin(h.pid)
assert h.wait().stdout == "abc"
h = sbx.commands.run("sleep 100", background=True)
assert sbx.commands.kill(h.pid) is True
e = expect_raises(CommandExitException, h.wait)
assert e.exit_code != 0, e
assert sbx.commands.kill(h.pid) is False
step("processes")

# A PTY: its size, input, resize (once the first size is printed).
from e2b import PtySize

t = sbx.pty.create(PtySize(cols=100, rows=30), timeout=60)
sbx.pty.send_stdin(t.pid, b"stty size; echo tty-$((6*7)); read x; stty size; exit 5\n")
seen = bytearray()


def on_pty(b):
    seen.extend(b)
    if b"tty-42" in seen and not getattr(on_pty, "resized", False):
        on_pty.resized = True
        sbx.pty.resize(t.pid, PtySize(cols=120, rows=40))
        sbx.pty.send_stdin(t.pid, b"\n")


e = expect_raises(CommandExitException, t.wait, on_pty=on_pty)
text = seen.decode(errors="replace")
assert "30 100" in text and "40 120" in text, text
assert e.exit_code == 5, e
step("pty")

# The control plane: list, info, timeout.
listed = {s.sandbox_id: s for s in Sandbox.list().next_items()}
assert sbx.sandbox_id in listed and other.sandbox_id in listed, listed
assert listed[sbx.sandbox_id].metadata == {"suite": "e2b"}
mine = Sandbox.list(query=e2b.SandboxQuery(metadata={"suite": "e2b"})).next_items()
assert [s.sandbox_id for s in mine] == [sbx.sandbox_id], mine
info = sbx.get_info()
assert info.sandbox_id == sbx.sandbox_id and info.state == "running"
sbx.set_timeout(600)
assert sbx.get_info().end_at > info.end_at
same = Sandbox.connect(sbx.sandbox_id)
assert same.commands.run("cat /home/user/state.txt").stdout == "kept\n"
step("control plane")

# Tokens: a wrong API key, and one sandbox's access token for another.
api = os.environ["E2B_SANDBOX_URL"]
e = expect_raises(AuthenticationException, Sandbox.create, api_key="not-the-token")
r = httpx.post(
    f"{api}/filesystem.Filesystem/Stat",
    json={"path": "/"},
    headers={
        "E2b-Sandbox-Id": other.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": sbx._envd_access_token,
    },
)
assert r.status_code == 401, (r.status_code, r.text)
r = httpx.post(
    f"{api}/filesystem.Filesystem/Stat",
    json={"path": "/"},
    headers={"E2b-Sandbox-Id": other.sandbox_id, "E2b-Sandbox-Port": "49983"},
)
assert r.status_code == 401, (r.status_code, r.text)
step("tokens")

# Kill: gone for the control plane and the sandbox plane.
assert sbx.kill() is True
assert Sandbox.kill(sbx.sandbox_id) is False
expect_raises(e2b.SandboxNotFoundException, Sandbox.get_info, sbx.sandbox_id)
assert not sbx.is_running()
other.kill()
assert [s for s in Sandbox.list().next_items()] == []
step("kill")
print("E2B-CHECK OK", flush=True)
