//! torpor's decisions, as pure code on virtual time (a `Duration` since an arbitrary epoch),
//! so the live agent and gate and the simulator run exactly the same logic:
//!
//! * [`ArrivalTracker`]: what the gate saw — last arrival, recent rate, inter-arrival histogram.
//! * [`decide_sleep`]: the seed's criteria — idle longer than the threshold, rate under the
//!   limit, the expected wake within the latency objective — and which tier the snapshot
//!   belongs in by footprint.
//! * [`prewarm_at`]: when to restore ahead of the predicted next arrival, if that beats making
//!   the next request wait.
//! * [`choose_level`]: the governor — awake, frozen or snapshotted, whichever deepest level
//!   pays for its cycle over the predicted idle period and wakes within the objective.

mod arrivals;
mod decide;
mod governor;

pub use arrivals::{ArrivalTracker, InterArrivalHistogram};
pub use decide::{
    decide_sleep, prewarm_at, prewarm_hold_until, AwakeReason, Governor, PolicyConfig,
    SleepDecision, SnapshotTier,
};
pub use governor::{
    choose_level, level_costs, predicted_idle, Choice, CycleCost, EnergyModel, IdleCost, Level,
    LevelCost, LevelInputs, Reason,
};
