//! Compute resources of the build side: the prepared VM (read-only, from the world), its extensions,
//! snapshots of its disks (DiskRP) and the managed image made from them (ComputeRP). Each planner
//! checks what Azure checks (sources exist, are ready and sit in the same region) and fixes the
//! operation's duration from the disk sizes.

use serde_json::{Map, Value, json};
use time::Duration;
use time::format_description::well_known::Rfc3339;

use super::resources::{Plan, ResPath};
use super::{ArmError, Caller, Family, authorize, check_api_version, resource_group};
use crate::emulator::Ctx;
use crate::emulator::clock::EmuTime;
use crate::emulator::http::{Request, Response};
use crate::emulator::state::{Kind, Resource, State};
use crate::emulator::world::{Extension, OsType, Vm};

fn find_vm<'a>(ctx: &'a Ctx, sub: &str, rg: &str, name: &str) -> Option<&'a Vm> {
    ctx.world.vms.iter().find(|vm| {
        vm.subscription.eq_ignore_ascii_case(sub)
            && vm.resource_group.eq_ignore_ascii_case(rg)
            && vm.name.eq_ignore_ascii_case(name)
    })
}

pub(super) fn vm_id(vm: &Vm) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
        vm.subscription, vm.resource_group, vm.name
    )
}

pub(super) fn disk_id(vm: &Vm, disk: &str) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/disks/{disk}",
        vm.subscription, vm.resource_group
    )
}

fn vm_not_found(rg: &str, name: &str) -> ArmError {
    super::resource_not_found(&format!("Microsoft.Compute/virtualMachines/{name}"), rg)
}

/// The world VM a read names, after the checks every VM read shares: resource group, api-version,
/// the caller's role for `action`.
fn lookup_vm<'a>(
    ctx: &'a Ctx,
    req: &Request,
    caller: &Caller,
    (sub, rg, name): (&str, &str, &str),
    type_name: &str,
    action: &str,
) -> Result<&'a Vm, ArmError> {
    let group = resource_group(ctx, sub, rg)?;
    check_api_version(req, Family::Compute, type_name, &group.location)?;
    let id = format!(
        "/subscriptions/{sub}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{name}",
        group.name
    );
    authorize(ctx, caller, action, &id)?;
    find_vm(ctx, sub, rg, name).ok_or_else(|| vm_not_found(&group.name, name))
}

pub fn get_vm(
    ctx: &Ctx,
    req: &Request,
    caller: &Caller,
    sub: &str,
    rg: &str,
    name: &str,
) -> Result<Response, ArmError> {
    let vm = lookup_vm(
        ctx,
        req,
        caller,
        (sub, rg, name),
        "virtualMachines",
        "Microsoft.Compute/virtualMachines/read",
    )?;
    let os_disk = if vm.os_disk.managed {
        json!({
            "osType": vm.os_type.as_str(),
            "name": vm.os_disk.name,
            "createOption": "FromImage",
            "caching": "ReadWrite",
            "managedDisk": {"storageAccountType": "Premium_LRS", "id": disk_id(vm, &vm.os_disk.name)},
            "deleteOption": "Delete",
            "diskSizeGB": vm.os_disk.size_gb,
        })
    } else {
        json!({
            "osType": vm.os_type.as_str(),
            "name": vm.os_disk.name,
            "createOption": "FromImage",
            "caching": "ReadWrite",
            "vhd": {"uri": format!("https://{}disks.blob.core.windows.net/vhds/{}.vhd", vm.name.to_ascii_lowercase(), vm.os_disk.name)},
            "diskSizeGB": vm.os_disk.size_gb,
        })
    };
    let data_disks: Vec<Value> = vm
        .data_disks
        .iter()
        .map(|d| {
            json!({
                "lun": d.lun,
                "name": d.name,
                "createOption": "Empty",
                "caching": "None",
                "managedDisk": {"storageAccountType": "Premium_LRS", "id": disk_id(vm, &d.name)},
                "diskSizeGB": d.size_gb,
                "toBeDetached": false,
                "deleteOption": "Detach",
            })
        })
        .collect();
    let os_profile = match vm.os_type {
        OsType::Linux => json!({"computerName": vm.name, "adminUsername": "azureuser",
            "linuxConfiguration": {"disablePasswordAuthentication": true, "provisionVMAgent": true}, "secrets": []}),
        OsType::Windows => json!({"computerName": vm.name, "adminUsername": "azureuser",
            "windowsConfiguration": {"provisionVMAgent": true, "enableAutomaticUpdates": true}, "secrets": []}),
    };
    let mut body = json!({
        "id": vm_id(vm),
        "name": vm.name,
        "type": "Microsoft.Compute/virtualMachines",
        "location": vm.location,
        "properties": {
            "vmId": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, vm_id(vm).to_ascii_lowercase().as_bytes()).to_string(),
            "hardwareProfile": {"vmSize": vm.vm_size},
            "storageProfile": {
                "imageReference": {
                    "publisher": vm.image.publisher, "offer": vm.image.offer, "sku": vm.image.sku,
                    "version": vm.image.version, "exactVersion": "2026.1101.1"
                },
                "osDisk": os_disk,
                "dataDisks": data_disks,
            },
            "osProfile": os_profile,
            "networkProfile": {"networkInterfaces": [{"id": format!("/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/networkInterfaces/{}-nic", vm.subscription, vm.resource_group, vm.name)}]},
            "provisioningState": "Succeeded",
        },
    });
    if !vm.extensions.is_empty() {
        // ARM lists the VM's extensions in full here, as the extensions list does.
        body["resources"] = json!(vm.extensions.iter().map(|e| extension_json(vm, e)).collect::<Vec<_>>());
    }
    if req
        .query("$expand")
        .is_some_and(|e| e.eq_ignore_ascii_case("instanceView"))
    {
        body["properties"]["instanceView"] = instance_view(vm);
    }
    Ok(Response::json(200, &body))
}

/// The instance view of a prepared (generalized, deallocated) VM: `GET .../instanceView` and
/// `$expand=instanceView` show the same `VirtualMachineInstanceView`.
fn instance_view(vm: &Vm) -> Value {
    let disks: Vec<Value> = std::iter::once(&vm.os_disk.name)
        .chain(vm.data_disks.iter().map(|d| &d.name))
        .map(|name| {
            json!({"name": name, "statuses": [
                {"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded"}
            ]})
        })
        .collect();
    json!({
        "computerName": vm.name,
        "osName": match vm.os_type { OsType::Linux => "ubuntu", OsType::Windows => "Windows Server 2022 Datacenter" },
        "hyperVGeneration": vm.hyper_v_generation,
        "disks": disks,
        "statuses": [
            {"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded"},
            {"code": "PowerState/deallocated", "level": "Info", "displayStatus": "VM deallocated"}
        ],
    })
}

/// `GET .../virtualMachines/{vm}/instanceView`.
pub fn get_instance_view(
    ctx: &Ctx,
    req: &Request,
    caller: &Caller,
    sub: &str,
    rg: &str,
    name: &str,
) -> Result<Response, ArmError> {
    let vm = lookup_vm(
        ctx,
        req,
        caller,
        (sub, rg, name),
        "virtualMachines",
        "Microsoft.Compute/virtualMachines/read",
    )?;
    Ok(Response::json(200, &instance_view(vm)))
}

fn extension_json(vm: &Vm, e: &Extension) -> Value {
    json!({
        "id": format!("{}/extensions/{}", vm_id(vm), e.name),
        "name": e.name,
        "type": "Microsoft.Compute/virtualMachines/extensions",
        "location": vm.location,
        "properties": {
            "publisher": e.publisher,
            "type": e.kind,
            "typeHandlerVersion": e.type_handler_version,
            "autoUpgradeMinorVersion": true,
            "provisioningState": "Succeeded",
        },
    })
}

pub fn list_extensions(
    ctx: &Ctx,
    req: &Request,
    caller: &Caller,
    sub: &str,
    rg: &str,
    name: &str,
) -> Result<Response, ArmError> {
    let vm = lookup_vm(
        ctx,
        req,
        caller,
        (sub, rg, name),
        "virtualMachines/extensions",
        "Microsoft.Compute/virtualMachines/extensions/read",
    )?;
    let value: Vec<Value> = vm.extensions.iter().map(|e| extension_json(vm, e)).collect();
    Ok(Response::json(200, &json!({ "value": value })))
}

/// What the emulator knows about a disk or snapshot that can be a copy source.
struct SourceDisk {
    location: String,
    size_gb: u64,
    os_type: Option<&'static str>,
    hyper_v_generation: String,
    unique_id: String,
}

fn trimmed(id: &str) -> String {
    format!("/{}", id.trim_start_matches('/'))
}

fn find_disk(ctx: &Ctx, id: &str) -> Option<SourceDisk> {
    let id = trimmed(id);
    ctx.world.vms.iter().find_map(|vm| {
        let unique = || uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, id.to_ascii_lowercase().as_bytes()).to_string();
        if vm.os_disk.managed && disk_id(vm, &vm.os_disk.name).eq_ignore_ascii_case(&id) {
            return Some(SourceDisk {
                location: vm.location.clone(),
                size_gb: vm.os_disk.size_gb as u64,
                os_type: Some(vm.os_type.as_str()),
                hyper_v_generation: vm.hyper_v_generation.clone(),
                unique_id: unique(),
            });
        }
        vm.data_disks
            .iter()
            .find(|d| disk_id(vm, &d.name).eq_ignore_ascii_case(&id))
            .map(|d| SourceDisk {
                location: vm.location.clone(),
                size_gb: d.size_gb as u64,
                os_type: None,
                hyper_v_generation: vm.hyper_v_generation.clone(),
                unique_id: unique(),
            })
    })
}

/// A managed disk of the world's VMs as a gallery image version's disk source: (location, OS type
/// if it is an OS disk, Hyper-V generation, size in GB).
pub(super) fn world_disk(ctx: &Ctx, id: &str) -> Option<(String, Option<String>, String, u64)> {
    find_disk(ctx, id).map(|d| {
        (
            d.location,
            d.os_type.map(str::to_string),
            d.hyper_v_generation,
            d.size_gb,
        )
    })
}

fn snapshot_source(st: &State, id: &str, now: EmuTime) -> Result<Option<(SourceDisk, &'static str)>, ArmError> {
    let Some(snap) = st.get(&trimmed(id)).filter(|r| r.kind == Kind::Snapshot) else {
        return Ok(None);
    };
    let state = snap.provisioning_state(now);
    let disk = SourceDisk {
        location: snap.location.clone(),
        size_gb: snap.facts["diskSizeGB"].as_u64().unwrap_or(0),
        os_type: match snap.facts["osType"].as_str() {
            Some("Linux") => Some("Linux"),
            Some("Windows") => Some("Windows"),
            _ => None,
        },
        hyper_v_generation: snap.facts["hyperVGeneration"].as_str().unwrap_or("V1").to_string(),
        unique_id: snap.facts["uniqueId"].as_str().unwrap_or_default().to_string(),
    };
    Ok(Some((disk, state)))
}

fn missing(target: &str) -> ArmError {
    ArmError::invalid(target, format!("Required parameter '{target}' is missing (null)."))
}

fn source_not_found(id: &str) -> ArmError {
    ArmError::new(404, "NotFound", format!("Resource {id} is not found."))
}

pub fn plan_create(
    ctx: &Ctx,
    st: &State,
    path: &ResPath,
    body: Value,
    location: &str,
    now: EmuTime,
) -> Result<Plan, ArmError> {
    match path.kind {
        Kind::Snapshot => plan_snapshot(ctx, st, path, body, location, now),
        _ => plan_image(ctx, st, path, body, location, now),
    }
}

fn plan_snapshot(
    ctx: &Ctx,
    st: &State,
    path: &ResPath,
    mut body: Value,
    location: &str,
    now: EmuTime,
) -> Result<Plan, ArmError> {
    let creation = body
        .pointer("/properties/creationData")
        .cloned()
        .ok_or_else(|| missing("properties.creationData"))?;
    let option = creation["createOption"]
        .as_str()
        .ok_or_else(|| missing("creationData.createOption"))?;
    let cross_region_allowed = match option.to_ascii_lowercase().as_str() {
        "copy" => false,
        "copystart" => true,
        _ => {
            return Err(ArmError::invalid(
                "creationData.createOption",
                format!(
                    "createOption '{option}' is not supported for snapshots by this emulator; use Copy or CopyStart."
                ),
            ));
        }
    };
    let source_id = creation["sourceResourceId"]
        .as_str()
        .ok_or_else(|| missing("creationData.sourceResourceId"))?;
    let source = match find_disk(ctx, source_id) {
        Some(disk) => disk,
        None => match snapshot_source(st, source_id, now)? {
            Some((disk, "Succeeded")) => disk,
            Some((_, state)) => {
                return Err(ArmError::new(
                    409,
                    "OperationNotAllowed",
                    format!("The source snapshot '{source_id}' is not ready: its provisioning state is {state}."),
                ));
            }
            None => return Err(source_not_found(source_id)),
        },
    };
    if !source.location.eq_ignore_ascii_case(location) && !cross_region_allowed {
        return Err(ArmError::invalid(
            "creationData.sourceResourceId",
            format!(
                "The source '{source_id}' is in region '{}' and the snapshot in '{location}'. Copying to another region needs createOption CopyStart.",
                source.location
            ),
        ));
    }
    if body.get("sku").is_none() {
        body["sku"] = json!({"name": "Standard_LRS"});
    }
    let factor = if cross_region_allowed && !source.location.eq_ignore_ascii_case(location) {
        3.0
    } else {
        1.0
    };
    let secs = (90.0 + 1.5 * source.size_gb as f64) * factor * ctx.jitter(&format!("snapshot:{}", path.id()), 0.15);
    let facts = json!({
        "diskSizeGB": source.size_gb,
        "osType": source.os_type,
        "hyperVGeneration": source.hyper_v_generation,
        "uniqueId": uuid::Uuid::new_v4().to_string(),
        "sourceUniqueId": source.unique_id,
        "timeCreated": now.format(&Rfc3339).unwrap_or_default(),
    });
    Ok(Plan {
        body,
        facts,
        duration: Duration::seconds_f64(secs),
        failure: None,
        replication: Vec::new(),
    })
}

/// Resolves one image disk source (`snapshot.id` or `managedDisk.id`) to its size and OS type.
fn image_disk_source(
    ctx: &Ctx,
    st: &State,
    disk: &Value,
    target: &str,
    location: &str,
    now: EmuTime,
) -> Result<SourceDisk, ArmError> {
    let snapshot = disk.pointer("/snapshot/id").and_then(Value::as_str);
    let managed = disk.pointer("/managedDisk/id").and_then(Value::as_str);
    let blob = disk.get("blobUri").and_then(Value::as_str);
    let given = [snapshot.is_some(), managed.is_some(), blob.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if given != 1 {
        return Err(ArmError::invalid(
            target,
            format!("Exactly one of snapshot, managedDisk or blobUri must be given for '{target}'."),
        ));
    }
    if blob.is_some() {
        return Err(ArmError::invalid(
            target,
            "Images from a blob URI are not supported by this emulator; use a snapshot or managed disk.",
        ));
    }
    let source = if let Some(id) = snapshot {
        match snapshot_source(st, id, now)? {
            Some((disk, "Succeeded")) => (disk, id),
            Some((_, state)) => {
                return Err(ArmError::new(
                    409,
                    "OperationNotAllowed",
                    format!("The source snapshot '{id}' is not ready: its provisioning state is {state}."),
                ));
            }
            None => return Err(source_not_found(id)),
        }
    } else {
        let id = managed.expect("one source");
        (find_disk(ctx, id).ok_or_else(|| source_not_found(id))?, id)
    };
    if !source.0.location.eq_ignore_ascii_case(location) {
        return Err(ArmError::invalid(
            target,
            format!(
                "The source '{}' is in region '{}'; an image must be created in the region of its sources ('{location}').",
                source.1, source.0.location
            ),
        ));
    }
    Ok(source.0)
}

fn plan_image(
    ctx: &Ctx,
    st: &State,
    path: &ResPath,
    body: Value,
    location: &str,
    now: EmuTime,
) -> Result<Plan, ArmError> {
    if let Some(vm) = body
        .pointer("/properties/sourceVirtualMachine/id")
        .and_then(Value::as_str)
    {
        let _ = vm;
        return Err(ArmError::new(
            409,
            "OperationNotAllowed",
            "The operation 'Create Image' requires the Virtual Machine to be Generalized.",
        ));
    }
    let os_disk = body
        .pointer("/properties/storageProfile/osDisk")
        .cloned()
        .ok_or_else(|| missing("storageProfile.osDisk"))?;
    let os_type = os_disk["osType"].as_str().ok_or_else(|| missing("osDisk.osType"))?;
    if !["Linux", "Windows"].iter().any(|t| t.eq_ignore_ascii_case(os_type)) {
        return Err(ArmError::invalid(
            "osDisk.osType",
            format!("The value '{os_type}' of parameter 'osDisk.osType' is not valid."),
        ));
    }
    let os_state = os_disk["osState"].as_str().ok_or_else(|| missing("osDisk.osState"))?;
    if !["Generalized", "Specialized"]
        .iter()
        .any(|t| t.eq_ignore_ascii_case(os_state))
    {
        return Err(ArmError::invalid(
            "osDisk.osState",
            format!("The value '{os_state}' of parameter 'osDisk.osState' is not valid."),
        ));
    }
    let os_source = image_disk_source(ctx, st, &os_disk, "storageProfile.osDisk", location, now)?;
    let mut data_sizes = Map::new();
    let mut total = os_source.size_gb;
    if let Some(disks) = body
        .pointer("/properties/storageProfile/dataDisks")
        .and_then(Value::as_array)
    {
        for (i, disk) in disks.iter().enumerate() {
            let lun = disk["lun"]
                .as_u64()
                .ok_or_else(|| missing(&format!("storageProfile.dataDisks[{i}].lun")))?;
            if data_sizes.contains_key(&lun.to_string()) {
                return Err(ArmError::invalid(
                    "storageProfile.dataDisks",
                    format!("Duplicate LUN {lun} in storageProfile.dataDisks."),
                ));
            }
            let source = image_disk_source(ctx, st, disk, &format!("storageProfile.dataDisks[{i}]"), location, now)?;
            total += source.size_gb;
            data_sizes.insert(lun.to_string(), json!(source.size_gb));
        }
    }
    let data_count = data_sizes.len() as f64;
    let secs = (120.0 + 20.0 * data_count + 0.5 * total as f64) * ctx.jitter(&format!("image:{}", path.id()), 0.15);
    let facts = json!({
        "osDiskSizeGB": os_source.size_gb,
        "dataDiskSizesGB": data_sizes,
        "sourceOsType": os_source.os_type,
    });
    Ok(Plan {
        body,
        facts,
        duration: Duration::seconds_f64(secs),
        failure: None,
        replication: Vec::new(),
    })
}

pub fn plan_update(ctx: &Ctx, _st: &State, existing: &Resource, body: Value, _now: EmuTime) -> Result<Plan, ArmError> {
    Ok(Plan {
        body,
        facts: existing.facts.clone(),
        duration: Duration::seconds(10) * ctx.jitter(&format!("update:{}", existing.id), 0.2),
        failure: None,
        replication: Vec::new(),
    })
}

pub fn render_properties(r: &Resource, props: &mut Map<String, Value>, _now: EmuTime) {
    let f = &r.facts;
    match r.kind {
        Kind::Snapshot => {
            if let Some(creation) = props.get_mut("creationData").and_then(Value::as_object_mut) {
                creation.insert("sourceUniqueId".into(), f["sourceUniqueId"].clone());
            }
            if let Some(os) = f["osType"].as_str() {
                props.entry("osType").or_insert(json!(os));
            }
            props.entry("hyperVGeneration").or_insert(f["hyperVGeneration"].clone());
            props.insert("diskSizeGB".into(), f["diskSizeGB"].clone());
            props.insert(
                "diskSizeBytes".into(),
                json!(f["diskSizeGB"].as_u64().unwrap_or(0) * 1024 * 1024 * 1024),
            );
            props.insert("uniqueId".into(), f["uniqueId"].clone());
            props.insert("timeCreated".into(), f["timeCreated"].clone());
            props.entry("incremental").or_insert(json!(false));
            props
                .entry("encryption")
                .or_insert(json!({"type": "EncryptionAtRestWithPlatformKey"}));
            props.insert("diskState".into(), json!("Unattached"));
            props.entry("networkAccessPolicy").or_insert(json!("AllowAll"));
            props.entry("publicNetworkAccess").or_insert(json!("Enabled"));
        }
        _ => {
            props.entry("hyperVGeneration").or_insert(json!("V1"));
            if let Some(profile) = props.get_mut("storageProfile").and_then(Value::as_object_mut) {
                profile.entry("zoneResilient").or_insert(json!(false));
                profile.entry("dataDisks").or_insert(json!([]));
                if let Some(os) = profile.get_mut("osDisk").and_then(Value::as_object_mut) {
                    os.entry("caching").or_insert(json!("ReadWrite"));
                    os.entry("storageAccountType").or_insert(json!("Standard_LRS"));
                    os.insert("diskSizeGB".into(), f["osDiskSizeGB"].clone());
                }
                if let Some(disks) = profile.get_mut("dataDisks").and_then(Value::as_array_mut) {
                    for disk in disks.iter_mut().filter_map(Value::as_object_mut) {
                        let lun = disk.get("lun").and_then(Value::as_u64).unwrap_or(0).to_string();
                        disk.entry("caching").or_insert(json!("None"));
                        disk.entry("storageAccountType").or_insert(json!("Standard_LRS"));
                        disk.insert("diskSizeGB".into(), f["dataDiskSizesGB"][&lun].clone());
                    }
                }
            }
        }
    }
}
