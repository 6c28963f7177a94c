//! The agent's own tallies and the Prometheus text exposition (format
//! 0.0.4) of them plus the node's datapath state.

use std::{
    fmt::Write,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use meshbypass_ebpf::{NodeMaps, abi::KERNEL_PROBED, selftest::HAZARDS};

/// What the installer writes on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Artifact {
    Binary = 0,
    Conflist = 1,
    Kubeconfig = 2,
}

impl Artifact {
    pub const ALL: [Artifact; 3] = [Self::Binary, Self::Conflist, Self::Kubeconfig];

    pub fn name(self) -> &'static str {
        match self {
            Self::Binary => "binary",
            Self::Conflist => "conflist",
            Self::Kubeconfig => "kubeconfig",
        }
    }
}

/// Something that keeps the agent from being ready: a fixed `reason` (a
/// metric label) and the full message (for `/readyz` and the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// Shared between the agent's loop and the HTTP thread.
#[derive(Debug, Default)]
pub struct Stats {
    /// Writes of each artifact: the first in this process is an install,
    /// every later one a repair (someone removed or changed it).
    writes: [AtomicU64; 3],
    pub loaded: AtomicBool,
    pub installed: AtomicBool,
    pub reconcile_errors: AtomicU64,
    pub gc_runs: AtomicU64,
    pub gc_removed: AtomicU64,
    pub gc_errors: AtomicU64,
    /// Failed attempts to load the node's maps.
    pub load_failures: AtomicU64,
    /// Settings refused (each distinct bad edit once).
    pub settings_rejections: AtomicU64,
    /// Why the maps are not loaded (the last attempt's error).
    load_problem: Mutex<Option<Problem>>,
    /// Why the current settings file is not what the conflist carries.
    settings_problem: Mutex<Option<Problem>>,
    /// No primary CNI config yet, or no valid settings to chain.
    waiting: Mutex<Option<String>>,
}

fn get(m: &Mutex<Option<Problem>>) -> Option<Problem> {
    m.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn set(m: &Mutex<Option<Problem>>, v: Option<Problem>) {
    *m.lock().unwrap_or_else(|p| p.into_inner()) = v;
}

impl Stats {
    pub fn load_problem(&self) -> Option<Problem> {
        get(&self.load_problem)
    }

    pub fn set_load_problem(&self, p: Option<Problem>) {
        set(&self.load_problem, p);
    }

    pub fn settings_problem(&self) -> Option<Problem> {
        get(&self.settings_problem)
    }

    pub fn set_settings_problem(&self, p: Option<Problem>) {
        set(&self.settings_problem, p);
    }

    pub fn set_waiting(&self, why: Option<String>) {
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// `Ok` when ready, else every reason, one per line (the `/readyz` body).
    pub fn readiness(&self) -> Result<(), String> {
        let mut why = Vec::new();
        if !self.installed.load(Ordering::Relaxed) {
            let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).clone();
            why.push(waiting.unwrap_or_else(|| "the plugin is not installed or not chained yet".into()));
        }
        if let Some(p) = self.settings_problem() {
            why.push(p.message);
        }
        if let Some(p) = self.load_problem() {
            why.push(p.message);
        } else if !self.loaded.load(Ordering::Relaxed) {
            why.push("the node's maps are not loaded yet".into());
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("\n"))
        }
    }

    pub fn wrote(&self, what: Artifact) {
        self.writes[what as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn installs(&self, what: Artifact) -> u64 {
        self.writes[what as usize].load(Ordering::Relaxed).min(1)
    }

    pub fn repairs(&self, what: Artifact) -> u64 {
        self.writes[what as usize]
            .load(Ordering::Relaxed)
            .saturating_sub(1)
    }

    /// Ready: maps loaded, the plugin installed and chained with the
    /// current settings.
    pub fn ready(&self) -> bool {
        self.readiness().is_ok()
    }
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        writeln!(self.0, "# HELP {name} {help}").expect("writing to a String");
        writeln!(self.0, "# TYPE {name} {kind}").expect("writing to a String");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                // Label values here are our own identifiers: no escaping needed.
                write!(self.0, "{k}=\"{v}\"").expect("writing to a String");
            }
            self.0.push('}');
        }
        writeln!(self.0, " {value}").expect("writing to a String");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// The `/metrics` body. `node` is `None` when the maps are not loaded (or
/// could not be read: then only the agent's own tallies are shown).
pub fn render(stats: &Stats, node: Option<&NodeMaps>) -> String {
    let mut out = Out(String::new());
    out.single(
        "meshbypass_ready",
        "gauge",
        "1 when the maps are loaded and the plugin is installed and chained with the current settings.",
        u64::from(stats.ready()),
    );
    out.single(
        "meshbypass_installed",
        "gauge",
        "1 when the plugin binary is in place and chained into the primary conflist (pods get their redirect).",
        u64::from(stats.installed.load(Ordering::Relaxed)),
    );
    out.single(
        "meshbypass_loaded",
        "gauge",
        "1 when the node's maps and programs are loaded (0: pods get their redirect, not the bypass).",
        u64::from(node.is_some() && stats.loaded.load(Ordering::Relaxed)),
    );
    out.family(
        "meshbypass_load_error",
        "gauge",
        "1, labelled with the reason, while the node's maps cannot be loaded (the agent's log and /readyz say more).",
    );
    if let Some(p) = stats.load_problem() {
        out.sample("meshbypass_load_error", &[("reason", p.reason)], 1);
    }
    out.single(
        "meshbypass_load_failures_total",
        "counter",
        "Failed attempts to load the node's maps (retried every few seconds).",
        stats.load_failures.load(Ordering::Relaxed),
    );
    out.single(
        "meshbypass_settings_valid",
        "gauge",
        "1 when the plugin settings file passes the plugin's own parser and is what the conflist carries.",
        u64::from(stats.settings_problem().is_none()),
    );
    out.family(
        "meshbypass_settings_error",
        "gauge",
        "1, labelled with the reason, while the settings file is refused (the conflist keeps the last good entry).",
    );
    if let Some(p) = stats.settings_problem() {
        out.sample("meshbypass_settings_error", &[("reason", p.reason)], 1);
    }
    out.single(
        "meshbypass_settings_rejected_total",
        "counter",
        "Settings files refused by the plugin's parser (each bad edit once).",
        stats.settings_rejections.load(Ordering::Relaxed),
    );
    out.family(
        "meshbypass_installs_total",
        "counter",
        "First writes of each artifact by this agent process.",
    );
    for a in Artifact::ALL {
        out.sample(
            "meshbypass_installs_total",
            &[("artifact", a.name())],
            stats.installs(a),
        );
    }
    out.family(
        "meshbypass_repairs_total",
        "counter",
        "Rewrites of an artifact that someone removed or changed (e.g. the primary CNI rewrote its conflist).",
    );
    for a in Artifact::ALL {
        out.sample(
            "meshbypass_repairs_total",
            &[("artifact", a.name())],
            stats.repairs(a),
        );
    }
    out.single(
        "meshbypass_reconcile_errors_total",
        "counter",
        "Failed attempts to install or repair (see the agent's log).",
        stats.reconcile_errors.load(Ordering::Relaxed),
    );
    out.single(
        "meshbypass_gc_runs_total",
        "counter",
        "Garbage collections of pod state.",
        stats.gc_runs.load(Ordering::Relaxed),
    );
    out.single(
        "meshbypass_gc_removed_total",
        "counter",
        "Pod state records removed because their network namespace was gone.",
        stats.gc_removed.load(Ordering::Relaxed),
    );
    out.single(
        "meshbypass_gc_errors_total",
        "counter",
        "Pod state records the garbage collection could not remove.",
        stats.gc_errors.load(Ordering::Relaxed),
    );
    let Some(node) = node else {
        return out.0;
    };
    out.single(
        "meshbypass_pods",
        "gauge",
        "Pods registered in the node's maps.",
        node.pods().len() as u64,
    );
    out.single(
        "meshbypass_links",
        "gauge",
        "Pod cgroup attachments (pinned links).",
        node.links().len() as u64,
    );
    match node.config() {
        Ok(cfg) => {
            out.single(
                "meshbypass_kernel_probed",
                "gauge",
                "1 when the kernel selftest verdict is recorded.",
                u64::from(cfg.kernel_flags & KERNEL_PROBED != 0),
            );
            out.family(
                "meshbypass_kernel_hazard",
                "gauge",
                "1 when the selftest found this hazard on the running kernel.",
            );
            for hazard in &HAZARDS {
                out.sample(
                    "meshbypass_kernel_hazard",
                    &[("probe", hazard.probe)],
                    u64::from(cfg.kernel_flags & hazard.bit != 0),
                );
            }
        }
        Err(e) => log::warn!("metrics: cannot read mb_config: {e}"),
    }
    match node.counters() {
        Ok(counters) => {
            for (name, value) in &counters.0 {
                let metric = format!("meshbypass_datapath_{name}_total");
                out.single(
                    &metric,
                    "counter",
                    &format!("Datapath counter {name} (summed over CPUs)."),
                    *value,
                );
            }
        }
        Err(e) => log::warn!("metrics: cannot read the counters: {e}"),
    }
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_write_is_an_install_later_ones_repairs() {
        let s = Stats::default();
        assert_eq!(
            (s.installs(Artifact::Conflist), s.repairs(Artifact::Conflist)),
            (0, 0)
        );
        s.wrote(Artifact::Conflist);
        assert_eq!(
            (s.installs(Artifact::Conflist), s.repairs(Artifact::Conflist)),
            (1, 0)
        );
        s.wrote(Artifact::Conflist);
        s.wrote(Artifact::Conflist);
        assert_eq!(
            (s.installs(Artifact::Conflist), s.repairs(Artifact::Conflist)),
            (1, 2)
        );
        assert_eq!(s.installs(Artifact::Binary), 0);
    }

    #[test]
    fn exposition_without_maps_is_well_formed() {
        let s = Stats::default();
        s.wrote(Artifact::Binary);
        let text = render(&s, None);
        assert!(text.contains("meshbypass_ready 0\n"), "{text}");
        assert!(
            text.contains("meshbypass_installs_total{artifact=\"binary\"} 1\n"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            assert!(name.starts_with("meshbypass_"), "unprefixed metric {line:?}");
            value
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
        }
    }

    #[test]
    fn readiness_names_every_problem_and_metrics_label_them() {
        let s = Stats::default();
        s.installed.store(true, Ordering::Relaxed);
        s.loaded.store(true, Ordering::Relaxed);
        assert_eq!(s.readiness(), Ok(()));
        s.set_settings_problem(Some(Problem {
            reason: "unknown-key",
            message: "unknown key `x`".into(),
        }));
        s.set_load_problem(Some(Problem {
            reason: "layout-mismatch",
            message: "layout version 99".into(),
        }));
        s.loaded.store(false, Ordering::Relaxed);
        assert_eq!(
            s.readiness(),
            Err("unknown key `x`\nlayout version 99".to_owned())
        );
        let text = render(&s, None);
        for line in [
            "meshbypass_ready 0\n",
            "meshbypass_installed 1\n",
            "meshbypass_loaded 0\n",
            "meshbypass_settings_valid 0\n",
            "meshbypass_settings_error{reason=\"unknown-key\"} 1\n",
            "meshbypass_load_error{reason=\"layout-mismatch\"} 1\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        s.set_settings_problem(None);
        s.set_load_problem(None);
        s.loaded.store(true, Ordering::Relaxed);
        let text = render(&s, None);
        assert!(!text.contains("_error{"), "{text}");
    }
}
