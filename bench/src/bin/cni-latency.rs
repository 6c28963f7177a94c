//! ADD and DEL latency of the `meshbypass` plugin over many runs, beside a
//! bare `iptables-restore` of the same ruleset through `ip netns exec` (what
//! any iptables-writing CNI pays), the plugin's peak RSS and its size on
//! disk (it is copied to every node and run per pod). Root only.
//!
//!   cni-latency [--runs N] [--json FILE]

use std::{path::PathBuf, process::Command};

use meshbypass_bench::{Summary, summarize, timed};
use meshbypass_cni::{
    cidr::Family,
    config::{Mesh, RedirectSpec},
    iptables,
};
use meshbypass_tests::{KubeCgroup, Netns, require_root, sibling_bin, unique};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    require_root();
    let mut runs = 200usize;
    let mut json_out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().unwrap_or_default().parse()?,
            "--json" => json_out = args.next().map(PathBuf::from),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let plugin = sibling_bin("meshbypass");
    let ns = Netns::new("lat");
    let uid = format!(
        "{:08x}-0000-4000-8000-{:012x}",
        std::process::id(),
        ns.cookie() & 0xffff_ffff_ffff
    );
    let cg = KubeCgroup::new(&format!("kubepods/burstable/pod{uid}"));
    let tag = unique("lat");
    let bpf_root = PathBuf::from("/sys/fs/bpf").join(&tag);
    let state = std::env::temp_dir().join(&tag);
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "bench",
        "type": "meshbypass",
        "bpfRoot": bpf_root,
        "stateDir": state,
        "logLevel": "info",
        "logFile": state.join("log"),
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": ns.path()}],
                        "ips": [{"address": "10.223.0.5/24", "interface": 0}]},
    })
    .to_string();
    let env = |cmd: &str| {
        let mut c = Command::new(&plugin);
        c.env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", format!("bench{tag}"))
            .env("CNI_NETNS", ns.path())
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench;K8S_POD_UID={uid}"),
            )
            .env("CNI_PATH", "/usr/lib/cni");
        c
    };

    // The first ADD on a node also creates the maps (shared loader).
    let first = timed(&mut env("ADD"), conf.as_bytes());
    assert!(first.ok, "first ADD failed: {}", first.stdout);
    assert!(timed(&mut env("DEL"), conf.as_bytes()).ok);
    let (mut add, mut del) = (Vec::new(), Vec::new());
    let (mut add_rss, mut del_rss) = (0, 0);
    let ruleset = iptables::ruleset(&RedirectSpec::defaults(Mesh::Istio), Family::V4);
    let mut base = Vec::new();
    for _ in 0..runs {
        let a = timed(&mut env("ADD"), conf.as_bytes());
        assert!(a.ok, "ADD failed: {}", a.stdout);
        let d = timed(&mut env("DEL"), conf.as_bytes());
        assert!(d.ok, "DEL failed: {}", d.stdout);
        add.push(a.wall);
        del.push(d.wall);
        add_rss = add_rss.max(a.max_rss_kib);
        del_rss = del_rss.max(d.max_rss_kib);
        // Interleaved: the baseline sees the same machine state.
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.name, "iptables-restore"]);
        let b = timed(&mut c, ruleset.as_bytes());
        assert!(b.ok, "baseline iptables-restore failed");
        base.push(b.wall);
    }
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, "iptables", "-t", "nat", "-F"]);
    assert!(timed(&mut c, b"").ok);

    let (sa, sd, sb) = (summarize(&add), summarize(&del), summarize(&base));
    let row = |name: &str, s: &Summary| {
        println!(
            "{name:<44} {:>5} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            s.n, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
        )
    };
    println!(
        "{:<44} {:>5} {:>8} {:>8} {:>8} {:>8}",
        "ms", "runs", "p50", "p90", "p99", "max"
    );
    row("meshbypass ADD (redirect + bypass + record)", &sa);
    row("meshbypass DEL", &sd);
    row("baseline: ip netns exec iptables-restore", &sb);
    println!(
        "first ADD on the node (creates the maps): {:.2} ms",
        first.wall.as_secs_f64() * 1e3
    );
    println!(
        "ADD p50 - baseline p50: {:+.2} ms (target <= +3 ms)",
        sa.p50_ms - sb.p50_ms
    );
    println!(
        "peak RSS: ADD {:.1} MiB, DEL {:.1} MiB (target <= 10 MiB)",
        add_rss as f64 / 1024.0,
        del_rss as f64 / 1024.0
    );
    let size = std::fs::metadata(&plugin)?.len();
    println!(
        "plugin binary: {size} bytes ({:.2} MiB), {}",
        size as f64 / (1024.0 * 1024.0),
        plugin.display()
    );
    if let Some(path) = json_out {
        let v = json!({"add": sa, "del": sd, "baseline": sb,
                       "first_add_ms": first.wall.as_secs_f64() * 1e3,
                       "add_peak_rss_kib": add_rss, "del_peak_rss_kib": del_rss,
                       "plugin_bytes": size});
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    }
    drop(cg);
    if let Err(e) = meshbypass_ebpf::unload(&bpf_root) {
        eprintln!("cleanup {}: {e}", bpf_root.display());
    }
    eprintln!("log: {}", state.join("log").display());
    Ok(())
}
