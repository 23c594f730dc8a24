//! The snapshot manifest: what a snapshot is made of (its CRIU image files, their sizes and
//! per-chunk checksums) and where it came from (root PID, process tree, CRIU version, the
//! identity CRIU ran as, whether the tree had its own PID namespace).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    names::{validate_file_name, validate_snapshot_name, NameError},
    seal::Seal,
};

/// Unit of checksumming and of pool memory: every stored byte belongs to one chunk whose
/// CRC32C is kept in the manifest and verified whenever the chunk is served.
pub const CHUNK_SIZE: u64 = 1 << 20;
/// Most image files one snapshot may hold; CRIU writes a few per process, so this is generous.
pub const MAX_FILES: usize = 65_536;
/// Largest single image file accepted (1 TiB); bounds arithmetic and allocations.
pub const MAX_FILE_SIZE: u64 = 1 << 40;
/// Most processes recorded in the tree of one snapshot.
pub const MAX_PIDS: usize = 65_536;

/// Where a snapshot came from; the pool stores it and hands it back, it never interprets it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    /// PID of the tree's root at checkpoint time; a restore recreates it under this PID.
    pub root_pid: i32,
    /// Every PID of the tree, so a restore can wait for all of them to be free.
    pub pids: Vec<i32>,
    /// CRIU version that wrote the images; restore with an older CRIU may not read them.
    pub criu_version: String,
    /// Resident memory of the tree at checkpoint, for policy and reports.
    pub footprint_bytes: u64,
    /// Identity CRIU ran as for the dump (`None`: as the checkpointing process, root), which
    /// where root lacks CAP_SYS_RESOURCE must be the tree's own. The restore runs CRIU as the
    /// same, needing no more privilege than the dump. Absent in older manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<RunAs>,
    /// The tree's root is the init of its own PID namespace. Its restore gets a fresh
    /// namespace, so it never waits for the old host PIDs to be free.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pid_namespace: bool,
}

/// A non-root identity CRIU runs as (unprivileged, with the capabilities it needs), so that
/// it may dump and restore a tree that runs as that identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// One image file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// CRIU's file name (`pages-1.img`, `inventory.img`, …).
    pub name: String,
    /// Exact length in bytes.
    pub size: u64,
    /// CRC32C of each `CHUNK_SIZE` piece of the file (the last may be shorter).
    pub chunk_crcs: Vec<u32>,
}

impl FileEntry {
    /// Number of chunks a file of `size` bytes occupies.
    pub fn chunks_for(size: u64) -> usize {
        size.div_ceil(CHUNK_SIZE) as usize
    }
}

/// A committed snapshot's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Snapshot (service) name.
    pub name: String,
    /// Increases by one with every commit under the same name.
    pub generation: u64,
    /// Commit time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Origin of the snapshot.
    pub meta: SnapshotMeta,
    /// Image files in the order they were received.
    pub files: Vec<FileEntry>,
    /// The committing node's signature; a node restores only what it can verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<Seal>,
}

/// Why a manifest was refused.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("manifest lists {0} files, more than {MAX_FILES}")]
    TooManyFiles(usize),
    #[error("manifest lists {0} pids, more than {MAX_PIDS}")]
    TooManyPids(usize),
    #[error("file {0:?} appears twice")]
    DuplicateFile(String),
    #[error("file {name:?} is {size} bytes, more than the {MAX_FILE_SIZE} byte limit")]
    FileTooLarge { name: String, size: u64 },
    #[error("file {name:?} has {actual} chunk checksums, {expected} expected for its size")]
    ChunkCountMismatch {
        name: String,
        expected: usize,
        actual: usize,
    },
}

impl Manifest {
    /// Total bytes of all image files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Looks up a file by name.
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// Checks every rule a manifest from an untrusted source must satisfy.
    pub fn validate(&self) -> Result<(), ManifestError> {
        validate_snapshot_name(&self.name)?;
        if self.files.len() > MAX_FILES {
            return Err(ManifestError::TooManyFiles(self.files.len()));
        }
        if self.meta.pids.len() > MAX_PIDS {
            return Err(ManifestError::TooManyPids(self.meta.pids.len()));
        }
        let mut seen = HashSet::new();
        for f in &self.files {
            validate_file_name(&f.name)?;
            if !seen.insert(f.name.as_str()) {
                return Err(ManifestError::DuplicateFile(f.name.clone()));
            }
            if f.size > MAX_FILE_SIZE {
                return Err(ManifestError::FileTooLarge {
                    name: f.name.clone(),
                    size: f.size,
                });
            }
            let expected = FileEntry::chunks_for(f.size);
            if f.chunk_crcs.len() != expected {
                return Err(ManifestError::ChunkCountMismatch {
                    name: f.name.clone(),
                    expected,
                    actual: f.chunk_crcs.len(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) fn sample_manifest() -> Manifest {
    Manifest {
        name: "svc".into(),
        generation: 3,
        created_unix_ms: 1_700_000_000_000,
        meta: SnapshotMeta {
            root_pid: 42,
            pids: vec![42, 43],
            criu_version: "4.2.1".into(),
            footprint_bytes: 1 << 20,
            run_as: Some(RunAs {
                uid: 65534,
                gid: 65534,
            }),
            pid_namespace: true,
        },
        files: vec![
            FileEntry {
                name: "inventory.img".into(),
                size: 10,
                chunk_crcs: vec![crc32c::crc32c(b"0123456789")],
            },
            FileEntry {
                name: "pages-1.img".into(),
                size: CHUNK_SIZE + 1,
                chunk_crcs: vec![1, 2],
            },
        ],
        seal: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_manifest_passes() {
        let m = sample_manifest();
        m.validate().unwrap();
        assert_eq!(m.total_bytes(), CHUNK_SIZE + 11);
    }

    #[test]
    fn each_rule_is_enforced() {
        let mut m = sample_manifest();
        m.files[1].chunk_crcs.pop();
        assert!(matches!(
            m.validate(),
            Err(ManifestError::ChunkCountMismatch { .. })
        ));

        let mut m = sample_manifest();
        m.files[1].name = "inventory.img".into();
        assert!(matches!(m.validate(), Err(ManifestError::DuplicateFile(_))));

        let mut m = sample_manifest();
        m.files[0].name = "../../etc/passwd".into();
        assert!(matches!(m.validate(), Err(ManifestError::Name(_))));

        let mut m = sample_manifest();
        m.files[0].size = MAX_FILE_SIZE + 1;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::FileTooLarge { .. })
        ));

        let mut m = sample_manifest();
        m.meta.pids = vec![1; MAX_PIDS + 1];
        assert!(matches!(m.validate(), Err(ManifestError::TooManyPids(_))));
    }

    #[test]
    fn meta_round_trips_and_old_manifests_still_load() {
        let m = sample_manifest();
        let json = serde_json::to_string(&m.meta).unwrap();
        let back: SnapshotMeta = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m.meta);
        // Written before `run_as` and `pid_namespace` existed: a root tree in the host's
        // PID namespace.
        let old: SnapshotMeta = serde_json::from_str(
            r#"{"root_pid":42,"pids":[42],"criu_version":"4.2.1","footprint_bytes":1}"#,
        )
        .unwrap();
        assert_eq!(old.run_as, None);
        assert!(!old.pid_namespace);
        // Defaults are left out, so readers that predate them still accept the common case.
        let plain = serde_json::to_string(&old).unwrap();
        assert!(
            !plain.contains("run_as") && !plain.contains("pid_namespace"),
            "{plain}"
        );
    }
}
