//! Test helpers for the runtime: a sample pipeline (the nightly spec of `model::spec`'s tests), a
//! small hand-made plan over two regions and three pools, envelopes of that run, and a handler
//! made of a closure that records when and with what it was called.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::time::Instant;
use uuid::Uuid;

use super::Handler;
use super::settings::{RetrySettings, RuntimeSettings};
use crate::azure::AzureError;
use crate::bus::memory::MemoryBus;
use crate::events::PoolRef;
use crate::model::envelope::{Artifacts, Branch, ENVELOPE_VERSION, Envelope, Stage, new_traceparent};
use crate::model::ids::{BatchAccountId, GalleryId, GalleryImageId, GalleryImageVersionId};
use crate::model::plan::{Plan, PoolPlan, RegionPlan};
use crate::model::spec::PipelineSpec;
use crate::stages::{Step, Tried};

pub use crate::model::spec::tests::NIGHTLY;

const SUB_IMAGES: &str = "11111111-1111-4111-8111-111111111111";
const SUB_BATCH: &str = "22222222-2222-4222-8222-222222222222";
pub const VERSION: &str = "2026.1126.0";

/// The pools of the sample plan: two in westeurope, one in eastus.
pub fn pools() -> Vec<PoolRef> {
    [("westeurope", "render"), ("westeurope", "sim"), ("eastus", "batch")]
        .map(|(region, target)| PoolRef {
            region: region.into(),
            target: target.into(),
        })
        .to_vec()
}

pub fn regions() -> Vec<String> {
    vec!["westeurope".into(), "eastus".into()]
}

fn plan() -> Plan {
    let gallery = GalleryId::new(SUB_IMAGES, "rg-gallery", &["sigrun_gallery"]).unwrap();
    let definition = GalleryImageId::new(SUB_IMAGES, "rg-gallery", &["sigrun_gallery", "ubuntu-2204-batch"]).unwrap();
    let version_id = GalleryImageVersionId::new(
        SUB_IMAGES,
        "rg-gallery",
        &["sigrun_gallery", "ubuntu-2204-batch", VERSION],
    )
    .unwrap();
    let pool = |target: &str, region: &str, account: &str| {
        let pool_id = format!("nightly-ubuntu-{target}-2026-1126-0");
        PoolPlan {
            target: target.into(),
            region: region.into(),
            account: BatchAccountId::new(SUB_BATCH, "rg-batch", &[account]).unwrap(),
            account_url: format!("https://{account}.{region}.batch.azure.com"),
            pool_id,
            vm_size: "Standard_D4s_v5".into(),
            dedicated_nodes: 2,
            low_priority_nodes: 0,
            node_agent_sku_id: "batch.node.ubuntu 22.04".into(),
            resize_timeout_secs: 900,
            task_slots_per_node: 1,
            start_task: None,
            metadata: BTreeMap::new(),
        }
    };
    Plan {
        version: VERSION.into(),
        build: None,
        gallery,
        gallery_region: "westeurope".into(),
        create_gallery: true,
        definition,
        version_id,
        regions: vec![
            RegionPlan {
                name: "westeurope".into(),
                replicas: 1,
                replicas_asked: None,
                nodes: 4,
                storage_account_type: "Standard_LRS".into(),
            },
            RegionPlan {
                name: "eastus".into(),
                replicas: 2,
                replicas_asked: Some(2),
                nodes: 2,
                storage_account_type: "Standard_LRS".into(),
            },
        ],
        pools: vec![
            pool("render", "westeurope", "sigrunweu"),
            pool("sim", "westeurope", "sigrunweu"),
            pool("batch", "eastus", "sigruneus"),
        ],
        publish_excluded: true,
        final_excluded: false,
        end_of_life: None,
        register_batch_in: Vec::new(),
        quota_use: Vec::new(),
        seen: Default::default(),
        warnings: Vec::new(),
    }
}

/// A fresh run's first message, at `stage` on the trunk.
pub fn envelope(stage: Stage) -> Envelope {
    let started = OffsetDateTime::UNIX_EPOCH;
    Envelope {
        v: ENVELOPE_VERSION,
        message_id: Uuid::new_v4(),
        run_id: Uuid::new_v4(),
        pipeline: "nightly-ubuntu".into(),
        version: VERSION.into(),
        stage,
        branch: Branch::Trunk,
        spec: std::sync::Arc::new(PipelineSpec::parse(NIGHTLY, "nightly.toml").unwrap()),
        plan: std::sync::Arc::new(plan()),
        artifacts: Artifacts::default(),
        operation: None,
        not_before: None,
        attempt: 0,
        run_started: started,
        stage_started: started,
        traceparent: new_traceparent(),
        token: Uuid::new_v4(),
        made_by: Uuid::nil(),
        made_from: Uuid::nil(),
        admission: Uuid::nil(),
    }
}

/// A fresh run's first message (its id as the admission makes it) and its `RunStarted`.
pub fn fresh_run() -> (Envelope, crate::events::Event) {
    let first = envelope(Stage::Snapshot);
    let started = crate::events::Event {
        run_id: first.run_id,
        pipeline: first.pipeline.clone(),
        version: first.version.clone(),
        stage: Stage::Snapshot,
        branch: Branch::Trunk,
        at: first.stage_started,
        kind: crate::events::EventKind::RunStarted {
            rollout: false,
            regions: regions(),
            pools: pools(),
        },
    };
    let mut first = first;
    first.message_id = crate::model::envelope::message_id(first.run_id, Stage::Snapshot, &Branch::Trunk);
    (first, started)
}

/// Tiny tiers and delays, so paused-time tests stay readable.
pub fn settings() -> RuntimeSettings {
    RuntimeSettings {
        consumers: 2,
        tiers: [10, 50, 200, 1000].map(Duration::from_millis).to_vec(),
        retry: RetrySettings {
            base_delay: Duration::from_millis(100),
            factor: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: true,
            max_attempts: 5,
        },
        shutdown_grace: Duration::from_secs(5),
        claim_timeout: Duration::from_secs(2),
        fencing: crate::ledger::Fencing::CommitFirst,
        held_waits: 4,
        hold_max: Duration::from_secs(60),
        step_on: true,
        keep_waits: true,
    }
}

/// A runtime over every stage with `settings` and `clock`.
pub fn runtime_with(
    bus: Arc<dyn crate::bus::Bus>,
    handler: Arc<dyn Handler>,
    clock: super::Clock,
    settings: RuntimeSettings,
) -> super::Runtime {
    super::Runtime::new(bus, handler, crate::model::envelope::Stage::ALL.to_vec(), settings)
        .unwrap()
        .with_clock(clock)
}

pub fn bus() -> Arc<MemoryBus> {
    Arc::new(MemoryBus::new(settings().tiers))
}

/// One call of a [`Script`] handler.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: Instant,
    pub message: Envelope,
    /// What the runtime said of the try.
    pub tried: Tried,
}

type Respond = dyn Fn(&Envelope) -> Result<Step, AzureError> + Send + Sync;
type Reads = dyn Fn(&Envelope) -> bool + Send + Sync;

/// A handler answering with a closure and keeping every call. Each step writes to Azure (it
/// notes a write, as the REST client would), unless the script says the step only reads.
pub struct Script {
    respond: Box<Respond>,
    reads: Box<Reads>,
    calls: Mutex<Vec<Call>>,
}

impl Script {
    pub fn new(respond: impl Fn(&Envelope) -> Result<Step, AzureError> + Send + Sync + 'static) -> Arc<Script> {
        Script::with_reads(respond, |_| false)
    }

    /// A script whose steps of the messages `reads` picks only read Azure.
    pub fn with_reads(
        respond: impl Fn(&Envelope) -> Result<Step, AzureError> + Send + Sync + 'static,
        reads: impl Fn(&Envelope) -> bool + Send + Sync + 'static,
    ) -> Arc<Script> {
        Arc::new(Script {
            respond: Box::new(respond),
            reads: Box::new(reads),
            calls: Mutex::new(Vec::new()),
        })
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Handler for Script {
    async fn handle(&self, message: Envelope, _now: OffsetDateTime, tried: Tried) -> Result<Step, AzureError> {
        self.calls.lock().unwrap().push(Call {
            at: Instant::now(),
            message: message.clone(),
            tried,
        });
        if !(self.reads)(&message) {
            crate::azure::writes::note_write();
        }
        (self.respond)(&message)
    }
}
