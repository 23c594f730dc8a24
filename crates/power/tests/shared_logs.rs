//! The parser and the icx-2s profile on the five real turbostat logs in ../shared/data. Expected
//! figures are computed here from the files' own lines, with no code from the parser.

use std::path::PathBuf;

use torpor_power::{calibrate, Profile, TurbostatLog};

fn logs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/turbostat")
}

fn log_paths() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(logs_dir())
        .unwrap_or_else(|e| {
            panic!(
                "the shared logs are read from ../shared/data/turbostat beside the project ({}): {e}",
                logs_dir().display()
            )
        })
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    paths.sort();
    assert_eq!(paths.len(), 5, "five shared logs");
    paths
}

/// Rows of the file as (header, cells), found the simple way: a header starts with "Package".
fn raw_rows(text: &str) -> Vec<(Vec<&str>, Vec<&str>)> {
    let mut header: Option<Vec<&str>> = None;
    let mut out = Vec::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('\t').collect();
        if cells[0] == "Package" {
            header = Some(cells);
        } else if let Some(h) = &header {
            out.push((h.clone(), cells));
        }
    }
    out
}

fn column_mean(rows: &[&(Vec<&str>, Vec<&str>)], column: &str) -> f64 {
    let values: Vec<f64> = rows
        .iter()
        .filter_map(|(h, cells)| {
            let i = h.iter().position(|c| *c == column)?;
            cells.get(i)?.parse().ok()
        })
        .collect();
    values.iter().sum::<f64>() / values.len() as f64
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9 * b.abs().max(1.0)
}

#[test]
fn summary_means_match_the_files_rows() {
    for path in log_paths() {
        let text = std::fs::read_to_string(&path).unwrap();
        let raw = raw_rows(&text);
        let summary_rows: Vec<_> = raw.iter().filter(|(_, c)| c[0] == "-").collect();
        let log = TurbostatLog::read(&path).unwrap();
        let s = log.summary();
        assert_eq!(s.intervals, summary_rows.len(), "{path:?}");
        for (got, column) in [
            (s.busy_pct, "Busy%"),
            (s.c6_pct, "CPU%c6"),
            (s.pkg_pc6_pct, "Pkg%pc6"),
            (s.pkg_watt, "PkgWatt"),
            (s.ram_watt, "RAMWatt"),
        ] {
            let want = column_mean(&summary_rows, column);
            assert!(
                close(got.unwrap(), want),
                "{path:?} {column}: {got:?} vs {want}"
            );
        }
        // Every column of the summary, too.
        for (column, got) in &s.columns {
            assert!(
                close(*got, column_mean(&summary_rows, column)),
                "{path:?} {column}"
            );
        }
    }
}

#[test]
fn per_cpu_rows_match_the_files_rows() {
    for path in log_paths() {
        let text = std::fs::read_to_string(&path).unwrap();
        let raw = raw_rows(&text);
        let log = TurbostatLog::read(&path).unwrap();
        let cpus = log.cpu_means();
        let cpu_rows: Vec<_> = raw.iter().filter(|(_, c)| c[0] != "-").collect();
        let ids: std::collections::BTreeSet<u32> = cpu_rows
            .iter()
            .map(|(_, c)| c[2].parse().unwrap())
            .collect();
        assert_eq!(
            cpus.keys().copied().collect::<Vec<_>>(),
            ids.iter().copied().collect::<Vec<_>>()
        );
        for id in ids {
            let mine: Vec<_> = cpu_rows
                .iter()
                .copied()
                .filter(|(_, c)| c[2].parse::<u32>().unwrap() == id)
                .collect();
            for column in ["Busy%", "C6%", "CPU%c6", "IRQ", "Bzy_MHz"] {
                let want = column_mean(&mine, column);
                let got = cpus[&id][column];
                assert!(
                    close(got, want),
                    "{path:?} cpu {id} {column}: {got} vs {want}"
                );
            }
            // Package columns only where the row has them (the first CPU of a package).
            let has_pkg = mine.iter().any(|(_, c)| c.len() > 24);
            assert_eq!(
                cpus[&id].contains_key("PkgWatt"),
                has_pkg,
                "{path:?} cpu {id}"
            );
        }
    }
}

fn shared_logs() -> Vec<(String, TurbostatLog)> {
    log_paths()
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, TurbostatLog::read(&p).unwrap())
        })
        .collect()
}

/// The issue asks for 10 % mean absolute percentage error; the profile's documented fit is
/// 6.1 %, and this bound leaves 1 point for rounding so that a model change that worsens the fit
/// fails here.
const PKG_WATT_MAPE_BOUND_PCT: f64 = 7.1;

#[test]
fn icx_profile_models_pkg_watt_within_the_bound() {
    let profile = Profile::resolve("icx-2s").unwrap();
    let (err, rows) = calibrate::evaluate(&profile, &shared_logs());
    assert_eq!(rows.len(), 65, "13 summary rows in each of 5 logs");
    assert!(err.mape_pct < PKG_WATT_MAPE_BOUND_PCT, "{err:?}");
    let recorded = profile.calibration.as_ref().unwrap();
    assert!(
        (recorded.pkg_watt_mape_pct - err.mape_pct).abs() < 0.1,
        "{err:?} vs {recorded:?}"
    );
}

#[test]
fn icx_profile_floor_is_the_least_squares_fit() {
    let profile = Profile::resolve("icx-2s").unwrap();
    let report = calibrate::calibrate(&profile, &shared_logs()).unwrap();
    assert!(
        (report.fitted_c6_floor_watts - profile.package.c6_floor_watts).abs() < 0.05,
        "profile says {} W, the fit gives {} W",
        profile.package.c6_floor_watts,
        report.fitted_c6_floor_watts
    );
    assert_eq!(report.per_log.len(), 5);
}
