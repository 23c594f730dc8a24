//! A network fabric on this machine, so a benchmark can reach its pool as if it were remote:
//! a network namespace of our own joined to the root namespace by a veth pair, each end
//! shaped by a `tbf` qdisc to a profile's rate (10 or 25 Gbit/s). [`Fabric`] owns that
//! namespace, the pair and the qdiscs, runs commands and sockets inside, measures what the
//! link achieves, and tears it all down on drop, on error and when this process dies
//! (Ctrl-C, a panic, even SIGKILL) through a janitor process. It touches nothing else: no
//! iptables, no sysctls, no other interface.

use std::{
    ffi::OsStr,
    fs::File,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::sched::{setns, CloneFlags};
use serde::Serialize;
use thiserror::Error;

/// Where a benchmark's pool is and what carries its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum FabricProfile {
    /// The pool process on this host, on a Unix socket: no network at all.
    #[value(name = "local")]
    #[serde(rename = "local")]
    Local,
    /// The pool in its own network namespace, over TCP and TLS on a 10 Gbit/s link.
    #[value(name = "10gbit")]
    #[serde(rename = "10gbit")]
    Gbit10,
    /// The pool in its own network namespace, over TCP and TLS on a 25 Gbit/s link.
    #[value(name = "25gbit")]
    #[serde(rename = "25gbit")]
    Gbit25,
}

impl FabricProfile {
    /// The link's rate limit; `None` for [`FabricProfile::Local`].
    pub fn rate_bits_per_s(self) -> Option<u64> {
        match self {
            FabricProfile::Local => None,
            FabricProfile::Gbit10 => Some(10_000_000_000),
            FabricProfile::Gbit25 => Some(25_000_000_000),
        }
    }

    /// The name on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FabricProfile::Local => "local",
            FabricProfile::Gbit10 => "10gbit",
            FabricProfile::Gbit25 => "25gbit",
        }
    }
}

impl std::fmt::Display for FabricProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a fabric could not be built, entered or measured.
#[derive(Debug, Error)]
pub enum FabricError {
    #[error("the {0} profile has no network fabric (its pool is on a Unix socket)")]
    Unshaped(FabricProfile),
    #[error("`{0}` is not installed (it comes with iproute2: apt-get install iproute2)")]
    MissingTool(&'static str),
    #[error("the kernel lacks {0}")]
    MissingKernel(&'static str),
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("no free /30 left in {SUBNET_BASE}/16 for the veth pair")]
    NoSubnet,
    #[error("cannot enter network namespace {name}")]
    Enter {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("measuring the fabric failed")]
    Measure(#[source] io::Error),
}

/// The /16 our /30s come from: private, and unused on these machines (their one interface
/// is in 192.0.2.0/24); every candidate is checked against the host's addresses and routes.
const SUBNET_BASE: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 0);

/// The port a pool listens on inside the namespace. Fixed, because the namespace is new and
/// ours: nothing else listens in it.
pub const POOL_PORT: u16 = 7070;

/// Token-bucket depth in time at the link rate: 1 ms (1.25 MB at 10 Gbit/s). tbf refills
/// from an hrtimer, and on a busy 2-vCPU guest its wake-ups come late by tens to hundreds of
/// microseconds: a shallower bucket runs dry between wake-ups and the link falls below its
/// rate. A deeper one lets a transfer start at memory speed for longer (1 ms is 2 % of a
/// 64 MiB snapshot at 10 Gbit/s). It is also far above a GSO packet (64 KiB), so tbf never
/// has to split one.
const BURST: Duration = Duration::from_millis(1);

/// How long a packet may wait in the tbf queue before it is dropped: 1 ms, a switch port's
/// buffer rather than a bufferbloated one. One TCP flow keeps less queued than that (TCP
/// small queues), so the benchmark's flows are not dropped, yet the round trip under load
/// stays near what a datacenter link shows.
const QUEUE_LATENCY: &str = "1ms";

/// Bytes per second of a bulk transfer [`Fabric::measure`] sends per bit per second of the
/// rate: half a second's worth, long enough that the bucket's first burst is noise (0.2 %).
const MEASURE_SECONDS: f64 = 0.5;

/// Round trips [`Fabric::measure`] times; the median is reported.
const RTT_ROUNDS: usize = 200;

/// Distinguishes fabrics of one process.
static NEXT_FABRIC: AtomicU32 = AtomicU32::new(0);

/// The shell script of the janitor: it waits until its stdin (a pipe whose only writer is
/// the fabric's owner) reaches end of file, which happens when the owner drops the fabric
/// or dies in any way, then kills what runs in the namespace and deletes the veth pair and
/// the namespace. Arguments: ip binary, namespace, host-side link.
const JANITOR: &str = r#"read -r _
for p in $("$1" netns pids "$2" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
"$1" link del "$3" 2>/dev/null
"$1" netns del "$2" 2>/dev/null
exit 0"#;

/// What [`Fabric::measure`] found: the link's throughput for one bulk TCP flow from the root
/// namespace into ours, and its idle round trip.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FabricMeasurement {
    /// Bytes sent in the bulk transfer.
    pub bytes: u64,
    pub achieved_bits_per_s: f64,
    /// Median of one-byte TCP ping-pongs.
    pub rtt_s: f64,
}

/// The `"fabric"` record of a benchmark's report: the profile, its rate and what the link
/// achieved when measured (nothing to measure for `local`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FabricReport {
    pub profile: FabricProfile,
    pub rate_bits_per_s: Option<u64>,
    pub rtt_s: Option<f64>,
    pub achieved_bits_per_s: Option<f64>,
    /// How clients reach the pool: `unix` (local) or `tls` (TCP over the fabric).
    pub transport: &'static str,
}

impl FabricReport {
    /// The local profile: a Unix socket, nothing measured.
    pub fn local() -> FabricReport {
        FabricReport {
            profile: FabricProfile::Local,
            rate_bits_per_s: None,
            rtt_s: None,
            achieved_bits_per_s: None,
            transport: "unix",
        }
    }

    /// A rate profile as measured; the pool is reached over TLS.
    pub fn measured(profile: FabricProfile, m: &FabricMeasurement) -> FabricReport {
        FabricReport {
            profile,
            rate_bits_per_s: profile.rate_bits_per_s(),
            rtt_s: Some(m.rtt_s),
            achieved_bits_per_s: Some(m.achieved_bits_per_s),
            transport: "tls",
        }
    }
}

impl std::fmt::Display for FabricReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.rate_bits_per_s, self.achieved_bits_per_s, self.rtt_s) {
            (Some(rate), Some(got), Some(rtt)) => write!(
                f,
                "fabric {}: veth limited to {:.1} Gbit/s (tbf), one TCP flow achieved {:.2} Gbit/s, round trip {:.0} µs; pool over TCP with TLS",
                self.profile,
                rate as f64 / 1e9,
                got / 1e9,
                rtt * 1e6
            ),
            _ => write!(f, "fabric {}: pool on a Unix socket on this host", self.profile),
        }
    }
}

/// The janitor process and the pipe whose end of file starts its clean-up.
#[derive(Debug)]
struct Janitor {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// A network namespace of our own joined to the root namespace by a shaped veth pair.
#[derive(Debug)]
pub struct Fabric {
    profile: FabricProfile,
    rate_bits_per_s: u64,
    ip: PathBuf,
    name: String,
    host_link: String,
    inside_link: String,
    host_addr: Ipv4Addr,
    inside_addr: Ipv4Addr,
    /// Open while the fabric lives: what [`Fabric::command`] and [`Fabric::inside`] enter.
    netns: Option<File>,
    janitor: Option<Janitor>,
}

impl Fabric {
    /// Builds the fabric of a rate profile: namespace `torpor-fabric-<pid>-<n>`, veth pair
    /// `tf<pid>-<n>h` (root namespace) and `tf<pid>-<n>n` (inside, beside a loopback that
    /// is up) on a /30 from 10.213.0.0/16, and a tbf qdisc on both ends. Whatever was built
    /// is removed again if a later step fails.
    pub fn create(profile: FabricProfile) -> Result<Fabric, FabricError> {
        Fabric::create_with_tools(profile, std::env::var_os("PATH").as_deref())
    }

    fn create_with_tools(
        profile: FabricProfile,
        path: Option<&OsStr>,
    ) -> Result<Fabric, FabricError> {
        let rate = profile
            .rate_bits_per_s()
            .ok_or(FabricError::Unshaped(profile))?;
        let ip = find_tool("ip", path)?;
        let tc = find_tool("tc", path)?;
        if !Path::new("/proc/self/ns/net").exists() {
            return Err(FabricError::MissingKernel(
                "network namespaces (CONFIG_NET_NS)",
            ));
        }
        let (pid, n) = (
            std::process::id(),
            NEXT_FABRIC.fetch_add(1, Ordering::Relaxed),
        );
        let name = format!("torpor-fabric-{pid}-{n}");
        let host_link = format!("tf{pid}-{n}h");
        let inside_link = format!("tf{pid}-{n}n");
        // The janitor first: from here on, whatever happens to us, it removes what we build.
        let janitor = spawn_janitor(&ip, &name, &host_link)?;
        let mut fabric = Fabric {
            profile,
            rate_bits_per_s: rate,
            ip: ip.clone(),
            name,
            host_link,
            inside_link,
            host_addr: Ipv4Addr::UNSPECIFIED,
            inside_addr: Ipv4Addr::UNSPECIFIED,
            netns: None,
            janitor: Some(janitor),
        };
        let block = free_block(&ip, pid, n)?;
        fabric.host_addr = block_addr(block, 1);
        fabric.inside_addr = block_addr(block, 2);
        fabric.build(&tc)?;
        Ok(fabric)
    }

    fn build(&mut self, tc: &Path) -> Result<(), FabricError> {
        let (ip, ns) = (self.ip.as_path(), self.name.as_str());
        run(ip, &["netns", "add", ns])?;
        run(
            ip,
            &[
                "link",
                "add",
                &self.host_link,
                "type",
                "veth",
                "peer",
                "name",
                &self.inside_link,
                "netns",
                ns,
            ],
        )
        .map_err(|e| missing_kernel(e, "Unknown device type", "veth (CONFIG_VETH)"))?;
        let host = format!("{}/30", self.host_addr);
        let inside = format!("{}/30", self.inside_addr);
        run(ip, &["addr", "add", &host, "dev", &self.host_link])?;
        run(
            ip,
            &["-n", ns, "addr", "add", &inside, "dev", &self.inside_link],
        )?;
        run(ip, &["-n", ns, "link", "set", "lo", "up"])?;
        run(ip, &["-n", ns, "link", "set", &self.inside_link, "up"])?;
        run(ip, &["link", "set", &self.host_link, "up"])?;
        let rate = format!("{}bit", self.rate_bits_per_s);
        let burst = ((self.rate_bits_per_s / 8) as f64 * BURST.as_secs_f64()).round() as u64;
        let burst = burst.to_string();
        let shape = |prefix: &[&str], dev: &str| {
            let mut args = prefix.to_vec();
            args.extend([
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &rate,
                "burst",
                &burst,
                "latency",
                QUEUE_LATENCY,
            ]);
            run(tc, &args).map_err(|e| {
                missing_kernel(
                    e,
                    "qdisc kind is unknown",
                    "the tbf qdisc (CONFIG_NET_SCH_TBF)",
                )
            })
        };
        shape(&[], &self.host_link)?;
        shape(&["-n", ns], &self.inside_link)?;
        let path = Path::new("/run/netns").join(ns);
        self.netns = Some(File::open(&path).map_err(|source| FabricError::Enter {
            name: self.name.clone(),
            source,
        })?);
        Ok(())
    }

    pub fn profile(&self) -> FabricProfile {
        self.profile
    }

    /// The rate both veth ends are limited to.
    pub fn rate_bits_per_s(&self) -> u64 {
        self.rate_bits_per_s
    }

    /// The namespace's name (`ip netns`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The veth end in the root namespace (`ip link`); the pair goes with it.
    pub fn host_link(&self) -> &str {
        &self.host_link
    }

    /// The veth end inside the namespace.
    pub fn inside_link(&self) -> &str {
        &self.inside_link
    }

    /// Our address on the link (the root namespace's end).
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// The address of the namespace's end: where servers inside listen.
    pub fn inside_addr(&self) -> Ipv4Addr {
        self.inside_addr
    }

    /// Where a pool started inside listens ([`POOL_PORT`] on the inside address).
    pub fn pool_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.inside_addr, POOL_PORT))
    }

    /// A command that runs inside the namespace (it enters it between fork and exec; mount
    /// namespace and files stay the host's). What it starts is killed when the fabric is
    /// torn down, but the caller still reaps its `Child`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command, FabricError> {
        let ns = self.netns_fd()?;
        let mut cmd = Command::new(program);
        // SAFETY: setns is a plain system call (async-signal-safe) on a descriptor the
        // closure owns; nothing is allocated or locked between fork and exec.
        unsafe {
            cmd.pre_exec(move || setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from));
        }
        Ok(cmd)
    }

    /// Runs `f` on a thread inside the namespace and returns its result. Sockets `f` creates
    /// belong to the namespace for good, whichever thread uses them afterwards.
    pub fn inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, FabricError> {
        let ns = self.netns_fd()?;
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .map_err(|source| FabricError::Enter {
                        name: self.name.clone(),
                        source,
                    })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// A TCP listener on the inside address (`port` 0 for any), to hand to a server.
    pub fn bind_inside(&self, port: u16) -> Result<TcpListener, FabricError> {
        let addr = SocketAddrV4::new(self.inside_addr, port);
        self.inside(|| TcpListener::bind(addr))?
            .map_err(FabricError::Measure)
    }

    /// Measures the link once: a bulk transfer of half a second at the profile's rate from
    /// the root namespace to a listener inside, then [`RTT_ROUNDS`] one-byte round trips.
    pub fn measure(&self) -> Result<FabricMeasurement, FabricError> {
        let listener = self.bind_inside(0)?;
        let addr = listener.local_addr().map_err(FabricError::Measure)?;
        let bytes = (self.rate_bits_per_s as f64 / 8.0 * MEASURE_SECONDS) as u64;
        std::thread::scope(|s| {
            let server = s.spawn(move || sink_and_echo(&listener));
            let client = send_and_ping(addr, bytes);
            // A failed client drops its connection, so the server returns too.
            let served = server
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            let (elapsed, rtt) = client.map_err(FabricError::Measure)?;
            served.map_err(FabricError::Measure)?;
            Ok(FabricMeasurement {
                bytes,
                achieved_bits_per_s: bytes as f64 * 8.0 / elapsed.as_secs_f64(),
                rtt_s: rtt.as_secs_f64(),
            })
        })
    }

    fn netns_fd(&self) -> Result<File, FabricError> {
        let enter = |source| FabricError::Enter {
            name: self.name.clone(),
            source,
        };
        self.netns
            .as_ref()
            .ok_or_else(|| enter(io::ErrorKind::NotFound.into()))?
            .try_clone()
            .map_err(enter)
    }

    /// Tears the fabric down: the janitor does it once its pipe closes; if it is gone or
    /// left something, the same steps run here.
    fn teardown(&mut self) {
        // Our descriptor would keep the namespace (and so the pair) alive.
        self.netns = None;
        if let Some(mut j) = self.janitor.take() {
            drop(j.stdin.take());
            let _ = j.child.wait();
        }
        let (link, ns) = (
            Path::new("/sys/class/net").join(&self.host_link),
            Path::new("/run/netns").join(&self.name),
        );
        if link.exists() || ns.exists() {
            let _ = Command::new("sh")
                .args(["-c", JANITOR, "sh"])
                .arg(&self.ip)
                .args([&self.name, &self.host_link])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// `name` in the directories of `path` (the PATH variable) or the sbin directories (a
/// non-login root shell may lack them in PATH).
fn find_tool(name: &'static str, path: Option<&OsStr>) -> Result<PathBuf, FabricError> {
    let dirs = path.map(std::env::split_paths).into_iter().flatten();
    dirs.chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or(FabricError::MissingTool(name))
}

fn command_line(program: &Path, args: &[&str]) -> String {
    std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `program args` to completion; a failure carries its stderr.
fn run(program: &Path, args: &[&str]) -> Result<String, FabricError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| FabricError::Spawn {
            command: command_line(program, args),
            source,
        })?;
    if !out.status.success() {
        return Err(FabricError::Command {
            command: command_line(program, args),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command failure whose stderr says the kernel lacks `feature` becomes that.
fn missing_kernel(e: FabricError, says: &str, feature: &'static str) -> FabricError {
    match e {
        FabricError::Command { stderr, .. } if stderr.contains(says) => {
            FabricError::MissingKernel(feature)
        }
        e => e,
    }
}

fn spawn_janitor(ip: &Path, ns: &str, host_link: &str) -> Result<Janitor, FabricError> {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", JANITOR, "sh"])
        .arg(ip)
        .args([ns, host_link])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Its own session: Ctrl-C and a closing terminal reach our process group, not the
    // janitor, which must outlive us to clean up.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(io::Error::from));
    }
    let mut child = cmd.spawn().map_err(|source| FabricError::Spawn {
        command: "sh (fabric janitor)".into(),
        source,
    })?;
    let stdin = child.stdin.take();
    Ok(Janitor { child, stdin })
}

/// The `host`-th address of /30 block `block` of [`SUBNET_BASE`].
fn block_addr(block: u32, host: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(SUBNET_BASE) + block * 4 + host)
}

/// Number of /30 blocks in the /16.
const BLOCKS: u32 = 1 << 14;

/// A /30 no address or route of the root namespace overlaps, starting from one derived from
/// our pid and fabric number (so concurrent processes start far apart).
fn free_block(ip: &Path, pid: u32, n: u32) -> Result<u32, FabricError> {
    let used: Vec<(u32, u32)> = [
        run(ip, &["-o", "-4", "addr", "show"])?,
        run(ip, &["-4", "route", "show", "table", "all"])?,
    ]
    .iter()
    .flat_map(|text| {
        text.split_whitespace()
            .filter_map(parse_prefix)
            .collect::<Vec<_>>()
    })
    .collect();
    let start = pid.wrapping_mul(7).wrapping_add(n.wrapping_mul(131)) % BLOCKS;
    (0..BLOCKS)
        .map(|i| (start + i) % BLOCKS)
        .find(|&b| {
            let lo = u32::from(block_addr(b, 0));
            used.iter()
                .all(|&(net, len)| !overlaps((lo, 30), (net, len)))
        })
        .ok_or(FabricError::NoSubnet)
}

/// `A.B.C.D/len` as (address, prefix length); other words are not prefixes. A bare address
/// counts as a /32.
fn parse_prefix(word: &str) -> Option<(u32, u32)> {
    let (addr, len) = match word.split_once('/') {
        Some((a, l)) => (a, l.parse().ok().filter(|l| *l <= 32)?),
        None => (word, 32),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    // The default route covers everything and says nothing about what is used.
    (len > 0).then_some((u32::from(addr), len))
}

fn overlaps((a, alen): (u32, u32), (b, blen): (u32, u32)) -> bool {
    let len = alen.min(blen);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a & mask == b & mask
}

/// Server side of [`Fabric::measure`]: reads the announced byte count, acknowledges it with
/// one byte, then echoes single bytes until the client closes.
fn sink_and_echo(listener: &TcpListener) -> io::Result<()> {
    let (mut s, _) = listener.accept()?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let mut left = u64::from_le_bytes(len);
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = s.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    s.write_all(&[1])?;
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => return Ok(()),
            _ => s.write_all(&b)?,
        }
    }
}

/// Client side of [`Fabric::measure`]: the bulk transfer's time (first byte sent to the
/// acknowledgement) and the median round trip.
fn send_and_ping(addr: SocketAddr, bytes: u64) -> io::Result<(Duration, Duration)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    let buf = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    s.write_all(&bytes.to_le_bytes())?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let elapsed = started.elapsed();
    let mut rtts: Vec<Duration> = (0..RTT_ROUNDS)
        .map(|_| {
            let t = Instant::now();
            s.write_all(&b)?;
            s.read_exact(&mut b)?;
            Ok(t.elapsed())
        })
        .collect::<io::Result<_>>()?;
    rtts.sort();
    Ok((elapsed, rtts[rtts.len() / 2]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_is_named_with_its_package() {
        let e = find_tool("no-such-torpor-tool", Some(OsStr::new("/nonexistent")));
        let msg = e.expect_err("not installed").to_string();
        assert!(
            msg.contains("`no-such-torpor-tool`") && msg.contains("iproute2"),
            "{msg}"
        );
        assert!(find_tool("sh", Some(OsStr::new("/bin:/usr/bin"))).is_ok());
    }

    #[test]
    fn the_local_profile_has_no_fabric() {
        let e = Fabric::create(FabricProfile::Local).expect_err("local is unshaped");
        assert!(
            matches!(e, FabricError::Unshaped(FabricProfile::Local)),
            "{e}"
        );
    }

    #[test]
    fn profiles_parse_and_name_their_rates() {
        use clap::ValueEnum;
        for (s, rate) in [
            ("local", None),
            ("10gbit", Some(10_000_000_000)),
            ("25gbit", Some(25_000_000_000)),
        ] {
            let p = FabricProfile::from_str(s, false).expect(s);
            assert_eq!(p.as_str(), s);
            assert_eq!(p.rate_bits_per_s(), rate);
            assert_eq!(serde_json::to_value(p).unwrap(), s);
        }
        assert!(FabricProfile::from_str("100gbit", false).is_err());
    }

    #[test]
    fn blocks_avoid_what_the_host_uses() {
        assert_eq!(block_addr(0, 1), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(block_addr(BLOCKS - 1, 2), Ipv4Addr::new(10, 213, 255, 254));
        assert_eq!(
            parse_prefix("10.213.0.4/30"),
            Some((u32::from(Ipv4Addr::new(10, 213, 0, 4)), 30))
        );
        assert_eq!(
            parse_prefix("10.0.0.1"),
            Some((u32::from(Ipv4Addr::new(10, 0, 0, 1)), 32))
        );
        assert_eq!(parse_prefix("default"), None);
        assert_eq!(parse_prefix("0.0.0.0/0"), None);
        assert_eq!(parse_prefix("eth0"), None);
        let block = |b| (u32::from(block_addr(b, 0)), 30);
        assert!(overlaps(block(1), parse_prefix("10.213.0.6").unwrap()));
        assert!(!overlaps(block(2), parse_prefix("10.213.0.6").unwrap()));
        assert!(overlaps(block(5), parse_prefix("10.0.0.0/8").unwrap()));
        assert!(!overlaps(block(5), parse_prefix("192.0.2.0/24").unwrap()));
    }
}
