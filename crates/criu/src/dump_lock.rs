//! One CRIU dump at a time per working directory. When a task's `/proc` is not its own PID
//! namespace's (every tree under torpor's init), CRIU's parasite mounts procfs at the fixed
//! relative path `proc.crtools` in the task's working directory; two dumps at once of trees
//! that share a working directory collide there (`mkdir` fails with EEXIST) and one of them
//! fails. Dumps of trees in different directories still run side by side.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Condvar, Mutex},
};

static BUSY: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
static FREED: Condvar = Condvar::new();

/// Held while a tree is dumped: the working directories of its processes.
#[derive(Debug)]
pub(crate) struct DumpLock {
    dirs: HashSet<PathBuf>,
}

impl DumpLock {
    /// Waits until no other dump holds any of `pids`' working directories, then holds them.
    pub(crate) fn acquire(pids: &[i32]) -> DumpLock {
        Self::hold(working_dirs(pids))
    }

    fn hold(dirs: HashSet<PathBuf>) -> DumpLock {
        let mut busy = BUSY.lock().unwrap_or_else(|e| e.into_inner());
        while busy.as_ref().is_some_and(|b| !b.is_disjoint(&dirs)) {
            busy = FREED.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        busy.get_or_insert_with(HashSet::new)
            .extend(dirs.iter().cloned());
        DumpLock { dirs }
    }
}

impl Drop for DumpLock {
    fn drop(&mut self) {
        let mut busy = BUSY.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = busy.as_mut() {
            for d in &self.dirs {
                b.remove(d);
            }
        }
        FREED.notify_all();
    }
}

/// The working directories of `pids` (those still readable).
fn working_dirs(pids: &[i32]) -> HashSet<PathBuf> {
    pids.iter()
        .filter_map(|p| std::fs::read_link(format!("/proc/{p}/cwd")).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{atomic::AtomicBool, atomic::Ordering, Arc},
        time::Duration,
    };

    use super::*;

    fn set(dirs: &[&str]) -> HashSet<PathBuf> {
        dirs.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn a_dump_waits_for_one_in_the_same_directory_and_not_for_others() {
        let first = DumpLock::hold(set(&["/test-dump-lock/a"]));
        // another directory: at once
        drop(DumpLock::hold(set(&["/test-dump-lock/b"])));
        let got = Arc::new(AtomicBool::new(false));
        let waiter = {
            let got = got.clone();
            std::thread::spawn(move || {
                let _l = DumpLock::hold(set(&["/test-dump-lock/a", "/test-dump-lock/c"]));
                got.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !got.load(Ordering::SeqCst),
            "waits while the directory is held"
        );
        drop(first);
        waiter.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }

    #[test]
    fn the_working_directories_of_this_process_are_found() {
        let here = std::env::current_dir().unwrap();
        assert!(working_dirs(&[std::process::id() as i32]).contains(&here));
    }
}
