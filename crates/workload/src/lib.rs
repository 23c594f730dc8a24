//! The sample service that torpor checkpoints in its tests, demo and benchmarks: it holds a
//! buffer of seeded pseudo-random bytes (so its memory can be checked bit for bit after a
//! restore), a counter that a [`ticker`] advances 100 times a second (so it visibly keeps
//! running; with `tick_work` each tick also does a runtime's background work),
//! and answers a line protocol over TCP: `PING` → `PONG`, `SUM` → CRC32C of the buffer,
//! `COUNT` → the counter, `TOUCH` → reads and changes every page of the buffer's first
//! `touch` bytes and answers their CRC32C (a service whose requests touch a known amount of
//! memory, for lazy restore), or the same over HTTP/1.1 (`GET /ping`, `/sum`, `/count`,
//! `/touch`), and a websocket echo at `GET /ws` ([`websocket`]). Plain threads and blocking sockets: nothing that would make the checkpoint about
//! the runtime rather than the memory.
//!
//! [`mutator`] is the other sample: a service whose requests exercise what makes restoring
//! memory hard, for differential tests.

use std::{
    fs,
    io::{self, BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use rand::{rngs::SmallRng, RngCore, SeedableRng};

pub mod grpc;
pub mod mutator;
pub mod ticker;
pub mod websocket;

/// The page size the sample services touch memory by.
pub const PAGE: usize = 4096;

/// What a `TOUCH` request touches unless `--touch` says otherwise: a hot set the size of a
/// typical request's working memory, for benchmarks of lazy restore.
pub const DEFAULT_TOUCH: u64 = 16 << 20;

/// How the sample service starts.
#[derive(Debug, Clone)]
pub struct SampleConfig {
    pub listen: SocketAddr,
    /// Bytes of seeded random memory to hold.
    pub memory: u64,
    pub seed: u64,
    /// Bytes at the start of the buffer that each `TOUCH` reads and changes (clipped to
    /// `memory`): what one request costs a lazily restored service.
    pub touch: u64,
    /// Written with the bound port once listening (useful with port 0).
    pub port_file: Option<PathBuf>,
    /// The background timer that advances the counter (and does its work while idle).
    pub ticker: ticker::Ticker,
}

/// The buffer the service holds for a size and seed.
pub fn seeded_buffer(memory: u64, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; memory as usize];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut buf);
    buf
}

/// Runs the service; returns only on a listen error.
pub fn run(cfg: &SampleConfig) -> io::Result<()> {
    let memory = Arc::new(Memory {
        buf: Mutex::new(seeded_buffer(cfg.memory, cfg.seed)),
        touch: cfg.touch.min(cfg.memory) as usize,
    });
    let counter = Arc::new(AtomicU64::new(0));
    let listener = TcpListener::bind(cfg.listen)?;
    if let Some(p) = &cfg.port_file {
        write_port_file(p, listener.local_addr()?.port())?;
    }
    cfg.ticker.spawn(counter.clone());
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (memory, counter) = (memory.clone(), counter.clone());
        thread::spawn(move || {
            let _ = serve(conn, &memory, &counter);
        });
    }
    Ok(())
}

/// The service's buffer; `TOUCH` changes it, so connections share it behind a lock.
struct Memory {
    buf: Mutex<Vec<u8>>,
    /// Bytes `TOUCH` covers, already clipped to the buffer.
    touch: usize,
}

/// Adds 1 to the first byte of every page of `region`, then answers the CRC32C of the whole
/// region and its length: every page is read and written once.
pub fn touch_region(region: &mut [u8]) -> String {
    for page in region.chunks_mut(PAGE) {
        page[0] = page[0].wrapping_add(1);
    }
    format!("{:08x} {}", crc32c::crc32c(region), region.len())
}

/// The answer to the `times`-th `TOUCH` (from 1) of a fresh service with this size, seed and
/// touch size.
pub fn expected_touch(memory: u64, seed: u64, touch: u64, times: u32) -> String {
    let mut buf = seeded_buffer(memory, seed);
    let region = &mut buf[..touch.min(memory) as usize];
    let mut answer = String::new();
    for _ in 0..times {
        answer = touch_region(region);
    }
    answer
}

fn answer(cmd: &str, memory: &Memory, counter: &AtomicU64) -> Option<String> {
    // A panicked holder cannot leave the bytes invalid: every state of them is a valid buffer.
    let lock = || memory.buf.lock().unwrap_or_else(|e| e.into_inner());
    match cmd {
        "PING" => Some("PONG".to_string()),
        "SUM" => {
            let buf = lock();
            Some(format!("{:08x} {}", crc32c::crc32c(&buf), buf.len()))
        }
        "COUNT" => Some(counter.load(Ordering::Relaxed).to_string()),
        "TOUCH" => Some(touch_region(&mut lock()[..memory.touch])),
        _ => None,
    }
}

/// Serves one connection: the line protocol, or HTTP/1.1 `GET /ping|/sum|/count|/touch`
/// (keep-alive) when the first line is an HTTP request line, or a websocket after `GET /ws`
/// with a `Sec-WebSocket-Key`.
fn serve(conn: TcpStream, memory: &Memory, counter: &AtomicU64) -> io::Result<()> {
    // Answers are small and final: no Nagle delay waiting for the peer's ACK.
    conn.set_nodelay(true)?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim();
        if let Some(target) = cmd.strip_prefix("GET ") {
            let path = target.split_whitespace().next().unwrap_or("/");
            let mut header = String::new();
            let mut websocket_key = None;
            loop {
                header.clear();
                if reader.read_line(&mut header)? == 0 {
                    return Ok(());
                }
                if header.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = header.split_once(':') {
                    if k.trim().eq_ignore_ascii_case("sec-websocket-key") {
                        websocket_key = Some(v.trim().to_string());
                    }
                }
            }
            if let (Some(key), "/ws") = (&websocket_key, path) {
                return websocket::serve(key, &mut reader, &mut out);
            }
            let key = path.trim_start_matches('/').to_ascii_uppercase();
            let (status, body) = match answer(&key, memory, counter) {
                Some(b) => ("200 OK", b),
                None => ("404 Not Found", format!("no such path {path}")),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            out.write_all(response.as_bytes())?;
        } else {
            let mut reply = answer(cmd, memory, counter)
                .unwrap_or_else(|| format!("ERR unknown command {cmd:?}"));
            reply.push('\n');
            out.write_all(reply.as_bytes())?;
        }
    }
}

/// A connection to the sample service.
#[derive(Debug)]
pub struct SampleClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl SampleClient {
    pub fn connect(addr: SocketAddr) -> io::Result<SampleClient> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(SampleClient {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Connects, retrying until `timeout` (for a service that is still starting).
    pub fn connect_within(addr: SocketAddr, timeout: Duration) -> io::Result<SampleClient> {
        let deadline = Instant::now() + timeout;
        loop {
            match SampleClient::connect(addr) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    pub fn call(&mut self, cmd: &str) -> io::Result<String> {
        self.writer.write_all(cmd.as_bytes())?;
        self.writer.write_all(b"\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "service closed the connection",
            ));
        }
        Ok(line.trim_end().to_string())
    }

    pub fn count(&mut self) -> io::Result<u64> {
        self.call("COUNT")?
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// The `SUM` answer a service with this size and seed must give.
pub fn expected_sum(memory: u64, seed: u64) -> String {
    let buf = seeded_buffer(memory, seed);
    format!("{:08x} {}", crc32c::crc32c(&buf), buf.len())
}

/// Writes `port` to `path` whole (through a rename), so [`wait_port_file`] never reads half
/// of it.
pub fn write_port_file(path: &std::path::Path, port: u16) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, port.to_string())?;
    fs::rename(tmp, path)
}

/// Waits for a port file written by [`run`] (or [`write_port_file`]).
pub fn wait_port_file(path: &std::path::Path, timeout: Duration) -> io::Result<u16> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return Ok(p);
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "sample service did not start",
            ));
        }
        thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: u64 = 9;

    fn memory(size: u64, touch: u64) -> Memory {
        Memory {
            buf: Mutex::new(seeded_buffer(size, SEED)),
            touch: touch.min(size) as usize,
        }
    }

    #[test]
    fn touch_changes_every_page_of_its_region_and_nothing_else() {
        let (size, touch) = (64 * PAGE as u64, 16 * PAGE as u64 + 100);
        let m = memory(size, touch);
        let counter = AtomicU64::new(0);
        let before = seeded_buffer(size, SEED);
        let first = answer("TOUCH", &m, &counter).unwrap();
        assert_eq!(first, expected_touch(size, SEED, touch, 1));
        assert!(first.ends_with(&format!(" {touch}")), "{first}");
        let after = m.buf.lock().unwrap().clone();
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            let in_touch = (i as u64) < touch;
            assert_eq!(
                a != b,
                in_touch && i % PAGE == 0,
                "byte {i}: only the first byte of each touched page changes"
            );
        }
        let second = answer("TOUCH", &m, &counter).unwrap();
        assert_ne!(second, first);
        assert_eq!(second, expected_touch(size, SEED, touch, 2));
        assert_eq!(
            answer("SUM", &m, &counter).unwrap(),
            format!("{:08x} {size}", crc32c::crc32c(&m.buf.lock().unwrap()))
        );
    }

    #[test]
    fn touch_is_clipped_to_the_memory() {
        let m = memory(8 * PAGE as u64, 1 << 30);
        let counter = AtomicU64::new(0);
        let got = answer("TOUCH", &m, &counter).unwrap();
        assert_eq!(got, expected_touch(8 * PAGE as u64, SEED, 1 << 30, 1));
        assert!(got.ends_with(&format!(" {}", 8 * PAGE)), "{got}");
    }
}
