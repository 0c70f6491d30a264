//! Stage 1, `snapshot`: copies each disk of the build VM (OS disk and data disks with their LUNs)
//! to a full snapshot in the image's region, then waits for every copy to finish. The preflight
//! (managed disks, no extensions, supported base image) ran in the planner; the snapshots' names
//! derive from the run, so a replayed message PUTs the same resources again, which Azure treats as
//! no change. A redelivered message first looks for what an earlier try made in the same
//! admission (its tags say) and records it as created too, so the run's history lists it. A run
//! whose version this run already published (the run again, its intermediates cleaned up) copies
//! nothing and goes on to gallery-publish, which joins the version.

use std::sync::Arc;

use super::clean_up;
use super::common::{Settled, awaited, fail, follow, look_again, made_by_run, made_in_admission, settle, tags};
use super::{Outcome, Step, StepContext};
use crate::azure::api::{Accepted, SnapshotRequest};
use crate::azure::{AzureError, ProvisioningState};
use crate::events::EventKind;
use crate::model::envelope::{Envelope, Phase, Stage};
use crate::model::ids::SnapshotId;
use crate::model::plan::{BuildPlan, Presence};

const WHAT: Phase = Phase::Snapshots;

pub async fn step(message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let Some(build) = message.plan.build.clone() else {
        return Ok(fail(
            "this run publishes an existing version; it has nothing to snapshot",
        ));
    };
    match awaited(&message, WHAT) {
        None if may_be_published(&message, ctx) && published_already(&message, ctx).await? => {
            // This run's version exists already (the run again, after its clean-up deleted the
            // snapshots and the image): nothing to copy; gallery-publish joins the version.
            let mut next = message.next(Stage::GalleryPublish, ctx.now);
            Arc::make_mut(&mut next.plan).seen.version = Presence::Present;
            next.artifacts.snapshots = build.snapshot_artifacts();
            next.artifacts.image = Some(build.image.clone());
            Ok(Step::new(Outcome::Advance(vec![next])))
        }
        None => {
            let mut made = Vec::new();
            let mut urls = Vec::new();
            let mut hint = None;
            let mut events = Vec::new();
            let mut joined = false;
            for snapshot in &build.snapshots {
                let request = SnapshotRequest {
                    location: build.region.clone(),
                    source: snapshot.source.clone(),
                    tags: tags(&message),
                };
                let put = put_or_join(&snapshot.id, &request, &message, ctx).await?;
                if put.record {
                    made.push(snapshot.id.to_string());
                    events.push(EventKind::ResourceCreated {
                        id: snapshot.id.to_string(),
                    });
                }
                match put.accepted {
                    Some(accepted) => {
                        urls.extend(accepted.status_url);
                        hint = hint.max(accepted.retry_after);
                    }
                    None => joined = true,
                }
            }
            // A snapshot joined under way has no operation to follow: read them all instead.
            if joined {
                urls.clear();
            }
            let mut message = message;
            for id in made {
                clean_up::made_here(&mut message, id);
            }
            let mut step = follow(message, WHAT, urls, hint, ctx);
            step.events.splice(0..0, events);
            Ok(step)
        }
        // Azure gave no operations to follow: read the snapshots themselves.
        Some(urls) if urls.is_empty() => match snapshots_state(&build, ctx).await? {
            Copied::All => Ok(advance(message, &build, ctx)),
            Copied::Failed(snapshot) => Ok(fail(format!("snapshot {snapshot} of the build VM failed"))),
            Copied::NotYet => Ok(look_again(message, WHAT, ctx)),
        },
        Some(urls) => match settle(ctx, &urls).await? {
            Settled::Done => Ok(advance(message, &build, ctx)),
            Settled::Pending(urls, hint) => Ok(follow(message, WHAT, urls, hint, ctx)),
            Settled::Failed(reason) => Ok(fail(format!("a snapshot of the build VM failed: {reason}"))),
        },
    }
}

/// Whether this run's version may exist already. Not on a first try of a run planned with its
/// version absent: nothing but this run's own gallery-publish, which comes later, can have made it.
fn may_be_published(message: &Envelope, ctx: &StepContext<'_>) -> bool {
    ctx.as_planned(message.plan.seen.version) != Presence::Absent
}

/// Whether this run's image version exists, made by this run and provisioned: what the snapshots
/// and the image were for is done.
async fn published_already(message: &Envelope, ctx: &StepContext<'_>) -> Result<bool, AzureError> {
    let version = ctx.azure.get_version(&message.plan.version_id, false).await?;
    Ok(version.is_some_and(|v| made_by_run(&v.tags, message) && v.provisioning_state == ProvisioningState::Succeeded))
}

/// What one snapshot's PUT came to: the write accepted (`None`: the snapshot was found there, this
/// run's, perhaps still copying, and joined without a write), and whether to record it created.
struct Put {
    accepted: Option<Accepted>,
    record: bool,
}

/// PUTs one snapshot unless this run's is there already: an earlier try of the step (killed
/// before its commit, or a second copy of its message) may have made it, and may still be copying
/// it. A snapshot found is joined without a write, and recorded as created when the same admission
/// of the run made it (an earlier run of the same version made the other ones). A first try has
/// no earlier try to look for: it writes at once.
async fn put_or_join(
    id: &SnapshotId,
    request: &SnapshotRequest,
    message: &Envelope,
    ctx: &StepContext<'_>,
) -> Result<Put, AzureError> {
    if !ctx.first_try()
        && let Some(found) = ctx.azure.get_snapshot(id).await?
        && made_by_run(&found.tags, message)
    {
        return Ok(Put {
            accepted: None,
            record: made_in_admission(&found.tags, message),
        });
    }
    let accepted = ctx.azure.put_snapshot(id, request).await?;
    Ok(Put {
        record: accepted.created,
        accepted: Some(accepted),
    })
}

fn advance(mut message: Envelope, build: &BuildPlan, ctx: &StepContext<'_>) -> Step {
    message.artifacts.snapshots = build.snapshot_artifacts();
    Step::new(Outcome::Advance(vec![message.next(Stage::ImageCreate, ctx.now)]))
}

/// Where the copies of the build VM's disks stand, read from the snapshots themselves.
enum Copied {
    All,
    NotYet,
    /// This snapshot reads Failed: the branch fails, as for a failed image.
    Failed(String),
}

async fn snapshots_state(build: &BuildPlan, ctx: &StepContext<'_>) -> Result<Copied, AzureError> {
    for snapshot in &build.snapshots {
        match ctx
            .azure
            .get_snapshot(&snapshot.id)
            .await?
            .map(|s| s.provisioning_state)
        {
            Some(ProvisioningState::Succeeded) => {}
            Some(ProvisioningState::Failed) => return Ok(Copied::Failed(snapshot.id.name().to_string())),
            _ => return Ok(Copied::NotYet),
        }
    }
    Ok(Copied::All)
}
