//! Snapshot authenticity. A node signs what it commits with a key the pool never holds: the
//! seal binds the snapshot's name, its generation, its metadata (who CRIU restores as, the
//! process tree) and a BLAKE3 digest of every image file, under a keyed BLAKE3 MAC. A restore
//! checks the seal before CRIU may use a byte, so neither the pool nor anyone holding the
//! pool's token can have a node restore memory it did not write, an older generation under a
//! newer number, or another service's snapshot.
//!
//! The key file is 32 random bytes, hex-encoded, owned by the node's user and readable by
//! nobody else; [`NodeKey::load_or_create`] refuses one that others could read or replace.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::manifest::SnapshotMeta;

/// Version of the sealed encoding; a seal of another version is refused, not guessed at.
pub const SEAL_VERSION: u8 = 1;
/// Domain separation: a seal's MAC can never be mistaken for any other keyed hash.
const DOMAIN: &[u8] = b"torpor snapshot seal v1\0";
/// Bytes of key material.
pub const KEY_LEN: usize = 32;

/// A node's signing key.
pub struct NodeKey {
    key: [u8; KEY_LEN],
    /// Short public name of the key (a hash of it), so a seal by another node's key is told
    /// apart from a forged one in errors.
    id: String,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey").field("id", &self.id).finish()
    }
}

/// Why a key file was refused.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("node key file {path} cannot be read or created")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("node key file {path} is readable or writable by group or others (mode {mode:o}); chmod 600 it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("node key file {path} belongs to uid {owner}, not to this user (uid {me})")]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("node key file {path} does not hold {KEY_LEN} hex-encoded bytes")]
    Malformed { path: PathBuf },
}

impl NodeKey {
    /// A key from raw bytes.
    pub fn from_bytes(key: [u8; KEY_LEN]) -> NodeKey {
        let id = hex(&blake3::hash(&key).as_bytes()[..8]);
        NodeKey { key, id }
    }

    /// A fresh random key (not saved).
    pub fn generate() -> NodeKey {
        let mut key = [0u8; KEY_LEN];
        getrandom(&mut key);
        NodeKey::from_bytes(key)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reads the key at `path`, creating it (0600, parents 0700) when absent. A key file that
    /// others could read or replace, or that is not ours, is refused.
    pub fn load_or_create(path: &Path) -> Result<NodeKey, KeyError> {
        let io_err = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)
                        .map_err(io_err)?;
                }
                let key = NodeKey::generate();
                // create_new: never through a symlink planted meanwhile, never over a rival.
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io_err)?;
                f.write_all(format!("{}\n", hex(&key.key)).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(io_err)?;
                Ok(key)
            }
            Err(e) => Err(io_err(e)),
            Ok(meta) => {
                let me = nix::unistd::geteuid().as_raw();
                if !meta.file_type().is_file() {
                    return Err(KeyError::Malformed {
                        path: path.to_path_buf(),
                    });
                }
                if meta.uid() != me {
                    return Err(KeyError::Owner {
                        path: path.to_path_buf(),
                        owner: meta.uid(),
                        me,
                    });
                }
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyError::Exposed {
                        path: path.to_path_buf(),
                        mode,
                    });
                }
                let text = fs::read_to_string(path).map_err(io_err)?;
                let bytes = unhex(text.trim()).ok_or_else(|| KeyError::Malformed {
                    path: path.to_path_buf(),
                })?;
                let key: [u8; KEY_LEN] = bytes.try_into().map_err(|_| KeyError::Malformed {
                    path: path.to_path_buf(),
                })?;
                Ok(NodeKey::from_bytes(key))
            }
        }
    }

    /// Seals a snapshot: `files` are (name, size, BLAKE3 digest) of every image file.
    pub fn seal(
        &self,
        name: &str,
        generation: u64,
        meta: &SnapshotMeta,
        mut files: Vec<SealedFile>,
    ) -> Seal {
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let mut seal = Seal {
            version: SEAL_VERSION,
            key_id: self.id.clone(),
            files,
            mac: String::new(),
        };
        seal.mac = hex(&self.mac(name, generation, meta, &seal));
        seal
    }

    /// Checks that `seal` is this key's, for exactly this name, generation and metadata.
    /// The file digests it vouches for are then checked as the bytes arrive
    /// ([`Seal::file`] and [`FileDigest`]).
    pub fn verify(
        &self,
        name: &str,
        generation: u64,
        meta: &SnapshotMeta,
        seal: &Seal,
    ) -> Result<(), SealError> {
        if seal.version != SEAL_VERSION {
            return Err(SealError::Version(seal.version));
        }
        if seal.key_id != self.id {
            return Err(SealError::OtherKey {
                key_id: seal.key_id.clone(),
            });
        }
        let expected = self.mac(name, generation, meta, seal);
        let given = unhex(&seal.mac).unwrap_or_default();
        // Constant time: the comparison must not tell a forger how far it got.
        if given.len() != expected.len()
            || given
                .iter()
                .zip(expected.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                != 0
        {
            return Err(SealError::BadMac);
        }
        Ok(())
    }

    fn mac(&self, name: &str, generation: u64, meta: &SnapshotMeta, seal: &Seal) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(DOMAIN);
        h.update(&[seal.version]);
        put_str(&mut h, name);
        h.update(&generation.to_le_bytes());
        let meta = serde_json::to_vec(meta).expect("metadata serialises");
        put_bytes(&mut h, &meta);
        h.update(&(seal.files.len() as u64).to_le_bytes());
        for f in &seal.files {
            put_str(&mut h, &f.name);
            h.update(&f.size.to_le_bytes());
            put_str(&mut h, &f.blake3);
        }
        *h.finalize().as_bytes()
    }
}

fn put_bytes(h: &mut blake3::Hasher, b: &[u8]) {
    h.update(&(b.len() as u64).to_le_bytes());
    h.update(b);
}

fn put_str(h: &mut blake3::Hasher, s: &str) {
    put_bytes(h, s.as_bytes());
}

/// A node's signature over one snapshot, stored with its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seal {
    pub version: u8,
    /// Which node key made it (a hash of the key, not the key).
    pub key_id: String,
    /// Every image file with its size and digest, sorted by name.
    pub files: Vec<SealedFile>,
    /// Keyed BLAKE3 over all of the above plus the name, generation and metadata, hex.
    pub mac: String,
}

/// What a seal vouches for about one image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedFile {
    pub name: String,
    pub size: u64,
    /// BLAKE3 of the file's bytes, hex.
    pub blake3: String,
}

/// Why a snapshot was refused as unauthentic.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SealError {
    #[error("snapshot carries no seal: it was not written by a torpor node with a key")]
    Missing,
    #[error("seal version {0} is not understood (this node writes {SEAL_VERSION})")]
    Version(u8),
    #[error("sealed by another node's key ({key_id})")]
    OtherKey { key_id: String },
    #[error("seal does not match the snapshot's name, generation or metadata: forged or altered")]
    BadMac,
    #[error("image file {0:?} is not covered by the seal")]
    UnsealedFile(String),
    #[error("image file {name:?} differs from what was sealed ({got} bytes, digest {digest})")]
    FileMismatch {
        name: String,
        got: u64,
        digest: String,
    },
    #[error("the seal lists {sealed} files but the snapshot has {listed}")]
    FileCount { sealed: usize, listed: usize },
}

impl Seal {
    /// The sealed entry of an image file.
    pub fn file(&self, name: &str) -> Result<&SealedFile, SealError> {
        self.files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| SealError::UnsealedFile(name.to_string()))
    }

    /// Checks that the seal covers exactly `listed` files, by name and size.
    pub fn covers<'a>(
        &self,
        listed: impl ExactSizeIterator<Item = (&'a str, u64)>,
    ) -> Result<(), SealError> {
        if listed.len() != self.files.len() {
            return Err(SealError::FileCount {
                sealed: self.files.len(),
                listed: listed.len(),
            });
        }
        for (name, size) in listed {
            let f = self.file(name)?;
            if f.size != size {
                return Err(SealError::FileMismatch {
                    name: name.to_string(),
                    got: size,
                    digest: "(size differs)".into(),
                });
            }
        }
        Ok(())
    }
}

/// Running digest of one image file as its bytes pass.
#[derive(Debug, Default)]
pub struct FileDigest {
    hasher: blake3::Hasher,
    size: u64,
}

impl FileDigest {
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
    }

    /// The sealed description of the file seen so far.
    pub fn finish(&self, name: &str) -> SealedFile {
        SealedFile {
            name: name.to_string(),
            size: self.size,
            blake3: self.hasher.finalize().to_hex().to_string(),
        }
    }

    /// Checks what passed against the seal's entry.
    pub fn check(&self, sealed: &SealedFile) -> Result<(), SealError> {
        let got = self.finish(&sealed.name);
        if got.size != sealed.size || got.blake3 != sealed.blake3 {
            return Err(SealError::FileMismatch {
                name: sealed.name.clone(),
                got: got.size,
                digest: got.blake3,
            });
        }
        Ok(())
    }
}

fn getrandom(buf: &mut [u8]) {
    use rand::RngCore;
    rand::rngs::OsRng.fill_bytes(buf);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Vec<SealedFile> {
        let mut d = FileDigest::default();
        d.update(b"pages");
        vec![d.finish("pages-1.img")]
    }

    #[test]
    fn a_seal_verifies_only_for_its_own_name_generation_meta_and_key() {
        let key = NodeKey::generate();
        let meta = SnapshotMeta {
            root_pid: 7,
            ..Default::default()
        };
        let seal = key.seal("node.web", 5, &meta, files());
        assert_eq!(key.verify("node.web", 5, &meta, &seal), Ok(()));
        assert_eq!(
            key.verify("node.web", 6, &meta, &seal),
            Err(SealError::BadMac),
            "replayed under a newer generation"
        );
        assert_eq!(
            key.verify("other.web", 5, &meta, &seal),
            Err(SealError::BadMac),
            "another service's name"
        );
        let mut root = meta.clone();
        root.run_as = None;
        root.root_pid = 1;
        assert_eq!(
            key.verify("node.web", 5, &root, &seal),
            Err(SealError::BadMac)
        );
        let mut altered = seal.clone();
        altered.files[0].blake3 = "00".repeat(32);
        assert_eq!(
            key.verify("node.web", 5, &meta, &altered),
            Err(SealError::BadMac)
        );
        let other = NodeKey::generate();
        assert!(matches!(
            other.verify("node.web", 5, &meta, &seal),
            Err(SealError::OtherKey { .. })
        ));
    }

    #[test]
    fn file_bytes_must_match_their_sealed_digest() {
        let sealed = &files()[0];
        let mut same = FileDigest::default();
        same.update(b"pag");
        same.update(b"es");
        assert_eq!(same.check(sealed), Ok(()));
        let mut flipped = FileDigest::default();
        flipped.update(b"pagES");
        assert!(matches!(
            flipped.check(sealed),
            Err(SealError::FileMismatch { .. })
        ));
    }

    #[test]
    fn key_files_are_created_private_and_exposed_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/node.key");
        let a = NodeKey::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = NodeKey::load_or_create(&path).unwrap();
        assert_eq!(a.id(), b.id(), "the same key is read back");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            NodeKey::load_or_create(&path),
            Err(KeyError::Exposed { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "not hex").unwrap();
        assert!(matches!(
            NodeKey::load_or_create(&path),
            Err(KeyError::Malformed { .. })
        ));
        nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        assert!(matches!(
            NodeKey::load_or_create(&path),
            Err(KeyError::Owner { owner: 65534, .. })
        ));
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(NodeKey::load_or_create(&link).is_err(), "symlinks refused");
    }
}
