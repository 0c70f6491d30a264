//! The Batch data-plane half of the client: supported images, pools (add, get, list, resize,
//! delete) and node counts, with Azure AD tokens for `https://batch.core.windows.net/` (Shared Key
//! is never used: Batch refuses it for pools built from gallery images).
//!
//! Account URLs arrive as strings (they travel in messages), so each is checked before a token is
//! sent to it: https (plain http only when the resource manager is the plain-HTTP emulator), no
//! credentials, query or fragment, and a host that is a Batch endpoint of the configured cloud
//! (`*.batch.azure.com`) or the resource manager's own origin (where the emulator serves Batch).
//! Pool ids must pass `pool_id_ok`; next-page links are followed only within the same account.

use std::collections::BTreeMap;
use std::sync::Arc;

use reqwest::{Method, Url};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{NodeCounts, PoolCreated, PoolInfo, PoolList, PoolRequest, ResizeError, SupportedImage};
use super::error::AzureError;
use super::http::{Audience, Call, Http, Reply};
use super::states::{AllocationState, PoolState};
use crate::model::ids::pool_id_ok;
use crate::model::rules::min_resize_timeout;

/// Batch's `PoolAddParameter` for `pool`: the gallery image version as `virtualMachineImageId`,
/// the start task run as the pool's auto-user.
fn pool_add_body(pool: &PoolRequest) -> Value {
    let mut body = json!({
        "id": pool.id,
        "vmSize": pool.vm_size,
        "virtualMachineConfiguration": {
            "imageReference": {"virtualMachineImageId": pool.image.to_string()},
            "nodeAgentSKUId": pool.node_agent_sku_id,
        },
        "resizeTimeout": iso_duration(pool.resize_timeout),
        "targetDedicatedNodes": pool.dedicated_nodes,
        "targetLowPriorityNodes": pool.low_priority_nodes,
        "taskSlotsPerNode": pool.task_slots_per_node,
        "metadata": pool.metadata.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
    });
    if let Some(task) = &pool.start_task {
        let elevation = if task.elevated { "admin" } else { "nonadmin" };
        body["startTask"] = json!({
            "commandLine": task.command_line,
            "waitForSuccess": task.wait_for_success,
            "maxTaskRetryCount": task.max_task_retry_count,
            "userIdentity": {"autoUser": {"scope": "pool", "elevationLevel": elevation}},
        });
    }
    body
}

/// ISO 8601 duration as Batch takes it (`PT30M`).
fn iso_duration(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    if secs.is_multiple_of(60) {
        format!("PT{}M", secs / 60)
    } else {
        format!("PT{secs}S")
    }
}

/// Most pages a list is followed through.
const MAX_PAGES: usize = 200;

pub struct Batch {
    http: Arc<Http>,
    api_version: String,
    endpoint_suffix: String,
    /// The resource manager's base: its origin may serve Batch too (the emulator), and its scheme
    /// says whether plain http is allowed.
    arm_base: Url,
}

/// The `$select` of every pool read: the fields [`CloudPool`] reads, and no others. A pool as
/// Batch renders it carries its start task, network and scheduling settings besides; an account's
/// list of a hundred pools is then hundreds of kilobytes that every rollout, retention survey and
/// quota check would fetch and parse (Batch's advice for lists: select what is used).
const POOL_SELECT: &str = "id,vmSize,state,allocationState,allocationStateTransitionTime,creationTime,\
currentDedicatedNodes,currentLowPriorityNodes,targetDedicatedNodes,targetLowPriorityNodes,resizeErrors,metadata,\
virtualMachineConfiguration";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CloudPool {
    id: String,
    #[serde(default)]
    vm_size: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    allocation_state: String,
    #[serde(default)]
    current_dedicated_nodes: u32,
    #[serde(default)]
    current_low_priority_nodes: u32,
    #[serde(default)]
    target_dedicated_nodes: u32,
    #[serde(default)]
    target_low_priority_nodes: u32,
    #[serde(default)]
    resize_errors: Vec<CloudResizeError>,
    #[serde(default)]
    metadata: Vec<MetadataItem>,
    #[serde(default)]
    virtual_machine_configuration: Option<VmConfiguration>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    creation_time: Option<time::OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    allocation_state_transition_time: Option<time::OffsetDateTime>,
}

#[derive(Deserialize)]
struct CloudResizeError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct MetadataItem {
    name: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VmConfiguration {
    #[serde(default)]
    image_reference: Option<ImageReference>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageReference {
    #[serde(default)]
    virtual_machine_image_id: Option<String>,
    #[serde(default)]
    publisher: Option<String>,
    #[serde(default)]
    offer: Option<String>,
    #[serde(default)]
    sku: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageInformation {
    #[serde(rename = "nodeAgentSKUId")]
    node_agent_sku_id: String,
    image_reference: ImageReference,
    #[serde(default)]
    os_type: String,
}

impl From<CloudPool> for PoolInfo {
    fn from(p: CloudPool) -> PoolInfo {
        PoolInfo {
            id: p.id,
            vm_size: p.vm_size,
            state: PoolState::parse(&p.state),
            allocation_state: AllocationState::parse(&p.allocation_state),
            current_dedicated: p.current_dedicated_nodes,
            current_low_priority: p.current_low_priority_nodes,
            target_dedicated: p.target_dedicated_nodes,
            target_low_priority: p.target_low_priority_nodes,
            resize_errors: p
                .resize_errors
                .into_iter()
                .map(|e| ResizeError {
                    code: e.code,
                    message: e.message,
                })
                .collect(),
            metadata: p.metadata.into_iter().map(|m| (m.name, m.value)).collect(),
            image_id: p
                .virtual_machine_configuration
                .and_then(|c| c.image_reference)
                .and_then(|r| r.virtual_machine_image_id),
            created: p.creation_time,
            allocation_changed: p.allocation_state_transition_time,
        }
    }
}

/// Sums one pool's `dedicated` and `lowPriority` counts per state, with state names lower-cased
/// as node states are spelled (`waitingForStartTask` → `waitingforstarttask`).
fn node_counts_of(entry: &Value) -> NodeCounts {
    let mut counts = NodeCounts::default();
    let mut total = 0;
    let mut summed = 0;
    for kind in ["dedicated", "lowPriority"] {
        let Some(map) = entry[kind].as_object() else { continue };
        for (state, n) in map {
            let n = n.as_u64().unwrap_or(0).min(u32::MAX as u64) as u32;
            if state == "total" {
                total += n;
            } else {
                *counts.by_state.entry(state.to_ascii_lowercase()).or_insert(0) += n;
                summed += n;
            }
        }
    }
    // `total` is what Batch reports; the sum stands in if an answer ever lacks it.
    counts.total = if total > 0 { total } else { summed };
    counts
}

/// `account_url` if a Batch token may be sent there (see the module comment for the rules).
pub fn check_account_url(account_url: &str, endpoint_suffix: &str, arm_base: &Url) -> Result<Url, AzureError> {
    let refuse = |why: String| {
        AzureError::permanent(
            format!("Batch account {account_url}"),
            "UntrustedUrl",
            format!("refusing to send a Batch token to `{account_url}`: {why}"),
        )
    };
    let url = Url::parse(account_url).map_err(|e| refuse(format!("not a URL ({e})")))?;
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() || url.fragment().is_some() {
        return Err(refuse("it carries credentials, a query or a fragment".into()));
    }
    let emulator_origin = url.origin() == arm_base.origin();
    match url.scheme() {
        "https" => {}
        "http" if emulator_origin && arm_base.scheme() == "http" => {}
        other => {
            return Err(refuse(format!(
                "scheme `{other}` (Batch is reached over https only, except the plain-HTTP emulator)"
            )));
        }
    }
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let suffix = endpoint_suffix.to_ascii_lowercase();
    let batch_host = host.ends_with(&format!(".{suffix}")) && url.path() == "/";
    if !(batch_host || emulator_origin) {
        return Err(refuse(format!(
            "not a Batch endpoint (`https://{{account}}.{{region}}.{suffix}`)"
        )));
    }
    Ok(url)
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

impl Batch {
    pub fn new(http: Arc<Http>, api_version: String, endpoint_suffix: String, arm_base: Url) -> Batch {
        Batch {
            http,
            api_version,
            endpoint_suffix: endpoint_suffix.to_ascii_lowercase(),
            arm_base,
        }
    }

    /// The account URL, checked (see the module comment for the rules).
    pub fn account(&self, account_url: &str) -> Result<Url, AzureError> {
        check_account_url(account_url, &self.endpoint_suffix, &self.arm_base)
    }

    /// `{account}{path}?api-version=…&extra…`
    fn url(&self, account: &Url, path: &str, extra: &[(&str, &str)]) -> Url {
        let mut url = account.clone();
        let prefix = account.path().trim_end_matches('/');
        url.set_path(&format!("{prefix}{path}"));
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("api-version", &self.api_version);
            for (k, v) in extra {
                query.append_pair(k, v);
            }
        }
        url
    }

    fn check_pool_id(&self, pool_id: &str) -> Result<(), AzureError> {
        if pool_id_ok(pool_id) {
            Ok(())
        } else {
            Err(AzureError::permanent(
                format!("pool {pool_id}"),
                "InvalidPoolId",
                "a pool id has 1 to 64 letters, digits, hyphens and underscores",
            ))
        }
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        operation: String,
        body: Option<&Value>,
    ) -> Result<Reply, AzureError> {
        let mut call = Call::new(method, url, Audience::Batch, operation);
        if let Some(body) = body {
            call = call.body(body);
        }
        self.http.send(&call).await
    }

    /// Every item of a paged list, following `odata.nextLink` within the same account.
    async fn list(&self, account: &Url, first: Url, operation: &str) -> Result<Vec<Value>, AzureError> {
        Ok(self.list_dated(account, first, operation).await?.0)
    }

    /// A paged list and Batch's time at its first page (its `Date` header, when it has one).
    async fn list_dated(
        &self,
        account: &Url,
        first: Url,
        operation: &str,
    ) -> Result<(Vec<Value>, Option<time::OffsetDateTime>), AzureError> {
        let mut url = first;
        let mut items = Vec::new();
        let mut as_of = None;
        for _ in 0..MAX_PAGES {
            let reply = self.send(Method::GET, url, operation.to_string(), None).await?;
            as_of = as_of.or_else(|| reply.header("date").and_then(http_date));
            let Some(value) = reply.body["value"].as_array() else {
                return Err(unexpected(operation, &reply, "value"));
            };
            items.extend(value.iter().cloned());
            match reply.body["odata.nextLink"].as_str() {
                Some(next) if !next.is_empty() => url = self.next_link(account, operation, next)?,
                _ => return Ok((items, as_of)),
            }
        }
        Err(AzureError::permanent(
            operation,
            "TooManyPages",
            format!("more than {MAX_PAGES} pages"),
        ))
    }

    fn next_link(&self, account: &Url, operation: &str, next: &str) -> Result<Url, AzureError> {
        let prefix = format!("{}/", account.path().trim_end_matches('/'));
        match Url::parse(next) {
            Ok(url)
                if url.origin() == account.origin()
                    && url.path().starts_with(&prefix)
                    && url.username().is_empty()
                    && url.password().is_none() =>
            {
                Ok(url)
            }
            _ => Err(AzureError::permanent(
                operation,
                "UntrustedUrl",
                format!("refusing to follow a next link outside the account: `{next}`"),
            )),
        }
    }

    pub async fn supported_images(&self, account_url: &str) -> Result<Vec<SupportedImage>, AzureError> {
        let account = self.account(account_url)?;
        let operation = "list supported images";
        let items = self
            .list(&account, self.url(&account, "/supportedimages", &[]), operation)
            .await?;
        let mut images = Vec::new();
        for item in items {
            // Entries that are not marketplace images (none today) cannot match a build VM's base.
            let Ok(info) = serde_json::from_value::<ImageInformation>(item) else {
                continue;
            };
            let r = info.image_reference;
            if let (Some(publisher), Some(offer), Some(sku)) = (r.publisher, r.offer, r.sku) {
                images.push(SupportedImage {
                    node_agent_sku_id: info.node_agent_sku_id,
                    publisher,
                    offer,
                    sku,
                    os_type: info.os_type.to_ascii_lowercase(),
                });
            }
        }
        Ok(images)
    }

    pub async fn add_pool(&self, account_url: &str, pool: &PoolRequest) -> Result<PoolCreated, AzureError> {
        let account = self.account(account_url)?;
        self.check_pool_id(&pool.id)?;
        let url = self.url(&account, "/pools", &[]);
        let body = pool_add_body(pool);
        match self
            .send(Method::POST, url, format!("add pool {}", pool.id), Some(&body))
            .await
        {
            Ok(_) => Ok(PoolCreated::Created),
            // Also what a retry after a lost 201 meets: the caller checks the pool is the one it wanted.
            Err(e) if e.status == Some(409) && e.code.as_deref() == Some("PoolExists") => Ok(PoolCreated::Exists),
            Err(e) => Err(e),
        }
    }

    pub async fn get_pool(&self, account_url: &str, pool_id: &str) -> Result<Option<PoolInfo>, AzureError> {
        let account = self.account(account_url)?;
        self.check_pool_id(pool_id)?;
        let operation = format!("get pool {pool_id}");
        let url = self.url(&account, &format!("/pools/{pool_id}"), &[("$select", POOL_SELECT)]);
        let reply = match self.send(Method::GET, url, operation.clone(), None).await {
            Ok(reply) => reply,
            // A missing account is a configuration mistake, not a missing pool.
            Err(e) if e.is_not_found() && e.code.as_deref() != Some("AccountNotFound") => return Ok(None),
            Err(e) => return Err(e),
        };
        let pool: CloudPool = serde_json::from_value(reply.body.clone())
            .map_err(|e| unexpected(&operation, &reply, &format!("a pool ({e})")))?;
        Ok(Some(pool.into()))
    }

    pub async fn list_pools(&self, account_url: &str) -> Result<PoolList, AzureError> {
        let account = self.account(account_url)?;
        let operation = "list pools";
        let (items, as_of) = self
            .list_dated(
                &account,
                self.url(&account, "/pools", &[("$select", POOL_SELECT)]),
                operation,
            )
            .await?;
        let pools = items
            .into_iter()
            .map(|item| {
                serde_json::from_value::<CloudPool>(item)
                    .map(PoolInfo::from)
                    .map_err(|e| AzureError::permanent(operation, "UnexpectedResponse", format!("not a pool: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(PoolList { pools, as_of })
    }

    pub async fn node_counts(&self, account_url: &str, pool_id: &str) -> Result<NodeCounts, AzureError> {
        let account = self.account(account_url)?;
        self.check_pool_id(pool_id)?;
        let filter = format!("poolId eq '{pool_id}'");
        let url = self.url(&account, "/nodecounts", &[("$filter", &filter)]);
        let items = self
            .list(&account, url, &format!("node counts of pool {pool_id}"))
            .await?;
        // Filtered again here: the filter is a request, and a pool absent from the answer has no nodes.
        Ok(items
            .iter()
            .find(|entry| {
                entry["poolId"]
                    .as_str()
                    .is_some_and(|id| id.eq_ignore_ascii_case(pool_id))
            })
            .map(node_counts_of)
            .unwrap_or_default())
    }

    pub async fn resize_pool(
        &self,
        account_url: &str,
        pool_id: &str,
        dedicated: u32,
        low_priority: u32,
    ) -> Result<(), AzureError> {
        let account = self.account(account_url)?;
        self.check_pool_id(pool_id)?;
        // Batch's default of 15 minutes is too short for big pools: at least 15 minutes per 1000 nodes.
        let timeout = min_resize_timeout(dedicated.saturating_add(low_priority));
        let body = json!({
            "targetDedicatedNodes": dedicated,
            "targetLowPriorityNodes": low_priority,
            "resizeTimeout": format!("PT{}S", timeout.as_secs()),
        });
        let url = self.url(&account, &format!("/pools/{pool_id}/resize"), &[]);
        match self
            .send(Method::POST, url, format!("resize pool {pool_id}"), Some(&body))
            .await
        {
            Ok(_) => Ok(()),
            // What a retry meets when the connection dropped after Batch took the first request:
            // the pool is resizing. If it is resizing to these targets, the resize asked for is done.
            Err(e) if e.code.as_deref() == Some("PoolNotSteady") => match self.get_pool(account_url, pool_id).await? {
                Some(pool) if pool.target_dedicated == dedicated && pool.target_low_priority == low_priority => Ok(()),
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Replaces the pool's metadata (Batch's pool PATCH: given metadata replaces all of it).
    pub async fn set_pool_metadata(
        &self,
        account_url: &str,
        pool_id: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), AzureError> {
        let account = self.account(account_url)?;
        self.check_pool_id(pool_id)?;
        let items: Vec<Value> = metadata
            .iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect();
        let url = self.url(&account, &format!("/pools/{pool_id}"), &[]);
        self.send(
            Method::PATCH,
            url,
            format!("update pool {pool_id} metadata"),
            Some(&json!({ "metadata": items })),
        )
        .await
        .map(|_| ())
    }

    pub async fn delete_pool(&self, account_url: &str, pool_id: &str) -> Result<(), AzureError> {
        let account = self.account(account_url)?;
        self.check_pool_id(pool_id)?;
        let url = self.url(&account, &format!("/pools/{pool_id}"), &[]);
        match self
            .send(Method::DELETE, url, format!("delete pool {pool_id}"), None)
            .await
        {
            // Gone, or on its way out (a repeat after a lost answer): what a delete wants.
            Err(e) if e.is_not_found() && e.code.as_deref() == Some("PoolNotFound") => Ok(()),
            Err(e) if e.code.as_deref() == Some("PoolBeingDeleted") => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

/// An HTTP-date (`Wed, 02 Dec 2026 19:13:14 GMT`, RFC 9110's preferred form); `None` otherwise.
fn http_date(text: &str) -> Option<time::OffsetDateTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(text.trim(), &format)
        .ok()
        .map(time::PrimitiveDateTime::assume_utc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ids::GalleryImageVersionId;
    use crate::model::spec::StartTaskSpec;

    fn render_pool() -> PoolRequest {
        let image = GalleryImageVersionId::new(
            "11111111-1111-4111-8111-111111111111",
            "rg-gallery",
            &["sigrun_gallery", "ubuntu", "2026.1126.0"],
        )
        .unwrap();
        PoolRequest {
            id: "nightly-render-2026-1126-0".into(),
            vm_size: "Standard_D4s_v5".into(),
            image,
            node_agent_sku_id: "batch.node.ubuntu 22.04".into(),
            resize_timeout: std::time::Duration::from_secs(2250),
            dedicated_nodes: 2000,
            low_priority_nodes: 10,
            task_slots_per_node: 4,
            start_task: Some(StartTaskSpec {
                command_line: "/bin/sh -c 'warm-cache'".into(),
                elevated: true,
                wait_for_success: true,
                max_task_retry_count: 2,
            }),
            metadata: BTreeMap::from([("sigrun-run".to_string(), "r".to_string())]),
        }
    }

    #[test]
    fn a_pool_request_renders_as_batchs_pool_add_parameter() {
        let pool = render_pool();
        let body = pool_add_body(&pool);
        assert_eq!(body["id"], "nightly-render-2026-1126-0");
        assert_eq!(
            body["virtualMachineConfiguration"]["imageReference"]["virtualMachineImageId"],
            pool.image.to_string()
        );
        assert_eq!(
            body["virtualMachineConfiguration"]["nodeAgentSKUId"],
            "batch.node.ubuntu 22.04"
        );
        assert_eq!(body["resizeTimeout"], "PT2250S");
        assert_eq!(
            (
                &body["targetDedicatedNodes"],
                &body["targetLowPriorityNodes"],
                &body["taskSlotsPerNode"]
            ),
            (&json!(2000), &json!(10), &json!(4))
        );
        assert_eq!(body["metadata"], json!([{"name": "sigrun-run", "value": "r"}]));
        let task = &body["startTask"];
        assert_eq!(task["userIdentity"]["autoUser"]["elevationLevel"], "admin");
        assert_eq!(
            (&task["waitForSuccess"], &task["maxTaskRetryCount"]),
            (&json!(true), &json!(2))
        );
        let plain = pool_add_body(&PoolRequest {
            start_task: None,
            resize_timeout: std::time::Duration::from_secs(1800),
            ..pool
        });
        assert!(plain.get("startTask").is_none());
        assert_eq!(plain["resizeTimeout"], "PT30M");
    }

    #[test]
    fn node_counts_add_dedicated_and_low_priority() {
        let entry = json!({
            "poolId": "p",
            "dedicated": {"creating": 1, "idle": 3, "startTaskFailed": 1, "waitingForStartTask": 0, "total": 5},
            "lowPriority": {"idle": 2, "leavingPool": 1, "total": 3},
        });
        let counts = node_counts_of(&entry);
        assert_eq!(counts.get("idle"), 5);
        assert_eq!(counts.get("creating"), 1);
        assert_eq!(counts.get("starttaskfailed"), 1);
        assert_eq!(counts.get("leavingpool"), 1);
        assert_eq!(counts.get("waitingforstarttask"), 0);
        assert_eq!(counts.get("unusable"), 0);
        assert_eq!(counts.total, 8);
    }

    #[test]
    fn account_urls_that_may_get_a_token() {
        let arm: Url = "https://management.azure.com".parse().unwrap();
        let ok = |u: &str| check_account_url(u, "batch.azure.com", &arm).is_ok();
        assert!(ok("https://acct.westeurope.batch.azure.com"));
        assert!(ok("https://ACCT.westeurope.batch.azure.com/"));
        assert!(!ok("http://acct.westeurope.batch.azure.com"));
        assert!(!ok("https://acct.westeurope.batch.azure.com.evil.example"));
        assert!(!ok("https://evilbatch.azure.com"));
        assert!(!ok("https://user:pw@acct.westeurope.batch.azure.com"));
        assert!(!ok("https://acct.westeurope.batch.azure.com/?x=1"));
        assert!(!ok("https://acct.westeurope.batch.azure.com/other/path"));
        assert!(!ok("acct.westeurope.batch.azure.com"));
        let err = check_account_url("https://example.com", "batch.azure.com", &arm).unwrap_err();
        assert_eq!(err.code.as_deref(), Some("UntrustedUrl"));
        assert_eq!(err.class(), crate::azure::ErrorClass::Permanent);

        // The emulator serves Batch under the resource manager's origin, over http only if ARM is.
        let emulator: Url = "https://127.0.0.1:8443".parse().unwrap();
        assert!(check_account_url("https://127.0.0.1:8443/batch/acct", "batch.azure.com", &emulator).is_ok());
        assert!(check_account_url("http://127.0.0.1:8443/batch/acct", "batch.azure.com", &emulator).is_err());
        assert!(check_account_url("https://127.0.0.1:9999/batch/acct", "batch.azure.com", &emulator).is_err());
        let plain: Url = "http://127.0.0.1:8080".parse().unwrap();
        assert!(check_account_url("http://127.0.0.1:8080/batch/acct", "batch.azure.com", &plain).is_ok());
    }

    #[test]
    fn pools_read_with_defaults() {
        let pool: CloudPool = serde_json::from_value(json!({
            "id": "p1", "state": "active", "allocationState": "steady",
            "currentDedicatedNodes": 2, "targetDedicatedNodes": 3,
            "resizeErrors": [{"code": "AllocationTimedout", "message": "m", "values": []}],
            "metadata": [{"name": "sigrun-run", "value": "r1"}],
            "virtualMachineConfiguration": {"imageReference": {"virtualMachineImageId": "/subscriptions/x"}, "nodeAgentSKUId": "s"},
        }))
        .unwrap();
        let info = PoolInfo::from(pool);
        assert_eq!(info.current_dedicated, 2);
        assert_eq!(info.current_low_priority, 0);
        assert_eq!(info.resize_errors[0].code, "AllocationTimedout");
        assert_eq!(info.metadata["sigrun-run"], "r1");
        assert_eq!(info.image_id.as_deref(), Some("/subscriptions/x"));
    }
}
