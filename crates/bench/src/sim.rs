//! `torpor sim`: one simulation, or with `--out` the whole study (every policy, the threshold
//! sweep, latency and break-even curves) with Tables 7.1/7.2 and the research-question plots,
//! and the fleet question (restore in place against restore anywhere) with its table and plot.

use std::path::PathBuf;

use torpor_sim::{calibrate, study, SimConfig};

use crate::{
    plot::{line_chart, Chart, Series},
    ExperimentError,
};

/// The example `torpor sim` runs without --config.
pub const DEFAULT_CONFIG: &str = include_str!("../../../examples/sim-cluster.toml");

#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SimArgs {
    #[command(subcommand)]
    pub command: Option<SimCmd>,
    /// Cluster configuration (default: examples/sim-cluster.toml, built in).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run the study (every policy, threshold sweep, curves) and write tables, plots and JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SimCmd {
    /// Fit the checkpoint/restore model to `torpor bench cr --json` output.
    Calibrate {
        report: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn mismatch(e: impl std::fmt::Display) -> ExperimentError {
    ExperimentError::Mismatch(e.to_string())
}

pub fn run(args: &SimArgs) -> Result<(), ExperimentError> {
    if let Some(SimCmd::Calibrate { report, json }) = &args.command {
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(report)?).map_err(mismatch)?;
        let fit = calibrate::fit(&doc).map_err(mismatch)?;
        if *json {
            println!(
                "{}",
                serde_json::to_string_pretty(&fit).expect("fit serializes")
            );
        } else {
            let m = fit.model;
            println!("[calibration]\ncheckpoint_fixed_s = {:.4}\ncheckpoint_per_gib_s = {:.4}\nrestore_fixed_s = {:.4}\nrestore_per_gib_s = {:.4}", m.checkpoint_fixed_s, m.checkpoint_per_gib_s, m.restore_fixed_s, m.restore_per_gib_s);
            println!(
                "# fit over {} footprints: checkpoint MAPE {:.1} %, restore MAPE {:.1} %",
                fit.points.len(),
                fit.checkpoint_mape_pct,
                fit.restore_mape_pct
            );
        }
        return Ok(());
    }
    let mut cfg = match &args.config {
        Some(p) => SimConfig::load(p),
        None => SimConfig::from_toml(DEFAULT_CONFIG),
    }
    .map_err(mismatch)?;
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    let Some(out) = &args.out else {
        let r = torpor_sim::simulate(&cfg);
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&r).expect("report serializes")
            );
        } else {
            let (t1, t2) = study::tables(std::slice::from_ref(&r));
            println!("{} nodes, {} services, {:.0} simulated hours: {} events in {:.1} s ({:.2e} events/s)\n", r.nodes, r.services, r.simulated_s / 3600.0, r.events, r.wall_s, r.events_per_s);
            println!("{t1}\n{t2}");
            for g in &r.node_groups {
                println!("node group {}: idle fraction {:.3}, mean idle period {:.3} s, asleep {:.1} %, {:.0} W", g.name, g.idle_fraction, g.mean_idle_period_s, 100.0 * g.asleep_fraction, g.mean_power_w);
            }
            for g in &r.service_groups {
                println!(
                    "service group {}: frozen {:.1} %, snapshotted {:.1} % of its time",
                    g.name,
                    100.0 * g.frozen_fraction,
                    100.0 * g.snapshotted_fraction
                );
            }
        }
        return Ok(());
    };
    std::fs::create_dir_all(out)?;
    let total = study::run_count();
    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("template"),
    );
    let s = study::run(&cfg, |name| {
        bar.set_message(name.to_string());
        bar.inc(1);
    });
    bar.finish_and_clear();
    plots(out, &s)?;
    let json = serde_json::to_string_pretty(&s).expect("study serializes");
    std::fs::write(out.join("study.json"), &json)?;
    std::fs::write(
        out.join("tables.md"),
        format!(
            "Table 7.1: power\n\n{}\nTable 7.2: latency\n\n{}\nFleet: restore in place (local snapshots) vs anywhere (pool)\n\n{}\nGovernor: where each service group's time went\n\n{}",
            s.table_7_1, s.table_7_2, s.fleet_table, s.levels_table
        ),
    )?;
    if args.json {
        println!("{json}");
    } else {
        println!(
            "Table 7.1 (power reduction per policy)\n\n{}\nTable 7.2 (latency impact)\n\n{}",
            s.table_7_1, s.table_7_2
        );
        println!(
            "RQ1 optimal idle threshold (least power with p99 within 2× always-on): {}",
            s.best_threshold_s
                .map_or_else(|| "none".into(), |t| format!("{t} s"))
        );
        for c in &s.cr_latency {
            if let Some(p) = c.points.iter().find(|p| (p.gib - 1.0).abs() < 1e-9) {
                println!(
                    "RQ2 {}: 1 GiB checkpoint {:.3} s, restore {:.3} s",
                    c.approach, p.checkpoint_s, p.restore_s
                );
            }
        }
        for c in &s.break_even {
            if let Some((_, t)) = c.points.iter().find(|p| (p.0 - 1.0).abs() < 1e-9) {
                println!(
                    "RQ3 {} ({}): break-even idle period for 1 GiB {t:.1} s",
                    c.approach, c.basis
                );
            }
        }
        println!(
            "RQ4 predictor's saving as a share of the oracle's: {}",
            s.predictor_vs_oracle
                .map_or_else(|| "-".into(), |x| format!("{:.0} %", 100.0 * x))
        );
        println!(
            "\nFleet: restore in place (local snapshots, the node wakes) vs anywhere (pool, consolidated)\n\n{}",
            s.fleet_table
        );
        println!(
            "Governor: where each service group's time went\n\n{}",
            s.levels_table
        );
        println!("plots and study.json in {}", out.display());
    }
    Ok(())
}

fn plots(out: &std::path::Path, s: &study::Study) -> Result<(), ExperimentError> {
    let sweep_power = Series {
        name: "mean power (W)".into(),
        points: s
            .sweep
            .iter()
            .map(|p| (p.idle_threshold_s, p.mean_power_w))
            .collect(),
    };
    line_chart(
        &out.join("rq1_threshold_power.svg"),
        &Chart {
            title: "RQ1: power against idle threshold",
            x_label: "idle threshold (s, log)",
            y_label: "watts",
            log_x: true,
        },
        &[sweep_power],
    )
    .map_err(mismatch)?;
    let sweep_p99 = Series {
        name: "p99 latency (ms)".into(),
        points: s
            .sweep
            .iter()
            .filter_map(|p| Some((p.idle_threshold_s, p.p99_ms?)))
            .collect(),
    };
    line_chart(
        &out.join("rq1_threshold_p99.svg"),
        &Chart {
            title: "RQ1: p99 latency against idle threshold",
            x_label: "idle threshold (s, log)",
            y_label: "ms",
            log_x: true,
        },
        &[sweep_p99],
    )
    .map_err(mismatch)?;
    let mut cr = Vec::new();
    for c in &s.cr_latency {
        cr.push(Series {
            name: format!("{} checkpoint", c.approach),
            points: c.points.iter().map(|p| (p.gib, p.checkpoint_s)).collect(),
        });
        cr.push(Series {
            name: format!("{} restore", c.approach),
            points: c.points.iter().map(|p| (p.gib, p.restore_s)).collect(),
        });
    }
    line_chart(
        &out.join("rq2_cr_latency.svg"),
        &Chart {
            title: "RQ2: checkpoint and restore latency against footprint",
            x_label: "footprint (GiB)",
            y_label: "seconds",
            log_x: false,
        },
        &cr,
    )
    .map_err(mismatch)?;
    let be: Vec<Series> = s
        .break_even
        .iter()
        .map(|c| Series {
            name: format!("{} ({})", c.approach, c.basis),
            points: c.points.clone(),
        })
        .collect();
    line_chart(
        &out.join("rq3_break_even.svg"),
        &Chart {
            title: "RQ3: break-even idle period against footprint",
            x_label: "footprint (GiB)",
            y_label: "seconds",
            log_x: false,
        },
        &be,
    )
    .map_err(mismatch)?;
    // The threshold policy's curve, with the other policies as flat lines across it.
    let (lo, hi) = (
        study::THRESHOLDS_S[0],
        study::THRESHOLDS_S[study::THRESHOLDS_S.len() - 1],
    );
    let mut policies = vec![Series {
        name: "fixed-threshold (sweep)".into(),
        points: s
            .sweep
            .iter()
            .map(|p| (p.idle_threshold_s, p.mean_power_w))
            .collect(),
    }];
    for r in s.runs.iter().filter(|r| r.policy != "fixed-threshold") {
        policies.push(Series {
            name: r.policy.into(),
            points: vec![(lo, r.mean_power_w), (hi, r.mean_power_w)],
        });
    }
    fleet_plot(out, s)?;
    line_chart(
        &out.join("rq4_policies.svg"),
        &Chart {
            title: "RQ4: power of each policy; the threshold policy swept",
            x_label: "idle threshold (s, log)",
            y_label: "watts",
            log_x: true,
        },
        &policies,
    )
    .map_err(mismatch)
}

/// The fleet question: power and p99 against the idle threshold, one line per restore mode.
fn fleet_plot(out: &std::path::Path, s: &study::Study) -> Result<(), ExperimentError> {
    let mut power = Vec::new();
    let mut p99 = Vec::new();
    for restore in torpor_sim::RestoreMode::ALL.map(torpor_sim::RestoreMode::as_str) {
        let points = s.fleet_sweep.iter().filter(|p| p.restore == restore);
        power.push(Series {
            name: format!("restore {restore}"),
            points: points
                .clone()
                .map(|p| (p.idle_threshold_s, p.mean_power_w))
                .collect(),
        });
        p99.push(Series {
            name: format!("restore {restore}"),
            points: points
                .filter_map(|p| Some((p.idle_threshold_s, p.p99_ms?)))
                .collect(),
        });
    }
    for (file, title, y_label, series) in [
        (
            "fleet_power.svg",
            "Fleet: power, restore in place vs anywhere",
            "watts",
            power,
        ),
        (
            "fleet_p99.svg",
            "Fleet: p99 latency, restore in place vs anywhere",
            "ms",
            p99,
        ),
    ] {
        line_chart(
            &out.join(file),
            &Chart {
                title,
                x_label: "idle threshold (s, log)",
                y_label,
                log_x: true,
            },
            &series,
        )
        .map_err(mismatch)?;
    }
    Ok(())
}
