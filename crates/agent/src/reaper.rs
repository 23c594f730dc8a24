//! Reaping, as an init does. The agent is the subreaper of what it starts and restores, so
//! service roots (and anything a runtime leaves behind) come back to it as children. Service
//! roots it watches are reaped as soon as they die, their status kept for the service loop;
//! any other child that stays a zombie (an orphan nobody waits for) is reaped after a short
//! grace, which leaves children the agent waits for itself (CRIU, runc, hooks) to their owner.
//! A root adopted from an earlier run (left running by `torpor stop --keep-running`) is not
//! our child, so no wait tells its end: it is watched through a pidfd, which becomes readable
//! when that very process exits, even if its PID is reused afterwards.

use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Mutex,
    time::{Duration, Instant},
};

use nix::{
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::sync::watch;

/// How long a child nobody claimed may stay a zombie before the sweep reaps it.
const ORPHAN_GRACE: Duration = Duration::from_secs(1);
/// Sweeps also run this often without a SIGCHLD (a signal can coalesce or arrive early).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct State {
    /// Service roots: reaped at once, status kept.
    watched: HashSet<i32>,
    /// How watched roots ended, until the service loop asks.
    exits: HashMap<i32, String>,
    /// Unclaimed zombies and when they were first seen.
    zombies: HashMap<i32, Instant>,
    /// Adopted roots (not our children) and their pidfds.
    adopted: HashMap<i32, OwnedFd>,
}

/// The agent's reaper.
#[derive(Debug, Default)]
pub struct Reaper {
    state: Mutex<State>,
}

fn describe(status: WaitStatus) -> Option<(i32, String)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), format!("exit code {code}"))),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), format!("killed by {sig}"))),
        _ => None,
    }
}

impl Reaper {
    /// From now on `pid` (a child of ours) is a service root.
    pub fn watch(&self, pid: i32) {
        self.state.lock().expect("reaper lock").watched.insert(pid);
    }

    /// From now on `pid`, a root that is not our child (left running by an earlier run), is
    /// a service root, watched through a pidfd. The caller checks, after this, that `pid` is
    /// still the process it means (its start time): from then on the pidfd refers to it.
    pub fn adopt(&self, pid: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
        let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned to us and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        self.state
            .lock()
            .expect("reaper lock")
            .adopted
            .insert(pid, fd);
        Ok(())
    }

    /// Stops watching an adopted root (it turned out not to be the process meant).
    pub fn forget(&self, pid: i32) {
        self.state.lock().expect("reaper lock").adopted.remove(&pid);
    }

    /// Whether the watched root `pid` has exited (reaping it if so), and how.
    pub fn exited(&self, pid: i32) -> Option<String> {
        let mut s = self.state.lock().expect("reaper lock");
        if let Some(fd) = s.adopted.get(&pid) {
            if !pidfd_readable(fd) {
                return None;
            }
            s.adopted.remove(&pid);
            return Some(
                "exited (adopted from an earlier run: its status went to its parent)".into(),
            );
        }
        if let Some(how) = s.exits.remove(&pid) {
            s.watched.remove(&pid);
            return Some(how);
        }
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(st) => describe(st).map(|(_, how)| {
                s.watched.remove(&pid);
                how
            }),
            // Not our child (any more): gone unless something else still has the PID.
            Err(_) => {
                if torpor_criu::procs::pid_in_use(pid) {
                    None
                } else {
                    s.watched.remove(&pid);
                    Some("gone".to_string())
                }
            }
        }
    }

    /// Waits up to `wait` until none of `pids` (dead or dying: a stopped root, or a dumped
    /// tree's processes, which come to us when their init is killed outside a PID namespace)
    /// exists, reaping those that are ours: a restore must find their PIDs free.
    pub async fn reap(&self, pids: &[i32], wait: Duration) {
        let deadline = Instant::now() + wait;
        let mut left: Vec<i32> = pids.to_vec();
        while !left.is_empty() && Instant::now() < deadline {
            // `exited` reaps what is ours and calls gone what no longer exists.
            left.retain(|&pid| self.exited(pid).is_none());
            if !left.is_empty() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }

    /// Reaps what is ours to reap now.
    pub fn sweep(&self) {
        let me = std::process::id() as i32;
        let zombies = zombie_children(me);
        let now = Instant::now();
        let mut s = self.state.lock().expect("reaper lock");
        s.zombies.retain(|pid, _| zombies.contains(pid));
        for pid in zombies {
            let claim = s.watched.contains(&pid)
                || s.zombies
                    .get(&pid)
                    .is_some_and(|seen| now.duration_since(*seen) >= ORPHAN_GRACE);
            if !claim {
                s.zombies.entry(pid).or_insert(now);
                continue;
            }
            if let Ok(st) = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                if let Some((pid, how)) = describe(st) {
                    s.zombies.remove(&pid);
                    if s.watched.contains(&pid) {
                        s.exits.insert(pid, how);
                    } else {
                        tracing::debug!(pid, %how, "reaped an orphan");
                    }
                }
            }
        }
    }

    /// Sweeps on every SIGCHLD and every second until `shutdown` is true.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGCHLD stream; reaping once a second");
                None
            }
        };
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        while !*shutdown.borrow() {
            tokio::select! {
                r = shutdown.changed() => if r.is_err() { break },
                _ = async { match &mut sigchld { Some(s) => { s.recv().await; } None => std::future::pending().await } } => self.sweep(),
                _ = tick.tick() => self.sweep(),
            }
        }
    }
}

/// Whether the process behind `fd` has exited.
fn pidfd_readable(fd: &OwnedFd) -> bool {
    let mut p = nix::libc::pollfd {
        fd: fd.as_raw_fd(),
        events: nix::libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { nix::libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents != 0
}

/// Our children that are zombies now.
fn zombie_children(me: i32) -> Vec<i32> {
    let me = me.to_string();
    torpor_criu::procs::all_pids()
        .into_iter()
        .filter(|&pid| {
            // State, then ppid.
            torpor_criu::procs::stat_fields(pid)
                .is_some_and(|f| f.len() > 1 && f[0] == "Z" && f[1] == me)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_watched_child_is_reaped_by_the_sweep_and_its_status_kept() {
        // The reaper, not the handle, waits for it: that is what is under test.
        let pid = Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap()
            .id() as i32;
        let r = Reaper::default();
        r.watch(pid);
        // Wait until it is a zombie, then let the sweep take it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !zombie_children(std::process::id() as i32).contains(&pid) {
            assert!(Instant::now() < deadline, "child never exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        r.sweep();
        assert!(!zombie_children(std::process::id() as i32).contains(&pid));
        assert_eq!(r.exited(pid).as_deref(), Some("exit code 3"));
    }

    #[test]
    fn an_adopted_root_is_seen_to_exit_through_its_pidfd() {
        // Its parent is a shell that waits for it: the process is not our child.
        let mut sh = Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(sh.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let pid: i32 = line.trim().parse().unwrap();
        /// Kills the sleeper and reaps the shell, also when the test fails.
        struct Guard(i32, std::process::Child);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = nix::sys::signal::kill(
                    Pid::from_raw(self.0),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = self.1.wait();
            }
        }
        let _guard = Guard(pid, sh);
        let r = Reaper::default();
        r.adopt(pid).unwrap();
        assert_eq!(r.exited(pid), None, "running");
        nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let how = loop {
            if let Some(how) = r.exited(pid) {
                break how;
            }
            assert!(Instant::now() < deadline, "exit never seen");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(how.contains("adopted"), "{how}");
    }

    #[test]
    fn an_unclaimed_zombie_is_left_to_its_owner_for_a_grace_period() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let r = Reaper::default();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !zombie_children(std::process::id() as i32).contains(&pid) {
            assert!(Instant::now() < deadline, "child never exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        r.sweep();
        // Its owner can still wait for it.
        assert!(child.wait().unwrap().success());
    }
}
