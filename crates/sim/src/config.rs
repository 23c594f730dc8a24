//! The simulator's TOML: node groups with a count and a profile, services with an arrival process
//! and a service-time distribution placed on a node group, the pool approach, the policy, and
//! the checkpoint/restore latency model, and what each service costs while awake and idle (the
//! energy governor's input). Unknown keys and bad values name their key.

use std::{path::Path, sync::Arc, time::Duration};

use serde::Deserialize;
use torpor_configfile::invalid;
use torpor_policy::PolicyConfig;
use torpor_power::Profile;
use torpor_traffic::Arrivals;

/// Why a simulator configuration was refused: the config error of every torpor TOML reader.
pub type SimConfigError = torpor_configfile::ConfigError;

/// Service-time distributions.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServiceTime {
    Exponential {
        mean_ms: f64,
    },
    Constant {
        ms: f64,
    },
    Uniform {
        min_ms: f64,
        max_ms: f64,
    },
    /// Lognormal with this mean and coefficient of variation.
    Lognormal {
        mean_ms: f64,
        cv: f64,
    },
}

impl ServiceTime {
    pub fn mean_s(&self) -> f64 {
        match *self {
            ServiceTime::Exponential { mean_ms } | ServiceTime::Lognormal { mean_ms, .. } => {
                mean_ms / 1e3
            }
            ServiceTime::Constant { ms } => ms / 1e3,
            ServiceTime::Uniform { min_ms, max_ms } => (min_ms + max_ms) / 2e3,
        }
    }
}

/// How snapshots reach the pool: the seed's three approaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Approach {
    /// CXL-attached pool memory: load/store, ~0.4 µs, ~64 GB/s.
    Cxl,
    /// RDMA to a pool node: ~3 µs, 100 Gb/s.
    Rdma,
    /// Tiered memory with NVMe behind it: ~100 µs, ~3 GB/s.
    Tiered,
}

impl Approach {
    /// (latency s, bandwidth bytes/s) of the fabric.
    pub fn fabric(self) -> (f64, f64) {
        match self {
            Approach::Cxl => (0.4e-6, 64e9),
            Approach::Rdma => (3e-6, 12.5e9),
            Approach::Tiered => (100e-6, 3e9),
        }
    }

    pub const ALL: [Approach; 3] = [Approach::Cxl, Approach::Rdma, Approach::Tiered];

    pub fn as_str(self) -> &'static str {
        match self {
            Approach::Cxl => "cxl",
            Approach::Rdma => "rdma",
            Approach::Tiered => "tiered",
        }
    }
}

/// Where a snapshotted service wakes: the fleet question of local snapshots against a pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMode {
    /// Local snapshots (zeropod keeps them on the node's disk): the service wakes on its own
    /// node, which must resume first if it suspended (its exit latency and energy included).
    #[default]
    InPlace,
    /// Snapshots in the pool: the service wakes on an awake node of its group with room
    /// (the fullest that fits, so awake services consolidate), a sleeping node resumes only
    /// when no awake one has room, and the emptiest node is drained now and then so it can
    /// sleep.
    Anywhere,
}

impl RestoreMode {
    pub const ALL: [RestoreMode; 2] = [RestoreMode::InPlace, RestoreMode::Anywhere];

    pub fn as_str(self) -> &'static str {
        match self {
            RestoreMode::InPlace => "in-place",
            RestoreMode::Anywhere => "anywhere",
        }
    }
}

/// The policies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    /// Never sleeps; idle cores in the shallowest state.
    AlwaysOn,
    /// Never sleeps; idle cores as deep as their idle periods allow.
    C6Only,
    /// Sleeps after `idle_threshold` of idleness.
    FixedThreshold,
    /// The live agent's decision (`torpor_policy::decide_sleep`): threshold, rate limit, wake objective.
    SeedTable,
    /// The seed table plus the inter-arrival histogram's pre-warm.
    Predictor,
    /// Knows the next arrival: sleeps only when the gap pays, wakes just in time (a bound).
    Oracle,
    /// PowerNap (Meisner et al. 2009): services never sleep; the whole node naps whenever idle.
    Powernap,
    /// The live agent's energy governor (`torpor_policy::choose_level`): each idle service
    /// awake, frozen or snapshotted, whichever deepest level pays for its cycle over the
    /// predicted idle period, looked at again as the idle period ages.
    Governor,
}

impl PolicyName {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::AlwaysOn => "always-on",
            PolicyName::C6Only => "c6-only",
            PolicyName::FixedThreshold => "fixed-threshold",
            PolicyName::SeedTable => "seed-table",
            PolicyName::Predictor => "predictor",
            PolicyName::Oracle => "oracle",
            PolicyName::Powernap => "powernap",
            PolicyName::Governor => "governor",
        }
    }

    pub fn sleeps_services(self) -> bool {
        matches!(
            self,
            PolicyName::FixedThreshold
                | PolicyName::SeedTable
                | PolicyName::Predictor
                | PolicyName::Oracle
                | PolicyName::Governor
        )
    }
}

/// Checkpoint and restore latency as a function of footprint, before the fabric's share:
/// `fixed + per_gib × GiB` (fit it with `torpor sim calibrate`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CrModel {
    pub checkpoint_fixed_s: f64,
    pub checkpoint_per_gib_s: f64,
    pub restore_fixed_s: f64,
    pub restore_per_gib_s: f64,
}

impl Default for CrModel {
    /// The fit of `fixtures/bench-cr.json` (`torpor bench cr` on a 2-vCPU VM, 64-512 MiB).
    fn default() -> Self {
        CrModel {
            checkpoint_fixed_s: 0.0440,
            checkpoint_per_gib_s: 0.5681,
            restore_fixed_s: 0.0274,
            restore_per_gib_s: 0.6973,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "one")]
    seed: u64,
    duration: String,
    policy: PolicyName,
    idle_threshold: Option<String>,
    #[serde(default = "default_approach")]
    approach: Approach,
    /// Every service on a node asleep this long: the node suspends (torpor's node sleep hook).
    node_sleep_after: Option<String>,
    #[serde(default)]
    restore: RestoreMode,
    /// How often (restore anywhere) the emptiest awake node of a group is drained.
    consolidate_every: Option<String>,
    #[serde(default)]
    calibration: Option<CrModel>,
    #[serde(rename = "node")]
    nodes: Vec<RawNode>,
    #[serde(rename = "service")]
    services: Vec<RawService>,
}

fn one() -> u64 {
    1
}

fn default_approach() -> Approach {
    Approach::Rdma
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    count: u32,
    profile: String,
    cores: Option<u32>,
    /// Memory for services per node (restore anywhere places by it).
    memory: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    #[serde(default = "one_u32")]
    count: u32,
    footprint: String,
    arrival: Arrivals,
    service_time: ServiceTime,
    /// The node group it is placed on (round robin over its nodes).
    nodes: String,
    #[serde(default)]
    idle_cpus: f64,
    #[serde(default)]
    idle_wakeups_per_s: f64,
}

fn one_u32() -> u32 {
    1
}

/// A node group.
#[derive(Debug, Clone)]
pub struct NodeGroup {
    pub name: String,
    pub count: u32,
    pub profile: Arc<Profile>,
    pub cores: u32,
    /// Memory the node's awake services may hold: restore anywhere wakes a service only on a
    /// node where its footprint still fits.
    pub memory_bytes: u64,
}

/// A node's memory for services when its group does not say (a typical two-socket server).
pub const DEFAULT_NODE_MEMORY: u64 = 256 << 30;

/// How often restore anywhere drains the emptiest awake node of each group by default.
pub const DEFAULT_CONSOLIDATE_EVERY: Duration = Duration::from_secs(60);

/// A service group.
#[derive(Debug, Clone)]
pub struct ServiceGroup {
    pub name: String,
    pub count: u32,
    pub footprint_bytes: u64,
    pub arrival: Arc<Arrivals>,
    pub service_time: ServiceTime,
    pub node_group: usize,
    /// CPUs (CPU-seconds per second) one of its services keeps busy while awake with no
    /// request: what the node pays for leaving it awake, and what freezing it saves.
    pub idle_cpus: f64,
    /// Wakeups per second of an awake idle service (a runtime's timers, GC, heartbeats): each
    /// keeps a core out of its deepest idle state, so awake idle is not free.
    pub idle_wakeups_per_s: f64,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub duration: Duration,
    pub policy: PolicyName,
    pub idle_threshold: Duration,
    pub approach: Approach,
    pub node_sleep_after: Option<Duration>,
    /// Where snapshotted services wake.
    pub restore: RestoreMode,
    /// Restore anywhere: the period of the consolidation pass that drains the emptiest node.
    pub consolidate_every: Duration,
    pub cr: CrModel,
    pub nodes: Vec<NodeGroup>,
    pub services: Vec<ServiceGroup>,
}

fn duration(key: &str, text: &str) -> Result<Duration, SimConfigError> {
    torpor_image::parse_duration(text).map_err(|e| invalid(key, e.to_string()))
}

impl SimConfig {
    pub fn load(path: &Path) -> Result<SimConfig, SimConfigError> {
        SimConfig::from_toml(&torpor_configfile::read(path)?)
    }

    pub fn from_toml(text: &str) -> Result<SimConfig, SimConfigError> {
        let raw: RawConfig = toml::from_str(text)?;
        let mut nodes = Vec::new();
        for (i, n) in raw.nodes.iter().enumerate() {
            let key = |f: &str| format!("node[{i}].{f}");
            let profile =
                Profile::resolve(&n.profile).map_err(|e| invalid(key("profile"), e.to_string()))?;
            if n.count == 0 {
                return Err(invalid(key("count"), "must be at least 1"));
            }
            let cores = n.cores.unwrap_or_else(|| profile.cores());
            if cores == 0 {
                return Err(invalid(key("cores"), "must be at least 1"));
            }
            let memory_bytes = match &n.memory {
                Some(m) => torpor_image::parse_size(m)
                    .map_err(|e| invalid(key("memory"), e.to_string()))?,
                None => DEFAULT_NODE_MEMORY,
            };
            nodes.push(NodeGroup {
                name: n.name.clone(),
                count: n.count,
                profile: Arc::new(profile),
                cores,
                memory_bytes,
            });
        }
        if nodes.is_empty() {
            return Err(invalid("node", "give at least one [[node]] group"));
        }
        let mut services = Vec::new();
        for (i, s) in raw.services.into_iter().enumerate() {
            let key = |f: &str| format!("service[{i}].{f}");
            let node_group = nodes
                .iter()
                .position(|n| n.name == s.nodes)
                .ok_or_else(|| invalid(key("nodes"), format!("no node group {:?}", s.nodes)))?;
            let footprint_bytes = torpor_image::parse_size(&s.footprint)
                .map_err(|e| invalid(key("footprint"), e.to_string()))?;
            let mean = s.service_time.mean_s();
            if !(mean > 0.0 && mean.is_finite()) {
                return Err(invalid(key("service_time"), "needs a positive mean"));
            }
            for (field, v) in [
                ("idle_cpus", s.idle_cpus),
                ("idle_wakeups_per_s", s.idle_wakeups_per_s),
            ] {
                if !(v >= 0.0 && v.is_finite()) {
                    return Err(invalid(key(field), "must be zero or more"));
                }
            }
            services.push(ServiceGroup {
                name: s.name,
                count: s.count,
                footprint_bytes,
                arrival: Arc::new(s.arrival),
                service_time: s.service_time,
                node_group,
                idle_cpus: s.idle_cpus,
                idle_wakeups_per_s: s.idle_wakeups_per_s,
            });
        }
        if services.is_empty() {
            return Err(invalid("service", "give at least one [[service]] group"));
        }
        let idle_threshold = match &raw.idle_threshold {
            Some(t) => duration("idle_threshold", t)?,
            // The governor decides by cost, not by a threshold: by default it only waits as
            // long as the live agent does before it looks.
            None if raw.policy == PolicyName::Governor => PolicyConfig::default().idle_threshold,
            None if raw.policy.sleeps_services() && raw.policy != PolicyName::Oracle => {
                return Err(invalid(
                    "idle_threshold",
                    format!("policy {} needs one", raw.policy.as_str()),
                ))
            }
            None => Duration::ZERO,
        };
        Ok(SimConfig {
            seed: raw.seed,
            duration: duration("duration", &raw.duration)?,
            policy: raw.policy,
            idle_threshold,
            approach: raw.approach,
            node_sleep_after: raw
                .node_sleep_after
                .as_deref()
                .map(|t| duration("node_sleep_after", t))
                .transpose()?,
            restore: raw.restore,
            consolidate_every: match raw.consolidate_every.as_deref() {
                Some(t) => match duration("consolidate_every", t)? {
                    d if d.is_zero() => {
                        return Err(invalid("consolidate_every", "must be longer than zero"))
                    }
                    d => d,
                },
                None => DEFAULT_CONSOLIDATE_EVERY,
            },
            cr: raw.calibration.unwrap_or_default(),
            nodes,
            services,
        })
    }

    /// The service-time distribution of a service group by index.
    pub fn service_time_of(&self, group: usize) -> &ServiceTime {
        &self.services[group].service_time
    }

    /// Checkpoint and restore seconds for a footprint, fabric included.
    pub fn cr_times(&self, footprint_bytes: u64) -> (f64, f64) {
        let gib = footprint_bytes as f64 / (1u64 << 30) as f64;
        let (lat, bw) = self.approach.fabric();
        let wire = lat + footprint_bytes as f64 / bw;
        (
            self.cr.checkpoint_fixed_s + self.cr.checkpoint_per_gib_s * gib + wire,
            self.cr.restore_fixed_s + self.cr.restore_per_gib_s * gib + wire,
        )
    }
}
