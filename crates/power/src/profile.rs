//! Platform power profiles: what a server draws in each core idle state, per package with and
//! without package C6, for its DRAM and in node sleep, with the idle states' exit latencies and
//! target residencies. Profiles are TOML data (two ship in the binary: `icx-2s`, `generic`); a
//! user passes a file path for their own.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Profiles compiled into the binary, by name.
const BUILTIN: &[(&str, &str)] = &[
    ("icx-2s", include_str!("../profiles/icx-2s.toml")),
    ("generic", include_str!("../profiles/generic.toml")),
];

/// Why a profile could not be had.
#[derive(Debug, Error)]
pub enum ProfileError {
    #[error("no built-in profile {name:?} (built in: {known}) and no file of that name")]
    Unknown { name: String, known: String },
    #[error("cannot read profile {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("profile {0}")]
    Parse(String, #[source] toml::de::Error),
    #[error("profile {name}: {problem}")]
    Invalid { name: String, problem: String },
}

/// A server platform's power figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// Where the figures come from, so a reader can judge them.
    pub sources: Vec<String>,
    pub packages: u32,
    pub cores_per_package: u32,
    /// Board, fans, PSU loss, NIC, disks: drawn whenever the node is up, never seen by RAPL.
    pub platform_watts: f64,
    pub core: CorePower,
    /// Core idle states, shallowest first.
    #[serde(rename = "idle_state")]
    pub idle_states: Vec<IdleState>,
    pub package: PackagePower,
    pub dram: DramPower,
    pub node: NodeSleepPower,
    /// How the profile was fitted, when it was.
    #[serde(default)]
    pub calibration: Option<Calibration>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorePower {
    /// One core in C0 (busy).
    pub active_watts: f64,
}

/// One core idle state as the kernel's idle driver knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdleState {
    pub name: String,
    pub exit_latency_us: u64,
    /// The governor picks this state only for idle periods at least this long.
    pub target_residency_us: u64,
    /// One core's power while in this state.
    pub core_watts: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackagePower {
    /// One package with every core in its deepest state but no package C-state (uncore,
    /// memory controller and links awake), core power excluded.
    pub c6_floor_watts: f64,
    /// The same package in package C6.
    pub pc6_watts: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DramPower {
    /// The node's DRAM at idle (all sockets).
    pub idle_watts: f64,
    /// Extra power per GiB held by running services (kept out of self-refresh).
    pub watts_per_gib: f64,
}

/// Whole-node sleep states and their transition times.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSleepPower {
    pub suspend_watts: f64,
    pub suspend_entry_s: f64,
    pub resume_s: f64,
    pub off_watts: f64,
    pub off_entry_s: f64,
    pub boot_s: f64,
}

/// The recorded outcome of `torpor power calibrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub logs: u32,
    pub rows: u32,
    pub pkg_watt_mape_pct: f64,
    pub pkg_watt_mae_watts: f64,
}

impl Profile {
    /// A built-in profile by name, or else a TOML file at that path.
    pub fn resolve(name_or_path: &str) -> Result<Profile, ProfileError> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Profile::parse(name_or_path, text);
        }
        let path = Path::new(name_or_path);
        if path.is_file() {
            return Profile::load(path);
        }
        Err(ProfileError::Unknown {
            name: name_or_path.to_string(),
            known: Profile::builtin_names().join(", "),
        })
    }

    /// The profile as the governor ([`torpor_policy::choose_level`]) prices CPU time, wakeups
    /// and memory: a busy core above the deepest idle state; a wakeup of an idle core one trip
    /// out of that state and back ([`Profile::trip_joules`]; its work is CPU time); a GiB of
    /// service memory at the DRAM's rate. One function, so the live agent and the simulator
    /// price alike, and as the energy account charges ([`crate::Model::core_watts`]).
    pub fn energy_model(&self) -> torpor_policy::EnergyModel {
        let deepest = self.idle_states.len().saturating_sub(1);
        let above_idle =
            self.core.active_watts - self.idle_states.last().map_or(0.0, |s| s.core_watts);
        torpor_policy::EnergyModel {
            watts_per_busy_cpu: above_idle,
            joules_per_wakeup: self.trip_joules(deepest),
            watts_per_gib: self.dram.watts_per_gib,
        }
    }

    /// Energy of entering idle state `k` and leaving it, beyond the state's power for the
    /// period (J). cpuidle's target residency is the period from which a state saves over the
    /// next shallower one, its trip included: so the trip costs the two states' power
    /// difference over that time, on top of the shallower state's own trip. The shallowest
    /// state's trip is taken as free.
    pub fn trip_joules(&self, k: usize) -> f64 {
        self.idle_states
            .windows(2)
            .take(k)
            .map(|w| {
                (w[0].core_watts - w[1].core_watts).max(0.0)
                    * w[1].target_residency_us as f64
                    * 1e-6
            })
            .sum()
    }

    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|e| ProfileError::Read(path.into(), e))?;
        Profile::parse(&path.display().to_string(), &text)
    }

    pub fn parse(origin: &str, text: &str) -> Result<Profile, ProfileError> {
        let p: Profile =
            toml::from_str(text).map_err(|e| ProfileError::Parse(origin.to_string(), e))?;
        p.validate()?;
        Ok(p)
    }

    fn validate(&self) -> Result<(), ProfileError> {
        let bad = |problem: String| ProfileError::Invalid {
            name: self.name.clone(),
            problem,
        };
        if self.packages == 0 || self.cores_per_package == 0 {
            return Err(bad(
                "packages and cores_per_package must be at least 1".into()
            ));
        }
        if self.idle_states.is_empty() {
            return Err(bad("needs at least one idle_state".into()));
        }
        for pair in self.idle_states.windows(2) {
            if pair[1].target_residency_us < pair[0].target_residency_us {
                return Err(bad(format!(
                    "idle states must go shallow to deep: {} has a shorter target residency than {}",
                    pair[1].name, pair[0].name
                )));
            }
        }
        let watts = [
            ("platform_watts", self.platform_watts),
            ("core.active_watts", self.core.active_watts),
            ("package.c6_floor_watts", self.package.c6_floor_watts),
            ("package.pc6_watts", self.package.pc6_watts),
            ("dram.idle_watts", self.dram.idle_watts),
            ("dram.watts_per_gib", self.dram.watts_per_gib),
            ("node.suspend_watts", self.node.suspend_watts),
            ("node.off_watts", self.node.off_watts),
        ];
        for (key, w) in watts.into_iter().chain(
            self.idle_states
                .iter()
                .map(|s| ("idle_state.core_watts", s.core_watts)),
        ) {
            if !(w.is_finite() && w >= 0.0) {
                return Err(bad(format!("{key} must be a non-negative number, not {w}")));
            }
        }
        Ok(())
    }

    pub fn cores(&self) -> u32 {
        self.packages * self.cores_per_package
    }

    /// The shallowest state (what an always-on node with deep idle disabled sits in).
    pub fn shallowest(&self) -> &IdleState {
        &self.idle_states[0]
    }

    pub fn state_index(&self, name: &str) -> Option<usize> {
        self.idle_states.iter().position(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_parse() {
        for name in Profile::builtin_names() {
            let p = Profile::resolve(name).unwrap();
            assert_eq!(p.name, name);
            assert!(!p.sources.is_empty(), "{name} cites its sources");
        }
    }

    #[test]
    fn the_energy_model_prices_a_busy_core_above_the_deepest_state_and_a_wakeup_by_its_trip() {
        let m = Profile::resolve("icx-2s").unwrap().energy_model();
        // C0 5 W, C6 0.05 W, DRAM 0.1 W/GiB; a C6 trip: C1 1.5 W to C1E 0.8 W over C1E's 4 µs,
        // then 0.8 W to 0.05 W over C6's 600 µs.
        assert!((m.watts_per_busy_cpu - 4.95).abs() < 1e-9, "{m:?}");
        assert!(
            (m.joules_per_wakeup - (0.7 * 4e-6 + 0.75 * 600e-6)).abs() < 1e-12,
            "{m:?}"
        );
        assert!((m.watts_per_gib - 0.1).abs() < 1e-12, "{m:?}");
    }

    #[test]
    fn a_trip_is_free_in_the_shallowest_state_and_dearer_the_deeper_it_goes() {
        let p = Profile::resolve("icx-2s").unwrap();
        assert_eq!(p.trip_joules(0), 0.0);
        let trips: Vec<f64> = (0..p.idle_states.len()).map(|k| p.trip_joules(k)).collect();
        assert!(trips.windows(2).all(|w| w[1] > w[0]), "{trips:?}");
        // Past the deepest state there is nowhere deeper to go.
        assert_eq!(p.trip_joules(99), p.trip_joules(p.idle_states.len() - 1));
    }

    #[test]
    fn unknown_profile_names_the_builtins() {
        let e = Profile::resolve("nope-9000").unwrap_err().to_string();
        assert!(e.contains("icx-2s") && e.contains("generic"), "{e}");
    }

    #[test]
    fn states_out_of_order_are_refused() {
        let text = include_str!("../profiles/generic.toml")
            .replace("target_residency_us = 600", "target_residency_us = 1");
        let e = Profile::parse("t", &text).unwrap_err().to_string();
        assert!(e.contains("shallow to deep"), "{e}");
    }

    #[test]
    fn negative_power_is_refused() {
        let text = include_str!("../profiles/generic.toml")
            .replace("platform_watts = 60.0", "platform_watts = -1.0");
        let e = Profile::parse("t", &text).unwrap_err().to_string();
        assert!(e.contains("platform_watts"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = format!(
            "{}\nturbo = true\n",
            include_str!("../profiles/generic.toml")
        );
        assert!(Profile::parse("t", &text).is_err());
    }
}
