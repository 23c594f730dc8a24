//! Reading one sysfs attribute, trimmed, as text or as a number.

use std::path::Path;

use crate::TelemetryError;

pub(crate) fn read_attr(path: &Path) -> Result<String, TelemetryError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| TelemetryError::Read(path.into(), e))
}

pub(crate) fn read_number(path: &Path) -> Result<u64, TelemetryError> {
    let text = read_attr(path)?;
    text.parse()
        .map_err(|_| TelemetryError::Malformed(path.into(), format!("{text:?} is not a number")))
}
