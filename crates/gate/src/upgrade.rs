//! Upgraded HTTP/1.1 connections (websockets and any other `Upgrade`): after the service's
//! 101 both sides are plain byte streams, relayed both ways as they come. Each chunk marks
//! the service active, so a live websocket keeps it awake; a quiet one does not hold it in
//! flight. When a drain retires backend connections (the service is about to sleep), the
//! relay ends: a websocket client gets a close frame (1001, going away) and its connection
//! closes; another protocol's connection just closes.

use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::watch,
};
use torpor_control::ServiceLink;
use tracing::debug;

/// A server's websocket close frame, status 1001 "going away" (unmasked, as a server sends).
pub const WEBSOCKET_GOING_AWAY: [u8; 4] = [0x88, 0x02, 0x03, 0xe9];

/// Relays the two upgraded connections until both directions end or a drain comes.
pub async fn relay(
    client: OnUpgrade,
    service: OnUpgrade,
    link: Arc<ServiceLink>,
    mut generation: watch::Receiver<u64>,
    websocket: bool,
) {
    let (client, service) = match tokio::join!(client, service) {
        (Ok(c), Ok(s)) => (TokioIo::new(c), TokioIo::new(s)),
        (c, s) => {
            debug!(service = %link.name, client = ?c.err(), backend = ?s.err(), "upgrade did not complete");
            return;
        }
    };
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut service_rd, mut service_wr) = tokio::io::split(service);
    let drained = {
        let both = async {
            tokio::join!(
                pump(&mut client_rd, &mut service_wr, &link),
                pump(&mut service_rd, &mut client_wr, &link)
            )
        };
        tokio::select! {
            _ = both => false,
            _ = generation.changed() => true,
        }
    };
    if drained {
        debug!(service = %link.name, websocket, "upgraded connection closed by a drain");
        if websocket {
            let _ = client_wr.write_all(&WEBSOCKET_GOING_AWAY).await;
        }
        let _ = client_wr.shutdown().await;
    }
}

/// Copies `from` to `to` until `from` ends (then shuts `to` down), marking activity per chunk.
async fn pump(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    link: &ServiceLink,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = link.now();
        link.with_arrivals(|a| a.mark_active(now));
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
