//! The link between one service's gate and the agent that runs it. The gate and the agent
//! never import each other; both hold a [`ServiceLink`]:
//!
//! * the gate calls [`ServiceLink::enter`] for each request (or TCP connection): it passes at
//!   once while the link is open, and otherwise waits in a bounded FIFO hold queue, asking
//!   the agent for a wake if the service is asleep; it gets an explicit [`HoldError`] when
//!   the queue is full, the hold times out, or the wake failed;
//! * the agent closes and drains the link before a checkpoint, opens it when the service
//!   accepts connections again (held requests go first, in arrival order), and waits on
//!   [`ServiceLink::wake_requested`].
//!
//! A held request whose future is dropped (its client went away) or that timed out leaves the
//! queue at once, so it takes no place and asks for no wake. Every request let through is
//! counted in flight by an [`InflightGuard`], whose drop is the only way the count goes down:
//! a guard dropped anywhere (finished, cancelled, panicked, or never picked up by its waiter)
//! gives the count back, and a drain cannot wait on a request that no longer exists.
//!
//! Time is tokio time, so tests can pause it; arrivals feed the policy's tracker on a
//! virtual clock counted from the link's creation.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::Duration,
};

use thiserror::Error;
use tokio::{
    sync::{oneshot, watch, Notify},
    time::Instant,
};
use torpor_policy::ArrivalTracker;

/// Why a held request was not let through.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum HoldError {
    #[error("hold queue full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("held for {0:?} without the service waking")]
    Timeout(Duration),
    #[error("service could not be woken: {0}")]
    WakeFailed(String),
    #[error("torpor is shutting down")]
    ShuttingDown,
}

/// Bounds of the hold queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// Most requests held at once; more get [`HoldError::QueueFull`].
    pub depth: usize,
    /// Longest a request is held.
    pub timeout: Duration,
}

/// What a held request is answered with: let through (already counted in flight) or refused.
type Release = Result<InflightGuard, HoldError>;

/// One held request.
#[derive(Debug)]
struct Waiter {
    /// Identifies the request, so that a waiter going away removes itself and no other.
    ticket: u64,
    tx: oneshot::Sender<Release>,
}

#[derive(Debug)]
struct Inner {
    open: bool,
    /// The service is asleep: the first held request asks for a wake.
    wake_armed: bool,
    /// A wake was asked for and the agent has not taken it yet. A flag (not a stored `Notify`
    /// permit) so that opening the link withdraws it: a wake asked for while the service was
    /// already coming up must not wake it again after its next sleep.
    wake_pending: bool,
    shutting_down: bool,
    /// Why the service is down (its wake and cold start failed; the agent retries): new
    /// requests are refused at once rather than held for a wake that is not coming.
    down: Option<String>,
    /// Held requests in arrival order; only live ones (a waiter removes itself when it goes).
    waiters: VecDeque<Waiter>,
    /// Ticket of the next held request.
    next_ticket: u64,
    arrivals: ArrivalTracker,
}

/// The in-flight count, shared with the guards so that a guard can give its count back
/// wherever it is dropped (also inside [`ServiceLink::open`], which holds no `Arc` of the link).
#[derive(Debug, Default)]
struct Inflight {
    count: AtomicUsize,
    changed: Notify,
    /// When the link last opened, and how long after that the service first answered a
    /// request (the last wake's "first byte").
    answered: Mutex<(Option<Instant>, Option<Duration>)>,
}

/// Shared by a service's gate and its agent.
#[derive(Debug)]
pub struct ServiceLink {
    pub name: String,
    /// Changed live by a reload of the configuration ([`ServiceLink::set_limits`]).
    limits: Mutex<HoldLimits>,
    epoch: Instant,
    inner: Mutex<Inner>,
    /// Requests (or connections) being forwarded now, or released and not yet picked up.
    inflight: Arc<Inflight>,
    /// Signals the agent when `wake_pending` is set.
    wake: Notify,
    /// Bumped at every drain: the gate drops pooled backend connections of older generations
    /// and cuts long-lived ones (TCP) that outlived the drain deadline.
    backend_generation: watch::Sender<u64>,
    /// Requests answered with an explicit hold error.
    rejected: AtomicU64,
}

/// Marks one request as in flight until dropped.
#[derive(Debug)]
pub struct InflightGuard {
    inflight: Arc<Inflight>,
}

impl InflightGuard {
    fn new(inflight: &Arc<Inflight>) -> InflightGuard {
        inflight.count.fetch_add(1, Ordering::SeqCst);
        InflightGuard {
            inflight: inflight.clone(),
        }
    }

    /// The service answered this request (its response began): the first answer after the
    /// link opened is kept as the wake's first byte.
    pub fn answered(&self) {
        let mut a = self
            .inflight
            .answered
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let (Some(opened), None) = *a {
            a.1 = Some(opened.elapsed());
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.inflight.count.fetch_sub(1, Ordering::SeqCst);
        self.inflight.changed.notify_waiters();
    }
}

/// A request's place in the hold queue; dropping it (the request's future was dropped, or
/// it timed out) gives the place up.
struct Place<'a> {
    link: &'a ServiceLink,
    /// `None` once the request has left the queue.
    ticket: Option<u64>,
}

impl Place<'_> {
    /// Takes the request out of the queue; false if it had already left it (released or
    /// refused by the agent, whose answer is then in the channel).
    fn withdraw(&mut self) -> bool {
        let Some(ticket) = self.ticket.take() else {
            return false;
        };
        let mut inner = self.link.state();
        match inner.waiters.iter().position(|w| w.ticket == ticket) {
            Some(i) => {
                inner.waiters.remove(i);
                true
            }
            None => false,
        }
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.withdraw();
    }
}

/// Outcome of a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// In-flight requests still running when the deadline passed (0 when all finished).
    pub still_inflight: usize,
    pub took: Duration,
}

impl ServiceLink {
    /// A closed link (the service is starting); the agent opens it when the service is up.
    pub fn new(name: &str, limits: HoldLimits) -> Arc<ServiceLink> {
        let epoch = Instant::now();
        Arc::new(ServiceLink {
            name: name.to_string(),
            limits: Mutex::new(limits),
            epoch,
            inner: Mutex::new(Inner {
                open: false,
                wake_armed: false,
                wake_pending: false,
                shutting_down: false,
                down: None,
                waiters: VecDeque::new(),
                next_ticket: 0,
                arrivals: ArrivalTracker::new(Duration::ZERO, Duration::from_secs(10)),
            }),
            inflight: Arc::default(),
            wake: Notify::new(),
            backend_generation: watch::Sender::new(0),
            rejected: AtomicU64::new(0),
        })
    }

    /// The link's state. A panic elsewhere while it was locked (in a [`Self::with_arrivals`]
    /// closure, say) must not stop every later request; each field is updated in one step,
    /// so what the panic left is consistent. It is also taken in `Place::drop`, which may
    /// run while unwinding, where a second panic would abort.
    fn state(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Virtual time for the policy: time since the link was created.
    pub fn now(&self) -> Duration {
        Instant::now().duration_since(self.epoch)
    }

    /// Lets one request through, holding it first if the service is not up. Dropping the
    /// future while it is held gives its place in the queue up.
    pub async fn enter(self: &Arc<Self>) -> Result<InflightGuard, HoldError> {
        let limits = self.limits();
        let (ticket, mut rx) = {
            let mut inner = self.state();
            let now = self.now();
            inner.arrivals.record(now);
            if inner.shutting_down {
                return Err(self.reject(HoldError::ShuttingDown));
            }
            if inner.open {
                return Ok(InflightGuard::new(&self.inflight));
            }
            if let Some(reason) = &inner.down {
                return Err(self.reject(HoldError::WakeFailed(reason.clone())));
            }
            if inner.waiters.len() >= limits.depth {
                return Err(self.reject(HoldError::QueueFull(inner.waiters.len())));
            }
            let (tx, rx) = oneshot::channel();
            let ticket = inner.next_ticket;
            inner.next_ticket += 1;
            inner.waiters.push_back(Waiter { ticket, tx });
            if inner.wake_armed {
                self.ask_wake(&mut inner);
            }
            (ticket, rx)
        };
        let mut place = Place {
            link: self,
            ticket: Some(ticket),
        };
        let answer = tokio::select! {
            // An answer that is there wins over a deadline that passed at the same time.
            biased;
            answer = &mut rx => {
                place.ticket = None;
                answer.ok()
            }
            _ = tokio::time::sleep(limits.timeout) => {
                if place.withdraw() {
                    return Err(self.reject(HoldError::Timeout(limits.timeout)));
                }
                // The agent took the request out of the queue first: its answer (sent
                // under the lock `withdraw` took) is in the channel.
                rx.try_recv().ok()
            }
        };
        match answer {
            Some(Ok(guard)) => Ok(guard),
            Some(Err(e)) => Err(self.reject(e)),
            // Every waiter taken out of the queue is answered; were one ever not, its request
            // is refused rather than left hanging.
            None => Err(self.reject(HoldError::ShuttingDown)),
        }
    }

    /// The hold queue's bounds now.
    pub fn limits(&self) -> HoldLimits {
        *self.limits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// New bounds for the hold queue (a reload): requests that arrive from now on get them;
    /// those already held keep the timeout they came with.
    pub fn set_limits(&self, limits: HoldLimits) {
        *self.limits.lock().unwrap_or_else(PoisonError::into_inner) = limits;
    }

    fn reject(&self, e: HoldError) -> HoldError {
        self.rejected.fetch_add(1, Ordering::SeqCst);
        e
    }

    /// Asks the agent for a wake (it takes it in [`Self::wake_requested`]).
    fn ask_wake(&self, inner: &mut Inner) {
        inner.wake_armed = false;
        inner.wake_pending = true;
        self.wake.notify_waiters();
    }

    /// Stops forwarding (new requests are held), waits up to `deadline` for in-flight ones
    /// to finish, and retires pooled backend connections.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        let start = Instant::now();
        self.state().open = false;
        let end = start + deadline;
        loop {
            let notified = self.inflight.changed.notified();
            let left = self.inflight();
            if left == 0 || Instant::now() >= end {
                self.backend_generation.send_modify(|g| *g += 1);
                return Drained {
                    still_inflight: left,
                    took: start.elapsed(),
                };
            }
            let _ = tokio::time::timeout_at(end, notified).await;
        }
    }

    /// The service is asleep: the next held request (or one already held) asks for a wake.
    pub fn arm_wake(&self) {
        let mut inner = self.state();
        if inner.waiters.is_empty() {
            inner.wake_armed = true;
        } else {
            self.ask_wake(&mut inner);
        }
    }

    /// Asks a sleeping service to wake without a request of its own (it is about to get
    /// some: a service it serves is waking). Nothing happens if it is awake or waking.
    pub fn request_wake(&self) {
        let mut inner = self.state();
        if inner.wake_armed {
            self.ask_wake(&mut inner);
        }
    }

    /// Resolves when a held request (or [`Self::request_wake`]) wants the service woken, and
    /// takes that wish: each wake asked for resolves one call. Cancel-safe.
    pub async fn wake_requested(&self) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            // Registered before the flag is read, so a wake asked for in between is not lost.
            notified.as_mut().enable();
            if std::mem::take(&mut self.state().wake_pending) {
                return;
            }
            notified.await;
        }
    }

    /// The service accepts connections: release held requests in arrival order and forward
    /// from now on. It counts as active now (it just woke for a request, or started), so its
    /// idle time starts over.
    pub fn open(&self) {
        self.open_as(true);
    }

    /// [`Self::open`] after a pause that was no sign of demand (a thaw on the way to a
    /// snapshot, a wake by a pin): its idle time, and so the predicted rest of its quiet, go
    /// on from its last request.
    pub fn reopen(&self) {
        self.open_as(false);
    }

    fn open_as(&self, active: bool) {
        let mut inner = self.state();
        inner.open = true;
        inner.down = None;
        *self
            .inflight
            .answered
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = (Some(Instant::now()), None);
        inner.wake_armed = false;
        // It is up: a wake asked for while it came up is answered.
        inner.wake_pending = false;
        if active {
            let now = self.now();
            inner.arrivals.mark_active(now);
        }
        while let Some(w) = inner.waiters.pop_front() {
            // Counted before the waiter runs: the service must not be drained and
            // checkpointed between its release and its forwarding. If the waiter is gone
            // before it picks the guard up, the guard is dropped with the channel.
            let _ = w.tx.send(Ok(InflightGuard::new(&self.inflight)));
        }
    }

    /// The service could not be brought up: every held request gets `reason`, and so does
    /// every new one until [`ServiceLink::open`].
    pub fn fail_held(&self, reason: &str) {
        let mut inner = self.state();
        inner.down = Some(reason.to_string());
        // The wake attempt is over; nobody is left to wait for another.
        inner.wake_pending = false;
        while let Some(w) = inner.waiters.pop_front() {
            let _ = w.tx.send(Err(HoldError::WakeFailed(reason.to_string())));
        }
    }

    /// The agent tries again to bring a failed service up: requests are held for that
    /// attempt instead of refused.
    pub fn retrying(&self) {
        self.state().down = None;
    }

    /// Refuses everything from now on and releases the held requests with an error.
    pub fn shut_down(&self) {
        let mut inner = self.state();
        inner.shutting_down = true;
        inner.open = false;
        inner.wake_pending = false;
        while let Some(w) = inner.waiters.pop_front() {
            let _ = w.tx.send(Err(HoldError::ShuttingDown));
        }
    }

    pub fn is_open(&self) -> bool {
        self.state().open
    }

    /// Requests waiting in the hold queue now.
    pub fn held(&self) -> usize {
        self.state().waiters.len()
    }

    /// How long after the link last opened the service first answered a request, once it has.
    pub fn first_answer_after_open(&self) -> Option<Duration> {
        self.inflight
            .answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
    }

    /// Requests let through and not finished (their [`InflightGuard`]s are alive).
    pub fn inflight(&self) -> usize {
        self.inflight.count.load(Ordering::SeqCst)
    }

    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::SeqCst)
    }

    pub fn backend_generation(&self) -> u64 {
        *self.backend_generation.borrow()
    }

    /// Changes when a drain retires the backend connections.
    pub fn watch_backend_generation(&self) -> watch::Receiver<u64> {
        self.backend_generation.subscribe()
    }

    /// Runs `f` on the arrival statistics (for the policy).
    pub fn with_arrivals<R>(&self, f: impl FnOnce(&mut ArrivalTracker) -> R) -> R {
        f(&mut self.state().arrivals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(depth: usize) -> Arc<ServiceLink> {
        ServiceLink::new(
            "svc",
            HoldLimits {
                depth,
                timeout: Duration::from_secs(5),
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleeping_service_can_be_woken_without_a_request_but_only_once() {
        let l = link(10);
        l.request_wake();
        let early = tokio::time::timeout(Duration::from_millis(10), l.wake_requested()).await;
        assert!(early.is_err(), "awake: nothing to wake");
        l.arm_wake();
        l.request_wake();
        tokio::time::timeout(Duration::from_millis(10), l.wake_requested())
            .await
            .expect("asleep: woken");
        l.request_wake();
        let again = tokio::time::timeout(Duration::from_millis(10), l.wake_requested()).await;
        assert!(again.is_err(), "already waking: no second wake");
    }

    #[tokio::test(start_paused = true)]
    async fn held_requests_are_released_in_arrival_order() {
        let l = link(10);
        l.arm_wake();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (l, order) = (l.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _g = l.enter().await.unwrap();
                order.lock().unwrap().push(i);
            }));
            tokio::task::yield_now().await;
        }
        // The first held request asked for a wake.
        tokio::time::timeout(Duration::from_millis(1), l.wake_requested())
            .await
            .expect("wake requested");
        assert_eq!(l.held(), 5);
        l.open();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(l.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_and_timeout_give_explicit_errors() {
        let l = link(2);
        let a = tokio::spawn({
            let l = l.clone();
            async move { l.enter().await.map(|_| ()) }
        });
        let b = tokio::spawn({
            let l = l.clone();
            async move { l.enter().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert_eq!(l.enter().await.unwrap_err(), HoldError::QueueFull(2));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            a.await.unwrap(),
            Err(HoldError::Timeout(Duration::from_secs(5)))
        );
        assert_eq!(
            b.await.unwrap(),
            Err(HoldError::Timeout(Duration::from_secs(5)))
        );
        assert_eq!(l.rejected(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn new_limits_apply_to_the_next_request() {
        let l = link(1);
        let first = tokio::spawn({
            let l = l.clone();
            async move { l.enter().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert_eq!(l.enter().await.unwrap_err(), HoldError::QueueFull(1));
        let wider = HoldLimits {
            depth: 2,
            timeout: Duration::from_secs(1),
        };
        l.set_limits(wider);
        assert_eq!(l.limits(), wider);
        let second = tokio::spawn({
            let l = l.clone();
            async move { l.enter().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert_eq!(l.held(), 2, "the deeper queue takes a second request");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            second.await.unwrap(),
            Err(HoldError::Timeout(Duration::from_secs(1))),
            "held under the new timeout"
        );
        assert_eq!(l.held(), 1, "the first keeps the timeout it came with");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(first.await.unwrap().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_inflight_up_to_the_deadline() {
        let l = link(10);
        l.open();
        let g = l.enter().await.unwrap();
        let gen0 = l.backend_generation();
        let drain = tokio::spawn({
            let l = l.clone();
            async move { l.drain(Duration::from_secs(1)).await }
        });
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_millis(300)).await;
        drop(g);
        let d = drain.await.unwrap();
        assert_eq!(d.still_inflight, 0);
        assert!(d.took >= Duration::from_millis(300) && d.took < Duration::from_secs(1));
        assert_eq!(l.backend_generation(), gen0 + 1);
        // Closed now: a new request is held, not forwarded.
        assert!(!l.is_open());
        let held = tokio::spawn({
            let l = l.clone();
            async move { l.enter().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert_eq!(l.held(), 1);
        l.open();
        assert_eq!(held.await.unwrap(), Ok(()));
        let g2 = l.enter().await.unwrap();
        let d = tokio::spawn({
            let l = l.clone();
            async move { l.drain(Duration::from_secs(1)).await }
        });
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            d.await.unwrap().still_inflight,
            1,
            "deadline passed with one left"
        );
        drop(g2);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_wake_and_shutdown_release_held_requests_with_errors() {
        let l = link(10);
        let h = tokio::spawn({
            let l = l.clone();
            async move { l.enter().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        l.fail_held("restore and cold start failed");
        assert_eq!(
            h.await.unwrap(),
            Err(HoldError::WakeFailed(
                "restore and cold start failed".into()
            ))
        );
        // The agent tries again: requests are held for that attempt.
        l.retrying();
        let h = tokio::spawn({
            let l = l.clone();
            async move { l.enter().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        l.shut_down();
        assert_eq!(h.await.unwrap(), Err(HoldError::ShuttingDown));
        assert_eq!(l.enter().await.unwrap_err(), HoldError::ShuttingDown);
    }

    /// Polls `f` once: a held request has taken its place in the queue.
    async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
        std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx)))
            .await
    }

    fn spawn_enter(l: &Arc<ServiceLink>) -> tokio::task::JoinHandle<Result<(), HoldError>> {
        let l = l.clone();
        tokio::spawn(async move { l.enter().await.map(|_| ()) })
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_give_their_places_up() {
        let l = link(2);
        l.arm_wake();
        // A client that gives up (its future is cancelled by a select) and one whose task is
        // aborted (the connection went away).
        let gave_up = tokio::time::timeout(Duration::from_millis(10), l.enter()).await;
        assert!(gave_up.is_err());
        assert_eq!(l.held(), 0);
        let gone = spawn_enter(&l);
        tokio::task::yield_now().await;
        assert_eq!(l.held(), 1);
        gone.abort();
        assert!(gone.await.unwrap_err().is_cancelled());
        assert_eq!(l.held(), 0);
        // Their places are free: two more are held, a fifth finds the queue full.
        let (c, d) = (spawn_enter(&l), spawn_enter(&l));
        tokio::task::yield_now().await;
        assert_eq!(l.held(), 2);
        assert_eq!(l.enter().await.unwrap_err(), HoldError::QueueFull(2));
        l.open();
        assert_eq!(l.inflight(), 2, "only the live waiters are released");
        assert_eq!(c.await.unwrap(), Ok(()));
        assert_eq!(d.await.unwrap(), Ok(()));
        assert_eq!(l.held(), 0);
        assert_eq!(l.inflight(), 0);
        assert_eq!(l.rejected(), 1, "a client that went away was not refused");
    }

    #[tokio::test(start_paused = true)]
    async fn timed_out_waiters_leave_the_queue_and_ask_for_no_wake() {
        let l = link(2);
        // Held while the service is checkpointed (closed, no wake armed yet), and timed out.
        let (a, b) = (spawn_enter(&l), spawn_enter(&l));
        tokio::task::yield_now().await;
        assert_eq!(l.held(), 2);
        tokio::time::advance(Duration::from_secs(6)).await;
        for t in [a, b] {
            assert_eq!(
                t.await.unwrap(),
                Err(HoldError::Timeout(Duration::from_secs(5)))
            );
        }
        assert_eq!(l.held(), 0);
        assert_eq!(l.rejected(), 2);
        // The checkpoint is done and nobody waits: the service stays asleep.
        l.arm_wake();
        let woken = tokio::time::timeout(Duration::from_millis(10), l.wake_requested()).await;
        assert!(woken.is_err(), "woken for requests that timed out");
        // The queue has room for two again, and the first of them asks for the wake.
        let (c, d) = (spawn_enter(&l), spawn_enter(&l));
        tokio::task::yield_now().await;
        assert_eq!(l.held(), 2);
        tokio::time::timeout(Duration::from_millis(1), l.wake_requested())
            .await
            .expect("wake requested");
        l.open();
        assert_eq!(c.await.unwrap(), Ok(()));
        assert_eq!(d.await.unwrap(), Ok(()));
        assert_eq!(l.inflight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gone_after_its_release_is_not_left_in_flight() {
        let l = link(10);
        let mut waiter = Box::pin(l.enter());
        assert!(poll_once(&mut waiter).await.is_pending());
        assert_eq!(l.held(), 1);
        l.open();
        // Released and counted in flight, but its client goes away before it is forwarded.
        assert_eq!(l.inflight(), 1);
        drop(waiter);
        assert_eq!(l.inflight(), 0);
        let d = l.drain(Duration::from_secs(30)).await;
        assert_eq!(
            d,
            Drained {
                still_inflight: 0,
                took: Duration::ZERO
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_cancelled_or_panicking_mid_flight_are_not_left_in_flight() {
        let l = link(10);
        l.open();
        // The client goes away mid-request: the forwarding future is dropped.
        let cut = tokio::time::timeout(Duration::from_millis(100), async {
            let _g = l.enter().await.unwrap();
            std::future::pending::<()>().await
        })
        .await;
        assert!(cut.is_err());
        assert_eq!(l.inflight(), 0);
        // A forwarding task that panics.
        let t = tokio::spawn({
            let l = l.clone();
            async move {
                let _g = l.enter().await.unwrap();
                panic!("handler bug (expected by the test)");
            }
        });
        assert!(t.await.unwrap_err().is_panic());
        assert_eq!(l.inflight(), 0);
        let d = l.drain(Duration::from_secs(30)).await;
        assert_eq!(d.still_inflight, 0);
        assert_eq!(d.took, Duration::ZERO, "the drain completes at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_at_the_deadline_lets_the_request_through_once() {
        let l = link(10);
        let mut waiter = Box::pin(l.enter());
        assert!(poll_once(&mut waiter).await.is_pending());
        // The deadline passes and the service opens before the waiter runs again.
        tokio::time::advance(Duration::from_secs(6)).await;
        l.open();
        let g = waiter.await.expect("released, not timed out");
        assert_eq!((l.inflight(), l.held(), l.rejected()), (1, 0, 0));
        drop(g);
        assert_eq!(l.inflight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_asked_for_while_waking_does_not_outlive_the_wake() {
        let l = link(10);
        l.arm_wake();
        // The agent is busy pre-warming the service (not listening for wakes) when a request
        // arrives and asks for one.
        let t = spawn_enter(&l);
        tokio::task::yield_now().await;
        l.open();
        assert_eq!(t.await.unwrap(), Ok(()));
        // It sleeps again with nobody waiting: nothing asks for a wake.
        l.drain(Duration::ZERO).await;
        l.arm_wake();
        let woken = tokio::time::timeout(Duration::from_millis(10), l.wake_requested()).await;
        assert!(
            woken.is_err(),
            "woken by a wake the last one already answered"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_that_is_down_refuses_new_requests_at_once_until_it_is_up() {
        let l = link(8);
        l.arm_wake();
        let held = tokio::spawn({
            let l = l.clone();
            async move { l.enter().await.map(drop) }
        });
        l.wake_requested().await;
        l.fail_held("cold start failed");
        assert!(matches!(held.await.unwrap(), Err(HoldError::WakeFailed(_))));
        // Not held for a wake that is not coming: refused without waiting.
        let t0 = Instant::now();
        let e = l.enter().await.map(drop).unwrap_err();
        assert_eq!(e, HoldError::WakeFailed("cold start failed".into()));
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(l.held(), 0);
        l.open();
        l.enter().await.expect("up again");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_answer_after_opening_is_timed_from_the_open() {
        let l = link(8);
        assert_eq!(l.first_answer_after_open(), None);
        l.open();
        tokio::time::sleep(Duration::from_millis(7)).await;
        let g = l.enter().await.unwrap();
        g.answered();
        tokio::time::sleep(Duration::from_millis(5)).await;
        l.enter().await.unwrap().answered();
        assert_eq!(l.first_answer_after_open(), Some(Duration::from_millis(7)));
        drop(g);
        l.drain(Duration::from_secs(1)).await;
        l.open();
        assert_eq!(
            l.first_answer_after_open(),
            None,
            "a new opening starts over"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_under_the_lock_does_not_stop_the_link() {
        let l = link(10);
        l.open();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            l.with_arrivals(|_| panic!("policy bug (expected by the test)"))
        }));
        assert!(r.is_err());
        drop(l.enter().await.expect("still forwarding"));
        assert_eq!(l.inflight(), 0);
    }
}
