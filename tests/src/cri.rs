//! A real container runtime on this host, driven the way kubelet drives it:
//! Debian's containerd (CRI plugin, runc, the native snapshotter) with its
//! own root, state directory and socket, a CNI conf dir holding one of our
//! conflists, and pods created through the CRI API (`RunPodSandbox` with
//! kubelet's metadata and cgroupfs `cgroup_parent`). containerd's own libcni
//! then runs the chain with the real CNI_ARGS.
//!
//! Everything is named uniquely and removed by its guard, also on panic:
//! sandboxes are stopped and removed through CRI, containerd is stopped by
//! PID (its shims and any container left behind by their IDs), every mount
//! under its directories is detached, and the pods' cgroups go with their
//! pods.

use std::{
    cell::RefCell,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use meshbypass_cri_client::{Cri, api};
use meshbypass_ebpf::chain::error_chain;
use serde_json::{Value, json};

use crate::{
    KubeCgroup, Netns, cni::Attachment, node::SimPod, require_root, sh, sibling_bin, unique, wait_for,
};

/// The pause image: busybox's `sleep` as the sandbox's only process.
pub const PAUSE_IMAGE: &str = "meshbypass.test/pause:1";

/// How long one CRI call may take (RunPodSandbox runs the whole CNI chain).
const CRI_TIMEOUT: Duration = Duration::from_secs(60);

/// A containerd of our own, stopped and cleaned on drop.
pub struct Containerd {
    pub name: String,
    /// `root` (persistent data) under /var/lib.
    pub root: PathBuf,
    /// `state` (sockets, mounts, runc's state) under /run.
    pub state: PathBuf,
    pub socket: PathBuf,
    /// Config, CNI conf dir, CNI bin dir, image build, log.
    pub dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub log: PathBuf,
    cri: Option<Cri>,
    child: Child,
    /// Sandbox netns created by containerd (removed if containerd did not).
    netns: RefCell<Vec<PathBuf>>,
    /// /run/containerd did not exist before us (the shims put their sockets
    /// under /run/containerd/s whatever the state dir).
    made_run_containerd: bool,
}

impl Containerd {
    /// Starts containerd with `conflist` as its only CNI network; CNI
    /// plugins are Debian's (/usr/lib/cni) plus our `meshbypass` built
    /// beside the test; the pause image is built here and imported.
    pub fn start(conflist: &Path) -> Self {
        require_root();
        for tool in ["containerd", "ctr", "runc"] {
            assert!(
                which(tool).is_some(),
                "{tool} is missing: install Debian's containerd and runc (scripts/deps.sh)"
            );
        }
        let name = unique("ctd");
        let dir = std::env::temp_dir().join(&name);
        let root = PathBuf::from("/var/lib").join(&name);
        let state = PathBuf::from("/run").join(&name);
        let socket = state.join("containerd.sock");
        let cni_conf_dir = dir.join("net.d");
        let cni_bin_dir = dir.join("bin");
        let log = dir.join("containerd.log");
        for d in [&dir, &cni_conf_dir, &cni_bin_dir] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        let file_name = conflist.file_name().expect("conflist file name");
        std::fs::copy(conflist, cni_conf_dir.join(file_name))
            .unwrap_or_else(|e| panic!("copy {}: {e}", conflist.display()));
        // containerd 1.6 takes one CNI bin dir: a node's /opt/cni/bin in
        // miniature, Debian's plugins and ours as symlinks.
        link_plugins(&cni_bin_dir);
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            config_toml(&root, &state, &socket, &cni_bin_dir, &cni_conf_dir),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));

        let made_run_containerd = !Path::new("/run/containerd").exists();
        let log_file = std::fs::File::create(&log).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("start containerd");
        let mut ctd = Self {
            name,
            root,
            state,
            socket,
            dir,
            cni_conf_dir,
            log,
            cri: None,
            child,
            netns: RefCell::new(Vec::new()),
            made_run_containerd,
        };
        ctd.wait_ready();
        ctd.import_pause();
        ctd
    }

    /// Waits for the socket, connects, and waits for CRI's RuntimeReady
    /// and NetworkReady (the conflist was loaded).
    fn wait_ready(&mut self) {
        wait_for("containerd's socket", Duration::from_secs(20), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("containerd exited ({status}): {}", self.log_text());
            }
            self.socket.exists()
        });
        let cri = Cri::connect(&self.socket, CRI_TIMEOUT)
            .unwrap_or_else(|e| panic!("{}: {}", error_chain(&e), self.log_text()));
        let v = cri.version().unwrap_or_else(|e| panic!("{}", error_chain(&e)));
        eprintln!(
            "{} {} (CRI {})",
            v.runtime_name, v.runtime_version, v.runtime_api_version
        );
        wait_for(
            "CRI RuntimeReady and NetworkReady",
            Duration::from_secs(20),
            || {
                let s = cri.status().unwrap_or_else(|e| panic!("{}", error_chain(&e)));
                s.status
                    .map(|s| s.conditions.iter().all(|c| c.status) && s.conditions.len() >= 2)
                    .unwrap_or(false)
            },
        );
        self.cri = Some(cri);
    }

    /// Builds a docker-archive image (busybox-static's `sleep` as the pause
    /// process: no registry) and imports it into the CRI namespace.
    fn import_pause(&self) {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .expect("busybox is missing: install busybox-static (scripts/deps.sh)");
        let img = self.dir.join("image");
        let rootfs = img.join("rootfs");
        let bin = rootfs.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy(busybox, bin.join("busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", bin.join("sleep")).unwrap();
        let archive = img.join("archive");
        std::fs::create_dir_all(&archive).unwrap();
        let layer = archive.join("layer.tar");
        sh(&[
            "tar",
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "-C",
            rootfs.to_str().unwrap(),
            "-cf",
            layer.to_str().unwrap(),
            ".",
        ]);
        let diff_id = sha256(&layer);
        let config = json!({
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            "os": "linux",
            "config": { "Entrypoint": ["/bin/sleep", "2147483647"], "WorkingDir": "/" },
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        });
        let config_path = archive.join("config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let config_name = format!("{}.json", sha256(&config_path));
        std::fs::rename(&config_path, archive.join(&config_name)).unwrap();
        let manifest = json!([{ "Config": config_name, "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"] }]);
        std::fs::write(archive.join("manifest.json"), manifest.to_string()).unwrap();
        let tar = img.join("pause.tar");
        sh(&[
            "tar",
            "-C",
            archive.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            "manifest.json",
            &config_name,
            "layer.tar",
        ]);
        sh(&[
            "ctr",
            "--address",
            self.socket.to_str().unwrap(),
            "--namespace",
            "k8s.io",
            "images",
            "import",
            tar.to_str().unwrap(),
        ]);
        let images = self
            .cri()
            .list_images()
            .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
        assert!(
            images.iter().any(|i| i.ends_with(PAUSE_IMAGE)),
            "CRI does not list {PAUSE_IMAGE}: {images:?}"
        );
    }

    /// runc's state root for the CRI namespace (set in the config).
    fn runc_root(&self) -> PathBuf {
        self.state.join("runc").join("k8s.io")
    }

    /// Kills and deletes a container through runc directly, for when
    /// containerd cannot (the CRI calls failed, or it is gone).
    fn force_delete(&self, id: &str) {
        let root = self.runc_root();
        if root.join(id).exists() {
            cleanup(&["runc", "--root", root.to_str().unwrap(), "delete", "--force", id]);
        }
    }

    pub fn cri(&self) -> &Cri {
        self.cri.as_ref().expect("connected")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `RunPodSandbox` as kubelet sends it (cgroupfs driver, BestEffort):
    /// metadata name/namespace/uid, `cgroup_parent`
    /// `/kubepods/besteffort/pod<uid>`. Like kubelet, the pod's cgroup is
    /// created first, in every hierarchy: containerd 1.6 + runc create
    /// only the sandbox container's own cgroup below it.
    pub fn run_pod(&self, name: &str, annotations: &[(&str, &str)]) -> CriPod<'_> {
        let uid = pod_uid(name);
        let rel = format!("kubepods/besteffort/pod{uid}");
        let v1 = V1Cgroups::new(&rel);
        let cgroup = KubeCgroup::new(&rel);
        let config = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            labels: [("io.kubernetes.pod.name".to_owned(), name.to_owned())].into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: format!("/{rel}"),
                ..Default::default()
            }),
            ..Default::default()
        };
        let started = Instant::now();
        let id = self.cri().run_pod_sandbox(config).unwrap_or_else(|e| {
            panic!(
                "{}\ncontainerd log:\n{}",
                error_chain(&e),
                tail(&self.log_text(), 40)
            )
        });
        let took = started.elapsed();
        let status = self
            .cri()
            .pod_sandbox_status(&id)
            .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
        let netns = netns_path(&status);
        self.netns.borrow_mut().push(netns.clone());
        let ip = status
            .status
            .as_ref()
            .and_then(|s| s.network.as_ref())
            .map(|n| n.ip.clone())
            .unwrap_or_default();
        assert!(!ip.is_empty(), "the sandbox has no IP: {status:?}");
        let ns_name = netns
            .file_name()
            .and_then(|n| n.to_str())
            .expect("netns name")
            .to_owned();
        assert!(
            Path::new("/run/netns").join(&ns_name).exists(),
            "containerd's netns {} is not under /run/netns",
            netns.display()
        );
        let att = Attachment {
            container_id: id.clone(),
            netns: Some(netns),
            ifname: "eth0".into(),
            namespace: "default".into(),
            name: name.into(),
            uid,
        };
        eprintln!(
            "RunPodSandbox {name}: {id} {ip} in {ns_name} ({took:?}); sandbox cgroup in v2: {}",
            cgroup.path.join(&id).exists()
        );
        CriPod {
            ctd: self,
            pod: Some(SimPod {
                att,
                cgroup,
                ns: Netns { name: ns_name },
                result: Some(json!({ "ips": [{ "address": format!("{ip}/32") }] })),
            }),
            v1: Some(v1),
            id,
            stopped: false,
            removed: false,
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Sandboxes left by a failed test: stop and remove them (CNI DEL).
        if let Some(cri) = &self.cri {
            match cri.list_pod_sandbox() {
                Ok(items) => {
                    for s in items {
                        if let Err(e) = cri.stop_pod_sandbox(&s.id) {
                            eprintln!("cleanup: StopPodSandbox {}: {}", s.id, error_chain(&e));
                        }
                        if let Err(e) = cri.remove_pod_sandbox(&s.id) {
                            eprintln!("cleanup: RemovePodSandbox {}: {}", s.id, error_chain(&e));
                        }
                    }
                }
                Err(e) => eprintln!("cleanup: ListPodSandbox: {}", error_chain(&e)),
            }
        }
        self.cri = None;
        // Shims exit on their own once their sandbox is removed; let
        // containerd (their subreaper) see them go before it stops.
        let socket = self.socket.to_str().unwrap().to_owned();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pids_with_arg(&socket).is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        stop_child(&mut self.child, "containerd");
        // Containers whose shim outlived containerd, then the shims.
        for id in runc_ids(&self.runc_root()) {
            self.force_delete(&id);
        }
        for pid in pids_with_arg(&socket) {
            eprintln!("cleanup: killing shim {pid}");
            if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL) {
                eprintln!("cleanup: kill {pid}: {e}");
            }
        }
        for ns in self.netns.borrow().iter() {
            if ns.exists() {
                detach(ns);
                remove_file(ns);
            }
        }
        for dir in [&self.state, &self.root] {
            for m in mounts_under(dir) {
                detach(&m);
            }
            remove_dir_all(dir);
        }
        // Nobody else's: the sockets of shims that had to be killed go too.
        if self.made_run_containerd {
            remove_dir_all(Path::new("/run/containerd"));
        }
        remove_dir_all(&self.dir);
    }
}

/// A pod sandbox run through CRI. Derefs to a [`SimPod`] (its netns is
/// containerd's, its cgroup the kubelet-layout v2 directory, its attachment
/// the sandbox's ID and metadata) so the node kit's helpers (spawn,
/// wait_listen, rules, `Sidecar`) work on it. Dropping it stops and removes
/// the sandbox, then its cgroups.
pub struct CriPod<'a> {
    ctd: &'a Containerd,
    /// Taken apart in `drop` (the netns is containerd's, not ours to delete).
    pod: Option<SimPod>,
    v1: Option<V1Cgroups>,
    pub id: String,
    stopped: bool,
    removed: bool,
}

impl CriPod<'_> {
    pub fn netns_path(&self) -> PathBuf {
        self.ns.path()
    }

    /// `StopPodSandbox` (containerd runs CNI DEL and removes the netns).
    pub fn stop(&mut self) {
        self.ctd
            .cri()
            .stop_pod_sandbox(&self.id)
            .unwrap_or_else(|e| panic!("{}\n{}", error_chain(&e), tail(&self.ctd.log_text(), 40)));
        self.stopped = true;
    }

    /// `RemovePodSandbox`.
    pub fn remove(&mut self) {
        self.ctd
            .cri()
            .remove_pod_sandbox(&self.id)
            .unwrap_or_else(|e| panic!("{}\n{}", error_chain(&e), tail(&self.ctd.log_text(), 40)));
        self.removed = true;
    }
}

impl std::ops::Deref for CriPod<'_> {
    type Target = SimPod;
    fn deref(&self) -> &SimPod {
        self.pod.as_ref().expect("a live pod")
    }
}

impl Drop for CriPod<'_> {
    fn drop(&mut self) {
        let cri = self.ctd.cri();
        let mut failed = false;
        if !self.stopped
            && let Err(e) = cri.stop_pod_sandbox(&self.id)
        {
            eprintln!("cleanup: StopPodSandbox {}: {}", self.id, error_chain(&e));
            failed = true;
        }
        if !self.removed
            && let Err(e) = cri.remove_pod_sandbox(&self.id)
        {
            eprintln!("cleanup: RemovePodSandbox {}: {}", self.id, error_chain(&e));
            failed = true;
        }
        if failed {
            // The sandbox's process must leave the pod's cgroups before
            // they can go; the rest is Containerd's guard's.
            self.ctd.force_delete(&self.id);
        }
        if let Some(SimPod { ns, cgroup, .. }) = self.pod.take() {
            // The netns is containerd's: it removed it (or Containerd's
            // guard will); `Netns`'s own drop would `ip netns del` it.
            std::mem::forget(ns);
            // The workloads are gone by now: the cgroups can go.
            drop(cgroup);
        }
        drop(self.v1.take());
    }
}

/// A pod's cgroup in each cgroup v1 hierarchy (hybrid hosts), as kubelet's
/// cgroupfs driver makes it; the parts we created are removed on drop
/// (runc removes only the container's own cgroup below it).
pub struct V1Cgroups {
    created: Vec<PathBuf>,
}

impl V1Cgroups {
    pub fn new(rel: &str) -> Self {
        let mut created = Vec::new();
        for root in v1_hierarchies() {
            let mut cur = root;
            for part in Path::new(rel).components() {
                cur = cur.join(part);
                if !cur.exists() {
                    std::fs::create_dir(&cur).unwrap_or_else(|e| panic!("mkdir {}: {e}", cur.display()));
                    created.push(cur.clone());
                }
            }
        }
        Self { created }
    }
}

impl Drop for V1Cgroups {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            crate::remove_cgroup_dir(dir);
        }
    }
}

/// The mount points of cgroup v1 hierarchies (none on a unified host).
fn v1_hierarchies() -> Vec<PathBuf> {
    mountinfo()
        .into_iter()
        .filter(|(_, fstype)| fstype == "cgroup")
        .map(|(m, _)| m)
        .collect()
}

/// (mount point, fstype) of every mount in this mount namespace.
fn mountinfo() -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            let fstype = right.split_whitespace().next()?;
            Some((PathBuf::from(mount_point), fstype.to_owned()))
        })
        .collect()
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo()
        .into_iter()
        .map(|(m, _)| m)
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    v.dedup();
    v
}

fn detach(path: &Path) {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => eprintln!("cleanup: umount {}: {e}", path.display()),
    }
}

fn remove_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("cleanup {}: {e}", path.display());
    }
}

fn remove_dir_all(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("cleanup {}: {e}", path.display());
    }
}

/// Like `sh` but for cleanup: failures are reported, not fatal.
fn cleanup(args: &[&str]) {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!("cleanup {args:?}: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => eprintln!("cleanup {args:?}: {e}"),
    }
}

/// SIGTERM, then SIGKILL after 10 s; reaped either way.
fn stop_child(child: &mut Child, what: &str) {
    if let Ok(None) = child.try_wait() {
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
            eprintln!("cleanup: SIGTERM {what} {pid}: {e}");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        if let Err(e) = child.kill() {
            eprintln!("cleanup: kill {what} {pid}: {e}");
        }
    }
    if let Err(e) = child.wait() {
        eprintln!("cleanup: wait {what}: {e}");
    }
}

/// Processes whose command line has `arg` as one argument (the shims are
/// started with `-address <our socket>`).
fn pids_with_arg(arg: &str) -> Vec<nix::unistd::Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
                .unwrap_or(false)
        })
        .map(nix::unistd::Pid::from_raw)
        .collect()
}

/// Container IDs in a runc state root.
fn runc_ids(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The sandbox's netns path from the verbose status (containerd's `info`
/// JSON carries the OCI spec it started the sandbox with).
fn netns_path(status: &api::PodSandboxStatusResponse) -> PathBuf {
    let info: Value = status
        .info
        .get("info")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_else(|| panic!("no verbose info in PodSandboxStatus: {:?}", status.info));
    info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["type"] == "network"))
        .and_then(|n| n["path"].as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no network namespace path in {info}"))
}

/// containerd's config (version 2, containerd 1.6): own root, state and
/// socket; CRI with runc (cgroupfs), the native snapshotter (works on any
/// filesystem), our CNI dirs, the local pause image. `restrict_oom_score_adj`
/// because root here may lack CAP_SYS_RESOURCE (containerd would fail to
/// lower the sandbox's oom_score_adj).
fn config_toml(root: &Path, state: &Path, socket: &Path, cni_bin: &Path, cni_conf: &Path) -> String {
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri}.containerd]
  snapshotter = "native"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  BinaryName = "{runc}"
  Root = "{state}/runc"

[{cri}.cni]
  bin_dir = "{cni_bin}"
  conf_dir = "{cni_conf}"
  max_conf_num = 1
"#,
        root = root.display(),
        state = state.display(),
        socket = socket.display(),
        runc = which("runc").expect("runc").display(),
        cni_bin = cni_bin.display(),
        cni_conf = cni_conf.display(),
    )
}

/// Symlinks Debian's reference plugins and our `meshbypass` into `dir`.
fn link_plugins(dir: &Path) {
    let debian = Path::new("/usr/lib/cni");
    let entries = std::fs::read_dir(debian)
        .unwrap_or_else(|e| panic!("{}: {e} (install containernetworking-plugins)", debian.display()));
    for e in entries.flatten() {
        std::os::unix::fs::symlink(e.path(), dir.join(e.file_name())).expect("symlink a CNI plugin");
    }
    std::os::unix::fs::symlink(sibling_bin("meshbypass"), dir.join("meshbypass"))
        .expect("symlink meshbypass");
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn sha256(path: &Path) -> String {
    sh(&["sha256sum", path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_owned()
}

/// A pod UID (RFC 4122 form) unique to this process and pod name.
fn pod_uid(name: &str) -> String {
    let u = unique(name);
    let h = meshbypass_ebpf::fnv1a(&[u.as_bytes(), &std::process::id().to_le_bytes()].concat());
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let (a, b) = (h, h.rotate_left(29) ^ t);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
