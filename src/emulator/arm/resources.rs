//! The lifecycle every ARM resource here shares: PUT creates or updates (idempotently: the same
//! body again changes nothing, a changed immutable property is `PropertyChangeNotAllowed`), PATCH
//! merges, DELETE removes over time, GET renders the state at the emulated now, list gathers
//! children. What differs per type (validation, durations, read-only fields) lives in `compute`
//! and `gallery`.

use serde_json::{Value, json};
use time::Duration;

use super::{ArmError, Caller, Family, authorize, check_api_version, compute, gallery, lro, resource_group};
use crate::emulator::Ctx;
use crate::emulator::clock::EmuTime;
use crate::emulator::http::{Request, Response};
use crate::emulator::regions;
use crate::emulator::state::{ErrorInfo, Kind, OpKind, RegionReplication, Resource, State, Timeline};

/// Where a resource lives: subscription, group, type and its name chain.
#[derive(Debug, Clone)]
pub struct ResPath {
    pub sub: String,
    pub rg: String,
    pub kind: Kind,
    pub names: Vec<String>,
}

impl ResPath {
    pub fn id(&self) -> String {
        let prefix = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute",
            self.sub, self.rg
        );
        let n = &self.names;
        match self.kind {
            Kind::Snapshot => format!("{prefix}/snapshots/{}", n[0]),
            Kind::Image => format!("{prefix}/images/{}", n[0]),
            Kind::Gallery => format!("{prefix}/galleries/{}", n[0]),
            Kind::GalleryImage => format!("{prefix}/galleries/{}/images/{}", n[0], n[1]),
            Kind::GalleryImageVersion => format!("{prefix}/galleries/{}/images/{}/versions/{}", n[0], n[1], n[2]),
        }
    }

    pub fn parent_id(&self) -> Option<String> {
        match self.kind {
            Kind::GalleryImage | Kind::GalleryImageVersion => {
                let id = self.id();
                Some(id[..id.rfind('/').and_then(|i| id[..i].rfind('/')).expect("nested id")].to_string())
            }
            _ => None,
        }
    }

    pub fn name(&self) -> &str {
        self.names.last().expect("a name")
    }
}

/// What a type-specific planner decides for a create or an update.
pub struct Plan {
    pub body: Value,
    pub facts: Value,
    pub duration: Duration,
    pub failure: Option<ErrorInfo>,
    pub replication: Vec<RegionReplication>,
}

pub fn family(kind: Kind) -> Family {
    match kind {
        Kind::Snapshot => Family::Disk,
        Kind::Image => Family::Compute,
        _ => Family::Gallery,
    }
}

/// Pointers into the body that cannot change after creation.
fn immutable(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Snapshot => &["/properties/creationData"],
        Kind::Image => &[
            "/properties/storageProfile/osDisk",
            "/properties/storageProfile/dataDisks",
            "/properties/sourceVirtualMachine",
            "/properties/hyperVGeneration",
        ],
        Kind::Gallery => &[],
        Kind::GalleryImage => &[
            "/properties/osType",
            "/properties/osState",
            "/properties/identifier",
            "/properties/hyperVGeneration",
            "/properties/architecture",
        ],
        Kind::GalleryImageVersion => &["/properties/storageProfile"],
    }
}

fn action(kind: Kind, method: &str) -> String {
    let verb = match method {
        "GET" | "HEAD" => "read",
        "DELETE" => "delete",
        _ => "write",
    };
    format!("{}/{verb}", kind.type_name())
}

#[allow(clippy::too_many_arguments)]
pub fn handle(
    ctx: &Ctx,
    st: &mut State,
    req: &Request,
    caller: &Caller,
    sub: &str,
    rg: &str,
    kind: Kind,
    names: &[&str],
) -> Result<(Response, bool), ArmError> {
    let group = resource_group(ctx, sub, rg)?;
    let api_version = check_api_version(req, family(kind), kind.type_name(), &group.location)?;
    let path = ResPath {
        sub: sub.to_string(),
        rg: group.name.clone(),
        kind,
        names: names.iter().map(|s| s.to_string()).collect(),
    };
    let id = path.id();
    authorize(ctx, caller, &action(kind, req.method.as_str()), &id)?;
    super::providers::require_registered(ctx, st, sub, "Microsoft.Compute")?;
    let now = ctx.clock.now();
    match req.method.as_str() {
        "GET" => {
            let resource = st.get(&id).ok_or_else(|| not_found(&path))?;
            let expand = req
                .query("$expand")
                .is_some_and(|e| e.eq_ignore_ascii_case("ReplicationStatus"));
            Ok((Response::json(200, &render(ctx, st, resource, now, expand)), false))
        }
        "PUT" => put(ctx, st, req, &path, &api_version, now),
        "PATCH" if matches!(kind, Kind::GalleryImageVersion | Kind::Gallery | Kind::GalleryImage) => {
            patch(ctx, st, req, &path, &api_version, now)
        }
        "DELETE" => delete(ctx, st, &path, &api_version, now),
        _ => Err(ArmError::new(
            405,
            "MethodNotAllowed",
            format!("The requested method '{}' is not allowed on this resource.", req.method),
        )),
    }
}

pub fn not_found(path: &ResPath) -> ArmError {
    let chain = match path.kind {
        Kind::Snapshot => format!("Microsoft.Compute/snapshots/{}", path.names[0]),
        Kind::Image => format!("Microsoft.Compute/images/{}", path.names[0]),
        Kind::Gallery => format!("Microsoft.Compute/galleries/{}", path.names[0]),
        Kind::GalleryImage => format!("Microsoft.Compute/galleries/{}/images/{}", path.names[0], path.names[1]),
        Kind::GalleryImageVersion => format!(
            "Microsoft.Compute/galleries/{}/images/{}/versions/{}",
            path.names[0], path.names[1], path.names[2]
        ),
    };
    super::resource_not_found(&chain, &path.rg)
}

fn location_of(body: &Value) -> Result<&'static str, ArmError> {
    let raw = body.get("location").and_then(Value::as_str).ok_or_else(|| {
        ArmError::new(
            400,
            "LocationRequired",
            "The location property is required for this definition.",
        )
    })?;
    regions::canonical(raw).ok_or_else(|| {
        ArmError::new(
            400,
            "LocationNotAvailableForResourceType",
            format!("The provided location '{raw}' is not available for resource type. List of available regions for the resource type is '{}'.", regions::all().collect::<Vec<_>>().join(",")),
        )
    })
}

/// The user's body, minus what ARM ignores or computes (id, name, type, read-only state).
/// ARM's envelope of every resource body, checked before anything of it is stored or read: an
/// object, with `properties` an object, `tags` an object of strings, `location` a string.
fn check_shape(body: &Value) -> Result<(), ArmError> {
    let invalid = |what: &str| {
        Err(ArmError::new(
            400,
            "InvalidRequestContent",
            format!("The request content was invalid and could not be deserialized: {what}"),
        ))
    };
    let Some(object) = body.as_object() else {
        return invalid("the request content must be a JSON object");
    };
    match object.get("properties") {
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(_) => return invalid("'properties' must be an object"),
    }
    match object.get("tags") {
        None | Some(Value::Null) => {}
        Some(Value::Object(tags)) if tags.values().all(Value::is_string) => {}
        Some(_) => return invalid("'tags' must be an object of strings"),
    }
    match object.get("location") {
        None | Some(Value::String(_)) => Ok(()),
        Some(_) => invalid("'location' must be a string"),
    }
}

fn normalize(mut body: Value, location: &str) -> Value {
    if let Some(obj) = body.as_object_mut() {
        obj.remove("id");
        obj.remove("name");
        obj.remove("type");
        obj.insert("location".into(), json!(location));
        if let Some(props) = obj.get_mut("properties").and_then(Value::as_object_mut) {
            props.remove("provisioningState");
            props.remove("replicationStatus");
        }
    }
    body
}

fn put(
    ctx: &Ctx,
    st: &mut State,
    req: &Request,
    path: &ResPath,
    api_version: &str,
    now: EmuTime,
) -> Result<(Response, bool), ArmError> {
    let raw = req.json().map_err(|m| ArmError::new(400, "InvalidRequestContent", m))?;
    check_shape(&raw)?;
    let location = location_of(&raw)?;
    let body = normalize(raw, location);
    let id = path.id();
    if let Some(existing) = st.get(&id).cloned() {
        if existing.deleting.is_some() {
            return Err(ArmError::new(
                409,
                "OperationNotAllowed",
                format!("The resource '{}' is being deleted.", path.name()),
            ));
        }
        return update(ctx, st, path, existing, body, api_version, now);
    }
    if let Some(parent) = path.parent_id() {
        let ready = st.get(&parent).is_some_and(|p| p.deleting.is_none());
        if !ready {
            let parent_name = parent.rsplit('/').next().unwrap_or_default().to_string();
            return Err(ArmError::new(
                404,
                "ParentResourceNotFound",
                format!(
                    "Can not perform requested operation on nested resource. Parent resource '{parent_name}' not found."
                ),
            ));
        }
    }
    let plan = match path.kind {
        Kind::Snapshot | Kind::Image => compute::plan_create(ctx, st, path, body, location, now)?,
        _ => gallery::plan_create(ctx, st, path, body, location, now)?,
    };
    let ends = op_end(now, &plan);
    let op = lro::start(
        st,
        path.kind.flavor(),
        OpKind::Put,
        &path.sub,
        location,
        &id,
        api_version,
        now,
        ends,
        plan.failure.clone().or_else(|| replication_failure(&plan.replication)),
    );
    let resource = Resource {
        id: id.clone(),
        kind: path.kind,
        subscription: path.sub.clone(),
        location: location.to_string(),
        body: plan.body,
        facts: plan.facts,
        created: now,
        current: Timeline {
            op_id: op.id.clone(),
            started: now,
            ends: now + plan.duration,
            creating: true,
            failure: plan.failure,
        },
        deleting: None,
        replication: plan.replication,
    };
    let rendered = render(ctx, st, &resource, now, false);
    st.resources.insert(State::key(&id), resource);
    let status = if path.kind == Kind::Snapshot { 202 } else { 201 };
    let resp = lro::headers(ctx, Response::json(status, &rendered), &op, path.kind == Kind::Snapshot);
    Ok((resp, true))
}

/// When an operation is over: its own span, or the last region's replication.
fn op_end(now: EmuTime, plan: &Plan) -> EmuTime {
    plan.replication
        .iter()
        .map(|r| match r.fails_at {
            Some(at) => r.starts + (r.ends - r.starts) * (at as f64 / 100.0),
            None => r.ends,
        })
        .fold(now + plan.duration, EmuTime::max)
}

fn replication_failure(replication: &[RegionReplication]) -> Option<ErrorInfo> {
    let failed: Vec<String> = replication
        .iter()
        .filter(|r| r.fails_at.is_some())
        .map(|r| format!("{{region:{}, detail:Failed with internal server error.}}", r.region))
        .collect();
    (!failed.is_empty()).then(|| ErrorInfo {
        code: "ReplicationJobsNotCompleted".to_string(),
        message: format!(
            "Gallery replication jobs failed in one or more regions. Please go to the gallery image version and view the replication status. Failed regions: '{}'. Remove the failed regions and update again by adding them back.",
            failed.join(", ")
        ),
    })
}

fn changed_immutable(kind: Kind, old: &Value, new: &Value) -> Option<String> {
    immutable(kind).iter().find_map(|pointer| {
        let before = old.pointer(pointer);
        let after = new.pointer(pointer);
        let differs = match (before, after) {
            (Some(a), Some(b)) => !same_json(a, b),
            (None, None) => false,
            // A property left out of a later PUT keeps its value only if it was never set.
            (Some(a), None) => !a.is_null(),
            (None, Some(b)) => !b.is_null(),
        };
        differs.then(|| pointer.trim_start_matches('/').replace('/', "."))
    })
}

/// JSON equality that ignores case in strings that ARM compares case-insensitively (ids, enums).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => x
            .trim_start_matches('/')
            .eq_ignore_ascii_case(y.trim_start_matches('/')),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_json(v, w)),
        _ => a == b,
    }
}

/// Fills in what the create planners default when a body leaves it out (a snapshot's sku, a
/// definition's Hyper-V generation), so the same body sent again (a retry after a lost answer)
/// compares equal to the stored one instead of reading as a change.
fn apply_create_defaults(kind: Kind, body: &mut Value) {
    let (parent, key, default) = match kind {
        Kind::Snapshot => ("", "sku", json!({"name": "Standard_LRS"})),
        Kind::GalleryImage => ("/properties", "hyperVGeneration", json!("V1")),
        _ => return,
    };
    if let Some(obj) = body.pointer_mut(parent).and_then(Value::as_object_mut)
        && !obj.contains_key(key)
    {
        obj.insert(key.to_string(), default);
    }
}

fn update(
    ctx: &Ctx,
    st: &mut State,
    path: &ResPath,
    existing: Resource,
    mut body: Value,
    api_version: &str,
    now: EmuTime,
) -> Result<(Response, bool), ArmError> {
    apply_create_defaults(path.kind, &mut body);
    if existing.location != body["location"].as_str().unwrap_or_default() {
        return Err(ArmError::new(
            409,
            "InvalidResourceLocation",
            format!(
                "The resource '{}' already exists in location '{}' in resource group '{}'. A resource with the same name cannot be created in location '{}'. Please select a new resource name.",
                path.name(),
                existing.location,
                path.rg,
                body["location"].as_str().unwrap_or_default()
            ),
        ));
    }
    if let Some(property) = changed_immutable(path.kind, &existing.body, &body) {
        return Err(ArmError {
            status: 409,
            code: "PropertyChangeNotAllowed".into(),
            message: format!("Changing property '{property}' is not allowed."),
            target: Some(property),
        });
    }
    let op = st
        .operations
        .get(&existing.current.op_id)
        .cloned()
        .expect("every resource has an operation");
    if same_json(&existing.body, &body) {
        // The same PUT again (a retry after a lost answer): nothing changes.
        let rendered = render(ctx, st, &existing, now, false);
        return Ok((lro::headers(ctx, Response::json(200, &rendered), &op, false), false));
    }
    if existing.current.running(now) {
        return Err(ArmError::new(
            409,
            "OperationNotAllowed",
            format!(
                "Operation 'Update' is not allowed on resource '{}' since it is in the middle of another operation.",
                path.name()
            ),
        ));
    }
    apply_update(ctx, st, path, existing, body, api_version, now, OpKind::Put)
}

#[allow(clippy::too_many_arguments)]
fn apply_update(
    ctx: &Ctx,
    st: &mut State,
    path: &ResPath,
    existing: Resource,
    body: Value,
    api_version: &str,
    now: EmuTime,
    kind: OpKind,
) -> Result<(Response, bool), ArmError> {
    let plan = match path.kind {
        Kind::Snapshot | Kind::Image => compute::plan_update(ctx, st, &existing, body, now)?,
        _ => gallery::plan_update(ctx, st, &existing, body, now)?,
    };
    let ends = op_end(now, &plan);
    let failure = plan.failure.clone().or_else(|| {
        replication_failure(
            &plan
                .replication
                .iter()
                .filter(|r| r.ends > now)
                .cloned()
                .collect::<Vec<_>>(),
        )
    });
    let op = lro::start(
        st,
        path.kind.flavor(),
        kind,
        &path.sub,
        &existing.location,
        &existing.id,
        api_version,
        now,
        ends,
        failure,
    );
    let mut resource = existing;
    resource.body = plan.body;
    resource.facts = plan.facts;
    resource.replication = plan.replication;
    resource.current = Timeline {
        op_id: op.id.clone(),
        started: now,
        ends: now + plan.duration,
        creating: false,
        failure: plan.failure,
    };
    let rendered = render(ctx, st, &resource, now, false);
    st.resources.insert(State::key(&resource.id), resource);
    Ok((lro::headers(ctx, Response::json(200, &rendered), &op, false), true))
}

fn patch(
    ctx: &Ctx,
    st: &mut State,
    req: &Request,
    path: &ResPath,
    api_version: &str,
    now: EmuTime,
) -> Result<(Response, bool), ArmError> {
    let patch = req.json().map_err(|m| ArmError::new(400, "InvalidRequestContent", m))?;
    check_shape(&patch)?;
    let existing = st.get(&path.id()).cloned().ok_or_else(|| not_found(path))?;
    let mut body = existing.body.clone();
    merge_patch(&mut body, &patch);
    check_shape(&body)?;
    let location = existing.location.clone();
    let body = normalize(body, &location);
    if let Some(property) = changed_immutable(path.kind, &existing.body, &body) {
        return Err(ArmError {
            status: 409,
            code: "PropertyChangeNotAllowed".into(),
            message: format!("Changing property '{property}' is not allowed."),
            target: Some(property),
        });
    }
    if existing.current.running(now) && !same_json(&existing.body, &body) {
        return Err(ArmError::new(
            409,
            "OperationNotAllowed",
            format!(
                "Operation 'Update' is not allowed on resource '{}' since it is in the middle of another operation.",
                path.name()
            ),
        ));
    }
    apply_update(ctx, st, path, existing, body, api_version, now, OpKind::Patch)
}

/// RFC 7396 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn delete(
    ctx: &Ctx,
    st: &mut State,
    path: &ResPath,
    api_version: &str,
    now: EmuTime,
) -> Result<(Response, bool), ArmError> {
    let id = path.id();
    let Some(existing) = st.get(&id).cloned() else {
        return Ok((Response::empty(204), false));
    };
    if let Some(deleting) = &existing.deleting {
        let op = st.operations.get(&deleting.op_id).cloned().expect("delete op");
        return Ok((lro::headers(ctx, Response::empty(202), &op, true), false));
    }
    let child_kind = match path.kind {
        Kind::Gallery => Some(Kind::GalleryImage),
        Kind::GalleryImage => Some(Kind::GalleryImageVersion),
        _ => None,
    };
    if let Some(child_kind) = child_kind
        && !st.children(&id, child_kind).is_empty()
    {
        return Err(ArmError::new(
            409,
            "CannotDeleteResource",
            format!(
                "Can not delete resource '{}' before nested resources are deleted.",
                path.name()
            ),
        ));
    }
    if path.kind == Kind::GalleryImageVersion {
        refuse_if_pools_use(st, &id, path.name(), now)?;
    }
    let duration = match path.kind {
        Kind::GalleryImageVersion => Duration::minutes(2),
        Kind::Gallery | Kind::GalleryImage => Duration::seconds(20),
        _ => Duration::seconds(30),
    } * ctx.jitter(&format!("delete:{id}"), 0.2);
    let op = lro::start(
        st,
        path.kind.flavor(),
        OpKind::Delete,
        &path.sub,
        &existing.location,
        &id,
        api_version,
        now,
        now + duration,
        None,
    );
    let mut resource = existing;
    resource.deleting = Some(Timeline {
        op_id: op.id.clone(),
        started: now,
        ends: now + duration,
        creating: false,
        failure: None,
    });
    st.resources.insert(State::key(&id), resource);
    st.deletion_started(now + duration);
    Ok((lro::headers(ctx, Response::empty(202), &op, true), true))
}

/// A version a Batch pool was made from (and that is not yet gone) cannot be deleted. Public
/// material does not say how Azure answers; the emulator refuses it as Compute refuses other
/// deletes of a resource in use (a departure listed in ARCHITECTURE.md).
fn refuse_if_pools_use(st: &State, id: &str, name: &str, now: EmuTime) -> Result<(), ArmError> {
    let users: Vec<&str> = st
        .pools
        .values()
        .filter(|pool| {
            pool.deleting
                .is_none_or(|since| now < since + crate::emulator::state::POOL_DELETE)
        })
        .filter(|pool| {
            pool.body
                .pointer("/virtualMachineConfiguration/imageReference/virtualMachineImageId")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|image| image.eq_ignore_ascii_case(id))
        })
        .map(|pool| pool.id.as_str())
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    Err(ArmError::new(
        409,
        "OperationNotAllowed",
        format!(
            "Gallery image version '{name}' cannot be deleted: it is in use by Batch pool(s) {}.",
            users.join(", ")
        ),
    ))
}

#[allow(clippy::too_many_arguments)]
pub fn list(
    ctx: &Ctx,
    st: &mut State,
    req: &Request,
    caller: &Caller,
    sub: &str,
    rg: &str,
    kind: Kind,
    parent_names: &[&str],
) -> Result<Response, ArmError> {
    let group = resource_group(ctx, sub, rg)?;
    check_api_version(req, family(kind), kind.type_name(), &group.location)?;
    let parent_kind = match kind {
        Kind::GalleryImage => Kind::Gallery,
        _ => Kind::GalleryImage,
    };
    let parent = ResPath {
        sub: sub.to_string(),
        rg: group.name.clone(),
        kind: parent_kind,
        names: parent_names.iter().map(|s| s.to_string()).collect(),
    };
    let parent_id = parent.id();
    authorize(ctx, caller, &action(kind, "GET"), &parent_id)?;
    if st.get(&parent_id).is_none() {
        return Err(not_found(&parent));
    }
    let now = ctx.clock.now();
    let value: Vec<Value> = st
        .children(&parent_id, kind)
        .into_iter()
        .map(|r| render(ctx, st, r, now, false))
        .collect();
    Ok(Response::json(200, &json!({ "value": value })))
}

/// A top-level type's list (galleries, snapshots, images) in a resource group, or in the whole
/// subscription when `rg` is `None`: what the caller may read, as `{"value": [...]}`.
pub fn list_in_scope(
    ctx: &Ctx,
    st: &State,
    req: &Request,
    caller: &Caller,
    sub: &str,
    rg: Option<&str>,
    kind: Kind,
) -> Result<Response, ArmError> {
    let mut scope = format!("/subscriptions/{sub}");
    let mut location = "global".to_string();
    if let Some(rg) = rg {
        let group = resource_group(ctx, sub, rg)?;
        scope = format!("{scope}/resourceGroups/{}", group.name);
        location = group.location.clone();
    }
    check_api_version(req, family(kind), kind.type_name(), &location)?;
    let prefix = format!("{}/", State::key(&scope));
    let read = action(kind, "GET");
    let now = ctx.clock.now();
    let value: Vec<Value> = st
        .resources
        .iter()
        .filter(|(key, r)| r.kind == kind && key.starts_with(&prefix))
        .filter(|(_, r)| crate::emulator::auth::allowed(&ctx.world, &caller.claims.oid, &read, &r.id))
        .map(|(_, r)| render(ctx, st, r, now, false))
        .collect();
    Ok(Response::json(200, &json!({ "value": value })))
}

/// The resource as a GET shows it at `now`.
pub fn render(ctx: &Ctx, st: &State, r: &Resource, now: EmuTime, expand: bool) -> Value {
    let mut out = r.body.clone();
    let obj = out.as_object_mut().expect("bodies are objects");
    obj.insert("id".into(), json!(r.id));
    obj.insert("name".into(), json!(r.id.rsplit('/').next().unwrap_or_default()));
    obj.insert("type".into(), json!(r.kind.type_name()));
    obj.insert("location".into(), json!(r.location));
    let props = obj
        .entry("properties")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("properties is an object");
    match r.kind {
        Kind::Snapshot | Kind::Image => compute::render_properties(r, props, now),
        _ => gallery::render_properties(ctx, st, r, props, now, expand),
    }
    if !props.contains_key("provisioningState") {
        props.insert("provisioningState".into(), json!(r.provisioning_state(now)));
    }
    out
}
