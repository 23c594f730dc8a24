//! `torpor up` run as a child of the test, as a user runs it: on a torpor.toml written from a
//! typed [`Config`] into a temporary directory of its own, its log in a file there, watched
//! through its status API (read as JSON) and ordered through its control socket; stopped with
//! SIGTERM, and reaped, however the test ends.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::{config::Control, exe, http_get, own_addr, Config};

/// A running `torpor up`, stopped with SIGTERM when dropped.
#[derive(Debug)]
pub struct Up {
    /// The process; `None` once it has exited and been reaped, so that nothing signals a PID
    /// that may have been given to another process since.
    child: Option<Child>,
    /// Its status API, on an address of the test's own: tests read `/status` and `/metrics`
    /// there, and give it to `torpor status --addr`.
    pub status: SocketAddr,
    /// Its control socket: its own, in `dir`, unless the config names one (tests run several
    /// `torpor up` at once; the default path is for users).
    pub control: PathBuf,
    /// Holds its torpor.toml and its log; removed once it is dropped.
    dir: tempfile::TempDir,
    /// Its stderr, shown in the errors of waits that time out.
    log: PathBuf,
    /// The file it runs on, as written (status and control sections included), for tests that
    /// change it and reload.
    config: Config,
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
        Up::spawn_with(cfg, |_| {})
    }

    /// As [`Up::spawn`], with `prepare` adding torpor's global flags (they come before `up`)
    /// and environment to the command, as a service manager would.
    pub fn spawn_with(cfg: &Config, prepare: impl FnOnce(&mut Command)) -> Result<Up> {
        let status = cfg.status.as_ref().context("a status address")?.listen;
        let dir = tempfile::tempdir()?;
        let control = dir.path().join("control.sock");
        let mut config = cfg.clone();
        config.control.get_or_insert_with(|| Control {
            socket: Some(control.clone()),
            ..Control::default()
        });
        let control = config
            .control
            .as_ref()
            .and_then(|c| c.socket.clone())
            .unwrap_or(control);
        let path = config.write_in(dir.path())?;
        let log = dir.path().join("up.log");
        let mut cmd = Command::new(exe());
        cmd.env(
            "RUST_LOG",
            std::env::var("TORPOR_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
        prepare(&mut cmd);
        let child = cmd
            .args(["up", "-c"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("start {}", exe().display()))?;
        Ok(Up {
            child: Some(child),
            status,
            control,
            dir,
            log,
            config,
        })
    }

    /// The config it runs on, as written (status and control sections included).
    pub fn config(&self) -> &Config {
        &self.config
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

    /// Whether it has exited (then reaped), without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let exited = self.child.as_mut().context("running")?.try_wait()?;
        if exited.is_some() {
            self.child = None;
        }
        Ok(exited)
    }

    /// Waits until the status API answers, which it does only once every gate listens and
    /// every service has started (a connection made earlier waits for that).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.services().is_err() {
            if Instant::now() > deadline || self.try_wait()?.is_some() {
                bail!("torpor up did not come up:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/status`, straight from the status API: `torpor status` per poll would be too slow to
    /// catch a short state such as checkpointing.
    pub fn doc(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&http_get(self.status, "/status")?)?)
    }

    /// Every service's entry in `/status`.
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
        ensure!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `name`'s entry in `/status`.
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

    /// Waits (up to `timeout`) for `torpor up` to exit on its own, and reaps it; past
    /// `timeout` it is killed.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("running")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "torpor up did not exit within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `sig` to `torpor up` and waits (up to `timeout`) for its exit status.
    pub fn signal_and_wait(&mut self, sig: Signal, timeout: Duration) -> Result<ExitStatus> {
        kill(Pid::from_raw(self.pid()?), sig)?;
        self.wait_exit(timeout)
            .with_context(|| format!("waiting for torpor up to exit after {sig}"))
    }

    /// Stops `torpor up` and returns its exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// Starts `torpor up` on `cfg` inside the test's own Tokio runtime, with a control socket of
/// its own, and returns once every service is up behind its gate: for tests that read the
/// agent's state directly (which level a service is at, its transitions) rather than through
/// the status API. The config is the same typed one a child gets, read as `torpor up` reads
/// its file.
pub async fn in_process(cfg: &Config) -> Result<torpor_bench::inproc::InProcessUp> {
    // Each service runs under torpor's own init, which this process (a test binary) is not:
    // the agent takes it from `TORPOR_INIT`. Set before anything starts, to the same path
    // every time.
    if std::env::var_os("TORPOR_INIT").is_none() {
        std::env::set_var("TORPOR_INIT", exe());
    }
    let config = torpor_up::Config::from_toml(&cfg.to_toml()).context("the typed config")?;
    Ok(torpor_bench::inproc::InProcessUp::start(config, crate::criu()).await?)
}
