//! `AzureClient` against the emulator over real sockets: every `AzureApi` operation in pipeline
//! order (snapshot → image → gallery → definition → version → replication → pool → node counts →
//! resize → delete), long-running-operation status, missing resources, error mapping, throttling
//! with `Retry-After` checked in the emulator's request log, retried 5xx and dropped connections,
//! a Reader identity's 403, status and account URLs that must not receive a token, the plain-HTTP
//! emulator, and secrets that must not show up in `Debug` output or errors (logs: `azure_logs.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use reqwest::Method;
use serde_json::{Value, json};
use sigrun::azure::api::{
    Accepted, DefinitionRequest, ImageRequest, OperationStatus, PoolCreated, PoolRequest, SnapshotRequest, Tags,
    TargetRegion, VersionRequest,
};
use sigrun::azure::writes::{Writes, watched};
use sigrun::azure::{AzureApi, AzureClient, AzureSettings, CredentialSettings, ErrorClass, RegistrationState, Secret};
use sigrun::emulator::EmulatorOptions;
use sigrun::model::ids::{
    BatchAccountId, DiskId, GalleryId, GalleryImageId, GalleryImageVersionId, ImageId, SnapshotId, VmId,
};

use crate::helpers::*;

fn settings_for(emu: &TestEmulator, app: (&str, &str)) -> AzureSettings {
    let mut settings = AzureSettings::new(CredentialSettings::ClientSecret {
        tenant_id: TENANT.to_string(),
        client_id: app.0.to_string(),
        client_secret: Secret::new(app.1),
    });
    settings.cloud.authority_host = emu.base().to_string();
    settings.cloud.resource_manager = emu.base().to_string();
    settings.extra_ca_cert = emu.emulator.info().ca_cert.clone().map(Into::into);
    // Short first backoff keeps the fault tests quick; Retry-After still rules when Azure sends it.
    settings.retry.min_delay_ms = 50;
    settings
}

fn client_for_app(emu: &TestEmulator, app: (&str, &str)) -> AzureClient {
    AzureClient::new(&settings_for(emu, app)).expect("client")
}

fn tags(run: &str) -> Tags {
    Tags::from([
        ("sigrun-pipeline".to_string(), "it".to_string()),
        ("sigrun-run".to_string(), run.to_string()),
    ])
}

/// Polls the operation behind `accepted`, jumping the emulated clock while it runs.
async fn complete(emu: &TestEmulator, azure: &AzureClient, accepted: &Accepted, step_secs: f64) {
    let url = accepted.status_url.as_deref().expect("a status URL");
    for _ in 0..60 {
        match azure.operation_status(url).await.expect("status") {
            OperationStatus::Succeeded => return,
            OperationStatus::InProgress { .. } => emu.advance(step_secs).await,
            OperationStatus::Failed { code, message } => panic!("operation failed: {code}: {message}"),
        }
    }
    panic!("operation at {url} never finished");
}

async fn clear_log(emu: &TestEmulator) {
    let reply = emu
        .call(
            Method::DELETE,
            &format!("{}/_emulator/requests", emu.base()),
            None,
            None,
        )
        .await;
    assert_eq!(reply.status, 204);
}

/// Logged requests to one API (`arm`, `batch`, `aad`).
async fn logged(emu: &TestEmulator, api: &str) -> Vec<Value> {
    emu.requests().await.into_iter().filter(|r| r["api"] == api).collect()
}

/// What `build_image_chain` made.
struct Chain {
    image: ImageId,
    definition: GalleryImageId,
}

/// Snapshots the build VM's disks, makes a managed image from them, and ensures the gallery and a
/// generalized definition, all through the client.
async fn build_image_chain(emu: &TestEmulator, azure: &AzureClient, name: &str) -> Chain {
    let vm = azure
        .get_vm(&VmId::new(SUB_IMAGING, "rg-imaging", &["build-ubuntu-2204"]).unwrap())
        .await
        .expect("vm");
    let snapshot = |suffix: &str| SnapshotId::new(SUB_IMAGING, "rg-imaging", &[&format!("{name}-{suffix}")]).unwrap();
    let os_snapshot = snapshot("os");
    let accepted = azure
        .put_snapshot(
            &os_snapshot,
            &SnapshotRequest {
                location: vm.location.clone(),
                source: vm.os_disk.clone().expect("managed OS disk"),
                tags: tags(name),
            },
        )
        .await
        .expect("put os snapshot");
    complete(emu, azure, &accepted, 600.0).await;
    let mut data_snapshots = Vec::new();
    for (lun, disk) in &vm.data_disks {
        let id = snapshot(&format!("data{lun}"));
        let accepted = azure
            .put_snapshot(
                &id,
                &SnapshotRequest {
                    location: vm.location.clone(),
                    source: disk.clone().expect("managed data disk"),
                    tags: tags(name),
                },
            )
            .await
            .expect("put data snapshot");
        complete(emu, azure, &accepted, 600.0).await;
        data_snapshots.push((*lun, id));
    }
    let image = ImageId::new(SUB_IMAGING, "rg-imaging", &[name]).unwrap();
    let accepted = azure
        .put_image(
            &image,
            &ImageRequest {
                location: vm.location.clone(),
                os_type: vm.os_type.clone(),
                hyper_v_generation: vm.hyper_v_generation.clone().unwrap_or_else(|| "V1".into()),
                os_snapshot,
                data_snapshots,
                tags: tags(name),
            },
        )
        .await
        .expect("put image");
    complete(emu, azure, &accepted, 600.0).await;
    let gallery = GalleryId::new(SUB_IMAGING, "rg-gallery", &["sigrun_gallery"]).unwrap();
    if azure.get_gallery(&gallery).await.expect("get gallery").is_none() {
        let accepted = azure
            .put_gallery(&gallery, "westeurope", &tags(name))
            .await
            .expect("put gallery");
        complete(emu, azure, &accepted, 60.0).await;
    }
    let definition = GalleryImageId::new(SUB_IMAGING, "rg-gallery", &["sigrun_gallery", name]).unwrap();
    let accepted = azure
        .put_definition(
            &definition,
            &DefinitionRequest {
                location: "westeurope".into(),
                os_type: "Linux".into(),
                os_state: "Generalized".into(),
                hyper_v_generation: "V2".into(),
                publisher: "sigrun".into(),
                offer: name.into(),
                sku: "nightly".into(),
                tags: tags(name),
            },
        )
        .await
        .expect("put definition");
    complete(emu, azure, &accepted, 60.0).await;
    Chain { image, definition }
}

fn version_request(chain: &Chain, name: &str, regions: &[(&str, u32)]) -> VersionRequest {
    VersionRequest {
        location: "westeurope".into(),
        source: chain.image.clone(),
        regions: regions
            .iter()
            .map(|(region, replicas)| TargetRegion {
                name: region.to_string(),
                replicas: *replicas,
                storage_account_type: "Standard_LRS".into(),
            })
            .collect(),
        storage_account_type: "Standard_LRS".into(),
        exclude_from_latest: false,
        end_of_life: Some("2027-12-31T00:00:00Z".into()),
        tags: tags(name),
    }
}

fn pool_request(id: &str, image: &GalleryImageVersionId, nodes: u32) -> PoolRequest {
    PoolRequest {
        id: id.into(),
        vm_size: "Standard_D2s_v3".into(),
        image: image.clone(),
        node_agent_sku_id: "batch.node.ubuntu 22.04".into(),
        resize_timeout: Duration::from_secs(15 * 60),
        dedicated_nodes: nodes,
        low_priority_nodes: 0,
        task_slots_per_node: 1,
        start_task: None,
        metadata: [("sigrun-run".to_string(), "it-full".to_string())].into(),
    }
}

/// A gallery image version in westeurope that pools can be added from.
async fn a_gallery_version(emu: &TestEmulator, definition: &str) -> GalleryImageVersionId {
    let token = emu.arm_token().await;
    let id = publish_version(emu, &token, definition, "Generalized", "1.0.0", &[("westeurope", 1)]).await;
    emu.advance(3600.0).await;
    GalleryImageVersionId::parse(&id).unwrap()
}

#[tokio::test]
async fn the_whole_chain_from_vm_to_pool_and_back() {
    let emu = start_fast().await;
    let azure = client_for_app(&emu, PIPELINE_APP);

    // The build VM as the planner sees it.
    let vm = azure
        .get_vm(&VmId::new(SUB_IMAGING, "rg-imaging", &["build-ubuntu-2204"]).unwrap())
        .await
        .expect("get vm");
    assert_eq!(vm.location, "westeurope");
    assert_eq!(vm.os_type, "Linux");
    assert_eq!(vm.hyper_v_generation.as_deref(), Some("V2"));
    assert_eq!(
        vm.base_image,
        Some((
            "canonical".into(),
            "0001-com-ubuntu-server-jammy".into(),
            "22_04-lts-gen2".into()
        ))
    );
    assert_eq!(
        vm.os_disk,
        Some(DiskId::new(SUB_IMAGING, "rg-imaging", &["build-ubuntu-2204-osdisk"]).unwrap())
    );
    let luns: Vec<u32> = vm.data_disks.iter().map(|(lun, _)| *lun).collect();
    assert_eq!(luns, vec![0, 1]);
    assert!(vm.data_disks.iter().all(|(_, disk)| disk.is_some()));
    assert!(vm.extensions.is_empty());
    let with_extension = azure
        .get_vm(&VmId::new(SUB_IMAGING, "rg-imaging", &["build-with-extension"]).unwrap())
        .await
        .expect("get vm with extension");
    assert_eq!(with_extension.extensions, vec!["CustomScript".to_string()]);

    // Provider registration, as for a gallery in another subscription.
    assert_eq!(
        azure
            .provider_state(SUB_IMAGING, "Microsoft.Batch")
            .await
            .unwrap()
            .as_str(),
        "Registered"
    );
    assert_eq!(
        azure
            .provider_state(SUB_SHARED, "Microsoft.Batch")
            .await
            .unwrap()
            .as_str(),
        "NotRegistered"
    );
    let state = azure.register_provider(SUB_SHARED, "Microsoft.Batch").await.unwrap();
    assert!(
        matches!(state, RegistrationState::Registering | RegistrationState::Registered),
        "{state}"
    );
    emu.advance(300.0).await;
    assert_eq!(
        azure
            .provider_state(SUB_SHARED, "Microsoft.Batch")
            .await
            .unwrap()
            .as_str(),
        "Registered"
    );

    // Snapshot → image → gallery → definition, each completed through its status URL.
    let os_snapshot = SnapshotId::new(SUB_IMAGING, "rg-imaging", &["nightly-os"]).unwrap();
    assert_eq!(azure.get_snapshot(&os_snapshot).await.unwrap(), None);
    let chain = build_image_chain(&emu, &azure, "nightly").await;
    let snapshot = azure
        .get_snapshot(&os_snapshot)
        .await
        .unwrap()
        .expect("snapshot exists");
    assert_eq!(snapshot.provisioning_state.as_str(), "Succeeded");
    assert_eq!(snapshot.tags, tags("nightly"));
    let image = azure.get_image(&chain.image).await.unwrap().expect("image exists");
    assert_eq!(image.provisioning_state.as_str(), "Succeeded");
    assert_eq!(image.tags["sigrun-run"], "nightly");
    let gallery = GalleryId::new(SUB_IMAGING, "rg-gallery", &["sigrun_gallery"]).unwrap();
    let gallery_state = azure.get_gallery(&gallery).await.unwrap().expect("gallery exists");
    assert_eq!(gallery_state.provisioning_state.as_str(), "Succeeded");
    let definition = azure
        .get_definition(&chain.definition)
        .await
        .unwrap()
        .expect("definition exists");
    assert_eq!(
        (
            definition.os_type.as_str(),
            definition.os_state.as_str(),
            definition.hyper_v_generation.as_str()
        ),
        ("Linux", "Generalized", "V2")
    );
    assert_eq!(
        (
            definition.publisher.as_str(),
            definition.offer.as_str(),
            definition.sku.as_str()
        ),
        ("sigrun", "nightly", "nightly")
    );
    assert_eq!(definition.provisioning_state.as_str(), "Succeeded");

    // The version, replicated to two regions; replication read with region names made canonical.
    let version = chain.definition.version("2026.1126.0").unwrap();
    assert_eq!(azure.get_version(&version, true).await.unwrap(), None);
    let accepted = azure
        .put_version(
            &version,
            &version_request(&chain, "nightly", &[("westeurope", 1), ("East US", 2)]),
        )
        .await
        .expect("put version");
    assert_eq!(
        accepted.provisioning_state.as_ref().map(|s| s.as_str()),
        Some("Creating")
    );
    let status_url = accepted.status_url.clone().expect("status url");
    assert!(matches!(
        azure.operation_status(&status_url).await.unwrap(),
        OperationStatus::InProgress { .. }
    ));
    let early = azure
        .get_version(&version, true)
        .await
        .unwrap()
        .expect("version exists");
    let regions: Vec<&str> = early.replication.iter().map(|r| r.region.as_str()).collect();
    assert_eq!(regions, vec!["westeurope", "eastus"]);
    assert!(early.replication.iter().any(|r| r.state.as_str() != "Completed"));
    let mut done = false;
    for _ in 0..40 {
        emu.advance(300.0).await;
        let info = azure.get_version(&version, true).await.unwrap().expect("version");
        if info
            .replication
            .iter()
            .all(|r| r.state.as_str() == "Completed" && r.progress == 100)
        {
            done = true;
            break;
        }
    }
    assert!(done, "replication never completed");
    complete(&emu, &azure, &accepted, 300.0).await;
    let info = azure.get_version(&version, true).await.unwrap().expect("version");
    assert_eq!(info.provisioning_state.as_str(), "Succeeded");
    assert_eq!(
        info.target_regions,
        vec![("westeurope".to_string(), 1), ("eastus".to_string(), 2)]
    );
    assert_eq!(info.source.as_deref(), Some(chain.image.to_string().as_str()));
    assert!(!info.exclude_from_latest);
    assert_eq!(info.tags, tags("nightly"));
    let plain = azure.get_version(&version, false).await.unwrap().expect("version");
    assert!(plain.replication.is_empty(), "replication is only read when expanded");
    let listed = azure.list_versions(&chain.definition).await.unwrap();
    let names: Vec<&str> = listed.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["2026.1126.0"]);
    assert_eq!(listed[0].info.tags, tags("nightly"), "the list says what a GET says");
    let accepted = azure.set_exclude_from_latest(&version, true).await.expect("patch");
    complete(&emu, &azure, &accepted, 60.0).await;
    assert!(
        azure
            .get_version(&version, false)
            .await
            .unwrap()
            .unwrap()
            .exclude_from_latest
    );
    let accepted = azure
        .set_target_regions(
            &version,
            &[
                TargetRegion {
                    name: "westeurope".into(),
                    replicas: 1,
                    storage_account_type: "Standard_LRS".into(),
                },
                TargetRegion {
                    name: "eastus".into(),
                    replicas: 2,
                    storage_account_type: "Standard_LRS".into(),
                },
                TargetRegion {
                    name: "southeastasia".into(),
                    replicas: 1,
                    storage_account_type: "Standard_LRS".into(),
                },
            ],
        )
        .await
        .expect("patch regions");
    complete(&emu, &azure, &accepted, 300.0).await;
    let info = azure.get_version(&version, true).await.unwrap().unwrap();
    assert_eq!(info.target_regions.len(), 3);
    assert!(info.replication.iter().any(|r| r.region == "southeastasia"));

    // The Batch account and its data plane.
    let account_id = BatchAccountId::new(SUB_COMPUTE, "rg-batch", &["sigrunweu"]).unwrap();
    let account = azure.get_batch_account(&account_id).await.expect("batch account");
    assert_eq!(account.location, "westeurope");
    assert_eq!(account.url, emu.batch_url("sigrunweu"));
    assert_eq!(account.id, account_id);
    let images = azure.supported_images(&account).await.expect("supported images");
    let jammy = images
        .iter()
        .find(|i| i.offer == "0001-com-ubuntu-server-jammy" && i.sku == "22_04-lts-gen2")
        .expect("jammy gen2 is supported");
    assert_eq!(jammy.node_agent_sku_id, "batch.node.ubuntu 22.04");
    assert_eq!(jammy.os_type, "linux");

    let pool_id = "sigrun-it-nightly";
    assert_eq!(azure.get_pool(&account.url, pool_id).await.unwrap(), None);
    let body = pool_request(pool_id, &version, 3);
    assert_eq!(azure.add_pool(&account.url, &body).await.unwrap(), PoolCreated::Created);
    assert_eq!(azure.add_pool(&account.url, &body).await.unwrap(), PoolCreated::Exists);
    let pool = azure.get_pool(&account.url, pool_id).await.unwrap().expect("pool");
    assert_eq!(pool.id, pool_id);
    assert_eq!(pool.state.as_str(), "active");
    assert_eq!(pool.allocation_state.as_str(), "resizing");
    assert_eq!(pool.target_dedicated, 3);
    assert_eq!(pool.metadata["sigrun-run"], "it-full");
    assert_eq!(pool.image_id.as_deref(), Some(version.to_string().as_str()));
    let mut steady = None;
    for _ in 0..30 {
        emu.advance(120.0).await;
        let pool = azure.get_pool(&account.url, pool_id).await.unwrap().expect("pool");
        let counts = azure.node_counts(&account.url, pool_id).await.unwrap();
        if pool.allocation_state.as_str() == "steady" && counts.get("idle") == 3 {
            steady = Some((pool, counts));
            break;
        }
    }
    let (pool, counts) = steady.expect("the pool settles with 3 idle nodes");
    assert_eq!(pool.current_dedicated, 3);
    assert!(pool.resize_errors.is_empty());
    assert_eq!(counts.total, 3);
    assert_eq!(counts.get("starttaskfailed"), 0);
    let listed = azure.list_pools(&account.url).await.unwrap();
    let listed_pool = listed.iter().find(|p| p.id == pool_id).expect("the pool is listed");
    assert_eq!(
        listed_pool, &pool,
        "a listed pool reads as the pool itself: the $select leaves out nothing the client reads"
    );
    // Every pool read and list asks Batch only for what the client reads.
    let pool_reads: Vec<Value> = emu
        .requests()
        .await
        .into_iter()
        .filter(|e| {
            e["method"] == "GET" && e["api"] == "batch" && e["path"].as_str().is_some_and(|p| p.contains("/pools"))
        })
        .filter(|e| !e["path"].as_str().unwrap_or("").ends_with("/nodes"))
        .collect();
    assert!(!pool_reads.is_empty());
    for read in &pool_reads {
        let query = read["query"].as_str().unwrap_or("");
        assert!(query.contains("$select=id") && query.contains("metadata"), "{read}");
    }

    azure.resize_pool(&account.url, pool_id, 5, 0).await.expect("resize");
    let pool = azure.get_pool(&account.url, pool_id).await.unwrap().unwrap();
    assert_eq!((pool.target_dedicated, pool.allocation_state.as_str()), (5, "resizing"));
    for _ in 0..30 {
        emu.advance(120.0).await;
        if azure.node_counts(&account.url, pool_id).await.unwrap().get("idle") == 5 {
            break;
        }
    }
    assert_eq!(azure.node_counts(&account.url, pool_id).await.unwrap().get("idle"), 5);

    azure.delete_pool(&account.url, pool_id).await.expect("delete pool");
    let deleting = azure.get_pool(&account.url, pool_id).await.unwrap();
    assert!(
        deleting.as_ref().is_none_or(|p| p.state.as_str() == "deleting"),
        "{deleting:?}"
    );
    for _ in 0..20 {
        emu.advance(600.0).await;
        if azure.get_pool(&account.url, pool_id).await.unwrap().is_none() {
            break;
        }
    }
    assert_eq!(azure.get_pool(&account.url, pool_id).await.unwrap(), None);
    azure
        .delete_pool(&account.url, pool_id)
        .await
        .expect("deleting a deleted pool is fine");

    // Snapshots are scratch: deleted once the image exists.
    azure.delete_snapshot(&os_snapshot).await.expect("delete snapshot");
    for _ in 0..20 {
        emu.advance(120.0).await;
        if azure.get_snapshot(&os_snapshot).await.unwrap().is_none() {
            break;
        }
    }
    assert_eq!(azure.get_snapshot(&os_snapshot).await.unwrap(), None);
    azure
        .delete_snapshot(&os_snapshot)
        .await
        .expect("deleting again is fine");
}

#[tokio::test]
async fn operation_status_runs_in_progress_then_succeeded_or_failed() {
    let emu = start_fast().await;
    let azure = client_for_app(&emu, PIPELINE_APP);
    let gallery = GalleryId::new(SUB_IMAGING, "rg-gallery", &["status_gallery"]).unwrap();
    let accepted = azure
        .put_gallery(&gallery, "westeurope", &tags("status"))
        .await
        .unwrap();
    assert_eq!(
        accepted.provisioning_state.as_ref().map(|s| s.as_str()),
        Some("Creating")
    );
    let url = accepted.status_url.clone().expect("Azure-AsyncOperation");
    assert!(url.contains("/capsOperations/"), "{url}");
    assert!(accepted.retry_after.is_some());
    match azure.operation_status(&url).await.unwrap() {
        OperationStatus::InProgress { retry_after } => assert!(retry_after.is_some()),
        other => panic!("expected InProgress, got {other:?}"),
    }
    emu.advance(120.0).await;
    assert_eq!(azure.operation_status(&url).await.unwrap(), OperationStatus::Succeeded);

    // A region that fails to replicate fails the version's operation, with Azure's code.
    emu.set_faults("replication-fail:region=eastus").await;
    let chain = build_image_chain(&emu, &azure, "failing").await;
    let version = chain.definition.version("1.0.0").unwrap();
    let accepted = azure
        .put_version(
            &version,
            &version_request(&chain, "failing", &[("westeurope", 1), ("eastus", 1)]),
        )
        .await
        .unwrap();
    let url = accepted.status_url.unwrap();
    let mut outcome = None;
    for _ in 0..40 {
        emu.advance(600.0).await;
        match azure.operation_status(&url).await.unwrap() {
            OperationStatus::InProgress { .. } => continue,
            other => {
                outcome = Some(other);
                break;
            }
        }
    }
    match outcome {
        Some(OperationStatus::Failed { code, message }) => {
            assert_eq!(code, "ReplicationJobsNotCompleted");
            assert!(message.contains("eastus"), "{message}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let info = azure.get_version(&version, true).await.unwrap().unwrap();
    let eastus = info.replication.iter().find(|r| r.region == "eastus").unwrap();
    assert_eq!(eastus.state.as_str(), "Failed");
    assert_eq!(info.provisioning_state.as_str(), "Failed");

    // A snapshot PUT answers with `Location` too; that form reads 202 until done, then the result.
    let token = emu.arm_token().await;
    let snap = SnapshotId::new(SUB_IMAGING, "rg-imaging", &["location-form"]).unwrap();
    let disk = DiskId::new(SUB_IMAGING, "rg-imaging", &["build-ubuntu-2204-data1"]).unwrap();
    let reply = emu
        .put(
            &format!("{snap}?api-version={DISK_API}"),
            &token,
            &json!({"location": "westeurope", "properties": {
                "creationData": {"createOption": "Copy", "sourceResourceId": disk.to_string()}}}),
        )
        .await;
    assert_eq!(reply.status, 202, "{:?}", reply.body);
    let location = reply.header("location").expect("Location").to_string();
    assert!(location.contains("monitor=true"), "{location}");
    assert!(matches!(
        azure.operation_status(&location).await.unwrap(),
        OperationStatus::InProgress { .. }
    ));
    let mut finished = false;
    for _ in 0..20 {
        emu.advance(600.0).await;
        if azure.operation_status(&location).await.unwrap() == OperationStatus::Succeeded {
            finished = true;
            break;
        }
    }
    assert!(finished, "the Location form never reported the end");
    let state = azure.get_snapshot(&snap).await.unwrap().expect("snapshot");
    assert_eq!(state.provisioning_state.as_str(), "Succeeded");
}

#[tokio::test]
async fn missing_resources_read_as_none_but_missing_scopes_do_not() {
    let emu = start_fast().await;
    let azure = client_for_app(&emu, PIPELINE_APP);
    let snap = SnapshotId::new(SUB_IMAGING, "rg-imaging", &["nothing"]).unwrap();
    assert_eq!(azure.get_snapshot(&snap).await.unwrap(), None);
    let image = ImageId::new(SUB_IMAGING, "rg-imaging", &["nothing"]).unwrap();
    assert_eq!(azure.get_image(&image).await.unwrap(), None);
    let gallery = GalleryId::new(SUB_IMAGING, "rg-gallery", &["nothing"]).unwrap();
    assert_eq!(azure.get_gallery(&gallery).await.unwrap(), None);
    let definition = GalleryImageId::new(SUB_IMAGING, "rg-gallery", &["nothing", "def"]).unwrap();
    assert_eq!(azure.get_definition(&definition).await.unwrap(), None);
    let version = definition.version("1.0.0").unwrap();
    assert_eq!(azure.get_version(&version, true).await.unwrap(), None);
    let account = emu.batch_url("sigrunweu");
    assert_eq!(azure.get_pool(&account, "no-such-pool").await.unwrap(), None);
    assert_eq!(azure.node_counts(&account, "no-such-pool").await.unwrap().total, 0);

    // A missing resource group or account is a configuration mistake, not an absent resource.
    let wrong_group = SnapshotId::new(SUB_IMAGING, "rg-nowhere", &["s"]).unwrap();
    let err = azure.get_snapshot(&wrong_group).await.unwrap_err();
    assert_eq!(err.code.as_deref(), Some("ResourceGroupNotFound"));
    let no_account = format!("{}/batch/nosuchaccount", emu.base());
    let err = azure.get_pool(&no_account, "p").await.unwrap_err();
    assert_eq!(err.code.as_deref(), Some("AccountNotFound"));
    // get_vm has no "absent" answer: a missing VM is an error.
    let err = azure
        .get_vm(&VmId::new(SUB_IMAGING, "rg-imaging", &["no-vm"]).unwrap())
        .await
        .unwrap_err();
    assert_eq!((err.status, err.code.as_deref()), (Some(404), Some("ResourceNotFound")));
    assert_eq!(err.class(), ErrorClass::Permanent);
}

/// The runtime fences a step that wrote to Azure by a claim, and lets one that only read commit
/// first: the client says which by what it sent (`azure::writes`), an answer of 404 included.
#[tokio::test]
async fn the_client_tells_a_step_that_only_read_from_one_that_sent_a_write() {
    let emu = start_fast().await;
    let azure = client_for_app(&emu, PIPELINE_APP);
    let snap = SnapshotId::new(SUB_IMAGING, "rg-imaging", &["nothing"]).unwrap();
    let account = emu.batch_url("sigrunweu");
    let (_, reads) = watched(async {
        assert_eq!(azure.get_snapshot(&snap).await.unwrap(), None);
        assert_eq!(azure.get_pool(&account, "no-such-pool").await.unwrap(), None);
    })
    .await;
    assert_eq!(reads, Writes::None);
    let (deleted, delete) = watched(azure.delete_snapshot(&snap)).await;
    assert!(deleted.is_ok(), "a delete of nothing is done: {deleted:?}");
    assert_eq!(delete, Writes::Sent);
    let (refused, metadata) = watched(azure.set_pool_metadata(&account, "no-such-pool", &Default::default())).await;
    assert!(refused.is_err(), "no such pool");
    assert_eq!(metadata, Writes::Sent, "sent, whatever the answer");
}

#[tokio::test]
async fn errors_carry_status_code_and_request_id() {
    let emu = start_fast().await;
    let azure = client_for_app(&emu, PIPELINE_APP);
    let gallery = GalleryId::new(SUB_IMAGING, "rg-gallery", &["errors_gallery"]).unwrap();
    let accepted = azure.put_gallery(&gallery, "westeurope", &tags("e")).await.unwrap();
    complete(&emu, &azure, &accepted, 60.0).await;
    let definition = GalleryImageId::new(SUB_IMAGING, "rg-gallery", &["errors_gallery", "bad"]).unwrap();
    let err = azure
        .put_definition(
            &definition,
            &DefinitionRequest {
                location: "westeurope".into(),
                os_type: "Solaris".into(),
                os_state: "Generalized".into(),
                hyper_v_generation: "V2".into(),
                publisher: "p".into(),
                offer: "o".into(),
                sku: "s".into(),
                tags: tags("e"),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.status, Some(400));
    assert_eq!(err.code.as_deref(), Some("InvalidParameter"));
    assert!(err.message.contains("Solaris"), "{}", err.message);
    assert_eq!(err.class(), ErrorClass::Permanent);
    let request_id = err.request_id.clone().expect("x-ms-request-id");
    let logged_ids: Vec<Value> = logged(&emu, "arm")
        .await
        .iter()
        .map(|r| r["request_id"].clone())
        .collect();
    assert!(
        logged_ids.contains(&json!(request_id)),
        "the request id is the one the server sent"
    );
    assert!(err.to_string().contains(&format!("(request id {request_id})")));

    // Batch's odata error shape, with its `values`.
    let account = emu.batch_url("sigrunweu");
    let image = a_gallery_version(&emu, "bad-timeout").await;
    let mut body = pool_request("bad-timeout", &image, 1);
    body.resize_timeout = Duration::from_secs(60);
    let err = azure.add_pool(&account, &body).await.unwrap_err();
    assert_eq!(
        (err.status, err.code.as_deref()),
        (Some(400), Some("InvalidPropertyValue"))
    );
    assert!(err.message.contains("PropertyName=resizeTimeout"), "{}", err.message);
    assert!(
        !err.message.contains("RequestId:"),
        "the id is kept apart: {}",
        err.message
    );
    assert!(err.request_id.is_some());

    // A pool id that could leave its path segment is refused before anything is sent.
    body.id = "../pools/x".into();
    let err = azure.add_pool(&account, &body).await.unwrap_err();
    assert_eq!(err.code.as_deref(), Some("InvalidPoolId"));
    let err = azure.get_pool(&account, "a/b").await.unwrap_err();
    assert_eq!(err.code.as_deref(), Some("InvalidPoolId"));
    let err = azure.provider_state("not-a-guid", "Microsoft.Batch").await.unwrap_err();
    assert_eq!(err.code.as_deref(), Some("InvalidSubscriptionId"));
    let err = azure
        .register_provider(SUB_SHARED, "Microsoft.Batch/x")
        .await
        .unwrap_err();
    assert_eq!(err.code.as_deref(), Some("InvalidNamespace"));
}

/// (status, retry_after_ms, elapsed_ms) of logged requests to `api`.
async fn timeline(emu: &TestEmulator, api: &str) -> Vec<(u64, Option<u64>, f64)> {
    logged(emu, api)
        .await
        .iter()
        .map(|r| {
            (
                r["status"].as_u64().unwrap(),
                r["retry_after_ms"].as_u64(),
                r["elapsed_ms"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn assert_honoured(timeline: &[(u64, Option<u64>, f64)]) {
    for pair in timeline.windows(2) {
        let (status, retry_after, at) = pair[0];
        if status == 429 {
            let wait = retry_after.expect("a 429 carries Retry-After") as f64;
            let gap = pair[1].2 - at;
            assert!(
                gap >= wait,
                "retried after {gap:.1} ms, Retry-After was {wait} ms: {timeline:?}"
            );
        }
    }
}

#[tokio::test]
async fn throttling_is_retried_no_sooner_than_retry_after() {
    let emu = start_fast().await;
    let azure = client_for_app(&emu, PIPELINE_APP);
    let vm = VmId::new(SUB_IMAGING, "rg-imaging", &["build-ubuntu-2204"]).unwrap();
    // Warm the token cache, so the log holds only the throttled exchange.
    azure.get_vm(&vm).await.unwrap();
    clear_log(&emu).await;

    emu.set_faults("429:p=1,retry_after=0.3,times=2").await;
    let started = Instant::now();
    let vm_info = azure.get_vm(&vm).await.expect("succeeds after two 429s");
    assert_eq!(vm_info.os_type, "Linux");
    assert!(started.elapsed() >= Duration::from_millis(600));
    let arm = timeline(&emu, "arm").await;
    let statuses: Vec<u64> = arm.iter().map(|t| t.0).collect();
    assert_eq!(&statuses[..3], &[429, 429, 200], "{arm:?}");
    assert_eq!(arm[0].1, Some(300), "the emulator asked for 300 ms (retry-after-ms)");
    assert_honoured(&arm);

    // The same on the Batch data plane.
    let account = emu.batch_url("sigrunweu");
    azure.list_pools(&account).await.unwrap();
    clear_log(&emu).await;
    emu.set_faults("429:p=1,retry_after=0.25,times=2,api=batch").await;
    azure.list_pools(&account).await.expect("succeeds after two 429s");
    let batch = timeline(&emu, "batch").await;
    let statuses: Vec<u64> = batch.iter().map(|t| t.0).collect();
    assert_eq!(statuses, vec![429, 429, 200], "{batch:?}");
    assert_honoured(&batch);

    // A Retry-After longer than the client's budget is not slept through: the throttled error comes
    // back at once, with the wait, for the runtime to reschedule.
    clear_log(&emu).await;
    emu.set_faults("429:p=1,retry_after=120").await;
    let started = Instant::now();
    let err = azure.get_vm(&vm).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(
        err.class(),
        ErrorClass::Throttled {
            retry_after: Some(Duration::from_secs(120))
        }
    );
    assert_eq!(err.code.as_deref(), Some("TooManyRequests"));
    assert_eq!(logged(&emu, "arm").await.len(), 1);

    // Until then, nothing of this process asks that resource again (another run's step, another
    // copy of a message): the call is answered with the time left, and Azure sees no request.
    emu.set_faults("").await;
    let err = azure.get_vm(&vm).await.unwrap_err();
    let left = err.retry_after.expect("the time left");
    assert!(
        left > Duration::from_secs(100) && left <= Duration::from_secs(120),
        "{left:?}"
    );
    assert_eq!(err.status, Some(429));
    assert_eq!(logged(&emu, "arm").await.len(), 1, "held back, not sent");
    let other = VmId::new(SUB_IMAGING, "rg-imaging", &["build-windows-2022"]).unwrap();
    let _ = azure.get_vm(&other).await;
    assert!(
        logged(&emu, "arm").await.len() >= 2,
        "other resources are asked as usual"
    );
    // The process is named in every request, the same in each.
    let agents: std::collections::BTreeSet<String> = logged(&emu, "arm")
        .await
        .iter()
        .map(|r| r["user_agent"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(agents.len(), 1, "{agents:?}");
    let agent = agents.first().unwrap();
    assert!(agent.starts_with("sigrun/") && agent.contains("(instance "), "{agent}");
}

/// Requests of one resource that a process makes at the same moment (two pools' verify reading
/// their version, two copies of a message) go one at a time: the first's 429 holds back the rest
/// before they leave, so Azure is not asked again inside the Retry-After it just gave.
#[tokio::test]
async fn concurrent_requests_of_a_throttled_resource_wait_for_its_answer_and_are_held_back() {
    let emu = start_fast().await;
    let azure = client_for_app(&emu, PIPELINE_APP);
    let vm = VmId::new(SUB_IMAGING, "rg-imaging", &["build-ubuntu-2204"]).unwrap();
    azure.get_vm(&vm).await.unwrap();
    clear_log(&emu).await;

    emu.set_faults("429:p=1,retry_after=120,times=1").await;
    let reads = (0..16).map(|_| azure.get_vm(&vm));
    let results = futures_util::future::join_all(reads).await;
    let throttled = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.status == Some(429) && e.retry_after.is_some()))
        .count();
    assert_eq!(throttled, 16, "each read is answered with the throttling: {results:?}");
    let sent: Vec<u64> = timeline(&emu, "arm").await.iter().map(|t| t.0).collect();
    assert_eq!(sent, vec![429], "one request went out; the rest waited for its 429");
}

/// A request whose resource is held by another that does not come back is not queued behind it
/// without end: past the wait limit it is handed back as paced, never sent.
#[tokio::test]
async fn a_request_behind_a_slow_one_of_its_resource_is_handed_back_after_the_wait_limit() {
    let emu = start_fast().await;
    let mut settings = settings_for(&emu, PIPELINE_APP);
    settings.pacing.hold_ms = 200;
    settings.retry.max_total_secs = 1;
    let azure = AzureClient::new(&settings).expect("client");
    let vm = VmId::new(SUB_IMAGING, "rg-imaging", &["build-ubuntu-2204"]).unwrap();
    azure.get_vm(&vm).await.unwrap();
    clear_log(&emu).await;

    emu.set_faults("slow:p=1,delay_ms=4000,times=1").await;
    let started = Instant::now();
    let slow = azure.get_vm(&vm);
    let behind = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let result = azure.get_vm(&vm).await;
        (result, started.elapsed())
    };
    let (slow, (behind, waited)) = tokio::join!(slow, behind);
    assert!(slow.is_ok(), "{slow:?}");
    let error = behind.expect_err("handed back");
    assert!(error.is_paced(), "{error:?}");
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_millis(3500),
        "handed back at the wait limit (1 s), not after the slow answer: {waited:?}"
    );
    // The slow read, then its VM's extensions (`get_vm` reads both): the one behind, never.
    let vm_reads = logged(&emu, "arm")
        .await
        .iter()
        .filter(|e| e["path"].as_str().is_some_and(|p| p.ends_with("/build-ubuntu-2204")))
        .count();
    assert_eq!(vm_reads, 1, "the one behind was never sent");
}

#[tokio::test]
async fn server_errors_and_dropped_connections_are_retried() {
    let emu = start_fast().await;
    let azure = client_for_app(&emu, PIPELINE_APP);
    let gallery = GalleryId::new(SUB_IMAGING, "rg-gallery", &["retry_gallery"]).unwrap();
    azure.get_gallery(&gallery).await.unwrap();
    clear_log(&emu).await;

    emu.set_faults("503:times=1;500:times=1").await;
    assert_eq!(azure.get_gallery(&gallery).await.unwrap(), None);
    let statuses: Vec<u64> = timeline(&emu, "arm").await.iter().map(|t| t.0).collect();
    assert_eq!(statuses, vec![503, 500, 404]);

    // The connection is cut after the PUT was done: the retried PUT finds the same resource and
    // answers as for a repeat, which is what makes it safe.
    clear_log(&emu).await;
    emu.set_faults("reset:times=1,method=put").await;
    let accepted = azure
        .put_gallery(&gallery, "westeurope", &tags("reset"))
        .await
        .expect("succeeds after a reset");
    assert!(accepted.status_url.is_some());
    let statuses: Vec<u64> = timeline(&emu, "arm").await.iter().map(|t| t.0).collect();
    assert_eq!(statuses, vec![0, 200], "a cut connection logs status 0");
    complete(&emu, &azure, &accepted, 60.0).await;

    // The same on Batch: the pool was added before the cut, the retry meets PoolExists.
    let account = emu.batch_url("sigrunweu");
    let image = a_gallery_version(&emu, "reset").await;
    let body = pool_request("reset-pool", &image, 1);
    clear_log(&emu).await;
    emu.set_faults("reset:times=1,api=batch,method=post").await;
    assert_eq!(azure.add_pool(&account, &body).await.unwrap(), PoolCreated::Exists);
    let statuses: Vec<u64> = timeline(&emu, "batch").await.iter().map(|t| t.0).collect();
    assert_eq!(statuses, vec![0, 409]);
    assert!(azure.get_pool(&account, "reset-pool").await.unwrap().is_some());

    // When every attempt fails, the last error comes back after the configured attempts.
    clear_log(&emu).await;
    emu.set_faults("503:p=1").await;
    let err = azure.get_gallery(&gallery).await.unwrap_err();
    assert_eq!(
        (err.status, err.code.as_deref()),
        (Some(503), Some("ServiceUnavailable"))
    );
    assert_eq!(err.class(), ErrorClass::Transient);
    assert_eq!(logged(&emu, "arm").await.len(), 4, "max_attempts is 4");
}

#[tokio::test]
async fn a_resize_whose_answer_was_lost_is_not_an_error() {
    // Real-time emulator: a resize keeps the pool resizing for a minute, long past the retry.
    let emu = start(EmulatorOptions::default()).await;
    let azure = client_for_app(&emu, PIPELINE_APP);
    let account = emu.batch_url("sigrunweu");
    let image = a_gallery_version(&emu, "lost-resize").await;
    let body = pool_request("lost-resize", &image, 1);
    assert_eq!(azure.add_pool(&account, &body).await.unwrap(), PoolCreated::Created);
    emu.advance(1800.0).await;
    let pool = azure.get_pool(&account, "lost-resize").await.unwrap().unwrap();
    assert_eq!(pool.allocation_state.as_str(), "steady");

    // The retry meets PoolNotSteady; the pool resizing to the wanted targets is the resize done.
    clear_log(&emu).await;
    emu.set_faults("reset:times=1,api=batch,method=post").await;
    azure
        .resize_pool(&account, "lost-resize", 2, 0)
        .await
        .expect("resize after a reset");
    let statuses: Vec<u64> = timeline(&emu, "batch").await.iter().map(|t| t.0).collect();
    assert_eq!(statuses, vec![0, 409, 200]);
    let pool = azure.get_pool(&account, "lost-resize").await.unwrap().unwrap();
    assert_eq!((pool.target_dedicated, pool.allocation_state.as_str()), (2, "resizing"));

    // A resize to other targets while the pool is resizing stays an error, for the runtime to retry.
    emu.set_faults("").await;
    let err = azure.resize_pool(&account, "lost-resize", 3, 0).await.unwrap_err();
    assert_eq!(err.code.as_deref(), Some("PoolNotSteady"));
    assert_eq!(err.class(), ErrorClass::Transient);
}

#[tokio::test]
async fn a_reader_gets_a_permanent_authorization_failure() {
    let emu = start_fast().await;
    let reader = client_for_app(&emu, READER_APP);
    let vm = reader
        .get_vm(&VmId::new(SUB_IMAGING, "rg-imaging", &["build-ubuntu-2204"]).unwrap())
        .await
        .expect("a reader may read");
    let err = reader
        .put_snapshot(
            &SnapshotId::new(SUB_IMAGING, "rg-imaging", &["reader-snap"]).unwrap(),
            &SnapshotRequest {
                location: vm.location,
                source: vm.os_disk.unwrap(),
                tags: tags("reader"),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        (err.status, err.code.as_deref()),
        (Some(403), Some("AuthorizationFailed"))
    );
    assert!(
        err.message.contains("Microsoft.Compute/snapshots/write"),
        "{}",
        err.message
    );
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert!(err.request_id.is_some());
    // Not retried: one attempt.
    let puts = logged(&emu, "arm")
        .await
        .into_iter()
        .filter(|r| r["method"] == "PUT")
        .count();
    assert_eq!(puts, 1);
}

#[tokio::test]
async fn tokens_go_only_to_the_configured_hosts() {
    let emu = start_fast().await;
    let azure = client_for_app(&emu, PIPELINE_APP);
    let base = emu.base().to_string();
    let port = base.rsplit(':').next().unwrap().to_string();
    let op = format!(
        "/subscriptions/{SUB_IMAGING}/providers/Microsoft.Compute/locations/westeurope/capsOperations/x?api-version={GALLERY_API}"
    );
    let refused = [
        format!("https://evil.example.com{op}"),
        format!("https://localhost:{port}{op}"),
        format!("http://127.0.0.1:{port}{op}"),
        format!("https://127.0.0.1:1{op}"),
        format!("{base}/_emulator/requests"),
        format!("{base}/{TENANT}/oauth2/v2.0/token"),
        format!("https://user:pw@{}{op}", base.trim_start_matches("https://")),
        "not a url".to_string(),
    ];
    for url in &refused {
        let err = azure.operation_status(url).await.unwrap_err();
        assert_eq!(err.code.as_deref(), Some("UntrustedUrl"), "{url}: {err}");
        assert_eq!(err.class(), ErrorClass::Permanent);
    }
    for account in ["https://evil.example.com", "http://acct.westeurope.batch.azure.com"] {
        let err = azure.list_pools(account).await.unwrap_err();
        assert_eq!(err.code.as_deref(), Some("UntrustedUrl"), "{account}");
    }
    // Nothing was sent anywhere: not even a token was asked for.
    assert!(emu.requests().await.is_empty(), "{:?}", emu.requests().await);
}

/// A credential that asks the plain-HTTP emulator's token endpoint directly (azure_identity
/// refuses a non-https authority, as Azure AD is never plain HTTP).
#[derive(Debug)]
struct PlainHttpCredential {
    base: String,
    client: reqwest::Client,
}

#[async_trait]
impl TokenCredential for PlainHttpCredential {
    async fn get_token(&self, scopes: &[&str], _: Option<TokenRequestOptions<'_>>) -> azure_core::Result<AccessToken> {
        let body: Value = self
            .client
            .post(format!("{}/{TENANT}/oauth2/v2.0/token", self.base))
            .form(&[
                ("client_id", PIPELINE_APP.0),
                ("client_secret", PIPELINE_APP.1),
                ("grant_type", "client_credentials"),
                ("scope", scopes[0]),
            ])
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| azure_core::Error::new(azure_core::error::ErrorKind::Io, e))?
            .json()
            .await
            .map_err(|e| azure_core::Error::new(azure_core::error::ErrorKind::DataConversion, e))?;
        Ok(AccessToken::new(
            body["access_token"].as_str().unwrap_or_default().to_string(),
            time::OffsetDateTime::now_utc() + time::Duration::minutes(50),
        ))
    }
}

#[tokio::test]
async fn the_plain_http_emulator_keeps_its_scheme() {
    let emu = start(EmulatorOptions {
        time_scale: 3600.0,
        plain_http: true,
        ..Default::default()
    })
    .await;
    assert!(emu.base().starts_with("http://"));
    let mut settings = settings_for(&emu, PIPELINE_APP);
    settings.cloud.authority_host = "https://login.microsoftonline.com".into();
    let credential = Arc::new(PlainHttpCredential {
        base: emu.base().to_string(),
        client: emu.client.clone(),
    });
    let azure = AzureClient::with_credential(&settings, credential).expect("client");
    let account = azure
        .get_batch_account(&BatchAccountId::new(SUB_COMPUTE, "rg-batch", &["sigruneus"]).unwrap())
        .await
        .expect("account");
    assert_eq!(account.location, "eastus");
    assert!(account.url.starts_with("http://"), "{}", account.url);
    assert_eq!(account.url, emu.batch_url("sigruneus"));
    assert!(!azure.supported_images(&account).await.unwrap().is_empty());
    assert!(azure.list_pools(&account.url).await.unwrap().is_empty());

    // Plain http is for a loopback emulator only.
    settings.cloud.resource_manager = "http://management.azure.com".into();
    let err = AzureClient::new(&settings).unwrap_err();
    assert_eq!(err.key, "cloud.resource_manager");
}

#[tokio::test]
async fn secrets_and_tokens_never_show() {
    let emu = start_fast().await;
    let settings = settings_for(&emu, PIPELINE_APP);
    let azure = AzureClient::new(&settings).unwrap();
    let vm = VmId::new(SUB_IMAGING, "rg-imaging", &["build-ubuntu-2204"]).unwrap();
    azure.get_vm(&vm).await.unwrap();
    let reader_err = client_for_app(&emu, READER_APP)
        .put_gallery(
            &GalleryId::new(SUB_IMAGING, "rg-gallery", &["secret_gallery"]).unwrap(),
            "westeurope",
            &tags("s"),
        )
        .await
        .unwrap_err();
    let wrong = (PIPELINE_APP.0, "not-the-secret-but-still-private");
    let credential_err = client_for_app(&emu, wrong).get_vm(&vm).await.unwrap_err();
    assert_eq!(credential_err.class(), ErrorClass::Permanent);
    assert_eq!(credential_err.code.as_deref(), Some("AADSTS7000215"));
    let network_err = {
        let mut unreachable = settings_for(&emu, PIPELINE_APP);
        unreachable.cloud.resource_manager = "https://127.0.0.1:1".into();
        unreachable.retry.max_attempts = 1;
        AzureClient::new(&unreachable).unwrap().get_vm(&vm).await.unwrap_err()
    };
    assert_eq!(network_err.class(), ErrorClass::Transient);
    assert!(
        network_err.message.contains("could not connect"),
        "{}",
        network_err.message
    );

    // Every token the emulator issues starts with the same JWT header.
    let issued = emu.arm_token().await;
    let token_header = &issued[..issued.find('.').unwrap()];
    let shown = [
        format!("{settings:?}"),
        format!("{azure:?}"),
        format!("{reader_err:?} {reader_err}"),
        format!("{credential_err:?} {credential_err}"),
        format!("{network_err:?} {network_err}"),
    ];
    for text in &shown {
        for secret in [PIPELINE_APP.1, READER_APP.1, wrong.1] {
            assert!(!text.contains(secret), "a client secret leaked: {text}");
        }
        assert!(!text.contains(token_header), "a token leaked: {text}");
    }
}

/// Reads that outnumber the subscription's budget, all at once, each of its own resource (reads
/// of one resource go one at a time anyway): 400 galleries that do not exist, whose 404s draw on
/// the budget as any read does (answered `Ok(None)`). Paced by the client, none meets a 429 and
/// all succeed; with pacing off, the same burst meets the emulator's 429s.
#[tokio::test]
async fn a_burst_beyond_the_budget_is_paced_instead_of_throttled() {
    for pacing in [true, false] {
        // 125 reads a real second: the burst outruns the refill.
        let emu = start(EmulatorOptions {
            time_scale: 5.0,
            ..Default::default()
        })
        .await;
        let mut settings = settings_for(&emu, PIPELINE_APP);
        settings.pacing.time_scale = 5.0;
        settings.pacing.enabled = pacing;
        let azure = Arc::new(AzureClient::new(&settings).expect("client"));
        let reads = (0..400).map(|i| {
            let azure = azure.clone();
            let gallery = GalleryId::new(SUB_IMAGING, "rg-gallery", &[&format!("burst_{i}")]).unwrap();
            async move { azure.get_gallery(&gallery).await }
        });
        let results = futures_util::future::join_all(reads).await;
        let answers: Vec<Value> = emu.requests().await.into_iter().filter(|e| e["api"] == "arm").collect();
        let throttled = answers.iter().filter(|e| e["status"] == 429).count();
        if pacing {
            assert_eq!(throttled, 0, "paced: no 429 among {} answers", answers.len());
            assert!(results.iter().all(Result::is_ok), "every read succeeds");
        } else {
            assert!(throttled > 20, "unpaced, the burst is throttled: {throttled} 429s");
        }
    }
}
