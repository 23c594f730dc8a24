//! The node's roster: where each service is and what it holds, as its own loop last saw it,
//! for the decisions that weigh services against each other: which one to snapshot when the
//! awake ones hold more memory than the node's budget (the coldest idle one: the pool as far
//! memory), and whether every other service is already snapshotted (then one more snapshot
//! puts node sleep in reach, and the governor credits it).

use std::{collections::HashMap, sync::Mutex};

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
        });
        entry.state = state;
        if !matches!(state, ServiceState::Awake | ServiceState::Frozen) {
            entry.idle_since = None;
        }
        if state == ServiceState::Asleep {
            entry.resident_bytes = 0;
        }
    }

    /// A service's tick: what it holds and since when it is idle and free to be snapshotted.
    pub fn observe(&self, name: &str, resident_bytes: u64, idle_since: Option<Instant>) {
        if let Some(entry) = self.entries.lock().expect("roster lock").get_mut(name) {
            entry.resident_bytes = resident_bytes;
            entry.idle_since = idle_since;
        }
    }

    /// A service left the node (a reload removed it).
    pub fn remove(&self, name: &str) {
        self.entries.lock().expect("roster lock").remove(name);
    }

    /// Whether every service but `name` is snapshotted.
    pub fn others_asleep(&self, name: &str) -> bool {
        self.entries
            .lock()
            .expect("roster lock")
            .iter()
            .all(|(n, e)| n == name || e.state == ServiceState::Asleep)
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
    use std::time::Duration;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn roster(services: &[(&str, ServiceState, u64, Option<u64>)], now: Instant) -> Roster {
        let r = Roster::default();
        for &(name, state, resident, idle_s) in services {
            r.set_state(name, state);
            r.observe(name, resident, idle_s.map(|s| now - Duration::from_secs(s)));
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
        r.observe("a", 200 * MIB, Some(now));
        assert!(r.coldest_over_budget("b", 300 * MIB).is_some());
    }

    #[test]
    fn others_asleep_ignores_the_asking_service() {
        let now = Instant::now();
        let r = roster(
            &[
                ("a", ServiceState::Awake, MIB, Some(1)),
                ("b", ServiceState::Asleep, 0, None),
            ],
            now,
        );
        assert!(r.others_asleep("a"));
        assert!(!r.others_asleep("b"));
        r.remove("a");
        assert!(r.others_asleep("b"));
    }
}
