//! CRIU's `stats-dump` image: how long the tree was frozen and how long memory took.
//!
//! Layout: the service-image magic (u32), the stats magic (u32), then one entry, a u32
//! length and a protobuf `stats_entry { dump_stats_entry dump = 1; … }` whose times are in
//! microseconds.

use std::time::Duration;

use prost::Message;

const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;

#[derive(Clone, PartialEq, Message)]
struct StatsEntry {
    #[prost(message, optional, tag = "1")]
    dump: Option<DumpStatsEntry>,
}

#[derive(Clone, PartialEq, Message)]
struct DumpStatsEntry {
    #[prost(uint32, required, tag = "1")]
    freezing_time: u32,
    #[prost(uint32, required, tag = "2")]
    frozen_time: u32,
    #[prost(uint32, required, tag = "3")]
    memdump_time: u32,
    #[prost(uint32, required, tag = "4")]
    memwrite_time: u32,
    #[prost(uint64, required, tag = "5")]
    pages_scanned: u64,
    #[prost(uint64, required, tag = "6")]
    pages_skipped_parent: u64,
    #[prost(uint64, required, tag = "7")]
    pages_written: u64,
}

/// What CRIU measured about one dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpStats {
    /// Time to stop every task of the tree.
    pub freezing: Duration,
    /// Time the tree stayed frozen: what the service itself experiences.
    pub frozen: Duration,
    /// Time spent collecting memory pages.
    pub memdump: Duration,
    /// Time spent writing memory pages out.
    pub memwrite: Duration,
    pub pages_written: u64,
}

/// Decodes a `stats-dump` image; `None` if it is not one.
pub fn parse_dump_stats(bytes: &[u8]) -> Option<DumpStats> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    if word(0)? != IMG_SERVICE_MAGIC || word(4)? != STATS_MAGIC {
        return None;
    }
    let len = word(8)? as usize;
    let entry = StatsEntry::decode(bytes.get(12..12 + len)?).ok()?;
    let d = entry.dump?;
    let us = |v: u32| Duration::from_micros(v as u64);
    Some(DumpStats {
        freezing: us(d.freezing_time),
        frozen: us(d.frozen_time),
        memdump: us(d.memdump_time),
        memwrite: us(d.memwrite_time),
        pages_written: d.pages_written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_stats_image() {
        let body = StatsEntry {
            dump: Some(DumpStatsEntry {
                freezing_time: 10,
                frozen_time: 250_000,
                memdump_time: 5,
                memwrite_time: 7,
                pages_scanned: 1,
                pages_skipped_parent: 0,
                pages_written: 65_536,
            }),
        }
        .encode_to_vec();
        let mut img = IMG_SERVICE_MAGIC.to_le_bytes().to_vec();
        img.extend(STATS_MAGIC.to_le_bytes());
        img.extend((body.len() as u32).to_le_bytes());
        img.extend(body);
        let s = parse_dump_stats(&img).unwrap();
        assert_eq!(s.frozen, Duration::from_millis(250));
        assert_eq!(s.pages_written, 65_536);
        assert_eq!(parse_dump_stats(&img[..10]), None);
        assert_eq!(parse_dump_stats(b"not an image at all"), None);
    }

    fn image(body: &[u8]) -> Vec<u8> {
        let mut img = IMG_SERVICE_MAGIC.to_le_bytes().to_vec();
        img.extend(STATS_MAGIC.to_le_bytes());
        img.extend((body.len() as u32).to_le_bytes());
        img.extend(body);
        img
    }

    proptest::proptest! {
        #[test]
        fn any_dump_stats_entry_reads_back(
            t in proptest::array::uniform4(proptest::num::u32::ANY),
            pages in proptest::array::uniform3(proptest::num::u64::ANY),
        ) {
            let body = StatsEntry {
                dump: Some(DumpStatsEntry {
                    freezing_time: t[0],
                    frozen_time: t[1],
                    memdump_time: t[2],
                    memwrite_time: t[3],
                    pages_scanned: pages[0],
                    pages_skipped_parent: pages[1],
                    pages_written: pages[2],
                }),
            }
            .encode_to_vec();
            let s = parse_dump_stats(&image(&body)).unwrap();
            let us = |v: u32| Duration::from_micros(v.into());
            proptest::prop_assert_eq!(
                (s.freezing, s.frozen, s.memdump, s.memwrite),
                (us(t[0]), us(t[1]), us(t[2]), us(t[3]))
            );
            proptest::prop_assert_eq!(s.pages_written, pages[2]);
        }

        #[test]
        fn any_bytes_as_a_stats_image_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
            len in proptest::num::u32::ANY,
        ) {
            let _ = parse_dump_stats(&bytes);
            // Past the magics, with a length that need not fit what follows.
            let mut img = image(&[]);
            img.truncate(8);
            img.extend(len.to_le_bytes());
            img.extend(&bytes);
            let _ = parse_dump_stats(&img);
        }
    }
}
