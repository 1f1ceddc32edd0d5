"""A stand-in Kubernetes API server for `kubectl apply --dry-run=client` (deploy/check.sh).

kubectl's client-side dry run still asks a server two things: which resources exist (discovery:
kind -> resource, namespaced or not) and whether each object already exists (a GET). No real API
server can run where CI runs, so this answers both like an empty cluster of the target kind: a
Kubernetes 1.33 API server with Istio's and the Prometheus Operator's CRDs installed and nothing
else (lazyload's own CRD is *not* known, as before a first install). Every GET of an object is a
404, so kubectl reports each object as "created (dry run)"; a kind this server does not know fails
the way it fails against a real cluster ("no matches for kind").

Usage: python3 dry_run_server.py PORT_FILE   (listens on 127.0.0.1:0, writes the port to
PORT_FILE, serves until killed).
"""

import http.server
import json
import sys

# (group, version, kind, resource, namespaced): the built-in resources of Kubernetes 1.33 that an
# install may contain, and the CRDs a mesh with Istio and the Prometheus Operator has.
RESOURCES = [
    ("", "v1", "Namespace", "namespaces", False),
    ("", "v1", "Service", "services", True),
    ("", "v1", "ServiceAccount", "serviceaccounts", True),
    ("", "v1", "ConfigMap", "configmaps", True),
    ("", "v1", "Secret", "secrets", True),
    ("", "v1", "Pod", "pods", True),
    ("", "v1", "Endpoints", "endpoints", True),
    ("apps", "v1", "Deployment", "deployments", True),
    ("apps", "v1", "DaemonSet", "daemonsets", True),
    ("apps", "v1", "StatefulSet", "statefulsets", True),
    ("rbac.authorization.k8s.io", "v1", "Role", "roles", True),
    ("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", True),
    ("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", False),
    ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", False),
    ("coordination.k8s.io", "v1", "Lease", "leases", True),
    ("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", True),
    ("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", True),
    ("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", True),
    ("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", False),
    ("monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitors", True),
    ("monitoring.coreos.com", "v1", "PodMonitor", "podmonitors", True),
    ("monitoring.coreos.com", "v1", "PrometheusRule", "prometheusrules", True),
] + [
    ("networking.istio.io", version, kind, resource, True)
    for version in ("v1", "v1beta1", "v1alpha3")
    for kind, resource in (
        ("Sidecar", "sidecars"),
        ("EnvoyFilter", "envoyfilters"),
        ("VirtualService", "virtualservices"),
        ("ServiceEntry", "serviceentries"),
        ("DestinationRule", "destinationrules"),
    )
    if kind != "EnvoyFilter" or version == "v1alpha3"
]


def group_versions():
    """{group: [version, ...]} in the order listed (the first is the preferred version)."""
    out = {}
    for group, version, *_ in RESOURCES:
        versions = out.setdefault(group, [])
        if version not in versions:
            versions.append(version)
    return out


def resource_list(group, version):
    gv = f"{group}/{version}" if group else version
    resources = [
        {"name": r, "singularName": k.lower(), "namespaced": ns, "kind": k,
         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
        for g, v, k, r, ns in RESOURCES if (g, v) == (group, version)
    ]
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources} if resources else None


def answer(path):
    """(status, body) for a GET of `path` (no query)."""
    parts = [p for p in path.split("/") if p]
    groups = group_versions()
    if parts == ["api"]:
        return 200, {"kind": "APIVersions", "versions": groups[""], "serverAddressByClientCIDRs": []}
    if parts == ["apis"]:
        return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
             "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
            for g, vs in groups.items() if g]}
    if parts == ["version"]:
        return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0"}
    if len(parts) == 2 and parts[0] == "api":
        listed = resource_list("", parts[1])
    elif len(parts) == 3 and parts[0] == "apis":
        listed = resource_list(parts[1], parts[2])
    else:
        listed = None
    if listed:
        return 200, listed
    # Any object: this cluster is empty.
    return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                 "message": f"{path} not found", "code": 404}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        status, body = answer(self.path.split("?", 1)[0])
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def main(port_file):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file, "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1])
