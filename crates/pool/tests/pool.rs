//! The pool server end to end, in-process on 127.0.0.1:0, through the blocking client and
//! through raw sockets for the malformed-input cases.

mod common;
mod inproc;

use common::{get, pattern, put};
use inproc::{client, start, Running, TOKEN};
use std::{
    io::{Read, Write},
    net::TcpStream,
    thread,
};

use anyhow::Result;
use torpor_image::{
    manifest::SnapshotMeta,
    wire::{self, ErrorCode, FrameHeader, FrameKind, Request, Tier, HEADER_LEN},
    CHUNK_SIZE,
};
use torpor_pool::{PoolAddr, PoolClient};

#[test]
fn roundtrip_generations_and_keep() -> Result<()> {
    let p = start(32 * CHUNK_SIZE, None, 2, |_| {});
    let mut c = client(&p);
    let big = pattern(1, 3 * CHUNK_SIZE as usize + 17);
    for expected_gen in 1..=3 {
        let g = put(
            &mut c,
            "svc",
            &[
                ("pages-1.img", big.clone()),
                ("inventory.img", b"inv".to_vec()),
            ],
        )?;
        assert_eq!(g, expected_gen);
    }
    assert_eq!(get(&mut c, "svc", 3, "pages-1.img")?, big);
    assert_eq!(get(&mut c, "svc", 3, "inventory.img")?, b"inv");
    let gens: Vec<u64> = c.list()?.iter().map(|s| s.generation).collect();
    assert_eq!(gens, vec![2, 3], "keep=2 drops generation 1");
    assert_eq!(c.manifest("svc", None)?.generation, 3);
    let missing = c.manifest("nope", None).unwrap_err();
    assert_eq!(missing.pool_code(), Some(ErrorCode::NotFound));
    let missing = get(&mut c, "svc", 3, "core-1.img").unwrap_err();
    assert!(missing.to_string().contains("no file"), "{missing}");
    // A refused lookup does not end the connection.
    assert_eq!(get(&mut c, "svc", 2, "inventory.img")?, b"inv");
    Ok(())
}

#[test]
fn full_without_spill_dir_refuses_and_keeps_what_it_has() -> Result<()> {
    let p = start(4 * CHUNK_SIZE, None, 2, |_| {});
    let mut c = client(&p);
    let first = pattern(2, 3 * CHUNK_SIZE as usize);
    put(&mut c, "a", &[("pages-1.img", first.clone())])?;
    let mut c2 = client(&p);
    let err = put(
        &mut c2,
        "b",
        &[("pages-1.img", pattern(3, 3 * CHUNK_SIZE as usize))],
    )
    .unwrap_err();
    assert!(err.to_string().contains("--spill-dir"), "{err}");
    let mut c3 = client(&p);
    assert_eq!(get(&mut c3, "a", 1, "pages-1.img")?, first);
    assert_eq!(c3.list()?.len(), 1);
    // The refused upload's memory went back to the arena.
    assert_eq!(p.store.free_bytes(), CHUNK_SIZE);
    Ok(())
}

#[test]
fn full_with_spill_dir_moves_lru_to_disk_and_survives_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = pattern(4, 3 * CHUNK_SIZE as usize);
    let b = pattern(5, 3 * CHUNK_SIZE as usize + 5);
    {
        let p = start(4 * CHUNK_SIZE, Some(dir.path()), 2, |_| {});
        let mut c = client(&p);
        put(&mut c, "a", &[("pages-1.img", a.clone())])?;
        put(&mut c, "b", &[("pages-1.img", b.clone())])?;
        let list = c.list()?;
        let tier = |n: &str| list.iter().find(|s| s.name == n).unwrap().tier;
        assert_eq!(tier("a"), Tier::Disk, "least recently used goes to disk");
        assert_eq!(tier("b"), Tier::Ram);
        assert_eq!(get(&mut c, "a", 1, "pages-1.img")?, a);
        assert_eq!(get(&mut c, "b", 1, "pages-1.img")?, b);
        // Touching b then storing c spills b (a is already on disk).
        put(
            &mut c,
            "c",
            &[("pages-1.img", pattern(6, 2 * CHUNK_SIZE as usize))],
        )?;
    }
    // A new pool on the same spill dir finds the disk tier again; RAM is gone.
    let p = start(4 * CHUNK_SIZE, Some(dir.path()), 2, |_| {});
    let mut c = client(&p);
    let names: Vec<String> = c.list()?.into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["a", "b"]);
    assert_eq!(get(&mut c, "b", 1, "pages-1.img")?, b);
    assert_eq!(
        put(&mut c, "a", &[("x", vec![1])])?,
        2,
        "generations continue"
    );
    Ok(())
}

#[test]
fn corrupt_disk_bytes_are_detected_when_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = start(2 * CHUNK_SIZE, Some(dir.path()), 2, |_| {});
    let mut c = client(&p);
    put(
        &mut c,
        "a",
        &[("pages-1.img", pattern(7, 2 * CHUNK_SIZE as usize))],
    )?;
    put(
        &mut c,
        "b",
        &[("pages-1.img", pattern(8, CHUNK_SIZE as usize))],
    )?;
    let file = std::fs::read_dir(dir.path().join("a"))?
        .next()
        .unwrap()?
        .path();
    let mut bytes = std::fs::read(&file)?;
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(&file, bytes)?;
    let err = get(&mut c, "a", 1, "pages-1.img").unwrap_err();
    let code = err
        .downcast_ref::<torpor_pool::ClientError>()
        .and_then(|e| e.pool_code());
    assert_eq!(code, Some(ErrorCode::Corrupt), "{err}");
    Ok(())
}

/// Lends one buffer per frame and keeps what arrived, with each frame's size.
#[derive(Default)]
struct Frames {
    lent: Vec<u8>,
    bytes: Vec<u8>,
    sizes: Vec<usize>,
    fail_after: Option<usize>,
}

impl torpor_pool::FrameSink for Frames {
    fn space(&mut self, len: usize) -> std::io::Result<&mut [u8]> {
        self.lent.clear();
        self.lent.resize(len, 0xEE);
        Ok(&mut self.lent)
    }

    fn filled(&mut self, len: usize) -> std::io::Result<()> {
        if self.fail_after == Some(self.sizes.len()) {
            return Err(std::io::Error::other("sink gave up"));
        }
        self.bytes.extend_from_slice(&self.lent[..len]);
        self.sizes.push(len);
        Ok(())
    }
}

#[test]
fn get_file_into_lands_each_frame_in_the_sinks_memory() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = start(4 * CHUNK_SIZE, Some(dir.path()), 2, |_| {});
    let mut c = client(&p);
    let big = pattern(9, 2 * CHUNK_SIZE as usize + 5);
    put(
        &mut c,
        "a",
        &[("pages-1.img", big.clone()), ("x", vec![1, 2])],
    )?;
    let mut sink = Frames::default();
    assert_eq!(
        c.get_file_into("a", 1, "pages-1.img", &mut sink)?,
        big.len() as u64
    );
    assert_eq!(sink.bytes, big);
    assert_eq!(sink.sizes, [CHUNK_SIZE as usize, CHUNK_SIZE as usize, 5]);
    let mut small = Frames::default();
    assert_eq!(c.get_file_into("a", 1, "x", &mut small)?, 2);
    assert_eq!(small.bytes, [1, 2]);
    let missing = c.get_file_into("a", 1, "nope", &mut Frames::default());
    assert!(missing.unwrap_err().to_string().contains("no file"));

    let mut failing = Frames {
        fail_after: Some(1),
        ..Default::default()
    };
    let err = c
        .get_file_into("a", 1, "pages-1.img", &mut failing)
        .unwrap_err();
    assert!(matches!(err, torpor_pool::ClientError::Sink(_)), "{err}");

    // Spilled to disk and corrupted there: refused, not handed to the sink.
    let mut c = client(&p);
    put(
        &mut c,
        "b",
        &[("pages-1.img", pattern(8, 3 * CHUNK_SIZE as usize))],
    )?;
    let file = std::fs::read_dir(dir.path().join("a"))?
        .next()
        .unwrap()?
        .path();
    let mut bytes = std::fs::read(&file)?;
    // The first chunk's data: the files' bytes end the snapshot file.
    let at = bytes.len() - (big.len() + 2) + 10;
    bytes[at] ^= 0x40;
    std::fs::write(&file, bytes)?;
    let mut sink = Frames::default();
    let err = c
        .get_file_into("a", 1, "pages-1.img", &mut sink)
        .unwrap_err();
    assert_eq!(err.pool_code(), Some(ErrorCode::Corrupt), "{err}");
    assert!(
        sink.sizes.is_empty(),
        "nothing of the corrupt chunk was passed on"
    );
    Ok(())
}

#[test]
fn ram_chunks_spliced_into_a_unix_socket_arrive_unchanged_and_in_order() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let addr: PoolAddr = format!("unix:{}", dir.path().join("pool.sock").display()).parse()?;
    let p = inproc::start_on(16 * CHUNK_SIZE, None, 1, addr, None, |_| {});
    let mut c = PoolClient::connect(&p.addr, TOKEN)?;
    let big = pattern(10, 3 * CHUNK_SIZE as usize + 4097);
    put(
        &mut c,
        "a",
        &[("pages-1.img", big.clone()), ("x", vec![7; 100])],
    )?;
    for _ in 0..2 {
        assert_eq!(get(&mut c, "a", 1, "pages-1.img")?, big);
        // A control answer after spliced frames comes after them.
        assert_eq!(c.list()?.len(), 1);
        assert_eq!(get(&mut c, "a", 1, "x")?, vec![7; 100]);
        let mut sink = Frames::default();
        c.get_file_into("a", 1, "pages-1.img", &mut sink)?;
        assert_eq!(sink.bytes, big);
    }
    // The next generation replaces the first (keep 1): its chunks are reused for other
    // bytes, which the next answer carries.
    let newer = pattern(11, 2 * CHUNK_SIZE as usize);
    let mut other = PoolClient::connect(&p.addr, TOKEN)?;
    put(&mut other, "a", &[("pages-1.img", newer.clone())])?;
    assert_eq!(get(&mut c, "a", 2, "pages-1.img")?, newer);
    Ok(())
}

#[test]
fn wrong_token_is_refused() {
    let p = start(2 * CHUNK_SIZE, None, 2, |_| {});
    let err = PoolClient::connect(&p.addr, "not-the-token").unwrap_err();
    assert_eq!(err.pool_code(), Some(ErrorCode::Unauthorized), "{err}");
}

fn raw(p: &Running) -> TcpStream {
    let PoolAddr::Tcp(a) = &p.addr else { panic!() };
    TcpStream::connect(a).unwrap()
}

/// Sends bytes on a raw connection and returns the error code the pool answers with; the
/// connection must then be closed by the pool.
fn error_reply(s: &mut TcpStream, bytes: &[u8]) -> ErrorCode {
    s.write_all(bytes).unwrap();
    let mut buf = Vec::new();
    let code = match wire::read_frame(s, &mut buf).unwrap() {
        wire::Frame::Control(payload) => match wire::decode_control(payload).unwrap() {
            wire::Response::Error { code, .. } => code,
            other => panic!("expected an error, got {other:?}"),
        },
        wire::Frame::Data { .. } => panic!("data"),
    };
    // Closed: EOF, or a reset when the pool left unread garbage behind.
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "connection closed after the error"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    code
}

fn hello() -> Vec<u8> {
    wire::encode_control(&Request::Hello {
        token: TOKEN.into(),
    })
}

#[test]
fn malformed_and_oversized_frames_get_an_error_and_a_closed_connection() {
    let p = start(2 * CHUNK_SIZE, None, 2, |_| {});
    // Garbage instead of a frame.
    assert_eq!(
        error_reply(&mut raw(&p), b"GET / HTTP/1.1\r\n\r\n"),
        ErrorCode::BadRequest
    );
    // A header announcing 4 GiB.
    let huge = FrameHeader {
        kind: FrameKind::Control,
        len: u32::MAX,
        crc: 0,
    }
    .encode();
    assert_eq!(error_reply(&mut raw(&p), &huge), ErrorCode::BadRequest);
    // Valid frame, invalid JSON.
    let payload = b"{\"type\":";
    let mut bad = FrameHeader::for_payload(FrameKind::Control, payload)
        .encode()
        .to_vec();
    bad.extend_from_slice(payload);
    assert_eq!(error_reply(&mut raw(&p), &bad), ErrorCode::BadRequest);
    // Request before hello.
    assert_eq!(
        error_reply(&mut raw(&p), &wire::encode_control(&Request::List)),
        ErrorCode::BadRequest
    );
    // Data frame outside an upload, after a good hello.
    let mut s = raw(&p);
    s.write_all(&hello()).unwrap();
    let mut buf = Vec::new();
    wire::read_frame(&mut s, &mut buf).unwrap();
    let mut data = Vec::new();
    wire::write_data(&mut data, 0, b"stray").unwrap();
    assert_eq!(error_reply(&mut s, &data), ErrorCode::BadRequest);
    // A corrupted data frame inside an upload; the upload leaves no trace.
    let mut s = raw(&p);
    let mut msg = hello();
    msg.extend(wire::encode_control(&Request::PutBegin {
        name: "x".into(),
        meta: SnapshotMeta::default(),
        size_hint: None,
    }));
    msg.extend(wire::encode_control(&Request::FileOpen {
        file_id: 1,
        name: "pages-1.img".into(),
    }));
    s.write_all(&msg).unwrap();
    wire::read_frame(&mut s, &mut buf).unwrap();
    wire::read_frame(&mut s, &mut buf).unwrap();
    let mut data = Vec::new();
    wire::write_data(&mut data, 1, &pattern(9, 1000)).unwrap();
    let last = data.len() - 1;
    data[last] ^= 1;
    assert_eq!(error_reply(&mut s, &data), ErrorCode::BadRequest);
    // The pool is still serving and holds nothing from all that.
    let mut c = client(&p);
    assert!(c.list().unwrap().is_empty());
    assert_eq!(p.store.free_bytes(), p.store.capacity_bytes());
    let _ = HEADER_LEN;
}

#[test]
fn client_killed_mid_put_leaves_no_trace_and_previous_generation_intact() -> Result<()> {
    let p = start(16 * CHUNK_SIZE, None, 2, |_| {});
    let mut c = client(&p);
    let first = pattern(10, 2 * CHUNK_SIZE as usize);
    put(&mut c, "svc", &[("pages-1.img", first.clone())])?;
    // A second upload that dies half-way (the connection is dropped without commit).
    {
        let mut dying = client(&p);
        dying.put_begin("svc", SnapshotMeta::default(), None)?;
        dying.file_open(0, "pages-1.img")?;
        dying.file_data(0, &pattern(11, CHUNK_SIZE as usize))?;
        dying.file_data(0, &pattern(12, CHUNK_SIZE as usize))?;
    }
    // The server notices the close asynchronously; the listing never shows the partial put.
    for _ in 0..100 {
        if p.store.free_bytes() == p.store.capacity_bytes() - 2 * CHUNK_SIZE {
            break;
        }
        thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        p.store.free_bytes(),
        p.store.capacity_bytes() - 2 * CHUNK_SIZE
    );
    let list = c.list()?;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].generation, 1);
    assert_eq!(get(&mut c, "svc", 1, "pages-1.img")?, first);
    Ok(())
}
