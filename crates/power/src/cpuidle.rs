//! Per-CPU counters: cpuidle state residency and entries from sysfs, busy and idle time from
//! `/proc/stat`. Both trees are under roots the caller gives.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    cpulist,
    sysfs::{read_attr, read_number},
    TelemetryError,
};

/// Where the host's state is read: `/sys`, `/proc` and `/run`, or a fake copy in tests. The
/// telemetry and `torpor doctor` read through the same roots.
#[derive(Debug, Clone)]
pub struct HostRoots {
    /// Normally `/sys`.
    pub sys: PathBuf,
    /// Normally `/proc`.
    pub proc: PathBuf,
    /// Normally `/run`, where CRIU keeps its kernel-probe cache.
    pub run: PathBuf,
}

impl Default for HostRoots {
    fn default() -> Self {
        HostRoots::under(Path::new("/"))
    }
}

impl HostRoots {
    /// The trees under `root` (`root/sys`, `root/proc`, `root/run`): a fake host in tests.
    pub fn under(root: &Path) -> HostRoots {
        HostRoots {
            sys: root.join("sys"),
            proc: root.join("proc"),
            run: root.join("run"),
        }
    }

    pub fn cpu_dir(&self) -> PathBuf {
        self.sys.join("devices/system/cpu")
    }
}

/// One cpuidle state's counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateCounters {
    pub name: String,
    pub exit_latency_us: u64,
    pub target_residency_us: u64,
    /// Total time in the state since boot.
    pub time_us: u64,
    /// Entries since boot.
    pub usage: u64,
    pub disabled: bool,
}

/// One CPU's counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuCounters {
    pub cpu: usize,
    /// `/proc/stat` ticks (USER_HZ) not idle: user, nice, system, irq, softirq, steal.
    pub busy_ticks: u64,
    /// idle + iowait ticks.
    pub idle_ticks: u64,
    pub states: Vec<StateCounters>,
}

/// The online CPUs.
pub fn online_cpus(roots: &HostRoots) -> Result<BTreeSet<usize>, TelemetryError> {
    let path = roots.cpu_dir().join("online");
    cpulist::parse(&read_attr(&path)?).map_err(|e| TelemetryError::Malformed(path, e))
}

/// The cpuidle states of `cpu`, in index order (empty when the CPU has no cpuidle driver).
pub fn read_states(roots: &HostRoots, cpu: usize) -> Result<Vec<StateCounters>, TelemetryError> {
    let dir = roots.cpu_dir().join(format!("cpu{cpu}/cpuidle"));
    let mut states = Vec::new();
    for index in 0.. {
        let s = dir.join(format!("state{index}"));
        if !s.is_dir() {
            break;
        }
        states.push(StateCounters {
            name: read_attr(&s.join("name"))?,
            exit_latency_us: read_number(&s.join("latency"))?,
            target_residency_us: read_number(&s.join("residency"))?,
            time_us: read_number(&s.join("time"))?,
            usage: read_number(&s.join("usage"))?,
            disabled: read_number(&s.join("disable")).unwrap_or(0) != 0,
        });
    }
    Ok(states)
}

/// Busy and idle ticks per CPU from `/proc/stat`.
pub fn read_proc_stat(roots: &HostRoots) -> Result<Vec<(usize, u64, u64)>, TelemetryError> {
    let path = roots.proc.join("stat");
    let text = std::fs::read_to_string(&path).map_err(|e| TelemetryError::Read(path.clone(), e))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(cpu) = fields.next().and_then(|f| f.strip_prefix("cpu")) else {
            continue;
        };
        let Ok(cpu) = cpu.parse::<usize>() else {
            continue; // the "cpu" total line
        };
        let v: Vec<u64> = fields
            .map(|f| f.parse())
            .collect::<Result<_, _>>()
            .map_err(|_| TelemetryError::Malformed(path.clone(), format!("line {line:?}")))?;
        if v.len() < 5 {
            return Err(TelemetryError::Malformed(
                path,
                format!("short line {line:?}"),
            ));
        }
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
        out.push((cpu, busy, at(3) + at(4)));
    }
    Ok(out)
}

/// Counters of every online CPU.
pub fn read_cpus(roots: &HostRoots) -> Result<Vec<CpuCounters>, TelemetryError> {
    let online = online_cpus(roots)?;
    let stat = read_proc_stat(roots)?;
    online
        .into_iter()
        .map(|cpu| {
            let (busy_ticks, idle_ticks) = stat
                .iter()
                .find(|(c, _, _)| *c == cpu)
                .map(|(_, b, i)| (*b, *i))
                .ok_or_else(|| {
                    TelemetryError::Malformed(
                        roots.proc.join("stat"),
                        format!("no line for online cpu{cpu}"),
                    )
                })?;
            Ok(CpuCounters {
                cpu,
                busy_ticks,
                idle_ticks,
                states: read_states(roots, cpu)?,
            })
        })
        .collect()
}
