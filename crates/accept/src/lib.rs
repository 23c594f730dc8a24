//! Accepting clients, for every listener torpor serves (the gates, the status API of
//! `torpor up`, the memory pool): a connection limit, and accept errors that never end the
//! listener.
//!
//! At the connection limit, clients that have not yet proven themselves (sent a whole request,
//! or authenticated: the handler says when, through [`Proven`]) are the first to go: the
//! oldest is closed and the newcomer takes its slot. When every connection has proven itself,
//! the newcomer waits for a slot or is closed at once ([`WhenFull`]).
//!
//! An accept error is either about one connection (it was reset before we took it), which is
//! logged quietly and accepting goes on at once, or about this process (out of file
//! descriptors, out of memory). Neither is a reason to stop listening: the error is logged and
//! accepting resumes after a backoff, so that a process out of file descriptors (EMFILE, whose
//! pending connection stays queued and fails again at once) does not spin a core while it
//! waits for descriptors to be freed.

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tracing::{debug, warn};

/// A listening socket the loop accepts from.
pub trait Listen: Sync {
    /// One accepted connection, as the handler receives it.
    type Conn: Send + 'static;

    /// The next connection.
    fn accept(&self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

/// Accepted connections get TCP_NODELAY: every server behind this loop answers requests, and
/// a response written in more than one segment (HTTP/2's headers, data and trailers; a
/// proxied reply) would otherwise wait on Nagle for the client's delayed ACK, 40 ms a time.
impl Listen for TcpListener {
    type Conn = (TcpStream, SocketAddr);

    async fn accept(&self) -> io::Result<Self::Conn> {
        let (stream, peer) = TcpListener::accept(self).await?;
        // A connection that cannot take the option (reset already) fails on its first use.
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
}

/// What happens to a newcomer when every slot is held by a connection that proved itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// It waits for a slot to free (and the clients after it wait in the kernel's backlog):
    /// a gate's clients are served late rather than refused.
    Wait,
    /// It is closed at once: the listener goes on accepting (and closing) and file
    /// descriptors stay free for other work (the pool's disk tier).
    Close,
}

/// How many connections a listener serves at once, and what a newcomer gets beyond them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Connections served at once (0 counts as 1). Bounds the file descriptors a listener
    /// takes for its clients.
    pub max_connections: usize,
    /// What a newcomer gets when every slot is held by a connection that proved itself.
    pub when_full: WhenFull,
}

impl Limit {
    /// At most `max_connections`; past the proven ones, newcomers wait ([`WhenFull::Wait`]).
    pub fn wait(max_connections: usize) -> Limit {
        Limit {
            max_connections,
            when_full: WhenFull::Wait,
        }
    }

    /// At most `max_connections`; past the proven ones, newcomers are closed
    /// ([`WhenFull::Close`]).
    pub fn close(max_connections: usize) -> Limit {
        Limit {
            max_connections,
            when_full: WhenFull::Close,
        }
    }
}

/// Accepts clients until `shutdown`, each handled by its own task from `handle`, within
/// `limit`. At the limit, the oldest connection that has not proven itself ([`Proven`]) is
/// closed (its task dropped) and the newcomer takes its slot once freed; if every connection
/// has, `limit.when_full` decides. The tasks still running at shutdown are dropped with it.
/// `what` names the listener in logs ("accepting a {what} connection failed").
pub async fn accept_loop<L, F, Fut>(
    what: &str,
    listener: &L,
    limit: Limit,
    shutdown: impl Future<Output = ()>,
    mut handle: F,
) where
    L: Listen,
    F: FnMut(L::Conn, Proven) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    let slots = Slots::new(limit.max_connections);
    let mut conns = JoinSet::new();
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let conn = match accepted {
            Ok(conn) => conn,
            Err(e) if is_per_connection(&e) => {
                debug!(listener = what, error = %e, "a connection failed before it was accepted");
                continue;
            }
            Err(e) => {
                let pause = backoff.next();
                // Operators (and the gate's, the status API's and the pool's tests) look for
                // either phrase.
                warn!(listener = what, error = %e, retry_in = ?pause, connections = slots.live(),
                    "accepting a {what} connection failed (accept failed); listening on");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                continue;
            }
        };
        backoff.reset();
        let slot = match slots.try_admit(what, limit.when_full) {
            Admission::Now(slot) => slot,
            // Dropping the connection closes it at once.
            Admission::Refused => continue,
            Admission::Later => tokio::select! {
                _ = &mut shutdown => break,
                slot = slots.free() => slot,
            },
        };
        let conn = handle(conn, slot.proven());
        conns.spawn(async move {
            let mut slot = slot;
            tokio::select! {
                _ = conn => {}
                Ok(()) = &mut slot.evicted => {}
            }
        });
    }
    conns.shutdown().await;
}

/// Accept errors that concern one connection only, not the listener's resources.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// First pause after an accept error; doubled at each error in a row.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause after an accept error: a listener resumes within this once it can.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The pauses after accept errors in a row: 5 ms, 10 ms, 20 ms ... at most 1 s.
#[derive(Debug)]
struct Backoff {
    /// The pause after the next error.
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let pause = self.next;
        self.next = (pause * 2).min(BACKOFF_MAX);
        pause
    }

    /// A connection was accepted: the next error pauses the least again.
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// How often the limit is reported while it holds: a flood costs one log line every few
/// seconds.
const FULL_REPORT_EVERY: Duration = Duration::from_secs(5);

/// The connection slots: a permit per live connection, and which connections have not proven
/// themselves yet.
#[derive(Debug)]
struct Slots {
    /// One per connection served at once.
    permits: Arc<Semaphore>,
    /// The connection limit (at least 1), for `live` and the log.
    max: usize,
    newcomers: Mutex<Newcomers>,
}

/// What the slots know of connections that have not proven themselves, under one lock.
#[derive(Debug, Default)]
struct Newcomers {
    /// The next connection's id: ids grow with arrival, so the smallest is the oldest.
    next_id: u64,
    /// Connections that have not proven themselves, oldest first, with the signal that
    /// closes them: when the listener is full the oldest goes to make room, so that clients
    /// that connect and say nothing (or trickle) cannot keep others out for as long as their
    /// time limits allow.
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
    /// Newcomers that found the listener full since the last log line.
    turned_away: u64,
    /// When that log line was written.
    last_report: Option<Instant>,
}

/// A live connection's claim on a slot, held by its task; released on drop.
#[derive(Debug)]
struct Slot {
    /// Its key among the newcomers.
    id: u64,
    slots: Arc<Slots>,
    /// Given back after the connection has left the newcomers (see [`Drop`]).
    _permit: OwnedSemaphorePermit,
    /// Resolves when a newer connection needs this slot (only before [`Proven::proven`]).
    evicted: oneshot::Receiver<()>,
}

impl Slot {
    /// The handler's side of this slot.
    fn proven(&self) -> Proven {
        Proven {
            id: self.id,
            slots: self.slots.clone(),
        }
    }
}

impl Drop for Slot {
    /// Gone from the newcomers before the slot frees (even when the handler panicked), so
    /// that no newcomer is ever told to wait for a connection that no longer holds a slot.
    fn drop(&mut self) {
        self.slots.lock().waiting.remove(&self.id);
    }
}

/// What a newcomer gets.
enum Admission {
    /// A free slot.
    Now(Slot),
    /// No slot yet: one frees soon (a newcomer was told to go) or when a connection ends.
    Later,
    /// None: every slot is proven and the listener closes newcomers ([`WhenFull::Close`]).
    Refused,
}

impl Slots {
    fn new(max: usize) -> Arc<Slots> {
        let max = max.max(1);
        Arc::new(Slots {
            permits: Arc::new(Semaphore::new(max)),
            max,
            newcomers: Mutex::new(Newcomers::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Newcomers> {
        self.newcomers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn live(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// A free slot; else the oldest connection that has not proven itself is told to go and
    /// the newcomer is to wait for its slot; else `when_full`.
    fn try_admit(self: &Arc<Self>, what: &str, when_full: WhenFull) -> Admission {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Admission::Now(self.claim(permit));
        }
        let mut newcomers = self.lock();
        newcomers.turned_away += 1;
        let now = Instant::now();
        if newcomers
            .last_report
            .is_none_or(|t| now.duration_since(t) >= FULL_REPORT_EVERY)
        {
            warn!(
                listener = what,
                limit = self.max,
                turned_away = newcomers.turned_away,
                ?when_full,
                "connection limit reached: closing connections that have not proven themselves, oldest first (else the newcomer waits or is closed)"
            );
            newcomers.turned_away = 0;
            newcomers.last_report = Some(now);
        }
        match newcomers.waiting.pop_first() {
            Some((_, evict)) => {
                if evict.send(()).is_ok() {
                    debug!(
                        listener = what,
                        "full: closed the oldest connection that had not proven itself"
                    );
                }
                Admission::Later
            }
            None if when_full == WhenFull::Wait => Admission::Later,
            None => Admission::Refused,
        }
    }

    /// The next slot to free.
    async fn free(self: &Arc<Self>) -> Slot {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.claim(permit)
    }

    /// Registers a new connection, not proven yet.
    fn claim(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        let (evict, evicted) = oneshot::channel();
        let mut newcomers = self.lock();
        let id = newcomers.next_id;
        newcomers.next_id += 1;
        newcomers.waiting.insert(id, evict);
        Slot {
            id,
            slots: self.clone(),
            _permit: permit,
            evicted,
        }
    }
}

/// Handed to a connection's handler: [`Proven::proven`] once the client has shown it is
/// there for real (sent a whole request, authenticated), after which the connection is never
/// let go to make room.
#[derive(Debug, Clone)]
pub struct Proven {
    /// The connection's key among the newcomers.
    id: u64,
    slots: Arc<Slots>,
}

impl Proven {
    /// The client proved itself: it keeps its connection when the listener is full. False
    /// when a newer connection was already given its slot (the eviction and this claim are
    /// decided under one lock, so a connection is either evicted or kept, never kept and
    /// then counted as evicted); the connection is then being closed.
    pub fn proven(&self) -> bool {
        self.slots.lock().waiting.remove(&self.id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn the_backoff_doubles_from_5_ms_to_1_s_and_starts_over_after_a_success() {
        let mut backoff = Backoff::default();
        let pauses: Vec<u128> = (0..10).map(|_| backoff.next().as_millis()).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next(), BACKOFF_MIN);
    }

    #[test]
    fn only_errors_about_one_connection_skip_the_backoff() {
        for kind in [
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::Interrupted,
        ] {
            assert!(is_per_connection(&kind.into()), "{kind:?}");
        }
        const EMFILE: i32 = 24;
        assert!(!is_per_connection(&io::Error::from_raw_os_error(EMFILE)));
        assert!(!is_per_connection(&io::ErrorKind::OutOfMemory.into()));
    }

    #[tokio::test]
    async fn accepted_tcp_connections_do_not_wait_on_nagle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = Listen::accept(&listener).await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(stream.nodelay().unwrap());
    }

    fn admitted(slots: &Arc<Slots>) -> Slot {
        match slots.try_admit("test", WhenFull::Close) {
            Admission::Now(slot) => slot,
            _ => panic!("no free slot"),
        }
    }

    #[test]
    fn at_the_limit_the_oldest_unproven_connection_makes_room() {
        let slots = Slots::new(3);
        let mut old = admitted(&slots);
        let mut young = admitted(&slots);
        let mut kept = admitted(&slots);
        assert!(kept.proven().proven());
        assert_eq!(slots.live(), 3);
        for when_full in [WhenFull::Close, WhenFull::Wait] {
            assert!(matches!(
                slots.try_admit("test", when_full),
                Admission::Later
            ));
        }
        assert_eq!(old.evicted.try_recv(), Ok(()));
        assert_eq!(young.evicted.try_recv(), Ok(()));
        assert!(
            kept.evicted.try_recv().is_err(),
            "a proven connection stays"
        );
        assert!(!old.proven().proven(), "evicted, then never kept");
        drop(old);
        assert_eq!(slots.live(), 2);
        let newcomer = admitted(&slots);
        assert!(newcomer.proven().proven());
        drop(young);
        let last = admitted(&slots);
        assert!(last.proven().proven());
        assert_eq!(slots.live(), 3);
        // Every connection proved itself: the newcomer waits or is closed.
        assert!(matches!(
            slots.try_admit("test", WhenFull::Wait),
            Admission::Later
        ));
        assert!(matches!(
            slots.try_admit("test", WhenFull::Close),
            Admission::Refused
        ));
    }

    /// Reads "hello", then proves itself, answers "ok" and holds the connection until the
    /// client goes.
    async fn greeter((mut s, _): (TcpStream, SocketAddr), proven: Proven) {
        let mut buf = [0u8; 5];
        if s.read_exact(&mut buf).await.is_ok() && proven.proven() {
            let _ = s.write_all(b"ok").await;
            let _ = s.read(&mut buf).await;
        }
    }

    async fn serve(max: usize, when_full: WhenFull) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            let limit = Limit {
                max_connections: max,
                when_full,
            };
            accept_loop("test", &listener, limit, shutdown, greeter).await
        });
        (addr, stop)
    }

    async fn say_hello(c: &mut TcpStream) -> io::Result<()> {
        c.write_all(b"hello").await?;
        let mut ok = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut ok)).await??;
        assert_eq!(&ok, b"ok");
        Ok(())
    }

    async fn closed(c: &mut TcpStream) -> bool {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await;
        matches!(read, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn a_silent_client_gives_way_and_past_the_proven_ones_a_newcomer_is_closed() {
        let (addr, _stop) = serve(1, WhenFull::Close).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut kept = TcpStream::connect(addr).await.unwrap();
        say_hello(&mut kept).await.unwrap();
        assert!(closed(&mut silent).await, "the silent client made room");
        let mut late = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut late).await, "closed while every slot is proven");
        drop(kept);
        for _ in 0..100 {
            let mut again = TcpStream::connect(addr).await.unwrap();
            if say_hello(&mut again).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the freed slot was not served again");
    }

    #[tokio::test]
    async fn past_the_proven_ones_a_newcomer_waits_for_a_slot() {
        let (addr, _stop) = serve(1, WhenFull::Wait).await;
        let mut kept = TcpStream::connect(addr).await.unwrap();
        say_hello(&mut kept).await.unwrap();
        let mut late = TcpStream::connect(addr).await.unwrap();
        late.write_all(b"hello").await.unwrap();
        let mut ok = [0u8; 2];
        let waited =
            tokio::time::timeout(Duration::from_millis(300), late.read_exact(&mut ok)).await;
        assert!(waited.is_err(), "served beyond the connection limit");
        drop(kept);
        tokio::time::timeout(Duration::from_secs(10), late.read_exact(&mut ok))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&ok, b"ok");
    }
}
