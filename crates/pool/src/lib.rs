//! The memory pool: stores snapshots (a manifest plus CRIU image files) for compute nodes.
//!
//! * [`arena`] owns the RAM tier's memory: one pre-faulted mapping cut into chunks, reused.
//! * [`store`] owns the snapshots: generations, atomic commit, LRU spill to disk, checksums.
//! * [`crc`] combines CRC32Cs of adjacent pieces fast (per-block checksums rely on it).
//! * [`server`] speaks the wire protocol of `torpor_image::wire` to many clients.
//! * [`client`] is the blocking client used by the CRIU engine and the CLI; [`target`] says
//!   how it reaches a pool (address, token, TLS, timeouts).
//! * [`tls`] owns TLS for TCP pools: server config, pinned client config, certificates.
//! * [`addr`] parses `HOST:PORT` and `unix:PATH` addresses.
//! * [`token`] reads and writes the shared token file (owner-only, long enough).

pub mod addr;
pub mod arena;
pub mod client;
pub mod crc;
pub mod server;
mod splice;
pub mod store;
pub mod target;
pub mod tls;
pub mod token;

pub use addr::{AddrError, PoolAddr};
pub use client::{ClientError, FrameSink, PoolClient, Stage};
pub use server::{serve, serve_with, Listener, ServeOptions};
pub use store::{error_chain, Persisted, Store, StoreConfig, StoreError};
pub use target::{PoolTarget, Timeouts};
pub use tls::{ClientTls, TlsError};
pub use token::{read_token, read_token_file, write_token_file, TokenFileError};

/// A fresh random shared token (32 alphanumerics) for a pool and its clients.
pub fn random_token() -> String {
    use rand::Rng;
    rand::thread_rng()
        .sample_iter(rand::distributions::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}
