//! The lazy-pages server: binds `lazy-pages.socket` in CRIU's work dir, accepts the restore's
//! one connection, and runs the session on its own thread in one poll loop over the wake
//! pipe (commands from the [`LazyServer`] handle), the listener, the connection and every
//! uffd. Faults come first: prefetch and fill advance one chunk per turn of the loop, which
//! polls without blocking while such work waits.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use torpor_image::pages::{PageRange, PAGE_SIZE};

use crate::protocol::{Message, RestoreStream};
use crate::session::{Fill, LazyStats, Session, SessionConfig, Shared, Unprovable};
use crate::uffd::RealUffd;
use crate::PageSource;

/// The socket's name in CRIU's work dir (`uffd.c:prepare_lazy_socket`).
pub const SOCKET_NAME: &str = "lazy-pages.socket";
/// Upper bound for `max_fault_read`: one fault's read must stay far below a stall.
pub const MAX_FAULT_READ: u64 = 64 << 20;
/// Longest wait for the rest of a message CRIU started sending (it sends each at once).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server serves, and how.
pub struct LazyConfig {
    /// Directory where `lazy-pages.socket` is bound (CRIU's work dir).
    pub work_dir: PathBuf,
    /// Lazy ranges per process, keyed by the pid CRIU sends (the pid recorded in the images).
    /// Sorted, disjoint, page-aligned, never crossing a VMA boundary (the caller splits them).
    pub ranges: HashMap<i32, Vec<PageRange>>,
    /// Working set to push right after FIN (start, len) in run-time addresses per pid; only
    /// the parts inside lazy ranges are copied, with large reads (up to 4 MiB), before
    /// background fill, interleaved with faults (faults first).
    pub prefetch: HashMap<i32, Vec<(u64, u64)>>,
    /// For how long after FIN every copied range (fault, readahead, prefetch) is recorded into
    /// the working set (copies before FIN are recorded too).
    pub record_for: Duration,
    /// What happens to ranges nobody faulted after the prefetch: see [`Fill`].
    pub fill: Fill,
    /// Largest read for one fault (readahead grows to it on sequential faults, e.g. 64 KiB
    /// doubling to 2 MiB). At least one page, at most [`MAX_FAULT_READ`].
    pub max_fault_read: u64,
    /// Called once (from the server's thread) when the source fails or the server must give
    /// up while ranges remain: it must kill the restored tree. The server keeps its uffds
    /// open until then.
    pub on_failure: Box<dyn Fn(&str) + Send>,
}

impl fmt::Debug for LazyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyConfig")
            .field("work_dir", &self.work_dir)
            .field("ranges", &self.ranges.len())
            .field("prefetch", &self.prefetch.len())
            .field("record_for", &self.record_for)
            .field("fill", &self.fill)
            .field("max_fault_read", &self.max_fault_read)
            .finish_non_exhaustive()
    }
}

/// Starting, waiting for, filling or stopping the server failed.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("invalid lazy ranges for pid {pid}: {reason}")]
    InvalidRanges { pid: i32, reason: String },
    #[error("max_fault_read {0} is not between one page and {MAX_FAULT_READ}")]
    InvalidFaultRead(u64),
    #[error("binding {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting the lazy-pages server")]
    Start(#[source] io::Error),
    #[error("restore connection failed: {0}")]
    Connection(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("lazy-pages server gave up: {0}")]
    Failed(String),
    #[error("lazy-pages server has stopped")]
    Stopped,
    #[error("lazy-pages server thread panicked")]
    Panicked,
}

enum Command {
    SetFill(Fill),
    FillAll(Sender<Result<(), LazyError>>),
    Remaining(Sender<Result<HashMap<i32, Vec<PageRange>>, Unprovable>>),
    FillFrom(BTreeSet<u64>, Sender<Result<u64, LazyError>>),
    Hold(Sender<Fill>),
    CopiedWhileHeld(Sender<HashMap<i32, Vec<(u64, u64)>>>),
    ReleaseHold(Fill),
    Resumed(Fill),
    Shutdown,
}

/// A running lazy-pages server; dropping it stops it as [`LazyServer::shutdown`] does.
#[derive(Debug)]
pub struct LazyServer {
    shared: Arc<Shared>,
    commands: Sender<Command>,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
    socket_path: PathBuf,
}

impl LazyServer {
    /// Binds and listens on work_dir/lazy-pages.socket before returning; runs on its own
    /// thread.
    pub fn start(cfg: LazyConfig, source: Box<dyn PageSource>) -> Result<LazyServer, LazyError> {
        for (&pid, ranges) in &cfg.ranges {
            crate::ranges::validate(ranges)
                .map_err(|reason| LazyError::InvalidRanges { pid, reason })?;
        }
        if !(PAGE_SIZE..=MAX_FAULT_READ).contains(&cfg.max_fault_read) {
            return Err(LazyError::InvalidFaultRead(cfg.max_fault_read));
        }
        let socket_path = cfg.work_dir.join(SOCKET_NAME);
        let bind_err = |source| LazyError::Bind {
            path: socket_path.clone(),
            source,
        };
        match std::fs::remove_file(&socket_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(bind_err(e)),
            _ => {}
        }
        let listener = UnixListener::bind(&socket_path).map_err(bind_err)?;
        let shared = Arc::new(Shared::default());
        let session = Session::new(
            SessionConfig {
                ranges: cfg.ranges,
                prefetch: cfg.prefetch,
                record_for: cfg.record_for,
                fill: cfg.fill,
                max_fault_read: cfg.max_fault_read,
                on_failure: cfg.on_failure,
            },
            source,
            shared.clone(),
        )
        .map_err(LazyError::Start)?;
        let (wake, wake_rx) = UnixStream::pair().map_err(LazyError::Start)?;
        wake.set_nonblocking(true).map_err(LazyError::Start)?;
        wake_rx.set_nonblocking(true).map_err(LazyError::Start)?;
        let (commands, rx) = mpsc::channel();
        let lp = Loop {
            session,
            listener: Some(listener),
            conn: None,
            socket_path: socket_path.clone(),
            wake_rx,
            commands: rx,
            shared: shared.clone(),
            fill_waiters: Vec::new(),
            shutting_down: false,
        };
        let thread = std::thread::Builder::new()
            .name("torpor-lazy".into())
            .spawn(move || lp.run())
            .map_err(LazyError::Start)?;
        Ok(LazyServer {
            shared,
            commands,
            wake,
            thread: Some(thread),
            socket_path,
        })
    }

    /// Where the server listens.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Blocks until FIN was received (the restore finished), or the connection failed / timed
    /// out.
    pub fn wait_finished(&self, timeout: Duration) -> Result<(), LazyError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if state.stats.finished {
                return Ok(());
            }
            if let Some(e) = &state.conn_error {
                return Err(LazyError::Connection(e.clone()));
            }
            if let Some(f) = &state.stats.failed {
                return Err(LazyError::Failed(f.clone()));
            }
            if state.stopped {
                return Err(LazyError::Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LazyError::Timeout(timeout, "the restore to finish"));
            }
            state = match self.shared.changed.wait_timeout(state, deadline - now) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Blocks until the working set recorded for this restore was pushed (or the server
    /// stopped, failed or timed out: the caller need not care which, faults still work).
    pub fn wait_prefetched(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            let done = state.stats.finished && !state.stats.prefetch_pending;
            let now = Instant::now();
            if done || state.stopped || state.stats.failed.is_some() || now >= deadline {
                return;
            }
            state = match self.shared.changed.wait_timeout(state, deadline - now) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
    }

    pub fn stats(&self) -> LazyStats {
        self.shared.lock().stats.clone()
    }

    /// Ranges copied during the record window, coalesced, per pid.
    pub fn working_set(&self) -> HashMap<i32, Vec<(u64, u64)>> {
        let state = self.shared.lock();
        state
            .working_set
            .iter()
            .map(|(&pid, e)| (pid, e.to_vec()))
            .collect()
    }

    pub fn set_fill(&self, fill: Fill) {
        // a stopped server has nothing left to fill
        let _ = self.command(Command::SetFill(fill));
    }

    /// Copies every remaining range now (all processes, forked children included); blocks
    /// until done. Before FIN it waits for FIN first. On timeout the fill goes on.
    pub fn fill_all(&self, timeout: Duration) -> Result<(), LazyError> {
        let (tx, rx) = mpsc::channel();
        self.command(Command::FillAll(tx))?;
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(LazyError::Timeout(timeout, "the fill")),
            Err(RecvTimeoutError::Disconnected) => Err(LazyError::Stopped),
        }
    }

    /// Copies in every remaining range whose bytes are in one of `generations`; returns the
    /// bytes copied. Compacts a chain of incremental snapshots: the next checkpoint holds
    /// those pages itself and no longer refers to those generations.
    pub fn fill_from(
        &self,
        generations: BTreeSet<u64>,
        timeout: Duration,
    ) -> Result<u64, LazyError> {
        let (tx, rx) = mpsc::channel();
        self.command(Command::FillFrom(generations, tx))?;
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(LazyError::Timeout(timeout, "the fill")),
            Err(RecvTimeoutError::Disconnected) => Err(LazyError::Stopped),
        }
    }

    /// Starts a checkpoint's hold: no prefetch or fill from now on, and every copy is noted
    /// ([`LazyServer::copied_while_held`]). Returns the fill mode to give back if the
    /// checkpoint does not happen ([`LazyServer::release_hold`]).
    pub fn hold(&self) -> Result<Fill, LazyError> {
        let (tx, rx) = mpsc::channel();
        self.command(Command::Hold(tx))?;
        rx.recv().map_err(|_| LazyError::Stopped)
    }

    /// Every range copied since [`LazyServer::hold`], per pid (start, len).
    pub fn copied_while_held(&self) -> Result<HashMap<i32, Vec<(u64, u64)>>, LazyError> {
        let (tx, rx) = mpsc::channel();
        self.command(Command::CopiedWhileHeld(tx))?;
        rx.recv().map_err(|_| LazyError::Stopped)
    }

    /// Ends a hold: the service runs on with `fill` as before.
    pub fn release_hold(&self, fill: Fill) -> Result<(), LazyError> {
        self.command(Command::ReleaseHold(fill))
    }

    /// The restored tasks run from now on (a restore held before its tasks resumed was
    /// released): the working-set record window starts again and untouched pages follow
    /// `fill`.
    pub fn resumed(&self, fill: Fill) -> Result<(), LazyError> {
        self.command(Command::Resumed(fill))
    }

    /// For an incremental checkpoint: per live process, the ranges never copied and still
    /// mapped (after draining every pending uffd event), at their current addresses with
    /// their origins. Processes whose mm is gone, or with nothing left, are left out.
    /// Err(Unprovable) when a child forked during the lazy phase still lives with lazy ranges
    /// (its pid is unknown, so they cannot be attributed), or the server failed.
    pub fn remaining(&self) -> Result<HashMap<i32, Vec<PageRange>>, Unprovable> {
        let (tx, rx) = mpsc::channel();
        self.command(Command::Remaining(tx))
            .map_err(|_| Unprovable::Stopped)?;
        rx.recv().unwrap_or(Err(Unprovable::Stopped))
    }

    /// Stops serving. Only after the tree is dead or fully filled; if ranges remain in a live
    /// mm it fills them first (or, if the source fails, calls on_failure) — never closes a
    /// uffd under a live process with ranges left. Err(Failed) if the server gave up.
    pub fn shutdown(mut self) -> Result<LazyStats, LazyError> {
        self.stop()?;
        let stats = self.stats();
        match &stats.failed {
            Some(f) => Err(LazyError::Failed(f.clone())),
            None => Ok(stats),
        }
    }

    fn stop(&mut self) -> Result<(), LazyError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // if the loop is gone already, joining tells how it ended
        let _ = self.command(Command::Shutdown);
        thread.join().map_err(|_| LazyError::Panicked)
    }

    fn command(&self, cmd: Command) -> Result<(), LazyError> {
        self.commands.send(cmd).map_err(|_| LazyError::Stopped)?;
        // a full pipe already has a wake-up in it
        let _ = (&self.wake).write(&[1]);
        Ok(())
    }
}

impl Drop for LazyServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!("stopping the lazy-pages server: {e}");
        }
    }
}

struct Loop {
    session: Session<RealUffd>,
    listener: Option<UnixListener>,
    conn: Option<RestoreStream>,
    socket_path: PathBuf,
    wake_rx: UnixStream,
    commands: Receiver<Command>,
    shared: Arc<Shared>,
    fill_waiters: Vec<Sender<Result<(), LazyError>>>,
    shutting_down: bool,
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

impl Loop {
    fn run(mut self) {
        while let Some(ready) = self.wait() {
            for p in ready.procs {
                self.session.service(p);
            }
            if ready.conn {
                self.read_connection();
            }
            if ready.listener {
                self.accept();
            }
            if ready.wake {
                self.commands();
            }
            if !ready.any_uffd {
                self.session.step();
            }
            self.session.retire_done();
            self.answer_fill_waiters();
            self.session.publish();
            self.shared.changed.notify_all();
            if self.shutting_down && (self.session.failed().is_some() || self.session.all_filled())
            {
                break;
            }
        }
        for w in self.fill_waiters.drain(..) {
            let _ = w.send(Err(LazyError::Stopped));
        }
        if self.listener.take().is_some() {
            let _ = std::fs::remove_file(&self.socket_path);
        }
        self.session.publish();
        // closes the uffds: by now every process is dead, filled, or killed through on_failure
        drop(self.session);
        self.shared.lock().stopped = true;
        self.shared.changed.notify_all();
    }

    /// Polls everything; `None` if polling itself failed (the session has given up then).
    fn wait(&mut self) -> Option<Ready> {
        let busy = self.session.has_work();
        let mut fds = vec![PollFd::new(self.wake_rx.as_fd(), PollFlags::POLLIN)];
        let listener_at = self.listener.as_ref().map(|l| {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let conn_at = self.conn.as_ref().map(|c| {
            fds.push(PollFd::new(c.socket().as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let first_uffd = fds.len();
        let mut procs = Vec::new();
        for (i, u) in self.session.pollable() {
            fds.push(PollFd::new(u.as_fd(), PollFlags::POLLIN));
            procs.push(i);
        }
        let timeout = if busy {
            PollTimeout::ZERO
        } else {
            PollTimeout::NONE
        };
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                drop(fds);
                self.session.give_up(&format!("polling: {e}"));
                return None;
            }
        }
        let ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
        let procs: Vec<usize> = procs
            .into_iter()
            .enumerate()
            .filter(|&(k, _)| ready(first_uffd + k))
            .map(|(_, p)| p)
            .collect();
        Some(Ready {
            wake: ready(0),
            listener: listener_at.is_some_and(ready),
            conn: conn_at.is_some_and(ready),
            any_uffd: !procs.is_empty(),
            procs,
        })
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        match listener.accept() {
            Ok((sock, _)) => {
                if let Err(e) = sock.set_read_timeout(Some(MESSAGE_TIMEOUT)) {
                    tracing::warn!("setting the restore connection's timeout: {e}");
                }
                self.conn = Some(RestoreStream::new(sock));
                // CRIU connects once; nobody else gets in
                self.listener = None;
                let _ = std::fs::remove_file(&self.socket_path);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => tracing::warn!("accepting on {}: {e}", self.socket_path.display()),
        }
    }

    fn read_connection(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match conn.next_message() {
            Ok(Some(Message::Process { pid, uffd })) => {
                self.session.add_process(pid, RealUffd::from_fd(uffd));
            }
            Ok(Some(Message::Zombie { pid })) => tracing::debug!(pid, "zombie restored"),
            Ok(Some(Message::Fin)) => self.session.finish(),
            Ok(None) => self.conn = None,
            Err(e) => {
                let msg = chain(&e);
                self.conn = None;
                self.shared.lock().conn_error = Some(msg.clone());
                self.session.give_up(&msg);
            }
        }
    }

    fn commands(&mut self) {
        let mut sink = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::SetFill(fill) => self.session.set_fill(fill),
                Command::FillAll(reply) => {
                    self.session.request_fill_all(true);
                    self.fill_waiters.push(reply);
                }
                Command::Remaining(reply) => {
                    let _ = reply.send(self.session.remaining());
                }
                Command::Hold(reply) => {
                    let _ = reply.send(self.session.hold());
                }
                Command::CopiedWhileHeld(reply) => {
                    // what the uffds still hold is part of the answer
                    self.session.service_all();
                    let _ = reply.send(self.session.copied_while_held());
                }
                Command::ReleaseHold(fill) => self.session.release_hold(fill),
                Command::Resumed(fill) => self.session.resumed(fill),
                Command::FillFrom(generations, reply) => {
                    let _ = reply.send(
                        self.session
                            .fill_from(&generations)
                            .map_err(LazyError::Failed),
                    );
                }
                Command::Shutdown => {
                    self.session.begin_shutdown();
                    self.shutting_down = true;
                }
            }
        }
    }

    fn answer_fill_waiters(&mut self) {
        if self.fill_waiters.is_empty() {
            return;
        }
        let answer = if let Some(f) = self.session.failed() {
            Err(f.to_string())
        } else if self.session.is_finished() && self.session.all_filled() {
            Ok(())
        } else {
            return;
        };
        for w in self.fill_waiters.drain(..) {
            let _ = w.send(answer.clone().map_err(LazyError::Failed));
        }
        if !self.shutting_down {
            self.session.request_fill_all(false);
        }
    }
}

struct Ready {
    wake: bool,
    listener: bool,
    conn: bool,
    any_uffd: bool,
    procs: Vec<usize>,
}
