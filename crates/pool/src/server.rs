//! The pool server: accepts TCP or Unix connections and runs the wire protocol against a
//! [`Store`]. Data frames of an upload are read straight into arena chunks (no intermediate
//! buffer). Any protocol violation, oversized frame or checksum failure is answered with an
//! error frame and the connection is closed; the store is never left with a partial upload.
//!
//! Hostile clients are bounded: a connection limit (unauthenticated connections give way to
//! new ones, oldest first), only a small `Hello` frame before authentication and within a few
//! seconds, idle, per-frame and write timeouts, and accept errors that are retried, never
//! fatal.

use std::{
    future::Future,
    io,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter},
    net::{TcpListener, UnixListener},
};
use torpor_accept::{Limit, Listen, Proven};
use torpor_image::{
    wire::{
        self, ErrorCode, FrameHeader, FrameKind, Request, Response, WireError, HEADER_LEN,
        MAX_TOKEN_LEN,
    },
    FileEntry, Manifest, CHUNK_SIZE,
};
use tracing::{debug, info, warn};

use crate::{
    addr::PoolAddr,
    crc,
    splice::{SpliceError, Splicer},
    store::{check_range, error_chain, Store, StoreError, StoredData, Upload},
};

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// TCP whose connections speak TLS (see [`crate::tls`] and [`Listener::with_tls`]).
    Tls(TcpListener, Arc<rustls::ServerConfig>),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds an address; a stale Unix socket file is replaced.
    pub async fn bind(addr: &PoolAddr) -> io::Result<Listener> {
        Ok(match addr {
            PoolAddr::Tcp(a) => Listener::Tcp(TcpListener::bind(a).await?),
            PoolAddr::Unix(p) => {
                if std::fs::symlink_metadata(p).is_ok() {
                    std::fs::remove_file(p)?;
                }
                let l = UnixListener::bind(p)?;
                use std::os::unix::fs::PermissionsExt;
                // Only the owner (root) may talk to the pool through this socket.
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
                Listener::Unix(l, p.clone())
            }
        })
    }

    /// The address clients should use (with the real port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<PoolAddr> {
        Ok(match self {
            Listener::Tcp(l) | Listener::Tls(l, _) => PoolAddr::Tcp(l.local_addr()?.to_string()),
            Listener::Unix(_, p) => PoolAddr::Unix(p.clone()),
        })
    }
}

/// Largest control payload accepted before `Hello` succeeds: a `Hello` with the longest token
/// fits; a header declaring more is refused before anything is allocated for it.
pub const MAX_HELLO_PAYLOAD: u32 = 8 << 10;

/// Limits and timeouts that keep hostile, broken or partitioned clients from exhausting the
/// pool's file descriptors, memory or RAM tier.
#[derive(Clone)]
pub struct ServeOptions {
    /// The shared token a client must present in `Hello`; `None` accepts anyone who connects.
    pub token: Option<Arc<str>>,
    /// Connections served at once. Beyond it a new connection takes the slot of the oldest
    /// one that has not authenticated yet, or is closed at once when all have: the listener
    /// keeps serving and file descriptors stay free for the disk tier.
    pub max_connections: usize,
    /// Time from accept to a successful `Hello`; an unauthenticated connection costs a slot
    /// only this long.
    pub hello_timeout: Duration,
    /// An authenticated connection without an upload in progress is closed after this long
    /// without a request.
    pub idle_timeout: Duration,
    /// Longest wait for a frame (or the rest of one) inside an upload or a request: past it
    /// the connection is closed and an unfinished upload returns its memory.
    pub frame_timeout: Duration,
    /// Longest a write to the client may stall: a client that stops reading a file is dropped
    /// and releases the snapshot it pins.
    pub write_timeout: Duration,
}

/// Everything but the token, which must never reach a log.
impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_connections", &self.max_connections)
            .field("hello_timeout", &self.hello_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("frame_timeout", &self.frame_timeout)
            .field("write_timeout", &self.write_timeout)
            .finish()
    }
}

impl ServeOptions {
    /// Defaults: a connection limit derived from this process's open-file limit, 5 s for
    /// `Hello`, 120 s idle, 30 s per frame and per write.
    pub fn new(token: Option<Arc<str>>) -> ServeOptions {
        ServeOptions {
            token,
            max_connections: default_max_connections(),
            hello_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
            frame_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Three quarters of the soft open-file limit (at least 16, at most 8192): the rest is left for
/// the listener, the runtime and the disk tier's open snapshot files.
pub fn default_max_connections() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    (soft.saturating_mul(3) / 4).clamp(16, 8192) as usize
}

/// Serves with [`ServeOptions::new`] until `shutdown` resolves.
pub async fn serve(
    listener: Listener,
    store: Arc<Store>,
    token: Option<Arc<str>>,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(listener, store, ServeOptions::new(token), shutdown).await
}

/// Serves until `shutdown` resolves; connections in progress are then dropped (uploads that
/// did not commit leave no trace). Accept errors (out of file descriptors, aborted
/// handshakes...) are logged and retried with backoff: they never end the server.
pub async fn serve_with(
    listener: Listener,
    store: Arc<Store>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    // When every connection has authenticated, a new one is closed at once: the listener
    // keeps serving and file descriptors stay free for the disk tier.
    let limit = Limit::close(options.max_connections);
    let ctx = Arc::new(Ctx { store, options });
    torpor_accept::accept_loop(
        "pool",
        &Accepting(&listener),
        limit,
        shutdown,
        |accepted, proven| start_connection(accepted, ctx.clone(), proven),
    )
    .await;
    if let Listener::Unix(_, p) = &listener {
        let _ = std::fs::remove_file(p);
    }
}

/// What every connection task shares.
#[derive(Debug)]
struct Ctx {
    store: Arc<Store>,
    options: ServeOptions,
}

/// Sets up one accepted connection (socket options, and the transport on top of it) and
/// serves it.
async fn start_connection(accepted: Accepted, ctx: Arc<Ctx>, proven: Proven) {
    match accepted {
        Accepted::Tcp(s, peer) => {
            let _ = s.set_nodelay(true);
            crate::addr::enlarge_socket_buffers(&s);
            connection(s, ctx, proven, peer, None).await
        }
        Accepted::Tls(s, peer, acceptor) => {
            let _ = s.set_nodelay(true);
            crate::addr::enlarge_socket_buffers(&s);
            // The handshake runs in the connection's task (holding its slot, so a flood of
            // silent TLS clients gives way like unauthenticated ones), under a timeout.
            if let Some(s) = crate::tls::handshake(&acceptor, s, &peer).await {
                connection(s, ctx, proven, peer, None).await
            }
        }
        Accepted::Unix(s) => {
            crate::addr::enlarge_socket_buffers(&s);
            let fd = s.as_raw_fd();
            connection(s, ctx, proven, "unix".to_string(), Some(fd)).await
        }
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream, String),
    Tls(tokio::net::TcpStream, String, tokio_rustls::TlsAcceptor),
    Unix(tokio::net::UnixStream),
}

/// A [`Listener`] as the accept loop takes it (its connections are this module's business).
struct Accepting<'l>(&'l Listener);

impl Listen for Accepting<'_> {
    type Conn = Accepted;

    async fn accept(&self) -> io::Result<Accepted> {
        Ok(match self.0 {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Accepted::Tcp(s, peer.to_string())
            }
            Listener::Tls(l, acceptor) => {
                let (s, peer) = l.accept().await?;
                Accepted::Tls(s, peer.to_string(), acceptor.clone().into())
            }
            Listener::Unix(l, _) => Accepted::Unix(l.accept().await?.0),
        })
    }
}

/// What a connection waits for between requests (its idle timeout's name).
const IDLE_WAIT: &str = "request";

/// Why a connection was closed by the server.
#[derive(Debug, Error)]
enum SessionError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("wrong token")]
    Unauthorized,
    #[error("{0}")]
    Protocol(String),
    #[error("no {what} within {after:?}")]
    TimedOut { what: &'static str, after: Duration },
    #[error("the client did not read for {0:?}")]
    WriteStalled(Duration),
    #[error("closed to make room for a newer connection (connection limit)")]
    Evicted,
}

impl SessionError {
    fn code(&self) -> ErrorCode {
        match self {
            SessionError::Wire(_)
            | SessionError::Protocol(_)
            | SessionError::TimedOut { .. }
            | SessionError::WriteStalled(_)
            | SessionError::Evicted => ErrorCode::BadRequest,
            SessionError::Store(e) => e.code(),
            SessionError::Unauthorized => ErrorCode::Unauthorized,
        }
    }
}

/// Runs `io` for at most `limit`.
async fn within<T>(
    limit: Duration,
    what: &'static str,
    io: impl Future<Output = io::Result<T>>,
) -> Result<T, SessionError> {
    match tokio::time::timeout(limit, io).await {
        Ok(r) => r.map_err(|e| WireError::Io(e).into()),
        Err(_) => Err(SessionError::TimedOut { what, after: limit }),
    }
}

/// Reads a frame header; a clean end of stream before it is `Closed`.
async fn read_header<R: AsyncRead + Unpin>(
    rd: &mut R,
    limit: Duration,
    what: &'static str,
) -> Result<FrameHeader, SessionError> {
    let mut h = [0u8; HEADER_LEN];
    match tokio::time::timeout(limit, rd.read_exact(&mut h)).await {
        Ok(Ok(_)) => Ok(FrameHeader::decode(&h)?),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(WireError::Closed.into()),
        Ok(Err(e)) => Err(WireError::Io(e).into()),
        Err(_) => Err(SessionError::TimedOut { what, after: limit }),
    }
}

/// Reads the `Hello` (a small control frame, nothing larger is read or allocated), checks its
/// token, claims the connection's slot for good (`proven`) and answers `Welcome`.
async fn greet<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    token: Option<&str>,
    proven: &Proven,
) -> Result<(), SessionError> {
    let header = read_header(rd, Duration::MAX, "hello").await?;
    if header.kind != FrameKind::Control {
        return Err(WireError::UnexpectedKind {
            expected: FrameKind::Control,
            got: header.kind,
        }
        .into());
    }
    if header.len > MAX_HELLO_PAYLOAD {
        return Err(WireError::TooLarge {
            kind: header.kind,
            len: header.len,
            max: MAX_HELLO_PAYLOAD,
        }
        .into());
    }
    let mut buf = vec![0u8; header.len as usize];
    rd.read_exact(&mut buf).await.map_err(WireError::Io)?;
    header.verify(&buf)?;
    match wire::decode_control(&buf)? {
        Request::Hello { token: given } => {
            if given.len() > MAX_TOKEN_LEN {
                return Err(SessionError::Unauthorized);
            }
            if let Some(expected) = token {
                if !constant_time_eq(expected.as_bytes(), given.as_bytes()) {
                    return Err(SessionError::Unauthorized);
                }
            }
        }
        _ => {
            return Err(SessionError::Protocol(
                "the first request must be hello".into(),
            ))
        }
    }
    // Before the welcome: once the client holds it, a newer connection must not be admitted
    // in its place (the limit would be exceeded with both served).
    if !proven.proven() {
        return Err(SessionError::Evicted);
    }
    let welcome = wire::encode_control(&Response::Welcome {
        pool_version: env!("CARGO_PKG_VERSION").to_string(),
    });
    wr.write_all(&welcome).await.map_err(WireError::Io)?;
    wr.flush().await.map_err(WireError::Io)?;
    Ok(())
}

/// Longest the server waits to hand a closing error frame to a client.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one connection; `unix_fd` is its socket's descriptor when it is a Unix socket
/// (RAM-tier chunks are then spliced into it, see [`crate::splice`]).
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    ctx: Arc<Ctx>,
    proven: Proven,
    peer: String,
    unix_fd: Option<RawFd>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let hello_timeout = ctx.options.hello_timeout;
    // A newer connection that needs the slot first ends this task (the accept loop drops it).
    let greeted = tokio::time::timeout(
        hello_timeout,
        greet(&mut rd, &mut wr, ctx.options.token.as_deref(), &proven),
    )
    .await
    .unwrap_or(Err(SessionError::TimedOut {
        what: "hello",
        after: hello_timeout,
    }));
    if let Err(e) = greeted {
        // Unauthenticated peers are logged quietly: a flood of them must not flood the log.
        match &e {
            SessionError::Wire(WireError::Closed) | SessionError::Evicted => {
                debug!(%peer, error = %e, "unauthenticated pool connection closed")
            }
            SessionError::Unauthorized => info!(%peer, "pool connection refused: wrong token"),
            _ => debug!(%peer, error = %e, "pool connection refused before hello"),
        }
        if !matches!(
            e,
            SessionError::Wire(WireError::Closed) | SessionError::Evicted
        ) {
            let frame = wire::encode_control(&Response::Error {
                code: e.code(),
                message: e.to_string(),
            });
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, wr.write_all(&frame)).await;
        }
        return;
    }
    let mut session = Session {
        rd,
        wr: BufWriter::with_capacity(64 << 10, wr),
        store: ctx.store.clone(),
        options: &ctx.options,
        upload: None,
        buf: Vec::new(),
        splice: unix_fd.map_or(Splice::No, Splice::NotYet),
        in_flight: None,
    };
    match session.run().await {
        Ok(()) | Err(SessionError::Wire(WireError::Closed)) => {
            debug!(%peer, "pool connection closed")
        }
        Err(e) => {
            let message = error_chain(&e);
            // A client that keeps its connection for later and sends nothing is no fault.
            if matches!(
                e,
                SessionError::TimedOut {
                    what: IDLE_WAIT,
                    ..
                }
            ) {
                debug!(%peer, error = %message, "idle pool connection closed");
            } else {
                warn!(%peer, error = %message, "pool connection ended with an error");
            }
            // A client that stopped reading would not take the error frame either.
            if !matches!(e, SessionError::WriteStalled(_)) {
                let frame = wire::encode_control(&Response::Error {
                    code: e.code(),
                    message,
                });
                let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
                    session.wr.write_all(&frame).await?;
                    session.wr.flush().await
                })
                .await;
            }
        }
    }
    if let Some(u) = session.upload.take() {
        info!(%peer, name = u.name(), "upload abandoned before commit; discarded");
    }
}

struct Session<'o, R, W: AsyncWrite> {
    rd: R,
    wr: BufWriter<W>,
    store: Arc<Store>,
    options: &'o ServeOptions,
    upload: Option<Upload>,
    /// Reused buffer for control payloads and disk-tier reads.
    buf: Vec<u8>,
    splice: Splice,
    /// The snapshot whose pages the last answer spliced into the socket: kept until the
    /// client's next request, so those pages stay what they were until it read them.
    in_flight: Option<StoredData>,
}

/// Whether RAM-tier chunks go to the client without a copy.
#[derive(Debug)]
enum Splice {
    /// Not a Unix socket (TLS encrypts anyway; TCP may still hold sent pages for a retransmit).
    No,
    /// The connection's Unix socket, whose session outlives any use of the descriptor; the
    /// splicer (a pipe) is made at the first file served.
    NotYet(RawFd),
    Ready(Splicer),
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Session<'_, R, W> {
    async fn run(&mut self) -> Result<(), SessionError> {
        loop {
            // Inside an upload the client is streaming: a pause means it is gone (or hung),
            // and the upload's memory must not wait for it as long as an idle client may.
            let header = match self.upload {
                Some(_) => {
                    read_header(
                        &mut self.rd,
                        self.options.frame_timeout,
                        "frame inside an upload",
                    )
                    .await?
                }
                None => read_header(&mut self.rd, self.options.idle_timeout, IDLE_WAIT).await?,
            };
            // The client sent this only after reading every answer before it.
            self.in_flight = None;
            match header.kind {
                FrameKind::Data => self.receive_data(header).await?,
                FrameKind::Control => {
                    let req = self.read_control_payload(header).await?;
                    let in_upload =
                        self.upload.is_some() || matches!(req, Request::PutBegin { .. });
                    match self.handle(req).await {
                        // A refused lookup is an answer, not a broken connection; inside an
                        // upload the peer is streaming, so the connection must end.
                        Err(SessionError::Store(e)) if !in_upload => {
                            let message = error_chain(&e);
                            debug!(error = %message, "request refused");
                            self.send(&Response::Error {
                                code: e.code(),
                                message,
                            })
                            .await?;
                        }
                        other => other?,
                    }
                }
            }
        }
    }

    async fn read_control_payload(&mut self, header: FrameHeader) -> Result<Request, SessionError> {
        self.buf.resize(header.len as usize, 0);
        within(
            self.options.frame_timeout,
            "control frame payload",
            self.rd.read_exact(&mut self.buf),
        )
        .await?;
        header.verify(&self.buf)?;
        Ok(wire::decode_control(&self.buf)?)
    }

    /// Writes to the client; a client that takes nothing for `write_timeout` is dropped.
    async fn write(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let limit = self.options.write_timeout;
        match tokio::time::timeout(limit, self.wr.write_all(bytes)).await {
            Ok(r) => r.map_err(|e| WireError::Io(e).into()),
            Err(_) => Err(SessionError::WriteStalled(limit)),
        }
    }

    /// Sends `head` and then `pages` (which must stay unchanged until the client's next
    /// request) through the splicer; `false` (nothing sent) where there is none.
    async fn send_spliced(&mut self, head: &[u8], pages: &[u8]) -> Result<bool, SessionError> {
        if let Splice::NotYet(fd) = self.splice {
            // SAFETY: the descriptor is this session's socket, open for as long as the session.
            let sock = unsafe { BorrowedFd::borrow_raw(fd) };
            self.splice = match Splicer::new(sock) {
                Ok(s) => Splice::Ready(s),
                Err(e) => {
                    debug!(error = %e, "no splicing on this connection; copying");
                    Splice::No
                }
            };
        }
        if matches!(self.splice, Splice::No) {
            return Ok(false);
        }
        // What is buffered goes first.
        let limit = self.options.write_timeout;
        match tokio::time::timeout(limit, self.wr.flush()).await {
            Ok(r) => r.map_err(WireError::Io)?,
            Err(_) => return Err(SessionError::WriteStalled(limit)),
        }
        let Splice::Ready(splicer) = &mut self.splice else {
            return Ok(false);
        };
        match splicer.send(head, pages, limit).await {
            Ok(()) => Ok(true),
            Err(SpliceError::Io(e)) => Err(WireError::Io(e).into()),
            Err(SpliceError::Stalled) => Err(SessionError::WriteStalled(limit)),
        }
    }

    async fn send(&mut self, resp: &Response) -> Result<(), SessionError> {
        self.write(&wire::encode_control(resp)).await?;
        let limit = self.options.write_timeout;
        match tokio::time::timeout(limit, self.wr.flush()).await {
            Ok(r) => r.map_err(|e| WireError::Io(e).into()),
            Err(_) => Err(SessionError::WriteStalled(limit)),
        }
    }

    /// Reads a data frame's bytes straight into the upload's chunks.
    async fn receive_data(&mut self, header: FrameHeader) -> Result<(), SessionError> {
        let limit = self.options.frame_timeout;
        let mut id = [0u8; 4];
        within(limit, "data frame", self.rd.read_exact(&mut id)).await?;
        let file_id = u32::from_le_bytes(id);
        let upload = self
            .upload
            .as_mut()
            .ok_or_else(|| SessionError::Protocol("data frame outside an upload".into()))?;
        let mut crc = crc32c::crc32c(&id);
        let mut remaining = header.len as usize - 4;
        if upload.takes_small(file_id, remaining)? {
            self.buf.resize(remaining, 0);
            within(limit, "data frame bytes", self.rd.read_exact(&mut self.buf)).await?;
            let piece_crc = loop {
                if let Some(c) = upload.try_append_small(file_id, &self.buf)? {
                    break c;
                }
                let store = self.store.clone();
                let bytes = remaining as u64;
                tokio::task::spawn_blocking(move || store.make_room(bytes))
                    .await
                    .expect("spill task panicked")?;
            };
            crc = crc::combine(crc, piece_crc, remaining);
            remaining = 0;
        }
        while remaining > 0 {
            if upload.writable_chunk(file_id)?.is_none() {
                let chunk = match self.store.try_alloc_chunk() {
                    Some(c) => c,
                    None => {
                        let store = self.store.clone();
                        tokio::task::spawn_blocking(move || store.alloc_chunk())
                            .await
                            .expect("alloc task panicked")?
                    }
                };
                upload.push_chunk(file_id, chunk)?;
            }
            let chunk = upload.writable_chunk(file_id)?.expect("chunk with room");
            let spare = chunk.spare_mut();
            let n = remaining.min(spare.len());
            within(
                limit,
                "data frame bytes",
                self.rd.read_exact(&mut spare[..n]),
            )
            .await?;
            let piece_crc = upload.advance(file_id, n)?;
            crc = crc::combine(crc, piece_crc, n);
            remaining -= n;
        }
        if crc != header.crc {
            return Err(WireError::ChecksumMismatch {
                expected: header.crc,
                actual: crc,
            }
            .into());
        }
        Ok(())
    }

    fn upload_mut(&mut self) -> Result<&mut Upload, SessionError> {
        self.upload
            .as_mut()
            .ok_or_else(|| SessionError::Protocol("no upload in progress".into()))
    }

    async fn handle(&mut self, req: Request) -> Result<(), SessionError> {
        match req {
            Request::Hello { .. } => Err(SessionError::Protocol("hello sent twice".into())),
            Request::PutBegin {
                name,
                meta,
                size_hint,
            } => {
                if self.upload.is_some() {
                    return Err(SessionError::Protocol(
                        "an upload is already in progress".into(),
                    ));
                }
                let next_generation = self.store.next_generation(&name);
                self.upload = Some(self.store.begin_upload(&name, meta, size_hint)?);
                self.send(&Response::PutReady { next_generation }).await
            }
            Request::FileOpen { file_id, name } => {
                Ok(self.upload_mut()?.open_file(file_id, &name)?)
            }
            Request::FileClose { file_id, size } => {
                Ok(self.upload_mut()?.close_file(file_id, size)?)
            }
            Request::PutCommit { generation, seal } => {
                let upload = self
                    .upload
                    .take()
                    .ok_or_else(|| SessionError::Protocol("no upload in progress".into()))?;
                let name = upload.name().to_string();
                let c = self.store.commit(upload, generation, seal)?;
                info!(%name, generation = c.generation, bytes = c.bytes, "snapshot committed");
                self.send(&Response::Committed {
                    generation: c.generation,
                    bytes: c.bytes,
                    tier: c.tier,
                })
                .await
            }
            Request::PutAbort => {
                self.upload = None;
                Ok(())
            }
            Request::List => {
                let snapshots = self.store.list();
                self.send(&Response::Listing { snapshots }).await
            }
            Request::GetManifest { name, generation } => {
                let (manifest, _) = self.store.lookup(&name, generation)?;
                self.send(&Response::Manifest {
                    manifest: (*manifest).clone(),
                })
                .await
            }
            Request::GetFile {
                name,
                generation,
                file,
            } => self.send_file(&name, generation, &file).await,
            Request::GetRange {
                name,
                generation,
                file,
                offset,
                len,
                sealed,
            } => {
                self.send_range(&name, generation, &file, offset, len, sealed)
                    .await
            }
            Request::Delete { name, generation } => {
                let count = self.store.delete(&name, generation);
                self.send(&Response::Deleted { count }).await
            }
        }
    }

    /// Streams a file chunk by chunk, each verified against its stored CRC first.
    async fn send_file(
        &mut self,
        name: &str,
        generation: u64,
        file: &str,
    ) -> Result<(), SessionError> {
        let (manifest, data) = self.store.lookup(name, Some(generation))?;
        let (index, entry) =
            find_file(&manifest, file).ok_or_else(|| StoreError::FileNotFound {
                name: name.to_string(),
                generation,
                file: file.to_string(),
            })?;
        for chunk in 0..entry.chunk_crcs.len() {
            match &data {
                StoredData::Ram(files) => {
                    let frame =
                        data.with_chunk(&manifest, index, chunk, &mut self.buf, data_frame_prefix)?;
                    let bytes = files[index].chunk(chunk);
                    if self.send_spliced(&frame, bytes).await? {
                        self.in_flight = Some(data.clone());
                    } else {
                        self.write(&frame).await?;
                        self.write(bytes).await?;
                    }
                }
                StoredData::Disk(_) => {
                    let (d, m) = (data.clone(), manifest.clone());
                    let mut buf = std::mem::take(&mut self.buf);
                    let (frame, buf) = tokio::task::spawn_blocking(move || {
                        let r = d.with_chunk(&m, index, chunk, &mut buf, data_frame_prefix);
                        (r, buf)
                    })
                    .await
                    .expect("disk read task panicked");
                    self.buf = buf;
                    let frame = frame?;
                    self.write(&frame).await?;
                    let buf = std::mem::take(&mut self.buf);
                    let written = self.write(&buf).await;
                    self.buf = buf;
                    written?;
                }
            }
        }
        self.send(&Response::FileEnd { size: entry.size }).await
    }

    /// Streams a byte range of a file, a frame per chunk it touches, each piece checked
    /// against the CRCs of the blocks it touches first (unless the client checks it against
    /// the seal: `sealed`).
    async fn send_range(
        &mut self,
        name: &str,
        generation: u64,
        file: &str,
        offset: u64,
        len: u64,
        sealed: bool,
    ) -> Result<(), SessionError> {
        let (manifest, data) = self.store.lookup(name, Some(generation))?;
        let (index, entry) =
            find_file(&manifest, file).ok_or_else(|| StoreError::FileNotFound {
                name: name.to_string(),
                generation,
                file: file.to_string(),
            })?;
        check_range(entry, offset, len)?;
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = (end.min((at / CHUNK_SIZE + 1) * CHUNK_SIZE) - at) as usize;
            match &data {
                StoredData::Ram(_) => {
                    let mut buf = std::mem::take(&mut self.buf);
                    let written = match data.range(&manifest, index, at, n, &mut buf, sealed) {
                        Ok((bytes, crc)) => {
                            let frame = data_frame_prefix(bytes, crc);
                            match self.send_spliced(&frame, bytes).await {
                                Ok(true) => {
                                    self.in_flight = Some(data.clone());
                                    Ok(())
                                }
                                Ok(false) => match self.write(&frame).await {
                                    Ok(()) => self.write(bytes).await,
                                    Err(e) => Err(e),
                                },
                                Err(e) => Err(e),
                            }
                        }
                        Err(e) => Err(e.into()),
                    };
                    self.buf = buf;
                    written?;
                }
                StoredData::Disk(_) => {
                    let (d, m) = (data.clone(), manifest.clone());
                    let mut buf = std::mem::take(&mut self.buf);
                    let (frame, buf) = tokio::task::spawn_blocking(move || {
                        let r = d
                            .range(&m, index, at, n, &mut buf, false)
                            .map(|(bytes, crc)| data_frame_prefix(bytes, crc));
                        (r, buf)
                    })
                    .await
                    .expect("disk read task panicked");
                    self.buf = buf;
                    let frame = frame?;
                    self.write(&frame).await?;
                    // The disk tier leaves the range's bytes at the start of the buffer.
                    let buf = std::mem::take(&mut self.buf);
                    let written = self.write(&buf[..n]).await;
                    self.buf = buf;
                    written?;
                }
            }
            at += n as u64;
        }
        self.send(&Response::FileEnd { size: len }).await
    }
}

fn find_file<'m>(m: &'m Manifest, name: &str) -> Option<(usize, &'m FileEntry)> {
    m.files.iter().enumerate().find(|(_, f)| f.name == name)
}

/// Header and file id (0) of the data frame that carries `bytes`, whose CRC32C is already
/// known (verified against the store), so the frame CRC is combined, not recomputed.
fn data_frame_prefix(bytes: &[u8], bytes_crc: u32) -> [u8; HEADER_LEN + 4] {
    let id = 0u32.to_le_bytes();
    let crc = crc::combine(crc32c::crc32c(&id), bytes_crc, bytes.len());
    let header = FrameHeader {
        kind: FrameKind::Data,
        len: (4 + bytes.len()) as u32,
        crc,
    };
    let mut out = [0u8; HEADER_LEN + 4];
    out[..HEADER_LEN].copy_from_slice(&header.encode());
    out[HEADER_LEN..].copy_from_slice(&id);
    out
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
