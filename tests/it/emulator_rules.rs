//! The Azure rules of DESIGN §1, as the emulator enforces them: each rule is broken once over a real
//! socket and the answer is checked for Azure's status and error code (and, where it helps a user,
//! that the message names the offending thing). ARM rules first, then the Batch pool rules.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sigrun::emulator::EmulatorOptions;

use crate::helpers::*;

const ACCOUNT_WEU: &str = "sigrunweu";
const ACCOUNT_EUS: &str = "sigruneus";
/// The shipped world's account with small quotas (5 pools, 48 cores).
const ACCOUNT_SEA: &str = "sigrunsea";
const LINUX_SKU: &str = "batch.node.ubuntu 22.04";

/// An emulator whose clock only moves when a test advances it (one emulated second per real
/// second), so "still replicating" and "still registering" are states a test can observe.
async fn start_steady() -> TestEmulator {
    start(EmulatorOptions {
        time_scale: 1.0,
        ..Default::default()
    })
    .await
}

/// ARM's `error.message`, or Batch's `message.value`.
fn message(reply: &Reply) -> String {
    reply.body["error"]["message"]
        .as_str()
        .or_else(|| reply.body["message"]["value"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// A key of Batch's `values` detail list.
fn batch_value(reply: &Reply, key: &str) -> String {
    reply.body["values"]
        .as_array()
        .and_then(|values| values.iter().find(|v| v["key"] == key))
        .and_then(|v| v["value"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[track_caller]
fn expect(reply: &Reply, status: u16, code: &str) {
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::from_u16(status).expect("status"), code),
        "unexpected answer: {:#}",
        reply.body
    );
}

#[track_caller]
fn expect_arm(reply: &Reply, status: u16, code: &str, target: Option<&str>, mentions: &[&str]) {
    expect(reply, status, code);
    if let Some(target) = target {
        assert_eq!(reply.body["error"]["target"], target, "target of {:#}", reply.body);
    }
    let text = message(reply);
    for m in mentions {
        assert!(text.contains(m), "message should mention '{m}': {text}");
    }
}

fn gallery_path(sub: &str, rg: &str, rest: &str) -> String {
    compute(sub, rg, rest, GALLERY_API)
}

/// The managed image `publish_version` made for `definition`/`version`.
fn image_of(definition: &str, version: &str) -> String {
    compute_id(
        SUB_IMAGING,
        "rg-imaging",
        &format!("images/{definition}-{}", version.replace('.', "-")),
    )
}

fn version_body(location: &str, source: &str, targets: Value) -> Value {
    json!({"location": location, "properties": {
        "publishingProfile": {"targetRegions": targets, "storageAccountType": "Standard_LRS"},
        "storageProfile": {"source": {"id": source}}}})
}

fn definition_body(definition: &str, os_type: &str, os_state: &str, generation: Option<&str>) -> Value {
    let mut body = json!({"location": "westeurope", "properties": {"osType": os_type, "osState": os_state,
        "identifier": {"publisher": "sigrun", "offer": definition, "sku": "rules"}}});
    if let Some(generation) = generation {
        body["properties"]["hyperVGeneration"] = json!(generation);
    }
    body
}

/// A gallery, a definition and a version from `source` (a managed image in westeurope) in any
/// subscription; returns the version's id. Each step is finished by advancing the clock.
#[allow(clippy::too_many_arguments)]
async fn gallery_chain(
    emu: &TestEmulator,
    token: &str,
    sub: &str,
    rg: &str,
    gallery: &str,
    definition: &str,
    version: &str,
    source: &str,
) -> String {
    let reply = emu
        .put(
            &gallery_path(sub, rg, &format!("galleries/{gallery}")),
            token,
            &json!({"location": "westeurope", "properties": {}}),
        )
        .await;
    assert_eq!(reply.status, 201, "gallery: {:#}", reply.body);
    emu.advance(120.0).await;
    let rest = format!("galleries/{gallery}/images/{definition}");
    let reply = emu
        .put(
            &gallery_path(sub, rg, &rest),
            token,
            &definition_body(definition, "Linux", "Generalized", Some("V2")),
        )
        .await;
    assert_eq!(reply.status, 201, "definition: {:#}", reply.body);
    emu.advance(120.0).await;
    let rest = format!("{rest}/versions/{version}");
    let reply = emu
        .put(
            &gallery_path(sub, rg, &rest),
            token,
            &version_body(
                "westeurope",
                source,
                json!([{"name": "westeurope", "regionalReplicaCount": 1}]),
            ),
        )
        .await;
    assert_eq!(reply.status, 201, "version: {:#}", reply.body);
    compute_id(sub, rg, &rest)
}

/// The replication state of `region` (display form, e.g. "East US") of a version, now.
async fn replication_state(emu: &TestEmulator, token: &str, version_id: &str, region: &str) -> String {
    let reply = emu
        .get(
            &format!("{version_id}?api-version={GALLERY_API}&$expand=ReplicationStatus"),
            token,
        )
        .await;
    assert_eq!(reply.status, 200, "version get: {:#}", reply.body);
    reply.body["properties"]["replicationStatus"]["summary"]
        .as_array()
        .and_then(|s| s.iter().find(|r| r["region"] == region))
        .and_then(|r| r["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

/// Advances the clock until `region` of the version reports Completed.
async fn until_completed(emu: &TestEmulator, token: &str, version_id: &str, region: &str) {
    for _ in 0..12 {
        if replication_state(emu, token, version_id, region).await == "Completed" {
            return;
        }
        emu.advance(600.0).await;
    }
    panic!("replication of {version_id} to {region} never completed");
}

fn pool_body(id: &str, image: &str, sku: &str) -> Value {
    json!({
        "id": id,
        "vmSize": "Standard_D2s_v3",
        "virtualMachineConfiguration": {"imageReference": {"virtualMachineImageId": image}, "nodeAgentSKUId": sku},
        "targetDedicatedNodes": 2,
        "resizeTimeout": "PT15M",
    })
}

async fn add_pool(emu: &TestEmulator, account: &str, token: &str, body: &Value) -> Reply {
    emu.post(
        &format!("{}/pools?api-version={BATCH_API}", emu.batch_url(account)),
        token,
        body,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// ARM: names and publishing profile

#[tokio::test]
async fn a_gallery_name_with_a_dash_is_invalid() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    let url = gallery_path(SUB_IMAGING, "rg-gallery", "galleries/sigrun-gallery");
    let reply = emu
        .put(&url, &token, &json!({"location": "westeurope", "properties": {}}))
        .await;
    expect_arm(
        &reply,
        400,
        "InvalidParameter",
        Some("galleryName"),
        &["sigrun-gallery"],
    );
    let reply = emu.get(&url, &token).await;
    expect(&reply, 404, "ResourceNotFound");
}

#[tokio::test]
async fn version_names_must_be_major_minor_patch() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    let source = image_of("ubuntu", "1.0.0");
    let targets = json!([{"name": "westeurope", "regionalReplicaCount": 1}]);
    for bad in ["2026.1126", "1.a.0", "1.0.99999999999"] {
        let url = gallery_path(
            SUB_IMAGING,
            "rg-gallery",
            &format!("galleries/sigrun_gallery/images/ubuntu/versions/{bad}"),
        );
        let reply = emu
            .put(&url, &token, &version_body("westeurope", &source, targets.clone()))
            .await;
        expect_arm(&reply, 400, "InvalidParameter", Some("galleryImageVersionName"), &[bad]);
    }
    let url = gallery_path(
        SUB_IMAGING,
        "rg-gallery",
        "galleries/sigrun_gallery/images/ubuntu/versions/2026.1126.0",
    );
    let reply = emu
        .put(&url, &token, &version_body("westeurope", &source, targets))
        .await;
    assert_eq!(reply.status, 201, "a date-based version is valid: {:#}", reply.body);
}

#[tokio::test]
async fn publishing_profile_rules() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    let source = image_of("ubuntu", "1.0.0");
    let url = gallery_path(
        SUB_IMAGING,
        "rg-gallery",
        "galleries/sigrun_gallery/images/ubuntu/versions/1.0.1",
    );

    // The same region twice, in its two spellings.
    let targets = json!([{"name": "westeurope"}, {"name": "westus"}, {"name": "West US"}]);
    let reply = emu
        .put(&url, &token, &version_body("westeurope", &source, targets))
        .await;
    expect_arm(
        &reply,
        400,
        "InvalidParameter",
        Some("publishingProfile.targetRegions"),
        &["Duplicate regions are not allowed"],
    );

    // The source (westeurope) is not in the version's region.
    let targets = json!([{"name": "westus"}]);
    let reply = emu.put(&url, &token, &version_body("westus", &source, targets)).await;
    expect_arm(
        &reply,
        400,
        "InvalidParameter",
        Some("storageProfile.source.id"),
        &["westeurope", "westus"],
    );

    // The target regions leave out the source region.
    let targets = json!([{"name": "eastus"}]);
    let reply = emu
        .put(&url, &token, &version_body("westeurope", &source, targets))
        .await;
    expect_arm(
        &reply,
        400,
        "InvalidParameter",
        Some("publishingProfile.targetRegions"),
        &["westeurope"],
    );

    // Replica counts outside 1..=100, per region and as the profile default.
    let targets = json!([{"name": "westeurope", "regionalReplicaCount": 0}]);
    let reply = emu
        .put(&url, &token, &version_body("westeurope", &source, targets))
        .await;
    expect_arm(&reply, 400, "InvalidParameter", None, &["out of range", "0"]);
    let mut body = version_body("westeurope", &source, json!([{"name": "westeurope"}]));
    body["properties"]["publishingProfile"]["replicaCount"] = json!(101);
    let reply = emu.put(&url, &token, &body).await;
    expect_arm(
        &reply,
        400,
        "InvalidParameter",
        Some("publishingProfile.replicaCount"),
        &["out of range", "101"],
    );

    // Nothing of the refused PUTs exists; the boundary value 100 is accepted.
    let reply = emu.get(&url, &token).await;
    expect(&reply, 404, "ResourceNotFound");
    let targets = json!([{"name": "westeurope", "regionalReplicaCount": 100}]);
    let reply = emu
        .put(&url, &token, &version_body("westeurope", &source, targets))
        .await;
    assert_eq!(reply.status, 201, "100 replicas are allowed: {:#}", reply.body);
}

#[tokio::test]
async fn definition_and_source_must_agree() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    // The source: a Linux, generalized, Hyper-V V2 image.
    publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    let source = image_of("ubuntu", "1.0.0");
    let cases = [
        ("windows", "Windows", "Generalized", "V2", "OS type"),
        ("specialized", "Linux", "Specialized", "V2", "OS State"),
        ("gen1", "Linux", "Generalized", "V1", "Hypervisor generation"),
    ];
    for (definition, os_type, os_state, generation, what) in cases {
        let rest = format!("galleries/sigrun_gallery/images/{definition}");
        let reply = emu
            .put(
                &gallery_path(SUB_IMAGING, "rg-gallery", &rest),
                &token,
                &definition_body(definition, os_type, os_state, Some(generation)),
            )
            .await;
        assert_eq!(reply.status, 201, "definition {definition}: {:#}", reply.body);
        emu.advance(120.0).await;
        let reply = emu
            .put(
                &gallery_path(SUB_IMAGING, "rg-gallery", &format!("{rest}/versions/1.0.0")),
                &token,
                &version_body("westeurope", &source, json!([{"name": "westeurope"}])),
            )
            .await;
        expect_arm(&reply, 400, "InvalidParameter", Some("storageProfile"), &[what]);
    }
}

// ---------------------------------------------------------------------------------------------
// ARM: idempotent PUTs and immutable properties

#[tokio::test]
async fn immutable_properties_cannot_change_and_the_same_put_is_a_no_op() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    let version_id = publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.1", &[("westeurope", 1)]).await;
    emu.advance(3600.0).await;

    // Definition: osState cannot change; the same body again is a 200.
    let def_url = gallery_path(SUB_IMAGING, "rg-gallery", "galleries/sigrun_gallery/images/ubuntu");
    let same_def = json!({"location": "westeurope", "properties": {"osType": "Linux", "osState": "Generalized",
        "hyperVGeneration": "V2", "identifier": {"publisher": "sigrun", "offer": "ubuntu", "sku": "nightly"}}});
    let mut changed = same_def.clone();
    changed["properties"]["osState"] = json!("Specialized");
    let reply = emu.put(&def_url, &token, &changed).await;
    expect_arm(
        &reply,
        409,
        "PropertyChangeNotAllowed",
        Some("properties.osState"),
        &["properties.osState"],
    );
    let reply = emu.put(&def_url, &token, &same_def).await;
    assert_eq!(reply.status, 200, "same definition again: {:#}", reply.body);
    assert_eq!(reply.body["properties"]["osState"], "Generalized");

    // Version: the source cannot change; the same body again is a 200 that starts nothing new.
    let version_url = format!("{version_id}?api-version={GALLERY_API}");
    let targets = json!([{"name": "westeurope", "regionalReplicaCount": 1}]);
    let original = version_body("westeurope", &image_of("ubuntu", "1.0.0"), targets.clone());
    let reply = emu
        .put(
            &version_url,
            &token,
            &version_body("westeurope", &image_of("ubuntu", "1.0.1"), targets),
        )
        .await;
    expect_arm(
        &reply,
        409,
        "PropertyChangeNotAllowed",
        Some("properties.storageProfile"),
        &["storageProfile"],
    );
    let before = emu.get(&version_url, &token).await;
    assert_eq!(before.status, 200);
    let first = emu.put(&version_url, &token, &original).await;
    assert_eq!(first.status, 200, "same version again: {:#}", first.body);
    let second = emu.put(&version_url, &token, &original).await;
    assert_eq!(second.status, 200, "same version a third time: {:#}", second.body);
    assert_eq!(
        first.header("azure-asyncoperation"),
        second.header("azure-asyncoperation"),
        "a repeated PUT must not start a new operation"
    );
    assert_eq!(second.body["properties"]["provisioningState"], "Succeeded");
    assert_eq!(second.body, before.body, "the version is as it was");
    let list = emu
        .get(
            &gallery_path(
                SUB_IMAGING,
                "rg-gallery",
                "galleries/sigrun_gallery/images/ubuntu/versions",
            ),
            &token,
        )
        .await;
    assert_eq!(list.status, 200);
    let names: Vec<&str> = list.body["value"]
        .as_array()
        .expect("value")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["1.0.0", "1.0.1"], "no version was added");
}

#[tokio::test]
async fn a_definition_put_again_without_its_defaulted_generation_is_accepted() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    let gallery = gallery_path(SUB_IMAGING, "rg-gallery", "galleries/sigrun_gallery");
    let reply = emu
        .put(&gallery, &token, &json!({"location": "westeurope", "properties": {}}))
        .await;
    assert_eq!(reply.status, 201, "{:#}", reply.body);
    emu.advance(120.0).await;
    let url = gallery_path(SUB_IMAGING, "rg-gallery", "galleries/sigrun_gallery/images/legacy");
    let body = definition_body("legacy", "Linux", "Generalized", None);
    let reply = emu.put(&url, &token, &body).await;
    assert_eq!(reply.status, 201, "{:#}", reply.body);
    assert_eq!(reply.body["properties"]["hyperVGeneration"], "V1");
    emu.advance(120.0).await;
    let reply = emu.put(&url, &token, &body).await;
    assert_eq!(reply.status, 200, "the same body again: {:#}", reply.body);
    let mut v2 = body.clone();
    v2["properties"]["hyperVGeneration"] = json!("V2");
    let reply = emu.put(&url, &token, &v2).await;
    expect_arm(
        &reply,
        409,
        "PropertyChangeNotAllowed",
        Some("properties.hyperVGeneration"),
        &[],
    );
}

// ---------------------------------------------------------------------------------------------
// ARM: what does not exist

#[tokio::test]
async fn missing_parents_groups_subscriptions_and_disks_are_404() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;

    let reply = emu
        .put(
            &gallery_path(SUB_IMAGING, "rg-gallery", "galleries/nowhere/images/ubuntu"),
            &token,
            &definition_body("ubuntu", "Linux", "Generalized", Some("V2")),
        )
        .await;
    expect_arm(&reply, 404, "ParentResourceNotFound", None, &["nowhere"]);

    let reply = emu
        .put(
            &gallery_path(SUB_IMAGING, "rg-gallery", "galleries/sigrun_gallery"),
            &token,
            &json!({"location": "westeurope"}),
        )
        .await;
    assert_eq!(reply.status, 201, "{:#}", reply.body);
    emu.advance(120.0).await;
    let reply = emu
        .put(
            &gallery_path(
                SUB_IMAGING,
                "rg-gallery",
                "galleries/sigrun_gallery/images/missing/versions/1.0.0",
            ),
            &token,
            &version_body(
                "westeurope",
                &image_of("ubuntu", "1.0.0"),
                json!([{"name": "westeurope"}]),
            ),
        )
        .await;
    expect_arm(&reply, 404, "ParentResourceNotFound", None, &["missing"]);

    let reply = emu
        .put(
            &gallery_path(SUB_IMAGING, "rg-nope", "galleries/g1"),
            &token,
            &json!({"location": "westeurope"}),
        )
        .await;
    expect_arm(&reply, 404, "ResourceGroupNotFound", None, &["rg-nope"]);

    let unknown = "99999999-9999-4999-8999-999999999999";
    let reply = emu
        .get(&compute(unknown, "rg-imaging", "images/x", COMPUTE_API), &token)
        .await;
    expect_arm(&reply, 404, "SubscriptionNotFound", None, &[unknown]);

    // The unmanaged VM's OS disk is a VHD, not a managed disk: there is nothing to snapshot.
    let disk = compute_id(SUB_IMAGING, "rg-imaging", "disks/build-unmanaged-osdisk");
    let url = compute(SUB_IMAGING, "rg-imaging", "snapshots/unmanaged-os", DISK_API);
    let reply = emu
        .put(
            &url,
            &token,
            &json!({"location": "westeurope", "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": disk}}}),
        )
        .await;
    expect_arm(&reply, 404, "NotFound", None, &["build-unmanaged-osdisk"]);
    let reply = emu.get(&url, &token).await;
    expect(&reply, 404, "ResourceNotFound");
}

// ---------------------------------------------------------------------------------------------
// ARM: api-versions, tokens and roles

#[tokio::test]
async fn api_versions_are_checked_per_provider() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    let vm = |api: &str| {
        format!(
            "/subscriptions/{SUB_IMAGING}/resourceGroups/rg-imaging/providers/Microsoft.Compute/virtualMachines/build-ubuntu-2204{api}"
        )
    };

    let reply = emu.get(&vm(""), &token).await;
    expect_arm(&reply, 400, "MissingApiVersionParameter", None, &["api-version"]);
    let reply = emu.get(&vm("?api-version=2024-7-1"), &token).await;
    expect_arm(&reply, 400, "InvalidApiVersionParameter", None, &["2024-7-1"]);
    let reply = emu.get(&vm("?api-version=latest"), &token).await;
    expect(&reply, 400, "InvalidApiVersionParameter");
    // A date no Compute version has.
    let reply = emu.get(&vm("?api-version=2019-07-02"), &token).await;
    expect_arm(
        &reply,
        400,
        "NoRegisteredProviderFound",
        None,
        &["2019-07-02", "virtualMachines"],
    );
    // Older versions Azure still serves, as clients pin them (the Azure CLI 2.91 reads gallery
    // image definitions at 2021-10-01).
    let reply = emu.get(&vm("?api-version=2019-07-01"), &token).await;
    assert_eq!(reply.status, 200, "compute 2019-07-01: {:#}", reply.body);
    let gallery = format!(
        "/subscriptions/{SUB_IMAGING}/resourceGroups/rg-gallery/providers/Microsoft.Compute/galleries?api-version=2021-10-01"
    );
    let reply = emu.get(&gallery, &token).await;
    assert_eq!(reply.status, 200, "gallery list at 2021-10-01: {:#}", reply.body);
    // A disk api-version is not a compute one.
    let reply = emu.get(&vm(&format!("?api-version={DISK_API}")), &token).await;
    expect(&reply, 400, "NoRegisteredProviderFound");
    let reply = emu.get(&vm("?api-version=2099-01-01"), &token).await;
    expect(&reply, 400, "NoRegisteredProviderFound");

    // Newer stable versions than the saved spec are served.
    let reply = emu.get(&vm("?api-version=2026-04-01"), &token).await;
    assert_eq!(reply.status, 200, "compute 2026-04-01: {:#}", reply.body);
    assert_eq!(reply.body["name"], "build-ubuntu-2204");

    let batch = emu.batch_token().await;
    let url = format!("{}/supportedimages", emu.batch_url(ACCOUNT_WEU));
    let reply = emu.get(&format!("{url}?api-version=2025-06-01"), &batch).await;
    assert_eq!(reply.status, 200, "batch 2025-06-01: {:#}", reply.body);
    assert!(reply.body["value"].as_array().is_some_and(|v| !v.is_empty()));
    let reply = emu.get(&url, &batch).await;
    expect(&reply, 400, "MissingRequiredQueryParameter");
    assert_eq!(batch_value(&reply, "QueryParameterName"), "api-version");
    let reply = emu.get(&format!("{url}?api-version=2020-01-01.10.0"), &batch).await;
    expect(&reply, 400, "InvalidQueryParameterValue");
    assert_eq!(batch_value(&reply, "QueryParameterValue"), "2020-01-01.10.0");
}

#[tokio::test]
async fn tokens_are_checked_for_signature_audience_and_tenant() {
    let emu = start_fast().await;
    let url = compute(
        SUB_IMAGING,
        "rg-imaging",
        "virtualMachines/build-ubuntu-2204",
        COMPUTE_API,
    );

    let reply = emu.call(Method::GET, &url, None, None).await;
    expect(&reply, 401, "AuthenticationFailed");
    assert!(reply.header("www-authenticate").is_some());

    let token = emu.arm_token().await;
    let batch = emu.batch_token().await;
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT");
    // Another signature byte, and another token's claims under this token's signature.
    let flipped = if parts[2].starts_with('A') { "B" } else { "A" };
    let bad_signature = format!("{}.{}.{flipped}{}", parts[0], parts[1], &parts[2][1..]);
    let other_claims = batch.split('.').nth(1).expect("payload");
    let swapped_claims = format!("{}.{other_claims}.{}", parts[0], parts[2]);
    for tampered in [bad_signature, swapped_claims] {
        let reply = emu.get(&url, &tampered).await;
        expect(&reply, 401, "InvalidAuthenticationToken");
    }
    let reply = emu.get(&url, "not-a-jwt").await;
    expect(&reply, 401, "InvalidAuthenticationToken");

    let reply = emu.get(&url, &batch).await;
    expect_arm(
        &reply,
        401,
        "InvalidAuthenticationTokenAudience",
        None,
        &["https://batch.core.windows.net/"],
    );

    let partner = emu.token_for(PARTNER_APP, OTHER_TENANT, ARM_SCOPE).await;
    let reply = emu.get(&url, &partner).await;
    expect_arm(
        &reply,
        401,
        "InvalidAuthenticationTokenTenant",
        None,
        &[OTHER_TENANT, TENANT],
    );
    let challenge = reply
        .header("www-authenticate")
        .expect("WWW-Authenticate on a tenant mismatch");
    assert!(
        challenge.starts_with("Bearer ") && challenge.contains(&format!("login.windows.net/{TENANT}")),
        "{challenge}"
    );

    let reply = emu.get(&url, &token).await;
    assert_eq!(reply.status, 200, "the genuine token still works: {:#}", reply.body);
}

#[tokio::test]
async fn a_reader_cannot_write() {
    let emu = start_fast().await;
    let reader = emu.token_for(READER_APP, TENANT, ARM_SCOPE).await;
    let url = gallery_path(SUB_IMAGING, "rg-gallery", "galleries/sigrun_gallery");
    let reply = emu
        .put(&url, &reader, &json!({"location": "westeurope", "properties": {}}))
        .await;
    let scope = compute_id(SUB_IMAGING, "rg-gallery", "galleries/sigrun_gallery");
    expect_arm(
        &reply,
        403,
        "AuthorizationFailed",
        None,
        &[READER_APP.0, "Microsoft.Compute/galleries/write", &scope],
    );
    // Reading is what a Reader may do.
    let reply = emu
        .get(
            &compute(
                SUB_IMAGING,
                "rg-imaging",
                "virtualMachines/build-ubuntu-2204",
                COMPUTE_API,
            ),
            &reader,
        )
        .await;
    assert_eq!(reply.status, 200, "{:#}", reply.body);
}

#[tokio::test]
async fn registering_microsoft_batch_takes_time_and_a_role() {
    let emu = start_steady().await;
    let token = emu.arm_token().await;
    let provider = format!("/subscriptions/{SUB_SHARED}/providers/Microsoft.Batch?api-version={RESOURCES_API}");
    let register =
        format!("/subscriptions/{SUB_SHARED}/providers/Microsoft.Batch/register?api-version={RESOURCES_API}");

    let reply = emu.get(&provider, &token).await;
    assert_eq!(reply.status, 200, "{:#}", reply.body);
    assert_eq!(reply.body["registrationState"], "NotRegistered");

    let reader = emu.token_for(READER_APP, TENANT, ARM_SCOPE).await;
    let reply = emu.call(Method::POST, &register, Some(&reader), None).await;
    expect_arm(
        &reply,
        403,
        "AuthorizationFailed",
        None,
        &[
            "Microsoft.Batch/register/action",
            &format!("/subscriptions/{SUB_SHARED}"),
        ],
    );
    let reply = emu.get(&provider, &token).await;
    assert_eq!(
        reply.body["registrationState"], "NotRegistered",
        "a refused register changes nothing"
    );

    let reply = emu.call(Method::POST, &register, Some(&token), None).await;
    assert_eq!(reply.status, 200, "{:#}", reply.body);
    assert_eq!(reply.body["registrationState"], "Registering");
    let reply = emu.get(&provider, &token).await;
    assert_eq!(reply.body["registrationState"], "Registering");

    emu.advance(300.0).await;
    let reply = emu.get(&provider, &token).await;
    assert_eq!(reply.body["registrationState"], "Registered");
}

// ---------------------------------------------------------------------------------------------
// Batch: pools from gallery images

#[tokio::test]
async fn batch_refuses_a_specialized_image() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    let version = publish_version(
        &emu,
        &token,
        "ubuntu-spec",
        "Specialized",
        "1.0.0",
        &[("westeurope", 1)],
    )
    .await;
    until_completed(&emu, &token, &version, "West Europe").await;
    let batch = emu.batch_token().await;
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &pool_body("spec", &version, LINUX_SKU)).await;
    expect(&reply, 400, "InvalidPropertyValue");
    assert_eq!(batch_value(&reply, "PropertyName"), "virtualMachineImageId");
    assert!(
        batch_value(&reply, "Reason").contains("specialized"),
        "{:#}",
        reply.body
    );
}

/// Batch converts a string to the type its property declares (the Azure CLI 2.91 sends node
/// counts as strings): the pool is made of what was meant and shows it typed; a string that is
/// not such a value is refused naming the property and the value, never read as a default.
#[tokio::test]
async fn typed_properties_sent_as_strings_are_read_as_their_types_or_refused() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    let version = publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    until_completed(&emu, &token, &version, "West Europe").await;
    let batch = emu.batch_token().await;

    let mut body = pool_body("strings", &version, LINUX_SKU);
    body["targetDedicatedNodes"] = json!(" 3 ");
    body["taskSlotsPerNode"] = json!("2");
    body["startTask"] = json!({"commandLine": "/bin/true", "waitForSuccess": "False"});
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &body).await;
    assert_eq!(reply.status, 201, "{:#}", reply.body);
    let url = format!("{}/pools/strings?api-version={BATCH_API}", emu.batch_url(ACCOUNT_WEU));
    let pool = emu.get(&url, &batch).await.body;
    assert_eq!(pool["targetDedicatedNodes"], 3, "{pool:#}");
    assert_eq!(pool["taskSlotsPerNode"], 2, "{pool:#}");
    assert_eq!(pool["startTask"]["waitForSuccess"], false, "{pool:#}");

    for (key, sent) in [
        ("targetDedicatedNodes", json!("2.5")),
        ("targetLowPriorityNodes", json!("-")),
        ("enableInterNodeCommunication", json!("yes")),
    ] {
        let mut body = pool_body("refused", &version, LINUX_SKU);
        body[key] = sent.clone();
        let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &body).await;
        expect(&reply, 400, "InvalidPropertyValue");
        assert_eq!(batch_value(&reply, "PropertyName"), key);
        assert_eq!(batch_value(&reply, "PropertyValue"), sent.to_string());
    }

    let resize = format!(
        "{}/pools/strings/resize?api-version={BATCH_API}",
        emu.batch_url(ACCOUNT_WEU)
    );
    emu.advance(3600.0).await;
    let reply = emu.post(&resize, &batch, &json!({"targetDedicatedNodes": "1"})).await;
    assert_eq!(reply.status, 202, "{:#}", reply.body);
    let pool = emu.get(&url, &batch).await.body;
    assert_eq!(pool["targetDedicatedNodes"], 1, "{pool:#}");
}

#[tokio::test]
async fn the_node_agent_sku_must_fit_the_image() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    let version = publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    until_completed(&emu, &token, &version, "West Europe").await;
    let batch = emu.batch_token().await;

    let reply = add_pool(
        &emu,
        ACCOUNT_WEU,
        &batch,
        &pool_body("win-sku", &version, "batch.node.windows amd64"),
    )
    .await;
    expect(&reply, 400, "InvalidPropertyValue");
    assert_eq!(batch_value(&reply, "PropertyName"), "nodeAgentSKUId");
    let reason = batch_value(&reply, "Reason");
    assert!(
        reason.contains("batch.node.windows amd64") && reason.contains("linux"),
        "{reason}"
    );

    let reply = add_pool(
        &emu,
        ACCOUNT_WEU,
        &batch,
        &pool_body("odd-sku", &version, "batch.node.plan9 4"),
    )
    .await;
    expect(&reply, 400, "InvalidPropertyValue");
    assert_eq!(batch_value(&reply, "PropertyName"), "nodeAgentSKUId");
    assert!(batch_value(&reply, "Reason").contains("batch.node.plan9 4"));

    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &pool_body("ok", &version, LINUX_SKU)).await;
    assert_eq!(reply.status, 201, "the matching SKU works: {:#}", reply.body);
}

#[tokio::test]
async fn the_image_needs_a_completed_replica_in_the_account_region() {
    let emu = start_steady().await;
    let token = emu.arm_token().await;
    let batch = emu.batch_token().await;

    // Replicated to westeurope only; the account is in eastus.
    let weu_only = publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    until_completed(&emu, &token, &weu_only, "West Europe").await;
    let reply = add_pool(&emu, ACCOUNT_EUS, &batch, &pool_body("p1", &weu_only, LINUX_SKU)).await;
    expect(&reply, 400, "InvalidPropertyValue");
    assert_eq!(batch_value(&reply, "PropertyName"), "virtualMachineImageId");
    assert!(batch_value(&reply, "Reason").contains("eastus"), "{:#}", reply.body);

    // Replicating to eastus: not yet.
    let both = publish_version(
        &emu,
        &token,
        "ubuntu",
        "Generalized",
        "1.0.1",
        &[("westeurope", 1), ("eastus", 1)],
    )
    .await;
    emu.advance(500.0).await;
    assert_eq!(replication_state(&emu, &token, &both, "East US").await, "Replicating");
    let reply = add_pool(&emu, ACCOUNT_EUS, &batch, &pool_body("p1", &both, LINUX_SKU)).await;
    expect(&reply, 400, "InvalidPropertyValue");
    let reason = batch_value(&reply, "Reason");
    assert!(reason.contains("eastus") && reason.contains("Replicating"), "{reason}");

    // Once eastus is Completed the pool is created.
    until_completed(&emu, &token, &both, "East US").await;
    let reply = add_pool(&emu, ACCOUNT_EUS, &batch, &pool_body("p1", &both, LINUX_SKU)).await;
    assert_eq!(reply.status, 201, "{:#}", reply.body);
}

#[tokio::test]
async fn a_gallery_in_another_subscription_needs_microsoft_batch_registered() {
    let emu = start_steady().await;
    let token = emu.arm_token().await;
    publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    emu.advance(3600.0).await;
    let version = gallery_chain(
        &emu,
        &token,
        SUB_SHARED,
        "rg-shared",
        "shared_gallery",
        "ubuntu",
        "1.0.0",
        &image_of("ubuntu", "1.0.0"),
    )
    .await;
    until_completed(&emu, &token, &version, "West Europe").await;

    let batch = emu.batch_token().await;
    let body = pool_body("shared", &version, LINUX_SKU);
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &body).await;
    expect(&reply, 409, "MissingSubscriptionRegistration");
    assert!(message(&reply).contains(SUB_SHARED), "{:#}", reply.body);
    assert!(message(&reply).contains("Microsoft.Batch"), "{:#}", reply.body);

    let register =
        format!("/subscriptions/{SUB_SHARED}/providers/Microsoft.Batch/register?api-version={RESOURCES_API}");
    let reply = emu.call(Method::POST, &register, Some(&token), None).await;
    assert_eq!(reply.status, 200, "{:#}", reply.body);
    assert_eq!(reply.body["registrationState"], "Registering");
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &body).await;
    expect(&reply, 409, "MissingSubscriptionRegistration");

    emu.advance(300.0).await;
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &body).await;
    assert_eq!(reply.status, 201, "registered now: {:#}", reply.body);
}

#[tokio::test]
async fn a_gallery_in_another_tenant_is_refused() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    emu.advance(3600.0).await;
    let partner = emu.token_for(PARTNER_APP, OTHER_TENANT, ARM_SCOPE).await;
    let version = gallery_chain(
        &emu,
        &partner,
        SUB_PARTNER,
        "rg-partner",
        "partner_gallery",
        "ubuntu",
        "1.0.0",
        &image_of("ubuntu", "1.0.0"),
    )
    .await;
    until_completed(&emu, &partner, &version, "West Europe").await;

    let batch = emu.batch_token().await;
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &pool_body("partner", &version, LINUX_SKU)).await;
    expect(&reply, 400, "InvalidPropertyValue");
    assert_eq!(batch_value(&reply, "PropertyName"), "virtualMachineImageId");
    let reason = batch_value(&reply, "Reason");
    assert!(reason.contains(SUB_PARTNER) && reason.contains("tenant"), "{reason}");
}

#[tokio::test]
async fn reader_on_the_image_is_not_enough_for_batch() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    let version = publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    until_completed(&emu, &token, &version, "West Europe").await;

    let reader = emu.token_for(READER_APP, TENANT, BATCH_SCOPE).await;
    let reply = add_pool(&emu, ACCOUNT_WEU, &reader, &pool_body("reader", &version, LINUX_SKU)).await;
    expect(&reply, 403, "InsufficientPermissions");
    let text = message(&reply);
    assert!(
        text.contains("Microsoft.Compute/disks/beginGetAccess/action") && text.contains(&version),
        "{text}"
    );
    // The rollout app holds a role with beginGetAccess on the gallery's group: it may.
    let rollout = emu.token_for(ROLLOUT_APP, TENANT, BATCH_SCOPE).await;
    let reply = add_pool(&emu, ACCOUNT_WEU, &rollout, &pool_body("rollout", &version, LINUX_SKU)).await;
    assert_eq!(reply.status, 201, "{:#}", reply.body);
}

#[tokio::test]
async fn shared_key_is_refused_for_gallery_image_pools() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    let version = publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    until_completed(&emu, &token, &version, "West Europe").await;
    // Signed with the account's key (so the signature holds): still refused, for the image.
    let key = account_key(&emu, ACCOUNT_WEU).await;
    let body = pool_body("sharedkey", &version, LINUX_SKU);
    let path = format!("/pools?api-version={BATCH_API}");
    let resp = signed_batch_request(&emu, &key, ACCOUNT_WEU, Method::POST, &path, Some(&body))
        .send()
        .await
        .expect("pool add");
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.expect("batch error json");
    assert_eq!(body["code"], "AuthenticationFailed", "{body:#}");
    let detail = body["values"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["key"] == "AuthenticationErrorDetail"))
        .and_then(|x| x["value"].as_str())
        .unwrap_or_default();
    assert!(detail.contains("SharedKey"), "{body:#}");
}

#[tokio::test]
async fn pool_add_validation_and_the_happy_path() {
    let emu = start_steady().await;
    let token = emu.arm_token().await;
    let batch = emu.batch_token().await;
    let version = publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;

    let mut body = pool_body("nightly", &version, LINUX_SKU);
    body["resizeTimeout"] = json!("PT4M");
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &body).await;
    expect(&reply, 400, "InvalidPropertyValue");
    assert_eq!(batch_value(&reply, "PropertyName"), "resizeTimeout");

    let mut body = pool_body("nightly", &version, LINUX_SKU);
    body["vmSize"] = json!("Standard_Floppy_v1");
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &body).await;
    expect(&reply, 400, "InvalidPropertyValue");
    assert_eq!(batch_value(&reply, "PropertyName"), "vmSize");

    let mut body = pool_body("nightly", &version, LINUX_SKU);
    body.as_object_mut().expect("object").remove("vmSize");
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &body).await;
    expect(&reply, 400, "MissingRequiredProperty");
    assert_eq!(batch_value(&reply, "PropertyName"), "vmSize");

    // Right after publishing, the source region is still being written: no pool yet.
    let body = pool_body("nightly", &version, LINUX_SKU);
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &body).await;
    expect(&reply, 400, "InvalidPropertyValue");

    until_completed(&emu, &token, &version, "West Europe").await;
    // Two counts whose sum overflows 32 bits are too many nodes, not a small pool.
    let mut huge = body.clone();
    huge["targetDedicatedNodes"] = json!(u32::MAX);
    huge["targetLowPriorityNodes"] = json!(2);
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &huge).await;
    expect(&reply, 400, "InvalidPropertyValue");
    assert_eq!(batch_value(&reply, "PropertyName"), "targetDedicatedNodes");
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &body).await;
    assert_eq!(reply.status, 201, "{:#}", reply.body);
    assert!(reply.header("etag").is_some_and(|e| !e.is_empty()), "ETag");
    let last_modified = reply.header("last-modified").expect("Last-Modified");
    assert!(last_modified.ends_with("GMT"), "RFC 1123 date: {last_modified}");

    let reply = emu
        .get(
            &format!("{}/pools/nightly?api-version={BATCH_API}", emu.batch_url(ACCOUNT_WEU)),
            &batch,
        )
        .await;
    assert_eq!(reply.status, 200, "{:#}", reply.body);
    assert_eq!(
        reply.body["virtualMachineConfiguration"]["imageReference"]["virtualMachineImageId"],
        version.as_str()
    );

    let mut again = body.clone();
    again["id"] = json!("NIGHTLY");
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &again).await;
    expect(&reply, 409, "PoolExists");
}

#[tokio::test]
async fn allocation_needs_a_replica_per_600_nodes_and_15_minutes_per_1000() {
    let emu = start_steady().await;
    let token = emu.arm_token().await;
    let batch = emu.batch_token().await;
    let one = publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    let four = publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.1", &[("westeurope", 4)]).await;
    until_completed(&emu, &token, &one, "West Europe").await;
    until_completed(&emu, &token, &four, "West Europe").await;

    // 2000 nodes: 4 replicas (one per 600 nodes) and 30 minutes (15 per 1000 nodes) are enough;
    // one replica, or 15 minutes, are not.
    let cases = [
        ("enough", &four, "PT30M", true),
        ("one-replica", &one, "PT30M", false),
        ("short-timeout", &four, "PT15M", false),
    ];
    for (id, image, timeout, _) in &cases {
        let mut body = pool_body(id, image, LINUX_SKU);
        body["targetDedicatedNodes"] = json!(2000);
        body["resizeTimeout"] = json!(timeout);
        let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &body).await;
        assert_eq!(reply.status, 201, "{id}: {:#}", reply.body);
    }
    emu.advance(1900.0).await;
    for (id, _, _, fits) in cases {
        let reply = emu
            .get(
                &format!("{}/pools/{id}?api-version={BATCH_API}", emu.batch_url(ACCOUNT_WEU)),
                &batch,
            )
            .await;
        assert_eq!(reply.status, 200, "{id}: {:#}", reply.body);
        assert_eq!(reply.body["allocationState"], "steady", "{id}");
        let nodes = reply.body["currentDedicatedNodes"]
            .as_u64()
            .expect("currentDedicatedNodes");
        if fits {
            assert_eq!(nodes, 2000, "{id}");
            assert!(reply.body.get("resizeErrors").is_none(), "{id}: {:#}", reply.body);
        } else {
            assert!(nodes < 2000, "{id}: {nodes} nodes");
            assert_eq!(reply.body["resizeErrors"][0]["code"], "AllocationTimedout", "{id}");
        }
    }
}

#[tokio::test]
async fn regions_and_batch_vm_sizes_are_listed_and_paged() {
    let emu = start_fast().await;
    let token = emu.arm_token().await;
    let reply = emu
        .get(
            &format!(
                "{}/subscriptions/{SUB_IMAGING}/locations?api-version=2022-12-01",
                emu.base()
            ),
            &token,
        )
        .await;
    assert_eq!(reply.status, 200, "{:#}", reply.body);
    let names: Vec<&str> = reply.body["value"]
        .as_array()
        .expect("value")
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"westeurope") && !names.contains(&"mars"), "{names:?}");
    assert_eq!(reply.body["value"][0]["displayName"], "East US");

    let skus = |location: &str, extra: &str| {
        format!(
            "{}/subscriptions/{SUB_COMPUTE}/providers/Microsoft.Batch/locations/{location}/virtualMachineSkus?api-version=2024-07-01{extra}",
            emu.base()
        )
    };
    let mut url = skus("westeurope", "&maxresults=7");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let reply = emu.get(&url, &token).await;
        assert_eq!(reply.status, 200, "{:#}", reply.body);
        pages += 1;
        let page = reply.body["value"].as_array().expect("value");
        assert!(page.len() <= 7);
        seen.extend(page.iter().map(|s| s["name"].as_str().unwrap().to_string()));
        match reply.body["nextLink"].as_str() {
            Some(next) => url = next.to_string(),
            None => break,
        }
    }
    assert!(pages > 2, "{pages} pages");
    assert!(seen.iter().any(|s| s == "Standard_D4s_v5"));
    let unique: std::collections::HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no size twice across pages");

    let reply = emu.get(&skus("mars", ""), &token).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["error"]["code"], "LocationNotAvailableForResourceType");
    let reply = emu.get(&skus("westeurope", "&maxresults=0"), &token).await;
    assert_eq!(reply.status, 400);
    let reply = emu
        .get(
            &format!(
                "{}/subscriptions/{SUB_IMAGING}/locations?api-version=2019-01-01",
                emu.base()
            ),
            &token,
        )
        .await;
    assert_eq!(reply.status, 400, "an api-version the subscriptions API never had");
}

/// The account's primary key from ARM's Batch Account – Get Keys.
async fn account_key(emu: &TestEmulator, account: &str) -> String {
    let token = emu.arm_token().await;
    let url = format!(
        "{}/subscriptions/{SUB_COMPUTE}/resourceGroups/rg-batch/providers/Microsoft.Batch/batchAccounts/{account}/listKeys?api-version=2024-07-01",
        emu.base()
    );
    let reply = emu.call(Method::POST, &url, Some(&token), None).await;
    assert_eq!(reply.status, 200, "listKeys: {:#}", reply.body);
    assert_eq!(reply.body["accountName"], account);
    assert_ne!(reply.body["primary"], reply.body["secondary"]);
    reply.body["primary"].as_str().expect("a primary key").to_string()
}

/// A Batch request signed as azure-batch's `BatchSharedKeyAuthPolicy` signs it (written here
/// from the Batch REST documentation, not shared with the emulator).
fn signed_batch_request(
    emu: &TestEmulator,
    key: &str,
    account: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> reqwest::RequestBuilder {
    use base64::Engine;
    use hmac::Mac;
    let engine = base64::engine::general_purpose::STANDARD;
    let date = "Wed, 02 Dec 2026 10:00:00 GMT";
    let content_type = "application/json; odata=minimalmetadata";
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
    let length = bytes.as_ref().map(|b| b.len().to_string()).unwrap_or_default();
    let url: reqwest::Url = format!("{}{path}", emu.batch_url(account)).parse().unwrap();
    let mut query: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    query.sort();
    let mut text = format!(
        "{method}\n\n\n{length}\n\n{}\n\n\n\n\n\n\nocp-date:{date}\n/{account}{}",
        if bytes.is_some() { content_type } else { "" },
        url.path()
    );
    for (name, value) in query {
        text.push_str(&format!("\n{name}:{value}"));
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&engine.decode(key).unwrap()).unwrap();
    mac.update(text.as_bytes());
    let signature = engine.encode(mac.finalize().into_bytes());
    let mut request = emu
        .client
        .request(method, url)
        .header("ocp-date", date)
        .header("authorization", format!("SharedKey {account}:{signature}"));
    if let Some(bytes) = bytes {
        request = request.header("content-type", content_type).body(bytes);
    }
    request
}

#[tokio::test]
async fn shared_key_requests_are_checked_by_their_signature() {
    let emu = start_fast().await;
    let key = account_key(&emu, ACCOUNT_WEU).await;
    let path = format!("/pools?api-version={BATCH_API}");
    let signed = signed_batch_request(&emu, &key, ACCOUNT_WEU, Method::GET, &path, None);
    let resp = signed.send().await.expect("list pools");
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);

    // Anything else is refused: a made-up signature, another account's key, a tampered request.
    let other_key = account_key(&emu, ACCOUNT_EUS).await;
    let forged = [
        emu.client
            .get(format!("{}{path}", emu.batch_url(ACCOUNT_WEU)))
            .header("authorization", "SharedKey sigrunweu:abc"),
        signed_batch_request(&emu, &other_key, ACCOUNT_WEU, Method::GET, &path, None),
        signed_batch_request(&emu, &key, ACCOUNT_WEU, Method::GET, &path, None).query(&[("maxresults", "1")]),
    ];
    for request in forged {
        let resp = request.send().await.expect("list pools");
        assert_eq!(resp.status(), 403);
        let body: Value = resp.json().await.expect("batch error json");
        assert_eq!(body["code"], "AuthenticationFailed", "{body:#}");
    }
}

/// Batch refuses a pool past the account's `poolQuota` with `PoolQuotaReached` (409), while a
/// repeated add of a pool it holds still meets `PoolExists`.
#[tokio::test]
async fn a_pool_past_the_pool_quota_is_refused() {
    let emu = start_steady().await;
    let token = emu.arm_token().await;
    let batch = emu.batch_token().await;
    let version = publish_version(
        &emu,
        &token,
        "ubuntu",
        "Generalized",
        "1.0.0",
        &[("westeurope", 1), ("southeastasia", 1)],
    )
    .await;
    until_completed(&emu, &token, &version, "Southeast Asia").await;
    for n in 1..=5 {
        let reply = add_pool(
            &emu,
            ACCOUNT_SEA,
            &batch,
            &pool_body(&format!("q{n}"), &version, LINUX_SKU),
        )
        .await;
        assert_eq!(reply.status, 201, "pool {n} of 5: {:#}", reply.body);
    }
    let reply = add_pool(&emu, ACCOUNT_SEA, &batch, &pool_body("q6", &version, LINUX_SKU)).await;
    expect(&reply, 409, "PoolQuotaReached");
    let reply = add_pool(&emu, ACCOUNT_SEA, &batch, &pool_body("q5", &version, LINUX_SKU)).await;
    expect(&reply, 409, "PoolExists");
    // Another account's quota is its own.
    let reply = add_pool(&emu, ACCOUNT_WEU, &batch, &pool_body("q6", &version, LINUX_SKU)).await;
    assert_ne!(reply.code(), "PoolQuotaReached", "{:#}", reply.body);
}

/// A pool of the Southeast Asia account as Batch reports it.
async fn sea_pool(emu: &TestEmulator, token: &str, id: &str) -> Value {
    let url = format!("{}/pools/{id}?api-version={BATCH_API}", emu.batch_url(ACCOUNT_SEA));
    let reply = emu.get(&url, token).await;
    assert_eq!(reply.status, 200, "GET pool {id}: {:#}", reply.body);
    reply.body
}

#[tokio::test]
async fn allocation_stops_at_the_core_quotas_and_ends_steady_naming_the_quota() {
    let emu = start_steady().await;
    let token = emu.arm_token().await;
    let batch = emu.batch_token().await;
    let version = publish_version(
        &emu,
        &token,
        "ubuntu",
        "Generalized",
        "1.0.0",
        &[("westeurope", 1), ("southeastasia", 1)],
    )
    .await;
    until_completed(&emu, &token, &version, "Southeast Asia").await;
    // sigrunsea: 48 dedicated and 48 low-priority cores; Standard_D2s_v3 has 2 vCPUs.
    let mut first = pool_body("first", &version, LINUX_SKU);
    first["targetDedicatedNodes"] = json!(20);
    assert_eq!(add_pool(&emu, ACCOUNT_SEA, &batch, &first).await.status, 201);
    let mut over = pool_body("over", &version, LINUX_SKU);
    over["targetDedicatedNodes"] = json!(10);
    over["targetLowPriorityNodes"] = json!(30);
    // Batch takes the pool: the quota shows only as it allocates.
    assert_eq!(add_pool(&emu, ACCOUNT_SEA, &batch, &over).await.status, 201);

    emu.advance(600.0).await;
    let during = sea_pool(&emu, &batch, "over").await;
    assert_eq!(
        during["allocationState"], "resizing",
        "it keeps trying until its resize timeout: {during:#}"
    );
    emu.advance(900.0).await;
    let after = sea_pool(&emu, &batch, "over").await;
    assert_eq!(after["allocationState"], "steady", "{after:#}");
    assert_eq!(after["currentDedicatedNodes"], 4, "(48 - 40) / 2 dedicated nodes fit");
    assert_eq!(after["targetDedicatedNodes"], 10, "the target stays as asked");
    assert_eq!(after["resizeErrors"][0]["code"], "AccountCoreQuotaReached", "{after:#}");
    let first = sea_pool(&emu, &batch, "first").await;
    assert_eq!(first["currentDedicatedNodes"], 20, "the pool that fitted is whole");
    assert!(
        first["resizeErrors"].as_array().is_none_or(|e| e.is_empty()),
        "{first:#}"
    );

    // Low-priority cores bind on their own: a pool of only low-priority nodes past them.
    let mut spot = pool_body("spot", &version, LINUX_SKU);
    spot["targetDedicatedNodes"] = json!(0);
    spot["targetLowPriorityNodes"] = json!(30);
    assert_eq!(add_pool(&emu, ACCOUNT_SEA, &batch, &spot).await.status, 201);
    emu.advance(1800.0).await;
    let spot = sea_pool(&emu, &batch, "spot").await;
    assert_eq!(
        spot["resizeErrors"][0]["code"], "AccountLowPriorityCoreQuotaReached",
        "{spot:#}"
    );
    assert_eq!(
        spot["currentLowPriorityNodes"].as_u64().unwrap() + after["currentLowPriorityNodes"].as_u64().unwrap(),
        24,
        "48 low-priority cores hold 24 nodes between the two pools"
    );
}

#[tokio::test]
async fn a_version_a_pool_was_made_from_cannot_be_deleted_until_the_pool_is_gone() {
    let emu = start_steady().await;
    let token = emu.arm_token().await;
    let batch = emu.batch_token().await;
    let regions = [("westeurope", 1), ("southeastasia", 1)];
    let version = publish_version(&emu, &token, "ubuntu", "Generalized", "1.0.0", &regions).await;
    until_completed(&emu, &token, &version, "Southeast Asia").await;
    assert_eq!(
        add_pool(&emu, ACCOUNT_SEA, &batch, &pool_body("user", &version, LINUX_SKU))
            .await
            .status,
        201
    );
    let url = format!("{version}?api-version={GALLERY_API}");
    let refused = emu.delete(&url, &token).await;
    expect(&refused, 409, "OperationNotAllowed");
    assert!(
        message(&refused).contains("user"),
        "names the pool: {}",
        message(&refused)
    );

    let pool = format!("{}/pools/user?api-version={BATCH_API}", emu.batch_url(ACCOUNT_SEA));
    assert_eq!(emu.delete(&pool, &batch).await.status, 202);
    let still = emu.delete(&url, &token).await;
    expect(&still, 409, "OperationNotAllowed");
    emu.advance(180.0).await;
    let deleted = emu.delete(&url, &token).await;
    assert_eq!(deleted.status, 202, "{:#}", deleted.body);
    emu.advance(300.0).await;
    assert_eq!(emu.get(&url, &token).await.status, 404);
}
