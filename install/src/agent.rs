//! `meshbypass-node run`, the DaemonSet's main process:
//!
//! 1. SIGTERM/SIGINT are blocked and read from a signalfd (before any
//!    thread starts, so every thread inherits the mask);
//! 2. the HTTP listener is bound (`/readyz`, `/healthz`, `/metrics`), and
//!    the plugin's decision log is followed (each ADD and DEL re-emitted on
//!    stdout and counted);
//! 3. the shared loader loads or adopts the node's maps; the kernel
//!    selftest runs once per node (its verdict is kept in `mb_config`).
//!    A failed load does not stop the agent: the plugin is installed
//!    anyway (pods get their redirect; the plugin skips the bypass and says
//!    so in its log), `/readyz` and the metrics name the error, and the load
//!    is retried every [`LOAD_RETRY`];
//! 4. then one loop: reconcile (settings checked by the plugin's own parser,
//!    binary, kubeconfig, conflist entry), wait for inotify events, a signal
//!    or the next GC tick; events are coalesced for up to [`SETTLE_MAX`]
//!    before reconciling. A settings file the parser refuses leaves the
//!    last good entry in the conflist;
//! 5. on a signal: not ready; then the plugin stays where it is, unless the
//!    DaemonSet is being deleted (`removal.rs`): then our conflist entry
//!    goes, then the binary and the kubeconfig. Pins and per-pod links stay
//!    (running pods keep their bypass) unless `--cleanup`.

use std::{
    net::TcpListener,
    os::fd::AsFd,
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use meshbypass_ebpf::chain::error_chain;
use meshbypass_ebpf::{
    NodeMaps,
    abi::KERNEL_PROBED,
    loader::{self, LoadError},
    maps::OpenError,
};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        signal::{SigSet, Signal},
        signalfd::{SfdFlags, SignalFd},
    },
};
use serde_json::Value;

use crate::{
    cli::{LogFormat, RunOptions},
    confdir::Chained,
    decisions, gc,
    http::{self, Handler, Response, Route},
    installer::{self, InstallError, Installer, KubeSetup},
    kubeconfig::{ApiServer, ServiceAccount},
    metrics::{self, Problem, Snapshot, Stats},
    removal::{self, DaemonSetRef, Verdict},
    watch::Watcher,
};

/// Retry soon after a failed reconcile (a half-written file, a busy dir).
const RETRY: Duration = Duration::from_secs(1);
/// Retry a failed load of the node's maps (someone may unload a foreign
/// layout, or mount bpffs) this often.
pub const LOAD_RETRY: Duration = Duration::from_secs(5);
/// Coalescing window for bursts of events (an owner writing several files).
const SETTLE: Duration = Duration::from_millis(40);
const SETTLE_MAX: Duration = Duration::from_millis(250);
/// How long the shutdown may spend asking whether the DaemonSet is being
/// deleted (the manifest's grace period is 30 s).
const REMOVAL_BUDGET: Duration = Duration::from_secs(5);

type SharedNode = Arc<Mutex<Option<NodeMaps>>>;

pub fn run(root: &Path, opts: &RunOptions, log_format: LogFormat) -> anyhow::Result<()> {
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
    decisions::spawn(&opts.state_dir, log_format, stats.clone())
        .context("following the plugin's decision log")?;

    // The maps load on a thread of their own: a load can wait on another
    // loader's lock, or run the selftest (seconds), and installing the
    // plugin must wait for neither (a pod ADDed meanwhile gets its redirect
    // and, the plugin loading the maps itself, its bypass).
    spawn_loader(root, opts, &node, &stats).context("starting the loader thread")?;

    let plugin_binary = match &opts.paths.plugin_binary {
        Some(p) => p.clone(),
        None => installer::default_plugin_binary().context("locating this executable")?,
    };
    let kube = kube_setup(opts);
    let daemonset = kube.as_ref().and_then(|k| {
        let ns = removal::own_namespace(&k.account.token_file);
        if ns.is_none() {
            log::warn!(
                "no namespace beside {}: a SIGTERM will never be taken for the DaemonSet's removal",
                k.account.token_file.display()
            );
        }
        ns.map(|namespace| DaemonSetRef {
            namespace,
            name: opts.daemonset.clone(),
        })
    });
    let dirs = &opts.paths.dirs;
    let mut watched = vec![dirs.cni_conf_dir.clone(), dirs.cni_bin_dir.clone()];
    if let Some(k) = &kube {
        log::info!("in a cluster: the plugin kubeconfig goes to {}", k.out.display());
        watched.extend(k.account.token_file.parent().map(Path::to_path_buf));
    }
    if let Some(settings) = &opts.paths.plugin_config {
        watched.extend(settings.parent().map(Path::to_path_buf));
    }
    let mut installer = Installer::new(
        &dirs.cni_bin_dir,
        &dirs.cni_conf_dir,
        &plugin_binary,
        None,
        kube,
        stats.clone(),
    )?;
    let watcher = Watcher::new(watched)?;

    let outcome = serve(root, opts, &mut installer, &watcher, &signals, &node, &stats);
    stats.installed.store(false, Ordering::Relaxed);
    let signal = outcome?;
    match removal::verdict(installer.kube(), daemonset.as_ref(), REMOVAL_BUDGET) {
        Verdict::Keep { why } => {
            log::info!("{signal}: {why}");
            return Ok(());
        }
        Verdict::Remove { why } => {
            log::info!("{signal}: {why}: removing the conflist entry, then the binary");
        }
    }
    let removed = installer.uninstall().context("uninstalling")?;
    log::info!("removed {removed:?}");
    if opts.cleanup {
        drop(node.lock().unwrap_or_else(|p| p.into_inner()).take());
        stats.loaded.store(false, Ordering::Relaxed);
        let report = loader::unload(root).with_context(|| format!("unloading {}", root.display()))?;
        log::info!(
            "--cleanup: removed {} pins and {} pod links",
            report.pins,
            report.links
        );
    }
    Ok(())
}

/// A fixed name for why the maps could not be loaded (a metric label).
fn load_reason(e: &LoadError) -> &'static str {
    match e {
        LoadError::Bpffs(_) => "bpffs",
        LoadError::Open(OpenError::LayoutMismatch { .. }) => "layout-mismatch",
        LoadError::Open(OpenError::Incomplete { .. }) => "incomplete-pins",
        LoadError::Open(_) | LoadError::Pin { .. } | LoadError::Rename { .. } | LoadError::Remove { .. } => {
            "pins"
        }
        LoadError::Ebpf(_) | LoadError::Program { .. } | LoadError::AttachSkMsg { .. } => "kernel-refused",
        LoadError::Missing(_) => "object",
    }
}

/// Loads the node's maps, every [`LOAD_RETRY`] until it works.
fn spawn_loader(
    root: &Path,
    opts: &RunOptions,
    node: &SharedNode,
    stats: &Arc<Stats>,
) -> std::io::Result<()> {
    let (root, opts, node, stats) = (root.to_owned(), opts.clone(), node.clone(), stats.clone());
    std::thread::Builder::new()
        .name("loader".into())
        .spawn(move || {
            while !load(&root, &opts, &node, &stats) {
                std::thread::sleep(LOAD_RETRY);
            }
        })
        .map(drop)
}

/// Loads or adopts the node's maps; on failure records why (the plugin is
/// installed all the same). Returns whether the maps are loaded.
fn load(root: &Path, opts: &RunOptions, node: &SharedNode, stats: &Stats) -> bool {
    let mut loaded = match loader::load_with(root, &opts.sizes.load_options()) {
        Ok((loaded, outcome)) => {
            log::info!("bpf root {}: {outcome:?}", root.display());
            loaded
        }
        Err(e) => {
            stats.load_failures.fetch_add(1, Ordering::Relaxed);
            let message = format!(
                "the node's maps cannot be loaded at {}: {}; the plugin is installed anyway \
                 (pods get their redirect, not the bypass); retrying every {} s",
                root.display(),
                error_chain(&e),
                LOAD_RETRY.as_secs()
            );
            // Said once per distinct error, not at every retry.
            if stats.load_problem().is_none_or(|p| p.message != message) {
                log::error!("{message}");
            }
            stats.set_load_problem(Some(Problem {
                reason: load_reason(&e),
                message,
            }));
            return false;
        }
    };
    match loaded.config() {
        Ok(cfg) if opts.selftest.wanted() && cfg.kernel_flags & KERNEL_PROBED == 0 => {
            match crate::kernel::run_selftest() {
                Ok(report) => match loaded.record_verdict(&report) {
                    Ok(()) => log::info!(
                        "selftest: safe_all={} safe_member={}",
                        report.safe_all,
                        report.safe_member
                    ),
                    Err(e) => log::warn!("cannot record the selftest verdict: {e}"),
                },
                // `auto` stays proxy-only without a verdict: the safe side.
                Err(e) => log::warn!("selftest: {e:#}; `auto` means proxy-only until it passes"),
            }
        }
        Ok(_) => {}
        Err(e) => log::warn!("cannot read mb_config: {e}"),
    }
    if stats.load_problem().is_some() {
        log::info!(
            "the node's maps are loaded at {} now: the bypass is on",
            root.display()
        );
    }
    *node.lock().unwrap_or_else(|p| p.into_inner()) = Some(loaded);
    stats.set_load_problem(None);
    stats.loaded.store(true, Ordering::Relaxed);
    true
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

fn settings_entry(root: &Path, opts: &RunOptions) -> Result<Value, InstallError> {
    installer::entry(opts.paths.plugin_config.as_deref(), root, Some(&opts.state_dir))
}

/// The probes answer at once (no lock but the small ones of [`Stats`]); a
/// scrape reads the maps under the node lock (one walk of each map, so
/// O(entries) whatever the number of pods), on a thread of its own.
fn handler(stats: Arc<Stats>, node: SharedNode) -> Handler {
    Arc::new(move |path| match path {
        "/readyz" => Route::Now(match stats.readiness() {
            Ok(()) => Response::text(200, "ready\n"),
            Err(why) => Response::text(503, format!("not ready:\n{why}\n")),
        }),
        "/healthz" | "/livez" => Route::Now(Response::text(200, "ok\n")),
        "/metrics" => {
            let (stats, node) = (stats.clone(), node.clone());
            Route::Later(Box::new(move || {
                // The lock is held for one walk of each map, not for writing.
                let snapshot = node
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map(Snapshot::read);
                Response {
                    status: 200,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: metrics::render(&stats, snapshot.as_ref()),
                }
            }))
        }
        _ => Route::Now(Response::text(404, "not found: try /readyz or /metrics\n")),
    })
}

/// The loop; returns the signal that ended it.
fn serve(
    root: &Path,
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
            if !reconcile(root, opts, installer, watcher, stats, &mut waiting_logged) {
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

/// Reads the settings through the plugin's parser; a refused file keeps the
/// entry we have (or, at startup, the one an earlier run chained).
fn update_settings(root: &Path, opts: &RunOptions, installer: &mut Installer, stats: &Stats) {
    let err = match settings_entry(root, opts) {
        Ok(entry) => {
            if let Some(p) = stats.settings_problem() {
                log::info!("the plugin settings are valid again (were: {})", p.reason);
            }
            stats.set_settings_problem(None);
            if let Err(e) = installer.remember_entry(&entry) {
                log::warn!(
                    "cannot keep the valid settings for a restart: {}",
                    error_chain(&e)
                );
            }
            installer.set_entry(entry);
            return;
        }
        Err(e) => e,
    };
    if !installer.has_entry() {
        // At startup: the entry an earlier run chained, else the last valid
        // settings it kept (the primary CNI may have rewritten its conflist
        // without our entry meanwhile, at a reboot).
        let earlier = match installer.chained_entry() {
            Ok(Some(entry)) => Some(("an earlier run chained", entry)),
            Ok(None) => None,
            Err(e) => {
                log::warn!("reading our chained entry: {}", error_chain(&e));
                None
            }
        }
        .or_else(|| installer.remembered_entry().map(|e| ("an earlier run kept", e)));
        if let Some((whose, entry)) = earlier {
            log::info!("keeping the entry {whose}: {entry}");
            installer.set_entry(entry);
        }
    }
    let keeping = if installer.has_entry() {
        "the conflist keeps the last good entry"
    } else {
        "nothing is chained until they are valid"
    };
    let message = format!("{}; {keeping}", error_chain(&err));
    if stats.settings_problem().is_none_or(|p| p.message != message) {
        stats.settings_rejections.fetch_add(1, Ordering::Relaxed);
        log::error!("{message}");
    }
    stats.set_settings_problem(Some(Problem {
        reason: err.settings_reason().unwrap_or("invalid-value"),
        message,
    }));
}

/// One pass; `false` when it failed (retried after [`RETRY`]).
fn reconcile(
    root: &Path,
    opts: &RunOptions,
    installer: &mut Installer,
    watcher: &Watcher,
    stats: &Stats,
    waiting_logged: &mut bool,
) -> bool {
    update_settings(root, opts, installer, stats);
    let result = installer.reconcile();
    // The dirs exist now (reconcile makes them): watch them.
    watcher.ensure();
    match result {
        Ok(r) => {
            stats.installed.store(r.installed(), Ordering::Relaxed);
            let waiting = match r.chained {
                Chained::NoPrimary => Some(format!(
                    "no CNI network config in {} yet: waiting for the primary CNI",
                    installer.conf_dir().display()
                )),
                Chained::NoSettings => Some("no valid plugin settings yet: nothing chained".to_owned()),
                Chained::Unchanged { .. } | Chained::Written { .. } => None,
            };
            match &waiting {
                Some(w) if !*waiting_logged => {
                    log::info!("{w}");
                    *waiting_logged = true;
                }
                Some(_) => {}
                None => *waiting_logged = false,
            }
            stats.set_waiting(waiting);
            stats.set_install_failure(None);
            true
        }
        Err(e) => {
            stats.installed.store(installer.is_installed(), Ordering::Relaxed);
            stats.reconcile_errors.fetch_add(1, Ordering::Relaxed);
            let why = error_chain(&e);
            log::warn!("{why}");
            stats.set_install_failure(Some(why));
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
            log::warn!("{}", error_chain(&e));
        }
    }
}
