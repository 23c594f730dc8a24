//! The control endpoint's frames: one request, one reply per connection, each framed as
//!
//! ```text
//! magic "TPCL" | version u8 | kind u8 | reserved u16 (0) | length u32 BE | crc32c u32 BE | JSON
//! ```
//!
//! The header is checked before the payload is read (a wrong magic, version or kind, or a
//! length above [`MAX_PAYLOAD`], ends the exchange without reading on), and the payload is
//! read whole and checked against its checksum before it is parsed.

use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TPCL";
/// The frame layout and payload schema this build speaks.
pub const VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted: a request is a service name and a command.
pub const MAX_PAYLOAD: u32 = 64 << 10;

/// Which way a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request = 1,
    Reply = 2,
}

/// Why a frame was refused.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("not a torpor control frame (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("control frame version {0} is not spoken here (this build speaks {VERSION})")]
    Version(u8),
    #[error("expected a {expected:?} frame, got kind {got}")]
    Kind { expected: Kind, got: u8 },
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("control frame of {0} bytes is above the limit of {MAX_PAYLOAD}")]
    TooLarge(u32),
    #[error("control frame checksum mismatch (header {header:08x}, payload {payload:08x})")]
    Checksum { header: u32, payload: u32 },
    #[error("control frame payload is not valid")]
    Payload(#[source] serde_json::Error),
    #[error("the control connection failed")]
    Io(#[from] std::io::Error),
}

/// `value` as one frame of `kind`.
pub fn encode(kind: Kind, value: &impl Serialize) -> Vec<u8> {
    let payload = serde_json::to_vec(value).expect("control messages serialize");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// A checked header: the payload's length and checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub crc: u32,
}

impl Header {
    /// Checks a header read off the wire against the `expected` kind.
    pub fn parse(h: &[u8; HEADER_LEN], expected: Kind) -> Result<Header, WireError> {
        let magic: [u8; 4] = h[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::Magic(magic));
        }
        if h[4] != VERSION {
            return Err(WireError::Version(h[4]));
        }
        if h[5] != expected as u8 {
            return Err(WireError::Kind {
                expected,
                got: h[5],
            });
        }
        if h[6..8] != [0, 0] {
            return Err(WireError::Reserved);
        }
        let len = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLarge(len));
        }
        let crc = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        Ok(Header { len, crc })
    }

    /// Checks `payload` (read whole, `len` bytes) against the checksum and parses it.
    pub fn decode<T: DeserializeOwned>(&self, payload: &[u8]) -> Result<T, WireError> {
        let crc = crc32c::crc32c(payload);
        if crc != self.crc {
            return Err(WireError::Checksum {
                header: self.crc,
                payload: crc,
            });
        }
        serde_json::from_slice(payload).map_err(WireError::Payload)
    }
}

/// Reads one frame of `kind` from a blocking stream (the command-line client).
pub fn read_blocking<T: DeserializeOwned>(
    r: &mut impl std::io::Read,
    kind: Kind,
) -> Result<T, WireError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    let header = Header::parse(&h, kind)?;
    let mut payload = vec![0u8; header.len as usize];
    r.read_exact(&mut payload)?;
    header.decode(&payload)
}

/// Reads one frame of `kind` from an async stream (the endpoint).
pub async fn read_async<T: DeserializeOwned>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    kind: Kind,
) -> Result<T, WireError> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await?;
    let header = Header::parse(&h, kind)?;
    let mut payload = vec![0u8; header.len as usize];
    r.read_exact(&mut payload).await?;
    header.decode(&payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Vec<u8> {
        encode(Kind::Request, &serde_json::json!({"service": "web"}))
    }

    fn read(bytes: &[u8]) -> Result<serde_json::Value, WireError> {
        read_blocking(&mut &bytes[..], Kind::Request)
    }

    #[test]
    fn a_frame_reads_back() {
        assert_eq!(read(&frame()).unwrap()["service"], "web");
    }

    #[test]
    fn a_wrong_magic_is_refused() {
        let mut f = frame();
        f[0] = b'X';
        assert!(matches!(read(&f), Err(WireError::Magic(_))));
    }

    #[test]
    fn another_version_is_refused() {
        let mut f = frame();
        f[4] = 2;
        assert!(matches!(read(&f), Err(WireError::Version(2))));
    }

    #[test]
    fn a_reply_where_a_request_is_expected_is_refused() {
        let f = encode(Kind::Reply, &"x");
        assert!(matches!(read(&f), Err(WireError::Kind { got: 2, .. })));
    }

    #[test]
    fn reserved_bytes_must_be_zero() {
        let mut f = frame();
        f[7] = 1;
        assert!(matches!(read(&f), Err(WireError::Reserved)));
    }

    #[test]
    fn an_oversized_length_is_refused_before_anything_is_read() {
        let mut f = frame();
        f[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        // No payload follows: the header alone must be enough to refuse it.
        assert!(matches!(
            read(&f[..HEADER_LEN]),
            Err(WireError::TooLarge(n)) if n == MAX_PAYLOAD + 1
        ));
    }

    #[test]
    fn a_changed_payload_fails_its_checksum() {
        let mut f = frame();
        let last = f.len() - 3;
        f[last] ^= 0x20;
        assert!(matches!(read(&f), Err(WireError::Checksum { .. })));
    }

    #[test]
    fn a_truncated_frame_is_an_io_error() {
        let f = frame();
        assert!(matches!(read(&f[..f.len() - 1]), Err(WireError::Io(_))));
        assert!(matches!(read(&f[..5]), Err(WireError::Io(_))));
    }

    #[test]
    fn a_payload_that_is_not_the_expected_json_is_refused() {
        let mut f = encode(Kind::Request, &"x");
        let payload = b"{not json".to_vec();
        f.truncate(8);
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
        f.extend_from_slice(&payload);
        assert!(matches!(read(&f), Err(WireError::Payload(_))));
    }
}
