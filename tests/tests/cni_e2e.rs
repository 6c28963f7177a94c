//! The chained plugin on a simulated node: network namespaces as pods,
//! kubelet-layout cgroups under the cgroup2 mount, Debian's reference
//! plugins (bridge + host-local + portmap) as the primary network, and
//! `conflist/bridge.conflist` executed as-is per the CNI spec. HAProxy
//! sidecars (UID 1337, Istio's ports), a real HTTP server and curl.
//! Root only. The conflist names fixed resources (bridge mbx0, its bpf root
//! and state dir), so the tests here take turns.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use meshbypass_ebpf::Counter;
use meshbypass_tests::{cni::*, *};
use serde_json::Value;

static NODE: Mutex<()> = Mutex::new(());

const BPF_ROOT: &str = "/sys/fs/bpf/meshbypass-local";
const STATE_DIR: &str = "/run/meshbypass-local/state";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The simulated node: removes the bridge, IPAM and plugin state, and the
/// pins the conflist names, whatever happens.
struct LocalNode {
    rt: Runtime,
}

impl LocalNode {
    fn new() -> Self {
        require_root();
        assert!(
            !Path::new(BPF_ROOT).exists(),
            "{BPF_ROOT} exists: another run is using the local conflist (or left it; `meshbypass-node unload --bpf-root {BPF_ROOT}`)"
        );
        let plugin_dir = sibling_bin("meshbypass").parent().unwrap().to_path_buf();
        let rt = Runtime::new(
            &repo().join("conflist/bridge.conflist"),
            &[plugin_dir, PathBuf::from("/usr/lib/cni")],
        );
        Self { rt }
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        if let Err(e) = meshbypass_ebpf::unload(Path::new(BPF_ROOT)) {
            eprintln!("cleanup {BPF_ROOT}: {e}");
        }
        if Path::new("/sys/class/net/mbx0").exists()
            && let Err(e) = std::process::Command::new("ip")
                .args(["link", "del", "mbx0"])
                .status()
        {
            eprintln!("cleanup mbx0: {e}");
        }
        if let Err(e) = std::fs::remove_dir_all("/run/meshbypass-local")
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cleanup /run/meshbypass-local: {e}");
        }
    }
}

/// A pod: netns, kubelet cgroup, attachment.
struct Pod {
    att: Attachment,
    cgroup: KubeCgroup,
    ns: Netns,
    result: Option<Value>,
}

fn hex(n: u64) -> String {
    format!("{n:016x}")
}

impl Pod {
    /// `layout` picks the cgroup driver and QoS class.
    fn new(name: &str, systemd: bool) -> Self {
        let ns = Netns::new(name);
        let seed =
            (std::process::id() as u64 * 1_000_003) ^ meshbypass_ebpf::netns::cookie_of(&ns.path()).unwrap();
        let uid = format!(
            "{}-{}-{}-{}-{}",
            &hex(seed)[..8],
            &hex(seed)[8..12],
            &hex(seed)[12..16],
            &hex(seed.rotate_left(17))[..4],
            &hex(seed.rotate_left(29))[..12]
        );
        let rel = if systemd {
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            )
        } else {
            format!("kubepods/besteffort/pod{uid}")
        };
        let cgroup = KubeCgroup::new(&rel);
        let att = Attachment {
            container_id: format!("{}{}{}{}", hex(seed), hex(seed ^ 1), hex(seed ^ 2), hex(seed ^ 3)),
            netns: Some(ns.path()),
            ifname: "eth0".into(),
            namespace: "default".into(),
            name: name.into(),
            uid,
        };
        Self {
            att,
            cgroup,
            ns,
            result: None,
        }
    }

    fn ip(&self) -> String {
        let r = self.result.as_ref().expect("ADD first");
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    }

    fn rules(&self) -> String {
        self.ns.exec(&["iptables-save", "-t", "nat"])
    }
}

fn haproxy(pod: &Pod, bind: u16, upstream: &str) -> Peer {
    let dir = std::env::temp_dir().join(unique("hap"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  uid 1337\n  gid 1337\n  maxconn 512\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 30s\n  timeout server 30s\n\nfrontend in\n  bind 0.0.0.0:{bind}\n  default_backend up\n\n\
             backend up\n  server s1 {upstream}\n"
        ),
    )
    .unwrap();
    let p = Peer::spawn(
        &pod.cgroup.place(&pod.ns, None),
        "exec",
        &["--", "haproxy", "-db", "-f", cfg.to_str().unwrap()],
    );
    wait_for("haproxy to listen", Duration::from_secs(10), || {
        pod.ns.exec(&["ss", "-Hltn"]).contains(&format!(":{bind} "))
    });
    p
}

fn counters() -> meshbypass_ebpf::counters::Counters {
    meshbypass_ebpf::Node::open(Path::new(BPF_ROOT))
        .unwrap()
        .counters()
        .unwrap()
}

#[test]
fn meshed_pods_through_the_conflist() {
    let _turn = NODE.lock().unwrap_or_else(|e| e.into_inner());
    let node = LocalNode::new();
    let mut server = Pod::new("srv", false);
    let mut client = Pod::new("cli", true);
    for pod in [&mut server, &mut client] {
        let r = node.rt.add(&pod.att).unwrap_or_else(|e| panic!("ADD: {e:?}"));
        assert_eq!(r["cniVersion"], "1.0.0", "{r}");
        assert!(
            r["ips"][0]["address"].is_string(),
            "the bridge's result passes through: {r}"
        );
        pod.result = Some(r);
    }
    for pod in [&server, &client] {
        let rules = pod.rules();
        assert!(rules.contains("-A OUTPUT -p tcp -j MESHBYPASS_OUTPUT"), "{rules}");
        assert!(
            rules.contains("--to-ports 15006") && rules.contains("--to-ports 15001"),
            "{rules}"
        );
        assert!(
            Path::new(BPF_ROOT)
                .join("links")
                .join(&pod.att.container_id)
                .exists()
        );
        node.rt
            .check(&pod.att, pod.result.as_ref().unwrap())
            .unwrap_or_else(|e| panic!("CHECK: {e:?}"));
    }
    let n = meshbypass_ebpf::Node::open(Path::new(BPF_ROOT)).unwrap();
    assert_eq!(n.pods().len(), 2);
    drop(n);

    // The app and its sidecar in the server pod, the sidecar in the client pod.
    let app = Peer::spawn(
        &server.cgroup.place(&server.ns, None),
        "exec",
        &[
            "--",
            "/usr/bin/python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "0.0.0.0",
        ],
    );
    wait_for("the app to listen", Duration::from_secs(10), || {
        server.ns.exec(&["ss", "-Hltn"]).contains(":8080 ")
    });
    let _sidecar_s = haproxy(&server, 15006, "127.0.0.1:8080");
    let _sidecar_c = haproxy(&client, 15001, &format!("{}:8080", server.ip()));
    let before = counters();
    let url = format!("http://{}:8080/", server.ip());
    let mut args = vec![
        "--",
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\\n",
    ];
    let urls = vec![url.as_str(); 20];
    args.extend(urls);
    for _ in 0..3 {
        let curl = Peer::spawn(&client.cgroup.place(&client.ns, None), "exec", &args);
        let (ok, _) = curl.finish(Duration::from_secs(60));
        assert!(ok, "curl failed");
    }
    let after = counters();
    eprintln!("through both sidecars: {after:?}");
    assert!(
        after.get(Counter::PairsNat) > before.get(Counter::PairsNat),
        "{after:?}"
    );
    assert!(
        after.get(Counter::RedirectedMsgs) > before.get(Counter::RedirectedMsgs),
        "sidecar-to-sidecar messages were not redirected: {after:?}"
    );
    drop(app);

    // CHECK notices a missing link.
    let link = Path::new(BPF_ROOT).join("links").join(&server.att.container_id);
    std::fs::remove_file(&link).unwrap();
    let e = node
        .rt
        .check(&server.att, server.result.as_ref().unwrap())
        .unwrap_err();
    assert!(e.msg.contains("check") || e.raw.contains("link"), "{e:?}");

    // DEL: rules, link, entries and record go; twice is fine.
    node.rt
        .del(&server.att, server.result.as_ref())
        .unwrap_or_else(|e| panic!("DEL: {e:?}"));
    assert!(!server.rules().contains("MESHBYPASS"), "{}", server.rules());
    assert!(
        !Path::new(STATE_DIR)
            .join(format!("{}.json", server.att.container_id))
            .exists()
    );
    node.rt
        .del(&server.att, server.result.as_ref())
        .unwrap_or_else(|e| panic!("DEL again: {e:?}"));
    // DEL with the netns already gone, and without prevResult.
    let client_att = Attachment {
        netns: None,
        ..client.att.clone()
    };
    let ns_name = client.ns.name.clone();
    sh(&["ip", "netns", "del", &ns_name]);
    node.rt
        .del(&client_att, None)
        .unwrap_or_else(|e| panic!("DEL without netns: {e:?}"));
    sh(&["ip", "netns", "add", &ns_name]); // for the guard to delete
    let n = meshbypass_ebpf::Node::open(Path::new(BPF_ROOT)).unwrap();
    assert!(n.pods().is_empty(), "{:?}", n.pods());
    assert!(n.links().is_empty(), "{:?}", n.links());
    assert!(n.pairs().is_empty() || wait_pairs_empty(&n));
}

fn wait_pairs_empty(n: &meshbypass_ebpf::Node) -> bool {
    wait_for("pairs to drain", Duration::from_secs(10), || n.pairs().is_empty());
    true
}

#[test]
fn gc_removes_a_leaked_pod_and_keeps_valid_ones() {
    let _turn = NODE.lock().unwrap_or_else(|e| e.into_inner());
    let node = LocalNode::new();
    let mut keep = Pod::new("keep", false);
    let mut leak = Pod::new("leak", true);
    for pod in [&mut keep, &mut leak] {
        pod.result = Some(node.rt.add(&pod.att).unwrap_or_else(|e| panic!("ADD: {e:?}")));
    }
    node.rt
        .gc("meshbypass", &[&keep.att])
        .unwrap_or_else(|e| panic!("GC: {e:?}"));
    let n = meshbypass_ebpf::Node::open(Path::new(BPF_ROOT)).unwrap();
    assert_eq!(n.links(), vec![keep.att.container_id.clone()]);
    assert_eq!(n.pods().len(), 1);
    assert!(
        !leak.rules().contains("MESHBYPASS"),
        "GC removes the rules of a live leaked netns"
    );
    assert!(keep.rules().contains("MESHBYPASS"));
    drop(n);
    for pod in [&keep, &leak] {
        node.rt
            .del(&pod.att, pod.result.as_ref())
            .unwrap_or_else(|e| panic!("DEL: {e:?}"));
    }
}

#[test]
fn a_pod_without_its_cgroup_still_gets_its_redirect() {
    let _turn = NODE.lock().unwrap_or_else(|e| e.into_inner());
    let node = LocalNode::new();
    let mut pod = Pod::new("nocg", false);
    pod.att.uid = "0123abcd-0000-0000-0000-00000000beef".into(); // no such cgroup
    let r = node.rt.add(&pod.att).unwrap_or_else(|e| panic!("ADD: {e:?}"));
    pod.result = Some(r);
    assert!(pod.rules().contains("MESHBYPASS_OUTPUT"));
    assert!(
        !Path::new(BPF_ROOT)
            .join("links")
            .join(&pod.att.container_id)
            .exists()
    );
    let log = std::fs::read_to_string("/run/meshbypass-local/meshbypass.log").unwrap();
    assert!(log.contains("acceleration skipped"), "{log}");
    node.rt
        .check(&pod.att, pod.result.as_ref().unwrap())
        .unwrap_or_else(|e| panic!("CHECK: {e:?}"));
    node.rt.del(&pod.att, pod.result.as_ref()).unwrap();
}
