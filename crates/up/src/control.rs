//! The control endpoint of `torpor up`: where an operator's `torpor sleep`, `wake`, `pin`,
//! `unpin`, `reload` and `stop` arrive. It is apart from the status API, which stays read-only: by default a
//! Unix socket (mode 0600, so only its owner, root, can connect; the peer's uid, read with
//! SO_PEERCRED, is who the action is recorded as), or a TCP address whose requests must carry
//! the token of a token file (recorded as `token`). Each connection carries one request and
//! its reply ([`wire`] frames); the reply comes once the command is done (a sleep once the
//! service is in the pool). This module also holds the client the command line uses.

pub mod wire;

use std::{
    future::Future,
    net::SocketAddr,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, UnixListener},
    sync::{watch, Semaphore},
};
use torpor_agent::{Agent, ManualCommand, ManualOutcome};

use crate::reload::{ReloadOutcome, ReloadReport, Reloader};
use tracing::{info, warn};

use wire::{Kind, WireError};

/// Where the control socket is unless `control.socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/torpor/control.sock";

/// Connections served at once: commands come from operators, one at a time.
const MAX_CONNECTIONS: usize = 16;

/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where `torpor up` takes manual commands (`[control]` in torpor.toml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEndpoint {
    /// A Unix socket, mode 0600: local root only.
    Unix(PathBuf),
    /// A TCP address; requests must carry the token in `token_file`.
    Tcp {
        addr: SocketAddr,
        token_file: PathBuf,
    },
}

impl Default for ControlEndpoint {
    fn default() -> Self {
        ControlEndpoint::Unix(DEFAULT_SOCKET.into())
    }
}

/// Where the control endpoint is, as `/status` tells it (so that `torpor sleep --addr
/// STATUS` finds it); never a token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlHint {
    /// The control socket's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// The TCP control address (it needs the token file too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<SocketAddr>,
}

/// What an operator asks of `torpor up`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// One command for one service.
    Service {
        service: String,
        command: ManualCommand,
    },
    /// Read torpor.toml again and apply what changed.
    Reload,
    /// Stop `torpor up` as SIGTERM does; with `keep_running` its awake services are left
    /// running (and its asleep ones in the pool) for the next start to adopt.
    Stop {
        #[serde(default)]
        keep_running: bool,
    },
}

impl Order {
    /// The service it is for (empty for a reload) and its action, for the log.
    fn describe(&self) -> (&str, &'static str) {
        match self {
            Order::Service { service, command } => (service, command.name()),
            Order::Reload => ("", "reload"),
            Order::Stop {
                keep_running: false,
            } => ("", "stop"),
            Order::Stop { keep_running: true } => ("", "stop --keep-running"),
        }
    }
}

/// One order, with the token of a TCP endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub order: Order,
    /// The TCP endpoint's token (absent on the Unix socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// What came of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyOutcome {
    /// The service changed as asked.
    Done,
    /// The service already was as asked (waking an awake one): nothing was done.
    NoOp,
    /// The command was not carried out (unknown service, pinned, bad token...).
    Refused,
    /// It was tried and did not work (the checkpoint or the wake failed).
    Failed,
}

/// The endpoint's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub outcome: ReplyOutcome,
    /// A sentence for the operator.
    pub message: String,
    /// What a reload did (for `torpor reload --json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadReport>,
}

impl Reply {
    /// Done or no-op: the command line exits 0.
    pub fn succeeded(&self) -> bool {
        matches!(self.outcome, ReplyOutcome::Done | ReplyOutcome::NoOp)
    }
}

/// Why the control endpoint could not be set up.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control.socket: {0} is in use by another running torpor up (give this one its own control.socket)")]
    InUse(PathBuf),
    #[error("control.socket: {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("control.socket: cannot create {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control.listen: cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("control.token_file is refused")]
    Token(#[source] torpor_pool::TokenFileError),
}

/// A bound control endpoint, not yet serving. Dropping it removes the socket file it made.
#[derive(Debug)]
pub struct ControlListener {
    accept: Accept,
    hint: ControlHint,
    _file: Option<SocketFile>,
}

#[derive(Debug)]
enum Accept {
    Unix(UnixListener),
    Tcp {
        listener: TcpListener,
        token: String,
    },
}

/// The socket file this process made, removed at drop unless another process replaced it.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == (self.dev, self.ino) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl ControlListener {
    /// Binds `endpoint`. A socket path where a live `torpor up` answers is refused; one where
    /// nobody listens (left by a killed run) is replaced. The socket is made under a
    /// temporary name, set to 0600, then renamed into place, so it is never reachable with
    /// a wider mode.
    pub async fn bind(endpoint: &ControlEndpoint) -> Result<ControlListener, ControlError> {
        match endpoint {
            ControlEndpoint::Unix(path) => bind_unix(path),
            ControlEndpoint::Tcp { addr, token_file } => {
                let token =
                    torpor_pool::read_token_file(token_file).map_err(ControlError::Token)?;
                let listener =
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ControlError::Listen {
                            addr: *addr,
                            source,
                        })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| ControlError::Listen {
                        addr: *addr,
                        source,
                    })?;
                Ok(ControlListener {
                    accept: Accept::Tcp { listener, token },
                    hint: ControlHint {
                        socket: None,
                        tcp: Some(bound),
                    },
                    _file: None,
                })
            }
        }
    }

    /// Where clients reach it (the TCP address as bound, port 0 resolved).
    pub fn hint(&self) -> &ControlHint {
        &self.hint
    }
}

fn bind_unix(path: &Path) -> Result<ControlListener, ControlError> {
    let err = |source| ControlError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ControlError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ControlError::InUse(path.to_path_buf())),
            Err(e) => info!(path = %path.display(), error = %e, "replacing a stale control socket"),
        },
        Err(_) => {}
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    let name = path.file_name().map_or_else(
        || "control.sock".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| std::fs::symlink_metadata(path));
    let meta = match placed {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(e));
        }
    };
    Ok(ControlListener {
        accept: Accept::Unix(listener),
        hint: ControlHint {
            socket: Some(path.to_path_buf()),
            tcp: None,
        },
        _file: Some(SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        }),
    })
}

/// Serves manual commands for `agent`, and reloads through `reloader`, until `shutdown`; a
/// stop order that is accepted sets `stop` once its reply is sent.
pub async fn serve(
    listener: ControlListener,
    agent: Arc<Agent>,
    reloader: Arc<Reloader>,
    stop: Arc<watch::Sender<bool>>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => p.expect("never closed"),
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = accept(&listener.accept) => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (agent, reloader, stop) = (agent.clone(), reloader.clone(), stop.clone());
                conns.spawn(async move {
                    serve_one(stream, peer, &agent, &reloader, &stop).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "control endpoint: accept failed");
                // Out of files, say: give the others time to finish rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        while conns.try_join_next().is_some() {}
    }
    // A command under way is cut with its connection; the agent finishes or drops it.
    conns.shutdown().await;
}

/// Who is at the other end: a local user (by uid) or a TCP client that must show `token`.
enum Peer {
    Uid(u32),
    Token(String),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn accept(a: &Accept) -> std::io::Result<(Box<dyn Stream>, Peer)> {
    match a {
        Accept::Unix(l) => {
            let (s, _) = l.accept().await?;
            let uid = s.peer_cred()?.uid();
            Ok((Box::new(s), Peer::Uid(uid)))
        }
        Accept::Tcp { listener, token } => {
            let (s, _) = listener.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Box::new(s), Peer::Token(token.clone())))
        }
    }
}

async fn serve_one(
    mut stream: Box<dyn Stream>,
    peer: Peer,
    agent: &Agent,
    reloader: &Reloader,
    stop: &watch::Sender<bool>,
) {
    let mut stops = false;
    let reply = match tokio::time::timeout(
        REQUEST_TIMEOUT,
        wire::read_async::<Request>(&mut stream, Kind::Request),
    )
    .await
    {
        Err(_) => return,
        Ok(Err(WireError::Io(_))) => return,
        Ok(Err(e)) => {
            warn!(error = %e, "control endpoint: bad request");
            Reply {
                outcome: ReplyOutcome::Refused,
                message: format!("bad request: {e}"),
                reload: None,
            }
        }
        Ok(Ok(req)) => match authorize(&peer, req.token.as_deref()) {
            Err(why) => {
                let (service, action) = req.order.describe();
                warn!(%service, action, %why, "control endpoint: refused");
                Reply {
                    outcome: ReplyOutcome::Refused,
                    message: why,
                    reload: None,
                }
            }
            Ok(by) => {
                let stop_order = matches!(req.order, Order::Stop { .. });
                let reply = carry_out(req.order, &by, agent, reloader).await;
                stops = stop_order && reply.succeeded();
                reply
            }
        },
    };
    let _ = stream.write_all(&wire::encode(Kind::Reply, &reply)).await;
    let _ = stream.shutdown().await;
    // After the reply: the stop ends this endpoint, and with it this connection.
    if stops {
        stop.send_replace(true);
    }
}

/// Carries out an authorized order and says what came of it.
async fn carry_out(order: Order, by: &str, agent: &Agent, reloader: &Reloader) -> Reply {
    match order {
        Order::Service { service, command } => match agent.manual(&service, command, by).await {
            Ok((outcome, message)) => Reply {
                outcome: match outcome {
                    ManualOutcome::Done => ReplyOutcome::Done,
                    ManualOutcome::NoOp => ReplyOutcome::NoOp,
                },
                message,
                reload: None,
            },
            Err(e) => Reply {
                outcome: match e.outcome() {
                    "failed" => ReplyOutcome::Failed,
                    _ => ReplyOutcome::Refused,
                },
                message: e.to_string(),
                reload: None,
            },
        },
        Order::Reload => {
            let report = reloader.reload(by).await;
            Reply {
                outcome: match report.outcome {
                    ReloadOutcome::Applied => ReplyOutcome::Done,
                    ReloadOutcome::Unchanged => ReplyOutcome::NoOp,
                    ReloadOutcome::Refused => ReplyOutcome::Refused,
                    ReloadOutcome::Failed => ReplyOutcome::Failed,
                },
                message: report.render(),
                reload: Some(report),
            }
        }
        Order::Stop { keep_running } => {
            let refusal = keep_running.then(|| agent.keep_running_refusal()).flatten();
            if let Some(why) = refusal {
                warn!(by, %why, "torpor stop --keep-running refused");
                return Reply {
                    outcome: ReplyOutcome::Refused,
                    message: format!("cannot keep the services running: {why}"),
                    reload: None,
                };
            }
            let message = if keep_running {
                agent.keep_running();
                "stopping; the awake services keep running for the next start to adopt".to_string()
            } else if agent.survives_stop() {
                "stopping; the awake services are checkpointed into the pool".to_string()
            } else {
                "stopping; the services are stopped and their state is not kept".to_string()
            };
            info!(by, keep_running, "stop ordered");
            Reply {
                outcome: ReplyOutcome::Done,
                message,
                reload: None,
            }
        }
    }
}

/// Who the request is from, or why it is refused. On the socket only root and the user
/// torpor runs as may steer (the 0600 mode already says so; this holds if it is widened).
fn authorize(peer: &Peer, token: Option<&str>) -> Result<String, String> {
    match peer {
        Peer::Uid(uid) => {
            let me = nix::unistd::geteuid().as_raw();
            if *uid == 0 || *uid == me {
                Ok(format!("uid {uid}"))
            } else {
                Err(format!("uid {uid} may not steer torpor"))
            }
        }
        Peer::Token(expected) => match token {
            Some(t) if same(t.as_bytes(), expected.as_bytes()) => Ok("token".into()),
            Some(_) => Err("wrong token".into()),
            None => Err("this control endpoint needs a token (--token-file)".into()),
        },
    }
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Where the command line sends a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Tcp { addr: SocketAddr, token: String },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "{}", p.display()),
            Target::Tcp { addr, .. } => write!(f, "{addr}"),
        }
    }
}

/// Why a command could not be sent or its reply read.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("no torpor up takes commands at {target}; is it running, and is that its control.socket (or give --addr STATUS)?")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the control endpoint at {target} did not answer properly")]
    Wire {
        target: String,
        #[source]
        source: WireError,
    },
    #[error("the status API does not say where the control endpoint is")]
    NoHint,
    #[error("the control endpoint at {0} is TCP: give --token-file")]
    NeedToken(SocketAddr),
    #[error("cannot read the control token")]
    Token(#[source] torpor_pool::TokenFileError),
    #[error("cannot ask the status API where the control endpoint is")]
    Status(#[source] crate::status::FetchError),
    #[error("the status API's answer is not a status document")]
    StatusDoc(#[source] serde_json::Error),
}

/// Resolves where to send commands: `socket` or `tcp` when given, else where the status API
/// at `status` says, else the default socket. A TCP endpoint needs `token_file`.
pub async fn locate(
    socket: Option<&Path>,
    tcp: Option<SocketAddr>,
    status: Option<SocketAddr>,
    token_file: Option<&Path>,
) -> Result<Target, ClientError> {
    let tcp = match (socket, tcp, status) {
        (Some(p), _, _) => return Ok(Target::Unix(p.to_path_buf())),
        (None, Some(addr), _) => addr,
        (None, None, Some(status)) => {
            let body = crate::status::fetch(status, "/status")
                .await
                .map_err(ClientError::Status)?;
            let doc: serde_json::Value =
                serde_json::from_str(&body).map_err(ClientError::StatusDoc)?;
            let hint: ControlHint =
                serde_json::from_value(doc["control"].clone()).map_err(ClientError::StatusDoc)?;
            match (hint.socket, hint.tcp) {
                (Some(p), _) => return Ok(Target::Unix(p)),
                (None, Some(addr)) => addr,
                (None, None) => return Err(ClientError::NoHint),
            }
        }
        (None, None, None) => return Ok(Target::Unix(DEFAULT_SOCKET.into())),
    };
    let file = token_file.ok_or(ClientError::NeedToken(tcp))?;
    let token = torpor_pool::read_token_file(file).map_err(ClientError::Token)?;
    Ok(Target::Tcp { addr: tcp, token })
}

/// Sends `order` to `target` and waits for the reply (as long as the order takes: a sleep
/// returns once the service is in the pool, a reload once it is applied).
pub fn call(target: &Target, order: Order) -> Result<Reply, ClientError> {
    use std::io::Write;
    let connect_err = |source| ClientError::Connect {
        target: target.to_string(),
        source,
    };
    let wire_err = |source| ClientError::Wire {
        target: target.to_string(),
        source,
    };
    let request = Request {
        order,
        token: match target {
            Target::Unix(_) => None,
            Target::Tcp { token, .. } => Some(token.clone()),
        },
    };
    let frame = wire::encode(Kind::Request, &request);
    let mut stream: Box<dyn ReadWrite> = match target {
        Target::Unix(p) => {
            Box::new(std::os::unix::net::UnixStream::connect(p).map_err(connect_err)?)
        }
        Target::Tcp { addr, .. } => {
            Box::new(std::net::TcpStream::connect(addr).map_err(connect_err)?)
        }
    };
    stream
        .write_all(&frame)
        .map_err(|e| wire_err(WireError::Io(e)))?;
    wire::read_blocking(&mut stream, Kind::Reply).map_err(wire_err)
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abcdef", b"abcdef"));
        assert!(!same(b"abcdef", b"abcdeg"));
        assert!(!same(b"abc", b"abcdef"));
    }

    #[test]
    fn the_socket_admits_root_and_torpors_own_user_and_tcp_needs_the_token() {
        assert_eq!(authorize(&Peer::Uid(0), None), Ok("uid 0".into()));
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(authorize(&Peer::Uid(me), None), Ok(format!("uid {me}")));
        if me == 0 {
            assert!(authorize(&Peer::Uid(65534), None).is_err());
        }
        let peer = Peer::Token("s3cret-token-value".into());
        assert_eq!(
            authorize(&peer, Some("s3cret-token-value")),
            Ok("token".into())
        );
        assert!(authorize(&peer, Some("guess")).is_err());
        assert!(authorize(&peer, None).is_err());
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_a_stale_one_replaced_and_the_file_removed_at_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("control.sock");
        let endpoint = ControlEndpoint::Unix(path.clone());
        let first = ControlListener::bind(&endpoint).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = ControlListener::bind(&endpoint).await.unwrap_err();
        assert!(matches!(e, ControlError::InUse(_)), "{e}");
        assert!(e.to_string().starts_with("control.socket: "), "{e}");
        drop(first);
        assert!(!path.exists(), "removed when it stops");
        // A socket nobody listens on, as a killed run leaves it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let again = ControlListener::bind(&endpoint).await.unwrap();
        assert_eq!(again.hint().socket.as_deref(), Some(path.as_path()));
        drop(again);
        std::fs::write(&path, "not a socket").unwrap();
        let e = ControlListener::bind(&endpoint).await.unwrap_err();
        assert!(matches!(e, ControlError::NotASocket(_)), "{e}");
        assert!(path.exists(), "a file that is not ours is left alone");
    }

    #[tokio::test]
    async fn locate_prefers_flags_then_the_status_hint_then_the_default() {
        let p = Path::new("/tmp/x.sock");
        assert_eq!(
            locate(Some(p), None, None, None).await.unwrap(),
            Target::Unix(p.into())
        );
        assert_eq!(
            locate(None, None, None, None).await.unwrap(),
            Target::Unix(DEFAULT_SOCKET.into())
        );
        let tcp: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(matches!(
            locate(None, Some(tcp), None, None).await,
            Err(ClientError::NeedToken(a)) if a == tcp
        ));
    }
}
