//! turbostat logs: the header block (version, CPUID, MSR lines), then per interval a column
//! header line and rows: a summary row (`-` in the topology columns) and per-CPU rows. Any column
//! set is accepted; rows may stop short of the header (turbostat leaves package columns off the
//! CPUs that are not first in their package).

use std::{collections::BTreeMap, path::Path};

use serde::Serialize;
use thiserror::Error;

/// Largest log read (a day at 1 s on a big machine is well below).
pub const MAX_LOG_BYTES: u64 = 512 << 20;

/// Columns that mark a line as turbostat's column header.
const HEADER_MARKERS: &[&str] = &["Busy%", "Avg_MHz", "Bzy_MHz", "PkgWatt", "CPU%c1", "IRQ"];
/// Topology columns: `-` there marks a summary row.
const TOPOLOGY: &[&str] = &["Package", "Die", "Node", "Core", "CPU"];

/// Why a turbostat log could not be read.
#[derive(Debug, Error)]
pub enum TurbostatError {
    #[error("cannot read the log")]
    Read(#[source] std::io::Error),
    #[error("log is {0} bytes, more than the {MAX_LOG_BYTES} read")]
    TooLarge(u64),
    #[error("no column header line (one with Busy%, Avg_MHz, PkgWatt, …) found")]
    NoHeader,
    #[error("line {line}: {cells} cells but the column header has {columns}")]
    TooManyCells {
        line: usize,
        cells: usize,
        columns: usize,
    },
    #[error("line {line}: column {column} holds {text:?}, not a number")]
    BadCell {
        line: usize,
        column: String,
        text: String,
    },
    #[error("no data rows after the column header")]
    NoRows,
}

/// One data row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// `None` in the summary row (and for columns the log does not have).
    pub package: Option<u32>,
    pub core: Option<u32>,
    pub cpu: Option<u32>,
    /// Every numeric cell by column name.
    pub values: BTreeMap<String, f64>,
}

impl Row {
    pub fn get(&self, column: &str) -> Option<f64> {
        self.values.get(column).copied()
    }
}

/// One measurement interval.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Interval {
    pub summary: Option<Row>,
    pub cpus: Vec<Row>,
}

/// A parsed log.
#[derive(Debug, Clone, Serialize)]
pub struct TurbostatLog {
    /// The lines before the first column header (version, CPUID, MSRs).
    pub preamble: Vec<String>,
    pub columns: Vec<String>,
    pub intervals: Vec<Interval>,
    /// Lines among the rows that are not rows (turbostat's "12.3 sec" after a command, warnings).
    pub other_lines: Vec<String>,
}

fn is_header(cells: &[&str]) -> bool {
    cells.iter().any(|c| HEADER_MARKERS.contains(c))
        && cells.iter().all(|c| c.parse::<f64>().is_err())
}

impl TurbostatLog {
    pub fn read(path: &Path) -> Result<TurbostatLog, TurbostatError> {
        let len = std::fs::metadata(path).map_err(TurbostatError::Read)?.len();
        if len > MAX_LOG_BYTES {
            return Err(TurbostatError::TooLarge(len));
        }
        let text = std::fs::read_to_string(path).map_err(TurbostatError::Read)?;
        TurbostatLog::parse(&text)
    }

    pub fn parse(text: &str) -> Result<TurbostatLog, TurbostatError> {
        let mut preamble = Vec::new();
        let mut columns: Option<Vec<String>> = None;
        let mut intervals: Vec<Interval> = Vec::new();
        // A new header starts a new interval; a summary row does too when headers are not repeated.
        let mut open = Interval::default();
        let mut open_has_rows = false;
        let mut other_lines = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let cells: Vec<&str> = line.split_whitespace().collect();
            if cells.is_empty() {
                continue;
            }
            if is_header(&cells) {
                if open_has_rows {
                    intervals.push(std::mem::take(&mut open));
                    open_has_rows = false;
                }
                columns = Some(cells.iter().map(|c| c.to_string()).collect());
                continue;
            }
            let Some(cols) = &columns else {
                preamble.push(line.to_string());
                continue;
            };
            // A row starts with a number or "-"; anything else between rows is not data.
            let row_like = cells[0] == "-" || cells[0].parse::<f64>().is_ok();
            if !row_like || (cells.len() == 2 && cells[1] == "sec") {
                other_lines.push(line.to_string());
                continue;
            }
            let row = parse_row(i + 1, cols, &cells)?;
            let summary = cols.iter().any(|c| TOPOLOGY.contains(&c.as_str()))
                && row.package.is_none()
                && row.core.is_none()
                && row.cpu.is_none();
            let no_topology = !cols.iter().any(|c| TOPOLOGY.contains(&c.as_str()));
            if summary || no_topology {
                if open_has_rows {
                    intervals.push(std::mem::take(&mut open));
                }
                open.summary = Some(row);
            } else {
                open.cpus.push(row);
            }
            open_has_rows = true;
        }
        let Some(columns) = columns else {
            return Err(TurbostatError::NoHeader);
        };
        if open_has_rows {
            intervals.push(open);
        }
        if intervals.is_empty() {
            return Err(TurbostatError::NoRows);
        }
        Ok(TurbostatLog {
            preamble,
            columns,
            intervals,
            other_lines,
        })
    }

    /// Mean of `column` over the intervals' summary rows that have it.
    pub fn summary_mean(&self, column: &str) -> Option<f64> {
        mean(
            self.intervals
                .iter()
                .filter_map(|i| i.summary.as_ref()?.get(column)),
        )
    }

    /// Means over the intervals for each CPU that has rows.
    pub fn cpu_means(&self) -> BTreeMap<u32, BTreeMap<String, f64>> {
        let mut sums: BTreeMap<u32, BTreeMap<String, (f64, u32)>> = BTreeMap::new();
        for row in self.intervals.iter().flat_map(|i| &i.cpus) {
            let Some(cpu) = row.cpu else { continue };
            let per = sums.entry(cpu).or_default();
            for (k, v) in &row.values {
                let e = per.entry(k.clone()).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
        sums.into_iter()
            .map(|(cpu, cols)| {
                (
                    cpu,
                    cols.into_iter()
                        .map(|(k, (s, n))| (k, s / n as f64))
                        .collect(),
                )
            })
            .collect()
    }

    /// The figures `torpor power turbostat` reports.
    pub fn summary(&self) -> Summary {
        let columns = self
            .columns
            .iter()
            .filter(|c| !TOPOLOGY.contains(&c.as_str()))
            .filter_map(|c| Some((c.clone(), self.summary_mean(c)?)))
            .collect();
        Summary {
            intervals: self.intervals.len(),
            busy_pct: self.summary_mean("Busy%"),
            c6_pct: self.summary_mean("CPU%c6"),
            pkg_pc6_pct: self.summary_mean("Pkg%pc6"),
            pkg_watt: self.summary_mean("PkgWatt"),
            ram_watt: self.summary_mean("RAMWatt"),
            columns,
        }
    }
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0u32), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn parse_row(line: usize, columns: &[String], cells: &[&str]) -> Result<Row, TurbostatError> {
    if cells.len() > columns.len() {
        return Err(TurbostatError::TooManyCells {
            line,
            cells: cells.len(),
            columns: columns.len(),
        });
    }
    let mut row = Row {
        package: None,
        core: None,
        cpu: None,
        values: BTreeMap::new(),
    };
    for (column, text) in columns.iter().zip(cells) {
        if *text == "-" {
            continue;
        }
        let value: f64 = text.parse().map_err(|_| TurbostatError::BadCell {
            line,
            column: column.clone(),
            text: text.to_string(),
        })?;
        let id = || Some(value as u32);
        match column.as_str() {
            "Package" => row.package = id(),
            "Core" => row.core = id(),
            "CPU" => row.cpu = id(),
            _ => {
                row.values.insert(column.clone(), value);
            }
        }
    }
    Ok(row)
}

/// Means over all intervals of the summary rows.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub intervals: usize,
    pub busy_pct: Option<f64>,
    /// From `CPU%c6` (core C6 residency), not the requested-state `C6%`.
    pub c6_pct: Option<f64>,
    pub pkg_pc6_pct: Option<f64>,
    pub pkg_watt: Option<f64>,
    pub ram_watt: Option<f64>,
    /// Every numeric column's mean.
    pub columns: BTreeMap<String, f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = "turbostat version 2023.11.07\n\
        CPUID(0): GenuineIntel\n\
        Package\tCore\tCPU\tBusy%\tCPU%c6\tPkgWatt\n\
        -\t-\t-\t10.00\t80.00\t100.0\n\
        0\t0\t0\t20.00\t70.00\t100.0\n\
        0\t1\t1\t0.00\t90.00\n\
        Package\tCore\tCPU\tBusy%\tCPU%c6\tPkgWatt\n\
        -\t-\t-\t30.00\t60.00\t120.0\n\
        0\t0\t0\t40.00\t50.00\t120.0\n\
        0\t1\t1\t20.00\t70.00\n";

    #[test]
    fn intervals_summary_and_cpu_rows() {
        let log = TurbostatLog::parse(SMALL).unwrap();
        assert_eq!(log.preamble.len(), 2);
        assert_eq!(log.intervals.len(), 2);
        assert_eq!(log.intervals[0].cpus.len(), 2);
        let s = log.summary();
        assert_eq!(s.busy_pct, Some(20.0));
        assert_eq!(s.pkg_watt, Some(110.0));
        assert_eq!(s.ram_watt, None);
        let cpus = log.cpu_means();
        assert_eq!(cpus[&1]["Busy%"], 10.0);
        assert!(!cpus[&1].contains_key("PkgWatt"));
    }

    #[test]
    fn summary_only_logs_without_repeated_headers() {
        let log = TurbostatLog::parse("Avg_MHz Busy% PkgWatt\n10 1.0 50\n20 3.0 70\n").unwrap();
        assert_eq!(log.intervals.len(), 2);
        assert_eq!(log.summary().busy_pct, Some(2.0));
    }

    #[test]
    fn lines_that_are_not_rows_are_set_aside() {
        let text = "Busy%\tPkgWatt\n1.0\t10\nturbostat: warning\n3.0\t30\n12.005 sec\n";
        let log = TurbostatLog::parse(text).unwrap();
        assert_eq!(log.intervals.len(), 2);
        assert_eq!(log.other_lines.len(), 2);
        assert_eq!(log.summary().pkg_watt, Some(20.0));
    }

    #[test]
    fn no_header_is_an_error() {
        assert!(matches!(
            TurbostatLog::parse("just text\n1 2 3\n"),
            Err(TurbostatError::NoHeader)
        ));
    }

    #[test]
    fn header_without_rows_is_an_error() {
        assert!(matches!(
            TurbostatLog::parse("Busy% PkgWatt\n"),
            Err(TurbostatError::NoRows)
        ));
    }

    #[test]
    fn a_bad_cell_names_line_and_column() {
        let e = TurbostatLog::parse("Busy%\tPkgWatt\n1.0\tlots\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: column PkgWatt holds \"lots\", not a number"
        );
    }

    #[test]
    fn too_many_cells_is_an_error() {
        let e = TurbostatLog::parse("Busy%\tPkgWatt\n1.0\t2\t3\n").unwrap_err();
        assert!(
            matches!(e, TurbostatError::TooManyCells { line: 2, .. }),
            "{e}"
        );
    }
}
