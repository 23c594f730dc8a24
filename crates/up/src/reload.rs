//! Live reload of `torpor.toml` (`torpor reload`, or SIGHUP to `torpor up`): the file is read
//! again and compared with what runs. Added services start behind new gates; removed ones are
//! drained (held and in-flight requests answered), stopped, and their snapshots deleted from
//! the pool; a changed one takes its hold-queue limits at once and the rest at its next wake
//! (restored from its snapshot, or started from its new command when how it starts changed);
//! a new listen address is a remove and an add. All or nothing: a file that does not parse or
//! check, or that changes what cannot change while `torpor up` runs (node-level keys, a
//! gate's connection limits), is refused with the key, and nothing of it is applied. Every
//! reload is logged and kept for `torpor status`; under systemd it is framed by `RELOADING=1`
//! and `READY=1`.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{net::TcpListener, sync::watch};
use torpor_agent::{Added, Agent};
use torpor_control::{HoldLimits, ServiceLink};
use tracing::{info, warn};

use crate::{
    config::{Config, ConfigError, ServiceConfig},
    notify::Notifier,
};

/// Sections of `torpor.toml` that only a restart of `torpor up` changes.
const NODE_SECTIONS: [&str; 5] = ["node", "pool", "status", "control", "power"];

/// Why a reload was refused (nothing of it was applied).
#[derive(Debug, Error)]
pub enum ReloadError {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error(
        "{key}: cannot change while torpor up runs; restart torpor up to change [{section}]{rest}"
    )]
    NodeKey {
        key: String,
        section: String,
        rest: String,
    },
    #[error("{key}: a gate's limits and protocol cannot change while it listens; restart torpor up, or give the service a new listen address")]
    GateKey { key: String },
    #[error("torpor up was started without a configuration file to read again")]
    NoFile,
    #[error("cannot listen on {addr} for service {service:?}")]
    Listen {
        addr: SocketAddr,
        service: String,
        #[source]
        source: std::io::Error,
    },
    #[error("torpor up is stopping")]
    Stopping,
}

/// What came of a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadOutcome {
    /// Every change is made (or scheduled for the changed services' next wakes).
    Applied,
    /// The file says what already runs.
    Unchanged,
    /// Nothing was applied: the file is invalid or changes what cannot change live.
    Refused,
    /// A step failed midway (an added service did not start, say): what the report lists
    /// was done, the rest was not.
    Failed,
}

impl ReloadOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Applied => "applied",
            ReloadOutcome::Unchanged => "unchanged",
            ReloadOutcome::Refused => "refused",
            ReloadOutcome::Failed => "failed",
        }
    }
}

/// When a changed service runs with its change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Applies {
    /// Only its hold-queue limits changed: the gate has them now.
    Now,
    /// From its next wake, which restores its snapshot (its state is kept).
    NextWake,
    /// From its next wake, which starts it from its (new) command: its snapshots are
    /// deleted, the state they hold has no place in the new program.
    NextWakeFresh,
}

/// A service the reload started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedService {
    pub name: String,
    /// Where its gate listens.
    pub listen: SocketAddr,
    /// The generation it was adopted asleep in, when the pool held one from an earlier run.
    pub adopted_generation: Option<u64>,
}

/// A service the reload stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedService {
    pub name: String,
    /// Requests still held or in flight at its drain deadline (cut).
    pub cut: usize,
    /// Whether its snapshots were deleted from the pool.
    pub snapshots_released: bool,
}

/// A service whose settings the reload changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedService {
    pub name: String,
    /// The keys that differ (`policy.idle_threshold`, `command`...).
    pub keys: Vec<String>,
    pub applies: Applies,
}

/// One reload, as `torpor reload` prints it and `torpor status` keeps the last one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Wall-clock time it began, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Who asked: `SIGHUP`, or the control endpoint's peer (`uid 0`, `token`).
    pub by: String,
    pub outcome: ReloadOutcome,
    /// Why it was refused or failed, naming the key when a key is at fault.
    pub error: Option<String>,
    pub added: Vec<AddedService>,
    pub removed: Vec<RemovedService>,
    pub changed: Vec<ChangedService>,
    pub took_s: f64,
}

impl ReloadReport {
    /// A sentence a line for the operator.
    pub fn render(&self) -> String {
        let mut out = match (&self.outcome, &self.error) {
            (ReloadOutcome::Refused, Some(e)) => format!("reload refused: {e}\n"),
            (ReloadOutcome::Failed, Some(e)) => format!("reload failed midway: {e}\n"),
            (ReloadOutcome::Unchanged, _) => "reload: nothing changed\n".to_string(),
            _ => "reload applied\n".to_string(),
        };
        for a in &self.added {
            let how = match a.adopted_generation {
                Some(g) => format!("adopted asleep in generation {g}"),
                None => "started".into(),
            };
            out += &format!("  added   {} on {} ({how})\n", a.name, a.listen);
        }
        for r in &self.removed {
            let snapshots = match r.snapshots_released {
                true => "snapshots released",
                false => "snapshots NOT released (see the log)",
            };
            let cut = match r.cut {
                0 => String::new(),
                n => format!(", {n} request(s) cut at the drain deadline"),
            };
            out += &format!("  removed {} ({snapshots}{cut})\n", r.name);
        }
        for c in &self.changed {
            let when = match c.applies {
                Applies::Now => "applied now",
                Applies::NextWake => "from its next wake (its state is kept)",
                Applies::NextWakeFresh => {
                    "from its next wake, started from its command (its snapshot is dropped)"
                }
            };
            out += &format!("  changed {} [{}]: {when}\n", c.name, c.keys.join(", "));
        }
        out
    }
}

/// What runs now, as the configuration said it: what a reload compares the file with.
#[derive(Debug, Clone)]
pub(crate) struct Applied {
    /// The services in the order they were configured.
    pub services: Vec<ServiceConfig>,
    /// Each service's table as written.
    tables: HashMap<String, toml::Table>,
    /// The node-level sections as written.
    node: toml::Table,
}

impl Applied {
    pub fn of(config: &Config) -> Applied {
        let mut node = config.written.clone();
        let tables = match node.remove("service") {
            Some(toml::Value::Array(list)) => config
                .services
                .iter()
                .zip(list)
                .filter_map(|(s, t)| match t {
                    toml::Value::Table(t) => Some((s.spec.name.clone(), t)),
                    _ => None,
                })
                .collect(),
            _ => HashMap::new(),
        };
        Applied {
            services: config.services.clone(),
            tables,
            node,
        }
    }
}

/// A changed service's change.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub config: ServiceConfig,
    pub keys: Vec<String>,
    /// New hold-queue limits for its gate, now.
    pub limits: Option<HoldLimits>,
    /// A new configuration for the agent from its next wake (`fresh`: from its command).
    pub respec: Option<bool>,
}

impl Change {
    fn applies(&self) -> Applies {
        match self.respec {
            Some(true) => Applies::NextWakeFresh,
            Some(false) => Applies::NextWake,
            None => Applies::Now,
        }
    }
}

/// What a reload is to do, worked out before anything is done.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub added: Vec<ServiceConfig>,
    pub removed: Vec<String>,
    pub changed: Vec<Change>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// How a changed service key takes effect.
#[derive(Debug, PartialEq, Eq)]
enum KeyKind {
    /// The gate's hold queue: now.
    Hold,
    /// Fixed while the gate listens: refused.
    Gate,
    /// How the service starts: its next wake starts it from its command.
    Launch,
    /// Policy and restore settings: from its next wake.
    Wake,
}

fn key_kind(key: &str) -> KeyKind {
    let first = key.split('.').next().unwrap_or(key);
    match first {
        "protocol" | "steering" | "max_connections" | "hold_body_limit" | "header_read_timeout" => {
            KeyKind::Gate
        }
        "command" | "bundle" | "cwd" | "env" | "user" | "group" | "rlimits" | "cpuset"
        | "backend" => KeyKind::Launch,
        _ if key == "policy.hold_queue" || key == "policy.hold_timeout" => KeyKind::Hold,
        _ => KeyKind::Wake,
    }
}

/// The keys (dotted, under `prefix`) whose values differ between two tables; a table on one
/// side and nothing on the other counts as an empty table, so that its keys are named.
fn differing(prefix: &str, old: &toml::Table, new: &toml::Table) -> Vec<String> {
    let empty = toml::Table::new();
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        let path = match prefix {
            "" => k.clone(),
            p => format!("{p}.{k}"),
        };
        match (old.get(k), new.get(k)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                out.extend(differing(&path, a, b))
            }
            (Some(toml::Value::Table(a)), None) => out.extend(differing(&path, a, &empty)),
            (None, Some(toml::Value::Table(b))) => out.extend(differing(&path, &empty, b)),
            _ => out.push(path),
        }
    }
    out
}

/// Compares what runs with a new configuration: what to add, remove and change, or why the
/// new one cannot be applied while `torpor up` runs.
pub(crate) fn plan(applied: &Applied, new: &Config) -> Result<Plan, ReloadError> {
    let next = Applied::of(new);
    let empty = toml::Table::new();
    for section in NODE_SECTIONS {
        let table = |t: &toml::Table| match t.get(section) {
            Some(toml::Value::Table(t)) => t.clone(),
            _ => empty.clone(),
        };
        let (old, new) = (table(&applied.node), table(&next.node));
        if let Some(key) = differing(section, &old, &new).into_iter().next() {
            let rest = key[section.len()..].to_string();
            return Err(ReloadError::NodeKey {
                key,
                section: section.into(),
                rest,
            });
        }
    }
    let mut plan = Plan::default();
    let running: BTreeMap<&str, &ServiceConfig> = applied
        .services
        .iter()
        .map(|s| (s.spec.name.as_str(), s))
        .collect();
    for (i, s) in new.services.iter().enumerate() {
        let name = s.spec.name.as_str();
        let Some(old) = running.get(name) else {
            plan.added.push(s.clone());
            continue;
        };
        if old.listen != s.listen {
            plan.removed.push(name.to_string());
            plan.added.push(s.clone());
            continue;
        }
        let keys: Vec<String> = differing(
            "",
            applied.tables.get(name).unwrap_or(&empty),
            next.tables.get(name).unwrap_or(&empty),
        )
        .into_iter()
        .filter(|k| k != "listen")
        .collect();
        if keys.is_empty() {
            continue;
        }
        if let Some(k) = keys.iter().find(|k| key_kind(k) == KeyKind::Gate) {
            return Err(ReloadError::GateKey {
                key: format!("service[{i}].{k}"),
            });
        }
        let kinds: Vec<KeyKind> = keys.iter().map(|k| key_kind(k)).collect();
        let limits = HoldLimits {
            depth: s.hold_queue,
            timeout: s.hold_timeout,
        };
        let respec = if kinds.contains(&KeyKind::Launch) {
            Some(true)
        } else if kinds.contains(&KeyKind::Wake) {
            Some(false)
        } else {
            None
        };
        let hold = kinds.contains(&KeyKind::Hold);
        // What runs keeps what the reload does not change: its gate's limits (a default
        // that moved with the number of services among them).
        let mut config = s.clone();
        config.gate = old.gate;
        config.protocol = old.protocol;
        config.spec.steering = old.spec.steering.clone();
        if !hold {
            config.hold_queue = old.hold_queue;
            config.hold_timeout = old.hold_timeout;
        }
        plan.changed.push(Change {
            config,
            keys,
            limits: hold.then_some(limits),
            respec,
        });
    }
    for s in &applied.services {
        if !new.services.iter().any(|n| n.spec.name == s.spec.name) {
            plan.removed.push(s.spec.name.clone());
        }
    }
    Ok(plan)
}

/// One service's gate as it runs.
#[derive(Debug)]
struct GateTask {
    link: Arc<ServiceLink>,
    /// Ends this gate alone (its service removed).
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl GateTask {
    /// Serves `listener` for `service` until its own stop or `node_stop`.
    fn spawn(
        listener: TcpListener,
        service: &ServiceConfig,
        link: Arc<ServiceLink>,
        node_stop: watch::Receiver<bool>,
    ) -> GateTask {
        let (stop, mut own) = watch::channel(false);
        let mut node_stop = node_stop;
        let task = tokio::spawn(torpor_gate::run(
            listener,
            service.protocol,
            service.spec.backend,
            link.clone(),
            service.gate,
            async move {
                tokio::select! {
                    _ = own.wait_for(|s| *s) => {}
                    _ = node_stop.wait_for(|s| *s) => {}
                }
            },
        ));
        GateTask { link, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The link a new gate and its service share.
pub(crate) fn link_for(s: &ServiceConfig) -> Arc<ServiceLink> {
    ServiceLink::new(
        &s.spec.name,
        HoldLimits {
            depth: s.hold_queue,
            timeout: s.hold_timeout,
        },
    )
}

/// What a reload changes, guarded so that reloads (and the stop) come one at a time.
#[derive(Debug)]
struct Running {
    applied: Applied,
    gates: HashMap<String, GateTask>,
    /// Set once `torpor up` stops: reloads are refused from then on.
    stopped: bool,
}

/// The last reload, shared with the status API.
pub type LastReload = Arc<Mutex<Option<ReloadReport>>>;

/// Reloads the configuration of a running `torpor up`.
#[derive(Debug)]
pub struct Reloader {
    agent: Arc<Agent>,
    /// The file to read again; `None` when `torpor up` was given a configuration in memory.
    path: Option<PathBuf>,
    running: tokio::sync::Mutex<Running>,
    node_stop: watch::Receiver<bool>,
    notifier: Notifier,
    last: LastReload,
}

impl Reloader {
    /// Takes over the gates that `torpor up` started (`gates`: each service's bound
    /// listener with its link), which stop at `node_stop`.
    pub(crate) fn start(
        agent: Arc<Agent>,
        config: &Config,
        path: Option<PathBuf>,
        gates: Vec<(TcpListener, Arc<ServiceLink>)>,
        node_stop: watch::Receiver<bool>,
        notifier: Notifier,
    ) -> Reloader {
        let gates = config
            .services
            .iter()
            .zip(gates)
            .map(|(s, (listener, link))| {
                let gate = GateTask::spawn(listener, s, link, node_stop.clone());
                (s.spec.name.clone(), gate)
            })
            .collect();
        Reloader {
            agent,
            path,
            running: tokio::sync::Mutex::new(Running {
                applied: Applied::of(config),
                gates,
                stopped: false,
            }),
            node_stop,
            notifier,
            last: Arc::default(),
        }
    }

    /// The last reload, for the status API.
    pub fn last(&self) -> LastReload {
        self.last.clone()
    }

    /// Reads the file again and applies what changed (see the module's description); `by`
    /// says who asked. The report is logged and kept for `torpor status` whatever came of it.
    pub async fn reload(&self, by: &str) -> ReloadReport {
        let t0 = Instant::now();
        let mut report = ReloadReport {
            at_unix_ms: torpor_agent::unix_ms_now(),
            by: by.to_string(),
            outcome: ReloadOutcome::Applied,
            error: None,
            added: Vec::new(),
            removed: Vec::new(),
            changed: Vec::new(),
            took_s: 0.0,
        };
        let say = |r: Result<(), crate::notify::NotifyError>| {
            if let Err(e) = r {
                warn!(error = %torpor_pool::error_chain(&e), "telling systemd failed");
            }
        };
        say(self.notifier.reloading("reloading the configuration"));
        let mut running = self.running.lock().await;
        let result = match running.stopped {
            true => Err(ReloadError::Stopping.into()),
            false => self.apply(&mut running, &mut report).await,
        };
        drop(running);
        match result {
            Ok(true) => {}
            Ok(false) => report.outcome = ReloadOutcome::Unchanged,
            Err(Step::Refused(e)) => {
                report.outcome = ReloadOutcome::Refused;
                report.error = Some(torpor_pool::error_chain(&e));
            }
            Err(Step::Failed(e)) => {
                report.outcome = ReloadOutcome::Failed;
                report.error = Some(e);
            }
        }
        report.took_s = t0.elapsed().as_secs_f64();
        let names = |v: Vec<&String>| v.into_iter().cloned().collect::<Vec<_>>().join(",");
        info!(
            event = "reload",
            by = %report.by,
            outcome = report.outcome.as_str(),
            error = report.error.as_deref().unwrap_or(""),
            added = %names(report.added.iter().map(|a| &a.name).collect()),
            removed = %names(report.removed.iter().map(|r| &r.name).collect()),
            changed = %names(report.changed.iter().map(|c| &c.name).collect()),
            took_s = report.took_s,
            "configuration reload"
        );
        let status = match report.outcome {
            ReloadOutcome::Refused | ReloadOutcome::Failed => {
                format!("reload {}; serving", report.outcome.as_str())
            }
            _ => format!("reloaded; {} service(s)", self.agent.status().len()),
        };
        say(self.notifier.ready(&status));
        *self.last.lock().expect("reload lock") = Some(report.clone());
        report
    }

    /// Applies the file; whether anything changed.
    async fn apply(&self, running: &mut Running, report: &mut ReloadReport) -> Result<bool, Step> {
        let path = self.path.as_deref().ok_or(ReloadError::NoFile)?;
        let new = {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || Config::load(&path))
                .await
                .expect("config read task panicked")
                .map_err(ReloadError::from)?
        };
        let plan = plan(&running.applied, &new)?;
        if plan.is_empty() {
            return Ok(false);
        }
        // Every new gate listens before anything changes, so that a taken address refuses
        // the whole reload; one that a removed service frees is taken once it is free.
        let freed: Vec<SocketAddr> = (running.applied.services.iter())
            .filter(|s| plan.removed.contains(&s.spec.name))
            .map(|s| s.listen)
            .collect();
        let mut listeners: HashMap<String, TcpListener> = HashMap::new();
        for s in plan.added.iter().filter(|s| !freed.contains(&s.listen)) {
            listeners.insert(s.spec.name.clone(), bind(s).await?);
        }
        for name in &plan.removed {
            let removed = self
                .agent
                .remove_service(name)
                .await
                .map_err(|e| Step::Failed(torpor_pool::error_chain(&e)))?;
            if let Some(gate) = running.gates.remove(name) {
                gate.stop().await;
            }
            running.applied.services.retain(|s| &s.spec.name != name);
            running.applied.tables.remove(name);
            report.removed.push(RemovedService {
                name: name.clone(),
                cut: removed.cut,
                snapshots_released: removed.released,
            });
        }
        let next = Applied::of(&new);
        for change in plan.changed {
            let name = change.config.spec.name.clone();
            let gate = running
                .gates
                .get(&name)
                .expect("a running service has a gate");
            if let Some(limits) = change.limits {
                gate.link.set_limits(limits);
            }
            if let Some(fresh) = change.respec {
                let why = format!("changed: {}", change.keys.join(", "));
                self.agent
                    .reconfigure_service(change.config.spec.clone(), fresh, why)
                    .await
                    .map_err(|e| Step::Failed(torpor_pool::error_chain(&e)))?;
            }
            report.changed.push(ChangedService {
                name: name.clone(),
                keys: change.keys.clone(),
                applies: change.applies(),
            });
            if let Some(t) = next.tables.get(&name) {
                running.applied.tables.insert(name.clone(), t.clone());
            }
            if let Some(s) = running
                .applied
                .services
                .iter_mut()
                .find(|s| s.spec.name == name)
            {
                *s = change.config;
            }
        }
        for s in plan.added {
            let name = s.spec.name.clone();
            let listener = match listeners.remove(&name) {
                Some(l) => l,
                None => bind(&s)
                    .await
                    .map_err(|e| Step::Failed(torpor_pool::error_chain(&e)))?,
            };
            let listen = listener
                .local_addr()
                .map_err(|e| Step::Failed(format!("service {name:?}: {e}")))?;
            let mut s = s;
            s.spec.steering = crate::steering_for(&s, listen);
            let link = link_for(&s);
            // The gate listens (and holds requests) while the service starts.
            let gate = GateTask::spawn(listener, &s, link.clone(), self.node_stop.clone());
            match self.agent.add_service(s.spec.clone(), link).await {
                Ok(added) => {
                    running.gates.insert(name.clone(), gate);
                    if let Some(t) = next.tables.get(&name) {
                        running.applied.tables.insert(name.clone(), t.clone());
                    }
                    running.applied.services.push(s);
                    report.added.push(AddedService {
                        name,
                        listen,
                        adopted_generation: match added {
                            Added::Adopted(g) => Some(g),
                            Added::Started => None,
                        },
                    });
                }
                Err(e) => {
                    gate.link.shut_down();
                    gate.stop().await;
                    return Err(Step::Failed(torpor_pool::error_chain(&e)));
                }
            }
        }
        // The file's order from now on, for `torpor status` and the next comparison.
        let order: Vec<&str> = new.services.iter().map(|s| s.spec.name.as_str()).collect();
        running
            .applied
            .services
            .sort_by_key(|s| order.iter().position(|n| *n == s.spec.name));
        Ok(true)
    }

    /// The stop of `torpor up`: reloads are refused from now on, every link is shut down
    /// (held requests get an error), and the gates end with `node_stop`.
    pub(crate) async fn stop(&self) -> Vec<GateHandle> {
        let mut running = self.running.lock().await;
        running.stopped = true;
        running
            .gates
            .drain()
            .map(|(_, g)| {
                g.link.shut_down();
                GateHandle(g)
            })
            .collect()
    }
}

/// A gate at the stop of `torpor up`, awaited once `node_stop` ends it.
#[derive(Debug)]
pub(crate) struct GateHandle(GateTask);

impl GateHandle {
    pub async fn join(self) {
        let _ = self.0.task.await;
    }
}

/// A step of [`Reloader::apply`] that did not go: a refusal (nothing was applied) or a
/// failure midway.
enum Step {
    Refused(ReloadError),
    Failed(String),
}

impl From<ReloadError> for Step {
    fn from(e: ReloadError) -> Step {
        Step::Refused(e)
    }
}

async fn bind(s: &ServiceConfig) -> Result<TcpListener, ReloadError> {
    TcpListener::bind(s.listen)
        .await
        .map_err(|source| ReloadError::Listen {
            addr: s.listen,
            service: s.spec.name.clone(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[pool]\ncapacity = \"64MiB\"\n[status]\nlisten = \"127.0.0.1:0\"\n\
        [control]\nsocket = \"/tmp/x.sock\"\n\
        [[service]]\nname = \"a\"\ncommand = [\"x\"]\nlisten = \"127.0.0.1:1\"\nbackend = \"127.0.0.1:2\"\n\
        [service.policy]\nidle_threshold = \"1s\"\nA_EXTRA\n\
        [[service]]\nname = \"b\"\ncommand = [\"y\"]\nlisten = \"127.0.0.1:3\"\nbackend = \"127.0.0.1:4\"\n";

    fn config(text: &str) -> Config {
        Config::from_toml(text).unwrap()
    }

    fn plan_for(old: &str, new: &str) -> Result<Plan, ReloadError> {
        plan(&Applied::of(&config(old)), &config(new))
    }

    fn base() -> String {
        BASE.replace("A_EXTRA", "")
    }

    #[test]
    fn the_same_file_changes_nothing() {
        assert!(plan_for(&base(), &base()).unwrap().is_empty());
    }

    #[test]
    fn added_removed_and_moved_services_are_found() {
        let more = format!(
            "{}[[service]]\nname = \"c\"\ncommand = [\"z\"]\nlisten = \"127.0.0.1:5\"\nbackend = \"127.0.0.1:6\"\n",
            base()
        );
        let p = plan_for(&base(), &more).unwrap();
        let added: Vec<_> = p.added.iter().map(|s| s.spec.name.as_str()).collect();
        assert_eq!((added, p.removed.len(), p.changed.len()), (vec!["c"], 0, 0));
        let p = plan_for(&more, &base()).unwrap();
        assert_eq!(
            (p.added.len(), p.removed.clone()),
            (0, vec!["c".to_string()])
        );
        let moved = base().replace("127.0.0.1:3", "127.0.0.1:7");
        let p = plan_for(&base(), &moved).unwrap();
        assert_eq!(p.removed, vec!["b".to_string()]);
        assert_eq!(
            p.added[0].spec.name, "b",
            "a new listen address is a remove and an add"
        );
    }

    #[test]
    fn each_kind_of_change_applies_when_it_can() {
        for (extra, key, applies) in [
            ("hold_queue = 7", "policy.hold_queue", Applies::Now),
            ("hold_timeout = \"3s\"", "policy.hold_timeout", Applies::Now),
            (
                "max_sleep_rate = 2.0",
                "policy.max_sleep_rate",
                Applies::NextWake,
            ),
        ] {
            let p = plan_for(&base(), &BASE.replace("A_EXTRA", extra)).unwrap();
            assert_eq!(p.changed.len(), 1, "{extra}");
            let c = &p.changed[0];
            assert_eq!(
                (c.keys.clone(), c.applies()),
                (vec![key.to_string()], applies)
            );
            assert_eq!(c.limits.is_some(), applies == Applies::Now, "{extra}");
        }
        let p = plan_for(&base(), &base().replace("[\"x\"]", "[\"x\", \"--v2\"]")).unwrap();
        assert_eq!(p.changed[0].keys, vec!["command".to_string()]);
        assert_eq!(p.changed[0].applies(), Applies::NextWakeFresh);
        let p = plan_for(&base(), &base().replace("\"1s\"", "\"2s\"")).unwrap();
        assert_eq!(p.changed[0].keys, vec!["policy.idle_threshold".to_string()]);
        assert_eq!(p.changed[0].applies(), Applies::NextWake);
        assert_eq!(
            p.changed[0].config.spec.policy.idle_threshold,
            std::time::Duration::from_secs(2)
        );
    }

    #[test]
    fn node_keys_and_gate_limits_are_refused_naming_the_key() {
        for (new, key, says) in [
            (
                base().replace("capacity = \"64MiB\"", "address = \"unix:/p.sock\""),
                "pool.address",
                "restart torpor up to change [pool].address",
            ),
            (
                base().replace("127.0.0.1:0", "127.0.0.1:9"),
                "status.listen",
                "[status].listen",
            ),
            (
                base().replace("/tmp/x.sock", "/tmp/y.sock"),
                "control.socket",
                "[control].socket",
            ),
            (
                format!("[power]\ndeep_idle = true\n{}", base()),
                "power.deep_idle",
                "[power].deep_idle",
            ),
        ] {
            let e = plan_for(&base(), &new).unwrap_err().to_string();
            assert!(e.starts_with(key) && e.contains(says), "{e}");
        }
        let e = plan_for(
            &base(),
            &BASE.replace("A_EXTRA", "").replace(
                "backend = \"127.0.0.1:4\"",
                "backend = \"127.0.0.1:4\"\nmax_connections = 9",
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("service[1].max_connections"), "{e}");
        // Steering is attached for the gate's address: it changes with a restart.
        let e = plan_for(
            &base(),
            &BASE.replace("A_EXTRA", "").replace(
                "backend = \"127.0.0.1:4\"",
                "backend = \"127.0.0.1:4\"\nsteering = \"kernel\"",
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("service[1].steering"), "{e}");
    }

    #[test]
    fn a_report_says_what_changed_and_when() {
        let r = ReloadReport {
            at_unix_ms: 0,
            by: "SIGHUP".into(),
            outcome: ReloadOutcome::Applied,
            error: None,
            added: vec![AddedService {
                name: "c".into(),
                listen: "127.0.0.1:5".parse().unwrap(),
                adopted_generation: None,
            }],
            removed: vec![RemovedService {
                name: "b".into(),
                cut: 0,
                snapshots_released: true,
            }],
            changed: vec![ChangedService {
                name: "a".into(),
                keys: vec!["policy.idle_threshold".into()],
                applies: Applies::NextWake,
            }],
            took_s: 0.1,
        };
        let text = r.render();
        assert!(
            text.contains("added   c on 127.0.0.1:5 (started)"),
            "{text}"
        );
        assert!(text.contains("removed b (snapshots released)"), "{text}");
        assert!(
            text.contains("changed a [policy.idle_threshold]: from its next wake"),
            "{text}"
        );
    }
}
