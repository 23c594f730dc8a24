//! One module per `torpor` subcommand, each a thin mapping from its arguments to library calls.
//! The product commands (pool, snapshots, checkpoint, restore, up, status, the control
//! commands, power, doctor) use product crates only; the experiments (bench, demo, sim,
//! loadgen, usuite) are imported by their own command modules and nowhere else.

pub mod bench;
pub mod checkpoint;
pub mod control;
pub mod demo;
pub mod doctor;
pub mod loadgen;
pub mod opts;
pub mod pool;
pub mod pool_cert;
pub mod power;
pub mod restore;
pub mod samples;
pub mod sim;
pub mod snapshots;
pub mod status;
pub mod up;
pub mod usuite;

use anyhow::Result;
use torpor_criu::CriuBinary;

/// Prints `v` as pretty JSON on stdout (every command's `--json`).
pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The CRIU binary the commands that checkpoint or restore drive.
pub fn criu() -> Result<CriuBinary> {
    Ok(CriuBinary::locate()?)
}
