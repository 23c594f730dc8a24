//! The hidden sample services that tests, the demo and the benchmarks run under torpor.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Result;
use torpor_image::size_arg;

/// `torpor sample-service`: memory to checkpoint, a TOUCH request that changes some of it.
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long, default_value = "64MiB", value_parser = size_arg)]
    memory: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Bytes each TOUCH request reads and changes (clipped to --memory).
    #[arg(long, default_value_t = torpor_workload::DEFAULT_TOUCH, value_parser = size_arg)]
    touch: u64,
    /// Background wakeups per second (a language runtime's timers).
    #[arg(long, default_value_t = torpor_workload::ticker::RUNTIME_HZ)]
    tick_hz: f64,
    /// Bytes of its own heap each wakeup reads and changes (0: the wakeup only counts).
    #[arg(long, default_value = "0", value_parser = size_arg)]
    tick_work: u64,
    #[arg(long)]
    port_file: Option<PathBuf>,
}

/// Where a sample service listens and where it writes the port it got.
#[derive(Debug, clap::Args)]
pub struct ListenArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long)]
    port_file: Option<PathBuf>,
}

/// Runs the sample service.
pub fn sample(args: SampleArgs) -> Result<()> {
    Ok(torpor_workload::run(&torpor_workload::SampleConfig {
        listen: args.listen,
        memory: args.memory,
        seed: args.seed,
        touch: args.touch,
        port_file: args.port_file,
        ticker: torpor_workload::ticker::Ticker {
            hz: args.tick_hz,
            work: args.tick_work,
        },
    })?)
}

/// Runs the mutator service.
pub fn mutator(args: ListenArgs) -> Result<()> {
    Ok(torpor_workload::mutator::run(
        &torpor_workload::mutator::MutatorConfig {
            listen: args.listen,
            port_file: args.port_file,
        },
    )?)
}

/// Runs the gRPC sample service.
pub fn grpc(args: ListenArgs) -> Result<()> {
    Ok(torpor_workload::grpc::run(
        args.listen,
        args.port_file.as_deref(),
    )?)
}
