//! Resource providers (GET and register, as Microsoft.Resources serves them) and the management
//! plane of Batch accounts (GET only: where the account's data plane lives and its region).

use serde_json::json;
use time::Duration;

use super::{ArmError, Caller, Family, authorize, check_api_version, resource_group};
use crate::emulator::Ctx;
use crate::emulator::http::{Request, Response};
use crate::emulator::state::{ProviderRegistration, State};
use crate::emulator::world::BatchAccount;

const NAMESPACES: &[(&str, &[&str])] = &[
    (
        "Microsoft.Compute",
        &[
            "virtualMachines",
            "snapshots",
            "images",
            "galleries",
            "galleries/images",
            "galleries/images/versions",
            "locations/operations",
        ],
    ),
    (
        "Microsoft.Batch",
        &["batchAccounts", "batchAccounts/pools", "locations/quotas"],
    ),
    ("Microsoft.Storage", &["storageAccounts"]),
    ("Microsoft.Network", &["virtualNetworks", "networkInterfaces"]),
    ("Microsoft.Resources", &["subscriptions", "resourceGroups"]),
];

/// Records the registrations the world file declares.
pub fn seed_providers(ctx: &Ctx, st: &mut State) {
    let start = ctx.clock.now() - Duration::days(365);
    for sub in &ctx.world.subscriptions {
        let entry = st.providers.entry(sub.id.to_ascii_lowercase()).or_default();
        for ns in sub
            .registered_providers
            .iter()
            .map(String::as_str)
            .chain(["Microsoft.Resources"])
        {
            entry.entry(ns.to_ascii_lowercase()).or_insert(ProviderRegistration {
                requested: None,
                registered_at: start,
            });
        }
    }
}

fn canonical_namespace(ns: &str) -> Option<(&'static str, &'static [&'static str])> {
    NAMESPACES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(ns))
        .copied()
}

/// `NotRegistered`, `Registering` or `Registered` for a namespace in a subscription, now.
pub fn registration_state(ctx: &Ctx, st: &State, sub: &str, ns: &str) -> &'static str {
    match st
        .providers
        .get(&sub.to_ascii_lowercase())
        .and_then(|m| m.get(&ns.to_ascii_lowercase()))
    {
        None => "NotRegistered",
        Some(reg) if ctx.clock.now() < reg.registered_at => "Registering",
        Some(_) => "Registered",
    }
}

/// ARM's 409 for a call to a provider the subscription has not registered.
pub fn require_registered(ctx: &Ctx, st: &State, sub: &str, ns: &str) -> Result<(), ArmError> {
    if registration_state(ctx, st, sub, ns) == "Registered" {
        return Ok(());
    }
    Err(ArmError::new(
        409,
        "MissingSubscriptionRegistration",
        format!(
            "The subscription is not registered to use namespace '{ns}'. See https://aka.ms/rps-not-found for how to register subscriptions."
        ),
    ))
}

fn provider_body(ctx: &Ctx, st: &State, sub: &str, ns: &str, types: &[&str]) -> serde_json::Value {
    json!({
        "id": format!("/subscriptions/{sub}/providers/{ns}"),
        "namespace": ns,
        "registrationState": registration_state(ctx, st, sub, ns),
        "registrationPolicy": "RegistrationRequired",
        "resourceTypes": types.iter().map(|t| json!({
            "resourceType": t,
            "locations": crate::emulator::regions::all().map(crate::emulator::regions::display).collect::<Vec<_>>(),
            "apiVersions": ["2025-04-01", "2024-07-01", "2024-03-03", "2024-03-02"],
            "capabilities": "SupportsTags, SupportsLocation",
        })).collect::<Vec<_>>(),
    })
}

fn namespace_or_404(ns: &str) -> Result<(&'static str, &'static [&'static str]), ArmError> {
    canonical_namespace(ns).ok_or_else(|| {
        ArmError::new(
            404,
            "InvalidResourceNamespace",
            format!("The resource namespace '{ns}' is invalid."),
        )
    })
}

pub fn provider(
    ctx: &Ctx,
    st: &mut State,
    req: &Request,
    caller: &Caller,
    sub: &str,
    ns: &str,
) -> Result<(Response, bool), ArmError> {
    if req.method != http::Method::GET {
        return Err(ArmError::new(
            405,
            "MethodNotAllowed",
            "Only GET is allowed on a provider.",
        ));
    }
    check_api_version(req, Family::Resources, "providers", "global")?;
    authorize(
        ctx,
        caller,
        "Microsoft.Resources/subscriptions/providers/read",
        &format!("/subscriptions/{sub}"),
    )?;
    let (ns, types) = namespace_or_404(ns)?;
    Ok((Response::json(200, &provider_body(ctx, st, sub, ns, types)), false))
}

pub fn register(
    ctx: &Ctx,
    st: &mut State,
    req: &Request,
    caller: &Caller,
    sub: &str,
    ns: &str,
) -> Result<(Response, bool), ArmError> {
    if req.method != http::Method::POST {
        return Err(ArmError::new(
            405,
            "MethodNotAllowed",
            "Only POST is allowed on register.",
        ));
    }
    check_api_version(req, Family::Resources, "providers", "global")?;
    let (ns, types) = namespace_or_404(ns)?;
    authorize(
        ctx,
        caller,
        &format!("{ns}/register/action"),
        &format!("/subscriptions/{sub}"),
    )?;
    let now = ctx.clock.now();
    let entry = st.providers.entry(sub.to_ascii_lowercase()).or_default();
    let mut changed = false;
    entry.entry(ns.to_ascii_lowercase()).or_insert_with(|| {
        changed = true;
        ProviderRegistration {
            requested: Some(now),
            registered_at: now + Duration::seconds(45) * ctx.jitter(&format!("register:{sub}:{ns}"), 0.3),
        }
    });
    Ok((Response::json(200, &provider_body(ctx, st, sub, ns, types)), changed))
}

/// What a Batch account call and Get Keys both do first: the group exists, the api-version fits,
/// the method is the one served, the caller may do `action`, and the account is in the world.
struct AccountCall<'a> {
    ctx: &'a Ctx,
    req: &'a Request,
    caller: &'a Caller,
    sub: &'a str,
    rg: &'a str,
    name: &'a str,
}

impl<'a> AccountCall<'a> {
    fn account(&self, method: http::Method, action: &str) -> Result<&'a BatchAccount, ArmError> {
        let (ctx, name) = (self.ctx, self.name);
        let group = resource_group(ctx, self.sub, self.rg)?;
        check_api_version(self.req, Family::BatchManagement, "batchAccounts", &group.location)?;
        if self.req.method != method {
            return Err(ArmError::new(
                405,
                "MethodNotAllowed",
                format!("The emulator serves {method} here only."),
            ));
        }
        let id = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Batch/batchAccounts/{name}",
            self.sub, group.name
        );
        authorize(ctx, self.caller, action, &id)?;
        ctx.world
            .batch_accounts
            .iter()
            .find(|a| {
                a.subscription.eq_ignore_ascii_case(self.sub)
                    && a.resource_group.eq_ignore_ascii_case(self.rg)
                    && a.name.eq_ignore_ascii_case(name)
            })
            .ok_or_else(|| super::resource_not_found(&format!("Microsoft.Batch/batchAccounts/{name}"), &group.name))
    }
}

/// Batch Account – Get Keys (`POST …/listKeys`): the account's Shared Key pair, for clients that
/// sign with it (`batch/shared_key.rs`).
pub fn batch_account_keys(
    ctx: &Ctx,
    req: &Request,
    caller: &Caller,
    sub: &str,
    rg: &str,
    name: &str,
) -> Result<Response, ArmError> {
    let call = AccountCall {
        ctx,
        req,
        caller,
        sub,
        rg,
        name,
    };
    let account = call.account(http::Method::POST, "Microsoft.Batch/batchAccounts/listkeys/action")?;
    let key = |which| crate::emulator::batch::shared_key::account_key(&ctx.key, &account.name, which);
    Ok(Response::json(
        200,
        &json!({"accountName": account.name, "primary": key("primary"), "secondary": key("secondary")}),
    ))
}

pub fn batch_account(
    ctx: &Ctx,
    req: &Request,
    caller: &Caller,
    sub: &str,
    rg: &str,
    name: &str,
) -> Result<Response, ArmError> {
    let call = AccountCall {
        ctx,
        req,
        caller,
        sub,
        rg,
        name,
    };
    let account = call.account(http::Method::GET, "Microsoft.Batch/batchAccounts/read")?;
    let endpoint = crate::emulator::batch::account_url(&ctx.base_url, &account.name);
    let endpoint = endpoint.trim_start_matches("https://").trim_start_matches("http://");
    Ok(Response::json(
        200,
        &json!({
            "id": format!("/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Batch/batchAccounts/{}", account.subscription, account.resource_group, account.name),
            "name": account.name,
            "type": "Microsoft.Batch/batchAccounts",
            "location": account.location,
            "identity": {"type": "None"},
            "properties": {
                "accountEndpoint": endpoint,
                "nodeManagementEndpoint": format!("{}.nodemanagement.emulator", account.name),
                "provisioningState": "Succeeded",
                "poolAllocationMode": "BatchService",
                "publicNetworkAccess": "Enabled",
                "dedicatedCoreQuota": account.dedicated_core_quota,
                "lowPriorityCoreQuota": account.low_priority_core_quota,
                "dedicatedCoreQuotaPerVMFamily": account
                    .dedicated_core_quota_per_family
                    .iter()
                    .map(|(name, quota)| json!({"name": name, "coreQuota": quota}))
                    .collect::<Vec<_>>(),
                "dedicatedCoreQuotaPerVMFamilyEnforced": account.per_family_enforced,
                "poolQuota": account.pool_quota,
                "activeJobAndJobScheduleQuota": 300,
                "allowedAuthenticationModes": ["SharedKey", "AAD", "TaskAuthenticationToken"],
            },
        }),
    ))
}
