//! `torpor up` started inside the experiment's own runtime, so the experiment can read the
//! agent's state directly (which tier is asleep when a request is sent).

use std::time::Duration;

use tokio::time::Instant;
use torpor_agent::ServiceStatus;
use torpor_criu::CriuBinary;
use torpor_up::{Config, UpHandle};

use crate::ExperimentError;

/// A running in-process `torpor up` ([`torpor_up::start`]'s handle, which it derefs to) with a
/// control socket of its own.
#[derive(Debug)]
pub struct InProcessUp {
    up: UpHandle,
    /// Holds the control socket: a benchmark's `torpor up` is its own, never steered from
    /// outside, and must not take (or be refused) the default socket a user's one holds.
    _control_dir: tempfile::TempDir,
}

impl std::ops::Deref for InProcessUp {
    type Target = UpHandle;

    fn deref(&self) -> &UpHandle {
        &self.up
    }
}

impl InProcessUp {
    /// Starts it and waits until every service is up behind its gate.
    pub async fn start(
        mut config: Config,
        criu: CriuBinary,
    ) -> Result<InProcessUp, ExperimentError> {
        let control_dir = tempfile::Builder::new()
            .prefix("torpor-bench-control-")
            .tempdir()?;
        config.control =
            torpor_up::control::ControlEndpoint::Unix(control_dir.path().join("control.sock"));
        Ok(InProcessUp {
            up: torpor_up::start(config, criu).await?,
            _control_dir: control_dir,
        })
    }

    /// The agent's status of service `name`.
    pub fn status(&self, name: &str) -> Result<ServiceStatus, ExperimentError> {
        self.up
            .status()
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ExperimentError::Mismatch(format!("no service {name:?}")))
    }

    /// The status of service `name` as soon as `done` holds for it; fails after `timeout`,
    /// naming `what` it waited for and the state it saw last. The agent has no change
    /// notification, so this polls every few milliseconds.
    pub async fn wait_status(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&ServiceStatus) -> bool,
    ) -> Result<ServiceStatus, ExperimentError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(name)?;
            if done(&status) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(ExperimentError::Mismatch(format!(
                    "service {name:?} not {what} after {timeout:?} (state {}, {} failed checkpoints, {} cold starts)",
                    status.state.as_str(),
                    status.failed_checkpoints,
                    status.cold_starts
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stops it (services killed, knobs restored) and waits until it has.
    pub async fn stop(self) -> Result<(), ExperimentError> {
        Ok(self.up.shutdown().await?)
    }
}
