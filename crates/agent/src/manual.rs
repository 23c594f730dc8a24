//! Manual control of a service by an operator: sleep it, wake it, pin it awake (for a while
//! or until unpinned). The commands go through the service's own loop, so they never race
//! the policy's sleeps and wakes; each one is logged and kept, with who asked and when, for
//! `torpor status`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::oneshot;

/// What an operator asks of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum ManualCommand {
    /// Drain, checkpoint and stop it now, whatever the policy says.
    Sleep,
    /// Restore it now, without waiting for a request.
    Wake,
    /// Keep it awake (waking it if asleep): the policy never puts it to sleep while pinned.
    Pin {
        /// How long the pin lasts, in milliseconds; `None` until `Unpin`.
        for_ms: Option<u64>,
    },
    /// Let the policy decide again.
    Unpin,
}

impl ManualCommand {
    /// The command's name as logs and `torpor status` show it.
    pub fn name(&self) -> &'static str {
        match self {
            ManualCommand::Sleep => "sleep",
            ManualCommand::Wake => "wake",
            ManualCommand::Pin { .. } => "pin",
            ManualCommand::Unpin => "unpin",
        }
    }
}

/// What a command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManualOutcome {
    /// It changed the service.
    Done,
    /// The service already was where it was asked to be (awake for a wake, say).
    NoOp,
}

/// Why a command was not carried out.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ManualError {
    #[error("no service {0:?} here")]
    UnknownService(String),
    #[error("{service} is pinned awake{}; unpin it first", left_text(.left_s))]
    Pinned {
        service: String,
        /// Seconds the pin has left (`None`: until unpinned).
        left_s: Option<u64>,
    },
    #[error("{service} can never sleep on this host: {reason}")]
    CannotSleep { service: String, reason: String },
    #[error("{service} is down (its last start failed) and is retried by the agent")]
    Down { service: String },
    #[error("{service} stays awake: its checkpoint failed: {reason}")]
    CheckpointFailed { service: String, reason: String },
    #[error("{service} could not be woken: {reason}")]
    WakeFailed { service: String, reason: String },
    #[error("{service} is {state}; try again")]
    Busy { service: String, state: String },
    #[error("torpor up is stopping")]
    Stopping,
}

impl ManualError {
    /// `failed` when the service was tried and it did not work, `refused` otherwise.
    pub fn outcome(&self) -> &'static str {
        match self {
            ManualError::CheckpointFailed { .. } | ManualError::WakeFailed { .. } => "failed",
            _ => "refused",
        }
    }
}

fn left_text(left: &Option<u64>) -> String {
    match left {
        Some(s) => format!(" ({s} s left)"),
        None => " until unpinned".into(),
    }
}

/// A command's result: what it did and a sentence for the operator.
pub type ManualResult = Result<(ManualOutcome, String), ManualError>;

/// One manual action as kept for `torpor status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManualAction {
    /// Seconds since the agent started.
    pub at_s: f64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub service: String,
    /// `sleep`, `wake`, `pin` or `unpin`.
    pub action: String,
    /// A pin's duration, when it has one.
    #[serde(default)]
    pub for_s: Option<f64>,
    /// Who asked: `uid N` (the peer of the control socket) or `token` (TCP control).
    pub by: String,
    /// `done`, `no_op` or `refused`.
    pub outcome: String,
    pub detail: String,
}

/// A pin in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PinStatus {
    /// Who pinned the service.
    pub by: String,
    pub at_unix_ms: u64,
    /// When the pin ends (`None`: until unpinned).
    pub until_unix_ms: Option<u64>,
    /// Seconds left (`None`: until unpinned).
    pub left_s: Option<f64>,
}

/// A command on its way to a service's loop, with where its answer goes.
#[derive(Debug)]
pub(crate) struct Request {
    pub command: ManualCommand,
    pub by: String,
    pub reply: oneshot::Sender<ManualResult>,
}

/// Milliseconds since the Unix epoch now (how manual commands and reloads are dated).
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wall-clock time `left` from now, in Unix milliseconds.
pub(crate) fn unix_ms_in(left: Duration) -> u64 {
    unix_ms_now().saturating_add(left.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_a_stable_wire_shape() {
        let pin = ManualCommand::Pin {
            for_ms: Some(3_600_000),
        };
        let text = serde_json::to_string(&pin).unwrap();
        assert_eq!(text, r#"{"action":"pin","for_ms":3600000}"#);
        assert_eq!(serde_json::from_str::<ManualCommand>(&text).unwrap(), pin);
        assert_eq!(
            serde_json::from_str::<ManualCommand>(r#"{"action":"sleep"}"#).unwrap(),
            ManualCommand::Sleep
        );
        assert!(serde_json::from_str::<ManualCommand>(r#"{"action":"nap"}"#).is_err());
    }

    #[test]
    fn a_refused_sleep_of_a_pinned_service_says_for_how_long() {
        let e = ManualError::Pinned {
            service: "web".into(),
            left_s: Some(5),
        };
        assert_eq!(
            e.to_string(),
            "web is pinned awake (5 s left); unpin it first"
        );
        let e = ManualError::Pinned {
            service: "web".into(),
            left_s: None,
        };
        assert_eq!(
            e.to_string(),
            "web is pinned awake until unpinned; unpin it first"
        );
    }
}
