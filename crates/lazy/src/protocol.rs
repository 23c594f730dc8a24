//! CRIU's side of `lazy-pages.socket` as a stream of native-endian 4-byte words: a pid
//! followed by a 1-byte message carrying the process's uffd (`SCM_RIGHTS`), a negative pid
//! for a zombie (no fd), and finally FIN. Words are read with exact 4-byte receives, never
//! through a buffer, since a read that swallowed the dummy byte would drop the attached fd.
//! The sending side is here too, for tests and tools that play CRIU's part.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{
    recv, recvmsg, send, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags,
};

/// "ReSTore Finished": the last word CRIU sends, after every process registered its ranges.
pub const FIN: u32 = 0x5253_5446;

/// One message of the restore.
#[derive(Debug)]
pub enum Message {
    /// A restored process (its pid as recorded in the images) and its uffd.
    Process { pid: i32, uffd: OwnedFd },
    /// A zombie: it has no memory, so no uffd.
    Zombie { pid: i32 },
    /// The restore finished.
    Fin,
}

/// The restore connection misbehaved.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("restore connection closed before FIN")]
    ClosedBeforeFin,
    #[error("restore connection closed inside a message")]
    Truncated,
    #[error("process {pid} was sent without its userfaultfd")]
    MissingFd { pid: i32 },
    #[error("restore connection stalled inside a message")]
    Stalled,
    #[error("reading the restore connection")]
    Io(#[source] io::Error),
}

fn io_err(e: Errno) -> ProtocolError {
    match e {
        Errno::EAGAIN => ProtocolError::Stalled,
        e => ProtocolError::Io(e.into()),
    }
}

/// Reads CRIU's messages from the accepted connection, keeping track of FIN so that an EOF
/// before it is an error and one after it the normal end.
#[derive(Debug)]
pub struct RestoreStream {
    sock: UnixStream,
    fin: bool,
}

impl RestoreStream {
    pub fn new(sock: UnixStream) -> RestoreStream {
        RestoreStream { sock, fin: false }
    }

    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// The next message; `Ok(None)` at EOF after FIN. Blocks inside a message (CRIU sends
    /// each under one mutex, so the rest follows at once); the socket's read timeout bounds it.
    pub fn next_message(&mut self) -> Result<Option<Message>, ProtocolError> {
        let Some(word) = self.read_word()? else {
            return if self.fin {
                Ok(None)
            } else {
                Err(ProtocolError::ClosedBeforeFin)
            };
        };
        if word == FIN {
            self.fin = true;
            return Ok(Some(Message::Fin));
        }
        let pid = word as i32;
        if pid < 0 {
            return Ok(Some(Message::Zombie {
                pid: pid.wrapping_neg(),
            }));
        }
        let uffd = self.read_fd(pid)?;
        Ok(Some(Message::Process { pid, uffd }))
    }

    /// Exactly 4 bytes; `None` on EOF at a word boundary.
    fn read_word(&mut self) -> Result<Option<u32>, ProtocolError> {
        let mut word = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match recv(self.sock.as_raw_fd(), &mut word[got..], MsgFlags::empty()) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(ProtocolError::Truncated),
                Ok(n) => got += n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(Some(u32::from_ne_bytes(word)))
    }

    /// The 1-byte message after a pid, with its `SCM_RIGHTS` fd (close-on-exec on receipt).
    fn read_fd(&mut self, pid: i32) -> Result<OwnedFd, ProtocolError> {
        loop {
            let mut byte = [0u8; 1];
            let mut iov = [IoSliceMut::new(&mut byte)];
            let mut space = nix::cmsg_space!([RawFd; 4]);
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => msg,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(io_err(e)),
            };
            if msg.bytes == 0 {
                return Err(ProtocolError::Truncated);
            }
            let mut fds: Vec<OwnedFd> = Vec::new();
            for cmsg in msg.cmsgs().map_err(|e| ProtocolError::Io(e.into()))? {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    // SAFETY: the kernel installed these fds in our table for this message.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            // one fd per process; extras (never sent by CRIU) are closed here
            return fds
                .into_iter()
                .next()
                .ok_or(ProtocolError::MissingFd { pid });
        }
    }
}

fn send_all(sock: &UnixStream, bytes: &[u8]) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        match send(sock.as_raw_fd(), &bytes[sent..], MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends a process and its uffd, as each restored task does.
pub fn send_process(sock: &UnixStream, pid: i32, uffd: BorrowedFd<'_>) -> io::Result<()> {
    send_all(sock, &pid.to_ne_bytes())?;
    let fds = [uffd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&[0u8])],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Sends a zombie, as CRIU's zombie restore helper does.
pub fn send_zombie(sock: &UnixStream, pid: i32) -> io::Result<()> {
    send_all(sock, &(-pid).to_ne_bytes())
}

/// Sends FIN, as `criu restore` does once every task is restored.
pub fn send_fin(sock: &UnixStream) -> io::Result<()> {
    send_all(sock, &FIN.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn pair() -> (UnixStream, RestoreStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (a, RestoreStream::new(b))
    }

    #[test]
    fn fin_is_the_restorers_word() {
        assert_eq!(FIN.to_le_bytes(), [0x46, 0x54, 0x53, 0x52]);
    }

    #[test]
    fn pid_with_fd_zombie_and_fin() {
        let (criu, mut rx) = pair();
        let file = tempfile::tempfile().unwrap();
        (&file).write_all(b"the passed fd").unwrap();
        send_process(&criu, 4242, file.as_fd()).unwrap();
        send_zombie(&criu, 17).unwrap();
        send_fin(&criu).unwrap();
        drop(criu);
        match rx.next_message().unwrap() {
            Some(Message::Process { pid, uffd }) => {
                assert_eq!(pid, 4242);
                // the same open file: same inode
                let a = nix::sys::stat::fstat(uffd.as_raw_fd()).unwrap();
                let b = nix::sys::stat::fstat(file.as_raw_fd()).unwrap();
                assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
                let flags =
                    nix::fcntl::fcntl(uffd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
                assert_ne!(
                    flags & libc::FD_CLOEXEC,
                    0,
                    "received fds are close-on-exec"
                );
            }
            other => panic!("expected a process, got {other:?}"),
        }
        assert!(matches!(
            rx.next_message().unwrap(),
            Some(Message::Zombie { pid: 17 })
        ));
        assert!(matches!(rx.next_message().unwrap(), Some(Message::Fin)));
        assert!(
            rx.next_message().unwrap().is_none(),
            "EOF after FIN is the end"
        );
    }

    #[test]
    fn eof_before_fin_is_an_error() {
        let (criu, mut rx) = pair();
        send_zombie(&criu, 3).unwrap();
        drop(criu);
        assert!(matches!(
            rx.next_message().unwrap(),
            Some(Message::Zombie { pid: 3 })
        ));
        assert!(matches!(
            rx.next_message(),
            Err(ProtocolError::ClosedBeforeFin)
        ));
    }

    #[test]
    fn eof_inside_a_word_or_before_the_fd() {
        let (mut criu, mut rx) = pair();
        criu.write_all(&[1, 0]).unwrap();
        drop(criu);
        assert!(matches!(rx.next_message(), Err(ProtocolError::Truncated)));

        let (criu, mut rx) = pair();
        send_all(&criu, &55i32.to_ne_bytes()).unwrap();
        drop(criu);
        assert!(matches!(rx.next_message(), Err(ProtocolError::Truncated)));
    }

    #[test]
    fn pid_without_fd_is_refused() {
        let (mut criu, mut rx) = pair();
        criu.write_all(&55i32.to_ne_bytes()).unwrap();
        criu.write_all(&[0]).unwrap();
        assert!(matches!(
            rx.next_message(),
            Err(ProtocolError::MissingFd { pid: 55 })
        ));
    }

    #[test]
    fn words_split_across_writes_are_joined() {
        let (mut criu, mut rx) = pair();
        let fin = FIN.to_ne_bytes();
        criu.write_all(&fin[..1]).unwrap();
        let writer = std::thread::spawn(move || {
            criu.write_all(&fin[1..]).unwrap();
        });
        assert!(matches!(rx.next_message().unwrap(), Some(Message::Fin)));
        writer.join().unwrap();
    }

    #[test]
    fn a_stalled_message_times_out() {
        let (mut criu, mut rx) = pair();
        rx.socket()
            .set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .unwrap();
        criu.write_all(&[1, 0]).unwrap();
        assert!(matches!(rx.next_message(), Err(ProtocolError::Stalled)));
    }
}
