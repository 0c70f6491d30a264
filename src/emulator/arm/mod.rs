//! Azure Resource Manager: the front door for every `/subscriptions/...` call. Checks the bearer
//! token (signature, audience, expiry, the subscription's tenant), the api-version against the
//! resource provider's, and the caller's role on the scope, then routes to the resource handlers.
//! Answers carry ARM's error body and its `x-ms-*` headers.

pub(super) mod catalog;
mod compute;
mod disks;
mod gallery;
mod lro;
mod providers;
mod resources;
mod tenancy;

use serde_json::json;

use super::Ctx;
use super::auth::{self, Claims, TokenProblem};
use super::budget::{self, Draw};
use super::http::{Request, Response};
use super::state::{Kind, State};

pub use self::gallery::version_state;
pub use self::providers::{registration_state, seed_providers};

/// An ARM error answer.
#[derive(Debug, Clone)]
pub struct ArmError {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub target: Option<String>,
}

impl ArmError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> ArmError {
        ArmError {
            status,
            code: code.to_string(),
            message: message.into(),
            target: None,
        }
    }

    pub fn invalid(target: &str, message: impl Into<String>) -> ArmError {
        ArmError {
            status: 400,
            code: "InvalidParameter".to_string(),
            message: message.into(),
            target: Some(target.to_string()),
        }
    }

    pub fn response(&self) -> Response {
        error(self.status, &self.code, &self.message, self.target.as_deref())
    }
}

pub fn error(status: u16, code: &str, message: &str, target: Option<&str>) -> Response {
    let mut body = json!({"code": code, "message": message});
    if let Some(target) = target {
        body["target"] = json!(target);
    }
    Response::json(status, &json!({ "error": body }))
}

/// Resource-provider families, each with its own api-versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Resources,
    /// Microsoft.Resources' subscriptions API (locations), versioned apart from the rest.
    Subscriptions,
    Compute,
    Disk,
    Gallery,
    BatchManagement,
}

impl Family {
    /// The version of the saved spec (accepted with any later stable one up to today), and the
    /// older versions Azure still serves whose shapes for what the emulator serves are the same
    /// (listed in ARCHITECTURE.md): clients pin old versions for years (the Azure CLI 2.91 still
    /// sends 2021-10-01 for gallery image definitions).
    fn versions(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Family::Resources => ("2024-07-01", RESOURCES_OLDER),
            Family::Subscriptions => ("2022-12-01", SUBSCRIPTIONS_OLDER),
            Family::Compute => ("2024-07-01", COMPUTE_OLDER),
            Family::Disk => ("2024-03-02", DISK_OLDER),
            Family::Gallery => ("2024-03-03", GALLERY_OLDER),
            Family::BatchManagement => ("2024-07-01", BATCH_MANAGEMENT_OLDER),
        }
    }
}

const RESOURCES_OLDER: &[&str] = &[
    "2019-10-01",
    "2020-06-01",
    "2020-10-01",
    "2021-01-01",
    "2021-04-01",
    "2022-09-01",
    "2023-07-01",
    "2024-03-01",
];
const SUBSCRIPTIONS_OLDER: &[&str] = &[
    "2016-06-01",
    "2018-06-01",
    "2019-06-01",
    "2019-11-01",
    "2020-01-01",
    "2021-01-01",
];
/// Since 2019-03-01 an image takes snapshot sources and a Hyper-V generation.
const COMPUTE_OLDER: &[&str] = &[
    "2019-03-01",
    "2019-07-01",
    "2019-12-01",
    "2020-06-01",
    "2020-12-01",
    "2021-03-01",
    "2021-04-01",
    "2021-07-01",
    "2021-11-01",
    "2022-03-01",
    "2022-08-01",
    "2022-11-01",
    "2023-03-01",
    "2023-07-01",
    "2023-09-01",
    "2024-03-01",
];
/// Since 2019-07-01 a snapshot may be incremental.
const DISK_OLDER: &[&str] = &[
    "2019-07-01",
    "2019-11-01",
    "2020-05-01",
    "2020-06-30",
    "2020-09-30",
    "2020-12-01",
    "2021-04-01",
    "2021-08-01",
    "2021-12-01",
    "2022-03-02",
    "2022-07-02",
    "2023-01-02",
    "2023-04-02",
    "2023-10-02",
];
/// Since 2019-12-01 an image version is published from `storageProfile.source` with target
/// regions and replica counts.
const GALLERY_OLDER: &[&str] = &[
    "2019-12-01",
    "2020-09-30",
    "2021-07-01",
    "2021-10-01",
    "2022-01-03",
    "2022-03-03",
    "2022-08-03",
    "2023-07-03",
];
const BATCH_MANAGEMENT_OLDER: &[&str] = &[
    "2021-06-01",
    "2022-01-01",
    "2022-06-01",
    "2022-10-01",
    "2023-05-01",
    "2023-11-01",
    "2024-02-01",
];

fn well_formed_date(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
        && time::Date::parse(v, time::macros::format_description!("[year]-[month]-[day]")).is_ok()
}

fn today() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), d.month() as u8, d.day())
}

/// Checks the api-version query parameter the way ARM does.
pub fn check_api_version(req: &Request, family: Family, type_name: &str, location: &str) -> Result<String, ArmError> {
    let (floor, older) = family.versions();
    let Some(version) = req.query("api-version") else {
        return Err(ArmError::new(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        ));
    };
    let supported = || {
        let mut all: Vec<String> = older.iter().map(|s| s.to_string()).collect();
        all.push(floor.to_string());
        all.join(", ")
    };
    if !well_formed_date(version) {
        let preview = version.strip_suffix("-preview").is_some_and(well_formed_date);
        if !preview {
            return Err(ArmError::new(
                400,
                "InvalidApiVersionParameter",
                format!(
                    "The api-version '{version}' is invalid. The supported versions are '{}'.",
                    supported()
                ),
            ));
        }
    }
    let accepted =
        (well_formed_date(version) && version >= floor && version <= today().as_str()) || older.contains(&version);
    if !accepted {
        return Err(ArmError::new(
            400,
            "NoRegisteredProviderFound",
            format!(
                "No registered resource provider found for location '{location}' and API version '{version}' for type '{type_name}'. The supported api-versions are '{}, and later stable versions'.",
                supported()
            ),
        ));
    }
    Ok(version.to_string())
}

/// 405 for anything but GET on what the emulator serves read-only.
pub fn only_get(req: &Request) -> Result<(), ArmError> {
    if req.method == http::Method::GET {
        Ok(())
    } else {
        Err(ArmError::new(405, "MethodNotAllowed", "Only GET is allowed here."))
    }
}

/// ARM's 404 for a resource of the group: `resource` is its type and name chain
/// (`Microsoft.Compute/disks/{name}`).
pub fn resource_not_found(resource: &str, rg: &str) -> ArmError {
    ArmError::new(
        404,
        "ResourceNotFound",
        format!(
            "The Resource '{resource}' under resource group '{rg}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix"
        ),
    )
}

/// An authenticated caller.
pub struct Caller {
    pub claims: Claims,
}

fn www_authenticate(tenant: &str, error_description: &str) -> String {
    format!(
        "Bearer authorization_uri=\"https://login.windows.net/{tenant}\", error=\"invalid_token\", error_description=\"{error_description}\""
    )
}

fn unauthorized(tenant: &str, problem: &TokenProblem) -> Response {
    let (code, message, description) = match problem {
        TokenProblem::Missing => (
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing.".to_string(),
            "The authentication failed because of missing 'Authorization' header.",
        ),
        TokenProblem::Malformed | TokenProblem::BadSignature => (
            "InvalidAuthenticationToken",
            "The access token is invalid.".to_string(),
            "The access token is invalid.",
        ),
        TokenProblem::Expired { exp, now } => (
            "ExpiredAuthenticationToken",
            format!(
                "The access token expiry UTC time '{}' is earlier than current UTC time '{}'.",
                unix_text(*exp),
                unix_text(*now)
            ),
            "The access token expiry UTC time is earlier than current UTC time.",
        ),
        TokenProblem::WrongAudience { aud } => (
            "InvalidAuthenticationTokenAudience",
            format!(
                "The access token has been obtained for wrong audience or resource '{aud}'. It should exactly match with one of the allowed audiences 'https://management.core.windows.net/','https://management.core.windows.net','https://management.azure.com/','https://management.azure.com'."
            ),
            "The access token has been obtained for wrong audience or resource.",
        ),
        TokenProblem::WrongTenant {
            issuer,
            expected_tenant,
        } => (
            "InvalidAuthenticationTokenTenant",
            format!(
                "The access token is from the wrong issuer '{issuer}'. It must match the tenant 'https://sts.windows.net/{expected_tenant}/' associated with this subscription. Please use the authority (URL) 'https://login.windows.net/{expected_tenant}' to get the token. Note, if the subscription is transferred to another tenant there is no impact to the services, but information about new tenant could take time to propagate (up to an hour). If you just transferred your subscription and see this error message, please try back later."
            ),
            "The access token is from the wrong issuer.",
        ),
    };
    error(401, code, &message, None).with_header("www-authenticate", www_authenticate(tenant, description))
}

fn unix_text(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// 403 AuthorizationFailed for `action` on `scope`.
pub fn forbidden(ctx: &Ctx, caller: &Caller, action: &str, scope: &str) -> ArmError {
    ArmError::new(
        403,
        "AuthorizationFailed",
        format!(
            "The client '{}' with object id '{}' does not have authorization to perform action '{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, please refresh your credentials.",
            ctx.principal_name(&caller.claims.oid),
            caller.claims.oid
        ),
    )
}

/// Checks that `caller` may do `action` on `scope`.
pub fn authorize(ctx: &Ctx, caller: &Caller, action: &str, scope: &str) -> Result<(), ArmError> {
    if auth::allowed(&ctx.world, &caller.claims.oid, action, scope) {
        Ok(())
    } else {
        Err(forbidden(ctx, caller, action, scope))
    }
}

pub fn handle(ctx: &Ctx, req: &Request) -> Response {
    let at = |i: usize, v: &str| req.segments.get(i).is_some_and(|x| x.eq_ignore_ascii_case(v));
    if at(0, "metadata") && at(1, "endpoints") && req.segments.len() == 2 {
        return tenancy::cloud_metadata(ctx, req);
    }
    let default_tenant = &ctx.world.tenants[0].id;
    let claims = match ctx.key.verify(
        req.header("authorization"),
        &[auth::ARM_AUDIENCE, "https://management.core.windows.net/"],
    ) {
        Ok(claims) => claims,
        Err(problem) => return unauthorized(default_tenant, &problem),
    };
    let caller = Caller { claims };
    match req.segments.get(1) {
        Some(subscription_id) => in_subscription(ctx, req, caller, subscription_id),
        None => tenant_level(ctx, req, &caller),
    }
}

/// `/tenants` and `/subscriptions`: what the caller's token reaches across its tenant.
fn tenant_level(ctx: &Ctx, req: &Request, caller: &Caller) -> Response {
    let first = req.segments.first().map(|s| s.to_ascii_lowercase());
    let result = match (req.method.as_str(), first.as_deref()) {
        ("GET", Some("tenants")) => tenancy::list_tenants(ctx, req, caller),
        ("GET", Some("subscriptions")) => tenancy::list_subscriptions(ctx, req, caller),
        _ => Err(not_found_route(req)),
    };
    result.unwrap_or_else(|err| err.response())
}

/// A request under `/subscriptions/{id}`: the subscription must exist and belong to the token's
/// tenant, and the caller's budget must have a token for it.
fn in_subscription(ctx: &Ctx, req: &Request, caller: Caller, subscription_id: &str) -> Response {
    let Some(subscription) = ctx
        .world
        .subscriptions
        .iter()
        .find(|s| s.id.eq_ignore_ascii_case(subscription_id))
    else {
        return error(
            404,
            "SubscriptionNotFound",
            &format!("The subscription '{subscription_id}' could not be found."),
            None,
        );
    };
    if !caller.claims.tid.eq_ignore_ascii_case(&subscription.tenant) {
        let problem = TokenProblem::WrongTenant {
            issuer: caller.claims.iss.clone(),
            expected_tenant: subscription.tenant.clone(),
        };
        return unauthorized(&subscription.tenant, &problem);
    }
    let now = ctx.clock.now();
    let kind = budget::Kind::of(&req.method);
    let draw = ctx.budgets.draw_arm(&subscription.id, &caller.claims.oid, kind, now);
    if let Some(Draw::Refused { wait_secs }) = draw {
        let message = format!(
            "Number of '{}' requests for subscription '{}' actor '{}' exceeded. Please try again after '{}' seconds after additional tokens are available. Refer to https://aka.ms/arm-throttling for additional information.",
            kind.singular(),
            subscription.id,
            caller.claims.oid,
            wait_secs.ceil().max(1.0)
        );
        return super::over_budget(ctx, super::faults::Api::Arm, req, &message, wait_secs);
    }
    let mut st = ctx.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    st.purge(now);
    let result = route(ctx, &mut st, req, &caller, &subscription.id);
    let mut response = match result {
        Ok((response, changed)) => {
            if changed {
                ctx.save(&st);
            }
            response
        }
        Err(err) => err.response(),
    };
    if let Some(Draw::Taken { left, global_left }) = draw {
        stamp_budget(&mut response, kind, left, global_left);
    }
    response
}

/// What is left of the caller's and the subscription's buckets, on the answer.
fn stamp_budget(response: &mut Response, kind: budget::Kind, left: u64, global_left: Option<u64>) {
    let kind = kind.plural();
    response.set_header(
        &format!("x-ms-ratelimit-remaining-subscription-{kind}"),
        left.to_string(),
    );
    if let Some(global) = global_left {
        let name = format!("x-ms-ratelimit-remaining-subscription-global-{kind}");
        response.set_header(&name, global.to_string());
    }
}

type Handled = Result<(Response, bool), ArmError>;

fn route(ctx: &Ctx, st: &mut State, req: &Request, caller: &Caller, sub: &str) -> Handled {
    let s: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let lower: Vec<String> = s.iter().map(|x| x.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    let get = req.method == http::Method::GET;
    match l.as_slice() {
        ["subscriptions", _] if get => tenancy::get_subscription(ctx, req, caller, sub).map(|r| (r, false)),
        ["subscriptions", _, "resourcegroups"] => {
            tenancy::list_resource_groups(ctx, req, caller, sub).map(|r| (r, false))
        }
        ["subscriptions", _, "resourcegroups", _] => {
            tenancy::get_resource_group(ctx, req, caller, sub, s[3]).map(|r| (r, false))
        }
        ["subscriptions", _, "providers", "microsoft.compute", listed] if get => match top_level_kind(listed) {
            Some(kind) => resources::list_in_scope(ctx, st, req, caller, sub, None, kind).map(|r| (r, false)),
            None => Err(not_found_route(req)),
        },
        ["subscriptions", _, "locations"] => catalog::locations(ctx, req, caller, sub).map(|r| (r, false)),
        [
            "subscriptions",
            _,
            "providers",
            "microsoft.batch",
            "locations",
            _,
            "virtualmachineskus",
        ] => catalog::batch_vm_skus(ctx, req, caller, sub, s[5]).map(|r| (r, false)),
        ["subscriptions", _, "providers", _] => providers::provider(ctx, st, req, caller, sub, s[3]),
        ["subscriptions", _, "providers", _, "register"] => providers::register(ctx, st, req, caller, sub, s[3]),
        [
            "subscriptions",
            _,
            "providers",
            "microsoft.compute",
            "locations",
            _,
            op_kind,
            _,
        ] if ["operations", "diskoperations", "capsoperations"].contains(op_kind) => {
            lro::status(ctx, st, req, caller, sub, s[5], op_kind, s[7]).map(|r| (r, false))
        }
        [
            "subscriptions",
            _,
            "resourcegroups",
            _,
            "providers",
            "microsoft.batch",
            "batchaccounts",
            _,
            rest @ ..,
        ] => match rest {
            [] => providers::batch_account(ctx, req, caller, sub, s[3], s[7]).map(|r| (r, false)),
            ["listkeys"] => providers::batch_account_keys(ctx, req, caller, sub, s[3], s[7]).map(|r| (r, false)),
            _ => Err(not_found_route(req)),
        },
        [
            "subscriptions",
            _,
            "resourcegroups",
            _,
            "providers",
            "microsoft.compute",
            rest @ ..,
        ] => route_compute(ctx, st, req, caller, sub, &s, rest),
        _ => Err(not_found_route(req)),
    }
}

/// `…/resourceGroups/{rg}/providers/Microsoft.Compute/{rest}`: VMs, snapshots, images and the
/// gallery tree. `s` is the path as given, `rest` its lower-cased tail after the provider.
fn route_compute(
    ctx: &Ctx,
    st: &mut State,
    req: &Request,
    caller: &Caller,
    sub: &str,
    s: &[&str],
    rest: &[&str],
) -> Handled {
    let method = req.method.as_str();
    let rg = s[3];
    let names: Vec<&str> = s[6..].to_vec();
    if let [listed] = rest
        && method == "GET"
        && let Some(kind) = top_level_kind(listed)
    {
        return resources::list_in_scope(ctx, st, req, caller, sub, Some(rg), kind).map(|r| (r, false));
    }
    match rest {
        ["disks"] if method == "GET" => disks::list_disks(ctx, req, caller, sub, rg).map(|r| (r, false)),
        ["disks", _] => disks::get_disk(ctx, req, caller, sub, rg, names[1]).map(|r| (r, false)),
        ["virtualmachines", _] => compute::get_vm(ctx, req, caller, sub, rg, names[1]).map(|r| (r, false)),
        ["virtualmachines", _, "instanceview"] => {
            compute::get_instance_view(ctx, req, caller, sub, rg, names[1]).map(|r| (r, false))
        }
        ["virtualmachines", _, "extensions"] => {
            compute::list_extensions(ctx, req, caller, sub, rg, names[1]).map(|r| (r, false))
        }
        ["snapshots", _] => resources::handle(ctx, st, req, caller, sub, rg, Kind::Snapshot, &[names[1]]),
        ["images", _] => resources::handle(ctx, st, req, caller, sub, rg, Kind::Image, &[names[1]]),
        ["galleries", _] => resources::handle(ctx, st, req, caller, sub, rg, Kind::Gallery, &[names[1]]),
        ["galleries", _, "images"] if method == "GET" => {
            resources::list(ctx, st, req, caller, sub, rg, Kind::GalleryImage, &[names[1]]).map(|r| (r, false))
        }
        ["galleries", _, "images", _] => {
            resources::handle(ctx, st, req, caller, sub, rg, Kind::GalleryImage, &[names[1], names[3]])
        }
        ["galleries", _, "images", _, "versions"] if method == "GET" => resources::list(
            ctx,
            st,
            req,
            caller,
            sub,
            rg,
            Kind::GalleryImageVersion,
            &[names[1], names[3]],
        )
        .map(|r| (r, false)),
        ["galleries", _, "images", _, "versions", _] => resources::handle(
            ctx,
            st,
            req,
            caller,
            sub,
            rg,
            Kind::GalleryImageVersion,
            &[names[1], names[3], names[5]],
        ),
        _ => Err(not_found_route(req)),
    }
}

/// The Compute types listed by resource group or subscription (`…/galleries`, `…/snapshots`,
/// `…/images`), from the lower-cased type segment.
fn top_level_kind(segment: &str) -> Option<Kind> {
    match segment {
        "galleries" => Some(Kind::Gallery),
        "snapshots" => Some(Kind::Snapshot),
        "images" => Some(Kind::Image),
        _ => None,
    }
}

fn not_found_route(req: &Request) -> ArmError {
    ArmError::new(
        404,
        "InvalidResourceType",
        format!(
            "The resource type could not be found for the request path '{}'.",
            req.path
        ),
    )
}

/// The resource group, or ARM's 404 for it.
pub fn resource_group<'a>(ctx: &'a Ctx, sub: &str, rg: &str) -> Result<&'a super::world::ResourceGroup, ArmError> {
    ctx.world
        .subscriptions
        .iter()
        .find(|s| s.id.eq_ignore_ascii_case(sub))
        .and_then(|s| s.resource_groups.iter().find(|g| g.name.eq_ignore_ascii_case(rg)))
        .ok_or_else(|| {
            ArmError::new(
                404,
                "ResourceGroupNotFound",
                format!("Resource group '{rg}' could not be found."),
            )
        })
}

/// ARM's per-answer headers: request ids and the resource provider's remaining-request counts (the
/// subscription's budget is stamped by [`handle`], which knows the caller).
pub fn stamp(ctx: &Ctx, req: &Request, resp: &mut Response) {
    let request_id = uuid::Uuid::new_v4().to_string();
    let correlation = req
        .header("x-ms-correlation-request-id")
        .map(str::to_string)
        .unwrap_or_else(|| request_id.clone());
    resp.set_header("x-ms-request-id", request_id.clone());
    resp.set_header("x-ms-correlation-request-id", correlation);
    let stamp_time = time::OffsetDateTime::now_utc();
    resp.set_header(
        "x-ms-routing-request-id",
        format!(
            "LOCAL:{:04}{:02}{:02}T{:02}{:02}{:02}Z:{request_id}",
            stamp_time.year(),
            stamp_time.month() as u8,
            stamp_time.day(),
            stamp_time.hour(),
            stamp_time.minute(),
            stamp_time.second()
        ),
    );
    if let Some(id) = req.header("x-ms-client-request-id") {
        resp.set_header("x-ms-client-request-id", id.to_string());
    }
    let sub = req.segments.get(1).cloned().unwrap_or_default().to_ascii_lowercase();
    if req.path.to_ascii_lowercase().contains("/providers/microsoft.compute/") {
        let policy = if req.method == http::Method::GET {
            format!(
                "Microsoft.Compute/GetOperation3Min;{},Microsoft.Compute/GetOperation30Min;{}",
                ctx.remaining(&format!("{sub}:c3"), 15_000),
                ctx.remaining(&format!("{sub}:c30"), 30_000)
            )
        } else {
            format!(
                "Microsoft.Compute/PutVM3Min;{},Microsoft.Compute/PutVM30Min;{}",
                ctx.remaining(&format!("{sub}:p3"), 1_000),
                ctx.remaining(&format!("{sub}:p30"), 5_000)
            )
        };
        resp.set_header("x-ms-ratelimit-remaining-resource", policy);
    }
    resp.set_header("cache-control", "no-cache");
    resp.set_header("pragma", "no-cache");
    resp.set_header("expires", "-1");
    resp.set_header("strict-transport-security", "max-age=31536000; includeSubDomains");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_checked_strictly() {
        assert!(well_formed_date("2024-07-01"));
        assert!(!well_formed_date("2024-7-01"));
        assert!(!well_formed_date("2024-02-30"));
        assert!(!well_formed_date("latest"));
    }
}
