//! Per-minute invocation counts in the schema of the Azure Functions 2019 trace
//! (`invocations_per_function_md.anon.d*.csv`): `HashOwner,HashApp,HashFunction,Trigger,1,…,1440`,
//! one row per function, one column per minute of the day. The original cannot be downloaded
//! here; `fixtures/azure-functions-2019-sample.csv` is generated in that schema by
//! [`synthetic_day`] (a test checks the file still matches its generator).

use std::{fmt::Write, path::Path};

use rand::{rngs::SmallRng, Rng, SeedableRng};
use thiserror::Error;

/// Minutes in a day, the trace's column count after the four key columns.
pub const MINUTES: usize = 1440;
/// Largest trace file read (the real daily files are about 150 MB).
pub const MAX_TRACE_BYTES: u64 = 1 << 30;
const KEYS: [&str; 4] = ["HashOwner", "HashApp", "HashFunction", "Trigger"];

/// Why a trace could not be read.
#[derive(Debug, Error)]
pub enum TraceError {
    #[error("cannot read the trace")]
    Read(#[source] std::io::Error),
    #[error("trace is {0} bytes, over the {MAX_TRACE_BYTES} read")]
    TooLarge(u64),
    #[error("header is not HashOwner,HashApp,HashFunction,Trigger,1,…,1440 ({0})")]
    Header(String),
    #[error("line {line}: {problem}")]
    Row { line: usize, problem: String },
    #[error("no function {0:?} in the trace")]
    NoFunction(String),
}

/// One function's day.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRow {
    pub owner: String,
    pub app: String,
    pub function: String,
    pub trigger: String,
    pub per_minute: Vec<u64>,
}

/// A parsed trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub rows: Vec<TraceRow>,
}

impl Trace {
    pub fn read(path: &Path) -> Result<Trace, TraceError> {
        let len = std::fs::metadata(path).map_err(TraceError::Read)?.len();
        if len > MAX_TRACE_BYTES {
            return Err(TraceError::TooLarge(len));
        }
        Trace::parse(&std::fs::read_to_string(path).map_err(TraceError::Read)?)
    }

    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().trim().split(',').collect();
        let minutes_ok = header.len() == KEYS.len() + MINUTES
            && header[KEYS.len()..]
                .iter()
                .enumerate()
                .all(|(i, c)| c.trim() == (i + 1).to_string());
        if header[..KEYS.len().min(header.len())] != KEYS[..] || !minutes_ok {
            let shown: String = header.iter().take(6).copied().collect::<Vec<_>>().join(",");
            return Err(TraceError::Header(format!(
                "{} columns, starting {shown}",
                header.len()
            )));
        }
        let mut rows = Vec::new();
        for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let line_no = i + 2;
            let cells: Vec<&str> = line.trim().split(',').collect();
            if cells.len() != header.len() {
                return Err(TraceError::Row {
                    line: line_no,
                    problem: format!("{} cells, the header has {}", cells.len(), header.len()),
                });
            }
            let per_minute = cells[KEYS.len()..]
                .iter()
                .enumerate()
                .map(|(m, c)| {
                    c.trim().parse::<u64>().map_err(|_| TraceError::Row {
                        line: line_no,
                        problem: format!("minute {} holds {c:?}, not a count", m + 1),
                    })
                })
                .collect::<Result<Vec<u64>, _>>()?;
            rows.push(TraceRow {
                owner: cells[0].into(),
                app: cells[1].into(),
                function: cells[2].into(),
                trigger: cells[3].into(),
                per_minute,
            });
        }
        Ok(Trace { rows })
    }

    /// One function's counts by its hash (or a unique prefix), or every function summed.
    pub fn counts(&self, function: Option<&str>) -> Result<Vec<u64>, TraceError> {
        match function {
            Some(f) => self
                .rows
                .iter()
                .find(|r| r.function.starts_with(f))
                .map(|r| r.per_minute.clone())
                .ok_or_else(|| TraceError::NoFunction(f.into())),
            None => Ok((0..MINUTES)
                .map(|m| self.rows.iter().map(|r| r.per_minute[m]).sum())
                .collect()),
        }
    }

    pub fn to_csv(&self) -> String {
        let mut out = KEYS.join(",");
        for m in 1..=MINUTES {
            let _ = write!(out, ",{m}");
        }
        out.push('\n');
        for r in &self.rows {
            let _ = write!(out, "{},{},{},{}", r.owner, r.app, r.function, r.trigger);
            for c in &r.per_minute {
                let _ = write!(out, ",{c}");
            }
            out.push('\n');
        }
        out
    }
}

/// A generated day in the trace's schema: an HTTP function with a diurnal rate, a timer firing
/// every 5 minutes, a queue function in rare bursts, and a mostly idle HTTP function, the shapes
/// Shahrad et al. (ATC '20) report.
pub fn synthetic_day(seed: u64) -> Trace {
    let mut rng = SmallRng::seed_from_u64(seed);
    let hash = |rng: &mut SmallRng| format!("{:016x}{:016x}", rng.gen::<u64>(), rng.gen::<u64>());
    let mut rows = Vec::new();
    let mut row = |rng: &mut SmallRng, trigger: &str, f: &dyn Fn(usize, &mut SmallRng) -> u64| {
        let (owner, app, function) = (hash(rng), hash(rng), hash(rng));
        let per_minute = (0..MINUTES).map(|m| f(m, rng)).collect();
        rows.push(TraceRow {
            owner,
            app,
            function,
            trigger: trigger.into(),
            per_minute,
        });
    };
    row(&mut rng, "http", &|m, rng| {
        let rate =
            30.0 * (1.0 + 0.8 * (2.0 * std::f64::consts::PI * (m as f64 - 360.0) / 1440.0).sin());
        poisson(rng, rate)
    });
    row(&mut rng, "timer", &|m, _| u64::from(m % 5 == 0));
    row(&mut rng, "queue", &|_, rng| {
        if rng.gen::<f64>() < 0.02 {
            rng.gen_range(50..400)
        } else {
            0
        }
    });
    row(&mut rng, "http", &|_, rng| poisson(rng, 0.3));
    Trace { rows }
}

/// A Poisson count with mean `lambda` (Knuth's method; small means only).
fn poisson(rng: &mut SmallRng, lambda: f64) -> u64 {
    let limit = (-lambda).exp();
    let (mut k, mut p) = (0u64, 1.0);
    loop {
        p *= rng.gen::<f64>();
        if p <= limit {
            return k;
        }
        k += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `TORPOR_UPDATE_FIXTURES=1 cargo test -p torpor-loadgen` rewrites it from the generator.
    #[test]
    fn the_fixture_is_its_generators_output() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/azure-functions-2019-sample.csv");
        let want = synthetic_day(2019);
        if std::env::var_os("TORPOR_UPDATE_FIXTURES").is_some() {
            std::fs::write(&path, want.to_csv()).unwrap();
        }
        assert_eq!(Trace::read(&path).unwrap(), want);
    }

    #[test]
    fn round_trip_and_selection() {
        let t = synthetic_day(1);
        let back = Trace::parse(&t.to_csv()).unwrap();
        assert_eq!(back, t);
        let timer = back.counts(Some(&t.rows[1].function[..8])).unwrap();
        assert_eq!(timer.iter().sum::<u64>(), 288);
        let all = back.counts(None).unwrap();
        assert_eq!(all.len(), MINUTES);
        assert!(matches!(
            back.counts(Some("zzzz")),
            Err(TraceError::NoFunction(_))
        ));
    }

    #[test]
    fn bad_traces_are_refused_with_the_place() {
        assert!(matches!(
            Trace::parse("a,b,c\n"),
            Err(TraceError::Header(_))
        ));
        let mut csv = synthetic_day(1).to_csv();
        csv.push_str("o,a,f,http,1,2\n");
        let e = Trace::parse(&csv).unwrap_err().to_string();
        assert!(e.contains("line 6") && e.contains("cells"), "{e}");
        let csv = synthetic_day(1).to_csv().replacen(",0", ",x", 1);
        let e = Trace::parse(&csv).unwrap_err().to_string();
        assert!(e.contains("not a count"), "{e}");
    }
}
