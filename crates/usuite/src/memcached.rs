//! A small memcached text-protocol client (get/set) over one connection that is re-opened when
//! it breaks: a Router bucket restored from a snapshot finds its old connection closed.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::Mutex,
};

/// Largest value memcached takes by default.
pub const MAX_VALUE: usize = 1 << 20;

/// Why memcached did not answer as expected.
#[derive(Debug, Error)]
pub enum MemcachedError {
    #[error("memcached at {0} unreachable")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("memcached connection")]
    Io(#[from] std::io::Error),
    #[error("memcached answered {0:?}")]
    Protocol(String),
    #[error("key {0:?} is not a memcached key (1-250 bytes, no spaces or control characters)")]
    BadKey(String),
}

/// One memcached server.
#[derive(Debug)]
pub struct Memcached {
    addr: SocketAddr,
    conn: Mutex<Option<BufReader<TcpStream>>>,
}

pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 250 && key.bytes().all(|b| b > b' ' && b != 0x7f)
}

impl Memcached {
    pub fn new(addr: SocketAddr) -> Memcached {
        Memcached {
            addr,
            conn: Mutex::new(None),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, MemcachedError> {
        if !valid_key(key) {
            return Err(MemcachedError::BadKey(key.into()));
        }
        self.with_conn(|c| Box::pin(get_on(c, key.to_string())))
            .await
    }

    pub async fn set(&self, key: &str, value: &[u8]) -> Result<(), MemcachedError> {
        if !valid_key(key) {
            return Err(MemcachedError::BadKey(key.into()));
        }
        self.with_conn(|c| Box::pin(set_on(c, key.to_string(), value.to_vec())))
            .await
    }

    /// Runs `op` on the connection, opening it first if needed; once more on a fresh connection
    /// if the old one failed.
    async fn with_conn<T>(
        &self,
        op: impl Fn(
            &mut BufReader<TcpStream>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, MemcachedError>> + Send + '_>,
        >,
    ) -> Result<T, MemcachedError> {
        let mut guard = self.conn.lock().await;
        for attempt in 0..2 {
            if guard.is_none() {
                let s = TcpStream::connect(self.addr)
                    .await
                    .map_err(|e| MemcachedError::Connect(self.addr, e))?;
                s.set_nodelay(true)?;
                *guard = Some(BufReader::new(s));
            }
            let conn = guard.as_mut().expect("connection just opened");
            match op(conn).await {
                Err(MemcachedError::Io(_)) if attempt == 0 => *guard = None,
                other => return other,
            }
        }
        unreachable_retry()
    }
}

fn unreachable_retry<T>() -> Result<T, MemcachedError> {
    Err(MemcachedError::Protocol(
        "no answer after a reconnect".into(),
    ))
}

async fn get_on(
    c: &mut BufReader<TcpStream>,
    key: String,
) -> Result<Option<Vec<u8>>, MemcachedError> {
    c.get_mut()
        .write_all(format!("get {key}\r\n").as_bytes())
        .await?;
    let mut line = String::new();
    if c.read_line(&mut line).await? == 0 {
        return Err(MemcachedError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    if line == "END\r\n" {
        return Ok(None);
    }
    let parts: Vec<&str> = line.split_whitespace().collect();
    let len: usize = match parts.as_slice() {
        ["VALUE", k, _flags, len] if *k == key => len
            .parse()
            .map_err(|_| MemcachedError::Protocol(line.clone()))?,
        _ => return Err(MemcachedError::Protocol(line)),
    };
    if len > MAX_VALUE {
        return Err(MemcachedError::Protocol(format!("value of {len} bytes")));
    }
    let mut data = vec![0u8; len + 2];
    c.read_exact(&mut data).await?;
    data.truncate(len);
    let mut end = String::new();
    c.read_line(&mut end).await?;
    if end != "END\r\n" {
        return Err(MemcachedError::Protocol(end));
    }
    Ok(Some(data))
}

async fn set_on(
    c: &mut BufReader<TcpStream>,
    key: String,
    value: Vec<u8>,
) -> Result<(), MemcachedError> {
    let mut msg = format!("set {key} 0 0 {}\r\n", value.len()).into_bytes();
    msg.extend_from_slice(&value);
    msg.extend_from_slice(b"\r\n");
    c.get_mut().write_all(&msg).await?;
    let mut line = String::new();
    if c.read_line(&mut line).await? == 0 {
        return Err(MemcachedError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    if line == "STORED\r\n" {
        Ok(())
    } else {
        Err(MemcachedError::Protocol(line))
    }
}

/// A memcached server (the apt package) started on a free loopback port, killed when dropped.
#[derive(Debug)]
pub struct MemcachedServer {
    child: Child,
    pub addr: SocketAddr,
}

impl MemcachedServer {
    pub fn start(megabytes: u32) -> std::io::Result<MemcachedServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("memcached")
            .args([
                "-l",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "0",
                "-u",
                "root",
            ])
            .arg("-m")
            .arg(megabytes.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot run memcached (apt install memcached): {e}"),
                )
            })?;
        // Owned at once, so an early return still kills it.
        let me = MemcachedServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(me.addr).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("memcached did not listen on {}", me.addr),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(me)
    }
}

impl Drop for MemcachedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
