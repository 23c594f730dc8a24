//! OCI containers through runc (crun 1.8 cannot checkpoint on these hosts). runc drives CRIU
//! itself (`runc --criu`), writing the image set to a directory; torpor keeps that
//! directory on a tmpfs only between the dump and the upload to the pool (and between the
//! download and the restore), then removes it. The container is dumped with
//! `--leave-running` and killed only once the pool has committed the snapshot, so a failed
//! upload leaves it serving. runc has no `--tcp-close`: a container that still holds an
//! established TCP connection fails to checkpoint and keeps running (the gate closes its own
//! connections before, so this concerns foreign ones only).

use std::{
    fs,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use thiserror::Error;
use torpor_image::{manifest::SnapshotMeta, seal::FileDigest, SealError};
use torpor_pool::ClientError;

use crate::{
    binary::CriuBinary,
    replicas::{find_verified, FetchError, Pools, ReplicatedUpload},
};

/// Why a runc operation failed.
#[derive(Debug, Error)]
pub enum RuncError {
    #[error("runc {action} {id} failed: {stderr}")]
    Failed {
        action: &'static str,
        id: String,
        stderr: String,
    },
    #[error("running runc failed")]
    Spawn(#[source] io::Error),
    #[error("staging directory")]
    Staging(#[source] io::Error),
    #[error("pool transfer of {name:?} failed")]
    Pool {
        name: String,
        #[source]
        source: FetchError,
    },
    #[error("runc wrote no usable pid file for {0}")]
    NoPid(String),
}

impl RuncError {
    /// The snapshot is gone or untrustworthy on every replica.
    pub fn snapshot_lost(&self) -> bool {
        matches!(self, RuncError::Pool { source, .. } if source.is_lost())
    }

    /// Adds the end of CRIU's log (about to be removed with its work directory).
    fn with_log(self, log: &Path) -> RuncError {
        match self {
            RuncError::Failed { action, id, stderr } => RuncError::Failed {
                action,
                id,
                stderr: format!(
                    "{stderr}\nCRIU's log says:\n{}",
                    crate::binary::log_tail(log, 8)
                ),
            },
            other => other,
        }
    }
}

/// A container runtime invocation: runc plus the CRIU it should use.
#[derive(Debug, Clone)]
pub struct Runc {
    pub runc: PathBuf,
    /// Executable CRIU for `runc --criu` (see [`CriuBinary::executable`]).
    pub criu: PathBuf,
    /// Where images are staged between runc and the pool (a tmpfs).
    pub staging: PathBuf,
}

impl Runc {
    /// runc from PATH with `criu` made executable under `dir`.
    pub fn new(criu: &CriuBinary, dir: &Path) -> io::Result<Runc> {
        Ok(Runc {
            runc: PathBuf::from("runc"),
            criu: criu.executable(dir)?,
            staging: PathBuf::from("/dev/shm"),
        })
    }

    fn run(
        &self,
        action: &'static str,
        id: &str,
        args: &[&str],
        extra: &[&Path],
    ) -> Result<(), RuncError> {
        // A detached container inherits runc's stdio, and CRIU must find it again at the
        // checkpoint: so /dev/null, never a pipe or a temporary file; runc's own errors go
        // to its --log file.
        let logs = tempfile::tempdir().map_err(RuncError::Staging)?;
        let log = logs.path().join("runc.log");
        let status = Command::new(&self.runc)
            .arg("--log")
            .arg(&log)
            .arg("--criu")
            .arg(&self.criu)
            .args(args)
            .args(extra)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(RuncError::Spawn)?;
        if !status.success() {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let stderr = text
                .lines()
                .filter(|l| l.contains("level=error"))
                .collect::<Vec<_>>()
                .join("\n");
            return Err(RuncError::Failed {
                action,
                id: id.to_string(),
                stderr: if stderr.is_empty() {
                    text.trim().to_string()
                } else {
                    stderr
                },
            });
        }
        Ok(())
    }

    /// Starts the bundle detached as container `id`; returns its init PID. A stale
    /// container of that id is removed first.
    pub fn start(&self, id: &str, bundle: &Path) -> Result<i32, RuncError> {
        let _ = self.delete(id);
        let dir = tempfile::tempdir().map_err(RuncError::Staging)?;
        let pidfile = dir.path().join("pid");
        self.run(
            "run",
            id,
            &["run", "--detach", "--bundle"],
            &[bundle, Path::new("--pid-file"), &pidfile],
        )?;
        read_pid(&pidfile, id)
    }

    /// Kills and removes container `id`.
    pub fn delete(&self, id: &str) -> Result<(), RuncError> {
        self.run("delete", id, &["delete", "--force"], &[])
    }

    /// Checkpoints container `id` into the pool as `name`; the container is removed only
    /// after the pool committed. It is paused (frozen) from before the dump until then, so
    /// nothing it does after the dump is lost with it; if anything fails it is resumed and
    /// keeps running. Returns (generation, bytes, seconds).
    pub fn checkpoint_to_pool(
        &self,
        id: &str,
        name: &str,
        pools: &Pools,
    ) -> Result<(u64, u64, f64), RuncError> {
        let t0 = Instant::now();
        self.run("pause", id, &["pause"], &[])?;
        let committed = self.dump_paused(id, name, pools);
        match committed {
            Ok(commit) => {
                self.delete(id)?;
                Ok((commit.0, commit.1, t0.elapsed().as_secs_f64()))
            }
            Err(e) => {
                if let Err(resume) = self.run("resume", id, &["resume"], &[]) {
                    tracing::warn!(id, error = %resume, "could not resume the container after a failed checkpoint");
                }
                Err(e)
            }
        }
    }

    /// Dumps the paused container `id` (CRIU leaves it paused) and commits it to the pool.
    fn dump_paused(&self, id: &str, name: &str, pools: &Pools) -> Result<(u64, u64), RuncError> {
        let images = self.stage()?;
        let work = tempfile::tempdir().map_err(RuncError::Staging)?;
        self.run(
            "checkpoint",
            id,
            &["checkpoint", "--leave-running", "--image-path"],
            &[images.path(), Path::new("--work-path"), work.path()],
        )
        .map_err(|e| e.with_log(&work.path().join("dump.log")))?;
        upload_dir(pools, name, images.path()).map_err(|source| RuncError::Pool {
            name: name.to_string(),
            source: source.into(),
        })
    }

    /// Restores `name` from the pool as container `id` of `bundle`; returns its init PID.
    pub fn restore_from_pool(
        &self,
        id: &str,
        bundle: &Path,
        name: &str,
        generation: Option<u64>,
        pools: &Pools,
    ) -> Result<i32, RuncError> {
        let images = self.stage()?;
        download_dir(pools, name, generation, images.path()).map_err(|source| RuncError::Pool {
            name: name.to_string(),
            source,
        })?;
        let _ = self.delete(id);
        let work = tempfile::tempdir().map_err(RuncError::Staging)?;
        let pidfile = work.path().join("pid");
        let restore_log = work.path().join("restore.log");
        self.run(
            "restore",
            id,
            &["restore", "--detach", "--image-path"],
            &[
                images.path(),
                Path::new("--work-path"),
                work.path(),
                Path::new("--bundle"),
                bundle,
                Path::new("--pid-file"),
                &pidfile,
            ],
        )
        .map_err(|e| e.with_log(&restore_log))?;
        read_pid(&pidfile, id)
    }

    fn stage(&self) -> Result<tempfile::TempDir, RuncError> {
        tempfile::Builder::new()
            .prefix("torpor-oci-")
            .tempdir_in(&self.staging)
            .map_err(RuncError::Staging)
    }
}

fn read_pid(pidfile: &Path, id: &str) -> Result<i32, RuncError> {
    fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| RuncError::NoPid(id.to_string()))
}

fn io_err(e: io::Error) -> ClientError {
    ClientError::Sink(e)
}

/// Uploads every regular file of `dir` as one sealed snapshot; returns (generation, bytes).
pub fn upload_dir(pools: &Pools, name: &str, dir: &Path) -> Result<(u64, u64), ClientError> {
    let mut upload = ReplicatedUpload::begin(pools, name, SnapshotMeta::default())?;
    let mut buf = vec![0u8; torpor_image::CHUNK_SIZE as usize];
    let mut id = 0u32;
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        if !entry.file_type().map_err(io_err)?.is_file() {
            continue;
        }
        let fname = entry.file_name().to_string_lossy().to_string();
        let mut f = fs::File::open(entry.path()).map_err(io_err)?;
        upload.file_open(id, &fname)?;
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io_err)?;
            if n == 0 {
                break;
            }
            upload.file_data(id, &buf[..n])?;
            size += n as u64;
        }
        upload.file_close(id, size)?;
        id += 1;
    }
    let c = upload.commit()?;
    Ok((c.generation, c.bytes))
}

/// Downloads `generation` of `name` (the newest when `None`), verified with this node's key,
/// into `dir`, one file per image, from the first replica that has it; every file is checked
/// against the seal.
pub fn download_dir(
    pools: &Pools,
    name: &str,
    generation: Option<u64>,
    dir: &Path,
) -> Result<(), FetchError> {
    let mut from = 0;
    loop {
        let (replica, mut client, manifest) = find_verified(pools, from, name, generation)?;
        // Without a key the pool is this process's own: nothing to check.
        let seal = match pools.key {
            Some(_) => Some(manifest.seal.as_ref().ok_or(SealError::Missing)?),
            None => None,
        };
        let fetched = manifest.files.iter().try_for_each(|file| {
            let sealed = seal.map(|s| s.file(&file.name)).transpose()?;
            let mut out = fs::File::create(dir.join(&file.name)).map_err(io_err)?;
            let mut digest = FileDigest::default();
            client.get_file(name, manifest.generation, &file.name, |b| {
                if sealed.is_some() {
                    digest.update(b);
                }
                out.write_all(b)
            })?;
            sealed.map_or(Ok(()), |f| digest.check(f).map_err(FetchError::from))
        });
        match fetched {
            Ok(()) => return Ok(()),
            Err(e) if replica + 1 < pools.replicas.len() => {
                tracing::warn!(name, replica, error = %torpor_pool::error_chain(&e), "trying the next pool replica");
                from = replica + 1;
            }
            Err(e) => return Err(e),
        }
    }
}
