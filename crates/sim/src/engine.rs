//! The discrete-event engine: its own clock (seconds, f64) and seeded RNG. Services receive
//! requests from their arrival streams; nodes run them on cores (FIFO); idle cores are credited
//! the deepest idle state their idle period reached (target residency), and pay its exit latency
//! on the next job; services sleep and wake by the chosen policy, checkpoint and restore being
//! work on the node's cores; nodes suspend when every service on them sleeps (or, PowerNap,
//! whenever idle), and a request arriving during a transition waits for it. With local snapshots
//! a service wakes on its own node; with the pool (restore anywhere) it wakes on the fullest
//! awake node of its group that has room, and a periodic pass drains the emptiest node (its idle
//! services migrate by checkpoint and restore) so that it can sleep. An awake idle service costs
//! its node what the governor's energy model says its background CPU and wakeups cost; under the
//! governor policy it may instead be frozen (no idle cost, memory kept, a request waits the thaw).

use std::{
    collections::{BTreeSet, VecDeque},
    ops::Range,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde::Serialize;
use torpor_policy::{
    choose_level, decide_sleep, level_costs, predicted_idle, prewarm_at, ArrivalTracker,
    AwakeReason, CycleCost, EnergyModel, IdleCost, Level, LevelInputs, PolicyConfig, Reason,
    SleepDecision,
};
use torpor_power::Profile;
use torpor_traffic::{ArrivalStream, Percentiles};

use crate::{
    config::{PolicyName, RestoreMode, ServiceTime, SimConfig},
    queue::{EventQueue, Timed},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Arrival,
    Complete,
    SleepCheck,
    Prewarm,
    OracleWake,
    NodeSleep,
    NodeEntered,
    NodeResumed,
    Consolidate,
    GovernorCheck,
    Thawed,
}

/// A freeze and thaw of a service's cgroup: about a millisecond of CPU for the freezer and
/// the thaw, and a request that finds it frozen waits about a millisecond (the live agent's
/// guess before it measured one).
const FREEZE_CYCLE: CycleCost = CycleCost {
    cpu_s: 0.001,
    exit_latency: Duration::from_millis(1),
};

/// What a core runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    Request,
    Checkpoint,
    Restore,
}

#[derive(Debug, Clone, Copy)]
struct Event {
    t: f64,
    seq: u64,
    kind: Kind,
    /// Service or node index.
    id: u32,
    /// Generation (timers) or the job's work kind.
    aux: u32,
    /// The job's arrival time (completions).
    x: f64,
}

impl Timed for Event {
    fn key(&self) -> (u64, u64) {
        (self.t.to_bits(), self.seq)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SvcState {
    Awake,
    /// Its cgroup frozen (governor): memory kept, no idle cost.
    Frozen,
    /// Frozen when a request came: back after the thaw's exit latency.
    Thawing,
    Checkpointing,
    Asleep,
    Waking,
}

impl SvcState {
    /// The governor's level it counts as, for the time shares of the report.
    fn level(self) -> Level {
        match self {
            SvcState::Awake => Level::Awake,
            SvcState::Frozen | SvcState::Thawing => Level::Frozen,
            SvcState::Checkpointing | SvcState::Asleep | SvcState::Waking => Level::Snapshotted,
        }
    }
}

#[derive(Debug)]
struct Svc {
    node: u32,
    /// Its service group (for the service-time distribution).
    group: u32,
    footprint: u64,
    state: SvcState,
    stream: ArrivalStream,
    next_arrival: f64,
    /// Requests queued or running.
    in_system: u32,
    /// Arrival times of requests held while asleep or waking.
    held: Vec<f64>,
    /// Its wake had to wait for its node to resume first (the held requests waited too).
    waking_on_a_sleeping_node: bool,
    tracker: Option<ArrivalTracker>,
    /// Timer generation: a timer that finds another generation is stale.
    gen: u32,
    /// When it last ran out of work.
    idle_since: f64,
    /// A sleep check is in the queue (one at a time: it re-arms itself if the service was
    /// busy in between, so a burst of requests costs one check, not one per request).
    check_pending: bool,
    /// Its checkpoint moves it off a draining node: it wakes elsewhere as soon as it is done.
    migrating: bool,
    /// Its idle cost is on its node's bill (it is awake with nothing to do).
    idle_billed: bool,
    /// The governor's live check carries this token; scheduling a new one (a new idle
    /// period, or node sleep coming in reach) makes older ones stale, so one chain runs.
    check_token: u32,
    /// When it entered its current state (for the level time shares).
    state_since: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeState {
    Up,
    Entering,
    Asleep,
    Resuming,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    svc: u32,
    arrival: f64,
    work: Work,
}

#[derive(Debug)]
struct Node {
    group: u32,
    cores: u32,
    busy: u32,
    /// Idle cores by the time their idle period began (a stack: the most recently idled is
    /// reused first, so the others stay idle longer, as a consolidating scheduler would).
    idle_cores: Vec<f64>,
    queue: VecDeque<Job>,
    state: NodeState,
    /// Resume as soon as the entry transition ends.
    resume_pending: bool,
    /// Services whose restore waits for the node to resume.
    waiting: Vec<u32>,
    /// Services placed here (restore anywhere: awake, checkpointing or waking ones only).
    services: u32,
    /// Services placed here that are snapshotted (restore in place only).
    asleep_services: u32,
    /// Which services `services` counts (the governor weighs whether node sleep is in reach).
    members: BTreeSet<u32>,
    resident_bytes: u64,
    /// Memory for services (restore anywhere places by it).
    memory: u64,
    /// Footprints of the services placed here that are not snapshotted, waking ones included
    /// (their memory is spoken for before their restore ends).
    placed_bytes: u64,
    /// The consolidation pass is emptying it: its services migrate when idle, none wake here
    /// while another awake node has room.
    draining: bool,
    last_t: f64,
    energy_j: f64,
    /// Power the background CPU and wakeups of its awake idle services cost (W).
    idle_cost_w: f64,
    /// The part of `energy_j` that `idle_cost_w` drew.
    idle_cost_j: f64,
    idle_time: f64,
    idle_periods: u64,
    asleep_time: f64,
    gen: u32,
}

impl Node {
    /// Ends one core's idle period of `len` seconds: credits the energy of the state it reached
    /// and its trip there and back (as the live energy account does), and counts it. Returns
    /// that state's exit latency.
    fn end_idle_period(&mut self, p: &NodePower, len: f64, deep: bool) -> f64 {
        let state = p.idle_state(len, deep);
        self.energy_j += state.watts * len + state.trip_j;
        self.idle_time += len;
        self.idle_periods += 1;
        state.exit_s
    }

    /// Ends every idle core's period at `now` (the node suspends, or the run ends).
    fn end_all_idle(&mut self, p: &NodePower, now: f64, deep: bool) {
        for since in std::mem::take(&mut self.idle_cores) {
            self.end_idle_period(p, now - since, deep);
        }
    }
}

/// One core idle state as the simulator charges it.
#[derive(Debug, Clone, Copy)]
struct IdleState {
    /// Periods at least this long reach it.
    target_s: f64,
    watts: f64,
    /// What the next job waits for the core.
    exit_s: f64,
    /// Entering and leaving it ([`Profile::trip_joules`]).
    trip_j: f64,
}

/// Power figures of one node of a group.
#[derive(Debug, Clone)]
struct NodePower {
    /// Package floor, DRAM idle and platform, scaled to the group's cores.
    base_w: f64,
    active_w: f64,
    per_gib_w: f64,
    max_w: f64,
    suspend_w: f64,
    entry_s: f64,
    resume_s: f64,
    /// The profile's idle states, shallow first.
    states: Vec<IdleState>,
    cores: u32,
}

impl NodePower {
    fn new(p: &Profile, cores: u32) -> NodePower {
        let scale = f64::from(cores) / f64::from(p.cores());
        let base_w = p.package.c6_floor_watts * f64::from(cores) / f64::from(p.cores_per_package)
            + scale * (p.dram.idle_watts + p.platform_watts);
        NodePower {
            base_w,
            active_w: p.core.active_watts,
            per_gib_w: p.dram.watts_per_gib,
            max_w: base_w + f64::from(cores) * p.core.active_watts,
            suspend_w: scale * p.node.suspend_watts,
            entry_s: p.node.suspend_entry_s,
            resume_s: p.node.resume_s,
            states: p
                .idle_states
                .iter()
                .enumerate()
                .map(|(k, s)| IdleState {
                    target_s: s.target_residency_us as f64 / 1e6,
                    watts: s.core_watts,
                    exit_s: s.exit_latency_us as f64 / 1e6,
                    trip_j: p.trip_joules(k),
                })
                .collect(),
            cores,
        }
    }

    /// What the node saves by suspending rather than idling up with every core in its deepest
    /// state: what the governor credits the snapshot that lets it sleep with.
    fn sleep_saving_w(&self) -> f64 {
        let deepest_w = self.states.last().map_or(0.0, |s| s.watts);
        (self.base_w + f64::from(self.cores) * deepest_w - self.suspend_w).max(0.0)
    }

    /// The state an idle period of `len` seconds reaches.
    fn idle_state(&self, len: f64, deep: bool) -> IdleState {
        if deep {
            self.states
                .iter()
                .rev()
                .find(|s| s.target_s <= len)
                .copied()
                .unwrap_or(self.states[0])
        } else {
            self.states[0]
        }
    }
}

/// One node group's figures.
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    pub name: String,
    pub nodes: u32,
    /// Share of core time idle (while the node was up).
    pub idle_fraction: f64,
    pub mean_idle_period_s: f64,
    /// Share of node time suspended.
    pub asleep_fraction: f64,
    pub energy_j: f64,
    pub mean_power_w: f64,
}

/// One service group's figures: where its services spent their time.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceGroupReport {
    pub name: String,
    pub services: u32,
    /// Share of service time frozen (thaws included).
    pub frozen_fraction: f64,
    /// Share of service time snapshotted (checkpoints and restores included).
    pub snapshotted_fraction: f64,
}

/// What a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub policy: &'static str,
    /// Where snapshotted services woke: `in-place` or `anywhere`.
    pub restore: &'static str,
    pub approach: &'static str,
    pub seed: u64,
    pub simulated_s: f64,
    pub nodes: u32,
    pub services: u32,
    pub events: u64,
    pub wall_s: f64,
    pub events_per_s: f64,
    pub node_groups: Vec<GroupReport>,
    pub energy_j: f64,
    pub mean_power_w: f64,
    pub requests: u64,
    pub latency: Percentiles,
    /// Requests that found their service asleep, checkpointing or waking.
    pub found_asleep: u64,
    /// Of those, the ones whose service's wake waited for its node to resume first: what
    /// puts a node's resume into the tail.
    pub waited_for_a_node: u64,
    pub checkpoints: u64,
    pub restores: u64,
    pub node_sleeps: u64,
    /// Services moved off a draining node (each also counted as a checkpoint and a restore).
    pub migrations: u64,
    /// Services frozen (governor).
    pub freezes: u64,
    /// Requests that found their service frozen (they waited its thaw).
    pub found_frozen: u64,
    /// Of `energy_j`, what awake idle services' background CPU and wakeups cost.
    pub idle_cost_j: f64,
    pub service_groups: Vec<ServiceGroupReport>,
}

/// The simulator.
#[derive(Debug)]
pub struct Sim<'a> {
    cfg: &'a SimConfig,
    rng: SmallRng,
    now: f64,
    end: f64,
    seq: u64,
    events: u64,
    heap: EventQueue<Event>,
    svcs: Vec<Svc>,
    nodes: Vec<Node>,
    power: Vec<NodePower>,
    latency_us: Histogram<u64>,
    found_asleep: u64,
    waited_for_a_node: u64,
    checkpoints: u64,
    restores: u64,
    node_sleeps: u64,
    migrations: u64,
    freezes: u64,
    found_frozen: u64,
    policy_cfg: PolicyConfig,
    /// Node indices of each node group.
    group_nodes: Vec<Range<usize>>,
    /// Per node group: the governor's prices, from its power profile.
    models: Vec<EnergyModel>,
    /// Per service group: what one awake idle service costs its node (W), as the governor
    /// prices it.
    idle_w: Vec<f64>,
    /// Per service group: seconds of service time in each level (awake, frozen, snapshotted).
    level_s: Vec<[f64; 3]>,
}

fn service_time(rng: &mut SmallRng, st: &ServiceTime) -> f64 {
    match *st {
        ServiceTime::Exponential { mean_ms } => -(1.0 - rng.gen::<f64>()).ln() * mean_ms / 1e3,
        ServiceTime::Constant { ms } => ms / 1e3,
        ServiceTime::Uniform { min_ms, max_ms } => rng.gen_range(min_ms..=max_ms) / 1e3,
        ServiceTime::Lognormal { mean_ms, cv } => {
            let sigma2 = (1.0 + cv * cv).ln();
            let mu = (mean_ms / 1e3).ln() - sigma2 / 2.0;
            let (u1, u2): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (mu + sigma2.sqrt() * z).exp()
        }
    }
}

fn dur(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

impl<'a> Sim<'a> {
    pub fn new(cfg: &'a SimConfig) -> Sim<'a> {
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let mut nodes = Vec::new();
        let mut power = Vec::new();
        let mut first_node = Vec::new();
        let mut group_nodes = Vec::new();
        for (g, group) in cfg.nodes.iter().enumerate() {
            first_node.push(nodes.len() as u32);
            group_nodes.push(nodes.len()..nodes.len() + group.count as usize);
            power.push(NodePower::new(&group.profile, group.cores));
            for _ in 0..group.count {
                nodes.push(Node {
                    group: g as u32,
                    cores: group.cores,
                    busy: 0,
                    idle_cores: vec![0.0; group.cores as usize],
                    queue: VecDeque::new(),
                    state: NodeState::Up,
                    resume_pending: false,
                    waiting: Vec::new(),
                    services: 0,
                    asleep_services: 0,
                    members: BTreeSet::new(),
                    resident_bytes: 0,
                    memory: group.memory_bytes,
                    placed_bytes: 0,
                    draining: false,
                    last_t: 0.0,
                    energy_j: 0.0,
                    idle_cost_w: 0.0,
                    idle_cost_j: 0.0,
                    idle_time: 0.0,
                    idle_periods: 0,
                    asleep_time: 0.0,
                    gen: 0,
                });
            }
        }
        let mut svcs = Vec::new();
        let mut next_on_group = vec![0u32; cfg.nodes.len()];
        let tracks = matches!(
            cfg.policy,
            PolicyName::SeedTable | PolicyName::Predictor | PolicyName::Governor
        );
        for (service_group, s) in cfg.services.iter().enumerate() {
            let group = &cfg.nodes[s.node_group];
            for _ in 0..s.count {
                let node = first_node[s.node_group] + next_on_group[s.node_group] % group.count;
                next_on_group[s.node_group] += 1;
                let stream =
                    ArrivalStream::new(s.arrival.clone(), SmallRng::seed_from_u64(rng.gen()));
                nodes[node as usize].services += 1;
                nodes[node as usize].members.insert(svcs.len() as u32);
                nodes[node as usize].resident_bytes += s.footprint_bytes;
                nodes[node as usize].placed_bytes += s.footprint_bytes;
                svcs.push(Svc {
                    node,
                    group: service_group as u32,
                    footprint: s.footprint_bytes,
                    state: SvcState::Awake,
                    stream,
                    next_arrival: f64::INFINITY,
                    in_system: 0,
                    held: Vec::new(),
                    waking_on_a_sleeping_node: false,
                    tracker: tracks
                        .then(|| ArrivalTracker::new(Duration::ZERO, Duration::from_secs(60))),
                    gen: 0,
                    idle_since: 0.0,
                    check_pending: false,
                    migrating: false,
                    idle_billed: false,
                    check_token: 0,
                    state_since: 0.0,
                });
            }
        }
        // The live agent's defaults, but for the threshold the configuration sweeps.
        let policy_cfg = PolicyConfig {
            idle_threshold: cfg.idle_threshold,
            ..PolicyConfig::default()
        };
        let models: Vec<EnergyModel> = cfg.nodes.iter().map(|g| g.profile.energy_model()).collect();
        let idle_w = cfg
            .services
            .iter()
            .map(|s| {
                let inputs = LevelInputs {
                    idle: IdleCost {
                        cpus: s.idle_cpus,
                        wakeups_per_s: s.idle_wakeups_per_s,
                        resident_bytes: 0,
                        // The simulated node has no agent of its own to watch its services.
                        ..IdleCost::default()
                    },
                    freeze: FREEZE_CYCLE,
                    snapshot: FREEZE_CYCLE,
                    node_sleep_w: 0.0,
                };
                // What freezing saves is exactly what staying awake and idle costs.
                level_costs(&inputs, &models[s.node_group])[0].saving_w
            })
            .collect();
        let mut sim = Sim {
            cfg,
            rng,
            now: 0.0,
            end: cfg.duration.as_secs_f64(),
            seq: 0,
            events: 0,
            heap: EventQueue::new(),
            svcs,
            nodes,
            power,
            latency_us: Histogram::new_with_bounds(1, 86_400_000_000, 3).expect("histogram bounds"),
            found_asleep: 0,
            checkpoints: 0,
            restores: 0,
            node_sleeps: 0,
            waited_for_a_node: 0,
            migrations: 0,
            freezes: 0,
            found_frozen: 0,
            policy_cfg,
            group_nodes,
            models,
            idle_w,
            level_s: vec![[0.0; 3]; cfg.services.len()],
        };
        for i in 0..sim.svcs.len() {
            sim.schedule_next_arrival(i as u32);
        }
        // Services that start idle may sleep from the start.
        for i in 0..sim.svcs.len() {
            sim.on_service_idle(i as u32);
        }
        if sim.consolidates() {
            let t = cfg.consolidate_every.as_secs_f64();
            sim.push(t, Kind::Consolidate, 0, 0, 0.0);
        }
        sim
    }

    fn push(&mut self, t: f64, kind: Kind, id: u32, aux: u32, x: f64) {
        self.seq += 1;
        self.heap.push(Event {
            t,
            seq: self.seq,
            kind,
            id,
            aux,
            x,
        });
    }

    fn schedule_next_arrival(&mut self, s: u32) {
        let next = self.svcs[s as usize]
            .stream
            .next_arrival()
            .unwrap_or(f64::INFINITY);
        self.svcs[s as usize].next_arrival = next;
        if next < self.end {
            self.push(next, Kind::Arrival, s, 0, 0.0);
        }
    }

    /// Runs to the end and reports.
    pub fn run(mut self) -> SimReport {
        let wall = Instant::now();
        while let Some(ev) = self.heap.pop() {
            if ev.t >= self.end {
                break;
            }
            self.now = ev.t;
            self.events += 1;
            match ev.kind {
                Kind::Arrival => self.on_arrival(ev.id),
                Kind::Complete => self.on_complete(ev.id, ev.aux, ev.x),
                Kind::SleepCheck => self.on_sleep_check(ev.id),
                Kind::Prewarm => self.on_prewarm(ev.id, ev.aux),
                Kind::OracleWake => self.on_prewarm(ev.id, ev.aux),
                Kind::NodeSleep => self.on_node_sleep_timer(ev.id, ev.aux),
                Kind::NodeEntered => self.on_node_entered(ev.id),
                Kind::NodeResumed => self.on_node_resumed(ev.id),
                Kind::Consolidate => self.on_consolidate(),
                Kind::GovernorCheck => self.on_governor_check(ev.id, ev.aux),
                Kind::Thawed => self.on_thawed(ev.id),
            }
        }
        self.now = self.end;
        for s in 0..self.svcs.len() {
            let state = self.svcs[s].state;
            self.set_state(s as u32, state);
        }
        for n in 0..self.nodes.len() {
            self.settle(n);
            let deep = self.deep_idle();
            let node = &mut self.nodes[n];
            if node.state == NodeState::Up {
                node.end_all_idle(&self.power[node.group as usize], self.end, deep);
            }
        }
        self.report(wall.elapsed().as_secs_f64())
    }

    /// Services move between nodes: restore anywhere, under a policy that snapshots.
    fn consolidates(&self) -> bool {
        self.cfg.restore == RestoreMode::Anywhere && self.cfg.policy.sleeps_services()
    }

    fn deep_idle(&self) -> bool {
        self.cfg.policy != PolicyName::AlwaysOn
    }

    /// Integrates the node's power up to now (before anything about it changes).
    fn settle(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        let p = &self.power[node.group as usize];
        let dt = self.now - node.last_t;
        if dt > 0.0 {
            let w = match node.state {
                NodeState::Up => {
                    node.idle_cost_j += node.idle_cost_w * dt;
                    p.base_w
                        + f64::from(node.busy) * p.active_w
                        + p.per_gib_w * node.resident_bytes as f64 / (1u64 << 30) as f64
                        + node.idle_cost_w
                }
                // Transitions draw full power (Meisner et al.'s assumption).
                NodeState::Entering | NodeState::Resuming => p.max_w,
                NodeState::Asleep => {
                    node.asleep_time += dt;
                    p.suspend_w
                }
            };
            node.energy_j += w * dt;
        }
        node.last_t = self.now;
    }

    fn on_arrival(&mut self, s: u32) {
        self.schedule_next_arrival(s);
        let now = self.now;
        let svc = &mut self.svcs[s as usize];
        if let Some(t) = svc.tracker.as_mut() {
            t.record(dur(now));
        }
        match svc.state {
            SvcState::Awake => self.submit(s, now, Work::Request),
            SvcState::Checkpointing | SvcState::Waking => {
                svc.held.push(now);
                self.found_asleep += 1;
            }
            SvcState::Asleep => {
                svc.held.push(now);
                self.found_asleep += 1;
                self.wake(s);
            }
            SvcState::Thawing => svc.held.push(now),
            SvcState::Frozen => {
                svc.held.push(now);
                self.found_frozen += 1;
                self.set_state(s, SvcState::Thawing);
                let t = now + FREEZE_CYCLE.exit_latency.as_secs_f64();
                self.push(t, Kind::Thawed, s, 0, 0.0);
            }
        }
    }

    /// The thaw is done: the held requests run.
    fn on_thawed(&mut self, s: u32) {
        self.set_state(s, SvcState::Awake);
        for arrival in std::mem::take(&mut self.svcs[s as usize].held) {
            self.submit(s, arrival, Work::Request);
        }
    }

    /// Moves `s` to `state`, counting the time it spent in the one it leaves.
    fn set_state(&mut self, s: u32, state: SvcState) {
        let svc = &mut self.svcs[s as usize];
        let level = svc.state.level() as usize;
        self.level_s[svc.group as usize][level] += self.now - svc.state_since;
        svc.state = state;
        svc.state_since = self.now;
    }

    /// Puts `s`'s idle cost on its node's bill (`on`: it is awake with nothing to do) or takes
    /// it off.
    fn bill_idle(&mut self, s: u32, on: bool) {
        let svc = &self.svcs[s as usize];
        let (n, w) = (svc.node as usize, self.idle_w[svc.group as usize]);
        if svc.idle_billed == on {
            return;
        }
        self.svcs[s as usize].idle_billed = on;
        // A free service leaves its node's integration alone (and the numbers of
        // configurations without idle costs as they were).
        if w == 0.0 {
            return;
        }
        self.settle(n);
        let node = &mut self.nodes[n];
        node.idle_cost_w = if on {
            node.idle_cost_w + w
        } else {
            (node.idle_cost_w - w).max(0.0)
        };
    }

    /// Puts work for `s` on its node: a free core if the node is up, else its queue.
    fn submit(&mut self, s: u32, arrival: f64, work: Work) {
        let n = self.svcs[s as usize].node as usize;
        if work == Work::Request {
            self.bill_idle(s, false);
            self.svcs[s as usize].in_system += 1;
        }
        let job = Job {
            svc: s,
            arrival,
            work,
        };
        match self.nodes[n].state {
            NodeState::Up if !self.nodes[n].idle_cores.is_empty() => self.start(n, job),
            NodeState::Up | NodeState::Resuming => self.nodes[n].queue.push_back(job),
            NodeState::Entering => {
                self.nodes[n].queue.push_back(job);
                self.nodes[n].resume_pending = true;
            }
            NodeState::Asleep => {
                self.nodes[n].queue.push_back(job);
                self.resume_node(n);
            }
        }
    }

    /// Runs `job` on an idle core (which pays its idle state's exit latency).
    fn start(&mut self, n: usize, job: Job) {
        self.settle(n);
        let deep = self.deep_idle();
        let node = &mut self.nodes[n];
        let since = node.idle_cores.pop().expect("an idle core");
        let exit = node.end_idle_period(&self.power[node.group as usize], self.now - since, deep);
        node.busy += 1;
        self.run_job(job, exit);
    }

    /// Schedules `job`'s completion on a core that is already awake (after `exit` to wake it).
    fn run_job(&mut self, job: Job, exit: f64) {
        let svc = &self.svcs[job.svc as usize];
        let (fp, st) = (svc.footprint, self.cfg.service_time_of(svc.group as usize));
        let work = match job.work {
            Work::Request => service_time(&mut self.rng, st),
            Work::Checkpoint => self.cfg.cr_times(fp).0,
            Work::Restore => self.cfg.cr_times(fp).1,
        };
        let kind = job.work as u32;
        self.push(
            self.now + exit + work,
            Kind::Complete,
            job.svc,
            kind,
            job.arrival,
        );
    }

    fn on_complete(&mut self, s: u32, work: u32, arrival: f64) {
        let n = self.svcs[s as usize].node as usize;
        match self.nodes[n].queue.pop_front() {
            // The core goes straight on to the next job: no idle period.
            Some(next) => self.run_job(next, 0.0),
            None => {
                self.settle(n);
                self.nodes[n].busy -= 1;
                self.nodes[n].idle_cores.push(self.now);
            }
        }
        match work {
            w if w == Work::Request as u32 => {
                let _ = self
                    .latency_us
                    .record(((self.now - arrival) * 1e6).max(1.0) as u64);
                let svc = &mut self.svcs[s as usize];
                svc.in_system -= 1;
                if svc.in_system == 0 {
                    self.on_service_idle(s);
                }
            }
            w if w == Work::Checkpoint as u32 => self.checkpointed(s),
            _ => self.restored(s),
        }
        self.maybe_node_idle(n);
    }

    /// `s` has nothing to do: the policy decides when (if ever) it sleeps.
    fn on_service_idle(&mut self, s: u32) {
        let svc = &mut self.svcs[s as usize];
        if svc.state != SvcState::Awake || svc.in_system > 0 {
            return;
        }
        svc.gen += 1;
        svc.idle_since = self.now;
        if self.nodes[svc.node as usize].draining {
            self.migrate(s);
            return;
        }
        self.bill_idle(s, true);
        let svc = &mut self.svcs[s as usize];
        match self.cfg.policy {
            PolicyName::FixedThreshold | PolicyName::SeedTable | PolicyName::Predictor
                if !svc.check_pending =>
            {
                svc.check_pending = true;
                let t = self.now + self.cfg.idle_threshold.as_secs_f64();
                self.push(t, Kind::SleepCheck, s, 0, 0.0);
            }
            PolicyName::Oracle => {
                let gap = svc.next_arrival - self.now;
                if gap > self.break_even_s(s) {
                    self.checkpoint(s);
                }
            }
            PolicyName::Governor => {
                let t = self.now + self.cfg.idle_threshold.as_secs_f64();
                self.governor_check_at(s, t);
            }
            _ => {}
        }
    }

    /// Schedules the governor's next look at `s`, replacing any it had.
    fn governor_check_at(&mut self, s: u32, t: f64) {
        let svc = &mut self.svcs[s as usize];
        svc.check_token = svc.check_token.wrapping_add(1);
        let token = svc.check_token;
        if t < self.end {
            self.push(t, Kind::GovernorCheck, s, token, 0.0);
        }
    }

    /// When node sleep is in reach for `s`'s snapshot (node sleep configured; every other
    /// service on its node snapshotted, or idle with a quiet predicted past the node's sleep
    /// delay), how many services, `s` among them, are still up: each is credited that share of
    /// the node's saving, as the live agent does.
    fn node_sleep_share(&self, s: u32) -> Option<usize> {
        let min_quiet = self.cfg.node_sleep_after?;
        let now = dur(self.now);
        let quiet = |m: u32| {
            self.svcs[m as usize]
                .tracker
                .as_ref()
                .map_or(Duration::ZERO, |t| predicted_idle(t, now))
        };
        if quiet(s) < min_quiet {
            return None;
        }
        let node = &self.nodes[self.svcs[s as usize].node as usize];
        let mut up = 1;
        for &m in node.members.iter().filter(|&&m| m != s) {
            let other = &self.svcs[m as usize];
            match other.state {
                SvcState::Asleep => continue,
                SvcState::Awake | SvcState::Frozen
                    if other.in_system == 0 && quiet(m) >= min_quiet =>
                {
                    up += 1
                }
                _ => return None,
            }
        }
        Some(up)
    }

    /// What the governor weighs for `s` now: its group's idle cost, a freeze, a snapshot cycle
    /// from the calibration, and its share of the node's sleep when that is in reach.
    fn level_inputs(&self, s: u32) -> LevelInputs {
        let svc = &self.svcs[s as usize];
        let group = &self.cfg.services[svc.group as usize];
        let node = &self.nodes[svc.node as usize];
        let (checkpoint_s, restore_s) = self.cfg.cr_times(svc.footprint);
        let node_sleep_w = self.node_sleep_share(s).map_or(0.0, |up| {
            self.power[node.group as usize].sleep_saving_w() / up as f64
        });
        LevelInputs {
            idle: IdleCost {
                cpus: group.idle_cpus,
                wakeups_per_s: group.idle_wakeups_per_s,
                resident_bytes: svc.footprint,
                // The simulated node has no agent of its own to watch its services.
                ..IdleCost::default()
            },
            freeze: FREEZE_CYCLE,
            // Checkpoint and restore as the calibration times them, taken as CPU-seconds on
            // one core (CRIU's dump and restore are mostly one thread copying pages; the
            // engine runs them as work on one core too).
            snapshot: CycleCost {
                cpu_s: checkpoint_s + restore_s,
                exit_latency: dur(restore_s),
            },
            node_sleep_w,
        }
    }

    /// The governor looks at idle `s` (awake or frozen): it goes deeper if a deeper level pays
    /// over the predicted idle period, as the live agent does (never shallower while idle).
    /// Then it looks again once the idle period has doubled, since the prediction changes
    /// with the time already idle: a few looks per idle period however long it lasts.
    fn on_governor_check(&mut self, s: u32, token: u32) {
        let svc = &self.svcs[s as usize];
        if svc.check_token != token
            || !matches!(svc.state, SvcState::Awake | SvcState::Frozen)
            || svc.in_system > 0
        {
            return;
        }
        let inputs = self.level_inputs(s);
        let model = self.models[self.nodes[svc.node as usize].group as usize];
        let now = dur(self.now);
        let svc = &mut self.svcs[s as usize];
        let tracker = svc.tracker.as_mut().expect("tracked policy");
        let choice = choose_level(&self.policy_cfg, tracker, now, &inputs, &model);
        match (svc.state, choice.level) {
            (_, Level::Snapshotted) => {
                self.checkpoint(s);
                return;
            }
            (SvcState::Awake, Level::Frozen) => self.freeze(s),
            _ => {}
        }
        if choice.reason == Reason::WakeTooSlow {
            return; // no level's exit fits the objective, however long it stays idle
        }
        let since = self.svcs[s as usize].idle_since;
        let next = since + 2.0 * (self.now - since).max(self.cfg.idle_threshold.as_secs_f64());
        self.governor_check_at(s, next.max(self.now + 1e-3));
    }

    fn freeze(&mut self, s: u32) {
        self.bill_idle(s, false);
        self.set_state(s, SvcState::Frozen);
        self.freezes += 1;
        // The freezer's and the thaw's CPU, paid now.
        let n = self.svcs[s as usize].node as usize;
        let model = self.models[self.nodes[n].group as usize];
        self.settle(n);
        self.nodes[n].energy_j += FREEZE_CYCLE.cpu_s * model.watts_per_busy_cpu;
    }

    /// The oracle's bar: a sleep must pay for itself by the memory it frees (node sleep is a
    /// collective outcome a per-service decision cannot count on).
    fn break_even_s(&self, s: u32) -> f64 {
        let svc = &self.svcs[s as usize];
        let node = &self.nodes[svc.node as usize];
        break_even_for(
            self.cfg,
            &self.power[node.group as usize],
            node.services,
            svc.footprint,
            false,
        )
    }

    fn on_sleep_check(&mut self, s: u32) {
        let now = dur(self.now);
        let threshold = self.cfg.idle_threshold.as_secs_f64();
        let expected_wake = {
            let svc = &mut self.svcs[s as usize];
            svc.check_pending = false;
            if svc.state != SvcState::Awake || svc.in_system > 0 {
                return; // the next idle moment arms a new check
            }
            let due = svc.idle_since + threshold;
            if self.now < due {
                svc.check_pending = true;
                self.push(due, Kind::SleepCheck, s, 0, 0.0);
                return;
            }
            dur(self.cfg.cr_times(svc.footprint).1)
        };
        let decision = match self.cfg.policy {
            PolicyName::FixedThreshold => SleepDecision::Sleep {
                tier: torpor_policy::SnapshotTier::Memory,
            },
            _ => {
                let svc = &mut self.svcs[s as usize];
                let fp = svc.footprint;
                let tracker = svc.tracker.as_mut().expect("tracked policy");
                decide_sleep(&self.policy_cfg, tracker, now, fp, expected_wake)
            }
        };
        match decision {
            SleepDecision::Sleep { .. } => self.checkpoint(s),
            // The rate over the window may fall while the service stays idle: look again, as
            // the live agent's tick would. A wake objective it misses will not change.
            SleepDecision::StayAwake { reason } if reason != AwakeReason::WakeTooSlow => {
                self.svcs[s as usize].check_pending = true;
                let t = self.now + threshold.max(1.0);
                self.push(t, Kind::SleepCheck, s, 0, 0.0);
            }
            SleepDecision::StayAwake { .. } => {}
        }
    }

    fn checkpoint(&mut self, s: u32) {
        self.bill_idle(s, false);
        self.set_state(s, SvcState::Checkpointing);
        self.checkpoints += 1;
        self.submit(s, self.now, Work::Checkpoint);
    }

    /// Moves idle `s` off its (draining) node: a checkpoint whose restore follows elsewhere.
    fn migrate(&mut self, s: u32) {
        self.svcs[s as usize].migrating = true;
        self.migrations += 1;
        self.checkpoint(s);
    }

    fn checkpointed(&mut self, s: u32) {
        let n = self.svcs[s as usize].node as usize;
        self.settle(n);
        self.set_state(s, SvcState::Asleep);
        let svc = &mut self.svcs[s as usize];
        svc.gen += 1;
        let gen = svc.gen;
        let node = &mut self.nodes[n];
        node.resident_bytes -= svc.footprint;
        match self.cfg.restore {
            RestoreMode::InPlace => node.asleep_services += 1,
            // In the pool it belongs to no node until it wakes.
            RestoreMode::Anywhere => {
                node.services -= 1;
                node.members.remove(&s);
                node.placed_bytes -= svc.footprint;
            }
        }
        if !svc.held.is_empty() || std::mem::take(&mut svc.migrating) {
            self.wake(s);
            self.maybe_node_idle(n);
            return;
        }
        match self.cfg.policy {
            PolicyName::Oracle => {
                // Ready when the request comes, even if the node has suspended meanwhile.
                let (_, restore) = self.cfg.cr_times(svc.footprint);
                let resume = match self.cfg.node_sleep_after {
                    Some(_) => self.power[self.nodes[n].group as usize].resume_s,
                    None => 0.0,
                };
                let at = (svc.next_arrival - restore - resume).max(self.now);
                if at < self.end {
                    self.push(at, Kind::OracleWake, s, gen, 0.0);
                }
            }
            PolicyName::Predictor => {
                let expected = dur(self.cfg.cr_times(svc.footprint).1);
                let tracker = svc.tracker.as_ref().expect("tracked policy");
                if let Some(at) = prewarm_at(&self.policy_cfg, tracker, expected) {
                    let at = at.as_secs_f64().max(self.now);
                    if at < self.end {
                        self.push(at, Kind::Prewarm, s, gen, 0.0);
                    }
                }
            }
            PolicyName::Governor => self.node_sleep_in_reach(n),
            _ => {}
        }
        self.maybe_node_idle(n);
    }

    /// Every service of node `n` but one is snapshotted: the node's sleep now hinges on that
    /// one, which changes what its snapshot is worth, so the governor looks at it now rather
    /// than at its next scheduled look.
    fn node_sleep_in_reach(&mut self, n: usize) {
        let node = &self.nodes[n];
        if self.cfg.node_sleep_after.is_none() || node.services != node.asleep_services + 1 {
            return;
        }
        let last = (0..self.svcs.len() as u32).find(|&s| {
            let svc = &self.svcs[s as usize];
            svc.node as usize == n
                && matches!(svc.state, SvcState::Awake | SvcState::Frozen)
                && svc.in_system == 0
        });
        if let Some(s) = last {
            self.governor_check_at(s, self.now);
        }
    }

    fn on_prewarm(&mut self, s: u32, gen: u32) {
        let svc = &self.svcs[s as usize];
        if svc.gen == gen && svc.state == SvcState::Asleep {
            self.wake(s);
        }
    }

    /// The node `s` wakes on (restore anywhere): the fullest awake node of its group with room
    /// (one being drained only if no other has room), else one on its way up, else a sleeping
    /// one (its last node first); its last node if none has room.
    fn place(&self, s: u32) -> usize {
        let svc = &self.svcs[s as usize];
        let home = svc.node as usize;
        let range = self.group_nodes[self.nodes[home].group as usize].clone();
        let fits = |n: usize| self.nodes[n].placed_bytes + svc.footprint <= self.nodes[n].memory;
        let up = range
            .clone()
            .filter(|&n| self.nodes[n].state == NodeState::Up && fits(n))
            .max_by_key(|&n| {
                let node = &self.nodes[n];
                (!node.draining, node.placed_bytes, std::cmp::Reverse(n))
            });
        let rank = |state: NodeState| match state {
            NodeState::Resuming => 0,
            NodeState::Entering => 1,
            _ => 2,
        };
        up.or_else(|| {
            range
                .filter(|&n| fits(n))
                .min_by_key(|&n| (rank(self.nodes[n].state), n != home, n))
        })
        .unwrap_or(home)
    }

    fn wake(&mut self, s: u32) {
        if self.cfg.restore == RestoreMode::Anywhere {
            let n = self.place(s);
            let svc = &mut self.svcs[s as usize];
            svc.node = n as u32;
            let node = &mut self.nodes[n];
            node.services += 1;
            node.members.insert(s);
            node.placed_bytes += svc.footprint;
            // Waking on a draining node means no other has room: the drain is given up.
            node.draining = false;
        }
        let n = self.svcs[s as usize].node as usize;
        self.set_state(s, SvcState::Waking);
        let svc = &mut self.svcs[s as usize];
        svc.gen += 1;
        svc.waking_on_a_sleeping_node = self.nodes[n].state != NodeState::Up;
        self.restores += 1;
        match self.nodes[n].state {
            NodeState::Up => self.submit(s, self.now, Work::Restore),
            _ => {
                self.nodes[n].waiting.push(s);
                match self.nodes[n].state {
                    NodeState::Asleep => self.resume_node(n),
                    NodeState::Entering => self.nodes[n].resume_pending = true,
                    _ => {}
                }
            }
        }
    }

    fn restored(&mut self, s: u32) {
        let n = self.svcs[s as usize].node as usize;
        self.settle(n);
        self.set_state(s, SvcState::Awake);
        let svc = &mut self.svcs[s as usize];
        self.nodes[n].resident_bytes += svc.footprint;
        if self.cfg.restore == RestoreMode::InPlace {
            self.nodes[n].asleep_services -= 1;
        }
        let held = std::mem::take(&mut svc.held);
        if std::mem::take(&mut svc.waking_on_a_sleeping_node) {
            self.waited_for_a_node += held.len() as u64;
        }
        if let Some(t) = svc.tracker.as_mut() {
            t.mark_active(dur(self.now));
        }
        for arrival in &held {
            self.submit(s, *arrival, Work::Request);
        }
        if held.is_empty() {
            self.on_service_idle(s);
        }
    }

    /// Starts the node's sleep timer or (PowerNap) its nap when nothing runs on it.
    fn maybe_node_idle(&mut self, n: usize) {
        let node = &self.nodes[n];
        if node.state != NodeState::Up || node.busy > 0 || !node.queue.is_empty() {
            return;
        }
        match (self.cfg.policy, self.cfg.node_sleep_after) {
            (PolicyName::Powernap, _) => self.enter_node_sleep(n),
            (p, Some(after)) if p.sleeps_services() && node.asleep_services == node.services => {
                self.nodes[n].gen += 1;
                let gen = self.nodes[n].gen;
                self.push(
                    self.now + after.as_secs_f64(),
                    Kind::NodeSleep,
                    n as u32,
                    gen,
                    0.0,
                );
            }
            _ => {}
        }
    }

    fn on_node_sleep_timer(&mut self, n: u32, gen: u32) {
        let node = &self.nodes[n as usize];
        if node.gen == gen
            && node.state == NodeState::Up
            && node.busy == 0
            && node.queue.is_empty()
            && node.asleep_services == node.services
        {
            self.enter_node_sleep(n as usize);
        }
    }

    fn enter_node_sleep(&mut self, n: usize) {
        self.settle(n);
        let deep = self.deep_idle();
        let node = &mut self.nodes[n];
        let p = &self.power[node.group as usize];
        node.end_all_idle(p, self.now, deep);
        node.state = NodeState::Entering;
        node.draining = false;
        node.gen += 1;
        self.node_sleeps += 1;
        let t = self.now + p.entry_s;
        self.push(t, Kind::NodeEntered, n as u32, 0, 0.0);
    }

    fn on_node_entered(&mut self, n: u32) {
        let n = n as usize;
        self.settle(n);
        self.nodes[n].state = NodeState::Asleep;
        if std::mem::take(&mut self.nodes[n].resume_pending) {
            self.resume_node(n);
        }
    }

    fn resume_node(&mut self, n: usize) {
        self.settle(n);
        let node = &mut self.nodes[n];
        node.state = NodeState::Resuming;
        let t = self.now + self.power[node.group as usize].resume_s;
        self.push(t, Kind::NodeResumed, n as u32, 0, 0.0);
    }

    fn on_node_resumed(&mut self, n: u32) {
        let n = n as usize;
        self.settle(n);
        let node = &mut self.nodes[n];
        node.state = NodeState::Up;
        node.idle_cores = vec![self.now; node.cores as usize];
        for s in std::mem::take(&mut node.waiting) {
            self.submit(s, self.now, Work::Restore);
        }
        while !self.nodes[n].idle_cores.is_empty() {
            let Some(job) = self.nodes[n].queue.pop_front() else {
                break;
            };
            self.start(n, job);
        }
        self.maybe_node_idle(n);
    }

    /// Restore anywhere's consolidation pass: in each group with no drain under way, the awake
    /// node holding the least memory is drained if the other awake nodes have room for all it
    /// holds (its idle services migrate now, busy ones when they next fall idle).
    fn on_consolidate(&mut self) {
        for g in 0..self.group_nodes.len() {
            let range = self.group_nodes[g].clone();
            for n in range.clone() {
                let node = &mut self.nodes[n];
                if node.state != NodeState::Up || node.services == 0 {
                    node.draining = false;
                }
            }
            if range.clone().any(|n| self.nodes[n].draining) {
                continue;
            }
            let occupied: Vec<usize> = range
                .filter(|&n| self.nodes[n].state == NodeState::Up && self.nodes[n].services > 0)
                .collect();
            let Some(&source) = occupied
                .iter()
                .min_by_key(|&&n| (self.nodes[n].placed_bytes, n))
            else {
                continue;
            };
            let room: u64 = occupied
                .iter()
                .filter(|&&n| n != source)
                .map(|&n| {
                    self.nodes[n]
                        .memory
                        .saturating_sub(self.nodes[n].placed_bytes)
                })
                .sum();
            if room < self.nodes[source].placed_bytes {
                continue;
            }
            self.nodes[source].draining = true;
            for s in 0..self.svcs.len() {
                let svc = &self.svcs[s];
                if svc.node as usize == source
                    && matches!(svc.state, SvcState::Awake | SvcState::Frozen)
                    && svc.in_system == 0
                {
                    self.migrate(s as u32);
                }
            }
        }
        let t = self.now + self.cfg.consolidate_every.as_secs_f64();
        if t < self.end {
            self.push(t, Kind::Consolidate, 0, 0, 0.0);
        }
    }

    fn report(&self, wall_s: f64) -> SimReport {
        let mut groups = Vec::new();
        for (g, group) in self.cfg.nodes.iter().enumerate() {
            let nodes: Vec<&Node> = self
                .nodes
                .iter()
                .filter(|n| n.group as usize == g)
                .collect();
            let idle: f64 = nodes.iter().map(|n| n.idle_time).sum();
            let periods: u64 = nodes.iter().map(|n| n.idle_periods).sum();
            let energy: f64 = nodes.iter().map(|n| n.energy_j).sum();
            let asleep: f64 = nodes.iter().map(|n| n.asleep_time).sum();
            let core_time = self.end * f64::from(group.cores) * nodes.len() as f64;
            groups.push(GroupReport {
                name: group.name.clone(),
                nodes: group.count,
                idle_fraction: idle / core_time.max(1e-12),
                mean_idle_period_s: idle / periods.max(1) as f64,
                asleep_fraction: asleep / (self.end * nodes.len() as f64).max(1e-12),
                energy_j: energy,
                mean_power_w: energy / self.end.max(1e-12),
            });
        }
        let energy_j: f64 = groups.iter().map(|g| g.energy_j).sum();
        let service_groups = self
            .cfg
            .services
            .iter()
            .zip(&self.level_s)
            .map(|(g, s)| {
                let total = s.iter().sum::<f64>().max(1e-12);
                ServiceGroupReport {
                    name: g.name.clone(),
                    services: g.count,
                    frozen_fraction: s[Level::Frozen as usize] / total,
                    snapshotted_fraction: s[Level::Snapshotted as usize] / total,
                }
            })
            .collect();
        SimReport {
            policy: self.cfg.policy.as_str(),
            restore: self.cfg.restore.as_str(),
            approach: self.cfg.approach.as_str(),
            seed: self.cfg.seed,
            simulated_s: self.end,
            nodes: self.nodes.len() as u32,
            services: self.svcs.len() as u32,
            events: self.events,
            wall_s,
            events_per_s: self.events as f64 / wall_s.max(1e-9),
            node_groups: groups,
            energy_j,
            mean_power_w: energy_j / self.end.max(1e-12),
            requests: self.latency_us.len(),
            latency: Percentiles::of(&self.latency_us),
            found_asleep: self.found_asleep,
            checkpoints: self.checkpoints,
            restores: self.restores,
            node_sleeps: self.node_sleeps,
            waited_for_a_node: self.waited_for_a_node,
            migrations: self.migrations,
            freezes: self.freezes,
            found_frozen: self.found_frozen,
            idle_cost_j: self.nodes.iter().map(|n| n.idle_cost_j).sum(),
            service_groups,
        }
    }
}

/// Idle gap beyond which a snapshot pays for its checkpoint and restore: their CPU energy over
/// the power the service's sleep saves, plus the time they take. What it saves is its memory,
/// and with `node_share` also its share (among `services` on the node) of the node's up-versus-
/// suspended power, which it only gets if the whole node sleeps.
fn break_even_for(
    cfg: &SimConfig,
    p: &NodePower,
    services: u32,
    footprint: u64,
    node_share: bool,
) -> f64 {
    let (c, r) = cfg.cr_times(footprint);
    let cost_j = (c + r) * p.active_w;
    let mut saved_w = p.per_gib_w * footprint as f64 / (1u64 << 30) as f64;
    if node_share {
        saved_w += (p.base_w - p.suspend_w).max(0.0) / f64::from(services.max(1));
    }
    cost_j / saved_w.max(1e-9) + c + r
}

/// The break-even idle period of a service of `footprint` bytes on node group `group`, with the
/// services placed as the configuration places them (see [`break_even_for`] for `node_share`).
pub fn break_even_s(cfg: &SimConfig, group: usize, footprint: u64, node_share: bool) -> f64 {
    let g = &cfg.nodes[group];
    let per_node: u32 = cfg
        .services
        .iter()
        .filter(|s| s.node_group == group)
        .map(|s| s.count)
        .sum::<u32>()
        / g.count.max(1);
    break_even_for(
        cfg,
        &NodePower::new(&g.profile, g.cores),
        per_node,
        footprint,
        node_share,
    )
}

/// Runs `cfg` to the end.
pub fn simulate(cfg: &SimConfig) -> SimReport {
    Sim::new(cfg).run()
}
