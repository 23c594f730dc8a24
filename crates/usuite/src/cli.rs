//! `torpor usuite SERVICE TIER`: one process of one tier (bucket, mid-tier, or the client that
//! loads the mid-tier).

use std::{future::Future, net::SocketAddr, path::PathBuf};

use thiserror::Error;
use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::{
    hdsearch, recommend, router, setalgebra,
    tier::{serve, DataArgs},
    Service,
};

#[derive(Debug, clap::Args)]
pub struct UsuiteArgs {
    pub service: Service,
    #[command(subcommand)]
    pub tier: TierCmd,
}

#[derive(Debug, clap::Subcommand)]
pub enum TierCmd {
    /// A bucket: one shard of the data (Router: in front of a memcached).
    Bucket {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 0)]
        shard: usize,
        #[arg(long, default_value_t = 1)]
        shards: usize,
        /// Router: the memcached this bucket fronts.
        #[arg(long)]
        memcached: Option<SocketAddr>,
        /// Write the bound port here once listening.
        #[arg(long)]
        port_file: Option<PathBuf>,
        #[command(flatten)]
        data: DataArgs,
    },
    /// The mid-tier: fans out to the buckets (in shard order) and merges.
    Mid {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, value_delimiter = ',', required = true)]
        buckets: Vec<SocketAddr>,
        /// Router: buckets each key is stored on.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
        #[arg(long)]
        port_file: Option<PathBuf>,
        #[command(flatten)]
        data: DataArgs,
    },
    /// The client: open-loop load on the mid-tier.
    Client {
        #[arg(long)]
        mid: SocketAddr,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        run: torpor_loadgen::RunArgs,
    },
}

/// Why a tier could not run.
#[derive(Debug, Error)]
pub enum TierError {
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error("cannot write the port file {0}")]
    PortFile(PathBuf, #[source] std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error("cannot take connections")]
    Incoming(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("gRPC server")]
    Serve(#[from] tonic::transport::Error),
}

/// Runs a bucket or mid-tier until `shutdown` (the client is run by the caller with the loadgen).
pub async fn run_server(
    service: Service,
    tier: TierCmd,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TierError> {
    let (listen, port_file) = match &tier {
        TierCmd::Bucket {
            listen, port_file, ..
        }
        | TierCmd::Mid {
            listen, port_file, ..
        } => (*listen, port_file.clone()),
        TierCmd::Client { .. } => {
            return Err(TierError::Usage("the client is not a server".into()))
        }
    };
    let mut server = Server::builder();
    let router = match tier {
        TierCmd::Bucket {
            shard,
            shards,
            memcached,
            data,
            ..
        } => {
            if shards == 0 || shard >= shards {
                return Err(TierError::Usage(format!(
                    "shard {shard} of {shards}: need shard < shards"
                )));
            }
            match service {
                Service::Hdsearch => {
                    server.add_service(hdsearch::Bucket::new(&data, shard, shards))
                }
                Service::Setalgebra => {
                    server.add_service(setalgebra::Bucket::new(&data, shard, shards))
                }
                Service::Recommend => {
                    server.add_service(recommend::Bucket::new(&data, shard, shards))
                }
                Service::Router => {
                    let m = memcached.ok_or_else(|| {
                        TierError::Usage("a Router bucket needs --memcached HOST:PORT".into())
                    })?;
                    server.add_service(router::Bucket::new(m))
                }
            }
        }
        TierCmd::Mid {
            buckets,
            replicas,
            data,
            ..
        } => match service {
            Service::Hdsearch => server.add_service(hdsearch::Mid::new(&data, &buckets)),
            Service::Setalgebra => server.add_service(setalgebra::Mid::new(&buckets)),
            Service::Recommend => server.add_service(recommend::Mid::new(&data, &buckets)),
            Service::Router => server.add_service(router::Mid::new(&buckets, replicas)),
        },
        TierCmd::Client { .. } => unreachable!("handled above"),
    };
    // Data sets are built before listening, so accepting connections means ready.
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| TierError::Listen(listen, e))?;
    if let Some(p) = port_file {
        let port = listener
            .local_addr()
            .map_err(|e| TierError::Listen(listen, e))?
            .port();
        std::fs::write(&p, port.to_string()).map_err(|e| TierError::PortFile(p, e))?;
    }
    serve(listener, router, shutdown).await?;
    Ok(())
}
