//! The pool server: accepts TCP or Unix connections and runs the wire protocol against a
//! [`Store`]. Data frames of an upload are read straight into arena chunks (no intermediate
//! buffer). Any protocol violation, oversized frame or checksum failure is answered with an
//! error frame and the connection is closed; the store is never left with a partial upload.

use std::{future::Future, io, path::PathBuf, sync::Arc};

use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter},
    net::{TcpListener, UnixListener},
    task::JoinSet,
};
use torpor_image::{
    wire::{
        self, ErrorCode, FrameHeader, FrameKind, Request, Response, WireError, HEADER_LEN,
        MAX_TOKEN_LEN,
    },
    FileEntry, Manifest,
};
use tracing::{debug, info, warn};

use crate::{
    addr::PoolAddr,
    store::{error_chain, Store, StoreError, StoredData, Upload},
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

/// Why the server stopped.
#[derive(Debug, Error)]
pub enum PoolServerError {
    #[error("accepting connections failed")]
    Accept(#[source] io::Error),
}

/// Serves until `shutdown` resolves; connections in progress are then dropped (uploads that
/// did not commit leave no trace).
pub async fn serve(
    listener: Listener,
    store: Arc<Store>,
    token: Option<Arc<str>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PoolServerError> {
    tokio::pin!(shutdown);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = accept(&listener) => {
                let stream = accepted.map_err(PoolServerError::Accept)?;
                let store = store.clone();
                let token = token.clone();
                match stream {
                    Accepted::Tcp(s, peer) => {
                        let _ = s.set_nodelay(true);
                        crate::addr::enlarge_socket_buffers(&s);
                        conns.spawn(connection(s, store, token, peer));
                    }
                    Accepted::Tls(s, peer, acceptor) => {
                        let _ = s.set_nodelay(true);
                        crate::addr::enlarge_socket_buffers(&s);
                        // The handshake runs in the connection's task, under a timeout.
                        conns.spawn(async move {
                            if let Some(s) = crate::tls::handshake(&acceptor, s, &peer).await {
                                connection(s, store, token, peer).await
                            }
                        });
                    }
                    Accepted::Unix(s) => {
                        crate::addr::enlarge_socket_buffers(&s);
                        conns.spawn(connection(s, store, token, "unix".to_string()));
                    }
                }
            }
        }
    }
    conns.shutdown().await;
    if let Listener::Unix(_, p) = &listener {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

enum Accepted {
    Tcp(tokio::net::TcpStream, String),
    Tls(tokio::net::TcpStream, String, tokio_rustls::TlsAcceptor),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> io::Result<Accepted> {
    Ok(match l {
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
}

impl SessionError {
    fn code(&self) -> ErrorCode {
        match self {
            SessionError::Wire(_) | SessionError::Protocol(_) => ErrorCode::BadRequest,
            SessionError::Store(e) => e.code(),
            SessionError::Unauthorized => ErrorCode::Unauthorized,
        }
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    store: Arc<Store>,
    token: Option<Arc<str>>,
    peer: String,
) {
    let (rd, wr) = tokio::io::split(stream);
    let mut session = Session {
        rd,
        wr: BufWriter::with_capacity(64 << 10, wr),
        store,
        upload: None,
        buf: Vec::new(),
    };
    match session.run(token.as_deref()).await {
        Ok(()) | Err(SessionError::Wire(WireError::Closed)) => {
            debug!(%peer, "pool connection closed")
        }
        Err(e) => {
            let message = error_chain(&e);
            warn!(%peer, error = %message, "pool connection ended with an error");
            let _ = session
                .send(&Response::Error {
                    code: e.code(),
                    message,
                })
                .await;
        }
    }
    if let Some(u) = session.upload.take() {
        info!(%peer, name = u.name(), "upload abandoned before commit; discarded");
    }
}

struct Session<R, W: AsyncWrite> {
    rd: R,
    wr: BufWriter<W>,
    store: Arc<Store>,
    upload: Option<Upload>,
    /// Reused buffer for control payloads and disk-tier reads.
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Session<R, W> {
    async fn run(&mut self, token: Option<&str>) -> Result<(), SessionError> {
        match self.read_control().await? {
            Request::Hello { token: given } => {
                if given.len() > MAX_TOKEN_LEN {
                    return Err(SessionError::Unauthorized);
                }
                if let Some(expected) = token {
                    if !constant_time_eq(expected.as_bytes(), given.as_bytes()) {
                        return Err(SessionError::Unauthorized);
                    }
                }
                self.send(&Response::Welcome {
                    pool_version: env!("CARGO_PKG_VERSION").to_string(),
                })
                .await?;
            }
            _ => {
                return Err(SessionError::Protocol(
                    "the first request must be hello".into(),
                ))
            }
        }
        loop {
            let header = self.read_header().await?;
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

    async fn read_header(&mut self) -> Result<FrameHeader, SessionError> {
        let mut h = [0u8; HEADER_LEN];
        match self.rd.read_exact(&mut h).await {
            Ok(_) => Ok(FrameHeader::decode(&h)?),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(WireError::Closed.into()),
            Err(e) => Err(WireError::Io(e).into()),
        }
    }

    async fn read_control(&mut self) -> Result<Request, SessionError> {
        let header = self.read_header().await?;
        if header.kind != FrameKind::Control {
            return Err(WireError::UnexpectedKind {
                expected: FrameKind::Control,
                got: header.kind,
            }
            .into());
        }
        self.read_control_payload(header).await
    }

    async fn read_control_payload(&mut self, header: FrameHeader) -> Result<Request, SessionError> {
        self.buf.resize(header.len as usize, 0);
        self.rd
            .read_exact(&mut self.buf)
            .await
            .map_err(WireError::Io)?;
        header.verify(&self.buf)?;
        Ok(wire::decode_control(&self.buf)?)
    }

    async fn send(&mut self, resp: &Response) -> Result<(), SessionError> {
        self.wr
            .write_all(&wire::encode_control(resp))
            .await
            .map_err(WireError::Io)?;
        self.wr.flush().await.map_err(WireError::Io)?;
        Ok(())
    }

    /// Reads a data frame's bytes straight into the upload's chunks.
    async fn receive_data(&mut self, header: FrameHeader) -> Result<(), SessionError> {
        let mut id = [0u8; 4];
        self.rd.read_exact(&mut id).await.map_err(WireError::Io)?;
        let file_id = u32::from_le_bytes(id);
        let upload = self
            .upload
            .as_mut()
            .ok_or_else(|| SessionError::Protocol("data frame outside an upload".into()))?;
        let mut crc = crc32c::crc32c(&id);
        let mut remaining = header.len as usize - 4;
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
            self.rd
                .read_exact(&mut spare[..n])
                .await
                .map_err(WireError::Io)?;
            let piece_crc = crc32c::crc32c(&spare[..n]);
            crc = crc32c::crc32c_combine(crc, piece_crc, n);
            upload.advance(file_id, n, piece_crc)?;
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
                self.upload = Some(self.store.begin_upload(&name, meta, size_hint)?);
                self.send(&Response::PutReady).await
            }
            Request::FileOpen { file_id, name } => {
                Ok(self.upload_mut()?.open_file(file_id, &name)?)
            }
            Request::FileClose { file_id, size } => {
                Ok(self.upload_mut()?.close_file(file_id, size)?)
            }
            Request::PutCommit => {
                let upload = self
                    .upload
                    .take()
                    .ok_or_else(|| SessionError::Protocol("no upload in progress".into()))?;
                let name = upload.name().to_string();
                let c = self.store.commit(upload)?;
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
                StoredData::Ram(chunks) => {
                    let frame =
                        data.with_chunk(&manifest, index, chunk, &mut self.buf, data_frame_prefix)?;
                    self.wr.write_all(&frame).await.map_err(WireError::Io)?;
                    self.wr
                        .write_all(chunks[index][chunk].bytes())
                        .await
                        .map_err(WireError::Io)?;
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
                    self.wr.write_all(&frame).await.map_err(WireError::Io)?;
                    self.wr.write_all(&self.buf).await.map_err(WireError::Io)?;
                }
            }
        }
        self.send(&Response::FileEnd { size: entry.size }).await
    }
}

fn find_file<'m>(m: &'m Manifest, name: &str) -> Option<(usize, &'m FileEntry)> {
    m.files.iter().enumerate().find(|(_, f)| f.name == name)
}

/// Header and file id (0) of the data frame that carries `bytes`, whose CRC32C is already
/// known (verified against the store), so the frame CRC is combined, not recomputed.
fn data_frame_prefix(bytes: &[u8], bytes_crc: u32) -> [u8; HEADER_LEN + 4] {
    let id = 0u32.to_le_bytes();
    let crc = crc32c::crc32c_combine(crc32c::crc32c(&id), bytes_crc, bytes.len());
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
