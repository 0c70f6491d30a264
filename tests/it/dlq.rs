//! The operator commands end to end — `sigrun dlq list|replay`, `sigrun status`, `sigrun watch` —
//! as real processes of the built binary against the real broker, with real `sigrun worker`
//! processes calling the emulator (the set-up of `workers.rs`, shared with it). A step made to fail
//! persistently through the emulator's fault plan ends parked with its reason and is replayed once
//! the fault is cleared, and the run completes; garbage, oversized, broken and unroutable messages
//! end parked with their reason and are refused by replay; `watch` follows one run live across a
//! connection the broker closes. Each test has its own prefix and deletes its topology at the end.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use sigrun::bus::Bus;
use sigrun::bus::amqp::AmqpBus;
use sigrun::bus::amqp::topology::Names;
use sigrun::events::{Event, EventKind, RunResult, run_result};
use sigrun::model::envelope::{Branch, ENVELOPE_VERSION, Envelope, MAX_ENVELOPE_BYTES, Stage, new_traceparent};
use sigrun::model::ids::{GalleryId, GalleryImageId, GalleryImageVersionId};
use sigrun::model::plan::Plan;
use sigrun::model::spec::PipelineSpec;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::process::{NIGHTLY, Process};
use crate::workers::{RUN_LIMIT, Setup, VERSION, amqp_url, setup, test_bus};

/// Runs `sigrun ARGS --config <the test's>` to its end: exit code, stdout, stderr.
async fn sigrun(setup: &Setup, name: &str, args: &[&str]) -> (Option<i32>, String, String, Process) {
    let config = setup.config.display().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", config.as_str()]);
    let mut process = Process::start(&setup.dir, name, &all, &[]);
    let code = process.wait(Duration::from_secs(60)).await;
    let stdout = process.stdout_text();
    let stderr = process.stderr_text();
    (code, stdout, stderr, process)
}

/// `sigrun dlq list --json`.
async fn parked(setup: &Setup) -> Vec<Value> {
    let (code, stdout, _, process) = sigrun(setup, "dlq-list-json", &["dlq", "list", "--json"]).await;
    assert_eq!(code, Some(0), "{}", process.report());
    let list: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("JSON ({e}){}", process.report()));
    list.as_array().cloned().expect("a JSON array")
}

/// Waits (bounded) until `dlq list` shows `count` parked messages.
async fn parked_eventually(setup: &Setup, count: usize, workers: &[&Process]) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let list = parked(setup).await;
        if list.len() >= count {
            return list;
        }
        if tokio::time::Instant::now() > deadline {
            let logs: String = workers.iter().map(|w| w.report()).collect();
            panic!(
                "{count} parked messages expected, {} there: {list:#?}{logs}",
                list.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads the events stream from its start, collecting `run_id`'s events until `done` says so.
async fn follow_until(
    bus: &AmqpBus,
    run_id: Uuid,
    workers: &[&Process],
    done: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let mut reader = bus
        .read_events(sigrun::bus::amqp::StreamOffset::First)
        .await
        .expect("read the events stream");
    let mut history = Vec::new();
    let deadline = tokio::time::Instant::now() + RUN_LIMIT;
    loop {
        let streamed = match tokio::time::timeout_at(deadline, reader.next()).await {
            Ok(Some(Ok(streamed))) => streamed,
            Ok(other) => panic!("the events stream ended: {:?}", other.map(|r| r.map(|_| ()))),
            Err(_) => {
                let logs: String = workers.iter().map(|w| w.report()).collect();
                panic!("run {run_id} did not get there within {RUN_LIMIT:?}; events: {history:#?}{logs}");
            }
        };
        if streamed.event.run_id != run_id {
            continue;
        }
        history.push(streamed.event);
        if done(&history) {
            reader.close().await;
            return history;
        }
    }
}

/// Waits (bounded) until `file` holds `text` (a process's output).
async fn file_holds(file: &Path, text: &str, process: &Process) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let content = std::fs::read_to_string(file).unwrap_or_default();
        if content.contains(text) {
            return content;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`{text}` never came{}",
            process.report()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn teardown(bus: AmqpBus, setup: &Setup) {
    bus.close().await;
    let settings = sigrun::config::Settings::load(Some(&setup.config)).expect("the test config loads");
    AmqpBus::delete_topology(&settings.amqp, &settings.delay_tiers())
        .await
        .expect("delete the test topology");
}

/// Every PUT of an image version answers 500, and a worker of every stage that gives up after two
/// tries (no retries inside the client): gallery-publish fails the trunk and parks its message.
async fn poisoned_worker(setup: &Setup) -> Process {
    let config = setup.config.display().to_string();
    setup.emu.set_faults("500:method=PUT,path=/versions/").await;
    Process::start(
        &setup.dir,
        "worker",
        &["worker", "--all-stages", "--config", &config],
        &[
            ("SIGRUN__RUNTIME__RETRY__MAX_ATTEMPTS", "2"),
            ("SIGRUN__AZURE__CLIENT__RETRY__MAX_ATTEMPTS", "1"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_step_is_parked_with_its_reason_and_dlq_replay_completes_the_run_once_fixed() {
    let setup = setup().await;
    let (bus, _) = test_bus(&setup.config).await;
    let config = setup.config.display().to_string();
    let mut worker = poisoned_worker(&setup).await;
    let run_id = setup.submit().await;
    let history = follow_until(&bus, run_id, &[&worker], |h| run_result(h) != RunResult::Running).await;
    let RunResult::Failed { reason } = run_result(&history) else {
        panic!("the run fails first: {history:#?}{}", worker.report());
    };
    assert!(
        reason.contains("gave up after 2 attempts") && reason.contains("500"),
        "{reason}"
    );

    // Parked with its reason, and still there however often it is looked at.
    let list = parked_eventually(&setup, 1, &[&worker]).await;
    let _ = parked(&setup).await;
    let list_again = parked(&setup).await;
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list_again.len(), 1, "listing removes nothing: {list_again:#?}");
    let message = &list[0];
    assert_eq!(message["run_id"], run_id.to_string());
    assert_eq!(message["stage"], "gallery-publish");
    assert_eq!(message["branch"], "trunk");
    assert_eq!(message["origin"], "runtime");
    assert_eq!(message["attempts"], 2);
    assert_eq!(message["replayable"], true);
    assert!(
        message["first_seen"].is_string() && message["last_seen"].is_string(),
        "{message}"
    );
    let error = message["error"].as_str().unwrap_or_default();
    assert!(error.contains("gave up after 2 attempts"), "{error}");
    let id = message["id"].as_str().expect("an id").to_string();
    let (code, table, _, process) = sigrun(&setup, "dlq-list", &["dlq", "list"]).await;
    assert_eq!(code, Some(0), "{}", process.report());
    let row = table
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("gallery-publish") && row.contains("trunk") && row.contains("yes"),
        "{table}"
    );

    // Someone watches the run while it is replayed.
    let short = &run_id.to_string()[..8];
    let mut watch = Process::start(
        &setup.dir,
        "watch",
        &["watch", "--run", short, "--config", &config],
        &[],
    );
    file_holds(&watch.stderr, "following", &watch).await;

    // The cause is fixed; the message is replayed and the run goes on to the end.
    setup.emu.set_faults("").await;
    let (code, stdout, _, process) = sigrun(&setup, "dlq-replay", &["dlq", "replay", &id]).await;
    assert_eq!(code, Some(0), "{}", process.report());
    assert!(stdout.contains(&format!("replayed {id}")), "{}", process.report());
    let history = follow_until(&bus, run_id, &[&worker], |h| {
        h.iter().any(|e| matches!(e.kind, EventKind::Replayed { .. })) && run_result(h) != RunResult::Running
    })
    .await;
    assert_eq!(
        run_result(&history),
        RunResult::Succeeded,
        "events: {history:#?}{}",
        worker.report()
    );
    let replayed = history
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Replayed { message_id, error } => Some((message_id.to_string(), error.clone(), e)),
            _ => None,
        })
        .expect("a Replayed event");
    assert_eq!(replayed.0, id);
    assert_eq!(replayed.1, error);
    assert_eq!(
        (replayed.2.stage, &replayed.2.branch),
        (Stage::GalleryPublish, &Branch::Trunk)
    );
    assert!(
        parked(&setup).await.is_empty(),
        "the replayed message left the parking queue"
    );

    // status: the run's timeline and result, by a prefix of its id; in the list of runs; as JSON.
    let (code, timeline, _, process) = sigrun(&setup, "status-run", &["status", short]).await;
    assert_eq!(code, Some(0), "{}", process.report());
    assert!(timeline.contains(&format!("run       {run_id}")), "{timeline}");
    assert!(timeline.contains("run failed: gave up after 2 attempts"), "{timeline}");
    assert!(
        timeline.contains(&format!("replayed parked message {id}")),
        "{timeline}"
    );
    assert!(
        timeline.contains("pool-create") && timeline.contains("verified"),
        "{timeline}"
    );
    assert!(timeline.trim_end().ends_with("result: succeeded"), "{timeline}");
    let (code, runs, _, process) = sigrun(&setup, "status", &["status"]).await;
    assert_eq!(code, Some(0), "{}", process.report());
    let row = runs
        .lines()
        .find(|l| l.starts_with(&run_id.to_string()))
        .unwrap_or_else(|| panic!("{runs}"));
    assert!(
        row.contains("nightly-ubuntu") && row.contains(VERSION) && row.contains("succeeded"),
        "{runs}"
    );
    let (code, json, _, process) = sigrun(&setup, "status-json", &["status", "--json", &run_id.to_string()]).await;
    assert_eq!(code, Some(0), "{}", process.report());
    let json: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(json["result"]["state"], "succeeded");
    assert_eq!(json["events"].as_array().map(Vec::len), Some(history.len()));

    // The watch saw the replay and what followed it, and stops on SIGTERM with exit 0.
    file_holds(&watch.stdout, "verified", &watch).await;
    watch.signal("TERM");
    assert_eq!(watch.wait(Duration::from_secs(20)).await, Some(0), "{}", watch.report());
    let watched = watch.stdout_text();
    assert!(watched.contains(&format!("replayed parked message {id}")), "{watched}");
    assert!(
        watched.lines().all(|l| l.contains(short)),
        "only the run's events: {watched}"
    );

    worker.signal("TERM");
    assert_eq!(
        worker.wait(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        worker.report()
    );
    teardown(bus, &setup).await;
}

/// A replay publishes its history commit, then the message; a worker may be handed the message
/// before its ledger has read the commit, and the run had settled (nothing of it live) when it
/// failed. Here the message goes first and the commit 150 ms later, on purpose: the worker must
/// wait for the commit rather than drop the copy as a stale one of a finished run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_message_delivered_before_its_commit_is_read_carries_the_run_on() {
    let setup = setup().await;
    let (bus, _) = test_bus(&setup.config).await;
    let mut worker = poisoned_worker(&setup).await;
    let run_id = setup.submit().await;
    follow_until(&bus, run_id, &[&worker], |h| run_result(h) != RunResult::Running).await;
    parked_eventually(&setup, 1, &[&worker]).await;
    setup.emu.set_faults("").await;

    let mut browser = bus.browse_parked(10).await.expect("browse the parking queue");
    let parked = Envelope::decode(&browser.messages()[0].body).expect("a parked envelope");
    let (envelope, commit) = sigrun::dlq::revived(parked, "replayed out of order by the test");
    bus.publish(envelope.stage, &envelope.encode(), None)
        .await
        .expect("the message first");
    tokio::time::sleep(Duration::from_millis(150)).await;
    bus.publish_record(&commit).await.expect("then the commit");
    browser.remove(0).await.expect("out of parking");
    browser.close().await;

    let history = follow_until(&bus, run_id, &[&worker], |h| {
        h.iter().any(|e| matches!(e.kind, EventKind::Replayed { .. })) && run_result(h) != RunResult::Running
    })
    .await;
    assert_eq!(
        run_result(&history),
        RunResult::Succeeded,
        "{history:#?}{}",
        worker.report()
    );
    assert!(
        !history
            .iter()
            .any(|e| matches!(e.kind, EventKind::DuplicateDropped { .. })),
        "the replayed copy was not dropped: {history:#?}"
    );
    worker.signal("TERM");
    assert_eq!(
        worker.wait(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        worker.report()
    );
    teardown(bus, &setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_end_parked_with_their_reason_and_replay_refuses_them() {
    let setup = setup().await;
    let (bus, settings) = test_bus(&setup.config).await;
    let config = setup.config.display().to_string();
    let mut worker = Process::start(
        &setup.dir,
        "worker",
        &["worker", "--stage", "snapshot", "--config", &config],
        &[],
    );

    // Straight onto the broker, as a broken producer would.
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ is reachable (`rabbitmq-server -detached`)");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let work = Names::new(&setup.prefix).work();
    let broken_run = Uuid::new_v4();
    let broken_id = Uuid::new_v4();
    let garbage = b"\x00\x01 this is not JSON".to_vec();
    let oversized = format!(
        "{{\"v\":{ENVELOPE_VERSION},\"pad\":\"{}\"}}",
        "x".repeat(MAX_ENVELOPE_BYTES)
    )
    .into_bytes();
    // Its run can be read, the rest cannot: the run's history says it was parked.
    let broken = serde_json::json!({
        "v": ENVELOPE_VERSION, "message_id": broken_id, "run_id": broken_run, "pipeline": "nightly-ubuntu",
        "version": "2026.1126.9", "stage": "snapshot", "branch": {"kind": "trunk"},
    })
    .to_string()
    .into_bytes();
    for (key, body) in [
        ("snapshot", &garbage),
        ("snapshot", &oversized),
        ("snapshot", &broken),
        ("no-such-stage", &garbage),
    ] {
        let confirm = channel
            .basic_publish(
                work.as_str().into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "the broker took it");
    }
    let _ = connection.close(200, "done".into()).await;

    let list = parked_eventually(&setup, 4, &[&worker]).await;
    assert_eq!(list.len(), 4, "{list:#?}");
    let find = |what: &str| {
        list.iter()
            .find(|m| m["error"].as_str().unwrap_or_default().contains(what))
            .unwrap_or_else(|| panic!("a message parked for `{what}`: {list:#?}"))
    };
    let not_json = find("not JSON");
    let too_big = find("over the limit");
    let schema = find(&format!("does not match envelope v{ENVELOPE_VERSION}"));
    let unroutable = find("no-such-stage");
    for message in [not_json, too_big, schema] {
        assert_eq!(message["origin"], "runtime", "{message}");
        assert_eq!(message["stage"], "snapshot", "{message}");
        assert_eq!(message["replayable"], false, "{message}");
        assert!(message["first_seen"].is_string(), "{message}");
    }
    assert!(not_json["id"].as_str().unwrap_or_default().starts_with("sha256:"));
    assert_eq!(too_big["bytes"], oversized.len());
    assert_eq!(schema["id"], broken_id.to_string());
    assert_eq!(schema["run_id"], broken_run.to_string());
    assert_eq!(unroutable["origin"], "unroutable");
    assert_eq!(unroutable["replayable"], false);

    // Looking does not take them away: 25 listings (more than RabbitMQ 4's default delivery limit
    // of 20 for quorum queues) and all four are still parked.
    for _ in 0..25 {
        let browser = bus.browse_parked(100).await.expect("browse the parking queue");
        assert_eq!(browser.messages().len(), 4);
        browser.close().await;
    }
    let browser = bus.browse_parked(100).await.expect("browse the parking queue");
    let returns: Vec<u32> = browser.messages().iter().map(|m| m.returns).collect();
    browser.close().await;
    eprintln!("returns counted on the parked copies after 25+ listings: {returns:?}");

    // Replay refuses each with why; all stay parked.
    let id = not_json["id"].as_str().unwrap_or_default();
    let (code, _, stderr, process) = sigrun(&setup, "replay-garbage", &["dlq", "replay", id]).await;
    assert_eq!(code, Some(1), "{}", process.report());
    assert!(
        stderr.contains(&format!("not replayed {id}")) && stderr.contains("not JSON"),
        "{}",
        process.report()
    );
    let (code, _, stderr, process) = sigrun(&setup, "replay-all", &["dlq", "replay", "--all"]).await;
    assert_eq!(code, Some(1), "{}", process.report());
    assert_eq!(stderr.matches("not replayed").count(), 4, "{}", process.report());
    assert!(stderr.contains("over the limit"), "{}", process.report());
    let (code, _, stderr, process) = sigrun(&setup, "replay-unknown", &["dlq", "replay", "no-such-id"]).await;
    assert_eq!(code, Some(2), "{}", process.report());
    assert!(
        stderr.contains("no parked message `no-such-id`"),
        "{}",
        process.report()
    );
    assert_eq!(parked(&setup).await.len(), 4, "nothing left the parking queue");

    // The broken message's run: parked, so failed, as status tells.
    let (code, timeline, _, process) = sigrun(&setup, "status-broken", &["status", &broken_run.to_string()]).await;
    assert_eq!(code, Some(0), "{}", process.report());
    assert!(
        timeline.contains(&format!(
            "message parked: message does not match envelope v{ENVELOPE_VERSION}"
        )),
        "{timeline}"
    );
    assert!(timeline.contains("result: failed: parked: "), "{timeline}");
    let (code, _, stderr, process) = sigrun(&setup, "status-unknown", &["status", "ffffffff"]).await;
    assert_eq!(code, Some(2), "{}", process.report());
    assert!(stderr.contains("no run `ffffffff`"), "{}", process.report());

    // A valid message the broker dead-letters (returned past the delivery limit, no worker for
    // its stage here): parked by the broker with `x-death`, and replayable.
    let message = envelope(Stage::Verify);
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ is reachable");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    channel
        .basic_publish(
            work.as_str().into(),
            "verify".into(),
            BasicPublishOptions::default(),
            &message.encode(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let verify_queue = Names::new(&setup.prefix).stage_queue(Stage::Verify);
    // Delivered `delivery_limit + 1` times, each returned; then the broker parks it.
    for _ in 0..=settings.amqp.delivery_limit {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let got = loop {
            if let Some(got) = channel
                .basic_get(verify_queue.as_str().into(), BasicGetOptions::default())
                .await
                .expect("basic.get")
            {
                break got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the message is back on {verify_queue}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        got.delivery.acker.nack(requeue).await.expect("nack");
    }
    let list = parked_eventually(&setup, 5, &[&worker]).await;
    let dead = list
        .iter()
        .find(|m| m["id"] == message.message_id.to_string())
        .unwrap_or_else(|| panic!("{list:#?}"));
    assert_eq!(dead["origin"], "broker", "{dead}");
    assert_eq!(dead["stage"], "verify");
    assert_eq!(dead["replayable"], true);
    let why = dead["error"].as_str().unwrap_or_default();
    assert!(why.contains("delivery_limit") && why.contains(&verify_queue), "{why}");
    let id = message.message_id.to_string();
    let (code, stdout, _, process) = sigrun(&setup, "replay-dead", &["dlq", "replay", &id]).await;
    assert_eq!(code, Some(0), "{}", process.report());
    assert!(stdout.contains(&format!("replayed {id}")), "{}", process.report());
    // Back on its stage's queue, its attempts reset and its hold gone; out of parking.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let back = loop {
        if let Some(got) = channel
            .basic_get(verify_queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        {
            got.delivery.acker.ack(BasicAckOptions::default()).await.expect("ack");
            break Envelope::decode(&got.delivery.data).expect("a v1 envelope");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replayed message reaches {verify_queue}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(back.message_id, message.message_id);
    assert_eq!((back.attempt, back.not_before), (0, None));
    assert_eq!(parked(&setup).await.len(), 4, "the other four stay parked");
    let history = follow_until(&bus, message.run_id, &[&worker], |h| !h.is_empty()).await;
    assert!(
        matches!(&history[0].kind, EventKind::Replayed { message_id, error }
            if *message_id == message.message_id && error.contains("delivery_limit")),
        "{history:#?}"
    );
    let _ = connection.close(200, "done".into()).await;

    worker.signal("TERM");
    assert_eq!(
        worker.wait(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        worker.report()
    );
    teardown(bus, &setup).await;
}

/// A valid message of a run of its own at `stage`, as if it had failed twice and were held for an
/// hour.
fn envelope(stage: Stage) -> Envelope {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(NIGHTLY)).expect("the spec");
    let spec = PipelineSpec::parse(&text, NIGHTLY).expect("the nightly spec parses");
    let sub = "11111111-1111-4111-8111-111111111111";
    let now = OffsetDateTime::now_utc();
    Envelope {
        v: ENVELOPE_VERSION,
        message_id: Uuid::new_v4(),
        run_id: Uuid::new_v4(),
        pipeline: spec.name.clone(),
        version: "1.0.0".into(),
        stage,
        branch: Branch::Trunk,
        plan: std::sync::Arc::new(Plan {
            version: "1.0.0".into(),
            build: None,
            gallery: GalleryId::new(sub, "rg", &["g"]).expect("id"),
            gallery_region: "westeurope".into(),
            create_gallery: false,
            definition: GalleryImageId::new(sub, "rg", &["g", "d"]).expect("id"),
            version_id: GalleryImageVersionId::new(sub, "rg", &["g", "d", "1.0.0"]).expect("id"),
            regions: Vec::new(),
            pools: Vec::new(),
            publish_excluded: false,
            final_excluded: false,
            end_of_life: None,
            register_batch_in: Vec::new(),
            quota_use: Vec::new(),
            seen: Default::default(),
            warnings: Vec::new(),
        }),
        spec: std::sync::Arc::new(spec),
        artifacts: Default::default(),
        operation: None,
        not_before: Some(now + Duration::from_secs(3600)),
        attempt: 2,
        run_started: now,
        stage_started: now,
        traceparent: new_traceparent(),
        token: Uuid::new_v4(),
        made_by: Uuid::nil(),
        made_from: Uuid::nil(),
        admission: Uuid::nil(),
    }
}

/// Force-closes the test's connections (named `sigrun {prefix}`) from the broker's side.
fn close_connections_of(prefix: &str) -> usize {
    let list = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    let listing = String::from_utf8_lossy(&list.stdout);
    let mut closed = 0;
    for line in listing.lines().filter(|l| l.contains(&format!("sigrun {prefix}"))) {
        let pid = line.split_whitespace().next().expect("a pid");
        let status = Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "test closes it"])
            .status()
            .expect("rabbitmqctl runs");
        assert!(status.success());
        closed += 1;
    }
    closed
}

fn waiting(run_id: Uuid, what: String) -> Event {
    Event {
        run_id,
        pipeline: "nightly-ubuntu".into(),
        version: VERSION.into(),
        stage: Stage::Replicate,
        branch: Branch::Trunk,
        at: OffsetDateTime::now_utc(),
        kind: EventKind::Waiting { what },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_one_run_live_across_a_closed_connection_and_ends_on_sigint() {
    let setup = setup().await;
    let (bus, _) = test_bus(&setup.config).await;
    let config = setup.config.display().to_string();
    let (ours, other) = (Uuid::new_v4(), Uuid::new_v4());
    let mut watch = Process::start(
        &setup.dir,
        "watch",
        &["watch", "--run", &ours.to_string(), "--config", &config],
        &[],
    );
    file_holds(&watch.stderr, "following", &watch).await;
    for step in 0..3 {
        bus.publish_event(&waiting(ours, format!("step {step}")))
            .await
            .expect("publish");
        bus.publish_event(&waiting(other, format!("other {step}")))
            .await
            .expect("publish");
    }
    file_holds(&watch.stdout, "step 2", &watch).await;

    // The broker drops the watch's connection (and the test bus's); both come back by themselves.
    assert!(
        close_connections_of(&setup.prefix) >= 2,
        "the watch and the test bus were connected"
    );
    for step in 3..6 {
        bus.publish_event(&waiting(ours, format!("step {step}")))
            .await
            .expect("publish");
        bus.publish_event(&waiting(other, format!("other {step}")))
            .await
            .expect("publish");
    }
    file_holds(&watch.stdout, "step 5", &watch).await;
    watch.signal("INT");
    assert_eq!(watch.wait(Duration::from_secs(20)).await, Some(0), "{}", watch.report());

    let watched = watch.stdout_text();
    let steps: Vec<&str> = watched
        .lines()
        .map(|l| l.rsplit("waiting for ").next().unwrap_or_default())
        .collect();
    assert_eq!(
        steps,
        ["step 0", "step 1", "step 2", "step 3", "step 4", "step 5"],
        "each of the run's events once, in order, none of the other run's{}",
        watch.report()
    );
    let short = &ours.to_string()[..8];
    assert!(
        watched
            .lines()
            .all(|l| l.contains(short) && l.contains("replicate  trunk")),
        "{watched}"
    );
    let stderr = watch.stderr_text();
    assert!(stderr.contains("lost the events stream"), "{}", watch.report());
    teardown(bus, &setup).await;
}
