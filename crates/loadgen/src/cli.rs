//! `torpor loadgen`: the arguments and how they become a run.

use std::{path::PathBuf, sync::Arc, time::Duration};

use thiserror::Error;

use torpor_image::duration_arg;
use torpor_traffic::{Arrivals, SpecError, Trace, TraceError};

use crate::{
    engine::{Phase, RunConfig},
    target::{HttpGet, Target, TcpLine},
};

/// Arguments of `torpor loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// http://HOST:PORT/PATH (GET), or tcp://HOST:PORT (one line out, one back).
    #[arg(long)]
    pub target: String,
    /// The line sent to a tcp:// target.
    #[arg(long, default_value = "PING")]
    pub line: String,
    #[command(flatten)]
    pub run: RunArgs,
}

/// How the load arrives and is reported, whatever the target.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// A phase: PROCESS@DURATION, e.g. poisson:rate=100@30s,
    /// onoff:rate=200,on=exp:1s,off=exp:5s@60s, diurnal:rate=50,amplitude=0.8,period=60s@2m.
    /// Repeat for phases one after the other.
    #[arg(long = "phase", value_parser = phase_arg)]
    pub phases: Vec<Phase>,
    /// Replay per-minute counts from a trace in the Azure Functions 2019 schema instead.
    #[arg(long, conflicts_with = "phases")]
    pub trace: Option<PathBuf>,
    /// The trace's function (hash or unique prefix); default: all functions summed.
    #[arg(long, requires = "trace")]
    pub function: Option<String>,
    /// Trace minutes played per minute of wall time.
    #[arg(long, default_value_t = 60.0, requires = "trace")]
    pub speedup: f64,
    /// How long to replay the trace.
    #[arg(long, default_value = "60s", value_parser = duration_arg, requires = "trace")]
    pub duration: Duration,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A request unanswered this long is an error.
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    pub timeout: Duration,
    /// Requests in flight beyond this are counted as errors, not sent.
    #[arg(long, default_value_t = 10_000)]
    pub max_in_flight: usize,
    #[arg(long)]
    pub json: bool,
    /// No progress bar (it is also off with --json).
    #[arg(long)]
    pub no_progress: bool,
}

/// Why a load run could not be set up.
#[derive(Debug, Error)]
pub enum LoadgenError {
    #[error("target: {0}")]
    Target(String),
    #[error("trace")]
    Trace(#[from] TraceError),
    #[error("give at least one --phase or a --trace")]
    NoLoad,
}

fn phase_arg(s: &str) -> Result<Phase, String> {
    let (spec, dur) = s
        .rsplit_once('@')
        .ok_or_else(|| format!("{s:?}: expected PROCESS@DURATION, e.g. poisson:rate=100@30s"))?;
    let arrivals = Arrivals::parse(spec).map_err(|e: SpecError| e.to_string())?;
    let duration = duration_arg(dur)?;
    let name = spec.split(':').next().unwrap_or(spec).to_string();
    Ok(Phase {
        name,
        arrivals,
        duration,
    })
}

/// The target an argument names.
pub fn target(url: &str, line: &str) -> Result<Arc<dyn Target>, LoadgenError> {
    if let Some(addr) = url.strip_prefix("tcp://") {
        let addr = addr
            .parse()
            .map_err(|_| LoadgenError::Target(format!("{url:?}: expected tcp://IP:PORT")))?;
        return Ok(Arc::new(TcpLine {
            addr,
            line: line.to_string(),
        }));
    }
    Ok(Arc::new(HttpGet::new(url).map_err(LoadgenError::Target)?))
}

impl RunArgs {
    /// The run these arguments describe.
    pub fn config(&self) -> Result<RunConfig, LoadgenError> {
        let phases = match &self.trace {
            Some(path) => {
                let trace = Trace::read(path)?;
                vec![Phase {
                    name: "replay".into(),
                    arrivals: Arrivals::Replay {
                        per_minute: trace.counts(self.function.as_deref())?,
                        speedup: self.speedup,
                    },
                    duration: self.duration,
                }]
            }
            None if self.phases.is_empty() => return Err(LoadgenError::NoLoad),
            None => self.phases.clone(),
        };
        Ok(RunConfig {
            phases,
            seed: self.seed,
            timeout: self.timeout,
            max_in_flight: self.max_in_flight,
            progress: !self.json && !self.no_progress,
        })
    }
}
