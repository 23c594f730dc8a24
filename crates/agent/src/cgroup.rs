//! Each plain-process service's own cgroup: how the agent knows the service's tree exactly
//! (its members and CPU time, whatever they fork or reparent), stops it exactly (`cgroup.kill`
//! or SIGKILL to every member), and finds what a killed agent left behind at its next start.
//!
//! The unified (v2) hierarchy is used where it is mounted, even without controllers (as on
//! hybrid hosts: membership, `cgroup.kill` and `cpu.stat` need none); otherwise a v1
//! hierarchy with no side effects (`pids`, else `freezer`, else `cpuacct`). Services live in
//! `torpor-services/NAME` under the hierarchy's root (the agent names it `NAMESPACE.SERVICE`). Every path is under a root given by the
//! caller, so tests use a fake tree.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

/// The directory under a hierarchy's root that holds one cgroup per service (shared with the
/// knobs, which limit those cgroups in place on the unified hierarchy).
const SERVICES_DIR: &str = torpor_power::knobs::SERVICES_CGROUP;

/// Which kind of hierarchy the services' cgroups are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hierarchy {
    Unified,
    /// A v1 hierarchy: no `cgroup.kill`; CPU time only when it is `cpuacct`.
    Legacy {
        cpuacct: bool,
    },
}

/// Where services' cgroups are made.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    dir: PathBuf,
    kind: Hierarchy,
}

impl CgroupRoot {
    /// Picks the hierarchy from a `mountinfo` file (`/proc/self/mountinfo`); `None` when no
    /// usable cgroup hierarchy is mounted.
    pub fn discover(mountinfo: &Path) -> Option<CgroupRoot> {
        let text = fs::read_to_string(mountinfo).ok()?;
        let mut v1: Vec<(PathBuf, String)> = Vec::new();
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split(' ').nth(4) else {
                continue;
            };
            let mut r = right.split(' ');
            let (fstype, _source, options) = (r.next(), r.next(), r.next().unwrap_or(""));
            match fstype {
                Some("cgroup2") => {
                    return Some(CgroupRoot {
                        dir: Path::new(mount_point).join(SERVICES_DIR),
                        kind: Hierarchy::Unified,
                    })
                }
                Some("cgroup") => v1.push((mount_point.into(), options.to_string())),
                _ => {}
            }
        }
        for controller in ["pids", "freezer", "cpuacct"] {
            if let Some((mp, _)) = v1
                .iter()
                .find(|(_, o)| o.split(',').any(|opt| opt == controller))
            {
                return Some(CgroupRoot {
                    dir: mp.join(SERVICES_DIR),
                    kind: Hierarchy::Legacy {
                        cpuacct: controller == "cpuacct",
                    },
                });
            }
        }
        None
    }

    /// A root at `dir` (the services' directory itself), for tests on a fake tree.
    pub fn at(dir: PathBuf, kind: Hierarchy) -> CgroupRoot {
        CgroupRoot { dir, kind }
    }

    /// The services' directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup of service `name`, created if missing.
    pub fn service(&self, name: &str) -> io::Result<ServiceCgroup> {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir)?;
        Ok(ServiceCgroup {
            dir,
            kind: self.kind,
        })
    }

    /// Services' cgroups that exist now (left by an earlier run when found at start).
    pub fn existing(&self) -> Vec<ServiceCgroup> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found: Vec<ServiceCgroup> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| ServiceCgroup {
                dir: e.path(),
                kind: self.kind,
            })
            .collect();
        found.sort_by(|a, b| a.dir.cmp(&b.dir));
        found
    }
}

/// Why a service's cgroup could not be frozen or thawed.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("its cgroup hierarchy has no freezer")]
    Unsupported,
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the kernel did not finish within {wait:?}")]
    Timeout { wait: Duration },
    /// Its processes were moved to another cgroup of the same hierarchy, by something other
    /// than torpor (whose consolidation limits a service's own unified cgroup where it is):
    /// freezing the empty one would stop nothing.
    #[error("its processes are not in its cgroup, so a freeze would stop nothing")]
    Empty,
}

/// One service's cgroup.
#[derive(Debug, Clone)]
pub struct ServiceCgroup {
    dir: PathBuf,
    kind: Hierarchy,
}

impl ServiceCgroup {
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The service's name (the directory's).
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Every process in the cgroup now.
    pub fn procs(&self) -> Vec<i32> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// `cgroup.procs` opened for writing: a child that writes `0` to it before it runs the
    /// service joins the cgroup, and so does everything it starts. The cgroup is made again
    /// if something removed it meanwhile.
    pub fn join_handle(&self) -> io::Result<File> {
        fs::create_dir_all(&self.dir)?;
        OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
    }

    /// The `cgroup.procs` file, with the cgroup made again if something removed it.
    pub fn procs_file(&self) -> io::Result<PathBuf> {
        fs::create_dir_all(&self.dir)?;
        Ok(self.dir.join("cgroup.procs"))
    }

    /// Moves `pid` into the cgroup (a restored tree's processes).
    pub fn add(&self, pid: i32) -> io::Result<()> {
        self.join_handle()?.write_all(pid.to_string().as_bytes())
    }

    /// CPU seconds used by the cgroup's processes over its life, where the hierarchy counts it.
    pub fn cpu_seconds(&self) -> Option<f64> {
        match self.kind {
            Hierarchy::Unified => {
                let stat = fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
                let usec: f64 = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))?
                    .trim()
                    .parse()
                    .ok()?;
                Some(usec / 1e6)
            }
            Hierarchy::Legacy { cpuacct: true } => {
                let ns: f64 = fs::read_to_string(self.dir.join("cpuacct.usage"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                Some(ns / 1e9)
            }
            Hierarchy::Legacy { cpuacct: false } => None,
        }
    }

    /// SIGKILLs every process in the cgroup (`cgroup.kill` where the kernel has it) and waits
    /// up to `wait` until none is left; true when the cgroup is empty.
    pub fn kill_all(&self, wait: Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        let killer = self.dir.join("cgroup.kill");
        loop {
            let procs = self.procs();
            if procs.is_empty() {
                return true;
            }
            if self.kind == Hierarchy::Unified && killer.exists() {
                let _ = fs::write(&killer, "1");
            } else {
                // Without cgroup.kill a fork can slip past one round; the loop takes it next.
                for p in procs {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
            if std::time::Instant::now() >= deadline {
                return self.procs().is_empty();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Freezes (`true`) or thaws every process of the cgroup and waits up to `wait` until
    /// the kernel says it is done: `cgroup.freeze` and `cgroup.events` on the unified
    /// hierarchy, `freezer.state` on a v1 freezer hierarchy. A frozen task's timers and
    /// wakeups stop; its memory stays.
    pub fn freeze(&self, on: bool, wait: Duration) -> Result<(), FreezeError> {
        let (file, value, done) = match self.kind {
            Hierarchy::Unified => (
                "cgroup.freeze",
                if on { "1" } else { "0" },
                if on { "frozen 1" } else { "frozen 0" },
            ),
            Hierarchy::Legacy { .. } if self.dir.join("freezer.state").exists() => (
                "freezer.state",
                if on { "FROZEN" } else { "THAWED" },
                if on { "FROZEN" } else { "THAWED" },
            ),
            Hierarchy::Legacy { .. } => return Err(FreezeError::Unsupported),
        };
        let control = self.dir.join(file);
        if !control.exists() {
            return Err(FreezeError::Unsupported);
        }
        if on && self.is_empty() {
            return Err(FreezeError::Empty);
        }
        fs::write(&control, value).map_err(|source| FreezeError::Write {
            path: control.clone(),
            source,
        })?;
        let status = match self.kind {
            Hierarchy::Unified => self.dir.join("cgroup.events"),
            Hierarchy::Legacy { .. } => control,
        };
        let deadline = std::time::Instant::now() + wait;
        loop {
            let text = fs::read_to_string(&status).unwrap_or_default();
            if text.lines().any(|l| l.trim() == done) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(FreezeError::Timeout { wait });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Whether the cgroup holds no process: on the unified hierarchy its subtree (`populated
    /// 0`, a file the kernel always has), on v1 its own `cgroup.procs`. A file that cannot be
    /// read says nothing, so it is not taken for empty.
    fn is_empty(&self) -> bool {
        match self.kind {
            Hierarchy::Unified => fs::read_to_string(self.dir.join("cgroup.events"))
                .is_ok_and(|t| t.lines().any(|l| l.trim() == "populated 0")),
            Hierarchy::Legacy { .. } => {
                fs::read_to_string(self.dir.join("cgroup.procs")).is_ok_and(|t| t.trim().is_empty())
            }
        }
    }

    /// Removes the (empty) cgroup.
    pub fn remove(&self) -> io::Result<()> {
        match fs::remove_dir(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freezing_writes_the_control_file_and_waits_for_the_kernel_on_a_fake_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = CgroupRoot::at(tmp.path().join("svc"), Hierarchy::Unified);
        let cg = root.service("web").unwrap();
        // No cgroup.freeze: a kernel (or a root cgroup) without the freezer.
        assert!(matches!(
            cg.freeze(true, Duration::from_millis(5)),
            Err(FreezeError::Unsupported)
        ));
        fs::write(cg.path().join("cgroup.freeze"), "0").unwrap();
        fs::write(cg.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        // Its processes moved elsewhere: refused, nothing written.
        fs::write(cg.path().join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        let e = cg.freeze(true, Duration::from_millis(5)).unwrap_err();
        assert!(matches!(e, FreezeError::Empty), "{e}");
        assert_eq!(
            fs::read_to_string(cg.path().join("cgroup.freeze")).unwrap(),
            "0"
        );
        fs::write(cg.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        // The fake kernel never confirms: a timeout, named.
        let e = cg.freeze(true, Duration::from_millis(5)).unwrap_err();
        assert!(matches!(e, FreezeError::Timeout { .. }), "{e}");
        assert_eq!(
            fs::read_to_string(cg.path().join("cgroup.freeze")).unwrap(),
            "1"
        );
        fs::write(cg.path().join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        cg.freeze(true, Duration::from_millis(5)).unwrap();
        // v1: freezer.state is both the control and the status.
        let v1 = CgroupRoot::at(tmp.path().join("v1"), Hierarchy::Legacy { cpuacct: false });
        let cg = v1.service("web").unwrap();
        fs::write(cg.path().join("freezer.state"), "THAWED").unwrap();
        fs::write(cg.path().join("cgroup.procs"), "").unwrap();
        let e = cg.freeze(true, Duration::from_millis(5)).unwrap_err();
        assert!(matches!(e, FreezeError::Empty), "{e}");
        fs::write(cg.path().join("cgroup.procs"), "42\n").unwrap();
        cg.freeze(true, Duration::from_millis(5)).unwrap();
        assert_eq!(
            fs::read_to_string(cg.path().join("freezer.state")).unwrap(),
            "FROZEN"
        );
    }

    const HYBRID: &str = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
28 25 0:25 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
";
    const LEGACY: &str = "\
27 25 0:24 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
29 25 0:26 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
";

    fn discover(text: &str) -> Option<CgroupRoot> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mountinfo");
        fs::write(&p, text).unwrap();
        CgroupRoot::discover(&p)
    }

    #[test]
    fn the_unified_hierarchy_is_preferred_then_a_side_effect_free_v1_one() {
        let r = discover(HYBRID).unwrap();
        assert_eq!(r.kind, Hierarchy::Unified);
        assert_eq!(r.dir, Path::new("/sys/fs/cgroup/unified/torpor-services"));
        let r = discover(LEGACY).unwrap();
        assert_eq!(r.kind, Hierarchy::Legacy { cpuacct: true });
        assert_eq!(r.dir, Path::new("/sys/fs/cgroup/cpuacct/torpor-services"));
        assert!(discover("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n").is_none());
    }

    #[test]
    fn members_cpu_time_and_leftovers_on_a_fake_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = CgroupRoot::at(dir.path().join(SERVICES_DIR), Hierarchy::Unified);
        assert!(root.existing().is_empty());
        let web = root.service("web").unwrap();
        fs::write(web.path().join("cgroup.procs"), "12\n34\n").unwrap();
        fs::write(
            web.path().join("cpu.stat"),
            "usage_usec 2500000\nuser_usec 2000000\n",
        )
        .unwrap();
        assert_eq!(web.procs(), vec![12, 34]);
        assert_eq!(web.cpu_seconds(), Some(2.5));
        root.service("db").unwrap();
        let names: Vec<String> = root.existing().iter().map(|c| c.name()).collect();
        assert_eq!(names, ["db", "web"]);
        let legacy = CgroupRoot::at(dir.path().join("v1"), Hierarchy::Legacy { cpuacct: false });
        assert_eq!(legacy.service("x").unwrap().cpu_seconds(), None);
    }
}
