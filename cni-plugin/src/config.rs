//! The plugin's network configuration (the conflist entry plus what the runtime injects), parsed
//! strictly and resolved against the mesh profile into plain values.
//!
//! Besides our own keys, a request configuration carries what CNI spec 1.1 section 3 says the
//! runtime inserts or passes through: `cniVersion`, `name`, `type`, `runtimeConfig`,
//! `prevResult`, `args` (reserved for runtime use), `capabilities` (in the conflist entry; the
//! runtime should strip it for ADD/DEL/CHECK but may pass it for STATUS/GC) and, for GC,
//! `cni.dev/valid-attachments` (libcni also writes it as `cni.dev/attachments`). Every other key
//! is an error naming it.

use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::cidr::Cidr;
use crate::ids::{ContainerId, IfName};
use crate::kubeconfig::KubeconfigError;
use crate::version;

pub const PLUGIN_TYPE: &str = "meshbypass";
pub const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf/meshbypass";
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Where ADD records what DEL and GC undo (tmpfs: cleared with the pins at reboot).
pub const DEFAULT_STATE_DIR: &str = "/run/meshbypass";
pub const DEFAULT_EXCLUDE_NAMESPACES: [&str; 1] = ["kube-system"];
/// `kubernetes.timeoutSeconds`: how long one ADD may spend on the API server, retries included.
pub const DEFAULT_KUBERNETES_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `kubernetes.timeoutSeconds` accepted: the runtime's own CNI deadline is minutes.
pub const MAX_KUBERNETES_TIMEOUT: Duration = Duration::from_secs(120);

/// Which sidecar mesh the pods run; selects the profile defaults and the rule semantics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mesh {
    #[default]
    Istio,
    Linkerd,
}

impl fmt::Display for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mesh::Istio => "istio",
            Mesh::Linkerd => "linkerd",
        })
    }
}

/// A mesh's defaults, as its own CNI plugin / proxy-init applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    /// Inbound ports the proxy serves itself; never redirected, whatever the config says.
    pub reserved_inbound_ports: &'static [u16],
    /// `excludeOutboundPorts` when the config does not set it.
    pub default_exclude_outbound_ports: &'static [u16],
}

impl Mesh {
    pub fn profile(self) -> Profile {
        match self {
            // istio-cni: 15001/15006, UID and GID 1337; 15008 (HBONE tunnel) is returned first in
            // ISTIO_INBOUND, 15020/15021/15090 (agent, health, Prometheus) are appended to the
            // excluded inbound ports; 15020 is the default excluded outbound port.
            Mesh::Istio => Profile {
                outbound_port: 15001,
                inbound_port: 15006,
                proxy_uid: 1337,
                proxy_gid: Some(1337),
                reserved_inbound_ports: &[15008, 15020, 15021, 15090],
                default_exclude_outbound_ports: &[15020],
            },
            // linkerd2-proxy-init: 4140/4143, UID 2102, inbound 4190/4191 (admin, tap) ignored.
            Mesh::Linkerd => Profile {
                outbound_port: 4140,
                inbound_port: 4143,
                proxy_uid: 2102,
                proxy_gid: None,
                reserved_inbound_ports: &[4190, 4191],
                default_exclude_outbound_ports: &[],
            },
        }
    }
}

/// How much of a pod's traffic the sockops bypass may short-circuit (`acceleration`): the
/// datapath's own mode.
pub use meshbypass_ebpf::Mode;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
        }
    }
}

/// `includeInboundPorts`: `"*"` or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    All,
    Only(Vec<u16>),
}

/// `includeOutboundCidrs`: `"*"` or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundCidrs {
    All,
    Only(Vec<Cidr>),
}

/// The fully resolved redirect the rule generator works from: profile defaults applied, every
/// value validated. `proxy_gid` is `None` only where the mesh has no proxy group (Linkerd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectSpec {
    pub mesh: Mesh,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub reserved_inbound_ports: Vec<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    pub include_inbound_ports: InboundPorts,
    /// Source CIDRs whose inbound connections skip the proxy (Linkerd's skip-subnets).
    pub exclude_inbound_cidrs: Vec<Cidr>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
    pub include_outbound_cidrs: OutboundCidrs,
    pub exclude_interfaces: Vec<IfName>,
}

impl RedirectSpec {
    /// The profile's defaults with nothing overridden.
    pub fn defaults(mesh: Mesh) -> RedirectSpec {
        resolve_redirect(mesh, RawRedirect::default())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubernetes {
    /// With a kubeconfig the pod's annotations decide; without, every pod outside
    /// `exclude_namespaces` is meshed.
    pub kubeconfig: Option<PathBuf>,
    pub exclude_namespaces: Vec<String>,
    /// The whole budget of one ADD for the API (every attempt and pause); when it runs out the
    /// ADD fails with "try again later", never without the pod's redirect.
    pub timeout: Duration,
}

/// One entry of GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: ContainerId,
    pub ifname: IfName,
}

/// The plugin's network configuration from stdin, parsed and resolved (the CNI spec's "network
/// configuration"; `NetConf` as in the reference plugins). Not `meshbypass_ebpf::abi::Config`, the
/// node's `mb_config` map value.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// The previous plugin's result, untouched, to pass back on ADD.
    pub prev_result: Option<serde_json::Value>,
    /// GC's list of still valid attachments; `None` outside GC.
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    pub bpf_root: PathBuf,
    pub cgroup_root: PathBuf,
    /// Where ADD records what DEL and GC must undo (one file per container).
    pub state_dir: PathBuf,
    pub redirect: RedirectSpec,
    pub acceleration: Mode,
    pub kubernetes: Kubernetes,
    pub log_level: LogLevel,
    pub log_file: Option<PathBuf>,
}

impl NetConf {
    pub fn mesh(&self) -> Mesh {
        self.redirect.mesh
    }

    /// Parses the request configuration from stdin's bytes.
    pub fn parse(json: &[u8]) -> Result<NetConf, ConfigError> {
        // Syntax first (code 6), then shape: anything but an object is no
        // configuration at all (6), then fields (7).
        let value: serde_json::Value =
            serde_json::from_slice(json).map_err(|source| ConfigError::Decode { source })?;
        if !value.is_object() {
            return Err(ConfigError::NotObject);
        }
        let raw: RawConf = serde_path_to_error::deserialize(value).map_err(ConfigError::from_serde)?;
        raw.resolve()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the network configuration on stdin is not valid JSON")]
    Decode {
        #[source]
        source: serde_json::Error,
    },
    #[error("the network configuration on stdin is not a JSON object")]
    NotObject,
    #[error("unknown key `{key}` in the network configuration; remove it or correct its spelling")]
    UnknownKey {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid value for `{path}` in the network configuration")]
    Invalid {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cniVersion {version:?} is not supported; use one of {}", version::SUPPORTED_VERSIONS.join(", "))]
    UnsupportedVersion { version: String },
    #[error("type is {found:?}; this plugin is \"{PLUGIN_TYPE}\"")]
    WrongType { found: String },
    #[error(
        "redirect.outboundPort and redirect.inboundPort are both {port}; the proxy needs two different ports"
    )]
    SamePorts { port: u16 },
    #[error(
        "redirect.includeInboundPorts lists {port}, which the {mesh} proxy serves itself and is never redirected; remove it"
    )]
    ReservedInboundPort { port: u16, mesh: Mesh },
    #[error("{key} must be an absolute path, not {}", path.display())]
    RelativePath { key: &'static str, path: PathBuf },
    #[error(
        "kubernetes.timeoutSeconds is {value}; use a number of seconds above 0 and at most {}",
        MAX_KUBERNETES_TIMEOUT.as_secs()
    )]
    KubernetesTimeout { value: f64 },
    #[error("cannot use the kubeconfig {} (kubernetes.kubeconfig)", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
}

impl ConfigError {
    fn from_serde(err: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
        use serde_json::error::Category;
        let path = err.path().to_string();
        let source = err.into_inner();
        match source.classify() {
            Category::Io | Category::Syntax | Category::Eof => ConfigError::Decode { source },
            // The path of an unknown key ends with the key itself ("redirect.outbondPort").
            Category::Data if is_unknown_field(&source) => ConfigError::UnknownKey { key: path, source },
            Category::Data => ConfigError::Invalid { path, source },
        }
    }

    /// Whether this is the spec's "incompatible CNI version" (code 1) rather than an invalid
    /// config (code 7) or a decode failure (code 6).
    pub fn is_version(&self) -> bool {
        matches!(self, ConfigError::UnsupportedVersion { .. })
    }

    pub fn is_decode(&self) -> bool {
        matches!(self, ConfigError::Decode { .. } | ConfigError::NotObject)
    }
}

/// serde's message for `deny_unknown_fields` is "unknown field `x`, expected …".
fn is_unknown_field(err: &serde_json::Error) -> bool {
    err.to_string().starts_with("unknown field `")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConf {
    cni_version: String,
    name: String,
    #[serde(rename = "type")]
    plugin_type: String,
    #[serde(default)]
    prev_result: Option<serde_json::Value>,
    // Injected or passed through by the runtime; accepted, nothing in them for us.
    #[serde(default, rename = "runtimeConfig")]
    _runtime_config: Option<IgnoredAny>,
    #[serde(default, rename = "args")]
    _args: Option<IgnoredAny>,
    #[serde(default, rename = "capabilities")]
    _capabilities: Option<IgnoredAny>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<ValidAttachment>>,
    #[serde(default, rename = "cni.dev/attachments")]
    attachments: Option<Vec<ValidAttachment>>,

    #[serde(default)]
    bpf_root: Option<PathBuf>,
    #[serde(default)]
    cgroup_root: Option<PathBuf>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    mesh: Mesh,
    #[serde(default)]
    redirect: RawRedirect,
    #[serde(default)]
    acceleration: Mode,
    #[serde(default)]
    kubernetes: RawKubernetes,
    #[serde(default)]
    log_level: LogLevel,
    #[serde(default)]
    log_file: Option<PathBuf>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRedirect {
    outbound_port: Option<Port>,
    inbound_port: Option<Port>,
    proxy_uid: Option<u32>,
    proxy_gid: Option<u32>,
    exclude_outbound_ports: Option<Vec<Port>>,
    exclude_inbound_ports: Option<Vec<Port>>,
    exclude_outbound_cidrs: Option<Vec<Cidr>>,
    include_outbound_cidrs: Option<OutboundCidrs>,
    include_inbound_ports: Option<InboundPorts>,
    exclude_inbound_cidrs: Option<Vec<Cidr>>,
    exclude_interfaces: Option<Vec<IfName>>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawKubernetes {
    kubeconfig: Option<PathBuf>,
    exclude_namespaces: Option<Vec<String>>,
    timeout_seconds: Option<f64>,
}

impl RawConf {
    fn resolve(self) -> Result<NetConf, ConfigError> {
        if !version::is_supported(&self.cni_version) {
            return Err(ConfigError::UnsupportedVersion {
                version: self.cni_version,
            });
        }
        if self.plugin_type != PLUGIN_TYPE {
            return Err(ConfigError::WrongType {
                found: self.plugin_type,
            });
        }
        let redirect = resolve_redirect(self.mesh, self.redirect);
        if redirect.outbound_port == redirect.inbound_port {
            return Err(ConfigError::SamePorts {
                port: redirect.outbound_port,
            });
        }
        if let InboundPorts::Only(ports) = &redirect.include_inbound_ports
            && let Some(port) = ports
                .iter()
                .find(|port| redirect.reserved_inbound_ports.contains(port))
        {
            return Err(ConfigError::ReservedInboundPort {
                port: *port,
                mesh: redirect.mesh,
            });
        }
        let bpf_root = absolute("bpfRoot", self.bpf_root, DEFAULT_BPF_ROOT)?;
        let cgroup_root = absolute("cgroupRoot", self.cgroup_root, DEFAULT_CGROUP_ROOT)?;
        let state_dir = absolute("stateDir", self.state_dir, DEFAULT_STATE_DIR)?;
        let log_file = self
            .log_file
            .map(|path| absolute("logFile", Some(path), ""))
            .transpose()?;
        let kubeconfig = self
            .kubernetes
            .kubeconfig
            .map(|path| absolute("kubernetes.kubeconfig", Some(path), ""))
            .transpose()?;
        let timeout = match self.kubernetes.timeout_seconds {
            None => DEFAULT_KUBERNETES_TIMEOUT,
            Some(value) => Duration::try_from_secs_f64(value)
                .ok()
                .filter(|t| !t.is_zero() && *t <= MAX_KUBERNETES_TIMEOUT)
                .ok_or(ConfigError::KubernetesTimeout { value })?,
        };
        Ok(NetConf {
            cni_version: self.cni_version,
            name: self.name,
            prev_result: self.prev_result,
            valid_attachments: self.valid_attachments.or(self.attachments),
            bpf_root,
            cgroup_root,
            state_dir,
            redirect,
            acceleration: self.acceleration,
            kubernetes: Kubernetes {
                kubeconfig,
                exclude_namespaces: self.kubernetes.exclude_namespaces.unwrap_or_else(|| {
                    DEFAULT_EXCLUDE_NAMESPACES
                        .iter()
                        .map(|ns| (*ns).to_owned())
                        .collect()
                }),
                timeout,
            },
            log_level: self.log_level,
            log_file,
        })
    }
}

fn absolute(key: &'static str, path: Option<PathBuf>, default: &str) -> Result<PathBuf, ConfigError> {
    let path = path.unwrap_or_else(|| PathBuf::from(default));
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(ConfigError::RelativePath { key, path })
    }
}

fn ports(list: Vec<Port>) -> Vec<u16> {
    let mut out: Vec<u16> = Vec::with_capacity(list.len());
    for Port(port) in list {
        if !out.contains(&port) {
            out.push(port);
        }
    }
    out
}

fn resolve_redirect(mesh: Mesh, raw: RawRedirect) -> RedirectSpec {
    let profile = mesh.profile();
    RedirectSpec {
        mesh,
        outbound_port: raw.outbound_port.map_or(profile.outbound_port, |p| p.0),
        inbound_port: raw.inbound_port.map_or(profile.inbound_port, |p| p.0),
        proxy_uid: raw.proxy_uid.unwrap_or(profile.proxy_uid),
        proxy_gid: raw.proxy_gid.or(profile.proxy_gid),
        reserved_inbound_ports: profile.reserved_inbound_ports.to_vec(),
        exclude_inbound_ports: raw.exclude_inbound_ports.map(ports).unwrap_or_default(),
        include_inbound_ports: match raw.include_inbound_ports {
            Some(InboundPorts::Only(list)) => InboundPorts::Only(ports(list.into_iter().map(Port).collect())),
            Some(InboundPorts::All) | None => InboundPorts::All,
        },
        exclude_inbound_cidrs: raw.exclude_inbound_cidrs.unwrap_or_default(),
        exclude_outbound_ports: raw
            .exclude_outbound_ports
            .map(ports)
            .unwrap_or_else(|| profile.default_exclude_outbound_ports.to_vec()),
        exclude_outbound_cidrs: raw.exclude_outbound_cidrs.unwrap_or_default(),
        include_outbound_cidrs: raw.include_outbound_cidrs.unwrap_or(OutboundCidrs::All),
        exclude_interfaces: raw.exclude_interfaces.unwrap_or_default(),
    }
}

/// A TCP port, 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Port(u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u64::deserialize(deserializer)?;
        port(value).map(Port)
    }
}

fn port<E: de::Error>(value: u64) -> Result<u16, E> {
    u16::try_from(value)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| E::custom(format!("port {value} is out of range; use 1..=65535")))
}

impl<'de> Deserialize<'de> for InboundPorts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let list = deserializer.deserialize_any(StarOrList::<Port>::new("\"*\" or an array of ports"))?;
        Ok(list.map_or(InboundPorts::All, |ports| {
            InboundPorts::Only(ports.into_iter().map(|Port(port)| port).collect())
        }))
    }
}

impl<'de> Deserialize<'de> for OutboundCidrs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let list =
            deserializer.deserialize_any(StarOrList::<Cidr>::new("\"*\" or an array of CIDR strings"))?;
        Ok(list.map_or(OutboundCidrs::All, OutboundCidrs::Only))
    }
}

/// `"*"` (`None`: everything) or an array of `T`.
struct StarOrList<T> {
    expecting: &'static str,
    item: PhantomData<T>,
}

impl<T> StarOrList<T> {
    fn new(expecting: &'static str) -> Self {
        Self {
            expecting,
            item: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for StarOrList<T> {
    type Value = Option<Vec<T>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
        if value == "*" {
            Ok(None)
        } else {
            Err(E::invalid_value(de::Unexpected::Str(value), &self))
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut list = Vec::new();
        while let Some(item) = seq.next_element()? {
            list.push(item);
        }
        Ok(Some(list))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> NetConf {
        NetConf::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{json} should parse: {e:?}"))
    }

    fn parse_err(json: &str) -> ConfigError {
        match NetConf::parse(json.as_bytes()) {
            Ok(config) => panic!("{json} should be rejected, got {config:?}"),
            Err(err) => err,
        }
    }

    fn with(extra: &str) -> String {
        format!(r#"{{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"meshbypass"{extra}}}"#)
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter()
            .map(|c| c.parse().unwrap_or_else(|e| panic!("{c}: {e}")))
            .collect()
    }

    #[test]
    fn minimal_config_gets_istio_defaults() {
        let config = parse(&with(""));
        assert_eq!(config.cni_version, "1.1.0");
        assert_eq!(config.name, "k8s-pod-network");
        assert_eq!(config.bpf_root, PathBuf::from("/sys/fs/bpf/meshbypass"));
        assert_eq!(config.cgroup_root, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(config.mesh(), Mesh::Istio);
        assert_eq!(config.acceleration, Mode::Auto);
        assert_eq!(config.log_level, LogLevel::Info);
        assert_eq!(config.log_file, None);
        assert_eq!(config.prev_result, None);
        assert_eq!(config.valid_attachments, None);
        assert_eq!(
            config.kubernetes,
            Kubernetes {
                kubeconfig: None,
                exclude_namespaces: vec!["kube-system".to_owned()],
                timeout: Duration::from_secs(10),
            }
        );
        assert_eq!(
            config.redirect,
            RedirectSpec {
                mesh: Mesh::Istio,
                outbound_port: 15001,
                inbound_port: 15006,
                proxy_uid: 1337,
                proxy_gid: Some(1337),
                reserved_inbound_ports: vec![15008, 15020, 15021, 15090],
                exclude_inbound_ports: vec![],
                include_inbound_ports: InboundPorts::All,
                exclude_inbound_cidrs: vec![],
                exclude_outbound_ports: vec![15020],
                exclude_outbound_cidrs: vec![],
                include_outbound_cidrs: OutboundCidrs::All,
                exclude_interfaces: vec![],
            }
        );
        assert_eq!(config.redirect, RedirectSpec::defaults(Mesh::Istio));
    }

    #[test]
    fn linkerd_profile() {
        let config = parse(&with(r#","mesh":"linkerd""#));
        let spec = config.redirect;
        assert_eq!(spec.mesh, Mesh::Linkerd);
        assert_eq!((spec.outbound_port, spec.inbound_port), (4140, 4143));
        assert_eq!((spec.proxy_uid, spec.proxy_gid), (2102, None));
        assert_eq!(spec.reserved_inbound_ports, vec![4190, 4191]);
        assert_eq!(spec.exclude_outbound_ports, Vec::<u16>::new());
        assert_eq!(spec.include_inbound_ports, InboundPorts::All);
        assert_eq!(spec.include_outbound_cidrs, OutboundCidrs::All);
    }

    #[test]
    fn every_key_is_read() {
        let config = parse(&with(
            r#",
            "bpfRoot": "/run/mbx/bpf",
            "cgroupRoot": "/sys/fs/cgroup/unified",
            "mesh": "istio",
            "redirect": {
                "outboundPort": 16001, "inboundPort": 16006,
                "proxyUid": 2000, "proxyGid": 3000,
                "excludeOutboundPorts": [22, 443, 22],
                "excludeInboundPorts": [8081],
                "excludeOutboundCidrs": ["169.254.169.254/32", "fd00::/8"],
                "includeOutboundCidrs": ["10.0.0.0/8"],
                "includeInboundPorts": [8080, 9090],
                "excludeInboundCidrs": ["192.168.0.0/16"],
                "excludeInterfaces": ["eth1"]
            },
            "acceleration": "proxy-only",
            "kubernetes": {"kubeconfig": "/etc/cni/net.d/meshbypass-kubeconfig", "excludeNamespaces": []},
            "logLevel": "debug",
            "logFile": "/var/log/meshbypass.log""#,
        ));
        assert_eq!(config.bpf_root, PathBuf::from("/run/mbx/bpf"));
        assert_eq!(config.cgroup_root, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(config.acceleration, Mode::ProxyOnly);
        assert_eq!(config.log_level, LogLevel::Debug);
        assert_eq!(config.log_level.filter(), log::LevelFilter::Debug);
        assert_eq!(config.log_file, Some(PathBuf::from("/var/log/meshbypass.log")));
        assert_eq!(
            config.kubernetes.kubeconfig,
            Some(PathBuf::from("/etc/cni/net.d/meshbypass-kubeconfig"))
        );
        assert!(config.kubernetes.exclude_namespaces.is_empty());
        let spec = config.redirect;
        assert_eq!((spec.outbound_port, spec.inbound_port), (16001, 16006));
        assert_eq!((spec.proxy_uid, spec.proxy_gid), (2000, Some(3000)));
        assert_eq!(spec.exclude_outbound_ports, vec![22, 443], "deduplicated");
        assert_eq!(spec.exclude_inbound_ports, vec![8081]);
        assert_eq!(
            spec.exclude_outbound_cidrs,
            cidrs(&["169.254.169.254/32", "fd00::/8"])
        );
        assert_eq!(
            spec.include_outbound_cidrs,
            OutboundCidrs::Only(cidrs(&["10.0.0.0/8"]))
        );
        assert_eq!(spec.include_inbound_ports, InboundPorts::Only(vec![8080, 9090]));
        assert_eq!(spec.exclude_inbound_cidrs, cidrs(&["192.168.0.0/16"]));
        assert_eq!(spec.exclude_interfaces.len(), 1);
        assert_eq!(spec.exclude_interfaces[0].as_str(), "eth1");
    }

    #[test]
    fn wildcards_and_empty_lists() {
        let spec = parse(&with(
            r#","redirect":{"includeInboundPorts":"*","includeOutboundCidrs":"*","excludeOutboundPorts":[]}"#,
        ))
        .redirect;
        assert_eq!(spec.include_inbound_ports, InboundPorts::All);
        assert_eq!(spec.include_outbound_cidrs, OutboundCidrs::All);
        assert!(
            spec.exclude_outbound_ports.is_empty(),
            "[] overrides the profile default"
        );
        let spec = parse(&with(
            r#","redirect":{"includeInboundPorts":[],"includeOutboundCidrs":[]}"#,
        ))
        .redirect;
        assert_eq!(spec.include_inbound_ports, InboundPorts::Only(vec![]));
        assert_eq!(spec.include_outbound_cidrs, OutboundCidrs::Only(vec![]));
        let err = parse_err(&with(r#","redirect":{"includeInboundPorts":"all"}"#));
        assert!(
            matches!(&err, ConfigError::Invalid { path, .. } if path == "redirect.includeInboundPorts"),
            "unexpected {err:?}"
        );
    }

    #[test]
    fn runtime_injected_keys_are_accepted() {
        let config = parse(&with(
            r#",
            "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]},
            "args": {"cni": {"labels": [{"key": "app", "value": "web"}]}},
            "capabilities": {"portMappings": true},
            "prevResult": {"cniVersion": "1.1.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
                           "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0}],
                           "dns": {}}"#,
        ));
        let prev = config.prev_result.expect("prevResult kept");
        assert_eq!(prev["ips"][0]["address"], "10.244.1.7/24");
        assert_eq!(prev["dns"], serde_json::json!({}));
    }

    #[test]
    fn kubernetes_timeout_is_bounded() {
        let config = parse(&with(r#","kubernetes":{"timeoutSeconds":2.5}"#));
        assert_eq!(config.kubernetes.timeout, Duration::from_millis(2500));
        for bad in ["0", "-1", "121", "1e300"] {
            let err = parse_err(&with(&format!(r#","kubernetes":{{"timeoutSeconds":{bad}}}"#)));
            assert!(
                matches!(err, ConfigError::KubernetesTimeout { .. }),
                "{bad}: unexpected {err:?}"
            );
        }
    }

    #[test]
    fn gc_attachments_under_either_key() {
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            let config = parse(&with(&format!(
                r#","{key}":[{{"containerID":"abc123","ifname":"eth0"}},{{"containerID":"def","ifname":"net1"}}]"#
            )));
            let list = config.valid_attachments.expect("attachments kept");
            assert_eq!(list.len(), 2);
            assert_eq!(list[0].container_id.as_str(), "abc123");
            assert_eq!(list[1].ifname.as_str(), "net1");
        }
        let err = parse_err(&with(
            r#","cni.dev/valid-attachments":[{"containerID":"../x","ifname":"eth0"}]"#,
        ));
        assert!(matches!(err, ConfigError::Invalid { .. }), "unexpected {err:?}");
    }

    #[test]
    fn unknown_keys_are_named() {
        match parse_err(&with(r#","bpfroot":"/x""#)) {
            err @ ConfigError::UnknownKey { .. } => {
                let ConfigError::UnknownKey { key, .. } = &err else {
                    unreachable!()
                };
                assert_eq!(key, "bpfroot");
                assert!(err.to_string().contains("`bpfroot`"), "{err}");
            }
            other => panic!("expected UnknownKey, got {other:?}"),
        }
        match parse_err(&with(r#","redirect":{"outbondPort":1}"#)) {
            ConfigError::UnknownKey { key, .. } => assert_eq!(key, "redirect.outbondPort"),
            other => panic!("expected UnknownKey, got {other:?}"),
        }
        match parse_err(&with(r#","kubernetes":{"kubeConfig":"/x"}"#)) {
            ConfigError::UnknownKey { key, .. } => assert_eq!(key, "kubernetes.kubeConfig"),
            other => panic!("expected UnknownKey, got {other:?}"),
        }
        for key in ["ipam", "dns", "ipMasq", "dnsCapture"] {
            assert!(
                matches!(
                    parse_err(&with(&format!(r#","{key}":{{}}"#))),
                    ConfigError::UnknownKey { .. }
                ),
                "{key} is not ours"
            );
        }
    }

    #[test]
    fn bad_values_name_their_path() {
        for (extra, expected_path) in [
            (r#","redirect":{"outboundPort":0}"#, "redirect.outboundPort"),
            (r#","redirect":{"inboundPort":65536}"#, "redirect.inboundPort"),
            (r#","redirect":{"outboundPort":"15001"}"#, "redirect.outboundPort"),
            (
                r#","redirect":{"excludeOutboundPorts":[22,-1]}"#,
                "redirect.excludeOutboundPorts[1]",
            ),
            (
                r#","redirect":{"excludeOutboundCidrs":["10.0.0.0/33"]}"#,
                "redirect.excludeOutboundCidrs[0]",
            ),
            (
                r#","redirect":{"includeOutboundCidrs":["10.1.0.0/8"]}"#,
                "redirect.includeOutboundCidrs[0]",
            ),
            (
                r#","redirect":{"excludeInterfaces":["eth0:1"]}"#,
                "redirect.excludeInterfaces[0]",
            ),
            (r#","mesh":"consul""#, "mesh"),
            (r#","acceleration":"fast""#, "acceleration"),
            (r#","logLevel":"trace""#, "logLevel"),
        ] {
            match parse_err(&with(extra)) {
                ConfigError::Invalid { path, .. } => assert_eq!(path, expected_path, "for {extra}"),
                other => panic!("{extra} should be Invalid at {expected_path}, got {other:?}"),
            }
        }
        let err = parse_err(&with(r#","redirect":{"outboundPort":0}"#));
        let detail = std::error::Error::source(&err)
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(detail.contains("1..=65535"), "says what to fix: {detail}");
    }

    #[test]
    fn semantic_checks() {
        assert!(matches!(
            parse_err(&with(r#","redirect":{"outboundPort":15006}"#)),
            ConfigError::SamePorts { port: 15006 }
        ));
        assert!(matches!(
            parse_err(&with(r#","redirect":{"includeInboundPorts":[80,15021]}"#)),
            ConfigError::ReservedInboundPort {
                port: 15021,
                mesh: Mesh::Istio
            }
        ));
        assert!(matches!(
            parse_err(&with(
                r#","mesh":"linkerd","redirect":{"includeInboundPorts":[4191]}"#
            )),
            ConfigError::ReservedInboundPort {
                port: 4191,
                mesh: Mesh::Linkerd
            }
        ));
        assert!(matches!(
            parse_err(&with(r#","bpfRoot":"bpf""#)),
            ConfigError::RelativePath { key: "bpfRoot", .. }
        ));
        assert!(matches!(
            parse_err(&with(r#","logFile":"x.log""#)),
            ConfigError::RelativePath { key: "logFile", .. }
        ));
        match parse_err(r#"{"cniVersion":"1.1.0","name":"n","type":"bridge"}"#) {
            ConfigError::WrongType { found } => assert_eq!(found, "bridge"),
            other => panic!("expected WrongType, got {other:?}"),
        }
    }

    #[test]
    fn version_and_decode_errors() {
        for version in crate::version::SUPPORTED_VERSIONS {
            let json = format!(r#"{{"cniVersion":"{version}","name":"n","type":"meshbypass"}}"#);
            let config = NetConf::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{version}: {e}"));
            assert_eq!(config.cni_version, version);
        }
        let err = parse_err(r#"{"cniVersion":"0.2.0","name":"n","type":"meshbypass"}"#);
        assert!(err.is_version(), "unexpected {err:?}");
        assert!(err.to_string().contains("1.1.0"), "lists supported: {err}");
        for bad in ["", "{", "not json", r#"{"cniVersion":"1.1.0",}"#] {
            let err = parse_err(bad);
            assert!(err.is_decode(), "{bad:?} should be a decode error, got {err:?}");
        }
        assert!(matches!(
            parse_err(r#"{"name":"n","type":"meshbypass"}"#),
            ConfigError::Invalid { .. }
        ));
    }
}
