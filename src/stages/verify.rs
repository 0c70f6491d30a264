//! Stage 6, `verify` (one message per pool): waits until the pool's allocation is `steady` without
//! resize errors and enough nodes are `idle` (and few enough in `starttaskfailed`), within the
//! spec's deadline. Then it promotes the version (flips `excludeFromLatest` when promotion is gated)
//! and hands the branch to its rollout phase (`rollout`: retiring the pools of older versions).
//!
//! Batch gives no hint when to look. The first look waits out the documented 15 minutes per 1000
//! nodes (at most `poll_max`); later looks are timed from the pace at which nodes joined the pool
//! (the fastest pace two readings allow, so a look comes early rather than late), and once the
//! allocation is steady only the node counts are read.

use std::time::Duration;

use super::common::{fail, wait_step};
use super::{FailureClass, Observation, Outcome, Step, StepContext, rollout};
use crate::azure::AzureError;
use crate::events::EventKind;
use crate::model::envelope::{Branch, Envelope, Progress};
use crate::model::spec::PreviousPool;

/// Progress keys: the first and the latest reading of the nodes present while the pool allocates,
/// and the first reading of idle nodes (percent of the target nodes).
const ALLOCATED_FIRST: &str = "allocated-first";
const ALLOCATED_LAST: &str = "allocated-last";
const IDLE_FIRST: &str = "idle-first";

pub async fn step(message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let (Branch::Pool { target, .. }, Some(pool)) = (message.branch.clone(), message.artifacts.pool.clone()) else {
        return Ok(fail("verify runs on a pool branch after pool-create"));
    };
    let Some(planned) = message.plan.pools.iter().find(|p| p.target == target) else {
        return Ok(fail(format!("no pool target `{target}` in the plan")));
    };
    let nodes = planned.dedicated_nodes + planned.low_priority_nodes;
    let verify = &message.spec.verify;
    let target_nodes = nodes as f64;
    let required = (verify.min_idle_share * target_nodes).ceil();
    let deadline = pool.created + ctx.settings.real(verify.deadline);
    if ctx.now > deadline {
        return Ok(fail(format!(
            "pool {} did not verify within {}",
            pool.pool_id,
            crate::model::spec::duration::format(verify.deadline)
        ))
        .observe(Observation::Failure(FailureClass::Timeout)));
    }
    let mut progress = message
        .operation
        .as_ref()
        .map(|op| op.progress.clone())
        .unwrap_or_default();
    // Batch gives no hint; the documented 15 minutes per 1000 nodes says when to look at the latest.
    let expected = pool.created
        + ctx
            .settings
            .real(Duration::from_secs(60 + (nodes as u64 * 900).div_ceil(1000)));
    let left = Duration::from_secs_f64((expected - ctx.now).max(time::Duration::ZERO).as_seconds_f64());
    let phase = message.operation.as_ref().map(|op| op.what.clone());
    // Straight from pool-create: nothing has allocated yet, so the first look is the first wait.
    if phase.is_none() && ctx.now - pool.created < ctx.settings.real(ctx.settings.poll_min) {
        let delay = ctx.settings.clamp(left.max(ctx.settings.default_poll()));
        return Ok(wait_with(message, "allocation", delay, progress, ctx));
    }
    // Once the allocation was seen steady without errors (the `nodes` wait), only nodes change.
    if phase.as_deref() != Some("nodes") {
        let Some(info) = ctx.azure.get_pool(&pool.account_url, &pool.pool_id).await? else {
            return Ok(fail(format!("pool {} disappeared before it verified", pool.pool_id)));
        };
        if info.allocation_state != "steady" {
            // Nodes join the pool as it allocates: once two looks have seen them arrive, the earliest
            // end their pace allows comes first.
            let mut delay = left.max(ctx.settings.default_poll());
            let reading = Progress {
                at: ctx.now,
                percent: percent_of(info.current_dedicated + info.current_low_priority, nodes),
            };
            if reading.percent > 0 {
                let first = *progress.entry(ALLOCATED_FIRST.to_string()).or_insert(reading);
                progress.insert(ALLOCATED_LAST.to_string(), reading);
                if let Some(eta) = earliest(first, reading, 100.0) {
                    delay = delay.min(eta);
                }
                // Nearly allocated: nodes turn idle minutes after they join, so the next look also
                // waits for enough of them, at the pace they joined.
                if (info.current_dedicated + info.current_low_priority) as f64 >= required
                    && let Some(percent_per_sec) = pace(first, reading)
                {
                    let idle = ctx
                        .azure
                        .node_counts(&pool.account_url, &pool.pool_id)
                        .await?
                        .get("idle") as f64;
                    let nodes_per_sec = percent_per_sec * target_nodes / 100.0;
                    delay = delay.max(Duration::from_secs_f64((required - idle).max(0.0) / nodes_per_sec));
                }
            }
            return Ok(wait_with(
                message,
                "allocation",
                ctx.settings.clamp(delay),
                progress,
                ctx,
            ));
        }
        if let Some(error) = info.resize_errors.first() {
            return Ok(fail(format!(
                "pool {} allocation ended with {}: {} ({} of {} dedicated nodes)",
                pool.pool_id, error.code, error.message, info.current_dedicated, info.target_dedicated
            ))
            .observe(Observation::Failure(FailureClass::Allocation)));
        }
    }
    let counts = ctx.azure.node_counts(&pool.account_url, &pool.pool_id).await?;
    let nodes_seen = Observation::PoolNodes {
        target: target.clone(),
        by_state: counts.by_state.iter().map(|(state, n)| (state.clone(), *n)).collect(),
    };
    if counts.total == 0 && ctx.azure.get_pool(&pool.account_url, &pool.pool_id).await?.is_none() {
        return Ok(fail(format!("pool {} disappeared before it verified", pool.pool_id)));
    }
    let idle = counts.get("idle") as f64;
    let failed = counts.get("starttaskfailed") as f64;
    let allowed_failed = (verify.max_start_task_failed_share * target_nodes).floor();
    if failed > allowed_failed {
        return Ok(fail(format!(
            "pool {}: {failed} of {target_nodes} nodes failed their start task (at most {allowed_failed} allowed)",
            pool.pool_id
        ))
        .observe(nodes_seen)
        .observe(Observation::Failure(FailureClass::StartTask)));
    }
    if idle < required {
        // Nodes turn idle at about the pace they joined: time the next look by that pace, else by
        // two readings of the idle nodes, else by the default poll.
        let reading = Progress {
            at: ctx.now,
            percent: percent_of(idle as u32, nodes),
        };
        let joined = match (progress.get(ALLOCATED_FIRST), progress.get(ALLOCATED_LAST)) {
            (Some(first), Some(last)) => pace(*first, *last),
            _ => None,
        };
        let first_idle = (reading.percent > 0).then(|| *progress.entry(IDLE_FIRST.to_string()).or_insert(reading));
        let eta = match (joined, first_idle) {
            (Some(percent_per_sec), _) => Some(Duration::from_secs_f64(
                (required - idle) * 100.0 / target_nodes / percent_per_sec,
            )),
            (None, Some(first)) => earliest(first, reading, required * 100.0 / target_nodes),
            (None, None) => None,
        };
        let delay = eta.map_or_else(|| ctx.settings.default_poll(), |eta| ctx.settings.clamp(eta));
        return Ok(wait_with(message, "nodes", delay, progress, ctx).observe(nodes_seen));
    }

    // The pool says so itself, for runs that cannot read this run's history (another
    // `sigrun run`, a history past its retention): their rollout may retire it once it is older.
    let mut metadata = planned.metadata.clone();
    metadata.insert("sigrun-run".into(), message.run_id.to_string());
    if !message.admission.is_nil() {
        metadata.insert(super::common::ADMISSION.into(), message.admission.to_string());
    }
    metadata.insert(rollout::VERIFIED.into(), "true".into());
    ctx.azure
        .set_pool_metadata(&pool.account_url, &pool.pool_id, &metadata)
        .await?;
    let mut events = vec![EventKind::PoolVerified {
        pool_id: pool.pool_id.clone(),
    }];
    let plan = &message.plan;
    if plan.publish_excluded && !plan.final_excluded {
        let promoted = ctx
            .azure
            .get_version(&plan.version_id, false)
            .await?
            .is_some_and(|v| !v.exclude_from_latest);
        if !promoted {
            ctx.azure.set_exclude_from_latest(&plan.version_id, false).await?;
            events.push(EventKind::Promoted {
                version_id: plan.version_id.to_string(),
            });
        }
    }
    // The rollout policy is an effect of its own (its own retries; its failure never fails this
    // branch): the message goes on in the retire phase.
    let outcome = match message.spec.rollout.previous_pool {
        PreviousPool::Keep => Outcome::Done,
        _ => rollout::begin(message, ctx),
    };
    Ok(Step {
        outcome,
        events,
        observations: vec![nodes_seen],
    })
}

/// A wait that keeps the progress readings (a new `what` would start them over).
fn wait_with(
    message: Envelope,
    what: &str,
    delay: Duration,
    progress: std::collections::BTreeMap<String, Progress>,
    ctx: &StepContext<'_>,
) -> Step {
    let mut step = wait_step(message, what, Vec::new(), delay, ctx.now);
    if let Outcome::Wait { message, .. } = &mut step.outcome
        && let Some(op) = message.operation.as_mut()
    {
        op.progress = progress;
    }
    step
}

fn percent_of(part: u32, whole: u32) -> u8 {
    (part as u64 * 100 / whole.max(1) as u64).min(100) as u8
}

/// The fastest pace (percent per second) two readings allow: a reading of `p` percent means
/// somewhere in [p, p + 1).
fn pace(before: Progress, now: Progress) -> Option<f64> {
    let elapsed = (now.at - before.at).as_seconds_f64();
    (before.percent > 0 && now.percent > before.percent && elapsed > 0.0)
        .then(|| (now.percent as f64 + 1.0 - before.percent as f64) / elapsed)
}

/// The earliest moment `goal` percent can be reached at that pace, from now: a look timed by it
/// comes before the goal, never after it.
fn earliest(before: Progress, now: Progress, goal: f64) -> Option<Duration> {
    let pace = pace(before, now)?;
    let left = (goal - (now.percent as f64 + 1.0)).max(0.0) / pace;
    Some(Duration::from_secs_f64(left))
}
