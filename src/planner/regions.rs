//! The planner's regions: where the version is replicated and how many replicas each region gets.
//! Every pool's region needs a replica; a region never gets fewer than one replica per
//! `nodes_per_replica` of the nodes planned there (raised, with a warning), and at most 100. A
//! rollout of an existing version takes the regions it already has, and warns where they are
//! thin.

use super::{PlanError, region_key, rule};
use crate::azure::AzureApi;
use crate::model::ids::GalleryImageVersionId;
use crate::model::plan::{PoolPlan, RegionPlan};
use crate::model::rules;
use crate::model::spec::{PipelineSpec, Replicas};

/// The nodes `pools` plan in region `name`.
fn nodes_in(pools: &[PoolPlan], name: &str) -> u32 {
    pools
        .iter()
        .filter(|p| p.region == name)
        .map(|p| p.dedicated_nodes + p.low_priority_nodes)
        .sum()
}

/// A rollout: the existing version's regions, each pool's among them.
pub async fn of_existing_version(
    spec: &PipelineSpec,
    pools: &[PoolPlan],
    version_id: &GalleryImageVersionId,
    azure: &dyn AzureApi,
    warnings: &mut Vec<String>,
) -> Result<Vec<RegionPlan>, PlanError> {
    let version = azure
        .get_version(version_id, true)
        .await?
        .ok_or_else(|| rule("version", format!("{version_id} does not exist; nothing to roll out")))?;
    if let Some(pool) = pools
        .iter()
        .find(|pool| !version.target_regions.iter().any(|(r, _)| *r == pool.region))
    {
        return Err(rule(
            "pools",
            format!(
                "pool target {} is in {} but {version_id} has no replica there",
                pool.target, pool.region
            ),
        ));
    }
    let mut regions = Vec::new();
    for (name, replicas) in &version.target_regions {
        let nodes = nodes_in(pools, name);
        let needed = rules::replicas_needed(nodes, spec.publish.nodes_per_replica);
        if *replicas < needed {
            warnings.push(format!(
                "{version_id} has {replicas} replica(s) in {name}, below the {needed} that {nodes} nodes need; pools there may allocate slowly"
            ));
        }
        regions.push(RegionPlan {
            name: name.clone(),
            replicas: *replicas,
            replicas_asked: Some(*replicas),
            nodes,
            storage_account_type: spec.publish.storage_account_type.clone(),
        });
    }
    Ok(regions)
}

/// A build: the spec's target regions, each listed once, the image's own region among them, and
/// a replica in every pool's region.
pub fn to_publish(
    spec: &PipelineSpec,
    pools: &[PoolPlan],
    source_region: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<RegionPlan>, PlanError> {
    let mut regions: Vec<RegionPlan> = Vec::new();
    for (i, region) in spec.publish.regions.iter().enumerate() {
        let name = region_key(&region.name);
        if regions.iter().any(|r| r.name == name) {
            return Err(rule(
                &format!("publish.regions[{i}]"),
                format!("region {name} is listed twice"),
            ));
        }
        let nodes = nodes_in(pools, &name);
        let (replicas, asked) = replicas(spec, i, &region.replicas, &name, nodes, warnings)?;
        regions.push(RegionPlan {
            name,
            replicas,
            replicas_asked: asked,
            nodes,
            storage_account_type: region
                .storage_account_type
                .clone()
                .unwrap_or_else(|| spec.publish.storage_account_type.clone()),
        });
    }
    if !regions.iter().any(|r| r.name == source_region) {
        return Err(rule(
            "publish.regions",
            format!("the image is made in {source_region}; the version's target regions must include it"),
        ));
    }
    for (i, pool) in pools.iter().enumerate() {
        if !regions.iter().any(|r| r.name == pool.region) {
            return Err(rule(
                &format!("pools[{i}]"),
                format!(
                    "pool target {} uses account {} in {}, but no replica is planned there; add {} to publish.regions",
                    pool.target, pool.account, pool.region, pool.region
                ),
            ));
        }
    }
    Ok(regions)
}

/// Replicas for region `i` (`name`, `nodes` planned there): `auto` is one per
/// `nodes_per_replica`; fewer asked for are raised with a warning; more than 100 is refused.
/// Returns the count and what the spec asked.
fn replicas(
    spec: &PipelineSpec,
    i: usize,
    asked: &Replicas,
    name: &str,
    nodes: u32,
    warnings: &mut Vec<String>,
) -> Result<(u32, Option<u32>), PlanError> {
    let needed = rules::replicas_needed(nodes, spec.publish.nodes_per_replica);
    let (replicas, asked) = match *asked {
        Replicas::Auto => (needed, None),
        Replicas::Count(n) if n < needed => {
            warnings.push(format!(
                "publish.regions[{i}].replicas: {n} is below one replica per {} nodes for the {nodes} nodes planned in {name}; raised to {needed}",
                spec.publish.nodes_per_replica
            ));
            (needed, Some(n))
        }
        Replicas::Count(n) => (n, Some(n)),
    };
    if replicas > rules::MAX_REPLICAS {
        return Err(rule(
            &format!("publish.regions[{i}]"),
            format!("{name} needs {replicas} replicas; Azure allows at most 100"),
        ));
    }
    Ok((replicas, asked))
}
