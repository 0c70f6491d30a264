//! Shared test plumbing: start an emulator, a client that trusts its certificate, tokens, and small
//! ARM / Batch request helpers that return status, headers and JSON.

#![allow(dead_code)]

use std::time::Duration;

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use sigrun::emulator::{Emulator, EmulatorOptions};

pub const TENANT: &str = "72f988bf-0000-4000-8000-00000000c0de";
pub const OTHER_TENANT: &str = "9f1b7a10-0000-4000-8000-0000000f0e16";
pub const SUB_IMAGING: &str = "11111111-1111-4111-8111-111111111111";
pub const SUB_COMPUTE: &str = "22222222-2222-4222-8222-222222222222";
pub const SUB_SHARED: &str = "33333333-3333-4333-8333-333333333333";
pub const SUB_PARTNER: &str = "44444444-4444-4444-8444-444444444444";
pub const ARM_SCOPE: &str = "https://management.azure.com/.default";
pub const BATCH_SCOPE: &str = "https://batch.core.windows.net//.default";

/// App registrations of the default world: (client id, secret).
pub const PIPELINE_APP: (&str, &str) = ("5a1b2c3d-0000-4000-8000-00000000a001", "emulator-secret-pipeline");
pub const READER_APP: (&str, &str) = ("5a1b2c3d-0000-4000-8000-00000000a002", "emulator-secret-reader");
pub const ROLLOUT_APP: (&str, &str) = ("5a1b2c3d-0000-4000-8000-00000000a003", "emulator-secret-rollout");
pub const PARTNER_APP: (&str, &str) = ("5a1b2c3d-0000-4000-8000-00000000b001", "emulator-secret-partner");

pub const COMPUTE_API: &str = "2024-07-01";
pub const DISK_API: &str = "2024-03-02";
pub const GALLERY_API: &str = "2024-03-03";
pub const RESOURCES_API: &str = "2024-07-01";
pub const BATCH_API: &str = "2024-07-01.20.0";

/// A running emulator plus a client that trusts it.
pub struct TestEmulator {
    pub emulator: Emulator,
    pub client: Client,
}

/// The answer to one request.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// ARM's error code (`error.code`) or Batch's (`code`).
    pub fn code(&self) -> &str {
        self.body["error"]["code"]
            .as_str()
            .or_else(|| self.body["code"].as_str())
            .unwrap_or("")
    }
}

pub async fn start(options: EmulatorOptions) -> TestEmulator {
    let emulator = Emulator::start(options).await.expect("emulator starts");
    let client = client_for(&emulator);
    TestEmulator { emulator, client }
}

/// Real time, with an emulated clock 3600 times faster.
pub async fn start_fast() -> TestEmulator {
    start(EmulatorOptions {
        time_scale: 3600.0,
        ..Default::default()
    })
    .await
}

pub fn client_for(emulator: &Emulator) -> Client {
    let mut builder = Client::builder().no_proxy().timeout(Duration::from_secs(30));
    if let Some(ca) = &emulator.info().ca_cert {
        let pem = std::fs::read(ca).expect("read CA");
        let certs = reqwest::Certificate::from_pem_bundle(&pem).expect("parse CA");
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().expect("client")
}

impl TestEmulator {
    pub fn base(&self) -> &str {
        self.emulator.base_url()
    }

    pub async fn token_for(&self, app: (&str, &str), tenant: &str, scope: &str) -> String {
        let reply = self
            .client
            .post(format!("{}/{tenant}/oauth2/v2.0/token", self.base()))
            .form(&[
                ("client_id", app.0),
                ("client_secret", app.1),
                ("grant_type", "client_credentials"),
                ("scope", scope),
            ])
            .send()
            .await
            .expect("token request");
        assert_eq!(reply.status(), 200, "token for {} should be issued", app.0);
        let body: Value = reply.json().await.expect("token json");
        body["access_token"].as_str().expect("access_token").to_string()
    }

    pub async fn arm_token(&self) -> String {
        self.token_for(PIPELINE_APP, TENANT, ARM_SCOPE).await
    }

    pub async fn batch_token(&self) -> String {
        self.token_for(PIPELINE_APP, TENANT, BATCH_SCOPE).await
    }

    /// Sends a request with an optional bearer token and JSON body.
    pub async fn call(&self, method: Method, url: &str, token: Option<&str>, body: Option<&Value>) -> Reply {
        let url = if url.starts_with("http") {
            url.to_string()
        } else {
            format!("{}{url}", self.base())
        };
        let mut req = self.client.request(method, &url);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Reply { status, headers, body }
    }

    pub async fn get(&self, url: &str, token: &str) -> Reply {
        self.call(Method::GET, url, Some(token), None).await
    }

    pub async fn put(&self, url: &str, token: &str, body: &Value) -> Reply {
        self.call(Method::PUT, url, Some(token), Some(body)).await
    }

    pub async fn post(&self, url: &str, token: &str, body: &Value) -> Reply {
        self.call(Method::POST, url, Some(token), Some(body)).await
    }

    pub async fn delete(&self, url: &str, token: &str) -> Reply {
        self.call(Method::DELETE, url, Some(token), None).await
    }

    /// Jumps the emulated clock forward.
    pub async fn advance(&self, seconds: f64) {
        let reply = self
            .call(
                Method::POST,
                &format!("{}/_emulator/clock", self.base()),
                None,
                Some(&json!({"advance_seconds": seconds})),
            )
            .await;
        assert_eq!(reply.status, 200, "advance clock: {:?}", reply.body);
    }

    /// The emulator's request log.
    pub async fn requests(&self) -> Vec<Value> {
        let reply = self
            .call(Method::GET, &format!("{}/_emulator/requests", self.base()), None, None)
            .await;
        reply.body["requests"].as_array().cloned().unwrap_or_default()
    }

    pub async fn set_faults(&self, spec: &str) {
        let reply = self
            .call(
                Method::PUT,
                &format!("{}/_emulator/faults", self.base()),
                None,
                Some(&json!({"spec": spec})),
            )
            .await;
        assert_eq!(reply.status, 200, "set faults: {:?}", reply.body);
    }

    pub fn batch_url(&self, account: &str) -> String {
        self.emulator.info().batch_accounts[account].clone()
    }
}

/// `/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/{rest}?api-version={api}`
pub fn compute(sub: &str, rg: &str, rest: &str, api: &str) -> String {
    format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/{rest}?api-version={api}")
}

pub fn compute_id(sub: &str, rg: &str, rest: &str) -> String {
    format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/{rest}")
}

/// Builds, in the default world, a snapshot → image → gallery → definition → version chain in
/// westeurope, completing each step by advancing the clock. Returns the version's id.
pub async fn publish_version(
    emu: &TestEmulator,
    token: &str,
    definition: &str,
    os_state: &str,
    version: &str,
    regions: &[(&str, u32)],
) -> String {
    let os_disk = compute_id(SUB_IMAGING, "rg-imaging", "disks/build-ubuntu-2204-osdisk");
    let snap = format!("snapshots/{definition}-{}-os", version.replace('.', "-"));
    let reply = emu
        .put(
            &compute(SUB_IMAGING, "rg-imaging", &snap, DISK_API),
            token,
            &json!({"location": "westeurope", "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": os_disk}}}),
        )
        .await;
    assert_eq!(reply.status, 202, "snapshot: {:?}", reply.body);
    emu.advance(3600.0).await;
    let image = format!("images/{definition}-{}", version.replace('.', "-"));
    let reply = emu
        .put(
            &compute(SUB_IMAGING, "rg-imaging", &image, COMPUTE_API),
            token,
            &json!({"location": "westeurope", "properties": {"hyperVGeneration": "V2", "storageProfile": {"osDisk": {
                "osType": "Linux", "osState": os_state, "snapshot": {"id": compute_id(SUB_IMAGING, "rg-imaging", &snap)}}}}}),
        )
        .await;
    assert_eq!(reply.status, 201, "image: {:?}", reply.body);
    emu.advance(3600.0).await;
    let reply = emu
        .put(
            &compute(SUB_IMAGING, "rg-gallery", "galleries/sigrun_gallery", GALLERY_API),
            token,
            &json!({"location": "westeurope", "properties": {"description": "test"}}),
        )
        .await;
    assert!(reply.status == 201 || reply.status == 200, "gallery: {:?}", reply.body);
    emu.advance(120.0).await;
    let reply = emu
        .put(
            &compute(SUB_IMAGING, "rg-gallery", &format!("galleries/sigrun_gallery/images/{definition}"), GALLERY_API),
            token,
            &json!({"location": "westeurope", "properties": {"osType": "Linux", "osState": os_state, "hyperVGeneration": "V2",
                "identifier": {"publisher": "sigrun", "offer": definition, "sku": "nightly"}}}),
        )
        .await;
    assert!(
        reply.status == 201 || reply.status == 200,
        "definition: {:?}",
        reply.body
    );
    emu.advance(120.0).await;
    let targets: Vec<Value> = regions
        .iter()
        .map(|(name, replicas)| json!({"name": name, "regionalReplicaCount": replicas}))
        .collect();
    let rest = format!("galleries/sigrun_gallery/images/{definition}/versions/{version}");
    let reply = emu
        .put(
            &compute(SUB_IMAGING, "rg-gallery", &rest, GALLERY_API),
            token,
            &json!({"location": "westeurope", "properties": {
                "publishingProfile": {"targetRegions": targets, "storageAccountType": "Standard_LRS"},
                "storageProfile": {"source": {"id": compute_id(SUB_IMAGING, "rg-imaging", &image)}}}}),
        )
        .await;
    assert_eq!(reply.status, 201, "version: {:?}", reply.body);
    compute_id(SUB_IMAGING, "rg-gallery", &rest)
}

/// An emulator whose clock only moves by `advance` (a millionth of real time), so states and counts
/// read at one instant stay put across several requests.
pub async fn start_frozen() -> TestEmulator {
    start(EmulatorOptions {
        time_scale: 1e-6,
        ..Default::default()
    })
    .await
}

/// An add-pool body for a gallery image with a start task that must succeed before tasks run.
pub fn gallery_pool_body(id: &str, image_id: &str, dedicated: u32, resize_timeout: Option<&str>) -> Value {
    let mut body = json!({
        "id": id,
        "vmSize": "Standard_D2s_v5",
        "targetDedicatedNodes": dedicated,
        "virtualMachineConfiguration": {
            "imageReference": {"virtualMachineImageId": image_id},
            "nodeAgentSKUId": "batch.node.ubuntu 22.04",
        },
        "startTask": {"commandLine": "/bin/sh -c 'echo ready'", "waitForSuccess": true, "maxTaskRetryCount": 0},
    });
    if let Some(timeout) = resize_timeout {
        body["resizeTimeout"] = json!(timeout);
    }
    body
}

/// The items of every page of a Batch list, page by page, from `url` on, following
/// `odata.nextLink` (each page a 200); panics past `max_pages`, a next link that never ends.
pub async fn batch_pages(emu: &TestEmulator, url: &str, token: &str, max_pages: usize) -> Vec<Vec<Value>> {
    let (mut url, mut pages) = (url.to_string(), Vec::new());
    loop {
        let reply = emu.get(&url, token).await;
        assert_eq!(reply.status, 200, "{url}: {:?}", reply.body);
        pages.push(reply.body["value"].as_array().cloned().unwrap_or_default());
        match reply.body["odata.nextLink"].as_str() {
            Some(next) if pages.len() < max_pages => url = next.to_string(),
            Some(next) => panic!("more than {max_pages} pages: {next}"),
            None => return pages,
        }
    }
}

/// Every node of a pool, following `odata.nextLink` with pages of `page_size`; also returns the
/// number of pages read.
pub async fn list_all_nodes(
    emu: &TestEmulator,
    token: &str,
    account: &str,
    pool: &str,
    page_size: u32,
) -> (Vec<Value>, usize) {
    let url = format!(
        "{}/pools/{pool}/nodes?api-version={BATCH_API}&maxresults={page_size}",
        emu.batch_url(account)
    );
    let pages = batch_pages(emu, &url, token, usize::MAX).await;
    for page in &pages {
        assert!(
            page.len() <= page_size as usize,
            "a page holds at most {page_size} nodes"
        );
    }
    let count = pages.len();
    (pages.into_iter().flatten().collect(), count)
}

/// Like [`TestEmulator::call`], with extra request headers (Batch's `client-request-id`/`ocp-date`,
/// IMDS's `Metadata`). `url` is absolute or relative to the emulator's base URL.
pub async fn call_with_headers(
    emu: &TestEmulator,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
    headers: &[(String, String)],
) -> Reply {
    let url = if url.starts_with("http") {
        url.to_string()
    } else {
        format!("{}{url}", emu.base())
    };
    let mut req = emu.client.request(method, &url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    for (name, value) in headers {
        req = req.header(name.as_str(), value.as_str());
    }
    if let Some(body) = body {
        req = req.json(body);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Reply { status, headers, body }
}
