//! The management-plane half of the client: Azure Resource Manager calls for the build VM,
//! provider registration, snapshots, managed images, galleries, image definitions and versions,
//! long-running-operation status and the Batch account. Request bodies follow the saved specs
//! (`azure-specs/NOTES.md` §2); answers are read leniently (absent optional fields get ARM's
//! defaults) but an answer missing what the pipeline needs is an error, not a guess.
//!
//! URLs are only ever built from the typed ids of `model::ids` (validated on parse) or from
//! strings checked here; a status or next-page URL Azure hands back is followed only if it points
//! at the configured resource manager, so a token never goes to another host.

use std::sync::Arc;

use reqwest::{Method, Url};
use serde_json::{Value, json};

use super::api::{
    Accepted, AccountQuotas, DefinitionInfo, DefinitionRequest, ImageRequest, ListedVersion, OperationStatus,
    RegionStatus, ResourceState, SnapshotRequest, Tags, TargetRegion, VersionInfo, VersionRequest, VmInfo, VmSize,
};
use super::config::ApiVersions;
use super::error::AzureError;
use super::http::{Audience, Call, Http, Reply};
use super::states::{ProvisioningState, RegistrationState, ReplicationState};
use crate::model::ids::{
    BatchAccountId, DiskId, GalleryId, GalleryImageId, GalleryImageVersionId, ImageId, SnapshotId, VmId,
    check_subscription,
};

/// Most pages a list is followed through; a loop of `nextLink`s ends here instead of never.
const MAX_PAGES: usize = 200;

/// ARM 404 codes that mean the scope around the resource is missing (a configuration mistake), not
/// the resource: reported as errors even where a missing resource reads as `None`.
const MISSING_SCOPE: &[&str] = &[
    "SubscriptionNotFound",
    "ResourceGroupNotFound",
    "InvalidResourceType",
    "InvalidResourceNamespace",
];

pub struct Arm {
    http: Arc<Http>,
    base: Url,
    versions: ApiVersions,
}

/// The short region name (`westus2`) of a name in either form (`West US 2`).
pub fn canonical_region(name: &str) -> String {
    name.chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase()
}

fn unexpected(operation: &str, reply: &Reply, what: &str) -> AzureError {
    AzureError {
        operation: operation.to_string(),
        status: Some(reply.status),
        code: Some("UnexpectedResponse".into()),
        message: format!("the answer lacks {what}"),
        request_id: super::http::request_id(&reply.headers),
        retry_after: None,
    }
}

fn str_at<'a>(body: &'a Value, pointer: &str) -> Option<&'a str> {
    body.pointer(pointer).and_then(Value::as_str)
}

fn tags_of(body: &Value) -> Tags {
    body.get("tags")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// A gallery image version as a GET or a list answers it.
fn version_info(body: &Value) -> VersionInfo {
    let profile = &body["properties"]["publishingProfile"];
    let default_replicas = profile["replicaCount"].as_u64().unwrap_or(1);
    let target_regions = profile["targetRegions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let replicas = r["regionalReplicaCount"].as_u64().unwrap_or(default_replicas);
            Some((
                canonical_region(r["name"].as_str()?),
                replicas.min(u32::MAX as u64) as u32,
            ))
        })
        .collect();
    let replication = body["properties"]["replicationStatus"]["summary"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            Some(RegionStatus {
                region: canonical_region(s["region"].as_str()?),
                state: ReplicationState::parse(s["state"].as_str().unwrap_or("Unknown")),
                progress: s["progress"].as_u64().unwrap_or(0).min(100) as u8,
                details: s["details"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect();
    VersionInfo {
        provisioning_state: provisioning_state(body),
        exclude_from_latest: profile["excludeFromLatest"].as_bool().unwrap_or(false),
        source: str_at(body, "/properties/storageProfile/source/id").map(str::to_string),
        target_regions,
        replication,
        tags: tags_of(body),
        published: profile["publishedDate"]
            .as_str()
            .and_then(|d| time::OffsetDateTime::parse(d, &time::format_description::well_known::Rfc3339).ok()),
    }
}

/// ARM: a resource without `provisioningState` has succeeded.
fn provisioning_state(body: &Value) -> ProvisioningState {
    str_at(body, "/properties/provisioningState").map_or(ProvisioningState::Succeeded, ProvisioningState::parse)
}

fn accepted(reply: &Reply) -> Accepted {
    Accepted {
        created: matches!(reply.status, 201 | 202),
        provisioning_state: str_at(&reply.body, "/properties/provisioningState").map(ProvisioningState::parse),
        status_url: reply
            .header("azure-asyncoperation")
            .or_else(|| reply.header("location"))
            .map(str::to_string),
        retry_after: reply.retry_after(),
    }
}

/// A resource provider namespace such as `Microsoft.Batch`: dotted words of letters and digits.
fn check_namespace(namespace: &str) -> Result<(), AzureError> {
    let ok = namespace.len() <= 64
        && namespace.contains('.')
        && namespace
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|c| c.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(AzureError::permanent(
            format!("provider {namespace}"),
            "InvalidNamespace",
            format!("`{namespace}` is not a resource provider namespace"),
        ))
    }
}

/// A `SupportedSku` of the Batch management API; `None` without a name.
fn vm_size_of(sku: &Value) -> Option<VmSize> {
    let capability = |name: &str| {
        sku["capabilities"]
            .as_array()?
            .iter()
            .find(|c| c["name"].as_str() == Some(name))?["value"]
            .as_str()
    };
    Some(VmSize {
        name: sku["name"].as_str()?.to_string(),
        family: sku["familyName"].as_str().unwrap_or_default().to_string(),
        vcpus: capability("vCPUs").and_then(|v| v.parse().ok()).unwrap_or(0),
    })
}

impl Arm {
    pub fn new(http: Arc<Http>, base: Url, versions: ApiVersions) -> Arm {
        Arm { http, base, versions }
    }

    /// `{resource manager}{path}?api-version=…&extra…`; `path` comes from a typed id or a checked string.
    fn url(&self, path: &str, api_version: &str, extra: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        let prefix = self.base.path().trim_end_matches('/');
        url.set_path(&format!("{prefix}{path}"));
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("api-version", api_version);
            for (k, v) in extra {
                query.append_pair(k, v);
            }
        }
        url
    }

    /// Whether `url` is one this client may send an ARM token to: the configured resource
    /// manager's scheme, host and port, a path under `/subscriptions/`, no credentials in it.
    pub fn trusted(&self, url: &Url) -> bool {
        let prefix = self.base.path().trim_end_matches('/');
        url.scheme() == self.base.scheme()
            && url.host_str().is_some_and(|h| Some(h) == self.base.host_str())
            && url.port_or_known_default() == self.base.port_or_known_default()
            && url.username().is_empty()
            && url.password().is_none()
            && url.fragment().is_none()
            && url.path().starts_with(&format!("{prefix}/subscriptions/"))
    }

    fn check_followed(&self, operation: &str, text: &str) -> Result<Url, AzureError> {
        let refuse = |why: &str| {
            AzureError::permanent(
                operation,
                "UntrustedUrl",
                format!("refusing to send a token to `{text}`: {why}"),
            )
        };
        let url = Url::parse(text).map_err(|e| refuse(&format!("not a URL ({e})")))?;
        if !self.trusted(&url) {
            return Err(refuse(&format!(
                "it is not a /subscriptions/ URL on the configured resource manager {}",
                self.base.origin().ascii_serialization()
            )));
        }
        Ok(url)
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        operation: String,
        body: Option<&Value>,
    ) -> Result<Reply, AzureError> {
        let mut call = Call::new(method, url, Audience::Arm, operation);
        if let Some(body) = body {
            call = call.body(body);
        }
        self.http.send(&call).await
    }

    /// GET where a missing resource is an answer, not an error.
    async fn get_optional(&self, url: Url, operation: String) -> Result<Option<Reply>, AzureError> {
        match self.send(Method::GET, url, operation, None).await {
            Ok(reply) => Ok(Some(reply)),
            Err(e) if e.is_not_found() && !e.code.as_deref().is_some_and(|c| MISSING_SCOPE.contains(&c)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn put(&self, url: Url, operation: String, body: &Value) -> Result<Accepted, AzureError> {
        let reply = self.send(Method::PUT, url, operation, Some(body)).await?;
        Ok(accepted(&reply))
    }

    async fn patch(&self, url: Url, operation: String, body: &Value) -> Result<Accepted, AzureError> {
        let reply = self.send(Method::PATCH, url, operation, Some(body)).await?;
        Ok(accepted(&reply))
    }

    pub async fn get_vm(&self, id: &VmId) -> Result<VmInfo, AzureError> {
        let operation = format!("GET virtual machine {}", id.name());
        let url = self.url(&id.to_string(), &self.versions.compute, &[("$expand", "instanceView")]);
        let reply = self.send(Method::GET, url, operation.clone(), None).await?;
        let vm = &reply.body;
        let location = str_at(vm, "/location").ok_or_else(|| unexpected(&operation, &reply, "location"))?;
        let storage = vm
            .pointer("/properties/storageProfile")
            .ok_or_else(|| unexpected(&operation, &reply, "properties.storageProfile"))?;
        let os_type =
            str_at(storage, "/osDisk/osType").ok_or_else(|| unexpected(&operation, &reply, "osDisk.osType"))?;
        let disk = |pointer: &str| -> Result<Option<DiskId>, AzureError> {
            match str_at(storage, pointer) {
                None => Ok(None),
                Some(text) => DiskId::parse(text)
                    .map(Some)
                    .map_err(|e| unexpected(&operation, &reply, &format!("a valid disk id ({e})"))),
            }
        };
        let os_disk = disk("/osDisk/managedDisk/id")?;
        let mut data_disks = Vec::new();
        for (i, data) in storage["dataDisks"].as_array().into_iter().flatten().enumerate() {
            let lun = data["lun"]
                .as_u64()
                .and_then(|l| u32::try_from(l).ok())
                .ok_or_else(|| unexpected(&operation, &reply, &format!("dataDisks[{i}].lun")))?;
            data_disks.push((lun, disk(&format!("/dataDisks/{i}/managedDisk/id"))?));
        }
        let image = &storage["imageReference"];
        let base_image = match (
            image["publisher"].as_str(),
            image["offer"].as_str(),
            image["sku"].as_str(),
        ) {
            (Some(p), Some(o), Some(s)) => Some((p.to_string(), o.to_string(), s.to_string())),
            _ => None,
        };
        let hyper_v_generation = str_at(vm, "/properties/instanceView/hyperVGeneration").map(str::to_string);

        let operation = format!("GET extensions of virtual machine {}", id.name());
        let url = self.url(&format!("{id}/extensions"), &self.versions.compute, &[]);
        let reply = self.send(Method::GET, url, operation, None).await?;
        let extensions = reply.body["value"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["name"].as_str().map(str::to_string))
            .collect();
        Ok(VmInfo {
            location: location.to_string(),
            os_type: os_type.to_string(),
            hyper_v_generation,
            base_image,
            os_disk,
            data_disks,
            extensions,
        })
    }

    fn provider_url(&self, subscription: &str, namespace: &str, register: bool) -> Result<Url, AzureError> {
        check_subscription(subscription, subscription).map_err(|e| {
            AzureError::permanent(format!("provider {namespace}"), "InvalidSubscriptionId", e.to_string())
        })?;
        check_namespace(namespace)?;
        let suffix = if register { "/register" } else { "" };
        Ok(self.url(
            &format!("/subscriptions/{subscription}/providers/{namespace}{suffix}"),
            &self.versions.resources,
            &[],
        ))
    }

    fn registration_state(operation: &str, reply: &Reply) -> Result<RegistrationState, AzureError> {
        str_at(&reply.body, "/registrationState")
            .map(RegistrationState::parse)
            .ok_or_else(|| unexpected(operation, reply, "registrationState"))
    }

    pub async fn provider_state(&self, subscription: &str, namespace: &str) -> Result<RegistrationState, AzureError> {
        let url = self.provider_url(subscription, namespace, false)?;
        let operation = format!("GET provider {namespace} in {subscription}");
        let reply = self.send(Method::GET, url, operation.clone(), None).await?;
        Self::registration_state(&operation, &reply)
    }

    pub async fn register_provider(
        &self,
        subscription: &str,
        namespace: &str,
    ) -> Result<RegistrationState, AzureError> {
        let url = self.provider_url(subscription, namespace, true)?;
        let operation = format!("register provider {namespace} in {subscription}");
        let reply = self.send(Method::POST, url, operation.clone(), None).await?;
        Self::registration_state(&operation, &reply)
    }

    fn subscription_checked(subscription: &str, operation: &str) -> Result<(), AzureError> {
        check_subscription(subscription, subscription)
            .map_err(|e| AzureError::permanent(operation, "InvalidSubscriptionId", e.to_string()))
    }

    /// Every `value` item of a paged ARM list, following `nextLink` on this resource manager only.
    async fn list_all(&self, mut url: Url, operation: &str) -> Result<Vec<Value>, AzureError> {
        let mut items = Vec::new();
        for _ in 0..MAX_PAGES {
            let reply = self.send(Method::GET, url, operation.to_string(), None).await?;
            // The saved example of List Locations shows a bare array; the service wraps it in `value`.
            let page = match &reply.body {
                Value::Array(items) => items.clone(),
                body => body["value"].as_array().cloned().unwrap_or_default(),
            };
            items.extend(page);
            match reply.body["nextLink"].as_str() {
                Some(next) if !next.is_empty() => url = self.check_followed(operation, next)?,
                _ => return Ok(items),
            }
        }
        Err(AzureError::permanent(
            operation,
            "TooManyPages",
            format!("more than {MAX_PAGES} pages"),
        ))
    }

    pub async fn list_locations(&self, subscription: &str) -> Result<Vec<String>, AzureError> {
        let operation = format!("list locations of {subscription}");
        Self::subscription_checked(subscription, &operation)?;
        let url = self.url(
            &format!("/subscriptions/{subscription}/locations"),
            &self.versions.subscriptions,
            &[],
        );
        let items = self.list_all(url, &operation).await?;
        Ok(items
            .iter()
            .filter_map(|l| l["name"].as_str().map(canonical_region))
            .collect())
    }

    pub async fn batch_vm_sizes(&self, subscription: &str, location: &str) -> Result<Vec<VmSize>, AzureError> {
        let operation = format!("list Batch VM sizes in {location}");
        Self::subscription_checked(subscription, &operation)?;
        let location = canonical_region(location);
        if location.is_empty() || location.len() > 64 || !location.bytes().all(|c| c.is_ascii_alphanumeric()) {
            return Err(AzureError::permanent(
                operation,
                "InvalidLocation",
                "a region name is letters and digits".to_string(),
            ));
        }
        let url = self.url(
            &format!("/subscriptions/{subscription}/providers/Microsoft.Batch/locations/{location}/virtualMachineSkus"),
            &self.versions.batch_management,
            &[],
        );
        let items = self.list_all(url, &operation).await?;
        Ok(items.iter().filter_map(vm_size_of).collect())
    }

    pub async fn put_snapshot(&self, id: &SnapshotId, request: &SnapshotRequest) -> Result<Accepted, AzureError> {
        let body = json!({
            "location": request.location,
            "tags": request.tags,
            "properties": {
                // A full (not incremental) copy: managed images are made from full snapshots.
                "creationData": {"createOption": "Copy", "sourceResourceId": request.source.to_string()},
                "incremental": false,
            },
        });
        let url = self.url(&id.to_string(), &self.versions.disk, &[]);
        self.put(url, format!("PUT snapshot {}", id.name()), &body).await
    }

    async fn resource_state(
        &self,
        path: String,
        api_version: &str,
        operation: String,
    ) -> Result<Option<ResourceState>, AzureError> {
        let reply = self.get_optional(self.url(&path, api_version, &[]), operation).await?;
        Ok(reply.map(|r| ResourceState {
            provisioning_state: provisioning_state(&r.body),
            tags: tags_of(&r.body),
        }))
    }

    pub async fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<ResourceState>, AzureError> {
        self.resource_state(
            id.to_string(),
            &self.versions.disk,
            format!("GET snapshot {}", id.name()),
        )
        .await
    }

    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<Option<std::time::Duration>, AzureError> {
        let url = self.url(&id.to_string(), &self.versions.disk, &[]);
        self.delete(url, format!("DELETE snapshot {}", id.name())).await
    }

    pub async fn delete_image(&self, id: &ImageId) -> Result<Option<std::time::Duration>, AzureError> {
        let url = self.url(&id.to_string(), &self.versions.compute, &[]);
        self.delete(url, format!("DELETE image {}", id.name())).await
    }

    pub async fn delete_version(&self, id: &GalleryImageVersionId) -> Result<(), AzureError> {
        let url = self.url(&id.to_string(), &self.versions.gallery, &[]);
        self.delete(url, format!("DELETE image version {}", id.name()))
            .await
            .map(|_| ())
    }

    /// Starts a delete. Azure answers 200/204 (gone) or 202 (deleting: the caller confirms by
    /// reading the resource until it is not found, no sooner than the `Retry-After` returned);
    /// already gone is what a delete wants.
    async fn delete(&self, url: Url, operation: String) -> Result<Option<std::time::Duration>, AzureError> {
        match self.send(Method::DELETE, url, operation, None).await {
            Err(e) if e.is_not_found() => Ok(None),
            other => other.map(|reply| reply.retry_after()),
        }
    }

    pub async fn put_image(&self, id: &ImageId, request: &ImageRequest) -> Result<Accepted, AzureError> {
        let data_disks: Vec<Value> = request
            .data_snapshots
            .iter()
            .map(|(lun, snapshot)| json!({"lun": lun, "snapshot": {"id": snapshot.to_string()}}))
            .collect();
        let body = json!({
            "location": request.location,
            "tags": request.tags,
            "properties": {
                "hyperVGeneration": request.hyper_v_generation,
                "storageProfile": {
                    "osDisk": {
                        "osType": request.os_type,
                        // Batch only takes generalized images and specialized definitions are
                        // refused before the build starts, so the image is always generalized.
                        "osState": "Generalized",
                        "snapshot": {"id": request.os_snapshot.to_string()},
                    },
                    "dataDisks": data_disks,
                },
            },
        });
        let url = self.url(&id.to_string(), &self.versions.compute, &[]);
        self.put(url, format!("PUT image {}", id.name()), &body).await
    }

    pub async fn get_image(&self, id: &ImageId) -> Result<Option<ResourceState>, AzureError> {
        self.resource_state(
            id.to_string(),
            &self.versions.compute,
            format!("GET image {}", id.name()),
        )
        .await
    }

    pub async fn get_gallery(&self, id: &GalleryId) -> Result<Option<ResourceState>, AzureError> {
        self.resource_state(
            id.to_string(),
            &self.versions.gallery,
            format!("GET gallery {}", id.name()),
        )
        .await
    }

    pub async fn put_gallery(&self, id: &GalleryId, location: &str, tags: &Tags) -> Result<Accepted, AzureError> {
        let body = json!({"location": location, "tags": tags, "properties": {}});
        let url = self.url(&id.to_string(), &self.versions.gallery, &[]);
        self.put(url, format!("PUT gallery {}", id.name()), &body).await
    }

    pub async fn get_definition(&self, id: &GalleryImageId) -> Result<Option<DefinitionInfo>, AzureError> {
        let operation = format!("GET image definition {}", id.name());
        let url = self.url(&id.to_string(), &self.versions.gallery, &[]);
        let Some(reply) = self.get_optional(url, operation.clone()).await? else {
            return Ok(None);
        };
        let props = &reply.body["properties"];
        let field = |name: &str| -> Result<String, AzureError> {
            str_at(props, name)
                .map(str::to_string)
                .ok_or_else(|| unexpected(&operation, &reply, &format!("properties{}", name.replace('/', "."))))
        };
        Ok(Some(DefinitionInfo {
            provisioning_state: provisioning_state(&reply.body),
            os_type: field("/osType")?,
            os_state: field("/osState")?,
            // ARM's default when a definition was made without one.
            hyper_v_generation: str_at(props, "/hyperVGeneration").unwrap_or("V1").to_string(),
            publisher: field("/identifier/publisher")?,
            offer: field("/identifier/offer")?,
            sku: field("/identifier/sku")?,
            tags: tags_of(&reply.body),
        }))
    }

    pub async fn put_definition(
        &self,
        id: &GalleryImageId,
        request: &DefinitionRequest,
    ) -> Result<Accepted, AzureError> {
        let body = json!({
            "location": request.location,
            "tags": request.tags,
            "properties": {
                "osType": request.os_type,
                "osState": request.os_state,
                "hyperVGeneration": request.hyper_v_generation,
                "identifier": {"publisher": request.publisher, "offer": request.offer, "sku": request.sku},
            },
        });
        let url = self.url(&id.to_string(), &self.versions.gallery, &[]);
        self.put(url, format!("PUT image definition {}", id.name()), &body)
            .await
    }

    pub async fn list_versions(&self, definition: &GalleryImageId) -> Result<Vec<ListedVersion>, AzureError> {
        let operation = format!("list versions of {}", definition.name());
        let url = self.url(&format!("{definition}/versions"), &self.versions.gallery, &[]);
        let items = self.list_all(url, &operation).await?;
        Ok(items
            .iter()
            .filter_map(|v| {
                Some(ListedVersion {
                    name: v["name"].as_str()?.to_string(),
                    info: version_info(v),
                })
            })
            .collect())
    }

    fn target_regions(regions: &[TargetRegion]) -> Vec<Value> {
        regions
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "regionalReplicaCount": r.replicas,
                    "storageAccountType": r.storage_account_type,
                })
            })
            .collect()
    }

    pub async fn put_version(
        &self,
        id: &GalleryImageVersionId,
        request: &VersionRequest,
    ) -> Result<Accepted, AzureError> {
        let mut publishing = json!({
            "targetRegions": Self::target_regions(&request.regions),
            "storageAccountType": request.storage_account_type,
            "excludeFromLatest": request.exclude_from_latest,
        });
        if let Some(end_of_life) = &request.end_of_life {
            publishing["endOfLifeDate"] = json!(end_of_life);
        }
        let body = json!({
            "location": request.location,
            "tags": request.tags,
            "properties": {
                "publishingProfile": publishing,
                "storageProfile": {"source": {"id": request.source.to_string()}},
            },
        });
        let url = self.url(&id.to_string(), &self.versions.gallery, &[]);
        self.put(url, format!("PUT image version {}", id.name()), &body).await
    }

    pub async fn get_version(
        &self,
        id: &GalleryImageVersionId,
        expand_replication: bool,
    ) -> Result<Option<VersionInfo>, AzureError> {
        let operation = format!("GET image version {}", id.name());
        let extra: &[(&str, &str)] = if expand_replication {
            &[("$expand", "ReplicationStatus")]
        } else {
            &[]
        };
        let url = self.url(&id.to_string(), &self.versions.gallery, extra);
        let Some(reply) = self.get_optional(url, operation).await? else {
            return Ok(None);
        };
        Ok(Some(version_info(&reply.body)))
    }

    pub async fn set_exclude_from_latest(
        &self,
        id: &GalleryImageVersionId,
        exclude: bool,
    ) -> Result<Accepted, AzureError> {
        let body = json!({"properties": {"publishingProfile": {"excludeFromLatest": exclude}}});
        let url = self.url(&id.to_string(), &self.versions.gallery, &[]);
        self.patch(
            url,
            format!("PATCH image version {} excludeFromLatest", id.name()),
            &body,
        )
        .await
    }

    pub async fn set_target_regions(
        &self,
        id: &GalleryImageVersionId,
        regions: &[TargetRegion],
    ) -> Result<Accepted, AzureError> {
        // A merge patch replaces arrays whole: this is the new list of regions, not an addition.
        let body = json!({"properties": {"publishingProfile": {"targetRegions": Self::target_regions(regions)}}});
        let url = self.url(&id.to_string(), &self.versions.gallery, &[]);
        self.patch(url, format!("PATCH image version {} targetRegions", id.name()), &body)
            .await
    }

    /// Reads an `Azure-AsyncOperation` URL (or, when Azure gave only that, a `Location` URL:
    /// 202 while running, the final answer when done).
    pub async fn operation_status(&self, status_url: &str) -> Result<OperationStatus, AzureError> {
        let operation = "GET operation status".to_string();
        // Checked before anything is sent, the token request included.
        let url = self.check_followed(&operation, status_url)?;
        let reply = self.send(Method::GET, url, operation, None).await?;
        let Some(status) = reply.body.get("status").and_then(Value::as_str) else {
            return Ok(if reply.status == 202 {
                OperationStatus::InProgress {
                    retry_after: reply.retry_after(),
                }
            } else {
                OperationStatus::Succeeded
            });
        };
        let failed = |default_code: &str| {
            let error = &reply.body["error"];
            OperationStatus::Failed {
                code: error["code"].as_str().unwrap_or(default_code).to_string(),
                message: error["message"]
                    .as_str()
                    .unwrap_or("the operation ended without saying why")
                    .to_string(),
            }
        };
        Ok(match status.to_ascii_lowercase().as_str() {
            "succeeded" => OperationStatus::Succeeded,
            "failed" => failed("Failed"),
            "canceled" | "cancelled" => failed("Canceled"),
            // InProgress, or any other non-terminal value an RP invents.
            _ => OperationStatus::InProgress {
                retry_after: reply.retry_after(),
            },
        })
    }

    /// The account's region and data-plane URL (not yet checked: the Batch half does that).
    /// The account's region, data-plane URL and quotas.
    pub async fn get_batch_account(&self, id: &BatchAccountId) -> Result<(String, String, AccountQuotas), AzureError> {
        let operation = format!("GET Batch account {}", id.name());
        let url = self.url(&id.to_string(), &self.versions.batch_management, &[]);
        let reply = self.send(Method::GET, url, operation.clone(), None).await?;
        let location = str_at(&reply.body, "/location").ok_or_else(|| unexpected(&operation, &reply, "location"))?;
        let endpoint = str_at(&reply.body, "/properties/accountEndpoint")
            .ok_or_else(|| unexpected(&operation, &reply, "properties.accountEndpoint"))?;
        // The endpoint comes without a scheme; the resource manager's tells whether this is the
        // plain-HTTP emulator.
        let url = format!("{}://{}", self.base.scheme(), endpoint.trim_end_matches('/'));
        Ok((canonical_region(location), url, quotas_of(&reply.body["properties"])))
    }
}

/// A Batch account's quotas from its properties; a missing or non-numeric one is unknown.
fn quotas_of(properties: &Value) -> AccountQuotas {
    let count = |value: &Value| value.as_u64().map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    AccountQuotas {
        pools: count(&properties["poolQuota"]),
        dedicated_cores: count(&properties["dedicatedCoreQuota"]),
        low_priority_cores: count(&properties["lowPriorityCoreQuota"]),
        per_family_enforced: properties["dedicatedCoreQuotaPerVMFamilyEnforced"]
            .as_bool()
            .unwrap_or(false),
        dedicated_cores_per_family: properties["dedicatedCoreQuotaPerVMFamily"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|family| Some((family["name"].as_str()?.to_string(), count(&family["coreQuota"])?)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn account_quotas_are_read_and_unknown_ones_stay_unknown() {
        let properties = json!({
            "poolQuota": 20, "dedicatedCoreQuota": 500, "lowPriorityCoreQuota": "many",
            "dedicatedCoreQuotaPerVMFamilyEnforced": true,
            "dedicatedCoreQuotaPerVMFamily": [{"name": "standardDSv5Family", "coreQuota": 96}, {"name": "x"}],
        });
        let quotas = quotas_of(&properties);
        assert_eq!(
            (quotas.pools, quotas.dedicated_cores, quotas.low_priority_cores),
            (Some(20), Some(500), None)
        );
        assert!(quotas.per_family_enforced);
        assert_eq!(
            quotas.dedicated_cores_per_family,
            BTreeMap::from([("standardDSv5Family".to_string(), 96)])
        );
        assert_eq!(quotas_of(&json!({"poolQuota": 1u64 << 40})).pools, Some(u32::MAX));
        assert_eq!(quotas_of(&Value::Null), AccountQuotas::default());
    }

    #[test]
    fn regions_are_canonical() {
        assert_eq!(canonical_region("West US 2"), "westus2");
        assert_eq!(canonical_region("westeurope"), "westeurope");
        assert_eq!(canonical_region(" Southeast Asia "), "southeastasia");
    }

    #[test]
    fn namespaces() {
        assert!(check_namespace("Microsoft.Batch").is_ok());
        assert!(check_namespace("Microsoft.Compute").is_ok());
        assert!(check_namespace("Microsoft").is_err());
        assert!(check_namespace("Microsoft.Batch/../x").is_err());
        assert!(check_namespace("Microsoft..Batch").is_err());
    }
}
