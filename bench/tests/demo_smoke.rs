//! A short run of the demo: no request errors, messages redirected by the
//! bypass, every mode what it claims, and nothing left behind. Root only.

use std::process::Command;

fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for (dir, prefix) in [
        ("/sys/fs/bpf", "meshbypass-bench-"),
        ("/run", "meshbypass-bench-"),
    ] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(prefix) {
                    found.push(format!("{dir}/{name}"));
                }
            }
        }
    }
    found
}

#[test]
fn the_demo_runs_clean() {
    meshbypass_tests::require_root();
    let before = leftovers();
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--smoke"])
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for mode in [
        "no mesh",
        "sidecar",
        "sidecar + bypass(auto)",
        "sidecar + bypass(all)",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(mode) && l.contains(" ok"))
            .unwrap_or_else(|| panic!("no verified row for {mode}:\n{stdout}"));
        assert!(!row.contains("FAILED"), "{row}");
    }
    assert!(stdout.contains("redirected_msgs"), "{stdout}");
    let redirected: u64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("redirected_msgs"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(redirected > 0, "nothing was redirected:\n{stdout}");
    assert_eq!(leftovers(), before, "the demo left things behind");
}
