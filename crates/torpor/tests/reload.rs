//! Live reload end to end: `torpor reload` and SIGHUP against `torpor up` with real CRIU.
//! Services are added, removed and changed while another one serves a client loop without a
//! single error; a removed service that was asleep leaves no snapshot in the pool; a changed
//! one takes the change at its next wake (its state kept, or started afresh when its command
//! changed); an invalid file, or a node-level change, is refused naming the key and the old
//! configuration keeps serving.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};

use torpor_testkit::{embedded, http_get, own_addr, serial, Config, Service, Up};

/// The sample service with `memory` of state, never slept by the policy (only by hand).
fn sample(name: &str, port: SocketAddr, backend: SocketAddr, memory: &str) -> Service {
    Service::sample(name, port, backend, memory).idle("1h")
}

/// Writes `services` as `up`'s new torpor.toml, with the pool, status and control sections
/// it was started with.
fn rewrite(up: &Up, services: &[&Service]) -> Result<()> {
    up.rewrite(&Config {
        services: services.iter().map(|s| (*s).clone()).collect(),
        ..up.config().clone()
    })
}

/// `torpor reload --json` against `up`: its exit status and report.
fn reload(up: &Up) -> Result<(bool, serde_json::Value)> {
    let (st, out, err) = up.command(&["reload", "--json"])?;
    let report = serde_json::from_str(&out)
        .with_context(|| format!("a report: {out}{err}\nlog:\n{}", up.log_text()))?;
    Ok((st.success(), report))
}

/// GETs `/count` from `to` over and over in a thread until dropped, counting answers and
/// errors.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClientLoop {
    fn start(to: std::net::SocketAddr) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let thread = {
            let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match http_get(to, "/count") {
                        Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            errors.lock().unwrap().push(format!("{e:#}"));
                            0
                        }
                    };
                }
            })
        };
        ClientLoop {
            stop,
            ok,
            errors,
            thread: Some(thread),
        }
    }

    /// Stops the loop: (answers, errors).
    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let errors = self.errors.lock().unwrap().clone();
        (self.ok.load(Ordering::SeqCst), errors)
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The sample service's request count, from `/count`.
fn count(to: std::net::SocketAddr) -> Result<u64> {
    let body = http_get(to, "/count")?;
    body.trim()
        .parse()
        .with_context(|| format!("a count: {body}"))
}

fn names(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .map(|l| {
            l.iter()
                .filter_map(|x| x["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn add_remove_and_change_services_while_another_serves_without_an_error() -> Result<()> {
    let _g = serial();
    let (steady, gone, tuned, fresh) = (own_addr(), own_addr(), own_addr(), own_addr());
    let (steady_b, gone_b, tuned_b, fresh_b) = (own_addr(), own_addr(), own_addr(), own_addr());
    let steady_svc = sample("steady", steady, steady_b, "16MiB");
    let gone_svc = sample("gone", gone, gone_b, "16MiB");
    // `retuned`: with a policy changed from the first one's.
    let tuned_svc = |memory: &str, retuned: bool| {
        let mut s = sample("tuned", tuned, tuned_b, memory);
        if retuned {
            s.policy.max_sleep_rate = Some(5.0);
            s.policy.hold_queue = Some(7);
        }
        s
    };
    let up = Up::launch(embedded().services([
        steady_svc.clone(),
        gone_svc.clone(),
        tuned_svc("16MiB", false),
    ]))?;
    // The changed service's state (a counter that advances while it runs, not while it
    // sleeps), and the removed one asleep in the pool.
    let counted = count(tuned)?;
    let (st, out, err) = up.command(&["sleep", "gone"])?;
    assert!(st.success(), "{out}{err}");
    let (st, out, err) = up.command(&["sleep", "tuned"])?;
    assert!(st.success(), "{out}{err}");

    let client = ClientLoop::start(steady);
    let fresh_svc = sample("fresh", fresh, fresh_b, "16MiB");
    rewrite(&up, &[&steady_svc, &tuned_svc("16MiB", true), &fresh_svc])?;
    let (ok, report) = reload(&up)?;
    assert!(ok, "{report}\n{}", up.log_text());
    assert_eq!(report["outcome"], "applied", "{report}");
    assert_eq!(names(&report["added"]), vec!["fresh"], "{report}");
    assert_eq!(names(&report["removed"]), vec!["gone"], "{report}");
    assert_eq!(report["removed"][0]["snapshots_released"], true, "{report}");
    assert_eq!(names(&report["changed"]), vec!["tuned"], "{report}");
    assert_eq!(report["changed"][0]["applies"], "next_wake", "{report}");
    assert_eq!(
        report["changed"][0]["keys"],
        serde_json::json!(["policy.hold_queue", "policy.max_sleep_rate"]),
        "{report}"
    );
    // The added service serves; the removed one's gate is gone.
    count(fresh).context("it answers")?;
    assert!(
        http_get(gone, "/count").is_err(),
        "gone's gate still answers"
    );
    let listed: Vec<String> = up
        .services()?
        .iter()
        .map(|s| s["name"].to_string())
        .collect();
    assert!(!listed.iter().any(|n| n.contains("gone")), "{listed:?}");
    // The changed one was taken over asleep; its next wake restores its state.
    up.wait_for("tuned", "taken over", Duration::from_secs(10), |s| {
        s["state"] == "asleep" && s["sleeps"] == 0
    })?;
    assert!(count(tuned)? >= counted, "its state is kept");
    let s = up.service("tuned")?;
    assert_eq!(
        (s["cold_starts"].as_u64(), s["wakes"].as_u64()),
        (Some(0), Some(1)),
        "{s}"
    );

    // Its command changes: the next wake starts it from the new one, without the old state.
    rewrite(&up, &[&steady_svc, &tuned_svc("8MiB", true), &fresh_svc])?;
    let (ok, report) = reload(&up)?;
    assert!(ok, "{report}");
    assert_eq!(
        report["changed"][0]["applies"], "next_wake_fresh",
        "{report}"
    );
    let (st, out, err) = up.command(&["sleep", "tuned"])?;
    assert!(st.success(), "{out}{err}");
    up.wait_for("tuned", "taken over", Duration::from_secs(10), |s| {
        s["state"] == "asleep" && s["sleeps"] == 0
    })?;
    // Started afresh from the new command, not restored (its counter is a clock, so
    // comparing counts would race a slow start).
    let _ = count(tuned)?;
    let s = up.service("tuned")?;
    assert_eq!(s["last_wake"]["how"], "cold start", "started afresh: {s}");
    assert_eq!(
        http_get(tuned, "/sum")?,
        torpor_workload::expected_sum(8 << 20, 1),
        "the new command runs"
    );
    assert_eq!(up.service("tuned")?["cold_starts"], 1);

    // The removed service comes back: nothing of it was left in the pool to adopt.
    rewrite(
        &up,
        &[&steady_svc, &gone_svc, &tuned_svc("8MiB", true), &fresh_svc],
    )?;
    let (ok, report) = reload(&up)?;
    assert!(ok, "{report}");
    assert_eq!(names(&report["added"]), vec!["gone"], "{report}");
    assert!(
        report["added"][0]["adopted_generation"].is_null(),
        "{report}"
    );
    count(gone).context("it answers")?;

    let (answers, errors) = client.finish();
    assert!(errors.is_empty(), "{} errors: {errors:?}", errors.len());
    assert!(answers > 10, "the client loop ran: {answers} answers");
    let doc = up.doc()?;
    assert_eq!(doc["last_reload"]["outcome"], "applied", "{doc}");
    assert_eq!(doc["last_reload"]["by"], "uid 0", "{doc}");
    assert!(up.log_text().contains("configuration reload"));
    Ok(())
}

#[test]
fn an_invalid_file_is_refused_and_sighup_reloads_like_the_command() -> Result<()> {
    let _g = serial();
    let (web, web_b) = (own_addr(), own_addr());
    let web_svc = sample("web", web, web_b, "16MiB");
    let up = Up::launch(embedded().services([web_svc]))?;
    let client = ClientLoop::start(web);

    let good = up.config().clone();
    let mut bad = good.clone();
    bad.services[0].policy.idle_threshold = Some("soon".into());
    up.rewrite(&bad)?;
    let (ok, report) = reload(&up)?;
    assert!(!ok, "{report}");
    assert_eq!(report["outcome"], "refused", "{report}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("service[0].policy.idle_threshold"),
        "{error}"
    );
    // The text form says the same on stderr, and exits 1.
    let (st, _, err) = up.command(&["reload"])?;
    assert!(
        !st.success() && err.contains("reload refused: service[0].policy.idle_threshold"),
        "{err}"
    );

    let mut resized = good.clone();
    resized.pool.capacity = Some("512MiB".into());
    up.rewrite(&resized)?;
    let (ok, report) = reload(&up)?;
    assert!(!ok, "{report}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("restart torpor up to change [pool].capacity"),
        "{error}"
    );
    // All or nothing: the service added in the same file did not start.
    let (more, more_b) = (own_addr(), own_addr());
    let more_svc = sample("more", more, more_b, "16MiB");
    up.rewrite(&resized.services([more_svc.clone()]))?;
    let (ok, _) = reload(&up)?;
    assert!(!ok);
    assert!(
        up.service("more").is_err(),
        "nothing of a refused file is applied"
    );
    assert_eq!(up.doc()?["last_reload"]["outcome"], "refused");

    // SIGHUP reads the file again as `torpor reload` does.
    up.rewrite(&good.services([more_svc]))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.pid()?),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while up.doc()?["last_reload"]["by"] != "SIGHUP" {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload on SIGHUP:\n{}",
            up.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(up.service("more")?["state"], "awake");
    count(more).context("it answers")?;
    let doc = up.doc()?;
    assert_eq!(doc["last_reload"]["by"], "SIGHUP", "{doc}");
    assert_eq!(doc["last_reload"]["outcome"], "applied", "{doc}");
    let text = up.status_text()?;
    assert!(text.contains("last reload: applied by SIGHUP"), "{text}");

    let (answers, errors) = client.finish();
    assert!(errors.is_empty(), "{} errors: {errors:?}", errors.len());
    assert!(answers > 0);
    Ok(())
}
