//! The server against the real kernel, without CRIU: the test process plays CRIU's part. It
//! opens a userfaultfd with CRIU's features, registers an anonymous mapping for missing
//! pages, hands the uffd over `lazy-pages.socket` (and closes its own copy, as the restorer
//! does), sends FIN, and then touches, madvises, mremaps and forks over that memory.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use torpor_image::pages::{Origin, PageRange, PAGE_SIZE};
use torpor_lazy::protocol::{send_fin, send_process, send_zombie};
use torpor_lazy::uffd::{RealUffd, CRIU_FEATURES};
use torpor_lazy::{Fill, LazyConfig, LazyServer, PageSource, SourceError, Unprovable};

const P: u64 = PAGE_SIZE;
const PID: i32 = 77;
const WAIT: Duration = Duration::from_secs(60);

/// A fork copies every registered mapping of this process, including another test's: the
/// tests here run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Byte `offset` of the pool: a pure function, so a forked child can check it too.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9E37_79B9) >> 7) as u8 ^ (offset >> 12) as u8
}

struct VecSource(Arc<Vec<u8>>);

impl PageSource for VecSource {
    fn read(&mut self, origin: &Origin, len: usize) -> Result<&[u8], SourceError> {
        let at = origin.offset as usize;
        self.0.get(at..at + len).ok_or_else(|| SourceError {
            message: format!("{at}+{len} is outside the pool"),
            corrupt: false,
        })
    }
}

fn pool(len: u64) -> Arc<Vec<u8>> {
    Arc::new((0..len).map(pattern).collect())
}

fn origin(offset: u64) -> Origin {
    Origin {
        generation: 1,
        file: "pages-1.img".into(),
        offset,
    }
}

/// An anonymous private mapping, unmapped on drop.
struct Region {
    addr: u64,
    len: u64,
}

impl Region {
    fn new(len: u64) -> Region {
        // SAFETY: a fresh anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Region {
            addr: p as u64,
            len,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no references into it outlive the test.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// Reads `[addr, addr+len)` on another thread (a fault blocks the reader until the server
/// answers) and returns the first address whose byte differs from `want(i)`.
fn check(addr: u64, len: u64, want: impl Fn(u64) -> u8 + Send + 'static) -> Option<u64> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bad = None;
        for i in 0..len {
            // SAFETY: inside a live mapping of the test.
            let b = unsafe { std::ptr::read_volatile((addr + i) as *const u8) };
            if b != want(i) {
                bad = Some(addr + i);
                break;
            }
        }
        let _ = tx.send(bad);
    });
    rx.recv_timeout(WAIT)
        .expect("reader stuck on a fault the server never answered")
}

fn config(
    dir: &std::path::Path,
    ranges: Vec<PageRange>,
    fill: Fill,
) -> (LazyConfig, Arc<Mutex<Vec<String>>>) {
    let failures = Arc::new(Mutex::new(Vec::new()));
    let f = failures.clone();
    let cfg = LazyConfig {
        work_dir: dir.to_path_buf(),
        ranges: HashMap::from([(PID, ranges)]),
        prefetch: HashMap::new(),
        record_for: Duration::from_secs(3600),
        fill,
        max_fault_read: 2 << 20,
        on_failure: Box::new(move |why| f.lock().unwrap().push(why.to_string())),
    };
    (cfg, failures)
}

/// Hands `uffd` to the server as CRIU would, with a zombie for good measure, then FIN.
fn hand_over(server: &LazyServer, uffd: RealUffd) -> UnixStream {
    let criu = UnixStream::connect(server.socket_path()).unwrap();
    send_process(&criu, PID, uffd.as_fd()).unwrap();
    drop(uffd);
    send_zombie(&criu, PID + 1).unwrap();
    send_fin(&criu).unwrap();
    server.wait_finished(WAIT).unwrap();
    criu
}

#[test]
fn serves_faults_follows_madvise_and_mremap_and_fills() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let region = Region::new(1024 * P);
    let a = region.addr;
    let uffd = RealUffd::open(CRIU_FEATURES).unwrap();
    uffd.register_missing(a, region.len).unwrap();
    // two lazy ranges with a never-dumped hole (zero) between them
    let lo = 2 << 20;
    let ranges = vec![
        PageRange {
            start: a,
            len: 256 * P,
            origin: origin(0),
        },
        PageRange {
            start: a + 512 * P,
            len: 512 * P,
            origin: origin(lo),
        },
    ];
    let data = pool(4 << 20);
    let (cfg, failures) = config(dir.path(), ranges, Fill::OnDemand);
    let server = LazyServer::start(cfg, Box::new(VecSource(data))).unwrap();
    assert!(
        server.socket_path().exists(),
        "listening before start returns"
    );
    let _criu = hand_over(&server, uffd);

    // faults: first lazy range partly, the hole, the second range partly
    assert_eq!(check(a, 128 * P, pattern), None);
    assert_eq!(check(a + 256 * P, 64 * P, |_| 0), None);
    assert_eq!(check(a + 512 * P, 100 * P, move |i| pattern(lo + i)), None);
    let s = server.stats();
    assert!(s.faults > 0 && s.zero_pages == 64, "{s:?}");
    assert!(s.faulted_bytes >= 228 * P, "{s:?}");

    // madvise away part of the untouched second range: it reads zero and is no longer lazy
    let gone = a + 700 * P;
    // SAFETY: inside the test's mapping.
    let rc = unsafe {
        libc::madvise(
            gone as *mut libc::c_void,
            (50 * P) as usize,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0);
    assert_eq!(check(gone, 50 * P, |_| 0), None);
    let rem = server.remaining().unwrap();
    let pieces = &rem[&PID];
    assert!(
        pieces
            .iter()
            .all(|r| r.end() <= gone || r.start >= gone + 50 * P),
        "madvised range still lazy: {pieces:?}"
    );

    // mremap an untouched part elsewhere: its bytes follow it
    let dest = Region::new(100 * P);
    let from = a + 800 * P;
    // SAFETY: moves 100 pages of our mapping onto our own reserved destination.
    let moved = unsafe {
        libc::mremap(
            from as *mut libc::c_void,
            (100 * P) as usize,
            (100 * P) as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dest.addr as *mut libc::c_void,
        )
    };
    assert_eq!(
        moved as u64,
        dest.addr,
        "mremap: {}",
        std::io::Error::last_os_error()
    );
    let moved_origin = lo + 288 * P;
    let rem = server.remaining().unwrap();
    assert!(
        rem[&PID]
            .iter()
            .any(|r| r.start == dest.addr && r.origin.offset == moved_origin),
        "moved range not tracked at its new address: {:?}",
        rem[&PID]
    );
    assert_eq!(
        check(dest.addr, 100 * P, move |i| pattern(moved_origin + i)),
        None
    );

    // fill the rest; nothing remains; every byte is right
    server.fill_all(WAIT).unwrap();
    assert!(server.remaining().unwrap().is_empty());
    assert_eq!(check(a, 256 * P, pattern), None);
    assert_eq!(check(a + 256 * P, 256 * P, |_| 0), None);
    assert_eq!(check(a + 512 * P, 188 * P, move |i| pattern(lo + i)), None);
    assert_eq!(check(gone, 50 * P, |_| 0), None);
    assert_eq!(
        check(a + 750 * P, 50 * P, move |i| pattern(lo + 238 * P + i)),
        None
    );
    assert_eq!(
        check(a + 900 * P, 124 * P, move |i| pattern(lo + 388 * P + i)),
        None
    );

    let ws = server.working_set();
    assert!(
        ws[&PID]
            .iter()
            .any(|&(s, l)| s <= a && a + 128 * P <= s + l),
        "the faulted start is not in the working set: a={a:#x} {ws:x?}"
    );
    let s = server.shutdown().unwrap();
    assert_eq!(s.lazy_bytes, 768 * P);
    assert_eq!(
        s.lazy_bytes,
        s.faulted_bytes
            + s.prefetched_bytes
            + s.background_bytes
            + s.dropped_bytes
            + s.remaining_bytes,
        "{s:?}"
    );
    assert_eq!(s.dropped_bytes, 50 * P, "{s:?}");
    assert_eq!((s.processes, s.forks, s.remaining_bytes), (1, 0, 0));
    assert!(s.finished && s.failed.is_none());
    assert!(failures.lock().unwrap().is_empty());
    assert!(!dir.path().join(torpor_lazy::SOCKET_NAME).exists());
}

#[test]
fn prefetches_the_working_set_after_fin() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let region = Region::new(2048 * P);
    let a = region.addr;
    let uffd = RealUffd::open(CRIU_FEATURES).unwrap();
    uffd.register_missing(a, region.len).unwrap();
    let ranges = vec![PageRange {
        start: a,
        len: 2048 * P,
        origin: origin(0),
    }];
    let (mut cfg, _failures) = config(dir.path(), ranges, Fill::OnDemand);
    cfg.prefetch = HashMap::from([(PID, vec![(a + 100 * P, 1500 * P)])]);
    let server = LazyServer::start(cfg, Box::new(VecSource(pool(8 << 20)))).unwrap();
    let _criu = hand_over(&server, uffd);
    let deadline = Instant::now() + WAIT;
    while server.stats().prefetched_bytes < 1500 * P {
        assert!(
            Instant::now() < deadline,
            "prefetch never finished: {:?}",
            server.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(check(a + 100 * P, 1500 * P, |i| pattern(100 * P + i)), None);
    let s = server.stats();
    assert_eq!(
        (s.prefetched_bytes, s.faults),
        (1500 * P, 0),
        "prefetched pages never fault"
    );
    assert_eq!(server.working_set()[&PID], vec![(a + 100 * P, 1500 * P)]);
    let s = server.shutdown().unwrap();
    assert_eq!(
        s.background_bytes,
        548 * P,
        "shutdown fills what is left in a live mm"
    );
}

/// Kills and reaps a forked child, whatever happens to the test.
struct Child(libc::pid_t);

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}

#[test]
fn a_forked_child_is_served_on_its_own_uffd() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let region = Region::new(256 * P);
    let a = region.addr;
    let uffd = RealUffd::open(CRIU_FEATURES).unwrap();
    uffd.register_missing(a, region.len).unwrap();
    let ranges = vec![PageRange {
        start: a,
        len: 256 * P,
        origin: origin(0),
    }];
    let (cfg, failures) = config(dir.path(), ranges.clone(), Fill::OnDemand);
    let server = LazyServer::start(cfg, Box::new(VecSource(pool(1 << 20)))).unwrap();
    let _criu = hand_over(&server, uffd);

    let mut up = [0i32; 2];
    let mut down = [0i32; 2];
    // SAFETY: plain pipe creation into local arrays.
    unsafe {
        assert_eq!(libc::pipe(up.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(down.as_mut_ptr()), 0);
    }
    // A raw clone, not glibc's fork(): fork() holds the malloc locks across the clone, and
    // the kernel holds the clone until the server (a thread of this same process, which
    // allocates) has read the FORK event: a deadlock that a restored tree, being another
    // process than the server, never meets.
    // SAFETY: the child only reads memory, uses raw syscalls and exits with _exit.
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) }
        as libc::pid_t;
    assert!(pid >= 0);
    if pid == 0 {
        // child: check the first half, report, wait for the word, exit
        let mut ok = 1u8;
        for i in 0..128 * P {
            // SAFETY: the inherited mapping.
            if unsafe { std::ptr::read_volatile((a + i) as *const u8) } != pattern(i) {
                ok = 0;
                break;
            }
        }
        let mut b = 0u8;
        // SAFETY: raw syscalls on the inherited pipes.
        unsafe {
            libc::write(up[1], &ok as *const u8 as *const libc::c_void, 1);
            libc::read(down[0], &mut b as *mut u8 as *mut libc::c_void, 1);
            libc::_exit(0);
        }
    }
    let child = Child(pid);
    let mut ok = 0u8;
    // SAFETY: reads one byte from our pipe.
    let n = unsafe { libc::read(up[0], &mut ok as *mut u8 as *mut libc::c_void, 1) };
    assert_eq!((n, ok), (1, 1), "the child saw wrong bytes");
    // a copy wakes the child before the server thread counts it: wait for the count
    let deadline = Instant::now() + WAIT;
    while !{
        let s = server.stats();
        s.forks == 1 && s.faulted_bytes >= 128 * P
    } {
        assert!(Instant::now() < deadline, "{:?}", server.stats());
        std::thread::sleep(Duration::from_millis(1));
    }
    // the parent never touched its memory; the child still has lazy ranges
    assert_eq!(
        server.remaining(),
        Err(Unprovable::ForkedChild { parent: PID })
    );
    // SAFETY: one byte into our pipe, then the child exits; the guard reaps it.
    unsafe { libc::write(down[1], &0u8 as *const u8 as *const libc::c_void, 1) };
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(child.0, &mut status, 0) }, child.0);
    std::mem::forget(child);
    for fd in up.into_iter().chain(down) {
        // SAFETY: our pipe fds.
        unsafe { libc::close(fd) };
    }
    // the child's mm is gone: it is left out, and the parent's ranges are all there
    assert_eq!(server.remaining().unwrap(), HashMap::from([(PID, ranges)]));
    server.fill_all(WAIT).unwrap();
    assert_eq!(check(a, 256 * P, pattern), None);
    server.shutdown().unwrap();
    assert!(failures.lock().unwrap().is_empty());
}
