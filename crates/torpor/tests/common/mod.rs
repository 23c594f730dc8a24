//! Shared by the end-to-end tests: the real binary (`torpor up` started from a config file,
//! its status API, plain HTTP through a gate) and the set-up of tests that run CRIU
//! themselves.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use torpor_testkit::{config::Control, own_addr, Config, Service};

/// An embedded pool large enough for every test service here.
pub fn embedded() -> Config {
    Config::embedded("768MiB")
}

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_torpor")
}

/// The binary, as a path (for the bench harness's process starters).
pub fn exe_path() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_torpor"))
}

pub fn criu() -> torpor_criu::CriuBinary {
    torpor_criu::CriuBinary::locate().expect("CRIU is installed by the README's test command")
}

/// A running `torpor up`, stopped with SIGTERM when dropped.
pub struct Up {
    pub child: Option<Child>,
    pub status: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    /// Its control socket: its own, in `dir`, unless the config names one (tests run
    /// several `torpor up` at once; the default path is for users).
    pub control: PathBuf,
    /// The file it runs on when started from a [`Config`] ([`Up::config`]).
    config: Option<Config>,
}

impl Up {
    /// Starts `torpor up` on `cfg` with its status API on an address of this process's own
    /// (whatever `cfg` says) and waits until it is ready.
    pub fn launch(cfg: Config) -> Result<Up> {
        let mut up = Up::spawn(&cfg.status(own_addr()))?;
        up.wait_ready(Duration::from_secs(60))?;
        Ok(up)
    }

    /// Starts `torpor up` on `cfg`, which names its status API, and returns at once. Without
    /// a `[control]` section it gets a control socket of its own.
    pub fn spawn(cfg: &Config) -> Result<Up> {
        let status = cfg.status.as_ref().context("a status address")?.listen;
        let dir = tempfile::tempdir()?;
        let control = dir.path().join("control.sock");
        let mut cfg = cfg.clone();
        cfg.control.get_or_insert_with(|| Control {
            socket: Some(control.clone()),
            ..Control::default()
        });
        let path = cfg.write_in(dir.path())?;
        Up::run(dir, &path, status, control, Some(cfg))
    }

    /// The config it runs on, as written (status and control sections included), for tests
    /// that change it and reload.
    pub fn config(&self) -> Result<Config> {
        self.config
            .clone()
            .context("started from text, not from a Config")
    }

    /// Runs `torpor up -c path`, logging into `dir`.
    fn run(
        dir: tempfile::TempDir,
        path: &std::path::Path,
        status: SocketAddr,
        control: PathBuf,
        config: Option<Config>,
    ) -> Result<Up> {
        let log = dir.path().join("up.log");
        let child = Command::new(exe())
            .args(["up", "-c"])
            .arg(path)
            .env(
                "RUST_LOG",
                std::env::var("TORPOR_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Up {
            child: Some(child),
            status,
            dir,
            log,
            control,
            config,
        })
    }

    /// Writes `cfg` over the file it runs on (for `torpor reload`).
    pub fn rewrite(&self, cfg: &Config) -> Result<()> {
        cfg.write_in(self.dir.path())?;
        Ok(())
    }

    /// PID of the `torpor up` process.
    pub fn pid(&self) -> Result<i32> {
        Ok(self.child.as_ref().context("running")?.id() as i32)
    }

    /// Waits until the status API answers, which it does only once every gate listens and
    /// every service has started (a connection made earlier waits for that).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.services().is_err() {
            if Instant::now() > deadline
                || self
                    .child
                    .as_mut()
                    .context("running")?
                    .try_wait()?
                    .is_some()
            {
                bail!("torpor up did not come up:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn doc(&self) -> Result<serde_json::Value> {
        // Straight from the status API: `torpor status` per poll would be too slow to catch
        // a short state such as checkpointing.
        Ok(serde_json::from_str(&http_get(self.status, "/status")?)?)
    }

    pub fn services(&self) -> Result<Vec<serde_json::Value>> {
        Ok(self.doc()?["services"]
            .as_array()
            .context("services")?
            .clone())
    }

    /// `torpor status` as a user runs it.
    pub fn status_text(&self) -> Result<String> {
        let out = Command::new(exe())
            .args(["status", "--addr", &self.status.to_string()])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    pub fn service(&self, name: &str) -> Result<serde_json::Value> {
        self.services()?
            .into_iter()
            .find(|s| s["name"] == name)
            .context("service listed")
    }

    /// Waits until `name`'s status satisfies `done`; `what` names the condition in the error.
    pub fn wait_for(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.service(name)?;
            if done(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("{name} not {what} but {s}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until `name` is in `state`.
    pub fn wait_state(
        &self,
        name: &str,
        state: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        self.wait_for(name, state, timeout, |s| s["state"] == state)
    }

    /// `torpor ARGS` as an operator runs it, against this `torpor up`'s control socket:
    /// (exit status, stdout, stderr).
    pub fn command(&self, args: &[&str]) -> Result<(ExitStatus, String, String)> {
        let out = Command::new(exe())
            .args(args)
            .arg("--socket")
            .arg(&self.control)
            .output()?;
        Ok((
            out.status,
            String::from_utf8(out.stdout)?,
            String::from_utf8(out.stderr)?,
        ))
    }

    /// Sends `sig` to `torpor up` and waits (up to `timeout`) for its exit status.
    pub fn signal_and_wait(
        &mut self,
        sig: nix::sys::signal::Signal,
        timeout: Duration,
    ) -> Result<ExitStatus> {
        let mut child = self.child.take().context("running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "torpor up did not exit within {timeout:?} of {sig}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops `torpor up` and returns its exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(60))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// A plain HTTP/1.1 GET; returns the body of a 200 answer (HTTP/1.0 or 1.1).
pub fn http_get(to: SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(to)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: torpor\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("HTTP answer")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200"),
        "answer: {head}"
    );
    Ok(body.to_string())
}

/// The `icx-2s` profile with a node that suspends and resumes in `transition_s` seconds each
/// (written into `dir`), so that a node sleep pays after a few times that of predicted quiet
/// instead of the real profile's ~25 s: for tests of what happens around a node sleep.
pub fn quick_suspend_profile(dir: &std::path::Path, transition_s: f64) -> Result<PathBuf> {
    let real = include_str!("../../../power/profiles/icx-2s.toml");
    let quick = real
        .replace(
            "suspend_entry_s = 5.0",
            &format!("suspend_entry_s = {transition_s:?}"),
        )
        .replace("resume_s = 10.0", &format!("resume_s = {transition_s:?}"))
        .replace("name = \"icx-2s\"", "name = \"icx-2s-quick-suspend\"");
    anyhow::ensure!(
        quick.contains(&format!("resume_s = {transition_s:?}")),
        "icx-2s.toml changed its node section"
    );
    let path = dir.join("icx-2s-quick-suspend.toml");
    std::fs::write(&path, quick)?;
    Ok(path)
}

/// The sample HTTP service `name` holding `memory`, listening on `backend` behind a gate on
/// `port`.
pub fn sample_service(name: &str, port: SocketAddr, backend: SocketAddr, memory: &str) -> Service {
    Service::sample(exe_path(), name, port, backend, memory)
}

/// redis-server from apt as service `name` (protocol tcp), listening on `backend` behind a
/// gate on `port`, without persistence, its working files in `dir`.
pub fn redis_service(
    name: &str,
    port: SocketAddr,
    backend: SocketAddr,
    dir: &std::path::Path,
) -> Service {
    let (backend_port, backend_ip, dir) = (
        backend.port().to_string(),
        backend.ip().to_string(),
        dir.display().to_string(),
    );
    Service::new(
        name,
        &[
            "redis-server",
            "--port",
            &backend_port,
            "--bind",
            &backend_ip,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir,
        ],
        port,
        backend,
    )
    .protocol("tcp")
}
