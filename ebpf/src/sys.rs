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
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
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

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `BPF_LINK_UPDATE`: points `link` at `prog` (same type and attach point).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_LINK_UPDATE, &attr).map(|_| ())
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The kernel ID of a program (`bpf_prog_info.id`) or, for a link, of the
/// program it runs (`bpf_link_info.prog_id`).
fn info_u32(fd: BorrowedFd<'_>, index: usize) -> io::Result<u32> {
    // bpf_prog_info: type, id, ...; bpf_link_info: type, id, prog_id, ...
    let mut info = [0u32; 4];
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(info[index])
}

/// `bpf_prog_info.id` of a program fd.
pub fn prog_id(prog: BorrowedFd<'_>) -> io::Result<u32> {
    info_u32(prog, 1)
}

/// `bpf_link_info.prog_id` of a link fd: the program the link runs.
pub fn link_prog_id(link: BorrowedFd<'_>) -> io::Result<u32> {
    info_u32(link, 2)
}
