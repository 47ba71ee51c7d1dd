//! `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH`, which aya 0.14 does not wrap: one
//! system call writes or removes thousands of entries (the kernel runs its own per-element
//! update under the hood, LPM tries included). A policy of 100k prefixes per family would
//! otherwise cost hundreds of thousands of system calls.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

/// `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH` from linux/bpf.h.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Elements per system call: bounds the kernel's time in one call (it reschedules between
/// elements anyway).
const CHUNK: usize = 16 * 1024;

/// The `batch` member of `union bpf_attr`, padded to the union's size.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
    _rest: [u64; 12],
}

/// Writes `values[i]` under `keys[i]`. `values` holds `value_size` bytes per key (for per-CPU
/// maps, one rounded-up value per possible CPU). On error, returns how many were written.
pub fn update(
    map: BorrowedFd<'_>,
    keys: &[u8],
    key_size: usize,
    values: &[u8],
    value_size: usize,
) -> Result<(), (usize, io::Error)> {
    let count = keys.len() / key_size;
    debug_assert_eq!(values.len(), count * value_size);
    let mut done = 0;
    while done < count {
        let n = (count - done).min(CHUNK);
        let mut attr = BatchAttr {
            keys: keys[done * key_size..].as_ptr() as u64,
            values: values[done * value_size..].as_ptr() as u64,
            count: n as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let written = call(BPF_MAP_UPDATE_BATCH, &mut attr);
        match written {
            Ok(()) => done += n,
            Err(error) => return Err((done + processed(&attr, n), error)),
        }
    }
    Ok(())
}

/// Removes `keys` (each `key_size` bytes). A key that is not there is an error from the
/// kernel (`ENOENT`): remove only what the map holds. On error, returns how many went.
pub fn delete(map: BorrowedFd<'_>, keys: &[u8], key_size: usize) -> Result<(), (usize, io::Error)> {
    let count = keys.len() / key_size;
    let mut done = 0;
    while done < count {
        let n = (count - done).min(CHUNK);
        let mut attr = BatchAttr {
            keys: keys[done * key_size..].as_ptr() as u64,
            count: n as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match call(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => done += n,
            Err(error) => return Err((done + processed(&attr, n), error)),
        }
    }
    Ok(())
}

/// As [`delete`], but a key the map does not hold is as good as removed: the batch steps over
/// it and goes on. On another error, returns how many keys were dealt with.
pub fn delete_present(
    map: BorrowedFd<'_>,
    keys: &[u8],
    key_size: usize,
) -> Result<(), (usize, io::Error)> {
    let count = keys.len() / key_size;
    let mut done = 0;
    while done < count {
        match delete(map, &keys[done * key_size..], key_size) {
            Ok(()) => return Ok(()),
            Err((more, error)) if error.raw_os_error() == Some(libc::ENOENT) => done += more + 1,
            Err((more, error)) => return Err((done + more, error)),
        }
    }
    Ok(())
}

/// How many of the `sent` elements a failed batch call dealt with. The kernel writes the
/// count back when an element fails, and that element is not in it, so it is below `sent`;
/// an error it returns before the first element (no memory for its buffers, a map without
/// batch operations) leaves the count as it was sent, and then none was dealt with.
fn processed(attr: &BatchAttr, sent: usize) -> usize {
    let count = attr.count as usize;
    if count < sent { count } else { 0 }
}

fn call(command: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, zero-padded `union bpf_attr` for a batch command whose key
    // and value pointers cover `count` elements, alive for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
