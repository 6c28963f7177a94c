//! The static build and the node image, as root:
//!
//! * the musl binaries (`scripts/build-static.sh`, which `scripts/test.sh`
//!   runs before the tests) have no ELF interpreter and no shared library,
//!   the plugin the static agent installs runs (`VERSION`);
//! * the image `scripts/image.sh` builds from them (`FROM scratch`, podman,
//!   no registry) runs the agent privileged on the host network against
//!   scratch conf/bin directories and a private bpf root: the plugin is
//!   copied and chained, `/readyz` answers, and stopping the container
//!   (SIGTERM) leaves the entry in place.
//!
//! Every name (image tag, container, bpf root, port) is unique to this run
//! and removed by a guard, also when a test fails.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

const EXE: &str = env!("CARGO_BIN_EXE_meshbypass-node");
const MUSL: &str = "x86_64-unknown-linux-musl";

/// The static build of `name` (`<target>/x86_64-unknown-linux-musl/release`).
fn static_bin(name: &str) -> PathBuf {
    let target = Path::new(EXE)
        .parent()
        .and_then(Path::parent)
        .expect("the target dir");
    let p = target.join(MUSL).join("release").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/build-static.sh first (scripts/test.sh does)",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// What the ELF file says about dynamic linking: its interpreter (PT_INTERP)
/// and the libraries it needs (DT_NEEDED), read from the headers.
#[derive(Debug, PartialEq, Eq)]
struct Linking {
    interpreter: Option<String>,
    needed: usize,
}

fn linking(path: &Path) -> Linking {
    let elf = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        elf.len() > 64 && elf[..4] == *b"\x7fELF" && elf[4] == 2 && elf[5] == 1,
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().expect("2 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| {
        usize::try_from(u64::from_le_bytes(elf[o..o + 8].try_into().expect("8 bytes"))).expect("an offset")
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20), usize::from(u16_at(0x36)), usize::from(u16_at(0x38)));
    let mut out = Linking {
        interpreter: None,
        needed: 0,
    };
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (kind, offset, size) = (u32_at(ph), u64_at(ph + 8), u64_at(ph + 32));
        match kind {
            // PT_INTERP: the path of the dynamic loader, NUL-terminated.
            3 => {
                let raw = &elf[offset..offset + size];
                out.interpreter = Some(String::from_utf8_lossy(raw).trim_end_matches('\0').to_owned());
            }
            // PT_DYNAMIC: (tag, value) pairs up to DT_NULL; DT_NEEDED is 1.
            2 => {
                for entry in elf[offset..offset + size].chunks_exact(16) {
                    match u64::from_le_bytes(entry[..8].try_into().expect("8 bytes")) {
                        0 => break,
                        1 => out.needed += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn ldd(path: &Path) -> String {
    let out = run(Command::new("ldd").arg(path));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A private bpf root, unloaded (by the host build of the agent) on drop.
struct BpfRoot(PathBuf);

impl BpfRoot {
    fn new(tag: &str) -> Self {
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/mbtest-{tag}-{}",
            std::process::id()
        )))
    }
}

impl Drop for BpfRoot {
    fn drop(&mut self) {
        if self.0.exists() {
            let out = Command::new(EXE)
                .arg("unload")
                .arg("--bpf-root")
                .arg(&self.0)
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "cleanup: unload {}: {}",
                    self.0.display(),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("cleanup: unload {}: {e}", self.0.display()),
            }
        }
    }
}

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

fn our_entry(primary: &Path) -> Option<Value> {
    let doc: Value = serde_json::from_slice(&fs::read(primary).ok()?).ok()?;
    doc["plugins"]
        .as_array()?
        .last()
        .filter(|p| p["type"] == "meshbypass")
        .cloned()
}

#[test]
fn static_binaries_have_no_dynamic_dependencies_and_the_installed_plugin_runs() {
    // It loads BPF programs and runs containers.
    if !meshbypass_tests::privileged() {
        return;
    }
    // The check itself: the glibc build of the agent is dynamic, and says so.
    let dynamic = linking(Path::new(EXE));
    assert!(
        dynamic.interpreter.is_some() && dynamic.needed > 0,
        "the ELF reader misses what makes {EXE} dynamic: {dynamic:?}"
    );
    assert!(ldd(Path::new(EXE)).contains("libc.so"), "ldd on the glibc build");

    for name in ["meshbypass", "meshbypass-node"] {
        let bin = static_bin(name);
        assert_eq!(
            linking(&bin),
            Linking {
                interpreter: None,
                needed: 0
            },
            "{} links dynamically",
            bin.display()
        );
        let says = ldd(&bin);
        assert!(
            says.contains("statically linked") || says.contains("not a dynamic executable"),
            "ldd {}: {says}",
            bin.display()
        );
        eprintln!(
            "{}: {} bytes, ldd: {}",
            bin.display(),
            fs::metadata(&bin).expect("stat").len(),
            says.trim()
        );
    }

    // The static agent installs the static plugin; what lands in the bin
    // dir is static and runs.
    let tmp = tempfile::tempdir().expect("temp dir");
    let (conf, bin) = (tmp.path().join("net.d"), tmp.path().join("bin"));
    fs::create_dir_all(&conf).expect("conf dir");
    let primary = write_primary(&conf);
    let root = BpfRoot::new("static");
    let host_args = |cmd: &mut Command| {
        cmd.arg("--bpf-root")
            .arg(&root.0)
            .arg("--cni-conf-dir")
            .arg(&conf)
            .arg("--cni-bin-dir")
            .arg(&bin);
    };
    let mut install = Command::new(static_bin("meshbypass-node"));
    install
        .args(["install", "--no-selftest", "--plugin-binary"])
        .arg(static_bin("meshbypass"));
    host_args(&mut install);
    ok(&mut install);
    let installed = bin.join("meshbypass");
    assert!(
        our_entry(&primary).is_some(),
        "the static agent did not chain the plugin"
    );
    assert_eq!(
        linking(&installed),
        Linking {
            interpreter: None,
            needed: 0
        },
        "the installed plugin links dynamically"
    );
    let mut child = Command::new(&installed)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running the installed plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(br#"{"cniVersion": "1.0.0"}"#)
        .expect("writing stdin");
    let out = child.wait_with_output().expect("waiting for the plugin");
    assert!(out.status.success(), "VERSION failed: {out:?}");
    let version: Value = serde_json::from_slice(&out.stdout).expect("VERSION prints JSON");
    let supported = version["supportedVersions"]
        .as_array()
        .expect("supportedVersions");
    assert!(supported.contains(&json!("1.0.0")), "VERSION: {version}");
    let mut uninstall = Command::new(static_bin("meshbypass-node"));
    uninstall.args(["uninstall", "--cleanup"]);
    host_args(&mut uninstall);
    ok(&mut uninstall);
    assert!(!installed.exists(), "uninstall left the plugin");
}

/// The image and its container, removed by name on drop.
struct Image {
    tag: String,
    container: String,
}

impl Drop for Image {
    fn drop(&mut self) {
        for args in [
            vec!["rm", "--force", "--time", "0", self.container.as_str()],
            vec!["rmi", "--force", self.tag.as_str()],
        ] {
            match Command::new("podman").args(&args).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!("cleanup: podman {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
                Err(e) => eprintln!("cleanup: podman {args:?}: {e}"),
            }
        }
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_path_buf()
}

/// `--ulimit` values no higher than this process's own hard limits, and at
/// most 4096 (plenty for the agent): podman otherwise sets RLIMIT_NOFILE and
/// RLIMIT_NPROC above what it may itself raise to where root lacks
/// CAP_SYS_RESOURCE (this machine's sandbox: runc fails with EPERM).
/// Lowering a limit needs no privilege anywhere.
fn ulimits() -> Vec<String> {
    let get = |resource, name: &str| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into `lim`.
        let rc = unsafe { libc::getrlimit(resource, &mut lim) };
        assert_eq!(rc, 0, "getrlimit({name}): {}", std::io::Error::last_os_error());
        let v = lim.rlim_max.min(4096);
        format!("{name}={v}:{v}")
    };
    vec![
        "--ulimit".into(),
        get(libc::RLIMIT_NOFILE, "nofile"),
        "--ulimit".into(),
        get(libc::RLIMIT_NPROC, "nproc"),
    ]
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_owned()))
}

#[test]
fn the_image_installs_chains_serves_and_stays_on_stop() {
    // It loads BPF programs and runs containers.
    if !meshbypass_tests::privileged() {
        return;
    }
    assert!(
        run(Command::new("podman").arg("--version")).status.success(),
        "podman is missing: scripts/deps.sh installs it"
    );
    let plugin = fs::read(static_bin("meshbypass")).expect("the static plugin");
    static_bin("meshbypass-node");
    let id = std::process::id();
    let image = Image {
        tag: format!("localhost/mbtest-node:{id}"),
        container: format!("mbtest-node-{id}"),
    };
    let built = ok(Command::new(repo().join("scripts/image.sh")).args(["--no-build", "--tag", &image.tag]));
    assert_eq!(built.trim(), image.tag, "scripts/image.sh printed {built:?}");

    let tmp = tempfile::tempdir().expect("temp dir");
    let (conf, bin) = (tmp.path().join("net.d"), tmp.path().join("bin"));
    for d in [&conf, &bin] {
        fs::create_dir_all(d).expect("making a host dir");
    }
    let primary = write_primary(&conf);
    let root = BpfRoot::new("image");
    let port = free_port();
    let mount = |from: &Path, to: &str| format!("{}:{to}", from.display());
    let mut cmd = Command::new("podman");
    cmd.args([
        "run",
        "--detach",
        "--name",
        &image.container,
        "--privileged",
        "--network",
        "host",
    ])
    .args(ulimits())
    .args(["--volume", &mount(&conf, "/etc/cni/net.d")])
    .args(["--volume", &mount(&bin, "/opt/cni/bin")])
    .args(["--volume", "/sys/fs/bpf:/sys/fs/bpf"])
    .arg(&image.tag)
    .args([
        "run",
        "--no-selftest",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--bpf-root",
    ])
    .arg(&root.0);
    ok(&mut cmd);
    let logs = || {
        let out = run(Command::new("podman").args(["logs", &image.container]));
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };

    wait_for(
        Duration::from_secs(60),
        "the plugin chained by the container",
        || our_entry(&primary).is_some(),
    );
    assert_eq!(
        fs::read(bin.join("meshbypass")).expect("the copied plugin"),
        plugin,
        "the container copied something else than the image's plugin"
    );
    assert_eq!(
        our_entry(&primary),
        Some(json!({"type": "meshbypass", "bpfRoot": root.0})),
        "the chained entry"
    );
    wait_for(Duration::from_secs(30), "/readyz 200 from the container", || {
        get(port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    assert!(
        root.0.join("mb_config").exists(),
        "the container did not load the maps"
    );

    // Stopping the container is a SIGTERM outside a cluster: the plugin stays.
    let chained = fs::read(&primary).expect("the conflist");
    ok(Command::new("podman").args(["stop", "--time", "20", &image.container]));
    let code =
        ok(Command::new("podman").args(["inspect", "--format", "{{.State.ExitCode}}", &image.container]));
    let said = logs();
    assert_eq!(code.trim(), "0", "the agent's exit code; its log:\n{said}");
    assert_eq!(
        fs::read(&primary).expect("the conflist"),
        chained,
        "stopping the container changed the conflist; its log:\n{said}"
    );
    assert!(
        bin.join("meshbypass").exists(),
        "stopping the container removed the plugin"
    );
    assert!(
        said.contains("SIGTERM: not running in a Kubernetes pod"),
        "the agent's log does not say why the plugin stays:\n{said}"
    );
}
