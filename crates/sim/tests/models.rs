//! The simulator against queueing theory: an M/M/1 server's idle fraction and idle period, and
//! PowerNap's analytic mean power (Meisner, Gold, Wenisch, ASPLOS 2009); and its determinism.

use torpor_sim::{simulate, SimConfig, SimReport};

fn mm1(seed: u64) -> SimConfig {
    SimConfig::from_toml(&format!(
        r#"
seed = {seed}
duration = "400000s"
policy = "always-on"
[[node]]
name = "server"
count = 1
profile = "icx-2s"
cores = 1
[[service]]
name = "queue"
footprint = "64MiB"
arrival = {{ kind = "poisson", rate_per_s = 0.5 }}
service_time = {{ kind = "exponential", mean_ms = 1000.0 }}
nodes = "server"
"#
    ))
    .unwrap()
}

#[test]
fn mm1_idle_fraction_and_idle_period_match_theory() {
    let r = simulate(&mm1(1));
    let g = &r.node_groups[0];
    // ρ = λ/μ = 0.5: idle 1 − ρ of the time, in periods of mean 1/λ = 2 s.
    assert!(
        (g.idle_fraction - 0.5).abs() <= 0.005,
        "idle fraction {}",
        g.idle_fraction
    );
    assert!(
        (g.mean_idle_period_s - 2.0).abs() <= 0.02,
        "mean idle period {}",
        g.mean_idle_period_s
    );
    assert!(r.requests > 150_000, "{}", r.requests);
}

/// A one-core server: 250 W busy or in transition, 10 W napping, 10 ms transitions.
const PROFILE: &str = r#"
name = "powernap-blade"
description = "one-core server with PowerNap's two power levels"
sources = ["Meisner, Gold, Wenisch: PowerNap, ASPLOS 2009 (the model, not the figures)"]
packages = 1
cores_per_package = 1
platform_watts = 0.0
[core]
active_watts = 150.0
[[idle_state]]
name = "C1"
exit_latency_us = 0
target_residency_us = 0
core_watts = 0.0
[package]
c6_floor_watts = 100.0
pc6_watts = 100.0
[dram]
idle_watts = 0.0
watts_per_gib = 0.0
[node]
suspend_watts = 10.0
suspend_entry_s = 0.01
resume_s = 0.01
off_watts = 5.0
off_entry_s = 1.0
boot_s = 60.0
"#;

/// Mean power of an M/M/1 server that naps whenever idle: each cycle is an entry transition,
/// a nap until the first arrival (none if it came during the entry), a wake transition, and a
/// busy period that clears the work found (the first job and those that came while waiting).
fn powernap_analytic(lambda: f64, mu: f64, tt: f64, p_max: f64, p_nap: f64) -> f64 {
    let rho = lambda / mu;
    let nap = (-lambda * tt).exp() / lambda;
    let wait_after_arrival = 2.0 * tt - (1.0 - (-lambda * tt).exp()) / lambda;
    let work = (1.0 + lambda * wait_after_arrival) / mu;
    let busy = work / (1.0 - rho);
    let cycle = 2.0 * tt + nap + busy;
    (p_nap * nap + p_max * (2.0 * tt + busy)) / cycle
}

#[test]
fn powernap_matches_the_analytic_mean_power() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("blade.toml");
    std::fs::write(&profile, PROFILE).unwrap();
    let cfg = SimConfig::from_toml(&format!(
        r#"
duration = "20000s"
policy = "powernap"
[[node]]
name = "blade"
count = 1
profile = "{}"
[[service]]
name = "web"
footprint = "0B"
arrival = {{ kind = "poisson", rate_per_s = 10.0 }}
service_time = {{ kind = "exponential", mean_ms = 20.0 }}
nodes = "blade"
"#,
        profile.display()
    ))
    .unwrap();
    let r = simulate(&cfg);
    let want = powernap_analytic(10.0, 50.0, 0.01, 250.0, 10.0);
    let got = r.mean_power_w;
    assert!(
        (got - want).abs() / want < 0.02,
        "simulated {got:.2} W, analytic {want:.2} W"
    );
    assert!(
        r.node_sleeps > 50_000,
        "it napped between requests: {}",
        r.node_sleeps
    );
}

fn comparable(r: &SimReport) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap();
    v["wall_s"] = 0.into();
    v["events_per_s"] = 0.into();
    v
}

fn cluster(seed: u64) -> SimConfig {
    SimConfig::from_toml(&format!(
        r#"
seed = {seed}
duration = "2h"
policy = "seed-table"
idle_threshold = "30s"
node_sleep_after = "60s"
[[node]]
name = "small"
count = 20
profile = "generic"
cores = 8
[[service]]
name = "bursty"
count = 200
footprint = "512MiB"
arrival = {{ kind = "on_off", burst_rate_per_s = 2.0, on = {{ kind = "exponential", mean_s = 20.0 }}, off = {{ kind = "exponential", mean_s = 600.0 }} }}
service_time = {{ kind = "lognormal", mean_ms = 15.0, cv = 1.5 }}
nodes = "small"
"#
    ))
    .unwrap()
}

#[test]
fn same_seed_same_answer_and_other_seeds_agree_statistically() {
    let a = simulate(&cluster(7));
    let b = simulate(&cluster(7));
    assert_eq!(comparable(&a), comparable(&b));
    let c = simulate(&cluster(8));
    assert_ne!(comparable(&a), comparable(&c));
    let rel = |x: f64, y: f64| (x - y).abs() / y;
    assert!(
        rel(c.mean_power_w, a.mean_power_w) < 0.05,
        "{} vs {} W",
        c.mean_power_w,
        a.mean_power_w
    );
    assert!(
        rel(c.requests as f64, a.requests as f64) < 0.1,
        "{} vs {}",
        c.requests,
        a.requests
    );
    assert!(a.checkpoints > 0 && a.node_sleeps > 0, "{a:#?}");
}

#[test]
fn config_errors_name_the_key() {
    let base = cluster(1);
    assert_eq!(base.services.len(), 1);
    for (edit, key) in [
        (("nodes = \"small\"", "nodes = \"big\""), "service[0].nodes"),
        (
            ("profile = \"generic\"", "profile = \"nope\""),
            "node[0].profile",
        ),
        (
            ("idle_threshold = \"30s\"", "idle_threshold = \"soon\""),
            "idle_threshold",
        ),
        (
            ("footprint = \"512MiB\"", "footprint = \"lots\""),
            "service[0].footprint",
        ),
    ] {
        let text = cluster_text().replace(edit.0, edit.1);
        let e = SimConfig::from_toml(&text).unwrap_err().to_string();
        assert!(e.starts_with(key), "{e}");
    }
    let e = SimConfig::from_toml(&cluster_text().replace("seed = 1", "seed = 1\ncolour = 2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("colour"), "{e}");
}

fn cluster_text() -> String {
    r#"
seed = 1
duration = "2h"
policy = "seed-table"
idle_threshold = "30s"
[[node]]
name = "small"
count = 2
profile = "generic"
[[service]]
name = "s"
footprint = "512MiB"
arrival = { kind = "poisson", rate_per_s = 1.0 }
service_time = { kind = "constant", ms = 5.0 }
nodes = "small"
"#
    .to_string()
}

/// Ten small nodes, each with one steady service (never idle long enough to sleep) and a few
/// rarely invoked ones: with local snapshots every node keeps a steady service and stays up.
fn fleet(restore: &str, seed: u64) -> SimConfig {
    SimConfig::from_toml(&format!(
        r#"
seed = {seed}
duration = "2h"
policy = "predictor"
idle_threshold = "30s"
node_sleep_after = "60s"
restore = "{restore}"
consolidate_every = "60s"
[[node]]
name = "small"
count = 10
profile = "generic"
cores = 8
memory = "8GiB"
[[service]]
name = "steady"
count = 10
footprint = "256MiB"
arrival = {{ kind = "poisson", rate_per_s = 0.5 }}
service_time = {{ kind = "exponential", mean_ms = 10.0 }}
nodes = "small"
[[service]]
name = "rare"
count = 40
footprint = "512MiB"
arrival = {{ kind = "on_off", burst_rate_per_s = 1.0, on = {{ kind = "exponential", mean_s = 10.0 }}, off = {{ kind = "exponential", mean_s = 900.0 }} }}
service_time = {{ kind = "exponential", mean_ms = 20.0 }}
nodes = "small"
"#
    ))
    .unwrap()
}

#[test]
fn restore_anywhere_is_deterministic_and_lets_more_nodes_sleep_than_in_place() {
    let anywhere = simulate(&fleet("anywhere", 3));
    assert_eq!(
        comparable(&anywhere),
        comparable(&simulate(&fleet("anywhere", 3)))
    );
    let in_place = simulate(&fleet("in-place", 3));
    let asleep = |r: &SimReport| r.node_groups[0].asleep_fraction;
    assert_eq!(in_place.restore, "in-place");
    assert_eq!(in_place.migrations, 0);
    assert!(
        asleep(&anywhere) > asleep(&in_place) + 0.3,
        "anywhere {:.3} vs in place {:.3} of node time asleep",
        asleep(&anywhere),
        asleep(&in_place)
    );
    assert!(anywhere.migrations > 0, "{anywhere:#?}");
    assert!(
        anywhere.energy_j < in_place.energy_j,
        "anywhere {:.0} J vs in place {:.0} J",
        anywhere.energy_j,
        in_place.energy_j
    );
    assert_eq!(
        anywhere.requests, in_place.requests,
        "the same arrivals, every request served"
    );
}
