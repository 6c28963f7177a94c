#!/usr/bin/env bash
# The local demo, as root: a simulated node with two meshed pods (HAProxy
# sidecars on Istio's ports, nginx, wrk), the same load without a mesh, with
# the sidecar mesh, and with the bypass; a table of the results; cleanup.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) != 0 ]]; then
  echo "run as root: the demo makes network namespaces, cgroups and bpf pins" >&2
  exit 1
fi
scripts/deps.sh
# Everything the demo runs: itself (meshbypass-bench), the plugin
# (meshbypass-cni), the node agent (meshbypass-node) and the traffic helper
# mb-peer (meshbypass-tests, without the CRI client the demo does not use).
# scripts/test.sh runs this script from binaries it removed first, so a
# missing package here fails CI.
echo "building (release)..."
cargo build --release --locked -q --no-default-features \
  -p meshbypass-bench -p meshbypass-cni -p meshbypass-node -p meshbypass-tests
exec target/release/demo "$@"
