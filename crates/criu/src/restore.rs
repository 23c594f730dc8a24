//! Restore a snapshot eagerly, straight from the pool: through userfaultfd where it can
//! ([`crate::filled`]), otherwise by CRIU reading the images itself, as follows.
//!
//! CRIU runs with `--stream` and asks for image files one by one, each chunk verified against
//! its checksum by the pool before it is sent. A file that fits in CRIU's pipe (all of them
//! but large `pages-*.img`) is fetched and written by the thread that answers CRIU, from one
//! reused buffer: it cannot block on the pipe, and a thread of its own cost a wake-up each (up
//! to a scheduler tick, 4 ms, on a busy machine, for some 40 files per restore). A larger file
//! streams from the pool into the pipe as it arrives, on its own thread, so CRIU may read files
//! in any interleaving, spliced into it from where each frame landed ([`PipeFeeder`]), so that
//! CRIU's copy out of the pipe is the only one on the node; nothing larger than a pipe is
//! buffered whole on the node (buffering first doubles restore time). Before CRIU starts, the snapshot's PIDs must be free: a task
//! just dumped can linger as a zombie until its parent reaps it. A tree whose root was the
//! init of its own PID namespace is restored into a fresh one, where its PIDs cannot collide,
//! so it does not wait. CRIU runs as the identity the snapshot was dumped with.

use std::{
    io,
    io::Write,
    os::{
        fd::{AsFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::PathBuf,
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use thiserror::Error;
use torpor_image::{
    manifest::RunAs,
    pages::PAGE_INDEX_FILE,
    seal::{FileDigest, SealedFile},
    wire::ErrorCode,
    Manifest, SealError, CHUNK_SIZE,
};
use torpor_pool::{ClientError, FrameSink, PoolClient};
use tracing::{debug, info, warn};

use crate::{
    binary::{read_no_follow, CriuBinary, CriuError},
    checkpoint::TcpConnections,
    identity::CriuIdentity,
    procs,
    replicas::{fetch_file_into, find_verified, FetchError, Pools},
    run::{keep_failed_log, StreamedRun},
    streamer::{self, PipeFeeder, SERVE_SOCKET},
    PoolTarget,
};

/// How a restore is done.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Must match what the checkpoint did with established TCP connections.
    pub tcp: TcpConnections,
    /// The tree was a terminal session (CRIU's `--shell-job`).
    pub shell_job: bool,
    /// Longest wait for the snapshot's PIDs to become free.
    pub pid_wait: Duration,
    /// Where CRIU's work directory (log, socket) is created.
    pub work_root: PathBuf,
    /// Identity CRIU runs as; by default the one the snapshot was dumped with, so a restore
    /// needs no more privilege than its dump had.
    pub run_as: CriuIdentity,
    /// The `cgroup.procs` of the cgroup the tree belongs in: CRIU joins it before it forks
    /// and leaves cgroups alone (`--manage-cgroups=ignore`), so the tree is created inside.
    /// Left to CRIU, restoring membership mounts a cgroup yard, some 10 ms a wake here.
    pub cgroup_procs: Option<PathBuf>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            tcp: TcpConnections::Keep,
            shell_job: false,
            pid_wait: Duration::from_secs(10),
            work_root: std::env::temp_dir(),
            run_as: CriuIdentity::Auto,
            cgroup_procs: None,
        }
    }
}

/// What a restore did and cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub name: String,
    pub generation: u64,
    /// PID of the restored root.
    pub pid: i32,
    /// From the request to CRIU's exit, the tree running.
    pub restore_s: f64,
    /// Of which waiting for the PIDs to be free (0 for a tree in its own PID namespace).
    pub pid_wait_s: f64,
    pub bytes_fetched: u64,
    /// Identity CRIU ran as (`None`: as this process).
    pub run_as: Option<RunAs>,
    /// Index of the pool replica the snapshot came from.
    pub replica: usize,
    /// Every page was copied in through userfaultfd before the tasks ran
    /// ([`crate::filled`]); `false`: CRIU read them (`--stream`), or the restore is lazy.
    pub filled: bool,
}

/// Why a restore failed; nothing of the snapshot is left running in any case.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("cannot read snapshot {name:?} from the pool")]
    Pool {
        name: String,
        #[source]
        source: ClientError,
    },
    #[error("snapshot {name:?} is corrupt in the pool; refusing to restore it")]
    Corrupt {
        name: String,
        #[source]
        source: ClientError,
    },
    #[error("snapshot {name:?} cannot be verified with this node's key; refusing to restore it")]
    Unverified {
        name: String,
        #[source]
        source: SealError,
    },
    #[error("pid {pid} ({comm}) is still in use after {waited:?}; the snapshot's process tree needs it back")]
    PidBusy {
        pid: i32,
        comm: String,
        waited: Duration,
    },
    #[error("preparing CRIU's work directory failed")]
    WorkDir(#[source] io::Error),
    #[error("CRIU could not restore snapshot {name:?}. CRIU's log ({log_path}) says:\n{log}")]
    CriuFailed {
        name: String,
        log: String,
        log_path: PathBuf,
    },
    #[error("talking to CRIU failed")]
    Stream(#[source] io::Error),
    #[error("snapshot {name:?} cannot be restored lazily: {reason}")]
    LazyUnsupported { name: String, reason: String },
    #[error("snapshot {name:?} is incremental (older generations hold pages it never touched): only a lazy restore can bring it back")]
    LazyOnly { name: String },
    #[error("snapshot {name:?} has unusable images: {what}")]
    BadImages { name: String, what: String },
    #[error("the lazy-pages server for {name:?} failed")]
    Lazy {
        name: String,
        #[source]
        source: torpor_lazy::LazyError,
    },
    #[error("the restore of {name:?} could not be held before its tasks resume: {reason}")]
    NotHeld { name: String, reason: String },
    #[error("CRIU restored {name:?} but wrote no PID file")]
    NoPid { name: String },
    #[error("CRIU's PID file for {name:?} names pid {pid}, which does not run as uid {uid}; refusing to trust it")]
    UntrustedPid { name: String, pid: i32, uid: u32 },
}

impl RestoreError {
    pub(crate) fn from_fetch(name: &str, e: FetchError) -> RestoreError {
        let name = name.to_string();
        match e {
            FetchError::Unverified(source) => RestoreError::Unverified { name, source },
            FetchError::Pool(source) if source.pool_code() == Some(ErrorCode::Corrupt) => {
                RestoreError::Corrupt { name, source }
            }
            FetchError::Pool(source) => RestoreError::Pool { name, source },
        }
    }

    /// The replica serving the snapshot failed (another one may serve it).
    fn replica_failed(&self) -> bool {
        matches!(
            self,
            RestoreError::Pool { .. }
                | RestoreError::Corrupt { .. }
                | RestoreError::Unverified { .. }
        )
    }

    /// The snapshot is gone or untrustworthy (as opposed to a pool that is merely
    /// unreachable, or a failure of CRIU's): a state that is lost, not delayed.
    pub fn snapshot_lost(&self) -> bool {
        match self {
            // An increment only a lazy restore can bring back, after the lazy one failed:
            // this wake goes without the service's state.
            RestoreError::Corrupt { .. }
            | RestoreError::Unverified { .. }
            | RestoreError::BadImages { .. }
            | RestoreError::LazyOnly { .. } => true,
            RestoreError::Pool { source, .. } => source.pool_code() == Some(ErrorCode::NotFound),
            _ => false,
        }
    }
}

/// Restores generation `generation` (the newest when `None`) of `name` eagerly: every page is
/// in place before any of its tasks runs. Copied in through userfaultfd where it can be
/// ([`crate::filled`]: fewer and cheaper page allocations than CRIU's own reads, and an
/// increment's inherited pages too); otherwise, or if that fails, read by CRIU from the pool
/// ([`restore_streamed`]).
pub fn restore_from_pool(
    criu: &CriuBinary,
    name: &str,
    generation: Option<u64>,
    pools: &Pools,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    match crate::filled::restore_filled(criu, name, generation, pools, opts) {
        Ok(report) => return Ok(report),
        // The pool itself failed (unreachable, silent, the snapshot not there): CRIU's own
        // reads would wait on it as long again.
        Err(e @ RestoreError::Pool { .. }) => return Err(e),
        Err(e @ RestoreError::LazyUnsupported { .. }) => {
            debug!(name, reason = %torpor_pool::error_chain(&e), "restoring with CRIU's own page reads");
        }
        Err(e) => {
            warn!(name, error = %torpor_pool::error_chain(&e), "restore through userfaultfd failed; restoring with CRIU's own page reads");
        }
    }
    restore_streamed(criu, name, generation, pools, opts)
}

/// Restores generation `generation` (the newest when `None`) of `name` with CRIU reading
/// every image from the pool (`--stream`), from the first pool replica that holds it under a
/// seal this node's key verifies; when a replica fails while serving it (unreachable,
/// corrupt, altered), the restore is tried again from the next one. Needs no userfaultfd,
/// and refuses an increment ([`RestoreError::LazyOnly`]).
pub fn restore_streamed(
    criu: &CriuBinary,
    name: &str,
    generation: Option<u64>,
    pools: &Pools,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let mut from = 0;
    loop {
        match restore_from_replica(criu, name, generation, pools, from, opts) {
            Err((replica, e)) if e.replica_failed() && replica + 1 < pools.replicas.len() => {
                warn!(name, replica, error = %torpor_pool::error_chain(&e), "restore failed on this pool replica; trying the next");
                from = replica + 1;
            }
            other => return other.map_err(|(_, e)| e),
        }
    }
}

fn restore_from_replica(
    criu: &CriuBinary,
    name: &str,
    generation: Option<u64>,
    pools: &Pools,
    from: usize,
    opts: &RestoreOptions,
) -> Result<RestoreReport, (usize, RestoreError)> {
    let (replica, client, manifest) =
        find_verified(pools, from, name, generation).map_err(|e| {
            let last = pools.replicas.len().saturating_sub(1);
            (last, RestoreError::from_fetch(name, e))
        })?;
    restore_verified(criu, name, pools, replica, client, manifest, opts).map_err(|e| (replica, e))
}

/// Restores a manifest whose seal was verified; every file is checked against it on the way.
fn restore_verified(
    criu: &CriuBinary,
    name: &str,
    pools: &Pools,
    replica: usize,
    client: PoolClient,
    manifest: Manifest,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let start = Instant::now();
    if manifest.file(PAGE_INDEX_FILE).is_some() {
        return Err(RestoreError::LazyOnly {
            name: name.to_string(),
        });
    }
    let manifest = Arc::new(manifest);
    let pid_namespace = manifest.meta.pid_namespace;
    let pid_wait_s = wait_for_pids(&manifest, opts, start)?;
    let run_as = opts
        .run_as
        .resolve(|| Ok::<_, RestoreError>(manifest.meta.run_as))?;

    let mut run = StreamedRun::create(&opts.work_root, "torpor-restore-", SERVE_SOCKET, run_as)
        .map_err(RestoreError::WorkDir)?;
    run.open_to_criu(&[], &[]).map_err(RestoreError::WorkDir)?;
    let log_path = run.out("restore.log");
    let pidfile = run.out("root.pid");
    let mut cmd = restore_command(criu, run.work.path(), "--stream", &pidfile, &log_path, opts);
    let mut criu_run = run.spawn(criu, &mut cmd)?;
    debug!(
        name,
        generation = manifest.generation,
        ?run_as,
        pid_namespace,
        "criu restore started"
    );

    let server = Arc::new(FileServer {
        pool: pools.replicas[replica].clone(),
        verify: pools.key.is_some(),
        manifest: manifest.clone(),
        idle: Mutex::new(vec![client]),
        error: Mutex::new(None),
        bytes: Default::default(),
    });
    {
        let server = server.clone();
        criu_run.serve(move |sock| server.serve(sock));
    }
    let succeeded = criu_run
        .child
        .wait()
        .map_err(RestoreError::Stream)?
        .success();
    criu_run.criu_ended();
    let served = criu_run.join();
    let restore_s = start.elapsed().as_secs_f64();

    let fetch_error = server.error.lock().expect("error lock").take();
    // A namespace's init dies with its namespace and the old host PIDs are not its.
    if (fetch_error.is_some() || !succeeded) && !pid_namespace {
        procs::reap_failed_restore(&manifest.meta.pids, Duration::from_secs(2));
    }
    if let Some(e) = fetch_error {
        return Err(RestoreError::from_fetch(name, e));
    }
    if !succeeded {
        let (log, log_path) = keep_failed_log(&log_path, "restore", name);
        return Err(RestoreError::CriuFailed {
            name: name.to_string(),
            log,
            log_path,
        });
    }
    served.map_err(RestoreError::Stream)?;
    let pid = read_no_follow(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .ok_or_else(|| RestoreError::NoPid {
            name: name.to_string(),
        })?;
    // A pid file CRIU wrote as `who` is in `who`'s reach too: it must name a process of `who`
    // (or one already gone), or its reader could be made to signal anyone.
    if let Some(who) = run_as {
        if procs::task_ids(pid).is_some_and(|t| t.uids != [who.uid; 4]) {
            return Err(RestoreError::UntrustedPid {
                name: name.to_string(),
                pid,
                uid: who.uid,
            });
        }
    }
    let bytes_fetched = server.bytes.load(std::sync::atomic::Ordering::SeqCst);
    info!(
        name,
        generation = manifest.generation,
        pid,
        secs = restore_s,
        "restored"
    );
    Ok(RestoreReport {
        name: name.to_string(),
        generation: manifest.generation,
        pid,
        restore_s,
        pid_wait_s,
        bytes_fetched,
        run_as,
        replica,
        filled: false,
    })
}

/// `criu restore` of the images in `dir`, detached, with `how` (`--stream` or
/// `--lazy-pages`): the root's PID goes to `pidfile`, the log to `log`.
pub(crate) fn restore_command(
    criu: &CriuBinary,
    dir: &std::path::Path,
    how: &str,
    pidfile: &std::path::Path,
    log: &std::path::Path,
    opts: &RestoreOptions,
) -> std::process::Command {
    let mut cmd = criu.command();
    cmd.arg("restore")
        .arg("--images-dir")
        .arg(dir)
        .arg(how)
        .arg("--restore-detached")
        .arg("--pidfile")
        .arg(pidfile)
        .arg("--log-file")
        .arg(log)
        .arg("-v4")
        .arg(opts.tcp.criu_flag());
    if opts.shell_job {
        cmd.arg("--shell-job");
    }
    if let Some(procs) = &opts.cgroup_procs {
        match std::fs::OpenOptions::new().write(true).open(procs) {
            Ok(mut join) => {
                cmd.arg("--manage-cgroups=ignore");
                // SAFETY: one write(2) on a descriptor opened before the fork.
                unsafe {
                    std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                        join.write_all(b"0")
                    });
                }
            }
            Err(e) => {
                warn!(cgroup = %procs.display(), error = %e, "cannot join the tree's cgroup; CRIU restores its membership");
            }
        }
    }
    cmd
}

/// Waits until the snapshot's PIDs are free; returns the seconds since `start`. In a fresh
/// PID namespace the old host PIDs are not needed back.
pub(crate) fn wait_for_pids(
    manifest: &Manifest,
    opts: &RestoreOptions,
    start: Instant,
) -> Result<f64, RestoreError> {
    if manifest.meta.pid_namespace {
        return Ok(0.0);
    }
    procs::wait_pids_free(&manifest.meta.pids, opts.pid_wait).map_err(|pid| {
        RestoreError::PidBusy {
            pid,
            comm: procs::comm(pid),
            waited: opts.pid_wait,
        }
    })?;
    Ok(start.elapsed().as_secs_f64())
}

/// Answers CRIU's requests from one snapshot in the pool.
struct FileServer {
    pool: PoolTarget,
    manifest: Arc<Manifest>,
    /// Authenticated connections not in use; each file in flight takes one.
    idle: Mutex<Vec<PoolClient>>,
    /// Every file is checked against the manifest's seal (not for a pool in this process).
    verify: bool,
    /// First failure while fetching or verifying; CRIU then sees a short image and fails.
    error: Mutex<Option<FetchError>>,
    bytes: std::sync::atomic::AtomicU64,
}

impl FileServer {
    fn serve(self: &Arc<Self>, sock: &mut UnixStream) -> io::Result<()> {
        let mut streams: Vec<JoinHandle<()>> = Vec::new();
        // Holds one small file at a time; reused, so its memory is touched once.
        let mut buf = Vec::new();
        while let Some(file) = streamer::read_request(sock)? {
            let size = self.manifest.file(&file).map(|f| f.size);
            streamer::send_reply(sock, size.is_some())?;
            let Some(size) = size else {
                continue;
            };
            let pipe = streamer::recv_pipe(sock)?;
            if size <= streamer::pipe_capacity(pipe.as_fd()) as u64 {
                self.write_whole(&file, pipe, &mut buf);
            } else {
                let me = self.clone();
                streams.push(thread::spawn(move || me.stream(&file, pipe)));
            }
        }
        for f in streams {
            let _ = f.join();
        }
        Ok(())
    }

    /// An idle authenticated connection, or a new one.
    fn client(&self) -> Option<PoolClient> {
        let idle = self.idle.lock().expect("idle lock").pop();
        match idle.map_or_else(|| self.pool.connect(), Ok) {
            Ok(c) => Some(c),
            Err(e) => {
                self.fail(e.into());
                None
            }
        }
    }

    /// What the seal says of `file` (`Some(None)`: nothing to check, the pool is this
    /// process's own); `None` after recording a failure (the manifest was verified, so a
    /// file outside the seal is one).
    fn sealed(&self, file: &str) -> Option<Option<&SealedFile>> {
        if !self.verify {
            return Some(None);
        }
        let found = self
            .manifest
            .seal
            .as_ref()
            .ok_or(SealError::Missing)
            .and_then(|s| s.file(file));
        found.map(Some).map_err(|e| self.fail(e.into())).ok()
    }

    /// Fetches a file no larger than `pipe`'s capacity whole, checks it against the seal, then
    /// writes it in one go: into a pipe nobody else writes to, that cannot block, whatever
    /// CRIU reads meanwhile.
    fn write_whole(&self, file: &str, pipe: OwnedFd, buf: &mut Vec<u8>) {
        let Some(mut client) = self.client() else {
            return;
        };
        match fetch_file_into(&mut client, &self.manifest, file, self.verify, buf) {
            Ok(n) => {
                self.idle.lock().expect("idle lock").push(client);
                match std::fs::File::from(pipe).write_all(buf) {
                    Ok(()) => {
                        self.bytes.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                    }
                    // CRIU stopped reading: its own log says why.
                    Err(e) => debug!(file, error = %e, "CRIU closed its pipe early"),
                }
            }
            Err(e) => self.fail(e),
        }
    }

    /// Streams a file larger than the pipe into it as it arrives from the pool, each frame
    /// spliced into the pipe from where it landed ([`PipeFeeder`]) and digested while CRIU
    /// reads it. Its last [`HOLD_BACK`](streamer::HOLD_BACK) bytes are written only once the
    /// whole file matched its sealed digest: CRIU cannot finish (and no restored task runs)
    /// without them.
    fn stream(&self, file: &str, pipe: OwnedFd) {
        let (Some(sealed), Some(mut client)) = (self.sealed(file), self.client()) else {
            return;
        };
        let mut sink = match PipeFeeder::new(pipe, CHUNK_SIZE as usize) {
            Ok(feeder) => Digesting {
                feeder,
                digest: sealed.map(|_| FileDigest::default()),
            },
            Err(e) => return self.fail(FetchError::Pool(ClientError::Sink(e))),
        };
        let result = client
            .get_file_into(
                &self.manifest.name,
                self.manifest.generation,
                file,
                &mut sink,
            )
            .map_err(FetchError::from)
            .and_then(|n| {
                if let (Some(f), Some(d)) = (sealed, &sink.digest) {
                    d.check(f)?;
                }
                sink.feeder.release().map_err(ClientError::Sink)?;
                Ok(n)
            });
        match result {
            Ok(n) => {
                self.bytes.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                self.idle.lock().expect("idle lock").push(client);
            }
            // CRIU stopped reading: its own log says why; this connection is mid-file, drop it.
            Err(FetchError::Pool(ClientError::Sink(e))) => {
                debug!(file, error = %e, "CRIU closed its pipe early")
            }
            Err(e) => self.fail(e),
        }
    }

    fn fail(&self, e: FetchError) {
        self.error.lock().expect("error lock").get_or_insert(e);
    }
}

/// A file's frames on their way into CRIU's pipe, digested for the seal as they pass.
struct Digesting {
    feeder: PipeFeeder,
    /// `None`: nothing to check (the pool is this process's own).
    digest: Option<FileDigest>,
}

impl FrameSink for Digesting {
    fn space(&mut self, len: usize) -> io::Result<&mut [u8]> {
        self.feeder.space(len)
    }

    fn filled(&mut self, len: usize) -> io::Result<()> {
        // Into the pipe first, so CRIU copies the bytes out while they are digested here.
        let bytes = self.feeder.pass(len)?;
        if let Some(d) = &mut self.digest {
            d.update(bytes);
        }
        Ok(())
    }

    /// The sealed digest covers every byte (and CRIU gets the file's last ones only once it
    /// matched), so the frames' CRCs would only check the same bytes a second time.
    fn checks_bytes(&self) -> bool {
        self.digest.is_some()
    }
}
