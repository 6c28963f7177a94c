//! A simulated Kubernetes node: a conflist from `conflist/` executed per the
//! CNI spec with Debian's reference plugins, pods as network namespaces with
//! kubelet-layout cgroups, and sidecar processes. Used by the end-to-end
//! tests, the benchmark and the demo.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use meshbypass_ebpf::Counter;
use serde_json::{Value, json};

use crate::{KubeCgroup, Netns, Peer, cni::*, require_root, sibling_bin, unique, wait_for};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The node: removes the bridge, IPAM and plugin state and the bpf root its
/// conflist names, whatever happens.
pub struct SimNode {
    pub rt: Runtime,
    pub bpf_root: PathBuf,
    pub state_dir: PathBuf,
    pub log_file: PathBuf,
    /// The Linux bridge the list's `bridge` plugin makes (none for `ptp`).
    bridge: Option<String>,
    run_dir: Option<PathBuf>,
}

impl SimNode {
    /// `conflist/<name>` with `edit` applied to the parsed list (the tests
    /// use it as-is; the benchmark gives it names of its own).
    pub fn new(name: &str, edit: impl FnOnce(&mut Value)) -> Self {
        require_root();
        let path = repo().join("conflist").join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut conflist: Value = serde_json::from_str(&text).expect("conflist JSON");
        edit(&mut conflist);
        let plugin_dir = sibling_bin("meshbypass").parent().unwrap().to_path_buf();
        let rt = Runtime::from_value(conflist, &[plugin_dir, PathBuf::from("/usr/lib/cni")]);
        let ours = rt.plugin("meshbypass");
        let bridge = rt
            .find_plugin("bridge")
            .map(|b| b["bridge"].as_str().unwrap_or("cni0").to_owned());
        let field = |v: &Value, k: &str| PathBuf::from(v[k].as_str().unwrap_or_default());
        let bpf_root = field(&ours, "bpfRoot");
        assert!(
            !bpf_root.exists(),
            "{} exists: another run is using this conflist (or left it: `meshbypass-node unload --bpf-root {}`)",
            bpf_root.display(),
            bpf_root.display()
        );
        let state_dir = field(&ours, "stateDir");
        Self {
            rt,
            log_file: field(&ours, "logFile"),
            run_dir: state_dir.parent().map(Path::to_path_buf),
            state_dir,
            bpf_root,
            bridge,
        }
    }

    /// `conflist/<file>` as a private network in `version`, named for this
    /// process and `slot` (0..10, one per node a test process runs at once)
    /// so that it runs beside any other: network `meshbypass-v<pid><slot>`,
    /// bridge `mbv<slot>p<pid>` (for a `bridge` list), subnet
    /// `10.233.<100 + pid % 15 * 10 + slot>.0/24`, IPAM data, plugin state
    /// and log under `/run/meshbypass-v<pid>-<slot>`, bpf root
    /// `/sys/fs/bpf/meshbypass-v<pid>-<slot>`. Our entry loses
    /// `kubernetes.kubeconfig` (there is no API server: every pod outside
    /// `excludeNamespaces` is meshed) and keeps everything else as shipped.
    pub fn private(file: &str, version: &str, slot: u32) -> Self {
        assert!(slot < 10, "slot {slot}: 0..10");
        let pid = std::process::id();
        let name = format!("meshbypass-v{pid}-{slot}");
        let run = PathBuf::from("/run").join(&name);
        let bridge = format!("mbv{slot}p{}", pid % 100_000);
        let subnet = format!("10.233.{}.0/24", 100 + pid % 15 * 10 + slot);
        for (what, path) in [
            ("bridge", Path::new("/sys/class/net").join(&bridge)),
            ("run dir", run.clone()),
            ("bpf root", Path::new("/sys/fs/bpf").join(&name)),
        ] {
            assert!(
                !path.exists(),
                "{} ({what} of a private {file}) exists: a run of this process's ID left it",
                path.display()
            );
        }
        Self::new(file, |c| {
            c["name"] = json!(name);
            c["cniVersion"] = json!(version);
            for p in c["plugins"].as_array_mut().expect("plugins") {
                if p.get("ipam").is_some() {
                    p["ipam"]["ranges"] = json!([[{ "subnet": subnet }]]);
                    p["ipam"]["dataDir"] = json!(run.join("ipam"));
                }
                match p["type"].as_str() {
                    Some("bridge") => p["bridge"] = json!(bridge),
                    Some("meshbypass") => {
                        p["bpfRoot"] = json!(Path::new("/sys/fs/bpf").join(&name));
                        p["stateDir"] = json!(run.join("state"));
                        p["logFile"] = json!(run.join("meshbypass.log"));
                        p["logLevel"] = json!("debug");
                        if let Some(k) = p.get_mut("kubernetes").and_then(Value::as_object_mut) {
                            k.remove("kubeconfig");
                        }
                    }
                    _ => {}
                }
            }
        })
    }

    /// The network's name (host-local keeps its leases under `<dataDir>/<name>`).
    pub fn name(&self) -> &str {
        self.rt.conflist["name"].as_str().expect("the network's name")
    }

    /// The addresses host-local has leased on this network.
    pub fn leases(&self) -> Vec<String> {
        let primary = &self.rt.conflist["plugins"][0];
        let dir = PathBuf::from(primary["ipam"]["dataDir"].as_str().expect("ipam.dataDir")).join(self.name());
        match std::fs::read_dir(&dir) {
            Ok(d) => d
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("{}: {e}", dir.display()),
        }
    }

    pub fn node(&self) -> meshbypass_ebpf::NodeMaps {
        meshbypass_ebpf::NodeMaps::open(&self.bpf_root).expect("the node's maps")
    }

    pub fn counters(&self) -> meshbypass_ebpf::counters::Counters {
        self.node().counters().expect("counters")
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        if let Err(e) = meshbypass_ebpf::unload(&self.bpf_root) {
            eprintln!("cleanup {}: {e}", self.bpf_root.display());
        }
        if let Some(bridge) = &self.bridge
            && Path::new("/sys/class/net").join(bridge).exists()
            && let Err(e) = std::process::Command::new("ip")
                .args(["link", "del", bridge])
                .status()
        {
            eprintln!("cleanup {bridge}: {e}");
        }
        if let Some(dir) = &self.run_dir
            && let Err(e) = std::fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cleanup {}: {e}", dir.display());
        }
    }
}

/// A pod: netns, kubelet cgroup, attachment, ADD result.
pub struct SimPod {
    pub att: Attachment,
    pub cgroup: KubeCgroup,
    pub ns: Netns,
    pub result: Option<Value>,
}

fn hex(n: u64) -> String {
    format!("{n:016x}")
}

impl SimPod {
    /// `systemd` picks the cgroup driver (and with it a QoS class).
    pub fn new(name: &str, systemd: bool) -> Self {
        let ns = Netns::new(name);
        let seed = (std::process::id() as u64 * 1_000_003) ^ ns.cookie().rotate_left(32);
        let uid = format!(
            "{}-{}-{}-{}-{}",
            &hex(seed)[..8],
            &hex(seed)[8..12],
            &hex(seed)[12..16],
            &hex(seed.rotate_left(17))[..4],
            &hex(seed.rotate_left(29))[..12]
        );
        let rel = if systemd {
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            )
        } else {
            format!("kubepods/besteffort/pod{uid}")
        };
        let cgroup = KubeCgroup::new(&rel);
        let att = Attachment {
            container_id: format!("{}{}{}{}", hex(seed), hex(seed ^ 1), hex(seed ^ 2), hex(seed ^ 3)),
            netns: Some(ns.path()),
            ifname: "eth0".into(),
            namespace: "default".into(),
            name: name.into(),
            uid,
        };
        Self {
            att,
            cgroup,
            ns,
            result: None,
        }
    }

    /// ADD through the node's conflist.
    pub fn add(&mut self, node: &SimNode) {
        let r = node
            .rt
            .add(&self.att)
            .unwrap_or_else(|e| panic!("ADD {}: {e:?}", self.att.name));
        self.result = Some(r);
    }

    pub fn ip(&self) -> String {
        let r = self.result.as_ref().expect("ADD first");
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    }

    pub fn rules(&self) -> String {
        self.ns.exec(&["iptables-save", "-t", "nat"])
    }

    /// The pod's nat table holds our redirect: the OUTPUT jump, and both of Istio's proxy ports.
    pub fn assert_redirected(&self) {
        let rules = self.rules();
        assert!(rules.contains("-A OUTPUT -p tcp -j MESHBYPASS_OUTPUT"), "{rules}");
        assert!(
            rules.contains("--to-ports 15006") && rules.contains("--to-ports 15001"),
            "{rules}"
        );
    }

    /// Runs `program args` inside the pod (cgroup, then netns), as `uid`.
    pub fn spawn(&self, uid: Option<u32>, program: &str, args: &[&str]) -> Peer {
        let mut v = vec!["--", program];
        v.extend_from_slice(args);
        Peer::spawn(&self.cgroup.place(&self.ns, uid), "exec", &v)
    }

    /// Waits until something listens on TCP `port` in the pod.
    pub fn wait_listen(&self, port: u16) {
        wait_for(
            &format!("a listener on {port} in {}", self.ns.name),
            Duration::from_secs(10),
            || self.ns.exec(&["ss", "-Hltn"]).contains(&format!(":{port} ")),
        );
    }
}

/// HTTP through both sidecars, as in a mesh: the app (Python's `http.server` on 8080) and its
/// sidecar (15006) in `server`, a sidecar (15001) and curl in `client`, 3 runs of 20 requests.
/// Every request gets 200, each sidecar is crossed, and the bypass pairs the two sidecars'
/// sockets (a NAT pair) and redirects their messages. Everything started here is stopped.
pub fn http_through_sidecars(node: &SimNode, server: &SimPod, client: &SimPod) {
    let srv_ip = server.ip();
    let before = node.counters();
    let _app = server.spawn(
        None,
        "/usr/bin/python3",
        &["-m", "http.server", "8080", "--bind", "0.0.0.0"],
    );
    server.wait_listen(8080);
    let sidecar_s = Sidecar::start(server, 15006, "127.0.0.1:8080", false);
    let sidecar_c = Sidecar::start(client, 15001, &format!("{srv_ip}:8080"), false);
    let url = format!("http://{srv_ip}:8080/");
    let mut args = vec![
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\\n",
    ];
    args.extend(vec![url.as_str(); 20]);
    for _ in 0..3 {
        let (ok, lines) = client
            .spawn(None, "curl", &args)
            .finish_lines(Duration::from_secs(60));
        assert!(ok, "curl failed: {lines:?}");
        assert_eq!(lines.iter().filter(|l| *l == "200").count(), 20, "{lines:?}");
    }
    let after = node.counters();
    eprintln!("through both sidecars: {after:?}");
    assert!(
        sidecar_c.sessions() >= 3 && sidecar_s.sessions() >= 3,
        "the requests did not cross the sidecars"
    );
    assert!(
        after.get(Counter::PairsNat) > before.get(Counter::PairsNat),
        "{after:?}"
    );
    assert!(
        after.get(Counter::RedirectedMsgs) > before.get(Counter::RedirectedMsgs),
        "sidecar-to-sidecar messages were not redirected: {after:?}"
    );
}

/// An HAProxy sidecar standing in for Envoy: listens on `bind`, forwards to
/// `upstream`, runs as UID/GID 1337 (Istio's proxy). `http` picks HTTP mode
/// (keep-alive, header parsing) over plain TCP. Stats on a unix socket.
pub struct Sidecar {
    pub peer: Peer,
    pub stats: PathBuf,
    dir: PathBuf,
}

impl Sidecar {
    pub fn start(pod: &SimPod, bind: u16, upstream: &str, http: bool) -> Self {
        let s = Self::start_addr(pod, &format!("0.0.0.0:{bind}"), upstream, http);
        pod.wait_listen(bind);
        s
    }

    /// The same with `bind` and `upstream` in HAProxy's address syntax
    /// (`ip:port`, `unix@/path`: a unix listener is made mode 666). The
    /// caller waits for the listener.
    pub fn start_addr(pod: &SimPod, bind: &str, upstream: &str, http: bool) -> Self {
        let dir = std::env::temp_dir().join(unique("hap"));
        std::fs::create_dir_all(&dir).unwrap();
        let stats = dir.join("stats.sock");
        let cfg = dir.join("haproxy.cfg");
        let bind_opts = if bind.starts_with("unix@") {
            " mode 666"
        } else {
            ""
        };
        let mode = if http {
            "http\n  option http-keep-alive"
        } else {
            "tcp"
        };
        std::fs::write(
            &cfg,
            format!(
                "global\n  uid 1337\n  gid 1337\n  maxconn 4096\n  stats socket {} mode 600 level admin\n\n\
                 defaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n\
                 frontend in\n  bind {bind}{bind_opts}\n  default_backend up\n\n\
                 backend up\n  server s1 {upstream}\n",
                stats.display()
            ),
        )
        .unwrap();
        let peer = pod.spawn(None, "haproxy", &["-db", "-f", cfg.to_str().unwrap()]);
        Self { peer, stats, dir }
    }

    /// Total sessions the frontend accepted (HAProxy's `stot`).
    pub fn sessions(&self) -> u64 {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.stats).expect("haproxy stats socket");
        s.write_all(b"show stat\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let mut lines = out.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or("")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = header.iter().position(|h| *h == "stot").expect("stot column");
        lines
            .filter(|l| l.split(',').nth(1) == Some("FRONTEND"))
            .filter_map(|l| l.split(',').nth(col)?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.peer.kill();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup {}: {e}", self.dir.display());
        }
    }
}
