//! The agent's own tallies, the plugin's requests (from its decision log)
//! and the Prometheus text exposition (format 0.0.4) of them plus the
//! node's datapath state: labelled families (`path`, `kind`, `reason`,
//! `map`, `command`, `decision`), build info, map usage, a latency
//! histogram. Written by hand: a few dozen lines, where a metrics crate
//! would mean re-registering every series from the maps at each scrape.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use meshbypass_cni::journal::{Decision, Entry};
use meshbypass_ebpf::{
    Counter, NodeMaps,
    abi::{Config, KERNEL_PROBED, LAYOUT_VERSION},
    chain::error_chain,
    counters::Counters,
    selftest::HAZARDS,
    usage::MapUsage,
};

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
    /// Why the last install pass failed (retried every second), if it did.
    install_failure: Mutex<Option<String>>,
    /// The plugin's requests, from its decision log.
    cni: Mutex<CniTally>,
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

    /// Counts one line of the plugin's decision log.
    pub fn record_cni(&self, e: &Entry) {
        self.cni.lock().unwrap_or_else(|p| p.into_inner()).record(e);
    }

    pub fn cni(&self) -> CniTally {
        self.cni.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_waiting(&self, why: Option<String>) {
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    pub fn set_install_failure(&self, why: Option<String>) {
        *self.install_failure.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// `Ok` when ready, else every reason, one per line (the `/readyz` body).
    pub fn readiness(&self) -> Result<(), String> {
        let mut why = Vec::new();
        if !self.installed.load(Ordering::Relaxed) {
            let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).clone();
            why.push(waiting.unwrap_or_else(|| "the plugin is not installed or not chained yet".into()));
        }
        if let Some(failure) = self
            .install_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            why.push(failure);
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

/// Latency buckets of the CNI request histogram, in seconds (Prometheus'
/// defaults: an ADD takes ~20 ms, one that waits for the API server up to
/// its `timeoutSeconds`).
pub const LATENCY_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A Prometheus histogram: cumulative counts per upper bound, sum, count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations at or under each of [`LATENCY_BUCKETS`] (not cumulative).
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, value: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|le| value <= *le) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += value;
    }
}

/// The plugin's requests as its decision log tells them.
#[derive(Debug, Clone, Default)]
pub struct CniTally {
    /// (command, decision) -> requests.
    requests: BTreeMap<(String, Decision), u64>,
    /// command -> latency.
    latency: BTreeMap<String, Histogram>,
}

/// The commands the decision log has; each starts at 0 in the exposition.
const CNI_COMMANDS: [&str; 2] = ["ADD", "DEL"];

impl CniTally {
    pub fn record(&mut self, e: &Entry) {
        *self.requests.entry((e.command.clone(), e.decision)).or_default() += 1;
        self.latency
            .entry(e.command.clone())
            .or_default()
            .observe(e.duration_ms / 1e3);
    }
}

/// What a scrape reads from the node's maps, under the node lock, before
/// anything is written out: one walk of each map (O(entries)).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub links: usize,
    pub config: Option<Config>,
    pub counters: Option<Counters>,
    pub maps: Vec<MapUsage>,
}

impl Snapshot {
    pub fn read(node: &NodeMaps) -> Self {
        let config = node
            .config()
            .inspect_err(|e| log::warn!("metrics: cannot read mb_config: {e}"))
            .ok();
        let counters = node
            .counters()
            .inspect_err(|e| log::warn!("metrics: cannot read the counters: {e}"))
            .ok();
        let maps = node
            .map_usage()
            .inspect_err(|e| log::warn!("metrics: {}", error_chain(e)))
            .unwrap_or_default();
        Self {
            links: node.links().len(),
            config,
            counters,
            maps,
        }
    }
}

/// The Prometheus text exposition (format 0.0.4) being written.
struct Out(String);

/// A sample value: integers print exactly, floats as Rust prints them
/// (`0.25`, `3`, `NaN` never occurs).
enum Num {
    U(u64),
    F(f64),
}

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Num::U(v) => write!(f, "{v}"),
            Num::F(v) if v.is_infinite() => f.write_str(if *v > 0.0 { "+Inf" } else { "-Inf" }),
            Num::F(v) => write!(f, "{v}"),
        }
    }
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        writeln!(self.0, "# HELP {name} {help}").expect("writing to a String");
        writeln!(self.0, "# TYPE {name} {kind}").expect("writing to a String");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: Num) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                write!(self.0, "{k}=\"{v}\"").expect("writing to a String");
            }
            self.0.push('}');
        }
        writeln!(self.0, " {value}").expect("writing to a String");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], Num::U(value));
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (le, n) in LATENCY_BUCKETS.iter().zip(h.buckets) {
            cumulative += n;
            let le = le.to_string();
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, Num::U(cumulative));
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&bucket, &l, Num::U(h.count));
        self.sample(&format!("{name}_sum"), labels, Num::F(h.sum));
        self.sample(&format!("{name}_count"), labels, Num::U(h.count));
    }
}

/// The families the datapath counters are exposed in.
const DATAPATH_FAMILIES: [(&str, &str); 8] = [
    (
        "meshbypass_datapath_messages_total",
        "sendmsg calls of tracked sockets, by path: handed socket to socket (redirected) or left to the TCP stack (passthrough).",
    ),
    (
        "meshbypass_datapath_bytes_total",
        "Bytes of those sendmsg calls, by path.",
    ),
    (
        "meshbypass_datapath_pairs_total",
        "Connections whose two ends were paired, by kind: plain (reversed tuple) or nat (across an iptables REDIRECT).",
    ),
    (
        "meshbypass_datapath_fallbacks_total",
        "Times the datapath left a connection, a socket or a direction to the TCP stack, by reason: pair-refused (ambiguous or unexplained join), map-full, redirect-failed (peer gone), receiver-full (its redirect queue over the bound), stack-bytes (bytes went through TCP unseen), zerocopy (the sender uses SO_ZEROCOPY).",
    ),
    (
        "meshbypass_datapath_sockets_tracked_total",
        "Sockets put into the socket maps.",
    ),
    (
        "meshbypass_datapath_sticky_directions_total",
        "Directions of a connection sent to the TCP stack (for good, or until a full proxy receiver drained).",
    ),
    (
        "meshbypass_datapath_resumed_total",
        "Directions redirected again after a full proxy receiver drained.",
    ),
    (
        "meshbypass_datapath_adaptive_total",
        "App sockets the adaptive mode let into the maps (admitted: non-blocking) or took out again (evicted: turned blocking).",
    ),
];

/// Where each datapath counter goes: (family, label). Exhaustive: a new
/// counter does not build until it has a place.
fn datapath_series(c: Counter) -> (&'static str, Option<(&'static str, &'static str)>) {
    const MSGS: &str = DATAPATH_FAMILIES[0].0;
    const BYTES: &str = DATAPATH_FAMILIES[1].0;
    const PAIRS: &str = DATAPATH_FAMILIES[2].0;
    const FALLBACKS: &str = DATAPATH_FAMILIES[3].0;
    match c {
        Counter::RedirectedMsgs => (MSGS, Some(("path", "redirected"))),
        Counter::PassthroughMsgs => (MSGS, Some(("path", "passthrough"))),
        Counter::RedirectedBytes => (BYTES, Some(("path", "redirected"))),
        Counter::PassthroughBytes => (BYTES, Some(("path", "passthrough"))),
        Counter::PairsPlain => (PAIRS, Some(("kind", "plain"))),
        Counter::PairsNat => (PAIRS, Some(("kind", "nat"))),
        Counter::PairsRefused => (FALLBACKS, Some(("reason", "pair-refused"))),
        Counter::MapFull => (FALLBACKS, Some(("reason", "map-full"))),
        Counter::RedirectFailed => (FALLBACKS, Some(("reason", "redirect-failed"))),
        Counter::ReceiverFull => (FALLBACKS, Some(("reason", "receiver-full"))),
        Counter::StackBytes => (FALLBACKS, Some(("reason", "stack-bytes"))),
        Counter::Zerocopy => (FALLBACKS, Some(("reason", "zerocopy"))),
        Counter::BudgetExceeded => (FALLBACKS, Some(("reason", "pod-budget"))),
        Counter::SocketsTracked => (DATAPATH_FAMILIES[4].0, None),
        Counter::Sticky => (DATAPATH_FAMILIES[5].0, None),
        Counter::Resumed => (DATAPATH_FAMILIES[6].0, None),
        Counter::Admitted => (DATAPATH_FAMILIES[7].0, Some(("event", "admitted"))),
        Counter::Evicted => (DATAPATH_FAMILIES[7].0, Some(("event", "evicted"))),
    }
}

/// The `/metrics` body. `node` is `None` when the maps are not loaded (then
/// only the agent's own tallies and the plugin's requests are shown).
pub fn render(stats: &Stats, node: Option<&Snapshot>) -> String {
    let mut out = Out(String::new());
    out.family(
        "meshbypass_build_info",
        "gauge",
        "1, labelled with this agent's version and the map layout it loads.",
    );
    out.sample(
        "meshbypass_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("layout", &LAYOUT_VERSION.to_string()),
        ],
        Num::U(1),
    );
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
        out.sample("meshbypass_load_error", &[("reason", p.reason)], Num::U(1));
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
        out.sample("meshbypass_settings_error", &[("reason", p.reason)], Num::U(1));
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
            Num::U(stats.installs(a)),
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
            Num::U(stats.repairs(a)),
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
    cni_requests(&mut out, &stats.cni());
    let Some(node) = node else {
        return out.0;
    };
    let netns = node.maps.iter().find(|m| m.name == "mb_netns");
    out.single(
        "meshbypass_pods",
        "gauge",
        "Pods registered in the node's maps.",
        netns.map_or(0, |m| m.entries),
    );
    out.single(
        "meshbypass_links",
        "gauge",
        "Pod cgroup attachments (pinned links).",
        node.links as u64,
    );
    out.family(
        "meshbypass_map_entries",
        "gauge",
        "Entries in each of the node's maps that grow with pods and sockets.",
    );
    for m in &node.maps {
        out.sample("meshbypass_map_entries", &[("map", m.name)], Num::U(m.entries));
    }
    out.family(
        "meshbypass_map_capacity",
        "gauge",
        "Capacity (max_entries) of each of those maps; beyond it sockets stay on the TCP stack (fallbacks reason=map-full).",
    );
    for m in &node.maps {
        out.sample("meshbypass_map_capacity", &[("map", m.name)], Num::U(m.capacity));
    }
    if let Some(cfg) = &node.config {
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
                Num::U(u64::from(cfg.kernel_flags & hazard.bit != 0)),
            );
        }
    }
    if let Some(counters) = &node.counters {
        for (family, help) in DATAPATH_FAMILIES {
            out.family(family, "counter", help);
            for c in Counter::ALL {
                match datapath_series(c) {
                    (f, Some(label)) if f == family => out.sample(f, &[label], Num::U(counters.get(c))),
                    (f, None) if f == family => out.sample(f, &[], Num::U(counters.get(c))),
                    _ => {}
                }
            }
        }
    }
    out.0
}

/// The plugin's ADD and DEL, from its decision log since this agent started.
fn cni_requests(out: &mut Out, tally: &CniTally) {
    out.family(
        "meshbypass_cni_requests_total",
        "counter",
        "The plugin's ADD and DEL requests on this node since the agent started, by decision (meshed, redirect-only, not-meshed, removed, failed).",
    );
    for command in CNI_COMMANDS {
        for d in Decision::ALL.into_iter().filter(|d| d.possible(command)) {
            let n = tally.requests.get(&(command.to_owned(), d)).copied().unwrap_or(0);
            out.sample(
                "meshbypass_cni_requests_total",
                &[("command", command), ("decision", d.as_str())],
                Num::U(n),
            );
        }
    }
    out.family(
        "meshbypass_cni_request_duration_seconds",
        "histogram",
        "Time the plugin took for an ADD or DEL, as it logged it.",
    );
    let empty = Histogram::default();
    for command in CNI_COMMANDS {
        let h = tally.latency.get(command).unwrap_or(&empty);
        out.histogram(
            "meshbypass_cni_request_duration_seconds",
            &[("command", command)],
            h,
        );
    }
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

    /// Parses the text exposition strictly: a TYPE line before each
    /// family's samples (histograms: `_bucket`, `_sum`, `_count`), valid
    /// names, labels as `k="v"` with escapes, float values, no duplicate
    /// series. Returns series (`name{labels}` as written) -> value.
    pub(crate) fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
                assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line:?}");
                assert!(
                    types.insert(name.into(), kind.into()).is_none(),
                    "TYPE twice: {line:?}"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(!line.is_empty() && !line.starts_with('#'), "stray line {line:?}");
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.strip_suffix('}').unwrap_or_else(|| panic!("{line:?}"))),
                None => (series, ""),
            };
            assert!(
                name.starts_with("meshbypass_")
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "bad name in {line:?}"
            );
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    let base = name.strip_suffix(suffix)?;
                    (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
                })
                .unwrap_or(name);
            assert!(types.contains_key(family), "sample before its TYPE: {line:?}");
            // k="v" pairs, v with \\ \" \n escapes.
            let mut rest = labels;
            while !rest.is_empty() {
                let (k, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("{line:?}"));
                assert!(
                    k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                    "{line:?}"
                );
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => {
                            let (_, c) = chars.next().unwrap_or_else(|| panic!("{line:?}"));
                            assert!(matches!(c, '\\' | '"' | 'n'), "bad escape in {line:?}");
                        }
                        Some((i, '"')) => break i,
                        Some(_) => {}
                        None => panic!("unterminated label in {line:?}"),
                    }
                };
                rest = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
            }
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|e| panic!("bad value in {line:?}: {e}")),
            };
            assert!(
                out.insert(series.to_owned(), value).is_none(),
                "duplicate {series}"
            );
        }
        out
    }

    #[test]
    fn exposition_without_maps_is_well_formed() {
        let s = Stats::default();
        s.wrote(Artifact::Binary);
        let m = parse(&render(&s, None));
        assert_eq!(m["meshbypass_ready"], 0.0);
        assert_eq!(m["meshbypass_installs_total{artifact=\"binary\"}"], 1.0);
        let build = format!(
            "meshbypass_build_info{{version=\"{}\",layout=\"{LAYOUT_VERSION}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(m[&build], 1.0);
        // The plugin's requests are there (at 0) before the first one.
        assert_eq!(
            m["meshbypass_cni_requests_total{command=\"ADD\",decision=\"meshed\"}"],
            0.0
        );
        assert_eq!(
            m["meshbypass_cni_request_duration_seconds_count{command=\"DEL\"}"],
            0.0
        );
        // No datapath series without maps.
        assert!(
            !m.keys().any(|k| k.contains("datapath") || k.contains("map_")),
            "{m:?}"
        );
    }

    #[test]
    fn datapath_series_have_exact_labelled_values() {
        // Counter i holds 100 + i: each series shows which counter it is.
        let counters = Counters(Counter::ALL.iter().map(|c| (c.name(), 100 + *c as u64)).collect());
        let usage = |name, entries, capacity| MapUsage {
            name,
            entries,
            capacity,
        };
        let snap = Snapshot {
            links: 3,
            config: Some(Config {
                kernel_flags: KERNEL_PROBED | HAZARDS[1].bit,
                ..Config::default()
            }),
            counters: Some(counters),
            maps: vec![
                usage("mb_senders", 5, 65536),
                usage("mb_targets", 4, 65536),
                usage("mb_pairs", 6, 131072),
                usage("mb_endpoints", 1, 65536),
                usage("mb_pods", 3, 8192),
                usage("mb_netns", 2, 4096),
                usage("mb_ports", 0, 8192),
            ],
        };
        let text = render(&Stats::default(), Some(&snap));
        let m = parse(&text);
        for (series, want) in [
            ("meshbypass_datapath_messages_total{path=\"redirected\"}", 103.0),
            ("meshbypass_datapath_messages_total{path=\"passthrough\"}", 105.0),
            ("meshbypass_datapath_bytes_total{path=\"redirected\"}", 104.0),
            ("meshbypass_datapath_bytes_total{path=\"passthrough\"}", 109.0),
            ("meshbypass_datapath_pairs_total{kind=\"plain\"}", 101.0),
            ("meshbypass_datapath_pairs_total{kind=\"nat\"}", 102.0),
            (
                "meshbypass_datapath_fallbacks_total{reason=\"pair-refused\"}",
                106.0,
            ),
            ("meshbypass_datapath_fallbacks_total{reason=\"map-full\"}", 107.0),
            (
                "meshbypass_datapath_fallbacks_total{reason=\"redirect-failed\"}",
                108.0,
            ),
            (
                "meshbypass_datapath_fallbacks_total{reason=\"receiver-full\"}",
                111.0,
            ),
            (
                "meshbypass_datapath_fallbacks_total{reason=\"stack-bytes\"}",
                113.0,
            ),
            ("meshbypass_datapath_sockets_tracked_total", 100.0),
            ("meshbypass_datapath_sticky_directions_total", 110.0),
            ("meshbypass_datapath_resumed_total", 112.0),
            ("meshbypass_datapath_adaptive_total{event=\"admitted\"}", 114.0),
            ("meshbypass_datapath_adaptive_total{event=\"evicted\"}", 115.0),
            ("meshbypass_datapath_fallbacks_total{reason=\"zerocopy\"}", 116.0),
            (
                "meshbypass_datapath_fallbacks_total{reason=\"pod-budget\"}",
                117.0,
            ),
            ("meshbypass_map_entries{map=\"mb_senders\"}", 5.0),
            ("meshbypass_map_capacity{map=\"mb_pairs\"}", 131072.0),
            ("meshbypass_map_entries{map=\"mb_netns\"}", 2.0),
            ("meshbypass_map_capacity{map=\"mb_netns\"}", 4096.0),
            ("meshbypass_pods", 2.0),
            ("meshbypass_links", 3.0),
            ("meshbypass_kernel_probed", 1.0),
            ("meshbypass_kernel_hazard{probe=\"splice-reader\"}", 1.0),
            ("meshbypass_kernel_hazard{probe=\"redirect\"}", 0.0),
        ] {
            assert_eq!(m.get(series), Some(&want), "{series} in\n{text}");
        }
        // Every counter is exposed exactly once.
        let datapath = m.keys().filter(|k| k.starts_with("meshbypass_datapath_")).count();
        assert_eq!(datapath, Counter::ALL.len(), "{text}");
        let mut values: Vec<u64> = m
            .iter()
            .filter(|(k, _)| k.starts_with("meshbypass_datapath_"))
            .map(|(_, v)| *v as u64)
            .collect();
        values.sort();
        assert_eq!(values, (100..100 + Counter::ALL.len() as u64).collect::<Vec<_>>());
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut out = Out(String::new());
        out.family("meshbypass_x", "gauge", "a \\ b\nc");
        out.sample("meshbypass_x", &[("reason", "say \"hi\"\\\n")], Num::U(1));
        assert_eq!(
            out.0,
            "# HELP meshbypass_x a \\\\ b\\nc\n# TYPE meshbypass_x gauge\n\
             meshbypass_x{reason=\"say \\\"hi\\\"\\\\\\n\"} 1\n"
        );
        assert_eq!(parse(&out.0).len(), 1);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        for v in [0.001, 0.02, 0.02, 0.3, 60.0] {
            h.observe(v);
        }
        let mut out = Out(String::new());
        out.family("meshbypass_h", "histogram", "h");
        out.histogram("meshbypass_h", &[("command", "ADD")], &h);
        let m = parse(&out.0);
        let b = |le: &str| m[&format!("meshbypass_h_bucket{{command=\"ADD\",le=\"{le}\"}}")];
        assert_eq!(
            [
                b("0.005"),
                b("0.01"),
                b("0.025"),
                b("0.25"),
                b("0.5"),
                b("10"),
                b("+Inf")
            ],
            [1.0, 1.0, 3.0, 3.0, 4.0, 4.0, 5.0]
        );
        assert_eq!(m["meshbypass_h_count{command=\"ADD\"}"], 5.0);
        assert!((m["meshbypass_h_sum{command=\"ADD\"}"] - 60.341).abs() < 1e-9);
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
