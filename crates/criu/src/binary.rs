//! Finding and running CRIU. Debian bookworm's CRIU fails on this project's kernels, so the
//! setup installs CRIU 4.2 with newer libraries into a private prefix; it is run through
//! that prefix's dynamic loader with `--library-path` (not `LD_LIBRARY_PATH`, so programs
//! CRIU starts, such as iptables, keep the system's libraries).

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use thiserror::Error;

/// Lowest CRIU version that dumps TCP sockets on kernels ≥ 6.16.
pub const MIN_VERSION: (u32, u32) = (4, 2);

/// Why CRIU could not be found or run.
#[derive(Debug, Error)]
pub enum CriuError {
    #[error("CRIU not found: run the README's setup, set TORPOR_CRIU_PREFIX to a prefix holding usr/sbin/criu, or put criu on PATH")]
    NotFound,
    #[error("running {0} failed")]
    Spawn(String, #[source] std::io::Error),
    #[error("cannot read CRIU's version from {0:?}")]
    Version(String),
    #[error("CRIU {found} is too old: torpor needs {}.{} or newer on this kernel", MIN_VERSION.0, MIN_VERSION.1)]
    TooOld { found: String },
}

/// A runnable CRIU.
#[derive(Debug, Clone)]
pub struct CriuBinary {
    /// The criu executable.
    pub criu: PathBuf,
    /// Private prefix, when CRIU runs through its own loader and libraries.
    pub prefix: Option<PathBuf>,
}

impl CriuBinary {
    /// CRIU installed into `prefix` by the project's setup script.
    pub fn from_prefix(prefix: &Path) -> Option<CriuBinary> {
        let criu = prefix.join("usr/sbin/criu");
        let loader = prefix.join("usr/lib64/ld-linux-x86-64.so.2");
        (criu.is_file() && loader.is_file()).then(|| CriuBinary {
            criu,
            prefix: Some(prefix.to_path_buf()),
        })
    }

    /// Finds CRIU: `TORPOR_CRIU_PREFIX`, then `.criu` in a parent of the running executable
    /// (the project checkout), then `criu` on PATH.
    pub fn locate() -> Result<CriuBinary, CriuError> {
        if let Some(p) = env::var_os("TORPOR_CRIU_PREFIX") {
            return CriuBinary::from_prefix(Path::new(&p)).ok_or(CriuError::NotFound);
        }
        if let Ok(exe) = env::current_exe() {
            for dir in exe.ancestors().skip(1) {
                if let Some(b) = CriuBinary::from_prefix(&dir.join(".criu")) {
                    return Ok(b);
                }
            }
        }
        let path = env::var_os("PATH").unwrap_or_default();
        env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|d| d.join("criu"))
            .find(|p| p.is_file())
            .map(|criu| CriuBinary { criu, prefix: None })
            .ok_or(CriuError::NotFound)
    }

    /// A command running CRIU with `args`.
    pub fn command(&self) -> Command {
        match &self.prefix {
            Some(prefix) => {
                let mut c = Command::new(prefix.join("usr/lib64/ld-linux-x86-64.so.2"));
                let libs = format!(
                    "{}:{}",
                    prefix.join("usr/lib/x86_64-linux-gnu").display(),
                    prefix.join("lib/x86_64-linux-gnu").display()
                );
                c.arg("--library-path").arg(libs).arg(&self.criu);
                c
            }
            None => Command::new(&self.criu),
        }
    }

    /// An executable that runs this CRIU with its arguments, for programs that take a CRIU
    /// path (runc's `--criu`): the binary itself, or a script in `dir` that goes through the
    /// private prefix's loader.
    pub fn executable(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let Some(prefix) = &self.prefix else {
            return Ok(self.criu.clone());
        };
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("criu");
        let libs = format!(
            "{}:{}",
            prefix.join("usr/lib/x86_64-linux-gnu").display(),
            prefix.join("lib/x86_64-linux-gnu").display()
        );
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec '{}' --library-path '{}' '{}' \"$@\"\n",
                prefix.join("usr/lib64/ld-linux-x86-64.so.2").display(),
                libs,
                self.criu.display()
            ),
        )?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        Ok(script)
    }

    /// Starts a CRIU command built from [`CriuBinary::command`] with its stdio on /dev/null
    /// (CRIU reports through its --log-file).
    pub fn spawn(&self, cmd: &mut Command) -> Result<std::process::Child, CriuError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| CriuError::Spawn(self.criu.display().to_string(), e))
    }

    /// Runs a CRIU command to its end, quietly; returns whether it succeeded.
    pub fn run(&self, cmd: &mut Command) -> Result<bool, CriuError> {
        let mut child = self.spawn(cmd)?;
        let status = child
            .wait()
            .map_err(|e| CriuError::Spawn(self.criu.display().to_string(), e))?;
        Ok(status.success())
    }

    /// `criu --version`, e.g. `4.2.1`; errors when older than [`MIN_VERSION`].
    pub fn version(&self) -> Result<String, CriuError> {
        let out = self
            .command()
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| CriuError::Spawn(self.criu.display().to_string(), e))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let version = text
            .lines()
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| CriuError::Version(text.clone()))?;
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if found < MIN_VERSION {
            return Err(CriuError::TooOld { found: version });
        }
        Ok(version)
    }

    /// `criu check`: its verdict line, and whether it passed.
    pub fn check(&self) -> Result<(bool, String), CriuError> {
        let out = self
            .command()
            .arg("check")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| CriuError::Spawn(self.criu.display().to_string(), e))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let good = out.status.success() && text.contains("Looks good");
        Ok((good, text.trim().to_string()))
    }
}

/// Reads a file CRIU wrote, without following a symlink: where CRIU runs as a service's uid,
/// a process of that uid could otherwise point this process at any file.
pub fn read_no_follow(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_bytes_no_follow(path)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn read_bytes_no_follow(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let mut bytes = Vec::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Copies a failed operation's log out of its work directory (about to be removed) to
/// `$TMPDIR/torpor-KIND-NAME.log`; returns where the log now is.
pub fn keep_log(log: &Path, kind: &str, name: &str) -> PathBuf {
    let kept = std::env::temp_dir().join(format!("torpor-{kind}-{name}.log"));
    if read_bytes_no_follow(log)
        .and_then(|bytes| std::fs::write(&kept, bytes))
        .is_ok()
    {
        kept
    } else {
        log.to_path_buf()
    }
}

/// The last `n` lines of a CRIU log, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = read_no_follow(path).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error") || l.contains("FAIL"))
        .collect();
    let lines: Vec<&str> = if errors.is_empty() {
        text.lines().collect()
    } else {
        errors
    };
    lines[lines.len().saturating_sub(n)..].join("\n")
}
