//! The server's handle and loop around the restore connection: configuration checks,
//! timeouts, and a restore that ends before FIN.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use torpor_image::pages::{Origin, PageRange, PAGE_SIZE};
use torpor_lazy::protocol::{send_process, send_zombie};
use torpor_lazy::uffd::{RealUffd, CRIU_FEATURES};
use torpor_lazy::{Fill, LazyConfig, LazyError, LazyServer, PageSource, SourceError, Unprovable};

const WAIT: Duration = Duration::from_secs(30);

struct Zeros(Vec<u8>);

impl PageSource for Zeros {
    fn read(&mut self, _origin: &Origin, len: usize) -> Result<&[u8], SourceError> {
        self.0.resize(len, 0);
        Ok(&self.0[..len])
    }
}

fn config(dir: &std::path::Path, ranges: Vec<PageRange>) -> (LazyConfig, Arc<Mutex<Vec<String>>>) {
    let failures = Arc::new(Mutex::new(Vec::new()));
    let f = failures.clone();
    let cfg = LazyConfig {
        work_dir: dir.to_path_buf(),
        ranges: HashMap::from([(9, ranges)]),
        prefetch: HashMap::new(),
        record_for: Duration::from_secs(1),
        fill: Fill::Background,
        max_fault_read: 1 << 20,
        on_failure: Box::new(move |why| f.lock().unwrap().push(why.to_string())),
    };
    (cfg, failures)
}

fn range(start: u64, len: u64) -> PageRange {
    PageRange {
        start,
        len,
        origin: Origin {
            generation: 1,
            file: "pages-1.img".into(),
            offset: 0,
        },
    }
}

#[test]
fn start_refuses_bad_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = config(dir.path(), vec![range(0x1000, 0x800)]);
    assert!(matches!(
        LazyServer::start(cfg, Box::new(Zeros(Vec::new()))),
        Err(LazyError::InvalidRanges { pid: 9, .. })
    ));
    let (cfg, _) = config(
        dir.path(),
        vec![range(0x3000, PAGE_SIZE), range(0x1000, PAGE_SIZE)],
    );
    assert!(matches!(
        LazyServer::start(cfg, Box::new(Zeros(Vec::new()))),
        Err(LazyError::InvalidRanges { pid: 9, .. })
    ));
    let (mut cfg, _) = config(dir.path(), vec![]);
    cfg.max_fault_read = 0;
    assert!(matches!(
        LazyServer::start(cfg, Box::new(Zeros(Vec::new()))),
        Err(LazyError::InvalidFaultRead(0))
    ));
    let (cfg, _) = config(&dir.path().join("missing"), vec![]);
    assert!(matches!(
        LazyServer::start(cfg, Box::new(Zeros(Vec::new()))),
        Err(LazyError::Bind { .. })
    ));
}

#[test]
fn waiting_for_a_restore_that_never_comes_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, failures) = config(dir.path(), vec![]);
    let server = LazyServer::start(cfg, Box::new(Zeros(Vec::new()))).unwrap();
    assert!(matches!(
        server.wait_finished(Duration::from_millis(20)),
        Err(LazyError::Timeout(..))
    ));
    assert!(matches!(
        server.fill_all(Duration::from_millis(20)),
        Err(LazyError::Timeout(..))
    ));
    let stats = server.shutdown().unwrap();
    assert!(!stats.finished);
    assert!(failures.lock().unwrap().is_empty());
    assert!(!dir.path().join(torpor_lazy::SOCKET_NAME).exists());
}

#[test]
fn a_restore_that_ends_before_fin_with_ranges_left_kills_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, failures) = config(dir.path(), vec![range(0x10_0000, 16 * PAGE_SIZE)]);
    let server = LazyServer::start(cfg, Box::new(Zeros(Vec::new()))).unwrap();
    let criu = UnixStream::connect(server.socket_path()).unwrap();
    // the socket is gone once CRIU's one connection is in
    let uffd = RealUffd::open(CRIU_FEATURES).unwrap();
    send_process(&criu, 9, uffd.as_fd()).unwrap();
    drop(criu);
    match server.wait_finished(WAIT) {
        Err(LazyError::Connection(why)) => assert!(why.contains("before FIN"), "{why}"),
        other => panic!("expected a connection error, got {other:?}"),
    }
    assert!(UnixStream::connect(server.socket_path()).is_err());
    let failures = failures.lock().unwrap().clone();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(matches!(server.remaining(), Err(Unprovable::Failed(_))));
    assert!(matches!(server.fill_all(WAIT), Err(LazyError::Failed(_))));
    assert!(matches!(server.shutdown(), Err(LazyError::Failed(_))));
}

#[test]
fn a_restore_that_ends_before_fin_with_nothing_lazy_only_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, failures) = config(dir.path(), vec![]);
    let server = LazyServer::start(cfg, Box::new(Zeros(Vec::new()))).unwrap();
    let criu = UnixStream::connect(server.socket_path()).unwrap();
    send_zombie(&criu, 9).unwrap();
    drop(criu);
    assert!(matches!(
        server.wait_finished(WAIT),
        Err(LazyError::Connection(_))
    ));
    assert!(failures.lock().unwrap().is_empty());
    let stats = server.shutdown().unwrap();
    assert_eq!(stats.processes, 0);
}
