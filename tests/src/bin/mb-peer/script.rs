//! The `script` role: named sockets driven line by line from stdin, for the
//! tests that need exact control (a local port shared by two connections, a
//! reused tuple, TCP Fast Open, blocking and non-blocking files, signals
//! during a blocking read). One reply line per command: `ok [...]` or
//! `err <what happened>`.
//!
//!   listen NAME ADDR [fastopen] [nonblock] [reuseport]  SO_REUSEADDR listener -> ok PORT
//!   accept NAME LISTENER [nonblock]          accept4(), SOCK_NONBLOCK    -> ok PEER
//!   connect NAME ADDR [BIND] [nonblock]      bound with SO_REUSEADDR; nonblock: the
//!                                            connect itself is non-blocking (poll)
//!                                            and the file stays so          -> ok LOCALPORT
//!   fastopen NAME ADDR TEXT N [BIND] [cork]  sendto(MSG_FASTOPEN) of TEXT×N, blocking
//!                                                                           -> ok LOCALPORT
//!   blocking NAME | nonblocking NAME         O_NONBLOCK off / on (fcntl)
//!   cork NAME | uncork NAME                  TCP_CORK on / off
//!   unsent NAME                              TCP_INFO: unacked segs, unsent bytes -> ok SEGS BYTES
//!   send NAME TEXT [N]                       write TEXT×N                   -> ok BYTES
//!   expect NAME TEXT [N]                     read exactly TEXT×N            -> ok | err (what came)
//!   read NAME N                              read exactly N bytes           -> ok TEXT | err
//!   quiet NAME MS                            nothing arrives for MS -> ok | ok eof | err got ...
//!   read_all NAME                            until EOF or error    -> ok BYTES END: TEXT
//!   bgread NAME N                            a thread reads N bytes; returns once it
//!                                            sleeps inside read()
//!   signal NAME                              SIGUSR1 (handler, SA_RESTART) to that thread
//!   bgjoin NAME MS                           its result -> ok TEXT | err ... | pending
//!   shutdown NAME                            SHUT_WR
//!   close NAME
//!   abort NAME                               SO_LINGER 0, then close: a reset
//!   send_oob NAME TEXT                       send(TEXT, MSG_OOB): its last byte is urgent -> ok BYTES
//!   recv_oob NAME                            recv(MSG_OOB), non-blocking  -> ok CHAR | err
//!   peek NAME N                              recv(MSG_PEEK) of up to N bytes, waiting -> ok TEXT
//!   recv_waitall NAME N                      one blocking recv(MSG_WAITALL) -> ok BYTES MS ms TEXT | err
//!   recv_once NAME N                         one blocking recv()       -> ok BYTES MS ms TEXT | err
//!   inq NAME                                 FIONREAD                  -> ok BYTES
//!   rcvlowat NAME N                          SO_RCVLOWAT
//!   repair_seqs NAME                         TCP_REPAIR: write_seq and rcv_nxt -> ok SND RCV
//!   repair_connect NAME ADDR BIND SND RCV    a TCP_REPAIR socket bound to BIND, its queues at
//!                                            SND/RCV, "connected" to ADDR without a packet -> ok
//!   zerocopy NAME TEXT N                     SO_ZEROCOPY, then send(TEXT×N, MSG_ZEROCOPY) -> ok BYTES
//!   zc_wait NAME MS                          the zerocopy completion within MS -> ok LO HI | err
//!   discard NAME N                           recv(NULL, N, MSG_TRUNC): drop N bytes -> ok BYTES
//!   peek_off NAME V                          SO_PEEK_OFF
//!   write_with NAME HOW TEXT N               write TEXT×N with writev (7-byte iovecs), sendfile
//!                                            (from a memfd) or splice (through a pipe) -> ok BYTES
//!   disconnect NAME                          connect(AF_UNSPEC): the socket may connect again
//!   reconnect NAME ADDR                      connect that same socket again -> ok LOCALPORT
//!   accept_any NAME L1 L2 [nonblock]         accept from whichever listener is ready -> ok LISTENER
//!   pid                                      this process's PID       -> ok PID
//!   ruid N                                   setresuid(N, -1, -1): real UID N, still root
//!   sim_connect NAME ADDR BIND               non-blocking connect, no wait -> ok
//!   wait_connected NAME                      poll until writable       -> ok | err
//!
//! Payloads are TEXT repeated N times, so a test can tell whose bytes
//! arrived where. A blocking socket's read that fails with EAGAIN before its
//! deadline is reported as such: that is the sockmap hazard a blocking
//! application would see, never a timeout.

use std::{
    collections::HashMap,
    io::{self, BufRead, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use socket2::{Domain, Protocol, Socket, Type};

use super::{io_deadline, wait, write_all};

/// TCP_REPAIR_QUEUE values (linux/tcp.h; not in the libc crate).
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;

/// SO_ZEROCOPY and SO_EE_ORIGIN_ZEROCOPY (asm-generic/socket.h, linux/errqueue.h).
const SO_ZEROCOPY: i32 = 60;
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;

/// What a background read ends with: the bytes, or what went wrong.
type ReadResult = Result<Vec<u8>, String>;

struct Conn {
    s: TcpStream,
    /// The file is blocking: EAGAIN from it is an error, not "poll again".
    blocking: bool,
    /// A background blocking read: its thread id and its result.
    bg: Option<(i32, mpsc::Receiver<ReadResult>)>,
}

enum Sock {
    Listener(TcpListener),
    Stream(Conn),
}

extern "C" fn on_sigusr1(_: libc::c_int) {}

pub fn run() -> anyhow::Result<()> {
    // A handler that restarts interrupted calls, as most runtimes install:
    // a blocking read() woken by it must go on waiting, never fail.
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_sigusr1),
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler does nothing.
    unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGUSR1, &action) }
        .context("sigaction")?;
    let mut socks: HashMap<String, Sock> = HashMap::new();
    let mut out = io::stdout();
    for line in io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match step(&mut socks, &words) {
            Ok(r) => r,
            Err(e) => format!("err {e:#}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

fn payload(text: &str, n: Option<&&str>) -> anyhow::Result<Vec<u8>> {
    let n: usize = n.map(|n| n.parse()).transpose()?.unwrap_or(1);
    Ok(text.as_bytes().repeat(n))
}

fn new_socket(addr: &SocketAddr) -> anyhow::Result<Socket> {
    let s = Socket::new(Domain::for_address(*addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    Ok(s)
}

/// The named connection's socket.
fn stream<'a>(socks: &'a mut HashMap<String, Sock>, name: &str) -> anyhow::Result<&'a mut TcpStream> {
    Ok(&mut conn(socks, name)?.s)
}

fn conn<'a>(socks: &'a mut HashMap<String, Sock>, name: &str) -> anyhow::Result<&'a mut Conn> {
    match socks.get_mut(name) {
        Some(Sock::Stream(c)) => Ok(c),
        Some(Sock::Listener(_)) => bail!("{name} is a listener"),
        None => bail!("no socket {name}"),
    }
}

fn show(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
    if bytes.len() > 80 { format!("{s}...") } else { s }
}

fn new_conn(s: TcpStream, blocking: bool) -> anyhow::Result<Conn> {
    s.set_nonblocking(!blocking)?;
    s.set_read_timeout(Some(io_deadline()))?;
    Ok(Conn {
        s,
        blocking,
        bg: None,
    })
}

fn poll_one(fd: impl AsFd, flags: PollFlags, ms: u64) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd.as_fd(), flags)];
    let t = PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX));
    Ok(nix::poll::poll(&mut fds, t)? > 0)
}

/// One read, as the application behind this socket would do it: a
/// non-blocking file polls and retries; a blocking file's EAGAIN before its
/// deadline is the sockmap hazard and an error.
fn read_once(s: &mut TcpStream, blocking: bool, buf: &mut [u8]) -> io::Result<usize> {
    let deadline = Instant::now() + io_deadline();
    loop {
        let t0 = Instant::now();
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && blocking => {
                let waited = t0.elapsed();
                return Err(if waited < io_deadline().mul_f32(0.9) {
                    io::Error::other(format!(
                        "EAGAIN from a blocking socket after {} ms (the sockmap hazard)",
                        waited.as_millis()
                    ))
                } else {
                    io::Error::new(io::ErrorKind::TimedOut, "no data within the deadline")
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !poll_one(&*s, PollFlags::POLLIN, left.as_millis() as u64)? {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no data within the deadline",
                    ));
                }
            }
            r => return r,
        }
    }
}

fn read_exactly(s: &mut TcpStream, blocking: bool, n: usize) -> Result<Vec<u8>, String> {
    let mut got = vec![0u8; n];
    let mut have = 0;
    while have < n {
        match read_once(s, blocking, &mut got[have..]) {
            Ok(0) => return Err(format!("EOF after {have} of {n} bytes: {:?}", show(&got[..have]))),
            Ok(k) => have += k,
            Err(e) => return Err(format!("{e} after {have} of {n} bytes: {:?}", show(&got[..have]))),
        }
    }
    Ok(got)
}

fn set_blocking(s: &TcpStream, blocking: bool) -> io::Result<()> {
    s.set_nonblocking(!blocking)
}

/// The state letter of thread `tid` of this process ("S": sleeping).
fn thread_state(tid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().next().map(str::to_owned)
}

fn step(socks: &mut HashMap<String, Sock>, w: &[&str]) -> anyhow::Result<String> {
    match w {
        ["listen", name, addr, rest @ ..] => {
            let addr: SocketAddr = addr.parse()?;
            let s = new_socket(&addr)?;
            if rest.contains(&"fastopen") {
                set_int(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_FASTOPEN, 64).context("TCP_FASTOPEN")?;
            }
            if rest.contains(&"reuseport") {
                s.set_reuse_port(true).context("SO_REUSEPORT")?;
            }
            // The file's flags at listen() are what the listener shows.
            s.set_nonblocking(rest.contains(&"nonblock"))?;
            s.bind(&addr.into()).with_context(|| format!("bind {addr}"))?;
            s.listen(128)?;
            let l: TcpListener = s.into();
            let port = l.local_addr()?.port();
            socks.insert(name.to_string(), Sock::Listener(l));
            Ok(format!("ok {port}"))
        }
        ["accept", name, listener, rest @ ..] => {
            let Some(Sock::Listener(l)) = socks.get(*listener) else {
                bail!("no listener {listener}")
            };
            if !poll_one(l, PollFlags::POLLIN, io_deadline().as_millis() as u64)? {
                bail!("nothing to accept within the deadline");
            }
            let nonblock = rest.contains(&"nonblock");
            let flags = if nonblock {
                nix::sys::socket::SockFlag::SOCK_NONBLOCK
            } else {
                nix::sys::socket::SockFlag::empty()
            };
            let fd = nix::sys::socket::accept4(l.as_raw_fd(), flags).context("accept4")?;
            // SAFETY: accept4 returned a new socket we now own.
            let s = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let peer = s.peer_addr()?;
            socks.insert(name.to_string(), Sock::Stream(new_conn(s, !nonblock)?));
            Ok(format!("ok {peer}"))
        }
        ["connect", name, addr, rest @ ..] => {
            let addr: SocketAddr = addr.parse()?;
            let s = new_socket(&addr)?;
            let nonblock = rest.contains(&"nonblock");
            if let Some(bind) = rest.iter().find(|w| **w != "nonblock") {
                let b: SocketAddr = bind.parse()?;
                s.bind(&b.into()).with_context(|| format!("bind {b}"))?;
            }
            if nonblock {
                s.set_nonblocking(true)?;
                match s.connect(&addr.into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                        if !poll_one(&s, PollFlags::POLLOUT, io_deadline().as_millis() as u64)? {
                            bail!("connect {addr}: not connected within the deadline");
                        }
                        if let Some(e) = s.take_error()? {
                            bail!("connect {addr}: {e}");
                        }
                    }
                    Err(e) => bail!("connect {addr}: {e}"),
                }
            } else {
                // A blocking connect() (socket2's connect_timeout would make
                // the file non-blocking while it connects): SO_SNDTIMEO bounds it.
                s.set_write_timeout(Some(io_deadline()))?;
                s.connect(&addr.into())
                    .with_context(|| format!("connect {addr}"))?;
                s.set_write_timeout(None)?;
            }
            let s: TcpStream = s.into();
            let port = s.local_addr()?.port();
            socks.insert(name.to_string(), Sock::Stream(new_conn(s, !nonblock)?));
            Ok(format!("ok {port}"))
        }
        ["fastopen", name, addr, text, n, rest @ ..] => {
            let addr: SocketAddr = addr.parse()?;
            let s = new_socket(&addr)?;
            for opt in rest {
                if *opt == "cork" {
                    // Partial frames wait in the write queue: the handshake's
                    // ACK then leaves alone, without data.
                    set_int(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_CORK, 1).context("TCP_CORK")?;
                } else {
                    let b: SocketAddr = opt.parse()?;
                    s.bind(&b.into()).with_context(|| format!("bind {b}"))?;
                }
            }
            let data = payload(text, Some(n))?;
            // A blocking sendto(MSG_FASTOPEN): connects, puts what fits in the
            // SYN (when a cookie is cached), waits for the handshake and then
            // writes the rest in the same call.
            let mut sent = 0;
            while sent < data.len() {
                let k = if sent == 0 {
                    s.send_to_with_flags(&data, &addr.into(), libc::MSG_FASTOPEN)
                } else {
                    s.send(&data[sent..])
                }
                .with_context(|| format!("sendto MSG_FASTOPEN {addr} after {sent} bytes"))?;
                sent += k;
            }
            let s: TcpStream = s.into();
            let port = s.local_addr()?.port();
            socks.insert(name.to_string(), Sock::Stream(new_conn(s, true)?));
            Ok(format!("ok {port}"))
        }
        [verb @ ("blocking" | "nonblocking"), name] => {
            let c = conn(socks, name)?;
            c.blocking = *verb == "blocking";
            set_blocking(&c.s, c.blocking)?;
            Ok("ok".into())
        }
        [verb @ ("cork" | "uncork"), name] => {
            let c = conn(socks, name)?;
            set_int(
                c.s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_CORK,
                i32::from(*verb == "cork"),
            )
            .context("TCP_CORK")?;
            Ok("ok".into())
        }
        ["unsent", name] => {
            // Bytes given to TCP and not yet acknowledged (TCP_INFO).
            let c = conn(socks, name)?;
            // SAFETY: tcp_info is plain integers.
            let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            // SAFETY: info/len describe a tcp_info buffer we own.
            let rc = unsafe {
                libc::getsockopt(
                    c.s.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    (&mut info as *mut libc::tcp_info).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error()).context("TCP_INFO");
            }
            Ok(format!("ok {} {}", info.tcpi_unacked, info.tcpi_notsent_bytes))
        }
        ["send", name, text, rest @ ..] => {
            let data = payload(text, rest.first())?;
            let c = conn(socks, name)?;
            if c.blocking {
                c.s.write_all(&data)?;
            } else {
                write_all(&mut c.s, &data)?;
            }
            Ok(format!("ok {}", data.len()))
        }
        ["expect", name, text, rest @ ..] => {
            let want = payload(text, rest.first())?;
            let c = conn(socks, name)?;
            let got = read_exactly(&mut c.s, c.blocking, want.len()).map_err(anyhow::Error::msg)?;
            if got != want {
                let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                bail!("differs at byte {at}: got {:?}", show(&got[at..]));
            }
            Ok("ok".into())
        }
        ["read", name, n] => {
            let c = conn(socks, name)?;
            let got = read_exactly(&mut c.s, c.blocking, n.parse()?).map_err(anyhow::Error::msg)?;
            Ok(format!("ok {}", show(&got)))
        }
        ["quiet", name, ms] => {
            let c = conn(socks, name)?;
            if !poll_one(&c.s, PollFlags::POLLIN, ms.parse()?)? {
                return Ok("ok".into());
            }
            let mut buf = vec![0u8; 4096];
            // SAFETY: recv(2) into a buffer we own.
            let n = unsafe {
                libc::recv(
                    c.s.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => Ok("ok eof".into()),
                n if n > 0 => bail!("got {n} bytes: {:?}", show(&buf[..n as usize])),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::WouldBlock {
                        // Woken without data (the sockmap's wakeups): nothing arrived.
                        return Ok("ok".into());
                    }
                    Ok(format!("ok error {e}"))
                }
            }
        }
        ["read_all", name] => {
            // Everything until EOF (or an error): what this socket was given.
            let c = conn(socks, name)?;
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65536];
            let end = loop {
                match read_once(&mut c.s, c.blocking, &mut buf) {
                    Ok(0) => break "eof".to_string(),
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                    Err(e) => break e.to_string(),
                }
            };
            Ok(format!("ok {} {end}: {:?}", got.len(), show(&got)))
        }
        ["bgread", name, n] => {
            let n: usize = n.parse()?;
            let c = conn(socks, name)?;
            let (blocking, mut s) = (c.blocking, c.s.try_clone()?);
            let (tid_tx, tid_rx) = mpsc::channel();
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                if tid_tx.send(nix::unistd::gettid().as_raw()).is_ok() {
                    // Nobody may be listening any more: the test gave up.
                    drop(tx.send(read_exactly(&mut s, blocking, n)));
                }
            });
            let tid = tid_rx
                .recv_timeout(Duration::from_secs(2))
                .context("reader thread")?;
            // Back only once the reader sleeps inside read(): a wakeup
            // before that would prove nothing.
            let until = Instant::now() + Duration::from_secs(2);
            while thread_state(tid).as_deref() != Some("S") {
                if Instant::now() > until {
                    bail!("the reader never slept in read()");
                }
                thread::yield_now();
            }
            c.bg = Some((tid, rx));
            Ok("ok".into())
        }
        ["signal", name] => {
            let c = conn(socks, name)?;
            let Some((tid, _)) = &c.bg else {
                bail!("no background read on {name}")
            };
            // SAFETY: tgkill(2) to a thread of this process.
            let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), *tid, libc::SIGUSR1) };
            if rc != 0 {
                return Err(io::Error::last_os_error()).context("tgkill");
            }
            Ok("ok".into())
        }
        ["bgjoin", name, ms] => {
            let c = conn(socks, name)?;
            let Some((_, rx)) = &c.bg else {
                bail!("no background read on {name}")
            };
            match rx.recv_timeout(Duration::from_millis(ms.parse()?)) {
                Ok(Ok(got)) => {
                    c.bg = None;
                    Ok(format!("ok {}", show(&got)))
                }
                Ok(Err(e)) => {
                    c.bg = None;
                    bail!("{e}")
                }
                Err(_) => Ok("pending".into()),
            }
        }
        ["shutdown", name] => {
            conn(socks, name)?.s.shutdown(Shutdown::Write)?;
            Ok("ok".into())
        }
        ["abort", name] => {
            let s = stream(socks, name)?;
            socket2::SockRef::from(&*s)
                .set_linger(Some(std::time::Duration::ZERO))
                .context("SO_LINGER")?;
            socks.remove(*name);
            Ok("ok".into())
        }
        ["send_oob", name, text] => {
            let s = stream(socks, name)?;
            // SAFETY: send(2) from a buffer we own.
            let n = unsafe { libc::send(s.as_raw_fd(), text.as_ptr().cast(), text.len(), libc::MSG_OOB) };
            if n < 0 {
                return Err(io::Error::last_os_error()).context("send MSG_OOB");
            }
            Ok(format!("ok {n}"))
        }
        ["recv_oob", name] => {
            let s = stream(socks, name)?;
            let mut b = [0u8; 1];
            // SAFETY: recv(2) into a buffer we own.
            let n = unsafe {
                libc::recv(
                    s.as_raw_fd(),
                    b.as_mut_ptr().cast(),
                    1,
                    libc::MSG_OOB | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error()).context("recv MSG_OOB");
            }
            Ok(format!("ok {}", show(&b[..n as usize])))
        }
        ["peek", name, n] => {
            let n: usize = n.parse()?;
            let s = stream(socks, name)?;
            wait(s, nix::poll::PollFlags::POLLIN)?;
            let mut b = vec![0u8; n];
            // SAFETY: recv(2) into a buffer we own.
            let k = unsafe {
                libc::recv(
                    s.as_raw_fd(),
                    b.as_mut_ptr().cast(),
                    n,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if k < 0 {
                return Err(io::Error::last_os_error()).context("recv MSG_PEEK");
            }
            Ok(format!("ok {}", show(&b[..k as usize])))
        }
        [verb @ ("recv_waitall" | "recv_once"), name, n] => {
            // One blocking recv(MSG_WAITALL) bounded by the socket's read
            // timeout (the I/O deadline): a short count means it timed out.
            let n: usize = n.parse()?;
            let s = stream(socks, name)?;
            let mut b = vec![0u8; n];
            let t0 = std::time::Instant::now();
            // SAFETY: recv(2) into a buffer we own.
            let flags = if *verb == "recv_waitall" {
                libc::MSG_WAITALL
            } else {
                0
            };
            let k = unsafe { libc::recv(s.as_raw_fd(), b.as_mut_ptr().cast(), n, flags) };
            if k < 0 {
                let e = io::Error::last_os_error();
                bail!("{e} after {} ms", t0.elapsed().as_millis());
            }
            Ok(format!(
                "ok {k} {} ms {}",
                t0.elapsed().as_millis(),
                show(&b[..k as usize])
            ))
        }
        ["inq", name] => {
            let s = stream(socks, name)?;
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int.
            if unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
                return Err(io::Error::last_os_error()).context("FIONREAD");
            }
            Ok(format!("ok {n}"))
        }
        ["rcvlowat", name, n] => {
            let s = stream(socks, name)?;
            set_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, n.parse()?).context("SO_RCVLOWAT")?;
            Ok("ok".into())
        }
        ["repair_seqs", name] => {
            // What a sniffer sees: the connection's sequence numbers
            // (TCP_REPAIR as root: TCP_QUEUE_SEQ of both queues).
            let s = stream(socks, name)?;
            let fd = s.as_raw_fd();
            set_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 1).context("TCP_REPAIR")?;
            let mut seqs = [0u32; 2];
            for (i, q) in [TCP_SEND_QUEUE, TCP_RECV_QUEUE].into_iter().enumerate() {
                set_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, q).context("TCP_REPAIR_QUEUE")?;
                seqs[i] =
                    get_fd_int(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ).context("TCP_QUEUE_SEQ")? as u32;
            }
            set_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 0).context("TCP_REPAIR off")?;
            Ok(format!("ok {} {}", seqs[0], seqs[1]))
        }
        ["repair_connect", name, addr, bind, snd, rcv] => {
            let addr: SocketAddr = addr.parse()?;
            let b: SocketAddr = bind.parse()?;
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            let fd = s.as_raw_fd();
            set_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 1).context("TCP_REPAIR")?;
            let snd: u32 = snd.parse()?;
            let rcv: u32 = rcv.parse()?;
            for (q, v) in [(TCP_SEND_QUEUE, snd), (TCP_RECV_QUEUE, rcv)] {
                set_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, q).context("TCP_REPAIR_QUEUE")?;
                set_int(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, v as i32).context("TCP_QUEUE_SEQ")?;
            }
            s.bind(&b.into()).with_context(|| format!("bind {b}"))?;
            s.connect(&addr.into())
                .with_context(|| format!("repair connect {addr}"))?;
            set_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, 0).context("TCP_REPAIR off")?;
            let s: TcpStream = s.into();
            socks.insert(name.to_string(), Sock::Stream(new_conn(s, true)?));
            Ok("ok".into())
        }
        ["zerocopy", name, text, n] => {
            let data = payload(text, Some(n))?;
            let s = stream(socks, name)?;
            let fd = s.as_raw_fd();
            set_int(fd, libc::SOL_SOCKET, SO_ZEROCOPY, 1).context("SO_ZEROCOPY")?;
            let mut sent = 0;
            while sent < data.len() {
                // SAFETY: send(2) from a buffer that outlives the call; the
                // kernel pins its pages until the completion (which the test
                // waits for before this process touches it again: never).
                let k = unsafe {
                    libc::send(
                        fd,
                        data[sent..].as_ptr().cast(),
                        data.len() - sent,
                        libc::MSG_ZEROCOPY,
                    )
                };
                if k < 0 {
                    return Err(io::Error::last_os_error()).context("send MSG_ZEROCOPY");
                }
                sent += k as usize;
            }
            // Pages stay pinned by the kernel until completion: keep them.
            std::mem::forget(data);
            Ok(format!("ok {sent}"))
        }
        ["zc_wait", name, ms] => {
            let ms: u16 = ms.parse()?;
            let s = stream(socks, name)?;
            let fd = s.as_raw_fd();
            // POLLERR is reported whatever the requested events.
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&*s),
                nix::poll::PollFlags::empty(),
            )];
            if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms))? == 0 {
                bail!("none within {ms} ms");
            }
            let mut control = [0u64; 32];
            let mut buf = [0u8; 1];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: 0,
            };
            // SAFETY: msghdr of buffers we own.
            let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
            mh.msg_iov = &mut iov;
            mh.msg_iovlen = 1;
            mh.msg_control = control.as_mut_ptr().cast();
            mh.msg_controllen = std::mem::size_of_val(&control);
            // SAFETY: recvmsg(2) into the buffers above.
            let rc = unsafe { libc::recvmsg(fd, &mut mh, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
            if rc < 0 {
                return Err(io::Error::last_os_error()).context("recvmsg MSG_ERRQUEUE");
            }
            // SAFETY: walking the control messages recvmsg(2) wrote.
            let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&mh) };
            while !cmsg.is_null() {
                // SAFETY: as above; the payload of IP(V6)_RECVERR is a sock_extended_err.
                let ee = unsafe {
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err)
                };
                if ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY {
                    return Ok(format!("ok {} {}", ee.ee_info, ee.ee_data));
                }
                // SAFETY: as above.
                cmsg = unsafe { libc::CMSG_NXTHDR(&mh, cmsg) };
            }
            bail!("an error-queue message that is no zerocopy completion")
        }
        ["discard", name, n] => {
            let n: usize = n.parse()?;
            let s = stream(socks, name)?;
            wait(s, nix::poll::PollFlags::POLLIN)?;
            // SAFETY: recv(2) with MSG_TRUNC copies nothing (TCP discards).
            let k = unsafe {
                libc::recv(
                    s.as_raw_fd(),
                    std::ptr::null_mut(),
                    n,
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                )
            };
            if k < 0 {
                return Err(io::Error::last_os_error()).context("recv MSG_TRUNC");
            }
            Ok(format!("ok {k}"))
        }
        ["peek_off", name, v] => {
            let s = stream(socks, name)?;
            set_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF, v.parse()?).context("SO_PEEK_OFF")?;
            Ok("ok".into())
        }
        ["write_with", name, how, text, n] => {
            let data = payload(text, Some(n))?;
            let s = stream(socks, name)?;
            let fd = s.as_raw_fd();
            match *how {
                "writev" => {
                    let mut off = 0;
                    while off < data.len() {
                        let iov: Vec<libc::iovec> = data[off..]
                            .chunks(7)
                            .take(512)
                            .map(|c| libc::iovec {
                                iov_base: c.as_ptr() as *mut _,
                                iov_len: c.len(),
                            })
                            .collect();
                        // SAFETY: iovecs into `data`, which outlives the call.
                        let k = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as i32) };
                        if k < 0 {
                            return Err(io::Error::last_os_error()).context("writev");
                        }
                        off += k as usize;
                    }
                }
                "sendfile" | "splice" => {
                    // SAFETY: memfd_create with a static name; the fd is owned by File.
                    let raw = unsafe { libc::memfd_create(c"mb-script".as_ptr(), libc::MFD_CLOEXEC) };
                    if raw < 0 {
                        return Err(io::Error::last_os_error()).context("memfd_create");
                    }
                    // SAFETY: a fresh descriptor nobody else owns.
                    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                    f.write_all(&data)?;
                    let mut off: libc::off_t = 0;
                    let (pr, pw) = nix::unistd::pipe()?;
                    let mut done = 0usize;
                    while done < data.len() {
                        let left = data.len() - done;
                        let k = if *how == "sendfile" {
                            // SAFETY: sendfile(2) between descriptors we own.
                            unsafe { libc::sendfile(fd, f.as_raw_fd(), &mut off, left) }
                        } else {
                            // SAFETY: splice(2) memfd -> pipe -> socket.
                            let m = unsafe {
                                libc::splice(
                                    f.as_raw_fd(),
                                    &mut off,
                                    pw.as_raw_fd(),
                                    std::ptr::null_mut(),
                                    left.min(65536),
                                    0,
                                )
                            };
                            if m < 0 {
                                return Err(io::Error::last_os_error()).context("splice into the pipe");
                            }
                            let mut moved = 0;
                            while moved < m {
                                // SAFETY: as above.
                                let k = unsafe {
                                    libc::splice(
                                        pr.as_raw_fd(),
                                        std::ptr::null_mut(),
                                        fd,
                                        std::ptr::null_mut(),
                                        (m - moved) as usize,
                                        0,
                                    )
                                };
                                if k < 0 {
                                    return Err(io::Error::last_os_error()).context("splice to the socket");
                                }
                                moved += k;
                            }
                            m
                        };
                        if k < 0 {
                            return Err(io::Error::last_os_error()).context("sendfile");
                        }
                        done += k as usize;
                    }
                }
                other => bail!("write_with writev|sendfile|splice, not {other}"),
            }
            Ok(format!("ok {}", data.len()))
        }
        ["pid"] => Ok(format!("ok {}", std::process::id())),
        ["ruid", n] => {
            let n: u32 = n.parse()?;
            // SAFETY: setresuid(2); -1 keeps the effective and saved IDs.
            if unsafe { libc::setresuid(n, u32::MAX, u32::MAX) } != 0 {
                return Err(io::Error::last_os_error()).context("setresuid");
            }
            Ok("ok".into())
        }
        ["sim_connect", name, addr, bind] => {
            let addr: SocketAddr = addr.parse()?;
            let b: SocketAddr = bind.parse()?;
            let s = new_socket(&addr)?;
            s.bind(&b.into()).with_context(|| format!("bind {b}"))?;
            s.set_nonblocking(true)?;
            match s.connect(&addr.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e).context("connect"),
            }
            let s: TcpStream = s.into();
            socks.insert(name.to_string(), Sock::Stream(new_conn(s, false)?));
            Ok("ok".into())
        }
        ["wait_connected", name] => {
            let s = stream(socks, name)?;
            wait(s, nix::poll::PollFlags::POLLOUT)?;
            if let Some(e) = s.take_error()? {
                bail!("connect: {e}");
            }
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(io_deadline()))?;
            Ok(format!("ok {}", s.peer_addr()?))
        }
        ["disconnect", name] => {
            // connect(AF_UNSPEC): tcp_disconnect(), the socket can connect again.
            let c = conn(socks, name)?;
            // SAFETY: a zeroed sockaddr with only the family set, as connect(2) takes it.
            let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
            sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
            // SAFETY: connect(2) with a sockaddr we own.
            let rc = unsafe {
                libc::connect(
                    c.s.as_raw_fd(),
                    &sa,
                    std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error()).context("connect AF_UNSPEC");
            }
            Ok("ok".into())
        }
        ["reconnect", name, addr] => {
            // The same socket (same cookie, same socket storage), connected
            // again in the file's current mode (as `connect` does).
            let addr: SocketAddr = addr.parse()?;
            let c = conn(socks, name)?;
            let sock = socket2::SockRef::from(&c.s);
            if c.blocking {
                sock.set_write_timeout(Some(io_deadline()))?;
                sock.connect(&addr.into())
                    .with_context(|| format!("reconnect {addr}"))?;
                sock.set_write_timeout(None)?;
            } else {
                match sock.connect(&addr.into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                        if !poll_one(&c.s, PollFlags::POLLOUT, io_deadline().as_millis() as u64)? {
                            bail!("reconnect {addr}: not connected within the deadline");
                        }
                        if let Some(e) = sock.take_error()? {
                            bail!("reconnect {addr}: {e}");
                        }
                    }
                    Err(e) => bail!("reconnect {addr}: {e}"),
                }
            }
            Ok(format!("ok {}", c.s.local_addr()?.port()))
        }
        ["accept_any", name, l1, l2, rest @ ..] => {
            // Whichever of two listeners (SO_REUSEPORT) has a connection.
            let (Some(Sock::Listener(a)), Some(Sock::Listener(b))) = (socks.get(*l1), socks.get(*l2)) else {
                bail!("no listeners {l1} {l2}")
            };
            let mut fds = [
                PollFd::new(a.as_fd(), PollFlags::POLLIN),
                PollFd::new(b.as_fd(), PollFlags::POLLIN),
            ];
            let t = PollTimeout::from(u16::try_from(io_deadline().as_millis()).unwrap_or(u16::MAX));
            if nix::poll::poll(&mut fds, t)? == 0 {
                bail!("nothing to accept within the deadline");
            }
            let first = fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
            let (which, l) = if first { (*l1, a) } else { (*l2, b) };
            let nonblock = rest.contains(&"nonblock");
            let flags = if nonblock {
                nix::sys::socket::SockFlag::SOCK_NONBLOCK
            } else {
                nix::sys::socket::SockFlag::empty()
            };
            let fd = nix::sys::socket::accept4(l.as_raw_fd(), flags).context("accept4")?;
            // SAFETY: accept4 returned a new socket we now own.
            let s = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            socks.insert(name.to_string(), Sock::Stream(new_conn(s, !nonblock)?));
            Ok(format!("ok {which}"))
        }
        ["close", name] => match socks.remove(*name) {
            Some(_) => Ok("ok".into()),
            None => bail!("no socket {name}"),
        },
        _ => bail!("unknown command {w:?}"),
    }
}

fn get_fd_int(fd: std::os::fd::RawFd, level: i32, opt: i32) -> io::Result<i32> {
    let mut v: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: getsockopt(2) with an int option value we own.
    let rc = unsafe { libc::getsockopt(fd, level, opt, (&mut v as *mut i32).cast(), &mut len) };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_int(fd: std::os::fd::RawFd, level: i32, opt: i32, v: i32) -> io::Result<()> {
    // SAFETY: setsockopt(2) with an int option value on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
