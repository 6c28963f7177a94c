//! Which pods are meshed. Without `kubernetes.kubeconfig` every pod outside
//! `excludeNamespaces` is; the API-driven policy (annotations of Istio and
//! Linkerd) plugs in behind the same trait.

use crate::{config::Config, env::CniArgs, error::CniError};

/// What the policy says about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Mesh,
    Skip { reason: String },
}

pub trait PodPolicy {
    fn decide(&self, pod: &CniArgs) -> Result<Decision, CniError>;
}

/// Every pod outside the excluded namespaces.
pub struct StaticPolicy<'a> {
    pub exclude_namespaces: &'a [String],
}

impl PodPolicy for StaticPolicy<'_> {
    fn decide(&self, pod: &CniArgs) -> Result<Decision, CniError> {
        match &pod.pod_namespace {
            Some(ns) if self.exclude_namespaces.iter().any(|x| x == ns) => Ok(Decision::Skip {
                reason: format!("namespace {ns} is in kubernetes.excludeNamespaces"),
            }),
            _ => Ok(Decision::Mesh),
        }
    }
}

/// The policy the configuration asks for.
pub fn for_config(config: &Config) -> Result<Box<dyn PodPolicy + '_>, CniError> {
    if config.kubernetes.kubeconfig.is_some() {
        return Err(CniError::UnsupportedField {
            field: "kubernetes.kubeconfig".into(),
            value: config
                .kubernetes
                .kubeconfig
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            fix: "pod policy from the Kubernetes API is not in this version; remove the key to mesh \
                  every pod outside kubernetes.excludeNamespaces",
        });
    }
    Ok(Box::new(StaticPolicy {
        exclude_namespaces: &config.kubernetes.exclude_namespaces,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_listed_namespaces_only() {
        let ex = vec!["kube-system".to_owned()];
        let p = StaticPolicy {
            exclude_namespaces: &ex,
        };
        let args = |ns: &str| CniArgs::parse(&format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns}")).unwrap();
        assert!(matches!(
            p.decide(&args("kube-system")).unwrap(),
            Decision::Skip { .. }
        ));
        assert_eq!(p.decide(&args("default")).unwrap(), Decision::Mesh);
        assert_eq!(p.decide(&CniArgs::parse("").unwrap()).unwrap(), Decision::Mesh);
    }
}
