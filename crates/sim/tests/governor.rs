//! The energy governor in the simulator, on the simulator's own clock: services with timers
//! are frozen through short gaps; a service that costs nothing while idle is snapshotted only
//! when its snapshot is what lets the node sleep; and an awake idle service with timers costs
//! its node what the governor's energy model says.

use std::io::Write;

use torpor_power::Profile;
use torpor_sim::{simulate, ServiceGroupReport, SimConfig, SimReport};

/// One icx-2s node; service groups given as TOML `[[service]]` tables.
fn cluster(policy: &str, node_sleep: bool, services: &str) -> SimConfig {
    on_profile("icx-2s", policy, node_sleep, services)
}

/// icx-2s but with DRAM power that does not depend on what it holds, so a service with no
/// background CPU and no wakeups costs nothing at all while idle (on icx-2s its memory alone,
/// 0.1 W per GiB, pays for a snapshot after about 75 s).
fn flat_dram_profile() -> tempfile::NamedTempFile {
    let mut p = Profile::resolve("icx-2s").unwrap();
    p.name = "icx-2s-flat-dram".into();
    p.dram.watts_per_gib = 0.0;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(toml::to_string(&p).unwrap().as_bytes())
        .unwrap();
    f
}

fn free_cluster(profile: &tempfile::NamedTempFile, node_sleep: bool, services: &str) -> SimConfig {
    let path = profile.path().to_str().unwrap();
    on_profile(path, "governor", node_sleep, services)
}

fn on_profile(profile: &str, policy: &str, node_sleep: bool, services: &str) -> SimConfig {
    let sleep = if node_sleep {
        "node_sleep_after = \"60s\""
    } else {
        ""
    };
    SimConfig::from_toml(&format!(
        r#"
seed = 3
duration = "6h"
policy = "{policy}"
{sleep}
[[node]]
name = "n"
count = 1
profile = "{profile}"
{services}
"#
    ))
    .unwrap()
}

/// `count` services with Poisson requests (mean gap 5 s) and the given idle cost.
fn chatty(count: u32, wakeups_per_s: f64, cpus: f64) -> String {
    format!(
        r#"
[[service]]
name = "chatty"
count = {count}
footprint = "1GiB"
arrival = {{ kind = "poisson", rate_per_s = 0.2 }}
service_time = {{ kind = "exponential", mean_ms = 20.0 }}
nodes = "n"
idle_cpus = {cpus}
idle_wakeups_per_s = {wakeups_per_s}
"#
    )
}

/// A service group named `name` with a request every five minutes and the given idle cost.
fn cron(name: &str, wakeups_per_s: f64) -> String {
    format!(
        r#"
[[service]]
name = "{name}"
footprint = "128MiB"
arrival = {{ kind = "on_off", burst_rate_per_s = 1.0, on = {{ kind = "constant", s = 1.0 }}, off = {{ kind = "constant", s = 299.0 }} }}
service_time = {{ kind = "constant", ms = 200.0 }}
nodes = "n"
idle_wakeups_per_s = {wakeups_per_s}
"#
    )
}

fn group<'a>(r: &'a SimReport, name: &str) -> &'a ServiceGroupReport {
    r.service_groups.iter().find(|g| g.name == name).unwrap()
}

#[test]
fn a_service_with_a_100_hz_timer_and_short_gaps_ends_mostly_frozen() {
    let r = simulate(&cluster("governor", false, &chatty(10, 100.0, 0.002)));
    let g = group(&r, "chatty");
    // A freeze pays after about 13 ms of idleness, a 1 GiB snapshot only after about 15 s:
    // gaps of 5 s on average are spent frozen once the 0.5 s idle threshold has passed.
    assert!(g.frozen_fraction > 0.7, "{g:?}");
    assert!(g.frozen_fraction > 5.0 * g.snapshotted_fraction, "{g:?}");
    assert!(r.freezes > 1000 && r.found_frozen > 1000, "{r:?}");
    // The thaw is a millisecond: it does not show at the tail.
    assert!(r.latency.p99_ms.unwrap() < 150.0, "{:?}", r.latency);
    // The same service without timers costs nothing idle: the governor leaves it awake.
    let r = simulate(&cluster("governor", false, &chatty(10, 0.0, 0.0)));
    let g = group(&r, "chatty");
    assert_eq!((r.freezes, r.checkpoints), (0, 0), "{r:?}");
    assert_eq!(g.frozen_fraction + g.snapshotted_fraction, 0.0, "{g:?}");
}

#[test]
fn a_service_that_costs_nothing_idle_is_never_snapshotted_without_node_sleep() {
    let flat = flat_dram_profile();
    let r = simulate(&free_cluster(&flat, false, &cron("polite", 0.0)));
    assert_eq!((r.checkpoints, r.freezes), (0, 0), "{r:?}");
    // The same five-minute gaps with a 100 Hz timer: a freeze stops the timer's cost for
    // next to nothing; a snapshot would save no more (its memory is priced at nothing here),
    // so it is frozen, not snapshotted.
    let r = simulate(&free_cluster(&flat, false, &cron("timer", 100.0)));
    assert!(group(&r, "timer").frozen_fraction > 0.9, "{r:?}");
    assert_eq!(r.checkpoints, 0, "{r:?}");
    // So does the memory icx-2s's DRAM keeps powered for it.
    let r = simulate(&cluster("governor", false, &cron("polite", 0.0)));
    assert!(group(&r, "polite").snapshotted_fraction > 0.9, "{r:?}");
}

#[test]
fn a_free_service_is_snapshotted_when_its_snapshot_lets_the_node_sleep() {
    // Beside a service with timers (frozen for its own sake), the free one is idle too: with
    // both quiet past the node's sleep delay, node sleep is in reach, each is credited its
    // share of the node's saving, both are snapshotted and the node sleeps.
    let flat = flat_dram_profile();
    let services = cron("timer", 100.0) + &cron("polite", 0.0);
    let r = simulate(&free_cluster(&flat, true, &services));
    assert!(group(&r, "timer").snapshotted_fraction > 0.9, "{r:?}");
    assert!(group(&r, "polite").snapshotted_fraction > 0.9, "{r:?}");
    assert!(r.node_sleeps > 50, "{r:?}");
    // The node's only way back is a resume: the requests that end its sleeps wait for it.
    assert!(
        r.waited_for_a_node > 0 && r.waited_for_a_node <= r.found_asleep,
        "{r:?}"
    );
    // Two free services: the same, though neither costs anything on its own.
    let services = cron("polite", 0.0) + &cron("also-polite", 0.0);
    let r = simulate(&free_cluster(&flat, true, &services));
    assert!(group(&r, "also-polite").snapshotted_fraction > 0.9, "{r:?}");
    assert!(r.node_sleeps > 50, "{r:?}");
    // Without node sleep they stay awake.
    let r = simulate(&free_cluster(&flat, false, &services));
    assert_eq!((r.checkpoints, r.node_sleeps), (0, 0), "{r:?}");
    assert_eq!(r.waited_for_a_node, 0, "{r:?}");
}

#[test]
fn an_awake_idle_service_with_timers_costs_its_node_what_the_energy_model_says() {
    let with = simulate(&cluster("always-on", false, &chatty(10, 100.0, 0.002)));
    let without = simulate(&cluster("always-on", false, &chatty(10, 0.0, 0.0)));
    // icx-2s: a busy core 4.95 W above C6, a wakeup one trip into C6 and out (C1 to C1E
    // over 4 µs, C1E to C6 over 600 µs); ten services idle nearly all the time.
    let per_service_w = 0.002 * 4.95 + 100.0 * (0.7 * 4e-6 + 0.75 * 600e-6);
    let idle_w = with.idle_cost_j / with.simulated_s;
    assert!(
        idle_w > 0.98 * 10.0 * per_service_w && idle_w <= 10.0 * per_service_w,
        "{idle_w} W"
    );
    assert_eq!(without.idle_cost_j, 0.0);
    let extra = (with.energy_j - without.energy_j) / with.simulated_s;
    assert!(
        (extra - idle_w).abs() < 0.05 * idle_w,
        "{extra} W vs {idle_w} W"
    );
}
