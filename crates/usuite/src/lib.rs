//! µSuite (Sriraman and Wenisch, IISWC 2018) in Rust: four services, each a mid-tier that fans
//! out to N buckets and merges, speaking gRPC. Data sets are generated from a seed, identically in
//! every process, because the originals cannot be downloaded here.

// gRPC handlers must return tonic::Status, a large error type by design.
#![allow(clippy::result_large_err)]

pub mod cli;
pub mod client;
pub mod data;
pub mod hdsearch;
pub mod memcached;
pub mod recommend;
pub mod router;
pub mod setalgebra;
pub mod tier;

pub mod proto {
    #![allow(clippy::all)] // generated code
    tonic::include_proto!("usuite");
}

/// The four services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    Hdsearch,
    Router,
    Setalgebra,
    Recommend,
}

impl Service {
    pub const ALL: [Service; 4] = [
        Service::Hdsearch,
        Service::Router,
        Service::Setalgebra,
        Service::Recommend,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Service::Hdsearch => "hdsearch",
            Service::Router => "router",
            Service::Setalgebra => "setalgebra",
            Service::Recommend => "recommend",
        }
    }
}
