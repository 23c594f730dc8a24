//! CRIU's kernel-feature cache (`/run/criu.kdat`).
//!
//! Every CRIU start probes the kernel (features, socket and netfilter modules through
//! `iptables -L`: some 25-30 ms here) unless it loads the cache an earlier run saved. CRIU
//! saves it only where its run directory is a tmpfs, so that a reboot drops it, and when the
//! save fails it leaves `criu.kdat.tmp` behind, which blocks every later save. In containers
//! and on hosts like ours `/run` is not a tmpfs, and every CRIU start probes: a wake pays it
//! on its critical path.
//!
//! [`KdatCache::provide`] makes the cache work for as long as torpor runs. Where `/run` is a
//! tmpfs it only removes a stale `criu.kdat.tmp`, and CRIU keeps its own cache. Where it is
//! not, CRIU probes once in a private mount namespace whose `/run` is torpor's directory on a
//! tmpfs (so CRIU saves the cache there itself), and that file is bind-mounted over
//! `/run/criu.kdat`: the cache lives on a tmpfs, and a reboot drops the mount as it would drop
//! a tmpfs. Every process that provides the cache holds a shared lock; the last one to stop
//! unmounts it (a crashed one leaves a valid cache mounted until the next one stops, or the
//! next boot).

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::{ffi::OsStrExt, fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    fcntl::{Flock, FlockArg},
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{unshare, CloneFlags},
    sys::statfs::{statfs, TMPFS_MAGIC},
};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::binary::CriuBinary;

/// The cache's file name in CRIU's run directory.
pub const CACHE_NAME: &str = "criu.kdat";

/// A `criu.kdat.tmp` older than this is left from a CRIU that failed or died while saving
/// (a live save holds it for microseconds).
const STALE_TMP_AGE: Duration = Duration::from_secs(10);

/// Where CRIU looks for its cache and where torpor keeps its own copy.
#[derive(Debug, Clone)]
pub struct KdatPaths {
    /// CRIU's run directory, compiled in (`/run`).
    pub run_dir: PathBuf,
    /// A directory on a tmpfs for torpor's copies of the cache and its locks.
    pub store_dir: PathBuf,
    /// The copy's directory in `store_dir`, one per CRIU build (a cache is only valid for
    /// the build that saved it).
    pub copy_dir: String,
}

impl KdatPaths {
    /// The host's paths, with the copy for `criu`'s build.
    pub fn for_criu(criu: &CriuBinary) -> KdatPaths {
        let build = fs::metadata(&criu.criu)
            .map(|m| format!("{:x}-{:x}-{:x}", m.dev(), m.ino(), m.mtime()))
            .unwrap_or_default();
        KdatPaths {
            run_dir: PathBuf::from("/run"),
            store_dir: PathBuf::from("/dev/shm/torpor-criu-kdat"),
            copy_dir: format!("criu-{build}"),
        }
    }

    fn cache(&self) -> PathBuf {
        self.run_dir.join(CACHE_NAME)
    }

    fn stale_tmp(&self) -> PathBuf {
        self.run_dir.join(format!("{CACHE_NAME}.tmp"))
    }

    fn copy(&self) -> PathBuf {
        self.store_dir.join(&self.copy_dir).join(CACHE_NAME)
    }
}

/// How CRIU finds its cache while a [`KdatCache`] is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KdatMode {
    /// The run directory is a tmpfs: CRIU saves and loads its own cache.
    Native,
    /// torpor's copy, on a tmpfs, is bind-mounted over the cache's path.
    Provided,
}

/// Why the cache could not be provided; CRIU then works as before, probing at every start.
#[derive(Debug, Error)]
pub enum KdatError {
    #[error("cannot inspect {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "{path} is not on a tmpfs; torpor's copy of CRIU's cache must be (a reboot must drop it)"
    )]
    StoreNotTmpfs { path: PathBuf },
    #[error("cannot prepare {path}")]
    Store {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("CRIU's probe in a private mount namespace saved no cache ({why})")]
    Probe { why: String },
    #[error("cannot run CRIU's probe")]
    Run(#[source] crate::binary::CriuError),
    #[error("cannot bind-mount {from} over {to}")]
    Mount {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// What a host's CRIU cache looks like (for `torpor doctor`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KdatStatus {
    /// CRIU's run directory is a tmpfs (it then keeps its own cache).
    pub run_is_tmpfs: bool,
    /// A cache is where CRIU loads it from.
    pub present: bool,
    /// It is torpor's copy, mounted there.
    pub provided: bool,
    /// A `criu.kdat.tmp` old enough to be left over blocks CRIU's own saves.
    pub stale_tmp: bool,
}

/// Reads the state of the cache at `paths` without changing anything.
pub fn inspect(paths: &KdatPaths) -> Result<KdatStatus, KdatError> {
    let run_is_tmpfs = is_tmpfs(&paths.run_dir)?;
    let cache = paths.cache();
    Ok(KdatStatus {
        run_is_tmpfs,
        present: fs::metadata(&cache).is_ok_and(|m| m.len() > 0),
        provided: is_mounted_over(&cache, &paths.run_dir),
        stale_tmp: is_stale(&paths.stale_tmp()),
    })
}

/// CRIU's cache, provided for as long as this value lives.
#[derive(Debug)]
pub struct KdatCache {
    pub mode: KdatMode,
    paths: KdatPaths,
    /// Shared lock held while this process may run CRIU; `None` in native mode.
    users: Option<Flock<File>>,
}

impl KdatCache {
    /// Provides the cache for `criu` at the default paths.
    pub fn provide(criu: &CriuBinary) -> Result<KdatCache, KdatError> {
        Self::provide_at(&KdatPaths::for_criu(criu), |dir| probe(criu, dir))
    }

    /// Provides the cache at `paths`; `probe` must leave a cache in the directory it is given
    /// (the copy's, on a tmpfs).
    pub fn provide_at(
        paths: &KdatPaths,
        probe: impl FnOnce(&Path) -> Result<(), KdatError>,
    ) -> Result<KdatCache, KdatError> {
        if is_tmpfs(&paths.run_dir)? {
            let tmp = paths.stale_tmp();
            if is_stale(&tmp) {
                info!(path = %tmp.display(), "removing CRIU's stale cache file, which blocks it from saving its cache");
                let _ = fs::remove_file(&tmp);
            }
            return Ok(KdatCache {
                mode: KdatMode::Native,
                paths: paths.clone(),
                users: None,
            });
        }
        let store = &paths.store_dir;
        let copy_dir = store.join(&paths.copy_dir);
        fs::create_dir_all(&copy_dir).map_err(|source| KdatError::Store {
            path: copy_dir.clone(),
            source,
        })?;
        if !is_tmpfs(store)? {
            return Err(KdatError::StoreNotTmpfs {
                path: store.clone(),
            });
        }
        // Users share `users.lock`; the last one takes it exclusively to unmount, and a
        // process starting meanwhile waits for that before it looks.
        let users = lock(&store.join("users.lock"), FlockArg::LockShared)?;
        let setup = lock(&store.join("setup.lock"), FlockArg::LockExclusive)?;
        let cache = paths.cache();
        if !is_mounted_over(&cache, &paths.run_dir) {
            let copy = paths.copy();
            if !fs::metadata(&copy).is_ok_and(|m| m.len() > 0) {
                let _ = fs::remove_file(copy_dir.join(format!("{CACHE_NAME}.tmp")));
                probe(&copy_dir)?;
                if !fs::metadata(&copy).is_ok_and(|m| m.len() > 0) {
                    return Err(KdatError::Probe {
                        why: format!("{} is missing or empty", copy.display()),
                    });
                }
            }
            // The mount point: an empty file CRIU would take for a stale cache anyway.
            if fs::symlink_metadata(&cache).is_err() {
                File::create(&cache).map_err(|source| KdatError::Store {
                    path: cache.clone(),
                    source,
                })?;
            }
            mount(
                Some(&copy),
                &cache,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|source| KdatError::Mount {
                from: copy.clone(),
                to: cache.clone(),
                source,
            })?;
            info!(cache = %cache.display(), copy = %copy.display(), "CRIU's kernel-feature cache provided on a tmpfs");
        }
        drop(setup);
        Ok(KdatCache {
            mode: KdatMode::Provided,
            paths: paths.clone(),
            users: Some(users),
        })
    }
}

impl Drop for KdatCache {
    fn drop(&mut self) {
        let Some(users) = self.users.take() else {
            return;
        };
        // Exclusive only when no other process provides it; otherwise it stays for them.
        if users.relock(FlockArg::LockExclusiveNonblock).is_err() {
            return;
        }
        let cache = self.paths.cache();
        if is_mounted_over(&cache, &self.paths.run_dir) {
            if let Err(e) = umount2(&cache, MntFlags::MNT_DETACH) {
                warn!(cache = %cache.display(), error = %e, "cannot unmount the CRIU cache torpor provided");
                return;
            }
            debug!(cache = %cache.display(), "CRIU cache unmounted");
        }
        if fs::metadata(&cache).is_ok_and(|m| m.is_file() && m.len() == 0) {
            let _ = fs::remove_file(&cache);
        }
    }
}

/// Has `criu` probe the kernel in a private mount namespace whose `/run` is `dir` (on a
/// tmpfs), where it saves its cache itself.
fn probe(criu: &CriuBinary, dir: &Path) -> Result<(), KdatError> {
    let dir_c =
        std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| KdatError::Probe {
            why: "the copy's path has a NUL byte".into(),
        })?;
    let mut cmd = criu.command();
    cmd.arg("check");
    // SAFETY: between fork and exec the closure only makes system calls on data prepared
    // before the fork (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            unshare(CloneFlags::CLONE_NEWNS)?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            mount(
                Some(dir_c.as_c_str()),
                c"/run",
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        });
    }
    // `criu check` may report a missing optional feature and fail; the cache is what counts.
    let ran = criu.run(&mut cmd).map_err(KdatError::Run)?;
    debug!(ok = ran, "criu check ran to save its cache");
    Ok(())
}

fn lock(path: &Path, how: FlockArg) -> Result<Flock<File>, KdatError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| KdatError::Store {
            path: path.to_path_buf(),
            source,
        })?;
    Flock::lock(file, how).map_err(|(_, source)| KdatError::Lock {
        path: path.to_path_buf(),
        source,
    })
}

fn is_tmpfs(path: &Path) -> Result<bool, KdatError> {
    statfs(path)
        .map(|s| s.filesystem_type() == TMPFS_MAGIC)
        .map_err(|source| KdatError::Inspect {
            path: path.to_path_buf(),
            source,
        })
}

/// A file mounted over `path` lives on another device than the directory holding it.
fn is_mounted_over(path: &Path, dir: &Path) -> bool {
    match (fs::metadata(path), fs::metadata(dir)) {
        (Ok(f), Ok(d)) => f.dev() != d.dev(),
        _ => false,
    }
}

fn is_stale(tmp: &Path) -> bool {
    fs::metadata(tmp)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_TMP_AGE))
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A run directory that is not a tmpfs (CRIU cannot keep a cache there) and a store on
    /// /dev/shm, both removed afterwards.
    fn non_tmpfs_paths() -> (tempfile::TempDir, tempfile::TempDir, KdatPaths) {
        let run = tempfile::tempdir_in("/var/tmp").expect("run dir");
        let store = tempfile::tempdir_in("/dev/shm").expect("store dir");
        let paths = KdatPaths {
            run_dir: run.path().to_path_buf(),
            store_dir: store.path().join("kdat"),
            copy_dir: "criu-test".into(),
        };
        (run, store, paths)
    }

    fn fake_probe(calls: &Cell<u32>) -> impl FnOnce(&Path) -> Result<(), KdatError> + '_ {
        move |store| {
            calls.set(calls.get() + 1);
            fs::write(store.join(CACHE_NAME), b"kdat").expect("write cache");
            Ok(())
        }
    }

    #[test]
    fn a_non_tmpfs_run_dir_gets_the_copy_mounted_until_the_last_user_stops() {
        let (_run, _store, paths) = non_tmpfs_paths();
        assert!(
            !is_tmpfs(&paths.run_dir).unwrap(),
            "/var/tmp must not be a tmpfs for this test"
        );
        let probes = Cell::new(0);
        let first = KdatCache::provide_at(&paths, fake_probe(&probes)).expect("provide");
        assert_eq!(first.mode, KdatMode::Provided);
        assert_eq!(fs::read(paths.cache()).unwrap(), b"kdat");
        let status = inspect(&paths).unwrap();
        assert!(
            status.present && status.provided && !status.run_is_tmpfs,
            "{status:?}"
        );

        // A second user finds it mounted and neither probes nor mounts again.
        let second = KdatCache::provide_at(&paths, fake_probe(&probes)).expect("provide again");
        assert_eq!(probes.get(), 1);
        drop(first);
        assert!(
            is_mounted_over(&paths.cache(), &paths.run_dir),
            "another user still holds it"
        );
        drop(second);
        assert!(
            !is_mounted_over(&paths.cache(), &paths.run_dir),
            "the last user unmounts it"
        );
        assert!(
            !paths.cache().exists(),
            "the mount point it made is removed"
        );

        // The copy survives on the tmpfs: the next start mounts it without probing.
        let third = KdatCache::provide_at(&paths, fake_probe(&probes)).expect("provide after");
        assert_eq!(probes.get(), 1);
        drop(third);
        assert!(!paths.cache().exists());
    }

    #[test]
    fn a_probe_that_saves_nothing_is_an_error_and_mounts_nothing() {
        let (_run, _store, paths) = non_tmpfs_paths();
        let err = KdatCache::provide_at(&paths, |_| Ok(())).unwrap_err();
        assert!(matches!(err, KdatError::Probe { .. }), "{err}");
        assert!(!paths.cache().exists());
    }

    #[test]
    fn a_store_off_tmpfs_is_refused() {
        let run = tempfile::tempdir_in("/var/tmp").unwrap();
        let store = tempfile::tempdir_in("/var/tmp").unwrap();
        let paths = KdatPaths {
            run_dir: run.path().to_path_buf(),
            store_dir: store.path().to_path_buf(),
            copy_dir: "criu-test".into(),
        };
        let err = KdatCache::provide_at(&paths, |_| panic!("no probe")).unwrap_err();
        assert!(matches!(err, KdatError::StoreNotTmpfs { .. }), "{err}");
    }

    #[test]
    fn a_tmpfs_run_dir_is_left_to_criu_but_a_stale_tmp_is_removed() {
        let run = tempfile::tempdir_in("/dev/shm").unwrap();
        let paths = KdatPaths {
            run_dir: run.path().to_path_buf(),
            store_dir: run.path().join("unused"),
            copy_dir: "criu-test".into(),
        };
        let tmp = paths.stale_tmp();
        fs::write(&tmp, b"").unwrap();
        let fresh = KdatCache::provide_at(&paths, |_| panic!("no probe")).unwrap();
        assert_eq!(fresh.mode, KdatMode::Native);
        assert!(tmp.exists(), "a fresh tmp may be a save in progress");
        File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - 2 * STALE_TMP_AGE)
            .unwrap();
        assert!(inspect(&paths).unwrap().stale_tmp);
        let _native = KdatCache::provide_at(&paths, |_| panic!("no probe")).unwrap();
        assert!(!tmp.exists(), "a stale tmp blocks CRIU's saves");
        assert!(
            !paths.store_dir.exists(),
            "nothing of torpor's in native mode"
        );
    }

    /// The real thing: with the cache provided, CRIU loads it instead of probing.
    #[test]
    fn criu_loads_the_provided_cache() {
        let criu = CriuBinary::locate().expect("CRIU is installed by the README's test command");
        let cache = KdatCache::provide(&criu).expect("provide");
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("check.log");
        // Natively, the first run may be the one that saves it.
        for _ in 0..2 {
            criu.run(
                criu.command()
                    .arg("check")
                    .arg("-v4")
                    .arg("--log-file")
                    .arg(&log),
            )
            .expect("criu check");
        }
        let text = fs::read_to_string(&log).expect("criu's log");
        assert!(
            text.contains("Loaded kdat cache"),
            "mode {:?}; CRIU's log:\n{text}",
            cache.mode
        );
    }
}
