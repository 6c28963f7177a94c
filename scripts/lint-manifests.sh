#!/usr/bin/env bash
# Lints the Kubernetes manifests: yamllint on every file of install/deploy,
# install/components and install/k3s (the sources); install/meshbypass.yaml must be what
# kustomize renders from install/deploy (scripts/render-manifests.sh);
# kubernetes-validate (schemas bundled in the PyPI package, no cluster, no
# network) on every object of that rendering and of the k3s one; and what
# the agent relies on: a Linux nodeSelector, the CNI directories mounted at
# the paths the agent is told, RBAC that only gets.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy=install/deploy
# The Kubernetes version whose schemas the manifests must satisfy.
k8s_version=${K8S_VERSION:-1.30.0}

need() {
  local tool=$1 package=$2
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "installing $package" >&2
    python3 -m pip install --quiet "$package"
    hash -r
  fi
}
need yamllint yamllint
need kubernetes-validate kubernetes-validate

# (install/meshbypass.yaml is kustomize's output, checked against it below.)
yamllint -s -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable}}' \
  "$deploy" install/components install/k3s

scripts/render-manifests.sh --check
echo "install/meshbypass.yaml is current"

rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
scripts/render-manifests.sh --print install/k3s >"$rendered/k3s.yaml"
kubernetes-validate --strict --kubernetes-version "$k8s_version" install/meshbypass.yaml "$rendered/k3s.yaml"

python3 - "$deploy" install/meshbypass.yaml "$rendered/k3s.yaml" <<'PY'
import json, os, sys, yaml
deploy, base, k3s = sys.argv[1:]
errors = []

# Every resource kustomization.yaml names exists, and every manifest is named.
with open(os.path.join(deploy, "kustomization.yaml")) as f:
    k = yaml.safe_load(f)
listed = set(k.get("resources", []))
present = {n for n in os.listdir(deploy) if n.endswith(".yaml") and n != "kustomization.yaml"}
missing, unlisted = listed - present, present - listed
if missing or unlisted:
    errors.append(f"kustomization.yaml: missing files {sorted(missing)}, unlisted manifests {sorted(unlisted)}")

def settings(doc):
    return json.loads(doc["data"]["plugin.json"])

def check(path, conf_dir, bin_dir):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (ds,) = by_kind["DaemonSet"]
    (cm,) = by_kind["ConfigMap"]
    spec = ds["spec"]["template"]["spec"]
    where = f"{path} ({ds['metadata']['name']})"
    if spec.get("nodeSelector", {}).get("kubernetes.io/os") != "linux":
        errors.append(f"{where}: no kubernetes.io/os: linux nodeSelector")
    (c,) = [c for c in spec["containers"] if c["name"] == "node"]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    host = {v["name"]: v.get("hostPath", {}).get("path") for v in spec["volumes"]}
    for vol, var, want in [("cni-bin", "MESHBYPASS_CNI_BIN_DIR", bin_dir), ("cni-conf", "MESHBYPASS_CNI_CONF_DIR", conf_dir)]:
        # The agent writes host paths into the conflist: the directory must
        # be mounted where it is on the host, and the agent told that path.
        got = (host.get(vol), mounts.get(vol), env.get(var))
        if got != (want, want, want):
            errors.append(f"{where}: {vol} hostPath, mountPath and {var} are {got}, want {want} for all three")
    s = settings(cm)
    if s.get("type") != "meshbypass":
        errors.append(f"{path}: plugin.json must have \"type\": \"meshbypass\"")
    kubeconfig = s.get("kubernetes", {}).get("kubeconfig")
    if kubeconfig != env.get("MESHBYPASS_KUBECONFIG_OUT") or os.path.dirname(kubeconfig or "") != conf_dir:
        errors.append(f"{where}: plugin.json's kubeconfig {kubeconfig} is not MESHBYPASS_KUBECONFIG_OUT "
                      f"{env.get('MESHBYPASS_KUBECONFIG_OUT')} in {conf_dir}")
    args = c.get("args", [])
    if "--daemonset" not in args or args[args.index("--daemonset") + 1] != ds["metadata"]["name"]:
        errors.append(f"{where}: --daemonset does not name this DaemonSet")
    # RBAC: get, nothing else; the DaemonSet only by name.
    for role in by_kind.get("ClusterRole", []) + by_kind.get("Role", []):
        for rule in role["rules"]:
            if rule["verbs"] != ["get"]:
                errors.append(f"{path}: {role['kind']} {role['metadata']['name']} grants {rule['verbs']} on {rule['resources']}")
            if "daemonsets" in rule["resources"] and rule.get("resourceNames") != [ds["metadata"]["name"]]:
                errors.append(f"{path}: daemonsets are readable beyond {ds['metadata']['name']}")
    return s

base_settings = check(base, "/etc/cni/net.d", "/opt/cni/bin")
k3s_settings = check(k3s, "/var/lib/rancher/k3s/agent/etc/cni/net.d", "/var/lib/rancher/k3s/data/current/bin")
# The k3s ConfigMap is the base's with its kubeconfig path: nothing else.
k3s_settings["kubernetes"]["kubeconfig"] = base_settings["kubernetes"]["kubeconfig"]
if k3s_settings != base_settings:
    errors.append("install/components/k3s/configmap.yaml differs from install/deploy/configmap.yaml "
                  "beyond the kubeconfig path")
if errors:
    sys.exit("\n".join(errors))
PY
echo "manifests OK"
