//! Property tests of the formats that cross a trust boundary: pool wire frames, manifests and
//! the spilled snapshot file's prefix. Whatever is encoded decodes to itself; whatever bytes
//! arrive, the decoders answer with a value or an error, never a panic.

use proptest::prelude::*;
use torpor_image::{
    manifest::{RunAs, SnapshotMeta},
    seal::{Seal, SealedFile},
    snapfile::{decode_prefix, encode_prefix, SnapfileError, SNAPFILE_HEADER_LEN},
    wire::{
        decode_control, encode_control, read_frame, write_data, ErrorCode, Frame, FrameHeader,
        Request, Response, SnapshotInfo, Tier, WireError, HEADER_LEN,
    },
    FileEntry, Manifest, CHUNK_SIZE,
};

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,24}"
}

fn meta() -> impl Strategy<Value = SnapshotMeta> {
    (
        any::<i32>(),
        prop::collection::vec(any::<i32>(), 0..8),
        any::<String>(),
        any::<u64>(),
        prop::option::of((any::<u32>(), any::<u32>()).prop_map(|(uid, gid)| RunAs { uid, gid })),
        any::<bool>(),
    )
        .prop_map(
            |(root_pid, pids, criu_version, footprint_bytes, run_as, pid_namespace)| SnapshotMeta {
                root_pid,
                pids,
                criu_version,
                footprint_bytes,
                run_as,
                pid_namespace,
            },
        )
}

/// A seal as a node writes it (its MAC is not checked here: this is about encoding).
fn seal() -> impl Strategy<Value = Seal> {
    (
        any::<u8>(),
        "[0-9a-f]{16}",
        prop::collection::vec((name(), any::<u64>(), "[0-9a-f]{64}"), 0..4),
        "[0-9a-f]{64}",
    )
        .prop_map(|(version, key_id, files, mac)| Seal {
            version,
            key_id,
            files: files
                .into_iter()
                .map(|(name, size, blake3)| SealedFile { name, size, blake3 })
                .collect(),
            mac,
        })
}

/// A valid manifest: distinct valid file names, one checksum per chunk.
fn manifest() -> impl Strategy<Value = Manifest> {
    let files = prop::collection::btree_set(name(), 0..6).prop_flat_map(|names| {
        names
            .into_iter()
            .map(|name| {
                (0..=3 * CHUNK_SIZE + 7).prop_flat_map(move |size| {
                    let name = name.clone();
                    prop::collection::vec(any::<u32>(), FileEntry::chunks_for(size)).prop_map(
                        move |chunk_crcs| FileEntry {
                            name: name.clone(),
                            size,
                            chunk_crcs,
                        },
                    )
                })
            })
            .collect::<Vec<_>>()
    });
    (
        name(),
        any::<u64>(),
        any::<u64>(),
        meta(),
        files,
        prop::option::of(seal()),
    )
        .prop_map(
            |(name, generation, created_unix_ms, meta, files, seal)| Manifest {
                name,
                generation,
                created_unix_ms,
                meta,
                files,
                seal,
            },
        )
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        any::<String>().prop_map(|token| Request::Hello { token }),
        (any::<String>(), meta(), any::<Option<u64>>()).prop_map(|(name, meta, size_hint)| {
            Request::PutBegin {
                name,
                meta,
                size_hint,
            }
        }),
        (any::<u32>(), any::<String>())
            .prop_map(|(file_id, name)| Request::FileOpen { file_id, name }),
        (any::<u32>(), any::<u64>())
            .prop_map(|(file_id, size)| Request::FileClose { file_id, size }),
        (any::<Option<u64>>(), prop::option::of(seal()))
            .prop_map(|(generation, seal)| Request::PutCommit { generation, seal }),
        Just(Request::PutAbort),
        Just(Request::List),
        (any::<String>(), any::<Option<u64>>())
            .prop_map(|(name, generation)| Request::GetManifest { name, generation }),
        (any::<String>(), any::<u64>(), any::<String>()).prop_map(|(name, generation, file)| {
            Request::GetFile {
                name,
                generation,
                file,
            }
        }),
        (any::<String>(), any::<Option<u64>>())
            .prop_map(|(name, generation)| Request::Delete { name, generation }),
    ]
}

fn tier() -> impl Strategy<Value = Tier> {
    prop_oneof![Just(Tier::Ram), Just(Tier::Disk)]
}

fn response() -> impl Strategy<Value = Response> {
    let code = prop_oneof![
        Just(ErrorCode::Unauthorized),
        Just(ErrorCode::NotFound),
        Just(ErrorCode::Full),
        Just(ErrorCode::Corrupt),
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::Internal),
    ];
    let info = (
        any::<String>(),
        any::<u64>(),
        any::<u64>(),
        tier(),
        any::<u64>(),
    )
        .prop_map(
            |(name, generation, bytes, tier, created_unix_ms)| SnapshotInfo {
                name,
                generation,
                bytes,
                tier,
                created_unix_ms,
            },
        );
    prop_oneof![
        any::<String>().prop_map(|pool_version| Response::Welcome { pool_version }),
        (code, any::<String>()).prop_map(|(code, message)| Response::Error { code, message }),
        any::<u64>().prop_map(|next_generation| Response::PutReady { next_generation }),
        (any::<u64>(), any::<u64>(), tier()).prop_map(|(generation, bytes, tier)| {
            Response::Committed {
                generation,
                bytes,
                tier,
            }
        }),
        prop::collection::vec(info, 0..4).prop_map(|snapshots| Response::Listing { snapshots }),
        manifest().prop_map(|manifest| Response::Manifest { manifest }),
        any::<u64>().prop_map(|size| Response::FileEnd { size }),
        any::<u64>().prop_map(|count| Response::Deleted { count }),
    ]
}

fn control<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let mut buf = Vec::new();
    match read_frame(&mut &bytes[..], &mut buf)? {
        Frame::Control(p) => decode_control(p),
        Frame::Data { .. } => panic!("a control frame came back as data"),
    }
}

proptest! {
    #[test]
    fn any_request_survives_the_wire(req in request()) {
        prop_assert_eq!(control::<Request>(&encode_control(&req)).unwrap(), req);
    }

    #[test]
    fn any_response_survives_the_wire(resp in response()) {
        prop_assert_eq!(control::<Response>(&encode_control(&resp)).unwrap(), resp);
    }

    #[test]
    fn any_data_frame_survives_the_wire(
        file_id in any::<u32>(),
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
    ) {
        let mut wire = Vec::new();
        write_data(&mut wire, file_id, &bytes).unwrap();
        let mut buf = Vec::new();
        match read_frame(&mut &wire[..], &mut buf).unwrap() {
            Frame::Data { file_id: id, bytes: b } => {
                prop_assert_eq!(id, file_id);
                prop_assert_eq!(b, &bytes[..]);
            }
            Frame::Control(_) => prop_assert!(false, "data came back as control"),
        }
    }

    #[test]
    fn a_flipped_payload_byte_is_caught_by_the_checksum(
        req in request(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..,
    ) {
        let mut wire = encode_control(&req);
        let i = HEADER_LEN + at.index(wire.len() - HEADER_LEN);
        wire[i] ^= flip;
        let r = control::<Request>(&wire);
        prop_assert!(matches!(r, Err(WireError::ChecksumMismatch { .. })), "{:?}", r);
    }

    #[test]
    fn any_frame_header_decodes_or_is_refused(h in any::<[u8; HEADER_LEN]>()) {
        if let Ok(header) = FrameHeader::decode(&h) {
            // Only the reserved bytes may differ once re-encoded.
            let again = header.encode();
            prop_assert_eq!(&again[..6], &h[..6]);
            prop_assert_eq!(&again[8..], &h[8..]);
        }
    }

    #[test]
    fn any_bytes_read_as_frames_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut r = &bytes[..];
        let mut buf = Vec::new();
        while let Ok(frame) = read_frame(&mut r, &mut buf) {
            if let Frame::Control(p) = frame {
                let _ = decode_control::<Request>(p);
                let _ = decode_control::<Response>(p);
            }
        }
        let _ = decode_control::<Request>(&bytes);
        let _ = decode_control::<Response>(&bytes);
    }

    #[test]
    fn a_valid_manifest_round_trips_through_json(m in manifest()) {
        m.validate().unwrap();
        let back: Manifest = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        back.validate().unwrap();
        prop_assert_eq!(back, m);
    }

    #[test]
    fn a_manifest_with_a_missing_chunk_checksum_is_invalid(
        mut m in manifest().prop_filter("a file with data", |m| m.files.iter().any(|f| f.size > 0)),
    ) {
        let f = m.files.iter_mut().find(|f| f.size > 0).unwrap();
        f.chunk_crcs.pop();
        prop_assert!(m.validate().is_err());
    }

    #[test]
    fn any_bytes_as_a_manifest_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) {
            let _ = m.validate();
        }
    }

    #[test]
    fn a_snapfile_prefix_round_trips(m in manifest()) {
        let prefix = encode_prefix(&m);
        let len = prefix.len() as u64 + m.total_bytes();
        let p = decode_prefix(&mut &prefix[..], len).unwrap();
        prop_assert_eq!(p.data_offset, prefix.len() as u64);
        prop_assert!(p.data_offset >= SNAPFILE_HEADER_LEN);
        prop_assert_eq!(p.manifest, m);
        // A file of any other length is refused.
        let r = decode_prefix(&mut &prefix[..], len + 1);
        prop_assert!(matches!(r, Err(SnapfileError::LengthMismatch { .. })), "{:?}", r);
    }

    #[test]
    fn any_bytes_as_a_snapfile_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        file_len in any::<u64>(),
    ) {
        let _ = decode_prefix(&mut &bytes[..], bytes.len() as u64);
        let _ = decode_prefix(&mut &bytes[..], file_len);
    }
}
