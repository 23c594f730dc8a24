//! torpor's cluster simulator: a discrete-event model of nodes (cores, idle states and node sleep
//! from the power profiles), a memory pool reached over a fabric (CXL, RDMA, tiered memory +
//! NVMe), services with arrival processes (the load generator's) and service times, and the
//! policies of the live system (`crates/policy`) beside always-on, C6-only, PowerNap and an
//! oracle bound. Own clock, seeded RNG: the same seed gives the same answer.

pub mod calibrate;
pub mod config;
pub mod engine;
mod queue;
pub mod study;

pub use config::{Approach, CrModel, PolicyName, RestoreMode, SimConfig, SimConfigError};
pub use engine::{simulate, GroupReport, ServiceGroupReport, SimReport};
