//! Plain HTTP/1.1 to a gate or a status API, from a blocking test, with no client library:
//! one GET a connection, and the two requests that read and change the sample service's state.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{ensure, Context, Result};

/// A plain HTTP/1.1 GET; returns the body of a 200 answer (HTTP/1.0 or 1.1).
pub fn http_get(to: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(to)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: torpor\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("HTTP answer")?;
    ensure!(
        head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200"),
        "answer: {head}"
    );
    Ok(body.to_string())
}

/// The sample service's state as its memory shows it: the checksum of its buffer, which
/// every `/touch` changes (a cold start would answer the seed's checksum again).
pub fn sample_sum(gate: SocketAddr) -> Result<String> {
    http_get(gate, "/sum")
}

/// Changes the sample service's memory `times` times (`/touch`) and returns its state after.
pub fn sample_change(gate: SocketAddr, times: usize) -> Result<String> {
    for _ in 0..times {
        http_get(gate, "/touch")?;
    }
    sample_sum(gate)
}
