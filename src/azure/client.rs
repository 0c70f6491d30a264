//! `AzureClient`: the REST implementation of `AzureApi`. It wires the pieces together — settings,
//! the one reqwest client, the credential, the retrying sender — and hands each operation to the
//! ARM or the Batch half. Build it once per process and share it: it is cheap to clone.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use reqwest::Url;

use super::api::{
    Accepted, AzureApi, BatchAccountInfo, DefinitionInfo, DefinitionRequest, ImageRequest, ListedVersion, NodeCounts,
    OperationStatus, PoolCreated, PoolInfo, PoolList, PoolRequest, ResourceState, SnapshotRequest, SupportedImage,
    Tags, TargetRegion, VersionInfo, VersionRequest, VmInfo, VmSize,
};
use super::arm::Arm;
use super::batch::Batch;
use super::catalog::Catalog;
use super::config::{AzureSettings, SettingsError};
use super::error::AzureError;
use super::http::{Http, build_client};
use super::metrics::{AzureMetrics, named};
use super::states::RegistrationState;
use crate::model::ids::{BatchAccountId, GalleryId, GalleryImageId, GalleryImageVersionId, ImageId, SnapshotId, VmId};

#[derive(Clone)]
pub struct AzureClient {
    arm: Arc<Arm>,
    batch: Arc<Batch>,
    resource_manager: Url,
    credential_kind: &'static str,
    http: Arc<Http>,
    catalog: Arc<Catalog>,
}

impl fmt::Debug for AzureClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureClient")
            .field("resource_manager", &self.resource_manager.as_str())
            .field("credential", &self.credential_kind)
            .finish_non_exhaustive()
    }
}

impl AzureClient {
    /// A client for `settings`, with the credential they describe.
    pub fn new(settings: &AzureSettings) -> Result<AzureClient, SettingsError> {
        settings.validate()?;
        let client = build_client(settings)?;
        let credential = super::auth::credential(settings, &client)?;
        Ok(AzureClient::assemble(
            settings,
            client,
            credential,
            settings.credential.kind(),
        ))
    }

    /// A client for `settings` that gets its tokens from `credential` instead of building one
    /// (`settings.credential` is then ignored).
    pub fn with_credential(
        settings: &AzureSettings,
        credential: Arc<dyn TokenCredential>,
    ) -> Result<AzureClient, SettingsError> {
        settings.validate()?;
        let client = build_client(settings)?;
        Ok(AzureClient::assemble(settings, client, credential, "custom"))
    }

    fn assemble(
        settings: &AzureSettings,
        client: reqwest::Client,
        credential: Arc<dyn TokenCredential>,
        credential_kind: &'static str,
    ) -> AzureClient {
        let resource_manager = settings.resource_manager_url().expect("validated");
        let http = Arc::new(Http::new(client, credential, settings));
        AzureClient {
            arm: Arc::new(Arm::new(
                http.clone(),
                resource_manager.clone(),
                settings.api_versions.clone(),
            )),
            batch: Arc::new(Batch::new(
                http.clone(),
                settings.api_versions.batch.clone(),
                settings.cloud.batch_endpoint_suffix.clone(),
                resource_manager.clone(),
            )),
            resource_manager,
            credential_kind,
            http,
            catalog: Arc::default(),
        }
    }

    /// Counts every request this client (and every clone of it) makes from now on, and what it
    /// waited for, in `metrics`. The first call wins.
    pub fn set_metrics(&self, metrics: Arc<AzureMetrics>) {
        self.http.set_metrics(metrics);
    }

    /// Gets a Resource Manager token (cached by the credential): can this process call Azure now?
    /// What readiness checks; the error names the scope and Entra's code, never a secret.
    pub async fn check_token(&self) -> Result<(), AzureError> {
        self.http.check_token(super::http::Audience::Arm).await
    }
}

#[async_trait]
impl AzureApi for AzureClient {
    async fn get_vm(&self, id: &VmId) -> Result<VmInfo, AzureError> {
        named("get_vm", self.arm.get_vm(id)).await
    }

    async fn provider_state(&self, subscription: &str, namespace: &str) -> Result<RegistrationState, AzureError> {
        named("provider_state", self.arm.provider_state(subscription, namespace)).await
    }

    async fn list_locations(&self, subscription: &str) -> Result<Vec<String>, AzureError> {
        let read = named("list_locations", self.arm.list_locations(subscription));
        self.catalog.locations(subscription, read).await
    }

    async fn batch_vm_sizes(&self, subscription: &str, location: &str) -> Result<Vec<VmSize>, AzureError> {
        let read = named("batch_vm_sizes", self.arm.batch_vm_sizes(subscription, location));
        self.catalog.vm_sizes(subscription, location, read).await
    }

    async fn register_provider(&self, subscription: &str, namespace: &str) -> Result<RegistrationState, AzureError> {
        named("register_provider", self.arm.register_provider(subscription, namespace)).await
    }

    async fn put_snapshot(&self, id: &SnapshotId, request: &SnapshotRequest) -> Result<Accepted, AzureError> {
        named("put_snapshot", self.arm.put_snapshot(id, request)).await
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<ResourceState>, AzureError> {
        named("get_snapshot", self.arm.get_snapshot(id)).await
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<Option<std::time::Duration>, AzureError> {
        named("delete_snapshot", self.arm.delete_snapshot(id)).await
    }

    async fn put_image(&self, id: &ImageId, request: &ImageRequest) -> Result<Accepted, AzureError> {
        named("put_image", self.arm.put_image(id, request)).await
    }

    async fn get_image(&self, id: &ImageId) -> Result<Option<ResourceState>, AzureError> {
        named("get_image", self.arm.get_image(id)).await
    }

    async fn delete_image(&self, id: &ImageId) -> Result<Option<std::time::Duration>, AzureError> {
        named("delete_image", self.arm.delete_image(id)).await
    }

    async fn get_gallery(&self, id: &GalleryId) -> Result<Option<ResourceState>, AzureError> {
        named("get_gallery", self.arm.get_gallery(id)).await
    }

    async fn put_gallery(&self, id: &GalleryId, location: &str, tags: &Tags) -> Result<Accepted, AzureError> {
        named("put_gallery", self.arm.put_gallery(id, location, tags)).await
    }

    async fn get_definition(&self, id: &GalleryImageId) -> Result<Option<DefinitionInfo>, AzureError> {
        named("get_definition", self.arm.get_definition(id)).await
    }

    async fn put_definition(&self, id: &GalleryImageId, request: &DefinitionRequest) -> Result<Accepted, AzureError> {
        named("put_definition", self.arm.put_definition(id, request)).await
    }

    async fn list_versions(&self, definition: &GalleryImageId) -> Result<Vec<ListedVersion>, AzureError> {
        named("list_versions", self.arm.list_versions(definition)).await
    }

    async fn delete_version(&self, id: &GalleryImageVersionId) -> Result<(), AzureError> {
        named("delete_version", self.arm.delete_version(id)).await
    }

    async fn put_version(&self, id: &GalleryImageVersionId, request: &VersionRequest) -> Result<Accepted, AzureError> {
        named("put_version", self.arm.put_version(id, request)).await
    }

    async fn get_version(
        &self,
        id: &GalleryImageVersionId,
        expand_replication: bool,
    ) -> Result<Option<VersionInfo>, AzureError> {
        named("get_version", self.arm.get_version(id, expand_replication)).await
    }

    async fn set_exclude_from_latest(&self, id: &GalleryImageVersionId, exclude: bool) -> Result<Accepted, AzureError> {
        named("set_exclude_from_latest", self.arm.set_exclude_from_latest(id, exclude)).await
    }

    async fn set_target_regions(
        &self,
        id: &GalleryImageVersionId,
        regions: &[TargetRegion],
    ) -> Result<Accepted, AzureError> {
        named("set_target_regions", self.arm.set_target_regions(id, regions)).await
    }

    async fn operation_status(&self, status_url: &str) -> Result<OperationStatus, AzureError> {
        named("operation_status", self.arm.operation_status(status_url)).await
    }

    async fn get_batch_account(&self, id: &BatchAccountId) -> Result<BatchAccountInfo, AzureError> {
        let (location, url, quotas) = named("get_batch_account", self.arm.get_batch_account(id)).await?;
        // Checked now, so a bad endpoint fails here rather than on the first pool call.
        let checked = self.batch.account(&url)?;
        Ok(BatchAccountInfo {
            id: id.clone(),
            location,
            url: checked.as_str().trim_end_matches('/').to_string(),
            quotas,
        })
    }

    async fn supported_images(&self, account: &BatchAccountInfo) -> Result<Vec<SupportedImage>, AzureError> {
        named("supported_images", self.batch.supported_images(&account.url)).await
    }

    async fn add_pool(&self, account_url: &str, pool: &PoolRequest) -> Result<PoolCreated, AzureError> {
        named("add_pool", self.batch.add_pool(account_url, pool)).await
    }

    async fn get_pool(&self, account_url: &str, pool_id: &str) -> Result<Option<PoolInfo>, AzureError> {
        named("get_pool", self.batch.get_pool(account_url, pool_id)).await
    }

    async fn list_pools(&self, account_url: &str) -> Result<Vec<PoolInfo>, AzureError> {
        Ok(self.list_pools_dated(account_url).await?.pools)
    }

    async fn list_pools_dated(&self, account_url: &str) -> Result<PoolList, AzureError> {
        named("list_pools", self.batch.list_pools(account_url)).await
    }

    async fn node_counts(&self, account_url: &str, pool_id: &str) -> Result<NodeCounts, AzureError> {
        named("node_counts", self.batch.node_counts(account_url, pool_id)).await
    }

    async fn resize_pool(
        &self,
        account_url: &str,
        pool_id: &str,
        dedicated: u32,
        low_priority: u32,
    ) -> Result<(), AzureError> {
        named(
            "resize_pool",
            self.batch.resize_pool(account_url, pool_id, dedicated, low_priority),
        )
        .await
    }

    async fn set_pool_metadata(
        &self,
        account_url: &str,
        pool_id: &str,
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), AzureError> {
        named(
            "set_pool_metadata",
            self.batch.set_pool_metadata(account_url, pool_id, metadata),
        )
        .await
    }

    async fn delete_pool(&self, account_url: &str, pool_id: &str) -> Result<(), AzureError> {
        named("delete_pool", self.batch.delete_pool(account_url, pool_id)).await
    }
}
