//! The world file: what exists in the emulated Azure before the first request. Tenants,
//! subscriptions with their resource groups and registered providers, app registrations and managed
//! identities with their role assignments, prepared build VMs and Batch accounts.
//!
//! Parsed strictly (unknown keys are errors) and cross-checked after parsing, so a typo in a world
//! file is reported with the file and the key instead of surfacing later as a puzzling 404.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::regions;

/// The world `sigrun run` and the example pipelines use when no file is given.
pub const DEFAULT_WORLD: &str = include_str!("../../config/emulator-world.toml");

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct World {
    pub tenants: Vec<Tenant>,
    pub subscriptions: Vec<Subscription>,
    #[serde(default)]
    pub roles: Vec<RoleDefinition>,
    #[serde(default)]
    pub apps: Vec<Principal>,
    #[serde(default)]
    pub managed_identities: Vec<Principal>,
    #[serde(default)]
    pub vms: Vec<Vm>,
    #[serde(default)]
    pub batch_accounts: Vec<BatchAccount>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub id: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    pub id: String,
    pub tenant: String,
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_providers")]
    pub registered_providers: Vec<String>,
    #[serde(default)]
    pub resource_groups: Vec<ResourceGroup>,
}

fn default_providers() -> Vec<String> {
    vec!["Microsoft.Compute".to_string()]
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceGroup {
    pub name: String,
    pub location: String,
}

/// A custom role: a name and the actions it allows (`*`, `*/read`, `Microsoft.Compute/*`, ...).
/// Owner, Contributor and Reader are built in.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoleDefinition {
    pub name: String,
    pub actions: Vec<String>,
}

/// An app registration (client id + secret) or a managed identity (no secret).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Principal {
    pub name: String,
    pub tenant: String,
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<String>,
    pub object_id: String,
    #[serde(default)]
    pub roles: Vec<RoleAssignment>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoleAssignment {
    pub role: String,
    pub scope: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub location: String,
    pub os_type: OsType,
    #[serde(default = "default_generation")]
    pub hyper_v_generation: String,
    #[serde(default = "default_vm_size")]
    pub vm_size: String,
    pub image: MarketplaceImage,
    pub os_disk: Disk,
    #[serde(default)]
    pub data_disks: Vec<DataDisk>,
    #[serde(default)]
    pub extensions: Vec<Extension>,
}

fn default_generation() -> String {
    "V2".to_string()
}

fn default_vm_size() -> String {
    "Standard_D4s_v5".to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum OsType {
    Linux,
    Windows,
}

impl OsType {
    pub fn as_str(self) -> &'static str {
        match self {
            OsType::Linux => "Linux",
            OsType::Windows => "Windows",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MarketplaceImage {
    pub publisher: String,
    pub offer: String,
    pub sku: String,
    #[serde(default = "default_image_version")]
    pub version: String,
}

fn default_image_version() -> String {
    "latest".to_string()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub name: String,
    pub size_gb: u32,
    /// `false` for a VM whose disk is a VHD in a storage account (unmanaged): it cannot be snapshotted
    /// as a managed disk, and Batch wants managed disks.
    #[serde(default = "yes")]
    pub managed: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataDisk {
    pub lun: u32,
    pub name: String,
    pub size_gb: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    pub name: String,
    pub publisher: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default = "default_handler_version")]
    pub type_handler_version: String,
}

fn default_handler_version() -> String {
    "1.0".to_string()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchAccount {
    pub name: String,
    pub subscription: String,
    pub resource_group: String,
    pub location: String,
    #[serde(default = "default_core_quota")]
    pub dedicated_core_quota: u32,
    #[serde(default = "default_core_quota")]
    pub low_priority_core_quota: u32,
    /// `poolQuota`: pools the account may hold.
    #[serde(default = "default_pool_quota")]
    pub pool_quota: u32,
    /// `dedicatedCoreQuotaPerVMFamily`, by family; binding only with `per_family_enforced`.
    #[serde(default)]
    pub dedicated_core_quota_per_family: BTreeMap<String, u32>,
    #[serde(default)]
    pub per_family_enforced: bool,
}

fn default_pool_quota() -> u32 {
    100
}

fn default_core_quota() -> u32 {
    20_000
}

#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    #[error("cannot read world file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("world file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("world file {path}: {key}: {message}")]
    Invalid { path: String, key: String, message: String },
}

impl World {
    pub fn load(path: &Path) -> Result<World, WorldError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorldError::Read {
            path: path.display().to_string(),
            source,
        })?;
        World::parse(&text, &path.display().to_string())
    }

    pub fn default_world() -> World {
        World::parse(DEFAULT_WORLD, "config/emulator-world.toml").expect("the built-in world is valid")
    }

    /// Parses and cross-checks a world; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<World, WorldError> {
        let world: World = toml::from_str(text).map_err(|err| WorldError::Parse {
            path: origin.to_string(),
            message: err.to_string(),
        })?;
        world.check(origin)?;
        Ok(world)
    }

    /// The cross-checks parsing cannot make, in the order the tables are read: tenants,
    /// subscriptions, principals, VMs, Batch accounts. The first flaw is the error, named by its key.
    fn check(&self, origin: &str) -> Result<(), WorldError> {
        let tenants: HashSet<String> = self.tenants.iter().map(|t| t.id.to_ascii_lowercase()).collect();
        self.check_tenants()
            .and_then(|()| self.check_subscriptions(&tenants))
            .and_then(|()| self.check_principals(&tenants))
            .and_then(|()| self.check_vms())
            .and_then(|()| self.check_batch_accounts())
            .map_err(|flaw| WorldError::Invalid {
                path: origin.to_string(),
                key: flaw.key,
                message: flaw.message,
            })
    }

    /// A world has at least one tenant: every principal and subscription belongs to one.
    fn check_tenants(&self) -> Result<(), Flaw> {
        if self.tenants.is_empty() {
            return Err(Flaw::new("tenants", "at least one tenant is needed"));
        }
        Ok(())
    }

    /// A subscription belongs to a known tenant, and its resource groups are in known regions.
    fn check_subscriptions(&self, tenants: &HashSet<String>) -> Result<(), Flaw> {
        for (i, sub) in self.subscriptions.iter().enumerate() {
            if !tenants.contains(&sub.tenant.to_ascii_lowercase()) {
                return Err(Flaw::new(
                    format!("subscriptions[{i}].tenant"),
                    format!("unknown tenant {}", sub.tenant),
                ));
            }
            for (j, rg) in sub.resource_groups.iter().enumerate() {
                known_region(
                    format!("subscriptions[{i}].resource_groups[{j}].location"),
                    &rg.location,
                )?;
            }
        }
        Ok(())
    }

    /// An app or managed identity belongs to a known tenant, an app has a secret, and each role
    /// assignment names a known role (custom or built in) on an ARM scope.
    fn check_principals(&self, tenants: &HashSet<String>) -> Result<(), Flaw> {
        let role_names: HashSet<String> = self
            .roles
            .iter()
            .map(|r| r.name.to_ascii_lowercase())
            .chain(["owner", "contributor", "reader"].map(String::from))
            .collect();
        for (table, principals) in [("apps", &self.apps), ("managed_identities", &self.managed_identities)] {
            for (i, p) in principals.iter().enumerate() {
                if !tenants.contains(&p.tenant.to_ascii_lowercase()) {
                    return Err(Flaw::new(
                        format!("{table}[{i}].tenant"),
                        format!("unknown tenant {}", p.tenant),
                    ));
                }
                if table == "apps" && p.client_secret.is_none() {
                    return Err(Flaw::new(
                        format!("{table}[{i}].client_secret"),
                        "an app needs a secret",
                    ));
                }
                for (j, r) in p.roles.iter().enumerate() {
                    if !role_names.contains(&r.role.to_ascii_lowercase()) {
                        return Err(Flaw::new(
                            format!("{table}[{i}].roles[{j}].role"),
                            format!("unknown role {}", r.role),
                        ));
                    }
                    if !r.scope.starts_with("/subscriptions/") {
                        return Err(Flaw::new(
                            format!("{table}[{i}].roles[{j}].scope"),
                            "a scope is an ARM id starting with /subscriptions/",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A build VM is in a resource group the world has, in a known region.
    fn check_vms(&self) -> Result<(), Flaw> {
        for (i, vm) in self.vms.iter().enumerate() {
            if !self.has_group(&vm.subscription, &vm.resource_group) {
                return Err(Flaw::new(
                    format!("vms[{i}].resource_group"),
                    format!(
                        "no resource group {} in subscription {}",
                        vm.resource_group, vm.subscription
                    ),
                ));
            }
            known_region(format!("vms[{i}].location"), &vm.location)?;
        }
        Ok(())
    }

    /// A Batch account is in a known subscription, in a resource group the world has, in a known
    /// region.
    fn check_batch_accounts(&self) -> Result<(), Flaw> {
        let subscriptions: HashSet<String> = self.subscriptions.iter().map(|s| s.id.to_ascii_lowercase()).collect();
        for (i, acct) in self.batch_accounts.iter().enumerate() {
            if !subscriptions.contains(&acct.subscription.to_ascii_lowercase()) {
                return Err(Flaw::new(
                    format!("batch_accounts[{i}].subscription"),
                    format!("unknown subscription {}", acct.subscription),
                ));
            }
            if !self.has_group(&acct.subscription, &acct.resource_group) {
                return Err(Flaw::new(
                    format!("batch_accounts[{i}].resource_group"),
                    format!("no resource group {}", acct.resource_group),
                ));
            }
            known_region(format!("batch_accounts[{i}].location"), &acct.location)?;
        }
        Ok(())
    }

    /// Whether subscription `sub` has resource group `rg`; ids and names ignore case, as ARM's do.
    fn has_group(&self, sub: &str, rg: &str) -> bool {
        self.subscriptions.iter().any(|s| {
            s.id.eq_ignore_ascii_case(sub) && s.resource_groups.iter().any(|g| g.name.eq_ignore_ascii_case(rg))
        })
    }
}

/// What a cross-check found wrong: the key (`vms[0].location`) and why.
struct Flaw {
    key: String,
    message: String,
}

impl Flaw {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Flaw {
        Flaw {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A location the emulator knows as an Azure region (any spelling `regions::canonical` accepts).
fn known_region(key: String, location: &str) -> Result<(), Flaw> {
    match regions::canonical(location) {
        Some(_) => Ok(()),
        None => Err(Flaw::new(key, format!("unknown region {location}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_world_parses() {
        let world = World::default_world();
        assert!(!world.vms.is_empty());
        assert!(!world.batch_accounts.is_empty());
    }

    #[test]
    fn unknown_key_is_named() {
        let text = DEFAULT_WORLD.replacen("[[tenants]]", "[[tenants]]\nbogus_key = 1", 1);
        let err = World::parse(&text, "w.toml").unwrap_err().to_string();
        assert!(err.contains("w.toml") && err.contains("bogus_key"), "{err}");
    }

    #[test]
    fn unknown_tenant_is_named() {
        let text = r#"
            [[tenants]]
            id = "t1"
            [[subscriptions]]
            id = "s1"
            tenant = "t2"
        "#;
        let err = World::parse(text, "w.toml").unwrap_err().to_string();
        assert!(err.contains("subscriptions[0].tenant"), "{err}");
    }
}
