//! The `torpor` command: parses arguments and calls the libraries. One subcommand per role,
//! one module per subcommand under `commands/`.

mod commands;
mod signals;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use commands::*;
use torpor_agent::ManualCommand;

#[derive(Debug, Parser)]
#[command(
    name = "torpor",
    version,
    about = "Checkpoint idle services into a memory pool and wake them on request"
)]
struct Cli {
    /// How log lines are written to stderr: `text` for people, `json` (one object per line)
    /// for log shippers reading the journal.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The whole system on this machine under a bursty load (or --walkthrough: one
    /// checkpoint and restore by hand).
    Demo(demo::DemoArgs),
    /// Check what this host has and lacks for torpor.
    Doctor(doctor::DoctorArgs),
    /// Run pool, agent and gates on this machine from one config file (the embedded default).
    Up(up::UpArgs),
    /// Put a service of a running `torpor up` to sleep now (drained, checkpointed, stopped).
    Sleep(control::ServiceArgs),
    /// Wake a service of a running `torpor up` now (a no-op, said so, if it is awake).
    Wake(control::ServiceArgs),
    /// Keep a service awake (waking it if asleep): the policy does not put it to sleep.
    Pin(control::PinArgs),
    /// Hand a pinned service back to the policy.
    Unpin(control::ServiceArgs),
    /// Make a running `torpor up` read its torpor.toml again (as SIGHUP does): added
    /// services start, removed ones stop, changed ones take the change; an invalid file or a
    /// node-level change is refused and nothing of it applied.
    Reload(control::ReloadArgs),
    /// Stop a running `torpor up` as SIGTERM does (awake services are checkpointed into a
    /// pool that outlives it, else stopped). With --keep-running its awake services are left
    /// running and its asleep ones in the pool: the next `torpor up` adopts them. Refused when
    /// an asleep service's snapshot would go with the process (the embedded pool without a
    /// spill_dir).
    Stop(control::StopArgs),
    /// Show the services of a running `torpor up`.
    Status(status::StatusArgs),
    /// Run a memory pool server.
    Pool(pool::PoolArgs),
    /// Write a self-signed certificate and key for a TCP pool (pool.crt, pool.key; files
    /// 0600), and with --client a client CA and a client certificate for mutual TLS.
    PoolCert(pool_cert::PoolCertArgs),
    /// List the snapshots a pool holds.
    Snapshots(snapshots::SnapshotsArgs),
    /// Checkpoint a process tree into a pool.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Restore a snapshot from a pool; prints the restored root PID.
    Restore(restore::RestoreArgs),
    /// Power: live C-state residency and power (measured or modelled), turbostat logs,
    /// profile calibration.
    Power(power::PowerArgs),
    /// Open-loop load: Poisson, bursty on/off, diurnal or trace-replay arrivals; latency
    /// percentiles per phase.
    Loadgen(loadgen::LoadgenArgs),
    /// µSuite: one tier (bucket, mid, client) of HDSearch, Router, Set Algebra or Recommend.
    Usuite(usuite::UsuiteArgs),
    /// Cluster simulator: energy and latency of the policies at scale (see examples/sim-*.toml).
    Sim(sim::SimArgs),
    /// Benchmarks, each with its baseline measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// The sample service used by tests, the demo and benchmarks.
    #[command(hide = true)]
    SampleService(samples::SampleArgs),
    /// The mutator sample service (differential sleep/wake tests).
    #[command(hide = true)]
    MutatorService(samples::ListenArgs),
    /// The gRPC sample service (grpc.health.v1).
    #[command(hide = true)]
    SampleGrpc(samples::ListenArgs),
}

fn main() -> ExitCode {
    // The init of a service's PID namespace is this binary too; it must run before anything
    // else (no threads, no logging), as it stays inside the service's checkpoints.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).map(|a| a.as_os_str()) == Some(torpor_agent::init::SUBCOMMAND.as_ref()) {
        return ExitCode::from(torpor_agent::init::main(&args[2..]));
    }
    // SIGTERM and SIGINT wait (blocked) until `torpor up` has its handlers: one that arrives
    // while it starts must stop it cleanly, not kill it with its services half started.
    let stop = signals::stop_signal_set();
    let _ = stop.thread_block();
    let cli = Cli::parse();
    if !matches!(cli.command, Cmd::Up(_)) {
        let _ = stop.thread_unblock();
    }
    // Servers log what they do; one-shot commands and the demo only warn.
    let default = match cli.command {
        Cmd::Pool(_) | Cmd::Up(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let log_format = cli.log_format;
    match log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    match run(cli) {
        Ok(code) => code,
        // A shipper parsing JSON lines gets the failure as one of them.
        Err(e) if log_format == LogFormat::Json => {
            tracing::error!(error = format!("{e:#}"), "torpor failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("torpor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Demo(args) => demo::run(&args)?,
        Cmd::Doctor(args) => return doctor::run(&args),
        Cmd::Up(args) => up::run(&args, cli.log_format)?,
        Cmd::Sleep(args) => return control::service(&args, ManualCommand::Sleep),
        Cmd::Wake(args) => return control::service(&args, ManualCommand::Wake),
        Cmd::Pin(args) => return control::pin(&args),
        Cmd::Unpin(args) => return control::service(&args, ManualCommand::Unpin),
        Cmd::Reload(args) => return control::reload(&args),
        Cmd::Stop(args) => return control::stop(&args),
        Cmd::Status(args) => status::run(&args)?,
        Cmd::Pool(args) => pool::run(args)?,
        Cmd::PoolCert(args) => pool_cert::run(&args)?,
        Cmd::Snapshots(args) => snapshots::run(&args)?,
        Cmd::Checkpoint(args) => checkpoint::run(&args)?,
        Cmd::Restore(args) => restore::run(&args)?,
        Cmd::Power(args) => power::run(args)?,
        Cmd::Loadgen(args) => loadgen::run(&args)?,
        Cmd::Usuite(args) => usuite::run(args)?,
        Cmd::Sim(args) => sim::run(&args)?,
        Cmd::Bench(cmd) => bench::run(cmd)?,
        Cmd::SampleService(args) => samples::sample(args)?,
        Cmd::MutatorService(args) => samples::mutator(args)?,
        Cmd::SampleGrpc(args) => samples::grpc(args)?,
    }
    Ok(ExitCode::SUCCESS)
}
