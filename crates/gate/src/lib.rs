//! The gate (activator) in front of one service. While the service is awake it forwards,
//! reusing pooled backend connections; while it drains, sleeps or wakes, requests wait in
//! the [`ServiceLink`]'s bounded hold queue and the first one asks the agent for a wake.
//! Clients whose request cannot be held get an explicit answer: HTTP 503, gRPC
//! `UNAVAILABLE`, or (TCP) a closed connection with a log line. Those answers say what the
//! client can do (retry, later) and nothing of why: the reason goes to the log.
//!
//! A gate holds against hostile clients ([`GateLimits`]): a connection limit, a time limit on
//! request headers, an idle timeout for HTTP/2 connections, header size limits, a bounded
//! number of HTTP/2 streams, and a bounded body for a held request.
//!
//! * [`http`]: HTTP/1.1, HTTP/2 cleartext and gRPC, through hyper.
//! * [`tcp`]: raw TCP; the accepted client connection is held and the backend is dialled
//!   once the service is up.
//! * Accepting: [`torpor_accept`]'s loop, with the connection limit; a client that has not
//!   yet sent a whole request is the first to go when the gate is full, and the newcomer waits
//!   while every connection has.
//! * [`upgrade`]: HTTP/1.1 Upgrade (websockets) relayed both ways after the 101.
//!
//! Long-lived connections: a response body (server-sent events, a gRPC server, client or
//! bidirectional stream) is passed on frame by frame as it comes, never buffered. A plain
//! HTTP response is in flight (the service is not slept under it) until it ends, and its end
//! counts as activity. A gRPC answer is in flight only until its head, and an upgraded
//! connection not at all: every message or chunk they carry counts as activity, so they keep
//! the service awake while they talk; once quiet for the idle threshold the service may sleep,
//! and the drain ends them (a gRPC stream with UNAVAILABLE trailers, a websocket with a close
//! frame, 1001 "going away"; other protocols by closing the connection), as raw TCP
//! connections are cut.

pub mod http;
pub mod tcp;
pub mod upgrade;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use torpor_control::ServiceLink;

/// What a service speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1, HTTP/2 cleartext (prior knowledge) and gRPC.
    Http,
    Tcp,
}

/// What one gate lets a client take: connections, time, header and body sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateLimits {
    /// Client connections served at once; more wait in the kernel's backlog. Bounds the file
    /// descriptors a gate can take (each client may also need a backend connection).
    pub max_connections: usize,
    /// Time a client has to send a request's headers (HTTP/1) or its first bytes (protocol
    /// detection): a client that trickles them holds no connection for long.
    pub header_read_timeout: Duration,
    /// Time an HTTP/2 connection may go without starting a request before it is told to go
    /// (HTTP/1 connections have `header_read_timeout` between requests).
    pub idle_timeout: Duration,
    /// Largest request head (request line and headers) in bytes; beyond it, 431 (HTTP/1) or
    /// a refused stream (HTTP/2).
    pub max_header_bytes: u32,
    /// Most header fields in an HTTP/1 request; beyond it, 431.
    pub max_headers: usize,
    /// HTTP/2 streams open at once on one connection; more are refused (REFUSED_STREAM).
    pub h2_max_concurrent_streams: u32,
    /// Largest request body kept while the service sleeps or wakes; a larger one gets 413
    /// (at once when its length is declared), so held requests cannot exhaust memory.
    pub hold_body_limit: u64,
}

/// Default [`GateLimits::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`GateLimits::hold_body_limit`].
pub const DEFAULT_HOLD_BODY_LIMIT: u64 = 16 << 20;

impl Default for GateLimits {
    fn default() -> GateLimits {
        GateLimits {
            max_connections: 512,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 64 << 10,
            max_headers: 100,
            h2_max_concurrent_streams: 256,
            hold_body_limit: DEFAULT_HOLD_BODY_LIMIT,
        }
    }
}

/// Serves one service's public listener until `shutdown` resolves. Never ends on its own:
/// accept errors are logged and retried.
pub async fn run(
    listener: TcpListener,
    protocol: Protocol,
    backend: SocketAddr,
    link: Arc<ServiceLink>,
    limits: GateLimits,
    shutdown: impl Future<Output = ()>,
) {
    match protocol {
        Protocol::Http => http::run(listener, backend, link, limits, shutdown).await,
        Protocol::Tcp => tcp::run(listener, backend, link, limits, shutdown).await,
    }
}
