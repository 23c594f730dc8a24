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
    out.extend(capability_checks(&roots.proc));
    out.push(userfaultfd_check());
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

/// A capability CRIU uses, and what is lost without it.
struct Capability {
    /// The name `capsh` prints.
    name: &'static str,
    /// Its number: the bit in `CapEff`.
    bit: u32,
    /// Missing makes the host unfit (CRIU cannot checkpoint at all); otherwise a warning.
    required: bool,
    /// What works with it.
    uses: &'static str,
    /// What breaks without it.
    breaks: &'static str,
}

const CAP_SETPCAP: u32 = 8;

/// What torpor's CRIU uses. When torpor runs CRIU as a non-root service's uid
/// (`--unprivileged`), it keeps cap_checkpoint_restore, cap_sys_ptrace, cap_net_admin,
/// cap_sys_admin and cap_setpcap across the switch as ambient capabilities; the switch fails if
/// any of them is missing here.
const CAPABILITIES: [Capability; 6] = [
    Capability {
        name: "cap_sys_admin",
        bit: 21,
        required: true,
        uses: "namespaces, mounts, seccomp suspension",
        breaks: "CRIU needs it to create and enter namespaces (a service restored into its own \
                 PID namespace is cloned with CLONE_NEWPID; setns into a tree's namespaces), to \
                 mount, and to suspend the seccomp filters of the processes it works inside \
                 (PTRACE_O_SUSPEND_SECCOMP): checkpoints and restores fail",
    },
    Capability {
        name: "cap_checkpoint_restore",
        bit: 40,
        required: true,
        uses: "pids on restore, /proc/PID/map_files, exe links",
        breaks: "CRIU run as a service's uid (--unprivileged) gets it to restore processes with \
                 their own pids (clone3 set_tid), read /proc/PID/map_files and restore exe links; \
                 without it torpor cannot switch CRIU to a service's uid, so services with `user` \
                 set cannot be checkpointed or restored (root CRIU makes do with cap_sys_admin)",
    },
    Capability {
        name: "cap_sys_ptrace",
        bit: 19,
        required: true,
        uses: "attaching to the tree",
        breaks: "CRIU seizes every process of the tree with ptrace and reads its memory; without \
                 it the kernel allows that only for dumpable processes of CRIU's own uid holding \
                 no capability CRIU lacks, and only if Yama's ptrace_scope lets a non-parent \
                 attach: checkpoints fail",
    },
    Capability {
        name: "cap_sys_resource",
        bit: 24,
        required: false,
        uses: "prlimit across uids",
        breaks: "CRIU cannot prlimit a process whose uid differs from its own: a tree whose \
                 processes run as different users (a root master with www-data workers: \
                 nginx/apache with `user`) cannot be checkpointed here; single-uid trees still \
                 work (torpor runs CRIU as the service's uid with --unprivileged)",
    },
    Capability {
        name: "cap_net_admin",
        bit: 12,
        required: false,
        uses: "CRIU's network lock, TCP repair",
        breaks: "CRIU cannot lock established TCP connections (iptables/nftables rules) or \
                 restore them (TCP_REPAIR): a checkpoint that keeps connections (`torpor \
                 checkpoint` without --tcp-close, an OCI container with its own network \
                 namespace) fails for a tree holding one; and torpor cannot switch CRIU to a \
                 service's uid, so services with `user` set cannot be checkpointed; root \
                 services behind a gate (dumped with --tcp-close) still work",
    },
    Capability {
        name: "cap_setpcap",
        bit: CAP_SETPCAP,
        required: false,
        uses: "restoring capability bounding sets",
        breaks: "CRIU's restorer needs it to rebuild each restored process's capability \
                 bounding set (PR_CAPBSET_DROP: \"Unable to drop capability N\") and, run as \
                 root, to keep its capabilities while it gives a process another uid \
                 (SECURE_NO_SETUID_FIXUP): a process whose bounding set lacks a capability cannot \
                 be restored unless it runs with no_new_privs; and torpor cannot switch CRIU to \
                 a service's uid, so services with `user` set cannot be checkpointed",
    },
];

/// A capability set from a `Cap*:` line of `<proc>/self/status`.
fn cap_set(status: &str, field: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// One check per capability CRIU uses, from `CapEff` in `<proc>/self/status`: torpor starts
/// CRIU with this process's capabilities.
fn capability_checks(proc: &Path) -> Vec<Check> {
    let path = proc.join("self/status");
    let status = fs::read_to_string(&path).unwrap_or_default();
    let Some(eff) = cap_set(&status, "CapEff") else {
        return vec![Check::new(
            "capabilities",
            false,
            Status::Warn,
            format!(
                "cannot read CapEff from {}: which capabilities CRIU gets is unknown",
                path.display()
            ),
        )];
    };
    // Every process torpor starts inherits this bounding set, so when it is short of a
    // capability the kernel has, restoring any of them needs cap_setpcap.
    let last_cap = read_trim(&proc.join("sys/kernel/cap_last_cap"))
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(40)
        .min(63);
    let all = u64::MAX >> (63 - last_cap);
    let short_bounding = cap_set(&status, "CapBnd").map(|b| all & !b);
    CAPABILITIES
        .iter()
        .map(|c| {
            if eff & (1u64 << c.bit) != 0 {
                return Check::new(
                    c.name,
                    c.required,
                    Status::Ok,
                    format!("present ({})", c.uses),
                );
            }
            let mut detail = format!("missing (capability {}): {}", c.bit, c.breaks);
            let mut required = c.required;
            if c.bit == CAP_SETPCAP {
                if let Some(lacking) = short_bounding.filter(|&l| l != 0) {
                    let bits: Vec<String> = (0..=last_cap)
                        .filter(|b| lacking & (1u64 << b) != 0)
                        .map(|b| b.to_string())
                        .collect();
                    let plural = if bits.len() > 1 { "ies" } else { "y" };
                    detail.push_str(&format!(
                        "; here the bounding set lacks capabilit{plural} {}, and every process \
                         torpor starts inherits it: restores fail",
                        bits.join(", ")
                    ));
                    required = true;
                }
            }
            let status = if required {
                Status::Missing
            } else {
                Status::Warn
            };
            Check::new(c.name, required, status, detail)
        })
        .collect()
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

/// Lazy restore needs what `criu restore --lazy-pages` asks of the kernel: a userfaultfd
/// with fork, remap, remove and unmap events.
fn userfaultfd_check() -> Check {
    match torpor_lazy::uffd::RealUffd::open(torpor_lazy::uffd::CRIU_FEATURES) {
        Ok(_) => Check::new(
            "userfaultfd",
            false,
            Status::Ok,
            "userfaultfd with fork/remap/remove/unmap events: restore = \"lazy\" works",
        ),
        Err(e) => Check::new(
            "userfaultfd",
            false,
            Status::Warn,
            format!("userfaultfd unavailable ({e}): services with restore = \"lazy\" are restored eagerly"),
        ),
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
/// `criu.kdat.tmp` silently blocks that; without the cache each CRIU start costs ~25 ms more.
/// Where /run is not a tmpfs, `torpor up` and the benchmarks provide the cache themselves
/// (`torpor_criu::kdat`).
fn kdat_cache_check(roots: &HostRoots) -> Check {
    let mounts = fs::read_to_string(roots.proc.join("mounts")).unwrap_or_default();
    // The mount table names real mount points, also when read from a fake tree.
    let run = "/run";
    let tmpfs = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == run && f[2] == "tmpfs"
    });
    let name = "criu kdat cache";
    let stale = roots.run.join("criu.kdat.tmp");
    match (tmpfs, stale.exists()) {
        (true, true) => Check::new(
            name,
            false,
            Status::Warn,
            format!(
                "stale {} blocks CRIU's kernel-probe cache; torpor up removes it when it starts (or delete it)",
                stale.display()
            ),
        ),
        (true, false) => Check::new(
            name,
            false,
            Status::Ok,
            format!("{run} is a tmpfs: CRIU keeps its kernel-probe cache"),
        ),
        (false, _) => {
            let provided = mounts.lines().any(|l| {
                l.split_whitespace().nth(1) == Some("/run/criu.kdat")
            });
            Check::new(
                name,
                false,
                Status::Ok,
                if provided {
                    format!("{run} is not a tmpfs; torpor's copy of CRIU's kernel-probe cache (on /dev/shm) is mounted over /run/criu.kdat")
                } else {
                    format!("{run} is not a tmpfs, so CRIU cannot keep its kernel-probe cache (~25 ms per start); torpor up and torpor bench mount a copy on /dev/shm over /run/criu.kdat while they run")
                },
            )
        }
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
    fn non_tmpfs_run_says_torpor_provides_the_cache() {
        let (_t, roots) = fake_tree("/dev/vda / ext4 rw 0 0\n");
        let c = kdat_cache_check(&roots);
        assert_eq!(c.status, Status::Ok);
        assert!(c.detail.contains("while they run"), "{}", c.detail);
        let (_t, roots) = fake_tree("/dev/vda / ext4 rw 0 0\nshm /run/criu.kdat tmpfs rw 0 0\n");
        assert!(kdat_cache_check(&roots).detail.contains("is mounted over"));
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

    /// Bits of the capabilities the checks look at, all set.
    const ALL_CAPS: u64 = (1 << 8) | (1 << 12) | (1 << 19) | (1 << 21) | (1 << 24) | (1 << 40);

    fn fake_status(cap_eff: u64) -> (tempfile::TempDir, HostRoots) {
        let (t, roots) = fake_tree("");
        fs::create_dir_all(roots.proc.join("self")).unwrap();
        fs::write(
            roots.proc.join("self/status"),
            format!(
                "Name:\tdoctor\nUid:\t0\t0\t0\t0\nCapInh:\t0000000000000000\n\
                 CapPrm:\t{cap_eff:016x}\nCapEff:\t{cap_eff:016x}\nCapBnd:\t000001ffffffffff\n"
            ),
        )
        .unwrap();
        (t, roots)
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).expect(name)
    }

    #[test]
    fn every_capability_present_is_fit() {
        // A full root set, as `capsh --print` shows it on kernels with 41 capabilities.
        let (_t, roots) = fake_status(0x0000_01ff_ffff_ffff);
        let checks = capability_checks(&roots.proc);
        assert_eq!(checks.len(), 6);
        assert!(checks.iter().all(|c| c.status == Status::Ok), "{checks:?}");
        assert!(fit(&checks));
        let (_t, roots) = fake_status(ALL_CAPS);
        assert!(capability_checks(&roots.proc)
            .iter()
            .all(|c| c.status == Status::Ok));
    }

    #[test]
    fn missing_sys_resource_is_a_warning_that_says_what_breaks() {
        // This host's set: everything but cap_sys_resource.
        let (_t, roots) = fake_status(0x0000_01ff_feff_ffff);
        let checks = capability_checks(&roots.proc);
        let c = find(&checks, "cap_sys_resource");
        assert_eq!(c.status, Status::Warn);
        assert!(!c.required);
        assert!(
            c.detail
                .contains("cannot prlimit a process whose uid differs from its own"),
            "{}",
            c.detail
        );
        assert!(c.detail.contains("single-uid trees still work"));
        assert!(fit(&checks), "a warning does not make the host unfit");
        assert!(checks
            .iter()
            .filter(|c| c.name != "cap_sys_resource")
            .all(|c| c.status == Status::Ok));
    }

    #[test]
    fn missing_setpcap_is_unfit_only_with_a_short_bounding_set() {
        let (_t, roots) = fake_status(ALL_CAPS & !(1 << 8));
        let checks = capability_checks(&roots.proc);
        let c = find(&checks, "cap_setpcap");
        assert_eq!(
            c.status,
            Status::Warn,
            "full bounding set: root services restore"
        );
        assert!(c.detail.contains("PR_CAPBSET_DROP"), "{}", c.detail);
        assert!(fit(&checks));
        // This host's bounding set lacks cap_sys_resource: every restore drops it.
        let status = fs::read_to_string(roots.proc.join("self/status")).unwrap();
        let short = status.replace("CapBnd:\t000001ffffffffff", "CapBnd:\t000001fffeffffff");
        fs::write(roots.proc.join("self/status"), short).unwrap();
        let checks = capability_checks(&roots.proc);
        let c = find(&checks, "cap_setpcap");
        assert_eq!(c.status, Status::Missing);
        assert!(c.detail.contains("lacks capability 24,"), "{}", c.detail);
        assert!(!fit(&checks));
    }

    #[test]
    fn missing_sys_admin_makes_the_host_unfit() {
        let (_t, roots) = fake_status(ALL_CAPS & !(1 << 21));
        let checks = capability_checks(&roots.proc);
        let c = find(&checks, "cap_sys_admin");
        assert_eq!(c.status, Status::Missing);
        assert!(c.required);
        assert!(c.detail.contains("checkpoints and restores fail"));
        assert!(!fit(&checks));
        for (bit, name) in [(40, "cap_checkpoint_restore"), (19, "cap_sys_ptrace")] {
            let (_t, roots) = fake_status(ALL_CAPS & !(1 << bit));
            let checks = capability_checks(&roots.proc);
            assert_eq!(find(&checks, name).status, Status::Missing);
            assert!(!fit(&checks), "{name}");
        }
        let (_t, roots) = fake_status(ALL_CAPS & !(1 << 12));
        let checks = capability_checks(&roots.proc);
        assert_eq!(find(&checks, "cap_net_admin").status, Status::Warn);
        assert!(fit(&checks));
    }

    #[test]
    fn unreadable_status_is_a_warning() {
        let (_t, roots) = fake_tree("");
        let checks = capability_checks(&roots.proc);
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].status, Status::Warn);
        assert!(fit(&checks));
    }

    #[test]
    fn missing_criu_makes_the_host_unfit() {
        let checks = vec![criu_version_check(None), criu_check(None)];
        assert!(!fit(&checks));
        assert!(checks[0].detail.contains("setup"));
    }
}
