//! The chained plugin on a simulated node: network namespaces as pods,
//! kubelet-layout cgroups under the cgroup2 mount, Debian's reference
//! plugins (bridge + host-local + portmap) as the primary network, and
//! `conflist/bridge.conflist` executed as-is per the CNI spec. HAProxy
//! sidecars (UID 1337, Istio's ports), a real HTTP server and curl.
//! Root only. The conflist names fixed resources (bridge mbx0, its bpf root
//! and state dir), so the tests here take turns.

use std::{sync::Mutex, time::Duration};

use meshbypass_tests::{cni::Attachment, node::*, *};

static NODE: Mutex<()> = Mutex::new(());

fn local() -> SimNode {
    SimNode::new("bridge.conflist", |_| {})
}

#[test]
fn meshed_pods_through_the_conflist() {
    let _turn = NODE.lock().unwrap_or_else(|e| e.into_inner());
    let node = local();
    let mut server = SimPod::new("srv", false);
    let mut client = SimPod::new("cli", true);
    for pod in [&mut server, &mut client] {
        pod.add(&node);
        let r = pod.result.as_ref().unwrap();
        assert_eq!(r["cniVersion"], "1.0.0", "{r}");
        assert!(
            r["ips"][0]["address"].is_string(),
            "the bridge's result passes through: {r}"
        );
    }
    for pod in [&server, &client] {
        pod.assert_redirected();
        assert!(node.bpf_root.join("links").join(&pod.att.container_id).exists());
        node.rt
            .check(&pod.att, pod.result.as_ref().unwrap())
            .unwrap_or_else(|e| panic!("CHECK: {e:?}"));
    }
    assert_eq!(node.node().pods().len(), 2);

    http_through_sidecars(&node, &server, &client);

    // CHECK notices a missing link.
    let link = node.bpf_root.join("links").join(&server.att.container_id);
    std::fs::remove_file(&link).unwrap();
    let e = node
        .rt
        .check(&server.att, server.result.as_ref().unwrap())
        .unwrap_err();
    assert!(e.raw.contains("link"), "{e:?}");

    // DEL: rules, link, entries and record go; twice is fine.
    node.rt
        .del(&server.att, server.result.as_ref())
        .unwrap_or_else(|e| panic!("DEL: {e:?}"));
    assert!(!server.rules().contains("MESHBYPASS"), "{}", server.rules());
    assert!(
        !node
            .state_dir
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
    let n = node.node();
    assert!(n.pods().is_empty(), "{:?}", n.pods());
    assert!(n.links().is_empty(), "{:?}", n.links());
    wait_for("the pairing maps to drain", Duration::from_secs(10), || {
        n.pairs().is_empty() && n.endpoints().is_empty()
    });
}

#[test]
fn gc_removes_a_leaked_pod_and_keeps_valid_ones() {
    let _turn = NODE.lock().unwrap_or_else(|e| e.into_inner());
    let node = local();
    let mut keep = SimPod::new("keep", false);
    let mut leak = SimPod::new("leak", true);
    keep.add(&node);
    leak.add(&node);
    node.rt
        .gc("meshbypass", &[&keep.att])
        .unwrap_or_else(|e| panic!("GC: {e:?}"));
    let n = node.node();
    assert_eq!(n.links(), vec![keep.att.container_id.clone()]);
    assert_eq!(n.pods().len(), 1);
    assert!(
        !leak.rules().contains("MESHBYPASS"),
        "GC removes the rules of a live leaked netns"
    );
    assert!(keep.rules().contains("MESHBYPASS"));
    for pod in [&keep, &leak] {
        node.rt
            .del(&pod.att, pod.result.as_ref())
            .unwrap_or_else(|e| panic!("DEL: {e:?}"));
    }
}

#[test]
fn a_pod_without_its_cgroup_still_gets_its_redirect() {
    let _turn = NODE.lock().unwrap_or_else(|e| e.into_inner());
    let node = local();
    let mut pod = SimPod::new("nocg", false);
    pod.att.uid = "0123abcd-0000-0000-0000-00000000beef".into(); // no such cgroup
    pod.add(&node);
    assert!(pod.rules().contains("MESHBYPASS_OUTPUT"));
    assert!(!node.bpf_root.join("links").join(&pod.att.container_id).exists());
    let log = std::fs::read_to_string(&node.log_file).unwrap();
    assert!(log.contains("acceleration skipped"), "{log}");
    node.rt
        .check(&pod.att, pod.result.as_ref().unwrap())
        .unwrap_or_else(|e| panic!("CHECK: {e:?}"));
    node.rt.del(&pod.att, pod.result.as_ref()).unwrap();
}
