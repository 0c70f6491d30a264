//! Azure AD against the emulator: the official `azure_identity` client gets tokens from it, AAD's
//! error bodies come back for a wrong secret or an unknown client, the discovery documents MSAL-based
//! clients read first are served, and the IMDS-style managed identity endpoint issues tokens.

use std::sync::Arc;

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_identity::{ClientSecretCredential, ClientSecretCredentialOptions};
use reqwest::Method;

use crate::helpers::*;

fn credential(emu: &TestEmulator, app: (&str, &str)) -> Arc<ClientSecretCredential> {
    let mut cloud = CustomConfiguration::default();
    cloud.authority_host = emu.base().to_string();
    ClientSecretCredential::new(
        TENANT,
        app.0.to_string(),
        Secret::new(app.1.to_string()),
        Some(ClientSecretCredentialOptions {
            client_options: ClientOptions {
                transport: Some(Transport::new(Arc::new(emu.client.clone()))),
                cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
                retry: RetryOptions::none(),
                ..Default::default()
            },
        }),
    )
    .expect("credential")
}

#[tokio::test]
async fn client_secret_credential_gets_tokens_that_arm_and_batch_accept() {
    let emu = start_fast().await;
    let cred = credential(&emu, PIPELINE_APP);
    let arm = cred.get_token(&[ARM_SCOPE], None).await.expect("ARM token");
    assert!(arm.expires_on > time::OffsetDateTime::now_utc() + time::Duration::minutes(50));
    let vm = compute(
        SUB_IMAGING,
        "rg-imaging",
        "virtualMachines/build-ubuntu-2204",
        COMPUTE_API,
    );
    let reply = emu.get(&vm, arm.token.secret()).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["properties"]["storageProfile"]["osDisk"]["osType"], "Linux");

    let batch = cred.get_token(&[BATCH_SCOPE], None).await.expect("Batch token");
    let url = format!("{}/supportedimages?api-version={BATCH_API}", emu.batch_url("sigrunweu"));
    let reply = emu.get(&url, batch.token.secret()).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert!(reply.body["value"].as_array().is_some_and(|v| !v.is_empty()));

    // An ARM token is not a Batch token, and the other way round.
    assert_eq!(emu.get(&url, arm.token.secret()).await.status, 401);
    let reply = emu.get(&vm, batch.token.secret()).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.code(), "InvalidAuthenticationTokenAudience");
}

#[tokio::test]
async fn wrong_secret_and_unknown_client_get_aad_errors() {
    let emu = start_fast().await;
    let err = credential(&emu, (PIPELINE_APP.0, "not-the-secret"))
        .get_token(&[ARM_SCOPE], None)
        .await
        .expect_err("wrong secret must fail");
    assert!(
        format!("{err:?}").contains("7000215"),
        "AADSTS7000215 expected, got {err:?}"
    );

    let reply = emu
        .client
        .post(format!("{}/{TENANT}/oauth2/v2.0/token", emu.base()))
        .form(&[
            ("client_id", "00000000-dead-beef-0000-000000000000"),
            ("client_secret", "x"),
            ("grant_type", "client_credentials"),
            ("scope", ARM_SCOPE),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized_client");
    assert_eq!(body["error_codes"][0], 700016);
    assert!(body["error_description"].as_str().unwrap().starts_with("AADSTS700016"));

    let reply = emu
        .client
        .post(format!("{}/{TENANT}/oauth2/v2.0/token", emu.base()))
        .form(&[
            ("client_id", PIPELINE_APP.0),
            ("client_secret", PIPELINE_APP.1),
            ("grant_type", "client_credentials"),
            ("scope", "https://vault.azure.net/.default"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(body["error_codes"][0], 500011);

    let reply = emu
        .client
        .post(format!("{}/not-a-tenant/oauth2/v2.0/token", emu.base()))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 400);
}

#[tokio::test]
async fn discovery_documents_point_back_at_the_emulator() {
    let emu = start_fast().await;
    let base = emu.base();
    let reply = emu
        .call(
            Method::GET,
            &format!(
                "{base}/common/discovery/instance?api-version=1.1&authorization_endpoint={base}/{TENANT}/oauth2/v2.0/authorize"
            ),
            None,
            None,
        )
        .await;
    assert_eq!(reply.status, 200);
    let endpoint = reply.body["tenant_discovery_endpoint"].as_str().unwrap().to_string();
    assert_eq!(
        endpoint,
        format!("{base}/{TENANT}/v2.0/.well-known/openid-configuration")
    );
    assert!(reply.body["metadata"][0]["aliases"].is_array());

    let reply = emu.call(Method::GET, &endpoint, None, None).await;
    assert_eq!(reply.status, 200);
    let token_endpoint = reply.body["token_endpoint"].as_str().unwrap();
    assert_eq!(token_endpoint, format!("{base}/{TENANT}/oauth2/v2.0/token"));
    assert!(reply.body["authorization_endpoint"].as_str().unwrap().starts_with(base));
    assert_eq!(reply.body["issuer"], format!("{base}/{TENANT}/v2.0"));
    for field in [
        "jwks_uri",
        "device_authorization_endpoint",
        "end_session_endpoint",
        "tenant_region_scope",
    ] {
        assert!(reply.body.get(field).is_some(), "openid-configuration lacks {field}");
    }
}

#[tokio::test]
async fn imds_style_managed_identity_issues_tokens() {
    let emu = start_fast().await;
    let url = format!(
        "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/",
        emu.base()
    );
    let without_header = emu.client.get(&url).send().await.unwrap();
    assert_eq!(without_header.status(), 400, "IMDS wants `Metadata: true`");
    let reply = emu.client.get(&url).header("Metadata", "true").send().await.unwrap();
    assert_eq!(reply.status(), 200);
    let body: serde_json::Value = reply.json().await.unwrap();
    for field in [
        "access_token",
        "expires_in",
        "expires_on",
        "not_before",
        "resource",
        "token_type",
        "client_id",
    ] {
        assert!(body[field].is_string(), "IMDS sends `{field}` as a string: {body}");
    }
    let token = body["access_token"].as_str().unwrap();
    let vm = compute(
        SUB_IMAGING,
        "rg-imaging",
        "virtualMachines/build-ubuntu-2204",
        COMPUTE_API,
    );
    assert_eq!(emu.get(&vm, token).await.status, 200);
}

#[tokio::test]
async fn arm_refuses_missing_bad_and_foreign_tokens() {
    let emu = start_fast().await;
    let vm = compute(
        SUB_IMAGING,
        "rg-imaging",
        "virtualMachines/build-ubuntu-2204",
        COMPUTE_API,
    );
    let reply = emu.call(Method::GET, &vm, None, None).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.code(), "AuthenticationFailed");
    assert!(
        reply
            .header("www-authenticate")
            .unwrap()
            .starts_with("Bearer authorization_uri=")
    );

    let token = emu.arm_token().await;
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    let reply = emu.get(&vm, &tampered).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.code(), "InvalidAuthenticationToken");

    let partner = emu.token_for(PARTNER_APP, OTHER_TENANT, ARM_SCOPE).await;
    let reply = emu.get(&vm, &partner).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.code(), "InvalidAuthenticationTokenTenant");
}
