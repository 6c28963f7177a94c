//! The CNI environment: `Env::read` on an arbitrary map of variables (the
//! CNI_* names and others, arbitrary values) and `CniArgs::parse` on the raw
//! input. Properties: no panic; whatever is accepted as a container ID,
//! interface name or pod UID cannot name another directory; the netns path is
//! absolute.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use meshbypass_cni::env::{self, CniArgs, Env};

const VARS: [&str; 8] = [
    env::CNI_COMMAND,
    env::CNI_CONTAINERID,
    env::CNI_NETNS,
    env::CNI_IFNAME,
    env::CNI_ARGS,
    env::CNI_PATH,
    "CNI_COMMAND",
    "UNRELATED",
];
const COMMANDS: [&str; 7] = ["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC", "add"];

fn safe_component(s: &str) {
    assert!(!s.is_empty() && s != "." && s != "..", "{s:?}");
    assert!(!s.contains('/') && !s.contains('\0'), "{s:?}");
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // CNI_ARGS alone.
    if let Ok(args) = CniArgs::parse(&text) {
        if let Some(uid) = &args.pod_uid {
            safe_component(uid.as_str());
            safe_component(&uid.systemd_escaped());
        }
        if let Some(id) = &args.infra_container_id {
            safe_component(id.as_str());
        }
    }
    // A whole environment: lines "V=value", V picked by the first byte, so
    // the fuzzer reaches every variable; the first line's byte also picks
    // CNI_COMMAND among the commands (or keeps what the lines say).
    let mut lines = text.split('\n');
    let mut vars: HashMap<String, String> = HashMap::new();
    if let Some(first) = lines.next() {
        let pick = first.bytes().next().unwrap_or(0) as usize;
        if pick % 4 != 0 {
            vars.insert(env::CNI_COMMAND.into(), COMMANDS[pick % COMMANDS.len()].into());
        }
    }
    for line in lines {
        let mut bytes = line.chars();
        let Some(c) = bytes.next() else { continue };
        let var = VARS[c as usize % VARS.len()];
        vars.insert(var.into(), bytes.as_str().into());
    }
    if let Ok(env) = Env::read(&vars) {
        if let Some(att) = &env.attachment {
            safe_component(att.container_id.as_str());
            safe_component(att.ifname.as_str());
            assert!(att.ifname.as_str().len() <= 15);
            if let Some(ns) = &att.netns {
                assert!(ns.is_absolute(), "{ns:?}");
            }
            if let Some(uid) = &att.args.pod_uid {
                safe_component(uid.as_str());
            }
        }
    }
});
