//! The status API of `torpor up` keeps listening when the process runs out of file
//! descriptors. Its own test binary: it lowers this process's open-file limit.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

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

/// `GET /status` on `c`; the answer's body.
async fn get(mut c: TcpStream) -> Result<String> {
    c.write_all(b"GET /status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut got)).await??;
    let got = String::from_utf8_lossy(&got).to_string();
    anyhow::ensure!(got.starts_with("HTTP/1.1 200"), "answer: {got:?}");
    Ok(got.rsplit("\r\n").next().unwrap_or("").to_string())
}

#[tokio::test]
async fn the_status_api_survives_running_out_of_file_descriptors() -> Result<()> {
    let log = Log::default();
    tracing_subscriber::fmt()
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .with_ansi(false)
        .init();
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(torpor_up::status::serve_with(
        l,
        async {
            let _ = stopped.await;
        },
        |req| hyper::Response::new(Full::new(Bytes::from(req.uri().path().to_string()))),
    ));
    assert_eq!(get(TcpStream::connect(addr).await?).await?, "/status");

    // Every descriptor but one taken, and that one given to a client: the API's accept fails
    // with EMFILE while the client waits in its backlog.
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
    while log.count("accept failed") < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no accept error seen"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(log.count("status API") >= 3, "the log names the listener");

    drop(filler);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard)?;
    assert_eq!(get(waiting).await?, "/status");
    assert_eq!(get(TcpStream::connect(addr).await?).await?, "/status");
    Ok(())
}
