//! Long-running operations and behaviour over emulated time: ARM's `Azure-AsyncOperation` and
//! `Location` polling for snapshots, images, galleries and image versions, region-by-region
//! replication, updates and deletes, idempotent PUTs, Batch pool allocation and node lifecycles at
//! 2000 nodes, and state that survives a restart.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use sigrun::emulator::EmulatorOptions;

use crate::helpers::*;

fn snapshot_body() -> Value {
    json!({"location": "westeurope", "properties": {"creationData": {
        "createOption": "Copy",
        "sourceResourceId": compute_id(SUB_IMAGING, "rg-imaging", "disks/build-ubuntu-2204-osdisk"),
    }}})
}

fn state_of(reply: &Reply) -> &str {
    reply.body["properties"]["provisioningState"].as_str().unwrap_or("")
}

fn version_url(definition: &str, version: &str) -> String {
    compute(
        SUB_IMAGING,
        "rg-gallery",
        &format!("galleries/sigrun_gallery/images/{definition}/versions/{version}"),
        GALLERY_API,
    )
}

/// Region (display name) → (state, progress) from a `$expand=ReplicationStatus` read.
fn replication(reply: &Reply) -> BTreeMap<String, (String, u64)> {
    reply.body["properties"]["replicationStatus"]["summary"]
        .as_array()
        .unwrap_or_else(|| panic!("replicationStatus.summary in {:?}", reply.body))
        .iter()
        .map(|r| {
            (
                r["region"].as_str().unwrap_or_default().to_string(),
                (
                    r["state"].as_str().unwrap_or_default().to_string(),
                    r["progress"].as_u64().unwrap_or(u64::MAX),
                ),
            )
        })
        .collect()
}

async fn async_status(emu: &TestEmulator, url: &str, token: &str) -> Value {
    let reply = emu.get(url, token).await;
    assert_eq!(reply.status, 200, "operation status {url}: {:?}", reply.body);
    reply.body
}

/// At a time scale so small that the real wait for an operation outgrows a `Duration`, the answer
/// still comes (the hint saturates) instead of the connection dropping on a panic.
#[tokio::test]
async fn a_tiny_time_scale_still_answers_with_a_poll_hint() {
    let emu = start(EmulatorOptions {
        time_scale: 1e-15,
        ..Default::default()
    })
    .await;
    let token = emu.arm_token().await;
    let url = compute(SUB_IMAGING, "rg-imaging", "snapshots/tiny-scale", DISK_API);
    let put = emu.put(&url, &token, &snapshot_body()).await;
    assert_eq!(put.status, 202, "{:?}", put.body);
    let hint: u64 = put
        .header("retry-after")
        .and_then(|h| h.parse().ok())
        .expect("a numeric Retry-After");
    assert!(hint > 1_000_000, "a wait of ages in real time: {hint}");
}

/// On a fast clock the time left is a fraction of a real second: `Retry-After` still says 1 (whole
/// seconds, never 0, which clients read as "no hint" and replace with 30 s), and `retry-after-ms`
/// carries the exact wait. At 1000x a 64 GB copy's minutes are a few hundred real milliseconds,
/// so the status read right after the PUT still finds it running.
#[tokio::test]
async fn a_fast_clock_answers_retry_after_1_and_the_exact_wait_in_ms() {
    let emu = start(EmulatorOptions {
        time_scale: 1000.0,
        ..Default::default()
    })
    .await;
    let token = emu.arm_token().await;
    let url = compute(SUB_IMAGING, "rg-imaging", "snapshots/fast-clock", DISK_API);
    let put = emu.put(&url, &token, &snapshot_body()).await;
    assert_eq!(put.status, 202, "{:?}", put.body);
    assert_eq!(put.header("retry-after"), Some("1"));
    let ms: u64 = put
        .header("retry-after-ms")
        .and_then(|h| h.parse().ok())
        .expect("a numeric retry-after-ms");
    assert!(ms < 1000, "the exact real wait, under a second at 1000x: {ms}");
    let status = emu
        .get(
            put.header("azure-asyncoperation").expect("Azure-AsyncOperation"),
            &token,
        )
        .await;
    assert_eq!(status.body["status"], "InProgress", "{:?}", status.body);
    assert_eq!(status.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn snapshot_put_polls_through_async_operation_and_location() {
    let emu = start(EmulatorOptions::default()).await;
    let token = emu.arm_token().await;
    let url = compute(SUB_IMAGING, "rg-imaging", "snapshots/lro-snap", DISK_API);

    let put = emu.put(&url, &token, &snapshot_body()).await;
    assert_eq!(put.status, 202, "{:?}", put.body);
    let op_url = put
        .header("azure-asyncoperation")
        .expect("Azure-AsyncOperation")
        .to_string();
    let location = put.header("location").expect("Location").to_string();
    assert!(op_url.contains("/DiskOperations/"), "{op_url}");
    assert!(location.contains("monitor=true"), "{location}");
    let retry_after: u64 = put
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(
        (100..=600).contains(&retry_after),
        "Retry-After is the time left of a 64 GB snapshot copy (minutes), within ARM's 10 s–10 min: {retry_after}"
    );

    let get = emu.get(&url, &token).await;
    assert_eq!(get.status, 200);
    assert_eq!(state_of(&get), "Updating");
    let running = async_status(&emu, &op_url, &token).await;
    assert_eq!(running["status"], "InProgress");
    assert!(
        running["startTime"].is_string() && running.get("endTime").is_none(),
        "{running}"
    );
    let monitor = emu.get(&location, &token).await;
    assert_eq!(monitor.status, 202, "Location answers 202 while running");
    assert!(monitor.header("location").is_some() && monitor.header("retry-after").is_some());

    emu.advance(300.0).await;
    let get = emu.get(&url, &token).await;
    assert_eq!(state_of(&get), "Succeeded");
    let done = async_status(&emu, &op_url, &token).await;
    assert_eq!(done["status"], "Succeeded");
    let (start, end) = (
        done["startTime"].as_str().expect("startTime"),
        done["endTime"].as_str().expect("endTime"),
    );
    let parse =
        |t: &str| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).expect("RFC 3339");
    let took = parse(end) - parse(start);
    assert!(
        took > time::Duration::seconds(60) && took < time::Duration::seconds(300),
        "a 64 GB snapshot takes minutes, took {took}"
    );
    assert_eq!(
        done["properties"]["output"]["properties"]["provisioningState"],
        "Succeeded"
    );
    let monitor = emu.get(&location, &token).await;
    assert_eq!(monitor.status, 200, "Location answers 200 with the resource when done");
    assert_eq!(monitor.body["id"], get.body["id"]);
    assert_eq!(state_of(&monitor), "Succeeded");
}

#[tokio::test]
async fn time_scale_finishes_operations_in_wall_clock_time_without_advance() {
    let emu = start(EmulatorOptions {
        time_scale: 300.0,
        ..Default::default()
    })
    .await;
    let token = emu.arm_token().await;
    let clock = emu.call(Method::GET, "/_emulator/clock", None, None).await;
    assert_eq!(clock.body["time_scale"], 300.0);
    let url = compute(SUB_IMAGING, "rg-imaging", "snapshots/scaled-snap", DISK_API);
    let began = Instant::now();
    let put = emu.put(&url, &token, &snapshot_body()).await;
    assert_eq!(put.status, 202, "{:?}", put.body);
    let hint_ms: u64 = put.header("retry-after-ms").expect("retry-after-ms").parse().unwrap();
    assert!(
        (333..=2000).contains(&hint_ms),
        "the time left (minutes of emulated time) is under 2 s of real time at 300x: {hint_ms} ms"
    );
    let op_url = put.header("azure-asyncoperation").expect("async op").to_string();
    let location = put.header("location").expect("Location").to_string();
    assert_eq!(state_of(&emu.get(&url, &token).await), "Updating");
    assert_eq!(emu.get(&location, &token).await.status, 202);

    // Poll as a client would, sleeping in real time: 2-4 emulated minutes are about 0.5-0.8 s.
    let deadline = began + Duration::from_secs(5);
    let finished = loop {
        let status = async_status(&emu, &op_url, &token).await;
        if status["status"] != "InProgress" {
            assert_eq!(status["status"], "Succeeded");
            break began.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the snapshot never finished under --time-scale 300"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        finished >= Duration::from_millis(400),
        "a snapshot of minutes cannot finish in {finished:?} at 300x"
    );
    assert_eq!(state_of(&emu.get(&url, &token).await), "Succeeded");
    let monitor = emu.get(&location, &token).await;
    assert_eq!(monitor.status, 200);
    assert_eq!(state_of(&monitor), "Succeeded");
}

#[tokio::test]
async fn image_gallery_and_definition_puts_create_over_time() {
    let emu = start(EmulatorOptions::default()).await;
    let token = emu.arm_token().await;
    let snap = compute(SUB_IMAGING, "rg-imaging", "snapshots/img-src", DISK_API);
    assert_eq!(emu.put(&snap, &token, &snapshot_body()).await.status, 202);
    emu.advance(600.0).await;

    let image = compute(SUB_IMAGING, "rg-imaging", "images/lro-image", COMPUTE_API);
    let image_body = json!({"location": "westeurope", "properties": {"hyperVGeneration": "V2", "storageProfile": {"osDisk": {
        "osType": "Linux", "osState": "Generalized", "snapshot": {"id": compute_id(SUB_IMAGING, "rg-imaging", "snapshots/img-src")}}}}});
    let gallery = compute(SUB_IMAGING, "rg-gallery", "galleries/lro_gallery", GALLERY_API);
    let definition = compute(
        SUB_IMAGING,
        "rg-gallery",
        "galleries/lro_gallery/images/lro-def",
        GALLERY_API,
    );
    let def_body = json!({"location": "westeurope", "properties": {"osType": "Linux", "osState": "Generalized",
        "hyperVGeneration": "V2", "identifier": {"publisher": "sigrun", "offer": "lro", "sku": "x"}}});

    let image_put = emu.put(&image, &token, &image_body).await;
    let gallery_put = emu
        .put(&gallery, &token, &json!({"location": "westeurope", "properties": {}}))
        .await;
    for (what, reply, segment) in [
        ("image", &image_put, "/operations/"),
        ("gallery", &gallery_put, "/capsOperations/"),
    ] {
        assert_eq!(reply.status, 201, "{what}: {:?}", reply.body);
        let op = reply
            .header("azure-asyncoperation")
            .unwrap_or_else(|| panic!("{what} Azure-AsyncOperation"));
        assert!(op.contains(segment), "{what}: {op}");
        assert_eq!(state_of(reply), "Creating", "{what} answers Creating");
        assert_eq!(async_status(&emu, op, &token).await["status"], "InProgress", "{what}");
    }
    assert_eq!(state_of(&emu.get(&image, &token).await), "Creating");
    assert_eq!(state_of(&emu.get(&gallery, &token).await), "Creating");
    emu.advance(60.0).await;
    assert_eq!(
        state_of(&emu.get(&gallery, &token).await),
        "Succeeded",
        "a gallery takes seconds"
    );
    assert_eq!(
        state_of(&emu.get(&image, &token).await),
        "Creating",
        "an image takes minutes"
    );
    let def_put = emu.put(&definition, &token, &def_body).await;
    assert_eq!(def_put.status, 201, "{:?}", def_put.body);
    assert_eq!(state_of(&def_put), "Creating");

    emu.advance(600.0).await;
    for (what, url) in [("image", &image), ("gallery", &gallery), ("definition", &definition)] {
        assert_eq!(state_of(&emu.get(url, &token).await), "Succeeded", "{what}");
    }
    for reply in [&image_put, &gallery_put, &def_put] {
        let op = reply.header("azure-asyncoperation").expect("op");
        let status = async_status(&emu, op, &token).await;
        assert_eq!(status["status"], "Succeeded");
        assert!(status["endTime"].is_string());
    }
}

#[tokio::test]
async fn image_version_replicates_region_by_region() {
    let emu = start_frozen().await;
    let token = emu.arm_token().await;
    let regions = [("westeurope", 1), ("eastus", 2), ("southeastasia", 3)];
    publish_version(&emu, &token, "repl", "Generalized", "1.0.0", &regions).await;
    let url = version_url("repl", "1.0.0");
    let expand = format!("{url}&$expand=ReplicationStatus");

    let plain = emu.get(&url, &token).await;
    assert_eq!(plain.status, 200);
    assert!(
        plain.body["properties"].get("replicationStatus").is_none(),
        "only with $expand"
    );
    assert_eq!(state_of(&plain), "Creating");
    let first = emu.get(&expand, &token).await;
    let op_url = {
        // The version's operation, from the same PUT again (idempotent: it answers with the running one).
        let again = emu
            .put(
                &url,
                &token,
                &json!({"location": "westeurope", "properties": {
                    "publishingProfile": {"targetRegions": regions.iter().map(|(n, r)| json!({"name": n, "regionalReplicaCount": r})).collect::<Vec<_>>(), "storageAccountType": "Standard_LRS"},
                    "storageProfile": {"source": {"id": compute_id(SUB_IMAGING, "rg-imaging", "images/repl-1-0-0")}}}}),
            )
            .await;
        assert_eq!(again.status, 200, "the same PUT again: {:?}", again.body);
        again.header("azure-asyncoperation").expect("op").to_string()
    };
    let at_start = replication(&first);
    assert_eq!(
        at_start["West Europe"].0, "Replicating",
        "the source region starts at once"
    );
    assert_eq!(at_start["East US"], ("Unknown".to_string(), 0));
    assert_eq!(at_start["Southeast Asia"], ("Unknown".to_string(), 0));
    assert_eq!(
        first.body["properties"]["replicationStatus"]["aggregatedState"],
        "InProgress"
    );

    let step = 20.0;
    let mut completed_at: BTreeMap<String, f64> = BTreeMap::new();
    let mut progress: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut seen_states: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut succeeded_while_replicating = None;
    let mut t = 0.0;
    while completed_at.len() < 3 {
        assert!(t < 4000.0, "replication never completed: {completed_at:?}");
        emu.advance(step).await;
        t += step;
        let reply = emu.get(&expand, &token).await;
        let regions_now = replication(&reply);
        for (region, (state, p)) in &regions_now {
            let states = seen_states.entry(region.clone()).or_default();
            if states.last() != Some(state) {
                states.push(state.clone());
            }
            if state == "Replicating" {
                assert!(*p < 100, "{region} progress {p}");
                progress.entry(region.clone()).or_default().push(*p);
            }
            if state == "Completed" {
                assert_eq!(*p, 100);
                completed_at.entry(region.clone()).or_insert(t);
            }
        }
        let all_done = regions_now.values().all(|(s, _)| s == "Completed");
        if state_of(&reply) == "Succeeded" && regions_now.values().any(|(s, _)| s == "Replicating") {
            succeeded_while_replicating.get_or_insert(t);
        }
        let op = async_status(&emu, &op_url, &token).await;
        let expected = if all_done { "Succeeded" } else { "InProgress" };
        assert_eq!(op["status"], expected, "operation at t={t}s with {regions_now:?}");
    }
    println!("replication completed (emulated seconds after the PUT): {completed_at:?}");
    for (region, expected) in [
        ("West Europe", &["Replicating", "Completed"][..]),
        ("East US", &["Unknown", "Replicating", "Completed"][..]),
        ("Southeast Asia", &["Unknown", "Replicating", "Completed"][..]),
    ] {
        assert_eq!(
            seen_states[region], expected,
            "{region} moves through its states in order"
        );
        let p = &progress[region];
        assert!(
            p.windows(2).all(|w| w[0] <= w[1]),
            "{region} progress never goes back: {p:?}"
        );
        assert!(
            p.iter().any(|x| *x > 0) && p.first() < p.last(),
            "{region} progress increases: {p:?}"
        );
    }
    assert!(
        succeeded_while_replicating.is_some(),
        "provisioningState must read Succeeded while a target region still replicates"
    );
    let (weu, eus, sea) = (
        completed_at["West Europe"],
        completed_at["East US"],
        completed_at["Southeast Asia"],
    );
    assert!(weu < eus && eus < sea, "more replicas take longer: {completed_at:?}");
    let last = emu.get(&expand, &token).await;
    assert_eq!(
        last.body["properties"]["replicationStatus"]["aggregatedState"],
        "Completed"
    );
    assert_eq!(state_of(&last), "Succeeded");
}

#[tokio::test]
async fn version_patch_and_new_target_region() {
    let emu = start_frozen().await;
    let token = emu.arm_token().await;
    let id = publish_version(
        &emu,
        &token,
        "upd",
        "Generalized",
        "1.0.0",
        &[("westeurope", 1), ("eastus", 1)],
    )
    .await;
    emu.advance(3000.0).await;
    let url = version_url("upd", "1.0.0");
    let expand = format!("{url}&$expand=ReplicationStatus");
    assert_eq!(state_of(&emu.get(&url, &token).await), "Succeeded");

    let patch = emu
        .call(
            Method::PATCH,
            &url,
            Some(&token),
            Some(&json!({"properties": {"publishingProfile": {"excludeFromLatest": true}}})),
        )
        .await;
    assert_eq!(patch.status, 200, "{:?}", patch.body);
    assert_eq!(state_of(&patch), "Updating");
    let op_url = patch.header("azure-asyncoperation").expect("op").to_string();
    assert_eq!(state_of(&emu.get(&url, &token).await), "Updating");
    assert_eq!(async_status(&emu, &op_url, &token).await["status"], "InProgress");
    emu.advance(60.0).await;
    let after = emu.get(&expand, &token).await;
    assert_eq!(state_of(&after), "Succeeded");
    assert_eq!(after.body["properties"]["publishingProfile"]["excludeFromLatest"], true);
    assert!(
        replication(&after).values().all(|(s, _)| s == "Completed"),
        "a PATCH replicates nothing"
    );
    assert_eq!(async_status(&emu, &op_url, &token).await["status"], "Succeeded");

    // Adding a region: only the new region replicates.
    let targets = json!([
        {"name": "westeurope", "regionalReplicaCount": 1},
        {"name": "eastus", "regionalReplicaCount": 1},
        {"name": "northeurope", "regionalReplicaCount": 1},
    ]);
    let put = emu
        .put(
            &url,
            &token,
            &json!({"location": "westeurope", "properties": {
                "publishingProfile": {"targetRegions": targets, "storageAccountType": "Standard_LRS", "excludeFromLatest": true},
                "storageProfile": {"source": {"id": compute_id(SUB_IMAGING, "rg-imaging", "images/upd-1-0-0")}}}}),
        )
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let op_url = put.header("azure-asyncoperation").expect("op").to_string();
    assert_ne!(
        op_url,
        patch.header("azure-asyncoperation").expect("op"),
        "a change is a new operation"
    );
    let mut t = 0.0;
    let mut north_progress = Vec::new();
    loop {
        let reply = emu.get(&expand, &token).await;
        let r = replication(&reply);
        assert_eq!(r["West Europe"].0, "Completed", "t={t}: {r:?}");
        assert_eq!(r["East US"].0, "Completed", "t={t}: {r:?}");
        let (state, p) = &r["North Europe"];
        let op = async_status(&emu, &op_url, &token).await;
        if state == "Completed" {
            assert_eq!(op["status"], "Succeeded");
            break;
        }
        assert_eq!(state, "Replicating", "t={t}");
        assert_eq!(op["status"], "InProgress", "t={t}");
        north_progress.push(*p);
        assert!(t < 2000.0, "North Europe never completed");
        emu.advance(30.0).await;
        t += 30.0;
    }
    assert!(
        north_progress.len() >= 5,
        "replication of a region takes minutes: {north_progress:?}"
    );
    assert!(north_progress.windows(2).all(|w| w[0] <= w[1]) && north_progress[0] < *north_progress.last().unwrap());
    assert!(id.ends_with("/versions/1.0.0"));
}

#[tokio::test]
async fn delete_runs_over_time_and_nested_resources_block_it() {
    let emu = start_frozen().await;
    let token = emu.arm_token().await;
    publish_version(&emu, &token, "del", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    emu.advance(1200.0).await;
    let gallery = compute(SUB_IMAGING, "rg-gallery", "galleries/sigrun_gallery", GALLERY_API);
    let definition = compute(
        SUB_IMAGING,
        "rg-gallery",
        "galleries/sigrun_gallery/images/del",
        GALLERY_API,
    );
    let version = version_url("del", "1.0.0");

    let refused = emu.delete(&gallery, &token).await;
    assert_eq!(refused.status, 409, "{:?}", refused.body);
    assert_eq!(refused.code(), "CannotDeleteResource");
    assert_eq!(
        emu.delete(&definition, &token).await.status,
        409,
        "the definition has a version"
    );

    let del = emu.delete(&version, &token).await;
    assert_eq!(del.status, 202);
    let location = del.header("location").expect("Location").to_string();
    assert!(del.header("azure-asyncoperation").is_some());
    let get = emu.get(&version, &token).await;
    assert_eq!(get.status, 200);
    assert_eq!(state_of(&get), "Deleting");
    assert_eq!(emu.get(&location, &token).await.status, 202);
    let again = emu.delete(&version, &token).await;
    assert_eq!(again.status, 202, "deleting again while it runs is accepted");
    assert_eq!(
        again.header("location"),
        Some(location.as_str()),
        "and points at the same operation"
    );

    emu.advance(200.0).await;
    let gone = emu.get(&version, &token).await;
    assert_eq!(gone.status, 404, "{:?}", gone.body);
    assert_eq!(gone.code(), "ResourceNotFound");
    assert_eq!(emu.get(&location, &token).await.status, 200);
    assert_eq!(emu.delete(&version, &token).await.status, 204, "deleting what is gone");

    assert_eq!(emu.delete(&definition, &token).await.status, 202);
    emu.advance(60.0).await;
    assert_eq!(emu.get(&definition, &token).await.status, 404);
    assert_eq!(
        emu.delete(&gallery, &token).await.status,
        202,
        "an empty gallery can go"
    );
}

#[tokio::test]
async fn the_same_put_twice_starts_no_new_operation() {
    let emu = start_frozen().await;
    let token = emu.arm_token().await;
    let gallery = compute(SUB_IMAGING, "rg-gallery", "galleries/idem_gallery", GALLERY_API);
    let body = json!({"location": "westeurope", "tags": {"team": "images"}, "properties": {"description": "x"}});
    let first = emu.put(&gallery, &token, &body).await;
    assert_eq!(first.status, 201);
    let ops_before = emu.call(Method::GET, "/_emulator/state", None, None).await.body["operations"].clone();
    let second = emu.put(&gallery, &token, &body).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(
        second.header("azure-asyncoperation"),
        first.header("azure-asyncoperation")
    );
    let ops_after = emu.call(Method::GET, "/_emulator/state", None, None).await.body["operations"].clone();
    assert_eq!(ops_before, ops_after, "no new operation");

    // A definition that leaves its Hyper-V generation to the default: the same body again is the same.
    let definition = compute(
        SUB_IMAGING,
        "rg-gallery",
        "galleries/idem_gallery/images/idem-def",
        GALLERY_API,
    );
    let def_body = json!({"location": "westeurope", "properties": {"osType": "Linux", "osState": "Generalized",
        "identifier": {"publisher": "sigrun", "offer": "idem", "sku": "x"}}});
    let first = emu.put(&definition, &token, &def_body).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(first.body["properties"]["hyperVGeneration"], "V1");
    let second = emu.put(&definition, &token, &def_body).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(
        second.header("azure-asyncoperation"),
        first.header("azure-asyncoperation")
    );

    // A snapshot too, while its first operation still runs (the retry after a lost answer).
    let snap = compute(SUB_IMAGING, "rg-imaging", "snapshots/idem-snap", DISK_API);
    let first = emu.put(&snap, &token, &snapshot_body()).await;
    assert_eq!(first.status, 202);
    let second = emu.put(&snap, &token, &snapshot_body()).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(
        second.header("azure-asyncoperation"),
        first.header("azure-asyncoperation")
    );
    assert_eq!(state_of(&second), "Updating");
    emu.advance(600.0).await;
    let third = emu.put(&snap, &token, &snapshot_body()).await;
    assert_eq!(third.status, 200);
    assert_eq!(
        state_of(&third),
        "Succeeded",
        "a repeat after completion changes nothing"
    );
    assert_eq!(
        third.header("azure-asyncoperation"),
        first.header("azure-asyncoperation")
    );
}

fn pools_url(emu: &TestEmulator) -> String {
    format!("{}/pools?api-version={BATCH_API}", emu.batch_url("sigrunweu"))
}

fn pool_url(emu: &TestEmulator, pool: &str) -> String {
    format!("{}/pools/{pool}?api-version={BATCH_API}", emu.batch_url("sigrunweu"))
}

/// Publishes `version` in westeurope with `replicas` and waits (emulated) until it is replicated.
async fn replicated_version(emu: &TestEmulator, arm: &str, version: &str, replicas: u32) -> String {
    let id = publish_version(emu, arm, "pooldef", "Generalized", version, &[("westeurope", replicas)]).await;
    emu.advance(1800.0).await;
    let reply = emu
        .get(
            &format!("{}&$expand=ReplicationStatus", version_url("pooldef", version)),
            arm,
        )
        .await;
    assert_eq!(replication(&reply)["West Europe"].0, "Completed");
    id
}

fn count_states(nodes: &[Value]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for node in nodes {
        *counts
            .entry(node["state"].as_str().unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    counts
}

/// The dedicated counts of `/nodecounts` for one pool.
async fn node_counts(emu: &TestEmulator, token: &str, pool: &str) -> Value {
    let reply = emu
        .get(
            &format!("{}/nodecounts?api-version={BATCH_API}", emu.batch_url("sigrunweu")),
            token,
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.body["value"]
        .as_array()
        .and_then(|v| v.iter().find(|p| p["poolId"] == pool))
        .unwrap_or_else(|| panic!("{pool} in node counts {:?}", reply.body))["dedicated"]
        .clone()
}

#[tokio::test]
async fn a_pool_read_or_list_with_select_carries_only_the_named_fields_on_every_page() {
    let emu = start_frozen().await;
    let arm = emu.arm_token().await;
    let batch = emu.batch_token().await;
    let image = replicated_version(&emu, &arm, "1.0.0", 1).await;
    for id in ["pool-a", "pool-b", "pool-c"] {
        let add = emu
            .post(&pools_url(&emu), &batch, &gallery_pool_body(id, &image, 1, None))
            .await;
        assert_eq!(add.status, 201, "{:?}", add.body);
    }
    let keys = |v: &Value| -> Vec<String> {
        let mut keys: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
        keys.sort();
        keys
    };

    let whole = emu.get(&pool_url(&emu, "pool-a"), &batch).await;
    assert!(whole.body.get("startTask").is_some() && whole.body.get("eTag").is_some());
    let one = emu
        .get(
            &format!("{}&$select=id,vmSize,allocationState", pool_url(&emu, "pool-a")),
            &batch,
        )
        .await;
    assert_eq!(one.status, 200, "{:?}", one.body);
    assert_eq!(keys(&one.body), ["allocationState", "id", "vmSize"]);
    assert_eq!(one.body["id"], "pool-a");

    // Pages of one pool each: the next link keeps the $select.
    let url = format!("{}&$select=id,state&maxresults=1", pools_url(&emu));
    let mut seen = Vec::new();
    for pool in batch_pages(&emu, &url, &batch, 10).await.iter().flatten() {
        assert_eq!(keys(pool), ["id", "state"], "{pool}");
        seen.push(pool["id"].as_str().unwrap_or("").to_string());
    }
    seen.sort();
    assert_eq!(seen, ["pool-a", "pool-b", "pool-c"]);
}

/// `/nodecounts` as Batch serves it: ten pools a page at most, one pool with `poolId eq '…'`, and a
/// filter it does not support refused with a 400 that names it.
#[tokio::test]
async fn node_counts_come_ten_a_page_and_one_pool_with_its_filter() {
    let emu = start_frozen().await;
    let arm = emu.arm_token().await;
    let batch = emu.batch_token().await;
    let image = replicated_version(&emu, &arm, "1.0.0", 1).await;
    let ids: Vec<String> = (0..12).map(|i| format!("pool-{i:02}")).collect();
    for id in &ids {
        let add = emu
            .post(&pools_url(&emu), &batch, &gallery_pool_body(id, &image, 1, None))
            .await;
        assert_eq!(add.status, 201, "{:?}", add.body);
    }
    let counts_url = format!("{}/nodecounts?api-version={BATCH_API}", emu.batch_url("sigrunweu"));

    let pages = batch_pages(&emu, &counts_url, &batch, 5).await;
    for page in &pages {
        assert!(page.len() <= 10, "at most ten a page: {}", page.len());
    }
    let mut seen: Vec<String> = pages
        .iter()
        .flatten()
        .map(|p| p["poolId"].as_str().unwrap_or("").to_string())
        .collect();
    seen.sort();
    assert_eq!((seen, pages.len()), (ids.clone(), 2));

    let one = emu
        .get(&format!("{counts_url}&$filter=poolId%20eq%20'POOL-07'"), &batch)
        .await;
    assert_eq!(one.status, 200, "{:?}", one.body);
    let value = one.body["value"].as_array().expect("a value array");
    assert_eq!(value.len(), 1, "{value:?}");
    assert_eq!(value[0]["poolId"], "pool-07");
    assert!(one.body.get("odata.nextLink").is_none());

    let bad = emu
        .get(&format!("{counts_url}&$filter=state%20eq%20'idle'"), &batch)
        .await;
    assert_eq!(bad.status, 400, "{:?}", bad.body);
    let text = bad.body.to_string();
    assert!(
        text.contains("InvalidQueryParameterValue") && text.contains("$filter"),
        "{text}"
    );
}

#[tokio::test]
async fn pool_of_2000_nodes_allocates_boots_resizes_and_deletes() {
    let emu = start_frozen().await;
    let arm = emu.arm_token().await;
    let batch = emu.batch_token().await;
    let image = replicated_version(&emu, &arm, "1.0.0", 4).await;

    let add = emu
        .post(
            &pools_url(&emu),
            &batch,
            &gallery_pool_body("pool-big", &image, 2000, Some("PT30M")),
        )
        .await;
    assert_eq!(add.status, 201, "{:?}", add.body);
    let pool = emu.get(&pool_url(&emu, "pool-big"), &batch).await;
    assert_eq!(pool.body["allocationState"], "resizing");
    assert_eq!(pool.body["currentDedicatedNodes"], 0);
    assert_eq!(pool.body["targetDedicatedNodes"], 2000);

    // Ten minutes in: part of the pool is there, its nodes in every stage of booting.
    emu.advance(600.0).await;
    let (nodes, pages) = list_all_nodes(&emu, &batch, "sigrunweu", "pool-big", 1000).await;
    let states = count_states(&nodes);
    println!("nodes after 10 min: {} {states:?}", nodes.len());
    assert!(nodes.len() > 100 && nodes.len() < 2000, "{}", nodes.len());
    assert_eq!(pages, nodes.len().div_ceil(1000).max(1));
    for state in ["creating", "starting", "waitingforstarttask", "idle"] {
        assert!(
            states.get(state).copied().unwrap_or(0) > 0,
            "some node is {state}: {states:?}"
        );
    }
    assert_eq!(states.len(), 4, "no other state: {states:?}");
    let counts = node_counts(&emu, &batch, "pool-big").await;
    for (name, state) in [
        ("creating", "creating"),
        ("starting", "starting"),
        ("waitingForStartTask", "waitingforstarttask"),
        ("idle", "idle"),
    ] {
        assert_eq!(
            counts[name], states[state],
            "nodecounts.{name} agrees with the node list"
        );
    }
    assert_eq!(counts["total"], nodes.len() as u64);
    let pool = emu.get(&pool_url(&emu, "pool-big"), &batch).await;
    assert_eq!(pool.body["allocationState"], "resizing");
    assert_eq!(pool.body["currentDedicatedNodes"], nodes.len() as u64);
    let booted = nodes.iter().find(|n| n["state"] == "idle").expect("an idle node");
    assert_eq!(booted["startTaskInfo"]["result"], "success");

    // Pages of a smaller size add up to the same nodes.
    let (small_pages, n) = list_all_nodes(&emu, &batch, "sigrunweu", "pool-big", 300).await;
    assert_eq!(small_pages.len(), nodes.len());
    assert_eq!(n, nodes.len().div_ceil(300));
    let ids = |v: &[Value]| {
        v.iter()
            .map(|n| n["id"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&small_pages), ids(&nodes));

    // Until steady.
    let mut minutes = 10.0;
    loop {
        let pool = emu.get(&pool_url(&emu, "pool-big"), &batch).await;
        if pool.body["allocationState"] == "steady" {
            assert_eq!(pool.body["currentDedicatedNodes"], 2000, "{:?}", pool.body);
            assert!(
                pool.body.get("resizeErrors").is_none(),
                "{:?}",
                pool.body["resizeErrors"]
            );
            break;
        }
        assert!(minutes < 30.0, "2000 nodes with 4 replicas allocate within 30 minutes");
        emu.advance(30.0).await;
        minutes += 0.5;
    }
    println!("2000 nodes with 4 replicas steady after {minutes} min");
    assert!(minutes > 15.0, "2000 nodes take more than 15 minutes, took {minutes}");
    emu.advance(300.0).await;
    let (nodes, pages) = list_all_nodes(&emu, &batch, "sigrunweu", "pool-big", 1000).await;
    assert_eq!((nodes.len(), pages), (2000, 2));
    assert_eq!(count_states(&nodes).get("idle"), Some(&2000));
    assert_eq!(node_counts(&emu, &batch, "pool-big").await["idle"], 2000);

    // Resize down: the surplus leaves the pool.
    let resize = emu
        .post(
            &format!(
                "{}/pools/pool-big/resize?api-version={BATCH_API}",
                emu.batch_url("sigrunweu")
            ),
            &batch,
            &json!({"targetDedicatedNodes": 1500}),
        )
        .await;
    assert_eq!(resize.status, 202, "{:?}", resize.body);
    let pool = emu.get(&pool_url(&emu, "pool-big"), &batch).await;
    assert_eq!(pool.body["allocationState"], "resizing");
    let counts = node_counts(&emu, &batch, "pool-big").await;
    assert_eq!(
        (counts["leavingPool"].as_u64(), counts["idle"].as_u64()),
        (Some(500), Some(1500))
    );
    emu.advance(90.0).await;
    let pool = emu.get(&pool_url(&emu, "pool-big"), &batch).await;
    assert_eq!(pool.body["allocationState"], "steady");
    assert_eq!(pool.body["currentDedicatedNodes"], 1500);
    let (nodes, _) = list_all_nodes(&emu, &batch, "sigrunweu", "pool-big", 1000).await;
    assert_eq!(nodes.len(), 1500);

    // Delete: deleting, then gone.
    let del = emu.delete(&pool_url(&emu, "pool-big"), &batch).await;
    assert_eq!(del.status, 202);
    let pool = emu.get(&pool_url(&emu, "pool-big"), &batch).await;
    assert_eq!(pool.status, 200);
    assert_eq!(pool.body["state"], "deleting");
    emu.advance(150.0).await;
    let gone = emu.get(&pool_url(&emu, "pool-big"), &batch).await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.code(), "PoolNotFound");
}

#[tokio::test]
async fn allocation_time_depends_on_replicas_and_resize_timeout() {
    let emu = start_frozen().await;
    let arm = emu.arm_token().await;
    let batch = emu.batch_token().await;
    let one = replicated_version(&emu, &arm, "1.0.0", 1).await;
    let four = replicated_version(&emu, &arm, "2.0.0", 4).await;

    for (id, image, nodes, timeout) in [
        ("one-replica", &one, 2000, Some("PT30M")),
        ("short-timeout", &four, 2000, Some("PT15M")),
        ("small", &one, 10, None),
    ] {
        let add = emu
            .post(&pools_url(&emu), &batch, &gallery_pool_body(id, image, nodes, timeout))
            .await;
        assert_eq!(add.status, 201, "{id}: {:?}", add.body);
    }
    emu.advance(14.0 * 60.0).await;
    let small = emu.get(&pool_url(&emu, "small"), &batch).await;
    assert_eq!(
        small.body["allocationState"], "steady",
        "10 nodes need far less than 15 minutes"
    );
    assert_eq!(small.body["currentDedicatedNodes"], 10);
    assert!(small.body.get("resizeErrors").is_none());
    assert!(
        ["PT15M", "PT900S"].contains(&small.body["resizeTimeout"].as_str().unwrap_or("")),
        "the default resize timeout is 15 minutes: {}",
        small.body["resizeTimeout"]
    );
    let short = emu.get(&pool_url(&emu, "short-timeout"), &batch).await;
    assert_eq!(short.body["allocationState"], "resizing");

    emu.advance(2.0 * 60.0).await;
    let short = emu.get(&pool_url(&emu, "short-timeout"), &batch).await;
    assert_eq!(
        short.body["allocationState"], "steady",
        "the resize timeout ends the allocation"
    );
    assert_eq!(short.body["resizeErrors"][0]["code"], "AllocationTimedout");
    let got = short.body["currentDedicatedNodes"].as_u64().expect("count");
    println!("2000 nodes, 4 replicas, PT15M: {got} nodes");
    assert!(got > 500 && got < 2000, "{got}");

    emu.advance(15.0 * 60.0).await;
    let thin = emu.get(&pool_url(&emu, "one-replica"), &batch).await;
    assert_eq!(thin.body["allocationState"], "steady");
    assert_eq!(
        thin.body["resizeErrors"][0]["code"], "AllocationTimedout",
        "{:?}",
        thin.body
    );
    let got = thin.body["currentDedicatedNodes"].as_u64().expect("count");
    println!("2000 nodes, 1 replica, PT30M: {got} nodes");
    assert!(
        got > 0 && got < 1000,
        "one replica cannot serve 2000 nodes in 30 minutes: {got}"
    );
    assert_eq!(thin.body["targetDedicatedNodes"], 2000);
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let options = EmulatorOptions {
        listen: format!("127.0.0.1:{port}").parse().expect("address"),
        state_dir: Some(dir.path().to_path_buf()),
        time_scale: 1e-6,
        ..Default::default()
    };
    let emu = start(options.clone()).await;
    let ca_path = emu.emulator.info().ca_cert.clone().expect("a CA");
    let ca_before = std::fs::read(&ca_path).expect("CA file");
    let token = emu.arm_token().await;
    let gallery = compute(SUB_IMAGING, "rg-gallery", "galleries/kept_gallery", GALLERY_API);
    assert_eq!(
        emu.put(&gallery, &token, &json!({"location": "westeurope", "properties": {}}))
            .await
            .status,
        201
    );
    let snap = compute(SUB_IMAGING, "rg-imaging", "snapshots/kept-snap", DISK_API);
    let put = emu.put(&snap, &token, &snapshot_body()).await;
    assert_eq!(put.status, 202);
    let op_url = put.header("azure-asyncoperation").expect("op").to_string();
    emu.advance(60.0).await;
    let before = emu.emulator.now();
    let base = emu.base().to_string();
    emu.emulator.shutdown().await;

    let emu = start(options).await;
    assert_eq!(emu.base(), base, "same address");
    assert_eq!(std::fs::read(&ca_path).expect("CA file"), ca_before, "the same CA");
    assert!(emu.emulator.now() >= before, "the clock resumes where it stopped");
    // The token from before the restart still verifies.
    let kept = emu.get(&gallery, &token).await;
    assert_eq!(kept.status, 200, "{:?}", kept.body);
    assert_eq!(state_of(&kept), "Succeeded");
    let snapshot = emu.get(&snap, &token).await;
    assert_eq!(snapshot.status, 200);
    assert_eq!(
        state_of(&snapshot),
        "Updating",
        "the snapshot's operation is still running"
    );
    assert_eq!(async_status(&emu, &op_url, &token).await["status"], "InProgress");
    emu.advance(600.0).await;
    assert_eq!(state_of(&emu.get(&snap, &token).await), "Succeeded");
    assert_eq!(async_status(&emu, &op_url, &token).await["status"], "Succeeded");
    let state = emu.call(Method::GET, "/_emulator/state", None, None).await;
    let ids: Vec<&str> = state.body["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert!(ids.iter().any(|id| id.ends_with("/galleries/kept_gallery")), "{ids:?}");
}

#[tokio::test]
async fn a_region_keeps_its_own_exclude_from_latest() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    let version = publish_version(
        &emu,
        &token,
        "per-region",
        "Generalized",
        "1.0.0",
        &[("westeurope", 1), ("eastus", 1)],
    )
    .await;
    emu.advance(4.0 * 3600.0).await;
    let url = format!("{version}?api-version={GALLERY_API}");
    let patch = serde_json::json!({"properties": {"publishingProfile": {"targetRegions": [
        {"name": "West Europe", "regionalReplicaCount": 1, "excludeFromLatest": true},
        {"name": "eastus", "regionalReplicaCount": 1},
    ]}}});
    let reply = emu.call(Method::PATCH, &url, Some(&token), Some(&patch)).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let got = emu.get(&url, &token).await;
    let regions = got.body["properties"]["publishingProfile"]["targetRegions"]
        .as_array()
        .unwrap()
        .clone();
    let exclude = |name: &str| regions.iter().find(|r| r["name"] == name).unwrap()["excludeFromLatest"].clone();
    assert_eq!(exclude("West Europe"), true);
    assert_eq!(exclude("East US"), false);
}
