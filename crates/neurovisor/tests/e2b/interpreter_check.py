"""Drives the code interpreter API of `neurovisor serve --e2b-listen` with
the official `e2b-code-interpreter` SDK, unmodified (run by tests/e2b.rs in
the daemon's loopback-only network namespace). Prints `INTERPRETER-CHECK OK`.
"""

from importlib.metadata import version

from e2b_code_interpreter import Sandbox


def step(name):
    print(f"step: {name}", flush=True)


step(f"e2b-code-interpreter {version('e2b-code-interpreter')}")
sbx = Sandbox.create(envs={"FROM_CREATE": "c"})

# Globals persist; the last expression is the result; output streams.
seen = []
e = sbx.run_code("x = 41\nprint('hi')", on_stdout=lambda m: seen.append(m.line))
assert e.logs.stdout == ["hi\n"] and e.error is None, e
assert seen == ["hi\n"], seen
e = sbx.run_code("x + 1")
assert e.text == "42", e
assert e.execution_count == 2, e.execution_count
e = sbx.run_code("import os\nos.environ['A'] + os.environ['FROM_CREATE']", envs={"A": "b"})
assert e.text == "'bc'", e
e = sbx.run_code("import sys\nprint('oops', file=sys.stderr)")
assert e.logs.stderr == ["oops\n"], e
step("state and results")

# Errors: name, value, traceback; the context survives them.
e = sbx.run_code("def f():\n    raise ValueError('bad input')\nf()")
assert (e.error.name, e.error.value) == ("ValueError", "bad input"), e.error
assert "line 2, in f" in e.error.traceback, e.error.traceback
assert sbx.run_code("x").text == "41"
step("errors")

# Rich results from the _repr_*_ protocol.
e = sbx.run_code("class Page:\n    def _repr_html_(self):\n        return '<b>hi</b>'\nPage()")
assert e.results[0].html == "<b>hi</b>" and e.results[0].is_main_result, e.results
step("rich results")

# Contexts: separate state, list, restart, remove.
ctx = sbx.create_code_context(cwd="/tmp")
assert ctx.language == "python" and ctx.cwd == "/tmp", ctx
e = sbx.run_code("x", context=ctx)
assert e.error is not None and e.error.name == "NameError", e
sbx.run_code("y = 5", context=ctx)
assert sbx.run_code("y * 2", context=ctx).text == "10"
assert sbx.run_code("import os\nos.getcwd()", context=ctx).text == "'/tmp'"
ids = [c.id for c in sbx.list_code_contexts()]
assert ctx.id in ids, ids
sbx.restart_code_context(ctx)
assert sbx.run_code("y", context=ctx).error.name == "NameError"
sbx.remove_code_context(ctx)
assert ctx.id not in [c.id for c in sbx.list_code_contexts()]
step("contexts")

# JavaScript.
e = sbx.run_code("const a = 20; console.log('js'); a + 1", language="js")
assert (e.text, e.logs.stdout) == ("21", ["js\n"]), e
assert sbx.run_code("a * 2", language="js").text == "40"
e = sbx.run_code("null.x", language="js")
assert e.error.name == "TypeError", e.error
js = sbx.create_code_context(language="js")
assert sbx.run_code("typeof a", context=js).text == "'undefined'"
step("javascript")

# A client that gives up on a run (its timeout) interrupts it; the context
# keeps its state and takes the next run.
import e2b

try:
    sbx.run_code("import time\ntime.sleep(60)", timeout=3)
    raise AssertionError("the run did not time out")
except e2b.TimeoutException:
    pass
assert sbx.run_code("x").text == "41"
step("timeout")

sbx.kill()
step("kill")
print("INTERPRETER-CHECK OK", flush=True)
