//! The knob journal: every change is recorded, with how to undo it, before it is made, so an
//! agent that crashed leaves a list the next start undoes. The file is JSON with a magic, a
//! version, a CRC32C of the changes and a size limit; a bad file is refused, never guessed at.
//!
//! What the journal says is undone as root, so the file and its directory must be ours and
//! writable by no one else, or the journal is refused. It is replaced atomically: written to a
//! fresh temp file (random name, `O_EXCL`, mode 0600) in its own directory, fsynced, renamed
//! over the old one, and the directory fsynced, so a crash at any point leaves either the old
//! or the new journal. Nothing outside the journal's directory is ever deleted from here.

use std::{
    ffi::OsString,
    io::{Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::warn;

pub const MAGIC: &str = "torpor-knobs";
pub const VERSION: u32 = 1;
/// Far above any real journal (a few changes per CPU).
pub const MAX_BYTES: u64 = 1 << 20;

/// One change and its undo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// A sysfs/cgroup attribute: write `original` back.
    File { path: PathBuf, original: String },
    /// A cgroup torpor made: move its processes to `parent_procs`, then remove it.
    CreatedCgroup {
        path: PathBuf,
        parent_procs: PathBuf,
    },
    /// A controller enabled in `cgroup.subtree_control`: disable it again.
    Controller {
        subtree_control: PathBuf,
        controller: String,
    },
    /// A node sleep hook ran: run the wake hook. `wake_command` records the configured hook
    /// for the log; what runs is the hook configured now, never the journal's.
    NodeAsleep { wake_command: Vec<String> },
}

/// Why the journal could not be used.
#[derive(Debug, Error)]
pub enum JournalError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("{path} is {len} bytes, over the {MAX_BYTES} a journal may have")]
    TooLarge { path: PathBuf, len: u64 },
    #[error(
        "{path} is not a torpor knob journal ({problem}); undo its changes by hand, then remove it"
    )]
    Corrupt { path: PathBuf, problem: String },
    #[error("{path} {problem}; the knob journal and its directory must be owned by uid {uid} and writable by no one else")]
    Unsafe {
        path: PathBuf,
        problem: String,
        uid: u32,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    magic: String,
    version: u32,
    crc32c: u32,
    changes: Vec<Change>,
}

fn crc(changes: &[Change]) -> u32 {
    crc32c::crc32c(&serde_json::to_vec(changes).unwrap_or_default())
}

/// The journal file and the changes it holds, oldest first.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    changes: Vec<Change>,
}

impl Journal {
    /// Opens the journal at `path`; what a previous run left there is returned as `leftover`
    /// for the caller to undo (newest first), and stays journaled until each is removed. The
    /// journal and its directory must be owned by
    /// us and not writable by group or others; temp files a crash left behind are removed.
    pub fn open(path: &Path) -> Result<(Journal, Vec<Change>), JournalError> {
        let dir = dir_of(path);
        let leftover = match std::fs::metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(JournalError::Read(dir, e)),
            Ok(m) => {
                check_owner(&dir, &m, true)?;
                remove_stale_temps(path, &dir);
                Journal::read(path)?
            }
        };
        let newest_first = leftover.iter().rev().cloned().collect();
        Ok((
            Journal {
                path: path.into(),
                changes: leftover,
            },
            newest_first,
        ))
    }

    /// The changes in the file at `path`, none if there is no file.
    fn read(path: &Path) -> Result<Vec<Change>, JournalError> {
        let read = |e| JournalError::Read(path.into(), e);
        // O_NOFOLLOW: a symlink planted at the journal's name is refused, not followed.
        let mut f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
        {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(read(e)),
            Ok(f) => f,
        };
        let m = f.metadata().map_err(read)?;
        check_owner(path, &m, false)?;
        if m.len() > MAX_BYTES {
            return Err(JournalError::TooLarge {
                path: path.into(),
                len: m.len(),
            });
        }
        let mut bytes = Vec::new();
        // A file that grows after the check is still read only up to the limit.
        (&mut f)
            .take(MAX_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read)?;
        if bytes.len() as u64 > MAX_BYTES {
            return Err(JournalError::TooLarge {
                path: path.into(),
                len: bytes.len() as u64,
            });
        }
        Journal::decode(path, &bytes)
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<Vec<Change>, JournalError> {
        let corrupt = |problem: String| JournalError::Corrupt {
            path: path.into(),
            problem,
        };
        let file: File = serde_json::from_slice(bytes)
            .map_err(|e| corrupt(format!("not JSON of the journal's shape: {e}")))?;
        if file.magic != MAGIC {
            return Err(corrupt(format!("magic {:?}", file.magic)));
        }
        if file.version != VERSION {
            return Err(corrupt(format!(
                "version {} (this torpor reads {VERSION})",
                file.version
            )));
        }
        if crc(&file.changes) != file.crc32c {
            return Err(corrupt("checksum mismatch".into()));
        }
        Ok(file.changes)
    }

    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Records `change` durably (before the caller makes it).
    pub fn push(&mut self, change: Change) -> Result<(), JournalError> {
        self.changes.push(change);
        self.save()
    }

    /// Forgets the newest change equal to `change` (after it was undone).
    pub fn remove(&mut self, change: &Change) -> Result<(), JournalError> {
        if let Some(i) = self.changes.iter().rposition(|c| c == change) {
            self.changes.remove(i);
        }
        self.save()
    }

    fn save(&self) -> Result<(), JournalError> {
        let write = |e| JournalError::Write(self.path.clone(), e);
        let dir = dir_of(&self.path);
        if self.changes.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(write(e)),
                Ok(()) => sync_dir(&dir).map_err(write),
            };
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(write)?;
        // Checked at every save: the directory may have appeared (or changed) since `open`.
        let m = std::fs::metadata(&dir).map_err(|e| JournalError::Read(dir.clone(), e))?;
        check_owner(&dir, &m, true)?;
        let file = File {
            magic: MAGIC.into(),
            version: VERSION,
            crc32c: crc(&self.changes),
            changes: self.changes.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| write(e.into()))?;
        // A fresh name, O_CREAT|O_EXCL and mode 0600: nothing planted in the directory is
        // followed or reused.
        let mut tmp = tempfile::Builder::new()
            .prefix(&temp_prefix(&self.path))
            .suffix(TEMP_SUFFIX)
            .tempfile_in(&dir)
            .map_err(write)?;
        tmp.write_all(&bytes).map_err(write)?;
        tmp.as_file().sync_all().map_err(write)?;
        tmp.persist(&self.path).map_err(|e| write(e.error))?;
        sync_dir(&dir).map_err(write)
    }
}

const TEMP_SUFFIX: &str = ".tmp";

/// The directory holding the journal (`.` for a bare file name).
fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Temp files of `journal` are `.<name>.<random>.tmp` next to it.
fn temp_prefix(journal: &Path) -> OsString {
    let mut p = OsString::from(".");
    p.push(journal.file_name().unwrap_or_default());
    p.push(".");
    p
}

/// Removes temp files a crash between write and rename left next to the journal; only ours
/// (by name, regular files), only in the journal's directory.
fn remove_stale_temps(journal: &Path, dir: &Path) {
    let prefix = temp_prefix(journal);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let ours = name
            .as_encoded_bytes()
            .starts_with(prefix.as_encoded_bytes())
            && name.as_encoded_bytes().ends_with(TEMP_SUFFIX.as_bytes());
        if ours && e.file_type().is_ok_and(|t| t.is_file()) {
            if let Err(error) = std::fs::remove_file(e.path()) {
                warn!(path = %e.path().display(), %error, "cannot remove a stale journal temp file");
            }
        }
    }
}

/// The journal (or its directory) must be ours and writable by no one else: its entries are
/// undone as root.
fn check_owner(path: &Path, m: &std::fs::Metadata, dir: bool) -> Result<(), JournalError> {
    let uid = nix::unistd::geteuid().as_raw();
    let unsafe_ = |problem: String| JournalError::Unsafe {
        path: path.into(),
        problem,
        uid,
    };
    if dir && !m.is_dir() {
        return Err(unsafe_("is not a directory".into()));
    }
    if !dir && !m.is_file() {
        return Err(unsafe_("is not a regular file".into()));
    }
    if m.uid() != uid {
        return Err(unsafe_(format!("is owned by uid {}", m.uid())));
    }
    if m.mode() & 0o022 != 0 {
        return Err(unsafe_(format!(
            "has mode {:o}, writable by group or others",
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Makes a rename or unlink in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(n: u32) -> Change {
        Change::File {
            path: format!("/x/{n}").into(),
            original: "0".into(),
        }
    }

    #[test]
    fn leftovers_come_back_newest_first_and_an_empty_journal_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("knobs.json");
        let (mut j, left) = Journal::open(&path).unwrap();
        assert!(left.is_empty());
        j.push(change(1)).unwrap();
        j.push(change(2)).unwrap();
        let (_, left) = Journal::open(&path).unwrap();
        assert_eq!(left, vec![change(2), change(1)]);
        j.remove(&change(2)).unwrap();
        j.remove(&change(1)).unwrap();
        assert!(!path.exists());
    }

    fn written(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
        let path = dir.join("knobs.json");
        let _ = std::fs::remove_file(&path);
        let (mut j, _) = Journal::open(&path).unwrap();
        j.push(change(1)).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        path
    }

    #[test]
    fn bad_magic_version_checksum_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (edit, word) in [
            (
                Box::new(|v: &mut serde_json::Value| v["magic"] = "x".into())
                    as Box<dyn FnOnce(&mut serde_json::Value)>,
                "magic",
            ),
            (
                Box::new(|v: &mut serde_json::Value| v["version"] = 9.into()),
                "version 9",
            ),
            (
                Box::new(|v: &mut serde_json::Value| v["changes"][0]["original"] = "1".into()),
                "checksum",
            ),
        ] {
            let path = written(dir.path(), edit);
            let e = Journal::open(&path).unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        }
        std::fs::write(dir.path().join("knobs.json"), b"\x00garbage").unwrap();
        assert!(matches!(
            Journal::open(&dir.path().join("knobs.json")),
            Err(JournalError::Corrupt { .. })
        ));
    }

    #[test]
    fn oversized_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("knobs.json");
        std::fs::write(&path, vec![b' '; MAX_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            Journal::open(&path),
            Err(JournalError::TooLarge { .. })
        ));
    }
}
