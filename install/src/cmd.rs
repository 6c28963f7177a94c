//! The subcommands.

use std::{path::Path, process::ExitCode, sync::Arc};

use anyhow::Context;
use meshbypass_ebpf::{NodeMaps, abi::KERNEL_PROBED, loader, maps::OpenError, selftest};
use serde_json::json;

use crate::{
    agent,
    cli::{Cli, CniDirs, Command, HostPaths},
    confdir::{Chained, ConfDir},
    installer::{self, Installer},
    kernel::run_selftest,
    metrics::Stats,
    status::{self, auto_mode},
};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = cli.bpf_root.as_path();
    let log_format = cli.log_format;
    match cli.command {
        Command::Load {
            selftest,
            output,
            sizes,
        } => load(root, &sizes.load_options(), selftest.wanted(), output.json),
        Command::Unload { output } => {
            let report = loader::unload(root).with_context(|| format!("unloading {}", root.display()))?;
            if output.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "unloaded {}: {} pins and {} pod links removed",
                    root.display(),
                    report.pins,
                    report.links
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { output, state_dir } => status::run(root, &state_dir, output.json),
        Command::Install {
            paths,
            selftest,
            sizes,
        } => install(root, &paths, &sizes.load_options(), selftest.wanted()),
        Command::Uninstall { dirs, cleanup } => uninstall(root, &dirs, cleanup),
        Command::Run(opts) => {
            agent::run(root, &opts, log_format)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest { output } => {
            let report = run_selftest()?;
            // Record the verdict when the node is loaded here.
            match NodeMaps::open(root) {
                Ok(mut node) => node
                    .record_verdict(&report)
                    .context("recording the selftest verdict")?,
                Err(OpenError::NotLoaded { .. }) => {}
                Err(e) => return Err(e).context("opening the node's maps"),
            }
            if output.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_selftest(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::SelftestProbe { cgroup } => {
            let probes = selftest::probe_main(root, &cgroup).context("selftest probe")?;
            println!("{}", serde_json::to_string(&probes)?);
            // Abandoned (hung) probe threads end with the process.
            std::process::exit(0);
        }
    }
}

/// `install`: check the settings, load (with the selftest once), copy the
/// plugin, chain it. A failed load is a warning: the plugin is installed
/// anyway (pods get their redirect; the bypass waits for the maps).
fn install(
    root: &Path,
    paths: &HostPaths,
    options: &meshbypass_ebpf::LoadOptions,
    run_probe: bool,
) -> anyhow::Result<ExitCode> {
    let dirs = &paths.dirs;
    let conf = ConfDir::new(&dirs.cni_conf_dir);
    if conf.primary()?.is_none() {
        anyhow::bail!(
            "no CNI network config (*.conflist, *.conf, *.json) in {}: install the primary CNI first \
             (for a plain host, conflist/bridge.conflist is an example)",
            dirs.cni_conf_dir.display()
        );
    }
    let entry = installer::entry(paths.plugin_config.as_deref(), root, None)?;
    if let Err(e) = load(root, options, run_probe, false) {
        eprintln!(
            "warning: {e:#}\nwarning: installing the plugin anyway: pods get their redirect, not the \
             bypass, until `meshbypass-node load` succeeds"
        );
    }
    let binary = match &paths.plugin_binary {
        Some(p) => p.clone(),
        None => installer::default_plugin_binary().context("locating this executable")?,
    };
    let mut inst = Installer::new(
        &dirs.cni_bin_dir,
        &dirs.cni_conf_dir,
        &binary,
        Some(entry),
        None,
        Arc::new(Stats::default()),
    )?;
    let copied = inst.ensure_binary()?;
    println!(
        "{} {}",
        if copied {
            "copied the plugin to"
        } else {
            "the plugin is already at"
        },
        inst.target().display()
    );
    match inst.ensure_chained()? {
        Chained::NoSettings => anyhow::bail!("no plugin settings to chain"),
        Chained::NoPrimary => anyhow::bail!(
            "the CNI network config in {} disappeared while installing",
            dirs.cni_conf_dir.display()
        ),
        Chained::Unchanged { file } => {
            println!("already chained into {}", dirs.cni_conf_dir.join(file).display())
        }
        Chained::Written { file } => println!("chained into {}", dirs.cni_conf_dir.join(file).display()),
    }
    Ok(ExitCode::SUCCESS)
}

/// `uninstall`: our conflist entries first, then the binary; `--cleanup`
/// also unloads the maps and pod links.
fn uninstall(root: &Path, dirs: &CniDirs, cleanup: bool) -> anyhow::Result<ExitCode> {
    let removed = installer::uninstall(&dirs.cni_conf_dir, &dirs.cni_bin_dir, None)?;
    if removed.is_empty() {
        println!(
            "nothing to remove in {} or {}",
            dirs.cni_conf_dir.display(),
            dirs.cni_bin_dir.display()
        );
    }
    for path in &removed {
        println!("removed meshbypass from {}", path.display());
    }
    if cleanup {
        let report = loader::unload(root).with_context(|| format!("unloading {}", root.display()))?;
        println!(
            "unloaded {}: {} pins and {} pod links removed",
            root.display(),
            report.pins,
            report.links
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn load(
    root: &Path,
    options: &meshbypass_ebpf::LoadOptions,
    run_probe: bool,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let (mut node, outcome) = loader::load_with(root, options)
        .with_context(|| format!("loading the node's maps at {}", root.display()))?;
    let cfg = node.config().context("reading mb_config")?;
    let mut report = None;
    if run_probe && cfg.kernel_flags & KERNEL_PROBED == 0 {
        let r = run_selftest()?;
        node.record_verdict(&r)
            .context("recording the selftest verdict")?;
        report = Some(r);
    }
    let cfg = node.config().context("reading mb_config")?;
    let auto = auto_mode(cfg.kernel_flags);
    if json_out {
        println!(
            "{}",
            json!({"outcome": outcome, "bpf_root": root, "auto": auto, "selftest": report})
        );
    } else {
        let what = match outcome {
            loader::LoadOutcome::Created => "created",
            loader::LoadOutcome::Reused => "reused",
            loader::LoadOutcome::Upgraded => "upgraded the programs of",
        };
        println!("{what} the node's maps and programs at {}", root.display());
        if let Some(r) = &report {
            print_selftest(r);
        }
        println!("acceleration auto = {auto}");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_selftest(r: &selftest::Report) {
    println!("kernel {}", r.kernel);
    println!("{:<15} {:<13} detail", "probe", "outcome");
    for p in &r.probes {
        let outcome = serde_json::to_value(p.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        println!("{:<15} {:<13} {}", p.name, outcome, p.detail);
    }
    println!(
        "verdict: {}",
        match (r.safe_all, r.safe_member) {
            (true, _) => "redirecting into any socket is safe (auto = all)",
            (false, true) =>
                "hazards found (auto = proxy-only: app sockets send redirected, only proxies receive)",
            (false, false) => "hazards found (auto = proxy-only: sidecar-to-sidecar legs only)",
        }
    );
}
