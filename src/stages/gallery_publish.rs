//! Stage 3, `gallery-publish`: makes sure the gallery and the image definition exist (creating
//! them if the spec allows; a definition that exists must be Generalized and match the spec's OS
//! and generation, since Batch refuses anything else), registers `Microsoft.Batch` where a pool's
//! account lives in another subscription than the gallery, then PUTs the image version with its
//! target regions, replica counts, storage type, end of life and `excludeFromLatest` (true while
//! promotion is gated). Each step after an earlier try re-reads Azure, so a replay picks up
//! wherever the last one was; what it finds there that its own run made (the tags say) and did not
//! record — an earlier try was killed before its commit — it records as created then (once: the
//! message remembers). A first try takes the planner's reading of the definition and of a new
//! nightly version as read (`Plan::seen`).

use std::ops::ControlFlow;

use super::common::{Settled, fail, follow, look_again, made_in_admission, settle, tags, target_regions};
use super::{Outcome, Step, StepContext};
use crate::azure::api::{Accepted, DefinitionInfo, DefinitionRequest, VersionRequest};
use crate::azure::{AzureError, ProvisioningState, RegistrationState};
use crate::events::EventKind;
use crate::model::envelope::{Envelope, Phase, Stage};
use crate::model::plan::Presence;
use crate::model::rules;

/// Resources this step found made by its own run but not recorded yet (an earlier try created
/// them and was killed before its commit), and those it recorded itself.
#[derive(Default)]
struct Adopted {
    events: Vec<EventKind>,
    recorded: Vec<String>,
}

impl Adopted {
    /// A resource this run made: recorded as created unless the message says it was already.
    fn ours(&mut self, id: String, tags: &crate::azure::api::Tags, message: &Envelope) {
        if made_in_admission(tags, message) && !message.artifacts.recorded.contains(&id) {
            self.events.push(EventKind::ResourceCreated { id: id.clone() });
            self.recorded.push(id);
        }
    }
}

pub async fn step(message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let mut adopted = Adopted::default();
    let mut step = publish(message, ctx, &mut adopted).await?;
    // What was recorded travels on, so a later look does not record it again.
    let outgoing: Vec<&mut Envelope> = match &mut step.outcome {
        Outcome::Wait { message, .. } => vec![message.as_mut()],
        Outcome::Advance(messages) => messages.iter_mut().collect(),
        Outcome::Done | Outcome::Fail(_) => Vec::new(),
    };
    for message in outgoing {
        message.artifacts.recorded.extend(adopted.recorded.iter().cloned());
    }
    step.events.splice(0..0, adopted.events);
    Ok(step)
}

/// Where a part of the step leaves it: on to the next part, or ending with this step (a wait or
/// a failure).
type Part = Result<Option<Step>, AzureError>;

async fn publish(message: Envelope, ctx: &StepContext<'_>, adopted: &mut Adopted) -> Result<Step, AzureError> {
    let finished = match own_operation(&message, ctx).await? {
        Ok(finished) => finished,
        Err(step) => return Ok(step),
    };
    let planned = definition_as_planned(&message, ctx, finished);
    // The gallery is known to exist once its creation, or the definition's, has finished, or
    // when the planner found the definition in it.
    if !matches!(finished, Some(Phase::Gallery | Phase::Definition))
        && planned != Presence::Present
        && let Some(step) = ensure_gallery(&message, ctx, adopted).await?
    {
        return Ok(step);
    }
    if finished != Some(Phase::Definition)
        && let Some(step) = ensure_definition(&message, ctx, adopted, planned).await?
    {
        return Ok(step);
    }
    if let Some(step) = ensure_batch_registered(&message, ctx).await? {
        return Ok(step);
    }
    put_version(message, ctx, adopted).await
}

/// What this try may take from the planner's reading of the image definition instead of reading
/// it again ([`StepContext::as_planned`]): it was ready (and so was its gallery), or it was absent
/// and no earlier state of this stage has got as far as writing it (this is the stage's first
/// state, or the one after the gallery it made). `Unknown`: read it.
fn definition_as_planned(message: &Envelope, ctx: &StepContext<'_>, finished: Option<Phase>) -> Presence {
    let written_since = message.operation.is_some() && finished != Some(Phase::Gallery);
    match ctx.as_planned(message.plan.seen.definition) {
        Presence::Absent if written_since => Presence::Unknown,
        planned => planned,
    }
}

/// The operation this stage started last time: what it finished (which needs no second look),
/// or the step that waits for it or fails with it.
async fn own_operation(message: &Envelope, ctx: &StepContext<'_>) -> Result<Result<Option<Phase>, Step>, AzureError> {
    let Some(op) = message.operation.as_ref().filter(|op| !op.status_urls.is_empty()) else {
        return Ok(Ok(None));
    };
    Ok(match settle(ctx, &op.status_urls).await? {
        Settled::Done => Ok(Some(op.what)),
        Settled::Pending(urls, hint) => Err(follow(message.clone(), op.what, urls, hint, ctx)),
        Settled::Failed(reason) => Err(fail(format!("{} failed: {reason}", op.what.as_str()))),
    })
}

/// `id` was just asked for: recorded as created, then waited for.
fn created(
    message: &Envelope,
    what: Phase,
    id: String,
    accepted: Accepted,
    ctx: &StepContext<'_>,
    adopted: &mut Adopted,
) -> Step {
    adopted.recorded.push(id.clone());
    let urls = accepted.status_url.into_iter().collect();
    follow(message.clone(), what, urls, accepted.retry_after, ctx).with(EventKind::ResourceCreated { id })
}

/// The gallery exists and has succeeded, or is created if the spec allows.
async fn ensure_gallery(message: &Envelope, ctx: &StepContext<'_>, adopted: &mut Adopted) -> Part {
    let plan = &message.plan;
    Ok(match ctx.azure.get_gallery(&plan.gallery).await? {
        None if plan.create_gallery => {
            let accepted = ctx
                .azure
                .put_gallery(&plan.gallery, &plan.gallery_region, &tags(message))
                .await?;
            Some(created(
                message,
                Phase::Gallery,
                plan.gallery.to_string(),
                accepted,
                ctx,
                adopted,
            ))
        }
        None => Some(fail(format!(
            "gallery {} does not exist and the spec does not allow creating it",
            plan.gallery
        ))),
        Some(state) if state.provisioning_state == ProvisioningState::Failed => {
            Some(fail(format!("gallery {} is in state Failed", plan.gallery)))
        }
        Some(state) => {
            adopted.ours(plan.gallery.to_string(), &state.tags, message);
            (state.provisioning_state != ProvisioningState::Succeeded)
                .then(|| look_again(message.clone(), Phase::Gallery, ctx))
        }
    })
}

/// The image definition exists, is Generalized and of the pipeline's OS, and has succeeded; or
/// is created from the spec. `planned`: what [`definition_as_planned`] lets this try take as read.
async fn ensure_definition(
    message: &Envelope,
    ctx: &StepContext<'_>,
    adopted: &mut Adopted,
    planned: Presence,
) -> Part {
    let (plan, spec) = (&message.plan, &message.spec.definition);
    let found = match planned {
        Presence::Present => return Ok(None),
        Presence::Absent => None,
        Presence::Unknown => ctx.azure.get_definition(&plan.definition).await?,
    };
    let existing = match found {
        Some(existing) => existing,
        None => match create_definition(message, ctx, adopted).await? {
            ControlFlow::Continue(existing) => existing,
            ControlFlow::Break(step) => return Ok(Some(step)),
        },
    };
    adopted.ours(plan.definition.to_string(), &existing.tags, message);
    if let Err(mismatch) = rules::definition_fits(&existing.os_state, &existing.os_type, spec.os_type.as_str()) {
        return Ok(Some(fail(format!("image definition {} {mismatch}", plan.definition))));
    }
    Ok(match existing.provisioning_state {
        ProvisioningState::Succeeded => None,
        ProvisioningState::Failed => Some(fail(format!("image definition {} is in state Failed", plan.definition))),
        _ => Some(look_again(message.clone(), Phase::Definition, ctx)),
    })
}

/// PUTs the definition: the step that waits for it once created (`Break`); or, when Azure answers
/// that it was there after all (made since it was read, or this PUT's own answer was lost and it
/// was sent again), the definition as it is, read back to judge what it is and whose (`Continue`).
async fn create_definition(
    message: &Envelope,
    ctx: &StepContext<'_>,
    adopted: &mut Adopted,
) -> Result<ControlFlow<Step, DefinitionInfo>, AzureError> {
    let id = &message.plan.definition;
    let accepted = ctx.azure.put_definition(id, &definition_request(message)).await?;
    if accepted.created {
        let step = created(message, Phase::Definition, id.to_string(), accepted, ctx, adopted);
        return Ok(ControlFlow::Break(step));
    }
    Ok(match ctx.azure.get_definition(id).await? {
        Some(existing) => ControlFlow::Continue(existing),
        None => ControlFlow::Break(look_again(message.clone(), Phase::Definition, ctx)),
    })
}

/// The image definition as the spec describes it, tagged as this run's.
fn definition_request(message: &Envelope) -> DefinitionRequest {
    let spec = &message.spec.definition;
    DefinitionRequest {
        location: message.plan.gallery_region.clone(),
        os_type: spec.os_type.as_str().to_string(),
        os_state: spec.os_state.clone(),
        hyper_v_generation: spec.hyper_v_generation.clone(),
        publisher: spec.publisher.clone(),
        offer: spec.offer.clone(),
        sku: spec.sku.clone(),
        tags: tags(message),
    }
}

/// `Microsoft.Batch` registered in the gallery's subscription where a pool's account lives in
/// another (Batch reads the image through it).
async fn ensure_batch_registered(message: &Envelope, ctx: &StepContext<'_>) -> Part {
    for subscription in &message.plan.register_batch_in {
        match ctx.azure.provider_state(subscription, "Microsoft.Batch").await? {
            RegistrationState::Registered => {}
            RegistrationState::Registering => return Ok(Some(look_again(message.clone(), Phase::Registration, ctx))),
            _ => {
                ctx.azure.register_provider(subscription, "Microsoft.Batch").await?;
                return Ok(Some(look_again(message.clone(), Phase::Registration, ctx)));
            }
        }
    }
    Ok(None)
}

/// PUTs the image version (or finds this run's own, unchanged) and moves on to `replicate`.
async fn put_version(message: Envelope, ctx: &StepContext<'_>, adopted: &mut Adopted) -> Result<Step, AzureError> {
    let plan = message.plan.clone();
    let Some(source) = message
        .artifacts
        .image
        .clone()
        .or_else(|| plan.build.as_ref().map(|b| b.image.clone()))
    else {
        return Ok(fail("no managed image to publish from"));
    };
    let location = plan
        .build
        .as_ref()
        .map(|b| b.region.clone())
        .unwrap_or_else(|| plan.gallery_region.clone());
    // A version that exists already is this run's (a replay) or someone else's (refused: versions
    // are immutable). A replay changes nothing: not its end of life, and not "latest" after
    // verify promoted it.
    // A first try of a run planned with its version absent has nothing to find: only this step
    // makes it.
    let existing = if ctx.as_planned(plan.seen.version) == Presence::Absent {
        None
    } else {
        ctx.azure.get_version(&plan.version_id, false).await?
    };
    if let Some(version) = &existing {
        adopted.ours(plan.version_id.to_string(), &version.tags, &message);
        let same_source = version.source.as_deref().is_some_and(|s| {
            s.trim_start_matches('/')
                .eq_ignore_ascii_case(source.to_string().trim_start_matches('/'))
        });
        if !same_source {
            return Ok(fail(format!(
                "image version {} already exists from another source ({}); a version cannot be published twice",
                plan.version_id,
                version.source.as_deref().unwrap_or("unknown")
            )));
        }
        let mut have: Vec<(String, u32)> = version.target_regions.clone();
        let mut want: Vec<(String, u32)> = plan.regions.iter().map(|r| (r.name.clone(), r.replicas)).collect();
        have.sort();
        want.sort();
        if have == want {
            let mut next = message.next(Stage::Replicate, ctx.now);
            next.artifacts.image_version = Some(plan.version_id.clone());
            return Ok(Step::new(Outcome::Advance(vec![next])));
        }
    }
    let promoted = existing.as_ref().is_some_and(|v| !v.exclude_from_latest) && !plan.final_excluded;
    let request = VersionRequest {
        location,
        source,
        regions: target_regions(&plan, &[]),
        storage_account_type: message.spec.publish.storage_account_type.clone(),
        exclude_from_latest: plan.publish_excluded && !promoted,
        end_of_life: plan
            .end_of_life
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
        tags: tags(&message),
    };
    let accepted = ctx.azure.put_version(&plan.version_id, &request).await?;
    let mut next = message.next(Stage::Replicate, ctx.now);
    next.artifacts.image_version = Some(plan.version_id.clone());
    let created = accepted.created && existing.is_none();
    if created {
        // verify promotes a version its admission made without reading it first.
        adopted.recorded.push(plan.version_id.to_string());
    }
    let step = Step::new(Outcome::Advance(vec![next]));
    Ok(if created {
        step.with(EventKind::ResourceCreated {
            id: plan.version_id.to_string(),
        })
    } else {
        step
    })
}
