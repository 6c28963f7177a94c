//! The datapath's per-CPU counters, summed.

use std::collections::BTreeMap;

use aya::maps::MapError;

use crate::{abi::Counter, maps::NodeMaps};

/// Counter name -> value, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Counters(pub BTreeMap<&'static str, u64>);

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0.get(c.name()).copied().unwrap_or(0)
    }
}

impl NodeMaps {
    pub fn counters(&self) -> Result<Counters, MapError> {
        let per_cpu = self.counters.get(&0, 0)?;
        let mut out = BTreeMap::new();
        for c in Counter::ALL {
            out.insert(c.name(), per_cpu.iter().map(|b| b.v[c as usize]).sum());
        }
        Ok(Counters(out))
    }
}
