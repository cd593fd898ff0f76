#!/usr/bin/env python3
"""Checks the NeuroVisor monitoring stack's configuration (monitoring/).

    python3 monitoring/check.py [--metrics SCRAPE_FILE] [--promtool PATH]

Without a running stack it verifies what can be verified offline:

* every YAML file under monitoring/ parses, and every dashboard JSON;
* docker-compose.yml: the expected services and host ports, pinned image
  tags, bind-mounted files that exist;
* the OpenTelemetry Collector's pipelines name components it defines;
* Grafana: dashboards have a title and a unique uid, every datasource a
  dashboard (or a datasource) refers to is provisioned, the dashboard
  provider reads the directory compose mounts the dashboards at;
* promtool check config (with the rule files it names), promtool check
  rules, promtool test rules prometheus/rules_test.yml, and the PromQL
  syntax of every dashboard query (checked as recording rules by promtool);
* with --metrics SCRAPE_FILE (a /metrics scrape, e.g.
  `curl -s http://127.0.0.1:9090/metrics > scrape.txt`): every neurovisor_*
  metric a dashboard query, a variable query, a rule or a datasource link
  names is exported by that scrape.

Prints one line per problem (file and panel) and exits 1 on any; prints a
summary line and exits 0 otherwise. Needs Python 3 with PyYAML (Debian:
python3-yaml); when the interpreter running it has none, it re-runs itself
with $CHECK_PYTHON, <repo>/.venv/bin/python or /usr/bin/python3 if one has.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

try:
    import yaml  # PyYAML
except ImportError:  # pragma: no cover - depends on the machine
    yaml = None
    if not os.environ.get("NV_CHECK_REEXEC"):
        for cand in (os.environ.get("CHECK_PYTHON"), os.path.join(REPO, ".venv/bin/python"), "/usr/bin/python3"):
            if not cand or not os.access(cand, os.X_OK):
                continue
            if os.path.realpath(cand) == os.path.realpath(sys.executable):
                continue
            if subprocess.run([cand, "-c", "import yaml"], capture_output=True).returncode == 0:
                os.environ["NV_CHECK_REEXEC"] = "1"
                os.execv(cand, [cand, os.path.abspath(__file__)] + sys.argv[1:])

# Services, and the host ports they publish (container port in the comment).
EXPECTED_PORTS = {
    "grafana": {3000},
    "prometheus": {9091},  # 9090 in the container; 9090 on the host is the daemon's /metrics
    "pushgateway": {9092},  # 9091 in the container
    "tempo": {3200},
    "loki": {3100},
    "otel-collector": {4316, 4318},  # 4316 -> the collector's OTLP gRPC 4317
}
# Datasource uids Grafana provides itself.
BUILTIN_DS_UIDS = {"-- Grafana --", "grafana", "-- Mixed --", "-- Dashboard --"}
METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])neurovisor_[A-Za-z0-9_]+")
# Suffixes a family's samples carry (prometheus-client exposes counter `x` as
# `# TYPE x counter` with samples `x_total`).
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")


class Checker:
    def __init__(self):
        self.problems = []
        self.stats = {}

    def problem(self, where, msg):
        self.problems.append(f"{where}: {msg}")

    def rel(self, path):
        return os.path.relpath(path, REPO)


def walk_files(exts):
    out = []
    for root, dirs, files in os.walk(HERE):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for f in sorted(files):
            if f.endswith(exts):
                out.append(os.path.join(root, f))
    return out


# ------------------------------------------------------------------ YAML

def load_yaml_files(c):
    docs = {}
    files = walk_files((".yml", ".yaml"))
    if yaml is None:
        c.problem("monitoring/", "PyYAML is missing, YAML files not checked: apt-get install python3-yaml "
                  "(or pip install pyyaml), or run this with a Python that has it")
        return docs
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = list(yaml.safe_load_all(f))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            c.problem(c.rel(path), f"invalid YAML: {getattr(e, 'problem', None) or e}{at}")
            continue
        docs[path] = loaded[0] if len(loaded) == 1 else loaded
        if loaded[0] is None:
            c.problem(c.rel(path), "empty YAML document")
    c.stats["yaml"] = len(files)
    return docs


def check_compose(c, docs):
    path = os.path.join(HERE, "docker-compose.yml")
    compose = docs.get(path)
    if not isinstance(compose, dict):
        c.problem("monitoring/docker-compose.yml", "missing or not a mapping")
        return {}
    where = c.rel(path)
    services = compose.get("services") or {}
    for name in EXPECTED_PORTS:
        if name not in services:
            c.problem(where, f"service {name} missing")
    mounts = {}
    for name, svc in services.items():
        svc = svc or {}
        image = svc.get("image", "")
        if not image:
            c.problem(where, f"service {name}: no image")
        else:
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if not tag or tag == "latest":
                c.problem(where, f"service {name}: image {image} is not pinned to a version")
        host_ports = set()
        for p in svc.get("ports") or []:
            # "[${NV_BIND:-127.0.0.1}:]HOST:CONTAINER" -> HOST
            s = re.sub(r"\$\{[^}]*\}", "X", str(p)).split("/")[0]
            parts = s.split(":")
            if len(parts) >= 2 and parts[-2].isdigit():
                host_ports.add(int(parts[-2]))
        want = EXPECTED_PORTS.get(name)
        if want is not None and host_ports != want:
            c.problem(where, f"service {name}: host ports {sorted(host_ports)}, expected {sorted(want)}")
        for v in svc.get("volumes") or []:
            if not isinstance(v, str):
                continue
            src, _, rest = v.partition(":")
            dst = rest.split(":")[0]
            if src.startswith("."):
                full = os.path.normpath(os.path.join(HERE, src))
                if not os.path.exists(full):
                    c.problem(where, f"service {name}: mounted {src} does not exist")
                mounts[(name, dst)] = full
    return mounts


def check_collector(c, docs):
    path = os.path.join(HERE, "otel-collector", "config.yml")
    cfg = docs.get(path)
    if not isinstance(cfg, dict):
        c.problem(c.rel(path), "missing or not a mapping")
        return
    where = c.rel(path)
    svc = cfg.get("service") or {}
    for ext in svc.get("extensions") or []:
        if ext not in (cfg.get("extensions") or {}):
            c.problem(where, f"service.extensions names undefined extension {ext}")
    pipelines = svc.get("pipelines") or {}
    if not pipelines:
        c.problem(where, "no pipelines")
    for pname, p in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for comp in (p or {}).get(kind) or []:
                if comp not in (cfg.get(kind) or {}):
                    c.problem(where, f"pipeline {pname}: {kind[:-1]} {comp} is not defined")
        if not (p or {}).get("receivers") or not (p or {}).get("exporters"):
            c.problem(where, f"pipeline {pname}: needs receivers and exporters")


def iter_key(obj, key):
    """Every value of `key` anywhere in a nested structure."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from iter_key(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from iter_key(v, key)


def check_datasources(c, docs):
    path = os.path.join(HERE, "grafana", "provisioning", "datasources", "datasources.yml")
    cfg = docs.get(path)
    if not isinstance(cfg, dict):
        c.problem(c.rel(path), "missing or not a mapping")
        return {}, []
    where = c.rel(path)
    uids = {}
    for ds in cfg.get("datasources") or []:
        uid = ds.get("uid")
        if not uid:
            c.problem(where, f"datasource {ds.get('name')} has no uid (dashboards refer to uids)")
            continue
        if uid in uids:
            c.problem(where, f"datasource uid {uid} is used twice")
        uids[uid] = ds.get("type")
    for ds in cfg.get("datasources") or []:
        for ref in iter_key(ds.get("jsonData") or {}, "datasourceUid"):
            if ref not in uids:
                c.problem(where, f"datasource {ds.get('name')} links to datasource uid {ref}, not provisioned")
        jd = ds.get("jsonData") or {}
        if ds.get("type") == "prometheus":
            names = [d.get("name") for d in jd.get("exemplarTraceIdDestinations") or []]
            if "trace_id" not in names:
                c.problem(where, f"datasource {ds.get('name')}: no exemplarTraceIdDestinations entry named trace_id")
        if ds.get("type") == "loki":
            names = [d.get("name") for d in jd.get("derivedFields") or []]
            if "trace_id" not in names:
                c.problem(where, f"datasource {ds.get('name')}: no derived field named trace_id")
    # PromQL in datasource links (Tempo's traces-to-metrics queries).
    queries = []
    for ds in cfg.get("datasources") or []:
        for q in ((ds.get("jsonData") or {}).get("tracesToMetrics") or {}).get("queries") or []:
            queries.append((where, f"datasource {ds.get('name')} tracesToMetrics query {q.get('name')!r}",
                            q.get("query", "")))
    return uids, queries


def check_dashboard_provider(c, docs, mounts):
    path = os.path.join(HERE, "grafana", "provisioning", "dashboards", "dashboards.yml")
    cfg = docs.get(path)
    if not isinstance(cfg, dict):
        c.problem(c.rel(path), "missing or not a mapping")
        return
    dash_dir = os.path.join(HERE, "grafana", "dashboards")
    mounted_at = {dst for (svc, dst), src in mounts.items() if svc == "grafana" and src == dash_dir}
    for prov in cfg.get("providers") or []:
        p = (prov.get("options") or {}).get("path")
        if mounts and p not in mounted_at:
            c.problem(c.rel(path), f"provider {prov.get('name')} reads {p}, but compose mounts "
                      f"grafana/dashboards at {sorted(mounted_at) or 'no path'}")


# ------------------------------------------------------------------ dashboards

def all_panels(panels):
    for p in panels or []:
        yield p
        yield from all_panels(p.get("panels"))


def ds_uid(ref):
    if isinstance(ref, dict):
        return ref.get("uid")
    if isinstance(ref, str):
        return ref  # old style: a name or uid
    return None


def check_dashboards(c, ds_uids):
    """Returns [(file, where, promql)] of the Prometheus queries."""
    queries = []
    files = sorted(glob.glob(os.path.join(HERE, "grafana", "dashboards", "*.json")))
    if not files:
        c.problem("monitoring/grafana/dashboards", "no dashboards")
    seen_uids = {}
    npanels = 0
    for path in files:
        where = c.rel(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            c.problem(where, f"invalid JSON: {e}")
            continue
        uid, title = d.get("uid"), d.get("title")
        if not uid:
            c.problem(where, "no uid")
        elif uid in seen_uids:
            c.problem(where, f"uid {uid} is also the uid of {seen_uids[uid]}")
        else:
            seen_uids[uid] = where
        if uid and len(uid) > 40:
            c.problem(where, f"uid {uid} is longer than Grafana's 40 characters")
        if not title:
            c.problem(where, "no title")

        def check_ref(ref, what, default_type="prometheus"):
            uid_ = ds_uid(ref)
            if uid_ is None or uid_ in BUILTIN_DS_UIDS or uid_.startswith("$"):
                return default_type if uid_ is None else (ds_uids.get(uid_) or "")
            if ds_uids and uid_ not in ds_uids:
                c.problem(where, f"{what}: datasource uid {uid_!r} is not provisioned "
                          f"(have {', '.join(sorted(ds_uids))})")
            return ds_uids.get(uid_, "")

        for a in (d.get("annotations") or {}).get("list") or []:
            check_ref(a.get("datasource"), f"annotation {a.get('name')!r}")
        for v in (d.get("templating") or {}).get("list") or []:
            vtype = check_ref(v.get("datasource"), f"variable ${v.get('name')}")
            if v.get("type") != "query":
                continue
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            for text in {q, v.get("definition") or ""}:
                if text and vtype == "prometheus":
                    queries.append((where, f"variable ${v.get('name')}", text))
        ids = set()
        for p in all_panels(d.get("panels")):
            npanels += 1
            ptitle = p.get("title") or ""
            pw = f"panel {ptitle!r}"
            if p.get("type") != "row":
                if not ptitle:
                    c.problem(where, f"panel id {p.get('id')} has no title")
                if "gridPos" not in p:
                    c.problem(where, f"{pw}: no gridPos")
            if p.get("id") in ids:
                c.problem(where, f"{pw}: panel id {p.get('id')} is used twice")
            ids.add(p.get("id"))
            ptype = check_ref(p.get("datasource"), pw)
            for t in p.get("targets") or []:
                ttype = check_ref(t.get("datasource"), f"{pw} query {t.get('refId')}") if t.get("datasource") else ptype
                if ttype == "prometheus":
                    expr = t.get("expr")
                    if not expr:
                        c.problem(where, f"{pw} query {t.get('refId')}: empty expr")
                    else:
                        queries.append((where, f"{pw} query {t.get('refId')}", expr))
    c.stats["dashboards"] = len(files)
    c.stats["panels"] = npanels
    return queries


# ------------------------------------------------------------------ promtool

def run(cmd, cwd=None):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr).strip()


def check_promtool(c, promtool, dash_queries):
    prom_dir = os.path.join(HERE, "prometheus")
    config = os.path.join(prom_dir, "prometheus.yml")
    rules = os.path.join(prom_dir, "rules.yml")
    tests = os.path.join(prom_dir, "rules_test.yml")
    for what, cmd in (
        ("promtool check config", [promtool, "check", "config", config]),
        ("promtool check rules", [promtool, "check", "rules", rules]),
        ("promtool test rules", [promtool, "test", "rules", tests]),
    ):
        rc, out = run(cmd)
        if rc != 0:
            target = c.rel(cmd[-1])
            c.problem(target, f"{what} failed:")
            for line in out.splitlines():
                if line.strip():
                    c.problems.append("    " + line)
    c.stats["rule_tests"] = open(tests, encoding="utf-8").read().count("alertname:") if os.path.exists(tests) else 0

    # PromQL syntax of the dashboards' queries: as recording rules.
    def as_promql(q):
        m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", q, re.S)
        if m:
            q = m.group(1)
        elif re.fullmatch(r"\s*label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", q):
            return None
        elif re.match(r"\s*(label_names|metrics|query_result)\(", q):
            m = re.fullmatch(r"\s*query_result\((.*)\)\s*", q, re.S)
            if not m:
                return None
            q = m.group(1)
        q = re.sub(r"\$__(rate_interval|interval|range)(_ms|_s)?", "5m", q)
        q = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z]+)?\}?", ".*", q)
        return q

    items = [(w, p, as_promql(q)) for (w, p, q) in dash_queries]
    items = [i for i in items if i[2]]
    if not items:
        return

    def rules_file(subset):
        groups = [{"name": f"q{i}", "rules": [{"record": "dashboard:query", "expr": q}]}
                  for i, (_, _, q) in enumerate(subset)]
        return {"groups": groups}

    with tempfile.TemporaryDirectory(prefix="nv-monitoring-check-") as tmp:
        f = os.path.join(tmp, "dashboard_queries.yml")
        with open(f, "w", encoding="utf-8") as fh:
            json.dump(rules_file(items), fh)  # JSON is YAML
        rc, _ = run([promtool, "check", "rules", f])
        if rc == 0:
            c.stats["promql_checked"] = len(items)
            return
        for w, p, q in items:  # find the culprits one by one
            with open(f, "w", encoding="utf-8") as fh:
                json.dump(rules_file([(w, p, q)]), fh)
            rc, out = run([promtool, "check", "rules", f])
            if rc != 0:
                err = [l.strip() for l in out.splitlines() if "parse" in l or "error" in l.lower()]
                msg = (err or [out])[-1]
                msg = msg.split("could not parse expression: ", 1)[-1]
                c.problem(w, f"{p}: invalid PromQL: {msg} in {q!r}")


# ------------------------------------------------------------------ metrics cross-check

def exported_names(scrape_path):
    names = set()
    families = {}
    with open(scrape_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith("# TYPE "):
                parts = line.split()
                if len(parts) >= 4:
                    families[parts[2]] = parts[3]
                    for s in SUFFIXES:
                        names.add(parts[2] + s)
            elif line and not line.startswith("#"):
                m = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
                if m:
                    names.add(m.group(0))
    return names, families


def rule_queries(c, docs):
    path = os.path.join(HERE, "prometheus", "rules.yml")
    cfg = docs.get(path)
    out = []
    recorded = set()
    if not isinstance(cfg, dict):
        return out, recorded
    for g in cfg.get("groups") or []:
        for r in g.get("rules") or []:
            name = r.get("record") or r.get("alert")
            if r.get("record"):
                recorded.add(r["record"])
            out.append((c.rel(path), f"group {g.get('name')} rule {name}", str(r.get("expr", ""))))
    return out, recorded


def check_metrics(c, scrape, queries, recorded):
    names, families = exported_names(scrape)
    nv = {f for f in families if f.startswith("neurovisor_")}
    if not nv:
        c.problem(scrape, "no `# TYPE neurovisor_...` line: not a NeuroVisor scrape?")
    referenced = set()
    for where, what, q in queries:
        for m in sorted(set(METRIC_RE.findall(q))):
            referenced.add(m)
            if m not in names and m not in recorded:
                c.problem(where, f"{what}: {m} is not exported by {scrape}")
    used_families = set()
    for m in referenced:
        for fam in nv:
            if m in (fam + s for s in SUFFIXES):
                used_families.add(fam)
    c.stats["referenced"] = len(referenced)
    c.stats["unused"] = sorted(nv - used_families)


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics", metavar="SCRAPE_FILE",
                    help="a /metrics scrape: every neurovisor_* name the dashboards and rules use must be in it")
    ap.add_argument("--promtool", default=os.environ.get("PROMTOOL") or shutil.which("promtool"),
                    help="promtool binary [default: $PROMTOOL or promtool on PATH]")
    args = ap.parse_args()

    c = Checker()
    docs = load_yaml_files(c)
    if yaml is not None:
        mounts = check_compose(c, docs)
        check_collector(c, docs)
        ds_uids, ds_queries = check_datasources(c, docs)
        check_dashboard_provider(c, docs, mounts)
    else:
        ds_uids, ds_queries = {}, []
    dash_queries = check_dashboards(c, ds_uids)
    rq, recorded = rule_queries(c, docs)
    c.stats["rules"] = len(rq)

    if args.promtool and os.access(args.promtool, os.X_OK):
        check_promtool(c, args.promtool, dash_queries + ds_queries)
    else:
        c.problem("monitoring/prometheus", "promtool not found (Debian: apt-get install prometheus; "
                  "or --promtool PATH): config, rules and PromQL not checked")

    if args.metrics:
        if not os.path.isfile(args.metrics):
            c.problem(args.metrics, "no such file")
        else:
            check_metrics(c, args.metrics, dash_queries + ds_queries + rq, recorded)

    if c.problems:
        for p in c.problems:
            print(p)
        print(f"FAILED: {sum(1 for p in c.problems if not p.startswith('    '))} problem(s) in monitoring/")
        return 1
    s = c.stats
    line = (f"OK: {s.get('yaml', 0)} YAML files, {s.get('dashboards', 0)} dashboards ({s.get('panels', 0)} panels, "
            f"{s.get('promql_checked', 0)} PromQL queries parsed), {s.get('rules', 0)} rules "
            f"(promtool check config/rules passed, {s.get('rule_tests', 0)} alert tests passed)")
    if args.metrics:
        line += f"; all {s.get('referenced', 0)} neurovisor_* names referenced are exported by {args.metrics}"
        if s.get("unused"):
            print("note: exported but on no dashboard or rule: " + ", ".join(s["unused"]))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
