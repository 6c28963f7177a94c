//! Who may run a privileged test. The suite in `tests/` (not a default
//! member of the workspace, as aya keeps its integration tests: a plain
//! `cargo test` leaves it out) needs root throughout and fails at once
//! without it ([`require_root`]). Privileged tests inside the other crates,
//! which `cargo test` does run, skip visibly when not root and fail under CI
//! ([`privileged`]). `scripts/test.sh` runs everything, as root.

use std::io::Write;

/// Panics unless running as root: the caller needs netns, cgroups and bpf.
#[track_caller]
pub fn require_root() {
    assert!(
        is_root(),
        "privileged tests need root: run scripts/test.sh as root (or `cargo test --workspace` as root)"
    );
}

/// Whether the privileged test calling it runs: true as root, where a
/// prerequisite the test then finds missing is its failure. Not root, it
/// fails under CI (`CI` set to anything but `false` or `0`; CI runs the suite
/// as root), and elsewhere writes `SKIPPED <test>: …` on the terminal and
/// returns false, so that the test returns having checked nothing, and says
/// so. (`cargo test` captures `eprint!` and shows it only for a failing test,
/// so the line goes to the stderr handle itself, which it does not capture.)
#[track_caller]
pub fn privileged() -> bool {
    if is_root() {
        return true;
    }
    let test = test_name();
    assert!(
        !under_ci(),
        "{test} needs root, and CI must run it: run scripts/test.sh as root"
    );
    let line = format!("SKIPPED {test}: needs root; scripts/test.sh runs it (as root)\n");
    std::io::stderr()
        .lock()
        .write_all(line.as_bytes())
        .expect("write to stderr");
    false
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// libtest names each test's thread after the test; elsewhere, the caller's place.
#[track_caller]
fn test_name() -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_owned(),
        _ => std::panic::Location::caller().to_string(),
    }
}
