#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600) one after another (one
# job: the CI machines have two cores), then minimizes each corpus.
#   fuzz/run.sh [SECONDS] [TARGET...]
# Needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(config env iptables)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t: ${secs}s"
  cargo +nightly fuzz run -O "$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1
  cargo +nightly fuzz cmin -O "$t" "corpus/$t"
done
