//! Replays the official Azure REST spec examples (the shared `azure-specs` folder, see its NOTES.md)
//! for the operations the emulator serves, over real sockets, and checks each answer against the
//! example:
//!
//! * the status is one of the example's response codes for the operation;
//! * the headers the example lists for that status are sent (a `Location`/`Azure-AsyncOperation` must
//!   be an absolute URL of the emulator that answers when followed); for Batch also the headers the
//!   spec declares for the status (`request-id`, `ETag`, `Last-Modified`, `DataServiceId`), minus the
//!   commented exemptions;
//! * every field of the example's response body is in the answer with the same JSON type,
//!   recursively (values may differ; an integer must stay an integer; each element of an example
//!   array must be matched by some element of the answer's array). Fields the emulator does not
//!   produce are listed per example in commented allow-lists.
//!
//! The request comes from the spec: the operation that lists the example in its `x-ms-examples`
//! gives the method and path template, its parameter definitions say which example parameter goes
//! into the path, the query, a header or the body. Adaptations of a request are commented where made.
//!
//! Names: the examples' subscription `{subscription-id}` is the world's subscription id, literally
//! (reqwest percent-encodes the braces, the emulator percent-decodes path segments). Request bodies
//! sometimes spell the same subscription `{subscriptionId}`; that spelling, and the other placeholders
//! in source ids (`{resourceGroup}`, `{imageName}`, ...), are rewritten to the world's names and the
//! prerequisites' names before sending.

use std::path::{Path, PathBuf};

use reqwest::Method;
use serde_json::{Map, Value, json};
use sigrun::emulator::{EmulatorOptions, World};

use crate::helpers::{PIPELINE_APP, Reply, TENANT, TestEmulator, call_with_headers, start};

const SUB: &str = "{subscription-id}";
const RG: &str = "myResourceGroup";

const SNAPSHOT_SPEC: &str = "compute/resource-manager/Microsoft.Compute/DiskRP/stable/2024-03-02/snapshot.json";
const IMAGE_SPEC: &str = "compute/resource-manager/Microsoft.Compute/ComputeRP/stable/2024-07-01/image.json";
const VM_SPEC: &str = "compute/resource-manager/Microsoft.Compute/ComputeRP/stable/2024-07-01/virtualMachine.json";
const GALLERY_SPEC: &str = "compute/resource-manager/Microsoft.Compute/GalleryRP/stable/2024-03-03/gallery.json";
const RESOURCES_SPEC: &str = "resources/resource-manager/Microsoft.Resources/stable/2024-07-01/resources.json";
const IMDS_2018_SPEC: &str = "imds/data-plane/Microsoft.InstanceMetadataService/stable/2018-02-01/imds.json";
const IMDS_2023_SPEC: &str = "imds/data-plane/Microsoft.InstanceMetadataService/stable/2023-07-01/imds.json";
const BATCH_SPEC: &str = "batch/data-plane/Microsoft.Batch/stable/2024-07-01.20.0/BatchService.json";
// From the repository's own copies (tests/azure-specs-extra, see its SOURCES.md).
const SUBSCRIPTIONS_SPEC: &str = "resources/resource-manager/Microsoft.Resources/stable/2022-12-01/subscriptions.json";
const DISK_SPEC: &str = "compute/resource-manager/Microsoft.Compute/DiskRP/stable/2024-03-02/disk.json";

/// The world the examples need: their subscription and resource groups, the VMs (and so the disks)
/// they name, the identity of the IMDS example and a Batch account called `account`.
const WORLD: &str = r#"
[[tenants]]
id = "@TENANT@"
name = "spec-examples"

[[subscriptions]]
id = "{subscription-id}"
tenant = "@TENANT@"
name = "examples"
registered_providers = ["Microsoft.Compute", "Microsoft.Batch"]
resource_groups = [
  { name = "myResourceGroup", location = "westus" },
  { name = "rgcompute", location = "westus" },
]

# The subscription of GetProvider.json.
[[subscriptions]]
id = "00000000-0000-0000-0000-000000000000"
tenant = "@TENANT@"
name = "providers-example"
registered_providers = ["Microsoft.Compute"]

[[apps]]
name = "spec-example-replayer"
tenant = "@TENANT@"
client_id = "@APP_ID@"
client_secret = "@APP_SECRET@"
object_id = "0b000000-0000-4000-8000-00000000e001"
roles = [
  { role = "Contributor", scope = "/subscriptions/{subscription-id}" },
  { role = "Reader", scope = "/subscriptions/00000000-0000-0000-0000-000000000000" },
]

# The client id of the IMDS examples.
[[managed_identities]]
name = "imds-example-identity"
tenant = "@TENANT@"
client_id = "be5947ed-3560-4afe-9504-59967a63f810"
object_id = "0b000000-0000-4000-8000-00000000e002"
roles = [{ role = "Reader", scope = "/subscriptions/{subscription-id}" }]

# VirtualMachine_Get.json and VirtualMachine_Get_InstanceView.json: myVM, its disks and its extension.
[[vms]]
subscription = "{subscription-id}"
resource_group = "myResourceGroup"
name = "myVM"
location = "westus"
os_type = "Windows"
hyper_v_generation = "V1"
vm_size = "Standard_DS3_v2"
image = { publisher = "MicrosoftWindowsServer", offer = "WindowsServer", sku = "2016-Datacenter" }
os_disk = { name = "myOsDisk", size_gb = 30 }
data_disks = [
  { lun = 0, name = "myDataDisk0", size_gb = 30 },
  { lun = 1, name = "myDataDisk1", size_gb = 100 },
]
extensions = [
  { name = "CustomScriptExtension-DSC", publisher = "Microsoft.Compute", type = "CustomScriptExtension", type_handler_version = "1.9" },
]

# Owns myDisk, the (Windows) source of Snapshot_Get.json's snapshot.
[[vms]]
subscription = "{subscription-id}"
resource_group = "myResourceGroup"
name = "myDiskOwner"
location = "westus"
os_type = "Windows"
hyper_v_generation = "V1"
image = { publisher = "MicrosoftWindowsServer", offer = "WindowsServer", sku = "2016-Datacenter" }
os_disk = { name = "myDisk", size_gb = 100 }

# Owns myManagedDisk, the Linux OS disk of Image_CreateFromAManagedDisk.json.
[[vms]]
subscription = "{subscription-id}"
resource_group = "myResourceGroup"
name = "myManagedDiskOwner"
location = "westus"
os_type = "Linux"
hyper_v_generation = "V1"
image = { publisher = "canonical", offer = "0001-com-ubuntu-server-focal", sku = "20_04-lts" }
os_disk = { name = "myManagedDisk", size_gb = 30 }

# VirtualMachineExtension_List_MaximumSet_Gen.json (one extension) and _MinimumSet_Gen.json (none).
[[vms]]
subscription = "{subscription-id}"
resource_group = "rgcompute"
name = "aaaaaaaaaaaaa"
location = "westus"
os_type = "Linux"
image = { publisher = "canonical", offer = "0001-com-ubuntu-server-focal", sku = "20_04-lts" }
os_disk = { name = "aaaaaaaaaaaaa-osdisk", size_gb = 30 }
extensions = [
  { name = "myVMExtension", publisher = "extPublisher", type = "extType", type_handler_version = "1.2" },
]

[[vms]]
subscription = "{subscription-id}"
resource_group = "rgcompute"
name = "aaaaaaaaaaaaaaaaaaaaaaaaaaa"
location = "westus"
os_type = "Linux"
image = { publisher = "canonical", offer = "0001-com-ubuntu-server-focal", sku = "20_04-lts" }
os_disk = { name = "aaaaaaaaaaaaaaaaaaaaaaaaaaa-osdisk", size_gb = 30 }

# The Batch examples' `account.region.batch.azure.com`.
[[batch_accounts]]
name = "account"
subscription = "{subscription-id}"
resource_group = "myResourceGroup"
location = "westus"
"#;

async fn start_examples() -> TestEmulator {
    let text = WORLD
        .replace("@TENANT@", TENANT)
        .replace("@APP_ID@", PIPELINE_APP.0)
        .replace("@APP_SECRET@", PIPELINE_APP.1);
    let world = World::parse(&text, "spec_examples world").expect("the examples' world parses");
    // Real-time clock: operations stay in progress until the test jumps the clock forward.
    start(EmulatorOptions {
        world,
        ..Default::default()
    })
    .await
}

// ------------------------------------------------------------------------------------------------
// The specs and their examples

fn specs_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/azure-specs/specification");
    assert!(
        root.is_dir(),
        "the Azure REST specs are missing: expected the shared azure-specs folder at {} (these tests replay its examples)",
        root.display()
    );
    root
}

/// A spec or example file by its upstream path: in the shared folder, or else in the
/// repository's own copies of what the shared folder lacks (`tests/azure-specs-extra`).
fn spec_file(path: &str) -> PathBuf {
    let shared = specs_root().join(path);
    if shared.is_file() {
        return shared;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/azure-specs-extra/specification")
        .join(path)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

/// A parameter definition, following a `$ref` into this or another spec file.
fn resolve(spec_file: &Path, spec: &Value, param: &Value) -> Value {
    let Some(reference) = param.get("$ref").and_then(Value::as_str) else {
        return param.clone();
    };
    let (file, pointer) = reference.split_once('#').unwrap_or((reference, ""));
    let doc = if file.is_empty() {
        spec.clone()
    } else {
        read_json(&spec_file.parent().expect("spec folder").join(file))
    };
    doc.pointer(pointer)
        .cloned()
        .unwrap_or_else(|| panic!("{}: cannot resolve {reference}", spec_file.display()))
}

/// One example and the operation that documents it.
struct Example {
    /// The example file, for messages.
    name: String,
    doc: Value,
    method: Method,
    /// `basePath` + the operation's path template.
    path: String,
    /// Parameter name → where it goes (`path`, `query`, `header`, `body`).
    locations: Vec<(String, String)>,
    /// Status → the response headers the spec declares for it.
    declared_headers: Map<String, Value>,
}

impl Example {
    /// The example `example` (relative to the spec file's folder) of an operation of `spec`.
    fn of(spec: &str, example: &str) -> Example {
        let dir = Path::new(spec).parent().expect("spec folder");
        Example::load(spec, example, &dir.join(example).display().to_string())
    }

    /// An example of a newer api-version whose spec file is not stored (NOTES.md, Set B): the
    /// operation is the one of `spec` that lists `twin`, the same example in the stored version.
    fn newer(spec: &str, twin: &str, example: &str) -> Example {
        Example::load(spec, twin, example)
    }

    fn load(spec: &str, listed_as: &str, example: &str) -> Example {
        let spec_file = spec_file(spec);
        let spec_doc = read_json(&spec_file);
        let doc = read_json(&self::spec_file(example));
        let base_path = spec_doc["basePath"]
            .as_str()
            .unwrap_or("")
            .trim_end_matches('/')
            .to_string();
        for (path, item) in spec_doc["paths"].as_object().expect("spec has paths") {
            for (method, op) in item.as_object().expect("path item") {
                let Some(examples) = op.get("x-ms-examples").and_then(Value::as_object) else {
                    continue;
                };
                let listed = examples
                    .values()
                    .filter_map(|e| e["$ref"].as_str())
                    .any(|r| r.trim_start_matches("./") == listed_as);
                if !listed {
                    continue;
                }
                let params = item
                    .get("parameters")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .chain(op.get("parameters").and_then(Value::as_array).into_iter().flatten());
                let locations = params
                    .map(|p| resolve(&spec_file, &spec_doc, p))
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap_or_default().to_string(),
                            p["in"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect();
                let declared_headers = op["responses"]
                    .as_object()
                    .map(|responses| {
                        responses
                            .iter()
                            .filter_map(|(status, r)| r.get("headers").map(|h| (status.clone(), h.clone())))
                            .collect()
                    })
                    .unwrap_or_default();
                return Example {
                    name: example.to_string(),
                    doc,
                    method: method.to_ascii_uppercase().parse().expect("an HTTP method"),
                    path: format!("{base_path}{path}"),
                    locations,
                    declared_headers,
                };
            }
        }
        panic!("no operation of {spec} lists the example {listed_as}");
    }

    fn param(&self, name: &str) -> &Value {
        &self.doc["parameters"][name]
    }

    /// Replaces an example parameter (an adaptation: say why where it is called).
    fn with(mut self, name: &str, value: Value) -> Example {
        self.doc["parameters"][name] = value;
        self
    }

    /// The request body: the example's body parameter.
    fn body(&self) -> Value {
        self.locations
            .iter()
            .find(|(_, at)| at == "body")
            .map(|(name, _)| self.param(name).clone())
            .filter(|b| !b.is_null())
            .unwrap_or_else(|| panic!("{}: the example has no body parameter", self.name))
    }

    /// The body with the examples' placeholders replaced, as [`replace_placeholders`] does.
    fn body_with(self, replacements: &[(&str, &str)]) -> Example {
        self.map_body(|body| *body = replace_placeholders(body.take(), replacements))
    }

    /// Changes the request body (an adaptation: say why where it is called).
    fn map_body(self, change: impl FnOnce(&mut Value)) -> Example {
        let name = self
            .locations
            .iter()
            .find(|(_, at)| at == "body")
            .map(|(name, _)| name.clone())
            .expect("a body parameter");
        let mut body = self.body();
        change(&mut body);
        self.with(&name, body)
    }

    fn text(value: &Value) -> String {
        match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    /// URL (under `base`) and headers of the example's request.
    fn request(&self, base: &str) -> (String, Vec<(String, String)>) {
        let mut path = String::new();
        let mut rest = self.path.as_str();
        while let Some(open) = rest.find('{') {
            let close = open + rest[open..].find('}').expect("closed template parameter");
            let name = &rest[open + 1..close];
            let value = self.param(name);
            assert!(!value.is_null(), "{}: no value for path parameter {name}", self.name);
            path.push_str(&rest[..open]);
            path.push_str(&Example::text(value));
            rest = &rest[close + 1..];
        }
        path.push_str(rest);
        let mut url = reqwest::Url::parse(&format!("{base}{path}")).expect("a valid URL");
        let mut headers = Vec::new();
        for (name, at) in &self.locations {
            let value = self.param(name);
            if value.is_null() {
                continue;
            }
            match at.as_str() {
                "query" => {
                    url.query_pairs_mut().append_pair(name, &Example::text(value));
                }
                "header" => headers.push((name.clone(), Example::text(value))),
                _ => {}
            }
        }
        (url.to_string(), headers)
    }

    fn codes(&self) -> Vec<u16> {
        self.doc["responses"]
            .as_object()
            .map(|r| r.keys().filter_map(|k| k.parse().ok()).collect())
            .unwrap_or_default()
    }

    fn response(&self, status: u16) -> &Value {
        &self.doc["responses"][status.to_string()]
    }

    /// The headers the example lists for `status`. Batch's 2024 examples put them straight into the
    /// response object (`"201": {"request-id": ..., "ETag": ...}`) instead of under `headers`.
    fn example_headers(&self, status: u16) -> Vec<String> {
        let response = self.response(status);
        match response.get("headers").and_then(Value::as_object) {
            Some(headers) => headers.keys().cloned().collect(),
            None => response
                .as_object()
                .map(|r| r.keys().filter(|k| *k != "body").cloned().collect())
                .unwrap_or_default(),
        }
    }

    fn spec_headers(&self, status: u16) -> Vec<String> {
        self.declared_headers
            .get(&status.to_string())
            .and_then(Value::as_object)
            .map(|h| h.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// Rewrites placeholders inside every string of a request body (see the module comment).
fn replace_placeholders(value: Value, replacements: &[(&str, &str)]) -> Value {
    match value {
        Value::String(mut s) => {
            for (from, to) in replacements {
                s = s.replace(from, to);
            }
            Value::String(s)
        }
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| replace_placeholders(v, replacements))
                .collect(),
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, replace_placeholders(v, replacements)))
                .collect(),
        ),
        other => other,
    }
}

// ------------------------------------------------------------------------------------------------
// Comparing answers with examples

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `$.a.b[3].c` → `a.b[].c`, the form the allow-lists use.
fn normalized(path: &str) -> String {
    let mut out = String::new();
    let mut chars = path.trim_start_matches('$').trim_start_matches('.').chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '[' {
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
        }
    }
    out
}

fn is_allowed(path: &str, allowed_missing: &[&str]) -> bool {
    let path = normalized(path);
    allowed_missing.iter().any(|a| *a == path)
}

/// Every place where `actual` lacks a field of `example` or has it with another JSON type, by JSON
/// path. Values may differ; an integer in the example must be an integer in the answer (a float
/// would break clients that read it as one); a null in the example says nothing about the type.
/// Each element of an example array must be matched by some element of the answer's array (the
/// closest candidate's mismatches are reported otherwise). `allowed_missing` lists paths
/// (`properties.x[].y`, array indices as `[]`) the answer may lack.
fn check_shape(example: &Value, actual: &Value, path: &str, allowed_missing: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    match (example, actual) {
        (Value::Null, _) => {}
        (Value::Object(fields), Value::Object(got)) => {
            for (key, value) in fields {
                let field_path = format!("{path}.{key}");
                match got.get(key) {
                    Some(a) => out.extend(check_shape(value, a, &field_path, allowed_missing)),
                    None if is_allowed(&field_path, allowed_missing) => {}
                    None => out.push(format!("{field_path}: missing (the example has a {})", kind(value))),
                }
            }
        }
        (Value::Array(items), Value::Array(got)) => {
            if !items.is_empty() && got.is_empty() {
                out.push(format!(
                    "{path}: the example has {} element(s), the answer none",
                    items.len()
                ));
            }
            for (i, item) in items.iter().enumerate() {
                let candidates: Vec<Vec<String>> = got
                    .iter()
                    .enumerate()
                    .map(|(j, g)| check_shape(item, g, &format!("{path}[{j}]"), allowed_missing))
                    .collect();
                if candidates.iter().any(Vec::is_empty) {
                    continue;
                }
                if let Some(closest) = candidates.into_iter().min_by_key(Vec::len) {
                    out.push(format!(
                        "{path}: no element matches the example's element [{i}]; closest:"
                    ));
                    out.extend(closest.into_iter().map(|m| format!("    {m}")));
                }
            }
        }
        (Value::Number(_), Value::Number(_)) if kind(example) == "number" => {}
        (e, a) if kind(e) == kind(a) => {}
        (e, a) => out.push(format!(
            "{path}: the example has a {}, the answer a {} ({a})",
            kind(e),
            kind(a)
        )),
    }
    out
}

/// Collects every failed check of a test, so one run shows all of them.
struct Report<'a> {
    emu: &'a TestEmulator,
    token: String,
    failures: Vec<String>,
}

impl<'a> Report<'a> {
    fn new(emu: &'a TestEmulator, token: &str) -> Report<'a> {
        Report {
            emu,
            token: token.to_string(),
            failures: Vec::new(),
        }
    }

    fn fail(&mut self, ex: &Example, message: String) {
        self.failures.push(format!("{}: {message}", ex.name));
    }

    /// Sends the example's request (to `base`, the emulator or a Batch account URL).
    async fn send(&self, ex: &Example, base: &str) -> Reply {
        let (url, headers) = ex.request(base);
        let body = ex
            .locations
            .iter()
            .any(|(name, at)| at == "body" && !ex.param(name).is_null())
            .then(|| ex.body());
        call_with_headers(
            self.emu,
            ex.method.clone(),
            &url,
            Some(&self.token),
            body.as_ref(),
            &headers,
        )
        .await
    }

    /// Status, the example's headers for it and the body's shape. Returns whether the status was one
    /// of the example's.
    async fn check(&mut self, ex: &Example, reply: &Reply, allowed_missing: &[&str]) -> bool {
        let status = reply.status.as_u16();
        let codes = ex.codes();
        if !codes.contains(&status) {
            self.fail(
                ex,
                format!(
                    "status {status} is not one of the example's {codes:?}; body: {}",
                    reply.body
                ),
            );
            return false;
        }
        for name in ex.example_headers(status) {
            let Some(value) = reply.header(&name).map(str::to_string) else {
                self.fail(ex, format!("{status} answer lacks the header {name} the example lists"));
                continue;
            };
            if name.eq_ignore_ascii_case("location") || name.eq_ignore_ascii_case("azure-asyncoperation") {
                self.check_poll_url(ex, &name, &value).await;
            }
        }
        if let Some(body) = ex.response(status).get("body") {
            for mismatch in check_shape(body, &reply.body, "$", allowed_missing) {
                self.fail(ex, mismatch);
            }
        }
        true
    }

    /// A polling URL is absolute, points at the emulator and answers.
    async fn check_poll_url(&mut self, ex: &Example, name: &str, url: &str) {
        if !url.starts_with(self.emu.base()) {
            self.fail(ex, format!("{name} is not an absolute URL of the emulator: {url}"));
            return;
        }
        let reply = self.emu.get(url, &self.token).await;
        let ok = if name.eq_ignore_ascii_case("azure-asyncoperation") {
            reply.status == 200 && reply.body["status"].is_string()
        } else {
            [200, 202, 204].contains(&reply.status.as_u16())
        };
        if !ok {
            self.fail(
                ex,
                format!("following {name} {url} gave {}: {}", reply.status, reply.body),
            );
        }
    }

    /// [`Report::check`] plus the headers the Batch spec declares for the status, except `exempt`.
    async fn check_batch(&mut self, ex: &Example, reply: &Reply, allowed_missing: &[&str], exempt: &[&str]) {
        if !self.check(ex, reply, allowed_missing).await {
            return;
        }
        let status = reply.status.as_u16();
        for name in ex.spec_headers(status) {
            if exempt.iter().any(|e| e.eq_ignore_ascii_case(&name)) {
                continue;
            }
            if reply.header(&name).is_none() {
                self.fail(ex, format!("{status} answer lacks the header {name} the spec declares"));
            }
        }
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} mismatch(es) between the emulator and the spec examples:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

/// A prerequisite step must succeed; it is not an example replay.
fn expect(reply: &Reply, codes: &[u16], what: &str) {
    assert!(
        codes.contains(&reply.status.as_u16()),
        "prerequisite '{what}' answered {} (wanted one of {codes:?}): {}",
        reply.status,
        reply.body
    );
}

fn arm_url(rest: &str, api: &str) -> String {
    format!("/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/{rest}?api-version={api}")
}

fn arm_id(rest: &str) -> String {
    format!("/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/{rest}")
}

/// Same-subscription spellings in the examples' request bodies.
const SUBSCRIPTION_SPELLINGS: &[(&str, &str)] = &[("{subscriptionId}", SUB)];

/// Spec-declared Batch response headers the emulator does not send, and why.
/// `client-request-id` is echoed only when the request sets `return-client-request-id: true`,
/// which the examples do not (they send `client-request-id` alone).
const BATCH_EXEMPT: &[&str] = &["client-request-id"];
/// Collections (list pools, list nodes, supported images) and compute nodes have no entity version:
/// the emulator sends no `ETag`/`Last-Modified` for them although the spec declares both.
const BATCH_EXEMPT_NO_ENTITY: &[&str] = &["client-request-id", "ETag", "Last-Modified"];

// ------------------------------------------------------------------------------------------------
// Snapshots (DiskRP 2024-03-02, plus the 2025-01-02 Snapshot_Get)

#[tokio::test]
async fn snapshots() {
    let emu = start_examples().await;
    let token = emu.arm_token().await;
    let mut report = Report::new(&emu, &token);

    // Prerequisite of the copy example: its source snapshot mySnapshot1, from the world's disk myDisk.
    let reply = emu
        .put(
            &arm_url("snapshots/mySnapshot1", "2024-03-02"),
            &token,
            &json!({"location": "westus", "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": arm_id("disks/myDisk")}}}),
        )
        .await;
    expect(&reply, &[200, 202], "create mySnapshot1");
    emu.advance(3600.0).await;

    let ex = Example::of(
        SNAPSHOT_SPEC,
        "examples/snapshotExamples/Snapshot_Create_FromAnExistingSnapshot.json",
    );
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;

    // Prerequisite of Snapshot_Get: mySnapshot as the example shows it, created through the API with
    // the settable properties the example has (tags, purchase plan, capabilities, hibernation).
    let get = Example::of(SNAPSHOT_SPEC, "examples/snapshotExamples/Snapshot_Get.json");
    let shown = &get.response(200)["body"];
    let props = &shown["properties"];
    let body = json!({
        "location": "westus",
        "tags": shown["tags"],
        "properties": {
            "creationData": {"createOption": props["creationData"]["createOption"], "sourceResourceId": props["creationData"]["sourceResourceId"]},
            "purchasePlan": props["purchasePlan"],
            "supportedCapabilities": props["supportedCapabilities"],
            "supportsHibernation": props["supportsHibernation"],
        },
    });
    let reply = emu
        .put(&arm_url("snapshots/mySnapshot", "2024-03-02"), &token, &body)
        .await;
    expect(&reply, &[200, 202], "create mySnapshot");
    emu.advance(3600.0).await;

    // Azure Disk Encryption (Key Vault secrets and keys) is not emulated: the world's disks are not
    // ADE-encrypted, so their snapshots have no encryptionSettingsCollection.
    let allowed = ["properties.encryptionSettingsCollection"];
    let reply = report.send(&get, emu.base()).await;
    report.check(&get, &reply, &allowed).await;
    let get_2025 = Example::newer(
        SNAPSHOT_SPEC,
        "examples/snapshotExamples/Snapshot_Get.json",
        "compute/resource-manager/Microsoft.Compute/DiskRP/stable/2025-01-02/examples/snapshotExamples/Snapshot_Get.json",
    );
    let reply = report.send(&get_2025, emu.base()).await;
    report.check(&get_2025, &reply, &allowed).await;

    let ex = Example::of(SNAPSHOT_SPEC, "examples/snapshotExamples/Snapshot_Delete.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;
    report.finish();
}

// ------------------------------------------------------------------------------------------------
// Managed images (ComputeRP 2024-07-01, plus the 2025-11-01 Image_Get)

#[tokio::test]
async fn images() {
    let emu = start_examples().await;
    let token = emu.arm_token().await;
    let mut report = Report::new(&emu, &token);

    // Prerequisites: the snapshots the examples name. mySnapshot holds a Linux OS disk (the examples'
    // osType), mySnapshot2 a data disk; both in West US like the images.
    for (name, disk) in [("mySnapshot", "myManagedDisk"), ("mySnapshot2", "myDataDisk1")] {
        let reply = emu
            .put(
                &arm_url(&format!("snapshots/{name}"), "2024-03-02"),
                &token,
                &json!({"location": "westus", "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": arm_id(&format!("disks/{disk}"))}}}),
            )
            .await;
        expect(&reply, &[200, 202], &format!("create {name}"));
    }
    emu.advance(3600.0).await;

    // The three create examples all name the image myImage; an image's sources cannot change, so
    // the image is deleted (and the deletion completed) before the next example creates it again.
    let delete_my_image = || async {
        let reply = emu.delete(&arm_url("images/myImage", "2024-07-01"), &token).await;
        expect(&reply, &[200, 202, 204], "delete myImage");
        emu.advance(600.0).await;
    };

    let ex = Example::of(IMAGE_SPEC, "examples/imageExamples/Image_CreateFromASnapshot.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;
    emu.advance(3600.0).await;
    delete_my_image().await;

    // The data disk's snapshot id spells the subscription `{subscriptionId}`.
    let ex = Example::of(
        IMAGE_SPEC,
        "examples/imageExamples/Image_Create_DataDiskFromASnapshotIncluded.json",
    )
    .body_with(SUBSCRIPTION_SPELLINGS);
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;
    emu.advance(3600.0).await;

    // Image_Get shows each disk with all three sources at once (blob URI, snapshot, managed disk); an
    // image disk has exactly one, and the image replayed here (the one just created) uses snapshots.
    // Blob URIs are refused by the emulator (no storage accounts), managed disks are used below.
    let allowed = [
        "properties.storageProfile.osDisk.blobUri",
        "properties.storageProfile.osDisk.managedDisk",
        "properties.storageProfile.dataDisks[].blobUri",
        "properties.storageProfile.dataDisks[].managedDisk",
    ];
    let ex = Example::of(IMAGE_SPEC, "examples/imageExamples/Image_Get.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &allowed).await;
    let ex = Example::newer(
        IMAGE_SPEC,
        "examples/imageExamples/Image_Get.json",
        "compute/resource-manager/Microsoft.Compute/ComputeRP/stable/2025-11-01/examples/imageExamples/Image_Get.json",
    );
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &allowed).await;
    delete_my_image().await;

    let ex = Example::of(IMAGE_SPEC, "examples/imageExamples/Image_CreateFromAManagedDisk.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;

    // Prerequisite of the delete example: its image, in its resource group rgcompute.
    let ex = Example::of(IMAGE_SPEC, "examples/imageExamples/Images_Delete_MaximumSet_Gen.json");
    let image = ex.param("imageName").as_str().expect("imageName").to_string();
    let reply = emu
        .put(
            &format!(
                "/subscriptions/{SUB}/resourceGroups/rgcompute/providers/Microsoft.Compute/images/{image}?api-version=2024-07-01"
            ),
            &token,
            &json!({"location": "westus", "properties": {"storageProfile": {"osDisk": {
                "osType": "Linux", "osState": "Generalized", "snapshot": {"id": arm_id("snapshots/mySnapshot")}}}}}),
        )
        .await;
    expect(&reply, &[200, 201], "create the image of Images_Delete_MaximumSet_Gen");
    emu.advance(3600.0).await;
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;
    report.finish();
}

// ------------------------------------------------------------------------------------------------
// The source VM: get, instance view, extensions (ComputeRP 2024-07-01)

#[tokio::test]
async fn vm() {
    let emu = start_examples().await;
    let token = emu.arm_token().await;
    let mut report = Report::new(&emu, &token);

    // Features of the example VM that the emulated world does not have:
    let allowed = [
        // tags and etag: the world's VMs carry no tags and are read-only (no If-Match to serve).
        "tags",
        "etag",
        // Availability sets, proximity placement groups, gallery applications, boot diagnostics and
        // scale sets are not emulated.
        "properties.availabilitySet",
        "properties.proximityPlacementGroup",
        "properties.applicationProfile",
        "properties.diagnosticsProfile",
        "managedBy",
        // `$expand=userData`: the world's VMs have no user data.
        "properties.userData",
        // The world's VMs pre-exist the emulated timeline: no creation time, no extension time budget.
        "properties.timeCreated",
        "properties.extensionsTimeBudget",
        // The world's extensions have no tags and no settings.
        "resources[].tags",
        "resources[].properties.settings",
    ];
    let ex = Example::of(VM_SPEC, "examples/virtualMachineExamples/VirtualMachine_Get.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &allowed).await;

    // The instance view of a VM: the world's VMs are generalized and deallocated, so there is no
    // running guest agent to report the agent, OS version, patches or extension states; fault and
    // update domains, boot diagnostics and standby pools are not emulated. The world's VMs and disks
    // pre-exist the emulated timeline, so their provisioning statuses carry no time.
    let instance_view_allowed = [
        "statuses[].time",
        "disks[].statuses[].time",
        "platformUpdateDomain",
        "platformFaultDomain",
        "osVersion",
        "vmAgent",
        "extensions",
        "patchStatus",
        "bootDiagnostics",
        "isVMInStandbyPool",
    ];
    let ex = Example::of(
        VM_SPEC,
        "examples/virtualMachineExamples/VirtualMachine_Get_InstanceView.json",
    );
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &instance_view_allowed).await;
    // The pipeline reads the same VirtualMachineInstanceView through GET ...?$expand=instanceView.
    let expanded = emu
        .get(
            &format!("{}&$expand=instanceView", arm_url("virtualMachines/myVM", "2024-07-01")),
            &token,
        )
        .await;
    expect(&expanded, &[200], "get myVM with $expand=instanceView");
    for mismatch in check_shape(
        &ex.response(200)["body"],
        &expanded.body["properties"]["instanceView"],
        "$",
        &instance_view_allowed,
    ) {
        report.fail(
            &ex,
            format!("(GET myVM?$expand=instanceView, properties.instanceView) {mismatch}"),
        );
    }

    // The generated maximum-set example lists an extension with everything set. Its `$expand` is a
    // placeholder ("aaaa..."), not `instanceView`; extension instance views are not emulated. The
    // world's extension has no settings, tags, forced update tag or failure suppression, and Azure
    // never returns protectedSettings on a read.
    let allowed = [
        "value[].properties.instanceView",
        "value[].properties.settings",
        "value[].properties.protectedSettings",
        "value[].properties.suppressFailures",
        "value[].properties.forceUpdateTag",
        "value[].properties.enableAutomaticUpgrade",
        "value[].tags",
    ];
    let ex = Example::of(
        VM_SPEC,
        "examples/virtualMachineExamples/VirtualMachineExtension_List_MaximumSet_Gen.json",
    );
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &allowed).await;
    let ex = Example::of(
        VM_SPEC,
        "examples/virtualMachineExamples/VirtualMachineExtension_List_MinimumSet_Gen.json",
    );
    let reply = report.send(&ex, emu.base()).await;
    if report.check(&ex, &reply, &[]).await && reply.body["value"] != json!([]) {
        report.fail(&ex, format!("a VM without extensions lists {}", reply.body));
    }
    report.finish();
}

// ------------------------------------------------------------------------------------------------
// Galleries and image definitions (GalleryRP 2024-03-03)

#[tokio::test]
async fn galleries() {
    let emu = start_examples().await;
    let token = emu.arm_token().await;
    let mut report = Report::new(&emu, &token);

    let ex = Example::of(GALLERY_SPEC, "examples/galleryExamples/Gallery_Create.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;
    emu.advance(600.0).await;
    let ex = Example::of(GALLERY_SPEC, "examples/galleryExamples/Gallery_Get.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;

    let ex = Example::of(GALLERY_SPEC, "examples/galleryExamples/GalleryImage_Create.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;
    emu.advance(600.0).await;
    let ex = Example::of(GALLERY_SPEC, "examples/galleryExamples/GalleryImage_Get.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;

    let ex = Example::of(GALLERY_SPEC, "examples/galleryExamples/GalleryImage_Delete.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;
    // A gallery is deleted once its definitions are gone.
    emu.advance(600.0).await;
    let ex = Example::of(GALLERY_SPEC, "examples/galleryExamples/Gallery_Delete.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;
    report.finish();
}

// ------------------------------------------------------------------------------------------------
// Image versions (GalleryRP 2024-03-03, plus the 2025-03-03 Get_WithReplicationStatus)

#[tokio::test]
async fn versions() {
    let emu = start_examples().await;
    let token = emu.arm_token().await;
    let mut report = Report::new(&emu, &token);

    // Prerequisites: the source image (a Windows OS disk and a data disk at LUN 1, as the examples
    // show), the gallery and the definition (Gallery_Create / GalleryImage_Create as the examples
    // send them: Windows, generalized, V1).
    for (name, disk) in [("mySnapshot", "myDisk"), ("myDataSnapshot", "myDataDisk1")] {
        let reply = emu
            .put(
                &arm_url(&format!("snapshots/{name}"), "2024-03-02"),
                &token,
                &json!({"location": "westus", "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": arm_id(&format!("disks/{disk}"))}}}),
            )
            .await;
        expect(&reply, &[200, 202], &format!("create {name}"));
    }
    emu.advance(3600.0).await;
    let reply = emu
        .put(
            &arm_url("images/myImage", "2024-07-01"),
            &token,
            &json!({"location": "westus", "properties": {"storageProfile": {
                "osDisk": {"osType": "Windows", "osState": "Generalized", "snapshot": {"id": arm_id("snapshots/mySnapshot")}},
                "dataDisks": [{"lun": 1, "snapshot": {"id": arm_id("snapshots/myDataSnapshot")}}]}}}),
        )
        .await;
    expect(&reply, &[200, 201], "create myImage");
    for example in ["Gallery_Create.json", "GalleryImage_Create.json"] {
        let ex = Example::of(GALLERY_SPEC, &format!("examples/galleryExamples/{example}"));
        let reply = report.send(&ex, emu.base()).await;
        expect(&reply, &[200, 201, 202], example);
    }
    emu.advance(3600.0).await;

    let sources: &[(&str, &str)] = &[
        ("{subscriptionId}", SUB),
        ("{resourceGroup}", RG),
        ("{imageName}", "myImage"),
        ("{osSnapshotName}", "mySnapshot"),
        ("{dataDiskName}", "myDataDisk1"),
    ];
    // Disk encryption sets are not emulated (the world has none to resolve): the emulator refuses
    // the examples' `targetRegions[].encryption`, checked here, and the create examples are replayed
    // without it.
    let ex = Example::of(GALLERY_SPEC, "examples/galleryExamples/GalleryImageVersion_Create.json").body_with(sources);
    let reply = report.send(&ex, emu.base()).await;
    if reply.status != 400 || reply.code() != "InvalidParameter" {
        report.fail(
            &ex,
            format!("a disk encryption set was not refused: {} {}", reply.status, reply.body),
        );
    }
    let ex = ex.map_body(without_encryption);
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &VERSION_ALLOWED).await;
    // Source region and East US replicated.
    emu.advance(7200.0).await;

    for example in [
        "GalleryImageVersion_Get.json",
        "GalleryImageVersion_Get_WithReplicationStatus.json",
    ] {
        let ex = Example::of(GALLERY_SPEC, &format!("examples/galleryExamples/{example}"));
        let reply = report.send(&ex, emu.base()).await;
        report.check(&ex, &reply, &VERSION_ALLOWED).await;
    }
    // The 2025-03-03 copy still says api-version 2024-03-03 (NOTES.md §5); it is replayed with the
    // api-version of its folder.
    let ex = Example::newer(
        GALLERY_SPEC,
        "examples/galleryExamples/GalleryImageVersion_Get_WithReplicationStatus.json",
        "compute/resource-manager/Microsoft.Compute/GalleryRP/stable/2025-03-03/examples/galleryExamples/GalleryImageVersion_Get_WithReplicationStatus.json",
    )
    .with("api-version", json!("2025-03-03"));
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &VERSION_ALLOWED).await;

    // One page holds every version: no nextLink (ARM omits it on the last page).
    let list_allowed: Vec<String> = VERSION_ALLOWED
        .iter()
        .map(|p| format!("value[].{p}"))
        .chain(["nextLink".to_string()])
        .collect();
    let list_allowed: Vec<&str> = list_allowed.iter().map(String::as_str).collect();
    let ex = Example::of(
        GALLERY_SPEC,
        "examples/galleryExamples/GalleryImageVersion_ListByGalleryImage.json",
    );
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &list_allowed).await;

    let ex = Example::of(GALLERY_SPEC, "examples/galleryExamples/GalleryImageVersion_Update.json").body_with(sources);
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &VERSION_ALLOWED).await;
    emu.advance(7200.0).await;

    let ex = Example::of(GALLERY_SPEC, "examples/galleryExamples/GalleryImageVersion_Delete.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &[]).await;
    emu.advance(600.0).await;

    // The same version again, this time from the snapshot and a data disk.
    let ex = Example::of(
        GALLERY_SPEC,
        "examples/galleryExamples/GalleryImageVersion_Create_WithSnapshotsAsSource.json",
    )
    .body_with(sources)
    .map_body(without_encryption);
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &VERSION_ALLOWED).await;
    report.finish();
}

/// Image-version fields the emulator does not produce.
const VERSION_ALLOWED: [&str; 2] = [
    // Policy scanning of images is not emulated: no violations to list.
    "properties.safetyProfile.policyViolations",
    // Disk encryption sets are not emulated (see the create example above).
    "properties.publishingProfile.targetRegions[].encryption",
];

/// A version body without its target regions' disk encryption sets.
fn without_encryption(body: &mut Value) {
    for region in body
        .pointer_mut("/properties/publishingProfile/targetRegions")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        region.as_object_mut().map(|r| r.remove("encryption"));
    }
}

// ------------------------------------------------------------------------------------------------
// Resource providers (Microsoft.Resources 2024-07-01)

#[tokio::test]
async fn providers() {
    let emu = start_examples().await;
    let token = emu.arm_token().await;
    let mut report = Report::new(&emu, &token);
    // The example reads the test namespace Microsoft.TestRP1; the emulator knows only the namespaces
    // of the workflow, so the same request is made for Microsoft.Compute.
    let ex = Example::of(RESOURCES_SPEC, "examples/GetProvider.json")
        .with("resourceProviderNamespace", json!("Microsoft.Compute"));
    // Edge zones are not emulated: no location mappings.
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &["resourceTypes[].locationMappings"]).await;
    if reply.body["namespace"] != "Microsoft.Compute" {
        report.fail(&ex, format!("the provider read is {}", reply.body["namespace"]));
    }
    report.finish();
}

// ------------------------------------------------------------------------------------------------
// Tenants, subscriptions (Microsoft.Resources 2022-12-01) and resource groups (2024-07-01): what
// a client reads to log in and to default a location

#[tokio::test]
async fn subscriptions_and_tenants() {
    let emu = start_examples().await;
    let token = emu.arm_token().await;
    let mut report = Report::new(&emu, &token);
    // The emulated subscriptions carry no tags and are managed by no other tenant, and a list
    // comes in one page: the examples' tags, managing tenants and nextLink are not produced.
    let no_managers = |mut ex: Example, pointer: &str| {
        if let Some(managers) = ex.doc.pointer_mut(pointer) {
            *managers = json!([]);
        }
        ex
    };
    let mut ex = Example::of(SUBSCRIPTIONS_SPEC, "examples/GetSubscriptions.json");
    for i in 0..2 {
        ex = no_managers(ex, &format!("/responses/200/body/value/{i}/managedByTenants"));
    }
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &["value[].tags", "nextLink"]).await;
    let listed: Vec<&str> = reply.body["value"]
        .as_array()
        .map(|v| v.iter().filter_map(|s| s["subscriptionId"].as_str()).collect())
        .unwrap_or_default();
    if listed != [SUB, "00000000-0000-0000-0000-000000000000"] {
        report.fail(
            &ex,
            format!("the caller's two subscriptions, in world order, listed as {listed:?}"),
        );
    }

    // The example's subscription is the world's.
    let ex = no_managers(
        Example::of(SUBSCRIPTIONS_SPEC, "examples/GetSubscription.json").with("subscriptionId", json!(SUB)),
        "/responses/200/body/managedByTenants",
    );
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, &["tags"]).await;

    // The world's tenant has no country or branding logo.
    let ex = Example::of(SUBSCRIPTIONS_SPEC, "examples/GetTenants.json");
    let reply = report.send(&ex, emu.base()).await;
    report
        .check(
            &ex,
            &reply,
            &["value[].countryCode", "value[].tenantBrandingLogoUrl", "nextLink"],
        )
        .await;
    if reply.body["value"][0]["tenantId"] != TENANT {
        report.fail(&ex, format!("the caller's tenant is not listed: {}", reply.body));
    }
    report.finish();
}

/// Resources 2024-07-01 documents no example for Resource Groups – Get; the answer is checked
/// against the `ResourceGroup` definition's required and read-only fields instead.
#[tokio::test]
async fn resource_groups() {
    let emu = start_examples().await;
    let token = emu.arm_token().await;
    let url = format!("/subscriptions/{SUB}/resourcegroups/{RG}?api-version=2024-11-01");
    let group = emu.get(&url, &token).await;
    assert_eq!(group.status, 200, "{:?}", group.body);
    assert_eq!(group.body["name"], RG);
    assert_eq!(group.body["location"], "westus");
    assert_eq!(group.body["type"], "Microsoft.Resources/resourceGroups");
    assert_eq!(group.body["properties"]["provisioningState"], "Succeeded");
    assert_eq!(
        group.body["id"],
        format!("/subscriptions/{SUB}/resourceGroups/{RG}"),
        "the id spells the type as Azure does"
    );
    let missing = emu
        .get(
            &format!("/subscriptions/{SUB}/resourcegroups/nope?api-version=2024-11-01"),
            &token,
        )
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["error"]["code"], "ResourceGroupNotFound");
    let list = emu
        .get(
            &format!("/subscriptions/{SUB}/resourcegroups?api-version=2024-11-01"),
            &token,
        )
        .await;
    let names: Vec<&str> = list.body["value"]
        .as_array()
        .map(|v| v.iter().filter_map(|g| g["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, [RG, "rgcompute"], "{:?}", list.body);
}

// ------------------------------------------------------------------------------------------------
// The world's managed disks (DiskRP 2024-03-02)

/// What a disk of this emulator never has: purchase plans, encryption settings, security
/// profiles, capabilities, hibernation, ownership and creation times (the world's disks have no
/// history), tags.
const DISK_NOT_EMULATED: &[&str] = &[
    "properties.purchasePlan",
    "properties.supportedCapabilities",
    "properties.supportsHibernation",
    "properties.securityProfile",
    "properties.encryptionSettingsCollection",
    "properties.LastOwnershipUpdateTime",
    "properties.timeCreated",
    "tags",
];

#[tokio::test]
async fn disks() {
    let emu = start_examples().await;
    let token = emu.arm_token().await;
    let mut report = Report::new(&emu, &token);
    let ex = Example::of(DISK_SPEC, "examples/diskExamples/Disk_Get.json");
    let reply = report.send(&ex, emu.base()).await;
    report.check(&ex, &reply, DISK_NOT_EMULATED).await;
    if reply.body["managedBy"]
        .as_str()
        .map(|id| id.ends_with("/virtualMachines/myManagedDiskOwner"))
        != Some(true)
    {
        report.fail(&ex, format!("the disk is not its VM's: {}", reply.body));
    }

    let ex = Example::of(DISK_SPEC, "examples/diskExamples/Disk_ListByResourceGroup.json");
    let reply = report.send(&ex, emu.base()).await;
    let in_list: Vec<String> = DISK_NOT_EMULATED
        .iter()
        .map(|p| format!("value[].{p}"))
        // The example lists a copied disk; a world disk was made from an image or empty.
        .chain(["value[].properties.creationData.sourceResourceId".to_string()])
        .chain(["nextLink".to_string()])
        .collect();
    let in_list: Vec<&str> = in_list.iter().map(String::as_str).collect();
    report.check(&ex, &reply, &in_list).await;
    report.finish();
}

// ------------------------------------------------------------------------------------------------
// Gallery lists (GalleryRP 2024-03-03)

#[tokio::test]
async fn gallery_lists() {
    let emu = start_examples().await;
    let token = emu.arm_token().await;
    let mut report = Report::new(&emu, &token);
    let reply = emu
        .put(
            &arm_url("galleries/myGalleryName", "2024-03-03"),
            &token,
            &json!({"location": "westus", "properties": {"description": "This is the gallery description."}}),
        )
        .await;
    expect(&reply, &[200, 201], "create myGalleryName");
    for example in [
        "examples/galleryExamples/Gallery_ListByResourceGroup.json",
        "examples/galleryExamples/Gallery_ListBySubscription.json",
    ] {
        let ex = Example::of(GALLERY_SPEC, example);
        let reply = report.send(&ex, emu.base()).await;
        // One page holds every gallery here.
        report.check(&ex, &reply, &["nextLink"]).await;
    }
    report.finish();
}

// ------------------------------------------------------------------------------------------------
// Managed identity tokens from IMDS (2018-02-01 and 2023-07-01)

#[tokio::test]
async fn imds() {
    let emu = start_examples().await;
    let mut report = Report::new(&emu, "");
    for (spec, example) in [
        (IMDS_2018_SPEC, "examples/getIdentityToken.json"),
        (IMDS_2023_SPEC, "examples/GetIdentityToken.json"),
    ] {
        // The examples ask for a Key Vault token; the emulator issues tokens only for the APIs it
        // serves, so the same request is made for ARM.
        let ex = Example::of(spec, example).with("resource", json!("https://management.azure.com/"));
        let (url, headers) = ex.request(emu.base());
        let reply = call_with_headers(&emu, ex.method.clone(), &url, None, None, &headers).await;
        if report.check(&ex, &reply, &[]).await && reply.status != 200 {
            report.fail(
                &ex,
                format!("a valid request answered {}: {}", reply.status, reply.body),
            );
        }
        // Every value is a string (the example and the Rust client agree).
        for (field, value) in reply.body.as_object().into_iter().flatten() {
            if !value.is_string() {
                report.fail(&ex, format!("{field} is a {}, not a string", kind(value)));
            }
        }
        if reply.body["client_id"] != "be5947ed-3560-4afe-9504-59967a63f810" {
            report.fail(
                &ex,
                format!("the token is not for the example's identity: {}", reply.body),
            );
        }
    }
    // The 2018 example's error answers: without `Metadata: true` (400) and with another method (405).
    let ex = Example::of(IMDS_2018_SPEC, "examples/getIdentityToken.json")
        .with("resource", json!("https://management.azure.com/"));
    let (url, headers) = ex.request(emu.base());
    let without_metadata: Vec<(String, String)> = headers
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case("metadata"))
        .cloned()
        .collect();
    let reply = call_with_headers(&emu, Method::GET, &url, None, None, &without_metadata).await;
    if report.check(&ex, &reply, &[]).await && reply.status != 400 {
        report.fail(&ex, format!("a request without Metadata answered {}", reply.status));
    }
    let reply = call_with_headers(&emu, Method::POST, &url, None, None, &headers).await;
    if report.check(&ex, &reply, &[]).await && reply.status != 405 {
        report.fail(&ex, format!("a POST answered {}", reply.status));
    }
    report.finish();
}

// ------------------------------------------------------------------------------------------------
// Batch data plane (2024-07-01.20.0, plus the 2025-06-01 Nodes_ListNodes and Pools_ListSupportedImages)

/// Creates a pool as a prerequisite (not an example replay).
async fn add_pool(emu: &TestEmulator, token: &str, pool: &Value) {
    let url = format!("{}/pools?api-version=2024-07-01.20.0", emu.batch_url("account"));
    let reply = emu.post(&url, token, pool).await;
    expect(&reply, &[201], &format!("add pool {}", pool["id"]));
}

/// The add-pool body that yields a pool as a get/list example shows it: its settable properties.
fn pool_from_example(shown: &Value) -> Value {
    let mut pool = Map::new();
    for field in [
        "id",
        "vmSize",
        "virtualMachineConfiguration",
        "resizeTimeout",
        "targetDedicatedNodes",
        "targetLowPriorityNodes",
        "enableAutoScale",
        "enableInterNodeCommunication",
        "startTask",
        "taskSlotsPerNode",
        "taskSchedulingPolicy",
    ] {
        if let Some(v) = shown.get(field) {
            pool.insert(field.to_string(), v.clone());
        }
    }
    Value::Object(pool)
}

#[tokio::test]
async fn batch_pools() {
    let emu = start_examples().await;
    let token = emu.batch_token().await;
    let mut report = Report::new(&emu, &token);
    let account = emu.batch_url("account");

    // The list example shows one pool, so it runs while testPool is the account's only pool. The
    // example's image (Windows Server 2016 smalldisk) is not among the emulator's supported images
    // (GET /supportedimages); the prerequisite uses 2019-datacenter instead.
    let ex = Example::of(BATCH_SPEC, "examples/PoolList_Basic.json");
    let mut test_pool = pool_from_example(&ex.response(200)["body"]["value"][0]);
    test_pool["virtualMachineConfiguration"]["imageReference"]["sku"] = json!("2019-datacenter");
    add_pool(&emu, &token, &test_pool).await;
    emu.advance(1800.0).await;
    let reply = report.send(&ex, &account).await;
    report.check_batch(&ex, &reply, &[], BATCH_EXEMPT_NO_ENTITY).await;

    let ex = Example::of(BATCH_SPEC, "examples/PoolAdd_VirtualMachineConfiguration.json");
    let reply = report.send(&ex, &account).await;
    report.check_batch(&ex, &reply, &[], BATCH_EXEMPT).await;

    // The two get examples' pools, created with what the examples show.
    for example in [
        "examples/PoolGet_Basic.json",
        "examples/PoolGet_VirtualMachineConfigurationWithOSDisk.json",
    ] {
        let ex = Example::of(BATCH_SPEC, example);
        add_pool(&emu, &token, &pool_from_example(&ex.response(200)["body"])).await;
    }
    emu.advance(1800.0).await;
    for example in [
        "examples/PoolGet_Basic.json",
        "examples/PoolGet_VirtualMachineConfigurationWithOSDisk.json",
    ] {
        let ex = Example::of(BATCH_SPEC, example);
        let reply = report.send(&ex, &account).await;
        report.check_batch(&ex, &reply, &[], BATCH_EXEMPT).await;
    }

    // PoolExists: the example's pool exists (200), and a pool that does not (404); both codes are
    // the example's.
    let pool_id = json!({"id": "poolId", "vmSize": "standard_d2s_v3", "virtualMachineConfiguration": {
        "imageReference": {"publisher": "Canonical", "offer": "0001-com-ubuntu-server-focal", "sku": "20_04-lts"},
        "nodeAgentSKUId": "batch.node.ubuntu 20.04"}, "targetDedicatedNodes": 1});
    add_pool(&emu, &token, &pool_id).await;
    emu.advance(1800.0).await;
    let ex = Example::of(BATCH_SPEC, "examples/PoolExists.json");
    let reply = report.send(&ex, &account).await;
    report.check_batch(&ex, &reply, &[], BATCH_EXEMPT).await;
    if reply.status != 200 {
        report.fail(&ex, format!("an existing pool answered {}", reply.status));
    }
    let reply = report.send(&ex.with("poolId", json!("noSuchPool")), &account).await;
    let ex = Example::of(BATCH_SPEC, "examples/PoolExists.json");
    report.check_batch(&ex, &reply, &[], BATCH_EXEMPT).await;
    if reply.status != 404 {
        report.fail(&ex, format!("a missing pool answered {}", reply.status));
    }

    // PoolResize: its pool, steady.
    let mut resize_pool = pool_id.clone();
    resize_pool["id"] = json!("resizePool");
    add_pool(&emu, &token, &resize_pool).await;
    emu.advance(1800.0).await;
    let ex = Example::of(BATCH_SPEC, "examples/PoolResize.json");
    let reply = report.send(&ex, &account).await;
    report.check_batch(&ex, &reply, &[], BATCH_EXEMPT).await;

    let ex = Example::of(BATCH_SPEC, "examples/PoolDelete.json");
    let reply = report.send(&ex, &account).await;
    report.check_batch(&ex, &reply, &[], BATCH_EXEMPT).await;
    report.finish();
}

#[tokio::test]
async fn batch_nodes() {
    let emu = start_examples().await;
    let token = emu.batch_token().await;
    let mut report = Report::new(&emu, &token);
    let account = emu.batch_url("account");

    // The example pool: three dedicated nodes with the examples' start task (a Windows command, so a
    // Windows image), all idle once the clock has moved on.
    let ex = Example::of(BATCH_SPEC, "examples/NodeList.json");
    let shown = &ex.response(200)["body"]["value"][0];
    add_pool(
        &emu,
        &token,
        &json!({"id": ex.param("poolId"), "vmSize": "standard_d2s_v3", "virtualMachineConfiguration": {
            "imageReference": {"publisher": "MicrosoftWindowsServer", "offer": "WindowsServer", "sku": "2019-datacenter"},
            "nodeAgentSKUId": "batch.node.windows amd64"},
            "targetDedicatedNodes": 3, "startTask": shown["startTask"]}),
    )
    .await;
    emu.advance(1800.0).await;

    let reply = report.send(&ex, &account).await;
    report.check_batch(&ex, &reply, &[], BATCH_EXEMPT_NO_ENTITY).await;
    let first_node = reply.body["value"][0]["id"].clone();

    let ex = Example::newer(
        BATCH_SPEC,
        "examples/NodeList.json",
        "batch/data-plane/Azure.Batch/stable/2025-06-01/examples/Nodes_ListNodes.json",
    );
    let reply = report.send(&ex, &account).await;
    report.check_batch(&ex, &reply, &[], BATCH_EXEMPT_NO_ENTITY).await;

    // Node ids are the emulator's: the example's node is replaced by the first node listed.
    let ex = Example::of(BATCH_SPEC, "examples/NodeGet_Basic.json").with("nodeId", first_node);
    let reply = report.send(&ex, &account).await;
    report.check_batch(&ex, &reply, &[], BATCH_EXEMPT_NO_ENTITY).await;

    // The example's start task states maxTaskRetryCount; one that leaves it to its default (0) must
    // still report a start task that ran as the example does (retryCount is a required integer).
    add_pool(
        &emu,
        &token,
        &json!({"id": "defaultsPool", "vmSize": "standard_d2s_v3", "virtualMachineConfiguration": {
            "imageReference": {"publisher": "MicrosoftWindowsServer", "offer": "WindowsServer", "sku": "2019-datacenter"},
            "nodeAgentSKUId": "batch.node.windows amd64"},
            "targetDedicatedNodes": 1, "startTask": {"commandLine": "cmd /c echo hello"}}),
    )
    .await;
    emu.advance(1800.0).await;
    let nodes = emu
        .get(
            &format!("{account}/pools/defaultsPool/nodes?api-version=2024-07-01.20.0"),
            &token,
        )
        .await;
    expect(&nodes, &[200], "list the nodes of defaultsPool");
    for mismatch in check_shape(
        &ex.response(200)["body"]["startTaskInfo"],
        &nodes.body["value"][0]["startTaskInfo"],
        "$.startTaskInfo",
        &[],
    ) {
        report.fail(&ex, format!("(start task with default retries) {mismatch}"));
    }
    report.finish();
}

#[tokio::test]
async fn batch_images_and_counts() {
    let emu = start_examples().await;
    let token = emu.batch_token().await;
    let mut report = Report::new(&emu, &token);
    let account = emu.batch_url("account");

    let ex = Example::of(BATCH_SPEC, "examples/AccountListSupportedImages.json");
    let reply = report.send(&ex, &account).await;
    report.check_batch(&ex, &reply, &[], BATCH_EXEMPT_NO_ENTITY).await;
    let ex = Example::newer(
        BATCH_SPEC,
        "examples/AccountListSupportedImages.json",
        "batch/data-plane/Azure.Batch/stable/2025-06-01/examples/Pools_ListSupportedImages.json",
    );
    let reply = report.send(&ex, &account).await;
    report.check_batch(&ex, &reply, &[], BATCH_EXEMPT_NO_ENTITY).await;

    // The counts example's pools: pool1 with low-priority nodes, pool2 with dedicated ones, pool3
    // with both.
    for (id, dedicated, low) in [("pool1", 0, 3), ("pool2", 4, 0), ("pool3", 9, 11)] {
        add_pool(
            &emu,
            &token,
            &json!({"id": id, "vmSize": "standard_d2s_v3", "virtualMachineConfiguration": {
                "imageReference": {"publisher": "Canonical", "offer": "0001-com-ubuntu-server-focal", "sku": "20_04-lts"},
                "nodeAgentSKUId": "batch.node.ubuntu 20.04"},
                "targetDedicatedNodes": dedicated, "targetLowPriorityNodes": low}),
        )
        .await;
    }
    emu.advance(1800.0).await;
    let ex = Example::of(BATCH_SPEC, "examples/AccountListPoolNodeCounts.json");
    let reply = report.send(&ex, &account).await;
    report.check_batch(&ex, &reply, &[], BATCH_EXEMPT).await;
    let listed: Vec<&str> = reply.body["value"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["poolId"].as_str())
        .collect();
    if listed != ["pool1", "pool2", "pool3"] {
        report.fail(&ex, format!("counts are for {listed:?}, not the three pools"));
    }
    report.finish();
}

// ------------------------------------------------------------------------------------------------
// The comparison itself

#[test]
fn check_shape_reports_missing_and_mistyped_fields_by_path() {
    let example = json!({
        "a": 1, "b": "x", "c": {"d": [{"e": true}, {"f": 2}]}, "g": null, "h": [1], "skip": {"me": 1}
    });
    let good = json!({"a": 7, "b": "y", "c": {"d": [{"f": 3}, {"e": false, "extra": 1}]}, "g": 5, "h": [2, 3]});
    assert_eq!(check_shape(&example, &good, "$", &["skip"]), Vec::<String>::new());
    let bad = json!({"a": 1.5, "b": 3, "c": {"d": [{"e": "no"}]}, "g": null, "h": [], "skip": {}});
    let found = check_shape(&example, &bad, "$", &["skip.me"]);
    for expected in [
        "$.a: the example has a integer, the answer a number",
        "$.b: the example has a string, the answer a integer",
        "$.c.d: no element matches the example's element [0]",
        "    $.c.d[0].e: the example has a boolean, the answer a string",
        "$.c.d: no element matches the example's element [1]",
        "    $.c.d[0].f: missing",
        "$.h: the example has 1 element(s), the answer none",
    ] {
        assert!(
            found.iter().any(|m| m.starts_with(expected)),
            "{expected:?} not reported: {found:#?}"
        );
    }
    assert!(check_shape(&example, &json!({}), "$", &[]).len() >= 5);
}
