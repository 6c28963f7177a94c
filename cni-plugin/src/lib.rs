//! The pure, unprivileged parts of the `meshbypass` chained CNI plugin: the CNI environment and
//! error protocol, the typed configuration, the iptables redirect rules, cgroup discovery.

pub mod cgroup;
pub mod cidr;
pub mod config;
pub mod env;
pub mod error;
pub mod ids;
pub mod iptables;
pub mod version;
