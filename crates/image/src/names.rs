//! Which snapshot and image file names are acceptable. Names become path components in the
//! disk tier, so anything that could escape a directory is refused at the protocol edge.

use thiserror::Error;

/// Longest snapshot name; long enough for `namespace.service-replica` style names.
pub const MAX_SNAPSHOT_NAME: usize = 128;
/// Longest image file name; CRIU's names (`pages-12.img`, `tcp-stream-1f.img`) are short.
pub const MAX_FILE_NAME: usize = 255;

/// Why a name was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{kind} name is empty")]
    Empty { kind: &'static str },
    #[error("{kind} name {name:?} is longer than {max} bytes")]
    TooLong {
        kind: &'static str,
        name: String,
        max: usize,
    },
    #[error("{kind} name {name:?} may only hold letters, digits, '.', '_' and '-', and may not start with '.'")]
    BadCharacters { kind: &'static str, name: String },
}

fn validate(kind: &'static str, name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > max {
        return Err(NameError::TooLong {
            kind,
            name: name.to_string(),
            max,
        });
    }
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok_chars || name.starts_with('.') {
        return Err(NameError::BadCharacters {
            kind,
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Checks a snapshot (service) name.
pub fn validate_snapshot_name(name: &str) -> Result<(), NameError> {
    validate("snapshot", name, MAX_SNAPSHOT_NAME)
}

/// Checks the name of one image file inside a snapshot.
pub fn validate_file_name(name: &str) -> Result<(), NameError> {
    validate("image file", name, MAX_FILE_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_criu_names() {
        for n in [
            "pages-1.img",
            "core-4242.img",
            "stats-dump",
            "inventory.img",
        ] {
            validate_file_name(n).unwrap();
        }
        validate_snapshot_name("redis-0").unwrap();
    }

    #[test]
    fn refuses_path_tricks() {
        for n in ["", "..", "../etc", "a/b", ".hidden", "sp ace", "nul\0"] {
            assert!(validate_snapshot_name(n).is_err(), "{n:?} accepted");
        }
        assert!(matches!(
            validate_snapshot_name(&"x".repeat(200)),
            Err(NameError::TooLong { .. })
        ));
    }
}
