//! Network namespace cookies (SO_NETNS_COOKIE), the datapath's name for a pod.

use std::{fs::File, io, path::Path, thread};

use nix::sched::{CloneFlags, setns};

/// `SO_NETNS_COOKIE` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter network namespace {path}")]
    Enter {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot read SO_NETNS_COOKIE (Linux 5.14 or newer is needed)")]
    Cookie(#[source] io::Error),
    #[error("the netns thread panicked")]
    Thread,
}

/// The cookie of the calling thread's network namespace.
pub fn current_cookie() -> Result<u64, NetnsError> {
    // SAFETY: plain socket(2); the fd is owned and closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetnsError::Cookie(io::Error::last_os_error()));
    }
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie/len describe a valid u64 buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(NetnsError::Cookie(err));
    }
    Ok(cookie)
}

/// The cookie of the network namespace at `path` (e.g. `/var/run/netns/x`,
/// `/proc/<pid>/ns/net`), read from a short-lived thread that enters it.
pub fn cookie_of(path: &Path) -> Result<u64, NetnsError> {
    in_netns(path, current_cookie)?
}

/// Runs `f` on a thread inside the network namespace at `path`.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: shown.clone(),
        source,
    })?;
    thread::scope(|s| {
        s.spawn(|| {
            // setns affects only this thread, which ends with the scope.
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                path: shown.clone(),
                source,
            })?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::Thread)?
    })
}
