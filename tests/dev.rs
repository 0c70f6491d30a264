//! `sigrun dev` end to end, as a newcomer uses it: the command alone brings up the emulator and
//! workers on the local broker (the shared one at 127.0.0.1:5672: its prefix is private); the
//! `submit` line it prints runs a nightly to success; SIGTERM stops it all and removes its
//! queues. And without a broker it says how to get one.

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::time::{Duration, Instant};

use support::Process;

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
    let stack = dir.path().join("stack");
    let stack_arg = stack.display().to_string();
    let mut dev = Process::start(dir.path(), "dev", &["dev", "--dir", &stack_arg, "--workers", "1"], &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dev.stdout_text().contains("Stop with Ctrl-C.") {
        assert!(Instant::now() < deadline, "sigrun dev did not come up{}", dev.report());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
