//! The datapath's per-CPU counters, summed.

use std::collections::BTreeMap;

use aya::maps::MapError;

use crate::{abi::Counter, loader::Node};

/// Counter name -> value, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Counters(pub BTreeMap<&'static str, u64>);

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0.get(c.name()).copied().unwrap_or(0)
    }
}

impl Node {
    pub fn counters(&self) -> Result<Counters, MapError> {
        let mut out = BTreeMap::new();
        for c in Counter::ALL {
            let per_cpu = self.counters.get(&(c as u32), 0)?;
            out.insert(c.name(), per_cpu.iter().sum());
        }
        Ok(Counters(out))
    }
}
