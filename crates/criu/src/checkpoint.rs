//! Checkpoint a process tree into the pool.
//!
//! CRIU runs with `--stream`; every image it writes arrives here through a pipe and is
//! forwarded to the pool as it comes, through a small fixed set of buffers, so the node never
//! holds more than a few MiB of the snapshot whatever the footprint. The snapshot must be
//! committed in the pool before the tree is killed: a post-dump action script asks this
//! process for a verdict, and when the pool did not commit, the script fails and CRIU
//! resumes the tree (CRIU treats a failing post-dump script as a failed dump).
//!
//! CRIU runs as the identity the tree needs ([`run_as_for_tree`]): as root, or as the tree's
//! own non-root uid where root lacks CAP_SYS_RESOURCE. The snapshot records that identity and
//! whether the tree lives in its own PID namespace, for the restore.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::{
        fd::{AsFd, OwnedFd},
        unix::{fs::PermissionsExt, net::UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Condvar, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nix::{sys::stat::Mode, unistd::mkfifo};
use thiserror::Error;
use torpor_image::{
    manifest::{RunAs, SnapshotMeta},
    pages::{blocks_file_for, BlockHasher},
    CHUNK_SIZE,
};
use torpor_pool::ClientError;
use tracing::{debug, info, warn};

use crate::{
    binary::{log_tail, CriuBinary, CriuError},
    identity::{self, CriuIdentity, Decision},
    procs,
    replicas::{Committed, Pools, ReplicatedUpload},
    run::{keep_failed_log, StreamedRun},
    stats::{parse_dump_stats, DumpStats},
    streamer::{self, CAPTURE_SOCKET},
};

/// Buffers in flight between CRIU's pipes and the pool connection; with 1 MiB each this is
/// the bound on what the node stages locally.
const STAGING_BUFFERS: usize = 8;

/// What a checkpoint does with established TCP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpConnections {
    /// Dump them and restore them intact (`--tcp-established`): the peer keeps its
    /// connection; CRIU holds them behind iptables rules until the restore.
    Keep,
    /// Restore them closed (`--tcp-close`): for services behind the gate, which closes its
    /// own connections before a checkpoint, so only strays are affected.
    Close,
}

impl TcpConnections {
    pub fn criu_flag(self) -> &'static str {
        match self {
            TcpConnections::Keep => "--tcp-established",
            TcpConnections::Close => "--tcp-close",
        }
    }
}

/// How a checkpoint is taken.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    /// Keep the tree running after the dump (a copy, not a move).
    pub leave_running: bool,
    /// What to do with established TCP connections.
    pub tcp: TcpConnections,
    /// The tree belongs to a terminal session (CRIU's `--shell-job`).
    pub shell_job: bool,
    /// Where CRIU's work directory (log, sockets) is created.
    pub work_root: PathBuf,
    /// Longest wait of CRIU's post-dump hook for our verdict before it resumes the tree.
    pub hook_timeout: Duration,
    /// Identity CRIU runs as; by default the one the tree needs on this host
    /// ([`run_as_for_tree`]), since root without CAP_SYS_RESOURCE cannot dump a tree of
    /// another uid.
    pub run_as: CriuIdentity,
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        CheckpointOptions {
            leave_running: false,
            tcp: TcpConnections::Keep,
            shell_job: false,
            work_root: std::env::temp_dir(),
            hook_timeout: Duration::from_secs(120),
            run_as: CriuIdentity::Auto,
        }
    }
}

/// What a checkpoint did and cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointReport {
    pub name: String,
    pub generation: u64,
    pub root_pid: i32,
    pub pids: Vec<i32>,
    /// Resident memory of the tree before the dump.
    pub footprint_bytes: u64,
    /// Bytes stored in the pool.
    pub pool_bytes: u64,
    pub files: usize,
    /// From starting CRIU to CRIU's exit.
    pub checkpoint_s: f64,
    /// How long the tree was frozen, as CRIU measured it.
    pub frozen_s: Option<f64>,
    /// Most image bytes held by this process at once.
    pub peak_staging_bytes: u64,
    pub criu_version: String,
    pub left_running: bool,
    /// Identity CRIU ran as (`None`: as this process); the restore uses the same.
    pub run_as: Option<RunAs>,
    /// The root was the init of its own PID namespace.
    pub pid_namespace: bool,
    /// Pool replicas that committed the snapshot.
    pub replicas: usize,
}

/// Why a checkpoint failed. In every case but `AfterCommit` the tree is running as before.
#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("process {0} does not exist")]
    NoSuchProcess(i32),
    #[error("process tree {pid} runs as several identities (uids {uids:?}, gids {gids:?}); CRIU can dump that only with CAP_SYS_RESOURCE, which root lacks on this host, so the tree cannot be checkpointed here and keeps running")]
    MixedUids {
        pid: i32,
        uids: Vec<u32>,
        gids: Vec<u32>,
    },
    #[error("process tree {pid} runs as uid {uid} in its own PID namespace with the host's /proc; only CRIU running as uid {uid} may dump it on this host (root lacks CAP_SYS_RESOURCE), and unprivileged CRIU cannot dump a task whose /proc belongs to another PID namespace, so the tree cannot be checkpointed here and keeps running")]
    UnprivilegedPidNamespace { pid: i32, uid: u32 },
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("preparing CRIU's work directory failed")]
    WorkDir(#[source] io::Error),
    #[error("cannot start the upload to the pool")]
    Pool(#[source] ClientError),
    #[error("the pool did not take the snapshot; process {pid} was resumed and keeps running")]
    PoolRefused {
        pid: i32,
        #[source]
        source: ClientError,
    },
    #[error("CRIU could not dump process {pid}; it was resumed and keeps running. CRIU's log ({log_path}) says:\n{log}")]
    CriuFailed {
        pid: i32,
        log: String,
        log_path: PathBuf,
    },
    #[error("talking to CRIU failed; process {pid} was resumed")]
    Stream {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("the checkpoint of process {pid} was withdrawn before its commit ({reason}); the tree was resumed and keeps running")]
    Declined { pid: i32, reason: String },
    #[error("CRIU failed after generation {generation} was committed; check process {pid}. CRIU's log says:\n{log}")]
    AfterCommit {
        pid: i32,
        generation: u64,
        log: String,
    },
}

/// A fixed set of reusable buffers; taking one blocks while all are in flight, which is what
/// bounds local staging.
#[derive(Debug)]
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    available: Condvar,
    /// Bytes currently filled and not yet sent.
    staged: AtomicU64,
    peak: AtomicU64,
}

impl BufferPool {
    fn new() -> BufferPool {
        BufferPool {
            free: Mutex::new(
                (0..STAGING_BUFFERS)
                    .map(|_| Vec::with_capacity(CHUNK_SIZE as usize))
                    .collect(),
            ),
            available: Condvar::new(),
            staged: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    fn take(&self) -> Vec<u8> {
        let mut free = self.free.lock().expect("buffer lock");
        loop {
            if let Some(b) = free.pop() {
                return b;
            }
            free = self.available.wait(free).expect("buffer lock");
        }
    }

    fn filled(&self, n: usize) {
        let now = self.staged.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn give(&self, mut b: Vec<u8>) {
        self.staged.fetch_sub(b.len() as u64, Ordering::SeqCst);
        b.clear();
        self.free.lock().expect("buffer lock").push(b);
        self.available.notify_one();
    }
}

enum Msg {
    Open {
        id: u32,
        name: String,
    },
    Data {
        id: u32,
        buf: Vec<u8>,
    },
    Close {
        id: u32,
        size: u64,
    },
    /// A file of torpor's own, whole (not from CRIU's pipes, not from the buffer pool).
    Whole {
        name: String,
        bytes: Vec<u8>,
    },
    /// Asks for the memory-layout images seen so far ([`DumpedLayout`]).
    Layout(mpsc::Sender<DumpedLayout>),
    Commit(mpsc::Sender<Result<Committed, ClientError>>),
}

/// State shared between the streamer thread and the coordinator.
#[derive(Default)]
struct Capture {
    /// Set by the coordinator once CRIU reached post-dump.
    hook_reached: bool,
    readers: Vec<JoinHandle<()>>,
    /// Files CRIU opened after the snapshot was sealed (its stats), kept local.
    late_files: Vec<(String, Vec<u8>)>,
    files: usize,
}

/// The identity CRIU must run as to dump the tree rooted at `root` on this host: `None` for
/// this process's own (root), `Some` for the tree's one other identity. A tree no CRIU can
/// dump here is refused without running CRIU: one that mixes identities
/// ([`CheckpointError::MixedUids`]) or one that only unprivileged CRIU may dump but whose PID
/// namespace defeats it ([`CheckpointError::UnprivilegedPidNamespace`]); with
/// CAP_SYS_RESOURCE both are dumped as root (`None`).
pub fn run_as_for_tree(root: i32) -> Result<Option<RunAs>, CheckpointError> {
    let tasks = procs::tree_uids(root);
    if tasks.is_empty() {
        return Err(CheckpointError::NoSuchProcess(root));
    }
    // The kernel's prlimit check compares the caller's real uid and gid with the target's.
    let me = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let sys_resource = procs::has_cap_sys_resource();
    match identity::decide(&tasks, me, sys_resource) {
        Decision::Current => Ok(None),
        Decision::As(who) if tasks.iter().any(|t| procs::lacks_own_proc(t.pid)) => {
            if sys_resource {
                Ok(None)
            } else {
                Err(CheckpointError::UnprivilegedPidNamespace {
                    pid: root,
                    uid: who.uid,
                })
            }
        }
        Decision::As(who) => Ok(Some(who)),
        Decision::Mixed { uids, gids } => Err(CheckpointError::MixedUids {
            pid: root,
            uids,
            gids,
        }),
    }
}

/// Checkpoints the tree rooted at `pid` into the pools under `name`, sealed with the node's
/// key; it counts (and the tree is killed) only once the pools' write quorum committed.
pub fn checkpoint_to_pool(
    criu: &CriuBinary,
    pid: i32,
    name: &str,
    pools: &Pools,
    opts: &CheckpointOptions,
) -> Result<CheckpointReport, CheckpointError> {
    checkpoint_to_pool_with(criu, pid, name, pools, opts, &mut |_| Ok(Vec::new()))
}

/// [`checkpoint_to_pool`], with files of the caller's added to the snapshot: `at_post_dump`
/// runs once CRIU has dumped the tree and before the commit, while the tree is frozen, with the
/// dump's memory-layout images (an incremental checkpoint asks its lazy-pages server then
/// which ranges were never touched, and checks them against what the dump holds).
/// If it declines, nothing is committed and the tree runs on ([`CheckpointError::Declined`]).
pub fn checkpoint_to_pool_with(
    criu: &CriuBinary,
    pid: i32,
    name: &str,
    pools: &Pools,
    opts: &CheckpointOptions,
    at_post_dump: &mut PostDump<'_>,
) -> Result<CheckpointReport, CheckpointError> {
    if !procs::pid_in_use(pid) {
        return Err(CheckpointError::NoSuchProcess(pid));
    }
    // Decided before anything starts: a tree no CRIU can dump here is refused untouched.
    let run_as = opts.run_as.resolve(|| run_as_for_tree(pid))?;
    let pid_namespace = procs::is_pid_namespace_init(pid);
    let criu_version = criu.version()?;
    let pids = procs::tree_pids(pid);
    let footprint_bytes = procs::tree_rss_bytes(&pids);
    let upload = ReplicatedUpload::begin(
        pools,
        name,
        SnapshotMeta {
            root_pid: pid,
            pids: pids.clone(),
            criu_version: criu_version.clone(),
            footprint_bytes,
            run_as,
            pid_namespace,
        },
    )
    .map_err(CheckpointError::Pool)?;

    let mut run = StreamedRun::create(&opts.work_root, "torpor-dump-", CAPTURE_SOCKET, run_as)
        .map_err(CheckpointError::WorkDir)?;
    let hook =
        Hook::create(run.work.path(), opts.hook_timeout).map_err(CheckpointError::WorkDir)?;
    let fifos: Vec<&Path> = hook.fifos.iter().map(PathBuf::as_path).collect();
    run.open_to_criu(&fifos, &[&hook.script])
        .map_err(CheckpointError::WorkDir)?;
    let log_path = run.out("dump.log");

    let start = Instant::now();
    let mut cmd = criu.command();
    cmd.arg("dump")
        .arg("--tree")
        .arg(pid.to_string())
        .arg("--images-dir")
        .arg(run.work.path())
        .arg("--stream")
        .arg("--log-file")
        .arg(&log_path)
        .arg("-v4")
        .arg("--action-script")
        .arg(&hook.script);
    cmd.arg(opts.tcp.criu_flag());
    if opts.shell_job {
        cmd.arg("--shell-job");
    }
    if opts.leave_running {
        cmd.arg("--leave-running");
    }
    // Held until CRIU ends: see `dump_lock`.
    let dump_lock = crate::dump_lock::DumpLock::acquire(&pids);
    let mut criu_run = run.spawn(criu, &mut cmd)?;
    debug!(pid, name, ?run_as, pid_namespace, "criu dump started");

    let buffers = Arc::new(BufferPool::new());
    let failed = Arc::new(AtomicBool::new(false));
    let capture = Arc::new(Mutex::new(Capture::default()));
    let (tx, rx) = mpsc::sync_channel::<Msg>(2 * STAGING_BUFFERS);
    // The streamer thread says when every image CRIU sent before post-dump is in hand.
    let (sealed_tx, sealed_rx) = mpsc::channel::<()>();
    let writer = spawn_writer(
        upload,
        rx,
        buffers.clone(),
        failed.clone(),
        pools.key.is_some(),
    );
    {
        let (buffers, failed, capture, tx) =
            (buffers.clone(), failed.clone(), capture.clone(), tx.clone());
        criu_run
            .serve(move |sock| capture_images(sock, &tx, &buffers, &failed, &capture, &sealed_tx));
    }
    let child = &mut criu_run.child;

    // Wait for CRIU to reach post-dump (or to give up).
    let outcome = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| CheckpointError::Stream { pid, source: e })?
        {
            break Err(status);
        }
        match hook.wait_reached(streamer::POLL) {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(e) => {
                let _ = child.kill();
                return Err(CheckpointError::Stream { pid, source: e });
            }
        }
    };

    let mut declined = None;
    let commit = match outcome {
        Ok(()) => {
            capture.lock().expect("capture lock").hook_reached = true;
            // Requests CRIU sent before running the hook may still sit in the socket; the
            // streamer thread drains them first (a closed channel means it ended).
            let _ = sealed_rx.recv();
            let readers = std::mem::take(&mut capture.lock().expect("capture lock").readers);
            for r in readers {
                let _ = r.join();
            }
            let result = if failed.load(Ordering::SeqCst) {
                None
            } else {
                let (layout_tx, layout_rx) = mpsc::channel();
                let _ = tx.send(Msg::Layout(layout_tx));
                let layout = layout_rx.recv().unwrap_or_default();
                match at_post_dump(&layout) {
                    Ok(extra) => {
                        for (name, bytes) in extra {
                            let _ = tx.send(Msg::Whole { name, bytes });
                        }
                        let (reply_tx, reply_rx) = mpsc::channel();
                        let _ = tx.send(Msg::Commit(reply_tx));
                        reply_rx.recv().ok()
                    }
                    Err(reason) => {
                        declined = Some(reason);
                        None
                    }
                }
            };
            let committed = matches!(result, Some(Ok(_)));
            hook.verdict(committed)
                .map_err(|e| CheckpointError::Stream { pid, source: e })?;
            result
        }
        Err(_) => None,
    };
    let status = child
        .wait()
        .map_err(|e| CheckpointError::Stream { pid, source: e })?;
    drop(dump_lock);
    criu_run.criu_ended();
    let elapsed = start.elapsed();
    drop(tx);
    let writer_error = writer.join().expect("writer thread panicked");
    let stream_result = criu_run.join();

    match commit {
        Some(Ok(info)) if status.success() => {
            let c = capture.lock().expect("capture lock");
            let stats = c
                .late_files
                .iter()
                .find(|(n, _)| n == "stats-dump")
                .map(|(_, b)| b.clone())
                .or_else(|| fs::read(criu_run.work.path().join("stats-dump")).ok())
                .and_then(|b| parse_dump_stats(&b));
            let report = CheckpointReport {
                name: name.to_string(),
                generation: info.generation,
                root_pid: pid,
                pids,
                footprint_bytes,
                pool_bytes: info.bytes,
                files: c.files,
                checkpoint_s: elapsed.as_secs_f64(),
                frozen_s: stats.map(|s: DumpStats| s.frozen.as_secs_f64()),
                peak_staging_bytes: buffers.peak.load(Ordering::SeqCst),
                criu_version,
                left_running: opts.leave_running,
                run_as,
                pid_namespace,
                replicas: info.replicas,
            };
            info!(
                name,
                generation = info.generation,
                bytes = info.bytes,
                secs = report.checkpoint_s,
                "checkpoint committed"
            );
            Ok(report)
        }
        Some(Ok(info)) => Err(CheckpointError::AfterCommit {
            pid,
            generation: info.generation,
            log: log_tail(&log_path, 12),
        }),
        Some(Err(e)) => Err(CheckpointError::PoolRefused { pid, source: e }),
        None => {
            if let Some(reason) = declined {
                return Err(CheckpointError::Declined { pid, reason });
            }
            if let Some(e) = writer_error {
                return Err(CheckpointError::PoolRefused { pid, source: e });
            }
            if let Err(e) = stream_result {
                warn!(error = %e, "image streamer failed");
            }
            let (log, log_path) = keep_failed_log(&log_path, "dump", name);
            Err(CheckpointError::CriuFailed { pid, log, log_path })
        }
    }
}

/// Sends everything the readers produce to the pool; on the first error, stops the readers
/// (so CRIU sees a broken pipe and gives up) and keeps draining.
fn spawn_writer(
    upload: ReplicatedUpload,
    rx: mpsc::Receiver<Msg>,
    buffers: Arc<BufferPool>,
    failed: Arc<AtomicBool>,
    block_digests: bool,
) -> JoinHandle<Option<ClientError>> {
    thread::spawn(move || {
        let mut upload = Some(upload);
        let mut error: Option<ClientError> = None;
        // Pages files being digested block by block (sealed pools only: a lazy restore checks
        // each range it reads against them), by file id.
        let mut hashing: HashMap<u32, (String, BlockHasher)> = HashMap::new();
        // The layout images, by file id while they stream, by name once closed.
        let mut layout_open: HashMap<u32, (String, Vec<u8>)> = HashMap::new();
        let mut layout = DumpedLayout::new();
        let mut next_own_id = OWN_FILE_IDS;
        for msg in rx {
            let result = match (msg, upload.as_mut()) {
                (Msg::Open { id, name }, Some(u)) if error.is_none() => {
                    if block_digests && is_memory_image(&name) {
                        hashing.insert(id, (name.clone(), BlockHasher::new()));
                    }
                    if is_layout_image(&name) {
                        layout_open.insert(id, (name.clone(), Vec::new()));
                    }
                    u.file_open(id, &name)
                }
                (Msg::Data { id, buf }, u) => {
                    if let Some((_, h)) = hashing.get_mut(&id) {
                        h.update(&buf);
                    }
                    if let Some((_, bytes)) = layout_open.get_mut(&id) {
                        bytes.extend_from_slice(&buf);
                    }
                    let r = match u {
                        Some(u) if error.is_none() => u.file_data(id, &buf),
                        _ => Ok(()),
                    };
                    buffers.give(buf);
                    r
                }
                (Msg::Layout(reply), _) => {
                    let _ = reply.send(std::mem::take(&mut layout));
                    Ok(())
                }
                (Msg::Close { id, size }, Some(u)) if error.is_none() => {
                    if let Some((name, bytes)) = layout_open.remove(&id) {
                        layout.insert(name, bytes);
                    }
                    u.file_close(id, size)
                        .and_then(|()| match hashing.remove(&id) {
                            Some((name, h)) => {
                                next_own_id += 1;
                                upload_whole(
                                    u,
                                    next_own_id,
                                    &blocks_file_for(&name),
                                    &h.finish().encode(),
                                )
                            }
                            None => Ok(()),
                        })
                }
                (Msg::Whole { name, bytes }, Some(u)) if error.is_none() => {
                    next_own_id += 1;
                    upload_whole(u, next_own_id, &name, &bytes)
                }
                (Msg::Commit(reply), _) => {
                    let _ = reply.send(match (error.take(), upload.take()) {
                        (Some(e), _) => Err(e),
                        (None, Some(u)) => u.commit(),
                        (None, None) => Err(ClientError::Unexpected("committed twice".into())),
                    });
                    return None;
                }
                _ => Ok(()),
            };
            if let Err(e) = result {
                warn!(error = %e, "pool upload failed; stopping the dump");
                failed.store(true, Ordering::SeqCst);
                error = Some(e);
            }
        }
        error
    })
}

/// The images of a dump that describe its processes' memory (`pagemap-*.img`, `mm-*.img`,
/// `pstree.img`), kept whole as they pass (they are small): what the dump holds, for a caller
/// that adds files at post-dump.
pub type DumpedLayout = HashMap<String, Vec<u8>>;

/// Files a caller adds at post-dump (name, bytes), or why it withdraws the checkpoint.
pub type PostDump<'a> = dyn FnMut(&DumpedLayout) -> Result<Vec<(String, Vec<u8>)>, String> + 'a;

/// Whether an image is part of [`DumpedLayout`].
fn is_layout_image(name: &str) -> bool {
    name == "pstree.img"
        || (name.ends_with(".img")
            && ((name.starts_with("pagemap-") && !name.starts_with("pagemap-shmem-"))
                || name.starts_with("mm-")))
}

/// File ids of torpor's own files in an upload (CRIU's count up from 0).
const OWN_FILE_IDS: u32 = 1 << 30;

/// A CRIU memory image (`pages-N.img`): digested block by block at a checkpoint, fetched by
/// range at a lazy restore.
pub(crate) fn is_memory_image(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// Uploads one whole file under `id`.
fn upload_whole(
    u: &mut ReplicatedUpload,
    id: u32,
    name: &str,
    bytes: &[u8],
) -> Result<(), ClientError> {
    u.file_open(id, name)?;
    for piece in bytes.chunks(CHUNK_SIZE as usize) {
        u.file_data(id, piece)?;
    }
    u.file_close(id, bytes.len() as u64)
}

/// Serves CRIU's capture connection: one reader thread per image pipe. Once the coordinator
/// flags post-dump and no request is pending on the socket, the snapshot is sealed (told
/// through `sealed`): CRIU wrote every request before running the hook, so none is lost;
/// what comes later (CRIU's stats) is kept local.
fn capture_images(
    sock: &mut UnixStream,
    tx: &mpsc::SyncSender<Msg>,
    buffers: &Arc<BufferPool>,
    failed: &Arc<AtomicBool>,
    capture: &Arc<Mutex<Capture>>,
    sealed: &mpsc::Sender<()>,
) -> io::Result<()> {
    let mut next_id = 0u32;
    let mut is_sealed = false;
    loop {
        if !streamer::readable_within(sock.as_fd(), streamer::POLL)? {
            if !is_sealed && capture.lock().expect("capture lock").hook_reached {
                is_sealed = true;
                let _ = sealed.send(());
            }
            continue;
        }
        let Some(name) = streamer::read_request(sock)? else {
            break;
        };
        let pipe = streamer::recv_pipe(sock)?;
        let mut c = capture.lock().expect("capture lock");
        if is_sealed {
            let mut bytes = Vec::new();
            File::from(pipe).take(CHUNK_SIZE).read_to_end(&mut bytes)?;
            if name != "stats-dump" {
                warn!(file = %name, "CRIU wrote an image after post-dump; not in the snapshot");
            }
            c.late_files.push((name, bytes));
            continue;
        }
        let id = next_id;
        next_id += 1;
        c.files += 1;
        if tx.send(Msg::Open { id, name }).is_err() {
            break;
        }
        let (tx, buffers, failed) = (tx.clone(), buffers.clone(), failed.clone());
        c.readers.push(thread::spawn(move || {
            read_pipe(id, pipe, &tx, &buffers, &failed)
        }));
    }
    Ok(())
}

/// Reads one image from its pipe in chunk-sized buffers until EOF.
fn read_pipe(
    id: u32,
    pipe: OwnedFd,
    tx: &mpsc::SyncSender<Msg>,
    buffers: &BufferPool,
    failed: &AtomicBool,
) {
    let mut f = File::from(pipe);
    let mut size = 0u64;
    loop {
        if failed.load(Ordering::SeqCst) {
            return; // dropping the pipe makes CRIU's next write fail
        }
        let mut buf = buffers.take();
        let mut eof = false;
        while buf.len() < CHUNK_SIZE as usize {
            let filled = buf.len();
            buf.resize(CHUNK_SIZE as usize, 0);
            match f.read(&mut buf[filled..]) {
                Ok(0) => {
                    buf.truncate(filled);
                    eof = true;
                    break;
                }
                Ok(n) => buf.truncate(filled + n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(filled),
                Err(_) => {
                    buf.truncate(filled);
                    failed.store(true, Ordering::SeqCst);
                    eof = true;
                    break;
                }
            }
        }
        if buf.is_empty() {
            buffers.give(buf);
        } else {
            size += buf.len() as u64;
            buffers.filled(buf.len());
            if tx.send(Msg::Data { id, buf }).is_err() {
                return;
            }
        }
        if eof {
            let _ = tx.send(Msg::Close { id, size });
            return;
        }
    }
}

/// The post-dump veto: a script CRIU runs at each action; at `post-dump` it announces itself
/// through one FIFO and waits for `commit` or `abort` on another. Both FIFOs are held open
/// read-write here so neither side blocks on open; if this process dies, the script's
/// timeout fails it and CRIU resumes the tree.
struct Hook {
    script: PathBuf,
    /// The two FIFOs' paths, for giving them to the identity CRIU runs as.
    fifos: [PathBuf; 2],
    reached: File,
    verdict: File,
}

impl Hook {
    fn create(dir: &Path, timeout: Duration) -> io::Result<Hook> {
        let dir_str = dir.to_str().filter(|s| !s.contains('\'')).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "work directory path unusable in a script",
            )
        })?;
        let fifos = ["hook-reached", "hook-verdict"].map(|f| dir.join(f));
        for f in &fifos {
            mkfifo(f, Mode::S_IRUSR | Mode::S_IWUSR).map_err(io::Error::from)?;
        }
        let open = |f: &str| OpenOptions::new().read(true).write(true).open(dir.join(f));
        let script = dir.join("post-dump-hook.sh");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\n\
                 # torpor: the tree may be killed only once the pool has committed its snapshot.\n\
                 [ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] || exit 0\n\
                 exec timeout {} sh -c 'echo dumped > \"$1/hook-reached\" && read -r v < \"$1/hook-verdict\" && [ \"$v\" = commit ]' sh '{}'\n",
                timeout.as_secs().max(1),
                dir_str
            ),
        )?;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o700))?;
        Ok(Hook {
            script,
            reached: open("hook-reached")?,
            verdict: open("hook-verdict")?,
            fifos,
        })
    }

    /// Whether CRIU reached post-dump within `wait`.
    fn wait_reached(&self, wait: Duration) -> io::Result<bool> {
        if !streamer::readable_within(self.reached.as_fd(), wait)? {
            return Ok(false);
        }
        let mut buf = [0u8; 64];
        let n = (&self.reached).read(&mut buf)?;
        Ok(n > 0)
    }

    fn verdict(&self, commit: bool) -> io::Result<()> {
        (&self.verdict).write_all(if commit { b"commit\n" } else { b"abort\n" })
    }
}
