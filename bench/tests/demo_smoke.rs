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
    if !meshbypass_tests::privileged() {
        return;
    }
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
        "sidecar + bypass(adaptive)",
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
    // Each bypass run's own line: "N req/s, p50 P us, R msgs redirected, S
    // passed to the stack". Requests cross at least one redirected leg
    // each way, and almost nothing of a paired direction takes the stack.
    let runs: Vec<(u64, u64)> = stdout
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(" us, ")?;
            let (r, rest) = rest.split_once(" msgs redirected, ")?;
            let (p, _) = rest.split_once(" passed")?;
            Some((r.trim().parse().ok()?, p.trim().parse().ok()?))
        })
        .collect();
    assert_eq!(runs.len(), 5, "one line per mode:\n{stdout}");
    for (mode, (r, p)) in ["auto", "adaptive", "all"].iter().zip(&runs[2..]) {
        assert!(
            *r >= 1000 && *r >= 20 * *p,
            "bypass({mode}): {r} messages redirected, {p} to the stack:\n{stdout}"
        );
    }
    assert_eq!(leftovers(), before, "the demo left things behind");
}
