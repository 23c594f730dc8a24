//! systemd's readiness protocol (`sd_notify`), written by hand: one datagram of
//! newline-separated `KEY=VALUE` assignments to the socket named by `NOTIFY_SOCKET`, an
//! absolute path or (`@name`) an abstract socket. Without `NOTIFY_SOCKET` (not started by
//! systemd with `Type=notify`) every call is a no-op, so `torpor up` runs the same anywhere.

use std::{
    ffi::OsStr,
    io,
    os::unix::{ffi::OsStrExt, net::UnixDatagram},
    path::PathBuf,
};

use thiserror::Error;

/// The environment variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why a notification could not be sent.
#[derive(Debug, Error)]
pub enum NotifyError {
    /// systemd also knows `vsock:` addresses (for VMs); torpor up runs on the host.
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an abstract socket (@name)")]
    Address(String),
    #[error("cannot send to the notify socket {socket}")]
    Send {
        socket: String,
        #[source]
        source: io::Error,
    },
}

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    /// The name without its leading `@` (the kernel's leading NUL).
    Abstract(Vec<u8>),
}

/// A handle on systemd's notify socket, or on nothing when not run by systemd.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Option<Target>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`: a no-op notifier when it is unset or empty; an error when it
    /// names something this module cannot send to.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        match std::env::var_os(NOTIFY_SOCKET) {
            Some(v) => Notifier::for_socket(&v),
            None => Ok(Notifier::none()),
        }
    }

    /// A notifier that sends nothing (also what an empty `NOTIFY_SOCKET` means).
    pub fn none() -> Notifier {
        Notifier { target: None }
    }

    /// For a `NOTIFY_SOCKET` value: `/absolute/path` or `@abstract-name`.
    pub fn for_socket(value: &OsStr) -> Result<Notifier, NotifyError> {
        let bytes = value.as_bytes();
        let target = match bytes.first() {
            None => None,
            Some(b'/') => Some(Target::Path(PathBuf::from(value))),
            Some(b'@') if bytes.len() > 1 => Some(Target::Abstract(bytes[1..].to_vec())),
            Some(_) => {
                return Err(NotifyError::Address(value.to_string_lossy().into_owned()));
            }
        };
        Ok(Notifier { target })
    }

    /// Whether notifications go anywhere.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (newline-separated assignments such as `READY=1`) in one datagram.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let fail = |source| NotifyError::Send {
            socket: self.describe(),
            source,
        };
        let socket = UnixDatagram::unbound().map_err(fail)?;
        match target {
            Target::Path(p) => socket.send_to(state.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr =
                    std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(fail)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
        }
        .map_err(fail)?;
        Ok(())
    }

    /// `READY=1` with a status line: every gate listens and the status API answers.
    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// `STOPPING=1` with a status line: the stop has begun.
    pub fn stopping(&self, status: &str) -> Result<(), NotifyError> {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
    }

    /// `RELOADING=1` with the monotonic time it began (systemd's `Type=notify-reload`
    /// wants `MONOTONIC_USEC=` with it) and a status line: a reload has begun; `READY=1`
    /// ends it.
    pub fn reloading(&self, status: &str) -> Result<(), NotifyError> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
            t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
        });
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS={}",
            one_line(status)
        ))
    }

    /// A `STATUS=` line alone (what `systemctl status` shows).
    pub fn status(&self, status: &str) -> Result<(), NotifyError> {
        self.notify(&format!("STATUS={}", one_line(status)))
    }

    fn describe(&self) -> String {
        match &self.target {
            Some(Target::Path(p)) => p.display().to_string(),
            Some(Target::Abstract(n)) => format!("@{}", String::from_utf8_lossy(n)),
            None => "(none)".into(),
        }
    }
}

/// A newline would end the assignment and start a bogus one.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use std::{os::linux::net::SocketAddrExt, time::Duration};

    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn a_path_socket_gets_ready_and_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::for_socket(path.as_os_str()).unwrap();
        assert!(n.enabled());
        n.ready("2 services\nup").unwrap();
        assert_eq!(receive(&socket), "READY=1\nSTATUS=2 services up");
        n.stopping("stopping").unwrap();
        assert_eq!(receive(&socket), "STOPPING=1\nSTATUS=stopping");
        n.status("checkpointing").unwrap();
        assert_eq!(receive(&socket), "STATUS=checkpointing");
        n.reloading("reloading").unwrap();
        let got = receive(&socket);
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!((lines[0], lines[2]), ("RELOADING=1", "STATUS=reloading"));
        let usec: u64 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .expect("the monotonic time")
            .parse()
            .unwrap();
        assert!(usec > 0, "{got}");
    }

    #[test]
    fn an_abstract_socket_gets_the_datagram() {
        let name = format!("torpor-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::for_socket(OsStr::new(&format!("@{name}"))).unwrap();
        n.ready("ready").unwrap();
        assert_eq!(receive(&socket), "READY=1\nSTATUS=ready");
    }

    #[test]
    fn unset_or_empty_is_a_no_op() {
        let n = Notifier::none();
        assert!(!n.enabled());
        n.ready("nobody listens").unwrap();
        let n = Notifier::for_socket(OsStr::new("")).unwrap();
        assert!(!n.enabled());
        n.stopping("nobody listens").unwrap();
    }

    #[test]
    fn unusable_addresses_are_refused() {
        for bad in ["relative/notify.sock", "vsock:2:1234", "@"] {
            let e = Notifier::for_socket(OsStr::new(bad)).unwrap_err();
            assert!(matches!(e, NotifyError::Address(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn a_socket_nobody_binds_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let n = Notifier::for_socket(path.as_os_str()).unwrap();
        let e = n.ready("ready").unwrap_err();
        assert!(matches!(e, NotifyError::Send { .. }), "{e}");
        assert!(e.to_string().contains("absent.sock"), "{e}");
    }
}
