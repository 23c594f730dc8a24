//! The RAM tier's memory and its byte budget. One anonymous mapping, in huge pages where the
//! kernel allows and populated (faulted in) when the pool starts, is cut into `CHUNK_SIZE`
//! chunks that are handed out and returned. Receiving a snapshot therefore writes into memory
//! that is already mapped: on a VM the first touch of fresh memory runs at 1.6-2 GB/s while
//! warm memory copies an order of magnitude faster. Small data lives in exact-size [`Tail`]s
//! instead: a file's first bytes, while they stay small, and the partly filled last chunk of a
//! file when it ends. A small file therefore costs the bytes it holds, not a whole chunk: every
//! chunk and every tail is counted against one byte budget, the RAM tier's capacity.

use std::sync::{Arc, Mutex};

use memmap2::{MmapMut, MmapOptions};
use torpor_image::CHUNK_SIZE;

/// A fixed pool of chunks backed by one pre-faulted mapping, and the byte budget that
/// chunks and tails share.
#[derive(Debug, Clone)]
pub struct Arena {
    inner: Arc<ArenaInner>,
}

#[derive(Debug)]
struct ArenaInner {
    /// Keeps the mapping alive; chunks point into it.
    map: MmapMut,
    book: Mutex<Book>,
    /// The RAM tier's capacity in bytes, exactly as configured: what chunks and tails may
    /// use together. The mapping is rounded up to whole chunks to hold it.
    budget: u64,
}

#[derive(Debug)]
struct Book {
    /// Indices of chunks not handed out.
    free: Vec<u32>,
    /// Bytes of budget in use: `CHUNK_SIZE` per chunk handed out plus each tail's length.
    used: u64,
}

/// One chunk of arena memory, owned by exactly one holder; returned to the arena on drop.
#[derive(Debug)]
pub struct Chunk {
    arena: Arc<ArenaInner>,
    index: u32,
    /// Bytes written so far.
    len: usize,
}

/// Small data of one file (all of a small file, or the rest of a big one after its whole
/// chunks) in a buffer whose length is counted against the arena's budget until dropped.
#[derive(Debug)]
pub struct Tail {
    arena: Arc<ArenaInner>,
    bytes: Vec<u8>,
}

impl Arena {
    /// Maps and faults in enough whole chunks for `capacity` bytes (at least one), and
    /// budgets exactly `capacity` bytes.
    pub fn new(capacity: u64) -> std::io::Result<Arena> {
        let chunk_count = capacity.div_ceil(CHUNK_SIZE).clamp(1, u32::MAX as u64) as u32;
        let len = chunk_count as usize * CHUNK_SIZE as usize;
        let mut map = MmapOptions::new().len(len).map_anon()?;
        // Advised before the first touch, so the tier is faulted in as 2 MiB pages where THP
        // allows (advice given after faulting in changes almost nothing): every pass over a
        // snapshot then costs a TLB miss per 2 MiB instead of per 4 KiB, expensive under a
        // hypervisor's nested paging. A refusal only costs speed.
        let _ = map.advise(memmap2::Advice::HugePage);
        populate(&mut map);
        let free = (0..chunk_count).rev().collect();
        Ok(Arena {
            inner: Arc::new(ArenaInner {
                map,
                book: Mutex::new(Book { free, used: 0 }),
                budget: capacity.min(chunk_count as u64 * CHUNK_SIZE),
            }),
        })
    }

    /// Takes a free chunk, or `None` when the budget has no whole chunk left.
    pub fn try_alloc(&self) -> Option<Chunk> {
        let mut book = self.inner.book.lock().expect("arena lock");
        if book.used + CHUNK_SIZE > self.capacity_bytes() {
            return None;
        }
        let index = book.free.pop()?;
        book.used += CHUNK_SIZE;
        Some(Chunk {
            arena: self.inner.clone(),
            index,
            len: 0,
        })
    }

    /// An empty tail; [`Tail::try_append`] fills it within the budget.
    pub fn tail(&self) -> Tail {
        Tail {
            arena: self.inner.clone(),
            bytes: Vec::new(),
        }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.inner.budget
    }

    /// Budget not in use, in bytes (tails count their exact length).
    pub fn free_bytes(&self) -> u64 {
        let book = self.inner.book.lock().expect("arena lock");
        self.capacity_bytes() - book.used
    }
}

/// Faults in every page of `map` now (writable), so that no upload pays for it later.
fn populate(map: &mut MmapMut) {
    if map.advise(memmap2::Advice::PopulateWrite).is_err() {
        // Kernels before 5.14 lack MADV_POPULATE_WRITE: touch each page instead.
        for page in map.chunks_mut(4096) {
            page[0] = 0;
        }
    }
}

impl Chunk {
    fn base(&self) -> *mut u8 {
        // SAFETY: indices are below the mapping's chunk count, so the offset stays inside it.
        unsafe {
            (self.arena.map.as_ptr() as *mut u8).add(self.index as usize * CHUNK_SIZE as usize)
        }
    }

    /// The bytes written so far.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the chunk range belongs to this Chunk alone (indices are handed out once
        // until dropped) and the mapping lives as long as `arena`.
        unsafe { std::slice::from_raw_parts(self.base(), self.len) }
    }

    /// The unwritten rest of the chunk; call [`Chunk::advance`] after filling a prefix.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only live reference.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base().add(self.len),
                CHUNK_SIZE as usize - self.len,
            )
        }
    }

    /// Marks `n` more bytes as written.
    pub fn advance(&mut self, n: usize) {
        assert!(self.len + n <= CHUNK_SIZE as usize, "chunk overflow");
        self.len += n;
    }

    pub fn is_full(&self) -> bool {
        self.len == CHUNK_SIZE as usize
    }

    /// Moves what the chunk holds into an exact-size tail and returns the chunk to the
    /// arena; the budget shrinks from a whole chunk to the bytes held, so this never fails.
    pub fn into_tail(self) -> Tail {
        let bytes = self.bytes().to_vec();
        let arena = self.arena.clone();
        {
            let mut book = arena.book.lock().expect("arena lock");
            // Counted before the chunk's own drop gives back its CHUNK_SIZE.
            book.used += bytes.len() as u64;
        }
        drop(self);
        Tail { arena, bytes }
    }

    /// Flips one bit; only for tests that prove corruption is detected.
    #[cfg(test)]
    pub(crate) fn flip_bit_for_test(&mut self, at: usize) {
        assert!(at < self.len);
        // SAFETY: in bounds, exclusive through &mut self.
        unsafe { *self.base().add(at) ^= 1 };
    }
}

impl Tail {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Appends `more` if the budget has room for it; `false` (nothing appended) otherwise.
    pub fn try_append(&mut self, more: &[u8]) -> bool {
        let mut book = self.arena.book.lock().expect("arena lock");
        if book.used + more.len() as u64 > self.arena.budget {
            return false;
        }
        book.used += more.len() as u64;
        drop(book);
        self.bytes.extend_from_slice(more);
        true
    }

    /// Flips one bit; only for tests that prove corruption is detected.
    #[cfg(test)]
    pub(crate) fn flip_bit_for_test(&mut self, at: usize) {
        self.bytes[at] ^= 1;
    }
}

// SAFETY: a Chunk is the sole owner of its memory range; the arena's book is locked.
unsafe impl Send for Chunk {}
// SAFETY: shared references only read the written prefix.
unsafe impl Sync for Chunk {}

impl Drop for Chunk {
    fn drop(&mut self) {
        let mut book = self.arena.book.lock().expect("arena lock");
        book.free.push(self.index);
        book.used -= CHUNK_SIZE;
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.arena.book.lock().expect("arena lock").used -= self.bytes.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_reused_and_bounded() {
        let arena = Arena::new(3 * CHUNK_SIZE).unwrap();
        let mut a = arena.try_alloc().unwrap();
        let b = arena.try_alloc().unwrap();
        let c = arena.try_alloc().unwrap();
        assert!(arena.try_alloc().is_none());
        a.spare_mut()[..5].copy_from_slice(b"hello");
        a.advance(5);
        assert_eq!(a.bytes(), b"hello");
        drop(b);
        assert_eq!(arena.free_bytes(), CHUNK_SIZE);
        let d = arena.try_alloc().unwrap();
        assert_eq!(d.bytes().len(), 0);
        drop((a, c, d));
        assert_eq!(arena.free_bytes(), arena.capacity_bytes());
    }

    #[test]
    fn a_tail_costs_its_bytes_and_a_chunk_needs_a_whole_chunk_of_budget() {
        let arena = Arena::new(2 * CHUNK_SIZE).unwrap();
        let mut a = arena.try_alloc().unwrap();
        a.spare_mut()[..3].copy_from_slice(b"abc");
        a.advance(3);
        let mut t = a.into_tail();
        assert_eq!(t.bytes(), b"abc");
        assert!(t.try_append(b"d"));
        assert_eq!(t.bytes(), b"abcd");
        assert_eq!(arena.free_bytes(), 2 * CHUNK_SIZE - 4);
        // One whole chunk of budget is left, not two: the tail's bytes are counted.
        let b = arena.try_alloc().unwrap();
        assert!(arena.try_alloc().is_none());
        assert!(!arena.tail().try_append(&vec![0; CHUNK_SIZE as usize - 3]));
        drop(t);
        let c = arena.try_alloc().unwrap();
        drop((b, c));
        assert_eq!(arena.free_bytes(), arena.capacity_bytes());
    }

    #[test]
    fn a_budget_below_a_chunk_holds_small_tails_only() {
        let arena = Arena::new(64 << 10).unwrap();
        assert_eq!(arena.capacity_bytes(), 64 << 10);
        assert!(
            arena.try_alloc().is_none(),
            "a whole chunk exceeds the budget"
        );
        let mut t = arena.tail();
        assert!(t.try_append(&[7; 60 << 10]));
        assert!(!t.try_append(&[7; 8 << 10]));
        assert_eq!(arena.free_bytes(), 4 << 10);
    }
}
