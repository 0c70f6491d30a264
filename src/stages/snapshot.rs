//! Stage 1, `snapshot`: copies each disk of the build VM (OS disk and data disks with their LUNs)
//! to a full snapshot in the image's region, then waits for every copy to finish. The preflight
//! (managed disks, no extensions, supported base image) ran in the planner; the snapshots' names
//! derive from the run, so a replayed message PUTs the same resources again, which Azure treats as
//! no change.

use super::common::{Settled, after_hint, fail, settle, tags, wait_step};
use super::{Outcome, Step, StepContext};
use crate::azure::AzureError;
use crate::azure::api::SnapshotRequest;
use crate::events::EventKind;
use crate::model::envelope::{Envelope, SnapshotArtifact, Stage};

const WHAT: &str = "snapshots";

pub async fn step(message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let Some(build) = message.plan.build.clone() else {
        return Ok(fail(
            "this run publishes an existing version; it has nothing to snapshot",
        ));
    };
    let waiting = message
        .operation
        .as_ref()
        .filter(|op| op.what == WHAT)
        .map(|op| op.status_urls.clone());
    match waiting {
        None => {
            let mut urls = Vec::new();
            let mut hint = None;
            let mut events = Vec::new();
            for snapshot in &build.snapshots {
                let request = SnapshotRequest {
                    location: build.region.clone(),
                    source: snapshot.source.clone(),
                    tags: tags(&message),
                };
                let accepted = ctx.azure.put_snapshot(&snapshot.id, &request).await?;
                urls.extend(accepted.status_url.clone());
                hint = hint.max(accepted.retry_after);
                if accepted.created {
                    events.push(EventKind::ResourceCreated {
                        id: snapshot.id.to_string(),
                    });
                }
            }
            let mut step = wait_step(message, WHAT, urls, after_hint(ctx.settings, hint), ctx.now);
            step.events.splice(0..0, events);
            Ok(step)
        }
        // Azure gave no operations to follow: read the snapshots themselves.
        Some(urls) if urls.is_empty() => {
            if all_succeeded(&message, ctx).await? {
                Ok(advance(message, ctx))
            } else {
                Ok(wait_step(
                    message,
                    WHAT,
                    Vec::new(),
                    ctx.settings.default_poll(),
                    ctx.now,
                ))
            }
        }
        Some(urls) => match settle(ctx, &urls).await? {
            Settled::Done => Ok(advance(message, ctx)),
            Settled::Pending(urls, hint) => Ok(wait_step(message, WHAT, urls, after_hint(ctx.settings, hint), ctx.now)),
            Settled::Failed(reason) => Ok(fail(format!("a snapshot of the build VM failed: {reason}"))),
        },
    }
}

fn advance(mut message: Envelope, ctx: &StepContext<'_>) -> Step {
    let build = message.plan.build.as_ref().expect("checked by the caller");
    message.artifacts.snapshots = build
        .snapshots
        .iter()
        .map(|s| SnapshotArtifact {
            lun: s.lun,
            id: s.id.clone(),
        })
        .collect();
    Step::new(Outcome::Advance(vec![message.next(Stage::ImageCreate, ctx.now)]))
}

/// Whether every planned snapshot reads Succeeded; a Failed one is an error.
async fn all_succeeded(message: &Envelope, ctx: &StepContext<'_>) -> Result<bool, AzureError> {
    let build = message.plan.build.as_ref().expect("checked by the caller");
    for snapshot in &build.snapshots {
        match ctx.azure.get_snapshot(&snapshot.id).await? {
            Some(state) if state.provisioning_state == "Succeeded" => {}
            Some(state) if state.provisioning_state == "Failed" => {
                return Err(AzureError::permanent(
                    format!("snapshot {}", snapshot.id.name()),
                    "SnapshotFailed",
                    "the snapshot's provisioning failed",
                ));
            }
            _ => return Ok(false),
        }
    }
    Ok(true)
}
