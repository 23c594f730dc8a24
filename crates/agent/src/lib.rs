//! The node agent. Services are its children (it is also their subreaper, so trees CRIU
//! restores come back to it); it restarts an awake service that crashed, puts an idle one to
//! sleep (drain through the link, checkpoint into the pool, reap) and wakes it when a held
//! request asks or the policy pre-warms (restore from the pool, wait until it accepts
//! connections, open the link). A restore that fails, or a missing or corrupt snapshot, ends
//! in a cold start from the service's command. Every transition is recorded with its duration.
//! A stop with `--keep-running` leaves the awake services running and lists them in the
//! kept-services file ([`kept`]); the next start adopts each that is still the same process,
//! awake.

mod cgroup;
mod costs;
pub mod init;
mod kept;
mod manual;
mod node;
mod process;
mod reaper;
mod roster;
mod runner;
mod service;

pub use cgroup::{CgroupRoot, Hierarchy, ServiceCgroup};
pub use costs::CostStatus;
pub use init::InitOptions;
pub use manual::{
    unix_ms_now, ManualAction, ManualCommand, ManualError, ManualOutcome, ManualResult, PinStatus,
};
pub use node::{
    KnobConfig, NodePowerConfig, NodePowerError, NodeSleepHooks, NodeState, NodeTransitions,
};
pub use process::{Launch, ProcessLaunch};
pub use runner::{LazyMemory, MemoryRestore};
pub use service::{
    ServiceSpec, ServiceState, ServiceStatus, SteeringMode, Transition, WakeTimeline,
};
pub use torpor_power::energy::EnergyReport;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
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
    #[error("{path} holds the processes of another torpor that runs now (pid {pid}) with the same [node] namespace: stop it (or wait for its stop to end), or give one of the two its own namespace")]
    AnotherAgent { path: std::path::PathBuf, pid: i32 },
    #[error("start-up was cancelled")]
    Cancelled,
    #[error("service {name:?} did not start")]
    Start {
        name: String,
        #[source]
        source: process::LaunchError,
    },
    #[error("the agent is stopping")]
    Stopping,
}

/// Why a reload's change to the set of services was not made.
#[derive(Debug, Error)]
pub enum ReconfigureError {
    #[error("no service {0:?} here")]
    Unknown(String),
    #[error("a service {0:?} runs already")]
    Exists(String),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// Most transitions kept for `torpor status`.
const TRANSITION_LOG: usize = 1000;

/// Most manual actions kept for `torpor status`.
const MANUAL_LOG: usize = 100;

/// Shared by all service loops.
#[derive(Debug)]
pub(crate) struct Shared {
    pub started: tokio::time::Instant,
    pub transitions: Mutex<VecDeque<Transition>>,
    /// Recent manual commands, oldest first.
    pub manual: Mutex<VecDeque<ManualAction>>,
    /// Knobs and energy account; `None` when power is off.
    pub node: Option<Arc<NodePower>>,
    /// A service slept or woke: the node loop re-plans the cores.
    pub replan: tokio::sync::Notify,
    /// A reload left a successor waiting: the agent's loop polls for its predecessor's end
    /// only while one waits (an idle agent must not tick for nothing).
    pub successor_waits: tokio::sync::Notify,
    /// Every service's link by name (for `wake_with`); a reload adds and removes some.
    pub links: Mutex<HashMap<String, Arc<ServiceLink>>>,
    /// Reaps service roots and orphans (the agent is their subreaper).
    pub reaper: Arc<reaper::Reaper>,
    /// Where every service is and what it holds, for the decisions across services.
    pub roster: roster::Roster,
    /// The most memory the services up on the node may hold; past it the coldest idle one
    /// is snapshotted (`None`: no budget).
    pub memory_budget: Option<u64>,
}

/// How often the energy account samples the node.
const ENERGY_TICK: Duration = Duration::from_secs(1);

/// How often the agent looks for changed services whose loops ended asleep, while one waits.
const SUCCESSOR_TICK: Duration = Duration::from_millis(20);

/// How often a removal looks whether the service's requests are answered.
const REMOVE_POLL: Duration = Duration::from_millis(20);

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
    /// The services, in configuration order; a reload adds, removes and replaces some.
    services: Mutex<Services>,
    /// Taken by every change to the set of services (a reload, a successor taking over), so
    /// that two never interleave.
    changes: tokio::sync::Mutex<()>,
    /// Makes the runners of services, also those a reload adds.
    maker: Maker,
    /// See [`Snapshots::survives_stop`].
    survives_stop: bool,
    /// Where a stop with `--keep-running` lists the services it leaves running.
    kept_file: PathBuf,
    /// The stop leaves the awake services running ([`Agent::keep_running`]).
    keep_running: AtomicBool,
}

#[derive(Debug, Default)]
struct Services {
    slots: Vec<Slot>,
    /// [`Agent::run`] has started the loops: a service added now gets its own at once.
    running: bool,
    /// The agent is stopping: nothing is added any more.
    stopping: bool,
}

/// One service and its loop.
#[derive(Debug)]
struct Slot {
    managed: Arc<Managed>,
    /// Ends this service's loop alone (its removal), or with the others (the agent's stop).
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// A reload changed it: the successor that takes it over once its loop ends asleep.
    next: Option<Successor>,
}

impl Slot {
    fn new(managed: Arc<Managed>) -> Slot {
        Slot {
            managed,
            stop: watch::Sender::new(false),
            task: None,
            next: None,
        }
    }

    fn spawn_loop(&mut self) {
        let (m, stop) = (self.managed.clone(), self.stop.subscribe());
        self.task = Some(tokio::spawn(Managed::run(m, stop)));
    }
}

/// The configuration a changed service runs with from its next wake.
#[derive(Debug)]
struct Successor {
    spec: ServiceSpec,
    /// How it starts changed: its snapshots go and its next wake starts it from its command.
    fresh: bool,
    /// What the reload changed, for the transition's detail.
    why: String,
    /// The predecessor was handed over (the generation it left, if kept): only the
    /// successor's making is left to do.
    handed: Option<Option<u64>>,
}

/// What a reload's added service came up as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// Started from its command and accepting connections.
    Started,
    /// Its snapshot was in the pool (left by an earlier run): asleep in that generation.
    Adopted(u64),
}

/// What removing a service did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Its state when the removal began.
    pub was: ServiceState,
    /// Requests still held or in flight when its drain deadline ran out (then cut).
    pub cut: usize,
    /// Whether its snapshots were deleted from the pool (an error is logged otherwise).
    pub released: bool,
}

/// What a runner needs besides the service's spec; kept for services a reload adds.
#[derive(Debug)]
struct Maker {
    host: runner::Host,
    init_program: std::path::PathBuf,
    /// Where the services' cgroups are, removed at stop once empty.
    cgroups: Option<CgroupRoot>,
    /// runc with its CRIU wrapper script (and the directory that holds it), made with the
    /// first container.
    runc: Mutex<Option<(torpor_criu::runc::Runc, Arc<tempfile::TempDir>)>>,
}

impl Maker {
    fn runc(&self) -> Result<torpor_criu::runc::Runc, AgentError> {
        let mut runc = self.runc.lock().expect("runc lock");
        if let Some((r, _)) = &*runc {
            return Ok(r.clone());
        }
        let dir = tempfile::tempdir().map_err(AgentError::Runc)?;
        let r =
            torpor_criu::runc::Runc::new(&self.host.criu, dir.path()).map_err(AgentError::Runc)?;
        *runc = Some((r.clone(), Arc::new(dir)));
        Ok(r)
    }

    fn runner(&self, spec: &ServiceSpec) -> Result<Arc<dyn Runner>, AgentError> {
        Ok(match &spec.launch {
            Launch::Process(p) => Arc::new(runner::ProcessTree {
                name: spec.name.clone(),
                launch: p.clone(),
                backend: spec.backend,
                start_timeout: spec.start_timeout,
                init_program: self.init_program.clone(),
                cgroup: match &self.cgroups {
                    Some(root) => Some(
                        root.service(&cgroup_name(&self.host.namespace, &spec.name))
                            .map_err(|source| AgentError::Cgroup {
                                name: spec.name.clone(),
                                source,
                            })?,
                    ),
                    None => None,
                },
                host: self.host.clone(),
                memory: spec.memory.clone(),
                lazy: Default::default(),
            }),
            Launch::Container { bundle } => Arc::new(runner::Container {
                name: spec.name.clone(),
                bundle: bundle.clone(),
                backend: spec.backend,
                start_timeout: spec.start_timeout,
                runc: self.runc()?,
                host: self.host.clone(),
            }),
        })
    }
}

impl Agent {
    /// Starts every service (cold), waits until each accepts connections and opens its link.
    /// A service whose snapshot the pool already holds (left by an earlier run that stopped
    /// with its state kept) is not launched: it starts asleep in the newest generation there,
    /// and its first request restores it. A service an earlier run left running (listed in
    /// `kept_file` by a stop with `--keep-running`) that is still the same process in its
    /// cgroup, with the same configuration, is adopted awake as that process; the file is
    /// deleted once read. When `cancel` turns true first, what started is stopped (a service
    /// still starting is killed, not waited for) and the start ends in
    /// [`AgentError::Cancelled`]. With a `memory_budget`, the coldest idle service is
    /// snapshotted whenever the services up hold more.
    pub async fn start(
        criu: CriuBinary,
        snapshots: Snapshots,
        services: Vec<(ServiceSpec, Arc<ServiceLink>)>,
        power: Option<NodePowerConfig>,
        memory_budget: Option<u64>,
        kept_file: PathBuf,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<Agent, AgentError> {
        nix::sys::prctl::set_child_subreaper(true).map_err(|e| AgentError::Subreaper(e.into()))?;
        let init_program = init_program().map_err(AgentError::InitProgram)?;
        let cgroups = CgroupRoot::discover(std::path::Path::new("/proc/self/mountinfo"));
        let reaper = Arc::new(reaper::Reaper::default());
        let specs: Vec<&ServiceSpec> = services.iter().map(|(s, _)| s).collect();
        let kept = read_kept(
            &kept_file,
            &specs,
            &snapshots.namespace,
            cgroups.as_ref(),
            &reaper,
        )
        .await;
        if let Some(root) = &cgroups {
            // An adopted service's cgroup holds it: not a leftover.
            let names: Vec<String> = services
                .iter()
                .filter(|(s, _)| !kept.alive.contains_key(&s.name))
                .map(|(s, _)| cgroup_name(&snapshots.namespace, &s.name))
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            clear_leftovers(root, &names).await?;
        }
        let node = match power {
            Some(p) => Some(Arc::new(NodePower::start(p)?)),
            None => None,
        };
        let survives_stop = snapshots.survives_stop;
        let maker = Maker {
            host: runner::Host {
                criu,
                pools: snapshots.pools,
                namespace: snapshots.namespace,
                reaper: reaper.clone(),
            },
            init_program,
            cgroups,
            runc: Mutex::new(None),
        };
        let host = &maker.host;
        let left = snapshots_left(
            &host.pools,
            services
                .iter()
                .map(|(s, _)| host.snapshot_name(&s.name))
                .collect(),
        )
        .await;
        let shared = Arc::new(Shared {
            started: tokio::time::Instant::now(),
            transitions: Mutex::new(VecDeque::new()),
            manual: Mutex::new(VecDeque::new()),
            node,
            replan: tokio::sync::Notify::new(),
            successor_waits: tokio::sync::Notify::new(),
            links: Mutex::new(
                services
                    .iter()
                    .map(|(spec, link)| (spec.name.clone(), link.clone()))
                    .collect(),
            ),
            reaper,
            roster: roster::Roster::default(),
            memory_budget,
        });
        let mut managed = Vec::new();
        for (spec, link) in services {
            let runner = maker.runner(&spec)?;
            let m = Arc::new(Managed::new(spec, link, shared.clone(), runner));
            if let Some(&(pid, generation)) = kept.alive.get(&m.spec.name) {
                tracing::info!(service = %m.spec.name, pid, ?generation, "adopted awake: left running by an earlier run; its gate forwards to it");
                m.adopt_awake(pid, generation);
                managed.push(m);
                continue;
            }
            let fresh = kept.changed.contains(&m.spec.name);
            if let Some(&generation) = left
                .get(&host.snapshot_name(&m.spec.name))
                .filter(|_| !fresh)
            {
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
                remove_root(maker.cgroups.as_ref());
                return Err(e);
            }
            managed.push(m);
        }
        Ok(Agent {
            shared,
            services: Mutex::new(Services {
                slots: managed.into_iter().map(Slot::new).collect(),
                ..Default::default()
            }),
            changes: tokio::sync::Mutex::new(()),
            maker,
            survives_stop,
            kept_file,
            keep_running: AtomicBool::new(false),
        })
    }

    /// Runs every service's loop until `shutdown` turns true, then stops the services (see
    /// [`Snapshots::survives_stop`] for what is kept). Meanwhile a changed service is taken
    /// over by its successor once it sleeps ([`Agent::reconfigure_service`]).
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        {
            let mut s = self.services.lock().expect("services lock");
            s.running = true;
            for slot in &mut s.slots {
                slot.spawn_loop();
            }
        }
        let reaper = {
            let (shared, shutdown) = (self.shared.clone(), shutdown.clone());
            tokio::spawn(async move { shared.reaper.run(shutdown).await })
        };
        if let Some(node) = &self.shared.node {
            self.replan(node);
        }
        let mut energy = tokio::time::interval(ENERGY_TICK);
        energy.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        energy.tick().await;
        let mut successors = tokio::time::interval(SUCCESSOR_TICK);
        successors.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_cpu: HashMap<String, (f64, f64)> = HashMap::new();
        while !*shutdown.borrow() {
            let node = self.shared.node.as_ref();
            let waiting = self.successor_waiting();
            tokio::select! {
                r = shutdown.changed() => if r.is_err() { break },
                _ = self.shared.replan.notified(), if node.is_some() => {
                    if let Some(node) = node {
                        self.replan(node);
                    }
                }
                _ = energy.tick(), if node.is_some() => {
                    if let Some(node) = node {
                        self.energy_tick(node, &mut last_cpu).await;
                    }
                }
                () = self.shared.successor_waits.notified() => {}
                _ = successors.tick(), if waiting => self.take_over_changed().await,
            }
        }
        let loops: Vec<_> = {
            let mut s = self.services.lock().expect("services lock");
            s.stopping = true;
            s.slots
                .iter_mut()
                .filter_map(|slot| {
                    let _ = slot.stop.send(true);
                    slot.task.take()
                })
                .collect()
        };
        for task in loops {
            let _ = task.await;
        }
        let _ = reaper.await;
        self.stop_services().await;
        if let Some(node) = &self.shared.node {
            node.restore_all();
        }
        remove_root(self.maker.cgroups.as_ref());
    }

    /// One sample of the energy account: each service's CPU and memory since the last one.
    async fn energy_tick(&self, node: &Arc<NodePower>, last_cpu: &mut HashMap<String, (f64, f64)>) {
        let mut usage = Vec::new();
        let mut ended = 0.0;
        let mut all_asleep = true;
        for m in self.managed() {
            let (total, ended_total) = m.cpu_counters();
            let s = m.status();
            let last = last_cpu.entry(s.name.clone()).or_default();
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
        let next_arrival = self.next_arrival();
        let node = node.clone();
        // Node sleep hooks may block for as long as the node sleeps.
        let _ =
            tokio::task::spawn_blocking(move || node.tick(usage, ended, all_asleep, next_arrival))
                .await;
    }

    /// The soonest any service's next request is predicted (from its inter-arrival history,
    /// conditioned on its time idle; without a history, as long again as it has been idle);
    /// `None` without services.
    fn next_arrival(&self) -> Option<Duration> {
        let links: Vec<Arc<ServiceLink>> = self
            .shared
            .links
            .lock()
            .expect("links lock")
            .values()
            .cloned()
            .collect();
        links
            .iter()
            .map(|l| l.with_arrivals(|a| torpor_policy::predicted_idle(a, l.now())))
            .min()
    }

    /// Whether the node sleeps (really, or credited in a dry run; up when power is off), and
    /// how many of its sleeps have begun and ended since the start.
    pub fn node_state(&self) -> (NodeState, NodeTransitions) {
        self.shared
            .node
            .as_ref()
            .map_or((NodeState::Up, NodeTransitions::default()), |n| n.state())
    }

    /// The services now, in configuration order.
    fn managed(&self) -> Vec<Arc<Managed>> {
        let s = self.services.lock().expect("services lock");
        s.slots.iter().map(|slot| slot.managed.clone()).collect()
    }

    /// Stops every service. With a pool that outlives the agent, the awake ones are first
    /// checkpointed into it (all at once, each within its drain deadline and
    /// [`STOP_CHECKPOINT_LIMIT`]); what still runs then is killed, and its older snapshots are
    /// deleted so that the next start does not bring back a past it had moved on from.
    async fn stop_services(&self) {
        // A reload under way finishes first; none starts after (`stopping` is set).
        let _changes = self.changes.lock().await;
        let mut services = self.managed();
        if self.keep_running.load(Ordering::SeqCst) {
            services = self.leave_running(services).await;
        }
        if self.survives_stop {
            let mut sleeping = JoinSet::new();
            for m in &services {
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
        for m in &services {
            let killed = Managed::stop(m).await;
            if killed && self.survives_stop {
                m.forget_snapshots().await;
            }
        }
    }

    /// A stop with `--keep-running`: every awake service that can be is left running and
    /// listed in the kept-services file for the next start; the others are returned, to be
    /// stopped as usual (also the kept ones, should the file not be written).
    async fn leave_running(&self, services: Vec<Arc<Managed>>) -> Vec<Arc<Managed>> {
        let (mut kept, mut rest) = (Vec::new(), Vec::new());
        for m in services {
            if m.status().state != ServiceState::Awake {
                rest.push(m);
                continue;
            }
            match Managed::keep_running(&m).await {
                Ok(k) => kept.push((m, k)),
                Err(why) => {
                    tracing::warn!(service = %m.spec.name, %why, "stopping: this service cannot be left running; it is stopped as usual");
                    rest.push(m);
                }
            }
        }
        let entries: Vec<kept::KeptService> = kept.iter().map(|(_, k)| k.clone()).collect();
        match kept::write(&self.kept_file, &entries) {
            Ok(()) => {
                for k in &entries {
                    tracing::info!(service = %k.name, pid = k.pid, cgroup = %k.cgroup.display(), "stopping: left running for the next start to adopt");
                }
                tracing::info!(kept = entries.len(), file = %self.kept_file.display(), "stopping: the awake services keep running");
            }
            Err(e) => {
                tracing::error!(error = %torpor_pool::error_chain(&e), "the services left running cannot be listed for the next start; they are stopped as usual");
                rest.extend(kept.into_iter().map(|(m, _)| m));
            }
        }
        rest
    }

    /// Why the stop cannot leave the services running now, if it cannot: an asleep service's
    /// snapshot would go with this process (the embedded pool without a disk tier), an awake
    /// one could not be found again (a container, no cgroup), or consolidation moved awake
    /// ones out of their cgroups (undone at stop).
    pub fn keep_running_refusal(&self) -> Option<String> {
        let moved = self
            .shared
            .node
            .as_ref()
            .map_or_else(Vec::new, |n| n.moved_into_cpusets());
        if !moved.is_empty() {
            return Some(format!("[power] consolidate moved {} into torpor's cpusets (a legacy cpuset hierarchy, or no cgroup of their own), which the stop removes, so the next start could not find them in their cgroups", moved.join(", ")));
        }
        let cannot: Vec<String> = self
            .managed()
            .iter()
            .filter_map(|m| Some(format!("{} ({})", m.spec.name, m.cannot_keep()?)))
            .collect();
        if !cannot.is_empty() {
            return Some(format!("cannot be left running: {}", cannot.join("; ")));
        }
        if self.survives_stop {
            return None;
        }
        let asleep: Vec<String> = self
            .status()
            .into_iter()
            .filter(|s| {
                matches!(
                    s.state,
                    ServiceState::Asleep | ServiceState::Draining | ServiceState::Checkpointing
                )
            })
            .map(|s| s.name)
            .collect();
        (!asleep.is_empty()).then(|| format!(
            "{} asleep, and the embedded pool's RAM tier that holds the snapshot goes with torpor up (set [pool] spill_dir or use a remote pool, or wake it first)",
            asleep.join(", ")
        ))
    }

    /// The coming stop leaves the awake services running, for the next start to adopt
    /// (`torpor stop --keep-running`); see [`Agent::keep_running_refusal`] first.
    pub fn keep_running(&self) {
        self.keep_running.store(true, Ordering::SeqCst);
    }

    /// Whether the coming stop leaves the awake services running.
    pub fn keeps_running(&self) -> bool {
        self.keep_running.load(Ordering::SeqCst)
    }

    fn replan(&self, node: &NodePower) {
        let awake: Vec<AwakeService> = self
            .managed()
            .iter()
            .filter_map(|m| m.awake_for_plan())
            .collect();
        node.settle(&awake);
    }

    /// Adds a service while the agent runs (a reload): like a service at start, it is
    /// started from its command and accepting connections when this returns, or adopted
    /// asleep when the pool holds its snapshot from an earlier run. `link` is its gate's.
    pub async fn add_service(
        &self,
        spec: ServiceSpec,
        link: Arc<ServiceLink>,
    ) -> Result<Added, ReconfigureError> {
        let _changes = self.changes.lock().await;
        {
            let s = self.services.lock().expect("services lock");
            if s.stopping {
                return Err(AgentError::Stopping.into());
            }
            if s.slots
                .iter()
                .any(|slot| slot.managed.spec.name == spec.name)
            {
                return Err(ReconfigureError::Exists(spec.name));
            }
        }
        let name = spec.name.clone();
        if let Some(root) = &self.maker.cgroups {
            let cgroup = cgroup_name(&self.maker.host.namespace, &name);
            for cg in root.existing().into_iter().filter(|cg| cg.name() == cgroup) {
                clear_leftover(cg).await?;
            }
        }
        let runner = self.maker.runner(&spec)?;
        let snapshot = self.maker.host.snapshot_name(&name);
        let left = snapshots_left(&self.maker.host.pools, vec![snapshot.clone()]).await;
        let m = Arc::new(Managed::new(
            spec,
            link.clone(),
            self.shared.clone(),
            runner,
        ));
        let added = match left.get(&snapshot) {
            Some(&generation) => {
                m.adopt_asleep(generation);
                Added::Adopted(generation)
            }
            None => {
                let (_never, mut cancel) = watch::channel(false);
                // A start needs the node up and its cores back, as a restore does.
                let waking = self.shared.node.as_ref().map(|n| n.waking());
                let started = m.cold_start_initial(&mut cancel).await;
                drop(waking);
                // Settles asked for while it started were held off: one now, whatever the outcome.
                self.shared.replan.notify_one();
                if let Err(source) = started {
                    Managed::stop(&m).await;
                    return Err(AgentError::Start { name, source }.into());
                }
                Added::Started
            }
        };
        self.shared
            .links
            .lock()
            .expect("links lock")
            .insert(name.clone(), link);
        let mut s = self.services.lock().expect("services lock");
        let mut slot = Slot::new(m);
        if s.running {
            slot.spawn_loop();
        }
        s.slots.push(slot);
        drop(s);
        self.shared.replan.notify_one();
        tracing::info!(service = %name, ?added, "service added");
        Ok(added)
    }

    /// Removes a service while the agent runs (a reload): requests held for it or in flight
    /// are answered first (an asleep service with held requests is woken for them), within
    /// its drain deadline plus its start timeout; then its loop ends, its processes are
    /// killed, its gate's link refuses whatever comes later, and its snapshots are deleted
    /// from the pool.
    pub async fn remove_service(&self, name: &str) -> Result<Removed, ReconfigureError> {
        let _changes = self.changes.lock().await;
        let m = self
            .managed()
            .into_iter()
            .find(|m| m.spec.name == name)
            .ok_or_else(|| ReconfigureError::Unknown(name.to_string()))?;
        let was = m.status().state;
        let deadline = tokio::time::Instant::now() + m.spec.drain_deadline + m.spec.start_timeout;
        let mut cut = 0;
        loop {
            let s = m.status();
            let busy = s.held_now + m.link().inflight();
            if busy == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                cut = busy;
                tracing::warn!(service = %name, cut, "removed service: requests still held or in flight at its drain deadline are cut");
                break;
            }
            tokio::time::sleep(REMOVE_POLL).await;
        }
        let slot = {
            let mut s = self.services.lock().expect("services lock");
            let at = s
                .slots
                .iter()
                .position(|slot| slot.managed.spec.name == name);
            at.map(|i| s.slots.remove(i))
        };
        if let Some(mut slot) = slot {
            let _ = slot.stop.send(true);
            if let Some(task) = slot.task.take() {
                let _ = task.await;
            }
        }
        Managed::stop(&m).await;
        let released = m.forget_snapshots().await;
        self.shared.links.lock().expect("links lock").remove(name);
        self.shared.roster.remove(name);
        self.shared.replan.notify_one();
        tracing::info!(service = %name, was = was.as_str(), cut, released, "service removed");
        Ok(Removed { was, cut, released })
    }

    /// Gives a service a new configuration (a reload) from its next wake: its loop ends the
    /// next time it is asleep and a successor made from `spec` takes it over, with the same
    /// gate. With `fresh` (how it starts changed) its snapshots are deleted then and its
    /// next wake starts it from its command; otherwise that wake restores its snapshot.
    /// `why` says what changed. A later reload's change replaces one not yet taken over.
    pub async fn reconfigure_service(
        &self,
        spec: ServiceSpec,
        fresh: bool,
        why: String,
    ) -> Result<ServiceState, ReconfigureError> {
        let _changes = self.changes.lock().await;
        let mut s = self.services.lock().expect("services lock");
        let slot = s
            .slots
            .iter_mut()
            .find(|slot| slot.managed.spec.name == spec.name)
            .ok_or_else(|| ReconfigureError::Unknown(spec.name.clone()))?;
        let handed = slot.next.take().and_then(|n| n.handed);
        // A fresh start asked for earlier still holds once its snapshots are gone.
        let fresh = fresh || matches!(handed, Some(None));
        slot.next = Some(Successor {
            spec,
            fresh,
            why,
            handed,
        });
        slot.managed.ask_hand_over();
        self.shared.successor_waits.notify_one();
        Ok(slot.managed.status().state)
    }

    /// Whether a changed service waits for its predecessor's loop to end.
    fn successor_waiting(&self) -> bool {
        let s = self.services.lock().expect("services lock");
        s.slots.iter().any(|slot| slot.next.is_some())
    }

    /// Makes the successor of every changed service whose loop ended asleep.
    async fn take_over_changed(&self) {
        let ready: Vec<String> = {
            let s = self.services.lock().expect("services lock");
            s.slots
                .iter()
                .filter(|slot| {
                    slot.next.is_some() && slot.task.as_ref().is_some_and(|t| t.is_finished())
                })
                .map(|slot| slot.managed.spec.name.clone())
                .collect()
        };
        for name in ready {
            self.take_over(&name).await;
        }
    }

    async fn take_over(&self, name: &str) {
        let _changes = self.changes.lock().await;
        let taken = {
            let mut s = self.services.lock().expect("services lock");
            if s.stopping {
                return;
            }
            s.slots
                .iter_mut()
                .find(|slot| slot.managed.spec.name == name)
                .and_then(|slot| Some((slot.managed.clone(), slot.next.take()?)))
        };
        let Some((old, mut next)) = taken else { return };
        let generation = match next.handed {
            Some(g) => g,
            None => Managed::hand_over(&old, next.fresh).await,
        };
        next.handed = Some(generation);
        let runner = match self.maker.runner(&next.spec) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(service = %name, error = %torpor_pool::error_chain(&e), "the changed service cannot be made; trying again");
                self.put_back(name, next);
                return;
            }
        };
        let link = old.link().clone();
        let m = Arc::new(Managed::new(next.spec, link, self.shared.clone(), runner));
        let why = match generation {
            Some(g) => format!(
                "reconfigured ({}); its next wake restores generation {g}",
                next.why
            ),
            None => format!(
                "reconfigured ({}); its next wake starts it from its command",
                next.why
            ),
        };
        m.take_over_asleep(generation, why);
        let mut s = self.services.lock().expect("services lock");
        if let Some(slot) = s
            .slots
            .iter_mut()
            .find(|slot| slot.managed.spec.name == name)
        {
            *slot = Slot::new(m);
            slot.spawn_loop();
        }
    }

    fn put_back(&self, name: &str, next: Successor) {
        let mut s = self.services.lock().expect("services lock");
        if let Some(slot) = s
            .slots
            .iter_mut()
            .find(|slot| slot.managed.spec.name == name)
        {
            slot.next = Some(next);
        }
        self.shared.successor_waits.notify_one();
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

    /// Each service's state now, by name: what a caller asks per request, without building
    /// every service's figures as [`Agent::status`] does.
    pub fn states(&self) -> Vec<(String, ServiceState)> {
        let s = self.services.lock().expect("services lock");
        s.slots
            .iter()
            .map(|slot| (slot.managed.spec.name.clone(), slot.managed.state()))
            .collect()
    }

    /// Each service's figures now.
    pub fn status(&self) -> Vec<ServiceStatus> {
        self.managed().iter().map(|m| m.status()).collect()
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
        let found = self.managed().into_iter().find(|m| m.spec.name == service);
        match found {
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

/// What the kept-services file says for this start.
#[derive(Debug, Default)]
struct Kept {
    /// Services found running as they were kept: (root PID, generation restored from).
    alive: HashMap<String, (i32, Option<u64>)>,
    /// Services whose configuration changed since they were kept: they start fresh.
    changed: HashSet<String>,
}

/// Reads (and deletes) the kept-services file and sorts its services: those still the same
/// process in their cgroup, with the configuration they were kept with, are adopted (the
/// reaper watches them from now on); the others are logged with the reason and their
/// processes left for [`clear_leftovers`] (those no longer configured are stopped here).
async fn read_kept(
    path: &Path,
    services: &[&ServiceSpec],
    namespace: &str,
    cgroups: Option<&CgroupRoot>,
    reaper: &reaper::Reaper,
) -> Kept {
    let mut kept = Kept::default();
    let entries = match kept::take(path) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %torpor_pool::error_chain(&e), "the kept-services file is refused; its services start as usual");
            return kept;
        }
    };
    for e in entries {
        let Some(spec) = services.iter().find(|s| s.name == e.name) else {
            tracing::warn!(service = %e.name, pid = e.pid, "left running by an earlier run but no longer configured; stopping it");
            let cg = cgroups.and_then(|r| r.existing().into_iter().find(|c| c.path() == e.cgroup));
            if let Some(cg) = cg {
                if let Err(err) = clear_leftover(cg).await {
                    tracing::warn!(service = %e.name, error = %err, "cannot stop it");
                }
            }
            continue;
        };
        if kept::fingerprint(spec) != e.fingerprint {
            tracing::info!(service = %e.name, pid = e.pid, "left running by an earlier run but changed in the configuration since: it is stopped and started fresh");
            kept.changed.insert(e.name);
            continue;
        }
        let cgroup = cgroups.map(|r| r.dir().join(cgroup_name(namespace, &e.name)));
        match still_alive(&e, cgroup.as_deref(), reaper) {
            Ok(()) => {
                kept.alive.insert(e.name, (e.pid, e.generation));
            }
            Err(why) => {
                tracing::warn!(service = %e.name, pid = e.pid, %why, "left running by an earlier run but not adopted; it starts as usual");
            }
        }
    }
    kept
}

/// Whether the kept root is still the same process (same start time) in the service's
/// cgroup; if so the reaper watches it from now on.
fn still_alive(
    e: &kept::KeptService,
    cgroup: Option<&Path>,
    reaper: &reaper::Reaper,
) -> Result<(), String> {
    if cgroup != Some(e.cgroup.as_path()) {
        return Err(format!(
            "it was kept in cgroup {}, not this service's",
            e.cgroup.display()
        ));
    }
    let same = || match kept::start_time(e.pid) {
        None => Err(format!("its process {} is gone", e.pid)),
        Some(t) if t != e.start_time => Err(format!(
            "PID {} is another process now (it started at another time)",
            e.pid
        )),
        Some(_) => Ok(()),
    };
    same()?;
    let procs = std::fs::read_to_string(e.cgroup.join("cgroup.procs")).unwrap_or_default();
    if !procs.lines().any(|l| l.trim() == e.pid.to_string()) {
        return Err(format!(
            "its process {} is no longer in {}",
            e.pid,
            e.cgroup.display()
        ));
    }
    reaper
        .adopt(e.pid)
        .map_err(|err| format!("cannot watch its process {}: {err}", e.pid))?;
    // The pidfd names a process from now on: make sure it is the kept one.
    if let Err(why) = same() {
        reaper.forget(e.pid);
        return Err(why);
    }
    Ok(())
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
        if !names.contains(&cg.name().as_str()) {
            let procs = cg.procs();
            if !procs.is_empty() {
                tracing::warn!(cgroup = %cg.path().display(), ?procs, "processes of a service this agent does not run (another agent's, or an earlier configuration's); left alone");
            }
            continue;
        }
        clear_leftover(cg).await?;
    }
    Ok(())
}

/// Kills what an earlier run left in a cgroup of this agent's and removes the cgroup; refused
/// while another torpor that runs now (same namespace, so the same cgroup names) is the
/// parent of processes there: they are its services, not leftovers.
async fn clear_leftover(cg: ServiceCgroup) -> Result<(), AgentError> {
    // An earlier run still stopping (`torpor stop` returns once the stop is ordered) gets a
    // while to end before this start is refused.
    let deadline = tokio::time::Instant::now() + OTHER_AGENT_WAIT;
    let mut procs = cg.procs();
    while let Some(pid) = other_torpor_parent(&procs) {
        if tokio::time::Instant::now() >= deadline {
            return Err(AgentError::AnotherAgent {
                path: cg.path().to_path_buf(),
                pid,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        procs = cg.procs();
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
    Ok(())
}

/// How long a start waits for another torpor holding its services' cgroups to end.
const OTHER_AGENT_WAIT: Duration = Duration::from_secs(10);

/// A live torpor agent, not this process, that is the parent of one of `procs` (an agent is
/// its services' parent, or their subreaper; what a dead agent left has been reparented).
/// A torpor service init outside the cgroup is no agent: it is the subreaper of a torpor that
/// ran as a service of another torpor and died.
fn other_torpor_parent(procs: &[i32]) -> Option<i32> {
    let me = std::process::id() as i32;
    let own_exe = std::env::current_exe().ok();
    procs.iter().find_map(|pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (in parentheses) may hold spaces: fields are counted after it.
        let ppid: i32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        if ppid <= 1 || ppid == me || procs.contains(&ppid) {
            return None;
        }
        let exe = std::fs::read_link(format!("/proc/{ppid}/exe")).ok()?;
        // A binary replaced since it started (an upgrade) reads as "PATH (deleted)".
        let exe = std::path::PathBuf::from(
            exe.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string(),
        );
        let torpor = exe.file_name().is_some_and(|n| n == "torpor")
            || own_exe.as_ref().is_some_and(|own| *own == exe);
        let cmdline = std::fs::read(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
        let service_init = cmdline
            .split(|b| *b == 0)
            .nth(1)
            .is_some_and(|a| a == init::SUBCOMMAND.as_bytes());
        (torpor && !service_init).then_some(ppid)
    })
}

impl Shared {
    /// No node power and no containers, for the state machine's tests.
    #[cfg(test)]
    pub(crate) fn bare(links: &[Arc<ServiceLink>]) -> Shared {
        Shared {
            started: tokio::time::Instant::now(),
            transitions: Mutex::new(VecDeque::new()),
            manual: Mutex::new(VecDeque::new()),
            node: None,
            replan: tokio::sync::Notify::new(),
            successor_waits: tokio::sync::Notify::new(),
            links: Mutex::new(links.iter().map(|l| (l.name.clone(), l.clone())).collect()),
            reaper: Arc::default(),
            roster: roster::Roster::default(),
            memory_budget: None,
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
