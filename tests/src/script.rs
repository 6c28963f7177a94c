//! The scripted bed of the adversarial and `adaptive` tests: two registered
//! pods on a veth pair with the bypass attached, and `mb-peer script`
//! processes in them (named sockets driven one command at a time).

use meshbypass_ebpf::{Counter, LoadOptions, Mode, counters::Counters};

use crate::{
    A_V4, A_V6, B_V4, B_V6, BpfRoot, Cgroup, Netns, Peer, Place, PodPair, fixtures::kernel_verdict,
    require_root,
};

/// Two registered pods (Istio ports 15001/15006, proxy UID 1337) on a veth
/// pair, the bypass attached to both cgroups. Drop order: cgroups, maps, netns
/// (the test's scripts are locals declared later, so they go first).
pub struct Bed {
    pub cg_a: Cgroup,
    pub cg_b: Cgroup,
    /// `None` once a test unloaded the node under live sockets ([`Bed::unload`]).
    pub root: Option<BpfRoot>,
    pub pods: PodPair,
    pub mode: Mode,
}

impl Bed {
    pub fn new(mode: Mode) -> Self {
        Self::with_options(mode, &LoadOptions::default())
    }

    pub fn with_options(mode: Mode, options: &LoadOptions) -> Self {
        require_root();
        let pods = PodPair::new();
        let root = BpfRoot::load_with(options);
        if mode == Mode::Auto {
            root.node
                .lock()
                .unwrap()
                .record_verdict(kernel_verdict())
                .expect("record the selftest verdict");
        }
        let (cg_a, cg_b) = (Cgroup::new("ca"), Cgroup::new("cb"));
        root.add_pod(&pods.a, &cg_a, &[A_V4, A_V6], mode);
        root.add_pod(&pods.b, &cg_b, &[B_V4, B_V6], mode);
        Self {
            cg_a,
            cg_b,
            root: Some(root),
            pods,
            mode,
        }
    }

    /// Pod B's inbound redirect: TCP to `ports` goes to its proxy's 15006.
    pub fn inbound_redirect(&self, ports: &str) {
        crate::inbound_redirect(&self.pods.b, ports);
    }

    /// Pod A's outbound redirect: its apps' TCP to B's `ports` goes to its
    /// proxy's 15001 (UID 1337 exempt).
    pub fn outbound_redirect(&self, ports: &str) {
        crate::outbound_redirect(&self.pods.a, B_V4, ports);
    }

    /// Where a process of pod `a` or `b` runs, as `uid` (None: root, an app).
    pub fn place(&self, pod: char, uid: Option<u32>) -> Place<'_> {
        let (ns, cg) = match pod {
            'a' => (&self.pods.a, &self.cg_a),
            'b' => (&self.pods.b, &self.cg_b),
            _ => panic!("pod a or b"),
        };
        Place {
            ns,
            cgroup: &cg.path,
            uid,
        }
    }

    /// `program args` in pod `a` or `b` (stdout lines readable from the peer).
    pub fn exec(&self, pod: char, uid: Option<u32>, program: &str, args: &[&str]) -> Peer {
        let mut v = vec!["--", program];
        v.extend_from_slice(args);
        Peer::spawn(&self.place(pod, uid), "exec", &v)
    }

    /// A script peer in pod `a` or `b`, as `uid` (None: root, an app).
    pub fn script(&self, pod: char, uid: Option<u32>) -> Script {
        let who = format!("{pod}{}", if uid == Some(1337) { "-proxy" } else { "-app" });
        Script {
            peer: Peer::spawn(&self.place(pod, uid), "script", &["--deadline-ms", "3000"]),
            who,
        }
    }

    pub fn root(&self) -> &BpfRoot {
        self.root.as_ref().expect("the node is loaded")
    }

    /// Unloads the node (every pin and pod link) while the pods and their
    /// sockets live on.
    pub fn unload(&mut self) {
        drop(self.root.take());
    }

    /// Pod `a` or `b`'s network namespace.
    pub fn ns(&self, pod: char) -> &Netns {
        self.place(pod, None).ns
    }

    pub fn counters(&self) -> Counters {
        self.root().counters()
    }

    /// Pod B's proxy (UID 1337) listening on 15006 behind pod B's inbound
    /// redirect of 8080, and a client in pod A as `uid` connected to
    /// B:8080: `c`, accepted as `s`. Returns (proxy, client).
    pub fn proxy_leg(&self, uid: Option<u32>) -> (Script, Script) {
        self.inbound_redirect("8080");
        let mut proxy = self.script('b', Some(1337));
        let mut client = self.script('a', uid);
        proxy.ok("listen l 0.0.0.0:15006");
        client.ok(&format!("connect c {B_V4}:8080"));
        proxy.ok("accept s l");
        (proxy, client)
    }

    /// `client` starts writing 600000 "FLOOD." (3.6 MB) on `c` into a
    /// proxy that reads nothing yet: over the receive bound, then TCP until
    /// the proxy's window is full (the write blocks there). Returns once the
    /// bound acted; the client's reply to its write is still to be read.
    pub fn flood_past_the_bound(&self, client: &mut Script) {
        let c0 = self.counters();
        client.peer.send_line("send c FLOOD. 600000");
        crate::wait_for("the bound to act", std::time::Duration::from_secs(10), || {
            self.counters().get(Counter::ReceiverFull) > c0.get(Counter::ReceiverFull)
        });
    }
}

/// `adaptive` learns what a port accepts from the first socket accepted
/// there, which stays out of the maps: one throwaway connection from
/// `client` to `server`'s non-blocking `listener` at `addr`, a byte from the
/// server (its packet carries the lesson), both ends closed.
pub fn teach(client: &mut Script, server: &mut Script, listener: &str, addr: &str) {
    client.ok(&format!("connect teach {addr} nonblock"));
    server.ok(&format!("accept teach {listener} nonblock"));
    server.ok("send teach HELLO. 1");
    client.ok("expect teach HELLO. 1");
    client.ok("close teach");
    server.ok("close teach");
}

/// An `mb-peer script` process: named sockets, one command per line.
pub struct Script {
    pub peer: Peer,
    pub who: String,
}

impl Script {
    /// Runs a command that must succeed; returns what followed "ok".
    pub fn ok(&mut self, cmd: &str) -> String {
        let r = self.peer.ask(cmd);
        match r.strip_prefix("ok") {
            Some(rest) => rest.trim().to_string(),
            None => panic!("{}: `{cmd}` -> {r}", self.who),
        }
    }

    /// Runs a command and returns the whole reply.
    pub fn ask(&mut self, cmd: &str) -> String {
        self.peer.ask(cmd)
    }
}
