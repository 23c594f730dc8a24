//! Where a lazy restore's pages come from: the pool, one range read at a time
//! ([`PoolPages`], the lazy-pages server's [`PageSource`]), each read checked against the
//! block digests committed under its generation's seal when the pool is not this process's
//! own; and the working set read ahead while CRIU is still restoring ([`Warm`]), so that the
//! push after CRIU's finish marker only copies memory that is already here and verified.

use std::{
    collections::HashMap,
    sync::{Arc, Condvar, Mutex},
    thread,
};

use torpor_image::pages::{blocks_file_for, BlockDigests, Origin, BLOCK_SIZE};
use torpor_lazy::{PageSource, SourceError};
use torpor_pool::{ClientError, PoolClient};

use crate::{
    lazy::fetch_file,
    replicas::{verify_manifest, Pools},
    restore::RestoreError,
    PoolTarget,
};

/// Block digests of the pages files a restore reads from, each fetched once and checked
/// against the seal of the generation it belongs to (inherited ranges point into older ones).
#[derive(Debug, Clone)]
pub(crate) struct BlockCache {
    target: PoolTarget,
    name: String,
    pools: Pools,
    /// Nothing to check for a pool inside this process.
    pub(crate) verify: bool,
    /// Shared by the readers of one restore (the server's and the warm-up's).
    known: Arc<Mutex<DigestsByFile>>,
}

/// Block digests by (generation, pages file).
type DigestsByFile = HashMap<(u64, String), Arc<BlockDigests>>;

impl BlockCache {
    pub(crate) fn new(target: PoolTarget, name: &str, pools: &Pools, verify: bool) -> BlockCache {
        BlockCache {
            target,
            name: name.to_string(),
            pools: pools.clone(),
            verify,
            known: Default::default(),
        }
    }

    fn get(&mut self, generation: u64, file: &str) -> Result<Arc<BlockDigests>, String> {
        // Held while fetching: the other reader wants the same digests and waits for them.
        let mut known = self.known.lock().expect("block cache lock");
        if let Some(b) = known.get(&(generation, file.to_string())) {
            return Ok(b.clone());
        }
        let mut client = self.target.connect().map_err(|e| e.to_string())?;
        let manifest = client
            .manifest(&self.name, Some(generation))
            .map_err(|e| e.to_string())?;
        verify_manifest(
            self.pools.key.as_deref(),
            &self.name,
            Some(generation),
            &manifest,
        )
        .map_err(|e| format!("generation {generation}: {e}"))?;
        let bytes = fetch_file(&mut client, &manifest, &blocks_file_for(file), true)
            .map_err(|e| format!("{}: {e}", blocks_file_for(file)))?;
        let digests = Arc::new(
            BlockDigests::decode(&bytes).map_err(|e| format!("{}: {e}", blocks_file_for(file)))?,
        );
        known.insert((generation, file.to_string()), digests.clone());
        Ok(digests)
    }
}

/// Lazy pages from the pool: one connection (reopened once if it breaks), and with a sealed
/// pool every read widened to whole blocks and checked against their digests.
#[derive(Debug)]
pub(crate) struct PoolPages {
    pub(crate) target: PoolTarget,
    pub(crate) client: Option<PoolClient>,
    name: String,
    blocks: BlockCache,
    /// Whole blocks of a verified read; reused.
    scratch: Vec<u8>,
    /// The working set read ahead, served from memory first.
    warm: Option<Warm>,
}

impl PoolPages {
    pub(crate) fn new(
        target: PoolTarget,
        client: Option<PoolClient>,
        name: &str,
        blocks: BlockCache,
    ) -> PoolPages {
        PoolPages {
            target,
            client,
            name: name.to_string(),
            blocks,
            scratch: Vec::new(),
            warm: None,
        }
    }

    /// Serves from `warm` what it holds.
    pub(crate) fn with_warm(mut self, warm: Warm) -> PoolPages {
        self.warm = Some(warm);
        self
    }

    /// The open connection, for a whole-file fetch during set-up.
    pub(crate) fn client_or_connect(&mut self, name: &str) -> Result<PoolClient, RestoreError> {
        let c = match self.client.take() {
            Some(c) => c,
            None => self.target.connect().map_err(|source| RestoreError::Pool {
                name: name.to_string(),
                source,
            })?,
        };
        Ok(c)
    }

    fn read_range(
        &mut self,
        generation: u64,
        file: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ClientError> {
        let mut last = None;
        for _ in 0..2 {
            let client = match self.client.take() {
                Some(c) => c,
                None => self.target.connect()?,
            };
            let mut client = client;
            match client.get_range(&self.name, generation, file, offset, buf) {
                Ok(()) => {
                    self.client = Some(client);
                    return Ok(());
                }
                // The pool answered: asking again would get the same answer.
                Err(e) if e.pool_code().is_some() => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("a failed attempt"))
    }
}

impl PageSource for PoolPages {
    fn read(&mut self, origin: &Origin, buf: &mut [u8]) -> Result<(), SourceError> {
        if self.warm.as_ref().is_some_and(|w| w.take(origin, buf)) {
            return Ok(());
        }
        let fail = |message: String| SourceError { message };
        if !self.blocks.verify {
            return self
                .read_range(origin.generation, &origin.file, origin.offset, buf)
                .map_err(|e| fail(torpor_pool::error_chain(&e)));
        }
        let digests = self
            .blocks
            .get(origin.generation, &origin.file)
            .map_err(fail)?;
        let first = origin.offset / BLOCK_SIZE * BLOCK_SIZE;
        let end = (origin.offset + buf.len() as u64)
            .div_ceil(BLOCK_SIZE)
            .saturating_mul(BLOCK_SIZE)
            .min(digests.file_size());
        if end < origin.offset + buf.len() as u64 {
            return Err(fail(format!(
                "{} of generation {}: range beyond its sealed size",
                origin.file, origin.generation
            )));
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize((end - first) as usize, 0);
        let result = self
            .read_range(origin.generation, &origin.file, first, &mut scratch)
            .map_err(|e| fail(torpor_pool::error_chain(&e)))
            .and_then(|()| {
                digests.verify(first, &scratch).map_err(|e| {
                    fail(format!(
                        "{} of generation {}: {e}",
                        origin.file, origin.generation
                    ))
                })
            });
        if result.is_ok() {
            let at = (origin.offset - first) as usize;
            buf.copy_from_slice(&scratch[at..at + buf.len()]);
        }
        self.scratch = scratch;
        result
    }
}

/// Largest piece the warm-up reads at once (the server's prefetch copies in such chunks).
const WARM_PIECE: u64 = 4 << 20;

/// Most working-set bytes read ahead; beyond this the push reads from the pool as it goes.
pub(crate) const WARM_MAX: u64 = 512 << 20;

/// The working set's bytes, read from the pool and verified by a thread of their own while
/// CRIU is still restoring, and handed out once each to the lazy-pages server's reads.
#[derive(Debug, Clone)]
pub(crate) struct Warm {
    inner: Arc<WarmInner>,
}

#[derive(Debug)]
struct WarmInner {
    state: Mutex<WarmState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct WarmState {
    /// Planned pieces per (generation, file), by offset; their bytes arrive in order.
    pieces: HashMap<(u64, String), Vec<Piece>>,
    /// The reader is done (or gave up): nothing more will arrive.
    finished: bool,
}

#[derive(Debug)]
struct Piece {
    offset: u64,
    len: u64,
    bytes: Option<Vec<u8>>,
    /// Bytes not handed out yet; the piece's memory goes once they all were.
    left: u64,
    /// The reader could not get it: reads of it go to the pool.
    failed: bool,
}

impl Warm {
    /// Starts reading `wanted` (origins and lengths, each within one file) with `source` on
    /// a thread of its own (which ends when it has read them); returns at once.
    pub(crate) fn start(mut source: PoolPages, wanted: Vec<(Origin, u64)>) -> Warm {
        let mut state = WarmState::default();
        let mut order = Vec::new();
        for (origin, len) in wanted {
            let mut at = 0;
            while at < len {
                let n = (len - at).min(WARM_PIECE);
                let key = (origin.generation, origin.file.clone());
                state.pieces.entry(key.clone()).or_default().push(Piece {
                    offset: origin.offset + at,
                    len: n,
                    bytes: None,
                    left: n,
                    failed: false,
                });
                order.push((key, origin.offset + at, n));
                at += n;
            }
        }
        for list in state.pieces.values_mut() {
            list.sort_by_key(|p| p.offset);
        }
        let warm = Warm {
            inner: Arc::new(WarmInner {
                state: Mutex::new(state),
                changed: Condvar::new(),
            }),
        };
        let me = warm.clone();
        thread::spawn(move || {
            for ((generation, file), offset, len) in order {
                // Nobody left to hand the bytes to (the restore failed or ended).
                if Arc::strong_count(&me.inner) == 1 {
                    break;
                }
                let origin = Origin {
                    generation,
                    file,
                    offset,
                };
                let mut bytes = vec![0u8; len as usize];
                let got = source.read(&origin, &mut bytes);
                let got_failed = got.is_err();
                let mut state = me.inner.state.lock().expect("warm lock");
                if let Some(p) = state
                    .pieces
                    .get_mut(&(origin.generation, origin.file))
                    .and_then(|l| l.iter_mut().find(|p| p.offset == offset))
                {
                    match got {
                        Ok(()) => p.bytes = Some(bytes),
                        Err(_) => p.failed = true,
                    }
                }
                if got_failed {
                    // The pool let one read down: the server's own reads say how, at once,
                    // rather than after every piece's timeouts here.
                    state.finished = true;
                    drop(state);
                    me.inner.changed.notify_all();
                    return;
                }
                drop(state);
                me.inner.changed.notify_all();
            }
            me.inner.state.lock().expect("warm lock").finished = true;
            me.inner.changed.notify_all();
        });
        warm
    }

    /// Waits until the reader is done; returns the bytes it holds.
    pub(crate) fn wait_read(&self) -> u64 {
        let mut state = self.inner.state.lock().expect("warm lock");
        while !state.finished {
            state = self.inner.changed.wait(state).expect("warm lock");
        }
        state
            .pieces
            .values()
            .flatten()
            .filter_map(|p| p.bytes.as_ref())
            .map(|b| b.len() as u64)
            .sum()
    }

    /// Copies the bytes at `origin` into `buf` if the planned pieces cover them all, waiting
    /// for the reader where it has not got there yet; `false` (nothing copied) otherwise.
    fn take(&self, origin: &Origin, buf: &mut [u8]) -> bool {
        let (start, end) = (origin.offset, origin.offset + buf.len() as u64);
        let key = (origin.generation, origin.file.clone());
        let mut state = self.inner.state.lock().expect("warm lock");
        loop {
            let Some(list) = state.pieces.get(&key) else {
                return false;
            };
            // The pieces overlapping [start, end) must cover it without a gap.
            let first = list.partition_point(|p| p.offset + p.len <= start);
            let mut covered = start;
            let mut waiting = false;
            for p in &list[first..] {
                if p.offset > covered || covered >= end {
                    break;
                }
                if p.failed || (p.bytes.is_none() && state.finished) {
                    return false;
                }
                waiting |= p.bytes.is_none();
                covered = covered.max(p.offset + p.len);
            }
            if covered < end {
                return false;
            }
            if waiting {
                state = self.inner.changed.wait(state).expect("warm lock");
                continue;
            }
            let list = state.pieces.get_mut(&key).expect("looked up above");
            for p in list[first..].iter_mut() {
                if p.offset >= end {
                    break;
                }
                let (s, e) = (start.max(p.offset), end.min(p.offset + p.len));
                let bytes = p.bytes.as_ref().expect("present");
                buf[(s - start) as usize..(e - start) as usize]
                    .copy_from_slice(&bytes[(s - p.offset) as usize..(e - p.offset) as usize]);
                p.left = p.left.saturating_sub(e - s);
                if p.left == 0 {
                    p.bytes = Some(Vec::new());
                    p.len = 0;
                }
            }
            list.retain(|p| p.len > 0);
            return true;
        }
    }
}
