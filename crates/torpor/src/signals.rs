//! The signals that stop a server (SIGTERM, SIGINT) and `torpor up`'s reload (SIGHUP).

use anyhow::{Context, Result};

/// SIGTERM and SIGINT handlers, installed when this is made (not when first awaited), so a
/// signal that arrives in between is kept rather than lost or fatal.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs both handlers; call inside a Tokio runtime.
    pub fn install() -> Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Resolves at the first SIGTERM or SIGINT since [`StopSignals::install`].
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// The signals that stop a server.
pub fn stop_signal_set() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    // `torpor up`'s reload: blocked with the others until its handler is there.
    set.add(nix::sys::signal::Signal::SIGHUP);
    set
}

/// Resolves at SIGTERM or SIGINT; the handlers are installed when it is first polled.
pub async fn shutdown_signal() {
    StopSignals::install()
        .expect("signal handlers")
        .wait()
        .await
}
