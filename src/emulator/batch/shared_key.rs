//! Batch's Shared Key authentication, checked as the service checks it. A request signed with an
//! account key carries `Authorization: SharedKey {account}:{signature}`, the signature being the
//! base64 HMAC-SHA256, keyed with the base64-decoded account key, of the string to sign: the verb;
//! `Content-Encoding`, `-Language`, `-Length`, `-MD5`, `-Type`, `Date`, `If-Modified-Since`,
//! `If-Match`, `If-None-Match`, `If-Unmodified-Since` and `Range` (each on its own line, empty
//! when absent); every `ocp-` header as `name:value` sorted by name; then `/{account}{path}` and
//! each query parameter as `\nname:value` sorted by name (the Batch REST documentation and
//! azure-batch's `BatchSharedKeyAuthPolicy`).
//!
//! The keys are derived from the emulator's signing key (stable with a state dir) and served by
//! ARM's Batch Account – Get Keys (`POST …/batchAccounts/{name}/listKeys`). sigrun itself never
//! signs with them (Azure AD only); other clients of the emulator may.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::super::auth::TokenKey;
use super::super::http::Request;

/// The standard headers signed, in order.
const SIGNED_HEADERS: [&str; 11] = [
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
];

/// The account's `primary` or `secondary` key (64 bytes, base64, as Azure's are).
pub fn account_key(key: &TokenKey, account: &str, which: &str) -> String {
    let label = format!("batch-account-key/{}/{which}", account.to_ascii_lowercase());
    let mut bytes = key.derive(format!("{label}/1").as_bytes());
    bytes.extend(key.derive(format!("{label}/2").as_bytes()));
    STANDARD.encode(bytes)
}

/// The string a client signs for `req` to `account`; `zero_length_empty` writes a
/// `Content-Length: 0` as empty (newer clients do, older sign the `0`).
pub fn string_to_sign(req: &Request, account: &str, zero_length_empty: bool) -> String {
    let mut text = format!("{}\n", req.method);
    for name in SIGNED_HEADERS {
        let value = req.header(name).unwrap_or_default();
        let value = if name == "content-length" && value == "0" && zero_length_empty {
            ""
        } else {
            value
        };
        text.push_str(value);
        text.push('\n');
    }
    let mut ocp: Vec<(String, &str)> = req
        .headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("ocp-"))
        .filter_map(|(name, value)| Some((name.as_str().to_string(), value.to_str().ok()?)))
        .filter(|(_, value)| !value.is_empty())
        .collect();
    ocp.sort();
    for (name, value) in ocp {
        text.push_str(&format!("{name}:{value}\n"));
    }
    text.push_str(&format!("/{account}{}", req.path));
    let mut query: Vec<&(String, String)> = req.query.iter().filter(|(_, v)| !v.is_empty()).collect();
    query.sort_by(|a, b| a.0.cmp(&b.0));
    let mut seen = std::collections::BTreeSet::new();
    for (name, value) in query {
        // The first value of a repeated parameter, as the clients sign it.
        if seen.insert(name) {
            text.push_str(&format!("\n{name}:{value}"));
        }
    }
    text
}

/// Why a `SharedKey` authorization does not hold, if it does not.
pub fn check(key: &TokenKey, req: &Request, account: &str, authorization: &str) -> Result<(), String> {
    let credentials = authorization.strip_prefix("SharedKey ").unwrap_or_default();
    let Some((name, signature)) = credentials.split_once(':') else {
        return Err("The Authorization header is not `SharedKey account:signature`.".into());
    };
    if !name.eq_ignore_ascii_case(account) {
        return Err(format!(
            "The account name in the Authorization header does not match the account '{account}'."
        ));
    }
    let Ok(given) = STANDARD.decode(signature.trim()) else {
        return Err("The signature is not base64.".into());
    };
    for which in ["primary", "secondary"] {
        let Ok(secret) = STANDARD.decode(account_key(key, account, which)) else {
            continue;
        };
        for zero_length_empty in [false, true] {
            let expected =
                TokenKey::new(secret.clone()).derive(string_to_sign(req, name, zero_length_empty).as_bytes());
            if constant_time_eq(&expected, &given) {
                return Ok(());
            }
        }
    }
    Err("The MAC signature found in the HTTP request is not the same as any computed signature.".into())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue, Method};

    fn request(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
            map.insert(name, HeaderValue::from_str(value).unwrap());
        }
        Request::new(method, &uri.parse().unwrap(), map, Bytes::new(), "https://127.0.0.1:1")
    }

    #[test]
    fn the_string_to_sign_follows_the_documented_order() {
        let req = request(
            Method::POST,
            "/batch/acct/pools?timeout=30&api-version=2024-07-01.20.0",
            &[
                ("content-type", "application/json; odata=minimalmetadata"),
                ("content-length", "12"),
                ("ocp-date", "Wed, 02 Dec 2026 10:00:00 GMT"),
                ("client-request-id", "x"),
            ],
        );
        assert_eq!(
            string_to_sign(&req, "acct", false),
            "POST\n\n\n12\n\napplication/json; odata=minimalmetadata\n\n\n\n\n\n\n\
             ocp-date:Wed, 02 Dec 2026 10:00:00 GMT\n/acct/batch/acct/pools\napi-version:2024-07-01.20.0\ntimeout:30"
        );
    }

    #[test]
    fn a_signature_made_with_the_key_holds_and_any_other_does_not() {
        let key = TokenKey::new(b"emulator signing key".to_vec());
        let mut req = request(
            Method::GET,
            "/batch/acct/pools?api-version=2024-07-01.20.0",
            &[("ocp-date", "now")],
        );
        let secret = STANDARD.decode(account_key(&key, "acct", "secondary")).unwrap();
        let signature = STANDARD.encode(TokenKey::new(secret).derive(string_to_sign(&req, "acct", false).as_bytes()));
        assert_eq!(
            check(&key, &req, "acct", &format!("SharedKey acct:{signature}")),
            Ok(())
        );
        assert!(check(&key, &req, "acct", "SharedKey acct:abc").is_err());
        assert!(check(&key, &req, "other", &format!("SharedKey acct:{signature}")).is_err());
        assert!(check(&key, &req, "acct", "SharedKey nonsense").is_err());
        // Changing anything signed breaks it.
        req.headers.insert("ocp-date", HeaderValue::from_static("later"));
        assert!(check(&key, &req, "acct", &format!("SharedKey acct:{signature}")).is_err());
        assert_eq!(STANDARD.decode(account_key(&key, "acct", "primary")).unwrap().len(), 64);
        assert_ne!(
            account_key(&key, "acct", "primary"),
            account_key(&key, "acct", "secondary")
        );
    }
}
