//! The pool server against hostile, broken and unlucky clients and hosts: connection floods,
//! oversized or missing hellos, stalled uploads and readers, small files, spill-directory
//! permissions and planted files, bad token files, a full disk. Each test is one finding.
//! The pool runs in-process on 127.0.0.1:0 with short limits; raw sockets play the client.

mod common;
mod inproc;

use common::{get, pattern, put};
use inproc::{client, start, Running, TOKEN};
use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use torpor_image::{
    manifest::SnapshotMeta,
    wire::{self, ErrorCode, Request, Response},
    CHUNK_SIZE,
};
use torpor_pool::{PoolAddr, PoolClient, Store, StoreConfig};

fn raw(p: &Running) -> TcpStream {
    let PoolAddr::Tcp(a) = &p.addr else { panic!() };
    TcpStream::connect(a).unwrap()
}

fn hello() -> Vec<u8> {
    wire::encode_control(&Request::Hello {
        token: TOKEN.into(),
    })
}

/// Waits (up to `limit`) until `cond` holds; returns whether it did.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Reads until the pool closes the connection (EOF or reset); returns the error frame it
/// sent first, if any.
fn read_until_closed(s: &mut TcpStream) -> Option<(ErrorCode, String)> {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    let reply = match wire::read_frame(&mut *s, &mut buf) {
        Ok(wire::Frame::Control(payload)) => match wire::decode_control(payload).unwrap() {
            Response::Error { code, message } => Some((code, message)),
            other => panic!("expected an error, got {other:?}"),
        },
        Ok(wire::Frame::Data { .. }) => panic!("data"),
        Err(_) => None,
    };
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "nothing after the error"),
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::WouldBlock,
            "the pool did not close the connection"
        ),
    }
    reply
}

/// Sends the hello and reads the welcome on a raw connection.
fn raw_authenticated(p: &Running) -> TcpStream {
    let mut s = raw(p);
    s.write_all(&hello()).unwrap();
    let mut buf = Vec::new();
    match wire::read_frame(&mut s, &mut buf).unwrap() {
        wire::Frame::Control(payload) => assert!(matches!(
            wire::decode_control(payload).unwrap(),
            Response::Welcome { .. }
        )),
        wire::Frame::Data { .. } => panic!("data"),
    }
    s
}

/// Keeps `n` raw connections open that never say hello.
fn idle_connections(p: &Running, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| raw(p)).collect()
}

#[test]
fn idle_unauthenticated_connections_over_the_limit_do_not_stop_the_pool() {
    // Hello may take 60 s: only the limit can make room for the real client.
    let p = start(4 * CHUNK_SIZE, None, 2, |o| {
        o.max_connections = 8;
        o.hello_timeout = Duration::from_secs(60);
    });
    let idle = idle_connections(&p, 50);
    let started = Instant::now();
    let mut c = PoolClient::connect(&p.addr, TOKEN).expect("served despite the flood");
    assert!(c.list().unwrap().is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "served in {:?}",
        started.elapsed()
    );
    // The oldest idle connections were closed to make room; the listener still accepts.
    let mut first = idle.into_iter().next().unwrap();
    assert_eq!(
        read_until_closed(&mut first),
        None,
        "evicted without a word"
    );
    let mut c2 = client(&p);
    put(&mut c2, "svc", &[("pages-1.img", pattern(1, 1000))]).unwrap();
    assert_eq!(
        c.list().unwrap().len(),
        1,
        "authenticated connections are kept"
    );
}

#[test]
fn authenticated_connections_over_the_limit_are_closed_and_the_listener_keeps_serving() {
    let p = start(4 * CHUNK_SIZE, None, 2, |o| o.max_connections = 2);
    let mut a = client(&p);
    let _b = client(&p);
    let err = PoolClient::connect(&p.addr, TOKEN).unwrap_err();
    assert!(err.pool_code().is_none(), "closed, not answered: {err}");
    drop(_b);
    assert!(
        wait_for(Duration::from_secs(10), || PoolClient::connect(
            &p.addr, TOKEN
        )
        .is_ok()),
        "a freed slot is served again"
    );
    assert!(a.list().unwrap().is_empty());
}

#[test]
fn an_oversized_header_before_hello_is_refused_before_its_payload_arrives() {
    let p = start(4 * CHUNK_SIZE, None, 2, |_| {});
    // 4 MiB is a legal control frame after hello; before it, only a small one is read. The
    // payload is never sent: the refusal cannot come from reading (or allocating) it.
    let header = wire::FrameHeader {
        kind: wire::FrameKind::Control,
        len: wire::MAX_CONTROL_PAYLOAD,
        crc: 0,
    }
    .encode();
    let mut s = raw(&p);
    s.write_all(&header).unwrap();
    let (code, message) = read_until_closed(&mut s).expect("an error frame");
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("exceeds"), "{message}");
    assert!(c_list_ok(&p));
}

fn c_list_ok(p: &Running) -> bool {
    client(p).list().is_ok()
}

#[test]
fn a_hello_that_never_comes_is_dropped_after_the_timeout() {
    let p = start(4 * CHUNK_SIZE, None, 2, |o| {
        o.hello_timeout = Duration::from_millis(300)
    });
    let started = Instant::now();
    let mut s = raw(&p);
    // Half a header, then silence.
    s.write_all(&hello()[..7]).unwrap();
    let (code, message) = read_until_closed(&mut s).expect("an error frame");
    let waited = started.elapsed();
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("no hello"), "{message}");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(20), "{waited:?}");
}

#[test]
fn an_authenticated_client_idle_past_the_idle_timeout_is_closed() {
    let p = start(4 * CHUNK_SIZE, None, 2, |o| {
        o.idle_timeout = Duration::from_millis(300)
    });
    let mut s = raw_authenticated(&p);
    let (_, message) = read_until_closed(&mut s).expect("an error frame");
    assert!(message.contains("no request"), "{message}");
}

#[test]
fn an_unfinished_upload_returns_its_memory_after_the_frame_timeout() {
    let p = start(8 * CHUNK_SIZE, None, 2, |o| {
        o.frame_timeout = Duration::from_millis(300);
        o.idle_timeout = Duration::from_secs(600);
    });
    let mut s = raw_authenticated(&p);
    let mut msg = wire::encode_control(&Request::PutBegin {
        name: "svc".into(),
        meta: SnapshotMeta::default(),
        size_hint: None,
    });
    msg.extend(wire::encode_control(&Request::FileOpen {
        file_id: 0,
        name: "pages-1.img".into(),
    }));
    s.write_all(&msg).unwrap();
    let mut buf = Vec::new();
    wire::read_frame(&mut s, &mut buf).unwrap(); // PutReady
                                                 // Two whole chunks, then half of a third frame, then silence with the socket open.
    let mut data = Vec::new();
    for seed in 0..3 {
        wire::write_data(&mut data, 0, &pattern(seed, CHUNK_SIZE as usize)).unwrap();
    }
    let cut = data.len() - CHUNK_SIZE as usize / 2;
    s.write_all(&data[..cut]).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || p.store.free_bytes()
            < p.store.capacity_bytes()),
        "the upload holds memory while it streams"
    );
    assert!(
        wait_for(Duration::from_secs(20), || p.store.free_bytes()
            == p.store.capacity_bytes()),
        "the stalled upload's chunks were returned"
    );
    let (_, message) = read_until_closed(&mut s).expect("an error frame");
    assert!(message.contains("within"), "{message}");
    assert!(client(&p).list().unwrap().is_empty());
}

#[test]
fn a_client_that_stops_reading_a_file_is_dropped_and_releases_it() {
    let p = start(40 * CHUNK_SIZE, None, 2, |o| {
        o.write_timeout = Duration::from_millis(300)
    });
    let mut c = client(&p);
    put(&mut c, "svc", &[("pages-1.img", pattern(3, 32 << 20))]).unwrap();
    let mut s = raw_authenticated(&p);
    s.write_all(&wire::encode_control(&Request::GetFile {
        name: "svc".into(),
        generation: 1,
        file: "pages-1.img".into(),
    }))
    .unwrap();
    // The first frame header arrives once the pool holds the snapshot for this stream.
    let mut header = [0u8; wire::HEADER_LEN];
    s.read_exact(&mut header).unwrap();
    // Never read on. Deleting the snapshot cannot free what the stalled stream pins...
    assert_eq!(c.delete("svc", None).unwrap(), 1);
    assert!(p.store.free_bytes() < p.store.capacity_bytes());
    // ...until the pool gives up on the reader.
    assert!(
        wait_for(Duration::from_secs(20), || p.store.free_bytes()
            == p.store.capacity_bytes()),
        "the stalled reader was dropped and its snapshot's memory returned"
    );
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let closed = loop {
        let mut chunk = vec![0u8; 1 << 20];
        match s.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => rest.extend_from_slice(&chunk[..n]),
            Err(e) => break e.kind() != std::io::ErrorKind::WouldBlock,
        }
    };
    assert!(closed, "the connection was closed");
    assert!(rest.len() < 32 << 20, "the file was not sent whole");
}

#[test]
fn small_files_cost_their_bytes_not_whole_chunks() {
    let spill = tempfile::tempdir().unwrap();
    // Two chunks of RAM tier, and a disk tier that must stay unused.
    let p = start(2 * CHUNK_SIZE, Some(spill.path()), 2, |_| {});
    let mut c = client(&p);
    put(
        &mut c,
        "big",
        &[("pages-1.img", pattern(1, CHUNK_SIZE as usize))],
    )
    .unwrap();
    for i in 0..20 {
        put(
            &mut c,
            &format!("small-{i}"),
            &[("a.img", vec![1]), ("b.img", vec![2]), ("c.img", vec![3])],
        )
        .unwrap();
    }
    let list = c.list().unwrap();
    assert_eq!(list.len(), 21);
    assert!(
        list.iter().all(|s| s.tier == torpor_image::wire::Tier::Ram),
        "nothing spilled: {list:?}"
    );
    assert_eq!(
        p.store.free_bytes(),
        p.store.capacity_bytes() - CHUNK_SIZE - 20 * 3
    );
    assert_eq!(get(&mut c, "small-7", 1, "b.img").unwrap(), vec![2]);
    // A file's tail past its whole chunks costs its bytes too: the RAM tier's budget in use
    // is exactly the bytes its snapshots hold.
    let odd = pattern(2, CHUNK_SIZE as usize + CHUNK_SIZE as usize / 2 + 3);
    put(&mut c, "odd", &[("pages-1.img", odd.clone())]).unwrap();
    assert_eq!(get(&mut c, "odd", 1, "pages-1.img").unwrap(), odd);
    let in_ram: u64 = c
        .list()
        .unwrap()
        .iter()
        .filter(|s| s.tier == torpor_image::wire::Tier::Ram)
        .map(|s| s.bytes)
        .sum();
    assert_eq!(p.store.free_bytes(), p.store.capacity_bytes() - in_ram);
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

fn open_store(capacity: u64, spill: &Path) -> Result<Store, torpor_pool::StoreError> {
    Store::open(StoreConfig {
        capacity,
        spill_dir: Some(spill.to_path_buf()),
        keep: 2,
    })
}

/// Stores `names` (one chunk each) in a one-chunk pool, so all but the last are spilled.
fn spill_snapshots(spill: &Path, names: &[&str]) {
    let p = start(CHUNK_SIZE, Some(spill), 2, |_| {});
    let mut c = client(&p);
    for (i, name) in names.iter().enumerate() {
        put(
            &mut c,
            name,
            &[("pages-1.img", pattern(i as u8, CHUNK_SIZE as usize))],
        )
        .unwrap();
    }
}

fn snapfile(spill: &Path, name: &str) -> std::path::PathBuf {
    spill.join(name).join("0000000001.tsnap")
}

#[test]
fn spilled_snapshots_are_private_whatever_the_umask() {
    let base = tempfile::tempdir().unwrap();
    let spill = base.path().join("spill");
    // The usual umask would make new files 0644 and directories 0755.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    spill_snapshots(&spill, &["a", "b"]);
    nix::sys::stat::umask(old);
    assert_eq!(mode(&spill), 0o700);
    assert_eq!(mode(&spill.join("a")), 0o700);
    assert_eq!(mode(&snapfile(&spill, "a")), 0o600);
}

#[test]
fn a_snapshot_file_planted_in_the_spill_dir_is_not_loaded() {
    use std::os::unix::fs::PermissionsExt;
    let spill = tempfile::tempdir().unwrap();
    spill_snapshots(
        spill.path(),
        &["readable", "foreign", "moved", "good", "last"],
    );
    // Files that are not the pool's alone: readable by others, owned by someone else.
    std::fs::set_permissions(
        snapfile(spill.path(), "readable"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    nix::unistd::chown(
        &snapfile(spill.path(), "foreign"),
        Some(nix::unistd::Uid::from_raw(65534)),
        None,
    )
    .unwrap();
    // A private file whose manifest names another snapshot than its place says.
    std::fs::create_dir(spill.path().join("evil")).unwrap();
    std::fs::rename(
        snapfile(spill.path(), "moved"),
        snapfile(spill.path(), "evil"),
    )
    .unwrap();
    let store = open_store(CHUNK_SIZE, spill.path()).unwrap();
    let names: Vec<String> = store.list().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["good"]);
}

#[test]
fn a_spill_dir_others_can_write_or_someone_else_owns_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let spill = tempfile::tempdir().unwrap();
    std::fs::set_permissions(spill.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = open_store(CHUNK_SIZE, spill.path()).unwrap_err();
    assert!(
        err.to_string().contains("unsafe") && err.to_string().contains("0777"),
        "{err}"
    );
    std::fs::set_permissions(spill.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(spill.path(), Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let err = open_store(CHUNK_SIZE, spill.path()).unwrap_err();
    assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    // Ours but readable by others: tightened, and the pool starts.
    nix::unistd::chown(spill.path(), Some(nix::unistd::geteuid()), None).unwrap();
    std::fs::set_permissions(spill.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    open_store(CHUNK_SIZE, spill.path()).unwrap();
    assert_eq!(mode(spill.path()), 0o700);
}

#[test]
fn a_token_file_others_can_read_or_a_short_token_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    use torpor_pool::{read_token_file, write_token_file, TokenFileError};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    write_token_file(&path, "0123456789abcdef-long-enough\n").unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(
        read_token_file(&path).unwrap(),
        "0123456789abcdef-long-enough"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = read_token_file(&path).unwrap_err();
    assert!(
        matches!(err, TokenFileError::Exposed { mode: 0o644, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    write_token_file(&path, "short").unwrap();
    let err = read_token_file(&path).unwrap_err();
    assert!(
        matches!(err, TokenFileError::TooShort { len: 5, .. }),
        "{err}"
    );
}

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct TinyTmpfs {
    dir: tempfile::TempDir,
}

impl TinyTmpfs {
    fn mount(size: &str) -> TinyTmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs (needs root)");
        TinyTmpfs { dir }
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_full_disk_fails_the_upload_cleanly_and_keeps_what_the_pool_holds() {
    let disk = TinyTmpfs::mount("4m");
    let spill = disk.dir.path().join("spill");
    let p = start(4 * CHUNK_SIZE, Some(&spill), 2, |_| {});
    let mut c = client(&p);
    let a = pattern(1, 3 * CHUNK_SIZE as usize);
    let b = pattern(2, 3 * CHUNK_SIZE as usize);
    put(&mut c, "a", &[("pages-1.img", a.clone())]).unwrap();
    // Storing b spills a (3 MiB of the 4 MiB disk); storing c would spill b: no room.
    put(&mut c, "b", &[("pages-1.img", b.clone())]).unwrap();
    let err = put(
        &mut c,
        "c",
        &[("pages-1.img", pattern(3, 3 * CHUNK_SIZE as usize))],
    )
    .unwrap_err();
    let code = err
        .downcast_ref::<torpor_pool::ClientError>()
        .and_then(|e| e.pool_code());
    assert_eq!(code, Some(ErrorCode::Internal), "{err}");
    // Nothing half-written is left on the disk; a and b are intact and served; c is absent.
    let leftovers: Vec<_> = std::fs::read_dir(spill.join("b"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let mut c = client(&p);
    let names: Vec<String> = c.list().unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["a", "b"]);
    assert_eq!(get(&mut c, "a", 1, "pages-1.img").unwrap(), a);
    assert_eq!(get(&mut c, "b", 1, "pages-1.img").unwrap(), b);
    assert!(
        wait_for(Duration::from_secs(10), || p.store.free_bytes()
            == CHUNK_SIZE),
        "the failed upload's memory was returned"
    );
    put(&mut c, "d", &[("small.img", vec![4; 100])]).unwrap();
}

#[test]
fn a_corrupt_chunk_on_disk_is_refused_and_never_served() {
    let spill = tempfile::tempdir().unwrap();
    let a = pattern(1, 3 * CHUNK_SIZE as usize);
    {
        let p = start(3 * CHUNK_SIZE, Some(spill.path()), 2, |_| {});
        let mut c = client(&p);
        put(&mut c, "a", &[("pages-1.img", a.clone())]).unwrap();
        put(&mut c, "b", &[("pages-1.img", pattern(2, 100))]).unwrap(); // spills a
    }
    // One bit of a's middle chunk rots on disk while the pool is down.
    let path = snapfile(spill.path(), "a");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 2 * CHUNK_SIZE as usize + 12345;
    bytes[at] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    let p = start(3 * CHUNK_SIZE, Some(spill.path()), 2, |_| {});
    let mut c = client(&p);
    let mut served = Vec::new();
    let err = c
        .get_file("a", 1, "pages-1.img", |b| {
            served.extend_from_slice(b);
            Ok(())
        })
        .unwrap_err();
    assert_eq!(err.pool_code(), Some(ErrorCode::Corrupt), "{err}");
    assert_eq!(
        served,
        a[..CHUNK_SIZE as usize],
        "only the intact chunk before it"
    );
    // The pool keeps serving.
    put(&mut c, "c", &[("x.img", vec![1])]).unwrap();
}

#[test]
fn a_file_sent_in_small_pieces_outgrows_its_tail_into_chunks_intact() {
    let p = start(4 * CHUNK_SIZE, None, 2, |_| {});
    let mut c = client(&p);
    let bytes = pattern(5, CHUNK_SIZE as usize + CHUNK_SIZE as usize / 2 + 7);
    c.put_begin("svc", SnapshotMeta::default(), None).unwrap();
    c.file_open(0, "pages-1.img").unwrap();
    c.file_open(1, "core-1.img").unwrap();
    // Interleaved 1000-byte pieces: both files start small, one grows past the limit.
    for piece in bytes.chunks(1000) {
        c.file_data(0, piece).unwrap();
        c.file_data(1, &piece[..10]).unwrap();
    }
    c.file_close(0, bytes.len() as u64).unwrap();
    let small_len = bytes.chunks(1000).count() as u64 * 10;
    c.file_close(1, small_len).unwrap();
    c.commit(None, None).unwrap();
    assert_eq!(get(&mut c, "svc", 1, "pages-1.img").unwrap(), bytes);
    assert_eq!(
        get(&mut c, "svc", 1, "core-1.img").unwrap().len() as u64,
        small_len
    );
    assert_eq!(
        p.store.free_bytes(),
        p.store.capacity_bytes() - bytes.len() as u64 - small_len
    );
}
