//! The node's power, driven by the services' sleeps and wakes: the knobs (consolidate awake
//! services onto few cores with cpusets, deep idle or offline for the cores left free, a PM QoS
//! request while a service wakes, node sleep hooks once every service has slept long enough)
//! and the energy account sampled every second.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use thiserror::Error;
use torpor_power::{
    energy::{Activity, EnergyAccount, EnergyReport, ServiceUsage},
    knobs::{self, consolidate, KnobError, KnobRoots, Knobs},
    HostRoots, Profile, Sample, TelemetryError,
};
use tracing::{info, warn};

/// What the agent does about power.
#[derive(Debug, Clone)]
pub struct NodePowerConfig {
    /// Models power where RAPL is missing, and prices the counterfactual.
    pub profile: Profile,
    /// Where telemetry is read (`/sys`, `/proc`).
    pub telemetry: HostRoots,
    /// The knobs to turn; `None` leaves the node's settings alone.
    pub knobs: Option<KnobConfig>,
}

/// Which knobs are on.
#[derive(Debug, Clone)]
pub struct KnobConfig {
    pub roots: KnobRoots,
    /// Write-ahead record of changes, undone at the next start after a crash.
    pub journal: PathBuf,
    /// Log what would be done, change nothing.
    pub dry_run: bool,
    /// Awake services share the fewest cores their CPU demand needs.
    pub consolidate: bool,
    /// Cores left free keep only their deepest idle state.
    pub deep_idle: bool,
    /// Cores left free go offline.
    pub offline: bool,
    /// Hold this CPU latency (µs) through PM QoS while a service wakes.
    pub wake_latency_us: Option<i32>,
    pub node_sleep: Option<NodeSleepHooks>,
    /// Consolidation packs cores to this utilisation.
    pub target_utilisation: f64,
}

/// Commands run when every service has been asleep for `after` and the next request is
/// predicted beyond the node's suspend break-even, and on the next wake.
#[derive(Debug, Clone)]
pub struct NodeSleepHooks {
    pub sleep: Vec<String>,
    pub wake: Vec<String>,
    pub after: Duration,
    /// Only log the hooks (the other knobs may be real): the account still prices the sleep
    /// at the profile's suspend power, labelled a dry run, so that what a node sleep would
    /// save can be read on a machine that must stay up.
    pub dry_run: bool,
}

/// Whether the node sleeps, as the energy account and a benchmark's own account see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Up,
    Asleep {
        /// The hook was not run (a dry run): the sleep is credited, the node stayed up.
        dry_run: bool,
    },
}

/// How many node sleeps began and ended since the agent started (for a benchmark's own
/// account, which charges each transition in the interval it happens in).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeTransitions {
    pub sleeps: u64,
    pub resumes: u64,
}

/// Why node power could not start.
#[derive(Debug, Error)]
pub enum NodePowerError {
    #[error("cannot read telemetry")]
    Telemetry(#[from] TelemetryError),
    #[error("cannot take over the power knobs")]
    Knobs(#[from] KnobError),
}

/// An awake service as consolidation sees it.
#[derive(Debug, Clone)]
pub(crate) struct AwakeService {
    pub name: String,
    pub pids: Vec<i32>,
    /// CPUs of work it recently used.
    pub demand_cpus: f64,
    /// Its own cgroup, when it has one: on a unified hierarchy holding the cpusets it is
    /// limited there, so its processes stay where freezing and accounting find them.
    pub cgroup: Option<PathBuf>,
}

/// One service's cpuset as the last settle left it.
#[derive(Debug, Default)]
struct InForce {
    cores: BTreeSet<usize>,
    /// Its processes moved into torpor's cpuset (none when it is limited in place).
    moved: BTreeSet<i32>,
    /// Its own cgroup, when that is what holds the limit: lifted when it starts or is
    /// restored, so that it is not held to the cores of a plan made before it slept.
    in_place: Option<PathBuf>,
}

#[derive(Debug)]
struct KnobState {
    config: KnobConfig,
    knobs: Knobs,
    online: BTreeSet<usize>,
    /// Cores currently given deep-idle-only or offline treatment.
    freed: BTreeSet<usize>,
    /// What the last settles put in force per service in the plan, so that a settle that
    /// changes nothing writes nothing (each write to `cgroup.procs` takes the cgroup core's
    /// global lock and an RCU grace period, and every thaw settles). Forgotten when the
    /// service starts or is restored ([`NodePower::forget`]: its tree is back in its own
    /// cgroup, maybe under the same pids), when it is out of the plan at a settle, and when a
    /// write failed.
    in_force: HashMap<String, InForce>,
    /// Services waking now (the PM QoS request is held while any is).
    waking: usize,
    all_asleep_since: Option<Instant>,
    /// The node sleep hook ran (or, in a dry run, would have) and no wake came since.
    node_asleep: bool,
    /// That sleep is a dry run.
    node_asleep_dry_run: bool,
    /// Node sleeps that began and that ended since the last energy sample (each charged its
    /// entry or its resume).
    node_sleeps: u32,
    node_resumes: u32,
    /// The same since the start.
    transitions: NodeTransitions,
}

/// A wake or start in progress, from [`NodePower::waking`].
#[must_use = "the wake ends when this is dropped"]
pub(crate) struct Waking<'a>(&'a NodePower);

impl Drop for Waking<'_> {
    fn drop(&mut self) {
        self.0.after_wake();
    }
}

/// The node's power side, shared by the service loops and the node loop.
#[derive(Debug)]
pub(crate) struct NodePower {
    telemetry: HostRoots,
    knobs: Option<Mutex<KnobState>>,
    account: Mutex<EnergyAccount>,
    /// torpor's own CPU (self + reaped children) at the last sample.
    last_process_cpu_s: Mutex<f64>,
    /// The profile's prices, for the governor.
    model: torpor_policy::EnergyModel,
    /// What a node sleep saves here and when it pays; `None` without node sleep hooks.
    node_sleep: Option<torpor_power::NodeSleepEconomics>,
}

fn cpu_s(who: nix::sys::resource::UsageWho) -> f64 {
    nix::sys::resource::getrusage(who).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// torpor's own CPU-seconds and those of the children it reaped (CRIU among them).
pub(crate) fn process_cpu_s() -> f64 {
    use nix::sys::resource::UsageWho;
    cpu_s(UsageWho::RUSAGE_SELF) + cpu_s(UsageWho::RUSAGE_CHILDREN)
}

/// CPU-seconds of the calling thread: what a synchronous step cost, without the work other
/// threads did meanwhile. From the thread's CPU clock, which counts the running stretch up to
/// now (its rusage counts only up to the last tick or switch: a look of a few hundred
/// microseconds reads as nothing).
pub(crate) fn thread_cpu_s() -> f64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

impl NodePower {
    pub fn start(config: NodePowerConfig) -> Result<NodePower, NodePowerError> {
        let first = Sample::take(&config.telemetry)?;
        let node_sleep = config
            .knobs
            .as_ref()
            .and_then(|k| k.node_sleep.as_ref())
            .map(|_| torpor_power::Model::new(&config.profile).node_sleep(first.cpus.len(), 0.0));
        let online: BTreeSet<usize> = first.cpus.iter().map(|c| c.cpu).collect();
        let knobs = match config.knobs {
            Some(kc) => {
                let wake_hook = kc.node_sleep.as_ref().map(|h| h.wake.as_slice());
                let (knobs, undone) =
                    Knobs::open(kc.roots.clone(), &kc.journal, kc.dry_run, wake_hook)?;
                for u in &undone {
                    info!(change = %u, "undid a change left by a previous run");
                }
                Some(Mutex::new(KnobState::new(kc, knobs, online)))
            }
            None => None,
        };
        Ok(NodePower {
            telemetry: config.telemetry,
            knobs,
            model: config.profile.energy_model(),
            node_sleep,
            account: Mutex::new(EnergyAccount::start(config.profile, first)),
            last_process_cpu_s: Mutex::new(process_cpu_s()),
        })
    }

    /// Holds the node up for a restore or start until the guard is dropped: the node is woken,
    /// freed cores come back and the latency request is held, so the restore has cores that
    /// answer fast. A drop ends it even when the wake's future is cancelled or panics, which
    /// would otherwise leave every later settle and node sleep held off.
    pub fn waking(&self) -> Waking<'_> {
        self.before_wake();
        Waking(self)
    }

    fn before_wake(&self) {
        let Some(state) = &self.knobs else { return };
        let mut s = state.lock().expect("knob lock");
        s.waking += 1;
        s.all_asleep_since = None;
        s.wake_node();
        if let Some(us) = s.config.wake_latency_us {
            if !s.knobs.holds_latency() {
                if let Err(e) = s.knobs.hold_latency(us) {
                    warn!(error = %e, "cannot hold the PM QoS request");
                }
            }
        }
        let freed = std::mem::take(&mut s.freed);
        for cpu in freed {
            give_back(&mut s.knobs, cpu);
        }
    }

    /// A wake finished (well or not).
    fn after_wake(&self) {
        let Some(state) = &self.knobs else { return };
        // Also run while a panicking wake unwinds: a second panic here would abort.
        let mut s = state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.waking = s.waking.saturating_sub(1);
        if s.waking == 0 {
            s.knobs.release_latency();
        }
    }

    /// The services whose processes consolidation moved into torpor's cpusets (no own
    /// cgroup that could hold one), which the stop removes.
    pub fn moved_into_cpusets(&self) -> Vec<String> {
        self.knobs.as_ref().map_or_else(Vec::new, |s| {
            s.lock().expect("knob lock").moved_into_cpusets()
        })
    }

    /// `name` is starting or being restored: its processes will be in its own cgroup, so the
    /// next settle puts them on the planned cores again.
    pub fn forget(&self, name: &str) {
        if let Some(state) = &self.knobs {
            state.lock().expect("knob lock").forget(name);
        }
    }

    /// Re-plans the cores for the services awake (or frozen) now.
    pub fn settle(&self, awake: &[AwakeService]) {
        let Some(state) = &self.knobs else { return };
        let mut s = state.lock().expect("knob lock");
        if s.waking > 0 {
            return; // the wake's own settle comes after it
        }
        let demand: Vec<f64> = awake.iter().map(|a| a.demand_cpus).collect();
        let plan = consolidate(&s.online, &demand, s.config.target_utilisation);
        if s.config.consolidate {
            s.in_force
                .retain(|name, _| awake.iter().any(|a| a.name == *name));
            for a in awake {
                let r = s.put_on(a, &plan.used);
                if let Err(e) = r {
                    warn!(service = %a.name, error = %e, "cannot consolidate");
                }
            }
        }
        let back: Vec<usize> = s.freed.difference(&plan.free).copied().collect();
        for cpu in back {
            give_back(&mut s.knobs, cpu);
            s.freed.remove(&cpu);
        }
        let (deep, offline) = (s.config.deep_idle, s.config.offline);
        let newly: Vec<usize> = plan.free.difference(&s.freed).copied().collect();
        for cpu in newly {
            if deep {
                if let Err(e) = s.knobs.deep_idle_only(cpu) {
                    warn!(cpu, error = %e, "cannot leave the core deep idle only");
                }
            }
            if offline {
                if let Err(e) = s.knobs.take_offline(cpu) {
                    warn!(cpu, error = %e, "cannot take the core offline");
                }
            }
            s.freed.insert(cpu);
        }
        info!(used = %torpor_power::cpulist::format(&plan.used), free = %torpor_power::cpulist::format(&s.freed), awake = awake.len(), "cores planned");
    }

    /// Every second: the energy account, and node sleep once everything slept long enough and
    /// the next request (`next_arrival`: the soonest any service's history predicts) is far
    /// enough off for a sleep to pay.
    pub fn tick(
        &self,
        services: Vec<ServiceUsage>,
        ended_lives_cpu_s: f64,
        all_asleep: bool,
        next_arrival: Option<Duration>,
    ) {
        let state = self.node_sleep_check(all_asleep, next_arrival);
        let (node_sleeps, node_resumes) = self.knobs.as_ref().map_or((0, 0), |k| {
            let mut s = k.lock().expect("knob lock");
            (
                std::mem::take(&mut s.node_sleeps),
                std::mem::take(&mut s.node_resumes),
            )
        });
        let sample = match Sample::take(&self.telemetry) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "telemetry sample failed");
                return;
            }
        };
        let now = process_cpu_s();
        let torpor_cpu_s = {
            let mut last = self.last_process_cpu_s.lock().expect("cpu lock");
            // Our children include the services we reaped: their share is theirs, not ours.
            let d = (now - *last - ended_lives_cpu_s).max(0.0);
            *last = now;
            d
        };
        self.account.lock().expect("account lock").record(
            sample,
            &Activity {
                services,
                torpor_cpu_s,
                node_asleep: state != NodeState::Up,
                node_asleep_dry_run: state == NodeState::Asleep { dry_run: true },
                node_sleeps,
                node_resumes,
                all_asleep,
            },
        );
    }

    /// Whether the node sleeps now (really, or credited in a dry run), running the hook when
    /// it is time.
    fn node_sleep_check(&self, all_asleep: bool, next_arrival: Option<Duration>) -> NodeState {
        let Some(state) = &self.knobs else {
            return NodeState::Up;
        };
        let mut s = state.lock().expect("knob lock");
        if !all_asleep || s.waking > 0 {
            s.all_asleep_since = None;
            if !all_asleep && s.waking == 0 && s.node_asleep {
                // A service is awake that no wake brought (one added by a reload, say): a
                // node cannot sleep under it.
                info!("a service is awake while the node sleeps; waking the node");
                s.wake_node();
            }
            return s.node_state();
        }
        let since = *s.all_asleep_since.get_or_insert_with(Instant::now);
        let Some(hooks) = s.config.node_sleep.clone() else {
            return NodeState::Up;
        };
        let pays = match (self.node_sleep, next_arrival) {
            (Some(e), Some(next)) => next.as_secs_f64() >= e.break_even_s,
            // No service: nothing will cut the sleep short.
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !s.node_asleep && since.elapsed() >= hooks.after && pays {
            let dry_run = hooks.dry_run || s.config.dry_run;
            let slept = if hooks.dry_run {
                info!(command = ?hooks.sleep, "dry run: would run the node sleep hook");
                Ok(())
            } else {
                s.knobs.node_sleep(&hooks.sleep)
            };
            match slept {
                Ok(()) => {
                    info!(next_arrival_s = ?next_arrival.map(|d| d.as_secs_f64()), break_even_s = ?self.node_sleep.map(|e| e.break_even_s), dry_run, "node asleep");
                    s.node_asleep = true;
                    s.node_asleep_dry_run = dry_run;
                    s.node_sleeps += 1;
                    s.transitions.sleeps += 1;
                }
                Err(e) => warn!(error = %e, "node sleep hook failed; the node stays up"),
            }
        }
        s.node_state()
    }

    /// Whether the node sleeps now, and how many of its sleeps have begun and ended so far.
    pub fn state(&self) -> (NodeState, NodeTransitions) {
        self.knobs
            .as_ref()
            .map_or((NodeState::Up, NodeTransitions::default()), |k| {
                let s = k.lock().expect("knob lock");
                (s.node_state(), s.transitions)
            })
    }

    /// What a node sleep would save and when it pays; `None` without node sleep hooks.
    pub fn node_sleep(&self) -> Option<torpor_power::NodeSleepEconomics> {
        self.node_sleep
    }

    /// How the governor prices CPU time, wakeups and memory on this node.
    pub fn energy_model(&self) -> torpor_policy::EnergyModel {
        self.model
    }

    pub fn energy(&self) -> EnergyReport {
        self.account.lock().expect("account lock").report().clone()
    }

    /// Knob changes in force now, for `torpor status`.
    pub fn knob_changes(&self) -> Vec<String> {
        self.knobs.as_ref().map_or_else(Vec::new, |k| {
            k.lock()
                .expect("knob lock")
                .knobs
                .changes()
                .iter()
                .map(knobs::describe)
                .collect()
        })
    }

    /// Puts every knob back (shutdown).
    pub fn restore_all(&self) {
        let Some(state) = &self.knobs else { return };
        let mut s = state.lock().expect("knob lock");
        match s.knobs.undo_all() {
            Ok(n) if n > 0 => info!(changes = n, "power knobs restored"),
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "some power knobs could not be restored; the journal keeps them for the next start")
            }
        }
        s.freed.clear();
    }
}

impl KnobState {
    /// Nothing freed, put in force or asleep yet, with `online` the cores up at the start.
    fn new(config: KnobConfig, knobs: Knobs, online: BTreeSet<usize>) -> KnobState {
        KnobState {
            config,
            knobs,
            online,
            freed: BTreeSet::new(),
            in_force: HashMap::new(),
            waking: 0,
            all_asleep_since: None,
            node_asleep: false,
            node_asleep_dry_run: false,
            node_sleeps: 0,
            node_resumes: 0,
            transitions: NodeTransitions::default(),
        }
    }

    /// Runs the node wake hook (or says it would) if the node sleeps, counting the resume.
    fn wake_node(&mut self) {
        if !self.node_asleep {
            return;
        }
        self.node_asleep = false;
        self.node_resumes += 1;
        self.transitions.resumes += 1;
        if self.node_asleep_dry_run {
            info!("dry run: would run the node wake hook");
        } else if let Err(e) = self.knobs.node_wake() {
            warn!(error = %e, "node wake hook failed");
        }
    }

    fn moved_into_cpusets(&self) -> Vec<String> {
        let mut moved: Vec<String> = self
            .in_force
            .iter()
            .filter(|(_, f)| !f.moved.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        moved.sort();
        moved
    }

    fn forget(&mut self, name: &str) {
        let Some(InForce {
            in_place: Some(own),
            ..
        }) = self.in_force.remove(name)
        else {
            return;
        };
        if let Err(e) = self.knobs.lift_cpuset_in_place(&own) {
            warn!(service = name, error = %e, "cannot lift the cpuset of its cgroup");
        }
    }

    /// Puts `a` on `cpus`: its cpuset when the cores changed, and those of its processes
    /// not moved there yet. With the cpusets on the unified hierarchy a service with its own
    /// cgroup is limited there and never moved (out of the cgroup that freezes, kills and
    /// accounts for it); without one, or with legacy cpusets, its processes are moved.
    fn put_on(&mut self, a: &AwakeService, cpus: &BTreeSet<usize>) -> Result<(), KnobError> {
        let in_place = a.cgroup.clone().filter(|_| self.knobs.cpusets_unified());
        let f = self.in_force.entry(a.name.clone()).or_default();
        f.moved.retain(|p| a.pids.contains(p));
        let put = || -> Result<(), KnobError> {
            if let Some(own) = in_place {
                if f.cores != *cpus {
                    self.knobs.cpuset_in_place(&own, cpus)?;
                    f.cores = cpus.clone();
                    f.in_place = Some(own);
                }
                return Ok(());
            }
            if f.cores != *cpus {
                self.knobs.cpuset(&a.name, cpus)?;
                f.cores = cpus.clone();
            }
            let new: Vec<i32> = a
                .pids
                .iter()
                .copied()
                .filter(|p| !f.moved.contains(p))
                .collect();
            if !new.is_empty() {
                self.knobs.attach(&a.name, &new)?;
                f.moved.extend(new);
            }
            Ok(())
        };
        let r = put();
        if r.is_err() {
            // Nothing is known of what the failed write left (a cgroup removed under it?).
            self.in_force.remove(&a.name);
        }
        r
    }

    fn node_state(&self) -> NodeState {
        if self.node_asleep {
            NodeState::Asleep {
                dry_run: self.node_asleep_dry_run,
            }
        } else {
            NodeState::Up
        }
    }
}

fn give_back(knobs: &mut Knobs, cpu: usize) {
    if let Err(e) = knobs
        .bring_online(cpu)
        .and_then(|()| knobs.restore_idle_states(cpu))
    {
        warn!(cpu, error = %e, "cannot give the core back");
    }
}

#[cfg(test)]
mod tests {
    //! Consolidation's writes, on a fake cgroup tree.

    use std::{fs, path::Path};

    use super::*;

    fn knob_state(root: &Path) -> KnobState {
        let put = |p: PathBuf, v: &str| {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, v).unwrap();
        };
        put(root.join("cgroup/cpuset/cpuset.cpus"), "0-1\n");
        put(root.join("cgroup/cpuset/cpuset.mems"), "0\n");
        put(root.join("cgroup/cpuset/cgroup.procs"), "");
        let roots = KnobRoots::under(root);
        let journal = root.join("journal");
        let (knobs, _) = Knobs::open(roots.clone(), &journal, false, None).unwrap();
        KnobState::new(
            KnobConfig {
                roots,
                journal,
                dry_run: false,
                consolidate: true,
                deep_idle: false,
                offline: false,
                wake_latency_us: None,
                node_sleep: None,
                target_utilisation: 0.8,
            },
            knobs,
            [0, 1].into(),
        )
    }

    #[test]
    fn a_settle_that_changes_nothing_writes_nothing() {
        let tree = tempfile::tempdir().unwrap();
        let mut s = knob_state(tree.path());
        let dir = tree.path().join("cgroup/cpuset/torpor/web");
        let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap().trim().to_string();
        let mut web = AwakeService {
            name: "web".into(),
            pids: vec![10, 11],
            demand_cpus: 0.1,
            cgroup: None,
        };
        s.put_on(&web, &[0].into()).unwrap();
        assert_eq!(read("cpuset.cpus"), "0");
        assert_eq!(
            read("cgroup.procs"),
            "11",
            "each process moved, the last one last"
        );
        // The same cores and processes again: neither file is written.
        fs::write(dir.join("cpuset.cpus"), "untouched").unwrap();
        fs::write(dir.join("cgroup.procs"), "untouched").unwrap();
        s.put_on(&web, &[0].into()).unwrap();
        assert_eq!(read("cpuset.cpus"), "untouched");
        assert_eq!(read("cgroup.procs"), "untouched");
        // A new process is moved, alone; new cores are written.
        web.pids.insert(0, 12);
        s.put_on(&web, &[0].into()).unwrap();
        assert_eq!(
            read("cgroup.procs"),
            "12",
            "11, the last, was not written again"
        );
        assert_eq!(read("cpuset.cpus"), "untouched");
        s.put_on(&web, &[0, 1].into()).unwrap();
        assert_eq!(read("cpuset.cpus"), "0-1");
        // Forgotten (restored under the same pids): everything is written again.
        s.in_force.remove("web");
        fs::write(dir.join("cgroup.procs"), "untouched").unwrap();
        fs::write(dir.join("cpuset.cpus"), "untouched").unwrap();
        s.put_on(&web, &[0, 1].into()).unwrap();
        assert_eq!(read("cgroup.procs"), "11");
        assert_eq!(read("cpuset.cpus"), "0-1");
        // A failed write forgets it too: the cgroup went away under it.
        fs::remove_dir_all(&dir).unwrap();
        fs::create_dir_all(dir.join("cpuset.cpus")).unwrap();
        s.put_on(&web, &[0].into()).unwrap_err();
        assert!(!s.in_force.contains_key("web"));
    }

    #[test]
    fn a_service_with_its_own_unified_cgroup_is_limited_there_and_never_moved() {
        let tree = tempfile::tempdir().unwrap();
        let cg = tree.path().join("cgroup");
        fs::create_dir_all(&cg).unwrap();
        // A unified-only host: the services' cgroups and the cpusets share one hierarchy.
        fs::write(cg.join("cgroup.controllers"), "cpuset cpu\n").unwrap();
        let own = cg.join("torpor-services/web");
        fs::create_dir_all(&own).unwrap();
        fs::write(own.join("cgroup.procs"), "10\n11\n").unwrap();
        let mut s = knob_state(tree.path());
        let web = AwakeService {
            name: "web".into(),
            pids: vec![10, 11],
            demand_cpus: 0.1,
            cgroup: Some(own.clone()),
        };
        s.put_on(&web, &[1].into()).unwrap();
        let read = |f: &Path| fs::read_to_string(f).unwrap().trim().to_string();
        assert_eq!(read(&own.join("cpuset.cpus")), "1");
        assert_eq!(read(&own.join("cgroup.procs")), "10\n11", "nothing moved");
        assert!(!cg.join("torpor").exists(), "no cpuset of torpor's own");
        assert!(s.moved_into_cpusets().is_empty());
        // Restored: the limit of the old plan is lifted, and the next settle sets it again.
        s.forget("web");
        assert_eq!(read(&own.join("cpuset.cpus")), "");
        s.put_on(&web, &[1].into()).unwrap();
        assert_eq!(read(&own.join("cpuset.cpus")), "1");
        // Its cgroup gone for a moment: refused, and its processes not moved either.
        let gone = AwakeService {
            name: "gone".into(),
            pids: vec![30],
            cgroup: Some(cg.join("torpor-services/gone")),
            ..web.clone()
        };
        s.put_on(&gone, &[1].into()).unwrap_err();
        assert!(!cg.join("torpor/gone").exists());
        // Without a cgroup of its own it is moved, and said to be.
        let other = AwakeService {
            name: "other".into(),
            pids: vec![20],
            cgroup: None,
            ..web
        };
        s.put_on(&other, &[1].into()).unwrap();
        assert_eq!(read(&cg.join("torpor/other/cgroup.procs")), "20");
        assert_eq!(s.moved_into_cpusets(), vec!["other".to_string()]);
    }
}
