//! Azure AD (Entra ID) v2 as the clients see it: the client-credentials token endpoint, the
//! instance-discovery and OpenID configuration documents MSAL-based clients read first, and the
//! two managed identity endpoints (App Service style with `X-IDENTITY-HEADER`, and IMDS style).

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Ctx;
use super::auth::{self, TOKEN_LIFETIME_SECS};
use super::http::{Request, Response};
use super::world::Principal;

pub fn handle(ctx: &Ctx, req: &Request) -> Response {
    let s: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    match (req.method.as_str(), s.as_slice()) {
        ("POST", [tenant, "oauth2", "v2.0", "token"]) => token(ctx, req, tenant),
        ("GET", ["common" | "organizations", "discovery", "instance"]) => discovery(ctx, req),
        ("GET", [tenant, "v2.0", ".well-known", "openid-configuration"]) => openid_configuration(ctx, tenant),
        ("GET", [tenant, ".well-known", "openid-configuration"]) => openid_configuration(ctx, tenant),
        _ => aad_error(
            404,
            "invalid_request",
            90_002,
            "AADSTS90002: The requested endpoint does not exist on this emulator.",
        ),
    }
}

/// AAD's error body; `error_codes` carries the AADSTS number clients key on.
fn aad_error(status: u16, error: &str, code: u32, description: &str) -> Response {
    let now = OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default();
    let trace = uuid::Uuid::new_v4().to_string();
    let correlation = uuid::Uuid::new_v4().to_string();
    Response::json(
        status,
        &json!({
            "error": error,
            "error_description": format!("{description}\r\nTrace ID: {trace}\r\nCorrelation ID: {correlation}\r\nTimestamp: {now}"),
            "error_codes": [code],
            "timestamp": now,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        }),
    )
}

fn find_tenant<'a>(ctx: &'a Ctx, tenant: &str) -> Option<&'a str> {
    ctx.world
        .tenants
        .iter()
        .find(|t| t.id.eq_ignore_ascii_case(tenant) || (!t.name.is_empty() && t.name.eq_ignore_ascii_case(tenant)))
        .map(|t| t.id.as_str())
}

/// The client-credentials grant, checked in AAD's order: the tenant, the form and its grant type,
/// the app and its secret, the scope; then a token for the scope's resource.
fn token(ctx: &Ctx, req: &Request, tenant: &str) -> Response {
    let Some(tenant_id) = find_tenant(ctx, tenant) else {
        return aad_error(
            400,
            "invalid_tenant",
            90_002,
            &format!(
                "AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        );
    };
    let form = match client_credentials_form(req) {
        Ok(form) => form,
        Err(refused) => return refused,
    };
    let client = match registered_app(ctx, &form, tenant_id) {
        Ok(client) => client,
        Err(refused) => return refused,
    };
    if let Err(refused) = check_client_secret(&form, &client) {
        return refused;
    }
    let resource = match scope_resource(&form, tenant_id) {
        Ok(resource) => resource,
        Err(refused) => return refused,
    };
    let (access_token, _) = ctx.key.issue(client.app, &resource);
    Response::json(
        200,
        &json!({
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME_SECS,
            "ext_expires_in": TOKEN_LIFETIME_SECS,
            "access_token": access_token,
        }),
    )
}

/// A token request's form fields, in the order they were sent.
struct Form(Vec<(String, String)>);

impl Form {
    /// The first value of field `name`.
    fn field(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// AADSTS900144, what AAD answers for a form without one of the parameters the grant needs.
fn missing_parameter(name: &str) -> Response {
    aad_error(
        400,
        "invalid_request",
        900_144,
        &format!("AADSTS900144: The request body must contain the following parameter: '{name}'."),
    )
}

/// The token endpoint reads a form-encoded body only (anything else reads as a form without
/// `grant_type`), and this emulator grants client credentials only.
fn client_credentials_form(req: &Request) -> Result<Form, Response> {
    let content_type = req.header("content-type").unwrap_or_default();
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return Err(missing_parameter("grant_type"));
    }
    let form = Form(form_urlencoded::parse(&req.body).into_owned().collect());
    match form.field("grant_type") {
        Some("client_credentials") => Ok(form),
        Some(other) => Err(aad_error(
            400,
            "unsupported_grant_type",
            70_003,
            &format!("AADSTS70003: The app requested an unsupported grant type '{other}'."),
        )),
        None => Err(missing_parameter("grant_type")),
    }
}

/// The app a token request names: its `client_id` as sent, and its registration.
struct Client<'a> {
    id: &'a str,
    app: &'a Principal,
}

/// The `client_id` names an app registered in the tenant the request was sent to.
fn registered_app<'a>(ctx: &'a Ctx, form: &'a Form, tenant_id: &str) -> Result<Client<'a>, Response> {
    let Some(client_id) = form.field("client_id") else {
        return Err(missing_parameter("client_id"));
    };
    ctx.world
        .apps
        .iter()
        .find(|a| a.client_id.eq_ignore_ascii_case(client_id) && a.tenant.eq_ignore_ascii_case(tenant_id))
        .map(|app| Client { id: client_id, app })
        .ok_or_else(|| {
            aad_error(
                400,
                "unauthorized_client",
                700_016,
                &format!(
                    "AADSTS700016: Application with identifier '{client_id}' was not found in the directory '{tenant_id}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant."
                ),
            )
        })
}

/// The app proves itself with its client secret (compared in constant time); a client
/// assertion (certificate or federated credential) is refused, as this emulator has none to check.
fn check_client_secret(form: &Form, client: &Client) -> Result<(), Response> {
    if form.field("client_assertion").is_some() {
        return Err(aad_error(
            401,
            "invalid_client",
            700_027,
            "AADSTS700027: Client assertion failed signature validation: this emulator accepts client secrets only.",
        ));
    }
    let secret_ok = match (form.field("client_secret"), client.app.client_secret.as_deref()) {
        (Some(given), Some(expected)) => constant_time_eq(given.as_bytes(), expected.as_bytes()),
        _ => false,
    };
    if !secret_ok {
        let client_id = client.id;
        return Err(aad_error(
            401,
            "invalid_client",
            7_000_215,
            &format!(
                "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
            ),
        ));
    }
    Ok(())
}

/// The scope is a resource's `/.default` (what client credentials ask for), and the resource is
/// one the emulator serves.
fn scope_resource(form: &Form, tenant_id: &str) -> Result<String, Response> {
    let Some(scope) = form.field("scope") else {
        return Err(missing_parameter("scope"));
    };
    match auth::resource_of_scope(scope) {
        Some(r) if auth::known_resource(&r) => Ok(r),
        Some(r) => Err(aad_error(
            400,
            "invalid_resource",
            500_011,
            &format!(
                "AADSTS500011: The resource principal named {r} was not found in the tenant named {tenant_id}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant."
            ),
        )),
        None => Err(aad_error(
            400,
            "invalid_scope",
            1_002_012,
            &format!(
                "AADSTS1002012: The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
            ),
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn discovery(ctx: &Ctx, req: &Request) -> Response {
    let host = ctx
        .base_url
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let authorization_endpoint = req.query("authorization_endpoint").unwrap_or_default();
    let tenant = authorization_endpoint
        .split('/')
        .nth(3)
        .filter(|t| !t.is_empty())
        .unwrap_or("common");
    Response::json(
        200,
        &json!({
            "tenant_discovery_endpoint": format!("{}/{tenant}/v2.0/.well-known/openid-configuration", ctx.base_url),
            "api-version": "1.1",
            "metadata": [{
                "preferred_network": host,
                "preferred_cache": host,
                "aliases": [host],
            }],
        }),
    )
}

fn openid_configuration(ctx: &Ctx, tenant: &str) -> Response {
    let tenant_id = match tenant {
        "common" | "organizations" | "consumers" => "{tenantid}".to_string(),
        other => match find_tenant(ctx, other) {
            Some(id) => id.to_string(),
            None => {
                return aad_error(
                    400,
                    "invalid_tenant",
                    90_002,
                    &format!("AADSTS90002: Tenant '{other}' not found."),
                );
            }
        },
    };
    let base = &ctx.base_url;
    let host = base.trim_start_matches("https://").trim_start_matches("http://");
    let body: Value = json!({
        "token_endpoint": format!("{base}/{tenant_id}/oauth2/v2.0/token"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": format!("{base}/{tenant_id}/discovery/v2.0/keys"),
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": format!("{base}/{tenant_id}/v2.0"),
        "request_uri_parameter_supported": false,
        "userinfo_endpoint": format!("{base}/oidc/userinfo"),
        "authorization_endpoint": format!("{base}/{tenant_id}/oauth2/v2.0/authorize"),
        "device_authorization_endpoint": format!("{base}/{tenant_id}/oauth2/v2.0/devicecode"),
        "http_logout_supported": true,
        "frontchannel_logout_supported": true,
        "end_session_endpoint": format!("{base}/{tenant_id}/oauth2/v2.0/logout"),
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "nonce", "tid", "ver", "oid"],
        "kerberos_endpoint": format!("{base}/{tenant_id}/kerberos"),
        "tenant_region_scope": "WW",
        "cloud_instance_name": host,
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": "graph.microsoft.com",
        "rbac_url": "https://pas.windows.net",
    });
    Response::json(200, &body)
}

/// Both managed identity protocols. App Service: `GET /msi/token?api-version=2019-08-01&resource=`
/// with `X-IDENTITY-HEADER`. IMDS: `GET /metadata/identity/oauth2/token?api-version=&resource=` with
/// `Metadata: true`. Values are strings, as the real endpoints send them.
pub fn managed_identity(ctx: &Ctx, req: &Request) -> Response {
    let mi_error = |status: u16, error: &str, description: &str| {
        Response::json(status, &json!({"error": error, "error_description": description}))
    };
    if req.method != http::Method::GET {
        return mi_error(405, "method_not_allowed", "Not allowed");
    }
    let app_service = req.seg_is(0, "msi");
    if app_service {
        match req.header("x-identity-header") {
            Some(h) if constant_time_eq(h.as_bytes(), ctx.identity_header.as_bytes()) => {}
            _ => {
                return mi_error(
                    401,
                    "invalid_request",
                    "The X-IDENTITY-HEADER header is missing or wrong.",
                );
            }
        }
    } else if !req.header("metadata").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return mi_error(400, "invalid_request", "Required metadata header not specified");
    }
    if req.query("api-version").is_none() {
        return mi_error(
            400,
            "invalid_request",
            "Required query variable 'api-version' is missing",
        );
    }
    let Some(resource) = req.query("resource") else {
        return mi_error(400, "invalid_request", "Required query variable 'resource' is missing");
    };
    let wanted = req.query("client_id").map(|id| (true, id)).or_else(|| {
        req.query("object_id")
            .or_else(|| req.query("principal_id"))
            .map(|id| (false, id))
    });
    let identity: Option<&Principal> = match wanted {
        None => ctx.world.managed_identities.first(),
        Some((true, id)) => ctx
            .world
            .managed_identities
            .iter()
            .find(|p| p.client_id.eq_ignore_ascii_case(id)),
        Some((false, id)) => ctx
            .world
            .managed_identities
            .iter()
            .find(|p| p.object_id.eq_ignore_ascii_case(id)),
    };
    let Some(identity) = identity else {
        return mi_error(400, "invalid_request", "Identity not found");
    };
    let normalized = format!("{}/", resource.trim_end_matches('/'));
    if !auth::known_resource(&normalized) {
        return mi_error(
            400,
            "invalid_resource",
            &format!("AADSTS500011: The resource principal named {resource} was not found in the tenant."),
        );
    }
    let (access_token, claims) = ctx.key.issue(identity, &normalized);
    Response::json(
        200,
        &json!({
            "access_token": access_token,
            "client_id": identity.client_id,
            "expires_in": TOKEN_LIFETIME_SECS.to_string(),
            "expires_on": claims.exp.to_string(),
            "ext_expires_in": TOKEN_LIFETIME_SECS.to_string(),
            "not_before": claims.nbf.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        }),
    )
}
