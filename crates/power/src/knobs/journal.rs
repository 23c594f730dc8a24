//! The knob journal: every change is recorded, with how to undo it, before it is made, so an
//! agent that crashed leaves a list the next start undoes. The file is JSON with a magic, a
//! version, a CRC32C of the changes and a size limit; a bad file is refused, never guessed at.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

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
    /// A node sleep hook ran: run its counterpart.
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
    /// for the caller to undo (newest first).
    pub fn open(path: &Path) -> Result<(Journal, Vec<Change>), JournalError> {
        let leftover = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(JournalError::Read(path.into(), e)),
            Ok(m) if m.len() > MAX_BYTES => {
                return Err(JournalError::TooLarge {
                    path: path.into(),
                    len: m.len(),
                })
            }
            Ok(_) => {
                let bytes = std::fs::read(path).map_err(|e| JournalError::Read(path.into(), e))?;
                Journal::decode(path, &bytes)?
            }
        };
        Ok((
            Journal {
                path: path.into(),
                changes: Vec::new(),
            },
            leftover.into_iter().rev().collect(),
        ))
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
        if self.changes.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(write(e)),
                _ => Ok(()),
            };
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        let file = File {
            magic: MAGIC.into(),
            version: VERSION,
            crc32c: crc(&self.changes),
            changes: self.changes.clone(),
        };
        let tmp = self.path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| write(e.into()))?;
        std::fs::write(&tmp, bytes).map_err(write)?;
        std::fs::rename(&tmp, &self.path).map_err(write)
    }
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
