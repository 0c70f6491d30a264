//! The prepared VMs' managed disks as Compute's DiskRP shows them (Disks – Get, List By Resource
//! Group): read-only, from
//! the world. They exist as snapshot sources already; serving them lets a client read a disk
//! before snapshotting it, as `az snapshot create --source <disk id>` does.

use serde_json::{Value, json};

use super::compute::{disk_id, vm_id};
use super::{ArmError, Caller, Family, authorize, check_api_version, only_get, resource_group};
use crate::emulator::http::{Request, Response};
use crate::emulator::world::Vm;
use crate::emulator::{Ctx, auth};

/// One managed disk of a world VM.
struct WorldDisk<'a> {
    vm: &'a Vm,
    name: &'a str,
    size_gb: u32,
    /// The OS disk (made from the VM's marketplace image); data disks were made empty.
    os: bool,
}

fn world_disks(ctx: &Ctx) -> impl Iterator<Item = WorldDisk<'_>> {
    ctx.world.vms.iter().flat_map(|vm| {
        let os = vm.os_disk.managed.then_some(WorldDisk {
            vm,
            name: &vm.os_disk.name,
            size_gb: vm.os_disk.size_gb,
            os: true,
        });
        let data = vm.data_disks.iter().map(move |d| WorldDisk {
            vm,
            name: &d.name,
            size_gb: d.size_gb,
            os: false,
        });
        os.into_iter().chain(data)
    })
}

/// `GET …/resourceGroups/{rg}/providers/Microsoft.Compute/disks`: the group's disks the caller may
/// read.
pub fn list_disks(ctx: &Ctx, req: &Request, caller: &Caller, sub: &str, rg: &str) -> Result<Response, ArmError> {
    let group = resource_group(ctx, sub, rg)?;
    check_api_version(req, Family::Disk, "disks", &group.location)?;
    let value: Vec<Value> = world_disks(ctx)
        .filter(|d| d.vm.subscription.eq_ignore_ascii_case(sub) && d.vm.resource_group.eq_ignore_ascii_case(rg))
        .filter(|d| {
            auth::allowed(
                &ctx.world,
                &caller.claims.oid,
                "Microsoft.Compute/disks/read",
                &disk_id(d.vm, d.name),
            )
        })
        .map(|d| disk_json(&d))
        .collect();
    Ok(Response::json(200, &json!({ "value": value })))
}

/// `GET …/resourceGroups/{rg}/providers/Microsoft.Compute/disks/{name}`.
pub fn get_disk(
    ctx: &Ctx,
    req: &Request,
    caller: &Caller,
    sub: &str,
    rg: &str,
    name: &str,
) -> Result<Response, ArmError> {
    only_get(req)?;
    let group = resource_group(ctx, sub, rg)?;
    check_api_version(req, Family::Disk, "disks", &group.location)?;
    let id = format!(
        "/subscriptions/{sub}/resourceGroups/{}/providers/Microsoft.Compute/disks/{name}",
        group.name
    );
    authorize(ctx, caller, "Microsoft.Compute/disks/read", &id)?;
    world_disks(ctx)
        .find(|d| disk_id(d.vm, d.name).eq_ignore_ascii_case(&id))
        .map(|d| Response::json(200, &disk_json(&d)))
        .ok_or_else(|| super::resource_not_found(&format!("Microsoft.Compute/disks/{name}"), &group.name))
}

fn disk_json(d: &WorldDisk<'_>) -> Value {
    let vm = d.vm;
    let id = disk_id(vm, d.name);
    let unique_id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, id.to_ascii_lowercase().as_bytes());
    let mut properties = json!({
        "creationData": {"createOption": "Empty"},
        "diskSizeGB": d.size_gb,
        "diskSizeBytes": u64::from(d.size_gb) << 30,
        "uniqueId": unique_id.to_string(),
        "provisioningState": "Succeeded",
        "diskState": "Reserved",
        "encryption": {"type": "EncryptionAtRestWithPlatformKey"},
        "networkAccessPolicy": "AllowAll",
        "publicNetworkAccess": "Enabled",
    });
    if d.os {
        properties["osType"] = json!(vm.os_type.as_str());
        properties["hyperVGeneration"] = json!(vm.hyper_v_generation);
        properties["creationData"] = json!({
            "createOption": "FromImage",
            "imageReference": {"id": format!(
                "/Subscriptions/{}/Providers/Microsoft.Compute/Locations/{}/Publishers/{}/ArtifactTypes/VMImage/Offers/{}/Skus/{}/Versions/{}",
                vm.subscription, vm.location, vm.image.publisher, vm.image.offer, vm.image.sku, vm.image.version
            )},
        });
    }
    json!({
        "id": id,
        "name": d.name,
        "type": "Microsoft.Compute/disks",
        "location": vm.location,
        "managedBy": vm_id(vm),
        "sku": {"name": "Premium_LRS", "tier": "Premium"},
        "properties": properties,
    })
}
