//! The power knobs the agent turns, each reversible and each with a dry run that only logs:
//! idle states disabled on cores left idle (so they go straight to the deepest state), CPUs taken
//! offline, cpusets that consolidate awake services onto few cores, a PM QoS latency request, and
//! node sleep hooks. Every change goes into the journal before it is made, so `undo_all` (or
//! the next start, after a crash) puts everything back. All paths are under [`KnobRoots`].
//!
//! A journal entry is undone as root, so it is trusted no further than the knobs go: before an
//! entry is undone its paths are resolved (`..` and symlinks) and checked against what the
//! knobs write under the roots (a CPU's `online`, an idle state's `disable`, torpor's own
//! cgroups, the cpuset controller in the `subtree_control` of the root cgroup and of the
//! services' directory); anything else is refused, logged and dropped. The node wake hook
//! that runs is the configured one, never the journal's.

pub mod journal;
mod plan;

pub use journal::{Change, Journal, JournalError};
pub use plan::{consolidate, CorePlan};

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
};

use thiserror::Error;
use tracing::{info, warn};

/// Where the knobs live: `/sys`, the cgroup mount, `/dev/cpu_dma_latency`, `/proc` (to find
/// our own cgroup); a fake tree in tests.
#[derive(Debug, Clone)]
pub struct KnobRoots {
    pub sys: PathBuf,
    pub cgroup: PathBuf,
    pub cpu_dma_latency: PathBuf,
    pub proc: PathBuf,
}

impl Default for KnobRoots {
    fn default() -> Self {
        KnobRoots {
            sys: "/sys".into(),
            cgroup: "/sys/fs/cgroup".into(),
            cpu_dma_latency: "/dev/cpu_dma_latency".into(),
            proc: "/proc".into(),
        }
    }
}

impl KnobRoots {
    pub fn under(root: &Path) -> KnobRoots {
        KnobRoots {
            sys: root.join("sys"),
            cgroup: root.join("cgroup"),
            cpu_dma_latency: root.join("dev/cpu_dma_latency"),
            proc: root.join("proc"),
        }
    }

    fn cpu(&self, cpu: usize) -> PathBuf {
        self.sys.join(format!("devices/system/cpu/cpu{cpu}"))
    }
}

/// Why a knob could not be turned or put back.
#[derive(Debug, Error)]
pub enum KnobError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("knob journal")]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Refused(String),
    #[error("hook {command:?}: {problem}")]
    Hook { command: String, problem: String },
    #[error("journal entry {change} is outside the knob roots ({problem}); not undone")]
    OutsideRoots { change: String, problem: String },
}

fn read(path: &Path) -> Result<String, KnobError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| KnobError::Read(path.into(), e))
}

/// Which cgroup hierarchy holds cpusets.
#[derive(Debug, Clone)]
enum Cpusets {
    /// Unified hierarchy: the cpuset controller is enabled down to our cgroups.
    V2 { root: PathBuf },
    /// Legacy cpuset hierarchy: a new cgroup needs `cpuset.mems` too.
    V1 { root: PathBuf },
}

/// The node's knobs and the journal of what was changed.
#[derive(Debug)]
pub struct Knobs {
    roots: KnobRoots,
    dry_run: bool,
    journal: Journal,
    /// The open `/dev/cpu_dma_latency`: the kernel keeps the request while it is open (and drops
    /// it when we exit, crash included, so it needs no journal).
    pm_qos: Option<std::fs::File>,
    /// The configured node wake hook: what undoes a node sleep, whatever the journal says.
    wake_hook: Option<Vec<String>>,
}

/// Name of the cgroup under which torpor puts services.
const CGROUP: &str = "torpor";

/// The directory under a hierarchy's root that holds one cgroup per service (the agent makes
/// them); on the unified hierarchy consolidation limits those where they are.
pub const SERVICES_CGROUP: &str = "torpor-services";

impl Knobs {
    /// Opens the journal and first undoes whatever a previous run left in it. `wake_hook` is
    /// the configured node wake hook (the only command a leftover node sleep runs). Returns
    /// what was undone, for the log; entries outside the roots are logged and dropped.
    pub fn open(
        roots: KnobRoots,
        journal: &Path,
        dry_run: bool,
        wake_hook: Option<&[String]>,
    ) -> Result<(Knobs, Vec<String>), KnobError> {
        let (journal, leftover) = Journal::open(journal)?;
        let mut knobs = Knobs {
            roots,
            dry_run,
            journal,
            pm_qos: None,
            wake_hook: wake_hook.map(<[String]>::to_vec),
        };
        let mut undone = Vec::new();
        for change in leftover {
            // A leftover is a real change from a real run, so it is undone even in a dry run.
            match knobs.undo_change(&change, false) {
                Ok(()) => undone.push(describe(&change)),
                Err(KnobError::OutsideRoots { .. }) => {} // logged and dropped by undo_change
                Err(e) => return Err(e),
            }
        }
        if !undone.is_empty() {
            warn!(
                changes = undone.len(),
                "undid knob changes a previous run left behind"
            );
        }
        Ok((knobs, undone))
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    pub fn roots(&self) -> &KnobRoots {
        &self.roots
    }

    /// Changes in force now, oldest first.
    pub fn changes(&self) -> &[Change] {
        self.journal.changes()
    }

    /// Writes `value` to an attribute, journaling its first original value.
    fn set(&mut self, path: &Path, value: &str) -> Result<(), KnobError> {
        if self.dry_run {
            info!(path = %path.display(), value, "dry run: would write");
            return Ok(());
        }
        let journaled = self
            .journal
            .changes()
            .iter()
            .any(|c| matches!(c, Change::File { path: p, .. } if p == path));
        if !journaled {
            let original = read(path)?;
            if original == value {
                return Ok(());
            }
            self.journal.push(Change::File {
                path: path.into(),
                original,
            })?;
        }
        write_attr(path, value)
    }

    /// Writes back the original of `path`, if torpor changed it.
    fn restore(&mut self, path: &Path) -> Result<(), KnobError> {
        let found = self
            .journal
            .changes()
            .iter()
            .rev()
            .find(|c| matches!(c, Change::File { path: p, .. } if p == path))
            .cloned();
        match found {
            Some(change) => self.undo_change(&change, self.dry_run),
            None => Ok(()),
        }
    }

    fn undo_change(&mut self, change: &Change, dry_run: bool) -> Result<(), KnobError> {
        if dry_run {
            info!(change = %describe(change), "dry run: would undo");
            return Ok(());
        }
        if let Err(problem) = self.check(change) {
            warn!(change = %describe(change), problem, "refused a knob journal entry outside the knob roots");
            self.journal.remove(change)?;
            return Err(KnobError::OutsideRoots {
                change: describe(change),
                problem,
            });
        }
        match change {
            Change::File { path, original } => write_attr(path, original)?,
            Change::CreatedCgroup { path, parent_procs } => remove_cgroup(path, parent_procs)?,
            // A cgroup removed since has taken its controllers with it.
            Change::Controller {
                subtree_control,
                controller,
            } if subtree_control.parent().is_some_and(Path::is_dir) => {
                write_attr(subtree_control, &format!("-{controller}"))?
            }
            Change::Controller { .. } => {}
            Change::NodeAsleep { wake_command } => match &self.wake_hook {
                Some(hook) => {
                    if hook != wake_command {
                        info!(journal = ?wake_command, configured = ?hook, "the journal's wake hook differs from the configured one; running the configured one");
                    }
                    run_hook(hook)?
                }
                None => {
                    warn!("the node was put to sleep but no wake hook is configured now; none run")
                }
            },
        }
        self.journal.remove(change)?;
        Ok(())
    }

    /// Whether `change` stays within what the knobs write under the roots, its paths resolved
    /// (`..`, symlinks) first; the problem otherwise.
    fn check(&self, change: &Change) -> Result<(), String> {
        let cpus = self.roots.sys.join("devices/system/cpu");
        match change {
            Change::File { path, .. } => {
                let rel = within(path, &cpus)?;
                let parts: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
                let numbered =
                    |s: &str, prefix: &str| s.strip_prefix(prefix).is_some_and(is_number);
                match parts[..] {
                    [cpu, "online"] if numbered(cpu, "cpu") => Ok(()),
                    [cpu, "cpuidle", state, "disable"]
                        if numbered(cpu, "cpu") && numbered(state, "state") =>
                    {
                        Ok(())
                    }
                    _ => Err(format!(
                        "{} is not a CPU's online or an idle state's disable",
                        path.display()
                    )),
                }
            }
            Change::CreatedCgroup { path, parent_procs } => {
                let hierarchy = self.cgroup_hierarchy(path)?;
                let rel = within(path, &hierarchy)?;
                let parts: Vec<_> = rel.iter().collect();
                if parts.first().map(|p| p.to_str()) != Some(Some(CGROUP)) || parts.len() > 2 {
                    return Err(format!("{} is not one of torpor's cgroups", path.display()));
                }
                let procs = within(parent_procs, &hierarchy)?;
                if procs.file_name().and_then(|n| n.to_str()) != Some("cgroup.procs") {
                    return Err(format!("{} is not a cgroup.procs", parent_procs.display()));
                }
                Ok(())
            }
            Change::Controller {
                subtree_control,
                controller,
            } => {
                let rel = within(subtree_control, &self.roots.cgroup)?;
                let services = Path::new(SERVICES_CGROUP).join("cgroup.subtree_control");
                if (rel != Path::new("cgroup.subtree_control") && rel != services)
                    || controller != "cpuset"
                {
                    return Err(format!(
                        "+{controller} in {} is not the cpuset controller of the root cgroup or of the services' directory",
                        subtree_control.display()
                    ));
                }
                Ok(())
            }
            Change::NodeAsleep { .. } => Ok(()),
        }
    }

    /// The cgroup hierarchy (unified, or the legacy cpuset one) `path` lies in.
    fn cgroup_hierarchy(&self, path: &Path) -> Result<PathBuf, String> {
        let v1 = self.roots.cgroup.join("cpuset");
        match within(path, &v1) {
            Ok(_) => Ok(v1),
            Err(_) => within(path, &self.roots.cgroup).map(|_| self.roots.cgroup.clone()),
        }
    }

    /// Puts back every change, newest first; keeps going past failures and reports the first.
    pub fn undo_all(&mut self) -> Result<usize, KnobError> {
        self.release_latency();
        let changes: Vec<Change> = self.journal.changes().iter().rev().cloned().collect();
        let mut first_error = None;
        for change in &changes {
            if let Err(e) = self.undo_change(change, false) {
                warn!(change = %describe(change), error = %e, "could not undo a knob change");
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(changes.len()),
        }
    }

    // ---- idle states ----

    /// Leaves `cpu` only its deepest enabled idle state, so an idle core does not linger in
    /// shallow ones (the menu governor picks shallow states when it expects a wake-up soon).
    pub fn deep_idle_only(&mut self, cpu: usize) -> Result<(), KnobError> {
        let states = self.idle_state_dirs(cpu)?;
        let Some(deepest) = states
            .iter()
            .rposition(|d| read(&d.join("disable")).map(|v| v == "0").unwrap_or(false))
        else {
            return Ok(());
        };
        for dir in &states[..deepest] {
            self.set(&dir.join("disable"), "1")?;
        }
        Ok(())
    }

    /// Gives `cpu` its idle states back as they were.
    pub fn restore_idle_states(&mut self, cpu: usize) -> Result<(), KnobError> {
        for dir in self.idle_state_dirs(cpu)? {
            self.restore(&dir.join("disable"))?;
        }
        Ok(())
    }

    fn idle_state_dirs(&self, cpu: usize) -> Result<Vec<PathBuf>, KnobError> {
        let base = self.roots.cpu(cpu).join("cpuidle");
        Ok((0..)
            .map(|i| base.join(format!("state{i}")))
            .take_while(|d| d.is_dir())
            .collect())
    }

    // ---- CPU offline ----

    /// Takes `cpu` offline. CPU 0 (often not removable) and the last online CPU are refused.
    pub fn take_offline(&mut self, cpu: usize) -> Result<(), KnobError> {
        if cpu == 0 {
            return Err(KnobError::Refused("cpu0 stays online".into()));
        }
        let online = self.roots.sys.join("devices/system/cpu/online");
        let cpus = crate::cpulist::parse(&read(&online)?).map_err(KnobError::Refused)?;
        if cpus.len() <= 1 || !cpus.contains(&cpu) {
            return Ok(());
        }
        self.set(&self.roots.cpu(cpu).join("online"), "0")
    }

    /// Brings `cpu` back online if torpor took it offline.
    pub fn bring_online(&mut self, cpu: usize) -> Result<(), KnobError> {
        self.restore(&self.roots.cpu(cpu).join("online"))
    }

    // ---- cpusets ----

    fn cpusets(&self) -> Cpusets {
        if self.roots.cgroup.join("cgroup.controllers").exists() {
            Cpusets::V2 {
                root: self.roots.cgroup.clone(),
            }
        } else {
            Cpusets::V1 {
                root: self.roots.cgroup.join("cpuset"),
            }
        }
    }

    /// Where processes go back to when torpor's cgroups are removed: the cgroup torpor itself
    /// runs in (from /proc/self/cgroup), else the hierarchy's root.
    fn home_procs(&self, root: &Path, v2: bool) -> PathBuf {
        let own = std::fs::read_to_string(self.roots.proc.join("self/cgroup")).unwrap_or_default();
        let rel = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let ours = if v2 {
                controllers.is_empty()
            } else {
                controllers.split(',').any(|c| c == "cpuset")
            };
            ours.then(|| path.trim_start_matches('/').to_string())
        });
        let dir = match rel {
            Some(rel) if !rel.is_empty() && root.join(&rel).is_dir() => root.join(rel),
            _ => root.to_path_buf(),
        };
        dir.join("cgroup.procs")
    }

    fn make_cgroup(&mut self, path: &Path, parent_procs: PathBuf) -> Result<(), KnobError> {
        if path.is_dir() {
            return Ok(());
        }
        if self.dry_run {
            info!(path = %path.display(), "dry run: would create cgroup");
            return Ok(());
        }
        self.journal.push(Change::CreatedCgroup {
            path: path.into(),
            parent_procs,
        })?;
        std::fs::create_dir(path).map_err(|e| KnobError::Write(path.into(), e))
    }

    /// The cgroup of `group` (a service) limited to `cpus`; created with its parent on first
    /// use. Returns its directory.
    pub fn cpuset(&mut self, group: &str, cpus: &BTreeSet<usize>) -> Result<PathBuf, KnobError> {
        if cpus.is_empty() {
            return Err(KnobError::Refused(format!(
                "cpuset for {group} would have no CPU"
            )));
        }
        let list = crate::cpulist::format(cpus);
        let (root, v2) = match self.cpusets() {
            Cpusets::V2 { root } => (root, true),
            Cpusets::V1 { root } => (root, false),
        };
        let home = self.home_procs(&root, v2);
        let base = root.join(CGROUP);
        let dir = base.join(group);
        if v2 {
            self.enable_cpuset_below(&root)?;
            self.make_cgroup(&base, home.clone())?;
            self.write_own(&base.join("cgroup.subtree_control"), "+cpuset")?;
            self.make_cgroup(&dir, home)?;
        } else {
            let mems = read(&root.join("cpuset.mems")).unwrap_or_else(|_| "0".into());
            let all = read(&root.join("cpuset.cpus")).unwrap_or_else(|_| list.clone());
            self.make_cgroup(&base, home.clone())?;
            self.write_own(&base.join("cpuset.cpus"), &all)?;
            self.write_own(&base.join("cpuset.mems"), &mems)?;
            self.make_cgroup(&dir, home)?;
            self.write_own(&dir.join("cpuset.mems"), &mems)?;
        }
        self.write_own(&dir.join("cpuset.cpus"), &list)?;
        Ok(dir)
    }

    /// Whether the cpusets are on the unified hierarchy, where a service's own cgroup is
    /// limited in place ([`Knobs::cpuset_in_place`]) rather than its processes moved: moving
    /// them would take them out of the cgroup that freezes, kills and accounts for them.
    pub fn cpusets_unified(&self) -> bool {
        matches!(self.cpusets(), Cpusets::V2 { .. })
    }

    /// The unified hierarchy's root, resolved, when it holds the cpusets and `cgroup` is an
    /// existing service cgroup in its services' directory.
    fn unified_root_above(&self, cgroup: &Path) -> Option<PathBuf> {
        let Cpusets::V2 { root } = self.cpusets() else {
            return None;
        };
        let rel = within(cgroup, &root).ok()?;
        let parent = rel.parent()?;
        (cgroup.is_dir() && parent == Path::new(SERVICES_CGROUP))
            .then(|| root.canonicalize().ok())?
    }

    /// Limits `cgroup`, a service's own cgroup on the unified hierarchy, to `cpus`, with the
    /// cpuset controller enabled in the root and the services' directory (journaled). Its
    /// processes stay in it, so freezing, killing and CPU accounting by that cgroup go on
    /// working; disabling the controller again at the undo lifts the limit with it.
    pub fn cpuset_in_place(
        &mut self,
        cgroup: &Path,
        cpus: &BTreeSet<usize>,
    ) -> Result<(), KnobError> {
        if cpus.is_empty() {
            return Err(KnobError::Refused(format!(
                "cpuset for {} would have no CPU",
                cgroup.display()
            )));
        }
        let root = self.unified_root_above(cgroup).ok_or_else(|| {
            KnobError::Refused(format!(
                "{} is not a service cgroup under {SERVICES_CGROUP} of a unified hierarchy holding the cpusets",
                cgroup.display()
            ))
        })?;
        self.enable_cpuset_below(&root)?;
        self.enable_cpuset_below(&root.join(SERVICES_CGROUP))?;
        self.write_own(&cgroup.join("cpuset.cpus"), &crate::cpulist::format(cpus))
    }

    /// Lifts what [`Knobs::cpuset_in_place`] set (an empty `cpuset.cpus` is the parent's), so
    /// that a service starting or being restored there is not held to the cores of its last
    /// plan; nothing when the cgroup or its cpuset is gone.
    pub fn lift_cpuset_in_place(&mut self, cgroup: &Path) -> Result<(), KnobError> {
        let cpus = cgroup.join("cpuset.cpus");
        if self.unified_root_above(cgroup).is_none() || !cpus.is_file() {
            return Ok(());
        }
        // A write of nothing would not reach the kernel: the newline is the empty value.
        self.write_own(&cpus, "\n")
    }

    /// Enables the cpuset controller for the children of the unified cgroup `dir`, journaled
    /// so that the undo disables it again; nothing when it is enabled already.
    fn enable_cpuset_below(&mut self, dir: &Path) -> Result<(), KnobError> {
        let control = dir.join("cgroup.subtree_control");
        let enabled = read(&control).unwrap_or_default();
        if enabled.split_whitespace().any(|c| c == "cpuset") {
            return Ok(());
        }
        if self.dry_run {
            info!(path = %control.display(), "dry run: would enable the cpuset controller");
            return Ok(());
        }
        let change = Change::Controller {
            subtree_control: control.clone(),
            controller: "cpuset".into(),
        };
        self.journal.push(change.clone())?;
        if let Err(e) = write_attr(&control, "+cpuset") {
            // Nothing changed: an entry kept would only grow the journal at every settle.
            self.journal.remove(&change)?;
            return Err(e);
        }
        Ok(())
    }

    /// Moves processes into `group`'s cpuset (made with [`Knobs::cpuset`]).
    pub fn attach(&mut self, group: &str, pids: &[i32]) -> Result<(), KnobError> {
        let root = match self.cpusets() {
            Cpusets::V2 { root } | Cpusets::V1 { root } => root,
        };
        let procs = root.join(CGROUP).join(group).join("cgroup.procs");
        for pid in pids {
            self.write_own(&procs, &pid.to_string())?;
        }
        Ok(())
    }

    /// Writes into a cgroup torpor made, or one it enabled the controller for (removing the
    /// cgroup or disabling the controller undoes it, so no journal entry).
    fn write_own(&self, path: &Path, value: &str) -> Result<(), KnobError> {
        if self.dry_run {
            info!(path = %path.display(), value, "dry run: would write");
            return Ok(());
        }
        write_attr(path, value)
    }

    // ---- PM QoS ----

    /// Holds a CPU latency request of `us` microseconds (the deepest states whose exit latency
    /// exceeds it are avoided) until [`Knobs::release_latency`].
    pub fn hold_latency(&mut self, us: i32) -> Result<(), KnobError> {
        let path = self.roots.cpu_dma_latency.clone();
        if self.dry_run {
            info!(path = %path.display(), us, "dry run: would hold a PM QoS latency request");
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| KnobError::Write(path.clone(), e))?;
        f.write_all(&us.to_ne_bytes())
            .map_err(|e| KnobError::Write(path, e))?;
        self.pm_qos = Some(f);
        Ok(())
    }

    /// Drops the PM QoS request (closing the file is what releases it).
    pub fn release_latency(&mut self) {
        if self.pm_qos.take().is_some() {
            info!("PM QoS latency request released");
        }
    }

    pub fn holds_latency(&self) -> bool {
        self.pm_qos.is_some()
    }

    // ---- node sleep ----

    /// Runs the node sleep hook; that the node sleeps is journaled first, so the configured
    /// wake hook runs even if torpor dies while the node sleeps. Refused without a wake hook.
    pub fn node_sleep(&mut self, sleep_command: &[String]) -> Result<(), KnobError> {
        let Some(wake_command) = self.wake_hook.clone() else {
            return Err(KnobError::Refused(
                "no node wake hook configured, so the node is not put to sleep".into(),
            ));
        };
        if self.dry_run {
            info!(command = ?sleep_command, "dry run: would run the node sleep hook");
            return Ok(());
        }
        let change = Change::NodeAsleep { wake_command };
        self.journal.push(change.clone())?;
        if let Err(e) = run_hook(sleep_command) {
            self.journal.remove(&change)?;
            return Err(e);
        }
        Ok(())
    }

    /// Runs the wake hook if the node sleep hook ran.
    pub fn node_wake(&mut self) -> Result<bool, KnobError> {
        let asleep = self
            .journal
            .changes()
            .iter()
            .rev()
            .find(|c| matches!(c, Change::NodeAsleep { .. }))
            .cloned();
        match asleep {
            Some(change) => self.undo_change(&change, false).map(|()| true),
            None => Ok(false),
        }
    }
}

/// `path` resolved (`..` and symlinks of what exists; a missing tail taken as written),
/// relative to `root` resolved; the problem if it is not within `root`.
fn within(path: &Path, root: &Path) -> Result<PathBuf, String> {
    let outside = || format!("{} is not under {}", path.display(), root.display());
    let root = root
        .canonicalize()
        .map_err(|e| format!("{}: {e}", root.display()))?;
    let resolved = resolve(path).ok_or_else(outside)?;
    resolved
        .strip_prefix(&root)
        .map(Path::to_path_buf)
        .map_err(|_| outside())
}

/// The real path of `path`: its longest existing prefix canonicalized, the rest appended.
/// `None` for a relative path or a `..` in the part that does not exist.
fn resolve(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut existing = path.to_path_buf();
    let mut missing = Vec::new();
    loop {
        if let Ok(mut real) = existing.canonicalize() {
            real.extend(missing.iter().rev());
            return Some(real);
        }
        // `file_name` is `None` for a path ending in `..`: unresolvable, refused.
        missing.push(existing.file_name()?.to_owned());
        existing.pop();
    }
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn write_attr(path: &Path, value: &str) -> Result<(), KnobError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // One write(2) per value: sysfs and cgroup files take a value per write. Attributes are
    // never symlinks: one planted in their place is not followed.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .or_else(|e| {
            // A fake tree has no file yet; real sysfs and cgroupfs always do.
            if e.kind() == std::io::ErrorKind::NotFound && path.parent().is_some_and(Path::is_dir) {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(path)
            } else {
                Err(e)
            }
        })
        .map_err(|e| KnobError::Write(path.into(), e))?;
    f.write_all(value.as_bytes())
        .map_err(|e| KnobError::Write(path.into(), e))
}

fn remove_cgroup(path: &Path, parent_procs: &Path) -> Result<(), KnobError> {
    if !path.is_dir() {
        return Ok(());
    }
    let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.split_whitespace() {
        if let Err(e) = write_attr(parent_procs, pid) {
            warn!(pid, error = %e, "could not move a process out of torpor's cgroup");
        }
    }
    if std::fs::remove_dir(path).is_ok() {
        return Ok(());
    }
    // A fake tree holds plain files where cgroupfs has interface files that vanish with rmdir.
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.path().is_file() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    std::fs::remove_dir(path).map_err(|e| KnobError::Write(path.into(), e))
}

fn run_hook(command: &[String]) -> Result<(), KnobError> {
    let Some((program, args)) = command.split_first() else {
        return Ok(());
    };
    let shown = command.join(" ");
    info!(command = %shown, "running node hook");
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .map_err(|e| KnobError::Hook {
            command: shown.clone(),
            problem: e.to_string(),
        })?;
    if !status.success() {
        return Err(KnobError::Hook {
            command: shown,
            problem: status.to_string(),
        });
    }
    Ok(())
}

/// One line for logs and `torpor status`.
pub fn describe(change: &Change) -> String {
    match change {
        Change::File { path, original } => format!("{} (was {original:?})", path.display()),
        Change::CreatedCgroup { path, .. } => format!("cgroup {}", path.display()),
        Change::Controller {
            subtree_control,
            controller,
        } => format!("+{controller} in {}", subtree_control.display()),
        Change::NodeAsleep { wake_command } => {
            format!("node asleep (wake: {})", wake_command.join(" "))
        }
    }
}
