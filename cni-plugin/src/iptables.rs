//! The pod's sidecar redirect as `iptables-restore` input: pure functions, golden-tested.
//!
//! Everything lives in the `nat` table, in our own chains (`MESHBYPASS_*`) reached by one jump
//! from `PREROUTING` and one from `OUTPUT`:
//!
//! - `MESHBYPASS_INBOUND`: inbound TCP; RETURN for what must not reach the proxy, the rest to
//!   `MESHBYPASS_IN_REDIRECT` (REDIRECT to the proxy's inbound port).
//! - `MESHBYPASS_OUTPUT`: locally generated TCP; RETURN for the proxy's own traffic and the
//!   exclusions, the rest to `MESHBYPASS_REDIRECT` (REDIRECT to the proxy's outbound port).
//!
//! The `istio` profile reproduces istio-cni's rules (tools/istio-iptables `capture/run.go` and
//! its goldens) rule for rule, in REDIRECT mode; the `linkerd` profile reproduces
//! linkerd2-proxy-init's `iptables.go` (PROXY_INIT_REDIRECT / PROXY_INIT_OUTPUT). Only the chain
//! names and the grouping of lines differ; the order of the rules inside each chain, which is
//! what decides a packet's fate, is theirs.
//!
//! # Applying and removing
//!
//! All input here is meant for `iptables-restore --noflush` (one atomic commit of the `nat`
//! table that leaves everything else in it alone):
//!
//! - [`ruleset`] declares our chains with `:CHAIN - [0:0]` lines, which under `--noflush` create
//!   a chain or flush it if it exists, then appends the rules and the two jumps. Use it on a
//!   namespace that has none of our jumps yet.
//! - Removing cannot be written blind: `-D` of a rule that is absent fails the whole restore,
//!   and `-X` of a chain that is still referenced fails too. So the plugin first reads
//!   `iptables-save -t nat` and [`cleanup`] turns what it finds into exactly the commands that
//!   remove our jumps (each saved `-A` line of a jump into our chains, replayed as `-D`, which
//!   matches it by its full specification), then flush and delete our chains. Nothing else is
//!   touched, so rules other tools add concurrently in other chains survive; nothing found means
//!   nothing to do (`None`), which makes DEL idempotent.
//! - [`reapply`] is the same idea for ADD/CHECK repairs: remove the saved jumps and re-declare
//!   (flush) and refill our chains in one commit, so applying twice never duplicates a jump.

use crate::cidr::{Cidr, Family};
use crate::config::{InboundPorts, Mesh, OutboundCidrs, RedirectSpec};

pub const CHAIN_PREFIX: &str = "MESHBYPASS_";
/// Inbound TCP, jumped to from `PREROUTING`.
pub const INBOUND: &str = "MESHBYPASS_INBOUND";
/// REDIRECT to the proxy's inbound port.
pub const IN_REDIRECT: &str = "MESHBYPASS_IN_REDIRECT";
/// Locally generated TCP, jumped to from `OUTPUT`.
pub const OUTPUT: &str = "MESHBYPASS_OUTPUT";
/// REDIRECT to the proxy's outbound port.
pub const REDIRECT: &str = "MESHBYPASS_REDIRECT";
/// Every chain we create, in declaration order.
pub const CHAINS: [&str; 4] = [INBOUND, REDIRECT, IN_REDIRECT, OUTPUT];

/// Istio's HBONE tunnel port: returned first in the inbound chain and never sent back to the
/// proxy's inbound listener from its own outbound side.
const ISTIO_TUNNEL_PORT: u16 = 15008;

/// iptables' `multiport` match takes at most 15 ports.
const MULTIPORT_LIMIT: usize = 15;

/// `iptables-restore --noflush` input that installs the redirect for `family` in a namespace
/// with none of our jumps yet.
pub fn ruleset(spec: &RedirectSpec, family: Family) -> String {
    render(spec, family, &[])
}

/// `iptables-restore --noflush` input that replaces whatever of ours `saved` (the output of
/// `iptables-save -t nat` for the same family) shows with the redirect for `spec`, in one commit.
pub fn reapply(saved: &str, spec: &RedirectSpec, family: Family) -> String {
    let installed = inspect(saved);
    let mut removals: Vec<String> = installed.jumps.iter().map(|jump| delete_of(jump)).collect();
    // Chains of ours that this version no longer declares (none today) are removed as well.
    let stale: Vec<&String> = installed
        .chains
        .iter()
        .filter(|chain| !CHAINS.contains(&chain.as_str()))
        .collect();
    removals.extend(stale.iter().map(|chain| format!("-F {chain}")));
    removals.extend(stale.iter().map(|chain| format!("-X {chain}")));
    render(spec, family, &removals)
}

/// `iptables-restore --noflush` input that removes our jumps and chains found in `saved` (the
/// output of `iptables-save -t nat`), or `None` when there is nothing of ours.
pub fn cleanup(saved: &str) -> Option<String> {
    let installed = inspect(saved);
    if installed.is_empty() {
        return None;
    }
    let mut out = String::from("# meshbypass: remove the redirect\n*nat\n");
    for jump in &installed.jumps {
        out.push_str(&delete_of(jump));
        out.push('\n');
    }
    for chain in &installed.chains {
        out.push_str(&format!("-F {chain}\n"));
    }
    for chain in &installed.chains {
        out.push_str(&format!("-X {chain}\n"));
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// What of ours an `iptables-save` dump of the `nat` table contains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// Our chains (`MESHBYPASS_*`), in the dump's order.
    pub chains: Vec<String>,
    /// Rules outside our chains that jump (or go) to one of ours, as saved (`-A CHAIN …`).
    pub jumps: Vec<String>,
}

impl Installed {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }

    /// Whether every chain [`ruleset`] creates exists and both hooks jump into ours exactly once.
    /// The rules inside are not compared: `iptables-save` normalizes them (e.g. adds `-m tcp`).
    pub fn is_complete(&self) -> bool {
        let has_chains = CHAINS.iter().all(|chain| self.chains.iter().any(|c| c == chain));
        let hooks = |hook: &str, target: &str| {
            self.jumps
                .iter()
                .filter(|jump| {
                    let tokens = tokenize(jump);
                    tokens.get(1).map(String::as_str) == Some(hook) && jump_target(&tokens) == Some(target)
                })
                .count()
        };
        has_chains && hooks("PREROUTING", INBOUND) == 1 && hooks("OUTPUT", OUTPUT) == 1
    }
}

/// Reads the `*nat` section of an `iptables-save` dump.
pub fn inspect(saved: &str) -> Installed {
    let mut installed = Installed::default();
    let mut in_nat = false;
    for line in saved.lines().map(str::trim) {
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        if line == "COMMIT" {
            in_nat = false;
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if is_ours(name) {
                installed.chains.push(name.to_owned());
            }
        } else if line.starts_with("-A ") {
            let tokens = tokenize(line);
            let chain = tokens.get(1).map(String::as_str).unwrap_or_default();
            if !is_ours(chain) && jump_target(&tokens).is_some_and(is_ours) {
                installed.jumps.push(line.to_owned());
            }
        }
    }
    installed
}

fn is_ours(chain: &str) -> bool {
    chain.starts_with(CHAIN_PREFIX)
}

/// The saved `-A CHAIN spec` as `-D CHAIN spec`.
fn delete_of(append: &str) -> String {
    format!("-D {}", &append[3..])
}

/// The target of `-j`/`--jump`/`-g`/`--goto`.
fn jump_target(tokens: &[String]) -> Option<&str> {
    tokens
        .windows(2)
        .find(|pair| matches!(pair[0].as_str(), "-j" | "--jump" | "-g" | "--goto"))
        .map(|pair| pair[1].as_str())
}

/// Splits a saved rule into words the way iptables-restore does: on whitespace, with
/// double-quoted words (comments) kept whole.
fn tokenize(line: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    let mut started = false;
    for c in line.chars() {
        if escaped {
            current.push(c);
            escaped = false;
        } else if c == '\\' && quoted {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
            started = true;
        } else if c.is_whitespace() && !quoted {
            if started {
                tokens.push(std::mem::take(&mut current));
                started = false;
            }
        } else {
            current.push(c);
            started = true;
        }
    }
    if started {
        tokens.push(current);
    }
    tokens
}

/// Lines of one `*nat` commit.
struct Table {
    lines: Vec<String>,
}

impl Table {
    fn rule(&mut self, chain: &str, spec: impl AsRef<str>) {
        self.lines.push(format!("-A {chain} {}", spec.as_ref()));
    }

    fn return_ports(&mut self, chain: &str, ports: &[u16], multiport: bool) {
        if multiport {
            for chunk in ports.chunks(MULTIPORT_LIMIT) {
                let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
                self.rule(
                    chain,
                    format!("-p tcp -m multiport --dports {} -j RETURN", list.join(",")),
                );
            }
        } else {
            for port in ports {
                self.rule(chain, format!("-p tcp --dport {port} -j RETURN"));
            }
        }
    }
}

fn render(spec: &RedirectSpec, family: Family, removals: &[String]) -> String {
    let mut table = Table { lines: Vec::new() };
    inbound(&mut table, spec, family);
    table.rule(
        IN_REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", spec.inbound_port),
    );
    match spec.mesh {
        Mesh::Istio => istio_output(&mut table, spec, family),
        Mesh::Linkerd => linkerd_output(&mut table, spec, family),
    }
    outbound_include(&mut table, spec, family);
    table.rule(
        REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", spec.outbound_port),
    );
    table.rule("PREROUTING", format!("-p tcp -j {INBOUND}"));
    table.rule("OUTPUT", format!("-p tcp -j {OUTPUT}"));

    let mut out = format!(
        "# meshbypass: {} sidecar redirect, {family}; apply with {} --noflush\n*nat\n",
        spec.mesh,
        family.restore_program()
    );
    for chain in CHAINS {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for line in removals.iter().chain(&table.lines) {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

fn of_family(cidrs: &[Cidr], family: Family) -> impl Iterator<Item = &Cidr> {
    cidrs.iter().filter(move |cidr| cidr.family() == family)
}

fn inbound(table: &mut Table, spec: &RedirectSpec, family: Family) {
    for iface in &spec.exclude_interfaces {
        table.rule(INBOUND, format!("-i {iface} -j RETURN"));
    }
    match spec.mesh {
        // istio-cni: the tunnel port first, then the excluded ports (the user's, then the
        // proxy's own 15020/15021/15090 it appends) — but only when all ports are captured.
        Mesh::Istio => {
            table.return_ports(INBOUND, &[ISTIO_TUNNEL_PORT], false);
            let mut excluded = spec.exclude_inbound_ports.clone();
            for port in &spec.reserved_inbound_ports {
                if *port != ISTIO_TUNNEL_PORT && !excluded.contains(port) {
                    excluded.push(*port);
                }
            }
            if spec.include_inbound_ports == InboundPorts::All {
                table.return_ports(INBOUND, &excluded, false);
            }
        }
        // proxy-init: one list of ignored inbound ports (the proxy's 4190/4191 and the
        // user's) in multiport rules.
        Mesh::Linkerd => {
            let mut excluded = spec.reserved_inbound_ports.clone();
            for port in &spec.exclude_inbound_ports {
                if !excluded.contains(port) {
                    excluded.push(*port);
                }
            }
            table.return_ports(INBOUND, &excluded, true);
        }
    }
    for cidr in of_family(&spec.exclude_inbound_cidrs, family) {
        table.rule(INBOUND, format!("-s {cidr} -j RETURN"));
    }
    match &spec.include_inbound_ports {
        InboundPorts::All => table.rule(INBOUND, format!("-p tcp -j {IN_REDIRECT}")),
        InboundPorts::Only(ports) => {
            // An excluded port stays excluded even when listed (Istio ignores exclusions in
            // this mode; a port named in both is more likely a mistake to be safe about).
            for port in ports
                .iter()
                .filter(|port| !spec.exclude_inbound_ports.contains(port))
                .filter(|port| !spec.reserved_inbound_ports.contains(port))
            {
                table.rule(INBOUND, format!("-p tcp --dport {port} -j {IN_REDIRECT}"));
            }
        }
    }
}

/// `(loopback host, inbound passthrough source)` per family, as Istio uses them.
fn istio_loopback(family: Family) -> (&'static str, &'static str) {
    match family {
        Family::V4 => ("127.0.0.1/32", "127.0.0.6/32"),
        Family::V6 => ("::1/128", "::6/128"),
    }
}

fn istio_output(table: &mut Table, spec: &RedirectSpec, family: Family) {
    let (loopback, passthrough) = istio_loopback(family);
    for iface in &spec.exclude_interfaces {
        table.rule(OUTPUT, format!("-o {iface} -j RETURN"));
    }
    table.return_ports(OUTPUT, &spec.exclude_outbound_ports, false);
    // The proxy's inbound passthrough cluster connects to the app from 127.0.0.6 / ::6.
    table.rule(OUTPUT, format!("-o lo -s {passthrough} -j RETURN"));
    // If the user explicitly captures loopback destinations, app-to-self traffic over lo must
    // not be returned early (run.go's HasLoopBackIP).
    let loopback_included = match &spec.include_outbound_cidrs {
        OutboundCidrs::All => false,
        OutboundCidrs::Only(cidrs) => cidrs.iter().any(Cidr::is_loopback),
    };
    let owners = std::iter::once(("--uid-owner", spec.proxy_uid))
        .chain(spec.proxy_gid.map(|gid| ("--gid-owner", gid)));
    for (owner, id) in owners {
        // The proxy calling its own pod IP (app -> proxy -> service VIP -> same pod) goes
        // through the inbound listener.
        table.rule(
            OUTPUT,
            format!(
                "-o lo ! -d {loopback} -p tcp ! --dport {ISTIO_TUNNEL_PORT} -m owner {owner} {id} -j {IN_REDIRECT}"
            ),
        );
        // The app calling itself over lo by its own IP is not the proxy's business.
        if !loopback_included {
            table.rule(OUTPUT, format!("-o lo -m owner ! {owner} {id} -j RETURN"));
        }
        // Everything else the proxy sends leaves as is.
        table.rule(OUTPUT, format!("-m owner {owner} {id} -j RETURN"));
    }
    table.rule(OUTPUT, format!("-d {loopback} -j RETURN"));
    for cidr in of_family(&spec.exclude_outbound_cidrs, family) {
        table.rule(OUTPUT, format!("-d {cidr} -j RETURN"));
    }
}

fn linkerd_output(table: &mut Table, spec: &RedirectSpec, family: Family) {
    for iface in &spec.exclude_interfaces {
        table.rule(OUTPUT, format!("-o {iface} -j RETURN"));
    }
    table.rule(
        OUTPUT,
        format!("-m owner --uid-owner {} -j RETURN", spec.proxy_uid),
    );
    if let Some(gid) = spec.proxy_gid {
        table.rule(OUTPUT, format!("-m owner --gid-owner {gid} -j RETURN"));
    }
    table.rule(OUTPUT, "-o lo -j RETURN");
    table.return_ports(OUTPUT, &spec.exclude_outbound_ports, true);
    for cidr in of_family(&spec.exclude_outbound_cidrs, family) {
        table.rule(OUTPUT, format!("-d {cidr} -j RETURN"));
    }
}

fn outbound_include(table: &mut Table, spec: &RedirectSpec, family: Family) {
    match &spec.include_outbound_cidrs {
        OutboundCidrs::All => table.rule(OUTPUT, format!("-j {REDIRECT}")),
        OutboundCidrs::Only(cidrs) => {
            for cidr in of_family(cidrs, family) {
                table.rule(OUTPUT, format!("-d {cidr} -j {REDIRECT}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::NetConf;

    fn spec(extra: &str) -> RedirectSpec {
        let json = format!(r#"{{"cniVersion":"1.1.0","name":"net","type":"meshbypass"{extra}}}"#);
        NetConf::parse(json.as_bytes())
            .unwrap_or_else(|e| panic!("{json} should parse: {e}"))
            .redirect
    }

    /// The golden cases: name, config fragment, family.
    fn cases() -> Vec<(&'static str, RedirectSpec, Family)> {
        vec![
            ("istio-default", spec(""), Family::V4),
            (
                "istio-ports",
                spec(r#","redirect":{"excludeInboundPorts":[22,8081],"excludeOutboundPorts":[5555,6666]}"#),
                Family::V4,
            ),
            (
                "istio-include-inbound-ports",
                spec(r#","redirect":{"includeInboundPorts":[1111,2222,8081],"excludeInboundPorts":[8081]}"#),
                Family::V4,
            ),
            (
                "istio-cidrs",
                spec(
                    r#","redirect":{"excludeOutboundCidrs":["10.96.0.10/32","fd00::/8"],"includeOutboundCidrs":["10.0.0.0/8","172.16.0.0/12","2001:db8::/32"]}"#,
                ),
                Family::V4,
            ),
            (
                "istio-include-loopback",
                spec(r#","redirect":{"includeOutboundCidrs":["127.0.0.0/8","10.0.0.0/8"]}"#),
                Family::V4,
            ),
            (
                "istio-uid-gid",
                spec(r#","redirect":{"proxyUid":3,"proxyGid":4,"outboundPort":16001,"inboundPort":16006}"#),
                Family::V4,
            ),
            (
                "istio-exclude-interfaces",
                spec(r#","redirect":{"excludeInterfaces":["eth1","net2"]}"#),
                Family::V4,
            ),
            ("istio-ipv6", spec(""), Family::V6),
            (
                "istio-ipv6-cidrs",
                spec(
                    r#","redirect":{"excludeOutboundCidrs":["10.96.0.10/32","fd00::/8"],"includeOutboundCidrs":["10.0.0.0/8","2001:db8::/32"],"excludeInboundPorts":[22]}"#,
                ),
                Family::V6,
            ),
            ("linkerd-default", spec(r#","mesh":"linkerd""#), Family::V4),
            (
                "linkerd-skip",
                spec(
                    r#","mesh":"linkerd","redirect":{"excludeInboundPorts":[25,443,587,3306,4444,4567,4568,5432,6379,9300,11211,11212,11213,11214,11215],"excludeOutboundPorts":[25,3306],"excludeInboundCidrs":["10.0.0.0/8","fd00::/8"],"excludeOutboundCidrs":["169.254.169.254/32"]}"#,
                ),
                Family::V4,
            ),
            (
                "linkerd-include-inbound-ports",
                spec(r#","mesh":"linkerd","redirect":{"includeInboundPorts":[8080,9090],"proxyGid":2102}"#),
                Family::V4,
            ),
            ("linkerd-ipv6", spec(r#","mesh":"linkerd""#), Family::V6),
        ]
    }

    fn testdata() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata")
    }

    fn golden_path(name: &str) -> PathBuf {
        testdata().join(format!("{name}.golden"))
    }

    #[test]
    fn goldens() {
        let update = std::env::var("MESHBYPASS_UPDATE_GOLDEN").is_ok_and(|v| v == "1");
        let mut stale = Vec::new();
        for (name, spec, family) in cases() {
            let got = ruleset(&spec, family);
            let path = golden_path(name);
            if update {
                std::fs::write(&path, &got)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
                continue;
            }
            let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "cannot read {} ({e}); run with MESHBYPASS_UPDATE_GOLDEN=1 to create it",
                    path.display()
                )
            });
            if got != want {
                stale.push(format!("--- {name}: want\n{want}--- {name}: got\n{got}"));
            }
        }
        assert!(
            stale.is_empty(),
            "rulesets differ from their goldens (MESHBYPASS_UPDATE_GOLDEN=1 regenerates):\n{}",
            stale.join("\n")
        );
    }

    fn rules(text: &str) -> Vec<&str> {
        text.lines().filter(|l| l.starts_with("-A ")).collect()
    }

    #[test]
    fn istio_default_matches_istio_cni() {
        // istio-cni's own basic golden (cni/pkg/plugin/testdata/basic.txt.golden), chain names
        // swapped, with istio-iptables' newer `-p tcp ! --dport 15008` on the lo rule.
        let istio = "\
-A MESHBYPASS_INBOUND -p tcp --dport 15008 -j RETURN
-A MESHBYPASS_INBOUND -p tcp --dport 15020 -j RETURN
-A MESHBYPASS_INBOUND -p tcp --dport 15021 -j RETURN
-A MESHBYPASS_INBOUND -p tcp --dport 15090 -j RETURN
-A MESHBYPASS_INBOUND -p tcp -j MESHBYPASS_IN_REDIRECT
-A MESHBYPASS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A MESHBYPASS_OUTPUT -p tcp --dport 15020 -j RETURN
-A MESHBYPASS_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A MESHBYPASS_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j MESHBYPASS_IN_REDIRECT
-A MESHBYPASS_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A MESHBYPASS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESHBYPASS_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j MESHBYPASS_IN_REDIRECT
-A MESHBYPASS_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A MESHBYPASS_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A MESHBYPASS_OUTPUT -d 127.0.0.1/32 -j RETURN
-A MESHBYPASS_OUTPUT -j MESHBYPASS_REDIRECT
-A MESHBYPASS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j MESHBYPASS_INBOUND
-A OUTPUT -p tcp -j MESHBYPASS_OUTPUT";
        let got = ruleset(&spec(""), Family::V4);
        assert_eq!(rules(&got), istio.lines().collect::<Vec<_>>(), "{got}");
        assert!(got.starts_with("# meshbypass"), "{got}");
        assert!(got.contains("\n*nat\n:MESHBYPASS_INBOUND - [0:0]\n"), "{got}");
        assert!(got.ends_with("COMMIT\n"), "{got}");
    }

    #[test]
    fn ipv6_uses_istio_v6_loopbacks_and_only_v6_cidrs() {
        let spec = spec(
            r#","redirect":{"excludeOutboundCidrs":["10.0.0.0/8","fd00::/8"],"includeOutboundCidrs":["10.0.0.0/8","2001:db8::/32"]}"#,
        );
        let v6 = ruleset(&spec, Family::V6);
        assert!(
            v6.contains("-A MESHBYPASS_OUTPUT -o lo -s ::6/128 -j RETURN"),
            "{v6}"
        );
        assert!(v6.contains("-A MESHBYPASS_OUTPUT -d ::1/128 -j RETURN"), "{v6}");
        assert!(v6.contains("-d fd00::/8 -j RETURN"), "{v6}");
        assert!(v6.contains("-d 2001:db8::/32 -j MESHBYPASS_REDIRECT"), "{v6}");
        assert!(!v6.contains("10.0.0.0/8") && !v6.contains("127.0.0"), "{v6}");
        let v4 = ruleset(&spec, Family::V4);
        assert!(!v4.contains("::"), "{v4}");
    }

    #[test]
    fn loopback_include_drops_the_lo_return() {
        let got = ruleset(
            &spec(r#","redirect":{"includeOutboundCidrs":["127.0.0.0/8"]}"#),
            Family::V4,
        );
        assert!(!got.contains("-o lo -m owner !"), "{got}");
        assert!(got.contains("-d 127.0.0.0/8 -j MESHBYPASS_REDIRECT"), "{got}");
    }

    #[test]
    fn linkerd_default_matches_proxy_init() {
        let linkerd = "\
-A MESHBYPASS_INBOUND -p tcp -m multiport --dports 4190,4191 -j RETURN
-A MESHBYPASS_INBOUND -p tcp -j MESHBYPASS_IN_REDIRECT
-A MESHBYPASS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 4143
-A MESHBYPASS_OUTPUT -m owner --uid-owner 2102 -j RETURN
-A MESHBYPASS_OUTPUT -o lo -j RETURN
-A MESHBYPASS_OUTPUT -j MESHBYPASS_REDIRECT
-A MESHBYPASS_REDIRECT -p tcp -j REDIRECT --to-ports 4140
-A PREROUTING -p tcp -j MESHBYPASS_INBOUND
-A OUTPUT -p tcp -j MESHBYPASS_OUTPUT";
        let got = ruleset(&spec(r#","mesh":"linkerd""#), Family::V4);
        assert_eq!(rules(&got), linkerd.lines().collect::<Vec<_>>(), "{got}");
    }

    #[test]
    fn multiport_lists_are_split_at_fifteen() {
        let ports: Vec<String> = (1000..1020).map(|p| p.to_string()).collect();
        let got = ruleset(
            &spec(&format!(
                r#","mesh":"linkerd","redirect":{{"excludeOutboundPorts":[{}]}}"#,
                ports.join(",")
            )),
            Family::V4,
        );
        let multiport: Vec<&str> = got
            .lines()
            .filter(|l| l.starts_with("-A MESHBYPASS_OUTPUT -p tcp -m multiport"))
            .collect();
        assert_eq!(multiport.len(), 2, "{got}");
        assert!(multiport[0].contains(&ports[..15].join(",")), "{got}");
        assert!(multiport[1].contains(&ports[15..].join(",")), "{got}");
    }

    const SAVED: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Jan  1 00:00:00 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j MESHBYPASS_INBOUND_NOT_NAT_SO_IGNORED
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:MESHBYPASS_INBOUND - [0:0]
:MESHBYPASS_IN_REDIRECT - [0:0]
:MESHBYPASS_OUTPUT - [0:0]
:MESHBYPASS_REDIRECT - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A PREROUTING -p tcp -j MESHBYPASS_INBOUND
-A OUTPUT -m comment --comment \"not -j MESHBYPASS_OUTPUT, a comment\" -j CNI-HOSTPORT-DNAT
-A OUTPUT -p tcp -j MESHBYPASS_OUTPUT
-A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 80 -j MESHBYPASS_REDIRECT
-A MESHBYPASS_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A MESHBYPASS_INBOUND -p tcp -j MESHBYPASS_IN_REDIRECT
-A MESHBYPASS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A MESHBYPASS_OUTPUT -j MESHBYPASS_REDIRECT
-A MESHBYPASS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

    #[test]
    fn inspect_finds_our_chains_and_every_jump_into_them() {
        let installed = inspect(SAVED);
        assert_eq!(
            installed.chains,
            vec![
                "MESHBYPASS_INBOUND",
                "MESHBYPASS_IN_REDIRECT",
                "MESHBYPASS_OUTPUT",
                "MESHBYPASS_REDIRECT"
            ]
        );
        assert_eq!(
            installed.jumps,
            vec![
                "-A PREROUTING -p tcp -j MESHBYPASS_INBOUND",
                "-A OUTPUT -p tcp -j MESHBYPASS_OUTPUT",
                "-A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 80 -j MESHBYPASS_REDIRECT",
            ]
        );
        assert!(installed.is_complete());
        assert!(!inspect(&SAVED.replace("-A OUTPUT -p tcp -j MESHBYPASS_OUTPUT\n", "")).is_complete());
        let doubled = SAVED.replace(
            "-A OUTPUT -p tcp -j MESHBYPASS_OUTPUT\n",
            "-A OUTPUT -p tcp -j MESHBYPASS_OUTPUT\n-A OUTPUT -p tcp -j MESHBYPASS_OUTPUT\n",
        );
        assert!(!inspect(&doubled).is_complete(), "a duplicated jump is not clean");
    }

    #[test]
    fn cleanup_removes_exactly_ours() {
        let got = cleanup(SAVED).expect("there is something to remove");
        assert_eq!(
            got,
            "\
# meshbypass: remove the redirect
*nat
-D PREROUTING -p tcp -j MESHBYPASS_INBOUND
-D OUTPUT -p tcp -j MESHBYPASS_OUTPUT
-D CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 80 -j MESHBYPASS_REDIRECT
-F MESHBYPASS_INBOUND
-F MESHBYPASS_IN_REDIRECT
-F MESHBYPASS_OUTPUT
-F MESHBYPASS_REDIRECT
-X MESHBYPASS_INBOUND
-X MESHBYPASS_IN_REDIRECT
-X MESHBYPASS_OUTPUT
-X MESHBYPASS_REDIRECT
COMMIT
"
        );
        let clean = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j CNI-HOSTPORT-DNAT\nCOMMIT\n";
        assert_eq!(cleanup(clean), None);
        assert_eq!(cleanup(""), None);
    }

    #[test]
    fn reapply_replaces_jumps_and_refills_chains() {
        let saved = SAVED.replace(
            ":MESHBYPASS_REDIRECT - [0:0]\n",
            ":MESHBYPASS_REDIRECT - [0:0]\n:MESHBYPASS_OLD - [0:0]\n",
        );
        let got = reapply(&saved, &spec(""), Family::V4);
        let fresh = ruleset(&spec(""), Family::V4);
        let removals = "\
-D PREROUTING -p tcp -j MESHBYPASS_INBOUND
-D OUTPUT -p tcp -j MESHBYPASS_OUTPUT
-D CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 80 -j MESHBYPASS_REDIRECT
-F MESHBYPASS_OLD
-X MESHBYPASS_OLD
";
        let declarations_end = fresh.find("-A ").expect("rules follow the declarations");
        let expected = format!(
            "{}{removals}{}",
            &fresh[..declarations_end],
            &fresh[declarations_end..]
        );
        assert_eq!(got, expected);
        assert_eq!(reapply("", &spec(""), Family::V4), fresh);
    }

    #[test]
    fn tokenizer_keeps_quoted_words() {
        assert_eq!(
            tokenize(r#"-A OUTPUT -m comment --comment "a \"b\" -j X" -j Y"#),
            vec![
                "-A",
                "OUTPUT",
                "-m",
                "comment",
                "--comment",
                r#"a "b" -j X"#,
                "-j",
                "Y"
            ]
        );
        assert_eq!(
            tokenize(r#"-m comment --comment """#),
            vec!["-m", "comment", "--comment", ""]
        );
    }

    /// Privileged checks, run as root (as in CI, where `ip` and both iptables backends must be
    /// there; elsewhere they skip and say so): every golden is accepted by the real
    /// `iptables-restore`, and apply / reapply / cleanup behave on a real table in a throwaway
    /// network namespace.
    mod privileged {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        use std::sync::atomic::{AtomicU32, Ordering};

        use super::*;

        struct Netns(String);

        impl Netns {
            fn new(tag: &str) -> Netns {
                static SEQ: AtomicU32 = AtomicU32::new(0);
                let name = format!(
                    "mbx-{tag}-{}-{}",
                    std::process::id(),
                    SEQ.fetch_add(1, Ordering::Relaxed)
                );
                let status = Command::new("ip")
                    .args(["netns", "add", &name])
                    .status()
                    .unwrap_or_else(|e| panic!("cannot run ip netns add: {e}"));
                assert!(status.success(), "ip netns add {name} failed");
                Netns(name)
            }

            fn run(&self, program: &str, args: &[&str], stdin: &str) -> Result<String, String> {
                let mut child = Command::new("ip")
                    .args(["netns", "exec", &self.0, program])
                    .args(args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
                child
                    .stdin
                    .take()
                    .expect("stdin is piped")
                    .write_all(stdin.as_bytes())
                    .unwrap_or_else(|e| panic!("cannot feed {program}: {e}"));
                let out = child
                    .wait_with_output()
                    .unwrap_or_else(|e| panic!("cannot wait for {program}: {e}"));
                if out.status.success() {
                    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).into_owned())
                }
            }

            fn restore(&self, tools: &Tools, input: &str) {
                if let Err(stderr) = self.run(&tools.restore, &["--noflush", "-w"], input) {
                    panic!("{} rejected:\n{input}\n{stderr}", tools.restore);
                }
            }

            fn save(&self, tools: &Tools) -> String {
                self.run(&tools.save, &["-t", "nat"], "")
                    .unwrap_or_else(|stderr| panic!("{} failed: {stderr}", tools.save))
            }
        }

        /// The restore/save pair of one family and backend (`""` for the default, nft here,
        /// or `"-legacy"`).
        struct Tools {
            restore: String,
            save: String,
        }

        impl Tools {
            fn new(family: Family, backend: &str) -> Tools {
                let base = |program: &str| program.replacen("tables", &format!("tables{backend}"), 1);
                Tools {
                    restore: base(family.restore_program()),
                    save: base(family.save_program()),
                }
            }

            /// Both tools, or a failure naming the missing one: Debian's iptables package has
            /// both backends, and scripts/deps.sh installs it.
            fn require(&self) {
                for tool in [&self.restore, &self.save] {
                    let runs = Command::new(tool)
                        .arg("--version")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|status| status.success());
                    assert!(runs, "{tool} is missing: scripts/deps.sh installs iptables");
                }
            }
        }

        impl Drop for Netns {
            fn drop(&mut self) {
                match Command::new("ip").args(["netns", "del", &self.0]).status() {
                    Ok(status) if status.success() => {}
                    Ok(status) => eprintln!("ip netns del {} exited {status}", self.0),
                    Err(e) => eprintln!("cannot run ip netns del {}: {e}", self.0),
                }
            }
        }

        /// Root (else the test skips, saying so), then `ip`, which must be there: as root a
        /// missing tool is a failure, not a skip.
        #[track_caller]
        fn available() -> bool {
            if !meshbypass_tests::privileged() {
                return false;
            }
            let ip = Command::new("ip")
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            assert!(ip, "ip is missing: scripts/deps.sh installs iproute2");
            true
        }

        const BACKENDS: [(Family, &str); 4] = [
            (Family::V4, ""),
            (Family::V6, ""),
            (Family::V4, "-legacy"),
            (Family::V6, "-legacy"),
        ];

        #[test]
        fn goldens_are_valid_restore_input() {
            if !available() {
                return;
            }
            for backend in ["", "-legacy"] {
                let ns = Netns::new("golden");
                for (name, spec, family) in cases() {
                    let tools = Tools::new(family, backend);
                    tools.require();
                    let input = ruleset(&spec, family);
                    if let Err(stderr) = ns.run(&tools.restore, &["--noflush", "--test", "-w"], &input) {
                        panic!("golden {name} is rejected by {}:\n{stderr}", tools.restore);
                    }
                }
            }
        }

        #[test]
        fn apply_reapply_cleanup_on_a_real_table() {
            if !available() {
                return;
            }
            for (family, backend) in BACKENDS {
                let tools = Tools::new(family, backend);
                tools.require();
                let what = format!("{family}{backend}");
                let foreign = "-A OUTPUT -p udp --dport 9999 -j RETURN";
                let ns = Netns::new("apply");
                let other = format!(
                    "*nat\n:OTHER_CHAIN - [0:0]\n-A OTHER_CHAIN -p udp -j RETURN\n-A PREROUTING -j OTHER_CHAIN\n{foreign}\nCOMMIT\n"
                );
                ns.restore(&tools, &other);
                let spec = spec(r#","redirect":{"excludeOutboundCidrs":["10.0.0.0/8","fd00::/8"]}"#);

                ns.restore(&tools, &ruleset(&spec, family));
                let saved = ns.save(&tools);
                assert!(inspect(&saved).is_complete(), "{what} after apply:\n{saved}");

                // Twice more: jumps never duplicate, our chains are refilled, not appended to.
                for _ in 0..2 {
                    let saved = ns.save(&tools);
                    ns.restore(&tools, &reapply(&saved, &spec, family));
                }
                let saved = ns.save(&tools);
                assert!(inspect(&saved).is_complete(), "{what} after reapply:\n{saved}");
                let redirects = saved.matches("-j REDIRECT --to-ports 15001").count();
                assert_eq!(redirects, 1, "{what} chains were refilled:\n{saved}");

                let removal = cleanup(&saved).expect("ours is installed");
                ns.restore(&tools, &removal);
                let after = ns.save(&tools);
                assert!(inspect(&after).is_empty(), "{what} after cleanup:\n{after}");
                assert!(!after.contains(CHAIN_PREFIX), "{what}:\n{after}");
                assert!(after.contains("-A PREROUTING -j OTHER_CHAIN"), "{what}:\n{after}");
                assert!(after.contains(":OTHER_CHAIN"), "{what}:\n{after}");
                assert!(after.contains("--dport 9999 -j RETURN"), "{what}:\n{after}");
                assert_eq!(cleanup(&after), None, "{what}: nothing left to remove");
            }
        }
    }
}
