//! The power model: a profile turned into watts for what the cores did. Busy time costs active
//! power; idle time is mapped to the deepest idle state a real server of the profile would have
//! entered, which depends on how long each idle period was (its target residency), so deep sleep
//! is credited only where it was reachable. Each idle period also pays its trip into and out of
//! its state ([`Profile::trip_joules`]): a core woken 100 times a second by a timer reaches deep
//! sleep between the ticks but pays 100 trips. Package C6 needs every core of the package deep
//! at once.
//!
//! Measuring nodes smaller than the profile (a 2-vCPU VM against a 48-core server) are a slice of
//! it: the package floor, DRAM idle and platform power are charged in proportion to the cores
//! measured, so savings keep their proportions; such a slice is never credited package C6.

use serde::Serialize;

use crate::profile::Profile;

/// Where one core spent an interval, as fractions that sum to 1, and how often it went idle.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CoreResidency {
    pub busy: f64,
    /// Per profile idle state, in the profile's order.
    pub idle: Vec<f64>,
    /// Idle periods per second spent in each state (the profile's order): each paid a trip
    /// into and out of it. Zero where the periods were not counted (turbostat's summaries).
    pub trips_per_s: Vec<f64>,
}

/// Idle time the kernel saw as `entries` idle periods (one cpuidle state's counters over an
/// interval): the periods' mean length is all that is known of them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdleGroup {
    pub time_s: f64,
    pub entries: u64,
}

/// Modelled power of a node (or of the slice of one that was measured), in watts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PowerBreakdown {
    /// Cores alone (active plus idle-state power).
    pub cores_w: f64,
    /// Cores plus the package floor: what RAPL's package domain would read.
    pub package_w: f64,
    pub dram_w: f64,
    /// Outside RAPL: board, fans, PSU loss.
    pub platform_w: f64,
    pub total_w: f64,
}

/// Fraction of idle *time* spent in periods longer than `t` when period lengths are exponential
/// with mean `mean` (a long period carries more time than a short one, hence the `1 + t/mean`).
fn time_in_periods_longer_than(t: f64, mean: f64) -> f64 {
    if mean <= 0.0 {
        return 0.0;
    }
    let x = t / mean;
    (-x).exp() * (1.0 + x)
}

impl CoreResidency {
    /// `busy` and the idle time of an interval of `seconds` split over the profile's states.
    /// Each group's periods are taken as exponential with the group's mean length (all the
    /// kernel's counters tell), and a period lands in the deepest state whose target residency
    /// it reaches.
    pub fn from_idle_groups(
        profile: &Profile,
        busy: f64,
        groups: &[IdleGroup],
        seconds: f64,
    ) -> CoreResidency {
        let busy = busy.clamp(0.0, 1.0);
        let total_idle: f64 = groups.iter().map(|g| g.time_s).sum();
        let states = profile.idle_states.len();
        let (mut idle, mut trips_per_s) = (vec![0.0; states], vec![0.0; states]);
        if total_idle <= 0.0 {
            idle[0] = 1.0 - busy;
            return CoreResidency {
                busy,
                idle,
                trips_per_s,
            };
        }
        // Where state k begins: the periods past its target residency.
        let threshold = |k: usize| match k {
            0 => 0.0,
            _ => profile.idle_states[k].target_residency_us as f64 / 1e6,
        };
        for g in groups.iter().filter(|g| g.time_s > 0.0) {
            // No exit counted means one period spanned the whole time.
            let periods = g.entries.max(1) as f64;
            let mean = g.time_s / periods;
            let share = g.time_s / total_idle * (1.0 - busy);
            for k in 0..states {
                let next = (k + 1 < states).then(|| threshold(k + 1));
                let time_to = next.map_or(0.0, |t| time_in_periods_longer_than(t, mean));
                idle[k] +=
                    share * (time_in_periods_longer_than(threshold(k), mean) - time_to).max(0.0);
                let count_to = next.map_or(0.0, |t| (-t / mean).exp());
                let count = ((-threshold(k) / mean).exp() - count_to).max(0.0) * periods;
                if seconds > 0.0 {
                    trips_per_s[k] += count / seconds;
                }
            }
        }
        CoreResidency {
            busy,
            idle,
            trips_per_s,
        }
    }

    /// The same busy time with every idle moment in the shallowest state: the always-on node
    /// with deep idle off (whose trips are free).
    pub fn all_shallow(profile: &Profile, busy: f64) -> CoreResidency {
        let busy = busy.clamp(0.0, 1.0);
        let states = profile.idle_states.len();
        let mut idle = vec![0.0; states];
        idle[0] = 1.0 - busy;
        CoreResidency {
            busy,
            idle,
            trips_per_s: vec![0.0; states],
        }
    }

    /// Fraction of the interval in the profile's deepest state.
    pub fn deepest(&self) -> f64 {
        self.idle.last().copied().unwrap_or(0.0)
    }
}

/// Package C6 residency the measured cores allow: every core of a package deep at once, taking
/// cores as independent. A slice smaller than one package gets none: the package's other cores
/// are unknown, and the shared Ice Lake logs show PC6 is rare even at 1-2 % busy.
pub fn reachable_pc6(profile: &Profile, cores: &[CoreResidency]) -> f64 {
    if cores.is_empty() || cores.len() < profile.cores_per_package as usize {
        return 0.0;
    }
    cores.iter().map(CoreResidency::deepest).product()
}

/// What a node sleep saves and when it pays, for whoever decides to sleep the node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeSleepEconomics {
    /// Power of the node up and idle minus suspended (W).
    pub saving_w: f64,
    /// What entering and leaving the sleep costs above staying suspended through them (J):
    /// entry and resume draw the idle node's power and keep a core busy. The sum of
    /// `entry_j` and `resume_j`.
    pub transition_j: f64,
    /// The entry's part, spent when the node goes to sleep.
    pub entry_j: f64,
    /// The resume's part, spent when it wakes.
    pub resume_j: f64,
    /// A sleep shorter than this (entry, sleep and resume) costs more than it saves;
    /// infinite when sleeping saves nothing.
    pub break_even_s: f64,
}

/// A profile's power model.
#[derive(Debug, Clone, Copy)]
pub struct Model<'a> {
    pub profile: &'a Profile,
}

impl<'a> Model<'a> {
    pub fn new(profile: &'a Profile) -> Model<'a> {
        Model { profile }
    }

    /// One core's power: busy time, time in each idle state, and the trips into them.
    pub fn core_watts(&self, r: &CoreResidency) -> f64 {
        let p = self.profile;
        let trips: f64 = r
            .trips_per_s
            .iter()
            .enumerate()
            .map(|(k, n)| n * p.trip_joules(k))
            .sum();
        r.busy * p.core.active_watts
            + r.idle
                .iter()
                .zip(&p.idle_states)
                .map(|(f, s)| f * s.core_watts)
                .sum::<f64>()
            + trips
    }

    /// Package-domain power for these cores: their own power plus their share of the package
    /// floor, lowered by package C6 for `pc6` of the time.
    pub fn package_watts(&self, cores: &[CoreResidency], pc6: f64) -> (f64, f64) {
        let p = self.profile;
        let core_w: f64 = cores.iter().map(|c| self.core_watts(c)).sum();
        let packages = cores.len() as f64 / p.cores_per_package as f64;
        let pc6 = pc6.clamp(0.0, 1.0);
        let uncore =
            packages * (p.package.c6_floor_watts * (1.0 - pc6) + p.package.pc6_watts * pc6);
        (core_w, core_w + uncore)
    }

    /// The node (or the measured slice of it) while up, holding `service_gib` of service memory.
    pub fn node(&self, cores: &[CoreResidency], pc6: f64, service_gib: f64) -> PowerBreakdown {
        let p = self.profile;
        let share = cores.len() as f64 / p.cores() as f64;
        let (cores_w, package_w) = self.package_watts(cores, pc6);
        let dram_w = share * p.dram.idle_watts + p.dram.watts_per_gib * service_gib.max(0.0);
        let platform_w = share * p.platform_watts;
        PowerBreakdown {
            cores_w,
            package_w,
            dram_w,
            platform_w,
            total_w: package_w + dram_w + platform_w,
        }
    }

    /// What suspending the node (or the slice of `cores` cores) saves against leaving it up
    /// and idle, with every core in its deepest state and `service_gib` of service memory.
    pub fn node_sleep(&self, cores: usize, service_gib: f64) -> NodeSleepEconomics {
        let p = self.profile;
        let deepest = p.idle_states.len().saturating_sub(1);
        let idle_core = CoreResidency {
            busy: 0.0,
            idle: (0..p.idle_states.len())
                .map(|i| if i == deepest { 1.0 } else { 0.0 })
                .collect(),
            trips_per_s: vec![0.0; p.idle_states.len()],
        };
        let idle_cores = vec![idle_core; cores];
        let up = self.node(&idle_cores, reachable_pc6(p, &idle_cores), service_gib);
        let saving_w = up.total_w - self.suspended(cores).total_w;
        // Entry and resume save nothing and keep one core busy (the kernel's suspend path).
        let busy_core_w = p.core.active_watts - p.idle_states.last().map_or(0.0, |s| s.core_watts);
        let saving_w = saving_w.max(0.0);
        let entry_j = p.node.suspend_entry_s * (saving_w + busy_core_w);
        let resume_j = p.node.resume_s * (saving_w + busy_core_w);
        let transition_j = entry_j + resume_j;
        NodeSleepEconomics {
            saving_w,
            transition_j,
            entry_j,
            resume_j,
            break_even_s: if saving_w > 0.0 {
                transition_j / saving_w
            } else {
                f64::INFINITY
            },
        }
    }

    /// The slice of `cores` cores while the node is suspended.
    pub fn suspended(&self, cores: usize) -> PowerBreakdown {
        let share = cores as f64 / self.profile.cores() as f64;
        let w = share * self.profile.node.suspend_watts;
        PowerBreakdown {
            total_w: w,
            platform_w: w,
            ..PowerBreakdown::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn icx() -> Profile {
        Profile::resolve("icx-2s").unwrap()
    }

    #[test]
    fn a_node_sleep_pays_after_its_transitions_and_saves_idle_minus_suspend() {
        let p = icx();
        let m = Model::new(&p);
        let whole = m.node_sleep(p.cores() as usize, 0.0);
        // Suspended at 12 W against an idle two-socket node well above it.
        assert!(whole.saving_w > 50.0, "{whole:?}");
        let transitions = p.node.suspend_entry_s + p.node.resume_s;
        assert!(
            whole.break_even_s > transitions && whole.break_even_s < 4.0 * transitions,
            "{whole:?}"
        );
        // A slice saves its share; its break-even is longer (one core's transition work
        // weighs more against a smaller saving).
        let slice = m.node_sleep(2, 0.0);
        assert!(slice.saving_w < whole.saving_w / 10.0, "{slice:?}");
        assert!(slice.break_even_s > whole.break_even_s, "{slice:?}");
    }

    #[test]
    fn long_idle_periods_reach_c6_and_short_ones_do_not() {
        let p = icx();
        // 10 ms periods: nearly all time is in periods past C6's 600 us.
        let long = CoreResidency::from_idle_groups(
            &p,
            0.0,
            &[IdleGroup {
                time_s: 1.0,
                entries: 100,
            }],
            1.0,
        );
        assert!(long.deepest() > 0.99, "{long:?}");
        // 50 us periods: C6 is almost never worth it, C1E gets most.
        let short = CoreResidency::from_idle_groups(
            &p,
            0.0,
            &[IdleGroup {
                time_s: 1.0,
                entries: 20_000,
            }],
            1.0,
        );
        assert!(short.deepest() < 0.01, "{short:?}");
        assert!(short.idle[1] > 0.9, "{short:?}");
    }

    #[test]
    fn a_timer_lets_a_core_reach_c6_between_ticks_but_pays_each_trip() {
        let p = icx();
        let m = Model::new(&p);
        let quiet = |entries| {
            CoreResidency::from_idle_groups(
                &p,
                0.0,
                &[IdleGroup {
                    time_s: 1.0,
                    entries,
                }],
                1.0,
            )
        };
        let (ticking, still) = (quiet(100), quiet(1));
        // 10 ms periods: about 94 of the 100 pass C6's 600 µs.
        assert!(
            (ticking.trips_per_s[2] - 100.0 * (-0.06f64).exp()).abs() < 1e-9,
            "{ticking:?}"
        );
        let trips: f64 = ticking.trips_per_s.iter().sum();
        assert!((trips - 100.0).abs() < 1e-9, "{ticking:?}");
        // The trips cost what the profile's trip energy says, on top of the residency.
        let extra = m.core_watts(&ticking) - m.core_watts(&still);
        assert!(extra > 94.0 * p.trip_joules(2), "{extra}");
        assert!(extra < 100.0 * p.trip_joules(2) + 0.01, "{extra}");
        // And the account's price of a wakeup is the governor's.
        assert_eq!(p.energy_model().joules_per_wakeup, p.trip_joules(2));
    }

    #[test]
    fn residency_sums_to_one() {
        let p = icx();
        let r = CoreResidency::from_idle_groups(
            &p,
            0.3,
            &[
                IdleGroup {
                    time_s: 0.2,
                    entries: 5000,
                },
                IdleGroup {
                    time_s: 0.5,
                    entries: 300,
                },
            ],
            1.0,
        );
        let sum: f64 = r.busy + r.idle.iter().sum::<f64>();
        assert!((sum - 1.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn exponential_time_share_matches_closed_form_edges() {
        assert_eq!(time_in_periods_longer_than(0.0, 1.0), 1.0);
        assert!(time_in_periods_longer_than(50.0, 1.0) < 1e-15);
        // Mean 1, threshold 1: e^-1 * 2.
        assert!((time_in_periods_longer_than(1.0, 1.0) - 2.0 / std::f64::consts::E).abs() < 1e-12);
    }

    #[test]
    fn a_full_node_matches_the_profile_figures() {
        let p = icx();
        let m = Model::new(&p);
        let idle_c6: Vec<_> = (0..p.cores())
            .map(|_| CoreResidency {
                busy: 0.0,
                idle: vec![0.0, 0.0, 1.0],
                trips_per_s: vec![0.0; 3],
            })
            .collect();
        let b = m.node(&idle_c6, 0.0, 0.0);
        let expect = 48.0 * 0.05 + 2.0 * 74.9;
        assert!((b.package_w - expect).abs() < 1e-9, "{b:?}");
        assert!((b.total_w - (expect + 9.4 + 60.0)).abs() < 1e-9, "{b:?}");
        let pc6 = m.node(&idle_c6, 1.0, 0.0);
        assert!(pc6.package_w < b.package_w);
    }

    #[test]
    fn a_slice_of_a_package_gets_no_package_c6() {
        let p = icx();
        let deep = CoreResidency {
            busy: 0.0,
            idle: vec![0.0, 0.0, 1.0],
            trips_per_s: vec![0.0; 3],
        };
        assert_eq!(reachable_pc6(&p, &vec![deep.clone(); 2]), 0.0);
        assert_eq!(reachable_pc6(&p, &vec![deep; 48]), 1.0);
    }

    #[test]
    fn shallow_only_costs_more_than_deep_idle() {
        let p = icx();
        let m = Model::new(&p);
        let deep = CoreResidency::from_idle_groups(
            &p,
            0.1,
            &[IdleGroup {
                time_s: 0.9,
                entries: 90,
            }],
            1.0,
        );
        let shallow = CoreResidency::all_shallow(&p, 0.1);
        assert!(m.core_watts(&shallow) > m.core_watts(&deep));
    }
}
