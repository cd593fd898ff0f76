# The driver of a Python code context (started by the guest agent's
# contexts.rs as `python3 -c <this>`). Requests come as JSON lines on fd 3
# ({"code", "env"}); events go back on fd 3 as JSON lines: stdout/stderr
# written from Python, results (the last expression's value, in every
# _repr_*_ the value offers), an error, and "done" with the count of runs.
# fd 0 is /dev/null; fd 1 and 2 stay pipes the agent reads (what child
# processes and C code write).
import ast
import base64
import json
import os
import socket
import sys
import traceback

_sock = socket.socket(fileno=3)
_rd = _sock.makefile("r", encoding="utf-8", newline="\n")
_wr = _sock.makefile("w", encoding="utf-8", newline="\n")


def _send(msg):
    _wr.write(json.dumps(msg) + "\n")
    _wr.flush()


class _Stream:
    encoding = "utf-8"
    errors = "replace"

    def __init__(self, kind):
        self.kind = kind
        self.pending = ""

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        # Whole lines, as a terminal would show them.
        self.pending += s
        if "\n" in self.pending or len(self.pending) > 4096:
            cut = self.pending.rfind("\n") + 1 or len(self.pending)
            _send({"type": self.kind, "text": self.pending[:cut]})
            self.pending = self.pending[cut:]
        return len(s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if self.pending:
            _send({"type": self.kind, "text": self.pending})
            self.pending = ""

    def isatty(self):
        return False

    def fileno(self):
        return 1 if self.kind == "stdout" else 2

    @property
    def buffer(self):
        return (sys.__stdout__ if self.kind == "stdout" else sys.__stderr__).buffer


_FORMATS = [
    ("html", "_repr_html_"),
    ("markdown", "_repr_markdown_"),
    ("svg", "_repr_svg_"),
    ("png", "_repr_png_"),
    ("jpeg", "_repr_jpeg_"),
    ("latex", "_repr_latex_"),
    ("json", "_repr_json_"),
    ("javascript", "_repr_javascript_"),
]


def _result(value, main):
    out = {"type": "result", "text": repr(value), "is_main_result": main}
    for key, method in _FORMATS:
        f = getattr(value, method, None)
        if not callable(f):
            continue
        try:
            v = f()
        except Exception:
            continue
        if v is None:
            continue
        if isinstance(v, tuple):
            v = v[0]
        if isinstance(v, bytes):
            v = base64.b64encode(v).decode()
        elif key == "json" and not isinstance(v, str):
            v = json.dumps(v)
        out[key] = v
    return out


def display(*values):
    """Shows values along the way, like IPython's display()."""
    for v in values:
        _send(_result(v, False))


_globals = {"__name__": "__main__", "__builtins__": __builtins__, "display": display}
_count = 0
sys.stdin = open(os.devnull)

for _line in _rd:
    _req = json.loads(_line)
    _count += 1
    _saved = {k: os.environ.get(k) for k in _req.get("env", {})}
    os.environ.update(_req.get("env", {}))
    sys.stdout, sys.stderr = _Stream("stdout"), _Stream("stderr")
    _name = f"<cell {_count}>"
    try:
        _tree = ast.parse(_req["code"], _name, "exec")
        _last = None
        if _tree.body and isinstance(_tree.body[-1], ast.Expr):
            _last = ast.Expression(_tree.body.pop().value)
        exec(compile(_tree, _name, "exec"), _globals)
        if _last is not None:
            _value = eval(compile(_last, _name, "eval"), _globals)
            if _value is not None:
                _send(_result(_value, True))
    except BaseException as _e:  # noqa: BLE001 - everything the code raises is its result
        _tb = _e.__traceback__
        # Not the driver's own frame.
        while _tb is not None and _tb.tb_frame.f_code.co_filename == "<string>":
            _tb = _tb.tb_next
        _send(
            {
                "type": "error",
                "name": type(_e).__name__,
                "value": str(_e),
                "traceback": "".join(traceback.format_exception(type(_e), _e, _tb)),
            }
        )
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        for _k, _v in _saved.items():
            if _v is None:
                os.environ.pop(_k, None)
            else:
                os.environ[_k] = _v
    _send({"type": "done", "execution_count": _count})
