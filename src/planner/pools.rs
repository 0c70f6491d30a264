//! The planner's pools: for each pool of the spec, its region (the account's), node agent SKU,
//! resize timeout (never below 15 minutes per 1000 nodes: raised with a warning), id, metadata
//! and what `pool-create` adds besides (slots, start task).

use std::collections::BTreeMap;
use std::time::Duration;

use super::{PlanError, PlanInputs, choose_sku, region_key, rule};
use crate::azure::api::{BatchAccountInfo, SupportedImage};
use crate::model::plan::{BuildPlan, PoolPlan};
use crate::model::rules;
use crate::model::spec::{PipelineSpec, PoolSpec, duration, render_name};

/// What the pools are planned from besides the spec.
pub struct Chosen<'a> {
    /// Batch accounts by lower-cased id.
    pub accounts: &'a BTreeMap<String, BatchAccountInfo>,
    pub build: Option<&'a BuildPlan>,
    pub supported: &'a [SupportedImage],
}

pub fn plan_pools(
    spec: &PipelineSpec,
    inputs: &PlanInputs,
    chosen: &Chosen<'_>,
    warnings: &mut Vec<String>,
) -> Result<Vec<PoolPlan>, PlanError> {
    spec.pools
        .iter()
        .enumerate()
        .map(|(i, pool)| plan_pool(spec, inputs, chosen, i, pool, warnings))
        .collect()
}

fn plan_pool(
    spec: &PipelineSpec,
    inputs: &PlanInputs,
    chosen: &Chosen<'_>,
    i: usize,
    pool: &PoolSpec,
    warnings: &mut Vec<String>,
) -> Result<PoolPlan, PlanError> {
    let key = |k: &str| format!("pools[{i}].{k}");
    let account = &chosen.accounts[&pool.account.to_string().to_ascii_lowercase()];
    let sku = choose_sku(spec, pool.node_agent_sku_id.as_str(), chosen.build, chosen.supported)
        .map_err(|m| rule(&key("node_agent_sku_id"), m))?;
    let timeout = resize_timeout(pool, &key("resize_timeout"), warnings)?;
    let pool_id = render_name(&pool.id, &spec.name, &pool.target, &inputs.version);
    let mut metadata = pool.metadata.clone();
    metadata.insert("sigrun-pipeline".into(), spec.name.clone());
    metadata.insert("sigrun-target".into(), pool.target.clone());
    metadata.insert("sigrun-version".into(), inputs.version.clone());
    Ok(PoolPlan {
        target: pool.target.clone(),
        region: region_key(&account.location),
        account: pool.account.clone(),
        account_url: account.url.clone(),
        pool_id,
        vm_size: pool.vm_size.clone(),
        dedicated_nodes: pool.dedicated_nodes,
        low_priority_nodes: pool.low_priority_nodes,
        node_agent_sku_id: sku,
        resize_timeout_secs: timeout.as_secs(),
        task_slots_per_node: pool.task_slots_per_node,
        start_task: pool.start_task.clone(),
        metadata,
    })
}

/// The pool's resize timeout: `auto` is the documented minimum for its nodes; a shorter one asked
/// for is raised to it, with a warning.
fn resize_timeout(pool: &PoolSpec, key: &str, warnings: &mut Vec<String>) -> Result<Duration, PlanError> {
    let nodes = pool.dedicated_nodes + pool.low_priority_nodes;
    let minimum = rules::min_resize_timeout(nodes);
    if pool.resize_timeout == "auto" {
        return Ok(minimum);
    }
    let asked = duration::parse(&pool.resize_timeout).map_err(|m| rule(key, m))?;
    if asked >= minimum {
        return Ok(asked);
    }
    warnings.push(format!(
        "{key}: resize_timeout {} is below 15 minutes per 1000 nodes for {nodes} nodes; raised to {}",
        duration::format(asked),
        duration::format(minimum)
    ));
    Ok(minimum)
}
