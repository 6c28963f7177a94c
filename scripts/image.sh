#!/usr/bin/env bash
# Builds the node image from the static binaries with podman: a `FROM
# scratch` image holding /usr/local/bin/meshbypass-node and the plugin
# /usr/local/bin/meshbypass it installs. Nothing is pulled from a registry.
#
#   scripts/image.sh [--tag NAME:TAG] [--no-build]
#
# --tag      the image name (default localhost/meshbypass/node:dev)
# --no-build use the static binaries already built (scripts/build-static.sh)
#
# Then push it (`podman push NAME:TAG docker://REGISTRY/...`) or load it into
# kind (`podman save NAME:TAG -o node.tar && kind load image-archive node.tar`)
# and set the DaemonSet's image to it (install/deploy/kustomization.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=localhost/meshbypass/node:dev
build=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "usage: scripts/image.sh [--tag NAME:TAG] [--no-build]" >&2; exit 2 ;;
  esac
done
if ! command -v podman >/dev/null; then
  echo "podman is missing: scripts/deps.sh installs it" >&2
  exit 1
fi

if ((build)); then
  scripts/build-static.sh >/dev/null
fi
built=${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-musl/release
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
for bin in meshbypass meshbypass-node; do
  if [[ ! -x $built/$bin ]]; then
    echo "$built/$bin is missing: run scripts/build-static.sh" >&2
    exit 1
  fi
  cp "$built/$bin" "$context/$bin"
done
podman build --quiet --file install/Containerfile --tag "$tag" "$context" >/dev/null
echo "$tag"
