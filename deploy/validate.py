"""Validates rendered manifests (multi-document YAML files given as arguments).

Built-in kinds: the Kubernetes JSON schemas bundled by the `kubernetes-validate` package (strict:
unknown fields fail). ServiceFence: the openAPIV3Schema of crds/servicefence.yaml. ServiceMonitor:
the fields lazyload relies on. PrometheusRule: its groups and rules. Plus cross-object checks: every Service selects a Deployment's pods
and its named targetPorts exist there; probes use declared ports; lazyload's config loads
(`lazyload check-config`, when a built binary is given in LAZYLOAD_BIN) and its `serve` flags exist.
"""

import os
import re
import subprocess
import sys
import tempfile

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = os.environ.get("K8S_VERSION", "1.33.0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def crd_schema(path):
    with open(path) as f:
        crd = yaml.safe_load(f)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served")]
    return crd["spec"]["group"] + "/" + version["name"], crd["spec"]["names"]["kind"], version["schema"]["openAPIV3Schema"]


def check_servicemonitor(doc):
    assert doc["apiVersion"] == "monitoring.coreos.com/v1", "apiVersion"
    spec = doc["spec"]
    assert spec["selector"]["matchLabels"], "spec.selector.matchLabels"
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scheme", "scrapeTimeout"}, f"endpoint fields {sorted(ep)}"
        assert isinstance(ep["port"], str), "endpoints[].port must be a port name"


def check_prometheusrule(doc):
    assert doc["apiVersion"] == "monitoring.coreos.com/v1", "apiVersion"
    assert set(doc["spec"]) == {"groups"}, f"spec fields {sorted(doc['spec'])}"
    for group in doc["spec"]["groups"]:
        assert isinstance(group["name"], str) and group["rules"], "groups[].name and rules"
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), "a rule is an alert or a record"
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}, f"rule fields {sorted(rule)}"
            assert isinstance(rule["expr"], str) and rule["expr"].strip(), "rules[].expr"
            assert rule["expr"].count("(") == rule["expr"].count(")"), f"unbalanced parentheses in {rule['expr']}"
            assert all(isinstance(v, str) for v in rule.get("labels", {}).values()), "label values are strings"


def main(files):
    fence_api, fence_kind, fence_schema = crd_schema(os.path.join(ROOT, "crds", "servicefence.yaml"))
    failures = 0
    for path in files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        seen = 0
        for doc in docs:
            name = f"{path}: {doc.get('kind')} {doc.get('metadata', {}).get('namespace', '')}/{doc.get('metadata', {}).get('name')}"
            try:
                if doc.get("kind") == fence_kind:
                    assert doc["apiVersion"] == fence_api, "apiVersion"
                    jsonschema.validate(doc, fence_schema)
                elif doc.get("kind") == "ServiceMonitor":
                    check_servicemonitor(doc)
                elif doc.get("kind") == "PrometheusRule":
                    check_prometheusrule(doc)
                else:
                    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
                seen += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures += 1
                print(f"INVALID {name}: {str(e).splitlines()[0]}", file=sys.stderr)
        failures += cross_checks(path, docs)
        print(f"ok: {path}: {seen}/{len(docs)} objects valid")
    return failures


def cross_checks(path, docs):
    failures = 0

    def fail(msg):
        nonlocal failures
        failures += 1
        print(f"INVALID {path}: {msg}", file=sys.stderr)

    deployments = [d for d in docs if d["kind"] == "Deployment"]
    by_ns = lambda d: d["metadata"].get("namespace")  # noqa: E731
    for svc in (d for d in docs if d["kind"] == "Service"):
        sel = svc["spec"].get("selector", {})
        pods = [d for d in deployments if by_ns(d) == by_ns(svc)
                and sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        if not pods:
            fail(f"Service {svc['metadata']['name']} selects no Deployment's pods")
            continue
        names = {p.get("name") for d in pods for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            if isinstance(port.get("targetPort"), str) and port["targetPort"] not in names:
                fail(f"Service {svc['metadata']['name']}: targetPort {port['targetPort']} not declared")
    sms = [d for d in docs if d["kind"] == "ServiceMonitor"]
    for sm in sms:
        want = sm["spec"]["selector"]["matchLabels"].items()
        ports = {p.get("name") for s in docs if s["kind"] == "Service" and want <= s["metadata"].get("labels", {}).items()
                 for p in s["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            if ep["port"] not in ports:
                fail(f"ServiceMonitor {sm['metadata']['name']}: no selected Service has port {ep['port']}")
    for d in deployments:
        for c in d["spec"]["template"]["spec"]["containers"]:
            names = {p.get("name") for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in names:
                    fail(f"{d['metadata']['name']}: {probe} port {port} not declared")
    # The global-sidecar must tell istiod it has no iptables, or istiod sends it listeners that
    # bind nothing (DESIGN A10); and it must be marked so the relay adjusts its config.
    needed = {"ISTIO_META_INTERCEPTION_MODE": "NONE", "ISTIO_META_SLIME_APP": "LAZYLOAD_GLOBAL_SIDECAR"}
    for d in (d for d in deployments if d["metadata"]["name"] == "global-sidecar"):
        env = {e["name"]: e.get("value") for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
        for key, value in needed.items():
            if env.get(key) != value:
                fail(f"global-sidecar in {by_ns(d)}: env {key} must be {value!r}, not {env.get(key)!r}")
    binary = os.environ.get("LAZYLOAD_BIN")
    if binary:
        for cm in (d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})):
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
                f.write(cm["data"]["config.yaml"])
                f.flush()
                r = subprocess.run([binary, "check-config", "--config", f.name], capture_output=True, text=True)
            if r.returncode != 0 or "warning" in r.stderr:
                fail(f"ConfigMap {cm['metadata']['name']}: lazyload check-config: {r.stderr.strip()}")
        help_text = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True).stdout
        for d in (d for d in deployments if d["metadata"]["name"] == "lazyload"):
            args = d["spec"]["template"]["spec"]["containers"][0]["args"]
            for a in args[1:]:
                flag = a.split("=")[0]
                if flag.startswith("--") and not re.search(re.escape(flag) + r"(?![\w-])", help_text):
                    fail(f"lazyload serve has no flag {flag}")
    return failures


if __name__ == "__main__":
    bad = main(sys.argv[1:])
    if bad:
        print(f"{bad} problem(s) found", file=sys.stderr)
        sys.exit(1)
