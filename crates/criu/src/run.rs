//! The skeleton a checkpoint into the pool and a restore from it share: CRIU runs with
//! `--stream` on a private work directory holding the image-streamer socket, writes its own
//! output where the identity it runs as may write, and one thread serves that socket to that
//! CRIU process only, until CRIU ends. What differs (the command, what the thread does with the
//! images, how the outcome is judged) stays with the caller.

use std::{
    io,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
};

use tempfile::TempDir;

use crate::{
    binary::{keep_log, log_tail, CriuBinary, CriuError},
    identity::{self, RunAs},
    streamer,
};

/// A work directory for one streamed CRIU run, before CRIU starts.
#[derive(Debug)]
pub(crate) struct StreamedRun {
    /// The images directory CRIU is given (`--images-dir`); removed with this.
    pub work: TempDir,
    /// Where CRIU writes its log and pid file: `work`, or a subdirectory of the identity CRIU
    /// runs as (it cannot write into `work`, which stays ours).
    out_dir: PathBuf,
    /// The identity CRIU runs as; `None`: as this process.
    run_as: Option<RunAs>,
    /// The streamer socket, bound before CRIU starts so that CRIU finds it.
    listener: UnixListener,
    /// Its path, handed to `run_as` with the other endpoints CRIU talks through.
    socket: PathBuf,
}

impl StreamedRun {
    /// A fresh directory `prefix…` under `work_root` with the streamer socket `socket` bound in
    /// it, for CRIU running as `run_as`.
    pub fn create(
        work_root: &Path,
        prefix: &str,
        socket: &str,
        run_as: Option<RunAs>,
    ) -> io::Result<StreamedRun> {
        let work = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(work_root)?;
        let listener = streamer::bind(work.path(), socket)?;
        Ok(StreamedRun {
            out_dir: work.path().to_path_buf(),
            socket: work.path().join(socket),
            work,
            run_as,
            listener,
        })
    }

    /// Opens the directory to the identity CRIU runs as, if not this process's: the socket and
    /// the other endpoints in `owned` become its, `shared_ro` stays ours but readable (see
    /// [`identity::open_to`]); CRIU's output then goes to the directory that returns.
    pub fn open_to_criu(&mut self, owned: &[&Path], shared_ro: &[&Path]) -> io::Result<()> {
        if let Some(who) = self.run_as {
            let mut all: Vec<&Path> = owned.to_vec();
            all.push(&self.socket);
            self.out_dir = identity::open_to(self.work.path(), &all, shared_ro, who)?;
        }
        Ok(())
    }

    /// The file `name` in CRIU's output directory.
    pub fn out(&self, name: &str) -> PathBuf {
        self.out_dir.join(name)
    }

    /// Starts `cmd` (a CRIU command on this directory) as the chosen identity; then
    /// [`RunningCriu::serve`].
    pub fn spawn(self, criu: &CriuBinary, cmd: &mut Command) -> Result<RunningCriu, CriuError> {
        if let Some(who) = self.run_as {
            identity::run_as(cmd, who);
        }
        let child = criu.spawn(cmd)?;
        Ok(RunningCriu {
            child,
            work: self.work,
            listener: Some(self.listener),
            criu_done: Arc::new(AtomicBool::new(false)),
            streamer: None,
        })
    }
}

/// A streamed CRIU run under way.
#[derive(Debug)]
pub(crate) struct RunningCriu {
    /// The CRIU process; the caller waits for it (or kills it).
    pub child: Child,
    /// The images directory, kept until the run is judged (images CRIU wrote late are read
    /// from it).
    pub work: TempDir,
    /// The streamer socket until [`RunningCriu::serve`] takes it.
    listener: Option<UnixListener>,
    /// Tells the streamer thread that no connection will come any more.
    criu_done: Arc<AtomicBool>,
    /// Taken by [`RunningCriu::join`].
    streamer: Option<JoinHandle<io::Result<()>>>,
}

impl RunningCriu {
    /// Starts the thread that hands the streamer connection of this CRIU process (no other)
    /// to `serve`; the thread ends without calling it if CRIU ends first. Once only.
    pub fn serve(
        &mut self,
        serve: impl FnOnce(&mut UnixStream) -> io::Result<()> + Send + 'static,
    ) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let (criu_pid, criu_done) = (self.child.id(), self.criu_done.clone());
        self.streamer = Some(thread::spawn(move || -> io::Result<()> {
            let alive = || !criu_done.load(Ordering::SeqCst);
            match streamer::accept_while(&listener, criu_pid, alive)? {
                Some(mut sock) => serve(&mut sock),
                None => Ok(()),
            }
        }));
    }

    /// Says that CRIU has ended, so that a streamer thread still waiting for its connection
    /// stops waiting; then [`RunningCriu::join`].
    pub fn criu_ended(&self) {
        self.criu_done.store(true, Ordering::SeqCst);
    }

    /// Waits for the streamer thread (after [`RunningCriu::criu_ended`]); its outcome.
    pub fn join(&mut self) -> io::Result<()> {
        self.streamer
            .take()
            .map_or(Ok(()), |t| t.join().expect("streamer thread panicked"))
    }
}

/// Keeps CRIU's `log` of a failed run of `kind` for `name` where the work directory's removal
/// does not take it: (its last error lines, the kept path).
pub(crate) fn keep_failed_log(log: &Path, kind: &str, name: &str) -> (String, PathBuf) {
    let kept = keep_log(log, kind, name);
    (log_tail(&kept, 12), kept)
}
