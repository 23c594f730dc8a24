//! Dev-only kit for torpor's tests (a dev-dependency, never published). It owns what the
//! end-to-end tests share: the binary under test ([`exe`]) and `torpor up` run from it as a
//! child on a typed [`Config`] ([`Up`]) or inside the test ([`in_process`]), plain HTTP to a gate ([`http_get`]), the services
//! tests run ([`Service::sample`], [`Service::redis`]), the turn every such test takes
//! ([`serial`]) and the guards of tests that run CRIU themselves ([`criu_guard`], [`criu`]),
//! and the small waits and /proc reads several tests make ([`poll`], [`proc_state`]).
//!
//! Tests never guess a free port: an in-process server takes a listener bound on port 0, and
//! a child process that must bind an address given in advance (a service's backend, a gate
//! whose address outlives a restart) gets one of this process's [`own_addr`]esses, which no
//! other process draws. The torpor.toml a test writes is a typed [`Config`], never text put
//! together with `format!`.

pub mod config;
mod exe;
mod http;
mod profile;
mod up;

pub use config::{embedded, Config, Service};
pub use exe::exe;
pub use http::{http_get, sample_change, sample_sum};
pub use profile::quick_suspend_profile;
pub use up::{in_process, Up};

use std::{
    net::SocketAddr,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// Tests that start `torpor up` or run CRIU go one at a time: the machine has 2 cores, CRIU
/// timings matter, and CRIU's network lock takes the host's iptables.
static SERIAL: Mutex<()> = Mutex::new(());

/// The test's turn among those that start `torpor up` or run CRIU, held until dropped; a test
/// that failed holding it does not stop the others.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A loopback address no other process draws, for a child that binds it itself; see
/// [`torpor_bench::harness::own_addr`].
pub fn own_addr() -> SocketAddr {
    torpor_bench::harness::own_addr().expect("an address of this process's own")
}

/// For tests that run CRIU themselves: one at a time ([`serial`]), with this process as the
/// subreaper of what they checkpoint (a restored tree is re-parented to it and reaped at once).
pub fn criu_guard() -> MutexGuard<'static, ()> {
    let guard = serial();
    torpor_bench::harness::become_subreaper().expect("become the subreaper");
    guard
}

/// The CRIU that tests run themselves (the README's test command installs it).
pub fn criu() -> torpor_criu::CriuBinary {
    torpor_criu::CriuBinary::locate().expect("CRIU is installed by the README's test command")
}

/// A process's state letter from /proc (`S`, `R`, `T` stopped, `t` stopped by a tracer as
/// CRIU's seize does, `Z` zombie), if it exists.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Checks `cond` every `every` until it holds or `limit` has passed (and once more then);
/// whether it held. Each test picks `every` for what it watches: a moment of a few
/// milliseconds, or a pool it should not keep busy.
pub fn poll(limit: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(every);
    }
    cond()
}
