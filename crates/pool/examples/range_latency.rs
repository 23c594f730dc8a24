//! Round trip of one range read (a lazy restore's page fault) against an in-process pool
//! holding one snapshot, over a Unix socket and loopback TCP: medians and 99th percentiles of
//! 4 KiB, 64 KiB and 2 MiB ranges at random page-aligned offsets, the rate of pipelined 4 KiB
//! reads, and the pool's own cost of checking a range against its block CRCs next to checking
//! its whole chunk:
//! `cargo run --release -p torpor-pool --example range_latency [MiB]` (default 256).

use std::{
    sync::{mpsc, Arc},
    thread,
    time::Instant,
};

use anyhow::Result;
use rand::Rng;
use torpor_image::{manifest::SnapshotMeta, CHUNK_SIZE};
use torpor_pool::{serve, Listener, PoolAddr, PoolClient, PoolTarget, Store, StoreConfig};

const TOKEN: &str = "range-latency-token-0123456789";
const FILE: &str = "pages-1.img";

/// Serves `store` on loopback TCP and on a Unix socket at `sock`; returns both addresses.
fn start(store: Arc<Store>, sock: PoolAddr) -> Result<(PoolAddr, PoolAddr)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let tcp = Listener::bind(&"127.0.0.1:0".parse().expect("address"))
                .await
                .expect("bind tcp");
            let unix = Listener::bind(&sock).await.expect("bind unix");
            tx.send((
                tcp.local_addr().expect("address"),
                unix.local_addr().expect("address"),
            ))
            .expect("send");
            tokio::join!(
                serve(
                    tcp,
                    store.clone(),
                    Some(TOKEN.into()),
                    std::future::pending()
                ),
                serve(unix, store, Some(TOKEN.into()), std::future::pending()),
            );
        })
    });
    Ok(rx.recv()?)
}

/// Percentile `p` (0..=100) of `v` in microseconds.
fn pct(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) * p / 100] * 1e6
}

/// Round trips of `n` reads of `len` bytes at random page-aligned offsets, in seconds.
fn round_trips(c: &mut PoolClient, g: u64, size: u64, len: usize, n: usize) -> Result<Vec<f64>> {
    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; len];
    let pages = (size - len as u64) / 4096;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let offset = rng.gen_range(0..=pages) * 4096;
        let t = Instant::now();
        c.get_range("bench", g, FILE, offset, &mut buf)?;
        times.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(
            buf[0] == pattern(offset),
            "wrong bytes at {offset} (pattern mismatch)"
        );
    }
    Ok(times)
}

/// Reads of 4 KiB per second, pipelined `batch` at a time.
fn pipelined(c: &mut PoolClient, g: u64, size: u64, batch: usize, rounds: usize) -> Result<f64> {
    let mut rng = rand::thread_rng();
    let mut bufs = vec![vec![0u8; 4096]; batch];
    let t = Instant::now();
    for _ in 0..rounds {
        let mut asks: Vec<(u64, &mut [u8])> = bufs
            .iter_mut()
            .map(|b| (rng.gen_range(0..size / 4096) * 4096, &mut b[..]))
            .collect();
        c.get_ranges("bench", g, FILE, &mut asks)?;
    }
    Ok((batch * rounds) as f64 / t.elapsed().as_secs_f64())
}

fn pattern(i: u64) -> u8 {
    (i * 31 % 251) as u8
}

fn main() -> Result<()> {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(256);
    let size = mib << 20;
    let data: Vec<u8> = (0..size).map(pattern).collect();
    let store = Arc::new(Store::open(StoreConfig {
        capacity: size + (16 << 20),
        spill_dir: None,
        keep: 1,
    })?);
    let dir = tempfile::tempdir()?;
    let sock: PoolAddr = format!("unix:{}", dir.path().join("pool.sock").display()).parse()?;
    let (tcp, unix) = start(store.clone(), sock)?;

    let mut c = PoolTarget::new(tcp.clone(), TOKEN).connect()?;
    c.put_begin("bench", SnapshotMeta::default(), Some(size))?;
    c.file_open(0, FILE)?;
    let t = Instant::now();
    for piece in data.chunks(CHUNK_SIZE as usize) {
        c.file_data(0, piece)?;
    }
    c.file_close(0, size)?;
    let g = c.commit(None, None)?.generation;
    println!(
        "put {mib} MiB over TCP in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    println!("round trip of one range (µs), {mib} MiB snapshot in the RAM tier:");
    for (label, addr) in [("unix", &unix), ("tcp ", &tcp)] {
        let mut c = PoolTarget::new(addr.clone(), TOKEN).connect()?;
        round_trips(&mut c, g, size, 4096, 200)?; // warm up
        for (len, n) in [(4096usize, 5000), (64 << 10, 2000), (2 << 20, 300)] {
            let mut t = round_trips(&mut c, g, size, len, n)?;
            let (p50, p99) = (pct(&mut t, 50), pct(&mut t, 99));
            let rate = len as f64 / (p50 / 1e6) / 1e9;
            println!(
                "  {label} {:>5} KiB: median {p50:7.1}  p99 {p99:7.1}  ({rate:.2} GB/s at the median)",
                len >> 10
            );
        }
        let rate = pipelined(&mut c, g, size, 32, 300)?;
        println!("  {label} pipelined 4 KiB reads, 32 in flight: {rate:.0}/s");
    }

    // The pool's own cost per read: block-CRC range check next to a whole-chunk check.
    let (m, d) = store.lookup("bench", Some(g))?;
    let mut buf = Vec::new();
    let n = 20_000;
    for len in [4096usize, 64 << 10] {
        let t = Instant::now();
        for i in 0..n {
            let offset = (i as u64 * 4096 * 37) % (size - CHUNK_SIZE);
            let offset = offset - offset % 4096;
            let chunk_end = (offset / CHUNK_SIZE + 1) * CHUNK_SIZE;
            let offset = offset.min(chunk_end - len as u64);
            d.range(&m, 0, offset, len, &mut buf, false)?;
        }
        let per = t.elapsed().as_secs_f64() / n as f64 * 1e6;
        println!("  pool: check a {:>2} KiB range: {per:.2} µs", len >> 10);
    }
    let t = Instant::now();
    for i in 0..n / 10 {
        d.with_chunk(&m, 0, i % 256, &mut buf, |b, _| b.len())?;
    }
    let per = t.elapsed().as_secs_f64() / (n / 10) as f64 * 1e6;
    println!("  pool: check a whole 1 MiB chunk: {per:.2} µs");
    Ok(())
}
