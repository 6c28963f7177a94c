//! `meshbypass-node run`, `install` and `uninstall` end to end, as root, in
//! temp directories (conf dir, bin dir, state dir) with a private bpf root
//! under /sys/fs/bpf (unique name, unloaded by a guard even on panic).
//! The "plugin binary" copied is any file.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
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

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests load BPF programs: run them as root (scripts/test.sh does)"
    );
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
    _tmp: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
    state: PathBuf,
    plugin: PathBuf,
    root: BpfRoot,
}

impl Host {
    fn new(tag: &str) -> Self {
        require_root();
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
            _tmp: tmp,
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
}

/// A running agent: killed on drop if the test did not stop it.
struct Agent {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
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
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting meshbypass-node run");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("the child's stderr");
        {
            let logs = logs.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("agent: {line}");
                    logs.lock().expect("log lock").push(line);
                }
            });
        }
        let mut addr = None;
        wait_for(STARTUP, "the agent's listen address in its log", || {
            addr = logs
                .lock()
                .expect("log lock")
                .iter()
                .find_map(|l| l.split("/metrics on ").nth(1).and_then(|a| a.trim().parse().ok()));
            addr.is_some()
        });
        Self {
            child,
            logs,
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
/// `name{labels} value`; HELP/TYPE comments precede each family.
fn parse_metrics(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let name = it.next().unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            let kind = it.next().unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            assert!(matches!(kind, "counter" | "gauge"), "unexpected type in {line:?}");
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample {line:?}"));
        let family = series.split('{').next().unwrap_or_default();
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

#[test]
fn run_installs_repairs_serves_and_uninstalls() {
    let host = Host::new("run");
    let calico = testdata("conflist/10-calico.conflist");
    let original = read_json(&calico);
    let primary = host.conf.join("10-calico.conflist");

    // Service account stand-ins: the agent writes the plugin kubeconfig.
    let sa = host.state.parent().expect("the temp dir").join("sa");
    fs::create_dir_all(&sa).expect("making the sa dir");
    fs::write(sa.join("token"), "token-1\n").expect("writing the token");
    fs::write(sa.join("ca.crt"), "CA").expect("writing the CA");
    let kubeconfig = host.conf.join("meshbypass-kubeconfig");

    let agent = Agent::start(
        &host,
        &[
            "--gc-interval",
            "1",
            "--token-file",
            &sa.join("token").to_string_lossy(),
            "--ca-file",
            &sa.join("ca.crt").to_string_lossy(),
            "--kubeconfig-out",
            &kubeconfig.to_string_lossy(),
        ],
        &[
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ],
    );

    // No primary CNI yet: not ready, whatever the loader is doing.
    assert_eq!(agent.get("/readyz").0, 503, "ready without a conflist");
    assert_eq!(agent.get("/healthz").0, 200);
    wait_for(STARTUP, "the maps to load", || host.root.loaded());
    wait_for(STARTUP, "the wait for a primary", || {
        agent.log_contains("waiting for the primary CNI")
    });
    assert_eq!(agent.get("/readyz").0, 503, "ready without a conflist");

    // The primary CNI arrives: chained within the bound, then ready.
    fs::copy(&calico, &primary).expect("installing the primary conflist");
    let t = Instant::now();
    wait_for(REPAIR_BOUND, "our entry in the new primary", || {
        has_our_entry(&primary)
    });
    eprintln!("chained {:?} after the conflist appeared", t.elapsed());
    wait_for(REPAIR_BOUND, "/readyz 200", || agent.get("/readyz").0 == 200);
    assert_eq!(
        fs::read(host.target()).expect("the copied plugin"),
        fs::read(&host.plugin).expect("plugin")
    );
    let mode = fs::metadata(host.target()).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "the plugin is not executable");
    let chained = read_json(&primary);
    let ours = chained["plugins"]
        .as_array()
        .and_then(|p| p.last())
        .cloned()
        .expect("our entry");
    assert_eq!(
        ours,
        json!({"type": "meshbypass", "bpfRoot": host.root.0, "stateDir": host.state}),
        "our entry should carry the agent's bpf root and state dir"
    );

    // The plugin kubeconfig, 0600, follows token rotation.
    let kc = read_json(&kubeconfig);
    assert_eq!(kc["users"][0]["user"]["token"], "token-1");
    assert_eq!(kc["clusters"][0]["cluster"]["server"], "https://10.96.0.1:443");
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
    assert_eq!(metric(&m, "meshbypass_loaded"), 1.0);
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
    assert!(
        m.contains_key("meshbypass_datapath_redirected_msgs_total"),
        "no datapath counters"
    );
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
    let m = agent.metrics();
    assert!(
        metric(&m, "meshbypass_repairs_total{artifact=\"conflist\"}") >= 4.0,
        "repairs not counted"
    );
    // The counter moves just after the rename that made the file visible.
    wait_for(REPAIR_BOUND, "the binary repair to be counted", || {
        metric(&agent.metrics(), "meshbypass_repairs_total{artifact=\"binary\"}") >= 1.0
    });

    // Settled: our own writes do not make the agent write again.
    let before = fs::metadata(&primary).expect("stat").modified().expect("mtime");
    let repairs = metric(
        &agent.metrics(),
        "meshbypass_repairs_total{artifact=\"conflist\"}",
    );
    wait_for(Duration::from_secs(3), "a GC tick", || {
        metric(&agent.metrics(), "meshbypass_gc_runs_total") >= 2.0
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
        repairs
    );

    // GC: a record whose netns is gone goes; one whose netns exists stays.
    let netns_dir = host.state.parent().expect("temp dir").join("netns");
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
    assert!(metric(&agent.metrics(), "meshbypass_gc_removed_total") >= 1.0);

    // SIGTERM: the conflist is the owner's again, the binary and kubeconfig
    // are gone, the maps stay for running pods.
    let status = agent.stop(Signal::SIGTERM);
    assert!(status.success(), "the agent exited with {status}");
    assert_eq!(
        read_json(&primary),
        original,
        "the conflist is not back to the original"
    );
    assert!(!host.target().exists(), "the binary was left behind");
    assert!(!kubeconfig.exists(), "the kubeconfig was left behind");
    assert!(host.root.loaded(), "the maps were unloaded without --cleanup");
}

#[test]
fn sigterm_removes_the_entry_before_the_binary_and_restores_a_single_conf() {
    let host = Host::new("term");
    let conf = testdata("conflist/10-flannel.conf");
    let original = read_json(&conf);
    fs::copy(&conf, host.conf.join("10-flannel.conf")).expect("installing the primary");
    let agent = Agent::start(&host, &["--no-selftest", "--cleanup"], &[]);
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

    let status = agent.stop(Signal::SIGTERM);
    assert!(status.success(), "the agent exited with {status}");
    let mut order = Vec::new();
    loop {
        match inotify.read_events() {
            Ok(events) if !events.is_empty() => order.extend(events),
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => panic!("reading inotify events: {e}"),
        }
    }
    let conf_done = order
        .iter()
        .rposition(|e| e.wd == conf_wd && e.mask.contains(AddWatchFlags::IN_DELETE))
        .unwrap_or_else(|| panic!("no removal in the conf dir: {order:?}"));
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
    assert!(!host.root.0.exists(), "--cleanup left the bpf root");
}

#[test]
fn install_and_uninstall_one_shot() {
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
