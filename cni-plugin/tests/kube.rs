//! Pod policy from the Kubernetes API, against a fake API server: a TLS server on 127.0.0.1 with a
//! CA made at test time that serves `GET /api/v1/namespaces/{ns}/pods/{name}` and
//! `GET /api/v1/namespaces/{ns}` from `testdata/kube/` (realistic injected Istio and Linkerd pods),
//! or misbehaves on purpose (401, 403, 404, hangs, garbage, refuses connections).
//!
//! The decision and the generated rules of each pod are compared with
//! `testdata/kube/<case>.golden`; `MESHBYPASS_UPDATE_GOLDEN=1` rewrites them. The last tests run
//! the `meshbypass` binary end to end; the one that applies rules in a real network namespace
//! needs root, `ip` and iptables; as root a missing tool is a failure. The tests that run the
//! binary past its capability check skip when not root, and say so (`meshbypass_tests::privileged`:
//! under CI, with `CI` set, they fail instead).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use meshbypass_cni::cidr::Family;
use meshbypass_cni::config::NetConf;
use meshbypass_cni::env::CniArgs;
use meshbypass_cni::error::CniError;
use meshbypass_cni::iptables;
use meshbypass_cni::policy::{self, Decision};

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.meshbypass-node-test-token";

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/kube")
}

/// What the fake server does with one request.
#[derive(Clone)]
enum Reply {
    Json(u16, String),
    /// Accept, then say nothing for this long and close.
    Hang(Duration),
}

type Handler = Arc<dyn Fn(&str, usize) -> Reply + Send + Sync>;

/// A CA and a server certificate for 127.0.0.1, signed by it.
struct Pki {
    ca_pem: String,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "meshbypass-test-ca");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("server key");
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-apiserver");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server certificate");
        Pki {
            ca_pem: ca.pem(),
            chain: vec![cert.der().clone()],
            key_der: key.serialize_der(),
        }
    }
}

/// The fake API server; stops when dropped.
struct FakeApi {
    addr: SocketAddr,
    ca_pem: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApi {
    /// Serves the pods and namespaces in testdata; the token must be [`TOKEN`].
    fn testdata() -> FakeApi {
        let objects = objects();
        FakeApi::start(Arc::new(move |path, _| match objects.get(path) {
            Some(body) => Reply::Json(200, body.clone()),
            None => not_found(path),
        }))
    }

    fn start(handler: Handler) -> FakeApi {
        let pki = Pki::new();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                pki.chain.clone(),
                rustls::pki_types::PrivatePkcs8KeyDer::from(pki.key_der.clone()).into(),
            )
            .expect("server TLS config");
        let tls = Arc::new(tls);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (tls, handler, requests) = (tls.clone(), handler.clone(), requests.clone());
                    thread::spawn(move || serve(stream, tls, &handler, &requests));
                }
            })
        };
        FakeApi {
            addr,
            ca_pem: pki.ca_pem,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// A kubeconfig for this server, as the node agent writes it (CA file, token file).
    fn kubeconfig(&self, dir: &Path) -> PathBuf {
        write_kubeconfig(dir, &format!("https://{}", self.addr), &self.ca_pem, TOKEN)
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        if let Err(e) = TcpStream::connect(self.addr) {
            eprintln!("cannot wake the fake API server: {e}");
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("the fake API server's thread panicked");
        }
    }
}

fn write_kubeconfig(dir: &Path, server: &str, ca_pem: &str, token: &str) -> PathBuf {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    };
    let ca = write("ca.crt", ca_pem);
    let token = write("token", token);
    write(
        "meshbypass.kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    \
             certificate-authority: {}\nusers:\n- name: meshbypass\n  user:\n    tokenFile: {}\n\
             contexts:\n- name: meshbypass\n  context:\n    cluster: local\n    user: meshbypass\n\
             current-context: meshbypass\n",
            ca.display(),
            token.display()
        ),
    )
}

/// One connection: read the request head, answer, close.
fn serve(stream: TcpStream, tls: Arc<rustls::ServerConfig>, handler: &Handler, requests: &AtomicUsize) {
    if let Err(e) = stream.set_read_timeout(Some(Duration::from_secs(10))) {
        eprintln!("fake API: {e}");
        return;
    }
    let conn = match rustls::ServerConnection::new(tls) {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("fake API: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(rustls::StreamOwned::new(conn, stream));
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return, // a wake-up connect, or a client that gave up on TLS
            Ok(_) if line == "\r\n" => break,
            Ok(_) => head.push(line),
        }
    }
    let n = requests.fetch_add(1, Ordering::SeqCst);
    let path = head
        .first()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_owned();
    let authorized = head.iter().any(|l| {
        l.trim_end() == format!("Authorization: Bearer {TOKEN}")
            || l.trim_end() == format!("authorization: Bearer {TOKEN}")
    });
    let reply = if authorized {
        handler(&path, n)
    } else {
        status(401, "Unauthorized", "Unauthorized")
    };
    let tls = reader.get_mut();
    let (code, body) = match reply {
        Reply::Json(code, body) => (code, body),
        Reply::Hang(d) => {
            thread::sleep(d);
            return;
        }
    };
    let response = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = tls.write_all(response.as_bytes()).and_then(|()| tls.flush()) {
        eprintln!("fake API: {e}");
        return;
    }
    tls.conn.send_close_notify();
    if let Err(e) = tls.flush() {
        eprintln!("fake API: {e}");
    }
}

/// A Kubernetes `Status` body.
fn status(code: u16, reason: &str, message: &str) -> Reply {
    Reply::Json(
        code,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": message, "reason": reason, "code": code})
        .to_string(),
    )
}

fn not_found(path: &str) -> Reply {
    let name = path.rsplit('/').next().unwrap_or("");
    status(404, "NotFound", &format!("pods \"{name}\" not found"))
}

/// API path → JSON, for every pod-*.json and namespace-*.json in testdata.
fn objects() -> HashMap<String, String> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(testdata()).expect("testdata/kube") {
        let path = entry.expect("entry").path();
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if !file.ends_with(".json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read testdata");
        let object: serde_json::Value = serde_json::from_str(&text).expect("testdata is JSON");
        let meta = &object["metadata"];
        let name = meta["name"].as_str().expect("metadata.name");
        let api_path = if file.starts_with("pod-") {
            let ns = meta["namespace"].as_str().expect("metadata.namespace");
            format!("/api/v1/namespaces/{ns}/pods/{name}")
        } else {
            format!("/api/v1/namespaces/{name}")
        };
        out.insert(api_path, text);
    }
    out
}

/// Namespace, name and uid of `testdata/kube/pod-<case>.json`.
fn pod_identity(case: &str) -> (String, String, String) {
    let text = std::fs::read_to_string(testdata().join(format!("pod-{case}.json"))).expect("pod testdata");
    let pod: serde_json::Value = serde_json::from_str(&text).expect("pod JSON");
    let field = |k: &str| pod["metadata"][k].as_str().expect(k).to_owned();
    (field("namespace"), field("name"), field("uid"))
}

fn cni_args(case: &str) -> String {
    let (ns, name, uid) = pod_identity(case);
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID={uid}"
    )
}

fn config(kubeconfig: &Path, timeout: f64) -> NetConf {
    let json = format!(
        r#"{{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"meshbypass",
            "kubernetes":{{"kubeconfig":"{}","timeoutSeconds":{timeout}}}}}"#,
        kubeconfig.display()
    );
    NetConf::parse(json.as_bytes()).expect("config")
}

fn decide(config: &NetConf, args: &str) -> Result<Decision, CniError> {
    let args = CniArgs::parse(args).expect("CNI_ARGS");
    policy::for_config(config)?.decide(&args)
}

/// The decision and, when meshed, the IPv4 and IPv6 rules, as one text.
fn describe(case: &str, decision: &Decision) -> String {
    let (ns, name, _) = pod_identity(case);
    match decision {
        Decision::Skip { reason } => format!("# pod {ns}/{name}: not meshed: {reason}\n"),
        Decision::Mesh {
            redirect,
            acceleration,
            reason,
        } => format!(
            "# pod {ns}/{name}: meshed: {reason}\n# acceleration: {acceleration}\n{}{}",
            iptables::ruleset(redirect, Family::V4),
            iptables::ruleset(redirect, Family::V6)
        ),
    }
}

fn check_golden(case: &str, got: &str) {
    let path = testdata().join(format!("{case}.golden"));
    if std::env::var("MESHBYPASS_UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::write(&path, got).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); run with MESHBYPASS_UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        got, want,
        "{case} differs from its golden (MESHBYPASS_UPDATE_GOLDEN=1 regenerates)"
    );
}

/// Every testdata pod: the decision and rules against the golden.
#[test]
fn decisions_and_rules_match_goldens() {
    let api = FakeApi::testdata();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&api.kubeconfig(dir.path()), 5.0);
    let cases = [
        "istio-default",
        "istio-annotated",
        "istio-include-inbound",
        "istio-disable-envoy",
        "istio-inject-false",
        "istio-gateway",
        "istio-accel-pod",
        "istio-accel-namespace",
        "linkerd-annotated",
        "linkerd-namespace-defaults",
        "plain",
        "agent",
    ];
    for case in cases {
        let decision = decide(&config, &cni_args(case)).unwrap_or_else(|e| panic!("{case}: {e}"));
        check_golden(case, &describe(case, &decision));
    }
}

fn meshed(decision: Decision) -> (meshbypass_cni::config::RedirectSpec, meshbypass_cni::config::Mode) {
    match decision {
        Decision::Mesh {
            redirect,
            acceleration,
            ..
        } => (*redirect, acceleration),
        Decision::Skip { reason } => panic!("should be meshed, skipped: {reason}"),
    }
}

#[test]
fn per_pod_settings_are_read() {
    use meshbypass_cni::config::{Mesh, Mode};
    let api = FakeApi::testdata();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&api.kubeconfig(dir.path()), 5.0);
    let get = |case| meshed(decide(&config, &cni_args(case)).unwrap_or_else(|e| panic!("{case}: {e}")));

    let (spec, accel) = get("istio-annotated");
    assert_eq!(
        (spec.mesh, spec.proxy_uid, spec.proxy_gid),
        (Mesh::Istio, 2001, Some(2002))
    );
    assert_eq!(spec.exclude_outbound_ports, vec![5432, 6379]);
    assert_eq!(accel, Mode::Auto);

    let (spec, _) = get("linkerd-annotated");
    assert_eq!(
        (spec.mesh, spec.outbound_port, spec.proxy_uid),
        (Mesh::Linkerd, 4140, 2103)
    );
    assert_eq!(
        spec.exclude_outbound_ports,
        vec![25, 4567, 4568, 4569, 4570],
        "the pod's, not the namespace's"
    );
    assert_eq!(spec.exclude_inbound_ports, vec![9999]);
    assert_eq!(spec.exclude_inbound_cidrs.len(), 2);

    let (spec, accel) = get("linkerd-namespace-defaults");
    assert_eq!(
        spec.exclude_outbound_ports,
        vec![3306, 11211],
        "from the namespace"
    );
    assert_eq!(accel, Mode::ProxyOnly, "from the namespace");

    assert_eq!(
        get("istio-accel-pod").1,
        Mode::All,
        "the pod wins over its namespace"
    );
    assert_eq!(get("istio-accel-namespace").1, Mode::ProxyOnly);
}

#[test]
fn excluded_namespaces_and_missing_identity_never_reach_the_api() {
    let api = FakeApi::testdata();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&api.kubeconfig(dir.path()), 5.0);
    let d = decide(
        &config,
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1",
    )
    .expect("decides");
    assert!(matches!(d, Decision::Skip { .. }), "{d:?}");
    let d = decide(&config, "").expect("decides");
    assert!(matches!(d, Decision::Skip { .. }), "{d:?}");
    assert_eq!(api.requests(), 0);
}

/// `code` and the whole message (msg and details), and the time it took.
fn failure(config: &NetConf, args: &str) -> (u32, String, Duration) {
    let started = Instant::now();
    let err = decide(config, args).expect_err("should fail");
    let elapsed = started.elapsed();
    let reply = err.reply("1.1.0");
    (reply.code, format!("{}: {}", reply.msg, reply.details), elapsed)
}

#[test]
fn tproxy_and_bad_annotations_are_clear_errors() {
    let api = FakeApi::testdata();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&api.kubeconfig(dir.path()), 5.0);
    let (code, msg, _) = failure(&config, &cni_args("istio-tproxy"));
    assert_eq!(code, 2, "{msg}");
    assert!(
        msg.contains("sidecar.istio.io/interceptionMode=\"TPROXY\""),
        "{msg}"
    );
    assert!(msg.contains("TPROXY is not supported"), "{msg}");

    let mut pod: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(testdata().join("pod-istio-default.json")).expect("read"),
    )
    .expect("JSON");
    pod["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] = "5432,mysql".into();
    let body = pod.to_string();
    let objects = objects();
    let api = FakeApi::start(Arc::new(move |path, _| {
        if path.contains("/pods/") {
            Reply::Json(200, body.clone())
        } else {
            Reply::Json(200, objects["/api/v1/namespaces/default"].clone())
        }
    }));
    let config = crate::config(&api.kubeconfig(dir.path()), 5.0);
    let (code, msg, _) = failure(&config, &cni_args("istio-default"));
    assert_eq!(code, 2, "{msg}");
    assert!(
        msg.contains("traffic.sidecar.istio.io/excludeOutboundPorts=\"5432,mysql\""),
        "{msg}"
    );
}

/// Each way the API server can fail to answer: code 11 within the deadline, after retries, and a
/// message that says what happened.
#[test]
fn api_failures_are_try_again_later_within_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = cni_args("istio-default");
    let deadline = 1.0;
    let cases: Vec<(&str, Handler, &str)> = vec![
        (
            "403",
            Arc::new(|_: &str, _| {
                status(
                    403,
                    "Forbidden",
                    "pods \"productpage-v1-7c9b4f5d8-x2k9q\" is forbidden: User \"system:serviceaccount:meshbypass-system:meshbypass\" cannot get resource \"pods\"",
                )
            }),
            "403 Forbidden",
        ),
        ("404", Arc::new(|path: &str, _| not_found(path)), "404 Not Found"),
        (
            "500",
            Arc::new(|_: &str, _| status(500, "InternalError", "etcdserver: request timed out")),
            "etcdserver: request timed out",
        ),
        (
            "hang",
            Arc::new(|_: &str, _| Reply::Hang(Duration::from_secs(5))),
            "GET https://",
        ),
        (
            "a Status with 200",
            Arc::new(|_: &str, _| {
                Reply::Json(
                    200,
                    r#"{"kind":"Status","apiVersion":"v1","status":"Success"}"#.into(),
                )
            }),
            "the answer is a Status, not a Pod",
        ),
        (
            "another pod under the same name",
            Arc::new(|path: &str, _| {
                let mut pod: serde_json::Value = serde_json::from_str(&objects()[path]).expect("JSON");
                pod["metadata"]["uid"] = "ffffffff-0000-4000-8000-000000000000".into();
                Reply::Json(200, pod.to_string())
            }),
            "with uid ffffffff-0000-4000-8000-000000000000",
        ),
    ];
    for (what, handler, expect) in cases {
        let api = FakeApi::start(handler);
        let config = config(&api.kubeconfig(dir.path()), deadline);
        let (code, msg, elapsed) = failure(&config, &args);
        assert_eq!(code, 11, "{what}: {msg}");
        assert!(msg.contains(expect), "{what}: {msg:?} should contain {expect:?}");
        assert!(
            msg.contains("the runtime should try again later"),
            "{what}: {msg}"
        );
        assert!(
            elapsed < Duration::from_secs_f64(deadline + 0.5),
            "{what}: took {elapsed:?}, deadline {deadline} s"
        );
        if what != "hang" {
            assert!(
                api.requests() > 1,
                "{what}: retried ({} requests)",
                api.requests()
            );
        }
    }
}

#[test]
fn wrong_token_wrong_ca_and_no_server_are_try_again_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = cni_args("istio-default");
    let api = FakeApi::testdata();
    let server = format!("https://{}", api.addr);

    let config = config(
        &write_kubeconfig(dir.path(), &server, &api.ca_pem, "expired"),
        1.0,
    );
    let (code, msg, _) = failure(&config, &args);
    assert_eq!(code, 11, "{msg}");
    assert!(msg.contains("401 Unauthorized"), "{msg}");
    assert!(msg.contains("token"), "says what to check: {msg}");

    let other_ca = Pki::new().ca_pem;
    let config = crate::config(&write_kubeconfig(dir.path(), &server, &other_ca, TOKEN), 1.0);
    let (code, msg, _) = failure(&config, &args);
    assert_eq!(code, 11, "{msg}");
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");

    // Nothing listens on a port that was just closed.
    let closed = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let config = crate::config(
        &write_kubeconfig(dir.path(), &format!("https://{closed}"), &api.ca_pem, TOKEN),
        1.0,
    );
    let (code, msg, elapsed) = failure(&config, &args);
    assert_eq!(code, 11, "{msg}");
    assert!(msg.contains("attempts"), "{msg}");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
}

#[test]
fn api_server_catching_up_is_retried_until_it_answers() {
    let objects = objects();
    let api = FakeApi::start(Arc::new(move |path, n| {
        if n < 2 {
            not_found(path)
        } else {
            Reply::Json(200, objects[path].clone())
        }
    }));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&api.kubeconfig(dir.path()), 5.0);
    meshed(decide(&config, &cni_args("istio-default")).expect("decides once the pod shows up"));
    assert_eq!(api.requests(), 4, "two 404s, the pod, its namespace");
}

#[test]
fn garbage_from_the_api_server_is_an_error_not_a_skip() {
    let api = FakeApi::start(Arc::new(|_: &str, _| {
        Reply::Json(200, "{\"kind\":\"Pod\",\"metadata\":".into())
    }));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(&api.kubeconfig(dir.path()), 5.0);
    let (code, msg, _) = failure(&config, &cni_args("istio-default"));
    assert_eq!(code, 103, "{msg}");
    assert!(
        msg.contains("decoding the Kubernetes API server's answer"),
        "{msg}"
    );
    assert_eq!(
        api.requests(),
        1,
        "a whole answer that does not decode is not retried"
    );
}

// End to end: the binary, with env and stdin as a runtime passes them.

const PREV_RESULT: &str = r#"{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],
    "ips":[{"address":"10.244.1.7/24","gateway":"10.244.1.1","interface":0}],"dns":{}}"#;

struct Run {
    code: Option<i32>,
    stdout: String,
    elapsed: Duration,
}

fn run_plugin(command: &str, kubeconfig: &Path, state: &Path, args: &str, netns: &str, timeout: f64) -> Run {
    let stdin = format!(
        r#"{{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"meshbypass",
            "bpfRoot":"{state}/bpf","cgroupRoot":"{state}/cgroup","stateDir":"{state}/run","logFile":"{state}/log",
            "kubernetes":{{"kubeconfig":"{}","timeoutSeconds":{timeout}}},
            "prevResult":{PREV_RESULT}}}"#,
        kubeconfig.display(),
        state = state.display()
    );
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshbypass"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "abc123")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meshbypass");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        elapsed: started.elapsed(),
    }
}

fn error_code(run: &Run) -> u64 {
    let reply: serde_json::Value =
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout));
    reply["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("no code in {}", run.stdout))
}

#[test]
fn binary_meshes_istio_passes_plain_and_fails_closed_without_api() {
    // ADD, CHECK and DEL need CAP_NET_ADMIN and CAP_SYS_ADMIN (code 50 without).
    if !meshbypass_tests::privileged() {
        return;
    }
    let api = FakeApi::testdata();
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.kubeconfig(dir.path());
    let gone = "/run/netns/meshbypass-test-does-not-exist";

    // Meshed: the decision said so, and the next step (the pod's netns) is what fails.
    let run = run_plugin(
        "ADD",
        &kubeconfig,
        dir.path(),
        &cni_args("istio-default"),
        gone,
        5.0,
    );
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert_eq!(error_code(&run), 101, "{}", run.stdout);
    assert_eq!(api.requests(), 2, "the pod and its namespace");

    // Not meshed: prevResult back unchanged, nothing touched (the netns does not even exist).
    let run = run_plugin("ADD", &kubeconfig, dir.path(), &cni_args("plain"), gone, 5.0);
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let got: serde_json::Value = serde_json::from_str(&run.stdout).expect("result JSON");
    let want: serde_json::Value = serde_json::from_str(PREV_RESULT).expect("prevResult JSON");
    assert_eq!(got, want);
    // No record for DEL: only the decision log, whose last line says why.
    let state = dir.path().join("run");
    let records = meshbypass_cni::state::StateDir::new(&state)
        .list()
        .expect("state dir");
    assert!(records.is_empty(), "{records:?}");
    let log = std::fs::read_to_string(state.join("log/cni.jsonl")).expect("the decision log");
    let last: meshbypass_cni::journal::Entry =
        serde_json::from_str(log.lines().last().expect("a line")).expect("an entry");
    assert_eq!(
        last.decision,
        meshbypass_cni::journal::Decision::NotMeshed,
        "{last:?}"
    );

    // TPROXY: code 2 from the binary too.
    let run = run_plugin(
        "ADD",
        &kubeconfig,
        dir.path(),
        &cni_args("istio-tproxy"),
        gone,
        5.0,
    );
    assert_eq!(error_code(&run), 2, "{}", run.stdout);

    // The API server gone: 11 within the deadline; DEL and GC still succeed without it.
    let requests = api.requests();
    drop(api);
    let run = run_plugin(
        "ADD",
        &kubeconfig,
        dir.path(),
        &cni_args("istio-default"),
        gone,
        1.5,
    );
    assert_eq!(error_code(&run), 11, "{}", run.stdout);
    assert!(
        run.elapsed < Duration::from_millis(2500),
        "took {:?}",
        run.elapsed
    );
    let run = run_plugin(
        "DEL",
        &kubeconfig,
        dir.path(),
        &cni_args("istio-default"),
        "",
        1.5,
    );
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), ""),
        "DEL never asks the API"
    );
    assert!(requests > 0);
}

#[test]
fn binary_bad_kubeconfig_is_code_7() {
    // ADD, CHECK and DEL need CAP_NET_ADMIN and CAP_SYS_ADMIN (code 50 without).
    if !meshbypass_tests::privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "clusters:\n- name: c\n  cluster:\n    server: https://h:6443\n",
    )
    .expect("write");
    let run = run_plugin(
        "ADD",
        &kubeconfig,
        dir.path(),
        &cni_args("istio-default"),
        "/run/netns/x",
        5.0,
    );
    assert_eq!(error_code(&run), 7, "{}", run.stdout);
    assert!(run.stdout.contains("certificate-authority"), "{}", run.stdout);
}

/// Root, `ip` and iptables: the annotated Istio pod's own rules land in a real network namespace,
/// and DEL removes them.
#[test]
fn binary_applies_the_pods_own_rules_in_a_real_netns() {
    let tool = |tool: &str| {
        Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "--version" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !meshbypass_tests::privileged() {
        return;
    }
    for t in ["ip", "iptables-save", "iptables-restore"] {
        assert!(tool(t), "{t} is missing: scripts/deps.sh installs it");
    }
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            match Command::new("ip").args(["netns", "del", &self.0]).status() {
                Ok(s) if s.success() => {}
                other => eprintln!("ip netns del {}: {other:?}", self.0),
            }
        }
    }
    let ns = Netns(format!("mbx-kube-{}", std::process::id()));
    let added = Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .expect("ip netns add");
    assert!(added.success(), "ip netns add {}", ns.0);
    let netns = format!("/run/netns/{}", ns.0);
    let save = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.0, "iptables-save", "-t", "nat"])
            .output()
            .expect("iptables-save");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let api = FakeApi::testdata();
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.kubeconfig(dir.path());
    let args = cni_args("istio-annotated");
    let run = run_plugin("ADD", &kubeconfig, dir.path(), &args, &netns, 5.0);
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let rules = save();
    for want in [
        "--uid-owner 2001 -j RETURN",
        "--gid-owner 2002 -j RETURN",
        "-d 10.0.0.0/8 -j MESHBYPASS_REDIRECT",
        "-d 10.96.0.1/32 -j RETURN",
        "--dport 5432 -j RETURN",
    ] {
        assert!(rules.contains(want), "{want:?} missing:\n{rules}");
    }
    drop(api); // DEL needs no API
    let run = run_plugin("DEL", &kubeconfig, dir.path(), &args, &netns, 1.0);
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert!(!save().contains("MESHBYPASS"), "DEL removed the chains");
}
