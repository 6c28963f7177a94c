//! `mb-peer`: the traffic helper of the privileged tests. It joins a cgroup
//! (first: `ip netns exec` would hide the cgroup2 mount), enters a netns,
//! optionally drops to a UID, then plays one role:
//!
//!   echo   --listen ADDR [--splice]          echo every connection back
//!   proxy  --listen ADDR [--to ADDR]         forward (SO_ORIGINAL_DST without --to)
//!   client --connect ADDR --sizes N,N,...    one connection per size, echo checked
//!   interactive --connect ADDR               stdin: connect | send N | close | quit
//!   exec -- PROGRAM ARGS...                  run a program in that place (a sidecar, curl)
//!   torture --connect ADDR --conns N ...     many checksummed echo exchanges at once (torture suite)
//!   sink --listen ADDR [--stall-ms N]        a slow reader that checks what a `flood` sends
//!   flood --connect ADDR --bytes N           a fast writer into a sink, reporting its progress
//!   script                                   named sockets driven from stdin (see script.rs)
//!
//! echo: --reader read|splice|fionread (--reader splice reads like --splice, with the torture checks)
//! torture: --conns N --concurrency C --min-size B --max-size B [--duration-ms D] [--hold]
//!          [--rst-every K] [--writer write|writev|sendfile|splice|mixed] [--first-write B]
//!          [--progress-ms P] (a {"progress": true, ...} line every P ms, before the report)
//! sink: [--stall-ms N] [--read-chunk B] [--read-delay-us N]; flood: --bytes N [--writer W]
//! proxy: [--close-on-error] (a reset on one side shuts both down)
//! common: --cgroup DIR --netns PATH --uid N --blocking --seed N --deadline-ms N
//! Every connection has read deadlines: nothing here can hang a test.
//!
//! By default I/O behaves like an event-driven server (nginx, Envoy): EAGAIN
//! means "poll and retry". With --blocking it behaves like a classic blocking
//! app: EAGAIN from a blocking socket is an error (the hazard `mode: all`
//! opts into on kernels that have it).

use std::{
    io::{self, BufRead, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    thread,
    time::Duration,
};

use anyhow::{Context, bail};

#[path = "mb-peer/script.rs"]
mod script;

/// The I/O deadline (20 s unless --deadline-ms says otherwise).
static DEADLINE_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(20_000);

fn io_deadline() -> Duration {
    Duration::from_millis(DEADLINE_MS.load(std::sync::atomic::Ordering::Relaxed))
}

static STRICT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn strict() -> bool {
    STRICT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Waits until `s` is readable (or writable) within the I/O deadline.
fn wait(s: &TcpStream, flags: nix::poll::PollFlags) -> io::Result<()> {
    let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(s), flags)];
    let ms = u16::try_from(io_deadline().as_millis()).unwrap_or(u16::MAX);
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no progress within the deadline",
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// read(), treating EAGAIN as "poll and retry" unless --blocking.
fn read_some(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let deadline = std::time::Instant::now() + io_deadline();
    loop {
        match s.read(buf) {
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    && !strict()
                    && std::time::Instant::now() < deadline =>
            {
                wait(s, nix::poll::PollFlags::POLLIN)?
            }
            r => return r,
        }
    }
}

fn read_exact(s: &mut TcpStream, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match read_some(s, buf)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

/// write_all(), treating EAGAIN like read_some does.
fn write_all(s: &mut TcpStream, mut buf: &[u8]) -> io::Result<()> {
    let deadline = std::time::Instant::now() + io_deadline();
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    && !strict()
                    && std::time::Instant::now() < deadline =>
            {
                wait(s, nix::poll::PollFlags::POLLOUT)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct Args {
    role: String,
    listen: Option<SocketAddr>,
    connect: Option<SocketAddr>,
    to: Option<SocketAddr>,
    sizes: Vec<usize>,
    splice: bool,
    cgroup: Option<PathBuf>,
    netns: Option<PathBuf>,
    uid: Option<u32>,
    seed: u64,
    exec: Vec<String>,
    torture: torture::Opts,
}

fn parse() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let role = it.next().context("no role")?;
    let mut a = Args {
        role,
        listen: None,
        connect: None,
        to: None,
        sizes: Vec::new(),
        splice: false,
        cgroup: None,
        netns: None,
        uid: None,
        seed: 1,
        exec: Vec::new(),
        torture: torture::Opts::default(),
    };
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => a.listen = Some(val()?.parse()?),
            "--connect" => a.connect = Some(val()?.parse()?),
            "--to" => a.to = Some(val()?.parse()?),
            "--sizes" => a.sizes = val()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--splice" => a.splice = true,
            "--blocking" => STRICT.store(true, std::sync::atomic::Ordering::Relaxed),
            "--cgroup" => a.cgroup = Some(val()?.into()),
            "--netns" => a.netns = Some(val()?.into()),
            "--uid" => a.uid = Some(val()?.parse()?),
            "--seed" => a.seed = val()?.parse()?,
            "--deadline-ms" => DEADLINE_MS.store(val()?.parse()?, std::sync::atomic::Ordering::Relaxed),
            "--reader" => a.torture.reader = val()?.parse()?,
            "--writer" => a.torture.writer = val()?.parse()?,
            "--conns" => a.torture.conns = val()?.parse()?,
            "--concurrency" => a.torture.concurrency = val()?.parse()?,
            "--min-size" => a.torture.min_size = val()?.parse()?,
            "--max-size" => a.torture.max_size = val()?.parse()?,
            "--duration-ms" => a.torture.duration_ms = Some(val()?.parse()?),
            "--hold" => a.torture.hold = true,
            "--rst-every" => a.torture.rst_every = val()?.parse()?,
            "--first-write" => a.torture.first_write = val()?.parse()?,
            "--stall-ms" => a.torture.stall_ms = val()?.parse()?,
            "--read-chunk" => a.torture.read_chunk = val()?.parse()?,
            "--read-delay-us" => a.torture.read_delay_us = val()?.parse()?,
            "--bytes" => a.torture.bytes = val()?.parse()?,
            "--close-on-error" => a.torture.close_on_error = true,
            "--progress-ms" => a.torture.progress_ms = val()?.parse()?,
            "--" => {
                a.exec = it.by_ref().collect();
                break;
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn enter(a: &Args) -> anyhow::Result<()> {
    if let Some(cg) = &a.cgroup {
        meshbypass_ebpf::cgroup2::join(cg).with_context(|| format!("joining {}", cg.display()))?;
    }
    if let Some(ns) = &a.netns {
        let f = std::fs::File::open(ns).with_context(|| format!("opening {}", ns.display()))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
    }
    if let Some(uid) = a.uid {
        let id = nix::unistd::Gid::from_raw(uid);
        nix::unistd::setgroups(&[id]).context("setgroups")?;
        nix::unistd::setgid(id).context("setgid")?;
        nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).context("setuid")?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    enter(&a)?;
    match a.role.as_str() {
        "echo" if a.torture.reader != torture::Reader::Read => {
            torture::echo(a.listen.context("--listen")?, a.torture.reader)
        }
        "echo" => echo(a.listen.context("--listen")?, a.splice),
        "torture" => torture::client(a.connect.context("--connect")?, &a.torture, a.seed),
        "sink" => torture::sink(a.listen.context("--listen")?, &a.torture, a.seed),
        "flood" => torture::flood(a.connect.context("--connect")?, &a.torture, a.seed),
        "proxy" => proxy(a.listen.context("--listen")?, a.to, a.torture.close_on_error),
        "client" => client(a.connect.context("--connect")?, &a.sizes, a.seed),
        "interactive" => interactive(a.connect.context("--connect")?, a.seed),
        "script" => script::run(),
        "exec" => {
            use std::os::unix::process::CommandExt;
            let (prog, args) = a.exec.split_first().context("exec needs -- PROGRAM")?;
            Err(std::process::Command::new(prog).args(args).exec()).context("exec")
        }
        other => bail!("unknown role {other}"),
    }
}

fn listen(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    // std listens with a backlog of 128; hundreds of simultaneous connects
    // (the torture suite) would overflow it. listen(2) again raises it.
    // SAFETY: listen(2) on a socket we own.
    if unsafe { libc::listen(l.as_raw_fd(), 4096) } != 0 {
        return Err(io::Error::last_os_error()).context("listen");
    }
    println!("ready {}", l.local_addr()?.port());
    io::stdout().flush()?;
    Ok(l)
}

fn echo(addr: SocketAddr, splice: bool) -> anyhow::Result<()> {
    let l = listen(addr)?;
    for conn in l.incoming() {
        let Ok(mut s) = conn else { continue };
        thread::spawn(move || {
            s.set_read_timeout(Some(io_deadline())).ok();
            let r = if splice {
                echo_splice(&mut s)
            } else {
                echo_copy(&mut s)
            };
            if let Err(e) = r {
                eprintln!("echo: {e}");
            }
            s.shutdown(Shutdown::Write).ok();
        });
    }
    Ok(())
}

fn echo_copy(s: &mut TcpStream) -> io::Result<()> {
    let mut w = s.try_clone()?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = read_some(s, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        write_all(&mut w, &buf[..n])?;
    }
}

/// Reads with splice() into a pipe, as Go's io.Copy and HAProxy do.
fn echo_splice(s: &mut TcpStream) -> io::Result<()> {
    let (pr, pw) = nix::unistd::pipe()?;
    let mut pr = std::fs::File::from(pr);
    let mut w = s.try_clone()?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: splice(2) between fds we own.
        let n = unsafe {
            libc::splice(
                s.as_raw_fd(),
                std::ptr::null_mut(),
                pw.as_raw_fd(),
                std::ptr::null_mut(),
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(());
        }
        pr.read_exact(&mut buf[..n as usize])?;
        write_all(&mut w, &buf[..n as usize])?;
    }
}

fn original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    // SO_ORIGINAL_DST (80) on SOL_IP: the address before iptables REDIRECT.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: sa/len describe a sockaddr_in buffer.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            80,
            (&mut sa as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let ip = std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
    Ok(SocketAddr::from((ip, u16::from_be(sa.sin_port))))
}

fn proxy(addr: SocketAddr, to: Option<SocketAddr>, close_on_error: bool) -> anyhow::Result<()> {
    let l = listen(addr)?;
    for conn in l.incoming() {
        let Ok(down) = conn else { continue };
        thread::spawn(move || {
            let target = match to {
                Some(t) => t,
                None => match original_dst(&down) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("proxy: no original destination: {e}");
                        return;
                    }
                },
            };
            let up = match TcpStream::connect_timeout(&target, io_deadline()) {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("proxy: connect {target}: {e}");
                    return;
                }
            };
            if let Err(e) = splice_both(down, up, close_on_error) {
                eprintln!("proxy: {e}");
            }
        });
    }
    Ok(())
}

/// Copies both directions (read/write), propagating half-close. With
/// `close_on_error` (--close-on-error), a direction that fails (a reset)
/// shuts both connections down, as Envoy and HAProxy do, instead of leaving
/// the other direction to its read deadline.
fn splice_both(a: TcpStream, b: TcpStream, close_on_error: bool) -> io::Result<()> {
    for s in [&a, &b] {
        s.set_read_timeout(Some(io_deadline()))?;
    }
    let copy = move |r: &mut TcpStream, w: &mut TcpStream| {
        let res = copy_half(r, w);
        if res.is_err() && close_on_error {
            r.shutdown(Shutdown::Both).ok();
            w.shutdown(Shutdown::Both).ok();
        }
        res
    };
    let (mut a_r, mut b_w) = (a.try_clone()?, b.try_clone()?);
    let t = thread::spawn(move || copy(&mut a_r, &mut b_w));
    let (mut b_r, mut a_w) = (b, a);
    let r = copy(&mut b_r, &mut a_w);
    let t = t
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("copy thread panicked")));
    r.and(t)
}

fn copy_half(r: &mut TcpStream, w: &mut TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = read_some(r, &mut buf)?;
        if n == 0 {
            w.shutdown(Shutdown::Write).ok();
            return Ok(());
        }
        write_all(w, &buf[..n])?;
    }
}

/// A deterministic byte stream (xorshift64*), so both ends agree without
/// sending a checksum.
struct Pattern(u64);

impl Pattern {
    fn new(seed: u64, conn: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (conn + 1).wrapping_mul(0xD1B5_4A32_D192_ED03) | 1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            *b = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8;
        }
    }
}

/// Sends `size` bytes, half-closes, and checks the echo byte for byte.
fn one_exchange(addr: SocketAddr, size: usize, seed: u64, conn: u64) -> anyhow::Result<()> {
    let s = TcpStream::connect_timeout(&addr, io_deadline()).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(io_deadline()))?;
    let mut w = s.try_clone()?;
    let writer = thread::spawn(move || -> io::Result<()> {
        let mut p = Pattern::new(seed, conn);
        let mut left = size;
        let mut buf = vec![0u8; 61 * 1024];
        while left > 0 {
            let n = left.min(buf.len());
            p.fill(&mut buf[..n]);
            write_all(&mut w, &buf[..n])?;
            left -= n;
        }
        w.shutdown(Shutdown::Write)
    });
    let mut expect = Pattern::new(seed, conn);
    let mut r = s;
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    loop {
        let n = read_some(&mut r, &mut buf).with_context(|| format!("read after {got} of {size} bytes"))?;
        if n == 0 {
            break;
        }
        if got + n > size {
            bail!("{} bytes echoed for {size} sent", got + n);
        }
        expect.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            let at = buf[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            bail!("echo differs at byte {} of {size}", got + at);
        }
        got += n;
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?
        .context("write")?;
    if got != size {
        bail!("{got} of {size} bytes echoed before EOF");
    }
    Ok(())
}

fn client(addr: SocketAddr, sizes: &[usize], seed: u64) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    let mut bytes = 0usize;
    for (i, &size) in sizes.iter().enumerate() {
        match one_exchange(addr, size, seed, i as u64) {
            Ok(()) => bytes += size,
            Err(e) => errors.push(format!("size {size}: {e:#}")),
        }
    }
    println!(
        "{}",
        serde_json::json!({"ok": errors.is_empty(), "conns": sizes.len(), "bytes": bytes, "errors": errors})
    );
    if errors.is_empty() {
        Ok(())
    } else {
        std::process::exit(1)
    }
}

fn interactive(addr: SocketAddr, seed: u64) -> anyhow::Result<()> {
    let mut conns: Vec<(TcpStream, Pattern, Pattern)> = Vec::new();
    let stdin = io::stdin();
    let mut out = io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        let reply = match (words.next(), words.next()) {
            (Some("connect"), _) => match TcpStream::connect_timeout(&addr, io_deadline()) {
                Ok(s) => {
                    s.set_read_timeout(Some(io_deadline()))?;
                    let port = s.local_addr()?.port();
                    let n = conns.len() as u64;
                    conns.push((s, Pattern::new(seed, n), Pattern::new(seed, n)));
                    format!("connected {port}")
                }
                Err(e) => format!("err connect: {e}"),
            },
            (Some("send"), Some(n)) => {
                let n: usize = n.parse()?;
                match conns.last_mut() {
                    None => "err no connection".into(),
                    Some((s, tx, rx)) => match send_and_check(s, tx, rx, n) {
                        Ok(()) => format!("ok {n}"),
                        Err(e) => format!("err {e:#}"),
                    },
                }
            }
            (Some("close"), _) => {
                conns.clear();
                "closed".into()
            }
            (Some("quit"), _) => return Ok(()),
            _ => format!("err unknown command {line:?}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

fn send_and_check(s: &mut TcpStream, tx: &mut Pattern, rx: &mut Pattern, n: usize) -> anyhow::Result<()> {
    let mut data = vec![0u8; n];
    tx.fill(&mut data);
    let mut w = s.try_clone()?;
    let writer = thread::spawn(move || write_all(&mut w, &data));
    let mut got = vec![0u8; n];
    read_exact(s, &mut got).context("reading the echo")?;
    writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let mut want = vec![0u8; n];
    rx.fill(&mut want);
    if got != want {
        bail!("echo differs");
    }
    Ok(())
}

/// The torture suite's traffic: many concurrent checksummed echo exchanges
/// written with write, writev, sendfile or splice; echo readers that use
/// read, splice or FIONREAD; a slow reader (`sink`) and a fast writer
/// (`flood`). Every failure is classified: a hang (no progress within the
/// deadline), lost bytes (EOF early), corrupt or reordered bytes (the echo
/// differs from what was sent), extra bytes, or another error (a reset).
mod torture {
    use std::{
        fs::File,
        io::{self, Read, Write},
        net::{Shutdown, SocketAddr, TcpStream},
        os::fd::{AsFd, AsRawFd, FromRawFd},
        str::FromStr,
        sync::{
            Arc, Barrier, Mutex,
            atomic::{AtomicU64, AtomicUsize, Ordering},
        },
        thread,
        time::{Duration, Instant},
    };

    use anyhow::{Context, bail};
    use nix::poll::PollFlags;

    use super::{Pattern, io_deadline, listen, read_some, strict, wait, write_all};

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Reader {
        Read,
        Splice,
        Fionread,
    }

    impl FromStr for Reader {
        type Err = anyhow::Error;
        fn from_str(s: &str) -> anyhow::Result<Self> {
            Ok(match s {
                "read" => Self::Read,
                "splice" => Self::Splice,
                "fionread" => Self::Fionread,
                _ => bail!("--reader read|splice|fionread, not {s}"),
            })
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Writer {
        Write,
        Writev,
        Sendfile,
        Splice,
        /// One of the four per connection.
        Mixed,
    }

    impl FromStr for Writer {
        type Err = anyhow::Error;
        fn from_str(s: &str) -> anyhow::Result<Self> {
            Ok(match s {
                "write" => Self::Write,
                "writev" => Self::Writev,
                "sendfile" => Self::Sendfile,
                "splice" => Self::Splice,
                "mixed" => Self::Mixed,
                _ => bail!("--writer write|writev|sendfile|splice|mixed, not {s}"),
            })
        }
    }

    pub struct Opts {
        pub reader: Reader,
        pub writer: Writer,
        pub conns: usize,
        pub concurrency: usize,
        pub min_size: usize,
        pub max_size: usize,
        pub duration_ms: Option<u64>,
        pub hold: bool,
        pub rst_every: usize,
        pub first_write: usize,
        pub stall_ms: u64,
        pub read_chunk: usize,
        pub read_delay_us: u64,
        pub bytes: u64,
        pub close_on_error: bool,
        /// torture: print the tally so far every this many ms (0: never).
        pub progress_ms: u64,
    }

    impl Default for Opts {
        fn default() -> Self {
            Self {
                reader: Reader::Read,
                writer: Writer::Write,
                conns: 1,
                concurrency: 1,
                min_size: 1,
                max_size: 1 << 20,
                duration_ms: None,
                hold: false,
                rst_every: 0,
                first_write: 0,
                stall_ms: 0,
                read_chunk: 64 * 1024,
                read_delay_us: 0,
                bytes: 1 << 20,
                close_on_error: false,
                progress_ms: 0,
            }
        }
    }

    /// Why a connection failed.
    #[derive(Debug)]
    enum Failure {
        Hang(String),
        Lost(String),
        Corrupt(String),
        Extra(String),
        Error(String),
    }

    fn io_failure(e: &io::Error, what: String) -> Failure {
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::Hang(format!("{what}: {e}")),
            _ => Failure::Error(format!("{what}: {e}")),
        }
    }

    /// Waits for POLLOUT after EAGAIN, like write_all; an error in --blocking mode.
    fn retry_out(s: &TcpStream, e: io::Error, deadline: Instant) -> io::Result<()> {
        if e.kind() == io::ErrorKind::WouldBlock && !strict() && Instant::now() < deadline {
            wait(s, PollFlags::POLLOUT)
        } else if e.kind() == io::ErrorKind::Interrupted {
            Ok(())
        } else {
            Err(e)
        }
    }

    /// A sender of one connection's bytes by one method. `sendfile` goes
    /// through a memfd, `splice` through a pipe, `writev` through three iovecs.
    struct Sender {
        writer: Writer,
        memfd: Option<File>,
        pipe: Option<(File, File)>,
    }

    impl Sender {
        fn new(writer: Writer) -> io::Result<Self> {
            let memfd = if writer == Writer::Sendfile {
                // SAFETY: memfd_create with a static name; the fd is owned by File.
                let fd = unsafe { libc::memfd_create(c"mb-peer".as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: fd was just created and is ours.
                Some(unsafe { File::from_raw_fd(fd) })
            } else {
                None
            };
            let pipe = if writer == Writer::Splice {
                let (r, w) = nix::unistd::pipe()?;
                Some((File::from(r), File::from(w)))
            } else {
                None
            };
            Ok(Self { writer, memfd, pipe })
        }

        fn send(&mut self, s: &mut TcpStream, buf: &[u8]) -> io::Result<()> {
            let deadline = Instant::now() + io_deadline();
            match self.writer {
                Writer::Write | Writer::Mixed => write_all(s, buf),
                Writer::Writev => {
                    let mut off = 0;
                    while off < buf.len() {
                        let rest = &buf[off..];
                        let (a, b) = (rest.len() / 3, 2 * rest.len() / 3);
                        let iov = [
                            io::IoSlice::new(&rest[..a]),
                            io::IoSlice::new(&rest[a..b]),
                            io::IoSlice::new(&rest[b..]),
                        ];
                        match nix::sys::uio::writev(s.as_fd(), &iov) {
                            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                            Ok(n) => off += n,
                            Err(e) => retry_out(s, e.into(), deadline)?,
                        }
                    }
                    Ok(())
                }
                Writer::Sendfile => {
                    let file = self.memfd.as_mut().expect("memfd");
                    file.set_len(0)?;
                    std::os::unix::fs::FileExt::write_all_at(file, buf, 0)?;
                    let mut offset: libc::off_t = 0;
                    while (offset as usize) < buf.len() {
                        // SAFETY: sendfile(2) between fds we own; offset is ours.
                        let n = unsafe {
                            libc::sendfile(
                                s.as_raw_fd(),
                                file.as_raw_fd(),
                                &mut offset,
                                buf.len() - offset as usize,
                            )
                        };
                        match n {
                            0 => return Err(io::ErrorKind::WriteZero.into()),
                            n if n < 0 => retry_out(s, io::Error::last_os_error(), deadline)?,
                            _ => {}
                        }
                    }
                    Ok(())
                }
                Writer::Splice => {
                    let (r, w) = self.pipe.as_mut().expect("pipe");
                    // Pipes hold 64 KiB by default: fill, drain, repeat.
                    for chunk in buf.chunks(60 * 1024) {
                        w.write_all(chunk)?;
                        let mut left = chunk.len();
                        while left > 0 {
                            // SAFETY: splice(2) from our pipe to our socket.
                            let n = unsafe {
                                libc::splice(
                                    r.as_raw_fd(),
                                    std::ptr::null_mut(),
                                    s.as_raw_fd(),
                                    std::ptr::null_mut(),
                                    left,
                                    libc::SPLICE_F_MOVE,
                                )
                            };
                            match n {
                                0 => return Err(io::ErrorKind::WriteZero.into()),
                                n if n < 0 => retry_out(s, io::Error::last_os_error(), deadline)?,
                                n => left -= n as usize,
                            }
                        }
                    }
                    Ok(())
                }
            }
        }
    }

    /// A size between min and max, log-uniform (as many small as large).
    fn size_of(seed: u64, conn: u64, min: usize, max: usize) -> usize {
        let mut r = Pattern::new(seed ^ 0x5eed, conn);
        let mut b = [0u8; 8];
        r.fill(&mut b);
        let u = u64::from_le_bytes(b) as f64 / u64::MAX as f64;
        let (lo, hi) = ((min.max(1)) as f64, (max.max(min).max(1)) as f64);
        ((lo.ln() + u * (hi.ln() - lo.ln())).exp().round() as usize).clamp(min.max(1), max.max(min))
    }

    const WRITERS: [Writer; 4] = [Writer::Write, Writer::Writev, Writer::Sendfile, Writer::Splice];

    /// Outcome of one connection.
    enum Done {
        Ok { bytes: usize },
        Aborted,
        Failed(Failure),
    }

    /// One exchange: send `size` bytes (the first `first` in a write of their
    /// own right after connect), half-close, check the echo byte for byte.
    fn exchange(addr: SocketAddr, o: &Opts, seed: u64, conn: u64, barrier: Option<&Barrier>) -> Done {
        let size = size_of(seed, conn, o.min_size, o.max_size);
        let writer = match o.writer {
            Writer::Mixed => WRITERS[(conn % 4) as usize],
            w => w,
        };
        let s = match TcpStream::connect_timeout(&addr, io_deadline()) {
            Ok(s) => s,
            Err(e) => {
                if let Some(b) = barrier {
                    b.wait();
                }
                return Done::Failed(io_failure(&e, format!("conn {conn}: connect")));
            }
        };
        if let Some(b) = barrier {
            b.wait();
        }
        if s.set_read_timeout(Some(io_deadline())).is_err() {
            return Done::Failed(Failure::Error(format!("conn {conn}: SO_RCVTIMEO")));
        }
        let abort = o.rst_every > 0 && conn as usize % o.rst_every == o.rst_every - 1;
        if abort {
            return rst_midstream(s, size, seed, conn);
        }
        let mut w = match s.try_clone() {
            Ok(w) => w,
            Err(e) => return Done::Failed(io_failure(&e, format!("conn {conn}: clone"))),
        };
        let first = o.first_write.min(size);
        let writer_thread = thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || -> io::Result<()> {
                let mut sender = Sender::new(writer)?;
                let mut p = Pattern::new(seed, conn);
                let mut left = size;
                let mut buf = vec![0u8; 61 * 1024];
                if first > 0 {
                    p.fill(&mut buf[..first]);
                    write_all(&mut w, &buf[..first])?;
                    left -= first;
                }
                while left > 0 {
                    let n = left.min(buf.len());
                    p.fill(&mut buf[..n]);
                    sender.send(&mut w, &buf[..n])?;
                    left -= n;
                }
                w.shutdown(Shutdown::Write)
            });
        let writer_thread = match writer_thread {
            Ok(t) => t,
            Err(e) => return Done::Failed(Failure::Error(format!("conn {conn}: spawn: {e}"))),
        };
        let mut r = s;
        let mut expect = Pattern::new(seed, conn);
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        let mut want = vec![0u8; 64 * 1024];
        let what = format!("conn {conn} ({writer:?}, {size} B)");
        let read = loop {
            let n = match read_some(&mut r, &mut buf) {
                Ok(n) => n,
                Err(e) => break Err(io_failure(&e, format!("{what}: read after {got} B"))),
            };
            if n == 0 {
                break Ok(());
            }
            if got + n > size {
                break Err(Failure::Extra(format!("{what}: {} B echoed", got + n)));
            }
            expect.fill(&mut want[..n]);
            if buf[..n] != want[..n] {
                let at = buf[..n]
                    .iter()
                    .zip(&want[..n])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                break Err(Failure::Corrupt(format!(
                    "{what}: echo differs at byte {}",
                    got + at
                )));
            }
            got += n;
        };
        if read.is_err() {
            // Unblock the writer: it may wait on a peer that stopped reading.
            r.shutdown(Shutdown::Both).ok();
        }
        let written = writer_thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer panicked")));
        match (read, written) {
            (Err(f), _) => Done::Failed(f),
            (Ok(()), Err(e)) => Done::Failed(io_failure(&e, format!("{what}: write"))),
            (Ok(()), Ok(())) if got < size => {
                Done::Failed(Failure::Lost(format!("{what}: EOF after {got} B")))
            }
            (Ok(()), Ok(())) => Done::Ok { bytes: size },
        }
    }

    /// Sends half the bytes, reads what came back so far (checking it), then
    /// resets the connection (SO_LINGER 0 and close).
    fn rst_midstream(mut s: TcpStream, size: usize, seed: u64, conn: u64) -> Done {
        let half = (size / 2).max(1);
        let mut p = Pattern::new(seed, conn);
        let mut data = vec![0u8; half.min(256 * 1024)];
        p.fill(&mut data);
        if let Err(e) = write_all(&mut s, &data) {
            return Done::Failed(io_failure(&e, format!("conn {conn}: rst write")));
        }
        thread::sleep(Duration::from_millis(2));
        s.set_nonblocking(true).ok();
        let mut expect = Pattern::new(seed, conn);
        let mut buf = vec![0u8; 64 * 1024];
        let mut want = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            expect.fill(&mut want[..n]);
            if buf[..n] != want[..n] {
                return Done::Failed(Failure::Corrupt(format!("conn {conn}: echo before RST differs")));
            }
        }
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt(SO_LINGER) with a linger struct.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Done::Failed(Failure::Error(format!("conn {conn}: SO_LINGER")));
        }
        drop(s);
        Done::Aborted
    }

    #[derive(Default)]
    struct Tally {
        conns: usize,
        completed: usize,
        aborted: usize,
        bytes: usize,
        hangs: usize,
        lost: usize,
        corrupt: usize,
        extra: usize,
        errors: usize,
        samples: Vec<String>,
    }

    impl Tally {
        fn add(&mut self, d: Done) {
            self.conns += 1;
            let msg = match d {
                Done::Ok { bytes } => {
                    self.completed += 1;
                    self.bytes += bytes;
                    return;
                }
                Done::Aborted => {
                    self.aborted += 1;
                    return;
                }
                Done::Failed(Failure::Hang(m)) => {
                    self.hangs += 1;
                    format!("hang: {m}")
                }
                Done::Failed(Failure::Lost(m)) => {
                    self.lost += 1;
                    format!("lost: {m}")
                }
                Done::Failed(Failure::Corrupt(m)) => {
                    self.corrupt += 1;
                    format!("corrupt: {m}")
                }
                Done::Failed(Failure::Extra(m)) => {
                    self.extra += 1;
                    format!("extra: {m}")
                }
                Done::Failed(Failure::Error(m)) => {
                    self.errors += 1;
                    format!("error: {m}")
                }
            };
            if self.samples.len() < 10 {
                self.samples.push(msg);
            }
        }
    }

    /// Runs the exchanges: `conns` of them (or as many as fit in
    /// `duration_ms`), `concurrency` at a time; with `hold`, every worker
    /// connects first and all send together (that many connections open at
    /// once). Prints one JSON line.
    pub fn client(addr: SocketAddr, o: &Opts, seed: u64) -> anyhow::Result<()> {
        let started = Instant::now();
        let next = AtomicU64::new(0);
        let tally = Mutex::new(Tally::default());
        let open = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let workers = if o.hold { o.conns } else { o.concurrency.max(1) };
        let barrier = o.hold.then(|| Arc::new(Barrier::new(workers)));
        let until = o.duration_ms.map(|ms| started + Duration::from_millis(ms));
        let finished = std::sync::atomic::AtomicBool::new(false);
        thread::scope(|scope| {
            if o.progress_ms > 0 {
                let (next, tally, finished) = (&next, &tally, &finished);
                scope.spawn(move || {
                    // What completed so far, and how many exchanges had
                    // started: the suite reads it at an event (a DEL, a
                    // reload) to know which bytes ran before it.
                    while !finished.load(Ordering::SeqCst) {
                        let (bytes, completed) = {
                            let t = tally.lock().unwrap();
                            (t.bytes, t.completed)
                        };
                        println!(
                            "{}",
                            serde_json::json!({"progress": true, "bytes": bytes, "completed": completed,
                                               "started": next.load(Ordering::SeqCst),
                                               "ms": started.elapsed().as_millis() as u64})
                        );
                        io::stdout().flush().ok();
                        thread::sleep(Duration::from_millis(o.progress_ms));
                    }
                });
            }
            let mut handles = Vec::new();
            for _ in 0..workers {
                let barrier = barrier.clone();
                let (next, tally, open, peak) = (&next, &tally, &open, &peak);
                let h = thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || {
                        loop {
                            let conn = next.fetch_add(1, Ordering::SeqCst);
                            let more = match until {
                                Some(t) => Instant::now() < t,
                                None => (conn as usize) < o.conns,
                            };
                            if !more {
                                return;
                            }
                            let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now_open, Ordering::SeqCst);
                            let d = exchange(addr, o, seed, conn, barrier.as_deref());
                            open.fetch_sub(1, Ordering::SeqCst);
                            tally.lock().unwrap().add(d);
                            if barrier.is_some() {
                                return;
                            }
                        }
                    })
                    .expect("spawn a worker");
                handles.push(h);
            }
            let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
            // Stop the progress thread before passing a worker's panic on.
            finished.store(true, Ordering::SeqCst);
            for j in joined {
                if let Err(panic) = j {
                    std::panic::resume_unwind(panic);
                }
            }
        });
        let t = tally.into_inner().unwrap();
        let failed = t.hangs + t.lost + t.corrupt + t.extra + t.errors;
        println!(
            "{}",
            serde_json::json!({
                "ok": failed == 0,
                "conns": t.conns, "completed": t.completed, "aborted": t.aborted, "bytes": t.bytes,
                "hangs": t.hangs, "lost": t.lost, "corrupt": t.corrupt, "extra": t.extra,
                "errors": t.errors, "samples": t.samples,
                "peak_open": peak.load(Ordering::SeqCst),
                "ms": started.elapsed().as_millis() as u64,
            })
        );
        io::stdout().flush()?;
        Ok(())
    }

    /// Reads with `reader` until EOF, echoing every byte.
    pub fn echo(addr: SocketAddr, reader: Reader) -> anyhow::Result<()> {
        let l = listen(addr)?;
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    s.set_read_timeout(Some(io_deadline())).ok();
                    if let Err(e) = echo_one(&mut s, reader) {
                        eprintln!("echo ({reader:?}): {e}");
                        // Make the failure visible to the client, not a silent EOF.
                        reset(&s);
                        return;
                    }
                    s.shutdown(Shutdown::Write).ok();
                })
                .ok();
        }
        Ok(())
    }

    fn reset(s: &TcpStream) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt(SO_LINGER) with a linger struct.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    fn fionread(s: &TcpStream) -> io::Result<usize> {
        let mut avail: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut avail) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(avail as usize)
    }

    fn echo_one(s: &mut TcpStream, reader: Reader) -> io::Result<()> {
        let mut w = s.try_clone()?;
        let mut buf = vec![0u8; 64 * 1024];
        let pipe = match reader {
            Reader::Splice => {
                let (r, w) = nix::unistd::pipe()?;
                Some((File::from(r), File::from(w)))
            }
            _ => None,
        };
        loop {
            let n = match (reader, &pipe) {
                (Reader::Read, _) => read_some(s, &mut buf)?,
                (Reader::Fionread, _) => {
                    // As apps that size their read by FIONREAD (cilium#19304).
                    wait(s, PollFlags::POLLIN)?;
                    let avail = fionread(s)?;
                    let n = read_some(s, &mut buf)?;
                    if n > 0 && avail == 0 {
                        return Err(io::Error::other(format!(
                            "FIONREAD said 0 bytes, then read() returned {n}"
                        )));
                    }
                    n
                }
                (Reader::Splice, Some((pr, pw))) => {
                    let deadline = Instant::now() + io_deadline();
                    let n = loop {
                        // SAFETY: splice(2) between fds we own.
                        let n = unsafe {
                            libc::splice(
                                s.as_raw_fd(),
                                std::ptr::null_mut(),
                                pw.as_raw_fd(),
                                std::ptr::null_mut(),
                                buf.len(),
                                0,
                            )
                        };
                        if n >= 0 {
                            break n as usize;
                        }
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::WouldBlock && !strict() && Instant::now() < deadline {
                            wait(s, PollFlags::POLLIN)?;
                        } else {
                            return Err(e);
                        }
                    };
                    let mut pr = pr;
                    pr.read_exact(&mut buf[..n])?;
                    n
                }
                (Reader::Splice, None) => unreachable!("a splice reader has its pipe"),
            };
            if n == 0 {
                return Ok(());
            }
            write_all(&mut w, &buf[..n])?;
        }
    }

    /// The slow reader: per connection a header (connection number, size),
    /// then `stall_ms` without reading, then reads of `read_chunk` bytes
    /// `read_delay_us` apart, each checked; answers with the number of bytes
    /// it verified (u64::MAX on a mismatch).
    pub fn sink(addr: SocketAddr, o: &Opts, seed: u64) -> anyhow::Result<()> {
        let l = listen(addr)?;
        let (stall, chunk, delay) = (o.stall_ms, o.read_chunk.max(1), o.read_delay_us);
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            thread::spawn(move || {
                s.set_read_timeout(Some(io_deadline())).ok();
                match sink_one(&mut s, seed, stall, chunk, delay) {
                    Ok(verified) => {
                        write_all(&mut s, &verified.to_le_bytes()).ok();
                    }
                    Err(e) => {
                        eprintln!("sink: {e:#}");
                        write_all(&mut s, &u64::MAX.to_le_bytes()).ok();
                    }
                }
                s.shutdown(Shutdown::Write).ok();
            });
        }
        Ok(())
    }

    fn sink_one(s: &mut TcpStream, seed: u64, stall: u64, chunk: usize, delay: u64) -> anyhow::Result<u64> {
        let mut head = [0u8; 16];
        super::read_exact(s, &mut head).context("header")?;
        let conn = u64::from_le_bytes(head[..8].try_into().unwrap());
        let size = u64::from_le_bytes(head[8..].try_into().unwrap());
        thread::sleep(Duration::from_millis(stall));
        let mut expect = Pattern::new(seed, conn);
        let mut buf = vec![0u8; chunk];
        let mut want = vec![0u8; chunk];
        let mut got = 0u64;
        loop {
            let n = read_some(s, &mut buf).with_context(|| format!("read after {got} of {size} B"))?;
            if n == 0 {
                break;
            }
            expect.fill(&mut want[..n]);
            if buf[..n] != want[..n] {
                bail!("bytes differ after {got} B");
            }
            got += n as u64;
            if got >= size {
                break;
            }
            if delay > 0 {
                thread::sleep(Duration::from_micros(delay));
            }
        }
        Ok(got)
    }

    /// The fast writer: header, then `bytes` bytes as fast as the socket
    /// takes them; a progress line every 100 ms ({"sent": N, "ms": T}), then
    /// the sink's verdict.
    pub fn flood(addr: SocketAddr, o: &Opts, seed: u64) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut s =
            TcpStream::connect_timeout(&addr, io_deadline()).with_context(|| format!("connect {addr}"))?;
        s.set_read_timeout(Some(io_deadline()))?;
        let conn = 0u64;
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&conn.to_le_bytes());
        head[8..].copy_from_slice(&o.bytes.to_le_bytes());
        write_all(&mut s, &head)?;
        let sent = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let progress = {
            let (sent, done) = (sent.clone(), done.clone());
            thread::spawn(move || {
                while done.load(Ordering::SeqCst) == 0 {
                    println!(
                        "{}",
                        serde_json::json!({"sent": sent.load(Ordering::SeqCst), "ms": started.elapsed().as_millis() as u64})
                    );
                    io::stdout().flush().ok();
                    thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let mut sender = Sender::new(o.writer)?;
        let mut p = Pattern::new(seed, conn);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = o.bytes;
        let result = (|| -> anyhow::Result<u64> {
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                p.fill(&mut buf[..n]);
                sender
                    .send(&mut s, &buf[..n])
                    .with_context(|| format!("write after {} B", o.bytes - left))?;
                left -= n as u64;
                sent.fetch_add(n as u64, Ordering::SeqCst);
            }
            s.shutdown(Shutdown::Write)?;
            let mut v = [0u8; 8];
            super::read_exact(&mut s, &mut v).context("the sink's verdict")?;
            Ok(u64::from_le_bytes(v))
        })();
        done.store(1, Ordering::SeqCst);
        progress.join().ok();
        let (ok, verified, error) = match result {
            Ok(v) => (v == o.bytes, v, String::new()),
            Err(e) => (false, 0, format!("{e:#}")),
        };
        println!(
            "{}",
            serde_json::json!({"done": true, "ok": ok, "sent": o.bytes - left, "verified": verified,
                               "error": error, "ms": started.elapsed().as_millis() as u64})
        );
        io::stdout().flush()?;
        Ok(())
    }
}
