//! `meshbypass-node run`, `install` and `uninstall` end to end, as root, in
//! temp directories (conf dir, bin dir, state dir) with a private bpf root
//! under /sys/fs/bpf (unique name, unloaded by a guard even on panic).
//! The "plugin binary" copied is any file, except where the test runs the
//! real plugin on what the agent installed. Where the agent asks the API
//! server (at SIGTERM: is our DaemonSet being deleted?), a fake one answers
//! on 127.0.0.1 over TLS with a CA made at test time.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::{
        inotify::{AddWatchFlags, InitFlags, Inotify},
        signal::{Signal, kill},
    },
    unistd::Pid,
};
use serde_json::{Value, json};

const EXE: &str = env!("CARGO_BIN_EXE_meshbypass-node");
/// The issue's bound for repairing a rewritten conflist.
const REPAIR_BOUND: Duration = Duration::from_secs(1);
const STARTUP: Duration = Duration::from_secs(30);

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)
}

fn read_json(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Polls `cond` until it holds or `within` passes; panics with `what`.
fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A private bpf root, unloaded on drop.
struct BpfRoot(PathBuf);

impl BpfRoot {
    fn new(tag: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/mbtest-node-{tag}-{}-{n}",
            std::process::id()
        )))
    }

    fn loaded(&self) -> bool {
        self.0.join("mb_config").exists()
    }
}

impl Drop for BpfRoot {
    fn drop(&mut self) {
        if self.0.exists() {
            let out = Command::new(EXE)
                .args(["unload", "--bpf-root"])
                .arg(&self.0)
                .output()
                .expect("running meshbypass-node unload");
            if !out.status.success() {
                eprintln!(
                    "cleanup: unload {} failed: {}",
                    self.0.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// The host directories of one test.
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
        // Each test returns first when not root (privileged()).
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

    fn common_args(&self) -> Vec<String> {
        [
            "--bpf-root",
            &self.root.0.to_string_lossy(),
            "--cni-conf-dir",
            &self.conf.to_string_lossy(),
            "--cni-bin-dir",
            &self.bin.to_string_lossy(),
        ]
        .map(String::from)
        .to_vec()
    }

    fn target(&self) -> PathBuf {
        self.bin.join("meshbypass")
    }

    fn tmp(&self) -> &Path {
        self.tmp_dir.path()
    }
}

/// A running agent: killed on drop if the test did not stop it.
struct Agent {
    child: Child,
    /// stderr (the agent's log) and stdout (the plugin's decisions).
    logs: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
}

/// Collects the lines of `from` into `into`, echoed with `tag`.
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
    fn start(host: &Host, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(EXE);
        cmd.arg("run")
            .args(host.common_args())
            .args(["--listen", "127.0.0.1:0", "--plugin-binary"])
            .arg(&host.plugin)
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
        let (logs, stdout) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        collect(child.stderr.take().expect("the child's stderr"), &logs, "agent");
        collect(
            child.stdout.take().expect("the child's stdout"),
            &stdout,
            "agent stdout",
        );
        let mut addr = None;
        // In a text line or inside a JSON one's "msg".
        let listen_addr = |l: &str| -> Option<SocketAddr> {
            let rest = l.split("/metrics on ").nth(1)?;
            let end = rest
                .find(|c: char| !(c.is_ascii_hexdigit() || ".:[]".contains(c)))
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        };
        wait_for(STARTUP, "the agent's listen address in its log", || {
            addr = logs.lock().expect("log lock").iter().find_map(|l| listen_addr(l));
            addr.is_some()
        });
        Self {
            child,
            logs,
            stdout,
            addr: addr.expect("an address"),
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut s =
            TcpStream::connect(self.addr).unwrap_or_else(|e| panic!("connecting to {}: {e}", self.addr));
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

    fn metrics(&self) -> BTreeMap<String, f64> {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        parse_metrics(&body)
    }

    fn stop(mut self, signal: Signal) -> ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signalling the agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the agent") {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit after {signal}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().expect("log lock").clone()
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

/// Parses Prometheus text format 0.0.4: every sample line is
/// `name{labels} value`; HELP/TYPE comments precede each family (a
/// histogram's samples are `_bucket`, `_sum` and `_count`).
fn parse_metrics(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let name = it.next().unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            let kind = it.next().unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            assert!(
                matches!(kind, "counter" | "gauge" | "histogram"),
                "unexpected type in {line:?}"
            );
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample {line:?}"));
        let name = series.split('{').next().unwrap_or_default();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|base| typed.contains(*base)))
            .unwrap_or(name);
        assert!(typed.contains(family), "sample {line:?} before its TYPE line");
        let ok_name = family
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':');
        assert!(ok_name, "bad metric name in {line:?}");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
        assert!(
            out.insert(series.to_owned(), value).is_none(),
            "duplicate series {series}"
        );
    }
    out
}

fn metric(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series} in {:?}", m.keys().collect::<Vec<_>>()))
}

fn has_our_entry(path: &Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["plugins"].as_array().cloned())
        .is_some_and(|p| p.last().is_some_and(|l| l["type"] == "meshbypass"))
}

/// Writes `bytes` in place (truncate + write), as a CNI daemon rewriting its
/// own file does: the case watchers that only saw renames missed.
fn rewrite_in_place(path: &Path, bytes: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    f.write_all(bytes).expect("rewriting the conflist");
}

/// How many log lines contain `needle`.
fn count_lines(agent: &Agent, needle: &str) -> usize {
    agent
        .logs
        .lock()
        .expect("log lock")
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Our entry in the primary conflist at `path` (panics if absent).
fn our_entry(path: &Path) -> Value {
    read_json(path)["plugins"]
        .as_array()
        .and_then(|p| p.last())
        .filter(|e| e["type"] == "meshbypass")
        .cloned()
        .unwrap_or_else(|| panic!("no meshbypass entry in {}", path.display()))
}

/// A primary conflist in `cniVersion` 1.0.0 (any version the plugin speaks).
fn write_primary(conf: &Path) -> PathBuf {
    let primary = conf.join("10-mbtest.conflist");
    fs::write(
        &primary,
        serde_json::to_vec_pretty(&json!({
            "cniVersion": "1.0.0",
            "name": "mbtest",
            "plugins": [{"type": "bridge", "bridge": "mbtnotused"}]
        }))
        .expect("serializing"),
    )
    .expect("writing the primary conflist");
    primary
}

/// What the fake API server answers to every request.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn daemonset(deleting: bool) -> Self {
        let mut meta = json!({"name": "meshbypass-node", "namespace": SA_NAMESPACE, "uid": "4c6f-1"});
        if deleting {
            meta["deletionTimestamp"] = json!("2030-01-01T00:00:00Z");
        }
        Self {
            status: 200,
            body: json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta, "spec": {}})
                .to_string(),
        }
    }

    /// What the API server answers for a DaemonSet that does not exist.
    fn daemonset_not_found(name: &str) -> Self {
        Self {
            status: 404,
            body: json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "message": format!("daemonsets.apps \"{name}\" not found"),
                         "reason": "NotFound", "details": {"name": name, "group": "apps", "kind": "daemonsets"},
                         "code": 404})
            .to_string(),
        }
    }

    fn status(code: u16, reason: &str) -> Self {
        Self {
            status: code,
            body: json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "message": format!("{reason} (fake)"), "reason": reason, "code": code})
            .to_string(),
        }
    }
}

/// The namespace in the fake service account, and the path the agent must ask.
const SA_NAMESPACE: &str = "mbtest-system";
const DS_PATH: &str = "/apis/apps/v1/namespaces/mbtest-system/daemonsets/meshbypass-node";

/// A fake API server: TLS on 127.0.0.1 with a CA made here; records each
/// request's path and Authorization header; stops when dropped.
struct FakeApi {
    addr: SocketAddr,
    ca_pem: String,
    answer: Arc<Mutex<Answer>>,
    seen: Arc<Mutex<Vec<(String, String)>>>,
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

    fn seen(&self) -> Vec<(String, String)> {
        self.seen.lock().expect("seen lock").clone()
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
    seen: &Mutex<Vec<(String, String)>>,
) {
    if let Err(e) = stream.set_read_timeout(Some(Duration::from_secs(10))) {
        eprintln!("fake API: {e}");
        return;
    }
    let conn = rustls::ServerConnection::new(tls).expect("a TLS server connection");
    let mut reader = BufReader::new(rustls::StreamOwned::new(conn, stream));
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return, // the wake-up connect, or a client that gave up
            Ok(_) if line == "\r\n" => break,
            Ok(_) => head.push(line),
        }
    }
    let path = head
        .first()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_owned();
    let auth = head
        .iter()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    seen.lock().expect("seen lock").push((path, auth));
    let a = answer.lock().expect("answer lock").clone();
    let tls = reader.get_mut();
    let response = format!(
        "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        a.status,
        a.body.len(),
        a.body
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

/// A service account mount for the agent (token, CA of `api`, namespace)
/// and the flags and environment that point the agent at `api`.
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

/// The real plugin, built beside this binary (`cargo build --workspace`).
fn real_plugin() -> PathBuf {
    let p = Path::new(EXE).with_file_name("meshbypass");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace; scripts/test.sh does)",
        p.display()
    );
    p
}

/// Runs `args` and panics with its output unless it succeeds.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("mbtnode{}{tag}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        Self(name)
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }

    fn nat_rules(&self) -> String {
        sh(&["ip", "netns", "exec", &self.0, "iptables-save", "-t", "nat"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip").args(["netns", "del", &self.0]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "cleanup: ip netns del {}: {}",
                self.0,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cleanup: ip netns del {}: {e}", self.0),
        }
    }
}

/// A private cgroup2 subtree `<mount>/<unique>` holding kubelet's cgroupfs
/// layout for one pod; removed (deepest first) on drop.
struct PodCgroup {
    root: PathBuf,
    dirs: Vec<PathBuf>,
}

impl PodCgroup {
    fn new(tag: &str, uid: &str) -> Self {
        let mount = meshbypass_ebpf::cgroup2::mount_point().expect("no cgroup2 mount on this host");
        let root = mount.join(format!("mbtest-node-{tag}-{}", std::process::id()));
        let mut dirs = Vec::new();
        let mut cur = root.clone();
        for part in ["", "kubepods", "besteffort", &format!("pod{uid}")] {
            cur = if part.is_empty() { cur } else { cur.join(part) };
            fs::create_dir(&cur).unwrap_or_else(|e| panic!("mkdir {}: {e}", cur.display()));
            dirs.push(cur.clone());
        }
        Self { root, dirs }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            if let Err(e) = fs::remove_dir(d) {
                eprintln!("cleanup: rmdir {}: {e}", d.display());
            }
        }
    }
}

/// Runs the plugin at `plugin` once; (exit success, stdout).
fn run_plugin(plugin: &Path, command: &str, env: &[(&str, String)], config: &Value) -> (bool, String) {
    let mut child = Command::new(plugin)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("CNI_COMMAND", command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", plugin.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(config.to_string().as_bytes())
        .expect("writing the config");
    let out = child.wait_with_output().expect("waiting for the plugin");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Stamps another layout version (99) into the maps at `root`, as a
/// meshbypass build of another layout would have left them.
fn stamp_foreign_layout(root: &Path) {
    let value: Vec<String> = [99u32, 0, 0, 0, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .map(|b| b.to_string())
        .collect();
    let pin = root.join("mb_config");
    let mut args = vec![
        "bpftool",
        "map",
        "update",
        "pinned",
        pin.to_str().expect("utf-8 path"),
    ];
    args.extend(["key", "0", "0", "0", "0", "value"]);
    args.extend(value.iter().map(String::as_str));
    sh(&args);
}

/// GETs `path` and returns how long the answer took (panics past 5 s).
fn timed_get(addr: SocketAddr, path: &str) -> (u16, Duration) {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
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
    (status, t.elapsed())
}

#[test]
fn run_installs_repairs_serves_and_stays_on_sigterm() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let host = Host::new("run");
    let calico = testdata("conflist/10-calico.conflist");
    let primary = host.conf.join("10-calico.conflist");

    // In a cluster: the agent writes the plugin kubeconfig from its service
    // account, and at SIGTERM asks the API server about its DaemonSet.
    let api = FakeApi::start(Answer::daemonset(false));
    let cluster = Cluster::new(&host, &api);
    let sa = cluster.dir.clone();
    let kubeconfig = cluster.kubeconfig.clone();
    let mut extra = vec!["--gc-interval".to_owned(), "1".to_owned()];
    extra.extend(cluster.args());
    let agent = Agent::start(&host, &strs(&extra), &cluster.env());

    // No primary CNI yet: not ready, whatever the loader is doing.
    assert_eq!(agent.get("/readyz").0, 503, "ready without a conflist");
    assert_eq!(agent.get("/healthz").0, 200);
    wait_for(STARTUP, "the maps to load", || host.root.loaded());
    wait_for(STARTUP, "the wait for a primary", || {
        agent.log_contains("waiting for the primary CNI")
    });
    let (status, body) = agent.get("/readyz");
    assert_eq!(status, 503, "ready without a conflist");
    assert!(body.contains("waiting for the primary CNI"), "{body}");

    // The primary CNI arrives: chained within the bound, then ready.
    fs::copy(&calico, &primary).expect("installing the primary conflist");
    let t = Instant::now();
    wait_for(REPAIR_BOUND, "our entry in the new primary", || {
        has_our_entry(&primary)
    });
    eprintln!("chained {:?} after the conflist appeared", t.elapsed());
    // Ready once the loader thread also recorded the selftest (it runs
    // beside the install, which never waits for it).
    wait_for(STARTUP, "/readyz 200", || agent.get("/readyz").0 == 200);
    assert_eq!(
        fs::read(host.target()).expect("the copied plugin"),
        fs::read(&host.plugin).expect("plugin")
    );
    let mode = fs::metadata(host.target()).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "the plugin is not executable");
    assert_eq!(
        our_entry(&primary),
        json!({"type": "meshbypass", "bpfRoot": host.root.0, "stateDir": host.state}),
        "our entry should carry the agent's bpf root and state dir"
    );

    // The plugin kubeconfig, 0600, follows token rotation.
    let kc = read_json(&kubeconfig);
    assert_eq!(kc["users"][0]["user"]["token"], "token-1");
    assert_eq!(
        kc["clusters"][0]["cluster"]["server"],
        format!("https://127.0.0.1:{}", cluster.port)
    );
    let mode = fs::metadata(&kubeconfig).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "kubeconfig mode");
    fs::write(sa.join("token.new"), "token-2\n").expect("writing the new token");
    fs::rename(sa.join("token.new"), sa.join("token")).expect("rotating the token");
    wait_for(REPAIR_BOUND, "the kubeconfig to follow the token", || {
        read_json(&kubeconfig)["users"][0]["user"]["token"] == "token-2"
    });

    // Metrics: parsed, and what they say is true.
    let m = agent.metrics();
    assert_eq!(metric(&m, "meshbypass_ready"), 1.0);
    assert_eq!(metric(&m, "meshbypass_installed"), 1.0);
    assert_eq!(metric(&m, "meshbypass_loaded"), 1.0);
    assert_eq!(metric(&m, "meshbypass_settings_valid"), 1.0);
    assert_eq!(metric(&m, "meshbypass_load_failures_total"), 0.0);
    assert!(
        !m.keys()
            .any(|k| k.starts_with("meshbypass_load_error") || k.starts_with("meshbypass_settings_error")),
        "an error series without an error: {m:?}"
    );
    assert_eq!(
        metric(&m, "meshbypass_kernel_probed"),
        1.0,
        "the selftest verdict was not recorded"
    );
    assert_eq!(
        metric(&m, "meshbypass_installs_total{artifact=\"conflist\"}"),
        1.0
    );
    assert_eq!(metric(&m, "meshbypass_installs_total{artifact=\"binary\"}"), 1.0);
    // The rewrite is visible a moment before it is counted.
    wait_for(REPAIR_BOUND, "the kubeconfig repair to be counted", || {
        metric(
            &agent.metrics(),
            "meshbypass_repairs_total{artifact=\"kubeconfig\"}",
        ) == 1.0
    });
    assert_eq!(metric(&m, "meshbypass_pods"), 0.0);
    assert_eq!(
        metric(&m, "meshbypass_datapath_messages_total{path=\"redirected\"}"),
        0.0
    );
    assert_eq!(metric(&m, "meshbypass_map_entries{map=\"mb_netns\"}"), 0.0);
    assert_eq!(metric(&m, "meshbypass_map_capacity{map=\"mb_netns\"}"), 4096.0);
    for probe in ["redirect", "splice-reader", "fionread", "blocking-read"] {
        let v = metric(&m, &format!("meshbypass_kernel_hazard{{probe=\"{probe}\"}}"));
        assert!(v == 0.0 || v == 1.0, "hazard {probe} = {v}");
    }

    // Calico rewrites its file in place without us: repaired within a second.
    for round in 1..=3 {
        rewrite_in_place(&primary, &fs::read(&calico).expect("reading the original"));
        let t = Instant::now();
        wait_for(REPAIR_BOUND, "re-injection after an in-place rewrite", || {
            has_our_entry(&primary)
        });
        eprintln!("round {round}: repaired after {:?}", t.elapsed());
    }
    // ... and by an atomic rename, the way most installers write.
    let tmp = host.conf.join(".calico.tmp");
    fs::copy(&calico, &tmp).expect("staging");
    fs::rename(&tmp, &primary).expect("renaming over the conflist");
    wait_for(REPAIR_BOUND, "re-injection after a rename", || {
        has_our_entry(&primary)
    });
    // Someone deletes our binary: restored.
    fs::remove_file(host.target()).expect("deleting the plugin");
    wait_for(REPAIR_BOUND, "the binary to be restored", || {
        host.target().exists()
    });
    // Four rewrites of the conflist (three in place, one rename).
    wait_for(REPAIR_BOUND, "the conflist repairs to be counted", || {
        metric(
            &agent.metrics(),
            "meshbypass_repairs_total{artifact=\"conflist\"}",
        ) == 4.0
    });
    // The counter moves just after the rename that made the file visible.
    wait_for(REPAIR_BOUND, "the binary repair to be counted", || {
        metric(&agent.metrics(), "meshbypass_repairs_total{artifact=\"binary\"}") == 1.0
    });

    // Settled: our own writes do not make the agent write again.
    let before = fs::metadata(&primary).expect("stat").modified().expect("mtime");
    let gc_runs = metric(&agent.metrics(), "meshbypass_gc_runs_total");
    wait_for(Duration::from_secs(3), "a GC tick", || {
        metric(&agent.metrics(), "meshbypass_gc_runs_total") >= gc_runs + 1.0
    });
    assert_eq!(
        fs::metadata(&primary).expect("stat").modified().expect("mtime"),
        before,
        "rewrote for nothing"
    );
    assert_eq!(
        metric(
            &agent.metrics(),
            "meshbypass_repairs_total{artifact=\"conflist\"}"
        ),
        4.0
    );

    // GC: a record whose netns is gone goes; one whose netns exists stays.
    let netns_dir = host.tmp().join("netns");
    fs::create_dir_all(&netns_dir).expect("making the netns dir");
    fs::write(netns_dir.join("cni-alive"), b"").expect("a live netns stand-in");
    let record = |id: &str, netns: &str| {
        json!({"containerId": id, "ifname": "eth0", "netns": netns_dir.join(netns), "ips": [],
               "families": [], "netnsCookie": 4242, "mode": "auto"})
        .to_string()
    };
    fs::write(host.state.join("deadc0de.json"), record("deadc0de", "cni-gone")).expect("a dead record");
    fs::write(host.state.join("a11ce.json"), record("a11ce", "cni-alive")).expect("a live record");
    wait_for(Duration::from_secs(5), "GC of the dead record", || {
        !host.state.join("deadc0de.json").exists()
    });
    assert!(
        host.state.join("a11ce.json").exists(),
        "GC removed a live pod's record"
    );
    assert_eq!(metric(&agent.metrics(), "meshbypass_gc_removed_total"), 1.0);

    // SIGTERM while the DaemonSet exists (a rollout, a restart, a drain):
    // everything stays, byte for byte.
    let chained = fs::read(&primary).expect("reading the conflist");
    let status = agent.stop(Signal::SIGTERM);
    assert!(status.success(), "the agent exited with {status}");
    assert_eq!(
        fs::read(&primary).expect("reading the conflist"),
        chained,
        "SIGTERM changed the conflist"
    );
    assert!(host.target().exists(), "SIGTERM removed the binary");
    assert!(kubeconfig.exists(), "SIGTERM removed the kubeconfig");
    assert!(host.root.loaded(), "the maps were unloaded");
    // It asked the API server exactly once, for its own DaemonSet, with the
    // current token.
    assert_eq!(
        api.seen(),
        vec![(DS_PATH.to_owned(), "Bearer token-2".to_owned())],
        "what the agent asked the API server"
    );
}

#[test]
fn a_deleted_daemonset_takes_the_entry_out_before_the_binary() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let host = Host::new("term");
    let conf = testdata("conflist/10-flannel.conf");
    let original = read_json(&conf);
    fs::copy(&conf, host.conf.join("10-flannel.conf")).expect("installing the primary");
    let api = FakeApi::start(Answer::daemonset(false));
    let cluster = Cluster::new(&host, &api);
    let mut extra = vec!["--no-selftest".to_owned(), "--cleanup".to_owned()];
    extra.extend(cluster.args());
    let agent = Agent::start(&host, &strs(&extra), &cluster.env());
    wait_for(STARTUP, "/readyz 200", || agent.get("/readyz").0 == 200);
    let list = host.conf.join("10-flannel.conflist");
    assert!(
        has_our_entry(&list),
        "the .conf was not turned into a chained .conflist"
    );
    assert!(
        !host.conf.join("10-flannel.conf").exists(),
        "the .conf would still win"
    );
    assert!(cluster.kubeconfig.exists(), "no plugin kubeconfig");

    // `kubectl delete`: the DaemonSet is gone when its pods get SIGTERM.
    api.set(Answer::daemonset_not_found("meshbypass-node"));

    // Record the order of changes in both directories with one inotify
    // instance: its queue is ordered across watches.
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK).expect("inotify");
    let changes = AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_DELETE;
    let conf_wd = inotify
        .add_watch(&host.conf, changes)
        .expect("watching the conf dir");
    let bin_wd = inotify
        .add_watch(&host.bin, changes)
        .expect("watching the bin dir");

    let log = agent.logs.clone();
    let status = agent.stop(Signal::SIGTERM);
    assert!(status.success(), "the agent exited with {status}");
    assert!(
        log.lock()
            .expect("log lock")
            .iter()
            .any(|l| l.contains("DaemonSet mbtest-system/meshbypass-node is gone")),
        "no removal reason in the log"
    );
    let mut order = Vec::new();
    loop {
        match inotify.read_events() {
            Ok(events) if !events.is_empty() => order.extend(events),
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => panic!("reading inotify events: {e}"),
        }
    }
    // The entry is out when our .conflist is gone (the .conf restored).
    let conf_done = order
        .iter()
        .position(|e| {
            e.wd == conf_wd
                && e.mask.contains(AddWatchFlags::IN_DELETE)
                && e.name.as_deref() == Some(std::ffi::OsStr::new("10-flannel.conflist"))
        })
        .unwrap_or_else(|| panic!("our conflist was not removed: {order:?}"));
    let bin_gone = order
        .iter()
        .position(|e| e.wd == bin_wd && e.mask.contains(AddWatchFlags::IN_DELETE))
        .unwrap_or_else(|| panic!("the binary was not deleted: {order:?}"));
    assert!(
        conf_done < bin_gone,
        "the binary went before our entry: {order:?}"
    );

    assert_eq!(
        read_json(&host.conf.join("10-flannel.conf")),
        original,
        "the .conf was not restored"
    );
    assert!(!list.exists(), "our .conflist was left behind");
    assert!(!host.target().exists(), "the binary was left behind");
    assert!(!cluster.kubeconfig.exists(), "the kubeconfig was left behind");
    assert!(!host.root.0.exists(), "--cleanup left the bpf root");
}

/// Each answer the API server can give at SIGTERM, and what it means for the
/// plugin on the node (removal.rs's table).
#[test]
fn sigterm_removes_only_when_the_api_server_says_the_daemonset_is_going() {
    if !meshbypass_tests::privileged() {
        return;
    }
    struct Case {
        answer: Option<Answer>,
        removed: bool,
        says: &'static str,
    }
    let cases = [
        Case {
            answer: Some(Answer::daemonset(true)),
            removed: true,
            says: "is being deleted (since 2030-01-01T00:00:00Z)",
        },
        // Our token or RBAC gone: by accident as well as with the
        // DaemonSet, so it cannot mean removal (fail closed).
        Case {
            answer: Some(Answer::status(401, "Unauthorized")),
            removed: false,
            says: "the API server refuses to say whether DaemonSet mbtest-system/meshbypass-node exists",
        },
        Case {
            answer: Some(Answer::status(403, "Forbidden")),
            removed: false,
            says: "the API server refuses to say whether DaemonSet mbtest-system/meshbypass-node exists",
        },
        // A 404 that is not the API server's NotFound for our DaemonSet (a
        // proxy, a group not served yet) says nothing about it.
        Case {
            answer: Some(Answer::status(404, "NotFound")),
            removed: false,
            says: "cannot tell whether DaemonSet mbtest-system/meshbypass-node was deleted",
        },
        Case {
            answer: Some(Answer::daemonset_not_found("meshbypass-node")),
            removed: true,
            says: "DaemonSet mbtest-system/meshbypass-node is gone",
        },
        Case {
            answer: Some(Answer::status(500, "InternalError")),
            removed: false,
            says: "cannot tell whether DaemonSet mbtest-system/meshbypass-node was deleted",
        },
        Case {
            answer: None,
            removed: false,
            says: "not running in a Kubernetes pod",
        },
    ];
    for case in cases {
        let host = Host::new("verdict");
        let primary = write_primary(&host.conf);
        let api = FakeApi::start(case.answer.clone().unwrap_or_else(|| Answer::daemonset(false)));
        let cluster = Cluster::new(&host, &api);
        let mut extra = vec!["--no-selftest".to_owned()];
        let env = if case.answer.is_some() {
            extra.extend(cluster.args());
            cluster.env()
        } else {
            Vec::new()
        };
        let agent = Agent::start(&host, &strs(&extra), &env);
        wait_for(STARTUP, "/readyz 200", || agent.get("/readyz").0 == 200);
        let log = agent.logs.clone();
        let t = Instant::now();
        let status = agent.stop(Signal::SIGTERM);
        assert!(status.success(), "{}: the agent exited with {status}", case.says);
        eprintln!("{}: stopped after {:?}", case.says, t.elapsed());
        assert!(
            log.lock()
                .expect("log lock")
                .iter()
                .any(|l| l.contains(case.says)),
            "the log does not say {:?}",
            case.says
        );
        assert_eq!(
            !has_our_entry(&primary),
            case.removed,
            "{}: entry removed?",
            case.says
        );
        assert_eq!(
            !host.target().exists(),
            case.removed,
            "{}: binary removed?",
            case.says
        );
        let asked = api.seen();
        if case.answer.is_some() {
            assert!(
                !asked.is_empty() && asked.iter().all(|(p, _)| p == DS_PATH),
                "{}: asked {asked:?}",
                case.says
            );
        } else {
            assert!(
                asked.is_empty(),
                "asked the API server outside a cluster: {asked:?}"
            );
        }
        assert!(host.root.loaded(), "the maps were unloaded without --cleanup");
    }
}

/// A node whose maps cannot be loaded (pins of another layout) still gets
/// the plugin: the redirect works, the bypass is skipped with a log line
/// saying why, /readyz and the metrics name the error, and the load is
/// retried until it works.
#[test]
fn a_failed_load_still_installs_and_pods_get_their_redirect() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let host = Host::new("badload");
    sh(&[
        EXE,
        "load",
        "--no-selftest",
        "--bpf-root",
        host.root.0.to_str().expect("utf-8"),
    ]);
    stamp_foreign_layout(&host.root.0);
    let primary = write_primary(&host.conf);
    let plugin = real_plugin();
    let agent = Agent::start(
        &host,
        &[
            "--no-selftest",
            "--plugin-binary",
            plugin.to_str().expect("utf-8"),
        ],
        &[],
    );
    wait_for(STARTUP, "our entry in the primary", || has_our_entry(&primary));
    assert_eq!(
        fs::read(host.target()).expect("the installed plugin"),
        fs::read(&plugin).expect("the plugin"),
        "the installed plugin is not the one given"
    );
    wait_for(REPAIR_BOUND, "/readyz to name the load error", || {
        agent.get("/readyz").1.contains("layout version 99")
    });
    let (status, body) = agent.get("/readyz");
    assert_eq!(status, 503, "ready without maps: {body}");
    assert!(
        body.contains("the plugin is installed anyway (pods get their redirect, not the bypass)"),
        "{body}"
    );
    let m = agent.metrics();
    assert_eq!(metric(&m, "meshbypass_installed"), 1.0);
    assert_eq!(metric(&m, "meshbypass_loaded"), 0.0);
    assert_eq!(metric(&m, "meshbypass_ready"), 0.0);
    assert_eq!(
        metric(&m, "meshbypass_load_error{reason=\"layout-mismatch\"}"),
        1.0
    );
    assert_eq!(
        count_lines(&agent, "the node's maps cannot be loaded"),
        1,
        "the load error is logged once, not at every retry"
    );

    // A pod: the installed plugin applies its redirect and skips the bypass.
    let ns = Netns::new("badload");
    let uid = "7d3c41a2-5b6e-4f70-8a91-0c2d3e4f5a6b";
    let cg = PodCgroup::new("badload", uid);
    let plugin_log = host.tmp().join("plugin.log");
    let list = read_json(&primary);
    let mut config = our_entry(&primary);
    config["cniVersion"] = list["cniVersion"].clone();
    config["name"] = list["name"].clone();
    config["cgroupRoot"] = json!(cg.root);
    config["logFile"] = json!(plugin_log);
    let prev = json!({"cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": ns.path()}],
        "ips": [{"address": "10.250.7.2/24", "interface": 0}]});
    let id = format!("{:064x}", u128::from(std::process::id()) << 64 | 0xbad10ad);
    let env = [
        ("CNI_CONTAINERID", id.clone()),
        ("CNI_NETNS", ns.path().to_string_lossy().into_owned()),
        ("CNI_IFNAME", "eth0".to_owned()),
        ("CNI_PATH", host.bin.to_string_lossy().into_owned()),
        (
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID={uid}"
            ),
        ),
    ];
    let mut add = config.clone();
    add["prevResult"] = prev.clone();
    let (ok, out) = run_plugin(&host.target(), "ADD", &env, &add);
    assert!(ok, "ADD failed with unusable maps: {out}");
    let result: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("ADD printed {out:?}: {e}"));
    assert_eq!(result, prev, "ADD did not pass the previous result on");
    let rules = ns.nat_rules();
    for want in ["--to-ports 15001", "--to-ports 15006"] {
        assert!(
            rules.contains(want),
            "no {want:?} in the pod's nat table:\n{rules}"
        );
    }
    let logged = fs::read_to_string(&plugin_log).expect("the plugin's log");
    assert!(
        logged.contains("acceleration skipped: the node's maps cannot be loaded")
            && logged.contains("layout version 99"),
        "the plugin's log does not say why the bypass was skipped:\n{logged}"
    );
    // DEL works too (the runtime would retry a failing DEL forever).
    let (ok, out) = run_plugin(&host.target(), "DEL", &env, &config);
    assert!(ok, "DEL failed with unusable maps: {out}");
    assert!(
        !ns.nat_rules().contains("--to-ports 15001"),
        "DEL left the redirect"
    );

    // Someone removes the foreign pins: the agent's retry loads ours.
    sh(&[EXE, "unload", "--bpf-root", host.root.0.to_str().expect("utf-8")]);
    wait_for(
        Duration::from_secs(15),
        "the agent to load the maps on its own",
        || agent.get("/readyz").0 == 200,
    );
    let m = agent.metrics();
    assert_eq!(metric(&m, "meshbypass_loaded"), 1.0);
    assert!(
        !m.keys().any(|k| k.starts_with("meshbypass_load_error")),
        "a load error after the load: {m:?}"
    );
    assert!(agent.log_contains("loaded at"), "no log line for the recovery");
}

/// A typo in the settings (what a ConfigMap edit delivers) never reaches the
/// conflist: the last good entry stays, /readyz, a metric and the log name
/// the error; a good edit is then applied; and an agent that starts with a
/// bad file keeps the entry an earlier run chained.
#[test]
fn a_bad_settings_edit_keeps_the_last_good_entry() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let host = Host::new("settings");
    let primary = write_primary(&host.conf);
    let dir = host.tmp().join("settings");
    fs::create_dir_all(&dir).expect("making the settings dir");
    let settings = dir.join("plugin.json");
    fs::write(
        &settings,
        r#"{"mesh": "istio", "acceleration": "auto", "logLevel": "info"}"#,
    )
    .expect("writing settings");
    let args = [
        "--no-selftest",
        "--plugin-config",
        settings.to_str().expect("utf-8"),
    ];
    let agent = Agent::start(&host, &args, &[]);
    wait_for(STARTUP, "/readyz 200", || agent.get("/readyz").0 == 200);
    let good = fs::read(&primary).expect("reading the conflist");
    assert_eq!(our_entry(&primary)["acceleration"], "auto");

    // The typo: written in place, as an editor would.
    rewrite_in_place(
        &settings,
        br#"{"mesh": "istio", "acceleraton": "all", "logLevel": "info"}"#,
    );
    wait_for(REPAIR_BOUND, "/readyz to name the typo", || {
        agent.get("/readyz").1.contains("`acceleraton`")
    });
    let (status, body) = agent.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("unknown key `acceleraton`") && body.contains("the conflist keeps the last good entry"),
        "{body}"
    );
    assert_eq!(
        fs::read(&primary).expect("reading the conflist"),
        good,
        "the bad settings reached the conflist"
    );
    let m = agent.metrics();
    assert_eq!(metric(&m, "meshbypass_settings_valid"), 0.0);
    assert_eq!(
        metric(&m, "meshbypass_settings_error{reason=\"unknown-key\"}"),
        1.0
    );
    assert_eq!(metric(&m, "meshbypass_settings_rejected_total"), 1.0);
    assert_eq!(
        metric(&m, "meshbypass_installed"),
        1.0,
        "the last good entry is installed"
    );
    assert_eq!(
        count_lines(&agent, "unknown key `acceleraton`"),
        1,
        "one log line for the bad edit"
    );

    // The fix: applied within the bound.
    rewrite_in_place(&settings, br#"{"mesh": "istio", "acceleration": "proxy-only"}"#);
    wait_for(REPAIR_BOUND, "the good edit in the conflist", || {
        our_entry(&primary)["acceleration"] == "proxy-only"
    });
    wait_for(REPAIR_BOUND, "/readyz 200", || agent.get("/readyz").0 == 200);
    let m = agent.metrics();
    assert_eq!(metric(&m, "meshbypass_settings_valid"), 1.0);
    assert!(
        !m.keys().any(|k| k.starts_with("meshbypass_settings_error")),
        "a settings error after the fix: {m:?}"
    );

    // A restart with a bad file: the entry of the earlier run stays.
    let status = agent.stop(Signal::SIGTERM);
    assert!(status.success(), "the agent exited with {status}");
    let chained = fs::read(&primary).expect("reading the conflist");
    fs::write(&settings, r#"{"mesh": "istio", "redirect": {"outboundPort": 0}}"#).expect("writing settings");
    let agent = Agent::start(&host, &args, &[]);
    wait_for(STARTUP, "/readyz to name the bad value", || {
        agent.get("/readyz").1.contains("redirect.outboundPort")
    });
    assert!(
        agent.log_contains("keeping the entry an earlier run chained"),
        "the restarted agent did not adopt the chained entry"
    );
    assert_eq!(
        fs::read(&primary).expect("reading the conflist"),
        chained,
        "the restart with bad settings changed the conflist"
    );
    let m = agent.metrics();
    assert_eq!(metric(&m, "meshbypass_installed"), 1.0);
    assert_eq!(
        metric(&m, "meshbypass_settings_error{reason=\"invalid-value\"}"),
        1.0
    );
}

/// Idle connections and a client that trickles its request do not delay the
/// probes: kubelet's liveness probe is what restarts the agent.
#[test]
fn probes_answer_past_idle_and_trickling_clients() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let host = Host::new("probes");
    write_primary(&host.conf);
    let agent = Agent::start(&host, &["--no-selftest"], &[]);
    wait_for(STARTUP, "/readyz 200", || agent.get("/readyz").0 == 200);

    let idle: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(agent.addr).expect("an idle connection"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let loris = {
        let (addr, stop) = (agent.addr, stop.clone());
        thread::spawn(move || {
            let mut s = TcpStream::connect(addr).expect("the slow client's connection");
            let started = Instant::now();
            for b in b"GET /healthz HTTP/1.1\r\nX-Slow: "
                .iter()
                .chain([b'a'; 200].iter())
            {
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
                if s.write_all(&[*b]).is_err() {
                    return Some(started.elapsed());
                }
                thread::sleep(Duration::from_millis(200));
            }
            None
        })
    };
    // Ours queue behind the 50 idle ones: the server accepts those first.
    let mut worst = Duration::ZERO;
    for path in ["/healthz"; 20].into_iter().chain(["/readyz", "/metrics"]) {
        let (status, took) = timed_get(agent.addr, path);
        assert_eq!(status, 200, "{path}");
        worst = worst.max(took);
    }
    eprintln!("slowest probe with 50 idle and 1 trickling client: {worst:?}");
    assert!(
        worst < Duration::from_millis(100),
        "a probe took {worst:?} with idle clients connected"
    );
    // The trickling client is cut off at the request deadline (2 s), well
    // before its request could finish (46 s at a byte per 200 ms).
    let cut = loris.join().expect("the slow client panicked");
    stop.store(true, Ordering::Relaxed);
    let cut = cut.expect("the trickling client was never cut off");
    assert!(
        cut < Duration::from_secs(4),
        "the trickling client was served for {cut:?}"
    );
    drop(idle);
}

#[test]
fn install_and_uninstall_one_shot() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let host = Host::new("oneshot");
    let run = |args: &[&str]| {
        let out = Command::new(EXE)
            .args(args)
            .args(host.common_args())
            .output()
            .expect("running meshbypass-node");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let plugin = host.plugin.to_string_lossy().into_owned();

    // No primary: refused, nothing copied.
    let (ok, out) = run(&["install", "--no-selftest", "--plugin-binary", &plugin]);
    assert!(!ok, "install without a primary succeeded: {out}");
    assert!(out.contains("no CNI network config"), "unhelpful message: {out}");
    assert!(
        !host.target().exists(),
        "copied the binary without a conflist to chain into"
    );

    let kindnet = testdata("conflist/10-kindnet.conflist");
    let primary = host.conf.join("10-kindnet.conflist");
    fs::copy(&kindnet, &primary).expect("installing the primary");
    let settings = host.state.join("settings.json");
    // Settings the plugin's parser refuses are refused here, naming the key.
    fs::write(
        &settings,
        r#"{"mesh": "linkerd", "acceleration": "proxy-only", "exclude": []}"#,
    )
    .expect("writing settings");
    let (ok, out) = run(&[
        "install",
        "--no-selftest",
        "--plugin-binary",
        &plugin,
        "--plugin-config",
        &settings.to_string_lossy(),
    ]);
    assert!(!ok, "install accepted an unknown key: {out}");
    assert!(out.contains("unknown key `exclude`"), "unhelpful message: {out}");
    assert_eq!(
        read_json(&primary),
        read_json(&kindnet),
        "bad settings were chained"
    );
    fs::write(&settings, r#"{"mesh": "linkerd", "acceleration": "proxy-only"}"#).expect("writing settings");
    let settings = settings.to_string_lossy().into_owned();
    for _ in 0..2 {
        let (ok, out) = run(&[
            "install",
            "--no-selftest",
            "--plugin-binary",
            &plugin,
            "--plugin-config",
            &settings,
        ]);
        assert!(ok, "install failed: {out}");
    }
    assert!(host.root.loaded(), "install did not load the maps");
    let doc = read_json(&primary);
    let plugins = doc["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.len(), 3, "installed twice? {doc}");
    assert_eq!(
        plugins[2],
        json!({"type": "meshbypass", "mesh": "linkerd", "acceleration": "proxy-only", "bpfRoot": host.root.0})
    );
    assert!(host.target().exists(), "no binary");

    let (ok, out) = run(&["uninstall", "--cleanup"]);
    assert!(ok, "uninstall failed: {out}");
    assert_eq!(
        read_json(&primary),
        read_json(&kindnet),
        "uninstall did not restore the conflist"
    );
    assert!(!host.target().exists(), "uninstall left the binary");
    assert!(!host.root.0.exists(), "--cleanup left the bpf root");
    let (ok, out) = run(&["uninstall"]);
    assert!(
        ok && out.contains("nothing to remove"),
        "a second uninstall: {out}"
    );
}

/// A pod's ADD and DEL through the plugin the agent installed: each
/// decision is re-emitted on the agent's stdout (as JSON with
/// `--log-format=json`), counted in `/metrics` with its latency, and the
/// registered pod shows in the map usage and in `status --json` with its
/// namespace and name from the plugin's record.
#[test]
fn decisions_reach_stdout_metrics_and_status() {
    if !meshbypass_tests::privileged() {
        return;
    }
    let host = Host::new("decide");
    let primary = write_primary(&host.conf);
    let plugin = real_plugin();
    let agent = Agent::start(
        &host,
        &[
            "--no-selftest",
            "--log-format=json",
            "--plugin-binary",
            plugin.to_str().expect("utf-8"),
        ],
        &[],
    );
    wait_for(STARTUP, "the agent to be ready", || agent.get("/readyz").0 == 200);
    let m = agent.metrics();
    assert_eq!(metric(&m, "meshbypass_pods"), 0.0);
    assert_eq!(
        metric(
            &m,
            "meshbypass_cni_requests_total{command=\"ADD\",decision=\"meshed\"}"
        ),
        0.0
    );

    let ns = Netns::new("decide");
    let uid = "5e1f0a3b-7c2d-4e8f-9a01-b2c3d4e5f607";
    let cg = PodCgroup::new("decide", uid);
    let list = read_json(&primary);
    let mut config = our_entry(&primary);
    config["cniVersion"] = list["cniVersion"].clone();
    config["name"] = list["name"].clone();
    config["cgroupRoot"] = json!(cg.root);
    config["logFile"] = json!(host.tmp().join("plugin.log"));
    let prev = json!({"cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": ns.path()}],
        "ips": [{"address": "10.250.9.2/24", "interface": 0}]});
    let id = format!("{:064x}", u128::from(std::process::id()) << 64 | 0xdec1de);
    let env = [
        ("CNI_CONTAINERID", id.clone()),
        ("CNI_NETNS", ns.path().to_string_lossy().into_owned()),
        ("CNI_IFNAME", "eth0".to_owned()),
        ("CNI_PATH", host.bin.to_string_lossy().into_owned()),
        (
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID={uid}"
            ),
        ),
    ];
    let mut add = config.clone();
    add["prevResult"] = prev;
    let (ok, out) = run_plugin(&host.target(), "ADD", &env, &add);
    assert!(ok, "ADD: {out}");

    // stdout: one JSON line for the ADD, with the pod and the decision.
    let decision = |command: &str| -> Option<Value> {
        agent
            .stdout_lines()
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}"))
            })
            .find(|v| v["cni"]["command"] == command)
    };
    wait_for(REPAIR_BOUND * 3, "the ADD on the agent's stdout", || {
        decision("ADD").is_some()
    });
    let v = decision("ADD").expect("the ADD line");
    assert_eq!(v["level"], "info", "{v}");
    assert_eq!(
        (
            &v["cni"]["namespace"],
            &v["cni"]["pod"],
            &v["cni"]["decision"],
            &v["cni"]["acceleration"]
        ),
        (&json!("shop"), &json!("cart-0"), &json!("meshed"), &json!("auto")),
        "{v}"
    );
    assert_eq!(v["cni"]["containerId"], id.as_str());
    let msg = v["msg"].as_str().expect("msg");
    assert!(
        msg.starts_with(&format!("ADD shop/cart-0 [{}] meshed (auto), ", &id[..12])),
        "{msg}"
    );
    assert!(
        msg.contains("every pod outside kubernetes.excludeNamespaces is meshed"),
        "the line does not say why the pod was meshed: {msg}"
    );

    // /metrics: the request, its latency, the pod in the maps.
    let m = agent.metrics();
    assert_eq!(
        metric(
            &m,
            "meshbypass_cni_requests_total{command=\"ADD\",decision=\"meshed\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "meshbypass_cni_requests_total{command=\"ADD\",decision=\"failed\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "meshbypass_cni_request_duration_seconds_count{command=\"ADD\"}"
        ),
        1.0
    );
    let took = v["cni"]["durationMs"].as_f64().expect("durationMs") / 1e3;
    let sum = metric(&m, "meshbypass_cni_request_duration_seconds_sum{command=\"ADD\"}");
    assert!((sum - took).abs() < 1e-9, "sum {sum} vs the logged {took}");
    assert_eq!(
        metric(
            &m,
            "meshbypass_cni_request_duration_seconds_bucket{command=\"ADD\",le=\"+Inf\"}"
        ),
        1.0
    );
    assert_eq!(metric(&m, "meshbypass_pods"), 1.0);
    assert_eq!(metric(&m, "meshbypass_links"), 1.0);
    assert_eq!(metric(&m, "meshbypass_map_entries{map=\"mb_netns\"}"), 1.0);
    assert_eq!(metric(&m, "meshbypass_map_entries{map=\"mb_pods\"}"), 1.0);
    assert_eq!(metric(&m, "meshbypass_map_capacity{map=\"mb_pods\"}"), 8192.0);
    assert_eq!(metric(&m, "meshbypass_map_capacity{map=\"mb_senders\"}"), 65536.0);

    // status --json: the pod with its name from the record.
    let status = || -> Value {
        let out = Command::new(EXE)
            .args(["status", "--json", "--bpf-root"])
            .arg(&host.root.0)
            .arg(format!("--state-dir={}", host.state.display()))
            .output()
            .expect("running status");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json")
    };
    let s = status();
    assert_eq!((&s["loaded"], &s["pods"]), (&json!(true), &json!(1)), "{s}");
    let pod = &s["podList"][0];
    assert_eq!(
        (&pod["namespace"], &pod["name"], &pod["containerId"], &pod["ips"]),
        (
            &json!("shop"),
            &json!("cart-0"),
            &json!(id),
            &json!(["10.250.9.2"])
        ),
        "{s}"
    );
    let netns = s["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "mb_netns"))
        .unwrap_or_else(|| panic!("no mb_netns in {s}"));
    assert_eq!((&netns["entries"], &netns["capacity"]), (&json!(1), &json!(4096)));

    // DEL: removed, counted, the pod gone from the maps.
    let (ok, out) = run_plugin(&host.target(), "DEL", &env, &config);
    assert!(ok, "DEL: {out}");
    wait_for(REPAIR_BOUND * 3, "the DEL on the agent's stdout", || {
        decision("DEL").is_some()
    });
    assert_eq!(decision("DEL").expect("DEL")["cni"]["decision"], "removed");
    let m = agent.metrics();
    assert_eq!(
        metric(
            &m,
            "meshbypass_cni_requests_total{command=\"DEL\",decision=\"removed\"}"
        ),
        1.0
    );
    assert_eq!(metric(&m, "meshbypass_pods"), 0.0);
    assert_eq!(metric(&m, "meshbypass_map_entries{map=\"mb_pods\"}"), 0.0);
    assert_eq!(status()["podList"], json!([]));
    // Exactly one line per request.
    assert_eq!(agent.stdout_lines().len(), 2, "{:?}", agent.stdout_lines());
}
