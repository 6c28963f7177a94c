#!/usr/bin/env bash
# The whole test suite, as root: installs its dependencies, builds, checks
# formatting and lints, then runs every test (unit and privileged).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) != 0 ]]; then
  echo "run as root: the privileged tests make netns, cgroups and bpf pins" >&2
  exit 1
fi
scripts/deps.sh

cargo build --workspace --locked
# The static (musl) plugin and agent: install/tests/image.rs checks them and
# builds the node image from them.
scripts/build-static.sh >/dev/null
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The README's first command as a fresh clone runs it: the demo's own build
# (release) from none of the binaries it runs, then a short demo.
rm -f target/release/{demo,meshbypass,meshbypass-node,mb-peer}
scripts/demo.sh --smoke
scripts/lint-manifests.sh
scripts/lint-kind-tests.sh
