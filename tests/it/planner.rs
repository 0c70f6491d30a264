//! The planner against the emulator through the real `AzureClient`: every preflight rule of the
//! Azure documentation, as spec variants written as TOML. Rules that share a shape are tables of
//! cases — a name, the spec (and inputs, and who plans), and the refusal (the rule's key and
//! message) or the values an accepted plan carries (replicas per region, resize timeouts, node
//! agent SKUs, subscriptions to register) and its warnings for raised values — planned one after
//! the other on one emulator per table; a failing case is reported by its name. Every plan is
//! followed by a look at the emulator's request log: planning reads Azure and writes nothing (only
//! GETs, and POSTs for tokens).

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use reqwest::Method;
use serde_json::{Value, json};
use sigrun::azure::{AzureClient, AzureSettings, CredentialSettings, Secret};
use sigrun::model::ids::{BatchAccountId, GalleryImageId, VmId};
use sigrun::model::plan::{Plan, Presence, Seen};
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
fn assert_read_only(log: &[Value]) {
    assert!(!log.is_empty(), "planning reads Azure");
    for entry in log {
        let (api, method) = (entry["api"].as_str().unwrap(), entry["method"].as_str().unwrap());
        let ok = match api {
            "arm" | "batch" => method == "GET",
            "aad" | "identity" => method == "POST" || method == "GET",
            _ => false,
        };
        assert!(ok, "planning must not write: {method} {api} {}", entry["path"]);
    }
}

/// Planning reads nothing twice (two checks that need one list share one read): every ARM and
/// Batch request of the log is to a path and query of its own.
fn assert_reads_each_once(log: &[Value]) {
    let mut seen = std::collections::BTreeSet::new();
    for entry in log
        .iter()
        .filter(|e| matches!(e["api"].as_str(), Some("arm" | "batch")))
    {
        let read = format!("{} {}", entry["path"], entry["query"]);
        assert!(seen.insert(read.clone()), "planning read {read} twice");
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
    assert_read_only(&emu.requests().await);
    result
}

/// One planning case of a table: the spec, edited as text where a [`Spec`] cannot say it, the
/// inputs (the version defaults to 1.0.0), who plans, and what must come of it.
struct Case {
    name: &'static str,
    spec: Spec,
    /// Replacements in the spec's TOML: (what, by what); each must apply.
    edits: Vec<(&'static str, &'static str)>,
    inputs: PlanInputs,
    app: (&'static str, &'static str),
    expect: Expect,
}

enum Expect {
    /// Refused by the rule at the key, with a message.
    Refused(&'static str, Message),
    Planned(PlanCheck),
}

/// What an accepted plan must hold; it gets the plan and the requests planning made.
type PlanCheck = Box<dyn Fn(&Plan, &[Value])>;

/// A refusal's message: all of it, or how it ends, or a part of it (where it names what Azure
/// decides, such as a subscription's regions).
enum Message {
    Is(String),
    EndsWith(&'static str),
    Has(&'static str),
}

impl Case {
    fn refused(name: &'static str, spec: Spec, key: &'static str, message: Message) -> Case {
        Case::new(name, spec, Expect::Refused(key, message))
    }

    fn planned(name: &'static str, spec: Spec, check: impl Fn(&Plan, &[Value]) + 'static) -> Case {
        Case::new(name, spec, Expect::Planned(Box::new(check)))
    }

    fn new(name: &'static str, spec: Spec, expect: Expect) -> Case {
        Case {
            name,
            spec,
            edits: Vec::new(),
            inputs: PlanInputs::default(),
            app: PIPELINE_APP,
            expect,
        }
    }

    fn edit(mut self, what: &'static str, by: &'static str) -> Case {
        self.edits.push((what, by));
        self
    }

    fn inputs(mut self, inputs: PlanInputs) -> Case {
        self.inputs = inputs;
        self
    }

    fn planned_by(mut self, app: (&'static str, &'static str)) -> Case {
        self.app = app;
        self
    }

    /// Plans the case and checks what came of it; panics (with the spec) when it is not that.
    async fn check(self, emu: &TestEmulator) {
        let mut text = self.spec.toml();
        for (what, by) in &self.edits {
            assert!(text.contains(what), "the edit of `{what}` applies to\n{text}");
            text = text.replace(what, by);
        }
        let parsed = PipelineSpec::parse(&text, "plan-it.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        let mut inputs = self.inputs;
        if inputs.version.is_empty() {
            inputs.version = VERSION.to_string();
        }
        clear_log(emu).await;
        let result = planner::plan(&parsed, &inputs, &azure_as(emu, self.app), OffsetDateTime::now_utc()).await;
        let log = emu.requests().await;
        assert_read_only(&log);
        match (result, self.expect) {
            (Err(PlanError::Rule { key, message }), Expect::Refused(rule, expected)) => {
                assert_eq!(key, rule, "refused by another rule: {message}");
                match expected {
                    Message::Is(expected) => assert_eq!(message, expected),
                    Message::EndsWith(end) => assert!(message.ends_with(end), "{message}"),
                    Message::Has(part) => assert!(message.contains(part), "{message}"),
                }
            }
            (Ok(plan), Expect::Planned(check)) => check(&plan, &log),
            (Ok(plan), Expect::Refused(..)) => panic!("expected a refusal, got a plan: {plan:#?}"),
            (Err(PlanError::Rule { key, message }), Expect::Planned(_)) => {
                panic!("plan: refused by {key}: {message}\n{text}")
            }
            (Err(other), _) => panic!("expected a rule refusal or a plan, got {other}\n{text}"),
        }
    }
}

/// Checks every case on `emu`, one after the other; then fails naming each case that failed.
async fn check_cases(emu: &TestEmulator, cases: Vec<Case>) {
    let total = cases.len();
    let mut failed = Vec::new();
    for case in cases {
        let name = case.name;
        if let Err(panic) = AssertUnwindSafe(case.check(emu)).catch_unwind().await {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            failed.push(format!("case `{name}`: {why}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {total} cases failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
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

// ---- refusals: one rule each, on the default world ----

#[tokio::test]
async fn a_spec_that_breaks_a_rule_is_refused_by_that_rule() {
    let emu = start_frozen().await;
    let sku = |id: &str| format!("node_agent_sku_id = \"{id}\"");
    let cases = vec![
        // The build VM.
        Case::refused(
            "a build VM with an extension",
            Spec {
                vm: "build-with-extension".into(),
                ..Default::default()
            },
            "source.vm",
            Message::Is(format!(
                "{} has VM extensions installed (CustomScript); they break Batch pool deployment — build from a VM without extensions",
                vm_id("build-with-extension")
            )),
        ),
        Case::refused(
            "a build VM with unmanaged disks",
            Spec {
                vm: "build-unmanaged".into(),
                ..Default::default()
            },
            "source.vm",
            Message::Is(format!(
                "{} has an unmanaged (VHD) OS disk; Batch custom images need managed disks",
                vm_id("build-unmanaged")
            )),
        ),
        Case::refused(
            "a base image Batch does not support",
            Spec {
                vm: "build-unsupported-base".into(),
                ..Default::default()
            },
            "source.vm",
            Message::Is(format!(
                "{} was built from someone/custom-distro/1, which Batch does not list among its supported images",
                vm_id("build-unsupported-base")
            )),
        ),
        Case::refused(
            "a definition of another OS than the build VM's",
            Spec {
                vm: "build-win2022".into(),
                ..Default::default()
            },
            "definition.os_type",
            Message::Is("the build VM runs Windows but the definition says Linux".into()),
        ),
        Case::refused(
            "a definition of another Hyper-V generation than the build VM's",
            Spec {
                generation: "V1".into(),
                ..Default::default()
            },
            "definition.hyper_v_generation",
            Message::Is("the build VM is Hyper-V generation V2 but the definition says V1".into()),
        ),
        Case::refused(
            "an image made outside the build VM's region",
            Spec {
                image_region: "eastus".into(),
                regions: vec![region("westeurope"), region("eastus")],
                ..Default::default()
            },
            "image.region",
            Message::Is(
                "the build VM is in westeurope; the managed image must be made in the same region, not eastus".into(),
            ),
        ),
        // Regions.
        Case::refused(
            "a pool in a region without a replica",
            Spec {
                pools: vec![pool("render", "sigrunweu", 10, ""), pool("sim", "sigruneus", 10, "")],
                ..Default::default()
            },
            "pools[1]",
            Message::Is(format!(
                "pool target sim uses account {} in eastus, but no replica is planned there; add eastus to publish.regions",
                BatchAccountId::parse(&account("sigruneus")).unwrap()
            )),
        ),
        Case::refused(
            "target regions without the image's region",
            Spec {
                regions: vec![region("eastus")],
                pools: vec![pool("sim", "sigruneus", 10, "")],
                ..Default::default()
            },
            "publish.regions",
            Message::Is("the image is made in westeurope; the version's target regions must include it".into()),
        ),
        Case::refused(
            "a region listed twice in two spellings",
            Spec {
                regions: vec![region("westeurope"), region("westus"), region("West US")],
                ..Default::default()
            },
            "publish.regions[2]",
            Message::Is("region westus is listed twice".into()),
        ),
        // Node agent SKUs.
        Case::refused(
            "an explicit SKU of another OS than the image's",
            Spec {
                pools: vec![pool("render", "sigrunweu", 10, &sku("batch.node.windows amd64"))],
                ..Default::default()
            },
            "pools[0].node_agent_sku_id",
            Message::Is("`batch.node.windows amd64` is a windows SKU but the image is Linux".into()),
        ),
        Case::refused(
            "an explicit SKU Batch does not support",
            Spec {
                pools: vec![pool("render", "sigrunweu", 10, &sku("batch.node.plan9 4"))],
                ..Default::default()
            },
            "pools[0].node_agent_sku_id",
            Message::Is("Batch does not support node agent SKU `batch.node.plan9 4`".into()),
        ),
        // What only Azure knows, refused before anything is made.
        Case::refused(
            "a target region the subscription does not have",
            Spec {
                regions: vec![region("West Europe"), region("mars")],
                ..Default::default()
            },
            "publish.regions[1].name",
            Message::Has("`mars` is not a region of subscription"),
        ),
        Case::refused(
            "a gallery region Azure does not have",
            Spec::default(),
            "gallery.region",
            Message::Has("`atlantis`"),
        )
        .edit("[gallery]\n", "[gallery]\nregion = \"atlantis\"\n"),
        Case::refused(
            "a VM size Batch does not offer in the pool's region",
            Spec::default(),
            "pools[0].vm_size",
            Message::Has("`Standard_Floppy_v1` is not a VM size Batch offers in westeurope"),
        )
        .edit("Standard_D4s_v5", "Standard_Floppy_v1"),
        // The Batch accounts' quotas (sigrunsea: 48 dedicated cores, 5 pools).
        Case::refused(
            "a pool over the account's dedicated core quota",
            Spec {
                regions: vec![region("westeurope"), region("southeastasia")],
                pools: vec![pool("render", "sigrunweu", 10, ""), pool("asia", "sigrunsea", 20, "")],
                ..Default::default()
            },
            "pools[1].account",
            Message::Is(
                "Batch account sigrunsea cannot take this plan: it needs 80 dedicated cores, dedicatedCoreQuota is 48 with 0 in use (headroom 48)"
                    .into(),
            ),
        ),
        Case::refused(
            "more pools than the account's pool quota",
            Spec {
                regions: vec![region("southeastasia")],
                pools: (1..=6).map(|n| pool(&format!("p{n}"), "sigrunsea", 1, "")).collect(),
                ..Default::default()
            },
            "pools[0].account",
            Message::Is(
                "Batch account sigrunsea cannot take this plan: it needs 6 pools, poolQuota is 5 with 0 in use (headroom 5)"
                    .into(),
            ),
        ),
    ];
    check_cases(&emu, cases).await;
}

// ---- accepted plans: the values the rules decided, on the default world ----

#[tokio::test]
async fn an_accepted_plan_carries_the_values_the_rules_decided() {
    let emu = start_frozen().await;
    let three_regions = || vec![region("westeurope"), region("eastus"), region("southeastasia")];
    let sizes = || {
        vec![
            pool("render", "sigrunweu", 2000, ""),
            // Dedicated and low-priority nodes both count: 2500 + 500 = 3000.
            pool("sim", "sigruneus", 2500, "low_priority_nodes = 500"),
        ]
    };
    let replicas_given = |eastus: u32| Spec {
        regions: vec![region("westeurope"), region_with("eastus", eastus)],
        pools: vec![pool("render", "sigrunweu", 10, ""), pool("sim", "sigruneus", 3000, "")],
        ..Default::default()
    };
    let resize = |render: &str, small: &str| Spec {
        regions: vec![region("westeurope"), region("eastus")],
        pools: vec![
            pool("render", "sigrunweu", 2000, render),
            pool("small", "sigruneus", 10, small),
        ],
        ..Default::default()
    };
    let cases = vec![
        // Quotas: each account's held to, with what the plan adds (sim: 2500 + 500 F8s_v2 nodes).
        Case::planned(
            "the quotas each account was held to",
            Spec {
                regions: three_regions(),
                pools: sizes(),
                ..Default::default()
            },
            |plan, _| {
                let used = |account: &str, quota: &str| {
                    let found = plan.quota_use.iter().find(|q| q.account == account && q.quota == quota);
                    found.map(|q| (q.in_use, q.adds, q.limit))
                };
                assert_eq!(
                    used("sigrunweu", "poolQuota"),
                    Some((0, 1, 150)),
                    "{:?}",
                    plan.quota_use
                );
                assert_eq!(used("sigrunweu", "dedicatedCoreQuota"), Some((0, 8000, 200_000)));
                assert_eq!(used("sigruneus", "dedicatedCoreQuota"), Some((0, 2500 * 4, 50_000)));
                assert_eq!(used("sigruneus", "lowPriorityCoreQuota"), Some((0, 500 * 4, 20_000)));
                assert_eq!(
                    plan.quota_use.len(),
                    6,
                    "three quotas of two accounts: {:?}",
                    plan.quota_use
                );
            },
        ),
        // Replicas.
        Case::planned(
            "replicas auto: one per 600 nodes per region",
            Spec {
                regions: three_regions(),
                pools: sizes(),
                ..Default::default()
            },
            |plan, _| {
                assert_eq!(replicas_of(plan, "westeurope"), (4, None, 2000));
                assert_eq!(replicas_of(plan, "eastus"), (5, None, 3000));
                assert_eq!(
                    replicas_of(plan, "southeastasia"),
                    (1, None, 0),
                    "a region without pools still gets one replica"
                );
                assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
            },
        ),
        Case::planned(
            "replicas auto: one per 300 nodes, the later guidance",
            Spec {
                regions: three_regions(),
                pools: sizes(),
                nodes_per_replica: Some(300),
                ..Default::default()
            },
            |plan, _| {
                assert_eq!(replicas_of(plan, "eastus"), (10, None, 3000));
                assert_eq!(replicas_of(plan, "westeurope"), (7, None, 2000));
            },
        ),
        Case::planned(
            "replicas given below the minimum are raised, with a warning",
            replicas_given(2),
            |plan, _| {
                assert_eq!(replicas_of(plan, "eastus"), (5, Some(2), 3000));
                assert_eq!(
                plan.warnings,
                vec![
                    "publish.regions[1].replicas: 2 is below one replica per 600 nodes for the 3000 nodes planned in eastus; raised to 5"
                        .to_string()
                ]
            );
            },
        ),
        Case::planned(
            "replicas given above the minimum are kept",
            replicas_given(8),
            |plan, _| {
                assert_eq!(replicas_of(plan, "eastus"), (8, Some(8), 3000));
                assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
            },
        ),
        // Resize timeouts.
        Case::planned(
            "resize timeout auto: 15 minutes per 1000 nodes",
            resize("", "resize_timeout = \"auto\""),
            |plan, _| {
                assert_eq!(plan.pools[0].resize_timeout_secs, 30 * 60);
                assert_eq!(plan.pools[1].resize_timeout_secs, 15 * 60);
                assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
            },
        ),
        Case::planned(
            "resize timeout given: raised when too low, with a warning; kept above the minimum",
            resize("resize_timeout = \"20m\"", "resize_timeout = \"45m\""),
            |plan, _| {
                assert_eq!(plan.pools[0].resize_timeout_secs, 30 * 60);
                assert_eq!(plan.pools[1].resize_timeout_secs, 45 * 60);
                assert_eq!(
                    plan.warnings,
                    vec![
                        "pools[0].resize_timeout: resize_timeout 20m is below 15 minutes per 1000 nodes for 2000 nodes; raised to 30m"
                            .to_string()
                    ]
                );
            },
        ),
        // Node agent SKUs.
        Case::planned(
            "node agent SKU auto, from Batch's list for the base image",
            Spec::default(),
            |plan, _| {
                assert_eq!(plan.pools[0].node_agent_sku_id, "batch.node.ubuntu 22.04");
                assert_eq!(
                    plan.build.as_ref().unwrap().base_image,
                    Some((
                        "canonical".to_string(),
                        "0001-com-ubuntu-server-jammy".to_string(),
                        "22_04-lts-gen2".to_string()
                    ))
                );
            },
        ),
        Case::planned(
            "node agent SKU auto for a Windows image",
            Spec {
                vm: "build-win2022".into(),
                definition: "winserver-2022-batch".into(),
                os_type: "Windows".into(),
                ..Default::default()
            },
            |plan, _| assert_eq!(plan.pools[0].node_agent_sku_id, "batch.node.windows amd64"),
        ),
        Case::planned(
            "an explicit SKU Batch supports for the image's OS",
            Spec {
                pools: vec![pool(
                    "render",
                    "sigrunweu",
                    10,
                    "node_agent_sku_id = \"batch.node.ubuntu 24.04\"",
                )],
                ..Default::default()
            },
            |plan, _| assert_eq!(plan.pools[0].node_agent_sku_id, "batch.node.ubuntu 24.04"),
        ),
        // Subscriptions.
        Case::planned(
            "a gallery in another subscription needs Microsoft.Batch registered there",
            Spec {
                gallery: gallery_id(SUB_SHARED, "rg-shared"),
                ..Default::default()
            },
            |plan, _| {
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
            },
        ),
        // The imaging subscription is another subscription too, but Microsoft.Batch is registered
        // there; one look answers for every pool.
        Case::planned(
            "Microsoft.Batch registered in the gallery's subscription: read once, nothing to register",
            Spec {
                regions: vec![region("westeurope"), region("eastus")],
                pools: vec![pool("render", "sigrunweu", 10, ""), pool("sim", "sigruneus", 10, "")],
                ..Default::default()
            },
            |plan, log| {
                assert!(plan.register_batch_in.is_empty());
                assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
                let looks = log
                    .iter()
                    .filter(|e| e["path"].as_str().unwrap().ends_with("/providers/Microsoft.Batch"))
                    .count();
                assert_eq!(looks, 1, "Microsoft.Batch's registration is read once");
            },
        ),
        // Sizes compare without case, as Batch compares them; both forms of a region name are fine.
        Case::planned("a VM size in another case", Spec::default(), |_, _| {})
            .edit("Standard_D4s_v5", "standard_d4s_v5"),
    ];
    check_cases(&emu, cases).await;
}

// ---- an existing image definition ----

#[tokio::test]
async fn an_existing_definition_must_be_generalized_and_of_the_specs_os() {
    let emu = start_frozen().await;
    existing_definition(&emu, "ubuntu-specialized", "Linux", "Specialized").await;
    existing_definition(&emu, "ubuntu-as-windows", "Windows", "Generalized").await;
    existing_definition(&emu, "ubuntu-ok", "Linux", "Generalized").await;
    let definition = |name: &str| Spec {
        definition: name.into(),
        ..Default::default()
    };
    let cases = vec![
        Case::refused(
            "an existing specialized definition",
            definition("ubuntu-specialized"),
            "definition",
            Message::Is(format!(
                "{} exists and is Specialized; Batch pools need a Generalized image",
                definition_id(SUB_IMAGING, "rg-gallery", "ubuntu-specialized")
            )),
        ),
        Case::refused(
            "an existing definition of another OS",
            definition("ubuntu-as-windows"),
            "definition.os_type",
            Message::Is(format!(
                "{} exists and has osType Windows, the spec says Linux",
                definition_id(SUB_IMAGING, "rg-gallery", "ubuntu-as-windows")
            )),
        ),
        Case::planned(
            "a matching generalized definition",
            definition("ubuntu-ok"),
            |plan, _| {
                assert_eq!(plan.definition, definition_id(SUB_IMAGING, "rg-gallery", "ubuntu-ok"));
            },
        ),
    ];
    check_cases(&emu, cases).await;
}

// ---- rollout of an existing version ----

#[tokio::test]
async fn a_rollout_plans_an_existing_version_with_a_replica_in_every_pools_region() {
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
    let sku = "node_agent_sku_id = \"batch.node.ubuntu 22.04\"";
    let rollout = |pools: Vec<String>| Spec {
        rollout: true,
        version: "scheme = \"existing\"\nvalue = \"2026.1101.0\"".into(),
        regions: Vec::new(),
        pools,
        ..Default::default()
    };
    let inputs = |version: &str, existing_version: bool| PlanInputs {
        version: version.into(),
        existing_version,
        ..Default::default()
    };
    let covered = version_id.clone();
    let cases = vec![
        Case::refused(
            "a pool in a region the version has no replica in",
            rollout(vec![pool("render", "sigrunweu", 10, sku), pool("sim", "sigruneus", 10, sku)]),
            "pools",
            Message::Is(format!(
                "pool target sim is in eastus but {version_id} has no replica there"
            )),
        )
        .inputs(inputs("2026.1101.0", false)),
        // Covered: the plan builds nothing and takes the version's regions; too few replicas warn.
        Case::planned(
            "pools where the version has replicas, too few for their nodes",
            rollout(vec![pool("render", "sigrunweu", 2000, sku)]),
            move |plan, _| {
                assert!(plan.build.is_none());
                assert_eq!(plan.version_id.to_string(), covered);
                assert_eq!(replicas_of(plan, "westeurope"), (1, Some(1), 2000));
                assert!(
                    !plan.publish_excluded,
                    "a rollout publishes nothing, so nothing is gated"
                );
                assert_eq!(
                    plan.warnings,
                    vec![format!(
                        "{covered} has 1 replica(s) in westeurope, below the 4 that 2000 nodes need; pools there may allocate slowly"
                    )]
                );
            },
        )
        .inputs(inputs("2026.1101.0", false)),
        Case::refused(
            "a version that does not exist",
            rollout(vec![pool("render", "sigrunweu", 10, sku)]),
            "version",
            Message::EndsWith("2026.1101.7 does not exist; nothing to roll out"),
        )
        .inputs(inputs("2026.1101.7", true)),
        // The rollout app reads only its gallery's resource group: listing the gallery
        // subscription's regions is forbidden to it.
        Case::planned(
            "a principal that may not list regions gets a warning, not a refusal",
            rollout(vec![pool("render", "sigrunweu", 10, sku)]),
            |plan, _| {
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
            },
        )
        .edit("[gallery]\n", "[gallery]\nregion = \"westeurope\"\n")
        .inputs(inputs("2026.1101.0", false))
        .planned_by(ROLLOUT_APP),
    ];
    check_cases(&emu, cases).await;
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
    assert_read_only(&emu.requests().await);
    assert_eq!(version.name, "2026.1126.0");
    assert!(version.absent, "a nightly number is chosen past the listed versions");

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
    assert_read_only(&emu.requests().await);
    assert_eq!(version.name, "2026.1126.2");
    let next_day = planner::resolve_version(&parsed, None, &client, date!(2026 - 11 - 27))
        .await
        .unwrap();
    assert_eq!(next_day.name, "2026.1127.0");

    // The plan names everything after it.
    let plan = plan_with(
        &emu,
        &spec,
        PlanInputs {
            version: version.name.clone(),
            version_absent: version.absent,
            ..Default::default()
        },
    )
    .await
    .expect("plan");
    assert_eq!(plan.version, "2026.1126.2");
    // What the planner read travels with the run: a first try need not read it again.
    assert_eq!(
        plan.seen,
        Seen {
            definition: Presence::Present,
            version: Presence::Absent
        }
    );
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
    let log = emu.requests().await;
    assert_read_only(&log);
    assert_reads_each_once(&log);

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
