//! Manual control end to end: `torpor sleep`, `wake`, `pin` and `unpin` against `torpor up`
//! with real CRIU, through its control socket (and its TCP endpoint with a token): each
//! command's effect, its no-op cases, a manual sleep while a request is in flight, and the
//! record of who did what in `/status`, `torpor status` and the log.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context, Result};

use torpor_testkit::{
    config::Control, embedded, exe, http_get, own_addr, poll, serial, Config, Service, Up,
};

/// The sample service, never slept by the policy (only by hand).
fn sample(name: &str, port: SocketAddr, backend: SocketAddr) -> Service {
    Service::sample(name, port, backend, "32MiB").idle("1h")
}

/// `text` without its terminal colour codes.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn sleep_wake_pin_and_unpin_steer_a_service_and_say_who_did_it() -> Result<()> {
    let _g = serial();
    let web = own_addr();
    let up = Up::launch(embedded().services([sample("web", web, own_addr())]))?;
    let sum = http_get(web, "/sum")?;
    assert_eq!(sum, torpor_workload::expected_sum(32 << 20, 1));

    let (st, out, err) = up.command(&["wake", "web"])?;
    assert!(st.success(), "{err}");
    assert!(
        out.contains("already awake"),
        "a wake of an awake service says so: {out}"
    );

    let (st, out, err) = up.command(&["sleep", "web"])?;
    assert!(st.success(), "{err}\n{}", up.log_text());
    assert!(out.contains("web is asleep: generation 1"), "{out}");
    let s = up.service("web")?;
    assert_eq!(
        (s["state"].as_str(), s["sleeps"].as_u64()),
        (Some("asleep"), Some(1)),
        "{s}"
    );
    assert_eq!(s["last_manual"]["by"], "uid 0", "{s}");
    let (st, out, _) = up.command(&["sleep", "web"])?;
    assert!(st.success() && out.contains("already asleep"), "{out}");

    let (st, out, err) = up.command(&["wake", "web"])?;
    assert!(st.success(), "{err}");
    assert!(out.contains("web is awake"), "{out}");
    let s = up.service("web")?;
    assert_eq!(s["state"], "awake", "{s}");
    assert_eq!(s["last_wake"]["cause"], "manual", "{s}");
    assert_eq!(s["cold_starts"], 0, "{s}");
    assert_eq!(http_get(web, "/sum")?, sum, "memory intact");

    let (st, out, err) = up.command(&["pin", "web", "--for", "1h"])?;
    assert!(st.success(), "{err}");
    assert!(out.contains("pinned awake for 3600s"), "{out}");
    let pin = &up.service("web")?["pinned"];
    assert_eq!(pin["by"], "uid 0", "{pin}");
    assert!(pin["left_s"].as_f64().unwrap() > 3500.0, "{pin}");
    let (st, _, err) = up.command(&["sleep", "web"])?;
    assert!(!st.success(), "a pinned service is not slept");
    assert!(
        err.contains("web is pinned awake (") && err.contains(" s left); unpin it first"),
        "{err}"
    );
    assert_eq!(up.service("web")?["state"], "awake");
    let (st, out, _) = up.command(&["unpin", "web"])?;
    assert!(
        st.success() && out.contains("unpinned (pinned by uid 0)"),
        "{out}"
    );
    let (st, out, _) = up.command(&["unpin", "web"])?;
    assert!(st.success() && out.contains("was not pinned"), "{out}");

    // Pinning a sleeping service wakes it.
    assert!(up.command(&["sleep", "web"])?.0.success());
    let (st, out, err) = up.command(&["pin", "web"])?;
    assert!(st.success(), "{err}");
    assert!(
        out.contains("until unpinned") && out.contains("web is awake"),
        "{out}"
    );
    assert_eq!(up.service("web")?["state"], "awake");
    assert!(up.service("web")?["pinned"]["left_s"].is_null());

    let (st, _, err) = up.command(&["wake", "nosuch"])?;
    assert!(
        !st.success() && err.contains("no service \"nosuch\""),
        "{err}"
    );

    // Without --socket: the status address says where the control socket is.
    let out = Command::new(exe())
        .args(["unpin", "web", "--addr", &up.status.to_string()])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let doc = up.doc()?;
    let actions: Vec<(String, String)> = doc["manual"]
        .as_array()
        .context("manual list")?
        .iter()
        .map(|a| {
            (
                a["action"].as_str().unwrap().to_string(),
                a["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect = [
        ("wake", "no_op"),
        ("sleep", "done"),
        ("sleep", "no_op"),
        ("wake", "done"),
        ("pin", "done"),
        ("sleep", "refused"),
        ("unpin", "done"),
        ("unpin", "no_op"),
        ("sleep", "done"),
        ("pin", "done"),
        ("wake", "refused"),
        ("unpin", "done"),
    ];
    let expect: Vec<(String, String)> = expect
        .iter()
        .map(|(a, o)| (a.to_string(), o.to_string()))
        .collect();
    assert_eq!(actions, expect);
    assert!(doc["manual"][0]["at_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(
        doc["control"]["socket"].as_str().map(Path::new),
        Some(up.control.as_path())
    );
    let text = up.status_text()?;
    assert!(
        text.contains("web: last manual command: unpin by uid 0 at "),
        "{text}"
    );
    let log = plain(&up.log_text());
    assert!(
        log.contains("manual command") && log.contains("action=pin") && log.contains("by=uid 0"),
        "every manual action is logged with its fields:\n{log}"
    );

    // A second torpor up cannot take a control socket a live one holds.
    let cfg = embedded()
        .status(own_addr())
        .services([sample("other", own_addr(), own_addr())]);
    let mut second = Up::spawn(&Config {
        control: Some(Control {
            socket: Some(up.control.clone()),
            ..Control::default()
        }),
        ..cfg
    })?;
    let exit = second.wait_exit(Duration::from_secs(60))?;
    let log = second.log_text();
    assert!(!exit.success(), "{log}");
    assert!(
        log.contains("control.socket: ") && log.contains("in use by another running torpor up"),
        "{log}"
    );
    assert_eq!(
        up.service("web")?["state"],
        "awake",
        "the first one is unharmed"
    );
    Ok(())
}

/// An HTTP service whose `/hold` answers only once the file `release` exists in its
/// directory (it writes `entered` when the request arrives); `/` answers with a count of
/// requests, its state.
const HOLDING_SERVICE: &str = r#"
import os, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
(host, port), d = sys.argv[1].rsplit(":", 1), sys.argv[2]
count = 0
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        global count
        count += 1
        if self.path == "/hold":
            open(os.path.join(d, "entered"), "w").close()
            while not os.path.exists(os.path.join(d, "release")):
                time.sleep(0.01)
            body = b"held and answered"
        else:
            body = str(count).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
HTTPServer((host, int(port)), H).serve_forever()
"#;

#[test]
fn a_manual_sleep_lets_the_request_in_flight_finish_and_answers_it() -> Result<()> {
    let _g = serial();
    let work = tempfile::tempdir()?;
    let script = work.path().join("hold.py");
    std::fs::write(&script, HOLDING_SERVICE)?;
    let (port, backend) = (own_addr(), own_addr());
    let slow = Service {
        drain_deadline: Some("120s".into()),
        ..Service::new(
            "slow",
            &[
                "python3".to_string(),
                script.display().to_string(),
                backend.to_string(),
                work.path().display().to_string(),
            ],
            port,
            backend,
        )
        .idle("1h")
    };
    let up = Up::launch(embedded().services([slow]))?;
    let held = std::thread::spawn(move || http_get(port, "/hold"));
    let entered = work.path().join("entered");
    let timeout = Duration::from_secs(30);
    ensure!(
        poll(timeout, Duration::from_millis(5), || entered.exists()),
        "the request reaching the service did not happen within {timeout:?}"
    );
    let sleep = Command::new(exe())
        .args(["sleep", "slow", "--socket"])
        .arg(&up.control)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Reaped (and killed if still running) on every path out of this test.
    let sleep = KillOnDrop(Some(sleep));
    up.wait_state("slow", "draining", Duration::from_secs(30))?;
    assert!(!held.is_finished(), "the request is still in flight");
    std::fs::write(work.path().join("release"), "")?;
    let answer = held.join().expect("request thread")?;
    assert_eq!(answer, "held and answered");
    let out = sleep.wait_output()?;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        up.log_text()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("slow is asleep"));
    let s = up.service("slow")?;
    assert_eq!(s["state"], "asleep", "{s}");
    let drained = up.doc()?["transitions"]
        .as_array()
        .context("transitions")?
        .iter()
        .find(|t| t["to"] == "checkpointing")
        .context("a checkpoint")?
        .clone();
    assert!(
        drained["detail"]
            .as_str()
            .unwrap()
            .contains("0 in flight cut"),
        "{drained}"
    );
    // Its state came back with it: the count goes on from the two requests before.
    assert_eq!(http_get(port, "/")?, "2");
    Ok(())
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    fn wait_output(mut self) -> Result<std::process::Output> {
        Ok(self.0.take().context("running")?.wait_with_output()?)
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_tcp_control_endpoint_takes_commands_with_its_token_only() -> Result<()> {
    let _g = serial();
    let secrets = tempfile::tempdir()?;
    let token_file = secrets.path().join("control.token");
    torpor_pool::write_token_file(&token_file, "a-long-random-control-token-0123456789")?;
    let wrong = secrets.path().join("wrong.token");
    torpor_pool::write_token_file(&wrong, "another-long-random-token-9876543210")?;
    let web = own_addr();
    let up = Up::launch(Config {
        control: Some(Control {
            listen: Some("127.0.0.1:0".into()),
            token_file: Some(token_file.clone()),
            ..Control::default()
        }),
        ..embedded().services([sample("web", web, own_addr())])
    })?;
    let control = up.doc()?["control"]["tcp"]
        .as_str()
        .context("the TCP control address in /status")?
        .to_string();
    let run = |args: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new(exe()).args(args).output()?)
    };
    let status = up.status.to_string();
    let out = run(&["sleep", "web", "--addr", &status])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-file"));
    let out = run(&[
        "sleep",
        "web",
        "--control",
        &control,
        "--token-file",
        wrong.to_str().unwrap(),
    ])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong token"));
    assert_eq!(up.service("web")?["state"], "awake");
    let out = run(&[
        "sleep",
        "web",
        "--addr",
        &status,
        "--token-file",
        token_file.to_str().unwrap(),
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = up.service("web")?;
    assert_eq!(s["state"], "asleep", "{s}");
    assert_eq!(s["last_manual"]["by"], "token", "{s}");
    Ok(())
}
