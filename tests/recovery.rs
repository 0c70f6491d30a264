//! A worker killed with SIGKILL while it holds an unacked delivery of a step that creates Azure
//! resources: the broker hands the delivery to another worker, the run completes, and no resource
//! is created twice. Real `sigrun worker` processes, the real broker, the emulator in this process.
//!
//! The emulator slows the run's second snapshot PUT (30 s), so the snapshot worker is caught half
//! way through its step: the first snapshot created (201), the delivery unacked. A standby worker
//! is started and ready, the snapshot worker is SIGKILLed, and the standby takes the redelivered
//! message and finishes the run. The emulator's request log then shows the step repeated by the
//! standby, answered by ARM's idempotent 200 for what already existed, every resource PUT answered
//! "created" (201; 202 for a snapshot, which Azure creates as a long-running operation) at most
//! once, and at most one pool added per Batch account (the nightly plans one in each).
//!
//! And a worker killed while it keeps a wait with its delivery (`runtime.keep_waits`: the wait's
//! state is in the step's commit, not in any queue): the broker hands the delivery back, the next
//! worker reads the kept state back from the history and carries the wait on, and the run
//! completes with every resource recorded once.

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use sigrun::bus::amqp::AmqpBus;
use sigrun::bus::amqp::topology::Names;
use sigrun::bus::{Bus, StreamOffset};
use sigrun::events::{EventKind, RunResult};
use sigrun::ledger::record::Record;
use sigrun::model::envelope::Stage;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The second snapshot PUT of the run waits this long in the emulator before it is handled.
const SLOW_PUT: &str = "slow:api=arm,method=PUT,path=/snapshots/,at=2,delay_ms=30000";

/// How the emulator answers a PUT that created the resource (a repeat of the same PUT gets 200).
fn is_created(entry: &Value) -> bool {
    entry["status"] == 201 || entry["status"] == 202
}

fn answered_at(entry: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(entry["time"].as_str().expect("a logged time"), &Rfc3339).expect("an RFC 3339 time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_holding_an_unacked_create_step_loses_nothing_and_creates_nothing_twice() {
    let setup = support::setup(SLOW_PUT).await;
    let (bus, settings) = support::test_bus(&setup.config).await;
    let snapshot_queue = Names::new(&setup.prefix).stage_queue(Stage::Snapshot);

    let mut doomed = setup.worker("doomed", &["--stage", "snapshot"]);
    let doomed_addr = doomed.metrics_addr().await;
    support::wait_for_status(
        doomed_addr,
        "/readyz",
        200,
        Duration::from_secs(30),
        "the snapshot worker",
    )
    .await;
    let run_id = setup.submit().await;

    // Wait until the snapshot worker is inside its step: the first snapshot created, the second
    // PUT held by the emulator, the delivery unacked.
    let deadline = Instant::now() + Duration::from_secs(60);
    let snapshot_puts = |log: &[Value]| {
        log.iter()
            .filter(|e| e["method"] == "PUT" && e["path"].as_str().is_some_and(|p| p.contains("/snapshots/")))
            .cloned()
            .collect::<Vec<_>>()
    };
    loop {
        let log = setup.emu.requests().await;
        if snapshot_puts(&log).iter().any(is_created) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first snapshot was never created{}",
            doomed.report()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The broker's view (its queue statistics refresh every 5 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    while support::broker::unacked(&snapshot_queue).await != 1 {
        assert!(
            Instant::now() < deadline,
            "the broker never showed the snapshot delivery unacked{}",
            doomed.report()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A standby, ready before the kill: it gets the delivery back as soon as the broker frees it.
    let mut standby = setup.worker("standby", &["--all-stages"]);
    let standby_addr = standby.metrics_addr().await;
    support::wait_for_status(standby_addr, "/readyz", 200, Duration::from_secs(30), "the standby").await;
    assert_eq!(
        support::broker::unacked(&snapshot_queue).await,
        1,
        "the delivery is still held by the snapshot worker (the standby got nothing yet){}",
        standby.report()
    );
    let before_kill = setup.emu.requests().await.len();
    let killed_at = OffsetDateTime::now_utc();
    doomed.signal("KILL");
    let code = doomed.wait(Duration::from_secs(10)).await;
    assert_eq!(code, None, "killed by a signal, no exit code{}", doomed.report());

    let (result, history) = support::wait_for_run(&bus, run_id, std::slice::from_ref(&standby)).await;
    assert_eq!(
        result,
        RunResult::Succeeded,
        "events: {history:#?}{}{}",
        doomed.report(),
        standby.report()
    );

    let log = setup.emu.requests().await;
    // The redelivery: the standby's first request after the kill (the slowed PUT, which the
    // killed worker sent, is left out).
    let redelivered = log[before_kill..]
        .iter()
        .filter(|e| e["fault"].is_null())
        .find(|e| answered_at(e) > killed_at)
        .unwrap_or_else(|| panic!("no request after the kill{}", standby.report()));
    let redelivery_ms = (answered_at(redelivered) - killed_at).whole_milliseconds();
    eprintln!(
        "kill -9 → the redelivered step's first request answered: {redelivery_ms} ms ({} {})",
        redelivered["method"], redelivered["path"]
    );
    // The snapshot step again: does the run's version exist already (then nothing is copied), and
    // then what did the killed worker make?
    let path = |e: &Value| e["path"].as_str().unwrap_or_default().to_string();
    assert!(
        redelivered["method"] == "GET" && path(redelivered).contains("/versions/"),
        "the standby's first call repeats the snapshot step, looking for the run's version: {redelivered}"
    );
    let looked_for_snapshot = log[before_kill..]
        .iter()
        .filter(|e| e["fault"].is_null() && answered_at(e) > killed_at)
        .find(|e| path(e).contains("/snapshots/"));
    assert!(
        looked_for_snapshot.is_some_and(|e| e["method"] == "GET"),
        "then it looks for what the killed worker made before writing: {looked_for_snapshot:?}"
    );

    // Every resource PUT was answered "created" at most once; a repeat got ARM's 200.
    let mut created: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for entry in log.iter().filter(|e| e["method"] == "PUT") {
        let path = entry["path"].as_str().unwrap_or_default().to_ascii_lowercase();
        created
            .entry(path)
            .or_default()
            .push(entry["status"].as_u64().unwrap_or(0));
    }
    for (path, statuses) in &created {
        let creates = statuses.iter().filter(|s| **s == 201 || **s == 202).count();
        assert!(creates <= 1, "{path} was created {creates} times: {statuses:?}");
    }
    // Pools are added with a POST to the account's pool collection: one per account.
    let mut pools_added: BTreeMap<String, usize> = BTreeMap::new();
    for entry in log.iter().filter(|e| e["method"] == "POST" && e["status"] == 201) {
        let path = entry["path"].as_str().unwrap_or_default();
        if path.ends_with("/pools") {
            *pools_added.entry(path.to_string()).or_default() += 1;
        }
    }
    assert_eq!(
        pools_added.len(),
        2,
        "a pool added in each of the two accounts: {pools_added:?}"
    );
    assert!(
        pools_added.values().all(|n| *n == 1),
        "no pool added twice: {pools_added:?}"
    );
    // The first snapshot was created by the killed worker and PUT again by the standby.
    let first_snapshot = snapshot_puts(&log)
        .into_iter()
        .find(is_created)
        .expect("a snapshot created");
    let first_path = first_snapshot["path"].as_str().expect("a path").to_ascii_lowercase();
    assert!(
        answered_at(&first_snapshot) < killed_at,
        "created before the kill: {first_snapshot}"
    );
    let repeats = &created[&first_path];
    assert!(
        repeats[1..].iter().all(|s| *s == 200),
        "the snapshot the killed worker made was not created again: {repeats:?}"
    );

    // No resource is reported created twice in the run's history either.
    let mut reported: BTreeMap<String, usize> = BTreeMap::new();
    for event in &history {
        if let EventKind::ResourceCreated { id } = &event.kind {
            *reported.entry(id.to_ascii_lowercase()).or_default() += 1;
        }
    }
    assert!(
        reported.values().all(|n| *n == 1),
        "a resource reported created twice: {reported:#?}"
    );
    // And every resource created is in it, the ones the killed worker made included: the
    // standby found them (this admission's tags) and recorded them.
    for (path, statuses) in &created {
        if statuses.iter().any(|s| *s == 201 || *s == 202) {
            assert!(
                reported.keys().any(|id| path.ends_with(id.as_str())),
                "{path} was created but the run's history does not say so: {reported:#?}"
            );
        }
    }
    eprintln!(
        "ResourceCreated events: {}; the snapshot the killed worker created is among them",
        reported.len()
    );

    standby.stop().await;
    support::delete_topology(bus, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_it_keeps_a_wait_leaves_it_to_the_next_worker() {
    let setup = support::setup("").await;
    let (bus, settings) = support::test_bus(&setup.config).await;
    // The workers wait ten times longer than the emulator's pace asks: a kept wait lasts long
    // enough (hundreds of milliseconds) to be caught in it.
    let text = std::fs::read_to_string(&setup.config).expect("the test config");
    assert!(text.contains("time_scale = 400.0"), "{text}");
    let config = setup.dir.join("slower-waits.toml");
    std::fs::write(&config, text.replace("time_scale = 400.0", "time_scale = 40.0")).expect("write config");
    let logs = [
        "--all-stages",
        "--log",
        "warn,sigrun::runtime=info",
        "--log-format",
        "json",
    ];

    let mut doomed = setup.worker_with_config("doomed", &config, &logs);
    let doomed_addr = doomed.metrics_addr().await;
    support::wait_for_status(doomed_addr, "/readyz", 200, Duration::from_secs(30), "the worker").await;
    let mut history = bus.open_history(StreamOffset::Next).await.expect("open the history");
    let run_id = setup.submit().await;

    // Killed as soon as a step of the run has committed a wait kept with its delivery.
    let kept = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match history.next_record().await {
                Some(Ok((_, Record::Commit(commit)))) if commit.run_id == run_id && commit.kept.is_some() => {
                    return commit;
                }
                Some(Ok(_)) => {}
                other => panic!("the history ended: {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no step kept a wait{}", doomed.report()));
    doomed.signal("KILL");
    assert_eq!(
        doomed.wait(Duration::from_secs(10)).await,
        None,
        "killed{}",
        doomed.report()
    );
    history.close().await;
    let kept_stage = kept.successors[0].stage;

    let mut next = setup.worker_with_config("next", &config, &logs);
    let (result, events) = support::wait_for_run(&bus, run_id, std::slice::from_ref(&next)).await;
    assert_eq!(
        result,
        RunResult::Succeeded,
        "events: {events:#?}{}{}",
        doomed.report(),
        next.report()
    );
    let carried_on = next
        .stderr_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|entry| {
            entry["message"]
                .as_str()
                .is_some_and(|m| m.contains("carrying on the wait"))
        })
        .map(|entry| entry["stage"].as_str().unwrap_or_default().to_string())
        .collect::<Vec<_>>();
    assert_eq!(
        carried_on,
        [kept_stage.to_string()],
        "the next worker carried the kept {kept_stage} wait on from the history{}",
        next.report()
    );
    let mut reported: BTreeMap<String, usize> = BTreeMap::new();
    for event in &events {
        if let EventKind::ResourceCreated { id } = &event.kind {
            *reported.entry(id.to_ascii_lowercase()).or_default() += 1;
        }
    }
    assert!(
        !reported.is_empty() && reported.values().all(|n| *n == 1),
        "every resource recorded once: {reported:#?}"
    );
    let log = setup.emu.requests().await;
    let created = log.iter().filter(|e| e["method"] == "PUT" && is_created(e)).count();
    let puts: BTreeMap<String, usize> =
        log.iter()
            .filter(|e| e["method"] == "PUT" && is_created(e))
            .fold(BTreeMap::new(), |mut seen, e| {
                *seen
                    .entry(e["path"].as_str().unwrap_or_default().to_ascii_lowercase())
                    .or_default() += 1;
                seen
            });
    assert_eq!(created, puts.len(), "no resource created twice: {puts:#?}");
    eprintln!("kept {kept_stage} wait carried on by the next worker; {created} resources created once each");

    next.stop().await;
    support::delete_topology(bus, &settings).await;
    // The workers' delay tiers are scaled by their own time scale: theirs go too.
    let slower = sigrun::config::Settings::load(Some(&config)).expect("the slower config loads");
    AmqpBus::delete_topology(&slower.amqp, &slower.delay_tiers())
        .await
        .expect("delete the workers' delay tiers");
}
