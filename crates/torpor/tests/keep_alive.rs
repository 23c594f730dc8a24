//! A keep-alive HTTP/1.1 client across sleeps under `torpor up`, with the real binary and
//! real CRIU, in both steering modes at once: one request a second, the service sleeping
//! between them (a short idle threshold), five sleeps each, not one error. Through the gate
//! the client's connection outlives every sleep (the gate holds it); kernel-steered, the
//! connection is the service's own and ends with the checkpoint (`--tcp-close`), between
//! requests, so the client opens a new one, which the gate holds while the service wakes.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use torpor_testkit::{embedded, own_addr, serial, Service, Up};

/// A node namespace of its own.
const NAMESPACE: &str = "keepalive";

const SLEEPS: u64 = 5;

fn service(name: &str, steering: &str, port: SocketAddr) -> Service {
    Service::sample(name, port, own_addr(), "8MiB")
        .idle("300ms")
        .steering(steering)
}

/// One request a second on `port` through a pooled keep-alive client until `name` has slept
/// [`SLEEPS`] times; every answer a 200 "PONG". Returns how many requests it took.
async fn every_second_until_slept(up: &Up, name: &str, port: SocketAddr) -> Result<u64> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let url = format!("http://{port}/ping");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let resp = client
            .get(url.parse()?)
            .await
            .with_context(|| format!("{name}: request {sent}"))?;
        anyhow::ensure!(resp.status() == 200, "{name}: {}", resp.status());
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(body == "PONG", "{name}: {body:?}");
        sent += 1;
        let s = tokio::task::block_in_place(|| up.service(name))?;
        if s["sleeps"].as_u64() >= Some(SLEEPS) {
            return Ok(sent);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name} did not sleep enough: {s}"
        );
    }
}

#[test]
fn a_keep_alive_client_sees_no_error_across_five_sleeps_in_both_modes() -> Result<()> {
    let _g = serial();
    let (proxied, steered) = (own_addr(), own_addr());
    let services = [
        service("proxied", "proxy", proxied),
        service("steered", "kernel", steered),
    ];
    let up = Up::launch(embedded().namespace(NAMESPACE).services(services))?;
    let rt = tokio::runtime::Runtime::new()?;
    let (a, b) = rt.block_on(async {
        tokio::join!(
            every_second_until_slept(&up, "proxied", proxied),
            every_second_until_slept(&up, "steered", steered)
        )
    });
    let (a, b) = (
        a.with_context(|| up.log_text())?,
        b.with_context(|| up.log_text())?,
    );
    for name in ["proxied", "steered"] {
        let s = up.service(name)?;
        anyhow::ensure!(
            s["wakes"].as_u64() >= Some(SLEEPS - 1) && s["cold_starts"] == 0,
            "{s}"
        );
    }
    // Awake between sleeps, the steered service was reached directly.
    let s = up.service("steered")?;
    anyhow::ensure!(s["steered_connections"].as_u64() >= Some(1), "{s}");
    eprintln!("{a} requests through the gate, {b} kernel-steered, {SLEEPS} sleeps each");
    Ok(())
}
