//! Stage 6, `verify` (one message per pool): waits until the pool's allocation is `steady` without
//! resize errors and enough nodes are `idle` (and few enough in `starttaskfailed`), within the
//! spec's deadline. Then it promotes the version (flips `excludeFromLatest` when promotion is gated)
//! and applies the rollout policy to the previous version's pool of the same target — only a pool
//! whose metadata says sigrun made it for this pipeline and target.

use std::time::Duration;

use super::common::{fail, wait_step};
use super::{Outcome, Step, StepContext};
use crate::azure::AzureError;
use crate::events::EventKind;
use crate::model::envelope::{Branch, Envelope};
use crate::model::spec::PreviousPool;

pub async fn step(message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let (Branch::Pool { target, .. }, Some(pool)) = (message.branch.clone(), message.artifacts.pool.clone()) else {
        return Ok(fail("verify runs on a pool branch after pool-create"));
    };
    let Some(info) = ctx.azure.get_pool(&pool.account_url, &pool.pool_id).await? else {
        return Ok(fail(format!("pool {} disappeared before it verified", pool.pool_id)));
    };
    let verify = &message.spec.verify;
    let deadline = pool.created + ctx.settings.real(verify.deadline);
    if ctx.now > deadline {
        return Ok(fail(format!(
            "pool {} did not verify within {}",
            pool.pool_id,
            crate::model::spec::duration::format(verify.deadline)
        )));
    }
    if info.allocation_state != "steady" {
        // Batch gives no hint; the documented 15 minutes per 1000 nodes says when to look.
        let nodes = info.target_dedicated + info.target_low_priority;
        let expected = pool.created
            + ctx
                .settings
                .real(Duration::from_secs(60 + (nodes as u64 * 900).div_ceil(1000)));
        let left = (expected - ctx.now).max(time::Duration::ZERO);
        let delay = ctx
            .settings
            .clamp(Duration::from_secs_f64(left.as_seconds_f64()).max(ctx.settings.default_poll()));
        return Ok(wait_step(message, "allocation", Vec::new(), delay, ctx.now));
    }
    if let Some(error) = info.resize_errors.first() {
        return Ok(fail(format!(
            "pool {} allocation ended with {}: {} ({} of {} dedicated nodes)",
            pool.pool_id, error.code, error.message, info.current_dedicated, info.target_dedicated
        )));
    }
    let counts = ctx.azure.node_counts(&pool.account_url, &pool.pool_id).await?;
    let target_nodes = (info.target_dedicated + info.target_low_priority) as f64;
    let idle = counts.get("idle") as f64;
    let failed = counts.get("starttaskfailed") as f64;
    let allowed_failed = (verify.max_start_task_failed_share * target_nodes).floor();
    if failed > allowed_failed {
        return Ok(fail(format!(
            "pool {}: {failed} of {target_nodes} nodes failed their start task (at most {allowed_failed} allowed)",
            pool.pool_id
        )));
    }
    if idle < (verify.min_idle_share * target_nodes).ceil() {
        let delay = ctx.settings.default_poll();
        return Ok(wait_step(message, "nodes", Vec::new(), delay, ctx.now));
    }

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
    let policy = message.spec.rollout.previous_pool;
    if policy != PreviousPool::Keep {
        for previous in ctx.azure.list_pools(&pool.account_url).await? {
            let ours = previous.metadata.get("sigrun-pipeline") == Some(&message.pipeline)
                && previous.metadata.get("sigrun-target") == Some(&target);
            if !ours || previous.id.eq_ignore_ascii_case(&pool.pool_id) || previous.state != "active" {
                continue;
            }
            let action = match policy {
                PreviousPool::ScaleToZero => {
                    if previous.target_dedicated + previous.target_low_priority == 0 {
                        continue;
                    }
                    ctx.azure.resize_pool(&pool.account_url, &previous.id, 0, 0).await?;
                    "scaled to zero"
                }
                PreviousPool::Delete => {
                    ctx.azure.delete_pool(&pool.account_url, &previous.id).await?;
                    "deleted"
                }
                PreviousPool::Keep => unreachable!("handled above"),
            };
            events.push(EventKind::PreviousPoolRetired {
                pool_id: previous.id.clone(),
                action: action.to_string(),
            });
        }
    }
    Ok(Step {
        outcome: Outcome::Done,
        events,
    })
}
