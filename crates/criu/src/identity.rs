//! Which identity CRIU runs as.
//!
//! Where root lacks CAP_SYS_RESOURCE (this project's VMs), CRIU running as root cannot read or
//! set the resource limits (prlimit) of a process whose uid or gid differs from its own, so it
//! cannot dump a tree that runs as a non-root user. CRIU running as that user, with
//! `--unprivileged` and a few ambient capabilities, can, and restores it too. A tree that
//! mixes identities needs CAP_SYS_RESOURCE whatever CRIU runs as.

use std::{
    io,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
};

use nix::libc;
pub use torpor_image::manifest::RunAs;

use crate::procs::TaskIds;

/// Which identity CRIU runs as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CriuIdentity {
    /// Checkpoint: chosen from the tree's credentials ([`decide`]). Restore: the identity the
    /// snapshot was dumped with.
    #[default]
    Auto,
    /// As this process (root), with all its capabilities.
    Current,
    /// As this uid and gid, with `--unprivileged` and [`CAPS`] as ambient capabilities.
    User(RunAs),
}

impl CriuIdentity {
    /// The identity to run CRIU as: `auto`'s for [`CriuIdentity::Auto`] (the tree's for a
    /// checkpoint, the snapshot's for a restore), none (this process's) for `Current`.
    pub fn resolve<E>(
        self,
        auto: impl FnOnce() -> Result<Option<RunAs>, E>,
    ) -> Result<Option<RunAs>, E> {
        match self {
            CriuIdentity::Auto => auto(),
            CriuIdentity::Current => Ok(None),
            CriuIdentity::User(who) => Ok(Some(who)),
        }
    }
}

const CAP_SETGID: u32 = 6;
const CAP_SETPCAP: u32 = 8;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// What unprivileged CRIU needs here to dump and restore a tree of its own uid (TCP sockets
/// included); without CAP_SETPCAP its restorer fails with "Unable to drop capability 24", and
/// without CAP_SETGID it cannot give the tree back its supplementary groups ("Can't
/// setgroups").
pub const CAPS: [u32; 6] = [
    CAP_CHECKPOINT_RESTORE,
    CAP_SYS_PTRACE,
    CAP_NET_ADMIN,
    CAP_SYS_ADMIN,
    CAP_SETPCAP,
    CAP_SETGID,
];

/// The identity a tree asks CRIU to run as, from its processes' credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// As this process: the tree runs as we do, or we may prlimit any process.
    Current,
    /// As the tree's one identity.
    As(RunAs),
    /// The tree mixes identities and we lack CAP_SYS_RESOURCE: no CRIU can dump it here.
    Mixed { uids: Vec<u32>, gids: Vec<u32> },
}

/// Chooses CRIU's identity for a tree whose processes have `tasks` credentials, when this
/// process runs as `me` (uid, gid) with or without CAP_SYS_RESOURCE.
pub fn decide(tasks: &[TaskIds], me: (u32, u32), has_sys_resource: bool) -> Decision {
    let mut ids: Vec<Option<(u32, u32)>> = tasks.iter().map(TaskIds::single).collect();
    ids.sort_unstable();
    ids.dedup();
    match ids.as_slice() {
        [Some(one)] if *one == me => Decision::Current,
        [Some((uid, gid))] => Decision::As(RunAs {
            uid: *uid,
            gid: *gid,
        }),
        [] => Decision::Current, // the tree is gone; CRIU will say so
        _ if has_sys_resource => Decision::Current,
        _ => {
            let collect = |f: fn(&TaskIds) -> [u32; 4]| {
                let mut v: Vec<u32> = tasks.iter().flat_map(f).collect();
                v.sort_unstable();
                v.dedup();
                v
            };
            Decision::Mixed {
                uids: collect(|t| t.uids),
                gids: collect(|t| t.gids),
            }
        }
    }
}

/// `capset(2)`'s header, version 3 (64-bit capability sets).
#[repr(C)]
#[derive(Clone, Copy)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `capset(2)`'s data: one per 32 capabilities.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Makes `cmd` (a CRIU command from [`crate::CriuBinary::command`]) run as `who`: with
/// `--unprivileged`, uid and gid `who`, no supplementary groups, and [`CAPS`] inheritable,
/// permitted and ambient, so CRIU keeps them across the loader's exec and hands them to the
/// action scripts and iptables it runs.
///
/// The switch happens in `pre_exec` with raw system calls only: callers are multi-threaded,
/// and between fork and exec only async-signal-safe work is allowed (no allocation). std's own
/// `uid()`/`gid()` are not used: they run before `pre_exec` and would drop the capabilities
/// the switch needs to keep.
pub fn run_as(cmd: &mut Command, who: RunAs) {
    cmd.arg("--unprivileged");
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    for cap in CAPS {
        let d = &mut data[(cap / 32) as usize];
        let bit = 1u32 << (cap % 32);
        d.effective |= bit;
        d.permitted |= bit;
        d.inheritable |= bit;
    }
    let (uid, gid) = (libc::c_long::from(who.uid), libc::c_long::from(who.gid));
    let check = |r: libc::c_long| {
        if r == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: the closure only makes system calls on values computed above (copied into it),
    // allocates nothing and takes no lock, so it is sound between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let (mut header, data) = (header, data);
            // Keep the permitted set across the uid change (cleared again by exec).
            check(libc::syscall(
                libc::SYS_prctl,
                libc::PR_SET_KEEPCAPS,
                1,
                0,
                0,
                0,
            ))?;
            check(libc::syscall(
                libc::SYS_setgroups,
                0,
                std::ptr::null::<libc::gid_t>(),
            ))?;
            check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
            check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
            check(libc::syscall(
                libc::SYS_capset,
                &mut header as *mut CapHeader,
                data.as_ptr(),
            ))?;
            for cap in CAPS {
                check(libc::syscall(
                    libc::SYS_prctl,
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE,
                    libc::c_ulong::from(cap),
                    0,
                    0,
                ))?;
            }
            Ok(())
        });
    }
}

/// Opens CRIU's work directory `dir` to `who` no further than CRIU needs. CRIU then holds
/// capabilities that a process of `who` must not borrow: were the directory `who`'s, such a
/// process could swap the action script CRIU runs. So the directory and the action script
/// stay ours (readable, `shared_ro`); the sockets and FIFOs CRIU talks through (`owned`) become
/// `who`'s; what CRIU writes (its log, the pid file) goes into a subdirectory of `who`'s, which
/// is returned.
pub fn open_to(
    dir: &Path,
    owned: &[&Path],
    shared_ro: &[&Path],
    who: RunAs,
) -> io::Result<PathBuf> {
    use std::{fs, os::unix::fs::PermissionsExt};
    reachable(dir, who)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for p in shared_ro {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755))?;
    }
    for p in owned {
        std::os::unix::fs::chown(p, Some(who.uid), Some(who.gid))?;
    }
    let private = dir.join("criu");
    fs::create_dir(&private)?;
    std::os::unix::fs::chown(&private, Some(who.uid), Some(who.gid))?;
    Ok(private)
}

/// Fails unless every directory above `dir` is searchable by `who`; otherwise CRIU could not
/// even open its log, and would fail without a word.
fn reachable(dir: &Path, who: RunAs) -> io::Result<()> {
    let dir = std::path::absolute(dir)?;
    for up in dir.ancestors().skip(1) {
        let m = up.metadata()?;
        let mode = m.mode();
        let ok = mode & 0o001 != 0
            || (m.uid() == who.uid && mode & 0o100 != 0)
            || (m.gid() == who.gid && mode & 0o010 != 0);
        if !ok {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not searchable by uid {} gid {}, which CRIU runs as; choose a work directory it can reach",
                    up.display(),
                    who.uid,
                    who.gid
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(pid: i32, uid: u32, gid: u32) -> TaskIds {
        TaskIds {
            pid,
            uids: [uid; 4],
            gids: [gid; 4],
        }
    }

    const NOBODY: RunAs = RunAs {
        uid: 65534,
        gid: 65534,
    };

    #[test]
    fn one_identity_runs_as_it_and_ours_needs_no_switch() {
        let root = (0, 0);
        let tree = [task(10, 65534, 65534), task(11, 65534, 65534)];
        assert_eq!(decide(&tree, root, false), Decision::As(NOBODY));
        assert_eq!(decide(&tree, root, true), Decision::As(NOBODY));
        let tree = [task(10, 0, 0), task(11, 0, 0)];
        assert_eq!(decide(&tree, root, false), Decision::Current);
        // Same uid, other gid: prlimit checks the gids too.
        let tree = [task(10, 0, 33)];
        assert_eq!(
            decide(&tree, root, false),
            Decision::As(RunAs { uid: 0, gid: 33 })
        );
    }

    #[test]
    fn mixed_identities_need_cap_sys_resource() {
        let root = (0, 0);
        let tree = [task(10, 0, 0), task(11, 33, 33), task(12, 33, 33)];
        assert_eq!(decide(&tree, root, true), Decision::Current);
        assert_eq!(
            decide(&tree, root, false),
            Decision::Mixed {
                uids: vec![0, 33],
                gids: vec![0, 33]
            }
        );
        // A process whose real and effective uids differ is mixed on its own.
        let split = [TaskIds {
            pid: 10,
            uids: [0, 33, 33, 33],
            gids: [0; 4],
        }];
        assert!(matches!(
            decide(&split, root, false),
            Decision::Mixed { .. }
        ));
    }

    #[test]
    fn switched_command_runs_with_the_uid_and_exactly_the_ambient_caps() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to switch uid");
            return;
        }
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("grep -E '^(Uid|Gid|Groups|CapAmb|CapEff):' /proc/self/status; echo \"$0\"");
        run_as(&mut cmd, NOBODY);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        assert_eq!(field("Uid:"), "65534 65534 65534 65534", "{text}");
        assert_eq!(field("Gid:"), "65534 65534 65534 65534", "{text}");
        assert_eq!(field("Groups:"), "", "{text}");
        let want: u64 = CAPS.iter().map(|c| 1u64 << c).sum();
        let amb = u64::from_str_radix(&field("CapAmb:"), 16).unwrap();
        let eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
        assert_eq!(amb, want, "{text}");
        assert_eq!(eff, want, "{text}");
        // `--unprivileged` lands in the shell's $0, the first argument after the script.
        assert_eq!(text.lines().last(), Some("--unprivileged"), "{text}");
    }

    #[test]
    fn the_work_directory_stays_ours_and_only_the_channels_and_output_dir_become_theirs() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give files away");
            return;
        }
        let work = tempfile::tempdir().unwrap();
        let (fifo, script) = (work.path().join("fifo"), work.path().join("hook.sh"));
        std::fs::write(&fifo, "").unwrap();
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
        let private = open_to(work.path(), &[&fifo], &[&script], NOBODY).unwrap();
        let meta = |p: &Path| std::fs::metadata(p).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(meta(work.path()).uid(), me);
        assert_eq!(meta(work.path()).mode() & 0o777, 0o755);
        assert_eq!(
            (meta(&script).uid(), meta(&script).mode() & 0o777),
            (me, 0o755)
        );
        assert_eq!(
            (meta(&fifo).uid(), meta(&fifo).gid()),
            (NOBODY.uid, NOBODY.gid)
        );
        assert_eq!(private.parent(), Some(work.path()));
        assert_eq!(meta(&private).uid(), NOBODY.uid);
    }

    #[test]
    fn unreachable_work_directory_is_refused_up_front() {
        use std::os::unix::fs::PermissionsExt;
        let top = tempfile::tempdir().unwrap();
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let inner = top.path().join("work");
        std::fs::create_dir(&inner).unwrap();
        let err = reachable(&inner, NOBODY).unwrap_err();
        assert!(err.to_string().contains("not searchable"), "{err}");
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        reachable(&inner, NOBODY).unwrap();
    }
}
