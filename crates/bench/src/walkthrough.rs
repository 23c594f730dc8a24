//! `torpor demo --walkthrough`: checkpoint and restore by hand, step by step. Starts a pool, starts a sample service
//! holding seeded memory, checkpoints it into the pool (the process is gone), restores it
//! from the pool, and shows that its memory, its counter and an open TCP connection all
//! survived, with the time each step took.

use std::time::{Duration, Instant};

use torpor_criu::{CheckpointOptions, CriuBinary, RestoreOptions};
use torpor_image::format_bytes;
use torpor_workload::SampleClient;

use crate::harness::{become_subreaper, first_response, kill_and_reap, PoolProcess, SampleProcess};
use crate::ExperimentError;

/// Runs the walkthrough with a sample service holding `memory` bytes, printing each step.
pub fn run(memory: u64) -> Result<(), ExperimentError> {
    become_subreaper()?;
    let exe = std::env::current_exe()?;
    let criu = CriuBinary::locate()?;
    println!("torpor demo: CRIU {} found", criu.version()?);

    let pool = PoolProcess::spawn(&exe, 2 * memory + (256 << 20))?;
    println!(
        "1. memory pool started on {} ({} RAM tier, pre-faulted; ready in {:.2} s)",
        pool.target.addr,
        format_bytes(2 * memory + (256 << 20)),
        pool.startup.as_secs_f64()
    );

    let started = Instant::now();
    let mut svc = SampleProcess::spawn(&exe, memory, 42)?;
    let mut conn = SampleClient::connect(svc.addr)?;
    let sum_before = conn.call("SUM")?;
    let count_before = conn.count()?;
    println!(
        "2. sample service pid {} on {} holds {} of seeded memory (ready in {:.2} s): checksum {}, counter {}",
        svc.pid,
        svc.addr,
        format_bytes(memory),
        started.elapsed().as_secs_f64(),
        sum_before,
        count_before
    );

    let r = torpor_criu::checkpoint_to_pool(
        &criu,
        svc.pid,
        "demo",
        &pool.pools,
        &CheckpointOptions::default(),
    )?;
    svc.reap();
    println!(
        "3. checkpointed into the pool in {:.3} s (frozen {}): {} in {} image files, at most {} staged on this node; pid {} is gone",
        r.checkpoint_s,
        r.frozen_s.map(|f| format!("{f:.3} s")).unwrap_or_else(|| "n/a".into()),
        format_bytes(r.pool_bytes),
        r.files,
        format_bytes(r.peak_staging_bytes),
        r.root_pid
    );
    let list = pool.target.connect()?.list()?;
    for s in &list {
        println!(
            "   pool holds {} generation {}: {} in its {} tier",
            s.name,
            s.generation,
            format_bytes(s.bytes),
            s.tier
        );
    }

    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let restored = torpor_criu::restore_from_pool(
        &criu,
        "demo",
        None,
        &pool.pools,
        &RestoreOptions::default(),
    )?;
    let first = first_response(svc.addr, t0)?;
    println!(
        "4. restored from the pool as pid {} in {:.3} s; first answer {:.3} s after the restore began",
        restored.pid,
        restored.restore_s,
        first.as_secs_f64()
    );
    let sum_after = conn.call("SUM")?;
    let count_after = conn.count()?;
    println!(
        "5. on the connection opened before the checkpoint: checksum {} ({}), counter {} (it keeps counting)",
        sum_after,
        if sum_after == sum_before { "identical" } else { "DIFFERENT" },
        count_after
    );
    kill_and_reap(restored.pid);
    if sum_after != sum_before || count_after < count_before {
        return Err(ExperimentError::Mismatch(
            "the restored service does not match the one checkpointed".into(),
        ));
    }
    println!("demo done: the service left this node for the pool and came back intact");
    Ok(())
}
