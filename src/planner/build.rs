//! The planner's build: what the image is made from and where. The build VM (when the spec names
//! one) must have managed disks only, no extensions, the definition's OS and generation, sit in
//! the image's region, and come from a Marketplace image Batch supports; its disks (or the disks
//! the spec lists) get one snapshot each, named after the image.

use super::{PlanError, PlanInputs, region_key, rule};
use crate::azure::AzureApi;
use crate::azure::api::{SupportedImage, VmInfo};
use crate::model::ids::{DiskId, ImageId, SnapshotId, VmId};
use crate::model::plan::{BuildPlan, SnapshotPlan};
use crate::model::spec::{ImageSpec, PipelineSpec, render_name};

/// What the build starts from.
struct Disks {
    os_disk: DiskId,
    data: Vec<(u32, DiskId)>,
    vm: Option<VmId>,
    base_image: Option<(String, String, String)>,
    generation: Option<String>,
}

pub async fn plan_build(
    spec: &PipelineSpec,
    inputs: &PlanInputs,
    azure: &dyn AzureApi,
    supported: &[SupportedImage],
    warnings: &mut Vec<String>,
) -> Result<BuildPlan, PlanError> {
    // `PipelineSpec::parse` checks these, but a spec also arrives by `Deserialize` in a message.
    let source = spec
        .source
        .as_ref()
        .ok_or_else(|| rule("source", "a build needs a source"))?;
    let image_spec = spec
        .image
        .as_ref()
        .ok_or_else(|| rule("image", "a build needs an image section"))?;
    let region = region_key(&image_spec.region);
    let disks = match &source.vm {
        Some(vm_id) => from_vm(spec, vm_id, &region, azure, supported, warnings).await?,
        None => Disks {
            os_disk: source
                .os_disk
                .clone()
                .ok_or_else(|| rule("source.os_disk", "a source without a VM names its OS disk"))?,
            data: source.data_disks.iter().map(|d| (d.lun, d.disk.clone())).collect(),
            vm: None,
            base_image: None,
            generation: None,
        },
    };
    let (image, snapshots) = image_and_snapshots(spec, inputs, image_spec, &disks)?;
    Ok(BuildPlan {
        vm: disks.vm,
        snapshots,
        image,
        region,
        os_type: spec.definition.os_type.as_str().to_string(),
        hyper_v_generation: disks
            .generation
            .unwrap_or_else(|| spec.definition.hyper_v_generation.clone()),
        base_image: disks.base_image,
    })
}

/// The build VM's disks, once it is found fit to make a Batch image from.
async fn from_vm(
    spec: &PipelineSpec,
    vm_id: &VmId,
    region: &str,
    azure: &dyn AzureApi,
    supported: &[SupportedImage],
    warnings: &mut Vec<String>,
) -> Result<Disks, PlanError> {
    let vm = azure.get_vm(vm_id).await?;
    if !vm.extensions.is_empty() {
        return Err(rule(
            "source.vm",
            format!(
                "{vm_id} has VM extensions installed ({}); they break Batch pool deployment — build from a VM without extensions",
                vm.extensions.join(", ")
            ),
        ));
    }
    let (os_disk, data) = managed_disks(vm_id, &vm)?;
    check_fits_definition(spec, &vm, region)?;
    check_base_image(vm_id, &vm, supported, warnings)?;
    Ok(Disks {
        os_disk,
        data,
        vm: Some(vm_id.clone()),
        base_image: vm.base_image.clone(),
        generation: vm.hyper_v_generation.clone(),
    })
}

/// Batch custom images need managed disks: the OS disk and every data disk.
fn managed_disks(vm_id: &VmId, vm: &VmInfo) -> Result<(DiskId, Vec<(u32, DiskId)>), PlanError> {
    let os_disk = vm.os_disk.clone().ok_or_else(|| {
        rule(
            "source.vm",
            format!("{vm_id} has an unmanaged (VHD) OS disk; Batch custom images need managed disks"),
        )
    })?;
    let mut data = Vec::new();
    for (lun, disk) in &vm.data_disks {
        let disk = disk.clone().ok_or_else(|| {
            rule(
                "source.vm",
                format!("{vm_id} data disk at LUN {lun} is unmanaged; Batch custom images need managed disks"),
            )
        })?;
        data.push((*lun, disk));
    }
    Ok((os_disk, data))
}

/// The VM runs the definition's OS and generation, in the image's region.
fn check_fits_definition(spec: &PipelineSpec, vm: &VmInfo, region: &str) -> Result<(), PlanError> {
    if !vm.os_type.eq_ignore_ascii_case(spec.definition.os_type.as_str()) {
        return Err(rule(
            "definition.os_type",
            format!(
                "the build VM runs {} but the definition says {}",
                vm.os_type,
                spec.definition.os_type.as_str()
            ),
        ));
    }
    if let Some(generation) = &vm.hyper_v_generation
        && !generation.eq_ignore_ascii_case(&spec.definition.hyper_v_generation)
    {
        return Err(rule(
            "definition.hyper_v_generation",
            format!(
                "the build VM is Hyper-V generation {generation} but the definition says {}",
                spec.definition.hyper_v_generation
            ),
        ));
    }
    if region_key(&vm.location) != region {
        return Err(rule(
            "image.region",
            format!(
                "the build VM is in {}; the managed image must be made in the same region, not {region}",
                vm.location
            ),
        ));
    }
    Ok(())
}

/// The VM's Marketplace base image is one Batch lists (unknown: a warning).
fn check_base_image(
    vm_id: &VmId,
    vm: &VmInfo,
    supported: &[SupportedImage],
    warnings: &mut Vec<String>,
) -> Result<(), PlanError> {
    match &vm.base_image {
        Some((publisher, offer, sku))
            if !supported.is_empty() && super::supported_image(supported, publisher, offer, sku).is_none() =>
        {
            Err(rule(
                "source.vm",
                format!(
                    "{vm_id} was built from {publisher}/{offer}/{sku}, which Batch does not list among its supported images"
                ),
            ))
        }
        None => {
            warnings.push(format!(
                "{vm_id} has no Marketplace base image; Batch support cannot be checked"
            ));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The managed image (the run's own, or the one a run publishes from) and a snapshot per disk,
/// named after it.
fn image_and_snapshots(
    spec: &PipelineSpec,
    inputs: &PlanInputs,
    image_spec: &ImageSpec,
    disks: &Disks,
) -> Result<(ImageId, Vec<SnapshotPlan>), PlanError> {
    let subscription = image_spec
        .subscription
        .clone()
        .unwrap_or_else(|| disks.os_disk.subscription().to_string());
    let image_name = render_name(&image_spec.name, &spec.name, "", &inputs.version);
    let image = match &inputs.existing_image {
        Some(image) => image.clone(),
        None => ImageId::new(&subscription, &image_spec.resource_group, &[&image_name])
            .map_err(|e| rule("image.name", e.to_string()))?,
    };
    let snapshot = |suffix: &str, disk: &DiskId, lun: Option<u32>| -> Result<SnapshotPlan, PlanError> {
        let name = format!("{image_name}-{suffix}");
        Ok(SnapshotPlan {
            lun,
            source: disk.clone(),
            id: SnapshotId::new(&subscription, &image_spec.resource_group, &[&name])
                .map_err(|e| rule("image.name", e.to_string()))?,
        })
    };
    let mut snapshots = vec![snapshot("os", &disks.os_disk, None)?];
    for (lun, disk) in &disks.data {
        snapshots.push(snapshot(&format!("lun{lun}"), disk, Some(*lun))?);
    }
    Ok((image, snapshots))
}
