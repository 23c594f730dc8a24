//! Options more than one command takes: the pool to talk to, the `torpor up` to command, how
//! CRIU treats the tree.

use std::{path::PathBuf, sync::Arc};

use anyhow::Result;
use torpor_criu::{PoolTarget, Pools, TcpConnections};
use torpor_image::NodeKey;
use torpor_pool::PoolAddr;

/// Where a running `torpor up` takes commands: its control socket by default.
#[derive(Debug, clap::Args)]
pub struct ControlOpt {
    /// Its control socket (control.socket in torpor.toml) [default: /run/torpor/control.sock].
    #[arg(long, conflicts_with_all = ["control", "addr"])]
    pub socket: Option<PathBuf>,
    /// Its status address: the control endpoint is looked up there.
    #[arg(long, conflicts_with = "control")]
    pub addr: Option<std::net::SocketAddr>,
    /// Its TCP control address (control.listen), with --token-file.
    #[arg(long)]
    pub control: Option<std::net::SocketAddr>,
    /// The TCP control endpoint's token file (control.token_file).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Which pool a command reads or writes, and how it connects.
#[derive(Debug, clap::Args)]
pub struct PoolOpt {
    /// Pool address: HOST:PORT or unix:PATH.
    #[arg(long)]
    pub pool: PoolAddr,
    /// File holding the pool's token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// This node's key: checkpoints are sealed with it and a restore refuses a snapshot it
    /// cannot verify with it (created, 0600, when absent).
    #[arg(long, default_value = torpor_up::config::DEFAULT_NODE_KEY)]
    node_key: PathBuf,
    /// The pool's certificate (PEM), pinned: the connection uses TLS and trusts exactly it.
    #[arg(long)]
    pool_cert: Option<PathBuf>,
    /// Client certificate for a pool that requires mutual TLS (PEM).
    #[arg(long, requires_all = ["pool_cert", "pool_client_key"])]
    pool_client_cert: Option<PathBuf>,
    /// The client certificate's key (PEM, mode 0600).
    #[arg(long, requires = "pool_client_cert")]
    pool_client_key: Option<PathBuf>,
    /// Allow plaintext TCP to a pool that is not on loopback (token and snapshots in clear).
    #[arg(long)]
    pool_insecure: bool,
}

impl PoolOpt {
    /// The pool with this node's key, for commands that write or restore snapshots.
    pub fn pools(&self) -> Result<Pools> {
        let key = NodeKey::load_or_create(&self.node_key)?;
        Ok(Pools::single(self.target()?, Arc::new(key)))
    }

    /// The pool as a connection target: its token, pinned certificate and transport rules.
    pub fn target(&self) -> Result<PoolTarget> {
        let token = torpor_pool::read_token(self.token_file.as_deref())?;
        let tls = match &self.pool_cert {
            Some(cert) => Some(torpor_pool::ClientTls::pinned(
                cert,
                self.pool_client_cert
                    .as_deref()
                    .zip(self.pool_client_key.as_deref()),
            )?),
            None => None,
        };
        Ok(PoolTarget::new(self.pool.clone(), token)
            .with_tls(tls)
            .with_insecure(self.pool_insecure))
    }
}

/// How the process tree was (or is to be) checkpointed: the same flags at checkpoint and restore.
#[derive(Debug, clap::Args)]
pub struct CriuFlags {
    /// The tree runs in a terminal session.
    #[arg(long)]
    pub shell_job: bool,
    /// Restore established TCP connections closed instead of keeping them (kept ones
    /// are held behind iptables rules by CRIU until the restore); a restore takes what the
    /// checkpoint was given.
    #[arg(long)]
    pub tcp_close: bool,
}

impl CriuFlags {
    /// What becomes of established TCP connections.
    pub fn tcp(&self) -> TcpConnections {
        if self.tcp_close {
            TcpConnections::Close
        } else {
            TcpConnections::Keep
        }
    }
}
