//! `torpor bench scenario`: the seed's four configurations on this machine under the same
//! workload (the four µSuite services and a sample service with a language runtime's
//! background wakeups, each with bursty on/off arrivals, or with `--workload azure` arrivals
//! shaped like the Azure Functions 2019 trace):
//! (a) monolithic, always on; (b) disaggregated, each tier pinned, no sleeping (behind gates);
//! (c) = (b) + consolidation and deep-idle knobs; (d) = (c) + resting idle tiers (frozen or
//! snapshotted into the pool). (a) and (b) run one after the other; (c) and (d) run on one
//! node in alternating blocks, (c) being (d) with every tier pinned awake, so that their
//! difference (a few percent) is not lost in the machine's drift. Reports energy (measured or
//! modelled, labelled), C-state residency, latency split by whether a request found a tier
//! resting, checkpoint/restore counts and times, and the tables shaped like the seed's 7.1
//! and 7.2, with plots.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use hdrhistogram::Histogram;
use serde::Serialize;
use torpor_agent::{
    Agent, CostStatus, ManualCommand, NodeState, NodeTransitions, ServiceState, Transition,
};
use torpor_loadgen::{HttpGet, Phase, RunConfig, Target};
use torpor_policy::LevelCost;
use torpor_power::{
    energy::{Activity, EnergyAccount, EnergyReport},
    telemetry::CpuReport,
    HostRoots, IntervalReport, Profile, Sample,
};
use torpor_traffic::{Arrivals, Percentiles};
use torpor_usuite::{client::UsuiteTarget, memcached::MemcachedServer, tier::DataArgs, Service};

use crate::{
    harness::own_addr,
    inproc::InProcessUp,
    plot::{cdf_ms, line_chart, Chart, Series},
    report::median,
    ExperimentError,
};

#[derive(Debug, Clone, clap::Args)]
pub struct ScenarioArgs {
    /// About a minute per configuration (under 10 minutes in all).
    #[arg(long)]
    pub quick: bool,
    /// Load per configuration (default 75s with --quick, 5m without).
    #[arg(long, value_parser = torpor_image::duration_arg)]
    pub duration: Option<Duration>,
    /// Where report.json, tables.md and the plots go.
    #[arg(long, default_value = "torpor-scenario")]
    pub out: PathBuf,
    /// Platform profile for modelled power.
    #[arg(long, default_value = "icx-2s")]
    pub profile: String,
    /// Only log the knobs of (c) and (d) instead of turning them (they are restored after).
    #[arg(long)]
    pub dry_run_knobs: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// (c) and (d) are measured on one node in this many alternating blocks each (the
    /// blocks of a pair replay the same arrivals), so that the machine's background weighs
    /// on both alike.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub blocks: u32,
    /// How long each (d) block first runs the load unmeasured (a replayed day: the whole
    /// minutes just before the block's), so that the block starts in the state the load
    /// leaves the node in, not with every tier awake. With a warm-up, the wake that ends a
    /// (d) block to switch to (c) is charged to neither; without one (0s), to (d).
    #[arg(long, default_value = "1m", value_parser = torpor_image::duration_arg)]
    pub warmup: Duration,
    /// How the tiers of (d) decide to rest: `energy` (frozen or snapshotted only when the
    /// level pays for its cycle) or `threshold` (the seed's rule: snapshot once idle).
    #[arg(long, default_value = "energy", value_parser = ["energy", "threshold"])]
    pub governor: String,
    /// Arrivals per service: bursty on/off, or the Azure Functions 2019 shape.
    #[arg(long, value_enum, default_value_t = Workload::Bursty)]
    pub workload: Workload,
    #[arg(long)]
    pub json: bool,
}

/// The arrivals each µSuite service receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// [`ARRIVALS`] for every service.
    Bursty,
    /// A generated day shaped like the Azure Functions 2019 trace
    /// ([`torpor_traffic::trace::azure_like_day`]), one function per service at the rate
    /// quantiles [`AZURE_QUANTILES`], replayed in real time from its first minute: most
    /// functions are invoked less than once a minute, in bursts, with heavy-tailed gaps.
    Azure,
}

/// Where in the Azure model's rate distribution the µSuite services (in [`Service::ALL`]'s
/// order) and then the runtime service sit: the expected order statistics (k/6) of five
/// functions drawn at random from it, i.e. a typical node of five functions rather than a
/// chosen one. As in the trace, all of them are invoked less than once a minute on average
/// (about 0.0005, 0.005, 0.16 and 1.4 per minute; the runtime service is the median function,
/// once in about 36 minutes, ticking all the while).
pub const AZURE_QUANTILES: [f64; 5] = [1.0 / 6.0, 2.0 / 6.0, 4.0 / 6.0, 5.0 / 6.0, 3.0 / 6.0];

/// The sample service with background wakeups: a [`RUNTIME_TICK_WORK`] scan of its heap at
/// [`torpor_workload::ticker::RUNTIME_HZ`] (about 1 % of a core here, a JVM's or Go program's
/// idle cost), requests `GET /count`.
const RUNTIME_TIER: &str = "runtime";
const RUNTIME_MEMORY: &str = "64MiB";
const RUNTIME_TICK_WORK: &str = "1MiB";

impl Workload {
    /// Each service's arrivals ([`Service::ALL`]'s order, then the runtime service) and their
    /// description; the Azure trace is written to `out` as `azure-trace.csv`.
    fn arrivals(
        self,
        seed: u64,
        out: &std::path::Path,
    ) -> std::io::Result<(Vec<Arrivals>, String)> {
        match self {
            Workload::Bursty => Ok((
                vec![Arrivals::parse(ARRIVALS).expect("valid arrivals"); AZURE_QUANTILES.len()],
                ARRIVALS.to_string(),
            )),
            Workload::Azure => {
                let rates = AZURE_QUANTILES.map(torpor_traffic::trace::azure_rate_at);
                let trace = torpor_traffic::trace::azure_like_day(seed, &rates);
                let path = out.join("azure-trace.csv");
                std::fs::write(&path, trace.to_csv())?;
                let arrivals = trace
                    .rows
                    .into_iter()
                    .map(|r| Arrivals::Replay {
                        per_minute: r.per_minute,
                        speedup: 1.0,
                    })
                    .collect();
                let shown: Vec<String> = rates.iter().map(|r| format!("{r:.4}")).collect();
                Ok((
                    arrivals,
                    format!(
                        "azure: a generated Azure Functions 2019-shaped day ({}), mean rates {} per minute, replayed in real time",
                        path.display(),
                        shown.join(", ")
                    ),
                ))
            }
        }
    }
}

/// The seed's configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Configuration {
    Monolithic,
    Disaggregated,
    DeepIdle,
    Snapshot,
}

impl Configuration {
    fn label(self) -> &'static str {
        match self {
            Configuration::Monolithic => "(a) monolithic, always on",
            Configuration::Disaggregated => "(b) disaggregated, pinned",
            Configuration::DeepIdle => "(c) + consolidation, deep idle",
            Configuration::Snapshot => "(d) + snapshots to the pool",
        }
    }
}

/// Bursty arrivals per service: bursts of ~2 s at 20/s, idle gaps of ~8 s.
const ARRIVALS: &str = "onoff:rate=20,on=exp:2s,off=exp:8s";
/// Idle threshold of the tiers in (d).
const IDLE_THRESHOLD: &str = "1s";

/// One configuration's results.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigResult {
    pub configuration: Configuration,
    pub label: &'static str,
    pub energy: EnergyReport,
    /// Mean residency over all CPUs, over its blocks.
    pub residency: CpuReport,
    /// Each block's mean power, in the order run ((a) and (b) have one block).
    pub block_power_w: Vec<f64>,
    /// Where the CPU time of its blocks went: what tells (c) from (d) apart.
    pub cpu: CpuUse,
    pub requests: u64,
    pub errors: u64,
    /// Requests and errors of the unmeasured warm-ups before (d)'s blocks.
    pub warmup_requests: u64,
    pub warmup_errors: u64,
    /// What the errors were (the loadgen's kinds, e.g. `grpc Unavailable`, `timeout`), so a
    /// run with errors says which failure it met.
    pub error_kinds: std::collections::BTreeMap<String, u64>,
    pub latency_found_awake: Percentiles,
    pub latency_found_asleep: Percentiles,
    pub checkpoints: usize,
    pub checkpoint_median_s: Option<f64>,
    pub restores: usize,
    pub restore_median_s: Option<f64>,
    pub cold_start_median_s: Option<f64>,
    /// Each tier's costs and levels' break-even at the end of the run (the energy governor's).
    pub levels: Vec<TierLevels>,
    #[serde(skip)]
    cdf_awake: Vec<(f64, f64)>,
    #[serde(skip)]
    cdf_asleep: Vec<(f64, f64)>,
}

/// CPU time over a configuration's blocks, in CPUs (CPU-seconds per second).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuUse {
    /// The tiers' processes, as the agent counts them; `None` without an agent ((a)).
    pub services_cpus: Option<f64>,
    /// This process: the agent and its gates, the load generator, the energy sampler.
    pub harness_cpus: f64,
}

/// CPU-seconds used, over blocks or so far.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSeconds {
    harness: f64,
    /// `None` without an agent counting the tiers.
    services: Option<f64>,
}

impl CpuSeconds {
    /// So far: this process's, and the tiers' if an agent runs them.
    fn so_far(agent: Option<&Agent>) -> CpuSeconds {
        CpuSeconds {
            harness: torpor_loadgen::process_cpu_s(),
            services: agent.map(|a| a.status().iter().map(|s| s.cpu_s).sum()),
        }
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub duration_per_configuration_s: f64,
    pub workload: Workload,
    pub arrivals_per_service: String,
    pub configurations: Vec<ConfigResult>,
    pub table_7_1: String,
    pub table_7_2: String,
    /// The governor's break-even per tier and level, measured in (d).
    pub table_levels: String,
}

/// Latency split by whether a tier of the service was asleep when the request was sent.
struct Classified {
    inner: Arc<dyn Target>,
    agent: Option<Arc<Agent>>,
    tiers: Vec<String>,
    awake: Mutex<Histogram<u64>>,
    asleep: Mutex<Histogram<u64>>,
}

#[async_trait]
impl Target for Classified {
    async fn call(&self, seq: u64) -> Result<(), String> {
        let asleep = self.agent.as_ref().is_some_and(|a| {
            a.states()
                .iter()
                .any(|(name, state)| self.tiers.contains(name) && *state != ServiceState::Awake)
        });
        let t0 = Instant::now();
        let r = self.inner.call(seq).await;
        if r.is_ok() {
            let h = if asleep { &self.asleep } else { &self.awake };
            let _ = h
                .lock()
                .expect("histogram lock")
                .record(t0.elapsed().as_micros().max(1) as u64);
        }
        r
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn data() -> DataArgs {
    DataArgs {
        vectors: 10_000,
        dim: 32,
        docs: 10_000,
        vocabulary: 2_000,
        users: 1_000,
        items: 1_000,
        ..DataArgs::default()
    }
}

/// One tier's command line.
struct Tier {
    /// Its µSuite service (none for the runtime service).
    service: Option<Service>,
    name: String,
    argv: Vec<String>,
    backend: SocketAddr,
    gate: SocketAddr,
    cpu: usize,
}

/// Every tier of every service; `via_gates` points mid-tiers at the buckets' gates.
fn tiers(
    exe: &str,
    d: &DataArgs,
    memcached: &[SocketAddr],
    via_gates: bool,
) -> std::io::Result<Vec<Tier>> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = Vec::new();
    for (i, service) in Service::ALL.into_iter().enumerate() {
        let name = service.as_str();
        let mut bucket_addrs = Vec::new();
        for shard in 0..2 {
            let (backend, gate) = (own_addr()?, own_addr()?);
            bucket_addrs.push(if via_gates { gate } else { backend });
            let mut argv: Vec<String> = [
                exe,
                "usuite",
                name,
                "bucket",
                "--listen",
                &backend.to_string(),
                "--shard",
                &shard.to_string(),
                "--shards",
                "2",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if let (Service::Router, Some(m)) = (service, memcached.get(shard)) {
                argv.extend(["--memcached".to_string(), m.to_string()]);
            }
            argv.extend(d.to_args());
            out.push(Tier {
                service: Some(service),
                name: format!("{name}-b{shard}"),
                argv,
                backend,
                gate,
                cpu: (2 * i + shard + 1) % cpus,
            });
        }
        let (backend, gate) = (own_addr()?, own_addr()?);
        let buckets: Vec<String> = bucket_addrs.iter().map(ToString::to_string).collect();
        let mut argv: Vec<String> = [
            exe,
            "usuite",
            name,
            "mid",
            "--listen",
            &backend.to_string(),
            "--buckets",
            &buckets.join(","),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(d.to_args());
        out.push(Tier {
            service: Some(service),
            name: format!("{name}-mid"),
            argv,
            backend,
            gate,
            cpu: (2 * i) % cpus,
        });
    }
    let (backend, gate) = (own_addr()?, own_addr()?);
    out.push(Tier {
        service: None,
        name: RUNTIME_TIER.into(),
        argv: [
            exe,
            "sample-service",
            "--listen",
            &backend.to_string(),
            "--memory",
            RUNTIME_MEMORY,
            "--tick-work",
            RUNTIME_TICK_WORK,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        backend,
        gate,
        cpu: (2 * Service::ALL.len()) % cpus,
    });
    Ok(out)
}

/// (d)'s node sleep: what a real node would run, only logged.
const NODE_SLEEP: &str = "[power.node_sleep]\nsleep = [\"systemctl\", \"suspend\"]\nwake = [\"true\"]\nafter = \"1s\"\ndry_run = true\n";

fn toml_config(
    tiers: &[Tier],
    c: Configuration,
    profile: &str,
    journal: &std::path::Path,
    dry_run: bool,
    governor: &str,
) -> String {
    let mut t = format!("[pool]\ncapacity = \"2GiB\"\nephemeral = true\n[status]\nlisten = \"127.0.0.1:0\"\n[power]\nprofile = \"{profile}\"\n");
    if matches!(c, Configuration::DeepIdle | Configuration::Snapshot) {
        let _ = writeln!(
            t,
            "consolidate = true\ndeep_idle = true\ndry_run = {dry_run}\njournal = \"{}\"",
            journal.display()
        );
    }
    if c == Configuration::Snapshot {
        // The machine under test must stay up: its node sleep is a dry run, credited at the
        // profile's suspend power and counted apart.
        t.push_str(NODE_SLEEP);
    }
    let idle = if c == Configuration::Snapshot {
        IDLE_THRESHOLD
    } else {
        "100000h"
    };
    for tier in tiers {
        let argv: Vec<String> = tier.argv.iter().map(|a| format!("{a:?}")).collect();
        // A mid-tier wakes its buckets with it: their restores overlap instead of chaining.
        let wake_with: Vec<String> = if tier.name.ends_with("-mid") {
            tiers
                .iter()
                .filter(|t| t.service == tier.service && t.name != tier.name)
                .map(|t| format!("{:?}", t.name))
                .collect()
        } else {
            Vec::new()
        };
        let _ = write!(
            t,
            "\n[[service]]\nname = \"{}\"\ncommand = [{}]\nlisten = \"{}\"\nbackend = \"{}\"\ncpuset = \"{}\"\nstart_timeout = \"120s\"\nwake_with = [{}]\n[service.policy]\nidle_threshold = \"{idle}\"\nwake_objective = \"60s\"\ngovernor = \"{governor}\"\n",
            tier.name,
            argv.join(", "),
            tier.gate,
            tier.backend,
            tier.cpu,
            wake_with.join(", ")
        );
    }
    t
}

/// Processes of configuration (a), killed when dropped.
struct Plain(Vec<Child>, Vec<(String, f64)>);

impl Drop for Plain {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_plain(tiers: &[Tier]) -> Result<Plain, ExperimentError> {
    let mut plain = Plain(Vec::new(), Vec::new());
    for t in tiers {
        let t0 = Instant::now();
        let child = Command::new(&t.argv[0])
            .args(&t.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        plain.0.push(child);
        let deadline = t0 + Duration::from_secs(120);
        while std::net::TcpStream::connect(t.backend).is_err() {
            if Instant::now() > deadline {
                return Err(ExperimentError::Mismatch(format!(
                    "{} did not listen on {}",
                    t.name, t.backend
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        plain.1.push((t.name.clone(), t0.elapsed().as_secs_f64()));
    }
    Ok(plain)
}

/// The node's sleep as the agent has it, for this run's own account: whether it sleeps, and
/// the sleeps that began and ended since `seen` (each transition charged as it happens).
fn node_activity(agent: Option<&Agent>, seen: &mut NodeTransitions) -> Activity {
    let Some(agent) = agent else {
        return Activity::default();
    };
    let (state, now) = agent.node_state();
    let count = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    let activity = Activity {
        node_asleep: state != NodeState::Up,
        node_asleep_dry_run: state == NodeState::Asleep { dry_run: true },
        node_sleeps: count(now.sleeps.saturating_sub(seen.sleeps)),
        node_resumes: count(now.resumes.saturating_sub(seen.resumes)),
        ..Activity::default()
    };
    *seen = now;
    activity
}

/// One tier's measured idle and cycle costs and its levels' break-even, as the energy
/// governor last weighed them.
#[derive(Debug, Clone, Serialize)]
pub struct TierLevels {
    pub tier: String,
    pub footprint_bytes: u64,
    pub costs: CostStatus,
    pub levels: Vec<LevelCost>,
}

fn tier_levels(agent: &Agent) -> Vec<TierLevels> {
    agent
        .status()
        .into_iter()
        .filter(|s| !s.levels.is_empty())
        .map(|s| TierLevels {
            tier: s.name,
            footprint_bytes: s.footprint_bytes,
            costs: s.costs,
            levels: s.levels,
        })
        .collect()
}

/// One configuration's node: its tiers, started behind `torpor up` (gated) or plain.
struct Node {
    tiers: Vec<Tier>,
    up: Option<InProcessUp>,
    plain: Option<Plain>,
}

impl Node {
    /// Starts the tiers of configuration `c`.
    async fn start(
        c: Configuration,
        args: &ScenarioArgs,
        memcached: &[SocketAddr],
    ) -> Result<Node, ExperimentError> {
        let exe = std::env::current_exe()?.display().to_string();
        let gated = c != Configuration::Monolithic;
        let tiers = tiers(&exe, &data(), memcached, gated)?;
        if !gated {
            let plain = tokio::task::block_in_place(|| start_plain(&tiers))?;
            return Ok(Node {
                tiers,
                up: None,
                plain: Some(plain),
            });
        }
        let config = torpor_up::Config::from_toml(&toml_config(
            &tiers,
            c,
            &args.profile,
            &args.out.join("knobs.json"),
            args.dry_run_knobs,
            &args.governor,
        ))?;
        let up = InProcessUp::start(config, torpor_criu::CriuBinary::locate()?).await?;
        Ok(Node {
            tiers,
            up: Some(up),
            plain: None,
        })
    }

    fn agent(&self) -> Option<Arc<Agent>> {
        self.up.as_ref().map(|u| u.agent().clone())
    }

    /// The load's targets, one per service, each splitting its latencies by whether a tier
    /// of its service was resting when the request was sent.
    fn targets(&self) -> Result<Vec<Arc<Classified>>, ExperimentError> {
        let d = data();
        let agent = self.agent();
        let classified = |inner: Arc<dyn Target>, service: Option<Service>| {
            Arc::new(Classified {
                inner,
                agent: agent.clone(),
                tiers: self
                    .tiers
                    .iter()
                    .filter(|t| t.service == service)
                    .map(|t| t.name.clone())
                    .collect(),
                awake: Mutex::new(Histogram::new(3).expect("histogram")),
                asleep: Mutex::new(Histogram::new(3).expect("histogram")),
            })
        };
        let entry = |t: &Tier| if self.up.is_some() { t.gate } else { t.backend };
        let mut targets: Vec<Arc<Classified>> = Service::ALL
            .into_iter()
            .map(|s| {
                let mid = self
                    .tiers
                    .iter()
                    .find(|t| t.service == Some(s) && t.name.ends_with("-mid"))
                    .expect("a mid-tier");
                classified(Arc::new(UsuiteTarget::new(s, entry(mid), &d)), Some(s))
            })
            .collect();
        let runtime = self
            .tiers
            .iter()
            .find(|t| t.service.is_none())
            .expect("the runtime tier");
        let get = HttpGet::new(&format!("http://{}/count", entry(runtime)))
            .map_err(ExperimentError::Mismatch)?;
        targets.push(classified(Arc::new(get), None));
        Ok(targets)
    }

    /// How long each tier took to start, from nothing.
    fn cold_starts(&self) -> Vec<f64> {
        match (&self.plain, &self.up) {
            (Some(p), _) => p.1.iter().map(|(_, s)| *s).collect(),
            (None, Some(up)) => up
                .agent()
                .transitions()
                .iter()
                .filter(|t| t.detail.starts_with("started as pid"))
                .map(|t| t.took_s)
                .collect(),
            (None, None) => Vec::new(),
        }
    }

    /// Pins every tier awake (`pinned`: configuration (c) on (d)'s node) or lets the
    /// governor rest them again, and waits until the pins hold.
    async fn pin_all(&self, pinned: bool) -> Result<(), ExperimentError> {
        let Some(up) = &self.up else {
            return Ok(());
        };
        let command = if pinned {
            ManualCommand::Pin { for_ms: None }
        } else {
            ManualCommand::Unpin
        };
        let calls = self
            .tiers
            .iter()
            .map(|t| up.command(&t.name, command, "bench scenario"));
        for (t, r) in self
            .tiers
            .iter()
            .zip(futures::future::join_all(calls).await)
        {
            r.map_err(|e| ExperimentError::Mismatch(format!("{}: {e}", t.name)))?;
        }
        Ok(())
    }

    async fn stop(self) -> Result<(), ExperimentError> {
        if let Some(up) = self.up {
            up.stop().await?;
        }
        drop(self.plain);
        Ok(())
    }
}

/// What one configuration gathered over its blocks of load.
struct Measured {
    configuration: Configuration,
    /// Its own energy account: it integrates only this configuration's blocks.
    account: Option<Arc<Mutex<EnergyAccount>>>,
    /// Each block's seconds and mean residency over all CPUs.
    residency: Vec<(f64, CpuReport)>,
    /// Each block's mean power.
    block_power_w: Vec<f64>,
    /// Each block's span in the agent's uptime, to tell its transitions from another's.
    windows: Vec<(f64, f64)>,
    /// CPU-seconds over the blocks (their seconds are the energy account's).
    cpu_s: CpuSeconds,
    targets: Vec<Arc<Classified>>,
    requests: u64,
    errors: u64,
    /// Requests of the warm-ups before its blocks (their latency is not recorded).
    warmup_requests: u64,
    warmup_errors: u64,
    error_kinds: std::collections::BTreeMap<String, u64>,
}

/// Runs `arrivals[i]` against `targets[i]`, all at once, for `duration`: the whole of it,
/// quiet included (the load generator returns once its last request is answered, which in
/// a sparse replayed minute is early or at once).
async fn drive(
    targets: impl Iterator<Item = Arc<dyn Target>>,
    arrivals: &[Arrivals],
    seed: u64,
    duration: Duration,
) -> Vec<torpor_loadgen::LoadReport> {
    let runs = targets.enumerate().map(|(i, t)| {
        let config = RunConfig {
            phases: vec![Phase {
                name: "load".into(),
                arrivals: arrivals[i].clone(),
                duration,
            }],
            seed: seed + i as u64,
            timeout: Duration::from_secs(60),
            max_in_flight: 10_000,
            progress: false,
        };
        async move { torpor_loadgen::run(t, &config).await }
    });
    let end = tokio::time::Instant::now() + duration;
    let reports = futures::future::join_all(runs).await;
    tokio::time::sleep_until(end).await;
    reports
}

/// A block under way: its first sample and the sampler feeding the account every second.
struct Block {
    first: Sample,
    account: Arc<Mutex<EnergyAccount>>,
    sampler: tokio::task::JoinHandle<()>,
    from_s: f64,
    energy_before: (f64, f64),
    /// [`CpuSeconds::so_far`] as it began.
    cpu_before: CpuSeconds,
}

impl Measured {
    fn new(configuration: Configuration, targets: Vec<Arc<Classified>>) -> Measured {
        Measured {
            configuration,
            account: None,
            residency: Vec::new(),
            block_power_w: Vec::new(),
            windows: Vec::new(),
            cpu_s: CpuSeconds::default(),
            targets,
            requests: 0,
            errors: 0,
            warmup_requests: 0,
            warmup_errors: 0,
            error_kinds: Default::default(),
        }
    }

    /// Starts a block: the account goes on from now (the time since its last block, and the
    /// node's transitions in it, belong to another configuration or to a warm-up).
    fn begin(
        &mut self,
        profile: &Profile,
        agent: Option<Arc<Agent>>,
        seen: &Arc<Mutex<NodeTransitions>>,
    ) -> Result<Block, ExperimentError> {
        let first = Sample::take(&HostRoots::default())
            .map_err(|e| ExperimentError::Mismatch(e.to_string()))?;
        let account = self
            .account
            .get_or_insert_with(|| {
                Arc::new(Mutex::new(EnergyAccount::start(
                    profile.clone(),
                    first.clone(),
                )))
            })
            .clone();
        account.lock().expect("account lock").skip_to(first.clone());
        let energy_before = {
            let a = account.lock().expect("account lock");
            (a.report().energy_j, a.report().seconds)
        };
        let from_s = agent.as_ref().map_or(0.0, |a| a.uptime().as_secs_f64());
        let cpu_before = CpuSeconds::so_far(agent.as_deref());
        if let Some(a) = &agent {
            *seen.lock().expect("seen lock") = a.node_state().1;
        }
        let sampler = {
            let (account, seen) = (account.clone(), seen.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let all_asleep = agent.as_ref().is_some_and(|a| {
                        a.status().iter().all(|s| s.state == ServiceState::Asleep)
                    });
                    let node =
                        node_activity(agent.as_deref(), &mut seen.lock().expect("seen lock"));
                    if let Ok(s) = Sample::take(&HostRoots::default()) {
                        account
                            .lock()
                            .expect("account lock")
                            .record(s, &Activity { all_asleep, ..node });
                    }
                }
            })
        };
        Ok(Block {
            first,
            account,
            sampler,
            from_s,
            energy_before,
            cpu_before,
        })
    }

    /// Runs the load of one block against this configuration's targets.
    async fn load(&mut self, arrivals: &[Arrivals], seed: u64, duration: Duration) {
        let targets = self.targets.iter().map(|t| t.clone() as Arc<dyn Target>);
        for r in drive(targets, arrivals, seed, duration).await {
            self.requests += r.total.scheduled;
            self.errors += r.total.errors;
            for (k, v) in &r.total.error_kinds {
                *self.error_kinds.entry(k.clone()).or_default() += v;
            }
        }
    }

    /// Runs load that is not measured (latency not recorded) but whose errors still count.
    async fn warm_up(&mut self, arrivals: &[Arrivals], seed: u64, duration: Duration) {
        let targets = self.targets.iter().map(|t| t.inner.clone());
        for r in drive(targets, arrivals, seed, duration).await {
            self.warmup_requests += r.total.scheduled;
            self.warmup_errors += r.total.errors;
            for (k, v) in &r.total.error_kinds {
                *self.error_kinds.entry(format!("warm-up: {k}")).or_default() += v;
            }
        }
    }

    /// Ends a block: its last sample (with the node's transitions since the one before) goes
    /// to the account.
    fn end(
        &mut self,
        block: Block,
        profile: &Profile,
        agent: Option<&Agent>,
        seen: &Arc<Mutex<NodeTransitions>>,
    ) -> Result<(), ExperimentError> {
        block.sampler.abort();
        let last = Sample::take(&HostRoots::default())
            .map_err(|e| ExperimentError::Mismatch(e.to_string()))?;
        let mut account = block.account.lock().expect("account lock");
        account.record(
            last.clone(),
            &node_activity(agent, &mut seen.lock().expect("seen lock")),
        );
        let (energy, seconds) = (
            account.report().energy_j - block.energy_before.0,
            account.report().seconds - block.energy_before.1,
        );
        self.block_power_w.push(energy / seconds.max(1e-9));
        let r = IntervalReport::between(&block.first, &last, profile);
        self.residency.push((r.seconds, r.total));
        let to_s = agent.map_or(0.0, |a| a.uptime().as_secs_f64());
        self.windows.push((block.from_s, to_s));
        let now = CpuSeconds::so_far(agent);
        self.cpu_s.harness += now.harness - block.cpu_before.harness;
        if let (Some(now), Some(before)) = (now.services, block.cpu_before.services) {
            *self.cpu_s.services.get_or_insert(0.0) += now - before;
        }
        Ok(())
    }

    /// The configuration's result, from its blocks and the node's transitions among them.
    fn result(
        self,
        transitions: &[Transition],
        cold: &[f64],
        levels: Vec<TierLevels>,
    ) -> ConfigResult {
        let mine: Vec<&Transition> = transitions
            .iter()
            .filter(|t| {
                self.windows
                    .iter()
                    .any(|(a, b)| (*a..=*b).contains(&t.at_s))
            })
            .collect();
        let checkpoints: Vec<f64> = mine
            .iter()
            .filter(|t| t.to == ServiceState::Asleep)
            .map(|t| t.took_s)
            .collect();
        let restores: Vec<f64> = mine
            .iter()
            .filter(|t| {
                t.from == ServiceState::Waking
                    && t.to == ServiceState::Awake
                    && t.detail.starts_with("restored")
            })
            .map(|t| t.took_s)
            .collect();
        let mut awake = Histogram::<u64>::new(3).expect("histogram");
        let mut asleep = Histogram::<u64>::new(3).expect("histogram");
        for t in &self.targets {
            let _ = awake.add(&*t.awake.lock().expect("histogram lock"));
            let _ = asleep.add(&*t.asleep.lock().expect("histogram lock"));
        }
        let energy = self
            .account
            .map(|a| a.lock().expect("account lock").report().clone())
            .expect("a configuration measured at least one block");
        let secs = energy.seconds.max(1e-9);
        let cpu = CpuUse {
            services_cpus: self.cpu_s.services.map(|s| s / secs),
            harness_cpus: self.cpu_s.harness / secs,
        };
        ConfigResult {
            configuration: self.configuration,
            label: self.configuration.label(),
            energy,
            residency: CpuReport::time_weighted(&self.residency),
            block_power_w: self.block_power_w,
            cpu,
            requests: self.requests,
            errors: self.errors,
            warmup_requests: self.warmup_requests,
            warmup_errors: self.warmup_errors,
            error_kinds: self.error_kinds,
            latency_found_awake: Percentiles::of(&awake),
            latency_found_asleep: Percentiles::of(&asleep),
            checkpoints: checkpoints.len(),
            checkpoint_median_s: median(&checkpoints),
            restores: restores.len(),
            restore_median_s: median(&restores),
            cold_start_median_s: median(cold),
            levels,
            cdf_awake: cdf_ms(&awake),
            cdf_asleep: cdf_ms(&asleep),
        }
    }
}

/// Runs configuration (a) or (b) on its own node, one block of `duration`.
async fn run_alone(
    c: Configuration,
    args: &ScenarioArgs,
    duration: Duration,
    memcached: &[SocketAddr],
    profile: &Profile,
    arrivals: &[Arrivals],
) -> Result<ConfigResult, ExperimentError> {
    let node = Node::start(c, args, memcached).await?;
    let agent = node.agent();
    let seen = Arc::new(Mutex::new(NodeTransitions::default()));
    let mut m = Measured::new(c, node.targets()?);
    let block = m.begin(profile, agent.clone(), &seen)?;
    m.load(arrivals, args.seed, duration).await;
    m.end(block, profile, agent.as_deref(), &seen)?;
    let transitions = agent.as_ref().map(|a| a.transitions()).unwrap_or_default();
    let cold = node.cold_starts();
    node.stop().await?;
    Ok(m.result(&transitions, &cold, Vec::new()))
}

/// Runs (c) and (d) on one node, in `blocks` alternating blocks each (c d d c c d …, so that
/// a drift of the machine's background falls on both alike): (d) is the node as configured,
/// (c) the same node with every tier pinned awake. Blocks `k` of (c) and (d) replay the same
/// arrivals. Each (d) block first runs `--warmup` of the arrivals before its own,
/// unmeasured, so that it starts where the load would have left the node, and the wake that
/// switches back to (c) comes after its window: rests entered in the warm-up and left in the
/// window stand for those the window leaves open at its end, as in a steady state. Without a
/// warm-up every (d) block starts awake and that wake is charged to it.
async fn run_paired(
    args: &ScenarioArgs,
    duration: Duration,
    memcached: &[SocketAddr],
    profile: &Profile,
    arrivals: &[Arrivals],
    bar: &indicatif::ProgressBar,
) -> Result<(ConfigResult, ConfigResult), ExperimentError> {
    let node = Node::start(Configuration::Snapshot, args, memcached).await?;
    let agent = node.agent();
    let seen = Arc::new(Mutex::new(NodeTransitions::default()));
    let mut c = Measured::new(Configuration::DeepIdle, node.targets()?);
    let mut d = Measured::new(Configuration::Snapshot, node.targets()?);
    let blocks = args.blocks;
    let block = duration / blocks;
    let warmup = args.warmup;
    // A replayed day goes on from block to block: block k's warm-up and its own minutes
    // follow block k-1's; a generated process is the same in every block.
    let warmup_minutes = warmup.as_secs().div_ceil(60) as usize;
    let stride = warmup_minutes + block.as_secs().div_ceil(60) as usize;
    let mut pinned = false;
    for k in 0..blocks {
        let order = if k % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let first_minute = warmup_minutes + k as usize * stride;
        let seed = args.seed + 1000 * u64::from(k);
        for pin in order {
            if pin != pinned {
                node.pin_all(pin).await?;
                pinned = pin;
            }
            let m = if pin { &mut c } else { &mut d };
            if !pin && !warmup.is_zero() {
                bar.set_message(format!(
                    "{} block {} of {blocks}: {} of warm-up",
                    m.configuration.label(),
                    k + 1,
                    humantime::format_duration(warmup)
                ));
                let before: Vec<Arrivals> = arrivals
                    .iter()
                    .map(|a| a.from_minute(first_minute - warmup_minutes))
                    .collect();
                m.warm_up(&before, seed + 500, warmup).await;
            }
            bar.set_message(format!(
                "{} block {} of {blocks} ({} of load)",
                m.configuration.label(),
                k + 1,
                humantime::format_duration(block)
            ));
            let b = m.begin(profile, agent.clone(), &seen)?;
            let own: Vec<Arrivals> = arrivals
                .iter()
                .map(|a| a.from_minute(first_minute))
                .collect();
            m.load(&own, seed, block).await;
            if !pin && warmup.is_zero() {
                // What waking every tier costs belongs to the configuration that rested them.
                node.pin_all(true).await?;
                pinned = true;
            }
            m.end(b, profile, agent.as_deref(), &seen)?;
            bar.inc(1);
        }
    }
    let transitions = agent.as_ref().map(|a| a.transitions()).unwrap_or_default();
    let levels = agent.as_deref().map(tier_levels).unwrap_or_default();
    let cold = node.cold_starts();
    node.stop().await?;
    Ok((
        c.result(&transitions, &cold, Vec::new()),
        d.result(&transitions, &cold, levels),
    ))
}

fn opt(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.digits$}", v * scale))
}

/// Each tier's idle cost and its levels' entry energy, saving, exit and target residency.
fn levels_table(results: &[ConfigResult]) -> String {
    let tiers: Vec<&TierLevels> = results.iter().flat_map(|r| &r.levels).collect();
    if tiers.is_empty() {
        return String::new();
    }
    let mut t = String::from("| tier | footprint MiB | idle CPU % | idle wakeups/s | torpor's looks CPU % | snapshot cycle CPU-s | level | entry (J) | saving (W) | exit (ms) | pays after (s) |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for tier in tiers {
        for l in &tier.levels {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {:.4} | {:.4} | {:.2} | {} |",
                tier.tier,
                tier.footprint_bytes >> 20,
                opt(tier.costs.idle_cpus, 100.0, 2),
                opt(tier.costs.idle_wakeups_per_s, 1.0, 1),
                opt(tier.costs.watch_cpus, 100.0, 3),
                opt(tier.costs.snapshot_cycle_cpu_s, 1.0, 3),
                l.level.as_str(),
                l.entry_j,
                l.saving_w,
                l.exit_latency_s * 1e3,
                opt(l.target_residency_s, 1.0, 2),
            );
        }
    }
    t
}

fn tables(results: &[ConfigResult], profile: &Profile, warmup: Duration) -> (String, String) {
    let base = results
        .first()
        .map(|r| r.energy.mean_power_w)
        .unwrap_or(0.0);
    let mut t1 = String::from("| configuration | mean power (W) | reduction vs (a) | deepest idle state % | all tiers asleep % | node asleep % (modelled) | source |\n|---|---|---|---|---|---|---|\n");
    for r in results {
        let deepest = r.residency.states.last().map_or(0.0, |s| s.residency_pct);
        let _ = writeln!(
            t1,
            "| {} | {:.2} | {:.1} % | {:.1} | {:.0} | {:.0}{} | {} |",
            r.label,
            r.energy.mean_power_w,
            if base > 0.0 {
                100.0 * (base - r.energy.mean_power_w) / base
            } else {
                0.0
            },
            deepest,
            100.0 * r.energy.all_asleep_s / r.energy.seconds.max(1e-9),
            100.0 * r.energy.node_asleep_s / r.energy.seconds.max(1e-9),
            if r.energy.node_asleep_dry_run_s > 0.0 {
                " (dry run)"
            } else {
                ""
            },
            r.energy.label
        );
    }
    if let (Some(c), Some(d)) = (
        results
            .iter()
            .find(|r| r.configuration == Configuration::DeepIdle),
        results
            .iter()
            .find(|r| r.configuration == Configuration::Snapshot),
    ) {
        let ratios: Vec<f64> = c
            .block_power_w
            .iter()
            .zip(&d.block_power_w)
            .map(|(c, d)| d / c)
            .collect();
        let shown = |v: &[f64], digits: usize| {
            v.iter()
                .map(|x| format!("{x:.digits$}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let warmup = if !warmup.is_zero() {
            format!("; each (d) block ran after {} of the arrivals just before its own, unmeasured ({} requests, {} errors), and the wake back to (c) fell in neither window", humantime::format_duration(warmup), d.warmup_requests, d.warmup_errors)
        } else {
            "; every (d) block started with every tier awake and was charged the wake back to (c)"
                .into()
        };
        let _ = writeln!(
            t1,
            "\n(c) and (d) ran on one node in {} alternating blocks each ((c): every tier pinned awake; block k of each replays the same arrivals, a replayed day going on from block to block{warmup}). Mean power per block, W: (c) {}; (d) {}. (d)/(c) per pair: {}; median {}.",
            c.block_power_w.len(),
            shown(&c.block_power_w, 2),
            shown(&d.block_power_w, 2),
            shown(&ratios, 3),
            median(&ratios).map_or_else(|| "-".into(), |m| format!("{m:.3}"))
        );
    }
    let cpu: Vec<String> = results
        .iter()
        .map(|r| {
            let services = r
                .cpu
                .services_cpus
                .map_or_else(String::new, |s| format!("tiers {:.2} %, ", 100.0 * s));
            format!(
                "{} {services}this process (agent, gates, load) {:.2} %",
                &r.label[..3],
                100.0 * r.cpu.harness_cpus
            )
        })
        .collect();
    let _ = writeln!(
        t1,
        "\nCPU time in the measured windows, % of one core: {}.",
        cpu.join("; ")
    );
    let mut t2 = String::from("| configuration | requests | errors | p50 / p99 awake (ms) | p50 / p99 found asleep (ms) | checkpoints (median s) | restores (median s) | cold start (median s) | cold start / restore |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let _ = writeln!(
            t2,
            "| {} | {} | {} | {} / {} | {} / {} | {} ({}) | {} ({}) | {} | {} |",
            r.label,
            r.requests,
            r.errors,
            opt(r.latency_found_awake.p50_ms, 1.0, 2),
            opt(r.latency_found_awake.p99_ms, 1.0, 2),
            opt(r.latency_found_asleep.p50_ms, 1.0, 1),
            opt(r.latency_found_asleep.p99_ms, 1.0, 1),
            r.checkpoints,
            opt(r.checkpoint_median_s, 1.0, 3),
            r.restores,
            opt(r.restore_median_s, 1.0, 3),
            opt(r.cold_start_median_s, 1.0, 3),
            crate::report::ratio(r.cold_start_median_s, r.restore_median_s)
                .map_or_else(|| "-".into(), |x| format!("{x:.2}")),
        );
    }
    for r in results
        .iter()
        .filter(|r| r.energy.node_sleeps + r.energy.node_resumes > 0)
    {
        let _ = writeln!(
            t2,
            "\n{}: the node went to sleep {} times and woke {} times in its windows ({:.1} J of entries and resumes charged); on a real node each wake would add its resume ({:.0} s in profile {}) to the first request, which the latencies above do not include.",
            r.label,
            r.energy.node_sleeps,
            r.energy.node_resumes,
            r.energy.node_transitions_j,
            profile.node.resume_s,
            profile.name
        );
    }
    (t1, t2)
}

fn plots(args: &ScenarioArgs, results: &[ConfigResult]) -> Result<(), ExperimentError> {
    let power: Vec<Series> = results
        .iter()
        .map(|r| Series {
            name: r.label.into(),
            points: r
                .energy
                .history
                .iter()
                .map(|p| (p.t_s, p.power_w))
                .collect(),
        })
        .collect();
    let title = format!(
        "node power over time ({})",
        results.first().map_or("", |r| r.energy.label.as_str())
    );
    line_chart(
        &args.out.join("power.svg"),
        &Chart {
            title: &title,
            x_label: "seconds",
            y_label: "watts",
            log_x: false,
        },
        &power,
    )
    .map_err(ExperimentError::Mismatch)?;
    let mut cdfs = Vec::new();
    for r in results {
        cdfs.push(Series {
            name: format!("{} awake", r.label),
            points: r.cdf_awake.clone(),
        });
        if !r.cdf_asleep.is_empty() {
            cdfs.push(Series {
                name: format!("{} found asleep", r.label),
                points: r.cdf_asleep.clone(),
            });
        }
    }
    line_chart(
        &args.out.join("latency_cdf.svg"),
        &Chart {
            title: "request latency CDF",
            x_label: "milliseconds (log)",
            y_label: "fraction of requests",
            log_x: true,
        },
        &cdfs,
    )
    .map_err(ExperimentError::Mismatch)
}

/// Runs the four configurations and writes the report.
pub fn run(args: &ScenarioArgs) -> Result<(), ExperimentError> {
    let duration = args.duration.unwrap_or(if args.quick {
        Duration::from_secs(75)
    } else {
        Duration::from_secs(300)
    });
    let profile =
        Profile::resolve(&args.profile).map_err(|e| ExperimentError::Mismatch(e.to_string()))?;
    if args.workload == Workload::Azure && !args.warmup.as_millis().is_multiple_of(60_000) {
        return Err(ExperimentError::Mismatch(format!(
            "--warmup {}: a replayed day warms up on whole minutes",
            humantime::format_duration(args.warmup)
        )));
    }
    std::fs::create_dir_all(&args.out)?;
    let (arrivals, arrivals_shown) = args.workload.arrivals(args.seed, &args.out)?;
    crate::harness::become_subreaper()?;
    let caches = [MemcachedServer::start(64)?, MemcachedServer::start(64)?];
    let memcached: Vec<SocketAddr> = caches.iter().map(|c| c.addr).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(2 + 2 * u64::from(args.blocks))
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:20}] {pos}/{len} {msg}")
            .expect("template"),
    );
    let mut results = Vec::new();
    for c in [Configuration::Monolithic, Configuration::Disaggregated] {
        bar.set_message(format!(
            "{} ({} of load)",
            c.label(),
            humantime::format_duration(duration)
        ));
        results.push(rt.block_on(run_alone(
            c, args, duration, &memcached, &profile, &arrivals,
        ))?);
        bar.inc(1);
    }
    let (c, d) = rt.block_on(run_paired(
        args, duration, &memcached, &profile, &arrivals, &bar,
    ))?;
    results.extend([c, d]);
    bar.finish_and_clear();
    let (table_7_1, table_7_2) = tables(&results, &profile, args.warmup);
    let table_levels = levels_table(&results);
    plots(args, &results)?;
    let report = ScenarioReport {
        duration_per_configuration_s: duration.as_secs_f64(),
        workload: args.workload,
        arrivals_per_service: arrivals_shown,
        configurations: results,
        table_7_1,
        table_7_2,
        table_levels,
    };
    let json = serde_json::to_string_pretty(&report).expect("report serializes");
    std::fs::write(args.out.join("report.json"), &json)?;
    std::fs::write(
        args.out.join("tables.md"),
        format!(
            "Table 7.1: power\n\n{}\nTable 7.2: latency\n\n{}\nBreak-even per level, (d)\n\n{}",
            report.table_7_1, report.table_7_2, report.table_levels
        ),
    )?;
    if args.json {
        println!("{json}");
    } else {
        println!(
            "Table 7.1 (power; {} of the same load per configuration: {})\n",
            humantime::format_duration(duration),
            report.arrivals_per_service
        );
        println!("{}", report.table_7_1);
        println!("Table 7.2 (latency impact)\n");
        println!("{}", report.table_7_2);
        if !report.table_levels.is_empty() {
            println!("Break-even per level in (d), as the governor measured it\n");
            println!("{}", report.table_levels);
        }
        println!(
            "plots: {} and {}; all figures in {}",
            args.out.join("power.svg").display(),
            args.out.join("latency_cdf.svg").display(),
            args.out.join("report.json").display()
        );
    }
    Ok(())
}
