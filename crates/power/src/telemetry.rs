//! Samples of the node's counters and the interval report between two of them: per CPU busy %,
//! each idle state's residency % and entries per second, mean idle period; package and DRAM power
//! from RAPL where the hardware has it, else from the power model with the profile's name on it.

use std::time::Instant;

use serde::Serialize;

use crate::{
    cpuidle::{self, CpuCounters, HostRoots},
    model::{reachable_pc6, CoreResidency, IdleGroup, Model, PowerBreakdown},
    profile::Profile,
    rapl::{self, ZoneKind, ZoneReading},
    TelemetryError,
};

/// The node's counters at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub cpus: Vec<CpuCounters>,
    pub rapl: Vec<ZoneReading>,
}

impl Sample {
    pub fn take(roots: &HostRoots) -> Result<Sample, TelemetryError> {
        Ok(Sample {
            at: Instant::now(),
            cpus: cpuidle::read_cpus(roots)?,
            rapl: rapl::read_zones(roots)?,
        })
    }
}

/// One idle state over an interval.
#[derive(Debug, Clone, Serialize)]
pub struct StateReport {
    pub name: String,
    pub residency_pct: f64,
    pub entries_per_s: f64,
    /// Mean length of one stay, when there was one.
    pub mean_idle_us: Option<f64>,
}

/// One CPU (or the mean of all) over an interval.
#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    /// `None` for the all-CPU row.
    pub cpu: Option<usize>,
    pub busy_pct: f64,
    pub states: Vec<StateReport>,
    /// Mean idle period over all states.
    pub mean_idle_us: Option<f64>,
}

impl CpuReport {
    /// The mean over intervals of the given lengths in seconds (blocks of one measurement
    /// taken in turns with another's).
    pub fn time_weighted(parts: &[(f64, CpuReport)]) -> CpuReport {
        let total: f64 = parts.iter().map(|(s, _)| s).sum::<f64>().max(1e-9);
        let mean = |f: &dyn Fn(&CpuReport) -> f64| {
            parts.iter().map(|(s, r)| s * f(r)).sum::<f64>() / total
        };
        let mut states: Vec<StateReport> = Vec::new();
        // Per state: time in it and entries, over all parts.
        let mut stays: Vec<(f64, f64)> = Vec::new();
        for (secs, r) in parts {
            for st in &r.states {
                let i = match states.iter().position(|s| s.name == st.name) {
                    Some(i) => i,
                    None => {
                        states.push(StateReport {
                            name: st.name.clone(),
                            residency_pct: 0.0,
                            entries_per_s: 0.0,
                            mean_idle_us: None,
                        });
                        stays.push((0.0, 0.0));
                        states.len() - 1
                    }
                };
                states[i].residency_pct += secs * st.residency_pct / total;
                states[i].entries_per_s += secs * st.entries_per_s / total;
                stays[i].0 += secs * st.residency_pct / 100.0;
                stays[i].1 += secs * st.entries_per_s;
            }
        }
        for (s, (time_s, entries)) in states.iter_mut().zip(&stays) {
            s.mean_idle_us = (*entries > 0.0).then(|| time_s * 1e6 / entries);
        }
        let (time_s, entries) = stays
            .iter()
            .fold((0.0, 0.0), |(t, e), (st, se)| (t + st, e + se));
        CpuReport {
            cpu: parts.first().and_then(|(_, r)| r.cpu),
            busy_pct: mean(&|r| r.busy_pct),
            states,
            mean_idle_us: (entries > 0.0).then(|| time_s * 1e6 / entries),
        }
    }
}

/// Whether power was read from a counter or computed.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PowerSource {
    Measured,
    Modelled { profile: String },
}

impl PowerSource {
    /// `measured` or `modelled (profile NAME)`, as every report prints it.
    pub fn label(&self) -> String {
        match self {
            PowerSource::Measured => "measured (RAPL)".to_string(),
            PowerSource::Modelled { profile } => format!("modelled (profile {profile})"),
        }
    }
}

/// Power over an interval.
#[derive(Debug, Clone, Serialize)]
pub struct PowerReport {
    pub source: PowerSource,
    pub label: String,
    pub package_w: f64,
    pub dram_w: Option<f64>,
    /// RAPL zones one by one (empty when modelled).
    pub zones: Vec<(String, f64)>,
    /// The model's breakdown, when modelled.
    pub modelled: Option<PowerBreakdown>,
    /// Modelled package C6 residency (all cores deep at once), when modelled.
    pub pc6_pct: Option<f64>,
}

/// Everything `torpor power` shows for one interval.
#[derive(Debug, Clone, Serialize)]
pub struct IntervalReport {
    pub seconds: f64,
    pub cpus: Vec<CpuReport>,
    pub total: CpuReport,
    pub power: PowerReport,
}

/// Ticks to a fraction, guarding an interval with no ticks.
fn busy_fraction(a: &CpuCounters, b: &CpuCounters) -> f64 {
    let busy = b.busy_ticks.saturating_sub(a.busy_ticks) as f64;
    let idle = b.idle_ticks.saturating_sub(a.idle_ticks) as f64;
    if busy + idle == 0.0 {
        0.0
    } else {
        busy / (busy + idle)
    }
}

/// Per-state (time, entries) deltas of one CPU; states matched by index and name.
fn state_deltas(a: &CpuCounters, b: &CpuCounters) -> Vec<(String, IdleGroup)> {
    b.states
        .iter()
        .map(|sb| {
            let sa = a.states.iter().find(|s| s.name == sb.name);
            let time_us = sb.time_us.saturating_sub(sa.map_or(0, |s| s.time_us));
            let entries = sb.usage.saturating_sub(sa.map_or(0, |s| s.usage));
            (
                sb.name.clone(),
                IdleGroup {
                    time_s: time_us as f64 / 1e6,
                    entries,
                },
            )
        })
        .collect()
}

fn cpu_report(
    cpu: Option<usize>,
    busy: f64,
    deltas: &[(String, IdleGroup)],
    seconds: f64,
) -> CpuReport {
    let states = deltas
        .iter()
        .map(|(name, g)| StateReport {
            name: name.clone(),
            residency_pct: 100.0 * g.time_s / seconds,
            entries_per_s: g.entries as f64 / seconds,
            mean_idle_us: (g.entries > 0).then(|| g.time_s * 1e6 / g.entries as f64),
        })
        .collect();
    let (time, entries) = deltas
        .iter()
        .fold((0.0, 0u64), |(t, n), (_, g)| (t + g.time_s, n + g.entries));
    CpuReport {
        cpu,
        busy_pct: 100.0 * busy,
        states,
        mean_idle_us: (entries > 0).then(|| time * 1e6 / entries as f64),
    }
}

/// Residency a profile's server would have had for what each CPU did between `a` and `b`.
pub fn modelled_cores(profile: &Profile, a: &Sample, b: &Sample) -> Vec<CoreResidency> {
    b.cpus
        .iter()
        .filter_map(|cb| {
            let ca = a.cpus.iter().find(|c| c.cpu == cb.cpu)?;
            let groups: Vec<IdleGroup> = state_deltas(ca, cb).into_iter().map(|(_, g)| g).collect();
            Some(CoreResidency::from_idle_groups(
                profile,
                busy_fraction(ca, cb),
                &groups,
                b.at.saturating_duration_since(a.at).as_secs_f64(),
            ))
        })
        .collect()
}

impl IntervalReport {
    /// The report from `a` to `b`; `profile` models power where RAPL has no package zone.
    pub fn between(a: &Sample, b: &Sample, profile: &Profile) -> IntervalReport {
        let seconds = b.at.saturating_duration_since(a.at).as_secs_f64().max(1e-9);
        let mut cpus = Vec::new();
        let mut all: Vec<(String, IdleGroup)> = Vec::new();
        let mut busy_sum = 0.0;
        for cb in &b.cpus {
            let Some(ca) = a.cpus.iter().find(|c| c.cpu == cb.cpu) else {
                continue;
            };
            let busy = busy_fraction(ca, cb);
            let deltas = state_deltas(ca, cb);
            for (name, g) in &deltas {
                match all.iter_mut().find(|(n, _)| n == name) {
                    Some((_, t)) => {
                        t.time_s += g.time_s;
                        t.entries += g.entries;
                    }
                    None => all.push((name.clone(), *g)),
                }
            }
            busy_sum += busy;
            cpus.push(cpu_report(Some(cb.cpu), busy, &deltas, seconds));
        }
        let n = cpus.len().max(1) as f64;
        // The all-CPU row: residencies as means over CPUs, entries per second as totals.
        let mut total = cpu_report(None, busy_sum / n, &all, seconds);
        for s in &mut total.states {
            s.residency_pct /= n;
        }
        let power = power_between(a, b, profile, seconds);
        IntervalReport {
            seconds,
            cpus,
            total,
            power,
        }
    }
}

fn power_between(a: &Sample, b: &Sample, profile: &Profile, seconds: f64) -> PowerReport {
    let zones: Vec<(&ZoneReading, f64)> = b
        .rapl
        .iter()
        .filter_map(|zb| {
            let za = a.rapl.iter().find(|z| z.zone == zb.zone)?;
            Some((zb, zb.joules_since(za) / seconds))
        })
        .collect();
    let sum = |kind| {
        let w: Vec<f64> = zones
            .iter()
            .filter(|(z, _)| z.kind == kind)
            .map(|(_, w)| *w)
            .collect();
        (!w.is_empty()).then(|| w.iter().sum::<f64>())
    };
    if let Some(package_w) = sum(ZoneKind::Package) {
        return PowerReport {
            source: PowerSource::Measured,
            label: PowerSource::Measured.label(),
            package_w,
            dram_w: sum(ZoneKind::Dram),
            zones: zones.iter().map(|(z, w)| (z.name.clone(), *w)).collect(),
            modelled: None,
            pc6_pct: None,
        };
    }
    let cores = modelled_cores(profile, a, b);
    let pc6 = reachable_pc6(profile, &cores);
    let breakdown = Model::new(profile).node(&cores, pc6, 0.0);
    let source = PowerSource::Modelled {
        profile: profile.name.clone(),
    };
    PowerReport {
        label: source.label(),
        source,
        package_w: breakdown.package_w,
        dram_w: Some(breakdown.dram_w),
        zones: Vec::new(),
        modelled: Some(breakdown),
        pc6_pct: Some(100.0 * pc6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(busy_pct: f64, c6_pct: f64, entries_per_s: f64) -> CpuReport {
        CpuReport {
            cpu: None,
            busy_pct,
            states: vec![StateReport {
                name: "C6".into(),
                residency_pct: c6_pct,
                entries_per_s,
                mean_idle_us: None,
            }],
            mean_idle_us: None,
        }
    }

    #[test]
    fn blocks_weigh_by_their_length() {
        // 10 s at 10 % busy and 80 % C6 (100 stays/s), 30 s at 30 % busy and 60 % (300/s).
        let r = CpuReport::time_weighted(&[
            (10.0, report(10.0, 80.0, 100.0)),
            (30.0, report(30.0, 60.0, 300.0)),
        ]);
        assert!((r.busy_pct - 25.0).abs() < 1e-9);
        assert!((r.states[0].residency_pct - 65.0).abs() < 1e-9);
        assert!((r.states[0].entries_per_s - 250.0).abs() < 1e-9);
        // 26 s in C6 over 10 000 stays.
        let mean = r.states[0].mean_idle_us.unwrap();
        assert!((mean - 2600.0).abs() < 1e-6, "{mean}");
        assert_eq!(r.mean_idle_us, r.states[0].mean_idle_us);
    }
}
