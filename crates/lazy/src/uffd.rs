//! The userfaultfd seam: ioctl numbers and structures from the kernel's
//! `include/uapi/linux/userfaultfd.h`, decoding of the 32-byte event messages, and the
//! [`Uffd`] trait through which the session does every uffd operation, so that the event and
//! range logic runs against a fake in unit tests. [`RealUffd`] is the kernel's.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// `UFFD_API`: the API version `UFFDIO_API` negotiates.
pub const UFFD_API: u64 = 0xAA;
/// `UFFD_FEATURE_EVENT_FORK`: a fork hands the manager a uffd for the child.
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_FEATURE_EVENT_REMAP`: mremap is reported, so ranges can follow it.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_FEATURE_EVENT_REMOVE`: madvise(DONTNEED/REMOVE) is reported.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_EVENT_UNMAP`: munmap is reported.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// The features `criu restore` asks for (masked by what the kernel has).
pub const CRIU_FEATURES: u64 =
    FEATURE_EVENT_FORK | FEATURE_EVENT_REMAP | FEATURE_EVENT_REMOVE | FEATURE_EVENT_UNMAP;
/// `UFFDIO_REGISTER_MODE_MISSING`: faults on missing pages are reported.
pub const REGISTER_MODE_MISSING: u64 = 1;
/// `UFFDIO_ZEROPAGE_MODE_DONTWAKE`: the liveness probe must wake nobody.
const ZEROPAGE_MODE_DONTWAKE: u64 = 1;

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAA << 8) | nr
}
const IOC_READ: u64 = 2;
const IOC_READ_WRITE: u64 = 3;

/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`
pub const UFFDIO_API: u64 = ioc(IOC_READ_WRITE, 0x3F, 24);
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`
pub const UFFDIO_REGISTER: u64 = ioc(IOC_READ_WRITE, 0x00, 32);
/// `_IOR(0xAA, 0x01, struct uffdio_range)`
pub const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, 16);
/// `_IOR(0xAA, 0x02, struct uffdio_range)`
pub const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, 16);
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`
pub const UFFDIO_COPY: u64 = ioc(IOC_READ_WRITE, 0x03, 40);
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`
pub const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ_WRITE, 0x04, 32);

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// Size of one `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// One decoded `uffd_msg`, before a fork's fd is owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEvent {
    PageFault { address: u64 },
    Fork { ufd: i32 },
    Remap { from: u64, to: u64, len: u64 },
    Remove { start: u64, end: u64 },
    Unmap { start: u64, end: u64 },
    Unknown(u8),
}

fn u64_at(msg: &[u8; MSG_SIZE], at: usize) -> u64 {
    u64::from_ne_bytes(msg[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes one message (layout: `u8 event`, 7 reserved bytes, then the argument union).
pub fn decode(msg: &[u8; MSG_SIZE]) -> RawEvent {
    match msg[0] {
        EVENT_PAGEFAULT => RawEvent::PageFault {
            address: u64_at(msg, 16),
        },
        EVENT_FORK => RawEvent::Fork {
            ufd: i32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes")),
        },
        EVENT_REMAP => RawEvent::Remap {
            from: u64_at(msg, 8),
            to: u64_at(msg, 16),
            len: u64_at(msg, 24),
        },
        EVENT_REMOVE => RawEvent::Remove {
            start: u64_at(msg, 8),
            end: u64_at(msg, 16),
        },
        EVENT_UNMAP => RawEvent::Unmap {
            start: u64_at(msg, 8),
            end: u64_at(msg, 16),
        },
        other => RawEvent::Unknown(other),
    }
}

/// An event with a fork's child uffd owned, so that it can never be closed by accident.
#[derive(Debug)]
pub enum Event<U> {
    PageFault {
        address: u64,
    },
    Fork(U),
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
    /// An event CRIU's feature set cannot produce: fatal for the session.
    Unknown(u8),
}

/// A failed fill: the errno and how many bytes were filled before it (a partial copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillError {
    pub errno: Errno,
    pub done: u64,
}

/// The uffd operations the session needs, for one mm.
pub trait Uffd: Sized {
    /// `UFFDIO_COPY` of `src` to `dst`, waking the faulting threads.
    fn copy(&mut self, dst: u64, src: &[u8]) -> Result<(), FillError>;
    /// `UFFDIO_ZEROPAGE` of `[dst, dst+len)`, waking.
    fn zeropage(&mut self, dst: u64, len: u64) -> Result<(), FillError>;
    /// `UFFDIO_WAKE` of `[start, start+len)`.
    fn wake(&mut self, start: u64, len: u64) -> Result<(), Errno>;
    /// `UFFDIO_UNREGISTER` of `[start, start+len)`.
    fn unregister(&mut self, start: u64, len: u64) -> Result<(), Errno>;
    /// Every queued event, read until the fd would block.
    fn read_events(&mut self) -> Result<Vec<Event<Self>>, Errno>;
    /// Waits until an event may be readable, at most `timeout` (after an `EAGAIN` whose event
    /// the kernel has not queued yet).
    fn wait_event(&mut self, timeout: Duration);
    /// Whether the mm still exists: a zeropage of a span no VMA can hold fails with `ENOENT`
    /// while the mm lives (touching nothing) and with `ESRCH` once it is gone.
    fn mm_alive(&mut self) -> bool;
}

/// A kernel userfaultfd.
#[derive(Debug)]
pub struct RealUffd {
    fd: OwnedFd,
}

fn ioctl<T>(fd: BorrowedFd<'_>, request: u64, arg: &mut T) -> Result<(), Errno> {
    // SAFETY: `arg` is the repr(C) structure `request` is defined with in the uapi header,
    // valid for reads and writes for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

impl RealUffd {
    /// Wraps a uffd received from CRIU (or from a fork event).
    pub fn from_fd(fd: OwnedFd) -> RealUffd {
        RealUffd { fd }
    }

    /// Opens a uffd for this process's own mm (`O_CLOEXEC|O_NONBLOCK`) and enables
    /// `features`, as `criu restore` does inside each restored task; the server never calls
    /// this, tests and tools that play CRIU's part do.
    pub fn open(features: u64) -> io::Result<RealUffd> {
        // SAFETY: plain syscall with integer flags.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        ioctl(fd.as_fd(), UFFDIO_API, &mut api)?;
        Ok(RealUffd { fd })
    }

    /// Registers `[start, start+len)` for missing-page faults (what CRIU's restorer does
    /// for each lazy VMA).
    pub fn register_missing(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.fd.as_fd(), UFFDIO_REGISTER, &mut reg)?;
        Ok(())
    }

    fn zeropage_mode(&self, dst: u64, len: u64, mode: u64) -> Result<(), FillError> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode,
            zeropage: 0,
        };
        let r = ioctl(self.fd.as_fd(), UFFDIO_ZEROPAGE, &mut z);
        r.map_err(|errno| FillError {
            errno,
            done: z.zeropage.max(0) as u64,
        })
    }
}

impl AsFd for RealUffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The lowest address the probe span starts at: above any `vm.mmap_min_addr` in use.
const PROBE_START: u64 = 1 << 20;
/// End of the probe span: the x86-64 4-level user address space's top.
const PROBE_END: u64 = 0x7fff_ffff_f000;

impl Uffd for RealUffd {
    fn copy(&mut self, dst: u64, src: &[u8]) -> Result<(), FillError> {
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        let r = ioctl(self.fd.as_fd(), UFFDIO_COPY, &mut c);
        r.map_err(|errno| FillError {
            errno,
            done: c.copy.max(0) as u64,
        })
    }

    fn zeropage(&mut self, dst: u64, len: u64) -> Result<(), FillError> {
        self.zeropage_mode(dst, len, 0)
    }

    fn wake(&mut self, start: u64, len: u64) -> Result<(), Errno> {
        ioctl(
            self.fd.as_fd(),
            UFFDIO_WAKE,
            &mut UffdioRange { start, len },
        )
    }

    fn unregister(&mut self, start: u64, len: u64) -> Result<(), Errno> {
        ioctl(
            self.fd.as_fd(),
            UFFDIO_UNREGISTER,
            &mut UffdioRange { start, len },
        )
    }

    fn read_events(&mut self) -> Result<Vec<Event<Self>>, Errno> {
        let mut events = Vec::new();
        let mut buf = [0u8; MSG_SIZE * 64];
        loop {
            let n = match nix::unistd::read(self.fd.as_raw_fd(), &mut buf) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(events),
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(events);
            }
            for chunk in buf[..n].chunks_exact(MSG_SIZE) {
                let msg: &[u8; MSG_SIZE] = chunk.try_into().expect("32 bytes");
                events.push(match decode(msg) {
                    RawEvent::PageFault { address } => Event::PageFault { address },
                    // SAFETY: the kernel installed this fd in our table when the message was
                    // read; nothing else knows it.
                    RawEvent::Fork { ufd } => Event::Fork(RealUffd {
                        fd: unsafe { OwnedFd::from_raw_fd(ufd) },
                    }),
                    RawEvent::Remap { from, to, len } => Event::Remap { from, to, len },
                    RawEvent::Remove { start, end } => Event::Remove { start, end },
                    RawEvent::Unmap { start, end } => Event::Unmap { start, end },
                    RawEvent::Unknown(e) => Event::Unknown(e),
                });
            }
        }
    }

    fn wait_event(&mut self, timeout: Duration) {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        // a failed or interrupted poll only shortens the wait; the caller retries either way
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::ZERO),
        );
    }

    fn mm_alive(&mut self) -> bool {
        let r = self.zeropage_mode(PROBE_START, PROBE_END - PROBE_START, ZEROPAGE_MODE_DONTWAKE);
        !matches!(
            r,
            Err(FillError {
                errno: Errno::ESRCH,
                ..
            })
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_header() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_AA01);
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xC020_AA04);
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioRange>(), 16);
        assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
        assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
        assert_eq!(CRIU_FEATURES, 0x4e);
    }

    fn msg(event: u8, args: &[u64]) -> [u8; MSG_SIZE] {
        let mut m = [0u8; MSG_SIZE];
        m[0] = event;
        for (i, a) in args.iter().enumerate() {
            m[8 + 8 * i..16 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        m
    }

    #[test]
    fn decodes_every_event() {
        assert_eq!(
            decode(&msg(0x12, &[1, 0x7f00_1234, 77])),
            RawEvent::PageFault {
                address: 0x7f00_1234
            }
        );
        assert_eq!(decode(&msg(0x13, &[9])), RawEvent::Fork { ufd: 9 });
        assert_eq!(
            decode(&msg(0x14, &[0x1000, 0x9000, 0x2000])),
            RawEvent::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            }
        );
        assert_eq!(
            decode(&msg(0x15, &[0x1000, 0x3000])),
            RawEvent::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(
            decode(&msg(0x16, &[0x1000, 0x3000])),
            RawEvent::Unmap {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(decode(&msg(0x17, &[])), RawEvent::Unknown(0x17));
    }
}
