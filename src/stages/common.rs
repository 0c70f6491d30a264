//! What several stages share: tags for created resources, turning a wait into an outcome, settling
//! a set of Azure operations, and converting Azure-time estimates into real delays.

use std::time::Duration;

use time::OffsetDateTime;

use super::{Outcome, StageSettings, Step, StepContext};
use crate::azure::AzureError;
use crate::azure::api::{OperationStatus, Tags, TargetRegion};
use crate::events::EventKind;
use crate::model::envelope::{Envelope, InFlight, Phase};
use crate::model::plan::Plan;

/// The tag (and pool metadata) key naming the admission of the run that made a resource.
pub const ADMISSION: &str = "sigrun-admission";

/// Whether a resource's tags say this run (any admission of it) made it.
pub fn made_by_run(tags: &Tags, message: &Envelope) -> bool {
    tags.get("sigrun-run") == Some(&message.run_id.to_string())
}

/// Whether a resource's tags (or a pool's metadata) say this admission of the run made it: an
/// earlier try of a step, killed before it recorded what it made. (A resource of an earlier run
/// of the same version carries that run's admission.)
pub fn made_in_admission(tags: &Tags, message: &Envelope) -> bool {
    !message.admission.is_nil() && tags.get(ADMISSION) == Some(&message.admission.to_string())
}

/// Tags on every resource sigrun creates: which pipeline, run and version made it, and in which
/// admission of the run.
pub fn tags(message: &Envelope) -> Tags {
    let mut tags = Tags::from([
        ("sigrun-pipeline".to_string(), message.pipeline.clone()),
        ("sigrun-run".to_string(), message.run_id.to_string()),
        ("sigrun-version".to_string(), message.version.clone()),
    ]);
    if !message.admission.is_nil() {
        tags.insert(ADMISSION.to_string(), message.admission.to_string());
    }
    tags
}

impl StageSettings {
    /// A span of Azure time (an estimate, a documented duration) as real time here.
    pub fn real(&self, azure_time: Duration) -> Duration {
        azure_time.mul_f64(self.azure_time_factor)
    }

    /// A delay clamped to the configured poll bounds (in Azure time).
    pub fn clamp(&self, delay: Duration) -> Duration {
        delay.clamp(self.real(self.poll_min), self.real(self.poll_max))
    }

    pub fn default_poll(&self) -> Duration {
        self.real(self.poll_default)
    }
}

/// Keeps waiting on `what`: records the operation in flight and when to look next.
pub fn wait(
    mut message: Envelope,
    what: Phase,
    status_urls: Vec<String>,
    delay: Duration,
    now: OffsetDateTime,
) -> Outcome {
    let started = match &message.operation {
        Some(op) if op.what == what => op.started,
        _ => now,
    };
    let (polls, progress) = match message.operation.take() {
        Some(op) if op.what == what => (op.polls + 1, op.progress),
        _ => (0, Default::default()),
    };
    message.operation = Some(InFlight {
        what,
        status_urls,
        started,
        not_before: now + delay,
        polls,
        progress,
    });
    Outcome::Wait {
        message: Box::new(message),
        delay,
        emit: Vec::new(),
    }
}

/// A wait with its event.
pub fn wait_step(
    message: Envelope,
    what: Phase,
    status_urls: Vec<String>,
    delay: Duration,
    now: OffsetDateTime,
) -> Step {
    let first = message.operation.as_ref().is_none_or(|op| op.what != what);
    let step = Step::new(wait(message, what, status_urls, delay, now));
    if first {
        step.with(EventKind::Waiting {
            what: what.as_str().to_string(),
        })
    } else {
        step
    }
}

/// The status URLs a message follows when it waits on `what`; `None` on the step's first look.
pub fn awaited(message: &Envelope, what: Phase) -> Option<Vec<String>> {
    message
        .operation
        .as_ref()
        .filter(|op| op.what == what)
        .map(|op| op.status_urls.clone())
}

/// Looks again after the default poll, with no operation to follow: something is still being made.
pub fn look_again(message: Envelope, what: Phase, ctx: &StepContext<'_>) -> Step {
    wait_step(message, what, Vec::new(), ctx.settings.default_poll(), ctx.now)
}

/// Follows Azure's operations (`status_urls`), looking again after its hint or the default poll.
pub fn follow(
    message: Envelope,
    what: Phase,
    status_urls: Vec<String>,
    hint: Option<Duration>,
    ctx: &StepContext<'_>,
) -> Step {
    wait_step(message, what, status_urls, after_hint(ctx.settings, hint), ctx.now)
}

/// Where a set of operations stands.
pub enum Settled {
    /// All succeeded.
    Done,
    /// Some still run: their URLs and the shortest Retry-After among them.
    Pending(Vec<String>, Option<Duration>),
    /// One failed.
    Failed(String),
}

/// Reads each operation's status URL once.
pub async fn settle(ctx: &StepContext<'_>, urls: &[String]) -> Result<Settled, AzureError> {
    let mut pending = Vec::new();
    let mut hint: Option<Duration> = None;
    for url in urls {
        match ctx.azure.operation_status(url).await? {
            OperationStatus::Succeeded => {}
            OperationStatus::InProgress { retry_after } => {
                pending.push(url.clone());
                if let Some(r) = retry_after {
                    hint = Some(hint.map_or(r, |h| h.min(r)));
                }
            }
            OperationStatus::Failed { code, message } => return Ok(Settled::Failed(format!("{code}: {message}"))),
        }
    }
    Ok(if pending.is_empty() {
        Settled::Done
    } else {
        Settled::Pending(pending, hint)
    })
}

/// The delay after an Azure hint: the hint itself (never sooner), else the default poll.
pub fn after_hint(settings: &StageSettings, hint: Option<Duration>) -> Duration {
    hint.unwrap_or_else(|| settings.default_poll())
}

pub fn fail(reason: impl Into<String>) -> Step {
    Step::new(Outcome::Fail(reason.into()))
}

/// The plan's target regions as the version takes them, leaving out `except` (failed regions
/// being removed, or failed for good).
pub fn target_regions(plan: &Plan, except: &[&str]) -> Vec<TargetRegion> {
    plan.regions
        .iter()
        .filter(|r| !except.contains(&r.name.as_str()))
        .map(|r| TargetRegion {
            name: r.name.clone(),
            replicas: r.replicas,
            storage_account_type: r.storage_account_type.clone(),
        })
        .collect()
}

/// Failed looks in a row after which a side effect (retiring previous pools, deleting
/// intermediates) gives up with a warning.
const SIDE_EFFECT_MAX_FAILURES: u32 = 5;

/// What follows a side effect's failed look.
pub enum SideEffectRetry {
    /// Azure refused for good, or it failed too many times in a row: report it and end.
    GiveUp,
    /// Look again on `what` after a backoff (at least Azure's Retry-After), with its `Retried`.
    Again(Step),
}

/// The one retry rule of the side effects that never fail their branch (`doing` names the effect
/// in the `Retried` event): backoff doubling from a quarter of the default poll, counted in
/// `artifacts.side_effect_failures`.
pub fn retry_side_effect(
    mut message: Envelope,
    what: Phase,
    error: &AzureError,
    doing: &str,
    ctx: &StepContext<'_>,
) -> SideEffectRetry {
    if error.is_paced() {
        // Held back for the request budget, never sent: no failure, no event; look again then.
        let delay = error.retry_after.unwrap_or_default();
        return SideEffectRetry::Again(Step::new(wait(message, what, Vec::new(), delay, ctx.now)));
    }
    let failures = message.artifacts.side_effect_failures.saturating_add(1);
    if error.class() == crate::azure::ErrorClass::Permanent || failures >= SIDE_EFFECT_MAX_FAILURES {
        tracing::warn!(%error, failures, "{doing} failed; the run goes on with a warning");
        return SideEffectRetry::GiveUp;
    }
    message.artifacts.side_effect_failures = failures;
    let backoff = ctx
        .settings
        .default_poll()
        .mul_f64(f64::from(1u32 << failures.min(6)) / 4.0);
    let delay = backoff.max(error.retry_after.unwrap_or_default());
    SideEffectRetry::Again(
        Step::new(wait(message, what, Vec::new(), delay, ctx.now)).with(EventKind::Retried {
            attempt: failures,
            error: format!("{doing}: {error}"),
        }),
    )
}
