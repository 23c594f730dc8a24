//! The open-loop engine: a dispatcher thread sleeps until each scheduled arrival (a timer, never
//! a spin) and hands the request to the runtime, whether or not earlier ones returned. Latency
//! is measured from the scheduled time, so a slow target cannot hide its queueing (no
//! coordinated omission). Results go into an HDR histogram per phase.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

use torpor_traffic::{
    arrival::{gap_stats, mean_cv},
    Arrivals, Percentiles,
};

use crate::target::Target;

/// How late a send may leave and still count as on schedule: a scheduler tick on a busy
/// machine, far below the gaps of the rates a generator like this is run at.
pub const ON_TIME: Duration = Duration::from_millis(1);

/// One stretch of load with one arrival process.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    pub arrivals: Arrivals,
    #[serde(with = "secs")]
    pub duration: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub phases: Vec<Phase>,
    pub seed: u64,
    /// A request not answered within this is an error ("timeout").
    pub timeout: Duration,
    /// Requests in flight beyond this are not sent but counted as errors ("overload"), so a dead
    /// target cannot make the generator grow without bound.
    pub max_in_flight: usize,
    pub progress: bool,
}

/// One phase's results.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub name: String,
    pub arrivals: Option<Arrivals>,
    pub duration_s: f64,
    pub scheduled: u64,
    pub ok: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    pub offered_rate_per_s: f64,
    pub achieved_rate_per_s: f64,
    pub latency: Percentiles,
    /// Coefficient of variation of the gaps between actual sends (1 for Poisson).
    pub send_gap_cv: Option<f64>,
    /// The same over the gaps between consecutive sends that both left within
    /// [`ON_TIME`] of their schedule: what the generator's gaps are where the machine let it
    /// keep time. A stall of the process makes the sends due during it leave together (open
    /// loop, as they must), which raises `send_gap_cv` but says nothing about the generator.
    pub send_gap_cv_on_time: Option<f64>,
    /// Share of the sends that left within [`ON_TIME`] of their schedule.
    pub on_time_share: Option<f64>,
    /// How late the dispatcher sent, at the 99th percentile.
    pub send_lag_p99_ms: Option<f64>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub target: String,
    pub seed: u64,
    pub wall_s: f64,
    /// CPU time of this process over the run, and as a share of one core.
    pub cpu_s: f64,
    pub cpu_pct_of_one_core: f64,
    pub phases: Vec<PhaseReport>,
    pub total: PhaseReport,
}

#[derive(Debug)]
struct PhaseStats {
    latency_us: Histogram<u64>,
    lag_us: Histogram<u64>,
    /// When each request was sent (since the start), and whether within [`ON_TIME`] of its
    /// schedule.
    sends: Vec<(Duration, bool)>,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

impl PhaseStats {
    fn new() -> PhaseStats {
        PhaseStats {
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds"),
            lag_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds"),
            sends: Vec::new(),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }
}

/// CPU-seconds this process has used (user and system), for the load generator's own cost
/// and for benchmarks that account for the process they run in.
pub fn process_cpu_s() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// Runs the phases one after the other against `target`. Call from inside a tokio runtime.
pub async fn run(target: Arc<dyn Target>, config: &RunConfig) -> LoadReport {
    // The whole schedule first: (offset from start, phase).
    let mut schedule = Vec::new();
    let mut phase_start = Duration::ZERO;
    for (i, p) in config.phases.iter().enumerate() {
        let seed = config.seed.wrapping_add(i as u64);
        schedule.extend(
            p.arrivals
                .schedule(p.duration, seed)
                .into_iter()
                .map(|t| (phase_start + t, i)),
        );
        phase_start += p.duration;
    }
    let total_time = phase_start;
    let stats: Arc<Vec<Mutex<PhaseStats>>> = Arc::new(
        config
            .phases
            .iter()
            .map(|_| Mutex::new(PhaseStats::new()))
            .collect(),
    );
    let bar = progress_bar(config.progress, schedule.len() as u64);
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cpu0 = process_cpu_s();
    let start = Instant::now();
    let handle = tokio::runtime::Handle::current();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let dispatcher = {
        let (stats, target, in_flight, bar) = (
            stats.clone(),
            target.clone(),
            in_flight.clone(),
            bar.clone(),
        );
        let (timeout, max_in_flight) = (config.timeout, config.max_in_flight);
        let done_tx = done_tx.clone();
        std::thread::Builder::new()
            .name("loadgen-dispatch".into())
            .spawn(move || {
                for (seq, (offset, phase)) in schedule.into_iter().enumerate() {
                    let due = start + offset;
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let sent = Instant::now();
                    {
                        let mut s = stats[phase].lock().expect("stats lock");
                        s.sends.push((sent - start, sent - due <= ON_TIME));
                        let _ = s.lag_us.record((sent - due).as_micros().max(1) as u64);
                    }
                    bar.inc(1);
                    if in_flight.load(std::sync::atomic::Ordering::Relaxed) >= max_in_flight {
                        stats[phase].lock().expect("stats lock").error("overload");
                        continue;
                    }
                    in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (stats, target, in_flight, done) = (
                        stats.clone(),
                        target.clone(),
                        in_flight.clone(),
                        done_tx.clone(),
                    );
                    handle.spawn(async move {
                        let result = tokio::time::timeout(timeout, target.call(seq as u64)).await;
                        // From the scheduled time: queueing anywhere counts.
                        let took = due.elapsed();
                        let mut s = stats[phase].lock().expect("stats lock");
                        match result {
                            Ok(Ok(())) => {
                                s.ok += 1;
                                let _ = s.latency_us.record(took.as_micros().max(1) as u64);
                            }
                            Ok(Err(kind)) => s.error(&kind),
                            Err(_) => s.error("timeout"),
                        }
                        drop(s);
                        in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        let _ = done.send(());
                    });
                }
            })
            .expect("dispatcher thread")
    };
    // The dispatcher's clone of done_tx goes when it ends; each request holds one until done.
    drop(done_tx);
    while done_rx.recv().await.is_some() {}
    let _ = tokio::task::spawn_blocking(move || dispatcher.join()).await;
    bar.finish_and_clear();
    let wall_s = start.elapsed().as_secs_f64().max(total_time.as_secs_f64());
    let cpu_s = process_cpu_s() - cpu0;
    // Every request has reported (the channel closed); a finished task may still hold its
    // Arc for a moment, so take the figures out rather than unwrap the Arc.
    let stats: Vec<PhaseStats> = stats
        .iter()
        .map(|m| std::mem::replace(&mut *m.lock().expect("stats lock"), PhaseStats::new()))
        .collect();
    let phases: Vec<PhaseReport> = config
        .phases
        .iter()
        .zip(&stats)
        .map(|(p, s)| {
            phase_report(
                p.name.clone(),
                Some(p.arrivals.clone()),
                p.duration.as_secs_f64(),
                s,
            )
        })
        .collect();
    let mut all = PhaseStats::new();
    for s in &stats {
        let _ = all.latency_us.add(&s.latency_us);
        let _ = all.lag_us.add(&s.lag_us);
        all.sends.extend(&s.sends);
        all.ok += s.ok;
        for (k, v) in &s.errors {
            *all.errors.entry(k.clone()).or_default() += v;
        }
    }
    all.sends.sort();
    LoadReport {
        target: target.describe(),
        seed: config.seed,
        wall_s,
        cpu_s,
        cpu_pct_of_one_core: 100.0 * cpu_s / wall_s.max(1e-9),
        total: phase_report("total".into(), None, total_time.as_secs_f64(), &all),
        phases,
    }
}

fn phase_report(
    name: String,
    arrivals: Option<Arrivals>,
    duration_s: f64,
    s: &PhaseStats,
) -> PhaseReport {
    let errors = s.errors.values().sum();
    PhaseReport {
        offered_rate_per_s: s.sends.len() as f64 / duration_s.max(1e-9),
        achieved_rate_per_s: s.ok as f64 / duration_s.max(1e-9),
        name,
        arrivals,
        duration_s,
        scheduled: s.sends.len() as u64,
        ok: s.ok,
        errors,
        error_kinds: s.errors.clone(),
        latency: Percentiles::of(&s.latency_us),
        send_gap_cv: gap_stats(&s.sends.iter().map(|(t, _)| *t).collect::<Vec<_>>())
            .map(|(_, cv)| cv),
        send_gap_cv_on_time: mean_cv(
            &s.sends
                .windows(2)
                .filter(|w| w[0].1 && w[1].1)
                .map(|w| (w[1].0 - w[0].0).as_secs_f64())
                .collect::<Vec<_>>(),
        )
        .map(|(_, cv)| cv),
        on_time_share: (!s.sends.is_empty())
            .then(|| s.sends.iter().filter(|(_, on)| *on).count() as f64 / s.sends.len() as f64),
        send_lag_p99_ms: (!s.lag_us.is_empty())
            .then(|| s.lag_us.value_at_quantile(0.99) as f64 / 1000.0),
    }
}

fn progress_bar(show: bool, len: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} requests sent ({per_sec})",
        )
        .expect("progress template")
        .progress_chars("=> "),
    );
    bar
}

/// The report as a table.
pub fn render(r: &LoadReport) -> String {
    use std::fmt::Write;
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {:.1} s, loadgen CPU {:.2} s ({:.1} % of one core)",
        r.target, r.wall_s, r.cpu_s, r.cpu_pct_of_one_core
    );
    let _ = writeln!(
        out,
        "{:<12} {:>7} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "phase",
        "sent",
        "ok",
        "errors",
        "offered",
        "achieved",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "gapCV"
    );
    for p in r.phases.iter().chain(std::iter::once(&r.total)) {
        let _ = writeln!(
            out,
            "{:<12} {:>7} {:>7} {:>6} {:>8.1} {:>8.1} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
            p.name,
            p.scheduled,
            p.ok,
            p.errors,
            p.offered_rate_per_s,
            p.achieved_rate_per_s,
            ms(p.latency.p50_ms),
            ms(p.latency.p90_ms),
            ms(p.latency.p99_ms),
            ms(p.latency.p999_ms),
            ms(p.latency.max_ms),
            p.send_gap_cv
                .map_or_else(|| "-".into(), |c| format!("{c:.2}"))
        );
        if !p.error_kinds.is_empty() {
            let kinds: Vec<String> = p
                .error_kinds
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(out, "{:<12} errors: {}", "", kinds.join(", "));
        }
    }
    out
}
