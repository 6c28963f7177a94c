//! Rule generation on arbitrary `iptables-save` text (what DEL, CHECK and a
//! repeated ADD read back from a pod's netns, where other tools may have
//! written anything): `inspect`, `cleanup`, `reapply`. Properties: no panic;
//! the input for `iptables-restore` only ever deletes jumps into our chains,
//! flushes and deletes our chains, or writes our own rules; one table, one
//! commit; nothing of ours found means nothing to do.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbypass_cni::{
    cidr::Family,
    config::{Mesh, RedirectSpec},
    iptables,
};

/// `saved`: the dump the text was made from; every `-D` must replay one of
/// its `-A` lines verbatim (so only rules that exist are ever deleted).
fn check_restore_input(text: &str, saved: &str, ours_only: bool) {
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("# meshbypass")),
        "{text}"
    );
    assert_eq!(lines.iter().filter(|l| **l == "*nat").count(), 1, "{text}");
    assert_eq!(lines.iter().filter(|l| **l == "COMMIT").count(), 1, "{text}");
    assert_eq!(lines.last(), Some(&"COMMIT"), "{text}");
    for line in &lines[1..] {
        if *line == "*nat" || *line == "COMMIT" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("-D ") {
            // A replayed jump: a saved rule, verbatim, outside our chains.
            let append = format!("-A {rest}");
            assert!(
                saved.lines().any(|l| l.trim() == append),
                "{line:?} replays no saved rule"
            );
            assert!(!rest.trim_start().starts_with(iptables::CHAIN_PREFIX), "{line:?}");
            continue;
        }
        let ours = ["-F MESHBYPASS_", "-X MESHBYPASS_"]
            .iter()
            .any(|p| line.starts_with(p));
        let generated = !ours_only
            && ((line.starts_with(":MESHBYPASS_") && line.ends_with(" - [0:0]"))
                || line.starts_with("-A MESHBYPASS_")
                || line.starts_with("-A PREROUTING -p tcp -j MESHBYPASS_")
                || line.starts_with("-A OUTPUT -p tcp -j MESHBYPASS_"));
        assert!(ours || generated, "unexpected line {line:?} in\n{text}");
    }
}

fuzz_target!(|data: &[u8]| {
    let saved = String::from_utf8_lossy(data);
    let installed = iptables::inspect(&saved);
    for jump in &installed.jumps {
        assert!(jump.starts_with("-A "), "{jump:?}");
        assert!(!jump.contains('\n'), "{jump:?}");
    }
    for chain in &installed.chains {
        assert!(chain.starts_with(iptables::CHAIN_PREFIX), "{chain:?}");
    }
    match iptables::cleanup(&saved) {
        None => assert!(installed.is_empty()),
        Some(text) => {
            assert!(!installed.is_empty());
            check_restore_input(&text, &saved, true);
        }
    }
    let mesh = if data.first().is_some_and(|b| b & 1 == 1) {
        Mesh::Linkerd
    } else {
        Mesh::Istio
    };
    let spec = RedirectSpec::defaults(mesh);
    for family in Family::ALL {
        let text = iptables::reapply(&saved, &spec, family);
        check_restore_input(&text, &saved, false);
        // Reapplying over our own fresh rules finds them complete.
        let fresh = iptables::ruleset(&spec, family);
        assert!(iptables::inspect(&fresh).is_complete(), "{fresh}");
    }
});
