//! How a client reaches a pool: address, token, TLS and timeouts, and the transport policy
//! (no token or memory in clear over a network by accident). Built with [`PoolTarget::new`]
//! and the `with_*` methods, so fields can be added without breaking callers.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    time::Duration,
};

use crate::{
    addr::PoolAddr,
    client::{ClientError, PoolClient},
    tls::ClientTls,
};

/// How long a pool may keep a client waiting. Together they bound a hang: a pool that stops
/// answering (stopped, partitioned, overloaded) fails a connect after at most `connect` and
/// any request, data frame or reply after at most `frame` without progress, with
/// [`ClientError::Timeout`]. A checkpoint then aborts (and CRIU resumes the service) at most
/// `connect + frame` after the pool went silent, and so does a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect (per resolved address) and, with TLS, each step of the handshake.
    pub connect: Duration,
    /// Longest wait for a socket read or write to make progress: a reply, a frame of a file
    /// being fetched, room to send the next bytes of an upload. Generous, because a pool may
    /// spill older snapshots to disk before it takes the next chunk.
    pub frame: Duration,
}

impl Default for Timeouts {
    /// Connect 3 s, frame 10 s.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            frame: Duration::from_secs(10),
        }
    }
}

/// How to reach a pool.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolTarget {
    pub addr: PoolAddr,
    /// Shared secret; empty when the pool runs without one.
    pub token: String,
    /// TLS with the pool's certificate pinned; only for TCP addresses (a Unix socket never
    /// leaves the host).
    pub tls: Option<ClientTls>,
    /// Allows plaintext TCP to a pool that is not on loopback (the token and every snapshot
    /// then cross the network readable by anyone on the path).
    pub insecure: bool,
    pub timeouts: Timeouts,
}

impl PoolTarget {
    /// A target without TLS and with the default [`Timeouts`].
    pub fn new(addr: PoolAddr, token: impl Into<String>) -> PoolTarget {
        PoolTarget {
            addr,
            token: token.into(),
            tls: None,
            insecure: false,
            timeouts: Timeouts::default(),
        }
    }

    pub fn with_tls(mut self, tls: Option<ClientTls>) -> PoolTarget {
        self.tls = tls;
        self
    }

    pub fn with_insecure(mut self, insecure: bool) -> PoolTarget {
        self.insecure = insecure;
        self
    }

    pub fn with_timeouts(mut self, timeouts: Timeouts) -> PoolTarget {
        self.timeouts = timeouts;
        self
    }

    /// Connects and says hello.
    pub fn connect(&self) -> Result<PoolClient, ClientError> {
        PoolClient::open(self)
    }

    /// Checks the transport policy without connecting: a TCP pool without TLS must resolve
    /// only to loopback addresses unless `insecure` is set. Returns the resolved addresses.
    pub fn check_transport(&self) -> Result<Vec<SocketAddr>, ClientError> {
        let PoolAddr::Tcp(a) = &self.addr else {
            return Ok(Vec::new());
        };
        let addrs: Vec<SocketAddr> = a
            .to_socket_addrs()
            .map_err(|source| ClientError::Connect {
                addr: a.clone(),
                source,
            })?
            .collect();
        if self.tls.is_none() && !self.insecure && !addrs.iter().all(|s| s.ip().is_loopback()) {
            return Err(ClientError::Cleartext { addr: a.clone() });
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_to_a_remote_pool_is_refused_unless_insecure() {
        let remote = PoolTarget::new("192.0.2.7:7070".parse().unwrap(), "t");
        assert!(matches!(
            remote.check_transport(),
            Err(ClientError::Cleartext { .. })
        ));
        // The refusal comes before any socket is opened.
        assert!(matches!(
            remote.connect(),
            Err(ClientError::Cleartext { .. })
        ));
        assert!(remote.clone().with_insecure(true).check_transport().is_ok());
        for local in ["127.0.0.1:7070", "[::1]:7070", "localhost:7070"] {
            let t = PoolTarget::new(local.parse().unwrap(), "t");
            assert!(t.check_transport().is_ok(), "{local}");
        }
        let unix = PoolTarget::new("unix:/run/pool.sock".parse().unwrap(), "t");
        assert!(unix.check_transport().is_ok());
    }
}
