//! The status page in a real headless browser: chromium, driven through chromedriver
//! (WebDriver) by fantoccini, watches `torpor up` with real CRIU. Without a reload, the page
//! shows the service asleep, then awake after a request, then asleep again, and draws the
//! node's power; the test leaves a screenshot at `target/status-page.png`.
//!
//! Chromium runs as root here, so it needs `--no-sandbox` (with `--headless=new`).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};

use torpor_testkit::{embedded, http_get, own_addr, serial, Service, Up};

/// chromedriver in its own process group, which is killed (with the browsers it started)
/// and reaped when this is dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    /// Starts chromedriver on a port it picks itself (`--port=0`) and reads that port from
    /// its first lines.
    fn start() -> Result<Driver> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("chromedriver")
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting chromedriver (apt: chromium-driver; the README's test command installs it)")?;
        let stdout = child.stdout.take().context("chromedriver's stdout")?;
        let mut driver = Driver { child, port: 0 };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while driver.port == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .with_context(|| format!("chromedriver said no port: {seen:?}"))?;
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                driver.port = rest.trim_end_matches('.').trim().parse()?;
            }
            seen.push(line);
        }
        Ok(driver)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Result<Client> {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,860",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .context("a chromium session through chromedriver")
}

/// What the page shows for `service`: its level, sleeps and wakes, and how often the page
/// has refreshed itself.
async fn shown(client: &Client, service: &str) -> Result<Value> {
    Ok(client
        .execute(
            "const r = document.querySelector(`tr[data-service=\"${arguments[0]}\"]`);
             const f = (n) => r && r.querySelector(`[data-field=\"${n}\"]`).textContent;
             return { state: r && r.dataset.state, sleeps: f('sleeps'), wakes: f('wakes'),
                      refreshes: Number(document.body.dataset.refreshes || 0),
                      mark: window.torporTestMark || null,
                      lines: document.querySelectorAll('#chart polyline').length };",
            vec![json!(service)],
        )
        .await?)
}

/// Waits until the page shows `done` for `service`; returns what it shows then.
async fn until_shown(
    client: &Client,
    service: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = shown(client, service).await?;
        if done(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("the page never showed {service} {what}; it shows {v}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `target/`, where the screenshot goes.
fn output_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().map_or(tmp.clone(), |p| p.to_path_buf())
}

#[test]
fn the_status_page_follows_a_service_to_sleep_awake_and_asleep_again_without_a_reload() -> Result<()>
{
    let _g = serial();
    let web = own_addr();
    let service = Service::sample("web", web, own_addr(), "48MiB").idle("1h");
    let up = Up::launch(embedded().services([service]))?;
    let driver = Driver::start()?;
    let profile = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(browser(&driver, profile.path()))?;
    let result = (|| -> Result<Vec<u8>> {
        rt.block_on(client.goto(&format!("http://{}/", up.status)))?;
        rt.block_on(until_shown(&client, "web", "awake", |v| {
            v["state"] == "awake"
        }))?;
        // Gone if the page reloads.
        rt.block_on(client.execute("window.torporTestMark = 'same page'; return null;", vec![]))?;

        let (st, _, err) = up.command(&["sleep", "web"])?;
        anyhow::ensure!(st.success(), "{err}");
        let v = rt.block_on(until_shown(&client, "web", "asleep", |v| {
            v["state"] == "asleep"
        }))?;
        assert_eq!(v["sleeps"], "1", "{v}");

        assert_eq!(http_get(web, "/ping")?, "PONG");
        let v = rt.block_on(until_shown(&client, "web", "awake after a request", |v| {
            v["state"] == "awake"
        }))?;
        assert_eq!(v["wakes"], "1", "{v}");

        let (st, _, err) = up.command(&["sleep", "web"])?;
        anyhow::ensure!(st.success(), "{err}");
        let v = rt.block_on(until_shown(&client, "web", "asleep again", |v| {
            v["state"] == "asleep" && v["sleeps"] == "2"
        }))?;
        assert_eq!(v["mark"], "same page", "the page was not reloaded: {v}");
        assert!(v["refreshes"].as_u64().unwrap() >= 3, "{v}");
        // The power chart: torpor's line and the always-on one.
        rt.block_on(until_shown(&client, "web", "with a power chart", |v| {
            v["lines"] == 2
        }))?;
        let timeline = rt.block_on(client.execute(
            "return document.querySelector('tr[data-service=\"web\"] .timeline') !== null;",
            vec![],
        ))?;
        assert_eq!(timeline, json!(true), "the last wake's timeline is drawn");
        Ok(rt.block_on(client.screenshot())?)
    })();
    let _ = rt.block_on(client.close());
    let png = result?;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let path = output_dir().join("status-page.png");
    std::fs::write(&path, &png)?;
    eprintln!("screenshot: {} ({} bytes)", path.display(), png.len());
    Ok(())
}
