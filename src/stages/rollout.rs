//! Verify's last phase once the branch's own pool verified: the rollout policy (`[rollout]
//! previous_pool`), then retention (`retention.rs`: old versions, pools retired past their grace).
//! By the policy, the pools this pipeline made for the same target for *older* versions are scaled
//! to zero or deleted. Overlapping runs of one pipeline are the normal case, so what may be retired
//! is decided pool by pool:
//!
//! - only pools whose metadata says this pipeline made them for this target, never the branch's
//!   own, never one already deleting;
//! - only for a version older than the run's own, compared as version numbers (a newer run's pool
//!   is never touched, whatever the order the pools were made in);
//! - never one that a live run is still creating or verifying: the run history says; for a run
//!   the history does not hold (another `sigrun run` process, a history past its retention), the
//!   pool's own metadata says it verified (`sigrun-verified`, set by its run's verify), or else it
//!   was created longer than the verify deadline before this branch's own pool (both times from
//!   Batch, so no clock is mixed with another);
//! - a pool still resizing is waited for (Batch refuses to resize a pool that is not steady).
//!
//! Retiring and retention are effects of their own: its failures are retried here with backoff and, when they
//! persist, reported (`RetirementFailed`, and the run succeeds with a warning) — they never fail
//! the branch, whose pool verified, and never park it. The phase ends with `RolloutFinished`.

use std::time::Duration;

use time::OffsetDateTime;

use super::common::{SideEffectRetry, retry_side_effect, wait};
use super::{Outcome, Runs, Step, StepContext, retention};
use crate::azure::api::{PoolInfo, PoolList};
use crate::azure::{AllocationState, AzureError, PoolState};
use crate::events::{DeletedKind, EventKind};
use crate::model::envelope::{Branch, Envelope, Phase};
use crate::model::rules::ImageVersion;
use crate::model::spec::PreviousPool;

/// The operation a message in this phase waits on.
const RETIRING: Phase = Phase::Retire;

/// The pool metadata key verify sets on a pool once it verified.
pub const VERIFIED: &str = "sigrun-verified";

/// Whether the message is in the retire phase.
pub fn is_retiring(message: &Envelope) -> bool {
    message.operation.as_ref().is_some_and(|op| op.what == RETIRING)
}

/// What verify hands on once its pool verified: the same message in the retire phase, due now.
pub fn begin(message: Envelope, ctx: &StepContext<'_>) -> Outcome {
    wait(message, RETIRING, Vec::new(), Duration::ZERO, ctx.now)
}

pub async fn step(mut message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let mut events = Vec::new();
    let looked = match retire_older_pools(&message, &mut events, ctx).await {
        Ok((None, listed)) => retain(&message, listed, &mut events, ctx).await.map(|()| None),
        Ok((resizing, _)) => Ok(resizing),
        Err(error) => Err(error),
    };
    match looked {
        Ok(None) => Ok(finished(events)),
        Ok(Some(pool_id)) => {
            message.artifacts.side_effect_failures = 0;
            let mut step = Step::new(wait(
                message,
                RETIRING,
                Vec::new(),
                ctx.settings.default_poll(),
                ctx.now,
            ));
            step.events = events;
            tracing::info!(%pool_id, "a previous pool is still resizing; retiring it once it is steady");
            Ok(step)
        }
        Err(error) => Ok(failed(message, events, &error, ctx)),
    }
}

/// Retention (`[retention]`), judged by `retention`. Each branch deletes its own target's retired
/// pools; the versions are the first planned pool's branch's to delete, so a run asks for each
/// delete once. That branch surveys the definition's versions and every account of the run's
/// pools (a version a pool uses stays); the others only their own account's pools.
/// `listed` is the branch's own account as the rollout read it in the same step.
async fn retain(
    message: &Envelope,
    listed: Option<PoolList>,
    events: &mut Vec<EventKind>,
    ctx: &StepContext<'_>,
) -> Result<(), AzureError> {
    let (Branch::Pool { target, .. }, Some(own)) = (&message.branch, &message.artifacts.pool) else {
        return Ok(());
    };
    if !message.spec.retention.enabled {
        return Ok(());
    }
    let versions_are_ours = message.plan.pools.first().is_some_and(|p| p.target == *target);
    let definition = &message.plan.definition;
    let accounts: Vec<String> = if versions_are_ours {
        message.plan.pools.iter().map(|p| p.account_url.clone()).collect()
    } else {
        vec![own.account_url.clone()]
    };
    let known = listed.map(|list| (own.account_url.as_str(), list));
    let mut survey = retention::survey_pools(ctx.azure, definition, &accounts, known, ctx.now).await?;
    if versions_are_ours {
        survey.versions = retention::versions_of(ctx.azure, definition).await?;
    }
    let policy = retention::Policy {
        pipeline: message.pipeline.clone(),
        ..retention::Policy::of(&message.spec, ImageVersion::parse(&message.version))
    };
    let verdicts: Vec<retention::Verdict> = retention::judge(&survey, &policy, ctx.runs)
        .into_iter()
        .filter(|v| match v.kind {
            DeletedKind::Pool => v.target == *target && v.account_url == own.account_url,
            _ => versions_are_ours,
        })
        .collect();
    retention::apply(ctx.azure, &message.plan.definition, &verdicts, events).await
}

/// What the branch knows of itself, to judge the account's other pools by.
struct Own<'a> {
    pipeline: &'a str,
    target: &'a str,
    pool_id: &'a str,
    version: ImageVersion,
    policy: PreviousPool,
    /// A pool made less than this before the branch's own may still be verifying.
    young: Duration,
    /// When Batch made the branch's own pool (Batch's clock).
    created: Option<OffsetDateTime>,
}

/// What to do with one pool of the account.
#[derive(Debug, PartialEq)]
enum Judged {
    Leave,
    Retire,
    /// Retire it once its allocation is steady.
    WaitSteady,
}

/// Retires what the policy says (into `events`); returns a pool it must wait for, and the
/// account's pools as it read them with what it changed written in (retention judges that list
/// instead of reading the account again).
async fn retire_older_pools(
    message: &Envelope,
    events: &mut Vec<EventKind>,
    ctx: &StepContext<'_>,
) -> Result<(Option<String>, Option<PoolList>), AzureError> {
    let (Branch::Pool { target, .. }, Some(pool), Some(version)) = (
        &message.branch,
        &message.artifacts.pool,
        ImageVersion::parse(&message.version),
    ) else {
        // Nothing to judge others by: nothing is retired.
        return Ok((None, None));
    };
    if message.spec.rollout.previous_pool == PreviousPool::Keep {
        return Ok((None, None));
    }
    let mut listed = ctx.azure.list_pools_dated(&pool.account_url).await?;
    let pools = &listed.pools;
    let mut retired_now = Vec::new();
    let own = Own {
        pipeline: &message.pipeline,
        target,
        pool_id: &pool.pool_id,
        version,
        policy: message.spec.rollout.previous_pool,
        young: message.spec.verify.deadline,
        created: pools
            .iter()
            .find(|p| p.id.eq_ignore_ascii_case(&pool.pool_id))
            .and_then(|p| p.created),
    };
    let mut resizing = None;
    for previous in pools.iter() {
        match judge(previous, &own, ctx.runs) {
            Judged::Leave => {}
            Judged::WaitSteady => resizing = Some(previous.id.clone()),
            Judged::Retire => {
                let action = match own.policy {
                    PreviousPool::Delete => {
                        ctx.azure.delete_pool(&pool.account_url, &previous.id).await?;
                        "deleted"
                    }
                    _ => {
                        // Marked first: only pools the rollout retired are retention's to delete.
                        let mut metadata = previous.metadata.clone();
                        let now = ctx.now.format(&time::format_description::well_known::Rfc3339);
                        metadata.insert(retention::RETIRED.into(), now.unwrap_or_default());
                        ctx.azure
                            .set_pool_metadata(&pool.account_url, &previous.id, &metadata)
                            .await?;
                        ctx.azure.resize_pool(&pool.account_url, &previous.id, 0, 0).await?;
                        "scaled to zero"
                    }
                };
                events.push(EventKind::PreviousPoolRetired {
                    pool_id: previous.id.clone(),
                    action: action.to_string(),
                });
                retired_now.push((previous.id.clone(), own.policy == PreviousPool::Delete));
            }
        }
    }
    // The list as Azure now has it: a pool deleted here is deleting, one scaled to zero is
    // resizing under the retired mark (still using its version; not retention's until its grace).
    for (id, deleted) in retired_now {
        if let Some(listed_pool) = listed.pools.iter_mut().find(|p| p.id == id) {
            if deleted {
                listed_pool.state = PoolState::Deleting;
            } else {
                listed_pool.target_dedicated = 0;
                listed_pool.target_low_priority = 0;
                listed_pool.allocation_state = AllocationState::Resizing;
                listed_pool.metadata.insert(retention::RETIRED.into(), String::new());
            }
        }
    }
    Ok((resizing, Some(listed)))
}

/// Whether `pool` is one this branch retires now, later, or never.
fn judge(pool: &PoolInfo, own: &Own<'_>, runs: &dyn Runs) -> Judged {
    let meta = |key: &str| pool.metadata.get(key).map(String::as_str);
    let ours = meta("sigrun-pipeline") == Some(own.pipeline) && meta("sigrun-target") == Some(own.target);
    if !ours || pool.id.eq_ignore_ascii_case(own.pool_id) || pool.state != PoolState::Active {
        return Judged::Leave;
    }
    let older = meta("sigrun-version")
        .and_then(ImageVersion::parse)
        .is_some_and(|version| version < own.version);
    if !older || still_being_made(pool, own, runs) {
        return Judged::Leave;
    }
    let retired = match own.policy {
        PreviousPool::Keep => return Judged::Leave,
        PreviousPool::ScaleToZero => pool.target_dedicated == 0 && pool.target_low_priority == 0,
        PreviousPool::Delete => false,
    };
    match (retired, own.policy, &pool.allocation_state) {
        (true, _, _) => Judged::Leave,
        (false, PreviousPool::ScaleToZero, state) if *state != AllocationState::Steady => Judged::WaitSteady,
        (false, _, _) => Judged::Retire,
    }
}

/// Whether a live run may still be creating or verifying `pool`: the history says, or, for a run
/// it does not hold, the pool has not said it verified and was made less than the verify deadline
/// before the branch's own.
fn still_being_made(pool: &PoolInfo, own: &Own<'_>, runs: &dyn Runs) -> bool {
    let run = pool
        .metadata
        .get("sigrun-run")
        .and_then(|r| uuid::Uuid::parse_str(r).ok());
    if let Some(in_progress) = run.and_then(|run| runs.pool_in_progress(run, own.target)) {
        return in_progress;
    }
    if pool.metadata.get(VERIFIED).is_some_and(|v| v == "true") {
        return false;
    }
    match (pool.created, own.created) {
        (Some(theirs), Some(ours)) => ours - theirs < own.young,
        _ => true,
    }
}

/// The phase ends: what was retired, and the end of the rollout.
fn finished(mut events: Vec<EventKind>) -> Step {
    events.push(EventKind::RolloutFinished);
    let mut step = Step::new(Outcome::Done);
    step.events = events;
    step
}

/// A look that failed: tried again with backoff, then reported. The branch's pool verified, so
/// the branch ends well either way; what this look retired is recorded either way.
fn failed(message: Envelope, mut events: Vec<EventKind>, error: &AzureError, ctx: &StepContext<'_>) -> Step {
    match retry_side_effect(message, RETIRING, error, "retiring previous pools", ctx) {
        SideEffectRetry::GiveUp => {
            events.push(EventKind::RetirementFailed {
                reason: error.to_string(),
            });
            finished(events)
        }
        SideEffectRetry::Again(mut step) => {
            step.events.splice(0..0, events);
            step
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use uuid::Uuid;

    use super::*;
    use crate::stages::NoHistory;

    struct Live(Vec<Uuid>);

    impl Runs for Live {
        fn pool_in_progress(&self, run_id: Uuid, _target: &str) -> Option<bool> {
            Some(self.0.contains(&run_id))
        }

        fn run_in_progress(&self, run_id: Uuid) -> Option<bool> {
            Some(self.0.contains(&run_id))
        }
    }

    fn pool(id: &str, version: &str, run: Uuid, created_secs_ago: i64) -> PoolInfo {
        PoolInfo {
            id: id.into(),
            vm_size: "Standard_D4s_v5".into(),
            state: PoolState::Active,
            allocation_state: AllocationState::Steady,
            current_dedicated: 2,
            current_low_priority: 0,
            target_dedicated: 2,
            target_low_priority: 0,
            resize_errors: Vec::new(),
            metadata: BTreeMap::from([
                ("sigrun-pipeline".to_string(), "nightly".to_string()),
                ("sigrun-target".to_string(), "render".to_string()),
                ("sigrun-version".to_string(), version.to_string()),
                ("sigrun-run".to_string(), run.to_string()),
            ]),
            image_id: None,
            created: Some(OffsetDateTime::now_utc() - time::Duration::seconds(created_secs_ago)),
            allocation_changed: None,
        }
    }

    fn own(policy: PreviousPool) -> Own<'static> {
        Own {
            pipeline: "nightly",
            target: "render",
            pool_id: "render-2026-1202-0",
            version: ImageVersion::parse("2026.1202.0").unwrap(),
            policy,
            young: Duration::from_secs(3 * 3600),
            created: Some(OffsetDateTime::now_utc()),
        }
    }

    fn judged(pool: &PoolInfo, policy: PreviousPool, runs: &dyn Runs) -> Judged {
        judge(pool, &own(policy), runs)
    }

    #[test]
    fn only_older_versions_of_the_same_pipeline_and_target_are_retired() {
        let done = Live(Vec::new());
        let older = pool("render-2026-1201-0", "2026.1201.0", Uuid::new_v4(), 86400);
        assert_eq!(judged(&older, PreviousPool::ScaleToZero, &done), Judged::Retire);
        assert_eq!(judged(&older, PreviousPool::Delete, &done), Judged::Retire);
        assert_eq!(judged(&older, PreviousPool::Keep, &done), Judged::Leave);
        // Made later, but for an older version: still older. Newer or equal versions: never.
        let newer = pool("render-2026-1203-0", "2026.1203.0", Uuid::new_v4(), 86400);
        assert_eq!(judged(&newer, PreviousPool::ScaleToZero, &done), Judged::Leave);
        let tenth = pool("render-2026-1202-10", "2026.1202.10", Uuid::new_v4(), 86400);
        assert_eq!(judged(&tenth, PreviousPool::ScaleToZero, &done), Judged::Leave);
        let mut other_target = older.clone();
        other_target.metadata.insert("sigrun-target".into(), "sim".into());
        assert_eq!(judged(&other_target, PreviousPool::ScaleToZero, &done), Judged::Leave);
        let mut other_pipeline = older.clone();
        other_pipeline
            .metadata
            .insert("sigrun-pipeline".into(), "weekly".into());
        assert_eq!(judged(&other_pipeline, PreviousPool::ScaleToZero, &done), Judged::Leave);
        let mut no_version = older.clone();
        no_version.metadata.insert("sigrun-version".into(), "latest".into());
        assert_eq!(judged(&no_version, PreviousPool::ScaleToZero, &done), Judged::Leave);
        let mut own_pool = older.clone();
        own_pool.id = "render-2026-1202-0".into();
        assert_eq!(judged(&own_pool, PreviousPool::ScaleToZero, &done), Judged::Leave);
    }

    #[test]
    fn a_pool_a_live_run_is_still_making_is_left_alone() {
        let run = Uuid::new_v4();
        let older = pool("render-2026-1201-0", "2026.1201.0", run, 60);
        assert_eq!(
            judged(&older, PreviousPool::ScaleToZero, &Live(vec![run])),
            Judged::Leave
        );
        assert_eq!(
            judged(&older, PreviousPool::ScaleToZero, &Live(Vec::new())),
            Judged::Retire
        );
        // A run the history does not hold: left alone while its pool may still be verifying,
        // retired once the pool says it verified or is older than the verify deadline.
        assert_eq!(judged(&older, PreviousPool::ScaleToZero, &NoHistory), Judged::Leave);
        let mut verified = older.clone();
        verified.metadata.insert(VERIFIED.into(), "true".into());
        assert_eq!(judged(&verified, PreviousPool::ScaleToZero, &NoHistory), Judged::Retire);
        let old = pool("render-2026-1201-0", "2026.1201.0", run, 4 * 3600);
        assert_eq!(judged(&old, PreviousPool::ScaleToZero, &NoHistory), Judged::Retire);
    }

    #[test]
    fn a_resizing_pool_is_waited_for_and_a_retired_one_left_alone() {
        let done = Live(Vec::new());
        let mut resizing = pool("render-2026-1201-0", "2026.1201.0", Uuid::new_v4(), 86400);
        resizing.allocation_state = AllocationState::Resizing;
        assert_eq!(judged(&resizing, PreviousPool::ScaleToZero, &done), Judged::WaitSteady);
        assert_eq!(judged(&resizing, PreviousPool::Delete, &done), Judged::Retire);
        let mut zero = pool("render-2026-1201-0", "2026.1201.0", Uuid::new_v4(), 86400);
        zero.target_dedicated = 0;
        assert_eq!(judged(&zero, PreviousPool::ScaleToZero, &done), Judged::Leave);
        let mut deleting = zero.clone();
        deleting.state = PoolState::Deleting;
        assert_eq!(judged(&deleting, PreviousPool::Delete, &done), Judged::Leave);
    }
}
