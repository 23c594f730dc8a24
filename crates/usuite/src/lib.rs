//! µSuite (Sriraman and Wenisch, IISWC 2018) in Rust: four services, each a mid-tier that fans
//! out to N buckets and merges, speaking gRPC. Data sets are generated from a seed, identically in
//! every process, because the originals cannot be downloaded here.

// gRPC handlers must return tonic::Status, a large error type by design.
#![allow(clippy::result_large_err)]

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
