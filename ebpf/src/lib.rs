//! meshbypass's kernel side and its node-wide state: the sockops/sk_msg
//! programs (C, `bpf/`), the typed mirror of their maps, the shared loader
//! that pins them once per node, pod registration, cgroup attachment,
//! counters and the kernel hazard selftest.

pub mod abi;
pub mod attach;
pub mod bpffs;
pub mod cgroup2;
pub mod counters;
pub mod loader;
pub mod netns;
pub mod pins;
pub mod pods;
pub mod selftest;
mod sys;
pub mod usage;

pub use abi::{Counter, Mode};
pub use loader::{LoadOptions, LoadOutcome, Node, load, load_with, unload};
pub use pods::PodEntry;

/// The compiled kernel programs (built by build.rs with clang).
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshbypass.bpf.o"));
