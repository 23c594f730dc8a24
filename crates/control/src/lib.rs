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
//! Time is tokio time, so tests can pause it; arrivals feed the policy's tracker on a
//! virtual clock counted from the link's creation.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
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
#[derive(Debug, Clone, Copy)]
pub struct HoldLimits {
    /// Most requests held at once; more get [`HoldError::QueueFull`].
    pub depth: usize,
    /// Longest a request is held.
    pub timeout: Duration,
}

#[derive(Debug)]
struct Inner {
    open: bool,
    /// The service is asleep: the first held request asks for a wake.
    wake_armed: bool,
    shutting_down: bool,
    waiters: VecDeque<oneshot::Sender<Result<(), HoldError>>>,
    arrivals: ArrivalTracker,
}

/// Shared by a service's gate and its agent.
#[derive(Debug)]
pub struct ServiceLink {
    pub name: String,
    limits: HoldLimits,
    epoch: Instant,
    inner: Mutex<Inner>,
    /// Requests (or connections) being forwarded now.
    inflight: AtomicUsize,
    /// Requests waiting in the hold queue now.
    held: AtomicUsize,
    inflight_changed: Notify,
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
    link: Arc<ServiceLink>,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.link.inflight.fetch_sub(1, Ordering::SeqCst);
        self.link.inflight_changed.notify_waiters();
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
            limits,
            epoch,
            inner: Mutex::new(Inner {
                open: false,
                wake_armed: false,
                shutting_down: false,
                waiters: VecDeque::new(),
                arrivals: ArrivalTracker::new(Duration::ZERO, Duration::from_secs(10)),
            }),
            inflight: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            inflight_changed: Notify::new(),
            wake: Notify::new(),
            backend_generation: watch::Sender::new(0),
            rejected: AtomicU64::new(0),
        })
    }

    /// Virtual time for the policy: time since the link was created.
    pub fn now(&self) -> Duration {
        Instant::now().duration_since(self.epoch)
    }

    /// Lets one request through, holding it first if the service is not up.
    pub async fn enter(self: &Arc<Self>) -> Result<InflightGuard, HoldError> {
        let rx = {
            let mut inner = self.inner.lock().expect("link lock");
            let now = self.now();
            inner.arrivals.record(now);
            if inner.shutting_down {
                return Err(self.reject(HoldError::ShuttingDown));
            }
            if inner.open {
                return Ok(self.guard());
            }
            if inner.waiters.len() >= self.limits.depth {
                return Err(self.reject(HoldError::QueueFull(inner.waiters.len())));
            }
            let (tx, rx) = oneshot::channel();
            inner.waiters.push_back(tx);
            if inner.wake_armed {
                inner.wake_armed = false;
                self.wake.notify_one();
            }
            rx
        };
        self.held.fetch_add(1, Ordering::SeqCst);
        let result = tokio::time::timeout(self.limits.timeout, rx).await;
        self.held.fetch_sub(1, Ordering::SeqCst);
        match result {
            // `open` already counted this request as in flight (so a drain right after the
            // wake waits for it); the guard takes that count over.
            Ok(Ok(Ok(()))) => Ok(InflightGuard { link: self.clone() }),
            Ok(Ok(Err(e))) => Err(self.reject(e)),
            Ok(Err(_)) => Err(self.reject(HoldError::ShuttingDown)),
            Err(_) => Err(self.reject(HoldError::Timeout(self.limits.timeout))),
        }
    }

    fn guard(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        InflightGuard { link: self.clone() }
    }

    fn reject(&self, e: HoldError) -> HoldError {
        self.rejected.fetch_add(1, Ordering::SeqCst);
        e
    }

    /// Stops forwarding (new requests are held), waits up to `deadline` for in-flight ones
    /// to finish, and retires pooled backend connections.
    pub async fn drain(&self, deadline: Duration) -> Drained {
        let start = Instant::now();
        self.inner.lock().expect("link lock").open = false;
        let end = start + deadline;
        loop {
            let notified = self.inflight_changed.notified();
            let left = self.inflight.load(Ordering::SeqCst);
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
        let mut inner = self.inner.lock().expect("link lock");
        if inner.waiters.is_empty() {
            inner.wake_armed = true;
        } else {
            self.wake.notify_one();
        }
    }

    /// Asks a sleeping service to wake without a request of its own (it is about to get
    /// some: a service it serves is waking). Nothing happens if it is awake or waking.
    pub fn request_wake(&self) {
        let mut inner = self.inner.lock().expect("link lock");
        if inner.wake_armed {
            inner.wake_armed = false;
            self.wake.notify_one();
        }
    }

    /// Resolves when a held request wants the service woken.
    pub async fn wake_requested(&self) {
        self.wake.notified().await
    }

    /// The service accepts connections: release held requests in arrival order and forward
    /// from now on.
    pub fn open(&self) {
        let mut inner = self.inner.lock().expect("link lock");
        inner.open = true;
        inner.wake_armed = false;
        let now = self.now();
        inner.arrivals.mark_active(now);
        while let Some(w) = inner.waiters.pop_front() {
            // Counted before the waiter runs: the service must not be drained and
            // checkpointed between its release and its forwarding.
            self.inflight.fetch_add(1, Ordering::SeqCst);
            if w.send(Ok(())).is_err() {
                self.inflight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// The service could not be brought up: every held request gets `reason`.
    pub fn fail_held(&self, reason: &str) {
        let mut inner = self.inner.lock().expect("link lock");
        while let Some(w) = inner.waiters.pop_front() {
            let _ = w.send(Err(HoldError::WakeFailed(reason.to_string())));
        }
    }

    /// Refuses everything from now on and releases the held requests with an error.
    pub fn shut_down(&self) {
        let mut inner = self.inner.lock().expect("link lock");
        inner.shutting_down = true;
        inner.open = false;
        while let Some(w) = inner.waiters.pop_front() {
            let _ = w.send(Err(HoldError::ShuttingDown));
        }
    }

    pub fn is_open(&self) -> bool {
        self.inner.lock().expect("link lock").open
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
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
        f(&mut self.inner.lock().expect("link lock").arrivals)
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
        let h = tokio::spawn({
            let l = l.clone();
            async move { l.enter().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        l.shut_down();
        assert_eq!(h.await.unwrap(), Err(HoldError::ShuttingDown));
        assert_eq!(l.enter().await.unwrap_err(), HoldError::ShuttingDown);
    }
}
