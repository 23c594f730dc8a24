//! Lazy restore from the pool, and the incremental checkpoints it makes possible.
//!
//! A lazy wake fetches only what CRIU's restore reads itself (every image but the memory, and
//! the few pages CRIU never restores lazily: shared memory, each thread's stack page) into a
//! local directory, with the pages file kept sparse; `criu restore --lazy-pages` then hands
//! each process's userfaultfd to torpor's lazy-pages server ([`torpor_lazy`]), which pushes
//! the working set recorded after the previous wake and serves every other page on its first
//! touch with a range read from the pool. A page nobody touches never leaves the pool.
//!
//! That is what makes the next checkpoint incremental: CRIU dumps what the processes hold, and
//! the snapshot's page index ([`PageIndex`]) refers to the older generations for the ranges
//! that were never touched (the server tracks `madvise`, `munmap`, `mremap` and `fork`, so a
//! range that was dropped, moved or shared with a live child is never resurrected). The
//! generations an index refers to stay in the pool as long as a newer one needs them.
//!
//! With a sealed pool every range read is checked against the block digests committed with
//! its generation (`pages-N.img.blocks`, under that generation's seal). If the pool stops
//! answering while ranges remain, the tree is killed: never zero-filled memory.

use std::{
    collections::{BTreeSet, HashMap},
    fs::{self, File},
    os::unix::fs::FileExt,
    sync::{
        atomic::{AtomicI32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use nix::{sys::signal, unistd::Pid};
use torpor_image::{
    pages::{
        Origin, PageIndex, PageRange, ProcessRanges, WorkingSet, PAGE_INDEX_FILE, PAGE_SIZE,
        WORKING_SET_FILE,
    },
    Manifest,
};
use torpor_lazy::{Fill, LazyConfig, LazyServer, LazyStats, PageSource};
use torpor_pool::{ClientError, PoolClient};
use tracing::{debug, info, warn};

use crate::{
    binary::{keep_log, log_tail, read_no_follow, CriuBinary},
    checkpoint::{
        checkpoint_to_pool_with, is_memory_image, CheckpointError, CheckpointOptions,
        CheckpointReport, DumpedLayout,
    },
    pagemap::{self, Pagemap, Vma},
    pool_pages::{BlockCache, PoolPages, Warm, WARM_MAX},
    procs,
    replicas::{fetch_file_into, find_verified, FetchError, Pools},
    restore::{restore_command, wait_for_pids, RestoreError, RestoreOptions, RestoreReport},
};

/// How a lazy restore serves memory.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    /// Push the working set recorded after the previous wake as soon as the restore ends.
    pub prefetch: bool,
    /// For how long after a wake the pages copied in are recorded as the working set.
    pub record_for: Duration,
    /// Whether untouched pages are filled in the background (they then leave the pool's
    /// keeping and the next checkpoint writes them again) or stay in the pool.
    pub background_fill: bool,
    /// Largest read for one page fault; sequential faults grow the read to it.
    pub max_fault_read: u64,
    /// Run the next wake's restore while the service sleeps and hold it before its tasks
    /// resume ([`crate::armed`]): the wake only releases it.
    pub arm: bool,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions {
            prefetch: true,
            record_for: Duration::from_secs(1),
            background_fill: false,
            max_fault_read: 2 << 20,
            arm: true,
        }
    }
}

/// A service restored lazily: its restore's report and the server that owns its memory's
/// missing pages for as long as the service runs.
#[derive(Debug)]
pub struct LazyWake {
    pub report: RestoreReport,
    pub session: LazySession,
    /// Bytes of the working set pushed at the wake (asked for; the server's stats say what
    /// was copied).
    pub working_set_bytes: u64,
    /// Older generations the restored snapshot reads pages from: the pool must keep them
    /// while the service runs.
    pub inherits: BTreeSet<u64>,
}

/// The lazy-pages server of one restored tree, with what its next checkpoint needs to know.
#[derive(Debug)]
pub struct LazySession {
    server: LazyServer,
    /// Root of the restored tree (0 until CRIU reported it), for `on_failure` to kill.
    root: Arc<AtomicI32>,
}

/// What an incremental checkpoint adds to the snapshot and keeps in the pool.
#[derive(Debug, Clone, Default)]
pub struct Increment {
    /// Ranges inherited from older generations, per process.
    pub index: Option<PageIndex>,
    /// Ranges the service touched right after its wake, for the next wake's prefetch.
    pub working_set: Option<WorkingSet>,
}

impl Increment {
    /// The generations this increment refers to; the pool must keep them.
    pub fn generations(&self) -> BTreeSet<u64> {
        self.index
            .as_ref()
            .map(PageIndex::generations)
            .unwrap_or_default()
    }

    /// Bytes left in older generations.
    pub fn inherited_bytes(&self) -> u64 {
        self.index.as_ref().map_or(0, |i| {
            i.processes
                .iter()
                .flat_map(|p| &p.ranges)
                .map(|r| r.len)
                .sum()
        })
    }

    /// The image files to add to the snapshot.
    pub fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        if let Some(i) = &self.index {
            out.push((PAGE_INDEX_FILE.to_string(), i.encode()));
        }
        if let Some(w) = &self.working_set {
            out.push((WORKING_SET_FILE.to_string(), w.encode()));
        }
        out
    }
}

impl LazySession {
    pub fn stats(&self) -> LazyStats {
        self.server.stats()
    }

    /// What the next checkpoint can leave in the pool, checked against the dump (`layout`,
    /// taken at post-dump while the tree is frozen): every range never touched and still
    /// mapped, in a process the dump holds. Declined (with the reason; the caller then fills
    /// everything and dumps in full) when that cannot be proven exact: a child forked during
    /// the lazy phase lives on (its pages cannot be attributed), a page copied in during the
    /// checkpoint is missing from the dump, or a range lies where CRIU's restore would not
    /// register it for lazy pages (a mapping locked since).
    pub fn increment(&self, layout: &DumpedLayout) -> Result<Increment, String> {
        let remaining = self.server.remaining().map_err(|e| e.to_string())?;
        let copied = self.server.copied_while_held().map_err(|e| e.to_string())?;
        let image = |name: String| {
            layout
                .get(&name)
                .ok_or_else(|| format!("the dump has no {name}"))
        };
        let dumped: BTreeSet<i32> = pagemap::parse_pstree_pids(image("pstree.img".into())?)
            .map_err(|e| format!("pstree.img: {e}"))?
            .into_iter()
            .collect();
        for (pid, ranges) in &copied {
            if !dumped.contains(pid) {
                continue;
            }
            let pm = Pagemap::parse(image(format!("pagemap-{pid}.img"))?)
                .map_err(|e| format!("pagemap-{pid}.img: {e}"))?;
            if let Some(&(start, _)) = ranges
                .iter()
                .find(|&&(s, l)| !dumped_present(&pm, s, s + l))
            {
                return Err(format!(
                    "a page of process {pid} copied in during the checkpoint ({start:#x}) is not in the dump"
                ));
            }
        }
        let mut processes = Vec::new();
        for (pid, ranges) in remaining {
            if ranges.is_empty() || !dumped.contains(&pid) {
                continue;
            }
            let vmas = pagemap::parse_mm_vmas(image(format!("mm-{pid}.img"))?)
                .map_err(|e| format!("mm-{pid}.img: {e}"))?;
            if let Some(r) = ranges
                .iter()
                .find(|r| !in_lazy_vmas(&vmas, r.start, r.end()))
            {
                return Err(format!(
                    "pages of process {pid} at {:#x} lie where a restore would not serve them lazily",
                    r.start
                ));
            }
            processes.push(ProcessRanges { pid, ranges });
        }
        processes.sort_by_key(|p| p.pid);
        Ok(Increment {
            index: (!processes.is_empty()).then_some(PageIndex { processes }),
            working_set: self.working_set(),
        })
    }

    /// The working set recorded since the wake.
    pub fn working_set(&self) -> Option<WorkingSet> {
        let processes: std::collections::BTreeMap<i32, Vec<(u64, u64)>> = self
            .server
            .working_set()
            .into_iter()
            .filter(|(_, r)| !r.is_empty())
            .collect();
        (!processes.is_empty()).then_some(WorkingSet { processes })
    }

    /// Bounds the chain the next incremental snapshot starts: when the pages still in the
    /// pool come from more than `max` generations, those from the oldest are copied in now,
    /// so the checkpoint writes them and the pool can let those generations go. Returns the
    /// generations compacted away.
    pub fn compact(&self, max: usize) -> BTreeSet<u64> {
        let Ok(remaining) = self.server.remaining() else {
            return BTreeSet::new();
        };
        let referenced: BTreeSet<u64> = remaining
            .values()
            .flatten()
            .map(|r| r.origin.generation)
            .collect();
        let excess = referenced.len().saturating_sub(max);
        let oldest: BTreeSet<u64> = referenced.into_iter().take(excess).collect();
        if oldest.is_empty() {
            return oldest;
        }
        match self.server.fill_from(oldest.clone(), FILL_TIMEOUT) {
            Ok(bytes) => {
                info!(generations = ?oldest, bytes, "compacted the snapshot chain");
                oldest
            }
            Err(e) => {
                warn!(error = %e, "compacting the snapshot chain failed");
                BTreeSet::new()
            }
        }
    }

    /// Copies every page still in the pool into the tree (before a full checkpoint).
    pub fn fill_all(&self, timeout: Duration) -> Result<(), torpor_lazy::LazyError> {
        self.server.fill_all(timeout)
    }

    /// Lets untouched pages be filled in the background from now on.
    pub fn fill_in_background(&self) {
        self.server.set_fill(Fill::Background);
    }

    /// Ends the session once the tree is gone (or fully filled).
    pub fn shutdown(self) -> Result<LazyStats, torpor_lazy::LazyError> {
        self.root.store(0, Ordering::SeqCst);
        self.server.shutdown()
    }
}

/// Restores generation `generation` (the newest when `None`) of `name` lazily from the first
/// replica that holds it under a seal this node verifies. Only trees CRIU restores as this
/// process's own identity qualify (a lazy restore run as another uid would need that uid to
/// open userfaultfds); others get [`RestoreError::LazyUnsupported`] and take the eager path.
pub fn restore_lazy_from_pool(
    criu: &CriuBinary,
    name: &str,
    generation: Option<u64>,
    pools: &Pools,
    opts: &RestoreOptions,
    lazy: &LazyOptions,
) -> Result<LazyWake, RestoreError> {
    let staged = stage_lazy(name, generation, pools, &opts.work_root, 0)?;
    let staged_s = staged.staged_s;
    let mut wake = restore_lazy_staged(criu, staged, pools, opts, lazy)?;
    // Staged on the wake's own path: it is part of the restore.
    wake.report.restore_s += staged_s;
    Ok(wake)
}

/// Node memory a sleeping service may keep for its next wake (see [`StagedWake`]): its
/// images, eagerly restored pages and working set; a larger one is staged by the wake itself.
pub const MAX_STAGED_BYTES: u64 = 64 << 20;

/// A snapshot staged on this node for a lazy restore: every image CRIU reads whole, the
/// pages it restores eagerly (in sparse copies of the pages files), and what each process
/// gets lazily. Staged when the service goes to sleep, it takes the pool's round trips and
/// the plan off the next wake; it holds no connection and no process.
#[derive(Debug)]
pub struct StagedWake {
    name: String,
    manifest: Manifest,
    replica: usize,
    work: tempfile::TempDir,
    ranges: HashMap<i32, Vec<PageRange>>,
    working_set: Option<WorkingSet>,
    inherits: BTreeSet<u64>,
    blocks: BlockCache,
    /// The working set, already read and verified, when it was staged too.
    warm: Option<Warm>,
    /// Bytes fetched from the pool to stage it (and kept on this node).
    pub bytes: u64,
    /// How long staging took.
    pub staged_s: f64,
}

impl StagedWake {
    /// The generation it restores.
    pub fn generation(&self) -> u64 {
        self.manifest.generation
    }

    /// Where its images are.
    pub(crate) fn work_dir(&self) -> &std::path::Path {
        self.work.path()
    }
}

/// Fetches and plans what a lazy restore of generation `generation` of `name` needs before
/// CRIU runs, into a directory under `work_root`. When the snapshot's working set fits in
/// `keep_working_set` bytes beside the rest, it is read and verified now too (as REAP keeps
/// a function's working set on the node), so the push after CRIU's finish marker only copies
/// and the wake reads nothing from the pool before the service runs; 0 keeps none.
pub fn stage_lazy(
    name: &str,
    generation: Option<u64>,
    pools: &Pools,
    work_root: &std::path::Path,
    keep_working_set: u64,
) -> Result<StagedWake, RestoreError> {
    let start = Instant::now();
    let (replica, mut client, manifest) =
        find_verified(pools, 0, name, generation).map_err(|e| RestoreError::from_fetch(name, e))?;
    if manifest.meta.run_as.is_some() {
        return Err(RestoreError::LazyUnsupported {
            name: name.to_string(),
            reason: "the snapshot is restored as another user".into(),
        });
    }
    let verify = pools.key.is_some();
    let fetch = |client: &mut PoolClient, file: &str| {
        fetch_file(client, &manifest, file, verify).map_err(|e| RestoreError::from_fetch(name, e))
    };

    let work = tempfile::Builder::new()
        .prefix("torpor-lazy-")
        .tempdir_in(work_root)
        .map_err(RestoreError::WorkDir)?;
    let dir = work.path();
    let mut fetched = 0u64;
    let mut small: HashMap<String, Vec<u8>> = HashMap::new();
    for f in &manifest.files {
        // Memory comes by range; block digests are fetched as ranges need them.
        if is_memory_image(&f.name) || f.name.ends_with(".blocks") {
            continue;
        }
        let bytes = fetch(&mut client, &f.name)?;
        fetched += bytes.len() as u64;
        if is_torpor_file(&f.name) {
            small.insert(f.name.clone(), bytes);
        } else {
            fs::write(dir.join(&f.name), &bytes).map_err(RestoreError::WorkDir)?;
        }
    }
    let corrupt = |what: String| RestoreError::BadImages {
        name: name.to_string(),
        what,
    };
    let index = match small.get(PAGE_INDEX_FILE) {
        Some(b) => Some(PageIndex::decode(b).map_err(|e| corrupt(format!("page index: {e}")))?),
        None => None,
    };
    let working_set = match small.get(WORKING_SET_FILE) {
        Some(b) => Some(WorkingSet::decode(b).map_err(|e| corrupt(format!("working set: {e}")))?),
        None => None,
    };

    // What each process needs: CRIU's own lazy ranges of this generation, plus what the
    // index inherits; the eager parts of the pages file go into a sparse local copy.
    let read_local =
        |file: String| fs::read(dir.join(&file)).map_err(|e| corrupt(format!("{file}: {e}")));
    let pids = pagemap::parse_pstree_pids(&read_local("pstree.img".into())?)
        .map_err(|e| corrupt(format!("pstree.img: {e}")))?;
    let mut ranges: HashMap<i32, Vec<PageRange>> = HashMap::new();
    let mut eager: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for &pid in &pids {
        let pm_name = format!("pagemap-{pid}.img");
        if !dir.join(&pm_name).exists() {
            continue; // a zombie has no memory
        }
        let pm = Pagemap::parse(&read_local(pm_name.clone())?)
            .map_err(|e| corrupt(format!("{pm_name}: {e}")))?;
        let mm_name = format!("mm-{pid}.img");
        let vmas = pagemap::parse_mm_vmas(&read_local(mm_name.clone())?)
            .map_err(|e| corrupt(format!("{mm_name}: {e}")))?;
        let plan = pagemap::plan_process(pid, manifest.generation, &pm, &vmas)
            .map_err(|e| corrupt(format!("{pm_name}: {e}")))?;
        let mut mine = plan.lazy;
        let inherited = index
            .as_ref()
            .and_then(|i| i.processes.iter().find(|p| p.pid == pid))
            .map(|p| split_at_vmas(&p.ranges, &vmas))
            .unwrap_or_default();
        let overlap = intersects_pagemap(&inherited, &pm);
        mine.extend(inherited);
        mine.sort_by_key(|r| r.start);
        if overlap || mine.windows(2).any(|w| w[0].end() > w[1].start) {
            return Err(corrupt(format!(
                "process {pid}: inherited ranges overlap its own pages"
            )));
        }
        ranges.insert(pid, mine);
        eager.entry(plan.pages_file).or_default().extend(plan.eager);
    }

    let target = pools.replicas[replica].clone();
    let blocks = BlockCache::new(target.clone(), name, pools, verify);
    let mut source = PoolPages::new(target, Some(client), name, blocks.clone());
    for f in &manifest.files {
        if !is_memory_image(&f.name) {
            continue;
        }
        let Some(parts) = eager.get(&f.name) else {
            // Not a process's memory (shared memory's pages): CRIU reads it whole.
            let mut c = source.client_or_connect(name)?;
            let bytes = fetch(&mut c, &f.name)?;
            source.keep_client(c);
            fetched += bytes.len() as u64;
            fs::write(dir.join(&f.name), &bytes).map_err(RestoreError::WorkDir)?;
            continue;
        };
        let out = File::create(dir.join(&f.name)).map_err(RestoreError::WorkDir)?;
        out.set_len(f.size).map_err(RestoreError::WorkDir)?;
        for &(offset, len) in parts {
            let mut at = 0;
            while at < len {
                let n = (len - at).min(EAGER_PIECE);
                let origin = Origin {
                    generation: manifest.generation,
                    file: f.name.clone(),
                    offset: offset + at,
                };
                let bytes = source
                    .read(&origin, n as usize)
                    .map_err(|e| source_failed(name, e.message, e.corrupt))?;
                out.write_all_at(bytes, offset + at)
                    .map_err(RestoreError::WorkDir)?;
                at += n;
            }
            fetched += len;
        }
    }
    let inherits = index
        .as_ref()
        .map(PageIndex::generations)
        .unwrap_or_default();
    let warm = working_set
        .as_ref()
        .filter(|ws| fetched + ws.bytes() <= keep_working_set)
        .map(|ws| warm_pieces(&ranges, ws))
        .filter(|w| !w.is_empty())
        .map(|wanted| {
            let warm = Warm::start(source, wanted);
            fetched += warm.wait_read();
            warm
        });
    Ok(StagedWake {
        name: name.to_string(),
        manifest,
        replica,
        work,
        ranges,
        working_set,
        inherits,
        blocks,
        warm,
        bytes: fetched,
        staged_s: start.elapsed().as_secs_f64(),
    })
}

/// Runs CRIU's lazy restore of a staged snapshot, with torpor's lazy-pages server serving
/// the rest of its memory from the pool.
pub fn restore_lazy_staged(
    criu: &CriuBinary,
    staged: StagedWake,
    pools: &Pools,
    opts: &RestoreOptions,
    lazy: &LazyOptions,
) -> Result<LazyWake, RestoreError> {
    launch(criu, staged, pools, opts, lazy, None)?.complete()
}

/// A lazy restore under way: CRIU runs, the lazy-pages server serves its memory.
#[derive(Debug)]
pub(crate) struct Launched {
    pub(crate) name: String,
    pub(crate) manifest: Manifest,
    replica: usize,
    /// The staged images CRIU reads; removed with the restore.
    pub(crate) work: tempfile::TempDir,
    inherits: BTreeSet<u64>,
    fetched: u64,
    staged_s: f64,
    working_set_bytes: u64,
    pub(crate) server: LazyServer,
    /// Root of the restored tree (0 until CRIU reported it), for `on_failure` to kill.
    pub(crate) root: Arc<AtomicI32>,
    criu_pid: Arc<AtomicI32>,
    pub(crate) child: std::process::Child,
    /// When the restore's time starts (reset when an armed restore is released).
    pub(crate) start: Instant,
    pid_wait_s: f64,
    server_s: f64,
}

/// Starts the lazy-pages server and `criu restore --lazy-pages` of a staged snapshot, with
/// `action_script` given to CRIU (and untouched pages left in the pool until the caller
/// says otherwise) when one holds the restore before its tasks resume.
pub(crate) fn launch(
    criu: &CriuBinary,
    staged: StagedWake,
    pools: &Pools,
    opts: &RestoreOptions,
    lazy: &LazyOptions,
    action_script: Option<&std::path::Path>,
) -> Result<Launched, RestoreError> {
    let start = Instant::now();
    let StagedWake {
        name,
        manifest,
        replica,
        work,
        ranges,
        working_set,
        inherits,
        blocks,
        warm: staged_warm,
        bytes: fetched,
        staged_s,
    } = staged;
    let pid_wait_s = wait_for_pids(&manifest, opts, start)?;
    let dir = work.path();
    let working_set = working_set.filter(|_| lazy.prefetch);
    let target = pools.replicas[replica].clone();
    // The working set is read (and verified) while CRIU restores, so the push after CRIU's
    // finish marker only copies.
    let warm = match (&working_set, staged_warm) {
        (None, _) => None,
        (Some(_), Some(staged)) => Some(staged),
        (Some(ws), None) => Some(warm_pieces(&ranges, ws))
            .filter(|w| !w.is_empty())
            .map(|wanted| {
                Warm::start(
                    PoolPages::new(target.clone(), None, &name, blocks.clone()),
                    wanted,
                )
            }),
    };
    let mut source = PoolPages::new(target, None, &name, blocks);
    let working_set_bytes = working_set.as_ref().map_or(0, WorkingSet::bytes);

    let root = Arc::new(AtomicI32::new(0));
    let criu_pid = Arc::new(AtomicI32::new(0));
    let on_failure = {
        let (root, criu_pid, name) = (root.clone(), criu_pid.clone(), name.clone());
        move |why: &str| {
            warn!(
                name,
                why, "lazy restore lost its page source; killing the tree"
            );
            kill_tree(root.load(Ordering::SeqCst));
            let c = criu_pid.load(Ordering::SeqCst);
            if c > 0 {
                let _ = signal::kill(Pid::from_raw(c), signal::Signal::SIGKILL);
            }
        }
    };
    if let Some(w) = warm {
        source = source.with_warm(w);
    }
    let fill = if lazy.background_fill && action_script.is_none() {
        Fill::Background
    } else {
        Fill::OnDemand
    };
    let server = LazyServer::start(
        LazyConfig {
            work_dir: dir.to_path_buf(),
            ranges,
            prefetch: working_set
                .map(|w| w.processes.into_iter().collect())
                .unwrap_or_default(),
            record_for: lazy.record_for,
            fill,
            max_fault_read: lazy.max_fault_read,
            on_failure: Box::new(on_failure),
        },
        Box::new(source),
    )
    .map_err(|e| RestoreError::Lazy {
        name: name.clone(),
        source: e,
    })?;

    let mut cmd = restore_command(
        criu,
        dir,
        "--lazy-pages",
        &dir.join("root.pid"),
        &dir.join("restore.log"),
        opts,
    );
    if let Some(script) = action_script {
        cmd.arg("--action-script").arg(script);
    }
    let server_s = start.elapsed().as_secs_f64();
    let child = criu.spawn(&mut cmd)?;
    criu_pid.store(child.id() as i32, Ordering::SeqCst);
    debug!(
        name,
        generation = manifest.generation,
        "criu restore --lazy-pages started"
    );
    Ok(Launched {
        name,
        manifest,
        replica,
        work,
        inherits,
        fetched,
        staged_s,
        working_set_bytes,
        server,
        root,
        criu_pid,
        child,
        start,
        pid_wait_s,
        server_s,
    })
}

impl Launched {
    /// The restored root's PID, once CRIU wrote it.
    pub(crate) fn read_pid(&self) -> Option<i32> {
        read_no_follow(&self.work.path().join("root.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    }

    /// Waits for CRIU to end and the server to have its finish marker; on any failure the
    /// tree is killed and the error says why.
    pub(crate) fn complete(mut self) -> Result<LazyWake, RestoreError> {
        let name = self.name.clone();
        let succeeded = self.child.wait().map_err(RestoreError::Stream)?.success();
        self.criu_pid.store(0, Ordering::SeqCst);
        let pid = self.read_pid();
        if let Some(pid) = pid {
            self.root.store(pid, Ordering::SeqCst);
        }
        let criu_s = self.start.elapsed().as_secs_f64();
        let finished = self.server.wait_finished(Duration::from_secs(5));
        let (failure, corrupt) = {
            let stats = self.server.stats();
            (stats.failed, stats.source_corrupt)
        };
        if !succeeded || finished.is_err() || failure.is_some() {
            if let Some(pid) = pid {
                kill_tree(pid);
            }
            self.root.store(0, Ordering::SeqCst);
            if !self.manifest.meta.pid_namespace {
                procs::reap_failed_restore(&self.manifest.meta.pids, Duration::from_secs(2));
            }
            let _ = self.server.shutdown();
            unmount_leftovers(self.work.path());
            if let Some(why) = failure {
                return Err(source_failed(&name, why, corrupt));
            }
            if let (true, Err(e)) = (succeeded, finished) {
                return Err(RestoreError::Lazy { name, source: e });
            }
            let log_path = keep_log(&self.work.path().join("restore.log"), "restore", &name);
            return Err(RestoreError::CriuFailed {
                name,
                log: log_tail(&log_path, 12),
                log_path,
            });
        }
        let pid = pid.ok_or_else(|| RestoreError::NoPid { name: name.clone() })?;
        let restore_s = self.start.elapsed().as_secs_f64();
        info!(
            name,
            generation = self.manifest.generation,
            pid,
            secs = restore_s,
            fetched = self.fetched,
            working_set_bytes = self.working_set_bytes,
            staged_s = self.staged_s,
            server_s = self.server_s,
            criu_s,
            "restored lazily"
        );
        Ok(LazyWake {
            report: RestoreReport {
                name,
                generation: self.manifest.generation,
                pid,
                restore_s,
                pid_wait_s: self.pid_wait_s,
                bytes_fetched: self.fetched,
                run_as: None,
                replica: self.replica,
                filled: false,
            },
            session: LazySession {
                server: self.server,
                root: self.root,
            },
            working_set_bytes: self.working_set_bytes,
            inherits: self.inherits,
        })
    }
}

/// Most older generations an incremental snapshot refers to: each is kept whole in the pool
/// while referred to, so a longer chain would hold ever more memory for ever fewer pages.
pub const MAX_INHERITED_GENERATIONS: usize = 3;

/// Longest a full checkpoint (or an eager restore, [`crate::filled`]) waits for a lazily
/// restored tree's memory to be filled in.
pub(crate) const FILL_TIMEOUT: Duration = Duration::from_secs(120);

/// Checkpoints a lazily restored tree incrementally: CRIU dumps what the processes hold and
/// the snapshot's index refers to older generations for the rest. When that cannot be proven
/// exact (a child forked during the lazy phase still runs), every page is filled in first and
/// the checkpoint is a full one. Returns the report and what the snapshot inherits.
pub fn checkpoint_lazy_service(
    criu: &CriuBinary,
    pid: i32,
    name: &str,
    pools: &Pools,
    opts: &CheckpointOptions,
    session: &LazySession,
) -> Result<(CheckpointReport, Increment), CheckpointError> {
    session.compact(MAX_INHERITED_GENERATIONS);
    // From here on nothing is copied in that the dump might not see unnoticed.
    let fill = session
        .server
        .hold()
        .map_err(|e| CheckpointError::Declined {
            pid,
            reason: format!("the lazy-pages server: {e}"),
        })?;
    let mut increment = None;
    let first = checkpoint_to_pool_with(criu, pid, name, pools, opts, &mut |layout| {
        let i = session.increment(layout)?;
        let files = i.files();
        increment = Some(i);
        Ok(files)
    });
    let result = match first {
        Ok(report) => Ok((report, increment.unwrap_or_default())),
        Err(CheckpointError::Declined { reason, .. }) => {
            info!(name, %reason, "incremental checkpoint not provable; filling memory first");
            full_checkpoint(criu, pid, name, pools, opts, session)
        }
        Err(e) => Err(e),
    };
    if result.is_err() {
        // The tree runs on: so does its lazy service, as before.
        let _ = session.server.release_hold(fill);
    }
    result
}

/// Copies every page still in the pool into the tree, then checkpoints it in full.
fn full_checkpoint(
    criu: &CriuBinary,
    pid: i32,
    name: &str,
    pools: &Pools,
    opts: &CheckpointOptions,
    session: &LazySession,
) -> Result<(CheckpointReport, Increment), CheckpointError> {
    session
        .fill_all(FILL_TIMEOUT)
        .map_err(|e| CheckpointError::Declined {
            pid,
            reason: format!("filling memory before a full checkpoint failed: {e}"),
        })?;
    let full = Increment {
        index: None,
        working_set: session.working_set(),
    };
    let files = full.files();
    let report = checkpoint_to_pool_with(criu, pid, name, pools, opts, &mut |_| Ok(files.clone()))?;
    Ok((report, full))
}

/// Whether `[start, end)` is covered without a gap by `items` (sorted, disjoint intervals
/// given by `span`), each of the covering ones passing `ok`.
fn covered<T>(
    items: &[T],
    span: impl Fn(&T) -> (u64, u64),
    ok: impl Fn(&T) -> bool,
    start: u64,
    end: u64,
) -> bool {
    let mut at = start;
    let first = items.partition_point(|i| span(i).1 <= start);
    for item in &items[first..] {
        let (s, e) = span(item);
        if s > at || at >= end {
            break;
        }
        if !ok(item) {
            return false;
        }
        at = e;
    }
    at >= end
}

/// Whether the dump's pagemap holds every page of `[start, end)` itself.
fn dumped_present(pm: &Pagemap, start: u64, end: u64) -> bool {
    covered(
        &pm.entries,
        |e| (e.vaddr, e.end()),
        |e| e.is_present(),
        start,
        end,
    )
}

/// Whether `[start, end)` lies wholly in VMAs CRIU's restore registers for lazy pages
/// (`vma_entry_can_be_lazy`: private anonymous memory, not locked, not hugetlb).
fn in_lazy_vmas(vmas: &[Vma], start: u64, end: u64) -> bool {
    use nix::libc::{MAP_ANONYMOUS, MAP_HUGETLB, MAP_LOCKED, MAP_PRIVATE};
    let lazy = |v: &Vma| {
        let f = v.flags as i32;
        f & (MAP_PRIVATE | MAP_ANONYMOUS) == MAP_PRIVATE | MAP_ANONYMOUS
            && f & (MAP_LOCKED | MAP_HUGETLB) == 0
    };
    covered(vmas, |v| (v.start, v.end), lazy, start, end)
}

/// Largest piece of a pages file's eager part read at once (bounds the buffer).
const EAGER_PIECE: u64 = 4 << 20;

/// torpor's own files in a snapshot (not CRIU's): read here, never given to CRIU.
fn is_torpor_file(name: &str) -> bool {
    name == PAGE_INDEX_FILE || name == WORKING_SET_FILE
}

/// Fetches one whole file of a verified manifest, checked against its seal when `verify`.
pub(crate) fn fetch_file(
    client: &mut PoolClient,
    manifest: &Manifest,
    file: &str,
    verify: bool,
) -> Result<Vec<u8>, FetchError> {
    let mut buf = Vec::new();
    fetch_file_into(client, manifest, file, verify, &mut buf)?;
    Ok(buf)
}

/// Cuts inherited ranges at the VMA boundaries of the process as dumped (a copy cannot span
/// two VMAs) and drops what lies outside every VMA (unmapped since).
fn split_at_vmas(ranges: &[PageRange], vmas: &[Vma]) -> Vec<PageRange> {
    let mut out = Vec::new();
    for r in ranges {
        for v in vmas {
            let (s, e) = (r.start.max(v.start), r.end().min(v.end));
            if s < e {
                out.push(PageRange {
                    start: s,
                    len: e - s,
                    origin: r.origin.advanced(s - r.start),
                });
            }
        }
    }
    out
}

/// Whether any range meets a page the generation's own pagemap has (an index must only
/// name pages the dump did not write).
fn intersects_pagemap(ranges: &[PageRange], pm: &Pagemap) -> bool {
    let mut entries: Vec<(u64, u64)> = pm
        .entries
        .iter()
        .map(|e| (e.vaddr, e.vaddr + e.nr_pages * PAGE_SIZE))
        .collect();
    entries.sort_unstable();
    ranges.iter().any(|r| {
        let i = entries.partition_point(|e| e.1 <= r.start);
        entries.get(i).is_some_and(|e| e.0 < r.end())
    })
}

/// SIGKILLs every process of the tree at `root` (0: nothing yet).
/// Detaches whatever is still mounted under `dir`: a CRIU killed mid-restore leaves the
/// cgroup yard it mounted in its images directory (`.criu.cgyard.*`), which would outlive
/// the directory otherwise.
pub(crate) fn unmount_leftovers(dir: &std::path::Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| std::path::Path::new(p).starts_with(dir))
        .collect();
    // innermost first
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Err(e) = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
            warn!(mount = p, error = %e, "cannot unmount what a killed CRIU left mounted");
        }
    }
}

pub(crate) fn kill_tree(root: i32) {
    if root <= 0 {
        return;
    }
    for p in procs::tree_pids(root) {
        let _ = signal::kill(Pid::from_raw(p), signal::Signal::SIGKILL);
    }
}

/// The pool origins of a working set: the parts of each process's recorded ranges that are
/// lazy (in the order recorded, up to [`WARM_MAX`] bytes in all).
fn warm_pieces(ranges: &HashMap<i32, Vec<PageRange>>, ws: &WorkingSet) -> Vec<(Origin, u64)> {
    let mut out = Vec::new();
    let mut total = 0u64;
    for (pid, recorded) in &ws.processes {
        let Some(lazy) = ranges.get(pid) else {
            continue;
        };
        for &(start, len) in recorded {
            let end = start + len;
            let first = lazy.partition_point(|r| r.end() <= start);
            for r in &lazy[first..] {
                if r.start >= end || total >= WARM_MAX {
                    break;
                }
                let (s, e) = (start.max(r.start), end.min(r.end()));
                let n = (e - s).min(WARM_MAX - total);
                out.push((r.origin.advanced(s - r.start), n));
                total += n;
            }
        }
    }
    out
}

/// The pages could not be read from the pool: a snapshot failing its checks there is
/// corrupt (refused for good), anything else a pool that failed this time.
fn source_failed(name: &str, why: String, corrupt: bool) -> RestoreError {
    let (name, source) = (name.to_string(), ClientError::Unexpected(why));
    if corrupt {
        RestoreError::Corrupt { name, source }
    } else {
        RestoreError::Pool { name, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagemap::{PagemapEntry, PE_LAZY, PE_PRESENT};

    const P: u64 = PAGE_SIZE;

    fn vma(start: u64, end: u64, flags: i32) -> Vma {
        Vma {
            start,
            end,
            flags: flags as u32,
            status: 0,
        }
    }

    #[test]
    fn inherited_ranges_must_lie_in_memory_crius_restore_serves_lazily() {
        use nix::libc::{MAP_ANONYMOUS, MAP_HUGETLB, MAP_LOCKED, MAP_PRIVATE, MAP_SHARED};
        let anon = MAP_PRIVATE | MAP_ANONYMOUS;
        let vmas = [
            vma(0x1000, 0x5000, anon),
            vma(0x5000, 0x9000, anon),
            vma(0x9000, 0xa000, anon | MAP_LOCKED),
            vma(0xb000, 0xc000, anon),
            vma(0xc000, 0xd000, anon | MAP_HUGETLB),
            vma(0xd000, 0xe000, MAP_SHARED | MAP_ANONYMOUS),
        ];
        assert!(in_lazy_vmas(&vmas, 0x2000, 0x4000));
        assert!(in_lazy_vmas(&vmas, 0x2000, 0x8000), "across adjacent VMAs");
        assert!(
            !in_lazy_vmas(&vmas, 0x8000, 0x9000 + P),
            "into a locked one"
        );
        assert!(!in_lazy_vmas(&vmas, 0xa000, 0xb000), "a hole");
        assert!(!in_lazy_vmas(&vmas, 0xb000, 0xc000 + P), "into hugetlb");
        assert!(!in_lazy_vmas(&vmas, 0xd000, 0xe000), "shared");
        assert!(!in_lazy_vmas(&vmas, 0xe000, 0xf000), "past every VMA");
    }

    #[test]
    fn a_page_copied_during_the_dump_must_be_one_the_dump_holds() {
        let entry = |vaddr, nr_pages, flags| PagemapEntry {
            vaddr,
            nr_pages,
            flags,
        };
        let pm = Pagemap {
            pages_id: 1,
            entries: vec![
                entry(0x10000, 4, PE_LAZY | PE_PRESENT),
                entry(0x14000, 2, PE_PRESENT),
                entry(0x20000, 1, PE_LAZY | PE_PRESENT),
            ],
        };
        assert!(
            dumped_present(&pm, 0x11000, 0x16000),
            "across adjacent entries"
        );
        assert!(dumped_present(&pm, 0x20000, 0x21000));
        assert!(!dumped_present(&pm, 0x15000, 0x17000), "runs past an entry");
        assert!(!dumped_present(&pm, 0x18000, 0x19000), "not dumped at all");
        assert!(!dumped_present(&pm, 0x1f000, 0x21000), "starts before one");
    }
}
