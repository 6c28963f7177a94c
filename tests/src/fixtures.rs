//! Test beds for the datapath torture suite: two pods on a veth pair with
//! the bypass attached, either talking directly (app to app) or, as in a
//! mesh, through Istio-style sidecars: the client app's outbound TCP is
//! redirected to its proxy on 15001 (OUTPUT REDIRECT, UID 1337 exempt), that
//! proxy connects to the server pod, whose PREROUTING REDIRECT hands it to
//! the server pod's proxy on 15006, which connects to the app on
//! 127.0.0.1:8080. Everything is removed by name when the bed drops.
//!
//! Unlike [`crate::BpfRoot`], [`Root`] can let go of its handle on the maps
//! ([`Root::release`]), so that an `unload` really destroys them.

use std::{
    path::PathBuf,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use meshbypass_ebpf::{Mode, NodeMaps, PodEntry, counters::Counters, selftest};

use crate::{A_V4, B_V4, Cgroup, Netns, Peer, PodPair, sibling_bin, unique};

/// This kernel's selftest verdict, probed once per test process.
pub fn kernel_verdict() -> &'static selftest::Report {
    static REPORT: OnceLock<selftest::Report> = OnceLock::new();
    REPORT.get_or_init(|| {
        selftest::run(&sibling_bin("meshbypass-node"), Duration::from_secs(60)).expect("the kernel selftest")
    })
}

/// A private bpf root with the programs loaded; unloaded on drop.
pub struct Root {
    pub path: PathBuf,
    node: Mutex<Option<NodeMaps>>,
}

impl Root {
    pub fn load() -> Self {
        let path = PathBuf::from("/sys/fs/bpf").join(unique("tor"));
        let (node, _) = crate::load_or_clean(&path, &meshbypass_ebpf::LoadOptions::default());
        Self {
            path,
            node: Mutex::new(Some(node)),
        }
    }

    /// Runs `f` on the open handle (reopening it after [`Root::release`]).
    pub fn with<T>(&self, f: impl FnOnce(&mut NodeMaps) -> T) -> T {
        let mut guard = self.node.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(NodeMaps::open(&self.path).expect("reopen the node's maps"));
        }
        f(guard.as_mut().expect("an open node"))
    }

    /// Closes this process's handle on the maps.
    pub fn release(&self) {
        *self.node.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn counters(&self) -> Counters {
        self.with(|n| n.counters().expect("read counters"))
    }

    /// Records this kernel's selftest verdict, which `auto` follows.
    pub fn record_kernel_verdict(&self) {
        let report = kernel_verdict();
        self.with(|n| n.record_verdict(report).expect("record the verdict"));
    }

    /// No socket, pair or waiting endpoint left in the maps.
    pub fn drained(&self) -> bool {
        self.with(|n| {
            let (tx, rx) = n.socket_keys();
            tx.is_empty() && rx.is_empty() && n.pairs().is_empty() && n.endpoints().is_empty()
        })
    }

    /// (sockets in mb_senders, in mb_targets, pairs, endpoints).
    pub fn occupancy(&self) -> (usize, usize, usize, usize) {
        self.with(|n| {
            let (tx, rx) = n.socket_counts();
            let (pairs, endpoints) = n.pairing_counts();
            (tx, rx, pairs, endpoints)
        })
    }

    /// Attaches the bypass to `cgroup` (link named after the netns) and
    /// registers the pod with Istio's proxy ports and UID.
    pub fn add_pod(&self, ns: &Netns, cgroup: &Cgroup, ips: &[&str], mode: Mode) -> u64 {
        let cookie = ns.cookie();
        self.with(|n| {
            n.attach_cgroup(&cgroup.path, &ns.name)
                .expect("attach to the pod cgroup");
            n.register_pod(&PodEntry {
                netns_cookie: cookie,
                ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
                outbound_port: 15001,
                inbound_port: 15006,
                proxy_uid: Some(1337),
                proxy_gid: Some(1337),
                mode,
            })
            .expect("register pod");
        });
        cookie
    }

    /// What the plugin's DEL does to the bypass: detach the link, remove the
    /// pod's entries.
    pub fn del_pod(&self, ns: &Netns, cookie: u64) {
        self.with(|n| {
            n.detach_cgroup(&ns.name).expect("detach");
            n.unregister_pod(cookie).expect("unregister");
        });
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        self.release();
        if let Err(e) = meshbypass_ebpf::unload(&self.path) {
            eprintln!("cleanup {}: {e}", self.path.display());
        }
    }
}

/// Where the server app listens in pod B.
pub const APP_PORT: u16 = 8080;

/// Two pods with the bypass; `sidecars` puts Istio-style proxies in front.
/// The sidecars' I/O deadline. A proxy's idle direction (nothing flows back
/// while a flood runs) waits this long; the full budget's 1 GiB flood through
/// the mesh takes longer than mb-peer's default 20 s when it runs on the
/// stack. The clients' own deadlines still catch a hang.
const PROXY_DEADLINE_MS: &str = "90000";

pub struct Bed {
    // Fields drop in order: processes first, then their cgroups, the maps, the netns.
    /// The server app (an echo server unless [`Bed::with_app`] said otherwise).
    pub echo: Option<Peer>,
    pub proxy_b: Option<Peer>,
    pub proxy_a: Option<Peer>,
    pub cg_a: Cgroup,
    pub cg_b: Cgroup,
    pub root: Root,
    pub pods: PodPair,
    pub cookie_a: u64,
    pub cookie_b: u64,
    pub mode: Mode,
    pub sidecars: bool,
}

impl Bed {
    /// `echo_args`: extra flags of the server app (`--reader splice`, `--blocking`).
    pub fn new(mode: Mode, sidecars: bool, echo_args: &[&str]) -> Self {
        Self::with_app(mode, sidecars, "echo", echo_args)
    }

    /// The server app is `mb-peer <role> --listen 0.0.0.0:8080 <args>`.
    pub fn with_app(mode: Mode, sidecars: bool, role: &str, app_args: &[&str]) -> Self {
        let pods = PodPair::new();
        let root = Root::load();
        if mode == Mode::Auto {
            root.record_kernel_verdict();
        }
        // Churn opens tens of thousands of connections a minute: more ports,
        // and TIME_WAIT ports reused (the same 4-tuple again, for the maps too).
        for ns in [&pods.a, &pods.b] {
            ns.exec(&[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65535",
            ]);
        }
        let (cg_a, cg_b) = (Cgroup::new("ca"), Cgroup::new("cb"));
        let cookie_a = root.add_pod(&pods.a, &cg_a, &[A_V4], mode);
        let cookie_b = root.add_pod(&pods.b, &cg_b, &[B_V4], mode);
        let mut bed = Self {
            echo: None,
            proxy_b: None,
            proxy_a: None,
            cg_a,
            cg_b,
            root,
            pods,
            cookie_a,
            cookie_b,
            mode,
            sidecars,
        };
        if sidecars {
            bed.redirect_rules();
        }
        let mut args = vec!["--listen", "0.0.0.0:8080"];
        args.extend_from_slice(app_args);
        let echo = Peer::spawn(&bed.place_b(None), role, &args);
        echo.ready();
        bed.echo = Some(echo);
        if sidecars {
            let proxy_b = Peer::spawn(
                &bed.place_b(Some(1337)),
                "proxy",
                &[
                    "--listen",
                    "0.0.0.0:15006",
                    "--to",
                    "127.0.0.1:8080",
                    "--close-on-error",
                    "--deadline-ms",
                    PROXY_DEADLINE_MS,
                ],
            );
            proxy_b.ready();
            bed.proxy_b = Some(proxy_b);
            bed.start_proxy_a();
        }
        bed
    }

    fn redirect_rules(&self) {
        crate::outbound_redirect(&self.pods.a, B_V4, "8080");
        crate::inbound_redirect(&self.pods.b, "8080");
    }

    /// Removes pod A's redirect, as DEL does; established flows keep their
    /// NAT. They keep it only while something in the netns uses conntrack:
    /// the REDIRECT rule is pod A's only user, and removing the last one
    /// unhooks conntrack from the netns (`nf_ct_netns_put`), so the
    /// redirected connections' next packets leave untranslated and pod B
    /// resets them, with or without the bypass. A rule that only matches on
    /// conntrack state (and changes nothing) keeps it hooked, as any other
    /// conntrack user in a real pod would.
    pub fn remove_redirect_a(&self) {
        self.pods.a.exec(&[
            "iptables",
            "-w",
            "-A",
            "INPUT",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "RETURN",
        ]);
        self.pods.a.exec(&["iptables", "-w", "-t", "nat", "-F", "OUTPUT"]);
    }

    /// (Re)starts pod A's sidecar (outbound, SO_ORIGINAL_DST).
    pub fn start_proxy_a(&mut self) {
        let proxy_a = Peer::spawn(
            &crate::Place {
                ns: &self.pods.a,
                cgroup: &self.cg_a.path,
                uid: Some(1337),
            },
            "proxy",
            &[
                "--listen",
                "0.0.0.0:15001",
                "--close-on-error",
                "--deadline-ms",
                PROXY_DEADLINE_MS,
            ],
        );
        proxy_a.ready();
        self.proxy_a = Some(proxy_a);
    }

    pub fn place_a(&self, uid: Option<u32>) -> crate::Place<'_> {
        crate::Place {
            ns: &self.pods.a,
            cgroup: &self.cg_a.path,
            uid,
        }
    }

    pub fn place_b(&self, uid: Option<u32>) -> crate::Place<'_> {
        crate::Place {
            ns: &self.pods.b,
            cgroup: &self.cg_b.path,
            uid,
        }
    }

    /// What the client app connects to.
    pub fn target(&self) -> String {
        format!("{B_V4}:{APP_PORT}")
    }

    /// "all direct", "auto mesh", ...
    pub fn label(&self) -> String {
        format!(
            "{} {}",
            self.mode.as_str(),
            if self.sidecars { "mesh" } else { "direct" }
        )
    }
}
