//! What a pinned XDP link is attached to: its interface index, which aya 0.14 reads but
//! does not show. A link whose interface went away is defunct (index 0); one whose interface
//! was renamed runs on a device of another name. Either way it does not filter the interface
//! its pin is named after.

use std::{io, mem::size_of_val, os::fd::AsRawFd as _};

/// `BPF_OBJ_GET` and `BPF_OBJ_GET_INFO_BY_FD` from linux/bpf.h.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The interface index the XDP link pinned at `path` is attached to; 0 once its interface is
/// gone (the kernel detaches the program then and keeps the link defunct).
pub fn xdp_link_ifindex(path: &std::path::Path) -> io::Result<u32> {
    use std::os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags, path_fd; the rest zero.
    let mut get = [0u64; 16];
    get[0] = path.as_ptr() as u64;
    // SAFETY: `get` is a zero-padded bpf_attr whose pathname points to a NUL-terminated
    // string alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            get.as_mut_ptr(),
            size_of_val(&get) as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel just handed out.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose xdp member
    // starts with the ifindex (offset 16).
    let mut info = [0u8; 64];
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: `attr` is a zero-padded bpf_attr for BPF_OBJ_GET_INFO_BY_FD whose info buffer
    // is `info`, alive and writable for its length during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            size_of_val(&attr) as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes([info[16], info[17], info[18], info[19]]))
}
