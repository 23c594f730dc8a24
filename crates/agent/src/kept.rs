//! The kept-services file: which awake services `torpor stop --keep-running` left running,
//! so that the next start adopts them awake instead of starting them again. Each entry holds
//! what tells the same process from a later one that reuses its PID (the start time from
//! `/proc/PID/stat`), the cgroup it must still be in, and a fingerprint of how it was
//! configured (a changed service is not adopted).
//!
//! The file is JSON with a magic, a version and a CRC32C of its entries; a bad one is refused
//! (its services then start as if nothing were kept). It is written atomically (a fresh
//! 0600 file in the same directory, fsynced, renamed into place) and deleted once read.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ServiceSpec;

pub const MAGIC: &str = "torpor-kept";
pub const VERSION: u32 = 1;
/// Far above any real file (a few hundred bytes per service).
pub const MAX_BYTES: u64 = 4 << 20;

/// One service left running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptService {
    pub name: String,
    /// Its root process (the service's init) on the host.
    pub pid: i32,
    /// The root's start time (clock ticks since boot, `/proc/PID/stat` field 22): a PID
    /// reused by another process has another.
    pub start_time: u64,
    /// The cgroup the service's processes are in.
    pub cgroup: PathBuf,
    /// The generation its running incarnation was restored from, if it was.
    pub generation: Option<u64>,
    /// [`fingerprint`] of its configuration when it was kept.
    pub fingerprint: u32,
}

/// Why the kept-services file could not be used.
#[derive(Debug, Error)]
pub enum KeptError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("{path} is not a torpor kept-services file ({problem})")]
    Corrupt { path: PathBuf, problem: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    magic: String,
    version: u32,
    crc32c: u32,
    services: Vec<KeptService>,
}

fn crc(services: &[KeptService]) -> u32 {
    crc32c::crc32c(&serde_json::to_vec(services).unwrap_or_default())
}

/// How a service starts and where it listens, condensed: an entry whose fingerprint differs
/// from the configuration now is of a service that changed. The environment is in it, so
/// only this checksum is written, never the configuration itself.
pub fn fingerprint(spec: &ServiceSpec) -> u32 {
    crc32c::crc32c(format!("{:?}|{}", spec.launch, spec.backend).as_bytes())
}

/// The start time of `pid` (`/proc/PID/stat` field 22), while it runs (an exited process
/// its parent has not reaped yet has none).
pub fn start_time(pid: i32) -> Option<u64> {
    // The fields after the command start with the state (field 3).
    let f = torpor_criu::procs::stat_fields(pid)?;
    if f.first().is_some_and(|state| state == "Z" || state == "X") {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// Writes `services` to `path` (mode 0600), replacing what was there.
pub fn write(path: &Path, services: &[KeptService]) -> Result<(), KeptError> {
    let err = |e| KeptError::Write(path.to_path_buf(), e);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    let file = File {
        magic: MAGIC.into(),
        version: VERSION,
        crc32c: crc(services),
        services: services.to_vec(),
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(|e| err(e.into()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| std::fs::File::open(&dir)?.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

/// Reads the services kept in `path` and deletes the file, so that they are adopted at most
/// once; no file is no service.
pub fn take(path: &Path) -> Result<Vec<KeptService>, KeptError> {
    let read = |e| KeptError::Read(path.to_path_buf(), e);
    let bytes = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read(e)),
        Ok(m) if m.len() > MAX_BYTES => {
            let _ = std::fs::remove_file(path);
            return Err(KeptError::Corrupt {
                path: path.to_path_buf(),
                problem: format!("{} bytes, over {MAX_BYTES}", m.len()),
            });
        }
        Ok(_) => std::fs::read(path).map_err(read)?,
    };
    std::fs::remove_file(path).map_err(read)?;
    decode(path, &bytes)
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Vec<KeptService>, KeptError> {
    let corrupt = |problem: String| KeptError::Corrupt {
        path: path.to_path_buf(),
        problem,
    };
    let file: File = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if file.magic != MAGIC {
        return Err(corrupt(format!("magic {:?}", file.magic)));
    }
    if file.version != VERSION {
        return Err(corrupt(format!(
            "version {}, this torpor reads {VERSION}",
            file.version
        )));
    }
    if file.crc32c != crc(&file.services) {
        return Err(corrupt("checksum mismatch".into()));
    }
    Ok(file.services)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn entry(name: &str) -> KeptService {
        KeptService {
            name: name.into(),
            pid: 42,
            start_time: 1234,
            cgroup: "/sys/fs/cgroup/torpor-services/n.web".into(),
            generation: Some(3),
            fingerprint: 7,
        }
    }

    #[test]
    fn written_root_only_read_back_once_and_a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("kept-n");
        assert!(take(&path).unwrap().is_empty(), "no file, nothing kept");
        let services = vec![entry("web"), entry("db")];
        write(&path, &services).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(take(&path).unwrap(), services);
        assert!(!path.exists(), "deleted once read");

        write(&path, &services).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("1234", "1235")).unwrap();
        let e = take(&path).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        write(&path, &services).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"version\": 1", "\"version\": 9")).unwrap();
        let e = take(&path).unwrap_err().to_string();
        assert!(e.contains("version 9"), "{e}");
    }

    #[test]
    fn a_processes_start_time_is_read_and_a_missing_pid_has_none() {
        let me = std::process::id() as i32;
        let t = start_time(me).unwrap();
        assert_eq!(start_time(me), Some(t));
        assert_eq!(start_time(i32::MAX), None);
    }
}
