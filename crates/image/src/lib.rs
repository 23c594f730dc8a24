//! Formats shared by the memory pool, its clients and the disk tier: the snapshot manifest,
//! the framed wire protocol spoken with the pool, the on-disk snapshot file, and the size
//! and name rules every one of them enforces. Everything that crosses a process boundary
//! carries a magic, a version, a checksum and a size bound, and is checked on the way in. The
//! units module is the one parser of sizes and durations people type.

pub mod manifest;
pub mod names;
pub mod pages;
pub mod seal;
pub mod snapfile;
pub mod units;
pub mod wire;

pub use manifest::{FileEntry, Manifest, CHUNK_SIZE};
pub use names::{validate_file_name, validate_snapshot_name, NameError};
pub use seal::{NodeKey, Seal, SealError};
pub use units::{
    duration_arg, format_bytes, parse_duration, parse_size, size_arg, unix_ms_to_utc,
    DurationError, SizeError,
};
