//! `torpor up` started inside the test (the test kit's in-process start, the way benchmarks
//! run it), so the test reads the agent directly: a sample service rests in the pool, a
//! request wakes it with its memory as it was, and the agent's transitions say it was restored.

use std::time::Duration;

use anyhow::Result;
use torpor_agent::ServiceState;
use torpor_testkit::{
    criu_guard, embedded, in_process, own_addr, sample_change, sample_sum, Service,
};

const NAMESPACE: &str = "inprocesstest";

#[test]
fn an_in_process_up_rests_a_service_and_a_request_wakes_it_as_it_was() -> Result<()> {
    // Its services are this process's children: it reaps what a restore re-parents to it.
    let _turn = criu_guard();
    let (gate, backend) = (own_addr(), own_addr());
    let cfg = embedded()
        .namespace(NAMESPACE)
        .services([Service::sample("inproc", gate, backend, "16MiB").idle("1s")]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let up = in_process(&cfg).await?;
        let before = tokio::task::spawn_blocking(move || sample_change(gate, 3)).await??;
        up.wait_status("inproc", "asleep", Duration::from_secs(60), |s| {
            s.state == ServiceState::Asleep
        })
        .await?;
        let after = tokio::task::spawn_blocking(move || sample_sum(gate)).await??;
        assert_eq!(after, before, "the woken service's memory is as it was");
        let transitions = up.agent().transitions();
        assert!(
            transitions
                .iter()
                .any(|t| t.to == ServiceState::Asleep && t.detail.contains("pool")),
            "{transitions:#?}"
        );
        assert!(
            transitions
                .iter()
                .any(|t| t.to == ServiceState::Awake && t.detail.starts_with("restored")),
            "{transitions:#?}"
        );
        up.stop().await?;
        Ok(())
    })
}
