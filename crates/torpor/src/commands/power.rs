//! `torpor power`: the live turbostat-like view, turbostat logs, and profile calibration.

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use torpor_power::{calibrate, render, HostRoots, IntervalReport, Profile, Sample, TurbostatLog};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PowerArgs {
    #[command(subcommand)]
    command: Option<PowerCmd>,
    #[command(flatten)]
    live: LiveArgs,
}

#[derive(Debug, clap::Args)]
struct LiveArgs {
    /// Length of one interval.
    #[arg(long, default_value = "1s", value_parser = duration_arg)]
    interval: Duration,
    /// Stop after this many intervals (default: until interrupted).
    #[arg(long)]
    count: Option<u64>,
    /// One interval, then exit.
    #[arg(long)]
    once: bool,
    /// Platform profile for modelled power where RAPL is missing: a built-in name or a TOML file.
    #[arg(long, default_value = "generic")]
    profile: String,
    /// One JSON object per interval (JSON Lines).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum PowerCmd {
    /// Means of a turbostat log (summary rows, per-CPU rows); with --profile, the model's error
    /// against its PkgWatt.
    Turbostat {
        file: PathBuf,
        #[arg(long)]
        profile: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Fit a profile's package floor to turbostat logs with PkgWatt and report the error.
    Calibrate {
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// Profile whose figures are kept and whose floor is fitted.
        #[arg(long, default_value = "icx-2s")]
        base: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a platform profile (a built-in name or a file) as TOML, to start your own from.
    Profile {
        #[arg(default_value = "generic")]
        name: String,
    },
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    let d = torpor_image::duration_arg(s)?;
    if d < Duration::from_millis(10) {
        return Err("an interval under 10ms measures nothing but the sampling".into());
    }
    Ok(d)
}

pub fn run(args: PowerArgs) -> Result<()> {
    match args.command {
        None => live(args.live),
        Some(PowerCmd::Turbostat {
            file,
            profile,
            json,
        }) => {
            let log = TurbostatLog::read(&file)
                .with_context(|| format!("turbostat log {}", file.display()))?;
            let summary = log.summary();
            let fit = match profile {
                Some(p) => {
                    let profile = Profile::resolve(&p)?;
                    let name = file.display().to_string();
                    Some(calibrate::evaluate(&profile, &[(name, log.clone())]).0)
                }
                None => None,
            };
            if json {
                let v = serde_json::json!({
                    "file": file,
                    "summary": summary,
                    "cpus": log.cpu_means(),
                    "model_error": fit,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render::turbostat(&summary));
                if let Some(e) = fit {
                    println!(
                        "  model vs PkgWatt over {} rows: MAPE {:.2} %, MAE {:.2} W",
                        e.rows, e.mape_pct, e.mae_watts
                    );
                }
            }
            Ok(())
        }
        Some(PowerCmd::Calibrate { logs, base, json }) => {
            let base = Profile::resolve(&base)?;
            let mut parsed = Vec::new();
            for path in &logs {
                let log = TurbostatLog::read(path)
                    .with_context(|| format!("turbostat log {}", path.display()))?;
                let name = path.file_name().map_or_else(
                    || path.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
                parsed.push((name, log));
            }
            let Some(report) = calibrate::calibrate(&base, &parsed) else {
                bail!("no summary row in these logs has Busy%, CPU%c6 and PkgWatt to fit against");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render::calibration(&report));
            }
            Ok(())
        }
        Some(PowerCmd::Profile { name }) => {
            let p = Profile::resolve(&name)?;
            print!("{}", toml::to_string_pretty(&p)?);
            Ok(())
        }
    }
}

fn live(args: LiveArgs) -> Result<()> {
    let profile = Profile::resolve(&args.profile)?;
    let roots = HostRoots::default();
    let count = if args.once { Some(1) } else { args.count };
    let mut before = Sample::take(&roots).context("reading this machine's counters")?;
    let mut done = 0;
    while !matches!(count, Some(c) if done >= c) {
        std::thread::sleep(args.interval);
        let after = Sample::take(&roots).context("reading this machine's counters")?;
        let report = IntervalReport::between(&before, &after, &profile);
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("{}", render::interval(&report));
        }
        before = after;
        done += 1;
    }
    Ok(())
}
