//! The plugin binary's command line: only `--help` and `--version`; a
//! runtime passes no arguments, and the CNI protocol still works then.

use std::process::{Command, Stdio};

const PLUGIN: &str = env!("CARGO_BIN_EXE_meshbypass");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(PLUGIN)
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {PLUGIN}: {e}"));
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_and_version_exit_zero() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Usage: meshbypass"), "{out}");
    assert!(out.contains("CNI_COMMAND"), "{out}");
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        format!(
            "meshbypass {} (map layout {}; CNI 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)",
            env!("CARGO_PKG_VERSION"),
            meshbypass_ebpf::abi::LAYOUT_VERSION
        )
    );
    let (code, short, _) = run(&["-V"]);
    assert_eq!((code, short), (0, out));
}

#[test]
fn other_arguments_are_usage_errors() {
    for args in [&["--bogus"][..], &["ADD"], &["--version=1"]] {
        let (code, out, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(out.is_empty(), "{args:?} printed on stdout: {out}");
        assert!(err.contains("Usage: meshbypass"), "{args:?}: {err}");
    }
}

#[test]
fn without_arguments_it_speaks_cni() {
    let out = Command::new(PLUGIN)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .expect("running the plugin");
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("VERSION answers JSON");
    assert_eq!(v["supportedVersions"][4], "1.1.0", "{v}");
}
