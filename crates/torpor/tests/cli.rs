//! The real `torpor` binary end to end: pool, checkpoint, snapshots, restore, doctor, and the
//! errors a user gets for bad input.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    sync::Mutex,
    time::Duration,
};

use anyhow::Result;
use torpor_bench::harness::{become_subreaper, kill_and_reap, PoolProcess, SampleProcess};
use torpor_workload::SampleClient;

static SERIAL: Mutex<()> = Mutex::new(());

fn torpor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_torpor"))
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
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    become_subreaper()?;
    let exe = Path::new(env!("CARGO_BIN_EXE_torpor"));
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
    let short = dir.path().join("token");
    std::fs::write(&short, "abc").unwrap();
    let out = torpor(&[
        "pool",
        "--listen",
        "127.0.0.1:0",
        "--capacity",
        "1MiB",
        "--token-file",
        short.to_str().unwrap(),
    ]);
    assert!(stderr(&out).contains("fewer than 16"), "{}", stderr(&out));

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
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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
}
