//! What a service costs, measured: while it is awake with nothing to do (CPU and wakeups of
//! its processes, its resident memory) and per trip to a level and back (a freeze and thaw,
//! or a checkpoint and restore). These are the governor's inputs ([`torpor_policy::choose_level`])
//! and what `torpor status` shows; each is a moving estimate, so one odd sample does not
//! decide for long.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use torpor_policy::{CycleCost, IdleCost};

/// Weight of the newest sample in each moving estimate.
const NEW: f64 = 0.3;

/// Shortest idle stretch worth a sample (shorter ones are mostly scheduling noise).
pub(crate) const IDLE_SAMPLE: Duration = Duration::from_secs(1);

/// A freeze before any was measured: a millisecond to thaw, a millisecond of CPU.
const FREEZE_GUESS: CycleCost = CycleCost {
    cpu_s: 0.002,
    exit_latency: Duration::from_millis(1),
};

/// CPU-seconds of a snapshot cycle before any was measured: a fixed part and a part per GiB
/// of footprint (checkpoint and eager restore each copy it once).
const SNAPSHOT_GUESS_FIXED_S: f64 = 0.1;
const SNAPSHOT_GUESS_PER_GIB_S: f64 = 1.5;

fn blend(old: f64, new: f64) -> f64 {
    old * (1.0 - NEW) + new * NEW
}

/// The figures as `torpor status` shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CostStatus {
    /// CPUs kept busy while idle; absent until an idle stretch was measured.
    pub idle_cpus: Option<f64>,
    /// Wakeups per second while idle.
    pub idle_wakeups_per_s: Option<f64>,
    /// CPU-seconds of one freeze and thaw, and the thaw's latency.
    pub freeze_cpu_s: Option<f64>,
    pub thaw_s: Option<f64>,
    /// CPU-seconds of one checkpoint and restore (torpor, CRIU and an embedded pool).
    pub snapshot_cycle_cpu_s: Option<f64>,
}

/// A service's measured costs.
#[derive(Debug, Default)]
pub(crate) struct Costs {
    /// The start of the current idle stretch: when, CPU-seconds and scheduler runs then.
    idle_from: Option<(Instant, f64, u64)>,
    idle_cpus: Option<f64>,
    idle_wakeups: Option<f64>,
    freeze_cpu_s: Option<f64>,
    thaw: Option<Duration>,
    checkpoint_cpu_s: Option<f64>,
    restore_cpu_s: Option<f64>,
}

impl Costs {
    /// One look at the awake service: `busy` when it had a request in flight or one arrived
    /// since the last look. A stretch with none at all, once long enough, is a sample.
    /// `runs` reads the tree's scheduler runs (a file per thread): only at a stretch's start
    /// and at each sample, not on every look.
    pub fn observe(&mut self, now: Instant, busy: bool, cpu_s: f64, runs: impl FnOnce() -> u64) {
        let Some((from, cpu0, runs0)) = self.idle_from.filter(|_| !busy) else {
            self.idle_from = (!busy).then(|| (now, cpu_s, runs()));
            return;
        };
        let dt = now.duration_since(from);
        if dt < IDLE_SAMPLE {
            return;
        }
        let runs = runs();
        let secs = dt.as_secs_f64();
        let cpus = (cpu_s - cpu0).max(0.0) / secs;
        let wakeups = runs.saturating_sub(runs0) as f64 / secs;
        self.idle_cpus = Some(self.idle_cpus.map_or(cpus, |o| blend(o, cpus)));
        self.idle_wakeups = Some(self.idle_wakeups.map_or(wakeups, |o| blend(o, wakeups)));
        self.idle_from = Some((now, cpu_s, runs));
    }

    /// The tree changed (slept, restarted): its counters start over.
    pub fn restart_idle(&mut self) {
        self.idle_from = None;
    }

    pub fn froze(&mut self, cpu_s: f64) {
        self.freeze_cpu_s = Some(self.freeze_cpu_s.map_or(cpu_s, |o| blend(o, cpu_s)));
    }

    pub fn thawed(&mut self, took: Duration, cpu_s: f64) {
        self.thaw = Some(
            self.thaw
                .map_or(took, |o| o.mul_f64(1.0 - NEW) + took.mul_f64(NEW)),
        );
        self.froze(cpu_s);
    }

    pub fn checkpointed(&mut self, cpu_s: f64) {
        self.checkpoint_cpu_s = Some(self.checkpoint_cpu_s.map_or(cpu_s, |o| blend(o, cpu_s)));
    }

    pub fn restored(&mut self, cpu_s: f64) {
        self.restore_cpu_s = Some(self.restore_cpu_s.map_or(cpu_s, |o| blend(o, cpu_s)));
    }

    /// What the service costs while idle; `None` until a stretch was measured.
    pub fn idle(&self, resident_bytes: u64) -> Option<IdleCost> {
        Some(IdleCost {
            cpus: self.idle_cpus?,
            wakeups_per_s: self.idle_wakeups?,
            resident_bytes,
        })
    }

    pub fn freeze(&self) -> CycleCost {
        CycleCost {
            cpu_s: self.freeze_cpu_s.unwrap_or(FREEZE_GUESS.cpu_s),
            exit_latency: self.thaw.unwrap_or(FREEZE_GUESS.exit_latency),
        }
    }

    /// A snapshot cycle: measured halves where there are some, else the guess from the
    /// footprint; `expected_wake` is the agent's own smoothed wake latency.
    pub fn snapshot(&self, footprint_bytes: u64, expected_wake: Duration) -> CycleCost {
        let guess = (SNAPSHOT_GUESS_FIXED_S
            + SNAPSHOT_GUESS_PER_GIB_S * footprint_bytes as f64 / (1u64 << 30) as f64)
            / 2.0;
        CycleCost {
            cpu_s: self.checkpoint_cpu_s.unwrap_or(guess) + self.restore_cpu_s.unwrap_or(guess),
            exit_latency: expected_wake,
        }
    }

    pub fn status(&self) -> CostStatus {
        CostStatus {
            idle_cpus: self.idle_cpus,
            idle_wakeups_per_s: self.idle_wakeups,
            freeze_cpu_s: self.freeze_cpu_s,
            thaw_s: self.thaw.map(|d| d.as_secs_f64()),
            snapshot_cycle_cpu_s: self
                .checkpoint_cpu_s
                .zip(self.restore_cpu_s)
                .map(|(c, r)| c + r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_stretch_is_sampled_and_a_busy_one_is_not() {
        let mut c = Costs::default();
        let t0 = Instant::now();
        c.observe(t0, false, 10.0, || 1000);
        // Half a second: too short for a sample.
        c.observe(t0 + Duration::from_millis(500), false, 10.01, || 1050);
        assert_eq!(c.idle(0), None);
        // Two seconds idle, 20 ms of CPU and 200 runs: 0.01 CPUs, 100 wakeups/s.
        c.observe(t0 + Duration::from_secs(2), false, 10.02, || 1200);
        let idle = c.idle(5).unwrap();
        assert!((idle.cpus - 0.01).abs() < 1e-9, "{idle:?}");
        assert!((idle.wakeups_per_s - 100.0).abs() < 1e-9, "{idle:?}");
        assert_eq!(idle.resident_bytes, 5);
        // A busy stretch in between resets the start: its CPU is the requests', not idle.
        c.observe(t0 + Duration::from_secs(3), true, 15.0, || 5000);
        c.observe(t0 + Duration::from_millis(3100), false, 15.0, || 5000);
        c.observe(t0 + Duration::from_millis(4100), false, 15.0, || 5000);
        let idle = c.idle(5).unwrap();
        assert!(
            (idle.cpus - 0.007).abs() < 1e-9,
            "blended towards 0: {idle:?}"
        );
    }

    #[test]
    fn cycles_are_guessed_from_the_footprint_until_measured() {
        let mut c = Costs::default();
        let wake = Duration::from_millis(40);
        let guess = c.snapshot(1 << 30, wake);
        assert!((guess.cpu_s - 1.6).abs() < 1e-9);
        assert_eq!(guess.exit_latency, wake);
        c.checkpointed(0.3);
        c.restored(0.2);
        assert!((c.snapshot(1 << 30, wake).cpu_s - 0.5).abs() < 1e-9);
        assert_eq!(c.status().snapshot_cycle_cpu_s, Some(0.5));
        assert_eq!(c.freeze(), FREEZE_GUESS);
        c.thawed(Duration::from_micros(600), 0.001);
        assert_eq!(c.freeze().exit_latency, Duration::from_micros(600));
    }
}
