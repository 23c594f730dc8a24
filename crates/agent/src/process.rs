//! Starting, watching and stopping a service's process tree.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use nix::{
    sys::{
        signal::{killpg, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};
use thiserror::Error;
use tokio::time::Instant;

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
    pub cwd: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    /// CPUs the service may run on (its cpuset); empty means all.
    pub cpus: Vec<usize>,
}

/// Why a service could not be started.
#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("command is empty")]
    EmptyCommand,
    #[error("cannot run {0:?}")]
    Spawn(String, #[source] io::Error),
    #[error("exited during start-up ({0})")]
    Exited(String),
    #[error("not accepting connections on {addr} after {waited:?}")]
    NotAccepting { addr: SocketAddr, waited: Duration },
    #[error(transparent)]
    Runc(#[from] torpor_criu::runc::RuncError),
}

impl ProcessLaunch {
    /// Starts the command as our child, in its own session (so its tree can be signalled
    /// and checkpointed as a unit), on its CPUs, with stdio on /dev/null.
    pub fn spawn(&self) -> Result<i32, LaunchError> {
        let (program, args) = self.argv.split_first().ok_or(LaunchError::EmptyCommand)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        let cpus = self.cpus.clone();
        // SAFETY: setsid and sched_setaffinity are async-signal-safe; the CpuSet is built
        // before fork and only read after.
        let mut set = nix::sched::CpuSet::new();
        for c in &cpus {
            let _ = set.set(*c);
        }
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid().map_err(io::Error::from)?;
                if !cpus.is_empty() {
                    nix::sched::sched_setaffinity(Pid::from_raw(0), &set)
                        .map_err(io::Error::from)?;
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| LaunchError::Spawn(self.argv.join(" "), e))?;
        // The agent reaps by PID (restored trees have no `Child`), so the handle is dropped.
        Ok(child.id() as i32)
    }
}

/// Whether `pid` (a child of ours) has exited; reaps it if so.
pub fn exited(pid: i32) -> Option<String> {
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(format!("exit code {code}")),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(format!("killed by {sig}")),
        Ok(_) => None,
        // Not our child any more (already reaped): gone.
        Err(_) => (!torpor_criu::procs::pid_in_use(pid)).then(|| "gone".to_string()),
    }
}

/// Reaps a child that is known to be dead or dying (after CRIU killed it).
pub fn reap(pid: i32) {
    let _ = waitpid(Pid::from_raw(pid), None);
}

/// Stops a service's tree: SIGTERM to its process group, SIGKILL after `grace`, reaped.
pub async fn stop_tree(pid: i32, grace: Duration) {
    let group = Pid::from_raw(pid);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if exited(pid).is_some() {
            let _ = killpg(group, Signal::SIGKILL); // stragglers of the group
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = killpg(group, Signal::SIGKILL);
    reap(pid);
}

/// Waits until something accepts TCP connections on `addr`, while `pid` lives.
pub async fn wait_accepting(
    addr: SocketAddr,
    pid: i32,
    timeout: Duration,
) -> Result<(), LaunchError> {
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(how) = exited(pid) {
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
