//! Identities and access: issuing JWT-shaped access tokens, checking a bearer token on every ARM and
//! Batch call (signature, audience, expiry, tenant), and role-based access on ARM scopes.
//!
//! Tokens are HS256-signed with a key the emulator keeps (in its state directory when it has one),
//! so they survive a restart. Lifetimes run on real time: a client's token cache counts real seconds.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use time::OffsetDateTime;

use super::world::{Principal, RoleAssignment, World};

pub const ARM_AUDIENCE: &str = "https://management.azure.com/";
pub const BATCH_AUDIENCE: &str = "https://batch.core.windows.net/";
pub const TOKEN_LIFETIME_SECS: i64 = 3599;

/// The claims the emulator puts in, and reads back from, an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub aud: String,
    pub iss: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub appid: String,
    pub oid: String,
    pub sub: String,
    pub tid: String,
    pub idtyp: String,
    pub ver: String,
}

/// Why a bearer token was refused; each maps to ARM's and Batch's own 401 codes.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenProblem {
    Missing,
    Malformed,
    BadSignature,
    Expired { exp: i64, now: i64 },
    WrongAudience { aud: String },
    WrongTenant { issuer: String, expected_tenant: String },
}

pub struct TokenKey(Vec<u8>);

impl TokenKey {
    pub fn new(bytes: Vec<u8>) -> TokenKey {
        TokenKey(bytes)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// HMAC-SHA256 of `message` under this key: how other secrets (Batch account keys) are made
    /// from it, and how a Shared Key signature is computed.
    pub fn derive(&self, message: &[u8]) -> Vec<u8> {
        self.sign(message)
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("hmac takes any key length");
        mac.update(message);
        mac.finalize().into_bytes().to_vec()
    }

    pub fn issue(&self, principal: &Principal, resource: &str) -> (String, Claims) {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = Claims {
            aud: resource.to_string(),
            iss: format!("https://sts.windows.net/{}/", principal.tenant),
            iat: now,
            nbf: now,
            exp: now + TOKEN_LIFETIME_SECS,
            appid: principal.client_id.clone(),
            oid: principal.object_id.clone(),
            sub: principal.object_id.clone(),
            tid: principal.tenant.clone(),
            idtyp: "app".to_string(),
            ver: "1.0".to_string(),
        };
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256","kid":"sigrun-emulator"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let signing_input = format!("{header}.{payload}");
        let signature = URL_SAFE_NO_PAD.encode(self.sign(signing_input.as_bytes()));
        (format!("{signing_input}.{signature}"), claims)
    }

    /// Checks signature, expiry and audience; the tenant is checked by the caller, who knows the
    /// subscription or account the request is for.
    pub fn verify(&self, authorization: Option<&str>, audiences: &[&str]) -> Result<Claims, TokenProblem> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or(TokenProblem::Missing)?;
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenProblem::Malformed);
        };
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| TokenProblem::Malformed)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("hmac takes any key length");
        mac.update(format!("{header}.{payload}").as_bytes());
        mac.verify_slice(&signature).map_err(|_| TokenProblem::BadSignature)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(TokenProblem::Malformed)?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        if claims.exp <= now {
            return Err(TokenProblem::Expired { exp: claims.exp, now });
        }
        let aud = claims.aud.trim_end_matches('/');
        if !audiences
            .iter()
            .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(aud))
        {
            return Err(TokenProblem::WrongAudience { aud: claims.aud });
        }
        Ok(claims)
    }
}

/// The audience (v1 resource) a v2 scope asks for: `https://batch.core.windows.net//.default` and
/// `https://batch.core.windows.net/.default` both mean `https://batch.core.windows.net/`.
pub fn resource_of_scope(scope: &str) -> Option<String> {
    let resource = scope.split_whitespace().next()?.strip_suffix(".default")?;
    let trimmed = resource.trim_end_matches('/');
    Some(format!("{trimmed}/"))
}

/// Whether `resource` is one the emulator serves (so AAD knows the resource principal).
pub fn known_resource(resource: &str) -> bool {
    let r = resource.trim_end_matches('/').to_ascii_lowercase();
    [
        "https://management.azure.com",
        "https://management.core.windows.net",
        "https://batch.core.windows.net",
    ]
    .contains(&r.as_str())
}

/// Built-in role actions; custom roles come from the world.
fn role_actions(world: &World, role: &str) -> Vec<String> {
    match role.to_ascii_lowercase().as_str() {
        "owner" | "contributor" => vec!["*".to_string()],
        "reader" => vec!["*/read".to_string()],
        _ => world
            .roles
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(role))
            .map(|r| r.actions.clone())
            .unwrap_or_default(),
    }
}

fn action_matches(pattern: &str, action: &str) -> bool {
    super::faults::glob_match(pattern, action)
}

/// Every role assignment of the principal `oid` (an app or a managed identity).
fn assignments_of<'a>(world: &'a World, oid: &'a str) -> impl Iterator<Item = &'a RoleAssignment> {
    world
        .apps
        .iter()
        .chain(world.managed_identities.iter())
        .filter(move |p| p.object_id.eq_ignore_ascii_case(oid))
        .flat_map(|p| p.roles.iter())
}

/// A scope as scopes are compared: lower case, no trailing `/`.
fn scope_key(scope: &str) -> String {
    scope.trim_end_matches('/').to_ascii_lowercase()
}

/// Whether scope `inner` is `outer` or under it (both as [`scope_key`] gives them).
fn within(inner: &str, outer: &str) -> bool {
    inner == outer || inner.starts_with(&format!("{outer}/"))
}

/// Whether the principal `oid` may perform `action` on `scope` (an ARM id). A role assigned on a
/// scope applies to everything under it.
pub fn allowed(world: &World, oid: &str, action: &str, scope: &str) -> bool {
    let scope = scope_key(scope);
    assignments_of(world, oid)
        .filter(|assignment| within(&scope, &scope_key(&assignment.scope)))
        .any(|assignment| {
            role_actions(world, &assignment.role)
                .iter()
                .any(|p| action_matches(p, action))
        })
}

/// Whether the principal `oid` holds any role at `scope`, above it or anywhere under it: what
/// makes a subscription appear in its Subscriptions – List (a role on one resource group is
/// enough).
pub fn has_access_within(world: &World, oid: &str, scope: &str) -> bool {
    let scope = scope_key(scope);
    assignments_of(world, oid).any(|assignment| {
        let granted = scope_key(&assignment.scope);
        within(&granted, &scope) || within(&scope, &granted)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal() -> Principal {
        Principal {
            name: "app".into(),
            tenant: "t1".into(),
            client_id: "c1".into(),
            client_secret: Some("s".into()),
            object_id: "o1".into(),
            roles: vec![],
        }
    }

    #[test]
    fn issued_tokens_verify_and_tampering_is_caught() {
        let key = TokenKey::new(vec![7; 32]);
        let (token, claims) = key.issue(&principal(), ARM_AUDIENCE);
        let header = format!("Bearer {token}");
        assert_eq!(key.verify(Some(&header), &[ARM_AUDIENCE]).unwrap().oid, claims.oid);
        assert!(matches!(
            key.verify(Some(&header), &[BATCH_AUDIENCE]),
            Err(TokenProblem::WrongAudience { .. })
        ));
        let other = TokenKey::new(vec![8; 32]);
        assert_eq!(
            other.verify(Some(&header), &[ARM_AUDIENCE]).unwrap_err(),
            TokenProblem::BadSignature
        );
        assert_eq!(key.verify(None, &[ARM_AUDIENCE]).unwrap_err(), TokenProblem::Missing);
        assert_eq!(
            key.verify(Some("Bearer abc"), &[ARM_AUDIENCE]).unwrap_err(),
            TokenProblem::Malformed
        );
    }

    #[test]
    fn scopes_map_to_resources() {
        assert_eq!(
            resource_of_scope("https://batch.core.windows.net//.default").unwrap(),
            BATCH_AUDIENCE
        );
        assert_eq!(
            resource_of_scope("https://management.azure.com/.default").unwrap(),
            ARM_AUDIENCE
        );
        assert_eq!(
            resource_of_scope("https://management.azure.com/user_impersonation"),
            None
        );
    }

    #[test]
    fn roles_apply_below_their_scope() {
        let mut world = World::default_world();
        world.roles.push(super::super::world::RoleDefinition {
            name: "Image Reader".into(),
            actions: vec!["*/read".into(), "Microsoft.Compute/disks/beginGetAccess/action".into()],
        });
        let mut p = principal();
        p.object_id = "oid-x".into();
        p.tenant = world.tenants[0].id.clone();
        p.roles = vec![
            super::super::world::RoleAssignment {
                role: "Reader".into(),
                scope: "/subscriptions/s1".into(),
            },
            super::super::world::RoleAssignment {
                role: "Image Reader".into(),
                scope: "/subscriptions/s1/resourceGroups/rg2".into(),
            },
        ];
        world.apps.push(p);
        let read = "Microsoft.Compute/images/read";
        let access = "Microsoft.Compute/disks/beginGetAccess/action";
        assert!(allowed(&world, "oid-x", read, "/subscriptions/s1/resourceGroups/rg/x"));
        assert!(!allowed(
            &world,
            "oid-x",
            "Microsoft.Compute/images/write",
            "/subscriptions/s1/resourceGroups/rg/x"
        ));
        assert!(!allowed(
            &world,
            "oid-x",
            access,
            "/subscriptions/s1/resourceGroups/rg/x"
        ));
        assert!(allowed(
            &world,
            "oid-x",
            access,
            "/subscriptions/S1/resourceGroups/RG2/x"
        ));
        assert!(!allowed(&world, "oid-x", read, "/subscriptions/s10"));
    }
}
