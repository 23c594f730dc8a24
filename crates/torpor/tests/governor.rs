//! The energy governor end to end, with the real binary and CRIU: a server with background
//! wakeups (redis, whose timers run 10 times a second) is frozen for short gaps, a request
//! thaws it in about a millisecond and is answered, and once idle long enough for the
//! snapshot to pay it is checkpointed and woken by restore, its data intact.

use std::time::Duration;

use anyhow::Result;
use torpor_bench::harness::redis_command;

mod common;

use common::{Up, EMBEDDED};
use torpor_testkit::{own_addr, SERIAL};

#[test]
fn redis_is_frozen_for_short_gaps_thawed_by_a_request_and_snapshotted_when_that_pays() -> Result<()>
{
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (port, backend) = (own_addr(), own_addr());
    let dir = tempfile::tempdir()?;
    let services = format!(
        "[power]\nprofile = \"icx-2s\"\n[[service]]\nname = \"kv\"\ncommand = [\"redis-server\", \"--port\", \"{}\", \"--bind\", \"{}\", \"--save\", \"\", \"--appendonly\", \"no\", \"--dir\", \"{}\"]\nlisten = \"{port}\"\nbackend = \"{backend}\"\nprotocol = \"tcp\"\n[service.policy]\nidle_threshold = \"200ms\"\ngovernor = \"energy\"\n",
        backend.port(),
        backend.ip(),
        dir.path().display()
    );
    let up = Up::start(EMBEDDED, &services)?;
    assert_eq!(redis_command(port, &["SET", "k", "v"])?, "+OK");
    // Its idle cost is measured first (a second with nothing in flight), then a freeze pays
    // almost at once: a thaw costs next to nothing.
    let s = up.wait_state("kv", "frozen", Duration::from_secs(30))?;
    let wakeups = s["costs"]["idle_wakeups_per_s"].as_f64().unwrap_or(0.0);
    assert!(wakeups > 1.0, "redis's timers are measured: {s}");
    assert_eq!(s["last_choice"]["level"], "frozen", "{s}");
    assert_eq!(s["sleeps"], 0, "a snapshot does not pay yet: {s}");
    // A request thaws it and is answered; the wake is a thaw, not a restore.
    assert_eq!(redis_command(port, &["GET", "k"])?, "v");
    let s = up.service("kv")?;
    assert_eq!(s["last_wake"]["how"], "thaw", "{s}");
    assert!(s["freezes"].as_u64() >= Some(1), "{s}");
    let levels = s["levels"].as_array().cloned().unwrap_or_default();
    assert_eq!(levels.len(), 2, "break-even of both levels shown: {s}");
    // Left alone, the idle period outgrows the snapshot's target residency (seconds): it
    // moves from frozen to snapshotted, and a request restores it with its data.
    let s = up.wait_state("kv", "asleep", Duration::from_secs(90))?;
    assert_eq!(s["last_choice"]["level"], "snapshotted", "{s}");
    assert_eq!(redis_command(port, &["GET", "k"])?, "v");
    let s = up.service("kv")?;
    assert_eq!(s["cold_starts"], 0, "{s}");
    assert!(s["wakes"].as_u64() >= Some(1), "{s}");
    Ok(())
}
