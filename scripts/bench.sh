#!/usr/bin/env bash
# The benchmarks, as root: the side-by-side mesh benchmark (bench/README.md)
# and the plugin's ADD/DEL latency. Several minutes; not part of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) != 0 ]]; then
  echo "run as root" >&2
  exit 1
fi
scripts/deps.sh
cargo build --release --locked -q -p meshbypass-bench -p meshbypass-node -p meshbypass-cni
target/release/mesh-bench "$@"
target/release/cni-latency --runs 200 --json bench/results/cni-latency.json
