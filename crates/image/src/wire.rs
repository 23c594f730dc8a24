//! The pool's wire protocol. Every message is a frame: a 16-byte header (magic `TPRP`,
//! protocol version, kind, payload length, CRC32C of the payload) and a payload. Control
//! frames carry one JSON [`Request`] or [`Response`]; data frames carry a 4-byte file id and
//! up to one chunk of image bytes. Lengths are checked against per-kind limits before any
//! allocation, so a hostile peer cannot make the other side allocate more than a chunk.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    manifest::{Manifest, SnapshotMeta, CHUNK_SIZE},
    seal::Seal,
};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TPRP";
/// Protocol version; a peer speaking another one is refused at the first frame.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the frame header.
pub const HEADER_LEN: usize = 16;
/// Largest control payload (a manifest of a multi-GiB snapshot is well under this).
pub const MAX_CONTROL_PAYLOAD: u32 = 4 << 20;
/// Largest data payload: a file id and at most one chunk.
pub const MAX_DATA_PAYLOAD: u32 = 4 + CHUNK_SIZE as u32;
/// Longest token accepted in `Hello`.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Longest byte range one `GetRange` may ask for: a page fault's worth is a few KiB, a
/// prefetch a few MiB; the bound keeps one request from pinning a snapshot for long.
pub const MAX_RANGE_LEN: u64 = 64 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON-encoded request or response.
    Control = 1,
    /// A file id followed by raw image bytes.
    Data = 2,
}

impl FrameKind {
    fn max_payload(self) -> u32 {
        match self {
            FrameKind::Control => MAX_CONTROL_PAYLOAD,
            FrameKind::Data => MAX_DATA_PAYLOAD,
        }
    }
}

/// A decoded and bounds-checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    /// Payload length, already checked against the kind's limit.
    pub len: u32,
    /// CRC32C of the payload.
    pub crc: u32,
}

/// Why a frame could not be read or written.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("peer closed the connection")]
    Closed,
    #[error("connection i/o failed")]
    Io(#[from] io::Error),
    #[error("bad frame magic {0:02x?} (not a torpor pool peer?)")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("{kind:?} frame of {len} bytes exceeds the {max} byte limit")]
    TooLarge { kind: FrameKind, len: u32, max: u32 },
    #[error("frame checksum mismatch (header {expected:#010x}, payload {actual:#010x})")]
    ChecksumMismatch { expected: u32, actual: u32 },
    #[error("malformed control message")]
    BadMessage(#[source] serde_json::Error),
    #[error("data frame shorter than its file id")]
    ShortData,
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedKind { expected: FrameKind, got: FrameKind },
}

impl FrameHeader {
    /// Header for a payload.
    pub fn for_payload(kind: FrameKind, payload: &[u8]) -> Self {
        FrameHeader {
            kind,
            len: payload.len() as u32,
            crc: crc32c::crc32c(payload),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = PROTOCOL_VERSION;
        h[5] = self.kind as u8;
        // h[6..8] reserved, zero.
        h[8..12].copy_from_slice(&self.len.to_le_bytes());
        h[12..16].copy_from_slice(&self.crc.to_le_bytes());
        h
    }

    /// Decodes and bounds-checks a header; the payload length is trusted only after this.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Self, WireError> {
        let magic: [u8; 4] = h[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if h[4] != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion(h[4]));
        }
        let kind = match h[5] {
            1 => FrameKind::Control,
            2 => FrameKind::Data,
            other => return Err(WireError::UnknownKind(other)),
        };
        let len = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
        let max = kind.max_payload();
        if len > max {
            return Err(WireError::TooLarge { kind, len, max });
        }
        if kind == FrameKind::Data && len < 4 {
            return Err(WireError::ShortData);
        }
        Ok(FrameHeader { kind, len, crc })
    }

    /// Checks a received payload against the header's checksum.
    pub fn verify(&self, payload: &[u8]) -> Result<(), WireError> {
        let actual = crc32c::crc32c(payload);
        if actual != self.crc {
            return Err(WireError::ChecksumMismatch {
                expected: self.crc,
                actual,
            });
        }
        Ok(())
    }
}

/// Where a snapshot lives inside the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Pre-faulted pool memory.
    Ram,
    /// The spill directory.
    Disk,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Ram => "ram",
            Tier::Disk => "disk",
        })
    }
}

/// One line of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub generation: u64,
    pub bytes: u64,
    pub tier: Tier,
    pub created_unix_ms: u64,
}

/// Client to pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Must be the first frame of a connection.
    Hello {
        token: String,
    },
    /// Starts a snapshot upload; nothing is visible until `PutCommit`.
    PutBegin {
        name: String,
        meta: SnapshotMeta,
        /// Expected total bytes, when known, so the pool can make room up front.
        size_hint: Option<u64>,
    },
    /// Opens an image file of the upload under a connection-local id used by data frames.
    FileOpen {
        file_id: u32,
        name: String,
    },
    /// Ends a file; `size` must match the bytes received.
    FileClose {
        file_id: u32,
        size: u64,
    },
    /// Makes the upload visible as the next generation.
    PutCommit {
        /// The generation to commit as: it must exceed every earlier one of the name. Chosen
        /// by the client so that replicas hold a snapshot under the same number and its seal
        /// can bind it; `None` takes the next one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<u64>,
        /// The committing node's signature, stored with the manifest and handed back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seal: Option<Seal>,
    },
    /// Drops the upload.
    PutAbort,
    List,
    /// The manifest of a generation (the newest when `None`).
    GetManifest {
        name: String,
        generation: Option<u64>,
    },
    /// Streams one file of a snapshot as data frames with file id 0, then `FileEnd`.
    GetFile {
        name: String,
        generation: u64,
        file: String,
    },
    /// Streams `len` bytes of one file from `offset` (a lazy restore's page fault) as data
    /// frames with file id 0, then `FileEnd { size: len }`. An empty range, one longer than
    /// [`MAX_RANGE_LEN`] or one past the file's end is refused as `BadRequest`.
    GetRange {
        name: String,
        generation: u64,
        file: String,
        offset: u64,
        len: u64,
        /// The client checks the bytes against the seal's block digests itself: the pool may
        /// skip checking them against its stored CRCs (the frames' CRCs still come from those).
        /// Sent only when set, so a pool that predates it keeps serving other clients.
        #[serde(default, skip_serializing_if = "is_false")]
        sealed: bool,
    },
    /// Deletes one generation, or all of them when `None`.
    Delete {
        name: String,
        generation: Option<u64>,
    },
}

/// Machine-readable class of a pool error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthorized,
    NotFound,
    Full,
    Corrupt,
    BadRequest,
    Internal,
}

/// Pool to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Welcome {
        pool_version: String,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    PutReady {
        /// The generation a commit would get now (one more than any the name ever had).
        #[serde(default)]
        next_generation: u64,
    },
    Committed {
        generation: u64,
        bytes: u64,
        tier: Tier,
    },
    Listing {
        snapshots: Vec<SnapshotInfo>,
    },
    Manifest {
        manifest: Manifest,
    },
    FileEnd {
        size: u64,
    },
    Deleted {
        count: u64,
    },
}

/// Encodes a control message as one complete frame.
pub fn encode_control<T: Serialize>(msg: &T) -> Vec<u8> {
    let payload = serde_json::to_vec(msg).expect("control messages always serialize");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&FrameHeader::for_payload(FrameKind::Control, &payload).encode());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a control payload whose checksum was already verified.
pub fn decode_control<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(payload).map_err(WireError::BadMessage)
}

/// Writes one data frame (file id + bytes) without copying the bytes.
pub fn write_data<W: Write>(w: &mut W, file_id: u32, bytes: &[u8]) -> Result<(), WireError> {
    assert!(
        bytes.len() as u64 <= CHUNK_SIZE,
        "data frame over one chunk"
    );
    let id = file_id.to_le_bytes();
    let mut hasher = crc32c::crc32c(&id);
    hasher = crc32c::crc32c_append(hasher, bytes);
    let header = FrameHeader {
        kind: FrameKind::Data,
        len: (4 + bytes.len()) as u32,
        crc: hasher,
    };
    w.write_all(&header.encode())?;
    w.write_all(&id)?;
    w.write_all(bytes)?;
    Ok(())
}

/// A frame read by a blocking reader.
#[derive(Debug)]
pub enum Frame<'a> {
    Control(&'a [u8]),
    Data { file_id: u32, bytes: &'a [u8] },
}

/// Reads and checks one frame header, for a reader that places the payload itself (straight
/// into its destination) and verifies it with [`FrameHeader::verify`] or the header's `crc`.
pub fn read_header<R: Read>(r: &mut R) -> Result<FrameHeader, WireError> {
    let mut h = [0u8; HEADER_LEN];
    if let Err(e) = r.read_exact(&mut h) {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Closed
        } else {
            WireError::Io(e)
        });
    }
    FrameHeader::decode(&h)
}

/// Reads one frame into `buf` (reused between calls) and verifies its checksum.
pub fn read_frame<'a, R: Read>(r: &mut R, buf: &'a mut Vec<u8>) -> Result<Frame<'a>, WireError> {
    let mut h = [0u8; HEADER_LEN];
    if let Err(e) = r.read_exact(&mut h) {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Closed
        } else {
            WireError::Io(e)
        });
    }
    let header = FrameHeader::decode(&h)?;
    buf.resize(header.len as usize, 0);
    r.read_exact(buf)?;
    header.verify(buf)?;
    Ok(match header.kind {
        FrameKind::Control => Frame::Control(buf),
        FrameKind::Data => Frame::Data {
            file_id: u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")),
            bytes: &buf[4..],
        },
    })
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(bytes: &[u8]) -> Result<Request, WireError> {
        let mut buf = Vec::new();
        match read_frame(&mut &bytes[..], &mut buf)? {
            Frame::Control(p) => decode_control(p),
            Frame::Data { .. } => panic!("data"),
        }
    }

    #[test]
    fn control_roundtrip() {
        let req = Request::GetManifest {
            name: "a".into(),
            generation: Some(2),
        };
        assert_eq!(roundtrip(&encode_control(&req)).unwrap(), req);
    }

    #[test]
    fn range_request_roundtrip() {
        for sealed in [false, true] {
            let req = Request::GetRange {
                name: "svc".into(),
                generation: 3,
                file: "pages-1.img".into(),
                offset: 4096,
                len: MAX_RANGE_LEN,
                sealed,
            };
            let frame = encode_control(&req);
            // an unsealed request reads as it did before the flag existed
            assert_eq!(sealed, String::from_utf8_lossy(&frame).contains("sealed"));
            assert_eq!(roundtrip(&frame).unwrap(), req);
        }
    }

    #[test]
    fn header_read_alone() {
        let mut out = Vec::new();
        write_data(&mut out, 0, b"page").unwrap();
        let mut r = &out[..];
        let h = read_header(&mut r).unwrap();
        assert_eq!((h.kind, h.len), (FrameKind::Data, 8));
        h.verify(r).unwrap();
        assert!(matches!(
            read_header(&mut &out[..3]),
            Err(WireError::Closed)
        ));
        let mut bad = out.clone();
        bad[0] = b'X';
        assert!(matches!(
            read_header(&mut &bad[..]),
            Err(WireError::BadMagic(_))
        ));
    }

    #[test]
    fn data_roundtrip() {
        let mut out = Vec::new();
        write_data(&mut out, 7, b"hello").unwrap();
        let mut buf = Vec::new();
        match read_frame(&mut &out[..], &mut buf).unwrap() {
            Frame::Data { file_id, bytes } => {
                assert_eq!(file_id, 7);
                assert_eq!(bytes, b"hello");
            }
            Frame::Control(_) => panic!("control"),
        }
    }

    #[test]
    fn bad_magic_version_kind_are_refused() {
        let good = encode_control(&Request::List);
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(roundtrip(&bad), Err(WireError::BadMagic(_))));
        let mut bad = good.clone();
        bad[4] = 9;
        assert!(matches!(
            roundtrip(&bad),
            Err(WireError::UnsupportedVersion(9))
        ));
        let mut bad = good.clone();
        bad[5] = 77;
        assert!(matches!(roundtrip(&bad), Err(WireError::UnknownKind(77))));
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let header = FrameHeader {
            kind: FrameKind::Control,
            len: u32::MAX,
            crc: 0,
        };
        let bytes = header.encode();
        assert!(matches!(
            roundtrip(&bytes),
            Err(WireError::TooLarge { len: u32::MAX, .. })
        ));
        let header = FrameHeader {
            kind: FrameKind::Data,
            len: MAX_DATA_PAYLOAD + 1,
            crc: 0,
        };
        assert!(matches!(
            FrameHeader::decode(&header.encode()),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn corrupted_payload_fails_checksum() {
        let mut bytes = encode_control(&Request::List);
        let last = bytes.len() - 2;
        bytes[last] ^= 0x20;
        assert!(matches!(
            roundtrip(&bytes),
            Err(WireError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn truncated_and_garbage_frames() {
        let bytes = encode_control(&Request::List);
        assert!(matches!(roundtrip(&bytes[..5]), Err(WireError::Closed)));
        assert!(roundtrip(&bytes[..bytes.len() - 1]).is_err());
        let payload = b"{not json";
        let mut frame = FrameHeader::for_payload(FrameKind::Control, payload)
            .encode()
            .to_vec();
        frame.extend_from_slice(payload);
        assert!(matches!(roundtrip(&frame), Err(WireError::BadMessage(_))));
        let payload = br#"{"type":"format_disk"}"#;
        let mut frame = FrameHeader::for_payload(FrameKind::Control, payload)
            .encode()
            .to_vec();
        frame.extend_from_slice(payload);
        assert!(matches!(roundtrip(&frame), Err(WireError::BadMessage(_))));
    }

    #[test]
    fn short_data_frame_is_refused() {
        let header = FrameHeader {
            kind: FrameKind::Data,
            len: 2,
            crc: 0,
        };
        assert!(matches!(
            FrameHeader::decode(&header.encode()),
            Err(WireError::ShortData)
        ));
    }
}
