//! Stock CRIU with images in a local directory (e.g. /dev/shm): the baseline torpor's
//! benchmarks compare against, measured in the same run.

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    binary::{log_tail, CriuBinary, CriuError},
    procs,
    stats::parse_dump_stats,
};

/// Why a local dump or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalCriuError {
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("CRIU {action} failed:\n{log}")]
    Failed { action: &'static str, log: String },
    #[error("pid {0} is still in use; cannot restore")]
    PidBusy(i32),
    #[error("images directory is unusable")]
    Dir(#[source] std::io::Error),
}

/// Outcome of a local dump.
#[derive(Debug, Clone, Copy)]
pub struct LocalDump {
    pub wall: Duration,
    pub frozen: Option<Duration>,
    /// Bytes of images written.
    pub bytes: u64,
}

/// `criu dump` of the tree at `pid` into `dir` (which must exist and be empty).
pub fn dump_to_dir(criu: &CriuBinary, pid: i32, dir: &Path) -> Result<LocalDump, LocalCriuError> {
    let start = Instant::now();
    let ok = criu.run(
        criu.command()
            .args([
                "dump",
                "--tcp-established",
                "-v4",
                "--tree",
                &pid.to_string(),
            ])
            .arg("--images-dir")
            .arg(dir)
            .arg("--log-file")
            .arg("dump.log"),
    )?;
    let wall = start.elapsed();
    if !ok {
        return Err(LocalCriuError::Failed {
            action: "dump",
            log: log_tail(&dir.join("dump.log"), 12),
        });
    }
    let frozen = fs::read(dir.join("stats-dump"))
        .ok()
        .and_then(|b| parse_dump_stats(&b))
        .map(|s| s.frozen);
    let bytes = fs::read_dir(dir)
        .map_err(LocalCriuError::Dir)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".img"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    Ok(LocalDump {
        wall,
        frozen,
        bytes,
    })
}

/// `criu restore --restore-detached` from `dir`; returns the root PID and the wall time.
/// Waits first for `pids` to be free, like the pool restore does.
pub fn restore_from_dir(
    criu: &CriuBinary,
    dir: &Path,
    pids: &[i32],
) -> Result<(i32, Duration), LocalCriuError> {
    procs::wait_pids_free(pids, Duration::from_secs(10)).map_err(LocalCriuError::PidBusy)?;
    let start = Instant::now();
    let pidfile = dir.join("restored.pid");
    let ok = criu.run(
        criu.command()
            .args(["restore", "--tcp-established", "--restore-detached", "-v4"])
            .arg("--images-dir")
            .arg(dir)
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--log-file")
            .arg("restore.log"),
    )?;
    let wall = start.elapsed();
    let pid = fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    match (ok, pid) {
        (true, Some(pid)) => Ok((pid, wall)),
        _ => Err(LocalCriuError::Failed {
            action: "restore",
            log: log_tail(&dir.join("restore.log"), 12),
        }),
    }
}
