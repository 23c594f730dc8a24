//! `torpor.toml`: the pool, the status API, the control endpoint and the services. Unknown keys and bad values are
//! errors that name the key (`service[1].policy.idle_threshold: …`).

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use torpor_agent::{
    InitOptions, KnobConfig, Launch, MemoryRestore, NodePowerConfig, NodeSleepHooks, ProcessLaunch,
    ServiceSpec, SteeringMode,
};
use torpor_configfile::invalid;
use torpor_criu::LazyOptions;

use crate::control::ControlEndpoint;
use torpor_gate::{GateLimits, Protocol};
use torpor_policy::{Governor, PolicyConfig};
use torpor_pool::PoolAddr;
use torpor_power::{cpulist, knobs::KnobRoots, HostRoots, Profile};
use tracing::warn;

pub use torpor_configfile::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    pool: RawPool,
    #[serde(default)]
    status: RawStatus,
    #[serde(default)]
    control: RawControl,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
    #[serde(default)]
    power: RawPower,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPower {
    /// Platform profile: built-in name or TOML file (default "generic").
    profile: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    consolidate: bool,
    #[serde(default)]
    deep_idle: bool,
    #[serde(default)]
    offline_idle_cores: bool,
    wake_latency_us: Option<i32>,
    target_utilisation: Option<f64>,
    journal: Option<PathBuf>,
    /// A directory laid out as sys/, cgroup/, dev/, proc/ to turn the knobs in (a copy or a
    /// fake tree) instead of the real ones.
    knob_root: Option<PathBuf>,
    node_sleep: Option<RawNodeSleep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeSleep {
    sleep: Vec<String>,
    wake: Vec<String>,
    after: String,
    /// Log the hooks instead of running them, and credit the sleep as modelled.
    #[serde(default)]
    dry_run: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    /// Prefix of this node's snapshot names on a shared pool (default: the host name).
    namespace: Option<String>,
    /// The key that seals this node's snapshots (created when absent).
    key_file: Option<PathBuf>,
    /// Where the node keeps what must outlive `torpor up` (the services a stop left running).
    state_dir: Option<PathBuf>,
    /// The most memory the services up may hold (a size, "8GiB").
    memory_budget: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    /// Embedded pool's RAM tier (default 1GiB).
    capacity: Option<String>,
    spill_dir: Option<PathBuf>,
    /// The embedded pool, and every service's state with it, is meant to go at stop (a demo,
    /// a test): no warning that stopping loses it.
    #[serde(default)]
    ephemeral: bool,
    /// A remote pool instead of the embedded one.
    address: Option<String>,
    token_file: Option<PathBuf>,
    /// The remote pool's certificate (PEM), pinned: TCP to it goes over TLS.
    tls_cert: Option<PathBuf>,
    /// Client certificate and key, for a pool that requires mutual TLS.
    tls_client_cert: Option<PathBuf>,
    tls_client_key: Option<PathBuf>,
    /// Plaintext TCP to a pool that is not on loopback is refused unless this is set.
    #[serde(default)]
    insecure: bool,
    /// More remote pools every snapshot is also committed to.
    #[serde(default, rename = "replica")]
    replicas: Vec<RawReplica>,
    /// Pools that must commit before a service is killed (default: every one).
    write_quorum: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplica {
    address: String,
    token_file: Option<PathBuf>,
    /// The replica's certificate (PEM), pinned: TCP to it goes over TLS.
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    insecure: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatus {
    listen: Option<String>,
}

/// `[control]`: a Unix socket (`socket`), or a TCP address (`listen`) with `token_file`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<PathBuf>,
    listen: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    /// A command to run (argv)...
    command: Option<Vec<String>>,
    /// ...or an OCI bundle to run with runc.
    bundle: Option<PathBuf>,
    cwd: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// User (name or number) the service runs as; CRIU then runs as it too.
    user: Option<String>,
    /// Group (name or number); the user's primary group by default.
    group: Option<String>,
    /// `name = N`, `name = "unlimited"` or `name = [soft, hard]`.
    #[serde(default)]
    rlimits: BTreeMap<String, toml::Value>,
    listen: String,
    backend: String,
    #[serde(default = "default_protocol")]
    protocol: Protocol,
    /// `proxy` (the default) or `kernel`: how new connections reach the service while it is
    /// awake.
    steering: Option<String>,
    cpuset: Option<String>,
    drain_deadline: Option<String>,
    start_timeout: Option<String>,
    #[serde(default)]
    policy: RawPolicy,
    /// Services to wake together with this one.
    #[serde(default)]
    wake_with: Vec<String>,
    /// The gate's client connections at once (default from the open-file limit).
    max_connections: Option<usize>,
    /// Largest body kept for a request held while the service sleeps (default 16MiB).
    hold_body_limit: Option<String>,
    /// Time a client has to send its request headers (default 10s).
    header_read_timeout: Option<String>,
    /// `lazy` (the default for process trees) or `eager` (containers, always): how a wake
    /// brings the service's memory back.
    restore: Option<String>,
    /// Lazy restore: push the working set recorded after the previous wake (default true).
    prefetch: Option<bool>,
    /// Lazy restore: fill untouched pages in the background (default false: they stay in
    /// the pool and the next checkpoint writes only what the service touched).
    background_fill: Option<bool>,
    /// Lazy restore: how long after a wake the pages it brings in count as the working set
    /// (default 1s).
    working_set_window: Option<String>,
    /// Lazy restore: run the next wake's restore while the service sleeps and hold it just
    /// before its processes resume, so a wake only releases it (default true).
    arm: Option<bool>,
}

fn default_protocol() -> Protocol {
    Protocol::Http
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    idle_threshold: Option<String>,
    max_sleep_rate: Option<f64>,
    wake_objective: Option<String>,
    hold_queue: Option<usize>,
    hold_timeout: Option<String>,
    memory_tier_max: Option<String>,
    governor: Option<String>,
}

/// Where snapshots go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolChoice {
    Embedded {
        capacity: u64,
        spill_dir: Option<PathBuf>,
    },
    Remote {
        addr: PoolAddr,
        token_file: Option<PathBuf>,
        /// The pool's pinned certificate (TLS), with the client's own certificate and key
        /// when the pool wants mutual TLS.
        tls_cert: Option<PathBuf>,
        tls_client: Option<(PathBuf, PathBuf)>,
        /// Plaintext TCP to a non-loopback pool allowed.
        insecure: bool,
    },
}

/// A remote pool that holds a copy of every snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub addr: PoolAddr,
    pub token_file: Option<PathBuf>,
    /// Pinned certificate: TCP to the replica goes over TLS.
    pub tls_cert: Option<PathBuf>,
    /// Plaintext TCP to a replica off this host is refused unless set.
    pub insecure: bool,
}

/// Who this node is to the pools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Prefix of this node's snapshot names (`NAMESPACE.SERVICE`).
    pub namespace: String,
    /// Where the key that seals its snapshots is kept.
    pub key_file: PathBuf,
    /// Where the node keeps what must outlive `torpor up`: the list of services `torpor
    /// stop --keep-running` left running ([`NodeConfig::kept_file`]).
    pub state_dir: PathBuf,
    /// The most memory the services up on the node may hold: past it the coldest idle one is
    /// snapshotted (the pool as far memory, so that more services fit the node).
    pub memory_budget: Option<u64>,
}

impl NodeConfig {
    /// The kept-services file of this node (one per namespace, so that two `torpor up` on
    /// one host never adopt each other's services).
    pub fn kept_file(&self) -> PathBuf {
        self.state_dir.join(format!("kept.{}", self.namespace))
    }
}

/// Where the node key lives unless `node.key_file` says otherwise.
pub const DEFAULT_NODE_KEY: &str = "/var/lib/torpor/node.key";

/// Where the node's state lives unless `node.state_dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/torpor";

/// One service, ready for the agent and its gate.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub spec: ServiceSpec,
    /// Public address the gate listens on.
    pub listen: SocketAddr,
    pub protocol: Protocol,
    /// `steering = "kernel"`: while the service is awake, new connections go straight to it
    /// (attached when the gate listens: `spec.steering` says what came of it).
    pub kernel_steering: bool,
    pub hold_queue: usize,
    pub hold_timeout: Duration,
    /// What the gate lets one client take (connections, header time and size, held bodies).
    pub gate: GateLimits,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: NodeConfig,
    pub pool: PoolChoice,
    /// Pools that hold a copy of every snapshot besides `pool`.
    pub replicas: Vec<Replica>,
    /// Pools (of `pool` and `replicas`) that must commit before a service is killed.
    pub write_quorum: usize,
    pub status_listen: SocketAddr,
    /// Where manual commands (`torpor sleep`, `wake`, `pin`, `unpin`) arrive.
    pub control: ControlEndpoint,
    pub services: Vec<ServiceConfig>,
    pub power: NodePowerConfig,
    /// `pool.ephemeral`: losing every service's state at stop is intended.
    pub ephemeral: bool,
    /// The document as written, for a reload to say which keys changed.
    pub(crate) written: toml::Table,
}

/// Where the knob journal lives unless `power.journal` says otherwise.
pub const DEFAULT_KNOB_JOURNAL: &str = "/run/torpor/knobs.json";

fn power(raw: RawPower) -> Result<NodePowerConfig, ConfigError> {
    let profile = Profile::resolve(raw.profile.as_deref().unwrap_or("generic"))
        .map_err(|e| invalid("power.profile", e.to_string()))?;
    let target_utilisation = raw.target_utilisation.unwrap_or(0.7);
    if !(target_utilisation > 0.0 && target_utilisation <= 1.0) {
        return Err(invalid("power.target_utilisation", "must be in (0, 1]"));
    }
    if raw.wake_latency_us.is_some_and(|us| us < 0) {
        return Err(invalid(
            "power.wake_latency_us",
            "must be 0 or more microseconds",
        ));
    }
    let node_sleep = match raw.node_sleep {
        Some(n) => {
            for (key, argv) in [("sleep", &n.sleep), ("wake", &n.wake)] {
                if !matches!(argv.first(), Some(p) if !p.is_empty()) {
                    return Err(invalid(
                        format!("power.node_sleep.{key}"),
                        "must name a program",
                    ));
                }
            }
            Some(NodeSleepHooks {
                after: duration("power.node_sleep.after", Some(&n.after), Duration::ZERO)?,
                sleep: n.sleep,
                wake: n.wake,
                dry_run: n.dry_run,
            })
        }
        None => None,
    };
    let any = raw.consolidate
        || raw.deep_idle
        || raw.offline_idle_cores
        || raw.wake_latency_us.is_some()
        || node_sleep.is_some();
    let knobs = any.then(|| KnobConfig {
        roots: raw
            .knob_root
            .as_deref()
            .map_or_else(KnobRoots::default, KnobRoots::under),
        journal: raw.journal.unwrap_or_else(|| DEFAULT_KNOB_JOURNAL.into()),
        dry_run: raw.dry_run,
        consolidate: raw.consolidate,
        deep_idle: raw.deep_idle,
        offline: raw.offline_idle_cores,
        wake_latency_us: raw.wake_latency_us,
        node_sleep,
        target_utilisation,
    });
    Ok(NodePowerConfig {
        profile,
        telemetry: HostRoots::default(),
        knobs,
    })
}

/// Checks `[control]`: a socket path, or a TCP address with its token file.
fn control(raw: &RawControl, status: SocketAddr) -> Result<ControlEndpoint, ConfigError> {
    match (&raw.socket, &raw.listen, &raw.token_file) {
        (Some(_), Some(_), _) => Err(invalid(
            "control.listen",
            "give either control.socket or control.listen, not both",
        )),
        (Some(p), None, None) => {
            if p.as_os_str().is_empty() || p.as_os_str().len() > 100 {
                return Err(invalid(
                    "control.socket",
                    "must be a path of 1 to 100 bytes (a Unix socket's limit)",
                ));
            }
            Ok(ControlEndpoint::Unix(p.clone()))
        }
        (_, None, Some(_)) => Err(invalid(
            "control.token_file",
            "a token is for a TCP control endpoint: set control.listen too",
        )),
        (None, None, None) => Ok(ControlEndpoint::default()),
        (None, Some(l), token_file) => {
            let addr = addr("control.listen", l)?;
            if addr == status {
                return Err(invalid(
                    "control.listen",
                    "must differ from status.listen (the status API is read-only)",
                ));
            }
            let token_file = token_file.clone().ok_or_else(|| {
                invalid(
                    "control.token_file",
                    "a TCP control endpoint needs a token file (write one with a long random line, mode 0600)",
                )
            })?;
            Ok(ControlEndpoint::Tcp { addr, token_file })
        }
    }
}

/// Default address of the status API.
pub const DEFAULT_STATUS: &str = "127.0.0.1:7079";

fn duration(key: &str, v: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => torpor_image::parse_duration(s).map_err(|e| invalid(key, e.to_string())),
    }
}

fn size(key: &str, v: Option<&str>, default: u64) -> Result<u64, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => torpor_image::parse_size(s).map_err(|e| invalid(key, e.to_string())),
    }
}

fn addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse()
        .map_err(|_| invalid(key, format!("{v:?} is not an IP:PORT address")))
}

/// Resolves `user` and `group` (names or numbers) to ids, with the user's supplementary
/// groups, as the service's init will take them.
fn identity(
    k: &dyn Fn(&str) -> String,
    user: Option<&str>,
    group: Option<&str>,
) -> Result<InitOptions, ConfigError> {
    use nix::unistd::{getgrouplist, Gid, Group, Uid, User};
    let mut o = InitOptions::default();
    let gid = match group {
        Some(g) => {
            let found = match g.parse::<u32>() {
                Ok(n) => Group::from_gid(Gid::from_raw(n)).ok().flatten().map(|_| n),
                Err(_) => Group::from_name(g).ok().flatten().map(|gr| gr.gid.as_raw()),
            };
            Some(found.ok_or_else(|| invalid(k("group"), format!("no group {g:?} on this host")))?)
        }
        None => None,
    };
    if let Some(u) = user {
        let found = match u.parse::<u32>() {
            Ok(n) => User::from_uid(Uid::from_raw(n)).ok().flatten(),
            Err(_) => User::from_name(u).ok().flatten(),
        };
        let found =
            found.ok_or_else(|| invalid(k("user"), format!("no user {u:?} on this host")))?;
        let primary = gid.map_or(found.gid, Gid::from_raw);
        let name = std::ffi::CString::new(found.name.clone())
            .map_err(|_| invalid(k("user"), "name contains a NUL byte"))?;
        o.uid = Some(found.uid.as_raw());
        o.gid = Some(primary.as_raw());
        o.groups = getgrouplist(&name, primary)
            .map_err(|e| invalid(k("user"), format!("cannot list the groups of {u:?}: {e}")))?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
    } else {
        o.gid = gid;
    }
    Ok(o)
}

/// Parses `[service.rlimits]`.
fn rlimits(
    key: &str,
    raw: &BTreeMap<String, toml::Value>,
) -> Result<Vec<(String, u64, u64)>, ConfigError> {
    let one = |name: &str, v: &toml::Value| -> Option<u64> {
        match v {
            toml::Value::Integer(n) if *n >= 0 => Some(*n as u64),
            toml::Value::String(s) if s == "unlimited" => Some(u64::MAX),
            _ => None,
        }
        .filter(|_| torpor_agent::init::rlimit_resource(name).is_some())
    };
    raw.iter()
        .map(|(name, v)| {
            let k = format!("{key}.{name}");
            if torpor_agent::init::rlimit_resource(name).is_none() {
                return Err(invalid(&k, "unknown limit (nofile, nproc, core, memlock, stack, as, fsize, cpu, data, rss, msgqueue, nice, rtprio, sigpending, locks)"));
            }
            let bad = || invalid(&k, "must be a number, \"unlimited\", or [soft, hard]");
            let (soft, hard) = match v {
                toml::Value::Array(a) if a.len() == 2 => (
                    one(name, &a[0]).ok_or_else(bad)?,
                    one(name, &a[1]).ok_or_else(bad)?,
                ),
                v => {
                    let n = one(name, v).ok_or_else(bad)?;
                    (n, n)
                }
            };
            if soft > hard {
                return Err(invalid(&k, "soft limit above the hard one"));
            }
            Ok((name.clone(), soft, hard))
        })
        .collect()
}

/// Parses a cpuset list like `0-2,5`.
fn cpus(key: &str, v: &str) -> Result<Vec<usize>, ConfigError> {
    let bad = |why: String| invalid(key, format!("{v:?} is not a CPU list like 0-2,5 ({why})"));
    let set = cpulist::parse(v).map_err(bad)?;
    if set.is_empty() {
        return Err(bad("it is empty".into()));
    }
    Ok(set.into_iter().collect())
}

/// Open files kept aside for what is not a gate's connection: the pool, the agent, CRIU's
/// images on their way, logs, the status API.
const FD_HEADROOM: u64 = 64;

/// Default connection limit and hold queue of each gate, so that all of them together fit
/// the process's open-file limit: each client connection may need a backend connection too,
/// and a wake dials the backend for every held request at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdDefaults {
    pub max_connections: usize,
    pub hold_queue: usize,
}

impl FdDefaults {
    /// For `services` gates under an open-file limit of `nofile`: the files left after the
    /// headroom, shared evenly, half for client connections and half for backend ones; the
    /// hold queue at most a quarter of the limit.
    pub fn for_services(nofile: u64, services: usize) -> FdDefaults {
        let per_gate = nofile.saturating_sub(FD_HEADROOM) / (2 * services.max(1) as u64);
        let max_connections = per_gate.max(16) as usize;
        FdDefaults {
            max_connections,
            hold_queue: max_connections.min((nofile / 4).max(16) as usize),
        }
    }
}

/// The process's open-file limit (soft): what the gates' connections must fit in.
pub fn open_file_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// Says how the gates' connection limits and hold queues together overrun `nofile` open
/// files, if they do.
pub fn fd_shortfall(nofile: u64, services: &[ServiceConfig]) -> Option<String> {
    let need = FD_HEADROOM
        + services
            .iter()
            .map(|s| (s.gate.max_connections + s.hold_queue) as u64)
            .sum::<u64>();
    (need > nofile).then(|| {
        format!(
            "the gates may need {need} open files (max_connections plus hold_queue of every service, plus {FD_HEADROOM}), above this process's limit of {nofile} (ulimit -n): under load, connections will wait or be refused; lower them or raise the limit"
        )
    })
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::from_toml(&torpor_configfile::read(path)?)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)?;
        let written: toml::Table = toml::from_str(text)?;
        if raw.pool.ephemeral && (raw.pool.address.is_some() || raw.pool.spill_dir.is_some()) {
            return Err(invalid(
                "pool.ephemeral",
                "only an embedded pool without a spill_dir is thrown away at stop",
            ));
        }
        let pool = match (&raw.pool.address, &raw.pool.capacity, &raw.pool.spill_dir) {
            (Some(a), None, None) => PoolChoice::Remote {
                addr: a
                    .parse()
                    .map_err(|e: torpor_pool::AddrError| invalid("pool.address", e.to_string()))?,
                token_file: raw.pool.token_file.clone(),
                tls_cert: raw.pool.tls_cert.clone(),
                tls_client: match (&raw.pool.tls_client_cert, &raw.pool.tls_client_key) {
                    (None, None) => None,
                    (Some(_), Some(_)) if raw.pool.tls_cert.is_none() => {
                        return Err(invalid(
                            "pool.tls_client_cert",
                            "a client certificate is for TLS: set pool.tls_cert too",
                        ))
                    }
                    (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                    _ => {
                        return Err(invalid(
                            "pool.tls_client_cert",
                            "pool.tls_client_cert and pool.tls_client_key go together",
                        ))
                    }
                },
                insecure: raw.pool.insecure,
            },
            (Some(_), _, _) => return Err(invalid(
                "pool.address",
                "a remote pool takes no capacity or spill_dir (those configure the embedded pool)",
            )),
            (None, capacity, spill_dir) => {
                if raw.pool.token_file.is_some() {
                    return Err(invalid(
                        "pool.token_file",
                        "only a remote pool (pool.address) takes a token file",
                    ));
                }
                if raw.pool.tls_cert.is_some()
                    || raw.pool.tls_client_cert.is_some()
                    || raw.pool.tls_client_key.is_some()
                    || raw.pool.insecure
                {
                    return Err(invalid(
                        "pool.tls_cert",
                        "only a remote pool (pool.address) takes TLS settings or insecure",
                    ));
                }
                PoolChoice::Embedded {
                    capacity: size("pool.capacity", capacity.as_deref(), 1 << 30)?,
                    spill_dir: spill_dir.clone(),
                }
            }
        };
        let node = NodeConfig {
            namespace: match &raw.node.namespace {
                Some(n) => {
                    validate_namespace(n).map_err(|p| invalid("node.namespace", p))?;
                    n.clone()
                }
                None => host_namespace(),
            },
            key_file: raw
                .node
                .key_file
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_NODE_KEY)),
            state_dir: raw
                .node
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            memory_budget: match raw.node.memory_budget.as_deref() {
                Some(v) => match size("node.memory_budget", Some(v), 0)? {
                    0 => return Err(invalid("node.memory_budget", "must be more than 0")),
                    b => Some(b),
                },
                None => None,
            },
        };
        let mut replicas = Vec::new();
        for (i, r) in raw.pool.replicas.iter().enumerate() {
            replicas.push(Replica {
                addr: r.address.parse().map_err(|e: torpor_pool::AddrError| {
                    invalid(format!("pool.replica[{i}].address"), e.to_string())
                })?,
                token_file: r.token_file.clone(),
                tls_cert: r.tls_cert.clone(),
                insecure: r.insecure,
            });
        }
        let pools = 1 + replicas.len();
        let write_quorum = raw.pool.write_quorum.unwrap_or(pools);
        if write_quorum == 0 || write_quorum > pools {
            return Err(invalid(
                "pool.write_quorum",
                format!("must be between 1 and the number of pools ({pools})"),
            ));
        }
        let status_listen = addr(
            "status.listen",
            raw.status.listen.as_deref().unwrap_or(DEFAULT_STATUS),
        )?;
        let control = control(&raw.control, status_listen)?;
        let service_count = raw.services.len();
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
        let mut services = Vec::new();
        for (i, s) in raw.services.into_iter().enumerate() {
            let k = |field: &str| format!("service[{i}].{field}");
            torpor_image::validate_snapshot_name(&s.name)
                .map_err(|e| invalid(k("name"), e.to_string()))?;
            if !names.insert(s.name.clone()) {
                return Err(invalid(
                    k("name"),
                    format!("{:?} is used by two services", s.name),
                ));
            }
            let launch = match (s.command, s.bundle) {
                (Some(argv), None) => {
                    if argv.is_empty() || argv[0].is_empty() {
                        return Err(invalid(k("command"), "must name a program"));
                    }
                    let mut init = identity(&k, s.user.as_deref(), s.group.as_deref())?;
                    init.cwd = s.cwd;
                    init.rlimits = rlimits(&k("rlimits"), &s.rlimits)?;
                    Launch::Process(ProcessLaunch {
                        argv,
                        init,
                        env: s.env,
                        cpus: match &s.cpuset {
                            Some(c) => cpus(&k("cpuset"), c)?,
                            None => Vec::new(),
                        },
                    })
                }
                (None, Some(bundle)) => {
                    if !bundle.join("config.json").is_file() {
                        return Err(invalid(
                            k("bundle"),
                            format!("{} holds no config.json", bundle.display()),
                        ));
                    }
                    for (key, set) in [
                        ("cwd", s.cwd.is_some()),
                        ("env", !s.env.is_empty()),
                        ("user", s.user.is_some()),
                        ("group", s.group.is_some()),
                        ("rlimits", !s.rlimits.is_empty()),
                        ("cpuset", s.cpuset.is_some()),
                    ] {
                        if set {
                            return Err(invalid(
                                k(key),
                                "belongs in the bundle's config.json for a container",
                            ));
                        }
                    }
                    Launch::Container { bundle }
                }
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        k("bundle"),
                        "give either command or bundle, not both",
                    ))
                }
                (None, None) => {
                    return Err(invalid(
                        k("command"),
                        "a service needs a command or an OCI bundle",
                    ))
                }
            };
            let listen = addr(&k("listen"), &s.listen)?;
            let backend = addr(&k("backend"), &s.backend)?;
            let control_addr = match &control {
                ControlEndpoint::Tcp { addr, .. } => Some(*addr),
                ControlEndpoint::Unix(_) => None,
            };
            if !listens.insert(listen) || listen == status_listen || Some(listen) == control_addr {
                return Err(invalid(k("listen"), format!("{listen} is already used")));
            }
            if listen == backend {
                return Err(invalid(
                    k("backend"),
                    "must differ from listen (the gate listens there)",
                ));
            }
            let kernel_steering = match s.steering.as_deref() {
                None | Some("proxy") => false,
                Some("kernel") if listen.is_ipv4() && backend.is_ipv4() => true,
                Some("kernel") => {
                    return Err(invalid(
                        k("steering"),
                        "\"kernel\" needs IPv4 listen and backend addresses (the sk_lookup program steers IPv4)",
                    ))
                }
                Some(other) => {
                    return Err(invalid(
                        k("steering"),
                        format!("{other:?} is neither \"proxy\" nor \"kernel\""),
                    ))
                }
            };
            let p = &s.policy;
            // What the file leaves out is the policy's own default.
            let defaults = PolicyConfig::default();
            let max_sleep_rate = p.max_sleep_rate.unwrap_or(defaults.max_sleep_rate);
            if !(max_sleep_rate >= 0.0 && max_sleep_rate.is_finite()) {
                return Err(invalid(
                    k("policy.max_sleep_rate"),
                    "must be a non-negative number of requests per second",
                ));
            }
            let fds = FdDefaults::for_services(open_file_limit(), service_count);
            let hold_queue = p.hold_queue.unwrap_or(fds.hold_queue);
            if hold_queue == 0 {
                return Err(invalid(k("policy.hold_queue"), "must be at least 1"));
            }
            let max_connections = s.max_connections.unwrap_or(fds.max_connections);
            if max_connections == 0 {
                return Err(invalid(k("max_connections"), "must be at least 1"));
            }
            let gate = GateLimits {
                max_connections,
                hold_body_limit: size(
                    &k("hold_body_limit"),
                    s.hold_body_limit.as_deref(),
                    torpor_gate::DEFAULT_HOLD_BODY_LIMIT,
                )?,
                header_read_timeout: duration(
                    &k("header_read_timeout"),
                    s.header_read_timeout.as_deref(),
                    torpor_gate::DEFAULT_HEADER_READ_TIMEOUT,
                )?,
                ..GateLimits::default()
            };
            if gate.header_read_timeout.is_zero() {
                return Err(invalid(k("header_read_timeout"), "must be more than 0"));
            }
            let policy = PolicyConfig {
                idle_threshold: duration(
                    &k("policy.idle_threshold"),
                    p.idle_threshold.as_deref(),
                    defaults.idle_threshold,
                )?,
                max_sleep_rate,
                wake_objective: match &p.wake_objective {
                    Some(w) => Some(duration(
                        &k("policy.wake_objective"),
                        Some(w),
                        Duration::ZERO,
                    )?),
                    None => None,
                },
                memory_tier_max_bytes: size(
                    &k("policy.memory_tier_max"),
                    p.memory_tier_max.as_deref(),
                    defaults.memory_tier_max_bytes,
                )?,
                governor: match p.governor.as_deref() {
                    None => defaults.governor,
                    Some(g) => Governor::parse(g).ok_or_else(|| {
                        invalid(
                            k("policy.governor"),
                            format!("{g:?} is not a governor: \"threshold\" or \"energy\""),
                        )
                    })?,
                },
                ..defaults
            };
            // Lazy by default for process trees; containers restore eagerly through runc.
            let default_restore = match launch {
                Launch::Container { .. } => "eager",
                Launch::Process(_) => "lazy",
            };
            let memory = match s.restore.as_deref().unwrap_or(default_restore) {
                "eager" => {
                    for (key, set) in [
                        ("prefetch", s.prefetch.is_some()),
                        ("background_fill", s.background_fill.is_some()),
                        ("working_set_window", s.working_set_window.is_some()),
                        ("arm", s.arm.is_some()),
                    ] {
                        if set {
                            return Err(invalid(k(key), "applies only with restore = \"lazy\""));
                        }
                    }
                    MemoryRestore::Eager
                }
                "lazy" if matches!(launch, Launch::Container { .. }) => {
                    return Err(invalid(
                        k("restore"),
                        "lazy restore is for process trees (containers restore eagerly through runc)",
                    ));
                }
                "lazy" => {
                    let d = LazyOptions::default();
                    MemoryRestore::Lazy(LazyOptions {
                        prefetch: s.prefetch.unwrap_or(d.prefetch),
                        background_fill: s.background_fill.unwrap_or(d.background_fill),
                        arm: s.arm.unwrap_or(d.arm),
                        record_for: duration(
                            &k("working_set_window"),
                            s.working_set_window.as_deref(),
                            d.record_for,
                        )?,
                        ..d
                    })
                }
                other => {
                    return Err(invalid(
                        k("restore"),
                        format!("{other:?} is neither \"eager\" nor \"lazy\""),
                    ))
                }
            };
            services.push(ServiceConfig {
                listen,
                protocol: s.protocol,
                kernel_steering,
                gate,
                hold_queue,
                hold_timeout: duration(
                    &k("policy.hold_timeout"),
                    p.hold_timeout.as_deref(),
                    Duration::from_secs(30),
                )?,
                spec: ServiceSpec {
                    name: s.name,
                    launch,
                    backend,
                    policy,
                    drain_deadline: duration(
                        &k("drain_deadline"),
                        s.drain_deadline.as_deref(),
                        crate::DEFAULT_DRAIN,
                    )?,
                    start_timeout: duration(
                        &k("start_timeout"),
                        s.start_timeout.as_deref(),
                        Duration::from_secs(30),
                    )?,
                    wake_with: s.wake_with,
                    memory,
                    steering: SteeringMode::Proxy,
                },
            });
        }
        for (i, s) in services.iter().enumerate() {
            for other in &s.spec.wake_with {
                if other == &s.spec.name || !names.contains(other) {
                    return Err(invalid(
                        format!("service[{i}].wake_with"),
                        format!("{other:?} is not another service here"),
                    ));
                }
            }
        }
        if let Some(problem) = fd_shortfall(open_file_limit(), &services) {
            warn!("{problem}");
        }
        Ok(Config {
            node,
            pool,
            replicas,
            write_quorum,
            control,
            status_listen,
            services,
            power: power(raw.power)?,
            ephemeral: raw.pool.ephemeral,
            written,
        })
    }
}

/// A namespace is one snapshot-name component: no '.', so `NAMESPACE.SERVICE` splits one way.
fn validate_namespace(n: &str) -> Result<(), String> {
    if n.is_empty()
        || n.len() > 48
        || !n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        return Err(format!("{n:?} must be 1 to 48 letters, digits, '_' or '-'"));
    }
    Ok(())
}

/// The default `node.namespace`: the host name, made a valid namespace (other characters
/// become '-').
pub fn host_namespace() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    let mut n: String = host
        .chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if n.is_empty() {
        n = "node".into();
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [pool]
        capacity = "512MiB"

        [status]
        listen = "127.0.0.1:0"

        [[service]]
        name = "web"
        command = ["/usr/bin/python3", "-m", "http.server", "8081"]
        env = { PYTHONUNBUFFERED = "1" }
        listen = "127.0.0.1:8080"
        backend = "127.0.0.1:8081"
        cpuset = "0-1"
        [service.policy]
        idle_threshold = "250ms"
        wake_objective = "200ms"
        hold_queue = 100

        [[service]]
        name = "kv"
        command = ["redis-server"]
        listen = "127.0.0.1:6380"
        backend = "127.0.0.1:6379"
        protocol = "tcp"
    "#;

    #[test]
    fn ephemeral_is_only_for_an_embedded_pool_without_a_disk_tier() {
        let svc = "[[service]]\nname = \"a\"\ncommand = [\"x\"]\nlisten = \"127.0.0.1:1\"\nbackend = \"127.0.0.1:2\"\n";
        let c = Config::from_toml(&format!("[pool]\nephemeral = true\n{svc}")).unwrap();
        assert!(c.ephemeral);
        assert!(!Config::from_toml(svc).unwrap().ephemeral);
        for pool in [
            "[pool]\nephemeral = true\nspill_dir = \"/tmp/x\"\n",
            "[pool]\nephemeral = true\naddress = \"127.0.0.1:7000\"\n",
        ] {
            let e = Config::from_toml(&format!("{pool}{svc}")).unwrap_err();
            assert!(e.to_string().contains("pool.ephemeral"), "{e}");
        }
    }

    #[test]
    fn the_shipped_example_parses() {
        let c = Config::from_toml(include_str!("../../../examples/torpor.toml")).unwrap();
        assert_eq!(c.power.profile.name, "generic");
        assert!(c.power.knobs.is_none(), "knobs stay off unless asked for");
    }

    #[test]
    fn wake_with_names_other_services() {
        let two = "[[service]]\nname = \"a\"\ncommand = [\"x\"]\nlisten = \"127.0.0.1:1\"\nbackend = \"127.0.0.1:2\"\nWAKE\n[[service]]\nname = \"b\"\ncommand = [\"x\"]\nlisten = \"127.0.0.1:3\"\nbackend = \"127.0.0.1:4\"\n";
        let c = Config::from_toml(&two.replace("WAKE", "wake_with = [\"b\"]")).unwrap();
        assert_eq!(c.services[0].spec.wake_with, vec!["b".to_string()]);
        for bad in ["wake_with = [\"a\"]", "wake_with = [\"zz\"]"] {
            let e = Config::from_toml(&two.replace("WAKE", bad))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("service[0].wake_with"), "{e}");
        }
    }

    #[test]
    fn restore_mode_is_lazy_for_trees_by_default_and_checked() {
        let one = "[[service]]\nname = \"a\"\nLAUNCH\nlisten = \"127.0.0.1:1\"\nbackend = \"127.0.0.1:2\"\nEXTRA\n";
        let tree = one.replace("LAUNCH", "command = [\"x\"]");
        let c = Config::from_toml(&tree.replace("EXTRA", "")).unwrap();
        match &c.services[0].spec.memory {
            MemoryRestore::Lazy(o) => assert!(o.prefetch && !o.background_fill && o.arm),
            other => panic!("process trees restore lazily by default, got {other:?}"),
        }
        let c = Config::from_toml(&tree.replace(
            "EXTRA",
            "restore = \"lazy\"\nprefetch = false\nbackground_fill = true\nworking_set_window = \"250ms\"\narm = false",
        ))
        .unwrap();
        match &c.services[0].spec.memory {
            MemoryRestore::Lazy(o) => {
                assert!(!o.prefetch && o.background_fill && !o.arm);
                assert_eq!(o.record_for, Duration::from_millis(250));
            }
            other => panic!("lazy asked for, got {other:?}"),
        }
        let c = Config::from_toml(&tree.replace("EXTRA", "restore = \"eager\"")).unwrap();
        assert!(matches!(c.services[0].spec.memory, MemoryRestore::Eager));
        for (extra, key) in [
            ("restore = \"sometimes\"", "service[0].restore"),
            (
                "restore = \"eager\"\nprefetch = true",
                "service[0].prefetch",
            ),
            ("restore = \"eager\"\narm = true", "service[0].arm"),
            (
                "working_set_window = \"soon\"",
                "service[0].working_set_window",
            ),
        ] {
            let e = Config::from_toml(&tree.replace("EXTRA", extra))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(key), "{extra}: {e}");
        }
        let bundle = tempfile::tempdir().unwrap();
        std::fs::write(bundle.path().join("config.json"), "{}").unwrap();
        let container = one.replace(
            "LAUNCH",
            &format!("bundle = {:?}", bundle.path().display().to_string()),
        );
        let c = Config::from_toml(&container.replace("EXTRA", "")).unwrap();
        assert!(matches!(c.services[0].spec.memory, MemoryRestore::Eager));
        let e = Config::from_toml(&container.replace("EXTRA", "restore = \"lazy\""))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("service[0].restore"), "{e}");
    }

    #[test]
    fn power_section_errors_name_the_key() {
        let base = "[[service]]\nname = \"a\"\ncommand = [\"x\"]\nlisten = \"127.0.0.1:1\"\nbackend = \"127.0.0.1:2\"\n";
        for (power, key) in [
            ("[power]\nprofile = \"nope\"", "power.profile"),
            (
                "[power]\ntarget_utilisation = 0.0\nconsolidate = true",
                "power.target_utilisation",
            ),
            (
                "[power.node_sleep]\nsleep = []\nwake = [\"true\"]\nafter = \"1s\"",
                "power.node_sleep.sleep",
            ),
            (
                "[power.node_sleep]\nsleep = [\"true\"]\nwake = [\"true\"]\nafter = \"soon\"",
                "power.node_sleep.after",
            ),
        ] {
            let e = Config::from_toml(&format!("{base}{power}"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(key), "{e}");
        }
        let c =
            Config::from_toml(&format!("{base}[power]\ndeep_idle = true\ndry_run = true")).unwrap();
        let k = c.power.knobs.expect("a knob on");
        assert!(k.deep_idle && k.dry_run && !k.consolidate);
        assert_eq!(k.journal, std::path::PathBuf::from(DEFAULT_KNOB_JOURNAL));
    }

    #[test]
    fn a_full_config_with_defaults() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(
            c.pool,
            PoolChoice::Embedded {
                capacity: 512 << 20,
                spill_dir: None
            }
        );
        let web = &c.services[0];
        assert_eq!(web.spec.policy.idle_threshold, Duration::from_millis(250));
        assert_eq!(
            web.spec.policy.wake_objective,
            Some(Duration::from_millis(200))
        );
        let Launch::Process(p) = &web.spec.launch else {
            panic!("a process")
        };
        assert_eq!(p.cpus, vec![0, 1]);
        assert_eq!(web.hold_queue, 100);
        let kv = &c.services[1];
        assert_eq!(kv.protocol, Protocol::Tcp);
        assert_eq!(kv.spec.policy.idle_threshold, Duration::from_millis(500));
        assert_eq!(kv.spec.policy.max_sleep_rate, 10.0);
        let fds = FdDefaults::for_services(open_file_limit(), 2);
        assert_eq!(kv.hold_queue, fds.hold_queue);
        assert_eq!(kv.gate.max_connections, fds.max_connections);
        assert_eq!(kv.gate.hold_body_limit, 16 << 20);
        assert_eq!(kv.gate.header_read_timeout, Duration::from_secs(10));
        assert_eq!(kv.hold_timeout, Duration::from_secs(30));
    }

    fn err(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn node_namespace_replicas_and_write_quorum() {
        let c = Config::from_toml(GOOD).unwrap();
        assert!(
            validate_namespace(&c.node.namespace).is_ok(),
            "host name made valid"
        );
        assert_eq!(c.node.key_file, PathBuf::from(DEFAULT_NODE_KEY));
        assert_eq!(c.node.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!((c.replicas.len(), c.write_quorum), (0, 1));
        let two = format!(
            "[node]\nnamespace = \"rack1-n7\"\n{}\n[[pool.replica]]\naddress = \"unix:/b\"\n",
            GOOD.replace("[pool]", "[pool]\nwrite_quorum = 1")
        );
        let c = Config::from_toml(&two).unwrap();
        assert_eq!(c.node.namespace, "rack1-n7");
        assert_eq!(
            c.node.kept_file(),
            PathBuf::from(DEFAULT_STATE_DIR).join("kept.rack1-n7")
        );
        assert_eq!((c.replicas.len(), c.write_quorum), (1, 1));
        let e = err(&two.replace("write_quorum = 1", "write_quorum = 3"));
        assert!(e.starts_with("pool.write_quorum"), "{e}");
        let e = err(&two.replace("rack1-n7", "a.b"));
        assert!(e.starts_with("node.namespace"), "{e}");
        let e = err(&two.replace("unix:/b", "nowhere"));
        assert!(e.starts_with("pool.replica[0].address"), "{e}");
        assert_eq!(c.node.memory_budget, None);
        let budget = |v: &str| two.replace("[node]", &format!("[node]\nmemory_budget = {v:?}"));
        let c = Config::from_toml(&budget("6GiB")).unwrap();
        assert_eq!(c.node.memory_budget, Some(6 << 30));
        for bad in ["0", "lots"] {
            let e = err(&budget(bad));
            assert!(e.starts_with("node.memory_budget"), "{bad}: {e}");
        }
    }

    #[test]
    fn user_group_and_limits_are_resolved() {
        let c = Config::from_toml(&GOOD.replace(
            "cpuset = \"0-1\"",
            "cpuset = \"0-1\"\nuser = \"nobody\"\nrlimits = { nofile = [1024, 4096], core = \"unlimited\" }",
        ))
        .unwrap();
        let Launch::Process(p) = &c.services[0].spec.launch else {
            panic!("a process")
        };
        assert_eq!(p.init.uid, Some(65534));
        assert_eq!(p.init.gid, Some(65534));
        assert_eq!(
            p.init.rlimits,
            vec![
                ("core".to_string(), u64::MAX, u64::MAX),
                ("nofile".to_string(), 1024, 4096)
            ]
        );
        let with = |extra: &str| err(&GOOD.replace("cpuset = \"0-1\"", extra));
        assert!(with("user = \"no-such-user-x\"").starts_with("service[0].user"));
        assert!(with("group = \"no-such-group-x\"").starts_with("service[0].group"));
        let e = with("rlimits = { nofiles = 5 }");
        assert!(e.starts_with("service[0].rlimits.nofiles"), "{e}");
        let e = with("rlimits = { nofile = [10, 5] }");
        assert!(e.contains("soft limit above"), "{e}");
        let e = with("rlimits = { nofile = \"many\" }");
        assert!(e.starts_with("service[0].rlimits.nofile"), "{e}");
    }

    #[test]
    fn steering_is_proxy_by_default_and_kernel_only_for_ipv4() {
        let c = Config::from_toml(GOOD).unwrap();
        assert!(c.services.iter().all(|s| !s.kernel_steering));
        let kernel = GOOD.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nsteering = \"kernel\"",
        );
        let c = Config::from_toml(&kernel).unwrap();
        assert!(c.services[1].kernel_steering && !c.services[0].kernel_steering);
        let e = err(&kernel.replace("127.0.0.1:6379", "[::1]:6379"));
        assert!(
            e.starts_with("service[1].steering") && e.contains("IPv4"),
            "{e}"
        );
        let e = err(&kernel.replace("\"kernel\"", "\"ebpf\""));
        assert!(
            e.starts_with("service[1].steering") && e.contains("ebpf"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = err(&GOOD.replace("hold_queue = 100", "hold_queue = 100\nholdqueue = 5"));
        assert!(e.contains("holdqueue"), "{e}");
        let e = err(&GOOD.replace("\"250ms\"", "\"soon\""));
        assert!(e.starts_with("service[0].policy.idle_threshold"), "{e}");
        let e = err(&GOOD.replace("protocol = \"tcp\"", "protocol = \"udp\""));
        assert!(e.contains("udp"), "{e}");
        let e = err(&GOOD.replace("\"0-1\"", "\"1-0\""));
        assert!(e.starts_with("service[0].cpuset"), "{e}");
        let e = err(&GOOD.replace("127.0.0.1:6380", "127.0.0.1:8080"));
        assert!(e.starts_with("service[1].listen"), "{e}");
        let e = err(&GOOD.replace("name = \"kv\"", "name = \"web\""));
        assert!(e.starts_with("service[1].name"), "{e}");
        let e = err(&GOOD.replace("capacity = \"512MiB\"", "capacity = \"lots\""));
        assert!(e.starts_with("pool.capacity"), "{e}");
        let e = err(&GOOD.replace(
            "capacity = \"512MiB\"",
            "capacity = \"1GiB\"\naddress = \"unix:/x\"",
        ));
        assert!(e.starts_with("pool.address"), "{e}");
        let e = err(&GOOD.replace("command = [\"redis-server\"]", "command = []"));
        assert!(e.starts_with("service[1].command"), "{e}");
        let e = err(&GOOD.replace("[status]", "[statsu]"));
        assert!(e.contains("statsu"), "{e}");
        let e = err(&GOOD.replace("command = [\"redis-server\"]", "bundle = \"/nonexistent\""));
        assert!(
            e.starts_with("service[1].bundle") && e.contains("config.json"),
            "{e}"
        );
        let e = err(&GOOD.replace("command = [\"redis-server\"]", ""));
        assert!(e.starts_with("service[1].command"), "{e}");
    }

    #[test]
    fn the_default_hold_queue_and_connection_limits_fit_a_1024_file_limit() {
        let one = FdDefaults::for_services(1024, 1);
        assert!(one.hold_queue <= 256, "{one:?}");
        for n in 1..=8 {
            let d = FdDefaults::for_services(1024, n);
            let services: Vec<ServiceConfig> = Config::from_toml(GOOD)
                .unwrap()
                .services
                .into_iter()
                .cycle()
                .take(n)
                .map(|mut s| {
                    s.hold_queue = d.hold_queue;
                    s.gate.max_connections = d.max_connections;
                    s
                })
                .collect();
            assert_eq!(fd_shortfall(1024, &services), None, "{n} services: {d:?}");
        }
    }

    #[test]
    fn a_hold_queue_beyond_the_file_limit_is_reported() {
        let c = Config::from_toml(&GOOD.replace("hold_queue = 100", "hold_queue = 10000")).unwrap();
        let problem = fd_shortfall(1024, &c.services).expect("over the limit");
        assert!(problem.contains("ulimit -n"), "{problem}");
        assert_eq!(fd_shortfall(1 << 20, &c.services), None);
    }

    #[test]
    fn gate_limits_are_read_and_checked() {
        let c = Config::from_toml(&GOOD.replace(
            "cpuset = \"0-1\"",
            "cpuset = \"0-1\"\nmax_connections = 50\nhold_body_limit = \"1MiB\"\nheader_read_timeout = \"2s\"",
        ))
        .unwrap();
        let g = c.services[0].gate;
        assert_eq!(g.max_connections, 50);
        assert_eq!(g.hold_body_limit, 1 << 20);
        assert_eq!(g.header_read_timeout, Duration::from_secs(2));
        let with = |extra: &str| err(&GOOD.replace("cpuset = \"0-1\"", extra));
        assert!(with("max_connections = 0").starts_with("service[0].max_connections"));
        assert!(with("hold_body_limit = \"big\"").starts_with("service[0].hold_body_limit"));
        assert!(with("header_read_timeout = \"0s\"").starts_with("service[0].header_read_timeout"));
    }

    #[test]
    fn the_control_endpoint_is_a_socket_by_default_or_tcp_with_a_token() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(
            c.control,
            ControlEndpoint::Unix(crate::control::DEFAULT_SOCKET.into())
        );
        let c =
            Config::from_toml(&format!("{GOOD}\n[control]\nsocket = \"/tmp/t/c.sock\"\n")).unwrap();
        assert_eq!(c.control, ControlEndpoint::Unix("/tmp/t/c.sock".into()));
        let c = Config::from_toml(&format!(
            "{GOOD}\n[control]\nlisten = \"127.0.0.1:7080\"\ntoken_file = \"/etc/torpor/control.token\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.control,
            ControlEndpoint::Tcp {
                addr: "127.0.0.1:7080".parse().unwrap(),
                token_file: "/etc/torpor/control.token".into()
            }
        );
        for (control, key) in [
            ("listen = \"127.0.0.1:7080\"", "control.token_file"),
            ("token_file = \"/t\"", "control.token_file"),
            (
                "socket = \"/s\"\nlisten = \"127.0.0.1:7080\"",
                "control.listen",
            ),
            (
                "listen = \"nowhere\"\ntoken_file = \"/t\"",
                "control.listen",
            ),
            (
                "listen = \"127.0.0.1:0\"\ntoken_file = \"/t\"",
                "control.listen",
            ),
            ("socket = \"\"", "control.socket"),
            ("sokcet = \"/s\"", "sokcet"),
        ] {
            let e = err(&format!("{GOOD}\n[control]\n{control}\n"));
            assert!(e.starts_with(key) || e.contains(key), "{control}: {e}");
        }
        let e = err(&format!(
            "{GOOD}\n[control]\nlisten = \"127.0.0.1:8080\"\ntoken_file = \"/t\"\n"
        ));
        assert!(e.starts_with("service[0].listen"), "{e}");
    }

    #[test]
    fn remote_pool() {
        let c = Config::from_toml(
            "[pool]\naddress = \"10.0.0.5:7070\"\ntoken_file = \"/etc/torpor/token\"\n",
        )
        .unwrap();
        assert!(matches!(c.pool, PoolChoice::Remote { .. }));
        assert!(c.services.is_empty());
    }

    #[test]
    fn a_remote_pool_takes_a_pinned_certificate_and_a_client_identity_together() {
        let c = Config::from_toml(
            "[pool]\naddress = \"10.0.0.5:7070\"\ntls_cert = \"/etc/torpor/pool.crt\"\n\
             tls_client_cert = \"/etc/torpor/client.crt\"\ntls_client_key = \"/etc/torpor/client.key\"\n",
        )
        .unwrap();
        let PoolChoice::Remote {
            tls_cert,
            tls_client,
            insecure,
            ..
        } = c.pool
        else {
            panic!("remote pool expected")
        };
        assert_eq!(tls_cert, Some(PathBuf::from("/etc/torpor/pool.crt")));
        assert!(tls_client.is_some());
        assert!(!insecure);
        let e = err("[pool]\naddress = \"10.0.0.5:7070\"\ntls_cert = \"/p.crt\"\ntls_client_cert = \"/c.crt\"\n");
        assert!(e.starts_with("pool.tls_client_cert"), "{e}");
        let e = err("[pool]\ncapacity = \"64MiB\"\ninsecure = true\n");
        assert!(e.starts_with("pool.tls_cert"), "{e}");
    }
}
