//! The plugin binary as a runtime runs it: env + stdin in, one JSON (or
//! nothing) out. Every command, and bad input of every kind: the right CNI
//! error code, a non-zero exit, and nothing on stdout but the JSON.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use serde_json::{Value, json};

struct Out {
    code: Option<i32>,
    stdout: String,
}

fn run(env: &[(&str, &str)], stdin: &[u8]) -> Out {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshbypass"))
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn meshbypass");
    let mut input = child.stdin.take().unwrap();
    // A plugin that stops reading early must not deadlock the test.
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || input.write_all(&data));
    let out = child.wait_with_output().unwrap();
    let written = writer.join().expect("writer thread");
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    Out {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
    }
}

/// Asserts a CNI error with `code`, returns its message.
fn error(out: &Out, code: i64) -> String {
    assert_ne!(out.code, Some(0), "expected failure, got {:?}", out.stdout);
    let v: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|_| panic!("stdout is not one JSON object: {:?}", out.stdout));
    assert_eq!(v["code"], code, "{v}");
    assert!(v["cniVersion"].is_string(), "{v}");
    v["msg"].as_str().unwrap().to_owned()
}

fn dirs() -> (tempfile::TempDir, Value) {
    let d = tempfile::tempdir().unwrap();
    let conf = json!({
        "cniVersion": "1.1.0",
        "name": "test",
        "type": "meshbypass",
        "bpfRoot": d.path().join("bpf"),
        "stateDir": d.path().join("state"),
        "logFile": d.path().join("log"),
    });
    (d, conf)
}

fn prev() -> Value {
    json!({"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.222.0.9/24", "interface": 0}]})
}

const ADD: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "c0ffee"),
    ("CNI_NETNS", "/run/netns/meshbypass-test-absent"),
    ("CNI_IFNAME", "eth0"),
    (
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
    ),
];

#[test]
fn version_lists_the_supported_versions() {
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        let out = run(
            &[("CNI_COMMAND", "VERSION")],
            json!({"cniVersion": v}).to_string().as_bytes(),
        );
        assert_eq!(out.code, Some(0));
        let r: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(r["cniVersion"], v);
        assert_eq!(r["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    }
}

#[test]
fn bad_env_is_code_4() {
    let (_d, conf) = dirs();
    let body = conf.to_string();
    error(&run(&[], body.as_bytes()), 4);
    error(&run(&[("CNI_COMMAND", "FROB")], body.as_bytes()), 4);
    error(&run(&[("CNI_COMMAND", "ADD")], body.as_bytes()), 4);
    let mut env = ADD.to_vec();
    env[1] = ("CNI_CONTAINERID", "../../etc");
    assert!(error(&run(&env, body.as_bytes()), 4).contains("CNI_CONTAINERID"));
    let mut env = ADD.to_vec();
    env[3] = ("CNI_IFNAME", "eth0/../x");
    assert!(error(&run(&env, body.as_bytes()), 4).contains("CNI_IFNAME"));
    let mut env = ADD.to_vec();
    env[4] = ("CNI_ARGS", "K8S_POD_UID=../x;IgnoreUnknown=1");
    error(&run(&env, body.as_bytes()), 4);
}

#[test]
fn bad_json_is_code_6_and_never_hangs_or_panics() {
    for input in [
        &b"garbage"[..],
        b"",
        b"{\"cniVersion\": \"1.1.0\", \"name\"",
        b"[1,2,3",
    ] {
        error(&run(ADD, input), 6);
    }
    // Wrong types are invalid configuration.
    error(
        &run(
            ADD,
            br#"{"cniVersion":"1.1.0","name":"x","type":"meshbypass","redirect":{"outboundPort":"x"}}"#,
        ),
        7,
    );
    // Far too large input is refused, not buffered forever.
    let huge = vec![b' '; 5 << 20];
    error(&run(ADD, &huge), 7);
}

#[test]
fn config_errors_name_what_to_fix() {
    let (_d, mut conf) = dirs();
    conf["prevResult"] = prev();
    conf["redirect"] = json!({"outbondPort": 15001});
    let msg = error(&run(ADD, conf.to_string().as_bytes()), 7);
    assert!(msg.contains("redirect.outbondPort"), "{msg}");
    conf["redirect"] = json!({});
    conf["type"] = json!("bridge");
    error(&run(ADD, conf.to_string().as_bytes()), 7);
    conf["type"] = json!("meshbypass");
    conf["cniVersion"] = json!("9.0.0");
    error(&run(ADD, conf.to_string().as_bytes()), 1);
}

#[test]
fn add_without_prev_result_says_it_is_chained() {
    let (_d, conf) = dirs();
    let msg = error(&run(ADD, conf.to_string().as_bytes()), 7);
    assert!(msg.contains("chained"), "{msg}");
    let mut env = ADD.to_vec();
    env[0] = ("CNI_COMMAND", "CHECK");
    error(&run(&env, conf.to_string().as_bytes()), 7);
}

#[test]
fn add_for_an_excluded_namespace_passes_the_result_through() {
    let (_d, mut conf) = dirs();
    conf["prevResult"] = prev();
    let mut env = ADD.to_vec();
    env[4] = (
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns",
    );
    let out = run(&env, conf.to_string().as_bytes());
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(r, prev());
}

#[test]
fn add_with_a_missing_netns_is_code_101() {
    let (_d, mut conf) = dirs();
    conf["prevResult"] = prev();
    error(&run(ADD, conf.to_string().as_bytes()), 101);
}

#[test]
fn del_of_nothing_succeeds_silently() {
    let (_d, conf) = dirs();
    let env = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_IFNAME", "eth0"),
    ];
    for _ in 0..2 {
        let out = run(&env, conf.to_string().as_bytes());
        assert_eq!(out.code, Some(0), "{}", out.stdout);
        assert_eq!(out.stdout, "");
    }
}

#[test]
fn gc_needs_valid_attachments() {
    let (_d, mut conf) = dirs();
    error(&run(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes()), 7);
    conf["cni.dev/valid-attachments"] = json!([{"containerID": "c0ffee", "ifname": "eth0"}]);
    let out = run(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes());
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    assert_eq!(out.stdout, "");
}

#[test]
fn status_reports_an_unusable_node_as_code_50() {
    let (_d, mut conf) = dirs();
    conf["cgroupRoot"] = json!("/nonexistent-cgroup-root");
    let msg = error(
        &run(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes()),
        50,
    );
    assert!(msg.contains("cgroup"), "{msg}");
    conf["acceleration"] = json!("off");
    let out = run(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes());
    assert_eq!(out.code, Some(0), "{}", out.stdout);
}
