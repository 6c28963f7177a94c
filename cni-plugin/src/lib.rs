//! The `meshbypass` chained CNI plugin: the CNI protocol (env, config,
//! errors), the pod's iptables redirect, pod cgroup discovery, and the
//! per-pod bypass through the ebpf library, and the pod policy (from the
//! Kubernetes API when a kubeconfig is configured).

pub mod bypass;
pub mod caps;
pub mod cgroup;
pub mod cidr;
pub mod cmd;
pub mod config;
pub mod env;
pub mod error;
pub mod ids;
pub mod iptables;
pub mod journal;
pub mod kubeapi;
pub mod kubeconfig;
pub mod kubepod;
pub mod logging;
pub mod policy;
pub mod prev;
pub mod redirect;
pub mod state;
pub mod version;
