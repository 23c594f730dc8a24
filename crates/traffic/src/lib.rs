//! Traffic as data, with no I/O runtime: arrival processes (Poisson, bursty on/off, diurnal,
//! replay of per-minute counts) as seeded generators of arrival times, the per-minute trace
//! schema (Azure Functions 2019), and latency percentiles. The load generator sends requests on
//! these schedules; the simulator replays the same processes in virtual time.

pub mod arrival;
pub mod percentiles;
pub mod trace;

pub use arrival::{ArrivalStream, Arrivals, Dist, SpecError};
pub use percentiles::Percentiles;
pub use trace::{Trace, TraceError};
