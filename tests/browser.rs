//! The web page in a real browser: Debian's headless Chromium driven over WebDriver (chromedriver,
//! installed by scripts/test-env), on the page `sigrun dev` serves with its whole stack. A nightly
//! appears on the runs page and finishes there live; its run page draws a bar for every stage on
//! every region and pool lane and lists every resource it created; a second run, failed by a fault
//! and parked, is replayed from its page (refused without the token, done with it) and succeeds;
//! the fleet page shows both versions, their replicas, pools and quotas, and a pipeline
//! description made of markup as text that runs no script. Screenshots of the three pages are saved
//! under the test's target directory (`browser-screenshots/`).

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use support::Process;

const TOKEN: &str = "browser-test-token";
const HOSTILE: &str = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"> & \"nightly\"";

/// chromedriver on a free port, and a headless Chromium session through it.
struct Browser {
    driver: std::process::Child,
    client: Client,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver is needed: `scripts/test-env` installs Debian's chromium and chromium-driver");
        let url = format!("http://127.0.0.1:{port}");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"binary": "/usr/bin/chromium", "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"
            ]}),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => return Browser { driver, client },
                Err(error) => assert!(Instant::now() < deadline, "no WebDriver session: {error}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.client.close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }

    /// The attribute `name` of the first element `css` finds, `None` when there is none.
    async fn attr(&self, css: &str, name: &str) -> Option<String> {
        let element = self.client.find(Locator::Css(css)).await.ok()?;
        element.attr(name).await.ok().flatten()
    }

    async fn texts(&self, css: &str) -> Vec<String> {
        let mut out = Vec::new();
        for element in self.client.find_all(Locator::Css(css)).await.expect("find_all") {
            out.push(element.text().await.expect("text"));
        }
        out
    }

    /// Waits until `css`'s attribute `name` is `value`, without reloading (the page must update
    /// itself).
    async fn until_attr(&self, css: &str, name: &str, value: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.attr(css, name).await;
            if now.as_deref() == Some(value) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{css} [{name}] is {now:?}, not {value:?}, after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real picture");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("screenshot");
        path
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("address").port()
}

/// A pipelines directory holding the nightly, its description made of markup; and settings
/// pointing `sigrun dev` at it.
fn hostile_pipelines(dir: &Path) -> (PathBuf, PathBuf) {
    let pipelines = dir.join("pipelines");
    std::fs::create_dir_all(&pipelines).expect("pipelines dir");
    let nightly = std::fs::read_to_string("pipelines/nightly-ubuntu.toml").expect("the nightly");
    let hostile = nightly.replace(
        "description = \"Ubuntu 22.04 Batch image, nightly\"",
        &format!("description = {}", toml_string(HOSTILE)),
    );
    assert_ne!(hostile, nightly, "the description was replaced");
    let spec = pipelines.join("nightly-ubuntu.toml");
    std::fs::write(&spec, hostile).expect("spec");
    let config = dir.join("dev.toml");
    std::fs::write(
        &config,
        format!("[pipelines]\ndir = {}\n", toml_string(&pipelines.display().to_string())),
    )
    .expect("config");
    (spec, config)
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// `sigrun dev` serving its page, with the token and workers that give up after two attempts.
async fn dev_stack(dir: &Path, config: &Path) -> (Process, String, String) {
    let stack = dir.join("stack").display().to_string();
    let config = config.display().to_string();
    let args = [
        "dev",
        "--dir",
        &stack,
        "--workers",
        "1",
        "--ui-listen",
        "127.0.0.1:0",
        "--config",
        &config,
    ];
    let env = [
        ("SIGRUN_UI_TOKEN", TOKEN),
        ("SIGRUN__RUNTIME__RETRY__MAX_ATTEMPTS", "2"),
    ];
    let mut dev = Process::start(dir, "dev", &args, &env);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dev.stdout_text().contains("Stop with Ctrl-C.") {
        let exited = matches!(dev.child.try_wait(), Ok(Some(_)));
        assert!(
            !exited && Instant::now() < deadline,
            "sigrun dev did not come up{}",
            dev.report()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let banner = dev.stdout_text();
    let value = |label: &str| {
        banner
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(label))
            .map(|rest| rest.trim().split(' ').next().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("the banner names its {label}: {banner}"))
    };
    let (page, stack_config) = (value("web page"), value("config"));
    let control = value("emulator");
    (dev, format!("{page}|{control}"), stack_config)
}

async fn submit(dir: &Path, spec: &Path, config: &str) -> String {
    support::process::submit_spec(dir, &spec.display().to_string(), config)
        .await
        .to_string()
}

/// The run's events, as `sigrun status --json` reads them from the stream.
async fn events(dir: &Path, run: &str, config: &str) -> Vec<sigrun::events::Event> {
    let mut status = Process::start(dir, "status", &["status", run, "--json", "--config", config], &[]);
    assert_eq!(
        status.wait(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        status.report()
    );
    let value: Value = serde_json::from_str(&status.stdout_text()).expect("status JSON");
    serde_json::from_value(value["events"].clone()).expect("events")
}

async fn set_faults(emulator: &str, spec: &str) {
    let answer = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .expect("client")
        .put(format!("{}/_emulator/faults", emulator.trim_end_matches('/')))
        .json(&json!({ "spec": spec }))
        .send()
        .await
        .expect("the emulator's control");
    assert_eq!(answer.status(), 200, "set faults");
}

#[tokio::test]
async fn the_pages_in_a_real_browser_live_runs_every_lane_a_replay_with_the_token_and_the_fleet() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (spec, dev_config) = hostile_pipelines(dir.path());
    let (mut dev, urls, config) = dev_stack(dir.path(), &dev_config).await;
    let (page, emulator) = urls.split_once('|').expect("two urls");
    let browser = Browser::start().await;

    // The runs page is open before the run exists: it appears and finishes without a reload.
    browser.client.goto(page).await.expect("runs page");
    let run = submit(dir.path(), &spec, &config).await;
    let row = format!("#run-{run}");
    browser
        .until_attr(&row, "data-state", "running", Duration::from_secs(30))
        .await;
    browser
        .until_attr(&row, "data-state", "succeeded", Duration::from_secs(180))
        .await;

    // Its page: a bar per stage on each lane, and every resource it created.
    browser
        .client
        .goto(&format!("{page}runs/{run}"))
        .await
        .expect("run page");
    let events = events(dir.path(), &run, &config).await;
    let mut bars = Vec::new();
    for element in browser.client.find_all(Locator::Css("rect.bar")).await.expect("bars") {
        let stage = element.attr("data-stage").await.expect("attr").unwrap_or_default();
        let lane = element.attr("data-lane").await.expect("attr").unwrap_or_default();
        bars.push((stage, lane));
    }
    for event in &events {
        let drawn = (event.stage.to_string(), event.branch.label());
        assert!(bars.contains(&drawn), "a bar for {drawn:?} among {bars:?}");
    }
    let lanes: std::collections::BTreeSet<&str> = bars.iter().map(|(_, lane)| lane.as_str()).collect();
    for lane in ["trunk", "westeurope/render", "eastus/sim"] {
        assert!(lanes.contains(lane), "the {lane} lane: {lanes:?}");
    }
    let listed = browser.texts("ul.created li").await;
    let created = sigrun::events::created(&events);
    assert!(!created.is_empty());
    for resource in &created {
        assert!(listed.contains(resource), "{resource} listed among {listed:?}");
    }
    let shot_run = browser.screenshot("run").await;

    // A second run fails at gallery-publish and is parked; replayed from its page, it succeeds.
    set_faults(emulator, "500:method=PUT,path=/versions/").await;
    let failing = submit(dir.path(), &spec, &config).await;
    browser.client.goto(page).await.expect("runs page");
    browser
        .until_attr(
            &format!("#run-{failing}"),
            "data-state",
            "failed",
            Duration::from_secs(120),
        )
        .await;
    set_faults(emulator, "").await;
    let replay = find_replay_button(&browser, &format!("{page}runs/{failing}")).await;
    replay.click().await.expect("click without the token");
    let output = "li[data-parked] output";
    wait_text(&browser, output, "401", Duration::from_secs(10)).await;
    let token = browser.client.find(Locator::Id("token")).await.expect("token field");
    token.send_keys(TOKEN).await.expect("type the token");
    replay.click().await.expect("click with the token");
    wait_text(&browser, output, "202", Duration::from_secs(30)).await;
    browser.client.goto(page).await.expect("runs page");
    browser
        .until_attr(
            &format!("#run-{failing}"),
            "data-state",
            "succeeded",
            Duration::from_secs(180),
        )
        .await;
    let rows = browser.texts("#runs tbody tr").await;
    assert_eq!(rows.len(), 2, "both runs listed: {rows:?}");
    let shot_runs = browser.screenshot("runs").await;

    // The fleet: both versions, their regions and pools, quotas; the markup description as text.
    browser.client.goto(&format!("{page}fleet")).await.expect("fleet page");
    let versions = browser.texts("table.versions tr[data-version]").await;
    assert!(versions.len() >= 2, "both versions: {versions:?}");
    for region in ["westeurope", "eastus"] {
        let css = format!("span.region[data-region=\"{region}\"]");
        assert!(!browser.texts(&css).await.is_empty(), "replicas in {region}");
    }
    assert!(!browser.texts("span.pool").await.is_empty(), "pools per version");
    assert!(
        !browser.texts("table.quotas tbody tr").await.is_empty(),
        "quota headroom"
    );
    let description = browser.texts("p.description").await;
    assert_eq!(description, [HOSTILE], "the description shows as the text it is");
    // The CSP would stop an injected script running anyway: the markup itself must not be there.
    let source = browser.client.source().await.expect("page source");
    assert!(
        source.contains("&lt;script&gt;window.pwned") && !source.contains("<script>window.pwned"),
        "escaped in the HTML itself"
    );
    let pwned = browser
        .client
        .execute("return window.pwned === undefined", vec![])
        .await;
    assert_eq!(pwned.expect("script"), json!(true), "no script of the description ran");
    let shot_fleet = browser.screenshot("fleet").await;

    eprintln!(
        "screenshots: {} {} {}",
        shot_runs.display(),
        shot_run.display(),
        shot_fleet.display()
    );
    browser.stop().await;
    dev.signal("TERM");
    assert_eq!(dev.wait(Duration::from_secs(60)).await, Some(0), "{}", dev.report());
}

/// The replay button of the run's parked message, reloading its page until the message is
/// parked (the runtime parks it just after the run fails).
async fn find_replay_button(browser: &Browser, url: &str) -> fantoccini::elements::Element {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        browser.client.goto(url).await.expect("run page");
        if let Ok(button) = browser.client.find(Locator::Css("button.replay")).await {
            return button;
        }
        assert!(
            Instant::now() < deadline,
            "the run's parked message never showed on {url}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_text(browser: &Browser, css: &str, starts: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let texts = browser.texts(css).await;
        if texts.iter().any(|t| t.starts_with(starts)) {
            return;
        }
        assert!(Instant::now() < deadline, "{css} never said {starts}: {texts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
