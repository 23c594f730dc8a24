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
    let (ok, pid) = run_restore(criu, dir, &[]);
    let wall = start.elapsed();
    match (ok, pid) {
        (Ok(true), Some(pid)) => Ok((pid, wall)),
        (r, _) => {
            r?;
            Err(LocalCriuError::Failed {
                action: "restore",
                log: log_tail(&dir.join("restore.log"), 12),
            })
        }
    }
}

/// `criu restore` (detached, established connections kept) of the images in `dir`, with
/// `extra` flags: whether CRIU succeeded, and the root's PID from its PID file.
fn run_restore(
    criu: &CriuBinary,
    dir: &Path,
    extra: &[&str],
) -> (Result<bool, CriuError>, Option<i32>) {
    let pidfile = dir.join("restored.pid");
    let ok = criu.run(
        criu.command()
            .args(["restore", "--tcp-established", "--restore-detached", "-v4"])
            .args(extra)
            .arg("--images-dir")
            .arg(dir)
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--log-file")
            .arg("restore.log"),
    );
    let pid = fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    (ok, pid)
}

/// Stock CRIU's own lazy restore from `dir`: `criu lazy-pages` serves the memory from the
/// images (and fills the rest in the background) while `criu restore --lazy-pages` brings the
/// tree up. Returns the root's PID, the restore's wall time and the daemon (which exits once
/// every page is in; the caller waits for it or kills it).
pub fn restore_lazy_from_dir(
    criu: &CriuBinary,
    dir: &Path,
    pids: &[i32],
) -> Result<(i32, Duration, std::process::Child), LocalCriuError> {
    use std::{io::Read, os::fd::AsRawFd};
    procs::wait_pids_free(pids, Duration::from_secs(10)).map_err(LocalCriuError::PidBusy)?;
    let start = Instant::now();
    // The daemon says it listens by writing one byte to its status fd.
    let (ready_rx, ready_tx) = nix::unistd::pipe().map_err(|e| LocalCriuError::Dir(e.into()))?;
    let ready_rx = std::fs::File::from(ready_rx);
    let mut daemon_cmd = criu.command();
    daemon_cmd
        .args(["lazy-pages", "-v4"])
        .arg("--images-dir")
        .arg(dir)
        .arg("--log-file")
        .arg("lazy-pages.log")
        .arg("--status-fd")
        .arg(ready_tx.as_raw_fd().to_string());
    let tx_fd = ready_tx.as_raw_fd();
    // SAFETY: only fcntl on the pipe's fd, which is async-signal-safe, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut daemon_cmd, move || {
            use nix::fcntl::{fcntl, FcntlArg, FdFlag};
            fcntl(tx_fd, FcntlArg::F_SETFD(FdFlag::empty()))
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut daemon = criu.spawn(&mut daemon_cmd)?;
    drop(ready_tx);
    let mut byte = [0u8; 1];
    let listening = (&ready_rx).read(&mut byte).map_err(LocalCriuError::Dir)?;
    drop(ready_rx);
    if listening == 0 {
        let _ = daemon.wait();
        return Err(LocalCriuError::Failed {
            action: "lazy-pages",
            log: log_tail(&dir.join("lazy-pages.log"), 12),
        });
    }
    let (ok, pid) = run_restore(criu, dir, &["--lazy-pages"]);
    let wall = start.elapsed();
    match (ok, pid) {
        (Ok(true), Some(pid)) => Ok((pid, wall, daemon)),
        (r, _) => {
            let _ = daemon.kill();
            let _ = daemon.wait();
            r?;
            Err(LocalCriuError::Failed {
                action: "restore --lazy-pages",
                log: log_tail(&dir.join("restore.log"), 12),
            })
        }
    }
}
