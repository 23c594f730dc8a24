//! A pool served in-process (its own runtime thread) on 127.0.0.1:0, or on any address with
//! or without TLS, for the tests that drive it through the blocking client and raw sockets.

use std::{path::Path, sync::Arc, thread};

use torpor_pool::{serve_with, Listener, PoolAddr, PoolClient, ServeOptions, Store, StoreConfig};

pub const TOKEN: &str = "test-token-0123456789";

/// A running pool; stopped and joined when dropped.
pub struct Running {
    pub addr: PoolAddr,
    pub store: Arc<Store>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
    }
}

/// Starts a pool keeping `keep` generations, whose serving options `tune` adjusts (the
/// token is [`TOKEN`]).
pub fn start(
    capacity: u64,
    spill: Option<&Path>,
    keep: usize,
    tune: impl FnOnce(&mut ServeOptions) + Send + 'static,
) -> Running {
    start_on(
        capacity,
        spill,
        keep,
        "127.0.0.1:0".parse().unwrap(),
        None,
        tune,
    )
}

/// [`start`] listening on `bind` (a TCP address or `unix:PATH`), speaking TLS with `tls`.
pub fn start_on(
    capacity: u64,
    spill: Option<&Path>,
    keep: usize,
    bind: PoolAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    tune: impl FnOnce(&mut ServeOptions) + Send + 'static,
) -> Running {
    let store = Arc::new(
        Store::open(StoreConfig {
            capacity,
            spill_dir: spill.map(Path::to_path_buf),
            keep,
        })
        .unwrap(),
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let s = store.clone();
    let thread = thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let mut l = Listener::bind(&bind).await.unwrap();
            if let Some(config) = tls {
                l = l.with_tls(config).unwrap();
            }
            addr_tx.send(l.local_addr().unwrap()).unwrap();
            let mut options = ServeOptions::new(Some(TOKEN.into()));
            tune(&mut options);
            serve_with(l, s, options, async {
                let _ = rx.await;
            })
            .await
        })
    });
    Running {
        addr: addr_rx.recv().unwrap(),
        store,
        stop: Some(tx),
        thread: Some(thread),
    }
}

/// An authenticated client of `p`.
pub fn client(p: &Running) -> PoolClient {
    PoolClient::connect(&p.addr, TOKEN).unwrap()
}
