//! Sending RAM-tier chunks to a client on a Unix socket without copying them: the chunk's
//! pages are `vmsplice`d into a pipe and `splice`d from there into the socket, whose buffers
//! then refer to the arena's pages until the client has read them. The socket copy into fresh
//! socket buffers, half of the pool's work per byte served, goes away; the client's own copy
//! out of the socket reads the arena directly.
//!
//! The pages must not change until the client has read them: the session keeps the snapshot
//! they belong to (so their chunks cannot return to the arena and be refilled) until the
//! client's next request, which it sends only after reading the whole answer. Were that
//! broken anyway (a connection that ends with data unread), the client's checks (frame CRCs
//! taken from the store, the seal's digest) would refuse the altered bytes.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    time::Duration,
};

use nix::fcntl::{fcntl, splice, vmsplice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::{unix::AsyncFd, Interest};

/// Pipe capacity asked for: a whole chunk per round.
const PIPE_SIZE: i32 = 1 << 20;

/// A pipe to splice through and the socket it drains into.
#[derive(Debug)]
pub(crate) struct Splicer {
    /// A duplicate of the connection's socket, registered for writability on its own.
    sock: AsyncFd<OwnedFd>,
    pipe_rd: OwnedFd,
    pipe_wr: OwnedFd,
    /// Bytes in the pipe not yet in the socket.
    queued: usize,
}

impl Splicer {
    /// A splicer into `sock` (a non-blocking socket that stays open while this lives).
    pub(crate) fn new(sock: BorrowedFd<'_>) -> io::Result<Splicer> {
        let dup = sock.try_clone_to_owned()?;
        let (pipe_rd, pipe_wr) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A smaller pipe only costs rounds.
        let _ = fcntl(pipe_wr.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        // SAFETY: the AsyncFd owns `dup`, an open descriptor that stays open (and the same)
        // until the AsyncFd is dropped.
        let sock = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }
            .map_err(io::Error::from)?;
        Ok(Splicer {
            sock,
            pipe_rd,
            pipe_wr,
            queued: 0,
        })
    }

    /// Sends `head` (copied: it may be transient) and then `pages` (spliced: they must stay
    /// unchanged until the client read them), all of both, within `limit`.
    pub(crate) async fn send(
        &mut self,
        head: &[u8],
        pages: &[u8],
        limit: Duration,
    ) -> Result<(), SpliceError> {
        match tokio::time::timeout(limit, self.send_all(head, pages)).await {
            Ok(r) => r.map_err(SpliceError::Io),
            Err(_) => Err(SpliceError::Stalled),
        }
    }

    async fn send_all(&mut self, mut head: &[u8], mut pages: &[u8]) -> io::Result<()> {
        while !head.is_empty() || !pages.is_empty() || self.queued > 0 {
            if !head.is_empty() {
                match nix::unistd::write(&self.pipe_wr, head) {
                    Ok(n) => {
                        head = &head[n..];
                        self.queued += n;
                    }
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            } else if !pages.is_empty() {
                let iov = [io::IoSlice::new(pages)];
                match vmsplice(&self.pipe_wr, &iov, SpliceFFlags::SPLICE_F_NONBLOCK) {
                    Ok(n) => {
                        pages = &pages[n..];
                        self.queued += n;
                    }
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if self.queued > 0 {
                self.drain_some().await?;
            }
        }
        Ok(())
    }

    /// Moves some of the pipe's bytes into the socket, waiting for room in it.
    async fn drain_some(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.sock.writable().await?;
            let moved = ready.try_io(|sock| {
                splice(
                    self.pipe_rd.as_fd(),
                    None,
                    sock.get_ref().as_fd(),
                    None,
                    self.queued,
                    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
                )
                .map_err(io::Error::from)
            });
            match moved {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => {
                    self.queued -= n;
                    return Ok(());
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }
}

/// Why a spliced send failed.
#[derive(Debug)]
pub(crate) enum SpliceError {
    Io(io::Error),
    /// The client took nothing for the write timeout.
    Stalled,
}
