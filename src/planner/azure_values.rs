//! Preflight of the values only Azure can judge: every region the spec names must be one the
//! gallery's subscription has, and every pool's VM size one Batch offers in its account's region.
//! Caught here, a typo costs an error naming its key; caught by Azure, it costs the snapshots,
//! image and version made before the call that fails.
//!
//! A principal allowed to do its job but not to read these lists (403) gets a warning instead: the
//! check is a courtesy, not a new permission sigrun needs. The same holds for the look at a
//! provider's registration in the gallery's subscription (`readable`).

use super::{PlanError, PoolPlan, region_key, rule};
use crate::azure::api::AzureApi;
use crate::azure::error::AzureError;
use crate::model::spec::PipelineSpec;

/// The regions named in the spec (`publish.regions`, `gallery.region`) exist; every pool's VM size
/// is offered by Batch in its region.
pub(super) async fn check(
    spec: &PipelineSpec,
    pools: &[PoolPlan],
    check_publish_regions: bool,
    azure: &dyn AzureApi,
    warnings: &mut Vec<String>,
) -> Result<(), PlanError> {
    check_regions(spec, check_publish_regions, azure, warnings).await?;
    check_vm_sizes(pools, azure, warnings).await
}

/// `Ok(None)` when the caller may not read the list: the check is skipped with a warning.
pub(super) fn readable<T>(
    read: Result<T, AzureError>,
    what: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<T>, PlanError> {
    match read {
        Ok(list) => Ok(Some(list)),
        Err(e) if matches!(e.status, Some(401 | 403)) => {
            warnings.push(format!("{what} not checked: {e}"));
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

async fn check_regions(
    spec: &PipelineSpec,
    check_publish_regions: bool,
    azure: &dyn AzureApi,
    warnings: &mut Vec<String>,
) -> Result<(), PlanError> {
    let mut named: Vec<(String, &str)> = Vec::new();
    if check_publish_regions {
        for (i, region) in spec.publish.regions.iter().enumerate() {
            named.push((format!("publish.regions[{i}].name"), &region.name));
        }
    }
    if let Some(region) = &spec.gallery.region {
        named.push(("gallery.region".to_string(), region));
    }
    if named.is_empty() {
        return Ok(());
    }
    let subscription = spec.gallery.id.subscription();
    let read = azure.list_locations(subscription).await;
    let Some(known) = readable(read, "region names", warnings)? else {
        return Ok(());
    };
    for (key, name) in named {
        if !known.contains(&region_key(name)) {
            return Err(rule(
                &key,
                format!(
                    "`{}` is not a region of subscription {subscription} (names such as westeurope or \"West Europe\")",
                    crate::model::text::shorten(name, 64)
                ),
            ));
        }
    }
    Ok(())
}

async fn check_vm_sizes(pools: &[PoolPlan], azure: &dyn AzureApi, warnings: &mut Vec<String>) -> Result<(), PlanError> {
    for (i, pool) in pools.iter().enumerate() {
        let read = azure.batch_vm_sizes(pool.account.subscription(), &pool.region).await;
        let Some(offered) = readable(read, "VM sizes", warnings)? else {
            return Ok(());
        };
        if !offered.iter().any(|s| s.name.eq_ignore_ascii_case(&pool.vm_size)) {
            return Err(rule(
                &format!("pools[{i}].vm_size"),
                format!(
                    "`{}` is not a VM size Batch offers in {} (`az batch location list-skus --location {}` lists them)",
                    crate::model::text::shorten(&pool.vm_size, 64),
                    pool.region,
                    pool.region
                ),
            ));
        }
    }
    Ok(())
}
