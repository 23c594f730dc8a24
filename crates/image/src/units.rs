//! Units as people write and read them, on the command line and in config files: byte sizes
//! (`64MiB`, `8GiB`, `1500000`), durations (`500ms`, `30s`, `2m`) and wall-clock times. The one
//! parser of each: every flag, config key and spec that takes a size or a duration goes through
//! here, so they all accept the same spellings and say the same thing when refusing one.

use std::time::{Duration, UNIX_EPOCH};

use thiserror::Error;

/// Why a size string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size {0:?} is empty")]
    Empty(String),
    #[error("size {0:?} has no number (expected e.g. 64MiB, 8GiB, 4096)")]
    NoNumber(String),
    #[error(
        "size {input:?} has unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
    )]
    UnknownUnit { input: String, unit: String },
    #[error("size {0:?} does not fit in 64 bits")]
    Overflow(String),
}

/// Parses a byte size: an integer with an optional binary (KiB…TiB) or decimal (KB…TB) unit.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty(input.to_string()));
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits_end == 0 {
        return Err(SizeError::NoNumber(input.to_string()));
    }
    let number: u64 = s[..digits_end]
        .parse()
        .map_err(|_| SizeError::Overflow(input.to_string()))?;
    let unit = s[digits_end..].trim();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(SizeError::UnknownUnit {
                input: input.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| SizeError::Overflow(input.to_string()))
}

/// Why a duration string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{input:?} is not a duration like 500ms, 30s or 2m ({reason})")]
pub struct DurationError {
    /// What was given, quoted in the message.
    pub input: String,
    /// What the parser found wrong with it.
    pub reason: String,
}

/// Parses a duration: numbers with units (`ns`, `us`, `ms`, `s`, `m`, `h`, `d`, …), summed
/// (`1m 30s`); surrounding white space is ignored.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(input.trim()).map_err(|e| DurationError {
        input: input.to_string(),
        reason: e.to_string(),
    })
}

/// [`parse_size`] as a clap value parser (the error as text).
pub fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// [`parse_duration`] as a clap value parser (the error as text).
pub fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// Milliseconds since the epoch as an RFC 3339 UTC time (to the second).
pub fn unix_ms_to_utc(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Formats bytes with a binary unit, e.g. `256.0 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size(" 2 gb "), Ok(2_000_000_000));
        assert_eq!(parse_size("1k"), Ok(1024));
    }

    #[test]
    fn refuses_bad_input() {
        assert!(matches!(parse_size(""), Err(SizeError::Empty(_))));
        assert!(matches!(parse_size("GiB"), Err(SizeError::NoNumber(_))));
        assert!(matches!(
            parse_size("5 parsecs"),
            Err(SizeError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("99999999999TiB"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 2m "), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        let e = parse_duration("soon").unwrap_err();
        assert!(
            e.to_string().starts_with("\"soon\" is not a duration"),
            "{e}"
        );
        assert!(duration_arg("5 parsecs").is_err());
        assert_eq!(size_arg("1k"), Ok(1024));
    }

    #[test]
    fn formats() {
        assert_eq!(unix_ms_to_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(256 << 20), "256.0 MiB");
    }
}
