//! Azure Compute Gallery: galleries, image definitions and image versions. Enforces the naming
//! rules, the definition/source consistency (OS type, OS state, Hyper-V generation), the
//! publishing-profile rules (source region among the targets, no duplicate regions, replica counts
//! 1–100), and replicates each version region by region over emulated time: Unknown → Replicating →
//! Completed or Failed, with `provisioningState` reading Succeeded as soon as the source region is done.

use std::collections::HashSet;

use serde_json::{Map, Value, json};
use time::Duration;
use time::format_description::well_known::Rfc3339;

use super::ArmError;
use super::resources::{Plan, ResPath};
use crate::emulator::Ctx;
use crate::emulator::clock::EmuTime;
use crate::emulator::regions;
use crate::emulator::state::{Kind, RegionReplication, ReplicationState, Resource, State};

const STORAGE_TYPES: &[&str] = &["Standard_LRS", "Standard_ZRS", "Premium_LRS", "PremiumV2_LRS"];

fn gallery_name_ok(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 80
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

fn definition_name_ok(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 80
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.' || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// `Major.Minor.Patch`, each a 32-bit signed integer.
pub fn version_name_ok(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()) && p.parse::<i32>().is_ok())
}

fn missing(target: &str) -> ArmError {
    ArmError::invalid(target, format!("Required parameter '{target}' is missing (null)."))
}

fn one_of(value: &str, allowed: &[&str], target: &str) -> Result<String, ArmError> {
    allowed
        .iter()
        .find(|a| a.eq_ignore_ascii_case(value))
        .map(|a| a.to_string())
        .ok_or_else(|| {
            ArmError::invalid(
                target,
                format!(
                    "The value '{value}' of parameter '{target}' is not valid. Allowed values are {}.",
                    allowed.join(", ")
                ),
            )
        })
}

pub fn plan_create(
    ctx: &Ctx,
    st: &State,
    path: &ResPath,
    body: Value,
    location: &str,
    now: EmuTime,
) -> Result<Plan, ArmError> {
    let jitter = ctx.jitter(&format!("create:{}", path.id()), 0.2);
    match path.kind {
        Kind::Gallery => {
            if !gallery_name_ok(path.name()) {
                return Err(ArmError::invalid(
                    "galleryName",
                    format!(
                        "The gallery name '{}' is invalid. The gallery name must begin and end with a letter or digit, may contain only letters, digits, underscores and periods (no dashes), and be at most 80 characters long.",
                        path.name()
                    ),
                ));
            }
            Ok(Plan {
                body,
                facts: json!({"uniqueName": format!("{}-{}", path.sub, path.name().to_ascii_uppercase())}),
                duration: Duration::seconds(20) * jitter,
                failure: None,
                replication: Vec::new(),
            })
        }
        Kind::GalleryImage => plan_definition(path, body, jitter),
        _ => plan_version(ctx, st, path, body, location, now),
    }
}

fn plan_definition(path: &ResPath, mut body: Value, jitter: f64) -> Result<Plan, ArmError> {
    if !definition_name_ok(path.name()) {
        return Err(ArmError::invalid(
            "galleryImageName",
            format!(
                "The gallery image name '{}' is invalid. It must begin and end with a letter or digit, may contain letters, digits, underscores, periods and dashes, and be at most 80 characters long.",
                path.name()
            ),
        ));
    }
    let props = body
        .get_mut("properties")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| missing("galleryImage.properties"))?;
    let os_type = props
        .get("osType")
        .and_then(Value::as_str)
        .ok_or_else(|| missing("galleryImage.properties.osType"))?;
    let os_type = one_of(os_type, &["Windows", "Linux"], "galleryImage.properties.osType")?;
    let os_state = props
        .get("osState")
        .and_then(Value::as_str)
        .ok_or_else(|| missing("galleryImage.properties.osState"))?;
    let os_state = one_of(
        os_state,
        &["Generalized", "Specialized"],
        "galleryImage.properties.osState",
    )?;
    let identifier = props
        .get("identifier")
        .ok_or_else(|| missing("galleryImage.properties.identifier"))?;
    for field in ["publisher", "offer", "sku"] {
        if identifier.get(field).and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err(missing(&format!("galleryImage.properties.identifier.{field}")));
        }
    }
    let generation = match props.get("hyperVGeneration").and_then(Value::as_str) {
        Some(g) => one_of(g, &["V1", "V2"], "galleryImage.properties.hyperVGeneration")?,
        None => "V1".to_string(),
    };
    props.insert("osType".into(), json!(os_type));
    props.insert("osState".into(), json!(os_state));
    props.insert("hyperVGeneration".into(), json!(generation));
    Ok(Plan {
        body,
        facts: json!({}),
        duration: Duration::seconds(15) * jitter,
        failure: None,
        replication: Vec::new(),
    })
}

/// What a version's source says about the OS: type, state and generation, plus its size.
struct SourceFacts {
    location: String,
    os_type: Option<String>,
    os_state: Option<String>,
    generation: String,
    os_size_gb: u64,
    data_sizes: Vec<(u64, u64)>,
}

fn source_facts(ctx: &Ctx, st: &State, body: &Value, now: EmuTime) -> Result<SourceFacts, ArmError> {
    let profile = body
        .pointer("/properties/storageProfile")
        .ok_or_else(|| missing("galleryImageVersion.properties.storageProfile"))?;
    let ready = |r: &Resource, id: &str| -> Result<(), ArmError> {
        match r.provisioning_state(now) {
            "Succeeded" => Ok(()),
            state => Err(ArmError::new(
                409,
                "OperationNotAllowed",
                format!("The source '{id}' is not ready: its provisioning state is {state}."),
            )),
        }
    };
    let lookup = |id: &str| -> Result<&Resource, ArmError> {
        st.get(&format!("/{}", id.trim_start_matches('/')))
            .ok_or_else(|| ArmError::new(404, "NotFound", format!("The source resource '{id}' was not found.")))
    };
    if let Some(id) = profile.pointer("/source/id").and_then(Value::as_str) {
        let image = lookup(id)?;
        if image.kind != Kind::Image {
            return Err(ArmError::invalid(
                "storageProfile.source.id",
                format!("'{id}' is not a managed image."),
            ));
        }
        ready(image, id)?;
        let os = &image.body["properties"]["storageProfile"]["osDisk"];
        let data_sizes = image.facts["dataDiskSizesGB"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(lun, size)| (lun.parse().unwrap_or(0), size.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        return Ok(SourceFacts {
            location: image.location.clone(),
            os_type: os["osType"].as_str().map(str::to_string),
            os_state: os["osState"].as_str().map(str::to_string),
            generation: image.body["properties"]["hyperVGeneration"]
                .as_str()
                .unwrap_or("V1")
                .to_string(),
            os_size_gb: image.facts["osDiskSizeGB"].as_u64().unwrap_or(0),
            data_sizes,
        });
    }
    // A disk image's source: a snapshot made through the API, or a managed disk of the world's VMs.
    // (location, OS type, Hyper-V generation, size in GB)
    let disk = |id: &str| -> Result<(String, Option<String>, String, u64), ArmError> {
        if let Some(disk) = super::compute::world_disk(ctx, id) {
            return Ok(disk);
        }
        let snap = lookup(id)?;
        ready(snap, id)?;
        Ok((
            snap.location.clone(),
            snap.facts["osType"].as_str().map(str::to_string),
            snap.facts["hyperVGeneration"].as_str().unwrap_or("V1").to_string(),
            snap.facts["diskSizeGB"].as_u64().unwrap_or(0),
        ))
    };
    if let Some(id) = profile.pointer("/osDiskImage/source/id").and_then(Value::as_str) {
        let (location, os_type, generation, os_size_gb) = disk(id)?;
        let mut data_sizes = Vec::new();
        if let Some(disks) = profile.get("dataDiskImages").and_then(Value::as_array) {
            for data in disks {
                let did = data
                    .pointer("/source/id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| missing("dataDiskImages.source.id"))?;
                data_sizes.push((data["lun"].as_u64().unwrap_or(0), disk(did)?.3));
            }
        }
        return Ok(SourceFacts {
            location,
            os_type,
            os_state: None,
            generation,
            os_size_gb,
            data_sizes,
        });
    }
    Err(missing("galleryImageVersion.properties.storageProfile.source"))
}

/// A region a version publishes to: its canonical name, its replica count and storage type.
struct TargetRegion {
    region: String,
    replicas: u32,
    storage: String,
}

/// Target regions, checked as Azure checks them.
fn target_regions(body: &Value, location: &str) -> Result<Vec<TargetRegion>, ArmError> {
    let profile = body.pointer("/properties/publishingProfile");
    let default_replicas = profile
        .and_then(|p| p.get("replicaCount"))
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let default_storage = profile
        .and_then(|p| p.get("storageAccountType"))
        .and_then(Value::as_str)
        .unwrap_or("Standard_LRS");
    let default_storage = one_of(default_storage, STORAGE_TYPES, "publishingProfile.storageAccountType")?;
    let check_count = |n: i64, target: &str| -> Result<u32, ArmError> {
        if (1..=100).contains(&n) {
            Ok(n as u32)
        } else {
            Err(ArmError::invalid(
                target,
                format!(
                    "The value {n} of parameter '{target}' is out of range. The value must be between 1 and 100, inclusive."
                ),
            ))
        }
    };
    check_count(default_replicas, "publishingProfile.replicaCount")?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    match profile.and_then(|p| p.get("targetRegions")).and_then(Value::as_array) {
        Some(regions_given) if !regions_given.is_empty() => {
            for (i, region) in regions_given.iter().enumerate() {
                let raw = region["name"]
                    .as_str()
                    .ok_or_else(|| missing(&format!("publishingProfile.targetRegions[{i}].name")))?;
                if region.get("encryption").is_some_and(|e| !e.is_null()) {
                    // There are no disk encryption sets in the emulated world to resolve.
                    return Err(ArmError::invalid(
                        &format!("publishingProfile.targetRegions[{i}].encryption"),
                        "Disk encryption sets are not supported by this emulator; publish without targetRegions[].encryption.",
                    ));
                }
                let name = regions::canonical(raw).ok_or_else(|| {
                    ArmError::invalid(
                        "publishingProfile.targetRegions",
                        format!("The region '{raw}' in target publishing regions is not a valid Azure region."),
                    )
                })?;
                if !seen.insert(name) {
                    return Err(ArmError::invalid(
                        "publishingProfile.targetRegions",
                        "Duplicate regions are not allowed in target publishing regions.",
                    ));
                }
                let replicas = check_count(
                    region["regionalReplicaCount"].as_i64().unwrap_or(default_replicas),
                    "regionalReplicaCount",
                )?;
                let storage = match region["storageAccountType"].as_str() {
                    Some(s) => one_of(s, STORAGE_TYPES, "targetRegions.storageAccountType")?,
                    None => default_storage.clone(),
                };
                out.push(TargetRegion {
                    region: name.to_string(),
                    replicas,
                    storage,
                });
            }
        }
        _ => out.push(TargetRegion {
            region: location.to_string(),
            replicas: default_replicas as u32,
            storage: default_storage.clone(),
        }),
    }
    if !out.iter().any(|t| t.region == location) {
        return Err(ArmError::invalid(
            "publishingProfile.targetRegions",
            format!(
                "The source region '{location}' of the gallery image version must be one of the target publishing regions."
            ),
        ));
    }
    Ok(out)
}

/// A new image version: a valid name; a source that is ready, in the version's region and
/// matching its definition; target regions as Azure checks them. Then its timeline: the source
/// region publishes first, and every other region replicates after it.
fn plan_version(
    ctx: &Ctx,
    st: &State,
    path: &ResPath,
    body: Value,
    location: &str,
    now: EmuTime,
) -> Result<Plan, ArmError> {
    check_version_name(path.name())?;
    let definition = st
        .get(&path.parent_id().expect("versions have a parent"))
        .expect("checked by the caller");
    let source = source_facts(ctx, st, &body, now)?;
    check_source_region(&source, location)?;
    check_source_matches_definition(&source, &definition.body["properties"])?;
    let targets = target_regions(&body, location)?;
    let size = source.os_size_gb + source.data_sizes.iter().map(|(_, s)| s).sum::<u64>();
    let id = path.id();
    let source_region = targets
        .iter()
        .find(|t| t.region == location)
        .expect("checked by target_regions");
    let source_secs = source_region_secs(ctx, &id, size, source_region.replicas);
    let source_done = now + Duration::seconds_f64(source_secs);
    let replication = replication_timelines(ctx, &id, &targets, location, size, now, source_done);
    let facts = json!({
        "osSizeGB": source.os_size_gb,
        "dataSizes": source.data_sizes.iter().map(|(lun, s)| json!({"lun": lun, "sizeInGB": s})).collect::<Vec<_>>(),
        "publishedDate": now.format(&Rfc3339).unwrap_or_default(),
    });
    Ok(Plan {
        body,
        facts,
        duration: Duration::seconds_f64(source_secs),
        failure: None,
        replication,
    })
}

/// A version's name is `Major.Minor.Patch`, each part a 32-bit integer.
fn check_version_name(name: &str) -> Result<(), ArmError> {
    if version_name_ok(name) {
        return Ok(());
    }
    Err(ArmError::invalid(
        "galleryImageVersionName",
        format!(
            "The gallery image version name '{name}' is invalid. It must be in the format of <MajorVersion>.<MinorVersion>.<Patch> with all parts being 32-bit integers."
        ),
    ))
}

/// A version's source is in the version's own region: Azure copies it out from there.
fn check_source_region(source: &SourceFacts, location: &str) -> Result<(), ArmError> {
    if source.location.eq_ignore_ascii_case(location) {
        return Ok(());
    }
    Err(ArmError::invalid(
        "storageProfile.source.id",
        format!(
            "The source of a gallery image version must be in the same region as the version. The source is in '{}' and the version in '{location}'.",
            source.location
        ),
    ))
}

/// A version's source matches its definition: the OS type and OS state (where the source tells
/// them; a disk has no OS state) and the Hyper-V generation (V1 when unset), in that order.
fn check_source_matches_definition(source: &SourceFacts, definition: &Value) -> Result<(), ArmError> {
    let def_os = definition["osType"].as_str().unwrap_or_default();
    if let Some(os) = &source.os_type
        && !os.eq_ignore_ascii_case(def_os)
    {
        return Err(ArmError::invalid(
            "storageProfile",
            format!(
                "The OS type of the source ({os}) does not match the OS type of the gallery image definition ({def_os})."
            ),
        ));
    }
    let def_state = definition["osState"].as_str().unwrap_or_default();
    if let Some(state) = &source.os_state
        && !state.eq_ignore_ascii_case(def_state)
    {
        return Err(ArmError::invalid(
            "storageProfile",
            format!(
                "The OS State '{state}' of the source does not match the OS State '{def_state}' in the parent gallery image."
            ),
        ));
    }
    let def_generation = definition["hyperVGeneration"].as_str().unwrap_or("V1");
    if !source.generation.eq_ignore_ascii_case(def_generation) {
        return Err(ArmError::invalid(
            "storageProfile",
            format!(
                "The gallery image version source has a different Hypervisor generation ({}) than the parent gallery image ({def_generation}).",
                source.generation
            ),
        ));
    }
    Ok(())
}

/// How long the source region takes to publish: four minutes, two seconds per GB of disks and two
/// minutes per replica past the first, jittered ±15%.
fn source_region_secs(ctx: &Ctx, id: &str, size_gb: u64, replicas: u32) -> f64 {
    (240.0 + 2.0 * size_gb as f64 + 120.0 * (replicas as f64 - 1.0)) * ctx.jitter(&format!("source:{id}"), 0.15)
}

/// Each target region's timeline: the source region's from now until it is published; every other
/// region's from then, six minutes, four per replica past the first and a second per GB, jittered
/// ±20%. A region the fault plan fails stops at a progress drawn from the seed (at most 95%).
fn replication_timelines(
    ctx: &Ctx,
    id: &str,
    targets: &[TargetRegion],
    location: &str,
    size_gb: u64,
    now: EmuTime,
    source_done: EmuTime,
) -> Vec<RegionReplication> {
    let mut faults = ctx.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    targets
        .iter()
        .map(|target| {
            let region = &target.region;
            let (starts, ends) = if region == location {
                (now, source_done)
            } else {
                let secs = (360.0 + 240.0 * (target.replicas as f64 - 1.0) + size_gb as f64)
                    * ctx.jitter(&format!("replicate:{id}:{region}"), 0.2);
                (source_done, source_done + Duration::seconds_f64(secs))
            };
            let fails_at = faults
                .replication_fails(region)
                .then(|| (20.0 + 60.0 * ctx.jitter(&format!("failpoint:{id}:{region}"), 0.5) / 1.5).min(95.0) as u8);
            RegionReplication {
                region: region.clone(),
                replicas: target.replicas,
                storage_account_type: target.storage.clone(),
                starts,
                ends,
                fails_at,
            }
        })
        .collect()
}

pub fn plan_update(ctx: &Ctx, _st: &State, existing: &Resource, body: Value, now: EmuTime) -> Result<Plan, ArmError> {
    let short = Duration::seconds(30) * ctx.jitter(&format!("update:{}:{}", existing.id, now), 0.2);
    if existing.kind == Kind::GalleryImage {
        let jitter = ctx.jitter(&format!("update:{}", existing.id), 0.2);
        let mut plan = plan_definition(
            &ResPath {
                sub: existing.subscription.clone(),
                rg: String::new(),
                kind: Kind::GalleryImage,
                names: vec![existing.id.rsplit('/').next().unwrap_or_default().to_string()],
            },
            body,
            jitter,
        )?;
        plan.duration = short;
        return Ok(plan);
    }
    if existing.kind != Kind::GalleryImageVersion {
        return Ok(Plan {
            body,
            facts: existing.facts.clone(),
            duration: short,
            failure: None,
            replication: Vec::new(),
        });
    }
    let targets = target_regions(&body, &existing.location)?;
    let size = existing.facts["osSizeGB"].as_u64().unwrap_or(0);
    let mut faults = ctx.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut replication = Vec::new();
    for TargetRegion {
        region,
        replicas,
        storage,
    } in targets
    {
        let kept = existing
            .replication
            .iter()
            .find(|r| r.region == region && r.replicas == replicas && r.fails_at.is_none_or(|_| false));
        match kept {
            Some(current) => replication.push(current.clone()),
            None => {
                // A new region, a changed replica count or a failed region added back: replicate now.
                let secs = (360.0 + 240.0 * (replicas as f64 - 1.0) + size as f64)
                    * ctx.jitter(&format!("replicate:{}:{region}:{now}", existing.id), 0.2);
                let fails_at = faults.replication_fails(&region).then_some(50);
                replication.push(RegionReplication {
                    region,
                    replicas,
                    storage_account_type: storage,
                    starts: now,
                    ends: now + Duration::seconds_f64(secs),
                    fails_at,
                });
            }
        }
    }
    Ok(Plan {
        body,
        facts: existing.facts.clone(),
        duration: short,
        failure: None,
        replication,
    })
}

pub fn render_properties(
    ctx: &Ctx,
    _st: &State,
    r: &Resource,
    props: &mut Map<String, Value>,
    now: EmuTime,
    expand: bool,
) {
    let _ = ctx;
    match r.kind {
        Kind::Gallery => {
            props.insert("identifier".into(), json!({"uniqueName": r.facts["uniqueName"]}));
            props
                .entry("sharingProfile")
                .or_insert(json!({"permissions": "Private"}));
        }
        Kind::GalleryImage => {
            props.entry("architecture").or_insert(json!("x64"));
        }
        _ => render_version(r, props, now, expand),
    }
}

fn render_version(r: &Resource, props: &mut Map<String, Value>, now: EmuTime, expand: bool) {
    let profile = props
        .entry("publishingProfile")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("publishingProfile is an object");
    profile.entry("replicaCount").or_insert(json!(1));
    profile.entry("excludeFromLatest").or_insert(json!(false));
    profile.entry("storageAccountType").or_insert(json!("Standard_LRS"));
    profile.insert("publishedDate".into(), r.facts["publishedDate"].clone());
    let exclude_default = profile["excludeFromLatest"].clone();
    // A region keeps its own excludeFromLatest when the client set one.
    let given: Vec<Value> = profile
        .get("targetRegions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let exclude_of = |region: &str| {
        given
            .iter()
            .find(|t| t["name"].as_str().and_then(regions::canonical) == Some(region))
            .and_then(|t| t.get("excludeFromLatest").filter(|v| v.is_boolean()).cloned())
            .unwrap_or_else(|| exclude_default.clone())
    };
    profile.insert(
        "targetRegions".into(),
        json!(
            r.replication
                .iter()
                .map(|rep| json!({
                    "name": regions::display(&rep.region),
                    "regionalReplicaCount": rep.replicas,
                    "storageAccountType": rep.storage_account_type,
                    "excludeFromLatest": exclude_of(&rep.region),
                }))
                .collect::<Vec<_>>()
        ),
    );
    if let Some(storage) = props.get_mut("storageProfile").and_then(Value::as_object_mut) {
        // The sizes come from the source; the caching and the per-disk source the client gave stay.
        let disk_image = |given: Option<&Value>, size: &Value, caching: &str| {
            let mut out = json!({"sizeInGB": size, "hostCaching": caching});
            for key in ["hostCaching", "source"] {
                if let Some(v) = given.and_then(|g| g.get(key)).filter(|v| !v.is_null()) {
                    out[key] = v.clone();
                }
            }
            out
        };
        let os = disk_image(storage.get("osDiskImage"), &r.facts["osSizeGB"], "ReadWrite");
        storage.insert("osDiskImage".into(), os);
        let given_data = storage
            .get("dataDiskImages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let data: Vec<Value> = r.facts["dataSizes"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|x| {
                        let given = given_data.iter().find(|g| g["lun"] == x["lun"]);
                        let mut out = disk_image(given, &x["sizeInGB"], "None");
                        out["lun"] = x["lun"].clone();
                        out
                    })
                    .collect()
            })
            .unwrap_or_default();
        storage.insert("dataDiskImages".into(), json!(data));
    }
    let safety = props
        .entry("safetyProfile")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("object");
    safety
        .entry("allowDeletionOfReplicatedLocations")
        .or_insert(json!(true));
    safety.insert("reportedForPolicyViolation".into(), json!(false));
    props.insert("provisioningState".into(), json!(version_state(r, now)));
    if expand {
        props.insert("replicationStatus".into(), replication_status(r, now));
    }
}

/// A version reads Succeeded once its source region is done, while other regions may still
/// replicate; Failed when any region failed.
pub fn version_state(r: &Resource, now: EmuTime) -> &'static str {
    if let Some(d) = &r.deleting
        && d.running(now)
    {
        return "Deleting";
    }
    if r.replication
        .iter()
        .any(|rep| matches!(rep.state(now), ReplicationState::Failed(_)))
    {
        return "Failed";
    }
    if r.current.running(now) {
        return if r.current.creating { "Creating" } else { "Updating" };
    }
    "Succeeded"
}

pub fn replication_status(r: &Resource, now: EmuTime) -> Value {
    let states: Vec<ReplicationState> = r.replication.iter().map(|rep| rep.state(now)).collect();
    let aggregated = if states.iter().any(|s| matches!(s, ReplicationState::Failed(_))) {
        "Failed"
    } else if states.iter().all(|s| *s == ReplicationState::Completed) {
        "Completed"
    } else if states.iter().all(|s| *s == ReplicationState::Unknown) {
        "Unknown"
    } else {
        "InProgress"
    };
    let summary: Vec<Value> = r
        .replication
        .iter()
        .zip(&states)
        .map(|(rep, state)| {
            let (name, progress, details) = match state {
                ReplicationState::Unknown => ("Unknown", 0, ""),
                ReplicationState::Replicating(p) => ("Replicating", *p, ""),
                ReplicationState::Completed => ("Completed", 100, ""),
                ReplicationState::Failed(p) => ("Failed", *p, "Failed with internal server error."),
            };
            json!({"region": regions::display(&rep.region), "state": name, "details": details, "progress": progress})
        })
        .collect();
    json!({"aggregatedState": aggregated, "summary": summary})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_azure_rules() {
        assert!(gallery_name_ok("sigrun_gallery.prod"));
        assert!(!gallery_name_ok("sigrun-gallery"));
        assert!(!gallery_name_ok("_lead"));
        assert!(definition_name_ok("ubuntu-22.04-batch"));
        assert!(!definition_name_ok("-x"));
        assert!(version_name_ok("2026.1126.0"));
        assert!(!version_name_ok("2026.1126"));
        assert!(!version_name_ok("1.0.99999999999"));
        assert!(!version_name_ok("1.a.0"));
    }
}
