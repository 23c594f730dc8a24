//! On a fake host tree: telemetry (cpuidle, /proc/stat, RAPL with wrap-around; and, read only,
//! this machine's real cpuidle tree) and every knob applied, undone, and recovered after a crash.

mod common;

use std::time::Duration;

use common::{read, write, FakeHost};
use torpor_power::{IntervalReport, PowerSource, Profile, Sample};

fn two_samples(host: &FakeHost, change: impl FnOnce(&FakeHost)) -> (Sample, Sample) {
    let a = Sample::take(&host.roots()).unwrap();
    change(host);
    let mut b = Sample::take(&host.roots()).unwrap();
    b.at = a.at + Duration::from_secs(1);
    (a, b)
}

#[test]
fn residency_entries_and_busy_from_a_fake_tree() {
    let host = FakeHost::new(2);
    let (a, b) = two_samples(&host, |h| {
        h.set_stat(&[(25, 75), (0, 100)]);
        // cpu0: 0.75 s idle: 0.05 s in POLL over 500 stays, 0.7 s in C6 over 70 stays.
        h.set_state(0, 0, 50_000, 500);
        h.set_state(0, 2, 700_000, 70);
        h.set_state(1, 1, 1_000_000, 10);
    });
    let r = IntervalReport::between(&a, &b, &Profile::resolve("icx-2s").unwrap());
    assert_eq!(r.cpus.len(), 2);
    let c0 = &r.cpus[0];
    assert!((c0.busy_pct - 25.0).abs() < 1e-9);
    assert_eq!(c0.states[0].name, "POLL");
    assert!((c0.states[0].residency_pct - 5.0).abs() < 1e-9);
    assert!((c0.states[0].entries_per_s - 500.0).abs() < 1e-9);
    assert!((c0.states[0].mean_idle_us.unwrap() - 100.0).abs() < 1e-9);
    assert!((c0.states[2].residency_pct - 70.0).abs() < 1e-9);
    assert!((c0.mean_idle_us.unwrap() - 750_000.0 / 570.0).abs() < 1e-6);
    // All-CPU row: mean residency, total entries.
    assert!((r.total.busy_pct - 12.5).abs() < 1e-9);
    assert!((r.total.states[1].residency_pct - 50.0).abs() < 1e-9);
    assert!((r.total.states[0].entries_per_s - 500.0).abs() < 1e-9);
    // No RAPL: modelled, with the profile named.
    assert_eq!(
        r.power.source,
        PowerSource::Modelled {
            profile: "icx-2s".into()
        }
    );
    assert_eq!(r.power.label, "modelled (profile icx-2s)");
    assert!(r.power.package_w > 0.0);
}

#[test]
fn rapl_power_is_measured_and_survives_the_wrap() {
    let host = FakeHost::new(1);
    let max = 262_143_328_850;
    host.add_rapl_zone("intel-rapl:0", "package-0", max - 30_000_000, max);
    host.add_rapl_zone("intel-rapl:0:0", "dram", 5_000_000, max);
    host.add_rapl_zone("intel-rapl-mmio:0", "package-0", 0, max);
    let (a, b) = two_samples(&host, |h| {
        // 80 J over the second, 30 J of it before the wrap.
        h.add_rapl_zone("intel-rapl:0", "package-0", 50_000_000, max);
        h.add_rapl_zone("intel-rapl:0:0", "dram", 12_000_000, max);
        h.add_rapl_zone("intel-rapl-mmio:0", "package-0", 80_000_000, max);
    });
    let r = IntervalReport::between(&a, &b, &Profile::resolve("generic").unwrap());
    assert_eq!(r.power.source, PowerSource::Measured);
    assert!((r.power.package_w - 80.0).abs() < 1e-9, "{:?}", r.power);
    assert!((r.power.dram_w.unwrap() - 7.0).abs() < 1e-9);
    assert_eq!(r.power.zones.len(), 2, "the mmio twin is not counted");
}

#[test]
fn a_malformed_counter_names_its_file() {
    let host = FakeHost::new(1);
    write(&host.state_file(0, 1, "usage"), "lots\n");
    let e = Sample::take(&host.roots()).unwrap_err().to_string();
    assert!(e.contains("state1/usage") && e.contains("lots"), "{e}");
}

#[test]
fn this_machines_real_cpuidle_tree_read_only() {
    let roots = torpor_power::HostRoots::default();
    let Ok(a) = Sample::take(&roots) else {
        eprintln!("no readable cpuidle tree here; skipped");
        return;
    };
    std::thread::sleep(Duration::from_millis(200));
    let b = Sample::take(&roots).unwrap();
    let r = IntervalReport::between(&a, &b, &Profile::resolve("generic").unwrap());
    assert!(!r.cpus.is_empty());
    for cpu in &r.cpus {
        assert!((0.0..=100.0).contains(&cpu.busy_pct), "{cpu:?}");
        let idle: f64 = cpu.states.iter().map(|s| s.residency_pct).sum();
        // Kernel residency and /proc/stat ticks come from different clocks; roughly 100 %.
        assert!(idle <= 130.0, "{cpu:?}");
        assert!(
            !cpu.states.is_empty(),
            "this machine has cpuidle states: {cpu:?}"
        );
    }
}

// ---- knobs ----

use torpor_power::knobs::{KnobRoots, Knobs};

fn knobs(host: &FakeHost, dry_run: bool) -> Knobs {
    let (k, undone) = Knobs::open(KnobRoots::under(host.root()), &journal(host), dry_run).unwrap();
    assert!(undone.is_empty());
    k
}

fn journal(host: &FakeHost) -> std::path::PathBuf {
    host.root().join("run/torpor/knobs.json")
}

#[test]
fn deep_idle_only_disables_shallow_states_and_restores_them() {
    let host = FakeHost::new(2);
    let mut k = knobs(&host, false);
    k.deep_idle_only(1).unwrap();
    assert_eq!(read(&host.state_file(1, 0, "disable")), "1");
    assert_eq!(read(&host.state_file(1, 1, "disable")), "1");
    assert_eq!(
        read(&host.state_file(1, 2, "disable")),
        "0",
        "the deepest stays"
    );
    assert_eq!(
        read(&host.state_file(0, 0, "disable")),
        "0",
        "other CPUs untouched"
    );
    k.restore_idle_states(1).unwrap();
    for s in 0..3 {
        assert_eq!(read(&host.state_file(1, s, "disable")), "0");
    }
    assert!(!journal(&host).exists(), "nothing left to undo");
}

#[test]
fn a_state_disabled_before_torpor_stays_disabled() {
    let host = FakeHost::new(1);
    write(&host.state_file(0, 2, "disable"), "1\n");
    let mut k = knobs(&host, false);
    // C6 was off: the deepest enabled state is C1, so only POLL goes.
    k.deep_idle_only(0).unwrap();
    assert_eq!(read(&host.state_file(0, 0, "disable")), "1");
    assert_eq!(read(&host.state_file(0, 1, "disable")), "0");
    k.undo_all().unwrap();
    assert_eq!(read(&host.state_file(0, 0, "disable")), "0");
    assert_eq!(read(&host.state_file(0, 2, "disable")), "1");
}

#[test]
fn cpus_go_offline_and_back_but_cpu0_stays() {
    let host = FakeHost::new(4);
    let mut k = knobs(&host, false);
    k.take_offline(3).unwrap();
    assert_eq!(read(&host.cpu_dir().join("cpu3/online")), "0");
    assert!(k.take_offline(0).unwrap_err().to_string().contains("cpu0"));
    k.bring_online(3).unwrap();
    assert_eq!(read(&host.cpu_dir().join("cpu3/online")), "1");
}

#[test]
fn cgroup_v1_cpusets_are_made_and_removed() {
    let host = FakeHost::new(4);
    let cs = host.cgroup().join("cpuset");
    write(&cs.join("cpuset.cpus"), "0-3\n");
    write(&cs.join("cpuset.mems"), "0\n");
    write(&cs.join("cgroup.procs"), "");
    let mut k = knobs(&host, false);
    let dir = k.cpuset("svc", &[0, 1].into()).unwrap();
    assert_eq!(dir, cs.join("torpor/svc"));
    assert_eq!(read(&dir.join("cpuset.cpus")), "0-1");
    assert_eq!(read(&dir.join("cpuset.mems")), "0");
    k.attach("svc", &[4242]).unwrap();
    // Consolidation moves the service to one core.
    k.cpuset("svc", &[0].into()).unwrap();
    assert_eq!(read(&dir.join("cpuset.cpus")), "0");
    k.undo_all().unwrap();
    assert!(!cs.join("torpor").exists());
    assert_eq!(
        read(&cs.join("cgroup.procs")),
        "4242",
        "its process went back home"
    );
}

#[test]
fn cgroup_v2_enables_the_controller_and_disables_it_again() {
    let host = FakeHost::new(2);
    write(
        &host.cgroup().join("cgroup.controllers"),
        "cpuset cpu memory\n",
    );
    write(&host.cgroup().join("cgroup.subtree_control"), "memory\n");
    let mut k = knobs(&host, false);
    k.cpuset("svc", &[1].into()).unwrap();
    assert_eq!(
        read(&host.cgroup().join("cgroup.subtree_control")),
        "+cpuset"
    );
    assert_eq!(
        read(&host.cgroup().join("torpor/cgroup.subtree_control")),
        "+cpuset"
    );
    assert_eq!(read(&host.cgroup().join("torpor/svc/cpuset.cpus")), "1");
    k.undo_all().unwrap();
    assert_eq!(
        read(&host.cgroup().join("cgroup.subtree_control")),
        "-cpuset"
    );
    assert!(!host.cgroup().join("torpor").exists());
}

#[test]
fn pm_qos_request_is_written_and_released() {
    let host = FakeHost::new(1);
    let dev = host.root().join("dev/cpu_dma_latency");
    write(&dev, "");
    let mut k = knobs(&host, false);
    k.hold_latency(20).unwrap();
    assert!(k.holds_latency());
    assert_eq!(std::fs::read(&dev).unwrap(), 20i32.to_ne_bytes());
    k.release_latency();
    assert!(!k.holds_latency());
}

fn hook(host: &FakeHost, word: &str) -> Vec<String> {
    let log = host.root().join("hooks.log");
    vec![
        "sh".into(),
        "-c".into(),
        format!("echo {word} >> {}", log.display()),
    ]
}

#[test]
fn node_sleep_hooks_run_in_pairs_and_a_failed_one_is_not_journaled() {
    let host = FakeHost::new(1);
    let mut k = knobs(&host, false);
    k.node_sleep(&hook(&host, "sleep"), &hook(&host, "wake"))
        .unwrap();
    assert!(k.node_wake().unwrap());
    assert!(!k.node_wake().unwrap(), "wake runs once");
    assert_eq!(read(&host.root().join("hooks.log")), "sleep\nwake");
    let e = k
        .node_sleep(&["false".into()], &hook(&host, "never"))
        .unwrap_err();
    assert!(e.to_string().contains("false"), "{e}");
    assert!(k.changes().is_empty());
}

#[test]
fn a_crashed_agents_changes_are_undone_at_the_next_start() {
    let host = FakeHost::new(4);
    let cs = host.cgroup().join("cpuset");
    write(&cs.join("cpuset.cpus"), "0-3\n");
    write(&cs.join("cpuset.mems"), "0\n");
    {
        let mut k = knobs(&host, false);
        k.deep_idle_only(2).unwrap();
        k.take_offline(3).unwrap();
        k.cpuset("svc", &[0].into()).unwrap();
        k.node_sleep(&hook(&host, "sleep"), &hook(&host, "wake"))
            .unwrap();
        // The agent dies here: no undo.
    }
    let (k, undone) = Knobs::open(KnobRoots::under(host.root()), &journal(&host), false).unwrap();
    assert!(undone.len() >= 5, "{undone:?}");
    assert!(k.changes().is_empty());
    assert_eq!(read(&host.state_file(2, 0, "disable")), "0");
    assert_eq!(read(&host.cpu_dir().join("cpu3/online")), "1");
    assert!(!cs.join("torpor").exists());
    assert_eq!(read(&host.root().join("hooks.log")), "sleep\nwake");
    assert!(!journal(&host).exists());
}

#[test]
fn dry_run_changes_nothing() {
    let host = FakeHost::new(4);
    write(&host.root().join("dev/cpu_dma_latency"), "");
    let before = snapshot(host.root());
    let mut k = knobs(&host, true);
    k.deep_idle_only(1).unwrap();
    k.take_offline(2).unwrap();
    k.cpuset("svc", &[0].into()).unwrap();
    k.hold_latency(0).unwrap();
    k.node_sleep(&hook(&host, "sleep"), &hook(&host, "wake"))
        .unwrap();
    assert_eq!(snapshot(host.root()), before);
    assert!(!journal(&host).exists());
}

/// Every file under `dir` with its content.
fn snapshot(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}
