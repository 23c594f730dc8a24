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

/// The Azure Functions 2019 shape as a seeded model (Shahrad et al., "Serverless in the Wild",
/// USENIX ATC '20, Fig. 5 and 6), since the trace itself cannot be downloaded here:
/// - a function's mean rate is lognormal, fitted to two published points of the per-app CDF:
///   45 % of apps are invoked at most once an hour and 81 % at most once a minute on average
///   (so ln(rate per minute) has mean [`AZURE_LN_RATE_MU`] and deviation
///   [`AZURE_LN_RATE_SIGMA`]: the median function is invoked about once in 36 minutes, and
///   ±2σ spans seven orders of magnitude, as the paper's eight do);
/// - invocations come in bursts (the paper: inter-arrival CV above 1 for most non-timer apps):
///   burst sizes are 1 + geometric with mean [`AZURE_BURST_MEAN`] (an assumption; the paper
///   gives no burst size), and the gaps between bursts are Pareto with shape
///   [`AZURE_GAP_SHAPE`] (heavy-tailed, infinite variance), scaled to the function's rate.
pub const AZURE_LN_RATE_MU: f64 = -3.5815;
/// See [`AZURE_LN_RATE_MU`].
pub const AZURE_LN_RATE_SIGMA: f64 = 4.0797;
/// Mean invocations per burst (see [`AZURE_LN_RATE_MU`]).
pub const AZURE_BURST_MEAN: f64 = 3.0;
/// Pareto shape of the gaps between bursts (see [`AZURE_LN_RATE_MU`]).
pub const AZURE_GAP_SHAPE: f64 = 1.5;

/// The mean rate (invocations per minute) of the function at quantile `q` of the model's rate
/// distribution (see [`AZURE_LN_RATE_MU`]).
pub fn azure_rate_at(q: f64) -> f64 {
    (AZURE_LN_RATE_MU + AZURE_LN_RATE_SIGMA * normal_quantile(q)).exp()
}

/// A day of functions with these mean rates (invocations per minute) in the trace's schema,
/// their invocations bursty with heavy-tailed gaps (see [`AZURE_LN_RATE_MU`]).
pub fn azure_like_day(seed: u64, rates_per_minute: &[f64]) -> Trace {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    for &rate in rates_per_minute {
        let mut per_minute = vec![0u64; MINUTES];
        // Mean gap between bursts (minutes) and the Pareto scale that gives it.
        let mean_gap = AZURE_BURST_MEAN / rate.max(1e-12);
        let scale = mean_gap * (AZURE_GAP_SHAPE - 1.0) / AZURE_GAP_SHAPE;
        let gap = |rng: &mut SmallRng| scale / (1.0 - rng.gen::<f64>()).powf(1.0 / AZURE_GAP_SHAPE);
        // The day starts at a random point of a gap.
        let mut t = gap(&mut rng) * rng.gen::<f64>();
        while t < MINUTES as f64 {
            per_minute[t as usize] += 1 + geometric(&mut rng, AZURE_BURST_MEAN - 1.0);
            t += gap(&mut rng);
        }
        let hash = format!("{:016x}{:016x}", rng.gen::<u64>(), rng.gen::<u64>());
        rows.push(TraceRow {
            owner: hash[..16].into(),
            app: hash[16..].into(),
            function: hash,
            trigger: "http".into(),
            per_minute,
        });
    }
    Trace { rows }
}

/// A geometric count (0, 1, …) with this mean.
fn geometric(rng: &mut SmallRng, mean: f64) -> u64 {
    let p = 1.0 / (1.0 + mean);
    ((1.0 - rng.gen::<f64>()).ln() / (1.0 - p).ln()).floor() as u64
}

/// The standard normal quantile (Acklam's rational approximation, relative error below 1.2e-9).
fn normal_quantile(q: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let q = q.clamp(1e-12, 1.0 - 1e-12);
    let tail = |r: f64| {
        (((((C[0] * r + C[1]) * r + C[2]) * r + C[3]) * r + C[4]) * r + C[5])
            / ((((D[0] * r + D[1]) * r + D[2]) * r + D[3]) * r + 1.0)
    };
    if q < 0.02425 {
        tail((-2.0 * q.ln()).sqrt())
    } else if q > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - q).ln()).sqrt())
    } else {
        let r = q - 0.5;
        let r2 = r * r;
        (((((A[0] * r2 + A[1]) * r2 + A[2]) * r2 + A[3]) * r2 + A[4]) * r2 + A[5]) * r
            / (((((B[0] * r2 + B[1]) * r2 + B[2]) * r2 + B[3]) * r2 + B[4]) * r2 + 1.0)
    }
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
    fn the_azure_model_has_the_published_shape() {
        // The two published points of the rate CDF.
        assert!((azure_rate_at(0.45) - 1.0 / 60.0).abs() < 1e-4);
        assert!((azure_rate_at(0.81) - 1.0).abs() < 1e-3);
        // A thousand functions drawn from the model, generated as a day each.
        let mut rng = SmallRng::seed_from_u64(5);
        let rates: Vec<f64> = (0..1000).map(|_| azure_rate_at(rng.gen())).collect();
        let day = azure_like_day(1, &rates);
        let share = |f: &dyn Fn(f64) -> bool| {
            let n = day
                .rows
                .iter()
                .filter(|r| f(r.per_minute.iter().sum::<u64>() as f64 / MINUTES as f64))
                .count();
            n as f64 / day.rows.len() as f64
        };
        let under_a_minute = share(&|r| r <= 1.0);
        assert!(
            (0.75..0.87).contains(&under_a_minute),
            "{under_a_minute} invoked at most once a minute"
        );
        let under_an_hour = share(&|r| r <= 1.0 / 60.0);
        assert!(
            (0.38..0.55).contains(&under_an_hour),
            "{under_an_hour} invoked at most once an hour"
        );
        // Bursty: the per-minute counts of a function of about 10 per minute vary far more
        // than a Poisson process's would (variance over mean 1).
        let busy = azure_like_day(2, &[10.0]).rows[0].per_minute.clone();
        let mean = busy.iter().sum::<u64>() as f64 / MINUTES as f64;
        let var = busy.iter().map(|&c| (c as f64 - mean).powi(2)).sum::<f64>() / MINUTES as f64;
        assert!(var / mean > 3.0, "dispersion {} (mean {mean})", var / mean);
        assert_eq!(
            azure_like_day(9, &rates[..5]),
            azure_like_day(9, &rates[..5])
        );
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
