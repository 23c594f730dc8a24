//! The few `bpf()` commands steering needs, on raw file descriptors: create a map, update,
//! delete and look up an element, load a program, link it to a network namespace. Every
//! descriptor the kernel returns is close-on-exec, so services started later never inherit
//! one, and a link goes away with the last descriptor of it (when torpor exits or dies).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use crate::program::Insn;

const MAP_CREATE: libc::c_int = 0;
const MAP_LOOKUP_ELEM: libc::c_int = 1;
const MAP_UPDATE_ELEM: libc::c_int = 2;
const MAP_DELETE_ELEM: libc::c_int = 3;
const PROG_LOAD: libc::c_int = 5;
const LINK_CREATE: libc::c_int = 28;

/// `BPF_MAP_TYPE_ARRAY`.
pub const MAP_ARRAY: u32 = 2;
/// `BPF_MAP_TYPE_SOCKMAP`.
pub const MAP_SOCKMAP: u32 = 15;
/// `BPF_PROG_TYPE_SK_LOOKUP`.
const PROG_SK_LOOKUP: u32 = 30;
/// `BPF_SK_LOOKUP`, the attach type of a network namespace's socket lookup.
const ATTACH_SK_LOOKUP: u32 = 36;

/// Size of the verifier log kept when a load fails (its last lines say why).
const LOG_SIZE: usize = 64 << 10;

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    /// The union of per-type fields that follows; zero for sk_lookup.
    _rest: [u64; 4],
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `repr(C)` attribute block of the layout the
    // command expects, and its size is passed with it; the kernel writes only within it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// A new map; `value_size` is 4 for a SOCKMAP (the socket's descriptor as it is inserted).
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries,
        ..Default::default()
    };
    bpf(MAP_CREATE, &mut attr).map(owned)
}

fn elem(map: BorrowedFd<'_>, key: &u32, value: u64) -> MapElem {
    MapElem {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const u32 as u64,
        value,
        ..Default::default()
    }
}

/// Puts socket `socket` in slot `key` of SOCKMAP `map` (replacing what was there).
pub fn sockmap_set(map: BorrowedFd<'_>, key: u32, socket: BorrowedFd<'_>) -> io::Result<()> {
    let fd: u32 = socket.as_raw_fd() as u32;
    let mut attr = elem(map, &key, &fd as *const u32 as u64);
    bpf(MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Empties slot `key` of SOCKMAP `map`; an empty slot is not an error (the kernel says
/// EINVAL for it, ENOENT for other map types).
pub fn sockmap_delete(map: BorrowedFd<'_>, key: u32) -> io::Result<()> {
    let mut attr = elem(map, &key, 0);
    match bpf(MAP_DELETE_ELEM, &mut attr) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => Ok(()),
        r => r.map(drop),
    }
}

/// The u64 in slot `key` of array `map`.
pub fn array_get_u64(map: BorrowedFd<'_>, key: u32) -> io::Result<u64> {
    let mut value = 0u64;
    let mut attr = elem(map, &key, &mut value as *mut u64 as u64);
    bpf(MAP_LOOKUP_ELEM, &mut attr)?;
    Ok(value)
}

/// Loads an sk_lookup program. On refusal the error carries the verifier's last words.
pub fn load_sk_lookup(insns: &[Insn], name: &str) -> io::Result<OwnedFd> {
    let license = CString::new("GPL").expect("no NUL");
    let mut log = vec![0u8; LOG_SIZE];
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = if s.is_ascii_alphanumeric() { s } else { b'_' };
    }
    let mut attr = ProgLoad {
        prog_type: PROG_SK_LOOKUP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: LOG_SIZE as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        expected_attach_type: ATTACH_SK_LOOKUP,
        ..Default::default()
    };
    bpf(PROG_LOAD, &mut attr).map(owned).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        if tail.is_empty() {
            e
        } else {
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            io::Error::new(e.kind(), format!("{e}; verifier: {}", tail.join(" | ")))
        }
    })
}

/// Links sk_lookup program `prog` to the network namespace `netns`; the link holds until its
/// last descriptor closes.
pub fn link_netns(prog: BorrowedFd<'_>, netns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: netns.as_raw_fd() as u32,
        attach_type: ATTACH_SK_LOOKUP,
        ..Default::default()
    };
    bpf(LINK_CREATE, &mut attr).map(owned)
}
