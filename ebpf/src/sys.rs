//! The bpf(2) commands this crate issues itself rather than through aya's
//! types, on the kernel's own structures as aya generates them
//! (`aya_obj::generated`): opening and pinning objects by path, attaching
//! the sk_msg program to the pinned socket map (the attachment then
//! belongs to the map and outlives every process) and detaching it, the
//! per-pod cgroup links (created without aya's feature probes, which
//! every pod start would pay), pointing a link at a new program, and the
//! program IDs that tell which program a pin or link runs.

use std::{
    ffi::CString,
    io, mem,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

pub use aya_obj::generated::bpf_attach_type;
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_prog_info};

/// A bpf(2) command the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("bpf({call:?}) failed")]
pub struct SyscallError {
    /// The command, e.g. `BPF_LINK_UPDATE`.
    pub call: bpf_cmd,
    #[source]
    pub source: io::Error,
}

impl SyscallError {
    /// The errno the kernel answered with.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// An all-zero `bpf_attr`: every command reads the fields it does not use
/// as zero.
fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a union of integer structs; all zeroes is valid.
    unsafe { mem::zeroed() }
}

/// The one bpf(2) wrapper: `cmd` with `attr`, its full size passed along.
fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> Result<libc::c_long, SyscallError> {
    // SAFETY: `attr` is a valid, initialised bpf_attr; every pointer in it
    // (path, info buffer) outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        Err(SyscallError {
            call: cmd,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(rc)
    }
}

/// [`sys_bpf`] for the commands that return a new file descriptor.
fn fd_sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> Result<OwnedFd, SyscallError> {
    let fd = sys_bpf(cmd, attr)?;
    // SAFETY: the kernel just returned this new fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn fd(fd: BorrowedFd<'_>) -> u32 {
    fd.as_raw_fd() as u32
}

/// `path` as the kernel reads it; a path with a NUL byte is refused as
/// the kernel would refuse it (`EINVAL`) without asking.
fn c_path(call: bpf_cmd, path: &Path) -> Result<CString, SyscallError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| SyscallError {
        call,
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })
}

/// `BPF_OBJ_GET`: opens the object pinned at `path`.
pub fn obj_get(path: &Path) -> Result<OwnedFd, SyscallError> {
    let path = c_path(bpf_cmd::BPF_OBJ_GET, path)?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    fd_sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)
}

/// `BPF_OBJ_PIN`: pins `object` at `path`.
pub fn obj_pin(object: BorrowedFd<'_>, path: &Path) -> Result<(), SyscallError> {
    let path = c_path(bpf_cmd::BPF_OBJ_PIN, path)?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    attr.__bindgen_anon_4.bpf_fd = fd(object);
    sys_bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(drop)
}

/// `BPF_PROG_ATTACH` (`attach`) or `BPF_PROG_DETACH` of `prog` on `target`.
fn prog_attachment(
    call: bpf_cmd,
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: bpf_attach_type,
) -> Result<(), SyscallError> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_5.__bindgen_anon_1.target_fd = fd(target);
    attr.__bindgen_anon_5.attach_bpf_fd = fd(prog);
    attr.__bindgen_anon_5.attach_type = attach_type as u32;
    sys_bpf(call, &mut attr).map(drop)
}

/// `BPF_PROG_ATTACH` of `prog` to `target` (here: a socket map). Attaching
/// the program already there replaces it with itself: idempotent.
pub fn prog_attach(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: bpf_attach_type,
) -> Result<(), SyscallError> {
    prog_attachment(bpf_cmd::BPF_PROG_ATTACH, prog, target, attach_type)
}

/// `BPF_PROG_DETACH` of `prog` from `target`.
pub fn prog_detach(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: bpf_attach_type,
) -> Result<(), SyscallError> {
    prog_attachment(bpf_cmd::BPF_PROG_DETACH, prog, target, attach_type)
}

/// `BPF_LINK_CREATE` of `prog` on `target` (a cgroup directory fd).
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: bpf_attach_type,
) -> Result<OwnedFd, SyscallError> {
    let mut attr = zeroed_attr();
    attr.link_create.__bindgen_anon_1.prog_fd = fd(prog);
    attr.link_create.__bindgen_anon_2.target_fd = fd(target);
    attr.link_create.attach_type = attach_type as u32;
    fd_sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)
}

/// `BPF_LINK_UPDATE`: points `link` at `prog` (same type and attach point).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> Result<(), SyscallError> {
    let mut attr = zeroed_attr();
    attr.link_update.link_fd = fd(link);
    attr.link_update.__bindgen_anon_1.new_prog_fd = fd(prog);
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// The kernel's `bpf_*_info` structs: integers and unions of integers,
/// for which all zeroes is a valid value.
trait Info {}
impl Info for bpf_prog_info {}
impl Info for bpf_link_info {}

/// `BPF_OBJ_GET_INFO_BY_FD` into `T`.
fn info<T: Info>(object: BorrowedFd<'_>) -> Result<T, SyscallError> {
    // SAFETY: `T` is one of the kernel's info structs (see `Info`).
    let mut info: T = unsafe { mem::zeroed() };
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = fd(object);
    attr.info.info_len = mem::size_of::<T>() as u32;
    attr.info.info = (&raw mut info) as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// The kernel ID of a program (`bpf_prog_info.id`).
pub fn prog_id(prog: BorrowedFd<'_>) -> Result<u32, SyscallError> {
    info::<bpf_prog_info>(prog).map(|i| i.id)
}

/// The ID of the program a link runs (`bpf_link_info.prog_id`).
pub fn link_prog_id(link: BorrowedFd<'_>) -> Result<u32, SyscallError> {
    info::<bpf_link_info>(link).map(|i| i.prog_id)
}
