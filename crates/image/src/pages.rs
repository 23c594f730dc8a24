//! Page-level descriptions of a snapshot's memory that torpor keeps beside CRIU's images, for
//! restoring lazily: where a range of a process's memory has its bytes in the pool. A range
//! can point into an older generation (an incremental snapshot inherits the pages a lazily
//! restored service never touched), so an origin names its generation.
//!
//! It also owns torpor's own per-snapshot page files, each a versioned envelope:
//! [`PageIndex`] (what an incremental snapshot inherits), [`WorkingSet`] (what a service
//! touched right after a wake, to prefetch next time) and [`BlockDigests`] (a BLAKE3 digest per
//! 64 KiB block of a pages file, so a range read from the pool is verified on its own).
//!
//! ```text
//! offset 0   magic, 8 bytes, one per file kind
//!        8   format version, u32 LE
//!       12   body length, u32 LE (at most the kind's maximum)
//!       16   CRC32C of bytes 0..16 and of the body, u32 LE
//!       20   body, little-endian fields (each kind's `encode` documents its body)
//! ```
//! A file must be exactly `20 + body length` bytes long.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::names::{validate_file_name, NameError};

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

/// File name of a snapshot's [`PageIndex`].
pub const PAGE_INDEX_FILE: &str = "torpor-pages.idx";
/// File name of a snapshot's [`WorkingSet`].
pub const WORKING_SET_FILE: &str = "torpor-workingset";
/// The unit [`BlockDigests`] covers: small enough that a fault's read stays cheap to verify,
/// large enough that the digests are 1/2048 of the pages file (and CRIU's own background
/// fill starts at this size).
pub const BLOCK_SIZE: u64 = 64 << 10;

/// Largest [`PageIndex`] body accepted (over a million ranges).
pub const MAX_PAGE_INDEX_LEN: u32 = 64 << 20;
/// Largest [`WorkingSet`] body accepted (a million ranges).
pub const MAX_WORKING_SET_LEN: u32 = 16 << 20;
/// Largest [`BlockDigests`] body accepted: digests of a pages file of up to 128 GiB.
pub const MAX_BLOCK_DIGESTS_LEN: u32 = 64 << 20;

/// The name of the file holding the [`BlockDigests`] of `pages_file`.
pub fn blocks_file_for(pages_file: &str) -> String {
    format!("{pages_file}.blocks")
}

const HEADER_LEN: usize = 20;
const DIGEST_LEN: usize = 32;

/// One kind of envelope.
struct Kind {
    what: &'static str,
    magic: [u8; 8],
    version: u32,
    max_body: u32,
}

const PAGE_INDEX: Kind = Kind {
    what: "page index",
    magic: *b"TORPPIDX",
    version: 1,
    max_body: MAX_PAGE_INDEX_LEN,
};
const WORKING_SET: Kind = Kind {
    what: "working set",
    magic: *b"TORPWSET",
    version: 1,
    max_body: MAX_WORKING_SET_LEN,
};
const BLOCK_DIGESTS: Kind = Kind {
    what: "block digests",
    magic: *b"TORPBLKS",
    version: 1,
    max_body: MAX_BLOCK_DIGESTS_LEN,
};

/// Why a page file was refused, or a range failed verification.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PagesError {
    #[error("{what} file ends inside its header")]
    Truncated { what: &'static str },
    #[error("not a {what} file (magic {found:02x?})")]
    BadMagic { what: &'static str, found: [u8; 8] },
    #[error("{what} file version {version} is not supported (this build reads {supported})")]
    UnsupportedVersion {
        what: &'static str,
        version: u32,
        supported: u32,
    },
    #[error("{what} body of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u32,
    },
    #[error("{what} file is {actual} bytes, its header says {expected}")]
    LengthMismatch {
        what: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("{what} checksum mismatch")]
    Checksum { what: &'static str },
    #[error("{what} body is malformed: {reason}")]
    Malformed {
        what: &'static str,
        reason: &'static str,
    },
    #[error("pid {pid} is invalid: {reason}")]
    BadPid { pid: i32, reason: &'static str },
    #[error("range {start:#x}+{len:#x} of pid {pid} is invalid: {reason}")]
    InvalidRange {
        pid: i32,
        start: u64,
        len: u64,
        reason: &'static str,
    },
    #[error("origin of the range at {start:#x} of pid {pid} names an invalid file")]
    OriginFile {
        pid: i32,
        start: u64,
        #[source]
        source: NameError,
    },
    #[error("offset {offset} is not at a block boundary")]
    UnalignedOffset { offset: u64 },
    #[error("range {offset}+{len} is empty or runs past the {file_size} byte pages file")]
    OutOfRange {
        offset: u64,
        len: u64,
        file_size: u64,
    },
    #[error("range {offset}+{len} ends inside a block")]
    PartialBlock { offset: u64, len: u64 },
    #[error("block {block} at offset {offset} does not match its digest")]
    BlockMismatch { block: u64, offset: u64 },
}

fn checksum(head: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(head), body)
}

/// Wraps `body` in `kind`'s envelope. A body too long for the length field is written with
/// length `u32::MAX`, which every reader refuses as too large.
fn seal(kind: &Kind, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&kind.magic);
    out.extend_from_slice(&kind.version.to_le_bytes());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    let crc = checksum(&out, body);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Checks `kind`'s envelope and returns its body.
fn open<'a>(kind: &Kind, bytes: &'a [u8]) -> Result<Body<'a>, PagesError> {
    let what = kind.what;
    let header: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(PagesError::Truncated { what })?;
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let found: [u8; 8] = header[..8].try_into().expect("8 bytes");
    if found != kind.magic {
        return Err(PagesError::BadMagic { what, found });
    }
    if word(8) != kind.version {
        return Err(PagesError::UnsupportedVersion {
            what,
            version: word(8),
            supported: kind.version,
        });
    }
    let len = word(12);
    if len > kind.max_body {
        return Err(PagesError::TooLarge {
            what,
            len: len.into(),
            max: kind.max_body,
        });
    }
    let expected = HEADER_LEN as u64 + u64::from(len);
    if bytes.len() as u64 != expected {
        return Err(PagesError::LengthMismatch {
            what,
            expected,
            actual: bytes.len() as u64,
        });
    }
    let body = &bytes[HEADER_LEN..];
    if checksum(&header[..16], body) != word(16) {
        return Err(PagesError::Checksum { what });
    }
    Ok(Body { what, bytes: body })
}

/// A cursor over a checked body; running out is a malformed body, never a panic.
struct Body<'a> {
    what: &'static str,
    bytes: &'a [u8],
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PagesError> {
        if self.bytes.len() < n {
            return Err(PagesError::Malformed {
                what: self.what,
                reason: "it ends inside a record",
            });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PagesError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u16(&mut self) -> Result<u16, PagesError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, PagesError> {
        self.array().map(u32::from_le_bytes)
    }

    fn i32(&mut self) -> Result<i32, PagesError> {
        self.array().map(i32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, PagesError> {
        self.array().map(u64::from_le_bytes)
    }

    fn finish(self) -> Result<(), PagesError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(PagesError::Malformed {
                what: self.what,
                reason: "bytes follow the last record",
            })
        }
    }
}

fn check_pid(pid: i32, seen: &mut BTreeSet<i32>) -> Result<(), PagesError> {
    if pid <= 0 {
        return Err(PagesError::BadPid {
            pid,
            reason: "it is not positive",
        });
    }
    if !seen.insert(pid) {
        return Err(PagesError::BadPid {
            pid,
            reason: "it appears more than once",
        });
    }
    Ok(())
}

/// Checks one range of a process given the end of the one before it: page-aligned,
/// non-empty, inside the address space, after its predecessor.
fn check_range(pid: i32, start: u64, len: u64, prev_end: &mut u64) -> Result<(), PagesError> {
    let bad = |reason| PagesError::InvalidRange {
        pid,
        start,
        len,
        reason,
    };
    if !start.is_multiple_of(PAGE_SIZE) {
        return Err(bad("its start is not page-aligned"));
    }
    if !len.is_multiple_of(PAGE_SIZE) {
        return Err(bad("its length is not a multiple of the page size"));
    }
    if len == 0 {
        return Err(bad("it is empty"));
    }
    let end = start
        .checked_add(len)
        .ok_or(bad("it runs past the end of the address space"))?;
    if start < *prev_end {
        return Err(bad("it overlaps or precedes the range before it"));
    }
    *prev_end = end;
    Ok(())
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A count as written: one the readers' size limits would refuse anyway if it does not fit.
fn put_count(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

/// The ranges of one process that an incremental snapshot inherits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRanges {
    /// The pid as recorded in the snapshot's images.
    pub pid: i32,
    /// Ascending, disjoint, page-aligned; each names where its bytes are.
    pub ranges: Vec<PageRange>,
}

/// Per process, the ranges of memory whose bytes an incremental snapshot did not copy but
/// inherits from older generations' pages files (stored as [`PAGE_INDEX_FILE`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageIndex {
    /// One entry per process, each pid at most once.
    pub processes: Vec<ProcessRanges>,
}

impl PageIndex {
    /// The generations the ranges point into: the pool must keep them while this snapshot
    /// lives.
    pub fn generations(&self) -> BTreeSet<u64> {
        self.processes
            .iter()
            .flat_map(|p| p.ranges.iter().map(|r| r.origin.generation))
            .collect()
    }

    /// What [`PageIndex::decode`] checks, for a writer to check before encoding.
    pub fn validate(&self) -> Result<(), PagesError> {
        let mut pids = BTreeSet::new();
        for p in &self.processes {
            check_pid(p.pid, &mut pids)?;
            let mut prev_end = 0;
            for r in &p.ranges {
                check_range(p.pid, r.start, r.len, &mut prev_end)?;
                let bad = |reason| PagesError::InvalidRange {
                    pid: p.pid,
                    start: r.start,
                    len: r.len,
                    reason,
                };
                if !r.origin.offset.is_multiple_of(PAGE_SIZE) {
                    return Err(bad("its origin offset is not page-aligned"));
                }
                if r.origin.offset.checked_add(r.len).is_none() {
                    return Err(bad("its origin runs past 2^64 bytes"));
                }
                validate_file_name(&r.origin.file).map_err(|source| PagesError::OriginFile {
                    pid: p.pid,
                    start: r.start,
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// The file's bytes. Body: u32 process count; per process i32 pid, u32 range count; per
    /// range u64 start, u64 len, u64 generation, u64 offset, u16 file name length, the name.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        put_count(&mut body, self.processes.len());
        for p in &self.processes {
            body.extend_from_slice(&p.pid.to_le_bytes());
            put_count(&mut body, p.ranges.len());
            for r in &p.ranges {
                put_u64(&mut body, r.start);
                put_u64(&mut body, r.len);
                put_u64(&mut body, r.origin.generation);
                put_u64(&mut body, r.origin.offset);
                // Names over the u16 limit fail validation (255 bytes at most); write a
                // length that cannot match so the file is refused rather than misread.
                let name = r.origin.file.as_bytes();
                body.extend_from_slice(
                    &u16::try_from(name.len()).unwrap_or(u16::MAX).to_le_bytes(),
                );
                body.extend_from_slice(&name[..name.len().min(u16::MAX.into())]);
            }
        }
        seal(&PAGE_INDEX, &body)
    }

    /// Reads and checks a page index file.
    pub fn decode(bytes: &[u8]) -> Result<PageIndex, PagesError> {
        let mut body = open(&PAGE_INDEX, bytes)?;
        let mut processes = Vec::new();
        for _ in 0..body.u32()? {
            let pid = body.i32()?;
            let mut ranges = Vec::new();
            for _ in 0..body.u32()? {
                let (start, len, generation, offset) =
                    (body.u64()?, body.u64()?, body.u64()?, body.u64()?);
                let name_len = body.u16()?.into();
                let file = std::str::from_utf8(body.take(name_len)?)
                    .map_err(|_| PagesError::Malformed {
                        what: PAGE_INDEX.what,
                        reason: "a file name is not UTF-8",
                    })?
                    .to_string();
                ranges.push(PageRange {
                    start,
                    len,
                    origin: Origin {
                        generation,
                        file,
                        offset,
                    },
                });
            }
            processes.push(ProcessRanges { pid, ranges });
        }
        body.finish()?;
        let index = PageIndex { processes };
        index.validate()?;
        Ok(index)
    }
}

/// Per process, the memory it touched in the first moments after a wake, as `(start, len)`
/// ranges: what the next lazy restore prefetches first (stored as [`WORKING_SET_FILE`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    /// Ranges per pid, each list ascending, disjoint and page-aligned.
    pub processes: BTreeMap<i32, Vec<(u64, u64)>>,
}

impl WorkingSet {
    /// Total bytes of the working set: what a prefetch of it moves.
    pub fn bytes(&self) -> u64 {
        self.processes
            .values()
            .flatten()
            .fold(0u64, |sum, &(_, len)| sum.saturating_add(len))
    }

    /// What [`WorkingSet::decode`] checks, for a writer to check before encoding.
    pub fn validate(&self) -> Result<(), PagesError> {
        let mut pids = BTreeSet::new();
        for (&pid, ranges) in &self.processes {
            check_pid(pid, &mut pids)?;
            let mut prev_end = 0;
            for &(start, len) in ranges {
                check_range(pid, start, len, &mut prev_end)?;
            }
        }
        Ok(())
    }

    /// The file's bytes. Body: u32 process count; per process (ascending pid) i32 pid, u32
    /// range count, then u64 start and u64 len per range.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        put_count(&mut body, self.processes.len());
        for (&pid, ranges) in &self.processes {
            body.extend_from_slice(&pid.to_le_bytes());
            put_count(&mut body, ranges.len());
            for &(start, len) in ranges {
                put_u64(&mut body, start);
                put_u64(&mut body, len);
            }
        }
        seal(&WORKING_SET, &body)
    }

    /// Reads and checks a working-set file.
    pub fn decode(bytes: &[u8]) -> Result<WorkingSet, PagesError> {
        let mut body = open(&WORKING_SET, bytes)?;
        let mut processes = BTreeMap::new();
        for _ in 0..body.u32()? {
            let pid = body.i32()?;
            let mut ranges = Vec::new();
            for _ in 0..body.u32()? {
                ranges.push((body.u64()?, body.u64()?));
            }
            if processes.insert(pid, ranges).is_some() {
                return Err(PagesError::BadPid {
                    pid,
                    reason: "it appears more than once",
                });
            }
        }
        body.finish()?;
        let set = WorkingSet { processes };
        set.validate()?;
        Ok(set)
    }
}

/// A BLAKE3 digest of every [`BLOCK_SIZE`] block of a pages file (the last block may be
/// short), stored beside it as [`blocks_file_for`] its name: a lazy restore reads a range of
/// the file from the pool and verifies it without the whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDigests {
    file_size: u64,
    digests: Vec<[u8; DIGEST_LEN]>,
}

impl BlockDigests {
    /// Size of the pages file the digests describe.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// Number of blocks, the last possibly short.
    pub fn block_count(&self) -> u64 {
        self.digests.len() as u64
    }

    /// Checks `bytes`, read from the pages file at `offset`: the offset must start a block,
    /// and `bytes` must be whole blocks, the last one allowed to be the file's short tail.
    pub fn verify(&self, offset: u64, bytes: &[u8]) -> Result<(), PagesError> {
        let len = bytes.len() as u64;
        if !offset.is_multiple_of(BLOCK_SIZE) {
            return Err(PagesError::UnalignedOffset { offset });
        }
        let end = match offset.checked_add(len) {
            Some(end) if len > 0 && end <= self.file_size => end,
            _ => {
                return Err(PagesError::OutOfRange {
                    offset,
                    len,
                    file_size: self.file_size,
                })
            }
        };
        if !len.is_multiple_of(BLOCK_SIZE) && end != self.file_size {
            return Err(PagesError::PartialBlock { offset, len });
        }
        let first = offset / BLOCK_SIZE;
        for (i, block) in bytes.chunks(BLOCK_SIZE as usize).enumerate() {
            let index = first + i as u64;
            // blake3::Hash compares in constant time.
            if blake3::hash(block) != blake3::Hash::from(self.digests[index as usize]) {
                return Err(PagesError::BlockMismatch {
                    block: index,
                    offset: index * BLOCK_SIZE,
                });
            }
        }
        Ok(())
    }

    /// The file's bytes. Body: u64 pages file size, then the 32-byte digest of each block.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(8 + self.digests.len() * DIGEST_LEN);
        put_u64(&mut body, self.file_size);
        for d in &self.digests {
            body.extend_from_slice(d);
        }
        seal(&BLOCK_DIGESTS, &body)
    }

    /// Reads and checks a block digests file.
    pub fn decode(bytes: &[u8]) -> Result<BlockDigests, PagesError> {
        let mut body = open(&BLOCK_DIGESTS, bytes)?;
        let file_size = body.u64()?;
        let blocks = file_size.div_ceil(BLOCK_SIZE);
        if body.bytes.len() as u64 != blocks.saturating_mul(DIGEST_LEN as u64) {
            return Err(PagesError::Malformed {
                what: BLOCK_DIGESTS.what,
                reason: "the digest count does not match the file size",
            });
        }
        let digests = body
            .bytes
            .chunks_exact(DIGEST_LEN)
            .map(|d| d.try_into().expect("32 bytes"))
            .collect();
        Ok(BlockDigests { file_size, digests })
    }
}

/// Builds [`BlockDigests`] from a pages file streamed through in pieces of any size.
#[derive(Debug, Default)]
pub struct BlockHasher {
    /// Digest state of the block being filled, `filled` bytes into it.
    current: blake3::Hasher,
    filled: u64,
    file_size: u64,
    digests: Vec<[u8; DIGEST_LEN]>,
}

impl BlockHasher {
    /// A hasher at the start of a pages file.
    pub fn new() -> BlockHasher {
        BlockHasher::default()
    }

    /// Feeds the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        self.file_size += data.len() as u64;
        while !data.is_empty() {
            if self.filled == 0 && data.len() as u64 >= BLOCK_SIZE {
                // A whole block in hand: one call, no copy into the streaming state.
                let (block, rest) = data.split_at(BLOCK_SIZE as usize);
                self.digests.push(*blake3::hash(block).as_bytes());
                data = rest;
                continue;
            }
            let take = ((BLOCK_SIZE - self.filled) as usize).min(data.len());
            let (part, rest) = data.split_at(take);
            self.current.update(part);
            self.filled += take as u64;
            data = rest;
            if self.filled == BLOCK_SIZE {
                self.close_block();
            }
        }
    }

    fn close_block(&mut self) {
        self.digests.push(*self.current.finalize().as_bytes());
        self.current.reset();
        self.filled = 0;
    }

    /// The digests of everything fed, the last block short if the size is not a multiple.
    pub fn finish(mut self) -> BlockDigests {
        if self.filled > 0 {
            self.close_block();
        }
        BlockDigests {
            file_size: self.file_size,
            digests: self.digests,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::prelude::*;
    use rand::{rngs::SmallRng, RngCore, SeedableRng};

    use super::*;

    const P: u64 = PAGE_SIZE;
    const B: usize = BLOCK_SIZE as usize;

    fn range(start: u64, len: u64, generation: u64, offset: u64) -> PageRange {
        PageRange {
            start,
            len,
            origin: Origin {
                generation,
                file: format!("pages-{generation}.img"),
                offset,
            },
        }
    }

    fn sample_index() -> PageIndex {
        PageIndex {
            processes: vec![
                ProcessRanges {
                    pid: 40,
                    ranges: vec![range(0x10000, 2 * P, 3, 0), range(0x20000, P, 1, 8 * P)],
                },
                ProcessRanges {
                    pid: 7,
                    ranges: vec![range(0x7000, 4 * P, 3, 16 * P)],
                },
                ProcessRanges {
                    pid: 9,
                    ranges: vec![],
                },
            ],
        }
    }

    fn sample_set() -> WorkingSet {
        WorkingSet {
            processes: BTreeMap::from([
                (7, vec![(0x1000, P), (0x5000, 3 * P)]),
                (8, vec![(0x7f00_0000_0000, 16 * P)]),
            ]),
        }
    }

    fn file_data(len: usize, seed: u64) -> Vec<u8> {
        let mut data = vec![0u8; len];
        SmallRng::seed_from_u64(seed).fill_bytes(&mut data);
        data
    }

    fn digests_of(data: &[u8]) -> BlockDigests {
        let mut h = BlockHasher::new();
        h.update(data);
        h.finish()
    }

    /// A kind's decoder, reduced to pass or fail.
    type Decoder = fn(&[u8]) -> Result<(), PagesError>;

    /// One valid file of each kind, with the decoder that reads it.
    fn samples() -> Vec<(&'static str, Vec<u8>, Decoder)> {
        vec![
            ("page index", sample_index().encode(), |b| {
                PageIndex::decode(b).map(drop)
            }),
            ("working set", sample_set().encode(), |b| {
                WorkingSet::decode(b).map(drop)
            }),
            (
                "block digests",
                digests_of(&file_data(3 * B + 100, 1)).encode(),
                |b| BlockDigests::decode(b).map(drop),
            ),
        ]
    }

    /// Rewrites the header's CRC so that a change elsewhere is what gets detected.
    fn reseal(bytes: &mut [u8]) {
        let crc = checksum(&bytes[..16], &bytes[HEADER_LEN..]);
        bytes[16..20].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn samples_roundtrip_and_generations_and_bytes() {
        let index = sample_index();
        assert_eq!(PageIndex::decode(&index.encode()).unwrap(), index);
        assert_eq!(index.generations(), BTreeSet::from([1, 3]));
        assert_eq!(PageIndex::default().generations(), BTreeSet::new());
        let set = sample_set();
        assert_eq!(WorkingSet::decode(&set.encode()).unwrap(), set);
        assert_eq!(set.bytes(), 20 * P);
        assert_eq!(blocks_file_for("pages-3.img"), "pages-3.img.blocks");
    }

    #[test]
    fn bad_magic_is_refused() {
        let files = samples();
        for (what, bytes, decode) in &files {
            let mut bad = bytes.clone();
            bad[0] ^= 0x20;
            assert!(
                matches!(decode(&bad), Err(PagesError::BadMagic { what: w, .. }) if w == *what),
                "{what}"
            );
            // Nor is any other kind's file read as this kind.
            for (other, other_bytes, _) in &files {
                if other != what {
                    assert!(matches!(
                        decode(other_bytes),
                        Err(PagesError::BadMagic { .. })
                    ));
                }
            }
        }
    }

    #[test]
    fn unknown_version_is_refused() {
        for (what, mut bytes, decode) in samples() {
            bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
            reseal(&mut bytes);
            assert_eq!(
                decode(&bytes),
                Err(PagesError::UnsupportedVersion {
                    what,
                    version: 2,
                    supported: 1
                })
            );
        }
    }

    #[test]
    fn truncated_or_padded_files_are_refused() {
        for (what, bytes, decode) in samples() {
            for cut in 0..bytes.len() {
                match decode(&bytes[..cut]) {
                    Err(PagesError::Truncated { .. }) => assert!(cut < HEADER_LEN),
                    Err(PagesError::LengthMismatch { actual, .. }) => {
                        assert_eq!(actual, cut as u64)
                    }
                    other => panic!("{what} cut at {cut}: {other:?}"),
                }
            }
            let mut padded = bytes.clone();
            padded.push(0);
            assert!(matches!(
                decode(&padded),
                Err(PagesError::LengthMismatch { .. })
            ));
        }
    }

    #[test]
    fn checksum_mismatch_is_refused() {
        for (what, bytes, decode) in samples() {
            for at in [16, HEADER_LEN, bytes.len() - 1] {
                let mut bad = bytes.clone();
                bad[at] ^= 1;
                assert_eq!(
                    decode(&bad),
                    Err(PagesError::Checksum { what }),
                    "byte {at}"
                );
            }
        }
    }

    #[test]
    fn oversize_body_is_refused_before_reading_it() {
        for (max, (what, bytes, decode)) in [
            MAX_PAGE_INDEX_LEN,
            MAX_WORKING_SET_LEN,
            MAX_BLOCK_DIGESTS_LEN,
        ]
        .into_iter()
        .zip(samples())
        {
            for len in [max + 1, u32::MAX] {
                let mut bad = bytes[..HEADER_LEN].to_vec();
                bad[12..16].copy_from_slice(&len.to_le_bytes());
                assert_eq!(
                    decode(&bad),
                    Err(PagesError::TooLarge {
                        what,
                        len: len.into(),
                        max
                    })
                );
            }
        }
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let malformed = |r: Result<(), PagesError>| matches!(r, Err(PagesError::Malformed { .. }));
        for (what, bytes, decode) in samples() {
            // A body cut short, with its header and CRC made consistent.
            let mut short = bytes[..bytes.len() - 1].to_vec();
            let len = (short.len() - HEADER_LEN) as u32;
            short[12..16].copy_from_slice(&len.to_le_bytes());
            reseal(&mut short);
            assert!(malformed(decode(&short)), "{what}");
            // A byte after the last record.
            let mut long = bytes.clone();
            long.push(0);
            long[12..16].copy_from_slice(&(len + 2).to_le_bytes());
            reseal(&mut long);
            assert!(malformed(decode(&long)), "{what}");
        }
        // A count promising records that are not there.
        let mut huge = seal(&WORKING_SET, &u32::MAX.to_le_bytes());
        assert!(malformed(WorkingSet::decode(&huge).map(drop)));
        huge = seal(&PAGE_INDEX, &u32::MAX.to_le_bytes());
        assert!(malformed(PageIndex::decode(&huge).map(drop)));
        // A file name that is not UTF-8.
        let mut index = PageIndex {
            processes: vec![ProcessRanges {
                pid: 1,
                ranges: vec![range(0, P, 1, 0)],
            }],
        }
        .encode();
        let at = index.len() - 1;
        index[at] = 0xff;
        reseal(&mut index);
        assert!(malformed(PageIndex::decode(&index).map(drop)));
    }

    fn index_with(pid: i32, ranges: Vec<PageRange>) -> PageIndex {
        PageIndex {
            processes: vec![ProcessRanges { pid, ranges }],
        }
    }

    #[test]
    fn invalid_ranges_are_refused() {
        let cases: Vec<(Vec<(u64, u64)>, &str)> = vec![
            (vec![(0x1001, P)], "start is not page-aligned"),
            (vec![(0x1000, P + 1)], "length is not a multiple"),
            (vec![(0x1000, 0)], "empty"),
            (vec![(u64::MAX - P + 1, 2 * P)], "past the end"),
            (vec![(0x1000, 2 * P), (0x2000, P)], "overlaps"),
            (vec![(0x5000, P), (0x1000, P)], "overlaps"),
        ];
        for (ranges, want) in cases {
            let set = WorkingSet {
                processes: BTreeMap::from([(5, ranges.clone())]),
            };
            let index = index_with(5, ranges.iter().map(|&(s, l)| range(s, l, 1, 0)).collect());
            for r in [
                WorkingSet::decode(&set.encode()).map(drop),
                PageIndex::decode(&index.encode()).map(drop),
            ] {
                match r {
                    Err(PagesError::InvalidRange { pid: 5, reason, .. }) => {
                        assert!(reason.contains(want), "{reason} vs {want}")
                    }
                    other => panic!("{ranges:?}: {other:?}"),
                }
            }
        }
        // Origins: unaligned, overflowing, badly named.
        let mut r = range(0, P, 1, 0x10);
        assert!(matches!(
            PageIndex::decode(&index_with(1, vec![r.clone()]).encode()),
            Err(PagesError::InvalidRange { reason, .. }) if reason.contains("origin offset")
        ));
        r.origin.offset = u64::MAX - P + 1;
        assert!(matches!(
            PageIndex::decode(&index_with(1, vec![r.clone()]).encode()),
            Err(PagesError::InvalidRange { reason, .. }) if reason.contains("origin runs past")
        ));
        for file in ["", "../pages-1.img", ".hidden"] {
            r.origin = Origin {
                generation: 1,
                file: file.into(),
                offset: 0,
            };
            assert!(matches!(
                PageIndex::decode(&index_with(1, vec![r.clone()]).encode()),
                Err(PagesError::OriginFile {
                    pid: 1,
                    start: 0,
                    ..
                })
            ));
        }
    }

    #[test]
    fn invalid_pids_are_refused() {
        for pid in [0, -3] {
            assert!(matches!(
                PageIndex::decode(&index_with(pid, vec![]).encode()),
                Err(PagesError::BadPid { .. })
            ));
            let set = WorkingSet {
                processes: BTreeMap::from([(pid, vec![])]),
            };
            assert!(matches!(
                WorkingSet::decode(&set.encode()),
                Err(PagesError::BadPid { .. })
            ));
        }
        let mut index = sample_index();
        index.processes[2].pid = 40;
        assert_eq!(
            PageIndex::decode(&index.encode()),
            Err(PagesError::BadPid {
                pid: 40,
                reason: "it appears more than once"
            })
        );
        // A working set written with one pid twice (a map cannot hold it: build the body).
        let mut body = 2u32.to_le_bytes().to_vec();
        for _ in 0..2 {
            body.extend(7i32.to_le_bytes());
            body.extend(0u32.to_le_bytes());
        }
        assert!(matches!(
            WorkingSet::decode(&seal(&WORKING_SET, &body)),
            Err(PagesError::BadPid { pid: 7, .. })
        ));
    }

    #[test]
    fn block_digests_whose_count_disagrees_with_the_size_are_refused() {
        let d = digests_of(&file_data(2 * B, 2));
        let mut bytes = d.encode();
        // Claim one more byte: a third (short) block with no digest.
        bytes[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&(2 * BLOCK_SIZE + 1).to_le_bytes());
        reseal(&mut bytes);
        assert!(matches!(
            BlockDigests::decode(&bytes),
            Err(PagesError::Malformed { .. })
        ));
        // A size whose block count overflows the digest length computation.
        let body = u64::MAX.to_le_bytes();
        assert!(matches!(
            BlockDigests::decode(&seal(&BLOCK_DIGESTS, &body)),
            Err(PagesError::Malformed { .. })
        ));
    }

    #[test]
    fn verify_accepts_right_blocks_and_refuses_wrong_ones() {
        let data = file_data(3 * B + 100, 3);
        let d = BlockDigests::decode(&digests_of(&data).encode()).unwrap();
        assert_eq!(d.file_size(), data.len() as u64);
        assert_eq!(d.block_count(), 4);
        let off = |block: usize| (block * B) as u64;
        // Right: the whole file, one block, a run ending in the short tail, the tail alone.
        d.verify(0, &data).unwrap();
        d.verify(off(1), &data[B..2 * B]).unwrap();
        d.verify(off(2), &data[2 * B..]).unwrap();
        d.verify(off(3), &data[3 * B..]).unwrap();
        // A flipped byte.
        let mut flipped = data[B..3 * B].to_vec();
        flipped[B + 17] ^= 0x40;
        assert_eq!(
            d.verify(off(1), &flipped),
            Err(PagesError::BlockMismatch {
                block: 2,
                offset: off(2)
            })
        );
        // Right bytes at the wrong offset.
        assert_eq!(
            d.verify(off(0), &data[B..2 * B]),
            Err(PagesError::BlockMismatch {
                block: 0,
                offset: 0
            })
        );
        // An offset inside a block.
        assert_eq!(
            d.verify(4096, &data[4096..4096 + B]),
            Err(PagesError::UnalignedOffset { offset: 4096 })
        );
        // Part of a block that is not the tail.
        assert_eq!(
            d.verify(off(1), &data[B..B + 100]),
            Err(PagesError::PartialBlock {
                offset: off(1),
                len: 100
            })
        );
        // Past the end, and nothing at all.
        assert!(matches!(
            d.verify(off(4), &data[..B]),
            Err(PagesError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.verify(off(3), &data[..B]),
            Err(PagesError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.verify(0, &[]),
            Err(PagesError::OutOfRange { .. })
        ));
        // The tail's digest covers exactly the tail: a padded tail is refused.
        let mut padded = data[3 * B..].to_vec();
        padded.push(0);
        assert!(d.verify(off(3), &padded).is_err());
        // An empty file has no blocks and verifies nothing.
        let empty = BlockHasher::new().finish();
        assert_eq!(empty.block_count(), 0);
        assert_eq!(BlockDigests::decode(&empty.encode()).unwrap(), empty);
    }

    /// Hashing speed of 64 MiB, printed (run with `--release --nocapture`); what is asserted
    /// is that the streamed digests equal each block's own.
    #[test]
    fn hashes_64_mib_streamed_like_block_by_block() {
        let data = file_data(64 << 20, 4);
        let start = Instant::now();
        let mut h = BlockHasher::new();
        // Pieces that straddle block boundaries, as pipe reads would.
        for piece in data.chunks(100_000) {
            h.update(piece);
        }
        let d = h.finish();
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "BlockHasher: 64 MiB in {:.1} ms, {:.0} MiB/s",
            secs * 1e3,
            64.0 / secs
        );
        let start = Instant::now();
        let whole = digests_of(&data);
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "BlockHasher: 64 MiB in one update in {:.1} ms, {:.0} MiB/s",
            secs * 1e3,
            64.0 / secs
        );
        assert_eq!(d, whole);
        assert_eq!(d.block_count(), 1024);
        for (i, block) in data.chunks(B).enumerate() {
            assert_eq!(d.digests[i], *blake3::hash(block).as_bytes());
        }
    }

    fn ranges_strategy() -> impl Strategy<Value = Vec<(u64, u64)>> {
        proptest::collection::vec((0u64..8, 1u64..8), 0..8).prop_map(|gaps| {
            let mut at = 0;
            gaps.into_iter()
                .map(|(gap, pages)| {
                    at += gap * P;
                    let r = (at, pages * P);
                    at += pages * P;
                    r
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn any_page_index_roundtrips(
            procs in proptest::collection::btree_map(1i32..=i32::MAX, (ranges_strategy(), proptest::collection::vec((0u64..1000, 0u64..1 << 30), 8)), 0..5),
        ) {
            let index = PageIndex {
                processes: procs
                    .into_iter()
                    .map(|(pid, (ranges, origins))| ProcessRanges {
                        pid,
                        ranges: ranges
                            .into_iter()
                            .zip(origins)
                            .map(|((s, l), (g, o))| range(s, l, g, o * P))
                            .collect(),
                    })
                    .collect(),
            };
            prop_assert_eq!(PageIndex::decode(&index.encode()).unwrap(), index);
        }

        #[test]
        fn any_working_set_roundtrips(
            procs in proptest::collection::btree_map(1i32..=i32::MAX, ranges_strategy(), 0..5),
        ) {
            let set = WorkingSet { processes: procs };
            prop_assert_eq!(WorkingSet::decode(&set.encode()).unwrap(), set);
        }

        #[test]
        fn block_digests_roundtrip_whatever_the_split(
            len in 0usize..5 * B,
            seed in proptest::num::u64::ANY,
            mut splits in proptest::collection::vec(proptest::num::usize::ANY, 0..6),
        ) {
            let data = file_data(len, seed);
            let mut h = BlockHasher::new();
            splits.iter_mut().for_each(|s| *s %= len.max(1));
            splits.sort_unstable();
            let mut at = 0;
            for s in splits.into_iter().chain([len]) {
                h.update(&data[at..s.max(at)]);
                at = s.max(at);
            }
            let d = h.finish();
            prop_assert_eq!(&d, &digests_of(&data));
            prop_assert_eq!(d.file_size(), len as u64);
            prop_assert_eq!(BlockDigests::decode(&d.encode()).unwrap(), d.clone());
            if len > 0 {
                prop_assert!(d.verify(0, &data).is_ok());
            }
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            for kind in [&PAGE_INDEX, &WORKING_SET, &BLOCK_DIGESTS] {
                // Sealed, so the body parsers are reached.
                let sealed = seal(kind, &bytes);
                let _ = PageIndex::decode(&sealed);
                let _ = WorkingSet::decode(&sealed);
                let _ = BlockDigests::decode(&sealed);
            }
            let _ = PageIndex::decode(&bytes);
        }
    }
}
