//! The planner: turns a pipeline spec into a [`Plan`] by reading Azure (creating nothing) and
//! applying every preflight rule — the build VM has managed disks, no extensions and a base image
//! Batch supports; the definition (if it exists) is generalized and matches; every pool's region
//! gets a replica; replicas and resize timeouts are never below the documented minimums (raised,
//! with a warning); the node agent SKU matches the image's OS; regions and VM sizes are ones Azure
//! has (`azure_values`); every Batch account's pools fit its pool and core quotas (`quotas`).
//! `sigrun validate` prints the plan;
//! `sigrun run` carries it in every message.

mod azure_values;
mod build;
mod pools;
mod quotas;
pub use quotas::survey as survey_quotas;
mod regions;

use std::collections::BTreeMap;

use time::OffsetDateTime;

use crate::azure::api::{BatchAccountInfo, SupportedImage};
use crate::azure::{AzureApi, AzureError, ProvisioningState, RegistrationState};
use crate::model::ids::{GalleryImageId, ImageId};
use crate::model::plan::{BuildPlan, Plan, PoolPlan, Presence, Seen};
use crate::model::rules;
use crate::model::spec::{PipelineSpec, VersionScheme};

/// Why a pipeline cannot run; names what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The spec asks for something the Azure rules (or Azure's current state) forbid.
    #[error("{key}: {message}")]
    Rule { key: String, message: String },
    /// Reading Azure failed.
    #[error(transparent)]
    Azure(#[from] AzureError),
}

fn rule(key: &str, message: impl Into<String>) -> PlanError {
    PlanError::Rule {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Canonical region name: `West US 2` → `westus2`.
pub fn region_key(name: &str) -> String {
    name.chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// `YYYY.MMDD.N` for `today`, N one more than the highest published today.
pub fn next_nightly(existing: &[String], today: time::Date) -> String {
    let prefix = format!("{}.{:02}{:02}.", today.year(), today.month() as u8, today.day());
    let next = existing
        .iter()
        .filter_map(|v| v.strip_prefix(&prefix)?.parse::<u32>().ok())
        .max()
        .map_or(0, |n| n + 1);
    format!("{prefix}{next}")
}

/// The version a run publishes (or rolls out), as [`resolve_version`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedVersion {
    pub name: String,
    /// Not among the definition's versions when they were listed (a nightly number is chosen
    /// past them); false when it was not looked for.
    pub absent: bool,
}

/// Resolves the version this run publishes (or rolls out).
pub async fn resolve_version(
    spec: &PipelineSpec,
    requested: Option<&str>,
    azure: &dyn AzureApi,
    today: time::Date,
) -> Result<ResolvedVersion, PlanError> {
    let named = |name: String| ResolvedVersion { name, absent: false };
    if let Some(v) = requested {
        if !crate::model::ids::version_name_ok(v) {
            return Err(rule(
                "--version",
                format!("`{v}` must be Major.Minor.Patch with 32-bit integer parts"),
            ));
        }
        return Ok(named(v.to_string()));
    }
    match spec.version.scheme {
        VersionScheme::Explicit | VersionScheme::Existing => {
            let scheme = if spec.version.scheme == VersionScheme::Explicit {
                "explicit"
            } else {
                "existing"
            };
            spec.version
                .value
                .clone()
                .map(named)
                .ok_or_else(|| rule("version.value", format!("the `{scheme}` scheme names its version")))
        }
        VersionScheme::Nightly => {
            let definition = definition_id(spec)?;
            let existing: Vec<String> = azure
                .list_versions(&definition)
                .await
                .or_else(|e| if e.is_not_found() { Ok(Vec::new()) } else { Err(e) })?
                .into_iter()
                .map(|v| v.name)
                .collect();
            Ok(ResolvedVersion {
                name: next_nightly(&existing, today),
                absent: true,
            })
        }
    }
}

/// The spec's image definition, as an id.
pub fn definition_id(spec: &PipelineSpec) -> Result<GalleryImageId, PlanError> {
    let g = &spec.gallery.id;
    GalleryImageId::new(g.subscription(), g.resource_group(), &[g.name(), &spec.definition.name])
        .map_err(|e| rule("definition.name", e.to_string()))
}

/// Options that change what the plan starts from.
#[derive(Debug, Clone, Default)]
pub struct PlanInputs {
    /// The version (resolved by [`resolve_version`]).
    pub version: String,
    /// The version was not among the definition's when it was resolved.
    pub version_absent: bool,
    /// Roll out this existing version instead of building (`--image-version-id`).
    pub existing_version: bool,
    /// Publish from this existing managed image (entry at gallery-publish).
    pub existing_image: Option<ImageId>,
}

pub async fn plan(
    spec: &PipelineSpec,
    inputs: &PlanInputs,
    azure: &dyn AzureApi,
    now: OffsetDateTime,
) -> Result<Plan, PlanError> {
    let mut warnings = Vec::new();
    let definition = definition_id(spec)?;
    let version_id = definition
        .version(&inputs.version)
        .map_err(|e| rule("version", e.to_string()))?;
    let rollout_only = inputs.existing_version || spec.version.scheme == VersionScheme::Existing;
    let (accounts, supported) = read_accounts(spec, azure).await?;
    let build = if rollout_only {
        None
    } else {
        Some(build::plan_build(spec, inputs, azure, &supported, &mut warnings).await?)
    };
    let definition_seen = check_existing_definition(spec, &definition, rollout_only, azure).await?;
    let source_region = build.as_ref().map(|b| b.region.clone()).unwrap_or_default();
    let gallery_region = spec
        .gallery
        .region
        .as_deref()
        .map(region_key)
        .unwrap_or_else(|| source_region.clone());
    let chosen = pools::Chosen {
        accounts: &accounts,
        build: build.as_ref(),
        supported: &supported,
    };
    let pools = pools::plan_pools(spec, inputs, &chosen, &mut warnings)?;
    azure_values::check(spec, &pools, !rollout_only, azure, &mut warnings).await?;
    let quota_use = quotas::check(spec.retention.enabled, &pools, &accounts, azure, &mut warnings).await?;
    let regions = if rollout_only {
        regions::of_existing_version(spec, &pools, &version_id, azure, &mut warnings).await?
    } else {
        regions::to_publish(spec, &pools, &source_region, &mut warnings)?
    };
    let register_batch_in = batch_registration(spec, &pools, azure, &mut warnings).await?;
    let gated = spec.promotion.gated && !rollout_only;
    Ok(Plan {
        version: inputs.version.clone(),
        build,
        gallery: spec.gallery.id.clone(),
        gallery_region,
        create_gallery: spec.gallery.create_if_missing,
        definition,
        version_id,
        regions,
        pools,
        publish_excluded: gated || spec.publish.exclude_from_latest,
        final_excluded: spec.publish.exclude_from_latest,
        // Durations are at most ten years (`duration::MAX`): no overflow.
        end_of_life: spec
            .publish
            .end_of_life
            .and_then(|d| now.checked_add(time::Duration::try_from(d).ok()?)),
        register_batch_in,
        quota_use,
        seen: Seen {
            definition: definition_seen,
            version: if inputs.version_absent {
                Presence::Absent
            } else {
                Presence::Unknown
            },
        },
        warnings,
    })
}

/// Each pool's Batch account (read once per account) and Batch's supported images (from the first
/// account: the list is the same service-wide).
async fn read_accounts(
    spec: &PipelineSpec,
    azure: &dyn AzureApi,
) -> Result<(BTreeMap<String, BatchAccountInfo>, Vec<SupportedImage>), PlanError> {
    let mut accounts: BTreeMap<String, BatchAccountInfo> = BTreeMap::new();
    for pool in &spec.pools {
        let key = pool.account.to_string().to_ascii_lowercase();
        if let std::collections::btree_map::Entry::Vacant(slot) = accounts.entry(key) {
            slot.insert(azure.get_batch_account(&pool.account).await?);
        }
    }
    let supported = match accounts.values().next() {
        Some(account) => azure.supported_images(account).await?,
        None => Vec::new(),
    };
    Ok((accounts, supported))
}

/// The existing definition must agree with the spec (Batch refuses specialized images); a rollout
/// needs it to exist. Returns what a step may take as read: `Present` when it exists and is
/// ready, `Absent`, or `Unknown` while it is still being made (or is in trouble).
async fn check_existing_definition(
    spec: &PipelineSpec,
    definition: &GalleryImageId,
    rollout_only: bool,
    azure: &dyn AzureApi,
) -> Result<Presence, PlanError> {
    // The existing definition must agree with the spec; Batch refuses specialized images.
    if let Some(existing) = azure.get_definition(definition).await? {
        rules::definition_fits(&existing.os_state, &existing.os_type, spec.definition.os_type.as_str())
            .map_err(|mismatch| rule(mismatch.key(), format!("{definition} exists and {mismatch}")))?;
        if !existing
            .hyper_v_generation
            .eq_ignore_ascii_case(&spec.definition.hyper_v_generation)
        {
            return Err(rule(
                "definition.hyper_v_generation",
                format!(
                    "{definition} exists with {}, the spec says {}",
                    existing.hyper_v_generation, spec.definition.hyper_v_generation
                ),
            ));
        }
        // Ready for a version: no step need read it again (a first try trusts this reading).
        return Ok(if existing.provisioning_state == ProvisioningState::Succeeded {
            Presence::Present
        } else {
            Presence::Unknown
        });
    }
    if rollout_only {
        return Err(rule(
            "definition",
            format!("{definition} does not exist; nothing to roll out"),
        ));
    }
    Ok(Presence::Absent)
}

/// A gallery in another subscription than a pool's account needs Microsoft.Batch registered
/// there. One gallery, so one look, however many pools are in other subscriptions.
async fn batch_registration(
    spec: &PipelineSpec,
    pools: &[PoolPlan],
    azure: &dyn AzureApi,
    warnings: &mut Vec<String>,
) -> Result<Vec<String>, PlanError> {
    let mut register_batch_in = Vec::new();
    let gallery_sub = spec.gallery.id.subscription();
    if pools
        .iter()
        .any(|pool| !gallery_sub.eq_ignore_ascii_case(pool.account.subscription()))
    {
        let read = azure.provider_state(gallery_sub, "Microsoft.Batch").await;
        let what = format!("Microsoft.Batch's registration in the gallery's subscription {gallery_sub}");
        match azure_values::readable(read, &what, warnings)? {
            Some(state) if state != RegistrationState::Registered => {
                warnings.push(format!(
                    "Microsoft.Batch is not registered in the gallery's subscription {gallery_sub}; it will be registered before publishing"
                ));
                register_batch_in.push(gallery_sub.to_string());
            }
            _ => {}
        }
    }

    Ok(register_batch_in)
}

/// The entry of Batch's supported images for a Marketplace image, if Batch lists it.
fn supported_image<'a>(
    supported: &'a [SupportedImage],
    publisher: &str,
    offer: &str,
    sku: &str,
) -> Option<&'a SupportedImage> {
    supported.iter().find(|s| {
        s.publisher.eq_ignore_ascii_case(publisher)
            && s.offer.eq_ignore_ascii_case(offer)
            && s.sku.eq_ignore_ascii_case(sku)
    })
}

/// The node agent SKU: `auto` takes the one Batch lists for the build VM's base image; an explicit
/// one must exist and run the image's OS.
fn choose_sku(
    spec: &PipelineSpec,
    asked: &str,
    build: Option<&BuildPlan>,
    supported: &[SupportedImage],
) -> Result<String, String> {
    let os = spec.definition.os_type.as_str();
    if asked == "auto" {
        let Some((publisher, offer, sku)) = build.and_then(|b| b.base_image.clone()) else {
            return Err(
                "`auto` needs the build VM's Marketplace base image; name the SKU (e.g. \"batch.node.ubuntu 22.04\")"
                    .into(),
            );
        };
        return supported_image(supported, &publisher, &offer, &sku)
            .map(|s| s.node_agent_sku_id.clone())
            .ok_or_else(|| format!("Batch lists no node agent SKU for {publisher}/{offer}/{sku}"));
    }
    let listed: Vec<&SupportedImage> = supported
        .iter()
        .filter(|s| s.node_agent_sku_id.eq_ignore_ascii_case(asked))
        .collect();
    match listed.first() {
        None if supported.is_empty() => Ok(asked.to_string()),
        None => Err(format!("Batch does not support node agent SKU `{asked}`")),
        Some(s) if !rules::sku_matches_os(&s.os_type, os) => {
            Err(format!("`{asked}` is a {} SKU but the image is {os}", s.os_type))
        }
        Some(_) => Ok(asked.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nightly_versions_count_up_per_day() {
        let day = time::macros::date!(2026 - 11 - 26);
        assert_eq!(next_nightly(&[], day), "2026.1126.0");
        let existing = vec![
            "2026.1126.0".to_string(),
            "2026.1126.3".to_string(),
            "2026.1125.9".to_string(),
        ];
        assert_eq!(next_nightly(&existing, day), "2026.1126.4");
        assert_eq!(
            next_nightly(&existing, time::macros::date!(2026 - 01 - 02)),
            "2026.0102.0"
        );
    }

    #[test]
    fn durations_for_batch() {
        assert_eq!(region_key("West US 2"), "westus2");
    }
}
