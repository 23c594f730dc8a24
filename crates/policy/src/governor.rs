//! The governor: which idle level an idle service should be in, chosen the way cpuidle's
//! menu and teo governors choose a C-state.
//!
//! A service has three levels: **awake**; **frozen** (its cgroup frozen: timers and
//! wakeups stop, its memory stays, a thaw takes about a millisecond); **snapshotted** (its
//! memory in the pool, freed on the node, which may then sleep). Each deeper level saves
//! more power while the service is in it but costs energy to enter and leave (a freeze and
//! thaw, or a checkpoint and restore) and makes the next request wait for its exit. A level
//! pays when the idle period outlasts its *target residency*: the time at which what it
//! saved equals what its cycle cost. The governor predicts how much longer the idle period
//! goes on from the service's inter-arrival history, conditioned on how long it has already
//! been idle, and, of the levels whose exit latency fits the service's wake objective, picks
//! the one that saves the most energy net of its cycle over that prediction: a deeper level
//! is chosen once the idle period passes its break-even *against the shallower one* (a
//! snapshot that saves only a little more than a freeze must wait far longer to pay for its
//! far dearer cycle). A level whose expected saving is not positive is never chosen (*do no
//! harm*): a service that costs nothing while idle, with no node sleep in reach, is never
//! snapshotted.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{arrivals::ArrivalTracker, PolicyConfig};

/// Where an idle service rests, shallowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Awake,
    Frozen,
    Snapshotted,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Awake => "awake",
            Level::Frozen => "frozen",
            Level::Snapshotted => "snapshotted",
        }
    }
}

/// What the node's power costs, to turn measured CPU time, wakeups and memory into watts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EnergyModel {
    /// Power of one busy CPU above a deeply idle one (W).
    pub watts_per_busy_cpu: f64,
    /// Energy of one wakeup of an otherwise idle core: the core leaves its deepest state and
    /// cannot return to it for the state's target residency (J).
    pub joules_per_wakeup: f64,
    /// Power of a GiB of memory that a snapshot frees on the node (W per GiB); zero where
    /// freed memory is not powered down or given to other work.
    pub watts_per_gib: f64,
}

impl Default for EnergyModel {
    /// Figures of a current two-socket server (the `icx-2s` profile's order of magnitude):
    /// a busy core 4 W above deep idle, a wakeup 0.2 mJ, memory not credited.
    fn default() -> Self {
        EnergyModel {
            watts_per_busy_cpu: 4.0,
            joules_per_wakeup: 2e-4,
            watts_per_gib: 0.0,
        }
    }
}

/// What a service costs while it is awake and idle: measured from its cgroup while no
/// request is in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct IdleCost {
    /// CPUs it keeps busy (CPU-seconds per second).
    pub cpus: f64,
    /// Times per second one of its threads wakes up (timers, GC, heartbeats).
    pub wakeups_per_s: f64,
    /// Resident memory.
    pub resident_bytes: u64,
    /// CPUs torpor itself spends watching the service while it is awake and idle (reading
    /// its processes' counters on every look), beyond what it spends on it at rest: part of
    /// what keeping it awake costs the node, saved at every deeper level.
    pub watch_cpus: f64,
    /// Wakeups per second of torpor's looks at the awake service beyond those at rest.
    pub watch_wakeups_per_s: f64,
}

/// The cost of one trip to a level and back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CycleCost {
    /// CPU-seconds of entering and leaving it once (torpor, CRIU and the pool for a
    /// snapshot; the cgroup freezer for a freeze).
    pub cpu_s: f64,
    /// How long a request that finds the service there waits for it to be back.
    pub exit_latency: Duration,
}

/// Savings below this are the rounding of moving averages of nothing (an idle service whose
/// measured cost decayed to 1e-30 W), not a level that pays after 10^30 s.
const MIN_SAVING_W: f64 = 1e-6;

/// One level's break-even, as `torpor status` and the break-even table show it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LevelCost {
    pub level: Level,
    /// Energy of one entry and exit (J).
    pub entry_j: f64,
    /// Power saved against staying awake while in the level (W).
    pub saving_w: f64,
    pub exit_latency_s: f64,
    /// Idle time after which the level has paid for its cycle; `None` when it never does.
    pub target_residency_s: Option<f64>,
}

impl LevelCost {
    fn new(level: Level, cycle: &CycleCost, saving_w: f64, model: &EnergyModel) -> LevelCost {
        let entry_j = cycle.cpu_s * model.watts_per_busy_cpu;
        LevelCost {
            level,
            entry_j,
            saving_w,
            exit_latency_s: cycle.exit_latency.as_secs_f64(),
            target_residency_s: (saving_w >= MIN_SAVING_W).then(|| entry_j / saving_w),
        }
    }

    /// Joules saved by resting here for `idle`, net of the cycle.
    pub fn net_saving_j(&self, idle: Duration) -> f64 {
        self.saving_w * idle.as_secs_f64() - self.entry_j
    }
}

/// Everything the governor weighs for one service.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LevelInputs {
    pub idle: IdleCost,
    pub freeze: CycleCost,
    pub snapshot: CycleCost,
    /// Power the node saves by sleeping, credited to a snapshot only when every other
    /// service of the node is already snapshotted (its sleep is then what lets the node
    /// sleep); zero otherwise or where no node sleep is configured (W).
    pub node_sleep_w: f64,
}

/// The break-even of the frozen and snapshotted levels for one service.
pub fn level_costs(inputs: &LevelInputs, model: &EnergyModel) -> [LevelCost; 2] {
    let idle = &inputs.idle;
    let idle_w = (idle.cpus + idle.watch_cpus) * model.watts_per_busy_cpu
        + (idle.wakeups_per_s + idle.watch_wakeups_per_s) * model.joules_per_wakeup;
    let memory_w = inputs.idle.resident_bytes as f64 / (1u64 << 30) as f64 * model.watts_per_gib;
    [
        LevelCost::new(Level::Frozen, &inputs.freeze, idle_w, model),
        LevelCost::new(
            Level::Snapshotted,
            &inputs.snapshot,
            idle_w + memory_w + inputs.node_sleep_w,
            model,
        ),
    ]
}

/// Why the governor picked what it picked.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "because")]
pub enum Reason {
    /// Idle for less than the idle threshold.
    RecentlyBusy,
    /// No level's exit fits the wake objective.
    WakeTooSlow,
    /// No level saves energy over the predicted idle period.
    DoesNotPay,
    /// The level that saves the most over the predicted idle period, net of its cycle.
    Pays {
        predicted_idle_s: f64,
        net_saving_j: f64,
    },
}

/// The governor's choice for an idle service now.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub level: Level,
    pub reason: Reason,
}

/// Quantile of the remaining idle time the governor plans with: the median, so a level is
/// entered when it pays in at least half of comparable idle periods.
const REMAINING_QUANTILE: f64 = 0.5;

/// How much longer the current idle period is expected to last, from the service's gaps
/// that were at least this long; without such a history, as long again as it has lasted
/// (an idle period's expected remainder grows with its age for heavy-tailed gaps, and this
/// is the conservative end of that).
pub fn predicted_idle(arrivals: &ArrivalTracker, now: Duration) -> Duration {
    let elapsed = arrivals.idle_for(now);
    match arrivals
        .histogram()
        .remaining_after(elapsed, REMAINING_QUANTILE)
    {
        Some((left, _)) => left,
        None => elapsed,
    }
}

/// Picks the level for a service that has no request in flight at `now`. The snapshot level
/// also needs the arrival rate under `max_sleep_rate` (a high rate means the gap will not
/// last, whatever the histogram says) and the footprint within what the pool takes.
pub fn choose_level(
    cfg: &PolicyConfig,
    arrivals: &mut ArrivalTracker,
    now: Duration,
    inputs: &LevelInputs,
    model: &EnergyModel,
) -> Choice {
    if arrivals.idle_for(now) < cfg.idle_threshold {
        return Choice {
            level: Level::Awake,
            reason: Reason::RecentlyBusy,
        };
    }
    let predicted = predicted_idle(arrivals, now);
    let rate_ok = arrivals.rate(now) < cfg.max_sleep_rate;
    let fits = |c: &LevelCost| {
        cfg.wake_objective
            .is_none_or(|o| c.exit_latency_s <= o.as_secs_f64())
    };
    let costs = level_costs(inputs, model);
    let mut any_fits = false;
    let mut best: Option<(f64, Level)> = None;
    // Deepest first, so that a tie goes to the deeper level.
    for c in costs.iter().rev() {
        if c.level == Level::Snapshotted && !rate_ok {
            continue;
        }
        if !fits(c) {
            continue;
        }
        any_fits = true;
        let net = c.net_saving_j(predicted);
        if c.target_residency_s.is_some() && net > 0.0 && best.is_none_or(|(b, _)| net > b) {
            best = Some((net, c.level));
        }
    }
    if let Some((net_saving_j, level)) = best {
        return Choice {
            level,
            reason: Reason::Pays {
                predicted_idle_s: predicted.as_secs_f64(),
                net_saving_j,
            },
        };
    }
    Choice {
        level: Level::Awake,
        reason: if any_fits {
            Reason::DoesNotPay
        } else {
            Reason::WakeTooSlow
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            idle_threshold: 200 * MS,
            ..PolicyConfig::default()
        }
    }

    /// A service with a 100 Hz timer (a Go or JVM runtime), 64 MiB resident: a freeze costs
    /// 2 ms of CPU, a snapshot cycle 0.2 CPU-s.
    fn timer_service(node_sleep_w: f64) -> LevelInputs {
        LevelInputs {
            idle: IdleCost {
                cpus: 0.01,
                wakeups_per_s: 100.0,
                resident_bytes: 64 << 20,
                ..IdleCost::default()
            },
            freeze: CycleCost {
                cpu_s: 0.002,
                exit_latency: MS,
            },
            snapshot: CycleCost {
                cpu_s: 0.2,
                exit_latency: 40 * MS,
            },
            node_sleep_w,
        }
    }

    /// Virtual time: arrivals with the given gaps, then idle.
    fn history(gaps: &[Duration]) -> (ArrivalTracker, Duration) {
        let mut t = ArrivalTracker::new(Duration::ZERO, 10 * S);
        let mut now = S;
        t.record(now);
        for g in gaps {
            now += *g;
            t.record(now);
        }
        (t, now)
    }

    #[test]
    fn a_saving_of_rounding_noise_never_pays() {
        let mut inputs = timer_service(0.0);
        inputs.idle.cpus = 1e-33;
        inputs.idle.wakeups_per_s = 0.0;
        let [frozen, _] = level_costs(&inputs, &EnergyModel::default());
        assert!(frozen.saving_w > 0.0);
        assert_eq!(frozen.target_residency_s, None, "{frozen:?}");
    }

    #[test]
    fn target_residency_is_the_cycle_energy_over_the_power_saved() {
        let model = EnergyModel::default();
        let [frozen, snap] = level_costs(&timer_service(0.0), &model);
        // 0.01 CPUs × 4 W + 100/s × 0.2 mJ = 0.06 W saved in either level.
        assert!((frozen.saving_w - 0.06).abs() < 1e-9);
        assert!((frozen.entry_j - 0.008).abs() < 1e-9);
        assert!((frozen.target_residency_s.unwrap() - 0.008 / 0.06).abs() < 1e-9);
        assert!((snap.target_residency_s.unwrap() - 0.8 / 0.06).abs() < 1e-9);
    }

    #[test]
    fn a_service_with_background_wakeups_is_frozen_for_short_gaps_and_snapshotted_for_long_ones() {
        // Memory priced as DRAM (0.1 W/GiB, icx-2s): the snapshot saves the freeze's 0.06 W
        // and 6.25 mW more for 64 MiB, so it beats the freeze once its 0.79 J dearer cycle
        // is paid back by those 6.25 mW: after about 127 s.
        let model = EnergyModel {
            watts_per_gib: 0.1,
            ..EnergyModel::default()
        };
        let inputs = timer_service(0.0);
        // Gaps of about 2 s: a freeze pays after 0.13 s; a snapshot would pay against
        // staying awake after 13 s, but never against the freeze.
        let (mut t, last) = history(&[2 * S; 20]);
        let c = choose_level(&cfg(), &mut t, last + 300 * MS, &inputs, &model);
        assert_eq!(c.level, Level::Frozen, "{c:?}");
        // Gaps of a minute: the snapshot pays against staying awake, not against the freeze.
        let (mut t, last) = history(&[60 * S; 20]);
        let c = choose_level(&cfg(), &mut t, last + 300 * MS, &inputs, &model);
        assert_eq!(c.level, Level::Frozen, "{c:?}");
        // Gaps of ten minutes: the snapshot beats the freeze.
        let (mut t, last) = history(&[600 * S; 20]);
        let c = choose_level(&cfg(), &mut t, last + 300 * MS, &inputs, &model);
        assert_eq!(c.level, Level::Snapshotted, "{c:?}");
        // Mixed gaps: right after a request the short ones dominate (freeze); once idle
        // longer than every short gap, only the long ones remain (snapshot).
        let mut gaps = vec![S; 30];
        gaps.extend([1200 * S; 10]);
        let (mut t, last) = history(&gaps);
        let c = choose_level(&cfg(), &mut t, last + 300 * MS, &inputs, &model);
        assert_eq!(c.level, Level::Frozen, "{c:?}");
        let c = choose_level(&cfg(), &mut t, last + 3 * S, &inputs, &model);
        assert_eq!(c.level, Level::Snapshotted, "{c:?}");
        // Without memory priced, a snapshot never saves more than the freeze: frozen it stays.
        let c = choose_level(
            &cfg(),
            &mut t,
            last + 3 * S,
            &inputs,
            &EnergyModel::default(),
        );
        assert_eq!(c.level, Level::Frozen, "{c:?}");
    }

    #[test]
    fn a_service_that_costs_nothing_while_idle_is_never_snapshotted_without_node_sleep() {
        let model = EnergyModel::default();
        let inputs = LevelInputs {
            idle: IdleCost {
                resident_bytes: 1 << 30,
                ..IdleCost::default()
            },
            ..timer_service(0.0)
        };
        for gap in [S, 60 * S, 3600 * S] {
            let (mut t, last) = history(&[gap; 20]);
            let c = choose_level(&cfg(), &mut t, last + gap / 2, &inputs, &model);
            assert_eq!(c.level, Level::Awake, "gap {gap:?}: {c:?}");
            assert_eq!(c.reason, Reason::DoesNotPay);
        }
        // With the node's sleep in reach (every other service already snapshotted), the
        // same service is snapshotted for long gaps.
        let inputs = LevelInputs {
            node_sleep_w: 50.0,
            ..inputs
        };
        let (mut t, last) = history(&[60 * S; 20]);
        let c = choose_level(&cfg(), &mut t, last + S, &inputs, &model);
        assert_eq!(c.level, Level::Snapshotted, "{c:?}");
    }

    #[test]
    fn what_watching_an_awake_service_costs_is_saved_by_a_freeze_and_no_more_by_a_snapshot() {
        let model = EnergyModel::default();
        // A service that costs nothing itself, and torpor's looks at it while it is awake:
        // 0.1 % of a CPU and 3 wakeups a second beyond its looks at rest.
        let inputs = LevelInputs {
            idle: IdleCost {
                resident_bytes: 1 << 30,
                watch_cpus: 0.001,
                watch_wakeups_per_s: 3.0,
                ..IdleCost::default()
            },
            ..timer_service(0.0)
        };
        let [frozen, snapshotted] = level_costs(&inputs, &model);
        let watch_w = 0.001 * model.watts_per_busy_cpu + 3.0 * model.joules_per_wakeup;
        assert!((frozen.saving_w - watch_w).abs() < 1e-12, "{frozen:?}");
        // 8 mJ a freeze over 4.6 mW: it pays after about 1.7 s.
        let residency = frozen.target_residency_s.expect("a freeze pays");
        assert!((residency - 0.008 / watch_w).abs() < 1e-9, "{frozen:?}");
        // Gaps of 10 s: frozen once idle; gaps of 1 s: awake (the freeze would not pay).
        let (mut t, last) = history(&[10 * S; 20]);
        let c = choose_level(&cfg(), &mut t, last + 300 * MS, &inputs, &model);
        assert_eq!(c.level, Level::Frozen, "{c:?}");
        let (mut t, last) = history(&[S; 20]);
        let c = choose_level(&cfg(), &mut t, last + 300 * MS, &inputs, &model);
        assert_eq!(c.level, Level::Awake, "{c:?}");
        // A snapshot saves the same watching and nothing more (memory not priced, no node
        // sleep): over the freeze it never pays, however long the gaps.
        assert_eq!(snapshotted.saving_w, frozen.saving_w);
        let (mut t, last) = history(&[3600 * S; 20]);
        let c = choose_level(&cfg(), &mut t, last + S, &inputs, &model);
        assert_eq!(c.level, Level::Frozen, "{c:?}");
    }

    #[test]
    fn nothing_below_the_idle_threshold_and_only_levels_whose_exit_fits_the_objective() {
        let model = EnergyModel::default();
        let inputs = timer_service(0.0);
        let (mut t, last) = history(&[60 * S; 20]);
        let c = choose_level(&cfg(), &mut t, last + 100 * MS, &inputs, &model);
        assert_eq!(c.reason, Reason::RecentlyBusy);
        // A 10 ms objective rules the snapshot (40 ms exit) out, not the freeze (1 ms).
        let strict = PolicyConfig {
            wake_objective: Some(10 * MS),
            ..cfg()
        };
        let c = choose_level(&strict, &mut t, last + S, &inputs, &model);
        assert_eq!(c.level, Level::Frozen, "{c:?}");
        let impossible = PolicyConfig {
            wake_objective: Some(Duration::from_micros(10)),
            ..cfg()
        };
        let c = choose_level(&impossible, &mut t, last + S, &inputs, &model);
        assert_eq!(c.reason, Reason::WakeTooSlow);
    }

    #[test]
    fn a_high_arrival_rate_keeps_it_out_of_the_snapshot_level_but_not_the_freezer() {
        let model = EnergyModel::default();
        let inputs = timer_service(50.0);
        // 150 arrivals in the last 10 s.
        let (mut t, last) = history(&[60 * MS; 150]);
        let c = choose_level(&cfg(), &mut t, last + 300 * MS, &inputs, &model);
        assert_eq!(c.level, Level::Frozen, "{c:?}");
    }

    #[test]
    fn without_history_the_idle_period_is_expected_to_last_as_long_again() {
        let t = ArrivalTracker::new(Duration::ZERO, 10 * S);
        assert_eq!(predicted_idle(&t, 7 * S), 7 * S);
    }
}
