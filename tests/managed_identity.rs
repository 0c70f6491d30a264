//! `azure_identity`'s `ManagedIdentityCredential` against the emulator's App Service style endpoint.
//! It reads `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` from the process environment, so it runs in a
//! test binary of its own where no other test can see those variables.

use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, Transport};
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use sigrun::emulator::{Emulator, EmulatorOptions};

#[tokio::test]
async fn managed_identity_credential_gets_a_token_arm_accepts() {
    let emulator = Emulator::start(EmulatorOptions::default()).await.expect("emulator");
    let info = emulator.info().clone();
    let pem = std::fs::read(info.ca_cert.as_ref().unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
        .build()
        .unwrap();
    // SAFETY: this binary holds one test; nothing else reads the environment concurrently.
    unsafe {
        std::env::set_var("IDENTITY_ENDPOINT", &info.identity_endpoint);
        std::env::set_var("IDENTITY_HEADER", &info.identity_header);
    }
    let credential = ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
        user_assigned_id: Some(UserAssignedId::ClientId("5a1b2c3d-0000-4000-8000-00000000c001".into())),
        client_options: ClientOptions {
            transport: Some(Transport::new(Arc::new(client.clone()))),
            ..Default::default()
        },
    }))
    .expect("credential");
    let token = credential
        .get_token(&["https://management.azure.com/.default"], None)
        .await
        .expect("managed identity token");
    assert!(token.expires_on > time::OffsetDateTime::now_utc() + time::Duration::minutes(50));

    let url = format!(
        "{}/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-imaging/providers/Microsoft.Compute/virtualMachines/build-ubuntu-2204?api-version=2024-07-01",
        info.base_url
    );
    let reply = client.get(&url).bearer_auth(token.token.secret()).send().await.unwrap();
    assert_eq!(reply.status(), 200);

    // A wrong header secret is refused.
    let reply = client
        .get(format!(
            "{}?api-version=2019-08-01&resource=https://management.azure.com",
            info.identity_endpoint
        ))
        .header("X-IDENTITY-HEADER", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 401);
}
