//! `torpor status`: the services of a running `torpor up`, from its status API.

use std::net::SocketAddr;

use anyhow::Result;
use torpor_image::{format_bytes, unix_ms_to_utc};
use torpor_up::status::StatusDoc;

/// Arguments of `torpor status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Address of its status API.
    #[arg(long, default_value = torpor_up::config::DEFAULT_STATUS)]
    addr: SocketAddr,
    #[arg(long)]
    json: bool,
}

/// Fetches the status and prints it as a table with notes (or the JSON as served).
pub fn run(args: &StatusArgs) -> Result<()> {
    let (addr, json) = (args.addr, args.json);
    let rt = tokio::runtime::Runtime::new()?;
    let body = rt.block_on(torpor_up::status::fetch(addr, "/status"))?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let doc: StatusDoc = serde_json::from_str(&body)?;
    let services = &doc.services;
    println!(
        "{:<16} {:<13} {:>7} {:>10} {:>10} {:>5} {:>6} {:>5} {:>8} {:>5} {:>9} {:>9} {:>9} {:>9}",
        "service",
        "state",
        "pid",
        "footprint",
        "snapshot",
        "tier",
        "sleeps",
        "wakes",
        "prewarms",
        "cold",
        "last ckpt",
        "last wake",
        "asleep",
        "awake"
    );
    for s in services {
        let secs = |v: Option<f64>| {
            v.map(|x| format!("{:.3}s", x))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:<16} {:<13} {:>7} {:>10} {:>10} {:>5} {:>6} {:>5} {:>8} {:>5} {:>9} {:>9} {:>8.1}s {:>8.1}s{}",
            s.name,
            s.state.as_str(),
            s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            format_bytes(s.footprint_bytes),
            s.snapshot_bytes.map(format_bytes).unwrap_or_else(|| "-".into()),
            s.snapshot_tier.map(|t| t.as_str()).unwrap_or("-"),
            s.sleeps,
            s.wakes,
            s.prewarms,
            s.cold_starts,
            secs(s.last_checkpoint_s),
            secs(s.last_wake_s),
            s.time_asleep_s,
            s.time_awake_s,
            if s.held_now > 0 { format!("  ({} held)", s.held_now) } else { String::new() }
        );
    }
    for s in services {
        if let Some(why) = &s.cannot_sleep {
            println!("{}: never sleeps here: {why}", s.name);
        }
        if s.steering == "kernel" {
            println!(
                "{}: kernel steering, {} now; {} connections steered, {} open",
                s.name,
                if s.steered_now {
                    "steered"
                } else {
                    "through the gate"
                },
                s.steered_connections,
                s.steered_open
            );
        }
        if let Some(why) = &s.steering_problem {
            println!("{}: {why}", s.name);
        }
        let c = &s.costs;
        if let (Some(cpus), Some(w)) = (c.idle_cpus, c.idle_wakeups_per_s) {
            println!(
                "{}: idle cost {:.4} CPUs, {w:.0} wakeups/s, {} resident, torpor's looks {}; snapshot cycle {}; frozen {} times ({:.1}s)",
                s.name,
                cpus,
                format_bytes(s.footprint_bytes),
                c.watch_cpus
                    .map_or_else(|| "not measured".into(), |v| format!("{v:.4} CPUs")),
                c.snapshot_cycle_cpu_s
                    .map_or_else(|| "not measured".into(), |v| format!("{v:.3} CPU-s")),
                s.freezes,
                s.time_frozen_s,
            );
        }
        for l in &s.levels {
            println!(
                "{}: level {}: entry {:.3} J, saves {:.3} W, exit {:.1} ms, pays after {}",
                s.name,
                l.level.as_str(),
                l.entry_j,
                l.saving_w,
                l.exit_latency_s * 1e3,
                l.target_residency_s
                    .map_or_else(|| "never".into(), |t| format!("{t:.1} s")),
            );
        }
        if let Some(g) = s.adopted_generation {
            println!(
                "{}: adopted asleep at start in generation {g}, left in the pool by an earlier run",
                s.name
            );
        }
        if let Some(p) = &s.pinned {
            println!(
                "{}: pinned awake by {} at {}, {}",
                s.name,
                p.by,
                unix_ms_to_utc(p.at_unix_ms),
                match p.left_s {
                    Some(left) => format!("{left:.0} s left"),
                    None => "until unpinned".into(),
                }
            );
        }
        if let Some(m) = &s.last_manual {
            println!(
                "{}: last manual command: {} by {} at {}: {} ({})",
                s.name,
                m.action,
                m.by,
                unix_ms_to_utc(m.at_unix_ms),
                m.outcome.replace('_', "-"),
                m.detail
            );
        }
        if let Some(w) = &s.last_wake {
            let opt = |v: Option<f64>| v.map_or_else(|| "-".into(), |x| format!("{x:.1}"));
            println!(
                "{}: last wake ({}, {}) ms: restore start {:.1}, CRIU done {}, accepting {:.1}, released {:.1}, first byte {}",
                s.name,
                w.cause,
                w.how,
                w.restore_start_ms,
                opt(w.criu_done_ms),
                w.accepting_ms,
                w.released_ms,
                opt(w.first_byte_ms)
            );
        }
        if s.state == torpor_agent::ServiceState::Asleep && s.staged_bytes > 0 {
            println!(
                "{}: next wake {}: {} kept on this node",
                s.name,
                if s.armed {
                    "armed (restored and held before it resumes)"
                } else {
                    "staged"
                },
                format_bytes(s.staged_bytes)
            );
        }
        if let Some(l) = &s.lazy {
            println!(
                "{}: memory of generation {} (lazy): {} prefetched, {} faulted in ({} faults), {} filled in the background, {} still in the pool",
                s.name,
                l.generation,
                format_bytes(l.prefetched_bytes),
                format_bytes(l.faulted_bytes),
                l.faults,
                format_bytes(l.background_bytes),
                format_bytes(l.remaining_bytes),
            );
        }
    }
    if let Some(e) = &doc.energy {
        println!("energy: {}", e.summary_line());
        println!("  {}", e.torpor_line());
        let per: Vec<String> = e
            .services
            .iter()
            .map(|(n, s)| format!("{n} {:.1} J ({:.2} CPU-s)", s.energy_j, s.cpu_s))
            .collect();
        println!(
            "  services: {}; torpor {:.1} J; idle {:.1} J; all asleep {:.0} s",
            per.join(", "),
            e.torpor_j,
            e.idle_j,
            e.all_asleep_s
        );
        if e.node_asleep_s > 0.0 {
            println!(
                "  node asleep {:.0} s at the profile's suspend power (modelled){}",
                e.node_asleep_s,
                if e.node_asleep_dry_run_s > 0.0 {
                    format!(
                        ", {:.0} s of it a dry run (the hook was not run)",
                        e.node_asleep_dry_run_s
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    for k in &doc.knobs {
        println!("knob: {k}");
    }
    if let Some(p) = &doc.control.socket {
        println!(
            "control: {} (torpor sleep|wake|pin|unpin NAME)",
            p.display()
        );
    } else if let Some(a) = &doc.control.tcp {
        println!("control: {a} over TCP with its token (torpor sleep --control {a} --token-file FILE NAME)");
    }
    if let Some(r) = &doc.last_reload {
        println!(
            "last reload: {} by {} at {}{}",
            r.outcome.as_str(),
            r.by,
            unix_ms_to_utc(r.at_unix_ms),
            r.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
