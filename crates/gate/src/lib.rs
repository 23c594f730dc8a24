//! The gate (activator) in front of one service. While the service is awake it forwards,
//! reusing pooled backend connections; while it drains, sleeps or wakes, requests wait in
//! the [`ServiceLink`]'s bounded hold queue and the first one asks the agent for a wake.
//! Clients whose request cannot be held get an explicit answer: HTTP 503, gRPC
//! `UNAVAILABLE`, or (TCP) a closed connection with a log line.
//!
//! * [`http`]: HTTP/1.1, HTTP/2 cleartext and gRPC, through hyper.
//! * [`tcp`]: raw TCP; the accepted client connection is held and the backend is dialled
//!   once the service is up.

pub mod http;
pub mod tcp;

use std::{future::Future, net::SocketAddr, sync::Arc};

use serde::{Deserialize, Serialize};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use torpor_control::ServiceLink;

/// What a service speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1, HTTP/2 cleartext (prior knowledge) and gRPC.
    Http,
    Tcp,
}

/// Serves one service's public listener until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    protocol: Protocol,
    backend: SocketAddr,
    link: Arc<ServiceLink>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    match protocol {
        Protocol::Http => http::run(listener, backend, link, shutdown).await,
        Protocol::Tcp => tcp::run(listener, backend, link, shutdown).await,
    }
}

/// Accepts clients until `shutdown`, each handled by its own task from `handle`; the tasks
/// still running at shutdown are dropped with it.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut handle: F,
) -> std::io::Result<()>
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = accepted?;
                let _ = stream.set_nodelay(true);
                conns.spawn(handle(stream, peer));
            }
        }
    }
    conns.shutdown().await;
    Ok(())
}
