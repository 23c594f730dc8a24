//! The seam between a service's state machine and what actually runs it: how it is started,
//! watched, checkpointed into the pool, restored from it and stopped. [`ProcessTree`] (CRIU on
//! a process tree under torpor's init, in its own PID namespace and cgroup) and [`Container`]
//! (runc) are the real ones; the state machine's tests drive a fake on paused time.

use std::{
    collections::BTreeSet,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::Serialize;
use torpor_criu::{
    armed::ArmedWake,
    lazy::{checkpoint_lazy_service, StagedWake, MAX_STAGED_BYTES},
    procs,
    runc::Runc,
    CheckpointError, CheckpointOptions, CheckpointReport, CriuBinary, LazyOptions, LazySession,
    Pools, RestoreError, RestoreOptions, TcpConnections,
};
use torpor_pool::error_chain;
use tracing::{debug, warn};

use crate::{
    cgroup::ServiceCgroup,
    process::{self, LaunchError, ProcessLaunch},
    reaper::Reaper,
};

/// A boxed future: the trait stays object-safe without a macro crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A snapshot committed to the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub generation: u64,
    /// Bytes stored, when known (unknown when CRIU failed after the commit).
    pub bytes: Option<u64>,
    pub secs: Option<f64>,
}

/// How a checkpoint failed, as the state machine needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointFailed {
    pub message: String,
    /// Retrying cannot help on this host (a tree of several uids without CAP_SYS_RESOURCE).
    pub permanent: bool,
    /// The pool had committed this generation before the failure.
    pub committed: Option<u64>,
}

/// How a restore failed, as the state machine needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreFailed {
    pub message: String,
    /// The snapshot is gone or untrustworthy on every replica: the service's state is lost
    /// (it cold-starts), as opposed to a pool that is only unreachable.
    pub snapshot_lost: bool,
}

/// A tree brought back from the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    pub pid: i32,
    pub detail: String,
}

/// How a service's memory comes back at a wake.
#[derive(Debug, Clone)]
pub enum MemoryRestore {
    /// CRIU restores every page before the service runs; every checkpoint writes them all.
    Eager,
    /// Pages come from the pool on first touch (the recorded working set first); the next
    /// checkpoint writes only what the service touched.
    Lazy(LazyOptions),
}

/// How the memory of the current (lazy) wake came in, for `torpor status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct LazyMemory {
    /// Generation restored.
    pub generation: u64,
    /// Bytes of the recorded working set pushed right after the restore.
    pub prefetched_bytes: u64,
    /// Bytes copied in on page faults (readahead included).
    pub faulted_bytes: u64,
    pub faults: u64,
    /// Bytes filled in the background.
    pub background_bytes: u64,
    /// Bytes still in the pool only (never touched).
    pub remaining_bytes: u64,
}

/// What the agent's state machine needs from whatever runs a service.
pub trait Runner: Send + Sync + std::fmt::Debug {
    /// Starts the service from its command (not yet accepting): the root's PID.
    fn launch(&self) -> BoxFuture<'_, Result<i32, LaunchError>>;
    /// Waits until the service rooted at `pid` accepts connections itself. After a restore
    /// (`restored`) the listener is the one CRIU gave back to the tree (had anyone else taken
    /// the address, the restore would have failed), so it is not looked up again.
    fn wait_ready(&self, pid: i32, restored: bool) -> BoxFuture<'_, Result<(), LaunchError>>;
    /// Checkpoints the tree into the pool; on success the tree is gone.
    fn checkpoint(&self, pid: i32) -> BoxFuture<'_, Result<Committed, CheckpointFailed>>;
    /// Restores `generation` from the pool.
    fn restore(&self, generation: Option<u64>) -> BoxFuture<'_, Result<Restored, RestoreFailed>>;
    /// Gives back the pool memory of generations up to `up_to`.
    fn release(&self, up_to: u64) -> BoxFuture<'_, Result<(), String>>;
    /// Stops the tree: politely, then by force after `grace`; reaps it.
    fn stop(&self, pid: i32, grace: Duration) -> BoxFuture<'_, ()>;
    /// Reaps what is left once the tree is gone (after a checkpoint).
    fn clear(&self, pid: i32) -> BoxFuture<'_, ()>;
    /// Whether the root has exited (reaping it), and how.
    fn exited(&self, pid: i32) -> Option<String>;
    /// Whether nothing of the tree runs any more.
    fn gone(&self, pid: i32) -> bool;
    /// The service's processes now.
    fn members(&self, pid: i32) -> Vec<i32>;
    /// The service is stopped for good: remove what was made for it.
    fn retire(&self) -> BoxFuture<'_, ()>;
    /// How the memory of the running incarnation came in, when it was restored lazily.
    fn lazy_memory(&self) -> Option<LazyMemory> {
        None
    }
    /// Bytes this node keeps for the next wake while the service sleeps.
    fn staged_bytes(&self) -> u64 {
        0
    }
    /// Whether the next wake is armed (its restore held before the tasks resume).
    fn armed(&self) -> bool {
        false
    }
    /// The agent is stopping and no wake will come: what was made ready for one is given
    /// up, and a checkpoint from now on makes nothing ready.
    fn prepare_stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// The cgroup where the next start finds the tree rooted at `pid` if it is left running
    /// at the agent's stop (`torpor stop --keep-running`), or why it cannot be left.
    fn keepable(&self, _pid: i32) -> Result<PathBuf, String> {
        Err("only plain process trees are left running (a container's runtime state goes with this process)".into())
    }
    /// Makes the running tree independent of this process before it is left running: a
    /// lazily restored one gets every page still in the pool, within `limit`.
    fn detach(&self, _limit: Duration) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    /// The tree's own cgroup, which holds it and nothing else, when it has one.
    fn own_cgroup(&self) -> Option<PathBuf> {
        None
    }
    /// Freezes (`on`) or thaws the running tree: its timers and wakeups stop, its memory
    /// stays. `Err` says why it cannot (the governor then never picks the frozen level).
    fn freeze(&self, _on: bool) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Err("only plain process trees in a cgroup are frozen".to_string()) })
    }
}

/// Longest wait for the kernel to freeze or thaw a service's cgroup.
const FREEZE_WAIT: Duration = Duration::from_secs(2);

/// Where things are that every real runner needs.
#[derive(Debug, Clone)]
pub struct Host {
    pub criu: CriuBinary,
    /// The pool replicas and the node key that seals and verifies snapshots.
    pub pools: Pools,
    /// Prefix of this node's snapshot names (`NAMESPACE.SERVICE`), so that nodes sharing a
    /// pool never collide nor release each other's snapshots.
    pub namespace: String,
    pub reaper: Arc<Reaper>,
}

impl Host {
    /// The pool name of a service's snapshots.
    pub fn snapshot_name(&self, service: &str) -> String {
        format!("{}.{service}", self.namespace)
    }

    /// Deletes this node's generations of `service` up to `up_to` on every replica (never
    /// another node's, never a newer one, never one in `keep`: pages a lazily restored
    /// service has not touched yet are still read from them).
    fn release(
        &self,
        service: &str,
        up_to: u64,
        keep: BTreeSet<u64>,
    ) -> BoxFuture<'static, Result<(), String>> {
        let (pools, name) = (self.pools.clone(), self.snapshot_name(service));
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut first_error = None;
                for pool in &pools.replicas {
                    let released = pool.connect().and_then(|mut c| {
                        let stale: Vec<u64> = c
                            .list()?
                            .into_iter()
                            .filter(|s| {
                                s.name == name
                                    && s.generation <= up_to
                                    && !keep.contains(&s.generation)
                            })
                            .map(|s| s.generation)
                            .collect();
                        stale
                            .into_iter()
                            .try_for_each(|g| c.delete(&name, Some(g)).map(|_| ()))
                    });
                    if let Err(e) = released {
                        first_error.get_or_insert(e);
                    }
                }
                first_error.map_or(Ok(()), Err)
            })
            .await
            .expect("release task panicked")
            .map_err(|e| error_chain(&e))
        })
    }
}

/// A plain process tree under torpor's init, checkpointed with CRIU.
#[derive(Debug)]
pub struct ProcessTree {
    pub name: String,
    pub launch: ProcessLaunch,
    pub backend: SocketAddr,
    pub start_timeout: Duration,
    /// The torpor binary that runs as the namespace's init.
    pub init_program: PathBuf,
    /// The service's own cgroup, where cgroups are mounted.
    pub cgroup: Option<ServiceCgroup>,
    pub host: Host,
    pub memory: MemoryRestore,
    /// The lazy-pages server of the running incarnation, and the generations it reads from.
    pub lazy: Arc<Mutex<LazyState>>,
}

/// What a lazily restored incarnation holds in the pool.
#[derive(Debug, Default)]
pub struct LazyState {
    session: Option<LazySession>,
    generation: u64,
    /// Generations the running service (or its newest snapshot) still reads pages from.
    keep: BTreeSet<u64>,
    /// The newest snapshot being staged for the next wake (see [`StagedWake`]).
    staged: Option<Staging>,
    /// The agent is stopping: no wake is staged any more.
    stopping: bool,
}

/// A snapshot made ready for its wake on a thread of its own right after its checkpoint:
/// staged, and with `arm` its restore run and held before the tasks resume.
#[derive(Debug)]
struct Staging {
    generation: u64,
    /// What it keeps on the node, once ready.
    bytes: Arc<AtomicU64>,
    /// Set once the restore is held, ready to be released.
    armed: Arc<AtomicBool>,
    /// `None` when it failed or was too large to keep.
    done: std::thread::JoinHandle<Option<Prepared>>,
}

/// What a wake finds ready.
#[derive(Debug)]
enum Prepared {
    Staged(StagedWake),
    Armed(ArmedWake),
}

impl Staging {
    /// `restore` as the wake would restore; within [`MAX_STAGED_BYTES`].
    fn start(
        host: &Host,
        service: &str,
        generation: u64,
        lazy: &LazyOptions,
        restore: RestoreOptions,
    ) -> Staging {
        let (criu, pools, name, service) = (
            host.criu.clone(),
            host.pools.clone(),
            host.snapshot_name(service),
            service.to_string(),
        );
        let lazy = lazy.clone();
        let bytes = Arc::new(AtomicU64::new(0));
        let armed = Arc::new(AtomicBool::new(false));
        let (kept, held) = (bytes.clone(), armed.clone());
        let done = std::thread::spawn(move || {
            let keep = if lazy.prefetch { MAX_STAGED_BYTES } else { 0 };
            let staged = match torpor_criu::lazy::stage_lazy(
                &name,
                Some(generation),
                &pools,
                &restore.work_root,
                keep,
            ) {
                Ok(staged) if staged.bytes <= MAX_STAGED_BYTES => staged,
                Ok(staged) => {
                    debug!(
                        service,
                        bytes = staged.bytes,
                        "staged wake too large to keep; the wake stages itself"
                    );
                    return None;
                }
                Err(e) => {
                    debug!(service, error = %error_chain(&e), "staging the next wake failed; the wake stages itself");
                    return None;
                }
            };
            debug!(
                service,
                generation,
                bytes = staged.bytes,
                secs = staged.staged_s,
                "next wake staged"
            );
            if !lazy.arm {
                kept.store(staged.bytes, Ordering::Relaxed);
                return Some(Prepared::Staged(staged));
            }
            match torpor_criu::armed::arm_lazy(
                &criu,
                staged,
                &pools,
                &restore,
                &lazy,
                torpor_criu::armed::ARM_TIMEOUT,
            ) {
                Ok(armed) => {
                    kept.store(armed.held_bytes(), Ordering::Relaxed);
                    held.store(true, Ordering::Relaxed);
                    Some(Prepared::Armed(armed))
                }
                Err(e) => {
                    warn!(service, generation, error = %error_chain(&e), "arming the next wake failed; the wake restores on its own");
                    None
                }
            }
        });
        Staging {
            generation,
            bytes,
            armed,
            done,
        }
    }

    /// What was made ready for `generation`, waiting for it if need be; `None` for another
    /// generation (an armed one is then given up) or when nothing came of it.
    fn take(self, generation: Option<u64>) -> Option<Prepared> {
        let prepared = self.done.join().ok().flatten();
        if generation != Some(self.generation) {
            return None;
        }
        prepared
    }
}

impl LazyState {
    /// Ends the session of an incarnation that is gone, off the async runtime (a session
    /// whose processes still live fills their memory first).
    fn end_session(state: &Arc<Mutex<LazyState>>, service: &str) {
        if let Some(session) = state.lock().expect("lazy lock").session.take() {
            let service = service.to_string();
            std::thread::spawn(move || {
                if let Err(e) = session.shutdown() {
                    warn!(service, error = %e, "lazy-pages server ended badly");
                }
            });
        }
    }
}

impl ProcessTree {
    /// The service's processes: its cgroup's members, else the tree under `pid`.
    fn tree(&self, pid: i32) -> Vec<i32> {
        match self.cgroup.as_ref().map(|cg| cg.procs()) {
            Some(procs) if !procs.is_empty() => procs,
            _ => procs::tree_pids(pid),
        }
    }

    /// How a wake restores the tree: connections closed, straight into its cgroup.
    fn restore_options(&self) -> RestoreOptions {
        RestoreOptions {
            tcp: TcpConnections::Close,
            cgroup_procs: self.cgroup.as_ref().and_then(|cg| cg.procs_file().ok()),
            ..Default::default()
        }
    }

    async fn kill_cgroup(&self) {
        if let Some(cg) = self.cgroup.clone() {
            let _ = tokio::task::spawn_blocking(move || cg.kill_all(Duration::from_secs(5))).await;
        }
    }
}

impl Runner for ProcessTree {
    fn launch(&self) -> BoxFuture<'_, Result<i32, LaunchError>> {
        Box::pin(async move {
            let (p, init, cg) = (
                self.launch.clone(),
                self.init_program.clone(),
                self.cgroup.clone(),
            );
            let pid = tokio::task::spawn_blocking(move || p.spawn(&init, cg.as_ref()))
                .await
                .expect("spawn task panicked")?;
            self.host.reaper.watch(pid);
            Ok(pid)
        })
    }

    fn wait_ready(&self, pid: i32, restored: bool) -> BoxFuture<'_, Result<(), LaunchError>> {
        Box::pin(async move {
            let members = move || self.tree(pid);
            let owner: Option<&(dyn Fn() -> Vec<i32> + Send + Sync)> =
                (!restored).then_some(&members);
            process::wait_accepting(
                self.backend,
                pid,
                &self.host.reaper,
                self.start_timeout,
                owner,
            )
            .await
        })
    }

    fn checkpoint(&self, pid: i32) -> BoxFuture<'_, Result<Committed, CheckpointFailed>> {
        let (host, name) = (self.host.clone(), self.host.snapshot_name(&self.name));
        let members = self.tree(pid);
        let lazy = self.lazy.clone();
        Box::pin(async move {
            let (done, finished) = tokio::task::spawn_blocking(move || {
                let mut finished = None;
                let opts = CheckpointOptions {
                    // The gate closed its connections; any other (half-closed, foreign)
                    // comes back closed rather than held behind iptables rules while asleep.
                    tcp: TcpConnections::Close,
                    ..Default::default()
                };
                let session = lazy.lock().expect("lazy lock").session.take();
                let result: Result<CheckpointReport, CheckpointError> = match session {
                    Some(session) => {
                        let r = checkpoint_lazy_service(
                            &host.criu,
                            pid,
                            &name,
                            &host.pools,
                            &opts,
                            &session,
                        );
                        let mut state = lazy.lock().expect("lazy lock");
                        match r {
                            Ok((report, increment)) => {
                                state.keep = increment.generations();
                                state.keep.insert(report.generation);
                                finished = Some(session);
                                Ok(report)
                            }
                            Err(e) => {
                                // The tree runs on (or its fate is in the error): the
                                // session keeps serving it.
                                state.session = Some(session);
                                Err(e)
                            }
                        }
                    }
                    None => {
                        torpor_criu::checkpoint_to_pool(&host.criu, pid, &name, &host.pools, &opts)
                    }
                };
                let committed = result
                    .map(|r| Committed {
                        generation: r.generation,
                        bytes: Some(r.pool_bytes),
                        secs: Some(r.checkpoint_s),
                    })
                    .map_err(|e| CheckpointFailed {
                        message: error_chain(&e),
                        permanent: matches!(
                            e,
                            CheckpointError::MixedUids { .. }
                                | CheckpointError::UnprivilegedPidNamespace { .. }
                        ),
                        committed: match e {
                            CheckpointError::AfterCommit { generation, .. } => Some(generation),
                            _ => None,
                        },
                    });
                (committed, finished)
            })
            .await
            .expect("checkpoint task panicked");
            let done = done?;
            // Outside a PID namespace the killed tree's processes are handed to us: reap
            // them now, so that the next restore finds their PIDs free.
            self.host
                .reaper
                .reap(&members, Duration::from_secs(5))
                .await;
            if let Some(session) = finished {
                let _ = tokio::task::spawn_blocking(move || session.shutdown()).await;
            }
            // What the next wake needs before CRIU runs is fetched now, while the service
            // sleeps, rather than on the held request's time.
            let stopping = self.lazy.lock().expect("lazy lock").stopping;
            if let (MemoryRestore::Lazy(options), false) = (&self.memory, stopping) {
                let staging = Staging::start(
                    &self.host,
                    &self.name,
                    done.generation,
                    options,
                    self.restore_options(),
                );
                self.lazy.lock().expect("lazy lock").staged = Some(staging);
            }
            Ok(done)
        })
    }

    fn restore(&self, generation: Option<u64>) -> BoxFuture<'_, Result<Restored, RestoreFailed>> {
        let (host, name) = (self.host.clone(), self.host.snapshot_name(&self.name));
        let (memory, lazy, service) = (self.memory.clone(), self.lazy.clone(), self.name.clone());
        let opts = self.restore_options();
        Box::pin(async move {
            let restored = tokio::task::spawn_blocking(move || {
                // Out of the lock before waiting for the staging thread (an arming restore
                // reads the pool for seconds): `status()` takes this lock on the async
                // runtime, and a runtime blocked on it cannot serve an in-process pool
                // that the arming waits for.
                let staged = lazy.lock().expect("lazy lock").staged.take();
                let mut prepared = staged.and_then(|s| s.take(generation));
                // A lazy wake that fails for a passing reason (the pool's connection, CRIU) is
                // tried once more: an incremental snapshot has no other way back.
                let attempts = if matches!(memory, MemoryRestore::Lazy(_)) { 2 } else { 0 };
                for attempt in 0..attempts {
                    let MemoryRestore::Lazy(options) = &memory else {
                        break;
                    };
                    let woke = match prepared.take() {
                        Some(Prepared::Armed(armed)) => armed.resume(),
                        Some(Prepared::Staged(staged)) => torpor_criu::lazy::restore_lazy_staged(
                            &host.criu,
                            staged,
                            &host.pools,
                            &opts,
                            options,
                        ),
                        None => torpor_criu::restore_lazy_from_pool(
                            &host.criu,
                            &name,
                            generation,
                            &host.pools,
                            &opts,
                            options,
                        ),
                    };
                    match woke {
                        Ok(wake) => {
                            let r = &wake.report;
                            let detail = format!(
                                "restored generation {} lazily from pool replica {} as pid {} ({} fetched, working set {})",
                                r.generation,
                                r.replica,
                                r.pid,
                                torpor_image::format_bytes(r.bytes_fetched),
                                torpor_image::format_bytes(wake.working_set_bytes),
                            );
                            let mut state = lazy.lock().expect("lazy lock");
                            state.keep = wake.inherits.clone();
                            state.keep.insert(r.generation);
                            state.generation = r.generation;
                            state.session = Some(wake.session);
                            return Ok(Restored { pid: r.pid, detail });
                        }
                        Err(e) if e.snapshot_lost() => {
                            return Err(RestoreFailed {
                                message: error_chain(&e),
                                snapshot_lost: true,
                            })
                        }
                        // The eager path restores whatever is not an increment (it refuses
                        // those itself, and the wake then cold-starts).
                        // A snapshot dumped as another user is restored eagerly, always.
                        Err(e @ RestoreError::LazyUnsupported { .. }) => {
                            debug!(service, reason = %error_chain(&e), "restoring eagerly");
                            break;
                        }
                        Err(e) => {
                            warn!(service, attempt, error = %error_chain(&e), "lazy restore failed");
                        }
                    }
                }
                // Eagerly restored (or cold-started next): nothing is read from older
                // generations any more.
                lazy.lock().expect("lazy lock").keep.clear();
                torpor_criu::restore_from_pool(&host.criu, &name, generation, &host.pools, &opts)
                    .map(|r| Restored {
                        pid: r.pid,
                        detail: format!(
                            "restored generation {} from pool replica {} as pid {}{}",
                            r.generation,
                            r.replica,
                            r.pid,
                            if r.filled {
                                " (every page copied in before it ran)"
                            } else {
                                ""
                            }
                        ),
                    })
                    .map_err(|e| RestoreFailed {
                        message: error_chain(&e),
                        snapshot_lost: e.snapshot_lost(),
                    })
            })
            .await
            .expect("restore task panicked")?;
            self.host.reaper.watch(restored.pid);
            // CRIU restores cgroup membership where it can; this makes it exact either way.
            // Only processes outside are moved: each write to `cgroup.procs` may wait for an
            // RCU grace period (5-15 ms here), even for a process already inside.
            if let Some(cg) = &self.cgroup {
                let inside = cg.procs();
                for p in procs::tree_pids(restored.pid) {
                    if inside.contains(&p) {
                        continue;
                    }
                    if let Err(e) = cg.add(p) {
                        warn!(service = %self.name, pid = p, error = %e, "cannot move a restored process into the service's cgroup");
                    }
                }
            }
            Ok(restored)
        })
    }

    fn release(&self, up_to: u64) -> BoxFuture<'_, Result<(), String>> {
        let keep = self.lazy.lock().expect("lazy lock").keep.clone();
        self.host.release(&self.name, up_to, keep)
    }

    fn stop(&self, pid: i32, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            process::stop_tree(pid, self.cgroup.as_ref(), &self.host.reaper, grace).await;
            LazyState::end_session(&self.lazy, &self.name);
            // Nothing reads pages from older generations any more.
            self.lazy.lock().expect("lazy lock").keep.clear();
        })
    }

    fn clear(&self, pid: i32) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // A namespace dies with its init; the cgroup holds whatever else might be left.
            self.host.reaper.reap(&[pid], Duration::from_secs(5)).await;
            self.kill_cgroup().await;
        })
    }

    fn exited(&self, pid: i32) -> Option<String> {
        let exited = self.host.reaper.exited(pid);
        if exited.is_some() {
            LazyState::end_session(&self.lazy, &self.name);
        }
        exited
    }

    fn gone(&self, pid: i32) -> bool {
        let root_gone = self.host.reaper.exited(pid).is_some() || !procs::pid_in_use(pid);
        let cgroup_empty = match &self.cgroup {
            Some(cg) => cg.procs().is_empty(),
            None => true,
        };
        root_gone && cgroup_empty
    }

    fn members(&self, pid: i32) -> Vec<i32> {
        self.tree(pid)
    }

    fn staged_bytes(&self) -> u64 {
        let state = self.lazy.lock().expect("lazy lock");
        // staged files, or the held restore of an armed one
        state
            .staged
            .as_ref()
            .map_or(0, |s| s.bytes.load(Ordering::Relaxed))
    }

    fn armed(&self) -> bool {
        let state = self.lazy.lock().expect("lazy lock");
        state
            .staged
            .as_ref()
            .is_some_and(|s| s.armed.load(Ordering::Relaxed))
    }

    fn prepare_stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let staged = {
                let mut state = self.lazy.lock().expect("lazy lock");
                state.stopping = true;
                state.staged.take()
            };
            if let Some(staged) = staged {
                // Waits for the staging thread; an armed restore is given up (killed).
                let _ = tokio::task::spawn_blocking(move || drop(staged.take(None))).await;
            }
        })
    }

    fn keepable(&self, _pid: i32) -> Result<PathBuf, String> {
        self.own_cgroup().ok_or_else(|| {
            "it has no cgroup to be found in again (no cgroup hierarchy is mounted)".into()
        })
    }

    fn detach(&self, limit: Duration) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let Some(session) = self.lazy.lock().expect("lazy lock").session.take() else {
                return Ok(());
            };
            // The pages it has not touched yet would be lost with the server that serves
            // them: all of them are copied in, then the server ends.
            let (filled, session) = tokio::task::spawn_blocking(move || {
                let filled = session.fill_all(limit);
                (filled, session)
            })
            .await
            .expect("fill task panicked");
            if let Err(e) = filled {
                self.lazy.lock().expect("lazy lock").session = Some(session);
                return Err(format!(
                    "its memory is paged in lazily from the pool by this process, and filling the rest failed: {}",
                    error_chain(&e)
                ));
            }
            let ended = tokio::task::spawn_blocking(move || session.shutdown())
                .await
                .expect("lazy shutdown task panicked");
            if let Err(e) = ended {
                warn!(service = %self.name, error = %error_chain(&e), "lazy-pages server ended badly after filling every page");
            }
            self.lazy.lock().expect("lazy lock").keep.clear();
            Ok(())
        })
    }

    fn lazy_memory(&self) -> Option<LazyMemory> {
        let state = self.lazy.lock().expect("lazy lock");
        let stats = state.session.as_ref()?.stats();
        Some(LazyMemory {
            generation: state.generation,
            prefetched_bytes: stats.prefetched_bytes,
            faulted_bytes: stats.faulted_bytes,
            faults: stats.faults,
            background_bytes: stats.background_bytes,
            remaining_bytes: stats.remaining_bytes,
        })
    }

    fn own_cgroup(&self) -> Option<PathBuf> {
        self.cgroup.as_ref().map(|cg| cg.path().to_path_buf())
    }

    fn freeze(&self, on: bool) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let Some(cg) = self.cgroup.clone() else {
                return Err("it has no cgroup (no cgroup hierarchy is mounted)".to_string());
            };
            tokio::task::spawn_blocking(move || cg.freeze(on, FREEZE_WAIT))
                .await
                .expect("freeze task panicked")
                .map_err(|e| e.to_string())
        })
    }

    fn retire(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // A restore armed (or arming) for the next wake is given up before the cgroup is
            // emptied: CRIU is told to end, rather than killed under its held tree.
            self.prepare_stop().await;
            if let Some(cg) = self.cgroup.clone() {
                let removed = tokio::task::spawn_blocking(move || {
                    cg.kill_all(Duration::from_secs(5));
                    cg.remove()
                })
                .await
                .expect("cgroup task panicked");
                if let Err(e) = removed {
                    warn!(service = %self.name, error = %e, "cannot remove the service's cgroup");
                }
            }
        })
    }
}

/// An OCI bundle run and checkpointed by runc.
#[derive(Debug)]
pub struct Container {
    pub name: String,
    pub bundle: PathBuf,
    pub backend: SocketAddr,
    pub start_timeout: Duration,
    pub runc: Runc,
    pub host: Host,
}

impl Container {
    fn id(&self) -> String {
        format!("torpor-{}", self.name)
    }
}

impl Runner for Container {
    fn launch(&self) -> BoxFuture<'_, Result<i32, LaunchError>> {
        Box::pin(async move {
            let (runc, id, bundle) = (self.runc.clone(), self.id(), self.bundle.clone());
            let pid = tokio::task::spawn_blocking(move || runc.start(&id, &bundle))
                .await
                .expect("runc task panicked")?;
            self.host.reaper.watch(pid);
            Ok(pid)
        })
    }

    fn wait_ready(&self, pid: i32, _restored: bool) -> BoxFuture<'_, Result<(), LaunchError>> {
        // The container may have its own network namespace: no ownership check.
        Box::pin(process::wait_accepting(
            self.backend,
            pid,
            &self.host.reaper,
            self.start_timeout,
            None,
        ))
    }

    fn checkpoint(&self, _pid: i32) -> BoxFuture<'_, Result<Committed, CheckpointFailed>> {
        let (runc, id, name, pools) = (
            self.runc.clone(),
            self.id(),
            self.host.snapshot_name(&self.name),
            self.host.pools.clone(),
        );
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                runc.checkpoint_to_pool(&id, &name, &pools)
                    .map(|(generation, bytes, secs)| Committed {
                        generation,
                        bytes: Some(bytes),
                        secs: Some(secs),
                    })
                    .map_err(|e| CheckpointFailed {
                        message: error_chain(&e),
                        permanent: false,
                        committed: None,
                    })
            })
            .await
            .expect("checkpoint task panicked")
        })
    }

    fn restore(&self, generation: Option<u64>) -> BoxFuture<'_, Result<Restored, RestoreFailed>> {
        let (runc, id, bundle, name, pools) = (
            self.runc.clone(),
            self.id(),
            self.bundle.clone(),
            self.host.snapshot_name(&self.name),
            self.host.pools.clone(),
        );
        Box::pin(async move {
            let restored = tokio::task::spawn_blocking(move || {
                runc.restore_from_pool(&id, &bundle, &name, generation, &pools)
                    .map(|pid| Restored {
                        pid,
                        detail: format!("restored container {id} as pid {pid}"),
                    })
                    .map_err(|e| RestoreFailed {
                        message: error_chain(&e),
                        snapshot_lost: e.snapshot_lost(),
                    })
            })
            .await
            .expect("restore task panicked")?;
            self.host.reaper.watch(restored.pid);
            Ok(restored)
        })
    }

    fn release(&self, up_to: u64) -> BoxFuture<'_, Result<(), String>> {
        self.host.release(&self.name, up_to, BTreeSet::new())
    }

    fn stop(&self, pid: i32, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (runc, id) = (self.runc.clone(), self.id());
            let _ = tokio::task::spawn_blocking(move || runc.delete(&id)).await;
            self.host.reaper.reap(&[pid], grace).await;
        })
    }

    fn clear(&self, pid: i32) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.host.reaper.reap(&[pid], Duration::from_secs(5)).await;
        })
    }

    fn exited(&self, pid: i32) -> Option<String> {
        self.host.reaper.exited(pid)
    }

    fn gone(&self, pid: i32) -> bool {
        self.host.reaper.exited(pid).is_some() || !procs::pid_in_use(pid)
    }

    fn members(&self, pid: i32) -> Vec<i32> {
        procs::tree_pids(pid)
    }

    fn retire(&self) -> BoxFuture<'_, ()> {
        // A start cut short may have left the container without its PID known to us.
        let (runc, id) = (self.runc.clone(), self.id());
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || runc.delete(&id)).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use torpor_image::{manifest::SnapshotMeta, NodeKey};
    use torpor_pool::{PoolAddr, PoolTarget, Store, StoreConfig};

    /// Two nodes share a pool, each with a service called `web`: a release after a wake
    /// deletes only the releasing node's generations, up to the restored one.
    #[tokio::test]
    async fn a_release_deletes_only_this_nodes_generations_up_to_the_restored_one() {
        let dir = tempfile::tempdir().unwrap();
        let addr = PoolAddr::Unix(dir.path().join("pool.sock"));
        let store = Store::open(StoreConfig {
            capacity: 4 << 20,
            spill_dir: None,
            keep: 10,
        })
        .unwrap();
        let listener = torpor_pool::Listener::bind(&addr).await.unwrap();
        let server = tokio::spawn(torpor_pool::serve(
            listener,
            Arc::new(store),
            None,
            std::future::pending(),
        ));
        let target = PoolTarget::new(addr, "");
        let generations = tokio::task::spawn_blocking({
            let target = target.clone();
            move || {
                ["a.web", "a.web", "a.web", "b.web", "b.web"].map(|name| {
                    let mut c = target.connect().unwrap();
                    c.put_begin(name, SnapshotMeta::default(), None).unwrap();
                    c.commit(None, None).unwrap().generation
                })
            }
        })
        .await
        .unwrap();
        assert_eq!(generations, [1, 2, 3, 1, 2]);
        let host = Host {
            criu: CriuBinary::locate().expect("CRIU is installed by the test command"),
            pools: Pools::single(target.clone(), Arc::new(NodeKey::generate())),
            namespace: "a".into(),
            reaper: Arc::new(Reaper::default()),
        };
        host.release("web", 2, BTreeSet::new()).await.unwrap();
        let left = tokio::task::spawn_blocking(move || {
            let mut names: Vec<(String, u64)> = target
                .connect()
                .unwrap()
                .list()
                .unwrap()
                .into_iter()
                .map(|s| (s.name, s.generation))
                .collect();
            names.sort();
            names
        })
        .await
        .unwrap();
        assert_eq!(
            left,
            [
                ("a.web".to_string(), 3),
                ("b.web".to_string(), 1),
                ("b.web".to_string(), 2)
            ]
        );
        server.abort();
    }
}
