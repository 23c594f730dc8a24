//! `torpor up` started inside the experiment's own runtime, so the experiment can read the
//! agent's state directly (which tier is asleep when a request is sent).

use std::{sync::Arc, time::Duration};

use tokio::{sync::oneshot, task::JoinHandle, time::Instant};
use torpor_agent::{Agent, ServiceStatus};
use torpor_criu::CriuBinary;
use torpor_up::{Config, UpInfo};

use crate::ExperimentError;

/// A running in-process `torpor up`.
#[derive(Debug)]
pub struct InProcessUp {
    pub info: UpInfo,
    pub agent: Arc<Agent>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), torpor_up::UpError>>,
    /// Holds the control socket: a benchmark's `torpor up` is its own, never steered from
    /// outside, and must not take (or be refused) the default socket a user's one holds.
    _control_dir: tempfile::TempDir,
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
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(torpor_up::run(
            config,
            criu,
            async {
                let _ = stop_rx.await;
            },
            move |info, agent| {
                let _ = ready_tx.send((info.clone(), agent.clone()));
            },
        ));
        match ready_rx.await {
            Ok((info, agent)) => Ok(InProcessUp {
                info,
                agent,
                stop,
                task,
                _control_dir: control_dir,
            }),
            Err(_) => Err(match task.await.expect("up task panicked") {
                Err(e) => e.into(),
                Ok(()) => ExperimentError::Mismatch("torpor up stopped before it was ready".into()),
            }),
        }
    }

    /// The agent's status of service `name`.
    pub fn status(&self, name: &str) -> Result<ServiceStatus, ExperimentError> {
        self.agent
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
        let _ = self.stop.send(());
        self.task.await.expect("up task panicked")?;
        Ok(())
    }
}
