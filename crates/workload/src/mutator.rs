//! The mutator sample service: a deterministic program whose answers depend only on the
//! requests it received, and whose requests exercise what makes restoring memory hard:
//! pages written at random, pages dropped with `MADV_DONTNEED` (they must read zero) or
//! `MADV_FREE` (they may read either way), regions grown, shrunk and moved with `mremap`,
//! regions unmapped and mapped afresh at the same address, a forked child holding a diverging
//! copy of the memory (a process tree joined by a socketpair), a growing heap, new regions,
//! and regions never touched at all (what a lazy restore can leave in the pool). A
//! differential test sends the same requests to one mutator that sleeps and wakes and to one
//! that never does: every answer must be the same.
//!
//! Line protocol over TCP, one request per line, one answer line (`ERR ...` for a refused
//! request):
//!
//! | request | effect | answer |
//! |---|---|---|
//! | `WRITE seed` | 8 to 15 pseudo-random byte runs into pages chosen by `seed` | `OK runs crc-of-written-pages` |
//! | `DONTNEED r p n` | `MADV_DONTNEED` on pages `p..p+n` of region `r` | `OK n zero` once they read zero |
//! | `FREE r p n` | `MADV_FREE` on them | `OK n` |
//! | `REMAP r pages` | `mremap(MREMAP_MAYMOVE)` region `r` to `pages` pages | `OK old new crc-of-region` |
//! | `UNMAPMAP r` | unmap region `r`, map a fresh one at its address | `OK crc-of-region` |
//! | `FORK` | fork a child that keeps a copy of the memory and changes its own copy | `OK` |
//! | `CHILD` | the child changes one more page and digests its memory | `child digest` |
//! | `GROW kib` | grow the heap by `kib` KiB of pseudo-random bytes | `OK len crc-of-heap` |
//! | `NEW pages` | map a new region, fill its first half | `OK index` |
//! | `LOCK r` | `mlock2(MLOCK_ONFAULT)` region `r`: its untouched pages stay missing, locked | `OK` |
//! | `DIGEST` | BLAKE3 over every region and the heap, in logical order | the hex digest |
//! | `PING` | | `PONG` |
//!
//! Digests and CRCs cover contents in logical order (region by region, page by page, then the
//! heap), never addresses, so two mutators whose regions landed at different addresses agree.
//! A page given to `MADV_FREE` and not written since counts as one marker that says whether it
//! reads as its content at the time or as zero (the kernel may drop it or not: both are
//! right); anything else it reads as is a wrong restore, and changes the digest.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::UnixStream,
    },
    path::PathBuf,
    ptr::NonNull,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use nix::{
    sys::{
        signal::{kill, Signal},
        socket::{socketpair, AddressFamily, SockFlag, SockType},
        wait::waitpid,
    },
    unistd::{fork, ForkResult, Pid},
};
use rand::{rngs::SmallRng, Rng, RngCore, SeedableRng};

use crate::PAGE;

/// Period of the background thread's timer, like a language runtime's.
pub const TICK: Duration = Duration::from_millis(10);

/// Regions the mutator may hold (a bound, so a request cannot exhaust the host).
pub const MAX_REGIONS: usize = 64;

/// Pages one region may have (256 MiB).
pub const MAX_REGION_PAGES: usize = 64 << 10;

/// Bytes the heap may grow to.
pub const MAX_HEAP: usize = 256 << 20;

/// The regions a fresh mutator holds: (pages, which pages are filled at start). Some are
/// touched whole, some in part, some never, so a restore has both kinds to deal with.
const INITIAL: [(usize, Fill); 4] = [
    (1024, Fill::All),
    (1024, Fill::None),
    (512, Fill::EveryOther),
    (256, Fill::None),
];

/// Bytes of the heap at start.
const INITIAL_HEAP: usize = 256 << 10;

/// The descriptor the forked child keeps its end of the socketpair on; it closes every other.
const CHILD_FD: RawFd = 3;

/// How the mutator starts.
#[derive(Debug, Clone)]
pub struct MutatorConfig {
    pub listen: SocketAddr,
    /// Written with the bound port once listening (useful with port 0).
    pub port_file: Option<PathBuf>,
}

/// Why a request was refused (answered as `ERR ...`).
#[derive(Debug, thiserror::Error)]
pub enum MutatorError {
    #[error("unknown command {0:?}")]
    Unknown(String),
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("no region {0}")]
    NoRegion(usize),
    #[error("pages {start}..{end} are outside region {region} of {pages} pages")]
    OutOfRegion {
        region: usize,
        start: usize,
        end: usize,
        pages: usize,
    },
    #[error("{what} would exceed {limit}")]
    Limit { what: &'static str, limit: usize },
    #[error("no child: FORK first")]
    NoChild,
    #[error("the child answered {0:?}")]
    ChildAnswer(String),
    #[error("talking to the child")]
    ChildLink(#[source] io::Error),
    #[error("{0} failed")]
    Sys(&'static str, #[source] io::Error),
}

/// The last OS error as a [`MutatorError::Sys`] of `call`.
fn sys(call: &'static str) -> MutatorError {
    MutatorError::Sys(call, io::Error::last_os_error())
}

/// Which pages of a new region are written at once.
#[derive(Debug, Clone, Copy)]
enum Fill {
    All,
    EveryOther,
    FirstHalf,
    None,
}

/// An anonymous private mapping owned by one [`Region`].
#[derive(Debug)]
struct Region {
    ptr: NonNull<u8>,
    pages: usize,
    /// Per page: `Some(crc)` while it was given to `MADV_FREE` and not written since, with the
    /// CRC32C it had then.
    freed: Vec<Option<u32>>,
}

// SAFETY: the mapping belongs to this Region alone and is reached only through its `&self`
// and `&mut self` methods, so moving it to another thread is like moving a Vec.
unsafe impl Send for Region {}

/// What one page of a region counts as in digests.
enum PageView<'a> {
    Bytes(&'a [u8]),
    /// A page given to `MADV_FREE`: whether it reads as either of its two right contents.
    Freed {
        right: bool,
    },
}

/// Maps `pages` fresh zero pages, read-write, private and anonymous.
fn map(pages: usize) -> Result<NonNull<u8>, MutatorError> {
    // SAFETY: a new mapping at an address the kernel picks: nothing existing is replaced.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(sys("mmap"));
    }
    NonNull::new(p.cast()).ok_or_else(|| sys("mmap"))
}

impl Region {
    fn new(pages: usize, fill: Fill, seed: u64) -> Result<Region, MutatorError> {
        let mut r = Region {
            ptr: map(pages)?,
            pages,
            freed: vec![None; pages],
        };
        let mut rng = SmallRng::seed_from_u64(seed);
        for page in 0..pages {
            let write = match fill {
                Fill::All => true,
                Fill::EveryOther => page % 2 == 0,
                Fill::FirstHalf => page < pages / 2,
                Fill::None => false,
            };
            if write {
                rng.fill_bytes(r.page_mut(page));
            }
        }
        Ok(r)
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `pages` pages from `ptr` are mapped read-write for as long as `self` is.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.pages * PAGE) }
    }

    fn page(&self, i: usize) -> &[u8] {
        &self.bytes()[i * PAGE..(i + 1) * PAGE]
    }

    /// Page `i` to write into. A page given to `MADV_FREE` is zeroed first, so that what it
    /// holds afterwards no longer depends on whether the kernel dropped it.
    fn page_mut(&mut self, i: usize) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.pages * PAGE) };
        let page = &mut bytes[i * PAGE..(i + 1) * PAGE];
        if self.freed[i].take().is_some() {
            page.fill(0);
        }
        page
    }

    fn view(&self, i: usize) -> PageView<'_> {
        let page = self.page(i);
        match self.freed[i] {
            None => PageView::Bytes(page),
            Some(crc) => PageView::Freed {
                right: crc32c::crc32c(page) == crc || page.iter().all(|b| *b == 0),
            },
        }
    }

    /// Feeds the region's pages, in order, as tagged chunks to `f`.
    fn feed(&self, mut f: impl FnMut(&[u8])) {
        for i in 0..self.pages {
            match self.view(i) {
                PageView::Bytes(b) => {
                    f(&[0]);
                    f(b);
                }
                PageView::Freed { right } => f(&[if right { 1 } else { 2 }]),
            }
        }
    }

    fn crc(&self) -> u32 {
        let mut crc = 0;
        self.feed(|b| crc = crc32c::crc32c_append(crc, b));
        crc
    }

    /// Checks that pages `start..start + count` exist; returns their byte range.
    fn pages_in(
        &self,
        index: usize,
        start: usize,
        count: usize,
    ) -> Result<std::ops::Range<usize>, MutatorError> {
        let end = start.saturating_add(count);
        if count == 0 || end > self.pages {
            return Err(MutatorError::OutOfRegion {
                region: index,
                start,
                end,
                pages: self.pages,
            });
        }
        Ok(start * PAGE..end * PAGE)
    }

    /// Locks the whole region in memory as its pages are touched (`MLOCK_ONFAULT`): pages
    /// not touched yet stay missing, in a mapping that is now locked.
    fn lock_on_fault(&self) -> io::Result<()> {
        // SAFETY: the range is exactly this region's mapping; mlock2 changes no contents.
        let rc = unsafe {
            libc::mlock2(
                self.ptr.as_ptr().cast(),
                self.pages * PAGE,
                libc::MLOCK_ONFAULT,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn madvise(&self, bytes: std::ops::Range<usize>, advice: libc::c_int) -> io::Result<()> {
        // SAFETY: the range lies inside this region's mapping (checked by `pages_in`) and no
        // reference into it outlives this call's `&self`; either advice only drops contents.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(bytes.start).cast(),
                bytes.len(),
                advice,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.pages * PAGE) };
    }
}

/// The forked child and the parent's end of the socketpair to it.
#[derive(Debug)]
struct ChildLink {
    pid: Pid,
    sock: UnixStream,
}

impl Drop for ChildLink {
    fn drop(&mut self) {
        let _ = kill(self.pid, Signal::SIGKILL);
        let _ = waitpid(self.pid, None);
    }
}

/// The mutator's state: its regions, its heap and its child.
#[derive(Debug)]
pub struct Mutator {
    regions: Vec<Region>,
    heap: Vec<u8>,
    child: Option<ChildLink>,
}

/// The words of a request after its command, parsed as numbers.
fn numbers<const N: usize>(args: &[&str], usage: &'static str) -> Result<[usize; N], MutatorError> {
    if args.len() != N {
        return Err(MutatorError::Usage(usage));
    }
    let mut out = [0; N];
    for (o, a) in out.iter_mut().zip(args) {
        *o = a.parse().map_err(|_| MutatorError::Usage(usage))?;
    }
    Ok(out)
}

impl Mutator {
    /// A fresh mutator: the same regions, contents and heap every time.
    pub fn new() -> Result<Mutator, MutatorError> {
        let regions = INITIAL
            .iter()
            .enumerate()
            .map(|(i, (pages, fill))| Region::new(*pages, *fill, i as u64))
            .collect::<Result<_, _>>()?;
        let mut heap = vec![0; INITIAL_HEAP];
        SmallRng::seed_from_u64(u64::MAX).fill_bytes(&mut heap);
        Ok(Mutator {
            regions,
            heap,
            child: None,
        })
    }

    /// Carries out one request line; returns its answer (without the newline).
    pub fn apply(&mut self, line: &str) -> Result<String, MutatorError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((cmd, args)) = words.split_first() else {
            return Err(MutatorError::Unknown(String::new()));
        };
        match cmd.to_ascii_uppercase().as_str() {
            "PING" => Ok("PONG".into()),
            "DIGEST" => Ok(self.digest().to_hex().to_string()),
            "WRITE" => {
                let usage = "WRITE seed";
                let [seed] = args else {
                    return Err(MutatorError::Usage(usage));
                };
                self.write(seed.parse().map_err(|_| MutatorError::Usage(usage))?)
            }
            "DONTNEED" => {
                let [r, p, n] = numbers(args, "DONTNEED region page pages")?;
                self.dontneed(r, p, n)
            }
            "FREE" => {
                let [r, p, n] = numbers(args, "FREE region page pages")?;
                self.free(r, p, n)
            }
            "REMAP" => {
                let [r, pages] = numbers(args, "REMAP region pages")?;
                self.remap(r, pages)
            }
            "UNMAPMAP" => {
                let [r] = numbers(args, "UNMAPMAP region")?;
                self.unmap_map(r)
            }
            "FORK" => {
                numbers::<0>(args, "FORK")?;
                self.fork_child()
            }
            "CHILD" => {
                numbers::<0>(args, "CHILD")?;
                self.ask_child()
            }
            "GROW" => {
                let [kib] = numbers(args, "GROW kib")?;
                self.grow(kib)
            }
            "NEW" => {
                let [pages] = numbers(args, "NEW pages")?;
                self.new_region(pages)
            }
            "LOCK" => {
                let [r] = numbers(args, "LOCK region")?;
                self.region(r)?
                    .lock_on_fault()
                    .map_err(|e| MutatorError::Sys("mlock2(MLOCK_ONFAULT)", e))?;
                Ok("OK".into())
            }
            _ => Err(MutatorError::Unknown(line.to_string())),
        }
    }

    /// BLAKE3 over every region and the heap, in logical order.
    pub fn digest(&self) -> blake3::Hash {
        let mut h = blake3::Hasher::new();
        for (i, r) in self.regions.iter().enumerate() {
            h.update(b"region");
            h.update(&(i as u64).to_le_bytes());
            h.update(&(r.pages as u64).to_le_bytes());
            r.feed(|b| {
                h.update(b);
            });
        }
        h.update(b"heap");
        h.update(&(self.heap.len() as u64).to_le_bytes());
        h.update(&self.heap);
        h.finalize()
    }

    fn region(&mut self, r: usize) -> Result<&mut Region, MutatorError> {
        self.regions.get_mut(r).ok_or(MutatorError::NoRegion(r))
    }

    fn write(&mut self, seed: u64) -> Result<String, MutatorError> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let runs = rng.gen_range(8..16);
        let mut written = Vec::with_capacity(runs);
        for _ in 0..runs {
            let r = rng.gen_range(0..self.regions.len());
            let region = &mut self.regions[r];
            let page = rng.gen_range(0..region.pages);
            let start = rng.gen_range(0..PAGE);
            let end = rng.gen_range(start + 1..=PAGE);
            rng.fill_bytes(&mut region.page_mut(page)[start..end]);
            written.push((r, page));
        }
        // The whole pages, read back: what was there before the runs counts too.
        let crc = written.iter().fold(0, |crc, &(r, page)| {
            crc32c::crc32c_append(crc, self.regions[r].page(page))
        });
        Ok(format!("OK {runs} {crc:08x}"))
    }

    fn dontneed(&mut self, r: usize, start: usize, count: usize) -> Result<String, MutatorError> {
        let region = self.region(r)?;
        let bytes = region.pages_in(r, start, count)?;
        region
            .madvise(bytes.clone(), libc::MADV_DONTNEED)
            .map_err(|e| MutatorError::Sys("madvise(MADV_DONTNEED)", e))?;
        // Dropped for good: whatever MADV_FREE left undecided is zero now.
        region.freed[start..start + count].fill(None);
        let zero = region.bytes()[bytes].iter().all(|b| *b == 0);
        Ok(format!(
            "OK {count} {}",
            if zero { "zero" } else { "NOT ZERO" }
        ))
    }

    fn free(&mut self, r: usize, start: usize, count: usize) -> Result<String, MutatorError> {
        let region = self.region(r)?;
        let bytes = region.pages_in(r, start, count)?;
        for i in start..start + count {
            // A page freed twice and not written between keeps its first content: it still
            // reads as that or zero.
            if region.freed[i].is_none() {
                region.freed[i] = Some(crc32c::crc32c(region.page(i)));
            }
        }
        region
            .madvise(bytes, libc::MADV_FREE)
            .map_err(|e| MutatorError::Sys("madvise(MADV_FREE)", e))?;
        Ok(format!("OK {count}"))
    }

    fn remap(&mut self, r: usize, pages: usize) -> Result<String, MutatorError> {
        if pages == 0 || pages > MAX_REGION_PAGES {
            return Err(MutatorError::Usage(
                "REMAP region pages (1 to MAX_REGION_PAGES)",
            ));
        }
        let region = self.region(r)?;
        let old = region.pages;
        // SAFETY: the region owns this mapping and `&mut self` means no reference into it is
        // alive; the kernel moves or resizes it as a whole, and on success it is ours at the
        // address returned.
        let p = unsafe {
            libc::mremap(
                region.ptr.as_ptr().cast(),
                old * PAGE,
                pages * PAGE,
                libc::MREMAP_MAYMOVE,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(sys("mremap"));
        }
        region.ptr = NonNull::new(p.cast()).ok_or_else(|| sys("mremap"))?;
        region.pages = pages;
        // Pages cut off are gone; pages added are fresh zero pages.
        region.freed.resize(pages, None);
        Ok(format!("OK {old} {pages} {:08x}", region.crc()))
    }

    fn unmap_map(&mut self, r: usize) -> Result<String, MutatorError> {
        let region = self.region(r)?;
        // The fresh mapping first, wherever the kernel puts it, so a refusal leaves the old
        // region whole; then the old one goes and the fresh one moves to its address.
        let fresh = map(region.pages)?;
        let len = region.pages * PAGE;
        // SAFETY: the old mapping is ours, and `&mut self` means nothing refers into it.
        if unsafe { libc::munmap(region.ptr.as_ptr().cast(), len) } != 0 {
            let e = sys("munmap");
            // SAFETY: `fresh` was just mapped by us and nothing refers to it.
            unsafe { libc::munmap(fresh.as_ptr().cast(), len) };
            return Err(e);
        }
        // SAFETY: `fresh` is ours; the target is the range just unmapped, so MREMAP_FIXED
        // replaces nothing else. On failure `fresh` stays where it is, still ours.
        let moved = unsafe {
            libc::mremap(
                fresh.as_ptr().cast(),
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                region.ptr.as_ptr(),
            )
        };
        region.ptr = if moved == libc::MAP_FAILED {
            fresh
        } else {
            NonNull::new(moved.cast()).unwrap_or(fresh)
        };
        region.freed.fill(None);
        Ok(format!("OK {:08x}", region.crc()))
    }

    fn fork_child(&mut self) -> Result<String, MutatorError> {
        // One child at a time: the previous one is killed and reaped.
        self.child = None;
        let (parent_end, child_end) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| MutatorError::Sys("socketpair", e.into()))?;
        // SAFETY: the child runs only `child_main`, which makes system calls, reads and
        // writes memory it owns, allocates nothing and never returns (it ends in _exit), so
        // locks held by other threads at the fork do not matter to it.
        match unsafe { fork() }.map_err(|e| MutatorError::Sys("fork", e.into()))? {
            ForkResult::Child => self.child_main(child_end.as_raw_fd()),
            ForkResult::Parent { child } => {
                drop(child_end);
                let sock = UnixStream::from(parent_end);
                let link = ChildLink { pid: child, sock };
                link.sock
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .map_err(MutatorError::ChildLink)?;
                self.child = Some(link);
                Ok("OK".into())
            }
        }
    }

    /// The forked child: changes its copy of the memory, then answers each byte from the
    /// parent with one more change and the digest of its memory, until the parent's end
    /// closes. Allocates nothing: another thread may have held the allocator's lock at the
    /// fork.
    fn child_main(&mut self, sock: RawFd) -> ! {
        // SAFETY: plain descriptor calls. Only the socket survives, on CHILD_FD: the child
        // must not hold the listener or a client connection open, nor the parent's end (its
        // EOF is how the child learns the parent is gone).
        unsafe {
            if sock != CHILD_FD {
                libc::dup2(sock, CHILD_FD);
            }
            libc::close_range(CHILD_FD as libc::c_uint + 1, libc::c_uint::MAX, 0);
        }
        // The child's copy diverges from the parent's at once, in touched and untouched
        // pages alike.
        for r in &mut self.regions {
            for page in (0..r.pages).step_by(97) {
                r.page_mut(page)[1] ^= 0x5a;
            }
        }
        let mut asked = 0usize;
        loop {
            let mut byte = 0u8;
            // SAFETY: reads one byte into a local.
            let n = unsafe { libc::read(CHILD_FD, (&mut byte as *mut u8).cast(), 1) };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if n != 1 {
                // SAFETY: ends this process at once, running nothing of the parent's.
                unsafe { libc::_exit(0) };
            }
            asked += 1;
            let r = asked % self.regions.len();
            let region = &mut self.regions[r];
            let page = (asked * 7) % region.pages;
            let b = &mut region.page_mut(page)[2];
            *b = b.wrapping_add(1);
            let hex = self.digest().to_hex();
            let mut line = [b'\n'; 65];
            line[..64].copy_from_slice(hex.as_bytes());
            let mut sent = 0;
            while sent < line.len() {
                // SAFETY: writes from a local buffer.
                let n = unsafe {
                    libc::write(CHILD_FD, line[sent..].as_ptr().cast(), line.len() - sent)
                };
                if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if n <= 0 {
                    // SAFETY: as above.
                    unsafe { libc::_exit(0) };
                }
                sent += n as usize;
            }
        }
    }

    fn ask_child(&mut self) -> Result<String, MutatorError> {
        let link = self.child.as_mut().ok_or(MutatorError::NoChild)?;
        let mut answer = [0u8; 65];
        link.sock
            .write_all(b"D")
            .and_then(|()| link.sock.read_exact(&mut answer))
            .map_err(MutatorError::ChildLink)?;
        let text = String::from_utf8_lossy(&answer);
        match text.strip_suffix('\n') {
            Some(hex) if hex.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(format!("child {hex}")),
            _ => Err(MutatorError::ChildAnswer(text.into_owned())),
        }
    }

    fn grow(&mut self, kib: usize) -> Result<String, MutatorError> {
        let add = kib.saturating_mul(1024);
        if kib == 0 || self.heap.len().saturating_add(add) > MAX_HEAP {
            return Err(MutatorError::Limit {
                what: "the heap",
                limit: MAX_HEAP,
            });
        }
        let start = self.heap.len();
        self.heap.resize(start + add, 0);
        SmallRng::seed_from_u64(start as u64).fill_bytes(&mut self.heap[start..]);
        Ok(format!(
            "OK {} {:08x}",
            self.heap.len(),
            crc32c::crc32c(&self.heap)
        ))
    }

    fn new_region(&mut self, pages: usize) -> Result<String, MutatorError> {
        if pages == 0 || pages > MAX_REGION_PAGES {
            return Err(MutatorError::Usage("NEW pages (1 to MAX_REGION_PAGES)"));
        }
        if self.regions.len() >= MAX_REGIONS {
            return Err(MutatorError::Limit {
                what: "the regions",
                limit: MAX_REGIONS,
            });
        }
        let index = self.regions.len();
        self.regions
            .push(Region::new(pages, Fill::FirstHalf, index as u64)?);
        Ok(format!("OK {index}"))
    }
}

/// The answer line for a refused request: the error and its sources.
fn refusal(e: &MutatorError) -> String {
    let mut line = format!("ERR {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        line.push_str(&format!(": {s}"));
        source = s.source();
    }
    line
}

/// Runs the mutator; returns only on a listen error.
pub fn run(cfg: &MutatorConfig) -> io::Result<()> {
    let mutator = Arc::new(Mutex::new(Mutator::new().map_err(io::Error::other)?));
    let listener = TcpListener::bind(cfg.listen)?;
    if let Some(p) = &cfg.port_file {
        crate::write_port_file(p, listener.local_addr()?.port())?;
    }
    // A runtime's timer: a thread that wakes every tick and changes nothing, so every
    // checkpoint catches a thread mid-sleep that the restore must resume, and no answer
    // depends on when it ran.
    thread::spawn(|| loop {
        thread::sleep(TICK);
    });
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let mutator = mutator.clone();
        thread::spawn(move || {
            let _ = serve(conn, &mutator);
        });
    }
    Ok(())
}

/// Serves one connection, one request line after another.
fn serve(conn: TcpStream, mutator: &Mutex<Mutator>) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        // A request that panicked cannot have left the state half changed in a way the
        // next one must not see: every op changes whole pages or whole regions.
        let mut m = mutator.lock().unwrap_or_else(|e| e.into_inner());
        let mut reply = m.apply(line.trim()).unwrap_or_else(|e| refusal(&e));
        drop(m);
        reply.push('\n');
        out.write_all(reply.as_bytes())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(m: &mut Mutator, line: &str) -> String {
        m.apply(line)
            .unwrap_or_else(|e| panic!("{line}: {}", refusal(&e)))
    }

    #[test]
    fn a_fresh_mutator_and_its_digest_are_the_same_every_time() {
        let (mut a, mut b) = (Mutator::new().unwrap(), Mutator::new().unwrap());
        assert_eq!(ok(&mut a, "DIGEST"), ok(&mut b, "DIGEST"));
        assert_eq!(
            ok(&mut a, "DIGEST"),
            ok(&mut a, "DIGEST"),
            "reading changes nothing"
        );
        assert_eq!(ok(&mut a, "PING"), "PONG");
        assert_eq!(ok(&mut a, "WRITE 7"), ok(&mut b, "WRITE 7"));
        assert_eq!(ok(&mut a, "DIGEST"), ok(&mut b, "DIGEST"));
        let before = ok(&mut a, "DIGEST");
        ok(&mut a, "WRITE 8");
        assert_ne!(ok(&mut a, "DIGEST"), before, "a write shows in the digest");
    }

    #[test]
    fn dontneeded_pages_read_zero() {
        let mut m = Mutator::new().unwrap();
        assert!(m.regions[0].page(5).iter().any(|b| *b != 0));
        assert_eq!(ok(&mut m, "DONTNEED 0 4 3"), "OK 3 zero");
        for page in 4..7 {
            assert!(m.regions[0].page(page).iter().all(|b| *b == 0));
        }
        assert!(m.regions[0].page(7).iter().any(|b| *b != 0), "only those");
        let mut fresh = Mutator::new().unwrap();
        for page in 4..7 {
            fresh.regions[0].page_mut(page).fill(0);
        }
        assert_eq!(ok(&mut m, "DIGEST"), ok(&mut fresh, "DIGEST"));
    }

    #[test]
    fn freed_pages_count_as_right_whether_dropped_or_kept() {
        let mut m = Mutator::new().unwrap();
        let untouched = ok(&mut m, "DIGEST");
        assert_eq!(ok(&mut m, "FREE 0 10 4"), "OK 4");
        let freed = ok(&mut m, "DIGEST");
        assert_ne!(freed, untouched, "freed pages count as markers");
        // What the kernel may do with them: drop one (zero), keep the others.
        m.regions[0]
            .madvise(11 * PAGE..12 * PAGE, libc::MADV_DONTNEED)
            .unwrap();
        assert_eq!(ok(&mut m, "DIGEST"), freed);
        // Anything else is a wrong restore.
        // SAFETY: page 12 of region 0 is mapped, and no reference into it is alive.
        unsafe { *m.regions[0].ptr.as_ptr().add(12 * PAGE + 3) ^= 1 };
        assert_ne!(ok(&mut m, "DIGEST"), freed);
        // A write makes a freed page definite again: zero, then the run.
        let mut a = Mutator::new().unwrap();
        let mut b = Mutator::new().unwrap();
        ok(&mut a, "FREE 0 0 1024");
        ok(&mut a, "FREE 2 0 512");
        ok(&mut b, "DONTNEED 0 0 1024");
        ok(&mut b, "DONTNEED 2 0 512");
        assert_eq!(ok(&mut a, "WRITE 3"), ok(&mut b, "WRITE 3"));
    }

    #[test]
    fn remap_keeps_contents_and_grows_with_zeros() {
        let mut m = Mutator::new().unwrap();
        let first: Vec<u8> = m.regions[0].bytes()[..512 * PAGE].to_vec();
        let grown = ok(&mut m, "REMAP 0 4096");
        assert!(grown.starts_with("OK 1024 4096 "), "{grown}");
        assert_eq!(&m.regions[0].bytes()[..512 * PAGE], &first[..]);
        assert!(m.regions[0].bytes()[1024 * PAGE..].iter().all(|b| *b == 0));
        ok(&mut m, "REMAP 0 512");
        assert_eq!(m.regions[0].bytes(), &first[..]);
        // Growing back brings zeros, not the old tail.
        ok(&mut m, "REMAP 0 1024");
        assert!(m.regions[0].bytes()[512 * PAGE..].iter().all(|b| *b == 0));
        assert!(matches!(m.apply("REMAP 0 0"), Err(MutatorError::Usage(_))));
    }

    #[test]
    fn unmapmap_gives_a_zero_region_of_the_same_size() {
        let mut m = Mutator::new().unwrap();
        let at = m.regions[0].ptr;
        let answer = ok(&mut m, "UNMAPMAP 0");
        assert_eq!(m.regions[0].ptr, at, "at the same address");
        assert_eq!(m.regions[0].pages, 1024);
        assert!(m.regions[0].bytes().iter().all(|b| *b == 0));
        let mut crc = 0;
        for _ in 0..1024 {
            crc = crc32c::crc32c_append(crc, &[0]);
            crc = crc32c::crc32c_append(crc, &[0; PAGE]);
        }
        assert_eq!(answer, format!("OK {crc:08x}"));
    }

    #[test]
    fn the_child_keeps_its_own_diverging_copy() {
        let mut m = Mutator::new().unwrap();
        assert!(matches!(m.apply("CHILD"), Err(MutatorError::NoChild)));
        ok(&mut m, "FORK");
        let parent = ok(&mut m, "DIGEST");
        let c1 = ok(&mut m, "CHILD");
        let c2 = ok(&mut m, "CHILD");
        assert!(c1.starts_with("child ") && c1.len() == 70, "{c1}");
        assert_ne!(c1, c2, "each question changes the child's copy");
        assert_ne!(c1, format!("child {}", &parent), "the copy diverged");
        // The parent's writes do not reach the child, and the answers repeat.
        let mut other = Mutator::new().unwrap();
        ok(&mut other, "FORK");
        ok(&mut other, "WRITE 1");
        assert_eq!(ok(&mut other, "CHILD"), c1);
        assert_eq!(ok(&mut m, "DIGEST"), parent);
        // A new FORK replaces the child, copying the parent as it is now.
        let pid = m.child.as_ref().unwrap().pid;
        ok(&mut m, "FORK");
        assert!(
            nix::sys::signal::kill(pid, None).is_err(),
            "old child reaped"
        );
        assert_eq!(ok(&mut m, "CHILD"), c1);
    }

    #[test]
    fn grow_and_new_are_deterministic_and_bounded() {
        let (mut a, mut b) = (Mutator::new().unwrap(), Mutator::new().unwrap());
        assert_eq!(ok(&mut a, "GROW 300"), ok(&mut b, "GROW 300"));
        assert_eq!(a.heap.len(), INITIAL_HEAP + 300 * 1024);
        assert_eq!(ok(&mut a, "NEW 100"), "OK 4");
        ok(&mut b, "NEW 100");
        assert!(a.regions[4].page(49).iter().any(|x| *x != 0));
        assert!(a.regions[4].page(50).iter().all(|x| *x == 0));
        assert_eq!(ok(&mut a, "DIGEST"), ok(&mut b, "DIGEST"));
        assert!(matches!(
            a.apply(&format!("GROW {}", MAX_HEAP)),
            Err(MutatorError::Limit { .. })
        ));
        assert!(matches!(a.apply("NEW 0"), Err(MutatorError::Usage(_))));
    }

    #[test]
    fn bad_requests_are_refused_and_change_nothing() {
        let mut m = Mutator::new().unwrap();
        let before = ok(&mut m, "DIGEST");
        for line in [
            "",
            "JUMP",
            "WRITE",
            "WRITE x",
            "DONTNEED 0 1",
            "DONTNEED 9 0 1",
            "DONTNEED 0 1020 5",
            "DONTNEED 0 0 0",
            "FREE 1 0 99999999999999999999",
            "REMAP 7 10",
            "UNMAPMAP 4",
            "FORK now",
        ] {
            let e = m.apply(line).expect_err(line);
            assert!(refusal(&e).starts_with("ERR "), "{line}");
        }
        assert_eq!(ok(&mut m, "DIGEST"), before);
    }

    #[test]
    fn the_service_answers_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mutator = Mutex::new(Mutator::new().unwrap());
        thread::scope(|s| {
            s.spawn(|| {
                let (conn, _) = listener.accept().unwrap();
                serve(conn, &mutator).unwrap();
            });
            let mut c = crate::SampleClient::connect(addr).unwrap();
            assert_eq!(c.call("PING").unwrap(), "PONG");
            assert!(c.call("NOPE").unwrap().starts_with("ERR unknown command"));
            let want = Mutator::new().unwrap().digest().to_hex().to_string();
            assert_eq!(c.call("DIGEST").unwrap(), want);
        });
    }
}
