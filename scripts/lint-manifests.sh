#!/usr/bin/env bash
# Lints the Kubernetes manifests in install/deploy: yamllint on every file,
# kubernetes-validate (schemas bundled in the PyPI package, no cluster and
# no network needed) on every Kubernetes object. kustomization.yaml is
# kustomize's own file, not an object: it is linted, not validated; the
# objects it lists are, and its `resources` must all exist.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy=install/deploy
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
need yamllint yamllint
need kubernetes-validate kubernetes-validate

yamllint -s -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable}}' "$deploy"

manifests=()
for f in "$deploy"/*.yaml; do
  [[ $(basename "$f") == kustomization.yaml ]] && continue
  manifests+=("$f")
done
kubernetes-validate --strict --kubernetes-version "$k8s_version" "${manifests[@]}"

# Every resource kustomization.yaml names exists, and every manifest is named.
python3 - "$deploy" <<'PY'
import os, sys, yaml
deploy = sys.argv[1]
with open(os.path.join(deploy, "kustomization.yaml")) as f:
    k = yaml.safe_load(f)
listed = set(k.get("resources", []))
present = {n for n in os.listdir(deploy) if n.endswith(".yaml") and n != "kustomization.yaml"}
missing, unlisted = listed - present, present - listed
if missing or unlisted:
    sys.exit(f"kustomization.yaml: missing files {sorted(missing)}, unlisted manifests {sorted(unlisted)}")
# The plugin settings in the ConfigMap are our conflist entry: JSON, ours.
import json
with open(os.path.join(deploy, "configmap.yaml")) as f:
    settings = json.loads(yaml.safe_load(f)["data"]["plugin.json"])
if settings.get("type") != "meshbypass":
    sys.exit("configmap.yaml: plugin.json must have \"type\": \"meshbypass\"")
PY
echo "manifests OK"
