//! `torpor up` end to end, with the real binary: services sleep into the pool and wake on
//! request behind their gates, with real CRIU, as root.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use torpor_bench::harness::{redis_command, PoolProcess};

use torpor_testkit::{
    config::{NodeSleep, Pool, Power},
    embedded, exe, http_get, own_addr, quick_suspend_profile, serial, Config, Service, Up,
};

/// The sleep/wake tests below run twice: with the gate proxying every connection, and with
/// kernel steering (new connections straight to the awake service; the gate only while it
/// sleeps or wakes). Each named function takes the mode (`steering = "…"`).
macro_rules! in_both_modes {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[test]
            fn proxy() -> anyhow::Result<()> {
                super::$test("proxy")
            }
            #[test]
            fn kernel() -> anyhow::Result<()> {
                super::$test("kernel")
            }
        }
    )*};
}

in_both_modes!(
    sleeping_services_answer_500_concurrent_http1_requests_and_grpc_calls,
    redis_behind_the_tcp_gate_keeps_its_data_across_sleeps,
    a_request_arriving_mid_checkpoint_is_answered_after_the_wake,
);

/// Each of `names` under `up` runs with `steering` (kernel steering did not fall back).
fn check_mode(up: &Up, names: &[&str], steering: &str) -> Result<()> {
    for name in names {
        let s = up.service(name)?;
        anyhow::ensure!(s["steering"] == steering, "{s}");
    }
    Ok(())
}

/// The proxied sample service.
fn sample_http(
    name: &str,
    port: SocketAddr,
    backend: SocketAddr,
    memory: &str,
    idle: &str,
) -> Service {
    Service::sample(name, port, backend, memory)
        .idle(idle)
        .steering("proxy")
}

async fn get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: String,
) -> Result<String> {
    let resp = client.get(url.parse()?).await?;
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    Ok(String::from_utf8(
        resp.into_body().collect().await?.to_bytes().to_vec(),
    )?)
}

fn sleeping_services_answer_500_concurrent_http1_requests_and_grpc_calls(
    steering: &str,
) -> Result<()> {
    let _g = serial();
    let (web, grpc, grpc_backend) = (own_addr(), own_addr(), own_addr());
    let services = [
        Service::sample("web", web, own_addr(), "32MiB")
            .idle("200ms")
            .steering(steering),
        Service::torpor(
            "grpc",
            &["sample-grpc", "--listen", &grpc_backend.to_string()],
            grpc,
            grpc_backend,
        )
        .steering(steering)
        .idle("200ms"),
    ];
    let mut up = Up::launch(embedded().services(services))?;
    check_mode(&up, &["web", "grpc"], steering)?;
    up.wait_state("web", "asleep", Duration::from_secs(30))?;
    up.wait_state("grpc", "asleep", Duration::from_secs(30))?;

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let mut tasks = Vec::new();
        for _ in 0..500 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                get(&client, format!("http://{web}/ping")).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await??, "PONG");
        }

        use tonic_health::pb::{
            health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
        };
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?.connect_lazy();
        let mut tasks = Vec::new();
        for _ in 0..500 {
            let mut c = HealthClient::new(channel.clone());
            tasks.push(tokio::spawn(async move {
                c.check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await??.into_inner().status, ServingStatus::Serving as i32);
        }
        anyhow::Ok(())
    })?;
    for name in ["web", "grpc"] {
        let s = up.service(name)?;
        assert!(s["sleeps"].as_u64() >= Some(1), "{s}");
        assert!(s["wakes"].as_u64() >= Some(1), "{s}");
        assert_eq!(s["cold_starts"], 0, "{s}\n{}", up.log_text());
        assert_eq!(s["held_now"], 0);
    }
    let text = up.status_text()?;
    assert!(text.contains("web") && text.contains("grpc"), "{text}");
    let metrics = rt.block_on(torpor_up::status::fetch(up.status, "/metrics"))?;
    assert!(
        metrics.contains("torpor_wakes_total{service=\"web\"}"),
        "{metrics}"
    );
    assert!(up.stop()?.success());
    Ok(())
}

fn redis_behind_the_tcp_gate_keeps_its_data_across_sleeps(steering: &str) -> Result<()> {
    let _g = serial();
    let (port, backend) = (own_addr(), own_addr());
    let dir = tempfile::tempdir()?;
    let kv = Service::redis("kv", port, backend, dir.path())
        .steering(steering)
        .idle("200ms");
    let up = Up::launch(embedded().services([kv]))?;
    check_mode(&up, &["kv"], steering)?;
    for round in 0..3 {
        up.wait_state("kv", "asleep", Duration::from_secs(30))?;
        assert_eq!(
            redis_command(
                port,
                &["SET", &format!("key{round}"), &format!("value{round}")]
            )?,
            "+OK"
        );
        up.wait_state("kv", "asleep", Duration::from_secs(30))?;
        for k in 0..=round {
            assert_eq!(
                redis_command(port, &["GET", &format!("key{k}")])?,
                format!("value{k}")
            );
        }
    }
    let s = up.service("kv")?;
    assert!(s["wakes"].as_u64() >= Some(6), "{s}");
    assert_eq!(s["cold_starts"], 0);
    Ok(())
}

fn a_request_arriving_mid_checkpoint_is_answered_after_the_wake(steering: &str) -> Result<()> {
    let _g = serial();
    let web = own_addr();
    let up = Up::launch(
        embedded().services([Service::sample("big", web, own_addr(), "512MiB")
            .idle("300ms")
            .steering(steering)]),
    )?;
    check_mode(&up, &["big"], steering)?;
    let expected = torpor_workload::expected_sum(512 << 20, 1);
    // It falls asleep right after start; wake it, then catch its next checkpoint. A
    // checkpoint can fail on a loaded machine (the service then keeps serving, which is
    // checked too), but then no request arrived mid-checkpoint: that try does not count.
    for attempt in 0..3 {
        up.wait_state("big", "asleep", Duration::from_secs(30))?;
        let before = up.service("big")?;
        assert_eq!(http_get(web, "/ping")?, "PONG");
        up.wait_state("big", "checkpointing", Duration::from_secs(30))?;
        let sum = http_get(web, "/sum").with_context(|| up.log_text())?;
        assert_eq!(sum, expected, "answered by the restored service");
        let s = up.service("big")?;
        if s["failed_checkpoints"] != before["failed_checkpoints"] {
            eprintln!(
                "attempt {attempt}: the checkpoint failed; log:\n{}",
                up.log_text()
            );
            continue;
        }
        let count = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        assert_eq!(
            count(&s, "sleeps"),
            count(&before, "sleeps") + 1,
            "{s}\n{}",
            up.log_text()
        );
        assert_eq!(
            count(&s, "wakes"),
            count(&before, "wakes") + 2,
            "{s}\n{}",
            up.log_text()
        );
        return Ok(());
    }
    anyhow::bail!("every checkpoint failed:\n{}", up.log_text())
}

#[test]
fn a_lost_snapshot_ends_in_a_cold_start_is_reported_and_the_request_is_answered() -> Result<()> {
    let _g = serial();
    let pool = PoolProcess::spawn(exe(), 256 << 20)?;
    let pool_cfg = Config {
        pool: Pool {
            address: Some(pool.target.addr.to_string()),
            token_file: Some(pool.token_file()),
            ..Pool::default()
        },
        ..Config::default()
    }
    .namespace("uptest");
    let web = own_addr();
    let up =
        Up::launch(pool_cfg.services([sample_http("web", web, own_addr(), "16MiB", "200ms")]))?;
    up.wait_state("web", "asleep", Duration::from_secs(30))?;
    // The node's snapshots carry its namespace in a shared pool.
    assert_eq!(pool.target.connect()?.delete("uptest.web", None)?, 1);
    assert_eq!(http_get(web, "/ping")?, "PONG");
    let s = up.service("web")?;
    assert_eq!(s["cold_starts"], 1, "{s}");
    assert_eq!(s["snapshots_lost"], 1, "{s}");
    assert!(
        s["last_snapshot_lost"]
            .as_str()
            .unwrap_or("")
            .contains("not found"),
        "{s}"
    );
    assert!(
        http_get(up.status, "/metrics")?.contains("torpor_snapshots_lost_total{service=\"web\"} 1"),
        "the loss is a metric"
    );
    Ok(())
}

#[test]
fn a_crashed_service_is_restarted_and_stopping_leaves_nothing_behind() -> Result<()> {
    let _g = serial();
    let iptables_before = Command::new("iptables").arg("-S").output()?.stdout;
    let web = own_addr();
    let mut up =
        Up::launch(embedded().services([sample_http("web", web, own_addr(), "8MiB", "1h")]))?;
    let s = up.wait_state("web", "awake", Duration::from_secs(10))?;
    let pid = s["pid"].as_i64().context("pid")? as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = up.service("web")?;
        if s["restarts"] == 1 && s["state"] == "awake" {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "not restarted: {s}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(http_get(web, "/ping")?, "PONG");
    let new_pid = up.service("web")?["pid"].as_i64().context("pid")? as i32;
    assert!(up.stop()?.success(), "graceful stop");
    assert!(
        !torpor_criu::procs::pid_in_use(new_pid),
        "service stopped with torpor up"
    );
    assert!(
        !torpor_criu::procs::pid_in_use(pid),
        "crashed service reaped"
    );
    let iptables_after = Command::new("iptables").arg("-S").output()?.stdout;
    assert_eq!(iptables_before, iptables_after, "no iptables rules left");
    Ok(())
}

/// A busybox OCI bundle serving `body` with httpd on the host's loopback at `addr`.
fn busybox_bundle(dir: &Path, addr: SocketAddr, body: &str) -> Result<std::path::PathBuf> {
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "www", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .context("/bin/busybox (busybox-static, installed by the README's test command)")?;
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/httpd"))?;
    std::fs::write(rootfs.join("www/index.html"), body)?;
    let out = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "runc spec: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] =
        serde_json::json!(["/bin/httpd", "-f", "-p", addr.to_string(), "-h", "/www"]);
    spec["root"]["readonly"] = false.into();
    // The host's network namespace, so the gate reaches it on loopback.
    let ns = spec["linux"]["namespaces"]
        .as_array()
        .context("namespaces")?
        .clone();
    spec["linux"]["namespaces"] = ns.into_iter().filter(|n| n["type"] != "network").collect();
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(bundle)
}

/// The container of `bundle` as the service `name`, its gate on `port`, sleeping after 200 ms.
fn container(name: &str, bundle: PathBuf, port: SocketAddr, backend: SocketAddr) -> Service {
    Service {
        command: None,
        bundle: Some(bundle),
        ..Service::new::<&str>(name, &[], port, backend).idle("200ms")
    }
}

#[test]
fn an_oci_container_sleeps_and_wakes_like_a_process() -> Result<()> {
    let _g = serial();
    let dir = tempfile::tempdir()?;
    let (port, backend) = (own_addr(), own_addr());
    let bundle = busybox_bundle(dir.path(), backend, "hello from a container\n")?;
    let mut up = Up::launch(embedded().services([container("box", bundle, port, backend)]))?;
    for _ in 0..2 {
        up.wait_state("box", "asleep", Duration::from_secs(30))?;
        let body = http_get(port, "/index.html").with_context(|| up.log_text())?;
        assert_eq!(body, "hello from a container\n");
    }
    let s = up.service("box")?;
    assert!(s["sleeps"].as_u64() >= Some(2), "{s}");
    assert!(s["wakes"].as_u64() >= Some(2), "{s}\n{}", up.log_text());
    assert_eq!(s["cold_starts"], 0, "{s}\n{}", up.log_text());
    assert!(up.stop()?.success());
    let list = Command::new("runc").arg("list").output()?;
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains("torpor-box"),
        "container removed"
    );
    Ok(())
}

#[test]
fn a_container_whose_checkpoint_the_pool_refuses_is_resumed_and_keeps_serving() -> Result<()> {
    let _g = serial();
    let dir = tempfile::tempdir()?;
    let (port, backend) = (own_addr(), own_addr());
    let bundle = busybox_bundle(dir.path(), backend, "still here\n")?;
    // Far too small for the container's images: the upload is refused after the dump, while
    // the container is paused.
    let mut up = Up::launch(
        Config::embedded("64KiB").services([container("boxfull", bundle, port, backend)]),
    )?;
    up.wait_for(
        "boxfull",
        "awake after a refused checkpoint",
        Duration::from_secs(30),
        |s| s["failed_checkpoints"].as_u64() >= Some(1) && s["state"] == "awake",
    )?;
    // Not left frozen: it answers at once (through the gate and directly).
    let body = http_get(backend, "/index.html").with_context(|| up.log_text())?;
    assert_eq!(body, "still here\n");
    let state = Command::new("runc")
        .args(["state", "torpor-boxfull"])
        .output()?;
    let state = String::from_utf8_lossy(&state.stdout);
    assert!(state.contains("\"running\""), "{state}");
    assert!(up.stop()?.success());
    Ok(())
}

#[test]
fn regular_arrivals_are_prewarmed_so_requests_find_the_service_awake() -> Result<()> {
    let _g = serial();
    let web = own_addr();
    let up =
        Up::launch(embedded().services([sample_http("tick", web, own_addr(), "16MiB", "200ms")]))?;
    let period = Duration::from_millis(1500);
    let mut late = Vec::new();
    for i in 0..14 {
        let t0 = Instant::now();
        assert_eq!(http_get(web, "/ping")?, "PONG");
        let took = t0.elapsed();
        // Once eight gaps are known, the agent restores ahead of each next request.
        if i >= 10 {
            late.push(took);
        }
        std::thread::sleep(period.saturating_sub(took));
    }
    let s = up.service("tick")?;
    assert!(s["prewarms"].as_u64() >= Some(2), "{s}\n{}", up.log_text());
    assert!(
        s["sleeps"].as_u64() >= Some(10),
        "it still sleeps between requests: {s}"
    );
    let awake = late
        .iter()
        .filter(|t| **t < Duration::from_millis(30))
        .count();
    assert!(
        awake >= 3,
        "pre-warmed requests answered at once: {late:?}\n{}",
        up.log_text()
    );
    Ok(())
}

/// A fake sysfs/cgroup/dev tree shaped like this machine's CPUs, for the power knobs.
fn fake_knob_tree(root: &Path) -> Result<usize> {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
    let cpus = torpor_power::cpulist::parse(&online).map_err(anyhow::Error::msg)?;
    let put = |p: std::path::PathBuf, v: &str| -> Result<()> {
        std::fs::create_dir_all(p.parent().unwrap())?;
        Ok(std::fs::write(p, v)?)
    };
    let cpu_dir = root.join("sys/devices/system/cpu");
    put(cpu_dir.join("online"), &online)?;
    for cpu in &cpus {
        put(cpu_dir.join(format!("cpu{cpu}/online")), "1\n")?;
        for state in 0..2 {
            put(
                cpu_dir.join(format!("cpu{cpu}/cpuidle/state{state}/disable")),
                "0\n",
            )?;
        }
    }
    put(root.join("cgroup/cpuset/cpuset.cpus"), &online)?;
    put(root.join("cgroup/cpuset/cpuset.mems"), "0\n")?;
    put(root.join("cgroup/cpuset/cgroup.procs"), "")?;
    put(root.join("dev/cpu_dma_latency"), "")?;
    Ok(cpus.len())
}

fn real_idle_knobs() -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/devices/system/cpu")
        .unwrap()
        .flatten()
    {
        for s in 0..4 {
            let p = e.path().join(format!("cpuidle/state{s}/disable"));
            if let Ok(v) = std::fs::read_to_string(&p) {
                out.push(format!("{}={}", p.display(), v.trim()));
            }
        }
    }
    out.sort();
    out
}

/// `[power]` with every knob on, turned in the fake tree at `root`; node hooks log to
/// `root/hooks.log`.
fn knob_config(root: &Path) -> Power {
    let hooks = root.join("hooks.log").display().to_string();
    let hook = |word: &str| -> Vec<String> {
        ["sh", "-c", &format!("echo {word} >> {hooks}")]
            .map(String::from)
            .to_vec()
    };
    Power {
        profile: Some(quick_suspend_profile(root, 0.05).expect("profile written")),
        knob_root: Some(root.to_path_buf()),
        journal: Some(root.join("run/knobs.json")),
        consolidate: true,
        deep_idle: true,
        offline_idle_cores: true,
        wake_latency_us: Some(0),
        dry_run: false,
        node_sleep: Some(NodeSleep {
            sleep: hook("sleep"),
            wake: hook("wake"),
            after: "300ms".into(),
        }),
    }
}

/// Waits until `up`'s service "web" is asleep and the node sleep hook has run.
fn wait_node_asleep(up: &Up, hooks: &Path) -> Result<()> {
    up.wait_state("web", "asleep", Duration::from_secs(15))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(hooks)
        .unwrap_or_default()
        .contains("sleep")
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "node sleep hook never ran:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn power_knobs_follow_sleep_and_wake_and_are_undone_at_stop() -> Result<()> {
    let _g = serial();
    let real_before = real_idle_knobs();
    let tree = tempfile::tempdir()?;
    let ncpus = fake_knob_tree(tree.path())?;
    let hooks = tree.path().join("hooks.log");
    let journal = tree.path().join("run/knobs.json");
    let power = knob_config(tree.path());
    let web = own_addr();
    let mut up = Up::launch(
        Config {
            power: Some(power),
            ..embedded()
        }
        .services([sample_http("web", web, own_addr(), "8MiB", "200ms")]),
    )?;
    wait_node_asleep(&up, &hooks)?;
    let fake = |p: &str| {
        std::fs::read_to_string(tree.path().join(p))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    if ncpus > 1 {
        let last = ncpus - 1;
        assert_eq!(
            fake(&format!(
                "sys/devices/system/cpu/cpu{last}/cpuidle/state0/disable"
            )),
            "1",
            "free core: shallow state off"
        );
        assert_eq!(
            fake(&format!(
                "sys/devices/system/cpu/cpu{last}/cpuidle/state1/disable"
            )),
            "0",
            "deepest state kept"
        );
        assert_eq!(
            fake(&format!("sys/devices/system/cpu/cpu{last}/online")),
            "0",
            "free core offline"
        );
    }
    let doc: serde_json::Value = serde_json::from_str(&http_get(up.status, "/status")?)?;
    assert!(
        !doc["knobs"].as_array().context("knobs")?.is_empty(),
        "{doc}"
    );
    assert_eq!(
        doc["energy"]["label"], "modelled (profile icx-2s-quick-suspend)",
        "{doc}"
    );
    assert!(
        doc["energy"]["seconds"].as_f64().unwrap_or(0.0) > 0.0,
        "{doc}"
    );

    // A request wakes the node (wake hook), holds PM QoS, and the service comes back pinned.
    assert_eq!(http_get(web, "/ping")?, "PONG");
    assert_eq!(std::fs::read_to_string(&hooks)?.trim(), "sleep\nwake");
    assert_eq!(
        std::fs::read(tree.path().join("dev/cpu_dma_latency"))?,
        0i32.to_ne_bytes()
    );
    let s = up.wait_state("web", "awake", Duration::from_secs(5))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake("cgroup/cpuset/torpor/web/cpuset.cpus") != "0" {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not consolidated:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s["pid"].as_i64().is_some());
    let text = up.status_text()?;
    assert!(
        text.contains("energy:") && text.contains("modelled (profile icx-2s-quick-suspend)"),
        "{text}"
    );
    let metrics = http_get(up.status, "/metrics")?;
    assert!(metrics.contains("torpor_node_energy_joules_total{kind=\"counterfactual\",source=\"modelled\",profile=\"icx-2s-quick-suspend\"}"), "{metrics}");

    assert!(up.stop()?.success());
    assert!(!journal.exists(), "every knob put back:\n{}", up.log_text());
    for cpu in 0..ncpus {
        assert_eq!(
            fake(&format!(
                "sys/devices/system/cpu/cpu{cpu}/cpuidle/state0/disable"
            )),
            "0"
        );
        assert_eq!(
            fake(&format!("sys/devices/system/cpu/cpu{cpu}/online")),
            "1"
        );
    }
    assert!(!tree.path().join("cgroup/cpuset/torpor").exists());
    assert_eq!(
        real_idle_knobs(),
        real_before,
        "the real knobs were never touched"
    );
    Ok(())
}

#[test]
fn a_service_added_while_the_node_sleeps_wakes_the_node_first() -> Result<()> {
    let _g = serial();
    let tree = tempfile::tempdir()?;
    fake_knob_tree(tree.path())?;
    let hooks = tree.path().join("hooks.log");
    let web = sample_http("web", own_addr(), own_addr(), "8MiB", "200ms");
    let mut up = Up::launch(
        Config {
            power: Some(knob_config(tree.path())),
            ..embedded()
        }
        .services([web.clone()]),
    )?;
    wait_node_asleep(&up, &hooks)?;
    // A reload adds a service, started from its command: the node must be up for it.
    let api_addr = own_addr();
    let api = sample_http("api", api_addr, own_addr(), "8MiB", "1h");
    up.rewrite(&Config {
        services: vec![web, api],
        ..up.config().clone()
    })?;
    let (st, out, err) = up.command(&["reload"])?;
    anyhow::ensure!(st.success(), "reload: {out}{err}\n{}", up.log_text());
    assert_eq!(
        std::fs::read_to_string(&hooks)?.trim(),
        "sleep\nwake",
        "{}",
        up.log_text()
    );
    assert_eq!(http_get(api_addr, "/ping")?, "PONG");
    // With a service awake, the node does not go back to sleep: three energy ticks later
    // (each one a node sleep check, well past `after`) the hooks log is the same.
    let energy_s = |up: &Up| -> Result<f64> {
        let doc: serde_json::Value = serde_json::from_str(&http_get(up.status, "/status")?)?;
        doc["energy"]["seconds"].as_f64().context("energy seconds")
    };
    let (from, deadline) = (energy_s(&up)?, Instant::now() + Duration::from_secs(30));
    while energy_s(&up)? < from + 3.0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no energy ticks:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        std::fs::read_to_string(&hooks)?.trim(),
        "sleep\nwake",
        "{}",
        up.log_text()
    );
    assert!(up.stop()?.success());
    Ok(())
}

#[test]
fn a_second_torpor_in_the_same_namespace_leaves_the_first_ones_services_alone() -> Result<()> {
    let _g = serial();
    let ns = format!("twin{}", std::process::id());
    let web = own_addr();
    let mut first = Up::launch(embedded().namespace(&ns).services([sample_http(
        "web",
        web,
        own_addr(),
        "8MiB",
        "1h",
    )]))?;
    // The same service name in the same namespace: the same cgroup, which is not a leftover.
    let mut second = Up::spawn(
        &embedded()
            .namespace(&ns)
            .status(own_addr())
            .services([sample_http("web", own_addr(), own_addr(), "8MiB", "1h")]),
    )?;
    let st = second.wait_exit(Duration::from_secs(60))?;
    let log = second.log_text();
    assert!(!st.success(), "{log}");
    assert!(
        log.contains("another torpor that runs now")
            && log.contains(&format!("(pid {})", first.pid()?)),
        "{log}"
    );
    assert_eq!(http_get(web, "/ping")?, "PONG", "{}", first.log_text());
    assert!(first.stop()?.success());
    Ok(())
}

#[test]
fn knobs_left_by_a_killed_agent_are_undone_at_the_next_start() -> Result<()> {
    let _g = serial();
    let tree = tempfile::tempdir()?;
    let ncpus = fake_knob_tree(tree.path())?;
    let hooks = tree.path().join("hooks.log");
    let journal = tree.path().join("run/knobs.json");
    let config = Config {
        power: Some(knob_config(tree.path())),
        ..embedded()
    };
    let web = own_addr();
    let mut up = Up::launch(config.clone().services([sample_http(
        "web",
        web,
        own_addr(),
        "8MiB",
        "200ms",
    )]))?;
    wait_node_asleep(&up, &hooks)?;
    // The agent dies without cleaning up: the journal keeps what it changed.
    up.signal_and_wait(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(60))?;
    assert!(journal.exists(), "changes journaled");
    // The next start puts everything back first (the wake hook runs), then plans afresh.
    let mut again =
        Up::launch(config.services([sample_http("web", web, own_addr(), "8MiB", "1h")]))?;
    assert_eq!(std::fs::read_to_string(&hooks)?.trim(), "sleep\nwake");
    assert!(
        again
            .log_text()
            .contains("undid a change left by a previous run"),
        "{}",
        again.log_text()
    );
    assert!(again.stop()?.success());
    assert!(!journal.exists());
    for cpu in 0..ncpus {
        let p = tree.path().join(format!(
            "sys/devices/system/cpu/cpu{cpu}/cpuidle/state0/disable"
        ));
        assert_eq!(std::fs::read_to_string(p)?.trim(), "0");
    }
    assert!(!tree.path().join("cgroup/cpuset/torpor").exists());
    Ok(())
}
