//! Runs of one pipeline that overlap, on real worker processes, the real broker and the emulator:
//!
//! - one admission per version: the admitting worker's broker connection is cut (a TCP relay the
//!   test controls) while it is still planning, so the broker hands the trigger to another worker,
//!   which admits it too, and the first comes back and carries on: exactly one `run_started`, one
//!   set of first messages, and the other attempt ends as a duplicate;
//! - ten runs with distinct versions submitted together: every run succeeds, and a run's rollout
//!   retires only pools of older versions — never a newer run's pool, never one still being made.

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sigrun::bus::amqp::topology::Names;
use sigrun::events::{Event, EventKind, RunResult};
use support::Process;
use support::relay::{Relay, broker_addr};
use uuid::Uuid;

/// Waits (bounded) until the consumers of `queue`, as whether each is the active one, are
/// `expected` (in order: waiting ones first).
async fn wait_for_consumers(queue: &str, expected: &[bool], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut active: Vec<bool> = support::broker::consumers()
            .await
            .into_iter()
            .filter(|(name, _)| name == queue)
            .map(|(_, active)| active)
            .collect();
        active.sort();
        if active == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the consumers of {queue} are {active:?}, not {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count(history: &[Event], name: &str) -> usize {
    history.iter().filter(|e| e.kind.name() == name).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_admission_per_version_when_the_connection_drops_during_planning() {
    // Planning reads the build VM; each read takes 5 s, so the admitter is cut mid-plan.
    let setup = support::setup("slow:api=arm,method=GET,path=/virtualMachines/build-ubuntu,delay_ms=5000").await;
    let (bus, settings) = support::test_bus(&setup.config).await;
    let relay = Relay::start(broker_addr()).await;
    let relayed = setup.write_config("relayed.toml", &relay.url(), helpers::PIPELINE_APP.1);
    // Alone at first, the relayed worker is the triggers queue's single active consumer.
    let mut first = setup.worker_with_config("first", &relayed, &["--stage", "verify"]);
    let first_addr = first.metrics_addr().await;
    support::wait_for_status(
        first_addr,
        "/readyz",
        200,
        Duration::from_secs(30),
        "the relayed worker",
    )
    .await;
    let triggers = Names::new(&setup.prefix).triggers();
    wait_for_consumers(&triggers, &[true], "the relayed worker consuming the triggers").await;
    let run_id = setup.submit().await;
    // It has taken the trigger and reads the VM (5 s); another worker stands by meanwhile.
    let mut second = setup.worker("second", &["--all-stages"]);
    let second_addr = second.metrics_addr().await;
    support::wait_for_status(
        second_addr,
        "/readyz",
        200,
        Duration::from_secs(30),
        "the second worker",
    )
    .await;
    wait_for_consumers(&triggers, &[false, true], "the second worker standing by").await;
    // Cut the admitter off mid-plan: the broker hands the trigger to the second worker.
    relay.set_cut(true);
    wait_for_consumers(&triggers, &[true], "the second worker taking over").await;
    relay.set_cut(false);

    let workers = [first, second];
    let (result, history) = support::wait_for_run(&bus, run_id, &workers).await;
    let logs: String = workers.iter().map(Process::report).collect();
    assert_eq!(result, RunResult::Succeeded, "events: {history:#?}{logs}");
    assert_eq!(count(&history, "run_started"), 1, "one admission: {history:#?}");
    // Both workers tried to admit it: the one that lost the claim recorded a duplicate.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (_, history) = support::wait_for_run(&bus, run_id, &workers).await;
            if count(&history, "duplicate_trigger") >= 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the second admission should end as a duplicate{logs}"));
    // One set of first messages: the snapshot step made each snapshot once and no stale first
    // message had to be dropped.
    let log = setup.emu.requests().await;
    let created: Vec<&serde_json::Value> = log
        .iter()
        .filter(|e| e["method"] == "PUT" && e["path"].as_str().is_some_and(|p| p.contains("/snapshots/")))
        .collect();
    assert!(
        created.len() == 3 && created.iter().all(|e| e["status"] == 201 || e["status"] == 202),
        "three snapshots, each PUT once: {created:#?}"
    );
    assert!(
        !history
            .iter()
            .any(|e| matches!(e.kind, EventKind::DuplicateDropped { .. })
                && e.stage == sigrun::model::envelope::Stage::Snapshot),
        "no second first message: {history:#?}"
    );
    let [mut first, mut second] = workers;
    first.stop().await;
    second.stop().await;
    drop(relay);
    support::delete_topology(bus, &settings).await;
}

/// The version a pool id of the nightly pipeline was made for (`…-2026-1126-7` → `2026.1126.7`).
fn version_of(pool_id: &str) -> String {
    let parts: Vec<&str> = pool_id.rsplitn(4, '-').collect();
    format!("{}.{}.{}", parts[2], parts[1], parts[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_runs_all_succeed_and_retire_only_older_pools() {
    let setup = support::setup("").await;
    let (bus, settings) = support::test_bus(&setup.config).await;
    let mut workers: Vec<Process> = ["w0", "w1"]
        .iter()
        .map(|name| setup.worker(name, &["--all-stages"]))
        .collect();
    for worker in &mut workers {
        let addr = worker.metrics_addr().await;
        support::wait_for_status(addr, "/readyz", 200, Duration::from_secs(30), "a worker").await;
    }
    let versions: Vec<String> = (1..=10).map(|n| format!("2026.1126.{n}")).collect();
    let mut runs: BTreeMap<String, Uuid> = BTreeMap::new();
    // Submitted together, newest first for good measure: creation order is not version order.
    let submits = versions.iter().rev().map(|v| setup.submit_version(v));
    for (version, run) in versions.iter().rev().zip(futures_util::future::join_all(submits).await) {
        runs.insert(version.clone(), run);
    }
    let logs = || workers.iter().map(Process::report).collect::<String>();
    let mut retired: Vec<(String, String)> = Vec::new();
    for (version, run) in &runs {
        let (result, history) = support::wait_for_run(&bus, *run, &workers).await;
        assert_eq!(result, RunResult::Succeeded, "{version}: {history:#?}{}", logs());
        assert_eq!(count(&history, "run_started"), 1, "{version}");
        assert_eq!(
            count(&history, "rollout_finished"),
            2,
            "{version}: each pool's rollout ended"
        );
        for event in &history {
            if let EventKind::PreviousPoolRetired { pool_id, .. } = &event.kind {
                retired.push((version.clone(), pool_id.clone()));
            }
        }
    }
    for (by, pool) in &retired {
        let of = version_of(pool);
        let older = sigrun::model::rules::ImageVersion::parse(&of) < sigrun::model::rules::ImageVersion::parse(by);
        assert!(older, "the run of {by} retired {pool}, a pool of {of}");
    }
    eprintln!(
        "10 overlapping runs succeeded; {} older pools retired by newer runs",
        retired.len()
    );
    // The newest version's pools keep their nodes.
    let newest = versions.last().unwrap().replace('.', "-");
    for (account, target) in [("sigrunweu", "render"), ("sigruneus", "sim")] {
        let pool = format!("nightly-ubuntu-{target}-{newest}");
        let token = setup.emu.batch_token().await;
        let url = format!(
            "{}/pools/{pool}?api-version={}",
            setup.emu.batch_url(account),
            helpers::BATCH_API
        );
        let found = setup.emu.get(&url, &token).await;
        assert_eq!(found.status, 200, "{pool}: {:?}", found.body);
        assert!(
            found.body["targetDedicatedNodes"].as_u64().unwrap_or(0) > 0,
            "{pool}: {}",
            found.body
        );
    }
    for worker in &mut workers {
        worker.stop().await;
    }
    support::delete_topology(bus, &settings).await;
}
