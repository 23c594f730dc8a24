//! Process trees and footprints from `/proc`, and waiting for PIDs to become free.

use std::{
    fs,
    path::Path,
    thread,
    time::{Duration, Instant},
};

/// The root and all its descendants (threads excluded), root first.
pub fn tree_pids(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
        i += 1;
    }
    out
}

/// Resident bytes of one process (0 if it is gone).
pub fn rss_bytes(pid: i32) -> u64 {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * page_size()
}

/// CPU seconds (user + system) one process has used (0 if it is gone).
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    ticks as f64 / hz as f64
}

/// CPU seconds of every process in `pids`.
pub fn tree_cpu_seconds(pids: &[i32]) -> f64 {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map(|v| v as u64)
        .unwrap_or(4096)
}

/// Resident bytes of a whole tree.
pub fn tree_rss_bytes(pids: &[i32]) -> u64 {
    pids.iter().map(|p| rss_bytes(*p)).sum()
}

/// Whether a PID is taken (by a live process or a zombie).
pub fn pid_in_use(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The command name of a PID, for error messages.
pub fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Waits until none of `pids` is in use; returns the first still busy at the deadline.
/// A checkpointed task can linger as a zombie until its parent reaps it, and CRIU cannot
/// restore a task under a PID that is still taken.
pub fn wait_pids_free(pids: &[i32], timeout: Duration) -> Result<(), i32> {
    let deadline = Instant::now() + timeout;
    loop {
        match pids.iter().copied().find(|p| pid_in_use(*p)) {
            None => return Ok(()),
            Some(p) if Instant::now() >= deadline => return Err(p),
            Some(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// After a failed restore, CRIU has killed what it had started; if we are their subreaper the
/// corpses are ours to reap. Waits up to `timeout` for the PIDs to be free.
pub fn reap_failed_restore(pids: &[i32], timeout: Duration) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|p| pid_in_use(*p)) && Instant::now() < deadline {
        for &p in pids {
            let _ = waitpid(nix::unistd::Pid::from_raw(p), Some(WaitPidFlag::WNOHANG));
        }
        thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_tree_and_footprint() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        let pids = tree_pids(me);
        assert_eq!(pids[0], me);
        assert!(pids.contains(&(child.id() as i32)));
        assert!(rss_bytes(me) > 0);
        child.kill().unwrap();
        child.wait().unwrap();
        wait_pids_free(&[child.id() as i32], Duration::from_secs(5)).unwrap();
        assert_eq!(wait_pids_free(&[me], Duration::from_millis(10)), Err(me));
    }
}
