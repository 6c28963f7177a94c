//! Attacks on invariant 1 (never mis-deliver) and 2 (never reorder) with real
//! sockets, one scenario per way a message could reach the wrong socket or
//! overtake another: a local port carrying two connections (both orders,
//! every mode), a keep-alive socket whose peer's tuple was reused, TCP Fast
//! Open, two connections joining one waiting endpoint at once, and Istio's
//! IPv6 passthrough source `::6`. Each names whose bytes arrived where
//! (payloads are tagged per connection), and checks the bypass counters
//! exactly where the outcome is known. Root only (CI runs as root).

use std::time::Duration;

use meshbypass_ebpf::{
    Counter, LoadOptions, Mode,
    abi::{DRAIN_RECEIVER_READ, DRAIN_SENDER_ACKED},
    counters::Counters,
};
use meshbypass_tests::{
    fixtures::kernel_verdict,
    script::{Bed, Script},
    *,
};

/// Bytes redirected since `before`.
fn redirected_since(bed: &Bed, before: &Counters) -> u64 {
    bed.counters().get(Counter::RedirectedBytes) - before.get(Counter::RedirectedBytes)
}

/// Invariant 1, the reproduced case. Pod A's proxy and pod A's app share the
/// local port A:40000: the proxy talks to B:15021 (never redirected: B's end
/// of it is an app socket), the app to B:8080 (not redirected outbound,
/// redirected inbound to B's proxy on 15006). B's proxy must never take the
/// proxy's connection for the app's, in either order of establishment: each
/// message must arrive on its own connection and nowhere else.
fn shared_local_port(mode: Mode, proxy_first: bool) {
    let bed = Bed::new(mode);
    bed.inbound_redirect("8080");
    // The four ends; each one's socket is "c" (pod A) or "s" (pod B).
    const B_PROXY: usize = 0;
    const B_APP: usize = 1;
    const A_PROXY: usize = 2;
    const A_APP: usize = 3;
    let mut p = [
        bed.script('b', Some(1337)),
        bed.script('b', None),
        bed.script('a', Some(1337)),
        bed.script('a', None),
    ];
    p[B_PROXY].ok("listen l 0.0.0.0:15006");
    p[B_APP].ok("listen l 0.0.0.0:15021");
    let shared = format!("{A_V4}:40000");
    let proxy_leg = |p: &mut [Script; 4]| {
        p[A_PROXY].ok(&format!("connect c {B_V4}:15021 {shared}"));
        p[B_APP].ok("accept s l");
    };
    let app_leg = |p: &mut [Script; 4]| {
        p[A_APP].ok(&format!("connect c {B_V4}:8080 {shared}"));
        p[B_PROXY].ok("accept s l");
    };
    if proxy_first {
        proxy_leg(&mut p);
        app_leg(&mut p);
    } else {
        app_leg(&mut p);
        proxy_leg(&mut p);
    }
    let before = bed.counters();
    let case = format!(
        "{} {}",
        bed.mode.as_str(),
        if proxy_first { "proxy first" } else { "app first" }
    );
    // Each end sends; its own peer must get it, the other connection nothing.
    let legs = [
        (B_PROXY, A_APP, A_PROXY, "TO-A-APP."),
        (A_APP, B_PROXY, B_APP, "FROM-A-APP."),
        (A_PROXY, B_APP, B_PROXY, "FROM-A-PROXY."),
        (B_APP, A_PROXY, A_APP, "TO-A-PROXY."),
    ];
    let sock = |i: usize| if i < 2 { "s" } else { "c" };
    let mut sent = 0u64;
    for (from, to, bystander, tag) in legs {
        p[from].ok(&format!("send {} {tag} 40", sock(from)));
        let got = p[to].ask(&format!("expect {} {tag} 40", sock(to)));
        let quiet = p[bystander].ask(&format!("quiet {} 200", sock(bystander)));
        assert!(
            got == "ok" && quiet == "ok",
            "{case}: {tag} from {} must reach {} only: {} got {got:?}, {} got {quiet:?}",
            p[from].who,
            p[to].who,
            p[to].who,
            p[bystander].who
        );
        sent += (tag.len() * 40) as u64;
    }
    let redirected = redirected_since(&bed, &before);
    // In `all` both connections are tracked by both ends and pair correctly:
    // everything is redirected. In proxy-only only proxy-to-proxy legs pair,
    // and there is none here: nothing is. Off tracks nothing.
    let want = match mode {
        Mode::All => sent,
        Mode::Auto if kernel_verdict().safe_all => sent,
        _ => 0,
    };
    assert_eq!(redirected, want, "{case}: {:?}", bed.counters());
}

#[test]
fn a_local_port_shared_by_two_connections_proxy_first() {
    for mode in [Mode::All, Mode::ProxyOnly, Mode::Auto, Mode::Off] {
        shared_local_port(mode, true);
    }
}

#[test]
fn a_local_port_shared_by_two_connections_app_first() {
    for mode in [Mode::All, Mode::ProxyOnly, Mode::Auto, Mode::Off] {
        shared_local_port(mode, false);
    }
}

/// Invariant 1, the cached peer. An app connection redirected to its proxy
/// sends (the peer is cached), the proxy closes its end, the app keeps its
/// socket (CLOSE_WAIT); conntrack forgets the connection and a new app
/// connection from the same port to another destination gets a proxy socket
/// with exactly the old one's tuple. The old socket's next bytes must take
/// the stack (and meet whatever it meets there), never the new connection.
fn reused_peer_tuple(mode: Mode) {
    let bed = Bed::new(mode);
    bed.outbound_redirect("8080,8081");
    let mut a_proxy = bed.script('a', Some(1337));
    let mut a_app = bed.script('a', None);
    a_proxy.ok("listen l 0.0.0.0:15001");
    let local = format!("{A_V4}:41000");
    a_app.ok(&format!("connect old {B_V4}:8080 {local}"));
    let p1 = a_proxy.ok("accept p1 l");
    a_app.ok("send old FIRST. 20");
    a_proxy.ok("expect p1 FIRST. 20");
    a_proxy.ok("close p1");
    assert_eq!(
        a_app.ok("quiet old 1000"),
        "eof",
        "{}: the proxy's FIN",
        mode.as_str()
    );
    // Once the app's ACK of that FIN is in (the proxy's socket reached
    // FIN-WAIT-2), nothing of the old connection is in flight: conntrack
    // forgets it and stays ignorant until the old socket sends again.
    wait_for(
        "the proxy's closed socket in FIN-WAIT-2",
        Duration::from_secs(5),
        || {
            bed.pods
                .a
                .exec(&["ss", "-Htn", "state", "fin-wait-2", "sport", "=", ":15001"])
                .contains("15001")
        },
    );
    bed.pods.a.exec(&["conntrack", "-F"]);
    a_app.ok(&format!("connect new {B_V4}:8081 {local}"));
    let p2 = a_proxy.ok("accept p2 l");
    assert_eq!(p1, p2, "the new proxy socket must have the old one's tuple");
    let before = bed.counters();
    a_app.ok("send old STALE. 20");
    let quiet = a_proxy.ask("quiet p2 300");
    assert_eq!(
        quiet,
        "ok",
        "{}: the old connection's bytes reached the new one: {:?}",
        mode.as_str(),
        bed.counters()
    );
    // The new connection itself works, through the bypass where the mode
    // redirects app legs.
    a_app.ok("send new SECOND. 20");
    a_proxy.ok("expect p2 SECOND. 20");
    let c = bed.counters();
    let redirected = redirected_since(&bed, &before);
    let want = if mode == Mode::All {
        20 * "SECOND.".len() as u64
    } else {
        0
    };
    assert_eq!(redirected, want, "{}: {c:?}", mode.as_str());
}

#[test]
fn a_keep_alive_socket_never_reaches_a_reused_peer_tuple() {
    for mode in [Mode::Off, Mode::All, Mode::ProxyOnly] {
        reused_peer_tuple(mode);
    }
}

/// Invariant 2 and TCP Fast Open. A blocking sendto(MSG_FASTOPEN) connects
/// and then writes the rest of its buffer through TCP in the same call, after
/// the socket joined the maps at establishment: sk_msg never sees those
/// bytes. The next send must not overtake them. First without a cookie (the
/// SYN carries no data), then with one (the SYN carries the first bytes).
#[test]
fn tcp_fast_open_bytes_are_never_overtaken() {
    let bed = Bed::new(Mode::All);
    for ns in [&bed.pods.a, &bed.pods.b] {
        ns.exec(&["sysctl", "-q", "-w", "net.ipv4.tcp_fastopen=3"]);
    }
    let mut server = bed.script('b', None);
    let mut client = bed.script('a', None);
    server.ok("listen l 0.0.0.0:9000 fastopen");
    let rounds = [
        ("no cookie", "FIRST. 3000"),
        ("cookie", "FIRST. 3000"),
        // Corked, the first bytes stay in the write queue and the handshake's
        // ACK leaves alone: the server sees no data when it establishes.
        ("no cookie, corked", "FIRST. 10 cork"),
        ("cookie, corked", "FIRST. 10 cork"),
    ];
    for (round, (conn, first)) in rounds.iter().enumerate() {
        if conn.starts_with("no cookie") {
            // Forget the server's cookie (kept with the tcp metrics).
            bed.pods.a.ip(&["tcp_metrics", "flush", "all"]);
        }
        let before = bed.counters();
        client.ok(&format!("fastopen c{round} {B_V4}:9000 {first}"));
        // Accepted: both ends have established (and paired) before the
        // next send, so nothing but the guard keeps it off the bypass.
        server.ok(&format!("accept s{round} l"));
        client.ok(&format!("send c{round} SECOND. 100"));
        if first.ends_with("cork") {
            client.ok(&format!("uncork c{round}"));
        }
        let first_len = if first.ends_with("cork") { 10 } else { 3000 };
        let got = server.ask(&format!("expect s{round} FIRST. {first_len}"));
        assert_eq!(
            got,
            "ok",
            "{conn}: the first write was overtaken: {:?}",
            bed.counters()
        );
        server.ok(&format!("expect s{round} SECOND. 100"));
        // And the way back, which saw no stack byte, is redirected in full;
        // unless the server accepted the SYN's data and established first
        // (a cookie): then nothing pairs and everything takes TCP.
        server.ok(&format!("send s{round} BACK. 100"));
        client.ok(&format!("expect c{round} BACK. 100"));
        let c = bed.counters();
        eprintln!("TFO {conn}: {c:?}");
        let want = if conn.starts_with("no cookie") {
            100 * "BACK.".len() as u64
        } else {
            0
        };
        assert_eq!(
            redirected_since(&bed, &before),
            want,
            "{conn}: only the reply direction may be redirected: {c:?}"
        );
    }
}

/// Two connections from one local port to two redirected destinations,
/// established at once while a third connection from that port waits in the
/// maps: none of them may be paired with another's socket.
#[test]
fn connections_racing_for_one_endpoint_pair_with_nobody_else() {
    let bed = Bed::new(Mode::ProxyOnly);
    bed.inbound_redirect("8080,8081");
    let mut b_proxy = bed.script('b', Some(1337));
    let mut b_app = bed.script('b', None);
    let mut a_proxy = bed.script('a', Some(1337));
    let mut a_app1 = bed.script('a', None);
    let mut a_app2 = bed.script('a', None);
    b_proxy.ok("listen l 0.0.0.0:15006");
    b_app.ok("listen l 0.0.0.0:15021");
    for round in 0..20 {
        let shared = format!("{A_V4}:{}", 42000 + round);
        // The waiter: the proxy's connection to a port nobody redirects.
        a_proxy.ok(&format!("connect w{round} {B_V4}:15021 {shared}"));
        b_app.ok(&format!("accept w{round} l"));
        // Two app connections from the same port, written at once.
        for (app, port) in [(&mut a_app1, 8080), (&mut a_app2, 8081)] {
            app.peer
                .send_line(&format!("connect c{round} {B_V4}:{port} {shared}"));
        }
        for app in [&mut a_app1, &mut a_app2] {
            let r = app.peer.line(Duration::from_secs(10));
            assert!(r.starts_with("ok"), "{}: {r}", app.who);
        }
        b_proxy.ok(&format!("accept x{round} l"));
        b_proxy.ok(&format!("accept y{round} l"));
        // B's proxy answers on both; the apps must each get one answer and
        // the waiting proxy connection nothing.
        b_proxy.ok(&format!("send x{round} X. 10"));
        b_proxy.ok(&format!("send y{round} Y. 10"));
        let (r1, r2) = (
            a_app1.ask(&format!("read c{round} 20")),
            a_app2.ask(&format!("read c{round} 20")),
        );
        let quiet = a_proxy.ask(&format!("quiet w{round} 100"));
        assert_eq!(
            quiet, "ok",
            "round {round}: the waiting proxy socket got an app's answer"
        );
        let mut got = [r1.clone(), r2.clone()];
        got.sort();
        assert_eq!(
            got,
            [
                "ok X.X.X.X.X.X.X.X.X.X.".to_string(),
                "ok Y.Y.Y.Y.Y.Y.Y.Y.Y.Y.".to_string()
            ],
            "round {round}: {r1} / {r2}"
        );
    }
    assert_eq!(
        bed.counters().get(Counter::RedirectedBytes),
        0,
        "no proxy-to-proxy leg here: {:?}",
        bed.counters()
    );
}

/// Istio's inbound passthrough connects from 127.0.0.6 (IPv4) or ::6 (IPv6)
/// to the pod's own address: a leg inside the pod like loopback. Both pair
/// in `all` and carry every byte through the bypass.
#[test]
fn istio_passthrough_sources_pair_in_both_families() {
    let bed = Bed::new(Mode::All);
    bed.pods.b.ip(&["-6", "addr", "add", "::6/128", "dev", "lo"]);
    let mut proxy = bed.script('b', Some(1337));
    let mut app = bed.script('b', None);
    app.ok("listen l [::]:8080");
    for (family, dest, source) in [
        ("IPv4", format!("{B_V4}:8080"), "127.0.0.6:0"),
        ("IPv6", format!("[{B_V6}]:8080"), "[::6]:0"),
    ] {
        let before = bed.counters();
        proxy.ok(&format!("connect c {dest} {source}"));
        app.ok("accept s l");
        proxy.ok("send c REQUEST. 100");
        app.ok("expect s REQUEST. 100");
        app.ok("send s RESPONSE. 100");
        proxy.ok("expect c RESPONSE. 100");
        let c = bed.counters();
        assert_eq!(
            c.get(Counter::PairsPlain) - before.get(Counter::PairsPlain),
            1,
            "{family}: the passthrough leg must pair: {c:?}"
        );
        assert_eq!(
            redirected_since(&bed, &before),
            100 * ("REQUEST.".len() + "RESPONSE.".len()) as u64,
            "{family}: {c:?}"
        );
        proxy.ok("close c");
        app.ok("close s");
    }
}

/// Invariant 2, resuming. A proxy that does not read lets its redirect queue
/// pass the bound: the direction goes to the stack. Once everything the
/// sender gave TCP is acknowledged and read, and not before, the direction
/// may return to the bypass. Bursts of tagged messages, read only after each
/// burst, show any message that overtook one still unread on the stack.
#[test]
fn a_full_proxy_receiver_resumes_only_after_both_paths_drained() {
    let bed = Bed::new(Mode::All);
    let (mut proxy, mut app) = bed.proxy_leg(None);
    let c0 = bed.counters();
    bed.flood_past_the_bound(&mut app);
    proxy.ok("expect s FLOOD. 600000");
    assert_eq!(app.peer.line(Duration::from_secs(30)), "ok 3600000");
    let c1 = bed.counters();
    let d = |a: &Counters, b: &Counters, c: Counter| b.get(c) - a.get(c);
    assert_eq!(d(&c0, &c1, Counter::ReceiverFull), 1, "{c1:?}");
    assert_eq!(d(&c0, &c1, Counter::Resumed), 0, "{c1:?}");
    let on_stack = d(&c0, &c1, Counter::PassthroughBytes);
    assert!(
        on_stack > 0 && on_stack < 3_600_000,
        "part of the flood must have taken the stack: {c1:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut round = 0;
    while bed.counters().get(Counter::Resumed) == c1.get(Counter::Resumed) {
        assert!(
            std::time::Instant::now() < deadline,
            "never resumed: {:?}",
            bed.counters()
        );
        for i in 0..8 {
            app.ok(&format!("send c R{round}M{i}. 100"));
        }
        for i in 0..8 {
            let got = proxy.ask(&format!("expect s R{round}M{i}. 100"));
            assert_eq!(got, "ok", "round {round} message {i}: {:?}", bed.counters());
        }
        round += 1;
    }
    // Resumed: the direction is on the bypass again, in full.
    let c2 = bed.counters();
    assert_eq!(d(&c1, &c2, Counter::Resumed), 1, "{c2:?}");
    for i in 0..8 {
        app.ok(&format!("send c AFTER{i}. 100"));
    }
    for i in 0..8 {
        proxy.ok(&format!("expect s AFTER{i}. 100"));
    }
    let c3 = bed.counters();
    assert_eq!(
        d(&c2, &c3, Counter::RedirectedBytes),
        8 * 100 * "AFTER0.".len() as u64,
        "{c3:?}"
    );
    assert_eq!(d(&c2, &c3, Counter::PassthroughBytes), 0, "{c3:?}");
    eprintln!("resumed after {round} rounds: {c3:?}");
}

/// The start of both drain scenarios: an app sends 3.6 MB to its peer's
/// inbound proxy, which reads nothing until the bound sent the direction to
/// the stack, then reads all but the last 6000 bytes (stack bytes, unread).
/// Returns once the app's write finished and TCP acknowledged every byte.
/// Err: what the proxy read instead of the flood (with a drain condition
/// removed, the flood itself can reorder).
fn flood_a_proxy(options: &LoadOptions) -> Result<(Bed, Script, Script), String> {
    let bed = Bed::with_options(Mode::All, options);
    let (mut proxy, mut app) = bed.proxy_leg(None);
    bed.flood_past_the_bound(&mut app);
    let flood = proxy.ask("expect s FLOOD. 599000");
    if flood != "ok" {
        return Err(format!("the flood: {flood}"));
    }
    assert_eq!(app.peer.line(Duration::from_secs(30)), "ok 3600000");
    wait_for("TCP to acknowledge the flood", Duration::from_secs(5), || {
        app.ok("unsent c") == "0 0"
    });
    Ok((bed, proxy, app))
}

/// Drain condition "the receiver read every byte TCP gave it": the proxy
/// has 6000 flood bytes unread when the app sends again. Returns the
/// proxy's view of the next bytes ("ok" when they came in order).
fn receiver_read_scenario(options: &LoadOptions) -> String {
    let (bed, mut proxy, mut app) = match flood_a_proxy(options) {
        Ok(bed) => bed,
        Err(e) => return e,
    };
    app.ok("send c NEXT. 100");
    let got = proxy.ask("expect s FLOOD. 1000");
    if got == "ok" {
        proxy.ok("expect s NEXT. 100");
    }
    eprintln!(
        "receiver-read scenario, checks {:#x}: {got} {:?}",
        options.drain_checks,
        bed.counters()
    );
    got
}

/// Drain condition "every byte the sender gave TCP is acknowledged": a
/// corked message waits in the app's write queue while the proxy reads
/// everything TCP delivered; then the app sends again.
fn sender_acked_scenario(options: &LoadOptions) -> String {
    let (bed, mut proxy, mut app) = match flood_a_proxy(options) {
        Ok(bed) => bed,
        Err(e) => return e,
    };
    app.ok("cork c");
    app.ok("send c CORKED. 10");
    proxy.ok("expect s FLOOD. 1000");
    app.ok("send c AFTER. 10");
    app.ok("uncork c");
    let got = proxy.ask("expect s CORKED. 10");
    if got == "ok" {
        proxy.ok("expect s AFTER. 10");
    }
    eprintln!(
        "sender-acked scenario, checks {:#x}: {got} {:?}",
        options.drain_checks,
        bed.counters()
    );
    got
}

/// Each drain condition holds the order on its own: with it the scenario
/// keeps every byte in place; the same scenario with that one condition
/// removed from the program reorders bytes (so this test can fail).
#[test]
fn each_drain_condition_is_what_keeps_the_order() {
    let all = LoadOptions::default();
    // With the condition: the order holds, every time. Without it: the same
    // scenario reorders (timing under a loaded machine can keep a run from
    // reaching the race, so up to three tries).
    let reorders = |scenario: fn(&LoadOptions) -> String, options: LoadOptions, first: &str| {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let got = scenario(&options);
            if got.starts_with(&format!("err differs at byte 0: got \"{first}")) {
                return Ok(());
            }
            seen.push(got);
        }
        Err(seen)
    };
    assert_eq!(receiver_read_scenario(&all), "ok");
    let without = DRAIN_SENDER_ACKED;
    if let Err(seen) = reorders(
        receiver_read_scenario,
        LoadOptions {
            drain_checks: without,
            ..all
        },
        "NEXT.",
    ) {
        panic!("without the receiver-read condition the next send must overtake the unread bytes: {seen:?}");
    }
    assert_eq!(sender_acked_scenario(&all), "ok");
    let without = DRAIN_RECEIVER_READ;
    if let Err(seen) = reorders(
        sender_acked_scenario,
        LoadOptions {
            drain_checks: without,
            ..all
        },
        "AFTER.",
    ) {
        panic!("without the sender-acked condition the next send must overtake the unsent bytes: {seen:?}");
    }
}

/// One pod cannot fill the node's maps: past its socket budget its sockets
/// stay on TCP (and work), and closing tracked ones frees the budget.
#[test]
fn a_pod_past_its_socket_budget_stays_on_tcp() {
    let bed = Bed::with_options(
        Mode::All,
        &LoadOptions {
            pod_socket_budget: 4,
            ..LoadOptions::default()
        },
    );
    let mut server = bed.script('b', None);
    let mut client = bed.script('a', None);
    server.ok("listen l 0.0.0.0:9000 nonblock");
    let before = bed.counters();
    for i in 0..10 {
        client.ok(&format!("connect c{i} {B_V4}:9000 nonblock"));
        server.ok(&format!("accept s{i} l nonblock"));
        client.ok(&format!("send c{i} C{i}. 100"));
        server.ok(&format!("expect s{i} C{i}. 100"));
    }
    let after = bed.counters();
    let tracked = |ns: &Netns| bed.root().node.lock().unwrap().tracked_sockets(ns.cookie());
    // Four connections in each pod's budget; the other six clients found
    // their pod at it (their servers then found nobody waiting).
    assert_eq!(d(&before, &after, Counter::PairsPlain), 4, "{after:?}");
    assert_eq!(d(&before, &after, Counter::BudgetExceeded), 6, "{after:?}");
    assert_eq!(
        d(&before, &after, Counter::RedirectedBytes),
        4 * 100 * 3,
        "{after:?}"
    );
    assert_eq!((tracked(&bed.pods.a), tracked(&bed.pods.b)), (Some(4), Some(4)));
    for i in 0..4 {
        client.ok(&format!("close c{i}"));
        server.ok(&format!("close s{i}"));
    }
    wait_for("the budget to free", Duration::from_secs(5), || {
        (tracked(&bed.pods.a), tracked(&bed.pods.b)) == (Some(0), Some(0))
    });
    client.ok(&format!("connect again {B_V4}:9000 nonblock"));
    server.ok("accept again l nonblock");
    assert_eq!(
        d(&after, &bed.counters(), Counter::PairsPlain),
        1,
        "a freed budget takes new sockets"
    );
}

fn d(a: &Counters, b: &Counters, c: Counter) -> u64 {
    b.get(c) - a.get(c)
}
