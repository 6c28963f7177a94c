//! The chained plugin under a real container runtime: Debian's containerd
//! (CRI plugin, runc, its own root/state/socket) driven through the CRI API
//! as kubelet drives it, with one of our conflists as its CNI network.
//! containerd's own libcni runs the chain with the real CNI_ARGS
//! (K8S_POD_NAMESPACE/NAME/UID/INFRA_CONTAINER_ID); the workloads (an HTTP
//! server, HAProxy sidecars as UID 1337 on Istio's ports, curl) run inside
//! the sandboxes' network namespaces and pod cgroups. Two networks:
//!
//! * `conflist/bridge.conflist` as shipped (1.0.0: bridge → portmap →
//!   meshbypass);
//! * `conflist/kindnet.conflist` in its own 0.3.1, as kind's nodes run it
//!   under containerd (ptp → portmap → meshbypass; libcni sends DEL without
//!   `prevResult`), as a private network (`SimNode::private`).
//!
//! Root only; needs containerd, runc, busybox-static and the reference CNI
//! plugins (scripts/deps.sh). bridge.conflist names fixed resources (bridge
//! mbx0, /run/meshbypass-local, /sys/fs/bpf/meshbypass-local), shared with
//! tests/tests/cni_e2e.rs: that test refuses to start while any exists, and
//! removes them whatever happens. The tests here take turns: each
//! containerd's shims keep their sockets under the shared /run/containerd.

use std::{
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use meshbypass_tests::{cri::Containerd, node::*, *};

/// The simulated node's guard for the conflist's fixed resources, after
/// checking nobody else holds them (the guard would remove them).
fn local_node() -> SimNode {
    require_root();
    for (what, path) in [
        ("bridge", "/sys/class/net/mbx0"),
        ("run dir", "/run/meshbypass-local"),
        ("bpf root", "/sys/fs/bpf/meshbypass-local"),
    ] {
        assert!(
            !Path::new(path).exists(),
            "{path} ({what} of conflist/bridge.conflist) exists: another test is using it, or a run left it"
        );
    }
    SimNode::new("bridge.conflist", |_| {})
}

/// One containerd at a time.
static TURN: Mutex<()> = Mutex::new(());

#[test]
fn containerd_runs_the_chain_through_cri() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let node = local_node();
    run_pods_through_cri(&node, &repo().join("conflist/bridge.conflist"));
}

/// kindnet's own list in its own version (0.3.1), as a kind node's
/// containerd runs it.
#[test]
fn containerd_runs_a_0_3_1_chain_through_cri() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let node = SimNode::private("kindnet.conflist", "0.3.1", 8);
    // In the node's run dir, which its guard removes.
    let dir = node.state_dir.parent().expect("the node's run dir");
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let conflist = dir.join("10-kindnet.conflist");
    std::fs::write(&conflist, node.rt.conflist.to_string()).unwrap();
    run_pods_through_cri(&node, &conflist);
}

/// Two pods through CRI with `conflist` as containerd's network (the one
/// `node` describes): ADD's results, HTTP through both sidecars with the
/// bypass, and StopPodSandbox/RemovePodSandbox leaving nothing.
fn run_pods_through_cri(node: &SimNode, conflist: &Path) {
    let t0 = Instant::now();
    let version = node.rt.version().to_owned();
    let ctd = Containerd::start(conflist);
    eprintln!("containerd ready in {:?}", t0.elapsed());

    let mut server = ctd.run_pod("srv", &[]);
    let mut client = ctd.run_pod("cli", &[]);

    // ADD ran through containerd: rules in the sandbox netns, the bypass
    // attached to the pod cgroup (found by K8S_POD_UID), the pod registered,
    // a state record per sandbox.
    for pod in [&server, &client] {
        pod.assert_redirected();
        let link = node.bpf_root.join("links").join(&pod.id);
        assert!(link.exists(), "no link pin {}", link.display());
        let record = node.state_dir.join(format!("{}.json", pod.id));
        assert!(record.exists(), "no state record {}", record.display());
    }
    let pods = node.node().pods();
    assert_eq!(pods.len(), 2, "{pods:?}");
    for pod in [&server, &client] {
        let ip: std::net::IpAddr = pod.ip().parse().unwrap();
        let reg = pods
            .iter()
            .find(|p| p.netns_cookie == pod.ns.cookie())
            .unwrap_or_else(|| panic!("{} (sandbox netns) not registered: {pods:?}", pod.att.name));
        assert_eq!(reg.ips, vec![ip], "{reg:?}");
        assert_eq!(
            (reg.outbound_port, reg.inbound_port, reg.proxy_uid),
            (15001, 15006, Some(1337))
        );
    }
    let log = std::fs::read_to_string(&node.log_file).unwrap_or_default();
    for pod in [&server, &client] {
        assert!(
            log.contains(&pod.att.uid),
            "the plugin never saw K8S_POD_UID {}:\n{log}",
            pod.att.uid
        );
        let adds: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("[ADD {}]", pod.id)) && l.ends_with("request"))
            .collect();
        assert_eq!(adds.len(), 1, "one ADD of {}:\n{log}", pod.id);
        assert!(
            adds[0].ends_with(&format!("CNI {version} request")),
            "containerd sent the list's version: {}",
            adds[0]
        );
    }

    http_through_sidecars(node, &server, &client);

    // StopPodSandbox (CNI DEL, netns removed) and RemovePodSandbox leave
    // nothing: no link, no registration, no state record, no netns.
    let dels = |id: &str| {
        let log = std::fs::read_to_string(&node.log_file).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("DEL") && l.contains(id) && l.ends_with("request"))
            .count()
    };
    for pod in [&mut server, &mut client] {
        let netns = pod.netns_path();
        pod.stop();
        assert_eq!(dels(&pod.id), 1, "StopPodSandbox ran CNI DEL once");
        assert!(
            !node.bpf_root.join("links").join(&pod.id).exists(),
            "link pin left after StopPodSandbox"
        );
        assert!(
            !node.state_dir.join(format!("{}.json", pod.id)).exists(),
            "state record left after StopPodSandbox"
        );
        pod.remove();
        // containerd 1.6 runs DEL again on remove (the netns is gone by then).
        assert_eq!(dels(&pod.id), 2, "RemovePodSandbox ran CNI DEL again");
        assert!(!netns.exists(), "{} left after RemovePodSandbox", netns.display());
        assert!(
            ctd.cri()
                .list_pod_sandbox()
                .unwrap()
                .iter()
                .all(|s| s.id != pod.id),
            "the sandbox is still listed"
        );
    }
    let n = node.node();
    assert!(n.pods().is_empty(), "{:?}", n.pods());
    assert!(n.links().is_empty(), "{:?}", n.links());
    wait_for("the pairing maps to drain", Duration::from_secs(10), || {
        n.pairs().is_empty() && n.endpoints().is_empty()
    });
    let leased = node.leases();
    assert!(leased.is_empty(), "host-local leases left: {leased:?}");
    drop((client, server)); // the last pod made removes the shared parent cgroups
    drop(ctd);
    eprintln!("containerd CRI test ({version}): {:?}", t0.elapsed());
}
