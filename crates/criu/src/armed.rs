//! Armed wakes: a lazy restore run while the service sleeps and held just before its tasks
//! resume, so that the wake itself only lets them go.
//!
//! CRIU's restore ends in stages: every task is rebuilt, the lazy-pages server gets its
//! finish marker (and pushes the recorded working set), the tasks are stopped on their way
//! out of the restorer, CRIU runs its `pre-resume` action scripts, and only then detaches.
//! An armed wake runs all of that right after the checkpoint is staged, with an action
//! script that blocks at `pre-resume` on a FIFO. The held tree costs no CPU (its tasks are
//! ptrace-stopped, CRIU waits for the script) and little memory (what CRIU restores eagerly,
//! the working set, CRIU itself: [`ArmedWake::resident_bytes`]); every other page stays in
//! the pool as with any lazy restore. Releasing it is one write: the wake then costs the
//! detach, as Firecracker's resume of a loaded snapshot costs only the resume.
//!
//! Nothing is lost when it goes wrong: if arming fails the wake restores on its own path;
//! giving an armed wake up ([`ArmedWake::abort`], or dropping it) kills the held tree; and if
//! torpor itself goes away, the script sees its FIFO's end of file and kills the tree, so a
//! held restore never resumes unattended.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    os::{
        fd::AsFd,
        unix::fs::{OpenOptionsExt, PermissionsExt},
    },
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use nix::{
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::{signal, stat::Mode},
    unistd::{mkfifo, Pid},
};
use torpor_lazy::Fill;
use tracing::{debug, info};

use crate::{
    binary::CriuBinary,
    lazy::{kill_tree, launch, unmount_leftovers, Launched, LazyOptions, LazyWake, StagedWake},
    procs,
    replicas::Pools,
    restore::{RestoreError, RestoreOptions},
};

/// Longest an armed restore may take to reach `pre-resume`.
pub const ARM_TIMEOUT: Duration = Duration::from_secs(30);

const SCRIPT: &str = "hold-before-resume.sh";
const ARMED_FIFO: &str = "armed.fifo";
const GO_FIFO: &str = "go.fifo";
const GO: &[u8] = b"go\n";

/// The action script CRIU runs at each stage (`@GO@` and `@ARMED@`: the FIFOs' quoted
/// paths). `<>` opens a FIFO read-write, which never blocks: the script opens `go`
/// read-write, then read-only (not blocking: it is a writer itself), then drops the
/// read-write one, so from then on only torpor's end keeps a writer and the read sees end of
/// file if torpor is gone, even if it went before the script started. The report on `armed`
/// lands in its buffer whether or not torpor reads yet.
const HOLD_SCRIPT: &str = r#"#!/bin/sh
# Written by torpor: holds CRIU's restore before its tasks resume, until torpor says go.
# Anything else, torpor's end of the FIFO closing included, kills the tree.
[ "$CRTOOLS_SCRIPT_ACTION" = pre-resume ] || exit 0
exec 3<>@GO@
exec 4<@GO@
exec 3>&-
echo "$CRTOOLS_INIT_PID" 1<>@ARMED@
read -r word <&4
[ "$word" = go ] && exit 0
root=$CRTOOLS_INIT_PID
exec 5<"/proc/$root/ns/pid"
kill -KILL "$root"
# In this shell's PID namespace, CRIU kills the rest when it cannot detach the root.
[ /proc/self/fd/5 -ef /proc/self/ns/pid ] && exit 1
# In one of its own, the init dies only once its tasks are reaped, while CRIU, which still
# traces them, waits for the init: kill every task of the namespace, and once none can run
# (a zombie, or exiting: PF_EXITING in stat's flags), end CRIU.
tries=0
while :; do
    live=0
    for p in /proc/[0-9]*; do
        [ "$p/ns/pid" -ef /proc/self/fd/5 ] || continue
        read -r stat <"$p/stat" || continue
        set -- ${stat##*") "}
        case $1 in Z | X) continue ;; esac
        [ $(($7 & 4)) -ne 0 ] && continue
        live=1
        kill -KILL "${p#/proc/}"
    done 2>/dev/null
    [ "$live" = 0 ] && kill -KILL "$PPID" && exit 1
    tries=$((tries + 1))
    [ "$tries" -gt 1000 ] && exit 1
    sleep 0.01
done
"#;

/// A lazy restore held before its tasks resume (see the module's documentation).
#[derive(Debug)]
pub struct ArmedWake {
    /// `None` once resumed or given up.
    launched: Option<Launched>,
    /// Write end of the FIFO the held script reads; closing it (torpor gone) kills the tree.
    go: File,
    /// Root of the held tree.
    pid: i32,
    /// Untouched pages are filled in the background once it runs.
    background_fill: bool,
    /// How long arming took, from CRIU's start to the hold.
    pub armed_s: f64,
}

/// Runs the lazy restore of `staged` up to CRIU's `pre-resume` stage and holds it there
/// (see the module's documentation). On failure nothing of the tree is left.
pub fn arm_lazy(
    criu: &CriuBinary,
    staged: StagedWake,
    pools: &Pools,
    opts: &RestoreOptions,
    lazy: &LazyOptions,
    timeout: Duration,
) -> Result<ArmedWake, RestoreError> {
    let dir = staged.work_dir().to_path_buf();
    let (armed_rx, go) = hold_files(&dir).map_err(RestoreError::WorkDir)?;
    let start = Instant::now();
    let mut launched = launch(criu, staged, pools, opts, lazy, Some(&dir.join(SCRIPT)))?;
    let name = launched.name.clone();
    let deadline = start + timeout;
    let mut armed_rx = armed_rx;
    loop {
        let mut fds = [PollFd::new(armed_rx.as_fd(), PollFlags::POLLIN)];
        // CRIU's exit is noticed between polls: it is not a descriptor here.
        let _ = poll(&mut fds, PollTimeout::from(20u16));
        let mut line = [0u8; 32];
        if let Ok(n @ 1..) = armed_rx.read(&mut line) {
            let said = String::from_utf8_lossy(&line[..n]);
            let pid = said
                .trim()
                .parse::<i32>()
                .ok()
                .or_else(|| launched.read_pid());
            let Some(pid) = pid.filter(|&p| p > 0) else {
                return Err(give_up(
                    launched,
                    go,
                    &name,
                    "the held restore named no root",
                ));
            };
            launched.root.store(pid, Ordering::SeqCst);
            // The working set is pushed now, while it sleeps, not at the wake.
            launched
                .server
                .wait_prefetched(deadline.saturating_duration_since(Instant::now()));
            let armed_s = start.elapsed().as_secs_f64();
            info!(
                name,
                generation = launched.manifest.generation,
                pid,
                secs = armed_s,
                "lazy restore armed: held before its tasks resume"
            );
            return Ok(ArmedWake {
                launched: Some(launched),
                go,
                pid,
                background_fill: lazy.background_fill,
                armed_s,
            });
        }
        match launched.child.try_wait() {
            Ok(Some(_)) => {
                // CRIU ended without holding: a failure (its log says why), or a tree that
                // runs unheld, which an armed wake must not leave behind.
                return Err(match launched.complete() {
                    Err(e) => e,
                    Ok(wake) => {
                        kill_tree(wake.report.pid);
                        let _ = wake.session.shutdown();
                        RestoreError::NotHeld {
                            name,
                            reason: "CRIU resumed the tree without holding it".into(),
                        }
                    }
                });
            }
            Ok(None) => {}
            Err(e) => return Err(RestoreError::Stream(e)),
        }
        if Instant::now() >= deadline {
            return Err(give_up(
                launched,
                go,
                &name,
                &format!("it did not reach pre-resume within {timeout:?}"),
            ));
        }
    }
}

/// Writes the action script and makes the two FIFOs it talks through; returns the read end
/// of `armed` (where the script reports the held root) and the write end of `go`.
fn hold_files(dir: &Path) -> std::io::Result<(File, File)> {
    let quote = |name: &str| {
        let p = dir.join(name).display().to_string();
        format!("'{}'", p.replace('\'', r"'\''"))
    };
    let script = HOLD_SCRIPT
        .replace("@GO@", &quote(GO_FIFO))
        .replace("@ARMED@", &quote(ARMED_FIFO));
    let path = dir.join(SCRIPT);
    fs::write(&path, script)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o700))?;
    for fifo in [ARMED_FIFO, GO_FIFO] {
        mkfifo(&dir.join(fifo), Mode::S_IRUSR | Mode::S_IWUSR)?;
    }
    let armed_rx = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(dir.join(ARMED_FIFO))?;
    // Read-write: the script's blocking open for reading finds a writer at once, and its
    // read sees end of file only when this descriptor closes (torpor gone).
    let go = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(GO_FIFO))?;
    Ok((armed_rx, go))
}

/// Kills a held tree and CRIU, and ends the server; returns the error to report.
fn give_up(launched: Launched, go: File, name: &str, reason: &str) -> RestoreError {
    kill_held(launched, &go);
    RestoreError::NotHeld {
        name: name.to_string(),
        reason: reason.to_string(),
    }
}

fn kill_held(mut launched: Launched, go: &File) {
    debug!(
        name = launched.name,
        generation = launched.manifest.generation,
        "giving a held restore up"
    );
    // Any word but "go" makes the script kill the tree (a namespace's as well) and fail;
    // CRIU then ends. If CRIU is stuck before its pre-resume stage, the tree is killed here.
    let _ = (&*go).write_all(b"stop\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    while launched.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let root = match launched.root.swap(0, Ordering::SeqCst) {
        0 => launched.read_pid().unwrap_or(0),
        root => root,
    };
    kill_tree(root);
    if launched.child.try_wait().ok().flatten().is_none() {
        let _ = signal::kill(
            Pid::from_raw(launched.child.id() as i32),
            signal::Signal::SIGKILL,
        );
        let _ = launched.child.wait();
    }
    if !launched.manifest.meta.pid_namespace {
        procs::reap_failed_restore(&launched.manifest.meta.pids, Duration::from_secs(2));
    }
    if let Err(e) = launched.server.shutdown() {
        debug!(error = %e, "lazy-pages server of a given-up held restore");
    }
    unmount_leftovers(launched.work.path());
}

impl ArmedWake {
    /// The held tree's root.
    pub fn root(&self) -> i32 {
        self.pid
    }

    /// The generation it restores.
    pub fn generation(&self) -> u64 {
        self.launched.as_ref().map_or(0, |l| l.manifest.generation)
    }

    /// Node memory the held restore occupies: the resident memory of the held tree and of
    /// CRIU (shared pages counted once per process, so an upper bound), and the staged images
    /// CRIU still has open.
    pub fn held_bytes(&self) -> u64 {
        let Some(l) = &self.launched else { return 0 };
        let mut pids = procs::tree_pids(self.pid);
        pids.push(l.child.id() as i32);
        let files: u64 = fs::read_dir(l.work.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .sum();
        procs::tree_rss_bytes(&pids) + files
    }

    /// Copies every page still in the pool into the held tree now (for an eager restore,
    /// [`crate::filled`]); the tasks stay held. On failure the tree is given up.
    pub fn fill_all(mut self, timeout: Duration) -> Result<ArmedWake, RestoreError> {
        let launched = self.launched.as_ref().expect("held until resumed");
        match launched.server.fill_all(timeout) {
            Ok(()) => Ok(self),
            Err(source) => {
                let launched = self.launched.take().expect("held until resumed");
                let name = launched.name.clone();
                kill_held(launched, &self.go);
                Err(RestoreError::Lazy { name, source })
            }
        }
    }

    /// Lets the held tasks run and waits for CRIU to end; the report's `restore_s` is the
    /// release alone.
    pub fn resume(mut self) -> Result<LazyWake, RestoreError> {
        let mut launched = self.launched.take().expect("an armed wake resumes once");
        launched.start = Instant::now();
        let fill = if self.background_fill {
            Fill::Background
        } else {
            Fill::OnDemand
        };
        let failed = match launched.server.resumed(fill) {
            Err(e) => Some(RestoreError::Lazy {
                name: launched.name.clone(),
                source: e,
            }),
            Ok(()) => (&self.go).write_all(GO).err().map(RestoreError::Stream),
        };
        if let Some(e) = failed {
            kill_held(launched, &self.go);
            return Err(e);
        }
        launched.complete()
    }

    /// Gives the held restore up: the tree and CRIU are killed.
    pub fn abort(self) {
        // dropping does it
    }
}

impl Drop for ArmedWake {
    fn drop(&mut self) {
        if let Some(launched) = self.launched.take() {
            kill_held(launched, &self.go);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};

    use super::*;

    /// Runs the hold script as CRIU would at `action`, with `init` as the restored root.
    fn run_script(dir: &Path, action: &str, init: u32) -> Child {
        Command::new(dir.join(SCRIPT))
            .env("CRTOOLS_SCRIPT_ACTION", action)
            .env("CRTOOLS_INIT_PID", init.to_string())
            .spawn()
            .expect("the script runs")
    }

    /// Reads what the script reported on `armed`, waiting for it.
    fn reported(armed: &mut File) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 32];
        loop {
            match armed.read(&mut buf) {
                Ok(n @ 1..) => return String::from_utf8_lossy(&buf[..n]).trim().to_string(),
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                _ => panic!("the script never reported the held root"),
            }
        }
    }

    fn sleeper() -> Child {
        Command::new("sleep").arg("60").spawn().expect("sleep runs")
    }

    #[test]
    fn the_script_passes_every_stage_but_pre_resume_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (_armed, _go) = hold_files(dir.path()).unwrap();
        let status = run_script(dir.path(), "post-restore", 1).wait().unwrap();
        assert!(status.success());
    }

    #[test]
    fn the_script_holds_at_pre_resume_until_go_and_leaves_the_tree_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (mut armed, go) = hold_files(dir.path()).unwrap();
        let mut tree = sleeper();
        let mut script = run_script(dir.path(), "pre-resume", tree.id());
        assert_eq!(reported(&mut armed), tree.id().to_string());
        std::thread::sleep(Duration::from_millis(50));
        assert!(script.try_wait().unwrap().is_none(), "held until told");
        (&go).write_all(GO).unwrap();
        assert!(script.wait().unwrap().success());
        assert!(tree.try_wait().unwrap().is_none(), "the released tree runs");
        tree.kill().unwrap();
        tree.wait().unwrap();
    }

    #[test]
    fn the_script_kills_the_tree_when_torpor_went_away_before_it_ran() {
        let dir = tempfile::tempdir().unwrap();
        let (mut armed, go) = hold_files(dir.path()).unwrap();
        drop(go);
        let mut tree = sleeper();
        let mut script = run_script(dir.path(), "pre-resume", tree.id());
        reported(&mut armed);
        assert!(!script.wait().unwrap().success(), "CRIU is told it failed");
        let status = tree.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the held root is killed rather than held for ever"
        );
    }

    #[test]
    fn the_script_kills_the_tree_when_torpor_goes_away_or_gives_up() {
        for word in [None, Some(&b"stop\n"[..])] {
            let dir = tempfile::tempdir().unwrap();
            let (mut armed, go) = hold_files(dir.path()).unwrap();
            let mut tree = sleeper();
            let mut script = run_script(dir.path(), "pre-resume", tree.id());
            reported(&mut armed);
            match word {
                // torpor gone: its end of the FIFO closes
                None => drop(go),
                Some(w) => (&go).write_all(w).unwrap(),
            }
            assert!(!script.wait().unwrap().success(), "CRIU is told it failed");
            let status = tree.wait().unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(9),
                "the held root is killed ({word:?})"
            );
        }
    }
}
