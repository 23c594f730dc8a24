//! `torpor loadgen`: open-loop load against an HTTP or line-protocol target.

use std::sync::Arc;

use anyhow::Result;
pub use torpor_loadgen::LoadgenArgs;

use super::print_json;

/// Runs the load and prints its report.
pub fn run(args: &LoadgenArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let target = torpor_loadgen::cli::target(&args.target, &args.line)?;
    run_load(&rt, target, &args.run)
}

/// Runs the load `args` describe against `target` on `rt` and prints the report (or JSON).
pub fn run_load(
    rt: &tokio::runtime::Runtime,
    target: Arc<dyn torpor_loadgen::Target>,
    args: &torpor_loadgen::RunArgs,
) -> Result<()> {
    let config = args.config()?;
    let report = rt.block_on(torpor_loadgen::run(target, &config));
    if args.json {
        print_json(&report)?;
    } else {
        print!("{}", torpor_loadgen::render(&report));
    }
    Ok(())
}
