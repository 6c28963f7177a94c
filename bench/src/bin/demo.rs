//! The local demo: a node with two meshed pods, traffic through their
//! sidecars, the bypass's effect shown, everything cleaned up. Root only.
//!
//!   demo [--secs S] [--smoke]

use std::time::Instant;

use meshbypass_bench::{
    Cell,
    mesh::{self, Load, Mesh},
    print_table,
};

fn main() -> anyhow::Result<()> {
    meshbypass_tests::require_root();
    let mut secs = 5u32;
    let mut smoke = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().unwrap_or_default().parse()?,
            "--smoke" => smoke = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    if smoke {
        secs = secs.min(1);
    }
    // Everything the demo runs besides itself, before anything is set up
    // (each panics naming the build command when it is missing).
    for bin in ["meshbypass", "meshbypass-node", "mb-peer"] {
        meshbypass_tests::sibling_bin(bin);
    }
    let started = Instant::now();
    println!("[1/4] a node: bridge + host-local + meshbypass (conflist/bridge.conflist), the shared loader");
    println!("      two pods: client (wrk) and server (nginx), each with an HAProxy sidecar as UID 1337");
    println!("      on Istio's ports (15001 out, 15006 in); the kernel selftest decides what `auto` may do");
    let mut m = Mesh::start(true);
    println!(
        "      server pod {}  client pod {}  ({:.1}s)",
        m.server.ip(),
        m.client.ip(),
        started.elapsed().as_secs_f64()
    );
    let modes = [
        mesh::NO_MESH,
        mesh::SIDECAR,
        mesh::SIDECAR_AUTO,
        mesh::SIDECAR_ADAPTIVE,
        mesh::SIDECAR_ALL,
    ];
    let load = Load::keepalive(16, "1k");
    let mut cells = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        println!(
            "[2/4] load {}/{}: {} for {secs}s (wrk, 16 keep-alive connections, 1 KiB responses)",
            i + 1,
            modes.len(),
            mode.name
        );
        let s = m.run(mode, &load, secs);
        println!(
            "      {:.0} req/s, p50 {:.0} us, {} msgs redirected, {} passed to the stack",
            s.rps, s.p50_us, s.redirected_msgs, s.passthrough_msgs
        );
        cells.push(Cell::of(&load, mode, vec![s]));
    }
    println!("[3/4] results (ratios against the plain sidecar mesh)");
    print_table(&cells, mesh::SIDECAR.name);
    let status = std::process::Command::new(meshbypass_tests::sibling_bin("meshbypass-node"))
        .args(["status", "--bpf-root"])
        .arg(&m.node.bpf_root)
        .output()?;
    println!(
        "\n`meshbypass-node status`:\n{}",
        String::from_utf8_lossy(&status.stdout)
    );
    println!("[4/4] cleaning up (pods DELeted through the conflist, pins unloaded)");
    for pod in [&m.client, &m.server] {
        m.node
            .rt
            .del(&pod.att, pod.result.as_ref())
            .map_err(|e| anyhow::anyhow!("DEL: {e:?}"))?;
    }
    let ok = cells.iter().all(|c| c.verified);
    drop(m);
    println!("done in {:.1}s", started.elapsed().as_secs_f64());
    if !ok {
        anyhow::bail!("a mode did not do what it claims (see FAILED rows)");
    }
    Ok(())
}
