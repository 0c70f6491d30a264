//! The fleet page's facts, per pipeline of the `[pipelines] dir`: its definition's versions in the
//! gallery (state, the regions holding replicas, which one `latest` is), the pools of its Batch
//! accounts that use each version, the accounts' quota headroom, and what retention deletes next
//! and why. Read from Azure with the calls the workers make (`retention::survey`,
//! `planner::survey_quotas`) and judged by the same `retention::judge`, as `sigrun prune` judges
//! (no run's own version to spare, every account of the spec's pools), with the run history's
//! live runs keeping their versions. [`FleetSource`] reads at most once per
//! [`FRESH`] however many viewers ask; [`view`] is pure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use uuid::Uuid;

use crate::azure::{AzureApi, ProvisioningState};
use crate::events::DeletedKind;
use crate::model::plan::QuotaUse;
use crate::model::rules::ImageVersion;
use crate::model::spec::PipelineSpec;
use crate::stages::Runs;
use crate::stages::retention::{self, Policy, Survey, Verdict};

/// How long one reading of the fleet serves every viewer.
pub const FRESH: Duration = Duration::from_secs(20);

/// One pipeline's part of the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineFleet {
    pub name: String,
    pub description: String,
    /// The gallery image definition its versions go to.
    pub definition: String,
    /// Newest first.
    pub versions: Vec<VersionRow>,
    pub quotas: Vec<QuotaUse>,
    /// Retention's verdicts on retired pools (its verdicts on versions are on their rows).
    pub retired_pools: Vec<Verdict>,
    /// Why Azure could not be read for it, when it could not.
    pub unreadable: Option<String>,
    /// Batch's clock at the reading.
    pub as_of: Option<OffsetDateTime>,
}

/// One version of the definition.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    pub name: String,
    pub state: ProvisioningState,
    pub published: Option<OffsetDateTime>,
    /// `latest` resolves to it.
    pub latest: bool,
    /// This pipeline published it (its `sigrun-pipeline` tag).
    pub ours: bool,
    /// (region, replicas)
    pub regions: Vec<(String, u32)>,
    pub pools: Vec<PoolUse>,
    /// What retention decided for it (`None` for another pipeline's version: never touched).
    pub retention: Option<Verdict>,
}

/// A pool built from a version.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolUse {
    /// The account's data-plane host.
    pub account: String,
    pub pool: String,
    /// Dedicated plus low-priority nodes now.
    pub nodes: u32,
    /// Built from the definition (`latest`), not a named version.
    pub via_latest: bool,
    pub retired: bool,
}

/// The fleet page's facts from one survey of `spec`'s definition and accounts.
pub fn view(spec: &PipelineSpec, survey: &Survey, quotas: Vec<QuotaUse>, verdicts: Vec<Verdict>) -> PipelineFleet {
    let definition = survey.definition.to_string();
    let latest = retention::latest(&survey.versions);
    let (version_verdicts, retired_pools): (Vec<Verdict>, Vec<Verdict>) =
        verdicts.into_iter().partition(|v| v.kind == DeletedKind::ImageVersion);
    let mut versions: Vec<VersionRow> = survey
        .versions
        .iter()
        .map(|v| {
            let is_latest = latest.is_some() && ImageVersion::parse(&v.name) == latest;
            let id = format!("{definition}/versions/{}", v.name);
            VersionRow {
                name: v.name.clone(),
                state: v.info.provisioning_state.clone(),
                published: v.info.published,
                latest: is_latest,
                ours: v.info.tags.get("sigrun-pipeline") == Some(&spec.name),
                regions: v.info.target_regions.clone(),
                pools: users(survey, &id, is_latest.then_some(definition.as_str())),
                retention: version_verdicts.iter().find(|x| x.name == v.name).cloned(),
            }
        })
        .collect();
    versions.sort_by(|a, b| ImageVersion::parse(&b.name).cmp(&ImageVersion::parse(&a.name)));
    PipelineFleet {
        name: spec.name.clone(),
        description: spec.description.clone(),
        definition,
        versions,
        quotas,
        retired_pools,
        unreadable: None,
        as_of: Some(survey.as_of),
    }
}

/// The surveyed pools built from `version_id`, or from `definition` (`latest`) when given.
fn users(survey: &Survey, version_id: &str, definition: Option<&str>) -> Vec<PoolUse> {
    survey
        .pools
        .iter()
        .filter_map(|p| {
            let image = p.pool.image_id.as_deref()?;
            let via_latest = definition.is_some_and(|d| image.eq_ignore_ascii_case(d));
            (via_latest || image.eq_ignore_ascii_case(version_id)).then(|| PoolUse {
                account: host(&p.account_url),
                pool: p.pool.id.clone(),
                nodes: p.pool.current_dedicated.saturating_add(p.pool.current_low_priority),
                via_latest,
                retired: retention::is_retired(&p.pool),
            })
        })
        .collect()
}

fn host(url: &str) -> String {
    url.split_once("://")
        .map_or(url, |(_, rest)| rest)
        .trim_end_matches('/')
        .to_string()
}

/// Reads and judges one pipeline now; a pipeline Azure cannot answer for says why.
pub async fn look(spec: &PipelineSpec, azure: &dyn AzureApi, runs: &dyn Runs) -> PipelineFleet {
    match read(spec, azure).await {
        Ok((survey, quotas)) => {
            let verdicts = if spec.retention.enabled {
                retention::judge(&survey, &Policy::of(spec, None), runs)
            } else {
                Vec::new()
            };
            view(spec, &survey, quotas, verdicts)
        }
        Err(why) => PipelineFleet {
            name: spec.name.clone(),
            description: spec.description.clone(),
            definition: crate::planner::definition_id(spec)
                .map(|d| d.to_string())
                .unwrap_or_default(),
            versions: Vec::new(),
            quotas: Vec::new(),
            retired_pools: Vec::new(),
            unreadable: Some(why),
            as_of: None,
        },
    }
}

async fn read(spec: &PipelineSpec, azure: &dyn AzureApi) -> Result<(Survey, Vec<QuotaUse>), String> {
    let definition = crate::planner::definition_id(spec).map_err(|e| e.to_string())?;
    let survey = retention::survey_spec(azure, &definition, spec, OffsetDateTime::now_utc())
        .await
        .map_err(|e| e.to_string())?;
    let quotas = crate::planner::survey_quotas(spec, azure)
        .await
        .map_err(|e| e.to_string())?;
    Ok((survey, quotas))
}

/// Which runs the history holds and whether each is still going (retention keeps a live run's
/// version).
#[derive(Debug, Default)]
pub struct KnownRuns(pub HashMap<Uuid, bool>);

impl Runs for KnownRuns {
    fn pool_in_progress(&self, _run_id: Uuid, _target: &str) -> Option<bool> {
        None
    }

    fn run_in_progress(&self, run_id: Uuid) -> Option<bool> {
        self.0.get(&run_id).copied()
    }
}

/// The fleet as last read, shared by every viewer, read again once older than [`FRESH`].
pub struct FleetSource {
    azure: Arc<dyn AzureApi>,
    pipelines: PathBuf,
    last: tokio::sync::Mutex<Option<(Instant, Arc<Vec<PipelineFleet>>)>>,
}

impl FleetSource {
    pub fn new(azure: Arc<dyn AzureApi>, pipelines: PathBuf) -> FleetSource {
        FleetSource {
            azure,
            pipelines,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The fleet, read now unless a reading younger than [`FRESH`] is at hand. Viewers asking
    /// while it is read wait for that one reading.
    pub async fn current(&self, runs: &KnownRuns) -> Arc<Vec<PipelineFleet>> {
        let mut last = self.last.lock().await;
        if let Some((at, fleet)) = last.as_ref()
            && at.elapsed() < FRESH
        {
            return Arc::clone(fleet);
        }
        let mut fleet = Vec::new();
        for name in crate::admission::pipelines::names(&self.pipelines) {
            if let Ok(found) = crate::admission::pipelines::find(&self.pipelines, &name) {
                fleet.push(look(&found.spec, self.azure.as_ref(), runs).await);
            }
        }
        let fleet = Arc::new(fleet);
        *last = Some((Instant::now(), Arc::clone(&fleet)));
        fleet
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::azure::api::{ListedVersion, PoolInfo, Tags, VersionInfo};
    use crate::azure::{AllocationState, PoolState};
    use crate::model::ids::GalleryImageId;
    use crate::stages::retention::AccountPool;

    const DEFINITION: &str = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/ubuntu";

    fn version(name: &str, pipeline: &str, regions: &[(&str, u32)]) -> ListedVersion {
        ListedVersion {
            name: name.into(),
            info: VersionInfo {
                provisioning_state: ProvisioningState::Succeeded,
                exclude_from_latest: false,
                source: None,
                target_regions: regions.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
                replication: Vec::new(),
                tags: Tags::from([("sigrun-pipeline".to_string(), pipeline.to_string())]),
                published: None,
            },
        }
    }

    fn pool(id: &str, image: &str, nodes: u32) -> AccountPool {
        AccountPool {
            account_url: "https://acct.westeurope.batch.azure.com".into(),
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
                metadata: BTreeMap::new(),
                image_id: Some(image.to_string()),
                created: None,
                allocation_changed: None,
            },
        }
    }

    fn spec() -> PipelineSpec {
        let mut spec = PipelineSpec::load(std::path::Path::new("pipelines/nightly-ubuntu.toml")).unwrap();
        spec.name = "nightly".into();
        spec
    }

    #[test]
    fn versions_come_newest_first_with_their_replicas_pools_and_verdicts() {
        let survey = Survey {
            definition: GalleryImageId::parse(DEFINITION).unwrap(),
            versions: vec![
                version("2026.1201.1", "nightly", &[("westeurope", 1)]),
                version("2026.1202.1", "nightly", &[("westeurope", 2), ("eastus", 1)]),
                version("2026.1130.1", "other", &[]),
            ],
            pools: vec![
                pool("render-1202", &format!("{DEFINITION}/versions/2026.1202.1"), 3),
                pool("latest-user", &DEFINITION.to_uppercase(), 1),
                pool("render-1201", &format!("{DEFINITION}/versions/2026.1201.1"), 0),
                pool("marketplace", "canonical:ubuntu", 5),
            ],
            as_of: OffsetDateTime::UNIX_EPOCH,
        };
        let verdict = Verdict {
            kind: DeletedKind::ImageVersion,
            name: "2026.1201.1".into(),
            account_url: String::new(),
            target: String::new(),
            delete: true,
            why: "older than the newest 1 and unused".into(),
        };
        let fleet = view(&spec(), &survey, Vec::new(), vec![verdict.clone()]);
        let names: Vec<&str> = fleet.versions.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["2026.1202.1", "2026.1201.1", "2026.1130.1"]);
        let newest = &fleet.versions[0];
        assert!(newest.latest && newest.ours);
        assert_eq!(
            newest.regions,
            [("westeurope".to_string(), 2), ("eastus".to_string(), 1)]
        );
        let users: Vec<(&str, bool)> = newest.pools.iter().map(|p| (p.pool.as_str(), p.via_latest)).collect();
        assert_eq!(users, [("render-1202", false), ("latest-user", true)]);
        assert_eq!(newest.pools[0].account, "acct.westeurope.batch.azure.com");
        assert_eq!(fleet.versions[1].retention, Some(verdict));
        assert!(!fleet.versions[1].latest);
        assert_eq!(fleet.versions[1].pools[0].pool, "render-1201");
        assert!(
            !fleet.versions[2].ours,
            "another pipeline's version is shown, not judged"
        );
        assert!(fleet.retired_pools.is_empty());
    }

    #[test]
    fn the_fleet_page_shows_markup_from_a_spec_and_azure_as_text() {
        let mut spec = spec();
        spec.description = "<script>alert(1)</script>".into();
        let survey = Survey {
            definition: GalleryImageId::parse(DEFINITION).unwrap(),
            versions: vec![version("1.0.0", "nightly", &[("<b>eu</b>", 1)])],
            pools: Vec::new(),
            as_of: OffsetDateTime::UNIX_EPOCH,
        };
        let fleet = view(&spec, &survey, Vec::new(), Vec::new());
        let page = super::super::fleet_page::fleet_page(&[fleet], None);
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{page}");
        assert!(page.contains("&lt;b&gt;eu&lt;/b&gt;"), "{page}");
        assert!(!page.contains("<script>alert") && !page.contains("<b>eu"), "{page}");
    }
}
