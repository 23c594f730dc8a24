//! Power for torpor: telemetry (per-CPU busy time and cpuidle residency, RAPL energy where the
//! hardware has it), turbostat logs, the power model and its platform profiles for machines
//! without energy counters, the reversible power knobs the agent turns (cpusets, idle states,
//! PM QoS, CPU offline, node sleep hooks) and the energy account that says whether it measured
//! or modelled. Every OS path is under a root the caller gives, so tests run on fake trees.

pub mod calibrate;
pub mod model;
pub mod profile;
pub mod render;
pub mod turbostat;

pub use model::{CoreResidency, IdleGroup, Model, NodeSleepEconomics, PowerBreakdown};
pub use profile::{Profile, ProfileError};
pub use turbostat::{TurbostatError, TurbostatLog};

pub mod cpuidle;
pub mod cpulist;
pub mod energy;
pub mod knobs;
pub mod rapl;
mod sysfs;
pub mod telemetry;

pub use cpuidle::HostRoots;
pub use telemetry::{IntervalReport, PowerSource, Sample};

use std::path::PathBuf;

/// Why the node's counters could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Malformed(PathBuf, String),
}
