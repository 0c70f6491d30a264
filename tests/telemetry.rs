//! The metrics and health endpoints of real `sigrun` processes, over real sockets: a worker's
//! `/metrics`, `/healthz` and `/readyz` while its broker connection is up, cut and back (the cut is
//! a TCP relay between the worker and the real broker that the test closes and reopens, so no other
//! test sharing the broker is disturbed), the messages it handled counted by stage and outcome, a
//! worker whose Azure identity is refused (alive, not ready, no secret in the reason),
//! `sigrun run` serving the endpoints from `[telemetry] listen` while it runs, and a history reader
//! (what the ledger tails) that ends when its connection goes silent instead of waiting on it.

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::time::{Duration, Instant};

use std::sync::Arc;

use sigrun::bus::amqp::AmqpBus;
use sigrun::bus::{Bus, StreamOffset};
use sigrun::events::RunResult;
use sigrun::ledger::Ledger;
use support::relay::{Relay, broker_addr, broker_url_parts};
use support::{Process, probe, sample, wait_for_status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_endpoints_follow_the_broker_connection_and_count_handled_messages() {
    let setup = support::setup("").await;
    let (bus, settings) = support::test_bus(&setup.config).await;
    let relay = Relay::start(broker_addr()).await;
    let (before_host, _, after_host) = broker_url_parts();
    let relayed_url = format!("{before_host}{}{after_host}", relay.addr);
    let config = setup.write_config("relayed.toml", &relayed_url, helpers::PIPELINE_APP.1);
    let mut worker = setup.worker_with_config("worker", &config, &["--all-stages"]);
    let addr = worker.metrics_addr().await;

    let health = probe(addr, "/healthz").await.expect("/healthz answers");
    assert_eq!(health.status, 200, "{health:?}");
    let took = wait_for_status(addr, "/readyz", 200, Duration::from_secs(30), "a started worker").await;
    eprintln!(
        "worker ready {:.0} ms after it said where it listens",
        took.as_secs_f64() * 1000.0
    );
    let metrics = probe(addr, "/metrics").await.expect("/metrics answers");
    assert_eq!(metrics.status, 200);
    assert_eq!(metrics.content_type, "text/plain; version=0.0.4");
    let build_info = format!("sigrun_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&metrics.body, &build_info), Some(1.0), "{}", metrics.body);
    assert_eq!(
        sample(&metrics.body, "sigrun_bus_connected"),
        Some(1.0),
        "{}",
        metrics.body
    );
    assert!(probe(addr, "/nothing").await.is_some_and(|a| a.status == 404));

    // The network to the broker goes away: not ready (the bus says why), still alive.
    relay.set_cut(true);
    let cut_at = Instant::now();
    wait_for_status(
        addr,
        "/readyz",
        503,
        Duration::from_secs(10),
        "a worker cut from its broker",
    )
    .await;
    eprintln!(
        "readyz 503 {:.0} ms after the cut",
        cut_at.elapsed().as_secs_f64() * 1000.0
    );
    // It stays so while the cut lasts (the worker keeps trying to reconnect).
    for _ in 0..10 {
        let ready = probe(addr, "/readyz").await.expect("/readyz answers while cut");
        assert_eq!(ready.status, 503, "{ready:?}");
        assert!(ready.body.contains("bus"), "the reason names the bus: {ready:?}");
        let health = probe(addr, "/healthz").await.expect("/healthz answers while cut");
        assert_eq!(health.status, 200, "alive while cut: {health:?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let metrics = probe(addr, "/metrics").await.expect("/metrics answers while cut");
    assert_eq!(
        sample(&metrics.body, "sigrun_bus_connected"),
        Some(0.0),
        "{}",
        metrics.body
    );

    relay.set_cut(false);
    let back = wait_for_status(
        addr,
        "/readyz",
        200,
        Duration::from_secs(15),
        "a worker whose broker is back",
    )
    .await;
    eprintln!(
        "readyz 200 {:.0} ms after the relay reopened",
        back.as_secs_f64() * 1000.0
    );
    let metrics = probe(addr, "/metrics").await.expect("/metrics answers");
    assert_eq!(
        sample(&metrics.body, "sigrun_bus_connected"),
        Some(1.0),
        "{}",
        metrics.body
    );

    // A run on the reconnected worker: the messages it handles are counted by stage and outcome.
    let run_id = setup.submit().await;
    let (result, history) = support::wait_for_run(&bus, run_id, std::slice::from_ref(&worker)).await;
    assert_eq!(result, RunResult::Succeeded, "events: {history:#?}{}", worker.report());
    // The last delivery is acked (and counted) just after its events are published: poll briefly.
    let verified = "sigrun_messages_handled_total{outcome=\"done\",stage=\"verify\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = probe(addr, "/metrics").await.expect("/metrics answers").body;
        if sample(&metrics, verified).unwrap_or(0.0) >= 2.0 || Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        sample(&metrics, verified).unwrap_or(0.0) >= 2.0,
        "both pools verified:\n{metrics}"
    );
    for series in [
        "sigrun_messages_handled_total{outcome=\"advanced\",stage=\"snapshot\"}",
        "sigrun_messages_handled_total{outcome=\"waiting\",stage=\"snapshot\"}",
        "sigrun_messages_handled_total{outcome=\"advanced\",stage=\"replicate\"}",
        "sigrun_messages_handled_total{outcome=\"advanced\",stage=\"pool-create\"}",
    ] {
        assert!(
            sample(&metrics, series).unwrap_or(0.0) >= 1.0,
            "{series} counted:\n{metrics}"
        );
    }
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("sigrun_messages_handled_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();

    worker.stop().await;
    // The worker's own tally of messages handled (deliveries, and the further looks of waits it
    // held) agrees with what the metrics counted (every delivery of this run was acked once: none
    // was returned to its queue).
    let stderr = worker.stderr_text();
    let handled: f64 = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("sigrun worker: stopped (")?
                .split_once(' ')?
                .0
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("the worker says how many deliveries it handled{}", worker.report()));
    assert_eq!(counted, handled, "metrics:\n{metrics}{}", worker.report());
    eprintln!("run {run_id}: {handled} messages handled and counted");

    drop(relay);
    support::delete_topology(bus, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_azure_identity_is_refused_is_alive_but_not_ready() {
    let setup = support::setup("").await;
    let (bus, settings) = support::test_bus(&setup.config).await;
    let wrong_secret = "not-the-pipeline-secret-4711";
    let config = setup.write_config("wrong-secret.toml", &support::amqp_url(), wrong_secret);
    let mut worker = setup.worker_with_config("worker", &config, &["--stage", "verify"]);
    let addr = worker.metrics_addr().await;

    let health = probe(addr, "/healthz").await.expect("/healthz answers");
    assert_eq!(health.status, 200, "{health:?}");
    wait_for_status(
        addr,
        "/readyz",
        503,
        Duration::from_secs(30),
        "a worker without a token",
    )
    .await;
    // Once connected to the broker (the endpoints serve from the start), the token is the reason.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let ready = probe(addr, "/readyz").await.expect("/readyz answers");
        if ready.body.contains("azure") || Instant::now() > deadline {
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(ready.body.contains("azure"), "the reason names Azure: {ready:?}");
    eprintln!("readyz without a token: {} {}", ready.status, ready.body.trim());
    assert!(!ready.body.contains(wrong_secret), "no secret in the reason: {ready:?}");
    assert!(
        ready.body.trim().lines().count() == 1 && ready.body.len() < 200,
        "a short reason: {ready:?}"
    );
    // The bus itself is fine: the token is what is missing.
    let metrics = probe(addr, "/metrics").await.expect("/metrics answers");
    assert_eq!(
        sample(&metrics.body, "sigrun_bus_connected"),
        Some(1.0),
        "{}",
        metrics.body
    );

    worker.stop().await;
    support::delete_topology(bus, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_the_endpoints_from_the_telemetry_setting_while_it_runs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        "[emulator]\ntime_scale = 400.0\n\n[telemetry]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("write config");
    let config = config.display().to_string();
    let mut run = Process::start(
        dir.path(),
        "run",
        &["run", support::process::NIGHTLY, "--config", &config],
        &[],
    );
    let addr = run.metrics_addr().await;
    let health = probe(addr, "/healthz").await.expect("/healthz answers");
    assert_eq!(health.status, 200, "{health:?}");
    wait_for_status(
        addr,
        "/readyz",
        200,
        Duration::from_secs(30),
        "sigrun run (token from its emulator)",
    )
    .await;

    // Scrape while the run goes on, until the first stage's messages show up.
    let snapshot = "sigrun_messages_handled_total{outcome=\"advanced\",stage=\"snapshot\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let answer = probe(addr, "/metrics").await;
        if let Some(answer) = answer
            && sample(&answer.body, snapshot).is_some()
        {
            break answer;
        }
        assert!(Instant::now() < deadline, "no snapshot message counted{}", run.report());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metrics.content_type, "text/plain; version=0.0.4");
    assert_eq!(
        sample(&metrics.body, "sigrun_bus_connected"),
        Some(1.0),
        "{}",
        metrics.body
    );

    assert_eq!(run.wait(Duration::from_secs(120)).await, Some(0), "{}", run.report());
    // The server ends with the run.
    assert!(probe(addr, "/healthz").await.is_none(), "nothing listens after the run");
}

/// A connection that goes silent (no reset, no close) under a history reader: the publish that
/// finds it dead replaces the link within `publish_timeout`, the reader on the old link ends with
/// it (lapin alone would leave it waiting until the heartbeat, a minute or more), and a ledger
/// catches up on the new link. This is what once hung a worker's first catch-up for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_reader_on_a_silent_connection_ends_and_the_ledger_catches_up_after() {
    let setup = support::setup("").await;
    let relay = Relay::start(broker_addr()).await;
    let (before_host, _, after_host) = broker_url_parts();
    let config = setup.write_config(
        "relayed.toml",
        &format!("{before_host}{}{after_host}", relay.addr),
        helpers::PIPELINE_APP.1,
    );
    let mut settings = sigrun::config::Settings::load(Some(&config)).expect("the test config loads");
    settings.amqp.publish_timeout = Duration::from_secs(2);
    let bus = AmqpBus::connect(settings.amqp.clone(), settings.delay_tiers())
        .await
        .expect("the broker through the relay");
    let bus = Arc::new(bus);
    let mut reader = bus.open_history(StreamOffset::First).await.expect("open the history");

    relay.stall();
    let stalled_at = Instant::now();
    let marker = sigrun::ledger::record::Record::Marker(uuid::Uuid::new_v4());
    let published = tokio::time::timeout(Duration::from_secs(15), bus.publish_record(&marker))
        .await
        .expect("a publish on a silent connection gives up within its publish_timeout");
    assert!(published.is_err(), "a silent connection confirms nothing");
    let ended = tokio::time::timeout(Duration::from_secs(10), reader.next_record())
        .await
        .expect("the reader on the dead link ends with it");
    assert!(
        matches!(ended, None | Some(Err(_))),
        "no record comes from a silent connection: {ended:?}"
    );
    eprintln!(
        "reader ended {:.0} ms after the connection went silent",
        stalled_at.elapsed().as_secs_f64() * 1000.0
    );
    tokio::time::timeout(Duration::from_secs(15), reader.close())
        .await
        .expect("closing a reader on a silent connection does not wait for ever");

    let ledger = Ledger::start(Arc::clone(&bus) as Arc<dyn Bus>, settings.runtime.ledger(), None);
    // As the worker does: tried again while the bus reconnects (closing the silent connection
    // waits out its close timeout first).
    let began = Instant::now();
    let mut caught = ledger.catch_up(Duration::from_secs(5)).await;
    while caught.is_err() && began.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        caught = ledger.catch_up(Duration::from_secs(5)).await;
    }
    caught.expect("the ledger catches up on a new connection");
    eprintln!(
        "ledger caught up {:.0} ms later",
        began.elapsed().as_secs_f64() * 1000.0
    );
    drop(ledger);
    tokio::time::timeout(Duration::from_secs(30), bus.close())
        .await
        .expect("the bus closes");
    AmqpBus::delete_topology(&settings.amqp, &settings.delay_tiers())
        .await
        .expect("delete the test's topology");
    relay.set_cut(true);
}
