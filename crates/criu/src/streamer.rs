//! CRIU's image-streamer protocol (`criu --stream`), the side CRIU connects to.
//!
//! CRIU connects to `streamer-capture.sock` (dump) or `streamer-serve.sock` (restore) in its
//! images directory. For each image it sends a length-prefixed (u32, little endian)
//! protobuf `img_streamer_request_entry { filename = 1 }`; on restore the streamer answers
//! with `img_streamer_reply_entry { exists = 1 }`. Then CRIU passes one end of a fresh pipe
//! over the socket (SCM_RIGHTS, one data byte): on dump the read end, from which the image
//! is read to EOF; on restore the write end, into which the image is written.

use std::{
    io::{self, IoSliceMut, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::Path,
    time::Duration,
};

use nix::{
    fcntl::{fcntl, FcntlArg},
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::socket::{getsockopt, recvmsg, sockopt, ControlMessageOwned, MsgFlags},
};
use prost::Message;

pub const CAPTURE_SOCKET: &str = "streamer-capture.sock";
pub const SERVE_SOCKET: &str = "streamer-serve.sock";
/// Longest request CRIU sends (a file name); anything longer is a protocol error.
const MAX_REQUEST: u32 = 4096;
/// Pipe capacity we ask for: fewer wake-ups per MiB than the default 64 KiB.
pub const PIPE_SIZE: i32 = 1 << 20;

#[derive(Clone, PartialEq, Message)]
struct RequestEntry {
    #[prost(string, required, tag = "1")]
    filename: String,
}

#[derive(Clone, PartialEq, Message)]
struct ReplyEntry {
    #[prost(bool, required, tag = "1")]
    exists: bool,
}

/// Binds the streamer socket in `images_dir`.
pub fn bind(images_dir: &Path, socket: &str) -> io::Result<UnixListener> {
    UnixListener::bind(images_dir.join(socket))
}

/// Waits for CRIU (process `criu_pid`) to connect while `alive()` holds; `None` if it gave
/// up first. Connections from any other process are dropped: where CRIU runs as a service's
/// uid, its socket is within that uid's reach, and what comes through it is the snapshot.
pub fn accept_while(
    listener: &UnixListener,
    criu_pid: u32,
    mut alive: impl FnMut() -> bool,
) -> io::Result<Option<UnixStream>> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                let peer = getsockopt(&s, sockopt::PeerCredentials).map(|c| c.pid());
                if peer != Ok(criu_pid as i32) {
                    tracing::warn!(
                        ?peer,
                        criu_pid,
                        "dropped a streamer connection not from CRIU"
                    );
                    continue;
                }
                s.set_nonblocking(false)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !alive() {
                    return Ok(None);
                }
                readable_within(listener_fd(listener), Duration::from_millis(20))?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether `fd` became readable within `timeout`. A signal's interruption counts as "not
/// yet": poll(2) is never restarted, and the processes that use this (the agent) handle
/// SIGCHLD.
pub fn readable_within(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(
        &mut fds,
        PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX),
    ) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn listener_fd(l: &UnixListener) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsFd;
    l.as_fd()
}

/// The next file CRIU asks for, or `None` when it closed the connection.
pub fn read_request(sock: &mut impl Read) -> io::Result<Option<String>> {
    let mut len = [0u8; 4];
    match sock.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("streamer request of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    sock.read_exact(&mut buf)?;
    let req = RequestEntry::decode(&buf[..])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some(req.filename))
}

/// Tells CRIU whether a requested image exists (restore only).
pub fn send_reply(sock: &mut UnixStream, exists: bool) -> io::Result<()> {
    let body = ReplyEntry { exists }.encode_to_vec();
    let mut msg = (body.len() as u32).to_le_bytes().to_vec();
    msg.extend_from_slice(&body);
    sock.write_all(&msg)
}

/// Receives the pipe end CRIU passes after a request.
pub fn recv_pipe(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor for us; we own it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                // A bigger pipe means fewer round trips; the default still works.
                let _ = fcntl(owned.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
                return Ok(owned);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "CRIU sent no pipe after its request",
    ))
}

/// How many bytes `pipe` holds before a write to it blocks.
pub fn pipe_capacity(pipe: std::os::fd::BorrowedFd<'_>) -> usize {
    fcntl(pipe.as_raw_fd(), FcntlArg::F_GETPIPE_SZ).map_or(0, |n| n.max(0) as usize)
}

/// Poll interval while waiting on CRIU.
pub const POLL: Duration = Duration::from_millis(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_reply_encoding_matches_criu() {
        // CRIU's pb_write_one: u32 length, then the protobuf message.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let body = RequestEntry {
            filename: "pages-1.img".into(),
        }
        .encode_to_vec();
        assert_eq!(&body[..2], &[0x0a, 11]);
        a.write_all(&(body.len() as u32).to_le_bytes()).unwrap();
        a.write_all(&body).unwrap();
        assert_eq!(
            read_request(&mut b).unwrap().as_deref(),
            Some("pages-1.img")
        );
        send_reply(&mut b, true).unwrap();
        let mut got = [0u8; 6];
        a.read_exact(&mut got).unwrap();
        assert_eq!(got, [2, 0, 0, 0, 0x08, 1]);
        drop(a);
        assert_eq!(read_request(&mut b).unwrap(), None);
    }

    #[test]
    fn only_the_criu_process_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let listener = bind(dir.path(), CAPTURE_SOCKET).unwrap();
        let me = std::process::id();
        let _intruder = UnixStream::connect(dir.path().join(CAPTURE_SOCKET)).unwrap();
        let mut polls = 0;
        let got = accept_while(&listener, me + 1, || {
            polls += 1;
            polls < 3
        })
        .unwrap();
        assert!(got.is_none(), "a connection from another pid is dropped");
        let _criu = UnixStream::connect(dir.path().join(CAPTURE_SOCKET)).unwrap();
        assert!(accept_while(&listener, me, || false).unwrap().is_some());
    }

    #[test]
    fn oversized_request_is_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&(MAX_REQUEST + 1).to_le_bytes()).unwrap();
        assert!(read_request(&mut b).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_file_name_request_reads_back(names in proptest::collection::vec(".{0,64}", 0..5)) {
            let mut wire = Vec::new();
            for filename in &names {
                let body = RequestEntry { filename: filename.clone() }.encode_to_vec();
                wire.extend((body.len() as u32).to_le_bytes());
                wire.extend(body);
            }
            let mut r = &wire[..];
            for name in &names {
                let got = read_request(&mut r).unwrap();
                proptest::prop_assert_eq!(got.as_ref(), Some(name));
            }
            proptest::prop_assert_eq!(read_request(&mut r).unwrap(), None);
        }

        #[test]
        fn any_bytes_as_streamer_requests_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
        ) {
            let mut r = &bytes[..];
            while let Ok(Some(_)) = read_request(&mut r) {}
        }
    }
}
