//! Every TCP connection on a µSuite request path (client → mid-tier → buckets), and the sample
//! gRPC service's, has TCP_NODELAY on both ends. tonic writes a response's trailers a few
//! microseconds after its message; with Nagle's algorithm on the server's socket the trailers
//! waited for the peer's delayed ACK, and requests took 40 or 80 ms instead of one. A timed test
//! would be noisy on loaded cores, so this one reads the option off the sockets themselves: the
//! tiers run in this process, and /proc/self/fd lists both ends of every connection.

use std::{
    collections::BTreeSet,
    mem::ManuallyDrop,
    net::{SocketAddr, TcpStream},
    os::fd::FromRawFd,
};

use tokio::net::TcpListener;
use tonic::transport::{server::Router, Server};
use torpor_loadgen::Target;
use torpor_usuite::{
    client::UsuiteTarget,
    hdsearch, recommend, setalgebra,
    tier::{self, DataArgs},
    Service,
};

fn small() -> DataArgs {
    DataArgs {
        vectors: 2000,
        dim: 16,
        clusters: 10,
        docs: 2000,
        vocabulary: 300,
        terms_per_doc: 10,
        users: 200,
        items: 200,
        density: 0.05,
        rank: 4,
        ..DataArgs::default()
    }
}

/// A listener on a fresh port; its address.
async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// Serves `router` through the tiers' own `serve` until the test ends.
async fn start(router: Router) -> SocketAddr {
    let (l, addr) = listener().await;
    tokio::spawn(tier::serve(l, router, std::future::pending()));
    addr
}

/// Each open TCP connection of this process with an end on one of `ports`: (local, peer,
/// TCP_NODELAY).
fn connections(ports: &BTreeSet<u16>) -> Vec<(SocketAddr, SocketAddr, bool)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // Borrowed, never closed: the runtime owns the descriptor. A descriptor closed and
        // reused meanwhile only answers the socket calls below with an error or other figures.
        let s = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) });
        let (Ok(local), Ok(peer), Ok(nodelay)) = (s.local_addr(), s.peer_addr(), s.nodelay())
        else {
            continue; // a listener, a Unix socket
        };
        if ports.contains(&local.port()) || ports.contains(&peer.port()) {
            out.push((local, peer, nodelay));
        }
    }
    out
}

/// Asserts that the connections to `servers` are there (both ends of at least `pairs`) and all
/// have TCP_NODELAY.
fn assert_nodelay(servers: &[SocketAddr], pairs: usize) {
    let ports = servers.iter().map(SocketAddr::port).collect();
    let conns = connections(&ports);
    assert!(
        conns.len() >= 2 * pairs,
        "both ends of {pairs} connections expected, found {conns:?}"
    );
    let slow: Vec<_> = conns.iter().filter(|c| !c.2).collect();
    assert!(slow.is_empty(), "connections without TCP_NODELAY: {slow:?}");
}

#[tokio::test]
async fn every_connection_from_client_to_buckets_has_nodelay() {
    let d = small();
    for service in [Service::Setalgebra, Service::Hdsearch, Service::Recommend] {
        let mut buckets = Vec::new();
        for shard in 0..2 {
            let mut b = Server::builder();
            buckets.push(
                start(match service {
                    Service::Setalgebra => b.add_service(setalgebra::Bucket::new(&d, shard, 2)),
                    Service::Hdsearch => b.add_service(hdsearch::Bucket::new(&d, shard, 2)),
                    Service::Recommend => b.add_service(recommend::Bucket::new(&d, shard, 2)),
                    Service::Router => unreachable!("not in this list"),
                })
                .await,
            );
        }
        let mut b = Server::builder();
        let mid = start(match service {
            Service::Setalgebra => b.add_service(setalgebra::Mid::new(&buckets)),
            Service::Hdsearch => b.add_service(hdsearch::Mid::new(&d, &buckets)),
            Service::Recommend => b.add_service(recommend::Mid::new(&d, &buckets)),
            Service::Router => unreachable!("not in this list"),
        })
        .await;
        // The load generator's own client, as `torpor usuite SERVICE client` runs it.
        let client = UsuiteTarget::new(service, mid, &d);
        for seq in 0..5 {
            client.call(seq).await.unwrap();
        }
        let mut servers = buckets.clone();
        servers.push(mid);
        // Client ↔ mid-tier, and mid-tier ↔ each bucket.
        assert_nodelay(&servers, 1 + buckets.len());
    }
}

#[tokio::test]
async fn the_sample_grpc_service_accepts_with_nodelay() {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let (l, addr) = listener().await;
    tokio::spawn(torpor_workload::grpc::serve(l, std::future::pending()));
    let channel = tier::bucket_channels(&[addr]).remove(0);
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_nodelay(&[addr], 1);
}
