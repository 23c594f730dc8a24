//! torpor's lazy-pages server. `criu restore --lazy-pages` restores a tree with its lazy
//! memory left missing and hands each process's userfaultfd to this server over
//! `lazy-pages.socket`; the server answers page faults with bytes read from a [`PageSource`]
//! (the pool), pushes a recorded working set right after the restore finishes, and keeps
//! account of which ranges the service never touched, so that the next checkpoint can leave
//! them where they are.

pub mod protocol;
mod ranges;
mod server;
mod session;
pub mod uffd;

#[cfg(test)]
mod fake;

pub use server::{LazyConfig, LazyError, LazyServer, MAX_FAULT_READ, SOCKET_NAME};
pub use session::{Fill, LazyStats, Unprovable};

use torpor_image::pages::Origin;

/// Where the server gets the bytes of lazy pages from.
pub trait PageSource: Send + 'static {
    /// The `len` bytes stored at `origin`, lent from the source's own buffer until its next
    /// call: the server copies them into the tree from there, with no copy of its own in
    /// between. An error is final for the restore: the server kills the tree rather than let
    /// it see memory that is not its own.
    fn read(&mut self, origin: &Origin, len: usize) -> Result<&[u8], SourceError>;

    /// The server will ask for these bytes next (the following chunk of a fill): a source
    /// may fetch them while the current chunk is copied.
    fn hint(&mut self, _origin: &Origin, _len: usize) {}
}

/// A page source could not deliver.
#[derive(Debug, thiserror::Error)]
#[error("page source failed: {message}")]
pub struct SourceError {
    /// What went wrong, for the failure report and the log.
    pub message: String,
    /// The source's data fails its checks (a checksum, a digest): the snapshot is corrupt,
    /// which the caller refuses for good, rather than unreachable for now.
    pub corrupt: bool,
}
