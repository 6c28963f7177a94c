//! `mb-peer`: the traffic helper of the privileged tests. It joins a cgroup
//! (first: `ip netns exec` would hide the cgroup2 mount), enters a netns,
//! optionally drops to a UID, then plays one role:
//!
//!   echo   --listen ADDR [--splice]          echo every connection back
//!   proxy  --listen ADDR [--to ADDR]         forward (SO_ORIGINAL_DST without --to)
//!   client --connect ADDR --sizes N,N,...    one connection per size, echo checked
//!   interactive --connect ADDR               stdin: connect | send N | close | quit
//!   exec -- PROGRAM ARGS...                  run a program in that place (a sidecar, curl)
//!
//! common: --cgroup DIR --netns PATH --uid N --blocking
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

const IO_DEADLINE: Duration = Duration::from_secs(20);

static STRICT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn strict() -> bool {
    STRICT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Waits until `s` is readable (or writable) within the I/O deadline.
fn wait(s: &TcpStream, flags: nix::poll::PollFlags) -> io::Result<()> {
    let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(s), flags)];
    let ms = u16::try_from(IO_DEADLINE.as_millis()).unwrap_or(u16::MAX);
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
    let deadline = std::time::Instant::now() + IO_DEADLINE;
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
    let deadline = std::time::Instant::now() + IO_DEADLINE;
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
        "echo" => echo(a.listen.context("--listen")?, a.splice),
        "proxy" => proxy(a.listen.context("--listen")?, a.to),
        "client" => client(a.connect.context("--connect")?, &a.sizes, a.seed),
        "interactive" => interactive(a.connect.context("--connect")?, a.seed),
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
    println!("ready {}", l.local_addr()?.port());
    io::stdout().flush()?;
    Ok(l)
}

fn echo(addr: SocketAddr, splice: bool) -> anyhow::Result<()> {
    let l = listen(addr)?;
    for conn in l.incoming() {
        let Ok(mut s) = conn else { continue };
        thread::spawn(move || {
            s.set_read_timeout(Some(IO_DEADLINE)).ok();
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

fn proxy(addr: SocketAddr, to: Option<SocketAddr>) -> anyhow::Result<()> {
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
            let up = match TcpStream::connect_timeout(&target, IO_DEADLINE) {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("proxy: connect {target}: {e}");
                    return;
                }
            };
            if let Err(e) = splice_both(down, up) {
                eprintln!("proxy: {e}");
            }
        });
    }
    Ok(())
}

/// Copies both directions (read/write), propagating half-close.
fn splice_both(a: TcpStream, b: TcpStream) -> io::Result<()> {
    for s in [&a, &b] {
        s.set_read_timeout(Some(IO_DEADLINE))?;
    }
    let (mut a_r, mut b_w) = (a.try_clone()?, b.try_clone()?);
    let t = thread::spawn(move || copy_half(&mut a_r, &mut b_w));
    let (mut b_r, mut a_w) = (b, a);
    let r = copy_half(&mut b_r, &mut a_w);
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
    let s = TcpStream::connect_timeout(&addr, IO_DEADLINE).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(IO_DEADLINE))?;
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
            (Some("connect"), _) => match TcpStream::connect_timeout(&addr, IO_DEADLINE) {
                Ok(s) => {
                    s.set_read_timeout(Some(IO_DEADLINE))?;
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
