//! The real `torpor` binary end to end: pool, checkpoint, snapshots, restore, doctor, and the
//! errors a user gets for bad input.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::Result;
use torpor_bench::harness::{kill_and_reap, PoolProcess, SampleProcess};
use torpor_testkit::{criu_guard, exe, serial};
use torpor_workload::SampleClient;

fn torpor(args: &[&str]) -> Output {
    Command::new(exe())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("torpor runs")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "torpor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("valid JSON on stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn checkpoint_list_restore_through_the_cli() -> Result<()> {
    let _g = criu_guard();
    let exe = exe();
    let pool = PoolProcess::spawn(exe, 128 << 20)?;
    let addr = pool.target.addr.to_string();
    let token = pool.token_file();
    let token = token.to_str().unwrap();
    let mut svc = SampleProcess::spawn(exe, 16 << 20, 11)?;
    let sum = SampleClient::connect(svc.addr)?.call("SUM")?;
    let pid = svc.pid.to_string();

    let ck = json(&torpor(&[
        "checkpoint",
        "--pid",
        &pid,
        "--name",
        "cli",
        "--pool",
        &addr,
        "--token-file",
        token,
        "--json",
    ]));
    svc.reap();
    assert_eq!(ck["generation"], 1);
    assert!(ck["pool_bytes"].as_u64().unwrap() >= 16 << 20);

    let list = json(&torpor(&[
        "snapshots",
        "--pool",
        &addr,
        "--token-file",
        token,
        "--json",
    ]));
    assert_eq!(list[0]["name"], "cli");
    assert_eq!(list[0]["tier"], "ram");
    let text = torpor(&["snapshots", "--pool", &addr, "--token-file", token]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("cli"));

    let rs = json(&torpor(&[
        "restore",
        "--name",
        "cli",
        "--pool",
        &addr,
        "--token-file",
        token,
        "--json",
    ]));
    let restored_pid = rs["pid"].as_i64().unwrap() as i32;
    let answer = SampleClient::connect_within(svc.addr, Duration::from_secs(5))
        .and_then(|mut c| c.call("SUM"));
    kill_and_reap(restored_pid);
    assert_eq!(answer?, sum);

    // Without the token the pool refuses, and the message says why.
    let bad = torpor(&["snapshots", "--pool", &addr]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("wrong token"), "{}", stderr(&bad));
    Ok(())
}

#[test]
fn bad_input_gets_a_clear_error() {
    let out = torpor(&["pool", "--listen", "127.0.0.1:0", "--capacity", "5parsecs"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown unit"), "{}", stderr(&out));

    let out = torpor(&["pool", "--listen", "localhost", "--capacity", "1MiB"]);
    assert!(
        stderr(&out).contains("neither HOST:PORT nor unix:PATH"),
        "{}",
        stderr(&out)
    );

    let out = torpor(&["pool", "--listen", "127.0.0.1:0", "--capacity", "1MiB"]);
    assert!(stderr(&out).contains("--token-file"), "{}", stderr(&out));

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let pool_with_token = || {
        torpor(&[
            "pool",
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            "1MiB",
            "--token-file",
            token.to_str().unwrap(),
        ])
    };
    torpor_pool::write_token_file(&token, "abc").unwrap();
    let out = pool_with_token();
    assert!(stderr(&out).contains("fewer than 16"), "{}", stderr(&out));
    // Readable by others (the umask's usual 0644): refused whatever its length.
    std::fs::write(&token, "a-long-enough-token-0123456789").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = pool_with_token();
    assert!(
        stderr(&out).contains("group or others can read"),
        "{}",
        stderr(&out)
    );

    let sock = format!("unix:{}", dir.path().join("none.sock").display());
    let out = torpor(&[
        "checkpoint",
        "--pid",
        "999999999",
        "--name",
        "x",
        "--pool",
        &sock,
    ]);
    assert!(
        stderr(&out).contains("process 999999999 does not exist"),
        "{}",
        stderr(&out)
    );

    let out = torpor(&["restore", "--name", "x", "--pool", &sock]);
    assert!(
        stderr(&out).contains("cannot connect to pool"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn doctor_reports_this_host() {
    let out = torpor(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "root",
        "criu",
        "criu check",
        "iptables",
        "runc",
        "criu kdat cache",
        "cgroups",
        "cpuidle",
        "rapl",
    ] {
        assert!(names.contains(&n), "doctor checks {n}");
    }
    // The test command installs everything required, so this host is fit.
    assert_eq!(v["fit"], true, "{v:#}");
    assert!(out.status.success());
}

#[test]
fn the_demo_sleeps_and_wakes_its_services_without_errors() {
    let _g = serial();
    let out = torpor(&[
        "demo",
        "--duration",
        "6s",
        "--state-memory",
        "64MiB",
        "--json",
    ]);
    let v = json(&out);
    assert_eq!(v["errors"], 0, "{v:#}");
    assert!(v["requests"].as_u64().unwrap() > 20, "{v:#}");
    assert!(v["wake_latency"]["count"].as_u64().unwrap() >= 1, "{v:#}");
    for s in v["services"].as_array().unwrap() {
        assert!(s["sleeps"].as_u64().unwrap() >= 1, "{s}");
    }
    let e = &v["energy"];
    assert_eq!(e["label"], "modelled (profile icx-2s)", "{e:#}");
    assert!(e["energy_j"].as_f64().unwrap() > 0.0, "{e:#}");
    // Whether six seconds of demo used less energy than always-on depends on what else the
    // host ran meanwhile (the model prices the whole machine's residency): that comparison
    // belongs to `bench scenario`, which runs its baselines in the same run. Here: the
    // account priced both sides.
    assert!(e["counterfactual_j"].as_f64().unwrap() > 0.0, "{e:#}");
    assert!(
        e["deep_idle_counterfactual_j"].as_f64().unwrap() > 0.0,
        "{e:#}"
    );
}

#[test]
fn power_once_reports_every_cpus_idle_states_read_only() {
    let v = json(&torpor(&[
        "power",
        "--once",
        "--interval",
        "200ms",
        "--json",
    ]));
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let n = torpor_power::cpulist::parse(&online).unwrap().len();
    let cpus = v["cpus"].as_array().unwrap();
    assert_eq!(cpus.len(), n, "{v:#}");
    for c in cpus {
        let names: Vec<String> =
            std::fs::read_dir(format!("/sys/devices/system/cpu/cpu{}/cpuidle", c["cpu"]))
                .map(|d| {
                    let mut v: Vec<_> = d
                        .flatten()
                        .filter_map(|e| std::fs::read_to_string(e.path().join("name")).ok())
                        .map(|n| n.trim().to_string())
                        .collect();
                    v.sort();
                    v
                })
                .unwrap_or_default();
        let mut reported: Vec<String> = c["states"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        reported.sort();
        assert_eq!(reported, names, "{c}");
        for s in c["states"].as_array().unwrap() {
            assert!(s["residency_pct"].as_f64().is_some() && s["entries_per_s"].as_f64().is_some());
        }
    }
    assert!(
        v["power"]["label"].as_str().unwrap().starts_with("m"),
        "{v:#}"
    );
}

/// A log in turbostat's format with a column set none of the shared logs has.
const UNSEEN_LOG: &str = "turbostat version 2024.05.10 - Len Brown\n\
CPUID(0): AuthenticAMD 0x10 CPUID levels\n\
usec\tTime_Of_Day_Seconds\tCore\tCPU\tAvg_MHz\tBusy%\tBzy_MHz\tIRQ\tPOLL\tC1\tC2\tPOLL%\tC1%\tC2%\tCPU%c1\tCPU%c6\tPkg%pc6\tCorWatt\tPkgWatt\tRAMWatt\n\
-\t1716000000.000001\t-\t-\t50\t2.00\t2500\t900\t1\t10\t80\t0.00\t1.00\t97.00\t1.50\t96.50\t10.00\t3.00\t40.00\t5.00\n\
12\t1716000000.000002\t0\t0\t90\t4.00\t2500\t500\t1\t5\t40\t0.00\t1.00\t95.00\t1.00\t95.00\t10.00\t2.00\t40.00\t5.00\n\
10\t1716000000.000003\t0\t1\t10\t0.00\t2500\t400\t0\t5\t40\t0.00\t1.00\t99.00\t2.00\t98.00\n\
usec\tTime_Of_Day_Seconds\tCore\tCPU\tAvg_MHz\tBusy%\tBzy_MHz\tIRQ\tPOLL\tC1\tC2\tPOLL%\tC1%\tC2%\tCPU%c1\tCPU%c6\tPkg%pc6\tCorWatt\tPkgWatt\tRAMWatt\n\
-\t1716000005.000001\t-\t-\t70\t4.00\t2500\t900\t1\t10\t80\t0.00\t1.00\t95.00\t2.50\t93.50\t20.00\t4.00\t60.00\t7.00\n\
12\t1716000005.000002\t0\t0\t90\t6.00\t2500\t500\t1\t5\t40\t0.00\t1.00\t93.00\t3.00\t91.00\t20.00\t3.00\t60.00\t7.00\n\
10\t1716000005.000003\t0\t1\t10\t2.00\t2500\t400\t0\t5\t40\t0.00\t1.00\t97.00\t2.00\t96.00\n\
10.001 sec\n";

#[test]
fn power_turbostat_gives_the_means_of_a_log_it_has_never_seen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("amd.log");
    std::fs::write(&path, UNSEEN_LOG).unwrap();
    let v = json(&torpor(&[
        "power",
        "turbostat",
        path.to_str().unwrap(),
        "--json",
    ]));
    let s = &v["summary"];
    assert_eq!(s["intervals"], 2, "{v:#}");
    let close = |k: &str, want: f64| {
        let got = s[k].as_f64().unwrap_or(f64::NAN);
        assert!((got - want).abs() < 1e-9, "{k}: {got} vs {want}");
    };
    close("busy_pct", 3.0);
    close("c6_pct", 95.0);
    close("pkg_pc6_pct", 15.0);
    close("pkg_watt", 50.0);
    close("ram_watt", 6.0);
    let cpu1 = &v["cpus"]["1"];
    assert!(
        (cpu1["Busy%"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "{v:#}"
    );
    assert!(cpu1.get("PkgWatt").is_none(), "{v:#}");

    // Text and a bad file.
    let out = torpor(&["power", "turbostat", path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("PkgWatt  50.00"));
    std::fs::write(&path, "no header here\n").unwrap();
    let out = torpor(&["power", "turbostat", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no column header line"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn power_calibrate_reports_the_fit_on_the_shared_logs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/turbostat");
    let mut args = vec!["power".to_string(), "calibrate".into(), "--json".into()];
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "the shared logs are read from ../shared/data beside the project ({}): {e}",
            dir.display()
        )
    });
    for e in entries.flatten() {
        args.push(e.path().display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = json(&torpor(&args));
    assert_eq!(v["fitted_error"]["rows"], 65, "{v:#}");
    assert!(
        v["fitted_error"]["mape_pct"].as_f64().unwrap() < 10.0,
        "{v:#}"
    );
    let out = torpor(&["power", "--profile", "no-such-profile", "--once"]);
    assert!(
        stderr(&out).contains("no built-in profile \"no-such-profile\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn loadgen_poisson_gaps_are_exponential_and_waiting_costs_no_cpu() {
    let exe = exe();
    let svc = SampleProcess::spawn(exe, 1 << 20, 1).expect("sample service");
    let url = format!("http://{}/ping", svc.addr);
    // Measured send gaps show the generator only while the machine lets it keep its
    // schedule: on two loaded cores a stall of the process makes the sends that were due
    // during it leave together (open loop, as they must). So the gaps are judged between
    // sends that both left on time; a run where under half did says nothing either way, and
    // up to three runs are allowed before the generator is blamed.
    let mut runs = Vec::new();
    let v = loop {
        let v = json(&torpor(&[
            "loadgen",
            "--target",
            &url,
            "--phase",
            "poisson:rate=200@10s",
            "--json",
        ]));
        let p = &v["phases"][0];
        assert_eq!(p["errors"], 0, "{v:#}");
        assert!(p["ok"].as_u64().unwrap() > 1700, "{v:#}");
        let on_time = p["on_time_share"].as_f64().unwrap();
        let cv = p["send_gap_cv_on_time"].as_f64().unwrap();
        let all_cv = p["send_gap_cv"].as_f64().unwrap();
        // Over ~1000-2000 exponential gaps the sample CV's standard error is 0.03-0.04: ±0.12
        // is three or more of them, while a periodic (0) or bursty (≫1) generator stays far
        // outside.
        if on_time >= 0.5 && (cv - 1.0).abs() <= 0.12 {
            break v;
        }
        runs.push(format!(
            "on time {:.0} %, cv of on-time gaps {cv:.3} (of all gaps {all_cv:.3})",
            on_time * 100.0
        ));
        assert!(runs.len() < 3, "measured send gaps: {}", runs.join("; "));
    };
    let p = &v["phases"][0];
    assert!(p["latency"]["p99_ms"].as_f64().is_some());
    // Mostly waiting: a spinning generator would burn a whole core.
    let idle = json(&torpor(&[
        "loadgen",
        "--target",
        &url,
        "--phase",
        "poisson:rate=2@3s",
        "--json",
    ]));
    let cpu = idle["cpu_pct_of_one_core"].as_f64().unwrap();
    assert!(cpu < 5.0, "loadgen used {cpu} % of a core while waiting");
    assert!(v["cpu_pct_of_one_core"].as_f64().unwrap() < 30.0, "{v:#}");
}

#[test]
fn loadgen_replays_the_shipped_trace_and_refuses_bad_input() {
    let exe = exe();
    let svc = SampleProcess::spawn(exe, 1 << 20, 1).expect("sample service");
    let trace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../traffic/fixtures/azure-functions-2019-sample.csv");
    let target = format!("tcp://{}", svc.addr);
    let v = json(&torpor(&[
        "loadgen",
        "--target",
        &target,
        "--trace",
        trace.to_str().unwrap(),
        "--speedup",
        "600",
        "--duration",
        "2s",
        "--json",
    ]));
    assert_eq!(v["total"]["errors"], 0, "{v:#}");
    assert!(v["total"]["ok"].as_u64().unwrap() > 50, "{v:#}");
    for (args, word) in [
        (vec!["--phase", "poisson:rate=1"], "PROCESS@DURATION"),
        (vec!["--phase", "zipf:rate=1@1s"], "unknown arrival process"),
        (vec!["--trace", "/nonexistent.csv"], "cannot read the trace"),
    ] {
        let mut all = vec!["loadgen", "--target", &target];
        all.extend(args);
        let out = torpor(&all);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(word), "{}", stderr(&out));
    }
}

#[test]
fn bench_scenario_writes_both_tables_and_the_plots() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scenario");
    // Knobs only logged: tests never turn the real ones. The seed's rule, so that (d)'s tiers
    // sleep and wake within 8 s (the energy governor rests them only where that pays, which
    // 8 s of history does not show). Each (d) block after 2 s of warm-up.
    let run = torpor(&[
        "bench",
        "scenario",
        "--duration",
        "8s",
        "--warmup",
        "2s",
        "--governor",
        "threshold",
        "--dry-run-knobs",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let v = json(&run);
    let configs = v["configurations"].as_array().unwrap();
    assert_eq!(configs.len(), 4, "{v:#}");
    for c in configs {
        // The warnings on stderr say what the gate and agent met when a request failed.
        assert_eq!(c["errors"], 0, "{c:#}\n{}", stderr(&run));
        assert!(c["requests"].as_u64().unwrap() > 0, "{c:#}");
        assert!(
            c["energy"]["label"]
                .as_str()
                .unwrap()
                .starts_with("modelled")
                || c["energy"]["label"]
                    .as_str()
                    .unwrap()
                    .starts_with("measured")
        );
    }
    assert!(
        configs[3]["checkpoints"].as_u64().unwrap() > 0,
        "(d) snapshots: {:#}",
        configs[3]
    );
    for table in ["table_7_1", "table_7_2"] {
        assert_eq!(
            v[table]
                .as_str()
                .unwrap()
                .lines()
                .filter(|l| l.starts_with('|'))
                .count(),
            6,
            "{table}: {}",
            v[table]
        );
    }
    // (c) and (d) in alternating blocks, their paired ratios said under Table 7.1, (d)'s
    // blocks each after a warm-up whose load ran but was not measured.
    for c in &configs[2..] {
        assert_eq!(c["block_power_w"].as_array().unwrap().len(), 3, "{c:#}");
    }
    assert_eq!(configs[2]["warmup_requests"], 0, "{:#}", configs[2]);
    assert!(
        configs[3]["warmup_requests"].as_u64().unwrap() > 0,
        "{:#}",
        configs[3]
    );
    assert_eq!(configs[3]["warmup_errors"], 0, "{:#}", configs[3]);
    // Where the CPU went: the tiers (counted by the agent, so not in (a)) and this process.
    assert!(
        configs[0]["cpu"]["services_cpus"].is_null(),
        "{:#}",
        configs[0]
    );
    for c in &configs[1..] {
        let tiers = c["cpu"]["services_cpus"].as_f64().unwrap();
        let harness = c["cpu"]["harness_cpus"].as_f64().unwrap();
        assert!(
            tiers > 0.0 && tiers < 2.0 && harness > 0.0 && harness < 2.0,
            "{c:#}"
        );
    }
    let paired = v["table_7_1"].as_str().unwrap();
    assert!(
        paired.contains("CPU time in the measured windows"),
        "{paired}"
    );
    assert!(paired.contains("(d)/(c) per pair"), "{paired}");
    assert!(
        paired.contains("2s of the arrivals just before"),
        "{paired}"
    );
    for file in ["power.svg", "latency_cdf.svg", "report.json", "tables.md"] {
        let text = std::fs::read_to_string(out.join(file)).unwrap();
        assert!(text.len() > 200, "{file}");
    }
    assert!(!out.join("knobs.json").exists(), "no knob left changed");
}

const SMALL_CLUSTER: &str = r#"
seed = 3
duration = "1h"
policy = "predictor"
idle_threshold = "30s"
node_sleep_after = "60s"
[[node]]
name = "n"
count = 10
profile = "icx-2s"
cores = 8
[[service]]
name = "fn"
count = 60
footprint = "256MiB"
arrival = { kind = "on_off", burst_rate_per_s = 1.0, on = { kind = "exponential", mean_s = 10.0 }, off = { kind = "exponential", mean_s = 300.0 } }
service_time = { kind = "exponential", mean_ms = 20.0 }
nodes = "n"
"#;

#[test]
fn sim_reports_per_group_figures_and_the_study_writes_tables_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cluster.toml");
    std::fs::write(&cfg, SMALL_CLUSTER).unwrap();
    let v = json(&torpor(&[
        "sim",
        "--config",
        cfg.to_str().unwrap(),
        "--json",
    ]));
    let g = &v["node_groups"][0];
    for key in ["idle_fraction", "mean_idle_period_s", "energy_j"] {
        assert!(g[key].as_f64().is_some(), "{key}: {v:#}");
    }
    assert!(
        v["energy_j"].as_f64().unwrap() > 0.0 && v["latency"]["p99_ms"].as_f64().is_some(),
        "{v:#}"
    );
    let out = dir.path().join("study");
    let s = json(&torpor(&[
        "sim",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(s["runs"].as_array().unwrap().len(), 8, "every policy");
    let fleet: Vec<(&str, &str)> = s["fleet"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["policy"].as_str().unwrap(),
                r["restore"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        fleet,
        [
            ("predictor", "in-place"),
            ("predictor", "anywhere"),
            ("governor", "in-place"),
            ("governor", "anywhere")
        ],
        "the fleet question, for the threshold policy and the governor"
    );
    for file in [
        "tables.md",
        "study.json",
        "rq1_threshold_power.svg",
        "rq1_threshold_p99.svg",
        "rq2_cr_latency.svg",
        "rq3_break_even.svg",
        "rq4_policies.svg",
        "fleet_power.svg",
        "fleet_p99.svg",
    ] {
        assert!(out.join(file).exists(), "{file}");
    }
    let out = torpor(&["sim", "calibrate", "/nonexistent.json"]);
    assert!(!out.status.success());
    let calib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/fixtures/bench-cr.json");
    let c = json(&torpor(&[
        "sim",
        "calibrate",
        calib.to_str().unwrap(),
        "--json",
    ]));
    assert!(c["restore_mape_pct"].as_f64().unwrap() < 10.0, "{c:#}");
}
