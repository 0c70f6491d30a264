//! What starts a run, shared by `run` (in-process bus) and `submit` (RabbitMQ): the entry stage a
//! plan starts at, the run's first messages and its `RunStarted` event. The run id follows from
//! pipeline and version, so the same trigger twice names the same run.

use time::OffsetDateTime;
use uuid::Uuid;

use super::input_error;
use super::plan_view::Prepared;
use crate::events::{Event, EventKind, PoolRef};
use crate::model::envelope::{Artifacts, Branch, ENVELOPE_VERSION, Envelope, SnapshotArtifact, Stage, new_traceparent};

/// `--from STAGE` on the command line.
pub fn parse_stage(text: &str) -> Result<Stage, String> {
    Stage::parse(text).ok_or_else(|| {
        format!("unknown stage `{text}` (snapshot, image-create, gallery-publish, replicate, pool-create)")
    })
}

/// The stage a run starts at: `--from`, else what the plan needs (a rollout starts at pool-create,
/// an existing managed image at gallery-publish, a build at snapshot).
pub fn entry_stage(from: Option<Stage>, prepared: &Prepared) -> anyhow::Result<Stage> {
    let rollout = prepared.plan.build.is_none();
    let stage = match (from, rollout, &prepared.inputs.existing_image) {
        (Some(Stage::Verify), _, _) => {
            return Err(input_error(anyhow::anyhow!(
                "--from verify: a run cannot start at verify; start at pool-create"
            )));
        }
        (Some(stage), true, _) if stage < Stage::PoolCreate => {
            return Err(input_error(anyhow::anyhow!(
                "--from {stage}: this run rolls out an existing version; it can only start at pool-create"
            )));
        }
        (Some(stage), _, _) => stage,
        (None, true, _) => Stage::PoolCreate,
        (None, false, Some(_)) => Stage::GalleryPublish,
        (None, false, None) => Stage::Snapshot,
    };
    Ok(stage)
}

/// The run's first messages: one trunk message, or one per pool when the run starts at pool-create.
pub fn first_messages(prepared: &Prepared, entry: Stage) -> Vec<Envelope> {
    let now = OffsetDateTime::now_utc();
    // The run id follows from pipeline and version: the same trigger twice is the same run.
    let run_id = Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("sigrun:{}:{}", prepared.spec.name, prepared.plan.version).as_bytes(),
    );
    let mut artifacts = Artifacts::default();
    if let Some(build) = &prepared.plan.build {
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
        artifacts.image_version = Some(prepared.plan.version_id.clone());
    }
    let trunk = Envelope {
        v: ENVELOPE_VERSION,
        message_id: Uuid::new_v4(),
        run_id,
        pipeline: prepared.spec.name.clone(),
        version: prepared.plan.version.clone(),
        stage: entry,
        branch: Branch::Trunk,
        spec: prepared.spec.clone(),
        plan: prepared.plan.clone(),
        artifacts,
        operation: None,
        attempt: 0,
        not_before: None,
        run_started: now,
        stage_started: now,
        traceparent: new_traceparent(),
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
pub fn run_started(prepared: &Prepared, entry: Stage, run_id: Uuid) -> Event {
    Event {
        run_id,
        pipeline: prepared.spec.name.clone(),
        version: prepared.plan.version.clone(),
        stage: entry,
        branch: Branch::Trunk,
        at: OffsetDateTime::now_utc(),
        kind: EventKind::RunStarted {
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
    }
}
