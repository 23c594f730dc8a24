//! Calibration of the checkpoint/restore model from `torpor bench cr --json`: a least-squares
//! line `fixed + per_gib × GiB` through the torpor medians at each footprint, with its error.

use serde::Serialize;
use thiserror::Error;

use crate::config::CrModel;

/// Why a benchmark report could not be used.
#[derive(Debug, Error)]
pub enum CalibrationError {
    #[error("not a `torpor bench cr --json` report: {0}")]
    Shape(String),
    #[error("need at least two footprints with checkpoint and restore medians, found {0}")]
    TooFew(usize),
}

/// One footprint: measured and modelled times.
#[derive(Debug, Clone, Serialize)]
pub struct FitPoint {
    pub gib: f64,
    pub checkpoint_s: f64,
    pub checkpoint_model_s: f64,
    pub restore_s: f64,
    pub restore_model_s: f64,
}

/// The fitted model and how well it fits.
#[derive(Debug, Clone, Serialize)]
pub struct CrFit {
    pub model: CrModel,
    pub points: Vec<FitPoint>,
    pub checkpoint_mape_pct: f64,
    pub restore_mape_pct: f64,
}

fn line(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), p| (a + p.0, b + p.1));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    // A negative intercept would make tiny services restore in negative time.
    let intercept = (my - slope * mx).max(0.0);
    (intercept, slope)
}

/// Fits the model to a `torpor bench cr --json` document.
pub fn fit(report: &serde_json::Value) -> Result<CrFit, CalibrationError> {
    let sizes = report["sizes"]
        .as_array()
        .ok_or_else(|| CalibrationError::Shape("no \"sizes\" array".into()))?;
    let mut pts = Vec::new();
    for s in sizes {
        let gib = s["size_bytes"]
            .as_f64()
            .ok_or_else(|| CalibrationError::Shape("a size without size_bytes".into()))?
            / (1u64 << 30) as f64;
        if let (Some(c), Some(r)) = (
            s["torpor"]["checkpoint_s"].as_f64(),
            s["torpor"]["restore_s"].as_f64(),
        ) {
            pts.push((gib, c, r));
        }
    }
    if pts.len() < 2 {
        return Err(CalibrationError::TooFew(pts.len()));
    }
    let (cf, cs) = line(&pts.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>());
    let (rf, rs) = line(&pts.iter().map(|p| (p.0, p.2)).collect::<Vec<_>>());
    let model = CrModel {
        checkpoint_fixed_s: cf,
        checkpoint_per_gib_s: cs,
        restore_fixed_s: rf,
        restore_per_gib_s: rs,
    };
    let points: Vec<FitPoint> = pts
        .iter()
        .map(|&(gib, c, r)| FitPoint {
            gib,
            checkpoint_s: c,
            checkpoint_model_s: cf + cs * gib,
            restore_s: r,
            restore_model_s: rf + rs * gib,
        })
        .collect();
    let mape = |measured: fn(&FitPoint) -> (f64, f64)| {
        100.0
            * points
                .iter()
                .map(|p| {
                    let (m, model) = measured(p);
                    (model - m).abs() / m
                })
                .sum::<f64>()
            / points.len() as f64
    };
    Ok(CrFit {
        checkpoint_mape_pct: mape(|p| (p.checkpoint_s, p.checkpoint_model_s)),
        restore_mape_pct: mape(|p| (p.restore_s, p.restore_model_s)),
        model,
        points,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_through_exact_points_is_exact() {
        let doc = serde_json::json!({"sizes": [
            {"size_bytes": 1u64 << 30, "torpor": {"checkpoint_s": 0.55, "restore_s": 0.65}},
            {"size_bytes": 2u64 << 30, "torpor": {"checkpoint_s": 1.05, "restore_s": 1.25}},
        ]});
        let f = fit(&doc).unwrap();
        assert!((f.model.checkpoint_per_gib_s - 0.5).abs() < 1e-9);
        assert!((f.model.restore_fixed_s - 0.05).abs() < 1e-9);
        assert!(f.restore_mape_pct < 1e-6);
    }

    #[test]
    fn the_default_model_is_the_fit_of_the_shipped_benchmark() {
        let text = include_str!("../fixtures/bench-cr.json");
        let f = fit(&serde_json::from_str(text).unwrap()).unwrap();
        let d = CrModel::default();
        for (a, b) in [
            (f.model.checkpoint_fixed_s, d.checkpoint_fixed_s),
            (f.model.checkpoint_per_gib_s, d.checkpoint_per_gib_s),
            (f.model.restore_fixed_s, d.restore_fixed_s),
            (f.model.restore_per_gib_s, d.restore_per_gib_s),
        ] {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
        assert!(
            f.checkpoint_mape_pct < 10.0 && f.restore_mape_pct < 10.0,
            "{f:?}"
        );
    }

    #[test]
    fn bad_reports_are_refused() {
        assert!(matches!(
            fit(&serde_json::json!({"x": 1})),
            Err(CalibrationError::Shape(_))
        ));
        assert!(matches!(
            fit(
                &serde_json::json!({"sizes": [{"size_bytes": 1, "torpor": {"checkpoint_s": 1.0, "restore_s": 1.0}}]})
            ),
            Err(CalibrationError::TooFew(1))
        ));
    }
}
