//! `torpor demo`: the whole system under a bursty load, an experiment of the bench crate.

use anyhow::Result;
pub use torpor_bench::demo::DemoArgs;

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    Ok(torpor_bench::demo::run(args)?)
}
