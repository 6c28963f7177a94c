//! The plugin under load and faults on a simulated node (the bridge conflist
//! executed per the CNI spec, as in cni_e2e.rs): 64 ADDs at once then 64
//! DELs at once, and ADDs killed with SIGKILL at every point followed by DEL;
//! after each, a leak checker looks for anything left: link pins, pod
//! registrations and pairing entries, cgroup attachments (bpftool), iptables
//! chains in the surviving netns, state records and temp files, host-local
//! IPAM reservations, veths on the bridge.
//!
//! The node here gets names of its own (bridge, subnet, bpf root, run dir,
//! unique per process), so it never shares the conflist's fixed resources
//! with cni_e2e.rs or the benchmark; SimNode still refuses a bpf root that
//! exists, and so do we for the bridge. Root only.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use meshbypass_tests::{cni::Attachment, node::*, *};
use serde_json::{Value, json};

/// A node with its own names: bridge `mbs<n>`, subnet 10.226.<n>.0/24, `n`
/// unique to the process and the test (tests here run in parallel).
fn stress_node() -> SimNode {
    static NODES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let tag = unique("s");
    let k = NODES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 4;
    let n = std::process::id() % 50 * 4 + k + 20;
    let bridge = format!("mbs{n}");
    assert!(
        !Path::new("/sys/class/net").join(&bridge).exists(),
        "bridge {bridge} exists: another run of this test is using it (or left it: `ip link del {bridge}`)"
    );
    let run = PathBuf::from(format!("/run/meshbypass-stress-{tag}"));
    SimNode::new("bridge.conflist", |c| {
        c["name"] = json!("meshbypass-stress");
        for p in c["plugins"].as_array_mut().unwrap() {
            match p["type"].as_str() {
                Some("bridge") => {
                    p["bridge"] = json!(bridge);
                    p["ipam"]["ranges"] = json!([[{ "subnet": format!("10.226.{n}.0/24") }]]);
                    p["ipam"]["dataDir"] = json!(run.join("ipam"));
                }
                Some("meshbypass") => {
                    p["bpfRoot"] = json!(format!("/sys/fs/bpf/meshbypass-stress-{tag}"));
                    p["stateDir"] = json!(run.join("state"));
                    p["logFile"] = json!(run.join("meshbypass.log"));
                    p["logLevel"] = json!("info");
                }
                _ => {}
            }
        }
    })
}

fn ipam_dir(node: &SimNode) -> PathBuf {
    PathBuf::from(node.rt.plugin("bridge")["ipam"]["dataDir"].as_str().unwrap()).join("meshbypass-stress")
}

fn bridge(node: &SimNode) -> String {
    node.rt.plugin("bridge")["bridge"].as_str().unwrap().to_owned()
}

/// What the leak checker found, one line per leak.
fn leaks(node: &SimNode, pods: &[&SimPod]) -> Vec<String> {
    let mut found = Vec::new();
    // Pins: only the node-wide maps and programs, no link, nothing else.
    if node.bpf_root.exists() {
        let n = node.node();
        if !n.links().is_empty() {
            found.push(format!("link pins: {:?}", n.links()));
        }
        if !n.pods().is_empty() {
            found.push(format!("registered pods: {:?}", n.pods()));
        }
        let (pairs, endpoints) = n.pairing_counts();
        let (tx, rx) = n.socket_counts();
        if pairs + endpoints + tx + rx > 0 {
            found.push(format!(
                "map entries: {pairs} pairs, {endpoints} endpoints, {tx}/{rx} sockets"
            ));
        }
        let known: Vec<&str> = meshbypass_ebpf::pins::MAPS
            .iter()
            .copied()
            .chain(["progs", "links"])
            .collect();
        for e in std::fs::read_dir(&node.bpf_root).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !known.contains(&name.as_str()) {
                found.push(format!("unexpected pin {name}"));
            }
        }
    }
    for pod in pods {
        // Cgroup attachments (a link pin removed but the attachment alive would show here).
        let out = sh(&["bpftool", "cgroup", "show", pod.cgroup.path.to_str().unwrap()]);
        if out.contains("sock_ops") {
            found.push(format!(
                "cgroup attachment on {}: {out}",
                pod.cgroup.path.display()
            ));
        }
        // Our chains in the surviving netns, both families.
        for save in ["iptables-save", "ip6tables-save"] {
            let rules = pod.ns.exec(&[save, "-t", "nat"]);
            if rules.contains("MESHBYPASS") {
                found.push(format!("{save} in {}: {rules}", pod.ns.name));
            }
        }
    }
    // State records and their temp files.
    for e in std::fs::read_dir(&node.state_dir).into_iter().flatten().flatten() {
        found.push(format!("state file {}", e.path().display()));
    }
    // host-local reservations: one file per IP (plus its lock and last_reserved_ip.*).
    for e in std::fs::read_dir(ipam_dir(node)).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "lock" && !name.starts_with("last_reserved_ip") {
            found.push(format!("IPAM reservation {name}"));
        }
    }
    // veths left on the bridge.
    let br = bridge(node);
    if Path::new("/sys/class/net").join(&br).exists() {
        let out = sh(&["ip", "-o", "link", "show", "master", &br]);
        if !out.trim().is_empty() {
            found.push(format!("veths on {br}: {out}"));
        }
    }
    found
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn parallel_adds_then_parallel_dels_leave_nothing() {
    const PODS: usize = 64;
    let node = stress_node();
    let mut pods: Vec<SimPod> = (0..PODS)
        .map(|i| SimPod::new(&format!("p{i}"), i % 2 == 0))
        .collect();

    let started = Instant::now();
    let results: Vec<Result<Value, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| {
                let (rt, att) = (&node.rt, &pod.att);
                s.spawn(move || rt.add(att).map_err(|e| format!("{e:?}")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let add_time = started.elapsed();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {PODS} ADDs failed: {failed:#?}",
        failed.len()
    );
    for (pod, r) in pods.iter_mut().zip(results) {
        pod.result = Some(r.unwrap());
    }

    // Everything is there: a link, a registration, a record and rules per pod.
    let n = node.node();
    assert_eq!(n.links().len(), PODS, "{:?}", n.links());
    assert_eq!(n.pods().len(), PODS);
    let ips: std::collections::HashSet<String> = pods.iter().map(SimPod::ip).collect();
    assert_eq!(ips.len(), PODS, "every pod got its own address");
    for pod in &pods {
        assert!(pod.rules().contains("MESHBYPASS_OUTPUT"), "{}", pod.ns.name);
        let att = sh(&["bpftool", "cgroup", "show", pod.cgroup.path.to_str().unwrap()]);
        assert!(att.contains("sock_ops"), "{}: {att}", pod.cgroup.path.display());
    }
    // Hardening: the pin directories are private to root.
    for dir in [node.bpf_root.clone(), n.pins().progs_dir(), n.pins().links_dir()] {
        assert_eq!(mode_of(&dir), 0o700, "{} is not 0700", dir.display());
    }
    drop(n);

    let started = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| {
                let (rt, att, cached) = (&node.rt, &pod.att, pod.result.as_ref());
                s.spawn(move || rt.del(att, cached).map_err(|e| format!("{e:?}")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let del_time = started.elapsed();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {PODS} DELs failed: {failed:#?}",
        failed.len()
    );
    eprintln!(
        "{PODS} parallel ADDs in {:.2} s, {PODS} parallel DELs in {:.2} s",
        add_time.as_secs_f64(),
        del_time.as_secs_f64()
    );
    let refs: Vec<&SimPod> = pods.iter().collect();
    let found = leaks(&node, &refs);
    assert!(found.is_empty(), "leaks after 64 ADD + 64 DEL: {found:#?}");
}

/// The configuration one plugin of the list receives (what the runtime builds).
fn config_for(node: &SimNode, plugin: &str, prev: Option<&Value>) -> Value {
    let mut c = node.rt.plugin(plugin);
    c["name"] = node.rt.conflist["name"].clone();
    c["cniVersion"] = node.rt.conflist["cniVersion"].clone();
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

/// Runs our plugin's ADD and kills it with SIGKILL after `delay`; returns
/// whether it had already finished.
fn add_killed_after(node: &SimNode, att: &Attachment, prev: &Value, delay: Duration) -> bool {
    let bin = sibling_bin("meshbypass");
    let mut child = Command::new(&bin)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", &att.container_id)
        .env("CNI_IFNAME", &att.ifname)
        .env("CNI_ARGS", att.cni_args())
        .env("CNI_NETNS", att.netns.as_ref().unwrap())
        .env("CNI_PATH", &node.rt.cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the plugin");
    let config = config_for(node, "meshbypass", Some(prev)).to_string();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        // The plugin may already be dead by the time we write: fine.
        if let Err(e) = stdin.write_all(config.as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
    }
    std::thread::sleep(delay);
    let finished = matches!(child.try_wait(), Ok(Some(_)));
    if !finished {
        child.kill().expect("SIGKILL the plugin");
    }
    child.wait().expect("reap the plugin");
    finished
}

/// One killed ADD and its DEL. `settle`: wait, before DEL, until no
/// iptables process the killed plugin started still runs in the pod's netns
/// (a runtime does not wait: see the ignored test below).
fn kill_then_del(node: &SimNode, i: usize, us: u64, settle: bool) -> (SimPod, bool) {
    let pod = SimPod::new(&format!("k{i}"), i % 2 == 1);
    // The primary plugins run to completion, as the runtime would have.
    let bridge_res = node
        .rt
        .exec("bridge", "ADD", Some(&pod.att), &config_for(node, "bridge", None))
        .unwrap_or_else(|e| panic!("bridge ADD: {e:?}"));
    let prev = node
        .rt
        .exec(
            "portmap",
            "ADD",
            Some(&pod.att),
            &config_for(node, "portmap", Some(&bridge_res)),
        )
        .unwrap_or_else(|e| panic!("portmap ADD: {e:?}"));
    let killed = !add_killed_after(node, &pod.att, &prev, Duration::from_micros(us));
    if settle {
        wait_for(
            "the killed plugin's iptables processes to exit",
            Duration::from_secs(10),
            || iptables_in(&pod.ns).is_empty(),
        );
    }
    // The runtime gives up on the ADD and deletes the sandbox, without a cached result.
    node.rt
        .del(&pod.att, None)
        .unwrap_or_else(|e| panic!("DEL after a killed ADD ({us} µs): {e:?}"));
    (pod, killed)
}

/// PIDs of iptables programs running in `ns` (orphans of a killed plugin).
fn iptables_in(ns: &Netns) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let want = format!("net:[{}]", std::fs::metadata(ns.path()).unwrap().ino());
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if !comm.contains("tables") {
            continue;
        }
        let net = std::fs::read_link(format!("/proc/{pid}/ns/net"));
        if net.is_ok_and(|l| l.to_string_lossy() == want) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn add_killed_at_any_point_then_del_leaves_nothing() {
    let node = stress_node();
    // One complete ADD first, so that later kills land in a pod's own work
    // (redirect, attach, record) rather than always in the node's first load.
    let mut warm = SimPod::new("warm", false);
    warm.add(&node);
    let delays_us = kill_points();
    let mut killed = 0;
    let mut pods = Vec::new();
    let mut temp_records = Vec::new();
    for (i, &us) in delays_us.iter().enumerate() {
        let (pod, k) = kill_then_del(&node, i, us, true);
        killed += usize::from(k);
        let (temp, found): (Vec<String>, Vec<String>) =
            leaks_of(&node, &pod).into_iter().partition(|l| is_temp_record(l));
        assert!(
            found.is_empty(),
            "leaks after ADD killed at {us} µs, then DEL: {found:#?}"
        );
        temp_records.extend(temp);
        pods.push(pod);
    }
    eprintln!(
        "{killed} of {} ADDs killed mid-way (the rest had finished), each followed by a clean DEL; \
         known bug: {} temporary record file(s) left ({temp_records:?})",
        delays_us.len(),
        temp_records.len()
    );
    for name in &temp_records {
        // Removed here so that the final check sees the rest.
        let file = name.trim_start_matches("state file ");
        std::fs::remove_file(node.state_dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    assert!(killed > 0, "no ADD was killed mid-way: the delays are too long");
    node.rt
        .del(&warm.att, warm.result.as_ref())
        .unwrap_or_else(|e| panic!("DEL: {e:?}"));
    let refs: Vec<&SimPod> = pods.iter().chain([&warm]).collect();
    let found = leaks(&node, &refs);
    assert!(found.is_empty(), "{found:#?}");
}

/// KNOWN BUG (reported): killing the plugin during ADD leaves its
/// `iptables-restore` child running (reparented, not killed); when the
/// runtime's DEL reads the rules before that orphan commits, DEL finds
/// nothing to remove and the orphan then installs the whole redirect in the
/// pod's netns, for good. Seen in about half of the runs on this machine
/// (kill at ~2 ms). A fix: PR_SET_PDEATHSIG(SIGKILL) in the children the
/// plugin runs (cni-plugin/src/redirect.rs), so they die with it; nft
/// commits are atomic, so a killed restore either committed before DEL looks
/// or never does.
#[test]
fn add_killed_then_immediate_del_leaves_no_rules() {
    let node = stress_node();
    let mut warm = SimPod::new("warm", false);
    warm.add(&node);
    let mut pods = Vec::new();
    for round in 0..4 {
        for (i, us) in (1000..4000).step_by(250).enumerate() {
            let (pod, _) = kill_then_del(&node, round * 100 + i, us, false);
            // Whatever the orphan does, it is done within a second.
            std::thread::sleep(Duration::from_millis(200));
            let found = leaks_of(&node, &pod);
            assert!(found.is_empty(), "ADD killed at {us} µs, then DEL: {found:#?}");
            pods.push(pod);
        }
    }
    node.rt.del(&warm.att, warm.result.as_ref()).unwrap();
}

/// `.<id>.tmp-<pid>`: a record being written when the plugin died.
fn is_temp_record(leak: &str) -> bool {
    leak.starts_with("state file .") && leak.contains(".tmp-")
}

/// KNOWN BUG (reported): a plugin killed while it writes the pod's record
/// leaves `<stateDir>/.<id>.tmp-<pid>` (cni-plugin/src/state.rs writes a temp
/// file, then renames it); DEL removes `<id>.json` only and GC lists `*.json`
/// only, so the temp file stays for good (a few hundred bytes per killed
/// ADD, on tmpfs until reboot). A fix: DEL (and GC) also remove
/// `.<id>.tmp-*`.
#[test]
fn add_killed_while_recording_leaves_no_temp_file() {
    let node = stress_node();
    let mut warm = SimPod::new("warm", false);
    warm.add(&node);
    let mut pods = Vec::new();
    for round in 0..2 {
        for (i, us) in (500..4500).step_by(40).enumerate() {
            let (pod, _) = kill_then_del(&node, round * 1000 + i, us, true);
            let temp: Vec<String> = leaks_of(&node, &pod)
                .into_iter()
                .filter(|l| is_temp_record(l))
                .collect();
            assert!(temp.is_empty(), "ADD killed at {us} µs, then DEL: {temp:?}");
            pods.push(pod);
        }
    }
    node.rt.del(&warm.att, warm.result.as_ref()).unwrap();
}

/// Kill points: every 250 µs over the first 12 ms (an ADD takes a few ms
/// here), then a few later ones.
fn kill_points() -> Vec<u64> {
    let full = std::env::var("MESHBYPASS_TORTURE").is_ok_and(|v| v == "full");
    let step = if full { 100 } else { 400 };
    (0..12_000)
        .step_by(step)
        .chain([15_000, 20_000, 30_000])
        .collect()
}

/// The leak checker for one pod (the node-wide parts only as far as they are this pod's).
fn leaks_of(node: &SimNode, pod: &SimPod) -> Vec<String> {
    let mut found = Vec::new();
    let n = node.node();
    if n.links().contains(&pod.att.container_id) {
        found.push("its link pin".into());
    }
    let cookie = pod.ns.cookie();
    if n.pod_by_netns(cookie).is_some() {
        found.push("its registration".into());
    }
    let out = sh(&["bpftool", "cgroup", "show", pod.cgroup.path.to_str().unwrap()]);
    if out.contains("sock_ops") {
        found.push(format!("its cgroup attachment: {out}"));
    }
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = pod.ns.exec(&[save, "-t", "nat"]);
        if rules.contains("MESHBYPASS") {
            found.push(format!("{save}: {rules}"));
        }
    }
    let record = node.state_dir.join(format!("{}.json", pod.att.container_id));
    if record.exists() {
        found.push(format!("its record {}", record.display()));
    }
    for e in std::fs::read_dir(&node.state_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(&pod.att.container_id) {
            found.push(format!("state file {name}"));
        }
    }
    found
}
