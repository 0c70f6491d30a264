//! Batch pools and their nodes. Adding a pool checks what Batch checks for a gallery image (it
//! exists, is generalized, matches the node agent SKU's OS, has a completed replica in the account's
//! region, the caller may read it; cross-subscription needs `Microsoft.Batch` registered there and the
//! same tenant) and fixes the allocation: its length grows with the node count and shrinks with the
//! replicas in the region (one per 600 nodes keeps it within 15 minutes per 1000 nodes); past the
//! resize timeout the pool goes steady with `AllocationTimedout` and fewer nodes.

use serde_json::{Map, Value, json};
use time::Duration;
use time::format_description::well_known::{Rfc2822, Rfc3339};

use super::body;
use super::images;
use super::quota;
use super::{BatchCaller, account_url, error, ok_json};
use crate::emulator::Ctx;
use crate::emulator::arm_view;
use crate::emulator::clock::EmuTime;
use crate::emulator::http::{Request, Response};
use crate::emulator::state::{Allocation, Node, POOL_DELETE, Pool, ResizeErrorInfo, State};
use crate::emulator::world::BatchAccount;

/// Nodes one replica serves in the allocation model (the Batch document's figure).
const NODES_PER_REPLICA: f64 = 600.0;
/// Allocation time per 1000 nodes with enough replicas; under the 15 minutes the document asks for.
const MINUTES_PER_1000_NODES: f64 = 12.0;
const ALLOCATION_START: Duration = Duration::minutes(1);
const PAGE_MAX: usize = 1000;
/// Node counts come 10 a page at most (the specification's `maxresults` for this list).
const NODE_COUNTS_PAGE_MAX: usize = 10;

pub fn route(ctx: &Ctx, req: &Request, account: &BatchAccount, caller: &BatchCaller) -> Response {
    let s: Vec<&str> = req.segments.iter().skip(2).map(String::as_str).collect();
    let method = req.method.as_str();
    let now = ctx.clock.now();
    let mut st = ctx.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    st.purge(now);
    let (resp, changed) = match (method, s.as_slice()) {
        ("GET", ["supportedimages"]) => (supported_images(req, account), false),
        ("GET", ["nodecounts"]) => (node_counts(&st, req, account, now), false),
        ("POST", ["pools"]) => match add_pool(ctx, &mut st, req, account, caller, now) {
            Ok(created) => (created, true),
            Err(refused) => (refused, false),
        },
        ("GET", ["pools"]) => (list_pools(ctx, &st, req, account, now), false),
        (_, ["pools", id]) => match st.pools.get(&State::pool_key(&account.name, id)).cloned() {
            None if method == "HEAD" => (Response::empty(404), false),
            None => (pool_not_found(req), false),
            Some(pool) => {
                if pool.uses_gallery_image && matches!(caller, BatchCaller::SharedKey) {
                    (shared_key_refused(req), false)
                } else {
                    match method {
                        "GET" => (
                            ok_json(200, &selected(req, render_pool(ctx, &pool, now)))
                                .with_header("etag", etag(&pool))
                                .with_header("last-modified", rfc1123(pool.last_modified)),
                            false,
                        ),
                        "HEAD" => (
                            Response::empty(200)
                                .with_header("etag", etag(&pool))
                                .with_header("last-modified", rfc1123(pool.last_modified)),
                            false,
                        ),
                        "DELETE" => delete_pool(&mut st, req, pool, now),
                        "PATCH" => patch_pool(&mut st, req, pool, now),
                        _ => (
                            error(
                                req,
                                405,
                                "UnsupportedHttpVerb",
                                "The resource doesn't support the specified HTTP verb.",
                                &[],
                            ),
                            false,
                        ),
                    }
                }
            }
        },
        ("POST", ["pools", id, "resize"]) => resize_pool(ctx, &mut st, req, account, id, now),
        ("GET", ["pools", id, "nodes"]) => (list_nodes(ctx, &st, req, account, id, now), false),
        ("GET", ["pools", id, "nodes", node]) => (get_node(ctx, &st, req, account, id, node, now), false),
        _ => (
            error(
                req,
                404,
                "InvalidUri",
                "The requested URI does not represent any resource on the server.",
                &[],
            ),
            false,
        ),
    };
    if changed {
        ctx.save(&st);
    }
    resp
}

fn pool_not_found(req: &Request) -> Response {
    error(req, 404, "PoolNotFound", "The specified pool does not exist.", &[])
}

fn shared_key_refused(req: &Request) -> Response {
    error(
        req,
        403,
        "AuthenticationFailed",
        "Server failed to authenticate the request. Make sure the value of Authorization header is formed correctly including the signature.",
        &[(
            "AuthenticationErrorDetail",
            "The specified type of authentication SharedKey is not allowed when external resources of type Compute are linked.",
        )],
    )
}

fn etag(pool: &Pool) -> String {
    format!("0x8DE{:013X}", pool.etag_counter)
}

fn rfc1123(t: EmuTime) -> String {
    t.format(&Rfc2822).unwrap_or_default().replace("+0000", "GMT")
}

fn stamp(t: EmuTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// ISO 8601 durations as Batch takes them (`PT15M`, `PT1H30M`, `P1DT2H`, `PT90S`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let rest = text.strip_prefix('P')?;
    let (days, time_part) = match rest.split_once('T') {
        Some((d, t)) => (d, t),
        None => (rest, ""),
    };
    let mut total = 0.0;
    let mut take = |part: &str, units: &[(char, f64)]| -> Option<()> {
        let mut number = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' {
                number.push(c);
            } else {
                let factor = units.iter().find(|(u, _)| *u == c)?.1;
                total += number.parse::<f64>().ok()? * factor;
                number.clear();
            }
        }
        number.is_empty().then_some(())
    };
    take(days, &[('D', 86_400.0), ('W', 604_800.0)])?;
    take(time_part, &[('H', 3600.0), ('M', 60.0), ('S', 1.0)])?;
    // A year at most: what no pool needs, and a number no clock arithmetic overflows on.
    (rest != "T" && !rest.is_empty() && total.is_finite() && total <= 365.0 * 86_400.0)
        .then(|| Duration::seconds_f64(total))
}

fn supported_images(req: &Request, _account: &BatchAccount) -> Response {
    let all: Vec<Value> = images::SUPPORTED.iter().map(images::to_json).collect();
    page(req, all, "supportedimages")
}

/// One page of `items` with `odata.nextLink` when more remain.
fn page(req: &Request, items: Vec<Value>, path: &str) -> Response {
    page_of(req, items, path, PAGE_MAX)
}

/// One page of at most `page_max` of `items` (fewer when `maxresults` asks), with
/// `odata.nextLink` when more remain.
fn page_of(req: &Request, items: Vec<Value>, path: &str, page_max: usize) -> Response {
    let max = req
        .query("maxresults")
        .and_then(|m| m.parse::<usize>().ok())
        .unwrap_or(page_max)
        .clamp(1, page_max);
    let skip = req
        .query("$skiptoken")
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(0);
    let total = items.len();
    let value: Vec<Value> = items.into_iter().skip(skip).take(max).collect();
    let mut body = json!({ "value": value });
    if skip + max < total {
        let account = req.segments.get(1).cloned().unwrap_or_default();
        let api = req.query("api-version").unwrap_or_default();
        let mut link = format!(
            "{}/{path}?api-version={api}&maxresults={max}&$skiptoken={}",
            account_url(&req.base_url, &account),
            skip + max
        );
        for kept in ["$filter", "$select"] {
            if let Some(value) = req.query(kept) {
                link.push_str(&format!(
                    "&{kept}={}",
                    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
                ));
            }
        }
        body["odata.nextLink"] = json!(link);
    }
    ok_json(200, &body)
}

fn bad_property(req: &Request, name: &str, reason: &str) -> Response {
    error(
        req,
        400,
        "InvalidPropertyValue",
        "The value provided for one of the properties in the request body is invalid.",
        &[("PropertyName", name), ("Reason", reason)],
    )
}

fn missing_property(req: &Request, name: &str) -> Response {
    error(
        req,
        400,
        "MissingRequiredProperty",
        "A required property was not specified in the request body.",
        &[("PropertyName", name)],
    )
}

/// The most nodes one pool may ask for here: what bounds the cost of one request (each node's
/// timeline is fixed when the pool is added).
const MAX_POOL_NODES: u32 = 100_000;

/// A node count from a body [`body::read`] has read (a string holding a number is a number by
/// now); absent means 0, a negative count is refused with `InvalidPropertyValue`.
fn node_count(req: &Request, body: &Value, key: &str) -> Result<u32, Response> {
    if body[key].is_null() {
        return Ok(0);
    }
    body[key]
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| bad_property(req, key, "The value must be a whole number of nodes from 0."))
}

/// The shapes of the optional parts of a pool body this emulator reads: refused as Batch refuses
/// them rather than read as something else.
fn check_pool_shape(req: &Request, body: &Value) -> Result<(), Response> {
    let metadata_ok = match &body["metadata"] {
        Value::Null => true,
        Value::Array(items) => items.iter().all(|m| m["name"].is_string() && m["value"].is_string()),
        _ => false,
    };
    if !metadata_ok {
        return Err(bad_property(
            req,
            "metadata",
            "Metadata is a list of name and value strings.",
        ));
    }
    for key in ["startTask", "virtualMachineConfiguration", "networkConfiguration"] {
        if !matches!(body[key], Value::Null | Value::Object(_)) {
            return Err(bad_property(req, key, "The value must be an object."));
        }
    }
    for key in ["vmSize", "resizeTimeout", "displayName"] {
        if !matches!(body[key], Value::Null | Value::String(_)) {
            return Err(bad_property(req, key, "The value must be a string."));
        }
    }
    Ok(())
}

/// Add Pool: Batch's checks first (the first that fails is the answer, and nothing changes), then
/// the pool as asked with nothing allocated yet, its allocation fixed now (the fault plan may fail
/// it, or fail some nodes' start task), stored, and 201.
fn add_pool(
    ctx: &Ctx,
    st: &mut State,
    req: &Request,
    account: &BatchAccount,
    caller: &BatchCaller,
    now: EmuTime,
) -> Result<Response, Response> {
    let asked = accepted_pool(ctx, st, req, account, caller, now)?;
    let start_task = StartTask::of(&asked.body);
    let faults = PoolFaults::drawn(ctx, &asked.id, start_task.present);
    let mut pool = Pool {
        account: account.name.clone(),
        id: asked.id.clone(),
        body: asked.body,
        created: now,
        last_modified: now,
        etag_counter: st.serial(),
        allocation: Allocation {
            started: now,
            ends: now,
            target_dedicated: asked.dedicated,
            target_low_priority: asked.low_priority,
            resize_timeout_secs: asked.resize_timeout.whole_seconds(),
            error: None,
        },
        nodes: Vec::new(),
        deleting: None,
        wait_for_start_task: start_task.wait_for_success,
        has_start_task: start_task.present,
        uses_gallery_image: asked.image.from_gallery,
    };
    let vm_size = pool.body["vmSize"].as_str().unwrap_or_default().to_string();
    let room = quota::room(st, account, &pool.id, &vm_size, now);
    allocate(
        ctx,
        &mut pool,
        asked.dedicated,
        asked.low_priority,
        asked.resize_timeout,
        asked.image.replicas_in_region,
        faults.allocation_failure,
        faults.start_task_failure_share,
        room,
        now,
    );
    let resp = pool_created(req, account, &pool, now);
    st.pools.insert(asked.key, pool);
    Ok(resp)
}

/// An Add Pool request that passed Batch's checks: what the new pool is made of.
struct AcceptedPool {
    /// The pool's key in the state (account and id).
    key: String,
    id: String,
    body: Value,
    resize_timeout: Duration,
    image: BootImage,
    dedicated: u32,
    low_priority: u32,
}

/// Batch's checks of an Add Pool request, in Batch's order: the body and its shape, the id, the
/// VM size, the VM configuration, no autoscale, an id not taken, the resize timeout, the node
/// agent SKU and the image, the node counts.
fn accepted_pool(
    ctx: &Ctx,
    st: &State,
    req: &Request,
    account: &BatchAccount,
    caller: &BatchCaller,
    now: EmuTime,
) -> Result<AcceptedPool, Response> {
    let body = pool_body(req)?;
    let id = pool_id(req, &body)?;
    check_vm_size(req, &body)?;
    let vm = vm_configuration(req, &body)?;
    check_not_autoscale(req, &body)?;
    let key = State::pool_key(&account.name, &id);
    if st.pools.contains_key(&key) {
        return Err(error(req, 409, "PoolExists", "The specified pool already exists.", &[]));
    }
    check_pool_quota(st, req, account)?;
    let resize_timeout = resize_timeout(req, &body)?;
    let image = boot_image(ctx, st, req, account, caller, &vm, now)?;
    let dedicated = node_count(req, &body, "targetDedicatedNodes")?;
    let low_priority = node_count(req, &body, "targetLowPriorityNodes")?;
    check_pool_size(req, dedicated, low_priority)?;
    Ok(AcceptedPool {
        key,
        id,
        body,
        resize_timeout,
        image,
        dedicated,
        low_priority,
    })
}

/// Batch refuses a pool past the account's `poolQuota`, counting every pool it holds, one being
/// deleted too (a retry of an add that went through meets `PoolExists` first).
fn check_pool_quota(st: &State, req: &Request, account: &BatchAccount) -> Result<(), Response> {
    let held = st
        .pools
        .values()
        .filter(|pool| pool.account.eq_ignore_ascii_case(&account.name))
        .count();
    if held >= account.pool_quota as usize {
        return Err(error(
            req,
            409,
            "PoolQuotaReached",
            "Pool quota for the account has been reached.",
            &[],
        ));
    }
    Ok(())
}

/// A pool body is a JSON object, and its optional parts have the shapes Batch reads.
fn pool_body(req: &Request) -> Result<Value, Response> {
    let body = Value::Object(body::read(req, body::POOL)?);
    check_pool_shape(req, &body)?;
    Ok(body)
}

/// A pool id is required and has 1 to 64 letters, digits, hyphens and underscores.
fn pool_id(req: &Request, body: &Value) -> Result<String, Response> {
    let Some(id) = body["id"].as_str() else {
        return Err(missing_property(req, "id"));
    };
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
        return Err(bad_property(
            req,
            "id",
            "A pool id has 1 to 64 letters, digits, hyphens and underscores.",
        ));
    }
    Ok(id.to_string())
}

/// A pool names its VM size, and Batch offers that size.
fn check_vm_size(req: &Request, body: &Value) -> Result<(), Response> {
    match body["vmSize"].as_str() {
        None => Err(missing_property(req, "vmSize")),
        Some(size) if !crate::emulator::vm_sizes::offered(size) => Err(bad_property(
            req,
            "vmSize",
            "The specified VM size is not supported by Batch.",
        )),
        Some(_) => Ok(()),
    }
}

/// What a pool's `virtualMachineConfiguration` names: the node agent SKU and the image.
struct VmConfiguration<'a> {
    node_agent_sku: &'a str,
    image: ImageReference<'a>,
}

/// The image a pool's nodes boot: a Compute Gallery image (version) by its ARM id, or a
/// marketplace image by publisher, offer and SKU.
enum ImageReference<'a> {
    Gallery {
        id: &'a str,
    },
    Marketplace {
        publisher: &'a str,
        offer: &'a str,
        sku: &'a str,
    },
}

/// A pool has a `virtualMachineConfiguration` with a node agent SKU and an image reference.
fn vm_configuration<'a>(req: &Request, body: &'a Value) -> Result<VmConfiguration<'a>, Response> {
    let Some(vm_config) = body.get("virtualMachineConfiguration").filter(|v| v.is_object()) else {
        return Err(missing_property(req, "virtualMachineConfiguration"));
    };
    let Some(node_agent_sku) = vm_config["nodeAgentSKUId"].as_str() else {
        return Err(missing_property(req, "nodeAgentSKUId"));
    };
    let Some(image_ref) = vm_config.get("imageReference").filter(|v| v.is_object()) else {
        return Err(missing_property(req, "imageReference"));
    };
    let image = match image_ref["virtualMachineImageId"].as_str() {
        Some(id) => ImageReference::Gallery { id },
        None => ImageReference::Marketplace {
            publisher: image_ref["publisher"].as_str().unwrap_or_default(),
            offer: image_ref["offer"].as_str().unwrap_or_default(),
            sku: image_ref["sku"].as_str().unwrap_or_default(),
        },
    };
    Ok(VmConfiguration { node_agent_sku, image })
}

/// This emulator refuses autoscale pools: it models fixed targets only.
fn check_not_autoscale(req: &Request, body: &Value) -> Result<(), Response> {
    if body["enableAutoScale"].as_bool() == Some(true) {
        return Err(bad_property(
            req,
            "enableAutoScale",
            "Autoscale pools are not supported by this emulator.",
        ));
    }
    Ok(())
}

/// The resize timeout is an ISO 8601 duration of at least 5 minutes; 15 minutes when absent.
fn resize_timeout(req: &Request, body: &Value) -> Result<Duration, Response> {
    let Some(text) = body["resizeTimeout"].as_str() else {
        return Ok(Duration::minutes(15));
    };
    match parse_duration(text) {
        Some(d) if d >= Duration::minutes(5) => Ok(d),
        Some(_) => Err(bad_property(
            req,
            "resizeTimeout",
            "The resize timeout must be at least 5 minutes.",
        )),
        None => Err(bad_property(
            req,
            "resizeTimeout",
            "The value is not a valid ISO 8601 duration.",
        )),
    }
}

/// What the allocation model needs to know of a pool's image.
struct BootImage {
    /// A gallery image: Shared Key callers may not reach the pool afterwards.
    from_gallery: bool,
    /// Replicas of the image in the account's region, which bound how fast nodes allocate.
    replicas_in_region: u32,
}

/// The node agent SKU is one Batch supports, and the image is one Batch can boot with it: a
/// gallery image Batch may use (checked through ARM, for an AAD caller only) of the SKU's OS, or a
/// supported marketplace image whose SKU it is.
fn boot_image(
    ctx: &Ctx,
    st: &State,
    req: &Request,
    account: &BatchAccount,
    caller: &BatchCaller,
    vm: &VmConfiguration,
    now: EmuTime,
) -> Result<BootImage, Response> {
    let sku = vm.node_agent_sku;
    let Some(sku_os) = images::sku_os(sku) else {
        return Err(bad_property(
            req,
            "nodeAgentSKUId",
            &format!("The node agent SKU '{sku}' is not supported."),
        ));
    };
    match vm.image {
        ImageReference::Gallery { id } => {
            let BatchCaller::Aad { oid } = caller else {
                return Err(shared_key_refused(req));
            };
            let found = arm_view::gallery_image_for_pool(ctx, st, id, account, oid, now)
                .map_err(|refusal| error(req, refusal.status, &refusal.code, &refusal.message, &refusal.values()))?;
            if !found.os_type.eq_ignore_ascii_case(sku_os) {
                return Err(bad_property(
                    req,
                    "nodeAgentSKUId",
                    &format!(
                        "The node agent SKU '{sku}' is for {sku_os} images but the image '{id}' is {}.",
                        found.os_type
                    ),
                ));
            }
            Ok(BootImage {
                from_gallery: true,
                replicas_in_region: found.replicas_in_region,
            })
        }
        ImageReference::Marketplace {
            publisher,
            offer,
            sku: image_sku,
        } => marketplace_image(req, sku, publisher, offer, image_sku),
    }
}

/// A marketplace image is one Batch supports, with the node agent SKU Batch pairs with it.
fn marketplace_image(
    req: &Request,
    sku: &str,
    publisher: &str,
    offer: &str,
    image_sku: &str,
) -> Result<BootImage, Response> {
    match images::find_marketplace(publisher, offer, image_sku) {
        // Azure serves marketplace images from its own copies: counted as the most replicas a region
        // may hold of a gallery image.
        Some(image) if image.node_agent_sku.eq_ignore_ascii_case(sku) => Ok(BootImage {
            from_gallery: false,
            replicas_in_region: 100,
        }),
        Some(image) => Err(bad_property(
            req,
            "nodeAgentSKUId",
            &format!(
                "The image {publisher}/{offer}/{image_sku} needs node agent SKU '{}'.",
                image.node_agent_sku
            ),
        )),
        None => Err(bad_property(
            req,
            "imageReference",
            "The specified image is not supported by Batch.",
        )),
    }
}

/// A pool of this emulator has at most `MAX_POOL_NODES` nodes, dedicated and low-priority together.
fn check_pool_size(req: &Request, dedicated: u32, low_priority: u32) -> Result<(), Response> {
    // Summed wide: two u32 counts near the maximum must not wrap into a small pool.
    if u64::from(dedicated) + u64::from(low_priority) > u64::from(MAX_POOL_NODES) {
        return Err(bad_property(
            req,
            "targetDedicatedNodes",
            &format!("A pool of this emulator has at most {MAX_POOL_NODES} nodes."),
        ));
    }
    Ok(())
}

/// A pool's start task as its nodes see it: whether there is one, and whether a node waits for it
/// to succeed before it is idle (Batch's default when a start task is given).
struct StartTask {
    present: bool,
    wait_for_success: bool,
}

impl StartTask {
    fn of(body: &Value) -> StartTask {
        let present = body.get("startTask").is_some_and(Value::is_object);
        StartTask {
            present,
            wait_for_success: present && body["startTask"]["waitForSuccess"].as_bool().unwrap_or(true),
        }
    }
}

/// What the fault plan does to a new pool: the resize error its allocation ends with, and the share
/// of its nodes whose start task fails (asked only when it has a start task, so a pool without one
/// takes no draw from a start-task rule).
struct PoolFaults {
    allocation_failure: Option<String>,
    start_task_failure_share: f64,
}

impl PoolFaults {
    fn drawn(ctx: &Ctx, pool: &str, has_start_task: bool) -> PoolFaults {
        let mut faults = ctx.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let allocation_failure = faults.allocation_fails(pool);
        let start_task_failure_share = if has_start_task {
            faults.start_task_failure_share(pool)
        } else {
            0.0
        };
        PoolFaults {
            allocation_failure,
            start_task_failure_share,
        }
    }
}

/// 201 as Batch answers an add: the pool's ETag and last-modified time, and its URL as both
/// `DataServiceId` and `Location`.
fn pool_created(req: &Request, account: &BatchAccount, pool: &Pool, now: EmuTime) -> Response {
    let url = format!("{}/pools/{}", account_url(&req.base_url, &account.name), pool.id);
    Response::empty(201)
        .with_header("etag", etag(pool))
        .with_header("last-modified", rfc1123(now))
        .with_header("dataserviceid", url.clone())
        .with_header("location", url)
}

/// What a resize of `pool` meets: the replicas of its image in the account's region, the share
/// of start tasks the fault plan fails, and the room the account's core quotas leave.
fn resize_conditions(
    ctx: &Ctx,
    st: &State,
    account: &BatchAccount,
    pool: &Pool,
    now: EmuTime,
) -> (u32, f64, quota::Room) {
    let replicas = pool
        .body
        .pointer("/virtualMachineConfiguration/imageReference/virtualMachineImageId")
        .and_then(Value::as_str)
        .and_then(|image| arm_view::replicas_in_region(st, image, &account.location, now))
        .unwrap_or(100);
    let fail_share = if pool.has_start_task {
        ctx.faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .start_task_failure_share(&pool.id)
    } else {
        0.0
    };
    let vm_size = pool.body["vmSize"].as_str().unwrap_or_default();
    (replicas, fail_share, quota::room(st, account, &pool.id, vm_size, now))
}

/// Fixes an allocation episode: when each new node arrives, which fail their start task, and
/// whether the resize timeout cuts the allocation short.
#[allow(clippy::too_many_arguments)]
fn allocate(
    ctx: &Ctx,
    pool: &mut Pool,
    dedicated: u32,
    low: u32,
    timeout: Duration,
    replicas: u32,
    failure: Option<String>,
    fail_share: f64,
    room: quota::Room,
    now: EmuTime,
) {
    let alive: Vec<usize> = (0..pool.nodes.len())
        .filter(|i| pool.nodes[*i].removed.is_none())
        .collect();
    let have_dedicated = alive.iter().filter(|i| pool.nodes[**i].dedicated).count() as u32;
    let have_low = alive.len() as u32 - have_dedicated;
    let mut ends = now + ALLOCATION_START;
    let mut error = None;
    // Shrink first: surplus nodes leave over a minute.
    for (want, is_dedicated, have) in [(dedicated, true, have_dedicated), (low, false, have_low)] {
        if have > want {
            let mut surplus = have - want;
            for i in alive.iter().rev() {
                if surplus == 0 {
                    break;
                }
                if pool.nodes[*i].dedicated == is_dedicated {
                    pool.nodes[*i].removed = Some(now + Duration::minutes(1));
                    surplus -= 1;
                }
            }
            ends = ends.max(now + Duration::minutes(1));
        }
    }
    // Only what the account's cores allow arrives; the quota that stops the rest is the error.
    let quota_reached = if dedicated > room.dedicated {
        Some(room.dedicated_code)
    } else if low > room.low_priority {
        Some(quota::LOW_PRIORITY_CORE_QUOTA_REACHED)
    } else {
        None
    };
    let add_dedicated = dedicated.min(room.dedicated).saturating_sub(have_dedicated);
    let add_low = low.min(room.low_priority).saturating_sub(have_low);
    let adding = add_dedicated + add_low;
    if let Some(code) = failure {
        error = Some(ResizeErrorInfo {
            message: match code.as_str() {
                "AccountCoreQuotaReached" => "The specified account has reached its VM core quota.".to_string(),
                _ => "Desired number of nodes could not be allocated due to an allocation failure in the region."
                    .to_string(),
            },
            code,
        });
        ends = now + Duration::minutes(2);
    } else if adding > 0 {
        let required = (adding as f64 / NODES_PER_REPLICA).ceil().max(1.0);
        let slowdown = (required / replicas.max(1) as f64).max(1.0);
        let span_secs = MINUTES_PER_1000_NODES * 60.0 * adding as f64 / 1000.0
            * slowdown
            * ctx.jitter(&format!("alloc:{}:{}", pool.id, now), 0.05);
        let deadline = now + timeout;
        let arriving = Arrivals {
            dedicated: add_dedicated,
            total: adding,
            span_secs,
            deadline,
            fail_share,
        };
        add_nodes(ctx, pool, &arriving, now);
        let full = now + ALLOCATION_START + Duration::seconds_f64(span_secs);
        if full > deadline {
            ends = deadline;
            error = Some(ResizeErrorInfo {
                code: "AllocationTimedout".to_string(),
                message: "Desired number of dedicated nodes could not be allocated as the resize timeout was reached"
                    .to_string(),
            });
        } else {
            ends = ends.max(full);
        }
    }
    if let Some(code) = quota_reached.filter(|_| error.is_none() || adding > 0) {
        // Azure keeps trying for more until the resize timeout, then settles at the quota.
        ends = ends.max(now + timeout);
        error = Some(ResizeErrorInfo {
            code: code.to_string(),
            message: quota::message(code).to_string(),
        });
    }
    pool.allocation = Allocation {
        started: now,
        ends,
        target_dedicated: dedicated,
        target_low_priority: low,
        resize_timeout_secs: timeout.whole_seconds(),
        error,
    };
}

/// The nodes one allocation adds: how many (the first `dedicated` of them dedicated), spread over
/// `span_secs`, none after `deadline`.
struct Arrivals {
    dedicated: u32,
    total: u32,
    span_secs: f64,
    deadline: EmuTime,
    fail_share: f64,
}

/// Fixes each arriving node: when it is allocated, how long it boots, whether its start task fails.
fn add_nodes(ctx: &Ctx, pool: &mut Pool, arriving: &Arrivals, now: EmuTime) {
    let first_index = pool.nodes.len();
    for k in 0..arriving.total {
        let index = first_index + k as usize;
        let share = (k + 1) as f64 / arriving.total as f64;
        let allocated = now + ALLOCATION_START + Duration::seconds_f64(arriving.span_secs * share);
        if allocated > arriving.deadline {
            continue;
        }
        let node_key = format!("node:{}:{index}", pool.id);
        let fail_share = arriving.fail_share;
        pool.nodes.push(Node {
            id: format!("tvmps_{:016x}_d", hash_of(ctx, &node_key)),
            dedicated: k < arriving.dedicated,
            allocated,
            boot_secs: (90.0 * ctx.jitter(&format!("{node_key}:boot"), 0.3)) as u32,
            agent_secs: (45.0 * ctx.jitter(&format!("{node_key}:agent"), 0.3)) as u32,
            start_task_secs: (40.0 * ctx.jitter(&format!("{node_key}:task"), 0.4)) as u32,
            start_task_fails: fail_share > 0.0 && ctx.jitter(&format!("{node_key}:fails"), 0.5) - 0.5 < fail_share,
            removed: None,
        });
    }
}

fn hash_of(ctx: &Ctx, key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (ctx.seed, key).hash(&mut h);
    h.finish()
}

/// A node's state at `now`, or `None` when it is not (or no longer) in the pool.
fn node_state(pool: &Pool, node: &Node, now: EmuTime) -> Option<&'static str> {
    if now < node.allocated {
        return None;
    }
    if let Some(removed) = node.removed {
        if now >= removed {
            return None;
        }
        return Some("leavingpool");
    }
    let t = (now - node.allocated).whole_seconds();
    let booted = node.boot_secs as i64;
    let agent = booted + node.agent_secs as i64;
    Some(if t < booted {
        "creating"
    } else if t < agent {
        "starting"
    } else if pool.wait_for_start_task && t < agent + node.start_task_secs as i64 {
        "waitingforstarttask"
    } else if pool.wait_for_start_task && node.start_task_fails {
        "starttaskfailed"
    } else {
        "idle"
    })
}

fn render_pool(ctx: &Ctx, pool: &Pool, now: EmuTime) -> Value {
    let _ = ctx;
    let mut out = pool.body.clone();
    let obj = out.as_object_mut().expect("pool bodies are objects");
    let resizing = now < pool.allocation.ends;
    let present: Vec<&Node> = pool
        .nodes
        .iter()
        .filter(|n| n.allocated <= now && n.removed.is_none_or(|r| now < r))
        .collect();
    let url = format!("{}/pools/{}", account_url(&ctx.base_url, &pool.account), pool.id);
    let deleting = pool.deleting.is_some();
    obj.insert("url".into(), json!(url));
    obj.insert("eTag".into(), json!(etag(pool)));
    obj.insert("lastModified".into(), json!(stamp(pool.last_modified)));
    obj.insert("creationTime".into(), json!(stamp(pool.created)));
    obj.insert("state".into(), json!(if deleting { "deleting" } else { "active" }));
    obj.insert(
        "stateTransitionTime".into(),
        json!(stamp(pool.deleting.unwrap_or(pool.created))),
    );
    obj.insert(
        "allocationState".into(),
        json!(if resizing { "resizing" } else { "steady" }),
    );
    obj.insert(
        "allocationStateTransitionTime".into(),
        json!(stamp(if resizing {
            pool.allocation.started
        } else {
            pool.allocation.ends
        })),
    );
    obj.insert(
        "resizeTimeout".into(),
        json!(format!("PT{}S", pool.allocation.resize_timeout_secs)),
    );
    obj.insert(
        "currentDedicatedNodes".into(),
        json!(present.iter().filter(|n| n.dedicated).count()),
    );
    obj.insert(
        "currentLowPriorityNodes".into(),
        json!(present.iter().filter(|n| !n.dedicated).count()),
    );
    obj.insert("targetDedicatedNodes".into(), json!(pool.allocation.target_dedicated));
    obj.insert(
        "targetLowPriorityNodes".into(),
        json!(pool.allocation.target_low_priority),
    );
    obj.entry("enableAutoScale").or_insert(json!(false));
    obj.entry("enableInterNodeCommunication").or_insert(json!(false));
    obj.entry("taskSlotsPerNode").or_insert(json!(1));
    obj.entry("taskSchedulingPolicy")
        .or_insert(json!({"nodeFillType": "Spread"}));
    // Nodes talk to Batch the simplified way only when the pool asks for it.
    let simplified = pool.body["targetNodeCommunicationMode"]
        .as_str()
        .is_some_and(|m| m.eq_ignore_ascii_case("simplified"));
    obj.insert(
        "currentNodeCommunicationMode".into(),
        json!(if simplified { "simplified" } else { "classic" }),
    );
    if let (false, Some(err)) = (resizing, &pool.allocation.error) {
        obj.insert(
            "resizeErrors".into(),
            json!([{"code": err.code, "message": err.message, "values": [{"name": "Reason", "value": err.message}]}]),
        );
    }
    out
}

fn render_node(ctx: &Ctx, pool: &Pool, node: &Node, index: usize, state: &str, now: EmuTime) -> Value {
    let url = format!(
        "{}/pools/{}/nodes/{}",
        account_url(&ctx.base_url, &pool.account),
        pool.id,
        node.id
    );
    let start_time = node.allocated + Duration::seconds((node.boot_secs + node.agent_secs) as i64);
    let mut v = json!({
        "id": node.id,
        "url": url,
        "state": state,
        "schedulingState": "enabled",
        "stateTransitionTime": stamp(now.min(node.allocated + Duration::seconds((node.boot_secs + node.agent_secs + node.start_task_secs) as i64))),
        "lastBootTime": stamp(node.allocated + Duration::seconds(node.boot_secs as i64)),
        "allocationTime": stamp(node.allocated),
        "ipAddress": format!("10.{}.{}.{}", (index >> 16) & 255, (index >> 8) & 255, index & 255),
        "affinityId": format!("TVM:{}", node.id),
        "vmSize": pool.body["vmSize"],
        "totalTasksRun": 0,
        "totalTasksSucceeded": 0,
        "runningTasksCount": 0,
        "runningTaskSlotsCount": 0,
        "isDedicated": node.dedicated,
        "nodeAgentInfo": {"version": "1.13.16", "lastUpdateTime": stamp(node.allocated)},
        "virtualMachineInfo": {"imageReference": pool.body["virtualMachineConfiguration"]["imageReference"]},
    });
    if pool.has_start_task {
        v["startTask"] = pool.body["startTask"].clone();
        if now >= start_time {
            let done = now >= start_time + Duration::seconds(node.start_task_secs as i64);
            let mut info = json!({"state": if done { "completed" } else { "running" }, "startTime": stamp(start_time), "retryCount": 0});
            if done {
                let failed = node.start_task_fails;
                info["endTime"] = json!(stamp(start_time + Duration::seconds(node.start_task_secs as i64)));
                info["exitCode"] = json!(if failed { 1 } else { 0 });
                info["result"] = json!(if failed { "failure" } else { "success" });
                // A failed start task used up its retries (maxTaskRetryCount defaults to 0); a
                // successful one needed none.
                let retries = pool.body["startTask"]["maxTaskRetryCount"].as_i64().unwrap_or(0).max(0);
                info["retryCount"] = json!(if failed { retries } else { 0 });
                if failed {
                    info["failureInfo"] = json!({"category": "usererror", "code": "FailureExitCode", "message": "The task exited with an exit code representing a failure"});
                }
            }
            v["startTaskInfo"] = info;
        }
    }
    v
}

fn list_pools(ctx: &Ctx, st: &State, req: &Request, account: &BatchAccount, now: EmuTime) -> Response {
    let prefix = format!("{}/", account.name.to_ascii_lowercase());
    let pools: Vec<Value> = st
        .pools
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(_, p)| selected(req, render_pool(ctx, p, now)))
        .collect();
    page(req, pools, "pools")
}

/// A rendered entity cut to the request's `$select` (OData: the top-level properties named,
/// comma-separated; a name the entity lacks selects nothing), or whole without one.
fn selected(req: &Request, entity: Value) -> Value {
    let Some(select) = req.query("$select") else {
        return entity;
    };
    let Value::Object(fields) = entity else {
        return entity;
    };
    let wanted: Vec<&str> = select.split(',').map(str::trim).collect();
    Value::Object(
        fields
            .into_iter()
            .filter(|(name, _)| wanted.iter().any(|w| w.eq_ignore_ascii_case(name)))
            .collect(),
    )
}

fn find_pool<'a>(st: &'a State, account: &BatchAccount, id: &str) -> Option<&'a Pool> {
    st.pools.get(&State::pool_key(&account.name, id))
}

/// Nodes at `now` with their index and state, filtered by a `state eq '...'` `$filter` if given.
fn present_nodes<'a>(pool: &'a Pool, now: EmuTime, filter: Option<&str>) -> Vec<(usize, &'a Node, &'static str)> {
    let wanted = filter.and_then(|f| {
        let f = f.trim();
        f.strip_prefix("state eq '")
            .and_then(|r| r.strip_suffix('\''))
            .map(str::to_string)
    });
    pool.nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| node_state(pool, n, now).map(|s| (i, n, s)))
        .filter(|(_, _, s)| wanted.as_deref().is_none_or(|w| w.eq_ignore_ascii_case(s)))
        .collect()
}

fn list_nodes(ctx: &Ctx, st: &State, req: &Request, account: &BatchAccount, id: &str, now: EmuTime) -> Response {
    let Some(pool) = find_pool(st, account, id) else {
        return pool_not_found(req);
    };
    let nodes: Vec<Value> = present_nodes(pool, now, req.query("$filter"))
        .into_iter()
        .map(|(i, n, s)| render_node(ctx, pool, n, i, s, now))
        .collect();
    page(req, nodes, &format!("pools/{}/nodes", pool.id))
}

fn get_node(
    ctx: &Ctx,
    st: &State,
    req: &Request,
    account: &BatchAccount,
    id: &str,
    node_id: &str,
    now: EmuTime,
) -> Response {
    let Some(pool) = find_pool(st, account, id) else {
        return pool_not_found(req);
    };
    match present_nodes(pool, now, None)
        .into_iter()
        .find(|(_, n, _)| n.id.eq_ignore_ascii_case(node_id))
    {
        Some((i, n, s)) => ok_json(200, &render_node(ctx, pool, n, i, s, now)),
        None => error(req, 404, "NodeNotFound", "The specified node does not exist.", &[]),
    }
}

const COUNT_STATES: &[(&str, &str)] = &[
    ("creating", "creating"),
    ("deallocated", "deallocated"),
    ("deallocating", "deallocating"),
    ("idle", "idle"),
    ("leavingPool", "leavingpool"),
    ("offline", "offline"),
    ("preempted", "preempted"),
    ("rebooting", "rebooting"),
    ("reimaging", "reimaging"),
    ("running", "running"),
    ("starting", "starting"),
    ("startTaskFailed", "starttaskfailed"),
    ("unknown", "unknown"),
    ("unusable", "unusable"),
    ("waitingForStartTask", "waitingforstarttask"),
    ("upgradingOS", "upgradingos"),
];

/// Pools' node counts, 10 a page as Batch gives them (`maxresults` at most 10), of one pool when
/// `$filter` is `poolId eq '…'` (the filter Batch documents for this list): a worker looking at its
/// pool reads one entry, not every pool of the account.
fn node_counts(st: &State, req: &Request, account: &BatchAccount, now: EmuTime) -> Response {
    let wanted = match req.query("$filter") {
        None => None,
        Some(filter) => match pool_id_filter(filter) {
            Some(id) => Some(id),
            None => return bad_filter(req, filter),
        },
    };
    let prefix = format!("{}/", account.name.to_ascii_lowercase());
    let value: Vec<Value> = st
        .pools
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .filter(|(_, pool)| wanted.is_none_or(|id| pool.id.eq_ignore_ascii_case(id)))
        .map(|(_, pool)| pool_node_counts(pool, now))
        .collect();
    page_of(req, value, "nodecounts", NODE_COUNTS_PAGE_MAX)
}

/// The pool id of a `poolId eq '…'` filter.
fn pool_id_filter(filter: &str) -> Option<&str> {
    filter
        .trim()
        .strip_prefix("poolId eq '")
        .and_then(|rest| rest.strip_suffix('\''))
        .filter(|id| !id.contains('\''))
}

fn bad_filter(req: &Request, filter: &str) -> Response {
    error(
        req,
        400,
        "InvalidQueryParameterValue",
        "Value for one of the query parameters specified in the request URI is invalid.",
        &[
            ("QueryParameterName", "$filter"),
            ("QueryParameterValue", filter),
            ("Reason", "The only filter supported here is poolId eq '<id>'."),
        ],
    )
}

fn pool_node_counts(pool: &Pool, now: EmuTime) -> Value {
    let nodes = present_nodes(pool, now, None);
    let counts = |dedicated: bool| {
        let mut m = Map::new();
        let mine: Vec<&str> = nodes
            .iter()
            .filter(|(_, n, _)| n.dedicated == dedicated)
            .map(|(_, _, s)| *s)
            .collect();
        for (name, state) in COUNT_STATES {
            m.insert(name.to_string(), json!(mine.iter().filter(|s| *s == state).count()));
        }
        m.insert("total".into(), json!(mine.len()));
        Value::Object(m)
    };
    json!({"poolId": pool.id, "dedicated": counts(true), "lowPriority": counts(false)})
}

fn delete_pool(st: &mut State, _req: &Request, mut pool: Pool, now: EmuTime) -> (Response, bool) {
    if pool.deleting.is_none() {
        pool.deleting = Some(now);
        st.deletion_started(now + POOL_DELETE);
        pool.last_modified = now;
        pool.etag_counter = st.serial();
        for node in pool.nodes.iter_mut().filter(|n| n.removed.is_none()) {
            node.removed = Some(now + POOL_DELETE);
        }
        st.pools.insert(State::pool_key(&pool.account, &pool.id), pool);
    }
    (Response::empty(202), true)
}

fn patch_pool(st: &mut State, req: &Request, mut pool: Pool, now: EmuTime) -> (Response, bool) {
    let patch = match body::read(req, body::POOL) {
        Ok(patch) => patch,
        Err(refused) => return (refused, false),
    };
    if let Err(refused) = check_pool_shape(req, &Value::Object(patch.clone())) {
        return (refused, false);
    }
    for (k, v) in patch {
        if ["metadata", "startTask", "targetNodeCommunicationMode", "resourceTags"].contains(&k.as_str()) {
            pool.body[k] = v;
        } else {
            return (
                bad_property(req, &k, "This property cannot be updated on an existing pool."),
                false,
            );
        }
    }
    pool.last_modified = now;
    pool.etag_counter = st.serial();
    let resp = Response::empty(200)
        .with_header("etag", etag(&pool))
        .with_header("last-modified", rfc1123(now));
    st.pools.insert(State::pool_key(&pool.account, &pool.id), pool);
    (resp, true)
}

fn resize_pool(
    ctx: &Ctx,
    st: &mut State,
    req: &Request,
    account: &BatchAccount,
    id: &str,
    now: EmuTime,
) -> (Response, bool) {
    let Some(mut pool) = find_pool(st, account, id).cloned() else {
        return (pool_not_found(req), false);
    };
    if pool.deleting.is_some() {
        return (
            error(
                req,
                409,
                "PoolBeingDeleted",
                "The specified pool has been marked for deletion and is being reclaimed.",
                &[],
            ),
            false,
        );
    }
    if now < pool.allocation.ends {
        return (
            error(
                req,
                409,
                "PoolNotSteady",
                "The specified pool is not in steady state.",
                &[],
            ),
            false,
        );
    }
    let body = match body::read(req, body::RESIZE) {
        Ok(body) => Value::Object(body),
        Err(refused) => return (refused, false),
    };
    let counts = node_count(req, &body, "targetDedicatedNodes")
        .and_then(|dedicated| Ok((dedicated, node_count(req, &body, "targetLowPriorityNodes")?)));
    let (dedicated, low) = match counts {
        Ok((d, l)) if u64::from(d) + u64::from(l) <= u64::from(MAX_POOL_NODES) => (d, l),
        Ok(_) => {
            let message = format!("A pool of this emulator has at most {MAX_POOL_NODES} nodes.");
            return (bad_property(req, "targetDedicatedNodes", &message), false);
        }
        Err(refused) => return (refused, false),
    };
    let timeout = match body["resizeTimeout"].as_str() {
        None => Duration::minutes(15),
        Some(t) => match parse_duration(t) {
            Some(d) if d >= Duration::minutes(5) => d,
            _ => {
                return (
                    bad_property(
                        req,
                        "resizeTimeout",
                        "The resize timeout must be an ISO 8601 duration of at least 5 minutes.",
                    ),
                    false,
                );
            }
        },
    };
    let (replicas, fail_share, room) = resize_conditions(ctx, st, account, &pool, now);
    allocate(
        ctx, &mut pool, dedicated, low, timeout, replicas, None, fail_share, room, now,
    );
    pool.last_modified = now;
    pool.etag_counter = st.serial();
    let resp = Response::empty(202)
        .with_header("etag", etag(&pool))
        .with_header("last-modified", rfc1123(now))
        .with_header(
            "dataserviceid",
            format!("{}/pools/{}", account_url(&req.base_url, &account.name), pool.id),
        );
    st.pools.insert(State::pool_key(&account.name, id), pool);
    (resp, true)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any pool id (no quote in it) comes back out of its `poolId eq '…'` filter.
        #[test]
        fn a_pool_id_filter_gives_its_id_back(id in "[^']{0,40}", pad in "[ ]{0,2}") {
            let filter = format!("{pad}poolId eq '{id}'{pad}");
            prop_assert_eq!(pool_id_filter(&filter), Some(id.as_str()));
        }

        /// Any other text is no pool id filter, or one whose id holds no quote; never a panic.
        #[test]
        fn any_filter_text_is_read_without_a_quote_in_the_id(filter in "\\PC{0,60}") {
            if let Some(id) = pool_id_filter(&filter) {
                prop_assert!(!id.contains('\''));
                prop_assert!(filter.trim().starts_with("poolId eq '"));
            }
        }
    }

    #[test]
    fn only_a_pool_id_is_a_node_counts_filter() {
        assert_eq!(pool_id_filter("poolId eq 'render-1'"), Some("render-1"));
        assert_eq!(pool_id_filter("state eq 'idle'"), None);
        assert_eq!(pool_id_filter("poolId eq 'a' or poolId eq 'b'"), None);
        assert_eq!(pool_id_filter("poolId eq 'unclosed"), None);
    }

    #[test]
    fn iso_durations() {
        assert_eq!(parse_duration("PT15M"), Some(Duration::minutes(15)));
        assert_eq!(parse_duration("PT1H30M"), Some(Duration::minutes(90)));
        assert_eq!(parse_duration("P1DT2H"), Some(Duration::hours(26)));
        assert_eq!(parse_duration("PT90S"), Some(Duration::seconds(90)));
        assert_eq!(parse_duration("15M"), None);
        assert_eq!(parse_duration("PT"), None);
        assert_eq!(parse_duration("PTXM"), None);
    }
}
