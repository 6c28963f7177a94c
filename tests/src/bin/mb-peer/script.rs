//! The `script` role: named sockets driven line by line from stdin, for the
//! adversarial tests that need exact control (a local port shared by two
//! connections, a reused tuple, TCP Fast Open). One reply line per command:
//! `ok [...]` or `err <what happened>`.
//!
//!   listen NAME ADDR [fastopen]      SO_REUSEADDR listener        -> ok PORT
//!   accept NAME LISTENER             the next connection          -> ok PEER
//!   connect NAME ADDR [BIND]         bound with SO_REUSEADDR      -> ok LOCALPORT
//!   fastopen NAME ADDR TEXT N [BIND] [cork]
//!                                    sendto(MSG_FASTOPEN) of TEXT×N, blocking -> ok LOCALPORT
//!   cork NAME | uncork NAME          TCP_CORK on / off
//!   unsent NAME                      TCP_INFO: unacked segments, bytes not sent -> ok SEGS BYTES
//!   send NAME TEXT [N]               write TEXT×N                  -> ok BYTES
//!   expect NAME TEXT [N]             read exactly TEXT×N           -> ok | err (what came)
//!   read NAME N                      read exactly N bytes          -> ok TEXT | err (what came)
//!   quiet NAME MS                    nothing arrives for MS        -> ok | ok eof | err got ...
//!   read_all NAME                    everything until EOF or error -> ok BYTES END: TEXT
//!   shutdown NAME                    SHUT_WR
//!   close NAME
//!
//! Payloads are TEXT repeated N times, so a test can tell whose bytes
//! arrived where.

use std::{
    collections::HashMap,
    io::{self, BufRead, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
};

use anyhow::{Context, bail};
use socket2::{Domain, Protocol, Socket, Type};

use super::{io_deadline, read_some, wait, write_all};

enum Sock {
    Listener(TcpListener),
    Stream(TcpStream),
}

pub fn run() -> anyhow::Result<()> {
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

fn stream<'a>(socks: &'a mut HashMap<String, Sock>, name: &str) -> anyhow::Result<&'a mut TcpStream> {
    match socks.get_mut(name) {
        Some(Sock::Stream(s)) => Ok(s),
        Some(Sock::Listener(_)) => bail!("{name} is a listener"),
        None => bail!("no socket {name}"),
    }
}

fn show(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
    if bytes.len() > 80 { format!("{s}...") } else { s }
}

fn step(socks: &mut HashMap<String, Sock>, w: &[&str]) -> anyhow::Result<String> {
    match w {
        ["listen", name, addr, rest @ ..] => {
            let addr: SocketAddr = addr.parse()?;
            let s = new_socket(&addr)?;
            if rest.first() == Some(&"fastopen") {
                set_int(&s, libc::IPPROTO_TCP, libc::TCP_FASTOPEN, 64).context("TCP_FASTOPEN")?;
            }
            s.bind(&addr.into()).with_context(|| format!("bind {addr}"))?;
            s.listen(128)?;
            let l: TcpListener = s.into();
            let port = l.local_addr()?.port();
            socks.insert(name.to_string(), Sock::Listener(l));
            Ok(format!("ok {port}"))
        }
        ["accept", name, listener] => {
            let Some(Sock::Listener(l)) = socks.get(*listener) else {
                bail!("no listener {listener}")
            };
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(l),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = u16::try_from(io_deadline().as_millis()).unwrap_or(u16::MAX);
            if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms))? == 0 {
                bail!("nothing to accept within the deadline");
            }
            let (s, peer) = l.accept()?;
            s.set_read_timeout(Some(io_deadline()))?;
            socks.insert(name.to_string(), Sock::Stream(s));
            Ok(format!("ok {peer}"))
        }
        ["connect", name, addr, rest @ ..] => {
            let addr: SocketAddr = addr.parse()?;
            let s = new_socket(&addr)?;
            if let Some(bind) = rest.first() {
                let b: SocketAddr = bind.parse()?;
                s.bind(&b.into()).with_context(|| format!("bind {b}"))?;
            }
            s.connect_timeout(&addr.into(), io_deadline())
                .with_context(|| format!("connect {addr}"))?;
            let s: TcpStream = s.into();
            s.set_read_timeout(Some(io_deadline()))?;
            let port = s.local_addr()?.port();
            socks.insert(name.to_string(), Sock::Stream(s));
            Ok(format!("ok {port}"))
        }
        ["fastopen", name, addr, text, n, rest @ ..] => {
            let addr: SocketAddr = addr.parse()?;
            let s = new_socket(&addr)?;
            for opt in rest {
                if *opt == "cork" {
                    // Partial frames wait in the write queue: the handshake's
                    // ACK then leaves alone, without data.
                    set_int(&s, libc::IPPROTO_TCP, libc::TCP_CORK, 1).context("TCP_CORK")?;
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
            s.set_read_timeout(Some(io_deadline()))?;
            let port = s.local_addr()?.port();
            socks.insert(name.to_string(), Sock::Stream(s));
            Ok(format!("ok {port}"))
        }
        ["send", name, text, rest @ ..] => {
            let data = payload(text, rest.first())?;
            write_all(stream(socks, name)?, &data)?;
            Ok(format!("ok {}", data.len()))
        }
        ["expect", name, text, rest @ ..] => {
            let want = payload(text, rest.first())?;
            let s = stream(socks, name)?;
            let mut got = vec![0u8; want.len()];
            let mut have = 0;
            while have < want.len() {
                match read_some(s, &mut got[have..]) {
                    Ok(0) => bail!(
                        "EOF after {have} of {} bytes: {:?}",
                        want.len(),
                        show(&got[..have])
                    ),
                    Ok(k) => have += k,
                    Err(e) => bail!(
                        "{e} after {have} of {} bytes: {:?}",
                        want.len(),
                        show(&got[..have])
                    ),
                }
            }
            if got != want {
                let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                bail!("differs at byte {at}: got {:?}", show(&got[at..]));
            }
            Ok("ok".into())
        }
        ["read", name, n] => {
            // Exactly N bytes (or what came before EOF or the deadline).
            let n: usize = n.parse()?;
            let s = stream(socks, name)?;
            let mut got = vec![0u8; n];
            let mut have = 0;
            while have < n {
                match read_some(s, &mut got[have..]) {
                    Ok(0) => bail!("EOF after {have} of {n} bytes: {:?}", show(&got[..have])),
                    Ok(k) => have += k,
                    Err(e) => bail!("{e} after {have} of {n} bytes: {:?}", show(&got[..have])),
                }
            }
            Ok(format!("ok {}", show(&got)))
        }
        ["quiet", name, ms] => {
            let ms: u64 = ms.parse()?;
            let s = stream(socks, name)?;
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&*s),
                nix::poll::PollFlags::POLLIN,
            )];
            let t = nix::poll::PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX));
            if nix::poll::poll(&mut fds, t)? == 0 {
                return Ok("ok".into());
            }
            let mut buf = vec![0u8; 4096];
            // SAFETY: recv(2) into a buffer we own.
            let n = unsafe {
                libc::recv(
                    s.as_raw_fd(),
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
            let s = stream(socks, name)?;
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65536];
            let end = loop {
                match s.read(&mut buf) {
                    Ok(0) => break "eof".to_string(),
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(e) = wait(s, nix::poll::PollFlags::POLLIN) {
                            break e.to_string();
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break e.to_string(),
                }
            };
            Ok(format!("ok {} {end}: {:?}", got.len(), show(&got)))
        }
        [verb @ ("cork" | "uncork"), name] => {
            let s = stream(socks, name)?;
            set_fd_int(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_CORK,
                i32::from(*verb == "cork"),
            )
            .context("TCP_CORK")?;
            Ok("ok".into())
        }
        ["unsent", name] => {
            // Bytes given to TCP and not yet acknowledged (TCP_INFO).
            let s = stream(socks, name)?;
            // SAFETY: tcp_info is plain integers; getsockopt(2) fills at most len bytes.
            let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            // SAFETY: info/len describe a tcp_info buffer we own.
            let rc = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
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
        ["shutdown", name] => {
            stream(socks, name)?.shutdown(Shutdown::Write)?;
            Ok("ok".into())
        }
        ["close", name] => match socks.remove(*name) {
            Some(_) => Ok("ok".into()),
            None => bail!("no socket {name}"),
        },
        _ => bail!("unknown command {w:?}"),
    }
}

fn set_int(s: &Socket, level: i32, opt: i32, v: i32) -> io::Result<()> {
    set_fd_int(s.as_raw_fd(), level, opt, v)
}

fn set_fd_int(fd: std::os::fd::RawFd, level: i32, opt: i32, v: i32) -> io::Result<()> {
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
