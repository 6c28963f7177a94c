//! The two bpf(2) commands aya keeps behind its link types: attaching the
//! sk_msg program to the pinned socket map so that the attachment belongs to
//! the map (and outlives every process), and detaching it on unload.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
/// `BPF_SK_MSG_VERDICT` in `enum bpf_attach_type`.
pub const BPF_SK_MSG_VERDICT: u32 = 7;

#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn bpf(cmd: libc::c_long, attr: &AttachAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix for both
    // commands and its size is passed along.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const AttachAttr,
            std::mem::size_of::<AttachAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Attaches `prog` to the socket map `map`. Attaching the program already
/// there replaces it with itself, so this is idempotent.
pub fn map_prog_attach(prog: BorrowedFd<'_>, map: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    bpf(
        BPF_PROG_ATTACH,
        &AttachAttr {
            target_fd: map.as_raw_fd() as u32,
            attach_bpf_fd: prog.as_raw_fd() as u32,
            attach_type,
            ..Default::default()
        },
    )
}

/// Detaches `prog` from the socket map `map`.
pub fn map_prog_detach(prog: BorrowedFd<'_>, map: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    bpf(
        BPF_PROG_DETACH,
        &AttachAttr {
            target_fd: map.as_raw_fd() as u32,
            attach_bpf_fd: prog.as_raw_fd() as u32,
            attach_type,
            ..Default::default()
        },
    )
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_CGROUP_SOCK_OPS` in `enum bpf_attach_type`.
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    // The kernel reads the rest of the union as zero.
    _rest: [u64; 4],
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised prefix of bpf_attr for `cmd`,
    // and its size is passed along.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: libc::c_long) -> std::os::fd::OwnedFd {
    // SAFETY: the kernel just returned this new fd to us.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) }
}

/// `BPF_OBJ_GET`: opens a pinned object.
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(io::Error::other)?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    sys_bpf(BPF_OBJ_GET, &attr).map(owned)
}

/// `BPF_OBJ_PIN`: pins `fd` at `path`.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &std::path::Path) -> io::Result<()> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(io::Error::other)?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    sys_bpf(BPF_OBJ_PIN, &attr).map(|_| ())
}

/// `BPF_LINK_CREATE` of `prog` on `target` (a cgroup directory fd).
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    sys_bpf(BPF_LINK_CREATE, &attr).map(owned)
}
