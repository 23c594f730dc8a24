//! Consolidation: which cores the awake services need, so the rest can idle deeply or go
//! offline. Pure; the agent applies the plan through the knobs.

use std::collections::BTreeSet;

/// Cores to keep for services and cores left free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorePlan {
    pub used: BTreeSet<usize>,
    pub free: BTreeSet<usize>,
}

/// Packs awake services onto the fewest cores: enough to run their combined demand (CPUs of
/// work, e.g. 0.3 for a service busy 30 % of one core) at `target_utilisation`, at least one
/// core while any service is awake, the lowest-numbered first (CPU 0 carries the OS's own
/// interrupts and timers anyway). With nothing awake, one core is kept for the agent and gate.
pub fn consolidate(
    online: &BTreeSet<usize>,
    demand_cpus: &[f64],
    target_utilisation: f64,
) -> CorePlan {
    let total: f64 = demand_cpus.iter().map(|d| d.max(0.0)).sum();
    let target = target_utilisation.clamp(0.05, 1.0);
    let needed = ((total / target).ceil() as usize).clamp(1, online.len().max(1));
    let used: BTreeSet<usize> = online.iter().copied().take(needed).collect();
    let free = online.difference(&used).copied().collect();
    CorePlan { used, free }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus(n: usize) -> BTreeSet<usize> {
        (0..n).collect()
    }

    #[test]
    fn light_services_share_one_core() {
        let p = consolidate(&cpus(8), &[0.1, 0.2, 0.05], 0.7);
        assert_eq!(p.used, [0].into());
        assert_eq!(p.free.len(), 7);
    }

    #[test]
    fn demand_beyond_one_core_takes_more() {
        let p = consolidate(&cpus(8), &[1.0, 0.9], 0.7);
        assert_eq!(p.used.len(), 3);
    }

    #[test]
    fn never_more_than_online_and_never_zero() {
        assert_eq!(consolidate(&cpus(2), &[10.0], 0.7).used.len(), 2);
        assert_eq!(consolidate(&cpus(2), &[], 0.7).used.len(), 1);
    }
}
