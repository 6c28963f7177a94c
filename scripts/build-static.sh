#!/usr/bin/env bash
# Builds the CNI plugin `meshbypass` and the node agent `meshbypass-node` as
# static executables (x86_64-unknown-linux-musl): no ELF interpreter, no
# shared libraries. The plugin is copied onto the host and run there by the
# container runtime, so it must run on any host: an older glibc (Ubuntu
# 20.04, RHEL 8, Amazon Linux 2) or none at all (Talos, Bottlerocket).
#
#   scripts/build-static.sh [OUT_DIR]
#
# The binaries land in target/x86_64-unknown-linux-musl/release/ (under
# $CARGO_TARGET_DIR if set) and, with OUT_DIR, are copied there too.
# Needs the musl target and musl-tools (scripts/deps.sh installs both); the
# kernel programs are compiled by clang -target bpf either way.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-musl
cargo build --release --locked --target "$target" -p meshbypass-node -p meshbypass-cni
built=${CARGO_TARGET_DIR:-target}/$target/release
for bin in meshbypass meshbypass-node; do
  if [[ $# -gt 0 ]]; then
    install -D -m 0755 "$built/$bin" "$1/$bin"
    echo "$1/$bin"
  else
    echo "$built/$bin"
  fi
done
