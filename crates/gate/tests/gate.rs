//! The gate in front of real in-process backends (hyper HTTP/1.1 + h2, tonic gRPC, a TCP
//! echo server), with the link driven by hand the way the agent drives it.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use torpor_control::{HoldLimits, ServiceLink};
use torpor_gate::{GateLimits, Protocol};

async fn http_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("{:?} {}", req.version(), req.uri().path());
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

struct Gate {
    addr: SocketAddr,
    link: Arc<ServiceLink>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn gate(protocol: Protocol, backend: SocketAddr, depth: usize, timeout: Duration) -> Gate {
    gate_with(protocol, backend, depth, timeout, GateLimits::default()).await
}

async fn gate_with(
    protocol: Protocol,
    backend: SocketAddr,
    depth: usize,
    timeout: Duration,
    limits: GateLimits,
) -> Gate {
    let link = ServiceLink::new("svc", HoldLimits { depth, timeout });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(torpor_gate::run(
        l,
        protocol,
        backend,
        link.clone(),
        limits,
        async {
            let _ = rx.await;
        },
    ));
    Gate {
        addr,
        link,
        _stop: tx,
    }
}

/// Plays the agent: waits for a wake request, "restores" for a while, opens the link.
fn wake_after(link: Arc<ServiceLink>, restore: Duration) -> tokio::task::JoinHandle<()> {
    link.arm_wake();
    tokio::spawn(async move {
        link.wake_requested().await;
        tokio::time::sleep(restore).await;
        link.open();
    })
}

async fn many_held_http(http2: bool) -> Result<()> {
    let backend = http_backend().await;
    let g = gate(Protocol::Http, backend, 10_000, Duration::from_secs(30)).await;
    let waker = wake_after(g.link.clone(), Duration::from_millis(200));
    let mut builder = Client::builder(TokioExecutor::new());
    if http2 {
        builder.http2_only(true);
    }
    let client = builder.build_http::<Empty<Bytes>>();
    let mut tasks = Vec::new();
    for i in 0..500 {
        let (client, addr) = (client.clone(), g.addr);
        tasks.push(tokio::spawn(async move {
            let uri = format!("http://{addr}/req/{i}").parse().unwrap();
            let resp = client.get(uri).await?;
            anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, anyhow::Error>(String::from_utf8(body.to_vec())?)
        }));
    }
    let version = if http2 { "HTTP/2.0" } else { "HTTP/1.1" };
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await??, format!("{version} /req/{i}"));
    }
    waker.await?;
    assert_eq!(g.link.held(), 0);
    assert_eq!(g.link.rejected(), 0);
    Ok(())
}

#[tokio::test]
async fn five_hundred_held_http1_requests_are_all_answered() -> Result<()> {
    many_held_http(false).await
}

#[tokio::test]
async fn five_hundred_held_http2_requests_are_all_answered() -> Result<()> {
    many_held_http(true).await
}

#[tokio::test]
async fn five_hundred_held_grpc_calls_are_all_answered() -> Result<()> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let (_reporter, service) = tonic_health::server::health_reporter();
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let backend = l.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    let g = gate(Protocol::Http, backend, 10_000, Duration::from_secs(30)).await;
    let waker = wake_after(g.link.clone(), Duration::from_millis(200));
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", g.addr))?.connect_lazy();
    let mut tasks = Vec::new();
    for _ in 0..500 {
        let mut client = HealthClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
        }));
    }
    for t in tasks {
        let resp = t.await??;
        assert_eq!(resp.into_inner().status, ServingStatus::Serving as i32);
    }
    waker.await?;
    Ok(())
}

#[tokio::test]
async fn full_queue_gets_503_and_grpc_unavailable() -> Result<()> {
    let backend = http_backend().await;
    let g = gate(Protocol::Http, backend, 1, Duration::from_secs(30)).await;
    // One request fills the queue.
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let first = tokio::spawn({
        let (client, addr) = (client.clone(), g.addr);
        async move {
            client
                .get(format!("http://{addr}/a").parse().unwrap())
                .await
        }
    });
    while g.link.held() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let resp = client.get(format!("http://{}/b", g.addr).parse()?).await?;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body = resp.into_body().collect().await?.to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        "service svc is waking and has too many requests waiting, retry\n"
    );

    let grpc = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let req = hyper::Request::post(format!("http://{}/grpc.health.v1.Health/Check", g.addr))
        .header("content-type", "application/grpc")
        .body(Empty::new())?;
    let resp = grpc.request(req).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "14", "UNAVAILABLE");

    g.link.open();
    assert_eq!(first.await??.status(), 200);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn hold_timeout_gets_503() -> Result<()> {
    let backend = http_backend().await;
    let g = gate(Protocol::Http, backend, 10, Duration::from_secs(2)).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let resp = client
        .get(format!("http://{}/late", g.addr).parse()?)
        .await?;
    assert_eq!(resp.status(), 503);
    let body = resp.into_body().collect().await?.to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        "service svc is still waking, retry\n"
    );
    Ok(())
}

#[tokio::test]
async fn tcp_connection_is_held_then_dialled_and_cut_by_a_late_drain() -> Result<()> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let backend = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let g = gate(Protocol::Tcp, backend, 10, Duration::from_secs(30)).await;
    let waker = wake_after(g.link.clone(), Duration::from_millis(100));
    let mut c = TcpStream::connect(g.addr).await?;
    c.write_all(b"held").await?;
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"held");
    waker.await?;
    // A drain whose deadline passes cuts the long-lived connection.
    let d = g.link.drain(Duration::from_millis(50)).await;
    assert_eq!(d.still_inflight, 1);
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await??;
    assert_eq!(n, 0, "closed by the gate");
    Ok(())
}
