//! torpor's experiments on a real machine: `torpor bench cr` (checkpoint/restore against
//! stock CRIU in the same run), `torpor demo` (the whole system under a bursty load) and its
//! `--walkthrough` (checkpoint and restore by hand), plus the harness they use to start a
//! pool and sample services as real processes and to reap what they restore.

pub mod cr;
pub mod demo;
pub mod fabric;
pub mod gate;
pub mod harness;
pub mod inproc;
pub mod lazywake;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod sim;
pub mod wake;
pub mod walkthrough;

/// Why an experiment stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("starting or talking to a process failed")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Criu(#[from] torpor_criu::CriuError),
    #[error("checkpoint failed")]
    Checkpoint(#[from] torpor_criu::CheckpointError),
    #[error("restore failed")]
    Restore(#[from] torpor_criu::RestoreError),
    #[error("stock CRIU baseline failed")]
    Baseline(#[from] torpor_criu::local::LocalCriuError),
    #[error("pool request failed")]
    Pool(#[from] torpor_pool::ClientError),
    #[error("{0}")]
    Mismatch(String),
    #[error(transparent)]
    Up(#[from] torpor_up::UpError),
    #[error(transparent)]
    Config(#[from] torpor_up::ConfigError),
    #[error("network fabric failed")]
    Fabric(#[from] fabric::FabricError),
    #[error("pool TLS set-up failed")]
    Tls(#[from] torpor_pool::TlsError),
    #[error("kernel steering failed")]
    Steer(#[from] torpor_steer::SteerError),
}
