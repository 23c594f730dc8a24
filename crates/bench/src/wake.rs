//! `torpor bench wake`: the first response after a sleep, for a real server (nginx from apt,
//! master + 2 workers, serving a 100 kB page) behind `torpor up` run in-process, next to stock
//! CRIU restoring the same server from /dev/shm in the same run.
//!
//! * torpor: N times, wait until the agent reports the service asleep (checkpointed into the
//!   pool), then time one request through the gate until its whole body has arrived and
//!   matches the page. For each wake the agent's own timeline (restore start, CRIU done,
//!   accepting, released) is read from its status. A wake that was a cold start does not
//!   measure a restore: any makes the run invalid (and says so).
//! * stock CRIU: a second copy of the same nginx config (its own port and files), started the
//!   way the agent starts a service (torpor's own init as PID 1 of a new PID namespace, in its
//!   own session; no cgroup), is dumped with `criu dump` into a fresh directory in /dev/shm
//!   and restored with `criu restore -d`; the time runs from the restore's start until the
//!   same request's whole, checked body. Each round dumps the tree the previous round
//!   restored, as torpor checkpoints the tree it restored: both sides restore a freshly
//!   dumped image of an already restored nginx, and neither keeps a connection open across
//!   the dump.
//!
//! The two sides alternate within each round (stock CRIU while torpor's nginx sleeps, then
//! torpor's wake), so load from anything else on the machine falls on both alike.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde::Serialize;
use torpor_agent::{InitOptions, ProcessLaunch, ServiceState, WakeTimeline};
use torpor_criu::{local, CriuBinary};
use torpor_image::format_bytes;

use crate::{
    harness::{become_subreaper, kill_and_reap, own_addr},
    inproc::InProcessUp,
    report::{fmt_opt, median, ratio},
    ExperimentError,
};

/// zeropod's restore time, the reference the issue measures against.
pub const ZEROPOD_RESTORE_MS: f64 = 127.0;
/// Where [`ZEROPOD_RESTORE_MS`] comes from.
pub const ZEROPOD_SOURCE: &str =
    "zeropod (github.com/ctrox/zeropod, CRIU-based scale-to-zero containerd shim): published restore time";

/// The service's name under `torpor up`.
const NAME: &str = "web";
/// Size of the page every request fetches and checks.
const PAGE_BYTES: usize = 100_000;
/// Idle time before the agent puts the service to sleep (as in the nginx check).
const IDLE: &str = "500ms";
/// Generous bounds for conditions that take well under a second here.
const SLEEP_WITHIN: Duration = Duration::from_secs(60);
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// The servers the benchmark knows how to set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Server {
    /// nginx from apt (nginx-light): master + 2 workers.
    Nginx,
}

/// Arguments of `torpor bench wake`.
#[derive(Debug, Clone, clap::Args)]
pub struct WakeArgs {
    #[arg(long, value_enum, default_value_t = Server::Nginx)]
    pub server: Server,
    /// Sleeps (and stock-CRIU rounds); 10 by default, 3 with --quick.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub sleeps: Option<u64>,
    /// 3 sleeps unless --sleeps says otherwise.
    #[arg(long)]
    pub quick: bool,
    /// Directory for the stock-CRIU baseline's images (a tmpfs).
    #[arg(long, default_value = "/dev/shm")]
    pub baseline_dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

impl WakeArgs {
    fn sleeps(&self) -> u64 {
        self.sleeps.unwrap_or(if self.quick { 3 } else { 10 })
    }
}

/// p50, worst and every sample, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub p50_ms: Option<f64>,
    pub worst_ms: Option<f64>,
    pub samples_ms: Vec<f64>,
}

impl Figures {
    fn of(samples: Vec<f64>) -> Figures {
        Figures {
            p50_ms: median(&samples),
            worst_ms: samples.iter().copied().reduce(f64::max),
            samples_ms: samples,
        }
    }
}

/// One wake through the gate.
#[derive(Debug, Clone, Serialize)]
pub struct TorporWake {
    /// Client side, from sending the request: response head received.
    pub first_byte_ms: f64,
    /// Client side: the whole body received (and checked).
    pub first_response_ms: f64,
    /// The agent's side, in ms from when it saw the wake request.
    pub timeline: WakeTimeline,
    /// The checkpoint this wake restored.
    pub checkpoint_s: Option<f64>,
    pub snapshot_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TorporSide {
    pub method: String,
    pub first_response: Figures,
    pub first_byte: Figures,
    pub wakes: Vec<TorporWake>,
    /// Wakes that cold-started the command instead of restoring (0 in a valid run).
    pub cold_starts: u64,
}

/// One stock-CRIU round.
#[derive(Debug, Clone, Serialize)]
pub struct StockWake {
    pub dump_s: f64,
    pub frozen_s: Option<f64>,
    /// `criu restore -d` until it exited.
    pub restore_s: f64,
    /// From the restore's start: response head received.
    pub first_byte_ms: f64,
    /// From the restore's start: the whole body received (and checked).
    pub first_response_ms: f64,
    pub image_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StockSide {
    pub method: String,
    pub images_dir: PathBuf,
    pub started_by: String,
    pub first_response: Figures,
    pub rounds: Vec<StockWake>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    pub name: String,
    pub restore_ms: f64,
    pub source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct WakeReport {
    pub server: String,
    pub criu_version: String,
    pub page_bytes: usize,
    pub sleeps: u64,
    pub torpor: TorporSide,
    pub stock_criu: StockSide,
    /// torpor p50 / stock CRIU p50 of the first response (below 1: torpor is faster).
    pub ratio_p50: Option<f64>,
    pub reference: Reference,
    /// Every wake was a restore caused by the request.
    pub valid: bool,
    pub warnings: Vec<String>,
}

/// nginx's files in a temporary directory: config, page, logs, pid file, temp paths.
struct NginxSite {
    dir: tempfile::TempDir,
    nginx: PathBuf,
    backend: SocketAddr,
    page: Bytes,
    version: String,
}

impl NginxSite {
    fn create() -> Result<NginxSite, ExperimentError> {
        let nginx = find_program("nginx").ok_or_else(|| {
            ExperimentError::Mismatch(
                "nginx not found on PATH or in /usr/sbin (apt-get install nginx-light)".into(),
            )
        })?;
        let out = Command::new(&nginx).arg("-v").output()?;
        let version = String::from_utf8_lossy(&out.stderr)
            .trim()
            .trim_start_matches("nginx version: ")
            .to_string();
        let dir = tempfile::Builder::new()
            .prefix("torpor-bench-wake-")
            .tempdir()?;
        let d = dir.path();
        // Printable, so the page is a plausible static file; seeded, so runs serve the same.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut rng = SmallRng::seed_from_u64(7);
        let page: Vec<u8> = (0..PAGE_BYTES)
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
            .collect();
        std::fs::create_dir(d.join("www"))?;
        std::fs::write(d.join("www/index.html"), &page)?;
        let backend = own_addr()?;
        let p = d.display();
        std::fs::write(
            d.join("nginx.conf"),
            format!(
                "daemon off;\nuser root;\nworker_processes 2;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\n\
                 events {{ worker_connections 128; }}\n\
                 http {{\n    access_log off;\n    client_body_temp_path {p}/body;\n    proxy_temp_path {p}/proxy;\n    \
                 fastcgi_temp_path {p}/fastcgi;\n    uwsgi_temp_path {p}/uwsgi;\n    scgi_temp_path {p}/scgi;\n    \
                 server {{ listen {backend}; root {p}/www; }}\n}}\n"
            ),
        )?;
        Ok(NginxSite {
            dir,
            nginx,
            backend,
            page: page.into(),
            version,
        })
    }

    fn argv(&self) -> Vec<String> {
        vec![
            self.nginx.display().to_string(),
            "-c".into(),
            self.dir.path().join("nginx.conf").display().to_string(),
        ]
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Client-side times of one request.
struct Fetched {
    first_byte: Duration,
    full: Duration,
}

/// GET / on a new connection that is closed afterwards (nothing of the client stays open into
/// the next sleep or dump), timed from `since`; the answer must be 200 with the page.
async fn get_page(addr: SocketAddr, page: &Bytes, since: Instant) -> Result<Fetched, String> {
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Empty<Bytes>>();
    let uri: hyper::Uri = format!("http://{addr}/").parse().expect("uri");
    let resp = tokio::time::timeout(ANSWER_WITHIN, client.get(uri))
        .await
        .map_err(|_| format!("no answer from {addr} within {ANSWER_WITHIN:?}"))?
        .map_err(|e| format!("request to {addr} failed: {e}"))?;
    let first_byte = since.elapsed();
    let status = resp.status();
    let body = tokio::time::timeout(ANSWER_WITHIN, resp.into_body().collect())
        .await
        .map_err(|_| format!("body from {addr} incomplete after {ANSWER_WITHIN:?}"))?
        .map_err(|e| format!("reading the body from {addr} failed: {e}"))?
        .to_bytes();
    let full = since.elapsed();
    if status != 200 {
        return Err(format!("{addr} answered {status}"));
    }
    if body != *page {
        return Err(format!(
            "{addr} answered {} bytes that are not the page ({} bytes)",
            body.len(),
            page.len()
        ));
    }
    Ok(Fetched { first_byte, full })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the benchmark and prints the report (or JSON).
pub fn run(criu: &CriuBinary, args: &WakeArgs) -> Result<(), ExperimentError> {
    // Restored trees (the baseline's) must come back to us to be reaped.
    become_subreaper()?;
    let _cache = crate::harness::criu_cache(criu);
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(measure(criu, args))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        print_report(&report);
    }
    for w in &report.warnings {
        eprintln!("bench wake: WARNING: {w}");
    }
    Ok(())
}

/// Both sides in the same rounds, each on its own copy of the site (own port and files).
pub async fn measure(criu: &CriuBinary, args: &WakeArgs) -> Result<WakeReport, ExperimentError> {
    // Only nginx so far; another server needs its own site set-up here.
    match args.server {
        Server::Nginx => {}
    }
    let n = args.sleeps();
    let criu_version = criu.version()?;
    let (ours, theirs) = (NginxSite::create()?, NginxSite::create()?);
    let bar = ProgressBar::new(2 * n).with_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_prefix("bench wake");
    bar.set_message("starting torpor up with nginx");
    let up = start_torpor(criu, &ours).await?;
    let result = rounds(criu, &up, &ours, &theirs, &args.baseline_dir, n, &bar).await;
    // Stopped on every path, so no nginx outlives the benchmark.
    let stopped = up.stop().await;
    let (torpor, stock) = result?;
    stopped?;
    bar.finish_and_clear();

    let mut warnings = Vec::new();
    if torpor.cold_starts > 0 {
        warnings.push(format!(
            "{} of {n} wakes were cold starts, not restores: this run does not measure restore",
            torpor.cold_starts
        ));
    }
    let not_restores = torpor
        .wakes
        .iter()
        .filter(|w| w.timeline.how != "restore" || w.timeline.cause != "request")
        .count();
    if not_restores > 0 {
        warnings.push(format!(
            "{not_restores} of {n} wakes were not restores caused by the request (see each timeline's cause and how)"
        ));
    }
    Ok(WakeReport {
        server: format!("{} (master + 2 workers)", ours.version),
        criu_version,
        page_bytes: ours.page.len(),
        sleeps: n,
        ratio_p50: ratio(torpor.first_response.p50_ms, stock.first_response.p50_ms),
        valid: torpor.cold_starts == 0 && not_restores == 0,
        torpor,
        stock_criu: stock,
        reference: Reference {
            name: "zeropod".into(),
            restore_ms: ZEROPOD_RESTORE_MS,
            source: ZEROPOD_SOURCE.into(),
        },
        warnings,
    })
}

async fn start_torpor(criu: &CriuBinary, site: &NginxSite) -> Result<InProcessUp, ExperimentError> {
    let argv = site
        .argv()
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let cfg = format!(
        "[pool]\ncapacity = \"128MiB\"\nephemeral = true\n[status]\nlisten = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"{NAME}\"\ncommand = [{argv}]\nlisten = \"{}\"\n\
         backend = \"{}\"\nprotocol = \"http\"\nstart_timeout = \"30s\"\n\
         [service.policy]\nidle_threshold = \"{IDLE}\"\nmax_sleep_rate = 1000000.0\n",
        // Port 0 for both the status and the gate is refused as one address used twice.
        own_addr()?,
        site.backend
    );
    let mut config = torpor_up::Config::from_toml(&cfg)?;
    // Requests come at regular gaps here, which the policy would learn and pre-warm ahead
    // of: then the timed request would find nginx awake and measure no wake at all.
    for s in &mut config.services {
        s.spec.policy.prewarm_min_samples = u64::MAX;
    }
    InProcessUp::start(config, criu.clone()).await
}

/// N rounds; in each, once torpor's nginx is asleep, a stock-CRIU round and then the torpor
/// wake, back to back. Interleaved rather than one side after the other, so that whatever
/// else the machine does (a build, another benchmark) falls on both sides alike; stock CRIU
/// goes while torpor's nginx sleeps, so neither side's work overlaps the other's timing.
async fn rounds(
    criu: &CriuBinary,
    up: &InProcessUp,
    ours: &NginxSite,
    theirs: &NginxSite,
    dir: &Path,
    n: u64,
    bar: &ProgressBar,
) -> Result<(TorporSide, StockSide), ExperimentError> {
    let gate = up
        .info()
        .services
        .iter()
        .find(|(name, _)| name == NAME)
        .map(|(_, a)| *a)
        .ok_or_else(|| ExperimentError::Mismatch("torpor up has no gate for nginx".into()))?;
    // Both set-ups serve the page before anything is timed.
    get_page(gate, &ours.page, Instant::now())
        .await
        .map_err(|e| ExperimentError::Mismatch(format!("nginx through the gate, awake: {e}")))?;
    bar.set_message("stock CRIU: starting nginx");
    let mut stock = StockNginx::start(theirs).await?;
    let start = up.status(NAME)?;
    let (mut wakes, mut stock_rounds) = (Vec::new(), Vec::new());
    for i in 1..=n {
        bar.set_message(format!(
            "round {i}/{n}: waiting for torpor's nginx to sleep"
        ));
        let asleep = up
            .wait_status(NAME, "asleep", SLEEP_WITHIN, |s| {
                matches!(s.state, ServiceState::Asleep | ServiceState::Failed)
            })
            .await?;
        if asleep.state == ServiceState::Failed {
            // Nothing more will happen; the agent's log says why.
            return Err(ExperimentError::Mismatch(format!(
                "nginx failed under torpor before sleep {i} ({} cold starts, {} restarts)",
                asleep.cold_starts, asleep.restarts
            )));
        }
        bar.set_message(format!("round {i}/{n}: stock CRIU"));
        stock_rounds.push(stock.round(criu, dir, i).await?);
        bar.inc(1);
        bar.set_message(format!("round {i}/{n}: torpor wake"));
        let t0 = Instant::now();
        let got = get_page(gate, &ours.page, t0).await.map_err(|e| {
            ExperimentError::Mismatch(format!("first request after sleep {i}: {e}"))
        })?;
        // The agent records the timeline just after it releases the held request, so it can
        // lag the response by a moment.
        let before = asleep.last_wake.clone();
        let woke = up
            .wait_status(NAME, "done with its wake", ANSWER_WITHIN, |s| {
                s.last_wake.is_some() && s.last_wake != before
            })
            .await?;
        wakes.push(TorporWake {
            first_byte_ms: ms(got.first_byte),
            first_response_ms: ms(got.full),
            timeline: woke.last_wake.expect("waited for it"),
            checkpoint_s: asleep.last_checkpoint_s,
            snapshot_bytes: asleep.snapshot_bytes,
        });
        bar.inc(1);
    }
    let end = up.status(NAME)?;
    stock.stop().await;
    let torpor = TorporSide {
        method: format!(
            "torpor up in-process: wait until the agent reports nginx asleep (checkpointed into the pool, idle threshold {IDLE}), then GET / through the gate on a new connection until the whole body, checked"
        ),
        first_response: Figures::of(wakes.iter().map(|w| w.first_response_ms).collect()),
        first_byte: Figures::of(wakes.iter().map(|w| w.first_byte_ms).collect()),
        cold_starts: end.cold_starts.saturating_sub(start.cold_starts),
        wakes,
    };
    let stock = StockSide {
        method: format!(
            "criu dump into a fresh directory in {}, then criu restore -d from it, timed until GET / on a new connection has the whole body, checked; each round dumps the tree the previous round restored, while torpor's nginx sleeps",
            dir.display()
        ),
        images_dir: dir.to_path_buf(),
        started_by: "torpor's own init (torpor __service-init: PID 1 of a new PID namespace, own session), no cgroup".into(),
        first_response: Figures::of(stock_rounds.iter().map(|r| r.first_response_ms).collect()),
        rounds: stock_rounds,
    };
    Ok((torpor, stock))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ExperimentError> + Send + 'static,
) -> Result<T, ExperimentError> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

/// Waits until something accepts on `addr` (CRIU returned, but a probe costs nothing when the
/// listener is back, and the agent's wake probes the same way before it releases).
async fn wait_listening(addr: SocketAddr, since: Instant) -> Result<(), ExperimentError> {
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if since.elapsed() > ANSWER_WITHIN {
            return Err(ExperimentError::Mismatch(format!(
                "nothing accepts on {addr} after {ANSWER_WITHIN:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// The baseline's nginx: started once, then dumped and restored by stock CRIU each round.
/// Killed and reaped when dropped (the restored init is our child: we are the subreaper).
struct StockNginx<'a> {
    site: &'a NginxSite,
    pid: Option<i32>,
}

impl<'a> StockNginx<'a> {
    async fn start(site: &'a NginxSite) -> Result<StockNginx<'a>, ExperimentError> {
        let launch = ProcessLaunch {
            argv: site.argv(),
            env: Default::default(),
            cpus: Vec::new(),
            init: InitOptions::default(),
        };
        let exe = std::env::current_exe()?;
        let pid = blocking(move || {
            launch
                .spawn(&exe, None)
                .map_err(|e| ExperimentError::Mismatch(format!("starting nginx: {e}")))
        })
        .await?;
        let me = StockNginx {
            site,
            pid: Some(pid),
        };
        let t0 = Instant::now();
        wait_listening(site.backend, t0).await?;
        get_page(site.backend, &site.page, t0)
            .await
            .map_err(|e| ExperimentError::Mismatch(format!("nginx before its first dump: {e}")))?;
        Ok(me)
    }

    /// Dump into a fresh directory under `dir`, restore from it, first checked response.
    async fn round(
        &mut self,
        criu: &CriuBinary,
        dir: &Path,
        i: u64,
    ) -> Result<StockWake, ExperimentError> {
        let images = tempfile::Builder::new()
            .prefix("torpor-bench-wake-")
            .tempdir_in(dir)?;
        let pid = self.pid.expect("a live tree");
        let (c, d) = (criu.clone(), images.path().to_path_buf());
        let dump = blocking(move || Ok(local::dump_to_dir(&c, pid, &d)?)).await?;
        // CRIU killed the tree; reap its init now, not at the end.
        self.pid = None;
        blocking(move || {
            kill_and_reap(pid);
            Ok(())
        })
        .await?;
        let (c, d) = (criu.clone(), images.path().to_path_buf());
        let t0 = Instant::now();
        // No PIDs to wait for: the tree restores into a fresh PID namespace.
        let (restored, restore_wall) =
            blocking(move || Ok(local::restore_from_dir(&c, &d, &[])?)).await?;
        self.pid = Some(restored);
        wait_listening(self.site.backend, t0).await?;
        let got = get_page(self.site.backend, &self.site.page, t0)
            .await
            .map_err(|e| {
                ExperimentError::Mismatch(format!("first request after stock restore {i}: {e}"))
            })?;
        Ok(StockWake {
            dump_s: dump.wall.as_secs_f64(),
            frozen_s: dump.frozen.map(|f| f.as_secs_f64()),
            restore_s: restore_wall.as_secs_f64(),
            first_byte_ms: ms(got.first_byte),
            first_response_ms: ms(got.full),
            image_bytes: dump.bytes,
        })
    }

    async fn stop(mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = blocking(move || {
                kill_and_reap(pid);
                Ok(())
            })
            .await;
        }
    }
}

impl Drop for StockNginx<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            kill_and_reap(pid);
        }
    }
}

fn opt_ms(v: Option<f64>) -> String {
    fmt_opt(v, 1, " ms")
}

fn print_report(r: &WakeReport) {
    let t = &r.torpor;
    println!(
        "first response after a sleep: {}, a {} page, CRIU {}",
        r.server,
        format_bytes(r.page_bytes as u64),
        r.criu_version
    );
    println!("torpor (through the gate; client times from the request, agent times from when it saw the wake):");
    println!(
        "  {:>4} {:>10} {:>10} | {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}  how",
        "wake",
        "1st byte",
        "response",
        "restore",
        "CRIU done",
        "accepting",
        "released",
        "checkpoint",
        "snapshot"
    );
    for (i, w) in t.wakes.iter().enumerate() {
        let tl = &w.timeline;
        println!(
            "  {:>4} {:>10} {:>10} | {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}  {} ({})",
            i + 1,
            format!("{:.1} ms", w.first_byte_ms),
            format!("{:.1} ms", w.first_response_ms),
            format!("{:.1}", tl.restore_start_ms),
            fmt_opt(tl.criu_done_ms, 1, ""),
            format!("{:.1}", tl.accepting_ms),
            format!("{:.1}", tl.released_ms),
            fmt_opt(w.checkpoint_s.map(|s| s * 1e3), 1, " ms"),
            w.snapshot_bytes.map(format_bytes).unwrap_or_default(),
            tl.how,
            tl.cause
        );
    }
    println!(
        "  first response p50 {}, worst {} over {} sleeps; cold starts {}",
        opt_ms(t.first_response.p50_ms),
        opt_ms(t.first_response.worst_ms),
        r.sleeps,
        t.cold_starts
    );
    let s = &r.stock_criu;
    println!(
        "stock CRIU (criu restore -d from {}, no gate; times from the restore's start):",
        s.images_dir.display()
    );
    println!(
        "  {:>5} {:>9} {:>9} {:>11} {:>10} {:>10} {:>9}",
        "round", "dump", "frozen", "restore -d", "1st byte", "response", "images"
    );
    for (i, w) in s.rounds.iter().enumerate() {
        println!(
            "  {:>5} {:>9} {:>9} {:>11} {:>10} {:>10} {:>9}",
            i + 1,
            format!("{:.1} ms", w.dump_s * 1e3),
            fmt_opt(w.frozen_s.map(|f| f * 1e3), 1, " ms"),
            format!("{:.1} ms", w.restore_s * 1e3),
            format!("{:.1} ms", w.first_byte_ms),
            format!("{:.1} ms", w.first_response_ms),
            format_bytes(w.image_bytes)
        );
    }
    println!(
        "  first response p50 {}, worst {}; nginx started by {}",
        opt_ms(s.first_response.p50_ms),
        opt_ms(s.first_response.worst_ms),
        s.started_by
    );
    println!(
        "torpor p50 / stock CRIU p50 = {} (below 1: torpor is faster)",
        fmt_opt(r.ratio_p50, 2, "")
    );
    println!(
        "reference: {} {:.0} ms — {}",
        r.reference.name, r.reference.restore_ms, r.reference.source
    );
    println!(
        "run {}",
        if r.valid {
            "valid: every wake was a restore caused by the request"
        } else {
            "INVALID: not every wake was a restore (see the warnings)"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_median_worst_and_samples() {
        let f = Figures::of(vec![30.0, 10.0, 20.0, 50.0]);
        assert_eq!(f.p50_ms, Some(25.0));
        assert_eq!(f.worst_ms, Some(50.0));
        assert_eq!(f.samples_ms.len(), 4);
        let none = Figures::of(Vec::new());
        assert_eq!((none.p50_ms, none.worst_ms), (None, None));
    }
}
