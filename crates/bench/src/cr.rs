//! `torpor bench cr`: for each size, a sample service holding that much random memory is
//! checkpointed and restored (a) by stock CRIU with images in a tmpfs directory (/dev/shm)
//! and (b) by torpor into and out of a pool on this machine (a `torpor pool` process on a
//! Unix socket, or behind a rate-limited network fabric with `--fabric`), eagerly, both ways
//! torpor restores eagerly (every page copied in through userfaultfd before the tasks run, its
//! default, and CRIU reading the pages itself with `--stream`, its fallback), in turns first;
//! then (c) torpor's lazy wakes and incremental checkpoints
//! ([`crate::lazywake`]) and (d) stock CRIU's own lazy restore from the directory, rotating the
//! order each repeat. Every first response is to the same request, which touches 16 MiB.
//! Reports medians and torpor/baseline.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use torpor_criu::{local, CheckpointOptions, CriuBinary, RestoreOptions};
use torpor_image::format_bytes;

use crate::{
    fabric::{FabricProfile, FabricReport},
    harness::{become_subreaper, criu_cache, kill_and_reap, PoolProcess, SampleProcess},
    lazywake::{self, touch_response, IncrementalMedians, LazyMedians, StockLazyMedians},
    report::{fmt_opt, median, ratio},
    ExperimentError,
};

/// Arguments of `torpor bench cr`.
#[derive(Debug, Clone, clap::Args)]
pub struct CrArgs {
    /// Memory sizes of the sample service, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64MiB,256MiB,1GiB", value_parser = torpor_image::size_arg)]
    pub sizes: Vec<u64>,
    /// Runs per size and method; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub repeat: u64,
    /// Directory for the baseline's images (a tmpfs).
    #[arg(long, default_value = "/dev/shm")]
    pub baseline_dir: PathBuf,
    /// Where torpor's pool runs: `local` (Unix socket), or in a network namespace behind a
    /// veth pair limited to 10 or 25 Gbit/s (TCP with TLS).
    #[arg(long, value_enum, default_value_t = FabricProfile::Local)]
    pub fabric: FabricProfile,
    #[arg(long)]
    pub json: bool,
}

/// One method's medians for one size.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Medians {
    pub checkpoint_s: Option<f64>,
    pub frozen_s: Option<f64>,
    pub restore_s: Option<f64>,
    pub first_response_s: Option<f64>,
    /// Torpor only: most image bytes held on the node at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_staging_bytes: Option<u64>,
    /// Torpor: bytes stored in the pool; baseline: bytes of images in the directory.
    pub image_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_bytes: Option<u64>,
    /// Torpor only: CPU seconds of one eager cycle (checkpoint, restore, the request):
    /// torpor, CRIU and the pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cycle_cpu_s: Option<f64>,
    /// Torpor only: the same snapshot restored by CRIU reading every page from the pool
    /// (`--stream`), the eager path where userfaultfd cannot be used; `restore_s` is the
    /// restore as torpor does it by default (every page copied in through userfaultfd
    /// before the tasks run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_streamed_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_response_streamed_s: Option<f64>,
}

/// torpor / baseline for each time.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub checkpoint: Option<f64>,
    pub frozen: Option<f64>,
    pub restore: Option<f64>,
    /// The restore with CRIU reading the pages (`--stream`) against the baseline.
    pub restore_streamed: Option<f64>,
    pub first_response: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    pub size_bytes: u64,
    pub repeat: u64,
    pub baseline: Medians,
    pub torpor: Medians,
    pub ratio: Ratios,
    /// What a `restore = "lazy"` service gets from its second sleep on with the defaults: the
    /// wake armed at sleep (restored and held before its tasks resume, the working set
    /// recorded at the previous wake already pushed), released by the request.
    pub lazy: LazyMedians,
    /// The same wake not armed (`arm = false`): CRIU runs on the request's time, the working
    /// set is pushed right after its finish marker.
    pub lazy_unarmed: LazyMedians,
    /// Lazy wake with nothing recorded yet and not armed (the first lazy wake after a full
    /// checkpoint, with `arm = false`).
    pub lazy_no_prefetch: LazyMedians,
    /// The checkpoint after one request following a lazy wake with prefetch.
    pub incremental: IncrementalMedians,
    /// Stock CRIU's own lazy-pages daemon restoring from the baseline's directory.
    pub stock_lazy: StockLazyMedians,
}

#[derive(Debug, Clone, Serialize)]
pub struct CrReport {
    pub fabric: FabricReport,
    pub baseline: String,
    pub criu_version: String,
    /// How CRIU found its kernel-feature cache in this run (`None`: it probed at every start).
    pub criu_cache: Option<torpor_criu::kdat::KdatMode>,
    pub sizes: Vec<SizeResult>,
}

#[derive(Default)]
struct Samples {
    checkpoint: Vec<f64>,
    frozen: Vec<f64>,
    restore: Vec<f64>,
    first: Vec<f64>,
    staging: Vec<u64>,
    bytes: Vec<u64>,
    cpu: Vec<f64>,
    streamed: Vec<f64>,
    streamed_first: Vec<f64>,
}

impl Samples {
    fn medians(&self, torpor: bool) -> Medians {
        let med_u =
            |v: &[u64]| median(&v.iter().map(|x| *x as f64).collect::<Vec<_>>()).map(|m| m as u64);
        Medians {
            checkpoint_s: median(&self.checkpoint),
            frozen_s: median(&self.frozen),
            restore_s: median(&self.restore),
            first_response_s: median(&self.first),
            peak_staging_bytes: if torpor {
                self.staging.iter().max().copied()
            } else {
                None
            },
            image_bytes: med_u(&self.bytes),
            pool_bytes: if torpor { med_u(&self.bytes) } else { None },
            cycle_cpu_s: median(&self.cpu),
            restore_streamed_s: median(&self.streamed),
            first_response_streamed_s: median(&self.streamed_first),
        }
    }
}

/// Runs the benchmark and prints the table (or JSON).
pub fn run(criu: &CriuBinary, args: &CrArgs) -> Result<(), ExperimentError> {
    let exe = std::env::current_exe()?;
    let report = measure(criu, &exe, args)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Measures every size; `exe` is the `torpor` binary (for the pool and sample services).
pub fn measure(criu: &CriuBinary, exe: &Path, args: &CrArgs) -> Result<CrReport, ExperimentError> {
    become_subreaper()?;
    let criu_version = criu.version()?;
    let cache = criu_cache(criu);
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    // Room for the new generation while the previous one (and the lazy rounds' inherited
    // generations) are still held.
    let pool = PoolProcess::spawn_on(exe, 3 * largest + (512 << 20), None, args.fabric)?;
    eprintln!("{}", pool.fabric_report);
    let steps = args.sizes.len() as u64 * args.repeat * 4;
    let bar = ProgressBar::new(steps).with_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_prefix("bench cr");
    let mut sizes = Vec::new();
    for &size in &args.sizes {
        let (mut base, mut ours) = (Samples::default(), Samples::default());
        let mut lazy = lazywake::LazyRounds::default();
        let mut stock_lazy = lazywake::StockLazySamples::default();
        for rep in 0..args.repeat {
            for step in 0..4 {
                let method = (step + rep) % 4;
                bar.set_message(format!(
                    "{} {} run {}",
                    format_bytes(size),
                    ["stock CRIU", "torpor", "torpor lazy", "stock CRIU lazy"][method as usize],
                    rep + 1
                ));
                match method {
                    0 => run_baseline(criu, exe, &args.baseline_dir, size, rep, &mut base)?,
                    1 => run_torpor(criu, exe, &pool, size, rep, &mut ours)?,
                    2 => lazywake::torpor_round(criu, exe, &pool, size, rep, &mut lazy)?,
                    _ => lazywake::stock_round(
                        criu,
                        exe,
                        &args.baseline_dir,
                        size,
                        rep,
                        &mut stock_lazy,
                    )?,
                }
                bar.inc(1);
            }
        }
        let (b, t) = (base.medians(false), ours.medians(true));
        sizes.push(SizeResult {
            size_bytes: size,
            repeat: args.repeat,
            ratio: Ratios {
                checkpoint: ratio(t.checkpoint_s, b.checkpoint_s),
                frozen: ratio(t.frozen_s, b.frozen_s),
                restore: ratio(t.restore_s, b.restore_s),
                restore_streamed: ratio(t.restore_streamed_s, b.restore_s),
                first_response: ratio(t.first_response_s, b.first_response_s),
            },
            baseline: b,
            torpor: t,
            lazy: lazy.armed.medians(),
            lazy_unarmed: lazy.warm.medians(),
            lazy_no_prefetch: lazy.cold.medians(),
            incremental: lazy.inc.medians(),
            stock_lazy: stock_lazy.medians(),
        });
    }
    bar.finish_and_clear();
    Ok(CrReport {
        fabric: pool.fabric_report.clone(),
        baseline: format!(
            "stock CRIU {criu_version}, images in {}",
            args.baseline_dir.display()
        ),
        criu_version,
        criu_cache: cache.as_ref().map(|c| c.mode),
        sizes,
    })
}

type BenchResult = Result<(), ExperimentError>;

/// How a round sees the service's first response: the time from `since` until it answered.
pub type Probe = fn(std::net::SocketAddr, Instant) -> std::io::Result<std::time::Duration>;

/// One stock-CRIU checkpoint and restore of a sample service, images in `dir`.
#[derive(Debug, Clone, Copy)]
pub struct StockRound {
    pub checkpoint_s: f64,
    pub frozen_s: Option<f64>,
    pub restore_s: f64,
    /// From the restore's start until the service answers.
    pub first_response_s: f64,
    pub image_bytes: u64,
}

/// Runs one stock-CRIU round: dump to a fresh directory under `dir`, stay asleep for
/// `asleep`, restore, first answer. (On a VM, memory freed by the dump goes back to the host
/// within a second or two and costs more to touch again, so a restore right after the dump
/// is faster than one after a realistic sleep: compare like with like.)
pub fn stock_criu_round(
    criu: &CriuBinary,
    exe: &Path,
    dir: &Path,
    size: u64,
    seed: u64,
    asleep: std::time::Duration,
    probe: Probe,
) -> Result<StockRound, ExperimentError> {
    let mut svc = SampleProcess::spawn(exe, size, seed)?;
    let images = tempfile::Builder::new()
        .prefix("torpor-bench-")
        .tempdir_in(dir)?;
    let dump = local::dump_to_dir(criu, svc.pid, images.path())?;
    svc.reap();
    std::thread::sleep(asleep);
    let t0 = Instant::now();
    let (pid, wall) = local::restore_from_dir(criu, images.path(), &[svc.pid])?;
    let first = probe(svc.addr, t0);
    kill_and_reap(pid);
    Ok(StockRound {
        checkpoint_s: dump.wall.as_secs_f64(),
        frozen_s: dump.frozen.map(|f| f.as_secs_f64()),
        restore_s: wall.as_secs_f64(),
        first_response_s: first?.as_secs_f64(),
        image_bytes: dump.bytes,
    })
}

fn run_baseline(
    criu: &CriuBinary,
    exe: &Path,
    dir: &Path,
    size: u64,
    seed: u64,
    s: &mut Samples,
) -> BenchResult {
    let r = stock_criu_round(
        criu,
        exe,
        dir,
        size,
        seed,
        std::time::Duration::ZERO,
        touch_response,
    )?;
    s.checkpoint.push(r.checkpoint_s);
    s.frozen.extend(r.frozen_s);
    s.restore.push(r.restore_s);
    s.first.push(r.first_response_s);
    s.bytes.push(r.image_bytes);
    Ok(())
}

fn run_torpor(
    criu: &CriuBinary,
    exe: &Path,
    pool: &PoolProcess,
    size: u64,
    seed: u64,
    s: &mut Samples,
) -> BenchResult {
    let mut svc = SampleProcess::spawn(exe, size, seed)?;
    let name = format!("bench-{size}");
    let cpu0 = lazywake::cpu_now(pool);
    let r = torpor_criu::checkpoint_to_pool(
        criu,
        svc.pid,
        &name,
        &pool.pools,
        &CheckpointOptions::default(),
    )?;
    svc.reap();
    let ckpt_cpu = lazywake::cpu_now(pool) - cpu0;
    // Both eager paths restore the same generation, in turns first (a restore right after
    // the dump finds memory the host has not taken back yet).
    let restore = |streamed: bool| -> Result<(f64, f64, f64), ExperimentError> {
        let cpu0 = lazywake::cpu_now(pool);
        let t0 = Instant::now();
        let opts = RestoreOptions::default();
        let restored = if streamed {
            torpor_criu::restore_streamed(criu, &name, Some(r.generation), &pool.pools, &opts)?
        } else {
            torpor_criu::restore_from_pool(criu, &name, Some(r.generation), &pool.pools, &opts)?
        };
        let first = touch_response(svc.addr, t0);
        kill_and_reap(restored.pid);
        let cpu = lazywake::cpu_now(pool) - cpu0;
        Ok((restored.restore_s, first?.as_secs_f64(), cpu))
    };
    let ((restore_s, first_s, cpu), (streamed_s, streamed_first_s, _)) = if seed.is_multiple_of(2) {
        let ours = restore(false)?;
        (ours, restore(true)?)
    } else {
        let streamed = restore(true)?;
        (restore(false)?, streamed)
    };
    s.cpu.push(ckpt_cpu + cpu);
    s.checkpoint.push(r.checkpoint_s);
    s.frozen.extend(r.frozen_s);
    s.restore.push(restore_s);
    s.first.push(first_s);
    s.streamed.push(streamed_s);
    s.streamed_first.push(streamed_first_s);
    s.staging.push(r.peak_staging_bytes);
    s.bytes.push(r.pool_bytes);
    Ok(())
}

fn print_table(r: &CrReport) {
    println!(
        "checkpoint/restore: torpor (streamed into a pool on this machine) vs {}",
        r.baseline
    );
    println!(
        "{:>9} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>9} {:>9}",
        "size", "ckpt", "base", "ratio", "frozen", "base", "ratio", "restore", "base", "ratio", "streamed", "ratio", "1st resp", "base", "ratio", "staging", "pool"
    );
    for s in &r.sizes {
        let (t, b, q) = (&s.torpor, &s.baseline, &s.ratio);
        println!(
            "{:>9} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>9} {:>9}",
            format_bytes(s.size_bytes),
            fmt_opt(t.checkpoint_s, 3, "s"),
            fmt_opt(b.checkpoint_s, 3, "s"),
            fmt_opt(q.checkpoint, 2, ""),
            fmt_opt(t.frozen_s, 3, "s"),
            fmt_opt(b.frozen_s, 3, "s"),
            fmt_opt(q.frozen, 2, ""),
            fmt_opt(t.restore_s, 3, "s"),
            fmt_opt(b.restore_s, 3, "s"),
            fmt_opt(q.restore, 2, ""),
            fmt_opt(t.restore_streamed_s, 3, "s"),
            fmt_opt(q.restore_streamed, 2, ""),
            fmt_opt(t.first_response_s, 3, "s"),
            fmt_opt(b.first_response_s, 3, "s"),
            fmt_opt(q.first_response, 2, ""),
            t.peak_staging_bytes.map(format_bytes).unwrap_or_default(),
            t.pool_bytes.map(format_bytes).unwrap_or_default(),
        );
    }
    println!(
        "restore: every page copied in through userfaultfd before the tasks run (torpor's eager \
         restore); streamed: CRIU reading every page from the pool (--stream, its fallback)"
    );
    println!();
    println!("first response after a sleep (a request touching 16 MiB), by how memory comes back:");
    println!(
        "{:>9} | {:>9} {:>9} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>9}",
        "size",
        "stock",
        "torpor",
        "lazy",
        "+prefetch",
        "+armed",
        "stock lazy",
        "faulted",
        "prefetched",
        "arming",
        "held"
    );
    for s in &r.sizes {
        println!(
            "{:>9} | {:>9} {:>9} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>9}",
            format_bytes(s.size_bytes),
            fmt_opt(s.baseline.first_response_s, 3, "s"),
            fmt_opt(s.torpor.first_response_s, 3, "s"),
            fmt_opt(s.lazy_no_prefetch.first_response_s, 3, "s"),
            fmt_opt(s.lazy_unarmed.first_response_s, 3, "s"),
            fmt_opt(s.lazy.first_response_s, 3, "s"),
            fmt_opt(s.stock_lazy.first_response_s, 3, "s"),
            s.lazy.faulted_bytes.map(format_bytes).unwrap_or_default(),
            s.lazy
                .prefetched_bytes
                .map(format_bytes)
                .unwrap_or_default(),
            fmt_opt(s.lazy.armed_s, 3, "s"),
            s.lazy.held_bytes.map(format_bytes).unwrap_or_default(),
        );
    }
    println!();
    println!("checkpoint after one request following a lazy wake (incremental) vs a full one:");
    println!(
        "{:>9} | {:>8} {:>8} | {:>8} {:>8} | {:>9} {:>9} {:>9} | {:>9} {:>9}",
        "size",
        "ckpt",
        "full",
        "frozen",
        "full",
        "written",
        "full",
        "inherited",
        "cycle cpu",
        "eager"
    );
    for s in &r.sizes {
        let i = &s.incremental;
        println!(
            "{:>9} | {:>8} {:>8} | {:>8} {:>8} | {:>9} {:>9} {:>9} | {:>9} {:>9}",
            format_bytes(s.size_bytes),
            fmt_opt(i.checkpoint_s, 3, "s"),
            fmt_opt(s.torpor.checkpoint_s, 3, "s"),
            fmt_opt(i.frozen_s, 3, "s"),
            fmt_opt(s.torpor.frozen_s, 3, "s"),
            i.pool_bytes_written.map(format_bytes).unwrap_or_default(),
            s.torpor.pool_bytes.map(format_bytes).unwrap_or_default(),
            i.inherited_bytes.map(format_bytes).unwrap_or_default(),
            fmt_opt(i.cycle_cpu_s, 3, "s"),
            fmt_opt(s.torpor.cycle_cpu_s, 3, "s"),
        );
    }
    println!(
        "medians of {} run(s) each; ratio = torpor / baseline (below 1 is faster)",
        r.sizes.first().map(|s| s.repeat).unwrap_or(0)
    );
}
