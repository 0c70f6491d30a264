//! Logs and traces, from real `sigrun` processes: a run on three worker processes (JSON logs at
//! debug) started by a trigger carrying a producer's `traceparent` — every stage message has the
//! `traceparent` header equal to its envelope's and in the producer's trace, and every log line of
//! the run, from any worker, carries `run_id`, `pipeline`, `stage` and that `trace_id`; and whole
//! runs at trace level (`sigrun run`, JSON and human, and workers whose broker URL carries a
//! password) whose every log line is searched for the client secret, bearer tokens (JWT-shaped),
//! SAS signatures and the broker password. Dependencies log at trace level too: nothing is
//! filtered out by the tests.

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use sigrun::bus::amqp::topology::Names;
use sigrun::events::RunResult;
use sigrun::model::envelope::{Envelope, Stage};
use sigrun::model::trace::TraceParent;
use sigrun::model::trigger::{Trigger, run_id};
use support::process::NIGHTLY;
use support::{Process, VERSION};

const PIPELINE: &str = "nightly-ubuntu";
const PRODUCER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The JSON lines of a process's stderr; anything else there must be the banner `sigrun worker`
/// prints itself (not a log line).
fn json_lines(process: &Process) -> Vec<(String, Value)> {
    process
        .stderr_text()
        .lines()
        .filter(|line| !line.starts_with("sigrun worker: "))
        .map(|line| {
            let value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}{}", process.report()));
            (line.to_string(), value)
        })
        .collect()
}

/// Copies of every message the work exchange routes to a stage (a queue of the test's own bound
/// with each stage's key), to look at their headers.
async fn tap(connection: &Connection, prefix: &str) -> (lapin::Channel, String) {
    let channel = connection.create_channel().await.expect("channel");
    let queue = format!("{prefix}.tap");
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.as_str().into(), options, FieldTable::default())
        .await
        .expect("declare the tap queue");
    let work = Names::new(prefix).work();
    for stage in Stage::ALL {
        channel
            .queue_bind(
                queue.as_str().into(),
                work.as_str().into(),
                stage.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the tap queue");
    }
    (channel, queue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_across_workers_is_one_trace_and_every_line_of_it_names_run_pipeline_and_stage() {
    let setup = support::setup("").await;
    let (bus, settings) = support::test_bus(&setup.config).await;
    let connection = Connection::connect(&support::amqp_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("{}", support::broker_down_help(e)));
    let (channel, tap_queue) = tap(&connection, &setup.prefix).await;

    let json = ["--log", "debug", "--log-format", "json"];
    let split = [
        ("trunk", ["--stage", "snapshot", "--stage", "image-create"]),
        ("gallery", ["--stage", "gallery-publish", "--stage", "replicate"]),
        ("pools", ["--stage", "pool-create", "--stage", "verify"]),
    ];
    let mut workers: Vec<Process> = split
        .iter()
        .map(|(name, stages)| {
            let mut args = stages.to_vec();
            args.extend_from_slice(&json);
            setup.worker(name, &args)
        })
        .collect();
    for worker in &mut workers {
        let addr = worker.metrics_addr().await;
        support::wait_for_status(addr, "/readyz", 200, Duration::from_secs(30), &worker.command).await;
    }

    // A producer's trigger with its trace context in the AMQP header.
    let mut trigger = Trigger::new(PIPELINE);
    trigger.version = Some(VERSION.to_string());
    bus.publish_trigger_traced(&trigger.encode(), "application/json", Some("logs-1"), Some(PRODUCER))
        .await
        .expect("publish the trigger");
    let run = run_id(PIPELINE, VERSION);
    let (result, history) = support::wait_for_run(&bus, run, &workers).await;
    assert_eq!(result, RunResult::Succeeded, "events: {history:#?}");
    for worker in &mut workers {
        worker.stop().await;
    }
    let producer = TraceParent::parse(PRODUCER).unwrap();

    // Every stage message: the header, equal to the envelope's, in the producer's trace.
    let mut messages = 0;
    let mut parents = BTreeSet::new();
    while let Some(got) = channel
        .basic_get(tap_queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let envelope = Envelope::decode(&got.delivery.data).expect("a stage message is an envelope");
        let header = got
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("traceparent").cloned());
        let Some(AMQPValue::LongString(header)) = header else {
            panic!("a {} message without a traceparent header: {header:?}", envelope.stage);
        };
        let header = String::from_utf8_lossy(header.as_bytes()).into_owned();
        assert_eq!(header, envelope.traceparent, "the header is the envelope's");
        let parsed = TraceParent::parse(&header).expect("a W3C traceparent");
        assert_eq!(parsed.trace_id(), producer.trace_id(), "{} message", envelope.stage);
        assert_ne!(
            parsed.span_id(),
            producer.span_id(),
            "the admission is a span of its own"
        );
        parents.insert(parsed.span_id().to_string());
        messages += 1;
    }
    // At least every hop between the workers (a hop within one is stepped on, a wait kept with
    // its delivery): the first message, gallery-publish's, and a pool-create for each of the two
    // pools, sent by three steps at least.
    assert!(messages >= 4, "the run's stage messages went by the tap: {messages}");
    assert!(
        parents.len() >= 3,
        "each hop names its own parent span: {} parents over {messages} messages",
        parents.len()
    );

    // Every log line of the run, from every worker.
    let run_text = run.to_string();
    let mut traced_workers = 0;
    for worker in &workers {
        let mut of_run = 0;
        for (line, value) in json_lines(worker) {
            let target = value["target"].as_str().unwrap_or_default();
            // Admission and the quota watch read Azure for no run (yet).
            let in_trigger_span = value["span"]
                .as_str()
                .is_some_and(|s| s.contains("trigger") || s.contains("quota_watch"));
            let concerns_run = line.contains(&run_text)
                || target.starts_with("sigrun::stages")
                || (target.starts_with("sigrun::azure") && !in_trigger_span)
                || value["span"].as_str().is_some_and(|s| s.contains("delivery"));
            if !concerns_run {
                continue;
            }
            of_run += 1;
            assert_eq!(value["run_id"], run_text, "run_id on: {line}");
            assert_eq!(value["pipeline"], PIPELINE, "pipeline on: {line}");
            assert!(value["stage"].is_string(), "stage on: {line}");
            assert_eq!(value["trace_id"], producer.trace_id(), "trace_id on: {line}");
        }
        if of_run > 0 {
            traced_workers += 1;
        }
    }
    assert_eq!(traced_workers, 3, "each worker logged lines of the run");

    let _ = connection.close(200, "done".into()).await;
    support::delete_topology(bus, &settings).await;
}

/// What must never be in a log line; `what` says which secret a pattern stands for.
fn leaks(text: &str, secrets: &[(&str, &str)]) -> Vec<String> {
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        for (what, pattern) in secrets {
            if line.contains(pattern) {
                found.push(format!("line {}: {what} (`{pattern}`): {line}", number + 1));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_line_of_whole_runs_logged_at_trace_level() {
    // Learn what the emulator's tokens look like: JWTs, so `eyJ` finds any of them.
    let emu = helpers::start_fast().await;
    let token = emu.arm_token().await;
    assert!(
        token.starts_with("eyJ"),
        "the emulator issues JWT-shaped tokens: {token}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let secrets = [
        ("client secret", helpers::PIPELINE_APP.1),
        ("bearer token", "eyJ"),
        ("authorization header", "Bearer "),
        ("SAS signature", "sig="),
    ];

    // `sigrun run` (the built-in emulator) at trace level, both formats.
    for format in ["json", "human"] {
        let mut run = Process::start(
            dir.path(),
            &format!("run-{format}"),
            &["run", NIGHTLY, "--log", "trace", "--log-format", format],
            &[],
        );
        let code = run.wait(Duration::from_secs(240)).await;
        assert_eq!(code, Some(0), "the run succeeds{}", run.report());
        let text = run.stderr_text();
        let trace_marker = if format == "json" {
            "\"level\":\"TRACE\""
        } else {
            " TRACE "
        };
        assert!(
            text.lines().filter(|line| line.contains(trace_marker)).count() > 100,
            "trace lines were written ({} lines)",
            text.lines().count()
        );
        let found = leaks(&text, &secrets);
        assert!(
            found.is_empty(),
            "secrets in `sigrun run --log-format {format}` logs:\n{}",
            found.join("\n")
        );
    }

    // Workers whose broker URL carries a password of the test's own (a user made for it).
    let setup = support::setup("").await;
    let user = format!("{}-user", setup.prefix);
    let password = format!("pw-{}", &uuid::Uuid::new_v4().simple().to_string()[..20]);
    support::broker::rabbitmqctl(&["add_user", &user, &password]);
    support::broker::rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let url = format!("amqp://{user}:{password}@127.0.0.1:5672/%2f");
    let config = setup.write_config("password.toml", &url, helpers::PIPELINE_APP.1);
    let (bus, settings) = support::test_bus(&config).await;
    let mut workers = Vec::new();
    for format in ["json", "human"] {
        let mut worker = setup.worker_with_config(
            &format!("worker-{format}"),
            &config,
            &["--all-stages", "--log", "trace", "--log-format", format],
        );
        worker.metrics_addr().await;
        workers.push(worker);
    }
    let run = setup.submit().await;
    let (result, history) = support::wait_for_run(&bus, run, &workers).await;
    assert_eq!(result, RunResult::Succeeded, "events: {history:#?}");
    for worker in &mut workers {
        worker.stop().await;
    }
    support::delete_topology(bus, &settings).await;
    support::broker::rabbitmqctl(&["delete_user", &user]);
    let mut with_password = secrets.to_vec();
    with_password.push(("broker password", password.as_str()));
    for worker in &workers {
        let text = worker.stderr_text();
        // The broker client's own trace lines are in the search (frames, connection start).
        let lapin_traces = text
            .lines()
            .filter(|line| line.contains("TRACE") && line.contains("lapin"))
            .count();
        assert!(
            lapin_traces > 10,
            "{} logged {} lines, {lapin_traces} of them lapin's at trace",
            worker.command,
            text.lines().count()
        );
        let found = leaks(&text, &with_password);
        assert!(
            found.is_empty(),
            "secrets in {} logs:\n{}",
            worker.command,
            found.join("\n")
        );
    }
}
