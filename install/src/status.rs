//! `meshbypass-node status`: one schema whether the maps are loaded or not
//! (absent things are zero, empty or `null`, never missing keys), versioned
//! by `schemaVersion`. Registered pods carry their namespace and name from
//! the plugin's records in the state dir (the maps know only netns cookies
//! and IPs). Reading it walks each map once.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use meshbypass_cni::state::StateDir;
use meshbypass_ebpf::{
    Counter, NodeMaps, PodEntry,
    abi::{KERNEL_PROBED, KERNEL_SAFE_ALL, KERNEL_SAFE_MEMBER, LAYOUT_VERSION},
    chain::error_chain,
    counters::Counters,
    loader,
    maps::OpenError,
    pins, selftest,
    usage::MapUsage,
};
use serde::Serialize;

/// Bumped when a key changes meaning or goes away (adding keys does not).
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub schema_version: u32,
    pub loaded: bool,
    pub bpf_root: PathBuf,
    /// The map layout this binary loads.
    pub layout_version: u32,
    pub programs: Programs,
    /// The running kernel's release.
    pub kernel: String,
    pub selftest: Verdict,
    /// What `acceleration: auto` means on this node now.
    pub auto: &'static str,
    pub hazards: Vec<Hazard>,
    /// Registered pods.
    pub pods: usize,
    pub pod_list: Vec<Pod>,
    /// Pod cgroup attachments (pinned links).
    pub links: usize,
    /// Entries and capacity of the maps that grow with pods and sockets.
    pub maps: Vec<MapUsage>,
    pub sockets: Sockets,
    pub pairing: Pairing,
    /// Every datapath counter by name (`redirected_msgs`, ...), summed
    /// over CPUs; all zero when not loaded.
    pub counters: Counters,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Programs {
    /// FNV-1a of the object the pinned programs came from (`null`: not loaded).
    pub object_hash: Option<String>,
    /// Whether they are this build's (`null`: not loaded).
    pub this_build: Option<bool>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub probed: bool,
    pub safe_all: bool,
    pub safe_member: bool,
    /// Seconds since the epoch (`null`: never probed).
    pub probed_at: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Hazard {
    pub probe: &'static str,
    pub effect: &'static str,
}

/// A registered pod, named from the plugin's record when there is one.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub container_id: Option<String>,
    #[serde(flatten)]
    pub registration: PodEntry,
}

#[derive(Debug, Serialize)]
pub struct Sockets {
    /// In `mb_senders`: sockets whose sends may be redirected.
    pub senders: u64,
    /// In `mb_targets`: sockets data may be redirected into.
    pub targets: u64,
}

#[derive(Debug, Serialize)]
pub struct Pairing {
    pub pairs: u64,
    pub endpoints: u64,
}

/// The plugin's records by netns cookie: (namespace, name, container ID).
type Names = HashMap<u64, (Option<String>, Option<String>, String)>;

fn names(state_dir: &Path) -> Names {
    let dir = StateDir::new(state_dir);
    let ids = match dir.list() {
        Ok(ids) => ids,
        Err(e) => {
            log::warn!("pod names unknown: {}", error_chain(&e));
            return Names::new();
        }
    };
    ids.iter()
        .filter_map(|id| match dir.load(id) {
            Ok(Some(r)) => Some((r.netns_cookie?, (r.pod_namespace, r.pod_name, r.container_id))),
            Ok(None) => None,
            Err(e) => {
                log::warn!("{}", error_chain(&e));
                None
            }
        })
        .collect()
}

/// What `acceleration: auto` means under `mb_config.kernel_flags`.
pub fn auto_mode(kernel_flags: u32) -> &'static str {
    if kernel_flags & KERNEL_SAFE_ALL != 0 {
        "all"
    } else {
        "proxy-only"
    }
}

impl Status {
    /// What is at `root`; an error only for pins that exist but cannot be
    /// used (another layout, incomplete, unreadable).
    pub fn read(root: &Path, state_dir: &Path) -> anyhow::Result<Self> {
        let kernel = selftest::kernel_release();
        let node = match NodeMaps::open(root) {
            Ok(node) => Some(node),
            Err(OpenError::NotLoaded { .. }) => None,
            Err(e) => return Err(e).context("opening the node's maps"),
        };
        let Some(node) = node else {
            return Ok(Self::not_loaded(root, kernel));
        };
        let cfg = node.config().context("reading mb_config")?;
        let counters = node.counters().context("reading the counters")?;
        let maps = node.map_usage().context("reading the map usage")?;
        let entries = |name: &str| maps.iter().find(|m| m.name == name).map_or(0, |m| m.entries);
        let mut names = names(state_dir);
        let mut pod_list: Vec<Pod> = node
            .pods()
            .into_iter()
            .map(|p| {
                let (namespace, name, container_id) = match names.remove(&p.netns_cookie) {
                    Some((ns, name, id)) => (ns, name, Some(id)),
                    None => (None, None, None),
                };
                Pod {
                    namespace,
                    name,
                    container_id,
                    registration: p,
                }
            })
            .collect();
        pod_list.sort_by(|a, b| {
            (&a.namespace, &a.name, a.registration.netns_cookie).cmp(&(
                &b.namespace,
                &b.name,
                b.registration.netns_cookie,
            ))
        });
        Ok(Self {
            schema_version: SCHEMA_VERSION,
            loaded: true,
            bpf_root: root.into(),
            layout_version: LAYOUT_VERSION,
            programs: Programs {
                object_hash: Some(format!("{:016x}", cfg.object_hash)),
                this_build: Some(cfg.object_hash == loader::object_hash()),
            },
            kernel,
            selftest: Verdict {
                probed: cfg.kernel_flags & KERNEL_PROBED != 0,
                safe_all: cfg.kernel_flags & KERNEL_SAFE_ALL != 0,
                safe_member: cfg.kernel_flags & KERNEL_SAFE_MEMBER != 0,
                probed_at: (cfg.kernel_flags & KERNEL_PROBED != 0).then_some(cfg.probed_at),
            },
            auto: auto_mode(cfg.kernel_flags),
            hazards: selftest::hazards(cfg.kernel_flags)
                .map(|h| Hazard {
                    probe: h.probe,
                    effect: h.effect,
                })
                .collect(),
            pods: pod_list.len(),
            pod_list,
            links: node.links().len(),
            sockets: Sockets {
                senders: entries(pins::MAP_SENDERS),
                targets: entries(pins::MAP_TARGETS),
            },
            pairing: Pairing {
                pairs: entries(pins::MAP_PAIRS),
                endpoints: entries(pins::MAP_ENDPOINTS),
            },
            maps,
            counters,
        })
    }

    fn not_loaded(root: &Path, kernel: String) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            loaded: false,
            bpf_root: root.into(),
            layout_version: LAYOUT_VERSION,
            programs: Programs {
                object_hash: None,
                this_build: None,
            },
            kernel,
            selftest: Verdict {
                probed: false,
                safe_all: false,
                safe_member: false,
                probed_at: None,
            },
            auto: auto_mode(0),
            hazards: Vec::new(),
            pods: 0,
            pod_list: Vec::new(),
            links: 0,
            maps: Vec::new(),
            sockets: Sockets {
                senders: 0,
                targets: 0,
            },
            pairing: Pairing {
                pairs: 0,
                endpoints: 0,
            },
            counters: Counters(Counter::ALL.iter().map(|c| (c.name(), 0)).collect()),
        }
    }

    fn print(&self) {
        let root = self.bpf_root.display();
        if !self.loaded {
            println!("not loaded at {root} (run `meshbypass-node load`)");
            return;
        }
        println!(
            "loaded at {root} (layout {}), kernel {}",
            self.layout_version, self.kernel
        );
        let probed = if self.selftest.probed {
            "selftest recorded"
        } else {
            "no selftest recorded"
        };
        println!("acceleration auto = {} ({probed})", self.auto);
        if self.programs.this_build == Some(false) {
            println!("programs: another build's (`meshbypass-node load` replaces them)");
        }
        for h in &self.hazards {
            println!("hazard: {} — {}", h.probe, h.effect);
        }
        println!(
            "pods {}  links {}  sockets: senders {} targets {}  pairs {}  waiting {}",
            self.pods,
            self.links,
            self.sockets.senders,
            self.sockets.targets,
            self.pairing.pairs,
            self.pairing.endpoints
        );
        for p in &self.pod_list {
            let name = match (&p.namespace, &p.name) {
                (Some(ns), Some(n)) => format!("{ns}/{n}"),
                _ => format!("netns {}", p.registration.netns_cookie),
            };
            let ips: Vec<String> = p.registration.ips.iter().map(ToString::to_string).collect();
            println!("  pod {name:<40} {:<32} {}", ips.join(","), p.registration.mode);
        }
        for m in &self.maps {
            println!("  map {:<14} {:>8} / {}", m.name, m.entries, m.capacity);
        }
        for (name, value) in &self.counters.0 {
            println!("  {name:<20} {value}");
        }
    }
}

/// `status [--json]`.
pub fn run(root: &Path, state_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let status = Status::read(root, state_dir)?;
    if json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        status.print();
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key of a loaded status is there when not loaded, and the
    /// contract's keys are where scripts read them.
    #[test]
    fn one_schema_loaded_or_not() {
        let v = serde_json::to_value(Status::not_loaded(Path::new("/sys/fs/bpf/x"), "6.18".into())).unwrap();
        let obj = v.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "auto",
                "bpfRoot",
                "counters",
                "hazards",
                "kernel",
                "layoutVersion",
                "links",
                "loaded",
                "maps",
                "pairing",
                "podList",
                "pods",
                "programs",
                "schemaVersion",
                "selftest",
                "sockets",
            ]
        );
        assert_eq!(v["schemaVersion"], SCHEMA_VERSION);
        assert_eq!(v["loaded"], false);
        assert_eq!(v["pods"], 0);
        assert_eq!(
            v["programs"],
            serde_json::json!({"objectHash": null, "thisBuild": null})
        );
        assert_eq!(v["selftest"]["probedAt"], serde_json::Value::Null);
        for c in Counter::ALL {
            assert_eq!(v["counters"][c.name()], 0, "{}", c.name());
        }
        for key in ["redirected_msgs", "redirected_bytes", "passthrough_msgs"] {
            assert!(v["counters"].get(key).is_some(), "the contract's {key}");
        }
        // The pod entry's keys.
        let pod = serde_json::to_value(Pod {
            namespace: Some("ns".into()),
            name: Some("p".into()),
            container_id: Some("c".into()),
            registration: PodEntry {
                netns_cookie: 7,
                ips: vec!["10.0.0.1".parse().unwrap()],
                outbound_port: 15001,
                inbound_port: 15006,
                proxy_uid: Some(1337),
                proxy_gid: None,
                mode: meshbypass_ebpf::Mode::Auto,
            },
        })
        .unwrap();
        let mut keys: Vec<&str> = pod.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "containerId",
                "inboundPort",
                "ips",
                "mode",
                "name",
                "namespace",
                "netnsCookie",
                "outboundPort",
                "proxyGid",
                "proxyUid",
            ]
        );
    }
}
