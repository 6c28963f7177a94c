//! Which pods are meshed, and with which redirect and acceleration.
//!
//! Without `kubernetes.kubeconfig` every pod outside `excludeNamespaces` is, with the
//! configuration's settings ([`StaticPolicy`]). With it, [`KubePolicy`] reads the pod (and, when
//! it is meshed, its namespace) from the API server and decides as istio-cni and linkerd-cni do
//! (see `kubepod`).
//!
//! Failing open is an outage (istio#17583): a meshed pod started without its redirect sends
//! around its proxy. So when the API server cannot answer within `kubernetes.timeoutSeconds`
//! (unreachable, slow, 401, 403, 5xx, or 404 because it has not seen the pod the runtime is
//! creating yet) ADD fails with code 11 and the runtime tries again; a pod whose CNI_ARGS carry a
//! `K8S_POD_UID` other than the API's object is treated the same way (a StatefulSet pod recreated
//! under the same name). DEL and GC never ask the API.
//!
//! Error codes: 11 as above; 7 for an unusable kubeconfig; 2 for a pod annotation we cannot honour
//! (TPROXY, a malformed port list), naming the annotation; 4 for a pod name or namespace in
//! CNI_ARGS that cannot be a Kubernetes name; 103 for an answer that is not a Pod.

use std::time::Instant;

use crate::{
    config::{ConfigError, Mode, NetConf, RedirectSpec},
    env::{CniArgs, EnvError},
    error::CniError,
    ids::IdError,
    kubeapi::{ApiError, Client},
    kubeconfig,
    kubepod::{self, Injected, Namespace, Pod, PodSettingError},
};

/// What the policy says about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Redirect (and accelerate) the pod with these settings.
    Mesh {
        redirect: Box<RedirectSpec>,
        acceleration: Mode,
        reason: String,
    },
    Skip {
        reason: String,
    },
}

pub trait PodPolicy {
    fn decide(&self, pod: &CniArgs) -> Result<Decision, CniError>;
}

/// Every pod outside the excluded namespaces, with the configuration's settings.
pub struct StaticPolicy<'a> {
    pub config: &'a NetConf,
}

impl PodPolicy for StaticPolicy<'_> {
    fn decide(&self, pod: &CniArgs) -> Result<Decision, CniError> {
        if let Some(skip) = excluded(self.config, pod) {
            return Ok(skip);
        }
        Ok(Decision::Mesh {
            redirect: Box::new(self.config.redirect.clone()),
            acceleration: self.config.acceleration,
            reason: "every pod outside kubernetes.excludeNamespaces is meshed (no kubernetes.kubeconfig)"
                .into(),
        })
    }
}

fn excluded(config: &NetConf, pod: &CniArgs) -> Option<Decision> {
    let ns = pod.pod_namespace.as_ref()?;
    config
        .kubernetes
        .exclude_namespaces
        .iter()
        .any(|x| x == ns)
        .then(|| Decision::Skip {
            reason: format!("namespace {ns} is in kubernetes.excludeNamespaces"),
        })
}

/// The pod's own annotations, read from the API server.
pub struct KubePolicy<'a> {
    config: &'a NetConf,
    client: Client,
}

impl<'a> KubePolicy<'a> {
    pub fn new(config: &'a NetConf, client: Client) -> KubePolicy<'a> {
        KubePolicy { config, client }
    }
}

impl PodPolicy for KubePolicy<'_> {
    fn decide(&self, args: &CniArgs) -> Result<Decision, CniError> {
        let (Some(namespace), Some(name)) = (&args.pod_namespace, &args.pod_name) else {
            // As istio-cni and linkerd-cni: without a pod identity this is no Kubernetes pod.
            return Ok(Decision::Skip {
                reason: "CNI_ARGS has no K8S_POD_NAMESPACE and K8S_POD_NAME, so this is not a Kubernetes pod"
                    .into(),
            });
        };
        if let Some(skip) = excluded(self.config, args) {
            return Ok(skip);
        }
        object_name("CNI_ARGS K8S_POD_NAMESPACE", namespace)?;
        object_name("CNI_ARGS K8S_POD_NAME", name)?;
        let deadline = Instant::now() + self.config.kubernetes.timeout;
        let want_uid = args.pod_uid.as_ref().map(|uid| uid.as_str());
        let pod: Pod = self
            .client
            .get(&format!("/api/v1/namespaces/{namespace}/pods/{name}"), deadline, |pod: &Pod| {
                is_kind(pod.kind.as_deref(), "Pod")?;
                match (want_uid, pod.metadata.uid.as_deref()) {
                    (Some(want), Some(have)) if want != have => Err(format!(
                        "the API server has pod {namespace}/{name} with uid {have}, not the {want} being created"
                    )),
                    _ => Ok(()),
                }
            })
            .map_err(api_error)?;
        let mesh = match kubepod::injected(&pod).map_err(setting_error)? {
            Injected::No { reason } => return Ok(Decision::Skip { reason }),
            Injected::Mesh(mesh) => mesh,
        };
        let ns: Namespace = self
            .client
            .get(
                &format!("/api/v1/namespaces/{namespace}"),
                deadline,
                |ns: &Namespace| is_kind(ns.kind.as_deref(), "Namespace"),
            )
            .map_err(api_error)?;
        let (redirect, acceleration) =
            kubepod::settings(&pod, &ns, mesh, self.config).map_err(setting_error)?;
        Ok(Decision::Mesh {
            redirect: Box::new(redirect),
            acceleration,
            reason: format!("{mesh} injected a sidecar into {namespace}/{name}"),
        })
    }
}

/// A `kind` other than the one asked for (a `Status` with code 200, a list) is not an answer yet.
fn is_kind(kind: Option<&str>, want: &str) -> Result<(), String> {
    match kind {
        Some(kind) if kind != want => Err(format!("the answer is a {kind}, not a {want}")),
        _ => Ok(()),
    }
}

/// Pod names are DNS subdomains and namespaces DNS labels: lowercase letters, digits, `-` and `.`.
/// Checking keeps anything else out of the request path.
fn object_name(var: &'static str, value: &str) -> Result<(), CniError> {
    const ALLOWED: &str = "lowercase letters, digits, '-' and '.'";
    let problem = if value.len() > 253 {
        Some(IdError::TooLong {
            len: value.len(),
            max: 253,
        })
    } else if let Some(found) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
    {
        Some(IdError::BadChar {
            found,
            allowed: ALLOWED,
        })
    } else if value.starts_with('.') {
        Some(IdError::BadStart { found: '.' })
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(CniError::Env(EnvError::Invalid {
            var,
            value: value.to_owned(),
            what: "Kubernetes object name",
            problem,
        })),
    }
}

fn api_error(err: ApiError) -> CniError {
    match err {
        ApiError::Decode { .. } => CniError::Internal {
            action: "decoding the Kubernetes API server's answer",
            source: Box::new(err),
        },
        _ => CniError::TryAgainLater {
            what: "the Kubernetes API server",
            source: Box::new(err),
        },
    }
}

fn setting_error(err: PodSettingError) -> CniError {
    CniError::UnsupportedField {
        field: err.key,
        value: format!("{:?}", err.value),
        fix: err.fix,
    }
}

/// The policy the configuration asks for. A kubeconfig that cannot be used is an invalid
/// configuration (7).
pub fn for_config(config: &NetConf) -> Result<Box<dyn PodPolicy + '_>, CniError> {
    match &config.kubernetes.kubeconfig {
        None => Ok(Box::new(StaticPolicy { config })),
        Some(path) => {
            let access = kubeconfig::load(path).map_err(|source| {
                CniError::Config(ConfigError::Kubeconfig {
                    path: path.clone(),
                    source,
                })
            })?;
            Ok(Box::new(KubePolicy::new(config, Client::new(access))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> NetConf {
        let json = format!(r#"{{"cniVersion":"1.1.0","name":"n","type":"meshbypass"{extra}}}"#);
        NetConf::parse(json.as_bytes()).expect("config")
    }

    #[test]
    fn static_policy_excludes_listed_namespaces_only() {
        let config = config("");
        let p = StaticPolicy { config: &config };
        let args =
            |ns: &str| CniArgs::parse(&format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns}")).expect("args");
        assert!(matches!(
            p.decide(&args("kube-system")).expect("decides"),
            Decision::Skip { .. }
        ));
        let meshed = |d: Decision| match d {
            Decision::Mesh {
                redirect,
                acceleration,
                ..
            } => (*redirect, acceleration),
            other => panic!("should be meshed: {other:?}"),
        };
        assert_eq!(
            meshed(p.decide(&args("default")).expect("decides")),
            (config.redirect.clone(), config.acceleration)
        );
        meshed(p.decide(&CniArgs::parse("").expect("args")).expect("decides"));
    }

    #[test]
    fn object_names_stay_out_of_paths() {
        for bad in ["../x", "a/b", "Web", "a?b", ".x", "a%2f"] {
            let err = object_name("CNI_ARGS K8S_POD_NAME", bad).expect_err(bad);
            assert_eq!(err.code(), 4, "{bad}: {err}");
        }
        for good in ["web-0", "a.b-c", "x"] {
            object_name("CNI_ARGS K8S_POD_NAME", good).expect(good);
        }
    }

    #[test]
    fn unusable_kubeconfig_is_code_7() {
        let config = config(r#","kubernetes":{"kubeconfig":"/nonexistent/meshbypass.kubeconfig"}"#);
        let err = for_config(&config).err().expect("no kubeconfig file");
        assert_eq!(err.code(), 7, "{err}");
        assert!(
            err.to_string().contains("/nonexistent/meshbypass.kubeconfig"),
            "{err}"
        );
    }
}
