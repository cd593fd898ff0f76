#!/usr/bin/env python3
"""A real gRPC client in another language: stubs are generated with grpcio-tools
from the project's .proto files, then every public call of the daemon is made.

    sandbox_client.py --addr unix:/run/neurovisor/neurovisor.sock --proto-dir crates/proto/proto
Exits non-zero with a message on the first failed check.
"""
import argparse
import importlib
import os
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc


def generate(proto_dir, out_dir):
    for name in ("session.proto", "sandbox.proto", "inference.proto"):
        rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out_dir}",
                          f"--grpc_python_out={out_dir}", os.path.join(proto_dir, name)])
        if rc != 0:
            sys.exit(f"protoc failed for {name}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("sandbox_pb2"), importlib.import_module("sandbox_pb2_grpc")


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--proto-dir", required=True)
    args = ap.parse_args()
    # The stubs are imported at once, so their directory can go right away.
    with tempfile.TemporaryDirectory(prefix="nv-py-stubs-") as out:
        pb, pb_grpc = generate(args.proto_dir, out)
    # Over a Unix socket gRPC C-core sends the percent-encoded path as
    # :authority, which HTTP/2 servers (hyper) reject: name a host instead.
    opts = [("grpc.default_authority", "localhost")] if args.addr.startswith("unix:") else []
    channel = grpc.insecure_channel(args.addr, options=opts)
    stub = pb_grpc.SandboxStub(channel)

    langs = stub.Languages(pb.LanguagesRequest(), timeout=30)
    check({"python", "bash", "javascript"} <= {l.name for l in langs.languages}, "Languages lists python, bash, javascript")

    res, call = stub.ExecuteOnce.with_call(
        pb.ExecuteRequest(language="python", code="import os\nprint(6*7)\nprint(os.environ['NEUROVISOR_TRACE_ID'])"),
        metadata=[("x-trace-id", "py-trace-1")], timeout=120)
    check(res.exit_code == 0 and res.stdout == b"42\npy-trace-1\n", f"ExecuteOnce runs code ({res.stdout!r})")
    check(res.trace_id == "py-trace-1" and res.vm_id, "ExecuteOnce honours x-trace-id and names the VM")
    check(dict(call.initial_metadata()).get("x-trace-id") == "py-trace-1", "x-trace-id comes back in response metadata")

    out_chunks, result = [], None
    for msg in stub.Execute(pb.ExecuteRequest(language="bash", code="echo one; echo two >&2; exit 3"), timeout=120):
        kind = msg.WhichOneof("event")
        if kind == "stdout":
            out_chunks.append(msg.stdout)
        elif kind == "result":
            result = msg.result
    check(b"".join(out_chunks) == b"one\n" and result is not None and result.exit_code == 3,
          "Execute streams output and the final result")

    try:
        stub.ExecuteOnce(pb.ExecuteRequest(language="cobol", code="x"), timeout=30)
        check(False, "unknown language is rejected")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "cobol" in e.details(),
              f"unknown language is INVALID_ARGUMENT ({e.details()})")

    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    check(health.status == health_pb2.HealthCheckResponse.SERVING, "grpc.health.v1 reports SERVING")

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    services = {s.name for a in answers for s in a.list_services_response.service}
    check({"neurovisor.v1.Sandbox", "inference.InferenceService", "grpc.health.v1.Health"} <= services,
          f"reflection lists the services ({sorted(services)})")
    print("python client: all checks passed")


if __name__ == "__main__":
    main()
