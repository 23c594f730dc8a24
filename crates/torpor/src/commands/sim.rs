//! `torpor sim`: the cluster simulator's study, run by the bench crate.

use anyhow::Result;
pub use torpor_bench::sim::SimArgs;

/// Runs the study a simulator config describes.
pub fn run(args: &SimArgs) -> Result<()> {
    Ok(torpor_bench::sim::run(args)?)
}
