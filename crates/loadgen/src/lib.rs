//! torpor's open-loop load generator. Arrival processes (Poisson, bursty on/off, diurnal,
//! per-minute trace replay in the Azure Functions 2019 schema) produce a seeded schedule; a
//! dispatcher thread sends each request on its timer whether or not earlier ones returned, and
//! latency lands in an HDR histogram per phase, measured from the scheduled time.

pub mod arrival;
pub mod cli;
pub mod engine;
pub mod target;
pub mod trace;

pub use arrival::{ArrivalStream, Arrivals, Dist, SpecError};
pub use cli::{LoadgenArgs, LoadgenError, RunArgs};
pub use engine::{render, run, LoadReport, Percentiles, Phase, PhaseReport, RunConfig};
pub use target::{HttpGet, Target, TcpLine};
pub use trace::{Trace, TraceError};
