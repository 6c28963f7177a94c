//! The shared loader through the real binary: concurrency, reuse, version
//! stamp, unload. Root only.

use std::{path::PathBuf, process::Command};

use meshbypass_tests::*;

fn node_cmd(args: &[&str], root: &str) -> std::process::Output {
    Command::new(sibling_bin("meshbypass-node"))
        .args(args)
        .args(["--bpf-root", root])
        .output()
        .expect("run meshbypass-node")
}

struct Root(String);

impl Drop for Root {
    fn drop(&mut self) {
        if let Err(e) = meshbypass_ebpf::unload(std::path::Path::new(&self.0)) {
            eprintln!("cleanup {}: {e}", self.0);
        }
    }
}

fn new_root() -> Root {
    Root(format!("/sys/fs/bpf/{}", unique("ld")))
}

fn prog_id(root: &str) -> u32 {
    let p = aya::programs::SockOps::from_pin(PathBuf::from(root).join("progs/mb_sockops")).unwrap();
    p.info().unwrap().id()
}

#[test]
fn eight_concurrent_loads_create_once() {
    require_root();
    let root = new_root();
    let children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(sibling_bin("meshbypass-node"))
                .args(["load", "--no-selftest", "--json", "--bpf-root", &root.0])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut outcomes = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "load failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        outcomes.push(v["outcome"].as_str().unwrap().to_owned());
    }
    outcomes.sort();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "created").count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| *o == "reused").count(),
        7,
        "{outcomes:?}"
    );
    // A further load changes nothing: same program, same maps.
    let id = prog_id(&root.0);
    let out = node_cmd(&["load", "--no-selftest", "--json"], &root.0);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"reused\""));
    assert_eq!(prog_id(&root.0), id);
}

#[test]
fn a_layout_version_mismatch_is_a_clear_error() {
    require_root();
    let root = new_root();
    assert!(node_cmd(&["load", "--no-selftest"], &root.0).status.success());
    // Stamp another layout version (99) into mb_config.
    let value: Vec<String> = [99u32, 0, 0, 0, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .map(|b| b.to_string())
        .collect();
    let mut args = vec!["bpftool", "map", "update", "pinned"];
    let pin = format!("{}/mb_config", root.0);
    args.push(&pin);
    args.extend(["key", "0", "0", "0", "0", "value"]);
    args.extend(value.iter().map(String::as_str));
    sh(&args);
    for cmd in [&["load", "--no-selftest"][..], &["status", "--json"][..]] {
        let out = node_cmd(cmd, &root.0);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?} accepted a foreign layout");
        assert!(
            err.contains("layout version 99") && err.contains("unload"),
            "{cmd:?}: {err}"
        );
    }
    // unload still cleans it up.
    assert!(node_cmd(&["unload"], &root.0).status.success());
    assert!(!std::path::Path::new(&root.0).exists());
}

#[test]
fn unload_leaves_no_pin_and_detaches_links() {
    require_root();
    let root = new_root();
    let out = node_cmd(&["load", "--no-selftest"], &root.0);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cg = Cgroup::new("ul");
    let node = meshbypass_ebpf::NodeMaps::open(std::path::Path::new(&root.0)).unwrap();
    node.attach_cgroup(&cg.path, "container-1").unwrap();
    assert_eq!(node.links(), vec!["container-1".to_owned()]);
    let attached = sh(&["bpftool", "cgroup", "show", cg.path.to_str().unwrap()]);
    assert!(attached.contains("mb_sockops"), "{attached}");
    drop(node);
    let out = node_cmd(&["unload", "--json"], &root.0);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["links"], 1);
    assert!(
        !std::path::Path::new(&root.0).exists(),
        "the bpf root is left behind"
    );
    let attached = sh(&["bpftool", "cgroup", "show", cg.path.to_str().unwrap()]);
    assert!(!attached.contains("mb_sockops"), "still attached: {attached}");
    // status on an unloaded root says so.
    let out = node_cmd(&["status", "--json"], &root.0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["loaded"], false);
}

#[test]
fn status_json_shows_counters_rising_under_traffic() {
    require_root();
    let pods = PodPair::new();
    let root = BpfRoot::load();
    let (cg_a, cg_b) = (Cgroup::new("ca"), Cgroup::new("cb"));
    root.add_pod(&pods.a, &cg_a, &[A_V4], meshbypass_ebpf::Mode::All);
    root.add_pod(&pods.b, &cg_b, &[B_V4], meshbypass_ebpf::Mode::All);
    let status = || -> serde_json::Value {
        let out = node_cmd(&["status", "--json"], root.path.to_str().unwrap());
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let s0 = status();
    assert_eq!(s0["loaded"], true);
    assert_eq!(s0["pods"], 2);
    assert_eq!(s0["counters"]["redirected_msgs"], 0);
    let server = Peer::spawn(
        &Place {
            ns: &pods.b,
            cgroup: &cg_b.path,
            uid: None,
        },
        "echo",
        &["--listen", "0.0.0.0:0"],
    );
    let port = server.ready();
    run_client(
        &Place {
            ns: &pods.a,
            cgroup: &cg_a.path,
            uid: None,
        },
        &format!("{B_V4}:{port}"),
        &[50_000; 4],
    );
    let s1 = status();
    for k in ["redirected_msgs", "redirected_bytes"] {
        assert!(s1["counters"][k].as_u64().unwrap() > 0, "{k}: {s1}");
    }
    assert!(s1["counters"]["passthrough_msgs"].is_u64());
    assert!(s1["kernel"].is_string());
    eprintln!("status: {s1}");
}

/// A node loaded by another build with the same layout gets this build's
/// programs on the next load: pins replaced, every pod link updated, the
/// established connection keeps working, new connections are redirected.
#[test]
fn a_load_by_another_build_replaces_the_programs_under_running_pods() {
    use meshbypass_ebpf::{Counter, LoadOutcome, Mode, pins};
    require_root();
    let pods = PodPair::new();
    let root = BpfRoot::load();
    let (cg_a, cg_b) = (Cgroup::new("ua"), Cgroup::new("ub"));
    root.add_pod(&pods.a, &cg_a, &[A_V4], Mode::All);
    root.add_pod(&pods.b, &cg_b, &[B_V4], Mode::All);
    let (_server, mut client, _) = echo_pair(&pods, &cg_a, &cg_b);
    assert!(client.ask("connect").starts_with("connected "));
    assert_eq!(client.ask("send 100000"), "ok 100000");
    let ids = |root: &BpfRoot| {
        let node = root.node.lock().unwrap();
        (
            node.program_id(pins::PROG_SOCKOPS).unwrap(),
            node.program_id(pins::PROG_SK_MSG).unwrap(),
        )
    };
    let (ops0, msg0) = ids(&root);
    root.node.lock().unwrap().record_object_hash(1).unwrap();

    let (_, outcome) = meshbypass_ebpf::load(&root.path).unwrap();
    assert_eq!(outcome, LoadOutcome::Upgraded);
    let (ops1, msg1) = ids(&root);
    assert_ne!(ops1, ops0, "sockops replaced");
    assert_ne!(msg1, msg0, "sk_msg replaced");
    let node = root.node.lock().unwrap();
    let links = node.links();
    assert_eq!(links.len(), 2, "{links:?}");
    for l in &links {
        assert_eq!(
            node.link_program_id(l).unwrap(),
            ops1,
            "link {l} runs the new program"
        );
    }
    assert_eq!(
        node.config().unwrap().object_hash,
        meshbypass_ebpf::loader::object_hash()
    );
    drop(node);

    // The established connection keeps working, redirected (its sockets
    // keep the sk_msg program they joined with).
    let r0 = root.counter(Counter::RedirectedBytes);
    assert_eq!(client.ask("send 100000"), "ok 100000");
    let r1 = root.counter(Counter::RedirectedBytes);
    assert!(r1 - r0 >= 200_000, "{r0} -> {r1}");
    // A new connection pairs under the new programs and is redirected.
    assert!(client.ask("connect").starts_with("connected "));
    assert_eq!(client.ask("send 100000"), "ok 100000");
    let r2 = root.counter(Counter::RedirectedBytes);
    assert!(r2 - r1 >= 200_000, "{r1} -> {r2}");
    assert_eq!(client.ask("close"), "closed");

    // This build's programs are now the pinned ones: plain reuse.
    let (_, outcome) = meshbypass_ebpf::load(&root.path).unwrap();
    assert_eq!(outcome, LoadOutcome::Reused);
    assert_eq!(ids(&root), (ops1, msg1));
}

/// A load that fails halfway (here: socket maps too large to create, after
/// other maps were already pinned) leaves no pin behind, and the next load
/// with sane sizes creates the node from nothing.
#[test]
fn a_failed_load_leaves_no_pin() {
    require_root();
    let root = new_root();
    let path = PathBuf::from(&root.0);
    let huge = meshbypass_ebpf::LoadOptions {
        socket_capacity: u32::MAX / 2,
        ..Default::default()
    };
    let err = meshbypass_ebpf::load_with(&path, &huge)
        .err()
        .expect("maps of 2^31 sockets cannot be created");
    let left: Vec<PathBuf> = walk(&path).into_iter().filter(|p| p.is_file()).collect();
    assert!(left.is_empty(), "{err}: pins left behind: {left:?}");
    let (_, outcome) = meshbypass_ebpf::load(&path).expect("a sane load after the failed one");
    assert_eq!(outcome, meshbypass_ebpf::LoadOutcome::Created);
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
