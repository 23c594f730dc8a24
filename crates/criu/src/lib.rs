//! Driving CRIU for torpor.
//!
//! * [`binary`] finds the CRIU to run (the project's private 4.2 prefix first) and runs it.
//! * [`streamer`] speaks CRIU's image-streamer protocol (`--stream`), so images flow between
//!   CRIU and the pool through pipes without being staged whole on the node.
//! * [`checkpoint`] dumps a process tree into the pool; the dump commits only if the pool
//!   commits, otherwise CRIU resumes the tree (its post-dump action-script veto).
//! * `run` is the skeleton both share: a work directory with the streamer socket, CRIU run
//!   as the chosen identity, one thread serving that socket to that CRIU only.
//! * [`restore`] restores a snapshot eagerly straight from the pool, after waiting for the tree's PIDs
//!   to be free again (a tree that had its own PID namespace gets a fresh one and does not wait).
//! * [`lazy`] restores a snapshot lazily (torpor's lazy-pages server serves memory from the
//!   pool on first touch) and makes the next checkpoint incremental; [`pagemap`] reads the
//!   CRIU memory images it plans from.
//! * [`filled`] restores eagerly through userfaultfd: every page copied in before the tasks
//!   run, without CRIU's page-by-page faults.
//! * [`local`] is stock CRIU with images in a directory: the baseline for benchmarks.
//! * [`replicas`] commits to a quorum of pool replicas under the node's seal and verifies
//!   seals on the way back.
//! * [`runc`] checkpoints and restores OCI containers through runc, via the pool.
//! * [`kdat`] keeps CRIU's kernel-feature cache working where `/run` is not a tmpfs.
//! * [`identity`] chooses and applies the identity CRIU runs as (root, or the tree's own uid
//!   where root lacks CAP_SYS_RESOURCE).
//! * [`procs`] reads process trees, footprints and credentials from `/proc`; [`stats`]
//!   decodes CRIU's `stats-dump` image (frozen time).

pub mod armed;
pub mod binary;
pub mod checkpoint;
mod dump_lock;
pub mod filled;
pub mod identity;
pub mod kdat;
pub mod lazy;
pub mod local;
pub mod pagemap;
mod pool_pages;
pub mod procs;
pub mod replicas;
pub mod restore;
mod run;
pub mod runc;
pub mod stats;
pub mod streamer;

pub use binary::{CriuBinary, CriuError};
pub use checkpoint::{
    checkpoint_to_pool, checkpoint_to_pool_with, run_as_for_tree, CheckpointError,
    CheckpointOptions, CheckpointReport, TcpConnections,
};
pub use identity::{CriuIdentity, RunAs};
pub use lazy::{restore_lazy_from_pool, Increment, LazyOptions, LazySession, LazyWake};
pub use replicas::{Pools, ReplicatedUpload};
pub use restore::{
    restore_from_pool, restore_streamed, RestoreError, RestoreOptions, RestoreReport,
};

/// How to reach a pool; it lives in the pool crate (with its TLS and timeout settings) and
/// is re-exported here for the engine's callers.
pub use torpor_pool::PoolTarget;
