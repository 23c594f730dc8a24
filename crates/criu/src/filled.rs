//! Eager restore through userfaultfd: every page of the snapshot is in the tree before any
//! of its tasks runs, as with CRIU's own eager restore, but copied in by torpor's lazy-pages
//! server rather than read by CRIU.
//!
//! Why: CRIU's eager restore (from a directory, or `--stream` from the pool) reads each page
//! into memory that faults in one 4 KiB page at a time and is zeroed before it is
//! overwritten; on this class of machine that, not the transfer, is most of a large
//! restore. `UFFDIO_COPY` allocates the destination pages without zeroing them and installs
//! a whole range per call, from a buffer that stays in cache. So the restore runs CRIU with
//! `--lazy-pages` and holds it at `pre-resume` ([`crate::armed`]): once every task is rebuilt
//! and CRIU's finish marker reached the server, the server copies every page still in the
//! pool, and only then are the tasks let go. What the tree sees is what an eager restore
//! gives it; nothing is left for a later fault and no connection to the pool outlives the
//! restore.
//!
//! It needs what a lazy restore needs (userfaultfd for torpor's own identity, a snapshot
//! restored as torpor's own user); otherwise, or when it fails before the tasks run, the
//! caller restores with `--stream` ([`crate::restore`]), which needs neither.

use std::time::Instant;

use tracing::info;

use crate::{
    armed::{arm_lazy, ARM_TIMEOUT},
    binary::CriuBinary,
    lazy::{stage_lazy, LazyOptions, FILL_TIMEOUT},
    replicas::Pools,
    restore::{RestoreError, RestoreOptions, RestoreReport},
};

/// Restores generation `generation` (the newest when `None`) of `name` with all of its memory
/// copied in before its tasks resume. On failure nothing of the tree is left.
pub fn restore_filled(
    criu: &CriuBinary,
    name: &str,
    generation: Option<u64>,
    pools: &Pools,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let start = Instant::now();
    let staged = stage_lazy(name, generation, pools, &opts.work_root, 0)?;
    let lazy = LazyOptions {
        prefetch: false,
        background_fill: false,
        arm: true,
        ..LazyOptions::default()
    };
    let armed = arm_lazy(criu, staged, pools, opts, &lazy, ARM_TIMEOUT)?;
    let armed_s = start.elapsed().as_secs_f64();
    let armed = armed.fill_all(FILL_TIMEOUT)?;
    let filled_s = start.elapsed().as_secs_f64() - armed_s;
    let wake = armed.resume()?;
    let stats = wake
        .session
        .shutdown()
        .map_err(|source| RestoreError::Lazy {
            name: name.to_string(),
            source,
        })?;
    let mut report = wake.report;
    report.restore_s = start.elapsed().as_secs_f64();
    report.bytes_fetched += stats.background_bytes;
    report.filled = true;
    info!(
        name,
        generation = report.generation,
        pid = report.pid,
        secs = report.restore_s,
        armed_s,
        filled_s,
        filled_bytes = stats.background_bytes,
        "restored with every page copied in before it ran"
    );
    Ok(report)
}
