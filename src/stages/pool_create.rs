//! Stage 5, `pool-create` (one message per pool): adds the Batch pool from the image version, with
//! the planned node agent SKU, resize timeout and start task, authenticated with Azure AD (never
//! Shared Key: Batch refuses it for gallery images). The pool carries sigrun's metadata (pipeline,
//! target, version, run), which is how a replay recognises its own pool and how a later rollout
//! finds the previous one; a pool id taken by anything else is never touched.

use std::time::Duration;

use super::common::{ADMISSION, fail, look_again, made_in_admission};
use super::{Outcome, Step, StepContext, retention};
use crate::azure::api::{PoolCreated, PoolInfo, PoolRequest};
use crate::azure::{AzureError, PoolState};
use crate::events::{DeletedKind, EventKind};
use crate::model::envelope::{Branch, Envelope, Phase, PoolArtifact, Stage};
use crate::model::plan::PoolPlan;

pub async fn step(mut message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let Branch::Pool { target, .. } = message.branch.clone() else {
        return Ok(fail("pool-create runs on a pool branch"));
    };
    let Some(pool) = message.plan.pools.iter().find(|p| p.target == target).cloned() else {
        return Ok(fail(format!("no pool target `{target}` in the plan")));
    };
    let mut events = Vec::new();
    let added = match ctx.azure.add_pool(&pool.account_url, &request(&pool, &message)).await {
        Err(full) if full.code.as_deref() == Some(POOL_QUOTA_REACHED) && message.spec.retention.enabled => {
            return make_room(message, &pool, full, ctx).await;
        }
        other => other?,
    };
    match added {
        PoolCreated::Created => events.push(EventKind::PoolCreated {
            pool_id: pool.pool_id.clone(),
        }),
        PoolCreated::Exists => {
            let existing = ctx.azure.get_pool(&pool.account_url, &pool.pool_id).await?;
            let ours = existing.as_ref().is_some_and(|p| {
                p.metadata
                    .get("sigrun-run")
                    .is_some_and(|r| *r == message.run_id.to_string())
            });
            if !ours {
                return Ok(fail(format!(
                    "pool {} already exists in {} and was not created by this run; sigrun never takes over a pool it did not create",
                    pool.pool_id, pool.account
                )));
            }
            // An earlier try of this step in this admission made it and did not record it (killed
            // before its commit): the run's history still lists it.
            if existing.is_some_and(|p| made_in_admission(&p.metadata, &message)) {
                events.push(EventKind::PoolCreated {
                    pool_id: pool.pool_id.clone(),
                });
            }
        }
    }
    message.artifacts.pool = Some(PoolArtifact {
        account: pool.account.clone(),
        account_url: pool.account_url.clone(),
        pool_id: pool.pool_id.clone(),
        created: ctx.now,
    });
    Ok(Step {
        outcome: Outcome::Advance(vec![message.next(Stage::Verify, ctx.now)]),
        events,
        observations: Vec::new(),
    })
}

/// Batch's answer to a pool add past the account's `poolQuota`.
const POOL_QUOTA_REACHED: &str = "PoolQuotaReached";

/// How long (Azure time) a pool add waits for room under the pool quota before the quota's error
/// stands.
const ROOM_WAIT: Duration = Duration::from_secs(3600);

/// The account holds as many pools as its quota allows: the pool quota is never what fails a
/// rollout while this pipeline has retired pools there. The oldest of them (marked retired,
/// scaled to zero, a newer pool of its target beside it) is deleted ahead of its grace, and the
/// add is tried again once Batch has let it go. While any pool of the account is being deleted
/// (room is coming) none is; after `ROOM_WAIT`, without a retired pool, or with `[retention]
/// enabled = false`, the add's error stands.
async fn make_room(
    message: Envelope,
    pool: &PoolPlan,
    full: AzureError,
    ctx: &StepContext<'_>,
) -> Result<Step, AzureError> {
    let waited = message
        .operation
        .as_ref()
        .filter(|op| op.what == Phase::PoolQuota)
        .map_or(time::Duration::ZERO, |op| ctx.now - op.started);
    if waited > ctx.settings.real(ROOM_WAIT) {
        return Err(full);
    }
    let listed = ctx.azure.list_pools_dated(&pool.account_url).await?;
    let room_coming = listed.pools.iter().any(|p| p.state == PoolState::Deleting);
    let mut deleted = Vec::new();
    if !room_coming {
        let Some(oldest) = oldest_retired(&message, &pool.account_url, listed.pools, ctx) else {
            return Err(full);
        };
        retention::apply(ctx.azure, &message.plan.definition, &[oldest], &mut deleted).await?;
    }
    tracing::info!(pool = %pool.pool_id, account = %pool.account, "pool quota reached; a retired pool makes room");
    let mut step = look_again(message, Phase::PoolQuota, ctx);
    step.events.extend(deleted);
    Ok(step)
}

/// The pipeline's oldest retired pool in the account, judged to go now (its grace waived).
fn oldest_retired(
    message: &Envelope,
    account_url: &str,
    pools: Vec<PoolInfo>,
    ctx: &StepContext<'_>,
) -> Option<retention::Verdict> {
    let survey = retention::Survey {
        definition: message.plan.definition.clone(),
        versions: Vec::new(),
        pools: pools
            .into_iter()
            .map(|p| retention::AccountPool {
                account_url: account_url.to_string(),
                pool: p,
            })
            .collect(),
        as_of: ctx.now,
    };
    let policy = retention::Policy {
        pipeline: message.pipeline.clone(),
        keep_versions: message.spec.retention.keep_versions,
        pool_grace: Duration::ZERO,
        ceiling: None,
        young: retention::young_for(&message.spec),
    };
    let mut oldest = retention::judge(&survey, &policy, ctx.runs)
        .into_iter()
        .find(|v| v.kind == DeletedKind::Pool)?;
    oldest.delete = true;
    Some(oldest)
}

/// The pool as planned, from the run's image version, with the run's metadata besides the
/// plan's: `sigrun-run` (a replay knows its own pool) and the admission that made it.
fn request(pool: &PoolPlan, message: &Envelope) -> PoolRequest {
    let mut metadata = pool.metadata.clone();
    metadata.insert("sigrun-run".into(), message.run_id.to_string());
    if !message.admission.is_nil() {
        metadata.insert(ADMISSION.into(), message.admission.to_string());
    }
    PoolRequest {
        id: pool.pool_id.clone(),
        vm_size: pool.vm_size.clone(),
        image: message.plan.version_id.clone(),
        node_agent_sku_id: pool.node_agent_sku_id.clone(),
        resize_timeout: Duration::from_secs(pool.resize_timeout_secs),
        dedicated_nodes: pool.dedicated_nodes,
        low_priority_nodes: pool.low_priority_nodes,
        task_slots_per_node: pool.task_slots_per_node,
        start_task: pool.start_task.clone(),
        metadata,
    }
}
