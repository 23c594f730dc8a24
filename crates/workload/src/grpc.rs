//! A gRPC sample service: the standard `grpc.health.v1.Health` service (tonic), so gRPC
//! clients and the gate's gRPC path can be exercised against a real HTTP/2 server that torpor
//! checkpoints like any other process. Accepted connections get TCP_NODELAY: tonic writes a
//! response's trailers apart from its message, and with Nagle's algorithm the trailers would wait
//! for the client's delayed ACK (up to 40 ms).

use std::{future::Future, io, net::SocketAddr, path::Path};

use tokio::net::TcpListener;
use tonic_health::ServingStatus;

/// Serves `grpc.health.v1.Health` on `listen` ("" reports SERVING); writes the bound port to
/// `port_file` once listening. Runs until the process is killed.
pub fn run(listen: SocketAddr, port_file: Option<&Path>) -> io::Result<()> {
    // One worker thread: a small service, and a small tree for CRIU.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(listen).await?;
        if let Some(p) = port_file {
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, listener.local_addr()?.port().to_string())?;
            std::fs::rename(tmp, p)?;
        }
        serve(listener, std::future::pending()).await
    })
}

/// Serves `grpc.health.v1.Health` on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()>) -> io::Result<()> {
    let (mut reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
        .map_err(io::Error::other)?;
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(io::Error::other)
}
