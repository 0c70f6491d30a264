//! Stage 2, `image-create`: makes the managed image from the run's snapshots (OS snapshot, data
//! snapshots at their LUNs), in the snapshots' region, and waits for it. The image's name derives
//! from the run, so a replay PUTs the same image again.

use super::clean_up;
use super::common::{Settled, awaited, fail, follow, look_again, made_by_run, made_in_admission, settle, tags};
use super::{Outcome, Step, StepContext};
use crate::azure::api::ImageRequest;
use crate::azure::{AzureError, ProvisioningState};
use crate::events::EventKind;
use crate::model::envelope::{Envelope, Intermediate, Phase, Stage};

const WHAT: Phase = Phase::Image;

pub async fn step(message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let Some(build) = message.plan.build.clone() else {
        return Ok(fail("this run publishes an existing version; it makes no image"));
    };
    match awaited(&message, WHAT) {
        None => {
            let os = message.artifacts.snapshots.iter().find(|s| s.lun.is_none());
            let Some(os) = os else {
                return Ok(fail("no OS disk snapshot in the run's artifacts"));
            };
            let request = ImageRequest {
                location: build.region.clone(),
                os_type: build.os_type.clone(),
                hyper_v_generation: build.hyper_v_generation.clone(),
                os_snapshot: os.id.clone(),
                data_snapshots: message
                    .artifacts
                    .snapshots
                    .iter()
                    .filter_map(|s| s.lun.map(|lun| (lun, s.id.clone())))
                    .collect(),
                tags: tags(&message),
            };
            // This run's image may be there already: an earlier try made it (killed before its
            // commit), or another copy of the message is making it. Joined, not written again.
            // A first try has no earlier try to look for.
            let found = if ctx.first_try() {
                None
            } else {
                ctx.azure.get_image(&build.image).await?
            };
            let (accepted, created) = match found {
                Some(found) if made_by_run(&found.tags, &message) => (None, made_in_admission(&found.tags, &message)),
                _ => {
                    let accepted = ctx.azure.put_image(&build.image, &request).await?;
                    let created = accepted.created;
                    (Some(accepted), created)
                }
            };
            let (urls, hint) = match accepted {
                Some(accepted) => (accepted.status_url.into_iter().collect(), accepted.retry_after),
                None => (Vec::new(), None),
            };
            let mut step = follow(message, WHAT, urls, hint, ctx);
            if created {
                step = step.with(EventKind::ResourceCreated {
                    id: build.image.to_string(),
                });
            }
            Ok(step)
        }
        Some(urls) if urls.is_empty() => match ctx.azure.get_image(&build.image).await? {
            Some(state) if state.provisioning_state == ProvisioningState::Succeeded => Ok(advance(message, ctx)),
            Some(state) if state.provisioning_state == ProvisioningState::Failed => {
                Ok(fail(format!("managed image {} failed", build.image)))
            }
            _ => Ok(look_again(message, WHAT, ctx)),
        },
        Some(urls) => match settle(ctx, &urls).await? {
            Settled::Done => Ok(advance(message, ctx)),
            Settled::Pending(urls, hint) => Ok(follow(message, WHAT, urls, hint, ctx)),
            Settled::Failed(reason) => Ok(fail(format!("managed image {} failed: {reason}", build.image))),
        },
    }
}

/// The image exists: the trunk goes on to the gallery, and the snapshots, no longer needed, are
/// cleaned up beside it.
fn advance(mut message: Envelope, ctx: &StepContext<'_>) -> Step {
    message.artifacts.image = message.plan.build.as_ref().map(|b| b.image.clone());
    let mut trunk = message.next(Stage::GalleryPublish, ctx.now);
    clean_up::hand_over(&mut trunk, Intermediate::Snapshots);
    let mut next = vec![trunk];
    let mut events = Vec::new();
    if let Some((clean_up, scheduled)) = clean_up::schedule(&message, Intermediate::Snapshots, ctx) {
        next.push(clean_up);
        events.push(scheduled);
    }
    let mut step = Step::new(Outcome::Advance(next));
    step.events = events;
    step
}
