//! The privileged test kit: uniquely named network namespaces, cgroups, bpf
//! roots and helper processes, each removed by name when its guard drops
//! (also when a test panics). Root is required; tests say so and fail when
//! it is missing rather than pass without testing (`root.rs`: the privileged
//! tests of the other crates skip visibly instead). The workspace binaries a
//! test runs are built when missing or stale (`bins.rs`).

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

mod bins;
pub mod cni;
#[cfg(feature = "cri")]
pub mod cri;
pub mod fixtures;
pub mod node;
mod root;
pub mod script;

pub use bins::sibling_bin;
pub use root::{privileged, require_root};

use meshbypass_ebpf::{Counter, Mode, NodeMaps, PodEntry, counters::Counters};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `mbt<pid><seq><tag>`, short
/// enough for interface names (15 bytes) when `tag` is short.
pub fn unique(tag: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    format!("mbt{}{}{tag}", std::process::id() % 100_000, n)
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(args: &[&str]) -> String {
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

/// Like [`sh`] but for cleanup: failures are reported, not fatal.
fn sh_quiet(args: &[&str]) {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!("cleanup {args:?}: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => eprintln!("cleanup {args:?}: {e}"),
    }
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// A command inside the namespace (`ip netns exec`; /sys is remounted
    /// there, so never for anything that needs the cgroup2 mount).
    pub fn exec(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// The netns cookie.
    pub fn cookie(&self) -> u64 {
        meshbypass_ebpf::netns::cookie_of(&self.path()).expect("netns cookie")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        sh_quiet(&["ip", "netns", "del", &self.name]);
    }
}

/// Istio's inbound redirect in pod `ns`: TCP to `ports` (comma-separated)
/// goes to its proxy's 15006.
pub fn inbound_redirect(ns: &Netns, ports: &str) {
    ns.exec(&[
        "iptables",
        "-w",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "-m",
        "multiport",
        "--dports",
        ports,
        "-j",
        "REDIRECT",
        "--to-ports",
        "15006",
    ]);
}

/// Istio's outbound redirect in pod `ns`: its apps' TCP to `dest`:`ports`
/// goes to its proxy's 15001 (UID 1337 exempt).
pub fn outbound_redirect(ns: &Netns, dest: &str, ports: &str) {
    ns.exec(&[
        "iptables",
        "-w",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        dest,
        "-m",
        "multiport",
        "--dports",
        ports,
        "-m",
        "owner",
        "!",
        "--uid-owner",
        "1337",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ]);
}

/// Two namespaces joined by a veth pair: `a` is 10.211.0.1 / fd00:6d62::1,
/// `b` is 10.211.0.2 / fd00:6d62::2 (addresses exist only inside them).
pub struct PodPair {
    pub a: Netns,
    pub b: Netns,
}

pub const A_V4: &str = "10.211.0.1";
pub const B_V4: &str = "10.211.0.2";
pub const A_V6: &str = "fd00:6d62::1";
pub const B_V6: &str = "fd00:6d62::2";

impl PodPair {
    pub fn new() -> Self {
        let a = Netns::new("a");
        let b = Netns::new("b");
        let (va, vb) = (unique("va"), unique("vb"));
        sh(&[
            "ip", "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name,
        ]);
        for (ns, dev, v4, v6) in [(&a, &va, A_V4, A_V6), (&b, &vb, B_V4, B_V6)] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.ip(&["-6", "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        Self { a, b }
    }
}

impl Default for PodPair {
    fn default() -> Self {
        Self::new()
    }
}

/// A cgroup v2 directory, removed on drop (after its processes are gone).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Self {
        let root = meshbypass_ebpf::cgroup2::mount_point().expect("no cgroup2 mount on this host");
        let path = root.join(unique(tag));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup_dir(&self.path);
    }
}

/// Removes a cgroup directory, waiting up to 5 s for killed processes to
/// leave it; what cannot be removed is reported, not fatal (cleanup).
pub fn remove_cgroup_dir(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!("cleanup {}: {e}", dir.display());
                return;
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Loads the programs under the private root `path`; when that fails,
/// removes what the attempt left there, then panics with why.
pub fn load_or_clean(
    path: &Path,
    options: &meshbypass_ebpf::LoadOptions,
) -> (meshbypass_ebpf::NodeMaps, meshbypass_ebpf::LoadOutcome) {
    meshbypass_ebpf::load_with(path, options).unwrap_or_else(|e| {
        if let Err(cleanup) = meshbypass_ebpf::unload(path) {
            eprintln!("cleanup {}: {cleanup}", path.display());
        }
        panic!("load the programs at {}: {e:?}", path.display())
    })
}

/// A private bpf root with the programs loaded; unloaded on drop.
pub struct BpfRoot {
    pub path: PathBuf,
    pub node: Mutex<NodeMaps>,
}

impl BpfRoot {
    pub fn load() -> Self {
        Self::load_with(&meshbypass_ebpf::LoadOptions::default())
    }

    /// [`BpfRoot::load`] with programs loaded with `options`.
    pub fn load_with(options: &meshbypass_ebpf::LoadOptions) -> Self {
        let path = PathBuf::from("/sys/fs/bpf").join(unique("root"));
        let (node, _) = load_or_clean(&path, options);
        Self {
            path,
            node: Mutex::new(node),
        }
    }

    pub fn counters(&self) -> Counters {
        self.node.lock().unwrap().counters().expect("read counters")
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.counters().get(c)
    }

    /// Attaches the bypass to `cgroup` and registers the pod in `ns`.
    pub fn add_pod(&self, ns: &Netns, cgroup: &Cgroup, ips: &[&str], mode: Mode) -> u64 {
        let node = self.node.lock().unwrap();
        node.attach_cgroup(&cgroup.path, &ns.name)
            .expect("attach to the pod cgroup");
        drop(node);
        self.register(ns, ips, mode)
    }

    /// Registers the pod in `ns` with Istio's proxy ports and UID.
    pub fn register(&self, ns: &Netns, ips: &[&str], mode: Mode) -> u64 {
        let cookie = ns.cookie();
        self.node
            .lock()
            .unwrap()
            .register_pod(&PodEntry {
                netns_cookie: cookie,
                ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
                outbound_port: 15001,
                inbound_port: 15006,
                proxy_uid: Some(1337),
                proxy_gid: Some(1337),
                mode,
            })
            .expect("register pod");
        cookie
    }
}

/// An echo server in pod `b` (on a port the kernel picks) and an
/// interactive client in pod `a` aimed at it, both root in their pods'
/// cgroups: the two peers of most datapath checks. Returns them and the
/// server's port.
pub fn echo_pair(pods: &PodPair, cg_a: &Cgroup, cg_b: &Cgroup) -> (Peer, Peer, u16) {
    let server = Peer::spawn(
        &Place {
            ns: &pods.b,
            cgroup: &cg_b.path,
            uid: None,
        },
        "echo",
        &["--listen", "0.0.0.0:0"],
    );
    let port = server.ready();
    let client = Peer::spawn(
        &Place {
            ns: &pods.a,
            cgroup: &cg_a.path,
            uid: None,
        },
        "interactive",
        &["--connect", &format!("{B_V4}:{port}")],
    );
    (server, client, port)
}

impl Drop for BpfRoot {
    fn drop(&mut self) {
        if let Err(e) = meshbypass_ebpf::unload(&self.path) {
            eprintln!("cleanup {}: {e}", self.path.display());
        }
    }
}

/// A running `mb-peer`, killed by PID on drop.
pub struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    pub role: String,
}

/// Where a peer runs.
pub struct Place<'a> {
    pub ns: &'a Netns,
    pub cgroup: &'a Path,
    pub uid: Option<u32>,
}

impl Peer {
    pub fn spawn(place: &Place<'_>, role: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(sibling_bin("mb-peer"));
        cmd.arg(role)
            .arg("--cgroup")
            .arg(place.cgroup)
            .arg("--netns")
            .arg(place.ns.path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // Programs run through `exec` (servers, sidecars) log per request.
            .stderr(if role == "exec" {
                Stdio::null()
            } else {
                Stdio::inherit()
            });
        if let Some(uid) = place.uid {
            cmd.arg("--uid").arg(uid.to_string());
        }
        let mut child = cmd.spawn().expect("spawn mb-peer");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            lines,
            role: role.into(),
        }
    }

    /// The next output line, within `timeout`.
    pub fn line(&self, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|_| panic!("mb-peer {} said nothing within {timeout:?}", self.role))
    }

    /// Waits for "ready PORT" and returns the port.
    pub fn ready(&self) -> u16 {
        let l = self.line(Duration::from_secs(10));
        l.strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("mb-peer {}: unexpected {l:?}", self.role))
    }

    /// Sends one command line (interactive role) and returns the reply.
    pub fn ask(&mut self, cmd: &str) -> String {
        self.send_line(cmd);
        self.line(Duration::from_secs(30))
    }

    /// Sends one command line without waiting for the reply ([`Peer::line`]
    /// reads it): several peers can then act at once.
    pub fn send_line(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{cmd}").expect("write to mb-peer");
        stdin.flush().expect("flush");
    }

    /// Ends the process now (by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Err(e) = self.child.kill() {
                eprintln!("cleanup: kill {} {}: {e}", self.role, self.child.id());
            }
            if let Err(e) = self.child.wait() {
                eprintln!("cleanup: wait {} {}: {e}", self.role, self.child.id());
            }
        }
    }

    /// Asks the process to stop (SIGTERM: nginx's master then stops its
    /// workers), then kills it if it is still there after 5 s.
    pub fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
                eprintln!("cleanup: SIGTERM {} {pid}: {e}", self.role);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// All output lines so far.
    pub fn drain(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Waits for the process to exit; returns (success, last line).
    pub fn finish(self, timeout: Duration) -> (bool, String) {
        let (ok, lines) = self.finish_lines(timeout);
        (ok, lines.last().cloned().unwrap_or_default())
    }

    /// Waits for the process to exit; returns (success, every output line).
    pub fn finish_lines(mut self, timeout: Duration) -> (bool, Vec<String>) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait().expect("wait") {
                Some(status) => {
                    let mut lines = Vec::new();
                    while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                        lines.push(l);
                    }
                    return (status.success(), lines);
                }
                None if Instant::now() > deadline => {
                    panic!("{} still running after {timeout:?}", self.role)
                }
                None => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a client to completion and asserts every echo was intact.
pub fn run_client(place: &Place<'_>, connect: &str, sizes: &[usize]) -> serde_json::Value {
    run_client_with(place, connect, sizes, &[])
}

/// [`run_client`] with extra mb-peer flags.
pub fn run_client_with(
    place: &Place<'_>,
    connect: &str,
    sizes: &[usize],
    extra: &[&str],
) -> serde_json::Value {
    let sizes = sizes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec!["--connect", connect, "--sizes", &sizes];
    args.extend_from_slice(extra);
    let peer = Peer::spawn(place, "client", &args);
    let (ok, last) = peer.finish(Duration::from_secs(120));
    let v: serde_json::Value =
        serde_json::from_str(&last).unwrap_or_else(|_| panic!("client printed {last:?}"));
    assert!(ok && v["ok"] == true, "client failed: {v}");
    v
}

/// A pod cgroup in kubelet's layout under the cgroup2 mount, created with
/// whichever parents were missing; removed (with those parents, when empty)
/// on drop.
pub struct KubeCgroup {
    pub path: PathBuf,
    /// Every directory on the path that this process created, pod dir last.
    held: Vec<PathBuf>,
}

/// Directories this process created for kubelet's layout, with how many live
/// guards sit under each: parents (`kubepods`, `kubepods/besteffort`) are
/// shared by tests running at once, and the last guard out removes them.
static CREATED: Mutex<Vec<(PathBuf, usize)>> = Mutex::new(Vec::new());

impl KubeCgroup {
    /// `rel` is relative to the cgroup2 mount, e.g.
    /// `kubepods/besteffort/pod<uid>`.
    pub fn new(rel: &str) -> Self {
        let root = meshbypass_ebpf::cgroup2::mount_point().expect("no cgroup2 mount on this host");
        let path = root.join(rel);
        let mut held = Vec::new();
        let mut created = CREATED.lock().unwrap_or_else(|e| e.into_inner());
        let mut cur = root.clone();
        for part in Path::new(rel).components() {
            cur = cur.join(part);
            if let Some(entry) = created.iter_mut().find(|(p, _)| *p == cur) {
                entry.1 += 1;
                held.push(cur.clone());
            } else if !cur.exists() {
                std::fs::create_dir(&cur).unwrap_or_else(|e| panic!("mkdir {}: {e}", cur.display()));
                created.push((cur.clone(), 1));
                held.push(cur.clone());
            }
        }
        Self { path, held }
    }

    pub fn place<'a>(&'a self, ns: &'a Netns, uid: Option<u32>) -> Place<'a> {
        Place {
            ns,
            cgroup: &self.path,
            uid,
        }
    }
}

impl Drop for KubeCgroup {
    fn drop(&mut self) {
        let mut created = CREATED.lock().unwrap_or_else(|e| e.into_inner());
        for dir in self.held.iter().rev() {
            let Some(i) = created.iter().position(|(p, _)| p == dir) else {
                continue;
            };
            created[i].1 -= 1;
            if created[i].1 > 0 {
                continue;
            }
            created.remove(i);
            remove_cgroup_dir(dir);
        }
    }
}
