//! A platform power profile for tests of what happens around a node sleep: the shipped
//! `icx-2s` profile with a node that suspends and resumes in a moment.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};

/// The `icx-2s` profile with a node that suspends and resumes in `transition_s` seconds each
/// (written into `dir`), so that a node sleep pays after a few times that of predicted quiet
/// instead of the real profile's ~25 s.
pub fn quick_suspend_profile(dir: &Path, transition_s: f64) -> Result<PathBuf> {
    let real = include_str!("../../power/profiles/icx-2s.toml");
    let quick = real
        .replace(
            "suspend_entry_s = 5.0",
            &format!("suspend_entry_s = {transition_s:?}"),
        )
        .replace("resume_s = 10.0", &format!("resume_s = {transition_s:?}"))
        .replace("name = \"icx-2s\"", "name = \"icx-2s-quick-suspend\"");
    ensure!(
        quick.contains(&format!("resume_s = {transition_s:?}")),
        "icx-2s.toml changed its node section"
    );
    let path = dir.join("icx-2s-quick-suspend.toml");
    std::fs::write(&path, quick)?;
    Ok(path)
}
