// The driver of a JavaScript code context (started by the guest agent's
// contexts.rs as `node -e <this>`): the same protocol as python.py, on fd 3.
// Each run is a script in one vm context, so top-level `var`s, functions and
// globals persist; `let`/`const` persist too (the context's global lexical
// scope). A run's completion value is its result; a promise is awaited.
"use strict";
const net = require("net");
const vm = require("vm");
const util = require("util");
const readline = require("readline");

const sock = new net.Socket({ fd: 3, readable: true, writable: true });
const send = (msg) => sock.write(JSON.stringify(msg) + "\n");
const text = (args) => args.map((a) => (typeof a === "string" ? a : util.inspect(a))).join(" ") + "\n";
const out = (type) => (...a) => {
  send({ type, text: text(a) });
};
const console_ = { log: out("stdout"), info: out("stdout"), debug: out("stdout"), warn: out("stderr"),
  error: out("stderr") };
const sandbox = { console: console_, require, process, Buffer, setTimeout, clearTimeout, setInterval,
  clearInterval, setImmediate, clearImmediate, URL, TextEncoder, TextDecoder, module: { exports: {} } };
const context = vm.createContext(sandbox);
let count = 0;
let queue = Promise.resolve();

async function run(req) {
  count += 1;
  const saved = {};
  for (const [k, v] of Object.entries(req.env || {})) {
    saved[k] = process.env[k];
    process.env[k] = v;
  }
  try {
    let value = vm.runInContext(req.code, context, { filename: `<cell ${count}>` });
    if (value && typeof value.then === "function") value = await value;
    if (value !== undefined) {
      const r = { type: "result", text: util.inspect(value), is_main_result: true };
      try {
        if (value !== null && typeof value === "object") r.json = JSON.stringify(value);
      } catch (_) {}
      send(r);
    }
  } catch (e) {
    // Errors made in the context come from its own realm: not `instanceof Error` here.
    const isErr = e !== null && typeof e === "object" && "message" in e;
    send({
      type: "error",
      name: isErr && e.name ? String(e.name) : "Error",
      value: isErr ? String(e.message) : String(e),
      traceback: isErr && e.stack ? String(e.stack) : String(e),
    });
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
  send({ type: "done", execution_count: count });
}

readline.createInterface({ input: sock }).on("line", (line) => {
  const req = JSON.parse(line);
  queue = queue.then(() => run(req));
});
