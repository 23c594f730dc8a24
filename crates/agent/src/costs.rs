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

/// How often the service's loop looks at an idle service: every look at an awake one reads
/// its processes' counters, a look at a resting one reads nothing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Looks {
    pub awake_idle: Duration,
    pub resting: Duration,
}

impl Looks {
    /// Wakeups per second of looks at an awake idle service beyond those at rest.
    fn extra_wakeups_per_s(&self) -> f64 {
        (1.0 / self.awake_idle.as_secs_f64() - 1.0 / self.resting.as_secs_f64()).max(0.0)
    }
}

/// The figures as `torpor status` shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CostStatus {
    /// CPUs kept busy while idle; absent until an idle stretch was measured.
    pub idle_cpus: Option<f64>,
    /// Wakeups per second while idle.
    pub idle_wakeups_per_s: Option<f64>,
    /// CPUs torpor spends looking at it while it is awake and idle; absent until measured.
    #[serde(default)]
    pub watch_cpus: Option<f64>,
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
    /// CPU-seconds of one look at the awake idle tree (torpor's, reading its counters).
    look_cpu_s: Option<f64>,
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

    /// One look at the awake tree with nothing to do took `cpu_s` of torpor's CPU.
    pub fn looked(&mut self, cpu_s: f64) {
        self.look_cpu_s = Some(self.look_cpu_s.map_or(cpu_s, |o| blend(o, cpu_s)));
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

    /// What the service costs while idle, torpor's looks at it included; `None` until a
    /// stretch was measured.
    pub fn idle(&self, resident_bytes: u64, looks: &Looks) -> Option<IdleCost> {
        Some(IdleCost {
            cpus: self.idle_cpus?,
            wakeups_per_s: self.idle_wakeups?,
            resident_bytes,
            watch_cpus: self.watch_cpus(looks).unwrap_or(0.0),
            watch_wakeups_per_s: looks.extra_wakeups_per_s(),
        })
    }

    /// A look at a resting service reads nothing: its CPU is left out.
    fn watch_cpus(&self, looks: &Looks) -> Option<f64> {
        Some(self.look_cpu_s? / looks.awake_idle.as_secs_f64())
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

    pub fn status(&self, looks: &Looks) -> CostStatus {
        CostStatus {
            idle_cpus: self.idle_cpus,
            idle_wakeups_per_s: self.idle_wakeups,
            watch_cpus: self.watch_cpus(looks),
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
        assert_eq!(c.idle(0, &LOOKS), None);
        // Two seconds idle, 20 ms of CPU and 200 runs: 0.01 CPUs, 100 wakeups/s.
        c.observe(t0 + Duration::from_secs(2), false, 10.02, || 1200);
        let idle = c.idle(5, &LOOKS).unwrap();
        assert!((idle.cpus - 0.01).abs() < 1e-9, "{idle:?}");
        assert!((idle.wakeups_per_s - 100.0).abs() < 1e-9, "{idle:?}");
        assert_eq!(idle.resident_bytes, 5);
        // A busy stretch in between resets the start: its CPU is the requests', not idle.
        c.observe(t0 + Duration::from_secs(3), true, 15.0, || 5000);
        c.observe(t0 + Duration::from_millis(3100), false, 15.0, || 5000);
        c.observe(t0 + Duration::from_millis(4100), false, 15.0, || 5000);
        let idle = c.idle(5, &LOOKS).unwrap();
        assert!(
            (idle.cpus - 0.007).abs() < 1e-9,
            "blended towards 0: {idle:?}"
        );
    }

    const LOOKS: Looks = Looks {
        awake_idle: Duration::from_millis(250),
        resting: Duration::from_secs(1),
    };

    #[tokio::test(start_paused = true)]
    async fn torpor_s_looks_at_an_awake_idle_service_are_part_of_its_idle_cost() {
        let mut c = Costs::default();
        let t0 = Instant::now();
        c.observe(t0, false, 1.0, || 10);
        c.observe(t0 + Duration::from_secs(2), false, 1.0, || 10);
        let idle = c.idle(0, &LOOKS).unwrap();
        // Nothing measured of the looks yet: only their wakeups, 4/s awake against 1/s at rest.
        assert_eq!(idle.watch_cpus, 0.0);
        assert!((idle.watch_wakeups_per_s - 3.0).abs() < 1e-12, "{idle:?}");
        assert_eq!(c.status(&LOOKS).watch_cpus, None);
        // Looks of 200 µs, four a second: 0.08 % of a CPU.
        c.looked(200e-6);
        let idle = c.idle(0, &LOOKS).unwrap();
        assert!((idle.watch_cpus - 8e-4).abs() < 1e-12, "{idle:?}");
        assert_eq!(idle.cpus, 0.0, "the service's own figures stay its own");
        c.looked(100e-6);
        let blended = 200e-6 * 0.7 + 100e-6 * 0.3;
        assert!((c.status(&LOOKS).watch_cpus.unwrap() - blended * 4.0).abs() < 1e-12);
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
        assert_eq!(c.status(&LOOKS).snapshot_cycle_cpu_s, Some(0.5));
        assert_eq!(c.freeze(), FREEZE_GUESS);
        c.thawed(Duration::from_micros(600), 0.001);
        assert_eq!(c.freeze().exit_latency, Duration::from_micros(600));
    }
}
