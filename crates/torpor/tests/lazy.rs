//! Lazy wakes and incremental checkpoints with real CRIU through a real (sealed) pool, as
//! root: the memory a lazily restored service sees is exactly its own, page for page, over
//! several generations; the checkpoint after a lazy wake writes what the service touched and
//! inherits the rest; an incremental snapshot is never restored eagerly (it would miss the
//! inherited pages); and a pool that dies mid-wake kills the service instead of letting it
//! read zeros. Armed wakes (the restore run at sleep and held before the tasks resume) hold a
//! stopped tree until released, and giving one up leaves nothing behind.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use torpor_bench::harness::{kill_and_reap, PoolProcess, SampleProcess};
use torpor_criu::{
    checkpoint_to_pool, lazy::checkpoint_lazy_service, restore_from_pool, restore_lazy_from_pool,
    restore_streamed, CheckpointOptions, LazyOptions, LazyWake, RestoreError, RestoreOptions,
};
use torpor_testkit::{criu, exe, proc_state};
use torpor_workload::SampleClient;

fn setup() -> std::sync::MutexGuard<'static, ()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    torpor_testkit::criu_guard()
}

const MIB: u64 = 1 << 20;

/// Kills the restored tree however the test ends.
struct Restored(i32);

impl Drop for Restored {
    fn drop(&mut self) {
        kill_and_reap(self.0);
    }
}

/// A full checkpoint of `svc` into the pool as `name`; the service is gone after it.
fn put_to_sleep(
    mut svc: SampleProcess,
    pool: &PoolProcess,
    name: &str,
) -> Result<torpor_criu::CheckpointReport> {
    let r = checkpoint_to_pool(
        &criu(),
        svc.pid,
        name,
        &pool.pools,
        &CheckpointOptions::default(),
    )?;
    svc.reap();
    Ok(r)
}

/// A lazy restore with the default options.
fn lazy_wake(pool: &PoolProcess, name: &str, generation: Option<u64>) -> Result<LazyWake> {
    Ok(restore_lazy_from_pool(
        &criu(),
        name,
        generation,
        &pool.pools,
        &RestoreOptions::default(),
        &LazyOptions::default(),
    )?)
}

#[test]
fn lazy_wakes_keep_memory_exact_and_checkpoint_only_what_was_touched() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 1024 * MIB)?;
    // The same service run directly is the reference for every answer.
    let reference = SampleProcess::spawn(exe(), 256 * MIB, 11)?;
    let _reference_guard = Restored(reference.pid);
    let mut refc = SampleClient::connect(reference.addr)?;
    let svc = SampleProcess::spawn(exe(), 256 * MIB, 11)?;
    let addr = svc.addr;
    let name = "lazy-exact";
    let full = put_to_sleep(svc, &pool, name)?;
    ensure!(full.pool_bytes >= 256 * MIB, "the first checkpoint is full");

    let mut generation = full.generation;
    for round in 0..3 {
        let wake = lazy_wake(&pool, name, Some(generation))
            .with_context(|| format!("lazy wake {round}"))?;
        let guard = Restored(wake.report.pid);
        let mut c = SampleClient::connect(addr)?;
        ensure!(
            c.call("TOUCH")? == refc.call("TOUCH")?,
            "round {round}: TOUCH answered as the reference did"
        );
        let stats = wake.session.stats();
        ensure!(
            stats.faulted_bytes + stats.prefetched_bytes >= 16 * MIB,
            "round {round}: the touched 16 MiB came from the pool: {stats:?}"
        );
        ensure!(
            stats.remaining_bytes >= 200 * MIB,
            "round {round}: what was not touched stayed in the pool: {stats:?}"
        );
        if round > 0 {
            // The push runs beside the request's own faults (faults first): together they
            // brought the hot set in.
            ensure!(
                wake.working_set_bytes >= 16 * MIB && stats.prefetched_bytes > 0,
                "round {round}: the working set recorded at the previous wake was pushed: {stats:?}"
            );
        }
        drop(c);
        let (report, increment) = checkpoint_lazy_service(
            &criu(),
            wake.report.pid,
            name,
            &pool.pools,
            &CheckpointOptions::default(),
            &wake.session,
        )?;
        drop(guard);
        wake.session.shutdown()?;
        ensure!(
            report.pool_bytes <= 64 * MIB,
            "round {round}: the incremental checkpoint wrote {} bytes",
            report.pool_bytes
        );
        ensure!(
            increment.inherited_bytes() >= 200 * MIB,
            "round {round}: the snapshot inherits the untouched memory: {}",
            increment.inherited_bytes()
        );
        generation = report.generation;
    }

    // CRIU reading the images itself cannot restore an increment (it would leave the
    // inherited pages zero) and refuses it ...
    match restore_streamed(
        &criu(),
        name,
        Some(generation),
        &pool.pools,
        &RestoreOptions::default(),
    ) {
        Err(RestoreError::LazyOnly { .. }) => {}
        other => anyhow::bail!("a streamed restore of an increment must be refused, got {other:?}"),
    }
    // ... while torpor's eager restore copies every page in, inherited ones included, before
    // the tasks run, and leaves nothing to serve afterwards.
    {
        let eager = restore_from_pool(
            &criu(),
            name,
            Some(generation),
            &pool.pools,
            &RestoreOptions::default(),
        )?;
        let _guard = Restored(eager.pid);
        ensure!(eager.filled, "restored through userfaultfd: {eager:?}");
        let mut c = SampleClient::connect(addr)?;
        ensure!(
            c.call("SUM")? == refc.call("SUM")?,
            "an eagerly restored increment holds exactly the reference's memory"
        );
    }

    // The last generation, restored lazily, holds exactly the reference's memory: every page,
    // touched or inherited through three generations.
    let wake = lazy_wake(&pool, name, Some(generation))?;
    let _guard = Restored(wake.report.pid);
    let mut c = SampleClient::connect(addr)?;
    ensure!(
        c.call("SUM")? == refc.call("SUM")?,
        "all memory identical to the reference"
    );
    Ok(())
}

#[test]
fn a_pool_that_dies_during_a_lazy_wake_kills_the_service_instead_of_zero_filling() -> Result<()> {
    let _g = setup();
    let mut pool = PoolProcess::spawn(exe(), 512 * MIB)?;
    let svc = SampleProcess::spawn(exe(), 128 * MIB, 3)?;
    let (addr, name) = (svc.addr, "lazy-pool-dies");
    put_to_sleep(svc, &pool, name)?;
    let wake = lazy_wake(&pool, name, None)?;
    let pid = wake.report.pid;
    let _guard = Restored(pid);
    pool.crash();
    // SUM reads every page: most are still in the (now dead) pool.
    let answer = SampleClient::connect(addr).and_then(|mut c| c.call("SUM"));
    let expected = torpor_workload::expected_sum(128 * MIB, 3);
    ensure!(
        answer.as_ref().map_or(true, |a| *a == expected),
        "the service never answers from zero-filled memory: {answer:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while torpor_criu::procs::pid_in_use(pid) && Instant::now() < deadline {
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = wake.session.stats();
    // What the session and the process looked like say which side did not act (a session
    // that never failed, or a process that outlived its kill).
    ensure!(
        !torpor_criu::procs::pid_in_use(pid),
        "the tree was killed: answer {answer:?}, state {:?}, session {stats:?}",
        proc_state(pid)
    );
    ensure!(stats.failed.is_some(), "the session says why: {stats:?}");
    let _ = wake.session.shutdown();
    Ok(())
}

/// Stages and arms generation `generation` of `name` as `torpor up` does at sleep.
fn arm(pool: &PoolProcess, name: &str, generation: u64) -> Result<torpor_criu::armed::ArmedWake> {
    let staged = torpor_criu::lazy::stage_lazy(
        name,
        Some(generation),
        &pool.pools,
        &std::env::temp_dir(),
        torpor_criu::lazy::MAX_STAGED_BYTES,
    )?;
    Ok(torpor_criu::armed::arm_lazy(
        &criu(),
        staged,
        &pool.pools,
        &RestoreOptions::default(),
        &LazyOptions::default(),
        torpor_criu::armed::ARM_TIMEOUT,
    )?)
}

#[test]
fn an_armed_wake_holds_a_stopped_tree_until_released_and_then_answers_exactly() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 512 * MIB)?;
    let reference = SampleProcess::spawn(exe(), 128 * MIB, 5)?;
    let _reference_guard = Restored(reference.pid);
    let mut refc = SampleClient::connect(reference.addr)?;
    let svc = SampleProcess::spawn(exe(), 128 * MIB, 5)?;
    let (addr, name) = (svc.addr, "lazy-armed");
    let full = put_to_sleep(svc, &pool, name)?;

    let armed = arm(&pool, name, full.generation)?;
    let root = armed.root();
    let _guard = Restored(root);
    ensure!(
        proc_state(root) == Some('t'),
        "the held tree is stopped before it resumes: state {:?}",
        proc_state(root)
    );
    let held = armed.held_bytes();
    ensure!(
        held > 0 && held < 64 * MIB,
        "a held restore keeps little of the 128 MiB on the node: {held} bytes"
    );
    let wake = armed.resume()?;
    ensure!(
        wake.report.pid == root,
        "the held tree is the one that runs"
    );
    let mut c = SampleClient::connect(addr)?;
    ensure!(
        c.call("TOUCH")? == refc.call("TOUCH")? && c.call("SUM")? == refc.call("SUM")?,
        "the released tree answers as the reference does"
    );
    drop(c);
    drop(_guard);
    let _ = wake.session.shutdown();
    Ok(())
}

#[test]
fn giving_up_an_armed_wake_kills_the_held_tree_and_loses_nothing() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 512 * MIB)?;
    let svc = SampleProcess::spawn(exe(), 64 * MIB, 9)?;
    let (addr, name) = (svc.addr, "lazy-armed-abort");
    let full = put_to_sleep(svc, &pool, name)?;

    let armed = arm(&pool, name, full.generation)?;
    let root = armed.root();
    armed.abort();
    let deadline = Instant::now() + Duration::from_secs(10);
    while torpor_criu::procs::pid_in_use(root) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    ensure!(
        !torpor_criu::procs::pid_in_use(root),
        "the held tree is gone: {:?}",
        proc_state(root)
    );
    // The snapshot is untouched: the same generation wakes and answers with its state.
    let wake = lazy_wake(&pool, name, Some(full.generation))?;
    let _guard = Restored(wake.report.pid);
    let mut c = SampleClient::connect(addr)?;
    ensure!(
        c.call("SUM")? == torpor_workload::expected_sum(64 * MIB, 9),
        "the snapshot given up on restores whole"
    );
    drop(c);
    Ok(())
}
