//! Accepting clients, for every listener torpor serves (the gates and the status API): a
//! connection limit, and accept errors that never end the listener.
//!
//! At the connection limit, clients that have not yet sent a request are the first to go.
//!
//! An accept error is either about one connection (it was reset before we took it) or about
//! this process (out of file descriptors, out of memory). Neither is a reason to stop
//! listening: the error is logged and accepting resumes after a backoff, so that a process
//! out of file descriptors (EMFILE, whose pending connection stays queued and fails again at
//! once) does not spin a core while it waits for descriptors to be freed.

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, Semaphore},
    task::JoinSet,
};
use tracing::{debug, warn};

/// First pause after an accept error; doubled at each error in a row.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause after an accept error: a listener resumes within this once it can.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Connections that have not yet sent a whole request, oldest first: when the listener is
/// full, the oldest goes to make room, so that clients that connect and say nothing (or
/// trickle) cannot keep others out for as long as their time limits allow.
#[derive(Debug, Default)]
struct Newcomers {
    waiting: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
}

impl Newcomers {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, oneshot::Sender<()>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets the oldest newcomer go; false if there is none.
    fn evict_oldest(&self) -> bool {
        let oldest = self.lock().pop_first();
        oldest.is_some_and(|(_, tx)| tx.send(()).is_ok())
    }
}

/// Handed to a connection's handler: [`Proven::proven`] once the client has sent a whole
/// request, after which the connection is never let go to make room.
#[derive(Debug, Clone)]
pub struct Proven {
    id: u64,
    newcomers: Arc<Newcomers>,
}

impl Proven {
    /// The client sent a request: it keeps its connection when the listener is full.
    pub fn proven(&self) {
        self.newcomers.lock().remove(&self.id);
    }
}

/// Accepts clients until `shutdown`, each handled by its own task from `handle`, at most
/// `max_connections` at once. When a client arrives at the limit, the oldest connection that
/// has not yet sent a request ([`Proven`]) is closed to make room; if every connection has,
/// the new client waits for one to end (and the clients after it in the kernel's backlog).
/// The tasks still running at shutdown are dropped with it. `what` names the listener in
/// logs.
pub async fn accept_loop<F, Fut>(
    what: &str,
    listener: TcpListener,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr, Proven) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let newcomers = Arc::new(Newcomers::default());
    let mut next_id = 0u64;
    let mut conns = JoinSet::new();
    let mut backoff = BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(listener = what, error = %e, retry_in = ?backoff, "accept failed; listening on");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if newcomers.evict_oldest() {
                    debug!(
                        listener = what,
                        "full: closed the oldest connection without a request"
                    );
                }
                tokio::select! {
                    _ = &mut shutdown => break,
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let id = next_id;
        next_id += 1;
        let (evict_tx, evicted) = oneshot::channel();
        newcomers.lock().insert(id, evict_tx);
        let proven = Proven {
            id,
            newcomers: newcomers.clone(),
        };
        let conn = handle(stream, peer, proven.clone());
        conns.spawn(async move {
            tokio::select! {
                _ = conn => {}
                Ok(()) = evicted => {}
            }
            proven.proven();
            drop(slot);
        });
    }
    conns.shutdown().await;
}
