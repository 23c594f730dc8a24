//! `torpor doctor`: what this host has and lacks; exit 1 when it cannot run torpor.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use torpor_criu::CriuBinary;
use torpor_doctor::{systemd, HostRoots, Status};

use super::print_json;

/// Arguments of `torpor doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    #[arg(long)]
    json: bool,
    /// The systemd unit file to check (with its drop-ins) [default: this process's own
    /// unit, else torpor.service in /etc/systemd/system, /usr/lib/systemd/system or
    /// /lib/systemd/system].
    #[arg(long)]
    unit: Option<PathBuf>,
}

/// Runs the checks and prints them.
pub fn run(args: &DoctorArgs) -> Result<ExitCode> {
    let criu = CriuBinary::locate().ok();
    let roots = HostRoots::default();
    let mut checks = torpor_doctor::run_checks(&roots, criu.as_ref());
    let dirs: Vec<PathBuf> = systemd::UNIT_DIRS.iter().map(PathBuf::from).collect();
    checks.extend(systemd::checks(
        &systemd::Context::read(&roots.proc),
        args.unit.as_deref(),
        &dirs,
    ));
    let fit = torpor_doctor::fit(&checks);
    if args.json {
        print_json(&serde_json::json!({ "fit": fit, "checks": checks }))?;
    } else {
        for c in &checks {
            let mark = match (c.status, c.required) {
                (Status::Ok, _) => "ok     ",
                (Status::Warn, _) => "warn   ",
                (Status::Missing, true) => "MISSING",
                (Status::Missing, false) => "absent ",
            };
            println!("{mark} {:<16} {}", c.name, c.detail);
        }
        println!(
            "{}",
            if fit {
                "this host can run torpor"
            } else {
                "this host cannot run torpor: fix the MISSING lines above"
            }
        );
    }
    Ok(if fit {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
