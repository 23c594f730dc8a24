//! Finding a service's listening socket and taking a descriptor of it from outside the
//! service (`pidfd_getfd`): the socket the kernel steers to is the service's own, so the
//! service needs no change. `/proc` is a parameter, so the search runs on a fake tree in
//! tests.

use std::{
    collections::BTreeSet,
    fs, io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
};

use crate::SteerError;

/// TCP state LISTEN in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";

/// Inodes of the TCP sockets in state `state` whose local address `matches`, in the network
/// namespace of process `pid`, from `PROC/PID/net/tcp`.
fn inodes(
    proc: &Path,
    pid: i32,
    state: &str,
    matches: impl Fn(Ipv4Addr, u16) -> bool,
) -> io::Result<BTreeSet<u64>> {
    let table = fs::read_to_string(proc.join(pid.to_string()).join("net/tcp"))?;
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, st, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            let (ip, port) = local.split_once(':')?;
            let ip = Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
            let port = u16::from_str_radix(port, 16).ok()?;
            (*st == state && matches(ip, port))
                .then(|| inode.parse().ok())
                .flatten()
        })
        .collect())
}

/// Inodes of the TCP sockets listening on `addr` (or on 0.0.0.0 and `addr`'s port) in the
/// network namespace of process `pid`, from `PROC/PID/net/tcp`.
pub fn listening_inodes(proc: &Path, pid: i32, addr: SocketAddrV4) -> io::Result<BTreeSet<u64>> {
    inodes(proc, pid, TCP_LISTEN, |ip, port| {
        port == addr.port() && (ip == *addr.ip() || ip.is_unspecified())
    })
}

/// `pid` and every process descended from it, from the parent fields of `PROC/*/stat`.
pub fn process_tree(proc: &Path, pid: i32) -> io::Result<Vec<i32>> {
    let mut parents = Vec::new();
    for entry in fs::read_dir(proc)? {
        let Ok(p) = entry?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(proc.join(p.to_string()).join("stat")) else {
            continue; // gone meanwhile
        };
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
        {
            parents.push((p, ppid));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    Ok(tree)
}

/// The first (process, descriptor) in `pid`'s tree that holds one of `inodes`.
pub fn find_descriptor(
    proc: &Path,
    pid: i32,
    inodes: &BTreeSet<u64>,
) -> io::Result<Option<(i32, i32)>> {
    for p in process_tree(proc, pid)? {
        let Ok(fds) = fs::read_dir(proc.join(p.to_string()).join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let inode = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if inode.is_some_and(|i| inodes.contains(&i)) {
                if let Ok(n) = fd.file_name().to_string_lossy().parse() {
                    return Ok(Some((p, n)));
                }
            }
        }
    }
    Ok(None)
}

/// Which of `inodes` the processes of `pid`'s tree hold.
pub fn held(proc: &Path, pid: i32, inodes: &BTreeSet<u64>) -> io::Result<BTreeSet<u64>> {
    let mut held = BTreeSet::new();
    if inodes.is_empty() {
        return Ok(held);
    }
    for p in process_tree(proc, pid)? {
        let Ok(fds) = fs::read_dir(proc.join(p.to_string()).join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let inode = fs::read_link(fd.path()).ok().and_then(|t| {
                let t = t.to_string_lossy();
                t.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            });
            if let Some(i) = inode.filter(|i| inodes.contains(i)) {
                held.insert(i);
            }
        }
    }
    Ok(held)
}

/// A descriptor of our own for descriptor `fd` of process `pid` (`pidfd_getfd`, which needs
/// ptrace access to it: the agent started it).
pub fn take_descriptor(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain system calls on integers; each result is checked before use.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned `pidfd` and nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd;
    // SAFETY: as above; pidfd_getfd returns a new close-on-exec descriptor.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor only we hold.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

/// The listening socket for `addr` of the process tree under `pid` (the service as the
/// agent started it), as a descriptor of ours.
pub fn service_listener(proc: &Path, pid: i32, addr: SocketAddrV4) -> Result<OwnedFd, SteerError> {
    let io = |what: &'static str| move |source| SteerError::Io { what, source };
    let inodes = listening_inodes(proc, pid, addr).map_err(io("reading the TCP table"))?;
    let (p, fd) = find_descriptor(proc, pid, &inodes)
        .map_err(io("reading descriptors"))?
        .ok_or(SteerError::NoListener { pid, addr })?;
    take_descriptor(p, fd).map_err(io("pidfd_getfd"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 100 0 0 10 0
   2: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 100 0 0 10 0
";

    fn proc_tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (pid, ppid, fds) in [
            (10, 1, vec![]),
            (11, 10, vec![(3, 999), (7, 111)]),
            (12, 1, vec![(4, 333)]),
        ] {
            let p = d.path().join(pid.to_string());
            fs::create_dir_all(p.join("fd")).unwrap();
            fs::create_dir_all(p.join("net")).unwrap();
            fs::write(p.join("net/tcp"), TCP).unwrap();
            fs::write(p.join("stat"), format!("{pid} (a (b) c) S {ppid} 0 0")).unwrap();
            for (fd, inode) in fds {
                symlink(
                    format!("socket:[{inode}]"),
                    p.join("fd").join(fd.to_string()),
                )
                .unwrap();
            }
        }
        d
    }

    #[test]
    fn listeners_match_their_address_or_any() {
        let d = proc_tree();
        let at = |s: &str| listening_inodes(d.path(), 10, s.parse().unwrap()).unwrap();
        assert_eq!(at("127.0.0.1:8080"), BTreeSet::from([111])); // the established one is not
        assert_eq!(at("127.0.0.1:8081"), BTreeSet::from([333])); // bound to 0.0.0.0
        assert!(at("127.0.0.2:8080").is_empty());
    }

    #[test]
    fn sockets_are_held_once_by_the_tree_that_holds_them() {
        let d = proc_tree();
        let asked = BTreeSet::from([222, 333]);
        assert!(held(d.path(), 10, &asked).unwrap().is_empty());
        symlink("socket:[222]", d.path().join("11/fd/9")).unwrap();
        symlink("socket:[222]", d.path().join("10/fd/5")).unwrap();
        assert_eq!(held(d.path(), 10, &asked).unwrap(), BTreeSet::from([222]));
        assert_eq!(held(d.path(), 12, &asked).unwrap(), BTreeSet::from([333]));
    }

    #[test]
    fn the_socket_is_found_in_a_child_and_not_outside_the_tree() {
        let d = proc_tree();
        assert_eq!(process_tree(d.path(), 10).unwrap(), vec![10, 11]);
        let found = find_descriptor(d.path(), 10, &BTreeSet::from([111])).unwrap();
        assert_eq!(found, Some((11, 7)));
        assert_eq!(
            find_descriptor(d.path(), 10, &BTreeSet::from([333])).unwrap(),
            None
        );
    }
}
