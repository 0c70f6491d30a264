//! The planner against the emulator through the real `AzureClient`: every preflight rule of the
//! Azure documentation, as spec variants written as TOML. Refusals are checked by the rule's key and
//! message; accepted plans by the values the rules decided (replicas per region, resize timeouts,
//! node agent SKUs, subscriptions to register, the nightly version) and the warnings for raised
//! values. Every plan is followed by a look at the emulator's request log: planning reads Azure and
//! writes nothing (only GETs, and POSTs for tokens).

use reqwest::Method;
use serde_json::json;
use sigrun::azure::{AzureClient, AzureSettings, CredentialSettings, Secret};
use sigrun::model::ids::{BatchAccountId, GalleryImageId, VmId};
use sigrun::model::plan::Plan;
use sigrun::model::spec::PipelineSpec;
use sigrun::planner::{self, PlanError, PlanInputs};
use time::OffsetDateTime;
use time::macros::date;

use crate::helpers::*;

const VERSION: &str = "1.0.0";

fn azure(emu: &TestEmulator) -> AzureClient {
    azure_as(emu, PIPELINE_APP)
}

fn azure_as(emu: &TestEmulator, app: (&str, &str)) -> AzureClient {
    let mut settings = AzureSettings::new(CredentialSettings::ClientSecret {
        tenant_id: TENANT.to_string(),
        client_id: app.0.to_string(),
        client_secret: Secret::new(app.1),
    });
    settings.cloud.authority_host = emu.base().to_string();
    settings.cloud.resource_manager = emu.base().to_string();
    settings.extra_ca_cert = emu.emulator.info().ca_cert.clone().map(Into::into);
    AzureClient::new(&settings).expect("client")
}

fn vm_id(name: &str) -> String {
    format!("/subscriptions/{SUB_IMAGING}/resourceGroups/rg-imaging/providers/Microsoft.Compute/virtualMachines/{name}")
}

fn account(name: &str) -> String {
    format!("/subscriptions/{SUB_COMPUTE}/resourceGroups/rg-batch/providers/Microsoft.Batch/batchAccounts/{name}")
}

fn gallery_id(sub: &str, rg: &str) -> String {
    format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/galleries/sigrun_gallery")
}

fn definition_id(sub: &str, rg: &str, name: &str) -> GalleryImageId {
    GalleryImageId::new(sub, rg, &["sigrun_gallery", name]).unwrap()
}

/// A pipeline spec as TOML, built from the parts the tests vary.
struct Spec {
    vm: String,
    image_region: String,
    gallery: String,
    definition: String,
    os_type: String,
    generation: String,
    /// `[version]` section body; empty for the default (nightly).
    version: String,
    nodes_per_replica: Option<u32>,
    /// Inline tables of `publish.regions`.
    regions: Vec<String>,
    /// `[[pools]]` blocks (use [`pool`]).
    pools: Vec<String>,
    /// Without `[source]` and `[image]` (a rollout of an existing version).
    rollout: bool,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            vm: "build-ubuntu-2204".into(),
            image_region: "westeurope".into(),
            gallery: gallery_id(SUB_IMAGING, "rg-gallery"),
            definition: "ubuntu-2204-batch".into(),
            os_type: "Linux".into(),
            generation: "V2".into(),
            version: String::new(),
            nodes_per_replica: None,
            regions: vec![r#"{ name = "westeurope" }"#.into()],
            pools: vec![pool("render", "sigrunweu", 10, "")],
            rollout: false,
        }
    }
}

impl Spec {
    fn toml(&self) -> String {
        let mut out = String::from("name = \"plan-it\"\n");
        if !self.rollout {
            out += &format!(
                "[source]\nvm = \"{}\"\n\n[image]\nresource_group = \"rg-imaging\"\nregion = \"{}\"\n\n",
                vm_id(&self.vm),
                self.image_region
            );
        }
        out += &format!(
            "[gallery]\nid = \"{}\"\n\n[definition]\nname = \"{}\"\nos_type = \"{}\"\npublisher = \"sigrun\"\noffer = \"it\"\nsku = \"nightly\"\nhyper_v_generation = \"{}\"\n\n",
            self.gallery, self.definition, self.os_type, self.generation
        );
        if !self.version.is_empty() {
            out += &format!("[version]\n{}\n\n", self.version);
        }
        out += "[publish]\nend_of_life = \"90d\"\n";
        if let Some(n) = self.nodes_per_replica {
            out += &format!("nodes_per_replica = {n}\n");
        }
        out += &format!("regions = [{}]\n\n", self.regions.join(", "));
        for p in &self.pools {
            out += p;
        }
        out
    }

    fn parse(&self) -> PipelineSpec {
        let text = self.toml();
        PipelineSpec::parse(&text, "plan-it.toml").unwrap_or_else(|e| panic!("{e}\n{text}"))
    }
}

/// A `[[pools]]` block; `extra` adds lines (`resize_timeout = "20m"`, ...).
fn pool(target: &str, account_name: &str, dedicated: u32, extra: &str) -> String {
    format!(
        "[[pools]]\ntarget = \"{target}\"\naccount = \"{}\"\nvm_size = \"Standard_D4s_v5\"\ndedicated_nodes = {dedicated}\n{extra}\n\n",
        account(account_name)
    )
}

fn region(name: &str) -> String {
    format!(r#"{{ name = "{name}" }}"#)
}

fn region_with(name: &str, replicas: u32) -> String {
    format!(r#"{{ name = "{name}", replicas = {replicas} }}"#)
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

/// Planning reads and never writes: every logged request is a GET to ARM or Batch, or a token POST.
async fn assert_read_only(emu: &TestEmulator) {
    let log = emu.requests().await;
    assert!(!log.is_empty(), "planning reads Azure");
    for entry in &log {
        let (api, method) = (entry["api"].as_str().unwrap(), entry["method"].as_str().unwrap());
        let ok = match api {
            "arm" | "batch" => method == "GET",
            "aad" | "identity" => method == "POST" || method == "GET",
            _ => false,
        };
        assert!(ok, "planning must not write: {method} {api} {}", entry["path"]);
    }
}

/// Plans `spec` with `inputs` (version defaults to 1.0.0), checking that nothing was written.
async fn plan_with(emu: &TestEmulator, spec: &Spec, mut inputs: PlanInputs) -> Result<Plan, PlanError> {
    if inputs.version.is_empty() {
        inputs.version = VERSION.to_string();
    }
    let parsed = spec.parse();
    clear_log(emu).await;
    let result = planner::plan(&parsed, &inputs, &azure(emu), OffsetDateTime::now_utc()).await;
    assert_read_only(emu).await;
    result
}

async fn plan_ok(emu: &TestEmulator, spec: &Spec) -> Plan {
    plan_with(emu, spec, PlanInputs::default())
        .await
        .unwrap_or_else(|e| panic!("plan: {e}\n{}", spec.toml()))
}

/// The refusal's (key, message).
async fn refused(emu: &TestEmulator, spec: &Spec) -> (String, String) {
    refused_with(emu, spec, PlanInputs::default()).await
}

async fn refused_with(emu: &TestEmulator, spec: &Spec, inputs: PlanInputs) -> (String, String) {
    match plan_with(emu, spec, inputs).await {
        Err(PlanError::Rule { key, message }) => (key, message),
        Err(other) => panic!("expected a rule refusal, got {other}"),
        Ok(plan) => panic!("expected a refusal, got a plan: {plan:#?}"),
    }
}

fn replicas_of(plan: &Plan, region: &str) -> (u32, Option<u32>, u32) {
    let r = plan
        .regions
        .iter()
        .find(|r| r.name == region)
        .unwrap_or_else(|| panic!("no region {region} in {:?}", plan.regions));
    (r.replicas, r.replicas_asked, r.nodes)
}

/// Creates the gallery and a definition with the given OS and state, directly over ARM.
async fn existing_definition(emu: &TestEmulator, name: &str, os_type: &str, os_state: &str) {
    let token = emu.arm_token().await;
    let reply = emu
        .put(
            &compute(SUB_IMAGING, "rg-gallery", "galleries/sigrun_gallery", GALLERY_API),
            &token,
            &json!({"location": "westeurope", "properties": {"description": "planner tests"}}),
        )
        .await;
    assert!(reply.status.is_success(), "gallery: {:?}", reply.body);
    emu.advance(600.0).await;
    let reply = emu
        .put(
            &compute(
                SUB_IMAGING,
                "rg-gallery",
                &format!("galleries/sigrun_gallery/images/{name}"),
                GALLERY_API,
            ),
            &token,
            &json!({"location": "westeurope", "properties": {"osType": os_type, "osState": os_state,
                "hyperVGeneration": "V2", "identifier": {"publisher": "other", "offer": name, "sku": "x"}}}),
        )
        .await;
    assert!(reply.status.is_success(), "definition: {:?}", reply.body);
    emu.advance(600.0).await;
}

// ---- the build VM ----

#[tokio::test]
async fn a_build_vm_with_an_extension_is_refused() {
    let emu = start_frozen().await;
    let spec = Spec {
        vm: "build-with-extension".into(),
        ..Default::default()
    };
    let (key, message) = refused(&emu, &spec).await;
    assert_eq!(key, "source.vm");
    assert_eq!(
        message,
        format!(
            "{} has VM extensions installed (CustomScript); they break Batch pool deployment — build from a VM without extensions",
            vm_id("build-with-extension")
        )
    );
}

#[tokio::test]
async fn a_build_vm_with_unmanaged_disks_is_refused() {
    let emu = start_frozen().await;
    let spec = Spec {
        vm: "build-unmanaged".into(),
        ..Default::default()
    };
    let (key, message) = refused(&emu, &spec).await;
    assert_eq!(key, "source.vm");
    assert_eq!(
        message,
        format!(
            "{} has an unmanaged (VHD) OS disk; Batch custom images need managed disks",
            vm_id("build-unmanaged")
        )
    );
}

#[tokio::test]
async fn a_base_image_batch_does_not_support_is_refused() {
    let emu = start_frozen().await;
    let spec = Spec {
        vm: "build-unsupported-base".into(),
        ..Default::default()
    };
    let (key, message) = refused(&emu, &spec).await;
    assert_eq!(key, "source.vm");
    assert_eq!(
        message,
        format!(
            "{} was built from someone/custom-distro/1, which Batch does not list among its supported images",
            vm_id("build-unsupported-base")
        )
    );
}

#[tokio::test]
async fn os_type_and_generation_must_match_the_build_vm() {
    let emu = start_frozen().await;
    let spec = Spec {
        vm: "build-win2022".into(),
        ..Default::default()
    };
    let (key, message) = refused(&emu, &spec).await;
    assert_eq!(key, "definition.os_type");
    assert_eq!(message, "the build VM runs Windows but the definition says Linux");

    let spec = Spec {
        generation: "V1".into(),
        ..Default::default()
    };
    let (key, message) = refused(&emu, &spec).await;
    assert_eq!(key, "definition.hyper_v_generation");
    assert_eq!(
        message,
        "the build VM is Hyper-V generation V2 but the definition says V1"
    );
}

#[tokio::test]
async fn the_image_is_made_in_the_build_vms_region() {
    let emu = start_frozen().await;
    let spec = Spec {
        image_region: "eastus".into(),
        regions: vec![region("westeurope"), region("eastus")],
        ..Default::default()
    };
    let (key, message) = refused(&emu, &spec).await;
    assert_eq!(key, "image.region");
    assert_eq!(
        message,
        "the build VM is in westeurope; the managed image must be made in the same region, not eastus"
    );
}

// ---- an existing image definition ----

#[tokio::test]
async fn an_existing_specialized_definition_is_refused() {
    let emu = start_frozen().await;
    existing_definition(&emu, "ubuntu-2204-batch", "Linux", "Specialized").await;
    let (key, message) = refused(&emu, &Spec::default()).await;
    assert_eq!(key, "definition");
    assert_eq!(
        message,
        format!(
            "{} exists and is Specialized; Batch pools need a Generalized image",
            definition_id(SUB_IMAGING, "rg-gallery", "ubuntu-2204-batch")
        )
    );
}

#[tokio::test]
async fn an_existing_definition_of_another_os_is_refused() {
    let emu = start_frozen().await;
    existing_definition(&emu, "ubuntu-2204-batch", "Windows", "Generalized").await;
    let (key, message) = refused(&emu, &Spec::default()).await;
    assert_eq!(key, "definition.os_type");
    assert_eq!(
        message,
        format!(
            "{} exists and has osType Windows, the spec says Linux",
            definition_id(SUB_IMAGING, "rg-gallery", "ubuntu-2204-batch")
        )
    );

    // A matching generalized definition is fine.
    existing_definition(&emu, "ubuntu-ok", "Linux", "Generalized").await;
    let spec = Spec {
        definition: "ubuntu-ok".into(),
        ..Default::default()
    };
    let plan = plan_ok(&emu, &spec).await;
    assert_eq!(plan.definition, definition_id(SUB_IMAGING, "rg-gallery", "ubuntu-ok"));
}

// ---- replicas ----

#[tokio::test]
async fn replicas_auto_are_one_per_600_nodes_per_region() {
    let emu = start_frozen().await;
    let spec = Spec {
        regions: vec![region("westeurope"), region("eastus"), region("southeastasia")],
        pools: vec![
            pool("render", "sigrunweu", 2000, ""),
            // Dedicated and low-priority nodes both count: 2500 + 500 = 3000.
            pool("sim", "sigruneus", 2500, "low_priority_nodes = 500"),
        ],
        ..Default::default()
    };
    let plan = plan_ok(&emu, &spec).await;
    assert_eq!(replicas_of(&plan, "westeurope"), (4, None, 2000));
    assert_eq!(replicas_of(&plan, "eastus"), (5, None, 3000));
    assert_eq!(
        replicas_of(&plan, "southeastasia"),
        (1, None, 0),
        "a region without pools still gets one replica"
    );
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);

    // The later guidance: one replica per 300 nodes.
    let spec = Spec {
        nodes_per_replica: Some(300),
        ..spec
    };
    let plan = plan_ok(&emu, &spec).await;
    assert_eq!(replicas_of(&plan, "eastus"), (10, None, 3000));
    assert_eq!(replicas_of(&plan, "westeurope"), (7, None, 2000));
}

#[tokio::test]
async fn replicas_given_below_the_minimum_are_raised_with_a_warning_and_above_kept() {
    let emu = start_frozen().await;
    let spec = Spec {
        regions: vec![region("westeurope"), region_with("eastus", 2)],
        pools: vec![pool("render", "sigrunweu", 10, ""), pool("sim", "sigruneus", 3000, "")],
        ..Default::default()
    };
    let plan = plan_ok(&emu, &spec).await;
    assert_eq!(replicas_of(&plan, "eastus"), (5, Some(2), 3000));
    assert_eq!(
        plan.warnings,
        vec![
            "publish.regions[1].replicas: 2 is below one replica per 600 nodes for the 3000 nodes planned in eastus; raised to 5"
                .to_string()
        ]
    );

    let spec = Spec {
        regions: vec![region("westeurope"), region_with("eastus", 8)],
        ..spec
    };
    let plan = plan_ok(&emu, &spec).await;
    assert_eq!(replicas_of(&plan, "eastus"), (8, Some(8), 3000));
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
}

// ---- regions ----

#[tokio::test]
async fn a_pool_in_a_region_without_a_replica_is_refused() {
    let emu = start_frozen().await;
    let spec = Spec {
        pools: vec![pool("render", "sigrunweu", 10, ""), pool("sim", "sigruneus", 10, "")],
        ..Default::default()
    };
    let (key, message) = refused(&emu, &spec).await;
    assert_eq!(key, "pools[1]");
    assert_eq!(
        message,
        format!(
            "pool target sim uses account {} in eastus, but no replica is planned there; add eastus to publish.regions",
            BatchAccountId::parse(&account("sigruneus")).unwrap()
        )
    );
}

#[tokio::test]
async fn the_images_region_must_be_a_target_region() {
    let emu = start_frozen().await;
    let spec = Spec {
        regions: vec![region("eastus")],
        pools: vec![pool("sim", "sigruneus", 10, "")],
        ..Default::default()
    };
    let (key, message) = refused(&emu, &spec).await;
    assert_eq!(key, "publish.regions");
    assert_eq!(
        message,
        "the image is made in westeurope; the version's target regions must include it"
    );
}

#[tokio::test]
async fn a_region_listed_twice_in_two_spellings_is_refused() {
    let emu = start_frozen().await;
    let spec = Spec {
        regions: vec![region("westeurope"), region("westus"), region("West US")],
        ..Default::default()
    };
    let (key, message) = refused(&emu, &spec).await;
    assert_eq!(key, "publish.regions[2]");
    assert_eq!(message, "region westus is listed twice");
}

// ---- resize timeouts ----

#[tokio::test]
async fn resize_timeout_is_15_minutes_per_1000_nodes() {
    let emu = start_frozen().await;
    let spec = Spec {
        regions: vec![region("westeurope"), region("eastus")],
        pools: vec![
            pool("render", "sigrunweu", 2000, ""),
            pool("small", "sigruneus", 10, "resize_timeout = \"auto\""),
        ],
        ..Default::default()
    };
    let plan = plan_ok(&emu, &spec).await;
    assert_eq!(plan.pools[0].resize_timeout_secs, 30 * 60);
    assert_eq!(plan.pools[1].resize_timeout_secs, 15 * 60);
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);

    // Given too low: raised, with a warning. Given above the minimum: kept.
    let spec = Spec {
        pools: vec![
            pool("render", "sigrunweu", 2000, "resize_timeout = \"20m\""),
            pool("small", "sigruneus", 10, "resize_timeout = \"45m\""),
        ],
        ..spec
    };
    let plan = plan_ok(&emu, &spec).await;
    assert_eq!(plan.pools[0].resize_timeout_secs, 30 * 60);
    assert_eq!(plan.pools[1].resize_timeout_secs, 45 * 60);
    assert_eq!(
        plan.warnings,
        vec![
            "pools[0].resize_timeout: resize_timeout 20m is below 15 minutes per 1000 nodes for 2000 nodes; raised to 30m"
                .to_string()
        ]
    );
}

// ---- node agent SKUs ----

#[tokio::test]
async fn node_agent_sku_auto_comes_from_batchs_list_for_the_base_image() {
    let emu = start_frozen().await;
    let plan = plan_ok(&emu, &Spec::default()).await;
    assert_eq!(plan.pools[0].node_agent_sku_id, "batch.node.ubuntu 22.04");
    assert_eq!(
        plan.build.as_ref().unwrap().base_image,
        Some((
            "canonical".to_string(),
            "0001-com-ubuntu-server-jammy".to_string(),
            "22_04-lts-gen2".to_string()
        ))
    );

    let windows = Spec {
        vm: "build-win2022".into(),
        definition: "winserver-2022-batch".into(),
        os_type: "Windows".into(),
        ..Default::default()
    };
    let plan = plan_ok(&emu, &windows).await;
    assert_eq!(plan.pools[0].node_agent_sku_id, "batch.node.windows amd64");
}

#[tokio::test]
async fn an_explicit_sku_must_exist_and_run_the_images_os() {
    let emu = start_frozen().await;
    let spec = Spec {
        pools: vec![pool(
            "render",
            "sigrunweu",
            10,
            "node_agent_sku_id = \"batch.node.windows amd64\"",
        )],
        ..Default::default()
    };
    let (key, message) = refused(&emu, &spec).await;
    assert_eq!(key, "pools[0].node_agent_sku_id");
    assert_eq!(
        message,
        "`batch.node.windows amd64` is a windows SKU but the image is Linux"
    );

    let spec = Spec {
        pools: vec![pool(
            "render",
            "sigrunweu",
            10,
            "node_agent_sku_id = \"batch.node.plan9 4\"",
        )],
        ..Default::default()
    };
    let (key, message) = refused(&emu, &spec).await;
    assert_eq!(key, "pools[0].node_agent_sku_id");
    assert_eq!(message, "Batch does not support node agent SKU `batch.node.plan9 4`");

    let spec = Spec {
        pools: vec![pool(
            "render",
            "sigrunweu",
            10,
            "node_agent_sku_id = \"batch.node.ubuntu 24.04\"",
        )],
        ..Default::default()
    };
    let plan = plan_ok(&emu, &spec).await;
    assert_eq!(plan.pools[0].node_agent_sku_id, "batch.node.ubuntu 24.04");
}

// ---- subscriptions ----

#[tokio::test]
async fn a_gallery_in_another_subscription_needs_microsoft_batch_registered_there() {
    let emu = start_frozen().await;
    let spec = Spec {
        gallery: gallery_id(SUB_SHARED, "rg-shared"),
        ..Default::default()
    };
    let plan = plan_ok(&emu, &spec).await;
    assert_eq!(plan.register_batch_in, vec![SUB_SHARED.to_string()]);
    assert_eq!(
        plan.warnings,
        vec![format!(
            "Microsoft.Batch is not registered in the gallery's subscription {SUB_SHARED}; it will be registered before publishing"
        )]
    );
    assert_eq!(
        plan.definition,
        definition_id(SUB_SHARED, "rg-shared", "ubuntu-2204-batch")
    );

    // The imaging subscription is another subscription too, but Microsoft.Batch is registered there;
    // one look answers for every pool.
    let spec = Spec {
        regions: vec![region("westeurope"), region("eastus")],
        pools: vec![pool("render", "sigrunweu", 10, ""), pool("sim", "sigruneus", 10, "")],
        ..Default::default()
    };
    let plan = plan_ok(&emu, &spec).await;
    assert!(plan.register_batch_in.is_empty());
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    let looks = emu
        .requests()
        .await
        .iter()
        .filter(|e| e["path"].as_str().unwrap().ends_with("/providers/Microsoft.Batch"))
        .count();
    assert_eq!(looks, 1, "Microsoft.Batch's registration is read once");
}

// ---- rollout of an existing version ----

#[tokio::test]
async fn a_rollout_needs_a_replica_in_every_pools_region() {
    let emu = start_frozen().await;
    let token = emu.arm_token().await;
    let version_id = publish_version(
        &emu,
        &token,
        "ubuntu-2204-batch",
        "Generalized",
        "2026.1101.0",
        &[("westeurope", 1)],
    )
    .await;
    emu.advance(4.0 * 3600.0).await;
    let rollout = |pools: Vec<String>| Spec {
        rollout: true,
        version: "scheme = \"existing\"\nvalue = \"2026.1101.0\"".into(),
        regions: Vec::new(),
        pools,
        ..Default::default()
    };
    let inputs = || PlanInputs {
        version: "2026.1101.0".into(),
        ..Default::default()
    };
    let sku = "node_agent_sku_id = \"batch.node.ubuntu 22.04\"";

    let spec = rollout(vec![
        pool("render", "sigrunweu", 10, sku),
        pool("sim", "sigruneus", 10, sku),
    ]);
    let (key, message) = refused_with(&emu, &spec, inputs()).await;
    assert_eq!(key, "pools");
    assert_eq!(
        message,
        format!("pool target sim is in eastus but {version_id} has no replica there")
    );

    // Covered: the plan builds nothing and takes the version's regions; too few replicas warn.
    let plan = plan_with(&emu, &rollout(vec![pool("render", "sigrunweu", 2000, sku)]), inputs())
        .await
        .expect("rollout plan");
    assert!(plan.build.is_none());
    assert_eq!(plan.version_id.to_string(), version_id);
    assert_eq!(replicas_of(&plan, "westeurope"), (1, Some(1), 2000));
    assert!(
        !plan.publish_excluded,
        "a rollout publishes nothing, so nothing is gated"
    );
    assert_eq!(
        plan.warnings,
        vec![format!(
            "{version_id} has 1 replica(s) in westeurope, below the 4 that 2000 nodes need; pools there may allocate slowly"
        )]
    );

    // A version that does not exist is refused.
    let missing = PlanInputs {
        version: "2026.1101.7".into(),
        existing_version: true,
        ..Default::default()
    };
    let (key, message) = refused_with(&emu, &rollout(vec![pool("render", "sigrunweu", 10, sku)]), missing).await;
    assert_eq!(key, "version");
    assert!(
        message.ends_with("2026.1101.7 does not exist; nothing to roll out"),
        "{message}"
    );
}

// ---- nightly versions ----

#[tokio::test]
async fn nightly_versions_count_up_per_day_from_the_existing_ones() {
    let emu = start_frozen().await;
    let token = emu.arm_token().await;
    let spec = Spec::default();
    let parsed = spec.parse();
    let client = azure(&emu);
    let today = date!(2026 - 11 - 26);

    // No definition yet: the first of the day.
    clear_log(&emu).await;
    let version = planner::resolve_version(&parsed, None, &client, today).await.unwrap();
    assert_read_only(&emu).await;
    assert_eq!(version, "2026.1126.0");

    for v in ["2026.1125.4", "2026.1126.0", "2026.1126.1"] {
        publish_version(
            &emu,
            &token,
            "ubuntu-2204-batch",
            "Generalized",
            v,
            &[("westeurope", 1)],
        )
        .await;
    }
    clear_log(&emu).await;
    let version = planner::resolve_version(&parsed, None, &client, today).await.unwrap();
    assert_read_only(&emu).await;
    assert_eq!(version, "2026.1126.2");
    let next_day = planner::resolve_version(&parsed, None, &client, date!(2026 - 11 - 27))
        .await
        .unwrap();
    assert_eq!(next_day, "2026.1127.0");

    // The plan names everything after it.
    let plan = plan_with(
        &emu,
        &spec,
        PlanInputs {
            version: version.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("plan");
    assert_eq!(plan.version, "2026.1126.2");
    assert_eq!(plan.version_id.name(), "2026.1126.2");
    assert_eq!(plan.pools[0].pool_id, "plan-it-render-2026-1126-2");
    assert_eq!(plan.build.as_ref().unwrap().image.name(), "plan-it-2026-1126-2");

    // A version asked for on the command line must be a valid version name.
    let err = planner::resolve_version(&parsed, Some("2026.11"), &client, today)
        .await
        .unwrap_err();
    assert!(
        matches!(err, PlanError::Rule { ref key, .. } if key == "--version"),
        "{err}"
    );
}

// ---- the shipped nightly pipeline ----

#[tokio::test]
async fn the_shipped_nightly_pipeline_plans_with_the_documented_numbers() {
    let emu = start_frozen().await;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nightly-ubuntu.toml");
    let spec = PipelineSpec::load(&path).unwrap();
    let client = azure(&emu);
    let inputs = PlanInputs {
        version: "2026.1126.0".into(),
        ..Default::default()
    };
    clear_log(&emu).await;
    let now = OffsetDateTime::now_utc();
    let plan = planner::plan(&spec, &inputs, &client, now).await.expect("plan");
    assert_read_only(&emu).await;

    let build = plan.build.as_ref().expect("a build");
    assert_eq!(build.vm, Some(VmId::parse(&vm_id("build-ubuntu-2204")).unwrap()));
    let luns: Vec<Option<u32>> = build.snapshots.iter().map(|s| s.lun).collect();
    assert_eq!(luns, vec![None, Some(0), Some(1)], "the OS disk and both data disks");
    assert_eq!(build.snapshots[0].id.name(), "nightly-ubuntu-2026-1126-0-os");
    assert_eq!(build.region, "westeurope");
    assert_eq!(plan.gallery_region, "westeurope");
    assert_eq!(replicas_of(&plan, "westeurope"), (4, None, 2000));
    assert_eq!(replicas_of(&plan, "eastus"), (1, None, 200));
    assert_eq!(replicas_of(&plan, "southeastasia"), (1, Some(1), 0));
    let render = &plan.pools[0];
    assert_eq!(
        (render.region.as_str(), render.pool_id.as_str()),
        ("westeurope", "nightly-ubuntu-render-2026-1126-0")
    );
    assert_eq!(render.node_agent_sku_id, "batch.node.ubuntu 22.04");
    assert_eq!(render.resize_timeout_secs, 1800);
    assert!(
        render.start_task.as_ref().is_some_and(|task| task.elevated),
        "{render:?}"
    );
    assert_eq!(render.metadata["sigrun-version"], "2026.1126.0");
    let sim = &plan.pools[1];
    assert_eq!((sim.region.as_str(), sim.resize_timeout_secs), ("eastus", 1200));
    assert!(plan.publish_excluded && !plan.final_excluded, "gated promotion");
    assert_eq!(plan.end_of_life, Some(now + time::Duration::days(90)));
    assert!(plan.register_batch_in.is_empty());
    assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
}

/// Plans the spec text as is (after edits a [`Spec`] cannot express); the refusal's (key, message).
async fn refused_text(emu: &TestEmulator, text: &str) -> (String, String) {
    let parsed = PipelineSpec::parse(text, "plan-it.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    clear_log(emu).await;
    let inputs = PlanInputs {
        version: VERSION.to_string(),
        ..PlanInputs::default()
    };
    let result = planner::plan(&parsed, &inputs, &azure(emu), OffsetDateTime::now_utc()).await;
    assert_read_only(emu).await;
    match result {
        Err(PlanError::Rule { key, message }) => (key, message),
        Err(other) => panic!("expected a rule refusal, got {other}"),
        Ok(_) => panic!("expected a refusal of\n{text}"),
    }
}

#[tokio::test]
async fn regions_and_vm_sizes_azure_does_not_have_are_refused_before_anything_is_made() {
    let emu = start_frozen().await;
    let spec = Spec {
        regions: vec![region("West Europe"), region("mars")],
        ..Default::default()
    };
    let (key, message) = refused(&emu, &spec).await;
    assert_eq!(key, "publish.regions[1].name");
    assert!(message.contains("`mars` is not a region of subscription"), "{message}");

    let text = Spec::default()
        .toml()
        .replace("[gallery]\n", "[gallery]\nregion = \"atlantis\"\n");
    let (key, message) = refused_text(&emu, &text).await;
    assert_eq!(key, "gallery.region");
    assert!(message.contains("`atlantis`"), "{message}");

    let text = Spec::default().toml().replace("Standard_D4s_v5", "Standard_Floppy_v1");
    let (key, message) = refused_text(&emu, &text).await;
    assert_eq!(key, "pools[0].vm_size");
    assert!(
        message.contains("`Standard_Floppy_v1` is not a VM size Batch offers in westeurope"),
        "{message}"
    );

    // Sizes compare without case, as Batch compares them; both forms of a region name are fine.
    let text = Spec::default().toml().replace("Standard_D4s_v5", "standard_d4s_v5");
    let parsed = PipelineSpec::parse(&text, "plan-it.toml").unwrap();
    let inputs = PlanInputs {
        version: VERSION.to_string(),
        ..PlanInputs::default()
    };
    planner::plan(&parsed, &inputs, &azure(&emu), OffsetDateTime::now_utc())
        .await
        .expect("a size in another case plans");
}

#[tokio::test]
async fn a_principal_that_may_not_list_regions_gets_a_warning_not_a_refusal() {
    let emu = start_frozen().await;
    let token = emu.arm_token().await;
    publish_version(
        &emu,
        &token,
        "ubuntu-2204-batch",
        "Generalized",
        "2026.1101.0",
        &[("westeurope", 1)],
    )
    .await;
    emu.advance(4.0 * 3600.0).await;
    // The rollout app reads only its gallery's resource group: listing the gallery subscription's
    // regions is forbidden to it.
    let text = Spec {
        rollout: true,
        version: "scheme = \"existing\"\nvalue = \"2026.1101.0\"".into(),
        regions: Vec::new(),
        pools: vec![pool(
            "render",
            "sigrunweu",
            10,
            "node_agent_sku_id = \"batch.node.ubuntu 22.04\"",
        )],
        ..Default::default()
    }
    .toml()
    .replace("[gallery]\n", "[gallery]\nregion = \"westeurope\"\n");
    let parsed = PipelineSpec::parse(&text, "plan-it.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let inputs = PlanInputs {
        version: "2026.1101.0".to_string(),
        ..PlanInputs::default()
    };
    let plan = planner::plan(
        &parsed,
        &inputs,
        &azure_as(&emu, ROLLOUT_APP),
        OffsetDateTime::now_utc(),
    )
    .await
    .unwrap_or_else(|e| panic!("plan: {e}"));
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.starts_with("region names not checked") && w.contains("HTTP 403")),
        "{:?}",
        plan.warnings
    );
    assert!(
        plan.warnings
            .iter()
            .any(|w| w.starts_with("Microsoft.Batch's registration in the gallery's subscription")),
        "{:?}",
        plan.warnings
    );
    assert!(
        plan.register_batch_in.is_empty(),
        "nothing it could not see is registered"
    );
}
