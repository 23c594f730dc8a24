//! The network fabric for remote-pool benchmarks, for real (root only): a 10 Gbit/s fabric
//! is built, shaped, entered and measured; a pool inside it stores and serves a 64 MiB
//! snapshot over TLS no faster than the link allows and intact; and nothing is left behind,
//! whether the fabric is dropped or its owner is interrupted (Ctrl-C).

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use torpor_bench::{
    fabric::{Fabric, FabricProfile, POOL_PORT},
    harness::PoolProcess,
};
use torpor_image::{manifest::SnapshotMeta, CHUNK_SIZE};
use torpor_pool::{ClientTls, PoolAddr, PoolClient, PoolTarget, ServeOptions, Store, StoreConfig};

const MIB: usize = 1 << 20;
const SNAPSHOT: usize = 64 * MIB;
const TOKEN: &str = "fabric-test-token-0123456789";

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: building a network fabric needs root (network namespaces, veth, tc)");
    false
}

/// Seeded bytes that differ along the buffer.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn tc_show(args: &[&str]) -> String {
    let out = Command::new("tc").args(args).output().expect("tc runs");
    assert!(out.status.success(), "tc {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Below the profile's rate plus 10 % (the bucket's first burst and timer slack).
fn assert_within_rate(what: &str, bits_per_s: f64, rate: u64) {
    assert!(bits_per_s > 0.0, "{what}: {bits_per_s}");
    assert!(
        bits_per_s <= rate as f64 * 1.1,
        "{what}: {:.2} Gbit/s through a {:.0} Gbit/s fabric",
        bits_per_s / 1e9,
        rate as f64 / 1e9
    );
}

/// Puts `data` as one file of snapshot `name` and reads it back; returns the two transfer
/// rates (bits per second) and the bytes read.
fn put_and_get(c: &mut PoolClient, name: &str, data: &[u8]) -> (f64, f64, Vec<u8>) {
    let t = Instant::now();
    c.put_begin(name, SnapshotMeta::default(), None).unwrap();
    c.file_open(0, "pages-1.img").unwrap();
    for piece in data.chunks(CHUNK_SIZE as usize) {
        c.file_data(0, piece).unwrap();
    }
    c.file_close(0, data.len() as u64).unwrap();
    let generation = c.commit(None, None).unwrap().generation;
    let put = data.len() as f64 * 8.0 / t.elapsed().as_secs_f64();
    let mut back = Vec::with_capacity(data.len());
    let t = Instant::now();
    c.get_file(name, generation, "pages-1.img", |b| {
        back.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    let get = data.len() as f64 * 8.0 / t.elapsed().as_secs_f64();
    (put, get, back)
}

/// A pool served in this process on a listener inside the fabric, over TLS; stopped and
/// joined on drop.
struct InsidePool {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InsidePool {
    fn start(fabric: &Fabric, tls_dir: &Path) -> (InsidePool, PoolTarget) {
        let addr = fabric.pool_addr();
        let tls = torpor_pool::tls::generate(tls_dir, &[addr.ip().to_string()], false).unwrap();
        let server_tls = torpor_pool::tls::server_config(&tls.pool_cert, &tls.pool_key, None)
            .expect("server TLS");
        let std_listener = fabric.bind_inside(POOL_PORT).expect("listener inside");
        std_listener.set_nonblocking(true).unwrap();
        let store = Arc::new(
            Store::open(StoreConfig {
                capacity: 2 * SNAPSHOT as u64,
                spill_dir: None,
                keep: 1,
            })
            .unwrap(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let l = torpor_pool::Listener::Tcp(l).with_tls(server_tls).unwrap();
                let options = ServeOptions::new(Some(TOKEN.into()));
                torpor_pool::serve_with(l, store, options, async {
                    let _ = stopped.await;
                })
                .await
            })
        });
        let target = PoolTarget::new(PoolAddr::Tcp(addr.to_string()), TOKEN)
            .with_tls(Some(ClientTls::pinned(&tls.pool_cert, None).unwrap()));
        (
            InsidePool {
                stop: Some(stop),
                thread: Some(thread),
            },
            target,
        )
    }
}

impl Drop for InsidePool {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(|t| t.join());
    }
}

#[test]
fn a_10gbit_fabric_carries_a_pool_at_its_rate_and_leaves_nothing_behind() {
    if !root() {
        return;
    }
    let fabric = Fabric::create(FabricProfile::Gbit10).expect("fabric");
    let rate = fabric.rate_bits_per_s();
    let (name, host_link) = (fabric.name().to_string(), fabric.host_link().to_string());
    assert!(netns_exists(&name) && link_exists(&host_link));
    assert!(
        !link_exists(fabric.inside_link()),
        "inside end is in the namespace"
    );

    // Both ends shaped.
    for shown in [
        tc_show(&["qdisc", "show", "dev", &host_link]),
        tc_show(&["-n", &name, "qdisc", "show", "dev", fabric.inside_link()]),
    ] {
        assert!(
            shown.contains("tbf") && shown.contains("rate 10Gbit"),
            "{shown}"
        );
    }

    // A command runs inside: it sees the inside address and not ours.
    let out = fabric
        .command("ip")
        .unwrap()
        .args(["-o", "-4", "addr", "show"])
        .output()
        .expect("ip inside");
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(
        seen.contains(&format!("{}/30", fabric.inside_addr())),
        "{seen}"
    );
    assert!(!seen.contains(&fabric.host_addr().to_string()), "{seen}");

    let m = fabric.measure().expect("measure");
    assert_within_rate("bulk transfer", m.achieved_bits_per_s, rate);
    assert!(m.rtt_s > 0.0 && m.rtt_s < 0.1, "rtt {} s", m.rtt_s);

    let tls_dir = tempfile::tempdir().unwrap();
    let (pool, target) = InsidePool::start(&fabric, &tls_dir.path().join("tls"));
    let mut client = target.connect().expect("pool inside answers over TLS");
    let data = pattern(SNAPSHOT);
    let (put, get, back) = put_and_get(&mut client, "through-fabric", &data);
    assert!(back == data, "snapshot came back altered");
    assert_within_rate("put", put, rate);
    assert_within_rate("get", get, rate);
    eprintln!(
        "fabric: bulk {:.2} Gbit/s, rtt {:.0} µs; 64 MiB put {:.2} Gbit/s, get {:.2} Gbit/s",
        m.achieved_bits_per_s / 1e9,
        m.rtt_s * 1e6,
        put / 1e9,
        get / 1e9
    );
    drop(client);
    drop(pool);

    drop(fabric);
    assert!(!netns_exists(&name), "namespace {name} left behind");
    assert!(!link_exists(&host_link), "link {host_link} left behind");
}

/// The `torpor` binary beside this test's directory (target/<profile>/torpor), when the
/// workspace's binaries were built.
fn torpor_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("torpor");
    bin.exists().then_some(bin)
}

#[test]
fn a_pool_process_runs_inside_a_fabric() {
    if !root() {
        return;
    }
    let Some(exe) = torpor_exe() else {
        eprintln!(
            "skipped: no torpor binary in the target directory (cargo build --release -p torpor)"
        );
        return;
    };
    let pool = PoolProcess::spawn_on(&exe, 2 * SNAPSHOT as u64, None, FabricProfile::Gbit10)
        .expect("pool inside a fabric");
    let fabric = pool.fabric().expect("a rate profile has a fabric");
    let (name, host_link) = (fabric.name().to_string(), fabric.host_link().to_string());
    let report = &pool.fabric_report;
    assert_eq!(report.profile, FabricProfile::Gbit10);
    assert_eq!(report.rate_bits_per_s, Some(10_000_000_000));
    assert_eq!(report.transport, "tls");
    assert_within_rate(
        "bulk transfer",
        report.achieved_bits_per_s.unwrap(),
        10_000_000_000,
    );
    // The pool is reached at the inside address only: through the fabric, with TLS.
    assert_eq!(
        pool.target.addr,
        PoolAddr::Tcp(fabric.pool_addr().to_string())
    );
    assert!(pool.target.tls.is_some() && !pool.target.insecure);
    let mut client = pool.target.connect().expect("pool answers");
    let data = pattern(SNAPSHOT);
    let (put, get, back) = put_and_get(&mut client, "process-through-fabric", &data);
    assert!(back == data, "snapshot came back altered");
    assert_within_rate("put", put, 10_000_000_000);
    assert_within_rate("get", get, 10_000_000_000);
    drop(client);
    drop(pool);
    assert!(!netns_exists(&name), "namespace {name} left behind");
    assert!(!link_exists(&host_link), "link {host_link} left behind");
}

/// Kills and reaps a child on drop, so a failed assertion leaves no process behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const OWNER_ENV: &str = "TORPOR_FABRIC_TEST_OWNER";
/// What the owner prints before the fabric's names.
const OWNER_SAYS: &str = "fabric owner built: ";

#[test]
fn a_fabric_is_removed_when_its_owner_is_interrupted() {
    if !root() {
        return;
    }
    // This test binary again, as a process that builds a fabric and then waits.
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "fabric_owner",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(OWNER_ENV, "1")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    // A shell that starts us in the background may have SIGINT ignored; Ctrl-C's default
    // action is what is under test.
    // SAFETY: signal() with SIG_DFL is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::sys::signal::signal(
                nix::sys::signal::SIGINT,
                nix::sys::signal::SigHandler::SigDfl,
            )
            .map(|_| ())
            .map_err(std::io::Error::from)
        });
    }
    let mut owner = Reaped(cmd.spawn().unwrap());
    let mut lines = BufReader::new(owner.0.stdout.take().unwrap()).lines();
    let line = lines
        // libtest's "test fabric_owner ... " shares the line.
        .find_map(|l| Some(l.ok()?.split_once(OWNER_SAYS)?.1.to_string()))
        .expect("the owner built a fabric");
    let (name, host_link) = line.split_once(' ').expect("name and link");
    assert!(netns_exists(name) && link_exists(host_link));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(owner.0.id() as i32),
        nix::sys::signal::SIGINT,
    )
    .unwrap();
    let status = owner.0.wait().unwrap();
    assert!(!status.success(), "the owner was interrupted: {status:?}");
    // The janitor cleans up once the owner is gone; wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while netns_exists(name) || link_exists(host_link) {
        assert!(
            Instant::now() < deadline,
            "{name} or {host_link} still there 10 s after the owner died"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Helper process of the test above: builds a fabric, says its names, and blocks until it
/// is killed (its stdin never closes while the test runs).
#[test]
#[ignore = "helper: run by a_fabric_is_removed_when_its_owner_is_interrupted"]
fn fabric_owner() {
    assert!(
        std::env::var_os(OWNER_ENV).is_some(),
        "a helper process, not a test of its own"
    );
    let fabric = Fabric::create(FabricProfile::Gbit25).expect("fabric");
    println!("{OWNER_SAYS}{} {}", fabric.name(), fabric.host_link());
    let mut rest = String::new();
    let _ = std::io::stdin().read_line(&mut rest);
    // The test kills this process before it gets here; dropping would clean up anyway.
    drop(fabric);
}
