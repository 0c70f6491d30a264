//! The Azure operations the stages and the planner call, as a trait over domain types. Stages see
//! only this; the REST client (`AzureClient`) implements it with reqwest and azure_identity, and unit
//! tests may implement it in memory.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::error::AzureError;
use super::states::{AllocationState, PoolState, ProvisioningState, RegistrationState, ReplicationState};
use crate::model::ids::{
    BatchAccountId, DiskId, GalleryId, GalleryImageId, GalleryImageVersionId, ImageId, SnapshotId, VmId,
};
use crate::model::spec::StartTaskSpec;

/// Tags put on every resource sigrun creates, so what it made is findable.
pub type Tags = BTreeMap<String, String>;

/// What the build VM looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct VmInfo {
    pub location: String,
    pub os_type: String,
    pub hyper_v_generation: Option<String>,
    /// Marketplace image it was built from (publisher, offer, sku), if any.
    pub base_image: Option<(String, String, String)>,
    /// `None` when the OS disk is not a managed disk (a VHD).
    pub os_disk: Option<DiskId>,
    /// (lun, disk); a data disk that is not managed has `None`.
    pub data_disks: Vec<(u32, Option<DiskId>)>,
    /// Names of installed VM extensions.
    pub extensions: Vec<String>,
}

/// A write Azure accepted; the operation may still be running.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// Whether the write created the resource (ARM answered 201, or 202 for a snapshot) rather
    /// than finding it there (200: the same PUT again, or an update).
    pub created: bool,
    /// `provisioningState` in the answer, if it had a body.
    pub provisioning_state: Option<ProvisioningState>,
    /// `Azure-AsyncOperation` (or `Location`) URL to poll.
    pub status_url: Option<String>,
    /// Azure's `Retry-After` hint.
    pub retry_after: Option<std::time::Duration>,
}

/// The state of an ARM resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceState {
    pub provisioning_state: ProvisioningState,
    pub tags: Tags,
}

/// The status of a long-running operation read from its status URL.
#[derive(Debug, Clone, PartialEq)]
pub enum OperationStatus {
    InProgress { retry_after: Option<std::time::Duration> },
    Succeeded,
    Failed { code: String, message: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRequest {
    pub location: String,
    pub source: DiskId,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    pub location: String,
    pub os_type: String,
    pub hyper_v_generation: String,
    pub os_snapshot: SnapshotId,
    /// (lun, snapshot)
    pub data_snapshots: Vec<(u32, SnapshotId)>,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DefinitionInfo {
    pub provisioning_state: ProvisioningState,
    pub os_type: String,
    pub os_state: String,
    pub hyper_v_generation: String,
    pub publisher: String,
    pub offer: String,
    pub sku: String,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DefinitionRequest {
    pub location: String,
    pub os_type: String,
    pub os_state: String,
    pub hyper_v_generation: String,
    pub publisher: String,
    pub offer: String,
    pub sku: String,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TargetRegion {
    pub name: String,
    pub replicas: u32,
    pub storage_account_type: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VersionRequest {
    pub location: String,
    pub source: ImageId,
    pub regions: Vec<TargetRegion>,
    pub storage_account_type: String,
    pub exclude_from_latest: bool,
    /// RFC 3339.
    pub end_of_life: Option<String>,
    pub tags: Tags,
}

/// Replication of one region as `$expand=ReplicationStatus` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionStatus {
    /// Canonical short name (`eastus`), whatever form Azure answered in.
    pub region: String,
    pub state: ReplicationState,
    pub progress: u8,
    pub details: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VersionInfo {
    pub provisioning_state: ProvisioningState,
    pub exclude_from_latest: bool,
    pub source: Option<String>,
    /// (canonical region, replicas)
    pub target_regions: Vec<(String, u32)>,
    /// Present when asked for with `expand_replication`.
    pub replication: Vec<RegionStatus>,
    pub tags: Tags,
    /// `publishingProfile.publishedDate`: when Azure took the version.
    pub published: Option<time::OffsetDateTime>,
}

/// A version of a definition, as the list of its versions names it.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedVersion {
    pub name: String,
    pub info: VersionInfo,
}

/// The management-plane facts about a Batch account.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchAccountInfo {
    pub id: BatchAccountId,
    pub location: String,
    /// Data-plane base URL, with scheme.
    pub url: String,
    pub quotas: AccountQuotas,
}

/// What a Batch account may hold, as ARM reports it (`None` where the answer does not say).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccountQuotas {
    /// `poolQuota`: pools in the account, whatever their state.
    pub pools: Option<u32>,
    /// `dedicatedCoreQuota`: vCPUs of dedicated nodes.
    pub dedicated_cores: Option<u32>,
    /// `lowPriorityCoreQuota`: vCPUs of Spot/low-priority nodes.
    pub low_priority_cores: Option<u32>,
    /// `dedicatedCoreQuotaPerVMFamilyEnforced`: whether the per-family quotas bind too.
    pub per_family_enforced: bool,
    /// `dedicatedCoreQuotaPerVMFamily`, by family name (`standardDSv5Family`).
    pub dedicated_cores_per_family: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SupportedImage {
    pub node_agent_sku_id: String,
    pub publisher: String,
    pub offer: String,
    pub sku: String,
    /// `linux` or `windows`.
    pub os_type: String,
}

/// A VM size Batch offers in a region, with the quota family its cores count against.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSize {
    pub name: String,
    pub family: String,
    /// `vCPUs`, when Batch says (0 when it does not).
    pub vcpus: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResizeError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolInfo {
    pub id: String,
    /// `vmSize` (what its nodes' cores count at).
    pub vm_size: String,
    pub state: PoolState,
    pub allocation_state: AllocationState,
    pub current_dedicated: u32,
    pub current_low_priority: u32,
    pub target_dedicated: u32,
    pub target_low_priority: u32,
    pub resize_errors: Vec<ResizeError>,
    pub metadata: BTreeMap<String, String>,
    /// `virtualMachineImageId` the pool was built from, if a gallery image.
    pub image_id: Option<String>,
    /// Batch's `creationTime`.
    pub created: Option<time::OffsetDateTime>,
    /// Batch's `allocationStateTransitionTime`: since when the pool has been resizing, or steady
    /// (for a pool scaled to zero, when it was retired).
    pub allocation_changed: Option<time::OffsetDateTime>,
}

/// A Batch account's pools, with Batch's clock at the answer (its `Date`), to age them by.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolList {
    pub pools: Vec<PoolInfo>,
    pub as_of: Option<time::OffsetDateTime>,
}

/// Node counts of one pool by state (dedicated and low-priority added together).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeCounts {
    pub by_state: BTreeMap<String, u32>,
    pub total: u32,
}

impl NodeCounts {
    pub fn get(&self, state: &str) -> u32 {
        self.by_state.get(state).copied().unwrap_or(0)
    }
}

/// A pool to add, built from a gallery image version (Batch's `PoolAddParameter`; `azure::batch`
/// alone renders it as JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolRequest {
    pub id: String,
    pub vm_size: String,
    pub image: GalleryImageVersionId,
    pub node_agent_sku_id: String,
    pub resize_timeout: std::time::Duration,
    pub dedicated_nodes: u32,
    pub low_priority_nodes: u32,
    pub task_slots_per_node: u32,
    pub start_task: Option<StartTaskSpec>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PoolCreated {
    Created,
    /// A pool with that id already exists (Batch's `PoolExists`).
    Exists,
}

#[async_trait]
pub trait AzureApi: Send + Sync {
    async fn get_vm(&self, id: &VmId) -> Result<VmInfo, AzureError>;

    async fn provider_state(&self, subscription: &str, namespace: &str) -> Result<RegistrationState, AzureError>;
    /// The regions `subscription` can use, short names (`westeurope`).
    async fn list_locations(&self, subscription: &str) -> Result<Vec<String>, AzureError>;
    /// The VM sizes Batch offers in `location` for accounts of `subscription`.
    async fn batch_vm_sizes(&self, subscription: &str, location: &str) -> Result<Vec<VmSize>, AzureError>;
    async fn register_provider(&self, subscription: &str, namespace: &str) -> Result<RegistrationState, AzureError>;

    async fn put_snapshot(&self, id: &SnapshotId, request: &SnapshotRequest) -> Result<Accepted, AzureError>;
    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<ResourceState>, AzureError>;
    /// Starts deleting the snapshot; it is gone once `get_snapshot` no longer finds it. Returns
    /// Azure's `Retry-After`, when it gave one: when to look.
    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<Option<std::time::Duration>, AzureError>;

    async fn put_image(&self, id: &ImageId, request: &ImageRequest) -> Result<Accepted, AzureError>;
    async fn get_image(&self, id: &ImageId) -> Result<Option<ResourceState>, AzureError>;
    /// Starts deleting the image; it is gone once `get_image` no longer finds it. Returns Azure's
    /// `Retry-After`, when it gave one: when to look.
    async fn delete_image(&self, id: &ImageId) -> Result<Option<std::time::Duration>, AzureError>;

    async fn get_gallery(&self, id: &GalleryId) -> Result<Option<ResourceState>, AzureError>;
    async fn put_gallery(&self, id: &GalleryId, location: &str, tags: &Tags) -> Result<Accepted, AzureError>;
    async fn get_definition(&self, id: &GalleryImageId) -> Result<Option<DefinitionInfo>, AzureError>;
    async fn put_definition(&self, id: &GalleryImageId, request: &DefinitionRequest) -> Result<Accepted, AzureError>;
    async fn list_versions(&self, definition: &GalleryImageId) -> Result<Vec<ListedVersion>, AzureError>;
    /// Starts deleting the version; it is gone once `get_version` no longer finds it.
    async fn delete_version(&self, id: &GalleryImageVersionId) -> Result<(), AzureError>;
    async fn put_version(&self, id: &GalleryImageVersionId, request: &VersionRequest) -> Result<Accepted, AzureError>;
    async fn get_version(
        &self,
        id: &GalleryImageVersionId,
        expand_replication: bool,
    ) -> Result<Option<VersionInfo>, AzureError>;
    async fn set_exclude_from_latest(&self, id: &GalleryImageVersionId, exclude: bool) -> Result<Accepted, AzureError>;
    /// Replaces the version's target regions (to remove a failed region, or add it back).
    async fn set_target_regions(
        &self,
        id: &GalleryImageVersionId,
        regions: &[TargetRegion],
    ) -> Result<Accepted, AzureError>;

    /// Reads an `Azure-AsyncOperation` status URL.
    async fn operation_status(&self, status_url: &str) -> Result<OperationStatus, AzureError>;

    async fn get_batch_account(&self, id: &BatchAccountId) -> Result<BatchAccountInfo, AzureError>;
    async fn supported_images(&self, account: &BatchAccountInfo) -> Result<Vec<SupportedImage>, AzureError>;
    async fn add_pool(&self, account_url: &str, pool: &PoolRequest) -> Result<PoolCreated, AzureError>;
    async fn get_pool(&self, account_url: &str, pool_id: &str) -> Result<Option<PoolInfo>, AzureError>;
    async fn list_pools(&self, account_url: &str) -> Result<Vec<PoolInfo>, AzureError>;
    /// The pools and Batch's time at the answer. (Without a `Date` header, `as_of` is `None`.)
    async fn list_pools_dated(&self, account_url: &str) -> Result<PoolList, AzureError> {
        Ok(PoolList {
            pools: self.list_pools(account_url).await?,
            as_of: None,
        })
    }
    async fn node_counts(&self, account_url: &str, pool_id: &str) -> Result<NodeCounts, AzureError>;
    async fn resize_pool(
        &self,
        account_url: &str,
        pool_id: &str,
        dedicated: u32,
        low_priority: u32,
    ) -> Result<(), AzureError>;
    /// Replaces the pool's metadata with `metadata`.
    async fn set_pool_metadata(
        &self,
        account_url: &str,
        pool_id: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), AzureError>;
    async fn delete_pool(&self, account_url: &str, pool_id: &str) -> Result<(), AzureError>;
}
