//! The sample service's websocket endpoint (RFC 6455, `GET /ws` with `Upgrade: websocket`):
//! it echoes each text or binary message as "echo: " and the message, answers pings, and
//! returns a close frame for a close frame. Enough to hold a long-lived connection through
//! the gate or kernel steering and across sleeps; no extensions, no fragmented messages.

use std::io::{self, Read, Write};

use base64::Engine;

/// The GUID RFC 6455 appends to the client's key.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` answer to a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{}{GUID}", key.trim()).as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// One frame: (opcode, unmasked payload).
fn read_frame(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h)?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            r.read_exact(&mut l)?;
            u64::from(u16::from_be_bytes(l))
        }
        127 => {
            let mut l = [0u8; 8];
            r.read_exact(&mut l)?;
            u64::from_be_bytes(l)
        }
        n => u64::from(n),
    };
    // A sample service: messages larger than this are a client's mistake.
    if len > 1 << 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut mask = [0u8; 4];
    if h[1] & 0x80 != 0 {
        r.read_exact(&mut mask)?;
    }
    let mut payload = vec![0; len as usize];
    r.read_exact(&mut payload)?;
    payload
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b ^= mask[i % 4]);
    Ok((h[0] & 0x0f, payload))
}

/// One final, unmasked frame (as a server sends it).
pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// Answers the upgrade for `key` and echoes messages until the client closes.
pub fn serve(key: &str, r: &mut impl Read, w: &mut impl Write) -> io::Result<()> {
    write!(
        w,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    )?;
    loop {
        let (opcode, payload) = read_frame(r)?;
        match opcode {
            0x1 | 0x2 => w.write_all(&frame(opcode, &[b"echo: ".as_slice(), &payload].concat()))?,
            0x8 => return w.write_all(&frame(0x8, &payload)),
            0x9 => w.write_all(&frame(0xA, &payload))?,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn masked_messages_are_echoed_a_ping_is_ponged_and_a_close_ends_it() {
        let masked = |opcode: u8, p: &[u8]| {
            let m = [7, 1, 2, 9];
            let mut f = vec![0x80 | opcode, 0x80 | p.len() as u8];
            f.extend_from_slice(&m);
            f.extend(p.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
            f
        };
        let input = [masked(1, b"hi"), masked(9, b"p"), masked(8, &[3, 232])].concat();
        let mut out = Vec::new();
        serve("dGhlIHNhbXBsZSBub25jZQ==", &mut input.as_slice(), &mut out).unwrap();
        let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(out.starts_with(b"HTTP/1.1 101"));
        let expected = [frame(1, b"echo: hi"), frame(0xA, b"p"), frame(8, &[3, 232])].concat();
        assert_eq!(&out[head_end..], expected.as_slice());
    }
}
