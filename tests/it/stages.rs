//! Every stage decision, driven one step at a time with the real `AzureClient` against the
//! in-process emulator. The emulator's clock only moves when a test advances it (time scale 1e-6),
//! and the steps' `now` moves with it, so Azure time and the stages' time are the same clock
//! (`azure_time_factor` 1). Messages are built the way `sigrun run` builds them: the nightly spec
//! (adapted from `pipelines/nightly-ubuntu.toml`) is parsed, planned against the emulator with
//! `planner::plan`, and the run's trunk envelope made from the plan.
//!
//! Covered: snapshot (one PUT per disk, waits on Retry-After, LUNs kept, replay is ARM's 200),
//! image-create (data LUNs, wait, a refused image), gallery-publish (gallery and definition made
//! when missing, missing gallery not allowed, a Specialized definition, Microsoft.Batch registered
//! for a gallery in another subscription, the gated version with replicas and end of life),
//! replicate (pools start per region, removal and re-adding of a failed region, a region that
//! fails for good, the estimate from two progress readings), pool-create (metadata, replay, a pool
//! it did not create), verify (allocation wait, AllocationTimedout, start-task failures, promotion
//! once, each rollout policy, the deadline) and the replay of every message of a finished run.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sigrun::azure::{
    AzureApi, AzureClient, AzureError, AzureSettings, CredentialSettings, ErrorClass, MAX_RETRY_AFTER, Secret,
};
use sigrun::emulator::EmulatorOptions;
use sigrun::events::EventKind;
use sigrun::model::envelope::{
    Artifacts, Branch, ENVELOPE_VERSION, Envelope, Intermediate, SnapshotArtifact, Stage, new_traceparent,
};
use sigrun::model::ids::{GalleryImageVersionId, SnapshotId};
use sigrun::model::spec::PipelineSpec;
use sigrun::planner::{self, PlanInputs};
use sigrun::stages::{self, Outcome, Runs, StageSettings, Step, StepContext, Tried};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::helpers::*;

/// The version every run here publishes (as `sigrun run --version` would): fixed, so the
/// emulator's seeded durations are the same every day.
const VERSION: &str = "2026.1126.0";

/// `pipelines/nightly-ubuntu.toml`, smaller: a 400-node render pool and a 4-node tools pool in
/// westeurope, a 15+5-node sim pool in eastus, and southeastasia with a replica and no pool.
const NIGHTLY: &str = r#"
name = "nightly-ubuntu"
description = "Ubuntu 22.04 Batch image, nightly"

[source]
vm = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-imaging/providers/Microsoft.Compute/virtualMachines/build-ubuntu-2204"

[image]
resource_group = "rg-imaging"
region = "westeurope"

[gallery]
id = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-gallery/providers/Microsoft.Compute/galleries/sigrun_images"
create_if_missing = true

[definition]
name = "ubuntu-2204-batch"
os_type = "Linux"
os_state = "Generalized"
publisher = "contoso"
offer = "ubuntu-batch"
sku = "22.04"
hyper_v_generation = "V2"

[version]
scheme = "nightly"

[publish]
storage_account_type = "Standard_LRS"
end_of_life = "90d"
regions = [
  { name = "westeurope", replicas = "auto" },
  { name = "eastus", replicas = "auto" },
  { name = "southeastasia", replicas = 1 },
]

[[pools]]
target = "render"
account = "/subscriptions/22222222-2222-4222-8222-222222222222/resourceGroups/rg-batch/providers/Microsoft.Batch/batchAccounts/sigrunweu"
vm_size = "Standard_D4s_v5"
dedicated_nodes = 400
node_agent_sku_id = "auto"
resize_timeout = "auto"
task_slots_per_node = 4
metadata = { team = "render" }

[pools.start_task]
command_line = "/bin/bash -c 'nvidia-smi || true; echo node ready'"
elevated = true
wait_for_success = true
max_task_retry_count = 1

[[pools]]
target = "tools"
account = "/subscriptions/22222222-2222-4222-8222-222222222222/resourceGroups/rg-batch/providers/Microsoft.Batch/batchAccounts/sigrunweu"
vm_size = "Standard_D2s_v5"
dedicated_nodes = 4
node_agent_sku_id = "batch.node.ubuntu 22.04"

[[pools]]
target = "sim"
account = "/subscriptions/22222222-2222-4222-8222-222222222222/resourceGroups/rg-batch/providers/Microsoft.Batch/batchAccounts/sigruneus"
vm_size = "Standard_F8s_v2"
dedicated_nodes = 15
low_priority_nodes = 5
resize_timeout = "20m"

[verify]
min_idle_share = 0.95
max_start_task_failed_share = 0.02
deadline = "3h"

[promotion]
gated = true

[rollout]
previous_pool = "scale_to_zero"
"#;

const GALLERY_LINE: &str = "id = \"/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-gallery/providers/Microsoft.Compute/galleries/sigrun_images\"";

/// The nightly spec with each `(from, to)` replaced once (each `from` must be there).
fn nightly(edits: &[(&str, &str)]) -> String {
    let mut text = NIGHTLY.to_string();
    for (from, to) in edits {
        assert!(text.contains(from), "the spec has no `{from}`");
        text = text.replacen(from, to, 1);
    }
    text
}

// ---------------------------------------------------------------------------------------------
// The harness: an emulator, the real client, and `now` moving with the emulated clock.

struct Sim {
    emu: TestEmulator,
    azure: AzureClient,
    settings: StageSettings,
    /// The steps' clock: moves only with [`Sim::advance`], by as much as the emulator's.
    now: OffsetDateTime,
    /// The run history as the rollout sees it: these runs are live, every other one has ended.
    live_runs: LiveRuns,
    /// What the runtime would say of each step's try (`Maybe` unless a test sets it).
    tried: Tried,
}

/// A run history in which the runs listed are still making their pools and every other run has
/// ended; whether a run's version was promoted is what the second field says (`None`: the history
/// does not say, as for a process that does not hold the run).
#[derive(Default)]
struct LiveRuns(std::sync::Mutex<Vec<Uuid>>, std::sync::Mutex<Option<bool>>);

impl Runs for LiveRuns {
    fn pool_in_progress(&self, run_id: Uuid, _target: &str) -> Option<bool> {
        Some(self.0.lock().unwrap().contains(&run_id))
    }

    fn run_in_progress(&self, run_id: Uuid) -> Option<bool> {
        Some(self.0.lock().unwrap().contains(&run_id))
    }

    fn version_promoted(&self, _run_id: Uuid) -> Option<bool> {
        *self.1.lock().unwrap()
    }
}

impl Sim {
    async fn new() -> Sim {
        Sim::with_faults("").await
    }

    async fn with_faults(faults: &str) -> Sim {
        let emu = start(EmulatorOptions {
            time_scale: 1e-6,
            faults: faults.to_string(),
            ..Default::default()
        })
        .await;
        let mut settings = AzureSettings::new(CredentialSettings::ClientSecret {
            tenant_id: TENANT.to_string(),
            client_id: PIPELINE_APP.0.to_string(),
            client_secret: Secret::new(PIPELINE_APP.1),
        });
        settings.cloud.authority_host = emu.base().to_string();
        settings.cloud.resource_manager = emu.base().to_string();
        settings.extra_ca_cert = emu.emulator.info().ca_cert.clone().map(Into::into);
        settings.retry.min_delay_ms = 50;
        let azure = AzureClient::new(&settings).expect("client");
        Sim {
            emu,
            azure,
            settings: StageSettings {
                azure_time_factor: 1.0,
                ..StageSettings::default()
            },
            now: OffsetDateTime::now_utc(),
            live_runs: LiveRuns::default(),
            tried: Tried::Maybe,
        }
    }

    /// Moves the emulated clock and the steps' clock together.
    async fn advance(&mut self, secs: f64) {
        self.emu.advance(secs).await;
        self.now += time::Duration::seconds_f64(secs);
    }

    /// The trunk message of a run of `spec_text`, as `sigrun run` makes it, entering at `entry`.
    async fn trunk(&self, spec_text: &str, entry: Stage) -> Envelope {
        let spec = PipelineSpec::parse(spec_text, "nightly-ubuntu.toml").expect("spec parses");
        let version = planner::resolve_version(&spec, Some(VERSION), &self.azure, self.now.date())
            .await
            .expect("version")
            .name;
        let inputs = PlanInputs {
            version,
            ..Default::default()
        };
        let plan = planner::plan(&spec, &inputs, &self.azure, self.now)
            .await
            .expect("the spec plans");
        // As `first_messages` in src/cli/run.rs.
        let run_id = Uuid::new_v5(
            &Uuid::NAMESPACE_URL,
            format!("sigrun:{}:{}", spec.name, plan.version).as_bytes(),
        );
        let mut artifacts = Artifacts::default();
        if let Some(build) = &plan.build {
            if entry > Stage::Snapshot {
                artifacts.snapshots = build
                    .snapshots
                    .iter()
                    .map(|s| SnapshotArtifact {
                        lun: s.lun,
                        id: s.id.clone(),
                    })
                    .collect();
            }
            if entry > Stage::ImageCreate {
                artifacts.image = Some(build.image.clone());
            }
        }
        if entry > Stage::GalleryPublish {
            artifacts.image_version = Some(plan.version_id.clone());
        }
        Envelope {
            v: ENVELOPE_VERSION,
            message_id: Uuid::new_v4(),
            run_id,
            pipeline: spec.name.clone(),
            version: plan.version.clone(),
            stage: entry,
            branch: Branch::Trunk,
            spec: std::sync::Arc::new(spec),
            plan: std::sync::Arc::new(plan),
            artifacts,
            operation: None,
            attempt: 0,
            not_before: None,
            run_started: self.now,
            stage_started: self.now,
            traceparent: new_traceparent(),
            token: Uuid::new_v4(),
            made_by: Uuid::nil(),
            made_from: Uuid::nil(),
            admission: Uuid::new_v4(),
        }
    }

    /// A pool branch's first message, as `sigrun run` makes it when a run enters at pool-create.
    fn pool_message(trunk: &Envelope, target: &str, now: OffsetDateTime) -> Envelope {
        let pool = trunk
            .plan
            .pools
            .iter()
            .find(|p| p.target == target)
            .expect("planned pool");
        trunk.for_pool(Stage::PoolCreate, &pool.region, target, now)
    }

    async fn try_drive(&self, message: &Envelope) -> Result<Step, AzureError> {
        let ctx = StepContext {
            azure: &self.azure,
            now: self.now,
            settings: &self.settings,
            runs: &self.live_runs,
            tried: self.tried,
        };
        stages::step(message.clone(), &ctx).await
    }

    /// Whether the version is in "latest" (not `excludeFromLatest`), as Azure answers now.
    async fn is_latest(&self, version: &GalleryImageVersionId) -> bool {
        let version = self.azure.get_version(version, false).await.unwrap();
        !version.expect("the version exists").exclude_from_latest
    }

    /// One step of the message's stage.
    async fn drive(&self, message: &Envelope) -> Step {
        self.try_drive(message)
            .await
            .unwrap_or_else(|e| panic!("{} step failed: {e}", message.stage))
    }

    /// Steps `message` until its stage stops waiting, advancing `every` seconds after each wait.
    /// Returns every step taken (the last one is not a wait).
    async fn settle(&mut self, message: &Envelope, every: f64) -> Vec<Step> {
        let mut message = message.clone();
        let mut steps = Vec::new();
        for _ in 0..400 {
            let step = self.drive(&message).await;
            let next = match &step.outcome {
                Outcome::Wait { message, .. } => Some((**message).clone()),
                _ => None,
            };
            steps.push(step);
            match next {
                Some(waiting) => {
                    message = waiting;
                    self.advance(every).await;
                }
                None => return steps,
            }
        }
        panic!("{} never stopped waiting", message.stage);
    }

    /// Sequence number of the last logged request: requests after it are what came next.
    async fn mark(&self) -> u64 {
        self.emu
            .requests()
            .await
            .iter()
            .filter_map(|r| r["seq"].as_u64())
            .max()
            .unwrap_or(0)
    }

    /// ARM and Batch requests logged after `mark`.
    async fn since(&self, mark: u64) -> Vec<Value> {
        self.emu
            .requests()
            .await
            .into_iter()
            .filter(|r| r["seq"].as_u64().unwrap_or(0) > mark && (r["api"] == "arm" || r["api"] == "batch"))
            .collect()
    }

    async fn arm_get(&self, id: &str, api: &str) -> Value {
        let token = self.emu.arm_token().await;
        let reply = self.emu.get(&format!("{id}?api-version={api}"), &token).await;
        assert_eq!(reply.status, 200, "GET {id}: {:?}", reply.body);
        reply.body
    }

    async fn arm_put(&self, id: &str, api: &str, body: &Value) {
        let token = self.emu.arm_token().await;
        let reply = self.emu.put(&format!("{id}?api-version={api}"), &token, body).await;
        assert!(reply.status.is_success(), "PUT {id}: {:?}", reply.body);
    }

    async fn pool(&self, account: &str, id: &str) -> Option<Value> {
        let token = self.emu.batch_token().await;
        let reply = self
            .emu
            .get(
                &format!("{}/pools/{id}?api-version={BATCH_API}", self.emu.batch_url(account)),
                &token,
            )
            .await;
        match reply.status.as_u16() {
            200 => Some(reply.body),
            404 => None,
            other => panic!("GET pool {id}: {other} {:?}", reply.body),
        }
    }

    /// Adds a pool straight through the Batch API (as an operator or an older run would).
    async fn add_marketplace_pool(&self, account: &str, id: &str, nodes: u32, metadata: &[(&str, &str)]) {
        let token = self.emu.batch_token().await;
        let body = json!({
            "id": id,
            "vmSize": "Standard_D2s_v5",
            "targetDedicatedNodes": nodes,
            "virtualMachineConfiguration": {
                "imageReference": {"publisher": "canonical", "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts-gen2", "version": "latest"},
                "nodeAgentSKUId": "batch.node.ubuntu 22.04",
            },
            "metadata": metadata.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
        });
        let reply = self
            .emu
            .post(
                &format!("{}/pools?api-version={BATCH_API}", self.emu.batch_url(account)),
                &token,
                &body,
            )
            .await;
        assert_eq!(reply.status, 201, "add pool {id}: {:?}", reply.body);
    }

    /// Resizes a pool straight through the Batch API.
    async fn resize(&self, account: &str, id: &str, nodes: u32) {
        let token = self.emu.batch_token().await;
        let reply = self
            .emu
            .post(
                &format!(
                    "{}/pools/{id}/resize?api-version={BATCH_API}",
                    self.emu.batch_url(account)
                ),
                &token,
                &json!({"targetDedicatedNodes": nodes}),
            )
            .await;
        assert_eq!(reply.status, 202, "resize {id}: {:?}", reply.body);
    }

    /// What exists: ARM resources (id → type) and Batch pools (`account/id`).
    async fn inventory(&self) -> (BTreeMap<String, String>, Vec<String>) {
        let reply = self
            .emu
            .call(Method::GET, &format!("{}/_emulator/state", self.emu.base()), None, None)
            .await;
        assert_eq!(reply.status, 200);
        let resources = reply.body["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_ascii_lowercase(),
                    r["type"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let mut pools: Vec<String> = reply.body["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| format!("{}/{}", p["account"].as_str().unwrap(), p["id"].as_str().unwrap()))
            .collect();
        pools.sort();
        (resources, pools)
    }

    /// Drives the trunk from snapshot to the end of replicate; returns the pool-create messages
    /// in the order they were emitted.
    async fn publish(&mut self, trunk: &Envelope) -> Vec<Envelope> {
        let mut message = trunk.clone();
        for stage in [Stage::Snapshot, Stage::ImageCreate, Stage::GalleryPublish] {
            assert_eq!(message.stage, stage);
            let steps = self.settle(&message, 120.0).await;
            message = only_advanced(steps.last().unwrap()).clone();
        }
        assert_eq!(message.stage, Stage::Replicate);
        let steps = self.settle(&message, 120.0).await;
        pool_messages(&steps)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading steps.

fn kind(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Advance(_) => "advance",
        Outcome::Wait { .. } => "wait",
        Outcome::Done => "done",
        Outcome::Fail(_) => "fail",
    }
}

/// The wait's message, delay and emitted messages; panics on any other outcome.
fn waited(step: &Step) -> (&Envelope, Duration, &[Envelope]) {
    match &step.outcome {
        Outcome::Wait { message, delay, emit } => (message, *delay, emit),
        other => panic!("expected a wait, got {other:?}"),
    }
}

fn advanced(step: &Step) -> &[Envelope] {
    match &step.outcome {
        Outcome::Advance(next) => next,
        other => panic!("expected an advance, got {other:?}"),
    }
}

/// The one message the step hands on along the run (a clean-up it schedules beside goes its own
/// way: `clean_ups`).
fn only_advanced(step: &Step) -> &Envelope {
    let next: Vec<&Envelope> = advanced(step)
        .iter()
        .filter(|m| !matches!(m.branch, Branch::CleanUp { .. }))
        .collect();
    assert_eq!(next.len(), 1, "one message on: {next:?}");
    next[0]
}

fn failed(step: &Step) -> &str {
    match &step.outcome {
        Outcome::Fail(reason) => reason,
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn event_names(step: &Step) -> Vec<&'static str> {
    step.events.iter().map(EventKind::name).collect()
}

fn all_events(steps: &[Step]) -> Vec<&EventKind> {
    steps.iter().flat_map(|s| s.events.iter()).collect()
}

/// Every message a run of steps handed on (emitted while waiting, or advanced).
fn pool_messages(steps: &[Step]) -> Vec<Envelope> {
    let mut out = Vec::new();
    for step in steps {
        match &step.outcome {
            Outcome::Wait { emit, .. } => out.extend(emit.iter().cloned()),
            Outcome::Advance(next) => out.extend(next.iter().cloned()),
            _ => {}
        }
    }
    out
}

fn branch_of(message: &Envelope) -> (String, String) {
    match &message.branch {
        Branch::Pool { region, target } => (region.clone(), target.clone()),
        other => panic!("a {other:?} message where a pool branch was expected"),
    }
}

/// The pool branches among `messages` (a clean-up beside them aside).
fn branches(messages: &[Envelope]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = messages
        .iter()
        .filter(|m| !matches!(m.branch, Branch::CleanUp { .. }))
        .map(branch_of)
        .collect();
    out.sort();
    out
}

fn pair(region: &str, target: &str) -> (String, String) {
    (region.to_string(), target.to_string())
}

fn is_put_or_patch_of(entry: &Value, path_end: &str) -> bool {
    (entry["method"] == "PUT" || entry["method"] == "PATCH")
        && entry["path"]
            .as_str()
            .is_some_and(|p| p.to_ascii_lowercase().ends_with(&path_end.to_ascii_lowercase()))
}

fn statuses(log: &[Value], method: &str, path_part: &str) -> Vec<u64> {
    log.iter()
        .filter(|e| {
            e["method"] == method
                && e["path"]
                    .as_str()
                    .is_some_and(|p| p.to_ascii_lowercase().contains(&path_part.to_ascii_lowercase()))
        })
        .map(|e| e["status"].as_u64().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// snapshot

#[tokio::test]
async fn snapshot_copies_every_disk_waits_on_retry_after_and_hands_on_the_luns() {
    let mut sim = Sim::new().await;
    let first = sim.trunk(NIGHTLY, Stage::Snapshot).await;
    let build = first.plan.build.clone().expect("a build plan");
    let image_name = build.image.name().to_string();
    assert_eq!(image_name, "nightly-ubuntu-2026-1126-0");
    // Looks may wait up to a day here, so the delay below is Azure's hint, not the poll cap.
    sim.settings.poll_max = Duration::from_secs(86_400);

    let mark = sim.mark().await;
    let step = sim.drive(&first).await;
    let (waiting, delay, emit) = waited(&step);
    assert!(emit.is_empty());
    let op = waiting.operation.as_ref().expect("an operation in flight");
    assert_eq!(op.what.as_str(), "snapshots");
    assert_eq!(op.polls, 0);
    assert_eq!(waiting.stage, Stage::Snapshot);

    // One PUT per disk, named from the run, each accepted (202) with its operation to follow.
    let log = sim.since(mark).await;
    let puts: Vec<&Value> = log.iter().filter(|e| e["method"] == "PUT").collect();
    let names: Vec<String> = puts
        .iter()
        .map(|e| e["path"].as_str().unwrap().rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        vec![
            format!("{image_name}-os"),
            format!("{image_name}-lun0"),
            format!("{image_name}-lun1")
        ]
    );
    assert!(puts.iter().all(|e| e["status"] == 202), "{puts:?}");
    assert!(
        puts.iter()
            .all(|e| e["path"].as_str().unwrap().contains("/resourceGroups/rg-imaging/")),
        "{puts:?}"
    );
    assert_eq!(op.status_urls.len(), 3);
    assert!(
        op.status_urls
            .iter()
            .all(|u| u.starts_with(sim.emu.base()) && u.contains("/DiskOperations/")),
        "{:?}",
        op.status_urls
    );
    // The delay is Azure's Retry-After (the longest of the three: nothing is done sooner), read as
    // at most a day (the frozen emulator's hints are years of real time).
    let longest = puts.iter().filter_map(|e| e["retry_after_ms"].as_u64()).max().unwrap();
    assert_eq!(delay, Duration::from_millis(longest).min(MAX_RETRY_AFTER));
    assert_eq!(
        step.events,
        vec![
            EventKind::ResourceCreated {
                id: build.snapshots[0].id.to_string()
            },
            EventKind::ResourceCreated {
                id: build.snapshots[1].id.to_string()
            },
            EventKind::ResourceCreated {
                id: build.snapshots[2].id.to_string()
            },
            EventKind::Waiting {
                what: "snapshots".into()
            },
        ]
    );

    // A minute on, the copies (over two minutes each) still run: wait again, create nothing.
    sim.advance(60.0).await;
    let mark = sim.mark().await;
    let again = sim.drive(waiting).await;
    let (still, delay, _) = waited(&again);
    let op = still.operation.as_ref().unwrap();
    assert_eq!(op.what.as_str(), "snapshots");
    assert_eq!(op.polls, 1);
    assert_eq!(op.status_urls.len(), 3, "none finished yet");
    assert!(delay > Duration::ZERO);
    assert!(again.events.is_empty(), "no second Waiting event: {:?}", again.events);
    let log = sim.since(mark).await;
    assert!(log.iter().all(|e| e["method"] == "GET"), "only status reads: {log:?}");
    assert_eq!(log.len(), 3);

    // Past the longest copy: on to image-create with every snapshot and its LUN.
    sim.advance(600.0).await;
    let done = sim.drive(still).await;
    let next = only_advanced(&done);
    assert_eq!(next.stage, Stage::ImageCreate);
    assert_eq!(next.branch, Branch::Trunk);
    assert_eq!(next.run_id, first.run_id);
    assert_ne!(next.message_id, first.message_id);
    assert!(next.operation.is_none());
    let snapshots: Vec<(Option<u32>, String)> = next
        .artifacts
        .snapshots
        .iter()
        .map(|s| (s.lun, s.id.name().to_string()))
        .collect();
    assert_eq!(
        snapshots,
        vec![
            (None, format!("{image_name}-os")),
            (Some(0), format!("{image_name}-lun0")),
            (Some(1), format!("{image_name}-lun1")),
        ]
    );
    for s in &next.artifacts.snapshots {
        let state = sim.azure.get_snapshot(&s.id).await.unwrap().expect("snapshot exists");
        assert_eq!(state.provisioning_state.as_str(), "Succeeded");
        assert_eq!(state.tags["sigrun-run"], first.run_id.to_string());
        assert_eq!(state.tags["sigrun-pipeline"], "nightly-ubuntu");
    }

    // The first message again (a redelivery): the run's snapshots are found and joined, not
    // written again — nothing new.
    let before = sim.inventory().await;
    let mark = sim.mark().await;
    let replay = sim.drive(&first).await;
    let (replayed, _, _) = waited(&replay);
    let log = sim.since(mark).await;
    assert_eq!(statuses(&log, "PUT", "/snapshots/"), Vec::<u64>::new());
    assert_eq!(statuses(&log, "GET", "/snapshots/"), vec![200, 200, 200]);
    assert_eq!(sim.inventory().await, before);
    let converged = sim.drive(replayed).await;
    assert_eq!(only_advanced(&converged).artifacts.snapshots, next.artifacts.snapshots);
}

// ---------------------------------------------------------------------------------------------
// image-create

#[tokio::test]
async fn a_repeated_step_joins_and_records_what_an_earlier_try_of_its_admission_made() {
    let mut sim = Sim::new().await;
    let trunk = sim.trunk(NIGHTLY, Stage::Snapshot).await;
    // A worker made the snapshots and was killed before its commit: nothing recorded them.
    let first = sim.drive(&trunk).await;
    assert_eq!(
        event_names(&first).iter().filter(|n| **n == "resource_created").count(),
        3
    );
    // Another worker takes the message: it finds them (still copying), joins them without a
    // second write, and records them.
    let mark = sim.mark().await;
    let again = sim.drive(&trunk).await;
    assert_eq!(
        event_names(&again).iter().filter(|n| **n == "resource_created").count(),
        3,
        "{:?}",
        again.events
    );
    let log = sim.since(mark).await;
    assert_eq!(
        statuses(&log, "PUT", "/snapshots/"),
        Vec::<u64>::new(),
        "no second write"
    );
    assert_eq!(statuses(&log, "GET", "/snapshots/"), vec![200, 200, 200]);
    let (joined, _, _) = waited(&again);
    assert!(
        joined.operation.as_ref().unwrap().status_urls.is_empty(),
        "reads the snapshots themselves"
    );
    // A later run of the same version (another admission) finds them too, and records nothing.
    let mut later = trunk.clone();
    later.admission = Uuid::new_v4();
    let other = sim.drive(&later).await;
    assert!(
        !event_names(&other).contains(&"resource_created"),
        "another admission's snapshots are not this one's: {:?}",
        other.events
    );
    // The joined wait ends when the snapshots are there.
    let steps = sim.settle(joined, 120.0).await;
    assert_eq!(only_advanced(steps.last().unwrap()).stage, Stage::ImageCreate);

    // The same for a pool: made, not recorded, found by the repeated step.
    let pools = sim.publish(&trunk).await;
    let pool = pools.iter().find(|m| branch_of(m).1 == "tools").unwrap();
    assert_eq!(event_names(&sim.drive(pool).await), vec!["pool_created"]);
    assert_eq!(event_names(&sim.drive(pool).await), vec!["pool_created"], "adopted");
    let mut later = pool.clone();
    later.admission = Uuid::new_v4();
    assert!(event_names(&sim.drive(&later).await).is_empty());
}

#[tokio::test]
async fn image_create_makes_the_image_with_the_data_luns_and_waits_for_it() {
    let mut sim = Sim::new().await;
    let trunk = sim.trunk(NIGHTLY, Stage::Snapshot).await;
    let steps = sim.settle(&trunk, 300.0).await;
    let message = only_advanced(steps.last().unwrap()).clone();
    assert_eq!(message.stage, Stage::ImageCreate);
    let build = message.plan.build.clone().unwrap();

    let mark = sim.mark().await;
    let step = sim.drive(&message).await;
    let (waiting, delay, _) = waited(&step);
    let op = waiting.operation.as_ref().unwrap();
    assert_eq!(op.what.as_str(), "image");
    assert_eq!(op.status_urls.len(), 1);
    let mut names = event_names(&step);
    names.sort();
    assert_eq!(names, vec!["resource_created", "waiting"], "{:?}", step.events);
    assert!(step.events.contains(&EventKind::ResourceCreated {
        id: build.image.to_string()
    }));
    let log = sim.since(mark).await;
    let puts: Vec<&Value> = log.iter().filter(|e| e["method"] == "PUT").collect();
    assert_eq!(puts.len(), 1);
    assert!(is_put_or_patch_of(puts[0], &format!("/images/{}", build.image.name())));
    assert_eq!(puts[0]["status"], 201);
    // The frozen emulator's hint is years of real time: the look waits `poll_max`, no longer.
    let hint = Duration::from_millis(puts[0]["retry_after_ms"].as_u64().unwrap());
    assert!(hint > sim.settings.poll_max, "{hint:?}");
    assert_eq!(delay, sim.settings.poll_max);

    // The image as Azure has it: the OS snapshot, and each data snapshot at its own LUN.
    let image = sim.arm_get(&build.image.to_string(), COMPUTE_API).await;
    let profile = &image["properties"]["storageProfile"];
    let snapshot = |suffix: &str| {
        SnapshotId::new(
            SUB_IMAGING,
            "rg-imaging",
            &[&format!("{}-{suffix}", build.image.name())],
        )
        .unwrap()
        .to_string()
        .to_ascii_lowercase()
    };
    assert_eq!(
        profile["osDisk"]["snapshot"]["id"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase(),
        snapshot("os")
    );
    assert_eq!(profile["osDisk"]["osType"], "Linux");
    assert_eq!(image["properties"]["hyperVGeneration"], "V2");
    let data: Vec<(u64, String)> = profile["dataDisks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["lun"].as_u64().unwrap(),
                d["snapshot"]["id"].as_str().unwrap().to_ascii_lowercase(),
            )
        })
        .collect();
    assert_eq!(data, vec![(0, snapshot("lun0")), (1, snapshot("lun1"))]);

    // Still running a little later; then done: on to gallery-publish with the image.
    sim.advance(30.0).await;
    let again = sim.drive(waiting).await;
    let (waiting, _, _) = waited(&again);
    assert!(again.events.is_empty());
    sim.advance(900.0).await;
    let done = sim.drive(waiting).await;
    let next = only_advanced(&done);
    assert_eq!(next.stage, Stage::GalleryPublish);
    assert_eq!(next.artifacts.image.as_ref(), Some(&build.image));
    assert_eq!(next.artifacts.snapshots, message.artifacts.snapshots);

    // Replayed: the run's image is found and joined (no second PUT), and the next look sees it
    // finished.
    let mark = sim.mark().await;
    let replay = sim.drive(&message).await;
    assert_eq!(statuses(&sim.since(mark).await, "PUT", "/images/"), Vec::<u64>::new());
    let (replayed, _, _) = waited(&replay);
    assert_eq!(only_advanced(&sim.drive(replayed).await).stage, Stage::GalleryPublish);
}

/// The nightly run from its snapshots to its image made: image-create's steps, the last of which
/// schedules the snapshots' clean-up.
async fn image_made(sim: &mut Sim) -> Vec<Step> {
    let trunk = sim.trunk(NIGHTLY, Stage::Snapshot).await;
    let steps = sim.settle(&trunk, 300.0).await;
    let message = only_advanced(steps.last().unwrap()).clone();
    sim.settle(&message, 300.0).await
}

#[tokio::test]
async fn the_snapshots_clean_up_deletes_them_once_the_image_exists_and_confirms_each_gone() {
    let mut sim = Sim::new().await;
    let steps = image_made(&mut sim).await;
    let done = steps.last().unwrap();
    assert!(done.events.contains(&EventKind::CleanUpScheduled {
        what: Intermediate::Snapshots
    }));
    let clean_up = advanced(done)
        .iter()
        .find(|m| {
            m.branch
                == Branch::CleanUp {
                    what: Intermediate::Snapshots,
                }
        })
        .expect("the snapshots' clean-up goes out with the image")
        .clone();
    assert_eq!(clean_up.stage, Stage::ImageCreate, "it steps on its scheduler's queue");
    // The snapshots this admission made travel to the clean-up, and leave the trunk.
    let made: Vec<String> = clean_up.artifacts.snapshots.iter().map(|s| s.id.to_string()).collect();
    assert!(
        made.iter().all(|id| clean_up.artifacts.recorded.contains(id)),
        "{:?}",
        clean_up.artifacts.recorded
    );
    let trunk_next = only_advanced(done);
    assert!(
        made.iter().all(|id| !trunk_next.artifacts.recorded.contains(id)),
        "{:?}",
        trunk_next.artifacts.recorded
    );

    // Looks may wait up to a day here, so the delay below is Azure's hint, not the poll cap.
    sim.settings.poll_max = Duration::from_secs(86_400);
    let mark = sim.mark().await;
    let steps = sim.settle(&clean_up, 60.0).await;
    assert_eq!(kind(&steps.last().unwrap().outcome), "done");
    let log = sim.since(mark).await;
    let deletes = statuses(&log, "DELETE", "/snapshots/");
    assert_eq!(deletes, vec![202, 202, 202], "each snapshot deleted once");
    // Made in this admission: deleted without a read of their tags first; each confirmed gone by
    // reads after its delete.
    let first_delete = log.iter().position(|e| e["method"] == "DELETE").expect("a delete");
    assert_eq!(
        statuses(&log[..first_delete], "GET", "/snapshots/"),
        Vec::<u64>::new(),
        "no read before the deletes"
    );
    // The look after the deletes is timed by the longest of their Retry-After (this frozen
    // emulator's are years, read as at most a day), not the default poll.
    let (_, delay, _) = waited(&steps[0]);
    let longest = log
        .iter()
        .filter(|e| e["method"] == "DELETE")
        .filter_map(|e| e["retry_after_ms"].as_u64())
        .max()
        .expect("the deletes' hints");
    assert_eq!(delay, Duration::from_millis(longest).min(MAX_RETRY_AFTER));
    let deleted: Vec<&String> = all_events(&steps)
        .into_iter()
        .filter_map(|e| match e {
            EventKind::ResourceDeleted { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(deleted.len(), 3, "one ResourceDeleted per snapshot");
    for snapshot in &clean_up.artifacts.snapshots {
        assert_eq!(
            sim.azure.get_snapshot(&snapshot.id).await.unwrap(),
            None,
            "{} is gone",
            snapshot.id
        );
        assert!(deleted.contains(&&snapshot.id.to_string()));
    }
    assert_eq!(
        all_events(&steps).last(),
        Some(&&EventKind::CleanUpFinished {
            what: Intermediate::Snapshots,
            failed: None
        })
    );
    // The image they made is still there: only what it replaced goes.
    let image = clean_up.artifacts.image.clone().expect("the image");
    assert!(sim.azure.get_image(&image).await.unwrap().is_some());
}

/// A clean-up of snapshots the run did not make in this admission (a run started at image-create
/// names them from its plan) reads each first, and leaves one that another run made.
#[tokio::test]
async fn a_clean_up_reads_what_this_admission_did_not_make_and_leaves_anothers() {
    let mut sim = Sim::new().await;
    let steps = image_made(&mut sim).await;
    let mut clean_up = advanced(steps.last().unwrap())
        .iter()
        .find(|m| matches!(m.branch, Branch::CleanUp { .. }))
        .expect("the snapshots' clean-up")
        .clone();
    // As a run that entered past the snapshot stage would carry it: nothing recorded as made, and
    // the OS snapshot retagged as another run's.
    clean_up.artifacts.recorded.clear();
    let os = clean_up
        .artifacts
        .snapshots
        .iter()
        .find(|s| s.lun.is_none())
        .unwrap()
        .id
        .clone();
    let found = sim.arm_get(&os.to_string(), DISK_API).await;
    let made_from = &found["properties"]["creationData"];
    let body = json!({"location": found["location"], "tags": {"sigrun-run": "someone-else"},
        "properties": {"creationData": {
            "createOption": made_from["createOption"], "sourceResourceId": made_from["sourceResourceId"]}}});
    sim.arm_put(&os.to_string(), DISK_API, &body).await;

    let mark = sim.mark().await;
    let steps = sim.settle(&clean_up, 60.0).await;
    assert_eq!(kind(&steps.last().unwrap().outcome), "done");
    let log = sim.since(mark).await;
    assert_eq!(
        statuses(&log, "DELETE", "/snapshots/"),
        vec![202, 202],
        "another run's stays"
    );
    for (at, delete) in log.iter().enumerate().filter(|(_, e)| e["method"] == "DELETE") {
        let before = &log[at - 1];
        assert_eq!(
            (&before["method"], &before["path"]),
            (&json!("GET"), &delete["path"]),
            "read first"
        );
    }
    assert!(sim.azure.get_snapshot(&os).await.unwrap().is_some());
}

#[tokio::test]
async fn image_create_stops_when_its_snapshots_are_gone_or_missing() {
    let mut sim = Sim::new().await;
    let trunk = sim.trunk(NIGHTLY, Stage::Snapshot).await;
    let steps = sim.settle(&trunk, 300.0).await;
    let message = only_advanced(steps.last().unwrap()).clone();

    // A data snapshot deleted before the image is made: Azure refuses the image for good, which
    // the runtime turns into the trunk's failure (the emulator's images never fail once accepted).
    let lun1 = message.artifacts.snapshots.iter().find(|s| s.lun == Some(1)).unwrap();
    sim.azure.delete_snapshot(&lun1.id).await.expect("delete snapshot");
    sim.advance(120.0).await;
    assert_eq!(sim.azure.get_snapshot(&lun1.id).await.unwrap(), None);
    let err = sim.try_drive(&message).await.expect_err("the image is refused");
    assert_eq!(err.class(), ErrorClass::Permanent, "{err}");
    assert_eq!(err.status, Some(404), "{err}");
    assert!(err.to_string().contains(lun1.id.name()), "{err}");
    let image = message.plan.build.as_ref().unwrap().image.clone();
    assert_eq!(sim.azure.get_image(&image).await.unwrap(), None, "no image was made");

    // A message without the OS snapshot: the stage's own verdict.
    let mut without_os = message.clone();
    without_os.artifacts.snapshots.retain(|s| s.lun.is_some());
    let step = sim.drive(&without_os).await;
    assert!(failed(&step).contains("no OS disk snapshot"), "{step:?}");
}

// ---------------------------------------------------------------------------------------------
// gallery-publish

#[tokio::test]
async fn gallery_publish_creates_what_is_missing_and_publishes_the_gated_version() {
    let mut sim = Sim::new().await;
    let trunk = sim.trunk(NIGHTLY, Stage::Snapshot).await;
    let mut message = trunk.clone();
    for _ in 0..2 {
        let steps = sim.settle(&message, 300.0).await;
        message = only_advanced(steps.last().unwrap()).clone();
    }
    assert_eq!(message.stage, Stage::GalleryPublish);
    let plan = message.plan.clone();
    assert!(plan.create_gallery);
    assert!(
        plan.register_batch_in.is_empty(),
        "the gallery's subscription has Microsoft.Batch"
    );
    assert_eq!(sim.azure.get_gallery(&plan.gallery).await.unwrap(), None);

    // The gallery: created, then waited on (a look before it finishes waits again).
    let mark = sim.mark().await;
    let step = sim.drive(&message).await;
    let (waiting, _, _) = waited(&step);
    assert_eq!(waiting.operation.as_ref().unwrap().what.as_str(), "gallery");
    assert_eq!(
        step.events,
        vec![
            EventKind::Waiting { what: "gallery".into() },
            EventKind::ResourceCreated {
                id: plan.gallery.to_string()
            }
        ]
    );
    assert_eq!(
        statuses(&sim.since(mark).await, "PUT", "/galleries/sigrun_images"),
        vec![201]
    );
    let step = sim.drive(waiting).await;
    let (waiting, _, _) = waited(&step);
    assert_eq!(waiting.operation.as_ref().unwrap().what.as_str(), "gallery");
    assert!(step.events.is_empty());

    // The definition, as the spec describes it.
    sim.advance(60.0).await;
    let mark = sim.mark().await;
    let step = sim.drive(waiting).await;
    let (waiting, _, _) = waited(&step);
    assert_eq!(waiting.operation.as_ref().unwrap().what.as_str(), "definition");
    assert!(step.events.contains(&EventKind::ResourceCreated {
        id: plan.definition.to_string()
    }));
    assert_eq!(
        statuses(&sim.since(mark).await, "PUT", "/images/ubuntu-2204-batch"),
        vec![201]
    );
    let definition = sim.azure.get_definition(&plan.definition).await.unwrap().unwrap();
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
        ("contoso", "ubuntu-batch", "22.04")
    );

    // The version: excluded from latest while promotion is gated, the planned replicas per
    // region, the end of life; then on to replicate.
    sim.advance(60.0).await;
    let mark = sim.mark().await;
    let step = sim.drive(waiting).await;
    let next = only_advanced(&step);
    assert_eq!(next.stage, Stage::Replicate);
    assert_eq!(next.branch, Branch::Trunk);
    assert_eq!(next.artifacts.image_version.as_ref(), Some(&plan.version_id));
    assert_eq!(
        step.events,
        vec![EventKind::ResourceCreated {
            id: plan.version_id.to_string()
        }]
    );
    assert_eq!(statuses(&sim.since(mark).await, "PUT", "/versions/"), vec![201]);
    let planned: Vec<(String, u32)> = plan.regions.iter().map(|r| (r.name.clone(), r.replicas)).collect();
    assert_eq!(
        planned,
        vec![
            ("westeurope".to_string(), 1),
            ("eastus".to_string(), 1),
            ("southeastasia".to_string(), 1)
        ]
    );
    let version = sim.arm_get(&plan.version_id.to_string(), GALLERY_API).await;
    let profile = &version["properties"]["publishingProfile"];
    assert_eq!(profile["excludeFromLatest"], true);
    assert_eq!(profile["storageAccountType"], "Standard_LRS");
    let regions: Vec<(String, u64)> = profile["targetRegions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().replace(' ', "").to_ascii_lowercase(),
                r["regionalReplicaCount"].as_u64().unwrap(),
            )
        })
        .collect();
    let planned: Vec<(String, u64)> = planned.into_iter().map(|(n, r)| (n, r as u64)).collect();
    assert_eq!(regions, planned);
    let end_of_life = OffsetDateTime::parse(profile["endOfLifeDate"].as_str().unwrap(), &Rfc3339).unwrap();
    let planned_end = plan.end_of_life.expect("90d end of life");
    assert!((end_of_life - planned_end).abs() < time::Duration::seconds(1));
    assert!((planned_end - trunk.run_started - time::Duration::days(90)).abs() < time::Duration::seconds(1));
    assert_eq!(
        version["properties"]["storageProfile"]["source"]["id"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase(),
        plan.build.as_ref().unwrap().image.to_string().to_ascii_lowercase()
    );
    assert_eq!(version["tags"]["sigrun-run"], trunk.run_id.to_string());
}

#[tokio::test]
async fn gallery_publish_uses_the_planned_replica_counts_for_a_big_pool() {
    let sim = Sim::new().await;
    let spec = nightly(&[("dedicated_nodes = 400", "dedicated_nodes = 2000")]);
    let message = sim.trunk(&spec, Stage::GalleryPublish).await;
    // 2004 nodes in westeurope at 600 per replica: 4; the eastus pools' 20 nodes: 1.
    let planned: Vec<(String, u32)> = message
        .plan
        .regions
        .iter()
        .map(|r| (r.name.clone(), r.replicas))
        .collect();
    assert_eq!(
        planned,
        vec![
            ("westeurope".to_string(), 4),
            ("eastus".to_string(), 1),
            ("southeastasia".to_string(), 1)
        ]
    );
    let render = message.plan.pools.iter().find(|p| p.target == "render").unwrap();
    assert_eq!(render.resize_timeout_secs, 1800, "15 minutes per 1000 nodes");
}

#[tokio::test]
async fn gallery_publish_fails_on_a_missing_gallery_it_may_not_create() {
    let sim = Sim::new().await;
    let spec = nightly(&[("create_if_missing = true", "create_if_missing = false")]);
    let message = sim.trunk(&spec, Stage::GalleryPublish).await;
    assert!(!message.plan.create_gallery);
    let mark = sim.mark().await;
    let step = sim.drive(&message).await;
    let reason = failed(&step);
    assert!(reason.contains(&message.plan.gallery.to_string()), "{reason}");
    assert!(reason.contains("does not exist"), "{reason}");
    let log = sim.since(mark).await;
    assert!(log.iter().all(|e| e["method"] == "GET"), "nothing created: {log:?}");
    assert_eq!(sim.azure.get_gallery(&message.plan.gallery).await.unwrap(), None);
}

#[tokio::test]
async fn gallery_publish_fails_on_an_existing_specialized_definition() {
    let mut sim = Sim::new().await;
    // Planned while no definition existed; a Specialized one appears before the stage runs.
    let message = sim.trunk(NIGHTLY, Stage::GalleryPublish).await;
    let plan = &message.plan;
    sim.arm_put(
        &plan.gallery.to_string(),
        GALLERY_API,
        &json!({"location": "westeurope", "properties": {}}),
    )
    .await;
    sim.advance(60.0).await;
    sim.arm_put(
        &plan.definition.to_string(),
        GALLERY_API,
        &json!({"location": "westeurope", "properties": {
            "osType": "Linux", "osState": "Specialized", "hyperVGeneration": "V2",
            "identifier": {"publisher": "contoso", "offer": "ubuntu-batch", "sku": "22.04"}}}),
    )
    .await;
    sim.advance(60.0).await;

    let mark = sim.mark().await;
    let step = sim.drive(&message).await;
    let reason = failed(&step);
    assert!(reason.contains("Specialized"), "{reason}");
    assert!(reason.contains("Generalized"), "{reason}");
    assert!(reason.contains(&plan.definition.to_string()), "{reason}");
    let log = sim.since(mark).await;
    assert!(log.iter().all(|e| e["method"] == "GET"), "no version PUT: {log:?}");
}

#[tokio::test]
async fn gallery_publish_registers_microsoft_batch_for_a_gallery_in_another_subscription() {
    let mut sim = Sim::new().await;
    let shared = format!(
        "id = \"/subscriptions/{SUB_SHARED}/resourceGroups/rg-shared/providers/Microsoft.Compute/galleries/sigrun_images\""
    );
    let spec = nightly(&[(GALLERY_LINE, &shared)]);
    let trunk = sim.trunk(&spec, Stage::Snapshot).await;
    assert_eq!(trunk.plan.register_batch_in, vec![SUB_SHARED.to_string()]);
    assert!(
        trunk.plan.warnings.iter().any(|w| w.contains("Microsoft.Batch")),
        "{:?}",
        trunk.plan.warnings
    );
    let mut message = trunk.clone();
    for _ in 0..2 {
        let steps = sim.settle(&message, 300.0).await;
        message = only_advanced(steps.last().unwrap()).clone();
    }
    // Gallery and definition in the shared subscription.
    for what in ["gallery", "definition"] {
        let step = sim.drive(&message).await;
        let (waiting, _, _) = waited(&step);
        assert_eq!(waiting.operation.as_ref().unwrap().what.as_str(), what);
        message = waiting.clone();
        sim.advance(60.0).await;
    }

    // Not registered: register, then wait; while it registers, wait without asking again.
    assert_eq!(
        sim.azure
            .provider_state(SUB_SHARED, "Microsoft.Batch")
            .await
            .unwrap()
            .as_str(),
        "NotRegistered"
    );
    let mark = sim.mark().await;
    let step = sim.drive(&message).await;
    let (waiting, delay, _) = waited(&step);
    assert_eq!(waiting.operation.as_ref().unwrap().what.as_str(), "registration");
    assert_eq!(delay, sim.settings.default_poll());
    assert!(step.events.contains(&EventKind::Waiting {
        what: "registration".into()
    }));
    let step = sim.drive(waiting).await;
    let (waiting, _, _) = waited(&step);
    assert_eq!(waiting.operation.as_ref().unwrap().what.as_str(), "registration");
    let log = sim.since(mark).await;
    let registers: Vec<&Value> = log
        .iter()
        .filter(|e| e["method"] == "POST" && e["path"].as_str().unwrap().ends_with("/Microsoft.Batch/register"))
        .collect();
    assert_eq!(registers.len(), 1, "registered once: {log:?}");
    assert!(registers[0]["path"].as_str().unwrap().contains(SUB_SHARED));
    assert!(
        log.iter().all(|e| !e["path"].as_str().unwrap().contains("/versions/")),
        "no version before Microsoft.Batch is registered"
    );

    // Registered: the version goes out.
    sim.advance(120.0).await;
    assert_eq!(
        sim.azure
            .provider_state(SUB_SHARED, "Microsoft.Batch")
            .await
            .unwrap()
            .as_str(),
        "Registered"
    );
    let step = sim.drive(waiting).await;
    let next = only_advanced(&step);
    assert_eq!(next.stage, Stage::Replicate);
    assert!(next.plan.version_id.to_string().contains(SUB_SHARED));
    let version = sim
        .azure
        .get_version(&next.plan.version_id, false)
        .await
        .unwrap()
        .unwrap();
    assert!(version.exclude_from_latest);
}

// ---------------------------------------------------------------------------------------------
// replicate

/// A run published to `replicate`: the replicate message, right after the version PUT.
async fn at_replicate(sim: &mut Sim, spec: &str) -> Envelope {
    let mut message = sim.trunk(spec, Stage::Snapshot).await;
    for _ in 0..3 {
        let steps = sim.settle(&message, 120.0).await;
        message = only_advanced(steps.last().unwrap()).clone();
    }
    assert_eq!(message.stage, Stage::Replicate);
    message
}

#[tokio::test]
async fn replicate_starts_a_regions_pools_the_moment_its_replica_completes() {
    let mut sim = Sim::new().await;
    let message = at_replicate(&mut sim, NIGHTLY).await;
    let version_id = message.plan.version_id.clone();

    // At once: westeurope (the source region) replicates, the others have not started.
    let step = sim.drive(&message).await;
    let (first_wait, delay, emit) = waited(&step);
    assert!(emit.is_empty());
    assert_eq!(first_wait.operation.as_ref().unwrap().what.as_str(), "replication");
    assert_eq!(delay, sim.settings.default_poll(), "nothing to estimate from yet");
    assert_eq!(
        step.events,
        vec![EventKind::Waiting {
            what: "replication".into()
        }]
    );
    let mut waiting = first_wait.clone();

    // Find the moment westeurope completes by reading Azure (not the stage) in 2 s hops: the other
    // regions start then, so they have just begun (0%) when the stage next looks.
    let mut found = false;
    for _ in 0..1000 {
        sim.advance(2.0).await;
        let info = sim.azure.get_version(&version_id, true).await.unwrap().unwrap();
        if info
            .replication
            .iter()
            .any(|r| r.region == "westeurope" && r.state.as_str() == "Completed")
        {
            found = true;
            break;
        }
    }
    assert!(found, "westeurope never completed");
    let reading1 = sim.azure.get_version(&version_id, true).await.unwrap().unwrap();
    let t1 = sim.now;
    for region in ["eastus", "southeastasia"] {
        let status = reading1.replication.iter().find(|r| r.region == region).unwrap();
        assert_eq!(
            status.state.as_str(),
            "Replicating",
            "{region} starts when the source region is done"
        );
    }

    // The westeurope pools start now, and only they; the others still replicate.
    let step = sim.drive(&waiting).await;
    let (next, delay, emit) = waited(&step);
    assert_eq!(
        branches(emit),
        vec![pair("westeurope", "render"), pair("westeurope", "tools")]
    );
    assert!(
        emit.iter()
            .all(|m| m.stage == Stage::PoolCreate && m.operation.is_none())
    );
    assert!(emit.iter().all(|m| m.run_id == message.run_id));
    assert_eq!(
        step.events,
        vec![EventKind::RegionCompleted {
            region: "westeurope".into()
        }]
    );
    assert_eq!(next.artifacts.regions_completed, vec!["westeurope".to_string()]);
    assert_eq!(
        delay,
        sim.settings.default_poll(),
        "one reading per replicating region: no estimate yet"
    );
    waiting = next.clone();

    // A second reading: the next look is the latest time to completion the two readings allow,
    // not the default poll.
    sim.advance(100.0).await;
    let reading2 = sim.azure.get_version(&version_id, true).await.unwrap().unwrap();
    let elapsed = (sim.now - t1).as_seconds_f64();
    let eta = ["eastus", "southeastasia"]
        .iter()
        .map(|region| {
            let p1 = reading1
                .replication
                .iter()
                .find(|r| r.region == *region)
                .unwrap()
                .progress as f64;
            let p2 = reading2
                .replication
                .iter()
                .find(|r| r.region == *region)
                .unwrap()
                .progress as f64;
            assert!(p2 >= p1 + 2.0, "{region} progressed two points or more: {p1} → {p2}");
            // The latest end the floored readings allow: one point fewer gained than they show.
            (100.0 - p2) * elapsed / (p2 - p1 - 1.0)
        })
        .fold(f64::INFINITY, f64::min);
    let step = sim.drive(&waiting).await;
    let (next, delay, emit) = waited(&step);
    assert!(emit.is_empty());
    assert!(step.events.is_empty());
    let expected = sim.settings.clamp(Duration::from_secs_f64(eta));
    assert!(
        delay.abs_diff(expected) < Duration::from_millis(5),
        "delay {delay:?}, estimate {expected:?}"
    );
    assert_ne!(delay, sim.settings.default_poll());
    waiting = next.clone();

    // Long enough for both: the last look hands on the eastus pool and ends the trunk.
    sim.advance(3600.0).await;
    let step = sim.drive(&waiting).await;
    let rest = advanced(&step);
    assert_eq!(branches(rest), vec![pair("eastus", "sim")]);
    let mut completed: Vec<String> = step
        .events
        .iter()
        .filter_map(|e| match e {
            EventKind::RegionCompleted { region } => Some(region.clone()),
            EventKind::CleanUpScheduled {
                what: Intermediate::Image,
            } => None,
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    completed.sort();
    assert_eq!(completed, vec!["eastus".to_string(), "southeastasia".to_string()]);
    // Every region has ended: the image is no longer needed and its clean-up goes out beside.
    let clean_up = rest.iter().find(|m| matches!(m.branch, Branch::CleanUp { .. }));
    assert!(
        clean_up.is_some_and(|m| m.stage == Stage::Replicate),
        "the image's clean-up: {rest:?}"
    );
    assert!(step.events.contains(&EventKind::CleanUpScheduled {
        what: Intermediate::Image
    }));

    // A replay of the finished replicate step starts every pool again (pool-create tells them apart).
    let step = sim.drive(&waiting).await;
    assert_eq!(branches(advanced(&step)), vec![pair("eastus", "sim")]);
    let step = sim.drive(&message).await;
    assert_eq!(
        branches(advanced(&step)),
        vec![
            pair("eastus", "sim"),
            pair("westeurope", "render"),
            pair("westeurope", "tools")
        ]
    );
}

#[tokio::test]
async fn replicate_removes_a_failed_region_and_adds_it_back() {
    let mut sim = Sim::with_faults("replication-fail:region=eastus,times=1").await;
    let message = at_replicate(&mut sim, NIGHTLY).await;
    let version_id = message.plan.version_id.clone();
    let version_path = format!("/versions/{}", version_id.name());

    let mut waiting = message.clone();
    let mut steps = Vec::new();
    let mut mark = sim.mark().await;
    let mut retried_at = None;
    for i in 0..200 {
        let step = sim.drive(&waiting).await;
        if step.events.iter().any(|e| matches!(e, EventKind::Retried { .. })) {
            retried_at = Some(i);
            let log = sim.since(mark).await;
            let patches: Vec<&Value> = log.iter().filter(|e| is_put_or_patch_of(e, &version_path)).collect();
            assert_eq!(patches.len(), 1, "the region is removed: {log:?}");
            assert_eq!(patches[0]["method"], "PATCH");
            let info = sim.azure.get_version(&version_id, false).await.unwrap().unwrap();
            let regions: Vec<&str> = info.target_regions.iter().map(|(r, _)| r.as_str()).collect();
            assert_eq!(regions, vec!["westeurope", "southeastasia"]);
            let (next, _, _) = waited(&step);
            assert_eq!(next.artifacts.regions_to_readd, vec!["eastus".to_string()]);
            assert_eq!(next.artifacts.region_retries.get("eastus"), Some(&1));
            let EventKind::Retried { attempt, error } = step
                .events
                .iter()
                .find(|e| matches!(e, EventKind::Retried { .. }))
                .unwrap()
            else {
                unreachable!()
            };
            assert_eq!(*attempt, 1);
            assert!(error.contains("eastus"), "{error}");
            mark = sim.mark().await;
        }
        if retried_at.is_some_and(|r| r + 1 == i) {
            // The next look (the removal has settled) adds eastus back.
            let log = sim.since(mark).await;
            let patches: Vec<&Value> = log.iter().filter(|e| is_put_or_patch_of(e, &version_path)).collect();
            assert_eq!(patches.len(), 1, "the region is added back: {log:?}");
            let info = sim.azure.get_version(&version_id, false).await.unwrap().unwrap();
            let regions: Vec<&str> = info.target_regions.iter().map(|(r, _)| r.as_str()).collect();
            assert_eq!(regions, vec!["westeurope", "eastus", "southeastasia"]);
            assert!(waited(&step).0.artifacts.regions_to_readd.is_empty());
        }
        let next = match &step.outcome {
            Outcome::Wait { message, .. } => Some((**message).clone()),
            _ => None,
        };
        steps.push(step);
        match next {
            Some(next) => {
                waiting = next;
                sim.advance(60.0).await;
            }
            None => break,
        }
    }
    assert!(retried_at.is_some(), "eastus failed once and was retried");
    let events = all_events(&steps);
    assert!(
        !events.iter().any(|e| matches!(e, EventKind::RegionFailed { .. })),
        "{events:?}"
    );
    let retried = events.iter().filter(|e| matches!(e, EventKind::Retried { .. })).count();
    assert_eq!(retried, 1);
    assert!(events.contains(&&EventKind::RegionCompleted {
        region: "eastus".into()
    }));
    assert!(matches!(
        steps.last().unwrap().outcome,
        Outcome::Advance(_) | Outcome::Done
    ));
    assert_eq!(
        branches(&pool_messages(&steps)),
        vec![
            pair("eastus", "sim"),
            pair("westeurope", "render"),
            pair("westeurope", "tools")
        ]
    );
    let info = sim.azure.get_version(&version_id, true).await.unwrap().unwrap();
    assert!(
        info.replication.iter().all(|r| r.state.as_str() == "Completed"),
        "{info:?}"
    );
}

/// The version's target regions, as Azure holds them now.
async fn target_region_names(sim: &Sim, message: &Envelope) -> Vec<String> {
    let info = sim
        .azure
        .get_version(&message.plan.version_id, false)
        .await
        .unwrap()
        .unwrap();
    info.target_regions.iter().map(|(r, _)| r.clone()).collect()
}

#[tokio::test]
async fn replicate_gives_every_region_failing_in_one_look_its_own_retry() {
    let mut sim =
        Sim::with_faults("replication-fail:region=eastus,times=1;replication-fail:region=southeastasia,times=1").await;
    let message = at_replicate(&mut sim, NIGHTLY).await;
    let version_path = format!("/versions/{}", message.plan.version_id.name());
    // Long enough for the source region to finish and both others to replicate far enough to fail.
    sim.advance(3000.0).await;
    let mark = sim.mark().await;
    let first = sim.drive(&message).await;
    let writes: Vec<Value> = sim
        .since(mark)
        .await
        .into_iter()
        .filter(|e| is_put_or_patch_of(e, &version_path))
        .collect();
    assert_eq!(
        writes.len(),
        1,
        "both failed regions are removed in one write: {writes:?}"
    );
    assert_eq!(target_region_names(&sim, &message).await, vec!["westeurope"]);
    let (waiting, _, _) = waited(&first);
    assert_eq!(
        waiting.artifacts.regions_to_readd,
        vec!["eastus".to_string(), "southeastasia".to_string()]
    );
    assert_eq!(waiting.artifacts.region_retries.get("eastus"), Some(&1));
    assert_eq!(waiting.artifacts.region_retries.get("southeastasia"), Some(&1));
    let mut steps = vec![first.clone()];
    steps.extend(sim.settle(&waiting.clone(), 60.0).await);
    let events = all_events(&steps);
    let retried = events.iter().filter(|e| matches!(e, EventKind::Retried { .. })).count();
    assert_eq!(retried, 2, "one retry per failed region: {events:?}");
    assert!(
        !events.iter().any(|e| matches!(e, EventKind::RegionFailed { .. })),
        "{events:?}"
    );
    let info = sim
        .azure
        .get_version(&message.plan.version_id, true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.replication.len(), 3, "{info:?}");
    assert!(
        info.replication.iter().all(|r| r.state.as_str() == "Completed"),
        "{info:?}"
    );
    assert_eq!(
        branches(&pool_messages(&steps)),
        vec![
            pair("eastus", "sim"),
            pair("westeurope", "render"),
            pair("westeurope", "tools")
        ]
    );
}

#[tokio::test]
async fn replicate_never_puts_back_a_region_that_failed_for_good() {
    let mut sim = Sim::with_faults("replication-fail:region=southeastasia,times=1").await;
    let mut message = at_replicate(&mut sim, NIGHTLY).await;
    // eastus failed for good on an earlier look (its retries used up).
    message
        .artifacts
        .regions_failed
        .insert("eastus".into(), "replication failed: ReplicationFailed".into());
    message.artifacts.region_retries.insert("eastus".into(), 1);
    sim.advance(3000.0).await;
    let mut waiting = message;
    let mut seen_removal = false;
    let mut steps = Vec::new();
    for _ in 0..200 {
        let step = sim.drive(&waiting).await;
        let regions = target_region_names(&sim, &waiting).await;
        if !regions.contains(&"southeastasia".to_string()) {
            seen_removal = true;
            assert_eq!(
                regions,
                vec!["westeurope"],
                "the failing region and the failed one are out"
            );
        }
        if seen_removal {
            assert!(
                !regions.contains(&"eastus".to_string()),
                "eastus failed for good and must never be put back: {regions:?}"
            );
        }
        let next = match &step.outcome {
            Outcome::Wait { message, .. } => Some((**message).clone()),
            _ => None,
        };
        steps.push(step);
        match next {
            Some(next) => {
                waiting = next;
                sim.advance(60.0).await;
            }
            None => break,
        }
    }
    assert!(seen_removal, "southeastasia failed once and was removed");
    assert_eq!(
        target_region_names(&sim, &waiting).await,
        vec!["westeurope", "southeastasia"],
        "southeastasia came back, eastus did not"
    );
    let events = all_events(&steps);
    assert!(events.contains(&&EventKind::RegionCompleted {
        region: "southeastasia".into()
    }));
    assert!(
        !events.iter().any(|e| matches!(e, EventKind::RegionFailed { .. })),
        "eastus had failed before; nothing new failed: {events:?}"
    );
}

#[tokio::test]
async fn replicate_counts_a_region_failed_after_its_retries_and_skips_its_pools() {
    let mut sim = Sim::with_faults("replication-fail:region=eastus").await;
    assert_eq!(sim.settings.region_retries, 1);
    let message = at_replicate(&mut sim, NIGHTLY).await;
    let steps = sim.settle(&message, 60.0).await;
    let events = all_events(&steps);
    let retried = events.iter().filter(|e| matches!(e, EventKind::Retried { .. })).count();
    assert_eq!(retried, 1, "removed and added back once: {events:?}");
    let failures: Vec<&&EventKind> = events
        .iter()
        .filter(|e| matches!(e, EventKind::RegionFailed { .. }))
        .collect();
    assert_eq!(failures.len(), 1, "{events:?}");
    let EventKind::RegionFailed { region, reason } = failures[0] else {
        unreachable!()
    };
    assert_eq!(region, "eastus");
    assert!(reason.contains("replication failed"), "{reason}");
    // No pool for eastus, ever; the westeurope pools did start.
    assert_eq!(
        branches(&pool_messages(&steps)),
        vec![pair("westeurope", "render"), pair("westeurope", "tools")]
    );
    assert!(matches!(
        steps.last().unwrap().outcome,
        Outcome::Done | Outcome::Advance(_)
    ));
    let last_wait = steps.iter().rev().find_map(|s| match &s.outcome {
        Outcome::Wait { message, .. } if message.artifacts.regions_failed.contains_key("eastus") => Some(message),
        _ => None,
    });
    if let Some(message) = last_wait {
        assert!(message.artifacts.regions_failed["eastus"].contains("replication failed"));
    }
}

// ---------------------------------------------------------------------------------------------
// pool-create

#[tokio::test]
async fn pool_create_adds_the_pool_with_sigrun_metadata_and_recognises_its_own_on_replay() {
    let mut sim = Sim::new().await;
    let trunk = sim.trunk(NIGHTLY, Stage::Snapshot).await;
    let pools = sim.publish(&trunk).await;
    let render = pools.iter().find(|m| branch_of(m).1 == "render").unwrap().clone();
    let planned = trunk.plan.pools.iter().find(|p| p.target == "render").unwrap().clone();
    assert_eq!(planned.pool_id, "nightly-ubuntu-render-2026-1126-0");

    let mark = sim.mark().await;
    let step = sim.drive(&render).await;
    let next = only_advanced(&step);
    assert_eq!(next.stage, Stage::Verify);
    assert_eq!(next.branch, render.branch);
    let artifact = next.artifacts.pool.clone().expect("the pool artifact");
    assert_eq!(artifact.pool_id, planned.pool_id);
    assert_eq!(artifact.account, planned.account);
    assert_eq!(artifact.account_url, sim.emu.batch_url("sigrunweu"));
    assert_eq!(artifact.created, sim.now);
    assert_eq!(
        step.events,
        vec![EventKind::PoolCreated {
            pool_id: planned.pool_id.clone()
        }]
    );
    assert_eq!(statuses(&sim.since(mark).await, "POST", "/pools"), vec![201]);

    // The pool as Batch has it: the image version, the planned SKU and timeout, sigrun's metadata.
    let pool = sim.pool("sigrunweu", &planned.pool_id).await.expect("the pool exists");
    let metadata: BTreeMap<String, String> = pool["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(metadata["sigrun-run"], trunk.run_id.to_string());
    assert_eq!(metadata["sigrun-pipeline"], "nightly-ubuntu");
    assert_eq!(metadata["sigrun-target"], "render");
    assert_eq!(metadata["sigrun-version"], VERSION);
    assert_eq!(metadata["team"], "render");
    let config = &pool["virtualMachineConfiguration"];
    assert_eq!(
        config["imageReference"]["virtualMachineImageId"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase(),
        trunk.plan.version_id.to_string().to_ascii_lowercase()
    );
    assert_eq!(config["nodeAgentSKUId"], "batch.node.ubuntu 22.04");
    assert_eq!(pool["targetDedicatedNodes"], 400);
    assert_eq!(pool["taskSlotsPerNode"], 4);
    assert_eq!(pool["startTask"]["waitForSuccess"], true);

    // Replayed: Batch says PoolExists, the metadata says it is this run's: on to verify, no second
    // pool (this admission made it, so it is recorded again: only one copy's record stands).
    let before = sim.inventory().await;
    let mark = sim.mark().await;
    let step = sim.drive(&render).await;
    let next = only_advanced(&step);
    assert_eq!(next.stage, Stage::Verify);
    assert_eq!(next.artifacts.pool.as_ref().unwrap().pool_id, planned.pool_id);
    assert_eq!(event_names(&step), vec!["pool_created"]);
    // A later run of the version (another admission) finds it and records nothing.
    let mut later = render.clone();
    later.admission = Uuid::new_v4();
    assert!(sim.drive(&later).await.events.is_empty());
    assert_eq!(statuses(&sim.since(mark).await, "POST", "/pools"), vec![409, 409]);
    assert_eq!(sim.inventory().await, before);
}

#[tokio::test]
async fn pool_create_never_takes_over_a_pool_it_did_not_create() {
    let sim = Sim::new().await;
    let trunk = sim.trunk(NIGHTLY, Stage::Snapshot).await;
    let message = Sim::pool_message(&trunk, "tools", sim.now);
    let pool_id = trunk
        .plan
        .pools
        .iter()
        .find(|p| p.target == "tools")
        .unwrap()
        .pool_id
        .clone();
    // Someone else's pool under the same id — even one that names the pipeline and target.
    sim.add_marketplace_pool(
        "sigrunweu",
        &pool_id,
        2,
        &[
            ("sigrun-pipeline", "nightly-ubuntu"),
            ("sigrun-target", "tools"),
            ("sigrun-run", "someone-else"),
        ],
    )
    .await;

    let step = sim.drive(&message).await;
    let reason = failed(&step);
    assert!(reason.contains("never takes over"), "{reason}");
    assert!(reason.contains(&pool_id), "{reason}");
    let pool = sim.pool("sigrunweu", &pool_id).await.expect("still there");
    assert_eq!(pool["vmSize"], "Standard_D2s_v5");
    assert_eq!(pool["targetDedicatedNodes"], 2);
    assert!(pool["virtualMachineConfiguration"]["imageReference"]["virtualMachineImageId"].is_null());
}

// ---------------------------------------------------------------------------------------------
// verify

/// A published run with its pool-create messages, and the named pool created: its verify message.
async fn verifying(sim: &mut Sim, spec: &str, target: &str) -> (Envelope, Vec<Envelope>) {
    let trunk = sim.trunk(spec, Stage::Snapshot).await;
    verifying_trunk(sim, trunk, target).await
}

async fn verifying_trunk(sim: &mut Sim, trunk: Envelope, target: &str) -> (Envelope, Vec<Envelope>) {
    let pools = sim.publish(&trunk).await;
    let message = pools.iter().find(|m| branch_of(m).1 == target).unwrap().clone();
    let step = sim.drive(&message).await;
    (only_advanced(&step).clone(), pools)
}

/// A verdict reads the version before flipping it unless the run can say: a version this
/// admission made is excluded while the history holds no `Promoted` (flipped without a read), and
/// once the history holds one, a later verdict neither reads nor writes. A version the message
/// does not say its admission made may have been promoted where this history cannot see: read.
#[tokio::test]
async fn a_later_verdict_knows_the_promotion_from_the_runs_history() {
    let mut sim = Sim::new().await;
    let (message, pools) = verifying(&mut sim, NIGHTLY, "render").await;
    let version_path = format!("/versions/{}", message.plan.version_id.name());
    let reads_and_writes = |log: &[Value]| {
        let of_version = |e: &&Value| e["path"].as_str().is_some_and(|p| p.ends_with(&version_path));
        let reads = log.iter().filter(of_version).filter(|e| e["method"] == "GET").count();
        let writes = log.iter().filter(|e| is_put_or_patch_of(e, &version_path)).count();
        (reads, writes)
    };

    let version = message.plan.version_id.to_string();
    assert!(
        message.artifacts.recorded.contains(&version),
        "this admission made the version"
    );

    // This admission made it and the history holds no `Promoted`: promoted without a read.
    *sim.live_runs.1.lock().unwrap() = Some(false);
    assert!(!sim.is_latest(&message.plan.version_id).await, "published excluded");
    let mark = sim.mark().await;
    let steps = sim.settle(&message, 60.0).await;
    assert_eq!(event_names(&steps[steps.len() - 2]), vec!["pool_verified", "promoted"]);
    assert_eq!(
        reads_and_writes(&sim.since(mark).await),
        (0, 1),
        "a PATCH without a read"
    );
    assert!(sim.is_latest(&message.plan.version_id).await, "promoted to latest");

    // A version the message does not say this admission made (an earlier admission's, the same
    // version run again): Azure is asked, and finds it latest already.
    let tools = pools.iter().find(|m| branch_of(m).1 == "tools").unwrap();
    let mut verify = only_advanced(&sim.drive(tools).await).clone();
    verify.artifacts.recorded.retain(|id| *id != version);
    let mark = sim.mark().await;
    let steps = sim.settle(&verify, 60.0).await;
    assert_eq!(event_names(&steps[steps.len() - 2]), vec!["pool_verified"]);
    assert_eq!(reads_and_writes(&sim.since(mark).await), (1, 0), "one read, no PATCH");

    // The history holds another pool's `Promoted`: neither read nor PATCH.
    *sim.live_runs.1.lock().unwrap() = Some(true);
    let mark = sim.mark().await;
    let steps = sim.settle(&verify, 60.0).await;
    assert_eq!(event_names(&steps[steps.len() - 2]), vec!["pool_verified"]);
    assert_eq!(
        reads_and_writes(&sim.since(mark).await),
        (0, 0),
        "neither read nor PATCH"
    );
}

#[tokio::test]
async fn verify_waits_for_allocation_then_promotes_once_and_scales_the_previous_pool_to_zero() {
    let mut sim = Sim::new().await;
    // Last night's render pool (sigrun's, same pipeline and target) and a look-alike made by hand.
    let previous = "nightly-ubuntu-render-2026-1125-0";
    let manual = "nightly-ubuntu-render-2026-1125-0-manual";
    sim.add_marketplace_pool(
        "sigrunweu",
        previous,
        3,
        &[
            ("sigrun-pipeline", "nightly-ubuntu"),
            ("sigrun-target", "render"),
            ("sigrun-version", "2026.1125.0"),
            ("sigrun-run", &Uuid::new_v4().to_string()),
        ],
    )
    .await;
    sim.add_marketplace_pool("sigrunweu", manual, 2, &[("team", "render")])
        .await;

    let (message, pools) = verifying(&mut sim, NIGHTLY, "render").await;
    assert_eq!(message.stage, Stage::Verify);
    let pool_id = message.artifacts.pool.as_ref().unwrap().pool_id.clone();

    // Resizing: the next look at the documented 15 minutes per 1000 nodes (plus the first minute).
    let step = sim.drive(&message).await;
    let (waiting, delay, _) = waited(&step);
    assert_eq!(waiting.operation.as_ref().unwrap().what.as_str(), "allocation");
    assert_eq!(delay, Duration::from_secs(60 + 400 * 900 / 1000));
    assert_eq!(
        step.events,
        vec![EventKind::Waiting {
            what: "allocation".into()
        }]
    );
    sim.advance(200.0).await;
    let step = sim.drive(waiting).await;
    let (waiting, delay, _) = waited(&step);
    assert_eq!(delay, Duration::from_secs(220), "what is left of the estimate");
    assert!(step.events.is_empty());

    // Until the nodes are idle: verified and promoted; then, in the rollout phase, last night's
    // pool scaled to zero.
    let mark = sim.mark().await;
    let steps = sim.settle(waiting, 60.0).await;
    let done = steps.last().unwrap();
    assert_eq!(kind(&done.outcome), "done", "{:?}", done.outcome);
    let verified = &steps[steps.len() - 2];
    let version_id = message.plan.version_id.to_string();
    assert_eq!(
        verified.events,
        vec![
            EventKind::PoolVerified {
                pool_id: pool_id.clone()
            },
            EventKind::Promoted {
                version_id: version_id.clone()
            },
        ]
    );
    assert_eq!(
        done.events,
        vec![
            EventKind::PreviousPoolRetired {
                pool_id: previous.into(),
                action: "scaled to zero".into()
            },
            EventKind::RolloutFinished,
        ]
    );
    assert!(sim.is_latest(&message.plan.version_id).await, "promoted to latest");
    let log = sim.since(mark).await;
    let version_path = format!("/versions/{}", message.plan.version_id.name());
    let patches: Vec<&Value> = log.iter().filter(|e| is_put_or_patch_of(e, &version_path)).collect();
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0]["method"], "PATCH");
    let resizes: Vec<&Value> = log
        .iter()
        .filter(|e| e["method"] == "POST" && e["path"].as_str().unwrap().ends_with("/resize"))
        .collect();
    assert_eq!(resizes.len(), 1, "{log:?}");
    assert!(resizes[0]["path"].as_str().unwrap().contains(previous));
    let old = sim.pool("sigrunweu", previous).await.unwrap();
    assert_eq!(old["targetDedicatedNodes"], 0);
    let untouched = sim.pool("sigrunweu", manual).await.unwrap();
    assert_eq!(untouched["targetDedicatedNodes"], 2);
    assert_eq!(untouched["state"], "active");
    let ours = sim.pool("sigrunweu", &pool_id).await.unwrap();
    assert_eq!(ours["targetDedicatedNodes"], 400);

    // The second westeurope pool verifies: the version is already latest, so no second PATCH.
    let tools = pools.iter().find(|m| branch_of(m).1 == "tools").unwrap();
    let step = sim.drive(tools).await;
    let verify = only_advanced(&step).clone();
    let mark = sim.mark().await;
    let steps = sim.settle(&verify, 60.0).await;
    let done = steps.last().unwrap();
    assert_eq!(kind(&done.outcome), "done", "{:?}", done.outcome);
    assert_eq!(
        event_names(&steps[steps.len() - 2]),
        vec!["pool_verified"],
        "no promotion: {:?}",
        steps[steps.len() - 2].events
    );
    assert_eq!(
        event_names(done),
        vec!["rollout_finished"],
        "no other target's pool: {:?}",
        done.events
    );
    let log = sim.since(mark).await;
    assert!(
        !log.iter().any(|e| is_put_or_patch_of(e, &version_path)),
        "no second PATCH: {log:?}"
    );
    assert!(
        !log.iter()
            .any(|e| e["method"] == "POST" && e["path"].as_str().unwrap().ends_with("/resize"))
    );
    assert_eq!(sim.pool("sigrunweu", manual).await.unwrap()["targetDedicatedNodes"], 2);
}

#[tokio::test]
async fn verify_deletes_the_previous_pool_under_the_delete_policy() {
    let mut sim = Sim::new().await;
    let previous = "nightly-ubuntu-tools-2026-1125-0";
    let manual = "nightly-ubuntu-tools-2026-1125-0-old";
    sim.add_marketplace_pool(
        "sigrunweu",
        previous,
        1,
        &[
            ("sigrun-pipeline", "nightly-ubuntu"),
            ("sigrun-target", "tools"),
            ("sigrun-version", "2026.1125.0"),
            ("sigrun-run", &Uuid::new_v4().to_string()),
        ],
    )
    .await;
    // Same target, another pipeline's: not ours to retire.
    sim.add_marketplace_pool(
        "sigrunweu",
        manual,
        1,
        &[("sigrun-pipeline", "nightly-windows"), ("sigrun-target", "tools")],
    )
    .await;
    let spec = nightly(&[("previous_pool = \"scale_to_zero\"", "previous_pool = \"delete\"")]);
    let (message, _) = verifying(&mut sim, &spec, "tools").await;
    let steps = sim.settle(&message, 60.0).await;
    let done = steps.last().unwrap();
    assert_eq!(kind(&done.outcome), "done", "{:?}", done.outcome);
    assert!(done.events.contains(&EventKind::PreviousPoolRetired {
        pool_id: previous.into(),
        action: "deleted".into()
    }));
    assert_eq!(
        done.events
            .iter()
            .filter(|e| matches!(e, EventKind::PreviousPoolRetired { .. }))
            .count(),
        1
    );
    match sim.pool("sigrunweu", previous).await {
        None => {}
        Some(pool) => assert_eq!(pool["state"], "deleting"),
    }
    assert_eq!(sim.pool("sigrunweu", manual).await.unwrap()["state"], "active");
}

/// A pool this pipeline made for `target`, as a run of `version` would have (run `run`).
async fn previous_pool(sim: &Sim, id: &str, target: &str, version: &str, run: Uuid) {
    let run = run.to_string();
    let metadata = [
        ("sigrun-pipeline", "nightly-ubuntu"),
        ("sigrun-target", target),
        ("sigrun-version", version),
        ("sigrun-run", run.as_str()),
    ];
    sim.add_marketplace_pool("sigrunweu", id, 2, &metadata).await;
}

#[tokio::test]
async fn rollout_retires_only_older_versions_whose_runs_ended_and_waits_for_a_resizing_one() {
    let mut sim = Sim::new().await;
    // Tonight's run publishes 2026.1126.0. Around it: a newer run's pool (made earlier, newer
    // version), an older pool a live run is still verifying, an older pool still resizing, and an
    // older pool of a run that ended.
    let (newer, live, resizing, ended) = (
        "nightly-ubuntu-render-2026-1127-0",
        "nightly-ubuntu-render-2026-1125-0",
        "nightly-ubuntu-render-2026-1124-0",
        "nightly-ubuntu-render-2026-1123-0",
    );
    let live_run = Uuid::new_v4();
    sim.live_runs.0.lock().unwrap().push(live_run);
    previous_pool(&sim, newer, "render", "2026.1127.0", Uuid::new_v4()).await;
    previous_pool(&sim, live, "render", "2026.1125.0", live_run).await;
    previous_pool(&sim, resizing, "render", "2026.1124.0", Uuid::new_v4()).await;
    previous_pool(&sim, ended, "render", "2026.1123.0", Uuid::new_v4()).await;
    let (message, _) = verifying(&mut sim, NIGHTLY, "render").await;
    let mut steps = Vec::new();
    let mut waiting = message.clone();
    // Verify until the pool verified: the next message is in the rollout phase.
    loop {
        let step = sim.drive(&waiting).await;
        let next = waited(&step).0.clone();
        let verified = step.events.iter().any(|e| matches!(e, EventKind::PoolVerified { .. }));
        steps.push(step);
        waiting = next;
        if verified {
            break;
        }
        sim.advance(60.0).await;
    }
    assert_eq!(waiting.operation.as_ref().unwrap().what.as_str(), "retire");
    // The older pool is resizing again when the rollout looks.
    sim.resize("sigrunweu", resizing, 40).await;
    let look = sim.drive(&waiting).await;
    assert_eq!(
        look.events,
        vec![EventKind::PreviousPoolRetired {
            pool_id: ended.into(),
            action: "scaled to zero".into()
        }]
    );
    let (next, delay, _) = waited(&look);
    assert_eq!(delay, sim.settings.default_poll(), "looks again for the resizing pool");
    sim.advance(1800.0).await;
    let last = sim.drive(next).await;
    assert_eq!(kind(&last.outcome), "done");
    assert_eq!(
        last.events,
        vec![
            EventKind::PreviousPoolRetired {
                pool_id: resizing.into(),
                action: "scaled to zero".into()
            },
            EventKind::RolloutFinished
        ]
    );
    for (pool, nodes) in [(newer, 2), (live, 2), (resizing, 0), (ended, 0)] {
        let found = sim.pool("sigrunweu", pool).await.unwrap();
        assert_eq!(found["targetDedicatedNodes"], nodes, "{pool}");
    }
}

#[tokio::test]
async fn rollout_failures_are_retried_then_reported_without_failing_the_branch() {
    let mut sim = Sim::with_faults("500:api=batch,method=POST,path=/resize").await;
    let previous = "nightly-ubuntu-render-2026-1125-0";
    previous_pool(&sim, previous, "render", "2026.1125.0", Uuid::new_v4()).await;
    let (message, _) = verifying(&mut sim, NIGHTLY, "render").await;
    let steps = sim.settle(&message, 60.0).await;
    let done = steps.last().unwrap();
    assert_eq!(kind(&done.outcome), "done", "the branch ends well: {:?}", done.outcome);
    let events = all_events(&steps);
    let retried = events
        .iter()
        .filter(|e| matches!(e, EventKind::Retried { error, .. } if error.contains("retiring previous pools")))
        .count();
    assert_eq!(retried, 4, "{events:?}");
    assert!(
        matches!(&done.events[..], [EventKind::RetirementFailed { reason }, EventKind::RolloutFinished] if reason.contains("500")),
        "{:?}",
        done.events
    );
    assert!(events.iter().any(|e| matches!(e, EventKind::PoolVerified { .. })));
    assert!(!events.iter().any(|e| matches!(e, EventKind::PoolFailed { .. })));
    assert_eq!(
        sim.pool("sigrunweu", previous).await.unwrap()["targetDedicatedNodes"],
        2
    );
}

#[tokio::test]
async fn verify_keeps_the_previous_pool_under_the_keep_policy() {
    let mut sim = Sim::new().await;
    let previous = "nightly-ubuntu-tools-2026-1125-0";
    sim.add_marketplace_pool(
        "sigrunweu",
        previous,
        1,
        &[("sigrun-pipeline", "nightly-ubuntu"), ("sigrun-target", "tools")],
    )
    .await;
    let spec = nightly(&[("previous_pool = \"scale_to_zero\"", "previous_pool = \"keep\"")]);
    let (message, _) = verifying(&mut sim, &spec, "tools").await;
    let mark = sim.mark().await;
    let steps = sim.settle(&message, 60.0).await;
    let done = steps.last().unwrap();
    assert_eq!(kind(&done.outcome), "done", "{:?}", done.outcome);
    let names: Vec<&str> = all_events(&steps)
        .into_iter()
        .map(EventKind::name)
        .filter(|name| *name != "waiting")
        .collect();
    assert_eq!(names, vec!["pool_verified", "promoted", "rollout_finished"]);
    let log = sim.since(mark).await;
    let own = message.artifacts.pool.as_ref().unwrap().pool_id.clone();
    let writes: Vec<&Value> = log
        .iter()
        .filter(|e| e["api"] == "batch" && e["method"] != "GET")
        .collect();
    assert!(
        writes.len() == 1 && writes[0]["method"] == "PATCH" && writes[0]["path"].as_str().unwrap().ends_with(&own),
        "Batch wrote only its own pool's metadata (verified): {writes:?}"
    );
    let ours = sim.pool("sigrunweu", &own).await.unwrap();
    let verified = ours["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "sigrun-verified" && m["value"] == "true");
    assert!(verified, "the pool says it verified: {}", ours["metadata"]);
    let kept = sim.pool("sigrunweu", previous).await.unwrap();
    assert_eq!(kept["state"], "active");
    assert_eq!(kept["targetDedicatedNodes"], 1);
}

#[tokio::test]
async fn verify_fails_when_too_few_replicas_let_the_allocation_time_out() {
    let mut sim = Sim::new().await;
    let spec = nightly(&[("dedicated_nodes = 400", "dedicated_nodes = 2000")]);
    let mut trunk = sim.trunk(&spec, Stage::Snapshot).await;
    let westeurope = std::sync::Arc::make_mut(&mut trunk.plan)
        .regions
        .iter_mut()
        .find(|r| r.name == "westeurope")
        .unwrap();
    assert_eq!(westeurope.replicas, 4, "the planner asks for one replica per 600 nodes");
    // Published with a single replica (as an older plan or a hand edit would): 2000 nodes from one
    // replica cannot allocate within the 30-minute resize timeout.
    westeurope.replicas = 1;
    let (message, _) = verifying_trunk(&mut sim, trunk, "render").await;
    let steps = sim.settle(&message, 300.0).await;
    let reason = failed(steps.last().unwrap());
    assert!(reason.contains("AllocationTimedout"), "{reason}");
    assert!(reason.contains("nightly-ubuntu-render-2026-1126-0"), "{reason}");
    assert!(reason.contains("of 2000 dedicated nodes"), "{reason}");
    assert!(
        steps[..steps.len() - 1]
            .iter()
            .all(|s| waited(s).0.operation.as_ref().unwrap().what.as_str() == "allocation"),
        "waited on the allocation until it ended"
    );
}

#[tokio::test]
async fn verify_fails_when_allocation_fails() {
    let mut sim = Sim::with_faults("allocation-fail:pool=nightly-ubuntu-tools-*").await;
    let (message, _) = verifying(&mut sim, NIGHTLY, "tools").await;
    let steps = sim.settle(&message, 60.0).await;
    let reason = failed(steps.last().unwrap());
    assert!(reason.contains("AllocationFailed"), "{reason}");
}

#[tokio::test]
async fn verify_fails_when_more_start_tasks_fail_than_allowed() {
    let mut sim = Sim::with_faults("starttask-fail:share=0.5").await;
    let spec = nightly(&[("dedicated_nodes = 400", "dedicated_nodes = 40")]);
    let (message, _) = verifying(&mut sim, &spec, "render").await;
    let steps = sim.settle(&message, 60.0).await;
    let reason = failed(steps.last().unwrap());
    assert!(reason.contains("failed their start task"), "{reason}");
    assert!(reason.contains("of 40 nodes"), "{reason}");
    let version = sim
        .azure
        .get_version(&message.plan.version_id, false)
        .await
        .unwrap()
        .unwrap();
    assert!(version.exclude_from_latest, "a failed pool promotes nothing");
}

#[tokio::test]
async fn verify_fails_past_its_deadline() {
    let mut sim = Sim::new().await;
    let spec = nightly(&[("deadline = \"3h\"", "deadline = \"5m\"")]);
    let (message, _) = verifying(&mut sim, &spec, "render").await;
    let step = sim.drive(&message).await;
    let (waiting, _, _) = waited(&step);
    sim.advance(301.0).await;
    let step = sim.drive(waiting).await;
    let reason = failed(&step);
    assert!(reason.contains("did not verify within 5m"), "{reason}");
    let version = sim
        .azure
        .get_version(&message.plan.version_id, false)
        .await
        .unwrap()
        .unwrap();
    assert!(version.exclude_from_latest);
}

// ---------------------------------------------------------------------------------------------
// Idempotent replay

#[tokio::test]
async fn replaying_every_message_of_a_finished_run_converges() {
    let mut sim = Sim::new().await;
    let previous = "nightly-ubuntu-render-2026-1125-0";
    previous_pool(&sim, previous, "render", "2026.1125.0", Uuid::new_v4()).await;
    // Kept intermediates: a replayed snapshot step would otherwise make again what the clean-up
    // deleted (the ledger drops such a stale copy; this harness has none).
    let spec = nightly(&[
        ("dedicated_nodes = 400", "dedicated_nodes = 20"),
        ("[rollout]", "[retention]\nintermediates = \"keep\"\n\n[rollout]"),
    ]);
    let trunk = sim.trunk(&spec, Stage::Snapshot).await;

    // The run, message by message: each first delivery and the kind of its final step.
    let mut queue = vec![trunk.clone()];
    let mut delivered: Vec<(Envelope, &'static str)> = Vec::new();
    let mut recorded: Vec<String> = Vec::new();
    while !queue.is_empty() {
        let message = queue.remove(0);
        let steps = sim.settle(&message, 60.0).await;
        let last = steps.last().unwrap();
        assert!(
            !matches!(last.outcome, Outcome::Fail(_)),
            "{} failed: {:?}",
            message.stage,
            last.outcome
        );
        queue.extend(pool_messages(&steps));
        for event in all_events(&steps) {
            if let EventKind::ResourceCreated { id } | EventKind::PoolCreated { pool_id: id } = event {
                recorded.push(id.clone());
            }
        }
        delivered.push((message, kind(&last.outcome)));
    }
    let stages: Vec<Stage> = delivered.iter().map(|(m, _)| m.stage).collect();
    assert_eq!(
        stages,
        vec![
            Stage::Snapshot,
            Stage::ImageCreate,
            Stage::GalleryPublish,
            Stage::Replicate,
            Stage::PoolCreate,
            Stage::PoolCreate,
            Stage::PoolCreate,
            Stage::Verify,
            Stage::Verify,
            Stage::Verify,
        ]
    );
    let version_id = trunk.plan.version_id.clone();
    assert!(
        !sim.azure
            .get_version(&version_id, false)
            .await
            .unwrap()
            .unwrap()
            .exclude_from_latest,
        "the run promoted its version"
    );
    assert_eq!(
        sim.pool("sigrunweu", previous).await.unwrap()["targetDedicatedNodes"],
        0
    );
    let finished = sim.inventory().await;
    sim.advance(600.0).await;

    // Every message again: the same end, nothing new, and the version stays latest.
    let mark = sim.mark().await;
    for (message, original) in &delivered {
        let steps = sim.settle(message, 60.0).await;
        let last = steps.last().unwrap();
        assert_eq!(
            kind(&last.outcome),
            *original,
            "replayed {} ({}): {:?}",
            message.stage,
            message.branch.label(),
            last.outcome
        );
        let events = all_events(&steps);
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, EventKind::Promoted { .. } | EventKind::PreviousPoolRetired { .. })),
            "replayed {} did something again: {events:?}",
            message.stage
        );
        // What it records as created (the same admission made it) is what the run had made.
        for event in &events {
            if let EventKind::ResourceCreated { id } | EventKind::PoolCreated { pool_id: id } = event {
                assert!(recorded.contains(id), "replayed {} recorded {id} anew", message.stage);
            }
        }
        assert!(
            !sim.azure
                .get_version(&version_id, false)
                .await
                .unwrap()
                .unwrap()
                .exclude_from_latest,
            "replaying {} took the version out of latest",
            message.stage
        );
    }
    assert_eq!(sim.inventory().await, finished);
    let log = sim.since(mark).await;
    let writes: Vec<&Value> = log
        .iter()
        .filter(|e| e["method"] != "GET" && e["status"] != 200)
        .collect();
    assert!(
        writes.iter().all(|e| e["method"] == "POST" && e["status"] == 409),
        "only ARM's 200s and Batch's PoolExists: {writes:?}"
    );
    let status_reads_ok = log.iter().filter(|e| e["method"] == "GET").all(|e| e["status"] == 200);
    assert!(status_reads_ok, "{log:?}");
}
