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
    #[error("start-up was cancelled")]
    Cancelled,
    #[error("exited during start-up ({0})")]
    Exited(String),
    #[error("another process, not the service, listens on {addr}")]
    ForeignListener { addr: SocketAddr },
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
    /// Starts the command under `init` (the torpor binary: PID 1 of a new PID namespace for
    /// a root service, the subreaper of the tree for another user's), in its own session, on
    /// its CPUs, in `cgroup`, with stdio on /dev/null. Returns the init's host PID, which the
    /// agent (the subreaper) adopts.
    /// Blocking: call it off the async threads.
    pub fn spawn(&self, init: &Path, cgroup: Option<&ServiceCgroup>) -> Result<i32, LaunchError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(LaunchError::EmptyCommand);
        }
        let init_opts = InitOptions {
            pid_namespace: self.init.uid.unwrap_or(0) == 0,
            ..self.init.clone()
        };
        let mut cmd = Command::new(init);
        cmd.arg(crate::init::SUBCOMMAND)
            .args(init_opts.to_args(&self.argv))
            // systemd's notify socket is torpor's own: a service that speaks sd_notify
            // must not report for it.
            .env_remove("NOTIFY_SOCKET")
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
        reaper.reap(&[pid], Duration::from_secs(5)).await;
    }
}

/// Waits until the service accepts TCP connections on `addr`, while `pid` lives. With
/// `members` (the service's processes), the listening socket must be one of theirs: a
/// process that bound the port while the service slept is not the service.
pub async fn wait_accepting(
    addr: SocketAddr,
    pid: i32,
    reaper: &Reaper,
    timeout: Duration,
    members: Option<&(dyn Fn() -> Vec<i32> + Send + Sync)>,
) -> Result<(), LaunchError> {
    let start = Instant::now();
    let mut foreign = false;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            match members {
                None => return Ok(()),
                Some(members) => {
                    let inodes = listening_inodes(addr);
                    if inodes.is_empty() || owns_any(&members(), &inodes) {
                        // Unknown (no /proc/net) counts as the service's.
                        return Ok(());
                    }
                    foreign = true;
                }
            }
        }
        if let Some(how) = reaper.exited(pid) {
            return Err(LaunchError::Exited(how));
        }
        if start.elapsed() >= timeout {
            return Err(if foreign {
                LaunchError::ForeignListener { addr }
            } else {
                LaunchError::NotAccepting {
                    addr,
                    waited: timeout,
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Socket inodes listening where a connection to `addr` would land (that address or the
/// wildcard, same port), from `/proc/net/tcp` and `/proc/net/tcp6`.
fn listening_inodes(addr: SocketAddr) -> Vec<u64> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl, local, remote, state, queues, timer, retransmits, uid, timeout, inode
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let Some((ip, port)) = f[1].split_once(':') else {
                continue;
            };
            if u16::from_str_radix(port, 16).ok() != Some(addr.port()) {
                continue;
            }
            if listen_ip_matches(ip, addr.ip()) {
                if let Ok(inode) = f[9].parse() {
                    found.push(inode);
                }
            }
        }
    }
    found
}

/// Whether a listener bound to `hex` (the kernel's hex form) takes connections to `ip`.
fn listen_ip_matches(hex: &str, ip: std::net::IpAddr) -> bool {
    if hex.chars().all(|c| c == '0') {
        return true;
    }
    match ip {
        // One little-endian 32-bit word.
        std::net::IpAddr::V4(v4) => {
            u32::from_str_radix(hex, 16).ok().map(|w| w.to_le_bytes()) == Some(v4.octets())
        }
        std::net::IpAddr::V6(v6) => {
            // Four little-endian 32-bit words.
            let want = v6.octets();
            hex.len() == 32
                && (0..4).all(|i| {
                    u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16)
                        .ok()
                        .map(|w| w.to_le_bytes())
                        == Some([
                            want[i * 4],
                            want[i * 4 + 1],
                            want[i * 4 + 2],
                            want[i * 4 + 3],
                        ])
                })
        }
    }
}

/// Whether one of `pids` holds a socket with one of `inodes`.
fn owns_any(pids: &[i32], inodes: &[u64]) -> bool {
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    pids.iter().any(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| {
                fds.flatten().any(|fd| {
                    std::fs::read_link(fd.path())
                        .map(|l| wanted.iter().any(|w| l.as_os_str() == w.as_str()))
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_addresses_in_the_kernels_hex_form() {
        let lo: std::net::IpAddr = [127, 0, 0, 1].into();
        assert!(listen_ip_matches("0100007F", lo));
        assert!(listen_ip_matches("00000000", lo));
        assert!(!listen_ip_matches("0200007F", lo));
        let v6: std::net::IpAddr = "::1".parse().unwrap();
        assert!(listen_ip_matches("00000000000000000000000001000000", v6));
        assert!(!listen_ip_matches("00000000000000000000000002000000", v6));
    }

    #[tokio::test]
    async fn a_port_held_by_another_process_is_not_the_service() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let inodes = listening_inodes(addr);
        assert_eq!(inodes.len(), 1, "our own listener is found");
        assert!(owns_any(&[std::process::id() as i32], &inodes));
        // A "service" that is some other process (here: a sleeping child) does not own it.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let other_pid = other.id() as i32;
        let reaper = Reaper::default();
        let members = move || vec![other_pid];
        let r = wait_accepting(
            addr,
            other_pid,
            &reaper,
            Duration::from_millis(100),
            Some(&members),
        )
        .await;
        other.kill().unwrap();
        other.wait().unwrap();
        assert!(
            matches!(r, Err(LaunchError::ForeignListener { .. })),
            "{r:?}"
        );
        let me = || vec![std::process::id() as i32];
        wait_accepting(addr, other_pid, &reaper, Duration::from_secs(5), Some(&me))
            .await
            .unwrap();
    }
}
