//! Kernel steering: while a service is awake, new connections for its public address go
//! straight to the service's own listening socket, and the gate is out of the data path.
//!
//! An eBPF `sk_lookup` program (assembled at run time, [`program`]) is linked to a network
//! namespace. For a TCP connection to the public address it looks up slot 0 of a SOCKMAP and,
//! if a socket is there, assigns the connection to it and counts it; otherwise the connection
//! goes on to whatever listens on the address: the gate. So:
//!
//! * awake: the map holds the service's listening socket ([`Steering::steer`]);
//! * before a checkpoint: the map slot is emptied first ([`Steering::unsteer`]), so no new
//!   connection lands on a freezing service: it reaches the gate and is held there;
//! * after a restore: the restored socket goes into the map again.
//!
//! The program, map and link live as long as their descriptors: [`KernelSteering`] owns them,
//! dropping it detaches the program, and a torpor that dies leaves nothing attached (the
//! descriptors are close-on-exec, so no service inherits one). [`probe`] says whether this
//! host can do it (for `torpor doctor`), without touching the host's namespace.

pub mod bpf;
pub mod diag;
pub mod netns;
pub mod program;
pub mod socket;

use std::{
    io,
    net::SocketAddrV4,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::PathBuf,
};

use tracing::debug;

pub use diag::OpenConnections;

/// Why steering could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("bpf {what}: {source}")]
    Bpf {
        what: &'static str,
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("no socket listening on {addr} in the process tree of pid {pid}")]
    NoListener { pid: i32, addr: SocketAddrV4 },
}

fn bpf_err(what: &'static str) -> impl FnOnce(io::Error) -> SteerError {
    move |source| SteerError::Bpf { what, source }
}

/// Where new connections for one public address go: the service's socket, or the gate.
/// The agent drives it through this trait, so its ordering (unsteer before a checkpoint,
/// steer after a wake) is tested with a fake.
pub trait Steering: Send + Sync + std::fmt::Debug {
    /// New connections go to the socket listening on `backend` in the process tree of `pid`
    /// (the service as the agent started or restored it).
    fn steer(&self, pid: i32, backend: SocketAddrV4) -> Result<(), SteerError>;
    /// New connections go to the gate again. Idempotent.
    fn unsteer(&self) -> Result<(), SteerError>;
    /// Connections handed to the service so far: arrivals the gate never saw.
    fn steered(&self) -> Result<u64, SteerError>;
    /// Steered connections still open (held by the process tree of `pid` and established on
    /// the public address) and how long since the most recent data on any of them. They
    /// carry traffic the gate cannot see, so the agent counts recent data as activity.
    fn open_connections(&self, pid: i32) -> Result<OpenConnections, SteerError>;
}

/// An sk_lookup program linked to one network namespace, for one public address.
#[derive(Debug)]
pub struct KernelSteering {
    public: SocketAddrV4,
    /// Slot 0: the service's listening socket while it is awake.
    sockets: OwnedFd,
    /// Slot 0: connections assigned so far.
    counters: OwnedFd,
    /// Dropped last: closing it detaches the program.
    _link: OwnedFd,
    /// Where processes' sockets are looked up (`/proc`).
    proc: PathBuf,
}

impl KernelSteering {
    /// Loads the program for `public` and links it to network namespace `netns` (a
    /// descriptor of `/proc/PID/ns/net`). Nothing is steered until [`Steering::steer`].
    pub fn attach(
        public: SocketAddrV4,
        netns: BorrowedFd<'_>,
    ) -> Result<KernelSteering, SteerError> {
        let sockets =
            bpf::map_create(bpf::MAP_SOCKMAP, 4, 4, 1).map_err(bpf_err("creating the SOCKMAP"))?;
        let counters = bpf::map_create(bpf::MAP_ARRAY, 4, 8, 1)
            .map_err(bpf_err("creating the counter map"))?;
        use std::os::fd::AsRawFd;
        let insns = program::sk_lookup(public, sockets.as_raw_fd(), counters.as_raw_fd());
        let prog = bpf::load_sk_lookup(&insns, "torpor_steer")
            .map_err(bpf_err("loading the sk_lookup program"))?;
        let link = bpf::link_netns(prog.as_fd(), netns)
            .map_err(bpf_err("linking the program to the network namespace"))?;
        debug!(%public, "sk_lookup steering attached");
        Ok(KernelSteering {
            public,
            sockets,
            counters,
            _link: link,
            proc: PathBuf::from("/proc"),
        })
    }

    /// As [`KernelSteering::attach`], to the calling thread's network namespace.
    pub fn attach_here(public: SocketAddrV4) -> Result<KernelSteering, SteerError> {
        let netns =
            std::fs::File::open("/proc/thread-self/ns/net").map_err(|source| SteerError::Io {
                what: "opening /proc/thread-self/ns/net",
                source,
            })?;
        KernelSteering::attach(public, netns.as_fd())
    }

    /// The address it steers.
    pub fn public(&self) -> SocketAddrV4 {
        self.public
    }

    /// New connections go to `listener`, a listening TCP socket.
    pub fn steer_to(&self, listener: BorrowedFd<'_>) -> Result<(), SteerError> {
        bpf::sockmap_set(self.sockets.as_fd(), 0, listener)
            .map_err(bpf_err("putting the service's socket in the SOCKMAP"))
    }
}

impl Steering for KernelSteering {
    fn steer(&self, pid: i32, backend: SocketAddrV4) -> Result<(), SteerError> {
        let listener = socket::service_listener(&self.proc, pid, backend)?;
        self.steer_to(listener.as_fd())
    }

    fn unsteer(&self) -> Result<(), SteerError> {
        bpf::sockmap_delete(self.sockets.as_fd(), 0).map_err(bpf_err("emptying the SOCKMAP"))
    }

    fn steered(&self) -> Result<u64, SteerError> {
        bpf::array_get_u64(self.counters.as_fd(), 0).map_err(bpf_err("reading the counter"))
    }

    fn open_connections(&self, pid: i32) -> Result<OpenConnections, SteerError> {
        let io = |what: &'static str| move |source| SteerError::Io { what, source };
        // The same namespace the program was attached from (`attach_here`'s callers).
        let connections = diag::established(self.public).map_err(io("sock_diag"))?;
        let on_public: std::collections::BTreeSet<u64> = connections
            .iter()
            .filter(|c| c.local == self.public)
            .map(|c| c.inode)
            .collect();
        // The descriptor walk, the costly part, only when there is something to attribute.
        let held = socket::held(&self.proc, pid, &on_public).map_err(io("reading descriptors"))?;
        Ok(diag::summarize(&connections, self.public, &held))
    }
}

/// Whether this host can steer in the kernel: maps, the program and a link, tried in a
/// network namespace of a scratch thread (the host's own lookup is never touched). The
/// error says which step the kernel or the capabilities refused.
pub fn probe() -> Result<(), SteerError> {
    std::thread::spawn(|| {
        netns::enter_private().map_err(|source| SteerError::Io {
            what: "creating a network namespace",
            source,
        })?;
        KernelSteering::attach_here(SocketAddrV4::new([127, 0, 0, 1].into(), 9)).map(drop)
    })
    .join()
    .unwrap_or_else(|_| {
        Err(SteerError::Io {
            what: "probe thread",
            source: io::Error::other("panicked"),
        })
    })
}
