//! `torpor demo`: the whole system on this machine. `torpor up` runs in-process with a
//! built-in configuration of four services (an HTTP service, a gRPC service, an HTTP service
//! holding a few hundred MiB of state, and an HTTP service with a language runtime's background
//! wakeups: a 100 Hz timer scanning 1 MiB of its heap), an open-loop bursty load drives them for
//! about a minute (bursts separated by idle gaps longer than the idle threshold), the
//! services' sleeps and wakes are shown as they happen, and a summary closes the run.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::Empty;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;
use torpor_agent::{Agent, ServiceState};
use torpor_criu::CriuBinary;
use torpor_image::format_bytes;
use torpor_traffic::Percentiles;

use crate::inproc::InProcessUp;

use crate::{harness::own_addr, walkthrough, ExperimentError};

/// Arguments of `torpor demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How long the bursty load runs.
    #[arg(long, default_value = "60s", value_parser = torpor_image::duration_arg)]
    pub duration: Duration,
    /// Memory of the stateful service.
    #[arg(long, default_value = "256MiB", value_parser = torpor_image::size_arg)]
    pub state_memory: u64,
    /// Seed of the load's random arrivals.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Instead, walk through one checkpoint into a pool and a restore from it by hand.
    #[arg(long)]
    pub walkthrough: bool,
}

/// Request rate inside a burst (per second, Poisson).
const BURST_RATE: f64 = 40.0;

/// One service's part of the summary.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceSummary {
    pub name: String,
    pub sleeps: u64,
    pub wakes: u64,
    pub prewarms: u64,
    pub cold_starts: u64,
    pub asleep_share: f64,
    pub snapshot_bytes: Option<u64>,
}

/// What `torpor demo` reports.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    pub duration_s: f64,
    pub requests: u64,
    pub errors: u64,
    pub wake_latency: Percentiles,
    pub latency_found_awake: Percentiles,
    pub latency_found_asleep: Percentiles,
    pub services: Vec<ServiceSummary>,
    /// The node's energy account over the agent's life (measured or modelled, labelled).
    pub energy: Option<torpor_agent::EnergyReport>,
}

fn config(exe: &str, state_memory: u64) -> Result<String, ExperimentError> {
    let (web, web_b, grpc, grpc_b, state, state_b) = (
        own_addr()?,
        own_addr()?,
        own_addr()?,
        own_addr()?,
        own_addr()?,
        own_addr()?,
    );
    let (runtime, runtime_b) = (own_addr()?, own_addr()?);
    Ok(format!(
        r#"
[pool]
capacity = "{pool}"
ephemeral = true
[status]
listen = "127.0.0.1:0"
[power]
profile = "icx-2s"

[[service]]
name = "web"
command = ["{exe}", "sample-service", "--listen", "{web_b}", "--memory", "16MiB"]
listen = "{web}"
backend = "{web_b}"

[[service]]
name = "grpc"
command = ["{exe}", "sample-grpc", "--listen", "{grpc_b}"]
listen = "{grpc}"
backend = "{grpc_b}"

[[service]]
name = "state"
command = ["{exe}", "sample-service", "--listen", "{state_b}", "--memory", "{state_memory}"]
listen = "{state}"
backend = "{state_b}"

[[service]]
name = "runtime"
command = ["{exe}", "sample-service", "--listen", "{runtime_b}", "--memory", "64MiB", "--tick-work", "1MiB"]
listen = "{runtime}"
backend = "{runtime_b}"
"#,
        pool = 2 * state_memory + (384 << 20),
    ))
}

/// Runs the demo (or the walkthrough) and prints what happens.
pub fn run(args: &DemoArgs) -> Result<(), ExperimentError> {
    if args.walkthrough {
        return walkthrough::run(args.state_memory);
    }
    let exe = std::env::current_exe()?;
    let criu = CriuBinary::locate()?;
    let version = criu.version()?;
    let config =
        torpor_up::Config::from_toml(&config(&exe.display().to_string(), args.state_memory)?)?;
    let rt = tokio::runtime::Runtime::new()?;
    let summary = rt.block_on(async {
        let up = InProcessUp::start(config, criu).await?;
        let (info, agent) = (up.info().clone(), up.agent().clone());
        if !args.json {
            println!("torpor demo: CRIU {version}; {}", info.pool);
            for (name, addr) in &info.services {
                println!("  service {name:<6} behind its gate on {addr}");
            }
            println!("  status: torpor status --addr {}", info.status_addr);
            println!("bursty load for {} (bursts of ~{BURST_RATE}/s, idle gaps of 2-4 s); sleeps and wakes as they happen:", humantime::format_duration(args.duration));
        }
        let printer = (!args.json).then(|| tokio::spawn(print_transitions(agent.clone())));
        let result = drive(&info.services, &agent, args).await;
        if let Some(p) = printer {
            p.abort();
        }
        up.stop().await?;
        result
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).expect("summary serializes")
        );
    } else {
        print_summary(&summary);
    }
    Ok(())
}

async fn print_transitions(agent: Arc<Agent>) {
    let mut seen = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let all = agent.transitions();
        for t in all.iter().skip(seen) {
            let what = match t.to {
                ServiceState::Asleep => format!(
                    "asleep  (checkpoint {:.0} ms; {})",
                    t.took_s * 1e3,
                    t.detail
                ),
                ServiceState::Awake if t.from == ServiceState::Waking => {
                    format!("awake   (woke in {:.0} ms; {})", t.took_s * 1e3, t.detail)
                }
                ServiceState::Failed => format!("FAILED  ({})", t.detail),
                _ => continue,
            };
            println!("  {:>6.1}s  {:<6} {what}", t.at_s, t.service);
        }
        seen = all.len();
    }
}

struct Outcome {
    found_asleep: bool,
    latency: Duration,
    ok: bool,
}

/// Open-loop bursts until the duration is over; each request is sent on schedule whether
/// or not earlier ones returned.
async fn drive(
    services: &[(String, SocketAddr)],
    agent: &Arc<Agent>,
    args: &DemoArgs,
) -> Result<DemoSummary, ExperimentError> {
    // Let everything fall asleep first, so the first burst finds sleeping services.
    let settle = Instant::now() + Duration::from_secs(10);
    while agent
        .status()
        .iter()
        .any(|s| s.state != ServiceState::Asleep)
        && Instant::now() < settle
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let http = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let grpc_addr = services.iter().find(|(n, _)| n == "grpc").map(|(_, a)| *a);
    let channel = grpc_addr
        .map(|a| {
            tonic::transport::Endpoint::from_shared(format!("http://{a}")).map(|e| e.connect_lazy())
        })
        .transpose()
        .map_err(|e| ExperimentError::Mismatch(e.to_string()))?;
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let start = Instant::now();
    let end = start + args.duration;
    let mut tasks = Vec::new();
    while Instant::now() < end {
        let burst_end =
            (Instant::now() + Duration::from_millis(rng.gen_range(1000..3000))).min(end);
        let mut next = Instant::now();
        while next < burst_end {
            tokio::time::sleep_until(next).await;
            let (name, addr) = services[rng.gen_range(0..services.len())].clone();
            let found_asleep = agent
                .status()
                .iter()
                .any(|s| s.name == name && s.state != ServiceState::Awake);
            let (http, channel) = (http.clone(), channel.clone());
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let ok = if name == "grpc" {
                    match channel {
                        Some(ch) => grpc_check(ch).await,
                        None => false,
                    }
                } else {
                    http_count(&http, addr).await
                };
                Outcome {
                    found_asleep,
                    latency: t0.elapsed(),
                    ok,
                }
            }));
            let gap: f64 = -rng.gen::<f64>().max(1e-12).ln() / BURST_RATE;
            next += Duration::from_secs_f64(gap);
        }
        let idle = Duration::from_millis(rng.gen_range(2000..4000));
        tokio::time::sleep_until((Instant::now() + idle).min(end)).await;
    }
    let mut awake = Histogram::<u64>::new(3).expect("histogram");
    let mut asleep = Histogram::<u64>::new(3).expect("histogram");
    let (mut requests, mut errors) = (0, 0);
    for t in tasks {
        let o = t.await.expect("request task panicked");
        requests += 1;
        if !o.ok {
            errors += 1;
            continue;
        }
        let us = o.latency.as_micros().max(1) as u64;
        let h = if o.found_asleep {
            &mut asleep
        } else {
            &mut awake
        };
        let _ = h.record(us);
    }
    let mut wakes = Histogram::<u64>::new(3).expect("histogram");
    for t in agent.transitions() {
        if t.from == ServiceState::Waking
            && t.to == ServiceState::Awake
            && t.detail.starts_with("restored")
        {
            let _ = wakes.record((t.took_s * 1e6).max(1.0) as u64);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let services = agent
        .status()
        .into_iter()
        .map(|s| ServiceSummary {
            asleep_share: s.time_asleep_s / (s.time_asleep_s + s.time_awake_s).max(1e-9),
            name: s.name,
            sleeps: s.sleeps,
            wakes: s.wakes,
            prewarms: s.prewarms,
            cold_starts: s.cold_starts,
            snapshot_bytes: s.snapshot_bytes,
        })
        .collect();
    Ok(DemoSummary {
        duration_s: elapsed,
        requests,
        errors,
        wake_latency: Percentiles::of(&wakes),
        latency_found_awake: Percentiles::of(&awake),
        latency_found_asleep: Percentiles::of(&asleep),
        services,
        energy: agent.energy(),
    })
}

async fn http_count(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
) -> bool {
    let Ok(uri) = format!("http://{addr}/count").parse() else {
        return false;
    };
    match client.get(uri).await {
        Ok(r) if r.status() == 200 => http_body_util::BodyExt::collect(r.into_body())
            .await
            .is_ok(),
        _ => false,
    }
}

async fn grpc_check(channel: tonic::transport::Channel) -> bool {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    matches!(
        HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await,
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32
    )
}

fn print_summary(s: &DemoSummary) {
    let p = |x: &Percentiles| {
        format!(
            "p50 {} ms, p99 {} ms ({} requests)",
            x.p50_ms
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
            x.p99_ms
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
            x.count
        )
    };
    println!(
        "\nsummary after {:.0} s: {} requests, {} errors",
        s.duration_s, s.requests, s.errors
    );
    println!(
        "  wake latency (restore until accepting): {}",
        p(&s.wake_latency).replace("requests", "wakes")
    );
    println!(
        "  request latency, service found awake:   {}",
        p(&s.latency_found_awake)
    );
    println!(
        "  request latency, service found asleep:  {}",
        p(&s.latency_found_asleep)
    );
    println!(
        "  {:<6} {:>6} {:>6} {:>8} {:>5} {:>13} {:>10}",
        "", "sleeps", "wakes", "prewarms", "cold", "time asleep", "snapshot"
    );
    for v in &s.services {
        println!(
            "  {:<6} {:>6} {:>6} {:>8} {:>5} {:>12.0}% {:>10}",
            v.name,
            v.sleeps,
            v.wakes,
            v.prewarms,
            v.cold_starts,
            100.0 * v.asleep_share,
            v.snapshot_bytes
                .map(format_bytes)
                .unwrap_or_else(|| "-".into())
        );
    }
    match &s.energy {
        Some(e) => {
            println!("  energy: {}", e.summary_line());
            println!("          {}", e.torpor_line());
            println!(
                "          services {:.1} J, torpor's own work {:.1} J ({:.1} CPU-s), idle and platform {:.1} J; all services asleep {:.0} s",
                e.services.values().map(|v| v.energy_j).sum::<f64>(),
                e.torpor_j,
                e.torpor_cpu_s,
                e.idle_j,
                e.all_asleep_s
            );
            println!("          scope: {}", e.scope);
        }
        None => println!("  energy: not accounted (node power is off)"),
    }
}
