//! Host readiness checks for `torpor doctor`. Each check says in plain words what it found
//! and what to do about it; required checks that fail make the host unfit. File-system
//! facts are read under a [`HostRoots`] so tests can point them at a fake tree. The
//! [`systemd`] checks say whether torpor runs under systemd and whether a unit's options
//! would keep CRIU from working.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

use serde::Serialize;
use torpor_criu::CriuBinary;

/// Where the checks read the host's state: the telemetry's roots.
pub use torpor_power::HostRoots;

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
    out.push(steering_check());
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

/// Kernel steering needs an sk_lookup program, a SOCKMAP and a link to a network namespace
/// (CAP_BPF and CAP_NET_ADMIN, kernel 5.9 or later); probed in a namespace of its own.
fn steering_check() -> Check {
    match torpor_steer::probe() {
        Ok(()) => Check::new(
            "kernel steering",
            false,
            Status::Ok,
            "eBPF sk_lookup with a SOCKMAP: an awake service can be reached without the gate",
        ),
        Err(e) => Check::new(
            "kernel steering",
            false,
            Status::Warn,
            format!("eBPF sk_lookup unavailable ({e}): the gate proxies every service"),
        ),
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

pub mod systemd {
    //! The `systemd` checks: whether this process runs under systemd, and whether a unit's
    //! `[Service]` options (the unit file and its drop-ins) would keep CRIU from working,
    //! each verdict naming the option. Everything is read from text or from paths the caller
    //! gives, so tests use sample units and fake trees.

    use std::{
        collections::BTreeMap,
        fs,
        path::{Path, PathBuf},
    };

    use serde::Serialize;

    use super::{Check, Status};

    /// The unit looked for when this process is not in one and none is named.
    pub const UNIT_NAME: &str = "torpor.service";

    /// Where systemd reads system units from, most important first.
    pub const UNIT_DIRS: [&str; 3] = [
        "/etc/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
    ];

    /// What tells whether this process runs under systemd; [`Context::read`] fills it from
    /// the environment and `/proc`, tests build it by hand.
    #[derive(Debug, Clone, Default)]
    pub struct Context {
        /// `INVOCATION_ID`: systemd sets it for every process it starts for a unit.
        pub invocation_id: Option<String>,
        /// `NOTIFY_SOCKET`: set for a `Type=notify` unit.
        pub notify_socket: Option<String>,
        /// `/proc/1/comm`: whether the host runs systemd at all.
        pub pid1: Option<String>,
        /// The `.service` this process's cgroup is named after, when it is in one.
        pub unit: Option<String>,
    }

    impl Context {
        /// This process's context, `/proc` being at `proc`.
        pub fn read(proc: &Path) -> Context {
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            Context {
                invocation_id: env("INVOCATION_ID"),
                notify_socket: env("NOTIFY_SOCKET"),
                pid1: fs::read_to_string(proc.join("1/comm"))
                    .ok()
                    .map(|s| s.trim().to_string()),
                unit: fs::read_to_string(proc.join("self/cgroup"))
                    .ok()
                    .and_then(|t| unit_from_cgroup(&t)),
            }
        }

        /// Whether systemd started this process (as a unit's).
        pub fn under_systemd(&self) -> bool {
            self.invocation_id.is_some() || self.notify_socket.is_some()
        }
    }

    /// The service unit named by a `/proc/PID/cgroup` text (the v2 line, else systemd's
    /// own v1 hierarchy): `torpor.service` for `0::/system.slice/torpor.service`.
    fn unit_from_cgroup(text: &str) -> Option<String> {
        let path = |prefix: &str| {
            text.lines()
                .find_map(|l| l.split_once(':').and_then(|(_, r)| r.strip_prefix(prefix)))
        };
        let p = path(":").or_else(|| path("name=systemd:"))?;
        p.split('/')
            .rev()
            .find(|c| c.ends_with(".service"))
            .map(str::to_string)
    }

    /// One `[Service]` option that bears on torpor.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
    pub struct Finding {
        /// The option's name, as the unit spells it: what to change.
        pub key: String,
        /// Its value as the unit sets it (assignments that add up joined by spaces).
        pub value: String,
        /// Whether it keeps CRIU (or torpor) from working, rather than costing something.
        pub blocks: bool,
        /// What it breaks or costs, and why.
        pub why: String,
    }

    impl Finding {
        fn new(key: &str, value: String, blocks: bool, why: &str) -> Finding {
            Finding {
                key: key.into(),
                value,
                blocks,
                why: why.into(),
            }
        }
    }

    /// The `[Service]` assignments of a unit text (file and drop-ins concatenated), per key
    /// in order: an empty assignment clears those before it, as in systemd.
    pub fn service_options(text: &str) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut in_service = false;
        let mut pending = String::new();
        for raw in text.lines() {
            let line = raw.trim();
            if pending.is_empty() && (line.starts_with('#') || line.starts_with(';')) {
                continue;
            }
            // A trailing backslash continues the line.
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head.trim_end());
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let line = std::mem::take(&mut pending);
            let line = line.trim();
            if line.starts_with('[') {
                in_service = line == "[Service]";
                continue;
            }
            if !in_service {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let values = out.entry(k.trim().to_string()).or_default();
            match v.trim() {
                "" => values.clear(),
                v => values.push(v.to_string()),
            }
        }
        out
    }

    /// Whether a boolean-like value turns its option on (`yes`, but also `strict`,
    /// `read-only`, a list...).
    fn enabled(v: &str) -> bool {
        !matches!(
            v.to_ascii_lowercase().as_str(),
            "" | "no" | "false" | "off" | "0"
        )
    }

    /// Options that put a seccomp filter on torpor up, which every service inherits.
    const SECCOMP: &str = "installs a seccomp filter on torpor up, inherited by every service \
        it starts; CRIU, filtered itself, may not suspend a filtered task's seccomp \
        (PTRACE_O_SUSPEND_SECCOMP) nor read its filter to dump it: checkpoints fail \
        (\"suspending seccomp failed: Operation not permitted\")";

    /// Boolean options that install a seccomp filter when on, with what else they break.
    const SECCOMP_SWITCHES: [(&str, &str); 10] = [
        (
            "MemoryDenyWriteExecute",
            "; CRIU's restorer also maps memory it wrote as executable",
        ),
        (
            "RestrictNamespaces",
            "; it also forbids the PID namespaces services are restored into",
        ),
        ("RestrictRealtime", ""),
        ("RestrictSUIDSGID", ""),
        ("LockPersonality", ""),
        ("ProtectKernelModules", ""),
        ("ProtectKernelLogs", ""),
        ("ProtectClock", ""),
        ("ProtectHostname", ""),
        (
            "PrivateDevices",
            " (@raw-io); it also hides the host's devices from the services",
        ),
    ];

    /// Options that install a seccomp filter whenever set.
    const SECCOMP_LISTS: [&str; 4] = [
        "SystemCallFilter",
        "SystemCallArchitectures",
        "SystemCallLog",
        "RestrictAddressFamilies",
    ];

    /// Capabilities CRIU cannot work without, and those whose loss costs features.
    const NEEDED_CAPS: [&str; 3] = ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_CHECKPOINT_RESTORE"];
    const USEFUL_CAPS: [&str; 3] = ["CAP_NET_ADMIN", "CAP_SYS_RESOURCE", "CAP_SETPCAP"];

    /// The capabilities a `CapabilityBoundingSet=` sequence leaves (`None`: all of them).
    /// Allow-lists add up; a `~` list takes its capabilities away.
    fn bounding_set(assignments: &[String]) -> Option<Vec<String>> {
        let mut set: Option<Vec<String>> = None;
        for a in assignments {
            let (deny, list) = match a.strip_prefix('~') {
                Some(rest) => (true, rest),
                None => (false, a.as_str()),
            };
            let caps = list.split_whitespace().map(|c| c.to_ascii_uppercase());
            if deny {
                let denied: Vec<String> = caps.collect();
                match &mut set {
                    Some(s) => s.retain(|c| !denied.contains(c)),
                    None => {
                        set = Some(
                            NEEDED_CAPS
                                .iter()
                                .chain(&USEFUL_CAPS)
                                .map(|c| c.to_string())
                                .filter(|c| !denied.contains(c))
                                .collect(),
                        )
                    }
                }
            } else {
                set.get_or_insert_with(Vec::new).extend(caps);
            }
        }
        set
    }

    /// Every option of a unit text that keeps CRIU from working (`blocks`) or costs
    /// something under torpor; none for a unit CRIU works under unchanged.
    pub fn findings(text: &str) -> Vec<Finding> {
        let opts = service_options(text);
        let last = |k: &str| opts.get(k).and_then(|v| v.last()).map(String::as_str);
        let joined = |k: &str| opts.get(k).map(|v| v.join(" ")).unwrap_or_default();
        let mut out = Vec::new();
        for k in SECCOMP_LISTS {
            if !joined(k).is_empty() {
                out.push(Finding::new(k, joined(k), true, SECCOMP));
            }
        }
        for (k, more) in SECCOMP_SWITCHES {
            if let Some(v) = last(k).filter(|v| enabled(v)) {
                out.push(Finding::new(k, v.into(), true, &format!("{SECCOMP}{more}")));
            }
        }
        let blocking: [(&str, &str); 4] = [
            (
                "ProtectKernelTunables",
                "/proc/sys and /sys read-only: CRIU writes /proc/sys/kernel/ns_last_pid to \
                 restore pids (where clone3 set_tid is missing) and namespaces' sysctls",
            ),
            (
                "ProtectControlGroups",
                "/sys/fs/cgroup read-only: torpor cannot make each service's cgroup, nor CRIU \
                 move restored tasks into theirs",
            ),
            (
                "PrivateUsers",
                "a user namespace: torpor's capabilities hold only inside it, and CRIU needs \
                 them in the initial one",
            ),
            (
                "PrivateNetwork",
                "an empty network namespace: the gates cannot be reached, nor remote pools",
            ),
        ];
        for (k, why) in blocking {
            if let Some(v) = last(k).filter(|v| enabled(v)) {
                out.push(Finding::new(k, v.into(), true, why));
            }
        }
        if let Some(v) = last("ProcSubset").filter(|v| v.eq_ignore_ascii_case("pid")) {
            out.push(Finding::new(
                "ProcSubset",
                v.into(),
                true,
                "hides /proc/sys and the other /proc files CRIU reads (cap_last_cap, ns_last_pid)",
            ));
        }
        if let Some(v) = last("User").filter(|u| *u != "root" && *u != "0") {
            out.push(Finding::new(
                "User",
                v.into(),
                true,
                "torpor up must run as root: CRIU needs root's capabilities",
            ));
        }
        if let Some(v) = last("DynamicUser").filter(|v| enabled(v)) {
            out.push(Finding::new(
                "DynamicUser",
                v.into(),
                true,
                "runs torpor up as an unprivileged user: CRIU needs root's capabilities",
            ));
        }
        if let Some(kept) = bounding_set(opts.get("CapabilityBoundingSet").map_or(&[], |v| v)) {
            let lacking = |caps: &[&str]| -> Vec<String> {
                caps.iter()
                    .filter(|c| !kept.iter().any(|k| k == *c))
                    .map(|c| c.to_string())
                    .collect()
            };
            let value = joined("CapabilityBoundingSet");
            let needed = lacking(&NEEDED_CAPS);
            if !needed.is_empty() {
                out.push(Finding::new(
                    "CapabilityBoundingSet",
                    value.clone(),
                    true,
                    &format!(
                        "leaves out {}: CRIU cannot checkpoint or restore",
                        needed.join(", ")
                    ),
                ));
            }
            let useful = lacking(&USEFUL_CAPS);
            if !useful.is_empty() {
                out.push(Finding::new(
                    "CapabilityBoundingSet",
                    value,
                    false,
                    &format!(
                        "leaves out {}: no TCP repair, no multi-uid trees, and a process whose \
                         bounding set CRIU cannot rebuild is not restored (see the capability \
                         lines above)",
                        useful.join(", ")
                    ),
                ));
            }
        }
        if let Some(v) = last("NoNewPrivileges").filter(|v| enabled(v)) {
            out.push(Finding::new(
                "NoNewPrivileges",
                v.into(),
                false,
                "CRIU works, but every service inherits no_new_privs (setuid and file-capability \
                 programs stop working) and so does every process CRIU restores",
            ));
        }
        if let Some(v) = last("PrivateTmp").filter(|v| enabled(v)) {
            out.push(Finding::new(
                "PrivateTmp",
                v.into(),
                false,
                "each start gets a new empty /tmp: a service kept asleep across a restart that \
                 holds a file in /tmp cannot be restored",
            ));
        }
        if let Some(v) = last("ProtectSystem").filter(|v| v.eq_ignore_ascii_case("strict")) {
            out.push(Finding::new(
                "ProtectSystem",
                v.into(),
                false,
                "everything read-only but ReadWritePaths= (and the state and runtime \
                 directories): torpor writes /var/lib/torpor, /run/torpor, /run/criu.kdat and \
                 spill_dir, and the services write wherever they do",
            ));
        }
        let kill_mode = last("KillMode").unwrap_or("control-group");
        if kill_mode == "control-group" {
            out.push(Finding::new(
                "KillMode",
                kill_mode.into(),
                false,
                "at stop systemd signals the CRIU processes of torpor up's last checkpoints \
                 too, which then fail: use KillMode=mixed",
            ));
        }
        let kind = last("Type").unwrap_or("simple");
        if kind != "notify" {
            out.push(Finding::new(
                "Type",
                kind.into(),
                false,
                "systemd does not wait until every gate listens: use Type=notify",
            ));
        }
        out
    }

    /// A unit file followed by its drop-ins (`NAME.d/*.conf`, in name order), as systemd
    /// applies them.
    pub fn read_unit(path: &Path) -> std::io::Result<String> {
        let mut text = fs::read_to_string(path)?;
        let mut dropins = PathBuf::from(path).into_os_string();
        dropins.push(".d");
        if let Ok(entries) = fs::read_dir(&dropins) {
            let mut confs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "conf"))
                .collect();
            confs.sort();
            for c in confs {
                text.push('\n');
                text.push_str(&fs::read_to_string(&c)?);
            }
        }
        Ok(text)
    }

    /// The `systemd` check (whether this process runs under it) and, for the unit `unit`
    /// or else the one found in `dirs` (this process's own unit, or torpor.service), the
    /// `systemd unit` check. A blocking option makes the host unfit only when this process
    /// runs under systemd; otherwise it is a warning about what would happen.
    pub fn checks(ctx: &Context, unit: Option<&Path>, dirs: &[PathBuf]) -> Vec<Check> {
        let pid1 = ctx.pid1.as_deref().unwrap_or("unknown");
        let host = if pid1 == "systemd" {
            "PID 1 is systemd".to_string()
        } else {
            format!("PID 1 is {pid1}, not systemd")
        };
        let how = match (&ctx.unit, ctx.under_systemd()) {
            (Some(u), true) => format!("runs under systemd as {u}"),
            (None, true) => "runs under systemd".into(),
            (_, false) => "does not run under systemd (no INVOCATION_ID or NOTIFY_SOCKET)".into(),
        };
        let readiness = match (&ctx.notify_socket, ctx.under_systemd()) {
            (Some(_), _) => "; NOTIFY_SOCKET set: torpor up notifies READY=1 and STOPPING=1",
            (None, true) => "; no NOTIFY_SOCKET: the unit is not Type=notify",
            (None, false) => "",
        };
        let mut out = vec![Check::new(
            "systemd",
            false,
            if ctx.under_systemd() && ctx.notify_socket.is_none() {
                Status::Warn
            } else {
                Status::Ok
            },
            format!("this process {how}{readiness}; {host}"),
        )];
        let name = ctx.unit.as_deref().unwrap_or(UNIT_NAME);
        let path = match unit {
            Some(p) => Some(p.to_path_buf()),
            None => dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()),
        };
        let Some(path) = path else {
            if ctx.under_systemd() {
                out.push(Check::new(
                    "systemd unit",
                    false,
                    Status::Warn,
                    format!("cannot find {name} to check its options (pass --unit)"),
                ));
            }
            return out;
        };
        let text = match read_unit(&path) {
            Ok(t) => t,
            Err(e) => {
                out.push(Check::new(
                    "systemd unit",
                    false,
                    Status::Warn,
                    format!("cannot read {}: {e}", path.display()),
                ));
                return out;
            }
        };
        let found = findings(&text);
        let lines: Vec<String> = found
            .iter()
            .map(|f| {
                let verdict = if f.blocks { "blocks CRIU" } else { "costs" };
                format!("{}={} {verdict}: {}", f.key, f.value, f.why)
            })
            .collect();
        let blocks = found.iter().any(|f| f.blocks);
        let check = if found.is_empty() {
            Check::new(
                "systemd unit",
                false,
                Status::Ok,
                format!("{}: no option keeps CRIU from working", path.display()),
            )
        } else {
            let required = blocks && ctx.under_systemd();
            Check::new(
                "systemd unit",
                required,
                if required {
                    Status::Missing
                } else {
                    Status::Warn
                },
                format!("{}: {}", path.display(), lines.join("; ")),
            )
        };
        out.push(check);
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The unit shipped in the repository.
        const REPO_UNIT: &str = include_str!("../../../packaging/systemd/torpor.service");

        fn keys(text: &str) -> Vec<(String, bool)> {
            findings(text)
                .into_iter()
                .map(|f| (f.key, f.blocks))
                .collect()
        }

        #[test]
        fn the_repository_unit_passes_its_own_check() {
            assert_eq!(findings(REPO_UNIT), vec![]);
            let opts = service_options(REPO_UNIT);
            assert_eq!(opts["Type"], ["notify"]);
            assert_eq!(opts["KillMode"], ["mixed"]);
            assert_eq!(opts["ProtectSystem"], ["full"]);
        }

        #[test]
        fn each_seccomp_option_blocks_and_is_named() {
            for line in [
                "SystemCallFilter=@system-service",
                "SystemCallArchitectures=native",
                "SystemCallLog=@privileged",
                "RestrictAddressFamilies=AF_INET AF_UNIX",
                "MemoryDenyWriteExecute=yes",
                "RestrictNamespaces=yes",
                "RestrictNamespaces=~user",
                "RestrictRealtime=true",
                "RestrictSUIDSGID=yes",
                "LockPersonality=yes",
                "ProtectKernelModules=yes",
                "ProtectKernelLogs=yes",
                "ProtectClock=yes",
                "ProtectHostname=yes",
                "PrivateDevices=yes",
            ] {
                let text = format!("[Service]\nType=notify\nKillMode=mixed\n{line}\n");
                let f = findings(&text);
                assert_eq!(f.len(), 1, "{line}: {f:?}");
                let key = line.split('=').next().unwrap();
                assert_eq!(f[0].key, key);
                assert!(f[0].blocks, "{line}");
                assert!(f[0].why.contains("seccomp"), "{line}: {}", f[0].why);
            }
        }

        #[test]
        fn non_seccomp_blockers_and_costs() {
            let text = "[Service]\nType=notify\nKillMode=mixed\nProtectKernelTunables=yes\n\
                        ProtectControlGroups=yes\nProcSubset=pid\nPrivateUsers=yes\n\
                        PrivateNetwork=yes\nUser=torpor\nDynamicUser=yes\n\
                        NoNewPrivileges=yes\nPrivateTmp=yes\nProtectSystem=strict\n";
            let mut got = keys(text);
            got.sort();
            let mut want: Vec<(String, bool)> = [
                ("ProtectKernelTunables", true),
                ("ProtectControlGroups", true),
                ("ProcSubset", true),
                ("PrivateUsers", true),
                ("PrivateNetwork", true),
                ("User", true),
                ("DynamicUser", true),
                ("NoNewPrivileges", false),
                ("PrivateTmp", false),
                ("ProtectSystem", false),
            ]
            .iter()
            .map(|(k, b)| (k.to_string(), *b))
            .collect();
            want.sort();
            assert_eq!(got, want);
        }

        #[test]
        fn off_values_other_sections_and_comments_do_not_count() {
            let text = "[Unit]\nSystemCallFilter=@mount\n[Service]\nType=notify\nKillMode=mixed\n\
                        # SystemCallFilter=@system-service\n; PrivateDevices=yes\n\
                        NoNewPrivileges=no\nProtectKernelTunables=false\nUser=root\n\
                        ProtectSystem=full\nRestrictNamespaces=no\n[Install]\nPrivateTmp=yes\n";
            assert_eq!(findings(text), vec![]);
        }

        #[test]
        fn the_defaults_of_kill_mode_and_type_cost() {
            let got = keys("[Service]\nExecStart=/usr/local/bin/torpor up\n");
            assert_eq!(
                got,
                vec![("KillMode".to_string(), false), ("Type".to_string(), false)]
            );
        }

        #[test]
        fn an_empty_assignment_resets_and_the_last_one_wins() {
            let text = "[Service]\nType=notify\nKillMode=mixed\nSystemCallFilter=@system-service\n\
                        SystemCallFilter=\nPrivateDevices=yes\nPrivateDevices=no\n";
            assert_eq!(findings(text), vec![]);
            let text = "[Service]\nType=notify\nKillMode=mixed\nSystemCallFilter=@system-service \\\n  @mount\n";
            let f = findings(text);
            assert_eq!(f.len(), 1);
            assert_eq!(f[0].value, "@system-service @mount");
        }

        #[test]
        fn capability_bounding_sets() {
            let base = "[Service]\nType=notify\nKillMode=mixed\n";
            let all = "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SYS_PTRACE CAP_CHECKPOINT_RESTORE \
                       CAP_NET_ADMIN CAP_SYS_RESOURCE CAP_SETPCAP CAP_KILL\n";
            assert_eq!(findings(&format!("{base}{all}")), vec![]);
            let f = findings(&format!(
                "{base}CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"
            ));
            assert_eq!(f.len(), 2, "{f:?}");
            assert!(
                f[0].blocks
                    && f[0]
                        .why
                        .contains("CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_CHECKPOINT_RESTORE")
            );
            assert!(!f[1].blocks && f[1].why.contains("CAP_NET_ADMIN"));
            let f = findings(&format!(
                "{base}CapabilityBoundingSet=~CAP_SYS_PTRACE CAP_SYS_MODULE\n"
            ));
            assert_eq!(f.len(), 1, "{f:?}");
            assert!(
                f[0].blocks && f[0].why.contains("leaves out CAP_SYS_PTRACE:"),
                "{}",
                f[0].why
            );
            let f = findings(&format!("{base}CapabilityBoundingSet=~CAP_NET_ADMIN\n"));
            assert_eq!(f.len(), 1);
            assert!(!f[0].blocks);
            // Allow-lists add up.
            let f = findings(&format!(
                "{base}CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SYS_PTRACE\n\
                 CapabilityBoundingSet=CAP_CHECKPOINT_RESTORE CAP_NET_ADMIN CAP_SYS_RESOURCE CAP_SETPCAP\n"
            ));
            assert_eq!(f, vec![]);
        }

        #[test]
        fn the_unit_is_found_with_its_drop_ins() {
            let t = tempfile::tempdir().unwrap();
            let dir = t.path().join("system");
            fs::create_dir_all(dir.join("torpor.service.d")).unwrap();
            fs::write(dir.join("torpor.service"), REPO_UNIT).unwrap();
            fs::write(
                dir.join("torpor.service.d/hardening.conf"),
                "[Service]\nSystemCallFilter=@system-service\n",
            )
            .unwrap();
            fs::write(
                dir.join("torpor.service.d/ignored.txt"),
                "[Service]\nUser=nobody\n",
            )
            .unwrap();
            let outside = Context {
                pid1: Some("init".into()),
                ..Context::default()
            };
            let checks = checks(&outside, None, &[t.path().join("absent"), dir.clone()]);
            assert_eq!(checks.len(), 2);
            assert_eq!(checks[0].name, "systemd");
            assert!(
                checks[0].detail.contains("does not run under systemd"),
                "{}",
                checks[0].detail
            );
            assert!(checks[0].detail.contains("PID 1 is init, not systemd"));
            let unit = &checks[1];
            assert_eq!(
                unit.status,
                Status::Warn,
                "not under systemd: what would happen"
            );
            assert!(!unit.required);
            assert!(
                unit.detail
                    .contains("SystemCallFilter=@system-service blocks CRIU"),
                "{}",
                unit.detail
            );
            assert!(!unit.detail.contains("User="));
            // Run by that unit, the same option makes the host unfit.
            let inside = Context {
                invocation_id: Some("0123".into()),
                notify_socket: Some("/run/systemd/notify".into()),
                pid1: Some("systemd".into()),
                unit: Some("torpor.service".into()),
            };
            let checks = checks_at(&inside, &dir);
            assert!(
                checks[0]
                    .detail
                    .contains("runs under systemd as torpor.service"),
                "{}",
                checks[0].detail
            );
            assert!(checks[0].detail.contains("READY=1"));
            assert_eq!(checks[1].status, Status::Missing);
            assert!(!crate::fit(&checks));
            fs::remove_file(dir.join("torpor.service.d/hardening.conf")).unwrap();
            let checks = checks_at(&inside, &dir);
            assert_eq!(checks[1].status, Status::Ok, "{}", checks[1].detail);
            assert!(crate::fit(&checks));
        }

        fn checks_at(ctx: &Context, dir: &Path) -> Vec<Check> {
            checks(ctx, None, &[dir.to_path_buf()])
        }

        #[test]
        fn a_named_unit_wins_and_a_missing_one_is_said() {
            let t = tempfile::tempdir().unwrap();
            let named = t.path().join("mine.service");
            fs::write(
                &named,
                "[Service]\nType=notify\nKillMode=mixed\nPrivateDevices=yes\n",
            )
            .unwrap();
            let c = checks(&Context::default(), Some(&named), &[]);
            assert!(
                c[1].detail.contains("PrivateDevices=yes blocks CRIU"),
                "{}",
                c[1].detail
            );
            let c = checks(
                &Context::default(),
                Some(&t.path().join("absent.service")),
                &[],
            );
            assert_eq!(c[1].status, Status::Warn);
            assert!(c[1].detail.starts_with("cannot read"), "{}", c[1].detail);
            // Not under systemd and nothing found: only the systemd line.
            assert_eq!(
                checks(&Context::default(), None, &[t.path().into()]).len(),
                1
            );
            let under = Context {
                invocation_id: Some("1".into()),
                ..Context::default()
            };
            let c = checks(&under, None, &[t.path().into()]);
            assert_eq!(
                c[0].status,
                Status::Warn,
                "under systemd without NOTIFY_SOCKET"
            );
            assert!(c[1].detail.contains("cannot find torpor.service"));
        }

        #[test]
        fn the_unit_comes_from_the_cgroup() {
            assert_eq!(
                unit_from_cgroup("0::/system.slice/torpor.service\n").as_deref(),
                Some("torpor.service")
            );
            assert_eq!(
                unit_from_cgroup("1:name=systemd:/system.slice/torpor.service\n2:cpu:/\n")
                    .as_deref(),
                Some("torpor.service")
            );
            assert_eq!(unit_from_cgroup("0::/\n"), None);
            assert_eq!(unit_from_cgroup("0::/user.slice/session-3.scope\n"), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_tree(mounts: &str) -> (tempfile::TempDir, HostRoots) {
        let t = tempfile::tempdir().unwrap();
        let roots = HostRoots::under(t.path());
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
