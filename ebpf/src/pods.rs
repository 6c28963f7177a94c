//! Registering pods: the forward (pod IP -> pod) and reverse (netns cookie ->
//! pod) mappings the datapath acts on, and their removal with every pairing
//! entry the pod's sockets left.

use std::net::IpAddr;

use crate::abi::PodSockets;

use aya::maps::MapError;

use crate::{
    abi::{Addr, Mode, NO_ID, Pod},
    maps::NodeMaps,
};

/// A pod's registration: what the plugin writes ([`NodeMaps::register_pod`])
/// and what reading the maps gives back ([`NodeMaps::pods`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEntry {
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    /// Outbound REDIRECT port of the sidecar (Istio 15001); 0 = none.
    pub outbound_port: u16,
    /// Inbound REDIRECT port of the sidecar (Istio 15006); 0 = none.
    pub inbound_port: u16,
    pub proxy_uid: Option<u32>,
    pub proxy_gid: Option<u32>,
    pub mode: Mode,
}

impl PodEntry {
    fn value(&self) -> Pod {
        Pod {
            netns: self.netns_cookie,
            proxy_uid: self.proxy_uid.unwrap_or(NO_ID),
            proxy_gid: self.proxy_gid.unwrap_or(NO_ID),
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            mode: self.mode as u8,
            flags: 0,
            pad: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("netns cookie 0 is not a netns")]
    NoNetns,
    #[error("cannot write pod entry for {what}")]
    Write {
        what: String,
        #[source]
        source: MapError,
    },
    #[error("cannot remove pod entry for {what}")]
    Remove {
        what: String,
        #[source]
        source: MapError,
    },
}

/// What [`NodeMaps::unregister_pod`] removed.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    pub netns: usize,
    pub ips: usize,
    pub pairs: usize,
    pub endpoints: usize,
}

fn is_not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// Removes `keys` from `map`; absent ones are fine. Returns how many went.
fn remove_keys<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    keys: impl IntoIterator<Item = K>,
    what: impl Fn(&K) -> String,
) -> Result<usize, PodError> {
    let mut n = 0;
    for k in keys {
        match map.remove(&k) {
            Ok(()) => n += 1,
            Err(e) if is_not_found(&e) => {}
            Err(source) => {
                return Err(PodError::Remove {
                    what: what(&k),
                    source,
                });
            }
        }
    }
    Ok(n)
}

/// A new registration's generation for its socket count (different from
/// the last one's with all but certainty: nanoseconds of the clock).
fn registration_generation() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(16))
}

/// Removes every entry of `map` for which `doomed(key, value)`; returns
/// how many went.
fn remove_where<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    doomed: impl Fn(&K, &V) -> bool,
    what: impl Fn(&K) -> String,
) -> Result<usize, PodError> {
    let keys: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| doomed(k, v))
        .map(|(k, _)| k)
        .collect();
    remove_keys(map, keys, what)
}

impl NodeMaps {
    /// Registers (or updates) a pod: IPs first, netns last, so the datapath
    /// never sees the pod half-written.
    pub fn register_pod(&mut self, pod: &PodEntry) -> Result<(), PodError> {
        if pod.netns_cookie == 0 {
            return Err(PodError::NoNetns);
        }
        let value = pod.value();
        for ip in &pod.ips {
            self.pods
                .insert(Addr::from_ip(*ip), value, 0)
                .map_err(|source| PodError::Write {
                    what: ip.to_string(),
                    source,
                })?;
        }
        // The socket count starts at zero once; a re-registration (a new
        // mode, a retried ADD) keeps the sockets it already counts.
        match self.pod_sockets.insert(
            pod.netns_cookie,
            PodSockets {
                count: 0,
                generation: registration_generation(),
            },
            u64::from(aya_obj::generated::BPF_NOEXIST),
        ) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(PodError::Write {
                    what: format!("socket count of netns {}", pod.netns_cookie),
                    source,
                });
            }
        }
        self.netns
            .insert(pod.netns_cookie, value, 0)
            .map_err(|source| PodError::Write {
                what: format!("netns {}", pod.netns_cookie),
                source,
            })
    }

    /// Removes a pod by its netns cookie: its netns entry first (no new
    /// sockets are tracked), its IPs (only those still pointing at this
    /// netns: an IP may already belong to a new pod), then every pairing
    /// entry of its sockets or pointing at them. Absent entries are fine:
    /// DEL may run any number of times.
    pub fn unregister_pod(&mut self, netns_cookie: u64) -> Result<Removed, PodError> {
        let netns = remove_keys(&mut self.netns, [netns_cookie], |c| format!("netns {c}"))?;
        let ips = remove_where(
            &mut self.pods,
            |_, pod| pod.netns == netns_cookie,
            |ip| ip.to_ip().to_string(),
        )?;
        let pairs = remove_where(
            &mut self.pairs,
            |k, p| k.netns == netns_cookie || p.peer.netns == netns_cookie,
            |_| "a pair".into(),
        )?;
        let endpoints = remove_where(
            &mut self.endpoints,
            |k, e| k.netns == netns_cookie || e.key.netns == netns_cookie,
            |_| "an endpoint".into(),
        )?;
        remove_where(
            &mut self.ports,
            |k, _| k.netns == netns_cookie,
            |k| format!("port {}", k.port),
        )?;
        remove_keys(&mut self.pod_sockets, [netns_cookie], |c| {
            format!("socket count of netns {c}")
        })?;
        remove_where(
            &mut self.fed,
            |k, _| k.netns == netns_cookie,
            |_| "a fed mark".into(),
        )?;
        Ok(Removed {
            netns,
            ips,
            pairs,
            endpoints,
        })
    }

    /// How many of the pod's sockets are tracked (its socket budget's use).
    pub fn tracked_sockets(&self, netns_cookie: u64) -> Option<u32> {
        self.pod_sockets.get(&netns_cookie, 0).ok().map(|u| u.count)
    }

    /// The pod registered for a netns, if any.
    pub fn pod_by_netns(&self, netns_cookie: u64) -> Option<PodEntry> {
        let pod = self.netns.get(&netns_cookie, 0).ok()?;
        let ips = self
            .pods
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, p)| p.netns == netns_cookie)
            .map(|(ip, _)| ip.to_ip())
            .collect();
        describe(netns_cookie, &pod, ips)
    }

    /// Every registered pod: one walk of each map, whatever the number of
    /// pods (status and metrics call this on a busy node).
    pub fn pods(&self) -> Vec<PodEntry> {
        let mut ips: std::collections::HashMap<u64, Vec<IpAddr>> = std::collections::HashMap::new();
        for (ip, pod) in self.pods.iter().filter_map(Result::ok) {
            ips.entry(pod.netns).or_default().push(ip.to_ip());
        }
        self.netns
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(cookie, pod)| describe(cookie, &pod, ips.remove(&cookie).unwrap_or_default()))
            .collect()
    }
}

/// The registration of `netns_cookie`. A mode byte that no [`Mode`] has is
/// not an entry this layout writes: it is skipped with a warning.
fn describe(netns_cookie: u64, pod: &Pod, mut ips: Vec<IpAddr>) -> Option<PodEntry> {
    let Some(mode) = Mode::from_raw(pod.mode) else {
        log::warn!(
            "netns {netns_cookie}: registered with unknown mode {}; skipped",
            pod.mode
        );
        return None;
    };
    ips.sort();
    let id = |v: u32| (v != NO_ID).then_some(v);
    Some(PodEntry {
        netns_cookie,
        ips,
        outbound_port: pod.outbound_port,
        inbound_port: pod.inbound_port,
        proxy_uid: id(pod.proxy_uid),
        proxy_gid: id(pod.proxy_gid),
        mode,
    })
}
