//! How recently the established TCP connections on an address carried data, from the kernel's
//! own per-connection record (sock_diag: an `INET_DIAG` dump with `INET_DIAG_INFO`, whose
//! `tcp_info` has `tcpi_last_data_recv` and `tcpi_last_data_sent`, in ms). A steered
//! connection carries traffic the gate never sees; this is how the agent tells a live stream
//! from a keep-alive connection left open and quiet. The dump is one netlink round trip;
//! [`summarize`], the part that decides, is pure.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, SocketAddrV4},
    time::Duration,
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, IPPROTO_TCP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

/// One established TCP connection as sock_diag reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    /// Its local address: the public one for a steered connection.
    pub local: SocketAddrV4,
    /// The socket's inode, to tell who holds it.
    pub inode: u64,
    /// Time since it last received or sent data (not bare ACKs or keep-alive probes).
    pub quiet: Duration,
}

/// The open connections of one holder (the service's process tree) on one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenConnections {
    /// How many are established.
    pub open: usize,
    /// Time since the most recent data on any of them; `None` when none is open.
    pub quietest: Option<Duration>,
}

/// What `connections` says of those whose local address is `addr` and whose inode is in
/// `held`.
pub fn summarize(
    connections: &[Connection],
    addr: SocketAddrV4,
    held: &BTreeSet<u64>,
) -> OpenConnections {
    connections
        .iter()
        .filter(|c| c.local == addr && held.contains(&c.inode))
        .fold(OpenConnections::default(), |acc, c| OpenConnections {
            open: acc.open + 1,
            quietest: Some(acc.quietest.map_or(c.quiet, |q| q.min(c.quiet))),
        })
}

/// The established IPv4 TCP connections whose local port is `addr`'s, in the network
/// namespace of the calling thread (the kernel filters on the port; the caller on the rest).
pub fn established(addr: SocketAddrV4) -> io::Result<Vec<Connection>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut socket_id = SocketId::new_v4();
    socket_id.source_port = addr.port();
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: AF_INET,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states: StateFlags::ESTABLISHED,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut found = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        let mut rest = datagram.as_slice();
        while !rest.is_empty() {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    found.extend(connection(&r));
                }
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                _ => {}
            }
            if len == 0 || len > rest.len() {
                break;
            }
            rest = &rest[len..];
        }
    }
}

/// The connection a sock_diag answer describes, if it is IPv4 and carries its `tcp_info`.
fn connection(r: &InetResponse) -> Option<Connection> {
    let IpAddr::V4(ip) = r.header.socket_id.source_address else {
        return None;
    };
    let info = r.nlas.iter().find_map(|n| match n {
        Nla::TcpInfo(info) => Some(info),
        _ => None,
    })?;
    Some(Connection {
        local: SocketAddrV4::new(ip, r.header.socket_id.source_port),
        inode: r.header.inode.into(),
        quiet: Duration::from_millis(info.last_data_recv.min(info.last_data_sent).into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(local: &str, inode: u64, quiet_ms: u64) -> Connection {
        Connection {
            local: local.parse().unwrap(),
            inode,
            quiet: Duration::from_millis(quiet_ms),
        }
    }

    #[test]
    fn only_the_holders_connections_on_the_address_count_and_the_liveliest_decides() {
        let addr = "127.0.0.1:8080".parse().unwrap();
        let all = [
            conn("127.0.0.1:8080", 1, 40_000), // held, quiet
            conn("127.0.0.1:8080", 2, 150),    // held, carried data 150 ms ago
            conn("127.0.0.1:8080", 3, 5),      // someone else's (the gate's)
            conn("127.0.0.2:8080", 4, 0),      // same port, other address
        ];
        let held = BTreeSet::from([1, 2, 4]);
        assert_eq!(
            summarize(&all, addr, &held),
            OpenConnections {
                open: 2,
                quietest: Some(Duration::from_millis(150))
            }
        );
        assert_eq!(
            summarize(&all[..1], addr, &held),
            OpenConnections {
                open: 1,
                quietest: Some(Duration::from_secs(40))
            }
        );
        assert_eq!(
            summarize(&all, addr, &BTreeSet::new()),
            OpenConnections::default()
        );
    }
}
