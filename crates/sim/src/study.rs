//! The seed's research questions, answered by runs of one configuration: every policy on the same
//! cluster (Tables 7.1 and 7.2), an idle-threshold sweep (the optimal threshold), checkpoint and
//! restore latency against footprint per approach, the break-even idle period, and how close
//! prediction with pre-warm comes to the oracle; and the fleet question, local snapshots
//! (restore in place) against the pool (restore anywhere, with consolidation). The live agent's
//! energy governor runs beside the threshold policies in both, with the live agent's defaults.

use std::time::Duration;

use serde::Serialize;
use torpor_policy::PolicyConfig;

use crate::{
    config::{Approach, PolicyName, RestoreMode, SimConfig},
    engine::{simulate, SimReport},
};

/// Policies in the tables, the baseline first.
pub const POLICIES: [PolicyName; 8] = [
    PolicyName::AlwaysOn,
    PolicyName::C6Only,
    PolicyName::Powernap,
    PolicyName::FixedThreshold,
    PolicyName::SeedTable,
    PolicyName::Predictor,
    PolicyName::Governor,
    PolicyName::Oracle,
];

/// Idle thresholds swept for the first research question (seconds).
pub const THRESHOLDS_S: [f64; 8] = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0];

/// Footprints for the latency and break-even curves (GiB).
pub const FOOTPRINTS_GIB: [f64; 8] = [0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0];

/// Idle thresholds of the fleet sweep (seconds): fewer than [`THRESHOLDS_S`], each costs two runs.
pub const FLEET_THRESHOLDS_S: [f64; 4] = [5.0, 30.0, 120.0, 600.0];

/// One point of the threshold sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub idle_threshold_s: f64,
    pub mean_power_w: f64,
    pub p99_ms: Option<f64>,
}

/// Checkpoint and restore time of one footprint.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CrPoint {
    pub gib: f64,
    pub checkpoint_s: f64,
    pub restore_s: f64,
}

/// One curve: an approach (and for break-even, what the sleep is credited with).
#[derive(Debug, Clone, Serialize)]
pub struct Curve<P> {
    pub approach: &'static str,
    pub basis: &'static str,
    pub points: Vec<P>,
}

/// Everything the study found.
#[derive(Debug, Clone, Serialize)]
pub struct Study {
    pub runs: Vec<SimReport>,
    pub table_7_1: String,
    pub table_7_2: String,
    pub sweep: Vec<SweepPoint>,
    pub best_threshold_s: Option<f64>,
    /// Per approach: checkpoint and restore seconds against footprint.
    pub cr_latency: Vec<Curve<CrPoint>>,
    /// Per approach and basis: (GiB, break-even idle period s) on the first node group.
    pub break_even: Vec<Curve<(f64, f64)>>,
    /// Predictor's energy saving as a share of the oracle's (against always-on).
    pub predictor_vs_oracle: Option<f64>,
    /// The fleet question at the configuration's threshold: one run per restore mode, then
    /// the governor's, one per restore mode.
    pub fleet: Vec<SimReport>,
    pub fleet_table: String,
    /// Per restore mode: power and p99 against the idle threshold.
    pub fleet_sweep: Vec<FleetPoint>,
    /// Where each service group's time went under the governor (awake, frozen, snapshotted).
    pub levels_table: String,
}

/// One point of the fleet sweep.
#[derive(Debug, Clone, Serialize)]
pub struct FleetPoint {
    pub restore: &'static str,
    pub idle_threshold_s: f64,
    pub mean_power_w: f64,
    pub p99_ms: Option<f64>,
    /// Share of node time suspended.
    pub nodes_asleep: f64,
}

/// The threshold policy the fleet question is asked under (and its threshold swept): the
/// configuration's if it snapshots services by a threshold, else the predictor. The governor
/// is asked the question beside it.
pub fn fleet_policy(cfg: &SimConfig) -> PolicyName {
    if cfg.policy.sleeps_services() && cfg.policy != PolicyName::Governor {
        cfg.policy
    } else {
        PolicyName::Predictor
    }
}

fn with_restore(cfg: &SimConfig, policy: PolicyName, restore: RestoreMode) -> SimConfig {
    let mut c = with_policy(cfg, policy);
    c.restore = restore;
    c
}

/// Share of node time suspended, over every node of a run.
pub fn nodes_asleep(r: &SimReport) -> f64 {
    r.node_groups
        .iter()
        .map(|g| g.asleep_fraction * f64::from(g.nodes))
        .sum::<f64>()
        / f64::from(r.nodes.max(1))
}

/// How many runs [`run`] makes (for a progress bar).
pub fn run_count() -> usize {
    POLICIES.len() + THRESHOLDS_S.len() + RestoreMode::ALL.len() * (2 + FLEET_THRESHOLDS_S.len())
}

fn with_policy(cfg: &SimConfig, p: PolicyName) -> SimConfig {
    let mut c = cfg.clone();
    c.policy = p;
    if p == PolicyName::Governor {
        // As the live agent runs it: it only waits its default threshold before it looks,
        // the rest is the cost of each level against the predicted idle period.
        c.idle_threshold = PolicyConfig::default().idle_threshold;
    } else if c.idle_threshold.is_zero() {
        c.idle_threshold = Duration::from_secs(30);
    }
    c
}

/// Runs the study; `progress` hears each finished run's name.
pub fn run(cfg: &SimConfig, mut progress: impl FnMut(&str)) -> Study {
    let mut runs = Vec::new();
    for p in POLICIES {
        runs.push(simulate(&with_policy(cfg, p)));
        progress(p.as_str());
    }
    let mut sweep = Vec::new();
    for t in THRESHOLDS_S {
        let mut c = with_policy(cfg, PolicyName::FixedThreshold);
        c.idle_threshold = Duration::from_secs_f64(t);
        let r = simulate(&c);
        progress(&format!("threshold {t}s"));
        sweep.push(SweepPoint {
            idle_threshold_s: t,
            mean_power_w: r.mean_power_w,
            p99_ms: r.latency.p99_ms,
        });
    }
    // The best threshold: least power whose p99 stays within twice always-on's.
    let p99_limit = runs[0].latency.p99_ms.map(|p| 2.0 * p.max(1.0));
    let best_threshold_s = sweep
        .iter()
        .filter(|p| matches!((p.p99_ms, p99_limit), (Some(a), Some(b)) if a <= b))
        .min_by(|a, b| a.mean_power_w.total_cmp(&b.mean_power_w))
        .map(|p| p.idle_threshold_s);
    let gib = (1u64 << 30) as f64;
    let with_approach = |a: Approach| {
        let mut c = cfg.clone();
        c.approach = a;
        c
    };
    let cr_latency = Approach::ALL
        .iter()
        .map(|&a| {
            let c = with_approach(a);
            let points = FOOTPRINTS_GIB
                .iter()
                .map(|&g| {
                    let (checkpoint_s, restore_s) = c.cr_times((g * gib) as u64);
                    CrPoint {
                        gib: g,
                        checkpoint_s,
                        restore_s,
                    }
                })
                .collect();
            Curve {
                approach: a.as_str(),
                basis: "latency",
                points,
            }
        })
        .collect();
    let mut break_even = Vec::new();
    for a in Approach::ALL {
        let c = with_approach(a);
        for (basis, share) in [("memory only", false), ("with node-sleep share", true)] {
            let points = FOOTPRINTS_GIB
                .iter()
                .map(|&g| {
                    (
                        g,
                        crate::engine::break_even_s(&c, 0, (g * gib) as u64, share),
                    )
                })
                .collect();
            break_even.push(Curve {
                approach: a.as_str(),
                basis,
                points,
            });
        }
    }
    let by = |p: PolicyName| {
        runs.iter()
            .find(|r| r.policy == p.as_str())
            .map(|r| r.mean_power_w)
    };
    let predictor_vs_oracle = match (
        by(PolicyName::AlwaysOn),
        by(PolicyName::Predictor),
        by(PolicyName::Oracle),
    ) {
        (Some(base), Some(pred), Some(oracle)) if base > oracle => {
            Some((base - pred) / (base - oracle))
        }
        _ => None,
    };
    let (table_7_1, table_7_2) = tables(&runs);
    let mut fleet = Vec::new();
    let mut fleet_sweep = Vec::new();
    let policy = fleet_policy(cfg);
    for restore in RestoreMode::ALL {
        fleet.push(simulate(&with_restore(cfg, policy, restore)));
        progress(&format!("restore {}", restore.as_str()));
        for t in FLEET_THRESHOLDS_S {
            let mut c = with_restore(cfg, policy, restore);
            c.idle_threshold = Duration::from_secs_f64(t);
            let r = simulate(&c);
            progress(&format!("restore {} threshold {t}s", restore.as_str()));
            fleet_sweep.push(FleetPoint {
                restore: restore.as_str(),
                idle_threshold_s: t,
                mean_power_w: r.mean_power_w,
                p99_ms: r.latency.p99_ms,
                nodes_asleep: nodes_asleep(&r),
            });
        }
    }
    for restore in RestoreMode::ALL {
        fleet.push(simulate(&with_restore(cfg, PolicyName::Governor, restore)));
        progress(&format!("governor, restore {}", restore.as_str()));
    }
    let fleet_table = fleet_table(&fleet);
    // The fleet runs the governor once per restore mode (the policies' run is one of them).
    let levels_table = levels_table(&fleet);
    Study {
        runs,
        table_7_1,
        table_7_2,
        sweep,
        best_threshold_s,
        cr_latency,
        break_even,
        predictor_vs_oracle,
        fleet,
        fleet_table,
        fleet_sweep,
        levels_table,
    }
}

/// Where each service group's time went under the governor, per run of it: the shares of
/// service time frozen and snapshotted (the rest awake).
pub fn levels_table(runs: &[SimReport]) -> String {
    let mut t = String::from(
        "| policy | restore | service group | frozen % | snapshotted % |\n|---|---|---|---|---|\n",
    );
    for r in runs
        .iter()
        .filter(|r| r.policy == PolicyName::Governor.as_str())
    {
        for g in &r.service_groups {
            t.push_str(&format!(
                "| {} | {} | {} | {:.1} | {:.1} |\n",
                r.policy,
                r.restore,
                g.name,
                100.0 * g.frozen_fraction,
                100.0 * g.snapshotted_fraction
            ));
        }
    }
    t
}

/// `part` as a percentage of `whole` (0 when there is none).
fn percent(part: u64, whole: u64) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

/// The fleet question's table: energy, nodes asleep and latency per restore mode, each run
/// against the same policy's restore in place.
pub fn fleet_table(runs: &[SimReport]) -> String {
    let mut t = String::from("| restore | policy | energy (kWh) | vs in place | mean power (W) | nodes asleep % | p50 (ms) | p99 (ms) | p99.9 (ms) | found asleep % | waited for a node % | restores | migrations | node sleeps |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        let base = runs
            .iter()
            .find(|b| b.policy == r.policy && b.restore == RestoreMode::InPlace.as_str())
            .map_or(0.0, |b| b.energy_j);
        t.push_str(&format!(
            "| {} | {} | {:.1} | {:+.1} % | {:.0} | {:.1} | {} | {} | {} | {:.2} | {:.2} | {} | {} | {} |\n",
            r.restore,
            r.policy,
            r.energy_j / 3.6e6,
            if base > 0.0 {
                100.0 * (r.energy_j - base) / base
            } else {
                0.0
            },
            r.mean_power_w,
            100.0 * nodes_asleep(r),
            ms(r.latency.p50_ms),
            ms(r.latency.p99_ms),
            ms(r.latency.p999_ms),
            percent(r.found_asleep, r.requests),
            percent(r.waited_for_a_node, r.requests),
            r.restores,
            r.migrations,
            r.node_sleeps
        ));
    }
    t
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

/// Tables shaped like the seed's 7.1 (power reduction) and 7.2 (latency impact).
pub fn tables(runs: &[SimReport]) -> (String, String) {
    let base = runs.first().map_or(0.0, |r| r.mean_power_w);
    let mut t1 = String::from("| policy | mean power (W) | reduction vs always-on | nodes asleep % | events | events/s | energy (kWh) | of it awake idle cost (kWh) |\n|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        let asleep = nodes_asleep(r);
        t1.push_str(&format!(
            "| {} | {:.0} | {:.1} % | {:.1} | {} | {:.2e} | {:.1} | {:.2} |\n",
            r.policy,
            r.mean_power_w,
            if base > 0.0 {
                100.0 * (base - r.mean_power_w) / base
            } else {
                0.0
            },
            100.0 * asleep,
            r.events,
            r.events_per_s,
            r.energy_j / 3.6e6,
            r.idle_cost_j / 3.6e6
        ));
    }
    let mut t2 = String::from("| policy | requests | found asleep % | p50 (ms) | p99 (ms) | p99.9 (ms) | checkpoints | restores | node sleeps | freezes | found frozen % |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        t2.push_str(&format!(
            "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {:.2} |\n",
            r.policy,
            r.requests,
            percent(r.found_asleep, r.requests),
            ms(r.latency.p50_ms),
            ms(r.latency.p99_ms),
            ms(r.latency.p999_ms),
            r.checkpoints,
            r.restores,
            r.node_sleeps,
            r.freezes,
            percent(r.found_frozen, r.requests)
        ));
    }
    (t1, t2)
}
