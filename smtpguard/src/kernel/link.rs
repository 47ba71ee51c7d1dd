//! What a pinned XDP link is attached to, and detaching it for certain. aya 0.14 reads a
//! link's interface index but does not show it: a link whose interface went away is defunct
//! (index 0); one whose interface was renamed runs on a device of another name. Either way it
//! does not filter the interface its pin is named after.

use std::{
    io,
    mem::size_of_val,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

/// `BPF_OBJ_GET`, `BPF_OBJ_GET_INFO_BY_FD` and `BPF_LINK_DETACH` from linux/bpf.h.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;

/// The interface index the XDP link pinned at `path` is attached to; 0 once its interface is
/// gone (the kernel detaches the program then and keeps the link defunct).
pub fn xdp_link_ifindex(path: &Path) -> io::Result<u32> {
    let fd = open_pin(path)?;
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose xdp member
    // starts with the ifindex (offset 16).
    let mut info = [0u8; 64];
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: `attr` is a zero-padded bpf_attr for BPF_OBJ_GET_INFO_BY_FD whose info buffer
    // is `info`, alive and writable for its length during the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(u32::from_ne_bytes([info[16], info[17], info[18], info[19]]))
}

/// Detaches the link pinned at `path` from its interface, then removes the pin. Removing the
/// pin alone is not enough: the kernel lets go of a pinned object after an RCU grace period and
/// releases a link from a work queue, so the program would go on filtering for a moment after
/// the pin is gone. `BPF_LINK_DETACH` takes the program off the interface before it returns
/// (a defunct link, whose interface is gone, detaches as a no-op).
pub fn detach_pinned(path: &Path) -> io::Result<()> {
    let fd = open_pin(path)?;
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd() as u32);
    // SAFETY: `attr` is a zero-padded bpf_attr for BPF_LINK_DETACH naming a link descriptor
    // this function holds.
    unsafe { bpf(BPF_LINK_DETACH, &mut attr) }?;
    std::fs::remove_file(path)
}

/// Opens the BPF object pinned at `path`.
fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags, path_fd; the rest zero.
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: `attr` is a zero-padded bpf_attr whose pathname points to a NUL-terminated
    // string alive for the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: a fresh descriptor the kernel just handed out.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The bpf(2) call `command` with `attr`; its non-negative result.
///
/// # Safety
/// Every pointer `attr` carries must be valid for what `command` does with it.
unsafe fn bpf(command: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for the pointers inside `attr`; the kernel reads and writes
    // no more than its size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.as_mut_ptr(),
            size_of_val(attr) as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
