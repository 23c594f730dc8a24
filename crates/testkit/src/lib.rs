//! Dev-only kit for torpor's tests (a dev-dependency, never published). Tests never guess a
//! free port: an in-process server takes a listener bound on port 0, and a child process
//! that must bind an address given in advance (a service's backend, a gate whose address
//! outlives a restart) gets one of this process's [`own_addr`]esses, which no other process
//! draws. Tests that run CRIU themselves hold [`criu_guard`]. The torpor.toml a test writes
//! is a typed [`Config`], never text put together with `format!`.

pub mod config;

pub use config::{Config, Service};

use std::{
    net::SocketAddr,
    sync::{Mutex, MutexGuard},
};

/// Tests that start `torpor up` or run CRIU go one at a time: the machine has 2 cores, CRIU
/// timings matter, and CRIU's network lock takes the host's iptables.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// A loopback address no other process draws, for a child that binds it itself; see
/// [`torpor_bench::harness::own_addr`].
pub fn own_addr() -> SocketAddr {
    torpor_bench::harness::own_addr().expect("an address of this process's own")
}

/// For tests that run CRIU themselves: one at a time ([`SERIAL`]), with this process as the
/// subreaper of what they checkpoint (a restored tree is re-parented to it and reaped at once).
pub fn criu_guard() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    torpor_bench::harness::become_subreaper().expect("become the subreaper");
    guard
}
