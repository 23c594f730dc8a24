//! One lazy restore's logic, generic over the uffd so that unit tests drive it with a fake:
//! the processes and their range sets, page faults (with readahead), uffd events, copies and
//! their errors, the prefetch of the working set after FIN, background fill, the working-set
//! recording, liveness, and the stats. It is the single owner of the range bookkeeping; the
//! server's loop decides when to call it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use serde::Serialize;
use torpor_image::pages::{PageRange, PAGE_SIZE};

use crate::ranges::{Extents, RangeSet};
use crate::uffd::{Event, FillError, Uffd};
use crate::PageSource;

/// First readahead window of a fault, and the step background chunks grow by.
pub(crate) const FAULT_WINDOW: u64 = 64 << 10;
/// Largest prefetch and background chunk.
pub(crate) const MAX_CHUNK: u64 = 4 << 20;
/// Chunks of a fill hinted to the source ahead of the one being copied.
const HINT_AHEAD: usize = 2;
/// How often a copy is retried after `EAGAIN`/`ENOENT` (the mm changing under it) before the
/// session stops waiting for the layout to settle.
const MAX_RETRIES: u32 = 100;
/// How long to wait for the event an `EAGAIN` announces when none is queued yet.
const RETRY_WAIT: Duration = Duration::from_millis(10);

/// What happens to lazy ranges nobody faulted once the prefetch is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Fill {
    /// Faults only: pages never touched stay in the pool (and can be inherited by the next
    /// incremental checkpoint).
    OnDemand,
    /// Copy everything in the background, lowest address first, one process after another.
    Background,
}

/// What the server did so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LazyStats {
    /// Page faults handled (copied or zero-filled; faults on in-flight pages are not counted).
    pub faults: u64,
    /// Bytes copied for faults, readahead included.
    pub faulted_bytes: u64,
    /// Bytes copied by the working-set prefetch.
    pub prefetched_bytes: u64,
    /// Bytes copied by background fill, `fill_all` and the fill at shutdown.
    pub background_bytes: u64,
    /// Pages zero-filled for faults outside every lazy range.
    pub zero_pages: u64,
    /// Lazy bytes not copied yet, over the processes still tracked.
    pub remaining_bytes: u64,
    /// Processes CRIU handed over (zombies not counted).
    pub processes: u32,
    /// Children forked while their parent still had lazy ranges.
    pub forks: u32,
    /// FIN was received.
    pub finished: bool,
    /// Working-set ranges still waiting to be pushed (after FIN).
    pub prefetch_pending: bool,
    /// Why the server gave up, if it did (the tree was killed through `on_failure`).
    pub failed: Option<String>,
    /// It gave up because the page source found its data corrupt.
    pub source_corrupt: bool,
    /// Sum over copied faults of the time from reading the fault to the end of its copy.
    pub fault_wait_s: f64,
    /// Lazy bytes ever tracked: the configured ranges of processes received, plus the copies
    /// forked children inherited. Equals copied + dropped + remaining.
    pub lazy_bytes: u64,
    /// Lazy bytes that left without a copy: unmapped, madvised away, their mm gone, or found
    /// already present (`EEXIST`).
    pub dropped_bytes: u64,
}

/// State the server's handle reads while the loop runs.
#[derive(Debug, Default)]
pub(crate) struct SharedState {
    pub stats: LazyStats,
    pub working_set: HashMap<i32, Extents>,
    /// Why the restore connection failed, if it did.
    pub conn_error: Option<String>,
    /// The server's thread has ended.
    pub stopped: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub state: Mutex<SharedState>,
    pub changed: Condvar,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why [`crate::LazyServer::remaining`] cannot give an exact answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unprovable {
    #[error("a child forked from pid {parent} during the lazy phase still lives with lazy ranges")]
    ForkedChild { parent: i32 },
    #[error("the lazy-pages server failed: {0}")]
    Failed(String),
    #[error("the lazy-pages server has stopped")]
    Stopped,
}

/// The part of the configuration the session uses.
pub(crate) struct SessionConfig {
    pub ranges: HashMap<i32, Vec<PageRange>>,
    pub prefetch: HashMap<i32, Vec<(u64, u64)>>,
    pub record_for: Duration,
    pub fill: Fill,
    pub max_fault_read: u64,
    pub on_failure: Box<dyn Fn(&str) + Send>,
}

struct Proc<U> {
    /// The pid CRIU sent (a forked child keeps its parent's: its own is unknown).
    pid: i32,
    forked: bool,
    /// `None` once the mm is gone or everything was copied after FIN (retired).
    uffd: Option<U>,
    remaining: RangeSet,
    /// Taken out of `remaining` by the copy under way; events apply to it too.
    inflight: RangeSet,
    /// End of the last fault window, to detect sequential faults.
    ra_next: u64,
    ra_window: u64,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Fault,
    Prefetch,
    Background,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    GaveUp,
    Gone,
    Failed,
}

#[derive(Debug)]
struct Fault {
    proc: usize,
    page: u64,
    read_at: Instant,
}

pub(crate) struct Session<U: Uffd> {
    procs: Vec<Proc<U>>,
    ranges: HashMap<i32, Vec<PageRange>>,
    prefetch_cfg: HashMap<i32, Vec<(u64, u64)>>,
    /// (process, start, end) still to prefetch.
    prefetch: VecDeque<(usize, u64, u64)>,
    record_for: Duration,
    record_until: Option<Instant>,
    fill: Fill,
    fill_all: bool,
    /// Set while a checkpoint runs: no prefetch or fill, and every copy (a fault of the
    /// still-running service, or one served while CRIU dumps) is noted per pid, so the
    /// checkpoint can check that its dump holds each of those pages.
    held: Option<HashMap<i32, Extents>>,
    max_fault_read: u64,
    xfer_len: u64,
    on_failure: Box<dyn Fn(&str) + Send>,
    failed: Option<String>,
    fin: bool,
    queue: VecDeque<Fault>,
    source: Box<dyn PageSource>,
    shared: Arc<Shared>,
}

fn page_down(a: u64) -> u64 {
    a & !(PAGE_SIZE - 1)
}

impl<U: Uffd> Session<U> {
    pub fn new(
        cfg: SessionConfig,
        source: Box<dyn PageSource>,
        shared: Arc<Shared>,
    ) -> std::io::Result<Session<U>> {
        let max_fault_read = page_down(cfg.max_fault_read).max(PAGE_SIZE);
        Ok(Session {
            procs: Vec::new(),
            ranges: cfg.ranges,
            prefetch_cfg: cfg.prefetch,
            prefetch: VecDeque::new(),
            record_for: cfg.record_for,
            record_until: None,
            fill: cfg.fill,
            fill_all: false,
            held: None,
            max_fault_read,
            xfer_len: FAULT_WINDOW,
            on_failure: cfg.on_failure,
            failed: None,
            fin: false,
            queue: VecDeque::new(),
            source,
            shared,
        })
    }

    fn stat(&self, f: impl FnOnce(&mut LazyStats)) {
        f(&mut self.shared.lock().stats);
    }

    /// A process CRIU handed over; its ranges come from the configuration.
    pub fn add_process(&mut self, pid: i32, uffd: U) -> usize {
        let ranges = self.ranges.remove(&pid).unwrap_or_default();
        if ranges.is_empty() {
            tracing::debug!(pid, "restored process has no lazy ranges");
        }
        let remaining = RangeSet::from_ranges(&ranges);
        let bytes = remaining.bytes();
        self.procs.push(Proc {
            pid,
            forked: false,
            uffd: Some(uffd),
            remaining,
            inflight: RangeSet::new(),
            ra_next: 0,
            ra_window: 0,
        });
        self.stat(|s| {
            s.processes += 1;
            s.lazy_bytes += bytes;
        });
        self.procs.len() - 1
    }

    /// FIN: the restorers registered every range; prefetch and background fill may start.
    pub fn finish(&mut self) {
        self.fin = true;
        self.record_until = Some(Instant::now() + self.record_for);
        for (i, p) in self.procs.iter().enumerate() {
            if p.forked {
                continue;
            }
            for &(start, len) in self.prefetch_cfg.get(&p.pid).into_iter().flatten() {
                let end = (start + len + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
                self.prefetch.push_back((i, page_down(start), end));
            }
        }
        let pending = !self.prefetch.is_empty();
        self.stat(|s| {
            s.finished = true;
            s.prefetch_pending = pending;
        });
    }

    pub fn is_finished(&self) -> bool {
        self.fin
    }

    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    pub fn set_fill(&mut self, fill: Fill) {
        self.fill = fill;
    }

    /// The tasks resume (long after FIN, for a restore held before resuming): what they
    /// touch from now on is the working set, and untouched pages follow `fill`.
    pub fn resumed(&mut self, fill: Fill) {
        self.record_until = Some(Instant::now() + self.record_for);
        self.fill = fill;
    }

    /// Stops prefetch and fill for a checkpoint and starts noting every copy; returns the
    /// fill mode to give back with [`Session::release_hold`].
    pub fn hold(&mut self) -> Fill {
        self.prefetch.clear();
        self.fill_all = false;
        self.held = Some(HashMap::new());
        std::mem::replace(&mut self.fill, Fill::OnDemand)
    }

    /// What was copied since [`Session::hold`], per pid (start, len), coalesced.
    pub fn copied_while_held(&self) -> HashMap<i32, Vec<(u64, u64)>> {
        self.held
            .as_ref()
            .map(|h| h.iter().map(|(pid, e)| (*pid, e.to_vec())).collect())
            .unwrap_or_default()
    }

    /// Ends a hold (the checkpoint did not happen and the service runs on).
    pub fn release_hold(&mut self, fill: Fill) {
        self.held = None;
        self.fill = fill;
    }

    /// Asks for every remaining range to be copied now, whatever the fill mode.
    pub fn request_fill_all(&mut self, on: bool) {
        self.fill_all = on;
    }

    /// Copies in now every remaining range whose bytes are in one of `generations` (so
    /// that the next checkpoint holds them and no longer refers to those generations);
    /// returns the bytes copied. Faults read meanwhile are served between chunks.
    pub fn fill_from(&mut self, generations: &BTreeSet<u64>) -> Result<u64, String> {
        let mut copied = 0;
        for p in 0..self.procs.len() {
            loop {
                if let Some(f) = &self.failed {
                    return Err(f.clone());
                }
                if self.procs[p].uffd.is_none() {
                    break;
                }
                let Some(r) = self.procs[p]
                    .remaining
                    .iter()
                    .find(|r| generations.contains(&r.origin.generation))
                else {
                    break;
                };
                let len = r.len.min(MAX_CHUNK);
                if self.transfer(p, r.start, r.start + len, Kind::Background) != Outcome::Done {
                    // gone, or given back to the remaining set: either way this process is
                    // as filled as it can be now
                    break;
                }
                copied += len;
                self.run_queue();
            }
        }
        Ok(copied)
    }

    /// The processes whose uffd the loop must watch, with their index.
    pub fn pollable(&self) -> impl Iterator<Item = (usize, &U)> {
        let live = self.failed.is_none();
        self.procs
            .iter()
            .enumerate()
            .filter(move |_| live)
            .filter_map(|(i, p)| p.uffd.as_ref().map(|u| (i, u)))
    }

    /// Whether prefetch or fill work is waiting (the loop then polls without blocking).
    pub fn has_work(&self) -> bool {
        self.failed.is_none()
            && (!self.queue.is_empty()
                || self.fin
                    && (!self.prefetch.is_empty()
                        || ((self.fill == Fill::Background || self.fill_all)
                            && !self.all_filled())))
    }

    /// No tracked process has a lazy byte left.
    pub fn all_filled(&self) -> bool {
        self.procs
            .iter()
            .all(|p| p.uffd.is_none() || (p.remaining.is_empty() && p.inflight.is_empty()))
    }

    /// Reads and handles every event of process `p`, faults included.
    pub fn service(&mut self, p: usize) {
        self.read_and_apply(p);
        self.run_queue();
    }

    /// [`Session::service`] for every process.
    pub fn service_all(&mut self) {
        for p in 0..self.procs.len() {
            self.read_and_apply(p);
        }
        self.run_queue();
    }

    /// One chunk of prefetch, else of background fill (after FIN only: before it the
    /// restorer may not have moved and registered the VMAs yet). False if there was none.
    pub fn step(&mut self) -> bool {
        // faults read while doing something else come first
        self.run_queue();
        if !self.fin || self.failed.is_some() {
            return false;
        }
        while let Some(&(p, start, end)) = self.prefetch.front() {
            let Some(r) = self.procs[p].remaining.first_within(start, end) else {
                self.prefetch.pop_front();
                continue;
            };
            let len = r.len.min(MAX_CHUNK);
            if let Some(front) = self.prefetch.front_mut() {
                front.1 = r.start + len;
            }
            self.transfer(p, r.start, r.start + len, Kind::Prefetch);
            self.run_queue();
            return true;
        }
        if self.fill == Fill::Background || self.fill_all {
            let next = self
                .procs
                .iter()
                .position(|p| p.uffd.is_some() && !p.remaining.is_empty());
            if let Some(p) = next {
                let r = self.procs[p].remaining.first().expect("not empty");
                // A fill asked for copies in whole chunks from the start; background fill
                // grows its chunks, so that a fault is never queued behind a large one early.
                if self.fill_all {
                    self.xfer_len = MAX_CHUNK;
                }
                let len = r.len.min(self.xfer_len);
                self.xfer_len = (self.xfer_len + FAULT_WINDOW).min(MAX_CHUNK);
                // the chunks after this one, fetched while this one is copied
                let (mut at, mut xfer) = (r.start + len, self.xfer_len);
                for _ in 0..HINT_AHEAD {
                    let Some(next) = self.procs[p].remaining.first_within(at, u64::MAX) else {
                        break;
                    };
                    let next_len = next.len.min(xfer);
                    self.source.hint(&next.origin, next_len as usize);
                    at = next.start + next_len;
                    xfer = (xfer + FAULT_WINDOW).min(MAX_CHUNK);
                }
                self.transfer(p, r.start, r.start + len, Kind::Background);
                self.run_queue();
                return true;
            }
        }
        false
    }

    /// After FIN, closes the uffds of processes with nothing left to copy: a fault in their
    /// registered holes then gets the kernel's own zero page, which is what it would get here.
    pub fn retire_done(&mut self) {
        if !self.fin || self.failed.is_some() {
            return;
        }
        for p in 0..self.procs.len() {
            let done = {
                let proc = &self.procs[p];
                proc.uffd.is_some() && proc.remaining.is_empty() && proc.inflight.is_empty()
            };
            if !done {
                continue;
            }
            // read what is queued first (a fork must hand its child over before the close)
            // and serve the faults that came with it: nothing else would, the uffd having
            // been read dry
            self.read_and_apply(p);
            self.run_queue();
            let proc = &mut self.procs[p];
            let pending = self.queue.iter().any(|f| f.proc == p);
            if proc.uffd.is_some()
                && proc.remaining.is_empty()
                && proc.inflight.is_empty()
                && !pending
            {
                proc.uffd = None;
            }
        }
    }

    /// Per live process, the ranges never copied (after every pending event is handled).
    pub fn remaining(&mut self) -> Result<HashMap<i32, Vec<PageRange>>, Unprovable> {
        if let Some(f) = &self.failed {
            return Err(Unprovable::Failed(f.clone()));
        }
        self.service_all();
        if let Some(f) = &self.failed {
            return Err(Unprovable::Failed(f.clone()));
        }
        let mut out: HashMap<i32, Vec<PageRange>> = HashMap::new();
        for p in 0..self.procs.len() {
            let alive = match self.procs[p].uffd.as_mut() {
                Some(u) => u.mm_alive(),
                None => continue,
            };
            if !alive {
                self.mm_gone(p);
                continue;
            }
            let proc = &self.procs[p];
            if proc.remaining.is_empty() {
                continue;
            }
            if proc.forked {
                return Err(Unprovable::ForkedChild { parent: proc.pid });
            }
            out.entry(proc.pid)
                .or_default()
                .extend(proc.remaining.iter());
        }
        Ok(out)
    }

    /// Prepares the stop: handles pending events, forgets dead processes, and asks for the
    /// rest to be copied. Before FIN no copy is safe, so live ranges then mean giving up.
    pub fn begin_shutdown(&mut self) {
        if self.failed.is_some() {
            return;
        }
        self.service_all();
        for p in 0..self.procs.len() {
            if let Some(u) = self.procs[p].uffd.as_mut() {
                if !u.mm_alive() {
                    self.mm_gone(p);
                }
            }
        }
        if !self.fin && !self.all_filled() {
            self.fail("stopped before the restore finished, with lazy ranges left");
            return;
        }
        self.fill_all = true;
    }

    /// Gives up because the restore cannot go on; the tree is killed only if it has lazy
    /// ranges left (otherwise closing the uffds loses nothing).
    pub fn give_up(&mut self, reason: &str) {
        if !self.all_filled() {
            self.fail(reason);
        }
    }

    /// Final: kills the tree through `on_failure`, copies nothing more, zero-fills nothing.
    /// The uffds stay open until the session is dropped.
    pub fn fail(&mut self, reason: &str) {
        if self.failed.is_some() {
            return;
        }
        tracing::error!(
            reason,
            "lazy-pages server gives up; killing the restored tree"
        );
        self.failed = Some(reason.to_string());
        self.queue.clear();
        self.prefetch.clear();
        self.stat(|s| s.failed = Some(reason.to_string()));
        (self.on_failure)(reason);
    }

    /// Updates the derived stats.
    pub fn publish(&self) {
        let remaining: u64 = self
            .procs
            .iter()
            .map(|p| p.remaining.bytes() + p.inflight.bytes())
            .sum();
        let pending = !self.prefetch.is_empty();
        self.stat(|s| {
            s.remaining_bytes = remaining;
            s.prefetch_pending = pending;
        });
    }

    fn read_and_apply(&mut self, p: usize) -> usize {
        if self.failed.is_some() {
            return 0;
        }
        let Some(uffd) = self.procs[p].uffd.as_mut() else {
            return 0;
        };
        let events = match uffd.read_events() {
            Ok(events) => events,
            Err(e) => {
                let pid = self.procs[p].pid;
                self.fail(&format!("reading uffd events of pid {pid}: {e}"));
                return 0;
            }
        };
        let n = events.len();
        for ev in events {
            self.apply(p, ev);
        }
        n
    }

    fn apply(&mut self, p: usize, ev: Event<U>) {
        let pid = self.procs[p].pid;
        match ev {
            Event::PageFault { address } => {
                let page = page_down(address);
                // a fault on a page being copied is answered by that copy's wake
                if !self.procs[p].inflight.contains(page) {
                    self.queue.push_back(Fault {
                        proc: p,
                        page,
                        read_at: Instant::now(),
                    });
                }
            }
            Event::Fork(child) => {
                // the child's memory is the parent's at fork time: what the parent still
                // misses, including what is being copied into the parent right now
                let parent = &self.procs[p];
                let mut remaining = parent.remaining.clone();
                remaining.absorb(&parent.inflight);
                let bytes = remaining.bytes();
                self.procs.push(Proc {
                    pid,
                    forked: true,
                    uffd: Some(child),
                    remaining,
                    inflight: RangeSet::new(),
                    ra_next: 0,
                    ra_window: 0,
                });
                self.stat(|s| {
                    s.forks += 1;
                    s.lazy_bytes += bytes;
                });
            }
            Event::Remap { from, to, len } => {
                let proc = &mut self.procs[p];
                proc.remaining.remap(from, to, len);
                proc.inflight.remap(from, to, len);
                proc.ra_next = 0;
            }
            Event::Remove { start, end } => {
                // later faults there are plain zero-fill faults for the kernel to serve
                let unreg = match self.procs[p].uffd.as_mut() {
                    Some(u) => u.unregister(start, end.saturating_sub(start)),
                    None => Ok(()),
                };
                match unreg {
                    Err(Errno::ENOMEM) => return self.mm_gone(p),
                    Err(e) => tracing::warn!(pid, start, end, "uffd unregister after madvise: {e}"),
                    Ok(()) => {}
                }
                self.drop_range(p, start, end);
            }
            Event::Unmap { start, end } => self.drop_range(p, start, end),
            Event::Unknown(code) => {
                self.fail(&format!("unexpected uffd event {code:#x} from pid {pid}"))
            }
        }
    }

    fn drop_range(&mut self, p: usize, start: u64, end: u64) {
        let proc = &mut self.procs[p];
        let gone: u64 = proc
            .remaining
            .take(start, end)
            .iter()
            .chain(proc.inflight.take(start, end).iter())
            .map(|r| r.len)
            .sum();
        self.stat(|s| s.dropped_bytes += gone);
    }

    fn mm_gone(&mut self, p: usize) {
        let proc = &mut self.procs[p];
        let gone = proc.remaining.bytes() + proc.inflight.bytes();
        proc.remaining = RangeSet::new();
        proc.inflight = RangeSet::new();
        // nothing can fault any more: closing loses nothing
        proc.uffd = None;
        tracing::debug!(pid = proc.pid, gone, "mm gone");
        self.stat(|s| s.dropped_bytes += gone);
    }

    /// Reads more events of `p` after an `EAGAIN`; waits briefly when none is queued yet.
    fn drain_for_retry(&mut self, p: usize) {
        if self.read_and_apply(p) == 0 {
            if let Some(u) = self.procs[p].uffd.as_mut() {
                u.wait_event(RETRY_WAIT);
            }
            self.read_and_apply(p);
        }
    }

    fn run_queue(&mut self) {
        while let Some(f) = self.queue.pop_front() {
            if self.failed.is_some() {
                self.queue.clear();
                return;
            }
            self.handle_fault(f);
        }
    }

    fn handle_fault(&mut self, f: Fault) {
        let p = f.proc;
        if self.procs[p].uffd.is_none() {
            return;
        }
        self.stat(|s| s.faults += 1);
        let mut attempts = 0;
        loop {
            if self.failed.is_some() {
                return;
            }
            let proc = &self.procs[p];
            if proc.uffd.is_none() || proc.inflight.contains(f.page) {
                return;
            }
            if let Some(piece) = proc.remaining.containing(f.page) {
                self.xfer_len = FAULT_WINDOW;
                let (start, end) = self.window(p, f.page, &piece);
                if self.transfer(p, start, end, Kind::Fault) == Outcome::Done {
                    let waited = f.read_at.elapsed().as_secs_f64();
                    self.stat(|s| s.fault_wait_s += waited);
                }
                return;
            }
            let pid = proc.pid;
            let Some(uffd) = self.procs[p].uffd.as_mut() else {
                return;
            };
            match uffd.zeropage(f.page, PAGE_SIZE) {
                Ok(()) => {
                    self.stat(|s| s.zero_pages += 1);
                    return;
                }
                // present already, or no longer registered (removed, unmapped): the thread
                // only needs waking, and then sees the page or faults as the kernel decides
                Err(FillError {
                    errno: Errno::EEXIST | Errno::ENOENT,
                    ..
                }) => {
                    let _ = uffd.wake(f.page, PAGE_SIZE);
                    return;
                }
                Err(FillError {
                    errno: Errno::EAGAIN,
                    ..
                }) => {
                    attempts += 1;
                    if attempts > MAX_RETRIES {
                        // the thread faults again and comes back as a new event
                        let _ = uffd.wake(f.page, PAGE_SIZE);
                        return;
                    }
                    // the layout is changing: the page may even become lazy
                    self.drain_for_retry(p);
                }
                Err(FillError {
                    errno: Errno::ESRCH | Errno::ENOSPC,
                    ..
                }) => return self.mm_gone(p),
                Err(FillError { errno, .. }) => {
                    return self.fail(&format!("zero-filling {:#x} of pid {pid}: {errno}", f.page))
                }
            }
        }
    }

    /// The readahead window for a fault at `page` inside `piece`: 64 KiB aligned, doubling
    /// while faults are sequential, up to `max_fault_read`, clipped to the piece.
    fn window(&mut self, p: usize, page: u64, piece: &PageRange) -> (u64, u64) {
        let initial = FAULT_WINDOW.min(self.max_fault_read);
        let proc = &mut self.procs[p];
        let window = if page == proc.ra_next && proc.ra_window > 0 {
            (proc.ra_window * 2).min(self.max_fault_read)
        } else {
            initial
        };
        let base = page - page % initial;
        let start = base.max(piece.start);
        let end = (base + window).min(piece.end()).max(page + PAGE_SIZE);
        proc.ra_window = window;
        proc.ra_next = end;
        (start, end)
    }

    /// Copies `[start, end)`, which lies inside one remaining piece of `p`, from the source.
    fn transfer(&mut self, p: usize, start: u64, end: u64, kind: Kind) -> Outcome {
        let pid = self.procs[p].pid;
        {
            let proc = &mut self.procs[p];
            for r in proc.remaining.take(start, end) {
                proc.inflight.insert(r);
            }
        }
        let mut attempts = 0;
        loop {
            if self.failed.is_some() {
                return Outcome::Failed;
            }
            // the lowest in-flight piece: where the range is now, if an mremap moved it
            let Some(cur) = self.procs[p].inflight.first() else {
                return Outcome::Done;
            };
            let len = cur.len as usize;
            let bytes = match self.source.read(&cur.origin, len) {
                Ok(bytes) => bytes,
                Err(e) => {
                    if e.corrupt {
                        self.stat(|s| s.source_corrupt = true);
                    }
                    self.fail(&format!(
                        "reading {len} bytes for {:#x} of pid {pid} from {}@{}+{:#x}: {}",
                        cur.start,
                        cur.origin.file,
                        cur.origin.generation,
                        cur.origin.offset,
                        e.message
                    ));
                    return Outcome::Failed;
                }
            };
            let Some(uffd) = self.procs[p].uffd.as_mut() else {
                return Outcome::Gone;
            };
            let (done, err) = match uffd.copy(cur.start, bytes) {
                Ok(()) => (cur.len, None),
                Err(FillError { errno, done }) => (page_down(done.min(cur.len)), Some(errno)),
            };
            if done > 0 {
                self.procs[p].inflight.take(cur.start, cur.start + done);
                self.copied(p, cur.start, done, kind);
            }
            let at = cur.start + done;
            match err {
                None => {}
                Some(Errno::EEXIST) => {
                    // present already (someone else filled it); its waiters need a wake
                    if let Some(u) = self.procs[p].uffd.as_mut() {
                        let _ = u.wake(at, PAGE_SIZE);
                    }
                    self.procs[p].inflight.take(at, at + PAGE_SIZE);
                    self.stat(|s| s.dropped_bytes += PAGE_SIZE);
                }
                Some(Errno::EAGAIN | Errno::ENOENT) => {
                    attempts += 1;
                    if attempts > MAX_RETRIES {
                        return self.give_up_transfer(p, err.expect("some"));
                    }
                    self.drain_for_retry(p);
                }
                Some(Errno::ESRCH | Errno::ENOSPC) => {
                    self.mm_gone(p);
                    return Outcome::Gone;
                }
                Some(errno) => {
                    self.fail(&format!("copying to {at:#x} of pid {pid}: {errno}"));
                    return Outcome::Failed;
                }
            }
        }
    }

    /// A copy the layout never let through. `ENOENT` that persists with no event means the
    /// range is in no registered VMA: the kernel would zero-fill memory that has an origin, so
    /// that is fatal. A persisting `EAGAIN` is retried later; waking makes faulting threads
    /// fault again, so none waits for a copy that is not coming.
    fn give_up_transfer(&mut self, p: usize, errno: Errno) -> Outcome {
        let proc = &mut self.procs[p];
        let pid = proc.pid;
        let back = proc.inflight.take(0, u64::MAX);
        for r in &back {
            if let Some(u) = proc.uffd.as_mut() {
                let _ = u.wake(r.start, r.len);
            }
            proc.remaining.insert(r.clone());
        }
        if errno == Errno::ENOENT {
            if let Some(r) = back.first() {
                self.fail(&format!(
                    "lazy range {:#x}+{:#x} of pid {pid} is in no registered VMA",
                    r.start, r.len
                ));
                return Outcome::Failed;
            }
        }
        Outcome::GaveUp
    }

    fn copied(&mut self, p: usize, start: u64, len: u64, kind: Kind) {
        // copies before FIN count too; after FIN only within the window
        let in_window = !matches!(self.record_until, Some(until) if Instant::now() >= until);
        let record = !self.procs[p].forked && in_window;
        let pid = self.procs[p].pid;
        if let Some(held) = self.held.as_mut() {
            held.entry(pid).or_default().add(start, len);
        }
        let mut state = self.shared.lock();
        match kind {
            Kind::Fault => state.stats.faulted_bytes += len,
            Kind::Prefetch => state.stats.prefetched_bytes += len,
            Kind::Background => state.stats.background_bytes += len,
        }
        if record && !matches!(kind, Kind::Background) {
            state.working_set.entry(pid).or_default().add(start, len);
        }
    }
}

impl<U: Uffd> Drop for Session<U> {
    /// Closing a uffd under a live process with ranges left would let the kernel zero-fill
    /// them; if the session ends that way (a panic in the loop), the tree is killed first.
    fn drop(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let mut left = false;
        for p in &mut self.procs {
            if let Some(u) = p.uffd.as_mut() {
                if !(p.remaining.is_empty() && p.inflight.is_empty()) && u.mm_alive() {
                    left = true;
                }
            }
        }
        if left {
            self.fail("lazy-pages server stopped with lazy ranges left");
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
