//! What ARM answers about the caller's place in the cloud rather than about resources: the cloud's
//! own endpoints (`/metadata/endpoints`, read anonymously by `az cloud register` and SDKs that
//! discover a cloud), the tenants and subscriptions a principal can see, and resource groups.
//! Enough for a client nobody here wrote (the Azure CLI) to log in and default a location.

use serde_json::{Value, json};

use super::{ArmError, Caller, Family, authorize, check_api_version, only_get, resource_group};
use crate::emulator::Ctx;
use crate::emulator::auth::{self, ARM_AUDIENCE, BATCH_AUDIENCE};
use crate::emulator::http::{Request, Response};
use crate::emulator::world::{ResourceGroup, Subscription};

/// The versions of `/metadata/endpoints` ARM serves: 2022-09-01 answers the one cloud it belongs
/// to as an object; the older ones list every cloud (here, one) in an array.
const METADATA_SINGLE: &str = "2022-09-01";
const METADATA_LISTS: [&str; 2] = ["2019-05-01", "2020-06-01"];

/// The name the emulated cloud gives itself (a client registering it names it its own way).
const CLOUD_NAME: &str = "SigrunEmulator";

/// `GET /metadata/endpoints?api-version=…`: where this cloud's ARM, token service and Batch
/// resource are. Anonymous, as in Azure. The token audiences are Azure's (the emulator issues and
/// accepts them); every endpoint a client calls is this emulator.
pub fn cloud_metadata(ctx: &Ctx, req: &Request) -> Response {
    if let Err(refused) = only_get(req) {
        return refused.response();
    }
    let supported = || format!("{METADATA_SINGLE}, {}", METADATA_LISTS.join(", "));
    let cloud = cloud(ctx);
    match req.query("api-version") {
        Some(METADATA_SINGLE) => Response::json(200, &cloud),
        Some(v) if METADATA_LISTS.contains(&v) => Response::json(200, &json!([cloud])),
        Some(v) => super::error(
            400,
            "InvalidApiVersionParameter",
            &format!(
                "The api-version '{v}' is invalid. The supported versions are '{}'.",
                supported()
            ),
            None,
        ),
        None => super::error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
            None,
        ),
    }
}

fn cloud(ctx: &Ctx) -> Value {
    let base = &ctx.base_url;
    json!({
        "name": CLOUD_NAME,
        "resourceManager": format!("{base}/"),
        "authentication": {
            "loginEndpoint": format!("{base}/"),
            "audiences": ["https://management.core.windows.net/", ARM_AUDIENCE],
            "tenant": "common",
            "identityProvider": "AAD",
        },
        "batch": BATCH_AUDIENCE,
        "suffixes": {},
    })
}

/// `GET /tenants`: the tenant the caller's token is from (a principal of this emulator belongs to
/// one tenant).
pub fn list_tenants(ctx: &Ctx, req: &Request, caller: &Caller) -> Result<Response, ArmError> {
    check_api_version(req, Family::Subscriptions, "tenants", "global")?;
    let value: Vec<Value> = ctx
        .world
        .tenants
        .iter()
        .filter(|t| t.id.eq_ignore_ascii_case(&caller.claims.tid))
        .map(|t| {
            // Every Entra tenant has its initial `{name}.onmicrosoft.com` domain.
            let label = if t.name.is_empty() { &t.id } else { &t.name };
            let domain = format!("{}.onmicrosoft.com", label.to_ascii_lowercase());
            json!({
                "id": format!("/tenants/{}", t.id),
                "tenantId": t.id,
                "tenantCategory": "Home",
                "displayName": label,
                "domains": [domain],
                "defaultDomain": domain,
                "tenantType": "AAD",
            })
        })
        .collect();
    Ok(Response::json(200, &json!({ "value": value })))
}

/// `GET /subscriptions`: the subscriptions of the caller's tenant it holds a role in (at the
/// subscription or anywhere under it, as Azure lists them).
pub fn list_subscriptions(ctx: &Ctx, req: &Request, caller: &Caller) -> Result<Response, ArmError> {
    check_api_version(req, Family::Subscriptions, "subscriptions", "global")?;
    let value: Vec<Value> = ctx
        .world
        .subscriptions
        .iter()
        .filter(|s| visible(ctx, caller, s))
        .map(subscription_json)
        .collect();
    Ok(Response::json(200, &json!({ "value": value })))
}

/// `GET /subscriptions/{id}` (the front door has already checked that it exists and the token's
/// tenant is its tenant).
pub fn get_subscription(ctx: &Ctx, req: &Request, caller: &Caller, sub: &str) -> Result<Response, ArmError> {
    check_api_version(req, Family::Subscriptions, "subscriptions", "global")?;
    let subscription = find_subscription(ctx, sub);
    match subscription {
        Some(s) if visible(ctx, caller, s) => Ok(Response::json(200, &subscription_json(s))),
        _ => Err(super::forbidden(
            ctx,
            caller,
            "Microsoft.Resources/subscriptions/read",
            &format!("/subscriptions/{sub}"),
        )),
    }
}

fn find_subscription<'a>(ctx: &'a Ctx, sub: &str) -> Option<&'a Subscription> {
    ctx.world.subscriptions.iter().find(|s| s.id.eq_ignore_ascii_case(sub))
}

fn visible(ctx: &Ctx, caller: &Caller, subscription: &Subscription) -> bool {
    subscription.tenant.eq_ignore_ascii_case(&caller.claims.tid)
        && auth::has_access_within(
            &ctx.world,
            &caller.claims.oid,
            &format!("/subscriptions/{}", subscription.id),
        )
}

fn subscription_json(s: &Subscription) -> Value {
    json!({
        "id": format!("/subscriptions/{}", s.id),
        "authorizationSource": "RoleBased",
        "managedByTenants": [],
        "subscriptionId": s.id,
        "tenantId": s.tenant,
        "displayName": if s.name.is_empty() { &s.id } else { &s.name },
        "state": "Enabled",
        "subscriptionPolicies": {
            "locationPlacementId": "Public_2014-09-01",
            "quotaId": "PayAsYouGo_2014-09-01",
            "spendingLimit": "Off",
        },
    })
}

/// `GET /subscriptions/{sub}/resourcegroups/{rg}`.
pub fn get_resource_group(
    ctx: &Ctx,
    req: &Request,
    caller: &Caller,
    sub: &str,
    rg: &str,
) -> Result<Response, ArmError> {
    only_get(req)?;
    let group = resource_group(ctx, sub, rg)?;
    check_api_version(req, Family::Resources, "resourceGroups", &group.location)?;
    let id = group_id(sub, group);
    authorize(
        ctx,
        caller,
        "Microsoft.Resources/subscriptions/resourceGroups/read",
        &id,
    )?;
    Ok(Response::json(200, &group_json(sub, group)))
}

/// `GET /subscriptions/{sub}/resourcegroups`: the groups the caller may read.
pub fn list_resource_groups(ctx: &Ctx, req: &Request, caller: &Caller, sub: &str) -> Result<Response, ArmError> {
    only_get(req)?;
    check_api_version(req, Family::Resources, "resourceGroups", "global")?;
    let groups = find_subscription(ctx, sub)
        .map(|s| s.resource_groups.as_slice())
        .unwrap_or_default();
    let value: Vec<Value> = groups
        .iter()
        .filter(|g| {
            auth::allowed(
                &ctx.world,
                &caller.claims.oid,
                "Microsoft.Resources/subscriptions/resourceGroups/read",
                &group_id(sub, g),
            )
        })
        .map(|g| group_json(sub, g))
        .collect();
    Ok(Response::json(200, &json!({ "value": value })))
}

fn group_id(sub: &str, group: &ResourceGroup) -> String {
    format!("/subscriptions/{sub}/resourceGroups/{}", group.name)
}

fn group_json(sub: &str, group: &ResourceGroup) -> Value {
    json!({
        "id": group_id(sub, group),
        "name": group.name,
        "type": "Microsoft.Resources/resourceGroups",
        "location": group.location,
        "properties": {"provisioningState": "Succeeded"},
    })
}
