//! Real CRIU round trips through a real pool (`torpor pool` processes), as root. Each test
//! starts what it needs; they run one at a time because CRIU's network lock takes the
//! host's iptables.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    thread,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use torpor_bench::harness::{
    become_subreaper, kill_and_reap, redis_command, PoolProcess, SampleProcess,
};
use torpor_criu::{
    checkpoint_to_pool, procs, restore_from_pool, CheckpointError, CheckpointOptions, CriuBinary,
    RestoreError, RestoreOptions,
};
use torpor_workload::{expected_sum, SampleClient};

static SERIAL: Mutex<()> = Mutex::new(());

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_torpor"))
}

fn criu() -> CriuBinary {
    CriuBinary::locate().expect("CRIU is installed by the README's test command")
}

fn setup() -> std::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    become_subreaper().unwrap();
    guard
}

const MIB: u64 = 1 << 20;

#[test]
fn sample_with_256_mib_comes_back_with_identical_memory_and_keeps_counting() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 600 * MIB)?;
    let mut svc = SampleProcess::spawn(exe(), 256 * MIB, 7)?;
    let mut conn = SampleClient::connect(svc.addr)?;
    let before = conn.call("SUM")?;
    assert_eq!(
        before,
        expected_sum(256 * MIB, 7),
        "service holds the seeded bytes"
    );
    let count_before = conn.count()?;

    let r = checkpoint_to_pool(
        &criu(),
        svc.pid,
        "counter",
        &pool.target,
        &CheckpointOptions::default(),
    )?;
    svc.reap();
    assert!(
        !procs::pid_in_use(svc.pid),
        "the checkpointed process is gone"
    );
    assert!(
        r.pool_bytes >= 256 * MIB,
        "pool holds the memory: {}",
        r.pool_bytes
    );
    assert!(
        r.peak_staging_bytes <= 64 * MIB,
        "staging bounded: {}",
        r.peak_staging_bytes
    );
    assert!(
        SampleClient::connect(svc.addr).is_err(),
        "nobody listens while asleep"
    );
    // The images CRIU writes last before post-dump (its inventory) must be in the snapshot,
    // not left behind in the streamer socket when the snapshot is sealed.
    let manifest = pool.target.connect()?.manifest("counter", None)?;
    for f in ["inventory.img", "pstree.img"] {
        assert!(manifest.file(f).is_some(), "{f} in {:?}", manifest.files);
    }
    assert!(
        manifest.file("stats-dump").is_none(),
        "stats are written after the seal"
    );

    let restored = restore_from_pool(
        &criu(),
        "counter",
        None,
        &pool.target,
        &RestoreOptions::default(),
    )?;
    assert_eq!(restored.pid, svc.pid, "CRIU restores the original PID");
    let mut fresh = SampleClient::connect_within(svc.addr, Duration::from_secs(5))?;
    assert_eq!(fresh.call("SUM")?, before, "memory identical after restore");
    let c1 = fresh.count()?;
    thread::sleep(Duration::from_millis(200));
    let c2 = fresh.count()?;
    kill_and_reap(restored.pid);
    assert!(
        c1 >= count_before,
        "counter kept its value ({count_before} -> {c1})"
    );
    assert!(
        c2 > c1,
        "counter keeps counting after restore ({c1} -> {c2})"
    );
    Ok(())
}

#[test]
fn tcp_listener_and_established_connection_survive() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 256 * MIB)?;
    let mut svc = SampleProcess::spawn(exe(), 16 * MIB, 3)?;
    let mut established = SampleClient::connect(svc.addr)?;
    assert_eq!(established.call("PING")?, "PONG");

    checkpoint_to_pool(
        &criu(),
        svc.pid,
        "tcp",
        &pool.target,
        &CheckpointOptions::default(),
    )?;
    svc.reap();
    let restored = restore_from_pool(
        &criu(),
        "tcp",
        None,
        &pool.target,
        &RestoreOptions::default(),
    )?;
    let answers = (|| -> Result<(String, String)> {
        let old = established.call("PING")?;
        let mut new = SampleClient::connect_within(svc.addr, Duration::from_secs(5))?;
        Ok((old, new.call("PING")?))
    })();
    kill_and_reap(restored.pid);
    let (old, new) = answers?;
    assert_eq!(old, "PONG", "the established connection still works");
    assert_eq!(new, "PONG", "the listener accepts new connections");
    Ok(())
}

fn free_port() -> u16 {
    torpor_bench::harness::free_port().expect("a free port")
}

#[test]
fn redis_with_100_mb_of_keys_has_the_same_digest_after_restore() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 512 * MIB)?;
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut cmd = Command::new("redis-server");
    // SAFETY: setsid is async-signal-safe; CRIU wants the tree's root to lead its session.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--enable-debug-command",
            "yes",
            "--daemonize",
            "no",
            "--dir",
        ])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("redis-server from apt (the README's test command installs it)")?;
    let result = (|| -> Result<()> {
        let mut tries = 0;
        while redis_command(addr, &["PING"])
            .map(|r| r != "+PONG")
            .unwrap_or(true)
        {
            tries += 1;
            ensure!(tries < 500, "redis did not start");
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            redis_command(addr, &["DEBUG", "POPULATE", "100000", "key", "1000"])?,
            "+OK"
        );
        let digest = redis_command(addr, &["DEBUG", "DIGEST"])?;
        assert_eq!(redis_command(addr, &["DBSIZE"])?, ":100000");
        let pid = child.id() as i32;
        let r = checkpoint_to_pool(
            &criu(),
            pid,
            "redis",
            &pool.target,
            &CheckpointOptions::default(),
        )?;
        child.wait()?;
        assert!(
            r.pool_bytes > 100 * MIB,
            "about 100 MB of keys in the pool: {}",
            r.pool_bytes
        );
        let restored = restore_from_pool(
            &criu(),
            "redis",
            None,
            &pool.target,
            &RestoreOptions::default(),
        )?;
        let after = redis_command(addr, &["DEBUG", "DIGEST"]);
        kill_and_reap(restored.pid);
        assert_eq!(
            after?, digest,
            "DEBUG DIGEST identical after checkpoint and restore"
        );
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[test]
fn a_dump_crui_cannot_complete_leaves_the_service_running() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 256 * MIB)?;
    // Without its own session, CRIU refuses the tree (it would need --shell-job).
    let port_dir = tempfile::tempdir()?;
    let port_file = port_dir.path().join("port");
    let mut child = Command::new(exe())
        .args(["sample-service", "--memory", "8MiB", "--port-file"])
        .arg(&port_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let port = torpor_workload::wait_port_file(&port_file, Duration::from_secs(30))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut conn = SampleClient::connect(addr)?;
    let err = checkpoint_to_pool(
        &criu(),
        child.id() as i32,
        "nosession",
        &pool.target,
        &CheckpointOptions::default(),
    )
    .unwrap_err();
    let answer = conn.call("PING");
    let fresh = SampleClient::connect(addr).and_then(|mut c| c.call("PING"));
    let listed = pool.target.connect()?.list()?;
    let _ = child.kill();
    let _ = child.wait();
    assert!(matches!(err, CheckpointError::CriuFailed { .. }), "{err}");
    assert!(err.to_string().contains("keeps running"), "{err}");
    assert!(
        err.to_string().contains("session leader"),
        "CRIU's reason is shown: {err}"
    );
    assert_eq!(answer?, "PONG", "the service answers on its old connection");
    assert_eq!(fresh?, "PONG", "and on a new one");
    assert!(listed.is_empty(), "nothing was committed");
    Ok(())
}

#[test]
fn a_pool_that_refuses_the_snapshot_leaves_the_service_running() -> Result<()> {
    let _g = setup();
    // 32 MiB of RAM tier, no spill directory, a 96 MiB service: the pool must refuse.
    let pool = PoolProcess::spawn(exe(), 32 * MIB)?;
    let svc = SampleProcess::spawn(exe(), 96 * MIB, 5)?;
    let mut conn = SampleClient::connect(svc.addr)?;
    let sum = conn.call("SUM")?;
    let err = checkpoint_to_pool(
        &criu(),
        svc.pid,
        "toobig",
        &pool.target,
        &CheckpointOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, CheckpointError::PoolRefused { .. }),
        "{err:#?}"
    );
    let chain = format!("{:#}", anyhow::Error::from(err));
    assert!(
        chain.contains("--spill-dir"),
        "the pool's reason reaches the user: {chain}"
    );
    assert_eq!(conn.call("SUM")?, sum, "service resumed with its memory");
    thread::sleep(Duration::from_millis(50));
    assert!(conn.count()? > 0);
    assert!(pool.target.connect()?.list()?.is_empty());
    Ok(())
}

#[test]
fn restore_waits_for_the_dumped_pid_to_be_reaped() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 128 * MIB)?;
    let mut svc = SampleProcess::spawn(exe(), 8 * MIB, 9)?;
    checkpoint_to_pool(
        &criu(),
        svc.pid,
        "zombie",
        &pool.target,
        &CheckpointOptions::default(),
    )?;
    // The dumped task is now a zombie of ours; reap it only after the restore has started.
    assert!(procs::pid_in_use(svc.pid), "zombie holds the PID");
    let target = pool.target.clone();
    let restore = thread::spawn(move || {
        restore_from_pool(&criu(), "zombie", None, &target, &RestoreOptions::default())
    });
    thread::sleep(Duration::from_millis(400));
    svc.reap();
    let restored = restore.join().unwrap()?;
    assert!(
        restored.pid_wait_s >= 0.3,
        "restore waited for the PID: {}",
        restored.pid_wait_s
    );
    let answer = SampleClient::connect_within(svc.addr, Duration::from_secs(5))
        .and_then(|mut c| c.call("PING"));
    kill_and_reap(restored.pid);
    assert_eq!(answer?, "PONG");
    Ok(())
}

#[test]
fn missing_and_corrupt_snapshots_are_refused() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 64 * MIB)?;
    let err = restore_from_pool(
        &criu(),
        "never-stored",
        None,
        &pool.target,
        &RestoreOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, RestoreError::Pool { .. }), "{err}");
    assert!(format!("{:#}", anyhow::Error::from(err)).contains("not found"));

    // A pool with a spill directory; a second snapshot pushes the first to disk, where a
    // flipped byte must be caught when it is served.
    let spill = tempfile::tempdir()?;
    let pool = SpillPool::spawn(48 * MIB, spill.path())?;
    let mut a = SampleProcess::spawn(exe(), 24 * MIB, 1)?;
    checkpoint_to_pool(
        &criu(),
        a.pid,
        "victim",
        &pool.target,
        &CheckpointOptions::default(),
    )?;
    a.reap();
    let mut b = SampleProcess::spawn(exe(), 24 * MIB, 2)?;
    checkpoint_to_pool(
        &criu(),
        b.pid,
        "pusher",
        &pool.target,
        &CheckpointOptions::default(),
    )?;
    b.reap();
    let victim = spill.path().join("victim");
    let file: PathBuf = std::fs::read_dir(&victim)?
        .next()
        .context("spilled file")??
        .path();
    let mut bytes = std::fs::read(&file)?;
    let at = bytes.len() - 4096 * 100;
    bytes[at] ^= 0xff;
    std::fs::write(&file, bytes)?;
    let err = restore_from_pool(
        &criu(),
        "victim",
        None,
        &pool.target,
        &RestoreOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, RestoreError::Corrupt { .. }), "{err:#?}");
    assert!(
        !procs::pid_in_use(a.pid),
        "nothing of the corrupt snapshot runs"
    );
    Ok(())
}

/// A `torpor pool` with a spill directory (the harness's pool has none).
struct SpillPool {
    child: std::process::Child,
    target: torpor_criu::PoolTarget,
    _dir: tempfile::TempDir,
}

impl SpillPool {
    fn spawn(capacity: u64, spill: &Path) -> Result<SpillPool> {
        let dir = tempfile::tempdir()?;
        let sock = dir.path().join("pool.sock");
        let child = Command::new(exe())
            .args(["pool", "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .arg("--capacity")
            .arg(capacity.to_string())
            .arg("--spill-dir")
            .arg(spill)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let target = torpor_criu::PoolTarget {
            addr: torpor_pool::PoolAddr::Unix(sock),
            token: String::new(),
        };
        for _ in 0..1000 {
            if target.connect().is_ok() {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(SpillPool {
            child,
            target,
            _dir: dir,
        })
    }
}

impl Drop for SpillPool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
