//! CRIU's memory images read for a lazy restore: `pagemap-<pid>.img` (which pages were dumped
//! and how), `mm-<pid>.img` (the VMAs), `pstree.img` (the processes), and the per-process plan
//! derived from them: which ranges a lazy-pages server must serve from where, and which bytes
//! of the pages file `criu restore` reads itself.
//!
//! Every image here is `IMG_COMMON_MAGIC`, the image's own magic, then protobuf messages each
//! behind a u32 length (little-endian, as CRIU writes on every architecture torpor runs on).
//! Field numbers follow CRIU's `images/{pagemap,mm,vma,pstree}.proto`; prost skips the fields
//! torpor does not read.

use prost::Message;
use torpor_image::pages::{Origin, PageRange, PAGE_SIZE};

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const MM_MAGIC: u32 = 0x5749_2820;
const PSTREE_MAGIC: u32 = 0x5027_3030;

/// Largest single message accepted. CRIU's largest here is an `mm_entry` with every VMA
/// (about 60 bytes each, `vm.max_map_count` 65530 by default): far below this.
pub const MAX_MESSAGE_LEN: u32 = 16 << 20;

/// The entry's pages are in the parent snapshot's images (`criu dump --prev-images-dir`).
pub const PE_PARENT: u32 = 1 << 0;
/// The entry's pages may be restored lazily, on fault.
pub const PE_LAZY: u32 = 1 << 1;
/// The entry's pages are in this snapshot's `pages-<id>.img`.
pub const PE_PRESENT: u32 = 1 << 2;

/// `VmaEntry.status` bit of the fake guard-region entries CRIU 4.2 appends to the VMA list.
const VMA_AREA_GUARD: u32 = 1 << 16;

/// Why one of CRIU's images was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("{image} image ends inside its {part}")]
    Truncated {
        image: &'static str,
        part: &'static str,
    },
    #[error("{image} image has magic {found:#010x}, expected {expected:#010x}")]
    BadMagic {
        image: &'static str,
        found: u32,
        expected: u32,
    },
    #[error(
        "{image} image message {index} claims {len} bytes, over the {MAX_MESSAGE_LEN} byte limit"
    )]
    MessageTooLarge {
        image: &'static str,
        index: usize,
        len: u32,
    },
    #[error("{image} image message {index} is not a valid {message}")]
    Protobuf {
        image: &'static str,
        index: usize,
        message: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{image} image holds {found} messages where {expected} are required")]
    MessageCount {
        image: &'static str,
        found: usize,
        expected: &'static str,
    },
    #[error("pagemap entry at {vaddr:#x} is invalid: {reason}")]
    BadEntry { vaddr: u64, reason: &'static str },
    #[error("pagemap entry at {vaddr:#x} has its pages in a parent snapshot, which torpor never dumps with")]
    ParentEntry { vaddr: u64 },
    #[error("lazy pagemap entry at {vaddr:#x} has no bytes in the pages file (a `dump --lazy-pages` image)")]
    LazyNotPresent { vaddr: u64 },
    #[error("lazy page {addr:#x} lies outside every VMA")]
    LazyOutsideVma { addr: u64 },
    #[error("VMA {start:#x}-{end:#x} is invalid: {reason}")]
    BadVma {
        start: u64,
        end: u64,
        reason: &'static str,
    },
    #[error("pstree entry {index} has pid {pid}, not a valid pid")]
    BadPid { index: usize, pid: u32 },
}

/// One image kind: its name for errors and its magic.
#[derive(Clone, Copy)]
struct Kind {
    name: &'static str,
    magic: u32,
}

const PAGEMAP: Kind = Kind {
    name: "pagemap",
    magic: PAGEMAP_MAGIC,
};
const MM: Kind = Kind {
    name: "mm",
    magic: MM_MAGIC,
};
const PSTREE: Kind = Kind {
    name: "pstree",
    magic: PSTREE_MAGIC,
};

/// Checks both magics and splits the rest into its length-prefixed messages, borrowed from
/// `bytes` (so a lying length costs no allocation).
fn messages(kind: Kind, bytes: &[u8]) -> Result<Vec<&[u8]>, ImageError> {
    let word = |at: usize, part: &'static str| -> Result<u32, ImageError> {
        bytes
            .get(at..at + 4)
            .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
            .ok_or(ImageError::Truncated {
                image: kind.name,
                part,
            })
    };
    for (at, expected) in [(0, IMG_COMMON_MAGIC), (4, kind.magic)] {
        let found = word(at, "magic")?;
        if found != expected {
            return Err(ImageError::BadMagic {
                image: kind.name,
                found,
                expected,
            });
        }
    }
    let mut out = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let len = word(at, "message length")?;
        if len > MAX_MESSAGE_LEN {
            return Err(ImageError::MessageTooLarge {
                image: kind.name,
                index: out.len(),
                len,
            });
        }
        let body = bytes
            .get(at + 4..at + 4 + len as usize)
            .ok_or(ImageError::Truncated {
                image: kind.name,
                part: "message",
            })?;
        out.push(body);
        at += 4 + len as usize;
    }
    Ok(out)
}

fn decode<M: Message + Default>(
    kind: Kind,
    index: usize,
    message: &'static str,
    body: &[u8],
) -> Result<M, ImageError> {
    M::decode(body).map_err(|source| ImageError::Protobuf {
        image: kind.name,
        index,
        message,
        source,
    })
}

#[derive(Clone, PartialEq, Message)]
struct PagemapHeadPb {
    #[prost(uint32, required, tag = "1")]
    pages_id: u32,
}

#[derive(Clone, PartialEq, Message)]
struct PagemapEntryPb {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    /// The page count before v4.2; v4.2 writes 0 here and the count in `nr_pages`.
    #[prost(uint32, required, tag = "2")]
    compat_nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    nr_pages: Option<u64>,
}

#[derive(Clone, PartialEq, Message)]
struct MmEntryPb {
    #[prost(message, repeated, tag = "14")]
    vmas: Vec<VmaEntryPb>,
}

#[derive(Clone, PartialEq, Message)]
struct VmaEntryPb {
    #[prost(uint64, required, tag = "1")]
    start: u64,
    #[prost(uint64, required, tag = "2")]
    end: u64,
    #[prost(uint32, required, tag = "6")]
    flags: u32,
    #[prost(uint32, required, tag = "7")]
    status: u32,
}

#[derive(Clone, PartialEq, Message)]
struct PstreeEntryPb {
    #[prost(uint32, required, tag = "1")]
    pid: u32,
}

/// One run of pages of a process, as dumped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry {
    /// Address of the first page at dump time (the key CRIU's restore and lazy server use).
    pub vaddr: u64,
    /// Number of pages, at least one.
    pub nr_pages: u64,
    /// `PE_*` bits, normalised from old images the way CRIU's reader does.
    pub flags: u32,
}

impl PagemapEntry {
    /// Length in bytes.
    pub fn bytes(&self) -> u64 {
        self.nr_pages * PAGE_SIZE
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.vaddr + self.bytes()
    }

    /// Whether the entry's bytes take space in the pages file.
    pub fn is_present(&self) -> bool {
        self.flags & PE_PRESENT != 0
    }

    /// Whether the entry may be served on fault instead of by `criu restore`.
    pub fn is_lazy(&self) -> bool {
        self.flags & PE_LAZY != 0
    }
}

/// A parsed `pagemap-<pid>.img`: which pages file holds the bytes, and the entries in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    /// Names `pages-<pages_id>.img`.
    pub pages_id: u32,
    /// Ascending, disjoint, each page-aligned and non-empty (checked by [`Pagemap::parse`]).
    pub entries: Vec<PagemapEntry>,
}

impl Pagemap {
    /// Decodes and checks a pagemap image.
    pub fn parse(bytes: &[u8]) -> Result<Pagemap, ImageError> {
        let msgs = messages(PAGEMAP, bytes)?;
        let (head, rest) = msgs.split_first().ok_or(ImageError::MessageCount {
            image: PAGEMAP.name,
            found: 0,
            expected: "a head and any number of entries",
        })?;
        let head: PagemapHeadPb = decode(PAGEMAP, 0, "pagemap_head", head)?;
        let mut entries: Vec<PagemapEntry> = Vec::with_capacity(rest.len());
        for (i, body) in rest.iter().enumerate() {
            let pb: PagemapEntryPb = decode(PAGEMAP, i + 1, "pagemap_entry", body)?;
            let entry = normalise(&pb)?;
            if let Some(prev) = entries.last() {
                if entry.vaddr < prev.end() {
                    return Err(ImageError::BadEntry {
                        vaddr: entry.vaddr,
                        reason: "it overlaps or precedes the entry before it",
                    });
                }
            }
            entries.push(entry);
        }
        Ok(Pagemap {
            pages_id: head.pages_id,
            entries,
        })
    }

    /// The name of the image holding this pagemap's present pages.
    pub fn pages_file(&self) -> String {
        format!("pages-{}.img", self.pages_id)
    }
}

/// CRIU's `init_compat_pagemap_entry`, then the checks that keep later arithmetic in range.
fn normalise(pb: &PagemapEntryPb) -> Result<PagemapEntry, ImageError> {
    let vaddr = pb.vaddr;
    let bad = |reason| ImageError::BadEntry { vaddr, reason };
    let mut flags = pb.flags.unwrap_or(0);
    if pb.in_parent == Some(true) {
        flags |= PE_PARENT;
    } else if pb.flags.is_none() {
        flags = PE_PRESENT;
    }
    let nr_pages = pb.nr_pages.unwrap_or(pb.compat_nr_pages.into());
    if flags & !(PE_PARENT | PE_LAZY | PE_PRESENT) != 0 {
        return Err(bad("it has unknown flag bits"));
    }
    if flags == 0 {
        return Err(bad("it has no flags"));
    }
    if !vaddr.is_multiple_of(PAGE_SIZE) {
        return Err(bad("its address is not page-aligned"));
    }
    if nr_pages == 0 {
        return Err(bad("it has no pages"));
    }
    nr_pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| vaddr.checked_add(len))
        .ok_or(bad("it runs past the end of the address space"))?;
    Ok(PagemapEntry {
        vaddr,
        nr_pages,
        flags,
    })
}

/// One mapping of a process at dump time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// `mmap` flags (`MAP_PRIVATE`, `MAP_ANONYMOUS`, …): they decide whether pages can be lazy.
    pub flags: u32,
    /// CRIU's `VMA_AREA_*` bits.
    pub status: u32,
}

/// Reads the VMAs of an `mm-<pid>.img`, without CRIU's fake guard entries, and checks that
/// they are page-aligned, non-empty, ascending and disjoint.
pub fn parse_mm_vmas(bytes: &[u8]) -> Result<Vec<Vma>, ImageError> {
    let msgs = messages(MM, bytes)?;
    let [body] = msgs[..] else {
        return Err(ImageError::MessageCount {
            image: MM.name,
            found: msgs.len(),
            expected: "exactly one",
        });
    };
    let mm: MmEntryPb = decode(MM, 0, "mm_entry", body)?;
    let vmas: Vec<Vma> = mm
        .vmas
        .iter()
        .filter(|v| v.status & VMA_AREA_GUARD == 0)
        .map(|v| Vma {
            start: v.start,
            end: v.end,
            flags: v.flags,
            status: v.status,
        })
        .collect();
    check_vmas(&vmas)?;
    Ok(vmas)
}

fn check_vmas(vmas: &[Vma]) -> Result<(), ImageError> {
    let mut prev_end = 0;
    for v in vmas {
        let bad = |reason| ImageError::BadVma {
            start: v.start,
            end: v.end,
            reason,
        };
        if !v.start.is_multiple_of(PAGE_SIZE) || !v.end.is_multiple_of(PAGE_SIZE) {
            return Err(bad("it is not page-aligned"));
        }
        if v.start >= v.end {
            return Err(bad("it is empty"));
        }
        if v.start < prev_end {
            return Err(bad("it overlaps or precedes the VMA before it"));
        }
        prev_end = v.end;
    }
    Ok(())
}

/// Every process's pid in a `pstree.img`, in image order (zombies included).
pub fn parse_pstree_pids(bytes: &[u8]) -> Result<Vec<i32>, ImageError> {
    let msgs = messages(PSTREE, bytes)?;
    if msgs.is_empty() {
        return Err(ImageError::MessageCount {
            image: PSTREE.name,
            found: 0,
            expected: "at least one",
        });
    }
    msgs.iter()
        .enumerate()
        .map(|(index, body)| {
            let e: PstreeEntryPb = decode(PSTREE, index, "pstree_entry", body)?;
            match i32::try_from(e.pid) {
                Ok(pid) if pid > 0 => Ok(pid),
                _ => Err(ImageError::BadPid { index, pid: e.pid }),
            }
        })
        .collect()
}

/// What a lazy restore of one process needs: its lazy ranges (split at VMA ends, origins in
/// `generation`'s pages file at the offsets CRIU's restore computes) and the byte ranges of the
/// pages file that CRIU's restore reads itself (every PE_PRESENT entry that is not PE_LAZY),
/// which must be present in the local pages file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessPlan {
    /// The pid as recorded in the images (what `criu restore` sends the lazy server).
    pub pid: i32,
    /// `pages-<id>.img`.
    pub pages_file: String,
    /// Logical size of the pages file: every present entry's bytes.
    pub pages_file_size: u64,
    /// Ranges to serve on fault, ascending, none crossing a VMA end (`UFFDIO_COPY` cannot).
    pub lazy: Vec<PageRange>,
    /// `(offset, len)` in the pages file of what `criu restore` reads itself; ascending,
    /// adjacent runs merged.
    pub eager: Vec<(u64, u64)>,
}

/// Plans the lazy restore of process `pid` from its pagemap and VMAs, with its pages file
/// stored as generation `generation`.
pub fn plan_process(
    pid: i32,
    generation: u64,
    pagemap: &Pagemap,
    vmas: &[Vma],
) -> Result<ProcessPlan, ImageError> {
    check_vmas(vmas)?;
    let pages_file = pagemap.pages_file();
    let mut offset = 0u64;
    let mut lazy = Vec::new();
    let mut eager: Vec<(u64, u64)> = Vec::new();
    let mut prev_end = 0u64;
    for e in &pagemap.entries {
        // `Pagemap`'s fields are public: recheck what the arithmetic below relies on.
        let checked = normalise(&PagemapEntryPb {
            vaddr: e.vaddr,
            compat_nr_pages: 0,
            in_parent: None,
            flags: Some(e.flags),
            nr_pages: Some(e.nr_pages),
        })?;
        if checked.vaddr < prev_end {
            return Err(ImageError::BadEntry {
                vaddr: e.vaddr,
                reason: "it overlaps or precedes the entry before it",
            });
        }
        prev_end = checked.end();
        if e.flags & PE_PARENT != 0 {
            return Err(ImageError::ParentEntry { vaddr: e.vaddr });
        }
        if e.is_lazy() {
            if !e.is_present() {
                return Err(ImageError::LazyNotPresent { vaddr: e.vaddr });
            }
            let origin = Origin {
                generation,
                file: pages_file.clone(),
                offset,
            };
            split_at_vmas(e, &origin, vmas, &mut lazy)?;
        } else if e.is_present() {
            match eager.last_mut() {
                Some((at, len)) if *at + *len == offset => *len += e.bytes(),
                _ => eager.push((offset, e.bytes())),
            }
        }
        if e.is_present() {
            offset = offset.checked_add(e.bytes()).ok_or(ImageError::BadEntry {
                vaddr: e.vaddr,
                reason: "the pages file would exceed 2^64 bytes",
            })?;
        }
    }
    Ok(ProcessPlan {
        pid,
        pages_file,
        pages_file_size: offset,
        lazy,
        eager,
    })
}

/// Cuts a lazy entry at every VMA end (CRIU's `collect_iovs`), refusing any page not inside
/// a VMA: the restorer registers whole VMAs, so such a page could never fault.
fn split_at_vmas(
    e: &PagemapEntry,
    origin: &Origin,
    vmas: &[Vma],
    out: &mut Vec<PageRange>,
) -> Result<(), ImageError> {
    let end = e.end();
    let mut start = e.vaddr;
    let mut i = vmas.partition_point(|v| v.end <= start);
    while start < end {
        match vmas.get(i) {
            Some(v) if v.start <= start => {
                let piece_end = end.min(v.end);
                out.push(PageRange {
                    start,
                    len: piece_end - start,
                    origin: origin.advanced(start - e.vaddr),
                });
                start = piece_end;
                i += 1;
            }
            _ => return Err(ImageError::LazyOutsideVma { addr: start }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(magic: u32, bodies: &[Vec<u8>]) -> Vec<u8> {
        let mut img = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
        img.extend(magic.to_le_bytes());
        for b in bodies {
            img.extend((b.len() as u32).to_le_bytes());
            img.extend(b);
        }
        img
    }

    /// A v4.2 entry: count in field 5, 0 in field 2, flags always written.
    fn entry(vaddr: u64, nr_pages: u64, flags: u32) -> PagemapEntryPb {
        PagemapEntryPb {
            vaddr,
            compat_nr_pages: 0,
            in_parent: None,
            flags: Some(flags),
            nr_pages: Some(nr_pages),
        }
    }

    fn pagemap_image(pages_id: u32, entries: &[PagemapEntryPb]) -> Vec<u8> {
        let mut bodies = vec![PagemapHeadPb { pages_id }.encode_to_vec()];
        bodies.extend(entries.iter().map(|e| e.encode_to_vec()));
        image(PAGEMAP_MAGIC, &bodies)
    }

    fn vma(start: u64, end: u64) -> Vma {
        Vma {
            start,
            end,
            flags: 0x22, // MAP_PRIVATE | MAP_ANONYMOUS
            status: 1 | (1 << 9),
        }
    }

    fn mm_image(vmas: &[(u64, u64, u32)]) -> Vec<u8> {
        let mm = MmEntryPb {
            vmas: vmas
                .iter()
                .map(|&(start, end, status)| VmaEntryPb {
                    start,
                    end,
                    flags: 0x22,
                    status,
                })
                .collect(),
        };
        image(MM_MAGIC, &[mm.encode_to_vec()])
    }

    const P: u64 = PAGE_SIZE;

    #[test]
    fn reads_a_v4_2_pagemap() {
        let img = pagemap_image(
            7,
            &[
                entry(0x1000, 2, PE_PRESENT),
                entry(0x10000, 300, PE_LAZY | PE_PRESENT),
            ],
        );
        let pm = Pagemap::parse(&img).unwrap();
        assert_eq!(pm.pages_id, 7);
        assert_eq!(pm.pages_file(), "pages-7.img");
        assert_eq!(
            pm.entries,
            vec![
                PagemapEntry {
                    vaddr: 0x1000,
                    nr_pages: 2,
                    flags: PE_PRESENT
                },
                PagemapEntry {
                    vaddr: 0x10000,
                    nr_pages: 300,
                    flags: PE_LAZY | PE_PRESENT
                },
            ]
        );
    }

    #[test]
    fn field_5_wins_over_field_2_and_field_2_serves_old_images() {
        let both = PagemapEntryPb {
            compat_nr_pages: 9,
            ..entry(0, 3, PE_PRESENT)
        };
        let old = PagemapEntryPb {
            compat_nr_pages: 9,
            nr_pages: None,
            ..entry(0x100000, 0, PE_PRESENT)
        };
        let pm = Pagemap::parse(&pagemap_image(1, &[both, old])).unwrap();
        assert_eq!(pm.entries[0].nr_pages, 3);
        assert_eq!(pm.entries[1].nr_pages, 9);
    }

    #[test]
    fn old_images_get_their_flags_as_criu_reads_them() {
        let no_flags = PagemapEntryPb {
            flags: None,
            ..entry(0, 1, 0)
        };
        let in_parent = PagemapEntryPb {
            flags: None,
            in_parent: Some(true),
            ..entry(P, 1, 0)
        };
        let not_in_parent = PagemapEntryPb {
            flags: None,
            in_parent: Some(false),
            ..entry(2 * P, 1, 0)
        };
        let pm = Pagemap::parse(&pagemap_image(1, &[no_flags, in_parent, not_in_parent])).unwrap();
        let flags: Vec<u32> = pm.entries.iter().map(|e| e.flags).collect();
        assert_eq!(flags, vec![PE_PRESENT, PE_PARENT, PE_PRESENT]);
    }

    #[test]
    fn offsets_count_only_earlier_present_entries_and_lazy_ranges_split_at_vma_ends() {
        // present 2 pages | lazy 4 pages across two VMAs | lazy 1 page in a third VMA |
        // present 1 page.
        let pm = Pagemap {
            pages_id: 3,
            entries: vec![
                PagemapEntry {
                    vaddr: 0x1000,
                    nr_pages: 2,
                    flags: PE_PRESENT,
                },
                PagemapEntry {
                    vaddr: 0x10000,
                    nr_pages: 4,
                    flags: PE_LAZY | PE_PRESENT,
                },
                PagemapEntry {
                    vaddr: 0x20000,
                    nr_pages: 1,
                    flags: PE_LAZY | PE_PRESENT,
                },
                PagemapEntry {
                    vaddr: 0x30000,
                    nr_pages: 1,
                    flags: PE_PRESENT,
                },
            ],
        };
        let vmas = [
            vma(0x1000, 0x3000),
            vma(0x10000, 0x12000),
            vma(0x12000, 0x14000),
            vma(0x20000, 0x21000),
            vma(0x30000, 0x31000),
        ];
        let plan = plan_process(42, 5, &pm, &vmas).unwrap();
        let origin = |offset| Origin {
            generation: 5,
            file: "pages-3.img".into(),
            offset,
        };
        assert_eq!(plan.pid, 42);
        assert_eq!(plan.pages_file, "pages-3.img");
        assert_eq!(plan.pages_file_size, 8 * P);
        assert_eq!(
            plan.lazy,
            vec![
                PageRange {
                    start: 0x10000,
                    len: 2 * P,
                    origin: origin(2 * P)
                },
                PageRange {
                    start: 0x12000,
                    len: 2 * P,
                    origin: origin(4 * P)
                },
                PageRange {
                    start: 0x20000,
                    len: P,
                    origin: origin(6 * P)
                },
            ]
        );
        assert_eq!(plan.eager, vec![(0, 2 * P), (7 * P, P)]);
    }

    #[test]
    fn eager_entries_adjacent_in_the_pages_file_merge() {
        let pm = Pagemap {
            pages_id: 1,
            entries: vec![
                PagemapEntry {
                    vaddr: 0,
                    nr_pages: 1,
                    flags: PE_PRESENT,
                },
                // Not adjacent in memory, adjacent in the file.
                PagemapEntry {
                    vaddr: 4 * P,
                    nr_pages: 2,
                    flags: PE_PRESENT,
                },
            ],
        };
        let plan = plan_process(1, 0, &pm, &[]).unwrap();
        assert_eq!(plan.eager, vec![(0, 3 * P)]);
        assert_eq!(plan.pages_file_size, 3 * P);
        assert!(plan.lazy.is_empty());
    }

    #[test]
    fn a_lazy_page_outside_every_vma_is_refused() {
        let pm = |vaddr, nr_pages| Pagemap {
            pages_id: 1,
            entries: vec![PagemapEntry {
                vaddr,
                nr_pages,
                flags: PE_LAZY | PE_PRESENT,
            }],
        };
        let vmas = [vma(0x10000, 0x12000), vma(0x13000, 0x14000)];
        // Runs past the last VMA.
        assert_eq!(
            plan_process(1, 0, &pm(0x13000, 2), &vmas),
            Err(ImageError::LazyOutsideVma { addr: 0x14000 })
        );
        // Crosses the gap between two VMAs.
        assert_eq!(
            plan_process(1, 0, &pm(0x11000, 2), &vmas),
            Err(ImageError::LazyOutsideVma { addr: 0x12000 })
        );
        // Starts before the first VMA.
        assert_eq!(
            plan_process(1, 0, &pm(0xf000, 2), &vmas),
            Err(ImageError::LazyOutsideVma { addr: 0xf000 })
        );
        // No VMA at all.
        assert_eq!(
            plan_process(1, 0, &pm(0x10000, 1), &[]),
            Err(ImageError::LazyOutsideVma { addr: 0x10000 })
        );
        assert!(plan_process(1, 0, &pm(0x10000, 2), &vmas).is_ok());
    }

    #[test]
    fn parent_entries_and_lazy_entries_without_bytes_are_refused() {
        let img = pagemap_image(1, &[entry(0, 1, PE_PARENT)]);
        let pm = Pagemap::parse(&img).unwrap();
        assert_eq!(
            plan_process(1, 0, &pm, &[vma(0, P)]),
            Err(ImageError::ParentEntry { vaddr: 0 })
        );
        let old = PagemapEntryPb {
            flags: None,
            in_parent: Some(true),
            ..entry(P, 1, 0)
        };
        let pm = Pagemap::parse(&pagemap_image(1, &[old])).unwrap();
        assert_eq!(
            plan_process(1, 0, &pm, &[vma(P, 2 * P)]),
            Err(ImageError::ParentEntry { vaddr: P })
        );
        let pm = Pagemap::parse(&pagemap_image(1, &[entry(0, 1, PE_LAZY)])).unwrap();
        assert_eq!(
            plan_process(1, 0, &pm, &[vma(0, P)]),
            Err(ImageError::LazyNotPresent { vaddr: 0 })
        );
    }

    #[test]
    fn bad_magics_are_refused() {
        let mut img = pagemap_image(1, &[]);
        img[0] ^= 1;
        assert!(matches!(
            Pagemap::parse(&img),
            Err(ImageError::BadMagic {
                expected: IMG_COMMON_MAGIC,
                ..
            })
        ));
        // Each parser refuses the others' images.
        let pm = pagemap_image(1, &[]);
        assert!(matches!(
            parse_mm_vmas(&pm),
            Err(ImageError::BadMagic {
                found: PAGEMAP_MAGIC,
                expected: MM_MAGIC,
                ..
            })
        ));
        assert!(matches!(
            parse_pstree_pids(&pm),
            Err(ImageError::BadMagic {
                expected: PSTREE_MAGIC,
                ..
            })
        ));
        let mm = mm_image(&[]);
        assert!(matches!(
            Pagemap::parse(&mm),
            Err(ImageError::BadMagic {
                expected: PAGEMAP_MAGIC,
                ..
            })
        ));
        assert!(matches!(
            Pagemap::parse(&[]),
            Err(ImageError::Truncated { part: "magic", .. })
        ));
    }

    #[test]
    fn truncated_images_are_refused() {
        let img = pagemap_image(1, &[entry(0, 1, PE_PRESENT)]);
        // Cut inside the last message, and inside its length prefix.
        assert!(matches!(
            Pagemap::parse(&img[..img.len() - 1]),
            Err(ImageError::Truncated {
                part: "message",
                ..
            })
        ));
        let head_end = 8 + 4 + PagemapHeadPb { pages_id: 1 }.encoded_len();
        assert!(matches!(
            Pagemap::parse(&img[..head_end + 2]),
            Err(ImageError::Truncated {
                part: "message length",
                ..
            })
        ));
        // Every prefix is refused or parses as fewer messages; none panics.
        for cut in 0..img.len() {
            if let Ok(pm) = Pagemap::parse(&img[..cut]) {
                assert!(pm.entries.is_empty());
            }
        }
    }

    #[test]
    fn oversize_lengths_are_refused_before_reading() {
        for len in [MAX_MESSAGE_LEN + 1, u32::MAX] {
            let mut img = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
            img.extend(PSTREE_MAGIC.to_le_bytes());
            img.extend(len.to_le_bytes());
            assert_eq!(
                parse_pstree_pids(&img),
                Err(ImageError::MessageTooLarge {
                    image: "pstree",
                    index: 0,
                    len
                })
            );
        }
    }

    #[test]
    fn bad_protobuf_is_refused() {
        // A field header announcing a length-delimited field that is not there.
        let garbage = vec![0x0a, 0x7f];
        for img in [
            image(PAGEMAP_MAGIC, std::slice::from_ref(&garbage)),
            image(MM_MAGIC, std::slice::from_ref(&garbage)),
            image(PSTREE_MAGIC, std::slice::from_ref(&garbage)),
        ] {
            let errs = [
                Pagemap::parse(&img).err(),
                parse_mm_vmas(&img).err(),
                parse_pstree_pids(&img).err(),
            ];
            assert_eq!(
                errs.iter()
                    .filter(|e| matches!(e, Some(ImageError::Protobuf { .. })))
                    .count(),
                1,
                "{errs:?}"
            );
        }
        // A valid head followed by an entry whose varint never ends.
        let mut bodies = vec![PagemapHeadPb { pages_id: 1 }.encode_to_vec()];
        bodies.push(vec![0x08, 0xff, 0xff]);
        assert!(matches!(
            Pagemap::parse(&image(PAGEMAP_MAGIC, &bodies)),
            Err(ImageError::Protobuf {
                index: 1,
                message: "pagemap_entry",
                ..
            })
        ));
    }

    #[test]
    fn malformed_pagemap_entries_are_refused() {
        let cases = [
            (vec![entry(0x1001, 1, PE_PRESENT)], "not page-aligned"),
            (vec![entry(0, 0, PE_PRESENT)], "no pages"),
            (vec![entry(0, 1, 8 | PE_PRESENT)], "unknown flag"),
            (vec![entry(0, 1, 0)], "no flags"),
            (vec![entry(!(P - 1), 2, PE_PRESENT)], "past the end"),
            (vec![entry(0, u64::MAX / 2, PE_PRESENT)], "past the end"),
            (
                vec![entry(0x2000, 2, PE_PRESENT), entry(0x3000, 1, PE_PRESENT)],
                "overlaps",
            ),
            (
                vec![entry(0x2000, 1, PE_PRESENT), entry(0x1000, 1, PE_PRESENT)],
                "overlaps",
            ),
        ];
        for (entries, want) in cases {
            match Pagemap::parse(&pagemap_image(1, &entries)) {
                Err(ImageError::BadEntry { reason, .. }) => assert!(reason.contains(want)),
                other => panic!("{entries:?}: {other:?}"),
            }
        }
        assert!(matches!(
            Pagemap::parse(&image(PAGEMAP_MAGIC, &[])),
            Err(ImageError::MessageCount { found: 0, .. })
        ));
    }

    #[test]
    fn plan_rechecks_a_hand_built_pagemap() {
        let pm = Pagemap {
            pages_id: 1,
            entries: vec![
                PagemapEntry {
                    vaddr: 0,
                    nr_pages: 2,
                    flags: PE_PRESENT,
                },
                PagemapEntry {
                    vaddr: P,
                    nr_pages: 1,
                    flags: PE_PRESENT,
                },
            ],
        };
        assert!(matches!(
            plan_process(1, 0, &pm, &[]),
            Err(ImageError::BadEntry { vaddr: P, .. })
        ));
        assert!(matches!(
            plan_process(
                1,
                0,
                &Pagemap {
                    entries: vec![],
                    ..pm.clone()
                },
                &[vma(P, P)]
            ),
            Err(ImageError::BadVma { .. })
        ));
    }

    #[test]
    fn mm_vmas_skip_guards_and_must_be_ordered() {
        let guard = VMA_AREA_GUARD | 1;
        let img = mm_image(&[
            (0x1000, 0x3000, 1),
            (0x3000, 0x5000, 1),
            (0x1000, 0x2000, guard),
        ]);
        let vmas = parse_mm_vmas(&img).unwrap();
        assert_eq!(
            vmas.iter().map(|v| (v.start, v.end)).collect::<Vec<_>>(),
            vec![(0x1000, 0x3000), (0x3000, 0x5000)]
        );
        assert_eq!(vmas[0].flags, 0x22);
        for (bad, want) in [
            (vec![(0x3000, 0x5000, 1), (0x1000, 0x2000, 1)], "overlaps"),
            (vec![(0x1000, 0x1000, 1)], "empty"),
            (vec![(0x1000, 0x1800, 1)], "page-aligned"),
        ] {
            match parse_mm_vmas(&mm_image(&bad)) {
                Err(ImageError::BadVma { reason, .. }) => assert!(reason.contains(want)),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let two = MmEntryPb { vmas: vec![] }.encode_to_vec();
        assert!(matches!(
            parse_mm_vmas(&image(MM_MAGIC, &[two.clone(), two])),
            Err(ImageError::MessageCount { found: 2, .. })
        ));
    }

    #[test]
    fn pstree_pids_in_order_and_invalid_pids_refused() {
        let body = |pid| PstreeEntryPb { pid }.encode_to_vec();
        let img = image(PSTREE_MAGIC, &[body(100), body(101), body(7)]);
        assert_eq!(parse_pstree_pids(&img).unwrap(), vec![100, 101, 7]);
        for pid in [0, 1 << 31, u32::MAX] {
            assert_eq!(
                parse_pstree_pids(&image(PSTREE_MAGIC, &[body(1), body(pid)])),
                Err(ImageError::BadPid { index: 1, pid })
            );
        }
        assert!(matches!(
            parse_pstree_pids(&image(PSTREE_MAGIC, &[])),
            Err(ImageError::MessageCount { .. })
        ));
    }

    use proptest::prelude::*;

    /// Entries laid out from (gap pages, pages, kind) triples, and VMAs covering every lazy
    /// entry, cut at random page boundaries.
    fn layout(spec: &[(u64, u64, u8)], cuts: &[u64]) -> (Pagemap, Vec<Vma>) {
        let mut at = 0x10_0000u64;
        let mut entries = Vec::new();
        let mut vmas = Vec::new();
        for &(gap, pages, kind) in spec {
            at += gap * P;
            let flags = match kind {
                0 => PE_PRESENT,
                _ => PE_LAZY | PE_PRESENT,
            };
            entries.push(PagemapEntry {
                vaddr: at,
                nr_pages: pages,
                flags,
            });
            // A VMA per entry, split at some interior page boundaries.
            let mut start = at;
            for c in cuts {
                let cut = at + (c % pages) * P;
                if cut > start {
                    vmas.push(vma(start, cut));
                    start = cut;
                }
            }
            vmas.push(vma(start, at + pages * P));
            at += pages * P;
        }
        (
            Pagemap {
                pages_id: 9,
                entries,
            },
            vmas,
        )
    }

    proptest! {
        #[test]
        fn lazy_and_eager_cover_the_present_bytes_exactly_once(
            spec in proptest::collection::vec((0u64..4, 1u64..20, 0u8..2), 0..20),
            mut cuts in proptest::collection::vec(0u64..20, 0..4),
        ) {
            cuts.sort_unstable();
            let (pm, vmas) = layout(&spec, &cuts);
            let plan = plan_process(3, 2, &pm, &vmas).unwrap();
            let present: u64 = pm.entries.iter().map(|e| e.bytes()).sum();
            prop_assert_eq!(plan.pages_file_size, present);
            let mut pieces: Vec<(u64, u64)> = plan.eager.clone();
            for r in &plan.lazy {
                prop_assert_eq!(r.origin.generation, 2);
                prop_assert_eq!(&r.origin.file, "pages-9.img");
                // Inside one VMA.
                prop_assert!(vmas.iter().any(|v| v.start <= r.start && r.end() <= v.end));
                // The bytes at the origin are those of the address, by CRIU's offset rule.
                let e = pm.entries.iter().find(|e| e.vaddr <= r.start && r.end() <= e.end()).unwrap();
                let before: u64 = pm.entries.iter().take_while(|x| x.vaddr < e.vaddr).map(|x| x.bytes()).sum();
                prop_assert_eq!(r.origin.offset, before + (r.start - e.vaddr));
                pieces.push((r.origin.offset, r.len));
            }
            pieces.sort_unstable();
            let mut at = 0;
            for (off, len) in pieces {
                prop_assert_eq!(off, at);
                prop_assert!(len > 0);
                at += len;
            }
            prop_assert_eq!(at, present);
        }

        #[test]
        fn any_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..128),
            magic in prop_oneof![Just(PAGEMAP_MAGIC), Just(MM_MAGIC), Just(PSTREE_MAGIC)],
        ) {
            let mut img = IMG_COMMON_MAGIC.to_le_bytes().to_vec();
            img.extend(magic.to_le_bytes());
            img.extend(&bytes);
            let _ = Pagemap::parse(&img);
            let _ = parse_mm_vmas(&img);
            let _ = parse_pstree_pids(&img);
        }
    }

    mod real {
        //! A real CRIU dump of a process holding 64 MiB of random bytes.

        use std::{
            io::{BufRead, BufReader, Read},
            os::unix::process::CommandExt,
            process::{Child, Command, Stdio},
        };

        use super::*;
        use crate::{local::dump_to_dir, CriuBinary};

        const BUFFER: u64 = 64 << 20;

        /// Kills and reaps the child however the test ends.
        struct Reaped(Child);

        impl Drop for Reaped {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }

        #[test]
        fn a_dumped_64_mib_buffer_is_lazy_and_little_else_is_eager() {
            let criu =
                CriuBinary::locate().expect("CRIU is installed by the README's test command");
            let script = "import os, sys, time\n\
                          buf = os.urandom(64 << 20)\n\
                          sys.stdout.write('%d\\n' % id(buf)); sys.stdout.flush(); os.close(1)\n\
                          time.sleep(600)\n";
            let mut cmd = Command::new("/usr/bin/python3");
            cmd.args(["-c", script])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            // SAFETY: setsid is async-signal-safe; CRIU wants the tree's root to lead its
            // session.
            unsafe {
                cmd.pre_exec(|| {
                    nix::unistd::setsid()
                        .map(|_| ())
                        .map_err(std::io::Error::from)
                });
            }
            let mut child = Reaped(cmd.spawn().expect("python3"));
            let pid = child.0.id() as i32;
            let mut out = BufReader::new(child.0.stdout.take().expect("piped"));
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            // CPython's id() is the object's address; its bytes follow a header of under a page.
            let object: u64 = line.trim().parse().expect("the buffer's address");
            let (first, last) = (
                (object + PAGE_SIZE).next_multiple_of(PAGE_SIZE),
                (object + BUFFER) / PAGE_SIZE * PAGE_SIZE,
            );
            // EOF: the child has closed the pipe, so the dump does not include it.
            out.read_to_end(&mut Vec::new()).unwrap();

            let dir = tempfile::tempdir().unwrap();
            dump_to_dir(&criu, pid, dir.path()).expect("criu dump");
            let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
            let pids = parse_pstree_pids(&read("pstree.img")).unwrap();
            assert_eq!(pids, vec![pid]);
            let pm = Pagemap::parse(&read(&format!("pagemap-{pid}.img"))).unwrap();
            let vmas = parse_mm_vmas(&read(&format!("mm-{pid}.img"))).unwrap();
            let plan = plan_process(pid, 1, &pm, &vmas).unwrap();
            let pages_len = std::fs::metadata(dir.path().join(&plan.pages_file))
                .unwrap()
                .len();
            assert_eq!(plan.pages_file_size, pages_len);
            let lazy: u64 = plan.lazy.iter().map(|r| r.len).sum();
            let eager: u64 = plan.eager.iter().map(|&(_, len)| len).sum();
            eprintln!(
                "{} lazy ranges, {} MiB lazy; {} eager ranges, {} KiB eager; pages file {} MiB",
                plan.lazy.len(),
                lazy >> 20,
                plan.eager.len(),
                eager >> 10,
                pages_len >> 20
            );
            assert_eq!(lazy + eager, pages_len);
            // Every whole page of the buffer is lazy.
            let mut at = first;
            for r in &plan.lazy {
                if r.start <= at && at < r.end() {
                    at = r.end();
                }
            }
            assert!(
                at >= last,
                "buffer {first:#x}-{last:#x} lazy only up to {at:#x}"
            );
            assert!(lazy >= last - first);
            assert!(eager < 4 << 20, "eager {eager} bytes");
        }
    }
}
