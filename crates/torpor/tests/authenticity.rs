//! Snapshot authenticity and replication, with real CRIU and real `torpor pool` processes:
//! a node restores only what its own key sealed, every image byte checked before CRIU may
//! finish with it; a checkpoint counts only once its write quorum of pools committed; a pool
//! killed with SIGKILL loses no sleeping service when a replica holds it.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use torpor_bench::harness::{kill_and_reap, PoolProcess, SampleProcess};
use torpor_criu::{
    checkpoint_to_pool, procs, restore_from_pool, CheckpointError, CheckpointOptions, PoolTarget,
    Pools, RestoreError, RestoreOptions,
};
use torpor_image::{seal::SealError, NodeKey};
use torpor_workload::{expected_sum, SampleClient};

use torpor_testkit::{criu, criu_guard as setup, exe};

const MIB: u64 = 1 << 20;

fn restore(name: &str, pools: &Pools) -> Result<torpor_criu::RestoreReport, RestoreError> {
    restore_from_pool(&criu(), name, None, pools, &RestoreOptions::default())
}

/// Every image file of the newest generation of `name`, as a token holder can read them.
fn download(pool: &PoolTarget, name: &str) -> Result<(torpor_image::Manifest, Vec<Vec<u8>>)> {
    let mut c = pool.connect()?;
    let m = c.manifest(name, None)?;
    let mut files = Vec::new();
    for f in &m.files {
        let mut bytes = Vec::new();
        c.get_file(name, m.generation, &f.name, |b| {
            bytes.extend_from_slice(b);
            Ok(())
        })?;
        files.push(bytes);
    }
    Ok((m, files))
}

/// Uploads files under `name` as `generation` with whatever seal the forger has.
fn upload(
    pool: &PoolTarget,
    manifest: &torpor_image::Manifest,
    files: &[Vec<u8>],
    generation: u64,
) -> Result<u64> {
    let mut c = pool.connect()?;
    c.put_begin(&manifest.name, manifest.meta.clone(), None)?;
    for (id, (f, bytes)) in manifest.files.iter().zip(files).enumerate() {
        c.file_open(id as u32, &f.name)?;
        for piece in bytes.chunks(torpor_image::CHUNK_SIZE as usize) {
            c.file_data(id as u32, piece)?;
        }
        c.file_close(id as u32, bytes.len() as u64)?;
    }
    Ok(c.commit(Some(generation), manifest.seal.clone())?
        .generation)
}

#[test]
fn a_snapshot_sealed_by_another_node_is_refused_and_nothing_of_it_runs() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 64 * MIB)?;
    let mut svc = SampleProcess::spawn(exe(), 8 * MIB, 1)?;
    checkpoint_to_pool(
        &criu(),
        svc.pid,
        "svc",
        &pool.pools,
        &CheckpointOptions::default(),
    )?;
    svc.reap();
    let stranger = Pools::single(pool.target.clone(), Arc::new(NodeKey::generate()));
    let err = restore("svc", &stranger).unwrap_err();
    ensure!(
        matches!(
            err,
            RestoreError::Unverified {
                source: SealError::OtherKey { .. },
                ..
            }
        ),
        "{err:#?}"
    );
    ensure!(!procs::pid_in_use(svc.pid), "nothing was restored");
    // The node that sealed it restores it.
    let r = restore("svc", &pool.pools)?;
    kill_and_reap(r.pid);
    Ok(())
}

#[test]
fn altered_memory_and_replayed_generations_are_refused_before_criu_can_use_them() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 128 * MIB)?;
    let mut svc = SampleProcess::spawn(exe(), 16 * MIB, 2)?;
    let r = checkpoint_to_pool(
        &criu(),
        svc.pid,
        "svc",
        &pool.pools,
        &CheckpointOptions::default(),
    )?;
    svc.reap();
    let (manifest, mut files) = download(&pool.target, "svc")?;
    ensure!(
        manifest.seal.is_some(),
        "the checkpoint sealed its snapshot"
    );

    // Replayed under a newer number (a token holder commits the same bytes and seal): the
    // seal binds the generation.
    let replayed = upload(&pool.target, &manifest, &files, r.generation + 1)?;
    let err = restore("svc", &pool.pools).unwrap_err();
    ensure!(
        matches!(
            err,
            RestoreError::Unverified {
                source: SealError::BadMac,
                ..
            }
        ),
        "generation {replayed}: {err:#?}"
    );

    // The same generation on a pool that never saw it (a replaced or restarted pool), with
    // the original seal but one flipped byte of memory: the seal verifies, the bytes do not.
    let pages = manifest
        .files
        .iter()
        .enumerate()
        .filter(|(_, f)| f.name.starts_with("pages-"))
        .max_by_key(|(_, f)| f.size)
        .map(|(i, _)| i)
        .context("a pages image")?;
    let mid = files[pages].len() / 2;
    files[pages][mid] ^= 0x01;
    let forged_pool = PoolProcess::spawn(exe(), 128 * MIB)?;
    upload(&forged_pool.target, &manifest, &files, r.generation)?;
    let victim = Pools {
        key: pool.pools.key.clone(),
        ..Pools::single(forged_pool.target.clone(), Arc::new(NodeKey::generate()))
    };
    let err = restore("svc", &victim).unwrap_err();
    ensure!(
        matches!(
            err,
            RestoreError::Unverified {
                source: SealError::FileMismatch { .. },
                ..
            }
        ),
        "{err:#?}"
    );
    ensure!(
        !procs::pid_in_use(svc.pid),
        "nothing of the altered snapshot runs"
    );
    Ok(())
}

#[test]
fn a_pool_killed_with_sigkill_loses_no_sleeping_service() -> Result<()> {
    let _g = setup();
    let mut a = PoolProcess::spawn(exe(), 64 * MIB)?;
    let b = PoolProcess::spawn(exe(), 64 * MIB)?;
    let pools = Pools {
        replicas: vec![a.target.clone(), b.target.clone()],
        write_quorum: 2,
        key: Some(Arc::new(NodeKey::generate())),
    };
    let mut svc = SampleProcess::spawn(exe(), 16 * MIB, 3)?;
    let before = SampleClient::connect(svc.addr)?.call("SUM")?;
    let r = checkpoint_to_pool(
        &criu(),
        svc.pid,
        "svc",
        &pools,
        &CheckpointOptions::default(),
    )?;
    svc.reap();
    ensure!(r.replicas == 2, "both pools committed: {}", r.replicas);
    for p in [&a.target, &b.target] {
        let m = p.connect()?.manifest("svc", None)?;
        ensure!(
            m.generation == r.generation,
            "same generation on every replica"
        );
    }
    a.crash();
    let restored = restore("svc", &pools)?;
    ensure!(restored.replica == 1, "served by the replica");
    let sum = SampleClient::connect_within(svc.addr, std::time::Duration::from_secs(5))
        .and_then(|mut c| c.call("SUM"));
    kill_and_reap(restored.pid);
    ensure!(
        sum? == before && before == expected_sum(16 * MIB, 3),
        "state kept"
    );
    Ok(())
}

#[test]
fn without_its_write_quorum_a_checkpoint_fails_and_the_service_keeps_running() -> Result<()> {
    let _g = setup();
    let a = PoolProcess::spawn(exe(), 64 * MIB)?;
    let dead = PoolTarget::new(
        torpor_pool::PoolAddr::Unix("/nonexistent/torpor-pool.sock".into()),
        "",
    );
    let mut pools = Pools {
        replicas: vec![a.target.clone(), dead],
        write_quorum: 2,
        key: Some(Arc::new(NodeKey::generate())),
    };
    let mut svc = SampleProcess::spawn(exe(), 8 * MIB, 4)?;
    let err = checkpoint_to_pool(
        &criu(),
        svc.pid,
        "svc",
        &pools,
        &CheckpointOptions::default(),
    )
    .unwrap_err();
    ensure!(matches!(err, CheckpointError::Pool(_)), "{err:#?}");
    ensure!(
        SampleClient::connect(svc.addr)?.call("PING")? == "PONG",
        "the service keeps serving"
    );
    ensure!(a.target.connect()?.list()?.is_empty(), "nothing committed");
    // With a quorum of one the live pool is enough.
    pools.write_quorum = 1;
    let r = checkpoint_to_pool(
        &criu(),
        svc.pid,
        "svc",
        &pools,
        &CheckpointOptions::default(),
    )?;
    svc.reap();
    ensure!(r.replicas == 1, "{}", r.replicas);
    let restored = restore("svc", &pools)?;
    kill_and_reap(restored.pid);
    Ok(())
}

#[test]
fn a_chunk_corrupted_on_one_replicas_disk_is_never_served_and_the_other_replica_restores(
) -> Result<()> {
    let _g = setup();
    // Replica a spills its least recently used snapshot to disk when a second one arrives.
    let spill = tempfile::tempdir()?;
    let a = PoolProcess::spawn_spilling(exe(), 40 * MIB, Some(spill.path()))?;
    let b = PoolProcess::spawn(exe(), 128 * MIB)?;
    let pools = Pools {
        replicas: vec![a.target.clone(), b.target.clone()],
        write_quorum: 2,
        key: Some(Arc::new(NodeKey::generate())),
    };
    let mut victim = SampleProcess::spawn(exe(), 24 * MIB, 5)?;
    let before = SampleClient::connect(victim.addr)?.call("SUM")?;
    checkpoint_to_pool(
        &criu(),
        victim.pid,
        "victim",
        &pools,
        &CheckpointOptions::default(),
    )?;
    victim.reap();
    let mut pusher = SampleProcess::spawn(exe(), 24 * MIB, 6)?;
    checkpoint_to_pool(
        &criu(),
        pusher.pid,
        "pusher",
        &pools,
        &CheckpointOptions::default(),
    )?;
    pusher.reap();
    let file = std::fs::read_dir(spill.path().join("victim"))?
        .next()
        .context("victim spilled to a's disk")??
        .path();
    let mut bytes = std::fs::read(&file)?;
    let at = bytes.len() - 4096 * 100;
    bytes[at] ^= 0xff;
    std::fs::write(&file, bytes)?;
    let restored = restore("victim", &pools)?;
    let sum = SampleClient::connect_within(victim.addr, std::time::Duration::from_secs(5))
        .and_then(|mut c| c.call("SUM"));
    kill_and_reap(restored.pid);
    ensure!(
        restored.replica == 1,
        "the corrupt replica did not serve it"
    );
    ensure!(sum? == before, "state kept");
    Ok(())
}
