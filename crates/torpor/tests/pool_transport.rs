//! The pool transport against real processes: a `torpor pool` child SIGSTOPped in the middle
//! of a real CRIU checkpoint (the client's timeouts end the wait and CRIU resumes the
//! service) or stopped before a restore (it fails in bounded time, nothing of it runs), `torpor
//! pool-cert` plus `torpor pool --tls-cert` serving pinned clients, and `torpor up` refusing
//! a remote plaintext pool.

use std::{
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use nix::{sys::signal, unistd::Pid};
use torpor_bench::harness::{kill_and_reap, SampleProcess};
use torpor_criu::{
    checkpoint_to_pool, restore_from_pool, CheckpointOptions, PoolTarget, RestoreOptions,
};
use torpor_pool::{ClientTls, PoolAddr, Timeouts};
use torpor_testkit::{criu, criu_guard, exe, proc_state};
use torpor_workload::SampleClient;

const MIB: u64 = 1 << 20;

/// A `torpor pool` child, continued (if stopped) and killed when dropped.
struct Pool {
    child: Child,
    target: PoolTarget,
    /// The pool with a key made for this test, for sealed checkpoints and restores.
    pools: torpor_criu::Pools,
}

impl Pool {
    fn spawn(args: &[&str], target: PoolTarget) -> Result<Pool> {
        // Its log goes to a file: a pipe nobody drains would stop a chatty pool.
        let log = tempfile::NamedTempFile::new()?;
        let mut child = Command::new(exe())
            .arg("pool")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen()?)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while let Err(e) = target.connect() {
            if child.try_wait()?.is_some() {
                let why = std::fs::read_to_string(log.path())?;
                anyhow::bail!("pool exited at start: {why}");
            }
            ensure!(Instant::now() < deadline, "pool did not start: {e}");
            thread::sleep(Duration::from_millis(10));
        }
        let pools = torpor_criu::Pools::single(
            target.clone(),
            std::sync::Arc::new(torpor_image::NodeKey::generate()),
        );
        Ok(Pool {
            child,
            target,
            pools,
        })
    }

    fn signal(&self, sig: signal::Signal) {
        signal::kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.signal(signal::Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_checkpoint_whose_pool_is_sigstopped_mid_dump_aborts_within_the_bound_and_the_service_keeps_serving(
) -> Result<()> {
    let _serial = criu_guard();
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("pool.sock");
    let listen = format!("unix:{}", sock.display());
    let timeouts = Timeouts::default();
    let pool = Pool::spawn(
        &["--listen", &listen, "--capacity", "512MiB"],
        PoolTarget::new(PoolAddr::Unix(sock), "").with_timeouts(timeouts),
    )?;
    let svc = SampleProcess::spawn(exe(), 256 * MIB, 11)?;
    let mut conn = SampleClient::connect(svc.addr)?;
    let count_before = conn.count()?;

    // Stop the pool once CRIU has seized the service: the dump is under way, its upload
    // connection open, and from now on nothing the client sends is read or answered.
    let svc_pid = svc.pid;
    let pool_pid = Pid::from_raw(pool.child.id() as i32);
    let stopper = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if proc_state(svc_pid) == Some('t') {
                signal::kill(pool_pid, signal::Signal::SIGSTOP).unwrap();
                return true;
            }
            thread::sleep(Duration::from_micros(200));
        }
        false
    });
    let started = Instant::now();
    let r = checkpoint_to_pool(
        &criu(),
        svc.pid,
        "stopped-pool",
        &pool.pools,
        &CheckpointOptions::default(),
    );
    let took = started.elapsed();
    assert!(stopper.join().unwrap(), "CRIU never seized the service");
    let err = match r {
        Ok(rep) => panic!("committed to a stopped pool: {rep:?}"),
        Err(e) => e,
    };
    let chain = torpor_pool::error_chain(&err);
    eprintln!("checkpoint into a stopped pool failed after {took:.1?}: {chain}");
    assert!(chain.contains("did not answer"), "{chain}");
    // The bound: the client gives up `frame` after the pool went silent (not twice that:
    // 20.5 s before a stalled write counted as timed out); CRIU then finishes its dump
    // into the void and resumes the tree (0.4 s here). Generous for two loaded cores.
    let bound = timeouts.connect + timeouts.frame + Duration::from_secs(5);
    assert!(took < bound, "took {took:?}, bound {bound:?}");
    // The service was resumed, not killed, and counts on from where it was.
    assert!(conn.count()? > count_before);
    assert_eq!(conn.call("PING")?, "PONG");
    Ok(())
}

#[test]
fn a_restore_from_a_sigstopped_pool_fails_within_the_bound_and_runs_nothing() -> Result<()> {
    let _serial = criu_guard();
    let criu = criu();
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("pool.sock");
    let listen = format!("unix:{}", sock.display());
    let timeouts = Timeouts::default();
    let pool = Pool::spawn(
        &["--listen", &listen, "--capacity", "512MiB"],
        PoolTarget::new(PoolAddr::Unix(sock), "").with_timeouts(timeouts),
    )?;
    let mut svc = SampleProcess::spawn(exe(), 128 * MIB, 5)?;
    checkpoint_to_pool(
        &criu,
        svc.pid,
        "stopped-restore",
        &pool.pools,
        &CheckpointOptions::default(),
    )?;
    svc.reap();

    // The pool stops answering (its accept queue still takes the connection).
    pool.signal(signal::Signal::SIGSTOP);
    let started = Instant::now();
    let r = restore_from_pool(
        &criu,
        "stopped-restore",
        None,
        &pool.pools,
        &RestoreOptions::default(),
    );
    let took = started.elapsed();
    let err = match r {
        Ok(rep) => {
            kill_and_reap(rep.pid);
            panic!("restored from a stopped pool: {rep:?}")
        }
        Err(e) => e,
    };
    let chain = torpor_pool::error_chain(&err);
    eprintln!("restore from a stopped pool failed after {took:.1?}: {chain}");
    assert!(chain.contains("did not answer"), "{chain}");
    let bound = timeouts.connect + timeouts.frame + Duration::from_secs(5);
    assert!(took < bound, "took {took:?}, bound {bound:?}");
    assert!(
        SampleClient::connect(svc.addr).is_err(),
        "nothing of the snapshot serves"
    );
    Ok(())
}

#[test]
fn pool_cert_and_pool_tls_cert_serve_a_pinned_client_and_refuse_an_unpinned_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let out = Command::new(exe())
        .args(["pool-cert", "--client"])
        .arg(&certs)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The child binds it: an address of this process's own.
    let listen = torpor_testkit::own_addr().to_string();
    let token_file = dir.path().join("token");
    let token = torpor_pool::random_token();
    torpor_pool::write_token_file(&token_file, &token)?;
    let p = |f: &str| certs.join(f).display().to_string();
    let tls = ClientTls::pinned(
        &certs.join("pool.crt"),
        Some((&certs.join("client.crt"), &certs.join("client.key"))),
    )?;
    let target = PoolTarget::new(listen.parse()?, token.clone()).with_tls(Some(tls));
    let pool = Pool::spawn(
        &[
            "--listen",
            &listen,
            "--capacity",
            "16MiB",
            "--token-file",
            &token_file.display().to_string(),
            "--tls-cert",
            &p("pool.crt"),
            "--tls-key",
            &p("pool.key"),
            "--tls-client-ca",
            &p("client-ca.crt"),
        ],
        target,
    )?;
    assert!(pool.target.connect()?.list()?.is_empty());
    // Plaintext and a client that pins nothing (mTLS without its certificate) are refused.
    let plain = PoolTarget::new(listen.parse()?, token.clone());
    assert!(plain.connect().is_err());
    let unpinned = PoolTarget::new(listen.parse()?, token)
        .with_tls(Some(ClientTls::pinned(&certs.join("pool.crt"), None)?));
    assert!(unpinned.connect().is_err());
    assert!(pool.target.connect()?.list()?.is_empty(), "still serving");
    Ok(())
}

#[test]
fn torpor_up_refuses_a_remote_plaintext_pool_before_starting_anything() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("torpor.toml");
    // TEST-NET-1: the refusal comes before any connection, so nothing is sent there.
    std::fs::write(
        &config,
        "[pool]\naddress = \"192.0.2.1:7070\"\n\n[status]\nlisten = \"127.0.0.1:0\"\n",
    )?;
    let out = Command::new(exe())
        .arg("up")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("refusing plaintext TCP"), "{stderr}");
    // With insecure = true the same pool passes the check (and is tried only when used).
    let insecure = torpor_up::config::Config::from_toml(
        "[pool]\naddress = \"192.0.2.1:7070\"\ninsecure = true\n",
    )?;
    assert!(matches!(
        insecure.pool,
        torpor_up::config::PoolChoice::Remote { insecure: true, .. }
    ));
    Ok(())
}
