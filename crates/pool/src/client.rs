//! Blocking client of the pool, used from the CRIU engine's threads and the CLI: plaintext
//! over a Unix socket or loopback TCP, TLS (rustls, pinned certificate) over TCP, every socket
//! read and write under the target's [`Timeouts`](crate::target::Timeouts).

use std::{
    fmt,
    io::{self, BufReader, BufWriter, Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use rustls::{ClientConnection, StreamOwned};
use thiserror::Error;
use torpor_image::{
    manifest::SnapshotMeta,
    wire::{
        self, ErrorCode, Frame, FrameHeader, FrameKind, Request, Response, SnapshotInfo, Tier,
        WireError,
    },
    Manifest, Seal,
};

use crate::{addr::PoolAddr, store::error_chain, target::PoolTarget};

/// Why a pool call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to pool at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The pool stopped answering: nothing moved on the socket for the configured time.
    #[error("pool did not answer within {after:?} while {during}")]
    Timeout { during: Stage, after: Duration },
    #[error("refusing plaintext TCP to {addr}, which is not loopback: the token and snapshots would cross the network in clear (pin the pool's certificate with tls_cert / --pool-cert, or allow it with insecure / --pool-insecure)")]
    Cleartext { addr: String },
    #[error("TLS handshake with pool at {addr} failed")]
    Handshake {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("pool refused: {message}")]
    Pool { code: ErrorCode, message: String },
    #[error("unexpected reply from pool: {0}")]
    Unexpected(String),
    #[error("pool sent data for file id {0}, expected 0")]
    WrongFileId(u32),
    #[error("writing the file to its destination failed")]
    Sink(#[source] io::Error),
}

/// What a client was doing when its pool went silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Handshake,
    Send,
    Receive,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connecting",
            Stage::Handshake => "in the TLS handshake",
            Stage::Send => "sending",
            Stage::Receive => "waiting for its reply",
        })
    }
}

impl ClientError {
    /// The pool's error class, when the pool itself refused.
    pub fn pool_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Pool { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True when the pool stopped answering (as opposed to refusing or closing).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout { .. })
    }
}

/// A socket read or write that hit its `SO_RCVTIMEO`/`SO_SNDTIMEO`.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

type TlsStream = StreamOwned<ClientConnection, Timed<TcpStream>>;

/// A socket with `SO_SNDTIMEO` set to `stall`, whose writes count as timed out as soon as
/// one waited that long: a write that moved some bytes and then waited out the timeout
/// returns a short count, and without this the next write would wait a whole timeout
/// again, doubling the time a stopped pool goes unnoticed.
#[derive(Debug)]
struct Timed<S> {
    sock: S,
    stall: Duration,
}

impl<S> Timed<S> {
    fn new(sock: S, stall: Duration) -> Timed<S> {
        Timed { sock, stall }
    }
}

impl<S: Read> Read for Timed<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.read(buf)
    }
}

impl<S: Write> Write for Timed<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let started = Instant::now();
        let n = self.sock.write(buf)?;
        if n < buf.len() && started.elapsed() >= self.stall {
            // The connection is abandoned after any error, so the bytes that did go out
            // do not matter.
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

#[derive(Debug)]
enum Stream {
    Tcp(Timed<TcpStream>),
    Unix(Timed<UnixStream>),
    /// One TLS session shared by the reader and the writer half; the client is blocking and
    /// strictly request/reply, so the two never wait on each other.
    Tls(Arc<Mutex<TlsStream>>),
}

fn lock(s: &Mutex<TlsStream>) -> MutexGuard<'_, TlsStream> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(Timed::new(s.sock.try_clone()?, s.stall)),
            Stream::Unix(s) => Stream::Unix(Timed::new(s.sock.try_clone()?, s.stall)),
            Stream::Tls(s) => Stream::Tls(s.clone()),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.sock.set_read_timeout(t),
            Stream::Unix(s) => s.sock.set_read_timeout(t),
            Stream::Tls(s) => lock(s).sock.sock.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => lock(s).read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => lock(s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(s) => lock(s).flush(),
        }
    }
}

/// A connection to a pool, authenticated.
#[derive(Debug)]
pub struct PoolClient {
    rd: BufReader<Stream>,
    wr: BufWriter<Stream>,
    buf: Vec<u8>,
    /// Reported in [`ClientError::Timeout`].
    frame_timeout: Duration,
}

/// Result of a committed upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    pub generation: u64,
    pub bytes: u64,
    pub tier: Tier,
}

impl PoolClient {
    /// Connects to `addr` and says hello with `token` (empty when the pool has no token),
    /// with the default timeouts and no TLS; see [`PoolTarget`] for the rest.
    pub fn connect(addr: &PoolAddr, token: &str) -> Result<PoolClient, ClientError> {
        PoolTarget::new(addr.clone(), token).connect()
    }

    /// Connects as `target` says and says hello.
    pub(crate) fn open(target: &PoolTarget) -> Result<PoolClient, ClientError> {
        let addr = &target.addr;
        let t = target.timeouts;
        let connect_err = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let stream = match addr {
            PoolAddr::Tcp(a) => {
                let s = connect_tcp(target.check_transport()?, t.connect, a)?;
                s.set_nodelay(true).map_err(connect_err)?;
                crate::addr::enlarge_socket_buffers(&s);
                match &target.tls {
                    Some(tls) => Stream::Tls(Arc::new(Mutex::new(tls_handshake(s, tls, a, t)?))),
                    None => {
                        set_timeouts(&s, t.frame).map_err(connect_err)?;
                        Stream::Tcp(Timed::new(s, t.frame))
                    }
                }
            }
            PoolAddr::Unix(p) => {
                let s = connect_unix(p, t.connect).map_err(|e| {
                    if is_timeout(&e) {
                        ClientError::Timeout {
                            during: Stage::Connect,
                            after: t.connect,
                        }
                    } else {
                        connect_err(e)
                    }
                })?;
                crate::addr::enlarge_socket_buffers(&s);
                s.set_read_timeout(Some(t.frame))
                    .and_then(|()| s.set_write_timeout(Some(t.frame)))
                    .map_err(connect_err)?;
                Stream::Unix(Timed::new(s, t.frame))
            }
        };
        let rd = BufReader::with_capacity(64 << 10, stream.try_clone().map_err(connect_err)?);
        let wr = BufWriter::with_capacity(64 << 10, stream);
        let mut client = PoolClient {
            rd,
            wr,
            buf: Vec::new(),
            frame_timeout: t.frame,
        };
        match client.call(&Request::Hello {
            token: target.token.clone(),
        })? {
            Response::Welcome { .. } => Ok(client),
            other => Err(unexpected(other)),
        }
    }

    /// A socket error that is a timeout becomes [`ClientError::Timeout`].
    fn classify(&self, e: ClientError, during: Stage) -> ClientError {
        match e {
            ClientError::Wire(WireError::Io(io)) if is_timeout(&io) => ClientError::Timeout {
                during,
                after: self.frame_timeout,
            },
            e => e,
        }
    }

    fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let r = self
            .wr
            .write_all(&wire::encode_control(req))
            .and_then(|()| self.wr.flush());
        r.map_err(|e| self.classify(WireError::Io(e).into(), Stage::Send))
    }

    fn recv(&mut self) -> Result<Response, ClientError> {
        let frame = match wire::read_frame(&mut self.rd, &mut self.buf) {
            Ok(f) => f,
            Err(e) => {
                let e = ClientError::from(e);
                return Err(self.classify(e, Stage::Receive));
            }
        };
        match frame {
            Frame::Control(p) => match wire::decode_control(p)? {
                Response::Error { code, message } => Err(ClientError::Pool { code, message }),
                r => Ok(r),
            },
            Frame::Data { .. } => Err(ClientError::Unexpected("data frame".into())),
        }
    }

    fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        match self.send(req) {
            Ok(()) => self.recv(),
            Err(e) => Err(self.explain_write_failure(e)),
        }
    }

    /// After a failed write the pool has usually said why before closing; fetch that. A pool
    /// that went silent has nothing to say.
    fn explain_write_failure(&mut self, e: ClientError) -> ClientError {
        if e.is_timeout() {
            return e;
        }
        let _ = self
            .rd
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(2)));
        match self.recv() {
            Err(pool @ ClientError::Pool { .. }) => pool,
            _ => e,
        }
    }

    /// Starts an upload; returns the generation a commit would get now.
    pub fn put_begin(
        &mut self,
        name: &str,
        meta: SnapshotMeta,
        size_hint: Option<u64>,
    ) -> Result<u64, ClientError> {
        match self.call(&Request::PutBegin {
            name: name.to_string(),
            meta,
            size_hint,
        })? {
            Response::PutReady { next_generation } => Ok(next_generation),
            other => Err(unexpected(other)),
        }
    }

    pub fn file_open(&mut self, file_id: u32, name: &str) -> Result<(), ClientError> {
        self.send(&Request::FileOpen {
            file_id,
            name: name.to_string(),
        })
        .map_err(|e| self.explain_write_failure(e))
    }

    /// Sends up to one chunk of a file's bytes.
    pub fn file_data(&mut self, file_id: u32, bytes: &[u8]) -> Result<(), ClientError> {
        let r = wire::write_data(&mut self.wr, file_id, bytes).map_err(ClientError::from);
        r.map_err(|e| {
            let e = self.classify(e, Stage::Send);
            self.explain_write_failure(e)
        })
    }

    pub fn file_close(&mut self, file_id: u32, size: u64) -> Result<(), ClientError> {
        self.send(&Request::FileClose { file_id, size })
            .map_err(|e| self.explain_write_failure(e))
    }

    /// Commits the upload as `generation` (the next one when `None`), with the node's seal.
    pub fn commit(
        &mut self,
        generation: Option<u64>,
        seal: Option<Seal>,
    ) -> Result<CommitInfo, ClientError> {
        match self.call(&Request::PutCommit { generation, seal })? {
            Response::Committed {
                generation,
                bytes,
                tier,
            } => Ok(CommitInfo {
                generation,
                bytes,
                tier,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Drops the upload in progress.
    pub fn abort(&mut self) -> Result<(), ClientError> {
        self.send(&Request::PutAbort)
    }

    pub fn list(&mut self) -> Result<Vec<SnapshotInfo>, ClientError> {
        match self.call(&Request::List)? {
            Response::Listing { snapshots } => Ok(snapshots),
            other => Err(unexpected(other)),
        }
    }

    /// The manifest of a generation, the newest when `None`.
    pub fn manifest(
        &mut self,
        name: &str,
        generation: Option<u64>,
    ) -> Result<Manifest, ClientError> {
        match self.call(&Request::GetManifest {
            name: name.to_string(),
            generation,
        })? {
            Response::Manifest { manifest } => {
                manifest
                    .validate()
                    .map_err(|e| ClientError::Unexpected(error_chain(&e)))?;
                Ok(manifest)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Streams one file into `sink`, a chunk at a time; returns its size.
    pub fn get_file(
        &mut self,
        name: &str,
        generation: u64,
        file: &str,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<u64, ClientError> {
        self.send(&Request::GetFile {
            name: name.to_string(),
            generation,
            file: file.to_string(),
        })?;
        let mut got = 0u64;
        loop {
            let frame = match wire::read_frame(&mut self.rd, &mut self.buf) {
                Ok(f) => f,
                Err(e) => {
                    let e = ClientError::from(e);
                    return Err(self.classify(e, Stage::Receive));
                }
            };
            match frame {
                Frame::Data { file_id, bytes } => {
                    if file_id != 0 {
                        return Err(ClientError::WrongFileId(file_id));
                    }
                    got += bytes.len() as u64;
                    sink(bytes).map_err(ClientError::Sink)?;
                }
                Frame::Control(p) => return file_end(wire::decode_control(p)?, file, got),
            }
        }
    }

    /// Streams one file into memory `sink` lends, a data frame at a time: each frame's bytes
    /// land where [`FrameSink::space`] says and are checked there (by their CRC, or by the
    /// sink itself: [`FrameSink::checks_bytes`]), so nothing is copied on the way but the
    /// socket's own copy; returns the file's size. A failure of the sink ends
    /// the transfer with [`ClientError::Sink`] and leaves the connection out of step.
    pub fn get_file_into(
        &mut self,
        name: &str,
        generation: u64,
        file: &str,
        sink: &mut impl FrameSink,
    ) -> Result<u64, ClientError> {
        self.send(&Request::GetFile {
            name: name.to_string(),
            generation,
            file: file.to_string(),
        })?;
        let check_elsewhere = sink.checks_bytes();
        let mut got = 0u64;
        loop {
            let header = wire::read_header(&mut self.rd)
                .map_err(|e| self.classify(e.into(), Stage::Receive))?;
            match header.kind {
                FrameKind::Control => {
                    return self.recv_file_end(header, file, got);
                }
                FrameKind::Data => {
                    let n = header.len as usize - 4;
                    let dest = sink.space(n).map_err(ClientError::Sink)?;
                    if dest.len() != n {
                        return Err(ClientError::Sink(io::Error::other(format!(
                            "asked for {n} bytes of space, got {}",
                            dest.len()
                        ))));
                    }
                    self.read_data(header, dest, !check_elsewhere)?;
                    sink.filled(n).map_err(ClientError::Sink)?;
                    got += n as u64;
                }
            }
        }
    }

    /// Reads `buf.len()` bytes of one file from `offset` into `buf` (a lazy restore's page
    /// fault). Data frames land in `buf` itself; the only copy is the socket reader's, of
    /// what it already buffered (at most 64 KiB a frame). An answer shorter or longer than
    /// `buf` is an error, after which the connection is out of step and must be dropped; a
    /// refusal by the pool (missing snapshot, bad range, corrupt bytes) leaves it usable.
    pub fn get_range(
        &mut self,
        name: &str,
        generation: u64,
        file: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ClientError> {
        self.range(name, generation, file, offset, buf, false)
    }

    /// [`PoolClient::get_range`] for a caller that checks the bytes against the seal's block
    /// digests itself: neither the frames' CRCs here nor the stored CRCs in the pool, which
    /// would check the same bytes a second and third time, are computed.
    pub fn get_range_sealed(
        &mut self,
        name: &str,
        generation: u64,
        file: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ClientError> {
        self.range(name, generation, file, offset, buf, true)
    }

    /// One range asked for and read; `sealed`: the caller checks it, so nothing here does.
    fn range(
        &mut self,
        name: &str,
        generation: u64,
        file: &str,
        offset: u64,
        buf: &mut [u8],
        sealed: bool,
    ) -> Result<(), ClientError> {
        self.send(&range_request(
            name,
            generation,
            file,
            offset,
            buf.len(),
            sealed,
        ))?;
        self.recv_range(file, buf, !sealed)
    }

    /// [`PoolClient::get_range`] for several ranges of one file, each `(offset, buf)`, with up
    /// to [`PIPELINE_DEPTH`] requests on the wire ahead of the answer being read, so the
    /// round trips overlap. Fails at the first range that fails (after reading the answers
    /// already asked for, when the pool refused, so the connection stays usable).
    pub fn get_ranges(
        &mut self,
        name: &str,
        generation: u64,
        file: &str,
        ranges: &mut [(u64, &mut [u8])],
    ) -> Result<(), ClientError> {
        let mut sent = 0;
        for i in 0..ranges.len() {
            while sent < ranges.len() && sent < i + PIPELINE_DEPTH {
                let (offset, buf) = &ranges[sent];
                let req = wire::encode_control(&range_request(
                    name,
                    generation,
                    file,
                    *offset,
                    buf.len(),
                    false,
                ));
                if let Err(e) = self.wr.write_all(&req) {
                    let e = self.classify(WireError::Io(e).into(), Stage::Send);
                    return Err(self.explain_write_failure(e));
                }
                sent += 1;
            }
            if let Err(e) = self.wr.flush() {
                let e = self.classify(WireError::Io(e).into(), Stage::Send);
                return Err(self.explain_write_failure(e));
            }
            match self.recv_range(file, ranges[i].1, true) {
                Ok(()) => {}
                Err(e @ ClientError::Pool { .. }) => {
                    for _ in i + 1..sent {
                        self.skip_answer()?;
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads one range's answer into `buf`, checking each frame's CRC over the bytes where
    /// they landed when `check`.
    fn recv_range(&mut self, file: &str, buf: &mut [u8], check: bool) -> Result<(), ClientError> {
        let mut got = 0usize;
        loop {
            let header = wire::read_header(&mut self.rd)
                .map_err(|e| self.classify(e.into(), Stage::Receive))?;
            match header.kind {
                FrameKind::Control => {
                    let size = self.recv_file_end(header, file, got as u64)?;
                    if size != buf.len() as u64 {
                        return Err(ClientError::Unexpected(format!(
                            "a range of {} bytes of {file:?} was answered with {size}",
                            buf.len()
                        )));
                    }
                    return Ok(());
                }
                FrameKind::Data => {
                    let n = header.len as usize - 4;
                    let Some(dest) = buf.get_mut(got..got + n) else {
                        return Err(ClientError::Unexpected(format!(
                            "the pool sent more than the {} bytes of {file:?} asked for",
                            buf.len()
                        )));
                    };
                    self.read_data(header, dest, check)?;
                    got += n;
                }
            }
        }
    }

    /// Reads the control frame that ends a file's answer; its size must be `got`.
    fn recv_file_end(
        &mut self,
        header: FrameHeader,
        file: &str,
        got: u64,
    ) -> Result<u64, ClientError> {
        self.buf.resize(header.len as usize, 0);
        if let Err(e) = self.rd.read_exact(&mut self.buf) {
            return Err(self.classify(WireError::Io(e).into(), Stage::Receive));
        }
        header.verify(&self.buf)?;
        file_end(wire::decode_control(&self.buf)?, file, got)
    }

    /// Reads the payload of the data frame whose `header` was just read: its file id, then
    /// its bytes straight into `dest` (exactly their length), checking the frame's CRC over
    /// them where they landed when `check`.
    fn read_data(
        &mut self,
        header: FrameHeader,
        dest: &mut [u8],
        check: bool,
    ) -> Result<(), ClientError> {
        debug_assert_eq!(dest.len() + 4, header.len as usize);
        let mut id = [0u8; 4];
        let read = self
            .rd
            .read_exact(&mut id)
            .and_then(|()| self.rd.read_exact(dest));
        if let Err(e) = read {
            return Err(self.classify(WireError::Io(e).into(), Stage::Receive));
        }
        let crc = match check {
            true => crc32c::crc32c_append(crc32c::crc32c(&id), dest),
            false => header.crc,
        };
        if crc != header.crc {
            return Err(WireError::ChecksumMismatch {
                expected: header.crc,
                actual: crc,
            }
            .into());
        }
        let file_id = u32::from_le_bytes(id);
        if file_id != 0 {
            return Err(ClientError::WrongFileId(file_id));
        }
        Ok(())
    }

    /// Reads and drops one answer of data frames ending in a control frame.
    fn skip_answer(&mut self) -> Result<(), ClientError> {
        loop {
            match wire::read_frame(&mut self.rd, &mut self.buf) {
                Ok(Frame::Data { .. }) => {}
                Ok(Frame::Control(_)) => return Ok(()),
                Err(e) => return Err(self.classify(e.into(), Stage::Receive)),
            }
        }
    }

    /// Deletes a generation, or every generation of `name`.
    pub fn delete(&mut self, name: &str, generation: Option<u64>) -> Result<u64, ClientError> {
        match self.call(&Request::Delete {
            name: name.to_string(),
            generation,
        })? {
            Response::Deleted { count } => Ok(count),
            other => Err(unexpected(other)),
        }
    }
}

/// Where [`PoolClient::get_file_into`] puts a file: memory the sink lends for each data frame,
/// so a consumer that hands the bytes on without copying them (`vmsplice` into a pipe)
/// decides itself when that memory may be written again.
pub trait FrameSink {
    /// Exactly `len` bytes (at most one chunk) for the next frame's data to land in.
    fn space(&mut self, len: usize) -> io::Result<&mut [u8]>;
    /// The `len` bytes last lent by [`FrameSink::space`] now hold the frame's data, its CRC
    /// checked unless [`FrameSink::checks_bytes`].
    fn filled(&mut self, len: usize) -> io::Result<()>;

    /// The sink checks every byte against something stronger than the frames' CRCs (a
    /// sealed digest) and refuses the file as a whole when they differ: the CRCs then
    /// need not be computed.
    fn checks_bytes(&self) -> bool {
        false
    }
}

/// Range requests [`PoolClient::get_ranges`] keeps on the wire ahead of the answers: enough
/// to hide the round trip, few enough (a few KiB of requests) that they always fit in the
/// socket buffers, so neither side can block writing while the other does.
pub const PIPELINE_DEPTH: usize = 32;

fn range_request(
    name: &str,
    generation: u64,
    file: &str,
    offset: u64,
    len: usize,
    sealed: bool,
) -> Request {
    Request::GetRange {
        name: name.to_string(),
        generation,
        file: file.to_string(),
        offset,
        len: len as u64,
        sealed,
    }
}

/// The control frame that ends a file transfer: its size must match what arrived.
fn file_end(resp: Response, file: &str, got: u64) -> Result<u64, ClientError> {
    match resp {
        Response::FileEnd { size } if size == got => Ok(size),
        Response::FileEnd { size } => Err(ClientError::Unexpected(format!(
            "file {file:?} ended after {got} bytes, pool says {size}"
        ))),
        Response::Error { code, message } => Err(ClientError::Pool { code, message }),
        other => Err(unexpected(other)),
    }
}

fn unexpected(r: Response) -> ClientError {
    ClientError::Unexpected(format!("{r:?}"))
}

/// Connects to the first of `addrs` that answers within `timeout` each.
fn connect_tcp(
    addrs: Vec<std::net::SocketAddr>,
    timeout: Duration,
    name: &str,
) -> Result<TcpStream, ClientError> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(if is_timeout(&last) {
        ClientError::Timeout {
            during: Stage::Connect,
            after: timeout,
        }
    } else {
        ClientError::Connect {
            addr: name.to_string(),
            source: last,
        }
    })
}

/// Connects a Unix socket, waiting at most `timeout` while the pool's accept queue is full
/// (a stopped pool's queue fills, and a plain `connect` would then block for good).
fn connect_unix(path: &std::path::Path, timeout: Duration) -> io::Result<UnixStream> {
    use nix::sys::socket::{
        connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // A Unix connect waits for room in the listener's queue up to the send timeout.
    let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

fn set_timeouts(s: &TcpStream, t: Duration) -> io::Result<()> {
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))
}

/// Completes a TLS handshake over `sock` (each socket operation within the connect
/// timeout), so a wrong certificate fails here, before the token is sent; then sets the
/// frame timeouts.
fn tls_handshake(
    mut sock: TcpStream,
    tls: &crate::tls::ClientTls,
    addr: &str,
    t: crate::target::Timeouts,
) -> Result<TlsStream, ClientError> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let err = |source: io::Error| {
        if is_timeout(&source) {
            ClientError::Timeout {
                during: Stage::Handshake,
                after: t.connect,
            }
        } else {
            ClientError::Handshake {
                addr: addr.to_string(),
                source,
            }
        }
    };
    set_timeouts(&sock, t.connect).map_err(err)?;
    let mut conn = ClientConnection::new(tls.config(), crate::tls::server_name(host))
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(err)?;
    }
    set_timeouts(&sock, t.frame).map_err(err)?;
    Ok(StreamOwned::new(conn, Timed::new(sock, t.frame)))
}
