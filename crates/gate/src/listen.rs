//! Accepting clients, for every listener torpor serves (the gates and the status API): a
//! connection limit, and accept errors that never end the listener.
//!
//! An accept error is either about one connection (it was reset before we took it) or about
//! this process (out of file descriptors, out of memory). Neither is a reason to stop
//! listening: the error is logged and accepting resumes after a backoff, so that a process
//! out of file descriptors (EMFILE, whose pending connection stays queued and fails again at
//! once) does not spin a core while it waits for descriptors to be freed.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tracing::warn;

/// First pause after an accept error; doubled at each error in a row.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause after an accept error: a listener resumes within this once it can.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts clients until `shutdown`, each handled by its own task from `handle`, at most
/// `max_connections` at once: beyond that, new connections wait in the kernel's backlog until
/// one ends. The tasks still running at shutdown are dropped with it. `what` names the
/// listener in logs.
pub async fn accept_loop<F, Fut>(
    what: &str,
    listener: TcpListener,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut conns = JoinSet::new();
    let mut backoff = BACKOFF_MIN;
    loop {
        // A slot first: at the limit, connections are left to the kernel's backlog.
        let slot: OwnedSemaphorePermit = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = BACKOFF_MIN;
                let _ = stream.set_nodelay(true);
                let conn = handle(stream, peer);
                conns.spawn(async move {
                    conn.await;
                    drop(slot);
                });
            }
            Err(e) => {
                drop(slot);
                warn!(listener = what, error = %e, retry_in = ?backoff, "accept failed; listening on");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    conns.shutdown().await;
}
