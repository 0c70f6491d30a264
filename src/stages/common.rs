//! What several stages share: tags for created resources, turning a wait into an outcome, settling
//! a set of Azure operations, converting Azure-time estimates into real delays, and timing a look
//! from two progress readings.

use std::time::Duration;

use time::OffsetDateTime;

use super::{Outcome, StageSettings, Step, StepContext};
use crate::azure::AzureError;
use crate::azure::api::{OperationStatus, Tags, TargetRegion};
use crate::events::EventKind;
use crate::model::envelope::{Envelope, InFlight, Phase, Progress};
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

/// The delay after an Azure hint: the hint itself within the poll bounds (a Retry-After of 0
/// would poll without a pause, one of hours would park the look), else the default poll.
pub fn after_hint(settings: &StageSettings, hint: Option<Duration>) -> Duration {
    hint.map_or_else(|| settings.default_poll(), |hint| settings.clamp(hint))
}

/// The slowest pace (percent per second) two readings allow. Azure's percents are whole and
/// floored: a reading of `p` means somewhere in [p, p + 1), so `g` points gained may be as few as
/// `g - 1`. `None` when that bound is no progress at all (fewer than two points gained): such
/// readings cannot promise a look that is not early.
pub fn slowest_pace(before: Progress, now: Progress) -> Option<f64> {
    let (gained, elapsed) = gained_over(before, now).filter(|(gained, _)| *gained >= 2)?;
    Some(f64::from(gained - 1) / elapsed)
}

/// The points gained between two readings and the seconds between them; `None` unless both are
/// positive (nothing gained, gone back, or out of order).
fn gained_over(before: Progress, now: Progress) -> Option<(u8, f64)> {
    let elapsed = (now.at - before.at).as_seconds_f64();
    let gained = now.percent.checked_sub(before.percent).filter(|g| *g > 0)?;
    (elapsed > 0.0).then_some((gained, elapsed))
}

/// The latest moment, from now, at which `goal` percent may be reached at the slowest pace the two
/// readings allow, with as much left as the latest reading allows. A look timed by it comes after
/// the goal rather than before: an early look is a read that finds nothing and needs another.
pub fn latest_reach(before: Progress, now: Progress, goal: f64) -> Option<Duration> {
    let pace = slowest_pace(before, now)?;
    let left = (goal - f64::from(now.percent)).max(0.0) / pace;
    Duration::try_from_secs_f64(left).ok()
}

/// The moment, from now, at which `goal` percent is most likely reached: at the pace the two
/// readings show, from the middle of the latest one's point. For a look whose lateness is the
/// run's (the last one before a verdict), where the latest bound would cost minutes.
pub fn likely_reach(before: Progress, now: Progress, goal: f64) -> Option<Duration> {
    let (gained, elapsed) = gained_over(before, now)?;
    let pace = f64::from(gained) / elapsed;
    Duration::try_from_secs_f64((goal - f64::from(now.percent) - 0.5).max(0.0) / pace).ok()
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

/// How long (Azure time, from its stage's start) a side effect's throttled looks are waited out
/// without counting as failures. Azure's 429 says "not now", not "no": five of them in a row
/// under a busy subscription would leave a run's snapshots behind. Past this, they count again, so
/// a subscription throttled without end still ends the effect.
const SIDE_EFFECT_THROTTLED_FOR: Duration = Duration::from_secs(3600);

/// What follows a side effect's failed look.
pub enum SideEffectRetry {
    /// Azure refused for good, or it failed too many times in a row: report it and end.
    GiveUp,
    /// Look again on `what` after a backoff (at least Azure's Retry-After), with its `Retried`.
    Again(Step),
}

/// A side effect's backoff after `failures` failed looks: doubling from a quarter of the default
/// poll.
fn side_effect_backoff(ctx: &StepContext<'_>, failures: u32) -> Duration {
    ctx.settings
        .default_poll()
        .mul_f64(f64::from(1u32 << failures.min(6)) / 4.0)
}

/// The one retry rule of the side effects that never fail their branch (`doing` names the effect
/// in the `Retried` event): backoff doubling from a quarter of the default poll, counted in
/// `artifacts.side_effect_failures`. A throttled look waits out Azure's Retry-After with a
/// `Throttled` event and is not counted, for [`SIDE_EFFECT_THROTTLED_FOR`].
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
    if let crate::azure::ErrorClass::Throttled { retry_after } = error.class()
        && ctx.now - message.stage_started < ctx.settings.real(SIDE_EFFECT_THROTTLED_FOR)
    {
        let backoff = side_effect_backoff(ctx, message.artifacts.side_effect_failures.max(1));
        let delay = backoff.max(retry_after.unwrap_or_default());
        let retry_after_ms = retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        return SideEffectRetry::Again(
            Step::new(wait(message, what, Vec::new(), delay, ctx.now)).with(EventKind::Throttled { retry_after_ms }),
        );
    }
    let failures = message.artifacts.side_effect_failures.saturating_add(1);
    if error.class() == crate::azure::ErrorClass::Permanent || failures >= SIDE_EFFECT_MAX_FAILURES {
        tracing::warn!(%error, failures, "{doing} failed; the run goes on with a warning");
        return SideEffectRetry::GiveUp;
    }
    message.artifacts.side_effect_failures = failures;
    let delay = side_effect_backoff(ctx, failures).max(error.retry_after.unwrap_or_default());
    SideEffectRetry::Again(
        Step::new(wait(message, what, Vec::new(), delay, ctx.now)).with(EventKind::Retried {
            attempt: failures,
            error: format!("{doing}: {error}"),
        }),
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use time::OffsetDateTime;

    use super::*;

    fn reading(start: OffsetDateTime, secs: f64, pace: f64) -> Progress {
        Progress {
            at: start + time::Duration::seconds_f64(secs),
            percent: (secs * pace).floor().min(100.0) as u8,
        }
    }

    proptest! {
        /// Progress at a steady pace, read as Azure reads it (whole percents, floored), twice:
        /// the look timed by the two readings never comes before the end, and comes at most a
        /// bounded while after it.
        #[test]
        fn a_look_timed_by_two_readings_comes_after_the_end_not_before(
            total_secs in 60.0f64..20_000.0,
            first in 0.01f64..0.8,
            gap in 0.05f64..0.9,
        ) {
            let start = OffsetDateTime::UNIX_EPOCH;
            let pace = 100.0 / total_secs;
            let (t1, t2) = (first * total_secs, (first + gap * (1.0 - first)) * total_secs);
            let (before, now) = (reading(start, t1, pace), reading(start, t2, pace));
            prop_assume!(now.percent < 100 && now.percent >= before.percent + 2);
            let eta = latest_reach(before, now, 100.0).expect("a pace").as_secs_f64();
            let truth = total_secs - t2;
            prop_assert!(eta >= truth - 1e-6, "early: {eta} s against {truth} s");
            // Floored readings cost at most two points of pace and one of progress.
            let gained = f64::from(now.percent - before.percent);
            let bound = truth * (gained + 1.0) / (gained - 1.0) + 1.0 / pace * (gained + 1.0) / (gained - 1.0);
            prop_assert!(eta <= bound, "{eta} s is past {bound} s (truth {truth} s)");
        }
    }

    #[test]
    fn readings_without_progress_time_nothing() {
        let start = OffsetDateTime::UNIX_EPOCH;
        let at = |secs: i64, percent: u8| Progress {
            at: start + time::Duration::seconds(secs),
            percent,
        };
        assert_eq!(slowest_pace(at(0, 40), at(60, 40)), None, "nothing gained");
        assert_eq!(slowest_pace(at(60, 40), at(0, 50)), None, "out of order");
        assert_eq!(slowest_pace(at(0, 50), at(60, 40)), None, "gone back");
        assert_eq!(
            slowest_pace(at(0, 40), at(60, 41)),
            None,
            "one point may be almost none"
        );
        assert_eq!(slowest_pace(at(0, 40), at(60, 43)), Some(2.0 / 60.0));
        assert_eq!(
            latest_reach(at(0, 40), at(60, 43), 100.0),
            Some(Duration::from_secs(1710))
        );
        assert_eq!(
            latest_reach(at(0, 90), at(60, 99), 95.0),
            Some(Duration::ZERO),
            "past the goal"
        );
        assert_eq!(
            likely_reach(at(0, 40), at(60, 43), 100.0),
            Some(Duration::from_secs(1130))
        );
        assert_eq!(likely_reach(at(0, 40), at(60, 40), 100.0), None, "nothing gained");
    }
}
