//! `sigrun dev` end to end, as a newcomer uses it: the command alone brings up the emulator and
//! workers on the local broker (the shared one at 127.0.0.1:5672: its prefix is private); the
//! `submit` line it prints runs a nightly to success; SIGTERM stops it all and removes its
//! queues. And without a broker it says how to get one.

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::time::{Duration, Instant};

use support::Process;

/// `sigrun dev` with one worker in `dir`, once its banner says it is up.
async fn dev_stack(dir: &std::path::Path) -> Process {
    let stack = dir.join("stack").display().to_string();
    let dev = Process::start(
        dir,
        "dev",
        &["dev", "--dir", &stack, "--workers", "1", "--ui-listen", "127.0.0.1:0"],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dev.stdout_text().contains("Stop with Ctrl-C.") {
        assert!(Instant::now() < deadline, "sigrun dev did not come up{}", dev.report());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dev
}

/// `sigrun submit` of the nightly on the stack of `config`; the run id it printed.
async fn submit_nightly(dir: &std::path::Path, config: &str) -> String {
    support::process::submit_spec(dir, "pipelines/nightly-ubuntu.toml", config)
        .await
        .to_string()
}

/// The value after `label` on the banner's lines (`  config     /path`).
fn banner_value(banner: &str, label: &str) -> Option<String> {
    banner
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .map(|rest| rest.trim().split(' ').next().unwrap_or_default().to_string())
}

#[tokio::test]
async fn sigrun_dev_brings_up_a_stack_a_submitted_nightly_runs_on_and_stops_clean() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut dev = dev_stack(dir.path()).await;
    let banner = dev.stdout_text();
    let config = banner_value(&banner, "config").expect("the banner names the config");
    let prefix = banner_value(&banner.replace("(prefix ", "\nprefix "), "prefix")
        .map(|p| p.trim_end_matches(')').to_string())
        .expect("the banner names the prefix");
    let submit_line = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("sigrun submit "))
        .expect("a ready submit line")
        .to_string();

    let args: Vec<&str> = std::iter::once("submit").chain(submit_line.split(' ')).collect();
    let mut submit = Process::start(dir.path(), "submit", &args, &[]);
    assert_eq!(
        submit.wait(Duration::from_secs(60)).await,
        Some(0),
        "{}",
        submit.report()
    );
    let run = support::run_id_printed(&submit).to_string();

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut status = Process::start(dir.path(), "status", &["status", &run, "--config", &config], &[]);
        status.wait(Duration::from_secs(30)).await;
        let text = status.stdout_text();
        if text.lines().any(|l| l.starts_with("result: succeeded")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the nightly did not succeed on the dev stack: {text}{}",
            dev.report()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    dev.signal("TERM");
    assert_eq!(dev.wait(Duration::from_secs(60)).await, Some(0), "{}", dev.report());
    let left = support::broker::rabbitmqctl(&["-q", "list_queues", "name"]);
    assert!(!left.contains(&prefix), "the stack's queues are removed: {left}");
    let workers = std::process::Command::new("pgrep")
        .args(["-f", &format!("worker --all-stages --config {config}")])
        .output()
        .expect("pgrep");
    assert!(workers.stdout.is_empty(), "its workers stopped too");
}

#[tokio::test]
async fn sigrun_dev_without_a_broker_says_how_to_start_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = closed.local_addr().expect("address").port();
    drop(closed);
    let config = dir.path().join("nobroker.toml");
    std::fs::write(
        &config,
        format!("[amqp]\nurl = \"amqp://guest:guest@127.0.0.1:{port}/%2f\"\n"),
    )
    .expect("config");
    let config = config.display().to_string();
    let mut dev = Process::start(
        dir.path(),
        "dev",
        &["dev", "--config", &config, "--dir", "/tmp/unused-dev"],
        &[],
    );
    assert_eq!(
        dev.wait(Duration::from_secs(60)).await,
        Some(2),
        "bad input{}",
        dev.report()
    );
    let err = dev.stderr_text();
    assert!(
        err.contains(&format!("needs RabbitMQ at amqp://guest:***@127.0.0.1:{port}"))
            && err.contains("rabbitmq-server -detached"),
        "names the broker and the fix: {err}"
    );
}

/// The value of the next SSE `data:` line of `stream` that satisfies `wanted`, within `limit`.
async fn next_live(
    response: &mut reqwest::Response,
    buffer: &mut String,
    wanted: impl Fn(&serde_json::Value) -> bool,
    limit: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let message: String = buffer.drain(..end + 2).collect();
            if let Some(data) = message.lines().find_map(|l| l.strip_prefix("data:")) {
                let value: serde_json::Value = serde_json::from_str(data.trim()).expect("live data is JSON");
                if wanted(&value) {
                    return value;
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "nothing wanted came on /live within {limit:?}");
        match tokio::time::timeout(left, response.chunk()).await {
            Ok(Ok(Some(chunk))) => buffer.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("/live ended: {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_runs_page_shows_a_run_appear_and_finish_live_and_its_page_draws_every_lane() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut dev = dev_stack(dir.path()).await;
    let config = banner_value(&dev.stdout_text(), "config").expect("config");
    let (mut ui, base) = ui_on(dir.path(), "ui", &config, &[]).await;
    let client = reqwest::Client::new();
    let mut live = client.get(format!("{base}live")).send().await.expect("/live");
    assert_eq!(live.status(), 200);
    let mut buffer = String::new();

    let run = submit_nightly(dir.path(), &config).await;
    let of_run = |v: &serde_json::Value| v["run"]["run_id"] == run.as_str();
    let appeared = next_live(&mut live, &mut buffer, of_run, Duration::from_secs(30)).await;
    assert_eq!(appeared["run"]["state"], "running", "{appeared}");
    let finished = next_live(
        &mut live,
        &mut buffer,
        |v| of_run(v) && v["run"]["state"] != "running",
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(finished["run"]["state"], "succeeded", "{finished}");
    assert!(
        finished["row"]
            .as_str()
            .is_some_and(|row| row.contains(&format!("id=\"run-{run}\"")))
    );

    let runs = client.get(&base).send().await.expect("/");
    let csp = runs.headers()["content-security-policy"]
        .to_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    let runs = runs.text().await.expect("runs page");
    assert!(
        runs.contains(&format!("<tr id=\"run-{run}\" data-state=\"succeeded\">")),
        "{runs}"
    );

    let page = client
        .get(format!("{base}runs/{run}"))
        .send()
        .await
        .expect("run page")
        .text()
        .await
        .expect("text");
    for (stage, lane) in [
        ("snapshot", "trunk"),
        ("image-create", "trunk"),
        ("gallery-publish", "trunk"),
        ("replicate", "trunk"),
        ("pool-create", "westeurope/render"),
        ("verify", "westeurope/render"),
        ("pool-create", "eastus/sim"),
        ("verify", "eastus/sim"),
        ("image-create", "clean-up/snapshots"),
        ("replicate", "clean-up/image"),
    ] {
        assert!(
            page.contains(&format!("data-stage=\"{stage}\" data-lane=\"{lane}\"")),
            "a {stage} bar on the {lane} lane: {page}"
        );
    }
    assert!(
        page.contains("https://portal.azure.com/#resource/subscriptions/"),
        "portal links"
    );
    assert!(page.contains("/versions/"), "the version it created");
    assert!(page.contains("deleted snapshot"), "what it deleted");
    let missing = client.get(format!("{base}runs/not-a-run")).send().await.expect("404");
    assert_eq!(missing.status(), 404);

    ui.signal("TERM");
    assert_eq!(ui.wait(Duration::from_secs(30)).await, Some(0), "{}", ui.report());
    dev.signal("TERM");
    assert_eq!(dev.wait(Duration::from_secs(60)).await, Some(0), "{}", dev.report());
}

/// `sigrun ui` on `config`, with `env`; its base URL once it serves.
async fn ui_on(dir: &std::path::Path, name: &str, config: &str, env: &[(&str, &str)]) -> (Process, String) {
    let mut ui = Process::start(dir, name, &["ui", "--listen", "127.0.0.1:0", "--config", config], env);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ui.stdout_text().starts_with("http://") {
        assert!(Instant::now() < deadline, "sigrun ui did not start{}", ui.report());
        if let Ok(Some(_)) = ui.child.try_wait() {
            panic!("sigrun ui exited{}", ui.report());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let base = ui.stdout_text().trim().to_string();
    (ui, base)
}

#[tokio::test]
async fn cancelling_from_the_page_needs_the_token_and_then_stops_the_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut dev = dev_stack(dir.path()).await;
    let config = banner_value(&dev.stdout_text(), "config").expect("config");
    let token = "s3cret-ui-token";
    let (mut acting, base) = ui_on(dir.path(), "ui-token", &config, &[("SIGRUN_UI_TOKEN", token)]).await;
    let (mut reading, read_only) = ui_on(dir.path(), "ui-read-only", &config, &[]).await;
    let client = reqwest::Client::new();

    let run = submit_nightly(dir.path(), &config).await;
    // The run is on the page (and running) once its first event has been read.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = client.get(format!("{base}runs/{run}")).send().await.expect("run page");
        if page.status() == 200 {
            let text = page.text().await.expect("text");
            assert!(
                text.contains("<button id=\"cancel\"") && text.contains("id=\"token\""),
                "a page that may act offers the button and a token field"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the run never showed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cancel = |base: &str, auth: Option<&str>| {
        let mut request = client.post(format!("{base}runs/{run}/cancel"));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    let refused = cancel(&read_only, Some(&format!("Bearer {token}")))
        .await
        .expect("post");
    assert_eq!(refused.status(), 403, "a read-only page acts for no one");
    assert_eq!(cancel(&base, None).await.expect("post").status(), 401, "no token");
    assert_eq!(
        cancel(&base, Some("Bearer wrong-token")).await.expect("post").status(),
        401
    );
    let accepted = cancel(&base, Some(&format!("Bearer {token}"))).await.expect("post");
    assert_eq!(accepted.status(), 202, "{:?}", accepted.text().await);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let runs = client
            .get(&base)
            .send()
            .await
            .expect("runs")
            .text()
            .await
            .expect("text");
        if runs.contains(&format!("<tr id=\"run-{run}\" data-state=\"cancelled\">")) {
            break;
        }
        assert!(Instant::now() < deadline, "the run was not cancelled: {runs}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = cancel(&base, Some(&format!("Bearer {token}"))).await.expect("post");
    assert_eq!(again.status(), 409, "an ended run is left alone");
    assert!(
        !acting.stderr_text().contains(token) && !acting.stdout_text().contains(token),
        "the token never prints"
    );

    for process in [&mut acting, &mut reading, &mut dev] {
        process.signal("TERM");
        assert_eq!(
            process.wait(Duration::from_secs(60)).await,
            Some(0),
            "{}",
            process.report()
        );
    }
}
