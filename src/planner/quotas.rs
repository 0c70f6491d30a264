//! Preflight of the Batch accounts' quotas: a plan whose pools do not fit what an account may hold
//! is refused before anything is made. Azure itself would take such a pool and then stop it at the
//! quota: a pool over `poolQuota` is refused only at pool-create, after the snapshots, image and
//! replication; one over the core quota allocates up to it and sits there until its resize timeout
//! ends it with `AccountCoreQuotaReached`.
//!
//! Per account: the pools it holds (any state but deleting) and the cores their target nodes take
//! (vCPUs from Batch's VM sizes of the region), against `poolQuota`, `dedicatedCoreQuota`,
//! `lowPriorityCoreQuota` and, when enforced, the dedicated quota of each VM family. A pool the
//! plan names that exists already (a run admitted again) counts once, as the plan's. Quotas the
//! account does not state, and lists the caller may not read (403), are not checked (a warning).
//! The pipeline's own retired pools (scaled to zero by its rollout) are room under `poolQuota`: a
//! plan that fits only once they are deleted is taken, with a warning saying so.

use std::collections::{BTreeMap, BTreeSet};

use super::azure_values::readable;
use super::{PlanError, PoolPlan, rule};
use crate::azure::api::{AzureApi, BatchAccountInfo, PoolInfo, VmSize};
use crate::azure::{AzureError, PoolState};
use crate::model::plan::QuotaUse;
use crate::model::spec::{PipelineSpec, PoolSpec};
use crate::stages::retention;

/// What pools take of an account's quotas.
#[derive(Debug, Default, Clone, PartialEq)]
struct Usage {
    pools: u64,
    dedicated_cores: u64,
    low_priority_cores: u64,
    dedicated_by_family: BTreeMap<String, u64>,
}

impl Usage {
    fn add(&mut self, size: Option<&VmSize>, dedicated: u32, low_priority: u32) {
        self.pools += 1;
        let vcpus = u64::from(size.map_or(0, |s| s.vcpus));
        self.dedicated_cores += vcpus * u64::from(dedicated);
        self.low_priority_cores += vcpus * u64::from(low_priority);
        if let Some(size) = size {
            *self.dedicated_by_family.entry(size.family.clone()).or_default() += vcpus * u64::from(dedicated);
        }
    }
}

/// Every account's pools fit its quotas with what it holds already.
pub(super) async fn check(
    reclaim: bool,
    pools: &[PoolPlan],
    accounts: &BTreeMap<String, BatchAccountInfo>,
    azure: &dyn AzureApi,
    warnings: &mut Vec<String>,
) -> Result<Vec<QuotaUse>, PlanError> {
    let mut uses = Vec::new();
    for (key, account) in accounts {
        let planned: Vec<(usize, &PoolPlan)> = pools
            .iter()
            .enumerate()
            .filter(|(_, pool)| pool.account.to_string().eq_ignore_ascii_case(key))
            .collect();
        let stated = &account.quotas;
        let any_quota =
            stated.pools.is_some() || stated.dedicated_cores.is_some() || stated.low_priority_cores.is_some();
        if planned.is_empty() || !any_quota {
            continue;
        }
        uses.extend(check_account(reclaim, account, &planned, azure, warnings).await?);
    }
    Ok(uses)
}

/// A pool as the quotas count it: the plan's, or (for the quota watch) the spec's.
struct Planned<'a> {
    index: usize,
    /// Empty when not known yet (the quota watch plans no ids).
    pool_id: &'a str,
    vm_size: &'a str,
    dedicated: u32,
    low_priority: u32,
}

async fn check_account(
    reclaim: bool,
    account: &BatchAccountInfo,
    planned: &[(usize, &PoolPlan)],
    azure: &dyn AzureApi,
    warnings: &mut Vec<String>,
) -> Result<Vec<QuotaUse>, PlanError> {
    let name = account.id.name();
    let what = format!("the pools of Batch account {name}");
    let Some(existing) = readable(azure.list_pools(&account.url).await, &what, warnings)? else {
        return Ok(Vec::new());
    };
    let read = azure.batch_vm_sizes(account.id.subscription(), &account.location).await;
    let sizes = readable(read, "VM sizes", warnings)?.unwrap_or_default();
    let counted: Vec<Planned<'_>> = planned
        .iter()
        .map(|(index, p)| Planned {
            index: *index,
            pool_id: &p.pool_id,
            vm_size: &p.vm_size,
            dedicated: p.dedicated_nodes,
            low_priority: p.low_priority_nodes,
        })
        .collect();
    let (in_use, adds) = usage(&existing, &counted, &sizes, warnings);
    let key = format!("pools[{}].account", planned[0].0);
    // Retired pools of the pipeline hold no cores but count against poolQuota; pool-create
    // deletes the oldest when the account is full, so they are room the plan may take.
    let pipeline = planned[0].1.metadata.get("sigrun-pipeline").map_or("", String::as_str);
    let reclaimable = if reclaim {
        retention::reclaimable(pipeline, &account.url, &existing) as u64
    } else {
        0
    };
    let mut uses = Vec::new();
    for (quota, unit) in quota_uses(account, &in_use, &adds) {
        let over = fits(&key, name, &quota.quota, quota.limit, quota.in_use, quota.adds, unit);
        match over {
            Err(_) if quota.quota == "poolQuota" && reclaimable > 0 => {
                let after = quota.in_use.saturating_sub(reclaimable);
                fits(&key, name, &quota.quota, quota.limit, after, quota.adds, unit)?;
                warnings.push(format!(
                    "{key}: Batch account {name} fits this plan only after retention: {reclaimable} retired pool(s) of this pipeline are deleted to make room (poolQuota {}, {} in use)",
                    quota.limit, quota.in_use
                ));
            }
            other => other?,
        }
        uses.push(quota);
    }
    Ok(uses)
}

/// Each quota the account states, with what its pools take and what `adds` would add (and the
/// unit its refusal names).
fn quota_uses(account: &BatchAccountInfo, in_use: &Usage, adds: &Usage) -> Vec<(QuotaUse, &'static str)> {
    let name = account.id.name();
    let quotas = &account.quotas;
    let mut uses = Vec::new();
    let stated = [
        ("poolQuota", quotas.pools, in_use.pools, adds.pools, "pools"),
        (
            "dedicatedCoreQuota",
            quotas.dedicated_cores,
            in_use.dedicated_cores,
            adds.dedicated_cores,
            "dedicated cores",
        ),
        (
            "lowPriorityCoreQuota",
            quotas.low_priority_cores,
            in_use.low_priority_cores,
            adds.low_priority_cores,
            "low-priority cores",
        ),
    ];
    for (quota_name, quota, used, added, unit) in stated {
        if let Some(quota) = quota {
            uses.push((quota_use(name, quota_name, quota, used, added), unit));
        }
    }
    if quotas.per_family_enforced {
        for (family, added) in &adds.dedicated_by_family {
            let quota = quotas.dedicated_cores_per_family.get(family).copied().unwrap_or(0);
            let used = in_use.dedicated_by_family.get(family).copied().unwrap_or(0);
            let quota_name = format!("dedicatedCoreQuotaPerVMFamily {family}");
            uses.push((quota_use(name, &quota_name, quota, used, *added), "dedicated cores"));
        }
    }
    uses
}

/// What `spec`'s pools would take of their accounts' quotas now, beside what the accounts hold:
/// the quota watch's reading (`sigrun_batch_quota_headroom`), made without planning the rest.
/// The pipeline's need for pools is net of its retired pools (the pool quota takes them back).
pub async fn survey(spec: &PipelineSpec, azure: &dyn AzureApi) -> Result<Vec<QuotaUse>, AzureError> {
    let mut by_account: BTreeMap<String, Vec<(usize, &PoolSpec)>> = BTreeMap::new();
    for (index, pool) in spec.pools.iter().enumerate() {
        let key = pool.account.to_string().to_ascii_lowercase();
        by_account.entry(key).or_default().push((index, pool));
    }
    let mut uses = Vec::new();
    for pools in by_account.values() {
        let account = azure.get_batch_account(&pools[0].1.account).await?;
        let existing = azure.list_pools(&account.url).await?;
        let sizes = azure
            .batch_vm_sizes(account.id.subscription(), &account.location)
            .await?;
        let counted: Vec<Planned<'_>> = pools
            .iter()
            .map(|(index, p)| Planned {
                index: *index,
                pool_id: "",
                vm_size: &p.vm_size,
                dedicated: p.dedicated_nodes,
                low_priority: p.low_priority_nodes,
            })
            .collect();
        let (in_use, mut adds) = usage(&existing, &counted, &sizes, &mut Vec::new());
        // The pipeline's retired pools make room for its own: its need is net of them, so the
        // account's headroom is one number whichever pipeline reads it.
        if spec.retention.enabled {
            let reclaimable = retention::reclaimable(&spec.name, &account.url, &existing) as u64;
            adds.pools = adds.pools.saturating_sub(reclaimable);
        }
        uses.extend(quota_uses(&account, &in_use, &adds).into_iter().map(|(u, _)| u));
    }
    Ok(uses)
}

fn quota_use(account: &str, quota: &str, limit: u32, in_use: u64, adds: u64) -> QuotaUse {
    QuotaUse {
        account: account.to_string(),
        quota: quota.to_string(),
        limit,
        in_use,
        adds,
    }
}

/// What the account's pools hold now (but the ones the plan names) and what the plan adds.
fn usage(
    existing: &[PoolInfo],
    planned: &[Planned<'_>],
    sizes: &[VmSize],
    warnings: &mut Vec<String>,
) -> (Usage, Usage) {
    let size_of = |name: &str| sizes.iter().find(|s| s.name.eq_ignore_ascii_case(name) && s.vcpus > 0);
    let planned_ids: BTreeSet<String> = planned
        .iter()
        .filter(|p| !p.pool_id.is_empty())
        .map(|p| p.pool_id.to_ascii_lowercase())
        .collect();
    let mut in_use = Usage::default();
    for pool in existing {
        if pool.state == PoolState::Deleting || planned_ids.contains(&pool.id.to_ascii_lowercase()) {
            continue;
        }
        let dedicated = pool.target_dedicated.max(pool.current_dedicated);
        let low_priority = pool.target_low_priority.max(pool.current_low_priority);
        in_use.add(size_of(&pool.vm_size), dedicated, low_priority);
    }
    let mut adds = Usage::default();
    for pool in planned {
        let size = size_of(pool.vm_size);
        if size.is_none() {
            warnings.push(format!(
                "pools[{}].vm_size: Batch does not say how many vCPUs {} has; its cores are not counted against the quota",
                pool.index, pool.vm_size
            ));
        }
        adds.add(size, pool.dedicated, pool.low_priority);
    }
    (in_use, adds)
}

/// `added` more fits in `quota` with `used` taken, or the plan is refused naming both numbers.
fn fits(
    key: &str,
    account: &str,
    quota_name: &str,
    quota: u32,
    used: u64,
    added: u64,
    unit: &str,
) -> Result<(), PlanError> {
    let headroom = u64::from(quota).saturating_sub(used);
    if added <= headroom {
        return Ok(());
    }
    Err(rule(
        key,
        format!(
            "Batch account {account} cannot take this plan: it needs {added} {unit}, {quota_name} is {quota} with {used} in use (headroom {headroom})"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(name: &str, family: &str, vcpus: u32) -> VmSize {
        VmSize {
            name: name.into(),
            family: family.into(),
            vcpus,
        }
    }

    #[test]
    fn usage_counts_targets_in_vcpus_and_leaves_out_deleting_and_planned_pools() {
        let mut counted = Usage::default();
        counted.add(Some(&size("Standard_D4s_v5", "standardDSv5Family", 4)), 10, 3);
        counted.add(None, 100, 100);
        assert_eq!(
            (counted.pools, counted.dedicated_cores, counted.low_priority_cores),
            (2, 40, 12)
        );
        assert_eq!(counted.dedicated_by_family["standardDSv5Family"], 40);
    }

    #[test]
    fn a_plan_fits_up_to_its_headroom_and_no_further() {
        assert!(fits("pools[0].account", "a", "poolQuota", 5, 4, 1, "pools").is_ok());
        let refused = fits(
            "pools[0].account",
            "a",
            "dedicatedCoreQuota",
            100,
            80,
            40,
            "dedicated cores",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            refused,
            "pools[0].account: Batch account a cannot take this plan: it needs 40 dedicated cores, dedicatedCoreQuota is 100 with 80 in use (headroom 20)"
        );
        assert!(
            fits("k", "a", "poolQuota", 1, 7, 1, "pools").is_err(),
            "over already: no headroom"
        );
    }
}
