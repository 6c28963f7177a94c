#!/usr/bin/env bash
# meshbypass end to end on a real kind cluster (needs Docker, kind, kubectl,
# curl and python3; network access to pull images and the CNI manifests).
#
#   kind-tests/run.sh [flannel|calico]
#
# Creates a two-node kind cluster without kind's CNI, installs Flannel (or
# Calico), mounts bpffs in the nodes, builds the node image, loads it,
# installs meshbypass (kubectl apply -k install/deploy), runs a server and
# clients with Envoy sidecars (Istio's ports and UID, the plugin's redirect)
# and checks: requests succeed, the bypass counters rise, deleting a pod
# removes its state, a DaemonSet restart keeps an established transfer
# going, uninstalling restores the conflists. The cluster is deleted at the
# end (KEEP_CLUSTER=1 keeps it). See kind-tests/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

variant=${1:-flannel}
case $variant in
  flannel | calico) ;;
  *)
    echo "usage: $0 [flannel|calico]" >&2
    exit 2
    ;;
esac

cluster=${CLUSTER_NAME:-meshbypass-$variant}
flannel_version=${FLANNEL_VERSION:-v0.28.8}
calico_version=${CALICO_VERSION:-v3.31.3}
cni_plugins_version=${CNI_PLUGINS_VERSION:-v1.8.0}
node_image=${KIND_NODE_IMAGE:-}
keep=${KEEP_CLUSTER:-0}
timeout=${TIMEOUT:-300s}
# install/deploy/kustomization.yaml names this image.
image=meshbypass/node:dev
manifests=kind-tests/manifests
url=http://server.mesh-test.svc.cluster.local:8080

log() { printf '\n==> %s\n' "$*" >&2; }
fail() {
  printf '\nFAIL: %s\n' "$*" >&2
  exit 1
}
need() { command -v "$1" >/dev/null 2>&1 || fail "$1 is required"; }
for tool in docker kind kubectl curl python3; do need "$tool"; done

if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  fail "a kind cluster named $cluster exists: delete it (kind delete cluster --name $cluster) or set CLUSTER_NAME"
fi

work=$(mktemp -d)
kctl() { kubectl --context "kind-$cluster" "$@"; }

diagnostics() {
  log "diagnostics"
  kctl get nodes -o wide || true
  kctl get pods -A -o wide || true
  kctl -n mesh-test describe pods || true
  kctl -n meshbypass-system logs -l app.kubernetes.io/name=meshbypass-node --tail=80 --prefix || true
  for node in $(kind get nodes --name "$cluster" 2>/dev/null); do
    echo "--- $node: /etc/cni/net.d"
    docker exec "$node" sh -c 'for f in /etc/cni/net.d/*; do echo "# $f"; cat "$f"; echo; done' || true
  done
}

finish() {
  local status=$?
  if ((status != 0)); then
    diagnostics
  fi
  if [[ $keep == 1 ]]; then
    log "keeping cluster $cluster (kubectl --context kind-$cluster; kind delete cluster --name $cluster)"
  else
    kind delete cluster --name "$cluster" || true
  fi
  rm -rf "$work"
  if ((status == 0)); then
    log "PASS ($variant)"
  fi
}
trap finish EXIT

# Polls a command until it succeeds, or fails with `what` after `secs`.
poll() {
  local secs=$1 what=$2
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out after ${secs}s waiting for $what"
    sleep 2
  done
}

# One field of a JSON object on stdin, by a dotted path.
field() {
  python3 -c '
import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v[k]
print(v)' "$1"
}

log "cluster $cluster ($variant)"
create=(kind create cluster --name "$cluster" --config "kind-tests/kind/$variant.yaml")
if [[ -n $node_image ]]; then
  create+=(--image "$node_image")
fi
"${create[@]}"
nodes=()
while IFS= read -r node; do nodes+=("$node"); done < <(kind get nodes --name "$cluster")
worker=$(kctl get nodes -l '!node-role.kubernetes.io/control-plane' -o jsonpath='{.items[0].metadata.name}')
control=$(kctl get nodes -l node-role.kubernetes.io/control-plane -o jsonpath='{.items[0].metadata.name}')

log "bpffs and the reference CNI plugins in the nodes"
arch=$(docker exec "${nodes[0]}" uname -m)
case $arch in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
esac
mkdir -p "$work/cni"
curl -fsSL -o "$work/cni.tgz" \
  "https://github.com/containernetworking/plugins/releases/download/$cni_plugins_version/cni-plugins-linux-$arch-$cni_plugins_version.tgz"
tar -xzf "$work/cni.tgz" -C "$work/cni"
for node in "${nodes[@]}"; do
  # The agent's bpf root lives on the node's bpffs (the DaemonSet mounts
  # /sys/fs/bpf with Bidirectional propagation, so it must be shared).
  docker exec "$node" sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; mount --make-shared /sys/fs/bpf'
  # kind's nodes carry only host-local, loopback, portmap and ptp; Flannel
  # delegates to bridge and Calico's conflist names bandwidth.
  for plugin in bridge bandwidth portmap host-local loopback; do
    if ! docker exec "$node" test -e "/opt/cni/bin/$plugin"; then
      docker cp "$work/cni/$plugin" "$node:/opt/cni/bin/$plugin"
    fi
  done
done

log "primary CNI: $variant"
case $variant in
  flannel)
    kctl apply -f "https://github.com/flannel-io/flannel/releases/download/$flannel_version/kube-flannel.yml"
    ;;
  calico)
    # `create`: the CRDs' last-applied annotation would exceed apply's limit.
    kctl create -f "https://raw.githubusercontent.com/projectcalico/calico/$calico_version/manifests/calico.yaml"
    ;;
esac
kctl wait --for=condition=Ready nodes --all --timeout="$timeout"
kctl -n kube-system rollout status deploy/coredns --timeout="$timeout"
kctl label node "$worker" meshbypass-test=here --overwrite
kctl label node "$control" meshbypass-test=remote --overwrite

# /etc/cni/net.d of every node, file by file, into $work/<label>/<node>/.
snapshot() {
  local label=$1 node f
  for node in "${nodes[@]}"; do
    mkdir -p "$work/$label/$node"
    docker exec "$node" ls -1 /etc/cni/net.d >"$work/$label/$node.ls"
    while read -r f; do
      docker exec "$node" cat "/etc/cni/net.d/$f" >"$work/$label/$node/$f"
    done <"$work/$label/$node.ls"
  done
}
snapshot before

log "meshbypass: build, load, install"
docker build -f install/Dockerfile -t "$image" .
kind load docker-image "$image" --name "$cluster"
kctl apply -k install/deploy
kctl -n meshbypass-system rollout status ds/meshbypass-node --timeout="$timeout"
for node in "${nodes[@]}"; do
  poll 60 "meshbypass chained into the conflist on $node" \
    docker exec "$node" sh -c 'grep -l "\"meshbypass\"" /etc/cni/net.d/*.conflist'
  docker exec "$node" test -x /opt/cni/bin/meshbypass || fail "no /opt/cni/bin/meshbypass on $node"
done

# The agent pod running on `node`.
agent_on() {
  kctl -n meshbypass-system get pods -l app.kubernetes.io/name=meshbypass-node \
    --field-selector "spec.nodeName=$1,status.phase=Running" -o jsonpath='{.items[0].metadata.name}'
}
agent_exec() { kctl -n meshbypass-system exec "$(agent_on "$worker")" -- "$@"; }
status() { agent_exec meshbypass-node status --json; }

# How many of `n` requests from `pod` answered 200.
requests() {
  local pod=$1 n=$2 path=${3:-/index.html} args=() i
  for ((i = 0; i < n; i++)); do
    args+=(-o /dev/null "$url$path")
  done
  kctl -n mesh-test exec "$pod" -c app -- curl -sS --max-time 10 -w '%{http_code}\n' "${args[@]}" |
    grep -c '^200$' || true
}
first_request() { [[ $(requests "$1" 1) == 1 ]]; }

log "workloads with Envoy sidecars"
kctl apply -f "$manifests/namespace.yaml"
kctl apply -f "$manifests/envoy-sidecar.yaml" -f "$manifests/server.yaml" -f "$manifests/clients.yaml"
kctl -n mesh-test wait --for=condition=Ready pod/server pod/client pod/remote --timeout="$timeout"
poll 60 "a first request through both sidecars" first_request client

log "requests succeed and the bypass counters rise"
pods=$(status | field pods)
links=$(status | field links)
if ((pods < 2 || links < 2)); then
  fail "the agent on $worker shows $pods registered pods and $links links (want >= 2): the plugin redirected \
the pods but did not attach the bypass; does it find the pods' cgroups? (kind's kubelet uses cgroupRoot /kubelet: \
kubelet.slice/kubelet-kubepods.slice/...)"
fi
before=$(status | field counters.redirected_msgs)
for round in 1 2 3; do
  ok=$(requests client 20)
  [[ $ok == 20 ]] || fail "round $round: $ok of 20 requests succeeded"
done
after=$(status | field counters.redirected_msgs)
echo "redirected_msgs: $before -> $after"
((after > before)) || fail "the bypass counters did not rise ($before -> $after): $(status)"
ok=$(requests remote 5)
[[ $ok == 5 ]] || fail "from the other node: $ok of 5 requests succeeded"

log "deleting a pod removes its state"
kctl apply -f "$manifests/doomed.yaml"
kctl -n mesh-test wait --for=condition=Ready pod/doomed --timeout="$timeout"
record_of_doomed() { agent_exec sh -c 'grep -lE "\"podName\": ?\"doomed\"" /run/meshbypass/*.json'; }
poll 30 "the state record of pod doomed" record_of_doomed
record=$(record_of_doomed)
id=$(basename "$record" .json)
agent_exec test -e "/sys/fs/bpf/meshbypass/links/$id" || fail "no link pin for doomed ($id)"
pods_with=$(status | field pods)
kctl -n mesh-test delete pod doomed --wait=true --timeout="$timeout"
doomed_gone() {
  ! agent_exec test -e "$record" &&
    ! agent_exec test -e "/sys/fs/bpf/meshbypass/links/$id" &&
    (($(status | field pods) == pods_with - 1))
}
poll 60 "the record, link and registration of doomed to go" doomed_gone

log "a DaemonSet restart keeps established traffic"
# 16 MiB at 256 KiB/s: about a minute on one connection through both sidecars.
kctl -n mesh-test exec client -c app -- curl -sS --max-time 300 --limit-rate 256k -o /dev/null \
  -w '%{http_code} %{size_download}\n' "$url/big" >"$work/long.out" 2>&1 &
long=$!
in_flight() { kctl -n mesh-test exec server -c app -- netstat -tn | grep -q ':15006 .*ESTABLISHED'; }
poll 30 "the long transfer to be established" in_flight
kctl -n meshbypass-system rollout restart ds/meshbypass-node
kctl -n meshbypass-system rollout status ds/meshbypass-node --timeout="$timeout"
if ! kill -0 "$long" 2>/dev/null; then
  echo "warning: the transfer ended before the restart completed; it did not span the whole restart" >&2
fi
wait "$long" || fail "the transfer across the restart failed: $(cat "$work/long.out")"
[[ $(cat "$work/long.out") == "200 16777216" ]] ||
  fail "the transfer across the restart was cut: $(cat "$work/long.out")"
before=$(status | field counters.redirected_msgs)
ok=$(requests client 20)
[[ $ok == 20 ]] || fail "after the restart: $ok of 20 requests succeeded"
after=$(status | field counters.redirected_msgs)
((after > before)) || fail "after the restart the counters did not rise ($before -> $after)"
# The restarted agent's load reused (or upgraded to) its own build's programs.
[[ $(status | field programs.thisBuild) == True ]] ||
  fail "after the restart the pinned programs are not the agent's build: $(status)"

log "uninstall restores the conflists"
kctl delete -k install/deploy --wait=true --timeout="$timeout"
snapshot after
python3 - "$work" "${nodes[@]}" <<'PY'
import json, os, sys
work, nodes = sys.argv[1], sys.argv[2:]
bad = []
for node in nodes:
    b, a = (os.path.join(work, s, node) for s in ("before", "after"))
    if sorted(os.listdir(b)) != sorted(os.listdir(a)):
        bad.append(f"{node}: /etc/cni/net.d had {sorted(os.listdir(b))}, now {sorted(os.listdir(a))}")
        continue
    for f in os.listdir(b):
        with open(os.path.join(b, f)) as x, open(os.path.join(a, f)) as y:
            before, after = x.read(), y.read()
        if f.endswith((".conflist", ".conf", ".json")):
            before, after = json.loads(before), json.loads(after)
        if before != after:
            bad.append(f"{node}: {f} differs from before the install")
if bad:
    sys.exit("\n".join(bad))
PY
for node in "${nodes[@]}"; do
  if docker exec "$node" test -e /opt/cni/bin/meshbypass; then
    fail "/opt/cni/bin/meshbypass left on $node"
  fi
done
ok=$(requests client 5)
[[ $ok == 5 ]] || fail "after uninstall, the running meshed pods' traffic broke: $ok of 5"
