//! An in-memory [`AzureApi`] for the stage decision tests: Azure as a few maps a test fills in
//! (resources with their states and tags, operations by status URL, pools and their node counts)
//! and a log of every write a step asked for. Writes change nothing but the log, except that a
//! PUT of a missing resource leaves it `Creating` with an operation `InProgress`, so a test reads
//! what the step would see next. Calls a stage never makes answer a permanent error naming them.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::azure::api::*;
use crate::azure::{AzureError, ProvisioningState, RegistrationState};
use crate::model::ids::{BatchAccountId, GalleryId, GalleryImageId, GalleryImageVersionId, ImageId, SnapshotId, VmId};

#[derive(Default)]
pub struct FakeAzure {
    pub state: Mutex<World>,
}

/// What the fake Azure holds. Resource keys are their ids, lower-cased.
#[derive(Default)]
pub struct World {
    pub resources: BTreeMap<String, ResourceState>,
    pub definitions: BTreeMap<String, DefinitionInfo>,
    pub versions: BTreeMap<String, VersionInfo>,
    pub operations: BTreeMap<String, OperationStatus>,
    pub providers: BTreeMap<String, RegistrationState>,
    /// By pool id.
    pub pools: BTreeMap<String, PoolInfo>,
    pub node_counts: BTreeMap<String, NodeCounts>,
    /// Every write, as `"<call> <resource name>"`, in order.
    pub writes: Vec<String>,
    /// Every read of a snapshot, an image, the gallery, a definition or a version, the same way.
    pub reads: Vec<String>,
    /// Pools added, as sent.
    pub added_pools: Vec<PoolRequest>,
    /// Names (a version's, a pool's id) whose delete Azure refuses (409 `OperationNotAllowed`).
    pub refused_deletes: Vec<String>,
    /// The `Retry-After` a snapshot's or an image's delete answers with, by name.
    pub delete_hints: BTreeMap<String, std::time::Duration>,
}

fn key(id: &impl ToString) -> String {
    id.to_string().to_ascii_lowercase()
}

fn not_here(call: &str) -> AzureError {
    AzureError::permanent(call, "NotInFake", "the stage decision tests do not expect this call")
}

impl FakeAzure {
    pub fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A PUT: logged; a missing resource starts `Creating` with an operation to follow.
    fn put(&self, call: &str, id: String, name: &str, tags: &Tags) -> Accepted {
        let mut world = self.world();
        world.writes.push(format!("{call} {name}"));
        let created = !world.resources.contains_key(&id);
        let status_url = format!("https://fake/operations/{call}/{name}");
        if created {
            world.resources.insert(
                id,
                ResourceState {
                    provisioning_state: ProvisioningState::Creating,
                    tags: tags.clone(),
                },
            );
            world
                .operations
                .insert(status_url.clone(), OperationStatus::InProgress { retry_after: None });
        }
        Accepted {
            created,
            provisioning_state: Some(ProvisioningState::Creating),
            status_url: created.then_some(status_url),
            retry_after: None,
        }
    }

    fn read(&self, call: &str, name: &str) {
        self.world().reads.push(format!("{call} {name}"));
    }

    fn resource(&self, id: &impl ToString) -> Option<ResourceState> {
        self.world().resources.get(&key(id)).cloned()
    }
}

impl FakeAzure {
    /// A delete: refused when the test says so, else logged.
    fn refuse_or_log(&self, call: &str, name: &str) -> Result<(), AzureError> {
        let mut world = self.world();
        if world.refused_deletes.iter().any(|n| n == name) {
            return Err(AzureError::permanent(
                call,
                "OperationNotAllowed",
                format!("{name} is in use"),
            ));
        }
        world.writes.push(format!("{call} {name}"));
        Ok(())
    }
}

impl World {
    pub fn resource(&mut self, id: &impl ToString, state: ProvisioningState, tags: Tags) {
        self.resources.insert(
            key(id),
            ResourceState {
                provisioning_state: state,
                tags,
            },
        );
    }
}

#[async_trait]
impl AzureApi for FakeAzure {
    async fn get_vm(&self, _: &VmId) -> Result<VmInfo, AzureError> {
        Err(not_here("get_vm"))
    }
    async fn provider_state(&self, subscription: &str, _: &str) -> Result<RegistrationState, AzureError> {
        Ok(self
            .world()
            .providers
            .get(subscription)
            .cloned()
            .unwrap_or(RegistrationState::Registered))
    }
    async fn list_locations(&self, _: &str) -> Result<Vec<String>, AzureError> {
        Err(not_here("list_locations"))
    }
    async fn batch_vm_sizes(&self, _: &str, _: &str) -> Result<Vec<VmSize>, AzureError> {
        Err(not_here("batch_vm_sizes"))
    }
    async fn register_provider(&self, subscription: &str, namespace: &str) -> Result<RegistrationState, AzureError> {
        let mut world = self.world();
        world
            .writes
            .push(format!("register_provider {namespace} {subscription}"));
        world
            .providers
            .insert(subscription.to_string(), RegistrationState::Registering);
        Ok(RegistrationState::Registering)
    }
    async fn put_snapshot(&self, id: &SnapshotId, request: &SnapshotRequest) -> Result<Accepted, AzureError> {
        Ok(self.put("put_snapshot", key(id), id.name(), &request.tags))
    }
    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<ResourceState>, AzureError> {
        self.read("get_snapshot", id.name());
        Ok(self.resource(id))
    }
    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<Option<std::time::Duration>, AzureError> {
        let mut world = self.world();
        world.writes.push(format!("delete_snapshot {}", id.name()));
        Ok(world.delete_hints.get(id.name()).copied())
    }
    async fn put_image(&self, id: &ImageId, request: &ImageRequest) -> Result<Accepted, AzureError> {
        Ok(self.put("put_image", key(id), id.name(), &request.tags))
    }
    async fn get_image(&self, id: &ImageId) -> Result<Option<ResourceState>, AzureError> {
        self.read("get_image", id.name());
        Ok(self.resource(id))
    }
    async fn delete_image(&self, id: &ImageId) -> Result<Option<std::time::Duration>, AzureError> {
        let mut world = self.world();
        world.writes.push(format!("delete_image {}", id.name()));
        Ok(world.delete_hints.get(id.name()).copied())
    }
    async fn get_gallery(&self, id: &GalleryId) -> Result<Option<ResourceState>, AzureError> {
        self.read("get_gallery", id.name());
        Ok(self.resource(id))
    }
    async fn put_gallery(&self, id: &GalleryId, _: &str, tags: &Tags) -> Result<Accepted, AzureError> {
        Ok(self.put("put_gallery", key(id), id.name(), tags))
    }
    async fn get_definition(&self, id: &GalleryImageId) -> Result<Option<DefinitionInfo>, AzureError> {
        self.read("get_definition", id.name());
        Ok(self.world().definitions.get(&key(id)).cloned())
    }
    async fn put_definition(&self, id: &GalleryImageId, request: &DefinitionRequest) -> Result<Accepted, AzureError> {
        Ok(self.put("put_definition", key(id), id.name(), &request.tags))
    }
    async fn list_versions(&self, definition: &GalleryImageId) -> Result<Vec<ListedVersion>, AzureError> {
        let prefix = format!("{}/versions/", key(definition));
        let world = self.world();
        Ok(world
            .versions
            .iter()
            .filter_map(|(id, info)| {
                Some(ListedVersion {
                    name: id.strip_prefix(&prefix)?.to_string(),
                    info: info.clone(),
                })
            })
            .collect())
    }
    async fn delete_version(&self, id: &GalleryImageVersionId) -> Result<(), AzureError> {
        self.refuse_or_log("delete_version", id.name())
    }
    async fn put_version(&self, id: &GalleryImageVersionId, request: &VersionRequest) -> Result<Accepted, AzureError> {
        Ok(self.put("put_version", key(id), id.name(), &request.tags))
    }
    async fn get_version(&self, id: &GalleryImageVersionId, _: bool) -> Result<Option<VersionInfo>, AzureError> {
        self.read("get_version", id.name());
        Ok(self.world().versions.get(&key(id)).cloned())
    }
    async fn set_exclude_from_latest(&self, id: &GalleryImageVersionId, exclude: bool) -> Result<Accepted, AzureError> {
        self.world()
            .writes
            .push(format!("set_exclude_from_latest {} {exclude}", id.name()));
        Ok(Accepted {
            created: false,
            provisioning_state: None,
            status_url: None,
            retry_after: None,
        })
    }
    async fn set_target_regions(
        &self,
        id: &GalleryImageVersionId,
        regions: &[TargetRegion],
    ) -> Result<Accepted, AzureError> {
        let names: Vec<&str> = regions.iter().map(|r| r.name.as_str()).collect();
        self.world()
            .writes
            .push(format!("set_target_regions {} {}", id.name(), names.join(",")));
        Ok(Accepted {
            created: false,
            provisioning_state: None,
            status_url: None,
            retry_after: None,
        })
    }
    async fn operation_status(&self, status_url: &str) -> Result<OperationStatus, AzureError> {
        self.world()
            .operations
            .get(status_url)
            .cloned()
            .ok_or_else(|| not_here("operation_status of an unknown URL"))
    }
    async fn get_batch_account(&self, _: &BatchAccountId) -> Result<BatchAccountInfo, AzureError> {
        Err(not_here("get_batch_account"))
    }
    async fn supported_images(&self, _: &BatchAccountInfo) -> Result<Vec<SupportedImage>, AzureError> {
        Err(not_here("supported_images"))
    }
    async fn add_pool(&self, _: &str, pool: &PoolRequest) -> Result<PoolCreated, AzureError> {
        let mut world = self.world();
        world.writes.push(format!("add_pool {}", pool.id));
        world.added_pools.push(pool.clone());
        Ok(if world.pools.contains_key(&pool.id) {
            PoolCreated::Exists
        } else {
            PoolCreated::Created
        })
    }
    async fn get_pool(&self, _: &str, pool_id: &str) -> Result<Option<PoolInfo>, AzureError> {
        Ok(self.world().pools.get(pool_id).cloned())
    }
    async fn list_pools(&self, _: &str) -> Result<Vec<PoolInfo>, AzureError> {
        Ok(self.world().pools.values().cloned().collect())
    }
    async fn node_counts(&self, _: &str, pool_id: &str) -> Result<NodeCounts, AzureError> {
        Ok(self.world().node_counts.get(pool_id).cloned().unwrap_or_default())
    }
    async fn resize_pool(&self, _: &str, pool_id: &str, dedicated: u32, low_priority: u32) -> Result<(), AzureError> {
        self.world()
            .writes
            .push(format!("resize_pool {pool_id} {dedicated}+{low_priority}"));
        Ok(())
    }
    async fn set_pool_metadata(&self, _: &str, pool_id: &str, _: &BTreeMap<String, String>) -> Result<(), AzureError> {
        self.world().writes.push(format!("set_pool_metadata {pool_id}"));
        Ok(())
    }
    async fn delete_pool(&self, _: &str, pool_id: &str) -> Result<(), AzureError> {
        self.refuse_or_log("delete_pool", pool_id)
    }
}
