//! stdin as the plugin reads it: `NetConf::parse` on arbitrary bytes, then, for
//! every configuration it accepts, the rules it would install (both families)
//! and the error reply it would print for one it refuses. Properties: no
//! panic; an accepted configuration always renders one well-formed
//! `iptables-restore` commit whose lines are only ours.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbypass_cni::{cidr::Family, config::NetConf, error::CniError, iptables};

/// Lines `ruleset` may emit: a comment, the table, chain declarations of ours,
/// rules appended to our chains or to the two hooks, the commit.
fn check_ruleset(text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("# meshbypass")),
        "{text}"
    );
    assert_eq!(lines.iter().filter(|l| **l == "*nat").count(), 1, "{text}");
    assert_eq!(lines.last(), Some(&"COMMIT"), "{text}");
    assert_eq!(lines.iter().filter(|l| **l == "COMMIT").count(), 1, "{text}");
    for line in &lines[1..] {
        let ok = *line == "*nat"
            || *line == "COMMIT"
            || (line.starts_with(":MESHBYPASS_") && line.ends_with(" - [0:0]"))
            || [
                "-A MESHBYPASS_",
                "-A PREROUTING -p tcp -j MESHBYPASS_",
                "-A OUTPUT -p tcp -j MESHBYPASS_",
            ]
            .iter()
            .any(|p| line.starts_with(p));
        assert!(ok, "unexpected line {line:?} in\n{text}");
        assert!(!line.contains('\r') && !line.contains('\0'), "{line:?}");
    }
    // Parsing our own output finds exactly our chains and both hooks.
    assert!(
        iptables::inspect(text).chains.len() == iptables::CHAINS.len(),
        "{text}"
    );
}

fuzz_target!(|data: &[u8]| {
    // kubernetes.kubeconfig is read from disk: keep the fuzzer away from
    // device and pseudo files (an unbounded /dev/zero would only measure RAM).
    for bad in [&b"/dev"[..], b"/proc", b"/sys"] {
        if data.windows(bad.len()).any(|w| w == bad) {
            return;
        }
    }
    match NetConf::parse(data) {
        Ok(config) => {
            for family in Family::ALL {
                check_ruleset(&iptables::ruleset(&config.redirect, family));
            }
        }
        Err(e) => {
            let e = CniError::from(e);
            let reply = e.reply("1.1.0").to_json();
            let v: serde_json::Value = serde_json::from_str(&reply).expect("the error reply is JSON");
            assert!(matches!(e.code(), 1 | 6 | 7), "code {} for {e}", e.code());
            assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{reply}");
        }
    }
});
