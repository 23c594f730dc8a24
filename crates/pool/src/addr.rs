//! Pool addresses: `HOST:PORT` for TCP, `unix:PATH` for the same-host fast path.

use std::{fmt, path::PathBuf, str::FromStr};

use thiserror::Error;

/// Where a pool listens or is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolAddr {
    Tcp(String),
    Unix(PathBuf),
}

/// Why an address string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AddrError {
    #[error("pool address is empty")]
    Empty,
    #[error("pool address {0:?} is neither HOST:PORT nor unix:PATH")]
    Malformed(String),
}

impl FromStr for PoolAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(AddrError::Empty);
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AddrError::Malformed(s.to_string()));
            }
            return Ok(PoolAddr::Unix(PathBuf::from(path)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(PoolAddr::Tcp(s.to_string()))
            }
            _ => Err(AddrError::Malformed(s.to_string())),
        }
    }
}

impl fmt::Display for PoolAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolAddr::Tcp(a) => f.write_str(a),
            PoolAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Socket buffer size asked for on pool connections: a whole 1 MiB frame (and more) fits, so
/// the sender checksums the next chunk while the receiver is still reading this one.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Enlarges a socket's send and receive buffers (capped by the host's `wmem_max`/`rmem_max`;
/// a refusal only costs throughput).
pub fn enlarge_socket_buffers(fd: &impl std::os::fd::AsFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(fd, sockopt::SndBuf, &SOCKET_BUFFER);
    let _ = setsockopt(fd, sockopt::RcvBuf, &SOCKET_BUFFER);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            "127.0.0.1:7070".parse(),
            Ok(PoolAddr::Tcp("127.0.0.1:7070".into()))
        );
        assert_eq!(
            "unix:/run/pool.sock".parse(),
            Ok(PoolAddr::Unix("/run/pool.sock".into()))
        );
        assert!("localhost".parse::<PoolAddr>().is_err());
        assert!("unix:".parse::<PoolAddr>().is_err());
        assert!(":80".parse::<PoolAddr>().is_err());
        assert!("h:99999".parse::<PoolAddr>().is_err());
    }
}
