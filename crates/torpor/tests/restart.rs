//! Restart without loss, with the real binary: `torpor up` stopped by SIGTERM and started
//! again keeps every service's state when its pool outlives it (here the embedded pool with
//! a disk tier), and says that it loses it when the pool does not.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result};

use torpor_testkit::{
    config::Pool, embedded, own_addr, sample_change, sample_sum, serial, Config, Service, Up,
};

/// A sample service (16 MiB of seeded memory, `/touch` changing its first MiB) that the
/// policy leaves awake: only the test and the stop put it to sleep.
fn sample(name: &str, port: SocketAddr, backend: SocketAddr) -> Service {
    Service::sample(name, port, backend, "16MiB")
        .args(&["--touch", "1MiB"])
        .idle("1h")
}

fn sleep_by_hand(up: &Up, name: &str) -> Result<()> {
    let (status, out, err) = up.command(&["sleep", name])?;
    anyhow::ensure!(status.success(), "torpor sleep {name}: {out}{err}");
    up.wait_state(name, "asleep", Duration::from_secs(30))?;
    Ok(())
}

fn snapshot_files(spill: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(spill)? {
        for f in std::fs::read_dir(dir?.path())? {
            let path = f?.path();
            files.push(path.strip_prefix(spill)?.display().to_string());
        }
    }
    files.sort();
    Ok(files)
}

#[test]
fn services_awake_and_asleep_keep_their_state_across_a_sigterm_and_a_start() -> Result<()> {
    let _g = serial();
    let dir = tempfile::tempdir()?;
    let spill = dir.path().join("spill");
    let pool = Config {
        pool: Pool {
            capacity: Some("256MiB".into()),
            spill_dir: Some(spill.clone()),
            ..Pool::default()
        },
        ..Config::default()
    };
    let (awake, asleep) = (own_addr(), own_addr());
    let services = [
        sample("awake", awake, own_addr()),
        sample("asleep", asleep, own_addr()),
    ];
    let cfg = pool.status(own_addr()).services(services);

    let mut up = Up::spawn(&cfg)?;
    up.wait_ready(Duration::from_secs(60))?;
    let seed_sum = sample_sum(awake)?;
    // Each goes through a sleep and a (lazy) wake first, so that what the stop keeps is an
    // increment inheriting pages from the generation before it.
    sample_change(awake, 1)?;
    sample_change(asleep, 1)?;
    sleep_by_hand(&up, "awake")?;
    sleep_by_hand(&up, "asleep")?;
    let awake_state = sample_change(awake, 2)?;
    let asleep_state = sample_change(asleep, 3)?;
    assert_ne!(awake_state, seed_sum);
    assert_ne!(asleep_state, awake_state);
    sleep_by_hand(&up, "asleep")?;
    let s = up.wait_state("awake", "awake", Duration::from_secs(10))?;
    let awake_pid = s["pid"].as_i64().context("pid")? as i32;
    let asleep_generation = up.service("asleep")?["snapshot_generation"].clone();

    let stopped = up.stop()?;
    let log1 = up.log_text();
    assert!(
        stopped.success(),
        "SIGTERM ends in exit 0: {stopped}\n{log1}"
    );
    assert!(
        !torpor_criu::procs::pid_in_use(awake_pid),
        "no service process is left"
    );
    assert!(
        log1.contains("stopping: its state is kept in the pool"),
        "the awake service was checkpointed at the stop:\n{log1}"
    );
    assert!(!log1.contains("stopping loses the state"), "{log1}");
    let files = snapshot_files(&spill)?;
    assert!(
        files.iter().filter(|f| f.contains(".awake/")).count() >= 2
            && files.iter().filter(|f| f.contains(".asleep/")).count() >= 2,
        "every generation of each chain is on disk: {files:?}"
    );
    drop(up);

    let mut up = Up::spawn(&cfg)?;
    up.wait_ready(Duration::from_secs(60))?;
    for name in ["awake", "asleep"] {
        let s = up.service(name)?;
        assert_eq!(s["state"], "asleep", "{s}");
        assert!(s["pid"].is_null(), "nothing runs: {s}");
        assert!(s["adopted_generation"].as_u64().is_some(), "{s}");
        assert_eq!(s["adopted_generation"], s["snapshot_generation"], "{s}");
    }
    assert_eq!(
        up.service("asleep")?["snapshot_generation"],
        asleep_generation,
        "the asleep service is adopted in the generation it slept in"
    );
    let text = up.status_text()?;
    assert!(text.contains("awake: adopted asleep at start"), "{text}");
    assert!(text.contains("asleep: adopted asleep at start"), "{text}");

    assert_eq!(sample_sum(awake)?, awake_state, "{}", up.log_text());
    assert_eq!(sample_sum(asleep)?, asleep_state, "{}", up.log_text());
    for name in ["awake", "asleep"] {
        let s = up.service(name)?;
        assert_eq!(s["state"], "awake", "{s}");
        assert_eq!(
            (&s["wakes"], &s["cold_starts"]),
            (&1.into(), &0.into()),
            "{s}"
        );
        assert_eq!(s["last_wake"]["cause"], "request", "{s}");
        assert_eq!(s["last_wake"]["how"], "restore", "{s}");
    }
    // And they keep serving from there.
    assert_ne!(sample_change(awake, 1)?, awake_state);
    assert!(up.stop()?.success());
    Ok(())
}

#[test]
fn without_a_disk_tier_a_stop_kills_services_as_before_and_says_so() -> Result<()> {
    let _g = serial();
    let web = own_addr();
    let mut up = Up::launch(embedded().services([sample("web", web, own_addr())]))?;
    const WARNING: &str = "stopping loses the state of every service";
    assert_eq!(up.log_text().matches(WARNING).count(), 1, "said at start");
    sample_change(web, 1)?;
    let pid = up.wait_state("web", "awake", Duration::from_secs(10))?["pid"]
        .as_i64()
        .context("pid")? as i32;
    assert!(up.stop()?.success());
    let log = up.log_text();
    assert!(!torpor_criu::procs::pid_in_use(pid), "killed and reaped");
    assert_eq!(log.matches(WARNING).count(), 2, "said at stop: {log}");
    assert!(
        !log.contains("checkpointing") && !log.contains("stopping: its state is kept"),
        "no checkpoint at the stop: {log}"
    );
    Ok(())
}
