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
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::Path,
    time::Duration,
};

use nix::{
    fcntl::{fcntl, vmsplice, FcntlArg, SpliceFFlags},
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

/// Bytes of a streamed image withheld from CRIU until the caller says they may go
/// ([`PipeFeeder::release`]): without its last bytes CRIU cannot finish the image.
pub const HOLD_BACK: usize = 4096;

/// Buffers in a [`PipeFeeder`]'s ring: enough that, with a 1 MiB pipe, the one being
/// refilled has always been read by CRIU already.
const RING_SLOTS: usize = 3;

/// Feeds one image into CRIU's pipe without copying it: the bytes land (from the pool's
/// socket) in one of a ring of buffers and are `vmsplice`d into the pipe, which then refers
/// to those pages until CRIU has read them, so CRIU's own copy out of the pipe is the only
/// one (a `write` would copy every byte into fresh pipe pages first, at first-touch speed).
/// A buffer is refilled only once the pipe holds none of its bytes: the pipe is
/// first-in first-out and this is its only writer, so that is the case exactly when it holds
/// no more bytes (FIONREAD) than were put in after that buffer's. When that is not yet so,
/// the bytes take a copying detour through a spare buffer instead of waiting. The last
/// [`HOLD_BACK`] bytes put in are always withheld (copied aside) until
/// [`PipeFeeder::release`].
#[derive(Debug)]
pub struct PipeFeeder {
    pipe: std::fs::File,
    /// `RING_SLOTS` buffers of `slot_len` bytes; its own mapping, so that pages the pipe
    /// still refers to when the feeder is dropped are never handed out again while CRIU may
    /// read them (they are freed when the pipe lets go of them).
    ring: memmap2::MmapMut,
    slot_len: usize,
    /// Ring slot of the next [`PipeFeeder::space`].
    next: usize,
    /// For each slot, `put` just after its bytes went into the pipe.
    slot_end: [u64; RING_SLOTS],
    /// Most bytes the pipe can hold (a slot per page, at most a page each): a slot with at
    /// least this many bytes put in after its own is free without asking the pipe, whose
    /// lock CRIU holds for as long as each of its reads copies.
    capacity: u64,
    /// Bytes put into the pipe so far.
    put: u64,
    /// Where the last [`PipeFeeder::space`] lent memory: a ring slot, or `None` for `spare`.
    lent: Option<usize>,
    /// Copying detour for when the next ring slot is still in the pipe.
    spare: Vec<u8>,
    /// The withheld tail.
    held: Vec<u8>,
}

impl PipeFeeder {
    /// A feeder into `pipe` for pieces of at most `max_piece` bytes.
    pub fn new(pipe: OwnedFd, max_piece: usize) -> io::Result<PipeFeeder> {
        let slot_len = max_piece.max(1).next_multiple_of(PAGE);
        let ring = memmap2::MmapOptions::new()
            .len(slot_len * RING_SLOTS)
            .map_anon()?;
        // Only this feeder resizes the pipe (CRIU never does), so its capacity stays put.
        let capacity = pipe_capacity(pipe.as_fd()) as u64;
        Ok(PipeFeeder {
            capacity,
            pipe: pipe.into(),
            ring,
            slot_len,
            next: 0,
            slot_end: [0; RING_SLOTS],
            put: 0,
            lent: None,
            spare: Vec::new(),
            held: Vec::with_capacity(2 * HOLD_BACK),
        })
    }

    /// `len` bytes of memory for the next piece of the image; fill them, then
    /// [`PipeFeeder::pass`] them.
    pub fn space(&mut self, len: usize) -> io::Result<&mut [u8]> {
        if len > self.slot_len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a piece of {len} bytes exceeds the feeder's {}",
                    self.slot_len
                ),
            ));
        }
        let slot = self.next;
        let after = self.put - self.slot_end[slot];
        if after >= self.capacity || pipe_holds(&self.pipe)? <= after {
            self.next = (slot + 1) % RING_SLOTS;
            self.lent = Some(slot);
            let start = slot * self.slot_len;
            Ok(&mut self.ring[start..start + len])
        } else {
            self.lent = None;
            self.spare.resize(len, 0);
            Ok(&mut self.spare[..])
        }
    }

    /// Puts the `len` bytes just filled into the pipe (all but the last [`HOLD_BACK`] of
    /// the image so far) and returns them, for the caller to inspect while CRIU reads them.
    pub fn pass(&mut self, len: usize) -> io::Result<&[u8]> {
        let bytes: &[u8] = match self.lent {
            Some(slot) => &self.ring[slot * self.slot_len..][..len],
            None => &self.spare[..len],
        };
        if len < HOLD_BACK {
            // A small piece: joins the withheld tail, whose front goes out as a copy.
            self.held.extend_from_slice(bytes);
            let excess = self.held.len().saturating_sub(HOLD_BACK);
            write_all(&mut self.pipe, &self.held[..excess], &mut self.put)?;
            self.held.drain(..excess);
            if let Some(slot) = self.lent {
                // Copied, not spliced: the pipe holds nothing of this slot's.
                self.slot_end[slot] = self.put;
            }
        } else {
            let (pass, keep) = bytes.split_at(len - HOLD_BACK);
            write_all(&mut self.pipe, &self.held, &mut self.put)?;
            match self.lent {
                Some(slot) => {
                    splice_all(&self.pipe, pass, &mut self.put)?;
                    self.slot_end[slot] = self.put;
                }
                None => write_all(&mut self.pipe, pass, &mut self.put)?,
            }
            self.held.clear();
            self.held.extend_from_slice(keep);
        }
        Ok(match self.lent {
            Some(slot) => &self.ring[slot * self.slot_len..][..len],
            None => &self.spare[..len],
        })
    }

    /// Writes the withheld tail: the image is complete in the pipe.
    pub fn release(mut self) -> io::Result<()> {
        let held = std::mem::take(&mut self.held);
        write_all(&mut self.pipe, &held, &mut self.put)
    }
}

const PAGE: usize = 4096;

/// Bytes in `pipe` not yet read.
fn pipe_holds(pipe: &std::fs::File) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD stores one int through the pointer, which is valid for that.
    if unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

fn write_all(pipe: &mut std::fs::File, bytes: &[u8], put: &mut u64) -> io::Result<()> {
    pipe.write_all(bytes)?;
    *put += bytes.len() as u64;
    Ok(())
}

/// `vmsplice`s all of `bytes` into `pipe` (waiting while it is full).
fn splice_all(pipe: &std::fs::File, mut bytes: &[u8], put: &mut u64) -> io::Result<()> {
    while !bytes.is_empty() {
        match vmsplice(pipe, &[io::IoSlice::new(bytes)], SpliceFFlags::empty()) {
            Ok(n) => {
                bytes = &bytes[n..];
                *put += n as u64;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
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

    /// A pipe whose read end a thread drains to EOF; returns the write end, the bytes read
    /// so far and the thread (which returns all of them).
    fn drained_pipe() -> (
        OwnedFd,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
        std::thread::JoinHandle<Vec<u8>>,
    ) {
        let (rd, wr) = nix::unistd::pipe().unwrap();
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        let reader = std::thread::spawn(move || {
            let mut rd = std::fs::File::from(rd);
            let (mut all, mut buf) = (Vec::new(), [0u8; 3000]);
            loop {
                match rd.read(&mut buf).unwrap() {
                    0 => return all,
                    n => {
                        all.extend_from_slice(&buf[..n]);
                        counter.store(all.len(), std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }
        });
        (wr, seen, reader)
    }

    /// Passes `piece` through the feeder, checking it hands back what was filled in.
    fn feed(f: &mut PipeFeeder, piece: &[u8]) {
        f.space(piece.len()).unwrap().copy_from_slice(piece);
        assert_eq!(f.pass(piece.len()).unwrap(), piece);
    }

    #[test]
    fn a_fed_image_comes_out_whole_in_order_and_its_tail_only_on_release() {
        let (wr, seen, reader) = drained_pipe();
        let watch = wr.try_clone().unwrap();
        let mut f = PipeFeeder::new(wr, 16 << 10).unwrap();
        let sizes = [
            16 << 10,
            100,
            5000,
            16 << 10,
            1,
            4096,
            4095,
            16 << 10,
            7,
            9000,
        ];
        let total: usize = sizes.iter().sum();
        let image: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let mut at = 0;
        for n in sizes {
            feed(&mut f, &image[at..at + n]);
            at += n;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.load(std::sync::atomic::Ordering::SeqCst) < total - HOLD_BACK {
            assert!(
                std::time::Instant::now() < deadline,
                "the image never arrived"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let watch = std::fs::File::from(watch);
        assert_eq!(pipe_holds(&watch).unwrap(), 0, "the tail is withheld");
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            total - HOLD_BACK
        );
        f.release().unwrap();
        drop(watch);
        assert_eq!(reader.join().unwrap(), image);
    }

    #[test]
    fn a_ring_slot_whose_bytes_are_still_in_the_pipe_is_not_refilled() {
        let (rd, wr) = nix::unistd::pipe().unwrap();
        let piece = 8 << 10;
        let mut f = PipeFeeder::new(wr, piece).unwrap();
        // Nobody reads: after a lap of the ring the first slot's bytes are still in the
        // pipe, so the next piece must not land there.
        let image: Vec<u8> = (0..(RING_SLOTS + 2) * piece)
            .map(|i| (i / piece * 17 + i % 13) as u8)
            .collect();
        for p in image.chunks(piece) {
            feed(&mut f, p);
        }
        f.release().unwrap();
        let mut got = Vec::new();
        std::fs::File::from(rd).read_to_end(&mut got).unwrap();
        assert_eq!(got, image);
    }

    #[test]
    fn a_piece_larger_than_the_ring_slots_is_refused() {
        let (_rd, wr) = nix::unistd::pipe().unwrap();
        let mut f = PipeFeeder::new(wr, 4096).unwrap();
        assert!(f.space(4097).is_err());
        assert_eq!(f.space(4096).unwrap().len(), 4096);
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
