//! The `torpor` command: parses arguments and calls the libraries. One subcommand per role.

mod power;

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use torpor_criu::{CheckpointOptions, CriuBinary, PoolTarget, Pools, RestoreOptions};
use torpor_image::NodeKey;
use torpor_image::{format_bytes, parse_size};
use torpor_pool::{PoolAddr, Store, StoreConfig};

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
    Demo(torpor_bench::demo::DemoArgs),
    /// Check what this host has and lacks for torpor.
    Doctor {
        #[arg(long)]
        json: bool,
        /// The systemd unit file to check (with its drop-ins) [default: this process's own
        /// unit, else torpor.service in /etc/systemd/system, /usr/lib/systemd/system or
        /// /lib/systemd/system].
        #[arg(long)]
        unit: Option<PathBuf>,
    },
    /// Run pool, agent and gates on this machine from one config file (the embedded default).
    Up {
        /// Configuration file.
        #[arg(short, long, default_value = "torpor.toml")]
        config: PathBuf,
    },
    /// Put a service of a running `torpor up` to sleep now (drained, checkpointed, stopped).
    Sleep {
        /// The service's name.
        name: String,
        #[command(flatten)]
        control: ControlOpt,
    },
    /// Wake a service of a running `torpor up` now (a no-op, said so, if it is awake).
    Wake {
        name: String,
        #[command(flatten)]
        control: ControlOpt,
    },
    /// Keep a service awake (waking it if asleep): the policy does not put it to sleep.
    Pin {
        name: String,
        /// How long the pin lasts (e.g. 30m, 1h); until `torpor unpin` without it.
        #[arg(long = "for", value_parser = duration_arg)]
        for_: Option<std::time::Duration>,
        #[command(flatten)]
        control: ControlOpt,
    },
    /// Hand a pinned service back to the policy.
    Unpin {
        name: String,
        #[command(flatten)]
        control: ControlOpt,
    },
    /// Make a running `torpor up` read its torpor.toml again (as SIGHUP does): added
    /// services start, removed ones stop, changed ones take the change; an invalid file or a
    /// node-level change is refused and nothing of it applied.
    Reload {
        #[command(flatten)]
        control: ControlOpt,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running `torpor up` as SIGTERM does (awake services are checkpointed into a
    /// pool that outlives it, else stopped). With --keep-running its awake services are left
    /// running and its asleep ones in the pool: the next `torpor up` adopts them. Refused when
    /// an asleep service's snapshot would go with the process (the embedded pool without a
    /// spill_dir).
    Stop {
        #[arg(long)]
        keep_running: bool,
        #[command(flatten)]
        control: ControlOpt,
    },
    /// Show the services of a running `torpor up`.
    Status {
        /// Address of its status API.
        #[arg(long, default_value = torpor_up::config::DEFAULT_STATUS)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        json: bool,
    },
    /// Run a memory pool server.
    Pool(PoolArgs),
    /// Write a self-signed certificate and key for a TCP pool (pool.crt, pool.key; files
    /// 0600), and with --client a client CA and a client certificate for mutual TLS.
    PoolCert {
        /// Directory to write into (existing files are never overwritten).
        dir: PathBuf,
        /// Names the certificate is issued for (DNS names or IP addresses). Clients pin the
        /// certificate itself, so these are informational.
        #[arg(long = "name", default_values = ["localhost", "127.0.0.1"])]
        names: Vec<String>,
        /// Also write client-ca.crt (for `torpor pool --tls-client-ca`), client.crt and
        /// client.key (for `--pool-client-cert`/`--pool-client-key`).
        #[arg(long)]
        client: bool,
    },
    /// List the snapshots a pool holds.
    Snapshots {
        #[command(flatten)]
        pool: PoolOpt,
        #[arg(long)]
        json: bool,
    },
    /// Checkpoint a process tree into a pool.
    Checkpoint {
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
        /// The tree runs in a terminal session.
        #[arg(long)]
        shell_job: bool,
        /// Restore established TCP connections closed instead of keeping them (kept ones
        /// are held behind iptables rules by CRIU until the restore).
        #[arg(long)]
        tcp_close: bool,
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot from a pool; prints the restored root PID.
    Restore {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        pool: PoolOpt,
        /// Generation to restore (default: the newest).
        #[arg(long)]
        generation: Option<u64>,
        /// The tree ran in a terminal session.
        #[arg(long)]
        shell_job: bool,
        /// The checkpoint was taken with --tcp-close.
        #[arg(long)]
        tcp_close: bool,
        #[arg(long)]
        json: bool,
    },
    /// Power: live C-state residency and power (measured or modelled), turbostat logs,
    /// profile calibration.
    Power(power::PowerArgs),
    /// Open-loop load: Poisson, bursty on/off, diurnal or trace-replay arrivals; latency
    /// percentiles per phase.
    Loadgen(torpor_loadgen::LoadgenArgs),
    /// µSuite: one tier (bucket, mid, client) of HDSearch, Router, Set Algebra or Recommend.
    Usuite(torpor_usuite::cli::UsuiteArgs),
    /// Cluster simulator: energy and latency of the policies at scale (see examples/sim-*.toml).
    Sim(torpor_bench::sim::SimArgs),
    /// Benchmarks, each with its baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The sample service used by tests, the demo and benchmarks.
    #[command(hide = true)]
    SampleService {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
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
    },
    /// The mutator sample service (differential sleep/wake tests).
    #[command(hide = true)]
    MutatorService {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        #[arg(long)]
        port_file: Option<PathBuf>,
    },
    /// The gRPC sample service (grpc.health.v1).
    #[command(hide = true)]
    SampleGrpc {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        #[arg(long)]
        port_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
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

#[derive(Debug, clap::Args)]
struct PoolArgs {
    /// HOST:PORT, or unix:PATH for the same-host fast path.
    #[arg(long)]
    listen: PoolAddr,
    /// RAM tier size, pre-faulted at start (e.g. 8GiB).
    #[arg(long, value_parser = size_arg)]
    capacity: u64,
    /// Disk tier: least-recently-used snapshots move here when RAM is full.
    #[arg(long)]
    spill_dir: Option<PathBuf>,
    /// File holding the shared token clients must present.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve a TCP address without a token (anyone who can connect can read snapshots).
    #[arg(long)]
    no_auth: bool,
    /// Generations kept per snapshot name.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    keep: u64,
    /// Connections served at once [default: 3/4 of the open-file limit]; beyond it new
    /// connections replace unauthenticated ones, oldest first, or are closed.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Time a new connection has to authenticate (send Hello).
    #[arg(long, default_value = "5s", value_parser = duration_arg)]
    hello_timeout: std::time::Duration,
    /// An authenticated connection with nothing in progress is closed after this long.
    #[arg(long, default_value = "120s", value_parser = duration_arg)]
    idle_timeout: std::time::Duration,
    /// Longest pause inside a frame or an upload; an unfinished upload is then discarded.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    frame_timeout: std::time::Duration,
    /// Longest a client may stop reading (a stalled GetFile) before it is dropped.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    write_timeout: std::time::Duration,
    /// Serve TCP over TLS with this certificate (PEM; see `torpor pool-cert`).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM, mode 0600).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

/// A duration flag (`500ms`, `5s`, `2m`).
fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// Where a running `torpor up` takes commands: its control socket by default.
#[derive(Debug, clap::Args)]
struct ControlOpt {
    /// Its control socket (control.socket in torpor.toml) [default: /run/torpor/control.sock].
    #[arg(long, conflicts_with_all = ["control", "addr"])]
    socket: Option<PathBuf>,
    /// Its status address: the control endpoint is looked up there.
    #[arg(long, conflicts_with = "control")]
    addr: Option<std::net::SocketAddr>,
    /// Its TCP control address (control.listen), with --token-file.
    #[arg(long)]
    control: Option<std::net::SocketAddr>,
    /// The TCP control endpoint's token file (control.token_file).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct PoolOpt {
    /// Pool address: HOST:PORT or unix:PATH.
    #[arg(long)]
    pool: PoolAddr,
    /// File holding the pool's token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// This node's key: checkpoints are sealed with it and a restore refuses a snapshot it
    /// cannot verify with it (created, 0600, when absent).
    #[arg(long, default_value = torpor_up::config::DEFAULT_NODE_KEY)]
    node_key: PathBuf,
    /// The pool's certificate (PEM), pinned: the connection uses TLS and trusts exactly it.
    #[arg(long)]
    pool_cert: Option<PathBuf>,
    /// Client certificate for a pool that requires mutual TLS (PEM).
    #[arg(long, requires_all = ["pool_cert", "pool_client_key"])]
    pool_client_cert: Option<PathBuf>,
    /// The client certificate's key (PEM, mode 0600).
    #[arg(long, requires = "pool_client_cert")]
    pool_client_key: Option<PathBuf>,
    /// Allow plaintext TCP to a pool that is not on loopback (token and snapshots in clear).
    #[arg(long)]
    pool_insecure: bool,
}

impl PoolOpt {
    /// The pool with this node's key, for commands that write or restore snapshots.
    fn pools(&self) -> Result<Pools> {
        let key = NodeKey::load_or_create(&self.node_key)?;
        Ok(Pools::single(self.target()?, std::sync::Arc::new(key)))
    }

    fn target(&self) -> Result<PoolTarget> {
        let token = match &self.token_file {
            Some(f) => torpor_pool::read_token_file(f)?,
            None => String::new(),
        };
        let tls = match &self.pool_cert {
            Some(cert) => Some(torpor_pool::ClientTls::pinned(
                cert,
                self.pool_client_cert
                    .as_deref()
                    .zip(self.pool_client_key.as_deref()),
            )?),
            None => None,
        };
        Ok(PoolTarget::new(self.pool.clone(), token)
            .with_tls(tls)
            .with_insecure(self.pool_insecure))
    }
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
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
    let stop = stop_signal_set();
    let _ = stop.thread_block();
    let cli = Cli::parse();
    if !matches!(cli.command, Cmd::Up { .. }) {
        let _ = stop.thread_unblock();
    }
    // Servers log what they do; one-shot commands and the demo only warn.
    let default = match cli.command {
        Cmd::Pool(_) | Cmd::Up { .. } => "info",
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

fn tcp_mode(close: bool) -> torpor_criu::TcpConnections {
    if close {
        torpor_criu::TcpConnections::Close
    } else {
        torpor_criu::TcpConnections::Keep
    }
}

fn criu() -> Result<CriuBinary> {
    Ok(CriuBinary::locate()?)
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Demo(args) => torpor_bench::demo::run(&args)?,
        Cmd::Doctor { json, unit } => return doctor(json, unit.as_deref()),
        Cmd::Pool(args) => pool(args)?,
        Cmd::PoolCert { dir, names, client } => {
            let g = torpor_pool::tls::generate(&dir, &names, client)?;
            println!("pool certificate: {}", g.pool_cert.display());
            println!("pool key:         {}", g.pool_key.display());
            if let Some((ca, cert, key)) = g.client {
                println!("client CA:        {}", ca.display());
                println!("client cert:      {}", cert.display());
                println!("client key:       {}", key.display());
            }
        }
        Cmd::Up { config } => up(&config, cli.log_format)?,
        Cmd::Status { addr, json } => status(addr, json)?,
        Cmd::Sleep { name, control } => {
            return manual(&control, &name, torpor_agent::ManualCommand::Sleep)
        }
        Cmd::Wake { name, control } => {
            return manual(&control, &name, torpor_agent::ManualCommand::Wake)
        }
        Cmd::Pin {
            name,
            for_,
            control,
        } => {
            let for_ms = for_.map(|d| d.as_millis().max(1) as u64);
            return manual(&control, &name, torpor_agent::ManualCommand::Pin { for_ms });
        }
        Cmd::Unpin { name, control } => {
            return manual(&control, &name, torpor_agent::ManualCommand::Unpin)
        }
        Cmd::Reload { control, json } => return reload(&control, json),
        Cmd::Stop {
            keep_running,
            control,
        } => {
            let reply = send(&control, torpor_up::control::Order::Stop { keep_running })?;
            return Ok(if reply.succeeded() {
                println!("{}", reply.message);
                ExitCode::SUCCESS
            } else {
                eprintln!("torpor: {}", reply.message);
                ExitCode::FAILURE
            });
        }
        Cmd::SampleGrpc { listen, port_file } => {
            torpor_workload::grpc::run(listen, port_file.as_deref())?
        }
        Cmd::Snapshots { pool, json } => {
            let list = pool.target()?.connect()?.list()?;
            if json {
                print_json(&list)?;
            } else {
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
                        torpor_bench::report::unix_ms_to_utc(s.created_unix_ms)
                    );
                }
            }
        }
        Cmd::Checkpoint {
            pid,
            name,
            pool,
            leave_running,
            shell_job,
            tcp_close,
            json,
        } => {
            let opts = CheckpointOptions {
                leave_running,
                shell_job,
                tcp: tcp_mode(tcp_close),
                ..Default::default()
            };
            let r = torpor_criu::checkpoint_to_pool(&criu()?, pid, &name, &pool.pools()?, &opts)?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "checkpointed pid {} ({} process{}, {} resident) into {} as {} generation {}{}",
                    r.root_pid,
                    r.pids.len(),
                    if r.pids.len() == 1 { "" } else { "es" },
                    format_bytes(r.footprint_bytes),
                    pool.pool,
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
            }
        }
        Cmd::Restore {
            name,
            pool,
            generation,
            shell_job,
            tcp_close,
            json,
        } => {
            let opts = RestoreOptions {
                shell_job,
                tcp: tcp_mode(tcp_close),
                ..Default::default()
            };
            let r =
                torpor_criu::restore_from_pool(&criu()?, &name, generation, &pool.pools()?, &opts)?;
            if json {
                print_json(&r)?;
            } else {
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
            }
        }
        Cmd::Power(args) => power::run(args)?,
        Cmd::Loadgen(args) => loadgen(&args)?,
        Cmd::Sim(args) => torpor_bench::sim::run(&args)?,
        Cmd::Usuite(args) => usuite(args)?,
        Cmd::Bench(BenchCmd::Cr(args)) => torpor_bench::cr::run(&criu()?, &args)?,
        Cmd::Bench(BenchCmd::Gate(args)) => torpor_bench::gate::run(&criu()?, &args)?,
        Cmd::Bench(BenchCmd::Scenario(args)) => torpor_bench::scenario::run(&args)?,
        Cmd::Bench(BenchCmd::Wake(args)) => torpor_bench::wake::run(&criu()?, &args)?,
        Cmd::SampleService {
            listen,
            memory,
            seed,
            touch,
            tick_hz,
            tick_work,
            port_file,
        } => torpor_workload::run(&torpor_workload::SampleConfig {
            listen,
            memory,
            seed,
            touch,
            port_file,
            ticker: torpor_workload::ticker::Ticker {
                hz: tick_hz,
                work: tick_work,
            },
        })?,
        Cmd::MutatorService { listen, port_file } => {
            torpor_workload::mutator::run(&torpor_workload::mutator::MutatorConfig {
                listen,
                port_file,
            })?
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn doctor(json: bool, unit: Option<&std::path::Path>) -> Result<ExitCode> {
    use torpor_doctor::systemd;
    let criu = CriuBinary::locate().ok();
    let roots = torpor_doctor::HostRoots::default();
    let mut checks = torpor_doctor::run_checks(&roots, criu.as_ref());
    let dirs: Vec<PathBuf> = systemd::UNIT_DIRS.iter().map(PathBuf::from).collect();
    checks.extend(systemd::checks(
        &systemd::Context::read(&roots.proc),
        unit,
        &dirs,
    ));
    let fit = torpor_doctor::fit(&checks);
    if json {
        print_json(&serde_json::json!({ "fit": fit, "checks": checks }))?;
    } else {
        for c in &checks {
            let mark = match (c.status, c.required) {
                (torpor_doctor::Status::Ok, _) => "ok     ",
                (torpor_doctor::Status::Warn, _) => "warn   ",
                (torpor_doctor::Status::Missing, true) => "MISSING",
                (torpor_doctor::Status::Missing, false) => "absent ",
            };
            println!("{mark} {:<16} {}", c.name, c.detail);
        }
        println!(
            "{}",
            if fit {
                "this host can run torpor"
            } else {
                "this host cannot run torpor: fix the MISSING lines above"
            }
        );
    }
    Ok(if fit {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn pool(args: PoolArgs) -> Result<()> {
    let token = match (&args.token_file, &args.listen, args.no_auth) {
        (Some(f), _, _) => Some(torpor_pool::read_token_file(f)?),
        (None, PoolAddr::Unix(_), _) | (None, _, true) => None,
        (None, PoolAddr::Tcp(_), false) => {
            bail!("a TCP pool needs --token-file (or --no-auth to let anyone who can connect read snapshots)")
        }
    };
    let started = Instant::now();
    let store = Store::open(StoreConfig {
        capacity: args.capacity,
        spill_dir: args.spill_dir.clone(),
        keep: args.keep as usize,
    })
    .context("opening the pool's store")?;
    eprintln!(
        "pool: RAM tier {} pre-faulted in {:.2} s; it is volatile: its snapshots are lost when the pool stops",
        format_bytes(store.capacity_bytes()),
        started.elapsed().as_secs_f64()
    );
    match &args.spill_dir {
        Some(d) => eprintln!(
            "pool: disk tier {} holds {} snapshot(s) from earlier runs",
            d.display(),
            store.list().len()
        ),
        None => eprintln!("pool: no spill dir: uploads are refused once the RAM tier is full"),
    }
    if token.is_none() {
        eprintln!("pool: clients are not authenticated");
    }
    let tls = match (&args.tls_cert, &args.tls_key, &args.listen) {
        (Some(_), _, PoolAddr::Unix(_)) => {
            bail!("--tls-cert is for TCP pools; a Unix socket never leaves the host")
        }
        (Some(cert), Some(key), _) => Some(
            torpor_pool::tls::server_config(cert, key, args.tls_client_ca.as_deref())
                .context("loading the pool's TLS certificate")?,
        ),
        _ => None,
    };
    if let (None, PoolAddr::Tcp(_)) = (&tls, &args.listen) {
        eprintln!("pool: TCP without TLS: clients refuse it unless it is on loopback or they pass --pool-insecure");
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut listener = torpor_pool::Listener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        if let Some(config) = tls {
            listener = listener.with_tls(config)?;
            eprintln!(
                "pool: TLS{}",
                if args.tls_client_ca.is_some() {
                    ", client certificates required"
                } else {
                    ""
                }
            );
        }
        eprintln!("pool: listening on {}", listener.local_addr()?);
        let mut options = torpor_pool::ServeOptions::new(token.map(Into::into));
        if let Some(n) = args.max_connections {
            options.max_connections = n as usize;
        }
        options.hello_timeout = args.hello_timeout;
        options.idle_timeout = args.idle_timeout;
        options.frame_timeout = args.frame_timeout;
        options.write_timeout = args.write_timeout;
        eprintln!(
            "pool: at most {} connections; hello within {:?}, idle {:?}, frame {:?}, write {:?}",
            options.max_connections,
            options.hello_timeout,
            options.idle_timeout,
            options.frame_timeout,
            options.write_timeout
        );
        torpor_pool::serve_with(listener, Arc::new(store), options, shutdown_signal()).await;
        eprintln!("pool: stopped");
        anyhow::Ok(())
    })
}

fn up(path: &std::path::Path, log_format: LogFormat) -> Result<()> {
    // Its progress lines for people; with --log-format json they are log events like the rest,
    // so that stderr stays one JSON object per line.
    let say = |line: String| match log_format {
        LogFormat::Text => eprintln!("torpor up: {line}"),
        LogFormat::Json => tracing::info!("{line}"),
    };
    // The handlers come first, before the configuration is read or anything starts: from
    // here on SIGTERM or SIGINT, whenever it arrives, stops torpor up cleanly with status 0
    // (the default action would kill it with services, cgroups and the pool left behind).
    let rt = tokio::runtime::Runtime::new()?;
    // SIGHUP (reload) too: its default action would end torpor up.
    let (stop, hangups) = {
        let _in_runtime = rt.enter();
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        (StopSignals::install()?, hup)
    };
    // Handled from now on; one that came meanwhile is delivered now.
    let _ = stop_signal_set().thread_unblock();
    let config = torpor_up::Config::load(path)
        .with_context(|| format!("configuration {}", path.display()))?;
    let criu = criu()?;
    criu.version()?;
    let source = torpor_up::ReloadSource {
        path: path.to_path_buf(),
        hangups: Some(hangups),
    };
    rt.block_on(torpor_up::run_reloadable(
        config,
        Some(source),
        criu,
        stop.wait(),
        |info, _| {
            say(format!(
                "{}; status page on http://{}/ (API: /status, /energy, /metrics)",
                info.pool, info.status_addr
            ));
            if let Some(p) = &info.control.socket {
                say(format!("control socket {}", p.display()));
            } else if let Some(a) = &info.control.tcp {
                say(format!("control endpoint {a} (TCP, token)"));
            }
            for (name, addr) in &info.services {
                say(format!("service {name} on {addr}"));
            }
            say("ready".into());
        },
    ))?;
    say("stopped".into());
    Ok(())
}

fn loadgen(args: &torpor_loadgen::LoadgenArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let target = torpor_loadgen::cli::target(&args.target, &args.line)?;
    run_load(&rt, target, &args.run)
}

fn usuite(args: torpor_usuite::cli::UsuiteArgs) -> Result<()> {
    use torpor_usuite::cli::TierCmd;
    let rt = tokio::runtime::Runtime::new()?;
    if let TierCmd::Client { mid, data, run } = &args.tier {
        // Its gRPC channel is made (lazily) inside the runtime.
        let _inside = rt.enter();
        let target = Arc::new(torpor_usuite::client::UsuiteTarget::new(
            args.service,
            *mid,
            data,
        ));
        return run_load(&rt, target, run);
    }
    rt.block_on(torpor_usuite::cli::run_server(
        args.service,
        args.tier,
        shutdown_signal(),
    ))?;
    Ok(())
}

fn run_load(
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

/// Sends one manual command; prints its answer (exit 0 when done or nothing was needed).
fn manual(opt: &ControlOpt, name: &str, command: torpor_agent::ManualCommand) -> Result<ExitCode> {
    let order = torpor_up::control::Order::Service {
        service: name.to_string(),
        command,
    };
    let reply = send(opt, order)?;
    if reply.succeeded() {
        println!("{}", reply.message);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("torpor: {}", reply.message);
        Ok(ExitCode::FAILURE)
    }
}

/// Asks for a reload; prints what it did (exit 0 when applied or nothing changed).
fn reload(opt: &ControlOpt, json: bool) -> Result<ExitCode> {
    let reply = send(opt, torpor_up::control::Order::Reload)?;
    match (json, &reply.reload) {
        (true, Some(report)) => print_json(report)?,
        _ if reply.succeeded() => print!("{}", reply.message),
        _ => eprint!("torpor: {}", reply.message),
    }
    Ok(match reply.succeeded() {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}

/// Sends `order` to the control endpoint `opt` names and returns its reply.
fn send(opt: &ControlOpt, order: torpor_up::control::Order) -> Result<torpor_up::control::Reply> {
    let rt = tokio::runtime::Runtime::new()?;
    let target = rt.block_on(torpor_up::control::locate(
        opt.socket.as_deref(),
        opt.control,
        opt.addr,
        opt.token_file.as_deref(),
    ))?;
    Ok(torpor_up::control::call(&target, order)?)
}

fn status(addr: std::net::SocketAddr, json: bool) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let body = rt.block_on(torpor_up::status::fetch(addr, "/status"))?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    let services: Vec<torpor_up::status::ServiceStatus> =
        serde_json::from_value(doc["services"].clone())?;
    println!(
        "{:<16} {:<13} {:>7} {:>10} {:>10} {:>5} {:>6} {:>5} {:>8} {:>5} {:>9} {:>9} {:>9} {:>9}",
        "service",
        "state",
        "pid",
        "footprint",
        "snapshot",
        "tier",
        "sleeps",
        "wakes",
        "prewarms",
        "cold",
        "last ckpt",
        "last wake",
        "asleep",
        "awake"
    );
    for s in &services {
        let secs = |v: Option<f64>| {
            v.map(|x| format!("{:.3}s", x))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:<16} {:<13} {:>7} {:>10} {:>10} {:>5} {:>6} {:>5} {:>8} {:>5} {:>9} {:>9} {:>8.1}s {:>8.1}s{}",
            s.name,
            s.state.as_str(),
            s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            format_bytes(s.footprint_bytes),
            s.snapshot_bytes.map(format_bytes).unwrap_or_else(|| "-".into()),
            s.snapshot_tier.map(|t| t.as_str()).unwrap_or("-"),
            s.sleeps,
            s.wakes,
            s.prewarms,
            s.cold_starts,
            secs(s.last_checkpoint_s),
            secs(s.last_wake_s),
            s.time_asleep_s,
            s.time_awake_s,
            if s.held_now > 0 { format!("  ({} held)", s.held_now) } else { String::new() }
        );
    }
    for s in &services {
        if let Some(why) = &s.cannot_sleep {
            println!("{}: never sleeps here: {why}", s.name);
        }
        let c = &s.costs;
        if let (Some(cpus), Some(w)) = (c.idle_cpus, c.idle_wakeups_per_s) {
            println!(
                "{}: idle cost {:.4} CPUs, {w:.0} wakeups/s, {} resident; snapshot cycle {}; frozen {} times ({:.1}s)",
                s.name,
                cpus,
                format_bytes(s.footprint_bytes),
                c.snapshot_cycle_cpu_s
                    .map_or_else(|| "not measured".into(), |v| format!("{v:.3} CPU-s")),
                s.freezes,
                s.time_frozen_s,
            );
        }
        for l in &s.levels {
            println!(
                "{}: level {}: entry {:.3} J, saves {:.3} W, exit {:.1} ms, pays after {}",
                s.name,
                l.level.as_str(),
                l.entry_j,
                l.saving_w,
                l.exit_latency_s * 1e3,
                l.target_residency_s
                    .map_or_else(|| "never".into(), |t| format!("{t:.1} s")),
            );
        }
        if let Some(g) = s.adopted_generation {
            println!(
                "{}: adopted asleep at start in generation {g}, left in the pool by an earlier run",
                s.name
            );
        }
        if let Some(p) = &s.pinned {
            println!(
                "{}: pinned awake by {} at {}, {}",
                s.name,
                p.by,
                torpor_bench::report::unix_ms_to_utc(p.at_unix_ms),
                match p.left_s {
                    Some(left) => format!("{left:.0} s left"),
                    None => "until unpinned".into(),
                }
            );
        }
        if let Some(m) = &s.last_manual {
            println!(
                "{}: last manual command: {} by {} at {}: {} ({})",
                s.name,
                m.action,
                m.by,
                torpor_bench::report::unix_ms_to_utc(m.at_unix_ms),
                m.outcome.replace('_', "-"),
                m.detail
            );
        }
        if let Some(w) = &s.last_wake {
            let opt = |v: Option<f64>| v.map_or_else(|| "-".into(), |x| format!("{x:.1}"));
            println!(
                "{}: last wake ({}, {}) ms: restore start {:.1}, CRIU done {}, accepting {:.1}, released {:.1}, first byte {}",
                s.name,
                w.cause,
                w.how,
                w.restore_start_ms,
                opt(w.criu_done_ms),
                w.accepting_ms,
                w.released_ms,
                opt(w.first_byte_ms)
            );
        }
        if s.state == torpor_agent::ServiceState::Asleep && s.staged_bytes > 0 {
            println!(
                "{}: next wake {}: {} kept on this node",
                s.name,
                if s.armed {
                    "armed (restored and held before it resumes)"
                } else {
                    "staged"
                },
                format_bytes(s.staged_bytes)
            );
        }
        if let Some(l) = &s.lazy {
            println!(
                "{}: memory of generation {} (lazy): {} prefetched, {} faulted in ({} faults), {} filled in the background, {} still in the pool",
                s.name,
                l.generation,
                format_bytes(l.prefetched_bytes),
                format_bytes(l.faulted_bytes),
                l.faults,
                format_bytes(l.background_bytes),
                format_bytes(l.remaining_bytes),
            );
        }
    }
    let energy: Option<torpor_up::status::EnergyReport> =
        serde_json::from_value(doc["energy"].clone())?;
    if let Some(e) = energy {
        println!("energy: {}", e.summary_line());
        println!("  {}", e.torpor_line());
        let per: Vec<String> = e
            .services
            .iter()
            .map(|(n, s)| format!("{n} {:.1} J ({:.2} CPU-s)", s.energy_j, s.cpu_s))
            .collect();
        println!(
            "  services: {}; torpor {:.1} J; idle {:.1} J; all asleep {:.0} s",
            per.join(", "),
            e.torpor_j,
            e.idle_j,
            e.all_asleep_s
        );
    }
    let knobs: Vec<String> = serde_json::from_value(doc["knobs"].clone()).unwrap_or_default();
    for k in knobs {
        println!("knob: {k}");
    }
    let control: torpor_up::control::ControlHint =
        serde_json::from_value(doc["control"].clone()).unwrap_or_default();
    if let Some(p) = &control.socket {
        println!(
            "control: {} (torpor sleep|wake|pin|unpin NAME)",
            p.display()
        );
    } else if let Some(a) = &control.tcp {
        println!("control: {a} over TCP with its token (torpor sleep --control {a} --token-file FILE NAME)");
    }
    let last: Option<torpor_up::reload::ReloadReport> =
        serde_json::from_value(doc["last_reload"].clone()).unwrap_or_default();
    if let Some(r) = last {
        println!(
            "last reload: {} by {} at {}{}",
            r.outcome.as_str(),
            r.by,
            torpor_bench::report::unix_ms_to_utc(r.at_unix_ms),
            r.error.map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// SIGTERM and SIGINT handlers, installed when this is made (not when first awaited), so a
/// signal that arrives in between is kept rather than lost or fatal.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs both handlers; call inside a Tokio runtime.
    fn install() -> Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Resolves at the first SIGTERM or SIGINT since [`StopSignals::install`].
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Resolves at SIGTERM or SIGINT; the handlers are installed when it is first polled.
/// The signals that stop a server.
fn stop_signal_set() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    // `torpor up`'s reload: blocked with the others until its handler is there.
    set.add(nix::sys::signal::Signal::SIGHUP);
    set
}

async fn shutdown_signal() {
    StopSignals::install()
        .expect("signal handlers")
        .wait()
        .await
}
