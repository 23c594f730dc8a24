//! Raw TCP gating: one held connection per client until the service is up.

use std::{future::Future, net::SocketAddr, sync::Arc};

use crate::GateLimits;
use tokio::net::{TcpListener, TcpStream};
use torpor_accept::Limit;
use torpor_control::ServiceLink;
use tracing::{debug, warn};

/// Accepts clients until `shutdown`, at most `limits.max_connections` at once; each is
/// forwarded to `backend` once the link lets it in.
pub async fn run(
    listener: TcpListener,
    backend: SocketAddr,
    link: Arc<ServiceLink>,
    limits: GateLimits,
    shutdown: impl Future<Output = ()>,
) {
    let what = format!("gate of {}", link.name);
    torpor_accept::accept_loop(
        &what,
        &listener,
        Limit::wait(limits.max_connections),
        shutdown,
        |(client, peer), proven| {
            // A raw TCP client may rightly say nothing until the server speaks: never let
            // go to make room.
            proven.proven();
            forward(client, peer, backend, link.clone())
        },
    )
    .await
}

async fn forward(
    mut client: TcpStream,
    peer: SocketAddr,
    backend: SocketAddr,
    link: Arc<ServiceLink>,
) {
    let mut generation = link.watch_backend_generation();
    generation.mark_unchanged();
    let guard = match link.enter().await {
        Ok(g) => g,
        Err(e) => {
            warn!(service = %link.name, %peer, error = %e, "closing held TCP connection");
            return;
        }
    };
    let mut server = match TcpStream::connect(backend).await {
        Ok(s) => s,
        Err(e) => {
            warn!(service = %link.name, %peer, %backend, error = %e, "backend refused; closing client connection");
            return;
        }
    };
    let _ = server.set_nodelay(true);
    // Raw TCP has no response to wait for: the service answering is its accepting.
    guard.answered();
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut server) => {
            debug!(service = %link.name, %peer, result = ?r, "TCP connection done");
        }
        // A drain outlived its deadline: the service is about to be checkpointed.
        _ = generation.changed() => {
            debug!(service = %link.name, %peer, "TCP connection cut by a drain");
        }
    }
}
