//! The lazy rounds of `torpor bench cr`: a sample service that touches 16 MiB per request is
//! checkpointed in full, woken lazily (no working set recorded yet), checkpointed
//! incrementally, woken lazily again with the working set recorded at the first wake pushed
//! first, and checkpointed incrementally once more after that one request; then armed (its
//! restore run and held before the tasks resume, as `torpor up` does while a service sleeps)
//! and released for one more request. Next to them, in
//! the same run: CRIU's own `lazy-pages` daemon restoring the same kind of service from a
//! local directory. Every first response is to the same request (`TOUCH`).

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use serde::Serialize;
use torpor_criu::{
    lazy::checkpoint_lazy_service, local, CheckpointOptions, CriuBinary, LazyOptions,
    RestoreOptions,
};

use crate::{
    harness::{kill_and_reap, PoolProcess, SampleProcess},
    report::median,
    ExperimentError,
};

/// Until the service answered one request that touches its hot memory.
pub fn touch_response(addr: SocketAddr, since: Instant) -> std::io::Result<Duration> {
    let mut c = torpor_workload::SampleClient::connect_within(addr, Duration::from_secs(30))?;
    let answer = c.call("TOUCH")?;
    if answer.starts_with("ERR") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("TOUCH answered {answer:?}"),
        ));
    }
    Ok(since.elapsed())
}

/// CPU seconds used so far by this process (the lazy-pages server and the upload threads
/// included), its waited-for children (CRIU) and the pool process.
pub fn cpu_now(pool: &PoolProcess) -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let secs = |who| {
        getrusage(who).map_or(0.0, |u| {
            let (a, b) = (u.user_time(), u.system_time());
            a.tv_sec() as f64
                + a.tv_usec() as f64 / 1e6
                + b.tv_sec() as f64
                + b.tv_usec() as f64 / 1e6
        })
    };
    secs(UsageWho::RUSAGE_SELF)
        + secs(UsageWho::RUSAGE_CHILDREN)
        + torpor_criu::procs::cpu_seconds(pool.pid())
}

/// One lazy wake's medians.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LazyMedians {
    pub first_response_s: Option<f64>,
    pub restore_s: Option<f64>,
    /// Bytes copied in on page faults until the first response.
    pub faulted_bytes: Option<u64>,
    /// Bytes of the recorded working set pushed at the wake.
    pub prefetched_bytes: Option<u64>,
    /// Bytes staged on the node when the service went to sleep (images CRIU reads whole
    /// and the pages it restores eagerly), kept there while it sleeps.
    pub staged_bytes: Option<u64>,
    /// How long staging took (at sleep, off the wake's path).
    pub staged_s: Option<f64>,
    /// Armed wakes: how long the held restore took to set up (at sleep, off the wake's path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub armed_s: Option<f64>,
    /// Armed wakes: node memory the held restore occupied while it waited (tree and CRIU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_bytes: Option<u64>,
}

/// The incremental checkpoint after one request following a lazy wake with prefetch.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IncrementalMedians {
    pub checkpoint_s: Option<f64>,
    pub frozen_s: Option<f64>,
    pub pool_bytes_written: Option<u64>,
    /// Bytes the request touched (the sample service's `--touch`).
    pub touched_bytes: u64,
    /// Bytes the snapshot left in older generations.
    pub inherited_bytes: Option<u64>,
    /// CPU seconds of the whole cycle (lazy wake, the request, incremental checkpoint):
    /// torpor, CRIU and the pool.
    pub cycle_cpu_s: Option<f64>,
}

/// CRIU's own lazy restore from a local directory.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StockLazyMedians {
    pub restore_s: Option<f64>,
    pub first_response_s: Option<f64>,
}

#[derive(Debug, Default)]
pub struct LazySamples {
    first: Vec<f64>,
    restore: Vec<f64>,
    faulted: Vec<f64>,
    prefetched: Vec<f64>,
    staged_bytes: Vec<f64>,
    staged_s: Vec<f64>,
    armed_s: Vec<f64>,
    held_bytes: Vec<f64>,
}

impl LazySamples {
    pub fn medians(&self) -> LazyMedians {
        LazyMedians {
            first_response_s: median(&self.first),
            restore_s: median(&self.restore),
            faulted_bytes: median(&self.faulted).map(|m| m as u64),
            prefetched_bytes: median(&self.prefetched).map(|m| m as u64),
            staged_bytes: median(&self.staged_bytes).map(|m| m as u64),
            staged_s: median(&self.staged_s),
            armed_s: median(&self.armed_s),
            held_bytes: median(&self.held_bytes).map(|m| m as u64),
        }
    }
}

#[derive(Debug, Default)]
pub struct IncrementalSamples {
    checkpoint: Vec<f64>,
    frozen: Vec<f64>,
    written: Vec<f64>,
    inherited: Vec<f64>,
    cpu: Vec<f64>,
}

impl IncrementalSamples {
    pub fn medians(&self) -> IncrementalMedians {
        IncrementalMedians {
            checkpoint_s: median(&self.checkpoint),
            frozen_s: median(&self.frozen),
            pool_bytes_written: median(&self.written).map(|m| m as u64),
            touched_bytes: torpor_workload::DEFAULT_TOUCH,
            inherited_bytes: median(&self.inherited).map(|m| m as u64),
            cycle_cpu_s: median(&self.cpu),
        }
    }
}

#[derive(Debug, Default)]
pub struct StockLazySamples {
    restore: Vec<f64>,
    first: Vec<f64>,
}

impl StockLazySamples {
    pub fn medians(&self) -> StockLazyMedians {
        StockLazyMedians {
            restore_s: median(&self.restore),
            first_response_s: median(&self.first),
        }
    }
}

/// What torpor's lazy rounds measure.
#[derive(Debug, Default)]
pub struct LazyRounds {
    /// The first lazy wake after a full checkpoint (nothing recorded to prefetch).
    pub cold: LazySamples,
    /// The next one, with the working set recorded at the first pushed.
    pub warm: LazySamples,
    /// The one after, armed at sleep and released by the wake (prefetch as in `warm`).
    pub armed: LazySamples,
    /// The incremental checkpoint after the warm wake's request.
    pub inc: IncrementalSamples,
}

/// One torpor round: full checkpoint, lazy wake, incremental checkpoint, lazy wake with
/// prefetch, one request, incremental checkpoint, armed wake, one request. As in `torpor
/// up`, each snapshot is staged (and the last armed) for its wake when it is taken: its cost
/// counts in the cycle's CPU, not in the wake.
pub fn torpor_round(
    criu: &CriuBinary,
    exe: &Path,
    pool: &PoolProcess,
    size: u64,
    seed: u64,
    rounds: &mut LazyRounds,
) -> Result<(), ExperimentError> {
    let LazyRounds {
        cold,
        warm,
        armed,
        inc,
    } = rounds;
    let mut svc = SampleProcess::spawn(exe, size, seed)?;
    let name = format!("bench-lazy-{size}");
    let (ckpt, restore) = (CheckpointOptions::default(), RestoreOptions::default());
    let lazy = LazyOptions::default();
    let full = torpor_criu::checkpoint_to_pool(criu, svc.pid, &name, &pool.pools, &ckpt)?;
    svc.reap();
    let stage = |generation| {
        torpor_criu::lazy::stage_lazy(
            &name,
            Some(generation),
            &pool.pools,
            &restore.work_root,
            torpor_criu::lazy::MAX_STAGED_BYTES,
        )
    };
    let mut staged = stage(full.generation)?;

    let wakes = [cold, warm, armed];
    let last = wakes.len() - 1;
    for (wake, samples) in wakes.into_iter().enumerate() {
        let cpu0 = cpu_now(pool);
        samples.staged_bytes.push(staged.bytes as f64);
        samples.staged_s.push(staged.staged_s);
        let (t0, w) = if wake == last {
            let held = torpor_criu::armed::arm_lazy(
                criu,
                staged,
                &pool.pools,
                &restore,
                &lazy,
                torpor_criu::armed::ARM_TIMEOUT,
            )?;
            samples.armed_s.push(held.armed_s);
            samples.held_bytes.push(held.held_bytes() as f64);
            let t0 = Instant::now();
            (t0, held.resume()?)
        } else {
            let t0 = Instant::now();
            let w =
                torpor_criu::lazy::restore_lazy_staged(criu, staged, &pool.pools, &restore, &lazy)?;
            (t0, w)
        };
        let first = touch_response(svc.addr, t0);
        let stats = w.session.stats();
        let first = match first {
            Ok(f) => f,
            Err(e) => {
                kill_and_reap(w.report.pid);
                let _ = w.session.shutdown();
                return Err(e.into());
            }
        };
        samples.first.push(first.as_secs_f64());
        samples.restore.push(w.report.restore_s);
        samples.faulted.push(stats.faulted_bytes as f64);
        samples.prefetched.push(stats.prefetched_bytes as f64);
        let pid = w.report.pid;
        if wake == last {
            kill_and_reap(pid);
            let _ = w.session.shutdown();
            break;
        }
        let done = checkpoint_lazy_service(criu, pid, &name, &pool.pools, &ckpt, &w.session);
        let (report, increment) = match done {
            Ok(r) => r,
            Err(e) => {
                kill_and_reap(pid);
                let _ = w.session.shutdown();
                return Err(e.into());
            }
        };
        kill_and_reap(pid);
        let _ = w.session.shutdown();
        staged = stage(report.generation)?;
        let cpu = cpu_now(pool) - cpu0;
        if wake == 1 {
            inc.checkpoint.push(report.checkpoint_s);
            inc.frozen.extend(report.frozen_s);
            inc.written.push(report.pool_bytes as f64);
            inc.inherited.push(increment.inherited_bytes() as f64);
            inc.cpu.push(cpu);
        }
    }
    if let Ok(mut c) = pool.target.connect() {
        let _ = c.delete(&name, None);
    }
    Ok(())
}

/// One round of CRIU's own lazy restore: dump to a directory under `dir`, restore with
/// `criu lazy-pages`, first answer.
pub fn stock_round(
    criu: &CriuBinary,
    exe: &Path,
    dir: &Path,
    size: u64,
    seed: u64,
    s: &mut StockLazySamples,
) -> Result<(), ExperimentError> {
    let mut svc = SampleProcess::spawn(exe, size, seed)?;
    let images = tempfile::Builder::new()
        .prefix("torpor-bench-lazy-")
        .tempdir_in(dir)?;
    local::dump_to_dir(criu, svc.pid, images.path())?;
    svc.reap();
    let t0 = Instant::now();
    let (pid, wall, mut daemon) = local::restore_lazy_from_dir(criu, images.path(), &[svc.pid])?;
    let first = touch_response(svc.addr, t0);
    kill_and_reap(pid);
    let _ = daemon.kill();
    let _ = daemon.wait();
    s.restore.push(wall.as_secs_f64());
    s.first.push(first?.as_secs_f64());
    Ok(())
}
