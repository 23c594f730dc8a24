//! Process trees, footprints, identities and namespaces from `/proc`, and waiting for PIDs
//! to become free.

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

/// The credentials of one process, as `/proc/PID/status` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskIds {
    pub pid: i32,
    /// Real, effective, saved and filesystem uid.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem gid.
    pub gids: [u32; 4],
}

impl TaskIds {
    /// The one uid and gid the process runs as, when its four uids agree and so do its
    /// four gids (a process in the middle of a setuid dance has none).
    pub fn single(&self) -> Option<(u32, u32)> {
        let same = |v: &[u32; 4]| v.iter().all(|x| *x == v[0]);
        (same(&self.uids) && same(&self.gids)).then_some((self.uids[0], self.gids[0]))
    }
}

/// The value of one `Name:` line of `/proc/PID/status`.
fn status_field(pid: &str, name: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

fn four_ids(field: &str) -> Option<[u32; 4]> {
    let v: Vec<u32> = field
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    v.try_into().ok()
}

/// The credentials of one process; `None` if it is gone.
pub fn task_ids(pid: i32) -> Option<TaskIds> {
    let p = pid.to_string();
    Some(TaskIds {
        pid,
        uids: four_ids(&status_field(&p, "Uid")?)?,
        gids: four_ids(&status_field(&p, "Gid")?)?,
    })
}

/// The credentials of every process of the tree rooted at `root` (those that exit meanwhile
/// are left out), root first.
pub fn tree_uids(root: i32) -> Vec<TaskIds> {
    tree_pids(root).into_iter().filter_map(task_ids).collect()
}

/// Whether this process has CAP_SYS_RESOURCE in its effective set. Without it, CRIU running
/// as root cannot read or set the resource limits of a process of another uid.
pub fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    status_field("self", "CapEff")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// Whether `pid` is the init (PID 1) of a PID namespace below ours: the last number of its
/// `NSpid:` line is 1 and there is more than one.
pub fn is_pid_namespace_init(pid: i32) -> bool {
    status_field(&pid.to_string(), "NSpid").is_some_and(|v| {
        let ids: Vec<&str> = v.split_whitespace().collect();
        ids.len() > 1 && ids.last() == Some(&"1")
    })
}

/// Whether `pid` is in a PID namespace other than ours yet shares our mount namespace, so its
/// `/proc` belongs to our namespace, not its own, and it lacks CAP_SYS_ADMIN to mount one. CRIU's
/// parasite, running with the task's credentials, then cannot get a `/proc` of the task's
/// namespace: "can't dump unprivileged task whose /proc doesn't belong to it".
pub fn lacks_own_proc(pid: i32) -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let ns = |who: &str, kind: &str| fs::read_link(format!("/proc/{who}/ns/{kind}")).ok();
    let p = pid.to_string();
    let foreign_pid_ns = matches!((ns(&p, "pid"), ns("self", "pid")), (Some(a), Some(b)) if a != b);
    let our_mounts = matches!((ns(&p, "mnt"), ns("self", "mnt")), (Some(a), Some(b)) if a == b);
    let sys_admin = status_field(&p, "CapEff")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0);
    foreign_pid_ns && our_mounts && !sys_admin
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
/// The fields of `/proc/PID/stat` after the parenthesised command (state first): split after
/// its last `)`, so a command with spaces or parentheses cannot shift them.
pub fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Every process's PID now.
pub fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn cpu_seconds(pid: i32) -> f64 {
    let Some(fields) = stat_fields(pid) else {
        return 0.0;
    };
    // utime and stime are the 12th and 13th fields after the command.
    let ticks: u64 = fields
        .iter()
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

/// How many times the threads of a whole tree were put on a CPU (the third field of each
/// thread's `schedstat`): for a tree with nothing to do, its wakeups (timers, GC,
/// heartbeats).
pub fn tree_runs(pids: &[i32]) -> u64 {
    let runs = |pid: i32| -> u64 {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0;
        };
        tasks
            .flatten()
            .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().nth(2)?.parse::<u64>().ok())
            .sum()
    };
    pids.iter().map(|p| runs(*p)).sum()
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

    #[test]
    fn own_identity_and_namespace() {
        let me = std::process::id() as i32;
        let ids = tree_uids(me);
        assert_eq!(ids[0].pid, me);
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        assert_eq!(ids[0].uids[0], uid);
        assert_eq!(ids[0].gids[0], gid);
        assert_eq!(ids[0].single(), Some((uid, gid)));
        assert!(
            !is_pid_namespace_init(me),
            "tests run in the host's PID namespace"
        );
        assert!(!lacks_own_proc(me), "our /proc is our namespace's");
        assert_eq!(task_ids(-5), None);
    }

    #[test]
    fn split_identities_have_no_single_one() {
        let t = TaskIds {
            pid: 1,
            uids: [0, 65534, 0, 65534],
            gids: [0; 4],
        };
        assert_eq!(t.single(), None);
        assert_eq!(four_ids("1 2 3"), None);
        assert_eq!(four_ids("1 2 3 4"), Some([1, 2, 3, 4]));
    }
}
