//! `torpor bench wake --quick --json` end to end: nginx (from apt) sleeps and wakes under an
//! in-process `torpor up` and under stock CRIU; the report has every figure the issue asks
//! for, every wake was a restore caused by the request, and the numbers agree with each other.

use std::process::{Command, Stdio};

use serde_json::Value;
use torpor_testkit::exe;

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

/// p50 and worst must be what the samples say.
fn check_figures(f: &Value, n: usize, what: &str) -> Vec<f64> {
    let samples: Vec<f64> = f["samples_ms"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}.samples_ms missing: {f}"))
        .iter()
        .map(|s| num(s, what))
        .collect();
    assert_eq!(samples.len(), n, "{what}: one sample per sleep");
    assert!(
        samples.iter().all(|s| *s > 0.0 && *s < 30_000.0),
        "{what}: {samples:?}"
    );
    let mut sorted = samples.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let worst = num(&f["worst_ms"], what);
    assert_eq!(
        worst,
        *sorted.last().unwrap(),
        "{what}: worst is the largest sample"
    );
    let p50 = num(&f["p50_ms"], what);
    assert!(
        p50 >= sorted[0] && p50 <= worst,
        "{what}: p50 {p50} outside the samples {sorted:?}"
    );
    samples
}

#[test]
fn bench_wake_quick_reports_restores_and_the_stock_baseline() {
    let out = Command::new(exe())
        .args(["bench", "wake", "--quick", "--json"])
        .stdin(Stdio::null())
        .output()
        .expect("torpor runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench wake failed: {stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let n = 3;
    assert_eq!(r["sleeps"], n as u64);
    assert!(
        r["server"].as_str().unwrap().contains("nginx"),
        "{}",
        r["server"]
    );
    assert!(num(&r["page_bytes"], "page_bytes") >= 100_000.0);

    let t = &r["torpor"];
    assert_eq!(t["cold_starts"], 0, "a wake was a cold start: {stderr}");
    let wakes = t["wakes"].as_array().expect("torpor.wakes");
    assert_eq!(wakes.len(), n);
    let responses = check_figures(&t["first_response"], n, "torpor.first_response");
    check_figures(&t["first_byte"], n, "torpor.first_byte");
    for (i, w) in wakes.iter().enumerate() {
        let tl = &w["timeline"];
        assert_eq!(tl["how"], "restore", "wake {i}: {w}");
        assert_eq!(tl["cause"], "request", "wake {i}: {w}");
        // The agent's steps in order, and the client saw the body after the release.
        let steps: Vec<f64> = [
            "restore_start_ms",
            "criu_done_ms",
            "accepting_ms",
            "released_ms",
        ]
        .iter()
        .map(|k| num(&tl[*k], k))
        .collect();
        assert!(
            steps.windows(2).all(|p| p[0] <= p[1]),
            "wake {i}: {steps:?}"
        );
        assert!(num(&w["first_byte_ms"], "first_byte_ms") <= responses[i]);
        assert!(
            steps[3] <= responses[i],
            "wake {i}: released at {} ms after the client had the body at {} ms",
            steps[3],
            responses[i]
        );
        assert!(num(&w["snapshot_bytes"], "snapshot_bytes") > 0.0);
    }

    let s = &r["stock_criu"];
    let rounds = s["rounds"].as_array().expect("stock_criu.rounds");
    assert_eq!(rounds.len(), n);
    check_figures(&s["first_response"], n, "stock_criu.first_response");
    for (i, round) in rounds.iter().enumerate() {
        let restore_ms = num(&round["restore_s"], "restore_s") * 1e3;
        assert!(
            num(&round["first_response_ms"], "first_response_ms") >= restore_ms,
            "round {i}: answered before CRIU had restored: {round}"
        );
        assert!(num(&round["image_bytes"], "image_bytes") > 0.0);
    }

    let ratio = num(&r["ratio_p50"], "ratio_p50");
    let expect =
        num(&t["first_response"]["p50_ms"], "p50") / num(&s["first_response"]["p50_ms"], "p50");
    assert!((ratio - expect).abs() < 1e-9, "ratio {ratio} vs {expect}");
    assert_eq!(r["reference"]["name"], "zeropod");
    assert_eq!(num(&r["reference"]["restore_ms"], "restore_ms"), 127.0);
    assert!(!r["reference"]["source"].as_str().unwrap().is_empty());
    assert_eq!(r["valid"], true);
    assert_eq!(
        r["warnings"].as_array().map(Vec::len),
        Some(0),
        "{}",
        r["warnings"]
    );
}
