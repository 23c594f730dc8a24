//! The sk_lookup program on the real kernel, in a network namespace of the test's own.

use std::{
    io::{BufRead, BufReader, ErrorKind},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsFd,
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Result};
use torpor_steer::{netns, socket, KernelSteering, Steering};

fn v4(l: &TcpListener) -> Result<SocketAddrV4> {
    match l.local_addr()? {
        SocketAddr::V4(a) => Ok(a),
        a => bail!("not IPv4: {a}"),
    }
}

/// Connects to `to` and says which of the listeners took the connection.
fn who_takes(to: SocketAddrV4, gate: &TcpListener, service: &TcpListener) -> Result<&'static str> {
    match taken_or_reset(to, gate, service)? {
        Some(name) => Ok(name),
        None => bail!("the connection was reset before either listener took it"),
    }
}

/// [`who_takes`], or `None` if the connection was reset first: it reached a listener that
/// was closing.
fn taken_or_reset(
    to: SocketAddrV4,
    gate: &TcpListener,
    service: &TcpListener,
) -> Result<Option<&'static str>> {
    let client = match TcpStream::connect(to) {
        Ok(c) => c,
        // Reset in the handshake: it reached the listener that was closing.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mine = client.local_addr()?;
    // connect returns on the SYN-ACK; the server side joins its listener's queue once the
    // loopback delivers the last ACK, which may be a moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        for (name, l) in [("gate", gate), ("service", service)] {
            match l.accept() {
                Ok((_, peer)) if peer == mine => return Ok(Some(name)),
                Ok((_, peer)) => bail!("{name} took a stranger {peer}"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        if client.take_error()?.is_some() {
            return Ok(None);
        }
        std::thread::yield_now();
    }
    bail!("no listener took the connection")
}

/// A listening process in the test's namespace, killed on drop.
struct Service {
    child: Child,
    addr: SocketAddrV4,
}

impl Service {
    fn start() -> Result<Service> {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", "import socket,sys,time\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen(64)\nprint(s.getsockname()[1],flush=True)\nsys.stdin.read()"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let port: u16 = line.trim().parse()?;
        Ok(Service {
            child,
            addr: SocketAddrV4::new([127, 0, 0, 1].into(), port),
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn in_private_netns(f: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    std::thread::spawn(move || {
        netns::enter_private()?;
        f()
    })
    .join()
    .expect("test thread panicked")
}

#[test]
fn connections_go_to_the_service_only_while_steered() -> Result<()> {
    in_private_netns(|| {
        let gate = TcpListener::bind("127.0.0.1:0")?;
        let other = TcpListener::bind("127.0.0.1:0")?;
        let public = v4(&gate)?;
        let steering = KernelSteering::attach_here(public)?;

        // A service of its own process; its socket taken as the agent takes it: found by
        // address in its tree, through pidfd_getfd. Our copy accepts what it is given.
        let child = Service::start()?;
        let taken = socket::service_listener(Path::new("/proc"), child.pid(), child.addr)?;
        let service = TcpListener::from(taken);
        for l in [&gate, &service, &other] {
            l.set_nonblocking(true)?;
        }
        assert_eq!(
            who_takes(public, &gate, &service)?,
            "gate",
            "nothing in the map yet"
        );
        steering.steer(child.pid(), child.addr)?;
        for _ in 0..3 {
            assert_eq!(who_takes(public, &gate, &service)?, "service");
        }
        assert_eq!(steering.steered()?, 3);
        // Other addresses are left alone.
        let c = TcpStream::connect(other.local_addr()?)?;
        assert_eq!(other.accept()?.1, c.local_addr()?);

        steering.unsteer()?;
        steering.unsteer()?; // idempotent
        assert_eq!(who_takes(public, &gate, &service)?, "gate");
        assert_eq!(steering.steered()?, 3);

        steering.steer(child.pid(), child.addr)?;
        assert_eq!(who_takes(public, &gate, &service)?, "service");
        drop(steering); // detaches the program
        assert_eq!(who_takes(public, &gate, &service)?, "gate");
        Ok(())
    })
}

#[test]
fn a_closed_service_socket_leaves_connections_to_the_gate() -> Result<()> {
    in_private_netns(|| {
        let gate = TcpListener::bind("127.0.0.1:0")?;
        gate.set_nonblocking(true)?;
        let public = v4(&gate)?;
        let steering = KernelSteering::attach_here(public)?;
        {
            let service = TcpListener::bind("127.0.0.1:0")?;
            steering.steer_to(service.as_fd())?;
        } // the service exits: the kernel drops its socket from the map
        let dummy = TcpListener::bind("127.0.0.1:0")?;
        dummy.set_nonblocking(true)?;
        // A test beside this one that forks (to start its service) holds every descriptor of
        // the process until its child execs, the closed one too: a connection steered to it
        // until then is reset. Connect again until the socket is gone.
        assert_eq!(until(|| taken_or_reset(public, &gate, &dummy))?, "gate");
        Ok(())
    })
}

#[test]
fn the_probe_passes_here() {
    torpor_steer::probe().expect("this machine has sk_lookup (see ARCHITECTURE.md)");
}

#[test]
fn no_listener_is_an_error_that_names_the_address() -> Result<()> {
    let pid = std::process::id() as i32;
    let addr: SocketAddrV4 = "127.0.0.1:1".parse()?;
    let e = socket::service_listener(Path::new("/proc"), pid, addr).unwrap_err();
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
    Ok(())
}

/// Waits (up to ten seconds) until `f` gives `Some`.
fn until<T>(mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(t) = f()? {
            return Ok(t);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "condition not met");
        std::thread::yield_now();
    }
}

#[test]
fn open_connections_say_how_long_since_their_last_data_from_sock_diag() -> Result<()> {
    use std::io::{Read, Write};
    use std::time::Duration;
    in_private_netns(|| {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let public = v4(&listener)?;
        let steering = KernelSteering::attach_here(public)?;
        let me = std::process::id() as i32;
        assert_eq!(steering.open_connections(me)?.open, 0, "nothing connected");

        let mut client = TcpStream::connect(public)?;
        let (mut served, _) = listener.accept()?;
        // Held by this process (the server side is on the public address; the client's
        // side is not), by no process of another tree.
        let open = steering.open_connections(me)?;
        assert_eq!(open.open, 1, "{open:?}");
        let stranger = Service::start()?;
        assert_eq!(
            steering.open_connections(stranger.pid())?,
            Default::default()
        );

        // Quiet: the time since its last data grows (the kernel counts in jiffies).
        let quiet = until(|| {
            let q = steering.open_connections(me)?.quietest.expect("open");
            Ok((q >= Duration::from_millis(300)).then_some(q))
        })?;
        // One message each way: recent again.
        client.write_all(b"x")?;
        let mut b = [0u8; 1];
        served.read_exact(&mut b)?;
        let after = steering.open_connections(me)?.quietest.expect("open");
        assert!(
            after < quiet && after < Duration::from_millis(200),
            "{after:?} after {quiet:?}"
        );
        served.write_all(b"y")?;
        client.read_exact(&mut b)?;

        drop((client, served));
        until(|| Ok((steering.open_connections(me)?.open == 0).then_some(())))
    })
}
