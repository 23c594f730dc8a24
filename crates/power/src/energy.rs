//! The energy account of a node: power integrated over time from telemetry (RAPL where present,
//! else the model), attributed to services by their CPU time, to torpor's own work (agent, gate,
//! pool, CRIU) and to idle, beside the always-on counterfactual for the same interval: the same
//! service work with nothing asleep (every service's memory resident), no torpor work, and
//! shallow idle only (no deep core states, no package C6, no node sleep). A second counterfactual
//! keeps the measured deep idle and only takes torpor away (always on, C-states as they were), so
//! what snapshotting itself saves or costs is not hidden inside what the C-states save.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    model::{reachable_pc6, CoreResidency, Model},
    profile::Profile,
    rapl::ZoneKind,
    telemetry::{modelled_cores, PowerSource, Sample},
};

const GIB: f64 = (1u64 << 30) as f64;

/// Most points kept in the power history (an hour at one per second).
const HISTORY: usize = 3600;

/// What one service did over an interval.
#[derive(Debug, Clone)]
pub struct ServiceUsage {
    pub name: String,
    /// CPU seconds its processes used in the interval.
    pub cpu_s: f64,
    /// Memory it holds on this node now (0 while asleep).
    pub resident_bytes: u64,
    /// Its footprint when awake: what the always-on node would hold.
    pub footprint_bytes: u64,
}

/// What the agent knows about an interval besides the counters.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    pub services: Vec<ServiceUsage>,
    /// CPU seconds of torpor's own work (agent, gate, embedded pool, CRIU) in the interval.
    pub torpor_cpu_s: f64,
    /// The node sleep hook had put the node to sleep (or would have: see
    /// `node_asleep_dry_run`), so the interval is priced at the profile's suspend power.
    pub node_asleep: bool,
    /// The node sleep was a dry run: the hook was not run and the suspend power credited is
    /// what it would have drawn (modelled, as a real suspend's is too).
    pub node_asleep_dry_run: bool,
    /// Node sleeps that began in the interval: each is charged its entry
    /// ([`crate::NodeSleepEconomics::entry_j`]), which the suspend power does not cover.
    pub node_sleeps: u32,
    /// Node sleeps that ended in the interval: each is charged its resume
    /// ([`crate::NodeSleepEconomics::resume_j`]). Each transition is charged when it happens,
    /// so an account that covers only part of a sleep pays for the part it covers.
    pub node_resumes: u32,
    /// Every service was asleep.
    pub all_asleep: bool,
}

/// One service's share.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceEnergy {
    pub cpu_s: f64,
    pub energy_j: f64,
}

/// One point of the power history.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PowerPoint {
    /// Seconds since the account started.
    pub t_s: f64,
    pub power_w: f64,
    pub counterfactual_w: f64,
}

/// The account so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnergyReport {
    pub source: PowerSource,
    /// `measured (RAPL)` or `modelled (profile NAME)`.
    pub label: String,
    /// What the figures cover.
    pub scope: String,
    pub seconds: f64,
    pub energy_j: f64,
    pub counterfactual_j: f64,
    pub saving_j: f64,
    pub saving_pct: f64,
    /// Always on with the measured deep idle: torpor's own part of the saving is against this.
    pub deep_idle_counterfactual_j: f64,
    pub torpor_saving_j: f64,
    pub torpor_saving_pct: f64,
    pub mean_power_w: f64,
    pub counterfactual_power_w: f64,
    pub idle_j: f64,
    pub torpor_j: f64,
    pub torpor_cpu_s: f64,
    pub services: BTreeMap<String, ServiceEnergy>,
    /// Seconds priced at suspend power: the node sleep hook ran, or a dry run would have run it.
    pub node_asleep_s: f64,
    /// The part of `node_asleep_s` that was a dry run (credited, the node stayed up).
    #[serde(default)]
    pub node_asleep_dry_run_s: f64,
    /// Node sleeps that began and that ended, and the energy of those entries and resumes
    /// (in `energy_j`).
    #[serde(default)]
    pub node_sleeps: u64,
    #[serde(default)]
    pub node_resumes: u64,
    #[serde(default)]
    pub node_transitions_j: f64,
    pub all_asleep_s: f64,
    /// Power per sample, oldest first (empty in `/status`; `/energy` has it).
    #[serde(default)]
    pub history: Vec<PowerPoint>,
}

/// Integrates a node's power.
#[derive(Debug)]
pub struct EnergyAccount {
    profile: Profile,
    last: Sample,
    report: EnergyReport,
}

impl EnergyAccount {
    /// Starts at `first`; power is measured when `first` has a RAPL package zone.
    pub fn start(profile: Profile, first: Sample) -> EnergyAccount {
        let measured = first.rapl.iter().any(|z| z.kind == ZoneKind::Package);
        let (source, scope) = if measured {
            (
                PowerSource::Measured,
                "RAPL package and DRAM domains; the counterfactual adds the model's difference"
                    .to_string(),
            )
        } else {
            let cores = first.cpus.len();
            (
                PowerSource::Modelled {
                    profile: profile.name.clone(),
                },
                format!(
                    "this machine's {cores} CPUs as {cores} of the profile's {} cores, with that share of package floor, DRAM and platform power",
                    profile.cores()
                ),
            )
        };
        EnergyAccount {
            report: EnergyReport {
                label: source.label(),
                source,
                scope,
                seconds: 0.0,
                energy_j: 0.0,
                counterfactual_j: 0.0,
                saving_j: 0.0,
                saving_pct: 0.0,
                deep_idle_counterfactual_j: 0.0,
                torpor_saving_j: 0.0,
                torpor_saving_pct: 0.0,
                mean_power_w: 0.0,
                counterfactual_power_w: 0.0,
                idle_j: 0.0,
                torpor_j: 0.0,
                torpor_cpu_s: 0.0,
                services: BTreeMap::new(),
                node_asleep_s: 0.0,
                node_asleep_dry_run_s: 0.0,
                node_sleeps: 0,
                node_resumes: 0,
                node_transitions_j: 0.0,
                all_asleep_s: 0.0,
                history: Vec::new(),
            },
            profile,
            last: first,
        }
    }

    /// Goes on from `now` without adding the time since the previous sample: that time
    /// belonged to something else (a benchmark measuring two configurations in turns).
    pub fn skip_to(&mut self, now: Sample) {
        self.last = now;
    }

    /// Adds the interval from the previous sample to `now`.
    pub fn record(&mut self, now: Sample, activity: &Activity) {
        let secs = now.at.saturating_duration_since(self.last.at).as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        let model = Model::new(&self.profile);
        let cores = modelled_cores(&self.profile, &self.last, &now);
        let n = cores.len().max(1);
        let gib = |bytes: fn(&ServiceUsage) -> u64| {
            activity
                .services
                .iter()
                .map(|s| bytes(s) as f64)
                .sum::<f64>()
                / GIB
        };
        let (resident_gib, footprint_gib) = (gib(|s| s.resident_bytes), gib(|s| s.footprint_bytes));
        let actual = if activity.node_asleep {
            model.suspended(n)
        } else {
            model.node(&cores, reachable_pc6(&self.profile, &cores), resident_gib)
        };
        // Always on: same service work without torpor's, every idle moment shallow.
        let torpor_share = activity.torpor_cpu_s / (secs * n as f64);
        let cf_cores: Vec<CoreResidency> = cores
            .iter()
            .map(|c| CoreResidency::all_shallow(&self.profile, (c.busy - torpor_share).max(0.0)))
            .collect();
        let cf = model.node(&cf_cores, 0.0, footprint_gib);
        // Always on, deep idle as measured: torpor's CPU time goes back to idle in the same mix.
        // Its wakeups are not counted apart, so their trips stay (a few a second per service,
        // milliwatts, in torpor's favour).
        let deep_cores: Vec<CoreResidency> = cores
            .iter()
            .map(|c| {
                let busy = (c.busy - torpor_share).max(0.0);
                let scale = if c.busy < 1.0 {
                    (1.0 - busy) / (1.0 - c.busy)
                } else {
                    0.0
                };
                let mut idle: Vec<f64> = c.idle.iter().map(|f| f * scale).collect();
                if c.busy >= 1.0 {
                    idle[0] = 1.0 - busy;
                }
                CoreResidency {
                    busy,
                    idle,
                    trips_per_s: c.trips_per_s.clone(),
                }
            })
            .collect();
        let deep = model.node(
            &deep_cores,
            reachable_pc6(&self.profile, &deep_cores),
            footprint_gib,
        );
        let economics = model.node_sleep(n, resident_gib);
        let transitions_j = f64::from(activity.node_sleeps) * economics.entry_j
            + f64::from(activity.node_resumes) * economics.resume_j;
        let (energy_j, cf_j, deep_j) = match self.report.source {
            // Nothing measures a suspended node from inside it (nor one a dry run left up):
            // its interval is the profile's suspend power, counted in `node_asleep_s`.
            _ if activity.node_asleep => (
                actual.total_w * secs,
                cf.total_w * secs,
                deep.total_w * secs,
            ),
            PowerSource::Measured => {
                let measured: f64 = now
                    .rapl
                    .iter()
                    .filter(|z| z.kind != ZoneKind::Other)
                    .filter_map(|z| {
                        let before = self.last.rapl.iter().find(|b| b.zone == z.zone)?;
                        Some(z.joules_since(before))
                    })
                    .sum();
                let rapl_part = |b: &crate::model::PowerBreakdown| b.package_w + b.dram_w;
                let gap = |b| (rapl_part(b) - rapl_part(&actual)) * secs;
                (measured, measured + gap(&cf), measured + gap(&deep))
            }
            PowerSource::Modelled { .. } => (
                actual.total_w * secs,
                cf.total_w * secs,
                deep.total_w * secs,
            ),
        };
        let energy_j = energy_j + transitions_j;
        let r = &mut self.report;
        r.node_sleeps += u64::from(activity.node_sleeps);
        r.node_resumes += u64::from(activity.node_resumes);
        r.node_transitions_j += transitions_j;
        // Attribution by CPU time at the profile's active power, capped at what was used.
        let active_w = self.profile.core.active_watts;
        let per_gib = self.profile.dram.watts_per_gib;
        let mut attributed = 0.0;
        for s in &activity.services {
            let j = s.cpu_s * active_w + per_gib * s.resident_bytes as f64 / GIB * secs;
            let e = r.services.entry(s.name.clone()).or_default();
            e.cpu_s += s.cpu_s;
            e.energy_j += j;
            attributed += j;
        }
        let torpor_j = activity.torpor_cpu_s * active_w;
        r.torpor_j += torpor_j;
        r.torpor_cpu_s += activity.torpor_cpu_s;
        r.idle_j += (energy_j - attributed - torpor_j).max(0.0);
        r.seconds += secs;
        r.energy_j += energy_j;
        r.counterfactual_j += cf_j;
        r.saving_j = r.counterfactual_j - r.energy_j;
        r.saving_pct = if r.counterfactual_j > 0.0 {
            100.0 * r.saving_j / r.counterfactual_j
        } else {
            0.0
        };
        r.mean_power_w = r.energy_j / r.seconds;
        r.counterfactual_power_w = r.counterfactual_j / r.seconds;
        r.deep_idle_counterfactual_j += deep_j;
        r.torpor_saving_j = r.deep_idle_counterfactual_j - r.energy_j;
        r.torpor_saving_pct = if r.deep_idle_counterfactual_j > 0.0 {
            100.0 * r.torpor_saving_j / r.deep_idle_counterfactual_j
        } else {
            0.0
        };
        if activity.node_asleep {
            r.node_asleep_s += secs;
            if activity.node_asleep_dry_run {
                r.node_asleep_dry_run_s += secs;
            }
        }
        if activity.all_asleep {
            r.all_asleep_s += secs;
        }
        if r.history.len() == HISTORY {
            r.history.remove(0);
        }
        r.history.push(PowerPoint {
            t_s: r.seconds,
            power_w: energy_j / secs,
            counterfactual_w: cf_j / secs,
        });
        self.last = now;
    }

    pub fn report(&self) -> &EnergyReport {
        &self.report
    }
}

impl EnergyReport {
    /// One line: energy, counterfactual, saving, and the label.
    pub fn summary_line(&self) -> String {
        format!(
            "{:.1} J over {:.0} s ({:.2} W) vs always-on {:.1} J ({:.2} W): saving {:.1} J ({:.1} %), {}",
            self.energy_j,
            self.seconds,
            self.mean_power_w,
            self.counterfactual_j,
            self.counterfactual_power_w,
            self.saving_j,
            self.saving_pct,
            self.label
        )
    }

    /// One line: torpor's own part, against always-on with the same deep idle.
    pub fn torpor_line(&self) -> String {
        format!(
            "vs always-on with the same deep idle {:.1} J: snapshotting itself {} {:.1} J ({:.1} %)",
            self.deep_idle_counterfactual_j,
            if self.torpor_saving_j >= 0.0 { "saves" } else { "costs" },
            self.torpor_saving_j.abs(),
            self.torpor_saving_pct.abs()
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::cpuidle::{CpuCounters, StateCounters};

    fn cpu(cpu: usize, busy: u64, idle: u64, c6_us: u64, c6_entries: u64) -> CpuCounters {
        CpuCounters {
            cpu,
            busy_ticks: busy,
            idle_ticks: idle,
            states: vec![StateCounters {
                name: "C6".into(),
                exit_latency_us: 133,
                target_residency_us: 600,
                time_us: c6_us,
                usage: c6_entries,
                disabled: false,
            }],
        }
    }

    fn sample(at: Instant, cpus: Vec<CpuCounters>) -> Sample {
        Sample {
            at,
            cpus,
            rapl: Vec::new(),
        }
    }

    fn account() -> (EnergyAccount, Instant) {
        account_at(Instant::now())
    }

    fn account_at(t0: Instant) -> (EnergyAccount, Instant) {
        let first = sample(t0, vec![cpu(0, 0, 0, 0, 0), cpu(1, 0, 0, 0, 0)]);
        (
            EnergyAccount::start(Profile::resolve("icx-2s").unwrap(), first),
            t0,
        )
    }

    fn service(cpu_s: f64, resident: u64) -> ServiceUsage {
        ServiceUsage {
            name: "svc".into(),
            cpu_s,
            resident_bytes: resident,
            footprint_bytes: 1 << 30,
        }
    }

    #[test]
    fn deep_idle_and_a_sleeping_service_save_against_always_on() {
        let (mut acc, t0) = account();
        // 10 s, 10 % busy, idle in 50 ms periods.
        let now = sample(
            t0 + Duration::from_secs(10),
            vec![
                cpu(0, 100, 900, 9_000_000, 180),
                cpu(1, 100, 900, 9_000_000, 180),
            ],
        );
        acc.record(
            now,
            &Activity {
                services: vec![service(2.0, 0)],
                ..Activity::default()
            },
        );
        let r = acc.report();
        assert_eq!(r.label, "modelled (profile icx-2s)");
        assert!((r.seconds - 10.0).abs() < 1e-9);
        assert!(r.saving_j > 0.0, "{r:?}");
        assert!(r.counterfactual_j > r.energy_j);
        // The sleeping service's 1 GiB is resident only in the counterfactuals.
        assert!(r.deep_idle_counterfactual_j > r.energy_j, "{r:?}");
        assert!(r.deep_idle_counterfactual_j < r.counterfactual_j, "{r:?}");
        assert!((r.services["svc"].energy_j - 2.0 * 5.0).abs() < 1e-9);
        let parts = r.services["svc"].energy_j + r.torpor_j + r.idle_j;
        assert!((parts - r.energy_j).abs() < 1e-6, "parts add up: {r:?}");
    }

    #[test]
    fn a_skipped_interval_is_not_accounted() {
        let (mut a, t0) = account();
        let busy = |at: u64, ticks: u64| {
            sample(
                t0 + Duration::from_secs(at),
                vec![
                    cpu(0, ticks, 100 * at - ticks, 0, 0),
                    cpu(1, ticks, 100 * at - ticks, 0, 0),
                ],
            )
        };
        a.record(busy(10, 100), &Activity::default());
        let after_first = a.report().energy_j;
        // Ten fully busy seconds that belong to another measurement.
        a.skip_to(busy(20, 1100));
        a.record(busy(30, 1200), &Activity::default());
        let r = a.report();
        assert!((r.seconds - 20.0).abs() < 1e-9, "{}", r.seconds);
        assert!(
            (r.energy_j - 2.0 * after_first).abs() < 1e-6 * after_first,
            "two like intervals: {} vs 2 × {after_first}",
            r.energy_j
        );
    }

    #[test]
    fn torpor_work_is_not_in_the_counterfactual() {
        let (mut plain, t0) = account();
        let (mut with_torpor, _) = account_at(t0);
        let counters = vec![
            cpu(0, 500, 500, 5_000_000, 100),
            cpu(1, 500, 500, 5_000_000, 100),
        ];
        let now = sample(t0 + Duration::from_secs(10), counters);
        plain.record(now.clone(), &Activity::default());
        with_torpor.record(
            now,
            &Activity {
                torpor_cpu_s: 4.0,
                ..Activity::default()
            },
        );
        assert!(with_torpor.report().counterfactual_j < plain.report().counterfactual_j);
        assert_eq!(with_torpor.report().energy_j, plain.report().energy_j);
    }

    #[test]
    fn a_sleeping_node_draws_suspend_power() {
        let (mut acc, t0) = account();
        let now = sample(
            t0 + Duration::from_secs(100),
            vec![cpu(0, 0, 10_000, 0, 0), cpu(1, 0, 10_000, 0, 0)],
        );
        acc.record(
            now,
            &Activity {
                node_asleep: true,
                all_asleep: true,
                ..Activity::default()
            },
        );
        let r = acc.report();
        let expect = 2.0 / 48.0 * 12.0 * 100.0;
        assert!((r.energy_j - expect).abs() < 1e-9, "{r:?}");
        assert_eq!(r.node_asleep_s, 100.0);
        assert_eq!(r.node_asleep_dry_run_s, 0.0);
    }

    #[test]
    fn a_dry_run_node_sleep_is_credited_the_same_and_counted_apart() {
        let (mut real, t0) = account();
        let (mut dry, _) = account_at(t0);
        let now = sample(
            t0 + Duration::from_secs(100),
            vec![cpu(0, 0, 10_000, 0, 0), cpu(1, 0, 10_000, 0, 0)],
        );
        let asleep = |dry_run| Activity {
            node_asleep: true,
            node_asleep_dry_run: dry_run,
            node_sleeps: 1,
            all_asleep: true,
            ..Activity::default()
        };
        real.record(now.clone(), &asleep(false));
        dry.record(now, &asleep(true));
        assert_eq!(dry.report().energy_j, real.report().energy_j);
        let p = Profile::resolve("icx-2s").unwrap();
        let economics = crate::Model::new(&p).node_sleep(2, 0.0);
        // The entry is charged as the sleep begins, the resume as it ends.
        assert_eq!(dry.report().node_sleeps, 1);
        assert!((dry.report().node_transitions_j - economics.entry_j).abs() < 1e-9);
        let later = sample(
            t0 + Duration::from_secs(101),
            vec![cpu(0, 0, 10_100, 0, 0), cpu(1, 0, 10_100, 0, 0)],
        );
        let before = dry.report().energy_j;
        dry.record(
            later,
            &Activity {
                node_resumes: 1,
                ..Activity::default()
            },
        );
        assert_eq!(dry.report().node_resumes, 1);
        assert!((dry.report().node_transitions_j - economics.transition_j).abs() < 1e-9);
        assert!(dry.report().energy_j - before > economics.resume_j);
        assert_eq!(dry.report().node_asleep_s, 100.0);
        assert_eq!(dry.report().node_asleep_dry_run_s, 100.0);
        assert_eq!(real.report().node_asleep_dry_run_s, 0.0);
    }
}
