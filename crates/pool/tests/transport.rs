//! Transport security and client timeouts: TLS pools in-process on 127.0.0.1:0 with pinned
//! self-signed certificates and mutual TLS, and fake pools (bare sockets) that go silent at
//! each stage, to show every hang ends in `ClientError::Timeout` within the bound.

mod common;

use common::{get, pattern, put};
use std::{
    io::Read,
    net::{TcpListener, TcpStream},
    sync::{mpsc, Arc},
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use torpor_image::{
    manifest::SnapshotMeta,
    wire::{self, Frame, Request, Response},
    CHUNK_SIZE,
};
use torpor_pool::{
    serve, tls, ClientError, ClientTls, Listener, PoolAddr, PoolTarget, Stage, Store, StoreConfig,
    Timeouts,
};

const TOKEN: &str = "transport-token-0123456789";

/// A pool served on its own runtime and thread, stopped when dropped.
struct Running {
    addr: PoolAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
    }
}

fn start(capacity: u64, tls: Option<Arc<rustls::ServerConfig>>) -> Running {
    let store = Arc::new(
        Store::open(StoreConfig {
            capacity,
            spill_dir: None,
            keep: 2,
        })
        .unwrap(),
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = mpsc::channel();
    let thread = thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let mut l = Listener::bind(&"127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            if let Some(config) = tls {
                l = l.with_tls(config).unwrap();
            }
            addr_tx.send(l.local_addr().unwrap()).unwrap();
            serve(l, store, Some(TOKEN.into()), async {
                let _ = rx.await;
            })
            .await;
        })
    });
    Running {
        addr: addr_rx.recv().unwrap(),
        stop: Some(tx),
        thread: Some(thread),
    }
}

/// Certificates and keys written by `tls::generate` (as `torpor pool-cert --client` does).
struct Certs {
    /// Holds the files for the test's duration.
    _dir: tempfile::TempDir,
    g: tls::GeneratedFiles,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let g = tls::generate(dir.path(), &["127.0.0.1".into()], true).unwrap();
        Certs { _dir: dir, g }
    }
    fn server(&self, mutual: bool) -> Arc<rustls::ServerConfig> {
        let ca = self.g.client.as_ref().map(|(ca, _, _)| ca.as_path());
        tls::server_config(&self.g.pool_cert, &self.g.pool_key, ca.filter(|_| mutual)).unwrap()
    }
    fn pinned(&self) -> ClientTls {
        ClientTls::pinned(&self.g.pool_cert, None).unwrap()
    }
    fn pinned_with_identity(&self) -> ClientTls {
        let (_, cert, key) = self.g.client.as_ref().unwrap();
        ClientTls::pinned(&self.g.pool_cert, Some((cert.as_path(), key.as_path()))).unwrap()
    }
}

/// A put and get that works proves the pool still serves.
fn serves(target: &PoolTarget) -> Result<()> {
    let mut c = target.connect()?;
    let g = put(
        &mut c,
        "alive",
        &[("inventory.img", b"still here".to_vec())],
    )?;
    assert_eq!(get(&mut c, "alive", g, "inventory.img")?, b"still here");
    Ok(())
}

fn short(connect: u64, frame: u64) -> Timeouts {
    Timeouts {
        connect: Duration::from_millis(connect),
        frame: Duration::from_millis(frame),
    }
}

#[test]
fn a_pool_with_a_pinned_self_signed_certificate_round_trips_snapshots_over_tls() -> Result<()> {
    let certs = Certs::new();
    let p = start(32 * CHUNK_SIZE, Some(certs.server(false)));
    let target = PoolTarget::new(p.addr.clone(), TOKEN).with_tls(Some(certs.pinned()));
    let mut c = target.connect()?;
    let big = pattern(3, 5 * CHUNK_SIZE as usize + 333);
    let g = put(
        &mut c,
        "svc",
        &[("pages-1.img", big.clone()), ("core-1.img", b"c".to_vec())],
    )?;
    assert_eq!(get(&mut c, "svc", g, "pages-1.img")?, big);
    assert_eq!(c.manifest("svc", None)?.files.len(), 2);
    assert_eq!(get(&mut c, "svc", g, "core-1.img")?, b"c".to_vec());
    // The wrong token is refused over TLS as over plaintext.
    let e = PoolTarget::new(p.addr.clone(), "not-the-token-at-all")
        .with_tls(Some(certs.pinned()))
        .connect()
        .unwrap_err();
    assert_eq!(e.pool_code(), Some(wire::ErrorCode::Unauthorized), "{e}");
    Ok(())
}

#[test]
fn a_client_pinned_to_another_certificate_refuses_the_pool_before_sending_its_token() -> Result<()>
{
    let ours = Certs::new();
    let impostor = Certs::new();
    // An impostor pool that records any application bytes a client sends it.
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr: PoolAddr = l.local_addr()?.to_string().parse()?;
    let config = impostor.server(false);
    let (got_tx, got_rx) = mpsc::channel();
    let server = thread::spawn(move || {
        let (mut sock, _) = l.accept().unwrap();
        let mut conn = rustls::ServerConnection::new(config).unwrap();
        let handshake = (|| {
            while conn.is_handshaking() {
                conn.complete_io(&mut sock)?;
            }
            let mut plain = Vec::new();
            rustls::Stream::new(&mut conn, &mut sock).read_to_end(&mut plain)?;
            std::io::Result::Ok(plain)
        })();
        got_tx.send(handshake).unwrap();
    });
    let err = PoolTarget::new(addr, TOKEN)
        .with_tls(Some(ours.pinned()))
        .connect()
        .unwrap_err();
    assert!(matches!(err, ClientError::Handshake { .. }), "{err:?}");
    let seen = got_rx.recv_timeout(Duration::from_secs(30))?;
    assert!(
        seen.is_err(),
        "the impostor completed a handshake and read {:?}",
        seen.map(|b| String::from_utf8_lossy(&b).into_owned())
    );
    server.join().unwrap();
    Ok(())
}

#[test]
fn mutual_tls_refuses_a_client_without_a_certificate_and_serves_one_with_it() -> Result<()> {
    let certs = Certs::new();
    let p = start(8 * CHUNK_SIZE, Some(certs.server(true)));
    let anonymous = PoolTarget::new(p.addr.clone(), TOKEN).with_tls(Some(certs.pinned()));
    assert!(
        anonymous.connect().is_err(),
        "a client without a certificate"
    );
    // A certificate from another CA is refused too.
    let stranger = Certs::new();
    let other = PoolTarget::new(p.addr.clone(), TOKEN).with_tls(Some(
        ClientTls::pinned(
            &certs.g.pool_cert,
            stranger
                .g
                .client
                .as_ref()
                .map(|(_, c, k)| (c.as_path(), k.as_path())),
        )
        .unwrap(),
    ));
    assert!(
        other.connect().is_err(),
        "a client certificate of another CA"
    );
    serves(&PoolTarget::new(p.addr.clone(), TOKEN).with_tls(Some(certs.pinned_with_identity())))
}

#[test]
fn a_plaintext_client_against_a_tls_pool_fails_cleanly_and_the_pool_keeps_serving() -> Result<()> {
    let certs = Certs::new();
    let p = start(8 * CHUNK_SIZE, Some(certs.server(false)));
    let started = Instant::now();
    let plain = PoolTarget::new(p.addr.clone(), TOKEN).with_timeouts(short(2000, 8000));
    let err = plain.connect().unwrap_err();
    assert!(
        !err.is_timeout(),
        "the pool answers garbage at once: {err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(8), "{err:?}");
    serves(&PoolTarget::new(p.addr.clone(), TOKEN).with_tls(Some(certs.pinned())))
}

#[test]
fn a_tls_client_against_a_plaintext_pool_fails_in_the_handshake() -> Result<()> {
    let certs = Certs::new();
    let p = start(8 * CHUNK_SIZE, None);
    let err = PoolTarget::new(p.addr.clone(), TOKEN)
        .with_tls(Some(certs.pinned()))
        .connect()
        .unwrap_err();
    assert!(matches!(err, ClientError::Handshake { .. }), "{err:?}");
    serves(&PoolTarget::new(p.addr.clone(), TOKEN))
}

#[test]
fn a_remote_plaintext_pool_is_refused_before_connecting_unless_insecure() {
    // 192.0.2.0/24 is TEST-NET-1: nothing is ever sent there, the refusal comes first.
    let remote = PoolTarget::new("192.0.2.1:7070".parse().unwrap(), TOKEN);
    let started = Instant::now();
    let err = remote.connect().unwrap_err();
    assert!(matches!(err, ClientError::Cleartext { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(remote.with_insecure(true).check_transport().is_ok());
}

/// Runs `f` and returns what it returned and how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

fn assert_timeout(r: Result<impl std::fmt::Debug, ClientError>, during: Stage, took: Duration) {
    match r {
        Err(ClientError::Timeout { during: d, after }) => {
            assert_eq!(d, during);
            assert!(took >= after, "gave up after {took:?}, before {after:?}");
            // Generous: two loaded cores, but far below "indefinitely".
            assert!(took < after * 4 + Duration::from_secs(2), "{took:?}");
        }
        other => panic!("expected a timeout while {during}, got {other:?}"),
    }
}

#[test]
fn a_pool_that_accepts_but_never_answers_fails_the_hello_with_a_timeout() -> Result<()> {
    // The kernel completes the connection (backlog); nobody ever reads or writes.
    let silent = TcpListener::bind("127.0.0.1:0")?;
    let addr: PoolAddr = silent.local_addr()?.to_string().parse()?;
    let target = PoolTarget::new(addr, TOKEN).with_timeouts(short(2000, 400));
    let (r, took) = timed(|| target.connect());
    assert_timeout(r, Stage::Receive, took);
    // With TLS the silence is met in the handshake, under the connect timeout.
    let certs = Certs::new();
    let target = target
        .with_tls(Some(certs.pinned()))
        .with_timeouts(short(400, 5000));
    let (r, took) = timed(|| target.connect());
    assert_timeout(r, Stage::Handshake, took);
    Ok(())
}

#[test]
fn a_pool_whose_accept_queue_is_full_fails_the_connect_with_a_timeout() -> Result<()> {
    // A listener that never accepts, with the smallest queue (listen again to shrink it):
    // once it is full the kernel drops further SYNs, as for a stopped or overloaded pool.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(0)?)?;
    let sa = listener.local_addr()?;
    let mut held = Vec::new();
    for _ in 0..16 {
        match TcpStream::connect_timeout(&sa, Duration::from_millis(300)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    let target = PoolTarget::new(sa.to_string().parse()?, TOKEN).with_timeouts(short(500, 5000));
    let (r, took) = timed(|| target.connect());
    assert_timeout(r, Stage::Connect, took);
    drop(held);
    Ok(())
}

/// A fake pool: welcomes one client, runs `then` on its socket, and keeps the socket open
/// (silent) until the test ends.
fn fake_pool(
    then: impl FnOnce(&mut TcpStream) + Send + 'static,
) -> Result<(PoolAddr, mpsc::Sender<()>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string().parse()?;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = Vec::new();
        let Ok(Frame::Control(p)) = wire::read_frame(&mut s, &mut buf) else {
            return;
        };
        assert!(matches!(
            wire::decode_control::<Request>(p),
            Ok(Request::Hello { .. })
        ));
        std::io::Write::write_all(
            &mut s,
            &wire::encode_control(&Response::Welcome {
                pool_version: "fake".into(),
            }),
        )
        .unwrap();
        then(&mut s);
        let _ = done_rx.recv();
    });
    Ok((addr, done_tx))
}

#[test]
fn a_pool_that_stops_sending_mid_file_fails_get_file_with_a_timeout() -> Result<()> {
    let (addr, _done) = fake_pool(|s| {
        let mut buf = Vec::new();
        let _ = wire::read_frame(s, &mut buf).unwrap();
        // One frame of the file, then silence: no more data, no FileEnd.
        wire::write_data(s, 0, &pattern(1, 4096)).unwrap();
    })?;
    let mut c = PoolTarget::new(addr, TOKEN)
        .with_timeouts(short(2000, 400))
        .connect()?;
    let mut got = 0;
    let (r, took) = timed(|| {
        c.get_file("svc", 1, "pages-1.img", |b| {
            got += b.len();
            Ok(())
        })
    });
    assert_eq!(got, 4096, "the frame before the silence arrived");
    assert_timeout(r, Stage::Receive, took);
    Ok(())
}

/// Takes whatever arrives; checks the bytes itself when `checks`.
struct Taker {
    lent: Vec<u8>,
    got: Vec<u8>,
    checks: bool,
}

impl torpor_pool::FrameSink for Taker {
    fn space(&mut self, len: usize) -> std::io::Result<&mut [u8]> {
        self.lent.resize(len, 0);
        Ok(&mut self.lent)
    }

    fn filled(&mut self, len: usize) -> std::io::Result<()> {
        self.got.extend_from_slice(&self.lent[..len]);
        Ok(())
    }

    fn checks_bytes(&self) -> bool {
        self.checks
    }
}

#[test]
fn a_frame_with_a_wrong_crc_is_refused_unless_the_sink_checks_the_bytes_itself() -> Result<()> {
    for checks in [false, true] {
        let (addr, _done) = fake_pool(|s| {
            let mut buf = Vec::new();
            let _ = wire::read_frame(s, &mut buf).unwrap();
            let bytes = pattern(2, 5000);
            let mut payload = 0u32.to_le_bytes().to_vec();
            payload.extend_from_slice(&bytes);
            let mut header = wire::FrameHeader::for_payload(wire::FrameKind::Data, &payload);
            header.crc ^= 1;
            let mut frame = header.encode().to_vec();
            frame.extend_from_slice(&payload);
            std::io::Write::write_all(s, &frame).unwrap();
            let end = wire::encode_control(&Response::FileEnd { size: 5000 });
            std::io::Write::write_all(s, &end).unwrap();
        })?;
        let mut c = PoolTarget::new(addr, TOKEN).connect()?;
        let mut sink = Taker {
            lent: Vec::new(),
            got: Vec::new(),
            checks,
        };
        let r = c.get_file_into("svc", 1, "pages-1.img", &mut sink);
        if checks {
            assert_eq!(r?, 5000);
            assert_eq!(sink.got, pattern(2, 5000), "the sink judges the bytes");
        } else {
            let err = r.unwrap_err();
            assert!(
                matches!(
                    err,
                    ClientError::Wire(wire::WireError::ChecksumMismatch { .. })
                ),
                "{err}"
            );
            assert!(sink.got.is_empty(), "nothing unchecked was passed on");
        }
    }
    Ok(())
}

#[test]
fn an_upload_to_a_pool_that_stops_reading_fails_with_a_timeout() -> Result<()> {
    let (addr, _done) = fake_pool(|s| {
        let mut buf = Vec::new();
        let _ = wire::read_frame(s, &mut buf).unwrap();
        std::io::Write::write_all(
            s,
            &wire::encode_control(&Response::PutReady { next_generation: 1 }),
        )
        .unwrap();
        // Then it reads nothing more: the socket buffers fill and the client's writes stall.
    })?;
    let frame = Duration::from_secs(2);
    let mut c = PoolTarget::new(addr, TOKEN)
        .with_timeouts(Timeouts {
            connect: frame,
            frame,
        })
        .connect()?;
    c.put_begin("svc", SnapshotMeta::default(), None)?;
    c.file_open(0, "pages-1.img")?;
    let chunk = pattern(2, CHUNK_SIZE as usize);
    // Far more than any socket buffer holds; the write that stalls is the one timed.
    for _ in 0..256 {
        let (r, took) = timed(|| c.file_data(0, &chunk));
        if r.is_err() {
            assert_timeout(r, Stage::Send, took);
            // One timeout, not two: a write that moved a few bytes before the pool stopped
            // must not wait a second timeout for the rest.
            assert!(took < frame * 7 / 4, "{took:?}");
            return Ok(());
        }
    }
    panic!("256 MiB went into a pool that reads nothing");
}

#[test]
fn a_unix_socket_pool_that_never_answers_fails_the_hello_with_a_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("pool.sock");
    let _silent = std::os::unix::net::UnixListener::bind(&path)?;
    let target = PoolTarget::new(PoolAddr::Unix(path), TOKEN).with_timeouts(short(2000, 400));
    let (r, took) = timed(|| target.connect());
    assert_timeout(r, Stage::Receive, took);
    Ok(())
}

#[test]
fn a_unix_socket_pool_whose_accept_queue_is_full_fails_the_connect_with_a_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("pool.sock");
    let silent = std::os::unix::net::UnixListener::bind(&path)?;
    nix::sys::socket::listen(&silent, nix::sys::socket::Backlog::new(0)?)?;
    // Fill the queue with connections that nobody accepts (each one waits at most 300 ms).
    let filler =
        PoolTarget::new(PoolAddr::Unix(path.clone()), TOKEN).with_timeouts(short(300, 300));
    for _ in 0..16 {
        if let Err(ClientError::Timeout {
            during: Stage::Connect,
            ..
        }) = filler.connect()
        {
            break;
        }
    }
    let target = PoolTarget::new(PoolAddr::Unix(path), TOKEN).with_timeouts(short(500, 5000));
    let (r, took) = timed(|| target.connect());
    assert_timeout(r, Stage::Connect, took);
    Ok(())
}
