//! Where a lazy restore's pages come from: the pool, one range read at a time
//! ([`PoolPages`], the lazy-pages server's [`PageSource`]), each read checked against the
//! block digests committed under its generation's seal when the pool is not this process's
//! own; and the working set read ahead while CRIU is still restoring ([`Warm`]), so that the
//! push after CRIU's finish marker only copies memory that is already here and verified.

use std::{
    collections::{HashMap, VecDeque},
    sync::{mpsc, Arc, Condvar, Mutex},
    thread,
};

use memmap2::MmapMut;

use torpor_image::pages::{blocks_file_for, BlockDigests, Origin, BLOCK_SIZE};
use torpor_image::wire::ErrorCode;
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

/// Verified reads of page ranges over one connection to the pool (reopened once if it
/// breaks): with a sealed pool every read is widened to whole blocks and checked against
/// their digests.
#[derive(Debug)]
pub(crate) struct Reader {
    target: PoolTarget,
    client: Option<PoolClient>,
    name: String,
    blocks: BlockCache,
}

impl Reader {
    /// Reads a range; `sealed`: the caller checks it against the block digests.
    fn read_range(
        &mut self,
        generation: u64,
        file: &str,
        offset: u64,
        buf: &mut [u8],
        sealed: bool,
    ) -> Result<(), ClientError> {
        let mut last = None;
        for _ in 0..2 {
            let mut client = match self.client.take() {
                Some(c) => c,
                None => self.target.connect()?,
            };
            let got = if sealed {
                client.get_range_sealed(&self.name, generation, file, offset, buf)
            } else {
                client.get_range(&self.name, generation, file, offset, buf)
            };
            match got {
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

    /// Reads the `len` bytes at `origin` into `buf`, checked when the pool is sealed; returns
    /// where they start in it (a checked read begins at their first block).
    fn fetch(
        &mut self,
        origin: &Origin,
        len: usize,
        buf: &mut Buffer,
    ) -> Result<usize, SourceError> {
        let fail = |message: String| SourceError {
            message,
            corrupt: false,
        };
        // The pool refusing a range because it fails its checksum there.
        let refused = |e: ClientError| SourceError {
            message: torpor_pool::error_chain(&e),
            corrupt: e.pool_code() == Some(ErrorCode::Corrupt),
        };
        if !self.blocks.verify {
            let into = buf.get(len).map_err(|e| fail(e.to_string()))?;
            self.read_range(origin.generation, &origin.file, origin.offset, into, false)
                .map_err(refused)?;
            return Ok(0);
        }
        let digests = self
            .blocks
            .get(origin.generation, &origin.file)
            .map_err(fail)?;
        let first = origin.offset / BLOCK_SIZE * BLOCK_SIZE;
        let end = (origin.offset + len as u64)
            .div_ceil(BLOCK_SIZE)
            .saturating_mul(BLOCK_SIZE)
            .min(digests.file_size());
        if end < origin.offset + len as u64 {
            return Err(fail(format!(
                "{} of generation {}: range beyond its sealed size",
                origin.file, origin.generation
            )));
        }
        let into = buf
            .get((end - first) as usize)
            .map_err(|e| fail(e.to_string()))?;
        self.read_range(origin.generation, &origin.file, first, into, true)
            .map_err(refused)?;
        digests.verify(first, into).map_err(|e| SourceError {
            message: format!("{} of generation {}: {e}", origin.file, origin.generation),
            corrupt: true,
        })?;
        Ok((origin.offset - first) as usize)
    }
}

/// A page-aligned buffer (`UFFDIO_COPY` then copies whole source pages) that grows to the
/// largest read and is reused after that, so its memory is faulted in once.
#[derive(Debug, Default)]
pub(crate) struct Buffer {
    map: Option<MmapMut>,
}

impl Buffer {
    fn get(&mut self, len: usize) -> std::io::Result<&mut [u8]> {
        if self.map.as_ref().is_none_or(|m| m.len() < len) {
            self.map = Some(MmapMut::map_anon(len.max(1))?);
        }
        Ok(&mut self.map.as_mut().expect("mapped above")[..len])
    }

    fn bytes(&self, at: usize, len: usize) -> &[u8] {
        &self.map.as_ref().expect("read into")[at..at + len]
    }
}

/// Lazy pages from the pool, lent from a buffer of its own to the lazy-pages server; the
/// working set read ahead is served from memory first, and the next chunk of a fill (the
/// server's [`PageSource::hint`]) is fetched and checked by a thread of its own while the
/// server copies the current one, so the transfer, the digests and the copy overlap.
#[derive(Debug)]
pub(crate) struct PoolPages {
    reader: Reader,
    /// Holds the bytes last lent, at `lent_at`.
    lent: Buffer,
    /// The working set read ahead, served from memory first.
    warm: Option<Warm>,
    /// Started by the first hint.
    ahead: Option<ReadAhead>,
}

impl PoolPages {
    pub(crate) fn new(
        target: PoolTarget,
        client: Option<PoolClient>,
        name: &str,
        blocks: BlockCache,
    ) -> PoolPages {
        PoolPages {
            reader: Reader {
                target,
                client,
                name: name.to_string(),
                blocks,
            },
            lent: Buffer::default(),
            warm: None,
            ahead: None,
        }
    }

    /// Serves from `warm` what it holds.
    pub(crate) fn with_warm(mut self, warm: Warm) -> PoolPages {
        self.warm = Some(warm);
        self
    }

    /// The open connection, for a whole-file fetch during set-up.
    pub(crate) fn client_or_connect(&mut self, name: &str) -> Result<PoolClient, RestoreError> {
        let c = match self.reader.client.take() {
            Some(c) => c,
            None => self
                .reader
                .target
                .connect()
                .map_err(|source| RestoreError::Pool {
                    name: name.to_string(),
                    source,
                })?,
        };
        Ok(c)
    }

    /// Gives back the connection [`PoolPages::client_or_connect`] lent.
    pub(crate) fn keep_client(&mut self, client: PoolClient) {
        self.reader.client = Some(client);
    }
}

impl PageSource for PoolPages {
    fn read(&mut self, origin: &Origin, len: usize) -> Result<&[u8], SourceError> {
        if let Some(warm) = &self.warm {
            let into = self.lent.get(len).map_err(|e| SourceError {
                message: e.to_string(),
                corrupt: false,
            })?;
            if warm.take(origin, into) {
                return Ok(self.lent.bytes(0, len));
            }
        }
        if let Some(ahead) = &mut self.ahead {
            if let Some((buf, at)) = ahead.take(origin, len) {
                ahead.spare.push(std::mem::replace(&mut self.lent, buf));
                return Ok(self.lent.bytes(at, len));
            }
        }
        let at = self.reader.fetch(origin, len, &mut self.lent)?;
        Ok(self.lent.bytes(at, len))
    }

    fn hint(&mut self, origin: &Origin, len: usize) {
        let reader = &self.reader;
        let ahead = self.ahead.get_or_insert_with(|| ReadAhead::start(reader));
        ahead.ask(origin, len);
    }
}

/// Most hinted reads in flight: the server hints the two chunks after the one it copies.
const AHEAD_DEPTH: usize = 3;
/// Threads fetching hinted reads, each on its own connection: one receives and checks a
/// chunk while the other waits for the pool's next.
const AHEAD_WORKERS: usize = 2;

/// Reads fetched ahead of the server by threads with connections of their own; each is
/// taken once, and one the server no longer asks for is dropped.
#[derive(Debug)]
struct ReadAhead {
    workers: Vec<mpsc::Sender<Job>>,
    next_worker: usize,
    /// Asked for and not taken yet, oldest first.
    pending: VecDeque<Pending>,
    /// Buffers for the next jobs.
    spare: Vec<Buffer>,
}

#[derive(Debug)]
struct Pending {
    origin: Origin,
    len: usize,
    reply: mpsc::Receiver<Fetched>,
}

#[derive(Debug)]
struct Job {
    origin: Origin,
    len: usize,
    buf: Buffer,
    reply: mpsc::Sender<Fetched>,
}

#[derive(Debug)]
struct Fetched {
    at: Result<usize, SourceError>,
    buf: Buffer,
}

impl ReadAhead {
    fn start(reader: &Reader) -> ReadAhead {
        let workers = (0..AHEAD_WORKERS)
            .map(|_| {
                let mut reader = Reader {
                    target: reader.target.clone(),
                    client: None,
                    name: reader.name.clone(),
                    blocks: reader.blocks.clone(),
                };
                let (jobs, jobs_rx) = mpsc::channel::<Job>();
                // Ends when the source is dropped (its senders with it).
                thread::Builder::new()
                    .name("torpor-read-ahead".into())
                    .spawn(move || {
                        while let Ok(mut job) = jobs_rx.recv() {
                            let at = reader.fetch(&job.origin, job.len, &mut job.buf);
                            // a read the server no longer wants goes with its buffer
                            let _ = job.reply.send(Fetched { at, buf: job.buf });
                        }
                    })
                    .expect("spawning a read-ahead thread");
                jobs
            })
            .collect();
        ReadAhead {
            workers,
            next_worker: 0,
            pending: VecDeque::new(),
            spare: Vec::new(),
        }
    }

    fn ask(&mut self, origin: &Origin, len: usize) {
        if self
            .pending
            .iter()
            .any(|p| p.len == len && p.origin == *origin)
        {
            return;
        }
        // In step with the server, the queue never fills: a full one holds a read the server
        // will not ask for (its ranges changed), which is dropped.
        if self.pending.len() >= AHEAD_DEPTH {
            self.pending.pop_front();
        }
        let (reply, rx) = mpsc::channel();
        let job = Job {
            origin: origin.clone(),
            len,
            buf: self.spare.pop().unwrap_or_default(),
            reply,
        };
        let worker = self.next_worker % self.workers.len();
        self.next_worker += 1;
        if self.workers[worker].send(job).is_ok() {
            self.pending.push_back(Pending {
                origin: origin.clone(),
                len,
                reply: rx,
            });
        }
    }

    /// The buffer holding the `len` bytes at `origin` and where they start in it, if a read
    /// asked for earlier covers them (waiting for it); reads asked for before it are dropped.
    fn take(&mut self, origin: &Origin, len: usize) -> Option<(Buffer, usize)> {
        let i = self.pending.iter().position(|p| {
            p.origin.generation == origin.generation
                && p.origin.file == origin.file
                && p.origin.offset <= origin.offset
                && origin.offset + len as u64 <= p.origin.offset + p.len as u64
        })?;
        self.pending.drain(..i);
        let p = self.pending.pop_front().expect("found above");
        let fetched = p.reply.recv().ok()?;
        match fetched.at {
            Ok(at) => Some((fetched.buf, at + (origin.offset - p.origin.offset) as usize)),
            // the server's own read says what is wrong (or gets it on the retry)
            Err(_) => {
                self.spare.push(fetched.buf);
                None
            }
        }
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
    pub(crate) fn start(source: PoolPages, wanted: Vec<(Origin, u64)>) -> Warm {
        let mut reader = source.reader;
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
                let mut buf = Buffer::default();
                let got = reader
                    .fetch(&origin, len as usize, &mut buf)
                    .map(|at| buf.bytes(at, len as usize).to_vec());
                let got_failed = got.is_err();
                let mut state = me.inner.state.lock().expect("warm lock");
                if let Some(p) = state
                    .pieces
                    .get_mut(&(origin.generation, origin.file))
                    .and_then(|l| l.iter_mut().find(|p| p.offset == offset))
                {
                    match got {
                        Ok(bytes) => p.bytes = Some(bytes),
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
