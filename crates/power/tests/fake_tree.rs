//! On a fake host tree: telemetry (cpuidle, /proc/stat, RAPL with wrap-around; and, read only,
//! this machine's real cpuidle tree) and every knob applied, undone, and recovered after a crash.
//! The knob journal is undone as root, so it is trusted no further than the knobs go: entries
//! outside the knob roots are not undone, the wake hook comes from the config, the file and its
//! directory must be ours and private, and it is replaced safely (no symlink followed, a crash
//! leaves the old or the new journal).

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
    let (k, undone) = Knobs::open(
        KnobRoots::under(host.root()),
        &journal(host),
        dry_run,
        Some(&hook(host, "wake")),
    )
    .unwrap();
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

/// A unified-only host with the cpuset controller available and service "web"'s own cgroup
/// holding process 4242: (host, its cgroup root, web's cgroup).
fn unified_host_with_web() -> (FakeHost, std::path::PathBuf, std::path::PathBuf) {
    let host = FakeHost::new(2);
    let cg = host.cgroup();
    write(&cg.join("cgroup.controllers"), "cpuset cpu memory\n");
    let own = cg.join("torpor-services/web");
    write(&own.join("cgroup.procs"), "4242\n");
    (host, cg, own)
}

#[test]
fn cgroup_v2_limits_a_service_in_its_own_cgroup_and_lifts_it_again() {
    let (host, cg, own) = unified_host_with_web();
    write(&cg.join("cgroup.subtree_control"), "memory\n");
    let mut k = knobs(&host, false);
    assert!(k.cpusets_unified());
    k.cpuset_in_place(&own, &[1].into()).unwrap();
    assert_eq!(read(&cg.join("cgroup.subtree_control")), "+cpuset");
    assert_eq!(
        read(&cg.join("torpor-services/cgroup.subtree_control")),
        "+cpuset"
    );
    assert_eq!(read(&own.join("cpuset.cpus")), "1");
    assert_eq!(read(&own.join("cgroup.procs")), "4242", "nothing moved");
    assert!(!cg.join("torpor").exists(), "no cgroup of torpor's own");
    // The kernel shows an enabled controller by its name.
    write(&cg.join("cgroup.subtree_control"), "cpuset memory\n");
    write(
        &cg.join("torpor-services/cgroup.subtree_control"),
        "cpuset\n",
    );
    k.cpuset_in_place(&own, &[0, 1].into()).unwrap();
    assert_eq!(read(&own.join("cpuset.cpus")), "0-1");
    assert_eq!(k.changes().len(), 2, "each controller journaled once");
    // Lifted before a start or restore there: the parent's cores.
    k.lift_cpuset_in_place(&own).unwrap();
    assert_eq!(read(&own.join("cpuset.cpus")), "");
    k.undo_all().unwrap();
    assert_eq!(
        read(&cg.join("torpor-services/cgroup.subtree_control")),
        "-cpuset"
    );
    assert_eq!(read(&cg.join("cgroup.subtree_control")), "-cpuset");
    assert_eq!(read(&own.join("cgroup.procs")), "4242");
}

#[test]
fn only_a_service_cgroup_of_a_unified_hierarchy_is_limited_in_place() {
    let host = FakeHost::new(2);
    // Legacy cpusets (no cgroup.controllers at the root): processes are moved instead.
    let v1_own = host.cgroup().join("unified/torpor-services/web");
    std::fs::create_dir_all(&v1_own).unwrap();
    let mut k = knobs(&host, false);
    assert!(!k.cpusets_unified());
    let e = k.cpuset_in_place(&v1_own, &[1].into()).unwrap_err();
    assert!(e.to_string().contains("unified"), "{e}");
    write(&host.cgroup().join("cgroup.controllers"), "cpuset\n");
    assert!(k.cpusets_unified());
    let own = host.cgroup().join("torpor-services/web");
    std::fs::create_dir_all(&own).unwrap();
    let elsewhere = host.cgroup().join("system.slice/web");
    std::fs::create_dir_all(&elsewhere).unwrap();
    for (cgroup, cpus, why) in [
        (&own, vec![], "no CPU"),
        (&host.cgroup(), vec![1], "torpor-services"),
        (
            &host.cgroup().join("torpor-services"),
            vec![1],
            "torpor-services",
        ),
        (&elsewhere, vec![1], "torpor-services"),
        (
            &host.cgroup().join("torpor-services/gone"),
            vec![1],
            "torpor-services",
        ),
    ] {
        let e = k
            .cpuset_in_place(cgroup, &cpus.into_iter().collect())
            .unwrap_err();
        assert!(e.to_string().contains(why), "{}: {e}", cgroup.display());
    }
    assert!(k.changes().is_empty(), "refused before anything is written");
    assert!(!elsewhere.join("cpuset.cpus").exists());
    // Lifting where nothing was set writes nothing.
    k.lift_cpuset_in_place(&own).unwrap();
    assert!(!own.join("cpuset.cpus").exists());
}

#[test]
fn a_controller_the_kernel_refuses_leaves_no_journal_entry() {
    let (host, cg, own) = unified_host_with_web();
    // A directory where the attribute is: every write to it fails.
    std::fs::create_dir_all(cg.join("torpor-services/cgroup.subtree_control")).unwrap();
    let mut k = knobs(&host, false);
    for _ in 0..3 {
        k.cpuset_in_place(&own, &[1].into()).unwrap_err();
        // As the kernel shows the root's, enabled at the first try.
        write(&cg.join("cgroup.subtree_control"), "cpuset\n");
    }
    assert_eq!(
        k.changes().len(),
        1,
        "the root's, once; none for the refused one"
    );
    assert!(!own.join("cpuset.cpus").exists());
}

#[test]
fn a_journaled_controller_whose_cgroup_is_gone_is_undone_as_nothing() {
    let (host, cg, own) = unified_host_with_web();
    let mut k = knobs(&host, false);
    k.cpuset_in_place(&own, &[1].into()).unwrap();
    std::fs::remove_dir_all(cg.join("torpor-services")).unwrap();
    k.undo_all().unwrap();
    assert!(k.changes().is_empty());
    assert!(!cg.join("torpor-services").exists(), "not made again");
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
    k.node_sleep(&hook(&host, "sleep")).unwrap();
    assert!(k.node_wake().unwrap());
    assert!(!k.node_wake().unwrap(), "wake runs once");
    assert_eq!(read(&host.root().join("hooks.log")), "sleep\nwake");
    let e = k.node_sleep(&["false".into()]).unwrap_err();
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
        k.node_sleep(&hook(&host, "sleep")).unwrap();
        // The agent dies here: no undo.
    }
    let (k, undone) = Knobs::open(
        KnobRoots::under(host.root()),
        &journal(&host),
        false,
        Some(&hook(&host, "wake")),
    )
    .unwrap();
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
    k.node_sleep(&hook(&host, "sleep")).unwrap();
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

// ---- the journal's trust ----

use std::{
    os::unix::fs::{symlink, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Instant,
};

use torpor_power::knobs::{Change, Journal, JournalError, KnobError};

fn journal_path(host: &FakeHost) -> PathBuf {
    host.root().join("run/torpor/knobs.json")
}

/// Writes a journal holding `changes` (oldest first), as a crashed agent would leave it.
fn leave_journal(host: &FakeHost, changes: &[Change]) {
    let (mut j, _) = Journal::open(&journal_path(host)).unwrap();
    for c in changes {
        j.push(c.clone()).unwrap();
    }
}

fn open(host: &FakeHost, wake: Option<&[String]>) -> Result<(Knobs, Vec<String>), KnobError> {
    Knobs::open(
        KnobRoots::under(host.root()),
        &journal_path(host),
        false,
        wake,
    )
}

#[test]
fn a_journal_entry_outside_the_knob_roots_is_not_written() {
    let host = FakeHost::new(2);
    write(&host.cgroup().join("cgroup.procs"), "");
    let victim = host.root().join("etc/victim");
    write(&victim, "precious\n");
    let keep = host.root().join("data/keep");
    write(&keep.join("file"), "kept\n");
    // cpu1's online attribute replaced by a symlink to the victim.
    let online = host.cpu_dir().join("cpu1/online");
    std::fs::remove_file(&online).unwrap();
    symlink(&victim, &online).unwrap();
    // One honest entry, to show the journal is still undone.
    let honest = host.cpu_dir().join("cpu1/cpuidle/state0/disable");
    write(&honest, "1\n");
    let file = |path: PathBuf| Change::File {
        path,
        original: "pwned".into(),
    };
    leave_journal(
        &host,
        &[
            Change::File {
                path: honest.clone(),
                original: "0".into(),
            },
            file(victim.clone()),
            file(host.cpu_dir().join("cpu1/../../../../../etc/victim")),
            file(online.clone()),
            // Inside the CPU tree but not an attribute the knobs write.
            file(host.cpu_dir().join("cpu1/cpuidle/state0/name")),
            Change::CreatedCgroup {
                path: keep.clone(),
                parent_procs: victim.clone(),
            },
            Change::CreatedCgroup {
                path: host.cgroup().join("torpor/../../data/keep"),
                parent_procs: host.cgroup().join("cgroup.procs"),
            },
            Change::Controller {
                subtree_control: victim.clone(),
                controller: "cpuset".into(),
            },
            // Under the cgroup root, but not a subtree_control, or not the cpuset controller.
            Change::Controller {
                subtree_control: host.cgroup().join("torpor-services/cgroup.procs"),
                controller: "cpuset".into(),
            },
            Change::Controller {
                subtree_control: host.cgroup().join("cgroup.subtree_control"),
                controller: "memory".into(),
            },
        ],
    );
    let (k, undone) = open(&host, None).unwrap();
    assert_eq!(undone.len(), 1, "only the honest entry: {undone:?}");
    assert_eq!(read(&honest), "0");
    assert_eq!(read(&victim), "precious");
    assert_eq!(read(&keep.join("file")), "kept");
    assert!(
        k.changes().is_empty(),
        "refused entries are dropped, not retried"
    );
    assert!(!journal_path(&host).exists());
}

#[test]
fn a_wake_command_in_the_journal_is_not_executed() {
    let host = FakeHost::new(1);
    let marker = host.root().join("pwned");
    let planted = Change::NodeAsleep {
        wake_command: vec![
            "sh".into(),
            "-c".into(),
            format!("touch {}", marker.display()),
        ],
    };
    // With a wake hook configured, that one runs instead.
    leave_journal(&host, std::slice::from_ref(&planted));
    let (_, undone) = open(&host, Some(&hook(&host, "wake"))).unwrap();
    assert_eq!(undone.len(), 1);
    assert!(!marker.exists(), "the journal's command ran");
    assert_eq!(read(&host.root().join("hooks.log")), "wake");
    // With none configured, nothing runs and the entry is still dropped.
    leave_journal(&host, &[planted]);
    let (k, _) = open(&host, None).unwrap();
    assert!(!marker.exists(), "the journal's command ran");
    assert_eq!(read(&host.root().join("hooks.log")), "wake");
    assert!(k.changes().is_empty());
}

#[test]
fn a_symlink_planted_at_the_temp_name_is_not_followed() {
    let host = FakeHost::new(1);
    let victim = host.root().join("etc/victim");
    write(&victim, "precious\n");
    let path = journal_path(&host);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // The fixed temp names an older torpor used, and the prefix of the current ones.
    for name in ["knobs.tmp", "knobs.json.tmp", ".knobs.json.tmp"] {
        symlink(&victim, path.with_file_name(name)).unwrap();
    }
    let (mut j, _) = Journal::open(&path).unwrap();
    j.push(Change::File {
        path: host.cpu_dir().join("cpu0/cpuidle/state0/disable"),
        original: "0".into(),
    })
    .unwrap();
    assert_eq!(read(&victim), "precious");
    let m = std::fs::symlink_metadata(&path).unwrap();
    assert!(m.is_file(), "the journal is a file of its own");
    assert_eq!(m.mode() & 0o777, 0o600);
    for name in ["knobs.tmp", "knobs.json.tmp", ".knobs.json.tmp"] {
        let p = path.with_file_name(name);
        assert!(std::fs::symlink_metadata(&p).unwrap().is_symlink(), "{p:?}");
    }
    // A symlink at the journal's own name is refused, not read through.
    std::fs::rename(&path, host.root().join("elsewhere.json")).unwrap();
    symlink(host.root().join("elsewhere.json"), &path).unwrap();
    assert!(matches!(Journal::open(&path), Err(JournalError::Read(..))));
}

/// What the journal's refusal says (`open` failing otherwise is a test failure).
fn refusal(r: Result<(Knobs, Vec<String>), KnobError>) -> String {
    match r {
        Err(KnobError::Journal(e @ JournalError::Unsafe { .. })) => e.to_string(),
        other => panic!("not refused as unsafe: {:?}", other.map(|(_, u)| u)),
    }
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_world_writable_journal_dir_is_refused() {
    let host = FakeHost::new(1);
    let path = journal_path(&host);
    let dir = path.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    set_mode(dir, 0o777);
    let e = refusal(open(&host, None));
    assert!(e.contains("writable by group or others"), "{e}");
    // Nor is a journal file others may write, in a private directory.
    set_mode(dir, 0o700);
    leave_journal(
        &host,
        &[Change::NodeAsleep {
            wake_command: vec![],
        }],
    );
    set_mode(&path, 0o666);
    let e = refusal(open(&host, None));
    assert!(e.contains("writable by group or others"), "{e}");
}

#[test]
fn a_journal_owned_by_another_uid_is_refused() {
    let host = FakeHost::new(1);
    let path = journal_path(&host);
    leave_journal(
        &host,
        &[Change::NodeAsleep {
            wake_command: vec![],
        }],
    );
    let nobody = Some(nix::unistd::Uid::from_raw(65534));
    nix::unistd::chown(&path, nobody, None).unwrap();
    let e = refusal(open(&host, None));
    assert!(e.contains("owned by uid 65534"), "{e}");
    nix::unistd::chown(&path, Some(nix::unistd::geteuid()), None).unwrap();
    open(&host, None).expect("ours again");
    // The directory counts too: whoever owns it can swap the journal.
    nix::unistd::chown(path.parent().unwrap(), nobody, None).unwrap();
    let e = refusal(open(&host, None));
    assert!(e.contains("owned by uid 65534"), "{e}");
}

/// Set in the child the crash test starts: that process rewrites the journal until killed.
const CHILD: &str = "TORPOR_JOURNAL_CRASH_CHILD";

#[test]
fn a_crash_between_write_and_rename_leaves_the_old_journal_valid() {
    let change = |n: u64| Change::File {
        path: format!("/sys/devices/system/cpu/cpu{n}/online").into(),
        original: "1".repeat(1 + (n % 4096) as usize),
    };
    if let Some(path) = std::env::var_os(CHILD) {
        // The child: the journal always holds one or two changes, rewritten as fast as it can.
        let (mut j, _) = Journal::open(Path::new(&path)).unwrap();
        for n in 0.. {
            j.push(change(n)).unwrap();
            if n > 0 {
                j.remove(&change(n - 1)).unwrap();
            }
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("knobs.json");
    for round in 0..12u64 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_crash_between_write_and_rename_leaves_the_old_journal_valid",
                "--nocapture",
            ])
            .env(CHILD, &path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !path.exists() {
            assert!(Instant::now() < deadline, "the child never wrote a journal");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Killed at a different point of its write-fsync-rename cycle each round.
        std::thread::sleep(Duration::from_micros(round * 1_700 % 9_000));
        child.kill().unwrap();
        child.wait().unwrap();
        let (j, leftover) = Journal::open(&path).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            (1..=2).contains(&leftover.len()),
            "round {round}: {leftover:?}"
        );
        let temps: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "knobs.json")
            .collect();
        assert!(temps.is_empty(), "stale temp files left: {temps:?}");
        drop(j);
        std::fs::remove_file(&path).unwrap();
    }
}
