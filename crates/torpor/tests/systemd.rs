//! `torpor up` as systemd runs it: `Type=notify` readiness through a notify socket this test
//! binds (READY=1 only once both gates and the status API answer, STOPPING=1 at SIGTERM, exit
//! 0), and, where systemd runs, the repository's unit starting the real binary.

use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::{sys::signal::Signal, unistd::Pid};

use torpor_testkit::{config::Control, exe, http_get, own_addr, serial, Config, Service, Up};

/// The repository's unit file.
const UNIT: &str = include_str!("../../../packaging/systemd/torpor.service");

/// A config with two sample services behind gates on addresses of this process's own, never put
/// to sleep by their policy during the test; its status API on `status`, its control socket in `dir`.
/// Returns it and the gates' addresses.
fn two_services(dir: &Path, status: std::net::SocketAddr) -> (Config, [std::net::SocketAddr; 2]) {
    let gates = [own_addr(), own_addr()];
    let services = ["alpha", "beta"]
        .iter()
        .zip(gates)
        .map(|(name, gate)| Service::sample(name, gate, own_addr(), "8MiB").idle("1h"));
    let cfg = Config {
        control: Some(Control {
            socket: Some(dir.join("control.sock")),
            ..Control::default()
        }),
        ..Config::embedded("64MiB").status(status).services(services)
    };
    (cfg, gates)
}

/// The next datagram on `socket` within `timeout`, or an error naming what was awaited;
/// fails early when `up` exits meanwhile.
fn next_message(
    socket: &UnixDatagram,
    up: &mut Up,
    what: &str,
    timeout: Duration,
) -> Result<String> {
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8(buf[..n].to_vec())?),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
        let exited = up.try_wait()?;
        if exited.is_some() || Instant::now() > deadline {
            bail!(
                "no {what} notification (torpor up exited: {exited:?}); log:\n{}",
                up.log_text()
            );
        }
    }
}

#[test]
fn ready_comes_once_both_gates_listen_and_stopping_at_sigterm() -> Result<()> {
    let _g = serial();
    let dir = tempfile::tempdir()?;
    let status = own_addr();
    let (cfg, gates) = two_services(dir.path(), status);
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    let mut up = Up::spawn_with(&cfg, |cmd| {
        // As the unit's comment suggests for log shippers.
        cmd.args(["--log-format", "json"])
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "info");
    })?;

    // Whatever comes before READY=1 is progress only.
    let ready = loop {
        let m = next_message(&notify, &mut up, "READY=1", Duration::from_secs(120))?;
        if m.lines().any(|l| l == "READY=1") {
            break m;
        }
        assert!(
            m.lines().all(|l| l.starts_with("STATUS=")),
            "before READY=1: {m:?}"
        );
    };
    // Right after READY=1, with no retry: both gates accept and serve, and so does the
    // status API.
    for gate in gates {
        assert_eq!(
            http_get(gate, "/ping").with_context(|| format!("gate {gate}"))?,
            "PONG"
        );
    }
    let doc: serde_json::Value = serde_json::from_str(&http_get(status, "/status")?)?;
    assert_eq!(doc["services"].as_array().map(Vec::len), Some(2), "{doc}");
    assert!(ready.contains("STATUS=2 service(s)"), "{ready:?}");

    let pid = Pid::from_raw(up.pid()?);
    nix::sys::signal::kill(pid, Signal::SIGTERM)?;
    let stopping = next_message(&notify, &mut up, "STOPPING=1", Duration::from_secs(60))?;
    assert!(
        stopping.lines().next() == Some("STOPPING=1"),
        "{stopping:?}"
    );
    let exit = up.wait_exit(Duration::from_secs(60))?;
    assert!(exit.success(), "exit {exit:?}; log:\n{}", up.log_text());
    // Nothing after STOPPING=1 claims readiness again.
    notify.set_nonblocking(true)?;
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        let m = String::from_utf8_lossy(&buf[..n]);
        assert!(!m.contains("READY=1"), "after STOPPING=1: {m:?}");
    }
    // --log-format json: every line torpor up wrote is one JSON object, its own progress
    // lines included.
    let log = up.log_text();
    let messages: Vec<String> = log
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    for said in ["ready", "stopped", "stopping"] {
        assert!(messages.iter().any(|m| m == said), "no {said:?} in:\n{log}");
    }
    Ok(())
}

/// Why systemd cannot run a unit here, or `None` when it can.
fn systemd_absent() -> Option<String> {
    if !Path::new("/run/systemd/system").is_dir() {
        let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
        return Some(format!(
            "/run/systemd/system is absent: systemd is not the init here (PID 1 is {:?})",
            pid1.trim()
        ));
    }
    match Command::new("systemctl").arg("is-system-running").output() {
        Ok(out) => {
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match state.as_str() {
                "running" | "degraded" => None,
                _ => Some(format!("systemctl is-system-running says {state:?}")),
            }
        }
        Err(e) => Some(format!("systemctl cannot run: {e}")),
    }
}

/// A unit installed under /run/systemd/system (gone at reboot), stopped and removed when
/// dropped.
struct TransientUnit {
    name: String,
    path: std::path::PathBuf,
}

impl Drop for TransientUnit {
    fn drop(&mut self) {
        let _ = Command::new("systemctl")
            .args(["stop", &self.name])
            .status();
        let _ = std::fs::remove_file(&self.path);
        let _ = Command::new("systemctl").arg("daemon-reload").status();
    }
}

fn systemctl(args: &[&str]) -> Result<String> {
    let out = Command::new("systemctl").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "systemctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn the_unit_starts_torpor_up_under_systemd() -> Result<()> {
    if let Some(why) = systemd_absent() {
        eprintln!("skipped: the unit cannot be started under systemd on this host: {why}; readiness is tested through a notify socket by ready_comes_once_both_gates_listen_and_stopping_at_sigterm");
        return Ok(());
    }
    let _g = serial();
    let dir = tempfile::tempdir()?;
    let status = own_addr();
    let (cfg, gates) = two_services(dir.path(), status);
    let cfg_path = cfg.write_in(dir.path())?;
    // The repository's unit as it is, but for the binary and config under test, and without
    // the state and runtime directories of a real install.
    let mut replaced = false;
    let text: String = UNIT
        .lines()
        .filter(|l| !l.starts_with("StateDirectory") && !l.starts_with("RuntimeDirectory"))
        .map(|l| {
            if l.starts_with("ExecStart=") {
                replaced = true;
                format!(
                    "ExecStart={} up -c {}\n",
                    exe().display(),
                    cfg_path.display()
                )
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(replaced, "the unit has an ExecStart= line");
    let name = format!("torpor-test-{}.service", std::process::id());
    let unit = TransientUnit {
        path: Path::new("/run/systemd/system").join(&name),
        name: name.clone(),
    };
    std::fs::write(&unit.path, text)?;
    systemctl(&["daemon-reload"])?;
    // Type=notify: `systemctl start` returns once READY=1 came.
    systemctl(&["start", &name])?;
    for gate in gates {
        assert_eq!(http_get(gate, "/ping")?, "PONG");
    }
    let shown = systemctl(&["show", &name, "-p", "ActiveState", "-p", "StatusText"])?;
    assert!(shown.contains("ActiveState=active"), "{shown}");
    assert!(shown.contains("StatusText=2 service(s)"), "{shown}");
    systemctl(&["stop", &name])?;
    let shown = systemctl(&["show", &name, "-p", "Result", "-p", "ExecMainStatus"])?;
    assert!(shown.contains("Result=success"), "{shown}");
    assert!(shown.contains("ExecMainStatus=0"), "{shown}");
    drop(unit);
    Ok(())
}
