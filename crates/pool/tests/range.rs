//! Range reads (`GetRange`, the lazy restore's page faults) end to end: inside a chunk, across
//! chunk and block boundaries, at a file's tail, every bad request, from the RAM and the disk
//! tier (spilled while running and found at start), corrupt bytes refused, pipelined, over
//! TCP, a Unix socket and TLS.

mod common;
mod inproc;

use common::{get, pattern, put};
use inproc::{client, start, start_on, Running, TOKEN};

use anyhow::Result;
use torpor_image::{
    wire::{ErrorCode, Tier, MAX_RANGE_LEN},
    CHUNK_SIZE,
};
use torpor_pool::{
    client::PIPELINE_DEPTH, store::BLOCK_SIZE, tls, ClientError, ClientTls, PoolClient, PoolTarget,
};

const C: u64 = CHUNK_SIZE;
const B: u64 = BLOCK_SIZE;

/// A file of three chunks and a piece, so it has whole chunks and a short tail.
fn big() -> Vec<u8> {
    pattern(9, 3 * C as usize + 12_345)
}

/// `(offset, len)` ranges that cover the interesting places of a file of `size` bytes.
fn ranges(size: u64) -> Vec<(u64, u64)> {
    let mut r = vec![
        (0, 1),
        (0, 4096),
        (8192, 4096),
        (B - 1, 2),
        (B, B),
        (C - 4096, 4096),
        (C - 100, 200),
        (C / 2, 2 * C),
        (C, C),
        (size - 1, 1),
        (size.saturating_sub(10_000), size.min(10_000)),
        (0, size),
    ];
    r.retain(|&(o, l)| o + l <= size);
    r
}

fn get_range(c: &mut PoolClient, name: &str, g: u64, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    c.get_range(name, g, "pages-1.img", offset, &mut buf)?;
    Ok(buf)
}

/// Every range of `ranges` matches `bytes`, one request at a time and pipelined.
fn check_ranges(c: &mut PoolClient, name: &str, g: u64, bytes: &[u8]) -> Result<()> {
    let rs = ranges(bytes.len() as u64);
    assert!(get(c, name, g, "pages-1.img")? == bytes, "the whole file");
    for &(offset, len) in &rs {
        let got = get_range(c, name, g, offset, len)?;
        assert!(
            got == bytes[offset as usize..][..len as usize],
            "range {offset}+{len}"
        );
    }
    let mut bufs: Vec<Vec<u8>> = rs.iter().map(|&(_, l)| vec![0; l as usize]).collect();
    let mut asks: Vec<(u64, &mut [u8])> = rs
        .iter()
        .zip(bufs.iter_mut())
        .map(|(&(o, _), b)| (o, &mut b[..]))
        .collect();
    c.get_ranges(name, g, "pages-1.img", &mut asks)?;
    for (&(offset, len), got) in rs.iter().zip(&bufs) {
        assert!(
            got[..] == bytes[offset as usize..][..len as usize],
            "pipelined range {offset}+{len}"
        );
    }
    Ok(())
}

fn code(e: &ClientError) -> Option<ErrorCode> {
    e.pool_code()
}

#[test]
fn ranges_inside_and_across_chunks_and_at_the_tail_from_ram() -> Result<()> {
    let p = start(8 * C, None, 2, |_| {});
    let mut c = client(&p);
    let bytes = big();
    let small = pattern(3, 5000);
    let g = put(&mut c, "svc", &[("pages-1.img", bytes.clone())])?;
    check_ranges(&mut c, "svc", g, &bytes)?;
    // A small file lives in an exact-size tail, not a chunk.
    let g = put(&mut c, "small", &[("pages-1.img", small.clone())])?;
    check_ranges(&mut c, "small", g, &small)?;
    assert!(p.store.list().iter().all(|s| s.tier == Tier::Ram));
    Ok(())
}

#[test]
fn bad_ranges_are_refused_and_the_connection_keeps_serving() -> Result<()> {
    let p = start(8 * C, None, 2, |_| {});
    let mut c = client(&p);
    let bytes = pattern(4, 2 * C as usize);
    let size = bytes.len() as u64;
    let g = put(&mut c, "svc", &[("pages-1.img", bytes.clone())])?;
    let refused = |c: &mut PoolClient, name: &str, g: u64, file: &str, offset: u64, len: u64| {
        let mut buf = vec![0u8; len as usize];
        let e = c.get_range(name, g, file, offset, &mut buf).unwrap_err();
        let got = code(&e);
        // The connection stays usable after a refusal.
        let ok = get_range(c, "svc", 1, 5, 10).unwrap();
        assert_eq!(ok, bytes[5..15]);
        (got, e.to_string())
    };
    let bad = Some(ErrorCode::BadRequest);
    let missing = Some(ErrorCode::NotFound);
    assert_eq!(refused(&mut c, "svc", g, "pages-1.img", 0, 0).0, bad);
    assert_eq!(refused(&mut c, "svc", g, "pages-1.img", size, 1).0, bad);
    assert_eq!(
        refused(&mut c, "svc", g, "pages-1.img", size - 4095, 4096).0,
        bad
    );
    assert_eq!(refused(&mut c, "svc", g, "pages-1.img", u64::MAX, 1).0, bad);
    let (got, message) = refused(&mut c, "svc", g, "pages-1.img", 0, MAX_RANGE_LEN + 1);
    assert_eq!(got, bad);
    assert!(message.contains("limit"), "{message}");
    assert_eq!(refused(&mut c, "nope", g, "pages-1.img", 0, 1).0, missing);
    assert_eq!(
        refused(&mut c, "svc", g + 1, "pages-1.img", 0, 1).0,
        missing
    );
    assert_eq!(refused(&mut c, "svc", g, "core-1.img", 0, 1).0, missing);
    Ok(())
}

#[test]
fn a_refused_range_inside_a_pipeline_fails_it_and_leaves_the_connection_usable() -> Result<()> {
    let p = start(8 * C, None, 2, |_| {});
    let mut c = client(&p);
    let bytes = big();
    let g = put(&mut c, "svc", &[("pages-1.img", bytes.clone())])?;
    // More than the pipeline's depth, so requests are sent while answers are read.
    let n = 3 * PIPELINE_DEPTH;
    let offsets: Vec<u64> = (0..n as u64).map(|i| i * 30_011).collect();
    let mut bufs = vec![vec![0u8; 4096]; n];
    let mut asks: Vec<(u64, &mut [u8])> = offsets
        .iter()
        .zip(bufs.iter_mut())
        .map(|(&o, b)| (o, &mut b[..]))
        .collect();
    c.get_ranges("svc", g, "pages-1.img", &mut asks)?;
    for (&o, b) in offsets.iter().zip(&bufs) {
        assert!(b[..] == bytes[o as usize..][..4096], "range at {o}");
    }
    let mut asks: Vec<(u64, &mut [u8])> = offsets
        .iter()
        .zip(bufs.iter_mut())
        .enumerate()
        .map(|(i, (&o, b))| (if i == 5 { u64::MAX - 10 } else { o }, &mut b[..]))
        .collect();
    let e = c
        .get_ranges("svc", g, "pages-1.img", &mut asks)
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::BadRequest), "{e}");
    assert_eq!(get_range(&mut c, "svc", g, 77, 3)?, bytes[77..80]);
    Ok(())
}

/// The spilled snapshot file of `name` in `dir`.
fn snapfile(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    std::fs::read_dir(dir.join(name))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

/// Flips one bit of the file at `at` bytes before its end (where `a`'s data lies).
fn rot(path: &std::path::Path, from_end: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() - from_end as usize;
    bytes[at] ^= 0x08;
    std::fs::write(path, bytes).unwrap();
}

/// Starts a pool with room for four chunks, puts `a` (big) and then `b`, which spills `a`.
fn spilled(spill: &std::path::Path) -> Result<(Running, PoolClient, Vec<u8>)> {
    let p = start(4 * C, Some(spill), 2, |_| {});
    let mut c = client(&p);
    let a = big();
    put(&mut c, "a", &[("pages-1.img", a.clone())])?;
    put(&mut c, "b", &[("pages-1.img", pattern(5, 2 * C as usize))])?;
    let tiers: Vec<(String, Tier)> = c.list()?.into_iter().map(|s| (s.name, s.tier)).collect();
    assert_eq!(
        tiers,
        [("a".to_string(), Tier::Disk), ("b".to_string(), Tier::Ram)]
    );
    Ok((p, c, a))
}

#[test]
fn ranges_from_the_disk_tier_and_a_corrupt_block_is_refused() -> Result<()> {
    let spill = tempfile::tempdir()?;
    let (_p, mut c, a) = spilled(spill.path())?;
    check_ranges(&mut c, "a", 1, &a)?;
    // One bit rots in the file's third chunk, in its second block: a range touching that
    // block is refused, ranges of the chunk's other blocks are still served.
    let size = a.len() as u64;
    let at = 2 * C + B + 7;
    rot(&snapfile(spill.path(), "a"), size - at);
    for (offset, len) in [(at - 3, 10), (2 * C, C), (2 * C + B - 1, 2)] {
        let e = get_range(&mut c, "a", 1, offset, len).unwrap_err();
        let e = e.downcast_ref::<ClientError>().unwrap();
        assert_eq!(code(e), Some(ErrorCode::Corrupt), "{offset}+{len}: {e}");
    }
    for (offset, len) in [(2 * C, B), (2 * C + 2 * B, 100), (3 * C, 4096)] {
        let got = get_range(&mut c, "a", 1, offset, len)?;
        assert!(
            got == a[offset as usize..][..len as usize],
            "{offset}+{len}"
        );
    }
    Ok(())
}

#[test]
fn ranges_of_a_snapshot_found_on_disk_at_start_are_verified_too() -> Result<()> {
    let spill = tempfile::tempdir()?;
    let a = {
        let (_p, _c, a) = spilled(spill.path())?;
        a
    };
    // While the pool is down a bit rots in a's second chunk.
    let size = a.len() as u64;
    let at = C + 5 * B + 1;
    rot(&snapfile(spill.path(), "a"), size - at);
    let p = start(4 * C, Some(spill.path()), 2, |_| {});
    let mut c = client(&p);
    // Its block CRCs come from chunks verified whole: the rotten chunk serves nothing,
    // even from its intact blocks; the others serve every range.
    for (offset, len) in [(at, 1), (C, 4096), (C + 9 * B, 100), (C - 10, 20)] {
        let e = get_range(&mut c, "a", 1, offset, len).unwrap_err();
        let e = e.downcast_ref::<ClientError>().unwrap();
        assert_eq!(code(e), Some(ErrorCode::Corrupt), "{offset}+{len}: {e}");
    }
    for (offset, len) in [(0, 4096), (2 * C + 5, 70_000), (size - 3, 3), (5, 2 * B)] {
        let got = get_range(&mut c, "a", 1, offset, len)?;
        assert!(
            got == a[offset as usize..][..len as usize],
            "{offset}+{len}"
        );
    }
    Ok(())
}

#[test]
fn ranges_over_a_unix_socket() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let addr = format!("unix:{}", dir.path().join("pool.sock").display()).parse()?;
    let p = start_on(8 * C, None, 2, addr, None, |_| {});
    let mut c = PoolClient::connect(&p.addr, TOKEN)?;
    let bytes = big();
    let g = put(&mut c, "svc", &[("pages-1.img", bytes.clone())])?;
    check_ranges(&mut c, "svc", g, &bytes)
}

#[test]
fn ranges_over_tls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = tls::generate(dir.path(), &["127.0.0.1".into()], false)?;
    let server = tls::server_config(&certs.pool_cert, &certs.pool_key, None)?;
    let p = start_on(8 * C, None, 2, "127.0.0.1:0".parse()?, Some(server), |_| {});
    let target = PoolTarget::new(p.addr.clone(), TOKEN)
        .with_tls(Some(ClientTls::pinned(&certs.pool_cert, None)?));
    let mut c = target.connect()?;
    let bytes = big();
    let g = put(&mut c, "svc", &[("pages-1.img", bytes.clone())])?;
    check_ranges(&mut c, "svc", g, &bytes)?;
    let mut buf = vec![0u8; 1];
    let e = c
        .get_range("svc", g, "pages-1.img", bytes.len() as u64, &mut buf)
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::BadRequest), "{e}");
    Ok(())
}
