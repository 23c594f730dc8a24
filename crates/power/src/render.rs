//! Text tables for people: the live interval view, a turbostat summary and a calibration report.
//! Machines get the same structures as JSON.

use std::fmt::Write;

use crate::{
    calibrate::CalibrationReport,
    telemetry::{CpuReport, IntervalReport},
    turbostat::Summary,
};

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

fn cpu_line(out: &mut String, r: &CpuReport) {
    let cpu = r.cpu.map_or_else(|| "-".to_string(), |c| c.to_string());
    let _ = write!(out, "{cpu:>4} {:>6.2}", r.busy_pct);
    for s in &r.states {
        let _ = write!(out, " {:>9.2} {:>9.0}", s.residency_pct, s.entries_per_s);
    }
    let _ = writeln!(out, " {:>10}", opt(r.mean_idle_us, 0));
}

/// The turbostat-like table of one interval.
pub fn interval(r: &IntervalReport) -> String {
    let mut out = String::new();
    let p = &r.power;
    let _ = write!(
        out,
        "{:.2} s  power {}: package {:.1} W",
        r.seconds, p.label, p.package_w
    );
    if let Some(d) = p.dram_w {
        let _ = write!(out, ", DRAM {d:.1} W");
    }
    if let Some(m) = &p.modelled {
        let _ = write!(
            out,
            ", node {:.1} W (cores {:.2} W, PC6 {:.1} %)",
            m.total_w,
            m.cores_w,
            p.pc6_pct.unwrap_or(0.0)
        );
    }
    for (name, w) in p
        .zones
        .iter()
        .filter(|(n, _)| !n.starts_with("package") && n != "dram")
    {
        let _ = write!(out, ", {name} {w:.1} W");
    }
    out.push('\n');
    let _ = write!(out, "{:>4} {:>6}", "CPU", "Busy%");
    for s in &r.total.states {
        let name: String = s.name.chars().take(8).collect();
        let _ = write!(out, " {:>9} {:>9}", format!("{name}%"), format!("{name}/s"));
    }
    let _ = writeln!(out, " {:>10}", "idle_us");
    cpu_line(&mut out, &r.total);
    for c in &r.cpus {
        cpu_line(&mut out, c);
    }
    out
}

/// The means of a turbostat log.
pub fn turbostat(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} intervals; means of the summary rows:", s.intervals);
    for (label, v) in [
        ("Busy%", s.busy_pct),
        ("CPU%c6", s.c6_pct),
        ("Pkg%pc6", s.pkg_pc6_pct),
        ("PkgWatt", s.pkg_watt),
        ("RAMWatt", s.ram_watt),
    ] {
        let _ = writeln!(out, "  {label:<8} {}", opt(v, 2));
    }
    out
}

/// A calibration's fit and errors.
pub fn calibration(r: &CalibrationReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "profile {}: package floor {:.2} W -> fitted {:.2} W per package (PC6 {:.2} W)",
        r.profile, r.base_c6_floor_watts, r.fitted_c6_floor_watts, r.fitted_pc6_watts
    );
    for (label, e) in [("as given", &r.base_error), ("fitted", &r.fitted_error)] {
        let _ = writeln!(
            out,
            "  {label:<9} {} rows: PkgWatt MAPE {:.2} %, MAE {:.2} W, worst {:.1} %",
            e.rows, e.mape_pct, e.mae_watts, e.worst_pct
        );
    }
    for (log, e) in &r.per_log {
        let _ = writeln!(
            out,
            "  {log}: {} rows, MAPE {:.2} %, MAE {:.2} W, worst {:.1} %",
            e.rows, e.mape_pct, e.mae_watts, e.worst_pct
        );
    }
    out
}
