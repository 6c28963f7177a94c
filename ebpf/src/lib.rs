//! meshbypass's kernel side and its node-wide state: the sockops/sk_msg
//! programs (C, `bpf/`), the typed mirror of their maps, the shared loader
//! that pins them once per node, pod registration, cgroup attachment,
//! counters and the kernel hazard selftest.

pub mod abi;
#[cfg(test)]
mod alignchecker;
pub mod attach;
pub mod bpffs;
pub mod cgroup2;
pub mod chain;
pub mod counters;
mod fnv;
pub mod loader;
pub mod maps;
pub mod netns;
pub mod pins;
pub mod pods;
pub mod selftest;
mod sys;
pub mod usage;
pub mod verdict;

pub use abi::{Counter, Mode};
pub use fnv::fnv1a;
pub use loader::{LoadOptions, LoadOutcome, load, load_with, unload};
pub use maps::NodeMaps;
pub use pods::PodEntry;
pub use sys::SyscallError;
pub use verdict::Verdict;

/// The compiled kernel programs (built by build.rs with clang).
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshbypass.bpf.o"));
