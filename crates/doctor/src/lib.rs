//! Host readiness checks for `torpor doctor`. Each check says in plain words what it found
//! and what to do about it; required checks that fail make the host unfit. File-system
//! facts are read under a [`HostRoots`] so tests can point them at a fake tree.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde::Serialize;
use torpor_criu::CriuBinary;

/// Where the checks read the host's state.
#[derive(Debug, Clone)]
pub struct HostRoots {
    /// Normally `/proc`.
    pub proc: PathBuf,
    /// Normally `/sys`.
    pub sys: PathBuf,
    /// Normally `/run`, where CRIU keeps its kernel-probe cache.
    pub run: PathBuf,
}

impl Default for HostRoots {
    fn default() -> Self {
        HostRoots {
            proc: "/proc".into(),
            sys: "/sys".into(),
            run: "/run".into(),
        }
    }
}

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// Works, but slower or with less: worth fixing.
    Warn,
    /// Not there or not working.
    Missing,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// Whether torpor cannot checkpoint without it.
    pub required: bool,
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, required: bool, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name,
            status,
            required,
            detail: detail.into(),
        }
    }
}

/// Whether all required checks passed.
pub fn fit(checks: &[Check]) -> bool {
    checks
        .iter()
        .all(|c| !c.required || c.status != Status::Missing)
}

/// Runs every check.
pub fn run_checks(roots: &HostRoots, criu: Option<&CriuBinary>) -> Vec<Check> {
    let mut out = vec![root_check(), criu_version_check(criu)];
    out.push(criu_check(criu));
    out.push(program_check(
        "iptables",
        true,
        &["-V"],
        "CRIU's network lock for TCP sockets; install with: apt-get install iptables",
    ));
    out.push(program_check(
        "runc",
        false,
        &["--version"],
        "needed only for OCI containers; install with: apt-get install runc",
    ));
    out.push(kdat_cache_check(roots));
    out.push(cgroup_check(roots));
    out.push(cpuidle_check(roots));
    out.push(rapl_check(roots));
    out
}

fn root_check() -> Check {
    let uid = unsafe_free_uid();
    if uid == 0 {
        Check::new("root", true, Status::Ok, "running as root")
    } else {
        Check::new(
            "root",
            true,
            Status::Missing,
            format!("running as uid {uid}: CRIU needs root"),
        )
    }
}

fn unsafe_free_uid() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

fn criu_version_check(criu: Option<&CriuBinary>) -> Check {
    let Some(criu) = criu else {
        return Check::new(
            "criu",
            true,
            Status::Missing,
            "CRIU not found: run the README's setup command, or set TORPOR_CRIU_PREFIX",
        );
    };
    let place = match &criu.prefix {
        Some(p) => format!("private prefix {}", p.display()),
        None => criu.criu.display().to_string(),
    };
    match criu.version() {
        Ok(v) => Check::new("criu", true, Status::Ok, format!("CRIU {v} ({place})")),
        Err(e) => Check::new("criu", true, Status::Missing, format!("{e} ({place})")),
    }
}

fn criu_check(criu: Option<&CriuBinary>) -> Check {
    let Some(criu) = criu else {
        return Check::new("criu check", true, Status::Missing, "no CRIU to check");
    };
    match criu.check() {
        Ok((true, _)) => Check::new("criu check", true, Status::Ok, "criu check: Looks good"),
        Ok((false, text)) => Check::new(
            "criu check",
            true,
            Status::Missing,
            format!("criu check failed: {}", text.lines().last().unwrap_or("")),
        ),
        Err(e) => Check::new("criu check", true, Status::Missing, e.to_string()),
    }
}

fn program_check(name: &'static str, required: bool, args: &[&str], why: &str) -> Check {
    match Command::new(name).args(args).stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => {
            let v = String::from_utf8_lossy(&out.stdout);
            Check::new(
                name,
                required,
                Status::Ok,
                v.lines().next().unwrap_or("").trim().to_string(),
            )
        }
        _ => Check::new(
            name,
            required,
            Status::Missing,
            format!("{name} not found: {why}"),
        ),
    }
}

/// CRIU caches its kernel probing in /run only when /run is a tmpfs, and a leftover
/// `criu.kdat.tmp` silently blocks the cache; each CRIU start then costs ~25 ms more.
fn kdat_cache_check(roots: &HostRoots) -> Check {
    let stale = roots.run.join("criu.kdat.tmp");
    if stale.exists() {
        return Check::new(
            "criu kdat cache",
            false,
            Status::Warn,
            format!(
                "stale {} blocks CRIU's kernel-probe cache: delete it",
                stale.display()
            ),
        );
    }
    let mounts = fs::read_to_string(roots.proc.join("mounts")).unwrap_or_default();
    // The mount table names real mount points, also when read from a fake tree.
    let run = "/run";
    let tmpfs = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == run && f[2] == "tmpfs"
    });
    if tmpfs {
        Check::new(
            "criu kdat cache",
            false,
            Status::Ok,
            format!("{run} is a tmpfs: CRIU keeps its kernel-probe cache"),
        )
    } else {
        Check::new(
            "criu kdat cache",
            false,
            Status::Warn,
            format!("{run} is not a tmpfs: CRIU re-probes the kernel at every start (~25 ms); mount a tmpfs on {run} to keep the cache"),
        )
    }
}

fn cgroup_check(roots: &HostRoots) -> Check {
    let mounts = fs::read_to_string(roots.proc.join("mounts")).unwrap_or_default();
    let mut v1 = Vec::new();
    let mut v2 = false;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        match f[2] {
            "cgroup2" => v2 = true,
            "cgroup" => {
                for c in ["cpuset", "freezer", "memory"] {
                    if f[3].split(',').any(|o| o == c) {
                        v1.push(c);
                    }
                }
            }
            _ => {}
        }
    }
    v1.sort_unstable();
    v1.dedup();
    let detail = format!(
        "cgroup v1 controllers: {}; cgroup v2 mounted: {}",
        if v1.is_empty() {
            "none".to_string()
        } else {
            v1.join(", ")
        },
        if v2 { "yes" } else { "no" }
    );
    let status = if v1.contains(&"cpuset") || v2 {
        Status::Ok
    } else {
        Status::Warn
    };
    Check::new("cgroups", false, status, detail)
}

fn cpuidle_check(roots: &HostRoots) -> Check {
    let base = roots.sys.join("devices/system/cpu");
    let driver = read_trim(&base.join("cpuidle/current_driver"));
    let states: Vec<String> = (0..16)
        .map_while(|i| {
            let p = base.join(format!("cpu0/cpuidle/state{i}/name"));
            p.exists().then(|| read_trim(&p).unwrap_or_default())
        })
        .collect();
    match driver {
        Some(d) if !states.is_empty() => Check::new(
            "cpuidle",
            false,
            Status::Ok,
            format!("driver {d}, states on cpu0: {}", states.join(", ")),
        ),
        _ => Check::new(
            "cpuidle",
            false,
            Status::Warn,
            "no cpuidle driver: C-state residency cannot be measured",
        ),
    }
}

fn rapl_check(roots: &HostRoots) -> Check {
    let p = roots.sys.join("class/powercap/intel-rapl:0/energy_uj");
    if p.exists() {
        Check::new(
            "rapl",
            false,
            Status::Ok,
            "RAPL energy counters present: energy is measured",
        )
    } else {
        Check::new(
            "rapl",
            false,
            Status::Warn,
            "no RAPL energy counters (typical in a VM): energy will be modelled from residency",
        )
    }
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_tree(mounts: &str) -> (tempfile::TempDir, HostRoots) {
        let t = tempfile::tempdir().unwrap();
        let roots = HostRoots {
            proc: t.path().join("proc"),
            sys: t.path().join("sys"),
            run: t.path().join("run"),
        };
        fs::create_dir_all(&roots.proc).unwrap();
        fs::create_dir_all(&roots.run).unwrap();
        fs::write(roots.proc.join("mounts"), mounts).unwrap();
        (t, roots)
    }

    #[test]
    fn stale_kdat_tmp_is_reported() {
        let (_t, roots) = fake_tree("tmpfs /run tmpfs rw 0 0\n");
        assert_eq!(kdat_cache_check(&roots).status, Status::Ok);
        fs::write(roots.run.join("criu.kdat.tmp"), "").unwrap();
        let c = kdat_cache_check(&roots);
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("delete it"));
    }

    #[test]
    fn non_tmpfs_run_is_a_warning() {
        let (_t, roots) = fake_tree("/dev/vda / ext4 rw 0 0\n");
        assert_eq!(kdat_cache_check(&roots).status, Status::Warn);
    }

    #[test]
    fn cgroups_cpuidle_rapl_from_a_fake_tree() {
        let (_t, roots) = fake_tree(
            "cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0\n\
             cgroup /sys/fs/cgroup/freezer cgroup rw,freezer 0 0\n\
             cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n",
        );
        let c = cgroup_check(&roots);
        assert_eq!(c.status, Status::Ok);
        assert!(c.detail.contains("cpuset, freezer"), "{}", c.detail);
        assert_eq!(cpuidle_check(&roots).status, Status::Warn);
        let cpu = roots.sys.join("devices/system/cpu");
        fs::create_dir_all(cpu.join("cpuidle")).unwrap();
        fs::write(cpu.join("cpuidle/current_driver"), "haltpoll\n").unwrap();
        for (i, n) in ["POLL", "haltpoll"].iter().enumerate() {
            let d = cpu.join(format!("cpu0/cpuidle/state{i}"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("name"), n).unwrap();
        }
        assert!(cpuidle_check(&roots).detail.contains("POLL, haltpoll"));
        assert_eq!(rapl_check(&roots).status, Status::Warn);
        let rapl = roots.sys.join("class/powercap/intel-rapl:0");
        fs::create_dir_all(&rapl).unwrap();
        fs::write(rapl.join("energy_uj"), "1").unwrap();
        assert_eq!(rapl_check(&roots).status, Status::Ok);
    }

    #[test]
    fn missing_criu_makes_the_host_unfit() {
        let checks = vec![criu_version_check(None), criu_check(None)];
        assert!(!fit(&checks));
        assert!(checks[0].detail.contains("setup"));
    }
}
