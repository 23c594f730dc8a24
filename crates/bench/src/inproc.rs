//! `torpor up` started inside the experiment's own runtime, so the experiment can read the
//! agent's state directly (which tier is asleep when a request is sent).

use std::sync::Arc;

use tokio::{sync::oneshot, task::JoinHandle};
use torpor_agent::Agent;
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
}

impl InProcessUp {
    /// Starts it and waits until every service is up behind its gate.
    pub async fn start(config: Config, criu: CriuBinary) -> Result<InProcessUp, ExperimentError> {
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
            }),
            Err(_) => Err(match task.await.expect("up task panicked") {
                Err(e) => e.into(),
                Ok(()) => ExperimentError::Mismatch("torpor up stopped before it was ready".into()),
            }),
        }
    }

    /// Stops it (services killed, knobs restored) and waits until it has.
    pub async fn stop(self) -> Result<(), ExperimentError> {
        let _ = self.stop.send(());
        self.task.await.expect("up task panicked")?;
        Ok(())
    }
}
