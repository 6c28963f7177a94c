//! The kernel hazard probe. In a private bpf root, cgroup and netns (a child
//! process, killed at a deadline, so nothing here can hang the caller) it
//! checks on the running kernel that (a) sk_msg redirection delivers, (b) a
//! `splice()` reader receives redirected data, (c) FIONREAD counts it, (d) a
//! blocking reader, target or mere sender, is not woken into EAGAIN, (e) a
//! reader that does not read holds its writer back. `auto` redirects into
//! non-proxy sockets only when all of them pass.

use std::{
    fs,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    abi::{Counter, KERNEL_SAFE_MEMBER, Mode, header},
    cgroup2, loader,
    maps::NodeMaps,
    netns,
    pods::PodEntry,
    verdict::Verdict,
};

/// A hazard of the running kernel and the probe that looks for it: the
/// probe's name (in reports, `status` and metrics), the
/// `MB_KERNEL_HAZARD_*` bit recorded when it does not pass, what the
/// hazard means for the modes, and how the probe runs.
pub struct Hazard {
    pub probe: &'static str,
    pub bit: u32,
    pub effect: &'static str,
    setup: Setup,
    run: ProbeFn,
}

const REDIRECT: Hazard = Hazard {
    probe: "redirect",
    bit: header::MB_KERNEL_HAZARD_REDIRECT,
    effect: "sk_msg redirection does not deliver: nothing is accelerated",
    setup: Setup::Targets,
    run: probe_redirect,
};

const BLOCKING_READ_MEMBER: Hazard = Hazard {
    probe: "blocking-read-member",
    bit: header::MB_KERNEL_HAZARD_MEMBER,
    effect: "a blocking read() on a socket that is only a sender in the maps fails with EAGAIN when \
             woken without data: proxy-only and auto keep app sockets out of the maps \
             (sidecar-to-sidecar legs only)",
    setup: Setup::Member,
    run: probe_blocking_read_member,
};

/// Every hazard, in the order the probes run.
pub const HAZARDS: [Hazard; 6] = [
    REDIRECT,
    Hazard {
        probe: "splice-reader",
        bit: header::MB_KERNEL_HAZARD_SPLICE,
        effect: "splice() readers hang or read EOF on redirected data: auto redirects only into proxy sockets",
        setup: Setup::Targets,
        run: probe_splice,
    },
    Hazard {
        probe: "fionread",
        bit: header::MB_KERNEL_HAZARD_FIONREAD,
        effect: "FIONREAD does not count redirected data: auto redirects only into proxy sockets",
        setup: Setup::Targets,
        run: probe_fionread,
    },
    Hazard {
        probe: "blocking-read",
        bit: header::MB_KERNEL_HAZARD_BLOCKING,
        effect: "a blocking read() on a redirect target fails with EAGAIN when woken without data: \
                 auto redirects only into proxy sockets",
        setup: Setup::Targets,
        run: probe_blocking_read,
    },
    BLOCKING_READ_MEMBER,
    Hazard {
        probe: "slow-reader",
        bit: header::MB_KERNEL_HAZARD_QUEUE,
        effect: "redirected data is not bounded by the receiver (no psock msg_tot_len before Linux 6.14): \
                 a reader that stalls lets its writer fill memory up to tcp_mem",
        setup: Setup::Targets,
        run: probe_slow_reader,
    },
];

/// The verdict of one probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    /// Wrong or missing bytes.
    Fail,
    /// No answer before the probe's deadline.
    Hang,
    /// Nothing was redirected, so the probe says nothing about the hazard.
    Inconclusive,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Probe {
    pub name: String,
    pub outcome: Outcome,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub kernel: String,
    pub probes: Vec<Probe>,
    /// Every probe passed: `auto` may redirect into any socket.
    pub safe_all: bool,
    /// Redirection works and a plain map member reads as on plain TCP:
    /// `proxy-only` may let app sockets send redirected.
    pub safe_member: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)")]
    NoCgroup2,
    #[error("cannot prepare {}", path.display())]
    Prepare {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Attach(#[from] crate::attach::AttachError),
    #[error("cannot run the probe process {}", exe.display())]
    Spawn {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the probe process gave no report ({status}): {stderr}")]
    NoReport { status: String, stderr: String },
}

impl Report {
    /// The verdict to record: the report's, with the bit of every hazard
    /// whose probe did not pass.
    pub fn verdict(&self) -> Verdict {
        let failed = |h: &Hazard| {
            self.probes
                .iter()
                .any(|p| p.name == h.probe && p.outcome != Outcome::Pass)
        };
        Verdict {
            safe_all: self.safe_all,
            safe_member: self.safe_member,
            hazards: HAZARDS
                .iter()
                .filter(|h| failed(h))
                .fold(0, |bits, h| bits | h.bit),
        }
    }
}

impl From<&Report> for Verdict {
    fn from(report: &Report) -> Self {
        report.verdict()
    }
}

/// The hazards named by recorded kernel flags.
pub fn hazards(kernel_flags: u32) -> impl Iterator<Item = &'static Hazard> {
    HAZARDS.iter().filter(move |h| kernel_flags & h.bit != 0)
}

/// How the probe's netns is registered.
#[derive(Clone, Copy)]
enum Setup {
    /// Mode `all`: both ends in both maps (redirect targets).
    Targets,
    /// Mode `proxy-only` with the connecting side (root) as the proxy and a
    /// member verdict: the accepting side is an app socket in `mb_senders` only,
    /// never fed redirected data.
    Member,
}

impl Setup {
    fn apply(self, maps: &mut NodeMaps, cookie: u64) -> io::Result<()> {
        let (mode, proxy_uid, flags) = match self {
            Setup::Targets => (Mode::All, None, 0),
            Setup::Member => (Mode::ProxyOnly, Some(0), KERNEL_SAFE_MEMBER),
        };
        maps.set_kernel_flags(flags).map_err(io::Error::other)?;
        maps.register_pod(&PodEntry {
            netns_cookie: cookie,
            ips: vec![Ipv4Addr::LOCALHOST.into()],
            outbound_port: 0,
            inbound_port: 0,
            proxy_uid,
            proxy_gid: None,
            mode,
        })
        .map_err(io::Error::other)
    }
}

/// A probe: (client, server) of a fresh connection -> verdict.
type ProbeFn = fn(&mut TcpStream, &mut TcpStream) -> (Outcome, String);

const PROBE_DEADLINE: Duration = Duration::from_secs(3);

/// Runs the probes: `exe` is a binary whose `selftest-probe` subcommand
/// calls [`probe_main`] (meshbypass-node).
pub fn run(exe: &Path, timeout: Duration) -> Result<Report, SelftestError> {
    let tag = format!("meshbypass-selftest-{}", std::process::id());
    let root = PathBuf::from("/sys/fs/bpf").join(&tag);
    let cg2 = cgroup2::mount_point().ok_or(SelftestError::NoCgroup2)?;
    let cgroup = cg2.join(&tag);
    let result = run_in(exe, timeout, &root, &cgroup);
    // Cleanup in every outcome; the child is gone by now.
    if let Err(e) = loader::unload(&root) {
        log::warn!("selftest cleanup of {}: {e}", root.display());
    }
    match fs::remove_dir(&cgroup) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("selftest cleanup of {}: {e}", cgroup.display()),
    }
    result
}

fn run_in(exe: &Path, timeout: Duration, root: &Path, cgroup: &Path) -> Result<Report, SelftestError> {
    let (maps, _) = loader::load(root)?;
    fs::create_dir_all(cgroup).map_err(|source| SelftestError::Prepare {
        path: cgroup.into(),
        source,
    })?;
    maps.attach_cgroup(cgroup, "selftest")?;
    let mut child = Command::new(exe)
        .arg("selftest-probe")
        .arg("--bpf-root")
        .arg(root)
        .arg("--cgroup")
        .arg(cgroup)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| SelftestError::Spawn {
            exe: exe.into(),
            source,
        })?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.to_string(),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => {
                match child.kill() {
                    Ok(()) => {}
                    Err(e) => log::warn!("killing the probe process: {e}"),
                }
                match child.wait() {
                    Ok(_) => {}
                    Err(e) => log::warn!("reaping the probe process: {e}"),
                }
                break format!("killed after {timeout:?}");
            }
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take()
        && let Err(e) = o.read_to_string(&mut out)
    {
        log::warn!("reading the probe's report: {e}");
    }
    if let Some(mut e) = child.stderr.take()
        && let Err(e) = e.read_to_string(&mut err)
    {
        log::warn!("reading the probe's errors: {e}");
    }
    let probes: Vec<Probe> = serde_json::from_str(out.trim()).map_err(|_| SelftestError::NoReport {
        status,
        stderr: err.trim().to_owned(),
    })?;
    let passed = |h: &Hazard| {
        probes
            .iter()
            .any(|p| p.name == h.probe && p.outcome == Outcome::Pass)
    };
    let safe_all = !probes.is_empty() && probes.iter().all(|p| p.outcome == Outcome::Pass);
    let safe_member = passed(&REDIRECT) && passed(&BLOCKING_READ_MEMBER);
    Ok(Report {
        kernel: kernel_release(),
        probes,
        safe_all,
        safe_member,
    })
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The probe process: joins `cgroup`, takes a new netns, registers it in
/// the private maps at `root` as each probe needs, and runs every probe of
/// [`HAZARDS`] with its own deadline. Returns the results; the caller
/// prints them (JSON) for [`run`] and exits, which ends any probe thread
/// abandoned as hung.
pub fn probe_main(root: &Path, cgroup: &Path) -> io::Result<Vec<Probe>> {
    cgroup2::join(cgroup)?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    loopback_up()?;
    let cookie = netns::current_cookie().map_err(io::Error::other)?;
    let mut maps = NodeMaps::open(root).map_err(io::Error::other)?;
    let mut out = Vec::new();
    for hazard in &HAZARDS {
        hazard.setup.apply(&mut maps, cookie)?;
        let f = hazard.run;
        let before = redirected(&maps);
        let (tx, rx) = mpsc::channel();
        let pair = connected_pair()?;
        // A hung probe thread is abandoned; the process exits after the report.
        thread::spawn(move || {
            let (mut client, mut server) = pair;
            // The receiver is gone only when the probe was abandoned as hung.
            if tx.send(f(&mut client, &mut server)).is_err() {
                log::debug!("probe result after its deadline");
            }
        });
        let (mut outcome, mut detail) = rx
            .recv_timeout(PROBE_DEADLINE)
            .unwrap_or((Outcome::Hang, format!("no result within {PROBE_DEADLINE:?}")));
        if redirected(&maps) == before && outcome != Outcome::Hang {
            outcome = Outcome::Inconclusive;
            detail = format!("nothing was redirected ({detail})");
        }
        out.push(Probe {
            name: hazard.probe.into(),
            outcome,
            detail,
        });
    }
    Ok(out)
}

fn redirected(maps: &NodeMaps) -> u64 {
    maps.counters()
        .map(|c| c.get(Counter::RedirectedMsgs))
        .unwrap_or(0)
}

fn connected_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    // Let both ends establish before the first byte (no race with pairing).
    client.set_nodelay(true)?;
    Ok((client, server))
}

fn pattern(len: usize) -> Vec<u8> {
    pattern_at(0, len)
}

/// `len` bytes of the probe pattern from stream offset `at`.
fn pattern_at(at: usize, len: usize) -> Vec<u8> {
    (at..at + len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn probe_redirect(client: &mut TcpStream, server: &mut TcpStream) -> (Outcome, String) {
    let data = pattern(256 * 1024);
    let expect = data.clone();
    let writer = {
        let mut c = match client.try_clone() {
            Ok(c) => c,
            Err(e) => return (Outcome::Fail, format!("clone: {e}")),
        };
        thread::spawn(move || c.write_all(&data))
    };
    let mut got = vec![0u8; expect.len()];
    if let Err(e) = server.set_read_timeout(Some(Duration::from_secs(2))) {
        return (Outcome::Fail, format!("timeout: {e}"));
    }
    let read = server.read_exact(&mut got);
    let written = writer.join().map_err(|_| ()).and_then(|r| r.map_err(|_| ()));
    match (read, written) {
        (Ok(()), Ok(())) if got == expect => (Outcome::Pass, "256 KiB delivered intact".into()),
        (Ok(()), _) => (Outcome::Fail, "bytes differ".into()),
        (Err(e), _) if e.kind() == io::ErrorKind::WouldBlock => (Outcome::Hang, "reader timed out".into()),
        (Err(e), _) => (Outcome::Fail, format!("read: {e}")),
    }
}

fn probe_splice(client: &mut TcpStream, server: &mut TcpStream) -> (Outcome, String) {
    let data = pattern(64 * 1024);
    if let Err(e) = client.write_all(&data) {
        return (Outcome::Fail, format!("write: {e}"));
    }
    if let Err(e) = server.set_read_timeout(Some(Duration::from_secs(2))) {
        return (Outcome::Fail, format!("timeout: {e}"));
    }
    let (pipe_r, pipe_w) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => return (Outcome::Fail, format!("pipe: {e}")),
    };
    let mut got = Vec::with_capacity(data.len());
    let mut pipe_r = fs::File::from(pipe_r);
    while got.len() < data.len() {
        // SAFETY: plain splice(2) between two fds we own.
        let n = unsafe {
            libc::splice(
                server.as_raw_fd(),
                std::ptr::null_mut(),
                pipe_w.as_raw_fd(),
                std::ptr::null_mut(),
                data.len() - got.len(),
                0,
            )
        };
        match n {
            0 => {
                return (
                    Outcome::Fail,
                    format!(
                        "splice() read EOF after {} of {} bytes (data loss)",
                        got.len(),
                        data.len()
                    ),
                );
            }
            n if n < 0 => {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::WouldBlock {
                    (
                        Outcome::Hang,
                        format!("splice() blocked with {} of {} bytes read", got.len(), data.len()),
                    )
                } else {
                    (Outcome::Fail, format!("splice(): {e}"))
                };
            }
            n => {
                let mut buf = vec![0u8; n as usize];
                if let Err(e) = pipe_r.read_exact(&mut buf) {
                    return (Outcome::Fail, format!("pipe read: {e}"));
                }
                got.extend_from_slice(&buf);
            }
        }
    }
    if got == data {
        (Outcome::Pass, "64 KiB spliced intact".into())
    } else {
        (Outcome::Fail, "spliced bytes differ".into())
    }
}

fn probe_fionread(client: &mut TcpStream, server: &mut TcpStream) -> (Outcome, String) {
    const LEN: usize = 10_000;
    if let Err(e) = client.write_all(&pattern(LEN)) {
        return (Outcome::Fail, format!("write: {e}"));
    }
    // Redirected sends are queued before write() returns; on the stack
    // path wait until the bytes are readable.
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(server),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut fds, 2000u16) {
        Ok(0) => return (Outcome::Hang, "poll() never reported the data readable".into()),
        Ok(_) => {}
        Err(e) => return (Outcome::Fail, format!("poll: {e}")),
    }
    let mut avail: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(server.as_raw_fd(), libc::FIONREAD, &mut avail) };
    if rc != 0 {
        return (Outcome::Fail, format!("ioctl: {}", io::Error::last_os_error()));
    }
    if avail as usize == LEN {
        (Outcome::Pass, format!("FIONREAD = {avail}"))
    } else {
        (Outcome::Fail, format!("FIONREAD = {avail}, {LEN} bytes queued"))
    }
}

/// A blocking reader on a map member, woken by something other than data
/// (its own FIN being acknowledged), must keep waiting, not fail.
fn probe_blocking_read(client: &mut TcpStream, server: &mut TcpStream) -> (Outcome, String) {
    if let Err(failed) = warm_up(client, server) {
        return failed;
    }
    probe_blocking_wakeup(client, server)
}

/// Traffic `from` -> `to` before a wakeup probe, so that the probe counts
/// as redirected.
fn warm_up(from: &mut TcpStream, to: &mut TcpStream) -> Result<(), (Outcome, String)> {
    const WARM_UP: &[u8] = b"warm-up";
    from.write_all(WARM_UP)
        .map_err(|e| (Outcome::Fail, format!("write: {e}")))?;
    let mut buf = [0u8; WARM_UP.len()];
    to.read_exact(&mut buf)
        .map_err(|e| (Outcome::Fail, format!("warm-up read: {e}")))
}

/// `server` blocks in read(); its own FIN being acknowledged wakes it
/// without data; then `client` sends one byte.
fn probe_blocking_wakeup(client: &mut TcpStream, server: &mut TcpStream) -> (Outcome, String) {
    let mut reader = match server.try_clone() {
        Ok(r) => r,
        Err(e) => return (Outcome::Fail, format!("clone: {e}")),
    };
    let (tx, rx) = mpsc::channel();
    let (tid_tx, tid_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut b = [0u8; 1];
        if tid_tx.send(nix::unistd::gettid().as_raw()).is_err() {
            return;
        }
        if tx.send(reader.read(&mut b).map_err(|e| e.kind())).is_err() {
            log::debug!("blocking-read result after its deadline");
        }
    });
    // Wait until the reader sleeps inside read(): a wakeup before that
    // would prove nothing (and pass a kernel that has the hazard).
    let Ok(tid) = tid_rx.recv_timeout(Duration::from_secs(1)) else {
        return (Outcome::Fail, "the reader thread did not start".into());
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let stat = fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
        // "tid (comm) S ...": the state follows the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if state == Some("S") {
            break;
        }
        if Instant::now() > deadline {
            return (
                Outcome::Inconclusive,
                format!("the reader never slept (state {state:?})"),
            );
        }
        thread::yield_now();
    }
    // The reader blocks; our FIN and its ACK wake it without data.
    if let Err(e) = server.shutdown(std::net::Shutdown::Write) {
        return (Outcome::Fail, format!("shutdown: {e}"));
    }
    match rx.recv_timeout(Duration::from_millis(500)) {
        Ok(Err(kind)) => {
            return (
                Outcome::Fail,
                format!("a blocking read() failed with {kind:?} when woken without data"),
            );
        }
        Ok(Ok(n)) => return (Outcome::Fail, format!("read() returned {n} with no data sent")),
        Err(_) => {}
    }
    if let Err(e) = client.write_all(b"x") {
        return (Outcome::Fail, format!("write: {e}"));
    }
    match rx.recv_timeout(Duration::from_secs(2)) {
        Ok(Ok(1)) => (Outcome::Pass, "kept blocking until data arrived".into()),
        Ok(other) => (Outcome::Fail, format!("read() gave {other:?}")),
        Err(_) => (Outcome::Hang, "data never reached the blocked reader".into()),
    }
}

/// The same wakeup on a socket that is only a sender in the maps (what
/// proxy-only makes of an app socket): is mere membership a hazard?
fn probe_blocking_read_member(client: &mut TcpStream, server: &mut TcpStream) -> (Outcome, String) {
    // server (app, tx only) -> client (proxy, rx).
    if let Err(failed) = warm_up(server, client) {
        return failed;
    }
    probe_blocking_wakeup(client, server)
}

/// A reader that does not read must hold its writer back (the receive-queue
/// bound in the sk_msg program), and every byte must arrive once it reads.
fn probe_slow_reader(client: &mut TcpStream, server: &mut TcpStream) -> (Outcome, String) {
    const CHUNK: usize = 64 * 1024;
    const GIVE_UP: usize = 64 << 20;
    // Plain TCP on loopback accepts a few MiB (both buffers, autotuned).
    const BOUND: usize = 8 << 20;
    if let Err(e) = client.set_nonblocking(true) {
        return (Outcome::Fail, format!("nonblocking: {e}"));
    }
    let mut sent = 0;
    while sent < GIVE_UP {
        match client.write(&pattern_at(sent, CHUNK)) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return (Outcome::Fail, format!("write after {sent} bytes: {e}")),
        }
    }
    if let Err(e) = server.set_read_timeout(Some(Duration::from_secs(2))) {
        return (Outcome::Fail, format!("timeout: {e}"));
    }
    let mut got = vec![0u8; sent];
    if let Err(e) = server.read_exact(&mut got) {
        return if e.kind() == io::ErrorKind::WouldBlock {
            (Outcome::Hang, format!("{sent} bytes accepted, not all readable"))
        } else {
            (Outcome::Fail, format!("read: {e}"))
        };
    }
    let mib = sent as f64 / f64::from(1u32 << 20);
    if got != pattern_at(0, sent) {
        (Outcome::Fail, format!("{mib:.1} MiB read back, bytes differ"))
    } else if sent > BOUND {
        (
            Outcome::Fail,
            format!("{mib:.1} MiB accepted while the reader did not read: unbounded"),
        )
    } else {
        (
            Outcome::Pass,
            format!("the writer was held back after {mib:.1} MiB; all bytes intact"),
        )
    }
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS on "lo" with a zeroed ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as libc::c_char;
        req.ifr_name[1] = b'o' as libc::c_char;
        // The request's type differs between libcs (glibc: c_ulong, musl: c_int).
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS as libc::Ioctl, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS as libc::Ioctl, &req);
        }
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One table: every `MB_KERNEL_HAZARD_*` of the header has exactly one
    /// probe, and every probe has its own bit and name.
    #[test]
    fn every_header_hazard_has_one_probe() {
        let mut header_bits: Vec<u32> = header::ALL
            .iter()
            .filter(|(name, _)| name.starts_with("MB_KERNEL_HAZARD_"))
            .map(|(_, bit)| *bit)
            .collect();
        header_bits.sort_unstable();
        let mut bits: Vec<u32> = HAZARDS.iter().map(|h| h.bit).collect();
        bits.sort_unstable();
        assert_eq!(
            bits, header_bits,
            "HAZARDS (left) and the header's hazard bits (right) differ"
        );
        let mut names: Vec<&str> = HAZARDS.iter().map(|h| h.probe).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), HAZARDS.len(), "two probes share a name");
    }

    #[test]
    fn a_failed_probe_records_its_hazard() {
        let report = Report {
            kernel: "test".into(),
            probes: HAZARDS
                .iter()
                .map(|h| Probe {
                    name: h.probe.into(),
                    outcome: if h.bit == header::MB_KERNEL_HAZARD_SPLICE {
                        Outcome::Hang
                    } else {
                        Outcome::Pass
                    },
                    detail: String::new(),
                })
                .collect(),
            safe_all: false,
            safe_member: true,
        };
        let flags = report.verdict().kernel_flags();
        let named: Vec<&str> = hazards(flags).map(|h| h.probe).collect();
        assert_eq!(named, ["splice-reader"]);
    }
}
