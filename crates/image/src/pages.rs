//! Page-level descriptions of a snapshot's memory that torpor keeps beside CRIU's images, for
//! restoring lazily: where a range of a process's memory has its bytes in the pool. A range
//! can point into an older generation (an incremental snapshot inherits the pages a lazily
//! restored service never touched), so an origin names its generation.

use serde::{Deserialize, Serialize};

/// The page size CRIU's images and userfaultfd work in on every architecture torpor runs on.
pub const PAGE_SIZE: u64 = 4096;

/// Where a range's bytes are stored in the pool: one file of one generation of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// The generation holding the bytes: an older one for pages an incremental snapshot
    /// inherited, so that they are never copied again.
    pub generation: u64,
    /// The image file (a CRIU `pages-N.img`).
    pub file: String,
    /// Offset in that file of the range's first byte.
    pub offset: u64,
}

impl Origin {
    /// The origin of the byte `delta` bytes further on.
    pub fn advanced(&self, delta: u64) -> Origin {
        Origin {
            generation: self.generation,
            file: self.file.clone(),
            offset: self.offset + delta,
        }
    }
}

/// A page-aligned range of one process's address space whose bytes come from the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRange {
    /// Address of the first byte in the process as restored (ranges follow `mremap`).
    pub start: u64,
    /// Length in bytes, a multiple of [`PAGE_SIZE`].
    pub len: u64,
    /// Where the byte at `start` is stored.
    pub origin: Origin,
}

impl PageRange {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}
