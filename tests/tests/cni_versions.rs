//! Every CNI version a runtime sends, through real chains on a simulated
//! node: Debian's reference plugins and `meshbypass` executed per the spec
//! (`cni::Runtime`: the list's version to every plugin, DEL without
//! `prevResult` before 0.4.0, no CHECK before 0.4.0) in the two shapes
//! clusters ship,
//!
//! * `conflist/bridge.conflist`: bridge + host-local + portmap + meshbypass;
//! * `conflist/kindnet.conflist`: ptp + host-local + portmap + meshbypass
//!   (kindnet's own list, as kind nodes run it),
//!
//! in every version both we and the reference plugins speak: one test per
//! cell, each a whole ADD, CHECK and DEL with the pod's rules, record, link
//! and registration checked. The 0.3.1 cells (what kindnet, Calico, Flannel
//! and Cilium declare) also carry traffic through HAProxy sidecars and count
//! exactly what the bypass redirected. Each cell is a private network
//! (`SimNode::private`: its own bridge, subnet, run dir and bpf root), so the
//! cells run in parallel with each other and with other tests. Root only.

use std::{path::Path, process::Command, time::Duration};

use meshbypass_ebpf::Counter;
use meshbypass_tests::{cni::*, fixtures::kernel_verdict, node::*, *};
use serde_json::{Value, json};

/// The versions both `meshbypass` and the reference plugins speak (they stop
/// at 1.0.0; 1.1.0 is covered by the plugin's CLI tests and the GC test).
const MATRIX: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

const BRIDGE: &str = "bridge.conflist";
const PTP: &str = "kindnet.conflist";

fn supported_versions(bin: &Path) -> Vec<String> {
    let out = Command::new(bin)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::fs::File::open("/dev/null").unwrap())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{} VERSION printed {:?}: {e}", bin.display(), out.stdout));
    v["supportedVersions"]
        .as_array()
        .unwrap_or_else(|| panic!("{} VERSION: {v}", bin.display()))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// The matrix is what the installed plugins speak: a newer Debian plugin
/// package (1.1.0) fails here until its cells exist.
#[test]
fn the_matrix_is_every_version_both_sides_speak() {
    let ours = supported_versions(&sibling_bin("meshbypass"));
    for plugin in ["bridge", "ptp", "host-local", "portmap"] {
        let theirs = supported_versions(&Path::new("/usr/lib/cni").join(plugin));
        let both: Vec<&str> = ours
            .iter()
            .filter(|v| theirs.contains(v))
            .map(String::as_str)
            .collect();
        assert_eq!(both, MATRIX, "{plugin} speaks {theirs:?}, meshbypass {ours:?}");
    }
}

fn bridge(version: &str, slot: u32) {
    cell(BRIDGE, version, slot, version == "0.3.1");
}

fn ptp(version: &str, slot: u32) {
    cell(PTP, version, slot, version == "0.3.1");
}

#[test]
fn bridge_0_3_0() {
    bridge("0.3.0", 0);
}

#[test]
fn bridge_0_3_1() {
    bridge("0.3.1", 1);
}

#[test]
fn bridge_0_4_0() {
    bridge("0.4.0", 2);
}

#[test]
fn bridge_1_0_0() {
    bridge("1.0.0", 3);
}

#[test]
fn ptp_0_3_0() {
    ptp("0.3.0", 4);
}

#[test]
fn ptp_0_3_1() {
    ptp("0.3.1", 5);
}

#[test]
fn ptp_0_4_0() {
    ptp("0.4.0", 6);
}

#[test]
fn ptp_1_0_0() {
    ptp("1.0.0", 7);
}

/// One cell: ADD, CHECK and DEL of the whole chain in `version`.
fn cell(file: &str, version: &str, slot: u32, traffic: bool) {
    let node = SimNode::private(file, version, slot);
    assert_eq!(node.rt.version(), version);
    let primary = node.rt.conflist["plugins"][0]["type"]
        .as_str()
        .unwrap()
        .to_owned();
    // Both cgroup drivers, alternating between cells.
    let systemd = slot.is_multiple_of(2);
    let mut server = SimPod::new("vs", systemd);
    let mut client = SimPod::new("vc", !systemd);
    let pods: Vec<&mut SimPod> = if traffic {
        vec![&mut server, &mut client]
    } else {
        vec![&mut server]
    };
    for pod in pods {
        let steps = node
            .rt
            .add_steps(&pod.att)
            .unwrap_or_else(|e| panic!("{file} {version}: ADD: {e:?}"));
        let types: Vec<&str> = steps.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(types, [primary.as_str(), "portmap", "meshbypass"]);
        for (t, r) in &steps {
            assert_eq!(r["cniVersion"], version, "{t} answers in the list's version: {r}");
            assert!(ips_shape_ok(r), "{t}'s result has {version}'s shape: {r}");
        }
        assert_eq!(
            steps[2].1, steps[1].1,
            "meshbypass's result is its prevResult, in {version}"
        );
        pod.result = Some(steps[2].1.clone());
        assert_meshed(&node, pod);
    }
    if traffic {
        carries_redirected_traffic(&node, &server, &client);
    }
    for pod in [&server, &client].into_iter().take(if traffic { 2 } else { 1 }) {
        check(&node, pod, version);
        del(&node, pod, version);
    }
    assert!(node.node().pods().is_empty(), "{:?}", node.node().pods());
    assert_eq!(node.leases(), Vec::<String>::new(), "host-local leases left");
}

/// The pod's redirect, record, link and registration, as ADD leaves them.
fn assert_meshed(node: &SimNode, pod: &SimPod) {
    // Exactly the rules of Istio's defaults (the iptables golden, as
    // iptables-save prints it back), nothing else.
    let rules = |text: &str| {
        let mut v: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    };
    assert_eq!(rules(&pod.rules()), rules(golden_rules()), "{}", pod.rules());

    let ip = pod.ip();
    let cookie = pod.ns.cookie();
    let record_path = node.state_dir.join(format!("{}.json", pod.att.container_id));
    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(&record_path).unwrap_or_else(|e| panic!("{}: {e}", record_path.display())),
    )
    .unwrap();
    assert_eq!(
        record,
        json!({
            "containerId": pod.att.container_id,
            "ifname": "eth0",
            "netns": pod.ns.path(),
            "podNamespace": "default",
            "podName": pod.att.name,
            "podUid": pod.att.uid,
            "ips": [ip],
            "families": ["ipv4"],
            "netnsCookie": cookie,
            "cgroup": pod.cgroup.path,
            "mode": "auto",
        })
    );
    assert!(node.bpf_root.join("links").join(&pod.att.container_id).exists());
    let reg = node
        .node()
        .pod_by_netns(cookie)
        .unwrap_or_else(|| panic!("{} is not registered", pod.att.name));
    assert_eq!(reg.ips, vec![ip.parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(
        (
            reg.outbound_port,
            reg.inbound_port,
            reg.proxy_uid,
            reg.mode.as_str()
        ),
        (15001, 15006, Some(1337), "auto")
    );
}

/// `cni-plugin/testdata/istio-default.golden` restored into a scratch netns
/// and saved back: the golden in iptables-save's own spelling.
fn golden_rules() -> &'static str {
    static SAVED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SAVED.get_or_init(|| {
        let golden = repo().join("cni-plugin/testdata/istio-default.golden");
        let scratch = Netns::new("gold");
        scratch.exec(&["iptables-restore", "--noflush", golden.to_str().unwrap()]);
        scratch.exec(&["iptables-save", "-t", "nat"])
    })
}

/// CHECK through the chain from 0.4.0 (and it notices a missing jump);
/// before, the runtime sends none and ours refuses one (code 1).
fn check(node: &SimNode, pod: &SimPod, version: &str) {
    let cached = pod.result.as_ref().unwrap();
    if !node.rt.can_check() {
        let e = node
            .rt
            .exec_one("meshbypass", "CHECK", Some(&pod.att), Some(cached))
            .expect_err("CHECK before 0.4.0");
        assert_eq!(e.code, 1, "{e:?}");
        assert!(
            e.msg.contains(&format!("CHECK is not defined in CNI {version}")),
            "{e:?}"
        );
        return;
    }
    node.rt
        .check(&pod.att, cached)
        .unwrap_or_else(|e| panic!("{version}: CHECK: {e:?}"));
    pod.ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-D",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        "MESHBYPASS_OUTPUT",
    ]);
    let e = node
        .rt
        .check(&pod.att, cached)
        .expect_err("CHECK without the jump");
    assert_eq!((e.plugin.as_str(), e.code), ("meshbypass", 100), "{e:?}");
}

/// DEL as the runtime sends it in `version` (no `prevResult` before 0.4.0):
/// the rules, record, link and registration go, and the interface; twice is fine.
fn del(node: &SimNode, pod: &SimPod, version: &str) {
    let cached = pod.result.as_ref();
    assert_eq!(
        node.rt.del_prev_result(cached).is_some(),
        at_least(version, "0.4.0"),
        "DEL's prevResult in {version}"
    );
    for round in ["DEL", "DEL again"] {
        node.rt
            .del(&pod.att, cached)
            .unwrap_or_else(|e| panic!("{version}: {round}: {e:?}"));
        let rules = pod.rules();
        assert!(!rules.contains("MESHBYPASS"), "{round}: {rules}");
        assert!(
            !node
                .state_dir
                .join(format!("{}.json", pod.att.container_id))
                .exists(),
            "{round}: the record"
        );
        assert!(
            !node.bpf_root.join("links").join(&pod.att.container_id).exists(),
            "{round}: the link"
        );
        assert!(node.node().pod_by_netns(pod.ns.cookie()).is_none(), "{round}");
        let links = pod.ns.ip(&["-o", "link", "show"]);
        assert_eq!(links.lines().count(), 1, "{round}: only lo is left: {links}");
    }
}

/// An echo app behind its HAProxy sidecar in `server`, a client app behind
/// another in `client` (both sidecars UID 1337, plain TCP, on Istio's ports),
/// the node's selftest verdict recorded as `meshbypass-node load` records
/// it. The client sends 1000 B and 64 KiB and checks the echoes; the bypass
/// must have redirected every byte of every direction its verdict allows:
/// `auto` on a kernel that passes every probe redirects all six (app ↔
/// sidecar, sidecar ↔ sidecar, sidecar ↔ app), where app sockets may only
/// send, four, and where apps stay out of the maps (6.18), the two between
/// the sidecars.
fn carries_redirected_traffic(node: &SimNode, server: &SimPod, client: &SimPod) {
    let verdict = kernel_verdict();
    let mut n = node.node();
    n.record_verdict(verdict).expect("record the selftest verdict");
    let redirected_dirs: usize = match (verdict.safe_all, verdict.safe_member) {
        (true, _) => 6,
        // App sockets send into their sidecars; nothing is sent into an app.
        (false, true) => 4,
        (false, false) => 2,
    };
    let echo = Peer::spawn(
        &server.cgroup.place(&server.ns, None),
        "echo",
        &["--listen", "0.0.0.0:8080"],
    );
    assert_eq!(echo.ready(), 8080);
    let sidecar_s = Sidecar::start(server, 15006, "127.0.0.1:8080", false);
    let sidecar_c = Sidecar::start(client, 15001, &format!("{}:8080", server.ip()), false);
    let mut app = Peer::spawn(
        &client.cgroup.place(&client.ns, None),
        "interactive",
        &["--connect", &format!("{}:8080", server.ip())],
    );
    let reply = app.ask("connect");
    assert!(reply.starts_with("connected "), "{reply}");
    // Every leg is connected and paired before a byte moves (a byte sent
    // before its pair exists takes the stack, and its direction stays there).
    wait_for(
        &format!("{redirected_dirs} pair entries"),
        Duration::from_secs(10),
        || n.pairs().len() == redirected_dirs,
    );
    let before = node.counters();
    let sizes = [1000u64, 65_536];
    for size in sizes {
        assert_eq!(app.ask(&format!("send {size}")), format!("ok {size}"));
    }
    let after = node.counters();
    let d = |c| after.get(c) - before.get(c);
    let sent: u64 = sizes.iter().sum();
    eprintln!("{} {}: {after:?}", node.name(), node.rt.version());
    assert_eq!(
        (sidecar_c.sessions(), sidecar_s.sessions()),
        (1, 1),
        "the connection crossed both sidecars"
    );
    assert_eq!(
        d(Counter::RedirectedBytes),
        redirected_dirs as u64 * sent,
        "every byte of {redirected_dirs} directions: {after:?}"
    );
    // Each end joins only the maps its directions need: nothing in them
    // sends without a receiver, so nothing passes or turns sticky.
    assert_eq!(d(Counter::PassthroughBytes), 0, "{after:?}");
    assert_eq!(d(Counter::Sticky), 0, "{after:?}");
    assert_eq!(app.ask("close"), "closed");
    wait_for("the pairing maps to drain", Duration::from_secs(10), || {
        n.pairs().is_empty() && n.endpoints().is_empty()
    });
    drop((app, sidecar_c, sidecar_s, echo));
}
