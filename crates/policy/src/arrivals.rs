//! Arrival statistics per service, on virtual time.

use std::{collections::VecDeque, time::Duration};

/// Sub-buckets per power of two: quarter octaves, so a bucket spans at most 25 % of its
/// lower edge (a 1.5 s period lands in [1.28, 1.536) s).
const SUBS: usize = 4;
/// Octaves of milliseconds covered: 2^40 ms is decades, so no gap is dropped.
const OCTAVES: usize = 40;

/// Log-spaced histogram of inter-arrival gaps in milliseconds, quarter-octave resolution.
#[derive(Debug, Clone)]
pub struct InterArrivalHistogram {
    buckets: [u64; OCTAVES * SUBS],
    count: u64,
}

impl Default for InterArrivalHistogram {
    fn default() -> Self {
        InterArrivalHistogram {
            buckets: [0; OCTAVES * SUBS],
            count: 0,
        }
    }
}

impl InterArrivalHistogram {
    fn bucket(gap: Duration) -> usize {
        let ms = (gap.as_millis().max(1) as u64).min((1 << OCTAVES) - 1);
        let octave = 63 - ms.leading_zeros() as usize;
        // The two bits below the leading one pick the quarter.
        let sub = if octave >= 2 {
            (ms >> (octave - 2)) & 3
        } else {
            (ms << (2 - octave)) & 3
        } as usize;
        octave * SUBS + sub
    }

    /// Lower and upper edge of bucket `i`, in milliseconds (bucket 0 starts at 0).
    fn edges(i: usize) -> (u64, u64) {
        let (octave, sub) = ((i / SUBS) as u64, (i % SUBS) as u64);
        let lower = ((4 + sub) << octave) / 4;
        let upper = ((5 + sub) << octave) / 4;
        (if i == 0 { 0 } else { lower }, upper.max(1))
    }

    pub fn record(&mut self, gap: Duration) {
        self.buckets[Self::bucket(gap)] += 1;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn quantile_bucket(&self, q: f64) -> Option<usize> {
        if self.count == 0 {
            return None;
        }
        let target = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        self.buckets.iter().position(|n| {
            seen += n;
            seen >= target
        })
    }

    /// The gap below which a fraction `q` of recorded gaps fall, as its bucket's lower edge
    /// (so predictions of the next arrival err early). `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        self.quantile_bucket(q)
            .map(|i| Duration::from_millis(Self::edges(i).0))
    }

    /// The same quantile as its bucket's upper edge (for "by then it has surely come").
    pub fn quantile_upper(&self, q: f64) -> Option<Duration> {
        self.quantile_bucket(q)
            .map(|i| Duration::from_millis(Self::edges(i).1))
    }
}

impl InterArrivalHistogram {
    /// How much longer an idle period that has lasted `elapsed` goes on, as the quantile `q`
    /// of the recorded gaps longer than `elapsed` (each taken at its bucket's lower edge, so
    /// the prediction errs short), minus `elapsed`; and how many gaps that rests on. `None`
    /// when no recorded gap was that long: the history has nothing to say about it.
    pub fn remaining_after(&self, elapsed: Duration, q: f64) -> Option<(Duration, u64)> {
        let ms = elapsed.as_millis() as u64;
        let longer = |i: usize| Self::edges(i).1 > ms;
        let count: u64 = (0..self.buckets.len())
            .filter(|&i| longer(i))
            .map(|i| self.buckets[i])
            .sum();
        if count == 0 {
            return None;
        }
        let target = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        let i = (0..self.buckets.len()).filter(|&i| longer(i)).find(|&i| {
            seen += self.buckets[i];
            seen >= target
        })?;
        let lower = Duration::from_millis(Self::edges(i).0);
        Some((lower.saturating_sub(elapsed), count))
    }
}

/// What the gate knows about a service's arrivals.
#[derive(Debug, Clone)]
pub struct ArrivalTracker {
    /// Window of the rate estimate.
    window: Duration,
    /// Arrival times inside the window, oldest first.
    recent: VecDeque<Duration>,
    last: Option<Duration>,
    /// When tracking began or the service last became able to serve: idle time counts from
    /// the latest of this and the last arrival (requests held during a wake arrived earlier).
    since: Duration,
    histogram: InterArrivalHistogram,
}

impl ArrivalTracker {
    pub fn new(now: Duration, window: Duration) -> ArrivalTracker {
        ArrivalTracker {
            window,
            recent: VecDeque::new(),
            last: None,
            since: now,
            histogram: InterArrivalHistogram::default(),
        }
    }

    /// Records one arrival at `now`.
    pub fn record(&mut self, now: Duration) {
        if let Some(last) = self.last {
            self.histogram.record(now.saturating_sub(last));
        }
        self.last = Some(now);
        self.recent.push_back(now);
        self.expire(now);
    }

    fn expire(&mut self, now: Duration) {
        while let Some(&t) = self.recent.front() {
            if now.saturating_sub(t) > self.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }

    /// Arrivals per second over the window ending at `now`.
    pub fn rate(&mut self, now: Duration) -> f64 {
        self.expire(now);
        self.recent.len() as f64 / self.window.as_secs_f64()
    }

    /// Marks the service as active at `now` without counting an arrival (it just woke).
    pub fn mark_active(&mut self, now: Duration) {
        self.since = self.since.max(now);
    }

    /// Time since the last arrival or activity (or since tracking began).
    pub fn idle_for(&self, now: Duration) -> Duration {
        now.saturating_sub(self.last.unwrap_or(self.since).max(self.since))
    }

    pub fn last_arrival(&self) -> Option<Duration> {
        self.last
    }

    pub fn histogram(&self) -> &InterArrivalHistogram {
        &self.histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn rate_idle_and_histogram() {
        let mut t = ArrivalTracker::new(Duration::ZERO, Duration::from_secs(10));
        for i in 0..20 {
            t.record(i * 100 * MS);
        }
        assert!(
            (t.rate(1900 * MS) - 2.0).abs() < 1e-9,
            "20 arrivals in a 10 s window"
        );
        assert_eq!(t.idle_for(2400 * MS), 500 * MS);
        assert_eq!(t.histogram().count(), 19);
        // 100 ms gaps land in [96, 112) ms.
        assert_eq!(t.histogram().quantile(0.5), Some(96 * MS));
        assert_eq!(t.histogram().quantile_upper(0.5), Some(112 * MS));
        // After the window passes, the rate falls to zero.
        assert_eq!(t.rate(Duration::from_secs(30)), 0.0);
    }

    #[test]
    fn histogram_quantiles_and_extremes() {
        let mut h = InterArrivalHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        for _ in 0..9 {
            h.record(Duration::from_secs(1));
        }
        h.record(Duration::from_secs(100));
        h.record(Duration::from_micros(10));
        h.record(Duration::from_secs(10_000_000));
        assert_eq!(h.quantile(0.0), Some(Duration::ZERO));
        // 1000 ms lands in [896, 1024) ms.
        assert_eq!(h.quantile(0.5), Some(Duration::from_millis(896)));
        assert_eq!(h.quantile_upper(0.5), Some(Duration::from_millis(1024)));
        // 10^10 ms lands in [2^33, 1.25 * 2^33) ms.
        assert_eq!(h.quantile(1.0), Some(Duration::from_millis(1 << 33)));
    }

    #[test]
    fn the_remaining_idle_time_is_conditioned_on_the_time_already_idle() {
        let mut h = InterArrivalHistogram::default();
        // Mostly short gaps (100 ms), a few long ones (20 s).
        for _ in 0..90 {
            h.record(Duration::from_millis(100));
        }
        for _ in 0..10 {
            h.record(Duration::from_secs(20));
        }
        // Unconditioned, the median gap is short ...
        let (left, n) = h.remaining_after(Duration::ZERO, 0.5).unwrap();
        assert!(left < Duration::from_millis(100), "{left:?}");
        assert_eq!(n, 100);
        // ... but once idle for a second, only the long gaps remain: about 19 s more.
        let (left, n) = h.remaining_after(Duration::from_secs(1), 0.5).unwrap();
        assert_eq!(n, 10);
        assert!(
            left > Duration::from_secs(15) && left < Duration::from_secs(19),
            "{left:?}"
        );
        // Idle longer than any recorded gap: the history says nothing.
        assert_eq!(h.remaining_after(Duration::from_secs(60), 0.5), None);
    }

    #[test]
    fn idle_counts_from_a_wake_after_earlier_arrivals() {
        let mut t = ArrivalTracker::new(Duration::ZERO, Duration::from_secs(10));
        t.record(Duration::from_secs(1));
        t.mark_active(Duration::from_secs(3));
        assert_eq!(t.idle_for(Duration::from_secs(4)), Duration::from_secs(1));
        assert_eq!(t.histogram().count(), 0, "activity is not an arrival");
    }

    #[test]
    fn idle_counts_from_start_before_any_arrival() {
        let t = ArrivalTracker::new(Duration::from_secs(5), Duration::from_secs(10));
        assert_eq!(t.idle_for(Duration::from_secs(7)), Duration::from_secs(2));
    }
}
