//! A network namespace of the calling thread's own, with loopback up: where tests and the
//! benchmark attach sk_lookup programs, so the host's socket lookup is never altered.
//! Threads (and processes) the thread starts afterwards share it.

use std::{io, os::fd::AsRawFd, os::fd::FromRawFd, os::fd::OwnedFd};

/// Moves the calling thread into a new network namespace and brings its `lo` up.
pub fn enter_private() -> io::Result<()> {
    // SAFETY: unshare affects only the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    loopback_up()
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket call; checked below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor only we hold.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: `ifreq` is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in req.ifr_name.iter_mut().zip(b"lo") {
        *d = *c as libc::c_char;
    }
    // SAFETY: `req` names an interface and has room for the flags the kernel reads/writes.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ifru_flags` is the member SIOCGIFFLAGS just filled.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
