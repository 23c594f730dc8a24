//! The energy governor end to end, with the real binary and CRIU: a server with background
//! wakeups (redis, whose timers run 10 times a second) is frozen for short gaps, a request
//! thaws it in about a millisecond and is answered, and once its quiet is predicted past the
//! node's sleep break-even (its snapshot then lets the node sleep, a dry run here) it is
//! checkpointed and woken by restore, its data intact. Past a node memory budget the
//! coldest idle service is snapshotted; a dry-run node sleep is credited and labelled.

use std::time::Duration;

use anyhow::Result;
use torpor_bench::harness::redis_command;

use torpor_testkit::{
    config::{Node, NodeSleep, Power},
    embedded, http_get, own_addr, quick_suspend_profile, serial, Service, Up,
};

/// Knobs and node sleep as a dry run on the icx-2s profile whose node suspends and resumes in
/// `transition_s` seconds (written into `dir`); the hooks are `false`: had one run, the sleep
/// would have failed.
fn dry_run_power(dir: &std::path::Path, transition_s: f64) -> Result<Power> {
    Ok(Power {
        profile: Some(quick_suspend_profile(dir, transition_s)?),
        journal: Some(dir.join("knobs.json")),
        dry_run: true,
        node_sleep: Some(NodeSleep {
            sleep: vec!["false".into()],
            wake: vec!["false".into()],
            after: "200ms".into(),
        }),
        ..Power::default()
    })
}

#[test]
fn redis_is_frozen_for_short_gaps_thawed_by_a_request_and_snapshotted_when_that_pays() -> Result<()>
{
    let _g = serial();
    let (port, backend) = (own_addr(), own_addr());
    let dir = tempfile::tempdir()?;
    // Suspend and resume of 1 s each: node sleep pays after about 3 s of predicted quiet.
    let mut kv = Service::redis("kv", port, backend, dir.path()).idle("200ms");
    kv.policy.governor = Some("energy".into());
    let mut cfg = embedded().namespace("governortest").services([kv]);
    cfg.power = Some(dry_run_power(dir.path(), 1.0)?);
    let up = Up::launch(cfg)?;
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
    // Left alone, its quiet is soon predicted past the node's break-even (as long again as it
    // has been idle, with no longer gap in its history): its snapshot lets the node sleep,
    // and that pays; a request restores it with its data.
    let s = up.wait_state("kv", "asleep", Duration::from_secs(90))?;
    assert_eq!(s["last_choice"]["level"], "snapshotted", "{s}");
    assert_eq!(redis_command(port, &["GET", "k"])?, "v");
    let s = up.service("kv")?;
    assert_eq!(s["cold_starts"], 0, "{s}");
    assert!(s["wakes"].as_u64() >= Some(1), "{s}");
    Ok(())
}

/// A sample HTTP service holding `memory`, asleep only when something other than its idle
/// threshold (an hour) puts it there; restored eagerly, so that a wake brings all of its
/// memory back (a lazy one holds only what it touches).
fn sample(name: &str, memory: &str) -> (Service, std::net::SocketAddr) {
    let (port, backend) = (own_addr(), own_addr());
    let mut service = Service::sample(name, port, backend, memory).idle("1h");
    service.restore = Some("eager".into());
    (service, port)
}

fn budget_snapshots(up: &Up, name: &str) -> Result<usize> {
    Ok(up.doc()?["transitions"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter(|t| t["service"] == name && t["to"] == "draining")
                .filter(|t| t["detail"].as_str().unwrap_or("").contains("memory budget"))
                .count()
        })
        .unwrap_or(0))
}

#[test]
fn past_the_memory_budget_the_coldest_idle_service_is_snapshotted_and_wakes_on_demand() -> Result<()>
{
    let _g = serial();
    let (a, a_port) = sample("a", "48MiB");
    let (b, b_port) = sample("b", "48MiB");
    // Two services of ~50 MiB each, room for one.
    let mut cfg = embedded().services([a, b]);
    cfg.node = Some(Node {
        namespace: Some("budgettest".into()),
        memory_budget: Some("80MiB".into()),
        ..Node::default()
    });
    let up = Up::launch(cfg)?;
    let asleep = |s: &serde_json::Value| s["state"] == "asleep";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let first = loop {
        if asleep(&up.service("a")?) {
            break "a";
        }
        if asleep(&up.service("b")?) {
            break "b";
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "nothing was snapshotted past the budget:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let (second, first_port) = if first == "a" {
        ("b", a_port)
    } else {
        ("a", b_port)
    };
    assert_eq!(budget_snapshots(&up, first)?, 1, "{}", up.log_text());
    assert_eq!(up.service(second)?["state"], "awake", "one fits the budget");
    // A request for the snapshotted one restores it; now the other is the colder one and
    // makes room.
    http_get(first_port, "/count")?;
    let s = up.wait_state(second, "asleep", Duration::from_secs(60))?;
    assert_eq!(budget_snapshots(&up, second)?, 1, "{s}");
    let s = up.service(first)?;
    assert_eq!(s["state"], "awake", "{s}");
    assert_eq!(s["cold_starts"], 0, "restored, not started afresh: {s}");
    Ok(())
}

#[test]
fn a_dry_run_node_sleep_is_credited_once_every_service_sleeps() -> Result<()> {
    let _g = serial();
    let dir = tempfile::tempdir()?;
    let (svc, port) = sample("web", "8MiB");
    let mut cfg = embedded()
        .namespace("drysleeptest")
        .services([svc.idle("200ms")]);
    cfg.power = Some(dry_run_power(dir.path(), 0.05)?);
    let up = Up::launch(cfg)?;
    up.wait_state("web", "asleep", Duration::from_secs(30))?;
    // Every service asleep, its quiet predicted past the (quick) node's break-even: the node
    // would sleep, and the account prices that time at the profile's suspend power, labelled
    // a dry run (the hooks are `false`: had one run, the sleep would have failed).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let energy = loop {
        let e = up.doc()?["energy"].clone();
        if e["node_asleep_dry_run_s"].as_f64() > Some(1.0) {
            break e;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no dry-run node sleep credited: {e}\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        energy["node_asleep_s"], energy["node_asleep_dry_run_s"],
        "{energy}"
    );
    // A request ends the node's sleep and is answered.
    http_get(port, "/count")?;
    Ok(())
}

/// One RESP command on an open connection, its one-line answer.
fn ask(conn: &mut std::net::TcpStream, command: &str) -> Result<String> {
    use std::io::{BufRead, Write};
    let mut line = format!("*1\r\n${}\r\n{command}\r\n", command.len()).into_bytes();
    conn.write_all(&line)?;
    line.clear();
    std::io::BufReader::new(conn).read_until(b'\n', &mut line)?;
    Ok(String::from_utf8(line)?.trim_end().to_string())
}

#[test]
fn a_kernel_steered_redis_is_not_frozen_under_an_open_connection_and_is_once_it_closes(
) -> Result<()> {
    let _g = serial();
    let (port, backend) = (own_addr(), own_addr());
    let dir = tempfile::tempdir()?;
    let mut kv = Service::redis("kv", port, backend, dir.path())
        .idle("200ms")
        .steering("kernel");
    kv.policy.governor = Some("energy".into());
    let up = Up::launch(embedded().namespace("steerfreeze").services([kv]))?;
    // A client's connection straight to redis (steered in the kernel, past the gate), quiet
    // after its first command: a request on it later would wait in a frozen process with
    // nothing to thaw it, so the governor's freeze waits.
    let mut conn = std::net::TcpStream::connect(port)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    assert_eq!(ask(&mut conn, "PING")?, "+PONG");
    let s = up.wait_for("kv", "a freeze chosen", Duration::from_secs(30), |s| {
        s["last_choice"]["level"] == "frozen" && s["steered_open"].as_u64() >= Some(1)
    })?;
    assert_eq!(s["state"], "awake", "{s}");
    assert_eq!(s["freezes"], 0, "{s}");
    assert_eq!(s["steered_now"], true, "{s}");
    assert_eq!(
        ask(&mut conn, "PING")?,
        "+PONG",
        "answered on the open connection"
    );
    // Closed, the next look finds none open, and the freeze goes ahead; a new connection
    // reaches the gate, which thaws it.
    drop(conn);
    let s = up.wait_state("kv", "frozen", Duration::from_secs(30))?;
    assert_eq!(s["steered_now"], false, "{s}");
    assert_eq!(redis_command(port, &["PING"])?, "+PONG");
    assert_eq!(up.service("kv")?["last_wake"]["how"], "thaw");
    Ok(())
}
