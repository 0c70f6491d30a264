//! The clean-up branch (`[retention] intermediates = "delete"`, the default): once the trunk has
//! confirmed what replaces them, a run's intermediates are deleted beside it — its snapshots once
//! the managed image Succeeded (scheduled by `image-create`), its image once every region of the
//! version has ended (scheduled by `replicate`). Each is a branch of its own (`Branch::CleanUp`)
//! on the queue of the stage that scheduled it, so a slow or failing delete never holds up the
//! trunk, and its retries are its own.
//!
//! The first look deletes each snapshot the trunk made in this admission (`artifacts.recorded`: its
//! `ResourceCreated` went out minutes ago, so its tags were the run's) without reading it first,
//! and remembers it in `artifacts.deleting`. Any other intermediate (the image, made hours before
//! its clean-up; one the run found made by an earlier admission; one named by a run that started
//! past its stage) is read first and deleted only when it carries the run's `sigrun-run` tag: a
//! resource someone else made under the same name is never touched. The next look comes when the
//! slowest delete's `Retry-After` says (the default poll without one) and reads what is being
//! deleted: one that Azure no longer finds is confirmed gone (`ResourceDeleted`). The branch ends
//! with `CleanUpFinished` once nothing is left. Like the rollout, a clean-up never fails its run:
//! failures are retried with backoff and, when they persist, when Azure refuses, or when deletes do
//! not finish within `GIVE_UP_AFTER`, the branch ends with `CleanUpFinished { failed }`, a warning
//! in the run's result naming what stayed.

use std::time::Duration;

use super::common::{SideEffectRetry, after_hint, retry_side_effect, wait_step};
use super::{Outcome, Step, StepContext};
use crate::azure::api::ResourceState;
use crate::azure::{AzureError, ProvisioningState};
use crate::events::{DeletedKind, EventKind};
use crate::model::envelope::{Branch, Envelope, Intermediate, Phase, message_id};
use crate::model::ids::{ImageId, SnapshotId};
use crate::model::spec::{Intermediates, duration};

const WHAT: Phase = Phase::Delete;

/// How long (Azure time) deletes may take before the branch gives up on them.
const GIVE_UP_AFTER: Duration = Duration::from_secs(3600);

/// Whether the message is a clean-up branch's.
pub fn is_clean_up(message: &Envelope) -> bool {
    matches!(message.branch, Branch::CleanUp { .. })
}

/// The clean-up of `what`, to go out with the trunk step that confirmed what replaces it (and the
/// event that tells the run to wait for it); none when the pipeline keeps its intermediates or
/// the run built nothing.
pub fn schedule(trunk: &Envelope, what: Intermediate, ctx: &StepContext<'_>) -> Option<(Envelope, EventKind)> {
    if trunk.spec.retention.intermediates == Intermediates::Keep || trunk.plan.build.is_none() {
        return None;
    }
    let mut child = trunk.next(trunk.stage, ctx.now);
    child.branch = Branch::CleanUp { what };
    child.message_id = message_id(trunk.run_id, trunk.stage, &child.branch);
    child.artifacts.deleting.clear();
    child.artifacts.side_effect_failures = 0;
    Some((child, EventKind::CleanUpScheduled { what }))
}

pub async fn step(mut message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let Branch::CleanUp { what } = message.branch else {
        return Ok(Step::new(Outcome::Fail(
            "a clean-up step on a branch that is not one".into(),
        )));
    };
    let mut gone = Vec::new();
    let looked = look(&mut message, what, &mut gone, ctx).await;
    let mut step = match looked {
        Ok(Looked { left: 0, .. }) => finished(what, None),
        Ok(Looked { hint, .. }) => keep_waiting(message, what, hint, ctx),
        Err(error) => failed(message, what, &error, ctx),
    };
    let confirmed = gone.into_iter().map(|r| EventKind::ResourceDeleted {
        what: r.kind(),
        id: r.id(),
    });
    step.events.splice(0..0, confirmed);
    Ok(step)
}

/// What one look found.
struct Looked {
    /// Intermediates still there.
    left: usize,
    /// The longest `Retry-After` of the deletes this look asked for: when all of them may be gone.
    hint: Option<Duration>,
}

impl Looked {
    /// `id` is still there and being deleted: the next look reads it to confirm it gone.
    fn still_deleting(&mut self, deleting: &mut Vec<String>, id: String) {
        if !deleting.contains(&id) {
            deleting.push(id);
        }
        self.left += 1;
    }
}

/// One look at every intermediate: deletes the run's that are still there and confirms gone what
/// it deleted before (into `gone`).
async fn look(
    message: &mut Envelope,
    what: Intermediate,
    gone: &mut Vec<Resource>,
    ctx: &StepContext<'_>,
) -> Result<Looked, AzureError> {
    let mut looked = Looked { left: 0, hint: None };
    for resource in intermediates(message, what) {
        if !delete_made_here(message, &resource, &mut looked, ctx).await? {
            read_then_delete(message, resource, gone, &mut looked, ctx).await?;
        }
    }
    Ok(looked)
}

/// Deletes a snapshot this admission made without reading it first: its tags were the run's when
/// it was made, minutes ago (only the image was made since). It moves from `recorded` to
/// `deleting`, so the reads after the delete confirm it gone and nothing deletes it twice. The
/// image is always read first: the hours of replication since its making leave time for a
/// same-named one of someone else's to take its place. Returns whether it was deleted here.
async fn delete_made_here(
    message: &mut Envelope,
    resource: &Resource,
    looked: &mut Looked,
    ctx: &StepContext<'_>,
) -> Result<bool, AzureError> {
    let id = resource.id();
    let artifacts = &mut message.artifacts;
    let made_here = artifacts.recorded.iter().position(|r| *r == id);
    let (Resource::Snapshot(_), Some(at)) = (resource, made_here) else {
        return Ok(false);
    };
    looked.hint = looked.hint.max(resource.delete(ctx).await?);
    artifacts.recorded.remove(at);
    looked.still_deleting(&mut artifacts.deleting, id);
    Ok(true)
}

/// Reads an intermediate: deletes it when it carries the run's tag and is not being deleted
/// already (a resource someone else made under the same name is never touched), confirms it gone
/// when a delete was asked for and Azure no longer finds it.
async fn read_then_delete(
    message: &mut Envelope,
    resource: Resource,
    gone: &mut Vec<Resource>,
    looked: &mut Looked,
    ctx: &StepContext<'_>,
) -> Result<(), AzureError> {
    let id = resource.id();
    let run = message.run_id.to_string();
    let deleting = &mut message.artifacts.deleting;
    match resource.read(ctx).await? {
        None => {
            if let Some(at) = deleting.iter().position(|d| *d == id) {
                deleting.remove(at);
                gone.push(resource);
            }
        }
        Some(found) if found.tags.get("sigrun-run") == Some(&run) => {
            if found.provisioning_state != ProvisioningState::Deleting {
                looked.hint = looked.hint.max(resource.delete(ctx).await?);
            }
            looked.still_deleting(deleting, id);
        }
        Some(_) => tracing::warn!(%id, "intermediate not deleted: another run made it"),
    }
    Ok(())
}

/// A resource of the run's intermediates.
#[derive(Debug, Clone, PartialEq)]
enum Resource {
    Snapshot(SnapshotId),
    Image(ImageId),
}

impl Resource {
    fn kind(&self) -> DeletedKind {
        match self {
            Resource::Snapshot(_) => DeletedKind::Snapshot,
            Resource::Image(_) => DeletedKind::Image,
        }
    }

    fn id(&self) -> String {
        match self {
            Resource::Snapshot(id) => id.to_string(),
            Resource::Image(id) => id.to_string(),
        }
    }

    /// Its state and tags; `None` once Azure no longer finds it.
    async fn read(&self, ctx: &StepContext<'_>) -> Result<Option<ResourceState>, AzureError> {
        match self {
            Resource::Snapshot(id) => ctx.azure.get_snapshot(id).await,
            Resource::Image(id) => ctx.azure.get_image(id).await,
        }
    }

    /// Asks for its delete; returns Azure's `Retry-After`, if it gave one.
    async fn delete(&self, ctx: &StepContext<'_>) -> Result<Option<Duration>, AzureError> {
        match self {
            Resource::Snapshot(id) => ctx.azure.delete_snapshot(id).await,
            Resource::Image(id) => ctx.azure.delete_image(id).await,
        }
    }
}

/// Marks snapshot `id` as made in this admission (its `ResourceCreated` goes out with the step):
/// its clean-up deletes it without reading its tags first.
pub fn made_here(message: &mut Envelope, id: String) {
    if !message.artifacts.recorded.contains(&id) {
        message.artifacts.recorded.push(id);
    }
}

/// The trunk, having handed `what` to its clean-up (or keeping it), no longer carries which of
/// those it made: the ids stay with the clean-up branch alone, so later messages stay small.
pub fn hand_over(trunk: &mut Envelope, what: Intermediate) {
    let ids: Vec<String> = intermediates(trunk, what).iter().map(Resource::id).collect();
    trunk.artifacts.recorded.retain(|id| !ids.contains(id));
}

/// What the branch deletes, from what the trunk recorded.
fn intermediates(message: &Envelope, what: Intermediate) -> Vec<Resource> {
    match what {
        Intermediate::Snapshots => message
            .artifacts
            .snapshots
            .iter()
            .map(|s| Resource::Snapshot(s.id.clone()))
            .collect(),
        Intermediate::Image => message.artifacts.image.iter().cloned().map(Resource::Image).collect(),
    }
}

/// Deletes under way: look again when Azure's hint says (the default poll without one), unless
/// they have taken longer than `GIVE_UP_AFTER`.
fn keep_waiting(mut message: Envelope, what: Intermediate, hint: Option<Duration>, ctx: &StepContext<'_>) -> Step {
    let waited = message
        .operation
        .as_ref()
        .filter(|op| op.what == WHAT)
        .map_or(time::Duration::ZERO, |op| ctx.now - op.started);
    if waited > ctx.settings.real(GIVE_UP_AFTER) {
        let reason = format!(
            "still there after {}: {}",
            duration::format(GIVE_UP_AFTER),
            message.artifacts.deleting.join(", ")
        );
        return finished(what, Some(reason));
    }
    message.artifacts.side_effect_failures = 0;
    wait_step(message, WHAT, Vec::new(), after_hint(ctx.settings, hint), ctx.now)
}

/// The branch ends; `failed` is the warning when it gave up.
fn finished(what: Intermediate, failed: Option<String>) -> Step {
    Step::new(Outcome::Done).with(EventKind::CleanUpFinished { what, failed })
}

/// A look that failed: tried again with backoff, then given up with a warning.
fn failed(message: Envelope, what: Intermediate, error: &AzureError, ctx: &StepContext<'_>) -> Step {
    let doing = format!("deleting {}", what.as_str());
    match retry_side_effect(message, WHAT, error, &doing, ctx) {
        SideEffectRetry::GiveUp => finished(what, Some(format!("{doing}: {error}"))),
        SideEffectRetry::Again(step) => step,
    }
}
