#!/usr/bin/env python3
"""The desktop tools of a daemon's MCP endpoint, driven by the official MCP
Python SDK (``mcp==2.3.0``) as a computer-use agent would: create a desktop,
look at it, click and type, destroy it.

Usage: desktop_check.py URL TOKEN          (Streamable HTTP)
       desktop_check.py --stdio CMD [ARG ...]   (a server it spawns)

Over stdio the desktop is left running on purpose: the client then closes,
and the server must destroy it (the caller checks the daemon holds none).

One ``ok: ...`` line per passed check, then ``RESULT {json}``; exit 0. On the
first failed check: ``FAIL: ...`` on stderr, exit 1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

TIMEOUT_S = 300.0


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def ok(msg: str) -> None:
    print(f"ok: {msg}", flush=True)


def texts(res: types.CallToolResult) -> str:
    return " ".join(c.text for c in res.content if isinstance(c, types.TextContent))


def png_of(res: types.CallToolResult, what: str) -> bytes:
    if res.is_error:
        fail(f"{what}: expected an image, got an error: {texts(res)}")
    images = [c for c in res.content if isinstance(c, types.ImageContent)]
    if len(images) != 1 or images[0].mime_type != "image/png":
        fail(f"{what}: expected one image/png content block, got {res.content!r:.300}")
    png = base64.b64decode(images[0].data)
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        fail(f"{what}: the image is not a PNG: {png[:16]!r}")
    return png


async def main(url: str | None, token: str | None, server: list[str]) -> None:
    result: dict[str, Any] = {"transport": "stdio" if server else "http"}
    async with AsyncExitStack() as stack:
        if server:
            transport: Any = stdio_client(StdioServerParameters(command=server[0], args=server[1:],
                                                                env=dict(os.environ)))
        else:
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                      timeout=httpx2.Timeout(30.0, read=TIMEOUT_S))
            await stack.enter_async_context(http)
            transport = streamable_http_client(url, http_client=http)
        client = Client(transport, mode="legacy",
                        read_timeout_seconds=TIMEOUT_S, cache=None,
                        client_info=types.Implementation(name="neurovisor-desktop-check", version="1"))
        await stack.enter_async_context(client)

        async def call(name: str, args: dict[str, Any]) -> types.CallToolResult:
            return await client.call_tool(name, args, read_timeout_seconds=TIMEOUT_S)

        tools = {t.name for t in (await client.list_tools()).tools}
        want = {"desktop_create", "desktop_screenshot", "desktop_action", "desktop_kill", "execute_code"}
        if not want <= tools:
            fail(f"tools/list: expected {sorted(want)}, got {sorted(tools)}")
        ok(f"tools/list: {sorted(tools)}")

        t0 = time.monotonic()
        created = await call("desktop_create", {"timeout_seconds": 300})
        if created.is_error:
            fail(f"desktop_create: {texts(created)}")
        info = created.structured_content or {}
        sid = info.get("sandbox_id")
        if not sid or (info.get("width"), info.get("height")) != (1280, 800):
            fail(f"desktop_create: expected a sandbox id and 1280x800, got {info}")
        result["create_s"] = round(time.monotonic() - t0, 1)
        ok(f"desktop_create: {sid} in {result['create_s']} s")

        first = png_of(await call("desktop_screenshot", {"sandbox_id": sid}), "desktop_screenshot")
        w, h = struct.unpack(">II", first[16:24])
        if (w, h) != (1280, 800):
            fail(f"desktop_screenshot: expected 1280x800, got {w}x{h}")
        ok(f"desktop_screenshot: a {w}x{h} PNG of {len(first)} bytes")

        for args in ({"action": "click", "x": 400, "y": 300},
                     {"action": "type", "text": "echo mcp-typed\n"}):
            r = await call("desktop_action", {"sandbox_id": sid, **args})
            if r.is_error:
                fail(f"desktop_action {args}: {texts(r)}")
        ok("desktop_action: click, type")

        bad = await call("desktop_action", {"sandbox_id": sid, "action": "move", "x": 99999, "y": 1})
        if not bad.is_error or "off the screen" not in texts(bad):
            fail(f"desktop_action off the screen: expected an error result naming it, got {texts(bad)}")
        missing = await call("desktop_action", {"sandbox_id": sid, "action": "type"})
        if not missing.is_error or "give text" not in texts(missing):
            fail(f"desktop_action without text: expected an error result naming it, got {texts(missing)}")
        ok("desktop_action: bad arguments are error results that name the fix")

        # The typed line shows: the screen changed.
        second = b""
        for _ in range(50):
            second = png_of(await call("desktop_screenshot", {"sandbox_id": sid}), "desktop_screenshot")
            if second != first:
                break
            await asyncio.sleep(0.2)
        if second == first:
            fail("desktop_screenshot: the screen did not change after typing")
        ok("desktop_screenshot: the typed text changed the screen")

        unknown = await call("desktop_kill", {"sandbox_id": "sb-no-such-desktop"})
        if not unknown.is_error or "no sandbox" not in texts(unknown):
            fail(f"desktop_kill of an unknown id: expected an error result naming it, got {texts(unknown)}")
        ok("desktop_kill: an unknown id is an error result")

        if server:
            result["left_running"] = sid
            ok(f"closing the client with {sid} still running")
            print("RESULT " + json.dumps(result), flush=True)
            return

        killed = await call("desktop_kill", {"sandbox_id": sid})
        if killed.is_error:
            fail(f"desktop_kill: {texts(killed)}")
        gone = await call("desktop_screenshot", {"sandbox_id": sid})
        if not gone.is_error or "no sandbox" not in texts(gone):
            fail(f"desktop_screenshot after kill: expected an error result, got {texts(gone)}")
        ok("desktop_kill: the desktop is gone")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--stdio":
        asyncio.run(main(None, None, sys.argv[2:]))
    elif len(sys.argv) == 3:
        asyncio.run(main(sys.argv[1], sys.argv[2], []))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
