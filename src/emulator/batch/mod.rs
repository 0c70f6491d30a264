//! The Batch data plane of each account, served under `{base_url}/batch/{account}` (in Azure,
//! `https://{account}.{region}.batch.azure.com`). Checks the api-version and the Azure AD token
//! (audience `https://batch.core.windows.net/`, tenant of the account's subscription, a role on the
//! account), refuses Shared Key for gallery-image pools, and answers in Batch's odata error shape.

mod body;
mod images;
mod pools;
mod quota;
pub mod shared_key;

use serde_json::{Value, json};

use super::Ctx;
use super::auth::{self, TokenProblem};
use super::budget::{Draw, Kind};
use super::http::{Request, Response};
use super::world::BatchAccount;

pub fn account_url(base_url: &str, account: &str) -> String {
    format!("{base_url}/batch/{}", account.to_ascii_lowercase())
}

/// Batch's error body; `values` carries the key/value details Batch adds.
pub fn error(req: &Request, status: u16, code: &str, message: &str, values: &[(&str, &str)]) -> Response {
    let account = req.segments.get(1).cloned().unwrap_or_default();
    let request_id = uuid::Uuid::new_v4().to_string();
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut body = json!({
        "odata.metadata": format!("{}/$metadata#Microsoft.Azure.Batch.Protocol.Entities.Container.errors/@Element", account_url(&req.base_url, &account)),
        "code": code,
        "message": {"lang": "en-US", "value": format!("{message}\nRequestId:{request_id}\nTime:{now}")},
    });
    if !values.is_empty() {
        body["values"] = json!(
            values
                .iter()
                .map(|(k, v)| json!({"key": k, "value": v}))
                .collect::<Vec<_>>()
        );
    }
    let mut resp = Response::json(status, &body);
    resp.set_header("content-type", "application/json;odata=minimalmetadata");
    resp.set_header("request-id", request_id);
    resp
}

pub fn stamp(req: &Request, resp: &mut Response) {
    if resp.header("request-id").is_none() {
        resp.set_header("request-id", uuid::Uuid::new_v4().to_string());
    }
    if req
        .header("return-client-request-id")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        && let Some(id) = req.header("client-request-id")
    {
        resp.set_header("client-request-id", id.to_string());
    }
    resp.set_header("dataserviceversion", "3.0");
    resp.set_header("strict-transport-security", "max-age=31536000; includeSubDomains");
}

fn today() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), d.month() as u8, d.day())
}

fn api_version_ok(v: &str) -> bool {
    const OLDER: &[&str] = &["2023-05-01.17.0", "2023-11-01.18.0", "2024-02-01.19.0"];
    if OLDER.contains(&v) {
        return true;
    }
    if !v.is_ascii() {
        return false;
    }
    let (date, suffix) = v.split_at(v.len().min(10));
    let date_ok = time::Date::parse(date, time::macros::format_description!("[year]-[month]-[day]")).is_ok()
        && date.len() == 10
        && date <= today().as_str();
    let classic = suffix.strip_prefix('.').is_some_and(|rest| {
        let parts: Vec<&str> = rest.split('.').collect();
        parts.len() == 2
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
    });
    date_ok && ((classic && date >= "2024-07-01") || (suffix.is_empty() && date >= "2025-06-01"))
}

/// How the caller authenticated.
pub enum BatchCaller {
    /// An Azure AD token; the caller's object id.
    Aad {
        oid: String,
    },
    SharedKey,
}

fn unauthorized(req: &Request, tenant: &str, detail: &str) -> Response {
    error(
        req,
        401,
        "AuthenticationFailed",
        "Server failed to authenticate the request. Make sure the value of Authorization header is formed correctly including the signature.",
        &[("AuthenticationErrorDetail", detail)],
    )
    .with_header(
        "www-authenticate",
        format!("Bearer authorization_uri=https://login.microsoftonline.com/{tenant}/oauth2/authorize resource_id=https://batch.core.windows.net/"),
    )
}

/// Who is calling: a Shared Key whose signature holds, or an Azure AD token of the account's
/// tenant for Batch; otherwise the answer Batch gives.
fn authenticate(ctx: &Ctx, req: &Request, account: &BatchAccount) -> Result<BatchCaller, Response> {
    let tenant = ctx
        .world
        .subscriptions
        .iter()
        .find(|s| s.id.eq_ignore_ascii_case(&account.subscription))
        .map(|s| s.tenant.clone())
        .unwrap_or_default();
    let authorization = req.header("authorization");
    let caller = if let Some(shared_key) = authorization.filter(|h| h.starts_with("SharedKey ")) {
        if let Err(detail) = shared_key::check(&ctx.key, req, &account.name, shared_key) {
            return Err(error(
                req,
                403,
                "AuthenticationFailed",
                "Server failed to authenticate the request. Make sure the value of Authorization header is formed correctly including the signature.",
                &[("AuthenticationErrorDetail", &detail)],
            ));
        }
        BatchCaller::SharedKey
    } else {
        match ctx.key.verify(authorization, &[auth::BATCH_AUDIENCE]) {
            Ok(claims) if claims.tid.eq_ignore_ascii_case(&tenant) => BatchCaller::Aad { oid: claims.oid },
            Ok(claims) => {
                return Err(unauthorized(
                    req,
                    &tenant,
                    &format!(
                        "The access token is from the wrong issuer '{}'. It must match the tenant of the Batch account.",
                        claims.iss
                    ),
                ));
            }
            Err(problem) => {
                let detail = match problem {
                    TokenProblem::Missing => "The Authorization header is missing.".to_string(),
                    TokenProblem::Expired { .. } => "The access token has expired.".to_string(),
                    TokenProblem::WrongAudience { aud } => format!(
                        "The access token was issued for audience '{aud}', not 'https://batch.core.windows.net/'."
                    ),
                    _ => "The access token is invalid.".to_string(),
                };
                return Err(unauthorized(req, &tenant, &detail));
            }
        }
    };
    Ok(caller)
}

pub fn handle(ctx: &Ctx, req: &Request) -> Response {
    let Some(account) = req.segments.get(1).and_then(|name| {
        ctx.world
            .batch_accounts
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(name))
    }) else {
        return error(
            req,
            404,
            "AccountNotFound",
            "The specified account does not exist.",
            &[],
        );
    };
    match req.query("api-version") {
        None => {
            return error(
                req,
                400,
                "MissingRequiredQueryParameter",
                "A query parameter that's mandatory for this request is not specified.",
                &[("QueryParameterName", "api-version")],
            );
        }
        Some(v) if !api_version_ok(v) => {
            return error(
                req,
                400,
                "InvalidQueryParameterValue",
                "Value for one of the query parameters specified in the request URI is invalid.",
                &[
                    ("QueryParameterName", "api-version"),
                    ("QueryParameterValue", v),
                    (
                        "Reason",
                        "The specified api version string is invalid or not supported.",
                    ),
                ],
            );
        }
        Some(_) => {}
    }
    let caller = match authenticate(ctx, req, account) {
        Ok(caller) => caller,
        Err(refused) => return refused,
    };
    let account_id = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Batch/batchAccounts/{}",
        account.subscription, account.resource_group, account.name
    );
    if let BatchCaller::Aad { oid } = &caller {
        let verb = match req.method.as_str() {
            "GET" | "HEAD" => "read",
            "DELETE" => "delete",
            _ => "write",
        };
        if !auth::allowed(
            &ctx.world,
            oid,
            &format!("Microsoft.Batch/batchAccounts/pools/{verb}"),
            &account_id,
        ) {
            return error(
                req,
                403,
                "InsufficientPermissions",
                &format!(
                    "The identity '{}' does not have permission to perform this operation on account '{}'.",
                    oid, account.name
                ),
                &[],
            );
        }
    }
    let principal = match &caller {
        BatchCaller::Aad { oid } => oid.as_str(),
        BatchCaller::SharedKey => "shared-key",
    };
    let kind = Kind::of(&req.method);
    if let Some(Draw::Refused { wait_secs }) = ctx.budgets.draw_batch(&account.name, principal, kind, ctx.clock.now()) {
        let message = format!(
            "The server is busy: too many '{}' requests on account '{}'; retry the request later.",
            kind.singular(),
            account.name
        );
        return super::over_budget(ctx, super::faults::Api::Batch, req, &message, wait_secs);
    }
    pools::route(ctx, req, account, &caller)
}

/// Helper for handlers: a JSON answer in Batch's content type.
pub fn ok_json(status: u16, body: &Value) -> Response {
    let mut resp = Response::json(status, body);
    resp.set_header("content-type", "application/json;odata=minimalmetadata");
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_api_versions() {
        assert!(api_version_ok("2024-07-01.20.0"));
        assert!(api_version_ok("2025-06-01"));
        assert!(api_version_ok("2023-05-01.17.0"));
        assert!(!api_version_ok("2020-01-01.10.0"));
        assert!(!api_version_ok("2024-07-01"));
        assert!(!api_version_ok("2099-01-01"));
        assert!(!api_version_ok("banana"));
    }
}
