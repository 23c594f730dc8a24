//! Real CRIU round trips through a real pool (`torpor pool` processes), as root. Each test
//! starts what it needs; they run one at a time because CRIU's network lock takes the
//! host's iptables.

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use torpor_bench::harness::{kill_and_reap, redis_command, PoolProcess, SampleProcess};
use torpor_criu::{
    checkpoint_to_pool, procs, restore_from_pool, restore_streamed, run_as_for_tree,
    CheckpointError, CheckpointOptions, CriuBinary, CriuIdentity, RestoreError, RestoreOptions,
    RunAs,
};
use torpor_workload::{expected_sum, SampleClient};

use torpor_testkit::{criu, criu_guard as setup, exe, own_addr, proc_state};

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
        &pool.pools,
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

    // Both eager paths bring the same snapshot back: every page copied in through
    // userfaultfd (the default), and CRIU reading every page itself (its fallback).
    for streamed in [false, true] {
        let opts = RestoreOptions::default();
        let restored = if streamed {
            restore_streamed(&criu(), "counter", None, &pool.pools, &opts)?
        } else {
            restore_from_pool(&criu(), "counter", None, &pool.pools, &opts)?
        };
        assert_eq!(restored.filled, !streamed, "{restored:?}");
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
    }
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
        &pool.pools,
        &CheckpointOptions::default(),
    )?;
    svc.reap();
    let restored = restore_from_pool(
        &criu(),
        "tcp",
        None,
        &pool.pools,
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

#[test]
fn redis_with_100_mb_of_keys_has_the_same_digest_after_restore() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 512 * MIB)?;
    let dir = tempfile::tempdir()?;
    let addr = own_addr();
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
            &addr.port().to_string(),
            "--bind",
            &addr.ip().to_string(),
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
            &pool.pools,
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
            &pool.pools,
            &RestoreOptions::default(),
        )?;
        let after = redis_command(addr, &["DEBUG", "DIGEST"]);
        kill_and_reap(restored.pid);
        assert!(
            restored.filled,
            "copied in through userfaultfd: {restored:?}"
        );
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
        &pool.pools,
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
        &pool.pools,
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
        &pool.pools,
        &CheckpointOptions::default(),
    )?;
    // The dumped task is now a zombie of ours; reap it only after the restore has started.
    assert!(procs::pid_in_use(svc.pid), "zombie holds the PID");
    let target = pool.pools.clone();
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
        &pool.pools,
        &RestoreOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, RestoreError::Pool { .. }), "{err}");
    assert!(format!("{:#}", anyhow::Error::from(err)).contains("not found"));

    // A pool with a spill directory; a second snapshot pushes the first to disk, where a
    // flipped byte must be caught when it is served.
    let spill = tempfile::tempdir()?;
    let pool = PoolProcess::spawn_spilling(exe(), 48 * MIB, Some(spill.path()))?;
    let mut a = SampleProcess::spawn(exe(), 24 * MIB, 1)?;
    checkpoint_to_pool(
        &criu(),
        a.pid,
        "victim",
        &pool.pools,
        &CheckpointOptions::default(),
    )?;
    a.reap();
    let mut b = SampleProcess::spawn(exe(), 24 * MIB, 2)?;
    checkpoint_to_pool(
        &criu(),
        b.pid,
        "pusher",
        &pool.pools,
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
        &pool.pools,
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

const NOBODY: RunAs = RunAs {
    uid: 65534,
    gid: 65534,
};

/// SIGKILLs and reaps the processes a test started, in order, when the test ends, even
/// through a failed assertion.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            kill_and_reap(pid);
        }
    }
}

/// Makes `cmd` lead its own session (CRIU wants the tree's root to).
fn own_session(cmd: &mut Command) -> &mut Command {
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        })
    }
}

/// Adds `sample-service` and its arguments, writing its port into `dir`, to a command
/// running `exe()`.
fn sample_args(cmd: &mut Command, dir: &Path, memory: u64, seed: u64) {
    cmd.args(["sample-service", "--listen", "127.0.0.1:0", "--memory"])
        .arg(memory.to_string())
        .arg("--seed")
        .arg(seed.to_string())
        .arg("--port-file")
        .arg(dir.join("port"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
}

/// The uids of a process as `/proc` shows them now.
fn uids(pid: i32) -> Option<[u32; 4]> {
    procs::task_ids(pid).map(|t| t.uids)
}

/// The first descendant of `root` that satisfies `want`, waited for up to 5 s.
fn wait_descendant(root: i32, want: impl Fn(i32) -> bool) -> Result<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(p) = procs::tree_pids(root)
            .into_iter()
            .skip(1)
            .find(|p| want(*p))
        {
            return Ok(p);
        }
        ensure!(Instant::now() < deadline, "no such descendant of {root}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// A stand-in for CRIU that leaves `mark` behind if it is run at all.
fn criu_that_must_not_run(dir: &Path) -> Result<(CriuBinary, PathBuf)> {
    let mark = dir.join("criu-ran");
    let script = dir.join("criu");
    std::fs::write(
        &script,
        format!("#!/bin/sh\ntouch '{}'\nexit 1\n", mark.display()),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok((
        CriuBinary {
            criu: script,
            prefix: None,
        },
        mark,
    ))
}

#[test]
fn a_service_running_as_nobody_is_dumped_and_restored_by_criu_running_as_nobody() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 256 * MIB)?;
    let dir = tempfile::tempdir()?;
    // The service writes its port file here as nobody.
    std::os::unix::fs::chown(dir.path(), Some(NOBODY.uid), Some(NOBODY.gid))?;
    let mut cmd = Command::new(exe());
    cmd.uid(NOBODY.uid).gid(NOBODY.gid);
    sample_args(&mut cmd, dir.path(), 48 * MIB, 11);
    let pid = own_session(&mut cmd).spawn()?.id() as i32;
    // The restored service has the same PID and is ours too (we are the subreaper).
    let _cleanup = KillOnDrop(vec![pid]);
    let port = torpor_workload::wait_port_file(&dir.path().join("port"), Duration::from_secs(30))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut conn = SampleClient::connect(addr)?;
    let before = conn.call("SUM")?;
    assert_eq!(before, expected_sum(48 * MIB, 11));
    assert_eq!(
        uids(pid),
        Some([NOBODY.uid; 4]),
        "the service runs as nobody"
    );
    assert_eq!(
        run_as_for_tree(pid)?,
        Some(NOBODY),
        "a nobody tree asks for nobody"
    );

    if !procs::has_cap_sys_resource() {
        // Why it matters here: root's CRIU cannot dump it, and the tree survives that.
        let err = checkpoint_to_pool(
            &criu(),
            pid,
            "as-root",
            &pool.pools,
            &CheckpointOptions {
                run_as: CriuIdentity::Current,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, CheckpointError::CriuFailed { .. }), "{err}");
        assert!(err.to_string().contains("rlimit"), "CRIU's reason: {err}");
        assert_eq!(conn.call("PING")?, "PONG", "resumed after root's attempt");
    }

    let count_before = conn.count()?;
    let r = checkpoint_to_pool(
        &criu(),
        pid,
        "nobody",
        &pool.pools,
        &CheckpointOptions::default(),
    )?;
    nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)?;
    assert_eq!(r.run_as, Some(NOBODY), "CRIU dumped as nobody");
    assert!(!r.pid_namespace);
    let meta = pool.target.connect()?.manifest("nobody", None)?.meta;
    assert_eq!(
        meta.run_as,
        Some(NOBODY),
        "the snapshot records the identity"
    );
    assert!(!meta.pid_namespace);
    assert!(
        r.pool_bytes >= 48 * MIB,
        "memory in the pool: {}",
        r.pool_bytes
    );

    let restored = restore_from_pool(
        &criu(),
        "nobody",
        None,
        &pool.pools,
        &RestoreOptions::default(),
    )?;
    assert_eq!(restored.run_as, Some(NOBODY), "CRIU restored as nobody");
    assert_eq!(restored.pid, pid, "CRIU restores the original PID");
    assert_eq!(uids(restored.pid), Some([NOBODY.uid; 4]), "still nobody");
    assert_eq!(
        conn.call("PING")?,
        "PONG",
        "the established connection still works"
    );
    let mut fresh = SampleClient::connect_within(addr, Duration::from_secs(5))?;
    assert_eq!(fresh.call("SUM")?, before, "memory identical after restore");
    let c1 = fresh.count()?;
    thread::sleep(Duration::from_millis(100));
    let c2 = fresh.count()?;
    assert!(
        c1 >= count_before && c2 > c1,
        "counter kept counting: {count_before} {c1} {c2}"
    );
    Ok(())
}

#[test]
fn a_pid_namespace_tree_is_restored_at_once_while_its_old_pid_is_still_a_zombie() -> Result<()> {
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 256 * MIB)?;
    // As the agent starts services: the service is the init of its own PID namespace.
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "setsid"]).arg(exe());
    sample_args(&mut cmd, dir.path(), 32 * MIB, 4);
    let unshare = cmd.spawn().context("unshare from util-linux")?.id() as i32;
    let mut cleanup = KillOnDrop(vec![unshare]);
    let port = torpor_workload::wait_port_file(&dir.path().join("port"), Duration::from_secs(30))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let init = wait_descendant(unshare, |_| true)?;
    // A namespace init ignores SIGTERM; SIGKILL (first, before unshare) ends it.
    cleanup.0.insert(0, init);
    assert!(
        procs::is_pid_namespace_init(init),
        "pid {init} is its namespace's init"
    );
    let mut conn = SampleClient::connect(addr)?;
    let before = conn.call("SUM")?;
    assert_eq!(before, expected_sum(32 * MIB, 4));

    // unshare, the init's parent, is stopped: the dumped init stays a zombie holding its PID.
    let unshare_pid = nix::unistd::Pid::from_raw(unshare);
    nix::sys::signal::kill(unshare_pid, nix::sys::signal::Signal::SIGSTOP)?;
    let r = checkpoint_to_pool(
        &criu(),
        init,
        "pidns",
        &pool.pools,
        &CheckpointOptions::default(),
    )?;
    assert!(r.pid_namespace, "the snapshot knows its namespace");
    assert_eq!(r.run_as, None, "a root tree is dumped by root");
    assert!(
        pool.target
            .connect()?
            .manifest("pidns", None)?
            .meta
            .pid_namespace
    );
    assert_eq!(proc_state(init), Some('Z'), "the dumped init is a zombie");

    let start = Instant::now();
    let restored = restore_from_pool(
        &criu(),
        "pidns",
        None,
        &pool.pools,
        &RestoreOptions::default(),
    );
    let took = start.elapsed();
    let zombie_during_restore = proc_state(init) == Some('Z');
    nix::sys::signal::kill(unshare_pid, nix::sys::signal::Signal::SIGCONT)?;
    let restored = restored?;
    cleanup.0.insert(0, restored.pid);
    assert!(
        zombie_during_restore,
        "the old PID was still taken throughout the restore"
    );
    assert_eq!(restored.pid_wait_s, 0.0, "no wait for the old PIDs");
    assert!(took < Duration::from_secs(5), "restore took {took:?}");
    assert_ne!(
        restored.pid, init,
        "the old PID was taken, so the init got another"
    );
    assert!(
        procs::is_pid_namespace_init(restored.pid),
        "restored as the init of a fresh namespace"
    );
    assert_eq!(
        conn.call("PING")?,
        "PONG",
        "the established connection still works"
    );
    let mut fresh = SampleClient::connect_within(addr, Duration::from_secs(5))?;
    assert_eq!(fresh.call("SUM")?, before, "memory identical after restore");
    let c1 = fresh.count()?;
    thread::sleep(Duration::from_millis(100));
    assert!(fresh.count()? > c1, "keeps counting");
    Ok(())
}

#[test]
fn a_tree_whose_child_switched_uid_is_refused_without_running_criu_and_keeps_running() -> Result<()>
{
    let _g = setup();
    let pool = PoolProcess::spawn(exe(), 64 * MIB)?;
    let mut cmd = Command::new("/bin/sh");
    cmd.args([
        "-c",
        "setpriv --reuid=nobody --regid=nogroup --clear-groups -- sleep 600 & wait",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let root = own_session(&mut cmd).spawn()?.id() as i32;
    let mut cleanup = KillOnDrop(vec![root]);
    let child = wait_descendant(root, |p| uids(p) == Some([NOBODY.uid; 4]))?;
    // The shell reaps its child once that is killed.
    cleanup.0.insert(0, child);
    if procs::has_cap_sys_resource() {
        // A host whose root may prlimit anyone dumps it as root.
        assert_eq!(run_as_for_tree(root)?, None);
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (fake, mark) = criu_that_must_not_run(dir.path())?;
    let err = checkpoint_to_pool(
        &fake,
        root,
        "mixed",
        &pool.pools,
        &CheckpointOptions::default(),
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, CheckpointError::MixedUids { uids, .. } if uids.contains(&0) && uids.contains(&NOBODY.uid)),
        "{err:?}"
    );
    assert!(message.contains("CAP_SYS_RESOURCE"), "{message}");
    assert!(message.contains("keeps running"), "{message}");
    assert!(!mark.exists(), "CRIU was not run");
    thread::sleep(Duration::from_millis(50));
    for pid in [root, child] {
        assert!(
            matches!(proc_state(pid), Some('S' | 'R')),
            "pid {pid} still runs: {:?}",
            proc_state(pid)
        );
    }
    assert!(
        pool.target.connect()?.list()?.is_empty(),
        "nothing was stored"
    );
    Ok(())
}

#[test]
fn a_nobody_tree_in_its_own_pid_namespace_is_refused_up_front_as_criu_would_fail() -> Result<()> {
    let _g = setup();
    if procs::has_cap_sys_resource() {
        eprintln!("skipped: with CAP_SYS_RESOURCE root's CRIU dumps such a tree");
        return Ok(());
    }
    let pool = PoolProcess::spawn(exe(), 64 * MIB)?;
    let unshare = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
        ])
        .args(["--clear-groups", "--", "setsid", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?
        .id() as i32;
    let mut cleanup = KillOnDrop(vec![unshare]);
    let init = wait_descendant(unshare, |p| {
        uids(p) == Some([NOBODY.uid; 4]) && procs::comm(p) == "sleep"
    })?;
    // A namespace init ignores SIGTERM; SIGKILL (first, before unshare) ends it.
    cleanup.0.insert(0, init);
    assert!(procs::is_pid_namespace_init(init));
    let dir = tempfile::tempdir()?;
    let (fake, mark) = criu_that_must_not_run(dir.path())?;
    let err = checkpoint_to_pool(
        &fake,
        init,
        "nsnobody",
        &pool.pools,
        &CheckpointOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            CheckpointError::UnprivilegedPidNamespace { uid: 65534, .. }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("keeps running"), "{err}");
    assert!(!mark.exists(), "CRIU was not run");

    // The prediction is CRIU's own verdict: asked to, CRIU as nobody fails for want of a /proc
    // of the task's namespace (its parasite may neither mount one nor, depending on the task's
    // working directory, make the mount point).
    let err = checkpoint_to_pool(
        &criu(),
        init,
        "nsnobody",
        &pool.pools,
        &CheckpointOptions {
            run_as: CriuIdentity::User(NOBODY),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, CheckpointError::CriuFailed { .. }), "{err}");
    assert!(
        err.to_string().contains("Can't get /proc fd"),
        "CRIU's reason: {err}"
    );
    thread::sleep(Duration::from_millis(50));
    assert!(
        matches!(proc_state(init), Some('S' | 'R')),
        "{:?}",
        proc_state(init)
    );
    assert!(pool.target.connect()?.list()?.is_empty());
    Ok(())
}
