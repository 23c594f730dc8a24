//! Differential test of sleep and wake: the same requests go to a mutator service that runs
//! directly and never sleeps, and to one behind `torpor up` that is checkpointed into the pool
//! and restored between every two requests. The mutator's answers depend only on the requests
//! it received, so every answer must be the same, digests of all its memory and of its forked
//! child's included: any difference is memory (or a process) the sleep and wake got wrong.
//! Real binary, real CRIU, as root.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use torpor_workload::SampleClient;

use torpor_testkit::{criu_guard, exe, own_addr, Config, Service, Up};

/// Enough for every generation of the mutator (tens of MiB); the RAM tier is pre-faulted at
/// start, so smaller is quicker.
const POOL: &str = "256MiB";

/// Every wait for a sleep; generous, as CRIU competes with other builds on 2 cores.
const WAIT: Duration = Duration::from_secs(60);

/// The requests, in order; the service sleeps and wakes before each. They cover every op of
/// the mutator, on touched and untouched regions, before and after forks, remaps and unmaps,
/// with digests (the parent's and the child's) along the way.
const REQUESTS: &[&str] = &[
    "PING",
    "DIGEST",
    "WRITE 1",
    "FORK",
    "CHILD",
    "DONTNEED 0 10 20",
    "DIGEST",
    "FREE 0 100 50",
    "FREE 1 0 8",
    "WRITE 2",
    "DIGEST",
    "CHILD",
    "REMAP 0 2048",
    "DIGEST",
    "REMAP 2 128",
    "UNMAPMAP 3",
    "WRITE 3",
    "GROW 512",
    "NEW 300",
    "DIGEST",
    "CHILD",
    "FORK",
    "WRITE 4",
    "CHILD",
    "DONTNEED 4 0 50",
    "REMAP 4 600",
    "FREE 2 0 64",
    "GROW 2048",
    "UNMAPMAP 0",
    "WRITE 5",
    "DIGEST",
    "CHILD",
    "NEW 64",
    "LOCK 5",
    "DIGEST",
    "WRITE 6",
    "DIGEST",
    "PING",
];

/// The mutator's `[[service]]` section for `torpor up`: the one place its configuration is
/// written. `restore` sets what the tests vary (restore mode, prefetch and the like).
fn mutator_service(
    port: SocketAddr,
    backend: SocketAddr,
    restore: impl FnOnce(Service) -> Service,
) -> Service {
    let service = Service::torpor(
        "mutator",
        &["mutator-service", "--listen", &backend.to_string()],
        port,
        backend,
    )
    .protocol("tcp")
    .idle("200ms");
    restore(service)
}

/// A mutator started directly; killed with its forked child, and both reaped, when dropped.
struct Direct {
    child: Option<Child>,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Direct {
    fn start() -> Result<Direct> {
        let dir = tempfile::tempdir()?;
        let port_file = dir.path().join("port");
        let child = Command::new(exe())
            .args(["mutator-service", "--listen", "127.0.0.1:0", "--port-file"])
            .arg(&port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut me = Direct {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            _dir: dir,
        };
        me.addr
            .set_port(torpor_workload::wait_port_file(&port_file, WAIT)?);
        Ok(me)
    }
}

/// The children of every thread of `pid` (the mutator forks from a connection's thread).
fn children_of(pid: u32) -> Vec<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    tasks
        .flatten()
        .flat_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

impl Drop for Direct {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let forked = children_of(c.id());
            let _ = c.kill();
            let _ = c.wait();
            // Orphaned now, so re-parented to this test (a subreaper), which reaps them.
            for pid in forked {
                torpor_bench::harness::kill_and_reap(pid);
            }
        }
    }
}

/// One request on a connection of its own (the gate holds it while the service sleeps).
fn call(to: SocketAddr, request: &str) -> Result<String> {
    SampleClient::connect(to)?
        .call(request)
        .with_context(|| format!("{request} to {to}"))
}

/// Why this host cannot run the test, if it cannot.
fn unfit() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root for CRIU".into());
    }
    torpor_criu::CriuBinary::locate()
        .err()
        .map(|e| format!("no CRIU: {e}"))
}

/// Sends [`REQUESTS`] to a direct mutator and to one behind `torpor up` (its service section
/// as `restore` makes it), waiting before each until the latter is asleep; fails listing
/// every request whose answers differ.
fn differential(restore: impl FnOnce(Service) -> Service) -> Result<()> {
    if let Some(why) = unfit() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let _g = criu_guard();
    let direct = Direct::start()?;
    let port = own_addr();
    let up =
        Up::launch(Config::embedded(POOL).services([mutator_service(port, own_addr(), restore)]))?;
    let asleep_after = |sleeps: u64| {
        up.wait_for("mutator", &format!("asleep {sleeps} times"), WAIT, |s| {
            s["state"] == "asleep" && s["sleeps"].as_u64() >= Some(sleeps)
        })
    };
    let mut sleeps = asleep_after(1)?["sleeps"].as_u64().context("sleeps")?;
    let mut differences = Vec::new();
    for (i, request) in REQUESTS.iter().enumerate() {
        let want = call(direct.addr, request)?;
        anyhow::ensure!(
            !want.starts_with("ERR"),
            "request {i} {request}: the test's own request is refused: {want}"
        );
        let got = call(port, request).with_context(|| up.log_text())?;
        if got != want {
            differences.push(format!(
                "request {i} {request} after sleep {sleeps}: {got:?}, not {want:?}"
            ));
        }
        sleeps = asleep_after(sleeps + 1)?["sleeps"]
            .as_u64()
            .context("sleeps")?;
    }
    let s = up.service("mutator")?;
    let log = up.log_text();
    eprintln!(
        "{} requests; {} sleeps, {} wakes; last wake {}; {} checkpoint(s) redone in full",
        REQUESTS.len(),
        s["sleeps"],
        s["wakes"],
        s["last_wake"],
        log.matches("incremental checkpoint not provable").count()
    );
    assert!(
        differences.is_empty(),
        "answers after a sleep and wake differ:\n{}\n{s}\n{}",
        differences.join("\n"),
        up.log_text()
    );
    assert_eq!(s["cold_starts"], 0, "{s}\n{}", up.log_text());
    assert!(
        s["wakes"].as_u64() >= Some(REQUESTS.len() as u64),
        "woken for every request: {s}"
    );
    Ok(())
}

#[test]
fn eager_restores_answer_every_request_as_a_mutator_that_never_slept() -> Result<()> {
    differential(|s| Service {
        restore: Some("eager".into()),
        ..s
    })
}

#[test]
fn lazy_restores_with_prefetch_answer_every_request_as_a_mutator_that_never_slept() -> Result<()> {
    differential(|s| Service {
        restore: Some("lazy".into()),
        ..s
    })
}

#[test]
fn lazy_restores_without_prefetch_answer_every_request_as_a_mutator_that_never_slept() -> Result<()>
{
    differential(|s| Service {
        restore: Some("lazy".into()),
        prefetch: Some(false),
        ..s
    })
}

#[test]
fn lazy_restores_filling_in_the_background_answer_every_request_as_a_mutator_that_never_slept(
) -> Result<()> {
    differential(|s| Service {
        restore: Some("lazy".into()),
        background_fill: Some(true),
        ..s
    })
}

/// The real binary's mutator answers its protocol, and killing it leaves no forked child.
#[test]
fn the_mutator_binary_serves_its_protocol() -> Result<()> {
    let direct = Direct::start()?;
    assert_eq!(call(direct.addr, "PING")?, "PONG");
    assert_eq!(call(direct.addr, "FORK")?, "OK");
    assert!(call(direct.addr, "CHILD")?.starts_with("child "));
    let pid = direct.child.as_ref().context("running")?.id();
    let forked = children_of(pid);
    assert_eq!(forked.len(), 1, "one forked child: {forked:?}");
    torpor_bench::harness::become_subreaper()?;
    drop(direct);
    assert!(
        !Path::new(&format!("/proc/{}", forked[0])).exists(),
        "the forked child is gone with the mutator"
    );
    Ok(())
}
