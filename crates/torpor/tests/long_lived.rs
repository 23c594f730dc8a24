//! Long-lived connections under `torpor up`, with the real binary and real CRIU, in both
//! steering modes at once (one `torpor up`, a service per protocol and mode): a websocket and
//! a bidirectional gRPC stream each carry one message every 200 ms for 30 s, every message is
//! answered and no service is slept (or tried) under them; once they go quiet, with the
//! connections still open, every service sleeps. Through the gate (proxy) the gate sees the
//! bytes; kernel-steered, the agent reads the kernel's per-connection last-data times.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

use torpor_testkit::{embedded, own_addr, serial, Service, Up};

/// A node namespace of its own (another `torpor up` in the same one would take its
/// services for its own).
const NAMESPACE: &str = "longlived";

/// Long enough that a service started awake is still awake when its client connects (so a
/// kernel-steered one gets its stream steered), short enough to sleep soon after.
const IDLE: Duration = Duration::from_secs(3);

/// How long each client talks, and how often.
const TALK: Duration = Duration::from_secs(30);
const EVERY: Duration = Duration::from_millis(200);

/// The services: (name, steering, gRPC rather than websocket).
const SERVICES: [(&str, &str, bool); 4] = [
    ("ws-proxy", "proxy", false),
    ("ws-kernel", "kernel", false),
    ("grpc-proxy", "proxy", true),
    ("grpc-kernel", "kernel", true),
];

fn service(name: &str, steering: &str, grpc: bool, port: SocketAddr) -> Service {
    let backend = own_addr();
    let service = if grpc {
        Service::torpor(
            name,
            &["sample-grpc", "--listen", &backend.to_string()],
            port,
            backend,
        )
    } else {
        Service::sample(name, port, backend, "8MiB")
    };
    service
        .steering(steering)
        .idle(&format!("{}ms", IDLE.as_millis()))
}

/// A websocket client frame: final, text, masked.
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x17, 0xc3, 0x08];
    let mut f = vec![0x81, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Opens a websocket at `port` and checks the handshake as a client does.
fn websocket(port: SocketAddr) -> Result<BufReader<TcpStream>> {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let mut s = TcpStream::connect(port)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "GET /ws HTTP/1.1\r\nHost: torpor\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n")?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        anyhow::ensure!(
            r.read_line(&mut head)? > 0,
            "closed in the handshake: {head}"
        );
    }
    anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
    let accept = torpor_workload::websocket::accept_key(key);
    anyhow::ensure!(
        head.to_ascii_lowercase().contains(&format!(
            "sec-websocket-accept: {}",
            accept.to_ascii_lowercase()
        )),
        "{head}"
    );
    Ok(r)
}

/// One message every [`EVERY`] for [`TALK`] on a websocket, each answered; returns the
/// still open, now quiet, connection.
fn talk_websocket(port: SocketAddr) -> Result<BufReader<TcpStream>> {
    let mut r = websocket(port)?;
    let until = Instant::now() + TALK;
    let mut i = 0;
    while Instant::now() < until {
        let msg = format!("message {i}");
        r.get_mut().write_all(&text_frame(msg.as_bytes()))?;
        let mut h = [0u8; 2];
        r.read_exact(&mut h)
            .with_context(|| format!("answer to {msg}"))?;
        let mut p = vec![0; usize::from(h[1] & 0x7f)];
        r.read_exact(&mut p)?;
        anyhow::ensure!(
            h[0] == 0x81 && p == format!("echo: {msg}").as_bytes(),
            "{msg}: {h:?} {p:?}"
        );
        i += 1;
        std::thread::sleep(EVERY);
    }
    Ok(r)
}

/// The same on a bidirectional gRPC stream; returns it open and quiet (its sending end and
/// its answers).
async fn talk_grpc(
    port: SocketAddr,
) -> Result<(tokio::sync::mpsc::Sender<String>, tonic::Streaming<String>)> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{port}"))?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            tonic::codegen::http::uri::PathAndQuery::from_static(torpor_workload::grpc::ECHO_CHAT),
            tonic::codec::ProstCodec::<String, String>::default(),
        )
        .await?
        .into_inner();
    let until = Instant::now() + TALK;
    let mut i = 0;
    while Instant::now() < until {
        let msg = format!("message {i}");
        tx.send(msg.clone()).await?;
        let answer = answers
            .message()
            .await
            .with_context(|| format!("answer to {msg}"))?;
        anyhow::ensure!(answer == Some(format!("echo: {msg}")), "{msg}: {answer:?}");
        i += 1;
        tokio::time::sleep(EVERY).await;
    }
    Ok((tx, answers))
}

#[test]
fn websockets_and_grpc_streams_keep_their_services_awake_in_both_modes_until_quiet() -> Result<()> {
    let _g = serial();
    let ports: Vec<SocketAddr> = SERVICES.iter().map(|_| own_addr()).collect();
    let services = SERVICES
        .iter()
        .zip(&ports)
        .map(|((name, steering, grpc), port)| service(name, steering, *grpc, *port));
    let up = Up::launch(embedded().namespace(NAMESPACE).services(services))?;
    // Awake and (kernel) steered before the clients connect: their streams go straight to
    // the services.
    for (name, steering, _) in SERVICES {
        up.wait_for(name, "awake and steered", IDLE, |s| {
            s["state"] == "awake" && (steering == "proxy" || s["steered_now"] == true)
        })?;
    }

    let rt = tokio::runtime::Runtime::new()?;
    let (quiet_ws, quiet_grpc) = std::thread::scope(|scope| {
        let ws: Vec<_> = SERVICES
            .iter()
            .zip(&ports)
            .filter(|((_, _, grpc), _)| !grpc)
            .map(|(_, port)| scope.spawn(|| talk_websocket(*port)))
            .collect();
        let grpc = rt.block_on(async {
            let streams: Vec<_> = SERVICES
                .iter()
                .zip(&ports)
                .filter(|((_, _, grpc), _)| *grpc)
                .map(|(_, port)| tokio::spawn(talk_grpc(*port)))
                .collect();
            let mut quiet = Vec::new();
            for s in streams {
                quiet.push(s.await??);
            }
            anyhow::Ok(quiet)
        });
        let ws: Result<Vec<_>> = ws
            .into_iter()
            .map(|t| t.join().expect("websocket client"))
            .collect();
        anyhow::Ok((ws?, grpc?))
    })
    .with_context(|| up.log_text())?;

    for (name, steering, _) in SERVICES {
        let s = up.service(name)?;
        anyhow::ensure!(
            s["state"] == "awake" && s["sleeps"] == 0 && s["failed_checkpoints"] == 0,
            "{name} was slept under its stream: {s}"
        );
        if steering == "kernel" {
            anyhow::ensure!(
                s["steered_connections"].as_u64() >= Some(1),
                "{name}'s stream was not steered: {s}"
            );
        }
    }
    // Quiet, the connections still open: every service sleeps.
    for (name, _, _) in SERVICES {
        up.wait_for(name, "asleep after going quiet", 10 * IDLE, |s| {
            s["sleeps"].as_u64() >= Some(1)
        })?;
    }
    // Their quiet connections ended with the sleep: through the gate, a websocket with a
    // close frame and a gRPC stream with UNAVAILABLE; steered, with the checkpointed tree.
    for mut ws in quiet_ws {
        let mut rest = Vec::new();
        let ended = ws.read_to_end(&mut rest);
        anyhow::ensure!(
            ended.is_err() || rest.is_empty() || rest.starts_with(&[0x88]),
            "the websocket went on: {ended:?} {rest:?}"
        );
    }
    rt.block_on(async {
        for (_tx, mut answers) in quiet_grpc {
            let end = answers.message().await;
            anyhow::ensure!(!matches!(end, Ok(Some(_))), "the stream went on: {end:?}");
        }
        anyhow::Ok(())
    })?;
    Ok(())
}
