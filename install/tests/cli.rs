//! The agent's command line as a person (or a manifest) uses it: `--help`
//! and `--version` exit 0 at every level, `--flag=value` works, and every
//! flag can come from a `MESHBYPASS_*` variable (the command line wins).
//! Nothing here needs root: `status` of an absent bpf root and an `install`
//! refused before it touches anything.

use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_meshbypass-node");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(EXE);
    cmd.args(args);
    // Only the variables a test sets: a MESHBYPASS_* of the caller's shell
    // must not change what is tested.
    cmd.env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("running {EXE}: {e}"));
    Out {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A bpf root that exists nowhere (under /sys/fs/bpf, never created).
fn absent_root(tag: &str) -> String {
    format!("/sys/fs/bpf/mb-cli-absent-{tag}-{}", std::process::id())
}

#[test]
fn help_exits_zero_everywhere() {
    for args in [
        &["--help"][..],
        &["-h"],
        &["help"],
        &["load", "--help"],
        &["help", "load"],
        &["status", "--help"],
        &["run", "--help"],
        &["install", "-h"],
        &["uninstall", "--help"],
        &["selftest", "--help"],
        &["unload", "--help"],
    ] {
        let out = run(args, &[]);
        assert_eq!(out.code, 0, "{args:?}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stdout.contains("Usage: meshbypass-node"),
            "{args:?}: {}",
            out.stdout
        );
    }
    let out = run(&["run", "--help"], &[]);
    for flag in [
        "--cni-bin-dir",
        "--cni-conf-dir",
        "--state-dir",
        "--listen",
        "--log-format",
        "MESHBYPASS_CNI_BIN_DIR",
    ] {
        assert!(
            out.stdout.contains(flag),
            "run --help lacks {flag}: {}",
            out.stdout
        );
    }
    // The hidden probe command stays out of the help.
    assert!(!run(&["--help"], &[]).stdout.contains("selftest-probe"));
}

#[test]
fn version_names_the_map_layout() {
    let want = format!(
        "meshbypass-node {} (map layout {})",
        env!("CARGO_PKG_VERSION"),
        meshbypass_ebpf::abi::LAYOUT_VERSION
    );
    for args in [&["--version"][..], &["-V"]] {
        let out = run(args, &[]);
        assert_eq!((out.code, out.stdout.trim()), (0, want.as_str()), "{args:?}");
    }
}

#[test]
fn usage_errors_exit_two() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["status", "--bogus"],
        &["status", "--bpf-root=relative"],
        &["run", "--gc-interval=0"],
        &["uninstall", "--plugin-binary", "/x"],
    ] {
        let out = run(args, &[]);
        assert_eq!(out.code, 2, "{args:?}: {}{}", out.stdout, out.stderr);
        // A usage error says what is wrong, or shows the usage.
        assert!(
            out.stderr.starts_with("error: ") || out.stderr.contains("Usage: meshbypass-node"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
    }
}

fn status_json(args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let out = run(args, env);
    assert_eq!(out.code, 0, "{args:?} {env:?}: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", out.stdout))
}

#[test]
fn flags_take_equals_and_environment() {
    let (a, b) = (absent_root("a"), absent_root("b"));
    // --flag=value and --flag value.
    let v = status_json(&["status", "--json", &format!("--bpf-root={a}")], &[]);
    assert_eq!(v["bpfRoot"], a.as_str(), "{v}");
    let v = status_json(&["status", "--json", "--bpf-root", &b], &[]);
    assert_eq!(v["bpfRoot"], b.as_str(), "{v}");
    // The environment sets flags, booleans included ...
    let v = status_json(
        &["status"],
        &[("MESHBYPASS_BPF_ROOT", &a), ("MESHBYPASS_JSON", "1")],
    );
    assert_eq!(v["bpfRoot"], a.as_str(), "{v}");
    // ... and the command line wins.
    let v = status_json(
        &["status", "--json", "--bpf-root", &b],
        &[("MESHBYPASS_BPF_ROOT", &a)],
    );
    assert_eq!(v["bpfRoot"], b.as_str(), "{v}");
    // A false boolean is false.
    let out = run(&["status", "--bpf-root", &a], &[("MESHBYPASS_JSON", "false")]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("not loaded at "), "{}", out.stdout);
    // A bad value from the environment is named like a bad flag.
    let out = run(&["status"], &[("MESHBYPASS_BPF_ROOT", "relative")]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("--bpf-root"), "{}", out.stderr);
}

#[test]
fn errors_are_json_lines_with_log_format_json() {
    let empty = tempfile::tempdir().expect("tempdir");
    let conf = empty.path().to_str().expect("utf-8");
    // `install` refuses a conf dir without a primary CNI before it touches
    // anything.
    for env in [&[("MESHBYPASS_LOG_FORMAT", "json")][..], &[]] {
        let mut args = vec!["install", "--no-selftest", "--cni-conf-dir", conf];
        if env.is_empty() {
            args.push("--log-format=json");
        }
        let out = run(&args, env);
        assert_eq!(out.code, 1, "{}", out.stderr);
        let lines: Vec<serde_json::Value> = out
            .stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
            .collect();
        let last = lines.last().expect("an error line");
        assert_eq!(last["level"], "error", "{last}");
        assert!(
            last["msg"]
                .as_str()
                .expect("msg")
                .starts_with("no CNI network config"),
            "{last}"
        );
    }
    let out = run(&["install", "--no-selftest", "--cni-conf-dir", conf], &[]);
    assert!(
        out.stderr.starts_with("error: no CNI network config"),
        "{}",
        out.stderr
    );
}
