//! Stage 5, `pool-create` (one message per pool): adds the Batch pool from the image version, with
//! the planned node agent SKU, resize timeout and start task, authenticated with Azure AD (never
//! Shared Key: Batch refuses it for gallery images). The pool carries sigrun's metadata (pipeline,
//! target, version, run), which is how a replay recognises its own pool and how a later rollout
//! finds the previous one; a pool id taken by anything else is never touched.

use std::time::Duration;

use super::common::{ADMISSION, fail, made_in_admission};
use super::{Outcome, Step, StepContext};
use crate::azure::AzureError;
use crate::azure::api::{PoolCreated, PoolRequest};
use crate::events::EventKind;
use crate::model::envelope::{Branch, Envelope, PoolArtifact, Stage};
use crate::model::plan::PoolPlan;

pub async fn step(mut message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let Branch::Pool { target, .. } = message.branch.clone() else {
        return Ok(fail("pool-create runs on a pool branch"));
    };
    let Some(pool) = message.plan.pools.iter().find(|p| p.target == target).cloned() else {
        return Ok(fail(format!("no pool target `{target}` in the plan")));
    };
    let mut events = Vec::new();
    match ctx.azure.add_pool(&pool.account_url, &request(&pool, &message)).await? {
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
