//! The node's roster: where each service is and what it holds, as its own loop last saw it,
//! for the decisions that weigh services against each other: which one to snapshot when the
//! awake ones hold more memory than the node's budget (the coldest idle one: the pool as far
//! memory), and whether node sleep is in reach (every other service snapshotted, or idle
//! with a quiet predicted past the node's break-even: then snapshotting the ones still up
//! lets the node sleep, and the governor credits each its share of the node's saving).

use std::{collections::HashMap, sync::Mutex};

use std::time::Duration;

use tokio::time::Instant;

use crate::ServiceState;

/// One service as the roster knows it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    state: ServiceState,
    /// Memory it holds on the node (its tree's resident set while up).
    resident_bytes: u64,
    /// Since when it has been idle and free to be snapshotted (nothing in flight, not
    /// pinned, allowed to sleep); `None` while it is not.
    idle_since: Option<Instant>,
    /// How much longer its quiet is predicted to last, while it is idle and free.
    quiet: Option<Duration>,
}

/// Every service of the node.
#[derive(Debug, Default)]
pub(crate) struct Roster {
    entries: Mutex<HashMap<String, Entry>>,
}

/// Why a service is picked to make room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OverBudget {
    /// Memory the services up on the node hold.
    pub held_bytes: u64,
    pub budget_bytes: u64,
}

/// States whose memory is on the node and stays there: a service checkpointing is on its way
/// out and not counted, so that one over-budget moment snapshots one service, not several.
fn holds_memory(state: ServiceState) -> bool {
    matches!(
        state,
        ServiceState::Awake | ServiceState::Frozen | ServiceState::Waking
    )
}

impl Roster {
    /// A service changed state (every transition goes through here).
    pub fn set_state(&self, name: &str, state: ServiceState) {
        let mut e = self.entries.lock().expect("roster lock");
        let entry = e.entry(name.to_string()).or_insert(Entry {
            state,
            resident_bytes: 0,
            idle_since: None,
            quiet: None,
        });
        entry.state = state;
        if !matches!(state, ServiceState::Awake | ServiceState::Frozen) {
            entry.idle_since = None;
            entry.quiet = None;
        }
        if state == ServiceState::Asleep {
            entry.resident_bytes = 0;
        }
    }

    /// A service's tick: what it holds, and, while it is idle and free to be snapshotted,
    /// since when and for how much longer its quiet is predicted to last.
    pub fn observe(&self, name: &str, resident_bytes: u64, idle: Option<(Instant, Duration)>) {
        if let Some(entry) = self.entries.lock().expect("roster lock").get_mut(name) {
            entry.resident_bytes = resident_bytes;
            entry.idle_since = idle.map(|(since, _)| since);
            entry.quiet = idle.map(|(_, quiet)| quiet);
        }
    }

    /// A service left the node (a reload removed it).
    pub fn remove(&self, name: &str) {
        self.entries.lock().expect("roster lock").remove(name);
    }

    /// When node sleep is in reach for `name`'s snapshot: every other service is snapshotted,
    /// or idle and free with a quiet predicted to last at least `min_quiet`. Then how many
    /// services (`name` among them) are still up: the node's saving needs all of them down,
    /// so each is credited that share of it.
    pub fn node_sleep_share(&self, name: &str, min_quiet: Duration) -> Option<usize> {
        let e = self.entries.lock().expect("roster lock");
        let mut up = 1;
        for (n, entry) in e.iter().filter(|(n, _)| *n != name) {
            if entry.state == ServiceState::Asleep {
                continue;
            }
            if !matches!(entry.quiet, Some(q) if q >= min_quiet) {
                tracing::trace!(service = %n, "keeps the node from sleeping");
                return None;
            }
            up += 1;
        }
        Some(up)
    }

    /// When the services up hold more than `budget_bytes`, and `name` is the one idle the
    /// longest of those free to go: what it should make room for.
    pub fn coldest_over_budget(&self, name: &str, budget_bytes: u64) -> Option<OverBudget> {
        let e = self.entries.lock().expect("roster lock");
        let held_bytes: u64 = e
            .values()
            .filter(|e| holds_memory(e.state))
            .map(|e| e.resident_bytes)
            .sum();
        if held_bytes <= budget_bytes {
            return None;
        }
        let coldest = e
            .iter()
            .filter(|(_, e)| e.resident_bytes > 0)
            .filter_map(|(n, e)| e.idle_since.map(|at| (at, n)))
            // Oldest idle first; the name breaks ties so every service agrees on one.
            .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)))?;
        (coldest.1 == name).then_some(OverBudget {
            held_bytes,
            budget_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn roster(services: &[(&str, ServiceState, u64, Option<u64>)], now: Instant) -> Roster {
        let r = Roster::default();
        for &(name, state, resident, idle_s) in services {
            r.set_state(name, state);
            // Quiet predicted for as long again as it has been idle.
            let idle = idle_s.map(|s| (now - Duration::from_secs(s), Duration::from_secs(s)));
            r.observe(name, resident, idle);
        }
        r
    }

    #[test]
    fn under_budget_nobody_is_picked() {
        let now = Instant::now();
        let r = roster(
            &[
                ("a", ServiceState::Awake, 100 * MIB, Some(60)),
                ("b", ServiceState::Awake, 100 * MIB, Some(5)),
            ],
            now,
        );
        assert_eq!(r.coldest_over_budget("a", 200 * MIB), None);
        assert_eq!(r.coldest_over_budget("b", 200 * MIB), None);
    }

    #[test]
    fn over_budget_the_coldest_idle_service_and_only_it_is_picked() {
        let now = Instant::now();
        let r = roster(
            &[
                ("busy", ServiceState::Awake, 300 * MIB, None),
                ("warm", ServiceState::Awake, 100 * MIB, Some(5)),
                ("cold", ServiceState::Frozen, 100 * MIB, Some(600)),
                ("gone", ServiceState::Asleep, 0, None),
            ],
            now,
        );
        let over = r.coldest_over_budget("cold", 256 * MIB).expect("picked");
        assert_eq!(over.held_bytes, 500 * MIB);
        assert_eq!(r.coldest_over_budget("warm", 256 * MIB), None);
        assert_eq!(r.coldest_over_budget("busy", 256 * MIB), None);
    }

    #[test]
    fn a_service_on_its_way_out_is_not_counted_so_one_moment_over_takes_one_service() {
        let now = Instant::now();
        let r = roster(
            &[
                ("a", ServiceState::Awake, 200 * MIB, Some(60)),
                ("b", ServiceState::Awake, 200 * MIB, Some(30)),
            ],
            now,
        );
        assert!(r.coldest_over_budget("a", 300 * MIB).is_some());
        // a drains and checkpoints: b is not picked meanwhile.
        r.set_state("a", ServiceState::Draining);
        assert_eq!(r.coldest_over_budget("b", 300 * MIB), None);
        // Its checkpoint failed: it is back and counted again, and picked again.
        r.set_state("a", ServiceState::Awake);
        r.observe("a", 200 * MIB, Some((now, Duration::ZERO)));
        assert!(r.coldest_over_budget("b", 300 * MIB).is_some());
    }

    #[test]
    fn node_sleep_is_in_reach_when_the_others_sleep_or_are_quiet_long_enough() {
        let now = Instant::now();
        let r = roster(
            &[
                ("a", ServiceState::Awake, MIB, Some(100)),
                ("b", ServiceState::Asleep, 0, None),
                ("c", ServiceState::Frozen, MIB, Some(50)),
            ],
            now,
        );
        let min = Duration::from_secs(30);
        assert_eq!(r.node_sleep_share("a", min), Some(2), "a and c still up");
        assert_eq!(r.node_sleep_share("c", min), Some(2));
        // c's quiet is too short for the node to sleep through it.
        assert_eq!(r.node_sleep_share("a", Duration::from_secs(60)), None);
        // A service waking keeps the node up.
        r.set_state("b", ServiceState::Waking);
        assert_eq!(r.node_sleep_share("a", min), None);
        r.set_state("b", ServiceState::Asleep);
        r.set_state("c", ServiceState::Asleep);
        assert_eq!(
            r.node_sleep_share("a", min),
            Some(1),
            "the last one up takes it all"
        );
        r.remove("a");
        assert_eq!(r.node_sleep_share("b", min), Some(1));
    }
}
