//! What the pool's integration tests share: test data and a client's put and get.

use anyhow::Result;
use torpor_image::{manifest::SnapshotMeta, CHUNK_SIZE};
use torpor_pool::PoolClient;

/// `len` bytes that differ with `seed` and along the buffer.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Uploads files (name, bytes) under `name`, in frames of a third of a chunk (so chunk and
/// frame boundaries differ), and commits; returns the generation.
pub fn put(c: &mut PoolClient, name: &str, files: &[(&str, Vec<u8>)]) -> Result<u64> {
    c.put_begin(name, SnapshotMeta::default(), None)?;
    for (id, (fname, bytes)) in files.iter().enumerate() {
        c.file_open(id as u32, fname)?;
        for piece in bytes.chunks(CHUNK_SIZE as usize / 3) {
            c.file_data(id as u32, piece)?;
        }
        c.file_close(id as u32, bytes.len() as u64)?;
    }
    Ok(c.commit(None, None)?.generation)
}

/// One file of a committed snapshot, whole.
pub fn get(c: &mut PoolClient, name: &str, generation: u64, file: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    c.get_file(name, generation, file, |b| {
        out.extend_from_slice(b);
        Ok(())
    })?;
    Ok(out)
}
