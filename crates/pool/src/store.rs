//! Snapshots held by the pool: named, with increasing generations, visible only once
//! committed whole. New uploads go to the RAM tier; when it has no free chunk the least
//! recently used committed snapshot is written whole to the disk tier (the spill directory)
//! and its memory reused. Without a spill directory the upload is refused instead: nothing
//! is evicted silently. Every chunk's CRC32C is checked each time it is served; a byte range
//! is checked against the CRC32C of each [`BLOCK_SIZE`] block it touches instead, so a page
//! fault's read costs its blocks, not a whole chunk.
//!
//! The spill directory holds whole process memories, keys included: it is created 0700, its
//! files 0600, and at start a directory owned by someone else or writable by group or others
//! is refused, and a file in it that is not ours alone is not loaded (a planted file would
//! otherwise be restored as root).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::{self, File},
    io::{self, Write},
    mem,
    os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use thiserror::Error;
use torpor_image::{
    format_bytes,
    manifest::SnapshotMeta,
    pages::{PageIndex, PAGE_INDEX_FILE},
    seal::Seal,
    snapfile::{self, SnapfileError},
    validate_file_name, validate_snapshot_name,
    wire::{ErrorCode, SnapshotInfo, Tier, MAX_RANGE_LEN},
    FileEntry, Manifest, NameError, CHUNK_SIZE,
};
use tracing::{info, warn};

use crate::{
    arena::{Arena, Chunk, Tail},
    crc,
};

/// Granularity of the checksums that range reads verify: a range costs the blocks it touches.
/// A page: CRIU's lazy restore fetches exactly one page per fault, so a fault's check is one
/// 4 KiB CRC (64 KiB blocks cost 2.6–7 µs of a 16 µs round trip), at 1 KiB of checksums per
/// MiB held.
pub const BLOCK_SIZE: u64 = 4 << 10;
const BLOCKS_PER_CHUNK: usize = (CHUNK_SIZE / BLOCK_SIZE) as usize;
/// Combines a whole block's CRC onto what precedes it with a few table lookups: at one
/// block per page, general combining would cost more than the checksums themselves.
static BLOCK_SHIFT: crc::Shift = crc::Shift::new(BLOCK_SIZE as usize);

/// The CRC32C of `a ++ b` from theirs, `b` being `len` long.
fn join(crc_a: u32, crc_b: u32, len: usize) -> u32 {
    if len == BLOCK_SIZE as usize {
        BLOCK_SHIFT.combine(crc_a, crc_b)
    } else {
        crc::combine(crc_a, crc_b, len)
    }
}
const _: () = assert!(
    CHUNK_SIZE.is_multiple_of(BLOCK_SIZE),
    "blocks never straddle chunks"
);

/// How a store is set up.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Bytes of RAM tier, pre-faulted at start.
    pub capacity: u64,
    /// Disk tier; `None` means full RAM refuses new uploads.
    pub spill_dir: Option<PathBuf>,
    /// Generations kept per name (at least 1).
    pub keep: usize,
}

/// Why a store operation failed.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot reserve {} of RAM tier", format_bytes(*capacity))]
    Arena {
        capacity: u64,
        #[source]
        source: io::Error,
    },
    #[error("spill directory {path} is unusable")]
    SpillDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spill directory {path} is unsafe: {problem}; it would hold whole process memories and feed restores run as root")]
    SpillDirUnsafe { path: PathBuf, problem: String },
    #[error("pool RAM tier is full ({} in use) and the pool has no spill directory: restart it with --spill-dir to move least-recently-used snapshots to disk, or give it more --capacity", format_bytes(*capacity))]
    FullNoSpill { capacity: u64 },
    #[error("pool RAM tier is full ({} in use) and holds nothing that can be spilled: the snapshot being stored is larger than the RAM tier", format_bytes(*capacity))]
    FullNothingToSpill { capacity: u64 },
    #[error("spilling snapshot {name:?} generation {generation} to {path} failed")]
    Spill {
        name: String,
        generation: u64,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the pool has no spill directory to persist its snapshots to")]
    NoDiskTier,
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    #[error("snapshot {name:?} has no generation {generation}")]
    GenerationNotFound { name: String, generation: u64 },
    #[error("snapshot {name:?} generation {generation} has no file {file:?}")]
    FileNotFound {
        name: String,
        generation: u64,
        file: String,
    },
    #[error("snapshot {name:?} generation {generation} file {file:?} chunk {chunk} fails its checksum: stored bytes are corrupt")]
    Corrupt {
        name: String,
        generation: u64,
        file: String,
        chunk: usize,
    },
    #[error("a range of 0 bytes was asked for")]
    EmptyRange,
    #[error("a range of {len} bytes exceeds the {MAX_RANGE_LEN} byte limit")]
    RangeTooLong { len: u64 },
    #[error(
        "range of {len} bytes at {offset} lies beyond the end of file {file:?} ({size} bytes)"
    )]
    RangeBeyondEnd {
        file: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("reading {path} from the disk tier failed")]
    DiskRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("bad upload: {0}")]
    Upload(String),
    #[error("snapshot {name:?} already has generation {last}; generation {generation} would not be newer")]
    StaleGeneration {
        name: String,
        generation: u64,
        last: u64,
    },
}

impl StoreError {
    /// The wire error class for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::FullNoSpill { .. } | StoreError::FullNothingToSpill { .. } => {
                ErrorCode::Full
            }
            StoreError::NotFound(_)
            | StoreError::GenerationNotFound { .. }
            | StoreError::FileNotFound { .. } => ErrorCode::NotFound,
            StoreError::Corrupt { .. } => ErrorCode::Corrupt,
            StoreError::Name(_)
            | StoreError::Upload(_)
            | StoreError::StaleGeneration { .. }
            | StoreError::EmptyRange
            | StoreError::RangeTooLong { .. }
            | StoreError::RangeBeyondEnd { .. } => ErrorCode::BadRequest,
            StoreError::Arena { .. }
            | StoreError::NoDiskTier
            | StoreError::SpillDir { .. }
            | StoreError::SpillDirUnsafe { .. }
            | StoreError::Spill { .. }
            | StoreError::DiskRead { .. } => ErrorCode::Internal,
        }
    }
}

/// The bytes of a committed snapshot, wherever they are.
#[derive(Debug, Clone)]
pub enum StoredData {
    /// Each file's bytes, in manifest order.
    Ram(Arc<Vec<RamFile>>),
    Disk(Arc<DiskFile>),
}

/// One file of a snapshot in the RAM tier: whole chunks, then the rest in an exact-size tail.
#[derive(Debug)]
pub struct RamFile {
    chunks: Vec<Chunk>,
    tail: Option<Tail>,
    /// Known from the upload; moves to the disk tier with the bytes.
    blocks: Arc<BlockCrcs>,
}

impl RamFile {
    /// The bytes of chunk `i` (the tail is the last one).
    pub fn chunk(&self, i: usize) -> &[u8] {
        match self.chunks.get(i) {
            Some(c) => c.bytes(),
            None if i == self.chunks.len() => self.tail.as_ref().map_or(&[], Tail::bytes),
            None => &[],
        }
    }

    fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks
            .iter()
            .map(Chunk::bytes)
            .chain(self.tail.as_ref().map(Tail::bytes))
    }
}

/// A snapshot in the spill directory.
#[derive(Debug)]
pub struct DiskFile {
    path: PathBuf,
    /// Opened once: every served chunk is a positioned read on it, not a fresh open.
    file: File,
    /// Start of each file's bytes, in manifest order.
    offsets: Vec<u64>,
    /// Each file's block CRCs, in manifest order.
    blocks: Vec<Arc<BlockCrcs>>,
}

/// The CRC32C of each [`BLOCK_SIZE`] block of one file, grouped by chunk. The manifest's chunk
/// CRCs stay the authority: block CRCs are computed in the same pass as those on upload, or
/// derived from a chunk verified whole against its CRC (a snapshot found in the disk tier at
/// start has none until a range read touches its chunk).
#[derive(Debug)]
pub struct BlockCrcs {
    per_chunk: Vec<OnceLock<Box<[u32]>>>,
}

impl BlockCrcs {
    /// From a file's block CRCs in order.
    fn known(blocks: &[u32]) -> BlockCrcs {
        BlockCrcs {
            per_chunk: blocks
                .chunks(BLOCKS_PER_CHUNK)
                .map(|c| OnceLock::from(Box::<[u32]>::from(c)))
                .collect(),
        }
    }

    /// For a file of `chunks` chunks whose blocks are derived when first read.
    fn unknown(chunks: usize) -> BlockCrcs {
        BlockCrcs {
            per_chunk: (0..chunks).map(|_| OnceLock::new()).collect(),
        }
    }
}

/// The CRC32C of each [`BLOCK_SIZE`] block of `bytes`.
fn block_crcs_of(bytes: &[u8]) -> Box<[u32]> {
    bytes
        .chunks(BLOCK_SIZE as usize)
        .map(crc32c::crc32c)
        .collect()
}

/// The CRC32C of a chunk from its blocks' CRCs; `len` is the chunk's length.
fn chunk_crc_from_blocks(blocks: &[u32], len: usize) -> u32 {
    blocks.iter().enumerate().fold(0, |acc, (i, b)| {
        let block_len = (len - i * BLOCK_SIZE as usize).min(BLOCK_SIZE as usize);
        join(acc, *b, block_len)
    })
}

/// Checks the blocks that `head ++ range ++ tail` covers against `crcs` (the span starts on
/// a block boundary and ends on one or at the file's end) and returns the CRC32C of `range`,
/// in one pass over the span. `None` when a block does not match.
fn verify_blocks(crcs: &[u32], head: &[u8], range: &[u8], tail: &[u8]) -> Option<u32> {
    let (mut block, mut in_block, mut block_crc, mut range_crc) = (0, 0, 0, 0);
    for (part, in_range) in [(head, false), (range, true), (tail, false)] {
        let mut rest = part;
        while !rest.is_empty() {
            let (seg, more) = rest.split_at(rest.len().min(BLOCK_SIZE as usize - in_block));
            let c = crc32c::crc32c(seg);
            block_crc = join(block_crc, c, seg.len());
            if in_range {
                range_crc = join(range_crc, c, seg.len());
            }
            in_block += seg.len();
            if in_block == BLOCK_SIZE as usize {
                if crcs.get(block) != Some(&block_crc) {
                    return None;
                }
                (block, in_block, block_crc) = (block + 1, 0, 0);
            }
            rest = more;
        }
    }
    // The file's last block may be short.
    if in_block > 0 && crcs.get(block) != Some(&block_crc) {
        return None;
    }
    Some(range_crc)
}

/// The CRC32C of `len` bytes starting at a block boundary from their blocks' CRCs `crcs`.
fn combine_blocks(crcs: &[u32], len: usize) -> u32 {
    let mut crc = 0;
    let mut left = len;
    for &c in crcs {
        if left == 0 {
            break;
        }
        let n = left.min(BLOCK_SIZE as usize);
        crc = join(crc, c, n);
        left -= n;
    }
    crc
}

/// Refuses a range of a file that is empty, longer than [`MAX_RANGE_LEN`] or not inside it.
pub fn check_range(entry: &FileEntry, offset: u64, len: u64) -> Result<(), StoreError> {
    if len == 0 {
        return Err(StoreError::EmptyRange);
    }
    if len > MAX_RANGE_LEN {
        return Err(StoreError::RangeTooLong { len });
    }
    if offset.checked_add(len).is_none_or(|end| end > entry.size) {
        return Err(StoreError::RangeBeyondEnd {
            file: entry.name.clone(),
            offset,
            len,
            size: entry.size,
        });
    }
    Ok(())
}

#[derive(Debug)]
struct Entry {
    manifest: Arc<Manifest>,
    data: StoredData,
    /// LRU clock value of the last put or get.
    last_used: u64,
    /// Older generations whose pages this one inherits (its page index): they are kept as
    /// long as it is, whatever `keep` says.
    inherits: BTreeSet<u64>,
}

impl Entry {
    fn new(manifest: Arc<Manifest>, data: StoredData, last_used: u64) -> Entry {
        let inherits = inherited_generations(&manifest, &data);
        Entry {
            manifest,
            data,
            last_used,
            inherits,
        }
    }
}

/// The generations a snapshot's page index refers to (none without an index). An index the
/// pool cannot read keeps nothing alive: a restore refuses such a snapshot anyway.
fn inherited_generations(manifest: &Manifest, data: &StoredData) -> BTreeSet<u64> {
    let Some(file) = manifest
        .files
        .iter()
        .position(|f| f.name == PAGE_INDEX_FILE)
    else {
        return BTreeSet::new();
    };
    let mut bytes = Vec::new();
    let mut buf = Vec::new();
    let read = (0..manifest.files[file].chunk_crcs.len()).try_for_each(|chunk| {
        data.with_chunk(manifest, file, chunk, &mut buf, |b, _| {
            bytes.extend_from_slice(b)
        })
    });
    match read.map(|()| PageIndex::decode(&bytes)) {
        Ok(Ok(index)) => index.generations(),
        Ok(Err(e)) => {
            warn!(name = %manifest.name, generation = manifest.generation, error = %e, "unreadable page index; it keeps no older generation");
            BTreeSet::new()
        }
        Err(e) => {
            warn!(name = %manifest.name, generation = manifest.generation, error = %error_chain(&e), "unreadable page index; it keeps no older generation");
            BTreeSet::new()
        }
    }
}

#[derive(Debug, Default)]
struct NameState {
    /// Highest generation ever committed, so numbers never repeat after deletes.
    last_generation: u64,
    generations: BTreeMap<u64, Entry>,
}

#[derive(Debug, Default)]
struct State {
    names: BTreeMap<String, NameState>,
    tick: u64,
}

/// The pool's snapshot store.
#[derive(Debug)]
pub struct Store {
    arena: Arena,
    spill_dir: Option<PathBuf>,
    keep: usize,
    state: Mutex<State>,
    /// One spill at a time, so two uploads never write out the same victim.
    spill_lock: Mutex<()>,
}

/// What a commit produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub generation: u64,
    pub bytes: u64,
    pub tier: Tier,
}

/// What [`Store::persist_all`] wrote to the disk tier.
#[derive(Debug, Default)]
pub struct Persisted {
    /// Snapshots (generations) written.
    pub snapshots: usize,
    pub bytes: u64,
    /// Generations that could not be written (disk full, I/O): they stay in RAM only.
    pub failed: Vec<StoreError>,
}

/// A file whose bytes so far fit in this many is received into an exact-size tail instead of
/// a chunk, so small files never need a whole chunk of budget, even while they arrive.
pub const SMALL_FILE_LIMIT: u64 = 64 << 10;

/// An upload in progress: private to its connection, invisible to everyone else, and
/// returned to the arena whole if dropped before commit.
#[derive(Debug)]
pub struct Upload {
    /// Where small files' tails take their budget from.
    arena: Arena,
    name: String,
    meta: SnapshotMeta,
    files: Vec<UploadFile>,
    /// Connection-local file id to index in `files`, for files still open.
    open: HashMap<u32, usize>,
}

#[derive(Debug)]
struct UploadFile {
    name: String,
    chunks: Vec<Chunk>,
    /// A small file's bytes while it stays small (no chunks yet); once closed, the last piece
    /// if it did not fill a whole chunk.
    tail: Option<Tail>,
    sums: Sums,
    size: u64,
}

/// The checksums of a file being received, chunk and block ones from the same pass.
#[derive(Debug, Default)]
struct Sums {
    /// CRC32C of each completed chunk.
    chunks: Vec<u32>,
    /// CRC32C of what the last, unsealed chunk holds so far.
    open_chunk: u32,
    /// CRC32C of each completed block.
    blocks: Vec<u32>,
    /// CRC32C of what the last, unfinished block holds so far.
    open_block: u32,
}

impl Sums {
    /// Checksums `bytes`, which the file holds from offset `at`, into the open chunk and
    /// block, block by block; returns their CRC32C (the caller checks its frame with it).
    fn absorb(&mut self, mut at: u64, bytes: &[u8]) -> u32 {
        let mut piece = 0;
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = (BLOCK_SIZE - at % BLOCK_SIZE) as usize;
            let (seg, more) = rest.split_at(rest.len().min(room));
            let c = crc32c::crc32c(seg);
            self.open_block = join(self.open_block, c, seg.len());
            self.open_chunk = join(self.open_chunk, c, seg.len());
            piece = join(piece, c, seg.len());
            at += seg.len() as u64;
            if at.is_multiple_of(BLOCK_SIZE) {
                self.blocks.push(mem::take(&mut self.open_block));
            }
            rest = more;
        }
        piece
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    /// Reserves and faults in the RAM tier and reads the disk tier's snapshots back.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        let arena = Arena::new(config.capacity).map_err(|source| StoreError::Arena {
            capacity: config.capacity,
            source,
        })?;
        let store = Store {
            arena,
            spill_dir: config.spill_dir,
            keep: config.keep.max(1),
            state: Mutex::new(State::default()),
            spill_lock: Mutex::new(()),
        };
        if let Some(dir) = &store.spill_dir {
            store.recover_disk_tier(dir)?;
        }
        Ok(store)
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.arena.capacity_bytes()
    }

    pub fn free_bytes(&self) -> u64 {
        self.arena.free_bytes()
    }

    fn recover_disk_tier(&self, dir: &Path) -> Result<(), StoreError> {
        let spill_err = |source| StoreError::SpillDir {
            path: dir.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(spill_err)?;
        check_spill_dir(dir)?;
        let mut state = self.state.lock().expect("store lock");
        for name_dir in fs::read_dir(dir).map_err(spill_err)? {
            let name_dir = name_dir.map_err(spill_err)?.path();
            let Ok(meta) = fs::symlink_metadata(&name_dir) else {
                continue;
            };
            if !meta.is_dir() {
                continue;
            }
            if let Some(problem) = not_ours_alone(&meta, 0o022) {
                warn!(path = %name_dir.display(), %problem, "ignoring spill subdirectory that is not ours alone");
                continue;
            }
            let dir_name = name_dir.file_name().and_then(|f| f.to_str()).unwrap_or("");
            for file in fs::read_dir(&name_dir).map_err(spill_err)? {
                let path = file.map_err(spill_err)?.path();
                let fname = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
                let Ok(meta) = fs::symlink_metadata(&path) else {
                    continue;
                };
                if fname.ends_with(".tmp") && meta.is_file() && meta.uid() == euid() {
                    // An interrupted spill: the snapshot was still in RAM then, now lost.
                    let _ = fs::remove_file(&path);
                    continue;
                }
                if !fname.ends_with(".tsnap") {
                    continue;
                }
                if !meta.is_file() {
                    warn!(path = %path.display(), "ignoring snapshot file that is not a regular file");
                    continue;
                }
                if let Some(problem) = not_ours_alone(&meta, 0o077) {
                    warn!(path = %path.display(), %problem, "ignoring snapshot file that is not ours alone: it was not written by this pool");
                    continue;
                }
                match read_snapfile(&path) {
                    Ok((manifest, _, _))
                        if manifest.name != dir_name
                            || snapfile_path(dir, &manifest.name, manifest.generation) != path =>
                    {
                        warn!(path = %path.display(), name = %manifest.name, generation = manifest.generation, "ignoring snapshot file whose manifest does not match its place");
                    }
                    Ok((manifest, file, offsets)) => {
                        let blocks = manifest
                            .files
                            .iter()
                            .map(|f| Arc::new(BlockCrcs::unknown(f.chunk_crcs.len())))
                            .collect();
                        let ns = state.names.entry(manifest.name.clone()).or_default();
                        ns.last_generation = ns.last_generation.max(manifest.generation);
                        info!(name = %manifest.name, generation = manifest.generation, path = %path.display(), "found snapshot in disk tier");
                        ns.generations.insert(
                            manifest.generation,
                            Entry::new(
                                Arc::new(manifest),
                                StoredData::Disk(Arc::new(DiskFile {
                                    path,
                                    file,
                                    offsets,
                                    blocks,
                                })),
                                0,
                            ),
                        );
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %error_chain(&e), "ignoring unreadable snapshot file");
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts an upload. A size hint lets the pool spill before the bytes arrive.
    pub fn begin_upload(
        &self,
        name: &str,
        meta: SnapshotMeta,
        size_hint: Option<u64>,
    ) -> Result<Upload, StoreError> {
        validate_snapshot_name(name)?;
        if let Some(hint) = size_hint {
            if hint > self.arena.capacity_bytes() {
                return Err(match self.spill_dir {
                    None => StoreError::FullNoSpill {
                        capacity: self.arena.capacity_bytes(),
                    },
                    Some(_) => StoreError::FullNothingToSpill {
                        capacity: self.arena.capacity_bytes(),
                    },
                });
            }
        }
        Ok(Upload {
            arena: self.arena.clone(),
            name: name.to_string(),
            meta,
            files: Vec::new(),
            open: HashMap::new(),
        })
    }

    /// A free chunk, spilling least-recently-used snapshots to disk when RAM is full.
    /// May block on disk I/O; async callers try [`Store::try_alloc_chunk`] first.
    pub fn alloc_chunk(&self) -> Result<Chunk, StoreError> {
        self.with_room(|| self.arena.try_alloc())
    }

    /// Spills least-recently-used snapshots until `bytes` of budget are free (for a tail).
    /// May block on disk I/O.
    pub fn make_room(&self, bytes: u64) -> Result<(), StoreError> {
        self.with_room(|| (self.arena.free_bytes() >= bytes).then_some(()))
    }

    /// Runs `attempt` until it succeeds, spilling one snapshot to disk after each failure.
    fn with_room<T>(&self, attempt: impl Fn() -> Option<T>) -> Result<T, StoreError> {
        loop {
            if let Some(c) = attempt() {
                return Ok(c);
            }
            let capacity = self.arena.capacity_bytes();
            let Some(dir) = &self.spill_dir else {
                return Err(StoreError::FullNoSpill { capacity });
            };
            let _spilling = self.spill_lock.lock().expect("spill lock");
            if let Some(c) = attempt() {
                return Ok(c);
            }
            let victim = self.in_ram().into_iter().min_by_key(|(used, _, _)| *used);
            let Some((_, manifest, files)) = victim else {
                return Err(StoreError::FullNothingToSpill { capacity });
            };
            self.spill(dir, &manifest, &files, "RAM tier full")?;
        }
    }

    /// Every generation held in the RAM tier: when it was last used, its manifest, its files.
    fn in_ram(&self) -> Vec<(u64, Arc<Manifest>, Arc<Vec<RamFile>>)> {
        let state = self.state.lock().expect("store lock");
        state
            .names
            .values()
            .flat_map(|ns| ns.generations.values())
            .filter_map(|e| match &e.data {
                StoredData::Ram(files) => Some((e.last_used, e.manifest.clone(), files.clone())),
                StoredData::Disk(_) => None,
            })
            .collect()
    }

    /// Writes every snapshot still in the RAM tier to the disk tier, each file fsync'd, so
    /// that a store opened later on the same spill directory finds them all: what a stopping
    /// `torpor up` does so that its services' state outlives it. Older generations that newer
    /// ones inherit pages from are in the RAM tier like any other and go too. A generation
    /// that cannot be written is reported in [`Persisted::failed`] and the others still go.
    pub fn persist_all(&self) -> Result<Persisted, StoreError> {
        let Some(dir) = &self.spill_dir else {
            return Err(StoreError::NoDiskTier);
        };
        let _spilling = self.spill_lock.lock().expect("spill lock");
        let mut done = Persisted::default();
        for (_, manifest, files) in self.in_ram() {
            match self.spill(dir, &manifest, &files, "persisted") {
                Ok(()) => {
                    done.snapshots += 1;
                    done.bytes += manifest.total_bytes();
                }
                Err(e) => done.failed.push(e),
            }
        }
        // The snapshots' own directories are synced with their files; this makes the
        // entries of new ones in the spill directory durable too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::SpillDir {
                path: dir.clone(),
                source,
            })?;
        Ok(done)
    }

    /// A free chunk if one is at hand, without any I/O.
    pub fn try_alloc_chunk(&self) -> Option<Chunk> {
        self.arena.try_alloc()
    }

    fn spill(
        &self,
        dir: &Path,
        manifest: &Arc<Manifest>,
        files: &Arc<Vec<RamFile>>,
        why: &str,
    ) -> Result<(), StoreError> {
        let path = snapfile_path(dir, &manifest.name, manifest.generation);
        let spill_err = |source| StoreError::Spill {
            name: manifest.name.clone(),
            generation: manifest.generation,
            path: path.clone(),
            source,
        };
        let data_offset = write_snapfile(&path, manifest, files).map_err(spill_err)?;
        let offsets = snapfile::file_offsets(manifest, data_offset);
        let file = File::open(&path).map_err(spill_err)?;
        let mut state = self.state.lock().expect("store lock");
        let entry = state
            .names
            .get_mut(&manifest.name)
            .and_then(|ns| ns.generations.get_mut(&manifest.generation));
        match entry {
            Some(e) => {
                e.data = StoredData::Disk(Arc::new(DiskFile {
                    path,
                    file,
                    offsets,
                    blocks: files.iter().map(|f| f.blocks.clone()).collect(),
                }));
                info!(name = %manifest.name, generation = manifest.generation, bytes = manifest.total_bytes(), why, "snapshot written to the disk tier");
            }
            // Deleted meanwhile: the file is not wanted either.
            None => {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(())
    }

    /// The generation the next commit of `name` gets unless the client names a higher one.
    pub fn next_generation(&self, name: &str) -> u64 {
        let state = self.state.lock().expect("store lock");
        state.names.get(name).map_or(0, |ns| ns.last_generation) + 1
    }

    /// Makes an upload visible as generation `generation` (the next one when `None`; a named
    /// one must exceed every earlier generation of the name) and prunes old generations.
    pub fn commit(
        &self,
        mut upload: Upload,
        generation: Option<u64>,
        seal: Option<Seal>,
    ) -> Result<Committed, StoreError> {
        if let Some(id) = upload.open.keys().next() {
            return Err(StoreError::Upload(format!(
                "file id {id} is still open at commit"
            )));
        }
        let mut files = Vec::with_capacity(upload.files.len());
        let mut data = Vec::with_capacity(upload.files.len());
        for f in upload.files.drain(..) {
            files.push(FileEntry {
                name: f.name,
                size: f.size,
                chunk_crcs: f.sums.chunks,
            });
            data.push(RamFile {
                chunks: f.chunks,
                tail: f.tail,
                blocks: Arc::new(BlockCrcs::known(&f.sums.blocks)),
            });
        }
        let mut state = self.state.lock().expect("store lock");
        state.tick += 1;
        let tick = state.tick;
        let ns = state.names.entry(upload.name.clone()).or_default();
        let generation = match generation {
            Some(g) if g <= ns.last_generation => {
                return Err(StoreError::StaleGeneration {
                    name: upload.name.clone(),
                    generation: g,
                    last: ns.last_generation,
                })
            }
            Some(g) => g,
            None => ns.last_generation + 1,
        };
        let manifest = Manifest {
            name: upload.name.clone(),
            generation,
            created_unix_ms: now_ms(),
            meta: upload.meta.clone(),
            files,
            seal,
        };
        manifest
            .validate()
            .map_err(|e| StoreError::Upload(error_chain(&e)))?;
        ns.last_generation = generation;
        let committed = Committed {
            generation: manifest.generation,
            bytes: manifest.total_bytes(),
            tier: Tier::Ram,
        };
        ns.generations.insert(
            manifest.generation,
            Entry::new(Arc::new(manifest), StoredData::Ram(Arc::new(data)), tick),
        );
        // The newest `keep` generations stay, and every older one they inherit pages from.
        let cutoff = ns.last_generation.saturating_sub(self.keep as u64);
        let inherited: BTreeSet<u64> = ns
            .generations
            .range(cutoff + 1..)
            .flat_map(|(_, e)| e.inherits.iter().copied())
            .collect();
        let old: Vec<u64> = ns
            .generations
            .range(..=cutoff)
            .map(|(g, _)| *g)
            .filter(|g| !inherited.contains(g))
            .collect();
        for g in old {
            if let Some(e) = ns.generations.remove(&g) {
                info!(name = %upload.name, generation = g, keep = self.keep, "dropped old generation");
                remove_data(e.data);
            }
        }
        Ok(committed)
    }

    /// Every committed snapshot, by name then generation.
    pub fn list(&self) -> Vec<SnapshotInfo> {
        let state = self.state.lock().expect("store lock");
        state
            .names
            .values()
            .flat_map(|ns| ns.generations.values())
            .map(|e| SnapshotInfo {
                name: e.manifest.name.clone(),
                generation: e.manifest.generation,
                bytes: e.manifest.total_bytes(),
                tier: match e.data {
                    StoredData::Ram(_) => Tier::Ram,
                    StoredData::Disk(_) => Tier::Disk,
                },
                created_unix_ms: e.manifest.created_unix_ms,
            })
            .collect()
    }

    /// A generation (the newest when `None`) and its data; counts as a use for LRU.
    pub fn lookup(
        &self,
        name: &str,
        generation: Option<u64>,
    ) -> Result<(Arc<Manifest>, StoredData), StoreError> {
        let mut state = self.state.lock().expect("store lock");
        state.tick += 1;
        let tick = state.tick;
        let ns = state
            .names
            .get_mut(name)
            .filter(|ns| !ns.generations.is_empty())
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        let entry = match generation {
            Some(g) => {
                ns.generations
                    .get_mut(&g)
                    .ok_or_else(|| StoreError::GenerationNotFound {
                        name: name.to_string(),
                        generation: g,
                    })?
            }
            None => ns
                .generations
                .values_mut()
                .next_back()
                .expect("non-empty checked above"),
        };
        entry.last_used = tick;
        Ok((entry.manifest.clone(), entry.data.clone()))
    }

    /// Deletes one generation or all; returns how many were removed.
    pub fn delete(&self, name: &str, generation: Option<u64>) -> u64 {
        let mut state = self.state.lock().expect("store lock");
        let Some(ns) = state.names.get_mut(name) else {
            return 0;
        };
        let victims: Vec<u64> = match generation {
            Some(g) => ns
                .generations
                .contains_key(&g)
                .then_some(g)
                .into_iter()
                .collect(),
            None => ns.generations.keys().copied().collect(),
        };
        for g in &victims {
            if let Some(e) = ns.generations.remove(g) {
                remove_data(e.data);
            }
        }
        victims.len() as u64
    }

    /// Flips a bit of a RAM-tier chunk; only for tests that prove corruption is detected.
    #[cfg(test)]
    pub(crate) fn corrupt_ram_for_test(&self, name: &str, file: usize, chunk: usize, at: usize) {
        let mut state = self.state.lock().unwrap();
        let e = state
            .names
            .get_mut(name)
            .unwrap()
            .generations
            .values_mut()
            .next_back()
            .unwrap();
        let StoredData::Ram(files) = &mut e.data else {
            panic!("not in RAM")
        };
        let f = &mut Arc::get_mut(files).expect("no readers")[file];
        match f.chunks.get_mut(chunk) {
            Some(c) => c.flip_bit_for_test(at),
            None => f.tail.as_mut().expect("tail").flip_bit_for_test(at),
        }
    }
}

fn remove_data(data: StoredData) {
    if let StoredData::Disk(d) = data {
        if let Err(e) = fs::remove_file(&d.path) {
            warn!(path = %d.path.display(), error = %e, "could not remove dropped snapshot file");
        }
    }
}

impl StoredData {
    /// Reads chunk `chunk` of file `file` (manifest order), checks its CRC and hands the bytes
    /// and their (verified) CRC to `sink`. `buf` is scratch space for the disk tier. May block
    /// on disk I/O.
    pub fn with_chunk<R>(
        &self,
        manifest: &Manifest,
        file: usize,
        chunk: usize,
        buf: &mut Vec<u8>,
        sink: impl FnOnce(&[u8], u32) -> R,
    ) -> Result<R, StoreError> {
        let entry = &manifest.files[file];
        let len = (entry.size - chunk as u64 * CHUNK_SIZE).min(CHUNK_SIZE) as usize;
        let bytes: &[u8] = match self {
            StoredData::Ram(files) => files[file].chunk(chunk),
            StoredData::Disk(d) => {
                buf.resize(len, 0);
                d.read_at(d.offsets[file] + chunk as u64 * CHUNK_SIZE, buf)?;
                buf
            }
        };
        if bytes.len() != len || crc32c::crc32c(bytes) != entry.chunk_crcs[chunk] {
            return Err(StoreError::Corrupt {
                name: manifest.name.clone(),
                generation: manifest.generation,
                file: entry.name.clone(),
                chunk,
            });
        }
        Ok(sink(bytes, entry.chunk_crcs[chunk]))
    }
}

impl StoredData {
    /// Bytes `offset..offset + len` of file `file` (manifest order), which lie inside one
    /// chunk and were checked by [`check_range`], with their CRC32C. Only the blocks the
    /// range touches are read and checked against their stored CRCs, in one pass that also
    /// yields the range's CRC. From the RAM tier the bytes are the pool's own memory; from
    /// the disk tier they are `buf[..len]` (so a caller that lent `buf` to a blocking task
    /// finds them there). May block on disk I/O.
    pub fn range<'a>(
        &'a self,
        manifest: &Manifest,
        file: usize,
        offset: u64,
        len: usize,
        buf: &'a mut Vec<u8>,
        sealed: bool,
    ) -> Result<(&'a [u8], u32), StoreError> {
        let entry = &manifest.files[file];
        let end = offset + len as u64;
        let chunk = (offset / CHUNK_SIZE) as usize;
        assert!(
            len > 0 && end <= entry.size && (end - 1) / CHUNK_SIZE == chunk as u64,
            "range inside one chunk of the file"
        );
        let corrupt = || StoreError::Corrupt {
            name: manifest.name.clone(),
            generation: manifest.generation,
            file: entry.name.clone(),
            chunk,
        };
        let crcs = self.block_crcs(manifest, file, chunk, buf)?;
        let chunk_start = chunk as u64 * CHUNK_SIZE;
        let span_start = offset - offset % BLOCK_SIZE;
        let span_end = end.next_multiple_of(BLOCK_SIZE).min(entry.size);
        let crcs = &crcs[((span_start - chunk_start) / BLOCK_SIZE) as usize..];
        match self {
            StoredData::Ram(files) => {
                let held = files[file].chunk(chunk);
                let span = held
                    .get((span_start - chunk_start) as usize..(span_end - chunk_start) as usize)
                    .ok_or_else(corrupt)?;
                let (head, rest) = span.split_at((offset - span_start) as usize);
                let (range, tail) = rest.split_at(len);
                // Whole blocks the client checks against the seal: their CRC is the stored
                // ones' combined, without reading them here.
                if sealed && head.is_empty() && tail.is_empty() {
                    return Ok((range, combine_blocks(crcs, range.len())));
                }
                let crc = verify_blocks(crcs, head, range, tail).ok_or_else(corrupt)?;
                Ok((range, crc))
            }
            StoredData::Disk(d) => {
                let base = d.offsets[file];
                let mut head = vec![0; (offset - span_start) as usize];
                let mut tail = vec![0; (span_end - end) as usize];
                buf.resize(len, 0);
                d.read_at(base + span_start, &mut head)?;
                d.read_at(base + offset, buf)?;
                d.read_at(base + end, &mut tail)?;
                let crc = verify_blocks(crcs, &head, buf, &tail).ok_or_else(corrupt)?;
                Ok((&buf[..], crc))
            }
        }
    }

    /// The block CRCs of one chunk; a chunk of a snapshot found in the disk tier at start
    /// has them derived here from its bytes, once those match the chunk's CRC.
    fn block_crcs(
        &self,
        manifest: &Manifest,
        file: usize,
        chunk: usize,
        buf: &mut Vec<u8>,
    ) -> Result<&[u32], StoreError> {
        let cell = match self {
            StoredData::Ram(files) => &files[file].blocks.per_chunk[chunk],
            StoredData::Disk(d) => &d.blocks[file].per_chunk[chunk],
        };
        if let Some(crcs) = cell.get() {
            return Ok(crcs);
        }
        let entry = &manifest.files[file];
        let derived = self.with_chunk(manifest, file, chunk, buf, |bytes, _| {
            let blocks = block_crcs_of(bytes);
            (chunk_crc_from_blocks(&blocks, bytes.len()) == entry.chunk_crcs[chunk])
                .then_some(blocks)
        })?;
        // The chunk CRC was just checked by `with_chunk`: a mismatch here means the bytes
        // changed between the two passes, so they are not trusted either.
        let derived = derived.ok_or_else(|| StoreError::Corrupt {
            name: manifest.name.clone(),
            generation: manifest.generation,
            file: entry.name.clone(),
            chunk,
        })?;
        Ok(cell.get_or_init(|| derived))
    }
}

impl DiskFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let err = |source| StoreError::DiskRead {
            path: self.path.clone(),
            source,
        };
        self.file.read_exact_at(buf, offset).map_err(err)
    }
}

impl Upload {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens an image file under a connection-local id.
    pub fn open_file(&mut self, file_id: u32, name: &str) -> Result<(), StoreError> {
        validate_file_name(name)?;
        if self.open.contains_key(&file_id) {
            return Err(StoreError::Upload(format!(
                "file id {file_id} is already open"
            )));
        }
        if self.files.iter().any(|f| f.name == name) {
            return Err(StoreError::Upload(format!("file {name:?} sent twice")));
        }
        if self.files.len() >= torpor_image::manifest::MAX_FILES {
            return Err(StoreError::Upload("too many files".into()));
        }
        self.open.insert(file_id, self.files.len());
        self.files.push(UploadFile {
            name: name.to_string(),
            chunks: Vec::new(),
            tail: None,
            sums: Sums::default(),
            size: 0,
        });
        Ok(())
    }

    /// Whether `n` more bytes of `file_id` go into its small-file tail (the file has no chunk
    /// and stays within [`SMALL_FILE_LIMIT`]) rather than into chunks.
    pub fn takes_small(&mut self, file_id: u32, n: usize) -> Result<bool, StoreError> {
        let f = self.file_mut(file_id)?;
        Ok(f.chunks.is_empty() && f.size + n as u64 <= SMALL_FILE_LIMIT)
    }

    /// Appends bytes to a small file's tail if the budget has room and returns their
    /// CRC32C; `None` means the caller must [`Store::make_room`] and try again.
    pub fn try_append_small(
        &mut self,
        file_id: u32,
        bytes: &[u8],
    ) -> Result<Option<u32>, StoreError> {
        let arena = self.arena.clone();
        let f = self.file_mut(file_id)?;
        if !f.tail.get_or_insert_with(|| arena.tail()).try_append(bytes) {
            return Ok(None);
        }
        let crc = f.sums.absorb(f.size, bytes);
        f.size += bytes.len() as u64;
        Ok(Some(crc))
    }

    /// The chunk that the next bytes of `file_id` go into, if it has room; `None` means the
    /// caller must [`Upload::push_chunk`] a new one first.
    pub fn writable_chunk(&mut self, file_id: u32) -> Result<Option<&mut Chunk>, StoreError> {
        let f = self.file_mut(file_id)?;
        Ok(f.chunks.last_mut().filter(|c| !c.is_full()))
    }

    /// Seals the current chunk (if any) and starts a new one for `file_id`.
    pub fn push_chunk(&mut self, file_id: u32, chunk: Chunk) -> Result<(), StoreError> {
        let f = self.file_mut(file_id)?;
        f.seal_last();
        let mut chunk = chunk;
        // A file that outgrew its small-file tail continues in chunks, its first bytes moved
        // over (the open CRC already covers them).
        if let Some(t) = f.tail.take() {
            let n = t.bytes().len();
            chunk.spare_mut()[..n].copy_from_slice(t.bytes());
            chunk.advance(n);
        }
        f.chunks.push(chunk);
        Ok(())
    }

    /// Records that `n` bytes were written into the writable chunk of `file_id` and returns
    /// their CRC32C: the chunk and block CRCs and the caller's frame check all come from
    /// this one pass over the bytes.
    pub fn advance(&mut self, file_id: u32, n: usize) -> Result<u32, StoreError> {
        let f = self.file_mut(file_id)?;
        let c = f
            .chunks
            .last_mut()
            .ok_or_else(|| StoreError::Upload("no chunk to advance".into()))?;
        c.advance(n);
        let written = c.bytes();
        let crc = f.sums.absorb(f.size, &written[written.len() - n..]);
        f.size += n as u64;
        if f.size > torpor_image::manifest::MAX_FILE_SIZE {
            return Err(StoreError::Upload(format!("file {:?} too large", f.name)));
        }
        Ok(crc)
    }

    /// Closes a file; `size` is the sender's count and must match what arrived.
    pub fn close_file(&mut self, file_id: u32, size: u64) -> Result<(), StoreError> {
        let idx = self
            .open
            .remove(&file_id)
            .ok_or_else(|| StoreError::Upload(format!("file id {file_id} is not open")))?;
        let f = &mut self.files[idx];
        f.seal_last();
        if !f.size.is_multiple_of(BLOCK_SIZE) {
            f.sums.blocks.push(mem::take(&mut f.sums.open_block));
        }
        if let Some(t) = &f.tail {
            // A small file: its tail is its only chunk (or nothing, when empty).
            if t.bytes().is_empty() {
                f.tail = None;
            } else {
                f.sums.chunks.push(mem::take(&mut f.sums.open_chunk));
            }
        } else if f.chunks.last().is_some_and(|c| !c.is_full()) {
            // A partly filled last chunk goes back to the arena; the file keeps its bytes.
            let last = f.chunks.pop().expect("checked");
            f.tail = Some(last.into_tail());
        }
        if f.size != size {
            return Err(StoreError::Upload(format!(
                "file {:?}: sender says {size} bytes, {} arrived",
                f.name, f.size
            )));
        }
        Ok(())
    }

    fn file_mut(&mut self, file_id: u32) -> Result<&mut UploadFile, StoreError> {
        let idx = *self
            .open
            .get(&file_id)
            .ok_or_else(|| StoreError::Upload(format!("file id {file_id} is not open")))?;
        Ok(&mut self.files[idx])
    }
}

impl UploadFile {
    fn seal_last(&mut self) {
        if self.sums.chunks.len() < self.chunks.len() {
            self.sums.chunks.push(mem::take(&mut self.sums.open_chunk));
        }
    }
}

fn snapfile_path(dir: &Path, name: &str, generation: u64) -> PathBuf {
    dir.join(name).join(format!("{generation:010}.tsnap"))
}

/// Writes a snapshot file atomically (temp file 0600, fsync, rename); returns the data
/// offset. A failed write (disk full) removes its temp file.
fn write_snapfile(path: &Path, manifest: &Manifest, files: &[RamFile]) -> io::Result<u64> {
    let parent = path.parent().expect("snapfile path has a parent");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)?;
    let tmp = path.with_extension("tsnap.tmp");
    let written = (|| {
        // create_new: never write through a file (or symlink) someone placed at the temp name.
        let _ = fs::remove_file(&tmp);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut f = io::BufWriter::with_capacity(CHUNK_SIZE as usize, file);
        let prefix = snapfile::encode_prefix(manifest);
        f.write_all(&prefix)?;
        for file in files {
            for piece in file.pieces() {
                f.write_all(piece)?;
            }
        }
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(prefix.len() as u64)
    })();
    let offset = match written {
        Ok(o) => o,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, path)?;
    File::open(parent)?.sync_all()?;
    Ok(offset)
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Why a file or directory is not ours alone: another owner, or any of `forbidden` mode bits.
fn not_ours_alone(meta: &fs::Metadata, forbidden: u32) -> Option<String> {
    let mode = meta.mode() & 0o7777;
    if meta.uid() != euid() {
        Some(format!("owned by uid {}, not {}", meta.uid(), euid()))
    } else if mode & forbidden != 0 {
        Some(format!("mode {mode:04o} gives access to group or others"))
    } else {
        None
    }
}

/// Refuses a spill directory owned by someone else or writable by group or others, and
/// tightens one of ours that others can read (with a warning).
fn check_spill_dir(dir: &Path) -> Result<(), StoreError> {
    let unsafe_dir = |problem: String| StoreError::SpillDirUnsafe {
        path: dir.to_path_buf(),
        problem,
    };
    let meta = fs::symlink_metadata(dir).map_err(|source| StoreError::SpillDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(unsafe_dir("not a directory (a symlink?)".into()));
    }
    if let Some(problem) = not_ours_alone(&meta, 0o022) {
        return Err(unsafe_dir(format!(
            "{problem}; make it a directory of the pool's user, mode 0700"
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        warn!(path = %dir.display(), mode = format!("{mode:04o}"), "spill directory was readable by others; tightened to 0700");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            StoreError::SpillDir {
                path: dir.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Reads and checks a snapshot file's prefix; returns its manifest, the open file and
/// where each image starts.
fn read_snapfile(path: &Path) -> Result<(Manifest, File, Vec<u64>), SnapfileError> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let prefix = snapfile::decode_prefix(&mut io::BufReader::new(&mut f), len)?;
    let offsets = prefix.file_offsets();
    Ok((prefix.manifest, f, offsets))
}

/// Renders an error with its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(capacity_chunks: u64) -> Store {
        Store::open(StoreConfig {
            capacity: capacity_chunks * CHUNK_SIZE,
            spill_dir: None,
            keep: 2,
        })
        .unwrap()
    }

    fn upload(s: &Store, name: &str, bytes: &[u8]) -> Committed {
        let mut u = s.begin_upload(name, SnapshotMeta::default(), None).unwrap();
        u.open_file(0, "pages-1.img").unwrap();
        for piece in bytes.chunks(CHUNK_SIZE as usize) {
            let mut c = s.alloc_chunk().unwrap();
            c.spare_mut()[..piece.len()].copy_from_slice(piece);
            u.push_chunk(0, c).unwrap();
            assert_eq!(u.advance(0, piece.len()).unwrap(), crc32c::crc32c(piece));
        }
        u.close_file(0, bytes.len() as u64).unwrap();
        s.commit(u, None, None).unwrap()
    }

    /// Commits a snapshot whose page index inherits pages from `inherits`.
    fn upload_increment(s: &Store, name: &str, inherits: &[u64]) -> Committed {
        use torpor_image::pages::{Origin, PageRange, ProcessRanges};
        let index = PageIndex {
            processes: vec![ProcessRanges {
                pid: 1,
                ranges: inherits
                    .iter()
                    .enumerate()
                    .map(|(i, &generation)| PageRange {
                        start: 0x10000 * (i as u64 + 1),
                        len: 4096,
                        origin: Origin {
                            generation,
                            file: "pages-1.img".into(),
                            offset: 0,
                        },
                    })
                    .collect(),
            }],
        }
        .encode();
        let mut u = s.begin_upload(name, SnapshotMeta::default(), None).unwrap();
        u.open_file(0, PAGE_INDEX_FILE).unwrap();
        let mut c = s.alloc_chunk().unwrap();
        c.spare_mut()[..index.len()].copy_from_slice(&index);
        u.push_chunk(0, c).unwrap();
        u.advance(0, index.len()).unwrap();
        u.close_file(0, index.len() as u64).unwrap();
        s.commit(u, None, None).unwrap()
    }

    #[test]
    fn retention_keeps_every_generation_a_kept_one_inherits_from() {
        let s = store(16);
        let generations = |s: &Store| -> Vec<u64> {
            s.list()
                .into_iter()
                .filter(|i| i.name == "svc")
                .map(|i| i.generation)
                .collect()
        };
        upload(&s, "svc", &[1u8; 4096]); // 1: full
        upload(&s, "svc", &[2u8; 4096]); // 2: full
        upload_increment(&s, "svc", &[1]); // 3 inherits from 1
        upload_increment(&s, "svc", &[1, 3]); // 4 inherits from 1 and 3
                                              // keep = 2 keeps 3 and 4; 1 stays because both inherit from it; 2 goes.
        assert_eq!(generations(&s), vec![1, 3, 4]);
        upload(&s, "svc", &[5u8; 4096]); // 5: full
        upload(&s, "svc", &[6u8; 4096]); // 6: full, nothing inherits any more
        assert_eq!(generations(&s), vec![5, 6]);
    }

    #[test]
    fn corrupt_ram_chunk_is_refused() {
        let s = store(4);
        let bytes = vec![7u8; CHUNK_SIZE as usize + 10];
        upload(&s, "svc", &bytes);
        let read = |s: &Store| {
            let (m, d) = s.lookup("svc", None).unwrap();
            d.with_chunk(&m, 0, 1, &mut Vec::new(), |b, _| b.to_vec())
        };
        assert_eq!(read(&s).unwrap(), vec![7u8; 10]);
        s.corrupt_ram_for_test("svc", 0, 1, 3);
        assert!(matches!(
            read(&s),
            Err(StoreError::Corrupt { chunk: 1, .. })
        ));
    }

    /// Bytes `offset..offset + len` of the newest `svc`, read as a range.
    fn range(s: &Store, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        let (m, d) = s.lookup("svc", None).unwrap();
        check_range(&m.files[0], offset, len as u64)?;
        let (mut buf, mut buf2) = (Vec::new(), Vec::new());
        let (bytes, crc) = d.range(&m, 0, offset, len, &mut buf, false)?;
        assert_eq!(crc, crc32c::crc32c(bytes), "the range's CRC is its bytes'");
        // a sealed read of the same range carries the same CRC, computed without the bytes
        let (sealed, sealed_crc) = d.range(&m, 0, offset, len, &mut buf2, true)?;
        assert_eq!((sealed, sealed_crc), (bytes, crc));
        Ok(bytes.to_vec())
    }

    #[test]
    fn block_crcs_agree_with_chunk_crcs() {
        let s = store(4);
        let bytes: Vec<u8> = (0..2 * CHUNK_SIZE as usize + 70_000)
            .map(|i| (i * 13 + i / 999) as u8)
            .collect();
        upload(&s, "svc", &bytes);
        let (m, d) = s.lookup("svc", None).unwrap();
        let StoredData::Ram(files) = &d else {
            panic!("not in RAM")
        };
        for (i, chunk) in bytes.chunks(CHUNK_SIZE as usize).enumerate() {
            let blocks = files[0].blocks.per_chunk[i].get().expect("known on upload");
            assert_eq!(&blocks[..], &block_crcs_of(chunk)[..]);
            assert_eq!(
                chunk_crc_from_blocks(blocks, chunk.len()),
                m.files[0].chunk_crcs[i]
            );
        }
    }

    #[test]
    fn ranges_are_served_from_their_blocks_and_a_corrupt_block_is_refused() {
        let s = store(4);
        let bytes: Vec<u8> = (0..CHUNK_SIZE as usize + 10_000)
            .map(|i| (i * 7) as u8)
            .collect();
        upload(&s, "svc", &bytes);
        for (offset, len) in [(0, 1), (4096, 4096), (65_530, 20), (CHUNK_SIZE + 9_999, 1)] {
            let expected = &bytes[offset as usize..][..len];
            assert_eq!(range(&s, offset, len).unwrap(), expected, "{offset}+{len}");
        }
        // One bit of chunk 0's third block rots: ranges touching that block are refused,
        // the others still served.
        s.corrupt_ram_for_test("svc", 0, 0, 2 * BLOCK_SIZE as usize + 5);
        assert!(matches!(
            range(&s, 2 * BLOCK_SIZE + 100, 10),
            Err(StoreError::Corrupt { chunk: 0, .. })
        ));
        assert!(matches!(
            range(&s, BLOCK_SIZE, 2 * BLOCK_SIZE as usize),
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(range(&s, 0, 4096).unwrap(), &bytes[..4096]);
        assert_eq!(
            range(&s, 3 * BLOCK_SIZE, 4096).unwrap(),
            &bytes[3 * BLOCK_SIZE as usize..][..4096]
        );
    }

    #[test]
    fn bad_ranges_are_refused() {
        let s = store(2);
        upload(&s, "svc", &[1; 100]);
        assert!(matches!(range(&s, 0, 0), Err(StoreError::EmptyRange)));
        assert!(matches!(
            range(&s, 90, 11),
            Err(StoreError::RangeBeyondEnd { size: 100, .. })
        ));
        assert!(matches!(
            range(&s, u64::MAX, 1),
            Err(StoreError::RangeBeyondEnd { .. })
        ));
        let (m, _) = s.lookup("svc", None).unwrap();
        assert!(matches!(
            check_range(&m.files[0], 0, MAX_RANGE_LEN + 1),
            Err(StoreError::RangeTooLong { .. })
        ));
        assert_eq!(range(&s, 99, 1).unwrap(), [1]);
    }

    #[test]
    fn size_mismatch_and_open_files_are_refused() {
        let s = store(2);
        let mut u = s
            .begin_upload("svc", SnapshotMeta::default(), None)
            .unwrap();
        u.open_file(0, "a").unwrap();
        assert!(u.open_file(0, "b").is_err(), "id reused");
        assert!(u.close_file(0, 5).is_err(), "size mismatch");
        let mut u = s
            .begin_upload("svc", SnapshotMeta::default(), None)
            .unwrap();
        u.open_file(1, "a").unwrap();
        assert!(s.commit(u, None, None).is_err(), "file still open");
        assert!(s.list().is_empty());
        assert!(s
            .begin_upload("../x", SnapshotMeta::default(), None)
            .is_err());
        assert!(matches!(
            s.begin_upload("svc", SnapshotMeta::default(), Some(100 * CHUNK_SIZE)),
            Err(StoreError::FullNoSpill { .. })
        ));
    }

    /// Every byte of every file of `name`'s `generation`, read back through the store.
    fn contents(s: &Store, name: &str, generation: u64) -> Vec<Vec<u8>> {
        let (manifest, data) = s.lookup(name, Some(generation)).unwrap();
        let mut buf = Vec::new();
        (0..manifest.files.len())
            .map(|file| {
                let mut bytes = Vec::new();
                for chunk in 0..manifest.files[file].chunk_crcs.len() {
                    data.with_chunk(&manifest, file, chunk, &mut buf, |b, _| {
                        bytes.extend_from_slice(b)
                    })
                    .unwrap();
                }
                bytes
            })
            .collect()
    }

    #[test]
    fn persist_all_writes_every_ram_generation_and_a_reopened_store_serves_them() {
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("spill");
        let open = || {
            Store::open(StoreConfig {
                capacity: 16 * CHUNK_SIZE,
                spill_dir: Some(spill.clone()),
                keep: 1,
            })
            .unwrap()
        };
        let s = open();
        let big: Vec<u8> = (0..CHUNK_SIZE as usize + 1000)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        upload(&s, "web", &big);
        upload(&s, "db", b"rows");
        // An increment of web inheriting from generation 1: with `keep = 1` only the chain
        // keeps generation 1, and it must go to disk with it.
        assert_eq!(upload_increment(&s, "web", &[1]).generation, 2);
        let before = s.list();
        assert_eq!(before.len(), 3, "{before:?}");
        assert!(before.iter().all(|i| i.tier == Tier::Ram));
        let want: Vec<_> = before
            .iter()
            .map(|i| contents(&s, &i.name, i.generation))
            .collect();

        let done = s.persist_all().unwrap();
        assert_eq!(done.snapshots, 3);
        assert!(done.failed.is_empty(), "{:?}", done.failed);
        assert_eq!(done.bytes, before.iter().map(|i| i.bytes).sum::<u64>());
        assert!(s.list().iter().all(|i| i.tier == Tier::Disk));
        assert_eq!(
            s.free_bytes(),
            s.capacity_bytes(),
            "the RAM tier is given back"
        );
        assert_eq!(s.persist_all().unwrap().snapshots, 0, "nothing left in RAM");
        drop(s);

        let again = open();
        let listed: Vec<_> = again
            .list()
            .into_iter()
            .map(|i| (i.name, i.generation, i.bytes, i.tier))
            .collect();
        let expected: Vec<_> = before
            .iter()
            .map(|i| (i.name.clone(), i.generation, i.bytes, Tier::Disk))
            .collect();
        assert_eq!(listed, expected);
        for (i, bytes) in before.iter().zip(&want) {
            assert_eq!(&contents(&again, &i.name, i.generation), bytes, "{i:?}");
        }
        assert_eq!(again.next_generation("web"), 3, "generations do not repeat");
    }

    #[test]
    fn persist_all_without_a_disk_tier_is_refused() {
        let s = store(4);
        upload(&s, "svc", &[1; 100]);
        assert!(matches!(s.persist_all(), Err(StoreError::NoDiskTier)));
    }

    #[test]
    fn delete_frees_memory_and_generations_do_not_repeat() {
        let s = store(4);
        upload(&s, "svc", &[1; 100]);
        assert_eq!(s.delete("svc", None), 1);
        assert_eq!(s.free_bytes(), s.capacity_bytes());
        assert_eq!(upload(&s, "svc", &[1; 100]).generation, 2);
    }
}
