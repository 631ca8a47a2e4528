#!/usr/bin/env python3
"""Checks of the deployment artefacts that no stock tool makes.

Called by scripts/validate-deploy.sh (which runs the stock tools: yamllint,
kubernetes-validate, promtool, haproxy, nginx, hadolint, docker compose).
Each subcommand prints what is wrong and exits 1, or exits 0 silently:

  sync-rules [--check]   deploy/k8s/base/prometheusrule.yaml from
                         deploy/prometheus/alerts.yml (the one source of truth);
                         --check fails when the file differs from what it would write
  crds RENDERED OUTDIR   strict schema check of the custom resources in a
                         `kubectl kustomize` output (ServiceMonitor,
                         PrometheusRule: prometheus-operator's models), refuses
                         any other kind that kubernetes-validate cannot check, and
                         writes each PrometheusRule's groups to OUTDIR for
                         `promtool check rules`
  same-build A B         two renderings of one overlay (kustomize v2 and v5)
                         hold the same objects
  metric-names           every fanout_* metric in the dashboard and the alert
                         rules is declared in crates/fanout-edge/src/metrics.rs
  dashboard OUT          structure of the Grafana dashboard; writes its queries
                         to OUT as recording rules for `promtool check rules`
  compose RENDERED_JSON  docker-compose.yml (`docker compose config --format
                         json`) agrees with prometheus.yml and the HAProxy
                         variables
  live-prometheus URL N  against a Prometheus that scrapes N healthy edges as
                         job fanout-edge and loads alerts.yml: every dashboard
                         query runs without error, the key ones return data,
                         every rule is healthy and no alert is pending or firing
  jwt SECRET USER [CHANNEL...]
                         prints an HS256 token (exp in 24 h) for USER with
                         CHANNEL patterns in its `channels` claim
  ws HOST:PORT TOKEN     opens a WebSocket (raw, stdlib only) and prints the
                         node of the `connected` frame and any Set-Cookie;
                         --cookie sends FANOUTNODE, --hold N keeps N sockets
                         open for --seconds S (to keep a draining edge busy),
                         each subscribed to --subscribe CHANNEL if given

The checks need PyYAML; `crds` also needs jsonschema and cloudcoil's prometheus-operator
models (validate-deploy.sh installs them into its virtualenv).
"""

import argparse
import base64
import difflib
import hashlib
import hmac
import json
import os
import re
import socket
import struct
import sys
import time
from pathlib import Path

try:  # Not needed by `jwt` and `ws` (scripts/local-cluster.sh runs them with any python3).
    import yaml
except ImportError:
    yaml = None

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
PROMETHEUS_YML = ROOT / "deploy/prometheus/prometheus.yml"
RULE = ROOT / "deploy/k8s/base/prometheusrule.yaml"
DASHBOARD = ROOT / "deploy/grafana/fanout-dashboard.json"
METRICS_RS = ROOT / "crates/fanout-edge/src/metrics.rs"

RULE_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml: edit that file, then run
#   python3 scripts/deploy-checks.py sync-rules
# scripts/validate-deploy.sh fails when the two differ.
# prometheus-operator loads these rules; kube-prometheus-stack selects
# PrometheusRules by its `release` label unless
# ruleSelectorNilUsesHelmValues=false (add the label in an overlay).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: fanout-edge
  labels:
    app.kubernetes.io/name: fanout-edge
    app.kubernetes.io/component: edge
    app.kubernetes.io/part-of: fanout
spec:
"""


class Failures:
    """Collects problems; exits 1 at the end when there were any."""

    def __init__(self, what):
        self.what = what
        self.items = []

    def add(self, message):
        self.items.append(message)

    def finish(self):
        for item in self.items:
            print(f"{self.what}: {item}", file=sys.stderr)
        sys.exit(1 if self.items else 0)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ---- sync-rules ------------------------------------------------------------

def render_rule():
    lines = ALERTS.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "\n".join(("  " + line) if line.strip() else "" for line in lines[start:])
    return RULE_HEADER + body + "\n"


def cmd_sync_rules(args):
    want = render_rule()
    # The rendering must mean exactly what alerts.yml means.
    if yaml.safe_load(want)["spec"] != yaml.safe_load(ALERTS.read_text(encoding="utf-8")):
        sys.exit("sync-rules: internal error: rendered PrometheusRule differs from alerts.yml")
    have = RULE.read_text(encoding="utf-8") if RULE.exists() else ""
    if args.check:
        if have != want:
            diff = difflib.unified_diff(
                have.splitlines(), want.splitlines(),
                str(RULE.relative_to(ROOT)), "rendered from alerts.yml", lineterm="")
            print("\n".join(diff), file=sys.stderr)
            sys.exit(f"sync-rules: {RULE.relative_to(ROOT)} is not alerts.yml: "
                     "run `python3 scripts/deploy-checks.py sync-rules`")
        return
    if have != want:
        RULE.write_text(want, encoding="utf-8")
        print(f"wrote {RULE.relative_to(ROOT)}")


# ---- crds ------------------------------------------------------------------

def strict_schema(model):
    """The model's JSON schema with unknown fields refused, like
    kubernetes-validate --strict does for built-in kinds."""
    schema = model.model_json_schema(by_alias=True, mode="validation")

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def cmd_crds(args):
    import jsonschema
    from cloudcoil.models.prometheus_operator import v1 as monitoring

    models = {
        ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
        ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule,
    }
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    failures = Failures(f"crds {args.rendered}")
    alerts = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    seen = {kind: 0 for (_, kind) in models}
    for doc in load_all(args.rendered):
        api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        name = doc.get("metadata", {}).get("name", "?")
        group = api.split("/")[0] if "/" in api else ""
        if group == "" or "." not in group or group.endswith(".k8s.io"):
            continue  # a built-in kind: kubernetes-validate's job
        model = models.get((api, kind))
        if model is None:
            failures.add(f"{kind} {name} ({api}): no schema to validate it against")
            continue
        seen[kind] += 1
        validator = jsonschema.Draft202012Validator(strict_schema(model))
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
            # Optional fields are anyOf [schema, null]: report the deepest cause.
            while error.context:
                error = max(error.context, key=lambda e: len(e.absolute_path))
            path = ".".join(str(p) for p in error.absolute_path) or "(top)"
            message = error.message if len(error.message) < 300 else error.message[:300] + "…"
            failures.add(f"{kind} {name}: {path}: {message}")
        if kind == "PrometheusRule":
            spec = doc.get("spec", {})
            if spec != alerts:
                failures.add(f"PrometheusRule {name}: spec differs from deploy/prometheus/alerts.yml")
            target = out / f"{name}.rules.yml"
            target.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
            print(target)
    for kind, count in seen.items():
        if count == 0:
            failures.add(f"no {kind} in the rendering")
    failures.finish()


# ---- same-build ------------------------------------------------------------

GENERATED_SUFFIX = re.compile(r"^(.+)-[a-z0-9]{10}$")


def normalized(docs):
    """Drops what legitimately differs between kustomize versions: the hash
    suffix of generated ConfigMaps and Secrets (the algorithm changed; every
    reference is renamed with it) and empty labels/annotations maps."""
    renames = {}
    for doc in docs:
        name = doc.get("metadata", {}).get("name", "")
        match = GENERATED_SUFFIX.match(name)
        if doc.get("kind") in ("ConfigMap", "Secret") and match:
            renames[name] = match.group(1) + "-<hash>"

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()
                    if not (k in ("labels", "annotations") and v == {})}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str):
            return renames.get(node, node)
        return node

    return [walk(d) for d in docs]


def cmd_same_build(args):
    def objects(path):
        return sorted(json.dumps(d, sort_keys=True) for d in normalized(load_all(path)))

    a, b = objects(args.a), objects(args.b)
    if a != b:
        keys = lambda docs: {(json.loads(d)["kind"], json.loads(d)["metadata"]["name"]) for d in docs}
        only_a, only_b = keys(a) - keys(b), keys(b) - keys(a)
        diff = difflib.unified_diff(
            "\n".join(a).replace(",", ",\n").splitlines(),
            "\n".join(b).replace(",", ",\n").splitlines(), args.a, args.b, lineterm="", n=2)
        print("\n".join(list(diff)[:80]), file=sys.stderr)
        sys.exit(f"same-build: {args.a} and {args.b} differ "
                 f"(only in the first: {sorted(only_a)}, only in the second: {sorted(only_b)})")


# ---- metric-names ----------------------------------------------------------

METRIC = re.compile(r"\bfanout_[a-z0-9_]+")


def declared_metrics():
    text = METRICS_RS.read_text(encoding="utf-8")
    names = set(re.findall(r'pub const [A-Z0-9_]+: &str = "(fanout_[a-z0-9_]+)";', text))
    if len(names) < 10:
        sys.exit(f"metric-names: found only {len(names)} metric names in {METRICS_RS}")
    return names


def dashboard_queries(dashboard):
    """(where, expr) of every query: panels, nested rows, template variables."""
    found = []

    def panels(items):
        for panel in items:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((f'panel "{panel.get("title")}" {target.get("refId")}', target["expr"]))
            panels(panel.get("panels", []))

    panels(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append((f'variable "{var["name"]}"', query))
    return found


def alert_exprs():
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [(f'alert {r.get("alert") or r.get("record")}', r["expr"])
            for g in rules["groups"] for r in g["rules"]]


def cmd_metric_names(args):
    declared = declared_metrics()
    failures = Failures("metric-names")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    sources = [("deploy/grafana/fanout-dashboard.json", dashboard_queries(dashboard)),
               ("deploy/prometheus/alerts.yml", alert_exprs())]
    used = set()
    for source, queries in sources:
        if not queries:
            failures.add(f"{source}: no queries found")
        for where, expr in queries:
            for name in METRIC.findall(expr):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                used.add(base if base in declared else name)
                if name not in declared and base not in declared:
                    failures.add(f"{source}: {where}: {name} is not declared in "
                                 f"{METRICS_RS.relative_to(ROOT)}")
    # The brief of the dashboard: these must be on it.
    for name in ["fanout_connections", "fanout_subscriptions", "fanout_deliveries_total",
                 "fanout_publishes_total", "fanout_pubsub_lag_seconds",
                 "fanout_slow_consumer_closes_total", "fanout_recoveries_total",
                 "fanout_gap_repairs_total", "fanout_broker_up",
                 "fanout_broker_reconnects_total", "fanout_outbound_queue_bytes",
                 "fanout_draining"]:
        if not any(name in METRIC.findall(e) or name + "_bucket" in METRIC.findall(e)
                   for _, e in sources[0][1]):
            failures.add(f"dashboard: no panel shows {name}")
    failures.finish()


# ---- dashboard -------------------------------------------------------------

GRAFANA_VARS = {
    "$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
    "${datasource}": "prometheus", "$job": ".*", "$namespace": ".*", "$instance": ".*",
}


def cmd_dashboard(args):
    failures = Failures("dashboard")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for key in ["uid", "title", "panels", "templating", "schemaVersion"]:
        if key not in dashboard:
            failures.add(f"no {key}")
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        failures.add("no `datasource` variable of type datasource (needed by provisioning and the sidecar)")
    ids = []

    def walk(items):
        for panel in items:
            ids.append(panel.get("id"))
            if "gridPos" not in panel:
                failures.add(f'panel "{panel.get("title")}" has no gridPos')
            if panel.get("type") != "row":
                ds = panel.get("datasource", {})
                if ds.get("uid") != "${datasource}":
                    failures.add(f'panel "{panel.get("title")}" does not use ${{datasource}}')
                if not panel.get("targets"):
                    failures.add(f'panel "{panel.get("title")}" has no query')
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    if len(ids) != len(set(ids)) or None in ids:
        failures.add(f"panel ids are not unique: {ids}")
    titles = [p.get("title") for p in dashboard.get("panels", [])]
    if len(titles) != len(set(titles)):
        failures.add(f"panel titles are not unique: {sorted(t for t in set(titles) if titles.count(t) > 1)}")
    rules = []
    for i, (where, expr) in enumerate(dashboard_queries(dashboard)):
        if expr.startswith("label_values("):
            inner = re.match(r"label_values\((.*),\s*[a-z_]+\)$", expr)
            if not inner:
                failures.add(f"{where}: cannot read {expr}")
                continue
            expr = inner.group(1)
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        if "$" in expr:
            failures.add(f"{where}: unknown variable in {expr}")
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    Path(args.out).write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False),
        encoding="utf-8")
    failures.finish()


# ---- compose ---------------------------------------------------------------

def cmd_compose(args):
    failures = Failures("compose")
    project = json.loads(Path(args.rendered).read_text(encoding="utf-8"))
    services = project.get("services", {})
    edges = sorted(s for s in services if re.fullmatch(r"edge-\d+", s))
    if len(edges) != 3:
        failures.add(f"expected three edges edge-1..3, found {edges}")
    for edge in edges:
        env = services[edge].get("environment", {})
        if env.get("FANOUT_NODE_ID") != edge:
            failures.add(f"{edge}: FANOUT_NODE_ID is {env.get('FANOUT_NODE_ID')!r}")
        if not env.get("FANOUT_REDIS_URL"):
            failures.add(f"{edge}: no FANOUT_REDIS_URL")
    # Prometheus scrapes exactly the edges.
    prom = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    jobs = {j["job_name"]: j for j in prom.get("scrape_configs", [])}
    targets = sorted(t for sc in jobs.get("fanout-edge", {}).get("static_configs", [])
                     for t in sc.get("targets", []))
    if targets != sorted(f"{e}:8080" for e in edges):
        failures.add(f"prometheus.yml job fanout-edge scrapes {targets}, the edges are {edges}")
    if "alerts.yml" not in prom.get("rule_files", []):
        failures.add("prometheus.yml does not load alerts.yml")
    # HAProxy routes to exactly the edges, with the variables of haproxy.cfg.
    haproxy = services.get("haproxy", {})
    env = haproxy.get("environment", {})
    for i, edge in enumerate(edges, 1):
        if env.get(f"FANOUT_EDGE{i}") != f"{edge}:8080":
            failures.add(f"haproxy: FANOUT_EDGE{i} is {env.get(f'FANOUT_EDGE{i}')!r}, want {edge}:8080")
    for var in ["FANOUT_LB_BIND", "FANOUT_LB_STATS_BIND"]:
        if not env.get(var):
            failures.add(f"haproxy: {var} is not set")
    cfg_mounted = any(str(v.get("source", "")).endswith("deploy/haproxy")
                      for v in haproxy.get("volumes", []))
    if not cfg_mounted:
        failures.add("haproxy: deploy/haproxy is not mounted")
    # Grafana gets the provisioning and the dashboard; Prometheus the rules.
    grafana_sources = [str(v.get("source", "")) for v in services.get("grafana", {}).get("volumes", [])]
    for want in ["deploy/grafana/provisioning", "deploy/grafana/fanout-dashboard.json"]:
        if not any(s.endswith(want) for s in grafana_sources):
            failures.add(f"grafana: {want} is not mounted")
    prom_sources = [str(v.get("source", "")) for v in services.get("prometheus", {}).get("volumes", [])]
    if not any(s.endswith("deploy/prometheus") for s in prom_sources):
        failures.add("prometheus: deploy/prometheus (config and rules) is not mounted")
    worker = json.dumps(services.get("worker", {}))
    if "fanout-publish" not in worker:
        failures.add("worker: does not run fanout-publish")
    failures.finish()


# ---- live-prometheus -------------------------------------------------------

def prometheus_get(base, path, **params):
    import urllib.parse
    import urllib.request
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def cmd_live_prometheus(args):
    failures = Failures("live-prometheus")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    values = dict(GRAFANA_VARS, **{"$__rate_interval": "30s"})
    results = {}
    for where, expr in dashboard_queries(dashboard):
        if expr.startswith("label_values("):
            expr = re.match(r"label_values\((.*),\s*[a-z_]+\)$", expr).group(1)
        for var, value in values.items():
            expr = expr.replace(var, value)
        try:
            answer = prometheus_get(args.url, "/api/v1/query", query=expr)
        except Exception as e:  # an HTTP 400 carries PromQL errors
            failures.add(f"{where}: {expr}: {e}")
            continue
        if answer.get("status") != "success":
            failures.add(f"{where}: {answer.get('error')}")
        results[where] = answer.get("data", {}).get("result", [])
        print(f"{where}: {len(results[where])} series")
    # What a healthy cluster of N edges must show.
    # The caller keeps a subscriber and publishes: the traffic panels have data.
    expected = {'panel "Ready edges" A': float(args.edges),
                'panel "Connections" A': None, 'panel "Subscriptions" A': None,
                'panel "Deliveries / s" A': None, 'panel "Publishes / s" A': None,
                'panel "Lag p99" A': None, 'panel "Server API requests / s" A': None,
                'panel "Broker up" A': None, 'panel "Draining" A': None,
                'panel "Outbound queue bytes" A': None, 'variable "instance"': None}
    for where, value in expected.items():
        series = results.get(where, [])
        if not series:
            failures.add(f"{where}: no data")
        elif value is not None and float(series[0]["value"][1]) != value:
            failures.add(f"{where}: {series[0]['value'][1]}, expected {value:g}")
    groups = prometheus_get(args.url, "/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    want = {r["alert"] for g in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
            for r in g["rules"]}
    if {r["name"] for r in rules} != want:
        failures.add(f"loaded rules {sorted(r['name'] for r in rules)}, alerts.yml has {sorted(want)}")
    for rule in rules:
        if rule.get("health") != "ok":
            failures.add(f"rule {rule['name']}: {rule.get('health')} {rule.get('lastError', '')}")
        if rule.get("state", "inactive") != "inactive":
            failures.add(f"alert {rule['name']} is {rule['state']} on a healthy cluster")
    failures.finish()


# ---- jwt, ws ---------------------------------------------------------------

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(secret, user, channels, ttl=86400):
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"sub": user, "exp": int(time.time()) + ttl}
    if channels:
        claims["channels"] = channels
    payload = b64url(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def cmd_jwt(args):
    print(make_jwt(args.secret, args.user, args.channels))


def ws_open(address, token, cookie=None, timeout=5.0):
    """Upgrades a socket to WebSocket; returns (socket, status line,
    Set-Cookie values, first text frame)."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET /ws HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n")
    if cookie:
        request += f"Cookie: FANOUTNODE={cookie}\r\n"
    sock.sendall((request + "\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    cookies = [line.split(":", 1)[1].strip() for line in lines[1:]
               if line.lower().startswith("set-cookie:")]
    if " 101 " not in lines[0] + " ":
        return sock, lines[0], cookies, None

    def read(n):
        nonlocal rest
        while len(rest) < n:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the first frame")
            rest += chunk
        out, rest = rest[:n], rest[n:]
        return out

    _, length = read(2)
    length &= 0x7F
    if length == 126:
        length = struct.unpack(">H", read(2))[0]
    elif length == 127:
        length = struct.unpack(">Q", read(8))[0]
    return sock, lines[0], cookies, read(length).decode()


def ws_send_text(sock, text):
    """One masked text frame (clients must mask)."""
    data = text.encode()
    mask = os.urandom(4)
    if len(data) < 126:
        header = bytes([0x81, 0x80 | len(data)])
    else:
        header = bytes([0x81, 0x80 | 126]) + struct.pack(">H", len(data))
    sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def cmd_ws(args):
    if args.hold:
        socks = []
        for _ in range(args.hold):
            sock, status, _, frame = ws_open(args.address, args.token, args.cookie)
            if frame is None:
                sys.exit(f"ws: {status}")
            if args.subscribe:
                ws_send_text(sock, json.dumps({"type": "subscribe", "id": 1, "channel": args.subscribe}))
            socks.append(sock)
        print(f"holding {len(socks)} sockets", flush=True)
        time.sleep(args.seconds)
        return
    sock, status, cookies, frame = ws_open(args.address, args.token, args.cookie)
    sock.close()
    if frame is None:
        sys.exit(f"ws: {status}")
    node = json.loads(frame).get("node")
    cookie = next((c.split(";")[0].split("=", 1)[1] for c in cookies
                   if c.startswith("FANOUTNODE=")), "")
    print(f"{node} {cookie}".strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sync-rules")
    p.add_argument("--check", action="store_true")
    p.set_defaults(func=cmd_sync_rules)
    p = sub.add_parser("crds")
    p.add_argument("rendered")
    p.add_argument("outdir")
    p.set_defaults(func=cmd_crds)
    p = sub.add_parser("same-build")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=cmd_same_build)
    p = sub.add_parser("metric-names")
    p.set_defaults(func=cmd_metric_names)
    p = sub.add_parser("dashboard")
    p.add_argument("out")
    p.set_defaults(func=cmd_dashboard)
    p = sub.add_parser("compose")
    p.add_argument("rendered")
    p.set_defaults(func=cmd_compose)
    p = sub.add_parser("live-prometheus")
    p.add_argument("url")
    p.add_argument("edges", type=int)
    p.set_defaults(func=cmd_live_prometheus)
    p = sub.add_parser("jwt")
    p.add_argument("secret")
    p.add_argument("user")
    p.add_argument("channels", nargs="*")
    p.set_defaults(func=cmd_jwt)
    p = sub.add_parser("ws")
    p.add_argument("address")
    p.add_argument("token")
    p.add_argument("--cookie")
    p.add_argument("--hold", type=int, default=0)
    p.add_argument("--subscribe", metavar="CHANNEL")
    p.add_argument("--seconds", type=float, default=30.0)
    p.set_defaults(func=cmd_ws)
    args = parser.parse_args()
    if yaml is None and args.command not in ("jwt", "ws"):
        sys.exit(f"{args.command} needs PyYAML (pip install pyyaml)")
    args.func(args)


if __name__ == "__main__":
    main()
