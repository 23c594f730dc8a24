//! `torpor pool`: a memory pool server until SIGTERM or SIGINT.

use std::{path::PathBuf, sync::Arc, time::Instant};

use anyhow::{bail, Context, Result};
use torpor_image::{duration_arg, format_bytes, size_arg};
use torpor_pool::{PoolAddr, Store, StoreConfig};

use crate::signals::shutdown_signal;

/// Arguments of `torpor pool`.
#[derive(Debug, clap::Args)]
pub struct PoolArgs {
    /// HOST:PORT, or unix:PATH for the same-host fast path.
    #[arg(long)]
    listen: PoolAddr,
    /// RAM tier size, pre-faulted at start (e.g. 8GiB).
    #[arg(long, value_parser = size_arg)]
    capacity: u64,
    /// Disk tier: least-recently-used snapshots move here when RAM is full.
    #[arg(long)]
    spill_dir: Option<PathBuf>,
    /// File holding the shared token clients must present.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve a TCP address without a token (anyone who can connect can read snapshots).
    #[arg(long)]
    no_auth: bool,
    /// Generations kept per snapshot name.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    keep: u64,
    /// Connections served at once [default: 3/4 of the open-file limit]; beyond it new
    /// connections replace unauthenticated ones, oldest first, or are closed.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Time a new connection has to authenticate (send Hello).
    #[arg(long, default_value = "5s", value_parser = duration_arg)]
    hello_timeout: std::time::Duration,
    /// An authenticated connection with nothing in progress is closed after this long.
    #[arg(long, default_value = "120s", value_parser = duration_arg)]
    idle_timeout: std::time::Duration,
    /// Longest pause inside a frame or an upload; an unfinished upload is then discarded.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    frame_timeout: std::time::Duration,
    /// Longest a client may stop reading (a stalled GetFile) before it is dropped.
    #[arg(long, default_value = "30s", value_parser = duration_arg)]
    write_timeout: std::time::Duration,
    /// Serve TCP over TLS with this certificate (PEM; see `torpor pool-cert`).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM, mode 0600).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

/// Opens the store and serves it.
pub fn run(args: PoolArgs) -> Result<()> {
    let token = match (&args.token_file, &args.listen, args.no_auth) {
        (Some(f), _, _) => Some(torpor_pool::read_token_file(f)?),
        (None, PoolAddr::Unix(_), _) | (None, _, true) => None,
        (None, PoolAddr::Tcp(_), false) => {
            bail!("a TCP pool needs --token-file (or --no-auth to let anyone who can connect read snapshots)")
        }
    };
    let started = Instant::now();
    let store = Store::open(StoreConfig {
        capacity: args.capacity,
        spill_dir: args.spill_dir.clone(),
        keep: args.keep as usize,
    })
    .context("opening the pool's store")?;
    eprintln!(
        "pool: RAM tier {} pre-faulted in {:.2} s; it is volatile: its snapshots are lost when the pool stops",
        format_bytes(store.capacity_bytes()),
        started.elapsed().as_secs_f64()
    );
    match &args.spill_dir {
        Some(d) => eprintln!(
            "pool: disk tier {} holds {} snapshot(s) from earlier runs",
            d.display(),
            store.list().len()
        ),
        None => eprintln!("pool: no spill dir: uploads are refused once the RAM tier is full"),
    }
    if token.is_none() {
        eprintln!("pool: clients are not authenticated");
    }
    let tls = match (&args.tls_cert, &args.tls_key, &args.listen) {
        (Some(_), _, PoolAddr::Unix(_)) => {
            bail!("--tls-cert is for TCP pools; a Unix socket never leaves the host")
        }
        (Some(cert), Some(key), _) => Some(
            torpor_pool::tls::server_config(cert, key, args.tls_client_ca.as_deref())
                .context("loading the pool's TLS certificate")?,
        ),
        _ => None,
    };
    if let (None, PoolAddr::Tcp(_)) = (&tls, &args.listen) {
        eprintln!("pool: TCP without TLS: clients refuse it unless it is on loopback or they pass --pool-insecure");
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut listener = torpor_pool::Listener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        if let Some(config) = tls {
            listener = listener.with_tls(config)?;
            eprintln!(
                "pool: TLS{}",
                if args.tls_client_ca.is_some() {
                    ", client certificates required"
                } else {
                    ""
                }
            );
        }
        eprintln!("pool: listening on {}", listener.local_addr()?);
        let mut options = torpor_pool::ServeOptions::new(token.map(Into::into));
        if let Some(n) = args.max_connections {
            options.max_connections = n as usize;
        }
        options.hello_timeout = args.hello_timeout;
        options.idle_timeout = args.idle_timeout;
        options.frame_timeout = args.frame_timeout;
        options.write_timeout = args.write_timeout;
        eprintln!(
            "pool: at most {} connections; hello within {:?}, idle {:?}, frame {:?}, write {:?}",
            options.max_connections,
            options.hello_timeout,
            options.idle_timeout,
            options.frame_timeout,
            options.write_timeout
        );
        torpor_pool::serve_with(listener, Arc::new(store), options, shutdown_signal()).await;
        eprintln!("pool: stopped");
        anyhow::Ok(())
    })
}
