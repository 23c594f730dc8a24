//! A gRPC sample service: the standard `grpc.health.v1.Health` service (tonic), so gRPC
//! clients and the gate's gRPC path can be exercised against a real HTTP/2 server that torpor
//! checkpoints like any other process, and a bidirectional stream, [`ECHO_CHAT`], that answers
//! each message as it comes (for long-lived streams through the gate and kernel steering). Accepted connections get TCP_NODELAY: tonic writes a
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
        .add_service(Echo)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(io::Error::other)
}

/// The bidirectional echo stream's method: each message (a protobuf `StringValue`) is
/// answered at once with "echo: " and the message, until the client ends its side.
pub const ECHO_CHAT: &str = "/torpor.sample.Echo/Chat";

/// The echo service. Written out by hand (no .proto): one method, with the protobuf
/// well-known wrapper type as its message, which tonic's prost codec handles as it is.
#[derive(Debug, Clone, Copy)]
struct Echo;

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "torpor.sample.Echo";
}

impl tonic::server::StreamingService<String> for Echo {
    type Response = String;
    type ResponseStream = tonic::codegen::BoxStream<String>;
    type Future = tonic::codegen::BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    // The stream's items are tonic's `Result<_, Status>`: its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    fn call(&mut self, request: tonic::Request<tonic::Streaming<String>>) -> Self::Future {
        use tonic::codegen::tokio_stream::StreamExt;
        let answers = request
            .into_inner()
            .map(|m| m.map(|m| format!("echo: {m}")));
        Box::pin(async move {
            Ok(tonic::Response::new(
                Box::pin(answers) as Self::ResponseStream
            ))
        })
    }
}

impl<B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Echo
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::BoxBody>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        Box::pin(async move {
            if req.uri().path() != ECHO_CHAT {
                return Ok(tonic::Status::unimplemented(req.uri().path().to_string()).into_http());
            }
            let mut grpc =
                tonic::server::Grpc::new(tonic::codec::ProstCodec::<String, String>::default());
            Ok(grpc.streaming(Echo, req).await)
        })
    }
}
