//! The status API of `torpor up`: `GET /` (the status page), `GET /status` (JSON: services,
//! recent transitions and manual commands, where the control endpoint is), `GET /energy`
//! (the node's energy with its power history) and `GET /metrics` (Prometheus text
//! exposition), on a small HTTP/1.1 listener. It only reads: commands go to the control
//! endpoint.

use std::{convert::Infallible, fmt::Write, future::Future, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use torpor_accept::Limit;
pub use torpor_agent::EnergyReport;
pub use torpor_agent::ServiceStatus;
use torpor_agent::{Agent, ManualAction, ServiceState, Transition};

use crate::{
    control::ControlHint,
    reload::{LastReload, ReloadReport},
};

/// The `/status` document, served by `torpor up` and read back by `torpor status`. The parts
/// added after the first version default when absent, so an older `torpor up` still reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusDoc {
    pub uptime_s: f64,
    pub services: Vec<ServiceStatus>,
    pub transitions: Vec<Transition>,
    /// The node's energy account (its power history is at `/energy`).
    pub energy: Option<EnergyReport>,
    /// Power knob changes in force now.
    #[serde(default)]
    pub knobs: Vec<String>,
    /// Recent manual commands (who, when, what came of them), oldest first.
    #[serde(default)]
    pub manual: Vec<ManualAction>,
    /// Where the control endpoint is (for `torpor sleep --addr`).
    #[serde(default)]
    pub control: ControlHint,
    /// The last reload of the configuration (when, who, what came of it), if any.
    pub last_reload: Option<ReloadReport>,
}

/// Connections the status API serves at once: it is for operators and scrapers, not crowds.
const STATUS_MAX_CONNECTIONS: usize = 64;

/// Serves until `shutdown`; `/status` says the control endpoint is at `control`, and what
/// the last reload did.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    control: ControlHint,
    last_reload: LastReload,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(listener, shutdown, move |req| {
        route(&agent, &control, &last_reload, req)
    })
    .await
}

/// Serves the answers of `route` until `shutdown`, with the listeners' accept loop (accept errors
/// are logged and retried, never the end of the listener), a connection limit and a time
/// limit on request headers.
pub async fn serve_with<F>(listener: TcpListener, shutdown: impl Future<Output = ()>, route: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let route = Arc::new(route);
    torpor_accept::accept_loop(
        "status API",
        &listener,
        Limit::wait(STATUS_MAX_CONNECTIONS),
        shutdown,
        move |(stream, _), proven| {
            let route = route.clone();
            async move {
                let svc = hyper::service::service_fn(move |req| {
                    proven.proven();
                    let route = route.clone();
                    async move { Ok::<_, Infallible>(route(req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(torpor_gate::DEFAULT_HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        },
    )
    .await
}

fn route<B>(
    agent: &Agent,
    control: &ControlHint,
    last_reload: &LastReload,
    req: Request<B>,
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/" => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::page::PAGE.to_string(),
        ),
        "/status" => {
            let doc = StatusDoc {
                uptime_s: agent.uptime().as_secs_f64(),
                services: agent.status(),
                transitions: agent.transitions(),
                energy: agent.energy().map(|mut e| {
                    e.history.clear();
                    e
                }),
                knobs: agent.knob_changes(),
                manual: agent.manual_actions(),
                control: control.clone(),
                last_reload: last_reload.lock().expect("reload lock").clone(),
            };
            (
                StatusCode::OK,
                "application/json",
                serde_json::to_string(&doc).expect("status serializes"),
            )
        }
        "/energy" => (
            StatusCode::OK,
            "application/json",
            serde_json::to_string(&agent.energy()).expect("energy serializes"),
        ),
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics(&agent.status(), agent.energy().as_ref()),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /, /status, /energy or /metrics\n".to_string(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    r
}

const STATES: [ServiceState; 7] = [
    ServiceState::Awake,
    ServiceState::Frozen,
    ServiceState::Draining,
    ServiceState::Checkpointing,
    ServiceState::Asleep,
    ServiceState::Waking,
    ServiceState::Failed,
];

/// Whether a metric only grows or goes up and down.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One per-service metric family: its value for a service, `None` where it has none.
struct ServiceMetric {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    value: fn(&ServiceStatus, Option<&EnergyReport>) -> Option<f64>,
}

/// The per-service families of `/metrics`, in the order they are written.
const SERVICE_METRICS: &[ServiceMetric] = &[
    ServiceMetric {
        name: "torpor_sleeps_total",
        kind: Kind::Counter,
        help: "Checkpoints into the pool.",
        value: |s, _| Some(s.sleeps as f64),
    },
    ServiceMetric {
        name: "torpor_freezes_total",
        kind: Kind::Counter,
        help: "Freezes of an idle service's cgroup by the energy governor.",
        value: |s, _| Some(s.freezes as f64),
    },
    ServiceMetric {
        name: "torpor_idle_cpus",
        kind: Kind::Gauge,
        help: "CPUs an awake service keeps busy with no request in flight (measured).",
        value: |s, _| s.costs.idle_cpus,
    },
    ServiceMetric {
        name: "torpor_idle_wakeups_per_second",
        kind: Kind::Gauge,
        help: "Wakeups per second of an awake service with no request in flight (measured).",
        value: |s, _| s.costs.idle_wakeups_per_s,
    },
    ServiceMetric {
        name: "torpor_watch_cpus",
        kind: Kind::Gauge,
        help: "CPUs torpor spends looking at an awake service with no request in flight (each look timed, times the looks per second).",
        value: |s, _| s.costs.watch_cpus,
    },
    ServiceMetric {
        name: "torpor_snapshot_cycle_cpu_seconds",
        kind: Kind::Gauge,
        help: "CPU-seconds of one checkpoint and restore (torpor, CRIU, an embedded pool), moving estimate.",
        value: |s, _| s.costs.snapshot_cycle_cpu_s,
    },
    ServiceMetric {
        name: "torpor_wakes_total",
        kind: Kind::Counter,
        help: "Wakes triggered by a request or by hand (torpor wake, torpor pin).",
        value: |s, _| Some(s.wakes as f64),
    },
    ServiceMetric {
        name: "torpor_prewarms_total",
        kind: Kind::Counter,
        help: "Wakes ahead of a predicted request.",
        value: |s, _| Some(s.prewarms as f64),
    },
    ServiceMetric {
        name: "torpor_cold_starts_total",
        kind: Kind::Counter,
        help: "Starts from the command after a failed restore.",
        value: |s, _| Some(s.cold_starts as f64),
    },
    ServiceMetric {
        name: "torpor_snapshots_lost_total",
        kind: Kind::Counter,
        help: "Wakes that found the snapshot gone or unverifiable on every pool replica (state lost).",
        value: |s, _| Some(s.snapshots_lost as f64),
    },
    ServiceMetric {
        name: "torpor_restarts_total",
        kind: Kind::Counter,
        help: "Restarts after a crash.",
        value: |s, _| Some(s.restarts as f64),
    },
    ServiceMetric {
        name: "torpor_failed_checkpoints_total",
        kind: Kind::Counter,
        help: "Checkpoints that failed (service kept running).",
        value: |s, _| Some(s.failed_checkpoints as f64),
    },
    ServiceMetric {
        name: "torpor_rejected_requests_total",
        kind: Kind::Counter,
        help: "Requests answered with a hold error.",
        value: |s, _| Some(s.rejected_requests as f64),
    },
    ServiceMetric {
        name: "torpor_steered_connections_total",
        kind: Kind::Counter,
        help: "Connections steered in the kernel straight to the service (never seen by the gate).",
        value: |s, _| Some(s.steered_connections as f64),
    },
    ServiceMetric {
        name: "torpor_held_requests",
        kind: Kind::Gauge,
        help: "Requests held now.",
        value: |s, _| Some(s.held_now as f64),
    },
    ServiceMetric {
        name: "torpor_footprint_bytes",
        kind: Kind::Gauge,
        help: "Resident memory of the service tree when last awake.",
        value: |s, _| Some(s.footprint_bytes as f64),
    },
    ServiceMetric {
        name: "torpor_snapshot_bytes",
        kind: Kind::Gauge,
        help: "Bytes of the newest snapshot in the pool.",
        value: |s, _| s.snapshot_bytes.map(|b| b as f64),
    },
    ServiceMetric {
        name: "torpor_service_pinned",
        kind: Kind::Gauge,
        help: "1 while an operator's pin keeps the service awake (torpor pin).",
        value: |s, _| Some(u8::from(s.pinned.is_some()) as f64),
    },
    ServiceMetric {
        name: "torpor_last_checkpoint_seconds",
        kind: Kind::Gauge,
        help: "Duration of the last checkpoint.",
        value: |s, _| s.last_checkpoint_s,
    },
    ServiceMetric {
        name: "torpor_last_wake_seconds",
        kind: Kind::Gauge,
        help: "Duration of the last wake.",
        value: |s, _| s.last_wake_s,
    },
    ServiceMetric {
        name: "torpor_asleep_seconds_total",
        kind: Kind::Counter,
        help: "Time spent asleep.",
        value: |s, _| Some(s.time_asleep_s),
    },
    ServiceMetric {
        name: "torpor_awake_seconds_total",
        kind: Kind::Counter,
        help: "Time spent awake.",
        value: |s, _| Some(s.time_awake_s),
    },
    ServiceMetric {
        name: "torpor_service_cpu_seconds_total",
        kind: Kind::Counter,
        help: "CPU time of the service's processes.",
        value: |s, _| Some(s.cpu_s),
    },
    ServiceMetric {
        name: "torpor_lazy_faulted_bytes",
        kind: Kind::Gauge,
        help: "Bytes the running incarnation brought in from the pool on page faults (lazy restore).",
        value: |s, _| Some(s.lazy.as_ref()?.faulted_bytes as f64),
    },
    ServiceMetric {
        name: "torpor_lazy_prefetched_bytes",
        kind: Kind::Gauge,
        help: "Bytes of the recorded working set pushed at the last lazy wake.",
        value: |s, _| Some(s.lazy.as_ref()?.prefetched_bytes as f64),
    },
    ServiceMetric {
        name: "torpor_lazy_background_bytes",
        kind: Kind::Gauge,
        help: "Bytes filled in the background since the last lazy wake.",
        value: |s, _| Some(s.lazy.as_ref()?.background_bytes as f64),
    },
    ServiceMetric {
        name: "torpor_lazy_remaining_bytes",
        kind: Kind::Gauge,
        help: "Bytes of the running incarnation still only in the pool (never touched).",
        value: |s, _| Some(s.lazy.as_ref()?.remaining_bytes as f64),
    },
    ServiceMetric {
        name: "torpor_service_energy_joules_total",
        kind: Kind::Counter,
        help: "Energy attributed to the service (its CPU time and resident memory).",
        value: |s, energy| Some(energy?.services.get(&s.name)?.energy_j),
    },
];

/// Prometheus text exposition of the services' figures and the node's energy.
pub fn metrics(services: &[ServiceStatus], energy: Option<&EnergyReport>) -> String {
    let mut out = String::new();
    for m in SERVICE_METRICS {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} {}",
            m.name,
            m.help,
            m.name,
            m.kind.as_str()
        );
        for s in services {
            if let Some(v) = (m.value)(s, energy) {
                let _ = writeln!(out, "{}{{service=\"{}\"}} {v}", m.name, s.name);
            }
        }
    }
    let _ = writeln!(out, "# HELP torpor_service_state 1 for the service's current state.\n# TYPE torpor_service_state gauge");
    for s in services {
        for st in STATES {
            let _ = writeln!(
                out,
                "torpor_service_state{{service=\"{}\",state=\"{}\"}} {}",
                s.name,
                st.as_str(),
                u8::from(s.state == st)
            );
        }
    }
    if let Some(e) = energy {
        let source = match &e.source {
            torpor_power::PowerSource::Measured => "source=\"measured\"".to_string(),
            torpor_power::PowerSource::Modelled { profile } => {
                format!("source=\"modelled\",profile=\"{profile}\"")
            }
        };
        let _ = writeln!(out, "# HELP torpor_node_energy_joules_total Node energy: used, always-on counterfactuals (shallow idle; measured deep idle), torpor's own work, idle.\n# TYPE torpor_node_energy_joules_total counter");
        for (kind, v) in [
            ("used", e.energy_j),
            ("counterfactual", e.counterfactual_j),
            ("counterfactual_deep_idle", e.deep_idle_counterfactual_j),
            ("torpor", e.torpor_j),
            ("idle", e.idle_j),
        ] {
            let _ = writeln!(
                out,
                "torpor_node_energy_joules_total{{kind=\"{kind}\",{source}}} {v}"
            );
        }
        let _ = writeln!(out, "# HELP torpor_node_all_asleep_seconds_total Time every service was asleep.\n# TYPE torpor_node_all_asleep_seconds_total counter\ntorpor_node_all_asleep_seconds_total {}", e.all_asleep_s);
        let _ = writeln!(out, "# HELP torpor_node_asleep_seconds_total Time the node slept (or, in a dry run, would have), priced at the profile's suspend power.\n# TYPE torpor_node_asleep_seconds_total counter\ntorpor_node_asleep_seconds_total{{dry_run=\"false\"}} {}\ntorpor_node_asleep_seconds_total{{dry_run=\"true\"}} {}", e.node_asleep_s - e.node_asleep_dry_run_s, e.node_asleep_dry_run_s);
    }
    out
}

/// Fetches `path` from a running `torpor up`'s status API.
pub async fn fetch(addr: std::net::SocketAddr, path: &str) -> Result<String, FetchError> {
    use http_body_util::{BodyExt, Empty};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let uri: hyper::Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|_| FetchError::Address(addr))?;
    let resp = client
        .get(uri)
        .await
        .map_err(|e| FetchError::Connect(addr, e.to_string()))?;
    if resp.status() != StatusCode::OK {
        return Err(FetchError::Status(resp.status().as_u16()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| FetchError::Connect(addr, e.to_string()))?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).to_string())
}

/// Why the status API could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("bad status address {0}")]
    Address(std::net::SocketAddr),
    #[error("no torpor up answering on {0} ({1}); is it running, and on that --addr?")]
    Connect(std::net::SocketAddr, String),
    #[error("status API answered HTTP {0}")]
    Status(u16),
}
