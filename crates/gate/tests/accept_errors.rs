//! A gate whose process runs out of file descriptors keeps listening. Its own test binary:
//! it lowers this process's open-file limit, which would break tests running beside it.

use std::{
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use torpor_control::{HoldLimits, ServiceLink};
use torpor_gate::{GateLimits, Protocol};

/// The log, kept to see the gate's accept errors.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .matches(needle)
            .count()
    }
}

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

/// One request on `c`; the answer's body.
async fn get(mut c: TcpStream) -> Result<String> {
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut got)).await??;
    let got = String::from_utf8_lossy(&got).to_string();
    anyhow::ensure!(got.starts_with("HTTP/1.1 200"), "answer: {got:?}");
    Ok(got.rsplit("\r\n").next().unwrap_or("").to_string())
}

#[tokio::test]
async fn running_out_of_file_descriptors_does_not_end_the_gate() -> Result<()> {
    let log = Log::default();
    tracing_subscriber::fmt()
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .with_ansi(false)
        .init();
    let backend = http_backend().await;
    let link = ServiceLink::new(
        "svc",
        HoldLimits {
            depth: 10,
            timeout: Duration::from_secs(30),
        },
    );
    link.open();
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(torpor_gate::run(
        l,
        Protocol::Http,
        backend,
        link.clone(),
        GateLimits::default(),
        async {
            let _ = stopped.await;
        },
    ));
    assert_eq!(get(TcpStream::connect(addr).await?).await?, "up");

    // Take every descriptor but one, and give that one to a client: its connection waits in
    // the gate's backlog, and the gate's accept fails with EMFILE.
    let open = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, open + 16, hard)?;
    let mut filler = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        filler.push(f);
    }
    filler.pop();
    let waiting = TcpStream::connect(addr).await?;
    let t0 = Instant::now();
    while log.count("accept failed") < 6 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no accept error seen"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Six failures in a row took at least the backoff between them (5+10+20+40+80 ms): the
    // gate does not spin while descriptors are short.
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(150),
        "six accept errors in {took:?}"
    );
    assert!(log.count("Too many open files") >= 6);

    // Descriptors are back: the waiting client is served, and so is a new one.
    drop(filler);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard)?;
    assert_eq!(get(waiting).await?, "up");
    assert_eq!(get(TcpStream::connect(addr).await?).await?, "up");
    Ok(())
}
