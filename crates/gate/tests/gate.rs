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

async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
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
    backend
}

#[tokio::test]
async fn tcp_connection_is_held_then_dialled_and_cut_by_a_late_drain() -> Result<()> {
    let backend = echo_backend().await;
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

/// A backend that answers every request with the length of its body.
async fn body_length_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(
                            format!("{} bytes", body.len()),
                        ))))
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

/// Reads what the gate sends until it closes the connection (or 20 s pass).
async fn read_until_closed(c: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    got
}

/// Sends `request` and returns the status line of the answer (empty if none came).
async fn status_line(addr: SocketAddr, request: Vec<u8>) -> Result<String> {
    let mut c = TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = c.split();
    // The gate may answer (and close) before it has read everything: keep reading.
    let write = async {
        let _ = wr.write_all(&request).await;
    };
    let read = async {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut got)).await;
        got
    };
    let (_, got) = tokio::join!(write, read);
    let text = String::from_utf8_lossy(&got).to_string();
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// Sends one request on a kept-alive connection and reads its answer (from `http_backend`).
async fn keep_alive_get(c: &mut TcpStream, path: &str) -> Result<()> {
    c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(format!("HTTP/1.1 {path}").as_bytes()) {
        let n = tokio::time::timeout(Duration::from_secs(20), c.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

#[tokio::test]
async fn connections_over_the_limit_wait_and_do_not_stop_the_gate() -> Result<()> {
    let backend = http_backend().await;
    let limits = GateLimits {
        max_connections: 4,
        ..GateLimits::default()
    };
    let g = gate_with(Protocol::Http, backend, 10, Duration::from_secs(30), limits).await;
    g.link.open();
    // Four clients that made a request and keep their connections take every slot.
    let mut kept = Vec::new();
    for i in 0..4 {
        let mut c = TcpStream::connect(g.addr).await?;
        keep_alive_get(&mut c, &format!("/{i}")).await?;
        kept.push(c);
    }
    let mut late = TcpStream::connect(g.addr).await?;
    late.write_all(b"GET /late HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut first = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_millis(300), late.read(&mut first)).await;
    assert!(waited.is_err(), "served beyond the connection limit");
    // One slot frees: the waiting client is served, and the others still are.
    drop(kept.pop());
    let answer = read_until_closed(&mut late).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("HTTP/1.1 /late"), "{answer}");
    for (i, c) in kept.iter_mut().enumerate() {
        keep_alive_get(c, &format!("/again{i}")).await?;
    }
    Ok(())
}

#[tokio::test]
async fn clients_that_say_nothing_make_room_for_ones_that_send_requests() -> Result<()> {
    let backend = http_backend().await;
    let limits = GateLimits {
        max_connections: 16,
        // Long enough that only making room, not the timeout, lets the client in in time.
        header_read_timeout: Duration::from_secs(60),
        ..GateLimits::default()
    };
    let g = gate_with(Protocol::Http, backend, 10, Duration::from_secs(30), limits).await;
    g.link.open();
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(TcpStream::connect(g.addr).await?);
    }
    let t0 = std::time::Instant::now();
    let line = tokio::time::timeout(
        Duration::from_secs(30),
        status_line(
            g.addr,
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(),
        ),
    )
    .await??;
    assert_eq!(line, "HTTP/1.1 200 OK");
    eprintln!("served past 200 silent clients in {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test]
async fn a_client_that_sends_headers_slowly_is_cut_after_the_header_read_timeout() -> Result<()> {
    let backend = http_backend().await;
    let limits = GateLimits {
        header_read_timeout: Duration::from_millis(500),
        ..GateLimits::default()
    };
    let g = gate_with(Protocol::Http, backend, 10, Duration::from_secs(30), limits).await;
    g.link.open();
    let mut c = TcpStream::connect(g.addr).await?;
    let t0 = std::time::Instant::now();
    let (mut rd, mut wr) = c.split();
    // One header line every 100 ms, for ever: each is under any size limit.
    let trickle = async {
        let _ = wr.write_all(b"GET / HTTP/1.1\r\n").await;
        for i in 0.. {
            if wr
                .write_all(format!("x-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut got = Vec::new();
    tokio::select! {
        _ = trickle => {}
        r = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut got)) => {
            assert!(r.is_ok(), "still connected after 20 s");
        }
    }
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(450), "cut after {took:?}");
    assert!(!String::from_utf8_lossy(&got).contains("200"));
    // A client that sends "P" (the start of the HTTP/2 preface) and nothing more.
    let mut c = TcpStream::connect(g.addr).await?;
    c.write_all(b"PRI * HTTP/2.0\r\n").await?;
    let t0 = std::time::Instant::now();
    read_until_closed(&mut c).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(15),
        "preface cut after {took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn oversized_or_too_many_headers_get_431() -> Result<()> {
    let backend = http_backend().await;
    let limits = GateLimits {
        max_header_bytes: 16 << 10,
        max_headers: 50,
        ..GateLimits::default()
    };
    let g = gate_with(Protocol::Http, backend, 10, Duration::from_secs(30), limits).await;
    g.link.open();
    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    assert_eq!(
        status_line(g.addr, big.into_bytes()).await?,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let many: String = (0..80).map(|i| format!("x-{i}: y\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nhost: x\r\n{many}\r\n");
    assert_eq!(
        status_line(g.addr, many.into_bytes()).await?,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    // Within the limits: served.
    let fine = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec();
    assert_eq!(status_line(g.addr, fine).await?, "HTTP/1.1 200 OK");
    // HTTP/2: a header list over the limit is answered 431, the connection serves on (one far
    // over it ends the connection: h2's guard against header floods).
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let req = hyper::Request::get(format!("http://{}/big", g.addr))
        .header("x-big", "a".repeat(20 << 10))
        .body(Empty::new())?;
    assert_eq!(h2.request(req).await?.status(), 431);
    let resp = h2.get(format!("http://{}/fine", g.addr).parse()?).await?;
    assert_eq!(resp.status(), 200);
    Ok(())
}

fn small_hold_limit() -> GateLimits {
    GateLimits {
        hold_body_limit: 64 << 10,
        ..GateLimits::default()
    }
}

#[tokio::test]
async fn a_held_body_declared_over_the_limit_gets_413_at_once() -> Result<()> {
    let backend = body_length_backend().await;
    let g = gate_with(
        Protocol::Http,
        backend,
        10,
        Duration::from_secs(30),
        small_hold_limit(),
    )
    .await;
    g.link.arm_wake();
    // A gibibyte announced, not a byte of it sent: the answer cannot wait for it.
    let head = b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 1073741824\r\n\r\n".to_vec();
    let line = tokio::time::timeout(Duration::from_secs(10), status_line(g.addr, head)).await??;
    assert_eq!(line, "HTTP/1.1 413 Payload Too Large");
    assert_eq!(g.link.held(), 0);
    Ok(())
}

#[tokio::test]
async fn a_held_chunked_body_over_the_limit_gets_413_and_is_not_kept() -> Result<()> {
    let backend = body_length_backend().await;
    let g = gate_with(
        Protocol::Http,
        backend,
        10,
        Duration::from_secs(30),
        small_hold_limit(),
    )
    .await;
    g.link.arm_wake();
    let chunk = |n: usize| {
        let mut c = format!("{n:x}\r\n").into_bytes();
        c.extend(std::iter::repeat_n(b'z', n));
        c.extend(b"\r\n");
        c
    };
    // Just over the limit, and then the client waits for the answer.
    let mut req = b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..5 {
        req.extend(chunk(16 << 10));
    }
    let mut c = TcpStream::connect(g.addr).await?;
    c.write_all(&req).await?;
    let answer = read_until_closed(&mut c).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 413 Payload Too Large"),
        "{answer}"
    );
    assert_eq!(g.link.held(), 0, "the refused request left the queue");
    // A client that streams a gibibyte: the gate stops taking it soon after the limit (what
    // it took is in socket buffers, not kept), instead of buffering it all.
    let mut c = TcpStream::connect(g.addr).await?;
    let (mut rd, mut wr) = c.split();
    let sent = std::sync::atomic::AtomicU64::new(0);
    let stream = async {
        wr.write_all(b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
            .await?;
        let piece = chunk(64 << 10);
        while sent.load(std::sync::atomic::Ordering::SeqCst) < 1 << 30 {
            wr.write_all(&piece).await?;
            sent.fetch_add(piece.len() as u64, std::sync::atomic::Ordering::SeqCst);
        }
        Ok::<_, std::io::Error>(())
    };
    let mut got = Vec::new();
    let (streamed, _) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(stream, rd.read_to_end(&mut got))
    })
    .await?;
    let sent = sent.into_inner();
    eprintln!("the gate took {sent} bytes of a streamed body");
    assert!(streamed.is_err(), "the gate took all {sent} bytes");
    assert!(sent < 128 << 20, "the gate took {sent} bytes");
    // Nothing was forwarded, and the service still wakes for (and serves) a small body.
    let waker = wake_after(g.link.clone(), Duration::ZERO);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = hyper::Request::post(format!("http://{}/small", g.addr))
        .body(Full::new(Bytes::from(vec![7u8; 1000])))?;
    let resp = client.request(req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    assert_eq!(&body[..], b"1000 bytes");
    waker.await?;
    Ok(())
}

#[tokio::test]
async fn a_held_body_under_the_limit_reaches_the_woken_service_whole() -> Result<()> {
    let backend = body_length_backend().await;
    let g = gate_with(
        Protocol::Http,
        backend,
        10,
        Duration::from_secs(30),
        small_hold_limit(),
    )
    .await;
    let waker = wake_after(g.link.clone(), Duration::from_millis(100));
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = hyper::Request::post(format!("http://{}/held", g.addr))
        .body(Full::new(Bytes::from(vec![1u8; 60 << 10])))?;
    let resp = client.request(req).await?;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await?.to_bytes();
    assert_eq!(&body[..], format!("{} bytes", 60 << 10).as_bytes());
    waker.await?;
    // Awake, a body far over the hold limit streams through untouched.
    let req = hyper::Request::post(format!("http://{}/awake", g.addr))
        .body(Full::new(Bytes::from(vec![2u8; 4 << 20])))?;
    let resp = client.request(req).await?;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await?.to_bytes();
    assert_eq!(&body[..], format!("{} bytes", 4 << 20).as_bytes());
    Ok(())
}

/// Reads one HTTP/2 frame: (type, flags, stream id, payload).
async fn h2_frame(rd: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    rd.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    rd.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

#[tokio::test]
async fn h2_streams_beyond_the_limit_are_refused_while_the_others_are_served() -> Result<()> {
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const REFUSED_STREAM: u32 = 7;
    let backend = http_backend().await;
    let limits = GateLimits {
        h2_max_concurrent_streams: 4,
        ..GateLimits::default()
    };
    let g = gate_with(
        Protocol::Http,
        backend,
        100,
        Duration::from_secs(30),
        limits,
    )
    .await;
    // A client that ignores the advertised limit and opens six streams at once while the
    // service sleeps (they are held, so they stay open).
    let mut c = TcpStream::connect(g.addr).await?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend([0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
    for id in [1u32, 3, 5, 7, 9, 11] {
        // :method GET, :scheme http, :path / from the static table; END_STREAM|END_HEADERS.
        out.extend([0, 0, 3, HEADERS, 0x5]);
        out.extend(id.to_be_bytes());
        out.extend([0x82, 0x86, 0x84]);
    }
    c.write_all(&out).await?;
    let (mut rd, mut wr) = c.split();
    let mut refused = Vec::new();
    let mut answered = Vec::new();
    let mut opened = false;
    tokio::time::timeout(Duration::from_secs(20), async {
        while answered.len() < 4 {
            let (kind, flags, stream, payload) = h2_frame(&mut rd).await?;
            match kind {
                SETTINGS if flags & 1 == 0 => {
                    wr.write_all(&[0, 0, 0, SETTINGS, 1, 0, 0, 0, 0]).await?
                }
                RST_STREAM => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    assert_eq!(code, REFUSED_STREAM, "stream {stream}");
                    refused.push(stream);
                }
                HEADERS => answered.push(stream),
                _ => {}
            }
            if refused.len() == 2 && !opened {
                // The four streams let in are held (their handlers may start a little later).
                while g.link.held() < 4 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                g.link.open();
                opened = true;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await??;
    refused.sort();
    answered.sort();
    assert_eq!(refused, vec![9, 11]);
    assert_eq!(answered, vec![1, 3, 5, 7]);
    Ok(())
}

#[tokio::test]
async fn a_failed_wake_tells_clients_to_retry_and_nothing_of_why() -> Result<()> {
    let backend = http_backend().await;
    let g = gate(Protocol::Http, backend, 10, Duration::from_secs(30)).await;
    g.link.fail_held(
        "restore failed: /var/lib/torpor/spill/svc/3/pages-1.img: checksum mismatch: \
         criu: Error (criu/cr-restore.c:1234): pool 10.0.0.5:7070 refused token",
    );
    let leaks = ["/", "criu", "checksum", "10.0.0.5", "token", "restore"];
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let resp = client.get(format!("http://{}/x", g.addr).parse()?).await?;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "5");
    let body = resp.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(body, "service svc could not be woken, retry later\n");
    for leak in leaks {
        assert!(!body.contains(leak), "{leak:?} in {body:?}");
    }
    let grpc = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let req = hyper::Request::post(format!("http://{}/grpc.health.v1.Health/Check", g.addr))
        .header("content-type", "application/grpc")
        .body(Empty::new())?;
    let resp = grpc.request(req).await?;
    assert_eq!(resp.headers()["grpc-status"], "14", "UNAVAILABLE");
    let message = resp.headers()["grpc-message"].to_str()?.to_string();
    assert_eq!(message, "service svc could not be woken, retry later");
    for leak in leaks {
        assert!(!message.contains(leak), "{leak:?} in {message:?}");
    }
    Ok(())
}

#[tokio::test]
async fn tcp_connections_over_the_limit_wait_and_do_not_stop_the_gate() -> Result<()> {
    let backend = echo_backend().await;
    let limits = GateLimits {
        max_connections: 2,
        ..GateLimits::default()
    };
    let g = gate_with(Protocol::Tcp, backend, 10, Duration::from_secs(30), limits).await;
    g.link.open();
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(g.addr).await?;
        c.write_all(b"a").await?;
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await?;
        open.push(c);
    }
    let mut late = TcpStream::connect(g.addr).await?;
    late.write_all(b"b").await?;
    let mut one = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_millis(300), late.read(&mut one)).await;
    assert!(waited.is_err(), "forwarded beyond the connection limit");
    drop(open.pop());
    tokio::time::timeout(Duration::from_secs(20), late.read_exact(&mut one)).await??;
    assert_eq!(&one, b"b");
    Ok(())
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_but_its_held_requests_are_answered() -> Result<()> {
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    let backend = http_backend().await;
    let limits = GateLimits {
        idle_timeout: Duration::from_millis(300),
        ..GateLimits::default()
    };
    let g = gate_with(Protocol::Http, backend, 10, Duration::from_secs(30), limits).await;
    // A client that opens HTTP/2 and asks for nothing is told to go, then cut.
    let mut c = TcpStream::connect(g.addr).await?;
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend([0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
    c.write_all(&hello).await?;
    let t0 = std::time::Instant::now();
    let mut kinds = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok((kind, ..)) = h2_frame(&mut c).await {
            kinds.push(kind);
        }
    })
    .await?;
    assert!(kinds.contains(&GOAWAY), "frames {kinds:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    // A request held longer than the idle timeout is still answered.
    let waker = wake_after(g.link.clone(), Duration::from_secs(1));
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let resp = client
        .get(format!("http://{}/held", g.addr).parse()?)
        .await?;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await?.to_bytes();
    assert_eq!(&body[..], b"HTTP/2.0 /held");
    waker.await?;
    Ok(())
}

/// Reads an HTTP head (up to the blank line) byte by byte, so nothing after it is taken.
async fn read_head(s: &mut TcpStream) -> Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tokio::time::timeout(Duration::from_secs(20), s.read_u8()).await??;
        head.push(b);
    }
    Ok(String::from_utf8(head)?)
}

/// One websocket frame (RFC 6455, payloads under 126 bytes): masked as a client sends it.
fn ws_frame(payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![
        0x81,
        payload.len() as u8 | if mask.is_some() { 0x80 } else { 0 },
    ];
    match mask {
        Some(m) => {
            f.extend_from_slice(&m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// Reads one frame: (first byte, unmasked payload).
async fn ws_read(s: &mut TcpStream) -> Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut h)).await??;
    let len = (h[1] & 0x7f) as usize;
    anyhow::ensure!(len < 126, "test frames are short");
    let mask = if h[1] & 0x80 != 0 {
        let mut m = [0u8; 4];
        s.read_exact(&mut m).await?;
        Some(m)
    } else {
        None
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await?;
    if let Some(m) = mask {
        p.iter_mut().enumerate().for_each(|(i, b)| *b ^= m[i % 4]);
    }
    Ok((h[0], p))
}

async fn websocket_echo(mut s: TcpStream) -> Result<()> {
    let head = read_head(&mut s).await?;
    anyhow::ensure!(head.to_ascii_lowercase().contains("upgrade: websocket"));
    s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: test\r\n\r\n").await?;
    loop {
        let (_, p) = ws_read(&mut s).await?;
        let answer = [b"echo: ".as_slice(), &p].concat();
        s.write_all(&ws_frame(&answer, None)).await?;
    }
}

/// A websocket service: answers the upgrade with 101, then echoes each text frame as
/// "echo: …".
async fn websocket_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(websocket_echo(s));
        }
    });
    addr
}

/// How long the policy would see the service idle now.
fn idle_for(link: &ServiceLink) -> Duration {
    let now = link.now();
    link.with_arrivals(|a| a.idle_for(now))
}

#[tokio::test]
async fn a_websocket_is_relayed_both_ways_keeps_the_service_active_and_is_closed_at_sleep(
) -> Result<()> {
    let backend = websocket_backend().await;
    let g = gate(Protocol::Http, backend, 10, Duration::from_secs(30)).await;
    g.link.open();
    let mut c = TcpStream::connect(g.addr).await?;
    c.write_all(b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await?;
    let head = read_head(&mut c).await?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // One message every 200 ms: every one answered, the service active all along, and the
    // open websocket never counted in flight (it must not keep a quiet service awake).
    for i in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let msg = format!("message {i}");
        c.write_all(&ws_frame(msg.as_bytes(), Some([1, 2, 3, 4])))
            .await?;
        let (op, answer) = ws_read(&mut c).await?;
        assert_eq!((op, answer), (0x81, format!("echo: {msg}").into_bytes()));
        assert!(
            idle_for(&g.link) < Duration::from_millis(150),
            "activity seen"
        );
        assert_eq!(g.link.inflight(), 0);
    }
    // Quiet: the policy sees it idle, and the drain before a sleep closes it cleanly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(idle_for(&g.link) >= Duration::from_millis(300));
    let d = g.link.drain(Duration::from_millis(50)).await;
    assert_eq!(d.still_inflight, 0, "nothing to wait for");
    let (op, payload) = ws_read(&mut c).await?;
    assert_eq!(
        (op, payload.as_slice()),
        (0x88, &[0x03, 0xe9][..]),
        "close 1001"
    );
    assert!(read_until_closed(&mut c).await.is_empty(), "then closed");
    Ok(())
}

/// An HTTP/2 service that streams every request body frame straight back (a bidirectional
/// gRPC stream's echo, at the HTTP/2 level).
async fn h2_echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let mut r = hyper::Response::new(req.into_body());
                        r.headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        Ok::<_, Infallible>(r)
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_bidirectional_grpc_stream_passes_message_by_message_keeps_the_service_active_and_is_ended_by_a_drain(
) -> Result<()> {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let backend = h2_echo_backend().await;
    let g = gate(Protocol::Http, backend, 10, Duration::from_secs(30)).await;
    g.link.open();
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, Infallible>>>>();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let req = hyper::Request::post(format!("http://{}/echo.Echo/Chat", g.addr))
        .header("content-type", "application/grpc")
        .body(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))?;
    // The first message goes before the answer's head can come (the echo answers at once).
    tx.send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x05hello"))))
        .await?;
    let mut body = client.request(req).await?.into_body();
    for i in 0..15u8 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            tx.send(Ok(Frame::data(Bytes::from(vec![0, 0, 0, 0, 1, i]))))
                .await?;
        }
        // Each message comes back before the next is sent: nothing is buffered.
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await?
            .expect("stream open")?;
        let data = frame.into_data().expect("data");
        if i == 0 {
            assert_eq!(&data[..], b"\0\0\0\0\x05hello");
        } else {
            assert_eq!(&data[..], &[0, 0, 0, 0, 1, i]);
        }
        // Each message is activity: a live stream is never slept under. The open stream
        // itself is not in flight (a quiet one must not keep the service awake).
        assert!(
            idle_for(&g.link) < Duration::from_millis(150),
            "activity seen"
        );
        assert_eq!(g.link.inflight(), 0);
    }
    // Quiet: the policy sees it idle, and the drain before a sleep ends the stream with
    // UNAVAILABLE (retry) rather than breaking it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(idle_for(&g.link) >= Duration::from_millis(300));
    let d = g.link.drain(Duration::from_millis(50)).await;
    assert_eq!(d.still_inflight, 0, "nothing to wait for");
    let last = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await?
        .expect("trailers")?;
    let trailers = last.into_trailers().expect("trailers, not data");
    assert_eq!(trailers["grpc-status"], "14", "{trailers:?}");
    assert!(tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await?
        .is_none());
    drop(tx);
    Ok(())
}
