//! `torpor usuite`: one tier of a µSuite service, or its client driving a load.

use std::sync::Arc;

use anyhow::Result;
use torpor_usuite::cli::TierCmd;
pub use torpor_usuite::cli::UsuiteArgs;

use super::loadgen::run_load;
use crate::signals::shutdown_signal;

/// Serves the tier until SIGTERM or SIGINT, or runs the client's load.
pub fn run(args: UsuiteArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    if let TierCmd::Client { mid, data, run } = &args.tier {
        // Its gRPC channel is made (lazily) inside the runtime.
        let _inside = rt.enter();
        let target = Arc::new(torpor_usuite::client::UsuiteTarget::new(
            args.service,
            *mid,
            data,
        ));
        return run_load(&rt, target, run);
    }
    rt.block_on(torpor_usuite::cli::run_server(
        args.service,
        args.tier,
        shutdown_signal(),
    ))?;
    Ok(())
}
