//! Arrival processes, each a seeded generator of arrival times: Poisson (exponential gaps),
//! bursty on/off (Poisson bursts at a burst rate, on and off periods from distributions),
//! diurnal (Poisson with a sinusoidal rate, by thinning), and replay of per-minute counts.
//! µSuite's own generator draws Poisson-*distributed* gaps, which makes arrivals nearly periodic;
//! these are the real thing.

use std::time::Duration;

use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a process or distribution description was refused.
#[derive(Debug, Error, PartialEq)]
#[error("{spec:?}: {problem}")]
pub struct SpecError {
    pub spec: String,
    pub problem: String,
}

fn spec_error(spec: &str, problem: impl Into<String>) -> SpecError {
    SpecError {
        spec: spec.to_string(),
        problem: problem.into(),
    }
}

/// A distribution of durations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Dist {
    Exponential {
        mean_s: f64,
    },
    Constant {
        s: f64,
    },
    Uniform {
        min_s: f64,
        max_s: f64,
    },
    /// Heavy-tailed: `scale_s` is the minimum, `shape` > 1 for a finite mean.
    Pareto {
        scale_s: f64,
        shape: f64,
    },
}

fn seconds(spec: &str, text: &str) -> Result<f64, SpecError> {
    let d = torpor_image::parse_duration(text).map_err(|e| spec_error(spec, e.to_string()))?;
    Ok(d.as_secs_f64())
}

fn number(spec: &str, key: &str, text: &str) -> Result<f64, SpecError> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| {
            spec_error(
                spec,
                format!("{key} = {text:?} is not a non-negative number"),
            )
        })
}

impl Dist {
    /// `exp:2s`, `const:1s`, `uniform:1s..3s`, `pareto:500ms/1.5` (scale/shape).
    pub fn parse(spec: &str) -> Result<Dist, SpecError> {
        let (kind, arg) = spec
            .split_once(':')
            .ok_or_else(|| spec_error(spec, "expected KIND:ARGS, e.g. exp:2s"))?;
        let d = match kind {
            "exp" => Dist::Exponential {
                mean_s: seconds(spec, arg)?,
            },
            "const" => Dist::Constant {
                s: seconds(spec, arg)?,
            },
            "uniform" => {
                let (a, b) = arg
                    .split_once("..")
                    .ok_or_else(|| spec_error(spec, "uniform takes MIN..MAX"))?;
                let (min_s, max_s) = (seconds(spec, a)?, seconds(spec, b)?);
                if min_s > max_s {
                    return Err(spec_error(spec, "MIN is above MAX"));
                }
                Dist::Uniform { min_s, max_s }
            }
            "pareto" => {
                let (a, b) = arg
                    .split_once('/')
                    .ok_or_else(|| spec_error(spec, "pareto takes SCALE/SHAPE"))?;
                let shape = number(spec, "shape", b)?;
                if shape <= 1.0 {
                    return Err(spec_error(spec, "shape must exceed 1 for a finite mean"));
                }
                Dist::Pareto {
                    scale_s: seconds(spec, a)?,
                    shape,
                }
            }
            other => {
                return Err(spec_error(
                    spec,
                    format!("unknown distribution {other:?} (exp, const, uniform, pareto)"),
                ))
            }
        };
        Ok(d)
    }

    pub fn sample(&self, rng: &mut SmallRng) -> f64 {
        match *self {
            Dist::Exponential { mean_s } => exponential(rng, 1.0 / mean_s.max(1e-12)),
            Dist::Constant { s } => s,
            Dist::Uniform { min_s, max_s } => rng.gen_range(min_s..=max_s),
            Dist::Pareto { scale_s, shape } => {
                let u: f64 = 1.0 - rng.gen::<f64>();
                scale_s / u.powf(1.0 / shape)
            }
        }
    }

    pub fn mean_s(&self) -> f64 {
        match *self {
            Dist::Exponential { mean_s } => mean_s,
            Dist::Constant { s } => s,
            Dist::Uniform { min_s, max_s } => (min_s + max_s) / 2.0,
            Dist::Pareto { scale_s, shape } => scale_s * shape / (shape - 1.0),
        }
    }
}

/// An exponential gap at `rate` per second.
fn exponential(rng: &mut SmallRng, rate: f64) -> f64 {
    let u: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    -u.ln() / rate
}

/// An arrival process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Arrivals {
    Poisson {
        rate_per_s: f64,
    },
    /// Poisson at `burst_rate_per_s` during on periods, nothing during off periods.
    OnOff {
        burst_rate_per_s: f64,
        on: Dist,
        off: Dist,
    },
    /// Poisson with rate `mean × (1 + amplitude × sin(2πt / period))`.
    Diurnal {
        mean_rate_per_s: f64,
        amplitude: f64,
        period_s: f64,
    },
    /// Per-minute counts (a trace), `speedup` trace minutes per 60/speedup seconds; arrivals
    /// uniform within each minute.
    Replay {
        per_minute: Vec<u64>,
        speedup: f64,
    },
}

impl Arrivals {
    /// `poisson:rate=100`, `onoff:rate=200,on=exp:1s,off=exp:5s`,
    /// `diurnal:rate=50,amplitude=0.8,period=60s`. Replay comes from a trace file.
    pub fn parse(spec: &str) -> Result<Arrivals, SpecError> {
        let (kind, args) = spec.split_once(':').unwrap_or((spec, ""));
        let mut kv = std::collections::BTreeMap::new();
        for part in args.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| spec_error(spec, format!("{part:?} is not KEY=VALUE")))?;
            kv.insert(k.trim(), v.trim());
        }
        let mut take = |key: &str| {
            kv.remove(key)
                .ok_or_else(|| spec_error(spec, format!("{kind} needs {key}=…")))
        };
        let a = match kind {
            "poisson" => Arrivals::Poisson { rate_per_s: number(spec, "rate", take("rate")?)? },
            "onoff" => Arrivals::OnOff {
                burst_rate_per_s: number(spec, "rate", take("rate")?)?,
                on: Dist::parse(take("on")?)?,
                off: Dist::parse(take("off")?)?,
            },
            "diurnal" => {
                let amplitude = number(spec, "amplitude", take("amplitude")?)?;
                if amplitude > 1.0 {
                    return Err(spec_error(spec, "amplitude is at most 1 (the rate never goes negative)"));
                }
                Arrivals::Diurnal {
                    mean_rate_per_s: number(spec, "rate", take("rate")?)?,
                    amplitude,
                    period_s: seconds(spec, take("period")?)?,
                }
            }
            other => {
                return Err(spec_error(
                    spec,
                    format!("unknown arrival process {other:?} (poisson, onoff, diurnal; replay with --trace)"),
                ))
            }
        };
        if let Some(k) = kv.keys().next() {
            return Err(spec_error(spec, format!("unknown key {k:?}")));
        }
        Ok(a)
    }

    /// The arrival times (offsets from the start) up to `horizon`, from `seed`.
    pub fn schedule(&self, horizon: Duration, seed: u64) -> Vec<Duration> {
        let mut stream = self.stream(SmallRng::seed_from_u64(seed));
        let end = horizon.as_secs_f64();
        std::iter::from_fn(|| stream.next_arrival().filter(|t| *t < end))
            .map(Duration::from_secs_f64)
            .collect()
    }

    /// The arrivals one at a time, for simulations too long to hold a schedule.
    pub fn stream(&self, rng: SmallRng) -> ArrivalStream {
        ArrivalStream::new(std::sync::Arc::new(self.clone()), rng)
    }

    /// Long-run mean rate, for the progress bar and sanity checks.
    pub fn mean_rate_per_s(&self) -> f64 {
        match self {
            Arrivals::Poisson { rate_per_s } => *rate_per_s,
            Arrivals::OnOff {
                burst_rate_per_s,
                on,
                off,
            } => burst_rate_per_s * on.mean_s() / (on.mean_s() + off.mean_s()).max(1e-12),
            Arrivals::Diurnal {
                mean_rate_per_s, ..
            } => *mean_rate_per_s,
            Arrivals::Replay {
                per_minute,
                speedup,
            } => {
                per_minute.iter().sum::<u64>() as f64
                    / (per_minute.len().max(1) as f64 * 60.0 / speedup)
            }
        }
    }
}

impl Arrivals {
    /// The same process entered `minutes` into it: a replay skips that many minutes of its
    /// trace (so that successive blocks of an experiment see successive parts of the day);
    /// the generated processes are stationary and stay as they are.
    pub fn from_minute(&self, minutes: usize) -> Arrivals {
        match self {
            Arrivals::Replay {
                per_minute,
                speedup,
            } => Arrivals::Replay {
                per_minute: per_minute.iter().skip(minutes).copied().collect(),
                speedup: *speedup,
            },
            other => other.clone(),
        }
    }
}

/// An arrival process unrolled lazily: each call gives the next arrival time in seconds.
#[derive(Debug, Clone)]
pub struct ArrivalStream {
    /// Shared: a simulation runs many streams of one process.
    process: std::sync::Arc<Arrivals>,
    rng: SmallRng,
    /// The last arrival (or the current position in the process).
    t: f64,
    /// On/off: end of the current burst.
    burst_end: Option<f64>,
    /// Replay: the next minute to unroll, and its arrivals not yet given (latest first).
    minute: usize,
    pending: Vec<f64>,
}

impl ArrivalStream {
    pub fn new(process: std::sync::Arc<Arrivals>, rng: SmallRng) -> ArrivalStream {
        ArrivalStream {
            process,
            rng,
            t: 0.0,
            burst_end: None,
            minute: 0,
            pending: Vec::new(),
        }
    }

    /// The next arrival, or `None` when the process has no more (a finished trace, rate 0).
    pub fn next_arrival(&mut self) -> Option<f64> {
        let rng = &mut self.rng;
        match &*self.process {
            Arrivals::Poisson { rate_per_s } => {
                if *rate_per_s <= 0.0 {
                    return None;
                }
                self.t += exponential(rng, *rate_per_s);
                Some(self.t)
            }
            Arrivals::OnOff {
                burst_rate_per_s,
                on,
                off,
            } => {
                if *burst_rate_per_s <= 0.0 {
                    return None;
                }
                loop {
                    let end = *self
                        .burst_end
                        .get_or_insert_with(|| self.t + on.sample(rng));
                    let a = self.t + exponential(rng, *burst_rate_per_s);
                    if a < end {
                        self.t = a;
                        return Some(a);
                    }
                    // The burst is over: an off period, then the next burst.
                    self.t = end + off.sample(rng);
                    self.burst_end = Some(self.t + on.sample(rng));
                }
            }
            Arrivals::Diurnal {
                mean_rate_per_s,
                amplitude,
                period_s,
            } => {
                let peak = mean_rate_per_s * (1.0 + amplitude);
                if peak <= 0.0 {
                    return None;
                }
                loop {
                    self.t += exponential(rng, peak);
                    let rate = mean_rate_per_s
                        * (1.0
                            + amplitude * (2.0 * std::f64::consts::PI * self.t / period_s).sin());
                    if rng.gen::<f64>() * peak < rate {
                        return Some(self.t);
                    }
                }
            }
            Arrivals::Replay {
                per_minute,
                speedup,
            } => {
                let minute_s = 60.0 / speedup.max(1e-9);
                while self.pending.is_empty() {
                    let n = *per_minute.get(self.minute)?;
                    let start = self.minute as f64 * minute_s;
                    self.pending = (0..n)
                        .map(|_| start + rng.gen::<f64>() * minute_s)
                        .collect();
                    self.pending.sort_by(|a, b| b.total_cmp(a));
                    self.minute += 1;
                }
                self.pending.pop()
            }
        }
    }
}

/// Mean and coefficient of variation of the gaps between consecutive times.
pub fn gap_stats(times: &[Duration]) -> Option<(f64, f64)> {
    let gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    mean_cv(&gaps)
}

/// Mean and coefficient of variation of `gaps` (seconds); `None` for fewer than two.
pub fn mean_cv(gaps: &[f64]) -> Option<(f64, f64)> {
    if gaps.len() < 2 {
        return None;
    }
    let n = gaps.len() as f64;
    let mean = gaps.iter().sum::<f64>() / n;
    let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some((mean, var.sqrt() / mean))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_entered_later_skips_those_minutes_and_the_others_stay() {
        let r = Arrivals::Replay {
            per_minute: vec![5, 0, 2, 7],
            speedup: 2.0,
        };
        match r.from_minute(2) {
            Arrivals::Replay {
                per_minute,
                speedup,
            } => {
                assert_eq!(per_minute, vec![2, 7]);
                assert_eq!(speedup, 2.0);
            }
            other => panic!("{other:?}"),
        }
        match r.from_minute(9) {
            Arrivals::Replay { per_minute, .. } => assert!(per_minute.is_empty()),
            other => panic!("{other:?}"),
        }
        let p = Arrivals::Poisson { rate_per_s: 3.0 };
        assert!(matches!(p.from_minute(4), Arrivals::Poisson { rate_per_s } if rate_per_s == 3.0));
    }

    #[test]
    fn poisson_gaps_are_exponential() {
        let times = Arrivals::Poisson { rate_per_s: 100.0 }.schedule(Duration::from_secs(300), 7);
        let (mean, cv) = gap_stats(&times).unwrap();
        assert!((mean - 0.01).abs() < 0.0005, "mean gap {mean}");
        assert!((cv - 1.0).abs() < 0.05, "cv {cv}");
    }

    #[test]
    fn same_seed_same_schedule() {
        let a = Arrivals::parse("onoff:rate=50,on=exp:1s,off=exp:3s").unwrap();
        assert_eq!(
            a.schedule(Duration::from_secs(60), 1),
            a.schedule(Duration::from_secs(60), 1)
        );
        assert_ne!(
            a.schedule(Duration::from_secs(60), 1),
            a.schedule(Duration::from_secs(60), 2)
        );
    }

    #[test]
    fn on_off_is_burstier_than_poisson_at_the_same_mean_rate() {
        let a = Arrivals::parse("onoff:rate=100,on=exp:1s,off=exp:4s").unwrap();
        assert!((a.mean_rate_per_s() - 20.0).abs() < 1e-9);
        let times = a.schedule(Duration::from_secs(2000), 3);
        let rate = times.len() as f64 / 2000.0;
        assert!((rate - 20.0).abs() < 2.0, "rate {rate}");
        let (_, cv) = gap_stats(&times).unwrap();
        assert!(cv > 2.0, "bursty gaps have cv {cv}");
    }

    #[test]
    fn diurnal_rate_follows_the_sine() {
        let a = Arrivals::parse("diurnal:rate=100,amplitude=0.8,period=100s").unwrap();
        let times = a.schedule(Duration::from_secs(100), 5);
        let in_window = |from: f64, to: f64| {
            times
                .iter()
                .filter(|t| (from..to).contains(&t.as_secs_f64()))
                .count() as f64
        };
        // Peak quarter around t = 25 s, trough around t = 75 s.
        let (peak, trough) = (in_window(15.0, 35.0), in_window(65.0, 85.0));
        assert!(peak > 3.0 * trough, "peak {peak} trough {trough}");
        assert!(
            (times.len() as f64 - 10_000.0).abs() < 500.0,
            "{}",
            times.len()
        );
    }

    #[test]
    fn replay_puts_each_minutes_count_in_its_minute() {
        let a = Arrivals::Replay {
            per_minute: vec![3, 0, 5],
            speedup: 60.0,
        };
        let times = a.schedule(Duration::from_secs(10), 1);
        assert_eq!(times.len(), 8);
        assert!(times[..3].iter().all(|t| *t < Duration::from_secs(1)));
        assert!(times[3..]
            .iter()
            .all(|t| *t >= Duration::from_secs(2) && *t < Duration::from_secs(3)));
    }

    #[test]
    fn bad_specs_name_the_problem() {
        for (spec, word) in [
            ("poisson", "needs rate"),
            ("poisson:rate=fast", "not a non-negative number"),
            ("onoff:rate=1,on=exp:1s,off=zipf:2", "unknown distribution"),
            ("diurnal:rate=1,amplitude=2,period=1s", "at most 1"),
            ("poisson:rate=1,burst=2", "unknown key"),
            ("gamma:rate=1", "unknown arrival process"),
            ("onoff:rate=1,on=exp:1s;off=exp:1s", "not a duration"),
            ("poisson:rate", "not KEY=VALUE"),
        ] {
            let e = Arrivals::parse(spec).unwrap_err().to_string();
            assert!(e.contains(word), "{spec}: {e}");
        }
        assert!(Dist::parse("pareto:1s/0.9")
            .unwrap_err()
            .to_string()
            .contains("exceed 1"));
    }
}
