//! Background wakeups, as language runtimes have them: Go's sysmon and scheduler ticks, a JVM's
//! safepoint, GC and JIT timers, heartbeats. A thread wakes `hz` times a second on absolute
//! deadlines (a runtime's timer does not drift with the work it does) and each time reads and
//! changes `work` bytes of a heap of its own, page by page (a collector's scan of a small young
//! generation), so a service with no request in flight still costs CPU time, wakeups and dirty
//! pages: what torpor's idle-cost measurement and its freeze level are about.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::touch_region;

/// The timer rate of the runtimes above (Go's sysmon polls at up to 100 Hz when busy; a JVM's
/// default GC and safepoint timers are in the same range).
pub const RUNTIME_HZ: f64 = 100.0;

/// A background timer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ticker {
    /// Wakeups per second.
    pub hz: f64,
    /// Bytes of its own heap each wakeup reads and changes (0: it only counts).
    pub work: u64,
}

impl Ticker {
    /// Starts the timer thread; `ticks` counts its wakeups (the service's `COUNT`).
    pub fn spawn(self, ticks: Arc<AtomicU64>) {
        let period = Duration::from_secs_f64(1.0 / self.hz.max(1e-3));
        let mut heap = vec![0u8; self.work as usize];
        thread::spawn(move || {
            let mut next = Instant::now() + period;
            loop {
                thread::sleep(next.saturating_duration_since(Instant::now()));
                if !heap.is_empty() {
                    touch_region(&mut heap);
                }
                ticks.fetch_add(1, Ordering::Relaxed);
                next += period;
                // After a freeze or a checkpoint, go on from now rather than catch up.
                let now = Instant::now();
                if next < now {
                    next = now + period;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_wakes_at_its_rate() {
        let ticks = Arc::new(AtomicU64::new(0));
        Ticker {
            hz: RUNTIME_HZ,
            work: 64 << 10,
        }
        .spawn(ticks.clone());
        let t0 = Instant::now();
        while ticks.load(Ordering::Relaxed) < 20 {
            assert!(t0.elapsed() < Duration::from_secs(10), "the ticker stalled");
            thread::yield_now();
        }
        // Twenty ticks at 100 Hz take at least 200 ms minus the first period's slack.
        assert!(
            t0.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t0.elapsed()
        );
    }
}
