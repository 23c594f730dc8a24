//! torpor's open-loop load generator. Arrival processes (Poisson, bursty on/off, diurnal,
//! per-minute trace replay in the Azure Functions 2019 schema) produce a seeded schedule; a
//! dispatcher thread sends each request on its timer whether or not earlier ones returned, and
//! latency lands in an HDR histogram per phase, measured from the scheduled time. The arrival
//! processes, the trace schema and the percentiles are the pure `torpor-traffic` crate's.

pub mod cli;
pub mod engine;
pub mod target;

pub use cli::{LoadgenArgs, LoadgenError, RunArgs};
pub use engine::{process_cpu_s, render, run, LoadReport, Phase, PhaseReport, RunConfig};
pub use target::{HttpGet, Target, TcpLine};
