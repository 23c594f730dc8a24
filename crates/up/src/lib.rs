//! `torpor up`: the embedded default. One process runs the memory pool (or uses a remote
//! one), the agent and one gate per service, from one `torpor.toml`, plus the status API
//! (`/status` as JSON, `/metrics` as Prometheus text) that `torpor status` reads.

pub mod config;
pub mod status;

use std::{future::Future, sync::Arc, time::Duration};

use thiserror::Error;
use tokio::{net::TcpListener, sync::watch};
use torpor_agent::{Agent, AgentError};
use torpor_control::{HoldLimits, ServiceLink};
use torpor_criu::{CriuBinary, PoolTarget};
use torpor_pool::{PoolAddr, Store, StoreConfig};
use tracing::info;

pub use config::{Config, ConfigError, PoolChoice};

/// Why `torpor up` could not run.
#[derive(Debug, Error)]
pub enum UpError {
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
    #[error("reading the pool token file failed")]
    Token(#[source] std::io::Error),
    #[error("i/o failed")]
    Io(#[from] std::io::Error),
}

/// What is up, for the caller to print.
#[derive(Debug, Clone)]
pub struct UpInfo {
    pub pool: String,
    pub status_addr: std::net::SocketAddr,
    pub services: Vec<(String, std::net::SocketAddr)>,
}

/// Runs everything until `shutdown` resolves, then stops it all: held requests get an
/// error, services are killed and reaped, the embedded pool is dropped.
pub async fn run(
    config: Config,
    criu: CriuBinary,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(&UpInfo, &Arc<Agent>),
) -> Result<(), UpError> {
    let (pool_target, pool_desc, pool_task, _pool_dir) = start_pool(&config).await?;
    let mut gate_listeners = Vec::new();
    let mut agent_services = Vec::new();
    let mut links = Vec::new();
    for s in &config.services {
        let listener = TcpListener::bind(s.listen)
            .await
            .map_err(|source| UpError::Listen {
                addr: s.listen.to_string(),
                what: format!("service {:?}", s.spec.name),
                source,
            })?;
        let link = ServiceLink::new(
            &s.spec.name,
            HoldLimits {
                depth: s.hold_queue,
                timeout: s.hold_timeout,
            },
        );
        gate_listeners.push((listener, s.protocol, s.spec.backend, link.clone()));
        agent_services.push((s.spec.clone(), link.clone()));
        links.push(link);
    }
    let status_listener = TcpListener::bind(config.status_listen)
        .await
        .map_err(|source| UpError::Listen {
            addr: config.status_listen.to_string(),
            what: "the status API".into(),
            source,
        })?;
    let status_addr = status_listener.local_addr()?;

    let agent = Arc::new(
        Agent::start(
            criu,
            pool_target,
            agent_services,
            Some(config.power.clone()),
        )
        .await?,
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut services = Vec::new();
    for (listener, protocol, backend, link) in gate_listeners {
        services.push((link.name.clone(), listener.local_addr()?));
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let _ = torpor_gate::run(listener, protocol, backend, link, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        });
    }
    {
        let (agent, mut stop) = (agent.clone(), stop_rx.clone());
        tasks.spawn(async move {
            let _ = status::serve(status_listener, agent, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        });
    }
    let info = UpInfo {
        pool: pool_desc,
        status_addr,
        services,
    };
    on_ready(&info, &agent);
    let agent_loop = {
        let (agent, stop) = (agent.clone(), stop_rx.clone());
        tokio::spawn(async move { agent.run(stop).await })
    };
    shutdown.await;
    info!("stopping");
    for l in &links {
        l.shut_down();
    }
    let _ = stop_tx.send(true);
    let _ = agent_loop.await;
    while tasks.join_next().await.is_some() {}
    if let Some(t) = pool_task {
        t.abort();
        let _ = t.await;
    }
    Ok(())
}

type PoolStart = (
    PoolTarget,
    String,
    Option<tokio::task::JoinHandle<()>>,
    Option<tempfile::TempDir>,
);

async fn start_pool(config: &Config) -> Result<PoolStart, UpError> {
    match &config.pool {
        PoolChoice::Remote { addr, token_file } => {
            let token = match token_file {
                Some(f) => std::fs::read_to_string(f)
                    .map_err(UpError::Token)?
                    .trim()
                    .to_string(),
                None => String::new(),
            };
            Ok((
                PoolTarget {
                    addr: addr.clone(),
                    token,
                },
                format!("remote pool {addr}"),
                None,
                None,
            ))
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
            let task = tokio::spawn(async move {
                let _ = torpor_pool::serve(
                    listener,
                    Arc::new(store),
                    Some(task_token),
                    std::future::pending(),
                )
                .await;
            });
            Ok((PoolTarget { addr, token }, desc, Some(task), Some(dir)))
        }
    }
}

/// Default drain deadline for in-flight requests before a checkpoint.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
