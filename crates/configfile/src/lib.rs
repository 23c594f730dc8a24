//! A TOML configuration file as torpor's config readers take it (`torpor.toml` in `up`, the
//! simulator's in `sim`): reading it, and [`ConfigError`], the one error that refuses it. Bad
//! values name their key (`service[1].policy.idle_threshold: …`), unknown keys and bad syntax
//! come with TOML's own position. Pure: no I/O runtime, so the simulator can use it.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

/// The value at `key` cannot stand, for `problem`.
pub fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The text of the configuration file at `path`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key_or_the_file() {
        assert_eq!(
            invalid("node[0].count", "must be at least 1").to_string(),
            "node[0].count: must be at least 1"
        );
        let missing = Path::new("/nonexistent/torpor.toml");
        let e = read(missing).unwrap_err();
        assert_eq!(e.to_string(), "cannot read /nonexistent/torpor.toml");
        assert!(matches!(e, ConfigError::Read(p, _) if p == missing));
    }

    #[test]
    fn toml_errors_pass_through() {
        let e: ConfigError = toml::from_str::<toml::Table>("a = ").unwrap_err().into();
        assert!(matches!(e, ConfigError::Parse(_)));
    }
}
