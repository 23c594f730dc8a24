//! Real processes for experiments and tests: a pool server (`torpor pool`, locally or inside
//! a network [`Fabric`]), sample services, and reaping of restored trees. The caller becomes a child subreaper, so a tree CRIU
//! restores (detached) is re-parented to it and can be reaped at once instead of lingering as
//! a zombie that would block the next restore of the same PID.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::{
        signal::{kill, Signal},
        wait::waitpid,
    },
    unistd::Pid,
};
use torpor_criu::{CriuBinary, PoolTarget, Pools};
use torpor_image::NodeKey;
use torpor_pool::{ClientTls, PoolAddr};

use crate::{
    fabric::{Fabric, FabricProfile, FabricReport},
    ExperimentError,
};

/// CRIU's kernel-feature cache for the run, for stock CRIU and torpor alike (as a host whose
/// /run is a tmpfs has it); `None`, said on stderr, when it cannot be provided.
pub fn criu_cache(criu: &CriuBinary) -> Option<torpor_criu::kdat::KdatCache> {
    torpor_criu::kdat::KdatCache::provide(criu)
        .inspect_err(|e| {
            eprintln!(
                "CRIU's kernel-feature cache is unavailable ({}); every CRIU start probes the kernel",
                torpor_pool::error_chain(e)
            )
        })
        .ok()
}

/// Makes this process the reaper of orphaned descendants (restored trees).
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Kills a process (restored, so not a `Child` handle) and reaps it if it is ours.
pub fn kill_and_reap(pid: i32) {
    let p = Pid::from_raw(pid);
    let _ = kill(p, Signal::SIGKILL);
    if waitpid(p, None).is_err() {
        // Not our child: wait for whoever reaps it.
        let _ = torpor_criu::procs::wait_pids_free(&[pid], Duration::from_secs(5));
    }
}

/// A sample service started as a child.
#[derive(Debug)]
pub struct SampleProcess {
    child: Option<Child>,
    pub pid: i32,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl SampleProcess {
    /// Starts `exe sample-service` holding `memory` seeded bytes and waits until it listens.
    pub fn spawn(exe: &Path, memory: u64, seed: u64) -> io::Result<SampleProcess> {
        let dir = tempfile::tempdir()?;
        let port_file = dir.path().join("port");
        let mut cmd = Command::new(exe);
        // CRIU dumps a tree whose root leads its own session (else it needs --shell-job).
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::unistd::setsid().map(|_| ()).map_err(io::Error::from)
            });
        }
        let child = cmd
            .args(["sample-service", "--listen", "127.0.0.1:0"])
            .arg("--memory")
            .arg(memory.to_string())
            .arg("--seed")
            .arg(seed.to_string())
            .arg("--port-file")
            .arg(&port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let pid = child.id() as i32;
        let mut me = SampleProcess {
            child: Some(child),
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            _dir: dir,
        };
        // Filling a GiB of random bytes takes a while on a small VM.
        let port = torpor_workload::wait_port_file(&port_file, Duration::from_secs(120))?;
        me.addr.set_port(port);
        Ok(me)
    }

    /// Reaps the child after CRIU killed it, freeing its PID at once.
    pub fn reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for SampleProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `torpor pool` server with a fresh token: on a private Unix socket, or, on a rate
/// [`FabricProfile`], inside a [`Fabric`] of its own, over TCP with TLS (a certificate made
/// for the run, pinned by the client) as a remote pool would be reached.
#[derive(Debug)]
pub struct PoolProcess {
    child: Child,
    pub target: PoolTarget,
    /// The pool with a key made for this run, for sealed checkpoints and restores.
    pub pools: Pools,
    /// How long the pool took to start (pre-faulting its RAM tier).
    pub startup: Duration,
    /// The profile and, on a network fabric, what its link achieved before the pool started.
    pub fabric_report: FabricReport,
    dir: tempfile::TempDir,
    /// Torn down after the pool is stopped (fields drop after `Drop::drop` ran).
    fabric: Option<Fabric>,
}

impl PoolProcess {
    pub fn spawn(exe: &Path, capacity: u64) -> io::Result<PoolProcess> {
        PoolProcess::spawn_spilling(exe, capacity, None)
    }

    /// A pool whose RAM tier spills to `spill_dir` when full.
    pub fn spawn_spilling(
        exe: &Path,
        capacity: u64,
        spill_dir: Option<&Path>,
    ) -> io::Result<PoolProcess> {
        match PoolProcess::spawn_on(exe, capacity, spill_dir, FabricProfile::Local) {
            Ok(p) => Ok(p),
            Err(ExperimentError::Io(e)) => Err(e),
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }

    /// A pool reached through `profile`: on a Unix socket for `local`; otherwise the fabric
    /// is built and measured first, then the pool starts inside it.
    pub fn spawn_on(
        exe: &Path,
        capacity: u64,
        spill_dir: Option<&Path>,
        profile: FabricProfile,
    ) -> Result<PoolProcess, ExperimentError> {
        let dir = tempfile::tempdir()?;
        let token = torpor_pool::random_token();
        let token_file = dir.path().join("token");
        torpor_pool::write_token_file(&token_file, &token)?;
        let (fabric, fabric_report) = match profile {
            FabricProfile::Local => (None, FabricReport::local()),
            _ => {
                let fabric = Fabric::create(profile)?;
                let measured = fabric.measure()?;
                (Some(fabric), FabricReport::measured(profile, &measured))
            }
        };
        let (mut cmd, target) = match &fabric {
            None => {
                let sock = dir.path().join("pool.sock");
                let mut cmd = Command::new(exe);
                cmd.arg("pool")
                    .arg("--listen")
                    .arg(format!("unix:{}", sock.display()));
                (cmd, PoolTarget::new(PoolAddr::Unix(sock), token))
            }
            Some(fabric) => {
                let addr = fabric.pool_addr();
                let tls = torpor_pool::tls::generate(
                    &dir.path().join("tls"),
                    &[addr.ip().to_string()],
                    false,
                )?;
                let mut cmd = fabric.command(exe)?;
                cmd.arg("pool")
                    .arg("--listen")
                    .arg(addr.to_string())
                    .arg("--tls-cert")
                    .arg(&tls.pool_cert)
                    .arg("--tls-key")
                    .arg(&tls.pool_key);
                let client_tls = ClientTls::pinned(&tls.pool_cert, None)?;
                let target = PoolTarget::new(PoolAddr::Tcp(addr.to_string()), token)
                    .with_tls(Some(client_tls));
                (cmd, target)
            }
        };
        let started = Instant::now();
        let mut child = cmd
            .arg("--capacity")
            .arg(capacity.to_string())
            .arg("--token-file")
            .arg(&token_file)
            .arg("--keep")
            .arg("1")
            .args(
                spill_dir
                    .map(|d| ["--spill-dir".as_ref(), d.as_os_str()])
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while target.connect().is_err() {
            let exited = child.try_wait()?;
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    match exited {
                        Some(status) => format!("pool exited at start ({status})"),
                        None => "pool did not start".to_string(),
                    },
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let pools = Pools::single(target.clone(), std::sync::Arc::new(NodeKey::generate()));
        Ok(PoolProcess {
            child,
            target,
            pools,
            startup: started.elapsed(),
            fabric_report,
            dir,
            fabric,
        })
    }

    /// The fabric the pool runs in (`None` for the local profile), for commands and sockets
    /// that should sit beside it.
    pub fn fabric(&self) -> Option<&Fabric> {
        self.fabric.as_ref()
    }

    /// Kills the pool with SIGKILL (a crash: its RAM tier is gone) and reaps it.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Where the token is, for commands that take `--token-file`.
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// The pool process's PID (for its CPU time).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for PoolProcess {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// Lowest port [`own_addr`] hands out.
const PORT_FLOOR: u16 = 10_000;

/// The next port [`own_addr`] tries.
static NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(PORT_FLOOR);

/// A loopback address for a process that binds it itself (a service's backend, a gate that
/// keeps its address across restarts), where a listener bound on port 0 cannot be handed over.
/// Its IP is this process's own, 127.(1 + pid / 65536).(pid / 256 % 256).(pid % 256) (all of
/// 127/8 is loopback), and its ports count up from [`PORT_FLOOR`] below the kernel's
/// ephemeral range (`ip_local_port_range`), so no other test or experiment can draw it, nor an
/// outgoing connection take it, before the process binds it. A port another program holds on
/// every address (0.0.0.0) is passed over.
pub fn own_addr() -> io::Result<SocketAddr> {
    let pid = std::process::id();
    let ip = std::net::Ipv4Addr::new(127, 1 + (pid >> 16) as u8, (pid >> 8) as u8, pid as u8);
    let ceiling = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    loop {
        let port = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !(PORT_FLOOR..ceiling).contains(&port) {
            return Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("no port left below {ceiling} on {ip}"),
            ));
        }
        let addr = SocketAddr::from((ip, port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
}

/// Time from `since` until the sample service at `addr` answers PING on a new connection.
pub fn first_response(addr: SocketAddr, since: Instant) -> io::Result<Duration> {
    let mut c = torpor_workload::SampleClient::connect_within(addr, Duration::from_secs(30))?;
    let pong = c.call("PING")?;
    if pong != "PONG" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("PING answered {pong:?}"),
        ));
    }
    Ok(since.elapsed())
}

/// Sends one command to a Redis server (RESP) and returns the first line of its answer.
pub fn redis_command(addr: SocketAddr, args: &[&str]) -> io::Result<String> {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
    }
    s.write_all(req.as_bytes())?;
    let mut reader = io::BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // A bulk string's value is on the next line.
    if line.starts_with('$') && !line.starts_with("$-1") {
        line.clear();
        reader.read_line(&mut line)?;
    }
    Ok(line.trim_end().to_string())
}
