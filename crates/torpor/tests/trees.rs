//! Process trees under `torpor up`, end to end with the real binary, real CRIU and real
//! servers from apt, as root: forking servers, a double-forking daemon, servers with threads,
//! a non-root service and a tree whose children switch uid each sleep and wake (or are
//! refused, with a reason); a killed `torpor up` leaves nothing that survives its next start;
//! SIGTERM at any moment stops it cleanly.
//!
//! Every service runs under torpor's init in its own PID namespace and cgroup
//! (`torpor-services/NAMESPACE.NAME` in the unified hierarchy); the tests read that cgroup to know a
//! service's processes exactly.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use torpor_bench::harness::redis_command;

use torpor_testkit::{http_get, own_addr, poll, serial, Config, Service, Up};

/// Enough for the small services here; the RAM tier is pre-faulted at start, so smaller is
/// quicker.
fn pool() -> Config {
    Config::embedded("256MiB")
}

/// Every wait for a state change; generous, as CRIU competes with other builds on 2 cores.
const WAIT: Duration = Duration::from_secs(60);

/// A forking HTTP server: the parent listens, then forks its workers, which all accept on
/// the inherited socket; the parent only waits for them. The counter lives in memory shared
/// by the workers (an anonymous shared mapping made before the fork), so it counts on
/// whichever worker answers. Answers "COUNT WORKER-PID".
const FORKING: &str = r#"
import mmap, os, socket, struct, sys
host, port = sys.argv[1].rsplit(":", 1)
addr, workers = (host, int(port)), int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(addr)
s.listen(64)
shared = mmap.mmap(-1, 8)
def request(c):
    req = b""
    while b"\r\n\r\n" not in req:
        chunk = c.recv(4096)
        if not chunk:
            return False
        req += chunk
    return True
def serve():
    while True:
        c, _ = s.accept()
        with c:
            # Connections that send no request (readiness probes) do not count.
            if not request(c):
                continue
            n = struct.unpack_from("Q", shared, 0)[0] + 1
            struct.pack_into("Q", shared, 0, n)
            body = f"{n} {os.getpid()}".encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
for _ in range(workers):
    if os.fork() == 0:
        serve()
for _ in range(workers):
    os.wait()
"#;

/// A daemon the classic way: the process torpor started forks and exits at once, the child
/// becomes a session leader, forks again and exits; the grandchild (an orphan) serves an
/// in-memory counter. Answers "COUNT".
const DAEMON: &str = r#"
import os, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
addr = (host, int(port))
if os.fork() > 0:
    os._exit(0)
os.setsid()
if os.fork() > 0:
    os._exit(0)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(addr)
s.listen(64)
count = 0
while True:
    c, _ = s.accept()
    with c:
        req = b""
        while b"\r\n\r\n" not in req:
            chunk = c.recv(4096)
            if not chunk:
                break
            req += chunk
        # Connections that send no request (readiness probes) do not count.
        if b"\r\n\r\n" not in req:
            continue
        count += 1
        body = str(count).encode()
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
"#;

/// A root parent whose child drops to nobody (65534) and serves an in-memory counter, as
/// apache prefork's workers do. Answers "COUNT UID".
const SWITCHES_UID: &str = r#"
import os, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
addr = (host, int(port))
if os.fork() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(64)
    count = 0
    while True:
        c, _ = s.accept()
        with c:
            req = b""
            while b"\r\n\r\n" not in req:
                chunk = c.recv(4096)
                if not chunk:
                    break
                req += chunk
            if b"\r\n\r\n" not in req:
                continue
            count += 1
            body = f"{count} {os.getuid()}".encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
os.wait()
"#;

/// Holds MIB MiB of seeded memory and a counter; answers "SHA256-OF-MEMORY COUNT" (the
/// shared check 7-nonroot-service's service).
const HOLDMEM: &str = r#"
import hashlib, random, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
mib, (host, port) = int(sys.argv[1]), sys.argv[2].rsplit(":", 1)
blob = bytearray(random.Random(3).randbytes(mib << 20))
count = 0
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        global count
        count += 1
        body = f"{hashlib.sha256(blob).hexdigest()} {count}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
HTTPServer((host, int(port)), H).serve_forever()
"#;

/// A directory anyone may read, for scripts and pages a non-root process or nginx opens
/// (tempdirs are 0700).
fn open_dir() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// Writes `text` to `dir/name`, readable by anyone; returns its path.
fn script(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    Ok(path)
}

/// One `[[service]]` section: `name` runs `argv`, its gate on `port`, the service on
/// `backend`.
fn service(
    name: &str,
    argv: &[&str],
    port: SocketAddr,
    backend: SocketAddr,
    protocol: &str,
    idle: &str,
) -> Service {
    Service::new(name, argv, port, backend)
        .protocol(protocol)
        .idle(idle)
}

/// [`service`] running the Python script `script` with `args`, over HTTP.
fn python(
    name: &str,
    script: &Path,
    args: &[&str],
    port: SocketAddr,
    backend: SocketAddr,
    idle: &str,
) -> Result<Service> {
    let script = script.to_str().context("path")?;
    let argv = [&["/usr/bin/python3", script], args].concat();
    Ok(service(name, &argv, port, backend, "http", idle))
}

/// The directory that holds every service's cgroup (`torpor-services`), as the agent finds it.
fn services_cgroup_dir() -> Result<PathBuf> {
    Ok(
        torpor_agent::CgroupRoot::discover(Path::new("/proc/self/mountinfo"))
            .context("no cgroup hierarchy mounted")?
            .dir()
            .to_path_buf(),
    )
}

/// Service `name`'s cgroup, named like its snapshots (`NAMESPACE.NAME`, the host's namespace).
fn cgroup_of(name: &str) -> Result<PathBuf> {
    let namespace = torpor_up::config::host_namespace();
    Ok(services_cgroup_dir()?.join(format!("{namespace}.{name}")))
}

/// The processes in service `name`'s cgroup (empty when it has none).
fn cgroup_procs(name: &str) -> Result<Vec<i32>> {
    let text = std::fs::read_to_string(cgroup_of(name)?.join("cgroup.procs")).unwrap_or_default();
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// A process as (PID, start time in ticks since boot): unique, unlike the PID alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ProcId {
    pid: i32,
    start: u64,
}

/// Field `n` (1-based, as in proc(5)) of /proc/PID/stat, after the command name.
fn stat_field(pid: i32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state).
    rest.split_whitespace().nth(n - 3).map(str::to_string)
}

fn proc_id(pid: i32) -> Option<ProcId> {
    Some(ProcId {
        pid,
        start: stat_field(pid, 22)?.parse().ok()?,
    })
}

/// Whether `p` still runs: its PID exists with the same start time and is not a zombie (a
/// zombie holds no memory, socket or CPU; only its parent's wait is missing).
fn still_runs(p: ProcId) -> bool {
    proc_id(p.pid) == Some(p) && stat_field(p.pid, 3).as_deref() != Some("Z")
}

/// The real uid of `pid`.
fn uid_of(pid: i32) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("Uid line")
}

/// Processes whose command line mentions `token` (a test's own temporary directory).
fn processes_mentioning(token: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            (cmd.contains(token) && stat_field(pid, 3).as_deref() != Some("Z"))
                .then_some((pid, cmd))
        })
        .collect()
}

/// Whether this process has CAP_SYS_RESOURCE (bit 24 of the effective set).
fn has_cap_sys_resource() -> Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("CapEff line")?;
    Ok(u64::from_str_radix(eff.trim(), 16)? & (1 << 24) != 0)
}

/// Lets `name` fall asleep and wakes it with a request `rounds` times; `wake` sends the
/// request of a round (1-based) and checks the answer. Every sleep must be a checkpoint and
/// every wake a restore: no cold start, ever. Returns the service's status at the end.
fn sleep_and_wake(
    up: &Up,
    name: &str,
    rounds: u64,
    mut wake: impl FnMut(u64) -> Result<()>,
) -> Result<serde_json::Value> {
    for round in 1..=rounds {
        // A refused checkpoint ends the wait at once: this test is then failed with the
        // agent's reason instead of after the whole timeout.
        let s = up.wait_for(name, &format!("asleep for the {round}. time"), WAIT, |s| {
            (s["state"] == "asleep" && s["sleeps"].as_u64() >= Some(round))
                || s["failed_checkpoints"].as_u64() > Some(0)
                || s["state"] == "failed"
        })?;
        ensure!(
            s["state"] == "asleep",
            "{name} did not sleep ({round}. time): {s}\nlog:\n{}",
            up.log_text()
        );
        wake(round).with_context(|| format!("wake {round} of {name}; log:\n{}", up.log_text()))?;
        let s = up.service(name)?;
        ensure!(
            s["cold_starts"] == 0,
            "wake {round} of {name} was a cold start, not a restore: {s}\nlog:\n{}",
            up.log_text()
        );
    }
    let s = up.service(name)?;
    ensure!(
        s["wakes"].as_u64() >= Some(rounds) && s["cold_starts"] == 0,
        "{name} should have woken {rounds} times by restore: {s}"
    );
    Ok(s)
}

/// Waits (briefly) until `name`'s cgroup holds `want` processes, its init included. A
/// started service is ready once it listens, which a forking server does before it forks
/// its workers; a restored tree is whole at once.
fn expect_procs(name: &str, want: usize, up: &Up) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let procs = cgroup_procs(name)?;
        if procs.len() == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{name} should run as {want} processes (its init included), has {procs:?}; log:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Parses "COUNT ..." from a counting service's answer.
fn count_of(answer: &str) -> Result<u64> {
    answer
        .split_whitespace()
        .next()
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no count in {answer:?}"))
}

/// Sends memcached text-protocol `request` and reads the answer up to (and including) a line
/// in `last` ("END", "STORED", …).
fn memcached(to: SocketAddr, request: &str, last: &[&str]) -> Result<Vec<String>> {
    let mut s = TcpStream::connect(to)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(s);
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        ensure!(
            reader.read_line(&mut line)? > 0,
            "memcached closed after {lines:?}"
        );
        let line = line.trim_end().to_string();
        let done = last.contains(&line.as_str()) || line.contains("ERROR");
        lines.push(line);
        if done {
            return Ok(lines);
        }
    }
}

#[test]
fn nginx_master_and_two_workers_sleep_and_wake_by_restore_three_times() -> Result<()> {
    let _g = serial();
    let dir = open_dir()?;
    let (port, backend) = (own_addr(), own_addr());
    let root = dir.path().join("www");
    std::fs::create_dir(&root)?;
    // A page big enough that a truncated or stale answer shows.
    let page: String = (0..2000)
        .map(|i| format!("line {i} of the page\n"))
        .collect();
    std::fs::write(root.join("index.html"), &page)?;
    let d = dir.path().display();
    let conf = script(
        dir.path(),
        "nginx.conf",
        &format!(
            "daemon off;\nuser root;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 128; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             server {{ listen {backend}; root {d}/www; }}\n}}\n"
        ),
    )?;
    let conf = conf.to_str().context("path")?;
    let name = "trees-nginx";
    let up = Up::launch(pool().services([service(
        name,
        &["nginx", "-c", conf],
        port,
        backend,
        "http",
        "300ms",
    )]))?;
    // Init, master and two workers.
    expect_procs(name, 4, &up)?;
    assert_eq!(http_get(port, "/index.html")?, page);
    sleep_and_wake(&up, name, 3, |_| {
        ensure!(http_get(port, "/index.html")? == page, "wrong page");
        expect_procs(name, 4, &up)
    })?;
    Ok(())
}

#[test]
fn a_forking_python_server_keeps_counting_across_three_restores() -> Result<()> {
    let _g = serial();
    let dir = open_dir()?;
    let (port, backend) = (own_addr(), own_addr());
    let path = script(dir.path(), "forking.py", FORKING)?;
    let name = "trees-forking";
    let up = Up::launch(pool().services([python(
        name,
        &path,
        &[&backend.to_string(), "2"],
        port,
        backend,
        "300ms",
    )?]))?;
    // Init, the listening parent and its two workers.
    expect_procs(name, 4, &up)?;
    let mut expected = 1;
    ensure!(count_of(&http_get(port, "/")?)? == expected);
    let mut workers = BTreeSet::new();
    sleep_and_wake(&up, name, 3, |_| {
        // A few requests per wake, so either worker may answer.
        for _ in 0..4 {
            expected += 1;
            let answer = http_get(port, "/")?;
            ensure!(
                count_of(&answer)? == expected,
                "count should go on at {expected}: {answer:?}"
            );
            workers.insert(answer.split_whitespace().nth(1).unwrap_or("").to_string());
        }
        expect_procs(name, 4, &up)
    })?;
    eprintln!("answered by workers {workers:?}");
    Ok(())
}

#[test]
fn a_double_forking_daemon_keeps_counting_across_three_restores() -> Result<()> {
    let _g = serial();
    let dir = open_dir()?;
    let (port, backend) = (own_addr(), own_addr());
    let path = script(dir.path(), "daemon.py", DAEMON)?;
    let name = "trees-daemon";
    let up = Up::launch(pool().services([python(
        name,
        &path,
        &[&backend.to_string()],
        port,
        backend,
        "300ms",
    )?]))?;
    // The daemon's parents are gone: init and the orphaned daemon are left.
    expect_procs(name, 2, &up)?;
    ensure!(http_get(port, "/")? == "1");
    let mut expected = 1;
    sleep_and_wake(&up, name, 3, |_| {
        expected += 1;
        let answer = http_get(port, "/")?;
        ensure!(
            answer == expected.to_string(),
            "count should go on at {expected}: {answer:?}"
        );
        expect_procs(name, 2, &up)
    })?;
    Ok(())
}

#[test]
fn redis_keeps_a_value_set_before_the_first_sleep_across_three_restores() -> Result<()> {
    let _g = serial();
    let dir = tempfile::tempdir()?;
    let (port, backend) = (own_addr(), own_addr());
    let name = "trees-redis";
    let up = Up::launch(
        pool().services([Service::redis(name, port, backend, dir.path()).idle("300ms")]),
    )?;
    let gate = port;
    assert_eq!(
        redis_command(gate, &["SET", "first", "before-any-sleep"])?,
        "+OK"
    );
    sleep_and_wake(&up, name, 3, |round| {
        ensure!(redis_command(gate, &["GET", "first"])? == "before-any-sleep");
        for r in 1..round {
            ensure!(redis_command(gate, &["GET", &format!("round{r}")])? == format!("v{r}"));
        }
        ensure!(
            redis_command(
                gate,
                &["SET", &format!("round{round}"), &format!("v{round}")]
            )? == "+OK"
        );
        expect_procs(name, 2, &up)
    })?;
    Ok(())
}

#[test]
fn memcached_keeps_a_value_set_before_the_first_sleep_across_three_restores() -> Result<()> {
    let _g = serial();
    let (port, backend) = (own_addr(), own_addr());
    let name = "trees-memcached";
    let (backend_port, backend_ip) = (backend.port().to_string(), backend.ip().to_string());
    let up = Up::launch(pool().services([service(
        name,
        &[
            "memcached",
            "-l",
            &backend_ip,
            "-p",
            &backend_port,
            "-U",
            "0",
            "-t",
            "2",
            "-m",
            "64",
            "-u",
            "root",
        ],
        port,
        backend,
        "tcp",
        "300ms",
    )]))?;
    let gate = port;
    let set = |key: &str, value: &str| -> Result<()> {
        let got = memcached(
            gate,
            &format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()),
            &["STORED"],
        )?;
        ensure!(got == ["STORED"], "set {key}: {got:?}");
        Ok(())
    };
    let get =
        |key: &str| -> Result<Vec<String>> { memcached(gate, &format!("get {key}\r\n"), &["END"]) };
    set("first", "before-any-sleep")?;
    sleep_and_wake(&up, name, 3, |round| {
        let got = get("first")?;
        ensure!(
            got == ["VALUE first 0 16", "before-any-sleep", "END"],
            "first: {got:?}"
        );
        set(&format!("round{round}"), "x")?;
        expect_procs(name, 2, &up)
    })?;
    Ok(())
}

#[test]
fn a_service_running_as_nobody_sleeps_and_wakes_by_restore_with_its_memory() -> Result<()> {
    let _g = serial();
    let dir = open_dir()?;
    let (port, backend) = (own_addr(), own_addr());
    let path = script(dir.path(), "holdmem.py", HOLDMEM)?;
    let name = "trees-nobody";
    let nobody = python(
        name,
        &path,
        &["32", &backend.to_string()],
        port,
        backend,
        "300ms",
    )?;
    let up = Up::launch(pool().services([Service {
        user: Some("nobody".into()),
        // Its directory must be one nobody can enter at restore too.
        cwd: Some(dir.path().to_path_buf()),
        ..nobody
    }]))?;
    let first = http_get(port, "/")?;
    let (sum, count) = first.split_once(' ').context("answer")?;
    ensure!(count == "1", "{first}");
    let sum = sum.to_string();
    for p in cgroup_procs(name)? {
        ensure!(uid_of(p)? == 65534, "process {p} of {name} is not nobody");
    }
    sleep_and_wake(&up, name, 3, |round| {
        let answer = http_get(port, "/")?;
        ensure!(
            answer == format!("{sum} {}", round + 1),
            "memory or counter lost: {answer:?}"
        );
        for p in cgroup_procs(name)? {
            ensure!(uid_of(p)? == 65534, "restored process {p} is not nobody");
        }
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_tree_whose_child_switches_uid_is_refused_with_the_reason_and_keeps_serving() -> Result<()> {
    let _g = serial();
    let dir = open_dir()?;
    let (port, backend) = (own_addr(), own_addr());
    let path = script(dir.path(), "switch.py", SWITCHES_UID)?;
    let name = "trees-switch";
    let up = Up::launch(pool().services([python(
        name,
        &path,
        &[&backend.to_string()],
        port,
        backend,
        "200ms",
    )?]))?;
    ensure!(http_get(port, "/")? == "1 65534");
    let uids: BTreeSet<u32> = cgroup_procs(name)?
        .into_iter()
        .map(uid_of)
        .collect::<Result<_>>()?;
    ensure!(
        uids == BTreeSet::from([0, 65534]),
        "the tree mixes root and nobody: {uids:?}"
    );
    if has_cap_sys_resource()? {
        // Where root has CAP_SYS_RESOURCE CRIU can dump such a tree: it must then work.
        let mut expected = 1;
        sleep_and_wake(&up, name, 2, |_| {
            expected += 1;
            ensure!(http_get(port, "/")? == format!("{expected} 65534"));
            Ok(())
        })?;
        return Ok(());
    }
    let pid = up.wait_state(name, "awake", WAIT)?["pid"].clone();
    let first = up.wait_for(name, "refused a checkpoint", WAIT, |s| {
        s["failed_checkpoints"].as_u64() >= Some(1) && s["state"] == "awake"
    })?;
    let failures = |up: &Up| -> Result<Vec<(f64, String)>> {
        Ok(up.doc()?["transitions"]
            .as_array()
            .context("transitions")?
            .iter()
            .filter(|t| {
                t["service"] == name
                    && t["detail"].as_str().unwrap_or("").contains("checkpoint")
                    && t["to"] == "awake"
            })
            .map(|t| {
                (
                    t["at_s"].as_f64().unwrap_or(0.0),
                    t["detail"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect())
    };
    let seen = failures(&up)?;
    let (_, detail) = seen.first().context("a failed checkpoint transition")?;
    ensure!(
        detail.contains("CAP_SYS_RESOURCE"),
        "the refusal should name CAP_SYS_RESOURCE: {detail:?}\nlog:\n{}",
        up.log_text()
    );
    // Still the same tree, serving, its memory untouched.
    ensure!(
        first["pid"] == pid,
        "the service was not restarted: {first}"
    );
    ensure!(http_get(port, "/")? == "2 65534");
    // Not retried in a tight loop: with a 200 ms idle threshold a loop would try again
    // every few hundred milliseconds. Whether the agent gives up for good or backs off, over
    // 20 idle thresholds no two attempts may come closer than a second. (A window to watch
    // for something that must not happen, not a wait for something.)
    let window = Instant::now() + Duration::from_secs(4);
    while Instant::now() < window {
        ensure!(up.service(name)?["state"] != "failed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = failures(&up)?;
    for pair in seen.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        ensure!(
            gap >= 1.0,
            "checkpoint retried after only {gap:.3} s: {seen:?}"
        );
    }
    eprintln!(
        "{} refused checkpoint(s) in the first {:.1} s",
        seen.len(),
        up.doc()?["uptime_s"].as_f64().unwrap_or(0.0)
    );
    let s = up.service(name)?;
    ensure!(
        s["state"] == "awake" && s["pid"] == pid && s["cold_starts"] == 0 && s["restarts"] == 0,
        "{s}"
    );
    ensure!(http_get(port, "/")? == "3 65534");
    ensure!(
        up.service(name)?["failed_checkpoints"].as_u64() == Some(seen.len() as u64),
        "every refusal is a transition"
    );
    Ok(())
}

#[test]
fn a_killed_torpor_up_never_leaves_a_held_restore_to_resume() -> Result<()> {
    let _g = serial();
    let dir = open_dir()?;
    let forking = script(dir.path(), "forking.py", FORKING)?;
    let (port, backend) = (own_addr(), own_addr());
    let name = "trees-kill-armed";
    let services = python(
        name,
        &forking,
        &[&backend.to_string(), "2"],
        port,
        backend,
        "300ms",
    )?;
    let cfg = pool().status(own_addr()).services([services]);
    let mut up = Up::spawn(&cfg)?;
    up.wait_ready(WAIT)?;
    ensure!(count_of(&http_get(port, "/")?)? == 1);
    // Asleep with its next wake armed: CRIU and the restored tree wait, stopped, in the
    // service's cgroup.
    let s = up.wait_for(name, "asleep and armed", WAIT, |s| {
        (s["state"] == "asleep" && s["armed"] == true) || s["state"] == "failed"
    })?;
    ensure!(s["armed"] == true, "{s}\nlog:\n{}", up.log_text());
    let held = cgroup_procs(name)?;
    ensure!(
        held.len() >= 4,
        "CRIU, its script and the held tree: {held:?}"
    );

    let code = up.signal_and_wait(Signal::SIGKILL, WAIT)?;
    ensure!(!code.success());
    // No next start needed: the hold script reads its FIFO's end of file and kills the tree;
    // CRIU's failed detach ends CRIU.
    ensure!(
        poll(Duration::from_secs(10), Duration::from_millis(1), || {
            cgroup_procs(name).is_ok_and(|p| p.is_empty())
        }),
        "the held restore outlived torpor up: {:?}",
        cgroup_procs(name)?
            .into_iter()
            .map(|p| (
                p,
                std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default(),
                torpor_criu::procs::stat_fields(p)
                    .and_then(|f| f.first().cloned())
                    .unwrap_or_default()
            ))
            .collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn a_killed_torpor_up_leaves_nothing_that_survives_its_next_start() -> Result<()> {
    let _g = serial();
    let dir = open_dir()?;
    let forking = script(dir.path(), "forking.py", FORKING)?;
    let daemon = script(dir.path(), "daemon.py", DAEMON)?;
    let (fport, fbackend, dport, dbackend) = (own_addr(), own_addr(), own_addr(), own_addr());
    let names = ["trees-kill-forking", "trees-kill-daemon"];
    let services = [
        python(
            names[0],
            &forking,
            &[&fbackend.to_string(), "2"],
            fport,
            fbackend,
            "1h",
        )?,
        python(
            names[1],
            &daemon,
            &[&dbackend.to_string()],
            dport,
            dbackend,
            "1h",
        )?,
    ];
    let cfg = pool().status(own_addr()).services(services);
    let mut first = Up::spawn(&cfg)?;
    first.wait_ready(WAIT)?;
    ensure!(count_of(&http_get(fport, "/")?)? == 1);
    ensure!(http_get(dport, "/")? == "1");
    let mut old = Vec::new();
    let mut old_cgroups = Vec::new();
    for name in names {
        for p in cgroup_procs(name)? {
            old.push(proc_id(p).context("a service process")?);
        }
        old_cgroups.push(std::fs::metadata(cgroup_of(name)?)?.ino());
    }
    ensure!(old.len() == 6, "4 + 2 processes: {old:?}");

    // SIGKILL: no chance to clean up. Its services live on, orphaned, holding their ports.
    let code = first.signal_and_wait(Signal::SIGKILL, WAIT)?;
    ensure!(!code.success());
    let orphans = old.iter().filter(|p| still_runs(**p)).count();
    eprintln!(
        "{orphans} of {} service processes outlived torpor up",
        old.len()
    );

    let mut second = Up::spawn(&cfg)?;
    second.wait_ready(WAIT)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<ProcId> = old.iter().copied().filter(|p| still_runs(*p)).collect();
        if left.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "processes of the killed run still run: {left:?}; log:\n{}",
            second.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for (name, ino) in names.iter().zip(&old_cgroups) {
        let now = std::fs::metadata(cgroup_of(name)?)?.ino();
        ensure!(
            now != *ino,
            "the cgroup of {name} is the killed run's, not a new one"
        );
        let procs = cgroup_procs(name)?;
        ensure!(
            procs.iter().all(|p| !old.iter().any(|o| o.pid == *p)),
            "{name}: {procs:?} vs old {old:?}"
        );
    }
    if orphans > 0 {
        ensure!(
            second
                .log_text()
                .contains("stopping processes left by an earlier run"),
            "{}",
            second.log_text()
        );
    }
    // Fresh services, answering (their counters start again).
    ensure!(count_of(&http_get(fport, "/")?)? == 1);
    ensure!(http_get(dport, "/")? == "1");
    for name in names {
        let s = second.service(name)?;
        ensure!(s["state"] == "awake" && s["cold_starts"] == 0, "{s}");
    }
    ensure!(second.stop()?.success(), "{}", second.log_text());
    for name in names {
        ensure!(
            !cgroup_of(name)?.exists(),
            "cgroup of {name} removed at stop"
        );
    }
    let token = dir.path().to_str().context("path")?;
    ensure!(
        processes_mentioning(token).is_empty(),
        "{:?}",
        processes_mentioning(token)
    );
    Ok(())
}

/// A config of a forking server and a daemon, both from scripts in `dir`, named `prefix-…`.
fn two_trees(
    dir: &Path,
    prefix: &str,
    idle: &str,
) -> Result<([Service; 2], [String; 2], [SocketAddr; 2])> {
    let forking = script(dir, "forking.py", FORKING)?;
    let daemon = script(dir, "daemon.py", DAEMON)?;
    let (fport, fbackend, dport, dbackend) = (own_addr(), own_addr(), own_addr(), own_addr());
    let names = [format!("{prefix}-forking"), format!("{prefix}-daemon")];
    let services = [
        python(
            &names[0],
            &forking,
            &[&fbackend.to_string(), "2"],
            fport,
            fbackend,
            idle,
        )?,
        python(
            &names[1],
            &daemon,
            &[&dbackend.to_string()],
            dport,
            dbackend,
            idle,
        )?,
    ];
    Ok((services, names, [fport, dport]))
}

/// After `torpor up` exited: no process started from `dir`, no cgroup of `names`.
fn nothing_left(dir: &Path, names: &[String], log: &str) -> Result<()> {
    let token = dir.to_str().context("path")?;
    // A namespace init dies, and its processes with it, as the kernel tears it down: allow
    // that a moment, but no more.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_mentioning(token).is_empty() {
        ensure!(
            Instant::now() < deadline,
            "left running: {:?}\nlog:\n{log}",
            processes_mentioning(token)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for name in names {
        ensure!(
            !cgroup_of(name)?.exists(),
            "cgroup of {name} left behind\nlog:\n{log}"
        );
    }
    Ok(())
}

/// Whether process `pid` blocks or catches SIGTERM (its `SigBlk` or `SigCgt` mask).
fn sigterm_taken(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let bit = 1u64 << (Signal::SIGTERM as i32 - 1);
    status.lines().any(|l| {
        l.strip_prefix("SigBlk:")
            .or_else(|| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & bit != 0)
    })
}

#[test]
fn sigterm_10ms_after_start_and_at_other_early_moments_exits_0_leaving_nothing() -> Result<()> {
    let _g = serial();
    // The delay is what is tested (the moment the signal lands: handler set-up, pool,
    // agent start, ready), not a wait for something. It counts from the program's first
    // act, blocking SIGTERM: one that lands earlier (while the loader maps the binary, which
    // can take over 10 ms on a loaded machine) meets no code of ours and only the kernel's
    // default action, with nothing started yet.
    for delay_ms in [10, 30, 100, 300] {
        let dir = open_dir()?;
        let (services, names, _) = two_trees(dir.path(), "trees-term", "1h")?;
        let mut up = Up::spawn(&pool().status(own_addr()).services(services))?;
        let pid = up.pid()?;
        ensure!(
            poll(Duration::from_secs(10), Duration::from_millis(1), || {
                sigterm_taken(pid)
            }),
            "torpor up never blocked or caught SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(delay_ms));
        let t0 = Instant::now();
        let code = up.signal_and_wait(Signal::SIGTERM, WAIT)?;
        let log = up.log_text();
        ensure!(
            code.code() == Some(0),
            "SIGTERM {delay_ms} ms after start: {code}\nlog:\n{log}"
        );
        nothing_left(dir.path(), &names, &log)?;
        let phase = if log.contains("before any service started") {
            "before the agent started"
        } else if log.contains("while the services start") {
            "during the agent's start"
        } else if log.contains("ready") {
            "once ready"
        } else {
            "before the configuration was read"
        };
        eprintln!(
            "SIGTERM {delay_ms} ms after start ({phase}): exit 0 after {:.3} s",
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[test]
fn sigterm_while_a_service_is_still_starting_stops_it_at_once_and_exits_0() -> Result<()> {
    let _g = serial();
    let dir = open_dir()?;
    let slow = script(
        dir.path(),
        "slow.py",
        "import time, socket, sys\ntime.sleep(3600)\n",
    )?;
    let name = "trees-slow".to_string();
    let services = service(
        &name,
        &["/usr/bin/python3", slow.to_str().context("path")?],
        own_addr(),
        own_addr(),
        "http",
        "1h",
    );
    let services = Service {
        start_timeout: Some("600s".into()),
        ..services
    };
    let mut up = Up::spawn(&pool().status(own_addr()).services([services]))?;
    // Once its processes are in its cgroup the agent is inside its start, waiting for the
    // service to accept connections (which it never does).
    let deadline = Instant::now() + WAIT;
    while cgroup_procs(&name)?.len() < 2 {
        ensure!(
            Instant::now() < deadline,
            "service never launched:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = Instant::now();
    let code = up.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30))?;
    let took = t0.elapsed();
    let log = up.log_text();
    ensure!(code.code() == Some(0), "{code}\nlog:\n{log}");
    ensure!(
        took < Duration::from_secs(10),
        "stopping took {took:?}: start-up was waited for, not cancelled\nlog:\n{log}"
    );
    nothing_left(dir.path(), &[name], &log)?;
    eprintln!("stopped mid-start in {:.3} s", took.as_secs_f64());
    Ok(())
}

#[test]
fn sigterm_mid_checkpoint_and_mid_restore_exits_0_leaving_nothing() -> Result<()> {
    let _g = serial();
    let iptables_before = Command::new("iptables").arg("-S").output()?.stdout;
    for moment in ["checkpointing", "waking"] {
        let dir = open_dir()?;
        let path = script(dir.path(), "holdmem.py", HOLDMEM)?;
        let (port, backend) = (own_addr(), own_addr());
        let name = format!("trees-term-{moment}");
        // Enough memory that the checkpoint and the restore take a while.
        let services = python(
            &name,
            &path,
            &["160", &backend.to_string()],
            port,
            backend,
            "200ms",
        )?;
        let mut up = Up::spawn(&pool().status(own_addr()).services([services]))?;
        up.wait_ready(WAIT)?;
        if moment == "waking" {
            up.wait_state(&name, "asleep", WAIT)?;
            // A held request starts the wake; it gets an error or an answer, either is fine.
            std::thread::spawn(move || http_get(port, "/"));
        }
        up.wait_state(&name, moment, WAIT)?;
        let code = up.signal_and_wait(Signal::SIGTERM, WAIT)?;
        let log = up.log_text();
        ensure!(
            code.code() == Some(0),
            "SIGTERM while {moment}: {code}\nlog:\n{log}"
        );
        nothing_left(dir.path(), &[name], &log)?;
    }
    let iptables_after = Command::new("iptables").arg("-S").output()?.stdout;
    ensure!(
        iptables_before == iptables_after,
        "iptables rules left behind:\n{}",
        String::from_utf8_lossy(&iptables_after)
    );
    Ok(())
}

#[test]
fn the_status_api_answers_only_once_every_service_has_started() -> Result<()> {
    let _g = serial();
    let dir = open_dir()?;
    // Listens only after a while, so start-up is slow enough to ask in the middle of it.
    let late = script(
        dir.path(),
        "late.py",
        &format!("import time\ntime.sleep(1.5)\n{}", HOLDMEM),
    )?;
    let (port, backend) = (own_addr(), own_addr());
    let name = "trees-late".to_string();
    let services = python(
        &name,
        &late,
        &["1", &backend.to_string()],
        port,
        backend,
        "1h",
    )?;
    let mut up = Up::spawn(&pool().status(own_addr()).services([services]))?;
    let deadline = Instant::now() + WAIT;
    while cgroup_procs(&name)?.len() < 2 {
        ensure!(
            Instant::now() < deadline,
            "never launched:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Asked while the service starts: the answer comes once it has, and says so.
    let asked = Instant::now();
    // Seen once in a fresh clone: the connection reset instead of answered; the log says why.
    let s = up
        .service(&name)
        .with_context(|| format!("asking /status during start-up:\n{}", up.log_text()))?;
    ensure!(
        s["state"] == "awake" && s["pid"].as_i64().is_some(),
        "status answered before the service was up: {s}"
    );
    ensure!(
        asked.elapsed() > Duration::from_millis(100),
        "answered at once, before the service listened"
    );
    let text = up.status_text()?;
    ensure!(text.contains(&name) && text.contains("awake"), "{text}");
    ensure!(up.log_text().contains("ready"), "{}", up.log_text());
    let answer = http_get(port, "/")?;
    ensure!(answer.ends_with(" 1"), "{answer:?}");
    ensure!(up.stop()?.success());
    nothing_left(dir.path(), &[name], "")
}
