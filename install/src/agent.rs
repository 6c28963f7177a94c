//! `meshbypass-node run`, the DaemonSet's main process:
//!
//! 1. SIGTERM/SIGINT are blocked and read from a signalfd (before any
//!    thread starts, so every thread inherits the mask);
//! 2. the HTTP listener is bound (`/readyz`, `/healthz`, `/metrics`);
//! 3. the shared loader loads or adopts the node's maps; the kernel
//!    selftest runs once per node (its verdict is kept in `mb_config`);
//! 4. then one loop: reconcile (binary, kubeconfig, conflist entry), wait
//!    for inotify events, a signal or the next GC tick; events are
//!    coalesced for up to [`SETTLE_MAX`] before reconciling;
//! 5. on a signal: not ready, our conflist entry out, then the binary and
//!    the kubeconfig; pins and per-pod links stay (running pods keep their
//!    bypass) unless `--cleanup`.

use std::{
    net::TcpListener,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use meshbypass_ebpf::{Node, abi::KERNEL_PROBED, loader};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        signal::{SigSet, Signal},
        signalfd::{SfdFlags, SignalFd},
    },
};
use serde_json::Value;

use crate::{
    confdir::Chained,
    gc,
    http::{self, Handler, Response},
    installer::{self, Installer, KubeSetup},
    kubeconfig::{ApiServer, ServiceAccount},
    metrics::{self, Stats},
    watch::Watcher,
};

/// Retry soon after a failed reconcile (a half-written file, a busy dir).
const RETRY: Duration = Duration::from_secs(1);
/// Coalescing window for bursts of events (an owner writing several files).
const SETTLE: Duration = Duration::from_millis(40);
const SETTLE_MAX: Duration = Duration::from_millis(250);

/// Everything `run` is told on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    pub bpf_root: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub plugin_binary: Option<PathBuf>,
    pub plugin_config: Option<PathBuf>,
    pub listen: String,
    pub state_dir: PathBuf,
    pub gc_interval: Duration,
    pub cleanup: bool,
    pub selftest: bool,
    pub kubeconfig_out: PathBuf,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
}

type SharedNode = Arc<Mutex<Option<Node>>>;

/// The plugin binary shipped beside this executable (the image has both).
pub fn default_plugin_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    Ok(exe.with_file_name(crate::conflist::PLUGIN_TYPE))
}

pub fn run(opts: &RunOptions) -> anyhow::Result<()> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block().context("blocking SIGTERM/SIGINT")?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("creating a signalfd")?;

    let stats = Arc::new(Stats::default());
    let node: SharedNode = Arc::new(Mutex::new(None));
    let listener =
        TcpListener::bind(&opts.listen).with_context(|| format!("listening on {}", opts.listen))?;
    let addr = listener.local_addr().context("reading the listen address")?;
    http::spawn(listener, handler(stats.clone(), node.clone())).context("starting the HTTP server")?;
    log::info!("serving /readyz and /metrics on {addr}");

    load(opts, &node, &stats)?;

    let plugin_binary = match &opts.plugin_binary {
        Some(p) => p.clone(),
        None => default_plugin_binary()?,
    };
    let kube = kube_setup(opts);
    let mut watched = vec![opts.cni_conf_dir.clone(), opts.cni_bin_dir.clone()];
    if let Some(k) = &kube {
        log::info!("in a cluster: the plugin kubeconfig goes to {}", k.out.display());
        watched.extend(k.account.token_file.parent().map(Path::to_path_buf));
    }
    if let Some(settings) = &opts.plugin_config {
        watched.extend(settings.parent().map(Path::to_path_buf));
    }
    let entry = settings_entry(opts).context("reading the plugin settings")?;
    let mut installer = Installer::new(
        &opts.cni_bin_dir,
        &opts.cni_conf_dir,
        &plugin_binary,
        entry,
        kube,
        stats.clone(),
    )?;
    let watcher = Watcher::new(watched)?;

    let outcome = serve(opts, &mut installer, &watcher, &signals, &node, &stats);
    stats.installed.store(false, Ordering::Relaxed);
    let signal = outcome?;
    log::info!("{signal}: removing the conflist entry, then the binary");
    let removed = installer.uninstall().context("uninstalling")?;
    log::info!("removed {removed:?}");
    if opts.cleanup {
        drop(node.lock().unwrap_or_else(|p| p.into_inner()).take());
        stats.loaded.store(false, Ordering::Relaxed);
        let report = loader::unload(&opts.bpf_root)
            .with_context(|| format!("unloading {}", opts.bpf_root.display()))?;
        log::info!(
            "--cleanup: removed {} pins and {} pod links",
            report.pins,
            report.links
        );
    }
    Ok(())
}

fn load(opts: &RunOptions, node: &SharedNode, stats: &Stats) -> anyhow::Result<()> {
    let (mut loaded, outcome) = loader::load(&opts.bpf_root)
        .with_context(|| format!("loading the node's maps at {}", opts.bpf_root.display()))?;
    log::info!("bpf root {}: {outcome:?}", opts.bpf_root.display());
    let cfg = loaded.config().context("reading mb_config")?;
    if opts.selftest && cfg.kernel_flags & KERNEL_PROBED == 0 {
        let report = crate::cmd::run_selftest()?;
        loaded
            .record_verdict(&report)
            .context("recording the selftest verdict")?;
        log::info!(
            "selftest: safe_all={} safe_member={}",
            report.safe_all,
            report.safe_member
        );
    }
    *node.lock().unwrap_or_else(|p| p.into_inner()) = Some(loaded);
    stats.loaded.store(true, Ordering::Relaxed);
    Ok(())
}

fn kube_setup(opts: &RunOptions) -> Option<KubeSetup> {
    let account = ServiceAccount {
        token_file: opts.token_file.clone(),
        ca_file: opts.ca_file.clone(),
    };
    let server = ApiServer::from_env(|k| std::env::var(k).ok())?;
    account.present().then(|| KubeSetup {
        account,
        server,
        out: opts.kubeconfig_out.clone(),
    })
}

fn settings_entry(opts: &RunOptions) -> Result<Value, installer::InstallError> {
    installer::entry(
        opts.plugin_config.as_deref(),
        &opts.bpf_root,
        Some(&opts.state_dir),
    )
}

fn handler(stats: Arc<Stats>, node: SharedNode) -> Handler {
    Arc::new(move |path| match path {
        "/readyz" => {
            if stats.ready() {
                Response::text(200, "ready\n")
            } else if !stats.loaded.load(Ordering::Relaxed) {
                Response::text(503, "not ready: maps not loaded\n")
            } else {
                Response::text(503, "not ready: plugin not installed or not chained yet\n")
            }
        }
        "/healthz" | "/livez" => Response::text(200, "ok\n"),
        "/metrics" => {
            let guard = node.lock().unwrap_or_else(|p| p.into_inner());
            Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: metrics::render(&stats, guard.as_ref()),
            }
        }
        _ => Response::text(404, "not found: try /readyz or /metrics\n"),
    })
}

/// The loop; returns the signal that ended it.
fn serve(
    opts: &RunOptions,
    installer: &mut Installer,
    watcher: &Watcher,
    signals: &SignalFd,
    node: &SharedNode,
    stats: &Stats,
) -> anyhow::Result<Signal> {
    let mut next_gc = Instant::now() + opts.gc_interval;
    let mut retry_at = None;
    let mut waiting_logged = false;
    let mut dirty = true;
    loop {
        if dirty {
            dirty = false;
            retry_at = None;
            if !reconcile(opts, installer, watcher, stats, &mut waiting_logged) {
                retry_at = Some(Instant::now() + RETRY);
            }
        }
        let now = Instant::now();
        if now >= next_gc {
            collect_garbage(&opts.state_dir, node, stats);
            next_gc = now + opts.gc_interval;
            dirty = true; // also a periodic resync, should an event be lost
            continue;
        }
        let wake = retry_at.map_or(next_gc, |r| r.min(next_gc));
        let timeout = wake.saturating_duration_since(now);
        let (sig, ev) = wait(signals, watcher, timeout)?;
        if sig && let Some(info) = signals.read_signal().context("reading the signalfd")? {
            return Ok(Signal::try_from(info.ssi_signo as i32).unwrap_or(Signal::SIGTERM));
        }
        if ev {
            settle(signals, watcher)?;
            dirty = true;
        }
        if retry_at.is_some_and(|r| Instant::now() >= r) {
            dirty = true;
        }
    }
}

/// Polls the signalfd and the inotify fd: (signal readable, events readable).
fn wait(signals: &SignalFd, watcher: &Watcher, timeout: Duration) -> anyhow::Result<(bool, bool)> {
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [
        PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        PollFd::new(watcher.fd(), PollFlags::POLLIN),
    ];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => return Ok((false, false)),
        Err(e) => return Err(e).context("poll"),
    }
    let ready = |fd: &PollFd| fd.revents().is_some_and(|r| r.intersects(PollFlags::POLLIN));
    Ok((ready(&fds[0]), ready(&fds[1])))
}

/// Drains events until the directory has been quiet for [`SETTLE`] (at most
/// [`SETTLE_MAX`]), or a signal arrives.
fn settle(signals: &SignalFd, watcher: &Watcher) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_MAX;
    watcher.drain()?;
    while Instant::now() < deadline {
        let (sig, ev) = wait(
            signals,
            watcher,
            SETTLE.min(deadline.saturating_duration_since(Instant::now())),
        )?;
        if sig || !ev {
            break;
        }
        watcher.drain()?;
    }
    Ok(())
}

/// One pass; `false` when it failed (retried after [`RETRY`]).
fn reconcile(
    opts: &RunOptions,
    installer: &mut Installer,
    watcher: &Watcher,
    stats: &Stats,
    waiting_logged: &mut bool,
) -> bool {
    match settings_entry(opts) {
        Ok(entry) => installer.set_entry(entry),
        Err(e) => log::warn!("{e}; keeping the previous settings"),
    }
    let result = installer.reconcile();
    // The dirs exist now (reconcile makes them): watch them.
    watcher.ensure();
    match result {
        Ok(r) => {
            stats.installed.store(r.installed(), Ordering::Relaxed);
            if r.chained == Chained::NoPrimary {
                if !*waiting_logged {
                    log::info!(
                        "no CNI network config in {} yet: waiting for the primary CNI",
                        installer.conf_dir().display()
                    );
                    *waiting_logged = true;
                }
            } else {
                *waiting_logged = false;
            }
            true
        }
        Err(e) => {
            stats.installed.store(installer.is_installed(), Ordering::Relaxed);
            stats.reconcile_errors.fetch_add(1, Ordering::Relaxed);
            log::warn!("{}", crate::cmd::chain(&e));
            false
        }
    }
}

fn collect_garbage(state_dir: &Path, node: &SharedNode, stats: &Stats) {
    let mut guard = node.lock().unwrap_or_else(|p| p.into_inner());
    let Some(node) = guard.as_mut() else { return };
    stats.gc_runs.fetch_add(1, Ordering::Relaxed);
    match gc::collect(state_dir, node) {
        Ok(report) => {
            if !report.removed.is_empty() {
                log::info!("gc: removed the state of {:?} (netns gone)", report.removed);
            }
            stats
                .gc_removed
                .fetch_add(report.removed.len() as u64, Ordering::Relaxed);
            stats.gc_errors.fetch_add(report.errors as u64, Ordering::Relaxed);
        }
        Err(e) => {
            stats.gc_errors.fetch_add(1, Ordering::Relaxed);
            log::warn!("{}", crate::cmd::chain(&e));
        }
    }
}
