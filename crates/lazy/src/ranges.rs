//! Range bookkeeping of one process: the lazy pages that still have their bytes only in the
//! pool ([`RangeSet`], keyed by run-time address, each piece knowing its origin), and plain
//! address coverage for recording working sets ([`Extents`]). Pieces are split but never
//! merged: two adjacent pieces may lie in different VMAs, and one `UFFDIO_COPY` must not
//! cross a VMA boundary, so a piece is the largest unit one copy may take.

use std::collections::BTreeMap;

use torpor_image::pages::{Origin, PageRange};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    len: u64,
    origin: Origin,
}

/// Disjoint page ranges with origins, at their current addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    pieces: BTreeMap<u64, Piece>,
    /// Sum of the pieces' lengths, kept so that stats need no walk.
    bytes: u64,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// A set holding `ranges`, which must be valid for [`validate`].
    pub fn from_ranges(ranges: &[PageRange]) -> RangeSet {
        let mut set = RangeSet::new();
        for r in ranges {
            set.insert(r.clone());
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Total bytes covered.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds a range; it must not overlap what the set holds.
    pub fn insert(&mut self, r: PageRange) {
        if r.len == 0 {
            return;
        }
        debug_assert!(
            self.first_within(r.start, r.end()).is_none(),
            "overlapping insert {r:?}"
        );
        self.bytes += r.len;
        self.pieces.insert(
            r.start,
            Piece {
                len: r.len,
                origin: r.origin,
            },
        );
    }

    /// The piece holding `addr`, whole.
    pub fn containing(&self, addr: u64) -> Option<PageRange> {
        let (&start, piece) = self.pieces.range(..=addr).next_back()?;
        (addr < start + piece.len).then(|| PageRange {
            start,
            len: piece.len,
            origin: piece.origin.clone(),
        })
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.containing(addr).is_some()
    }

    /// The lowest piece.
    pub fn first(&self) -> Option<PageRange> {
        self.pieces.iter().next().map(|(&start, p)| PageRange {
            start,
            len: p.len,
            origin: p.origin.clone(),
        })
    }

    /// The lowest part of a piece inside `[start, end)`, clipped to it.
    pub fn first_within(&self, start: u64, end: u64) -> Option<PageRange> {
        let before = self.pieces.range(..start).next_back();
        let candidates = before.into_iter().chain(self.pieces.range(start..end));
        for (&s, p) in candidates {
            let lo = s.max(start);
            let hi = (s + p.len).min(end);
            if lo < hi {
                return Some(PageRange {
                    start: lo,
                    len: hi - lo,
                    origin: p.origin.advanced(lo - s),
                });
            }
        }
        None
    }

    /// Removes everything inside `[start, end)`, splitting pieces that straddle its edges, and
    /// returns what was removed, in address order.
    pub fn take(&mut self, start: u64, end: u64) -> Vec<PageRange> {
        let mut removed = Vec::new();
        if start >= end {
            return removed;
        }
        let mut keys: Vec<u64> = Vec::new();
        if let Some((&s, p)) = self.pieces.range(..start).next_back() {
            if s + p.len > start {
                keys.push(s);
            }
        }
        keys.extend(self.pieces.range(start..end).map(|(&s, _)| s));
        for s in keys {
            let Some(p) = self.pieces.remove(&s) else {
                continue;
            };
            self.bytes -= p.len;
            let e = s + p.len;
            if s < start {
                self.insert(PageRange {
                    start: s,
                    len: start - s,
                    origin: p.origin.clone(),
                });
            }
            if e > end {
                self.insert(PageRange {
                    start: end,
                    len: e - end,
                    origin: p.origin.advanced(end - s),
                });
            }
            let lo = s.max(start);
            let hi = e.min(end);
            removed.push(PageRange {
                start: lo,
                len: hi - lo,
                origin: p.origin.advanced(lo - s),
            });
        }
        removed
    }

    /// Follows an `mremap` of `[from, from+len)` to `to`: the pieces inside move by `to-from`
    /// and keep their origins; whatever was at the destination is gone (the kernel unmapped it).
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved = self.take(from, from + len);
        self.take(to, to + len);
        for r in moved {
            self.insert(PageRange {
                start: r.start - from + to,
                len: r.len,
                origin: r.origin,
            });
        }
    }

    /// Adds every piece of `other` (which must be disjoint from this set).
    pub fn absorb(&mut self, other: &RangeSet) {
        for r in other.iter() {
            self.insert(r);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.pieces.iter().map(|(&start, p)| PageRange {
            start,
            len: p.len,
            origin: p.origin.clone(),
        })
    }
}

/// Checks what [`RangeSet::from_ranges`] relies on: non-empty, page-aligned, sorted, disjoint.
pub fn validate(ranges: &[PageRange]) -> Result<(), String> {
    let page = torpor_image::pages::PAGE_SIZE;
    let mut last_end = 0u64;
    for r in ranges {
        if r.len == 0 || r.start % page != 0 || r.len % page != 0 {
            return Err(format!(
                "range {:#x}+{:#x} is empty or not page-aligned",
                r.start, r.len
            ));
        }
        if r.start.checked_add(r.len).is_none() {
            return Err(format!("range {:#x}+{:#x} overflows", r.start, r.len));
        }
        if r.start < last_end {
            return Err(format!("range {:#x} is out of order or overlaps", r.start));
        }
        last_end = r.end();
    }
    Ok(())
}

/// Address coverage without origins, coalesced: adjacent and overlapping ranges merge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extents {
    /// start → end
    map: BTreeMap<u64, u64>,
}

impl Extents {
    pub fn add(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut lo = start;
        let mut hi = start + len;
        if let Some((&s, &e)) = self.map.range(..=lo).next_back() {
            if e >= lo {
                lo = s;
                hi = hi.max(e);
            }
        }
        let absorbed: Vec<(u64, u64)> = self.map.range(lo..=hi).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in absorbed {
            self.map.remove(&s);
            hi = hi.max(e);
        }
        self.map.insert(lo, hi);
    }

    /// `(start, len)` pairs in address order.
    pub fn to_vec(&self) -> Vec<(u64, u64)> {
        self.map.iter().map(|(&s, &e)| (s, e - s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const P: u64 = 4096;

    fn origin(offset: u64) -> Origin {
        Origin {
            generation: 1,
            file: "pages-1.img".into(),
            offset,
        }
    }

    /// Page address → origin offset of that page.
    type Model = BTreeMap<u64, u64>;

    fn expand(set: &RangeSet) -> Model {
        let mut m = Model::new();
        for r in set.iter() {
            for i in 0..r.len / P {
                m.insert(r.start + i * P, r.origin.offset + i * P);
            }
        }
        m
    }

    #[derive(Debug, Clone)]
    enum Op {
        Take(u64, u64),
        Remap(u64, u64, u64),
        ForkAbsorb,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..64, 0u64..16).prop_map(|(s, l)| Op::Take(s * P, (s + l) * P)),
            (0u64..64, 0u64..64, 1u64..16).prop_map(|(f, t, l)| Op::Remap(f * P, t * P, l * P)),
            Just(Op::ForkAbsorb),
        ]
    }

    fn initial() -> impl Strategy<Value = Vec<PageRange>> {
        proptest::collection::vec((0u64..4, 1u64..6, 0u64..100), 0..12).prop_map(|gaps| {
            let mut at = 0;
            gaps.into_iter()
                .map(|(gap, len, off)| {
                    at += gap * P;
                    let r = PageRange {
                        start: at,
                        len: len * P,
                        origin: origin(off * P * 8),
                    };
                    at += len * P;
                    r
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn matches_page_model(ranges in initial(), ops in proptest::collection::vec(op(), 0..24)) {
            prop_assert!(validate(&ranges).is_ok());
            let mut set = RangeSet::from_ranges(&ranges);
            let mut model = expand(&set);
            for op in ops {
                match op {
                    Op::Take(s, e) => {
                        let removed = set.take(s, e);
                        let mut want = Model::new();
                        let pages: Vec<u64> = model.range(s..e).map(|(&a, _)| a).collect();
                        for a in pages {
                            want.insert(a, model.remove(&a).unwrap());
                        }
                        let mut got = Model::new();
                        for r in &removed {
                            prop_assert!(r.start >= s && r.end() <= e);
                            for i in 0..r.len / P {
                                got.insert(r.start + i * P, r.origin.offset + i * P);
                            }
                        }
                        prop_assert_eq!(got, want);
                    }
                    Op::Remap(f, t, l) => {
                        set.remap(f, t, l);
                        let moved: Vec<(u64, u64)> = model.range(f..f + l).map(|(&a, &o)| (a, o)).collect();
                        for (a, _) in &moved {
                            model.remove(a);
                        }
                        let dest: Vec<u64> = model.range(t..t + l).map(|(&a, _)| a).collect();
                        for a in dest {
                            model.remove(&a);
                        }
                        for (a, o) in moved {
                            model.insert(a - f + t, o);
                        }
                    }
                    Op::ForkAbsorb => {
                        // a fork child gets remaining + in-flight: splitting off a part and
                        // absorbing it back must give the same set
                        let mut inflight = RangeSet::new();
                        if let Some(first) = set.first() {
                            for r in set.take(first.start, first.start + P) {
                                inflight.insert(r);
                            }
                        }
                        let mut child = set.clone();
                        child.absorb(&inflight);
                        set = child;
                    }
                }
                prop_assert_eq!(expand(&set), model.clone());
                prop_assert_eq!(set.bytes(), model.len() as u64 * P);
                let pieces: Vec<PageRange> = set.iter().collect();
                prop_assert!(validate(&pieces).is_ok());
            }
        }

        #[test]
        fn extents_coalesce(adds in proptest::collection::vec((0u64..64, 0u64..8), 0..20)) {
            let mut ext = Extents::default();
            let mut pages = std::collections::BTreeSet::new();
            for (s, l) in adds {
                ext.add(s * P, l * P);
                for i in 0..l {
                    pages.insert(s + i);
                }
            }
            let v = ext.to_vec();
            let mut got = std::collections::BTreeSet::new();
            for w in v.windows(2) {
                prop_assert!(w[0].0 + w[0].1 < w[1].0, "not coalesced: {:?}", v);
            }
            for (s, l) in v {
                for i in 0..l / P {
                    got.insert(s / P + i);
                }
            }
            prop_assert_eq!(got, pages);
        }
    }

    #[test]
    fn containing_and_first_within_clip() {
        let set = RangeSet::from_ranges(&[
            PageRange {
                start: 0x1000,
                len: 0x3000,
                origin: origin(0),
            },
            PageRange {
                start: 0x4000,
                len: 0x1000,
                origin: origin(0x10000),
            },
        ]);
        // adjacent pieces stay apart: they may be in different VMAs
        assert_eq!(set.containing(0x3000).unwrap().end(), 0x4000);
        assert_eq!(set.containing(0x4000).unwrap().origin.offset, 0x10000);
        assert!(set.containing(0x5000).is_none());
        let r = set.first_within(0x2000, 0x6000).unwrap();
        assert_eq!((r.start, r.len, r.origin.offset), (0x2000, 0x2000, 0x1000));
    }

    #[test]
    fn validate_refuses_bad_ranges() {
        let r = |start, len| PageRange {
            start,
            len,
            origin: origin(0),
        };
        assert!(validate(&[r(0x1000, 0)]).is_err());
        assert!(validate(&[r(0x1001, 0x1000)]).is_err());
        assert!(validate(&[r(0x1000, 0x1001)]).is_err());
        assert!(validate(&[r(0x3000, 0x1000), r(0x1000, 0x1000)]).is_err());
        assert!(validate(&[r(0x1000, 0x2000), r(0x2000, 0x1000)]).is_err());
        assert!(validate(&[r(u64::MAX - 0xfff, 0x1000)]).is_err());
        assert!(validate(&[r(0x1000, 0x1000), r(0x2000, 0x1000)]).is_ok());
    }
}
