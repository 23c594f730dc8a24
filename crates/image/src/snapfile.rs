//! The disk tier's file format: one file per snapshot generation.
//!
//! ```text
//! offset 0   magic "TORPSNAP" (8 bytes)
//!        8   format version, u32 LE
//!       12   manifest length, u32 LE (at most MAX_MANIFEST_LEN)
//!       16   CRC32C of the manifest bytes, u32 LE
//!       20   reserved, u32 (zero)
//!       24   manifest, JSON
//!       24+m image files' bytes, concatenated in manifest order
//! ```
//! The data bytes are covered by the manifest's per-chunk CRCs, verified when served. A file
//! whose length disagrees with its manifest is refused as truncated or padded.

use std::io::{self, Read};

use thiserror::Error;

use crate::manifest::{Manifest, ManifestError};

pub const SNAPFILE_MAGIC: [u8; 8] = *b"TORPSNAP";
pub const SNAPFILE_VERSION: u32 = 1;
pub const SNAPFILE_HEADER_LEN: u64 = 24;
/// Largest manifest accepted from disk.
pub const MAX_MANIFEST_LEN: u32 = 16 << 20;

/// Why a snapshot file was refused.
#[derive(Debug, Error)]
pub enum SnapfileError {
    #[error("reading snapshot file failed")]
    Io(#[from] io::Error),
    #[error("not a torpor snapshot file (magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error("snapshot file version {0} is not supported (this build reads {SNAPFILE_VERSION})")]
    UnsupportedVersion(u32),
    #[error("manifest of {0} bytes exceeds the {MAX_MANIFEST_LEN} byte limit")]
    ManifestTooLarge(u32),
    #[error("manifest checksum mismatch")]
    ManifestChecksum,
    #[error("manifest is not valid JSON")]
    ManifestJson(#[source] serde_json::Error),
    #[error("manifest is invalid")]
    ManifestInvalid(#[from] ManifestError),
    #[error("file is {actual} bytes, its manifest says {expected}")]
    LengthMismatch { expected: u64, actual: u64 },
}

/// Header and manifest bytes to write before the data.
pub fn encode_prefix(manifest: &Manifest) -> Vec<u8> {
    let json = serde_json::to_vec(manifest).expect("manifest serializes");
    let mut out = Vec::with_capacity(SNAPFILE_HEADER_LEN as usize + json.len());
    out.extend_from_slice(&SNAPFILE_MAGIC);
    out.extend_from_slice(&SNAPFILE_VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// A parsed prefix: the manifest and where the data starts.
#[derive(Debug)]
pub struct Prefix {
    pub manifest: Manifest,
    pub data_offset: u64,
}

impl Prefix {
    /// Byte offset of each file's data, in manifest order.
    pub fn file_offsets(&self) -> Vec<u64> {
        file_offsets(&self.manifest, self.data_offset)
    }
}

/// Byte offset of each file's data when the data starts at `data_offset`.
pub fn file_offsets(manifest: &Manifest, data_offset: u64) -> Vec<u64> {
    let mut off = data_offset;
    manifest
        .files
        .iter()
        .map(|f| {
            let at = off;
            off += f.size;
            at
        })
        .collect()
}

/// Reads and checks the header and manifest; `file_len` is the file's total length.
pub fn decode_prefix<R: Read>(r: &mut R, file_len: u64) -> Result<Prefix, SnapfileError> {
    let mut h = [0u8; SNAPFILE_HEADER_LEN as usize];
    r.read_exact(&mut h)?;
    let magic: [u8; 8] = h[0..8].try_into().expect("8 bytes");
    if magic != SNAPFILE_MAGIC {
        return Err(SnapfileError::BadMagic(magic));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != SNAPFILE_VERSION {
        return Err(SnapfileError::UnsupportedVersion(version));
    }
    let len = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    if len > MAX_MANIFEST_LEN {
        return Err(SnapfileError::ManifestTooLarge(len));
    }
    let crc = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
    let mut json = vec![0u8; len as usize];
    r.read_exact(&mut json)?;
    if crc32c::crc32c(&json) != crc {
        return Err(SnapfileError::ManifestChecksum);
    }
    let manifest: Manifest = serde_json::from_slice(&json).map_err(SnapfileError::ManifestJson)?;
    manifest.validate()?;
    let data_offset = SNAPFILE_HEADER_LEN + len as u64;
    let expected = data_offset + manifest.total_bytes();
    if expected != file_len {
        return Err(SnapfileError::LengthMismatch {
            expected,
            actual: file_len,
        });
    }
    Ok(Prefix {
        manifest,
        data_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::sample_manifest;

    fn file_for(m: &Manifest) -> Vec<u8> {
        let mut bytes = encode_prefix(m);
        bytes.resize(bytes.len() + m.total_bytes() as usize, 0xAB);
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Prefix, SnapfileError> {
        decode_prefix(&mut &bytes[..], bytes.len() as u64)
    }

    #[test]
    fn roundtrip_and_offsets() {
        let m = sample_manifest();
        let bytes = file_for(&m);
        let p = decode(&bytes).unwrap();
        assert_eq!(p.manifest, m);
        let offs = p.file_offsets();
        assert_eq!(offs[1] - offs[0], m.files[0].size);
    }

    #[test]
    fn every_corruption_is_refused() {
        let m = sample_manifest();
        let good = file_for(&m);

        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(decode(&b), Err(SnapfileError::BadMagic(_))));

        let mut b = good.clone();
        b[8] = 2;
        assert!(matches!(
            decode(&b),
            Err(SnapfileError::UnsupportedVersion(2))
        ));

        let mut b = good.clone();
        b[12..16].copy_from_slice(&(MAX_MANIFEST_LEN + 1).to_le_bytes());
        assert!(matches!(
            decode(&b),
            Err(SnapfileError::ManifestTooLarge(_))
        ));

        let mut b = good.clone();
        b[30] ^= 1;
        assert!(matches!(decode(&b), Err(SnapfileError::ManifestChecksum)));

        let b = &good[..good.len() - 1];
        assert!(matches!(
            decode(b),
            Err(SnapfileError::LengthMismatch { .. })
        ));

        assert!(matches!(decode(&good[..10]), Err(SnapfileError::Io(_))));
    }
}
