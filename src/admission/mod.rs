//! Admission: what turns a request for a run into a started run. The same steps serve `sigrun run`
//! (in-process), `sigrun submit` (plans locally, then publishes a trigger) and the workers'
//! admitter (takes triggers from RabbitMQ):
//!
//! 1. [`resolve`] — the version the run publishes or rolls out (the request's, or the pipeline's
//!    scheme: reading Azure for a nightly number), which names the run ([`run_id`]);
//! 2. [`plan`] — every preflight rule, reading Azure and creating nothing;
//! 3. [`entry_stage`], [`first_messages`], [`run_started`] — where the run starts, its first
//!    message(s) and the event that opens its history;
//! 4. [`begin`] — the run started once through the ledger: the admission claimed, the first
//!    messages published, one commit recording `RunStarted` and making them live. The workers'
//!    admitter and `sigrun run` ([`local`]) both start runs this way.
//!
//! - [`pipelines`] — finding a pipeline spec by name in the `[pipelines] dir`.
//! - [`admitter`] — the workers' trigger consumer.
//! - [`local`] — a run in this process: the in-process bus, the ledger, the stages, followed to
//!   its end (`sigrun run`).
//!
//! Errors tell bad input (a rule broken, a bad id, Azure refusing a read for good — nothing was
//! created, and retrying cannot help) from Azure being unreadable just now (worth another try).

use std::sync::Arc;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::azure::writes::Writes;
use crate::azure::{AzureApi, AzureError, ErrorClass};
use crate::bus::{Bus, BusError};
use crate::events::{Event, EventKind, PoolRef};
use crate::ledger::record::{Commit, Consumed, Successor};
use crate::ledger::{ClaimKey, Claimed, Fencing, Ledger, Standing};
use crate::model::envelope::{Artifacts, Branch, ENVELOPE_VERSION, Envelope, Stage, message_id};
use crate::model::ids::{GalleryImageVersionId, ImageId};
use crate::model::plan::Plan;
use crate::model::spec::PipelineSpec;
use crate::model::trace::TraceParent;
use crate::planner::{self, PlanError, PlanInputs};

pub mod admitter;
pub mod local;
pub mod pipelines;

pub use crate::model::trigger::run_id;
pub use admitter::{Admission, Admitter};

/// What a run was asked to do, beyond its pipeline.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunRequest {
    /// Publish (or roll out) this version instead of the one the scheme gives.
    pub version: Option<String>,
    /// Roll out this existing gallery image version (ARM id).
    pub image_version_id: Option<String>,
    /// Publish from this existing managed image (ARM id).
    pub image_id: Option<String>,
}

/// A spec with its checked plan.
pub struct Prepared {
    pub spec: PipelineSpec,
    pub plan: Plan,
    pub inputs: PlanInputs,
}

impl Prepared {
    /// The run this plan is: pipeline and version.
    pub fn run_id(&self) -> Uuid {
        run_id(&self.spec.name, &self.plan.version)
    }
}

/// Why a run cannot be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The input is wrong (a rule it breaks, a bad id, Azure refusing a read for good): nothing
    /// was created, and trying again will not help.
    #[error("{0}")]
    Invalid(String),
    /// Azure could not be read just now (network, 5xx, throttling).
    #[error("{origin}: {error}")]
    Transient { origin: String, error: AzureError },
}

impl PrepareError {
    fn of_plan(origin: &str, err: PlanError) -> PrepareError {
        match err {
            PlanError::Azure(error) if error.class() != ErrorClass::Permanent => PrepareError::Transient {
                origin: origin.to_string(),
                error,
            },
            other => PrepareError::Invalid(format!("{origin}: {other}")),
        }
    }
}

/// Step 1: checks the request's ids and resolves the version. `origin` names the spec in errors
/// (its file, or where a trigger's spec came from).
pub async fn resolve(
    spec: &PipelineSpec,
    origin: &str,
    request: &RunRequest,
    azure: &dyn AzureApi,
) -> Result<PlanInputs, PrepareError> {
    let mut inputs = PlanInputs::default();
    let requested = match &request.image_version_id {
        Some(id) => {
            let id = GalleryImageVersionId::parse(id)
                .map_err(|e| PrepareError::Invalid(format!("image version id: {e}")))?;
            let definition = id.definition();
            if !definition
                .gallery()
                .to_string()
                .eq_ignore_ascii_case(&spec.gallery.id.to_string())
                || !definition.name().eq_ignore_ascii_case(&spec.definition.name)
            {
                return Err(PrepareError::Invalid(format!(
                    "image version id {id} is not a version of {origin}'s definition {}",
                    spec.definition.name
                )));
            }
            inputs.existing_version = true;
            Some(id.name().to_string())
        }
        None => request.version.clone(),
    };
    if let Some(image) = &request.image_id {
        inputs.existing_image =
            Some(ImageId::parse(image).map_err(|e| PrepareError::Invalid(format!("image id: {e}")))?);
    }
    let today = OffsetDateTime::now_utc().date();
    let resolved = planner::resolve_version(spec, requested.as_deref(), azure, today)
        .await
        .map_err(|e| PrepareError::of_plan(origin, e))?;
    inputs.version = resolved.name;
    inputs.version_absent = resolved.absent;
    Ok(inputs)
}

/// Step 2: plans the run (every preflight rule; reads Azure, creates nothing).
pub async fn plan(
    spec: PipelineSpec,
    origin: &str,
    inputs: PlanInputs,
    azure: &dyn AzureApi,
) -> Result<Prepared, PrepareError> {
    let plan = planner::plan(&spec, &inputs, azure, OffsetDateTime::now_utc())
        .await
        .map_err(|e| PrepareError::of_plan(origin, e))?;
    Ok(Prepared { spec, plan, inputs })
}

/// Steps 1 and 2 together.
pub async fn prepare(
    spec: PipelineSpec,
    origin: &str,
    request: &RunRequest,
    azure: &dyn AzureApi,
) -> Result<Prepared, PrepareError> {
    let inputs = resolve(&spec, origin, request, azure).await?;
    plan(spec, origin, inputs, azure).await
}

/// A start the run cannot take (`from` names the stage asked for).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("from {from}: {reason}")]
pub struct EntryError {
    pub from: Stage,
    pub reason: String,
}

/// The stage a run starts at: `from`, else what the plan needs (a rollout starts at pool-create,
/// an existing managed image at gallery-publish, a build at snapshot).
pub fn entry_stage(from: Option<Stage>, prepared: &Prepared) -> Result<Stage, EntryError> {
    let rollout = prepared.plan.build.is_none();
    let stage = match (from, rollout, &prepared.inputs.existing_image) {
        (Some(Stage::Verify), _, _) => {
            return Err(EntryError {
                from: Stage::Verify,
                reason: "a run cannot start at verify; start at pool-create".into(),
            });
        }
        (Some(stage), true, _) if stage < Stage::PoolCreate => {
            return Err(EntryError {
                from: stage,
                reason: "this run rolls out an existing version; it can only start at pool-create".into(),
            });
        }
        (Some(stage), _, _) => stage,
        (None, true, _) => Stage::PoolCreate,
        (None, false, Some(_)) => Stage::GalleryPublish,
        (None, false, None) => Stage::Snapshot,
    };
    Ok(stage)
}

/// The run's first messages: one trunk message, or one per pool when the run starts at pool-create.
/// `trace` is the admission's span in the run's trace: the messages name it as their parent.
pub fn first_messages(prepared: &Prepared, entry: Stage, trace: &TraceParent) -> Vec<Envelope> {
    let now = OffsetDateTime::now_utc();
    let mut artifacts = Artifacts::default();
    if let Some(build) = &prepared.plan.build {
        if entry > Stage::Snapshot {
            artifacts.snapshots = build.snapshot_artifacts();
        }
        if entry > Stage::ImageCreate {
            artifacts.image = Some(build.image.clone());
        }
    }
    if entry > Stage::GalleryPublish {
        artifacts.image_version = Some(prepared.plan.version_id.clone());
    }
    let trunk = Envelope {
        v: ENVELOPE_VERSION,
        message_id: message_id(prepared.run_id(), entry, &Branch::Trunk),
        run_id: prepared.run_id(),
        pipeline: prepared.spec.name.clone(),
        version: prepared.plan.version.clone(),
        stage: entry,
        branch: Branch::Trunk,
        spec: Arc::new(prepared.spec.clone()),
        plan: Arc::new(prepared.plan.clone()),
        artifacts,
        operation: None,
        attempt: 0,
        not_before: None,
        run_started: now,
        stage_started: now,
        traceparent: trace.to_string(),
        token: Uuid::new_v4(),
        made_by: Uuid::nil(),
        made_from: Uuid::nil(),
        admission: Uuid::nil(),
    };
    if entry == Stage::PoolCreate {
        prepared
            .plan
            .pools
            .iter()
            .map(|p| trunk.for_pool(Stage::PoolCreate, &p.region, &p.target, now))
            .collect()
    } else {
        vec![trunk]
    }
}

/// The event that opens the run's history: the regions and pools it plans.
pub fn run_started(prepared: &Prepared, entry: Stage) -> Event {
    trunk_event(
        prepared.run_id(),
        &prepared.spec.name,
        &prepared.plan.version,
        entry,
        EventKind::RunStarted {
            // Every verified pool's branch goes on to the rollout phase: the rollout policy, then
            // retention.
            rollout: true,
            regions: prepared.plan.regions.iter().map(|r| r.name.clone()).collect(),
            pools: prepared
                .plan
                .pools
                .iter()
                .map(|p| PoolRef {
                    region: p.region.clone(),
                    target: p.target.clone(),
                })
                .collect(),
        },
    )
}

/// An event about the run as a whole (its trunk), at `stage`, now.
pub fn trunk_event(run_id: Uuid, pipeline: &str, version: &str, stage: Stage, kind: EventKind) -> Event {
    Event {
        run_id,
        pipeline: pipeline.to_string(),
        version: version.to_string(),
        stage,
        branch: Branch::Trunk,
        at: OffsetDateTime::now_utc(),
        kind,
    }
}

/// What [`begin`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begun {
    /// This call started the run: `messages` first messages went out, then `RunStarted`.
    Started { messages: usize },
    /// The run had been started (by another trigger, or another admitter).
    AlreadyStarted,
    /// Another admission of the run holds its claim and may still commit: try again later.
    Held,
}

/// Starts the run `prepared` describes at `entry`, once however many admitters try, fenced as the
/// ledger's settings say: claim the admission, publish the first messages, commit `RunStarted`
/// with them; or publish them and commit at once, the first commit read starting the run. A
/// publish that is not confirmed, or a claim that runs out of time, fails (a claim is released;
/// the caller returns its trigger to the queue).
pub async fn begin(
    bus: &dyn Bus,
    ledger: &Ledger,
    prepared: &Prepared,
    entry: Stage,
    trace: &TraceParent,
) -> Result<Begun, BusError> {
    let firsts = first_messages(prepared, entry, trace);
    begin_with(bus, ledger, firsts, run_started(prepared, entry)).await
}

/// [`begin`] for first messages and a `RunStarted` event made already (all of one run).
pub async fn begin_with(
    bus: &dyn Bus,
    ledger: &Ledger,
    firsts: Vec<Envelope>,
    started: Event,
) -> Result<Begun, BusError> {
    let admission = ClaimKey::admission(started.run_id, &started.pipeline);
    // An admission sends Azure nothing: it commits first (see `Ledger::fencing_for`).
    match ledger.fencing_for(&admission, Writes::None) {
        Fencing::CommitFirst => begin_committing_first(bus, ledger, &admission, firsts, started).await,
        Fencing::ClaimFirst => begin_claimed(bus, ledger, &admission, firsts, started).await,
    }
}

async fn begin_claimed(
    bus: &dyn Bus,
    ledger: &Ledger,
    admission: &ClaimKey,
    mut firsts: Vec<Envelope>,
    started: Event,
) -> Result<Begun, BusError> {
    let (claim, deadline) = match ledger.claim(admission).await? {
        Claimed::Won { claim, deadline } => (claim, deadline),
        Claimed::Stale => return Ok(Begun::AlreadyStarted),
        Claimed::Wait => return Ok(Begun::Held),
    };
    for first in &mut firsts {
        first.made_by = claim;
        first.admission = claim;
    }
    let publish = async {
        publish_firsts(bus, &firsts).await?;
        ledger.commit(admission_commit(&firsts, started, claim)).await
    };
    let published = tokio::time::timeout_at(deadline.into(), publish)
        .await
        .unwrap_or_else(|_| Err(BusError::Connection("the admission's claim ran out of time".into())));
    if let Err(error) = published {
        ledger.release(admission.run_id, &admission.pipeline, claim).await;
        return Err(error);
    }
    Ok(Begun::Started { messages: firsts.len() })
}

/// The admission committed first: an admitter racing this one publishes its own first messages
/// too, but only the first commit read starts the run; the other's messages name the admission
/// as the state their maker consumed, so they are stale once it is spent.
async fn begin_committing_first(
    bus: &dyn Bus,
    ledger: &Ledger,
    key: &ClaimKey,
    mut firsts: Vec<Envelope>,
    started: Event,
) -> Result<Begun, BusError> {
    match ledger.may_commit(key).await {
        Standing::Stale => return Ok(Begun::AlreadyStarted),
        // Not so for an admission (its standing is known from the run's start alone).
        Standing::Unknown => return Ok(Begun::Held),
        Standing::Live | Standing::Unfenced => {}
    }
    let admission = Uuid::new_v4();
    for first in &mut firsts {
        // Its own states, whatever the caller made: a racing admitter's are then told apart.
        first.token = Uuid::new_v4();
        first.made_by = admission;
        first.made_from = key.token;
        first.admission = admission;
    }
    publish_firsts(bus, &firsts).await?;
    if ledger
        .commit_first(admission_commit(&firsts, started, admission))
        .await?
    {
        Ok(Begun::Started { messages: firsts.len() })
    } else if ledger.spent(key) {
        Ok(Begun::AlreadyStarted)
    } else {
        // A claiming admitter's claim came first: it may still commit.
        Ok(Begun::Held)
    }
}

async fn publish_firsts(bus: &dyn Bus, firsts: &[Envelope]) -> Result<(), BusError> {
    for first in firsts {
        bus.publish(first.stage, &first.encode(), Some(&first.traceparent))
            .await?;
    }
    Ok(())
}

/// The admission's commit by `step`: it consumes the admission (slot and token: the run id),
/// makes the first messages live, and records `RunStarted`.
fn admission_commit(firsts: &[Envelope], started: Event, step: Uuid) -> Commit {
    let run_id = started.run_id;
    Commit {
        kept: None,
        run_id,
        pipeline: started.pipeline.clone(),
        claim: step,
        consumed: Some(Consumed {
            message_id: run_id,
            token: run_id,
        }),
        successors: firsts.iter().map(Successor::of).collect(),
        events: vec![started],
    }
}
