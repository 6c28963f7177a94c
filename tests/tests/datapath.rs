//! The datapath on real sockets: two network namespaces on a veth pair, each
//! with its own cgroup v2 directory and the bypass attached, a private bpf
//! root per test. Root only (CI runs as root).

use std::{net::IpAddr, time::Duration};

use meshbypass_ebpf::{Counter, Mode, abi::Addr, selftest};
use meshbypass_tests::*;

const SIZES: &[usize] = &[1, 7, 100, 1460, 4096, 65_536, 100_003, 1 << 20];

fn addr(s: &str) -> Addr {
    Addr::from_ip(s.parse::<IpAddr>().unwrap())
}

/// Waits until every pairing entry and socket of the test is gone.
fn assert_drained(root: &BpfRoot) {
    wait_for(
        "pairing maps and socket maps to empty",
        Duration::from_secs(10),
        || {
            let node = root.node.lock().unwrap();
            let (tx, rx) = node.socket_keys();
            node.pairs().is_empty() && node.endpoints().is_empty() && tx.is_empty() && rx.is_empty()
        },
    );
}

#[test]
fn plain_connection_is_redirected_and_intact_ipv4_and_v4_mapped() {
    require_root();
    let pods = PodPair::new();
    let root = BpfRoot::load();
    let (cg_a, cg_b) = (Cgroup::new("ca"), Cgroup::new("cb"));
    root.add_pod(&pods.a, &cg_a, &[A_V4, A_V6], Mode::All);
    root.add_pod(&pods.b, &cg_b, &[B_V4, B_V6], Mode::All);
    // A dual-stack listener: the accepted sockets see v4-mapped addresses.
    let server = Peer::spawn(
        &Place {
            ns: &pods.b,
            cgroup: &cg_b.path,
            uid: None,
        },
        "echo",
        &["--listen", "[::]:0"],
    );
    let port = server.ready();
    let before = root.counters();
    let v = run_client(
        &Place {
            ns: &pods.a,
            cgroup: &cg_a.path,
            uid: None,
        },
        &format!("{B_V4}:{port}"),
        SIZES,
    );
    let after = root.counters();
    let total: usize = SIZES.iter().sum();
    assert_eq!(v["bytes"], total);
    let redirected = after.get(Counter::RedirectedBytes) - before.get(Counter::RedirectedBytes);
    let pairs = after.get(Counter::PairsPlain) - before.get(Counter::PairsPlain);
    eprintln!("plain v4: {total} bytes each way, {redirected} redirected, {pairs} pairs, {after:?}");
    assert_eq!(pairs, SIZES.len() as u64, "one plain pair per connection");
    // The echo direction never races the pairing: all of it is redirected.
    assert!(
        redirected >= total as u64,
        "only {redirected} of {total} bytes redirected"
    );
    assert!(after.get(Counter::RedirectedMsgs) > before.get(Counter::RedirectedMsgs));
    assert_drained(&root);
}

#[test]
fn plain_connection_is_redirected_and_intact_ipv6() {
    require_root();
    let pods = PodPair::new();
    let root = BpfRoot::load();
    let (cg_a, cg_b) = (Cgroup::new("ca"), Cgroup::new("cb"));
    root.add_pod(&pods.a, &cg_a, &[A_V4, A_V6], Mode::All);
    root.add_pod(&pods.b, &cg_b, &[B_V4, B_V6], Mode::All);
    let server = Peer::spawn(
        &Place {
            ns: &pods.b,
            cgroup: &cg_b.path,
            uid: None,
        },
        "echo",
        &["--listen", &format!("[{B_V6}]:0")],
    );
    let port = server.ready();
    let sizes = [1, 1000, 65_536, 300_000];
    run_client(
        &Place {
            ns: &pods.a,
            cgroup: &cg_a.path,
            uid: None,
        },
        &format!("[{B_V6}]:{port}"),
        &sizes,
    );
    let c = root.counters();
    eprintln!("plain v6: {c:?}");
    assert_eq!(c.get(Counter::PairsPlain), sizes.len() as u64);
    assert!(c.get(Counter::RedirectedBytes) >= sizes.iter().sum::<usize>() as u64);
    assert_drained(&root);
}

#[test]
fn unregistered_pods_are_left_alone() {
    require_root();
    let pods = PodPair::new();
    let root = BpfRoot::load();
    let (cg_a, cg_b) = (Cgroup::new("ca"), Cgroup::new("cb"));
    // Attached but not registered: the datapath must not act.
    {
        let node = root.node.lock().unwrap();
        node.attach_cgroup(&cg_a.path, &pods.a.name).unwrap();
        node.attach_cgroup(&cg_b.path, &pods.b.name).unwrap();
    }
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
    run_client(
        &Place {
            ns: &pods.a,
            cgroup: &cg_a.path,
            uid: None,
        },
        &format!("{B_V4}:{port}"),
        &[10, 100_000],
    );
    let c = root.counters();
    assert_eq!(c.get(Counter::SocketsTracked), 0, "{c:?}");
    assert_eq!(c.get(Counter::RedirectedMsgs), 0, "{c:?}");
}

/// Two pods with Istio-style redirects: the client app's outbound TCP goes
/// to its proxy on 15001 (OUTPUT REDIRECT), the proxy (UID 1337, exempt)
/// connects to the server pod, whose PREROUTING REDIRECT sends it to that
/// pod's proxy on 15006, which connects to the app on 127.0.0.1:8080.
struct Mesh {
    // Fields drop in order: processes first, then their cgroups and netns.
    _peers: Vec<Peer>,
    cg_a: Cgroup,
    _cg_b: Cgroup,
    root: BpfRoot,
    pods: PodPair,
}

impl Mesh {
    /// `blocking_apps`: the app peers are classic blocking programs, for
    /// which EAGAIN is an error (they must stay out of the maps).
    fn new(
        mode: Mode,
        splice_server: bool,
        blocking_apps: bool,
        before_traffic: impl FnOnce(&BpfRoot),
    ) -> Self {
        let pods = PodPair::new();
        let root = BpfRoot::load();
        before_traffic(&root);
        let (cg_a, cg_b) = (Cgroup::new("ca"), Cgroup::new("cb"));
        root.add_pod(&pods.a, &cg_a, &[A_V4], mode);
        root.add_pod(&pods.b, &cg_b, &[B_V4], mode);
        outbound_redirect(&pods.a, B_V4, "8080");
        inbound_redirect(&pods.b, "8080");
        let mut peers = Vec::new();
        let app_b = Place {
            ns: &pods.b,
            cgroup: &cg_b.path,
            uid: None,
        };
        let mut echo_args = vec!["--listen", "0.0.0.0:8080"];
        if splice_server {
            echo_args.push("--splice");
        }
        if blocking_apps {
            echo_args.push("--blocking");
        }
        let server = Peer::spawn(&app_b, "echo", &echo_args);
        server.ready();
        peers.push(server);
        let proxy_b = Peer::spawn(
            &Place {
                ns: &pods.b,
                cgroup: &cg_b.path,
                uid: Some(1337),
            },
            "proxy",
            &["--listen", "0.0.0.0:15006", "--to", "127.0.0.1:8080"],
        );
        proxy_b.ready();
        peers.push(proxy_b);
        let proxy_a = Peer::spawn(
            &Place {
                ns: &pods.a,
                cgroup: &cg_a.path,
                uid: Some(1337),
            },
            "proxy",
            &["--listen", "0.0.0.0:15001"],
        );
        proxy_a.ready();
        peers.push(proxy_a);
        Self {
            _peers: peers,
            cg_a,
            _cg_b: cg_b,
            root,
            pods,
        }
    }

    fn client_place(&self) -> Place<'_> {
        Place {
            ns: &self.pods.a,
            cgroup: &self.cg_a.path,
            uid: None,
        }
    }
}

#[test]
fn nat_pairs_form_across_iptables_redirect() {
    require_root();
    let mesh = Mesh::new(Mode::All, false, false, |_| {});
    let sizes = [1, 4096, 65_536, 1 << 20];
    run_client(&mesh.client_place(), &format!("{B_V4}:8080"), &sizes);
    let c = mesh.root.counters();
    eprintln!("mesh all: {c:?}");
    // Per connection: app->proxy A and proxy A->proxy B are NAT pairs,
    // proxy B->app B is a plain pair on loopback.
    assert_eq!(c.get(Counter::PairsNat), 2 * sizes.len() as u64, "{c:?}");
    assert_eq!(c.get(Counter::PairsPlain), sizes.len() as u64, "{c:?}");
    assert_eq!(c.get(Counter::PairsRefused), 0, "{c:?}");
    assert!(
        c.get(Counter::RedirectedBytes) >= 3 * sizes.iter().sum::<usize>() as u64,
        "{c:?}"
    );
    assert_drained(&mesh.root);
}

#[test]
fn sticky_passthrough_never_switches_a_direction() {
    require_root();
    let pods = PodPair::new();
    let root = BpfRoot::load();
    let (cg_a, cg_b) = (Cgroup::new("ca"), Cgroup::new("cb"));
    let cookie_a = root.add_pod(&pods.a, &cg_a, &[A_V4], Mode::All);
    root.add_pod(&pods.b, &cg_b, &[B_V4], Mode::All);
    let (_server, mut client, sport) = echo_pair(&pods, &cg_a, &cg_b);
    let reply = client.ask("connect");
    let cport: u16 = reply
        .strip_prefix("connected ")
        .and_then(|p| p.parse().ok())
        .expect(&reply);
    // Find the client's pair entry and take it away: its first send then
    // finds no peer and must go through the stack...
    let mut key = None;
    wait_for("the client's pair entry", Duration::from_secs(5), || {
        key = root.node.lock().unwrap().pairs().into_iter().find(|(k, _)| {
            k.netns == cookie_a
                && k.local_port == cport
                && k.remote_port == sport
                && k.remote_ip == addr(B_V4)
        });
        key.is_some()
    });
    let (key, pair) = key.unwrap();
    root.node.lock().unwrap().remove_pair(&key).unwrap();
    let c0 = root.counters();
    assert_eq!(client.ask("send 1000"), "ok 1000");
    let c1 = root.counters();
    let d = |a: &meshbypass_ebpf::counters::Counters, b: &meshbypass_ebpf::counters::Counters, c| {
        b.get(c) - a.get(c)
    };
    assert_eq!(d(&c0, &c1, Counter::Sticky), 1, "{c1:?}");
    assert_eq!(d(&c0, &c1, Counter::PassthroughBytes), 1000, "{c1:?}");
    assert_eq!(
        d(&c0, &c1, Counter::RedirectedBytes),
        1000,
        "the echo stays redirected: {c1:?}"
    );
    // ...and stay there even once a peer is known again: no reordering.
    root.node.lock().unwrap().set_pair(&key, &pair).unwrap();
    assert_eq!(client.ask("send 100000"), "ok 100000");
    let c2 = root.counters();
    assert_eq!(d(&c1, &c2, Counter::PassthroughBytes), 100_000, "{c2:?}");
    assert_eq!(d(&c1, &c2, Counter::RedirectedBytes), 100_000, "{c2:?}");
    assert_eq!(d(&c1, &c2, Counter::Sticky), 0, "{c2:?}");
    assert_eq!(client.ask("close"), "closed");
    assert_drained(&root);
}

#[test]
fn proxy_only_never_redirects_into_an_app_socket() {
    require_root();
    let mesh = Mesh::new(Mode::ProxyOnly, false, true, |_| {});
    let (cookie_a, cookie_b) = (mesh.pods.a.cookie(), mesh.pods.b.cookie());
    let mut client = Peer::spawn(
        &mesh.client_place(),
        "interactive",
        &["--connect", &format!("{B_V4}:8080"), "--blocking"],
    );
    let reply = client.ask("connect");
    let cport: u16 = reply
        .strip_prefix("connected ")
        .and_then(|p| p.parse().ok())
        .expect(&reply);
    assert_eq!(client.ask("send 200000"), "ok 200000");
    {
        let node = mesh.root.node.lock().unwrap();
        let (tx, rx) = node.socket_keys();
        // The app sockets: the client's (A, its port) and the server's (B, 8080).
        let is_app = |k: &meshbypass_ebpf::abi::SockKey| {
            (k.netns == cookie_a && k.local_port == cport) || (k.netns == cookie_b && k.local_port == 8080)
        };
        // Without a SAFE_MEMBER verdict app sockets join no map at all: on
        // kernels where a blocking read() on a member can fail with EAGAIN.
        assert!(!tx.iter().any(is_app), "an app socket is in mb_senders: {tx:?}");
        assert!(
            !rx.iter().any(is_app),
            "an app socket is a redirect target: {rx:?}"
        );
        // Only the sidecar-to-sidecar leg can pair, so only its two sockets
        // join the maps: the sidecars' sockets facing their apps stay plain.
        assert_eq!(rx.len(), 2, "{rx:?}");
        assert_eq!(tx.len(), 2, "{tx:?}");
    }
    let c = mesh.root.counters();
    eprintln!("mesh proxy-only: {c:?}");
    // Both directions of the sidecar-to-sidecar leg.
    assert!(c.get(Counter::RedirectedBytes) >= 400_000, "{c:?}");
    assert_eq!(c.get(Counter::PairsNat), 1, "{c:?}");
    assert_eq!(client.ask("close"), "closed");
    assert_drained(&mesh.root);
}

#[test]
fn splice_reader_behind_its_sidecar_never_hangs_under_auto() {
    require_root();
    let mesh = Mesh::new(Mode::Auto, true, true, |root| {
        // auto follows this kernel's own verdict.
        let report =
            selftest::run(&sibling_bin("meshbypass-node"), Duration::from_secs(30)).expect("selftest");
        eprintln!("selftest: {report:?}");
        root.node.lock().unwrap().record_verdict(&report).unwrap();
    });
    let sizes = [1, 65_536, 1 << 20];
    run_client_with(
        &mesh.client_place(),
        &format!("{B_V4}:8080"),
        &sizes,
        &["--blocking"],
    );
    let c = mesh.root.counters();
    eprintln!("mesh auto + splice reader: {c:?}");
    assert!(c.get(Counter::RedirectedBytes) > 0, "{c:?}");
    assert_drained(&mesh.root);
}

#[test]
fn unregister_removes_every_entry_of_the_pod() {
    require_root();
    let pods = PodPair::new();
    let root = BpfRoot::load();
    let (cg_a, cg_b) = (Cgroup::new("ca"), Cgroup::new("cb"));
    let cookie_a = root.add_pod(&pods.a, &cg_a, &[A_V4, A_V6], Mode::All);
    root.add_pod(&pods.b, &cg_b, &[B_V4], Mode::All);
    let (_server, mut client, _) = echo_pair(&pods, &cg_a, &cg_b);
    client.ask("connect");
    assert_eq!(client.ask("send 10"), "ok 10");
    let mut node = root.node.lock().unwrap();
    assert_eq!(node.pairs().len(), 2);
    let removed = node.unregister_pod(cookie_a).unwrap();
    assert_eq!(
        (removed.netns, removed.ips, removed.pairs),
        (1, 2, 2),
        "{removed:?}"
    );
    assert!(node.pod_by_netns(cookie_a).is_none());
    // Twice is fine (DEL is idempotent).
    assert_eq!(node.unregister_pod(cookie_a).unwrap(), Default::default());
    assert!(node.detach_cgroup(&pods.a.name).unwrap());
    assert!(!node.detach_cgroup(&pods.a.name).unwrap());
    drop(node);
    // The open connection keeps working on the stack.
    assert_eq!(client.ask("send 5000"), "ok 5000");
}
