//! A flood of hostile clients against one gate, with the figures the issue asks for (RSS is
//! this whole process's, the clients' side included).

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
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
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("up"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_silent_and_three_hundred_oversized_header_clients_do_not_stop_the_gate(
) -> Result<()> {
    let backend = http_backend().await;
    let link = ServiceLink::new(
        "svc",
        HoldLimits {
            depth: 256,
            timeout: Duration::from_secs(30),
        },
    );
    link.open();
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = GateLimits {
        max_connections: 256,
        ..GateLimits::default()
    };
    tokio::spawn(torpor_gate::run(
        l,
        Protocol::Http,
        backend,
        link,
        limits,
        async {
            let _ = stopped.await;
        },
    ));
    let rss0 = rss_bytes();
    let mut silent = Vec::new();
    for _ in 0..2000 {
        silent.push(TcpStream::connect(addr).await?);
    }
    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(256 << 10)
    );
    let mut oversized = Vec::new();
    for _ in 0..300 {
        let mut c = TcpStream::connect(addr).await?;
        let big = big.clone();
        oversized.push(tokio::spawn(async move {
            let _ = c.write_all(big.as_bytes()).await;
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut got)).await;
            String::from_utf8_lossy(&got)
                .lines()
                .next()
                .map(str::to_string)
        }));
    }
    let t0 = std::time::Instant::now();
    let mut c = TcpStream::connect(addr).await?;
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut got)).await??;
    let served_in = t0.elapsed();
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    let mut growth = rss_bytes().saturating_sub(rss0);
    let mut refused = 0;
    for t in oversized {
        if t.await?.as_deref() == Some("HTTP/1.1 431 Request Header Fields Too Large") {
            refused += 1;
        }
    }
    growth = growth.max(rss_bytes().saturating_sub(rss0));
    eprintln!(
        "flood: a client served in {served_in:?}, RSS growth {} KiB, {refused}/300 oversized heads answered 431",
        growth >> 10
    );
    assert!(
        served_in < Duration::from_secs(5),
        "served in {served_in:?}"
    );
    assert!(growth < 64 << 20, "RSS grew {growth} bytes");
    drop(silent);
    Ok(())
}
