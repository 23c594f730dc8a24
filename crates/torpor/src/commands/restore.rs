//! `torpor restore`: a snapshot from a pool; prints the restored root PID.

use anyhow::Result;
use torpor_criu::RestoreOptions;
use torpor_image::format_bytes;

use super::{
    criu,
    opts::{CriuFlags, PoolOpt},
    print_json,
};

/// Arguments of `torpor restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    #[arg(long)]
    name: String,
    #[command(flatten)]
    pool: PoolOpt,
    /// Generation to restore (default: the newest).
    #[arg(long)]
    generation: Option<u64>,
    #[command(flatten)]
    criu: CriuFlags,
    #[arg(long)]
    json: bool,
}

/// Restores the snapshot and says how.
pub fn run(args: &RestoreArgs) -> Result<()> {
    let opts = RestoreOptions {
        shell_job: args.criu.shell_job,
        tcp: args.criu.tcp(),
        ..Default::default()
    };
    let r = torpor_criu::restore_from_pool(
        &criu()?,
        &args.name,
        args.generation,
        &args.pool.pools()?,
        &opts,
    )?;
    if args.json {
        return print_json(&r);
    }
    println!(
        "restored {} generation {} as pid {} in {:.3} s ({} fetched, {})",
        r.name,
        r.generation,
        r.pid,
        r.restore_s,
        format_bytes(r.bytes_fetched),
        if r.filled {
            "every page copied in before it ran"
        } else {
            "read by CRIU"
        }
    );
    Ok(())
}
