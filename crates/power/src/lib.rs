//! Power for torpor: telemetry (per-CPU busy time and cpuidle residency, RAPL energy where the
//! hardware has it), turbostat logs, the power model and its platform profiles for machines
//! without energy counters, the reversible power knobs the agent turns (cpusets, idle states,
//! PM QoS, CPU offline, node sleep hooks) and the energy account that says whether it measured
//! or modelled. Every OS path is under a root the caller gives, so tests run on fake trees.

pub mod calibrate;
pub mod model;
pub mod profile;
pub mod turbostat;

pub use model::{CoreResidency, IdleGroup, Model, PowerBreakdown};
pub use profile::{Profile, ProfileError};
pub use turbostat::{TurbostatError, TurbostatLog};
