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
