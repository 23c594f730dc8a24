//! `torpor checkpoint`: a process tree into a pool.

use anyhow::Result;
use torpor_criu::CheckpointOptions;
use torpor_image::format_bytes;

use super::{
    criu,
    opts::{CriuFlags, PoolOpt},
    print_json,
};

/// Arguments of `torpor checkpoint`.
#[derive(Debug, clap::Args)]
pub struct CheckpointArgs {
    /// Root of the process tree.
    #[arg(long)]
    pid: i32,
    /// Snapshot name (letters, digits, '.', '_', '-').
    #[arg(long)]
    name: String,
    #[command(flatten)]
    pool: PoolOpt,
    /// Keep the tree running (take a copy).
    #[arg(long)]
    leave_running: bool,
    #[command(flatten)]
    criu: CriuFlags,
    #[arg(long)]
    json: bool,
}

/// Checkpoints the tree and says what went into the pool.
pub fn run(args: &CheckpointArgs) -> Result<()> {
    let opts = CheckpointOptions {
        leave_running: args.leave_running,
        shell_job: args.criu.shell_job,
        tcp: args.criu.tcp(),
        ..Default::default()
    };
    let r = torpor_criu::checkpoint_to_pool(
        &criu()?,
        args.pid,
        &args.name,
        &args.pool.pools()?,
        &opts,
    )?;
    if args.json {
        return print_json(&r);
    }
    println!(
        "checkpointed pid {} ({} process{}, {} resident) into {} as {} generation {}{}",
        r.root_pid,
        r.pids.len(),
        if r.pids.len() == 1 { "" } else { "es" },
        format_bytes(r.footprint_bytes),
        args.pool.pool,
        r.name,
        r.generation,
        if r.left_running {
            " (left running)"
        } else {
            ""
        }
    );
    println!(
        "  {} in {} files; checkpoint {:.3} s, frozen {}, peak local staging {}",
        format_bytes(r.pool_bytes),
        r.files,
        r.checkpoint_s,
        r.frozen_s
            .map(|f| format!("{f:.3} s"))
            .unwrap_or_else(|| "n/a".into()),
        format_bytes(r.peak_staging_bytes)
    );
    Ok(())
}
