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
echo "building (release)..."
cargo build --release --locked -q -p meshbypass-bench -p meshbypass-node -p meshbypass-cni
exec target/release/demo "$@"
