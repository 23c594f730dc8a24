//! Kernel steering under `torpor up`, with the real binary, real CRIU and the sk_lookup
//! program in the host's network namespace (for the test's own loopback address only): while
//! the service is awake its connections go straight to it and count as arrivals (so it is not
//! slept under them); idle, it is unsteered and checkpointed, the gate holds the next
//! request and wakes it, and the restored service is steered again.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use torpor_testkit::{embedded, own_addr, serial, Service, Up};

/// The policy's idle threshold for the service here.
const IDLE: Duration = Duration::from_secs(1);

/// One `GET path` on a fresh connection, read to the end of its body (the sample service keeps
/// a connection open after answering, so the end is its `Content-Length`), then closed.
fn get(to: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(to)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: torpor\r\n\r\n")?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "answer: {status:?}");
    let mut length = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let line = line.trim();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(v.trim().parse::<usize>()?);
            }
        }
    }
    let mut body = vec![0; length.context("a Content-Length")?];
    r.read_exact(&mut body)?;
    Ok(String::from_utf8(body)?)
}

/// A node namespace of its own: the cgroups of other tests' services (the default
/// namespace's) are never taken for this one's, nor this one's for theirs.
const NAMESPACE: &str = "steertest";

/// `torpor up` with the steered sample service, gate on `port`.
fn up(port: SocketAddr, backend: SocketAddr) -> Result<Up> {
    Up::launch(
        embedded()
            .namespace(NAMESPACE)
            .services([steered_sample(port, backend)]),
    )
}

/// Waits until "web" is steered in the kernel (or torpor says why it cannot be) and fails
/// unless it is; its status then.
fn wait_steered(up: &Up) -> Result<serde_json::Value> {
    let s = up.wait_for("web", "steered", Duration::from_secs(30), |s| {
        s["steered_now"] == true || s["steering_problem"].is_string()
    })?;
    anyhow::ensure!(
        s["steering"] == "kernel" && s["steered_now"] == true,
        "not steered: {s}"
    );
    Ok(s)
}

/// The steered sample service, gate on `port`.
fn steered_sample(port: SocketAddr, backend: SocketAddr) -> Service {
    let idle = format!("{}ms", IDLE.as_millis());
    Service::sample("web", port, backend, "8MiB")
        .idle(&idle)
        .steering("kernel")
}

#[test]
fn a_quiet_steered_connection_does_not_keep_the_service_awake_and_ends_with_its_sleep() -> Result<()>
{
    let _g = serial();
    let (port, backend) = (own_addr(), own_addr());
    let mut up = up(port, backend)?;
    wait_steered(&up)?;
    // One keep-alive connection, straight to the service, answered, then quiet.
    let mut conn = TcpStream::connect(port)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    writeln!(conn, "PING")?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    assert_eq!(line, "PONG\n");
    up.wait_for("web", "seeing its open connection", 4 * IDLE, |s| {
        s["steered_open"] == 1
    })?;
    // Open but quiet: no data on it within the idle threshold, so it is no activity, and the
    // service sleeps; the connection ends with the checkpointed tree.
    up.wait_for("web", "asleep under a quiet connection", 10 * IDLE, |s| {
        s["sleeps"] == 1
    })?;
    line.clear();
    let ended = match reader.read_line(&mut line) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    anyhow::ensure!(ended, "the steered connection outlived the sleep: {line:?}");
    // The next request is held by the gate and wakes it.
    assert_eq!(get(port, "/ping")?, "PONG");
    let status = up.stop()?;
    anyhow::ensure!(
        status.success(),
        "torpor up: {status}; log:\n{}",
        up.log_text()
    );
    Ok(())
}

#[test]
fn a_kernel_steered_service_is_reached_directly_while_awake_and_held_by_the_gate_while_asleep(
) -> Result<()> {
    let _g = serial();
    let (port, backend) = (own_addr(), own_addr());
    let mut up = up(port, backend)?;
    let s = wait_steered(&up)?;

    // Awake: a connection every 100 ms for three idle thresholds, each answered by the
    // service itself, none seen by the gate, and the service is not slept under them.
    let steered0 = s["steered_connections"].as_u64().context("counter")?;
    let until = Instant::now() + 3 * IDLE;
    let mut sent = 0;
    while Instant::now() < until {
        assert_eq!(
            get(port, "/ping").with_context(|| format!("awake; log:\n{}", up.log_text()))?,
            "PONG"
        );
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = up.service("web")?;
    anyhow::ensure!(s["state"] == "awake" && s["sleeps"] == 0, "slept: {s}");
    let steered = s["steered_connections"].as_u64().context("counter")? - steered0;
    anyhow::ensure!(steered >= sent, "{sent} sent, {steered} steered: {s}");
    let text = up.status_text()?;
    anyhow::ensure!(
        text.contains("web: kernel steering, steered now"),
        "torpor status says:\n{text}"
    );

    // Idle: unsteered and asleep; the next connection reaches the gate, which holds it and
    // wakes the service, and the answer comes from the restored service.
    let s = up.wait_state("web", "asleep", Duration::from_secs(60))?;
    anyhow::ensure!(s["steered_now"] == false, "still steered asleep: {s}");
    let before = s["steered_connections"].as_u64().context("counter")?;
    assert_eq!(
        get(port, "/ping").with_context(|| format!("asleep; log:\n{}", up.log_text()))?,
        "PONG"
    );
    let s = up.wait_for("web", "awake and steered", Duration::from_secs(30), |s| {
        s["state"] == "awake" && s["steered_now"] == true
    })?;
    anyhow::ensure!(s["wakes"] == 1, "{s}");
    let held = s["steered_connections"].as_u64().context("counter")?;
    anyhow::ensure!(held == before, "the held request was steered: {s}");

    // Awake again: steered again.
    for _ in 0..5 {
        assert_eq!(
            get(port, "/ping").with_context(|| format!("woken; log:\n{}", up.log_text()))?,
            "PONG"
        );
    }
    let s = up.service("web")?;
    let after = s["steered_connections"].as_u64().context("counter")?;
    anyhow::ensure!(after >= before + 5, "not steered after the wake: {s}");

    let status = up.stop()?;
    if !status.success() {
        bail!("torpor up exited with {status}; log:\n{}", up.log_text());
    }
    // Nothing steers the address any more: nothing answers there.
    anyhow::ensure!(
        TcpStream::connect_timeout(&port, Duration::from_secs(1)).is_err(),
        "something still answers on {port} after the stop"
    );
    Ok(())
}

#[test]
fn a_crashed_torpor_leaves_no_steering_behind_and_the_next_start_steers_again() -> Result<()> {
    let _g = serial();
    let (port, backend) = (own_addr(), own_addr());
    let mut up = up(port, backend)?;
    wait_steered(&up)?;
    assert_eq!(get(port, "/ping")?, "PONG");
    // torpor dies without a word; the service it started outlives it, still listening.
    up.signal_and_wait(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(60))?;
    assert_eq!(
        get(backend, "/ping")?,
        "PONG",
        "the service outlived torpor"
    );
    // The program went with torpor's descriptors: the public address no longer reaches the
    // service, nor anything else.
    anyhow::ensure!(
        TcpStream::connect_timeout(&port, Duration::from_secs(1)).is_err(),
        "{port} still reaches something after the crash"
    );
    // The next start clears the leftover service and steers its own.
    let mut again = self::up(port, backend)?;
    wait_steered(&again)?;
    assert_eq!(get(port, "/ping")?, "PONG");
    let status = again.stop()?;
    anyhow::ensure!(status.success(), "{}", again.log_text());
    Ok(())
}
