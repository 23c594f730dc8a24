//! Calibration of a profile against turbostat logs with measured `PkgWatt`: each summary row's
//! residencies are fed to the model, the package floor is fitted by least squares (the one figure
//! these logs determine; see the profile files for why the others are not), and the error of the
//! model is reported per row and per log.

use serde::Serialize;

use crate::{
    model::{CoreResidency, Model},
    profile::Profile,
    turbostat::{Row, TurbostatLog},
};

/// Core residency of a summary row (means over all CPUs): `Busy%` busy, `CPU%c6` in the deepest
/// state, and `CPU%c1` (the rest of the idle time) split over the shallower states in proportion
/// to their requested residencies (`C1%`, `C1E%`, … by the profile's state names).
pub fn residency_of_row(profile: &Profile, row: &Row) -> Option<CoreResidency> {
    let busy = row.get("Busy%")? / 100.0;
    let deep = row.get("CPU%c6").unwrap_or(0.0) / 100.0;
    let shallow = row
        .get("CPU%c1")
        .map(|v| v / 100.0)
        .unwrap_or((1.0 - busy - deep).max(0.0));
    let n = profile.idle_states.len();
    let mut idle = vec![0.0; n];
    idle[n - 1] += deep;
    let requested: Vec<f64> = profile.idle_states[..n - 1]
        .iter()
        .map(|s| row.get(&format!("{}%", s.name)).unwrap_or(0.0))
        .collect();
    let total: f64 = requested.iter().sum();
    if total > 0.0 {
        for (slot, r) in idle.iter_mut().zip(&requested) {
            *slot += shallow * r / total;
        }
    } else {
        idle[0] += shallow;
    }
    // turbostat's summary rows count no idle periods: their trips are in the fitted floor.
    Some(CoreResidency {
        busy,
        idle,
        trips_per_s: vec![0.0; n],
    })
}

/// One summary row: measured and modelled package power.
#[derive(Debug, Clone, Serialize)]
pub struct RowFit {
    pub log: String,
    pub interval: usize,
    pub measured_w: f64,
    pub modelled_w: f64,
}

/// Error over a set of rows.
#[derive(Debug, Clone, Serialize)]
pub struct FitError {
    pub rows: usize,
    pub mae_watts: f64,
    pub mape_pct: f64,
    pub worst_pct: f64,
}

/// What `torpor power calibrate` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    pub profile: String,
    /// The profile's floor before fitting.
    pub base_c6_floor_watts: f64,
    /// Least-squares package floor (W per package); `pc6_watts` keeps its ratio to the floor.
    pub fitted_c6_floor_watts: f64,
    pub fitted_pc6_watts: f64,
    /// Error of the profile as given.
    pub base_error: FitError,
    /// Error with the fitted floor.
    pub fitted_error: FitError,
    pub per_log: Vec<(String, FitError)>,
    pub rows: Vec<RowFit>,
}

/// Rows usable for the fit: summary rows with residencies and `PkgWatt`.
struct Sample {
    log: String,
    interval: usize,
    cores: Vec<CoreResidency>,
    pc6: f64,
    measured_w: f64,
}

fn samples(profile: &Profile, logs: &[(String, TurbostatLog)]) -> Vec<Sample> {
    let mut out = Vec::new();
    for (name, log) in logs {
        for (i, interval) in log.intervals.iter().enumerate() {
            let Some(row) = &interval.summary else {
                continue;
            };
            let (Some(r), Some(measured_w)) = (residency_of_row(profile, row), row.get("PkgWatt"))
            else {
                continue;
            };
            out.push(Sample {
                log: name.clone(),
                interval: i,
                cores: vec![r; profile.cores() as usize],
                pc6: row.get("Pkg%pc6").unwrap_or(0.0) / 100.0,
                measured_w,
            });
        }
    }
    out
}

fn error_of(fits: &[&RowFit]) -> FitError {
    let n = fits.len().max(1) as f64;
    let pct = |f: &RowFit| (f.modelled_w - f.measured_w).abs() / f.measured_w * 100.0;
    FitError {
        rows: fits.len(),
        mae_watts: fits
            .iter()
            .map(|f| (f.modelled_w - f.measured_w).abs())
            .sum::<f64>()
            / n,
        mape_pct: fits.iter().map(|f| pct(f)).sum::<f64>() / n,
        worst_pct: fits.iter().map(|f| pct(f)).fold(0.0, f64::max),
    }
}

fn predict(profile: &Profile, samples: &[Sample]) -> Vec<RowFit> {
    let model = Model::new(profile);
    samples
        .iter()
        .map(|s| RowFit {
            log: s.log.clone(),
            interval: s.interval,
            measured_w: s.measured_w,
            modelled_w: model.package_watts(&s.cores, s.pc6).1,
        })
        .collect()
}

/// The model's error for `profile` on the logs' summary rows.
pub fn evaluate(profile: &Profile, logs: &[(String, TurbostatLog)]) -> (FitError, Vec<RowFit>) {
    let rows = predict(profile, &samples(profile, logs));
    (error_of(&rows.iter().collect::<Vec<_>>()), rows)
}

/// Fits the package floor of `base` to the logs (PC6 power kept at the same fraction of the
/// floor) and reports the error before and after. `None` when no row has residencies and
/// `PkgWatt`.
pub fn calibrate(base: &Profile, logs: &[(String, TurbostatLog)]) -> Option<CalibrationReport> {
    let samples = samples(base, logs);
    if samples.is_empty() {
        return None;
    }
    let ratio = if base.package.c6_floor_watts > 0.0 {
        base.package.pc6_watts / base.package.c6_floor_watts
    } else {
        0.0
    };
    // measured - core power = packages × floor × (1 - pc6 + ratio × pc6): one unknown.
    let model = Model::new(base);
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for s in &samples {
        let x = base.packages as f64 * (1.0 - s.pc6 + ratio * s.pc6);
        let core_w: f64 = s.cores.iter().map(|c| model.core_watts(c)).sum();
        sxy += x * (s.measured_w - core_w);
        sxx += x * x;
    }
    let floor = sxy / sxx;
    let mut fitted = base.clone();
    fitted.package.c6_floor_watts = floor;
    fitted.package.pc6_watts = floor * ratio;
    let base_rows = predict(base, &samples);
    let rows = predict(&fitted, &samples);
    let mut per_log = Vec::new();
    for (name, _) in logs {
        let of_log: Vec<&RowFit> = rows.iter().filter(|r| &r.log == name).collect();
        if !of_log.is_empty() {
            per_log.push((name.clone(), error_of(&of_log)));
        }
    }
    Some(CalibrationReport {
        profile: base.name.clone(),
        base_c6_floor_watts: base.package.c6_floor_watts,
        fitted_c6_floor_watts: floor,
        fitted_pc6_watts: floor * ratio,
        base_error: error_of(&base_rows.iter().collect::<Vec<_>>()),
        fitted_error: error_of(&rows.iter().collect::<Vec<_>>()),
        per_log,
        rows,
    })
}
