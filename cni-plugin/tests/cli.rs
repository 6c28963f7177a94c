//! The plugin binary as a runtime runs it: env + stdin in, one JSON (or
//! nothing) out. Every command, and bad input of every kind: the right CNI
//! error code, a non-zero exit, and nothing on stdout but the JSON. ADD, CHECK
//! and DEL past the capability check need root (they skip otherwise).

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

/// Every version a runtime sends a chained plugin (0.3.1: Calico, Flannel, kindnet, Cilium).
const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

#[test]
fn version_lists_the_supported_versions() {
    for v in VERSIONS {
        let out = run(
            &[("CNI_COMMAND", "VERSION")],
            json!({"cniVersion": v}).to_string().as_bytes(),
        );
        assert_eq!(out.code, Some(0));
        let r: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(r["cniVersion"], v);
        assert_eq!(r["supportedVersions"], json!(VERSIONS));
    }
    // Before plugin chaining (0.3.0) there is nothing for a chained plugin to do.
    for v in ["0.1.0", "0.2.0"] {
        let (_d, mut conf) = dirs();
        conf["cniVersion"] = json!(v);
        conf["prevResult"] = prev();
        let msg = error(&run(ADD, conf.to_string().as_bytes()), 1);
        assert!(msg.contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"), "{msg}");
    }
}

/// CHECK came with 0.4.0, STATUS and GC with 1.1.0: before that the spec's
/// "incompatible CNI version" (code 1, as libcni's skel answers), in the
/// request's version, saying which version brought the command.
#[test]
fn commands_stay_where_the_spec_puts_them() {
    let (_d, mut conf) = dirs();
    conf["prevResult"] = prev();
    conf["cni.dev/valid-attachments"] = json!([]);
    for (command, since) in [("CHECK", "0.4.0"), ("STATUS", "1.1.0"), ("GC", "1.1.0")] {
        // CHECK names its attachment; STATUS and GC have none.
        let mut env = if command == "CHECK" {
            ADD.to_vec()
        } else {
            vec![("CNI_COMMAND", "")]
        };
        env[0] = ("CNI_COMMAND", command);
        for v in VERSIONS {
            conf["cniVersion"] = json!(v);
            let out = run(&env, conf.to_string().as_bytes());
            if VERSIONS.iter().position(|x| *x == v) >= VERSIONS.iter().position(|x| *x == since) {
                // Defined: whatever the command finds, it is not refused for its version.
                if out.code != Some(0) {
                    let r: Value = serde_json::from_str(out.stdout.trim()).expect("error JSON");
                    assert_ne!(r["code"], 1, "{command} in {v}: {r}");
                }
                continue;
            }
            let msg = error(&out, 1);
            assert!(
                msg.contains(&format!("{command} is not defined in CNI {v}")) && msg.contains(since),
                "{command} in {v}: {msg}"
            );
            let r: Value = serde_json::from_str(out.stdout.trim()).unwrap();
            assert_eq!(r["cniVersion"], v, "answered in the request's version");
        }
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
    // ADD, CHECK and DEL need CAP_NET_ADMIN and CAP_SYS_ADMIN (code 50 without).
    if !meshbypass_tests::privileged() {
        return;
    }
    let (_d, conf) = dirs();
    let msg = error(&run(ADD, conf.to_string().as_bytes()), 7);
    assert!(msg.contains("chained"), "{msg}");
    let mut env = ADD.to_vec();
    env[0] = ("CNI_COMMAND", "CHECK");
    error(&run(&env, conf.to_string().as_bytes()), 7);
}

#[test]
fn add_for_an_excluded_namespace_passes_the_result_through() {
    // ADD, CHECK and DEL need CAP_NET_ADMIN and CAP_SYS_ADMIN (code 50 without).
    if !meshbypass_tests::privileged() {
        return;
    }
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
    // ADD, CHECK and DEL need CAP_NET_ADMIN and CAP_SYS_ADMIN (code 50 without).
    if !meshbypass_tests::privileged() {
        return;
    }
    let (_d, mut conf) = dirs();
    conf["prevResult"] = prev();
    error(&run(ADD, conf.to_string().as_bytes()), 101);
}

#[test]
fn del_of_nothing_succeeds_silently() {
    // ADD, CHECK and DEL need CAP_NET_ADMIN and CAP_SYS_ADMIN (code 50 without).
    if !meshbypass_tests::privileged() {
        return;
    }
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

/// A kubeconfig the plugin can load (a CA made here, a token); the API
/// server behind it is never asked, only pods outside `excludeNamespaces` are.
fn kubeconfig(dir: &std::path::Path) -> std::path::PathBuf {
    let key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).expect("CA");
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let path = dir.join("meshbypass-kubeconfig");
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:6443\n    \
         certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: t0ken\ncontexts:\n- name: x\n  \
         context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
        ca_file.display()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// What the primary plugin of a list declared in `version` hands on: up to
/// 0.4.0 each IP carries its `version`.
fn prev_in(version: &str) -> Value {
    let mut ip = json!({"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 2});
    if ["0.3.0", "0.3.1", "0.4.0"].contains(&version) {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [{"name": "cni0", "mac": "02:42:0a:f4:01:01"},
                       {"name": "veth5d1e2c", "mac": "02:42:0a:f4:01:02"},
                       {"name": "eth0", "mac": "02:42:0a:f4:01:07", "sandbox": "/run/netns/cni-1"}],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

/// The example conflists keep what their projects ship (Calico, Flannel and
/// kindnet: 0.3.1), and our entry in each, as a runtime derives it from the
/// list (its `cniVersion` and `name`, the previous result), is served in that
/// version: ADD answers with the previous result in the list's version, DEL
/// works without a `prevResult` where the version sends none, CHECK is
/// refused only where the version does not define it. Node paths (bpf root,
/// state, log, kubeconfig) point into a temporary directory; the pod is in an
/// excluded namespace, so nothing is configured.
#[test]
fn example_conflists_are_served_in_their_declared_version() {
    // ADD, CHECK and DEL need CAP_NET_ADMIN and CAP_SYS_ADMIN (code 50 without).
    if !meshbypass_tests::privileged() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conflist");
    let shipped = [
        ("bridge.conflist", "1.0.0"),
        ("calico.conflist", "0.3.1"),
        ("flannel.conflist", "0.3.1"),
        ("kindnet.conflist", "0.3.1"),
    ];
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".conflist"))
        .collect();
    found.sort();
    assert_eq!(
        found,
        shipped.map(|(f, _)| f.to_owned()),
        "every example is covered"
    );
    for (file, declared) in shipped {
        let list: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            list["cniVersion"], declared,
            "{file} declares what its project ships"
        );
        let entry = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["type"] == "meshbypass")
            .unwrap_or_else(|| panic!("{file} chains no meshbypass"));
        let tmp = tempfile::tempdir().unwrap();
        let mut conf = entry.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        conf["bpfRoot"] = json!(tmp.path().join("bpf"));
        conf["stateDir"] = json!(tmp.path().join("state"));
        conf["logFile"] = json!(tmp.path().join("log"));
        if conf["kubernetes"]["kubeconfig"].is_string() {
            conf["kubernetes"]["kubeconfig"] = json!(kubeconfig(tmp.path()));
        }
        let mut env = ADD.to_vec();
        env[4] = (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-0",
        );
        let mut add = conf.clone();
        add["prevResult"] = prev_in(declared);
        let out = run(&env, add.to_string().as_bytes());
        assert_eq!(out.code, Some(0), "{file}: ADD in {declared}: {}", out.stdout);
        let result: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(result, prev_in(declared), "{file}: the result in {declared}");

        // DEL as the runtime sends it in this version (no prevResult before 0.4.0).
        env[0] = ("CNI_COMMAND", "DEL");
        let del = if declared == "0.3.1" { &conf } else { &add };
        let out = run(&env, del.to_string().as_bytes());
        assert_eq!((out.code, out.stdout.as_str()), (Some(0), ""), "{file}: DEL");

        env[0] = ("CNI_COMMAND", "CHECK");
        let out = run(&env, add.to_string().as_bytes());
        if declared == "0.3.1" {
            assert!(
                error(&out, 1).contains("CHECK is not defined in CNI 0.3.1"),
                "{file}"
            );
        } else {
            assert_eq!(
                out.code,
                Some(0),
                "{file}: CHECK of a skipped pod: {}",
                out.stdout
            );
        }
    }
}
