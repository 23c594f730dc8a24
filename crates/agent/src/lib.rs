//! The node agent. Services are its children (it is also their subreaper, so trees CRIU
//! restores come back to it); it restarts an awake service that crashed, puts an idle one to
//! sleep (drain through the link, checkpoint into the pool, reap) and wakes it when a held
//! request asks or the policy pre-warms (restore from the pool, wait until it accepts
//! connections, open the link). A restore that fails, or a missing or corrupt snapshot, ends
//! in a cold start from the service's command. Every transition is recorded with its duration.

mod cgroup;
pub mod init;
mod manual;
mod node;
mod process;
mod reaper;
mod runner;
mod service;

pub use cgroup::{CgroupRoot, Hierarchy, ServiceCgroup};
pub use init::InitOptions;
pub use manual::{
    ManualAction, ManualCommand, ManualError, ManualOutcome, ManualResult, PinStatus,
};
pub use node::{KnobConfig, NodePowerConfig, NodePowerError, NodeSleepHooks};
pub use process::{Launch, ProcessLaunch};
pub use runner::{LazyMemory, MemoryRestore};
pub use service::{ServiceSpec, ServiceState, ServiceStatus, Transition, WakeTimeline};
pub use torpor_power::energy::EnergyReport;

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use thiserror::Error;
use tokio::{sync::watch, task::JoinSet};
use torpor_control::ServiceLink;
use torpor_criu::{CriuBinary, Pools};

use node::{AwakeService, NodePower};
use runner::Runner;
use service::Managed;
use torpor_power::energy::ServiceUsage;

/// Why the agent could not start.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("cannot become the subreaper of restored services")]
    Subreaper(#[source] std::io::Error),
    #[error("cannot prepare runc for the containers")]
    Runc(#[source] std::io::Error),
    #[error("cannot start node power")]
    Power(#[from] NodePowerError),
    #[error("cannot find the torpor binary that runs as the services' init")]
    InitProgram(#[source] std::io::Error),
    #[error("cannot create the cgroup of service {name:?}")]
    Cgroup {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("processes of an earlier run are left in {path} and cannot be killed")]
    Leftover { path: std::path::PathBuf },
    #[error("start-up was cancelled")]
    Cancelled,
    #[error("service {name:?} did not start")]
    Start {
        name: String,
        #[source]
        source: process::LaunchError,
    },
}

/// Most transitions kept for `torpor status`.
const TRANSITION_LOG: usize = 1000;

/// Most manual actions kept for `torpor status`.
const MANUAL_LOG: usize = 100;

/// Shared by all service loops.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Holds runc's CRIU wrapper script while containers may need it.
    _runc_dir: Option<tempfile::TempDir>,
    pub started: tokio::time::Instant,
    pub transitions: Mutex<VecDeque<Transition>>,
    /// Recent manual commands, oldest first.
    pub manual: Mutex<VecDeque<ManualAction>>,
    /// Knobs and energy account; `None` when power is off.
    pub node: Option<Arc<NodePower>>,
    /// A service slept or woke: the node loop re-plans the cores.
    pub replan: tokio::sync::Notify,
    /// Every service's link by name (for `wake_with`).
    pub links: std::collections::HashMap<String, Arc<ServiceLink>>,
    /// Reaps service roots and orphans (the agent is their subreaper).
    pub reaper: Arc<reaper::Reaper>,
}

/// How often the energy account samples the node.
const ENERGY_TICK: Duration = Duration::from_secs(1);

/// Where a node's snapshots go and under which names.
#[derive(Debug, Clone)]
pub struct Snapshots {
    /// The pool replicas and the node key.
    pub pools: Pools,
    /// This node's prefix of snapshot names on a shared pool.
    pub namespace: String,
    /// The pool keeps its snapshots after this process ends (a remote pool, or an embedded
    /// one with a disk tier): at stop every awake service is checkpointed into it rather
    /// than killed, so that the next start adopts it asleep with its state.
    pub survives_stop: bool,
}

/// Longest a service's checkpoint may take at stop (after its drain), so a stop stays
/// bounded; one that takes longer is killed and its state lost.
pub const STOP_CHECKPOINT_LIMIT: Duration = Duration::from_secs(30);

/// The agent of one node.
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
    services: Vec<Arc<Managed>>,
    /// Where the services' cgroups are, removed at stop once empty.
    cgroups: Option<CgroupRoot>,
    /// See [`Snapshots::survives_stop`].
    survives_stop: bool,
}

impl Agent {
    /// Starts every service (cold), waits until each accepts connections and opens its link.
    /// A service whose snapshot the pool already holds (left by an earlier run that stopped
    /// with its state kept) is not launched: it starts asleep in the newest generation there,
    /// and its first request restores it. When `cancel` turns true first, what started is stopped (a service still starting is
    /// killed, not waited for) and the start ends in [`AgentError::Cancelled`].
    pub async fn start(
        criu: CriuBinary,
        snapshots: Snapshots,
        services: Vec<(ServiceSpec, Arc<ServiceLink>)>,
        power: Option<NodePowerConfig>,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<Agent, AgentError> {
        nix::sys::prctl::set_child_subreaper(true).map_err(|e| AgentError::Subreaper(e.into()))?;
        let init_program = init_program().map_err(AgentError::InitProgram)?;
        let cgroups = CgroupRoot::discover(std::path::Path::new("/proc/self/mountinfo"));
        if let Some(root) = &cgroups {
            let names: Vec<String> = services
                .iter()
                .map(|(s, _)| cgroup_name(&snapshots.namespace, &s.name))
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            clear_leftovers(root, &names).await?;
        }
        let node = match power {
            Some(p) => Some(Arc::new(NodePower::start(p)?)),
            None => None,
        };
        let containers = services
            .iter()
            .any(|(s, _)| matches!(s.launch, Launch::Container { .. }));
        let (runc, runc_dir) = if containers {
            let dir = tempfile::tempdir().map_err(AgentError::Runc)?;
            let runc = torpor_criu::runc::Runc::new(&criu, dir.path()).map_err(AgentError::Runc)?;
            (Some(runc), Some(dir))
        } else {
            (None, None)
        };
        let reaper = Arc::new(reaper::Reaper::default());
        let survives_stop = snapshots.survives_stop;
        let host = runner::Host {
            criu,
            pools: snapshots.pools,
            namespace: snapshots.namespace,
            reaper: reaper.clone(),
        };
        let left = snapshots_left(
            &host.pools,
            services
                .iter()
                .map(|(s, _)| host.snapshot_name(&s.name))
                .collect(),
        )
        .await;
        let shared = Arc::new(Shared {
            _runc_dir: runc_dir,
            started: tokio::time::Instant::now(),
            transitions: Mutex::new(VecDeque::new()),
            manual: Mutex::new(VecDeque::new()),
            node,
            replan: tokio::sync::Notify::new(),
            links: services
                .iter()
                .map(|(spec, link)| (spec.name.clone(), link.clone()))
                .collect(),
            reaper,
        });
        let mut managed = Vec::new();
        for (spec, link) in services {
            let runner: Arc<dyn Runner> = match &spec.launch {
                Launch::Process(p) => Arc::new(runner::ProcessTree {
                    name: spec.name.clone(),
                    launch: p.clone(),
                    backend: spec.backend,
                    start_timeout: spec.start_timeout,
                    init_program: init_program.clone(),
                    cgroup: match &cgroups {
                        Some(root) => Some(
                            root.service(&cgroup_name(&host.namespace, &spec.name))
                                .map_err(|source| AgentError::Cgroup {
                                    name: spec.name.clone(),
                                    source,
                                })?,
                        ),
                        None => None,
                    },
                    host: host.clone(),
                    memory: spec.memory.clone(),
                    lazy: Default::default(),
                }),
                Launch::Container { bundle } => Arc::new(runner::Container {
                    name: spec.name.clone(),
                    bundle: bundle.clone(),
                    backend: spec.backend,
                    start_timeout: spec.start_timeout,
                    runc: runc
                        .clone()
                        .expect("runc is prepared when a service is a container"),
                    host: host.clone(),
                }),
            };
            let m = Arc::new(Managed::new(spec, link, shared.clone(), runner));
            if let Some(&generation) = left.get(&host.snapshot_name(&m.spec.name)) {
                tracing::info!(service = %m.spec.name, generation, "adopted asleep: its snapshot from an earlier run is in the pool; the first request restores it");
                m.adopt_asleep(generation);
                managed.push(m);
                continue;
            }
            let started = match m.cold_start_initial(&mut cancel).await {
                Err(process::LaunchError::Cancelled) => Err(AgentError::Cancelled),
                r => r.map_err(|source| AgentError::Start {
                    name: m.spec.name.clone(),
                    source,
                }),
            };
            if let Err(e) = started {
                // Its tree, if the launch got that far, goes with its cgroup (or container).
                Managed::stop(&m).await;
                for started in &managed {
                    Managed::stop(started).await;
                }
                if let Some(node) = &shared.node {
                    node.restore_all();
                }
                remove_root(cgroups.as_ref());
                return Err(e);
            }
            managed.push(m);
        }
        Ok(Agent {
            shared,
            services: managed,
            cgroups,
            survives_stop,
        })
    }

    /// Runs every service's loop until `shutdown` turns true, then stops the services (see
    /// [`Snapshots::survives_stop`] for what is kept).
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let mut loops = JoinSet::new();
        for m in &self.services {
            loops.spawn(Managed::run(m.clone(), shutdown.clone()));
        }
        {
            let (shared, shutdown) = (self.shared.clone(), shutdown.clone());
            loops.spawn(async move { shared.reaper.run(shutdown).await });
        }
        if let Some(node) = &self.shared.node {
            self.replan(node);
            let mut tick = tokio::time::interval(ENERGY_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut last_cpu: Vec<(f64, f64)> =
                self.services.iter().map(|m| m.cpu_counters()).collect();
            while !*shutdown.borrow() {
                tokio::select! {
                    r = shutdown.changed() => if r.is_err() { break },
                    _ = self.shared.replan.notified() => self.replan(node),
                    _ = tick.tick() => {
                        let mut usage = Vec::new();
                        let mut ended = 0.0;
                        let mut all_asleep = true;
                        for (m, last) in self.services.iter().zip(&mut last_cpu) {
                            let (total, ended_total) = m.cpu_counters();
                            let s = m.status();
                            all_asleep &= s.state == ServiceState::Asleep;
                            usage.push(ServiceUsage {
                                name: s.name,
                                cpu_s: (total - last.0).max(0.0),
                                resident_bytes: if s.pid.is_some() {
                                    s.footprint_bytes
                                } else {
                                    s.staged_bytes
                                },
                                footprint_bytes: s.footprint_bytes,
                            });
                            ended += (ended_total - last.1).max(0.0);
                            *last = (total, ended_total);
                        }
                        let node = node.clone();
                        // Node sleep hooks may block for as long as the node sleeps.
                        let _ = tokio::task::spawn_blocking(move || node.tick(usage, ended, all_asleep)).await;
                    }
                }
            }
        } else {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        }
        while loops.join_next().await.is_some() {}
        self.stop_services().await;
        if let Some(node) = &self.shared.node {
            node.restore_all();
        }
        remove_root(self.cgroups.as_ref());
    }

    /// Stops every service. With a pool that outlives the agent, the awake ones are first
    /// checkpointed into it (all at once, each within its drain deadline and
    /// [`STOP_CHECKPOINT_LIMIT`]); what still runs then is killed, and its older snapshots are
    /// deleted so that the next start does not bring back a past it had moved on from.
    async fn stop_services(&self) {
        if self.survives_stop {
            let mut sleeping = JoinSet::new();
            for m in &self.services {
                let m = m.clone();
                let limit = m.spec.drain_deadline + STOP_CHECKPOINT_LIMIT;
                sleeping.spawn(async move { Managed::sleep_for_stop(&m, limit).await });
            }
            let (mut kept, mut lost) = (0, 0);
            while let Some(r) = sleeping.join_next().await {
                match r {
                    Ok(true) => kept += 1,
                    _ => lost += 1,
                }
            }
            tracing::info!(
                kept,
                lost,
                "stopping: services asleep in the pool keep their state for the next start"
            );
        }
        for m in &self.services {
            let killed = Managed::stop(m).await;
            if killed && self.survives_stop {
                m.forget_snapshots().await;
            }
        }
    }

    fn replan(&self, node: &NodePower) {
        let awake: Vec<AwakeService> = self
            .services
            .iter()
            .filter_map(|m| m.awake_for_plan())
            .collect();
        node.settle(&awake);
    }

    /// Whether the pool outlives the agent, so that a stop keeps every service's state.
    pub fn survives_stop(&self) -> bool {
        self.survives_stop
    }

    /// The energy account so far, when node power is on.
    pub fn energy(&self) -> Option<EnergyReport> {
        self.shared.node.as_ref().map(|n| n.energy())
    }

    /// Power knob changes in force now.
    pub fn knob_changes(&self) -> Vec<String> {
        self.shared
            .node
            .as_ref()
            .map_or_else(Vec::new, |n| n.knob_changes())
    }

    /// Each service's figures now.
    pub fn status(&self) -> Vec<ServiceStatus> {
        self.services.iter().map(|m| m.status()).collect()
    }

    /// Recent transitions, oldest first.
    pub fn transitions(&self) -> Vec<Transition> {
        self.shared
            .transitions
            .lock()
            .expect("transitions lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Time since the agent started.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Carries out an operator's `command` on `service` (see [`ManualCommand`]); `by` says
    /// who asked (`uid 0`, `token`). It waits until the command is done: a sleep until the
    /// service is in the pool, a wake until it accepts connections.
    pub async fn manual(&self, service: &str, command: ManualCommand, by: &str) -> ManualResult {
        match self.services.iter().find(|m| m.spec.name == service) {
            Some(m) => m.command(command, by).await,
            None => {
                let e = ManualError::UnknownService(service.to_string());
                self.shared.record_manual(ManualAction {
                    at_s: self.shared.started.elapsed().as_secs_f64(),
                    at_unix_ms: manual::unix_ms_now(),
                    service: service.to_string(),
                    action: command.name().into(),
                    for_s: None,
                    by: by.to_string(),
                    outcome: e.outcome().into(),
                    detail: e.to_string(),
                });
                Err(e)
            }
        }
    }

    /// Recent manual commands, oldest first.
    pub fn manual_actions(&self) -> Vec<ManualAction> {
        self.shared
            .manual
            .lock()
            .expect("manual log lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// The newest generation each of `names` has on any pool replica that answers: snapshots an
/// earlier run left there. A replica that cannot be listed is skipped with a warning (its
/// services cold-start unless another replica has them).
async fn snapshots_left(pools: &Pools, names: Vec<String>) -> HashMap<String, u64> {
    let pools = pools.clone();
    tokio::task::spawn_blocking(move || {
        let mut newest = HashMap::new();
        for pool in &pools.replicas {
            match pool.connect().and_then(|mut c| c.list()) {
                Ok(list) => {
                    for s in list.into_iter().filter(|s| names.contains(&s.name)) {
                        let g = newest.entry(s.name).or_insert(s.generation);
                        *g = (*g).max(s.generation);
                    }
                }
                Err(e) => {
                    tracing::warn!(pool = %pool.addr, error = %torpor_pool::error_chain(&e), "cannot list the pool's snapshots; services it holds cold-start");
                }
            }
        }
        newest
    })
    .await
    .expect("pool listing task panicked")
}

/// The program each plain service runs under as its init: `$TORPOR_INIT`, else this binary
/// (which must be `torpor`: it answers [`init::SUBCOMMAND`]).
fn init_program() -> std::io::Result<std::path::PathBuf> {
    match std::env::var_os("TORPOR_INIT") {
        Some(p) => Ok(p.into()),
        None => std::env::current_exe(),
    }
}

/// Removes the services' cgroup directory when nothing is left in it (another agent on
/// the host may still use it: then it stays).
fn remove_root(root: Option<&CgroupRoot>) {
    if let Some(root) = root {
        let _ = std::fs::remove_dir(root.dir());
    }
}

/// Kills and removes the cgroups of `names` that a killed agent left behind, so nothing of an
/// earlier run keeps serving (or holding ports) under the new one. Other services' cgroups
/// may belong to another agent that is alive: they are only reported.
/// A service's cgroup is named like its snapshots (`NAMESPACE.SERVICE`): two agents on one
/// host with different namespaces never take each other's services for leftovers.
fn cgroup_name(namespace: &str, service: &str) -> String {
    format!("{namespace}.{service}")
}

async fn clear_leftovers(root: &CgroupRoot, names: &[&str]) -> Result<(), AgentError> {
    for cg in root.existing() {
        let procs = cg.procs();
        if !names.contains(&cg.name().as_str()) {
            if !procs.is_empty() {
                tracing::warn!(cgroup = %cg.path().display(), ?procs, "processes of a service this agent does not run (another agent's, or an earlier configuration's); left alone");
            }
            continue;
        }
        if !procs.is_empty() {
            tracing::warn!(service = %cg.name(), ?procs, "stopping processes left by an earlier run");
        }
        let c = cg.clone();
        let empty = tokio::task::spawn_blocking(move || c.kill_all(Duration::from_secs(5)))
            .await
            .unwrap_or(false);
        if !empty || cg.remove().is_err() {
            return Err(AgentError::Leftover {
                path: cg.path().to_path_buf(),
            });
        }
    }
    Ok(())
}

impl Shared {
    /// No node power and no containers, for the state machine's tests.
    #[cfg(test)]
    pub(crate) fn bare(links: &[Arc<ServiceLink>]) -> Shared {
        Shared {
            _runc_dir: None,
            started: tokio::time::Instant::now(),
            transitions: Mutex::new(VecDeque::new()),
            manual: Mutex::new(VecDeque::new()),
            node: None,
            replan: tokio::sync::Notify::new(),
            links: links.iter().map(|l| (l.name.clone(), l.clone())).collect(),
            reaper: Arc::default(),
        }
    }

    /// Logs a manual command and keeps it for `torpor status`.
    pub(crate) fn record_manual(&self, a: ManualAction) {
        tracing::info!(event = "manual", service = %a.service, action = %a.action, for_s = ?a.for_s, by = %a.by, outcome = %a.outcome, detail = %a.detail, "manual command");
        let mut log = self.manual.lock().expect("manual log lock");
        if log.len() == MANUAL_LOG {
            log.pop_front();
        }
        log.push_back(a);
    }

    pub(crate) fn record(&self, t: Transition) {
        tracing::info!(service = %t.service, from = ?t.from, to = ?t.to, took_s = t.took_s, detail = %t.detail, "transition");
        let mut log = self.transitions.lock().expect("transitions lock");
        if log.len() == TRANSITION_LOG {
            log.pop_front();
        }
        log.push_back(t);
    }
}
