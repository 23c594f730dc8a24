//! The sleep decision and the pre-warm rule.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::arrivals::ArrivalTracker;

/// A service's policy knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// Sleep only after this long without a request.
    pub idle_threshold: Duration,
    /// Sleep only while the recent arrival rate is below this (requests per second).
    pub max_sleep_rate: f64,
    /// If the expected wake takes longer than this, the service never sleeps.
    pub wake_objective: Option<Duration>,
    /// Snapshots up to this footprint stay in the pool's memory tier; larger ones may be
    /// spilled to its disk tier (the seed's "tiered" approach).
    pub memory_tier_max_bytes: u64,
    /// Pre-warm only with at least this many recorded gaps.
    pub prewarm_min_samples: u64,
    /// How an idle service's level is chosen.
    pub governor: Governor,
}

/// How the agent decides that an idle service rests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Governor {
    /// The seed's rule ([`decide_sleep`]): snapshot once idle past the threshold with the
    /// rate under the limit, whatever it costs.
    #[default]
    Threshold,
    /// [`crate::choose_level`]: frozen or snapshotted only when the level pays for its cycle
    /// over the predicted idle period.
    Energy,
}

impl Governor {
    pub fn parse(s: &str) -> Option<Governor> {
        match s {
            "threshold" => Some(Governor::Threshold),
            "energy" => Some(Governor::Energy),
            _ => None,
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            idle_threshold: Duration::from_millis(500),
            max_sleep_rate: 10.0,
            wake_objective: None,
            memory_tier_max_bytes: 1 << 30,
            prewarm_min_samples: 8,
            governor: Governor::Threshold,
        }
    }
}

/// Where a snapshot should live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotTier {
    Memory,
    Tiered,
}

impl SnapshotTier {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotTier::Memory => "memory",
            SnapshotTier::Tiered => "tiered",
        }
    }
}

/// Why a service stays awake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AwakeReason {
    /// A request came in less than the idle threshold ago.
    RecentlyBusy,
    /// The arrival rate is above the limit at which sleeping pays.
    RateTooHigh,
    /// Waking would take longer than the latency objective allows.
    WakeTooSlow,
}

/// What to do with an awake service now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "decision")]
pub enum SleepDecision {
    StayAwake { reason: AwakeReason },
    Sleep { tier: SnapshotTier },
}

/// Decides whether an awake service should sleep at `now`. `expected_wake` is the wake
/// latency the agent measured (or estimated from footprint) for this service.
pub fn decide_sleep(
    cfg: &PolicyConfig,
    arrivals: &mut ArrivalTracker,
    now: Duration,
    footprint_bytes: u64,
    expected_wake: Duration,
) -> SleepDecision {
    if let Some(objective) = cfg.wake_objective {
        if expected_wake > objective {
            return SleepDecision::StayAwake {
                reason: AwakeReason::WakeTooSlow,
            };
        }
    }
    if arrivals.idle_for(now) < cfg.idle_threshold {
        return SleepDecision::StayAwake {
            reason: AwakeReason::RecentlyBusy,
        };
    }
    if arrivals.rate(now) >= cfg.max_sleep_rate {
        return SleepDecision::StayAwake {
            reason: AwakeReason::RateTooHigh,
        };
    }
    let tier = if footprint_bytes <= cfg.memory_tier_max_bytes {
        SnapshotTier::Memory
    } else {
        SnapshotTier::Tiered
    };
    SleepDecision::Sleep { tier }
}

/// When (virtual time) to restore a sleeping service ahead of its predicted next arrival,
/// or `None` to wait for a request.
///
/// The next arrival is predicted as the last arrival plus the 10th percentile of recorded
/// gaps: nine in ten gaps are longer, so a wake finished by then is rarely too late. Pre-
/// warming is worth it only when the service still sleeps a while in between: the predicted
/// gap must exceed the idle threshold plus two wake durations (roughly one checkpoint and
/// one restore); otherwise the service should simply not have slept.
pub fn prewarm_at(
    cfg: &PolicyConfig,
    arrivals: &ArrivalTracker,
    expected_wake: Duration,
) -> Option<Duration> {
    let hist = arrivals.histogram();
    if hist.count() < cfg.prewarm_min_samples {
        return None;
    }
    let last = arrivals.last_arrival()?;
    let early_gap = hist.quantile(0.1)?;
    if early_gap <= cfg.idle_threshold + 2 * expected_wake {
        return None;
    }
    Some(last + early_gap - expected_wake)
}

/// Until when (virtual time) a pre-warmed service stays awake for the request it was woken
/// for: the 90th-percentile gap after the last arrival (upper bucket edge), plus the idle
/// threshold. Sleeping again earlier would waste the pre-warm.
pub fn prewarm_hold_until(cfg: &PolicyConfig, arrivals: &ArrivalTracker) -> Option<Duration> {
    let late_gap = arrivals.histogram().quantile_upper(0.9)?;
    Some(arrivals.last_arrival()? + late_gap + cfg.idle_threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    fn tracker_with(arrivals: &[Duration]) -> ArrivalTracker {
        let mut t = ArrivalTracker::new(Duration::ZERO, 10 * S);
        for a in arrivals {
            t.record(*a);
        }
        t
    }

    #[test]
    fn sleeps_only_after_the_idle_threshold() {
        let cfg = PolicyConfig::default();
        let mut t = tracker_with(&[S]);
        let d = |t: &mut ArrivalTracker, now| decide_sleep(&cfg, t, now, 64 << 20, 50 * MS);
        assert_eq!(
            d(&mut t, S + 499 * MS),
            SleepDecision::StayAwake {
                reason: AwakeReason::RecentlyBusy
            }
        );
        assert_eq!(
            d(&mut t, S + 500 * MS),
            SleepDecision::Sleep {
                tier: SnapshotTier::Memory
            }
        );
    }

    #[test]
    fn a_high_rate_keeps_it_awake_even_when_momentarily_idle() {
        let cfg = PolicyConfig::default();
        // 150 requests in the last 10 s (15/s), the last one 600 ms ago.
        let arrivals: Vec<Duration> = (0..150).map(|i| 2 * S + i * 60 * MS).collect();
        let mut t = tracker_with(&arrivals);
        let now = *arrivals.last().unwrap() + 600 * MS;
        assert_eq!(
            decide_sleep(&cfg, &mut t, now, 1, 50 * MS),
            SleepDecision::StayAwake {
                reason: AwakeReason::RateTooHigh
            }
        );
        // Ten seconds later the window has emptied and it may sleep.
        assert!(matches!(
            decide_sleep(&cfg, &mut t, now + 10 * S, 1, 50 * MS),
            SleepDecision::Sleep { .. }
        ));
    }

    #[test]
    fn slow_wake_forbids_sleep_and_footprint_picks_the_tier() {
        let cfg = PolicyConfig {
            wake_objective: Some(100 * MS),
            ..Default::default()
        };
        let mut t = tracker_with(&[]);
        assert_eq!(
            decide_sleep(&cfg, &mut t, 10 * S, 1, 150 * MS),
            SleepDecision::StayAwake {
                reason: AwakeReason::WakeTooSlow
            }
        );
        assert_eq!(
            decide_sleep(&cfg, &mut t, 10 * S, 2 << 30, 80 * MS),
            SleepDecision::Sleep {
                tier: SnapshotTier::Tiered
            }
        );
    }

    #[test]
    fn periodic_arrivals_are_prewarmed_ahead_of_the_next_one() {
        let cfg = PolicyConfig::default();
        // A request every 5 s.
        let arrivals: Vec<Duration> = (1..=12).map(|i| i * 5 * S).collect();
        let t = tracker_with(&arrivals);
        let at = prewarm_at(&cfg, &t, 100 * MS).expect("predictable");
        let last = 60 * S;
        // 5 s gaps fall in the [4.096, 5.12) s bucket: wake by last + 4.096 s.
        assert_eq!(at, last + 4096 * MS - 100 * MS);
        assert!(at < last + 5 * S, "ready before the next arrival");
        // And it stays up until the bucket's upper edge plus the idle threshold.
        let hold = prewarm_hold_until(&cfg, &t).unwrap();
        assert_eq!(hold, last + 5120 * MS + 500 * MS);
        assert!(hold > last + 5 * S, "still awake when the request comes");
    }

    #[test]
    fn no_prewarm_without_history_or_for_short_gaps() {
        let cfg = PolicyConfig::default();
        assert_eq!(prewarm_at(&cfg, &tracker_with(&[S, 2 * S]), 50 * MS), None);
        // 600 ms gaps: not worth sleeping and pre-warming in between.
        let arrivals: Vec<Duration> = (1..=20).map(|i| i * 600 * MS).collect();
        assert_eq!(prewarm_at(&cfg, &tracker_with(&arrivals), 50 * MS), None);
    }
}
