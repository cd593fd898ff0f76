#!/usr/bin/env python3
"""Conformance driver for the NeuroVisor MCP server, built on the official MCP
Python SDK (pip ``mcp==2.3.0``, which pulls in ``mcp-types==2.3.0``; also needs
``jsonschema``). Python >= 3.10.

Usage::

    mcp_check.py [OPTIONS] --stdio [--] CMD [ARG ...]
    mcp_check.py [OPTIONS] --http URL

    OPTIONS:
      --header 'Name: value'   extra HTTP header, repeatable (HTTP only)
      --protocol V             2025-11-25 (initialize handshake) or
                               2026-07-28 (stateless, server/discover, no
                               initialize); omitted: the SDK's "auto" policy
                               (probe server/discover, fall back to initialize)
      --vms-dir PATH           directory where the server keeps one entry per
                               live VM; enables the VM-lifetime checks
      --languages a,b          languages list_languages must report
                               (default python,bash)
      --skip-cancel            skip the cancellation check

``--stdio`` must come LAST: every argument after it (after an optional ``--``)
is the server command line. The server inherits this script's environment;
its stderr goes to this script's stderr.

Output: one ``ok: ...`` line on stdout per passed check, then
``RESULT {json}`` with measured numbers; exit status 0. On the first failed
check: one ``FAIL: ...`` line on stderr, exit status 1. Usage errors exit 2.

How the SDK (2.3.0) is driven:

* ``--protocol 2025-11-25`` -> ``Client(mode="legacy")``: ``initialize`` offering
  2025-11-25 (the SDK's newest handshake version), then
  ``notifications/initialized``.
* ``--protocol 2026-07-28`` -> ``Client(mode="2026-07-28")`` (pins the version,
  no wire traffic at connect), then an explicit ``server/discover`` via
  ``ClientSession.send_discover`` whose result is ``adopt()``-ed, so the
  server's instructions/capabilities are the real ones and no ``initialize`` is
  ever sent.
* Cancellation: the in-flight ``call_tool`` is cancelled through its anyio
  cancel scope; the SDK dispatcher then emits ``notifications/cancelled``
  (reason "caller cancelled") and does not wait for any reply. On Streamable
  HTTP at 2026-07-28 the SDK transport does not POST that notification: it
  aborts the request's own POST (closes the response stream) instead, which is
  the 2026 HTTP cancellation signal.
* The SDK itself validates non-error tool results against the tool's
  outputSchema (raises RuntimeError on mismatch); it does not validate tool
  input client-side, so invalid arguments reach the server unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

try:
    import anyio
    import httpx2
    import jsonschema
    import jsonschema.validators
    import mcp_types as types
    import mcp.client.stdio as sdk_stdio
    from mcp import Client, MCPError
    from mcp.client.stdio import StdioServerParameters
    from mcp.client.streamable_http import streamable_http_client
    from mcp_types import JSONRPCNotification, JSONRPCRequest
    from pydantic import ValidationError
except ImportError as e:  # pragma: no cover - environment problem
    print(f"FAIL: expected the MCP Python SDK (pip install mcp==2.3.0 jsonschema), import failed: {e}",
          file=sys.stderr, flush=True)
    sys.exit(1)

PROTOCOLS = ("2025-11-25", "2026-07-28")
CALL_TIMEOUT_S = 60.0  # each execute_code boots a fresh VM; generous under TCG
RPC_TIMEOUT_S = 30.0
CANCEL_LIMIT_MS = 1000.0
CANCEL_MEASURE_MAX_S = 10.0
POLL_S = 0.02
SERVER_EXIT_GRACE_S = 5.0

EXPECTED_ANNOTATIONS = {
    "execute_code": {"read_only_hint": False, "destructive_hint": False, "open_world_hint": False},
    "list_languages": {"read_only_hint": True},
}
WIRE_NAMES = {"read_only_hint": "readOnlyHint", "destructive_hint": "destructiveHint",
              "open_world_hint": "openWorldHint"}


class CheckFailed(Exception):
    pass


def fail(msg: str) -> None:
    raise CheckFailed(msg)


def ok(msg: str) -> None:
    print(f"ok: {msg}", flush=True)


def short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = repr(text) if isinstance(value, str) else text
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------
# Transport tap: sees every message the SDK writes (timestamps the cancel).
# --------------------------------------------------------------------------


class _TapWriteStream:
    def __init__(self, inner: Any, tap: "TapTransport") -> None:
        self._inner = inner
        self._tap = tap

    async def send(self, item: Any) -> None:
        msg = getattr(item, "message", None)
        if isinstance(msg, JSONRPCRequest):
            self._tap.sent_methods.append(msg.method)
        elif isinstance(msg, JSONRPCNotification):
            self._tap.sent_methods.append(msg.method)
            if msg.method == "notifications/cancelled":
                self._tap.cancels.append((time.monotonic(), dict(msg.params or {})))
        await self._inner.send(item)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> "_TapWriteStream":
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._inner.__aexit__(*exc)


class TapTransport:
    """A `mcp.client._transport.Transport` wrapping another one."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.sent_methods: list[str] = []
        self.cancels: list[tuple[float, dict[str, Any]]] = []

    async def __aenter__(self) -> Any:
        read_stream, write_stream = await self._inner.__aenter__()
        return read_stream, _TapWriteStream(write_stream, self)

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._inner.__aexit__(*exc)


# --------------------------------------------------------------------------
# stdio: capture the server process so its exit status can be checked.
# The SDK does not expose it; this hooks two module globals of
# mcp.client.stdio (2.3.0). If they are missing the exit check is skipped.
# --------------------------------------------------------------------------

_captured_proc: dict[str, Any] = {}


def _hook_stdio_process() -> bool:
    orig = getattr(sdk_stdio, "_create_platform_compatible_process", None)
    if orig is None or not hasattr(sdk_stdio, "PROCESS_TERMINATION_TIMEOUT"):
        return False

    async def capture(*args: Any, **kwargs: Any) -> Any:
        proc = await orig(*args, **kwargs)
        _captured_proc["proc"] = proc
        return proc

    sdk_stdio._create_platform_compatible_process = capture  # type: ignore[attr-defined]
    # Grace the SDK gives the server after closing its stdin before SIGTERM.
    sdk_stdio.PROCESS_TERMINATION_TIMEOUT = SERVER_EXIT_GRACE_S  # type: ignore[attr-defined]
    return True


# --------------------------------------------------------------------------
# Schema helpers
# --------------------------------------------------------------------------


def validator_class(schema: Any, where: str) -> Any:
    if not isinstance(schema, dict):
        fail(f"{where}: expected a JSON Schema object, got {short(schema)}")
    if "$schema" not in schema:
        return jsonschema.Draft202012Validator
    cls = jsonschema.validators.validator_for(schema, default=None)
    if cls is None:
        fail(f"{where}: expected a known $schema dialect, got $schema={schema['$schema']!r}")
    return cls


def check_schema(schema: Any, where: str) -> None:
    cls = validator_class(schema, where)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        fail(f"{where}: expected a valid {cls.__name__} schema, got error: {e.message} at {list(e.absolute_path)}")


def validate_instance(instance: Any, schema: dict[str, Any], where: str) -> None:
    cls = validator_class(schema, where)
    err = jsonschema.exceptions.best_match(cls(schema).iter_errors(instance))
    if err is not None:
        fail(f"{where}: expected structuredContent valid against outputSchema, got {err.message} "
             f"at {list(err.absolute_path)} in {short(instance)}")


# --------------------------------------------------------------------------
# Checker
# --------------------------------------------------------------------------


class Checker:
    def __init__(self, args: argparse.Namespace, server_cmd: list[str] | None) -> None:
        self.args = args
        self.server_cmd = server_cmd
        self.vms_dir = Path(args.vms_dir) if args.vms_dir else None
        self.client: Client | None = None
        self.tap: TapTransport | None = None
        self.output_schemas: dict[str, dict[str, Any]] = {}
        self.result: dict[str, Any] = {
            "transport": "stdio" if server_cmd else "http",
            "requested_protocol": args.protocol,
        }
        self.vm_ids: list[str] = []
        self.stdio_hooked = False
        self.phase = "start"

    # -- plumbing ---------------------------------------------------------

    async def build_transport(self, stack: AsyncExitStack) -> TapTransport:
        if self.server_cmd:
            self.stdio_hooked = _hook_stdio_process()
            params = StdioServerParameters(command=self.server_cmd[0], args=self.server_cmd[1:],
                                           env=dict(os.environ))
            inner: Any = sdk_stdio.stdio_client(params)
        else:
            headers: dict[str, str] = {}
            for h in self.args.header:
                headers[h.split(":", 1)[0].strip()] = h.split(":", 1)[1].strip()
            http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0))
            await stack.enter_async_context(http)
            inner = streamable_http_client(self.args.http, http_client=http)
        return TapTransport(inner)

    async def call(self, name: str, arguments: dict[str, Any], what: str, *,
                   timeout: float = CALL_TIMEOUT_S, progress_callback: Any = None) -> types.CallToolResult:
        assert self.client is not None
        t0 = time.monotonic()
        try:
            res = await self.client.call_tool(name, arguments, read_timeout_seconds=timeout,
                                              progress_callback=progress_callback)
        except MCPError as e:
            fail(f"{what}: expected a tools/call result, got JSON-RPC error {e.code}: {e.error.message}"
                 + (f" (data {short(e.error.data)})" if e.error.data is not None else ""))
        except RuntimeError as e:
            # The SDK raises RuntimeError when structuredContent violates outputSchema.
            fail(f"{what}: expected a result the SDK accepts, got: {e}")
        except ValidationError as e:
            fail(f"{what}: expected a well-formed CallToolResult, got: {e}")
        self.result.setdefault("call_ms", {})[what] = round((time.monotonic() - t0) * 1000, 1)
        return res

    @staticmethod
    def texts(res: types.CallToolResult) -> list[str]:
        return [c.text for c in res.content if isinstance(c, types.TextContent)]

    def vm_entries(self) -> list[Path]:
        assert self.vms_dir is not None
        try:
            return sorted(self.vms_dir.iterdir())
        except FileNotFoundError:
            return []

    # -- checks -----------------------------------------------------------

    async def connect(self, stack: AsyncExitStack) -> None:
        proto = self.args.protocol
        self.tap = await self.build_transport(stack)
        mode = {None: "auto", "2025-11-25": "legacy", "2026-07-28": "2026-07-28"}[proto]
        client = Client(self.tap, mode=mode, read_timeout_seconds=RPC_TIMEOUT_S, cache=None,
                        client_info=types.Implementation(name="neurovisor-mcp-check", version="1"))
        # No fail_after here: the client's task groups must not be entered inside a
        # cancel scope that is left before them (anyio LIFO rule). The SDK bounds
        # server/discover (10 s) and initialize (read_timeout_seconds) itself.
        try:
            await stack.enter_async_context(client)
        except MCPError as e:
            fail(f"connect ({mode}): expected a handshake, got JSON-RPC error {e.code}: {e.error.message}")
        self.client = client
        if proto == "2026-07-28":
            try:
                raw = await client.session.send_discover(proto)
            except MCPError as e:
                fail(f"server/discover: expected a DiscoverResult, got JSON-RPC error {e.code}: {e.error.message}")
            try:
                discovered = types.DiscoverResult.model_validate(raw)
            except ValidationError as e:
                fail(f"server/discover: expected a valid DiscoverResult, got {short(raw)}: {e}")
            if proto not in discovered.supported_versions:
                fail(f"server/discover: expected supportedVersions to contain {proto}, "
                     f"got {discovered.supported_versions}")
            client.session.adopt(discovered)
            self.result["discover_supported_versions"] = discovered.supported_versions

        negotiated = client.protocol_version
        self.result["protocol_version"] = negotiated
        if proto is not None and negotiated != proto:
            fail(f"connect: expected negotiated protocol version {proto}, got {negotiated}")
        sent = self.tap.sent_methods
        if negotiated == "2026-07-28" and "initialize" in sent:
            fail(f"connect: expected no initialize request at 2026-07-28, got messages {sent}")
        if negotiated in ("2025-11-25",) and "initialize" not in sent:
            fail(f"connect: expected an initialize request at {negotiated}, got messages {sent}")
        ok(f"connected over {self.result['transport']}, protocol {negotiated} (handshake: {', '.join(sent)})")

        instr = client.instructions
        if not isinstance(instr, str) or not instr.strip():
            fail(f"connect: expected non-empty server instructions, got {instr!r}")
        self.result["instructions"] = instr
        ok(f"instructions: {short(instr, 120)}")

        caps = client.server_capabilities
        if caps.tools is None:
            fail(f"connect: expected the tools capability, got capabilities {short(caps.model_dump(exclude_none=True))}")
        info = client.server_info
        self.result["server_info"] = info.model_dump(exclude_none=True) if info else None
        ok("server advertises the tools capability")

    async def check_list_tools(self) -> None:
        assert self.client is not None
        try:
            listed = await self.client.list_tools()
        except MCPError as e:
            fail(f"tools/list: expected a result, got JSON-RPC error {e.code}: {e.error.message}")
        tools = {t.name: t for t in listed.tools}
        for name in ("execute_code", "list_languages"):
            if name not in tools:
                fail(f"tools/list: expected tool {name!r}, got {sorted(tools)}")
            tool = tools[name]
            check_schema(tool.input_schema, f"{name}.inputSchema")
            if tool.output_schema is None:
                fail(f"{name}: expected an outputSchema, got none")
            check_schema(tool.output_schema, f"{name}.outputSchema")
            self.output_schemas[name] = tool.output_schema
            ann = tool.annotations
            for field, want in EXPECTED_ANNOTATIONS[name].items():
                got = getattr(ann, field, None) if ann is not None else None
                if got is not want:
                    fail(f"{name}.annotations: expected {WIRE_NAMES[field]}={json.dumps(want)}, "
                         f"got {json.dumps(got)}")
        props = tools["execute_code"].input_schema.get("properties", {})
        for p in ("language", "code"):
            if p not in props:
                fail(f"execute_code.inputSchema: expected property {p!r}, got {sorted(props)}")
        ok(f"tools/list: {sorted(tools)}; schemas valid; annotations as specified")

    async def check_list_languages(self, what: str = "list_languages") -> list[str]:
        res = await self.call("list_languages", {}, what, timeout=RPC_TIMEOUT_S)
        if res.is_error:
            fail(f"{what}: expected isError false, got isError true: {short(self.texts(res))}")
        validate_instance(res.structured_content, self.output_schemas["list_languages"], what)
        langs = res.structured_content.get("languages") if isinstance(res.structured_content, dict) else None
        if not isinstance(langs, list):
            fail(f"{what}: expected structuredContent.languages to be a list, got {short(res.structured_content)}")
        names = [entry.get("name") for entry in langs if isinstance(entry, dict)]
        missing = [lang for lang in self.args.languages if lang not in names]
        if missing:
            fail(f"{what}: expected languages {self.args.languages}, got {names} (missing {missing})")
        return names

    def check_exec_result(self, res: types.CallToolResult, what: str) -> dict[str, Any]:
        if res.is_error:
            fail(f"{what}: expected isError false, got isError true: {short(self.texts(res))}")
        validate_instance(res.structured_content, self.output_schemas["execute_code"], what)
        sc = res.structured_content
        if not isinstance(sc, dict):
            fail(f"{what}: expected an object structuredContent, got {short(sc)}")
        vm_id = sc.get("vm_id")
        if not isinstance(vm_id, str) or not vm_id:
            fail(f"{what}: expected a non-empty vm_id, got {vm_id!r}")
        if vm_id in self.vm_ids:
            fail(f"{what}: expected a fresh VM per call, got vm_id {vm_id!r} again (seen {self.vm_ids})")
        self.vm_ids.append(vm_id)
        return sc

    def expect_fields(self, sc: dict[str, Any], what: str, **want: Any) -> None:
        for key, value in want.items():
            if sc.get(key) != value:
                fail(f"{what}: expected {key}={value!r}, got {key}={sc.get(key)!r} "
                     f"(stdout={sc.get('stdout')!r}, stderr={sc.get('stderr')!r}, exit_code={sc.get('exit_code')!r})")

    async def check_python(self) -> None:
        what = "execute_code python"
        code = 'import sys; print(6*7); print("err", file=sys.stderr); sys.exit(3)'
        res = await self.call("execute_code", {"language": "python", "code": code}, what)
        sc = self.check_exec_result(res, what)
        self.expect_fields(sc, what, stdout="42\n", stderr="err\n", exit_code=3, timed_out=False)
        if not any(t.strip() for t in self.texts(res)):
            fail(f"{what}: expected non-empty text content, got {short([c.model_dump() for c in res.content])}")
        self.result["python_duration_ms"] = sc.get("duration_ms")
        ok(f"{what}: stdout 42, stderr err, exit_code 3 (vm {sc['vm_id']}, {sc.get('duration_ms')} ms)")

    async def check_bash(self) -> None:
        what = "execute_code bash stdin/env"
        res = await self.call("execute_code", {"language": "bash", "code": 'read x; echo "$GREETING $x"',
                                               "stdin": "hello", "env": {"GREETING": "hi"}}, what)
        sc = self.check_exec_result(res, what)
        self.expect_fields(sc, what, stdout="hi hello\n", exit_code=0)
        ok(f"{what}: stdout 'hi hello', exit_code 0 (vm {sc['vm_id']})")

    async def check_errors(self) -> None:
        cases = [
            ("unknown language", {"language": "cobol", "code": "DISPLAY 'HI'."}, "python"),
            ("empty code", {"language": "python", "code": ""}, None),
            ("timeout out of range", {"language": "python", "code": "print(1)", "timeout_seconds": 100000}, None),
        ]
        for label, arguments, must_contain in cases:
            what = f"execute_code {label}"
            # The SDK does not validate arguments against inputSchema client-side,
            # so these reach the server as written.
            res = await self.call("execute_code", arguments, what)
            text = "\n".join(self.texts(res))
            if not res.is_error:
                fail(f"{what}: expected isError true, got isError false with "
                     f"structuredContent {short(res.structured_content)}")
            if not text.strip():
                fail(f"{what}: expected a text message explaining the error, got {short([c.model_dump() for c in res.content])}")
            if must_contain and must_contain not in text:
                fail(f"{what}: expected the message to name the available languages ({must_contain!r}), got {text!r}")
            ok(f"{what}: isError true: {short(text, 120)}")

    async def check_progress(self) -> None:
        what = "execute_code progress"
        code = "import time\nfor i in range(6):\n    print(f'line {i}', flush=True)\n    time.sleep(0.5)\n"
        seen: list[tuple[float, float | None, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append((progress, total, message))

        res = await self.call("execute_code", {"language": "python", "code": code}, what,
                              progress_callback=on_progress)
        await anyio.sleep(0.05)  # progress callbacks are spawned tasks; let stragglers land
        sc = self.check_exec_result(res, what)
        lines = sc.get("stdout", "").splitlines()
        if len(lines) != 6:
            fail(f"{what}: expected 6 lines of stdout, got {len(lines)}: {sc.get('stdout')!r}")
        self.expect_fields(sc, what, exit_code=0)
        values = [p for p, _, _ in seen]
        self.result["progress_count"] = len(seen)
        self.result["progress_values"] = values
        if not seen:
            fail(f"{what}: expected >= 1 notifications/progress during a 3 s run, got none")
        if any(b < a for a, b in zip(values, values[1:])):
            fail(f"{what}: expected non-decreasing progress values, got {values}")
        if values[-1] <= 0:
            fail(f"{what}: expected the last progress value > 0, got {values}")
        bad = [m for _, _, m in seen if not isinstance(m, str) or not m.strip()]
        if bad:
            fail(f"{what}: expected a human-readable message on every progress notification, got {[m for _, _, m in seen]}")
        ok(f"{what}: {len(seen)} notifications, values {values}, last message {seen[-1][2]!r}")

    async def check_cancel(self) -> None:
        assert self.client is not None and self.tap is not None
        what = "execute_code cancel"
        code = 'import time; print("started", flush=True); time.sleep(60)'
        running = anyio.Event()
        seen: list[float] = []
        outcome: dict[str, Any] = {}

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(progress)
            if progress > 0:
                running.set()

        scope = anyio.CancelScope()

        async def run_call() -> None:
            with scope:
                try:
                    outcome["result"] = await self.client.call_tool(  # type: ignore[union-attr]
                        "execute_code", {"language": "python", "code": code, "timeout_seconds": 120},
                        read_timeout_seconds=CALL_TIMEOUT_S + 60, progress_callback=on_progress)
                except Exception as e:  # reported by the main task
                    outcome["error"] = e
            running.set()  # wake the waiter if the call ended early

        cancels_before = len(self.tap.cancels)
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_call)
            with anyio.move_on_after(CALL_TIMEOUT_S) as wait_scope:
                await running.wait()
            if wait_scope.cancelled_caught:
                scope.cancel()
                fail(f"{what}: expected a progress notification with progress > 0 within {CALL_TIMEOUT_S:.0f} s "
                     f"of starting a program that prints, got {seen}")
            if "result" in outcome or "error" in outcome:
                got = outcome.get("error") or short(outcome["result"].model_dump(exclude_none=True))
                fail(f"{what}: expected the 60 s program to still be running, got the call finished: {got}")
            if self.vms_dir is not None:
                entries = self.vm_entries()
                if len(entries) != 1 or not entries[0].is_dir():
                    scope.cancel()
                    fail(f"{what}: expected exactly one VM directory in {self.vms_dir} while the call runs, "
                         f"got {[e.name for e in entries]}")
                vm_name = entries[0].name
            t_cancel = time.monotonic()
            scope.cancel()
        # The SDK writes notifications/cancelled (shielded) before the cancelled call unwinds.
        if len(self.tap.cancels) <= cancels_before:
            fail(f"{what}: expected the SDK to emit notifications/cancelled, got none (sent {self.tap.sent_methods[-5:]})")
        t_sent, cancel_params = self.tap.cancels[-1]
        self.result["cancel_params"] = cancel_params
        modern_http = self.result["transport"] == "http" and self.result.get("protocol_version") == "2026-07-28"
        self.result["cancel_wire"] = "http-post-abort" if modern_http else "notifications/cancelled"
        self.result["cancel_emit_ms"] = round((t_sent - t_cancel) * 1000, 2)

        if self.vms_dir is None:
            self.result["cancel_to_gone_ms"] = None
            ok(f"{what}: cancelled via {self.result['cancel_wire']} (no --vms-dir, VM teardown not measured)")
        else:
            deadline = t_sent + CANCEL_MEASURE_MAX_S
            while True:
                now = time.monotonic()
                if not self.vm_entries():
                    gone_ms = (now - t_sent) * 1000
                    break
                if now > deadline:
                    gone_ms = None
                    break
                await anyio.sleep(POLL_S)
            self.result["cancel_to_gone_ms"] = None if gone_ms is None else round(gone_ms, 1)
            if gone_ms is None:
                fail(f"{what}: expected {self.vms_dir} empty within {CANCEL_LIMIT_MS:.0f} ms of the cancel, "
                     f"got {[e.name for e in self.vm_entries()]} still there after {CANCEL_MEASURE_MAX_S:.0f} s")
            if gone_ms > CANCEL_LIMIT_MS:
                fail(f"{what}: expected VM {vm_name} gone within {CANCEL_LIMIT_MS:.0f} ms of the cancel, "
                     f"got {gone_ms:.0f} ms")
            ok(f"{what}: cancelled via {self.result['cancel_wire']}; VM {vm_name} gone {gone_ms:.0f} ms later")
        await self.check_list_languages("list_languages after cancel")
        ok("server still answers after the cancel (list_languages)")

    async def close(self, stack: AsyncExitStack) -> None:
        t0 = time.monotonic()
        await stack.aclose()  # bounded by the SDK (stdio: grace, SIGTERM, SIGKILL)
        close_ms = round((time.monotonic() - t0) * 1000, 1)
        self.result["close_ms"] = close_ms
        if not self.server_cmd:
            ok(f"closed the HTTP client ({close_ms} ms)")
            return
        proc = _captured_proc.get("proc")
        if not self.stdio_hooked or proc is None:
            self.result["server_exit_code"] = None
            ok(f"closed (server exit status not observable with this SDK build; check skipped) ({close_ms} ms)")
            return
        rc = proc.returncode
        self.result["server_exit_code"] = rc
        if rc is None:
            fail(f"close: expected the server process to exit after its stdin closed, got it still running")
        if rc < 0:
            fail(f"close: expected the server to exit by itself within {SERVER_EXIT_GRACE_S:.0f} s of stdin closing, "
                 f"got killed by signal {-rc} after the grace period")
        if rc != 0:
            fail(f"close: expected server exit status 0 after stdin closed, got {rc}")
        ok(f"server exited with status 0 after stdin closed ({close_ms} ms)")

    async def run(self) -> None:
        # The server may make the directory with its first VM; its parent must exist.
        if self.vms_dir is not None and not self.vms_dir.parent.is_dir():
            fail(f"--vms-dir: expected a directory inside an existing one, got {self.vms_dir}")
        stack = AsyncExitStack()
        failures: list[BaseException] = []
        try:
            self.phase = "connect"
            await self.connect(stack)
            self.phase = "tools/list"
            await self.check_list_tools()
            self.phase = "list_languages"
            names = await self.check_list_languages()
            ok(f"list_languages: {names}")
            self.phase = "execute_code python"
            await self.check_python()
            self.phase = "execute_code bash"
            await self.check_bash()
            self.phase = "execute_code error cases"
            await self.check_errors()
            self.phase = "execute_code progress"
            await self.check_progress()
            self.phase = "execute_code cancel"
            if self.args.skip_cancel:
                ok("cancel check skipped (--skip-cancel)")
            else:
                await self.check_cancel()
            self.phase = "close"
            await self.close(stack)
        except BaseException as e:  # noqa: BLE001 - reported by main()
            failures.append(e)
        # On failure still tear down (the SDK kills a stdio server that will not
        # exit). A transport task failure (e.g. connection refused) surfaces only
        # here, while the body saw a mere cancellation, so keep both.
        try:
            await stack.aclose()
        except BaseException as e:  # noqa: BLE001
            failures.append(e)
        if failures:
            raise _Failures(failures)
        self.result["vm_ids"] = self.vm_ids
        print("RESULT " + json.dumps(self.result, default=str), flush=True)

    def server_exit_note(self) -> str:
        proc = _captured_proc.get("proc")
        rc = getattr(proc, "returncode", None)
        return f" (server process exited with status {rc})" if rc is not None else ""


class _Failures(Exception):
    """Everything that went wrong in one run (body first, then teardown)."""

    def __init__(self, exceptions: list[BaseException]) -> None:
        super().__init__(f"{len(exceptions)} failure(s)")
        self.exceptions = exceptions


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str] | None]:
    server_cmd: list[str] | None = None
    if "--stdio" in argv:
        i = argv.index("--stdio")
        argv, server_cmd = argv[:i], argv[i + 1:]
        if server_cmd[:1] == ["--"]:
            server_cmd = server_cmd[1:]
    ap = argparse.ArgumentParser(prog="mcp_check.py", description="Check an MCP server (NeuroVisor contract).",
                                 epilog="--stdio CMD [ARG ...] must be last; everything after it is the server command.")
    ap.add_argument("--http", metavar="URL")
    ap.add_argument("--header", action="append", default=[], metavar="'Name: value'")
    ap.add_argument("--protocol", choices=PROTOCOLS)
    ap.add_argument("--vms-dir", metavar="PATH")
    ap.add_argument("--languages", default="python,bash")
    ap.add_argument("--skip-cancel", action="store_true")
    args = ap.parse_args(argv)
    if (server_cmd is None) == (args.http is None):
        ap.error("exactly one of --stdio CMD [ARG ...] or --http URL is required")
    if server_cmd is not None and not server_cmd:
        ap.error("--stdio needs a command")
    if server_cmd is not None and args.header:
        ap.error("--header only applies to --http")
    for h in args.header:
        if ":" not in h or not h.split(":", 1)[0].strip():
            ap.error(f"--header expects 'Name: value', got {h!r}")
    args.languages = [x.strip() for x in args.languages.split(",") if x.strip()]
    return args, server_cmd


def _find_check_failure(exc: BaseException) -> BaseException:
    """Unwrap exception groups to the most informative leaf: a CheckFailed,
    else the first error that is not a mere cancellation."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        subs = getattr(e, "exceptions", None)
        if isinstance(subs, (list, tuple)) and subs:
            for s in subs:
                walk(s)
        else:
            leaves.append(e)

    walk(exc)
    cancelled = asyncio.CancelledError  # anyio.run() uses the asyncio backend
    for leaf in leaves:
        if isinstance(leaf, CheckFailed):
            return leaf
    for leaf in leaves:
        if not isinstance(leaf, cancelled):
            return leaf
    return leaves[0] if leaves else exc


def main() -> int:
    args, server_cmd = parse_args(sys.argv[1:])
    checker = Checker(args, server_cmd)
    try:
        anyio.run(checker.run)
    except KeyboardInterrupt:
        print("FAIL: interrupted", file=sys.stderr, flush=True)
        return 1
    except BaseException as e:  # noqa: BLE001 - every failure becomes one FAIL line
        leaf = _find_check_failure(e)
        phase = checker.phase
        if isinstance(leaf, CheckFailed):
            line = str(leaf)
        elif isinstance(leaf, MCPError):
            line = (f"{phase}: expected no protocol error, got MCPError {leaf.code}: {leaf.error.message}"
                    f"{checker.server_exit_note()}")
        elif isinstance(leaf, TimeoutError):
            line = f"{phase}: expected the server to answer in time, got a timeout{checker.server_exit_note()}"
        elif isinstance(leaf, (OSError, httpx2.HTTPError)):
            line = f"{phase}: expected to reach the server, got {type(leaf).__name__}: {leaf}"
        else:
            traceback.print_exception(leaf, file=sys.stderr)
            line = f"{phase}: expected no error, got {type(leaf).__name__}: {leaf}{checker.server_exit_note()}"
        print(f"FAIL: {line}", file=sys.stderr, flush=True)
        print("RESULT " + json.dumps(checker.result, default=str), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
