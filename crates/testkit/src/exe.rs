//! Where the `torpor` binary under test is. Cargo names it only to torpor's own integration
//! tests, at compile time (`env!("CARGO_BIN_EXE_torpor")`), so the kit finds it as
//! assert_cmd's `cargo_bin` does: beside the `deps/` directory the test executable runs from,
//! where `cargo test -p torpor` builds it before any test runs.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{ensure, Context, Result};

/// The `torpor` binary built for this test run.
///
/// # Panics
/// When the test executable has no `torpor` beside it (a crate's tests other than torpor's,
/// which Cargo does not build it for).
pub fn exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| locate().unwrap_or_else(|e| panic!("{e:#}")))
}

fn locate() -> Result<PathBuf> {
    let test = std::env::current_exe().context("the test executable's path")?;
    // target/<profile>/deps/<test>-<hash> beside target/<profile>/torpor.
    let mut dir = test.parent().context("the test executable's directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("the directory above deps/")?;
    }
    let exe = dir.join(format!("torpor{}", std::env::consts::EXE_SUFFIX));
    ensure!(
        exe.is_file(),
        "no torpor binary at {} beside the test {}: `cargo test -p torpor` builds it",
        exe.display(),
        test.display()
    );
    Ok(exe)
}
