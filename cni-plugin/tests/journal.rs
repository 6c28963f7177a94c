//! The decision log as the binary writes it: one JSON line per ADD and DEL
//! under `<stateDir>/log/cni.jsonl`, with the pod, the decision, why, and
//! the time taken; never for other commands. Root gets past the capability
//! check; any other user gets the same line with `failed` and code 50.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use meshbypass_cni::journal::{Decision, Entry};
use serde_json::{Value, json};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn run(env: &[(&str, &str)], stdin: &Value) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshbypass"))
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn meshbypass");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.to_string().as_bytes())
        .expect("writing the config");
    let out = child.wait_with_output().expect("waiting for the plugin");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn entries(state: &Path) -> Vec<Entry> {
    match std::fs::read_to_string(state.join("log/cni.jsonl")) {
        Ok(s) => s
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not an entry ({e}): {l:?}")))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading the decision log: {e}"),
    }
}

fn config(dir: &Path) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "name": "test",
        "type": "meshbypass",
        "bpfRoot": dir.join("bpf"),
        "stateDir": dir.join("state"),
        // The plugin's own log says warnings only: the decision log still
        // has the request's info messages.
        "logLevel": "warn",
        "logFile": dir.join("plugin.log"),
    })
}

fn env<'a>(command: &'a str, namespace: &'a str) -> Vec<(&'a str, &'a str)> {
    let args = if namespace == "kube-system" {
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1"
    } else {
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"
    };
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/run/netns/meshbypass-journal-absent"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
    ]
}

#[test]
fn add_and_del_leave_one_line_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let mut add = config(dir.path());
    add["prevResult"] = json!({"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}],
                               "ips": [{"address": "10.222.0.9/24", "interface": 0}]});
    // kube-system is excluded by default: not meshed, and the log says why.
    let (code, _) = run(&env("ADD", "kube-system"), &add);
    let (code_del, _) = run(&env("DEL", "kube-system"), &config(dir.path()));
    // Neither CHECK nor VERSION is logged.
    run(&env("VERSION", "default"), &config(dir.path()));
    let got = entries(&state);
    assert_eq!(got.len(), 2, "{got:#?}");
    let (a, d) = (&got[0], &got[1]);
    assert_eq!((a.command.as_str(), d.command.as_str()), ("ADD", "DEL"));
    for e in [a, d] {
        assert_eq!(e.container_id.as_deref(), Some("c0ffee"));
        assert_eq!(e.namespace.as_deref(), Some("kube-system"));
        assert_eq!(e.pod.as_deref(), Some("coredns-1"));
        assert_eq!(e.cni_version, "1.1.0");
        assert!(e.duration_ms > 0.0 && e.duration_ms < 10_000.0, "{e:?}");
    }
    if is_root() {
        assert_eq!((code, code_del), (Some(0), Some(0)));
        assert_eq!(a.decision, Decision::NotMeshed, "{a:?}");
        assert_eq!(
            a.log,
            ["not meshed: namespace kube-system is in kubernetes.excludeNamespaces"],
            "{a:?}"
        );
        assert_eq!((a.code, a.error.as_deref()), (None, None));
        assert_eq!(d.decision, Decision::Removed, "{d:?}");
    } else {
        eprintln!("not root: the capability check fails both requests (code 50)");
        for e in [a, d] {
            assert_eq!((e.decision, e.code), (Decision::Failed, Some(50)), "{e:?}");
            assert!(e.error.as_deref().is_some_and(|m| m.contains("CAP_")), "{e:?}");
        }
    }
}

#[test]
fn a_failed_add_is_logged_with_its_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No prevResult: code 7 (after the capability check, code 50 without root).
    let (code, stdout) = run(&env("ADD", "default"), &config(dir.path()));
    assert_eq!(code, Some(1), "{stdout}");
    let got = entries(&dir.path().join("state"));
    assert_eq!(got.len(), 1, "{got:#?}");
    let e = &got[0];
    assert_eq!(e.decision, Decision::Failed);
    let want = if is_root() { 7 } else { 50 };
    assert_eq!(e.code, Some(want), "{e:?}");
    let reply: Value = serde_json::from_str(stdout.trim()).expect("an error reply");
    assert_eq!(reply["code"], want);
    assert!(
        e.error
            .as_deref()
            .is_some_and(|m| reply["msg"].as_str().is_some_and(|r| m.starts_with(r))),
        "{e:?} vs {reply}"
    );
    assert_eq!(
        (e.namespace.as_deref(), e.pod.as_deref()),
        (Some("default"), Some("web"))
    );
}
