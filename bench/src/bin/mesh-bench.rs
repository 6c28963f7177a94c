//! The side-by-side mesh benchmark: no mesh, sidecar mesh, and the sidecar
//! mesh with the bypass in `all`, `proxy-only` and `auto`, plus plain
//! pod-to-pod with and without it; several loads; interleaved rounds;
//! medians; every run verified to be what it claims. Root only.
//!
//!   mesh-bench [--rounds N] [--secs S] [--quick] [--json FILE]
//!              [--modes A,B] [--loads A,B] [--reference]
//!
//! `--modes`/`--loads` keep the modes/loads whose name equals one of the
//! comma-separated names (as printed in the table, e.g. `--modes
//! sidecar,"sidecar + bypass(all)" --loads "c16 1k"`); the plain sidecar mesh
//! is always kept, since every ratio is against it. `--reference` adds the
//! same sidecars joined by unix sockets (the cheapest kernel IPC between the
//! proxies: a ceiling for any datapath, not a product mode).

use std::path::PathBuf;

use meshbypass_bench::{
    Cell,
    mesh::{self, Load, Mesh},
    print_table,
};

fn main() -> anyhow::Result<()> {
    meshbypass_tests::require_root();
    let mut rounds = 3u32;
    let mut secs = 3u32;
    let mut quick = false;
    let mut reference = false;
    let mut json_out = PathBuf::from("bench/results/latest.json");
    let mut only_modes: Option<Vec<String>> = None;
    let mut only_loads: Option<Vec<String>> = None;
    let list = |v: Option<String>| -> Option<Vec<String>> {
        Some(
            v.unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_owned())
                .collect(),
        )
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().unwrap_or_default().parse()?,
            "--secs" => secs = args.next().unwrap_or_default().parse()?,
            "--quick" => quick = true,
            "--reference" => reference = true,
            "--json" => json_out = args.next().unwrap_or_default().into(),
            "--modes" => only_modes = list(args.next()),
            "--loads" => only_loads = list(args.next()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let mut modes = vec![
        mesh::NO_MESH,
        mesh::SIDECAR,
        mesh::SIDECAR_ALL,
        mesh::SIDECAR_PROXY_ONLY,
        mesh::SIDECAR_AUTO,
        mesh::SIDECAR_ADAPTIVE,
        mesh::NO_MESH_BYPASS,
    ];
    let mut loads = if quick {
        vec![Load::keepalive(16, "1k")]
    } else {
        vec![
            Load::keepalive(1, "1k"),
            Load::keepalive(16, "1k"),
            Load::keepalive(64, "1k"),
            Load::keepalive(1, "64"),
            Load::keepalive(16, "64"),
            Load::keepalive(16, "16k"),
            Load::keepalive(16, "64k"),
            Load::per_request(16, "1k"),
        ]
    };
    if reference {
        modes.push(mesh::REFERENCE_UNIX);
    }
    if let Some(keep) = &only_modes {
        modes.retain(|m| {
            m.name == mesh::SIDECAR.name
                || m.name == mesh::REFERENCE_UNIX.name
                || keep.iter().any(|k| k == m.name)
        });
    }
    if let Some(keep) = &only_loads {
        loads.retain(|l| keep.contains(&l.name));
        anyhow::ensure!(!loads.is_empty(), "--loads matched no load");
    }
    eprintln!("setting up the node, pods, nginx and sidecars...");
    let mut m = Mesh::start(true);
    let kernel = meshbypass_ebpf::selftest::kernel_release();
    let verdict = m.node.node().config()?.kernel_flags;
    let total = rounds as usize * loads.len() * modes.len();
    let mut samples = vec![Vec::new(); loads.len() * modes.len()];
    let mut done = 0;
    for round in 1..=rounds {
        for (li, load) in loads.iter().enumerate() {
            for (mi, mode) in modes.iter().enumerate() {
                done += 1;
                eprint!(
                    "\r[{done}/{total}] round {round}: {} / {}          ",
                    load.name, mode.name
                );
                samples[li * modes.len() + mi].push(m.run(mode, load, secs));
            }
        }
    }
    eprintln!();
    let mut cells = Vec::new();
    for (li, load) in loads.iter().enumerate() {
        for (mi, mode) in modes.iter().enumerate() {
            cells.push(Cell::of(
                load,
                mode,
                std::mem::take(&mut samples[li * modes.len() + mi]),
            ));
        }
    }
    println!(
        "kernel {kernel}; {rounds} interleaved rounds of {secs}s; medians; ratios against the plain sidecar mesh"
    );
    print_table(&cells, mesh::SIDECAR.name);
    let c = m.node.counters();
    println!(
        "\nbypass counters over the whole run: {}",
        serde_json::to_string(&c)?
    );
    if let Some(dir) = json_out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let v = serde_json::json!({
        "kernel": kernel, "kernel_flags": verdict, "rounds": rounds, "secs": secs,
        "cells": cells, "counters": c,
    });
    std::fs::write(&json_out, serde_json::to_string_pretty(&v)?)?;
    println!("results: {}", json_out.display());
    if cells.iter().any(|c| !c.verified) {
        anyhow::bail!("some runs were not what they claim (see FAILED rows)");
    }
    Ok(())
}
