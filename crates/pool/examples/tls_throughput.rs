//! Throughput of a put and a get of one snapshot over loopback TCP, plaintext and TLS, in the
//! same run (alternating, medians of `RUNS`), with the pool in-process:
//! `cargo run --release -p torpor-pool --example tls_throughput [MiB]` (default 256).

use std::{
    sync::{mpsc, Arc},
    thread,
    time::Instant,
};

use anyhow::Result;
use torpor_image::{manifest::SnapshotMeta, CHUNK_SIZE};
use torpor_pool::{serve, tls, ClientTls, Listener, PoolTarget, Store, StoreConfig};

const RUNS: usize = 3;
const TOKEN: &str = "throughput-token-0123456789";

fn start(
    capacity: u64,
    config: Option<Arc<rustls::ServerConfig>>,
) -> Result<torpor_pool::PoolAddr> {
    let store = Arc::new(Store::open(StoreConfig {
        capacity,
        spill_dir: None,
        keep: 1,
    })?);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let mut l = Listener::bind(&"127.0.0.1:0".parse().expect("address"))
                .await
                .expect("bind");
            if let Some(c) = config {
                l = l.with_tls(c).expect("tls");
            }
            tx.send(l.local_addr().expect("address")).expect("send");
            let _ = serve(l, store, Some(TOKEN.into()), std::future::pending()).await;
        })
    });
    Ok(rx.recv()?)
}

/// Seconds for the put and for the get of `data` as one file.
fn round(target: &PoolTarget, data: &[u8]) -> Result<(f64, f64)> {
    let mut c = target.connect()?;
    let t = Instant::now();
    c.put_begin("bench", SnapshotMeta::default(), Some(data.len() as u64))?;
    c.file_open(0, "pages-1.img")?;
    for piece in data.chunks(CHUNK_SIZE as usize) {
        c.file_data(0, piece)?;
    }
    c.file_close(0, data.len() as u64)?;
    let g = c.commit(None, None)?.generation;
    let put = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut got = 0usize;
    c.get_file("bench", g, "pages-1.img", |b| {
        got += b.len();
        Ok(())
    })?;
    anyhow::ensure!(got == data.len(), "short read");
    Ok((put, t.elapsed().as_secs_f64()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(256);
    let bytes = mib << 20;
    let data: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
    let dir = tempfile::tempdir()?;
    let g = tls::generate(dir.path(), &["127.0.0.1".into()], false)?;
    // Twice the snapshot: with keep = 1 the old generation goes only after the new commits.
    let plain = PoolTarget::new(start(2 * bytes + (64 << 20), None)?, TOKEN);
    let secure = PoolTarget::new(
        start(
            2 * bytes + (64 << 20),
            Some(tls::server_config(&g.pool_cert, &g.pool_key, None)?),
        )?,
        TOKEN,
    )
    .with_tls(Some(ClientTls::pinned(&g.pool_cert, None)?));
    let (mut pp, mut pg, mut tp, mut tg) = (vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        let (p, g) = round(&plain, &data)?;
        pp.push(p);
        pg.push(g);
        let (p, g) = round(&secure, &data)?;
        tp.push(p);
        tg.push(g);
    }
    let rate = |s: f64| bytes as f64 / s / 1e9;
    let (pp, pg, tp, tg) = (median(pp), median(pg), median(tp), median(tg));
    println!("{mib} MiB over loopback TCP, medians of {RUNS}:");
    println!(
        "  plaintext put {:.2} GB/s, get {:.2} GB/s",
        rate(pp),
        rate(pg)
    );
    println!(
        "  TLS       put {:.2} GB/s, get {:.2} GB/s",
        rate(tp),
        rate(tg)
    );
    println!(
        "  TLS/plaintext throughput: put {:.2}, get {:.2}",
        pp / tp,
        pg / tg
    );
    Ok(())
}
