//! The init of a service's PID namespace.
//!
//! Every plain-process service runs as `torpor __service-init [OPTIONS] -- CMD...`. Started by
//! the agent (as root, in the service's cgroup and session), it creates a PID namespace and
//! forks its namespace init, reports that init's host PID on stdout and exits; the agent
//! (subreaper) adopts the init, exactly as it adopts a tree CRIU restores. The namespace init
//! becomes its own session leader (CRIU requires it), drops to the service's user, sets its
//! limits and directory, starts the command, and then only reaps: every orphan of the tree
//! (forking servers' workers, a daemon's double fork) lands on it, never on the agent. It
//! forwards termination signals to the whole namespace and exits, with the command's status,
//! once no process of the service is left. It is small and allocation-light on purpose: CRIU
//! checkpoints it with the service.

use std::{
    ffi::{CString, OsStr, OsString},
    io::Write,
    os::unix::ffi::OsStrExt,
};

use nix::{
    errno::Errno,
    sched::{unshare, CloneFlags},
    sys::{
        resource::{setrlimit, Resource},
        signal::{kill, SigSet, SigmaskHow, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::{
        chdir, execvp, fork, setgroups, setresgid, setresuid, setsid, ForkResult, Gid, Pid, Uid,
    },
};

/// The hidden first argument that makes the `torpor` binary act as a service's init.
pub const SUBCOMMAND: &str = "__service-init";

/// Whom the service runs as and with what limits; passed to the init as arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitOptions {
    /// Drop to this uid (with `gid` and `groups`) before the command runs.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Supplementary groups; empty drops them all when `uid` is set.
    pub groups: Vec<u32>,
    /// Resource limits: (name as in [`rlimit_resource`], soft, hard); `u64::MAX` is unlimited.
    pub rlimits: Vec<(String, u64, u64)>,
    pub cwd: Option<std::path::PathBuf>,
    /// Run in a new PID namespace (root services). CRIU cannot dump a non-root task in its
    /// own PID namespace (its parasite can use neither the host's /proc nor mount one), so a
    /// service with another user runs in the host's, under an init that is its subreaper.
    pub pid_namespace: bool,
}

impl InitOptions {
    /// The init's arguments (after [`SUBCOMMAND`]) for running `argv`.
    pub fn to_args(&self, argv: &[String]) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        if let Some(u) = self.uid {
            a.extend(["--uid".into(), u.to_string().into()]);
        }
        if let Some(g) = self.gid {
            a.extend(["--gid".into(), g.to_string().into()]);
        }
        for g in &self.groups {
            a.extend(["--group".into(), g.to_string().into()]);
        }
        for (name, soft, hard) in &self.rlimits {
            a.extend(["--rlimit".into(), format!("{name}={soft}:{hard}").into()]);
        }
        if let Some(c) = &self.cwd {
            a.extend(["--cwd".into(), c.clone().into_os_string()]);
        }
        if self.pid_namespace {
            a.push("--pid-namespace".into());
        }
        a.push("--".into());
        a.extend(argv.iter().map(OsString::from));
        a
    }

    /// Parses what [`InitOptions::to_args`] wrote: (options, command).
    pub fn parse(args: &[OsString]) -> Result<(InitOptions, Vec<OsString>), String> {
        let mut o = InitOptions::default();
        let mut it = args.iter();
        let num = |v: Option<&OsString>, flag: &str| -> Result<u32, String> {
            v.and_then(|v| v.to_str())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{flag} needs a number"))
        };
        while let Some(a) = it.next() {
            match a.to_str() {
                Some("--uid") => o.uid = Some(num(it.next(), "--uid")?),
                Some("--gid") => o.gid = Some(num(it.next(), "--gid")?),
                Some("--group") => o.groups.push(num(it.next(), "--group")?),
                Some("--rlimit") => {
                    let v = it.next().and_then(|v| v.to_str()).unwrap_or_default();
                    let parsed = v.split_once('=').and_then(|(n, l)| {
                        let (s, h) = l.split_once(':')?;
                        Some((n.to_string(), s.parse().ok()?, h.parse().ok()?))
                    });
                    o.rlimits
                        .push(parsed.ok_or_else(|| format!("bad --rlimit {v:?}"))?);
                }
                Some("--cwd") => {
                    o.cwd = Some(it.next().ok_or("--cwd needs a directory")?.into());
                }
                Some("--pid-namespace") => o.pid_namespace = true,
                Some("--") => {
                    let cmd: Vec<OsString> = it.cloned().collect();
                    if cmd.is_empty() {
                        return Err("no command after --".into());
                    }
                    return Ok((o, cmd));
                }
                _ => return Err(format!("unknown init argument {a:?}")),
            }
        }
        Err("no command after --".into())
    }
}

/// The resource behind an rlimit name (`nofile`, `nproc`, `core`, `memlock`, `stack`, `as`,
/// `fsize`, `cpu`, `data`, `rss`, `msgqueue`, `nice`, `rtprio`, `sigpending`, `locks`).
pub fn rlimit_resource(name: &str) -> Option<Resource> {
    Some(match name {
        "nofile" => Resource::RLIMIT_NOFILE,
        "nproc" => Resource::RLIMIT_NPROC,
        "core" => Resource::RLIMIT_CORE,
        "memlock" => Resource::RLIMIT_MEMLOCK,
        "stack" => Resource::RLIMIT_STACK,
        "as" => Resource::RLIMIT_AS,
        "fsize" => Resource::RLIMIT_FSIZE,
        "cpu" => Resource::RLIMIT_CPU,
        "data" => Resource::RLIMIT_DATA,
        "rss" => Resource::RLIMIT_RSS,
        "msgqueue" => Resource::RLIMIT_MSGQUEUE,
        "nice" => Resource::RLIMIT_NICE,
        "rtprio" => Resource::RLIMIT_RTPRIO,
        "sigpending" => Resource::RLIMIT_SIGPENDING,
        "locks" => Resource::RLIMIT_LOCKS,
        _ => return None,
    })
}

/// Signals the init passes on to every process of the namespace.
const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Runs the init; the return value is the process's exit code. Must be called before the
/// process starts any thread.
pub fn main(args: &[OsString]) -> u8 {
    let (opts, cmd) = match InitOptions::parse(args) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    // Outer step: fork the init (in a new namespace, whose PID 1 it becomes), report its
    // PID and leave, so the agent adopts it as it adopts a restored tree.
    if opts.pid_namespace {
        if let Err(e) = unshare(CloneFlags::CLONE_NEWPID) {
            return fail(&format!("cannot create a PID namespace: {e}"));
        }
    }
    // SAFETY: single-threaded here (called first thing in main).
    match unsafe { fork() } {
        Err(e) => fail(&format!("cannot fork the namespace init: {e}")),
        Ok(ForkResult::Parent { child }) => {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{child}");
            let _ = out.flush();
            0
        }
        Ok(ForkResult::Child) => namespace_init(&opts, &cmd),
    }
}

fn fail(msg: &str) -> u8 {
    eprintln!("torpor service init: {msg}");
    127
}

/// The service's init: PID 1 of its namespace, or its subreaper in the host's.
fn namespace_init(opts: &InitOptions, cmd: &[OsString]) -> u8 {
    // Nothing else may read the agent's pipe; the service's output goes where stderr goes.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1);
    }
    if let Err(e) = setsid() {
        return fail(&format!("setsid: {e}"));
    }
    if !opts.pid_namespace {
        // Orphans of the tree come to us, as they would to a namespace's PID 1.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            return fail(&format!("cannot become the subreaper: {e}"));
        }
    }
    if let Err(e) = become_user(opts) {
        return fail(&e);
    }
    let argv: Vec<CString> = match cmd
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
    {
        Ok(v) => v,
        Err(_) => return fail("command contains a NUL byte"),
    };
    let all = SigSet::all();
    if let Err(e) = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&all), None) {
        return fail(&format!("sigprocmask: {e}"));
    }
    // SAFETY: still single-threaded.
    let main_child = match unsafe { fork() } {
        Err(e) => return fail(&format!("cannot fork the command: {e}")),
        Ok(ForkResult::Child) => {
            let _ = nix::sys::signal::sigprocmask(
                SigmaskHow::SIG_SETMASK,
                Some(&SigSet::empty()),
                None,
            );
            let e = execvp(&argv[0], &argv).unwrap_err();
            eprintln!(
                "torpor service init: cannot run {:?}: {e}",
                OsStr::from_bytes(argv[0].as_bytes())
            );
            // SAFETY: exit the forked child without running the parent's atexit handlers.
            unsafe { nix::libc::_exit(127) }
        }
        Ok(ForkResult::Parent { child }) => child,
    };
    supervise(main_child, &all, opts.pid_namespace)
}

fn become_user(opts: &InitOptions) -> Result<(), String> {
    for (name, soft, hard) in &opts.rlimits {
        let r = rlimit_resource(name).ok_or_else(|| format!("unknown rlimit {name:?}"))?;
        setrlimit(r, *soft, *hard).map_err(|e| format!("rlimit {name}: {e}"))?;
    }
    if let Some(uid) = opts.uid {
        let gid = Gid::from_raw(opts.gid.unwrap_or(uid));
        let groups: Vec<Gid> = opts.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
        setresgid(gid, gid, gid).map_err(|e| format!("setgid {gid}: {e}"))?;
        let uid = Uid::from_raw(uid);
        setresuid(uid, uid, uid).map_err(|e| format!("setuid {uid}: {e}"))?;
        // A uid change leaves us undumpable (our /proc files stay root's), and CRIU, which
        // then runs as this uid, must read them. The command regains it at its exec.
        nix::sys::prctl::set_dumpable(true).map_err(|e| format!("set dumpable: {e}"))?;
    } else if let Some(gid) = opts.gid {
        let gid = Gid::from_raw(gid);
        setresgid(gid, gid, gid).map_err(|e| format!("setgid {gid}: {e}"))?;
    }
    if let Some(cwd) = &opts.cwd {
        chdir(cwd).map_err(|e| format!("cannot enter {}: {e}", cwd.display()))?;
    }
    Ok(())
}

/// Reaps and forwards until the service is gone; returns the command's exit code.
fn supervise(main_child: Pid, all: &SigSet, pid_namespace: bool) -> u8 {
    let mut code: u8 = 0;
    loop {
        let sig = match all.wait() {
            Ok(s) => s,
            Err(Errno::EINTR) => continue,
            Err(_) => Signal::SIGCHLD,
        };
        if sig != Signal::SIGCHLD {
            if FORWARDED.contains(&sig) {
                if pid_namespace {
                    // From the namespace's init, -1 is every process of the namespace but us.
                    let _ = kill(Pid::from_raw(-1), sig);
                } else {
                    // In the host's namespace -1 would be every process of the user: only
                    // our session (the service, unless a process left it).
                    for pid in session_members() {
                        let _ = kill(Pid::from_raw(pid), sig);
                    }
                }
            }
            continue;
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, c)) => {
                    if pid == main_child {
                        code = c as u8;
                    }
                }
                Ok(WaitStatus::Signaled(pid, s, _)) => {
                    if pid == main_child {
                        code = 128u8.wrapping_add(s as u8);
                    }
                }
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => {}
                // Nobody left: the service is over.
                Err(Errno::ECHILD) => return code,
                Err(Errno::EINTR) => {}
                Err(_) => break,
            }
        }
    }
}

/// Processes of our session but us.
fn session_members() -> Vec<i32> {
    let me = std::process::id() as i32;
    let session = me.to_string();
    torpor_criu::procs::all_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            // State, ppid, pgrp, session.
            torpor_criu::procs::stat_fields(pid).is_some_and(|f| f.get(3) == Some(&session))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let o = InitOptions {
            uid: Some(65534),
            gid: Some(65534),
            groups: vec![4, 27],
            rlimits: vec![("nofile".into(), 1024, 4096)],
            cwd: Some("/srv/x y".into()),
            pid_namespace: true,
        };
        let argv = vec!["nginx".to_string(), "-c".into(), "--uid".into()];
        let (back, cmd) = InitOptions::parse(&o.to_args(&argv)).unwrap();
        assert_eq!(back, o);
        assert_eq!(
            cmd,
            vec![OsString::from("nginx"), "-c".into(), "--uid".into()]
        );
    }

    #[test]
    fn bad_arguments_are_named() {
        let e = InitOptions::parse(&["--uid".into(), "x".into()]).unwrap_err();
        assert!(e.contains("--uid"), "{e}");
        let e = InitOptions::parse(&["--".into()]).unwrap_err();
        assert!(e.contains("no command"), "{e}");
        let e = InitOptions::parse(&[
            "--rlimit".into(),
            "nofile=1".into(),
            "--".into(),
            "x".into(),
        ])
        .unwrap_err();
        assert!(e.contains("--rlimit"), "{e}");
        assert!(rlimit_resource("nofiles").is_none());
    }
}
