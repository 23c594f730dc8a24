//! `torpor bench …`: the benchmarks, each with its baseline measured in the same run.

use anyhow::Result;

use super::criu;

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCmd {
    /// Checkpoint/restore: stock CRIU with images in /dev/shm vs torpor through a pool.
    Cr(torpor_bench::cr::CrArgs),
    /// The gate: warm overhead vs direct, and wake latency vs cold start and stock CRIU.
    Gate(torpor_bench::gate::GateArgs),
    /// The seed's four configurations under the same µSuite load: power and latency tables
    /// (7.1, 7.2) and plots.
    Scenario(torpor_bench::scenario::ScenarioArgs),
    /// First response after a sleep for nginx behind torpor up (p50, worst, the agent's wake
    /// timeline) vs stock CRIU restoring the same nginx from /dev/shm.
    Wake(torpor_bench::wake::WakeArgs),
}

/// Runs one benchmark.
pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Cr(args) => torpor_bench::cr::run(&criu()?, &args)?,
        BenchCmd::Gate(args) => torpor_bench::gate::run(&criu()?, &args)?,
        BenchCmd::Scenario(args) => torpor_bench::scenario::run(&args)?,
        BenchCmd::Wake(args) => torpor_bench::wake::run(&criu()?, &args)?,
    }
    Ok(())
}
