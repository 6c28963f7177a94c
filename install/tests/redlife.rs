//! Red team: the agent's lifecycle against the fail-closed contract
//! (DESIGN.md: a pod never starts without its redirect while the agent is
//! meant to be installed). Each test is one attack, as root, in private temp
//! conf/bin/state dirs with a unique bpf root (unloaded on drop), the fake
//! TLS API server of `agent.rs` where the agent asks one.
//!
//! A test that fails here is an attack that works: its message says what the
//! runtime would do. Run one at a time (`--test-threads=1`).
//!
//! "The runtime's network" below is what containerd (go-cni) and CRI-O pick:
//! libcni's `ConfFiles(dir, [".conf", ".conflist", ".json"])` (Go's
//! `filepath.Ext`, byte names, no directories), `sort.Strings`, the first.

use std::{
    ffi::OsString,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::ffi::{OsStrExt, OsStringExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    fcntl::{Flock, FlockArg},
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::{Value, json};

const EXE: &str = env!("CARGO_BIN_EXE_meshbypass-node");
/// The README's bound for putting the entry back.
const REPAIR_BOUND: Duration = Duration::from_secs(1);
const STARTUP: Duration = Duration::from_secs(30);

fn read_json(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Polls `cond` until it holds or `within` passes; `false` on timeout.
fn poll_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn wait_for(within: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        poll_until(within, cond),
        "timed out after {within:?} waiting for {what}"
    );
}

/// A private bpf root, unloaded on drop.
struct BpfRoot(PathBuf);

impl BpfRoot {
    fn new(tag: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/mbtest-redlife-{tag}-{}-{n}",
            std::process::id()
        )))
    }
}

impl Drop for BpfRoot {
    fn drop(&mut self) {
        if self.0.exists() {
            match Command::new(EXE)
                .args(["unload", "--bpf-root"])
                .arg(&self.0)
                .output()
            {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "cleanup: unload {}: {}",
                    self.0.display(),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("cleanup: unload {}: {e}", self.0.display()),
            }
            // A root made by the test and never loaded into.
            let _ = fs::remove_dir(&self.0);
        }
    }
}

struct Host {
    tmp_dir: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
    state: PathBuf,
    plugin: PathBuf,
    root: BpfRoot,
}

impl Host {
    fn new(tag: &str) -> Self {
        meshbypass_tests::require_root();
        let tmp = tempfile::tempdir().expect("temp dir");
        let conf = tmp.path().join("net.d");
        let bin = tmp.path().join("bin");
        let state = tmp.path().join("state");
        for d in [&conf, &bin, &state] {
            fs::create_dir_all(d).expect("making a host dir");
        }
        let plugin = tmp.path().join("meshbypass-build");
        fs::write(&plugin, format!("#!/bin/sh\n# stand-in plugin for {tag}\n")).expect("writing the plugin");
        Self {
            conf,
            bin,
            state,
            plugin,
            root: BpfRoot::new(tag),
            tmp_dir: tmp,
        }
    }

    fn target(&self) -> PathBuf {
        self.bin.join("meshbypass")
    }

    fn tmp(&self) -> &Path {
        self.tmp_dir.path()
    }
}

/// A running agent: killed (by its PID) on drop if the test did not stop it.
struct Agent {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
}

fn collect(from: impl Read + Send + 'static, into: &Arc<Mutex<Vec<String>>>, tag: &'static str) {
    let into = into.clone();
    thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            eprintln!("{tag}: {line}");
            into.lock().expect("log lock").push(line);
        }
    });
}

impl Agent {
    fn start(host: &Host, plugin: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(EXE);
        cmd.arg("run")
            .arg("--bpf-root")
            .arg(&host.root.0)
            .arg("--cni-conf-dir")
            .arg(&host.conf)
            .arg("--cni-bin-dir")
            .arg(&host.bin)
            .args(["--listen", "127.0.0.1:0", "--plugin-binary"])
            .arg(plugin)
            .arg("--state-dir")
            .arg(&host.state)
            .args([
                "--token-file",
                "/nonexistent/token",
                "--ca-file",
                "/nonexistent/ca",
            ])
            .args(extra)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting meshbypass-node run");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        collect(child.stderr.take().expect("stderr"), &logs, "agent");
        collect(child.stdout.take().expect("stdout"), &stdout, "agent stdout");
        let listen_addr = |l: &str| -> Option<SocketAddr> {
            let rest = l.split("/metrics on ").nth(1)?;
            let end = rest
                .find(|c: char| !(c.is_ascii_hexdigit() || ".:[]".contains(c)))
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        };
        let mut addr = None;
        wait_for(STARTUP, "the agent's listen address", || {
            addr = logs.lock().expect("log lock").iter().find_map(|l| listen_addr(l));
            addr.is_some()
        });
        Self {
            child,
            logs,
            addr: addr.expect("an address"),
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.addr).unwrap_or_else(|e| panic!("connecting: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("sending a request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("reading the response");
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad response {out:?}"));
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signalling the agent");
    }

    fn wait(mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the agent") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {within:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(self, signal: Signal) -> ExitStatus {
        self.signal(signal);
        self.wait(Duration::from_secs(10))
    }

    fn log_contains(&self, needle: &str) -> bool {
        self.logs
            .lock()
            .expect("log lock")
            .iter()
            .any(|l| l.contains(needle))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Err(e) = self.child.kill() {
                eprintln!("cleanup: killing the agent: {e}");
            }
            if let Err(e) = self.child.wait() {
                eprintln!("cleanup: reaping the agent: {e}");
            }
        }
    }
}

/// Go's `filepath.Ext` on a byte name: from the last '.', "" without one.
fn go_ext(name: &[u8]) -> &[u8] {
    name.iter()
        .rposition(|&b| b == b'.')
        .map_or(&[][..], |i| &name[i..])
}

/// The file containerd and CRI-O take as the pod network (module doc).
fn runtime_primary(conf: &Path) -> Option<PathBuf> {
    let mut names: Vec<OsString> = fs::read_dir(conf)
        .expect("listing the conf dir")
        .map(|e| e.expect("dir entry"))
        .filter(|e| !e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name())
        .filter(|n| [&b".conf"[..], b".conflist", b".json"].contains(&go_ext(n.as_bytes())))
        .collect();
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    names.first().map(|n| conf.join(n))
}

/// libcni's view of `path`: the plugin list (a single config is one plugin).
fn runtime_plugins(path: &Path) -> Option<Vec<Value>> {
    let doc: Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    // libcni: strings.HasSuffix(name, ".conflist") (".conflist" alone is one).
    if path
        .file_name()
        .is_some_and(|n| n.as_bytes().ends_with(b".conflist"))
    {
        doc["plugins"].as_array().cloned()
    } else {
        Some(vec![doc])
    }
}

/// Whether the runtime's network, as it stands now, runs meshbypass last.
fn runtime_runs_us(conf: &Path) -> bool {
    runtime_primary(conf)
        .and_then(|p| runtime_plugins(&p))
        .is_some_and(|p| p.last().is_some_and(|l| l["type"] == "meshbypass"))
}

fn describe_runtime(conf: &Path) -> String {
    match runtime_primary(conf) {
        None => "no network config at all".into(),
        Some(p) => format!(
            "{:?} with plugins {:?}",
            p.file_name().unwrap_or_default(),
            runtime_plugins(&p)
                .unwrap_or_default()
                .iter()
                .map(|v| v["type"].as_str().unwrap_or("?").to_owned())
                .collect::<Vec<_>>()
        ),
    }
}

fn rewrite_in_place(path: &Path, bytes: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.write_all(bytes).expect("rewriting in place");
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_file_name(".owner-staging.tmp");
    fs::write(&tmp, bytes).expect("staging");
    fs::rename(&tmp, path).expect("renaming over");
}

fn primary_doc(version: &str) -> Value {
    json!({"cniVersion": version, "name": "mbtest",
           "plugins": [{"type": "bridge", "bridge": "mbtnotused"}]})
}

fn write_primary(conf: &Path) -> PathBuf {
    let primary = conf.join("10-mbtest.conflist");
    fs::write(
        &primary,
        serde_json::to_vec_pretty(&primary_doc("1.0.0")).expect("json"),
    )
    .expect("writing");
    primary
}

// ---- the fake API server (as in agent.rs) ----

#[derive(Clone)]
struct Answer {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Answer {
    fn daemonset() -> Self {
        Self {
            status: 200,
            content_type: "application/json",
            body: json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": "meshbypass-node", "namespace": SA_NAMESPACE, "uid": "4c6f-1"},
                "spec": {}})
            .to_string(),
        }
    }
}

const SA_NAMESPACE: &str = "mbtest-system";

struct FakeApi {
    addr: SocketAddr,
    ca_pem: String,
    answer: Arc<Mutex<Answer>>,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeApi {
    fn start(answer: Answer) -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mbtest-ca");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("server key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("server params");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server certificate");
        let tls =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
                )
                .expect("server TLS config");
        let tls = Arc::new(tls);
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake API server");
        let addr = listener.local_addr().expect("local address");
        let answer = Arc::new(Mutex::new(answer));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (answer, seen, stop) = (answer.clone(), seen.clone(), stop.clone());
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (tls, answer, seen) = (tls.clone(), answer.clone(), seen.clone());
                    thread::spawn(move || fake_api_serve(stream, tls, &answer, &seen));
                }
            })
        };
        Self {
            addr,
            ca_pem: ca.pem(),
            answer,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().expect("answer lock") = answer;
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = TcpStream::connect(self.addr) {
            eprintln!("cleanup: cannot wake the fake API server: {e}");
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("cleanup: the fake API server's thread panicked");
        }
    }
}

fn fake_api_serve(
    stream: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    answer: &Mutex<Answer>,
    seen: &Mutex<Vec<String>>,
) {
    if stream.set_read_timeout(Some(Duration::from_secs(10))).is_err() {
        return;
    }
    let conn = rustls::ServerConnection::new(tls).expect("a TLS server connection");
    let mut reader = BufReader::new(rustls::StreamOwned::new(conn, stream));
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => head.push(line),
        }
    }
    let path = head
        .first()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_owned();
    seen.lock().expect("seen lock").push(path);
    let a = answer.lock().expect("answer lock").clone();
    let tls = reader.get_mut();
    let response = format!(
        "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        a.status,
        a.content_type,
        a.body.len(),
        a.body
    );
    if tls
        .write_all(response.as_bytes())
        .and_then(|()| tls.flush())
        .is_err()
    {
        return;
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

/// A service account mount pointing the agent at `api`.
struct Cluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    port: String,
}

impl Cluster {
    fn new(host: &Host, api: &FakeApi) -> Self {
        let dir = host.tmp().join("sa");
        fs::create_dir_all(&dir).expect("making the sa dir");
        fs::write(dir.join("token"), "token-1\n").expect("writing the token");
        fs::write(dir.join("ca.crt"), &api.ca_pem).expect("writing the CA");
        fs::write(dir.join("namespace"), SA_NAMESPACE).expect("writing the namespace");
        Self {
            kubeconfig: host.conf.join("meshbypass-kubeconfig"),
            dir,
            port: api.addr.port().to_string(),
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--token-file".into(),
            self.dir.join("token").to_string_lossy().into_owned(),
            "--ca-file".into(),
            self.dir.join("ca.crt").to_string_lossy().into_owned(),
            "--kubeconfig-out".into(),
            self.kubeconfig.to_string_lossy().into_owned(),
        ]
    }

    fn env(&self) -> Vec<(&str, &str)> {
        vec![
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", &self.port),
        ]
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn real_plugin() -> PathBuf {
    let p = Path::new(EXE).with_file_name("meshbypass");
    assert!(
        p.is_file(),
        "{} is missing: cargo build --workspace first",
        p.display()
    );
    p
}

/// Starts an in-cluster agent whose DaemonSet exists (200), waits until it
/// is installed, then makes the API server give `answer` and sends SIGTERM.
/// Returns whether the runtime still runs meshbypass, and the agent's log.
fn sigterm_while_the_api_server_says(tag: &str, answer: Answer) -> (bool, bool, Vec<String>) {
    let host = Host::new(tag);
    write_primary(&host.conf);
    let api = FakeApi::start(Answer::daemonset());
    let cluster = Cluster::new(&host, &api);
    let mut extra = vec!["--no-selftest".to_owned()];
    extra.extend(cluster.args());
    let agent = Agent::start(&host, &host.plugin, &strs(&extra), &cluster.env());
    wait_for(STARTUP, "/readyz 200", || agent.get("/readyz").0 == 200);
    api.set(answer);
    let logs = agent.logs.clone();
    let status = agent.stop(Signal::SIGTERM);
    assert!(status.success(), "the agent exited with {status}");
    let asked = api.seen.lock().expect("seen").clone();
    assert!(!asked.is_empty(), "the agent did not ask the API server");
    let logs = logs.lock().expect("log lock").clone();
    (runtime_runs_us(&host.conf), host.target().exists(), logs)
}

/// Attack: at SIGTERM (a rollout: the DaemonSet exists), the API server's
/// address answers 404 with no Kubernetes `Status` at all: a proxy or load
/// balancer in front of the service IP, an aggregator that has not registered
/// `apps/v1` yet, a `KUBERNETES_SERVICE_HOST` that reaches something else.
/// That is not "DaemonSet not found"; the agent must not take it for one.
#[test]
fn rl01_a_404_that_is_no_daemonset_answer_keeps_the_plugin() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let (runs_us, binary, logs) = sigterm_while_the_api_server_says(
        "rl01",
        Answer {
            status: 404,
            content_type: "text/plain; charset=utf-8",
            body: "404 page not found\n".into(),
        },
    );
    let why = logs
        .iter()
        .filter(|l| l.contains("SIGTERM"))
        .cloned()
        .collect::<Vec<_>>();
    assert!(
        runs_us && binary,
        "a plain-text 404 (not a Status naming our DaemonSet) was taken for the DaemonSet's removal: \
         entry in the runtime's network: {runs_us}, binary: {binary}; the agent said {why:?}"
    );
}

/// Attack: RBAC churn during a rollout (a Helm upgrade or `kubectl apply`
/// that recreates the ClusterRoleBinding, an admin tightening roles): the
/// DaemonSet exists, but `get` on it is refused (403) at the moment the old
/// agent pod gets SIGTERM. The plugin must stay: pods created before the new
/// agent is up must get their redirect.
#[test]
fn rl02_a_403_from_rbac_churn_during_a_rollout_keeps_the_plugin() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let (runs_us, binary, logs) = sigterm_while_the_api_server_says(
        "rl02",
        Answer {
            status: 403,
            content_type: "application/json",
            body: json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "daemonsets.apps \"meshbypass-node\" is forbidden: User \
                    \"system:serviceaccount:mbtest-system:meshbypass-node\" cannot get resource \
                    \"daemonsets\" in API group \"apps\" in the namespace \"mbtest-system\"",
                "reason": "Forbidden", "details": {"name": "meshbypass-node", "group": "apps",
                "kind": "daemonsets"}, "code": 403})
            .to_string(),
        },
    );
    let why = logs
        .iter()
        .filter(|l| l.contains("SIGTERM"))
        .cloned()
        .collect::<Vec<_>>();
    assert!(
        runs_us && binary,
        "a 403 while the DaemonSet exists took meshbypass off the node: entry in the runtime's \
         network: {runs_us}, binary: {binary}; the agent said {why:?}"
    );
}

/// Attack: the plugin kubeconfig cannot be written (here the service
/// account token is unreadable for a while) and meanwhile the primary CNI
/// rewrites its conflist. The kubeconfig is not what keeps pods from starting
/// without their redirect; the conflist entry is, and must still be repaired.
#[test]
fn rl03_a_kubeconfig_failure_does_not_stop_the_conflist_repair() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let host = Host::new("rl03");
    let primary = write_primary(&host.conf);
    let original = fs::read(&primary).expect("reading the primary");
    let api = FakeApi::start(Answer::daemonset());
    let cluster = Cluster::new(&host, &api);
    let mut extra = vec!["--no-selftest".to_owned()];
    extra.extend(cluster.args());
    let agent = Agent::start(&host, &host.plugin, &strs(&extra), &cluster.env());
    wait_for(STARTUP, "/readyz 200", || agent.get("/readyz").0 == 200);
    assert!(runtime_runs_us(&host.conf), "not chained after ready");

    let token = cluster.dir.join("token");
    fs::remove_file(&token).expect("removing the token");
    wait_for(Duration::from_secs(5), "the agent to hit the token error", || {
        agent.log_contains(&token.display().to_string())
    });
    // Calico rewrites its conflist in place.
    rewrite_in_place(&primary, &original);
    let t = Instant::now();
    let repaired = poll_until(REPAIR_BOUND * 3, || runtime_runs_us(&host.conf));
    let runtime = describe_runtime(&host.conf);
    // Put the token back so that SIGTERM asks as usual.
    fs::write(&token, "token-1\n").expect("restoring the token");
    assert!(
        repaired,
        "{:?} after the primary's rewrite, with the token unreadable, the runtime's network is \
         {runtime}: a pod starts without its redirect (the conflist step is never reached)",
        t.elapsed()
    );
}

/// Attack: the ConfigMap holds a bad edit (the agent keeps the last good
/// entry: fine), then the node reboots: the primary CNI writes its conflist
/// afresh at boot (Calico's install-cni does), and the agent restarts with
/// the bad file. The last good entry lived only in the conflist.
#[test]
fn rl04_a_reboot_with_a_bad_settings_edit_keeps_the_redirect() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let host = Host::new("rl04");
    let primary = write_primary(&host.conf);
    let original = fs::read(&primary).expect("reading the primary");
    let dir = host.tmp().join("settings");
    fs::create_dir_all(&dir).expect("settings dir");
    let settings = dir.join("plugin.json");
    fs::write(&settings, r#"{"mesh": "istio", "acceleration": "auto"}"#).expect("settings");
    let args = [
        "--no-selftest",
        "--plugin-config",
        settings.to_str().expect("utf-8"),
    ];
    let agent = Agent::start(&host, &host.plugin, &args, &[]);
    wait_for(STARTUP, "/readyz 200", || agent.get("/readyz").0 == 200);
    // The bad edit: kept out of the conflist, as designed.
    rewrite_in_place(&settings, br#"{"mesh": "istio", "acceleraton": "all"}"#);
    wait_for(REPAIR_BOUND * 2, "/readyz to name the typo", || {
        agent.get("/readyz").1.contains("`acceleraton`")
    });
    assert!(runtime_runs_us(&host.conf), "the bad edit took the entry out");
    // The reboot: the agent stops (the DaemonSet stays), the primary CNI
    // writes its conflist at boot, the agent starts again.
    let status = agent.stop(Signal::SIGTERM);
    assert!(status.success(), "the agent exited with {status}");
    write_atomically(&primary, &original);
    let agent = Agent::start(&host, &host.plugin, &args, &[]);
    wait_for(STARTUP, "/readyz to name the typo again", || {
        agent.get("/readyz").1.contains("`acceleraton`")
    });
    let chained = poll_until(REPAIR_BOUND * 3, || runtime_runs_us(&host.conf));
    let (_, readyz) = agent.get("/readyz");
    assert!(
        chained,
        "after a reboot with a bad settings edit the runtime's network is {}: every pod on the node \
         starts without its redirect until someone fixes the ConfigMap; /readyz: {readyz}",
        describe_runtime(&host.conf)
    );
}

/// Attack: something holds the bpf root's loader lock (a plugin ADD in the
/// middle of the first load of a busy node, a stuck `meshbypass-node load`,
/// a frozen process) when the agent starts. The plugin is installed "even if
/// the load fails"; it must not wait for the loader either.
#[test]
fn rl05_a_held_loader_lock_does_not_keep_the_plugin_out() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let host = Host::new("rl05");
    write_primary(&host.conf);
    fs::create_dir_all(&host.root.0).expect("making the bpf root");
    let dir = fs::File::open(&host.root.0).expect("opening the bpf root");
    let lock = Flock::lock(dir, FlockArg::LockExclusive).unwrap_or_else(|(_, e)| panic!("flock: {e}"));
    let agent = Agent::start(&host, &host.plugin, &["--no-selftest"], &[]);
    let t = Instant::now();
    let chained = poll_until(REPAIR_BOUND * 3, || runtime_runs_us(&host.conf));
    let waited = t.elapsed();
    let runtime = describe_runtime(&host.conf);
    // SIGTERM is not read either while the load waits.
    agent.signal(Signal::SIGTERM);
    let exited = poll_until(Duration::from_secs(2), || agent.log_contains("SIGTERM"));
    drop(lock);
    let status = agent.wait(Duration::from_secs(10));
    eprintln!("after the lock was released: the agent exited with {status}");
    assert!(
        chained,
        "{waited:?} after the start, with the bpf root's lock held elsewhere, the runtime's network \
         is {runtime}: pods start without their redirect (SIGTERM handled while waiting: {exited})"
    );
}

/// Attack: a config file the runtime reads but the agent does not: libcni
/// takes any name whose `filepath.Ext` is `.conf`/`.conflist`/`.json`, so a
/// file named just `.conf`, or a name that is not UTF-8, can sort first.
#[test]
fn rl06_the_agent_chains_into_the_file_the_runtime_reads() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let mut failures = Vec::new();
    let stale = json!({"cniVersion": "1.0.0", "name": "stale", "type": "bridge", "bridge": "mbtnotused"});
    for (tag, name) in [
        ("rl06dot", OsString::from(".conf")),
        ("rl06utf", OsString::from_vec(b"0\xff-mbtest.conf".to_vec())),
    ] {
        let host = Host::new(tag);
        write_primary(&host.conf);
        fs::write(host.conf.join(&name), stale.to_string()).expect("writing the extra config");
        let agent = Agent::start(&host, &host.plugin, &["--no-selftest"], &[]);
        if tag == "rl06utf" {
            // A name that is not UTF-8: the agent cannot chain into it, so it
            // must not claim to be installed; it says why instead.
            let said = poll_until(Duration::from_secs(10), || {
                let (code, body) = agent.get("/readyz");
                code == 503 && body.contains("not UTF-8")
            });
            if !said {
                failures.push(format!(
                    "{name:?}: /readyz {:?}; the runtime's network is {}",
                    agent.get("/readyz"),
                    describe_runtime(&host.conf)
                ));
            }
            drop(agent);
            continue;
        }
        let ready = poll_until(Duration::from_secs(10), || agent.get("/readyz").0 == 200);
        let runs_us = poll_until(REPAIR_BOUND, || runtime_runs_us(&host.conf));
        if !runs_us {
            failures.push(format!(
                "{name:?}: agent ready: {ready}; the runtime's network is {}",
                describe_runtime(&host.conf)
            ));
        }
        drop(agent);
    }
    assert!(
        failures.is_empty(),
        "pods start without their redirect while the agent reports itself installed: {failures:#?}"
    );
}

/// Regression (held): the primary CNI rewriting its config in every way;
/// after each, the file the runtime reads runs meshbypass last within the
/// bound, and the owner's `cniVersion` is kept.
#[test]
fn rl07_every_rewrite_of_the_primary_is_repaired() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let host = Host::new("rl07");
    let primary = write_primary(&host.conf);
    let agent = Agent::start(&host, &host.plugin, &["--no-selftest"], &[]);
    wait_for(STARTUP, "/readyz 200", || agent.get("/readyz").0 == 200);
    let json_bytes = |v: &Value| serde_json::to_vec_pretty(v).expect("json");
    let repaired = |what: &str| {
        let t = Instant::now();
        let ok = poll_until(REPAIR_BOUND, || runtime_runs_us(&host.conf));
        assert!(
            ok,
            "{what}: after {:?} the runtime's network is {}",
            t.elapsed(),
            describe_runtime(&host.conf)
        );
        eprintln!("{what}: repaired after {:?}", t.elapsed());
    };
    // In place, with a cniVersion change.
    rewrite_in_place(&primary, &json_bytes(&primary_doc("0.3.1")));
    repaired("truncate+write to cniVersion 0.3.1");
    assert_eq!(
        read_json(&primary)["cniVersion"],
        "0.3.1",
        "the owner's cniVersion was changed"
    );
    // Atomic rename, another version and one more plugin.
    let mut doc = primary_doc("0.4.0");
    doc["plugins"]
        .as_array_mut()
        .expect("plugins")
        .push(json!({"type": "portmap"}));
    write_atomically(&primary, &json_bytes(&doc));
    repaired("atomic rename to 0.4.0 with portmap");
    assert_eq!(read_json(&primary)["cniVersion"], "0.4.0");
    // Briefly missing, then back.
    fs::remove_file(&primary).expect("removing the primary");
    wait_for(REPAIR_BOUND * 2, "/readyz 503 without a primary", || {
        agent.get("/readyz").0 == 503
    });
    fs::write(&primary, json_bytes(&primary_doc("1.0.0"))).expect("writing the primary again");
    repaired("deleted, then written again");
    // A second conflist sorting first.
    let first = host.conf.join("05-mbtest.conflist");
    fs::write(&first, json_bytes(&primary_doc("1.1.0"))).expect("writing a second conflist");
    repaired("a second conflist sorting first");
    fs::remove_file(&first).expect("removing it");
    repaired("the second conflist removed");
    // A single .conf sorting first: converted; rewritten by its owner.
    let single = host.conf.join("00-mbtest.conf");
    let conf = json!({"cniVersion": "0.3.1", "name": "flat", "type": "bridge", "bridge": "mbtnotused"});
    fs::write(&single, conf.to_string()).expect("writing a .conf");
    repaired("a .conf sorting first");
    fs::write(&single, conf.to_string()).expect("the owner writes its .conf again");
    repaired("the owner writes its .conf beside our converted .conflist");
    // The owner switches to a .conflist of its own (rename over ours).
    let list = host.conf.join("00-mbtest.conflist");
    write_atomically(&list, &json_bytes(&primary_doc("0.3.1")));
    if single.exists() {
        fs::remove_file(&single).expect("removing the .conf");
    }
    repaired("the .conf turned into the owner's .conflist");
    drop(agent);
}

/// Regression (held): an upgrade. The old agent gets SIGTERM twice (the
/// DaemonSet stays), the new one installs another plugin binary while the
/// runtime keeps exec'ing it: every exec runs a whole binary, old or new.
#[test]
fn rl08_an_upgrade_swaps_the_binary_whole_under_running_execs() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let host = Host::new("rl08");
    write_primary(&host.conf);
    let v1 = real_plugin();
    let v2 = host.tmp().join("meshbypass-v2");
    let mut bytes = fs::read(&v1).expect("reading the plugin");
    bytes.extend_from_slice(&[0u8; 4096]); // another build: other bytes, same behaviour
    fs::write(&v2, &bytes).expect("writing v2");
    let old = Agent::start(&host, &v1, &["--no-selftest"], &[]);
    wait_for(STARTUP, "/readyz 200", || old.get("/readyz").0 == 200);
    old.signal(Signal::SIGTERM);
    old.signal(Signal::SIGTERM);
    let status = old.wait(Duration::from_secs(10));
    assert!(status.success(), "the old agent exited with {status}");
    assert!(runtime_runs_us(&host.conf), "two SIGTERMs took the entry out");

    let stop = Arc::new(AtomicBool::new(false));
    let (runs, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::new())));
    let execer = {
        let (target, stop, runs, failures) = (host.target(), stop.clone(), runs.clone(), failures.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let out = Command::new(&target)
                    .env_clear()
                    .env("CNI_COMMAND", "VERSION")
                    .stdin(Stdio::null())
                    .output();
                runs.fetch_add(1, Ordering::Relaxed);
                match out {
                    Ok(o) if o.status.success() && o.stdout.starts_with(b"{") => {}
                    Ok(o) => failures.lock().expect("lock").push(format!(
                        "{}: {}{}",
                        o.status,
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )),
                    Err(e) => failures.lock().expect("lock").push(format!("exec: {e}")),
                }
            }
        })
    };
    wait_for(Duration::from_secs(5), "a few execs of v1", || {
        runs.load(Ordering::Relaxed) >= 5
    });
    let new = Agent::start(&host, &v2, &["--no-selftest"], &[]);
    wait_for(STARTUP, "v2 in the bin dir", || {
        fs::read(host.target()).is_ok_and(|b| b == bytes)
    });
    let at_swap = runs.load(Ordering::Relaxed);
    wait_for(Duration::from_secs(5), "a few execs of v2", || {
        runs.load(Ordering::Relaxed) >= at_swap + 5
    });
    stop.store(true, Ordering::Relaxed);
    execer.join().expect("the exec thread");
    let failures = failures.lock().expect("lock").clone();
    eprintln!(
        "{} execs, {at_swap} before v2 was in place",
        runs.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} of {} execs failed: {failures:?}",
        failures.len(),
        runs.load(Ordering::Relaxed)
    );
    assert!(
        runtime_runs_us(&host.conf),
        "the new agent's install lost the entry"
    );
    drop(new);
}
