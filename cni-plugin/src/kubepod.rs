//! What a pod object says about its sidecar: the few fields of `Pod` and `Namespace` we read, which
//! mesh injected the pod (as istio-cni and linkerd-cni decide it), and the pod's own redirect and
//! acceleration from its annotations. Pure functions: the API lookups are in `policy`.
//!
//! # Istio (istio-cni's `cni/pkg/plugin`)
//!
//! Meshed when an `istio-proxy` container (or native-sidecar init container) is present, it runs
//! as a sidecar (`args: [proxy, sidecar, …]`, not `router`), its `DISABLE_ENVOY` is not true, the
//! pod has no `istio-init` init container (that one programs the redirect itself), injection is not
//! disabled (`sidecar.istio.io/inject` label, else annotation, `"false"`) and the injector's
//! `sidecar.istio.io/status` annotation is present. Per pod: `traffic.sidecar.istio.io/`
//! `includeInboundPorts`, `excludeInboundPorts`, `excludeOutboundPorts`,
//! `includeOutboundIPRanges`, `excludeOutboundIPRanges`, `excludeInterfaces`, and the proxy's
//! UID/GID from the `istio-proxy` container's `securityContext.runAsUser`/`runAsGroup` (0 or absent
//! keeps the default). `sidecar.istio.io/interceptionMode` must be `REDIRECT`.
//!
//! # Linkerd (linkerd-cni's `cni-plugin/main.go`)
//!
//! Meshed when a `linkerd-proxy` container (or native-sidecar init container) is present, there is
//! no `linkerd-init` init container, and `linkerd.io/inject` is not `disabled`. Per pod, the pod's
//! annotation or else its namespace's: `config.linkerd.io/skip-outbound-ports`,
//! `skip-inbound-ports` (ports and `a-b` ranges), `skip-subnets` (inbound sources, as proxy-init)
//! and `proxy-uid`. Control-plane pods (`linkerd.io/control-plane-component`) also skip outbound
//! 443 and 6443 so they reach the API server.
//!
//! # Ours
//!
//! `meshbypass.io/acceleration: auto|all|proxy-only|off` on the pod, else on its namespace, else
//! the plugin's `acceleration`. Pods labelled `app.kubernetes.io/name: meshbypass-node` (the node
//! agent's own) are never meshed. An annotation replaces the plugin configuration's value for that
//! key; the mesh profile is the injected mesh's, with the configuration's `redirect` as the base
//! only when the configuration's `mesh` is that mesh.

use std::collections::BTreeMap;

use log::warn;
use serde::Deserialize;

use crate::cidr::Cidr;
use crate::config::{InboundPorts, Mesh, Mode, NetConf, OutboundCidrs, RedirectSpec};
use crate::ids::IfName;

pub const ISTIO_PROXY: &str = "istio-proxy";
pub const ISTIO_INIT: &str = "istio-init";
pub const LINKERD_PROXY: &str = "linkerd-proxy";
pub const LINKERD_INIT: &str = "linkerd-init";

pub const ISTIO_STATUS: &str = "sidecar.istio.io/status";
pub const ISTIO_INJECT: &str = "sidecar.istio.io/inject";
pub const ISTIO_INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
pub const ISTIO_INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const ISTIO_EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const ISTIO_INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const ISTIO_EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const ISTIO_INCLUDE_OUTBOUND_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const ISTIO_EXCLUDE_OUTBOUND_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const ISTIO_EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";

pub const LINKERD_INJECT: &str = "linkerd.io/inject";
pub const LINKERD_CONTROL_PLANE: &str = "linkerd.io/control-plane-component";
pub const LINKERD_SKIP_OUTBOUND_PORTS: &str = "config.linkerd.io/skip-outbound-ports";
pub const LINKERD_SKIP_INBOUND_PORTS: &str = "config.linkerd.io/skip-inbound-ports";
pub const LINKERD_SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
pub const LINKERD_PROXY_UID: &str = "config.linkerd.io/proxy-uid";

pub const ACCELERATION: &str = "meshbypass.io/acceleration";
/// The label that marks the node agent's own pods (install/deploy/daemonset.yaml). The agent runs
/// with hostNetwork, so the runtime does not even call CNI for it; this keeps it unmeshed if that
/// ever changes.
pub const AGENT_LABEL: (&str, &str) = ("app.kubernetes.io/name", "meshbypass-node");

/// The widest port range (`a-b`) a Linkerd annotation may expand to; each 15 ports are one rule.
const MAX_RANGE_PORTS: usize = 1024;
/// What linkerd-cni skips outbound for control-plane pods when it cannot read the `kubernetes`
/// service's ports.
const LINKERD_CONTROL_PLANE_SKIP: [u16; 2] = [443, 6443];

/// The parts of a `v1.Pod` the policy reads (the API object, not the plugin's `PodRecord`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

/// The parts of a `v1.Namespace` the policy reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, deserialize_with = "null_as_default")]
    pub containers: Vec<Container>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub init_containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub args: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub security_context: Option<SecurityContext>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    /// Absent for `valueFrom`, which we do not resolve.
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    #[serde(default)]
    pub run_as_user: Option<i64>,
    #[serde(default)]
    pub run_as_group: Option<i64>,
}

/// `null` where Kubernetes omits nothing but a client may send `null`.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

impl Pod {
    /// Containers then init containers (a native sidecar is an init container that keeps running).
    fn container(&self, name: &str) -> Option<&Container> {
        self.spec
            .containers
            .iter()
            .chain(&self.spec.init_containers)
            .find(|c| c.name == name)
    }

    fn has_init_container(&self, name: &str) -> bool {
        self.spec.init_containers.iter().any(|c| c.name == name)
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata.annotations.get(key).map(String::as_str)
    }
}

impl Container {
    fn env(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
    }
}

/// Which mesh injected the pod, or why it is not meshed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injected {
    Mesh(Mesh),
    No { reason: String },
}

/// A pod annotation (or container field) whose value we cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}={value:?}: {fix}")]
pub struct PodSettingError {
    pub key: String,
    pub value: String,
    pub fix: &'static str,
}

fn setting_error(key: &str, value: &str, fix: &'static str) -> PodSettingError {
    PodSettingError {
        key: key.to_owned(),
        value: value.to_owned(),
        fix,
    }
}

/// Go's `strconv.ParseBool`, which istio-cni uses for its flags.
fn go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Which mesh injected `pod`, as istio-cni and linkerd-cni decide it.
pub fn injected(pod: &Pod) -> Result<Injected, PodSettingError> {
    let no = |reason: &str| {
        Ok(Injected::No {
            reason: reason.to_owned(),
        })
    };
    if pod.metadata.labels.get(AGENT_LABEL.0).map(String::as_str) == Some(AGENT_LABEL.1) {
        return no("it is meshbypass's own node agent (label app.kubernetes.io/name=meshbypass-node)");
    }
    let istio = pod.container(ISTIO_PROXY);
    let linkerd = pod.container(LINKERD_PROXY);
    match (istio, linkerd) {
        (Some(_), Some(_)) => Err(setting_error(
            "spec.containers",
            "istio-proxy and linkerd-proxy",
            "a pod can be redirected to one sidecar proxy only; inject one mesh",
        )),
        (Some(proxy), None) => {
            if pod.has_init_container(ISTIO_INIT) {
                return no("its istio-init container programs the redirect itself");
            }
            if proxy.env("DISABLE_ENVOY").and_then(go_bool) == Some(true) {
                return no("DISABLE_ENVOY is true on istio-proxy (proxyless)");
            }
            if proxy.args.first().map(String::as_str) == Some("proxy")
                && let Some(kind) = proxy.args.get(1).filter(|kind| *kind != "sidecar")
            {
                return Ok(Injected::No {
                    reason: format!("istio-proxy runs as a {kind}, not a sidecar"),
                });
            }
            let inject = pod
                .metadata
                .labels
                .get(ISTIO_INJECT)
                .or_else(|| pod.metadata.annotations.get(ISTIO_INJECT));
            if inject.and_then(|v| go_bool(v)) == Some(false) {
                return no("sidecar.istio.io/inject is false");
            }
            if pod.annotation(ISTIO_STATUS).is_none() {
                return no("it has an istio-proxy container but no sidecar.istio.io/status annotation");
            }
            match pod.annotation(ISTIO_INTERCEPTION_MODE) {
                None | Some("REDIRECT") => Ok(Injected::Mesh(Mesh::Istio)),
                Some(mode) => Err(setting_error(
                    ISTIO_INTERCEPTION_MODE,
                    mode,
                    "meshbypass installs REDIRECT rules only (TPROXY is not supported); remove the annotation \
                     or set it to REDIRECT, or exclude the pod's namespace in kubernetes.excludeNamespaces",
                )),
            }
        }
        (None, Some(_)) => {
            if pod.has_init_container(LINKERD_INIT) {
                return no("its linkerd-init container programs the redirect itself");
            }
            if pod.annotation(LINKERD_INJECT) == Some("disabled") {
                return no("linkerd.io/inject is disabled");
            }
            Ok(Injected::Mesh(Mesh::Linkerd))
        }
        (None, None) => no("it has no istio-proxy or linkerd-proxy container"),
    }
}

/// The pod's own redirect and acceleration: the configuration, then the namespace's and the pod's
/// annotations, for the mesh that injected it.
pub fn settings(
    pod: &Pod,
    namespace: &Namespace,
    mesh: Mesh,
    config: &NetConf,
) -> Result<(RedirectSpec, Mode), PodSettingError> {
    let mut spec = if config.mesh() == mesh {
        config.redirect.clone()
    } else {
        RedirectSpec::defaults(mesh)
    };
    match mesh {
        Mesh::Istio => istio(pod, &mut spec)?,
        Mesh::Linkerd => linkerd(pod, namespace, &mut spec)?,
    }
    let acceleration = match pod.annotation(ACCELERATION).or_else(|| {
        namespace
            .metadata
            .annotations
            .get(ACCELERATION)
            .map(String::as_str)
    }) {
        None => config.acceleration,
        Some(value) => acceleration(value)?,
    };
    Ok((spec, acceleration))
}

fn acceleration(value: &str) -> Result<Mode, PodSettingError> {
    value
        .trim()
        .parse()
        .map_err(|_| setting_error(ACCELERATION, value, "use auto, all, proxy-only, adaptive or off"))
}

const PORTS_FIX: &str = "use a comma-separated list of ports 1-65535";
const CIDRS_FIX: &str = "use a comma-separated list of CIDRs (10.0.0.0/8, fd00::/8) or \"*\"";

fn istio(pod: &Pod, spec: &mut RedirectSpec) -> Result<(), PodSettingError> {
    let annotation = |key| pod.annotation(key);
    if let Some(value) = annotation(ISTIO_INCLUDE_INBOUND_PORTS) {
        spec.include_inbound_ports = match value.trim() {
            "*" => InboundPorts::All,
            list => InboundPorts::Only(ports(ISTIO_INCLUDE_INBOUND_PORTS, list, false)?),
        };
    }
    if let Some(value) = annotation(ISTIO_EXCLUDE_INBOUND_PORTS) {
        spec.exclude_inbound_ports = ports(ISTIO_EXCLUDE_INBOUND_PORTS, value, false)?;
    }
    if let Some(value) = annotation(ISTIO_EXCLUDE_OUTBOUND_PORTS) {
        spec.exclude_outbound_ports = ports(ISTIO_EXCLUDE_OUTBOUND_PORTS, value, false)?;
    }
    if let Some(value) = annotation(ISTIO_INCLUDE_OUTBOUND_RANGES) {
        spec.include_outbound_cidrs = match value.trim() {
            "*" => OutboundCidrs::All,
            list => OutboundCidrs::Only(cidrs(ISTIO_INCLUDE_OUTBOUND_RANGES, list)?),
        };
    }
    if let Some(value) = annotation(ISTIO_EXCLUDE_OUTBOUND_RANGES) {
        spec.exclude_outbound_cidrs = cidrs(ISTIO_EXCLUDE_OUTBOUND_RANGES, value)?;
    }
    if let Some(value) = annotation(ISTIO_EXCLUDE_INTERFACES) {
        spec.exclude_interfaces = items(value)
            .map(|name| {
                IfName::parse(name).map_err(|_| {
                    setting_error(
                        ISTIO_EXCLUDE_INTERFACES,
                        value,
                        "use a comma-separated list of interface names",
                    )
                })
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(value) = annotation(ISTIO_INCLUDE_OUTBOUND_PORTS) {
        let listed = ports(ISTIO_INCLUDE_OUTBOUND_PORTS, value, false)?;
        // These ports are captured whatever their destination. That is already so when every
        // destination is captured; anything narrower would leave them uncaptured, so say so.
        let everything =
            spec.include_outbound_cidrs == OutboundCidrs::All && spec.exclude_outbound_cidrs.is_empty();
        if !listed.is_empty() && !everything {
            return Err(setting_error(
                ISTIO_INCLUDE_OUTBOUND_PORTS,
                value,
                "meshbypass cannot capture ports outside includeOutboundIPRanges/excludeOutboundIPRanges; capture \
                 every destination (\"*\", nothing excluded) or remove the annotation",
            ));
        }
    }
    if pod
        .container(ISTIO_PROXY)
        .and_then(|c| c.env("ISTIO_META_DNS_CAPTURE"))
        .and_then(go_bool)
        == Some(true)
    {
        warn!(
            "ISTIO_META_DNS_CAPTURE is on, but meshbypass does not redirect DNS: the pod resolves directly"
        );
    }
    if let Some(proxy) = pod
        .container(ISTIO_PROXY)
        .and_then(|c| c.security_context.as_ref())
    {
        if let Some(uid) = id(
            "spec.containers[istio-proxy].securityContext.runAsUser",
            proxy.run_as_user,
        )? {
            spec.proxy_uid = uid;
        }
        if let Some(gid) = id(
            "spec.containers[istio-proxy].securityContext.runAsGroup",
            proxy.run_as_group,
        )? {
            spec.proxy_gid = Some(gid);
        }
    }
    Ok(())
}

/// A UID or GID from a securityContext; 0 and absent keep the default, as in istio-cni.
fn id(key: &str, value: Option<i64>) -> Result<Option<u32>, PodSettingError> {
    match value {
        None | Some(0) => Ok(None),
        Some(v) => u32::try_from(v)
            .map(Some)
            .map_err(|_| setting_error(key, &v.to_string(), "use a UID/GID between 1 and 4294967295")),
    }
}

fn linkerd(pod: &Pod, namespace: &Namespace, spec: &mut RedirectSpec) -> Result<(), PodSettingError> {
    // linkerd-cni's getAnnotationOverride: the pod's non-empty value, else the namespace's.
    let annotation = |key: &str| {
        pod.annotation(key)
            .filter(|v| !v.is_empty())
            .or_else(|| namespace.metadata.annotations.get(key).map(String::as_str))
            .filter(|v| !v.is_empty())
    };
    if let Some(value) = annotation(LINKERD_SKIP_OUTBOUND_PORTS) {
        spec.exclude_outbound_ports = ports(LINKERD_SKIP_OUTBOUND_PORTS, value, true)?;
    }
    if let Some(value) = annotation(LINKERD_SKIP_INBOUND_PORTS) {
        spec.exclude_inbound_ports = ports(LINKERD_SKIP_INBOUND_PORTS, value, true)?;
    }
    if let Some(value) = annotation(LINKERD_SKIP_SUBNETS) {
        spec.exclude_inbound_cidrs = cidrs(LINKERD_SKIP_SUBNETS, value)?;
    }
    if let Some(value) = annotation(LINKERD_PROXY_UID) {
        spec.proxy_uid = value
            .trim()
            .parse::<u32>()
            .map_err(|_| setting_error(LINKERD_PROXY_UID, value, "use a numeric UID"))?;
    }
    if pod
        .metadata
        .labels
        .get(LINKERD_CONTROL_PLANE)
        .is_some_and(|v| !v.is_empty())
    {
        for port in LINKERD_CONTROL_PLANE_SKIP {
            if !spec.exclude_outbound_ports.contains(&port) {
                spec.exclude_outbound_ports.push(port);
            }
        }
    }
    Ok(())
}

/// The non-empty, trimmed items of a comma-separated list.
fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|item| !item.is_empty())
}

/// A comma-separated list of ports (and, for Linkerd, `a-b` ranges), deduplicated, in order.
fn ports(key: &str, value: &str, ranges: bool) -> Result<Vec<u16>, PodSettingError> {
    let bad = |fix| setting_error(key, value, fix);
    let port = |text: &str| {
        text.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(PORTS_FIX))
    };
    let mut out: Vec<u16> = Vec::new();
    for item in items(value) {
        let (first, last) = match item.split_once('-') {
            Some((a, b)) if ranges => (port(a)?, port(b)?),
            _ => {
                let p = port(item)?;
                (p, p)
            }
        };
        if first > last || usize::from(last - first) >= MAX_RANGE_PORTS {
            return Err(bad("use ranges low-high of at most 1024 ports"));
        }
        for p in first..=last {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

fn cidrs(key: &str, value: &str) -> Result<Vec<Cidr>, PodSettingError> {
    let mut out: Vec<Cidr> = Vec::new();
    for item in items(value) {
        let cidr: Cidr = item.parse().map_err(|_| setting_error(key, value, CIDRS_FIX))?;
        if !out.contains(&cidr) {
            out.push(cidr);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("a pod")
    }

    #[test]
    fn port_lists_and_linkerd_ranges() {
        assert_eq!(ports("k", " 80, 443 ,80,", false).expect("ok"), vec![80, 443]);
        assert_eq!(ports("k", "", false).expect("ok"), Vec::<u16>::new());
        assert_eq!(
            ports("k", "25,4567-4569", true).expect("ok"),
            vec![25, 4567, 4568, 4569]
        );
        for (bad, ranges) in [
            ("0", false),
            ("65536", false),
            ("http", false),
            ("1-3", false),
            ("5-1", true),
        ] {
            let err = ports("k", bad, ranges).expect_err(bad);
            assert_eq!(err.value, bad);
        }
        assert!(ports("k", "1-65535", true).is_err(), "wide ranges are refused");
    }

    #[test]
    fn null_fields_are_empty() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "a", "labels": null, "annotations": null},
            "spec": {"containers": [{"name": "app", "args": null, "env": null}], "initContainers": null}
        }));
        assert!(p.metadata.annotations.is_empty());
        assert_eq!(
            injected(&p).expect("decides"),
            Injected::No {
                reason: "it has no istio-proxy or linkerd-proxy container".into()
            }
        );
    }

    #[test]
    fn istio_native_sidecar_and_label_override() {
        let mut p = pod(serde_json::json!({
            "metadata": {"name": "a", "annotations": {"sidecar.istio.io/status": "{}", "sidecar.istio.io/inject": "false"},
                         "labels": {"sidecar.istio.io/inject": "true"}},
            "spec": {"initContainers": [{"name": "istio-proxy", "args": ["proxy", "sidecar"]}],
                     "containers": [{"name": "app"}]}
        }));
        assert_eq!(
            injected(&p).expect("decides"),
            Injected::Mesh(Mesh::Istio),
            "the label wins"
        );
        p.metadata.labels.clear();
        assert!(matches!(injected(&p).expect("decides"), Injected::No { .. }));
    }

    fn config(extra: &str) -> NetConf {
        let json = format!(r#"{{"cniVersion":"1.1.0","name":"n","type":"meshbypass"{extra}}}"#);
        NetConf::parse(json.as_bytes()).expect("config")
    }

    fn istio_pod(annotations: serde_json::Value, security: serde_json::Value) -> Pod {
        let mut p = pod(serde_json::json!({
            "metadata": {"name": "a", "annotations": annotations},
            "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy", "args": ["proxy", "sidecar"],
                                                      "securityContext": security}]}
        }));
        p.metadata.annotations.insert(ISTIO_STATUS.into(), "{}".into());
        p
    }

    #[test]
    fn istio_settings_edge_cases() {
        let ns = Namespace::default();
        let cfg = config(r#","redirect":{"proxyUid":3000}"#);
        let p = istio_pod(serde_json::json!({}), serde_json::json!({"runAsUser": 0}));
        let (spec, accel) = settings(&p, &ns, Mesh::Istio, &cfg).expect("settings");
        assert_eq!(
            (spec.proxy_uid, accel),
            (3000, Mode::Auto),
            "runAsUser 0 keeps the configured UID"
        );

        let p = istio_pod(
            serde_json::json!({ISTIO_INCLUDE_OUTBOUND_PORTS: "443"}),
            serde_json::json!({}),
        );
        settings(&p, &ns, Mesh::Istio, &cfg).expect("every destination is captured anyway");
        let p = istio_pod(
            serde_json::json!({ISTIO_INCLUDE_OUTBOUND_PORTS: "443", ISTIO_EXCLUDE_OUTBOUND_RANGES: "10.0.0.0/8"}),
            serde_json::json!({}),
        );
        let err = settings(&p, &ns, Mesh::Istio, &cfg).expect_err("cannot be honoured");
        assert_eq!(err.key, ISTIO_INCLUDE_OUTBOUND_PORTS);

        let p = istio_pod(serde_json::json!({ACCELERATION: "fast"}), serde_json::json!({}));
        let err = settings(&p, &ns, Mesh::Istio, &cfg).expect_err("unknown mode");
        assert_eq!((err.key.as_str(), err.value.as_str()), (ACCELERATION, "fast"));

        let p = istio_pod(
            serde_json::json!({ISTIO_EXCLUDE_OUTBOUND_RANGES: "10.0.0.1/8"}),
            serde_json::json!({}),
        );
        assert!(settings(&p, &ns, Mesh::Istio, &cfg).is_err(), "host bits set");
    }

    #[test]
    fn linkerd_control_plane_skips_the_api_server_ports() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "linkerd-destination-0", "labels": {LINKERD_CONTROL_PLANE: "destination"},
                         "annotations": {LINKERD_SKIP_OUTBOUND_PORTS: "443"}},
            "spec": {"containers": [{"name": "linkerd-proxy"}, {"name": "destination"}]}
        }));
        assert_eq!(injected(&p).expect("decides"), Injected::Mesh(Mesh::Linkerd));
        let (spec, _) = settings(&p, &Namespace::default(), Mesh::Linkerd, &config("")).expect("settings");
        assert_eq!(spec.exclude_outbound_ports, vec![443, 6443]);
        assert_eq!(
            (spec.outbound_port, spec.proxy_uid),
            (4140, 2102),
            "the linkerd profile"
        );
    }

    #[test]
    fn both_proxies_is_an_error() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"containers": [{"name": "istio-proxy"}, {"name": "linkerd-proxy"}]}
        }));
        assert!(injected(&p).is_err());
    }
}
