//! Fault injection and the control API: throttling with `Retry-After` in each API's error shape,
//! server errors on a schedule, stalls, cut connections after the work is done (the lost answer),
//! filters and caps, reproducibility from a seed, domain faults (replication, allocation, start
//! tasks), and the `/_emulator` endpoints a test uses to inspect and steer the emulator.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sigrun::emulator::EmulatorOptions;

use crate::helpers::*;

fn with_faults(spec: &str) -> EmulatorOptions {
    EmulatorOptions {
        faults: spec.to_string(),
        ..Default::default()
    }
}

/// An ARM URL that answers 404 ResourceNotFound when no fault fires.
fn missing_snapshot() -> String {
    compute(SUB_IMAGING, "rg-imaging", "snapshots/not-there", DISK_API)
}

fn gallery_url(name: &str) -> String {
    compute(SUB_IMAGING, "rg-gallery", &format!("galleries/{name}"), GALLERY_API)
}

/// The log entries of one API, in order.
async fn logged(emu: &TestEmulator, api: &str) -> Vec<Value> {
    emu.requests().await.into_iter().filter(|e| e["api"] == api).collect()
}

async fn control(emu: &TestEmulator, method: Method, path: &str, body: Option<&Value>) -> Reply {
    emu.call(method, &format!("/_emulator/{path}"), None, body).await
}

fn state_of(reply: &Reply) -> &str {
    reply.body["properties"]["provisioningState"].as_str().unwrap_or("")
}

#[tokio::test]
async fn throttling_answers_in_each_apis_shape_with_retry_after() {
    let emu = start(with_faults("429:p=1,retry_after=1")).await;
    // Token requests are not throttled by default (api defaults to arm and batch).
    let arm = emu.arm_token().await;
    let batch = emu.batch_token().await;

    let reply = emu.get(&missing_snapshot(), &arm).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.header("retry-after-ms"), Some("1000"));
    assert_eq!(
        reply.body["error"]["code"], "TooManyRequests",
        "ARM's error body: {:?}",
        reply.body
    );
    assert!(reply.body["error"]["message"].is_string());
    assert!(reply.header("x-ms-request-id").is_some(), "ARM's headers come with it");

    let reply = emu
        .get(
            &format!("{}/pools?api-version={BATCH_API}", emu.batch_url("sigrunweu")),
            &batch,
        )
        .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(
        reply.body["code"], "TooManyRequests",
        "Batch's error body: {:?}",
        reply.body
    );
    assert!(
        reply.body["message"]["value"]
            .as_str()
            .is_some_and(|m| m.contains("RequestId:"))
    );
    assert!(reply.body["odata.metadata"].is_string());
    assert!(reply.header("request-id").is_some());

    let log = emu.requests().await;
    let throttled: Vec<&Value> = log.iter().filter(|e| e["status"] == 429).collect();
    assert_eq!(throttled.len(), 2);
    assert!(
        throttled
            .iter()
            .all(|e| e["fault"] == "429" && e["retry_after_ms"] == 1000)
    );
    assert!(log.iter().filter(|e| e["api"] == "aad").all(|e| e["status"] == 200));
}

#[tokio::test]
async fn server_errors_on_a_schedule_and_always() {
    let emu = start(with_faults("500:at=2")).await;
    let token = emu.arm_token().await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let reply = emu.get(&missing_snapshot(), &token).await;
        if reply.status == 500 {
            assert_eq!(reply.code(), "InternalServerError");
        }
        statuses.push(reply.status.as_u16());
    }
    assert_eq!(statuses, [404, 500, 404, 404], "exactly the 2nd ARM request fails");

    emu.set_faults("503").await;
    let reply = emu.get(&missing_snapshot(), &token).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.code(), "ServiceUnavailable");
    let reply = emu.get(&missing_snapshot(), &token).await;
    assert_eq!(reply.status, 503, "a rule without a trigger fires every time");
}

#[tokio::test]
async fn slow_requests_are_delayed() {
    let emu = start(EmulatorOptions::default()).await;
    let token = emu.arm_token().await;
    emu.set_faults("slow:p=1,delay_ms=300").await;
    let began = Instant::now();
    let reply = emu.get(&missing_snapshot(), &token).await;
    let slow = began.elapsed();
    assert_eq!(reply.status, 404, "a slow request still gets its answer");
    assert!(slow >= Duration::from_millis(300), "delayed {slow:?}");
    let last = logged(&emu, "arm").await.pop().expect("logged");
    assert_eq!(last["fault"], "slow");
    assert_eq!(last["status"], 404);
}

#[tokio::test]
async fn reset_cuts_the_connection_after_the_write_took_effect() {
    let emu = start(with_faults("reset:p=1,api=arm")).await;
    let token = emu.arm_token().await;
    let url = format!("{}{}", emu.base(), gallery_url("lost_answer_gallery"));
    let body = json!({"location": "westeurope", "properties": {"description": "lost answer"}});
    let err = emu
        .client
        .put(&url)
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .expect_err("the connection is cut before the answer");
    assert!(!err.is_timeout(), "a reset, not a timeout: {err:?}");
    assert!(err.status().is_none(), "no HTTP answer at all: {err:?}");

    let arm_log = logged(&emu, "arm").await;
    assert_eq!(arm_log.len(), 1, "reqwest did not retry: {arm_log:?}");
    assert_eq!(arm_log[0]["status"], 0);
    assert_eq!(arm_log[0]["fault"], "reset");
    assert_eq!(arm_log[0]["method"], "PUT");

    emu.set_faults("").await;
    let get = emu.get(&url, &token).await;
    assert_eq!(
        get.status, 200,
        "the PUT took effect although its answer was lost: {:?}",
        get.body
    );
    assert_eq!(get.body["properties"]["description"], "lost answer");
    let retry = emu.put(&url, &token, &body).await;
    assert_eq!(
        retry.status, 200,
        "the retry of the lost PUT is idempotent: {:?}",
        retry.body
    );
}

#[tokio::test]
async fn method_path_and_times_narrow_what_fires() {
    let emu = start(EmulatorOptions::default()).await;
    let token = emu.arm_token().await;

    emu.set_faults("503:method=put").await;
    assert_eq!(
        emu.get(&gallery_url("filters_gallery"), &token).await.status,
        404,
        "GET is not matched"
    );
    let put = emu
        .put(
            &gallery_url("filters_gallery"),
            &token,
            &json!({"location": "westeurope", "properties": {}}),
        )
        .await;
    assert_eq!(put.status, 503);
    assert_eq!(
        emu.get(&gallery_url("filters_gallery"), &token).await.status,
        404,
        "nothing was created"
    );

    emu.set_faults("503:path=/galleries/").await;
    assert_eq!(emu.get(&gallery_url("filters_gallery"), &token).await.status, 503);
    assert_eq!(
        emu.get(&missing_snapshot(), &token).await.status,
        404,
        "other paths pass"
    );

    emu.set_faults("503:p=1,times=2").await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(emu.get(&missing_snapshot(), &token).await.status.as_u16());
    }
    assert_eq!(statuses, [503, 503, 404, 404], "times=2 caps the rule");
    let faults = control(&emu, Method::GET, "faults", None).await;
    assert_eq!(faults.body["rules"][0]["matched"], 4);
    assert_eq!(faults.body["rules"][0]["fired"], 2);

    emu.set_faults("503:api=batch").await;
    assert_eq!(
        emu.get(&missing_snapshot(), &token).await.status,
        404,
        "api=batch leaves ARM alone"
    );
}

async fn status_sequence(seed: u64) -> Vec<u16> {
    let emu = start(EmulatorOptions {
        faults: "429:p=0.3;500:p=0.1".into(),
        seed,
        ..Default::default()
    })
    .await;
    let token = emu.arm_token().await;
    let mut statuses = Vec::new();
    for i in 0..40 {
        let url = if i % 2 == 0 {
            missing_snapshot()
        } else {
            gallery_url("seeded")
        };
        statuses.push(emu.get(&url, &token).await.status.as_u16());
    }
    statuses
}

#[tokio::test]
async fn the_same_seed_gives_the_same_faults() {
    let a = status_sequence(42).await;
    let b = status_sequence(42).await;
    let c = status_sequence(43).await;
    assert_eq!(a, b, "same seed, same requests, same faults");
    assert_ne!(a, c, "another seed, other faults");
    let throttled = a.iter().filter(|s| **s == 429).count();
    let failed = a.iter().filter(|s| **s == 500).count();
    println!("seed 42: {throttled} x 429, {failed} x 500 of 40");
    assert!((4..=22).contains(&throttled), "about 30% throttled: {a:?}");
    assert!(a.contains(&404), "some requests pass: {a:?}");
}

#[tokio::test]
async fn failed_replication_is_reported_and_recovers_when_the_region_is_added_back() {
    let emu = start(EmulatorOptions {
        time_scale: 1e-6,
        ..with_faults("replication-fail:region=eastus,times=1")
    })
    .await;
    let token = emu.arm_token().await;
    publish_version(
        &emu,
        &token,
        "failing",
        "Generalized",
        "1.0.0",
        &[("westeurope", 1), ("eastus", 1)],
    )
    .await;
    let url = compute(
        SUB_IMAGING,
        "rg-gallery",
        "galleries/sigrun_gallery/images/failing/versions/1.0.0",
        GALLERY_API,
    );
    let expand = format!("{url}&$expand=ReplicationStatus");
    let version_body = |regions: &[&str]| {
        json!({"location": "westeurope", "properties": {
            "publishingProfile": {
                "targetRegions": regions.iter().map(|r| json!({"name": r, "regionalReplicaCount": 1})).collect::<Vec<_>>(),
                "storageAccountType": "Standard_LRS"},
            "storageProfile": {"source": {"id": compute_id(SUB_IMAGING, "rg-imaging", "images/failing-1-0-0")}}}})
    };
    let same = emu.put(&url, &token, &version_body(&["westeurope", "eastus"])).await;
    assert_eq!(same.status, 200, "{:?}", same.body);
    let op_url = same.header("azure-asyncoperation").expect("op").to_string();

    emu.advance(3000.0).await;
    let reply = emu.get(&expand, &token).await;
    let summary = reply.body["properties"]["replicationStatus"]["summary"]
        .as_array()
        .expect("summary")
        .clone();
    let region = |name: &str| summary.iter().find(|r| r["region"] == name).cloned().expect("region");
    assert_eq!(region("East US")["state"], "Failed", "{summary:?}");
    assert!(region("East US")["details"].as_str().is_some_and(|d| !d.is_empty()));
    let stuck_at = region("East US")["progress"].as_u64().expect("progress");
    assert!(stuck_at > 0 && stuck_at < 100, "{stuck_at}");
    assert_eq!(region("West Europe")["state"], "Completed");
    assert_eq!(
        reply.body["properties"]["replicationStatus"]["aggregatedState"],
        "Failed"
    );
    assert_eq!(state_of(&reply), "Failed");
    let op = emu.get(&op_url, &token).await;
    assert_eq!(op.body["status"], "Failed");
    assert_eq!(op.body["error"]["code"], "ReplicationJobsNotCompleted");
    assert!(
        op.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("eastus"))
    );

    // Remove the failed region, then add it back: the rule fired its one time, so now it works.
    let removed = emu.put(&url, &token, &version_body(&["westeurope"])).await;
    assert_eq!(removed.status, 200, "{:?}", removed.body);
    emu.advance(120.0).await;
    let reply = emu.get(&expand, &token).await;
    assert_eq!(state_of(&reply), "Succeeded");
    assert_eq!(
        reply.body["properties"]["replicationStatus"]["summary"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    let added = emu.put(&url, &token, &version_body(&["westeurope", "eastus"])).await;
    assert_eq!(added.status, 200, "{:?}", added.body);
    let op_url = added.header("azure-asyncoperation").expect("op").to_string();
    let reply = emu.get(&expand, &token).await;
    let summary = &reply.body["properties"]["replicationStatus"]["summary"];
    assert_eq!(summary[1]["state"], "Replicating", "{summary}");
    emu.advance(3000.0).await;
    let reply = emu.get(&expand, &token).await;
    assert_eq!(
        reply.body["properties"]["replicationStatus"]["aggregatedState"], "Completed",
        "{:?}",
        reply.body
    );
    assert_eq!(state_of(&reply), "Succeeded");
    assert_eq!(emu.get(&op_url, &token).await.body["status"], "Succeeded");
    let rules = control(&emu, Method::GET, "faults", None).await;
    assert_eq!(rules.body["rules"][0]["fired"], 1);
}

async fn replicated_image(emu: &TestEmulator, arm: &str) -> String {
    let id = publish_version(emu, arm, "faultpool", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    emu.advance(1800.0).await;
    id
}

fn pool_url(emu: &TestEmulator, pool: &str) -> String {
    format!("{}/pools/{pool}?api-version={BATCH_API}", emu.batch_url("sigrunweu"))
}

#[tokio::test]
async fn allocation_failure_leaves_the_pool_steady_and_empty() {
    let emu = start(EmulatorOptions {
        time_scale: 1e-6,
        ..with_faults("allocation-fail:pool=pool-*")
    })
    .await;
    let arm = emu.arm_token().await;
    let batch = emu.batch_token().await;
    let image = replicated_image(&emu, &arm).await;
    let pools = format!("{}/pools?api-version={BATCH_API}", emu.batch_url("sigrunweu"));
    for id in ["pool-doomed", "fine"] {
        let reply = emu.post(&pools, &batch, &gallery_pool_body(id, &image, 50, None)).await;
        assert_eq!(reply.status, 201, "{id}: {:?}", reply.body);
    }
    emu.advance(600.0).await;
    let doomed = emu.get(&pool_url(&emu, "pool-doomed"), &batch).await;
    assert_eq!(doomed.body["allocationState"], "steady");
    assert_eq!(doomed.body["currentDedicatedNodes"], 0);
    let errors = doomed.body["resizeErrors"].as_array().expect("resizeErrors");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["code"], "AllocationFailed");
    let (nodes, _) = list_all_nodes(&emu, &batch, "sigrunweu", "pool-doomed", 1000).await;
    assert!(nodes.is_empty());
    let fine = emu.get(&pool_url(&emu, "fine"), &batch).await;
    assert_eq!(fine.body["currentDedicatedNodes"], 50, "the glob does not match `fine`");
    assert!(fine.body.get("resizeErrors").is_none());
}

#[tokio::test]
async fn a_share_of_start_tasks_fails() {
    let emu = start(EmulatorOptions {
        time_scale: 1e-6,
        ..with_faults("starttask-fail:share=0.25")
    })
    .await;
    let arm = emu.arm_token().await;
    let batch = emu.batch_token().await;
    let image = replicated_image(&emu, &arm).await;
    let pools = format!("{}/pools?api-version={BATCH_API}", emu.batch_url("sigrunweu"));
    let reply = emu
        .post(&pools, &batch, &gallery_pool_body("pool-flaky", &image, 200, None))
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    emu.advance(900.0).await;
    let pool = emu.get(&pool_url(&emu, "pool-flaky"), &batch).await;
    assert_eq!(pool.body["allocationState"], "steady");
    assert_eq!(pool.body["currentDedicatedNodes"], 200);

    let (nodes, _) = list_all_nodes(&emu, &batch, "sigrunweu", "pool-flaky", 1000).await;
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    for node in &nodes {
        let state = node["state"].as_str().expect("state");
        *states.entry(state).or_default() += 1;
        let info = &node["startTaskInfo"];
        match state {
            "starttaskfailed" => {
                assert_eq!(info["result"], "failure", "{node}");
                assert_ne!(info["exitCode"], 0);
                assert!(info["failureInfo"]["code"].is_string());
            }
            "idle" => assert_eq!(info["result"], "success", "{node}"),
            other => panic!("unexpected node state {other}"),
        }
    }
    let failed = states.get("starttaskfailed").copied().unwrap_or(0);
    println!("start task failed on {failed} of 200 nodes");
    assert!((20..=80).contains(&failed), "about a quarter of 200: {states:?}");
    assert_eq!(failed + states.get("idle").copied().unwrap_or(0), 200);
    let counts = emu
        .get(
            &format!("{}/nodecounts?api-version={BATCH_API}", emu.batch_url("sigrunweu")),
            &batch,
        )
        .await;
    assert_eq!(counts.body["value"][0]["dedicated"]["startTaskFailed"], failed as u64);
}

#[tokio::test]
async fn control_api_reports_requests_faults_clock_and_state() {
    let emu = start(EmulatorOptions {
        seed: 9,
        ..with_faults("429:p=1,times=1,retry_after=2,path=/snapshots/")
    })
    .await;
    let token = emu.arm_token().await;
    assert_eq!(emu.get(&missing_snapshot(), &token).await.status, 429);
    assert_eq!(emu.get(&missing_snapshot(), &token).await.status, 404);
    let put = emu
        .put(
            &gallery_url("control_gallery"),
            &token,
            &json!({"location": "westeurope", "properties": {}}),
        )
        .await;
    assert_eq!(put.status, 201);

    let requests = control(&emu, Method::GET, "requests", None).await;
    assert_eq!(requests.status, 200);
    let entries = requests.body["requests"].as_array().expect("requests");
    let arm: Vec<&Value> = entries.iter().filter(|e| e["api"] == "arm").collect();
    assert_eq!(arm.len(), 3);
    assert_eq!(arm[0]["method"], "GET");
    assert!(
        arm[0]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("/snapshots/not-there"))
    );
    assert_eq!(
        (arm[0]["status"].clone(), arm[0]["fault"].clone()),
        (json!(429), json!("429"))
    );
    assert_eq!(arm[0]["retry_after_ms"], 2000);
    assert_eq!(
        (arm[1]["status"].clone(), arm[1]["fault"].clone()),
        (json!(404), Value::Null)
    );
    assert_eq!(
        (arm[2]["method"].clone(), arm[2]["status"].clone()),
        (json!("PUT"), json!(201))
    );
    assert!(arm[2]["query"].as_str().is_some_and(|q| q.contains("api-version=")));
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().expect("seq")).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let since = control(&emu, Method::GET, &format!("requests?since={}", arm[1]["seq"]), None).await;
    assert_eq!(
        since.body["requests"].as_array().map(Vec::len),
        Some(1),
        "?since= skips what was seen"
    );

    let faults = control(&emu, Method::GET, "faults", None).await;
    assert_eq!(faults.body["seed"], 9);
    let rule = &faults.body["rules"][0];
    assert_eq!(rule["rule"], "429:p=1,times=1,retry_after=2,path=/snapshots/");
    assert_eq!((rule["matched"].clone(), rule["fired"].clone()), (json!(2), json!(1)));

    for bad in ["429:p=2", "teapot:p=1", "500:at=x", "503:colour=red"] {
        let reply = control(
            &emu,
            Method::PUT,
            "faults",
            Some(&json!({"spec": format!("slow;{bad}")})),
        )
        .await;
        assert_eq!(reply.status, 400, "{bad}: {:?}", reply.body);
        let error = reply.body["error"].as_str().expect("error text");
        assert!(error.contains(&format!("`{bad}`")), "the error names the rule: {error}");
    }
    let unchanged = control(&emu, Method::GET, "faults", None).await;
    assert_eq!(
        unchanged.body["rules"], faults.body["rules"],
        "a bad plan replaces nothing"
    );

    let clock = control(&emu, Method::GET, "clock", None).await;
    assert_eq!(clock.body["time_scale"], 1.0);
    let parse = |v: &Value| {
        time::OffsetDateTime::parse(v.as_str().expect("now"), &time::format_description::well_known::Rfc3339)
            .expect("RFC 3339")
    };
    let before = parse(&clock.body["now"]);
    let advanced = control(&emu, Method::POST, "clock", Some(&json!({"advance_seconds": 3600}))).await;
    let jumped = parse(&advanced.body["now"]) - before;
    assert!(
        jumped >= time::Duration::hours(1) && jumped < time::Duration::minutes(61),
        "{jumped}"
    );
    let refused = control(&emu, Method::POST, "clock", Some(&json!({"advance_seconds": -5}))).await;
    assert_eq!(refused.status, 400, "the clock does not go back");

    let state = control(&emu, Method::GET, "state", None).await;
    assert_eq!(state.status, 200);
    let resources = state.body["resources"].as_array().expect("resources");
    let gallery = resources
        .iter()
        .find(|r| {
            r["id"]
                .as_str()
                .is_some_and(|id| id.ends_with("/galleries/control_gallery"))
        })
        .expect("the gallery");
    assert_eq!(gallery["type"], "Microsoft.Compute/galleries");
    assert_eq!(gallery["provisioningState"], "Succeeded");
    assert!(state.body["operations"].as_u64().is_some_and(|n| n >= 1));
    assert!(state.body["pools"].as_array().is_some_and(Vec::is_empty));

    assert_eq!(control(&emu, Method::DELETE, "requests", None).await.status, 204);
    assert!(logged(&emu, "arm").await.is_empty(), "the log was cleared");
    assert_eq!(control(&emu, Method::GET, "nope", None).await.status, 404);
}

#[tokio::test]
async fn the_log_shows_whether_a_client_honoured_retry_after() {
    let emu = start(EmulatorOptions::default()).await;
    let token = emu.arm_token().await;
    emu.set_faults("429:times=1,retry_after=0.5,api=arm").await;

    let first = emu.get(&missing_snapshot(), &token).await;
    assert_eq!(first.status, 429);
    let wait_ms: u64 = first
        .header("retry-after-ms")
        .expect("retry-after-ms")
        .parse()
        .expect("ms");
    assert_eq!(wait_ms, 500);
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    let second = emu.get(&missing_snapshot(), &token).await;
    assert_eq!(second.status, 404, "the retry passes");

    let log = logged(&emu, "arm").await;
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["retry_after_ms"], 500);
    let gap = log[1]["elapsed_ms"].as_f64().expect("elapsed") - log[0]["elapsed_ms"].as_f64().expect("elapsed");
    assert!(
        gap >= log[0]["retry_after_ms"].as_f64().expect("ms"),
        "the retry came {gap} ms after the 429, Retry-After asked for 500"
    );
}
