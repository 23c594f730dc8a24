//! `torpor up`: pool, agent and gates on this machine from one config file, until SIGTERM or
//! SIGINT; SIGHUP reloads the file.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::criu;
use crate::{
    signals::{stop_signal_set, StopSignals},
    LogFormat,
};

/// Arguments of `torpor up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Configuration file.
    #[arg(short, long, default_value = "torpor.toml")]
    config: PathBuf,
}

/// Runs until stopped, saying on stderr (or as log events) what it serves.
pub fn run(args: &UpArgs, log_format: LogFormat) -> Result<()> {
    let path = args.config.as_path();
    // Its progress lines for people; with --log-format json they are log events like the rest,
    // so that stderr stays one JSON object per line.
    let say = |line: String| match log_format {
        LogFormat::Text => eprintln!("torpor up: {line}"),
        LogFormat::Json => tracing::info!("{line}"),
    };
    // The handlers come first, before the configuration is read or anything starts: from
    // here on SIGTERM or SIGINT, whenever it arrives, stops torpor up cleanly with status 0
    // (the default action would kill it with services, cgroups and the pool left behind).
    let rt = tokio::runtime::Runtime::new()?;
    // SIGHUP (reload) too: its default action would end torpor up.
    let (stop, hangups) = {
        let _in_runtime = rt.enter();
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        (StopSignals::install()?, hup)
    };
    // Handled from now on; one that came meanwhile is delivered now.
    let _ = stop_signal_set().thread_unblock();
    let config = torpor_up::Config::load(path)
        .with_context(|| format!("configuration {}", path.display()))?;
    let criu = criu()?;
    criu.version()?;
    let source = torpor_up::ReloadSource {
        path: path.to_path_buf(),
        hangups: Some(hangups),
    };
    rt.block_on(async {
        let up = match torpor_up::start_reloadable(config, Some(source), criu, stop.wait()).await {
            Err(torpor_up::UpError::StoppedBeforeReady) => return Ok(()),
            up => up?,
        };
        let info = up.info();
        say(format!(
            "{}; status page on http://{}/ (API: /status, /energy, /metrics)",
            info.pool, info.status_addr
        ));
        if let Some(p) = &info.control.socket {
            say(format!("control socket {}", p.display()));
        } else if let Some(a) = &info.control.tcp {
            say(format!("control endpoint {a} (TCP, token)"));
        }
        for (name, addr) in &info.services {
            say(format!("service {name} on {addr}"));
        }
        say("ready".into());
        up.stopped().await
    })?;
    say("stopped".into());
    Ok(())
}
