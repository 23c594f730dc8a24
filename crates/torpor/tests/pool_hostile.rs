//! The real `torpor pool` process against floods and faults: a full file table, a flood of
//! idle and oversized-header connections under a 256-file limit, SIGKILL mid-upload and
//! mid-spill followed by a restart on the same disk tier. They run one at a time: they
//! measure a process and fill file tables.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use torpor_image::{manifest::SnapshotMeta, wire, CHUNK_SIZE};
use torpor_pool::{PoolAddr, PoolClient};
use torpor_testkit::{exe, poll, serial};

const TOKEN: &str = "pool-hostile-token-0123456789";

/// A `torpor pool` child on 127.0.0.1 (port 0), killed on drop; its stderr is collected.
struct PoolChild {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl PoolChild {
    /// Starts a pool with `extra` flags, limited to `nofile` open files when given.
    fn spawn(capacity: u64, extra: &[&str], nofile: Option<u64>) -> Result<PoolChild> {
        let dir = tempfile::tempdir()?;
        let token = dir.path().join("token");
        torpor_pool::write_token_file(&token, TOKEN)?;
        let mut cmd = Command::new(exe());
        cmd.args(["pool", "--listen", "127.0.0.1:0", "--capacity"])
            .arg(capacity.to_string())
            .arg("--token-file")
            .arg(&token)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    setrlimit(Resource::RLIMIT_NOFILE, n, n).map_err(std::io::Error::from)
                });
            }
        }
        let mut child = cmd.spawn()?;
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped");
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("pool: listening on ") {
                    let _ = addr_tx.send(a.trim().to_string());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(a) => a.parse()?,
            Err(_) => {
                let _ = child.kill();
                bail!("pool did not start: {}", log.lock().unwrap());
            }
        };
        Ok(PoolChild {
            child,
            addr,
            log,
            _dir: dir,
        })
    }

    fn pool_addr(&self) -> PoolAddr {
        PoolAddr::Tcp(self.addr.to_string())
    }

    fn client(&self) -> Result<PoolClient> {
        Ok(PoolClient::connect(&self.pool_addr(), TOKEN)?)
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL, as a crash or the OOM killer would.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PoolChild {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// This test process may hold thousands of client sockets: lift its soft limit to the hard one.
fn lift_own_file_limit() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn put(c: &mut PoolClient, name: &str, bytes: &[u8]) -> Result<u64> {
    c.put_begin(name, SnapshotMeta::default(), None)?;
    c.file_open(0, "pages-1.img")?;
    for piece in bytes.chunks(CHUNK_SIZE as usize) {
        c.file_data(0, piece)?;
    }
    c.file_close(0, bytes.len() as u64)?;
    Ok(c.commit(None, None)?.generation)
}

fn get(c: &mut PoolClient, name: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    c.get_file(name, 1, "pages-1.img", |b| {
        out.extend_from_slice(b);
        Ok(())
    })?;
    Ok(out)
}

/// Connects for up to `limit`; `None` when the pool never took the connection.
/// Connections waiting in the accept queue of the listener on 127.0.0.1:`port` (the
/// `rx_queue` of its LISTEN line in /proc/net/tcp).
fn listen_queue(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
            .then(|| f.get(4)?.split_once(':'))
            .flatten()
            .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
    })
}

fn try_connect(addr: SocketAddr, limit: Duration) -> Option<TcpStream> {
    TcpStream::connect_timeout(&addr, limit).ok()
}

#[test]
fn accept_errors_from_a_full_file_table_do_not_stop_the_pool() -> Result<()> {
    let _g = serial();
    lift_own_file_limit();
    // More connections allowed than files: accept itself fails with EMFILE.
    let mut pool = PoolChild::spawn(
        4 * CHUNK_SIZE,
        &["--max-connections", "1000", "--hello-timeout", "1s"],
        Some(48),
    )?;
    let idle: Vec<TcpStream> = (0..200)
        .filter_map(|_| try_connect(pool.addr, Duration::from_secs(5)))
        .collect();
    assert!(
        poll(Duration::from_secs(30), Duration::from_millis(20), || pool
            .log()
            .contains("accepting a pool connection failed")),
        "the pool ran out of files: {}",
        pool.log()
    );
    assert!(pool.alive(), "{}", pool.log());
    // Unauthenticated connections time out, files come back, and the pool serves again.
    let served = poll(Duration::from_secs(60), Duration::from_millis(20), || {
        pool.client().and_then(|mut c| Ok(c.list()?)).is_ok()
    });
    assert!(served, "{}", pool.log());
    assert!(pool.alive());
    drop(idle);
    Ok(())
}

#[test]
fn a_flood_of_idle_and_oversized_header_connections_leaves_a_256_file_pool_serving() -> Result<()> {
    let _g = serial();
    lift_own_file_limit();
    let mut pool = PoolChild::spawn(16 << 20, &[], Some(256))?;
    let rss_before = pool.rss_bytes();
    let oversized = wire::FrameHeader {
        kind: wire::FrameKind::Control,
        len: wire::MAX_CONTROL_PAYLOAD,
        crc: 0,
    }
    .encode();
    let started = Instant::now();
    let mut held = Vec::new();
    let (mut idle, mut headers, mut refused) = (0, 0, 0);
    let mut rss_peak = rss_before;
    // Until 2300 connections were made (a connect that times out on a loaded machine is
    // counted and tried again, within a bound).
    let mut i = 0;
    while idle + headers < 2300 && refused < 2000 {
        i += 1;
        match try_connect(pool.addr, Duration::from_secs(3)) {
            // 3 of every 23 connections send a header declaring 4 MiB: 300 of 2300.
            Some(mut s) if (idle + headers) % 23 < 3 => {
                if s.write_all(&oversized).is_ok() {
                    headers += 1;
                }
                held.push(s);
            }
            Some(s) => {
                idle += 1;
                held.push(s);
            }
            None => refused += 1,
        }
        if i % 100 == 0 {
            rss_peak = rss_peak.max(pool.rss_bytes());
        }
    }
    let flood = started.elapsed();
    rss_peak = rss_peak.max(pool.rss_bytes());
    assert!(pool.alive(), "{}", pool.log());
    // With every connection still held open, an authenticated client is served.
    // Connections the kernel completed but the pool has not accepted yet wait in its listen
    // queue; while that is full a new SYN is dropped and retried after 1 s by the client's
    // kernel, whatever the pool does. Measure once the pool has taken them all.
    let drained = poll(Duration::from_secs(60), Duration::from_millis(20), || {
        listen_queue(pool.addr.port()) == Some(0)
    });
    assert!(drained, "the pool accepts every queued connection");
    let asked = Instant::now();
    let mut c = pool.client().context("authenticated client")?;
    c.list()?;
    let served_in = asked.elapsed();
    rss_peak = rss_peak.max(pool.rss_bytes());
    let growth = rss_peak.saturating_sub(rss_before);
    println!(
        "flood: {idle} idle + {headers} oversized-header connections ({refused} not taken) in {:.1} s against a pool limited to 256 files; authenticated client served in {:.1} ms; pool RSS {} -> peak {} (growth {:.1} MiB)",
        flood.as_secs_f64(),
        served_in.as_secs_f64() * 1e3,
        rss_before,
        rss_peak,
        growth as f64 / (1 << 20) as f64
    );
    assert_eq!((idle, headers), (2000, 300), "the flood reached the pool");
    assert!(
        served_in < Duration::from_secs(1),
        "served in {served_in:?}"
    );
    assert!(growth < 64 << 20, "RSS grew by {growth} bytes");
    assert!(pool.alive(), "{}", pool.log());
    drop(held);
    Ok(())
}

fn spill_entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            out.push(format!(
                "{}/{}",
                d.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn a_pool_killed_mid_upload_restarts_without_the_partial_snapshot_and_keeps_spilled_ones(
) -> Result<()> {
    let _g = serial();
    let spill = tempfile::tempdir()?;
    let spill_arg = spill.path().join("spill");
    let spill_arg = spill_arg.to_str().unwrap();
    let a = pattern(1, 3 * CHUNK_SIZE as usize);
    {
        let mut pool = PoolChild::spawn(4 * CHUNK_SIZE, &["--spill-dir", spill_arg], None)?;
        let mut c = pool.client()?;
        put(&mut c, "a", &a)?;
        put(&mut c, "b", &pattern(2, 3 * CHUNK_SIZE as usize))?; // spills a
        let mut dying = pool.client()?;
        dying.put_begin("c", SnapshotMeta::default(), None)?;
        dying.file_open(0, "pages-1.img")?;
        dying.file_data(0, &pattern(3, CHUNK_SIZE as usize))?;
        pool.kill9();
    }
    let pool = PoolChild::spawn(4 * CHUNK_SIZE, &["--spill-dir", spill_arg], None)?;
    let mut c = pool.client()?;
    let names: Vec<String> = c.list()?.into_iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        vec!["a"],
        "the spilled snapshot survives; RAM and the upload do not"
    );
    assert_eq!(get(&mut c, "a")?, a);
    assert_eq!(
        spill_entries(Path::new(spill_arg)),
        vec!["a/0000000001.tsnap"]
    );
    Ok(())
}

#[test]
fn a_pool_killed_mid_spill_restarts_with_only_whole_snapshot_files() -> Result<()> {
    let _g = serial();
    let spill = tempfile::tempdir()?;
    let spill_dir = spill.path().join("spill");
    let spill_arg = spill_dir.to_str().unwrap().to_string();
    let size = 40 << 20;
    let old = pattern(1, size);
    {
        let mut pool = PoolChild::spawn(64 << 20, &["--spill-dir", &spill_arg], None)?;
        let mut c = pool.client()?;
        put(&mut c, "old", &old)?;
        put(&mut c, "big", &pattern(2, size))?; // spills old, whole
        let mut next = pool.client()?;
        let writer = thread::spawn(move || put(&mut next, "next", &pattern(3, size)));
        let tmp = spill_dir.join("big").join("0000000001.tsnap.tmp");
        // Polled tightly: writing 40 MiB and its fsync is a short window.
        let deadline = Instant::now() + Duration::from_secs(60);
        let seen = loop {
            if tmp.exists() {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            thread::sleep(Duration::from_micros(200));
        };
        pool.kill9();
        assert!(seen, "the spill of big was caught in progress");
        assert!(
            writer.join().unwrap().is_err(),
            "the upload died with the pool"
        );
    }
    let pool = PoolChild::spawn(64 << 20, &["--spill-dir", &spill_arg], None)?;
    let mut c = pool.client()?;
    let names: Vec<String> = c.list()?.into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["old"], "the half-written spill is not loaded");
    assert_eq!(get(&mut c, "old")?, old);
    assert_eq!(
        spill_entries(&spill_dir),
        vec!["old/0000000001.tsnap"],
        "the temp file is gone"
    );
    Ok(())
}
