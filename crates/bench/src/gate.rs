//! `torpor bench gate`: what the gate costs while a service is awake, and what a wake costs.
//!
//! * Warm overhead: the same open-loop load (fixed rate, Poisson arrivals) sent directly to a
//!   sample service, through its gate (proxy) and to the gate's address with kernel steering
//!   (the sk_lookup program hands each connection to the service's own socket), in the same
//!   run, the three taking turns in slices: p50/p99 and their ratio; then the highest
//!   sustained rate of each (closed loop, fixed concurrency, rounds in turns, medians) and its
//!   ratio to direct.
//!   The warm part runs in a network namespace of its own, so the program never touches the
//!   host's socket lookup.
//! * Wake latency: time to first response for a request that finds the service asleep
//!   (restore from the pool through the gate), per footprint, next to a cold start from the
//!   command and to stock CRIU restoring from /dev/shm.

use std::{
    net::{SocketAddr, SocketAddrV4},
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::Empty;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;
use torpor_agent::ServiceState;
use torpor_criu::CriuBinary;
use torpor_image::format_bytes;
use torpor_steer::{KernelSteering, Steering};

use crate::{
    cr::stock_criu_round,
    harness::{first_response, own_addr, SampleProcess},
    inproc::InProcessUp,
    report::{fmt_opt, median, ratio},
    ExperimentError,
};

/// Arguments of `torpor bench gate`.
#[derive(Debug, Clone, clap::Args)]
pub struct GateArgs {
    /// Open-loop request rate for the warm comparison (per second).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Length of each warm load.
    #[arg(long, default_value = "5s", value_parser = torpor_image::duration_arg)]
    pub duration: Duration,
    /// Footprints for the wake latency, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64MiB,1GiB", value_parser = torpor_image::size_arg)]
    pub sizes: Vec<u64>,
    /// Wakes (and cold starts, and stock restores) per footprint.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub repeat: u64,
    /// How long a service stays asleep before the request that wakes it (the stock-CRIU
    /// baseline waits as long between its dump and its restore).
    #[arg(long, default_value = "1s", value_parser = torpor_image::duration_arg)]
    pub asleep_for: Duration,
    /// Directory for the stock-CRIU baseline's images.
    #[arg(long, default_value = "/dev/shm")]
    pub baseline_dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// Latency and rate of one load.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub achieved_rate: f64,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WarmReport {
    pub offered_rate: f64,
    pub direct: LoadResult,
    pub gate: LoadResult,
    /// To the gate's address, steered in the kernel to the service's socket.
    pub kernel: LoadResult,
    /// Gate p50 minus direct p50.
    pub added_p50_us: Option<f64>,
    pub p99_ratio: Option<f64>,
    /// Kernel-steered p50 minus direct p50.
    pub added_p50_kernel_us: Option<f64>,
    pub p99_kernel_ratio: Option<f64>,
    /// Medians over the interleaved repeats.
    pub max_rate_direct: f64,
    pub max_rate_gate: f64,
    pub max_rate_kernel: f64,
    /// Gate's highest sustained rate over direct's: the median over rounds of the ratio
    /// within a round (the two measured back to back, so slow drifts in the machine's load
    /// cancel out).
    pub max_rate_ratio: f64,
    /// Kernel steering's highest sustained rate over direct's, as `max_rate_ratio`.
    pub max_rate_kernel_ratio: f64,
    /// Connections the sk_lookup program handed to the service (its counter): proof that the
    /// kernel figures did not go through the gate.
    pub kernel_steered_connections: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WakeReport {
    pub size_bytes: u64,
    /// Medians over the repeats.
    pub torpor_wake_s: Option<f64>,
    pub torpor_wake_p99_s: Option<f64>,
    pub cold_start_s: Option<f64>,
    pub stock_criu_restore_s: Option<f64>,
    pub ratio_to_cold_start: Option<f64>,
    pub ratio_to_stock_criu: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GateReport {
    pub warm: WarmReport,
    pub wake: Vec<WakeReport>,
}

/// A `torpor up` with one sample service, run in-process.
struct OneService {
    gate: SocketAddr,
    backend: SocketAddr,
    up: InProcessUp,
}

impl OneService {
    async fn start(
        exe: &Path,
        criu: &CriuBinary,
        memory: u64,
        idle: &str,
    ) -> Result<OneService, ExperimentError> {
        let (port, backend) = (own_addr()?, own_addr()?);
        let cfg = format!(
            "[pool]\ncapacity = \"{}\"\nephemeral = true\n[status]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"bench\"\ncommand = [\"{}\", \"sample-service\", \"--listen\", \"{backend}\", \"--memory\", \"{memory}\"]\nlisten = \"{port}\"\nbackend = \"{backend}\"\nstart_timeout = \"120s\"\n[service.policy]\nidle_threshold = \"{idle}\"\nmax_sleep_rate = 1000000.0\n",
            memory + (256 << 20),
            exe.display()
        );
        let config = torpor_up::Config::from_toml(&cfg)?;
        Ok(OneService {
            gate: port,
            backend,
            up: InProcessUp::start(config, criu.clone()).await?,
        })
    }

    async fn wait_asleep(&self) -> Result<(), ExperimentError> {
        // A 1 GiB checkpoint takes seconds here; ten minutes means it never will.
        self.up
            .wait_status("bench", "asleep", Duration::from_secs(600), |s| {
                s.state == ServiceState::Asleep
            })
            .await
            .map(|_| ())
    }

    async fn stop(self) -> Result<(), ExperimentError> {
        self.up.stop().await
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

async fn get(client: &HttpClient, uri: &hyper::Uri) -> bool {
    match client.get(uri.clone()).await {
        Ok(r) if r.status() == 200 => http_body_util::BodyExt::collect(r.into_body())
            .await
            .is_ok(),
        _ => false,
    }
}

/// One way to the service, with a client of its own: a connection keeps the way it was
/// opened on (one opened to the gate stays with the gate when steering is switched on), so
/// each route's client opens connections only while its route is set up.
struct Route {
    addr: SocketAddr,
    /// Whether the gate's address is steered to the service while this route runs.
    steered: bool,
    client: HttpClient,
    histogram: Histogram<u64>,
    errors: u64,
    busy: Duration,
    max_rates: Vec<f64>,
}

impl Route {
    fn new(addr: SocketAddr, steered: bool) -> Route {
        Route {
            addr,
            steered,
            client: Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>(),
            histogram: Histogram::<u64>::new(3).expect("histogram"),
            errors: 0,
            busy: Duration::ZERO,
            max_rates: Vec::new(),
        }
    }

    fn uri(&self) -> hyper::Uri {
        format!("http://{}/ping", self.addr).parse().expect("uri")
    }

    fn result(&self) -> LoadResult {
        let h = &self.histogram;
        LoadResult {
            p50_us: (!h.is_empty()).then(|| h.value_at_quantile(0.5) as f64),
            p99_us: (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64),
            achieved_rate: h.len() as f64 / self.busy.as_secs_f64().max(1e-9),
            errors: self.errors,
        }
    }
}

/// Open loop for one slice: requests leave on a Poisson schedule at `rate` for `duration`,
/// whatever the answers do; latencies go into the route's histogram.
async fn open_loop(route: &mut Route, rate: f64, duration: Duration, rng: &mut SmallRng) {
    let uri = route.uri();
    let start = Instant::now();
    let mut next = start;
    let mut tasks = Vec::new();
    while next < start + duration {
        tokio::time::sleep_until(next).await;
        let (client, uri) = (route.client.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let ok = get(&client, &uri).await;
            (ok, t0.elapsed())
        }));
        next += Duration::from_secs_f64(-rng.gen::<f64>().max(1e-12).ln() / rate);
    }
    for t in tasks {
        let (ok, lat) = t.await.expect("request task panicked");
        if ok {
            let _ = route.histogram.record(lat.as_micros().max(1) as u64);
        } else {
            route.errors += 1;
        }
    }
    route.busy += start.elapsed();
}

/// Closed loop with `workers` concurrent requesters for `duration`: the sustained rate.
async fn max_rate(route: &Route, workers: usize, duration: Duration) -> f64 {
    let uri = route.uri();
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, uri) = (route.client.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                if get(&client, &uri).await {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("worker panicked");
    }
    total as f64 / duration.as_secs_f64()
}

/// Median over rounds of `of`'s highest rate over `to`'s in the same round.
fn paired_ratio(of: &Route, to: &Route) -> f64 {
    let ratios: Vec<f64> = of
        .max_rates
        .iter()
        .zip(&to.max_rates)
        .map(|(a, b)| a / b.max(1e-9))
        .collect();
    median(&ratios).unwrap_or(0.0)
}

/// Slices each open-loop load is cut into; the routes take turns slice by slice (each slice
/// starting with the next route), so a burst of load from elsewhere on the machine falls on
/// all of them alike.
const SLICES: u32 = 10;
/// Length of one closed-loop round; there are 3 × `--repeat` rounds per route, in turns.
const ROUND: Duration = Duration::from_secs(1);

/// Runs the benchmark and prints the tables (or JSON).
pub fn run(criu: &CriuBinary, args: &GateArgs) -> Result<(), ExperimentError> {
    crate::harness::become_subreaper()?;
    let exe = std::env::current_exe()?;
    let quiet = args.json;
    let say = move |m: String| {
        if !quiet {
            eprintln!("bench gate: {m}");
        }
    };
    // The warm part in a network namespace of its own: a thread that enters it before its
    // runtime starts, so the runtime's threads and the service it spawns are all inside.
    let warm = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<WarmReport, ExperimentError> {
                torpor_steer::netns::enter_private()?;
                let rt = tokio::runtime::Runtime::new()?;
                rt.block_on(measure_warm(criu, &exe, args, &say))
            })
            .join()
            .expect("warm measurement panicked")
    })?;
    let rt = tokio::runtime::Runtime::new()?;
    let wake = rt.block_on(measure_wake(criu, &exe, args, &say))?;
    let report = GateReport { warm, wake };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        print_report(&report);
    }
    Ok(())
}

fn added(path: Option<f64>, direct: Option<f64>) -> Option<f64> {
    Some(path? - direct?)
}

async fn measure_warm(
    criu: &CriuBinary,
    exe: &Path,
    args: &GateArgs,
    say: &impl Fn(String),
) -> Result<WarmReport, ExperimentError> {
    say(format!(
        "warm overhead at {} req/s for {:?}: direct, through the gate, kernel-steered",
        args.rate, args.duration
    ));
    let svc = OneService::start(exe, criu, 16 << 20, "1h").await?;
    let SocketAddr::V4(public) = svc.gate else {
        return Err(ExperimentError::Mismatch("gate is not IPv4".into()));
    };
    let steering = KernelSteering::attach_here(public)?;
    let (pid, backend) = service_socket(&svc)?;
    let mut routes = [
        Route::new(svc.backend, false),
        Route::new(svc.gate, false),
        Route::new(svc.gate, true),
    ];
    // Taken once from the service's process, as the agent takes it, so that switching
    // routes is one map update and costs every route alike.
    let listener = torpor_steer::socket::service_listener(Path::new("/proc"), pid, backend)?;
    let set = |route: &Route| {
        if route.steered {
            steering.steer_to(listener.as_fd())
        } else {
            steering.unsteer()
        }
    };
    let mut rng = SmallRng::seed_from_u64(1);
    for route in routes.iter_mut() {
        set(route)?;
        // Warm each route's connection pool so all start equal.
        for _ in 0..8 {
            get(&route.client, &route.uri()).await;
        }
    }
    for slice in 0..SLICES {
        // Each slice starts with the next route: none always follows the gate's work.
        for i in 0..routes.len() {
            let route = &mut routes[(i + slice as usize) % 3];
            set(route)?;
            open_loop(route, args.rate, args.duration / SLICES, &mut rng).await;
        }
    }
    let rounds = 3 * args.repeat;
    say(format!(
        "highest sustained rate (closed loop, 16 workers, {rounds} rounds of {ROUND:?} each, in turns)"
    ));
    for round in 0..rounds {
        for i in 0..routes.len() {
            let route = &mut routes[(i + round as usize) % 3];
            set(route)?;
            let r = max_rate(route, 16, ROUND).await;
            route.max_rates.push(r);
        }
    }
    let kernel_steered_connections = steering.steered()?;
    drop(steering);
    svc.stop().await?;
    let [max_direct, max_gate, max_kernel] = routes
        .each_ref()
        .map(|r| median(&r.max_rates).unwrap_or(0.0));
    let [direct, gate, kernel] = routes.each_ref().map(Route::result);
    Ok(WarmReport {
        offered_rate: args.rate,
        added_p50_us: added(gate.p50_us, direct.p50_us),
        p99_ratio: ratio(gate.p99_us, direct.p99_us),
        added_p50_kernel_us: added(kernel.p50_us, direct.p50_us),
        p99_kernel_ratio: ratio(kernel.p99_us, direct.p99_us),
        direct,
        gate,
        kernel,
        max_rate_direct: max_direct,
        max_rate_gate: max_gate,
        max_rate_kernel: max_kernel,
        max_rate_ratio: paired_ratio(&routes[1], &routes[0]),
        max_rate_kernel_ratio: paired_ratio(&routes[2], &routes[0]),
        kernel_steered_connections,
    })
}

/// The sample service's pid and address, where its listening socket is found.
fn service_socket(svc: &OneService) -> Result<(i32, SocketAddrV4), ExperimentError> {
    let pid = svc
        .up
        .status("bench")?
        .pid
        .ok_or_else(|| ExperimentError::Mismatch("the awake service has no pid".into()))?;
    let SocketAddr::V4(backend) = svc.backend else {
        return Err(ExperimentError::Mismatch("backend is not IPv4".into()));
    };
    Ok((pid, backend))
}

async fn measure_wake(
    criu: &CriuBinary,
    exe: &Path,
    args: &GateArgs,
    say: &impl Fn(String),
) -> Result<Vec<WakeReport>, ExperimentError> {
    let mut wake = Vec::new();
    for &size in &args.sizes {
        say(format!(
            "wake latency at {}: {} wakes through the gate",
            format_bytes(size),
            args.repeat
        ));
        let svc = OneService::start(exe, criu, size, "200ms").await?;
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri: hyper::Uri = format!("http://{}/ping", svc.gate).parse().expect("uri");
        let mut wakes = Vec::new();
        for _ in 0..args.repeat {
            svc.wait_asleep().await?;
            tokio::time::sleep(args.asleep_for).await;
            let t0 = Instant::now();
            if !get(&client, &uri).await {
                return Err(ExperimentError::Mismatch(
                    "a request to the sleeping service failed".into(),
                ));
            }
            wakes.push(t0.elapsed().as_secs_f64());
        }
        svc.stop().await?;
        say(format!(
            "{}: cold starts and stock CRIU restores from {}",
            format_bytes(size),
            args.baseline_dir.display()
        ));
        let mut cold = Vec::new();
        let mut stock = Vec::new();
        for i in 0..args.repeat {
            let exe2 = exe.to_path_buf();
            let c = tokio::task::spawn_blocking(move || -> Result<f64, ExperimentError> {
                let t0 = std::time::Instant::now();
                let svc = SampleProcess::spawn(&exe2, size, i)?;
                Ok(first_response(svc.addr, t0)?.as_secs_f64())
            })
            .await
            .expect("cold start task panicked")?;
            cold.push(c);
            let (criu2, exe2, dir) = (criu.clone(), exe.to_path_buf(), args.baseline_dir.clone());
            let asleep = args.asleep_for;
            let s = tokio::task::spawn_blocking(move || {
                stock_criu_round(&criu2, &exe2, &dir, size, i, asleep, first_response)
            })
            .await
            .expect("stock task panicked")?;
            stock.push(s.first_response_s);
        }
        let mut sorted = wakes.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        let w = median(&wakes);
        let (c, s) = (median(&cold), median(&stock));
        wake.push(WakeReport {
            size_bytes: size,
            torpor_wake_s: w,
            torpor_wake_p99_s: sorted.last().copied(),
            cold_start_s: c,
            stock_criu_restore_s: s,
            ratio_to_cold_start: ratio(w, c),
            ratio_to_stock_criu: ratio(w, s),
        });
    }
    Ok(wake)
}

fn print_report(r: &GateReport) {
    let w = &r.warm;
    println!(
        "warm overhead, open loop at {} req/s (Poisson):",
        w.offered_rate
    );
    println!(
        "  {:<8} {:>10} {:>10} {:>12} {:>7}",
        "", "p50", "p99", "achieved/s", "errors"
    );
    for (name, l) in [
        ("direct", &w.direct),
        ("gate", &w.gate),
        ("kernel", &w.kernel),
    ] {
        println!(
            "  {:<8} {:>10} {:>10} {:>12.0} {:>7}",
            name,
            fmt_opt(l.p50_us, 0, "us"),
            fmt_opt(l.p99_us, 0, "us"),
            l.achieved_rate,
            l.errors
        );
    }
    println!(
        "  added p50 {}, p99 ratio {}; highest sustained rate: direct {:.0}/s, gate {:.0}/s, ratio {:.2}",
        fmt_opt(w.added_p50_us, 0, "us"),
        fmt_opt(w.p99_ratio, 2, ""),
        w.max_rate_direct,
        w.max_rate_gate,
        w.max_rate_ratio
    );
    println!(
        "  kernel steering: added p50 {}, p99 ratio {}; highest sustained rate {:.0}/s, ratio {:.2} ({} connections steered)",
        fmt_opt(w.added_p50_kernel_us, 0, "us"),
        fmt_opt(w.p99_kernel_ratio, 2, ""),
        w.max_rate_kernel,
        w.max_rate_kernel_ratio,
        w.kernel_steered_connections
    );
    println!("wake latency: first response for a request that finds the service asleep (median of runs):");
    println!(
        "  {:>9} {:>10} {:>10} {:>11} {:>12} {:>9} {:>9}",
        "size", "torpor", "worst", "cold start", "stock CRIU", "/cold", "/stock"
    );
    for k in &r.wake {
        println!(
            "  {:>9} {:>10} {:>10} {:>11} {:>12} {:>9} {:>9}",
            format_bytes(k.size_bytes),
            fmt_opt(k.torpor_wake_s.map(|v| v * 1e3), 1, "ms"),
            fmt_opt(k.torpor_wake_p99_s.map(|v| v * 1e3), 1, "ms"),
            fmt_opt(k.cold_start_s.map(|v| v * 1e3), 1, "ms"),
            fmt_opt(k.stock_criu_restore_s.map(|v| v * 1e3), 1, "ms"),
            fmt_opt(k.ratio_to_cold_start, 2, ""),
            fmt_opt(k.ratio_to_stock_criu, 2, ""),
        );
    }
    println!("  stock CRIU = restore from /dev/shm until the first answer, no gate, after the same time asleep; cold start = spawn until the first answer");
}
