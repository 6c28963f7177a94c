//! The side-by-side mesh: a client pod and a server pod on a simulated node
//! (bridge + host-local + meshbypass through `conflist/bridge.conflist`),
//! nginx as the app, HAProxy sidecars as UID 1337 on Istio's ports, wrk as
//! the load. Port 8080 goes through the sidecars; port 8081 is excluded from
//! the redirect, so "no mesh" runs on the same pods. The acceleration mode
//! is switched between runs by re-registering the pods.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use meshbypass_ebpf::{Counter, Mode, PodEntry};
use meshbypass_tests::{
    Peer,
    node::{Sidecar, SimNode, SimPod},
    unique,
};
use serde::Serialize;
use serde_json::json;

/// Which path a request takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// Client app -> server app (port 8081, not redirected).
    Direct,
    /// Client app -> client sidecar -> server sidecar -> server app.
    Sidecars,
    /// Client app -> a second client sidecar on loopback -> unix socket ->
    /// a second server sidecar -> unix socket -> server app: the cheapest
    /// kernel IPC between the proxies, a reference and not a product mode.
    Unix,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct MeshMode {
    pub name: &'static str,
    pub route: Route,
    #[serde(skip)]
    pub accel: Mode,
}

pub const NO_MESH: MeshMode = MeshMode {
    name: "no mesh",
    route: Route::Direct,
    accel: Mode::Off,
};
pub const NO_MESH_BYPASS: MeshMode = MeshMode {
    name: "no mesh + bypass(all)",
    route: Route::Direct,
    accel: Mode::All,
};
pub const SIDECAR: MeshMode = MeshMode {
    name: "sidecar",
    route: Route::Sidecars,
    accel: Mode::Off,
};
pub const SIDECAR_ALL: MeshMode = MeshMode {
    name: "sidecar + bypass(all)",
    route: Route::Sidecars,
    accel: Mode::All,
};
pub const SIDECAR_PROXY_ONLY: MeshMode = MeshMode {
    name: "sidecar + bypass(proxy-only)",
    route: Route::Sidecars,
    accel: Mode::ProxyOnly,
};
pub const SIDECAR_AUTO: MeshMode = MeshMode {
    name: "sidecar + bypass(auto)",
    route: Route::Sidecars,
    accel: Mode::Auto,
};
pub const SIDECAR_ADAPTIVE: MeshMode = MeshMode {
    name: "sidecar + bypass(adaptive)",
    route: Route::Sidecars,
    accel: Mode::Adaptive,
};

/// The reference: the same sidecars (HAProxy, HTTP) joined by unix sockets
/// instead of TCP on two of the three legs (`--reference`).
pub const REFERENCE_UNIX: MeshMode = MeshMode {
    name: "reference: unix-socket hops",
    route: Route::Unix,
    accel: Mode::Off,
};

/// The client-side listener of the unix-socket reference (loopback, not redirected).
const UNIX_REF_PORT: u16 = 15101;

/// One load shape.
#[derive(Clone, Debug, Serialize)]
pub struct Load {
    pub name: String,
    pub conns: u32,
    /// File served: 64, 1k, 16k, 64k (bytes).
    pub size: &'static str,
    /// A new connection per request.
    pub close: bool,
}

impl Load {
    pub fn keepalive(conns: u32, size: &'static str) -> Self {
        Self {
            name: format!("c{conns} {size}"),
            conns,
            size,
            close: false,
        }
    }

    pub fn per_request(conns: u32, size: &'static str) -> Self {
        Self {
            name: format!("c{conns} {size} conn/req"),
            conns,
            size,
            close: true,
        }
    }
}

/// One measured run.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Busy CPU time of the whole machine per request.
    pub cpu_us_per_req: f64,
    pub redirected_msgs: u64,
    pub passthrough_msgs: u64,
    pub sidecar_sessions: u64,
    /// The mode did what it claims (sidecars crossed or not, bypass used or not, no errors).
    pub verified: bool,
    pub problem: Option<String>,
}

const SIZES: [(&str, usize); 4] = [("64", 64), ("1k", 1024), ("16k", 16 * 1024), ("64k", 64 * 1024)];

const REPORT_LUA: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "MBJSON {\"requests\":%d,\"duration_us\":%d,\"errors\":%d,\"p50\":%d,\"p99\":%d,\"p999\":%d}\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// The running mesh. Fields drop in order: processes, then pods, then node.
pub struct Mesh {
    nginx: Peer,
    pub sidecar_client: Sidecar,
    pub sidecar_server: Sidecar,
    unix_client: Sidecar,
    /// Held for its lifetime: the reference's server-side proxy.
    _unix_server: Sidecar,
    pub client: SimPod,
    pub server: SimPod,
    pub node: SimNode,
    dir: PathBuf,
}

impl Mesh {
    /// Builds the node and the pods, starts nginx and the sidecars, and
    /// records the kernel's selftest verdict (what `auto` follows).
    pub fn start(selftest: bool) -> Self {
        let tag = unique("m");
        let n = std::process::id() % 200 + 20;
        let run = PathBuf::from(format!("/run/meshbypass-bench-{tag}"));
        let node = SimNode::new("bridge.conflist", |c| {
            c["name"] = json!("meshbypass-bench");
            let plugins = c["plugins"].as_array_mut().unwrap();
            for p in plugins {
                match p["type"].as_str() {
                    Some("bridge") => {
                        p["bridge"] = json!(format!("mbb{}", n));
                        p["ipam"]["ranges"] = json!([[{ "subnet": format!("10.224.{n}.0/24") }]]);
                        p["ipam"]["dataDir"] = json!(run.join("ipam"));
                    }
                    Some("meshbypass") => {
                        p["bpfRoot"] = json!(format!("/sys/fs/bpf/meshbypass-bench-{tag}"));
                        p["stateDir"] = json!(run.join("state"));
                        p["logFile"] = json!(run.join("meshbypass.log"));
                        p["logLevel"] = json!("info");
                        p["redirect"] =
                            json!({"excludeInboundPorts": [8081], "excludeOutboundPorts": [8081]});
                    }
                    _ => {}
                }
            }
        });
        let mut server = SimPod::new("srv", false);
        let mut client = SimPod::new("cli", true);
        server.add(&node);
        client.add(&node);
        if selftest {
            let exe = meshbypass_tests::sibling_bin("meshbypass-node");
            let report = meshbypass_ebpf::selftest::run(&exe, Duration::from_secs(30)).expect("selftest");
            node.node().record_verdict(&report).expect("record the verdict");
        }

        let dir = std::env::temp_dir().join(&tag);
        let docroot = dir.join("www");
        std::fs::create_dir_all(&docroot).unwrap();
        for (name, len) in SIZES {
            let body: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            std::fs::write(docroot.join(name), body).unwrap();
        }
        std::fs::write(dir.join("report.lua"), REPORT_LUA).unwrap();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process on;\nworker_processes 1;\nuser nobody nogroup;\n\
                 pid {}/nginx.pid;\nerror_log {}/error.log;\nevents {{ worker_connections 4096; }}\n\
                 http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 1000000;\n\
                 server {{\n    listen 8080 reuseport;\n    listen 8081 reuseport;\n    listen unix:{}/nginx.sock;\n    root {};\n  }}\n}}\n",
                dir.display(),
                dir.display(),
                dir.display(),
                docroot.display()
            ),
        )
        .unwrap();
        // nginx's workers run as nobody: the tree must be readable.
        for p in [&dir, &docroot] {
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let nginx = server.spawn(None, "nginx", &["-c", conf.to_str().unwrap()]);
        server.wait_listen(8080);
        server.wait_listen(8081);
        let sidecar_server = Sidecar::start(&server, 15006, "127.0.0.1:8080", true);
        let sidecar_client = Sidecar::start(&client, 15001, &format!("{}:8080", server.ip()), true);
        // The unix-socket reference: nginx's socket is root's, the proxy is 1337.
        let nginx_sock = dir.join("nginx.sock");
        wait_path(&nginx_sock);
        std::fs::set_permissions(&nginx_sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
        let hop = dir.join("sidecar.sock");
        let unix_server = Sidecar::start_addr(
            &server,
            &format!("unix@{}", hop.display()),
            &format!("unix@{}", nginx_sock.display()),
            true,
        );
        wait_path(&hop);
        let unix_client = Sidecar::start_addr(
            &client,
            &format!("127.0.0.1:{UNIX_REF_PORT}"),
            &format!("unix@{}", hop.display()),
            true,
        );
        client.wait_listen(UNIX_REF_PORT);
        Self {
            nginx,
            sidecar_client,
            sidecar_server,
            unix_client,
            _unix_server: unix_server,
            client,
            server,
            node,
            dir,
        }
    }

    /// Sessions so far on the sidecar where `route`'s requests enter.
    fn entry_sessions(&self, route: Route) -> u64 {
        match route {
            Route::Unix => self.unix_client.sessions(),
            Route::Direct | Route::Sidecars => self.sidecar_client.sessions(),
        }
    }

    /// Re-registers both pods with `mode` (new connections follow it).
    pub fn set_mode(&self, mode: Mode) {
        let mut node = self.node.node();
        for pod in node.pods() {
            node.register_pod(&PodEntry { mode, ..pod })
                .expect("re-register the pod");
        }
    }

    /// Restarts both sidecars: their pooled upstream connections were
    /// classified under the previous mode, and a connection keeps the mode
    /// it was established in.
    fn restart_sidecars(&mut self) {
        let upstream = format!("{}:8080", self.server.ip());
        // Old ones first: the ports must be free.
        self.sidecar_client.peer.terminate();
        self.sidecar_server.peer.terminate();
        self.sidecar_server = Sidecar::start(&self.server, 15006, "127.0.0.1:8080", true);
        self.sidecar_client = Sidecar::start(&self.client, 15001, &upstream, true);
    }

    /// One wrk run of `load` in `mode` for `secs` seconds, on fresh
    /// connections everywhere.
    pub fn run(&mut self, mode: &MeshMode, load: &Load, secs: u32) -> Sample {
        self.set_mode(mode.accel);
        self.restart_sidecars();
        let url = match mode.route {
            Route::Direct => format!("http://{}:8081/{}", self.server.ip(), load.size),
            Route::Sidecars => format!("http://{}:8080/{}", self.server.ip(), load.size),
            Route::Unix => format!("http://127.0.0.1:{UNIX_REF_PORT}/{}", load.size),
        };
        let threads = load.conns.clamp(1, 2).to_string();
        let conns = load.conns.to_string();
        let dur = format!("{secs}s");
        let script = self.dir.join("report.lua");
        let mut args = vec![
            "-t",
            &threads,
            "-c",
            &conns,
            "-d",
            &dur,
            "--timeout",
            "5s",
            "-s",
            script.to_str().unwrap(),
        ];
        if load.close {
            args.extend(["-H", "Connection: close"]);
        }
        args.push(&url);
        let sessions_before = self.entry_sessions(mode.route);
        let counters_before = self.node.counters();
        let cpu_before = busy_cpu_us();
        let started = Instant::now();
        let profile = profile_start(mode, load, secs);
        let (ok, lines) = self
            .client
            .spawn(None, "wrk", &args)
            .finish_lines(Duration::from_secs(secs as u64 + 30));
        let wall = started.elapsed();
        profile_finish(profile);
        let cpu = busy_cpu_us() - cpu_before;
        let redirected =
            self.node.counters().get(Counter::RedirectedMsgs) - counters_before.get(Counter::RedirectedMsgs);
        let counters_after = self.node.counters();
        let passthrough =
            counters_after.get(Counter::PassthroughMsgs) - counters_before.get(Counter::PassthroughMsgs);
        let sessions = self.entry_sessions(mode.route) - sessions_before;
        let report = lines
            .iter()
            .find_map(|l| l.strip_prefix("MBJSON "))
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok());
        let Some(r) = report.filter(|_| ok) else {
            return Sample {
                requests: 0,
                errors: 1,
                rps: 0.0,
                p50_us: 0.0,
                p99_us: 0.0,
                p999_us: 0.0,
                cpu_us_per_req: 0.0,
                redirected_msgs: redirected,
                passthrough_msgs: passthrough,
                sidecar_sessions: sessions,
                verified: false,
                problem: Some(format!("wrk failed: {lines:?}")),
            };
        };
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let requests = r["requests"].as_u64().unwrap_or(0);
        let errors = r["errors"].as_u64().unwrap_or(0);
        let secs_run = (f("duration_us") / 1e6).max(wall.as_secs_f64() * 0.5);
        let mut problem = None;
        if errors > 0 {
            problem = Some(format!("{errors} request errors"));
        } else if requests == 0 {
            problem = Some("no requests".into());
        } else if (mode.route != Route::Direct) != (sessions > 0) {
            problem = Some(format!("sidecar sessions {sessions} for route {:?}", mode.route));
        } else if (mode.accel != Mode::Off) != (redirected > 0) {
            problem = Some(format!(
                "{redirected} messages redirected in mode {}",
                mode.accel.as_str()
            ));
        }
        Sample {
            requests,
            errors,
            rps: requests as f64 / secs_run,
            p50_us: f("p50"),
            p99_us: f("p99"),
            p999_us: f("p999"),
            cpu_us_per_req: cpu as f64 / requests.max(1) as f64,
            redirected_msgs: redirected,
            passthrough_msgs: passthrough,
            sidecar_sessions: sessions,
            verified: problem.is_none(),
            problem,
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.nginx.terminate();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup {}: {e}", self.dir.display());
        }
    }
}

/// Waits until `path` exists (a unix socket being bound).
fn wait_path(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Busy CPU time of the machine so far (all CPUs), in microseconds.
fn busy_cpu_us() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (total - idle) * 1_000_000 / hz
}

/// The median of `xs` (0 for none).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

/// With `MESHBYPASS_BENCH_PERF=DIR`, each run is profiled system-wide
/// (`perf record -a -g`) into `DIR/<load>--<mode>.data`, for `perf report`.
fn profile_start(mode: &MeshMode, load: &Load, secs: u32) -> Option<std::process::Child> {
    let dir = std::env::var_os("MESHBYPASS_BENCH_PERF")?;
    let name: String = format!("{}--{}", load.name, mode.name)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let out = std::path::Path::new(&dir).join(format!("{name}.data"));
    std::fs::create_dir_all(&dir).ok()?;
    std::process::Command::new("perf")
        .args(["record", "-a", "-g", "-q", "-o"])
        .arg(&out)
        .args(["--", "sleep", &secs.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("perf record: {e}"))
        .ok()
}

fn profile_finish(child: Option<std::process::Child>) {
    if let Some(mut c) = child
        && let Err(e) = c.wait()
    {
        eprintln!("perf record: {e}");
    }
}
