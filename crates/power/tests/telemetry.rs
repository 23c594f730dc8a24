//! Telemetry on a fake tree (cpuidle, /proc/stat, RAPL with wrap-around) and, read only, on this
//! machine's real one.

mod common;

use std::time::Duration;

use common::FakeHost;
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
    common::write(&host.state_file(0, 1, "usage"), "lots\n");
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
