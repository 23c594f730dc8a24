//! HTTP/1.1, h2c and gRPC gating through hyper. Requests keep their version toward the
//! backend (gRPC needs HTTP/2 end to end); backend connections are pooled per version and
//! replaced after every drain.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;
use torpor_control::{HoldError, InflightGuard, ServiceLink};
use tracing::{debug, warn};

type GateBody = BoxBody<Bytes, hyper::Error>;

/// Backend clients of one drain generation.
struct Clients {
    generation: u64,
    h1: Client<HttpConnector, Incoming>,
    h2: Client<HttpConnector, Incoming>,
}

impl Clients {
    fn new(generation: u64) -> Clients {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Clients {
            generation,
            h1: Client::builder(TokioExecutor::new()).build(connector.clone()),
            h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
        }
    }
}

struct HttpGate {
    link: Arc<ServiceLink>,
    backend: SocketAddr,
    clients: Mutex<Clients>,
}

/// Serves HTTP until `shutdown`.
pub async fn run(
    listener: TcpListener,
    backend: SocketAddr,
    link: Arc<ServiceLink>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let gate = Arc::new(HttpGate {
        clients: Mutex::new(Clients::new(link.backend_generation())),
        link,
        backend,
    });
    // Retire pooled backend connections as soon as a drain asks, not at the next request:
    // the service is about to be checkpointed.
    let retire = tokio::spawn({
        let gate = gate.clone();
        async move {
            let mut generation = gate.link.watch_backend_generation();
            while generation.changed().await.is_ok() {
                let g = *generation.borrow_and_update();
                *gate.clients.lock().expect("clients lock") = Clients::new(g);
            }
        }
    });
    let served = crate::accept_loop(listener, shutdown, |stream, peer| {
        let gate = gate.clone();
        async move {
            let service = hyper::service::service_fn(move |req| {
                let gate = gate.clone();
                async move { Ok::<_, Infallible>(gate.handle(req).await) }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "client connection ended");
            }
        }
    })
    .await;
    retire.abort();
    served
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

impl HttpGate {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<GateBody> {
        let grpc = is_grpc(&req);
        let guard = match self.link.enter().await {
            Ok(g) => g,
            Err(e) => {
                warn!(service = %self.link.name, error = %e, "request not forwarded");
                return unavailable(grpc, &e);
            }
        };
        let client = self.client(req.version());
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        *req.uri_mut() = match Uri::builder()
            .scheme("http")
            .authority(self.backend.to_string())
            .path_and_query(path)
            .build()
        {
            Ok(u) => u,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "bad request target"),
        };
        match client.request(req).await {
            Ok(resp) => {
                guard.answered();
                resp.map(|body| {
                    GuardedBody {
                        inner: body,
                        _guard: guard,
                    }
                    .boxed()
                })
            }
            Err(e) => {
                warn!(service = %self.link.name, backend = %self.backend, error = %e, "backend request failed");
                if grpc {
                    grpc_error(14, "torpor: backend unreachable")
                } else {
                    plain(StatusCode::BAD_GATEWAY, "torpor: backend unreachable\n")
                }
            }
        }
    }

    /// The pooled client for a request's version, renewed after a drain.
    fn client(&self, version: Version) -> Client<HttpConnector, Incoming> {
        let mut c = self.clients.lock().expect("clients lock");
        let generation = self.link.backend_generation();
        if c.generation != generation {
            *c = Clients::new(generation);
        }
        if version == Version::HTTP_2 {
            c.h2.clone()
        } else {
            c.h1.clone()
        }
    }
}

/// Keeps the request counted as in flight until its response body is finished.
struct GuardedBody {
    inner: Incoming,
    _guard: InflightGuard,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn full(text: &str) -> GateBody {
    Full::new(Bytes::from(text.to_string()))
        .map_err(|never| match never {})
        .boxed()
}

fn plain(status: StatusCode, text: &str) -> Response<GateBody> {
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A trailers-only gRPC response carrying `code`.
fn grpc_error(code: u32, message: &str) -> Response<GateBody> {
    let mut r = Response::new(full(""));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&message.replace(['\r', '\n'], " ")) {
        h.insert("grpc-message", v);
    }
    r
}

/// The explicit answer for a request that could not be held until the service was up.
fn unavailable(grpc: bool, e: &HoldError) -> Response<GateBody> {
    let text = format!("torpor: {e}");
    if grpc {
        return grpc_error(14, &text); // UNAVAILABLE
    }
    let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, &format!("{text}\n"));
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}
