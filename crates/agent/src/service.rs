//! One managed service: its state machine and the loop that drives it.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use torpor_control::ServiceLink;
use torpor_criu::procs;
use torpor_policy::{
    choose_level, decide_sleep, level_costs, predicted_idle, prewarm_at, prewarm_hold_until,
    Choice, Governor, Level, LevelCost, LevelInputs, PolicyConfig, SleepDecision, SnapshotTier,
};
use torpor_steer::Steering;
use tracing::{debug, error, info, warn};

use crate::{
    costs::{CostStatus, Costs, Looks},
    manual::{
        self, ManualAction, ManualCommand, ManualError, ManualOutcome, ManualResult, PinStatus,
    },
    process::{Launch, LaunchError},
    runner::{CheckpointFailed, Committed, LazyMemory, MemoryRestore, Restored, Runner},
    Shared,
};

/// What the agent needs to run one service.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub launch: Launch,
    /// Where the service itself listens (the gate forwards there).
    pub backend: SocketAddr,
    pub policy: PolicyConfig,
    /// Longest wait for in-flight requests before a checkpoint.
    pub drain_deadline: Duration,
    /// Longest wait for a started or restored service to accept connections.
    pub start_timeout: Duration,
    /// Services woken together with this one (a mid-tier's buckets), so a request does not
    /// pay their restores one after the other.
    pub wake_with: Vec<String>,
    /// Eager or lazy restore of its memory (process trees; containers restore eagerly).
    pub memory: MemoryRestore,
    /// How new connections reach it while it is awake.
    pub steering: SteeringMode,
}

/// How new connections for a service's public address reach it while it is awake (while
/// it sleeps or wakes they always reach the gate, which holds them).
#[derive(Debug, Clone, Default)]
pub enum SteeringMode {
    /// Through the gate.
    #[default]
    Proxy,
    /// Straight to the service's own listening socket, steered in the kernel: the agent
    /// steers after every wake and unsteers before every drain, freeze or stop.
    Kernel(Arc<dyn Steering>),
    /// Kernel steering was asked for and this host cannot do it (why): proxied.
    Fallback(String),
}

impl SteeringMode {
    /// `kernel` or `proxy`, as `torpor status` shows it.
    pub fn name(&self) -> &'static str {
        match self {
            SteeringMode::Kernel(_) => "kernel",
            SteeringMode::Proxy | SteeringMode::Fallback(_) => "proxy",
        }
    }
}

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    Awake,
    /// Its cgroup frozen by the governor: memory in place, no CPU, thawed by a request.
    Frozen,
    Draining,
    Checkpointing,
    Asleep,
    Waking,
    Failed,
}

impl ServiceState {
    /// The state's name as `torpor status` and `/metrics` show it.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Awake => "awake",
            ServiceState::Frozen => "frozen",
            ServiceState::Draining => "draining",
            ServiceState::Checkpointing => "checkpointing",
            ServiceState::Asleep => "asleep",
            ServiceState::Waking => "waking",
            ServiceState::Failed => "failed",
        }
    }
}

/// One state change and what it cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transition {
    /// Seconds since the agent started.
    pub at_s: f64,
    pub service: String,
    pub from: ServiceState,
    pub to: ServiceState,
    /// Duration of the step that ended in `to`.
    pub took_s: f64,
    pub detail: String,
}

/// A service's figures for `torpor status` and `/metrics` (read back by `torpor status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: ServiceState,
    pub pid: Option<i32>,
    pub footprint_bytes: u64,
    pub snapshot_bytes: Option<u64>,
    pub snapshot_generation: Option<u64>,
    pub snapshot_tier: Option<SnapshotTier>,
    pub sleeps: u64,
    pub wakes: u64,
    pub prewarms: u64,
    pub cold_starts: u64,
    pub restarts: u64,
    pub failed_checkpoints: u64,
    pub last_checkpoint_s: Option<f64>,
    pub last_wake_s: Option<f64>,
    pub held_now: usize,
    pub rejected_requests: u64,
    pub time_asleep_s: f64,
    pub time_awake_s: f64,
    /// CPU seconds its processes used, over all their lives.
    #[serde(default)]
    pub cpu_s: f64,
    /// Where the time of the last wake went.
    #[serde(default)]
    pub last_wake: Option<WakeTimeline>,
    /// Why this service can never be checkpointed on this host (it stays awake).
    #[serde(default)]
    pub cannot_sleep: Option<String>,
    /// Wakes that found the snapshot gone or untrustworthy on every pool replica (the
    /// service cold-started without its state).
    #[serde(default)]
    pub snapshots_lost: u64,
    /// Why the last such snapshot was lost.
    #[serde(default)]
    pub last_snapshot_lost: Option<String>,
    /// How the memory of the running incarnation came in, when it was restored lazily.
    #[serde(default)]
    pub lazy: Option<LazyMemory>,
    /// Node memory kept for the next wake while the service sleeps (its staged images,
    /// eagerly restored pages and working set, or the held restore of an armed wake):
    /// resident although the service is not.
    #[serde(default)]
    pub staged_bytes: u64,
    /// The next wake is armed: its restore ran at sleep and waits, stopped, to be released.
    #[serde(default)]
    pub armed: bool,
    /// The pin that keeps it awake, while one is in force (`torpor pin`).
    #[serde(default)]
    pub pinned: Option<PinStatus>,
    /// The last manual command for it (`torpor sleep`, `wake`, `pin`, `unpin`): who, when,
    /// what came of it.
    #[serde(default)]
    pub last_manual: Option<ManualAction>,
    /// The generation it started asleep in, when this run adopted a snapshot an earlier run
    /// (stopped with its state kept) left in the pool instead of launching the service.
    #[serde(default)]
    pub adopted_generation: Option<u64>,
    /// The process it was found running as at start, when this run adopted it awake (an
    /// earlier run stopped with `--keep-running`) instead of launching the service.
    #[serde(default)]
    pub adopted_pid: Option<i32>,
    /// What it was measured to cost idle and per cycle (the governor's inputs).
    #[serde(default)]
    pub costs: CostStatus,
    /// The frozen and snapshotted levels' break-even, as the governor last weighed them.
    #[serde(default)]
    pub levels: Vec<LevelCost>,
    /// The governor's last choice and why (the energy governor only).
    #[serde(default)]
    pub last_choice: Option<Choice>,
    #[serde(default)]
    pub freezes: u64,
    #[serde(default)]
    pub time_frozen_s: f64,
    /// Why its tree cannot be frozen here (the governor then skips that level).
    #[serde(default)]
    pub cannot_freeze: Option<String>,
    /// `kernel` or `proxy`: how new connections reach it while it is awake.
    #[serde(default)]
    pub steering: String,
    /// Why it is proxied although `steering = "kernel"` was asked for (the host cannot), or
    /// why the last steer failed (that incarnation is proxied).
    #[serde(default)]
    pub steering_problem: Option<String>,
    /// New connections go straight to the service now (kernel steering, awake).
    #[serde(default)]
    pub steered_now: bool,
    /// Connections the kernel handed to the service without the gate (since the steering
    /// was attached): arrivals that are not in the gate's request counts.
    #[serde(default)]
    pub steered_connections: u64,
    /// Steered connections open at the last look (those that carried data within the idle
    /// threshold keep the service awake).
    #[serde(default)]
    pub steered_open: usize,
}

/// The steps of one wake, each in milliseconds from the moment the agent saw the wake
/// request (the first held request's arrival, a pre-warm's decision or a crash).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WakeTimeline {
    /// `request`, `prewarm`, `restart` (after a crash) or `retry` (after a failure).
    pub cause: String,
    /// `restore` or `cold start`.
    pub how: String,
    pub restore_start_ms: f64,
    /// CRIU finished restoring (absent for a cold start).
    pub criu_done_ms: Option<f64>,
    /// The service accepted a connection on its backend address.
    pub accepting_ms: f64,
    /// The link opened: held requests went to the service.
    pub released_ms: f64,
    /// The gate saw the service's first answer after the wake (HTTP: its response began;
    /// TCP: the connection to it was made); absent until a request was answered.
    #[serde(default)]
    pub first_byte_ms: Option<f64>,
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[derive(Debug)]
struct Runtime {
    state: ServiceState,
    since: Instant,
    pid: Option<i32>,
    /// Expected wake latency, for the policy: measured wakes, smoothed.
    expected_wake: Duration,
    /// No new sleep attempt before this (after a failed checkpoint).
    sleep_not_before: Instant,
    /// While failed: the next cold-start attempt and the wait after it (doubling).
    retry_at: Instant,
    retry_backoff: Duration,
    /// Virtual time when the service last fell asleep (pre-warm only after it).
    asleep_at: Duration,
    asleep_total: Duration,
    awake_total: Duration,
    /// CPU seconds of the current process tree at the last look.
    life_cpu_s: f64,
    /// When the awake tree was last looked at (the looks are [`TICK`] or [`IDLE_LOOK`] apart).
    looked_at: Option<Instant>,
    /// CPU seconds of trees that have ended (their time is in our RUSAGE_CHILDREN).
    ended_cpu_s: f64,
    /// Recent CPU use in CPUs (smoothed), for consolidation.
    demand_cpus: f64,
    /// An operator's pin: the policy does not put the service to sleep while it holds.
    pin: Option<Pin>,
    frozen_total: Duration,
    /// What it costs idle and per cycle, measured.
    costs: Costs,
    /// The steering's connection counter at the last look (new ones since are arrivals).
    steered_seen: u64,
    /// When the open steered connections were last looked at: a sock_diag dump and a walk
    /// of the tree's descriptors, too costly for every tick.
    steered_looked: Option<Instant>,
    status: ServiceStatus,
}

/// A pin in force: who set it, and when it ends (`None`: at `unpin`).
#[derive(Debug, Clone)]
struct Pin {
    by: String,
    at_unix_ms: u64,
    until: Option<(Instant, u64)>,
}

impl Pin {
    fn status(&self) -> PinStatus {
        PinStatus {
            by: self.by.clone(),
            at_unix_ms: self.at_unix_ms,
            until_unix_ms: self.until.map(|(_, ms)| ms),
            left_s: self
                .until
                .map(|(at, _)| at.saturating_duration_since(Instant::now()).as_secs_f64()),
        }
    }
}

/// A service under the agent.
#[derive(Debug)]
pub(crate) struct Managed {
    pub spec: ServiceSpec,
    link: Arc<ServiceLink>,
    shared: Arc<Shared>,
    /// What runs, checkpoints and restores it.
    runner: Arc<dyn Runner>,
    rt: Mutex<Runtime>,
    /// Manual commands for the loop, which carries them out between its own steps.
    commands: mpsc::Sender<manual::Request>,
    /// Their receiving end, held by the running loop.
    inbox: tokio::sync::Mutex<mpsc::Receiver<manual::Request>>,
    /// A reload changed the service: its loop ends the next time it finds it asleep, so that
    /// a successor with the new configuration takes it over ([`Managed::hand_over`]).
    handing_over: std::sync::atomic::AtomicBool,
}

/// Manual commands queued for one service at most; more are refused as a busy service.
const COMMAND_QUEUE: usize = 16;

/// First wait before a failed service is started again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// How often a service's loop looks at its process and its policy while it works, wakes or
/// sleeps, or a decision is near.
const TICK: Duration = Duration::from_millis(20);

/// How often it looks while the service is awake and idle with no decision near: each look
/// reads the tree's /proc files, and watching idle services every [`TICK`] cost torpor
/// about 7 % of a core for 13 of them, more than the idle services it is there to save.
const IDLE_LOOK: Duration = Duration::from_millis(250);

/// How often it looks at a frozen or snapshotted service with no decision near: such a look
/// reads no file (a request or a command wakes the loop at once), so it is only the
/// governor's next weighing of a deeper level, which moves in seconds.
const REST_LOOK: Duration = Duration::from_secs(1);

/// The looks the governor counts in an idle service's cost.
const LOOKS: Looks = Looks {
    awake_idle: IDLE_LOOK,
    resting: REST_LOOK,
};

/// Longest time between two looks at the open steered connections; under a short idle
/// threshold they are looked at every quarter of it, so recent data is seen before it passes.
const STEERED_LOOK: Duration = Duration::from_secs(1);

/// Why a service is being woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WakeCause {
    Request,
    Prewarm,
    /// `torpor wake`.
    Manual,
    /// `torpor pin`: a hold, not a sign of demand.
    Pin,
}

impl Managed {
    pub fn new(
        spec: ServiceSpec,
        link: Arc<ServiceLink>,
        shared: Arc<Shared>,
        runner: Arc<dyn Runner>,
    ) -> Managed {
        let now = Instant::now();
        let status = ServiceStatus {
            name: spec.name.clone(),
            state: ServiceState::Waking,
            pid: None,
            footprint_bytes: 0,
            snapshot_bytes: None,
            snapshot_generation: None,
            snapshot_tier: None,
            sleeps: 0,
            wakes: 0,
            prewarms: 0,
            cold_starts: 0,
            snapshots_lost: 0,
            last_snapshot_lost: None,
            lazy: None,
            staged_bytes: 0,
            armed: false,
            restarts: 0,
            failed_checkpoints: 0,
            last_checkpoint_s: None,
            last_wake_s: None,
            held_now: 0,
            rejected_requests: 0,
            time_asleep_s: 0.0,
            time_awake_s: 0.0,
            cpu_s: 0.0,
            last_wake: None,
            cannot_sleep: None,
            pinned: None,
            last_manual: None,
            adopted_generation: None,
            adopted_pid: None,
            costs: CostStatus::default(),
            levels: Vec::new(),
            last_choice: None,
            freezes: 0,
            time_frozen_s: 0.0,
            cannot_freeze: None,
            steering: spec.steering.name().into(),
            steering_problem: match &spec.steering {
                SteeringMode::Fallback(why) => Some(why.clone()),
                _ => None,
            },
            steered_now: false,
            steered_connections: 0,
            steered_open: 0,
        };
        // A steering taken over from a predecessor (a reload) has counted already.
        let steered_seen = match &spec.steering {
            SteeringMode::Kernel(s) => s.steered().unwrap_or(0),
            _ => 0,
        };
        let (commands, inbox) = mpsc::channel(COMMAND_QUEUE);
        shared.roster.set_state(&spec.name, ServiceState::Waking);
        Managed {
            commands,
            inbox: tokio::sync::Mutex::new(inbox),
            handing_over: Default::default(),
            spec,
            link,
            shared,
            runner,
            rt: Mutex::new(Runtime {
                state: ServiceState::Waking,
                since: now,
                pid: None,
                expected_wake: Duration::from_millis(100),
                sleep_not_before: now,
                retry_at: now,
                retry_backoff: RETRY_FIRST,
                asleep_at: Duration::ZERO,
                asleep_total: Duration::ZERO,
                awake_total: Duration::ZERO,
                life_cpu_s: 0.0,
                looked_at: None,
                ended_cpu_s: 0.0,
                demand_cpus: 0.0,
                pin: None,
                frozen_total: Duration::ZERO,
                costs: Costs::default(),
                steered_seen,
                steered_looked: None,
                status,
            }),
        }
    }

    /// The process tree is gone: its CPU time now sits in our children's usage.
    fn end_life(&self) {
        let mut rt = self.rt.lock().expect("runtime lock");
        rt.ended_cpu_s += rt.life_cpu_s;
        rt.life_cpu_s = 0.0;
        rt.demand_cpus = 0.0;
    }

    /// (CPU seconds over all lives, CPU seconds of ended lives), for the energy account.
    pub fn cpu_counters(&self) -> (f64, f64) {
        let rt = self.rt.lock().expect("runtime lock");
        (rt.status.cpu_s, rt.ended_cpu_s)
    }

    /// The service as consolidation sees it, when it is awake or frozen: a frozen tree keeps
    /// its place on the cores in use, with no demand, so that a thaw finds it there.
    pub fn awake_for_plan(&self) -> Option<crate::node::AwakeService> {
        let rt = self.rt.lock().expect("runtime lock");
        let frozen = rt.state == ServiceState::Frozen;
        let pid = rt
            .pid
            .filter(|_| rt.state == ServiceState::Awake || frozen)?;
        Some(crate::node::AwakeService {
            name: self.spec.name.clone(),
            pids: self.runner.members(pid),
            demand_cpus: if frozen { 0.0 } else { rt.demand_cpus },
            cgroup: self.runner.own_cgroup(),
        })
    }

    pub(crate) fn state(&self) -> ServiceState {
        self.rt.lock().expect("runtime lock").state
    }

    fn pid(&self) -> Option<i32> {
        self.rt.lock().expect("runtime lock").pid
    }

    /// Moves to `to`, accounting time asleep/awake and recording the transition.
    fn transition(&self, to: ServiceState, took: Duration, detail: impl Into<String>) {
        let from = {
            let mut rt = self.rt.lock().expect("runtime lock");
            let now = Instant::now();
            let spent = now - rt.since;
            match rt.state {
                ServiceState::Asleep => rt.asleep_total += spent,
                ServiceState::Awake => rt.awake_total += spent,
                ServiceState::Frozen => rt.frozen_total += spent,
                _ => {}
            }
            let from = rt.state;
            rt.state = to;
            rt.since = now;
            from
        };
        if to == ServiceState::Waking {
            // A start or a restore puts the tree back in its own cgroup, whatever pids it has.
            if let Some(node) = &self.shared.node {
                node.forget(&self.spec.name);
            }
        }
        self.shared.roster.set_state(&self.spec.name, to);
        self.shared.record(Transition {
            at_s: self.shared.started.elapsed().as_secs_f64(),
            service: self.spec.name.clone(),
            from,
            to,
            took_s: took.as_secs_f64(),
            detail: detail.into(),
        });
    }

    /// First start when the agent comes up; `cancel` cuts the wait for it short (the
    /// launch itself is not cut: a process must never start after its cgroup was cleared).
    pub async fn cold_start_initial(
        &self,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<(), LaunchError> {
        if *cancel.borrow() {
            return Err(LaunchError::Cancelled);
        }
        let t0 = Instant::now();
        let pid = self.runner.launch().await?;
        let ready = tokio::select! {
            biased;
            _ = cancel.wait_for(|c| *c) => Err(LaunchError::Cancelled),
            r = self.runner.wait_ready(pid, false) => r,
        };
        if let Err(e) = ready {
            self.runner.stop(pid, Duration::from_millis(500)).await;
            return Err(e);
        }
        self.rt.lock().expect("runtime lock").pid = Some(pid);
        self.transition(
            ServiceState::Awake,
            t0.elapsed(),
            format!("started as pid {pid}"),
        );
        self.serve(pid, true);
        Ok(())
    }

    /// First "start" when the pool already holds `generation` of this service, left by an
    /// earlier run that stopped with its state kept: nothing is launched, the service is
    /// asleep in that generation and the first request restores it.
    pub fn adopt_asleep(&self, generation: u64) {
        {
            let mut rt = self.rt.lock().expect("runtime lock");
            rt.asleep_at = self.link.now();
            rt.status.snapshot_generation = Some(generation);
            rt.status.adopted_generation = Some(generation);
        }
        self.transition(
            ServiceState::Asleep,
            Duration::ZERO,
            format!("adopted asleep: generation {generation} left in the pool by an earlier run"),
        );
        self.link.arm_wake();
    }

    /// First "start" when an earlier run left the service running (`torpor stop
    /// --keep-running`) as `pid`, restored from `generation` if it was: nothing is launched,
    /// the service is awake as that process and its gate forwards to it at once. The caller
    /// made sure it is the same process and watches it (it is not our child).
    pub fn adopt_awake(&self, pid: i32, generation: Option<u64>) {
        {
            let mut rt = self.rt.lock().expect("runtime lock");
            rt.pid = Some(pid);
            rt.status.snapshot_generation = generation;
            rt.status.adopted_pid = Some(pid);
        }
        self.transition(
            ServiceState::Awake,
            Duration::ZERO,
            format!("adopted awake: pid {pid}, left running by an earlier run"),
        );
        self.serve(pid, true);
    }

    /// At the agent's stop with `--keep-running`: an awake service is left running for the
    /// next start to adopt, its gate shut (nothing is held while it is awake). What the next
    /// start needs to find it again, or why it cannot be left (it is then stopped as usual).
    pub async fn keep_running(me: &Arc<Managed>) -> Result<crate::kept::KeptService, String> {
        me.thaw_if_frozen("stopping").await;
        let (state, pid, generation) = {
            let rt = me.rt.lock().expect("runtime lock");
            (rt.state, rt.pid, rt.status.snapshot_generation)
        };
        let pid = match (state, pid) {
            (ServiceState::Awake, Some(pid)) => pid,
            (other, _) => return Err(format!("it is {}, not awake", other.as_str())),
        };
        let cgroup = me.runner.keepable(pid)?;
        me.runner.detach(crate::STOP_CHECKPOINT_LIMIT).await?;
        let start_time =
            crate::kept::start_time(pid).ok_or_else(|| format!("its process {pid} is gone"))?;
        // Nothing staged for a wake that will not come from this process.
        me.runner.prepare_stop().await;
        // Steering ends with this run; the next one steers again once it adopts the service.
        let _ = me.to_gate();
        me.link.shut_down();
        Ok(crate::kept::KeptService {
            name: me.spec.name.clone(),
            pid,
            start_time,
            cgroup,
            generation,
            fingerprint: crate::kept::fingerprint(&me.spec),
        })
    }

    /// Why this service could not be left running now, if it could not (see
    /// [`Self::keep_running`]); asleep and other services are not left running at all.
    pub fn cannot_keep(&self) -> Option<String> {
        let (state, pid) = {
            let rt = self.rt.lock().expect("runtime lock");
            (rt.state, rt.pid)
        };
        match (state, pid) {
            (ServiceState::Awake, Some(pid)) => self.runner.keepable(pid).err(),
            _ => None,
        }
    }

    async fn launch(&self) -> Result<i32, LaunchError> {
        let pid = self.runner.launch().await?;
        if let Err(e) = self.runner.wait_ready(pid, false).await {
            self.runner.stop(pid, Duration::from_millis(500)).await;
            return Err(e);
        }
        Ok(pid)
    }

    /// The service is awake as `pid` and serves: its gate forwards (releasing what it held)
    /// and, with kernel steering, new connections go straight to the service from here on.
    /// A steer that fails is logged and leaves this incarnation proxied: never an outage.
    /// `demand`: it serves because of a request or a wake asked for (its idle time starts
    /// over), not after a pause on the way elsewhere (a thaw before a snapshot, a pin).
    fn serve(&self, pid: i32, demand: bool) {
        if demand {
            self.link.open();
        } else {
            self.link.reopen();
        }
        let SteeringMode::Kernel(steering) = &self.spec.steering else {
            return;
        };
        let steered = match self.spec.backend {
            SocketAddr::V4(backend) => steering.steer(pid, backend).map_err(|e| e.to_string()),
            SocketAddr::V6(b) => Err(format!("the backend {b} is not IPv4")),
        };
        let mut rt = self.rt.lock().expect("runtime lock");
        match steered {
            Ok(()) => {
                debug!(service = %self.spec.name, pid, "new connections are steered to the service");
                rt.status.steered_now = true;
                rt.status.steering_problem = None;
            }
            Err(e) => {
                warn!(service = %self.spec.name, pid, error = %e, "kernel steering failed; the gate proxies this incarnation");
                rt.status.steered_now = false;
                rt.status.steering_problem = Some(format!(
                    "kernel steering failed for pid {pid} ({e}); the gate proxies it until its next wake"
                ));
            }
        }
    }

    /// New connections reach the gate again, which holds them: called first of all before a
    /// drain, a freeze, a checkpoint or a stop, so that none lands on a service about to stop
    /// serving. The connections steered so far are counted first. `Err` when the kernel
    /// refused: a sleep then does not go on (new connections would still reach the service).
    fn to_gate(&self) -> Result<(), String> {
        let SteeringMode::Kernel(steering) = &self.spec.steering else {
            return Ok(());
        };
        self.note_steered(None);
        let undone = steering.unsteer().map_err(|e| e.to_string());
        match &undone {
            Ok(()) => self.rt.lock().expect("runtime lock").status.steered_now = false,
            Err(e) => {
                error!(service = %self.spec.name, error = %e, "cannot steer new connections back to the gate")
            }
        }
        undone
    }

    /// With kernel steering, the traffic the gate never sees goes into its arrival record:
    /// each connection steered since the last look is an arrival, and (given `pid`, once the
    /// gate's record says the service is half-way to its idle threshold, at most every
    /// [`STEERED_LOOK`]) data on an open steered connection within the threshold is activity
    /// as of when it passed, so the service is never slept under a live stream, and an idle
    /// keep-alive connection does not keep it awake.
    fn note_steered(&self, pid: Option<i32>) {
        let SteeringMode::Kernel(steering) = &self.spec.steering else {
            return;
        };
        let total = match steering.steered() {
            Ok(t) => t,
            Err(e) => {
                debug!(service = %self.spec.name, error = %e, "cannot read the steering's counter");
                return;
            }
        };
        let new = {
            let mut rt = self.rt.lock().expect("runtime lock");
            let new = total.saturating_sub(rt.steered_seen);
            rt.steered_seen = total;
            rt.status.steered_connections = total;
            new
        };
        let now = self.link.now();
        if new > 0 {
            self.link
                .with_arrivals(|a| (0..new).for_each(|_| a.record(now)));
        }
        let Some(pid) = pid else { return };
        let threshold = self.spec.policy.idle_threshold;
        let idle = self.link.with_arrivals(|a| a.idle_for(now));
        if idle < threshold / 2 {
            return;
        }
        {
            let mut rt = self.rt.lock().expect("runtime lock");
            let every = STEERED_LOOK.min(threshold / 4);
            if rt.steered_looked.is_some_and(|at| at.elapsed() < every) {
                return;
            }
            rt.steered_looked = Some(Instant::now());
        }
        let open = steering.open_connections(pid).unwrap_or_else(|e| {
            debug!(service = %self.spec.name, error = %e, "cannot count the steered connections");
            Default::default()
        });
        self.rt.lock().expect("runtime lock").status.steered_open = open.open;
        if let Some(quiet) = open.quietest.filter(|q| *q < threshold) {
            self.link
                .with_arrivals(|a| a.mark_active(now.saturating_sub(quiet)));
        }
    }

    /// The service's loop, until `shutdown` is true, or (after [`Self::ask_hand_over`])
    /// until it is asleep between two of its steps, so that no wake is under way.
    pub async fn run(me: Arc<Managed>, mut shutdown: watch::Receiver<bool>) {
        let mut next_look = tokio::time::Instant::now() + TICK;
        let mut inbox = me.inbox.lock().await;
        let mut handed = false;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let state = me.state();
            let asleep = state == ServiceState::Asleep;
            if asleep && me.handing_over.load(std::sync::atomic::Ordering::SeqCst) {
                handed = true;
                break;
            }
            let resting = asleep || state == ServiceState::Frozen;
            tokio::select! {
                r = shutdown.changed() => if r.is_err() { break },
                _ = me.link.wake_requested(), if resting => me.wake(WakeCause::Request, Instant::now()).await,
                Some(req) = inbox.recv() => me.manual(req).await,
                () = tokio::time::sleep_until(next_look) => {
                    me.on_tick().await;
                    next_look = tokio::time::Instant::now() + me.next_look();
                    continue;
                }
            }
            // A wake or a command changed the service: look soon, as after any change.
            next_look = next_look.min(tokio::time::Instant::now() + TICK);
        }
        // Commands that came too late are answered, and later ones refused at once.
        inbox.close();
        while let Ok(req) = inbox.try_recv() {
            let _ = req.reply.send(Err(match handed {
                true => ManualError::Busy {
                    service: me.spec.name.clone(),
                    state: "being reconfigured".into(),
                },
                false => ManualError::Stopping,
            }));
        }
    }

    /// Asks the loop to end the next time the service is asleep (a reload's successor then
    /// takes it over with the new configuration).
    pub fn ask_hand_over(&self) {
        self.handing_over
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// After its loop ended for a hand-over: what was made ready for its next wake is given
    /// up and its cgroup removed, its link left as it is for the successor. With `release`
    /// its snapshots are deleted (the successor starts from its command); otherwise the
    /// generation it sleeps in is returned for the successor to restore.
    pub async fn hand_over(me: &Arc<Managed>, release: bool) -> Option<u64> {
        me.runner.retire().await;
        if release {
            me.forget_snapshots().await;
            return None;
        }
        me.rt
            .lock()
            .expect("runtime lock")
            .status
            .snapshot_generation
    }

    /// The successor's first state: asleep in `generation` (restored at its first wake), or
    /// without a snapshot (its first wake starts it from its command). `why` is the
    /// transition's detail.
    pub fn take_over_asleep(&self, generation: Option<u64>, why: String) {
        {
            let mut rt = self.rt.lock().expect("runtime lock");
            rt.asleep_at = self.link.now();
            rt.status.snapshot_generation = generation;
        }
        self.transition(ServiceState::Asleep, Duration::ZERO, why);
        self.link.arm_wake();
    }

    /// Hands a manual command to the service's loop and waits for its result.
    pub async fn command(&self, command: ManualCommand, by: &str) -> ManualResult {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let req = manual::Request {
            command,
            by: by.to_string(),
            reply,
        };
        match self.commands.try_send(req) {
            Ok(()) => answer.await.unwrap_or(Err(ManualError::Stopping)),
            Err(mpsc::error::TrySendError::Full(_)) => Err(ManualError::Busy {
                service: self.spec.name.clone(),
                state: "busy with earlier commands".into(),
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ManualError::Stopping),
        }
    }

    /// Carries out one manual command, records it and answers it.
    async fn manual(&self, req: manual::Request) {
        let manual::Request { command, by, reply } = req;
        let result = self.carry_out(command, &by).await;
        // A thaw, wake or sleep by hand changes what is awake, as the policy's do.
        self.shared.replan.notify_one();
        let action = ManualAction {
            at_s: self.shared.started.elapsed().as_secs_f64(),
            at_unix_ms: manual::unix_ms_now(),
            service: self.spec.name.clone(),
            action: command.name().into(),
            for_s: match command {
                ManualCommand::Pin { for_ms } => for_ms.map(|ms| ms as f64 / 1e3),
                _ => None,
            },
            by,
            outcome: match &result {
                Ok((ManualOutcome::Done, _)) => "done".into(),
                Ok((ManualOutcome::NoOp, _)) => "no_op".into(),
                Err(e) => e.outcome().into(),
            },
            detail: match &result {
                Ok((_, detail)) => detail.clone(),
                Err(e) => e.to_string(),
            },
        };
        self.rt.lock().expect("runtime lock").status.last_manual = Some(action.clone());
        self.shared.record_manual(action);
        let _ = reply.send(result);
    }

    /// The pin in force, if any; a pin whose time is up is removed here.
    fn pin(&self) -> Option<Pin> {
        let mut rt = self.rt.lock().expect("runtime lock");
        if let Some(Pin {
            until: Some((at, _)),
            by,
            ..
        }) = &rt.pin
        {
            if Instant::now() >= *at {
                tracing::info!(service = %self.spec.name, pinned_by = %by, "pin expired; the policy decides again");
                rt.pin = None;
            }
        }
        rt.pin.clone()
    }

    async fn carry_out(&self, command: ManualCommand, by: &str) -> ManualResult {
        let name = self.spec.name.clone();
        // Frozen is the governor's business: an operator's command starts from awake. Only
        // a wake asks for the service; a pin holds it, a sleep rests it.
        if self.state() == ServiceState::Frozen {
            let demand = command == ManualCommand::Wake;
            self.thaw_for_reason(Instant::now(), &format!("{command:?} by {by}"), demand)
                .await;
        }
        let state = self.state();
        match command {
            ManualCommand::Sleep => {
                if let Some(p) = self.pin() {
                    return Err(ManualError::Pinned {
                        service: name,
                        left_s: p.until.map(|(at, _)| {
                            at.saturating_duration_since(Instant::now())
                                .as_secs_f64()
                                .ceil() as u64
                        }),
                    });
                }
                match state {
                    ServiceState::Asleep => {
                        Ok((ManualOutcome::NoOp, format!("{name} is already asleep")))
                    }
                    ServiceState::Failed => Err(ManualError::Down { service: name }),
                    ServiceState::Awake => {
                        let (pid, footprint, cannot) = {
                            let rt = self.rt.lock().expect("runtime lock");
                            (
                                rt.pid,
                                rt.status.footprint_bytes,
                                rt.status.cannot_sleep.clone(),
                            )
                        };
                        if let Some(reason) = cannot {
                            return Err(ManualError::CannotSleep {
                                service: name,
                                reason,
                            });
                        }
                        let Some(pid) = pid else {
                            return Err(ManualError::Busy {
                                service: name,
                                state: "without a process".into(),
                            });
                        };
                        let tier = if footprint <= self.spec.policy.memory_tier_max_bytes {
                            SnapshotTier::Memory
                        } else {
                            SnapshotTier::Tiered
                        };
                        match self.sleep(pid, tier, format!("manual sleep by {by}")).await {
                            Ok(detail) => {
                                Ok((ManualOutcome::Done, format!("{name} is asleep: {detail}")))
                            }
                            Err(reason) => Err(ManualError::CheckpointFailed {
                                service: name,
                                reason,
                            }),
                        }
                    }
                    other => Err(ManualError::Busy {
                        service: name,
                        state: other.as_str().into(),
                    }),
                }
            }
            ManualCommand::Wake => match state {
                ServiceState::Awake => Ok((
                    ManualOutcome::NoOp,
                    format!("{name} is already awake; nothing to do"),
                )),
                ServiceState::Asleep | ServiceState::Failed => {
                    self.wake_by_hand(WakeCause::Manual).await
                }
                other => Err(ManualError::Busy {
                    service: name,
                    state: other.as_str().into(),
                }),
            },
            ManualCommand::Pin { for_ms } => {
                let until = for_ms.map(|ms| {
                    let left = Duration::from_millis(ms);
                    (Instant::now() + left, manual::unix_ms_in(left))
                });
                self.rt.lock().expect("runtime lock").pin = Some(Pin {
                    by: by.to_string(),
                    at_unix_ms: manual::unix_ms_now(),
                    until,
                });
                let how_long = match for_ms {
                    Some(ms) => format!("for {:?}", Duration::from_millis(ms)),
                    None => "until unpinned".into(),
                };
                match state {
                    ServiceState::Awake => Ok((
                        ManualOutcome::Done,
                        format!("{name} is pinned awake {how_long}"),
                    )),
                    ServiceState::Asleep | ServiceState::Failed => {
                        let (_, woke) = self.wake_by_hand(WakeCause::Pin).await?;
                        Ok((
                            ManualOutcome::Done,
                            format!("{name} is pinned awake {how_long}; {woke}"),
                        ))
                    }
                    other => Err(ManualError::Busy {
                        service: name,
                        state: other.as_str().into(),
                    }),
                }
            }
            ManualCommand::Unpin => {
                let was = self.pin();
                self.rt.lock().expect("runtime lock").pin = None;
                match was {
                    Some(p) => Ok((
                        ManualOutcome::Done,
                        format!(
                            "{name} is unpinned (pinned by {}); the policy decides again",
                            p.by
                        ),
                    )),
                    None => Ok((
                        ManualOutcome::NoOp,
                        format!("{name} was not pinned; nothing to do"),
                    )),
                }
            }
        }
    }

    /// Wakes an asleep service now (`cause`: a wake or a pin), or retries a failed one at once.
    async fn wake_by_hand(&self, cause: WakeCause) -> ManualResult {
        let name = self.spec.name.clone();
        if self.state() == ServiceState::Failed {
            self.rt.lock().expect("runtime lock").retry_at = Instant::now();
            self.on_tick().await;
        } else {
            self.wake(cause, Instant::now()).await;
        }
        let rt = self.rt.lock().expect("runtime lock");
        match rt.state {
            ServiceState::Awake => {
                let how = rt.status.last_wake.as_ref().map_or_else(String::new, |w| {
                    format!(" ({}, accepting after {:.0} ms)", w.how, w.accepting_ms)
                });
                Ok((ManualOutcome::Done, format!("{name} is awake{how}")))
            }
            _ => Err(ManualError::WakeFailed {
                service: name,
                reason: self.link_down_reason(),
            }),
        }
    }

    /// Why the last wake failed, from the transition log.
    fn link_down_reason(&self) -> String {
        let log = self.shared.transitions.lock().expect("transitions lock");
        log.iter()
            .rev()
            .find(|t| t.service == self.spec.name && t.to == ServiceState::Failed)
            .map_or_else(|| "unknown".into(), |t| t.detail.clone())
    }

    async fn on_tick(&self) {
        match self.state() {
            ServiceState::Awake => {
                let Some(pid) = self.pid() else { return };
                // What this look costs torpor: with nothing to do, it is what watching the
                // service awake costs (the governor weighs it; a look at rest reads nothing).
                let look_from = crate::node::thread_cpu_s();
                self.note_first_byte();
                if let Some(how) = self.runner.exited(pid) {
                    self.restart_crashed(how).await;
                    return;
                }
                self.note_steered(Some(pid));
                let (footprint, expected_wake, allowed) = {
                    let mut rt = self.rt.lock().expect("runtime lock");
                    let pids = self.runner.members(pid);
                    rt.status.footprint_bytes = procs::tree_rss_bytes(&pids);
                    let cpu = procs::tree_cpu_seconds(&pids);
                    // A tree that lost a process can read lower than before: count from there.
                    let used = (cpu - rt.life_cpu_s).max(0.0);
                    rt.life_cpu_s = cpu;
                    rt.status.cpu_s += used;
                    let now = Instant::now();
                    let since = rt
                        .looked_at
                        .replace(now)
                        .map_or(TICK, |at| now.duration_since(at))
                        .max(TICK);
                    // The same smoothing per second whatever the looks' spacing: 10 % per TICK.
                    let keep = 0.9f64.powf(since.as_secs_f64() / TICK.as_secs_f64());
                    rt.demand_cpus =
                        keep * rt.demand_cpus + (1.0 - keep) * used / since.as_secs_f64();
                    // Busy: a request in flight, or one arrived since the last look.
                    let busy = self.link.inflight() > 0
                        || self.link.with_arrivals(|a| a.idle_for(self.link.now())) < since + TICK;
                    rt.costs.observe(now, busy, cpu, || procs::tree_runs(&pids));
                    if !busy {
                        rt.costs.looked(crate::node::thread_cpu_s() - look_from);
                    }
                    (
                        rt.status.footprint_bytes,
                        rt.expected_wake,
                        Instant::now() >= rt.sleep_not_before && rt.status.cannot_sleep.is_none(),
                    )
                };
                let free = allowed && self.link.inflight() == 0 && self.pin().is_none();
                if let Some(why) = self.memory_budget_wants(footprint, free) {
                    let _ = self.sleep(pid, self.tier_for(footprint), why).await;
                    return;
                }
                if !free {
                    return;
                }
                if self.spec.policy.governor == Governor::Energy {
                    self.govern(pid, Level::Awake, footprint, expected_wake)
                        .await;
                    return;
                }
                let now = self.link.now();
                let decision = self.link.with_arrivals(|a| {
                    decide_sleep(&self.spec.policy, a, now, footprint, expected_wake)
                });
                if let SleepDecision::Sleep { tier } = decision {
                    let _ = self
                        .sleep(pid, tier, format!("idle; snapshot tier {tier:?}"))
                        .await;
                }
            }
            ServiceState::Frozen => {
                let (pid, footprint, expected_wake) = {
                    let rt = self.rt.lock().expect("runtime lock");
                    (rt.pid, rt.status.footprint_bytes, rt.expected_wake)
                };
                if self.pin().is_some() {
                    self.thaw_if_frozen("pinned").await;
                    return;
                }
                let Some(pid) = pid else { return };
                if let Some(why) = self.memory_budget_wants(footprint, true) {
                    self.thaw_if_frozen("the memory budget snapshots it").await;
                    let _ = self.sleep(pid, self.tier_for(footprint), why).await;
                    return;
                }
                self.govern(pid, Level::Frozen, footprint, expected_wake)
                    .await;
            }
            ServiceState::Asleep => {
                let (expected_wake, asleep_at) = {
                    let rt = self.rt.lock().expect("runtime lock");
                    (rt.expected_wake, rt.asleep_at)
                };
                let at = self
                    .link
                    .with_arrivals(|a| prewarm_at(&self.spec.policy, a, expected_wake));
                if let Some(at) = at {
                    let now = self.link.now();
                    if at > asleep_at && now >= at {
                        self.wake(WakeCause::Prewarm, Instant::now()).await;
                        // Stay up for the predicted request, or the pre-warm was for nothing.
                        let hold = self
                            .link
                            .with_arrivals(|a| prewarm_hold_until(&self.spec.policy, a));
                        if let Some(until) = hold {
                            let left = until.saturating_sub(self.link.now());
                            self.rt.lock().expect("runtime lock").sleep_not_before =
                                Instant::now() + left;
                        }
                    }
                }
            }
            ServiceState::Failed => {
                if Instant::now() < self.rt.lock().expect("runtime lock").retry_at {
                    return;
                }
                let t0 = Instant::now();
                self.transition(
                    ServiceState::Waking,
                    Duration::ZERO,
                    "retrying after failure",
                );
                self.link.retrying();
                let timeline = WakeTimeline {
                    cause: "retry".into(),
                    ..Default::default()
                };
                self.bring_up_cold(t0, timeline, "retry after failure")
                    .await;
                self.shared.replan.notify_one();
            }
            _ => {}
        }
    }

    /// How long until the loop looks again: [`TICK`] while the service works, wakes or
    /// sleeps, or a decision (its idle threshold, a pre-warm, a retry) is nearer than
    /// [`IDLE_LOOK`]; otherwise [`IDLE_LOOK`] awake, [`REST_LOOK`] frozen or snapshotted.
    fn next_look(&self) -> Duration {
        let near = |left: Duration| left.clamp(TICK, IDLE_LOOK);
        let now = self.link.now();
        match self.state() {
            ServiceState::Awake => {
                if self.link.inflight() > 0 {
                    return TICK;
                }
                let idle = self.link.with_arrivals(|a| a.idle_for(now));
                // Just served: a burst may go on; its demand is what consolidation plans by.
                if idle < IDLE_LOOK {
                    return TICK;
                }
                // Past the threshold the decision was taken once and is weighed again
                // every IDLE_LOOK as the predicted quiet grows.
                match self.spec.policy.idle_threshold.checked_sub(idle) {
                    Some(left) if !left.is_zero() => near(left),
                    _ => IDLE_LOOK,
                }
            }
            ServiceState::Frozen => REST_LOOK,
            ServiceState::Asleep => {
                let (expected_wake, asleep_at) = {
                    let rt = self.rt.lock().expect("runtime lock");
                    (rt.expected_wake, rt.asleep_at)
                };
                // A pre-warm time from before it slept is one `on_tick` does not act on.
                self.link
                    .with_arrivals(|a| prewarm_at(&self.spec.policy, a, expected_wake))
                    .filter(|at| *at > asleep_at)
                    .map_or(REST_LOOK, |at| {
                        at.saturating_sub(now).clamp(TICK, REST_LOOK)
                    })
            }
            ServiceState::Failed => near(
                self.rt
                    .lock()
                    .expect("runtime lock")
                    .retry_at
                    .saturating_duration_since(Instant::now()),
            ),
            ServiceState::Draining | ServiceState::Checkpointing | ServiceState::Waking => TICK,
        }
    }

    /// The energy governor's turn for an idle service at level `now_at` (awake or frozen):
    /// it moves deeper when a deeper level pays over the predicted idle period; it never
    /// decides before the service's idle cost was measured (do no harm).
    async fn govern(&self, pid: i32, now_at: Level, footprint: u64, expected_wake: Duration) {
        let (inputs, no_freeze) = {
            let rt = self.rt.lock().expect("runtime lock");
            let Some(idle) = rt.costs.idle(footprint, &LOOKS) else {
                return;
            };
            let inputs = LevelInputs {
                idle,
                freeze: rt.costs.freeze(),
                snapshot: rt.costs.snapshot(footprint, expected_wake),
                node_sleep_w: 0.0,
            };
            // Steered connections open at the last look: a freeze waits until they close.
            let no_freeze = rt.status.cannot_freeze.is_some() || rt.status.steered_open > 0;
            (inputs, no_freeze)
        };
        let model = self
            .shared
            .node
            .as_ref()
            .map_or_else(Default::default, |n| n.energy_model());
        let now = self.link.now();
        // Node sleep in reach (every service snapshotted or quiet past the node's break-even,
        // this one too): the node's saving needs all those still up down, and each is
        // credited its share.
        let node_sleep_w = self
            .shared
            .node
            .as_ref()
            .and_then(|n| n.node_sleep())
            .and_then(|e| {
                let min_quiet = Duration::try_from_secs_f64(e.break_even_s).ok()?;
                let quiet = self.link.with_arrivals(|a| predicted_idle(a, now));
                if quiet < min_quiet {
                    return None;
                }
                let up = self
                    .shared
                    .roster
                    .node_sleep_share(&self.spec.name, min_quiet)?;
                Some(e.saving_w / up as f64)
            })
            .unwrap_or(0.0);
        let inputs = LevelInputs {
            node_sleep_w,
            ..inputs
        };
        let choice = self
            .link
            .with_arrivals(|a| choose_level(&self.spec.policy, a, now, &inputs, &model));
        {
            let mut rt = self.rt.lock().expect("runtime lock");
            rt.status.levels = level_costs(&inputs, &model).to_vec();
            rt.status.last_choice = Some(choice);
        }
        match (now_at, choice.level) {
            (Level::Awake, Level::Frozen) if !no_freeze => self.freeze_idle(pid, &choice).await,
            (_, Level::Snapshotted) => {
                let tier = self.tier_for(footprint);
                if now_at == Level::Frozen {
                    self.thaw_if_frozen("the snapshot level pays now").await;
                }
                let why = format!("idle; the governor: {:?}", choice.reason);
                let _ = self.sleep(pid, tier, why).await;
            }
            // Deeper is not worth it; a frozen service stays frozen until a request.
            _ => {}
        }
    }

    /// The pool tier a snapshot of this footprint goes to.
    fn tier_for(&self, footprint: u64) -> SnapshotTier {
        if footprint <= self.spec.policy.memory_tier_max_bytes {
            SnapshotTier::Memory
        } else {
            SnapshotTier::Tiered
        }
    }

    /// Tells the roster what the service holds and, when it is free to be snapshotted
    /// (`free`: idle, allowed to sleep, not pinned), since when it is idle and how much
    /// longer that is predicted to last; when it is the one the node's memory budget wants
    /// snapshotted now, why.
    fn memory_budget_wants(&self, footprint: u64, free: bool) -> Option<String> {
        let idle = free
            .then(|| {
                let now = self.link.now();
                let (idle, quiet) = self
                    .link
                    .with_arrivals(|a| (a.idle_for(now), predicted_idle(a, now)));
                Some((Instant::now().checked_sub(idle)?, quiet))
            })
            .flatten();
        let roster = &self.shared.roster;
        roster.observe(&self.spec.name, footprint, idle);
        let over = roster.coldest_over_budget(&self.spec.name, self.shared.memory_budget?)?;
        Some(format!(
            "memory budget: the services up hold {} MiB of {} MiB and this one was idle the longest",
            over.held_bytes >> 20,
            over.budget_bytes >> 20
        ))
    }

    /// Freezes the idle service: requests are held from here on and the first wakes it.
    async fn freeze_idle(&self, pid: i32, choice: &Choice) {
        let seen = self.rt.lock().expect("runtime lock").steered_seen;
        if self.to_gate().is_err() {
            return;
        }
        if let Some(why) = self.steered_to_it(pid, seen) {
            info!(service = %self.spec.name, why, "not frozen: connections reach it past the gate");
            self.serve(pid, false);
            return;
        }
        let drained = self.link.drain(self.spec.drain_deadline).await;
        if drained.still_inflight > 0 {
            self.serve(pid, true);
            return;
        }
        let (t0, cpu0) = (Instant::now(), crate::node::process_cpu_s());
        match self.runner.freeze(true).await {
            Ok(()) => {
                {
                    let mut rt = self.rt.lock().expect("runtime lock");
                    rt.costs.froze(crate::node::process_cpu_s() - cpu0);
                    rt.status.freezes += 1;
                }
                self.transition(
                    ServiceState::Frozen,
                    t0.elapsed(),
                    format!("idle; the governor: {:?}", choice.reason),
                );
                self.link.arm_wake();
            }
            Err(e) => {
                warn!(service = %self.spec.name, error = %e, "cannot freeze; the governor skips that level from now on");
                self.rt.lock().expect("runtime lock").status.cannot_freeze = Some(e);
                self.serve(pid, false);
            }
        }
    }

    /// With kernel steering, why the service, its slot just emptied, must not be frozen: a
    /// connection steered to it since the steering's counter read `seen` (made between the
    /// governor's look and the slot's emptying, perhaps still unaccepted), or a steered
    /// connection still open. A request on either would wait in a frozen process's socket
    /// with nothing to thaw it (the gate never sees it); a checkpoint closes them instead.
    fn steered_to_it(&self, pid: i32, seen: u64) -> Option<String> {
        let SteeringMode::Kernel(steering) = &self.spec.steering else {
            return None;
        };
        // Those steered up to the emptying, which `to_gate` read just before it.
        self.note_steered(None);
        let new = self
            .rt
            .lock()
            .expect("runtime lock")
            .steered_seen
            .saturating_sub(seen);
        if new > 0 {
            return Some(format!(
                "{new} connection(s) steered to it since the last look"
            ));
        }
        let open = match steering.open_connections(pid) {
            Ok(open) => open.open,
            Err(e) => return Some(format!("cannot count its steered connections: {e}")),
        };
        let mut rt = self.rt.lock().expect("runtime lock");
        rt.status.steered_open = open;
        rt.steered_looked = Some(Instant::now());
        (open > 0).then(|| format!("{open} steered connection(s) open"))
    }

    /// Thaws a frozen service (a request, a command, a deeper level or a stop wants it awake);
    /// nothing when it is not frozen.
    async fn thaw_if_frozen(&self, why: &str) {
        if self.state() != ServiceState::Frozen {
            return;
        }
        self.thaw_for_reason(Instant::now(), why, false).await;
    }

    /// A wake of a frozen service: a thaw, timed like a wake.
    async fn thaw_for(&self, cause: WakeCause, t0: Instant) {
        let cause_name = format!("{cause:?}").to_lowercase();
        self.thaw_for_reason(t0, &cause_name, cause != WakeCause::Pin)
            .await;
        let mut rt = self.rt.lock().expect("runtime lock");
        rt.status.last_wake = Some(WakeTimeline {
            cause: cause_name,
            how: "thaw".into(),
            accepting_ms: ms_since(t0),
            released_ms: ms_since(t0),
            ..Default::default()
        });
    }

    /// `demand`: as for [`Self::serve`].
    async fn thaw_for_reason(&self, t0: Instant, why: &str, demand: bool) {
        let cpu0 = crate::node::process_cpu_s();
        match self.runner.freeze(false).await {
            Ok(()) => {
                self.rt
                    .lock()
                    .expect("runtime lock")
                    .costs
                    .thawed(t0.elapsed(), crate::node::process_cpu_s() - cpu0);
                self.transition(ServiceState::Awake, t0.elapsed(), format!("thawed: {why}"));
                if let Some(pid) = self.pid() {
                    self.serve(pid, demand);
                }
            }
            Err(e) => {
                // A tree that cannot be thawed cannot serve: start it over.
                error!(service = %self.spec.name, error = %e, "cannot thaw; the service is restarted");
                let pid = self.rt.lock().expect("runtime lock").pid.take();
                if let Some(pid) = pid {
                    self.runner.stop(pid, Duration::ZERO).await;
                }
                self.end_life();
                self.transition(ServiceState::Waking, Duration::ZERO, "thaw failed");
                let timeline = WakeTimeline {
                    cause: "thaw failed".into(),
                    ..Default::default()
                };
                self.bring_up_cold(t0, timeline, &format!("thaw failed: {e}"))
                    .await;
            }
        }
    }

    /// Completes the last wake's timeline once the gate saw the first answer.
    fn note_first_byte(&self) {
        let mut rt = self.rt.lock().expect("runtime lock");
        if let Some(w) = rt.status.last_wake.as_mut() {
            if w.first_byte_ms.is_none() {
                if let Some(d) = self.link.first_answer_after_open() {
                    w.first_byte_ms = Some(w.released_ms + d.as_secs_f64() * 1e3);
                }
            }
        }
    }

    async fn restart_crashed(&self, how: String) {
        warn!(service = %self.spec.name, %how, "service died; restarting");
        // Its socket closed with it (the kernel passes its connections to the gate already).
        let _ = self.to_gate();
        self.link.drain(Duration::ZERO).await;
        self.transition(
            ServiceState::Waking,
            Duration::ZERO,
            format!("crashed ({how}); restarting"),
        );
        {
            let mut rt = self.rt.lock().expect("runtime lock");
            rt.status.restarts += 1;
            rt.pid = None;
        }
        self.end_life();
        let t0 = Instant::now();
        let timeline = WakeTimeline {
            cause: "restart".into(),
            ..Default::default()
        };
        self.bring_up_cold(t0, timeline, "restart after crash")
            .await;
        self.shared.replan.notify_one();
    }

    /// Drain, checkpoint into the pool, release: `Ok` with what is in the pool, or `Err`
    /// with why the service keeps running. `why` says who or what decided it.
    async fn sleep(&self, pid: i32, tier: SnapshotTier, why: String) -> Result<String, String> {
        // First: new connections go to the gate and are held, none lands on the service.
        self.to_gate()
            .map_err(|e| format!("new connections cannot be steered back to the gate: {e}"))?;
        self.transition(ServiceState::Draining, Duration::ZERO, why);
        let drained = self.link.drain(self.spec.drain_deadline).await;
        self.transition(
            ServiceState::Checkpointing,
            drained.took,
            format!("drained ({} in flight cut)", drained.still_inflight),
        );
        let t0 = Instant::now();
        let cpu0 = crate::node::process_cpu_s();
        match self.runner.checkpoint(pid).await {
            Ok(c) => {
                // The tree's own CPU time lands in ours when it is reaped: not the cycle's.
                {
                    let mut rt = self.rt.lock().expect("runtime lock");
                    let cpu = crate::node::process_cpu_s() - cpu0 - rt.life_cpu_s;
                    rt.costs.checkpointed(cpu.max(0.0));
                    rt.costs.restart_idle();
                }
                self.fell_asleep(pid, tier, t0, c).await
            }
            // CRIU failed after the pool committed: if the tree is gone, that snapshot is
            // the service; restore from it rather than ever cold-starting over it.
            Err(CheckpointFailed {
                committed: Some(generation),
                message,
                ..
            }) if self.runner.gone(pid) => {
                warn!(service = %self.spec.name, generation, error = %message, "CRIU failed after the commit and the tree is gone; asleep in that generation");
                let committed = Committed {
                    generation,
                    bytes: None,
                    secs: None,
                };
                self.fell_asleep(pid, tier, t0, committed).await
            }
            Err(e) => {
                warn!(service = %self.spec.name, error = %e.message, permanent = e.permanent, "checkpoint failed; service keeps running");
                {
                    let mut rt = self.rt.lock().expect("runtime lock");
                    rt.status.failed_checkpoints += 1;
                    if e.permanent {
                        // Retrying cannot help on this host: say so once, stay awake.
                        rt.status.cannot_sleep = Some(e.message.clone());
                    }
                    // Do not hammer a service CRIU cannot dump.
                    rt.sleep_not_before =
                        Instant::now() + 20 * self.spec.policy.idle_threshold.max(TICK);
                }
                self.transition(
                    ServiceState::Awake,
                    t0.elapsed(),
                    format!("checkpoint failed: {}", e.message),
                );
                self.serve(pid, true);
                self.shared.replan.notify_one();
                Err(e.message)
            }
        }
    }

    /// The tree is in the pool and gone from the node; returns what the pool holds.
    async fn fell_asleep(
        &self,
        pid: i32,
        tier: SnapshotTier,
        t0: Instant,
        c: Committed,
    ) -> Result<String, String> {
        let Committed {
            generation,
            bytes,
            secs,
        } = c;
        self.runner.clear(pid).await;
        self.end_life();
        {
            let mut rt = self.rt.lock().expect("runtime lock");
            rt.pid = None;
            rt.asleep_at = self.link.now();
            let s = &mut rt.status;
            s.sleeps += 1;
            s.last_checkpoint_s = secs.or(Some(t0.elapsed().as_secs_f64()));
            s.snapshot_bytes = bytes;
            s.snapshot_generation = Some(generation);
            s.snapshot_tier = Some(tier);
        }
        let detail = match bytes {
            Some(b) => format!(
                "generation {generation} in the pool, {}",
                torpor_image::format_bytes(b)
            ),
            None => format!("generation {generation} in the pool (CRIU failed after the commit)"),
        };
        self.transition(ServiceState::Asleep, t0.elapsed(), detail.clone());
        self.link.arm_wake();
        self.shared.replan.notify_one();
        Ok(detail)
    }

    /// Restore from the pool (cold start if that fails), then open the link. The node gets its
    /// cores back first and re-plans after; a thaw needs neither (see [`Self::awake_for_plan`]).
    async fn wake(&self, cause: WakeCause, asked: Instant) {
        let with: Vec<Arc<ServiceLink>> = {
            let links = self.shared.links.lock().expect("links lock");
            (self.spec.wake_with.iter())
                .filter_map(|name| links.get(name).cloned())
                .collect()
        };
        for link in with {
            link.request_wake();
        }
        if self.state() == ServiceState::Frozen {
            // A thaw of a millisecond: the tree kept its place on the cores in use and its
            // memory, and the node is up (it sleeps only with every service snapshotted), so
            // no core is given back and no latency request held for it.
            self.thaw_for(cause, asked).await;
        } else {
            let waking = self.shared.node.as_ref().map(|n| n.waking());
            self.wake_service(cause, asked).await;
            drop(waking);
        }
        self.shared.replan.notify_one();
    }

    async fn wake_service(&self, cause: WakeCause, t0: Instant) {
        let cause_name = format!("{cause:?}").to_lowercase();
        self.transition(ServiceState::Waking, Duration::ZERO, cause_name.clone());
        let mut timeline = WakeTimeline {
            cause: cause_name,
            how: "restore".into(),
            restore_start_ms: ms_since(t0),
            ..Default::default()
        };
        // Exactly the generation this agent committed: never a newer one someone else put
        // under the same name, never an older one.
        let generation = self
            .rt
            .lock()
            .expect("runtime lock")
            .status
            .snapshot_generation;
        if generation.is_none() {
            // A reload changed how it starts: its old state has no place in the new program.
            let why = "started from its new configuration";
            return self.bring_up_cold(t0, timeline, why).await;
        }
        let cpu0 = crate::node::process_cpu_s();
        let reason = match self.runner.restore(generation).await {
            Ok(Restored { pid, detail }) => {
                let cpu = crate::node::process_cpu_s() - cpu0;
                self.rt.lock().expect("runtime lock").costs.restored(cpu);
                timeline.criu_done_ms = Some(ms_since(t0));
                match self.runner.wait_ready(pid, true).await {
                    Ok(()) => {
                        timeline.accepting_ms = ms_since(t0);
                        self.rt.lock().expect("runtime lock").pid = Some(pid);
                        self.woke(t0, cause, timeline, detail);
                        return;
                    }
                    Err(e) => {
                        self.runner.stop(pid, Duration::from_millis(200)).await;
                        format!("restored service did not come up: {e}")
                    }
                }
            }
            Err(e) if e.snapshot_lost => {
                let mut rt = self.rt.lock().expect("runtime lock");
                rt.status.snapshots_lost += 1;
                rt.status.last_snapshot_lost = Some(e.message.clone());
                drop(rt);
                // The state the service had when it slept is gone: say so loudly, once.
                error!(service = %self.spec.name, event = "snapshot_lost", generation, reason = %e.message, "snapshot lost; the service cold-starts without its state");
                format!("snapshot lost: {}", e.message)
            }
            Err(e) => e.message,
        };
        warn!(service = %self.spec.name, %reason, "restore failed; cold start");
        self.bring_up_cold(t0, timeline, &reason).await;
    }

    fn woke(&self, t0: Instant, cause: WakeCause, mut timeline: WakeTimeline, detail: String) {
        let took = t0.elapsed();
        {
            let mut rt = self.rt.lock().expect("runtime lock");
            // Smoothed, so one slow wake does not forbid sleeping for good.
            rt.expected_wake = (rt.expected_wake * 3 + took) / 4;
            rt.retry_backoff = RETRY_FIRST;
            let s = &mut rt.status;
            match cause {
                WakeCause::Request | WakeCause::Manual | WakeCause::Pin => s.wakes += 1,
                WakeCause::Prewarm => s.prewarms += 1,
            }
            s.last_wake_s = Some(took.as_secs_f64());
        }
        self.transition(ServiceState::Awake, took, detail);
        if let Some(pid) = self.pid() {
            self.serve(pid, cause != WakeCause::Pin);
        }
        timeline.released_ms = ms_since(t0);
        let up_to = {
            let mut rt = self.rt.lock().expect("runtime lock");
            rt.status.last_wake = Some(timeline);
            rt.status.snapshot_generation
        };
        if let Some(up_to) = up_to {
            // Once the service runs again its snapshot is stale (restoring it would lose
            // whatever the service did since): its pool memory goes back for the next one.
            let (runner, name) = (self.runner.clone(), self.spec.name.clone());
            tokio::spawn(async move {
                if let Err(e) = runner.release(up_to).await {
                    warn!(service = %name, error = %e, "could not release the stale snapshot");
                }
            });
        }
    }

    async fn bring_up_cold(&self, t0: Instant, mut timeline: WakeTimeline, why: &str) {
        timeline.how = "cold start".into();
        timeline.criu_done_ms = None;
        match self.launch().await {
            Ok(pid) => {
                timeline.accepting_ms = ms_since(t0);
                {
                    let mut rt = self.rt.lock().expect("runtime lock");
                    rt.pid = Some(pid);
                    rt.status.cold_starts += 1;
                }
                self.woke(
                    t0,
                    WakeCause::Request,
                    timeline,
                    format!("cold start as pid {pid} ({why})"),
                );
            }
            Err(e) => {
                let reason = format!("cold start failed: {e} (after: {why})");
                warn!(service = %self.spec.name, %reason, "service is down");
                let backoff = {
                    let mut rt = self.rt.lock().expect("runtime lock");
                    let b = rt.retry_backoff;
                    rt.retry_at = Instant::now() + b;
                    rt.retry_backoff = (b * 2).min(RETRY_MAX);
                    b
                };
                self.transition(
                    ServiceState::Failed,
                    t0.elapsed(),
                    format!("{reason}; next attempt in {backoff:?}"),
                );
                self.link.fail_held(&reason);
            }
        }
    }

    /// At the agent's stop, with a pool that outlives it: an awake service is put to sleep
    /// through the normal path (drain, checkpoint, commit), so that the next start adopts it
    /// with its state. Within `limit`; whether it is asleep now. One that is not (it cannot
    /// be checkpointed, the checkpoint failed or took too long) is killed by [`Self::stop`]
    /// as before; the reason is logged here.
    pub async fn sleep_for_stop(me: &Arc<Managed>, limit: Duration) -> bool {
        me.thaw_if_frozen("stopping").await;
        let (state, pid, cannot, footprint) = {
            let rt = me.rt.lock().expect("runtime lock");
            (
                rt.state,
                rt.pid,
                rt.status.cannot_sleep.clone(),
                rt.status.footprint_bytes,
            )
        };
        let name = &me.spec.name;
        // A checkpoint now must not stage a wake that will never come.
        me.runner.prepare_stop().await;
        match (state, pid) {
            (ServiceState::Asleep, _) => true,
            (ServiceState::Awake, Some(pid)) => {
                if let Some(reason) = cannot {
                    warn!(service = %name, %reason, "stopping: this service cannot be checkpointed here; it is killed and its state lost");
                    return false;
                }
                let tier = if footprint <= me.spec.policy.memory_tier_max_bytes {
                    SnapshotTier::Memory
                } else {
                    SnapshotTier::Tiered
                };
                let slept = tokio::time::timeout(
                    limit,
                    me.sleep(pid, tier, "stopping: its state is kept in the pool".into()),
                )
                .await;
                match slept {
                    Ok(Ok(_)) => true,
                    Ok(Err(reason)) => {
                        warn!(service = %name, %reason, "stopping: the checkpoint failed; the service is killed and its state lost");
                        false
                    }
                    Err(_) => {
                        warn!(service = %name, ?limit, "stopping: the checkpoint took too long; the service is killed and its state lost");
                        false
                    }
                }
            }
            (other, _) => {
                warn!(service = %name, state = other.as_str(), "stopping: not running, nothing to keep");
                false
            }
        }
    }

    /// Stops the service for good (shutdown): held requests get an error, the tree is killed.
    /// Whether a running tree was killed (its state is then lost).
    pub async fn stop(me: &Arc<Managed>) -> bool {
        me.thaw_if_frozen("stopping").await;
        let _ = me.to_gate();
        me.link.shut_down();
        me.runner.prepare_stop().await;
        let pid = me.rt.lock().expect("runtime lock").pid.take();
        if let Some(pid) = pid {
            me.runner.stop(pid, Duration::from_secs(2)).await;
            me.end_life();
        }
        me.runner.retire().await;
        pid.is_some()
    }

    /// Deletes every generation of this service from the pool: after its running tree was
    /// killed they are older than the state it had, and the next start must not bring such a
    /// past back (it cold-starts instead).
    /// Whether they are gone.
    pub async fn forget_snapshots(&self) -> bool {
        let released = self.runner.release(u64::MAX).await;
        if let Err(e) = &released {
            warn!(service = %self.spec.name, error = %e, "could not delete the stale snapshots of a killed service; the next start may restore an older state");
        }
        released.is_ok()
    }

    /// The link its gate shares (a reload's successor takes it over).
    pub fn link(&self) -> &Arc<ServiceLink> {
        &self.link
    }

    pub fn status(&self) -> ServiceStatus {
        let rt = self.rt.lock().expect("runtime lock");
        let mut s = rt.status.clone();
        let current = rt.since.elapsed();
        s.state = rt.state;
        s.pid = rt.pid;
        s.held_now = self.link.held();
        s.lazy = self.runner.lazy_memory();
        s.staged_bytes = self.runner.staged_bytes();
        s.armed = self.runner.armed();
        s.pinned = rt.pin.as_ref().map(Pin::status);
        s.rejected_requests = self.link.rejected();
        s.time_asleep_s = (rt.asleep_total
            + if rt.state == ServiceState::Asleep {
                current
            } else {
                Duration::ZERO
            })
        .as_secs_f64();
        s.time_awake_s = (rt.awake_total
            + if rt.state == ServiceState::Awake {
                current
            } else {
                Duration::ZERO
            })
        .as_secs_f64();
        s.time_frozen_s = (rt.frozen_total
            + if rt.state == ServiceState::Frozen {
                current
            } else {
                Duration::ZERO
            })
        .as_secs_f64();
        s.costs = rt.costs.status(&LOOKS);
        if let SteeringMode::Kernel(steering) = &self.spec.steering {
            // Read now, not at the last tick: one map lookup.
            s.steered_connections = steering.steered().unwrap_or(s.steered_connections);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    //! The state machine against a fake runner, on paused tokio time: every transition and
    //! every failure path, without CRIU or processes.

    use std::{
        collections::{HashSet, VecDeque},
        sync::atomic::{AtomicI32, AtomicU64, Ordering},
    };

    use torpor_control::{HoldError, HoldLimits};

    use super::*;
    use crate::manual::{ManualCommand, ManualError, ManualOutcome};
    use crate::{
        process::ProcessLaunch,
        runner::{BoxFuture, CheckpointFailed, Committed, RestoreFailed, Restored, Runner},
    };

    /// Scripted outcomes; each call takes the next one, or succeeds when none is left.
    #[derive(Debug, Default)]
    struct Fake {
        /// Above any real PID (pid_max is at most 2^22), so /proc never has them.
        next_pid: AtomicI32,
        generation: AtomicU64,
        log: Mutex<Vec<(Duration, String)>>,
        checkpoints: Mutex<VecDeque<Result<(), CheckpointFailed>>>,
        /// Whether a scripted checkpoint failure leaves the tree gone.
        failure_kills: Mutex<bool>,
        restores: Mutex<VecDeque<Result<(), RestoreFailed>>>,
        launches: Mutex<VecDeque<Result<(), String>>>,
        dead: Mutex<HashSet<i32>>,
        started: Mutex<Option<Instant>>,
        /// Whether the tree can be frozen (a plain process tree in a cgroup); a runner
        /// that cannot is the default.
        freezes: bool,
    }

    /// How long each fake operation takes.
    const STEP: Duration = Duration::from_millis(30);

    impl Fake {
        fn note(&self, what: String) {
            let t0 = *self
                .started
                .lock()
                .unwrap()
                .get_or_insert_with(Instant::now);
            self.log.lock().unwrap().push((t0.elapsed(), what));
        }

        /// Where in the log each call with `prefix` stands (the log's times do not move
        /// under a paused clock).
        fn positions(&self, prefix: &str) -> Vec<usize> {
            let log = self.log.lock().unwrap();
            (0..log.len())
                .filter(|i| log[*i].1.starts_with(prefix))
                .collect()
        }

        fn calls(&self, prefix: &str) -> Vec<(Duration, String)> {
            self.log
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, w)| w.starts_with(prefix))
                .cloned()
                .collect()
        }

        fn new_pid(&self) -> i32 {
            5_000_000 + self.next_pid.fetch_add(1, Ordering::SeqCst)
        }

        fn kill(&self, pid: i32) {
            self.dead.lock().unwrap().insert(pid);
        }
    }

    impl Runner for Fake {
        fn launch(&self) -> BoxFuture<'_, Result<i32, LaunchError>> {
            Box::pin(async move {
                tokio::time::sleep(STEP).await;
                let next = self.launches.lock().unwrap().pop_front();
                self.note("launch".into());
                match next {
                    Some(Err(e)) => Err(LaunchError::Exited(e)),
                    _ => Ok(self.new_pid()),
                }
            })
        }

        fn wait_ready(&self, pid: i32, _restored: bool) -> BoxFuture<'_, Result<(), LaunchError>> {
            Box::pin(async move {
                tokio::time::sleep(STEP).await;
                match self.exited(pid) {
                    Some(how) => Err(LaunchError::Exited(how)),
                    None => Ok(()),
                }
            })
        }

        fn checkpoint(&self, pid: i32) -> BoxFuture<'_, Result<Committed, CheckpointFailed>> {
            Box::pin(async move {
                tokio::time::sleep(STEP).await;
                self.note(format!("checkpoint {pid}"));
                match self.checkpoints.lock().unwrap().pop_front() {
                    Some(Err(e)) => {
                        if *self.failure_kills.lock().unwrap() {
                            self.kill(pid);
                        }
                        Err(e)
                    }
                    _ => {
                        self.kill(pid);
                        Ok(Committed {
                            generation: self.generation.fetch_add(1, Ordering::SeqCst) + 1,
                            bytes: Some(4096),
                            secs: Some(STEP.as_secs_f64()),
                        })
                    }
                }
            })
        }

        fn restore(
            &self,
            generation: Option<u64>,
        ) -> BoxFuture<'_, Result<Restored, RestoreFailed>> {
            Box::pin(async move {
                tokio::time::sleep(STEP).await;
                self.note(format!("restore {generation:?}"));
                match self.restores.lock().unwrap().pop_front() {
                    Some(Err(e)) => Err(e),
                    _ => {
                        let pid = self.new_pid();
                        Ok(Restored {
                            pid,
                            detail: format!("restored {generation:?} as {pid}"),
                        })
                    }
                }
            })
        }

        fn release(&self, up_to: u64) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async move {
                self.note(format!("release {up_to}"));
                Ok(())
            })
        }

        fn stop(&self, pid: i32, _grace: Duration) -> BoxFuture<'_, ()> {
            Box::pin(async move {
                self.note(format!("stop {pid}"));
                self.kill(pid);
            })
        }

        fn clear(&self, _pid: i32) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }

        fn exited(&self, pid: i32) -> Option<String> {
            self.dead
                .lock()
                .unwrap()
                .contains(&pid)
                .then(|| "killed by SIGKILL".into())
        }

        fn gone(&self, pid: i32) -> bool {
            self.exited(pid).is_some()
        }

        fn members(&self, pid: i32) -> Vec<i32> {
            vec![pid]
        }

        fn retire(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }

        fn freeze(&self, on: bool) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async move {
                if !self.freezes {
                    return Err("this fake cannot freeze".into());
                }
                self.note(if on { "freeze" } else { "thaw" }.into());
                Ok(())
            })
        }
    }

    struct Harness {
        m: Arc<Managed>,
        fake: Arc<Fake>,
        link: Arc<ServiceLink>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    const IDLE: Duration = Duration::from_millis(100);

    async fn start(fake: Fake) -> Harness {
        start_with(fake, None).await
    }

    /// A harness whose service is launched, or with `adopt` adopted asleep in that generation.
    async fn start_with(fake: Fake, adopt: Option<u64>) -> Harness {
        start_steered(Arc::new(fake), adopt, SteeringMode::Proxy).await
    }

    /// Kernel steering as the agent drives it, recorded in the runner's log (so its order
    /// against checkpoints and restores shows), with a connection counter and a number of
    /// open steered connections that tests set.
    #[derive(Debug)]
    struct FakeSteering {
        fake: Arc<Fake>,
        steered: AtomicU64,
        open: std::sync::atomic::AtomicUsize,
        /// Milliseconds since the last data on the open connections.
        quiet_ms: AtomicU64,
        /// Connections the kernel steers in the instant before the next emptying of the
        /// slot (after the agent's last look): counted then, once.
        at_unsteer: AtomicU64,
    }

    impl Steering for FakeSteering {
        fn steer(
            &self,
            pid: i32,
            backend: std::net::SocketAddrV4,
        ) -> Result<(), torpor_steer::SteerError> {
            self.fake.note(format!("steer {pid} to {backend}"));
            Ok(())
        }

        fn unsteer(&self) -> Result<(), torpor_steer::SteerError> {
            self.fake.note("unsteer".into());
            let late = self.at_unsteer.swap(0, Ordering::SeqCst);
            self.steered.fetch_add(late, Ordering::SeqCst);
            Ok(())
        }

        fn steered(&self) -> Result<u64, torpor_steer::SteerError> {
            Ok(self.steered.load(Ordering::SeqCst))
        }

        fn open_connections(
            &self,
            _pid: i32,
        ) -> Result<torpor_steer::OpenConnections, torpor_steer::SteerError> {
            let open = self.open.load(Ordering::SeqCst);
            Ok(torpor_steer::OpenConnections {
                open,
                quietest: (open > 0)
                    .then(|| Duration::from_millis(self.quiet_ms.load(Ordering::SeqCst))),
            })
        }
    }

    /// A launched service with a [`FakeSteering`].
    async fn start_kernel_steered() -> (Harness, Arc<FakeSteering>) {
        start_kernel_steered_with(Fake::default(), Governor::default()).await
    }

    async fn start_kernel_steered_with(
        fake: Fake,
        governor: Governor,
    ) -> (Harness, Arc<FakeSteering>) {
        let fake = Arc::new(fake);
        let steering = Arc::new(FakeSteering {
            fake: fake.clone(),
            steered: AtomicU64::new(0),
            open: Default::default(),
            quiet_ms: AtomicU64::new(0),
            at_unsteer: AtomicU64::new(0),
        });
        let mode = SteeringMode::Kernel(steering.clone());
        let h = start_steered_governed(fake, None, mode, governor).await;
        (h, steering)
    }

    async fn start_steered(fake: Arc<Fake>, adopt: Option<u64>, steering: SteeringMode) -> Harness {
        start_steered_governed(fake, adopt, steering, Governor::default()).await
    }

    async fn start_steered_governed(
        fake: Arc<Fake>,
        adopt: Option<u64>,
        steering: SteeringMode,
        governor: Governor,
    ) -> Harness {
        let link = ServiceLink::new(
            "svc",
            HoldLimits {
                depth: 16,
                timeout: Duration::from_secs(30),
            },
        );
        let spec = ServiceSpec {
            name: "svc".into(),
            launch: Launch::Process(ProcessLaunch {
                argv: vec!["fake".into()],
                env: Default::default(),
                cpus: Vec::new(),
                init: Default::default(),
            }),
            backend: ([127, 0, 0, 1], 9).into(),
            policy: PolicyConfig {
                idle_threshold: IDLE,
                governor,
                ..Default::default()
            },
            drain_deadline: Duration::from_secs(1),
            start_timeout: Duration::from_secs(5),
            wake_with: Vec::new(),
            memory: MemoryRestore::Eager,
            steering,
        };
        let shared = Arc::new(Shared::bare(std::slice::from_ref(&link)));
        let m = Arc::new(Managed::new(spec, link.clone(), shared, fake.clone()));
        match adopt {
            Some(generation) => m.adopt_asleep(generation),
            None => {
                let (_keep, mut no_cancel) = watch::channel(false);
                m.cold_start_initial(&mut no_cancel)
                    .await
                    .expect("first start");
            }
        }
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(Managed::run(m.clone(), rx));
        Harness {
            m,
            fake,
            link,
            stop,
            task,
        }
    }

    impl Harness {
        async fn until(&self, state: ServiceState) {
            let deadline = Instant::now() + Duration::from_secs(600);
            while self.m.state() != state {
                assert!(
                    Instant::now() < deadline,
                    "never {state:?}; transitions: {:?}",
                    self.details()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        fn details(&self) -> Vec<String> {
            self.m
                .shared
                .transitions
                .lock()
                .unwrap()
                .iter()
                .map(|t| format!("{:?}->{:?} {}", t.from, t.to, t.detail))
                .collect()
        }

        fn states(&self) -> Vec<ServiceState> {
            let log = self.m.shared.transitions.lock().unwrap();
            log.iter().map(|t| t.to).collect()
        }

        async fn finish(self) {
            self.stop.send(true).unwrap();
            self.task.await.unwrap();
            Managed::stop(&self.m).await;
        }

        /// Ends the service's loop as the agent's stop does, and keeps the service running.
        async fn end_loop(&mut self) {
            self.stop.send(true).unwrap();
            (&mut self.task).await.unwrap();
        }
    }

    fn failed(message: &str, permanent: bool, committed: Option<u64>) -> CheckpointFailed {
        CheckpointFailed {
            message: message.into(),
            permanent,
            committed,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_service_sleeps_and_a_request_wakes_it_by_restoring_its_own_generation() {
        let h = start(Fake::default()).await;
        h.until(ServiceState::Asleep).await;
        let request = tokio::spawn({
            let link = h.link.clone();
            async move { link.enter().await }
        });
        h.until(ServiceState::Awake).await;
        let guard = request.await.unwrap().expect("the held request passes");
        tokio::time::sleep(Duration::from_millis(3)).await;
        guard.answered();
        drop(guard);
        tokio::time::sleep(4 * TICK).await;
        use ServiceState::*;
        assert_eq!(
            h.states(),
            [Awake, Draining, Checkpointing, Asleep, Waking, Awake]
        );
        let s = h.m.status();
        assert_eq!((s.sleeps, s.wakes, s.cold_starts), (1, 1, 0));
        let w = s.last_wake.expect("a wake timeline");
        assert_eq!((w.cause.as_str(), w.how.as_str()), ("request", "restore"));
        assert!(w.restore_start_ms <= w.criu_done_ms.unwrap());
        assert!(w.criu_done_ms.unwrap() <= w.accepting_ms && w.accepting_ms <= w.released_ms);
        let first = w.first_byte_ms.expect("the first answer is noted");
        assert!(first >= w.released_ms + 3.0, "{w:?}");
        assert_eq!(h.fake.calls("restore").len(), 1);
        assert_eq!(h.fake.calls("restore")[0].1, "restore Some(1)");
        tokio::time::sleep(STEP).await;
        assert_eq!(h.fake.calls("release")[0].1, "release 1");
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn kernel_steering_is_undone_before_the_checkpoint_and_done_again_after_the_wake() {
        let (h, _steering) = start_kernel_steered().await;
        assert!(h.m.status().steered_now, "steered once started");
        h.until(ServiceState::Asleep).await;
        assert!(!h.m.status().steered_now);
        let request = tokio::spawn({
            let link = h.link.clone();
            async move { link.enter().await }
        });
        h.until(ServiceState::Awake).await;
        request.await.unwrap().expect("the held request passes");
        let order = h.fake.calls("");
        let (first, restored) = (5_000_000, 5_000_001);
        let at = |what: &str| {
            *h.fake
                .positions(what)
                .first()
                .unwrap_or_else(|| panic!("no {what:?} in {order:?}"))
        };
        assert!(at("launch") < at(&format!("steer {first} to 127.0.0.1:9")));
        assert!(at(&format!("steer {first} to 127.0.0.1:9")) < at("unsteer"));
        assert!(
            at("unsteer") < at(&format!("checkpoint {first}")),
            "{order:?}"
        );
        assert!(at("restore Some(1)") < at(&format!("steer {restored} to 127.0.0.1:9")));
        let s = h.m.status();
        assert!(s.steered_now && s.steering == "kernel", "{s:?}");
        let fake = h.fake.clone();
        h.finish().await;
        assert_eq!(fake.calls("unsteer").len(), 2, "once more at the stop");
    }

    #[tokio::test(start_paused = true)]
    async fn steered_connections_count_as_arrivals_and_data_on_an_open_one_keeps_it_awake() {
        let (h, steering) = start_kernel_steered().await;
        // A steered connection every tick for ten idle thresholds: never slept.
        for _ in 0..(10 * IDLE.as_millis() / TICK.as_millis()) {
            steering.steered.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(TICK).await;
        }
        assert_eq!(h.m.state(), ServiceState::Awake, "{:?}", h.details());
        assert!(h.m.status().steered_connections >= 49);
        // No new connection, one open that carries data: still awake.
        steering.open.store(1, Ordering::SeqCst);
        tokio::time::sleep(10 * IDLE).await;
        assert_eq!(h.m.state(), ServiceState::Awake, "{:?}", h.details());
        assert_eq!(h.m.status().steered_open, 1);
        // Still open, quiet for longer than the threshold: idle, asleep.
        steering
            .quiet_ms
            .store(2 * IDLE.as_millis() as u64, Ordering::SeqCst);
        h.until(ServiceState::Asleep).await;
        h.finish().await;
    }

    /// A governed, kernel-steered service that can be frozen and has nothing of its own to
    /// save idle: torpor's looks at it awake are what a freeze saves, so it freezes once the
    /// predicted quiet passes the freeze's break-even.
    async fn start_freezable_steered() -> (Harness, Arc<FakeSteering>) {
        let fake = Fake {
            freezes: true,
            ..Default::default()
        };
        start_kernel_steered_with(fake, Governor::Energy).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_steered_service_freezes_only_with_no_steered_connection_open() {
        let (h, steering) = start_freezable_steered().await;
        // An idle keep-alive connection straight to the service, quiet past the threshold: a
        // request on it would wait in a frozen process, so the freeze waits for its close.
        steering.open.store(1, Ordering::SeqCst);
        steering
            .quiet_ms
            .store(2 * IDLE.as_millis() as u64, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(h.m.state(), ServiceState::Awake, "{:?}", h.details());
        assert!(h.fake.calls("freeze").is_empty());
        let tries = h.fake.calls("unsteer").len();
        assert!(
            tries <= 1,
            "the slot emptied {tries} times: no retry while open"
        );
        steering.open.store(0, Ordering::SeqCst);
        h.until(ServiceState::Frozen).await;
        let last = |what: &str| *h.fake.positions(what).last().expect(what);
        assert!(
            last("unsteer") < last("freeze"),
            "new connections go to the gate first"
        );
        h.link.enter().await.expect("a request thaws it");
        assert_eq!(h.m.state(), ServiceState::Awake);
        assert!(last("thaw") < last("steer "), "steered again once thawed");
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_steered_as_the_slot_empties_stops_that_freeze() {
        let (h, steering) = start_freezable_steered().await;
        // One connection lands between the governor's look and the slot's emptying.
        steering.at_unsteer.store(1, Ordering::SeqCst);
        h.until(ServiceState::Frozen).await;
        let unsteers = h.fake.positions("unsteer");
        let freezes = h.fake.positions("freeze");
        assert_eq!(freezes.len(), 1);
        assert!(unsteers.len() >= 2, "{:?}", h.details());
        let steered_again = h
            .fake
            .positions("steer ")
            .into_iter()
            .any(|at| at > unsteers[0] && at < freezes[0]);
        assert!(steered_again, "served again after the first try");
        assert_eq!(h.m.status().steered_connections, 1);
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_checkpoint_leaves_it_awake_and_serving_and_backs_off() {
        let fake = Fake::default();
        fake.checkpoints
            .lock()
            .unwrap()
            .push_back(Err(failed("criu said no", false, None)));
        let h = start(fake).await;
        h.until(ServiceState::Checkpointing).await;
        h.until(ServiceState::Awake).await;
        assert!(h.link.is_open(), "the gate forwards again");
        h.link.enter().await.expect("requests pass at once");
        assert_eq!(h.m.status().failed_checkpoints, 1);
        // Twenty idle thresholds before the next attempt, which then succeeds.
        tokio::time::sleep(10 * IDLE).await;
        assert_eq!(h.fake.calls("checkpoint").len(), 1, "no hammering");
        h.until(ServiceState::Asleep).await;
        let tries = h.fake.calls("checkpoint");
        assert_eq!(tries.len(), 2);
        assert!(tries[1].0 - tries[0].0 >= 20 * IDLE, "{tries:?}");
        assert!(h.m.status().cannot_sleep.is_none());
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_tree_that_can_never_be_checkpointed_is_said_so_once_and_stays_awake() {
        let fake = Fake::default();
        fake.checkpoints.lock().unwrap().push_back(Err(failed(
            "several uids; needs CAP_SYS_RESOURCE",
            true,
            None,
        )));
        let h = start(fake).await;
        h.until(ServiceState::Checkpointing).await;
        h.until(ServiceState::Awake).await;
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(h.fake.calls("checkpoint").len(), 1);
        let s = h.m.status();
        assert_eq!(s.state, ServiceState::Awake);
        assert!(s.cannot_sleep.unwrap().contains("CAP_SYS_RESOURCE"));
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_after_the_commit_with_the_tree_gone_is_asleep_in_that_generation() {
        let fake = Fake::default();
        fake.checkpoints.lock().unwrap().push_back(Err(failed(
            "criu failed after commit",
            false,
            Some(7),
        )));
        *fake.failure_kills.lock().unwrap() = true;
        let h = start(fake).await;
        h.until(ServiceState::Asleep).await;
        assert_eq!(h.m.status().snapshot_generation, Some(7));
        h.link.request_wake();
        h.until(ServiceState::Awake).await;
        assert_eq!(h.fake.calls("restore")[0].1, "restore Some(7)");
        assert_eq!(
            h.m.status().cold_starts,
            0,
            "never a cold start over a good snapshot"
        );
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_after_the_commit_with_the_tree_alive_keeps_it_awake() {
        let fake = Fake::default();
        fake.checkpoints.lock().unwrap().push_back(Err(failed(
            "criu failed after commit",
            false,
            Some(7),
        )));
        let h = start(fake).await;
        h.until(ServiceState::Checkpointing).await;
        h.until(ServiceState::Awake).await;
        let s = h.m.status();
        assert_eq!((s.failed_checkpoints, s.sleeps), (1, 0));
        assert!(h.link.is_open());
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_restore_ends_in_a_cold_start_and_the_held_request_is_answered() {
        let fake = Fake::default();
        fake.restores.lock().unwrap().push_back(Err(RestoreFailed {
            message: "pool unreachable".into(),
            snapshot_lost: false,
        }));
        let h = start(fake).await;
        h.until(ServiceState::Asleep).await;
        h.link.enter().await.expect("late, not lost");
        let s = h.m.status();
        assert_eq!((s.state, s.cold_starts), (ServiceState::Awake, 1));
        assert_eq!(s.last_wake.unwrap().how, "cold start");
        assert_eq!(s.snapshots_lost, 0, "unreachable is not lost");
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_lost_on_every_replica_is_counted_and_reported_and_the_service_cold_starts()
    {
        let fake = Fake::default();
        fake.restores.lock().unwrap().push_back(Err(RestoreFailed {
            message: "snapshot \"n.web\" not found".into(),
            snapshot_lost: true,
        }));
        let h = start(fake).await;
        h.until(ServiceState::Asleep).await;
        h.link.enter().await.expect("late, not lost");
        let s = h.m.status();
        assert_eq!(
            (s.state, s.cold_starts, s.snapshots_lost),
            (ServiceState::Awake, 1, 1)
        );
        assert!(s.last_snapshot_lost.unwrap().contains("not found"));
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn when_the_cold_start_fails_too_requests_get_an_error_and_it_retries_with_backoff() {
        let fake = Fake::default();
        fake.restores.lock().unwrap().push_back(Err(RestoreFailed {
            message: "gone".into(),
            snapshot_lost: true,
        }));
        let h = start(fake).await;
        h.until(ServiceState::Asleep).await;
        h.fake.launches.lock().unwrap().extend([
            Err("exit code 1".to_string()),
            Err("exit code 1".to_string()),
            Ok(()),
        ]);
        let e = h.link.enter().await.map(drop).unwrap_err();
        assert!(matches!(e, HoldError::WakeFailed(_)), "{e:?}");
        assert_eq!(h.m.state(), ServiceState::Failed);
        // While it is down, a new request is refused at once (the gate's 503 + Retry-After).
        let t0 = Instant::now();
        let e = h.link.enter().await.map(drop).unwrap_err();
        assert!(matches!(e, HoldError::WakeFailed(_)), "{e:?}");
        assert_eq!(t0.elapsed(), Duration::ZERO);
        h.until(ServiceState::Awake).await;
        let launches = h.fake.calls("launch");
        // The first start, the failed one, two retries.
        assert_eq!(launches.len(), 4, "{launches:?}");
        let gap1 = launches[2].0 - launches[1].0;
        let gap2 = launches[3].0 - launches[2].0;
        assert!(
            gap1 >= RETRY_FIRST && gap2 >= 2 * RETRY_FIRST,
            "{launches:?}"
        );
        assert!(gap2 < 4 * RETRY_FIRST, "{launches:?}");
        h.link.enter().await.expect("up again");
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_manual_sleep_drains_a_request_in_flight_then_checkpoints_and_says_who() {
        let h = start(Fake::default()).await;
        let guard = h.link.enter().await.expect("awake: passes at once");
        let sleep = tokio::spawn({
            let m = h.m.clone();
            async move { m.command(ManualCommand::Sleep, "uid 0").await }
        });
        h.until(ServiceState::Draining).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(h.m.state(), ServiceState::Draining, "waits for the request");
        assert!(h.fake.calls("checkpoint").is_empty());
        guard.answered();
        drop(guard);
        let (outcome, detail) = sleep.await.unwrap().expect("asleep");
        assert_eq!(outcome, ManualOutcome::Done);
        assert!(detail.contains("generation 1"), "{detail}");
        assert_eq!(h.m.state(), ServiceState::Asleep);
        assert!(h
            .details()
            .iter()
            .any(|d| d.contains("manual sleep by uid 0")));
        let s = h.m.status();
        let last = s.last_manual.expect("kept for status");
        assert_eq!(
            (
                last.action.as_str(),
                last.by.as_str(),
                last.outcome.as_str()
            ),
            ("sleep", "uid 0", "done")
        );
        assert_eq!(h.m.shared.manual.lock().unwrap().len(), 1);
        let again = h.m.command(ManualCommand::Sleep, "uid 0").await.unwrap();
        assert_eq!(again.0, ManualOutcome::NoOp, "{again:?}");
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_manual_wake_restores_and_a_second_one_is_a_no_op() {
        let h = start(Fake::default()).await;
        h.until(ServiceState::Asleep).await;
        let (outcome, detail) = h.m.command(ManualCommand::Wake, "token").await.unwrap();
        assert_eq!(outcome, ManualOutcome::Done);
        assert!(detail.contains("awake (restore"), "{detail}");
        let s = h.m.status();
        assert_eq!(s.last_wake.unwrap().cause, "manual");
        assert_eq!(s.wakes, 1);
        let (outcome, detail) = h.m.command(ManualCommand::Wake, "token").await.unwrap();
        assert_eq!(outcome, ManualOutcome::NoOp);
        assert!(detail.contains("already awake"), "{detail}");
        assert_eq!(h.fake.calls("restore").len(), 1);
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_pin_wakes_the_service_and_keeps_it_awake_until_it_expires() {
        let h = start(Fake::default()).await;
        h.until(ServiceState::Asleep).await;
        let pin = ManualCommand::Pin {
            for_ms: Some(10_000),
        };
        let (outcome, detail) = h.m.command(pin, "uid 0").await.unwrap();
        assert_eq!(outcome, ManualOutcome::Done);
        assert!(
            detail.contains("pinned awake for 10s") && detail.contains("is awake"),
            "{detail}"
        );
        let p = h.m.status().pinned.expect("pinned");
        assert_eq!(p.by, "uid 0");
        assert!(p.left_s.unwrap() <= 10.0);
        let e =
            h.m.command(ManualCommand::Sleep, "uid 0")
                .await
                .unwrap_err();
        assert!(
            matches!(
                e,
                ManualError::Pinned {
                    left_s: Some(1..=10),
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(h.m.status().last_manual.unwrap().outcome, "refused");
        // Many idle thresholds pass: the policy leaves it alone until the pin ends.
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(h.m.state(), ServiceState::Awake);
        assert_eq!(
            h.fake.calls("checkpoint").len(),
            1,
            "only the sleep before the pin"
        );
        h.until(ServiceState::Asleep).await;
        assert!(h.m.status().pinned.is_none(), "expired");
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_by_hand_restarts_the_idle_time_and_a_pins_wake_does_not() {
        let h = start(Fake::default()).await;
        let idle = || h.link.with_arrivals(|a| a.idle_for(h.link.now()));
        h.until(ServiceState::Asleep).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        // A pin holds the service; it is no sign that requests come: its quiet goes on.
        h.m.command(ManualCommand::Pin { for_ms: None }, "uid 0")
            .await
            .unwrap();
        assert_eq!(h.m.state(), ServiceState::Awake);
        assert!(idle() >= Duration::from_secs(30), "idle for {:?}", idle());
        h.m.command(ManualCommand::Unpin, "uid 0").await.unwrap();
        h.until(ServiceState::Asleep).await;
        // A wake asked for is: its idle time starts over.
        h.m.command(ManualCommand::Wake, "uid 0").await.unwrap();
        assert_eq!(h.m.state(), ServiceState::Awake);
        assert!(idle() < IDLE, "idle for {:?}", idle());
        assert_eq!(h.m.status().last_wake.unwrap().cause, "manual");
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn unpin_hands_the_service_back_to_the_policy() {
        let h = start(Fake::default()).await;
        let (outcome, _) = h.m.command(ManualCommand::Unpin, "uid 0").await.unwrap();
        assert_eq!(outcome, ManualOutcome::NoOp, "nothing to unpin");
        h.m.command(ManualCommand::Pin { for_ms: None }, "uid 0")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(h.m.state(), ServiceState::Awake, "pinned until unpinned");
        let (outcome, detail) = h.m.command(ManualCommand::Unpin, "uid 7").await.unwrap();
        assert_eq!(outcome, ManualOutcome::Done);
        assert!(detail.contains("pinned by uid 0"), "{detail}");
        h.until(ServiceState::Asleep).await;
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_manual_sleep_is_reported_and_the_service_keeps_serving() {
        let fake = Fake::default();
        fake.checkpoints
            .lock()
            .unwrap()
            .push_back(Err(failed("criu said no", false, None)));
        let h = start(fake).await;
        let e =
            h.m.command(ManualCommand::Sleep, "uid 0")
                .await
                .unwrap_err();
        assert_eq!(
            e,
            ManualError::CheckpointFailed {
                service: "svc".into(),
                reason: "criu said no".into()
            }
        );
        assert_eq!(e.outcome(), "failed");
        assert!(h.link.is_open());
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn commands_after_the_loop_stopped_are_refused() {
        let h = start(Fake::default()).await;
        let m = h.m.clone();
        h.finish().await;
        assert_eq!(
            m.command(ManualCommand::Wake, "uid 0").await,
            Err(ManualError::Stopping)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_adopted_service_is_asleep_without_a_launch_and_its_first_request_restores_that_generation(
    ) {
        let h = start_with(Fake::default(), Some(7)).await;
        let s = h.m.status();
        assert_eq!(
            (s.state, s.pid, s.snapshot_generation, s.adopted_generation),
            (ServiceState::Asleep, None, Some(7), Some(7))
        );
        assert!(h.details()[0].contains("adopted asleep: generation 7"));
        h.link.enter().await.expect("held, then answered");
        let s = h.m.status();
        assert_eq!(
            (s.state, s.wakes, s.cold_starts),
            (ServiceState::Awake, 1, 0)
        );
        let w = s.last_wake.unwrap();
        assert_eq!((w.cause.as_str(), w.how.as_str()), ("request", "restore"));
        assert_eq!(h.fake.calls("restore")[0].1, "restore Some(7)");
        assert!(h.fake.calls("launch").is_empty(), "never launched");
        h.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn at_stop_an_awake_service_is_checkpointed_rather_than_killed() {
        let mut h = start(Fake::default()).await;
        // Pinned: the policy keeps it awake; the stop puts it to sleep all the same.
        h.m.command(ManualCommand::Pin { for_ms: None }, "uid 0")
            .await
            .unwrap();
        h.end_loop().await;
        assert_eq!(h.m.state(), ServiceState::Awake);
        assert!(Managed::sleep_for_stop(&h.m, Duration::from_secs(5)).await);
        let s = h.m.status();
        assert_eq!(
            (s.state, s.snapshot_generation),
            (ServiceState::Asleep, Some(1))
        );
        assert!(h
            .details()
            .iter()
            .any(|d| d.contains("stopping: its state is kept")));
        assert!(!Managed::stop(&h.m).await, "nothing left to kill");
        assert!(h.fake.calls("stop").is_empty());
        assert!(h.fake.calls("release").is_empty(), "its snapshot stays");
        // Asleep already: nothing more to do.
        assert!(Managed::sleep_for_stop(&h.m, Duration::from_secs(5)).await);
        assert_eq!(h.fake.calls("checkpoint").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_that_fails_at_stop_leaves_the_service_to_be_killed_and_forgotten() {
        let fake = Fake::default();
        fake.checkpoints
            .lock()
            .unwrap()
            .push_back(Err(failed("criu said no", false, None)));
        let mut h = start(fake).await;
        h.m.command(ManualCommand::Pin { for_ms: None }, "uid 0")
            .await
            .unwrap();
        h.end_loop().await;
        assert!(!Managed::sleep_for_stop(&h.m, Duration::from_secs(5)).await);
        assert!(Managed::stop(&h.m).await, "killed");
        assert_eq!(h.fake.calls("stop").len(), 1);
        h.m.forget_snapshots().await;
        assert_eq!(
            h.fake.calls("release")[0].1,
            format!("release {}", u64::MAX),
            "every generation"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_at_stop_is_cut_off_at_its_limit() {
        let mut h = start(Fake::default()).await;
        h.m.command(ManualCommand::Pin { for_ms: None }, "uid 0")
            .await
            .unwrap();
        h.end_loop().await;
        // The fake's checkpoint takes STEP, and the drain nothing: a limit below it cuts it.
        assert!(!Managed::sleep_for_stop(&h.m, STEP / 2).await);
        assert!(Managed::stop(&h.m).await, "killed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashed_service_is_restarted() {
        let h = start(Fake::default()).await;
        let pid = h.m.pid().unwrap();
        h.fake.kill(pid);
        h.until(ServiceState::Waking).await;
        h.until(ServiceState::Awake).await;
        let s = h.m.status();
        assert_eq!(s.restarts, 1);
        assert_ne!(s.pid, Some(pid));
        assert_eq!(s.last_wake.unwrap().cause, "restart");
        h.finish().await;
    }
}
