//! `torpor up`: the embedded default. One process runs the memory pool (or uses a remote
//! one), the agent and one gate per service, from one `torpor.toml`, plus the status API
//! (`/` as a live HTML page, `/status` as JSON, `/metrics` as Prometheus text) that `torpor
//! status` reads, and the control endpoint that `torpor sleep`, `wake`, `pin`, `unpin`,
//! `reload` and `stop` talk to. Started by systemd (`Type=notify`), it says `READY=1` once every gate listens
//! and `STOPPING=1` when its stop begins ([`notify`]).

pub mod config;
pub mod control;
pub mod notify;
pub mod page;
pub mod reload;
pub mod status;

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use thiserror::Error;
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};
use torpor_agent::{
    Agent, AgentError, ManualCommand, ManualResult, ServiceStatus, Snapshots, SteeringMode,
};
use torpor_control::ServiceLink;
use torpor_criu::{CriuBinary, PoolTarget, Pools};
use torpor_image::NodeKey;
use torpor_pool::{PoolAddr, Store, StoreConfig};
use tracing::{info, warn};

pub use config::{Config, ConfigError, PoolChoice};

/// Why `torpor up` could not run.
#[derive(Debug, Error)]
pub enum UpError {
    #[error("cannot use the node key")]
    NodeKey(#[source] torpor_image::seal::KeyError),
    #[error("cannot start the embedded pool")]
    Pool(#[source] torpor_pool::StoreError),
    #[error("cannot listen on {addr} for {what}")]
    Listen {
        addr: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("the pool token file is refused")]
    Token(#[source] torpor_pool::TokenFileError),
    #[error("loading the pool's TLS settings failed")]
    PoolTls(#[source] torpor_pool::TlsError),
    #[error("the pool cannot be reached safely")]
    PoolTransport(#[source] torpor_pool::ClientError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("i/o failed")]
    Io(#[from] std::io::Error),
    #[error("stopped before it was ready")]
    StoppedBeforeReady,
}

/// Where a reload reads the configuration again, and the SIGHUPs that ask for one.
#[derive(Debug)]
pub struct ReloadSource {
    /// The configuration file `torpor up` was started from.
    pub path: PathBuf,
    /// SIGHUP, its handler installed by the caller before anything started (a SIGHUP
    /// before that would end the process); `None` takes reloads from `torpor reload` only.
    pub hangups: Option<tokio::signal::unix::Signal>,
}

/// What is up, for the caller to print.
#[derive(Debug, Clone)]
pub struct UpInfo {
    pub pool: String,
    pub status_addr: std::net::SocketAddr,
    /// Where manual commands are taken.
    pub control: control::ControlHint,
    pub services: Vec<(String, std::net::SocketAddr)>,
}

/// A running `torpor up`, from [`start`] or [`start_reloadable`]: what it serves, its agent,
/// and the way to stop it. Dropping the handle asks it to stop, without waiting.
#[derive(Debug)]
pub struct UpHandle {
    info: UpInfo,
    agent: Arc<Agent>,
    /// Asks the task to stop (sent, or dropped with the handle).
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), UpError>>,
}

impl UpHandle {
    /// What is up: the pool, the status API, the control endpoint, each service's gate.
    pub fn info(&self) -> &UpInfo {
        &self.info
    }

    /// The agent itself, for callers in the same process that read its state as it changes
    /// (experiments, the demo) or give it manual commands without the control endpoint.
    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// Every service's status now, as `torpor status` shows it.
    pub fn status(&self) -> Vec<ServiceStatus> {
        self.agent.status()
    }

    /// Gives service `name` a manual command (wake, sleep, pin, unpin) as `torpor wake` and
    /// its siblings do through the control endpoint; `by` names the caller in the service's
    /// history.
    pub async fn command(&self, name: &str, command: ManualCommand, by: &str) -> ManualResult {
        self.agent.manual(name, command, by).await
    }

    /// Stops everything (see [`start_reloadable`] for what stopping does) and waits until it has.
    pub async fn shutdown(self) -> Result<(), UpError> {
        let _ = self.stop.send(());
        self.task.await.expect("torpor up's task panicked")
    }

    /// Waits until it stops by itself: `torpor stop` through the control endpoint, or the
    /// `shutdown` future given to [`start_reloadable`].
    pub async fn stopped(self) -> Result<(), UpError> {
        let _stop = self.stop;
        self.task.await.expect("torpor up's task panicked")
    }
}

/// [`start_reloadable`] without reloads, stopped only through the handle (or `torpor stop`).
pub async fn start(config: Config, criu: CriuBinary) -> Result<UpHandle, UpError> {
    start_reloadable(config, None, criu, std::future::pending()).await
}

/// Starts everything in a task of the current Tokio runtime and returns once it is all up:
/// every gate accepts and every service has started. It runs until `shutdown` resolves, the
/// handle stops it, or `torpor stop` comes; then it stops it all: held requests get an
/// error; when the pool outlives this process (a remote pool, or the embedded one with a
/// disk tier) every awake service is checkpointed into it and the embedded pool's RAM tier
/// written to its disk tier, so the next start adopts every service asleep with its state;
/// otherwise (or when its checkpoint fails) a service is killed and reaped, and its state is
/// lost. The embedded pool is dropped last. `torpor stop --keep-running` leaves the awake
/// services running instead, listed in the node's kept-services file for the next start to
/// adopt awake.
///
/// `shutdown` may resolve at any moment, also while things start: before the agent starts
/// nothing is left to undo; during the agent's start what started is stopped (and services
/// still starting are killed rather than waited for); then this returns
/// [`UpError::StoppedBeforeReady`]. Pass a future whose signal handlers are already
/// installed (not one that installs them when first polled), or a signal arriving before
/// that poll is lost.
///
/// The status API is served only once everything is up: a `/status` answer means the whole
/// configuration is up. Its listener is bound first (with the gates'), so a taken address
/// fails before anything starts, and a client that connects earlier waits for the first
/// answer.
///
/// Reloads (`torpor reload`, and SIGHUP when `source` brings its handler) read `source`'s
/// file again; see [`reload`]. A reload is framed by `RELOADING=1` and `READY=1` under
/// systemd. Without `source` a reload is refused.
///
/// Under systemd (`NOTIFY_SOCKET` set) it notifies `READY=1` when it returns, and
/// `STOPPING=1` as soon as a stop is asked for, whenever that is; a notification that cannot
/// be sent is logged, not fatal.
pub async fn start_reloadable(
    config: Config,
    source: Option<ReloadSource>,
    criu: CriuBinary,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<UpHandle, UpError> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            // Sent, or the handle dropped.
            _ = stop_rx => {}
        }
    };
    let task = tokio::spawn(serve(config, source, criu, shutdown, ready_tx));
    match ready_rx.await {
        Ok((info, agent)) => Ok(UpHandle {
            info,
            agent,
            stop,
            task,
        }),
        Err(_) => Err(task
            .await
            .expect("torpor up's task panicked")
            .err()
            .unwrap_or(UpError::StoppedBeforeReady)),
    }
}

/// Everything [`start_reloadable`] runs, in its task; `ready` hears once all is up.
async fn serve(
    config: Config,
    source: Option<ReloadSource>,
    criu: CriuBinary,
    shutdown: impl Future<Output = ()>,
    ready: oneshot::Sender<(UpInfo, Arc<Agent>)>,
) -> Result<(), UpError> {
    let (path, hangups) = match source {
        Some(s) => (Some(s.path), s.hangups),
        None => (None, None),
    };
    let notifier = notify::Notifier::from_env()
        .inspect_err(|e| warn!(error = %e, "systemd will not hear that torpor up is ready"))
        .unwrap_or_else(|_| notify::Notifier::none());
    let say = |r: Result<(), notify::NotifyError>| {
        if let Err(e) = r {
            warn!(error = %torpor_pool::error_chain(&e), "telling systemd failed");
        }
    };
    tokio::pin!(shutdown);
    // `biased`: a stop already requested wins over a step that is also done.
    let bound = tokio::select! {
        biased;
        _ = &mut shutdown => {
            say(notifier.stopping("stopped before any service started"));
            info!("stop requested before any service started");
            return Ok(());
        }
        bound = bind_all(&config) => bound?,
    };
    say(notifier.status(&format!("starting {} service(s)", config.services.len())));
    let Bound {
        snapshots,
        pool_desc,
        pool_task,
        embedded,
        _pool_dir,
        gates,
        status_listener,
        control_listener,
    } = bound;
    if !snapshots.survives_stop && !config.ephemeral {
        warn!("{LOSSY_STOP}");
    }
    let status_addr = status_listener.local_addr()?;
    // CRIU's kernel-feature cache for as long as services may be checkpointed and restored:
    // some 25 ms off every CRIU start where /run is not a tmpfs.
    let _criu_cache = {
        let criu = criu.clone();
        tokio::task::spawn_blocking(move || torpor_criu::kdat::KdatCache::provide(&criu))
            .await
            .expect("CRIU cache task panicked")
    }
    .inspect_err(|e| warn!(error = %torpor_pool::error_chain(e), "CRIU's kernel-feature cache is unavailable; every CRIU start probes the kernel"))
    .ok();
    let agent_services: Vec<_> = gates
        .iter()
        .map(|g| (g.spec.clone(), g.link.clone()))
        .collect();
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let start = Agent::start(
        criu,
        snapshots,
        agent_services,
        Some(config.power.clone()),
        config.node.memory_budget,
        config.node.kept_file(),
        cancel_rx,
    );
    tokio::pin!(start);
    let started = tokio::select! {
        biased;
        _ = &mut shutdown => {
            say(notifier.stopping("stopping the services that started"));
            info!("stop requested while the services start; stopping what started");
            let _ = cancel_tx.send(true);
            start.await
        }
        r = &mut start => r,
    };
    let agent = match started {
        Ok(agent) if !*cancel_tx.borrow() => Some(Arc::new(agent)),
        Ok(agent) => {
            // It finished starting as the stop came: its loop, with the stop already
            // given, only stops the services.
            let (_stop_tx, stop_rx) = watch::channel(true);
            agent.run(stop_rx).await;
            None
        }
        Err(AgentError::Cancelled) => None,
        Err(e) => return Err(e.into()),
    };
    let Some(agent) = agent else {
        if let Some(t) = pool_task {
            t.stop().await;
        }
        persist(embedded).await;
        info!("stopped before it was ready");
        return Ok(());
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let agent_loop = {
        let (agent, stop) = (agent.clone(), stop_rx.clone());
        tokio::spawn(async move { agent.run(stop).await })
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut services = Vec::new();
    for g in &gates {
        services.push((g.link.name.clone(), g.listener.local_addr()?));
    }
    // What runs keeps its steering across reloads: the reloader compares and respecs from here.
    let mut config = config;
    for (s, g) in config.services.iter_mut().zip(&gates) {
        s.spec.steering = g.spec.steering.clone();
    }
    let reloader = Arc::new(reload::Reloader::start(
        agent.clone(),
        &config,
        path,
        gates.into_iter().map(|g| (g.listener, g.link)).collect(),
        stop_rx.clone(),
        notifier.clone(),
    ));
    if let Some(mut hangups) = hangups {
        let (reloader, mut stop) = (reloader.clone(), stop_rx.clone());
        tasks.spawn(async move {
            loop {
                let stopped = async {
                    let _ = stop.wait_for(|s| *s).await;
                };
                tokio::select! {
                    _ = stopped => break,
                    hup = hangups.recv() => match hup {
                        Some(()) => drop(reloader.reload("SIGHUP").await),
                        None => break,
                    },
                }
            }
        });
    }
    let control_hint = control_listener.hint().clone();
    // `torpor stop` through the control endpoint.
    let stop_ordered = Arc::new(watch::Sender::new(false));
    {
        let (agent, reloader, mut stop) = (agent.clone(), reloader.clone(), stop_rx.clone());
        let ordered = stop_ordered.clone();
        tasks.spawn(async move {
            control::serve(control_listener, agent, reloader, ordered, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        });
    }
    // Last: the status API answers only once everything above runs.
    {
        let (agent, mut stop) = (agent.clone(), stop_rx.clone());
        let (hint, last_reload) = (control_hint.clone(), reloader.last());
        tasks.spawn(async move {
            status::serve(status_listener, agent, hint, last_reload, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        });
    }
    let info = UpInfo {
        pool: pool_desc,
        status_addr,
        control: control_hint,
        services,
    };
    info!(services = info.services.len(), "ready");
    // Every gate's listener was bound (listening) before the services started, and its task
    // runs from here on; the status API's too.
    say(notifier.ready(&format!(
        "{} service(s) behind their gates; status API on {}",
        info.services.len(),
        info.status_addr
    )));
    // The caller may have gone (its start abandoned): then it runs until stopped.
    let _ = ready.send((info, agent.clone()));
    let mut ordered = stop_ordered.subscribe();
    tokio::select! {
        _ = shutdown => {}
        _ = ordered.wait_for(|s| *s) => {}
    }
    say(notifier.stopping(if agent.keeps_running() {
        "stopping: the awake services keep running for the next start"
    } else if agent.survives_stop() {
        "stopping: checkpointing the awake services into the pool"
    } else {
        "stopping: the services are killed (their state is not kept)"
    }));
    info!("stopping");
    if !agent.survives_stop() && !config.ephemeral && !agent.keeps_running() {
        warn!("{LOSSY_STOP}");
    }
    // A reload under way finishes first; none starts after.
    let gate_tasks = reloader.stop().await;
    let _ = stop_tx.send(true);
    let _ = agent_loop.await;
    for g in gate_tasks {
        g.join().await;
    }
    while tasks.join_next().await.is_some() {}
    if let Some(t) = pool_task {
        t.stop().await;
    }
    persist(embedded).await;
    Ok(())
}

/// Said at start and at stop when stopping loses the services' state.
const LOSSY_STOP: &str = "stopping loses the state of every service (the awake ones', and the asleep ones' in the embedded pool's RAM tier): set [pool] spill_dir or use a remote pool";

/// Writes what the embedded pool holds in RAM to its disk tier, once nothing uses it any
/// more, so that the next start finds every snapshot there. Failures are logged: the stop
/// goes on.
async fn persist(store: Option<Arc<Store>>) {
    let Some(store) = store else { return };
    let persisted = tokio::task::spawn_blocking(move || store.persist_all())
        .await
        .expect("persist task panicked");
    match persisted {
        Ok(p) => {
            for e in &p.failed {
                warn!(error = %torpor_pool::error_chain(e), "a snapshot could not be written to the disk tier; the state it holds is lost");
            }
            info!(
                snapshots = p.snapshots,
                bytes = p.bytes,
                failed = p.failed.len(),
                "the embedded pool's RAM tier is written to its disk tier for the next start"
            );
        }
        Err(e) => {
            warn!(error = %torpor_pool::error_chain(&e), "the embedded pool's snapshots could not be kept")
        }
    }
}

/// One service's gate, bound but not yet serving.
struct Gate {
    listener: TcpListener,
    spec: torpor_agent::ServiceSpec,
    link: Arc<ServiceLink>,
}

/// Everything `torpor up` listens on, and the pool, before any service starts.
struct Bound {
    snapshots: Snapshots,
    pool_desc: String,
    pool_task: Option<AbortOnDrop>,
    /// The embedded pool's store when it has a disk tier, written there at stop.
    embedded: Option<Arc<Store>>,
    _pool_dir: Option<tempfile::TempDir>,
    gates: Vec<Gate>,
    status_listener: TcpListener,
    control_listener: control::ControlListener,
}

/// Starts the pool and binds every gate and the status API. Dropping the future midway
/// leaves nothing running (the pool's task is aborted with its handle).
async fn bind_all(config: &Config) -> Result<Bound, UpError> {
    // First: a control socket another torpor up holds is refused before the pool's memory
    // is taken.
    let control_listener = control::ControlListener::bind(&config.control).await?;
    let (pool_target, pool_desc, pool_task, pool_dir, embedded) = start_pool(config).await?;
    let snapshots = snapshots(config, pool_target)?;
    let mut gates = Vec::new();
    for s in &config.services {
        let listener = TcpListener::bind(s.listen)
            .await
            .map_err(|source| UpError::Listen {
                addr: s.listen.to_string(),
                what: format!("service {:?}", s.spec.name),
                source,
            })?;
        let mut spec = s.spec.clone();
        spec.steering = steering_for(s, listener.local_addr()?);
        gates.push(Gate {
            listener,
            spec,
            link: reload::link_for(s),
        });
    }
    let status_listener = TcpListener::bind(config.status_listen)
        .await
        .map_err(|source| UpError::Listen {
            addr: config.status_listen.to_string(),
            what: "the status API".into(),
            source,
        })?;
    Ok(Bound {
        snapshots,
        pool_desc,
        pool_task: pool_task.map(|t| AbortOnDrop(Some(t))),
        embedded,
        _pool_dir: pool_dir,
        gates,
        status_listener,
        control_listener,
    })
}

/// How new connections reach service `s`, whose gate listens on `public`, while it is
/// awake: with `steering = "kernel"`, an sk_lookup program attached to this process's
/// network namespace for `public` (detached when the last holder drops it, at the latest
/// when torpor exits); where the host cannot, the gate proxies and the status says why.
pub(crate) fn steering_for(
    s: &config::ServiceConfig,
    public: std::net::SocketAddr,
) -> SteeringMode {
    if !s.kernel_steering {
        return SteeringMode::Proxy;
    }
    let attached = match public {
        std::net::SocketAddr::V4(public) => {
            torpor_steer::KernelSteering::attach_here(public).map_err(|e| e.to_string())
        }
        std::net::SocketAddr::V6(public) => Err(format!("{public} is not IPv4")),
    };
    match attached {
        Ok(k) => {
            info!(service = %s.spec.name, %public, "kernel steering attached");
            SteeringMode::Kernel(Arc::new(k))
        }
        Err(e) => {
            let why = format!("kernel steering is unavailable here ({e}); the gate proxies");
            warn!(service = %s.spec.name, "{why}");
            SteeringMode::Fallback(why)
        }
    }
}

/// A task aborted when its handle is dropped (the embedded pool's server), so that an
/// abandoned start-up leaves it not running.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    /// Aborts the task and waits until it is gone (and with it the memory it holds).
    async fn stop(mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
            let _ = handle.await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = &self.0 {
            handle.abort();
        }
    }
}

/// A remote pool as configured: its token, pinned certificate (and client identity); a
/// plaintext pool off this host fails here, not at the first checkpoint.
fn remote_target(
    addr: &PoolAddr,
    token_file: Option<&std::path::Path>,
    tls_cert: Option<&std::path::Path>,
    tls_client: Option<&(PathBuf, PathBuf)>,
    insecure: bool,
) -> Result<(PoolTarget, String), UpError> {
    let token = torpor_pool::read_token(token_file).map_err(UpError::Token)?;
    let tls = match tls_cert {
        Some(cert) => Some(
            torpor_pool::ClientTls::pinned(
                cert,
                tls_client.map(|(c, k)| (c.as_path(), k.as_path())),
            )
            .map_err(UpError::PoolTls)?,
        ),
        None => None,
    };
    let target = PoolTarget::new(addr.clone(), token)
        .with_tls(tls)
        .with_insecure(insecure);
    target.check_transport().map_err(UpError::PoolTransport)?;
    let desc = match (&target.tls, target.insecure) {
        (Some(_), _) => format!("remote pool {addr} (TLS, pinned certificate)"),
        (None, true) => format!("remote pool {addr} (plaintext, insecure)"),
        (None, false) => format!("remote pool {addr}"),
    };
    Ok((target, desc))
}

/// The pools (the main one, then every replica) and the node key, with this node's namespace.
fn snapshots(config: &Config, main: PoolTarget) -> Result<Snapshots, UpError> {
    let mut replicas = vec![main];
    for r in &config.replicas {
        let (target, desc) = remote_target(
            &r.addr,
            r.token_file.as_deref(),
            r.tls_cert.as_deref(),
            None,
            r.insecure,
        )?;
        info!(replica = %desc, "snapshots are also committed to this pool");
        replicas.push(target);
    }
    // Snapshots that only ever live in this process's own embedded pool need no seal; any
    // pool outside it (remote, or a replica) gets sealed snapshots only.
    let in_process =
        matches!(config.pool, PoolChoice::Embedded { .. }) && config.replicas.is_empty();
    let key = match in_process {
        true => None,
        false => Some(Arc::new(
            NodeKey::load_or_create(&config.node.key_file).map_err(UpError::NodeKey)?,
        )),
    };
    Ok(Snapshots {
        survives_stop: match &config.pool {
            PoolChoice::Remote { .. } => true,
            PoolChoice::Embedded { spill_dir, .. } => spill_dir.is_some(),
        },
        pools: Pools {
            replicas,
            write_quorum: config.write_quorum,
            key,
        },
        namespace: config.node.namespace.clone(),
    })
}

type PoolStart = (
    PoolTarget,
    String,
    Option<tokio::task::JoinHandle<()>>,
    Option<tempfile::TempDir>,
    Option<Arc<Store>>,
);

async fn start_pool(config: &Config) -> Result<PoolStart, UpError> {
    match &config.pool {
        PoolChoice::Remote {
            addr,
            token_file,
            tls_cert,
            tls_client,
            insecure,
        } => {
            let (target, desc) = remote_target(
                addr,
                token_file.as_deref(),
                tls_cert.as_deref(),
                tls_client.as_ref(),
                *insecure,
            )?;
            Ok((target, desc, None, None, None))
        }
        PoolChoice::Embedded {
            capacity,
            spill_dir,
        } => {
            let cfg = StoreConfig {
                capacity: *capacity,
                spill_dir: spill_dir.clone(),
                keep: 2,
            };
            let store = tokio::task::spawn_blocking(move || Store::open(cfg))
                .await
                .expect("pool open task panicked")
                .map_err(UpError::Pool)?;
            let dir = tempfile::Builder::new().prefix("torpor-up-").tempdir()?;
            let addr = PoolAddr::Unix(dir.path().join("pool.sock"));
            let token = torpor_pool::random_token();
            let listener =
                torpor_pool::Listener::bind(&addr)
                    .await
                    .map_err(|source| UpError::Listen {
                        addr: addr.to_string(),
                        what: "the embedded pool".into(),
                        source,
                    })?;
            let desc = format!(
                "embedded pool, {} RAM tier (volatile){}",
                torpor_image::format_bytes(store.capacity_bytes()),
                spill_dir
                    .as_ref()
                    .map(|d| format!(", disk tier {}", d.display()))
                    .unwrap_or_default()
            );
            let task_token: Arc<str> = token.clone().into();
            let store = Arc::new(store);
            let kept = spill_dir.is_some().then(|| store.clone());
            let task = tokio::spawn(async move {
                let _ =
                    torpor_pool::serve(listener, store, Some(task_token), std::future::pending())
                        .await;
            });
            Ok((
                PoolTarget::new(addr, token),
                desc,
                Some(task),
                Some(dir),
                kept,
            ))
        }
    }
}

/// Default drain deadline for in-flight requests before a checkpoint.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
