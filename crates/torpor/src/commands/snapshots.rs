//! `torpor snapshots`: the snapshots a pool holds.

use anyhow::Result;
use torpor_image::{format_bytes, unix_ms_to_utc};

use super::{opts::PoolOpt, print_json};

/// Arguments of `torpor snapshots`.
#[derive(Debug, clap::Args)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    pool: PoolOpt,
    #[arg(long)]
    json: bool,
}

/// Lists them as a table (or JSON).
pub fn run(args: &SnapshotsArgs) -> Result<()> {
    let list = args.pool.target()?.connect()?.list()?;
    if args.json {
        return print_json(&list);
    }
    println!(
        "{:<24} {:>10} {:>12} {:>5}  created",
        "name", "generation", "bytes", "tier"
    );
    for s in list {
        println!(
            "{:<24} {:>10} {:>12} {:>5}  {}",
            s.name,
            s.generation,
            format_bytes(s.bytes),
            s.tier,
            unix_ms_to_utc(s.created_unix_ms)
        );
    }
    Ok(())
}
