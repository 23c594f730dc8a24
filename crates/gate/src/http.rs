//! HTTP/1.1, h2c and gRPC gating through hyper. Requests keep their version toward the
//! backend (gRPC needs HTTP/2 end to end); backend connections are pooled per version and
//! replaced after every drain.

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{watch, Notify},
};
use torpor_accept::{Limit, Proven};
use torpor_control::{HoldError, InflightGuard, ServiceLink};
use tracing::{debug, warn};

use crate::GateLimits;

type GateBody = BoxBody<Bytes, hyper::Error>;

/// Backend clients of one drain generation.
struct Clients {
    generation: u64,
    h1: Client<HttpConnector, Forwarded>,
    h2: Client<HttpConnector, Forwarded>,
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
    limits: GateLimits,
    clients: Mutex<Clients>,
}

/// Serves HTTP until `shutdown`.
pub async fn run(
    listener: TcpListener,
    backend: SocketAddr,
    link: Arc<ServiceLink>,
    limits: GateLimits,
    shutdown: impl Future<Output = ()>,
) {
    let gate = Arc::new(HttpGate {
        clients: Mutex::new(Clients::new(link.backend_generation())),
        link,
        backend,
        limits,
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
    let what = format!("gate of {}", gate.link.name);
    torpor_accept::accept_loop(
        &what,
        &listener,
        Limit::wait(limits.max_connections),
        shutdown,
        |(stream, peer), proven| serve_connection(gate.clone(), stream, peer, proven),
    )
    .await;
    retire.abort();
}

/// The client preface that opens every HTTP/2 (prior knowledge) connection.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads just enough of a new connection to tell HTTP/2 (its preface) from HTTP/1: `None` if
/// the client closed first. What was read is handed back, to be read again by hyper.
async fn sniff(stream: &mut TcpStream) -> io::Result<Option<(bool, Vec<u8>)>> {
    let mut seen = Vec::with_capacity(H2_PREFACE.len());
    loop {
        if !H2_PREFACE.starts_with(&seen) {
            return Ok(Some((false, seen)));
        }
        if seen.len() == H2_PREFACE.len() {
            return Ok(Some((true, seen)));
        }
        let mut byte = [0u8; 24];
        let want = H2_PREFACE.len() - seen.len();
        let n = stream.read(&mut byte[..want]).await?;
        if n == 0 {
            return Ok(None);
        }
        seen.extend_from_slice(&byte[..n]);
    }
}

/// One client connection: HTTP/1 or HTTP/2, each with its limits. The protocol is told apart
/// here rather than by hyper-util's `auto`, whose detection waits for bytes with no deadline
/// (a client that sends "P" and nothing more would keep its connection forever).
async fn serve_connection(
    gate: Arc<HttpGate>,
    mut stream: TcpStream,
    peer: SocketAddr,
    proven: Proven,
) {
    let limits = gate.limits;
    let (h2, seen) =
        match tokio::time::timeout(limits.header_read_timeout, sniff(&mut stream)).await {
            Ok(Ok(Some(found))) => found,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "client connection ended");
                return;
            }
            Err(_) => {
                debug!(%peer, "client sent no request within the header read timeout; closed");
                return;
            }
        };
    let io = TokioIo::new(Rewound {
        seen: Bytes::from(seen),
        inner: stream,
    });
    // Each request marks the connection active, and busy until its answer is sent (for the
    // HTTP/2 idle timeout).
    let activity = Arc::new(Notify::new());
    let busy = Arc::new(AtomicUsize::new(0));
    let service = hyper::service::service_fn({
        let (activity, busy) = (activity.clone(), busy.clone());
        move |req| {
            proven.proven();
            activity.notify_one();
            let token = Busy::new(&busy);
            let gate = gate.clone();
            async move {
                let resp = gate.handle(req).await;
                Ok::<_, Infallible>(resp.map(|body| Holding::boxed_with(body, token)))
            }
        }
    });
    let served = if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_header_list_size(limits.max_header_bytes)
            .serve_connection(io, service);
        tokio::pin!(conn);
        // HTTP/1 has its header read timeout between requests; HTTP/2 has none. A connection
        // with nothing in flight and no request started for `idle_timeout` is told to go
        // (GOAWAY), and cut one `idle_timeout` later if it has not gone (a client that does
        // not answer the shutdown's PING would keep it open for ever).
        let mut closing = false;
        loop {
            tokio::select! {
                served = conn.as_mut() => break served,
                _ = activity.notified() => {}
                _ = tokio::time::sleep(limits.idle_timeout) => {
                    if busy.load(Ordering::SeqCst) > 0 {
                        continue;
                    }
                    if closing {
                        debug!(%peer, "idle HTTP/2 connection did not go; cut");
                        break Ok(());
                    }
                    debug!(%peer, "idle HTTP/2 connection told to go");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(limits.max_header_bytes as usize)
            .max_headers(limits.max_headers)
            .serve_connection(io, service)
            .with_upgrades()
            .await
    };
    if let Err(e) = served {
        debug!(%peer, error = %e, "client connection ended");
    }
}

/// A connection whose first bytes were already read (to tell the protocol): they are read
/// again first.
struct Rewound {
    seen: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Rewound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.seen.is_empty() {
            let n = self.seen.len().min(buf.remaining());
            let head = self.seen.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why a held request was answered by the gate rather than forwarded.
enum NotLetIn {
    Refused(HoldError),
    /// Its body is larger than a held request may keep.
    TooLarge,
    /// The client's body broke off while held.
    BodyFailed(hyper::Error),
}

/// An HTTP/1.1 request asking to switch protocols (`Connection: upgrade` and `Upgrade`).
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn is_websocket<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// A gRPC request or answer, by its content type.
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

impl HttpGate {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<GateBody> {
        let grpc = is_grpc(req.headers());
        // An HTTP/1.1 Upgrade (websocket): once the service answers 101, both connections
        // are taken over and relayed byte for byte.
        let upgrade = is_upgrade(&req).then(|| {
            let mut generation = self.link.watch_backend_generation();
            generation.mark_unchanged();
            (hyper::upgrade::on(&mut req), generation, is_websocket(&req))
        });
        let (mut parts, body) = req.into_parts();
        let (guard, body) = match self.let_in(body).await {
            Ok(admitted) => admitted,
            Err(NotLetIn::Refused(e)) => {
                warn!(service = %self.link.name, error = %e, "request not forwarded");
                return self.unavailable(grpc, &e);
            }
            Err(NotLetIn::TooLarge) => {
                warn!(service = %self.link.name, limit = self.limits.hold_body_limit, "held request body over hold_body_limit; refused with 413");
                return too_large(grpc);
            }
            Err(NotLetIn::BodyFailed(e)) => {
                debug!(service = %self.link.name, error = %e, "held request's body broke off");
                return plain(StatusCode::BAD_REQUEST, "torpor: request body incomplete\n");
            }
        };
        let client = self.client(parts.version);
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = match Uri::builder()
            .scheme("http")
            .authority(self.backend.to_string())
            .path_and_query(path)
            .build()
        {
            Ok(u) => u,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "torpor: bad request target\n"),
        };
        match client.request(Request::from_parts(parts, body)).await {
            Ok(mut resp) => {
                guard.answered();
                if let Some((client_side, generation, websocket)) = upgrade {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        let service_side = hyper::upgrade::on(&mut resp);
                        tokio::spawn(crate::upgrade::relay(
                            client_side,
                            service_side,
                            self.link.clone(),
                            generation,
                            websocket,
                        ));
                    }
                }
                if grpc && is_grpc(resp.headers()) {
                    // A gRPC call's answer lasts as long as the call: a stream may stay open
                    // and quiet for ever. Its messages are activity; its body is not in
                    // flight, so a quiet stream does not hold the service awake, and a drain
                    // ends it cleanly ([`GrpcStream`]).
                    let mut generation = self.link.watch_backend_generation();
                    generation.mark_unchanged();
                    let link = self.link.clone();
                    drop(Finished {
                        link: link.clone(),
                        _guard: guard,
                    });
                    return resp.map(|body| GrpcStream::boxed(body, link, generation));
                }
                let done = Finished {
                    link: self.link.clone(),
                    _guard: guard,
                };
                resp.map(|body| Holding::boxed_with(body, done))
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

    /// Lets a request in through the link. An awake service gets the body as it streams. A
    /// request that is held keeps its body meanwhile, up to `hold_body_limit`: refused at once
    /// if its declared length is larger, and as soon as what arrived is larger otherwise; once
    /// the service is up, what was kept is forwarded first and the rest streams after it.
    async fn let_in(&self, mut body: Incoming) -> Result<(InflightGuard, Forwarded), NotLetIn> {
        if self.link.is_open() {
            let guard = self.link.enter().await.map_err(NotLetIn::Refused)?;
            return Ok((
                guard,
                Forwarded::new(&self.link, VecDeque::new(), Some(body)),
            ));
        }
        let limit = self.limits.hold_body_limit;
        if body.size_hint().lower() > limit {
            return Err(NotLetIn::TooLarge);
        }
        let enter = self.link.enter();
        tokio::pin!(enter);
        let mut kept = VecDeque::new();
        let mut kept_bytes = 0u64;
        let mut ended = body.is_end_stream();
        loop {
            tokio::select! {
                // Let in wins: the rest of the body then streams to the service.
                biased;
                entered = &mut enter => {
                    let guard = entered.map_err(NotLetIn::Refused)?;
                    let rest = (!ended).then_some(body);
                    return Ok((guard, Forwarded::new(&self.link, kept, rest)));
                }
                frame = body.frame(), if !ended => match frame {
                    None => ended = true,
                    Some(Err(e)) => return Err(NotLetIn::BodyFailed(e)),
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            kept_bytes += data.len() as u64;
                            if kept_bytes > limit {
                                return Err(NotLetIn::TooLarge);
                            }
                        }
                        kept.push_back(frame);
                        ended = body.is_end_stream();
                    }
                },
            }
        }
    }

    /// The answer for a request the link would not let in: what the client can do, nothing
    /// of why (that is in the log and the status API).
    fn unavailable(&self, grpc: bool, e: &HoldError) -> Response<GateBody> {
        let name = &self.link.name;
        let (text, retry_after) = match e {
            HoldError::QueueFull(_) => (
                format!("service {name} is waking and has too many requests waiting, retry"),
                1,
            ),
            HoldError::Timeout(_) => (format!("service {name} is still waking, retry"), 1),
            HoldError::WakeFailed(_) => {
                (format!("service {name} could not be woken, retry later"), 5)
            }
            HoldError::ShuttingDown => (format!("service {name} is shutting down, retry later"), 5),
        };
        if grpc {
            return grpc_error(14, &text); // UNAVAILABLE
        }
        let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, &format!("{text}\n"));
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        r
    }

    /// The pooled client for a request's version, renewed after a drain.
    fn client(&self, version: Version) -> Client<HttpConnector, Forwarded> {
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

/// A request body on its way to the service: the frames kept while it was held, then the
/// rest as the client sends it.
struct Forwarded {
    kept: VecDeque<Frame<Bytes>>,
    /// Data bytes in `kept`, for the size hint.
    kept_bytes: u64,
    rest: Option<Incoming>,
    /// Each frame of the rest marks the service active: a long upload, or a client's messages
    /// on a gRPC stream, is traffic the policy must see.
    link: Arc<ServiceLink>,
}

impl Forwarded {
    fn new(
        link: &Arc<ServiceLink>,
        kept: VecDeque<Frame<Bytes>>,
        rest: Option<Incoming>,
    ) -> Forwarded {
        let kept_bytes = kept
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        Forwarded {
            kept,
            kept_bytes,
            rest,
            link: link.clone(),
        }
    }
}

impl Body for Forwarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Some(frame) = self.kept.pop_front() {
            if let Some(d) = frame.data_ref() {
                self.kept_bytes -= d.len() as u64;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(rest) = &mut self.rest else {
            return Poll::Ready(None);
        };
        let frame = Pin::new(rest).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &frame {
            let now = self.link.now();
            self.link.with_arrivals(|a| a.mark_active(now));
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.kept.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |r| r.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + self.kept_bytes);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + self.kept_bytes);
        }
        hint
    }
}

/// A response body that keeps `T` alive until it is finished or dropped: the request's
/// in-flight guard, or its connection's busy mark.
struct Holding<B, T> {
    inner: B,
    _held: T,
}

impl<B, T> Holding<B, T>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Send + Sync + Unpin + 'static,
    T: Send + Sync + Unpin + 'static,
{
    fn boxed_with(inner: B, held: T) -> GateBody {
        Holding { inner, _held: held }.boxed()
    }
}

impl<B: Body + Unpin, T: Unpin> Body for Holding<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A gRPC answer's body once its head is in: each message (either way: the request body marks
/// its own, see [`Forwarded`]) marks the service active; when a drain retires the backend
/// connections (the service is about to sleep), the stream ends at once with trailers saying
/// UNAVAILABLE, which a client takes as "retry", rather than with a broken stream.
struct GrpcStream {
    inner: Incoming,
    link: Arc<ServiceLink>,
    /// Resolves at the next drain.
    drained: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
    /// Its trailers went out (the service's or ours): nothing follows.
    ended: bool,
}

impl GrpcStream {
    fn boxed(
        inner: Incoming,
        link: Arc<ServiceLink>,
        mut generation: watch::Receiver<u64>,
    ) -> GateBody {
        GrpcStream {
            inner,
            link,
            drained: Box::pin(async move {
                let _ = generation.changed().await;
            }),
            ended: false,
        }
        .boxed()
    }
}

impl Body for GrpcStream {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        // What the service already sent goes first: a drain never cuts an answer that is
        // there (a unary call's message and trailers follow its head at once).
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if f.is_trailers() {
                    self.ended = true;
                }
                let now = self.link.now();
                self.link.with_arrivals(|a| a.mark_active(now));
                return Poll::Ready(Some(Ok(f)));
            }
            Poll::Ready(other) => return Poll::Ready(other),
            Poll::Pending => {}
        }
        if self.drained.as_mut().poll(cx).is_ready() {
            self.ended = true;
            debug!(service = %self.link.name, "gRPC stream ended by a drain");
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from(14));
            trailers.insert(
                "grpc-message",
                HeaderValue::from_static("torpor: the service is going to sleep"),
            );
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}

/// A forwarded request until its response is finished (or dropped): in flight until then,
/// and activity for the policy when it ends, so that idleness after a long stream (SSE, a
/// gRPC stream) counts from its end, not from its start.
struct Finished {
    link: Arc<ServiceLink>,
    _guard: InflightGuard,
}

impl Drop for Finished {
    fn drop(&mut self) {
        let now = self.link.now();
        self.link.with_arrivals(|a| a.mark_active(now));
    }
}

/// Counts one request of a connection until dropped.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::SeqCst);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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

/// A trailers-only gRPC response carrying `code`; `message` is fixed text, never an error.
fn grpc_error(code: u32, message: &str) -> Response<GateBody> {
    let mut r = Response::new(full(""));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(message) {
        h.insert("grpc-message", v);
    }
    r
}

/// The answer for a held request whose body is over `hold_body_limit`.
fn too_large(grpc: bool) -> Response<GateBody> {
    if grpc {
        // RESOURCE_EXHAUSTED
        return grpc_error(
            8,
            "torpor: request too large to hold while the service wakes",
        );
    }
    plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        "torpor: request body too large to hold while the service wakes\n",
    )
}
