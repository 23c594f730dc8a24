//! A gRPC sample service: the standard `grpc.health.v1.Health` service (tonic), so gRPC
//! clients and the gate's gRPC path can be exercised against a real HTTP/2 server that torpor
//! checkpoints like any other process.

use std::{io, net::SocketAddr, path::Path};

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
        let listener = tokio::net::TcpListener::bind(listen).await?;
        if let Some(p) = port_file {
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, listener.local_addr()?.port().to_string())?;
            std::fs::rename(tmp, p)?;
        }
        let (mut reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .map_err(io::Error::other)
    })
}
