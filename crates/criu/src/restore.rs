//! Restore a snapshot straight from the pool.
//!
//! CRIU runs with `--stream` and asks for image files one by one, each chunk verified against
//! its checksum by the pool before it is sent. A file that fits in CRIU's pipe (all of them
//! but large `pages-*.img`) is fetched and written by the thread that answers CRIU, from one
//! reused buffer: it cannot block on the pipe, and a thread of its own cost a wake-up each (up
//! to a scheduler tick, 4 ms, on a busy machine, for some 40 files per restore). A larger file
//! streams from the pool into the pipe as it arrives, on its own thread, so CRIU may read files
//! in any interleaving; nothing larger than a pipe is buffered whole on the node (buffering
//! first doubles restore time). Before CRIU starts, the snapshot's PIDs must be free: a task
//! just dumped can linger as a zombie until its parent reaps it. A tree whose root was the
//! init of its own PID namespace is restored into a fresh one, where its PIDs cannot collide,
//! so it does not wait. CRIU runs as the identity the snapshot was dumped with. Given the
//! tree's cgroup (v2), CRIU starts inside it and the tree inherits it: moving tasks there
//! instead waits for an RCU grace period, 5-10 ms here.

use std::{
    io,
    io::Write,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::PathBuf,
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitStatus},
    unistd::Pid,
};
use thiserror::Error;
use torpor_image::{manifest::RunAs, wire::ErrorCode, Manifest};
use torpor_pool::{ClientError, PoolClient};
use tracing::{debug, info};

use crate::{
    binary::{keep_log, log_tail, read_no_follow, CriuBinary, CriuError},
    checkpoint::TcpConnections,
    identity::{self, CriuIdentity},
    procs,
    streamer::{self, SERVE_SOCKET},
    PoolTarget,
};

/// How a restore is done.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Must match what the checkpoint did with established TCP connections.
    pub tcp: TcpConnections,
    /// The tree was a terminal session (CRIU's `--shell-job`).
    pub shell_job: bool,
    /// Longest wait for the snapshot's PIDs to become free.
    pub pid_wait: Duration,
    /// Where CRIU's work directory (log, socket) is created.
    pub work_root: PathBuf,
    /// Identity CRIU runs as; by default the one the snapshot was dumped with, so a restore
    /// needs no more privilege than its dump had.
    pub run_as: CriuIdentity,
    /// The cgroup v2 directory the restored tree belongs in (a service's own cgroup). CRIU is
    /// started inside it (`CLONE_INTO_CGROUP`) and leaves cgroups alone, so the tree inherits
    /// it and no task is moved: a move into a cgroup, or the cgroup mount CRIU makes to move
    /// tasks, waits for an RCU grace period (5-10 ms here). Not used when the directory is not
    /// a cgroup v2 one, or when CRIU runs as another identity; CRIU then restores the tree's
    /// cgroups itself.
    pub cgroup: Option<PathBuf>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            tcp: TcpConnections::Keep,
            shell_job: false,
            pid_wait: Duration::from_secs(10),
            work_root: std::env::temp_dir(),
            run_as: CriuIdentity::Auto,
            cgroup: None,
        }
    }
}

/// What a restore did and cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub name: String,
    pub generation: u64,
    /// PID of the restored root.
    pub pid: i32,
    /// From the request to CRIU's exit, the tree running.
    pub restore_s: f64,
    /// Of which waiting for the PIDs to be free (0 for a tree in its own PID namespace).
    pub pid_wait_s: f64,
    pub bytes_fetched: u64,
    /// Identity CRIU ran as (`None`: as this process).
    pub run_as: Option<RunAs>,
}

/// Why a restore failed; nothing of the snapshot is left running in any case.
#[derive(Debug, Error)]
pub enum RestoreError {
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("cannot read snapshot {name:?} from the pool")]
    Pool {
        name: String,
        #[source]
        source: ClientError,
    },
    #[error("snapshot {name:?} is corrupt in the pool; refusing to restore it")]
    Corrupt {
        name: String,
        #[source]
        source: ClientError,
    },
    #[error("pid {pid} ({comm}) is still in use after {waited:?}; the snapshot's process tree needs it back")]
    PidBusy {
        pid: i32,
        comm: String,
        waited: Duration,
    },
    #[error("preparing CRIU's work directory failed")]
    WorkDir(#[source] io::Error),
    #[error("CRIU could not restore snapshot {name:?}. CRIU's log ({log_path}) says:\n{log}")]
    CriuFailed {
        name: String,
        log: String,
        log_path: PathBuf,
    },
    #[error("talking to CRIU failed")]
    Stream(#[source] io::Error),
    #[error("CRIU restored {name:?} but wrote no PID file")]
    NoPid { name: String },
    #[error("CRIU's PID file for {name:?} names pid {pid}, which does not run as uid {uid}; refusing to trust it")]
    UntrustedPid { name: String, pid: i32, uid: u32 },
}

/// Restores generation `generation` (the newest when `None`) of `name` from the pool.
pub fn restore_from_pool(
    criu: &CriuBinary,
    name: &str,
    generation: Option<u64>,
    pool: &PoolTarget,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let start = Instant::now();
    let pool_err = |source| RestoreError::Pool {
        name: name.to_string(),
        source,
    };
    let mut client = pool.connect().map_err(pool_err)?;
    let manifest = Arc::new(client.manifest(name, generation).map_err(pool_err)?);
    // In a fresh PID namespace the old host PIDs are not needed back.
    let pid_namespace = manifest.meta.pid_namespace;
    let pid_wait_s = if pid_namespace {
        0.0
    } else {
        procs::wait_pids_free(&manifest.meta.pids, opts.pid_wait).map_err(|pid| {
            RestoreError::PidBusy {
                pid,
                comm: procs::comm(pid),
                waited: opts.pid_wait,
            }
        })?;
        start.elapsed().as_secs_f64()
    };
    let run_as = match opts.run_as {
        CriuIdentity::Auto => manifest.meta.run_as,
        CriuIdentity::Current => None,
        CriuIdentity::User(who) => Some(who),
    };

    let work = tempfile::Builder::new()
        .prefix("torpor-restore-")
        .tempdir_in(&opts.work_root)
        .map_err(RestoreError::WorkDir)?;
    let listener = streamer::bind(work.path(), SERVE_SOCKET).map_err(RestoreError::WorkDir)?;
    // CRIU's own output goes where the identity it runs as may write.
    let out_dir = match run_as {
        Some(who) => identity::open_to(work.path(), &[&work.path().join(SERVE_SOCKET)], &[], who)
            .map_err(RestoreError::WorkDir)?,
        None => work.path().to_path_buf(),
    };
    let log_path = out_dir.join("restore.log");
    let pidfile = out_dir.join("root.pid");
    let command = |cgroups_ignored: bool| {
        let mut cmd = criu.command();
        cmd.arg("restore")
            .arg("--images-dir")
            .arg(work.path())
            .arg("--stream")
            .arg("--restore-detached")
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--log-file")
            .arg(&log_path)
            .arg("-v4");
        cmd.arg(opts.tcp.criu_flag());
        if opts.shell_job {
            cmd.arg("--shell-job");
        }
        if cgroups_ignored {
            cmd.arg("--manage-cgroups=ignore");
        }
        if let Some(who) = run_as {
            identity::run_as(&mut cmd, who);
        }
        cmd
    };
    let into_cgroup = match (&opts.cgroup, run_as) {
        (Some(dir), None) => open_cgroup2(dir),
        _ => None,
    };
    let spawned = into_cgroup.and_then(|cgroup| {
        spawn_into_cgroup(&command(true), cgroup.as_fd())
            // E.g. a kernel without clone3 or CLONE_INTO_CGROUP (< 5.7): CRIU moves the tree.
            .inspect_err(|e| debug!(error = %e, "cannot start CRIU in the tree's cgroup"))
            .ok()
    });
    let mut child = match spawned {
        Some(pid) => Criu::InCgroup(pid),
        None => Criu::Child(criu.spawn(&mut command(false))?),
    };
    debug!(
        name,
        generation = manifest.generation,
        ?run_as,
        pid_namespace,
        "criu restore started"
    );

    let server = Arc::new(FileServer {
        pool: pool.clone(),
        manifest: manifest.clone(),
        idle: Mutex::new(vec![client]),
        error: Mutex::new(None),
        bytes: Default::default(),
    });
    let criu_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let serve_thread = {
        let (server, criu_done, criu_pid) = (server.clone(), criu_done.clone(), child.id());
        thread::spawn(move || -> io::Result<()> {
            let alive = || !criu_done.load(std::sync::atomic::Ordering::SeqCst);
            match streamer::accept_while(&listener, criu_pid, alive)? {
                Some(mut sock) => server.serve(&mut sock),
                None => Ok(()),
            }
        })
    };
    let succeeded = child.wait().map_err(RestoreError::Stream)?;
    criu_done.store(true, std::sync::atomic::Ordering::SeqCst);
    let served = serve_thread.join().expect("serve thread panicked");
    let restore_s = start.elapsed().as_secs_f64();

    let fetch_error = server.error.lock().expect("error lock").take();
    // A namespace's init dies with its namespace and the old host PIDs are not its.
    if (fetch_error.is_some() || !succeeded) && !pid_namespace {
        procs::reap_failed_restore(&manifest.meta.pids, Duration::from_secs(2));
    }
    if let Some(e) = fetch_error {
        return Err(if e.pool_code() == Some(ErrorCode::Corrupt) {
            RestoreError::Corrupt {
                name: name.to_string(),
                source: e,
            }
        } else {
            pool_err(e)
        });
    }
    if !succeeded {
        let log_path = keep_log(&log_path, "restore", name);
        return Err(RestoreError::CriuFailed {
            name: name.to_string(),
            log: log_tail(&log_path, 12),
            log_path,
        });
    }
    served.map_err(RestoreError::Stream)?;
    let pid = read_no_follow(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .ok_or_else(|| RestoreError::NoPid {
            name: name.to_string(),
        })?;
    // A pid file CRIU wrote as `who` is in `who`'s reach too: it must name a process of `who`
    // (or one already gone), or its reader could be made to signal anyone.
    if let Some(who) = run_as {
        if procs::task_ids(pid).is_some_and(|t| t.uids != [who.uid; 4]) {
            return Err(RestoreError::UntrustedPid {
                name: name.to_string(),
                pid,
                uid: who.uid,
            });
        }
    }
    let bytes_fetched = server.bytes.load(std::sync::atomic::Ordering::SeqCst);
    info!(
        name,
        generation = manifest.generation,
        pid,
        secs = restore_s,
        "restored"
    );
    Ok(RestoreReport {
        name: name.to_string(),
        generation: manifest.generation,
        pid,
        restore_s,
        pid_wait_s,
        bytes_fetched,
        run_as,
    })
}

/// Answers CRIU's requests from one snapshot in the pool.
struct FileServer {
    pool: PoolTarget,
    manifest: Arc<Manifest>,
    /// Authenticated connections not in use; each file in flight takes one.
    idle: Mutex<Vec<PoolClient>>,
    /// First failure while fetching; CRIU then sees a short image and fails.
    error: Mutex<Option<ClientError>>,
    bytes: std::sync::atomic::AtomicU64,
}

impl FileServer {
    fn serve(self: &Arc<Self>, sock: &mut UnixStream) -> io::Result<()> {
        let mut streams: Vec<JoinHandle<()>> = Vec::new();
        // Holds one small file at a time; reused, so its memory is touched once.
        let mut buf = Vec::new();
        while let Some(file) = streamer::read_request(sock)? {
            let size = self.manifest.file(&file).map(|f| f.size);
            streamer::send_reply(sock, size.is_some())?;
            let Some(size) = size else {
                continue;
            };
            let pipe = streamer::recv_pipe(sock)?;
            if size <= streamer::pipe_capacity(pipe.as_fd()) as u64 {
                self.write_whole(&file, pipe, &mut buf);
            } else {
                let me = self.clone();
                streams.push(thread::spawn(move || me.stream(&file, pipe)));
            }
        }
        for f in streams {
            let _ = f.join();
        }
        Ok(())
    }

    /// An idle authenticated connection, or a new one.
    fn client(&self) -> Option<PoolClient> {
        let idle = self.idle.lock().expect("idle lock").pop();
        match idle.map_or_else(|| self.pool.connect(), Ok) {
            Ok(c) => Some(c),
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    /// Fetches a file no larger than `pipe`'s capacity whole, then writes it in one go: into a
    /// pipe nobody else writes to, that cannot block, whatever CRIU reads meanwhile.
    fn write_whole(&self, file: &str, pipe: OwnedFd, buf: &mut Vec<u8>) {
        let Some(mut client) = self.client() else {
            return;
        };
        buf.clear();
        let got = client.get_file(&self.manifest.name, self.manifest.generation, file, |b| {
            buf.extend_from_slice(b);
            Ok(())
        });
        match got {
            Ok(n) => {
                self.idle.lock().expect("idle lock").push(client);
                match std::fs::File::from(pipe).write_all(buf) {
                    Ok(()) => {
                        self.bytes.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                    }
                    // CRIU stopped reading: its own log says why.
                    Err(e) => debug!(file, error = %e, "CRIU closed its pipe early"),
                }
            }
            Err(e) => self.fail(e),
        }
    }

    /// Streams a file larger than the pipe into it as it arrives from the pool.
    fn stream(&self, file: &str, pipe: OwnedFd) {
        let Some(mut client) = self.client() else {
            return;
        };
        let result = client.get_file_into_pipe(
            &self.manifest.name,
            self.manifest.generation,
            file,
            pipe.as_fd(),
        );
        match result {
            Ok(n) => {
                self.bytes.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                self.idle.lock().expect("idle lock").push(client);
            }
            // CRIU stopped reading: its own log says why; this connection is mid-file, drop it.
            Err(ClientError::Sink(e)) => debug!(file, error = %e, "CRIU closed its pipe early"),
            Err(e) => self.fail(e),
        }
    }

    fn fail(&self, e: ClientError) {
        self.error.lock().expect("error lock").get_or_insert(e);
    }
}

/// CRIU while it runs.
enum Criu {
    Child(std::process::Child),
    /// Started by [`spawn_into_cgroup`].
    InCgroup(Pid),
}

impl Criu {
    fn id(&self) -> u32 {
        match self {
            Criu::Child(c) => c.id(),
            Criu::InCgroup(pid) => pid.as_raw() as u32,
        }
    }

    /// Waits for CRIU's exit; whether it succeeded.
    fn wait(&mut self) -> io::Result<bool> {
        match self {
            Criu::Child(c) => Ok(c.wait()?.success()),
            Criu::InCgroup(pid) => loop {
                match waitpid(*pid, None) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(code == 0),
                    Ok(WaitStatus::Signaled(..)) => return Ok(false),
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            },
        }
    }
}

/// `clone3(2)`'s arguments (`struct clone_args`, linux/sched.h) up to `cgroup`.
#[cfg(target_arch = "x86_64")]
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

#[cfg(target_arch = "x86_64")]
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// The child's stack until it execs.
#[cfg(target_arch = "x86_64")]
const CHILD_STACK: usize = 64 << 10;

/// `dir` opened, when it is a cgroup v2 directory.
fn open_cgroup2(dir: &std::path::Path) -> Option<OwnedFd> {
    let fd = OwnedFd::from(std::fs::File::open(dir).ok()?);
    let fs = nix::sys::statfs::fstatfs(&fd).ok()?;
    (fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC).then_some(fd)
}

/// What the child needs until it execs, all prepared before the clone.
#[cfg(target_arch = "x86_64")]
struct ExecData {
    program: *const nix::libc::c_char,
    argv: *const *const nix::libc::c_char,
    envp: *const *const nix::libc::c_char,
    null: i32,
    report: i32,
}

/// Runs `cmd` (program, arguments, environment changes; stdio on /dev/null, as
/// [`CriuBinary::spawn`] does) as a new process that starts in `cgroup`: placed there by
/// `clone3`, not moved, so nothing waits for the grace period a move costs. Like
/// `posix_spawn`, the child borrows this process's memory until it execs (`CLONE_VM |
/// CLONE_VFORK`, on a stack of its own): a copy of the agent's address space (a fork) costs
/// more than the move it saves.
#[cfg(target_arch = "x86_64")]
fn spawn_into_cgroup(cmd: &std::process::Command, cgroup: BorrowedFd<'_>) -> io::Result<Pid> {
    use nix::{
        libc,
        sys::signal::{pthread_sigmask, SigSet, SigmaskHow},
    };
    use std::{
        ffi::{CString, OsString},
        os::unix::ffi::OsStrExt,
        ptr,
    };
    let cstr =
        |b: &[u8]| CString::new(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    let program = cstr(cmd.get_program().as_bytes())?;
    let mut args = vec![program.clone()];
    for a in cmd.get_args() {
        args.push(cstr(a.as_bytes())?);
    }
    let mut vars: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => vars.insert(k.to_owned(), v.to_owned()),
            None => vars.remove(k),
        };
    }
    let env = vars
        .iter()
        .map(|(k, v)| cstr(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<io::Result<Vec<_>>>()?;
    let argv: Vec<*const libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain([ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain([ptr::null()])
        .collect();
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    // The child reports a failed exec through this pipe, before this thread resumes.
    let (report_rd, report_wr) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    let data = ExecData {
        program: program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        null: null.as_raw_fd(),
        report: report_wr.as_raw_fd(),
    };
    // 16-byte elements: the stack's top is aligned as the ABI wants.
    let mut stack = vec![0u128; CHILD_STACK / 16];
    let mut clone_args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.as_mut_ptr() as u64,
        stack_size: (stack.len() * 16) as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..Default::default()
    };
    // No signal handler may run in the child (it shares this memory) before it resets them.
    let mut mask = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut mask),
    )?;
    let ret: isize;
    // SAFETY: the child starts on `stack` with `data` and runs `exec_child`, which never
    // returns; this thread is suspended until the child has exec'd or exited (CLONE_VFORK),
    // so everything the child reads stays alive. `syscall` clobbers only rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 as isize => ret,
            in("rdi") &mut clone_args as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") &data as *const ExecData,
            in("r13") exec_child as extern "C" fn(*const ExecData) -> !,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    // Restoring the mask this thread had cannot fail.
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&mask), None);
    drop(stack);
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    let pid = Pid::from_raw(ret as i32);
    let mut report = [0u8; 4];
    if nix::unistd::read(report_rd.as_raw_fd(), &mut report) == Ok(report.len()) {
        let _ = waitpid(pid, None);
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(report)));
    }
    Ok(pid)
}

#[cfg(not(target_arch = "x86_64"))]
fn spawn_into_cgroup(_: &std::process::Command, _: BorrowedFd<'_>) -> io::Result<Pid> {
    Err(io::Error::from_raw_os_error(nix::libc::ENOSYS))
}

/// The child of [`spawn_into_cgroup`]: it shares the parent's memory and runs on its own
/// stack, so only async-signal-safe calls, no allocation, no unwinding, until exec.
#[cfg(target_arch = "x86_64")]
extern "C" fn exec_child(data: *const ExecData) -> ! {
    use nix::libc;
    // SAFETY: `data` points to the suspended parent's ExecData; every pointer in it is valid
    // until this process execs or exits.
    unsafe {
        let d = &*data;
        // The signal dispositions are this process's own copy: back to the defaults for every
        // caught signal and SIGPIPE (as std's spawn does), then no signal blocked.
        for sig in 1..=libc::SIGRTMAX() {
            let mut act: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut act) == 0
                && (act.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
                && act.sa_sigaction != libc::SIG_DFL
            {
                act.sa_sigaction = libc::SIG_DFL;
                act.sa_flags = 0;
                libc::sigaction(sig, &act, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        if libc::dup2(d.null, 0) >= 0
            && libc::dup2(d.null, 1) >= 0
            && libc::dup2(d.null, 2) >= 0
            && libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) == 0
        {
            libc::execve(d.program, d.argv, d.envp);
        }
        let errno = *libc::__errno_location();
        libc::write(
            d.report,
            (&errno as *const i32).cast(),
            std::mem::size_of::<i32>(),
        );
        libc::_exit(127)
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use std::{path::Path, process::Command};

    /// Where the unified hierarchy is mounted whole, and this process's cgroup in it.
    fn own_cgroup2() -> Option<(PathBuf, String)> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = mounts.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            (right.starts_with("cgroup2 ") && f.get(3) == Some(&"/")).then(|| PathBuf::from(f[4]))
        })?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some((mount, path.trim_end_matches('/').to_string()))
    }

    #[test]
    fn a_process_starts_inside_the_cgroup_with_its_arguments_and_environment() {
        let Some((mount, own)) = own_cgroup2() else {
            eprintln!("no cgroup v2 hierarchy here: nothing to test");
            return;
        };
        let cgroup = format!("{own}/torpor-test-{}", std::process::id());
        let dir = mount.join(cgroup.trim_start_matches('/'));
        std::fs::create_dir(&dir).unwrap();
        let fd = open_cgroup2(&dir).expect("a cgroup v2 directory");
        let inside = format!("0::{cgroup}");
        let run = |cmd: &Command| {
            let mut child = Criu::InCgroup(spawn_into_cgroup(cmd, fd.as_fd()).unwrap());
            child.wait().unwrap()
        };
        let mut check = Command::new("/bin/sh");
        check
            .args([
                "-c",
                r#"test "$1" = 'two words' && test "$TORPOR_TEST" = yes && grep -qxF "$2" /proc/self/cgroup"#,
                "sh",
                "two words",
            ])
            .arg(&inside)
            .env("TORPOR_TEST", "yes");
        let placed = run(&check);
        let failed = run(Command::new("/bin/sh").args(["-c", "exit 3"]));
        let missing = spawn_into_cgroup(&Command::new("/nonexistent/criu"), fd.as_fd());
        std::fs::remove_dir(&dir).unwrap();
        assert!(
            placed,
            "arguments, environment and cgroup ({inside}) as given"
        );
        assert!(!failed, "an exit status other than 0 is a failure");
        assert_eq!(missing.unwrap_err().raw_os_error(), Some(nix::libc::ENOENT));
    }

    #[test]
    fn only_a_cgroup2_directory_is_used() {
        assert!(open_cgroup2(Path::new("/tmp")).is_none());
        assert!(open_cgroup2(Path::new("/nonexistent")).is_none());
    }
}
