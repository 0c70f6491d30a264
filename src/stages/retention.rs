//! Retention: what a pipeline's past runs leave behind that may go, decided as pure judgements
//! over one survey of Azure and carried out by the same code in a run's rollout phase and in
//! `sigrun prune`.
//!
//! **Versions** of the pipeline's definition are deleted only when every one of these holds:
//! this pipeline published it (its `sigrun-pipeline` tag: a version without the tag, or another
//! pipeline's, is never touched); it is not among the newest `keep_versions` of this pipeline's
//! versions and not the version `latest` resolves to (the highest version number not excluded
//! from latest; versions being deleted count for neither); no pool in the pipeline's Batch
//! accounts uses it (`virtualMachineImageId` naming it, or naming the definition, which is
//! `latest`); it is not newer than the run deciding (a newer run keeps its own); it has finished
//! provisioning and is not being deleted already; and the run that made it is not live in the
//! history. A run the history does not hold (another `sigrun run` process, `prune`) may still be
//! creating its pools from it: its version stays while younger than `young` (the verify deadline
//! and a day) by its `publishedDate`.
//!
//! **Pools** the rollout retired (this pipeline's, marked `sigrun-retired` when it scaled them to
//! zero, steady at zero, a newer version's pool of the same target beside them) are deleted once
//! retired for `pool_grace` as Batch's clock tells (the pool's `allocationStateTransitionTime`
//! against the list's `Date`), oldest first. The newest pool of a target is never deleted here,
//! nor a pool scaled to zero by anyone else.
//!
//! `apply` carries on past a delete Azure refuses (a pool in an account the survey did not read
//! may use a version) and reports the first error once the rest are done.

use std::collections::BTreeMap;
use std::time::Duration;

use time::OffsetDateTime;

use super::Runs;
use crate::azure::api::{ListedVersion, PoolInfo, PoolList};
use crate::azure::{AllocationState, AzureApi, AzureError, PoolState, ProvisioningState};
use crate::events::{DeletedKind, EventKind};
use crate::model::ids::GalleryImageId;
use crate::model::rules::ImageVersion;

/// What retention is held to: the pipeline's `[retention]` and, in a run, the run's own version.
#[derive(Debug, Clone)]
pub struct Policy {
    pub pipeline: String,
    pub keep_versions: u32,
    pub pool_grace: Duration,
    /// Versions newer than this (the deciding run's own) are never touched; `None` in `prune`.
    pub ceiling: Option<ImageVersion>,
    /// A version of a run the history does not hold is kept while younger than this.
    pub young: Duration,
}

impl Policy {
    /// `spec`'s `[retention]`, for a run whose own version is `ceiling` (`None` outside a run:
    /// `sigrun prune`, the fleet page).
    pub fn of(spec: &crate::model::spec::PipelineSpec, ceiling: Option<ImageVersion>) -> Policy {
        Policy {
            pipeline: spec.name.clone(),
            keep_versions: spec.retention.keep_versions,
            pool_grace: spec.retention.pool_grace,
            ceiling,
            young: young_for(spec),
        }
    }
}

/// How long a version of a run the history does not hold is kept: its run may still be
/// replicating, creating and verifying pools from it (the verify deadline, and a day for the rest).
pub fn young_for(spec: &crate::model::spec::PipelineSpec) -> Duration {
    spec.verify.deadline.saturating_add(Duration::from_secs(86_400))
}

/// The pool metadata key the rollout sets (to the time, RFC 3339) when it scales a pool to zero:
/// only pools it retired are retention's.
pub const RETIRED: &str = "sigrun-retired";

/// One look at what retention judges: the definition's versions and the accounts' pools.
#[derive(Debug, Clone)]
pub struct Survey {
    pub definition: GalleryImageId,
    pub versions: Vec<ListedVersion>,
    pub pools: Vec<AccountPool>,
    /// Batch's clock at the pools' answers (the local clock when Batch gave no `Date`).
    pub as_of: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub struct AccountPool {
    pub account_url: String,
    pub pool: PoolInfo,
}

/// What retention decided about one resource, with why.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub kind: DeletedKind,
    /// The version's name, or the pool's id.
    pub name: String,
    /// The pool's account URL and target (empty for a version).
    pub account_url: String,
    pub target: String,
    pub delete: bool,
    pub why: String,
}

/// Reads what retention judges: the definition's versions (none when it does not exist) and the
/// pools of every account in `account_urls`.
pub async fn survey(
    azure: &dyn AzureApi,
    definition: &GalleryImageId,
    account_urls: &[String],
    local_now: OffsetDateTime,
) -> Result<Survey, AzureError> {
    let versions = versions_of(azure, definition).await?;
    let pools = survey_pools(azure, definition, account_urls, None, local_now).await?;
    Ok(Survey { versions, ..pools })
}

/// The definition's versions; none when it does not exist.
pub async fn versions_of(azure: &dyn AzureApi, definition: &GalleryImageId) -> Result<Vec<ListedVersion>, AzureError> {
    match azure.list_versions(definition).await {
        Err(e) if e.is_not_found() => Ok(Vec::new()),
        other => other,
    }
}

/// The pools of `account_urls`, without the definition's versions; an account whose list the
/// caller read already in the same step (`known`: its URL and the list) is not read again.
pub async fn survey_pools(
    azure: &dyn AzureApi,
    definition: &GalleryImageId,
    account_urls: &[String],
    mut known: Option<(&str, PoolList)>,
    local_now: OffsetDateTime,
) -> Result<Survey, AzureError> {
    let mut pools = Vec::new();
    let mut as_of = None;
    let mut seen: Vec<&String> = Vec::new();
    for url in account_urls {
        if seen.contains(&url) {
            continue;
        }
        seen.push(url);
        let listed = match known.take_if(|(read, _)| *read == url.as_str()) {
            Some((_, listed)) => listed,
            None => azure.list_pools_dated(url).await?,
        };
        as_of = as_of.or(listed.as_of);
        pools.extend(listed.pools.into_iter().map(|pool| AccountPool {
            account_url: url.clone(),
            pool,
        }));
    }
    Ok(Survey {
        definition: definition.clone(),
        versions: Vec::new(),
        pools,
        as_of: as_of.unwrap_or(local_now),
    })
}

/// [`survey`] of `definition` and the Batch accounts of `spec`'s pools, outside a run (a run's
/// plan names its accounts' URLs already).
pub async fn survey_spec(
    azure: &dyn AzureApi,
    definition: &GalleryImageId,
    spec: &crate::model::spec::PipelineSpec,
    local_now: OffsetDateTime,
) -> Result<Survey, AzureError> {
    let mut accounts = Vec::new();
    for pool in &spec.pools {
        accounts.push(azure.get_batch_account(&pool.account).await?.url);
    }
    survey(azure, definition, &accounts, local_now).await
}

/// The version `latest` resolves to among `versions`: the highest number not excluded from
/// latest and not being deleted.
pub fn latest(versions: &[ListedVersion]) -> Option<ImageVersion> {
    versions
        .iter()
        .filter(|v| v.info.provisioning_state != ProvisioningState::Deleting && !v.info.exclude_from_latest)
        .filter_map(|v| ImageVersion::parse(&v.name))
        .max()
}

/// Every version and every retired pool of the pipeline, judged.
pub fn judge(survey: &Survey, policy: &Policy, runs: &dyn Runs) -> Vec<Verdict> {
    let mut verdicts = judge_versions(survey, policy, runs);
    verdicts.extend(judge_pools(&survey.pools, survey.as_of, policy));
    verdicts
}

/// How many of one account's pools are `pipeline`'s retired ones: what the pool quota may take
/// back (pool-create deletes the oldest of them when the account is full).
pub fn reclaimable(pipeline: &str, account_url: &str, pools: &[PoolInfo]) -> usize {
    let pools: Vec<AccountPool> = pools
        .iter()
        .map(|pool| AccountPool {
            account_url: account_url.to_string(),
            pool: pool.clone(),
        })
        .collect();
    let policy = Policy {
        pipeline: pipeline.to_string(),
        keep_versions: 1,
        pool_grace: Duration::ZERO,
        ceiling: None,
        young: Duration::ZERO,
    };
    judge_pools(&pools, OffsetDateTime::UNIX_EPOCH, &policy).len()
}

fn judge_versions(survey: &Survey, policy: &Policy, runs: &dyn Runs) -> Vec<Verdict> {
    let ours = |v: &ListedVersion| v.info.tags.get("sigrun-pipeline") == Some(&policy.pipeline);
    let staying = |v: &&ListedVersion| v.info.provisioning_state != ProvisioningState::Deleting;
    let mut newest: Vec<ImageVersion> = survey
        .versions
        .iter()
        .filter(|v| ours(v))
        .filter(staying)
        .filter_map(|v| ImageVersion::parse(&v.name))
        .collect();
    newest.sort_unstable_by(|a, b| b.cmp(a));
    newest.truncate(policy.keep_versions as usize);
    let latest = latest(&survey.versions);
    let definition = survey.definition.to_string();
    survey
        .versions
        .iter()
        .filter(|v| ours(v))
        .map(|v| {
            let keep = why_kept(v, &newest, latest, &definition, survey, policy, runs);
            Verdict {
                kind: DeletedKind::ImageVersion,
                name: v.name.clone(),
                account_url: String::new(),
                target: String::new(),
                delete: keep.is_none(),
                why: keep.unwrap_or_else(|| format!("older than the newest {} and unused", policy.keep_versions)),
            }
        })
        .collect()
}

/// Why a version of this pipeline stays, if it does.
fn why_kept(
    v: &ListedVersion,
    newest: &[ImageVersion],
    latest: Option<ImageVersion>,
    definition: &str,
    survey: &Survey,
    policy: &Policy,
    runs: &dyn Runs,
) -> Option<String> {
    let Some(number) = ImageVersion::parse(&v.name) else {
        return Some("not a version number".into());
    };
    if v.info.provisioning_state == ProvisioningState::Deleting {
        return Some("already being deleted".into());
    }
    if newest.contains(&number) {
        return Some(format!("among the newest {}", policy.keep_versions));
    }
    if latest == Some(number) {
        return Some("`latest` resolves to it".into());
    }
    if policy.ceiling.is_some_and(|ceiling| number > ceiling) {
        return Some("newer than the run deciding".into());
    }
    let id = format!("{definition}/versions/{}", v.name);
    if let Some(user) = survey.pools.iter().find(|p| {
        p.pool
            .image_id
            .as_deref()
            .is_some_and(|image| image.eq_ignore_ascii_case(&id))
    }) {
        return Some(format!("pool {} uses it", user.pool.id));
    }
    if v.info.provisioning_state.is_changing() {
        return Some(format!("still {}", v.info.provisioning_state.as_str()));
    }
    let run = v
        .info
        .tags
        .get("sigrun-run")
        .and_then(|r| uuid::Uuid::parse_str(r).ok());
    match run.and_then(|run| runs.run_in_progress(run)) {
        Some(true) => Some("its run is still going".into()),
        Some(false) => None,
        // A run this history does not hold may still be making its pools from it.
        None => young(v, survey.as_of, policy.young),
    }
}

/// Why a version whose run is unknown stays: published less than `young` ago (or when unknown).
fn young(v: &ListedVersion, as_of: OffsetDateTime, young: Duration) -> Option<String> {
    let Some(published) = v.info.published else {
        return Some("its run is unknown and its publish date too".into());
    };
    let age: Duration = (as_of - published).try_into().unwrap_or_default();
    (age < young).then(|| {
        format!(
            "published {} ago by a run this history does not hold",
            crate::model::spec::duration::format(Duration::from_secs(age.as_secs()))
        )
    })
}

fn judge_pools(pools: &[AccountPool], as_of: OffsetDateTime, policy: &Policy) -> Vec<Verdict> {
    let ours = |p: &&AccountPool| p.pool.metadata.get("sigrun-pipeline") == Some(&policy.pipeline);
    let version_of = |p: &AccountPool| {
        p.pool
            .metadata
            .get("sigrun-version")
            .and_then(|v| ImageVersion::parse(v))
    };
    // The newest pool of each (account, target): never retention's to delete.
    let mut newest: BTreeMap<(String, String), ImageVersion> = BTreeMap::new();
    for pool in pools.iter().filter(ours) {
        let (Some(target), Some(version)) = (pool.pool.metadata.get("sigrun-target"), version_of(pool)) else {
            continue;
        };
        let slot = newest
            .entry((pool.account_url.clone(), target.clone()))
            .or_insert(version);
        *slot = (*slot).max(version);
    }
    let mut retired: Vec<(&AccountPool, OffsetDateTime)> = pools
        .iter()
        .filter(ours)
        .filter_map(|p| {
            let target = p.pool.metadata.get("sigrun-target")?;
            let version = version_of(p)?;
            let newer_beside = newest
                .get(&(p.account_url.clone(), target.clone()))
                .is_some_and(|n| *n > version);
            (newer_beside && is_retired(&p.pool)).then_some((p, p.pool.allocation_changed?))
        })
        .collect();
    retired.sort_by_key(|(_, since)| *since);
    retired
        .into_iter()
        .map(|(p, since)| {
            let age: Duration = (as_of - since).try_into().unwrap_or_default();
            let due = age >= policy.pool_grace;
            Verdict {
                kind: DeletedKind::Pool,
                name: p.pool.id.clone(),
                account_url: p.account_url.clone(),
                target: p.pool.metadata.get("sigrun-target").cloned().unwrap_or_default(),
                delete: due,
                why: format!(
                    "retired {} ago (grace {})",
                    crate::model::spec::duration::format(Duration::from_secs(age.as_secs())),
                    crate::model::spec::duration::format(policy.pool_grace)
                ),
            }
        })
        .collect()
}

/// Scaled to zero by the rollout (its mark) and settled there.
pub fn is_retired(pool: &PoolInfo) -> bool {
    pool.metadata.contains_key(RETIRED)
        && pool.state == PoolState::Active
        && pool.allocation_state == AllocationState::Steady
        && pool.target_dedicated == 0
        && pool.target_low_priority == 0
}

/// Carries out the deletes among `verdicts`, into `done` a `ResourceDeleted` for each delete Azure
/// accepted. One refused does not stop the rest: the first error comes back once all were tried.
pub async fn apply(
    azure: &dyn AzureApi,
    definition: &GalleryImageId,
    verdicts: &[Verdict],
    done: &mut Vec<EventKind>,
) -> Result<(), AzureError> {
    let mut first_error = None;
    for verdict in verdicts.iter().filter(|v| v.delete) {
        match delete(azure, definition, verdict).await {
            Ok(id) => done.push(EventKind::ResourceDeleted { what: verdict.kind, id }),
            Err(error) => {
                tracing::warn!(%error, name = %verdict.name, "retention: a delete was refused; the others go on");
                first_error.get_or_insert(error);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Deletes what one verdict names; its id as the run's history records it.
async fn delete(azure: &dyn AzureApi, definition: &GalleryImageId, verdict: &Verdict) -> Result<String, AzureError> {
    match verdict.kind {
        DeletedKind::ImageVersion => {
            let id = definition
                .version(&verdict.name)
                .map_err(|e| AzureError::permanent("delete_version", "InvalidVersion", e.to_string()))?;
            azure.delete_version(&id).await?;
            Ok(id.to_string())
        }
        DeletedKind::Pool => {
            azure.delete_pool(&verdict.account_url, &verdict.name).await?;
            Ok(format!("{}/pools/{}", verdict.account_url, verdict.name))
        }
        DeletedKind::Snapshot | DeletedKind::Image => Err(AzureError::permanent(
            "retention",
            "NotRetention",
            "retention deletes versions and pools only",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::azure::ProvisioningState;
    use crate::azure::api::{Tags, VersionInfo};
    use crate::stages::NoHistory;

    const DEFINITION: &str = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/ubuntu";
    const ACCOUNT: &str = "https://sigrunweu.westeurope.batch.azure.com";

    fn version(name: &str, pipeline: &str) -> ListedVersion {
        ListedVersion {
            name: name.into(),
            info: VersionInfo {
                provisioning_state: ProvisioningState::Succeeded,
                exclude_from_latest: false,
                source: None,
                target_regions: Vec::new(),
                replication: Vec::new(),
                tags: Tags::from([
                    ("sigrun-pipeline".to_string(), pipeline.to_string()),
                    ("sigrun-run".to_string(), uuid::Uuid::new_v4().to_string()),
                ]),
                // A month before the survey: no run could still be using it unseen.
                published: Some(OffsetDateTime::UNIX_EPOCH + time::Duration::days(70)),
            },
        }
    }

    fn pool(id: &str, target: &str, version: &str, nodes: u32, retired_days_ago: i64) -> AccountPool {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(100);
        AccountPool {
            account_url: ACCOUNT.into(),
            pool: PoolInfo {
                id: id.into(),
                vm_size: "Standard_D4s_v5".into(),
                state: PoolState::Active,
                allocation_state: AllocationState::Steady,
                current_dedicated: nodes,
                current_low_priority: 0,
                target_dedicated: nodes,
                target_low_priority: 0,
                resize_errors: Vec::new(),
                metadata: BTreeMap::from([
                    ("sigrun-pipeline".to_string(), "nightly".to_string()),
                    ("sigrun-target".to_string(), target.to_string()),
                    ("sigrun-version".to_string(), version.to_string()),
                    (RETIRED.to_string(), "2026-01-01T00:00:00Z".to_string()),
                ]),
                image_id: Some(format!("{DEFINITION}/versions/{version}")),
                created: Some(now - time::Duration::days(retired_days_ago + 1)),
                allocation_changed: Some(now - time::Duration::days(retired_days_ago)),
            },
        }
    }

    fn survey(versions: Vec<ListedVersion>, pools: Vec<AccountPool>) -> Survey {
        Survey {
            definition: GalleryImageId::parse(DEFINITION).unwrap(),
            versions,
            pools,
            as_of: OffsetDateTime::UNIX_EPOCH + time::Duration::days(100),
        }
    }

    fn policy(keep: u32) -> Policy {
        Policy {
            pipeline: "nightly".into(),
            keep_versions: keep,
            pool_grace: Duration::from_secs(3 * 86_400),
            ceiling: None,
            young: Duration::from_secs(86_400),
        }
    }

    fn deleted(verdicts: &[Verdict]) -> Vec<&str> {
        verdicts.iter().filter(|v| v.delete).map(|v| v.name.as_str()).collect()
    }

    #[test]
    fn the_newest_k_latest_and_versions_in_use_stay_and_only_this_pipelines_go() {
        let mut versions: Vec<ListedVersion> = (1..=8).map(|d| version(&format!("2026.120{d}.0"), "nightly")).collect();
        versions.push(version("2026.1101.0", "weekly"));
        let mut untagged = version("2025.0101.0", "nightly");
        untagged.info.tags.clear();
        versions.push(untagged);
        // The newest is gated (excluded from latest): `latest` resolves to 2026.1207.0.
        versions[7].info.exclude_from_latest = true;
        let pools = vec![pool("nightly-render-2026-1202-0", "render", "2026.1202.0", 0, 5)];
        let verdicts = judge(&survey(versions, pools), &policy(1), &NoHistory);
        assert_eq!(
            deleted(&verdicts),
            [
                "2026.1201.0",
                "2026.1203.0",
                "2026.1204.0",
                "2026.1205.0",
                "2026.1206.0"
            ]
        );
        let why = |name: &str| verdicts.iter().find(|v| v.name == name).unwrap().why.clone();
        assert_eq!(why("2026.1208.0"), "among the newest 1");
        assert_eq!(why("2026.1207.0"), "`latest` resolves to it");
        assert_eq!(why("2026.1202.0"), "pool nightly-render-2026-1202-0 uses it");
        assert!(
            verdicts
                .iter()
                .all(|v| v.name != "2026.1101.0" && v.name != "2025.0101.0")
        );
    }

    #[test]
    fn a_version_being_made_newer_than_the_run_or_of_a_live_run_stays() {
        struct Live(uuid::Uuid);
        impl Runs for Live {
            fn pool_in_progress(&self, _: uuid::Uuid, _: &str) -> Option<bool> {
                None
            }
            fn run_in_progress(&self, run: uuid::Uuid) -> Option<bool> {
                Some(run == self.0)
            }
        }
        let mut creating = version("2026.1201.0", "nightly");
        creating.info.provisioning_state = ProvisioningState::Creating;
        let live = version("2026.1202.0", "nightly");
        let live_run = uuid::Uuid::parse_str(&live.info.tags["sigrun-run"]).unwrap();
        let old = version("2026.1203.0", "nightly");
        let newer = version("2026.1210.0", "nightly");
        let latest = version("2026.1211.0", "nightly");
        let versions = vec![creating, live, old, newer, latest];
        let mut in_run = policy(1);
        in_run.ceiling = ImageVersion::parse("2026.1205.0");
        let verdicts = judge(&survey(versions, Vec::new()), &in_run, &Live(live_run));
        assert_eq!(deleted(&verdicts), ["2026.1203.0"]);
        let why = |name: &str| verdicts.iter().find(|v| v.name == name).unwrap().why.clone();
        assert_eq!(why("2026.1201.0"), "still Creating");
        assert_eq!(why("2026.1202.0"), "its run is still going");
        assert_eq!(why("2026.1210.0"), "newer than the run deciding");
    }

    #[test]
    fn versions_being_deleted_count_for_neither_the_newest_nor_latest() {
        let mut versions: Vec<ListedVersion> = (1..=3).map(|d| version(&format!("2026.120{d}.0"), "nightly")).collect();
        versions[2].info.provisioning_state = ProvisioningState::Deleting;
        let verdicts = judge(&survey(versions, Vec::new()), &policy(1), &NoHistory);
        let why = |name: &str| verdicts.iter().find(|v| v.name == name).unwrap().why.clone();
        assert_eq!(why("2026.1203.0"), "already being deleted");
        assert_eq!(why("2026.1202.0"), "among the newest 1");
        assert_eq!(deleted(&verdicts), ["2026.1201.0"]);
    }

    #[test]
    fn a_version_of_a_run_the_history_does_not_hold_stays_while_young() {
        let mut fresh = version("2026.1201.0", "nightly");
        fresh.info.published = Some(OffsetDateTime::UNIX_EPOCH + time::Duration::hours(100 * 24 - 5));
        let mut undated = version("2026.1202.0", "nightly");
        undated.info.published = None;
        let old = version("2026.1203.0", "nightly");
        let newest = version("2026.1204.0", "nightly");
        let verdicts = judge(
            &survey(vec![fresh, undated, old, newest], Vec::new()),
            &policy(1),
            &NoHistory,
        );
        let why = |name: &str| verdicts.iter().find(|v| v.name == name).unwrap().why.clone();
        assert_eq!(
            why("2026.1201.0"),
            "published 5h ago by a run this history does not hold"
        );
        assert_eq!(why("2026.1202.0"), "its run is unknown and its publish date too");
        assert_eq!(deleted(&verdicts), ["2026.1203.0"]);
    }

    #[tokio::test]
    async fn one_refused_delete_does_not_stop_the_others() {
        use crate::stages::fake_azure::FakeAzure;
        let azure = FakeAzure::default();
        azure.world().refused_deletes.push("2026.1201.0".into());
        let versions: Vec<ListedVersion> = (1..=3).map(|d| version(&format!("2026.120{d}.0"), "nightly")).collect();
        let pools = vec![
            pool("render-2", "render", "2026.1203.0", 4, 0),
            pool("render-1", "render", "2026.1202.0", 0, 9),
        ];
        let survey = survey(versions, pools);
        let verdicts = judge(&survey, &policy(1), &NoHistory);
        let mut done = Vec::new();
        let applied = apply(&azure, &survey.definition, &verdicts, &mut done).await;
        assert!(applied.is_err_and(|e| e.to_string().contains("in use")));
        assert_eq!(
            azure.world().writes,
            ["delete_pool render-1"],
            "the pool went despite the version"
        );
        assert_eq!(done.len(), 1);
    }

    #[test]
    fn a_pool_at_zero_the_rollout_did_not_retire_is_not_retentions() {
        let mut by_hand = pool("render-1", "render", "2026.1201.0", 0, 30);
        by_hand.pool.metadata.remove(RETIRED);
        let mut unversioned = pool("render-x", "render", "2026.1201.0", 0, 30);
        unversioned
            .pool
            .metadata
            .insert("sigrun-version".into(), "latest".into());
        let pools = vec![pool("render-2", "render", "2026.1202.0", 4, 0), by_hand, unversioned];
        let verdicts = judge(&survey(Vec::new(), pools), &policy(10), &NoHistory);
        assert!(verdicts.is_empty(), "{verdicts:?}");
    }

    #[test]
    fn retired_pools_go_after_the_grace_oldest_first_and_the_newest_of_a_target_never() {
        let pools = vec![
            pool("render-3", "render", "2026.1203.0", 10, 0),
            pool("render-2", "render", "2026.1202.0", 0, 2),
            pool("render-1", "render", "2026.1201.0", 0, 4),
            pool("render-0", "render", "2026.1130.0", 0, 5),
            // Scaled to zero by hand, but the newest of its target: not retention's.
            pool("sim-1", "sim", "2026.1201.0", 0, 30),
            // Still resizing to zero: not retired yet.
            {
                let mut p = pool("sim-0", "sim", "2026.1130.0", 0, 30);
                p.pool.allocation_state = AllocationState::Resizing;
                p
            },
        ];
        let verdicts = judge(&survey(Vec::new(), pools), &policy(10), &NoHistory);
        let judged: Vec<(&str, bool)> = verdicts.iter().map(|v| (v.name.as_str(), v.delete)).collect();
        assert_eq!(judged, [("render-0", true), ("render-1", true), ("render-2", false)]);
        assert_eq!(verdicts[2].why, "retired 2d ago (grace 3d)");
    }
}
