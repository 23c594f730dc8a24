//! `torpor stop --keep-running` with the real binary and real CRIU: `torpor up` exits and
//! leaves its awake service running; the next start adopts that very process awake (no
//! restore, no cold start), and it can be put to sleep and woken like any other. The order is
//! refused while an asleep service's snapshot would go with the process, and a kept process
//! that died before the next start is dropped: the service cold-starts.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use torpor_agent::CgroupRoot;

use torpor_testkit::{
    config::{Node, Pool},
    own_addr, sample_change, sample_sum, serial, Config, Service, Up,
};

/// A namespace of its own: the cgroups of other tests' services (the host's namespace) are
/// never taken for this one's, nor this one's for theirs.
const NAMESPACE: &str = "keeptest";

/// The sample service (seeded memory, `/touch` changes it, `/sum` shows it); the policy
/// leaves it awake.
fn sample(name: &str, port: SocketAddr, backend: SocketAddr) -> Service {
    Service::sample(name, port, backend, "8MiB")
        .args(&["--touch", "1MiB"])
        .idle("1h")
}

/// This test's namespace, its state dir in `dir`, an embedded pool of 256 MiB spilling to
/// `spill_dir` if given.
fn node(dir: &Path, spill_dir: Option<PathBuf>) -> Config {
    Config {
        node: Some(Node {
            namespace: Some(NAMESPACE.into()),
            state_dir: Some(dir.to_path_buf()),
            ..Node::default()
        }),
        pool: Pool {
            capacity: Some("256MiB".into()),
            spill_dir,
            ..Pool::default()
        },
        ..Config::default()
    }
}

fn kept_file(dir: &Path) -> PathBuf {
    dir.join(format!("kept.{NAMESPACE}"))
}

/// Kills what is left in a service's cgroup and removes it when dropped: a kept service is
/// no process's child, so nothing else would end it if the test fails midway.
struct CgroupGuard(String);

impl CgroupGuard {
    fn of(service: &str) -> CgroupGuard {
        CgroupGuard(format!("{NAMESPACE}.{service}"))
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let Some(root) = CgroupRoot::discover(Path::new("/proc/self/mountinfo")) else {
            return;
        };
        for cg in root.existing().into_iter().filter(|c| c.name() == self.0) {
            cg.kill_all(Duration::from_secs(10));
            let _ = cg.remove();
        }
    }
}

fn pid_of(s: &serde_json::Value) -> Result<i32> {
    Ok(s["pid"].as_i64().context("pid")? as i32)
}

fn start_time(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)
        .map(str::to_string)
}

/// `torpor ARGS` against `up`'s control socket; success required.
fn order(up: &Up, args: &[&str]) -> Result<String> {
    let (status, out, err) = up.command(args)?;
    anyhow::ensure!(status.success(), "torpor {args:?}: {out}{err}");
    Ok(out)
}

#[test]
fn an_awake_service_kept_running_is_adopted_by_the_next_start_and_sleeps_and_wakes_after(
) -> Result<()> {
    let _g = serial();
    let dir = tempfile::tempdir()?;
    let _cg = CgroupGuard::of("counter");
    let pool = node(dir.path(), Some(dir.path().join("spill")));
    let gate = own_addr();
    let cfg = pool
        .status(own_addr())
        .services([sample("counter", gate, own_addr())]);

    let mut up = Up::spawn(&cfg)?;
    up.wait_ready(Duration::from_secs(60))?;
    let seed = sample_sum(gate)?;
    let state = sample_change(gate, 3)?;
    assert_ne!(state, seed);
    let pid = pid_of(&up.wait_state("counter", "awake", Duration::from_secs(10))?)?;
    let started = start_time(pid).context("the service runs")?;

    let said = order(&up, &["stop", "--keep-running"])?;
    assert!(said.contains("keep running"), "{said}");
    let exited = up.wait_exit(Duration::from_secs(60))?;
    let log1 = up.log_text();
    assert!(exited.success(), "exit 0: {exited}\n{log1}");
    assert_eq!(
        start_time(pid).as_ref(),
        Some(&started),
        "the same process still runs after torpor up exited:\n{log1}"
    );
    assert!(
        !log1.contains("stopping: its state is kept in the pool"),
        "no checkpoint at the stop:\n{log1}"
    );
    let kept = kept_file(dir.path());
    let mode = std::fs::metadata(&kept)
        .with_context(|| format!("the kept-services file:\n{log1}"))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(up);

    let mut up = Up::spawn(&cfg)?;
    up.wait_ready(Duration::from_secs(60))?;
    let s = up.service("counter")?;
    assert_eq!(s["state"], "awake", "{s}");
    assert_eq!(pid_of(&s)?, pid, "the kept process itself: {s}");
    assert_eq!(s["adopted_pid"], pid, "{s}");
    assert_eq!(
        (&s["wakes"], &s["cold_starts"]),
        (&0.into(), &0.into()),
        "{s}"
    );
    assert!(
        !kept.exists(),
        "the kept-services file is deleted once read"
    );
    assert_eq!(
        sample_sum(gate)?,
        state,
        "its state is intact:\n{}",
        up.log_text()
    );

    // It is no child of this run: checkpointing it and seeing it go must work all the same.
    order(&up, &["sleep", "counter"])?;
    let s = up.wait_state("counter", "asleep", Duration::from_secs(30))?;
    assert!(s["pid"].is_null(), "{s}");
    assert!(
        start_time(pid).is_none(),
        "the adopted process is gone after its checkpoint"
    );
    assert_eq!(sample_sum(gate)?, state, "restored:\n{}", up.log_text());
    let s = up.wait_state("counter", "awake", Duration::from_secs(10))?;
    assert_eq!(s["last_wake"]["how"], "restore", "{s}");
    assert_eq!(
        (&s["wakes"], &s["cold_starts"]),
        (&1.into(), &0.into()),
        "{s}"
    );
    assert_ne!(sample_change(gate, 1)?, state, "and it serves on");
    assert!(up.stop()?.success(), "{}", up.log_text());
    Ok(())
}

#[test]
fn keeping_is_refused_while_a_snapshot_would_go_and_a_kept_process_that_died_is_started_again(
) -> Result<()> {
    let _g = serial();
    let dir = tempfile::tempdir()?;
    let _cg = CgroupGuard::of("web");
    // The embedded pool without a disk tier: its RAM tier goes with the process.
    let pool = node(dir.path(), None);
    let gate = own_addr();
    let cfg = pool
        .status(own_addr())
        .services([sample("web", gate, own_addr())]);

    let mut up = Up::spawn(&cfg)?;
    up.wait_ready(Duration::from_secs(60))?;
    let seed = sample_sum(gate)?;
    order(&up, &["sleep", "web"])?;
    up.wait_state("web", "asleep", Duration::from_secs(30))?;
    let (refused, out, err) = up.command(&["stop", "--keep-running"])?;
    assert!(!refused.success(), "{out}{err}");
    assert!(
        err.contains("cannot keep the services running")
            && err.contains("web asleep")
            && err.contains("spill_dir"),
        "the refusal says why: {err}"
    );
    assert!(up.try_wait()?.is_none(), "torpor up runs on");
    assert_eq!(up.service("web")?["state"], "asleep");

    // Nothing asleep any more: keeping is allowed.
    order(&up, &["wake", "web"])?;
    let state = sample_change(gate, 2)?;
    assert_ne!(state, seed);
    let pid = pid_of(&up.wait_state("web", "awake", Duration::from_secs(10))?)?;
    order(&up, &["stop", "--keep-running"])?;
    assert!(up.wait_exit(Duration::from_secs(60))?.success());
    assert!(start_time(pid).is_some(), "left running");
    drop(up);

    // It dies before the next start.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while start_time(pid).is_some() {
        anyhow::ensure!(Instant::now() < deadline, "the kept process never died");
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut up = Up::spawn(&cfg)?;
    up.wait_ready(Duration::from_secs(60))?;
    let log = up.log_text();
    assert!(
        log.contains("not adopted") && log.contains(&format!("its process {pid} is gone")),
        "the reason is logged:\n{log}"
    );
    let s = up.service("web")?;
    assert_eq!(s["state"], "awake", "{s}");
    assert_ne!(pid_of(&s)?, pid, "{s}");
    assert!(s["adopted_pid"].is_null(), "{s}");
    assert_eq!(sample_sum(gate)?, seed, "started from its command, fresh");
    assert!(up.stop()?.success());
    Ok(())
}
