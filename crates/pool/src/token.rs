//! The pool's shared token on disk: a file only its owner can read, holding a long secret.
//! Whoever reads the token can read every snapshot (whole process memories), so a file that
//! group or others can read, or a token short enough to guess, is refused.

use std::{
    fs,
    io::{self, Read},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a token file was refused.
#[derive(Debug, Error)]
pub enum TokenFileError {
    #[error("cannot read token file {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("token file {path} has mode {mode:04o}: group or others can read the pool token; chmod 600 it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("token file {path} holds {len} characters, fewer than {MIN_TOKEN_LEN}: use a long random token")]
    TooShort { path: PathBuf, len: usize },
}

/// Reads a shared token: the file's content without surrounding whitespace, after checking
/// that only its owner can read it and that it is at least [`MIN_TOKEN_LEN`] long.
pub fn read_token_file(path: &Path) -> Result<String, TokenFileError> {
    let read_err = |e| TokenFileError::Read(path.to_path_buf(), e);
    // The mode checked is the one of the file actually opened (a symlink to a private file
    // is fine).
    let mut f = fs::File::open(path).map_err(read_err)?;
    let mode = f.metadata().map_err(read_err)?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokenFileError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut t = String::new();
    f.read_to_string(&mut t).map_err(read_err)?;
    let t = t.trim();
    if t.chars().count() < MIN_TOKEN_LEN {
        return Err(TokenFileError::TooShort {
            path: path.to_path_buf(),
            len: t.chars().count(),
        });
    }
    Ok(t.to_string())
}

/// The token a client presents: the file's (checked as [`read_token_file`] does), or none (an
/// empty token, for a pool that does not authenticate) when no file is configured.
pub fn read_token(file: Option<&Path>) -> Result<String, TokenFileError> {
    file.map_or_else(|| Ok(String::new()), read_token_file)
}

/// Writes a token file readable by its owner only (0600, whatever the umask).
pub fn write_token_file(path: &Path, token: &str) -> io::Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its old mode through open: tighten it explicitly.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(token.as_bytes())
}
