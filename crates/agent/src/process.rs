//! Starting, watching and stopping a service's process tree.

use std::{
    collections::BTreeMap,
    io::{self, BufRead},
    net::SocketAddr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{kill, killpg, Signal},
    unistd::Pid,
};
use thiserror::Error;
use tokio::time::Instant;

use crate::{cgroup::ServiceCgroup, init::InitOptions, reaper::Reaper};

/// How a service is started from scratch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// A command, run as a process tree of the agent.
    Process(ProcessLaunch),
    /// An OCI bundle, run with runc as container `torpor-NAME`.
    Container { bundle: PathBuf },
}

/// A command line and its surroundings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessLaunch {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Added to the agent's environment.
    pub env: BTreeMap<String, String>,
    /// CPUs the service may run on (its cpuset); empty means all.
    pub cpus: Vec<usize>,
    /// Who it runs as, its limits and directory (applied by its init).
    pub init: InitOptions,
}

/// Why a service could not be started.
#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("command is empty")]
    EmptyCommand,
    #[error("cannot run {0:?}")]
    Spawn(String, #[source] io::Error),
    #[error("the service's init failed ({0})")]
    Init(String),
    #[error("exited during start-up ({0})")]
    Exited(String),
    #[error("not accepting connections on {addr} after {waited:?}")]
    NotAccepting { addr: SocketAddr, waited: Duration },
    #[error("cannot prepare the service's cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Runc(#[from] torpor_criu::runc::RuncError),
}

impl ProcessLaunch {
    /// Starts the command under `init` (the torpor binary, which becomes PID 1 of a new PID
    /// namespace), in its own session, on its CPUs, in `cgroup`, with stdio on /dev/null.
    /// Returns the host PID of the namespace's init, which the agent (the subreaper) adopts.
    /// Blocking: call it off the async threads.
    pub fn spawn(&self, init: &Path, cgroup: Option<&ServiceCgroup>) -> Result<i32, LaunchError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(LaunchError::EmptyCommand);
        }
        let mut cmd = Command::new(init);
        cmd.arg(crate::init::SUBCOMMAND)
            .args(self.init.to_args(&self.argv))
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let join = match cgroup {
            Some(cg) => Some(cg.join_handle().map_err(|source| LaunchError::Cgroup {
                path: cg.path().to_path_buf(),
                source,
            })?),
            None => None,
        };
        let join_fd = join.as_ref().map(|f| f.as_raw_fd());
        let cpus = self.cpus.clone();
        let mut set = nix::sched::CpuSet::new();
        for c in &cpus {
            let _ = set.set(*c);
        }
        // SAFETY: only async-signal-safe calls (setsid, sched_setaffinity, write); everything
        // they use is built before the fork.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(io::Error::from)?;
                if let Some(fd) = join_fd {
                    if nix::libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if !cpus.is_empty() {
                    nix::sched::sched_setaffinity(Pid::from_raw(0), &set)
                        .map_err(io::Error::from)?;
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| LaunchError::Spawn(self.argv.join(" "), e))?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| io::BufReader::new(out).read_line(&mut line));
        let status = child
            .wait()
            .map_err(|e| LaunchError::Spawn(self.argv.join(" "), e))?;
        match line.trim().parse::<i32>() {
            Ok(pid) if status.success() => Ok(pid),
            _ => Err(LaunchError::Init(match (read, status.code()) {
                (Some(Err(e)), _) => e.to_string(),
                (_, Some(code)) => format!("exit code {code}"),
                _ => status.to_string(),
            })),
        }
    }
}

/// Stops a service's tree: SIGTERM to its root (a namespace init forwards it to the whole
/// namespace; otherwise its process group), then SIGKILL to the whole cgroup (or group)
/// after `grace`; the root is reaped.
pub async fn stop_tree(pid: i32, cgroup: Option<&ServiceCgroup>, reaper: &Reaper, grace: Duration) {
    let root = Pid::from_raw(pid);
    let _ = kill(root, Signal::SIGTERM);
    let _ = killpg(root, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    let mut gone = false;
    while Instant::now() < deadline {
        if reaper.exited(pid).is_some() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Stragglers: a namespace dies with its init; a cgroup holds whatever escaped the group.
    let _ = killpg(root, Signal::SIGKILL);
    let _ = kill(root, Signal::SIGKILL);
    if let Some(cg) = cgroup {
        let cg = cg.clone();
        let _ = tokio::task::spawn_blocking(move || cg.kill_all(Duration::from_secs(5))).await;
    }
    if !gone {
        reaper.reap(pid, Duration::from_secs(5)).await;
    }
}

/// Waits until something accepts TCP connections on `addr`, while `pid` lives.
pub async fn wait_accepting(
    addr: SocketAddr,
    pid: i32,
    reaper: &Reaper,
    timeout: Duration,
) -> Result<(), LaunchError> {
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(how) = reaper.exited(pid) {
            return Err(LaunchError::Exited(how));
        }
        if start.elapsed() >= timeout {
            return Err(LaunchError::NotAccepting {
                addr,
                waited: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
